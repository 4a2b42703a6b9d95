"""Margin-based preference losses as pure per-example functions, and the registry of their names.

Every loss maps per-example sequence log-probabilities to a per-example loss; nothing here runs a model,
reduces over the batch or logs. Shapes (the letters used in the docstrings):

* ``B`` — number of preference pairs in the batch.

Inputs, all ``[B]`` (the same names in every function and in :func:`compute`):

* ``chosen_logps`` (s_w), ``rejected_logps`` (s_l): the policy's **summed** response log-probs
  (``jaxalign.logprobs`` sums over the response positions; see DESIGN.md §3).
* ``ref_chosen_logps``, ``ref_rejected_logps``: the same under the frozen reference model.
* ``chosen_lengths`` (|y_w|), ``rejected_lengths`` (|y_l|): number of response tokens; only losses that
  normalise by length take them (lengths below 1 count as 1, as in TRL).

Notation used in the formulas: r_w = s_w − s_w^ref and r_l = s_l − s_l^ref are the log-ratios,
Δ = r_w − r_l is the DPO margin, m = s/|y| is a mean token log-prob, σ is the logistic function.

Use :func:`compute` with a loss name (or a list of names and ``weights``, TRL's ``loss_weights``), and
:func:`margin_weights` for the coefficients by which one gradient step pushes along ∇s_w and against ∇s_l
(Yuan et al., 2025). :data:`NAMES` lists every name; :data:`REGISTRY` maps each to a :class:`LossSpec`
recording its function, required inputs and options with their defaults. ``jaxalign losses --table``
prints :func:`describe`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.errors import LossError

__all__ = [
    "NAMES", "REGISTRY", "F_DIVERGENCE_TYPES", "EXAMPLE_PAIR", "LossSpec", "compute", "margin_weights",
    "describe",
    "f_divergence_scores",
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    "simpo", "cpo", "orpo", "rdpo", "dpop", "slic", "alphapo", "dpo_sft",
]

_log_sigmoid = jax.nn.log_sigmoid

#: The array arguments of :func:`compute`, in order; loss functions name their inputs from this list.
_ARRAY_ARGS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
               "chosen_lengths", "rejected_lengths")

_ARRAY_MEANING = {
    "chosen_logps": "policy summed log-probs of the chosen responses",
    "rejected_logps": "policy summed log-probs of the rejected responses",
    "ref_chosen_logps": "reference-model summed log-probs of the chosen responses",
    "ref_rejected_logps": "reference-model summed log-probs of the rejected responses",
    "chosen_lengths": "chosen response lengths in tokens",
    "rejected_lengths": "rejected response lengths in tokens",
}

#: Values of the ``f_divergence_type`` option (TRL's f-DPO reparameterisations of the log-ratio).
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# --- the registry -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What :func:`compute` needs to know about one loss.

    Attributes:
      name: the registry name (TRL's ``loss_type`` where TRL has the loss).
      fn: the loss function.
      inputs: the array arguments it requires (names of :func:`compute`'s arguments).
      options: its options (keyword arguments other than ``beta``) with their defaults.
      uses_beta: whether it takes ``beta``.
      couples_examples: whether one example's loss depends on other examples (sorting across the batch).
      formula: a one-line formula (notation of the module docstring).
      source: where the formula comes from.
      checks: ``(option, predicate, allowed)`` triples validated on concrete option values.
    """

    name: str
    fn: Callable[..., jax.Array]
    inputs: tuple[str, ...]
    options: Mapping[str, Any]
    uses_beta: bool
    couples_examples: bool
    formula: str
    source: str
    checks: tuple[tuple[str, Callable[[Any], bool], str], ...] = ()


_REGISTRY: dict[str, LossSpec] = {}
#: Name -> :class:`LossSpec`, in the order of :data:`NAMES` (read-only).
REGISTRY: Mapping[str, LossSpec] = types.MappingProxyType(_REGISTRY)

_UNIT = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
_POSITIVE = (lambda v: v > 0.0, "> 0")
_NONNEG = (lambda v: v >= 0.0, ">= 0")


def _register(name: str, *, formula: str, source: str, couples_examples: bool = False,
              checks: Mapping[str, tuple[Callable[[Any], bool], str]] | None = None):
    """Records a loss function under ``name``; its inputs and options are read from its signature.

    Positional parameters are the required array inputs; keyword-only parameters other than ``beta`` are
    the options, and their defaults are the options' defaults. So the spec cannot drift from the function.
    """

    def decorate(fn):
        params = inspect.signature(fn).parameters.values()
        inputs = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = [i for i in inputs if i not in _ARRAY_ARGS]
        undefaulted = [p.name for p in keyword if p.name != "beta" and p.default is p.empty]
        if unknown or undefaulted:
            raise TypeError(f"loss {name!r}: inputs {unknown} are not arguments of compute, "
                            f"options {undefaulted} have no default")
        options = {p.name: p.default for p in keyword if p.name != "beta"}
        all_checks = dict(checks or {})
        if "label_smoothing" in options:
            all_checks.setdefault("label_smoothing", _UNIT)
        if "f_divergence_type" in options:
            all_checks["f_divergence_type"] = (lambda v: v in F_DIVERGENCE_TYPES,
                                               "one of " + ", ".join(F_DIVERGENCE_TYPES))
        _REGISTRY[name] = LossSpec(
            name=name, fn=fn, inputs=inputs, options=types.MappingProxyType(options),
            uses_beta=any(p.name == "beta" for p in keyword), couples_examples=couples_examples,
            formula=formula, source=source,
            checks=tuple((opt, pred, text) for opt, (pred, text) in all_checks.items()))
        return fn

    return decorate


# --- shared pieces ----------------------------------------------------------------------------------

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
        return math.log(2.0) + _log_sigmoid(r)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if isinstance(a, (int, float)) and abs(a - 1.0) < 1e-6:
            return r
        return jnp.expm1(jnp.minimum((a - 1.0) * r, 80.0)) / (a - 1.0)
    raise LossError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of "
                    + ", ".join(F_DIVERGENCE_TYPES))


def _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            f_divergence_type, f_alpha_divergence_coef):
    """(f'(u_w), f'(u_l)) for the chosen and rejected log-ratios."""
    r_w = jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps)
    r_l = jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps)
    return (f_divergence_scores(r_w, f_divergence_type, f_alpha_divergence_coef),
            f_divergence_scores(r_l, f_divergence_type, f_alpha_divergence_coef))


def _float(x, like) -> jax.Array:
    """``x`` as an array in the floating dtype of ``like`` (integer lengths follow the log-probs)."""
    x, like = jnp.asarray(x), jnp.asarray(like)
    dtype = like.dtype if jnp.issubdtype(like.dtype, jnp.floating) else jnp.result_type(float)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)


def _length(lengths, like) -> jax.Array:
    """Response lengths as floats of ``like``'s dtype, at least 1 (TRL's clamp)."""
    return jnp.maximum(_float(lengths, like), 1.0)


def _smoothed_logistic(z, label_smoothing):
    """−(1−ε)·log σ(z) − ε·log σ(−z): the cDPO / CPO / AOT form."""
    return -(1.0 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z)


def _log1mexp(x):
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2."""
    x = jnp.asarray(x)
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


# --- TRL DPOTrainer loss types -----------------------------------------------------------------------

@_register("sigmoid", formula="−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)",
           source="DPO (Rafailov 2023), cDPO (Mitchell 2023); TRL")
def sigmoid(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
            ref_rejected_logps: ArrayLike, *, beta: float, label_smoothing: float = 0.0,
            f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""The DPO logistic loss, with conservative label smoothing (cDPO).

    ℓ = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), with Δ = (s_w − s_w^ref) − (s_l − s_l^ref) (or the f-divergence
    scores of the log-ratios, see :func:`f_divergence_scores`). ε = 0 is DPO.

    TRL 1.16's ``sigmoid`` has no label smoothing (its ``label_smoothing`` only feeds ``robust``,
    ``exo_pair`` and ``aot``); ε = 0 (the default) is exactly TRL's formula, ε > 0 is the cDPO form of
    earlier TRL versions and of TRL's ``CPOTrainer``.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β, the inverse temperature of the implicit reward.
      label_smoothing: ε, the assumed probability that a label is flipped.
      f_divergence_type: how log-ratios become scores (:data:`F_DIVERGENCE_TYPES`).
      f_alpha_divergence_coef: α of ``alpha_divergence``.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.sigmoid(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.3133, 1.3133]

    References:
      Rafailov et al., "Direct Preference Optimization", NeurIPS 2023, Eq. 7 (arXiv 2305.18290);
      Mitchell, "A note on DPO with noisy preferences & relationship to IPO", 2023 (cDPO).
    """
    score_w, score_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    return _smoothed_logistic(beta * (score_w - score_l), label_smoothing)


@_register("hinge", formula="max(0, 1 − βΔ)", source="SLiC (Zhao 2023); TRL")
def hinge(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
          ref_rejected_logps: ArrayLike, *, beta: float, f_divergence_type: str = "reverse_kl",
          f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""Hinge loss on the DPO margin: zero once βΔ ≥ 1.

    ℓ = max(0, 1 − βΔ), Δ = (s_w − s_w^ref) − (s_l − s_l^ref) (or f-divergence scores). 1/β is the margin.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β; the hinge is active while Δ < 1/β.
      f_divergence_type: how log-ratios become scores (:data:`F_DIVERGENCE_TYPES`).
      f_alpha_divergence_coef: α of ``alpha_divergence``.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.hinge(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.0, 2.0]

    References:
      Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023
      (arXiv 2305.10425); TRL ``DPOTrainer`` ``loss_type="hinge"``.
    """
    score_w, score_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    return jax.nn.relu(1.0 - beta * (score_w - score_l))


@_register("ipo", formula="(r_w/|y_w| − r_l/|y_l| − 1/(2β))²",
           source="IPO (Azar 2024) Eq. 17, per token as in TRL")
def ipo(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
        ref_rejected_logps: ArrayLike, chosen_lengths: ArrayLike, rejected_lengths: ArrayLike, *,
        beta: float, f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""IPO's squared loss on the per-token DPO margin, as TRL computes it.

    ℓ = (r_w/|y_w| − r_l/|y_l| − 1/(2β))², with r = s − s^ref (or its f-divergence score); β is the
    paper's τ. TRL divides each log-ratio by its response length (the IPO authors' setting); pass lengths
    of 1 for the un-normalised form of Razin et al.'s code.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.
      rejected_lengths: rejected response lengths in tokens, ``[B]``.
      beta: τ, the regularisation strength; the target per-token margin is 1/(2τ).
      f_divergence_type: how log-ratios become scores (:data:`F_DIVERGENCE_TYPES`).
      f_alpha_divergence_coef: α of ``alpha_divergence``.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref, n = jnp.array([-11.0, -11.0]), jnp.array([2, 2])
      >>> loss = losses.ipo(s_w, s_l, ref, ref, n, n, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.0, 4.0]

    References:
      Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences",
      AISTATS 2024, Eq. 17 (arXiv 2310.12036); TRL ``DPOTrainer`` ``loss_type="ipo"``.
    """
    score_w, score_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    delta = score_w / _length(chosen_lengths, score_w) - score_l / _length(rejected_lengths, score_l)
    return (delta - 1.0 / (2.0 * beta)) ** 2


@_register("exo_pair", formula="q·log(q/(1−ε)) + (1−q)·log((1−q)/ε), q = σ(βΔ)",
           source="EXO (Ji 2024) Eq. 16; TRL",
           checks={"label_smoothing": (lambda v: 0.0 < v < 1.0, "in (0, 1)")})
def exo_pair(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
             ref_rejected_logps: ArrayLike, *, beta: float, label_smoothing: float = 1e-3,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""EXO's reverse KL from the model's pair distribution to the smoothed label distribution.

    With q = σ(βΔ) (the model's probability that the chosen response wins) and the label distribution
    (1−ε, ε): ℓ = KL((q, 1−q) ‖ (1−ε, ε)) = q·[log q − log(1−ε)] + (1−q)·[log(1−q) − log ε].

    TRL requires ``label_smoothing`` > 0 for this loss and has no usable default; the default here is the
    paper's recommended ε = 1e-3.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      label_smoothing: ε in (0, 1), the label distribution's mass on the rejected response.
      f_divergence_type: how log-ratios become scores (:data:`F_DIVERGENCE_TYPES`).
      f_alpha_divergence_coef: α of ``alpha_divergence``.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.exo_pair(s_w, s_l, ref, ref, beta=0.5, label_smoothing=0.1)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.1141, 1.1295]

    References:
      Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment", ICML 2024, Eq. 16
      (arXiv 2402.00856); TRL ``DPOTrainer`` ``loss_type="exo_pair"``.
    """
    score_w, score_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    z = beta * (score_w - score_l)
    eps = label_smoothing
    return (jax.nn.sigmoid(z) * (_log_sigmoid(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (_log_sigmoid(-z) - jnp.log(eps)))


@_register("nca_pair", formula="−logσ(βr_w) − ½logσ(−βr_w) − ½logσ(−βr_l)",
           source="NCA (Chen 2024); TRL")
def nca_pair(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
             ref_rejected_logps: ArrayLike, *, beta: float) -> jax.Array:
    r"""Noise-contrastive alignment for a pair: absolute, not relative, rewards.

    ℓ = −log σ(βr_w) − ½·log σ(−βr_w) − ½·log σ(−βr_l), with r = s − s^ref. Unlike DPO it pushes the
    chosen log-ratio up in absolute terms.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.nca_pair(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [1.1982, 1.6982]

    References:
      Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards", NeurIPS 2024
      (arXiv 2402.05369); TRL ``DPOTrainer`` ``loss_type="nca_pair"``.
    """
    reward_w = beta * (jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps))
    reward_l = beta * (jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps))
    return -_log_sigmoid(reward_w) - 0.5 * _log_sigmoid(-reward_w) - 0.5 * _log_sigmoid(-reward_l)


@_register("robust", formula="[−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε)",
           source="rDPO (Chowdhury 2024); TRL",
           checks={"label_smoothing": (lambda v: 0.0 <= v < 0.5, "in [0, 0.5)")})
def robust(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
           ref_rejected_logps: ArrayLike, *, beta: float, label_smoothing: float = 0.0,
           f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""Robust DPO: an unbiased estimate of the clean-label DPO loss under label-flip rate ε.

    ℓ = [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε). ε = 0 is DPO.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      label_smoothing: ε in [0, 0.5), the probability that a preference label is flipped.
      f_divergence_type: how log-ratios become scores (:data:`F_DIVERGENCE_TYPES`).
      f_alpha_divergence_coef: α of ``alpha_divergence``.

    Returns:
      The per-example loss, ``[B]`` (it can be negative when ε > 0).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.robust(s_w, s_l, ref, ref, beta=0.5, label_smoothing=0.1)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.1883, 1.4383]

    References:
      Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy Feedback", ICML 2024,
      (arXiv 2403.00409); TRL ``DPOTrainer`` ``loss_type="robust"``.
    """
    score_w, score_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    z = beta * (score_w - score_l)
    eps = label_smoothing
    return (-(1.0 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1.0 - 2.0 * eps)


@_register("bco_pair", formula="−logσ(βr_w − δ) − logσ(δ − βr_l)",
           source="BCO (Jung 2024); TRL (δ = 0)")
def bco_pair(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
             ref_rejected_logps: ArrayLike, *, beta: float, bco_delta: float = 0.0) -> jax.Array:
    r"""Binary classifier optimisation on a pair: chosen rewards above δ, rejected below.

    ℓ = −log σ(βr_w − δ) − log σ(−(βr_l − δ)), r = s − s^ref.

    The BCO paper shifts the rewards by δ, a running mean of the rewards βr over past batches (older TRL
    versions kept it inside the trainer). That is training state, so here it is an explicit option: the
    caller keeps the running mean (e.g. in its train state) and passes it as ``bco_delta``. The default
    δ = 0 is exactly TRL 1.16's ``bco_pair``, which dropped the running mean.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      bco_delta: δ, the reward shift (the running mean of βr_w and βr_l in the paper).

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.bco_pair(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.9482, 1.9482]

    References:
      Jung et al., "Binary Classifier Optimization for Large Language Model Alignment", 2024
      (arXiv 2404.04656); TRL ``DPOTrainer`` ``loss_type="bco_pair"``.
    """
    reward_w = beta * (jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps))
    reward_l = beta * (jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps))
    return -_log_sigmoid(reward_w - bco_delta) - _log_sigmoid(-(reward_l - bco_delta))


@_register("sppo_hard", formula="(r_w − 1/(2β))² + (r_l + 1/(2β))²",
           source="SPPO (Wu 2024) Eq. 4.7, hard P; TRL")
def sppo_hard(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
              ref_rejected_logps: ArrayLike, *, beta: float) -> jax.Array:
    r"""SPPO with hard win probabilities (1 for the chosen, 0 for the rejected response).

    ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))², r = s − s^ref.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β; the targets of the log-ratios are ±1/(2β).

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.sppo_hard(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.0, 8.0]

    References:
      Wu et al., "Self-Play Preference Optimization for Language Model Alignment", 2024, Eq. 4.7
      (arXiv 2405.00675); TRL ``DPOTrainer`` ``loss_type="sppo_hard"``.
    """
    r_w = jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps)
    r_l = jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps)
    return (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2


def _check_batch(name, *arrays):
    for a in arrays:
        if jnp.ndim(a) != 1:
            raise ValueError(f"loss {name!r} sorts across the batch and needs 1-D [B] inputs; got shape "
                             f"{jnp.shape(a)}")


@_register("aot", formula="sigmoid on sort(s_w − s_l) − sort(s_w^ref − s_l^ref) (batch)",
           source="AOT (Melnyk 2024); TRL", couples_examples=True)
def aot(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
        ref_rejected_logps: ArrayLike, *, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    r"""Alignment via optimal transport (paired): first-order stochastic dominance of the margins.

    With d = sort(s_w − s_l) and d^ref = sort(s_w^ref − s_l^ref), each sorted ascending over the batch:
    ℓ_k = −(1−ε)·log σ(β(d_k − d^ref_k)) − ε·log σ(−β(d_k − d^ref_k)).

    Entry k belongs to the k-th smallest margin, not to pair k: the loss couples the examples and only
    its batch sum or mean is meaningful.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      label_smoothing: ε, as in :func:`sigmoid`.

    Returns:
      The loss of each sorted position, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref_w, ref_l = jnp.array([-11.0, -11.0]), jnp.array([-11.0, -12.0])
      >>> loss = losses.aot(s_w, s_l, ref_w, ref_l, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [1.3133, 0.4741]

    References:
      Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport", NeurIPS 2024
      (arXiv 2406.05882); TRL ``DPOTrainer`` ``loss_type="aot"``.
    """
    _check_batch("aot", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    margin = jnp.sort(jnp.asarray(chosen_logps) - jnp.asarray(rejected_logps))
    ref_margin = jnp.sort(jnp.asarray(ref_chosen_logps) - jnp.asarray(ref_rejected_logps))
    return _smoothed_logistic(beta * (margin - ref_margin), label_smoothing)


@_register("aot_unpaired", formula="sigmoid on sort(r_w) − sort(r_l) (batch)",
           source="AOT (Melnyk 2024); TRL", couples_examples=True)
def aot_unpaired(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
                 ref_rejected_logps: ArrayLike, *, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    r"""Alignment via optimal transport (unpaired): chosen log-ratios dominate rejected ones.

    With u = sort(r_w) and v = sort(r_l), each sorted ascending over the batch (r = s − s^ref):
    ℓ_k = −(1−ε)·log σ(β(u_k − v_k)) − ε·log σ(−β(u_k − v_k)).

    Entry k pairs the k-th smallest chosen log-ratio with the k-th smallest rejected one, which usually
    come from different pairs: only the batch sum or mean is meaningful.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      label_smoothing: ε, as in :func:`sigmoid`.

    Returns:
      The loss of each sorted position, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref_w, ref_l = jnp.array([-11.0, -11.0]), jnp.array([-11.0, -12.0])
      >>> loss = losses.aot_unpaired(s_w, s_l, ref_w, ref_l, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.6931, 0.9741]

    References:
      Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport", NeurIPS 2024
      (arXiv 2406.05882); TRL ``DPOTrainer`` ``loss_type="aot_unpaired"``.
    """
    _check_batch("aot_unpaired", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_w = jnp.sort(jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps))
    r_l = jnp.sort(jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps))
    return _smoothed_logistic(beta * (r_w - r_l), label_smoothing)


@_register("apo_zero", formula="1 − σ(βr_w) + σ(βr_l)", source="APO (D'Oosterlinck 2024) Eq. 7; TRL")
def apo_zero(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
             ref_rejected_logps: ArrayLike, *, beta: float) -> jax.Array:
    r"""Anchored preference optimisation, APO-zero: raise the chosen, lower the rejected likelihood.

    ℓ = 1 − σ(βr_w) + σ(βr_l), r = s − s^ref. For chosen responses better than the model's own outputs.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.apo_zero(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.7551, 1.2449]

    References:
      D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions", 2024, Eq. 7
      (arXiv 2408.06266); TRL ``DPOTrainer`` ``loss_type="apo_zero"``.
    """
    reward_w = beta * (jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps))
    reward_l = beta * (jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps))
    return 1.0 - jax.nn.sigmoid(reward_w) + jax.nn.sigmoid(reward_l)


@_register("apo_down", formula="σ(βr_w) + 1 − σ(β(r_w − r_l))",
           source="APO (D'Oosterlinck 2024) Eq. 8; TRL")
def apo_down(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
             ref_rejected_logps: ArrayLike, *, beta: float) -> jax.Array:
    r"""Anchored preference optimisation, APO-down: lower both likelihoods, the rejected one more.

    ℓ = σ(βr_w) + 1 − σ(β(r_w − r_l)), r = s − s^ref. For chosen responses worse than the model's own.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.apo_down(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.8914, 1.1086]

    References:
      D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions", 2024, Eq. 8
      (arXiv 2408.06266); TRL ``DPOTrainer`` ``loss_type="apo_down"``.
    """
    r_w = jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps)
    r_l = jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps)
    return jax.nn.sigmoid(beta * r_w) + 1.0 - jax.nn.sigmoid(beta * (r_w - r_l))


@_register("discopop", formula="(1−μ)·(−logσ(βΔ)) + μ·exp(−βΔ), μ = σ(βΔ/τ)",
           source="DiscoPOP (Chan Lu 2024) Eq. 5; TRL", checks={"discopop_tau": _POSITIVE})
def discopop(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
             ref_rejected_logps: ArrayLike, *, beta: float, discopop_tau: float = 0.05,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""DiscoPOP's log-ratio modulated loss: logistic for negative margins, exponential for positive ones.

    With z = βΔ and μ = σ(z/τ): ℓ = (1 − μ)·(−log σ(z)) + μ·exp(−z). The product μ·exp(−z) is computed as
    exp(log σ(z/τ) − z), which is the same number without the 0·∞ of very negative margins.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      discopop_tau: τ > 0, the temperature of the modulation (the paper's 0.05).
      f_divergence_type: how log-ratios become scores (:data:`F_DIVERGENCE_TYPES`).
      f_alpha_divergence_coef: α of ``alpha_divergence``.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.discopop(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.3679, 1.3133]

    References:
      Chan Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language
      Models", NeurIPS 2024, Eq. 5 (arXiv 2406.08414); TRL ``DPOTrainer`` ``loss_type="discopop"``.
    """
    score_w, score_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    z = beta * (score_w - score_l)
    log_mu = _log_sigmoid(z / discopop_tau)
    return -_log_sigmoid(z) * jax.nn.sigmoid(-z / discopop_tau) + jnp.exp(log_mu - z)


@_register("sft", formula="−s_w/|y_w|", source="TRL (per example; TRL averages over batch tokens)")
def sft(chosen_logps: ArrayLike, chosen_lengths: ArrayLike) -> jax.Array:
    r"""Supervised fine-tuning term: the mean per-token negative log-likelihood of the chosen response.

    ℓ = −s_w/|y_w|. TRL's ``sft`` averages over all chosen tokens of the batch, Σ(−s_w)/Σ|y_w|; that is
    the |y_w|-weighted mean of this per-example loss, and equals its plain mean when lengths are equal.
    Mixed with another loss (``compute(["sigmoid", "sft"], weights=[1, α])``) it gives RPO or, with
    ``simpo``, TRL's CPO-SimPO.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> loss = losses.sft(jnp.array([-10.0, -12.0]), jnp.array([4, 6]))
      >>> [round(v, 4) for v in loss.tolist()]
      [2.5, 2.0]

    References:
      TRL ``DPOTrainer`` ``loss_type="sft"``; Pang et al., "Iterative Reasoning Preference
      Optimization", NeurIPS 2024 (arXiv 2404.19733), the DPO + NLL mixture.
    """
    return -jnp.asarray(chosen_logps) / _length(chosen_lengths, chosen_logps)


@_register("sigmoid_norm", formula="−logσ(β(r_w/|y_w| − r_l/|y_l|))",
           source="TRL")
def sigmoid_norm(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
                 ref_rejected_logps: ArrayLike, chosen_lengths: ArrayLike, rejected_lengths: ArrayLike,
                 *, beta: float, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5) -> jax.Array:
    r"""DPO on per-token log-ratios.

    ℓ = −log σ(β(r_w/|y_w| − r_l/|y_l|)), r = s − s^ref (or f-divergence scores).

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.
      rejected_lengths: rejected response lengths in tokens, ``[B]``.
      beta: β of the implicit reward.
      f_divergence_type: how log-ratios become scores (:data:`F_DIVERGENCE_TYPES`).
      f_alpha_divergence_coef: α of ``alpha_divergence``.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref, n = jnp.array([-11.0, -11.0]), jnp.array([2, 2])
      >>> loss = losses.sigmoid_norm(s_w, s_l, ref, ref, n, n, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.4741, 0.9741]

    References:
      TRL ``DPOTrainer`` ``loss_type="sigmoid_norm"``.
    """
    score_w, score_l = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    delta = score_w / _length(chosen_lengths, score_w) - score_l / _length(rejected_lengths, score_l)
    return -_log_sigmoid(beta * delta)


# --- other margin-based methods ---------------------------------------------------------------------

@_register("simpo", formula="−(1−ε)·logσ(z) − ε·logσ(−z), z = β(m_w − m_l) − γ",
           source="SimPO (Meng 2024); TRL CPOTrainer")
def simpo(chosen_logps: ArrayLike, rejected_logps: ArrayLike, chosen_lengths: ArrayLike,
          rejected_lengths: ArrayLike, *, beta: float, simpo_gamma: float = 0.5,
          label_smoothing: float = 0.0) -> jax.Array:
    r"""SimPO: reference-free, length-normalised rewards with a target margin γ.

    With m = s/|y|: ℓ = −(1−ε)·log σ(β(m_w − m_l) − γ) − ε·log σ(−(β(m_w − m_l) − γ)). TRL's
    ``CPOTrainer`` with ``loss_type="simpo"`` and ``cpo_alpha=0``; mix with ``sft`` for its NLL term.
    The paper uses β around 2 (the shared default 0.1 is TRL's DPO default).

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.
      rejected_lengths: rejected response lengths in tokens, ``[B]``.
      beta: β, the reward scale.
      simpo_gamma: γ, the target reward margin.
      label_smoothing: ε, as in :func:`sigmoid`.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l, n = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0]), jnp.array([4, 4])
      >>> loss = losses.simpo(s_w, s_l, n, n, beta=2.0)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.4741, 1.7014]

    References:
      Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
      (arXiv 2405.14734); TRL ``CPOTrainer`` ``loss_type="simpo"``.
    """
    m_w = jnp.asarray(chosen_logps) / _length(chosen_lengths, chosen_logps)
    m_l = jnp.asarray(rejected_logps) / _length(rejected_lengths, rejected_logps)
    return _smoothed_logistic(beta * (m_w - m_l) - simpo_gamma, label_smoothing)


@_register("cpo", formula="−(1−ε)·logσ(z) − ε·logσ(−z) − α·s_w/|y_w|, z = β(s_w − s_l)",
           source="CPO (Xu 2024) Eq. 3; TRL CPOTrainer", checks={"cpo_alpha": _NONNEG})
def cpo(chosen_logps: ArrayLike, rejected_logps: ArrayLike, chosen_lengths: ArrayLike, *, beta: float,
        cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> jax.Array:
    r"""Contrastive preference optimisation: reference-free DPO plus a behaviour-cloning NLL term.

    ℓ = −(1−ε)·log σ(β(s_w − s_l)) − ε·log σ(−β(s_w − s_l)) + α·(−s_w/|y_w|). TRL takes the NLL as the
    mean over all chosen tokens of the batch; per example it is −s_w/|y_w| (equal batch means when lengths
    are equal, see :func:`sft`).

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.
      beta: β, the reward scale.
      cpo_alpha: α, the weight of the NLL term (TRL's default 1).
      label_smoothing: ε, as in :func:`sigmoid`.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l, n = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0]), jnp.array([4, 4])
      >>> loss = losses.cpo(s_w, s_l, n, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [2.8133, 4.3133]

    References:
      Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
      Machine Translation", ICML 2024, Eq. 3 (arXiv 2401.08417); TRL ``CPOTrainer``.
    """
    s_w = jnp.asarray(chosen_logps)
    preference = _smoothed_logistic(beta * (s_w - jnp.asarray(rejected_logps)), label_smoothing)
    return preference - cpo_alpha * s_w / _length(chosen_lengths, s_w)


@_register("orpo", formula="−m_w − β·logσ(logit(e^m_w) − logit(e^m_l))",
           source="ORPO (Hong 2024) Eqs. 4, 7; TRL ORPOTrainer")
def orpo(chosen_logps: ArrayLike, rejected_logps: ArrayLike, chosen_lengths: ArrayLike,
         rejected_lengths: ArrayLike, *, beta: float) -> jax.Array:
    r"""Odds-ratio preference optimisation: NLL plus a log-odds-ratio penalty, reference-free.

    With mean log-probs m = s/|y| and odds(m) = e^m/(1 − e^m):
    ℓ = −m_w − β·log σ(log odds(m_w) − log odds(m_l)). β is the paper's λ (TRL's naming).

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]`` (means must be < 0).
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.
      rejected_lengths: rejected response lengths in tokens, ``[B]``.
      beta: λ, the weight of the odds-ratio term.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l, n = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0]), jnp.array([4, 4])
      >>> loss = losses.orpo(s_w, s_l, n, n, beta=0.1)
      >>> [round(v, 4) for v in loss.tolist()]
      [2.5461, 3.0996]

    References:
      Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model", EMNLP 2024,
      Eqs. 4 and 7 (arXiv 2403.07691); TRL ``ORPOTrainer.odds_ratio_loss``.
    """
    m_w = jnp.asarray(chosen_logps) / _length(chosen_lengths, chosen_logps)
    m_l = jnp.asarray(rejected_logps) / _length(rejected_lengths, rejected_logps)
    log_odds = (m_w - m_l) - (_log1mexp(m_w) - _log1mexp(m_l))
    return -m_w - beta * _log_sigmoid(log_odds)


@_register("rdpo", formula="−logσ(βΔ + α(|y_w| − |y_l|))",
           source="R-DPO (Park 2024)", checks={"rdpo_alpha": _NONNEG})
def rdpo(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
         ref_rejected_logps: ArrayLike, chosen_lengths: ArrayLike, rejected_lengths: ArrayLike, *,
         beta: float, rdpo_alpha: float = 0.2) -> jax.Array:
    r"""Length-regularised DPO (R-DPO).

    ℓ = −log σ(βΔ + α(|y_w| − |y_l|)), Δ = (s_w − s_w^ref) − (s_l − s_l^ref), α ≥ 0.

    Sign convention: R-DPO solves the length-penalised objective E[r(x, y) − α|y|] − β·KL, whose optimum
    gives r = β·log(π/π_ref) + α|y| + const; the Bradley-Terry likelihood of r puts **+**α(|y_w| − |y_l|)
    inside the log-sigmoid (Park et al.'s objective as SimPO's table lists it, and the ``rdpo`` of Yuan
    et al.'s code). A pair whose chosen response is longer then has a larger argument, a smaller loss and
    a smaller gradient: length explains part of the preference, so the policy is not pushed towards it.
    Writing the term as −α(|y_w| − |y_l|) is the same loss with α replaced by −α (for α > 0 it favours
    verbosity). α = 0 is DPO. Lengths enter un-clamped.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.
      rejected_lengths: rejected response lengths in tokens, ``[B]``.
      beta: β of the implicit reward.
      rdpo_alpha: α ≥ 0, the length-penalty strength (0.2 as in Yuan et al.'s code).

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref, n_w, n_l = jnp.array([-11.0, -11.0]), jnp.array([6, 6]), jnp.array([4, 4])
      >>> loss = losses.rdpo(s_w, s_l, ref, ref, n_w, n_l, beta=0.5, rdpo_alpha=0.25)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.2014, 0.9741]

    References:
      Park et al., "Disentangling Length from Quality in Direct Preference Optimization", Findings of
      ACL 2024 (arXiv 2403.19159).
    """
    r_w = jnp.asarray(chosen_logps) - jnp.asarray(ref_chosen_logps)
    r_l = jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps)
    length_gap = _float(chosen_lengths, r_w) - _float(rejected_lengths, r_l)
    return -_log_sigmoid(beta * (r_w - r_l) + rdpo_alpha * length_gap)


@_register("dpop", formula="−logσ(β(Δ − λ·max(0, s_w^ref − s_w)))",
           source="DPO-Positive (Pal 2024)", checks={"dpop_lambda": _NONNEG})
def dpop(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
         ref_rejected_logps: ArrayLike, *, beta: float, dpop_lambda: float = 50.0) -> jax.Array:
    r"""DPO-Positive: DPO with a penalty while the chosen log-prob is below the reference's.

    ℓ = −log σ(β(Δ − λ·max(0, s_w^ref − s_w))). When s_w ≥ s_w^ref it is DPO; below, the chosen side is
    pushed (1 + λ) times harder.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      dpop_lambda: λ ≥ 0 (the paper and Yuan et al.'s ``pdpo`` use 50).

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.dpop(s_w, s_l, ref, ref, beta=0.5, dpop_lambda=1.0)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.3133, 1.7014]

    References:
      Pal et al., "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive", 2024
      (arXiv 2402.13228).
    """
    s_w, ref_w = jnp.asarray(chosen_logps), jnp.asarray(ref_chosen_logps)
    delta = (s_w - ref_w) - (jnp.asarray(rejected_logps) - jnp.asarray(ref_rejected_logps))
    return -_log_sigmoid(beta * (delta - dpop_lambda * jax.nn.relu(ref_w - s_w)))


@_register("slic", formula="max(0, δ − (s_w − s_l)) − λ·s_w",
           source="SLiC-HF (Zhao 2023)", checks={"slic_delta": _NONNEG, "slic_lambda": _NONNEG})
def slic(chosen_logps: ArrayLike, rejected_logps: ArrayLike, *, slic_delta: float = 1.0,
         slic_lambda: float = 0.1) -> jax.Array:
    r"""SLiC-HF: a rank-calibration hinge on the log-likelihood gap plus a regularising NLL term.

    ℓ = max(0, δ − (s_w − s_l)) + λ·(−s_w). Reference-free and without β. The paper regularises with the
    NLL of the SFT target; here, as in Razin et al.'s family, that target is the chosen response.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      slic_delta: δ ≥ 0, the margin of the hinge.
      slic_lambda: λ ≥ 0, the weight of the NLL term.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> loss = losses.slic(s_w, s_l)
      >>> [round(v, 4) for v in loss.tolist()]
      [1.0, 4.2]

    References:
      Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023
      (arXiv 2305.10425).
    """
    s_w = jnp.asarray(chosen_logps)
    return jax.nn.relu(slic_delta - (s_w - jnp.asarray(rejected_logps))) - slic_lambda * s_w


@_register("alphapo", formula="simpo with m → (1 − e^(−α·m))/α",
           source="AlphaPO (Gupta 2025); TRL CPOTrainer")
def alphapo(chosen_logps: ArrayLike, rejected_logps: ArrayLike, chosen_lengths: ArrayLike,
            rejected_lengths: ArrayLike, *, beta: float, alpha: float = 0.25, simpo_gamma: float = 0.5,
            label_smoothing: float = 0.0) -> jax.Array:
    r"""AlphaPO: SimPO with the reward shape r = (1 − p^(−α))/α of the per-token probability p = e^m.

    With m = s/|y| and r(m) = (1 − e^(−α·m))/α (α → 0 gives r = m, i.e. SimPO):
    ℓ = −(1−ε)·log σ(β(r_w − r_l) − γ) − ε·log σ(−(β(r_w − r_l) − γ)). TRL's ``CPOTrainer`` with
    ``loss_type="alphapo"`` (SimPO with ``cpo_alpha=0``) and its ``alpha`` option; TRL's default α = 0
    is plain SimPO, so the default here is the non-trivial α = 0.25 (tune it per model as the paper does).

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      chosen_lengths: chosen response lengths in tokens, ``[B]``.
      rejected_lengths: rejected response lengths in tokens, ``[B]``.
      beta: β, the reward scale.
      alpha: α, the reward shape (0 is SimPO's log reward).
      simpo_gamma: γ, the target reward margin.
      label_smoothing: ε, as in :func:`sigmoid`.

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l, n = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0]), jnp.array([4, 4])
      >>> loss = losses.alphapo(s_w, s_l, n, n, beta=2.0)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.2032, 2.5697]

    References:
      Gupta et al., "AlphaPO: Reward Shape Matters for LLM Alignment", ICML 2025 (arXiv 2501.03884);
      TRL ``CPOTrainer`` (``alpha``).
    """
    m_w = jnp.asarray(chosen_logps) / _length(chosen_lengths, chosen_logps)
    m_l = jnp.asarray(rejected_logps) / _length(rejected_lengths, rejected_logps)
    if isinstance(alpha, (int, float)) and alpha == 0:
        r_w, r_l = m_w, m_l
    else:
        r_w, r_l = -jnp.expm1(-alpha * m_w) / alpha, -jnp.expm1(-alpha * m_l) / alpha
    return _smoothed_logistic(beta * (r_w - r_l) - simpo_gamma, label_smoothing)


@_register("dpo_sft", formula="−logσ(βΔ) − c·s_w", source="Razin et al. 2025 §6",
           checks={"sft_coeff": _NONNEG})
def dpo_sft(chosen_logps: ArrayLike, rejected_logps: ArrayLike, ref_chosen_logps: ArrayLike,
            ref_rejected_logps: ArrayLike, *, beta: float, sft_coeff: float = 0.1) -> jax.Array:
    r"""DPO plus an SFT term on the chosen response: Razin et al.'s mitigation of likelihood displacement.

    ℓ = −log σ(βΔ) + c·(−s_w), with the **summed** chosen log-prob as in Razin et al.'s code (unlike
    :func:`sft`, which is per token). The margin weights are DPO's plus c on the chosen side.

    Args:
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``.
      beta: β of the implicit reward.
      sft_coeff: c ≥ 0 (the paper picks 0.1 for Llama-3-8B and 1 for Gemma-2B from {0.01, 0.1, 1}).

    Returns:
      The per-example loss, ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> s_w, s_l = jnp.array([-10.0, -12.0]), jnp.array([-12.0, -10.0])
      >>> ref = jnp.array([-11.0, -11.0])
      >>> loss = losses.dpo_sft(s_w, s_l, ref, ref, beta=0.5)
      >>> [round(v, 4) for v in loss.tolist()]
      [1.3133, 2.5133]

    References:
      Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference
      Optimization", ICLR 2025, §6 and App. E (arXiv 2410.08847).
    """
    s_w = jnp.asarray(chosen_logps)
    delta = (s_w - jnp.asarray(ref_chosen_logps)) - (jnp.asarray(rejected_logps)
                                                      - jnp.asarray(ref_rejected_logps))
    return -_log_sigmoid(beta * delta) - sft_coeff * s_w


#: Every loss name, TRL's ``DPOTrainer`` loss types first (in TRL's order), then the other methods.
NAMES: tuple[str, ...] = tuple(_REGISTRY)


# --- entry points -----------------------------------------------------------------------------------

def _resolve(loss, weights) -> tuple[list[str], list[Any]]:
    """Names and mixture weights, validated."""
    if isinstance(loss, str):
        names = [loss]
    elif isinstance(loss, Sequence) and all(isinstance(n, str) for n in loss):
        names = list(loss)
    else:
        raise LossError(f"loss must be a name or a list of names, got {loss!r}")
    if not names:
        raise LossError("loss: the list of loss names is empty")
    for name in names:
        if name not in _REGISTRY:
            raise LossError(f"unknown loss {name!r}; known losses: {', '.join(NAMES)}")
    if weights is None:
        return names, [1.0] * len(names)
    if isinstance(weights, (int, float)) or jnp.ndim(weights) == 0:
        weights = [weights]
    weights = list(weights)
    if len(weights) != len(names):
        raise LossError(f"loss {names}: argument 'weights' has {len(weights)} entries for {len(names)} "
                        "loss names (TRL's loss_weights: one weight per loss)")
    return names, weights


def _validate(names: list[str], arrays: Mapping[str, Any], beta, options: Mapping[str, Any]) -> None:
    """Raises LossError for unknown options, bad option values and missing inputs."""
    label = names[0] if len(names) == 1 else names
    specs = [_REGISTRY[n] for n in names]
    for option, value in options.items():
        owners = [s for s in specs if option in s.options]
        if not owners:
            known = sorted({o for s in specs for o in s.options})
            raise LossError(f"loss {label!r}: unknown option {option!r}; its options are: "
                            + (", ".join(known) if known else "(none)"))
        if not isinstance(value, (bool, int, float, str)):
            continue  # arrays and tracers are the caller's responsibility
        for spec in owners:
            for checked, predicate, allowed in spec.checks:
                if checked == option and not predicate(value):
                    raise LossError(f"loss {spec.name!r}: option {option!r} must be {allowed}, got "
                                    f"{value!r}")
    f_type = options.get("f_divergence_type", "reverse_kl")
    if f_type != "reverse_kl":
        for spec in specs:
            if "ref_chosen_logps" in spec.inputs and "f_divergence_type" not in spec.options:
                raise LossError(f"loss {spec.name!r}: option 'f_divergence_type'={f_type!r} is not "
                                "supported (only reverse_kl; as in TRL, the f-DPO reparameterisation is "
                                "valid only for losses of the chosen-rejected reward difference)")
    if isinstance(beta, (int, float)) and not beta > 0 and any(s.uses_beta for s in specs):
        raise LossError(f"loss {label!r}: argument 'beta' must be > 0, got {beta!r}")
    for spec in specs:
        for name in spec.inputs:
            if arrays[name] is None:
                what = _ARRAY_MEANING[name]
                raise LossError(f"loss {spec.name!r}: missing argument {name!r} ({what}, shape [B])")


def compute(loss: str | Sequence[str], *, chosen_logps: ArrayLike, rejected_logps: ArrayLike,
            ref_chosen_logps: ArrayLike | None = None, ref_rejected_logps: ArrayLike | None = None,
            chosen_lengths: ArrayLike | None = None, rejected_lengths: ArrayLike | None = None,
            beta: float = 0.1, weights: Sequence[float] | None = None, **options: Any) -> jax.Array:
    """Evaluates a loss, or a weighted mixture of losses, per example.

    ``compute(["sigmoid", "sft"], weights=[1.0, 0.5], ...)`` is Σ_k weights[k]·loss_k, TRL's
    ``loss_type`` list with ``loss_weights`` (weights default to 1 each, as in TRL). Each option goes to
    the losses of the list that declare it (:data:`REGISTRY`); an option none of them declares is an
    error. Jit it with the name and options bound (``functools.partial``); the arrays may be traced.

    Args:
      loss: a name from :data:`NAMES` or a list of names.
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``, where needed.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``, where needed.
      chosen_lengths: chosen response lengths in tokens, ``[B]``, where a loss normalises.
      rejected_lengths: rejected response lengths in tokens, ``[B]``, where a loss normalises.
      beta: β, passed to every loss that takes it.
      weights: mixture weights, one per name.
      **options: loss options (e.g. ``label_smoothing``, ``simpo_gamma``), see :func:`describe`.

    Returns:
      The per-example loss, ``[B]`` (unreduced).

    Raises:
      LossError: unknown name or option, a bad option value, or a missing input; the message names the
        loss and the argument.
      ValueError: arrays of different shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> batch = dict(chosen_logps=jnp.array([-10.0]), rejected_logps=jnp.array([-12.0]),
      ...              ref_chosen_logps=jnp.array([-11.0]), ref_rejected_logps=jnp.array([-11.0]),
      ...              chosen_lengths=jnp.array([4]))
      >>> loss = losses.compute("sigmoid", beta=0.5, **batch)
      >>> [round(v, 4) for v in loss.tolist()]
      [0.3133]
      >>> loss = losses.compute(["sigmoid", "sft"], weights=[1.0, 0.5], beta=0.5, **batch)
      >>> [round(v, 4) for v in loss.tolist()]
      [1.5633]
    """
    names, mix = _resolve(loss, weights)
    arrays = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
              "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
              "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    _validate(names, arrays, beta, options)
    arrays = {k: (None if v is None else jnp.asarray(v)) for k, v in arrays.items()}
    shapes = {k: v.shape for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"compute({names}): all inputs must have the same shape [B]; got {shapes}")
    total = None
    for name, weight in zip(names, mix):
        spec = _REGISTRY[name]
        kwargs = {k: v for k, v in options.items() if k in spec.options}
        if spec.uses_beta:
            kwargs["beta"] = beta
        value = spec.fn(*(arrays[i] for i in spec.inputs), **kwargs)
        term = value if (len(names) == 1 and weights is None) else weight * value
        total = term if total is None else total + term
    return total


def margin_weights(loss: str | Sequence[str], *, chosen_logps: ArrayLike, rejected_logps: ArrayLike,
                   ref_chosen_logps: ArrayLike | None = None, ref_rejected_logps: ArrayLike | None = None,
                   chosen_lengths: ArrayLike | None = None, rejected_lengths: ArrayLike | None = None,
                   beta: float = 0.1, weights: Sequence[float] | None = None,
                   **options: Any) -> tuple[jax.Array, jax.Array]:
    r"""Per-example coefficients of ∇s_w and −∇s_l in the gradient of the loss, by autodiff.

    With L = Σ_i ℓ_i the batch-summed loss (arguments as in :func:`compute`):

        w_chosen[i] = −∂L/∂s_w[i],   w_rejected[i] = +∂L/∂s_l[i],

    so that −∇θL = Σ_i (w_chosen[i]·g_w[i] − w_rejected[i]·g_l[i]) with g = ∇θ s: one gradient step
    pushes example i's chosen log-prob along g_w with weight w_chosen and its rejected log-prob against g_l
    with weight w_rejected. For DPO both equal βσ(−βΔ) (Yuan et al.'s C/η); the chosen log-prob falls when
    ⟨g_w, g_l⟩ > (w_chosen/w_rejected)·‖g_w‖² (one example, small step). A negative weight flips the
    direction (``apo_down`` pushes the chosen log-prob down on purpose).

    Losses that couple examples (``aot``, ``aot_unpaired`` sort across the batch): the weights are still
    the derivatives of the **batch sum** with respect to example i's own log-probs, i.e. the weight of
    g_w[i] and g_l[i] in the batch gradient. They come from the loss term at the sorted position of
    example i's margin (``aot``), or of its chosen and of its rejected log-ratio separately
    (``aot_unpaired``), so they change with the rest of the batch and jump where two values tie.
    ``sft``, ``cpo``'s NLL part, ``slic``'s NLL part and ``dpo_sft``'s SFT part have no rejected term:
    ``sft`` has w_rejected = 0 and w_chosen = 1/|y_w|. Reference-free losses (``simpo``, ``orpo``, ...)
    are differentiated the same way; lengths and reference log-probs are constants.

    Args:
      loss: a name from :data:`NAMES` or a list of names (a mixture, with ``weights``).
      chosen_logps: policy summed log-probs of the chosen responses, ``[B]``.
      rejected_logps: policy summed log-probs of the rejected responses, ``[B]``.
      ref_chosen_logps: reference summed log-probs of the chosen responses, ``[B]``, where needed.
      ref_rejected_logps: reference summed log-probs of the rejected responses, ``[B]``, where needed.
      chosen_lengths: chosen response lengths in tokens, ``[B]``, where a loss normalises.
      rejected_lengths: rejected response lengths in tokens, ``[B]``, where a loss normalises.
      beta: β, passed to every loss that takes it.
      weights: mixture weights, one per name.
      **options: loss options, as in :func:`compute`.

    Returns:
      ``(w_chosen, w_rejected)``, each ``[B]``.

    Raises:
      LossError, ValueError: as :func:`compute`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxalign import losses
      >>> w_c, w_r = losses.margin_weights("sigmoid", chosen_logps=jnp.array([-10.0]),
      ...     rejected_logps=jnp.array([-12.0]), ref_chosen_logps=jnp.array([-11.0]),
      ...     ref_rejected_logps=jnp.array([-11.0]), beta=0.5)
      >>> [round(float(w[0]), 4) for w in (w_c, w_r)]  # β·σ(−βΔ) = 0.5·σ(−1)
      [0.1345, 0.1345]
    """
    chosen = jnp.asarray(chosen_logps)
    rejected = jnp.asarray(rejected_logps)
    if not jnp.issubdtype(chosen.dtype, jnp.floating):
        chosen = chosen.astype(jnp.result_type(float))
    if not jnp.issubdtype(rejected.dtype, jnp.floating):
        rejected = rejected.astype(jnp.result_type(float))

    def total(c, r):
        return jnp.sum(compute(loss, chosen_logps=c, rejected_logps=r, ref_chosen_logps=ref_chosen_logps,
                               ref_rejected_logps=ref_rejected_logps, chosen_lengths=chosen_lengths,
                               rejected_lengths=rejected_lengths, beta=beta, weights=weights, **options))

    grad_chosen, grad_rejected = jax.grad(total, argnums=(0, 1))(chosen, rejected)
    return -grad_chosen, grad_rejected


# --- the table of `jaxalign losses` -----------------------------------------------------------------

#: The example pair of :func:`describe`: reference log-probs and lengths; the policy's log-probs are
#: s_w = ref_w + margin/2 and s_l = ref_l − margin/2, so the DPO margin Δ equals ``margin``.
EXAMPLE_PAIR = types.MappingProxyType({"ref_chosen_logps": -40.0, "ref_rejected_logps": -45.0,
                                       "chosen_lengths": 20, "rejected_lengths": 25})


def _example(margin: float) -> dict[str, jax.Array]:
    ex = EXAMPLE_PAIR
    low, high = 2 * ex["ref_rejected_logps"], -2 * ex["ref_chosen_logps"]
    if not low < margin < high:  # log-probs must stay below 0
        raise LossError(f"margin {margin:g}: the example pair needs {low:g} < margin < {high:g} "
                        f"(s_w = {ex['ref_chosen_logps']:g} + margin/2 and s_l = "
                        f"{ex['ref_rejected_logps']:g} - margin/2 are log-probs, so below 0)")
    return {
        "chosen_logps": jnp.array([ex["ref_chosen_logps"] + margin / 2]),
        "rejected_logps": jnp.array([ex["ref_rejected_logps"] - margin / 2]),
        "ref_chosen_logps": jnp.array([ex["ref_chosen_logps"]]),
        "ref_rejected_logps": jnp.array([ex["ref_rejected_logps"]]),
        "chosen_lengths": jnp.array([ex["chosen_lengths"]]),
        "rejected_lengths": jnp.array([ex["rejected_lengths"]]),
    }


_F_OPTIONS = ("f_divergence_type", "f_alpha_divergence_coef")
_SYMBOLS = {"label_smoothing": "ε", "simpo_gamma": "γ", "discopop_tau": "τ", "bco_delta": "δ",
            "cpo_alpha": "α", "alpha": "α", "rdpo_alpha": "α", "dpop_lambda": "λ", "slic_delta": "δ",
            "slic_lambda": "λ", "sft_coeff": "c"}


def _needs(spec: LossSpec) -> str:
    parts = []
    if "ref_chosen_logps" in spec.inputs:
        parts.append("ref")
    if any("lengths" in i for i in spec.inputs):
        parts.append("len")
    return "+".join(parts) or "-"


def _options_text(spec: LossSpec) -> str:
    items = [f"{k}={v!r} ({_SYMBOLS[k]})" if k in _SYMBOLS else f"{k}={v!r}"
             for k, v in spec.options.items() if k not in _F_OPTIONS]
    if "f_divergence_type" in spec.options:
        items.append("f-div†")
    if not spec.uses_beta:
        items.append("no β")
    return ", ".join(items) or "none"


def _number(x: float) -> str:
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.2e}"


def describe(evaluate: bool = False, beta: float = 0.1, margin: float = 0.5) -> str:
    """The table printed by ``jaxalign losses``: every loss with its formula, inputs and options.

    With ``evaluate``, each loss is also evaluated (defaults for its options, the given ``beta``) on one
    example pair whose DPO margin Δ = (s_w − s_l) − (s_w^ref − s_l^ref) equals ``margin``:
    s_w^ref = −40, s_l^ref = −45, |y_w| = 20, |y_l| = 25, s_w = −40 + margin/2, s_l = −45 − margin/2
    (:data:`EXAMPLE_PAIR`; so −90 < margin < 80), with its :func:`margin_weights` (w_chosen, w_rejected).
    Fits 120 columns.

    Args:
      evaluate: add the loss and margin-weight columns.
      beta: β for the example.
      margin: the example's DPO margin Δ.

    Returns:
      The table, as text.

    Raises:
      LossError: ``beta`` ≤ 0, or a ``margin`` outside (−90, 80) when ``evaluate``.

    Examples:
      >>> from jaxalign import losses
      >>> print(losses.describe().splitlines()[0])
      jaxalign.losses: 23 preference losses, per example, over summed response log-probs s_w, s_l of a pair
    """
    lines = [
        f"jaxalign.losses: {len(NAMES)} preference losses, per example, over summed response log-probs "
        "s_w, s_l of a pair",
        "  r = s − s^ref (log-ratio to the reference)   Δ = r_w − r_l (DPO margin)   m = s/|y| (mean "
        "token log-prob)",
        "  σ = logistic, logit(p) = log(p/(1−p))   needs: ref = reference log-probs, len = response "
        "lengths |y|",
    ]
    if evaluate:
        ex = EXAMPLE_PAIR
        lines += [
            f"  example pair (β={beta:g}, Δ={margin:g}): s_w={ex['ref_chosen_logps'] + margin / 2:g}, "
            f"s_l={ex['ref_rejected_logps'] - margin / 2:g}, s_w^ref={ex['ref_chosen_logps']:g}, "
            f"s_l^ref={ex['ref_rejected_logps']:g}, |y_w|={ex['chosen_lengths']}, "
            f"|y_l|={ex['rejected_lengths']}",
            "  loss ℓ at the default options; margin weights w_c = −∂ℓ/∂s_w, w_r = +∂ℓ/∂s_l, "
            "so −∇θℓ = w_c·∇θs_w − w_r·∇θs_l",
        ]
    name_w = max(len(n) for n in NAMES)
    formula_w = max(len(s.formula) for s in _REGISTRY.values())
    head = f"{'name':<{name_w}}  {'formula':<{formula_w}}  {'needs':<7}"
    if evaluate:
        head += f"  {'loss':>9}  {'w_c':>9}  {'w_r':>9}"
    lines += ["", head, "─" * len(head)]
    lines[-2] = head.rstrip()
    batch = _example(margin) if evaluate else None
    for name, spec in _REGISTRY.items():
        row = f"{name:<{name_w}}  {spec.formula:<{formula_w}}  {_needs(spec):<7}"
        if evaluate:
            value = compute(name, beta=beta, **batch)
            w_c, w_r = margin_weights(name, beta=beta, **batch)
            row += "".join(f"  {_number(float(x[0])):>9}" for x in (value, w_c, w_r))
        lines.append(row.rstrip())
        lines.append(f"{'':<{name_w}}    {_options_text(spec)}  ·  {spec.source}")
    lines += [
        "",
        "† f-div: f_divergence_type='reverse_kl' (or forward_kl, js_divergence, alpha_divergence), "
        "f_alpha_divergence_coef=0.5:",
        "  each log-ratio r becomes f'(e^r) (TRL's f-DPO).   aot, aot_unpaired sort across the batch "
        "(on one pair: sigmoid).",
        "Mixtures: compute([\"sigmoid\", \"sft\"], weights=[1.0, 0.5], ...) is the weighted sum "
        "(TRL's loss_weights).",
    ]
    return "\n".join(lines)
