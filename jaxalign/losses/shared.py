"""Pieces several losses share: f-divergence scores of log-ratios, response lengths, smoothed logistic.

Shapes as in :mod:`jaxalign.losses`: every array is ``[B]``, one entry per preference pair.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.errors import LossError
from jaxalign.losses.registry import F_DIVERGENCE_TYPES

log_sigmoid = jax.nn.log_sigmoid


def f_divergence_scores(logratios: ArrayLike, f_divergence_type: str = "reverse_kl",
                        f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""Maps log-ratios log(π/π_ref) to the f-DPO score f'(π/π_ref), as TRL's ``f_divergence_type``.

    With u = π/π_ref = exp(r):

    * ``reverse_kl`` (standard DPO): r.
    * ``forward_kl``: f'(u) = 1 − 1/u = 1 − exp(−r).
    * ``js_divergence``: f'(u) = log(2u/(1+u)) = log 2 + log σ(r).
    * ``alpha_divergence`` (coefficient α = ``f_alpha_divergence_coef``):
      f'(u) = (u^(α−1) − 1)/(α − 1), with (α−1)·r clipped at 80 before the exponential as TRL does (no
      gradient beyond); α = 1 (within 1e-6) falls back to r. This is TRL 1.16's code; Wang et al. write
      f'(u) = (1 − u^(−α'))/α', the same function with α' = 1 − α (they agree at the default 0.5).

    Args:
      logratios: log-ratios, ``[B]``.
      f_divergence_type: one of :data:`F_DIVERGENCE_TYPES`.
      f_alpha_divergence_coef: α for ``alpha_divergence``.

    Returns:
      The scores, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> scores = losses.f_divergence_scores(jnp.array([0.0, 1.0]), "forward_kl")
      >>> [round(v, 4) for v in scores.tolist()]
      [0.0, 0.6321]

    References:
      Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
      Constraints", ICLR 2024 (arXiv 2309.16240); TRL ``DPOTrainer`` (``f_divergence_type``).
    """
    r = jnp.asarray(logratios)
    if f_divergence_type == "reverse_kl":
        return r
    if f_divergence_type == "forward_kl":
        return -jnp.expm1(-r)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + log_sigmoid(r)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if isinstance(a, (int, float)) and abs(a - 1.0) < 1e-6:
            return r
        return jnp.expm1(jnp.minimum((a - 1.0) * r, 80.0)) / (a - 1.0)
    raise LossError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of "
                    + ", ".join(F_DIVERGENCE_TYPES))


def scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            f_divergence_type, f_alpha_divergence_coef):
    """(f'(u_w), f'(u_l)) for the chosen and rejected log-ratios."""
    r_w = jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps)
    r_l = jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps)
    return (f_divergence_scores(r_w, f_divergence_type, f_alpha_divergence_coef),
            f_divergence_scores(r_l, f_divergence_type, f_alpha_divergence_coef))


def as_float(x, like) -> jax.Array:
    """``x`` as an array in the floating dtype of ``like`` (integer lengths follow the log-probs)."""
    x, like = jnp.asarray(x), jnp.asarray(like)
    dtype = like.dtype if jnp.issubdtype(like.dtype, jnp.floating) else jnp.result_type(float)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)


def length(lengths, like) -> jax.Array:
    """Response lengths as floats of ``like``'s dtype, at least 1 (TRL's clamp)."""
    return jnp.maximum(as_float(lengths, like), 1.0)


def smoothed_logistic(z, label_smoothing):
    """−(1−ε)·log σ(z) − ε·log σ(−z): the cDPO / CPO / AOT form."""
    return -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)


def log1mexp(x):
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2."""
    x = jnp.asarray(x)
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))
