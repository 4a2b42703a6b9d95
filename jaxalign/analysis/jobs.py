"""What the per-pair analysis jobs (``ches``, ``entangle``, ``probe``, ``select``) share.

The model and its tokenizer (loaded, or given by the caller), the guard that keeps a finished output
from being overwritten by accident, and the parts of a resume fingerprint: the model files' names, sizes
and times, a digest of the token ids, a digest of the batch plan. A job that finds parts written under
another fingerprint refuses to mix them (:class:`jaxalign.store.ChunkedTable`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from jaxalign.errors import ConfigError


def load_model(model_path: str, *, job: str, mesh=None, model_and_tokenizer=None):
    """``(model, tokenizer)`` of ``model_path`` (or ``model_and_tokenizer`` when given).

    Raises:
      ConfigError: the model comes without a tokenizer (``job`` names what needs it).
    """
    if model_and_tokenizer is None:
        from jaxalign.models import load_pretrained

        model_and_tokenizer = load_pretrained(model_path, mesh=mesh)
    if model_and_tokenizer[1] is None:
        raise ConfigError(f"{model_path}: the model has no tokenizer files; {job} needs the tokenizer")
    return model_and_tokenizer


def guard_finished(table_path: Path, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, delete) a finished table: one without a ``.parts`` folder beside it."""
    parts = table_path.with_name(table_path.name + ".parts")
    if table_path.exists() and not parts.exists():
        if not overwrite:
            raise ConfigError(f"{table_path} already exists (a finished run); pass --overwrite to replace "
                              "it or choose another --out")
        table_path.unlink()


def model_stamp(path: str) -> list:
    """Names, sizes and modification times of a model's weight, GGUF and JSON files."""
    p = Path(path)
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files
            if f.is_file() and (f.suffix in (".safetensors", ".gguf", ".json"))]


def tokens_digest(tokens) -> str:
    """SHA-256 of a :class:`jaxalign.data.TokenizedPairs`'s arrays (record indices and token ids)."""
    h = hashlib.sha256()
    for name, arr in sorted(tokens.to_arrays().items()):
        h.update(name.encode() + np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def plan_digest(batches: list[np.ndarray]) -> str:
    """SHA-256 of a batch plan (the row positions of every batch, in order)."""
    return hashlib.sha256(np.concatenate(batches).astype(np.int64).tobytes() if batches else b"").hexdigest()
