"""The table printed by ``jaxalign losses``: every registered loss with its formula, inputs and options,
and optionally its value and margin weights on one example pair."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from jaxalign.errors import LossError
from jaxalign.losses.evaluate import compute, margin_weights
from jaxalign.losses.registry import REGISTRY, LossInfo


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


def _needs(info: LossInfo) -> str:
    parts = []
    if "ref_chosen_logps" in info.inputs:
        parts.append("ref")
    if any("lengths" in i for i in info.inputs):
        parts.append("len")
    return "+".join(parts) or "-"


def _options_text(info: LossInfo) -> str:
    items = [f"{k}={v!r} ({_SYMBOLS[k]})" if k in _SYMBOLS else f"{k}={v!r}"
             for k, v in info.options.items() if k not in _F_OPTIONS]
    if "f_divergence_type" in info.options:
        items.append("f-div†")
    if not info.uses_beta:
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
        f"jaxalign.losses: {len(REGISTRY)} preference losses, per example, over summed response log-probs "
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
    name_w = max(len(n) for n in REGISTRY)
    formula_w = max(len(s.formula) for s in REGISTRY.values())
    head = f"{'name':<{name_w}}  {'formula':<{formula_w}}  {'needs':<7}"
    if evaluate:
        head += f"  {'loss':>9}  {'w_c':>9}  {'w_r':>9}"
    lines += ["", head, "─" * len(head)]
    lines[-2] = head.rstrip()
    batch = _example(margin) if evaluate else None
    for name, info in REGISTRY.items():
        row = f"{name:<{name_w}}  {info.formula:<{formula_w}}  {_needs(info):<7}"
        if evaluate:
            value = compute(name, beta=beta, **batch)
            w_c, w_r = margin_weights(name, beta=beta, **batch)
            row += "".join(f"  {_number(float(x[0])):>9}" for x in (value, w_c, w_r))
        lines.append(row.rstrip())
        lines.append(f"{'':<{name_w}}    {_options_text(info)}  ·  {info.source}")
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
