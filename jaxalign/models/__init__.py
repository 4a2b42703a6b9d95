"""Flax NNX causal LMs and their torch-free loading, saving and generation.

Public API:

* :func:`load_pretrained` — ``(model, tokenizer)`` from a Hugging Face folder (safetensors, single or
  sharded) or a ``.gguf`` file (dequantised with the ``gguf`` package).
* :func:`save_pretrained` — an HF folder (``model.safetensors``, ``config.json``, tokenizer files)
  that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
* :func:`gguf_to_hf_folder` — a GGUF file dequantised into an HF folder.
* :func:`generate` / :func:`generate_ids` — batched greedy or top-p generation with the KV cache.
* :func:`load_tokenizer`, :func:`tokenizer_from_gguf` — tokenizers alone.
* :func:`load_model` — a model from an HF config dict and HF-named tensors; :func:`supported_model_types`.
* :class:`ModelOutput`, :class:`KVCache` — what every model returns and continues from
  (:mod:`jaxalign.models.base`); the families are in :mod:`jaxalign.models.registry`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxalign.errors import ModelError
from jaxalign.models.base import KVCache, ModelOutput
from jaxalign.models.generate import generate, generate_ids
from jaxalign.models.gguf_file import gguf_to_hf_folder, read_gguf
from jaxalign.models.hf_folder import SafetensorsCheckpoint, read_config, save_safetensors, write_config
from jaxalign.models.tokenizer import load_tokenizer, tokenizer_from_gguf

__all__ = ["load_pretrained", "load_model", "save_pretrained", "gguf_to_hf_folder", "generate",
           "generate_ids", "load_tokenizer", "tokenizer_from_gguf", "supported_model_types", "KVCache",
           "ModelOutput"]


def supported_model_types() -> list[str]:
    """HF ``model_type`` values jaxalign has model code for."""
    from jaxalign.models import registry

    return sorted(registry.FAMILIES)


def load_model(config: dict[str, Any], tensors, *, dtype=jnp.float32, mesh=None, source: str = "model"):
    """Builds the jaxalign model of an HF ``config`` dict from HF-named ``tensors`` (lazy values allowed).

    ``ModelError`` messages start with ``source`` (the folder or file).
    """
    from jaxalign.models import params, registry

    model_type = config.get("model_type")
    try:
        config_class, _, _ = registry.get_family(model_type)
        try:
            cfg = config_class.from_hf(config)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"config.json does not describe a {model_type} model: {type(err).__name__} "
                             f"{err}") from None
        return params.from_hf_tensors(model_type, cfg, tensors, dtype=dtype, mesh=mesh)
    except ModelError as err:
        raise ModelError(f"{source}: {err}") from None


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, mesh=None):
    """Loads ``(model, tokenizer)`` from a Hugging Face folder or a GGUF file, without torch.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or shards listed in
        ``model.safetensors.index.json``) plus tokenizer files; or a ``.gguf`` file (its quantised
        tensors are dequantised to float32, then cast to ``dtype``; its tokenizer is rebuilt from the
        metadata, see :mod:`jaxalign.models.tokenizer`).
      dtype: parameter and activation dtype (``jnp.float32`` or ``jnp.bfloat16``).
      mesh: a ``jax.sharding.Mesh``: each parameter is created directly in its sharding, each device's
        shard sliced from a host copy of that one tensor (safetensors are memory-mapped and read one
        tensor at a time, so the whole model is never held twice).

    Returns:
      ``(model, tokenizer)``; the tokenizer is ``None`` for a folder without tokenizer files or a GGUF
      without ``tokenizer.ggml.*`` metadata.

    Raises:
      ModelError: a path that is neither a folder nor a ``.gguf`` file, a missing file, an unsupported
        ``model_type``, or a tensor whose name or shape does not fit (each message names it).
    """
    p = Path(path)
    if p.is_dir():
        config = read_config(p)
        with SafetensorsCheckpoint(p) as tensors:
            model = load_model(config, tensors, dtype=dtype, mesh=mesh, source=str(p))
        return model, load_tokenizer(p)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"{p}: no such GGUF file")
        config, tensors, g = read_gguf(p)
        model = load_model(config, tensors, dtype=dtype, mesh=mesh, source=str(p))
        has_tokenizer = "tokenizer.ggml.model" in g.metadata
        return model, tokenizer_from_gguf(g) if has_tokenizer else None
    if p.exists():
        raise ModelError(f"{p}: neither a model folder nor a .gguf file")
    raise ModelError(f"{p}: no such model folder or .gguf file")


def save_pretrained(model, tokenizer, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Writes ``model`` (and ``tokenizer``, unless ``None``) as a Hugging Face folder.

    The folder holds ``config.json``, ``model.safetensors`` (or shards of at most ``max_shard_bytes``
    with ``model.safetensors.index.json``) in the parameters' dtype, and the tokenizer files; it loads
    with ``transformers.AutoModelForCausalLM.from_pretrained`` and with :func:`load_pretrained`.
    """
    from jaxalign.models import params

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(params.to_hf_tensors(model), out, max_shard_bytes=max_shard_bytes)
    write_config(model.cfg.to_hf(), out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
