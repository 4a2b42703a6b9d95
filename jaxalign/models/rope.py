"""Rotary position embeddings: the config read from HF ``config.json`` and the inverse frequencies.

Supported ``rope_type``s (HF names): ``default``, ``linear`` (positions divided by ``factor``),
``dynamic`` (NTK-aware: the base grows once the longest position exceeds ``max_position_embeddings``),
``llama3`` (Llama 3.1 band-wise interpolation). Both spellings of ``config.json`` are read:
transformers 5 (``rope_parameters`` holding ``rope_theta``) and 4 (``rope_theta`` + ``rope_scaling``).
The rotation itself is :func:`jaxalign.models.base.apply_rope`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import ModelError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_KEYS = {  # keys each type may carry besides rope_type/type, rope_theta, partial_rotary_factor
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE settings of one model.

    Attributes:
      theta: base wavelength (``rope_theta``).
      rope_type: one of :data:`ROPE_TYPES`.
      factor: scaling factor (``linear``, ``dynamic``, ``llama3``).
      low_freq_factor, high_freq_factor, original_max_position_embeddings: ``llama3`` bands.
      partial_rotary_factor: fraction of the head dims that rotate (GPT-NeoX ``rotary_pct``).
      max_position_embeddings: the trained length (``dynamic`` grows the base beyond it).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, default_theta: float = 10000.0,
                partial_rotary_factor: float | None = None) -> "RopeConfig":
        """Reads ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4) of a ``config.json``."""
        params = config.get("rope_scaling") or config.get("rope_parameters") or {}
        params = dict(params)
        if params and set(params) <= {"full_attention", "sliding_attention"}:  # nested per layer type
            values = [dict(v) for v in params.values() if v is not None]
            if any(v != values[0] for v in values):
                raise ModelError("rope_parameters: different RoPE per layer type is not supported")
            params = values[0] if values else {}
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
        if rope_type != "default":
            if "factor" not in params:
                raise ModelError(f"rope_scaling.factor is required for rope_type {rope_type!r}")
            kw["factor"] = float(params["factor"])
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in params:
                    raise ModelError(f"rope_scaling.{key} is required for rope_type 'llama3'")
                kw[key] = float(params[key])
            kw["original_max_position_embeddings"] = int(
                params.get("original_max_position_embeddings") or max_pos)
        return cls(theta=float(theta), rope_type=rope_type, partial_rotary_factor=float(partial or 1.0),
                   max_position_embeddings=max_pos, **kw)

    def to_hf(self) -> dict[str, Any]:
        """``rope_parameters`` (v5) plus ``rope_theta``/``rope_scaling`` (v4), without partial rotary."""
        params: dict[str, Any] = {"rope_type": self.rope_type}
        if self.rope_type != "default":
            params["factor"] = self.factor
        if self.rope_type == "llama3":
            params.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                          original_max_position_embeddings=self.original_max_position_embeddings)
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
        return inv.astype(np.float32)

    def inv_freq_for(self, head_dim: int, positions_BT: jax.Array,
                     valid_BT: jax.Array | None = None) -> jax.Array:
        """Inverse frequencies for a call whose tokens sit at ``positions_BT``.

        Equal to :meth:`inv_freq` except for ``dynamic``, where (like HF) the base grows with the longest
        position of the call once it exceeds ``max_position_embeddings``.
        """
        if self.rope_type != "dynamic":
            return jnp.asarray(self.inv_freq(head_dim))
        dim = self.rotary_dim(head_dim)
        pos = positions_BT if valid_BT is None else jnp.where(valid_BT.astype(bool), positions_BT, 0)
        max_pos = float(self.max_position_embeddings)
        seq_len = jnp.maximum(jnp.max(pos).astype(jnp.float32) + 1.0, max_pos)
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
