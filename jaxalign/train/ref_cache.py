"""Reference log-probs computed once per data set and cached on disk under a fingerprint.

The reference model is frozen, so its summed log-probs of every chosen and rejected response are
fixed numbers: computing them once removes the reference forward pass from every step (and the
reference weights from memory). The cache key covers everything that changes them:

* the reference weights (SHA-256 of the weight files: ``*.safetensors`` / ``.gguf``) and dtype,
* the data (the tokenized pairs' token ids themselves, so source, tokenizer, chat template and length
  limits are all covered) and the padded lengths the batches use,
* the forward mode (shared prompt or full rows) and :data:`CACHE_VERSION`.

An entry is ``CACHE_DIR/<key>.npz`` holding ``ref_chosen_logps`` and ``ref_rejected_logps`` ``[N]``
(float32, in the order of the tokenized pairs) and ``index`` ``[N]``; written atomically. With pair rules
(:mod:`jaxalign.train.pair_rules`) the training set's entry also holds ``ches`` and ``ln_ches`` ``[N]`` (Razin et al.'s scores under the same weights, from
the same shared-prompt forward pass: :func:`jaxalign.train.step.probe_step`). They depend on nothing the
key does not cover, so they share the key; an entry written without them (by an older jaxalign, or for
an eval set) lacks the names a caller needs (``need``) and is recomputed and rewritten whole.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from jaxalign import store
from jaxalign.data import cache as data_cache

CACHE_VERSION = 1


def weights_fingerprint(path: str | os.PathLike) -> str:
    """The model's identity (:func:`jaxalign.store.model_digest`: its weight files and ``config.json``)."""
    return store.model_digest(path)


def tokens_fingerprint(tokens) -> str:
    """SHA-256 of a ``TokenizedPairs``' arrays (:func:`jaxalign.store.digest` of ids, offsets, indices)."""
    return store.digest(tokens.to_arrays())


def cache_key(*, weights: str, dtype: str, tokens: str, lengths: tuple[int, int], shared_prompt: bool) -> str:
    return data_cache.fingerprint("ref-logps", CACHE_VERSION, weights, dtype, tokens, list(lengths),
                                  bool(shared_prompt))


def has_entry(cache_dir: str | os.PathLike, key: str, need: tuple[str, ...] = ()) -> bool:
    """Whether ``key`` has a readable entry holding the arrays ``need`` (besides the log-probs)."""
    found = data_cache.load(data_cache.cache_path(str(cache_dir), key))
    return found is not None and all(k in found[0] for k in need)


def load_or_compute(cache_dir: str | os.PathLike, key: str, compute: Callable[[], dict[str, np.ndarray]],
                    *, write: bool = True, need: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], bool]:
    """The cached arrays of ``key``, or ``compute()`` written to the cache. Returns ``(arrays, hit)``.

    ``need``: arrays the entry must hold (e.g. ``("ches", "ln_ches")``); an entry without them is a miss.
    """
    path = data_cache.cache_path(str(cache_dir), key)
    found = data_cache.load(path)
    if found is not None and all(k in found[0] for k in need):
        return found[0], True
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    if write:
        data_cache.save(path, arrays, {"key": key, "version": CACHE_VERSION})
    return arrays, False
