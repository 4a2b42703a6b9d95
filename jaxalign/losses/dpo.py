"""The DPO family: TRL ``DPOTrainer``'s loss types, in TRL's order, as pure per-example functions.

Each takes the policy's and the reference's summed response log-probs of a pair (and lengths where it
normalises), all ``[B]``, and returns the per-example loss ``[B]``; notation of :mod:`jaxalign.losses`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses.registry import POSITIVE, register
from jaxalign.losses.shared import length, log_sigmoid, scores, smoothed_logistic


# --- TRL DPOTrainer loss types -----------------------------------------------------------------------

@register("sigmoid", formula="−(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)",
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
    score_w, score_l = scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    return smoothed_logistic(beta * (score_w - score_l), label_smoothing)


@register("hinge", formula="max(0, 1 − βΔ)", source="SLiC (Zhao 2023); TRL")
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
    score_w, score_l = scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    return jax.nn.relu(1.0 - beta * (score_w - score_l))


@register("ipo", formula="(r_w/|y_w| − r_l/|y_l| − 1/(2β))²",
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
    score_w, score_l = scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    delta = score_w / length(chosen_lengths, score_w) - score_l / length(rejected_lengths, score_l)
    return (delta - 1.0 / (2.0 * beta)) ** 2


@register("exo_pair", formula="q·log(q/(1−ε)) + (1−q)·log((1−q)/ε), q = σ(βΔ)",
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
    score_w, score_l = scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    z = beta * (score_w - score_l)
    eps = label_smoothing
    return (jax.nn.sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps)))


@register("nca_pair", formula="−logσ(βr_w) − ½logσ(−βr_w) − ½logσ(−βr_l)",
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
    return -log_sigmoid(reward_w) - 0.5 * log_sigmoid(-reward_w) - 0.5 * log_sigmoid(-reward_l)


@register("robust", formula="[−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε)",
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
    score_w, score_l = scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    z = beta * (score_w - score_l)
    eps = label_smoothing
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


@register("bco_pair", formula="−logσ(βr_w − δ) − logσ(δ − βr_l)",
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
    return -log_sigmoid(reward_w - bco_delta) - log_sigmoid(-(reward_l - bco_delta))


@register("sppo_hard", formula="(r_w − 1/(2β))² + (r_l + 1/(2β))²",
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


@register("aot", formula="sigmoid on sort(s_w − s_l) − sort(s_w^ref − s_l^ref) (batch)",
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
    return smoothed_logistic(beta * (margin - ref_margin), label_smoothing)


@register("aot_unpaired", formula="sigmoid on sort(r_w) − sort(r_l) (batch)",
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
    return smoothed_logistic(beta * (r_w - r_l), label_smoothing)


@register("apo_zero", formula="1 − σ(βr_w) + σ(βr_l)", source="APO (D'Oosterlinck 2024) Eq. 7; TRL")
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


@register("apo_down", formula="σ(βr_w) + 1 − σ(β(r_w − r_l))",
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


@register("discopop", formula="(1−μ)·(−logσ(βΔ)) + μ·exp(−βΔ), μ = σ(βΔ/τ)",
          source="DiscoPOP (Chan Lu 2024) Eq. 5; TRL", checks={"discopop_tau": POSITIVE})
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
    score_w, score_l = scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    z = beta * (score_w - score_l)
    log_mu = log_sigmoid(z / discopop_tau)
    return -log_sigmoid(z) * jax.nn.sigmoid(-z / discopop_tau) + jnp.exp(log_mu - z)


@register("sft", formula="−s_w/|y_w|", source="TRL (per example; TRL averages over batch tokens)")
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
    return -jnp.asarray(chosen_logps) / length(chosen_lengths, chosen_logps)


@register("sigmoid_norm", formula="−logσ(β(r_w/|y_w| − r_l/|y_l|))",
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
    score_w, score_l = scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    delta = score_w / length(chosen_lengths, score_w) - score_l / length(rejected_lengths, score_l)
    return -log_sigmoid(beta * delta)
