"""Rank statistics: average ranks and Spearman's rank correlation (no SciPy needed at run time).

Letters: N values.
"""

from __future__ import annotations

import numpy as np


def rankdata(x_N) -> np.ndarray:
    """Ranks 1…N with ties given their average rank (as ``scipy.stats.rankdata``).

    >>> rankdata([10.0, 20.0, 10.0]).tolist()
    [1.5, 3.0, 1.5]
    """
    x = np.asarray(x_N, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    boundaries = np.flatnonzero(np.diff(x[order]) != 0) + 1  # starts of runs of equal values
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [x.size]])
    for a, b in zip(starts, stops):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return ranks


def spearman(x_N, y_N) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks) over the pairs where both are finite;
    ``None`` when undefined (fewer than two such pairs, or a constant side).

    >>> spearman([1.0, 2.0, 3.0], [3.0, 2.0, float("nan")])
    -1.0
    """
    x, y = np.asarray(x_N, np.float64), np.asarray(y_N, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return None
    rx, ry = rankdata(x[ok]), rankdata(y[ok])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return None if denom == 0 else float((rx * ry).sum() / denom)
