"""GPT-2: learned position embeddings, pre-LayerNorm blocks, GELU MLP, tied unembedding.

Letters: B batch, T new tokens, S keys (cache slots), D model width, N heads, H head dim, F MLP width,
V vocabulary, P positions.

HF stores ``Conv1D`` weights ``[in, out]`` and fuses q/k/v in ``c_attn``; ``params.py`` splits them into
the ``[D, N, H]`` kernels used here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import parallel
from jaxalign.errors import ModelError
from jaxalign.models import base


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Sizes and switches of GPT-2 (HF ``GPT2Config`` names in comments)."""

    vocab_size: int
    hidden_size: int  # n_embd
    num_layers: int  # n_layer
    num_heads: int  # n_head
    intermediate_size: int  # n_inner (default 4 · n_embd)
    max_position_embeddings: int = 1024  # n_positions
    hidden_act: str = "gelu_new"  # activation_function
    layer_norm_eps: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # no effect here: attention is always float32
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "gpt2"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ModelError(f"n_embd {self.hidden_size} is not a multiple of n_head {self.num_heads}")
        base.activation(self.hidden_act, "activation_function")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "GPT2Config":
        c = dict(config)
        if c.get("model_type", "gpt2") != "gpt2":
            raise ModelError(f"model_type {c.get('model_type')!r} is not gpt2")
        if c.get("add_cross_attention"):
            raise ModelError("add_cross_attention is not supported (decoder-only GPT-2)")
        D = int(c.get("n_embd") or c.get("hidden_size"))
        eos = c.get("eos_token_id")
        return cls(vocab_size=int(c["vocab_size"]), hidden_size=D,
                   num_layers=int(c.get("n_layer") or c.get("num_hidden_layers")),
                   num_heads=int(c.get("n_head") or c.get("num_attention_heads")),
                   intermediate_size=int(c.get("n_inner") or 4 * D),
                   max_position_embeddings=int(c.get("n_positions") or c.get("max_position_embeddings")
                                               or 1024),
                   hidden_act=c.get("activation_function", "gelu_new"),
                   layer_norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
                   scale_attn_weights=bool(c.get("scale_attn_weights", True)),
                   scale_attn_by_inverse_layer_idx=bool(c.get("scale_attn_by_inverse_layer_idx", False)),
                   reorder_and_upcast_attn=bool(c.get("reorder_and_upcast_attn", False)),
                   tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
                   bos_token_id=c.get("bos_token_id"), pad_token_id=c.get("pad_token_id"),
                   eos_token_id=tuple(eos) if isinstance(eos, list) else eos)

    def to_hf(self) -> dict[str, Any]:
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=self.vocab_size,
                    n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
                    n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
                    activation_function=self.hidden_act, layer_norm_epsilon=self.layer_norm_eps,
                    scale_attn_weights=self.scale_attn_weights,
                    scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
                    reorder_and_upcast_attn=self.reorder_and_upcast_attn,
                    tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                    eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                    else self.eos_token_id, pad_token_id=self.pad_token_id)


class Attention(nnx.Module):
    """Multi-head attention with biases; scale ``H^-½`` (optionally ``/(layer + 1)``)."""

    def __init__(self, cfg: GPT2Config, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        heads = dict(bias_shape=(N, H), bias_axes=("heads", "head_dim"))
        self.q_proj = base.Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **heads, **p)
        self.k_proj = base.Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **heads, **p)
        self.v_proj = base.Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **heads, **p)
        self.o_proj = base.Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"),
                                  bias_shape=(D,), bias_axes=("embed",), **p)
        self.layer = layer
        scale = H ** -0.5 if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def __call__(self, x_BTD, mask_BTS, cache: base.KVCache | None, impl: str = "xla"):
        q_BTNH, k_BTNH, v_BTNH = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if cache is None:
            k_BSNH, v_BSNH = k_BTNH, v_BTNH
        else:
            cache = cache.write_layer(self.layer, k_BTNH, v_BTNH)
            k_BSNH, v_BSNH = cache.keys[self.layer], cache.values[self.layer]
        out_BTNH = base.attend(q_BTNH, k_BSNH, v_BSNH, mask_BTS, scale=self.scale, impl=impl)
        return self.o_proj(out_BTNH), cache  # [B, T, D]


class MLP(nnx.Module):
    """``down(act(up(x)))`` with biases."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, F = cfg.hidden_size, cfg.intermediate_size
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up_proj = base.Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias_shape=(F,),
                                   bias_axes=("mlp",), **p)
        self.down_proj = base.Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), bias_shape=(D,),
                                     bias_axes=("embed",), **p)
        self.act = base.activation(cfg.hidden_act, "activation_function")

    def __call__(self, x_BTD):
        return self.down_proj(parallel.constrain(self.act(self.up_proj(x_BTD)), parallel.ACT_BTF))


class DecoderLayer(nnx.Module):
    """``x += attn(ln_1(x)); x += mlp(ln_2(x))``."""

    def __init__(self, cfg: GPT2Config, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = base.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **p)
        self.attn = Attention(cfg, layer, **p)
        self.mlp_norm = base.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **p)
        self.mlp = MLP(cfg, **p)

    def __call__(self, x_BTD, mask_BTS, cache, impl: str = "xla"):
        h_BTD, cache = self.attn(self.attn_norm(x_BTD), mask_BTS, cache, impl)
        x_BTD = x_BTD + h_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache


class GPT2(base.DecoderLM):
    """GPT-2 language model (calling convention and options of :class:`jaxalign.models.llama.Llama`)."""

    embed_name = "wte"

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str | None = None, attention_impl: str = "auto"):
        p = self.setup(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                       attention_impl=attention_impl)
        self.wte = base.Embed(cfg.vocab_size, cfg.hidden_size, **p)
        self.wpe = base.Embed(cfg.max_position_embeddings, cfg.hidden_size, axes=("positions", "embed"), **p)
        self.layers = nnx.List([DecoderLayer(cfg, i, **p) for i in range(cfg.num_layers)])
        self.final_norm = base.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **p)
        self.make_lm_head(rngs, param_dtype)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, *,
                 cache: base.KVCache | None = None, return_logits: bool = True,
                 return_layer_hidden: bool = False, branch_BT: jax.Array | tuple | None = None) -> base.ModelOutput:
        positions_BT, valid_BT, k_pos_BS, k_valid_BS, cache = self.call_positions(attention_mask_BT, cache, branch_BT)
        mask_BTS = base.attention_mask_BTS(positions_BT, k_pos_BS, valid_BT, k_valid_BS)
        # Positions past n_positions are clipped (padding may sit one past the last token).
        pos_BTD = jnp.take(self.wpe.embedding[...], positions_BT, axis=0, mode="clip").astype(self.dtype)
        x_BTD = self.wte(input_ids_BT) + pos_BTD
        x_BTD, layer_hidden, cache = self.run_layers(x_BTD, lambda i: (mask_BTS,), cache,
                                                     collect_hidden=return_layer_hidden)
        return self.finish(x_BTD, layer_hidden, cache, input_ids_BT.shape[1], return_logits=return_logits,
                           return_layer_hidden=return_layer_hidden)
