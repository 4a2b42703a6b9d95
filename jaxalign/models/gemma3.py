"""Gemma 3 text models (HF ``gemma3_text``): the Llama-like decoder of :mod:`jaxalign.models.llama` with
Gemma 3's switches, read from its ``config.json``.

What Gemma 3 changes from Gemma 2 (Gemma Team, "Gemma 3 Technical Report", 2025, §2 "Model
Architecture"): local sliding-window and global layers interleaved 5 : 1 (``layer_types``, or HF's older
``sliding_window_pattern``); Gemma 2's attention soft-capping replaced by an RMSNorm of q and k per head
(``(1 + w)`` like every Gemma norm; a non-null ``attn_logit_softcapping``, which transformers reads but
never applies, is refused); a RoPE base of 1M on global layers and 10k on local ones, so the two
layer kinds carry separate RoPE settings (``rope_parameters`` nested by layer type in transformers 5;
``rope_theta``, ``rope_local_base_freq`` and a ``rope_scaling`` that applies to global layers only in
transformers 4). Kept from Gemma 2: four norms per block (before and after attention and MLP), GeGLU
with the tanh approximation (``hidden_activation``), embeddings × √D, ``query_pre_attn_scalar``, tied
embeddings. The model class is :class:`jaxalign.models.llama.Llama`.

An image-text ``gemma3`` checkpoint (Gemma3ForConditionalGeneration: a SigLIP vision tower, a projector
and this decoder) loads as its text decoder: the config is its ``text_config``, the decoder's tensors
are renamed (``model.language_model.*`` / ``language_model.model.*``) and the vision tensors skipped
(:data:`jaxalign.models.params.TABLES` ``"gemma3"``). The model is then a ``gemma3_text`` model and saves
as one (Gemma3ForCausalLM); text-only logits are the image-text model's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxalign.errors import ModelError
from jaxalign.models.llama import FULL, SLIDING, LlamaConfig, hf_common_fields, opt_float
from jaxalign.models.rope import RopeConfig

ARCHITECTURE = "Gemma3ForCausalLM"
# transformers' Gemma3TextConfig defaults for keys a config.json may leave out (the image-text
# checkpoints' text_config lists only a few keys).
DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=131_072,
                hidden_activation="gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class Gemma3Config(LlamaConfig):
    """A :class:`LlamaConfig` read from and written to a ``gemma3_text`` ``config.json``."""

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "Gemma3Config":
        c = dict(config)
        if c.get("model_type") == "gemma3":
            c = _text_config(c)
        if c.get("model_type") != "gemma3_text":
            raise ModelError(f"model_type {c.get('model_type')!r} is not gemma3_text")
        c = {k: v for k, v in DEFAULTS.items() if k not in ("rope_theta", "rope_local_base_freq")} | c
        if c.get("use_bidirectional_attention"):
            raise ModelError("use_bidirectional_attention is not supported (causal LMs only)")
        if c.get("attn_logit_softcapping") is not None:  # transformers 5 reads it but never applies it
            raise ModelError("attn_logit_softcapping is not supported for gemma3_text (Gemma 3 has no attention "
                             "soft-capping; transformers ignores the key); set it to null")
        if c.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise ModelError(f"partial_rotary_factor {c['partial_rotary_factor']} is not supported for "
                             "gemma3_text")
        L = int(c["num_hidden_layers"])
        kw = hf_common_fields(c, tie_default=True)
        window = c.get("sliding_window", DEFAULTS["sliding_window"])
        pattern = int(c.get("sliding_window_pattern") or DEFAULTS["sliding_window_pattern"])
        types = c.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(L)]
        full, local = _rope_parameters(c)
        max_pos = int(c.get("max_position_embeddings") or DEFAULTS["max_position_embeddings"])
        kw.update(
            head_dim=int(c.get("head_dim") or DEFAULTS["head_dim"]), max_position_embeddings=max_pos,
            hidden_act=c.get("hidden_activation") or DEFAULTS["hidden_activation"],
            norm_kind="gemma", norm_placement="sandwich", qk_norm="head", embed_scale=True,
            query_pre_attn_scalar=c.get("query_pre_attn_scalar") or DEFAULTS["query_pre_attn_scalar"],
            final_logit_softcap=opt_float(c.get("final_logit_softcapping")),
            sliding_window=int(window) if window else None, layer_types=tuple(types),
            rope=RopeConfig.from_hf({"rope_parameters": full, "max_position_embeddings": max_pos}),
            rope_local=RopeConfig.from_hf({"rope_parameters": local, "max_position_embeddings": max_pos}))
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A ``gemma3_text`` ``config.json`` dict (both RoPE spellings) that ``transformers`` loads."""
        out = self.hf_common(ARCHITECTURE)
        full, local = self.rope.to_hf(), (self.rope_local or self.rope).to_hf()
        out.update(
            rope_parameters={FULL: full["rope_parameters"], SLIDING: local["rope_parameters"]},
            rope_theta=full["rope_theta"], rope_local_base_freq=local["rope_theta"],
            rope_scaling=full["rope_scaling"], hidden_activation=self.hidden_act, rms_norm_eps=self.norm_eps,
            attention_bias=self.qkv_bias, sliding_window=self.sliding_window, layer_types=list(self.layer_types),
            query_pre_attn_scalar=self.query_pre_attn_scalar, attn_logit_softcapping=None,
            final_logit_softcapping=self.final_logit_softcap, use_bidirectional_attention=False)
        return out


def _text_config(c: Mapping[str, Any]) -> dict[str, Any]:
    """The ``gemma3_text`` config inside an image-text ``gemma3`` config (tying and token ids from the top)."""
    text = dict(c.get("text_config") or {}, model_type="gemma3_text")
    if text.get("final_logit_softcapping") is not None:  # Gemma3ForConditionalGeneration never applies it
        raise ModelError("text_config.final_logit_softcapping is not supported for model_type 'gemma3' "
                         "(the image-text model does not apply it); set it to null")
    text["tie_word_embeddings"] = c.get("tie_word_embeddings", True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if text.get(key) is None and c.get(key) is not None:
            text[key] = c[key]
    return text


def _rope_parameters(c: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat RoPE parameter dicts ``(global, local)`` of a Gemma 3 config, as transformers 5 builds them:
    nested ``rope_parameters`` per layer type, a v4 ``rope_scaling`` updating the global one, and the
    bases from ``rope_theta`` / ``rope_local_base_freq`` where the dicts carry none."""
    params = dict(c.get("rope_parameters") or {})
    if params and set(params) <= {FULL, SLIDING}:
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    else:
        full, local = params, {}
    if c.get("rope_scaling"):
        full.update(c["rope_scaling"])
    full.setdefault("rope_theta", c.get("rope_theta") or DEFAULTS["rope_theta"])
    local.setdefault("rope_theta", c.get("rope_local_base_freq") or DEFAULTS["rope_local_base_freq"])
    return full, local
