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
    return {"model": model, "data": data, "root": root}


def _demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxalign.cli", "demo", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _read_ledger(path: Path) -> dict[str, np.ndarray]:
    import tensorstore as ts

    return {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}},
                          open=True).result().read().result()
            for name in ("step", "chosen_logps", "rejected_logps")}


@pytest.fixture(scope="module")
def demo_run(tiny):
    out = tiny["root"] / "demo_out"
    r = _demo("--quick", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out),
              "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


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

    d_all, score_all = [], []
    for name, idx in (("high", high), ("low", low)):
        led = _read_ledger(out / "train" / name / "ledger.zarr")
        assert led["step"][0] == 0 and led["step"][-1] == 2 and led["chosen_logps"].shape[1] == len(idx)
        dc = led["chosen_logps"][-1].astype(np.float64) - led["chosen_logps"][0]
        dr = led["rejected_logps"][-1].astype(np.float64) - led["rejected_logps"][0]
        assert np.all(np.isfinite(dc)) and np.any(dc != 0)
        row = next(line for line in md.splitlines() if line.startswith(f"| {name}est LN-CHES |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        se = dc.std(ddof=1) / np.sqrt(dc.size)
        assert cells[1] == str(len(idx))
        assert cells[2] == format_cell(float(np.mean([ln[i] for i in idx])))
        assert cells[4] == format_cell(float(dc.mean())), (cells, dc.mean())
        assert cells[5] == format_cell(float(se))
        assert cells[6] == format_cell(float(dr.mean()))
        assert cells[8] == format_cell(float((dc < 0).mean()))
        d_all += dc.tolist()
        score_all += [ches[i] for i in idx]

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
    assert "Timings and machine" in md and "load average" in md


@pytest.mark.slow
def test_rerun_reuses_finished_steps_and_redoes_changed_ones(demo_run, tiny):
    out, _ = demo_run
    before = (out / "train" / "high" / "metrics.jsonl").read_text()
    r = _demo("--quick", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out),
              "--lr", "1e-3")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused"] == ["data", "ches", "select", "entangle", "train_high", "train_low"]
    assert (out / "train" / "high" / "metrics.jsonl").read_text() == before
    # Fewer steps redo the two runs only.
    r = _demo("--quick", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out),
              "--lr", "1e-3", "--steps", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused"] == ["data", "ches", "select", "entangle"]
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
