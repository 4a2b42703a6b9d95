"""The on-disk cache of tokenized data sets (``.npz``, never pickle).

A cache entry is keyed by a fingerprint of

* the data's content (SHA-256 of the file bytes, of every Arrow file of a ``datasets`` folder, or of the
  canonical JSON of a Python list; built-in sets add the conversion's name and version),
* the tokenizer (:func:`tokenizer_fingerprint`: its full ``tokenizer.json`` serialisation when it is a
  fast tokenizer, else its vocabulary; special tokens; chat template; and probe tokenizations that catch
  BOS/EOS settings),
* every setting that changes the result (field names, policies, length limits, ``chat``),
* :data:`CACHE_VERSION`, bumped whenever the tokenization code changes its output.

An entry holds the token arrays and the :class:`~jaxalign.data.validate.DataReport` (as JSON bytes in a
``uint8`` array), so a rerun skips reading, validating and tokenizing and still reports the same counts.
Entries are written atomically (a temporary file, then ``os.replace``).

The folder is ``cache_dir`` when given, else ``$JAXALIGN_CACHE/tokenized`` when that variable is set,
else ``~/.cache/jaxalign/tokenized``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any

import numpy as np

CACHE_VERSION = 1
_PROBE = "Hello world! 1234 ünïcödé 日本語\n\tend"


def default_cache_dir() -> str:
    root = os.environ.get("JAXALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "jaxalign")
    return os.path.join(root, "tokenized")


def fingerprint(*parts: Any) -> str:
    """Hex SHA-256 of the canonical JSON of ``parts``."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer could tokenize or render differently."""
    digest = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = getattr(tokenizer, "special_tokens_map", {})
    digest.update(json.dumps(special, sort_keys=True, default=str).encode())
    digest.update(json.dumps(getattr(tokenizer, "chat_template", None), default=str).encode())
    for add in (True, False):
        digest.update(json.dumps(list(tokenizer(_PROBE, add_special_tokens=add)["input_ids"]))
                      .encode())
    digest.update(json.dumps([getattr(tokenizer, "eos_token_id", None),
                              getattr(tokenizer, "pad_token_id", None)]).encode())
    return digest.hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{key}.npz")


def save(path: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Writes ``arrays`` and the JSON-able ``meta`` to one ``.npz`` file, atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **payload)
    os.replace(tmp, path)


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Reads an entry written by :func:`save`; ``None`` when it is missing or unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return arrays, meta
