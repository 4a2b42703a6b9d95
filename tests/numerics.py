"""Tolerances for comparing float32 results of two *different* compiled programs.

Two programs that compute the same formula (another batch composition, padding, sharding, fusion, a
chunked vs a dense log-softmax, jax vs torch) add the same float32 terms in another order, and XLA:CPU
picks kernels and vector widths by CPU (oneDNN or Eigen, AVX-512 or AVX2, with or without FMA
contraction). A reordered sum of K terms is good to about K·2⁻²⁴ of the sum of the terms' *magnitudes*,
not of the result: where terms cancel (a gradient entry, CHES = ⟨S+, S−⟩ − ‖S+‖²) the error is relative
to the size of the terms. An elementwise ``rtol`` on such a result holds or fails by luck of rounding.

The same program on the same inputs is deterministic on XLA:CPU: compare those with ``==``
(``np.testing.assert_array_equal``), as the resume tests do.
"""

from __future__ import annotations

import numpy as np

EPS32 = 2.0 ** -24  # float32 unit roundoff


def assert_close_to_scale(actual, desired, rel: float, *, scale=None, err_msg: str = "") -> None:
    """``|actual − desired| ≤ rel · scale`` elementwise, ``scale`` defaulting to ``max |desired|``.

    For arrays whose entries are sums of cancelling terms (gradients, CHES): the error of each entry is
    bounded by the size of the terms, which the array's largest entry stands for. ``scale`` may also be
    an array broadcasting against ``desired`` (a bound per entry).
    """
    a = np.asarray(actual, np.float64)
    d = np.asarray(desired, np.float64)
    assert a.shape == d.shape, f"{err_msg}: shapes {a.shape} vs {d.shape}"
    s = np.abs(d).max(initial=0.0) if scale is None else np.asarray(scale, np.float64)
    bound = rel * s
    err = np.abs(a - d)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape) if err.ndim else ()
        raise AssertionError(f"{err_msg}: {int(bad.sum())} of {err.size} entries differ by more than "
                             f"{rel:g} × scale; worst at {i}: {a[i]!r} vs {d[i]!r} "
                             f"(|diff| {err[i]:.3g} > bound {np.broadcast_to(bound, err.shape)[i]:.3g})")


def assert_trees_close_to_scale(actual, desired, rel: float, err_msg: str = "") -> None:
    """:func:`assert_close_to_scale` leaf by leaf over two pytrees (each leaf its own scale)."""
    import jax

    la, ld = jax.tree.leaves(actual), jax.tree.leaves(desired)
    assert len(la) == len(ld), f"{err_msg}: {len(la)} vs {len(ld)} leaves"
    for k, (a, d) in enumerate(zip(la, ld)):
        assert_close_to_scale(a, d, rel, err_msg=f"{err_msg} leaf {k}")
