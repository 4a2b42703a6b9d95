"""Evaluating registered losses by name: :func:`compute` (a loss or a weighted mixture, per example) and
:func:`margin_weights` (the coefficients of ∇s_w and −∇s_l in its gradient, by autodiff)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.errors import LossError
from jaxalign.losses.registry import ARRAY_MEANING, REGISTRY, check_options, loss_names


def _resolve(loss, weights) -> tuple[list[str], list[Any]]:
    """Names and mixture weights, validated."""
    names = loss_names(loss)
    if weights is None:
        return names, [1.0] * len(names)
    if isinstance(weights, (int, float)) or jnp.ndim(weights) == 0:
        weights = [weights]
    weights = list(weights)
    if len(weights) != len(names):
        raise LossError(f"loss {names}: argument 'weights' has {len(weights)} entries for {len(names)} "
                        "loss names (TRL's loss_weights: one weight per loss)")
    return names, weights


def _validate(names: list[str], arrays: Mapping[str, Any], beta) -> None:
    """Raises LossError for a non-positive concrete ``beta`` and for missing inputs."""
    label = names[0] if len(names) == 1 else names
    infos = [REGISTRY[n] for n in names]
    if isinstance(beta, (int, float)) and not beta > 0 and any(i.uses_beta for i in infos):
        raise LossError(f"loss {label!r}: argument 'beta' must be > 0, got {beta!r}")
    for info in infos:
        for name in info.inputs:
            if arrays[name] is None:
                what = ARRAY_MEANING[name]
                raise LossError(f"loss {info.name!r}: missing argument {name!r} ({what}, shape [B])")


def compute(loss: str | Sequence[str], *, chosen_logps: ArrayLike, rejected_logps: ArrayLike,
            ref_chosen_logps: ArrayLike | None = None, ref_rejected_logps: ArrayLike | None = None,
            chosen_lengths: ArrayLike | None = None, rejected_lengths: ArrayLike | None = None,
            beta: float = 0.1, weights: Sequence[float] | None = None, **options: Any) -> jax.Array:
    """Evaluates a loss, or a weighted mixture of losses, per example.

    ``compute(["sigmoid", "sft"], weights=[1.0, 0.5], ...)`` is Σ_k weights[k]·loss_k, TRL's
    ``loss_type`` list with ``loss_weights`` (weights default to 1 each, as in TRL). Each option goes to
    the losses of the list that declare it (:data:`REGISTRY`); an option none of them declares is an
    error. Concrete option values are checked and typed by :func:`check_options` (numeric text becomes
    a number). Jit it with the name and options bound (``functools.partial``); the arrays, and options
    given as arrays, may be traced.

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
      LossError: unknown name or option, a bad option value (``LossOptionError``, also a ``ConfigError``),
        or a missing input; the message names the loss and the argument.
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
    options = check_options(names, options)
    _validate(names, arrays, beta)
    arrays = {k: (None if v is None else jnp.asarray(v)) for k, v in arrays.items()}
    shapes = {k: v.shape for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"compute({names}): all inputs must have the same shape [B]; got {shapes}")
    total = None
    for name, weight in zip(names, mix):
        info = REGISTRY[name]
        kwargs = {k: v for k, v in options.items() if k in info.options}
        if info.uses_beta:
            kwargs["beta"] = beta
        value = info.fn(*(arrays[i] for i in info.inputs), **kwargs)
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
