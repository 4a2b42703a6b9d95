"""The Llama-like decoder of Llama 2/3, Mistral, Mixtral, Qwen2/3, Qwen3-MoE, Gemma 1-3, OLMo 1/2, Phi-3.

Letters: B batch, T new tokens, S keys (cache slots), D model width, N query heads, K key/value heads,
H head dim, F MLP width, V vocabulary.

One pre-norm block, ``x += attn(norm(x)); x += mlp(norm(x))`` with RoPE and gated MLP
``down(act(gate(x)) · up(x))``; the families differ only by switches read from their ``config.json``:

=========  ==================================================================================
llama      the plain block; ``attention_bias``, ``mlp_bias``; RoPE scaling (linear, dynamic, llama3, yarn)
mistral    sliding-window attention on every layer
qwen2      q/k/v biases; sliding window on layers ``>= max_window_layers`` when enabled
qwen3      qwen2's window switches, no q/k/v biases by default, RMSNorm of q and k per head
mixtral    mistral with a sparse mixture-of-experts MLP (:mod:`jaxalign.models.moe`) in every layer
qwen3_moe  qwen3 (window on every layer) with mixture-of-experts MLPs (``decoder_sparse_step``,
           ``mlp_only_layers`` keep some dense)
gemma      embeddings × √D, RMSNorm with ``(1 + w)``, GeGLU (tanh approximation), ``head_dim``
gemma2     gemma + norms after attention and MLP too, attention and final logit soft-capping,
           scale ``query_pre_attn_scalar⁻½``, alternating sliding/global layers
olmo       non-parametric LayerNorm, q/k/v clipped to ``±clip_qkv``
olmo2      norms after attention and MLP only (no pre-norms), RMSNorm of q and k over all heads
=========  ==================================================================================

Gemma 3 (:mod:`jaxalign.models.gemma3`) and Phi-3 (:mod:`jaxalign.models.phi3`) are this decoder too,
with their own config readers (Gemma 3: per-head q/k norms, a RoPE of its own for sliding layers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import parallel
from jaxalign.errors import ModelError
from jaxalign.models import base
from jaxalign.models.moe import SparseMoE
from jaxalign.models.rope import RopeConfig

SLIDING, FULL = "sliding_attention", "full_attention"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "olmo": "OlmoForCausalLM", "olmo2": "Olmo2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and switches of a Llama-like decoder (see the module table for which family sets what)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # RoPE of sliding layers when it differs (Gemma 3)
    hidden_act: str = "silu"
    norm_eps: float = 1e-6
    norm_kind: str = "llama"  # RMSNorm "llama" | "gemma" (1 + w) | "olmo2"; "olmo": LayerNorm, no params
    norm_placement: str = "pre"  # "pre" | "sandwich" (gemma2: pre and post) | "post" (olmo2)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None  # "all": one RMSNorm over all heads (OLMo 2); "head": per head (Qwen3, Gemma 3)
    clip_qkv: float | None = None
    embed_scale: bool = False
    query_pre_attn_scalar: int | float | None = None  # kept as written (HF checks int)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    max_position_embeddings: int = 2048
    num_experts: int = 0  # mixture-of-experts MLPs (Mixtral, Qwen3-MoE) in moe_layers; 0: dense only
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        if len(self.layer_types) != self.num_layers:
            object.__setattr__(self, "layer_types", tuple(self.layer_types) or (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad:
            raise ModelError(f"layer_types entry {bad[0]!r} is not supported ({FULL!r}, {SLIDING!r})")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ModelError("layer_types has sliding layers but sliding_window is not set")
        if self.qk_norm not in (None, "all", "head"):
            raise ModelError(f"qk_norm {self.qk_norm!r} is not one of None, 'all', 'head'")
        if self.moe_layers and not 1 <= self.experts_per_token <= self.num_experts:
            raise ModelError(f"num_experts_per_tok {self.experts_per_token} is not between 1 and the number of "
                             f"experts {self.num_experts}")
        base.activation(self.hidden_act)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope_of(self, layer: int) -> RopeConfig:
        """The RoPE of layer ``layer`` (``rope_local`` on sliding layers when set)."""
        if self.rope_local is not None and self.layer_types[layer] == SLIDING:
            return self.rope_local
        return self.rope

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
        """Reads a Hugging Face ``config.json`` dict of one of the families in the module table."""
        c = dict(config)
        model_type = c.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ModelError(f"model_type {model_type!r} is not a Llama-like family "
                             f"({', '.join(ARCHITECTURES)})")
        if c.get("use_bidirectional_attention"):
            raise ModelError("use_bidirectional_attention is not supported (causal LMs only)")
        if c.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise ModelError(f"partial_rotary_factor {c['partial_rotary_factor']} is not supported for "
                             f"{model_type}")
        L = int(c["num_hidden_layers"])
        gemma = model_type in ("gemma", "gemma2")
        kw = hf_common_fields(c, tie_default=gemma)
        if model_type == "llama":
            kw.update(mlp_bias=bool(c.get("mlp_bias", False)))
        elif model_type == "mistral":
            if c.get("sliding_window"):
                kw.update(sliding_window=int(c["sliding_window"]), layer_types=(SLIDING,) * L)
        elif model_type in ("mixtral", "qwen3_moe"):
            kw.update(_moe_fields(c, L))
        elif model_type in ("qwen2", "qwen3"):
            if model_type == "qwen2":
                kw.update(qkv_bias=True, o_bias=False)
            else:
                kw.update(qk_norm="head", head_dim=int(c.get("head_dim") or 128))  # HF's default
            if c.get("use_sliding_window") and c.get("sliding_window"):
                first = int(c.get("max_window_layers", 28))  # HF's default
                types = c.get("layer_types") or [SLIDING if i >= first else FULL for i in range(L)]
                kw.update(sliding_window=int(c["sliding_window"]), layer_types=tuple(types))
            elif c.get("layer_types") and SLIDING in c["layer_types"]:
                raise ModelError("layer_types has sliding layers but use_sliding_window is false")
        elif gemma:
            act = c.get("hidden_act") if model_type == "gemma" else c.get("hidden_activation")
            act = act or "gelu_pytorch_tanh"
            kw.update(norm_kind="gemma", embed_scale=True, hidden_act="gelu_pytorch_tanh" if act == "gelu"
                      else act)
            if model_type == "gemma2":
                window = c.get("sliding_window")
                types = c.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(L)]
                kw.update(norm_placement="sandwich",
                          query_pre_attn_scalar=c.get("query_pre_attn_scalar") or 256,
                          attn_logit_softcap=opt_float(c.get("attn_logit_softcapping")),
                          final_logit_softcap=opt_float(c.get("final_logit_softcapping")),
                          sliding_window=int(window) if window else None,
                          layer_types=tuple(types) if window else (FULL,) * L)
        elif model_type == "olmo":
            kw.update(norm_kind="olmo", norm_eps=1e-5, clip_qkv=opt_float(c.get("clip_qkv")))
        elif model_type == "olmo2":
            kw.update(norm_kind="olmo2", norm_placement="post", qk_norm="all",
                      norm_eps=float(c.get("rms_norm_eps") or 1e-5))
        kw["rope"] = RopeConfig.from_hf(c)
        return cls(**kw)

    def hf_common(self, architecture: str) -> dict[str, Any]:
        """The ``config.json`` keys every family writes (sizes, token ids, RoPE)."""
        return dict(
            model_type=self.model_type, architectures=[architecture], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id, pad_token_id=self.pad_token_id, **self.rope.to_hf())

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers`` loads as this model."""
        t = self.model_type
        out = self.hf_common(ARCHITECTURES[t])
        out["hidden_activation" if t == "gemma2" else "hidden_act"] = self.hidden_act
        if t != "olmo":
            out["rms_norm_eps"] = self.norm_eps
        if t != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if t == "llama":
            out["mlp_bias"] = self.mlp_bias
        if t in ("mixtral", "qwen3_moe"):
            out.update(_moe_to_hf(self))
        if t in ("mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma2"):
            out["sliding_window"] = self.sliding_window
        if t in ("qwen2", "qwen3", "gemma2"):
            out["layer_types"] = list(self.layer_types)
        if t in ("qwen2", "qwen3"):
            sliding = [i for i, kind in enumerate(self.layer_types) if kind == SLIDING]
            out.update(use_sliding_window=self.sliding_window is not None,
                       max_window_layers=sliding[0] if sliding else self.num_layers)
        if t == "gemma2":
            out.update(query_pre_attn_scalar=self.query_pre_attn_scalar,
                       attn_logit_softcapping=self.attn_logit_softcap,
                       final_logit_softcapping=self.final_logit_softcap)
        if t == "olmo":
            out["clip_qkv"] = self.clip_qkv
        return out


def hf_common_fields(c: Mapping[str, Any], *, tie_default: bool = False) -> dict[str, Any]:
    """:class:`LlamaConfig` fields every family reads the same way from ``config.json`` ``c``."""
    N, D = int(c["num_attention_heads"]), int(c["hidden_size"])
    eos = c.get("eos_token_id")
    bias = bool(c.get("attention_bias", False))
    return dict(
        model_type=c["model_type"], vocab_size=int(c["vocab_size"]), hidden_size=D,
        intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]), num_heads=N,
        num_kv_heads=int(c.get("num_key_value_heads") or N), head_dim=int(c.get("head_dim") or D // N),
        hidden_act=c.get("hidden_act") or "silu", norm_eps=float(c.get("rms_norm_eps") or 1e-6),
        max_position_embeddings=int(c.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", tie_default)),
        bos_token_id=c.get("bos_token_id"), pad_token_id=c.get("pad_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, qkv_bias=bias, o_bias=bias)


def _moe_fields(c: Mapping[str, Any], L: int) -> dict[str, Any]:
    """LlamaConfig fields of a ``mixtral`` or ``qwen3_moe`` config (window on every layer when set)."""
    mixtral = c["model_type"] == "mixtral"
    k = c.get("num_experts_per_tok")
    kw: dict[str, Any] = dict(experts_per_token=int(k if k is not None else 2 if mixtral else 8))  # HF defaults
    experts = c.get("num_local_experts") or c.get("num_experts")  # transformers writes either spelling
    window = c.get("sliding_window")
    if mixtral:
        kw.update(num_experts=int(experts or 8), norm_topk_prob=True,
                  moe_intermediate_size=int(c["intermediate_size"]), moe_layers=tuple(range(L)))
    else:
        step, dense = int(c.get("decoder_sparse_step") or 1), set(c.get("mlp_only_layers") or ())
        E = int(experts if experts is not None else 128)
        kw.update(num_experts=E, moe_intermediate_size=int(c.get("moe_intermediate_size") or 768),
                  norm_topk_prob=bool(c.get("norm_topk_prob", False)), qk_norm="head",
                  head_dim=int(c.get("head_dim") or 128),
                  moe_layers=tuple(i for i in range(L) if i not in dense and E > 0 and (i + 1) % step == 0))
        window = window if c.get("use_sliding_window") else None
    if window:
        kw.update(sliding_window=int(window), layer_types=(SLIDING,) * L)
    return kw


def _moe_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    if cfg.model_type == "mixtral":
        return dict(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token)
    return dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token, decoder_sparse_step=1,
                moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                mlp_only_layers=[i for i in range(cfg.num_layers) if i not in cfg.moe_layers],
                use_sliding_window=cfg.sliding_window is not None)


def opt_float(x):
    return None if x is None else float(x)


def _norm(cfg: LlamaConfig, dim: int, *, rngs, dtype, param_dtype):
    if cfg.norm_kind == "olmo":
        return base.LayerNorm(dim, eps=cfg.norm_eps, use_scale=False, use_bias=False, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
    return base.RMSNorm(dim, eps=cfg.norm_eps, kind=cfg.norm_kind, rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE (and the families' q/k/v biases, clipping, q/k norms)."""

    def __init__(self, cfg: LlamaConfig, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        q_bias = dict(bias_shape=(N, H), bias_axes=("heads", "head_dim")) if cfg.qkv_bias else {}
        kv_bias = dict(bias_shape=(K, H), bias_axes=("kv_heads", "head_dim")) if cfg.qkv_bias else {}
        o_bias = dict(bias_shape=(D,), bias_axes=("embed",)) if cfg.o_bias else {}
        self.q_proj = base.Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"), **q_bias, **p)
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.k_proj = base.Einsum("BTD,DKH->BTKH", (D, K, H), kv_axes, **kv_bias, **p)
        self.v_proj = base.Einsum("BTD,DKH->BTKH", (D, K, H), kv_axes, **kv_bias, **p)
        self.o_proj = base.Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), **o_bias, **p)
        if cfg.qk_norm:  # OLMo 2: one RMSNorm over all heads' dims; Qwen3, Gemma 3: over each head's
            per_head = cfg.qk_norm == "head"
            self.q_norm = base.RMSNorm(H if per_head else N * H, eps=cfg.norm_eps, kind=cfg.norm_kind, **p)
            self.k_norm = base.RMSNorm(H if per_head else K * H, eps=cfg.norm_eps, kind=cfg.norm_kind, **p)
        self.layer = layer
        self.clip_qkv = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        self.softcap = cfg.attn_logit_softcap
        self.scale = (cfg.query_pre_attn_scalar or H) ** -0.5
        self.rope_scaling = cfg.rope_of(layer).attention_scaling()  # YaRN/LongRoPE cos/sin factor

    def __call__(self, x_BTD, positions_BT, inv_freq_F, mask_BTS, cache: base.KVCache | None,
                 impl: str = "xla"):
        q_BTNH = self.q_proj(x_BTD)
        k_BTKH = self.k_proj(x_BTD)
        v_BTKH = self.v_proj(x_BTD)
        if self.clip_qkv is not None:  # OLMo
            c = self.clip_qkv
            q_BTNH, k_BTKH, v_BTKH = (jnp.clip(a, -c, c) for a in (q_BTNH, k_BTKH, v_BTKH))
        if self.qk_norm == "head":
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        elif self.qk_norm:
            q_BTNH = self.q_norm(q_BTNH.reshape(*q_BTNH.shape[:2], -1)).reshape(q_BTNH.shape)
            k_BTKH = self.k_norm(k_BTKH.reshape(*k_BTKH.shape[:2], -1)).reshape(k_BTKH.shape)
        q_BTNH = base.apply_rope(q_BTNH, positions_BT, inv_freq_F, self.rope_scaling)
        k_BTKH = base.apply_rope(k_BTKH, positions_BT, inv_freq_F, self.rope_scaling)
        if cache is None:
            k_BSKH, v_BSKH = k_BTKH, v_BTKH
        else:
            cache = cache.write_layer(self.layer, k_BTKH, v_BTKH)
            k_BSKH, v_BSKH = cache.keys[self.layer], cache.values[self.layer]
        out_BTNH = base.attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=self.scale, softcap=self.softcap,
                               impl=impl)
        return self.o_proj(out_BTNH), cache  # [B, T, D]


class MLP(nnx.Module):
    """Gated MLP ``down(act(gate(x)) · up(x))`` (SwiGLU; GeGLU for Gemma)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        D, F = cfg.hidden_size, cfg.intermediate_size
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        b = lambda n, ax: dict(bias_shape=(n,), bias_axes=(ax,)) if cfg.mlp_bias else {}  # noqa: E731
        self.gate_proj = base.Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), **b(F, "mlp"), **p)
        self.up_proj = base.Einsum("BTD,DF->BTF", (D, F), ("embed", "mlp"), **b(F, "mlp"), **p)
        self.down_proj = base.Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), **b(D, "embed"), **p)
        self.act = base.activation(cfg.hidden_act)

    def __call__(self, x_BTD):
        h_BTF = parallel.constrain(self.act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD), parallel.ACT_BTF)
        return self.down_proj(h_BTF)


class DecoderLayer(nnx.Module):
    """One block. ``pre``: x += attn(n(x)); x += mlp(n(x)). ``sandwich`` (Gemma 2) also norms each
    branch's output; ``post`` (OLMo 2) norms only the outputs: x += n(attn(x)); x += n(mlp(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.placement = cfg.norm_placement
        if self.placement != "post":
            self.attn_norm = _norm(cfg, cfg.hidden_size, **p)
            self.mlp_norm = _norm(cfg, cfg.hidden_size, **p)
        if self.placement != "pre":
            self.attn_out_norm = _norm(cfg, cfg.hidden_size, **p)
            self.mlp_out_norm = _norm(cfg, cfg.hidden_size, **p)
        self.attn = Attention(cfg, layer, **p)
        self.mlp = SparseMoE(cfg, **p) if layer in cfg.moe_layers else MLP(cfg, **p)

    def __call__(self, x_BTD, positions_BT, inv_freq_F, mask_BTS, cache, impl: str = "xla"):
        h_BTD = x_BTD if self.placement == "post" else self.attn_norm(x_BTD)
        h_BTD, cache = self.attn(h_BTD, positions_BT, inv_freq_F, mask_BTS, cache, impl)
        if self.placement != "pre":
            h_BTD = self.attn_out_norm(h_BTD)
        x_BTD = x_BTD + h_BTD
        h_BTD = self.mlp(x_BTD if self.placement == "post" else self.mlp_norm(x_BTD))
        if self.placement != "pre":
            h_BTD = self.mlp_out_norm(h_BTD)
        return x_BTD + h_BTD, cache


class Llama(base.DecoderLM):
    """The decoder: embeddings, ``L`` :class:`DecoderLayer`s, final norm, (tied) unembedding.

    Args:
      cfg: the :class:`LlamaConfig`.
      rngs: initialisation keys (weights are normally overwritten by ``params.from_hf_tensors``).
      dtype: activation dtype; logits are always float32.
      param_dtype: storage dtype of the parameters (``jnp.bfloat16`` halves memory).
      remat: per-block rematerialisation policy name (:func:`base.remat_policy`), ``None`` for none.
      attention_impl: ``"auto"``, ``"xla"``, ``"dot_product"`` or ``"cudnn"`` (:data:`base.ATTENTION_IMPLS`).

    ``dtype``, ``remat`` and ``attention_impl`` can be changed on a built model with :func:`base.configure`.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str | None = None, attention_impl: str = "auto"):
        p = self.setup(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat,
                       attention_impl=attention_impl)
        self.embed = base.Embed(cfg.vocab_size, cfg.hidden_size, **p)
        self.layers = nnx.List([DecoderLayer(cfg, i, **p) for i in range(cfg.num_layers)])
        self.final_norm = _norm(cfg, cfg.hidden_size, **p)
        self.make_lm_head(rngs, param_dtype)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, *,
                 cache: base.KVCache | None = None, return_logits: bool = True,
                 return_layer_hidden: bool = False, branch_BT: jax.Array | tuple | None = None) -> base.ModelOutput:
        """Forward pass; see :mod:`jaxalign.models.base` for positions, masks and the cache."""
        cfg = self.cfg
        positions_BT, valid_BT, k_pos_BS, k_valid_BS, cache = self.call_positions(attention_mask_BT, cache, branch_BT)
        masks = {w: base.attention_mask_BTS(positions_BT, k_pos_BS, valid_BT, k_valid_BS, sliding_window=w)
                 for w in {cfg.window(i) for i in range(cfg.num_layers)}}
        ropes = {r: r.inv_freq_for(cfg.head_dim, positions_BT, valid_BT)
                 for r in {cfg.rope_of(i) for i in range(cfg.num_layers)}}

        x_BTD = self.embed(input_ids_BT)
        if cfg.embed_scale:  # Gemma: × √D rounded to the activation dtype
            x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.hidden_size), x_BTD.dtype)
        x_BTD, layer_hidden, cache = self.run_layers(
            x_BTD, lambda i: (positions_BT, ropes[cfg.rope_of(i)], masks[cfg.window(i)]), cache,
            softcap=cfg.attn_logit_softcap, collect_hidden=return_layer_hidden)
        return self.finish(x_BTD, layer_hidden, cache, input_ids_BT.shape[1], return_logits=return_logits,
                           return_layer_hidden=return_layer_hidden)
