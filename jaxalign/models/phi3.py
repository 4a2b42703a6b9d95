"""Phi-3 / Phi-3.5 / Phi-4-mini (HF ``phi3``): the Llama-like decoder of :mod:`jaxalign.models.llama`.

Phi-3's block is Llama's (pre-norm RMSNorm, SwiGLU, grouped-query attention, no biases); what differs is
how the checkpoint stores it and which RoPE its configs use:

* q, k and v are one ``qkv_proj`` (rows ``[q (N·H) | k (K·H) | v (K·H)]``) and gate and up one
  ``gate_up_proj`` (rows ``[gate (F) | up (F)]``); :mod:`jaxalign.models.params` splits and re-fuses them.
* ``rope_scaling`` of type ``longrope`` (transformers also reads the older names ``su`` and, for Phi-3
  only, ``yarn`` as longrope), ``original_max_position_embeddings`` at the top level (default 4096,
  which wins over the one inside ``rope_scaling`` as in transformers), and a
  ``partial_rotary_factor`` (Phi-4-mini rotates 3/4 of each head).
* ``sliding_window``, when set, applies to every layer.

The model class is :class:`jaxalign.models.llama.Llama`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxalign.errors import ModelError
from jaxalign.models.llama import SLIDING, LlamaConfig, hf_common_fields
from jaxalign.models.rope import RopeConfig

ARCHITECTURE = "Phi3ForCausalLM"


@dataclasses.dataclass(frozen=True)
class Phi3Config(LlamaConfig):
    """A :class:`LlamaConfig` read from and written to a ``phi3`` ``config.json``."""

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "Phi3Config":
        c = dict(config)
        if c.get("model_type") != "phi3":
            raise ModelError(f"model_type {c.get('model_type')!r} is not phi3")
        L = int(c["num_hidden_layers"])
        kw = hf_common_fields(c)
        kw.update(norm_eps=float(c.get("rms_norm_eps") or 1e-5), qkv_bias=False, o_bias=False,
                  max_position_embeddings=int(c.get("max_position_embeddings") or 4096))
        if c.get("sliding_window"):
            kw.update(sliding_window=int(c["sliding_window"]), layer_types=(SLIDING,) * L)
        original = c.get("original_max_position_embeddings") or 4096  # HF's default, ahead of rope_scaling's
        kw["rope"] = RopeConfig.from_hf(_longrope_names(c), partial_rotary_factor=1.0,
                                        original_max_position_embeddings=original)
        if kw["rope"].rope_type not in ("default", "longrope"):
            raise ModelError(f"rope_scaling.rope_type {kw['rope'].rope_type!r} is not supported for phi3 "
                             "(transformers allows 'default' and 'longrope')")
        if kw["rope"].rotary_dim(kw["head_dim"]) % 2:
            raise ModelError(f"partial_rotary_factor {kw['rope'].partial_rotary_factor} gives an odd number "
                             "of rotary dims")
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A ``phi3`` ``config.json`` dict that ``transformers`` loads as this model."""
        out = self.hf_common(ARCHITECTURE)
        out["rope_parameters"]["partial_rotary_factor"] = self.rope.partial_rotary_factor
        out.update(hidden_act=self.hidden_act, rms_norm_eps=self.norm_eps, sliding_window=self.sliding_window,
                   partial_rotary_factor=self.rope.partial_rotary_factor)
        if self.rope.original_max_position_embeddings is not None:
            out["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        return out


def _longrope_names(c: dict[str, Any]) -> dict[str, Any]:
    """``c`` with Phi-3's old RoPE type names ``su`` and ``yarn`` read as ``longrope`` (as transformers does)."""
    out = dict(c)
    for key in ("rope_scaling", "rope_parameters"):
        params = out.get(key)
        if isinstance(params, Mapping) and (params.get("rope_type") or params.get("type")) in ("su", "yarn"):
            out[key] = {k: v for k, v in params.items() if k != "type"} | {"rope_type": "longrope"}
    return out
