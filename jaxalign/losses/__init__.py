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
(Yuan et al., 2025). :data:`NAMES` lists every name; :data:`REGISTRY` maps each to a :class:`LossInfo`
recording its function, required inputs, and options with their defaults and allowed values;
:func:`check_options` checks and types options before any model is loaded. ``jaxalign losses --table``
prints :func:`describe`.

Modules: ``registry`` (names, :class:`LossInfo`, option checks), ``shared`` (f-divergence scores and
helpers), ``dpo`` (TRL ``DPOTrainer``'s loss types), ``margin`` (SimPO, CPO, ORPO, R-DPO, DPO-Positive,
SLiC, AlphaPO, DPO+SFT), ``evaluate`` (:func:`compute`, :func:`margin_weights`), ``table``
(:func:`describe`).
"""


from jaxalign.losses.registry import F_DIVERGENCE_TYPES, REGISTRY, LossInfo, check_options
from jaxalign.losses.shared import f_divergence_scores
# Importing the loss modules registers their losses, DPO family first (REGISTRY keeps that order).
from jaxalign.losses.dpo import (aot, aot_unpaired, apo_down, apo_zero, bco_pair, discopop, exo_pair, hinge,
                                 ipo, nca_pair, robust, sft, sigmoid, sigmoid_norm, sppo_hard)
from jaxalign.losses.margin import alphapo, cpo, dpo_sft, dpop, orpo, rdpo, simpo, slic
from jaxalign.losses.evaluate import compute, margin_weights
from jaxalign.losses.table import EXAMPLE_PAIR, describe

__all__ = [
    "NAMES", "REGISTRY", "F_DIVERGENCE_TYPES", "EXAMPLE_PAIR", "LossInfo", "check_options", "compute",
    "margin_weights", "describe",
    "f_divergence_scores",
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    "simpo", "cpo", "orpo", "rdpo", "dpop", "slic", "alphapo", "dpo_sft",
]

#: Every loss name, TRL's ``DPOTrainer`` loss types first (in TRL's order), then the other methods.
NAMES: tuple[str, ...] = tuple(REGISTRY)
