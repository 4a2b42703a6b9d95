"""Model families by Hugging Face ``model_type``: config class, model class, parameter table.

>>> from jaxalign.models import registry
>>> cfg_cls, model_cls, table = registry.get_family("llama")
>>> model_cls.__name__
'Llama'
"""

from __future__ import annotations

from typing import Any

from jaxalign.errors import ModelError
from jaxalign.models import params
from jaxalign.models.gemma3 import Gemma3Config
from jaxalign.models.gpt2 import GPT2, GPT2Config
from jaxalign.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from jaxalign.models.llama import Llama, LlamaConfig
from jaxalign.models.phi3 import Phi3Config

# model_type -> (config class with from_hf/to_hf, nnx model class, params.Table of HF names)
FAMILIES: dict[str, tuple[type, type, params.Table]] = {
    **{t: (LlamaConfig, Llama, params.TABLES[t])
       for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "olmo",
                 "olmo2")},
    "gemma3_text": (Gemma3Config, Llama, params.TABLES["gemma3_text"]),
    "gemma3": (Gemma3Config, Llama, params.TABLES["gemma3"]),  # the text decoder of the image-text model
    "phi3": (Phi3Config, Llama, params.TABLES["phi3"]),
    "gpt2": (GPT2Config, GPT2, params.TABLES["gpt2"]),
    "gpt_neox": (GPTNeoXConfig, GPTNeoX, params.TABLES["gpt_neox"]),
}


def get_family(model_type: str) -> tuple[type, type, params.Table]:
    """``(ConfigClass, ModelClass, table)`` of ``model_type``; ``ModelError`` listing the supported ones."""
    if model_type not in FAMILIES:
        raise ModelError(f"model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[model_type]


def config_from_hf(config: dict[str, Any]):
    """The family config of an HF ``config.json`` dict (dispatching on ``model_type``)."""
    if "model_type" not in config:
        raise ModelError("config.json has no model_type")
    cfg_cls, _, _ = get_family(config["model_type"])
    return cfg_cls.from_hf(config)
