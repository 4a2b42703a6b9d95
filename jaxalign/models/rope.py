"""Rotary position embeddings: the config read from HF ``config.json`` and the inverse frequencies.

Supported ``rope_type``s (HF names): ``default``, ``linear`` (positions divided by ``factor``),
``dynamic`` (NTK-aware: the base grows once the longest position exceeds ``max_position_embeddings``),
``llama3`` (Llama 3.1 band-wise interpolation), ``yarn`` (Peng et al., "YaRN: Efficient Context Window
Extension of Large Language Models", 2023, §3: the "NTK-by-parts" interpolation and the attention
temperature ``√(1/t) = 0.1·ln(s) + 1``; Qwen2.5/Qwen3 long-context configs) and ``longrope`` (Ding et al.,
"LongRoPE", 2024, as Phi-3 uses it: per-frequency rescale factors, the long set once a call's longest
position exceeds the original length). Both spellings of
``config.json`` are read: transformers 5 (``rope_parameters`` holding ``rope_theta``, possibly nested by
layer type) and 4 (``rope_theta`` + ``rope_scaling``). The rotation itself is
:func:`jaxalign.models.base.apply_rope` (``yarn``/``longrope`` scale its cos/sin by
:meth:`RopeConfig.attention_scaling`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import ModelError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
_KEYS = {  # keys each type may carry besides rope_type/type, rope_theta, partial_rotary_factor
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "original_max_position_embeddings", "truncate"},
    "longrope": {"factor", "attention_factor", "long_factor", "short_factor", "original_max_position_embeddings"},
}
_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")  # types that read original_max_position_embeddings


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE settings of one model.

    Attributes:
      theta: base wavelength (``rope_theta``).
      rope_type: one of :data:`ROPE_TYPES`.
      factor: scaling factor (``linear``, ``dynamic``, ``llama3``).
      low_freq_factor, high_freq_factor: ``llama3`` bands.
      original_max_position_embeddings: the pre-training length (``llama3``, ``yarn``, ``longrope``).
      partial_rotary_factor: fraction of the head dims that rotate (GPT-NeoX ``rotary_pct``).
      max_position_embeddings: the trained length (``dynamic`` grows the base beyond it).
      attention_factor: cos/sin multiplier (``yarn``, ``longrope``); ``None``: derived from ``factor``.
      beta_fast, beta_slow, mscale, mscale_all_dim, truncate: ``yarn``'s ramp bounds and factor terms.
      long_factor, short_factor: ``longrope``'s per-frequency divisors (``rotary_dim / 2`` each).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    long_factor: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, default_theta: float = 10000.0,
                partial_rotary_factor: float | None = None, layer_type: str | None = None,
                original_max_position_embeddings: int | None = None) -> "RopeConfig":
        """Reads ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4) of a ``config.json``.

        ``layer_type`` picks one entry of parameters nested by layer type (Gemma 3's ``full_attention``
        and ``sliding_attention``); without it nested entries must agree. ``original_max_position_embeddings``
        (Phi-3's top-level key) takes precedence over the one in the parameters.
        """
        params = dict(_rope_params(config, layer_type))
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if rope_type not in ROPE_TYPES:
            raise ModelError(f"rope_scaling.rope_type {rope_type!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
        theta = params.pop("rope_theta", None)
        if theta is None:
            theta = config.get("rope_theta", default_theta)
        partial = params.pop("partial_rotary_factor", None)
        if partial is None:
            partial = config.get("partial_rotary_factor", partial_rotary_factor)
        unknown = sorted(set(params) - _KEYS[rope_type])
        if unknown:
            raise ModelError(f"rope_scaling.{unknown[0]} is not supported for rope_type {rope_type!r}")
        max_pos = int(config.get("max_position_embeddings") or 2048)
        kw: dict[str, Any] = {}
        if rope_type in _ORIGINAL_LENGTH:
            kw["original_max_position_embeddings"] = int(
                original_max_position_embeddings or params.get("original_max_position_embeddings") or max_pos)
        if rope_type != "default":
            factor = params.get("factor")
            if factor is None and rope_type in ("yarn", "longrope"):  # HF: the ratio of the two lengths
                factor = max_pos / kw["original_max_position_embeddings"]
            if factor is None:
                raise ModelError(f"rope_scaling.factor is required for rope_type {rope_type!r}")
            kw["factor"] = float(factor)
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in params:
                    raise ModelError(f"rope_scaling.{key} is required for rope_type 'llama3'")
                kw[key] = float(params[key])
        kw.update(_yarn_longrope_kw(rope_type, params))
        return cls(theta=float(theta), rope_type=rope_type, partial_rotary_factor=float(partial or 1.0),
                   max_position_embeddings=max_pos, **kw)

    def to_hf(self) -> dict[str, Any]:
        """``rope_parameters`` (v5) plus ``rope_theta``/``rope_scaling`` (v4), without partial rotary."""
        params: dict[str, Any] = {"rope_type": self.rope_type}
        if self.rope_type != "default":
            params["factor"] = self.factor
        if self.rope_type == "llama3":
            params.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor)
        if self.rope_type in _ORIGINAL_LENGTH:
            params["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_type in ("yarn", "longrope") and self.attention_factor is not None:
            params["attention_factor"] = self.attention_factor
        if self.rope_type == "yarn":
            params.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
            params.update({k: getattr(self, k) for k in ("mscale", "mscale_all_dim") if getattr(self, k)})
        if self.rope_type == "longrope":
            params.update(long_factor=list(self.long_factor), short_factor=list(self.short_factor))
        scaling = dict(params) if self.rope_type != "default" else None
        return {"rope_theta": self.theta, "rope_scaling": scaling,
                "rope_parameters": dict(params, rope_theta=self.theta)}

    def rotary_dim(self, head_dim: int) -> int:
        """Number of rotating dims (even)."""
        return int(head_dim * self.partial_rotary_factor)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies ``[F]`` (float32, ``F = rotary_dim / 2``) at the trained length."""
        dim = self.rotary_dim(head_dim)
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        inv = (1.0 / np.power(np.float32(self.theta), exponents)).astype(np.float32)
        if self.rope_type == "linear":
            inv = inv / np.float32(self.factor)
        elif self.rope_type == "llama3":
            inv = _llama3(inv, self)
        elif self.rope_type == "yarn":
            inv = _yarn(self, dim)
        elif self.rope_type == "longrope":
            inv = _longrope(self, dim, self.short_factor)
        return inv.astype(np.float32)

    def attention_scaling(self) -> float:
        """The factor HF multiplies cos and sin by: YaRN's ``0.1·ln(s) + 1`` (or its ``mscale`` ratio),
        LongRoPE's ``sqrt(1 + ln(s) / ln(original length))``, or the configured ``attention_factor``;
        1 for the other types."""
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        s = self.factor
        if self.rope_type == "longrope":
            length = self.original_max_position_embeddings
            return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(length))
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(s, self.mscale) / _yarn_mscale(s, self.mscale_all_dim)
        return _yarn_mscale(s)

    def inv_freq_for(self, head_dim: int, positions_BT: jax.Array,
                     valid_BT: jax.Array | None = None) -> jax.Array:
        """Inverse frequencies for a call whose tokens sit at ``positions_BT``.

        Equal to :meth:`inv_freq` except for ``dynamic``, where (like HF) the base grows with the longest
        position of the call once it exceeds ``max_position_embeddings``, and ``longrope``, which takes
        the long factors once that position exceeds ``original_max_position_embeddings``.
        """
        if self.rope_type not in ("dynamic", "longrope"):
            return jnp.asarray(self.inv_freq(head_dim))
        dim = self.rotary_dim(head_dim)
        pos = positions_BT if valid_BT is None else jnp.where(valid_BT.astype(bool), positions_BT, 0)
        longest = jnp.max(pos).astype(jnp.float32) + 1.0
        if self.rope_type == "longrope":
            long = _longrope(self, dim, self.long_factor)
            return jnp.where(longest > self.original_max_position_embeddings, long, self.inv_freq(head_dim))
        max_pos = float(self.max_position_embeddings)
        seq_len = jnp.maximum(longest, max_pos)
        base = self.theta * ((self.factor * seq_len / max_pos) - (self.factor - 1.0)) ** (dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / jnp.power(base, exponents)


def _llama3(inv: np.ndarray, cfg: RopeConfig) -> np.ndarray:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    old_len = float(cfg.original_max_position_embeddings)
    low_wavelen = old_len / cfg.low_freq_factor
    high_wavelen = old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def _rope_params(config: Mapping[str, Any], layer_type: str | None) -> Mapping[str, Any]:
    """The (flat) RoPE parameter dict of a config, or of one layer type when nested by layer type."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if params and set(params) <= {"full_attention", "sliding_attention"}:  # nested per layer type
        if layer_type is not None:
            return params.get(layer_type) or {}
        values = [dict(v) for v in params.values() if v is not None]
        if any(v != values[0] for v in values):
            raise ModelError("rope_parameters: different RoPE per layer type is not supported")
        return values[0] if values else {}
    return params


def _yarn_longrope_kw(rope_type: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """RopeConfig fields of ``yarn`` and ``longrope`` parameters."""
    kw: dict[str, Any] = {}
    if rope_type in ("yarn", "longrope") and params.get("attention_factor") is not None:
        kw["attention_factor"] = float(params["attention_factor"])
    if rope_type == "yarn":
        kw.update(beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                  truncate=bool(params.get("truncate", True)))
        kw.update({k: float(params[k]) for k in ("mscale", "mscale_all_dim") if params.get(k)})
    if rope_type == "longrope":
        for key in ("long_factor", "short_factor"):
            if not params.get(key):
                raise ModelError(f"rope_scaling.{key} is required for rope_type 'longrope'")
            kw[key] = tuple(float(x) for x in params[key])
    return kw


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term ``√(1/t) = 0.1 · mscale · ln(s) + 1`` (Peng et al. 2023, §3)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: RopeConfig, dim: int) -> np.ndarray:
    """YaRN "NTK-by-parts": frequencies with fewer than ``beta_slow`` rotations over the original length
    are interpolated (divided by ``factor``), those with more than ``beta_fast`` kept, a linear ramp between."""
    base, length = cfg.theta, cfg.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(cfg.factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1 - ramp
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def _longrope(cfg: RopeConfig, dim: int, factors: tuple[float, ...]) -> np.ndarray:
    """LongRoPE: each frequency divided by its own factor (``rotary_dim / 2`` of them)."""
    if len(factors) != dim // 2:
        raise ModelError(f"rope_scaling long_factor/short_factor need {dim // 2} entries (rotary dims / 2), "
                         f"got {len(factors)}")
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = 1.0 / (np.asarray(factors, np.float32) * np.power(np.float32(cfg.theta), exponents))
    return inv.astype(np.float32)
