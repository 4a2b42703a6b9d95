"""Preference losses against independent references.

* float64 NumPy transcriptions of the published formulas (tests/_reference_losses.py), every name, several
  option settings, random pairs with margins of both signs;
* autodiff (``margin_weights``, ``jax.grad``) against central finite differences of that reference, and
  ``jax.test_util.check_grads``;
* hand-derived anchors (log 2 at zero margin, hinge past the margin, β·σ(−βΔ) weights, ...);
* TRL's own code: ``DPOTrainer._compute_loss`` on a stub trainer and model, ``CPOTrainer.cpo_loss`` and
  ``ORPOTrainer.odds_ratio_loss`` on torch tensors;
* errors, mixtures, jit/vmap, and the ``jaxalign losses --table`` command.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxalign import cli, losses
from jaxalign.errors import ConfigError, JaxAlignError, LossError

_spec = importlib.util.spec_from_file_location(
    "_reference_losses", pathlib.Path(__file__).with_name("_reference_losses.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

ALL_NAMES = losses.NAMES
TRL_DPO_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

# Option settings per loss: the defaults, then non-default values (f-divergences where TRL allows them).
OPTION_CASES = {
    "sigmoid": [{}, {"label_smoothing": 0.2}, {"f_divergence_type": "forward_kl"},
                {"f_divergence_type": "js_divergence"},
                {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}],
    "hinge": [{}, {"f_divergence_type": "js_divergence"}],
    "ipo": [{}, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}],
    "exo_pair": [{}, {"label_smoothing": 0.2}, {"f_divergence_type": "forward_kl"}],
    "nca_pair": [{}],
    "robust": [{}, {"label_smoothing": 0.3}, {"f_divergence_type": "js_divergence", "label_smoothing": 0.1}],
    "bco_pair": [{}, {"bco_delta": 0.4}],
    "sppo_hard": [{}],
    "aot": [{}, {"label_smoothing": 0.1}],
    "aot_unpaired": [{}, {"label_smoothing": 0.1}],
    "apo_zero": [{}],
    "apo_down": [{}],
    "discopop": [{}, {"discopop_tau": 0.5}, {"f_divergence_type": "forward_kl"}],
    "sft": [{}],
    "sigmoid_norm": [{}, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.2}],
    "simpo": [{}, {"simpo_gamma": 1.2, "label_smoothing": 0.1}],
    "cpo": [{}, {"cpo_alpha": 0.0}, {"cpo_alpha": 0.5, "label_smoothing": 0.1}],
    "orpo": [{}],
    "rdpo": [{}, {"rdpo_alpha": 0.05}],
    "dpop": [{}, {"dpop_lambda": 2.0}],
    "slic": [{}, {"slic_delta": 3.0, "slic_lambda": 0.5}],
    "alphapo": [{}, {"alpha": -0.5, "simpo_gamma": 0.2}, {"alpha": 1.0, "label_smoothing": 0.2}],
    "dpo_sft": [{}, {"sft_coeff": 1.0}],
}
CASES = [(name, i, opts) for name in ALL_NAMES for i, opts in enumerate(OPTION_CASES[name])]
CASE_IDS = [f"{name}-{i}" for name, i, _ in CASES]


@pytest.fixture
def x64():
    """float64 inside the test only; the suite shares one process."""
    with jax.enable_x64(True):
        yield


def make_batch(seed: int, size: int = 8) -> dict[str, np.ndarray]:
    """Random pairs: per-token log-probs in (−2.5, −0.05), lengths 1..30, references near the policy.

    The DPO margins have both signs (asserted); mean log-probs stay below 0, as ORPO needs.
    """
    rng = np.random.default_rng(seed)
    nw = rng.integers(1, 31, size)
    nl = rng.integers(1, 31, size)
    cw = rng.uniform(-2.5, -0.05, size) * nw
    cl = rng.uniform(-2.5, -0.05, size) * nl
    while True:  # redraw the references until the margins have both signs
        rw = cw + rng.normal(0.0, 3.0, size)
        rl = cl + rng.normal(0.0, 3.0, size)
        delta = (cw - rw) - (cl - rl)
        if (delta > 0).any() and (delta < 0).any():
            break
    return {"cw": cw, "cl": cl, "rw": rw, "rl": rl, "nw": nw, "nl": nl}


def as_kwargs(d) -> dict:
    return {"chosen_logps": d["cw"], "rejected_logps": d["cl"], "ref_chosen_logps": d["rw"],
            "ref_rejected_logps": d["rl"], "chosen_lengths": d["nw"], "rejected_lengths": d["nl"]}


def jnp_kwargs(d, dtype=None) -> dict:
    out = {k: jnp.asarray(v, dtype=dtype) for k, v in as_kwargs(d).items() if "lengths" not in k}
    out["chosen_lengths"] = jnp.asarray(d["nw"])
    out["rejected_lengths"] = jnp.asarray(d["nl"])
    return out


# --- against the float64 NumPy transcriptions -------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("name,case,options", CASES, ids=CASE_IDS)
def test_loss_equals_float64_reference(x64, name, case, options, beta):
    d = make_batch(seed=case + 7 * ALL_NAMES.index(name))
    got = losses.compute(name, beta=beta, **jnp_kwargs(d), **options)
    assert got.dtype == jnp.float64 and got.shape == (8,)
    expected = ref.reference(name, d, beta, **options)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("enable_x64", [False, True])
def test_float32_inputs_give_float32_losses(enable_x64):
    d = make_batch(seed=1)
    for name in ALL_NAMES:
        with jax.enable_x64(enable_x64):  # int64 lengths under x64 must not promote the result
            got = losses.compute(name, **jnp_kwargs(d, dtype=jnp.float32))
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got), ref.reference(name, d, 0.1), rtol=2e-4, atol=2e-4,
                                   err_msg=name)


def _finite_difference_weights(name, d, beta, options, h=1e-5):
    """(−∂L/∂s_w[i], +∂L/∂s_l[i]) of the batch-summed reference loss, by central differences."""
    w_c, w_r = np.zeros(len(d["cw"])), np.zeros(len(d["cw"]))
    for key, out, sign in (("cw", w_c, -1.0), ("cl", w_r, 1.0)):
        for i in range(len(out)):
            up, down = dict(d), dict(d)
            up[key] = d[key].copy()
            down[key] = d[key].copy()
            up[key][i] += h
            down[key][i] -= h
            diff = (ref.reference(name, up, beta, **options).sum()
                    - ref.reference(name, down, beta, **options).sum())
            out[i] = sign * diff / (2 * h)
    return w_c, w_r


@pytest.mark.parametrize("name,case,options", CASES, ids=CASE_IDS)
def test_margin_weights_equal_finite_differences(x64, name, case, options):
    d = make_batch(seed=100 + case + 7 * ALL_NAMES.index(name))
    beta = 0.3
    w_c, w_r = losses.margin_weights(name, beta=beta, **jnp_kwargs(d), **options)
    fd_c, fd_r = _finite_difference_weights(name, d, beta, options)
    np.testing.assert_allclose(np.asarray(w_c), fd_c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(w_r), fd_r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_check_grads_float64(x64, name):
    d = make_batch(seed=200 + ALL_NAMES.index(name))
    kw = jnp_kwargs(d)
    spec = losses.REGISTRY[name]
    differentiable = [k for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
                      if k in spec.inputs]

    def f(*arrays):
        return losses.compute(name, beta=0.3, **{**kw, **dict(zip(differentiable, arrays))})

    check_grads(f, tuple(kw[k] for k in differentiable), order=1, modes=("rev",), eps=1e-6)


# --- anchors ----------------------------------------------------------------------------------------

def _pair(delta: float, **extra):
    """One pair with DPO margin ``delta`` (policy above the reference on the chosen side)."""
    base = {"chosen_logps": jnp.array([-20.0 + delta / 2]), "rejected_logps": jnp.array([-30.0 - delta / 2]),
            "ref_chosen_logps": jnp.array([-20.0]), "ref_rejected_logps": jnp.array([-30.0]),
            "chosen_lengths": jnp.array([10]), "rejected_lengths": jnp.array([12])}
    base.update(extra)
    return base


@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_sigmoid_at_zero_margin_is_log_2(beta, label_smoothing):
    value = losses.compute("sigmoid", beta=beta, label_smoothing=label_smoothing, **_pair(0.0))
    np.testing.assert_allclose(np.asarray(value), [math.log(2.0)], rtol=1e-6)


def test_hinge_is_zero_past_the_margin():
    beta = 0.5
    margins = jnp.array([2.0, 2.5, 10.0, 1.0, -3.0])  # βΔ ≥ 1 for the first three
    kw = {"chosen_logps": margins, "rejected_logps": jnp.zeros(5), "ref_chosen_logps": jnp.zeros(5),
          "ref_rejected_logps": jnp.zeros(5)}
    value = losses.compute("hinge", beta=beta, **kw)
    np.testing.assert_allclose(np.asarray(value), [0.0, 0.0, 0.0, 0.5, 2.5], atol=1e-7)
    w_c, w_r = losses.margin_weights("hinge", beta=beta, **kw)
    np.testing.assert_allclose(np.asarray(w_c), [0.0, 0.0, 0.0, beta, beta])
    np.testing.assert_allclose(np.asarray(w_r), [0.0, 0.0, 0.0, beta, beta])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_margin_weights_are_beta_sigma_minus_beta_delta(x64, beta):
    d = make_batch(seed=3)
    delta = (d["cw"] - d["rw"]) - (d["cl"] - d["rl"])
    w_c, w_r = losses.margin_weights("sigmoid", beta=beta, **jnp_kwargs(d))
    expected = beta / (1.0 + np.exp(beta * delta))
    np.testing.assert_allclose(np.asarray(w_c), expected, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(w_r), expected, rtol=1e-12)


@pytest.mark.parametrize("sft_coeff", [0.01, 0.1, 1.0])
def test_dpo_sft_weights_are_dpo_weights_plus_sft_coeff_on_chosen(x64, sft_coeff):
    kw = jnp_kwargs(make_batch(seed=4))
    dpo_c, dpo_r = losses.margin_weights("sigmoid", beta=0.1, **kw)
    w_c, w_r = losses.margin_weights("dpo_sft", beta=0.1, sft_coeff=sft_coeff, **kw)
    np.testing.assert_allclose(np.asarray(w_c), np.asarray(dpo_c) + sft_coeff, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(w_r), np.asarray(dpo_r), rtol=1e-12)


def test_sft_weights_are_inverse_length_on_chosen_only(x64):
    d = make_batch(seed=5)
    w_c, w_r = losses.margin_weights("sft", **jnp_kwargs(d))
    np.testing.assert_allclose(np.asarray(w_c), 1.0 / d["nw"], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(w_r), 0.0)


def test_dpop_is_dpo_above_the_reference_and_pushes_chosen_harder_below(x64):
    above = _pair(0.8)  # s_w > s_w^ref
    np.testing.assert_allclose(np.asarray(losses.compute("dpop", **above)),
                               np.asarray(losses.compute("sigmoid", **above)), rtol=1e-12)
    below = _pair(0.8, chosen_logps=jnp.array([-21.0]), rejected_logps=jnp.array([-32.0]))
    lam = 5.0
    w_c, w_r = losses.margin_weights("dpop", dpop_lambda=lam, **below)
    np.testing.assert_allclose(np.asarray(w_c), (1.0 + lam) * np.asarray(w_r), rtol=1e-12)


def test_rdpo_sign_convention(x64):
    # A longer chosen response raises the argument of the log-sigmoid: smaller loss than DPO.
    longer_chosen = _pair(0.5, chosen_lengths=jnp.array([30]), rejected_lengths=jnp.array([10]))
    dpo = float(losses.compute("sigmoid", **longer_chosen)[0])
    rdpo = float(losses.compute("rdpo", rdpo_alpha=0.01, **longer_chosen)[0])
    assert rdpo < dpo
    expected = math.log1p(math.exp(-(0.1 * 0.5 + 0.01 * 20)))
    np.testing.assert_allclose(rdpo, expected, rtol=1e-12)
    no_penalty = float(losses.compute("rdpo", rdpo_alpha=0.0, **longer_chosen)[0])
    np.testing.assert_allclose(no_penalty, dpo, rtol=1e-12)


def test_special_cases_reduce_to_their_parents(x64):
    kw = jnp_kwargs(make_batch(seed=6))
    same = functools.partial(np.testing.assert_allclose, rtol=1e-9, atol=1e-12)
    dpo = np.asarray(losses.compute("sigmoid", beta=0.2, **kw))
    same(np.asarray(losses.compute("robust", beta=0.2, **kw)), dpo)
    # DiscoPOP's modulation becomes a switch as τ → 0: logistic below zero margin, exponential above.
    z = 0.2 * np.asarray((kw["chosen_logps"] - kw["ref_chosen_logps"])
                         - (kw["rejected_logps"] - kw["ref_rejected_logps"]))
    same(np.asarray(losses.compute("discopop", beta=0.2, discopop_tau=1e-9, **kw)),
         np.where(z < 0, dpo, np.exp(-z)))
    same(np.asarray(losses.compute("sigmoid", beta=0.2, f_divergence_type="alpha_divergence",
                                   f_alpha_divergence_coef=1.0, **kw)), dpo)
    same(np.asarray(losses.compute("alphapo", beta=2.0, alpha=0.0, **kw)),
         np.asarray(losses.compute("simpo", beta=2.0, **kw)))
    same(np.asarray(losses.compute("alphapo", beta=2.0, alpha=1e-7, **kw)),
         np.asarray(losses.compute("simpo", beta=2.0, **kw)), rtol=1e-5)
    # IPO with unit lengths is the un-normalised IPO of Razin et al.'s code.
    ones = {**kw, "chosen_lengths": jnp.ones(8), "rejected_lengths": jnp.ones(8)}
    delta = (kw["chosen_logps"] - kw["ref_chosen_logps"]) - (kw["rejected_logps"] - kw["ref_rejected_logps"])
    same(np.asarray(losses.compute("ipo", beta=0.2, **ones)), np.asarray((delta - 2.5) ** 2))
    # On a single pair, the sorting losses are DPO (with their label smoothing).
    one = _pair(-1.3)
    for name in ("aot", "aot_unpaired"):
        same(np.asarray(losses.compute(name, label_smoothing=0.1, **one)),
             np.asarray(losses.compute("sigmoid", label_smoothing=0.1, **one)))


def test_discopop_is_finite_for_extreme_margins():
    kw = _pair(0.0, chosen_logps=jnp.array([-5000.0, 0.0]), rejected_logps=jnp.array([0.0, -5000.0]),
               ref_chosen_logps=jnp.zeros(2), ref_rejected_logps=jnp.zeros(2))
    kw = {k: v for k, v in kw.items() if "lengths" not in k}
    value = losses.compute("discopop", beta=0.1, **kw)
    w_c, w_r = losses.margin_weights("discopop", beta=0.1, **kw)
    assert np.isfinite(np.asarray(value)).all() and np.isfinite(np.asarray(w_c)).all()
    np.testing.assert_allclose(float(value[0]), 500.0, rtol=1e-6)  # −log σ(−500) ≈ 500


# --- mixtures, jit, vmap ----------------------------------------------------------------------------

def test_mixture_equals_weighted_sum(x64):
    kw = jnp_kwargs(make_batch(seed=8))
    names, weights = ["sigmoid", "ipo", "sft", "exo_pair"], [0.8, 0.2, 1.0, 0.5]
    opts = {"label_smoothing": 0.05, "f_divergence_type": "js_divergence"}
    got = losses.compute(names, weights=weights, beta=0.3, **kw, **opts)
    expected = sum(w * np.asarray(losses.compute(n, beta=0.3, **kw, **{k: v for k, v in opts.items()
                                                                         if k in losses.REGISTRY[n].options}))
                   for n, w in zip(names, weights))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)
    # TRL's default weights are 1 each; the reference agrees term by term.
    d = make_batch(seed=8)
    np.testing.assert_allclose(np.asarray(losses.compute(["sigmoid", "sft"], beta=0.3, **kw)),
                               ref.sigmoid(d, 0.3) + ref.sft(d), rtol=1e-12)
    w_c, _ = losses.margin_weights(["sigmoid", "sft"], weights=[1.0, 2.0], beta=0.3, **kw)
    s_c, _ = losses.margin_weights("sigmoid", beta=0.3, **kw)
    np.testing.assert_allclose(np.asarray(w_c), np.asarray(s_c) + 2.0 / d["nw"], rtol=1e-12)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_jit_and_vmap_equal_eager(x64, name):
    kw = jnp_kwargs(make_batch(seed=9))
    options = OPTION_CASES[name][-1]
    eager = losses.compute(name, **kw, **options)
    jitted = jax.jit(functools.partial(losses.compute, name, **options))(**kw)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)
    # vmap over a leading axis of 2 batches of 4 equals computing each batch alone.
    stacked = {k: v.reshape(2, 4) for k, v in kw.items()}
    mapped = jax.vmap(lambda b: losses.compute(name, **b, **options))(stacked)
    looped = np.stack([np.asarray(losses.compute(name, **{k: v[i] for k, v in stacked.items()}, **options))
                       for i in range(2)])
    np.testing.assert_allclose(np.asarray(mapped), looped, rtol=1e-6, atol=1e-6)
    w_mapped = jax.vmap(lambda b: losses.margin_weights(name, **b, **options))(stacked)
    w_looped = [losses.margin_weights(name, **{k: v[i] for k, v in stacked.items()}, **options)
                for i in range(2)]
    np.testing.assert_allclose(np.asarray(w_mapped[0]), np.stack([np.asarray(w[0]) for w in w_looped]),
                               rtol=1e-5, atol=1e-6)
    if not losses.REGISTRY[name].couples_examples:
        # Per-example losses also vmap over the examples themselves (scalar inputs).
        per_example = jax.vmap(lambda b: losses.compute(name, **b, **options))(kw)
        np.testing.assert_allclose(np.asarray(per_example), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_jit_with_traced_options_and_beta():
    kw = jnp_kwargs(make_batch(seed=10), dtype=jnp.float32)
    f = jax.jit(lambda beta, eps, **b: losses.compute("robust", beta=beta, label_smoothing=eps, **b))
    np.testing.assert_allclose(np.asarray(f(0.2, 0.1, **kw)),
                               np.asarray(losses.compute("robust", beta=0.2, label_smoothing=0.1, **kw)),
                               rtol=1e-6)


# --- TRL's own code ---------------------------------------------------------------------------------

class _StubModel:
    """Stands in for the policy: returns per-token log-probs whose completion sums are the given logps."""

    training = True

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        import torch
        zeros = torch.zeros_like(self.per_token_logps)
        return types.SimpleNamespace(log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros_like(zeros, dtype=torch.bool))


def trl_dpo_batch_loss(loss_types, d, *, beta, weights=None, label_smoothing=0.0,
                       f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
                       float64=True) -> float:
    """TRL's ``DPOTrainer._compute_loss`` (batch mean) on precomputed reference log-probs.

    The trainer is built with ``object.__new__`` and only the attributes the method reads; the model is a
    stub whose per-token log-probs put s/|y| on each of the |y| completion positions.
    """
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    dtype = torch.float64 if float64 else torch.float32
    size = len(d["cw"])
    logps = np.concatenate([d["cw"], d["cl"]])
    lengths = np.concatenate([d["nw"], d["nl"]]).astype(int)
    seq = int(lengths.max()) + 2
    completion_mask = torch.zeros(2 * size, seq, dtype=torch.long)
    per_token = torch.zeros(2 * size, seq - 1, dtype=dtype)
    for i in range(2 * size):
        completion_mask[i, 1:1 + lengths[i]] = 1  # position 0 is the prompt
        per_token[i, :lengths[i]] = float(logps[i]) / lengths[i]
    trainer = object.__new__(DPOTrainer)
    trainer.model = _StubModel(per_token)
    trainer.accelerator = types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x,
                                                gather=lambda x: x)
    trainer.aux_loss_enabled = False
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.f_divergence_type = f_divergence_type
    trainer.f_alpha_divergence_coef = f_alpha_divergence_coef
    trainer.loss_types = list(loss_types)
    trainer.loss_weights = list(weights) if weights is not None else [1.0] * len(loss_types)
    trainer.label_smoothing = label_smoothing
    trainer.beta = beta
    trainer.use_weighting = False
    trainer.args = types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None)
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    inputs = {"input_ids": torch.zeros(2 * size, seq, dtype=torch.long),
              "attention_mask": torch.ones(2 * size, seq, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": torch.tensor(d["rw"], dtype=dtype),
              "ref_rejected_logps": torch.tensor(d["rl"], dtype=dtype)}
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))


def _trl_options(name, options):
    """Our options in TRL's argument names (TRL's exo_pair needs label_smoothing > 0 explicitly)."""
    out = dict(options)
    if name == "exo_pair":
        out.setdefault("label_smoothing", 1e-3)
    return out


def _select(d, idx):
    return {k: v[idx] for k, v in d.items()}


# TRL 1.16 has no bco_delta (δ = 0), and its sigmoid ignores label_smoothing (cDPO is checked against the
# NumPy reference and against CPOTrainer's sigmoid below).
TRL_CASES = [(name, i, opts) for name in TRL_DPO_TYPES for i, opts in enumerate(OPTION_CASES[name])
             if "bco_delta" not in opts and not (name == "sigmoid" and "label_smoothing" in opts)]


@pytest.mark.parametrize("name,case,options", TRL_CASES,
                         ids=[f"{n}-{i}" for n, i, _ in TRL_CASES])
def test_trl_dpo_trainer_loss_types(x64, name, case, options):
    pytest.importorskip("trl")
    d = make_batch(seed=300 + case + 7 * TRL_DPO_TYPES.index(name))
    beta = 0.3
    float64 = options.get("f_divergence_type") != "alpha_divergence"  # TRL's clamp table has no float64
    tol = dict(rtol=1e-9, atol=1e-9) if float64 else dict(rtol=2e-5, atol=2e-5)
    if name == "exo_pair":  # TRL builds ε as a float32 tensor
        tol = dict(rtol=1e-6, atol=1e-6)
    ours = np.asarray(losses.compute(name, beta=beta, **jnp_kwargs(d), **options))
    trl_options = _trl_options(name, options)
    if losses.REGISTRY[name].couples_examples:
        theirs = trl_dpo_batch_loss([name], d, beta=beta, float64=float64, **trl_options)
        np.testing.assert_allclose(ours.mean(), theirs, **tol)
        return
    # One example per call: TRL's per-sequence loss equals ours element by element.
    theirs = [trl_dpo_batch_loss([name], _select(d, slice(i, i + 1)), beta=beta, float64=float64,
                                 **trl_options) for i in range(len(d["cw"]))]
    np.testing.assert_allclose(ours, theirs, **tol)


def test_trl_sft_is_the_length_weighted_mean_of_ours(x64):
    pytest.importorskip("trl")
    d = make_batch(seed=11)
    ours = np.asarray(losses.compute("sft", **jnp_kwargs(d)))
    theirs = trl_dpo_batch_loss(["sft"], d, beta=0.1)
    np.testing.assert_allclose(np.sum(ours * d["nw"]) / np.sum(d["nw"]), theirs, rtol=1e-12)


def test_trl_mixture_with_loss_weights(x64):
    pytest.importorskip("trl")
    d = make_batch(seed=12)
    names, weights = ["sigmoid", "ipo", "apo_zero", "aot"], [0.8, 0.2, 1.0, 0.3]
    ours = np.asarray(losses.compute(names, weights=weights, beta=0.2, **jnp_kwargs(d))).mean()
    theirs = trl_dpo_batch_loss(names, d, beta=0.2, weights=weights)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def _cpo_trainer(loss_type, *, beta, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    trainer = object.__new__(CPOTrainer)
    trainer.loss_type, trainer.beta, trainer.label_smoothing = loss_type, beta, label_smoothing
    trainer.simpo_gamma, trainer.alpha = simpo_gamma, alpha
    trainer.accelerator = types.SimpleNamespace(device="cpu")
    return trainer


def test_trl_cpo_trainer_simpo_alphapo_cpo(x64):
    pytest.importorskip("trl")
    import torch
    d = make_batch(seed=13)
    kw = jnp_kwargs(d)
    # TRL's CPOTrainer feeds simpo per-token mean log-probs.
    mean_w, mean_l = torch.tensor(d["cw"] / d["nw"]), torch.tensor(d["cl"] / d["nl"])
    for opts in ({}, {"simpo_gamma": 1.0, "label_smoothing": 0.1}):
        theirs = _cpo_trainer("simpo", beta=2.0, **opts).cpo_loss(mean_w, mean_l)[0].numpy()
        np.testing.assert_allclose(np.asarray(losses.compute("simpo", beta=2.0, **kw, **opts)), theirs,
                                   rtol=1e-10)
    for opts in ({"alpha": 0.25}, {"alpha": -0.3, "simpo_gamma": 0.2, "label_smoothing": 0.1}):
        theirs = _cpo_trainer("simpo", beta=2.0, **opts).cpo_loss(mean_w, mean_l)[0].numpy()
        np.testing.assert_allclose(np.asarray(losses.compute("alphapo", beta=2.0, **kw, **opts)), theirs,
                                   rtol=1e-10)
    # CPO's preference term (its NLL is a cross-entropy TRL takes from the logits: checked by the reference).
    summed_w, summed_l = torch.tensor(d["cw"]), torch.tensor(d["cl"])
    theirs = _cpo_trainer("sigmoid", beta=0.1, label_smoothing=0.2).cpo_loss(summed_w, summed_l)[0].numpy()
    ours = losses.compute("cpo", beta=0.1, cpo_alpha=0.0, label_smoothing=0.2, **kw)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-10)


def test_trl_orpo_odds_ratio_loss(x64):
    pytest.importorskip("trl")
    import torch
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    d = make_batch(seed=14)
    trainer = object.__new__(ORPOTrainer)
    trainer.beta = 0.25
    trainer.accelerator = types.SimpleNamespace(device="cpu")
    ratio_term = trainer.odds_ratio_loss(torch.tensor(d["cw"] / d["nw"]), torch.tensor(d["cl"] / d["nl"]))[0]
    # TRL's loss is NLL − mean(β·log σ(log odds ratio)); its NLL is the chosen tokens' mean cross-entropy.
    # TRL casts the log-probs to float32 before the odds ratio, hence the tolerance.
    ours = np.asarray(losses.compute("orpo", beta=0.25, **jnp_kwargs(d)))
    np.testing.assert_allclose(ours, -d["cw"] / d["nw"] - ratio_term.numpy(), rtol=1e-6)


# --- errors -----------------------------------------------------------------------------------------

def _raises(match, fn, *args, **kwargs):
    with pytest.raises(LossError, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, JaxAlignError)
    return str(info.value)


def test_unknown_loss_name():
    msg = _raises("unknown loss 'dpo_typo'", losses.compute, "dpo_typo", **_pair(0.5))
    assert "sigmoid" in msg  # lists the known names
    _raises("unknown loss 'nope'", losses.compute, ["sigmoid", "nope"], **_pair(0.5))
    _raises("unknown loss", losses.margin_weights, "nope", **_pair(0.5))


def test_unknown_option_is_an_error_never_ignored():
    msg = _raises("loss 'sigmoid'.*unknown option 'simpo_gamma'", losses.compute, "sigmoid", simpo_gamma=0.5,
                  **_pair(0.5))
    assert "label_smoothing" in msg  # names the options it does take
    _raises("unknown option 'label_smoothin'", losses.compute, "robust", label_smoothin=0.1, **_pair(0.5))
    _raises("unknown option 'beta_typo'", losses.compute, ["sigmoid", "sft"], beta_typo=1, **_pair(0.5))
    _raises("unknown option 'label_smoothing'", losses.compute, "nca_pair", label_smoothing=0.1, **_pair(0.5))


def test_missing_reference_logprobs():
    kw = _pair(0.5)
    del kw["ref_chosen_logps"]
    _raises("loss 'sigmoid'.*'ref_chosen_logps'", losses.compute, "sigmoid", **kw)
    _raises("loss 'dpo_sft'.*'ref_chosen_logps'", losses.margin_weights, "dpo_sft", **kw)
    kw = _pair(0.5)
    kw["ref_rejected_logps"] = None
    _raises("loss 'ipo'.*'ref_rejected_logps'", losses.compute, ["simpo", "ipo"], **kw)
    # reference-free losses do not need them
    kw = {k: v for k, v in _pair(0.5).items() if not k.startswith("ref_")}
    for name in ("simpo", "cpo", "orpo", "slic", "alphapo", "sft"):
        losses.compute(name, **kw)


def test_missing_lengths():
    kw = {k: v for k, v in _pair(0.5).items() if "lengths" not in k}
    _raises("loss 'ipo'.*'chosen_lengths'", losses.compute, "ipo", **kw)
    _raises("loss 'simpo'.*'chosen_lengths'", losses.compute, "simpo", **kw)
    _raises("loss 'sft'.*'chosen_lengths'", losses.compute, ["sigmoid", "sft"], **kw)
    _raises("loss 'sigmoid_norm'.*'rejected_lengths'", losses.compute, "sigmoid_norm",
            chosen_lengths=jnp.array([3]), **kw)


def test_bad_option_values_and_weights():
    kw = _pair(0.5)
    _raises("loss 'exo_pair'.*'label_smoothing' must be in \\(0, 1\\)", losses.compute, "exo_pair",
            label_smoothing=0.0, **kw)
    _raises("loss 'robust'.*'label_smoothing' must be in \\[0, 0.5\\)", losses.compute, "robust",
            label_smoothing=0.5, **kw)
    _raises("'f_divergence_type' must be one of", losses.compute, "sigmoid", f_divergence_type="kl", **kw)
    _raises("loss 'nca_pair'.*'f_divergence_type'", losses.compute, ["sigmoid", "nca_pair"],
            f_divergence_type="forward_kl", **kw)
    _raises("'discopop_tau' must be > 0", losses.compute, "discopop", discopop_tau=0.0, **kw)
    _raises("argument 'weights'", losses.compute, ["sigmoid", "ipo"], weights=[1.0], **kw)
    _raises("argument 'beta'", losses.compute, "sigmoid", beta=0.0, **kw)
    _raises("empty", losses.compute, [], **kw)
    with pytest.raises(ValueError, match="same shape"):
        losses.compute("sigmoid", **{**kw, "rejected_logps": jnp.zeros(3)})


# --- registry, docs, CLI ----------------------------------------------------------------------------

def test_names_and_registry():
    assert set(TRL_DPO_TYPES) < set(ALL_NAMES)
    assert set(ALL_NAMES) == set(TRL_DPO_TYPES) | {"simpo", "cpo", "orpo", "rdpo", "dpop", "slic", "alphapo",
                                                    "dpo_sft"}
    assert tuple(losses.REGISTRY) == ALL_NAMES and len(set(ALL_NAMES)) == len(ALL_NAMES)
    assert set(OPTION_CASES) == set(ALL_NAMES)
    for name, spec in losses.REGISTRY.items():
        assert getattr(losses, name) is spec.fn
        for option in OPTION_CASES[name][-1]:
            assert option in spec.options, (name, option)
        doc = spec.fn.__doc__
        for section in ("Args:", "Returns:", "Examples:", ">>>", "References:", "[B]"):
            assert section in doc, (name, section)


def test_cli_losses_table(capsys):
    assert cli.main(["losses", "--table"]) == 0
    out = capsys.readouterr().out
    for name in ALL_NAMES:
        assert f"\n{name} " in out, name
    assert max(len(line) for line in out.splitlines()) <= 120
    sigmoid_row = next(line for line in out.splitlines() if line.startswith("sigmoid "))
    expected = math.log1p(math.exp(-0.1 * 0.5))  # default β = 0.1, margin 0.5
    w = 0.1 / (1 + math.exp(0.1 * 0.5))
    assert sigmoid_row.split()[-3:] == [f"{expected:.4g}", f"{w:.4g}", f"{w:.4g}"]


def test_cli_losses_without_table_and_with_margin(capsys):
    assert cli.main(["losses"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in ALL_NAMES)
    assert cli.main(["losses", "--table", "--margin", "0", "--beta", "0.5"]) == 0
    sigmoid_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sigmoid "))
    assert sigmoid_row.split()[-3] == f"{math.log(2):.4g}"


def test_cli_losses_rejects_an_impossible_example(capsys):
    assert cli.main(["losses", "--table", "--margin", "100"]) == 2  # s_w = -40 + 50 > 0
    assert "margin 100" in capsys.readouterr().err
    assert cli.main(["losses", "--table", "--beta", "-1"]) == 2
    assert "'beta'" in capsys.readouterr().err


# --- typed loss options (losses.check_options) ------------------------------------------------------

# The allowed values of every registered option, written out from the papers/TRL (not read from the
# registry): per option name, with the per-loss narrowings. (bad in-type values, good values).
_UNRANGED = ((), (-2.0, 0.0, 3))
_NONNEG_VALUES = ((-0.1, -5), (0.0, 2.5))
OPTION_VALUES = {
    "label_smoothing": ((-0.1, 1.5), (0.0, 0.3, 1.0)),
    "f_divergence_type": (("kl", "Reverse_KL", ""),
                          ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")),
    "f_alpha_divergence_coef": _UNRANGED,
    "bco_delta": _UNRANGED,
    "simpo_gamma": _UNRANGED,
    "alpha": _UNRANGED,
    "discopop_tau": ((0.0, -1.0), (0.01, 2)),
    "cpo_alpha": _NONNEG_VALUES, "rdpo_alpha": _NONNEG_VALUES, "dpop_lambda": _NONNEG_VALUES,
    "slic_delta": _NONNEG_VALUES, "slic_lambda": _NONNEG_VALUES, "sft_coeff": _NONNEG_VALUES,
}
PER_LOSS_VALUES = {
    ("exo_pair", "label_smoothing"): ((0.0, 1.0, -0.1), (1e-3, 0.5, 0.999)),  # EXO: ε in (0, 1)
    ("robust", "label_smoothing"): ((0.5, 0.7, -0.1), (0.0, 0.49)),  # rDPO divides by 1 − 2ε
}
OPTION_PAIRS = [(name, option) for name in ALL_NAMES for option in losses.REGISTRY[name].options]
NOT_NUMBERS = ("abc", "", True, None, [0.1], {"v": 1}, float("nan"), float("inf"), "-inf")


def _values(name, option):
    return PER_LOSS_VALUES.get((name, option), OPTION_VALUES[option])


def _config_error(match, loss, options, **kwargs):
    with pytest.raises(ConfigError, match=match) as info:
        losses.check_options(loss, options, **kwargs)
    assert isinstance(info.value, LossError)  # losses.compute raises the same error
    return str(info.value)


def test_every_registered_option_has_its_values_written_out():
    assert {o for _, o in OPTION_PAIRS} == set(OPTION_VALUES)
    assert set(PER_LOSS_VALUES) <= set(OPTION_PAIRS)


@pytest.mark.parametrize("name,option", OPTION_PAIRS, ids=[f"{n}-{o}" for n, o in OPTION_PAIRS])
def test_option_of_the_wrong_type_is_refused_naming_loss_and_option(name, option):
    is_name = isinstance(losses.REGISTRY[name].options[option], str)
    for value in ((0.5, 1, None, ["reverse_kl"]) if is_name else NOT_NUMBERS):
        msg = _config_error(f"loss '{name}': option '{option}' must be", name, {option: value})
        assert ("one of reverse_kl" if is_name else "a finite number") in msg, msg
        assert repr(value) in msg
        with pytest.raises(ConfigError, match=f"'{option}'"):  # compute applies the same check
            losses.compute(name, **_pair(0.5), **{option: value})


@pytest.mark.parametrize("name,option", OPTION_PAIRS, ids=[f"{n}-{o}" for n, o in OPTION_PAIRS])
def test_option_out_of_range_is_refused_and_in_range_is_typed(name, option):
    bad, good = _values(name, option)
    for value in bad:
        _config_error(f"loss '{name}': option '{option}' must be", name, {option: value})
    for value in good:
        typed = losses.check_options(name, {option: value})
        assert typed == {option: value} and type(typed[option]) is (str if isinstance(value, str) else float)
        if not isinstance(value, str):  # numeric text from a command line becomes the same number
            assert losses.check_options(name, {option: str(value)}) == {option: float(value)}


def test_numeric_text_gives_the_same_loss_as_the_number(x64):
    d = make_batch(seed=3)
    got = losses.compute("simpo", beta=0.5, simpo_gamma="1.2", label_smoothing="0.1", **jnp_kwargs(d))
    np.testing.assert_allclose(np.asarray(got), ref.reference("simpo", d, 0.5, simpo_gamma=1.2,
                                                              label_smoothing=0.1), rtol=1e-10)


def test_check_options_names_unknown_losses_and_options():
    msg = _config_error("--loss: unknown loss 'simpoo'", "simpoo", {}, key="--loss")
    assert "simpo" in msg
    _config_error(r"loss.name\[1\]: unknown loss 'nope'", ["sigmoid", "nope"], {}, key="loss.name")
    _config_error("loss 'sigmoid': unknown option 'simpo_gamma'", "sigmoid", {"simpo_gamma": 0.5})
    _config_error("'f_divergence_type'='js_divergence' is not supported", ["sigmoid", "dpop"],
                  {"f_divergence_type": "js_divergence"})
    # a mixture: each option is checked by the losses that declare it
    assert losses.check_options(["sigmoid", "sft"], {"label_smoothing": 0}) == {"label_smoothing": 0.0}
    _config_error("loss 'robust': option 'label_smoothing' must be in", ["sigmoid", "robust"],
                  {"label_smoothing": 0.7})


def test_cli_entangle_bad_loss_option_exits_2_before_loading_the_model(tmp_path, capsys):
    # The model path does not exist: a message about the option proves it is checked first.
    argv = ["entangle", "--model", str(tmp_path / "no_model"), "--data", str(tmp_path / "no.jsonl"),
            "--out", str(tmp_path / "out"), "--loss", "simpo", "--loss-option", "simpo_gamma=abc"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "loss 'simpo': option 'simpo_gamma' must be a finite number, got 'abc'" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(argv[:-1] + ["simpo_gamma=0.3", "--loss-option", "label_smoothing=2"]) == 2
    assert "option 'label_smoothing' must be in [0, 1], got 2" in capsys.readouterr().err


def test_cli_probe_bad_loss_option_exits_2_before_loading(tmp_path, capsys):
    argv = ["probe", "--checkpoints", str(tmp_path / "no_ckpt"), "--data", str(tmp_path / "no.jsonl"),
            "--out", str(tmp_path / "out"), "--loss", "dpop", "--loss-option", "dpop_lambda=-1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "option 'dpop_lambda' must be >= 0" in err


def test_cli_train_override_bad_loss_option_exits_2_before_loading(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{path: {tmp_path / 'no_model'}}}\ndata: {{train: {tmp_path / 'no.jsonl'}}}\n"
                    f"output_dir: {tmp_path / 'run'}\nloss: {{name: simpo}}\n")
    assert cli.main(["train", str(path), "loss.options={simpo_gamma: abc}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "loss 'simpo': option 'simpo_gamma' must be a finite number, got 'abc'" in err
    assert not (tmp_path / "run").exists()
    assert cli.main(["train", str(path), "loss.name=[sigmoid, {name: sft}]",
                     "loss.options={label_smoothing: '1.5'}"]) == 2
    assert "loss 'sigmoid': option 'label_smoothing' must be in [0, 1], got '1.5'" in capsys.readouterr().err


def test_online_config_checks_loss_options():
    from jaxalign.online import config as online_config

    with pytest.raises(ConfigError, match="option 'cpo_alpha' must be >= 0"):
        online_config.from_dict({"model": {"path": "m"}, "prompts": {"source": "synthetic:x"},
                                 "loss": {"name": "cpo", "options": {"cpo_alpha": -1}}})
