"""Per-pair telemetry of the train step (issue 19 items 1 and 3).

The step's per-pair geometry (computed from its own forward and backward pass) is checked in float64 on a
tiny llama against ``make_pair_grads(method="exact")`` (materialised per-pair gradients) and a brute-force
``jax.grad`` per pair side; its log-probs against ``step.pair_logps``; its update against the plain step's
(telemetry off); also with a parameter regex, with LoRA and with gradient accumulation. Then the loop: the
table survives an interrupted and resumed run without duplicates, and the alarm and
``train.stop_on_displacement`` act on a constructed case.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from test_train import PAIRS  # noqa: E402  (the trainer tests' 8 pairs)
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign import pairs  # noqa: E402
from jaxalign.analysis import entanglement as ent  # noqa: E402
from jaxalign.models import lora  # noqa: E402
from jaxalign.train import loop, optim  # noqa: E402
from jaxalign.train.checkpoint import Checkpointer  # noqa: E402
from jaxalign.train import config as config_lib  # noqa: E402
from jaxalign.train import step as step_lib  # noqa: E402
from jaxalign.train import telemetry  # noqa: E402

VOCAB = 64
BETA = 0.5
FAST = {"xla_backend_optimization_level": "0"}  # compile time only; numerics unchanged


def _batch(rng):
    """4 pairs: prompts left-padded to 6, responses right-padded to 5 (mixed lengths, EOS = 2 last)."""
    B, P, R = 4, 6, 5
    out = {k: np.zeros((B, P if k.startswith("prompt") else R), np.int32) for k in step_lib.BATCH_KEYS}
    for b, (p, c, r) in enumerate(((4, 3, 5), (6, 5, 2), (2, 1, 4), (5, 4, 4))):
        out["prompt_ids"][b, P - p:], out["prompt_mask"][b, P - p:] = rng.integers(3, VOCAB, p), 1
        for name, n in (("chosen", c), ("rejected", r)):
            out[f"{name}_ids"][b, :n] = list(rng.integers(3, VOCAB, n - 1)) + [2]
            out[f"{name}_mask"][b, :n] = 1
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tele") / "llama", vocab_size=VOCAB, pad_token_id=0,
                     eos_token_id=2, bos_token_id=1, max_position_embeddings=64)


def _model(path, lora_on=False):
    from jaxalign.models import load_pretrained

    model = load_pretrained(path, dtype=jnp.float64)[0]
    if lora_on:
        lora.apply(model, lora.LoRASettings(target="all", r=2, alpha=4.0), seed=0)
    return model


def _perturbed(params, seed):
    """Non-zero LoRA B matrices (fresh adapters start at B = 0, which would make ∇A vanish)."""
    leaves, tdef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tdef, [x + 0.05 * rng.standard_normal(x.shape) for x in leaves])


def _run_step(parts, params, batch, spec, rest):
    cfg = config_lib.OptimConfig(name="sgd", lr=1.0)
    opt, sched = optim.make_optimizer(cfg, 10), optim.make_schedule(cfg, 10)
    state = step_lib.init_state(opt, jax.tree.map(jnp.copy, params), None, None)
    fn = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=opt, schedule=sched, state_shardings=None,
                                 batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)
    new, metrics = fn(state, batch, rest, None)
    update = jax.tree.map(lambda a, p: np.asarray(a) - np.asarray(p), new.params, params)
    return update, jax.tree.map(np.asarray, metrics)


def _brute(parts, params, rest, batch, regex):
    """Per pair and side, ∇ s by ``jax.grad`` of a full-row forward (``sequence_forward`` of the row
    ``[prompt | response]``, padding inside), flattened over the parameters whose dotted names match
    ``regex``: ``(g [B, 2, n], s [B, 2])``."""
    names = [ent.leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    keep = ent.select(names, regex)

    @jax.jit
    def grad(p, ids, mask, plen):
        def s_of(p_):
            return pairs.sequence_forward(parts.merge(p_, rest), ids, mask, plen)["logps"][0]
        val, g = jax.value_and_grad(s_of)(p)
        leaves = jax.tree.leaves(g)
        return val, jnp.concatenate([jnp.ravel(leaves[i]) for i in keep])

    g, s = [], []
    for b in range(batch["prompt_ids"].shape[0]):
        plen = jnp.asarray([int(batch["prompt_mask"][b].sum())])
        row = [grad(params, jnp.asarray(np.concatenate([batch["prompt_ids"][b], batch[f"{side}_ids"][b]]))[None],
                    jnp.asarray(np.concatenate([batch["prompt_mask"][b], batch[f"{side}_mask"][b]]))[None], plen)
               for side in ("chosen", "rejected")]
        g.append([np.asarray(r[1]) for r in row])
        s.append([float(r[0]) for r in row])
    return np.asarray(g), np.asarray(s)


@pytest.mark.parametrize("case", ["all", "regex_accum", "lora"])
def test_step_geometry_equals_exact_and_update_unchanged(llama, case):
    with jax.enable_x64(True):
        model = _model(llama, lora_on=case == "lora")
        parts, params = step_lib.ModelParts.split(model, lora.LoRAParam if case == "lora" else nnx.Param)
        if case == "lora":
            params = _perturbed(params, 1)
        batch = _batch(np.random.default_rng(0))
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch["ref_chosen_logps"] = jnp.array([-12.0, -20.0, -3.0, -15.0])
        batch["ref_rejected_logps"] = jnp.array([-18.0, -6.0, -16.0, -15.0])
        regex = r"(mlp\.down_proj|attn\.[qv]_proj|norm)" if case == "regex_accum" else None
        A = 2 if case == "regex_accum" else 1
        base = dict(names=("sigmoid",), weights=None, beta=BETA, sft_coeff=0.2, grad_accum=A)
        up_off, m_off = _run_step(parts, params, batch, step_lib.Objective(**base), parts.rest)
        spec = step_lib.Objective(**base, telemetry=True, telemetry_params=regex)
        up_on, m_on = _run_step(parts, params, batch, spec, parts.rest)
        got = m_on.pop("pairs")
        # Tolerances: the log-softmax runs in float32 even over float64 weights (logprobs.py), chunked
        # in the plain step and brute force, whole in the telemetry pass, so those comparisons carry
        # float32 rounding (~1e-7 relative per log-prob and in its backward pass, 1e-5 leaves 100×),
        # also against make_pair_grads(exact), whose float32 log-softmax rounds in other places.
        # SGD at lr 1: the update is the gradient; bounded by each leaf's scale
        for a, b in zip(jax.tree.leaves(up_on), jax.tree.leaves(up_off)):
            assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-30)
        for k in step_lib.METRIC_NAMES + ("grad_norm",):
            np.testing.assert_allclose(m_on[k], m_off[k], rtol=1e-5, atol=1e-7, err_msg=k)
        lp = step_lib.pair_logps(parts.merge(params, parts.rest), batch)
        np.testing.assert_allclose(got["logp_chosen"], lp["chosen_logps"], rtol=1e-6)
        np.testing.assert_allclose(got["logp_rejected"], lp["rejected_logps"], rtol=1e-6)
        np.testing.assert_allclose(got["ref_logp_chosen"], batch["ref_chosen_logps"])
        # geometry against brute force (per-side jax.grad of full rows) and the exact entangle method
        # (with LoRA the trained params are the adapters alone: brute force differentiates just them)
        g, s = _brute(parts, params, parts.rest, {k: np.asarray(v) for k, v in batch.items()}, regex)
        sq_w, sq_l, dot = (g[:, 0] ** 2).sum(1), (g[:, 1] ** 2).sum(1), (g[:, 0] * g[:, 1]).sum(1)
        scale = np.sqrt(sq_w * sq_l)
        np.testing.assert_allclose(got["grad_sq_chosen"], sq_w, rtol=1e-5)
        np.testing.assert_allclose(got["grad_sq_rejected"], sq_l, rtol=1e-5)
        assert np.max(np.abs(got["grad_dot"] - dot) / scale) < 1e-5  # relative to ‖g_w‖‖g_l‖
        np.testing.assert_allclose(got["grad_cos"], dot / scale, atol=1e-5)
        # margin weight and case: DPO+SFT by hand, βσ(−βΔ) (+0.2 on the chosen side only)
        delta = (s[:, 0] - np.asarray(batch["ref_chosen_logps"])) - (s[:, 1] - np.asarray(batch["ref_rejected_logps"]))
        w = BETA / (1 + np.exp(BETA * delta))
        np.testing.assert_allclose(got["margin_weight"], w + 0.1, rtol=1e-6)
        dw, dl = (w + 0.2) * sq_w - w * dot, (w + 0.2) * dot - w * sq_l
        want_case = np.where(dw >= 0, np.where(dl <= 0, 0, 2), np.where(dl <= 0, 1, 3))
        np.testing.assert_array_equal(got["predicted_case"], want_case)
        if case != "all":  # the exact method once (brute force is the reference of every case)
            return
        exact = ent.make_pair_grads(parts.merge(params, parts.rest), method="exact",
                                    params="lora" if case == "lora" else regex, compiler_options=FAST)(batch)
        np.testing.assert_allclose(got["grad_sq_chosen"], exact.grad_chosen_sqnorm, rtol=1e-5)
        np.testing.assert_allclose(got["grad_sq_rejected"], exact.grad_rejected_sqnorm, rtol=1e-5)
        assert np.max(np.abs(got["grad_dot"] - exact.grad_inner) / scale) < 1e-5


# --- the alarm, the table, the stop rule -------------------------------------------------------------------

def test_alarm_on_constructed_pairs_and_streak():
    """By hand: pair 0 lost log π(y+) while its margin rose; pair 1 gained both; pair 2 lost y+ but its
    margin fell too; pair 3 is fine on log-probs but predicted both_down; a NaN reference never fires."""
    c, r = np.array([-11.0, -9.0, -12.0, -9.0, -5.0]), np.array([-30.0, -25.0, -10.0, -25.0, -6.0])
    rc, rr = np.array([-10.0, -10.0, -10.0, -10.0, np.nan]), np.full(5, -20.0)
    np.testing.assert_array_equal(telemetry.alarm(c, r, rc, rr), [True, False, False, False, False])
    # Before any update the policy equals the reference up to float32 rounding between two programs:
    # a fall and a rise of 1e-5 nats (below NOISE_NATS) are noise, not displacement; 1e-2 nats is not.
    for delta, expected in ((1e-5, False), (1e-2, True)):
        got = telemetry.alarm([-10.0 - delta], [-20.0 - 2 * delta], [-10.0], [-20.0])
        np.testing.assert_array_equal(got, [expected])
    case = np.array([0, 0, 0, ent.CASES.index("both_down"), 0])
    np.testing.assert_array_equal(telemetry.alarm(c, r, rc, rr, case), [True, False, False, True, False])
    got = telemetry.summarize({"logp_chosen": c, "predicted_case": case, "grad_cos": np.arange(5.0)},
                              telemetry.alarm(c, r, rc, rr, case))
    assert got["displacement/alarm_pairs"] == 2 and got["displacement/alarm_frac"] == 0.4
    assert got["telemetry/case_both_down_frac"] == 0.2 and got["telemetry/grad_cos_mean"] == 2.0
    s = 0
    for frac in (0.6, 0.7, 0.2, 0.6):
        s = telemetry.streak(s, frac, 0.5)
    assert s == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tele_run")
    folder = make_tiny("llama", root / "llama", vocab_size=272, pad_token_id=3, eos_token_id=2, bos_token_id=4,
                       max_position_embeddings=128)
    make_tiny_tokenizer(folder)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return {"model": folder, "data": data, "root": root}


def _run_cfg(tiny, out: Path, **sections):
    raw = {"model": {"path": str(tiny["model"])}, "data": {"train": str(tiny["data"]), "shuffle": False},
           "optim": {"name": "sgd", "lr": 2.0}, "train": {"batch_size": 4, "steps": 4}, "mesh": {"data": 1},
           "intervals": {"probe": None, "ledger": None, "checkpoint": 2},
           "checkpoint": {"export": False, "async_save": False}, "telemetry": {"pairs": True},
           "output_dir": str(out), "cache_dir": str(tiny["root"] / "ref_cache")}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config_lib.from_dict(raw)


def test_table_survives_an_interrupted_and_resumed_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    cfg = _run_cfg(tiny_run, out)
    loop.train(cfg, progress=False, stop_after=3)  # checkpoints 2 and 3
    first = telemetry.read_table(out)
    assert list(first.columns) == list(telemetry.COLUMNS) and len(first) == 12
    shutil.rmtree(out / "checkpoints" / "3")  # as if the run died after writing step 3's rows
    loop.train(cfg, resume=True, progress=False)  # restores step 2, redoes 3, then 4
    table = telemetry.read_table(out)
    assert not table.duplicated(["step", "pair_id"]).any()
    assert table.groupby("step").size().to_dict() == {1: 4, 2: 4, 3: 4, 4: 4}
    # without shuffling, steps 1 and 2 are pairs 0-3 and 4-7 of the file (epoch 2 repeats them)
    assert table[table.step == 2].pair_id.tolist() == [4, 5, 6, 7]
    # step 3 again from the same checkpoint by the same program: the same numbers
    pd.testing.assert_frame_equal(table[table.step <= 3].reset_index(drop=True), first)
    assert set(table.predicted_case) <= set(ent.CASES) and np.all(np.isfinite(table.grad_cos))
    # step 1: the policy is the reference (cached from the same weights; float32: 1e-4 of |log π|)
    one = table[table.step == 1]
    np.testing.assert_allclose(one.logp_chosen, one.ref_logp_chosen, rtol=1e-4)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {m["step"]: m for m in lines if "loss" in m}
    for st in (1, 2, 3, 4):
        rows = table[table.step == st]
        assert by_step[st]["displacement/alarm_pairs"] == int(rows.alarm.sum())
        np.testing.assert_allclose(by_step[st]["telemetry/grad_cos_mean"], rows.grad_cos.mean(), rtol=1e-12)
        frac = (rows.predicted_case == "ideal").mean()
        np.testing.assert_allclose(by_step[st]["telemetry/case_ideal_frac"], frac)


def test_stop_on_displacement_stops_with_a_checkpoint(tiny_run, tmp_path):
    """``frac: 0``: the first step whose alarm fires on any pair stops the run, with its checkpoint."""
    out = tmp_path / "run"
    cfg = _run_cfg(tiny_run, out, train={"steps": 8, "stop_on_displacement": {"steps": 1, "frac": 0.0}},
                   intervals={"checkpoint": None})
    with pytest.raises(telemetry.DisplacementStop, match=r"train\.stop_on_displacement: ") as err:
        loop.train(cfg, progress=False)
    assert err.value.exit_code == telemetry.EXIT_CODE == 3
    table = telemetry.read_table(out)
    fired = sorted(set(table[table.alarm].step))
    assert fired, "the constructed run raises no alarm"
    last = int(table.step.max())  # the step dispatched while the alarm's step was read (dispatch-ahead)
    assert last in (fired[0], fired[0] + 1) and last < 8
    assert f"up to step {fired[0]} " in str(err.value) and f"stopped after step {last} " in str(err.value)
    assert Checkpointer(out / "checkpoints", read_only=True).latest_step() == last
    with pytest.raises(config_lib.ConfigError, match=r"train\.stop_on_displacement"):
        _run_cfg(tiny_run, out, train={"stop_on_displacement": {"steps": 0}})
