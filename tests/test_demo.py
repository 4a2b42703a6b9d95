"""``jaxalign demo --quick`` end to end on a tiny random model and a tiny data file.

The command runs in a subprocess (it sets its own compilation cache, as the CLI does). The report's
headline numbers are checked against an independent recomputation from the files the steps wrote: the
ledger read with tensorstore and NumPy, the CHES table read with pyarrow, Spearman ρ as the correlation of NumPy ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

from jaxalign.report import format_cell  # noqa: E402

VOCAB = 272  # the tiny tokenizer's 265 ids, rounded up
WORDS = ["blue", "red", "cat", "dog", "yes", "no", "hello", "four", "five", "sky", "tree", "fine"]


def _pairs(n: int) -> list[dict]:
    """``n`` varied standard-format pairs (prompt lengths and response overlaps differ)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w = rng.choice(WORDS, size=6)
        prompt = f"question {i}: " + " ".join(w[:1 + i % 3]) + "?\n"
        chosen = " ".join(w[3:3 + 1 + i % 2])
        rejected = chosen + " " + w[5] if i % 3 == 0 else " ".join(w[4:6])
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model = make_tiny("llama", root / "llama", vocab_size=VOCAB, pad_token_id=3, eos_token_id=2,
                      bos_token_id=4, max_position_embeddings=128)
    make_tiny_tokenizer(model)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(24)))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in _pairs(24)))
    return {"model": model, "data": data, "prompts": prompts, "root": root}


def _demo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    # The timeout only stops a hung run: a shared 2-core machine at load 20 needs minutes for 4 runs.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxalign.cli", "demo", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _read_ledger(path: Path) -> dict[str, np.ndarray]:
    import tensorstore as ts

    return {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}},
                          open=True).result().read().result()
            for name in ("step", "chosen_logps", "rejected_logps")}


#: the demo's default shape in small: on-policy pairs sampled by the model, and the two mitigation runs
ON_POLICY = ("--max-new-tokens", "6", "--mitigations")


@pytest.fixture(scope="module")
def demo_run(tiny):
    out = tiny["root"] / "demo_out"
    r = _demo("--quick", "--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), *ON_POLICY,
              "--out", str(out), "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def _row(md: str, label: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


@pytest.mark.slow
def test_quick_demo_writes_the_report_with_the_measured_numbers(demo_run):
    out, r = demo_run
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    for name in ("subset_bars", "ches_vs_change", "ln_ches_vs_change", "logps_high", "logps_low", "cosines",
                 "predicted_vs_realised", "training_high", "training_low"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000, name
        assert f"figures/{name}.png" in md
    assert str(out / "report.html") in r.stdout

    subsets = json.loads((out / "data" / "subsets.json").read_text())
    scores = pq.read_table(out / "ches" / "scores.parquet").to_pydict()
    ln = dict(zip(scores["index"], scores["ln_ches"]))
    ches = dict(zip(scores["index"], scores["ches"]))
    high, low = subsets["high"], subsets["low"]
    assert len(high) == len(low) == 8 and not set(high) & set(low)
    # The subsets are the highest and lowest LN-CHES pairs of the pool.
    assert min(ln[i] for i in high) >= max(ln[i] for i in low)

    # The filter's pool: every scored pair less the 8 highest-LN-CHES ones (all pairs here form the pool).
    filtered = subsets["filtered"]
    assert subsets["pool_size"] == len(ln) == 24
    assert sorted(filtered) == sorted(sorted(ln, key=ln.get)[:16]) and not set(filtered) & set(high)

    d_all, score_all, d_mean = [], [], {}
    labels = {"high": "highest LN-CHES", "low": "lowest LN-CHES", "filtered": "filtered pool",
              "sft": "DPO+SFT, highest LN-CHES"}
    for name, idx in (("high", high), ("low", low), ("filtered", filtered), ("sft", high)):
        led = _read_ledger(out / "train" / name / "ledger.zarr")
        assert led["step"][0] == 0 and led["step"][-1] == 2 and led["chosen_logps"].shape[1] == len(idx)
        dc = led["chosen_logps"][-1].astype(np.float64) - led["chosen_logps"][0]
        dr = led["rejected_logps"][-1].astype(np.float64) - led["rejected_logps"][0]
        assert np.all(np.isfinite(dc)) and np.any(dc != 0)
        cells = _row(md, labels[name])
        se = dc.std(ddof=1) / np.sqrt(dc.size)
        d_mean[name] = dc.mean()
        assert cells[1] == str(len(idx))
        assert cells[2] == format_cell(float(np.mean([ln[i] for i in idx])))
        assert cells[4] == format_cell(float(dc.mean())), (cells, dc.mean())
        assert cells[5] == format_cell(float(se))
        assert cells[6] == format_cell(float(dr.mean()))
        assert cells[8] == format_cell(float((dc < 0).mean()))
        if name in ("high", "low"):
            d_all += dc.tolist()
            score_all += [ches[i] for i in idx]
    # The SFT term changes the run: same pairs, same start, different result.
    assert d_mean["sft"] != d_mean["high"]
    for claim, holds in (("the highest-LN-CHES subset's mean log π(y+) falls", d_mean["high"] < 0),
                         ("the lowest-LN-CHES subset's mean log π(y+) rises", d_mean["low"] > 0),
                         ("the filtered pool's mean log π(y+) does not fall", d_mean["filtered"] >= 0),
                         ("DPO+SFT on the highest-LN-CHES subset: mean log π(y+) does not fall",
                          d_mean["sft"] >= 0)):
        assert _row(md, claim)[1] == ("yes" if holds else "**no**"), claim

    assert len(set(score_all)) == len(score_all) and len(set(d_all)) == len(d_all)  # no ties to average
    rx, ry = (np.argsort(np.argsort(v)).astype(np.float64) for v in (score_all, d_all))
    rho = np.corrcoef(rx, ry)[0, 1]
    spearman_row = next(line for line in md.splitlines() if line.startswith("| CHES |") and line.count("|") == 5)
    assert spearman_row.split("|")[2].strip() == format_cell(float(rho), 3)

    summary = json.loads((out / "summary.json").read_text())
    fractions = summary["case_fractions"]["all"]
    ent = pq.read_table(out / "entangle" / "pairs.parquet").to_pydict()
    assert fractions["pairs"] == len(ent["case"]) == 8
    for case in ("ideal", "both_down", "both_up", "inverted"):
        assert fractions[case] == pytest.approx(ent["case"].count(case) / len(ent["case"]))
    # Predicted signs (the probe) against realised ones (the ledgers), per subset.
    entangled = json.loads((out / "data" / "subsets.json").read_text())["entangle"]
    realised = {}
    for name, idx in (("high", high), ("low", low)):
        led = _read_ledger(out / "train" / name / "ledger.zarr")
        realised.update(zip(idx, led["chosen_logps"][-1].astype(np.float64) - led["chosen_logps"][0]))
    for name, idx in (("high", high), ("low", low)):
        probed = [k for k, pos in enumerate(ent["index"]) if entangled[pos] in idx]
        pred = [ent["pred_dlogp_chosen"][k] < 0 for k in probed]
        real = [realised[entangled[ent["index"][k]]] < 0 for k in probed]
        cells = _row(md, labels[name] + " | " + str(len(probed)))
        assert cells[2:] == [str(sum(pred)), str(sum(real)), str(sum(a == b for a, b in zip(pred, real)))]
    sampled = [json.loads(x) for x in (out / "sample" / "pairs.jsonl").read_text().splitlines()]
    assert len(sampled) == 24 and "How the pairs were made" in md
    assert "Timings and machine" in md and "load average" in md


@pytest.mark.slow
def test_rerun_reuses_finished_steps_and_redoes_changed_ones(demo_run, tiny):
    out, _ = demo_run
    before = (out / "train" / "high" / "metrics.jsonl").read_text()
    args = ("--quick", "--model", str(tiny["model"]), "--prompts", str(tiny["prompts"]), *ON_POLICY,
            "--out", str(out), "--lr", "1e-3")
    r = _demo(*args)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused"] == ["sample", "data", "ches", "select", "entangle", "train_high", "train_low",
                                 "train_filtered", "train_sft"]
    assert (out / "train" / "high" / "metrics.jsonl").read_text() == before
    # Fewer steps redo the two runs only.
    r = _demo(*args, "--steps", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused"] == ["sample", "data", "ches", "select", "entangle"]
    assert _read_ledger(out / "train" / "high" / "ledger.zarr")["step"].tolist() == [0, 1]
    assert summary["subsets"]["high"]["steps"] == 1


@pytest.mark.parametrize("flag", ["--model", "--data"])
def test_bad_paths_exit_2_without_traceback(tiny, tmp_path, flag):
    args = {"--model": str(tiny["model"]), "--data": str(tiny["data"])}
    args[flag] = str(tmp_path / "missing")
    r = _demo("--quick", *[x for kv in args.items() for x in kv], "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"jaxalign demo: error: {flag} {tmp_path / 'missing'}" in r.stderr
