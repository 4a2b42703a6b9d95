"""Other margin-based preference losses: SimPO, CPO, ORPO, R-DPO, DPO-Positive, SLiC, AlphaPO, DPO+SFT.

Pure per-example functions over summed response log-probs ``[B]`` (and lengths where they normalise);
most are reference-free. Notation of :mod:`jaxalign.losses`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.registry import NONNEG, register
from jaxalign.losses.shared import as_float, length, log1mexp, log_sigmoid, smoothed_logistic


@register("simpo", formula="−(1−ε)·logσ(z) − ε·logσ(−z), z = β(m_w − m_l) − γ",
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
    m_w = jnp.asarray(chosen_logps) / length(chosen_lengths, chosen_logps)
    m_l = jnp.asarray(rejected_logps) / length(rejected_lengths, rejected_logps)
    return smoothed_logistic(beta * (m_w - m_l) - simpo_gamma, label_smoothing)


@register("cpo", formula="−(1−ε)·logσ(z) − ε·logσ(−z) − α·s_w/|y_w|, z = β(s_w − s_l)",
          source="CPO (Xu 2024) Eq. 3; TRL CPOTrainer", checks={"cpo_alpha": NONNEG})
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
    preference = smoothed_logistic(beta * (s_w - jnp.asarray(rejected_logps)), label_smoothing)
    return preference - cpo_alpha * s_w / length(chosen_lengths, s_w)


@register("orpo", formula="−m_w − β·logσ(logit(e^m_w) − logit(e^m_l))",
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
    m_w = jnp.asarray(chosen_logps) / length(chosen_lengths, chosen_logps)
    m_l = jnp.asarray(rejected_logps) / length(rejected_lengths, rejected_logps)
    log_odds = (m_w - m_l) - (log1mexp(m_w) - log1mexp(m_l))
    return -m_w - beta * log_sigmoid(log_odds)


@register("rdpo", formula="−logσ(βΔ + α(|y_w| − |y_l|))",
          source="R-DPO (Park 2024)", checks={"rdpo_alpha": NONNEG})
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
    length_gap = as_float(chosen_lengths, r_w) - as_float(rejected_lengths, r_l)
    return -log_sigmoid(beta * (r_w - r_l) + rdpo_alpha * length_gap)


@register("dpop", formula="−logσ(β(Δ − λ·max(0, s_w^ref − s_w)))",
          source="DPO-Positive (Pal 2024)", checks={"dpop_lambda": NONNEG})
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
    return -log_sigmoid(beta * (delta - dpop_lambda * jax.nn.relu(ref_w - s_w)))


@register("slic", formula="max(0, δ − (s_w − s_l)) − λ·s_w",
          source="SLiC-HF (Zhao 2023)", checks={"slic_delta": NONNEG, "slic_lambda": NONNEG})
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


@register("alphapo", formula="simpo with m → (1 − e^(−α·m))/α",
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
    m_w = jnp.asarray(chosen_logps) / length(chosen_lengths, chosen_logps)
    m_l = jnp.asarray(rejected_logps) / length(rejected_lengths, rejected_logps)
    if isinstance(alpha, (int, float)) and alpha == 0:
        r_w, r_l = m_w, m_l
    else:
        r_w, r_l = -jnp.expm1(-alpha * m_w) / alpha, -jnp.expm1(-alpha * m_l) / alpha
    return smoothed_logistic(beta * (r_w - r_l) - simpo_gamma, label_smoothing)


@register("dpo_sft", formula="−logσ(βΔ) − c·s_w", source="Razin et al. 2025 §6",
          checks={"sft_coeff": NONNEG})
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
    return -log_sigmoid(beta * delta) - sft_coeff * s_w
