"""``jaxalign probe`` / ``jaxalign plot``: a tiny CPU training run with two checkpoints, probed.

Checked against independent computations: the ``transformers`` PyTorch model on the run's exported
weights (log-probs, CHES, LN-CHES of the last checkpoint), the training loop's own ledger (log-probs of
every step), explicit per-pair gradients with ``jax.grad`` on parameters restored through the full
train-state restore of :class:`jaxalign.train.checkpoint.Checkpointer` (entanglement of checkpoint 1).
Then: resume after an interruption (and after a half-written row), the zarr store reopened with
tensorstore, the long-form Parquet, the HF-folder mode through the CLI, and the plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign.jobs import probe as probe_lib  # noqa: E402
from jaxalign.jobs import probe as probe_run  # noqa: E402
from jaxalign.errors import CheckpointError, ConfigError  # noqa: E402

VOCAB = 272
FAST = {"xla_backend_optimization_level": "0"}
PAIRS = [
    {"prompt": "hello there, how are you?\n", "chosen": "fine thanks", "rejected": "go away"},
    {"prompt": "what is 2+2?\n", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "name a colour\n", "chosen": "blue", "rejected": "hello"},
    {"prompt": "say hi\n", "chosen": "hi!", "rejected": "no."},
    {"prompt": "is the sky green?\n", "chosen": "no, it is blue", "rejected": "yes"},
    {"prompt": "spell cat\n", "chosen": "c-a-t", "rejected": "k-a-t"},
]


pytestmark = pytest.mark.usefixtures("compile_cache")  # conftest: equal programs compile once


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step SGD run of a tiny Llama with checkpoints at steps 1 and 2, its ledger and an HF export."""
    from jaxalign.train import config, loop

    root = tmp_path_factory.mktemp("probe")
    model = make_tiny("llama", root / "llama", vocab_size=VOCAB, pad_token_id=3, eos_token_id=2,
                      bos_token_id=4, max_position_embeddings=128)
    make_tiny_tokenizer(model)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    raw = {"model": {"path": str(model)}, "data": {"train": str(data), "probe_size": 6},
           "optim": {"name": "sgd", "lr": 0.5}, "train": {"batch_size": 4, "steps": 2}, "mesh": {"data": 1},
           "intervals": {"probe": 1, "ledger": 1, "checkpoint": 1},
           "checkpoint": {"export": True, "async_save": False, "keep_last": 5},
           "output_dir": str(root / "run"), "cache_dir": str(root / "cache")}
    loop.train(config.from_dict(raw), progress=False)
    return {"root": root, "model": model, "data": data, "run": root / "run"}


@pytest.fixture(scope="module")
def probed(trained):
    out = trained["root"] / "probe_full"
    res = probe_run.run_probe(str(out), str(trained["data"]), run=str(trained["run"]),
                              what="logps,ches,entangle", batch_size=4, progress=False,
                              compiler_options=FAST)
    return {"out": out, "res": res, "data": probe_lib.read_probe(out)}


def _tokens(trained):
    from jaxalign.jobs.common import load_pairs
    from jaxalign.models import load_pretrained

    _, tok = load_pretrained(trained["model"])
    return load_pairs(str(trained["data"]), tok).tokens


def _torch_measures(folder, tokens) -> dict[str, np.ndarray]:
    """Summed log-probs, CHES and LN-CHES of every pair with the transformers model, float64 sums."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {k: [] for k in ("chosen_logps", "rejected_logps", "ches", "ln_ches")}
    for i in range(len(tokens)):
        p = [int(t) for t in tokens.prompt[i]]
        S, n = {}, {}
        for side in ("chosen", "rejected"):
            r = [int(t) for t in getattr(tokens, side)[i]]
            ids = torch.tensor([p + r])
            with torch.no_grad():
                o = model(ids, output_hidden_states=True)
            logp = torch.log_softmax(o.logits[0].double(), -1)
            pos = np.arange(len(p) - 1, len(p) + len(r) - 1)  # positions predicting response tokens
            out[f"{side}_logps"].append(float(sum(logp[t, p_r] for t, p_r in zip(pos, r))))
            S[side] = o.hidden_states[-1][0].double()[pos].sum(0).numpy()
            n[side] = len(r)
        sw, sl = S["chosen"], S["rejected"]
        out["ches"].append(sw @ sl - sw @ sw)
        mw, ml = sw / n["chosen"], sl / n["rejected"]
        out["ln_ches"].append(mw @ ml - mw @ mw)
    return {k: np.array(v) for k, v in out.items()}


# --- values ------------------------------------------------------------------------------------------

def test_probe_values_equal_direct_computation(trained, probed):
    d = probed["data"]
    assert probed["res"]["steps"] == [0, 1, 2] and d["step"].tolist() == [0, 1, 2]
    tokens = _tokens(trained)
    assert d["index"].tolist() == tokens.index.tolist()
    assert d["chosen_len"].tolist() == tokens.chosen.lengths.tolist()

    # The training loop's ledger: log-probs of the same pairs at steps 0, 1, 2 (float32).
    from jaxalign.train.ledger import read_ledger

    led = read_ledger(trained["run"] / "ledger.zarr")
    assert led["step"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(d["chosen_logps"], led["chosen_logps"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d["rejected_logps"], led["rejected_logps"], rtol=1e-5, atol=1e-4)

    # transformers on the exported final weights (= checkpoint 2) and on the initial weights (= step 0).
    for row, folder in ((2, trained["run"] / "final"), (0, trained["model"])):
        ref = _torch_measures(folder, tokens)
        for k in ("chosen_logps", "rejected_logps"):
            np.testing.assert_allclose(d[k][row], ref[k], rtol=1e-4, atol=2e-3, err_msg=f"{k} step {row}")
        np.testing.assert_allclose(d["ches"][row], ref["ches"], rtol=1e-3, atol=1e-2 * np.abs(ref["ches"]).max())
        np.testing.assert_allclose(d["ln_ches"][row], ref["ln_ches"], rtol=1e-3,
                                   atol=1e-3 * np.abs(ref["ln_ches"]).max())
    # The log-probs really moved (the test would not see a stale checkpoint otherwise).
    assert np.abs(d["chosen_logps"][2] - d["chosen_logps"][0]).max() > 0.5


def test_probe_entanglement_equals_explicit_gradients(trained, probed):
    """Checkpoint 1 restored with the full train state; g_w, g_l of each pair by jax.grad on one pair."""
    import jax.numpy as jnp

    from jaxalign.analysis.entanglement import CASES, predict
    from jaxalign.data.batch import shared_prompt_batch
    from jaxalign.models import load_pretrained
    from jaxalign.train import config, optim
    from jaxalign.train import step as step_lib
    from jaxalign.train.checkpoint import Checkpointer

    d = probed["data"]
    cfg = config.from_dict(json.loads((trained["run"] / "config.json").read_text()))
    model, tok = load_pretrained(trained["model"])
    parts, params = step_lib.ModelParts.split(model)
    optimizer = optim.make_optimizer(cfg.optim, 2)
    state = step_lib.init_state(optimizer, params, step_lib.shardings_of(params), None)
    ckpt = Checkpointer(trained["run"] / "checkpoints", keep_last=5, async_save=False)
    state, _, _ = ckpt.restore(1, state)
    ckpt.close()
    tokens = _tokens(trained)
    k = 1  # row of step 1
    P = int(tokens.prompt.lengths.max())
    R = int(max(tokens.chosen.lengths.max(), tokens.rejected.lengths.max()))

    @jax.jit
    def grads(p, b):  # one pair, padded to one shape (one compilation)
        lp = lambda q, side: step_lib.pair_logps(parts.merge(q), b)[f"{side}_logps"][0]  # noqa: E731
        return jax.grad(lp)(p, "chosen"), jax.grad(lp)(p, "rejected")

    def dot(a, c):
        return sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))

    sqw, sql, ip = [], [], []
    for i in range(len(tokens)):
        b = shared_prompt_batch(tokens, np.array([i]), pad_id=3, prompt_length=P, response_length=R)
        gw, gl = grads(state.params, {key: jnp.asarray(v) for key, v in b.items()})
        sqw.append(dot(gw, gw)), sql.append(dot(gl, gl)), ip.append(dot(gw, gl))
    sqw, sql, ip = map(np.array, (sqw, sql, ip))
    np.testing.assert_allclose(d["grad_chosen_sqnorm"][k], sqw, rtol=2e-3)
    np.testing.assert_allclose(d["grad_rejected_sqnorm"][k], sql, rtol=2e-3)
    np.testing.assert_allclose(d["grad_inner"][k], ip, rtol=2e-3, atol=2e-3 * np.sqrt(sqw * sql).max())
    np.testing.assert_allclose(d["grad_cosine"][k], ip / np.sqrt(sqw * sql), atol=2e-3)
    # DPO's weights with step 0 as the reference (the run's loss: sigmoid, beta 0.1), then the cases.
    s_w, s_l = d["chosen_logps"][k], d["rejected_logps"][k]
    margin = 0.1 * ((s_w - d["chosen_logps"][0]) - (s_l - d["rejected_logps"][0]))
    w = 0.1 / (1.0 + np.exp(margin))  # β σ(−β Δ)
    np.testing.assert_allclose(d["weight_chosen"][k], w, rtol=1e-5)
    np.testing.assert_allclose(d["weight_rejected"][k], w, rtol=1e-5)
    np.testing.assert_allclose(d["pred_dlogp_chosen"][k], w * sqw - w * ip, rtol=3e-3,
                               atol=3e-3 * np.abs(w * sqw).max())
    _, _, case = predict(sqw, sql, ip, w, w)
    assert [CASES[c] for c in d["case"][k]] == [CASES[c] for c in np.asarray(case)]


# --- storage, resume, CLI ------------------------------------------------------------------------------

def test_zarr_and_parquet_layout(trained, probed):
    import pyarrow.parquet as pq
    import tensorstore as ts

    out, d = probed["out"], probed["data"]
    z = out / "probe.zarr"
    group = json.loads((z / "zarr.json").read_text())
    assert group["zarr_format"] == 3 and group["node_type"] == "group"
    attrs = group["attributes"]
    assert attrs["rows"] == 3 and [c["step"] for c in attrs["checkpoints"]] == [0, 1, 2]
    assert attrs["checkpoints"][1]["source"] == "checkpoints/1" and attrs["cases"][0] == "ideal"
    assert attrs["loss"] == "sigmoid" and attrs["beta"] == 0.1
    meta = json.loads((z / "chosen_logps" / "zarr.json").read_text())
    assert meta["node_type"] == "array" and meta["dimension_names"] == ["checkpoint", "example"]
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(z / "ches")}}).result()
    assert arr.shape == (3, 6)
    np.testing.assert_array_equal(arr.read().result(), d["ches"])
    table = pq.read_table(out / "probe.parquet")
    assert table.num_rows == 3 * 6
    cols = table.column_names
    assert cols[:2] == ["step", "index"] and {"chosen_logps", "ches", "grad_cosine", "case"} <= set(cols)
    rows = table.to_pylist()
    r = next(x for x in rows if x["step"] == 2 and x["index"] == 4)
    j = d["index"].tolist().index(4)
    assert r["chosen_logps"] == d["chosen_logps"][2, j] and r["case"] in attrs["cases"]


def test_resume_after_interruption(trained, probed):
    out = trained["root"] / "probe_resume"
    kwargs = dict(run=str(trained["run"]), what="logps,ches", batch_size=4, progress=False)

    def stop(step):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probe_run.run_probe(str(out), str(trained["data"]), after_checkpoint=stop, **kwargs)
    assert probe_lib.read_probe(out)["step"].tolist() == [0, 1]
    # A kill in the middle of the next row: arrays one row longer than committed, filled with garbage.
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / "probe.zarr" / "ches")}}
    arr = ts.open(spec).result()
    arr = arr.resize(exclusive_max=[3, 6], shrink_only=False).result()
    arr[2].write(np.full(6, 123.0)).result()

    res = probe_run.run_probe(str(out), str(trained["data"]), **kwargs)
    assert res["probed"] == [2] and res["steps"] == [0, 1, 2]
    # The same settings uninterrupted: the same batches through the same programs, so bit-identical.
    d = probe_lib.read_probe(out)
    again = trained["root"] / "probe_again"
    probe_run.run_probe(str(again), str(trained["data"]), **kwargs)
    same = probe_lib.read_probe(again)
    for k in ("step", "index", "chosen_logps", "rejected_logps", "ches", "ln_ches"):
        np.testing.assert_array_equal(d[k], same[k], err_msg=k)
    # `probed` ran other programs (entanglement too, other compiler options): equal up to float32
    # rounding. Log-probs are sums of ~10 token log-probs, each good to a few ulps of its size.
    full = probed["data"]
    for k in ("chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(d[k], full[k], rtol=1e-5, atol=0, err_msg=k)
    # CHES cancels: bounded relative to the largest score (the size of its terms here), as in test_ches
    for k in ("ches", "ln_ches"):
        np.testing.assert_allclose(d[k], full[k], rtol=0, atol=1e-5 * np.abs(full[k]).max(), err_msg=k)
    # Nothing new: a rerun probes nothing; --follow stops at once on a finished run (last step probed).
    res = probe_run.run_probe(str(out), str(trained["data"]), follow=True, poll_s=0.01, **kwargs)
    assert res["probed"] == []
    # Other settings are refused, naming the difference.
    with pytest.raises(CheckpointError, match="what"):
        probe_run.run_probe(str(out), str(trained["data"]), **dict(kwargs, what="logps"))
    with pytest.raises(ConfigError, match="exactly one"):
        probe_run.run_probe(str(out), str(trained["data"]), progress=False)


def test_cli_checkpoint_folders_and_plot(trained, probed, capsys):
    from PIL import Image

    from jaxalign import cli

    out = trained["root"] / "probe_folders"
    base, final = trained["model"], trained["run"] / "final"
    assert cli.main(["probe", "--checkpoints", str(base), str(final), "--data", str(trained["data"]),
                     "--out", str(out), "--batch-size", "4", "--no-progress"]) == 0
    d, full = probe_lib.read_probe(out), probed["data"]
    assert d["step"].tolist() == [0, 1]  # names without numbers: positions
    for k in ("chosen_logps", "rejected_logps", "ches"):
        np.testing.assert_allclose(d[k], full[k][[0, 2]], rtol=1e-5, atol=1e-5 * np.abs(full[k]).max())
    capsys.readouterr()

    # plot: a probe output (with its run's metrics), then a run alone.
    assert cli.main(["plot", str(probed["out"])]) == 0
    plots = probed["out"] / "plots"
    expected = ["training.png", "logps.png", "fraction_fallen.png", "ches_vs_change.png",
                "ln_ches_vs_change.png", "pred_dlogp_chosen_vs_change.png", "case_fractions.png",
                "cosine_hist.png"]
    md = (plots / "report.md").read_text()
    for name in expected:
        f = plots / name
        assert f.stat().st_size > 1000, name
        with Image.open(f) as im:
            im.verify()
        assert f"]({name})" in md, name
    html = (plots / "report.html").read_text()
    # every linked figure embedded; the run's alarm metrics (every run logs them) add loss_alarms.png
    assert html.count("data:image/png;base64,") == md.count(".png)") >= len(expected)
    assert "Spearman" in md and "Pairs whose chosen log-probability fell most" in md
    assert cli.main(["plot", str(trained["run"]), "--out", str(trained["root"] / "run_plots")]) == 0
    run_plots = sorted(p.name for p in (trained["root"] / "run_plots").glob("*.png"))
    assert set(run_plots) - {"loss_alarms.png"} == {"fraction_fallen.png", "logps.png", "training.png"}
    assert cli.main(["plot", str(trained["root"] / "nothing")]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_cli_probe_errors(trained, tmp_path, capsys):
    from jaxalign import cli

    with pytest.raises(SystemExit):  # argparse: --run or --checkpoints is required
        cli.main(["probe", "--data", str(trained["data"]), "--out", str(tmp_path)])
    assert cli.main(["probe", "--run", str(tmp_path), "--data", str(trained["data"]), "--out",
                     str(tmp_path / "o")]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert cli.main(["probe", "--run", str(trained["run"]), "--data", str(trained["data"]), "--out",
                     str(tmp_path / "o"), "--what", "logps,bogus"]) == 2
    assert "unknown measure 'bogus'" in capsys.readouterr().err


# --- the squeezing probe -------------------------------------------------------------------------------

SQUEEZE_TOKENS = 6


@pytest.fixture(scope="module")
def squeezed(trained):
    out = trained["root"] / "probe_squeeze"
    probe_run.run_probe(str(out), str(trained["data"]), run=str(trained["run"]), what="squeeze",
                        max_new_tokens=SQUEEZE_TOKENS, batch_size=4, progress=False)
    return {"out": out, "data": probe_lib.read_probe(out)}


def _torch_next_token(model, ids: list[int]) -> np.ndarray:
    """float64 log-softmax ``[len(ids), V]`` of the transformers model: row t predicts token t + 1."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _response_stats(model, prompt: list[int], response: list[int]) -> tuple[float, float, float]:
    """Summed log-prob, mean top-1 probability and mean entropy over the response positions, float64."""
    logp = _torch_next_token(model, prompt + response)[len(prompt) - 1:len(prompt) + len(response) - 1]
    p = np.exp(logp)
    return (float(logp[np.arange(len(response)), response].sum()), float(p.max(-1).mean()),
            float(-(p * logp).sum(-1).mean()))


def test_squeeze_probe_equals_generate_and_brute_force(trained, squeezed):
    """Steps 0 and 2: the greedy ids equal ``generate_ids`` (temperature 0, one prompt at a time); every
    log-prob, top-1 mass and entropy equals the transformers model on the same weights, the greedy
    response scored token by token with one full forward per prefix (each token at its own position)."""
    import torch
    import transformers

    from jaxalign.models import load_pretrained
    from jaxalign.models.generate import generate_ids

    d = squeezed["data"]
    assert d["attributes"]["measures"][:2] == ["chosen_logps", "rejected_logps"]
    assert d["greedy_ids"].shape == (3, len(PAIRS), SQUEEZE_TOKENS)
    tokens = _tokens(trained)
    N = len(tokens)
    for row, folder in ((0, trained["model"]), (2, trained["run"] / "final")):
        model, _ = load_pretrained(folder)
        tm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for i in range(N):
            prompt = [int(t) for t in tokens.prompt[i]]
            new = generate_ids(model, [prompt], SQUEEZE_TOKENS, eos_token_id=2, pad_token_id=3)[0].tolist()
            expect = new[:new.index(2) + 1] if 2 in new else new
            stored = d["greedy_ids"][row, i]
            assert stored[stored >= 0].tolist() == expect, (row, i)
            assert d["greedy_len"][row, i] == len(expect)
            # brute force: one forward per prefix, the logits at its last position score the next token
            per_token = [_torch_next_token(tm, prompt + expect[:k])[-1, expect[k]] for k in range(len(expect))]
            # float32 sums of ≤ 6 token log-probs against float64: as the ledger comparison above
            np.testing.assert_allclose(d["greedy_logps"][row, i], sum(per_token), rtol=1e-4, atol=2e-3)
            checks = {"greedy": expect, "chosen": [int(t) for t in tokens.chosen[i]],
                      "rejected": [int(t) for t in tokens.rejected[i]]}
            for name, resp in checks.items():
                lp, top1, ent = _response_stats(tm, prompt, resp)
                if name == "greedy":
                    # the two brute forces agree (the torch model is float32; other lengths, other blocking)
                    np.testing.assert_allclose(lp, sum(per_token), rtol=1e-6)
                # float32 softmax means against float64 (probabilities ≤ 1, entropies ≤ log V ≈ 5.6)
                np.testing.assert_allclose(d[f"top1_{name}"][row, i], top1, atol=1e-4, err_msg=name)
                np.testing.assert_allclose(d[f"entropy_{name}"][row, i], ent, atol=1e-4, err_msg=name)
            other = [int(t) for t in tokens.chosen[(i + 1) % N]]  # the documented derangement
            np.testing.assert_allclose(d["other_logps"][row, i], _response_stats(tm, prompt, other)[0],
                                       rtol=1e-4, atol=2e-3)
    import pyarrow.parquet as pq

    cols = pq.read_table(squeezed["out"] / "probe.parquet").column_names
    assert "greedy_logps" in cols and "greedy_ids" not in cols


def test_squeeze_needs_two_pairs(trained, tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        probe_run.run_probe(str(tmp_path / "o"), str(trained["data"]), run=str(trained["run"]),
                            what="squeeze", limit=1, progress=False)


def test_refused_runs_leave_nothing_behind(trained, tmp_path, capsys):
    """skipped.jsonl is written only after every check of the inputs: a run refused for its data (every
    record skipped) creates no folder, and a rerun refused for other settings keeps the first run's list."""
    from jaxalign import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in PAIRS))
    model = str(trained["model"])
    for command, args in (("probe", ["--checkpoints", model, model, "--out"]), ("ches", ["--model", model, "--out"]),
                          ("entangle", ["--model", model, "--out"])):
        out = tmp_path / command
        argv = [command] + args + [str(out), "--data", str(bad), "--on-bad-record", "skip", "--no-progress"]
        assert cli.main(argv) == 2, command
        assert "no usable preference pairs" in capsys.readouterr().err
        assert not out.exists(), (command, sorted(p.name for p in out.iterdir()))

    one_bad = tmp_path / "one_bad.jsonl"
    one_bad.write_text(trained["data"].read_text() + json.dumps({"prompt": "p"}) + "\n")
    out = tmp_path / "probe_ok"
    base = ["probe", "--checkpoints", model, model, "--out", str(out), "--on-bad-record", "skip",
            "--batch-size", "4", "--no-progress"]
    assert cli.main(base + ["--data", str(one_bad)]) == 0
    first = (out / "skipped.jsonl").read_text()
    assert json.loads(first)["index"] == len(PAIRS)
    assert cli.main(base + ["--data", str(trained["data"])]) == 2  # other tokens: refused
    assert "other settings" in capsys.readouterr().err
    assert (out / "skipped.jsonl").read_text() == first
