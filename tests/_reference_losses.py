"""Float64 NumPy transcriptions of the published loss formulas, the independent reference for test_losses.

Written from the papers (and, where TRL defines the variant, from TRL's documented formula), not from
jaxalign/losses/: quantities are spelled out the way the papers write them (probabilities, odds,
u = π/π_ref) rather than in the numerically stable forms the implementation uses. Inputs are float64
arrays of shape [B]: ``cw, cl`` (policy summed log-probs of chosen / rejected), ``rw, rl`` (reference),
``nw, nl`` (lengths). Each function returns the per-example loss, [B].
"""

from __future__ import annotations

import numpy as np


def _log_logistic(x):
    # log σ(x) = −log(1 + e^{−x}), written with logaddexp so that large |x| does not overflow.
    return -np.logaddexp(0.0, -x)


def _logistic(x):
    return np.exp(_log_logistic(x))


def f_prime(logratio, kind="reverse_kl", coef=0.5):
    """f'(u) at u = π/π_ref for the f-divergences of f-DPO (Wang et al. 2024, Table 1; TRL's α form)."""
    u = np.exp(logratio)
    if kind == "reverse_kl":
        return np.log(u)
    if kind == "forward_kl":
        return 1.0 - 1.0 / u
    if kind == "js_divergence":
        return np.log(2.0 * u / (1.0 + u))
    if kind == "alpha_divergence":
        return (u ** (coef - 1.0) - 1.0) / (coef - 1.0)
    raise ValueError(kind)


def _scores(d, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    return (f_prime(d["cw"] - d["rw"], f_divergence_type, f_alpha_divergence_coef),
            f_prime(d["cl"] - d["rl"], f_divergence_type, f_alpha_divergence_coef))


def _len(n):
    return np.maximum(np.asarray(n, dtype=np.float64), 1.0)


def _bt_smoothed(z, eps):
    """Conservative Bradley-Terry NLL: the label is right w.p. 1−ε, flipped w.p. ε."""
    return -((1.0 - eps) * _log_logistic(z) + eps * _log_logistic(-z))


def sigmoid(d, beta, label_smoothing=0.0, **f):
    sw, sl = _scores(d, **f)
    return _bt_smoothed(beta * (sw - sl), label_smoothing)


def hinge(d, beta, **f):
    sw, sl = _scores(d, **f)
    return np.maximum(0.0, 1.0 - beta * (sw - sl))


def ipo(d, beta, **f):
    sw, sl = _scores(d, **f)
    h = sw / _len(d["nw"]) - sl / _len(d["nl"])
    tau = beta
    return (h - 1.0 / (2.0 * tau)) ** 2


def exo_pair(d, beta, label_smoothing=1e-3, **f):
    sw, sl = _scores(d, **f)
    p_model = np.stack([_logistic(beta * (sw - sl)), _logistic(-beta * (sw - sl))])
    p_label = np.array([1.0 - label_smoothing, label_smoothing])[:, None]
    terms = np.where(p_model > 0, p_model * np.log(np.where(p_model > 0, p_model, 1.0) / p_label), 0.0)
    return np.sum(terms, axis=0)  # KL(p_model ‖ p_label), with 0·log 0 = 0


def nca_pair(d, beta):
    rew_w, rew_l = beta * (d["cw"] - d["rw"]), beta * (d["cl"] - d["rl"])
    return -_log_logistic(rew_w) - 0.5 * (_log_logistic(-rew_w) + _log_logistic(-rew_l))


def robust(d, beta, label_smoothing=0.0, **f):
    sw, sl = _scores(d, **f)
    eps = label_smoothing
    loss_right = -_log_logistic(beta * (sw - sl))
    loss_flipped = -_log_logistic(-beta * (sw - sl))
    return ((1.0 - eps) * loss_right - eps * loss_flipped) / (1.0 - 2.0 * eps)


def bco_pair(d, beta, bco_delta=0.0):
    rew_w, rew_l = beta * (d["cw"] - d["rw"]), beta * (d["cl"] - d["rl"])
    return -_log_logistic(rew_w - bco_delta) - _log_logistic(bco_delta - rew_l)


def sppo_hard(d, beta):
    # P(y_w ≻ π) = 1, P(y_l ≻ π) = 0 in log(π/π_ref) − η(P − 1/2), η = 1/β.
    eta = 1.0 / beta
    return ((d["cw"] - d["rw"]) - eta * (1.0 - 0.5)) ** 2 + ((d["cl"] - d["rl"]) - eta * (0.0 - 0.5)) ** 2


def aot(d, beta, label_smoothing=0.0):
    gap = np.sort(d["cw"] - d["cl"]) - np.sort(d["rw"] - d["rl"])
    return _bt_smoothed(beta * gap, label_smoothing)


def aot_unpaired(d, beta, label_smoothing=0.0):
    gap = np.sort(d["cw"] - d["rw"]) - np.sort(d["cl"] - d["rl"])
    return _bt_smoothed(beta * gap, label_smoothing)


def apo_zero(d, beta):
    return (1.0 - _logistic(beta * (d["cw"] - d["rw"]))) + _logistic(beta * (d["cl"] - d["rl"]))


def apo_down(d, beta):
    rw_, rl_ = d["cw"] - d["rw"], d["cl"] - d["rl"]
    return _logistic(beta * rw_) + (1.0 - _logistic(beta * (rw_ - rl_)))


def discopop(d, beta, discopop_tau=0.05, **f):
    sw, sl = _scores(d, **f)
    rho = beta * (sw - sl)
    mix = _logistic(rho / discopop_tau)
    return (1.0 - mix) * (-_log_logistic(rho)) + mix * np.exp(-rho)


def sft(d):
    return -d["cw"] / _len(d["nw"])


def sigmoid_norm(d, beta, **f):
    sw, sl = _scores(d, **f)
    return -_log_logistic(beta * (sw / _len(d["nw"]) - sl / _len(d["nl"])))


def simpo(d, beta, simpo_gamma=0.5, label_smoothing=0.0):
    reward_w = beta / _len(d["nw"]) * d["cw"]
    reward_l = beta / _len(d["nl"]) * d["cl"]
    return _bt_smoothed(reward_w - reward_l - simpo_gamma, label_smoothing)


def cpo(d, beta, cpo_alpha=1.0, label_smoothing=0.0):
    nll = -d["cw"] / _len(d["nw"])
    return _bt_smoothed(beta * (d["cw"] - d["cl"]), label_smoothing) + cpo_alpha * nll


def orpo(d, beta):
    p_w = np.exp(d["cw"] / _len(d["nw"]))
    p_l = np.exp(d["cl"] / _len(d["nl"]))
    odds_w, odds_l = p_w / (1.0 - p_w), p_l / (1.0 - p_l)
    lam = beta
    return -np.log(p_w) - lam * _log_logistic(np.log(odds_w / odds_l))


def rdpo(d, beta, rdpo_alpha=0.2):
    margin = beta * ((d["cw"] - d["rw"]) - (d["cl"] - d["rl"]))
    return -_log_logistic(margin + rdpo_alpha * (np.asarray(d["nw"], float) - np.asarray(d["nl"], float)))


def dpop(d, beta, dpop_lambda=50.0):
    penalty = np.maximum(0.0, np.log(np.exp(d["rw"] - d["cw"])))
    delta = (d["cw"] - d["rw"]) - (d["cl"] - d["rl"])
    return -_log_logistic(beta * (delta - dpop_lambda * penalty))


def slic(d, slic_delta=1.0, slic_lambda=0.1):
    return np.maximum(0.0, slic_delta - d["cw"] + d["cl"]) - slic_lambda * d["cw"]


def alphapo(d, beta, alpha=0.25, simpo_gamma=0.5, label_smoothing=0.0):
    p_w = np.exp(d["cw"] / _len(d["nw"]))  # per-token (length-normalised) probability
    p_l = np.exp(d["cl"] / _len(d["nl"]))
    reward_w = beta * (1.0 - p_w ** (-alpha)) / alpha
    reward_l = beta * (1.0 - p_l ** (-alpha)) / alpha
    return _bt_smoothed(reward_w - reward_l - simpo_gamma, label_smoothing)


def dpo_sft(d, beta, sft_coeff=0.1):
    delta = (d["cw"] - d["rw"]) - (d["cl"] - d["rl"])
    return -_log_logistic(beta * delta) + sft_coeff * (-d["cw"])


#: name -> (reference function, whether it takes beta)
REFERENCES = {
    "sigmoid": (sigmoid, True), "hinge": (hinge, True), "ipo": (ipo, True), "exo_pair": (exo_pair, True),
    "nca_pair": (nca_pair, True), "robust": (robust, True), "bco_pair": (bco_pair, True),
    "sppo_hard": (sppo_hard, True), "aot": (aot, True), "aot_unpaired": (aot_unpaired, True),
    "apo_zero": (apo_zero, True), "apo_down": (apo_down, True), "discopop": (discopop, True),
    "sft": (sft, False), "sigmoid_norm": (sigmoid_norm, True), "simpo": (simpo, True), "cpo": (cpo, True),
    "orpo": (orpo, True), "rdpo": (rdpo, True), "dpop": (dpop, True), "slic": (slic, False),
    "alphapo": (alphapo, True), "dpo_sft": (dpo_sft, True),
}


def reference(name, d, beta, **options):
    """The reference per-example loss of ``name`` on the batch ``d``."""
    fn, takes_beta = REFERENCES[name]
    return fn(d, beta, **options) if takes_beta else fn(d, **options)
