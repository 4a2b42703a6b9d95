"""Pair-similarity baselines of Razin et al. (2025), §5, and the paper's subset selection.

* :func:`minus_norm_edit_distance` — ``−Levenshtein(ids+, ids−) / max(|y+|, |y−|)`` on response token ids
  (the paper's ``minus_normalized_edit_distances``).
* :func:`last_hidden_ip` — ``⟨h_last(x, y+), h_last(x, y−)⟩``, the hidden states at the final position of
  each sequence (the paper's ``last_hidden_embedding_inner_prods``).
* :func:`quantile_slice` — the window of ``n`` examples around the ``q``-quantile of a score, as the
  paper's runners select 512-example subsets (§5) and the 5% lowest-LN-CHES pairs (§6).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance (insertions, deletions, substitutions of cost 1) between two id sequences.

    One NumPy pass per element of ``a``: with ``t[j] = min(prev[j] + 1, prev[j-1] + cost)`` the row is
    ``row[j] = min_{k <= j} (t[k] + j - k)``, a running minimum of ``t[k] - k``.

    Examples:
      >>> levenshtein([1, 2, 3], [1, 3])
      1
      >>> levenshtein([], [4, 5])
      2
    """
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    if a.size == 0 or b.size == 0:
        return int(max(a.size, b.size))
    j = np.arange(b.size + 1, dtype=np.int64)
    prev = j.copy()
    for i, ai in enumerate(a, start=1):
        t = np.empty_like(prev)
        t[0] = i
        t[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (b != ai))
        prev = np.minimum.accumulate(t - j) + j
    return int(prev[-1])


def minus_norm_edit_distance(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> float:
    """``−Levenshtein(y+, y−) / max(|y+|, |y−|)`` on response token ids (EOS included, as trained).

    In ``[-1, 0]``; 0 for identical responses. Higher means more similar (the sign makes every measure of
    the paper "higher = more similar").

    Examples:
      >>> minus_norm_edit_distance([7, 8, 9, 2], [7, 9, 2])
      -0.25
    """
    n = max(len(chosen_ids), len(rejected_ids))
    if n == 0:
        return 0.0
    return -levenshtein(chosen_ids, rejected_ids) / n


def last_hidden_ip(chosen_last_BD: jax.Array, rejected_last_BD: jax.Array) -> jax.Array:
    """``⟨h_last(x, y+), h_last(x, y−)⟩`` per pair.

    Args:
      chosen_last_BD: ``[B, D]`` hidden state at the final position of ``(x, y+)``.
      rejected_last_BD: ``[B, D]`` the same for ``(x, y−)``.

    Returns:
      ``[B]`` float32.
    """
    return jnp.einsum("BD,BD->B", chosen_last_BD.astype(jnp.float32), rejected_last_BD.astype(jnp.float32))


def quantile_slice(scores: Sequence[float], q: float, n: int) -> np.ndarray:
    """Positions of the ``n`` examples around the ``q``-quantile of ``scores`` (Razin et al., code).

    Sort ascending (stable); ``idx = round(q · (N − 1))``; take the window of ``n`` sorted examples that
    starts at ``max(0, idx − n // 2)``, shifted left when it would run past the end. So ``q = 0`` gives
    the ``n`` lowest and ``q = 1`` the ``n`` highest.

    Args:
      scores: ``[N]`` one score per example.
      q: quantile in ``[0, 1]``.
      n: window size (``n >= N`` takes everything).

    Returns:
      ``[min(n, N)]`` int64 positions into ``scores``, in ascending score order.

    Examples:
      >>> quantile_slice([5.0, 1.0, 4.0, 2.0, 3.0], 0.5, 2).tolist()  # sorted: 1 2 3 4 5; idx 2
      [3, 4]
      >>> quantile_slice([5.0, 1.0, 4.0, 2.0, 3.0], 1.0, 2).tolist()
      [2, 0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if n < 0:
        raise ValueError(f"window size must be >= 0, got {n}")
    N = scores.shape[0]
    n = min(int(n), N)
    order = np.argsort(scores, kind="stable")
    idx = int(round(q * (N - 1))) if N else 0
    start = min(max(0, idx - n // 2), N - n)
    return order[start:start + n].astype(np.int64)
