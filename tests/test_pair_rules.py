"""Issue 19 items 2 and 4: CHES in the reference pass, ``data.filter`` / ``data.weights``, per-pair mitigations.

* the reference pass's CHES / LN-CHES equal the ``jaxalign ches`` job's and a float64 computation from
  ``transformers``' hidden states; a cache entry without them is recomputed;
* ``data.filter`` drops exactly the top fraction by an independently computed score, and says so;
* the objective with per-pair weight / SFT / DPOP equals a float64 NumPy computation of the formula;
* on a tiny model, a pair whose log π(y+) falls under plain DPO (measured in the same test) does not fall
  when its rule routes it to the SFT anchor or to DPOP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign.errors import ConfigError  # noqa: E402
from jaxalign.train import config, loop, pair_rules  # noqa: E402
from jaxalign.train import step as step_lib  # noqa: E402

VOCAB = 272
# Two pairs whose responses differ only at the end (high LN-CHES: Razin et al.'s displacement case) and
# two that differ throughout; then four more for the filter.
PAIRS = [
    {"prompt": "q1?\n", "chosen": "the cat sat", "rejected": "the cat sat."},
    {"prompt": "q2?\n", "chosen": "yes indeed", "rejected": "yes indeed!"},
    {"prompt": "q3?\n", "chosen": "blue", "rejected": "no way at all"},
    {"prompt": "q4?\n", "chosen": "1 2 3", "rejected": "xyz"},
    {"prompt": "hello there\n", "chosen": "fine thanks", "rejected": "go away"},
    {"prompt": "what is 2+2?\n", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "spell cat\n", "chosen": "c-a-t", "rejected": "k-a-t"},
    {"prompt": "count\n", "chosen": "1 2 3", "rejected": "1 2"},
]

pytestmark = pytest.mark.usefixtures("compile_cache")  # conftest: equal programs compile once


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair_rules")
    model = make_tiny("llama", root / "llama", vocab_size=VOCAB, pad_token_id=3, eos_token_id=2, bos_token_id=4,
                      max_position_embeddings=128)
    make_tiny_tokenizer(model)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(r, w=0.5 + i)) + "\n" for i, r in enumerate(PAIRS)))
    head = root / "head.jsonl"
    head.write_text("".join(json.dumps(r) + "\n" for r in PAIRS[:4]))
    return {"root": root, "model": model, "data": data, "head": head}


def _raw(tiny, out, **sections) -> dict:
    raw = {"model": {"path": str(tiny["model"])},
           "data": {"train": str(tiny["data"]), "probe_size": 4, "shuffle": False},
           "optim": {"name": "sgd", "lr": 0.05}, "train": {"batch_size": 2, "steps": 1}, "mesh": {"data": 1},
           "intervals": {"probe": None, "ledger": None, "checkpoint": None},
           "checkpoint": {"export": False, "async_save": False},
           "output_dir": str(out), "cache_dir": str(tiny["root"] / "ref_cache")}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _hf_scores(model_dir, tokens) -> dict[str, np.ndarray]:
    """CHES and LN-CHES in float64 NumPy from ``transformers``' final hidden states (after the last norm),
    one pair at a time, unpadded: S(y) = Σ of the rows that predict y's tokens (Razin et al. Def. 2–3)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    S, n = {"c": [], "r": []}, {"c": [], "r": []}
    with torch.no_grad():
        for i in range(len(tokens)):
            p = list(tokens.prompt[i])
            for side, y in (("c", list(tokens.chosen[i])), ("r", list(tokens.rejected[i]))):
                h = hf(input_ids=torch.tensor([p + y]), output_hidden_states=True).hidden_states[-1][0]
                rows = h.double().numpy()[len(p) - 1:-1]
                S[side].append(rows.sum(0))
                n[side].append(len(rows))
    sp, sm = np.stack(S["c"]), np.stack(S["r"])
    np_, nm = np.array(n["c"], np.float64), np.array(n["r"], np.float64)
    ip, sq = (sp * sm).sum(1), (sp * sp).sum(1)
    return {"ches": ip - sq, "ln_ches": ip / (np_ * nm) - sq / np_ ** 2, "scale": np.abs(ip) + sq,
            "ln_scale": (np.abs(ip) + sq) / np_ ** 2}


def _cache_entries(tiny) -> list[dict]:
    from jaxalign.data import cache as data_cache

    return [data_cache.load(str(p))[0] for p in sorted((tiny["root"] / "ref_cache").glob("*.npz"))]


# --- rules and config ----------------------------------------------------------------------------------

def test_rules_parse_evaluate_and_errors(tmp_path, capsys):
    scores = {"ln_ches": np.array([0.1, 0.5, 0.3, 0.9]), "ches": np.array([1.0, -1.0, 2.0, 0.0])}
    rule = pair_rules.parse_rule("ln_ches > q0.5 and ches >= 0", "x")
    # q0.5 of [0.1, 0.3, 0.5, 0.9] is 0.4 (linear interpolation)
    assert rule.mask(scores).tolist() == [False, False, False, True]
    assert pair_rules.parse_rule("ches<-0.5", "x").mask(scores).tolist() == [False, True, False, False]
    for bad, match in [({"mitigations": [{"rule": "lnches > 1", "action": "sft", "coeff": 1}]},
                        r"mitigations\[0\]\.rule: unknown score 'lnches'"),
                       ({"mitigations": [{"rule": "ches > q1.5", "action": "sft", "coeff": 1}]},
                        r"mitigations\[0\]\.rule: .*quantile"),
                       ({"mitigations": [{"rule": "ches = 1", "action": "sft", "coeff": 1}]},
                        r"mitigations\[0\]\.rule: cannot read"),
                       ({"mitigations": [{"rule": "ches > 1", "action": "boost", "coeff": 1}]},
                        r"mitigations\[0\]\.action"),
                       ({"mitigations": [{}, {"rule": "ches > 1", "action": "weight"}]}, r"mitigations\[0\]\.action"),
                       ({"mitigations": [{"rule": "ches > 1", "action": "weight", "coeff": -1}]},
                        r"mitigations\[0\]\.coeff"),
                       ({"data": {"filter": {"score": "ln_ches", "drop_top": 1.5}}}, r"data\.filter\.drop_top"),
                       ({"data": {"filter": {"score": "lnches", "drop_top": 0.1}}}, r"data\.filter\.score"),
                       ({"data": {"filter": {"score": "ln_ches", "top": 0.1}}}, r"data\.filter\.top"),
                       ({"data": {"weights": {"rule": "ches > 0"}}}, r"data\.weights"),
                       ({"data": {"filter": {"score": "ches", "max": 0}, "shared_prompt": False}},
                        r"data\.shared_prompt")]:
        with pytest.raises(ConfigError, match=match):
            config.from_dict(bad)
    from jaxalign.errors import DataError

    with pytest.raises(DataError, match=r"record 1, field 'w': data.weights: must be a finite number >= 0"):
        pair_rules.column_weights([{"w": 1.0}, {"w": -2}], "w", {"index": np.array([0, 1])})
    from jaxalign import cli

    path = tmp_path / "run.yaml"
    path.write_text("model: {path: m}\ndata: {train: d.jsonl}\n")
    assert cli.main(["train", str(path), "mitigations=[{rule: 'ches >> 1', action: sft, coeff: 1}]"]) == 2
    assert "mitigations[0].rule: cannot read 'ches >> 1'" in capsys.readouterr().err


def test_objective_with_per_pair_mitigations_equals_float64_numpy():
    rng = np.random.default_rng(0)
    B, beta, sft_coeff = 6, 0.3, 0.05
    lp = {"chosen_logps": rng.normal(-20, 3, B), "rejected_logps": rng.normal(-22, 3, B),
          "chosen_lengths": np.full(B, 5.0), "rejected_lengths": np.full(B, 6.0)}
    refs = {"ref_chosen_logps": lp["chosen_logps"] + np.array([-1.0, 2.0, 3.0, 1.5, -2.0, 0.5]),
            "ref_rejected_logps": lp["rejected_logps"] + rng.normal(0, 2, B),
            "pair_weight": np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.0]),
            "sft_weight": np.array([0.0, 1.0, 0.3, 0.0, 0.0, 0.7]),
            "dpop_lambda": np.array([0.0, 0.0, 5.0, 50.0, 1.0, 0.0])}
    # float64 NumPy: ℓ_i = −log σ(β(Δ_i − λ_i·max(0, s_w^ref − s_w))) (λ = 0: DPO), plus c_i·(−s_w),
    # times w_i; loss = mean_i(w_i(ℓ_i + c_i(−s_w))) + sft_coeff · mean_i(w_i(−s_w)).
    s_w, s_l, r_w, r_l = (np.asarray(x, np.float64) for x in (lp["chosen_logps"], lp["rejected_logps"],
                                                              refs["ref_chosen_logps"], refs["ref_rejected_logps"]))
    w, c, lam = refs["pair_weight"], refs["sft_weight"], refs["dpop_lambda"]
    z = beta * ((s_w - r_w) - (s_l - r_l) - lam * np.maximum(0.0, r_w - s_w))
    ell = np.log1p(np.exp(-z))
    expected = np.mean(w * (ell - c * s_w)) + sft_coeff * np.mean(w * -s_w)
    assert np.any((r_w > s_w) & (lam > 0)), "the DPOP penalty must be active on some pair"
    spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=beta, sft_coeff=sft_coeff)
    as32 = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}  # noqa: E731
    for fn in (step_lib.weighted_objective, jax.jit(step_lib.weighted_objective, static_argnums=0)):
        loss, metrics = fn(spec, as32(lp), as32(refs))
        # float32 inputs of size ~20 and a sum of 6 terms: 1e-6 relative
        np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
        # the reward metrics describe the pairs, unweighted
        np.testing.assert_allclose(float(metrics["rewards/margins"]), beta * np.mean((s_w - r_w) - (s_l - r_l)),
                                   rtol=1e-5)
    # the gradient with respect to s_w, against the derivative of the same formula
    grad = jax.grad(lambda c_: step_lib.weighted_objective(spec, dict(as32(lp), chosen_logps=c_), as32(refs))[0])(
        jnp.asarray(lp["chosen_logps"], jnp.float32))
    dz = beta * (1.0 + lam * (r_w > s_w))
    expected_grad = (w * (-dz / (1.0 + np.exp(z)) - c) - sft_coeff * w) / B
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)
    # without the arrays the objective is the plain one
    plain, _ = step_lib.weighted_objective(spec, as32(lp), as32({k: refs[k] for k in step_lib.REF_KEYS}))
    z0 = beta * ((s_w - r_w) - (s_l - r_l))
    np.testing.assert_allclose(float(plain), np.mean(np.log1p(np.exp(-z0))) + sft_coeff * np.mean(-s_w), rtol=1e-6)


# --- the reference pass and the filter -----------------------------------------------------------------

def test_reference_pass_ches_equals_job_and_float64_and_filter_drops_top(tiny, tmp_path):
    import pyarrow.parquet as pq

    from jaxalign.jobs.ches import run_ches

    out = tmp_path / "run"
    cfg = config.from_dict(_raw(tiny, out, data={"filter": {"score": "ln_ches", "drop_top": 0.25}}))
    summary = loop.train(cfg, progress=False)
    assert summary["steps"] == 1
    # the cache entry of the training set holds the scores of all 8 pairs, in token order
    entry = next(e for e in _cache_entries(tiny) if "ln_ches" in e and len(e["index"]) == len(PAIRS))
    from jaxalign import models

    _, tok = models.load_pretrained(tiny["model"])
    tokens = loop.load_tokens(str(tiny["data"]), tok, cfg.data)
    assert entry["index"].tolist() == list(range(len(PAIRS)))
    ref = _hf_scores(tiny["model"], tokens)
    # float32 forward vs float32 transformers, summed in float64: 1e-4 of the terms' size
    np.testing.assert_allclose(entry["ches"], ref["ches"], rtol=1e-4, atol=1e-4 * ref["scale"].max())
    np.testing.assert_allclose(entry["ln_ches"], ref["ln_ches"], rtol=1e-4, atol=1e-4 * ref["ln_scale"].max())
    # the `jaxalign ches` job on the same pairs (another program: the same float32 tolerance)
    run_ches(str(tiny["model"]), str(tiny["data"]), str(tmp_path / "ches"), progress=False, batch_size=3)
    table = pq.read_table(tmp_path / "ches" / "scores.parquet").to_pandas().sort_values("index")
    np.testing.assert_allclose(entry["ches"], table["ches"], rtol=1e-4, atol=1e-4 * ref["scale"].max())
    np.testing.assert_allclose(entry["ln_ches"], table["ln_ches"], rtol=1e-4, atol=1e-4 * ref["ln_scale"].max())
    # data.filter drops exactly the top 2 (round(0.25 · 8)) by the independent float64 LN-CHES
    top = set(np.argsort(ref["ln_ches"])[-2:].tolist())
    assert np.sort(ref["ln_ches"])[-3] < np.sort(ref["ln_ches"])[-2] - 1e-3, "no tie at the cut"
    dropped = _jsonl(out / "filtered.jsonl")
    assert {d["index"] for d in dropped} == top
    assert all(d["reason"] == "data.filter: ln_ches in the top 0.25" for d in dropped)
    np.testing.assert_allclose([d["ln_ches"] for d in dropped], ref["ln_ches"][[d["index"] for d in dropped]],
                               rtol=1e-4, atol=1e-4 * ref["ln_scale"].max())
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "data/pairs_kept": 6, "data/pairs_dropped": 2, "data/pairs_mitigated": 0}
    run = loop.setup(config.from_dict(_raw(tiny, tmp_path / "again", data={"filter": {"score": "ln_ches",
                                                                                       "drop_top": 0.25}})))
    assert sorted(run.sets["train"].provenance["index"].tolist()) == sorted(set(range(8)) - top)


def test_old_cache_entry_without_scores_is_recomputed(tiny, tmp_path):
    from jaxalign.data import cache as data_cache

    raw = _raw(tiny, tmp_path / "a", data={"train": str(tiny["head"]), "filter": {"score": "ches", "max": 1e9}},
               cache_dir=str(tmp_path / "rc"))
    loop.setup(config.from_dict(raw))
    (path,) = [p for p in (tmp_path / "rc").glob("*.npz") if len(data_cache.load(str(p))[0]["index"]) == 4]
    arrays, meta = data_cache.load(str(path))
    assert "ches" in arrays
    # an entry as an older jaxalign wrote it: log-probs only
    data_cache.save(str(path), {k: arrays[k] for k in ("ref_chosen_logps", "ref_rejected_logps", "index")}, meta)
    run = loop.setup(config.from_dict(dict(raw, output_dir=str(tmp_path / "b"))))
    again = data_cache.load(str(path))[0]
    for k in ("ches", "ln_ches", "ref_chosen_logps"):  # recomputed by the same program: equal
        np.testing.assert_array_equal(again[k], arrays[k])
    np.testing.assert_array_equal(run.sets["train"].scores["ches"], arrays["ches"].astype(np.float64))


def test_empty_after_filter_and_weights_column(tiny, tmp_path, capsys):
    raw = _raw(tiny, tmp_path / "empty", data={"filter": {"score": "ref_chosen_logps", "min": 0.0}})
    with pytest.raises(ConfigError, match=r"data\.filter: every one of the 8 training pairs is dropped"):
        loop.setup(config.from_dict(raw))
    assert len(_jsonl(tmp_path / "empty" / "filtered.jsonl")) == 8  # log-probs are < 0: all below min 0
    from jaxalign import cli

    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(dict(raw, output_dir=str(tmp_path / "empty2"))))
    assert cli.main(["train", str(path), "--no-progress"]) == 2
    assert "every one of the 8 training pairs is dropped" in capsys.readouterr().err
    # data.weights: a record column, times a rule's weight, carried per pair
    raw = _raw(tiny, tmp_path / "w", data={"weights": "w"},
               mitigations=[{"rule": "rejected_length > q0.5", "action": "weight", "coeff": 0.1}])
    run = loop.setup(config.from_dict(raw))
    t = run.sets["train"]
    lengths = np.asarray(t.tokens.rejected.lengths, np.float64)
    expected = (0.5 + np.arange(8)) * np.where(lengths > np.quantile(lengths, 0.5), 0.1, 1.0)
    np.testing.assert_allclose(t.pair_arrays["pair_weight"], expected, rtol=1e-6)
    batch, _ = loop._train_batch(run, np.array([3, 5]))
    np.testing.assert_allclose(batch["pair_weight"], expected[[3, 5]], rtol=1e-6)
    assert len(_jsonl(tmp_path / "w" / "mitigated.jsonl")) == 8  # the column routes every pair


# --- mitigations on a tiny model ------------------------------------------------------------------------

def test_mitigation_keeps_a_displaced_pair_up(tiny, tmp_path):
    """Plain DPO lowers log π(y+) of a near-identical pair (measured here, not assumed); routed by its
    LN-CHES to the SFT anchor or to DPOP, the same pair's log π(y+) rises."""
    from jaxalign.train.ledger import read_ledger

    def run(name, **extra):
        raw = _raw(tiny, tmp_path / name, data={"train": str(tiny["head"])}, train={"batch_size": 4, "steps": 10},
                   intervals={"ledger": 10}, **extra)
        loop.train(config.from_dict(raw), progress=False)
        ledger = read_ledger(tmp_path / name / "ledger.zarr")
        return ledger["chosen_logps"][-1] - ledger["chosen_logps"][0]

    control = run("dpo")
    down = np.flatnonzero(control < 0)
    assert down.size >= 1, f"plain DPO lowered no chosen log-prob here: {control}"
    rule = "ln_ches > q0.5"
    for action, coeff in (("sft", 1.0), ("dpop", 50.0)):
        change = run(action, mitigations=[{"rule": rule, "action": action, "coeff": coeff}])
        routed = {r["row"] for r in _jsonl(tmp_path / action / "mitigated.jsonl")}
        assert set(down.tolist()) <= routed, f"{rule} must select the displaced pairs {down}"
        assert np.all(change[down] > 0), (action, control, change)
