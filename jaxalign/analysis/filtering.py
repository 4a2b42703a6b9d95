"""Which pairs to keep by a score: the selection rules of ``jaxalign filter`` (:mod:`jaxalign.jobs.filter`).

Razin et al. (§6) mitigate likelihood displacement by training only on the pairs with the *lowest*
LN-CHES. Three ways to choose (``scores`` is one value per scored record):

* ``drop_top=F``: drop the ``round(F·N)`` highest-scoring records, keep the rest;
* ``keep_lowest=K``: keep the ``K`` lowest-scoring records;
* ``quantile=Q, n=K``: the paper's subset of ``K`` records around the ``Q``-quantile
  (:func:`jaxalign.analysis.baselines.quantile_slice`; ``Q = 0`` is the same as ``keep_lowest``).

Ties are broken by input order (stable sort).
"""

from __future__ import annotations

import numpy as np

from jaxalign.analysis.baselines import quantile_slice
from jaxalign.errors import ConfigError


def select(scores, *, drop_top: float | None = None, keep_lowest: int | None = None,
           quantile: float | None = None, n: int | None = None) -> np.ndarray:
    """Positions into ``scores`` of the kept examples, in ascending position order (module doc).

    Exactly one of ``drop_top``, ``keep_lowest`` or ``quantile`` (with ``n``) must be given.

    Examples:
      >>> select([0.3, 0.9, 0.1, 0.5], drop_top=0.5).tolist()
      [0, 2]
      >>> select([0.3, 0.9, 0.1, 0.5], keep_lowest=1).tolist()
      [2]
      >>> select([0.3, 0.9, 0.1, 0.5], quantile=1.0, n=2).tolist()
      [1, 3]
    """
    scores = np.asarray(scores, np.float64)
    chosen = [name for name, v in (("--drop-top", drop_top), ("--keep-lowest", keep_lowest),
                                   ("--quantile", quantile)) if v is not None]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --drop-top FRACTION, --keep-lowest N, --quantile Q --n N"
                          + (f" (got {', '.join(chosen)})" if chosen else ""))
    N = scores.size
    order = np.argsort(scores, kind="stable")
    if drop_top is not None:
        if not 0.0 <= drop_top <= 1.0:
            raise ConfigError(f"--drop-top must be a fraction in [0, 1], got {drop_top}")
        kept = order[:N - int(round(drop_top * N))]
    elif keep_lowest is not None:
        if keep_lowest < 0:
            raise ConfigError(f"--keep-lowest must be >= 0, got {keep_lowest}")
        kept = order[:keep_lowest]
    else:
        if n is None:
            raise ConfigError("--quantile needs --n (the number of records to keep)")
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(f"--quantile must be in [0, 1], got {quantile}")
        if n < 0:
            raise ConfigError(f"--n must be >= 0, got {n}")
        kept = quantile_slice(scores, quantile, n)
    if n is not None and quantile is None:
        raise ConfigError("--n only goes with --quantile")
    return np.sort(kept)
