"""GPT-NeoX (Pythia): partial rotary embeddings, LayerNorm, parallel attention + MLP residual.

Letters: B batch, T new tokens, S keys (cache slots), D model width, N heads, H head dim, F MLP width,
V vocabulary, R rotary dims (``rotary_pct · H``).

With ``use_parallel_residual`` (Pythia) a block is ``x + attn(ln_1(x)) + mlp(ln_2(x))``; otherwise
``y = x + attn(ln_1(x)); y + mlp(ln_2(y))``. HF fuses q/k/v per head in ``query_key_value``;
``params.py`` splits them.
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
from jaxalign.models.rope import RopeConfig


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig:
    """Sizes and switches of GPT-NeoX; ``rope.partial_rotary_factor`` is HF's ``rotary_pct``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    rope: RopeConfig = RopeConfig(partial_rotary_factor=0.25)
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    model_type: str = "gpt_neox"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ModelError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_heads}")
        if self.rope.rotary_dim(self.head_dim) % 2:
            raise ModelError(f"rotary_pct {self.rope.partial_rotary_factor} gives an odd number of "
                             f"rotary dims")
        base.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "GPTNeoXConfig":
        c = dict(config)
        if c.get("model_type", "gpt_neox") != "gpt_neox":
            raise ModelError(f"model_type {c.get('model_type')!r} is not gpt_neox")
        eos = c.get("eos_token_id")
        rope = RopeConfig.from_hf(c, default_theta=float(c.get("rotary_emb_base", 10000)),
                                  partial_rotary_factor=float(c.get("rotary_pct", 0.25)))
        return cls(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                   intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                   num_heads=int(c["num_attention_heads"]), rope=rope, hidden_act=c.get("hidden_act", "gelu"),
                   layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)),
                   use_parallel_residual=bool(c.get("use_parallel_residual", True)),
                   attention_bias=bool(c.get("attention_bias", True)),
                   max_position_embeddings=int(c.get("max_position_embeddings") or 2048),
                   tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                   bos_token_id=c.get("bos_token_id"), pad_token_id=c.get("pad_token_id"),
                   eos_token_id=tuple(eos) if isinstance(eos, list) else eos)

    def to_hf(self) -> dict[str, Any]:
        rope = self.rope.to_hf()
        rope["rope_parameters"]["partial_rotary_factor"] = self.rope.partial_rotary_factor
        return dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], vocab_size=self.vocab_size,
                    hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                    hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
                    use_parallel_residual=self.use_parallel_residual, attention_bias=self.attention_bias,
                    max_position_embeddings=self.max_position_embeddings,
                    rotary_pct=self.rope.partial_rotary_factor, rotary_emb_base=self.rope.theta,
                    tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                    eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                    else self.eos_token_id, pad_token_id=self.pad_token_id, **rope)


class Attention(nnx.Module):
    """Multi-head attention; RoPE on the first ``R`` dims of each head."""

    def __init__(self, cfg: GPTNeoXConfig, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        heads = dict(bias_shape=(N, H), bias_axes=("heads", "head_dim")) if cfg.attention_bias else {}
        self.q_proj = base.Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **heads, **p)
        self.k_proj = base.Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **heads, **p)
        self.v_proj = base.Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **heads, **p)
        out = dict(bias_shape=(D,), bias_axes=("embed",)) if cfg.attention_bias else {}
        self.o_proj = base.Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), **out, **p)
        self.layer = layer

    def __call__(self, x_BTD, positions_BT, inv_freq_F, mask_BTS, cache: base.KVCache | None,
                 impl: str = "xla"):
        q_BTNH = base.apply_rope(self.q_proj(x_BTD), positions_BT, inv_freq_F)
        k_BTNH = base.apply_rope(self.k_proj(x_BTD), positions_BT, inv_freq_F)
        v_BTNH = self.v_proj(x_BTD)
        if cache is None:
            k_BSNH, v_BSNH = k_BTNH, v_BTNH
        else:
            cache = cache.write_layer(self.layer, k_BTNH, v_BTNH)
            k_BSNH, v_BSNH = cache.keys[self.layer], cache.values[self.layer]
        out_BTNH = base.attend(q_BTNH, k_BSNH, v_BSNH, mask_BTS, impl=impl)
        return self.o_proj(out_BTNH), cache  # [B, T, D]


class MLP(nnx.Module):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))``."""

    def __init__(self, cfg: GPTNeoXConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, F = cfg.hidden_size, cfg.intermediate_size
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.up_proj = base.Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), bias_shape=(F,),
                                   bias_axes=("mlp",), **p)
        self.down_proj = base.Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), bias_shape=(D,),
                                     bias_axes=("embed",), **p)
        self.act = base.activation(cfg.hidden_act)

    def __call__(self, x_BTD):
        return self.down_proj(parallel.constrain(self.act(self.up_proj(x_BTD)), parallel.ACT_BTF))


class DecoderLayer(nnx.Module):
    """Parallel (Pythia) or sequential residual block."""

    def __init__(self, cfg: GPTNeoXConfig, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = base.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **p)
        self.attn = Attention(cfg, layer, **p)
        self.mlp_norm = base.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **p)
        self.mlp = MLP(cfg, **p)
        self.parallel = cfg.use_parallel_residual

    def __call__(self, x_BTD, positions_BT, inv_freq_F, mask_BTS, cache, impl: str = "xla"):
        a_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, inv_freq_F, mask_BTS, cache, impl)
        if self.parallel:
            return x_BTD + a_BTD + self.mlp(self.mlp_norm(x_BTD)), cache
        y_BTD = x_BTD + a_BTD
        return y_BTD + self.mlp(self.mlp_norm(y_BTD)), cache


class GPTNeoX(base.DecoderLM):
    """GPT-NeoX language model (calling convention and options of :class:`jaxalign.models.llama.Llama`)."""

    def __init__(self, cfg: GPTNeoXConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str | None = None, attention_impl: str = "auto"):
        p = self.setup(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                       attention_impl=attention_impl)
        self.embed = base.Embed(cfg.vocab_size, cfg.hidden_size, **p)
        self.layers = nnx.List([DecoderLayer(cfg, i, **p) for i in range(cfg.num_layers)])
        self.final_norm = base.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **p)
        self.make_lm_head(rngs, param_dtype)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, *,
                 cache: base.KVCache | None = None, return_logits: bool = True,
                 return_layer_hidden: bool = False, branch_BT: jax.Array | tuple | None = None) -> base.ModelOutput:
        cfg = self.cfg
        positions_BT, valid_BT, k_pos_BS, k_valid_BS, cache = self.call_positions(attention_mask_BT, cache, branch_BT)
        mask_BTS = base.attention_mask_BTS(positions_BT, k_pos_BS, valid_BT, k_valid_BS)
        inv_freq_F = cfg.rope.inv_freq_for(cfg.head_dim, positions_BT, valid_BT)
        x_BTD = self.embed(input_ids_BT)
        x_BTD, layer_hidden, cache = self.run_layers(x_BTD, lambda i: (positions_BT, inv_freq_F, mask_BTS), cache,
                                                     collect_hidden=return_layer_hidden)
        return self.finish(x_BTD, layer_hidden, cache, input_ids_BT.shape[1], return_logits=return_logits,
                           return_layer_hidden=return_layer_hidden)
