"""The data choice (``--format``, ``--split``, ``--subset``) of the jobs that read pairs, the provenance
columns of ``jaxalign ches``'s ``scores.parquet``, and ``jaxalign filter`` on multi-pair formats (issue 22).

The miniature files follow the data sets' documented columns (as in tests/test_data_schemas.py); every
expected pair, score and index is written out here by hand from those records.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jaxalign import data  # noqa: E402
from jaxalign.cli import main  # noqa: E402
from jaxalign.jobs import ches as ches_job  # noqa: E402
from jaxalign.jobs import settings  # noqa: E402
from test_data_schemas import A, U, _write  # noqa: E402  (the miniature-file helpers)

pytestmark = pytest.mark.filterwarnings("ignore::jaxalign.data.DataWarning")


def _h4_row(prompt, good, bad, score_chosen, score_rejected):
    """A record of HuggingFaceH4/ultrafeedback_binarized (its card's columns)."""
    conv = U(prompt)
    return {"prompt": prompt, "prompt_id": "id", "chosen": conv + A(good), "rejected": conv + A(bad),
            "messages": conv + A(good), "score_chosen": score_chosen, "score_rejected": score_rejected}


def _uf_completion(text, overall):
    """A completion of openbmb/UltraFeedback (raw); only ``overall_score`` matters for the default aspect."""
    notes = {a: {"Rating": "3", "Rationale": "."} for a in
             ("helpfulness", "honesty", "instruction_following", "truthfulness")}
    return {"annotations": notes, "critique": ".", "custom_system_prompt": "", "fine-grained_score": 3.0,
            "model": "m", "overall_score": overall, "principle": "helpfulness", "response": text}


def _uf_record(instruction, *completions):
    return {"source": "s", "instruction": instruction, "models": ["m"] * len(completions),
            "completions": [_uf_completion(t, s) for t, s in completions],
            "correct_answers": [], "incorrect_answers": []}


# Record 0 ties everywhere: it gives no pair, so pair 0 comes from record 1 and pair 1 from record 2
# (best-vs-worst on overall_score; among equal worst scores the first counts).
UF = [_uf_record("Say nothing.", ("a", 5.0), ("b", 5.0)),
      _uf_record("Add 2 and 2.", ("4", 9.0), ("5", 2.0), ("four", 7.5), ("22", 2.0)),
      _uf_record("Name a fruit.", ("Car.", 1.0), ("Apple.", 8.0))]
UF_PAIRS = [{"prompt": U("Add 2 and 2."), "chosen": A("4"), "rejected": A("5")},
            {"prompt": U("Name a fruit."), "chosen": A("Apple."), "rejected": A("Car.")}]
UF_PROVENANCE = {"source_index": [1, 2], "chosen_response": [0, 1], "rejected_response": [1, 0],
                 "chosen_score": [9.0, 8.0], "rejected_score": [2.0, 1.0], "margin": [7.0, 7.0]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from hf_tiny import make_tiny
    from tiny_tokenizer import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("provenance")
    make_tiny("llama", root / "model", seed=3, vocab_size=272)
    make_tiny_tokenizer(root / "model")
    return str(root / "model")


def test_data_options_declared_once_for_every_reading_job():
    for cls in (settings.Ches, settings.Entangle, settings.Probe, settings.Displacement, settings.Filter):
        names = {f.name: f for f in cls.__dataclass_fields__.values()}
        assert {"format", "split", "data_subset"} <= set(names), cls.__name__
        assert names["data_subset"].metadata["flag"] == "--subset"
    select = settings.Select.__dataclass_fields__
    assert select["data_subset"].metadata["flag"] == "--data-subset"   # --subset is select's rule
    assert "split" in select


def test_ches_split_reads_that_split_and_keeps_scores(model, tmp_path, capsys):
    root = tmp_path / "ultrafeedback_binarized"
    _write(root / "data" / "train_prefs-00000-of-00001.parquet",
           [_h4_row("What is 2+2?", "4", "5", 8.0, 3.0), _h4_row("Say hi.", "Hi!", "No.", 7.0, 1.0),
            _h4_row("Name a colour.", "Red.", "Seven.", 9.0, 2.0)])
    _write(root / "data" / "test_prefs-00000-of-00001.parquet",
           [_h4_row("Capital of France?", "Paris", "Rome", 10.0, 4.5),
            _h4_row("Capital of Italy?", "Rome", "Oslo", 6.0, 5.0)])
    out = tmp_path / "ches"
    # a folder of several splits and no --split: exit 2, naming the splits
    assert main(["ches", "--model", model, "--data", str(root), "--out", str(out), "--no-progress",
                 "--no-real"]) == 2
    assert "test_prefs" in capsys.readouterr().err
    assert main(["ches", "--model", model, "--data", str(root), "--split", "test_prefs", "--out", str(out),
                 "--no-progress", "--no-real", "--batch-size", "2"]) == 0
    table = pq.read_table(out / "scores.parquet")
    assert table.column_names == list(ches_job.COLUMNS) + [f.name for f in ches_job.PROVENANCE]
    got = table.to_pydict()
    assert got["index"] == [0, 1] and got["source_index"] == [0, 1]       # the two test_prefs records
    assert got["chosen_score"] == [10.0, 6.0] and got["rejected_score"] == [4.5, 5.0]
    assert got["margin"] == [5.5, 1.0]
    assert got["chosen_response"] == [0, 0] and got["rejected_response"] == [1, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["read"] == 2


def test_ches_writes_provenance_of_ultrafeedback_pairs(model, tmp_path):
    path = _write(tmp_path / "ultrafeedback.jsonl", UF)
    out = tmp_path / "ches"
    assert main(["ches", "--model", model, "--data", path, "--format", "ultrafeedback", "--out", str(out),
                 "--no-progress", "--batch-size", "2"]) == 0
    table = pq.read_table(out / "scores.parquet")
    got = table.to_pydict()
    assert got["index"] == [0, 1]
    for name, want in UF_PROVENANCE.items():
        assert got[name] == want, name
    assert np.isfinite(got["real_cosine"]).all()   # REAL read the same pairs (same format, same indices)
    # an unknown --format stops before the model is loaded: exit 2
    assert main(["ches", "--model", model, "--data", path, "--format", "nope", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2


def test_ches_on_plain_trl_data_has_no_provenance_columns(model, tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
                                             {"prompt": "Q: hi", "chosen": " hello", "rejected": " bye"}])
    out = tmp_path / "ches"
    assert main(["ches", "--model", model, "--data", path, "--out", str(out), "--no-progress",
                 "--no-real"]) == 0
    assert pq.read_table(out / "scores.parquet").column_names == list(ches_job.COLUMNS)


def _scores(path, index, values):
    pq.write_table(pa.table({"index": pa.array(index, pa.int64()), "ln_ches": pa.array(values, pa.float64())}),
                   str(path))
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_filter_writes_the_selected_pairs_of_a_multi_pair_format(tmp_path, suffix):
    path = _write(tmp_path / "ultrafeedback.jsonl", UF)
    scores = _scores(tmp_path / "scores.parquet", [0, 1], [5.0, -1.0])
    out = tmp_path / f"kept{suffix}"
    assert main(["filter", "--data", path, "--scores", scores, "--keep-lowest", "1", "--out", str(out)]) == 0
    pairs, report = data.read_pairs(str(out))
    assert report.schema == "trl"                                    # standard records, not raw ones
    assert [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs] == [UF_PAIRS[1]]
    assert main(["filter", "--data", path, "--scores", scores, "--keep-lowest", "2", "--out", str(out)]) == 0
    pairs, _ = data.read_pairs(str(out))
    assert [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs] == UF_PAIRS


def test_filter_of_multi_pair_format_refuses_csv_and_unknown_pairs(tmp_path, capsys):
    path = _write(tmp_path / "ultrafeedback.jsonl", UF)
    scores = _scores(tmp_path / "scores.parquet", [0, 1], [5.0, -1.0])
    assert main(["filter", "--data", path, "--scores", scores, "--keep-lowest", "1",
                 "--out", str(tmp_path / "kept.csv")]) == 2
    assert "multi-pair format" in capsys.readouterr().err
    # pair 2 does not exist (two pairs are built from three records)
    bad = _scores(tmp_path / "bad.parquet", [0, 2], [5.0, -1.0])
    assert main(["filter", "--data", path, "--scores", bad, "--keep-lowest", "1",
                 "--out", str(tmp_path / "kept.jsonl")]) == 2
    assert "index 2 is not a record" in capsys.readouterr().err


def test_filter_of_nectar_pairs_follows_ches_indices(model, tmp_path):
    """End to end: ches then filter on a Nectar file whose first record gives no pair (tied ranks)."""
    def answers(*pairs):
        return [{"answer": a, "model": "m", "rank": r} for a, r in pairs]

    rows = [{"prompt": "\n\nHuman: Pick.\n\nAssistant: ", "answers": answers(("x", 1.0), ("y", 1.0)),
             "turns": 1, "num_responses": 2, "source": ["s"], "good_natured": True},
            {"prompt": "\n\nHuman: Name a colour.\n\nAssistant: ",
             "answers": answers(("Blue.", 2.0), ("Red.", 1.0), ("Seven.", 3.0)),
             "turns": 1, "num_responses": 3, "source": ["s"], "good_natured": True},
            {"prompt": "\n\nHuman: 2+2?\n\nAssistant: ", "answers": answers(("5", 2.0), ("4", 1.0)),
             "turns": 1, "num_responses": 2, "source": ["s"], "good_natured": True}]
    path = _write(tmp_path / "nectar.parquet", rows)
    out = tmp_path / "ches"
    assert main(["ches", "--model", model, "--data", path, "--format", "nectar", "--out", str(out),
                 "--no-progress", "--no-real"]) == 0
    got = pq.read_table(out / "scores.parquet").to_pydict()
    assert got["index"] == [0, 1] and got["source_index"] == [1, 2]
    assert got["chosen_response"] == [1, 1] and got["rejected_response"] == [2, 0]
    assert got["chosen_score"] == [-1.0, -1.0] and got["rejected_score"] == [-3.0, -2.0]
    lowest = int(np.argmin(got["ln_ches"]))
    kept = tmp_path / "kept.jsonl"
    assert main(["filter", "--data", path, "--format", "nectar", "--scores", str(out / "scores.parquet"),
                 "--keep-lowest", "1", "--out", str(kept)]) == 0
    want = [("\n\nHuman: Name a colour.\n\nAssistant:", " Red.", " Seven."),
            ("\n\nHuman: 2+2?\n\nAssistant:", " 4", " 5")][lowest]
    assert [json.loads(line) for line in kept.read_text().splitlines()] == [
        {"prompt": want[0], "chosen": want[1], "rejected": want[2]}]


def test_training_ledger_carries_the_probe_pairs_provenance(model, tmp_path):
    """The ledger of a run on UltraFeedback (raw) records each probe pair's record index and origin."""
    from jaxalign.train import config, loop
    from jaxalign.train.ledger import read_ledger

    path = _write(tmp_path / "uf.jsonl", UF)
    cfg = config.from_dict({
        "model": {"path": model}, "data": {"train": str(path), "probe_size": 2},
        "optim": {"name": "sgd", "lr": 0.1}, "train": {"batch_size": 2, "steps": 1}, "mesh": {"data": 1},
        "intervals": {"probe": None, "ledger": 1, "checkpoint": None},
        "checkpoint": {"export": False, "async_save": False},
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")})
    summary = loop.train(cfg, progress=False)
    ledger = read_ledger(Path(summary["output_dir"]) / "ledger.zarr")
    assert ledger["pair_index"].tolist() == [0, 1]      # pairs are numbered in this format
    for name, want in UF_PROVENANCE.items():             # written by hand above from the records
        np.testing.assert_array_equal(ledger[f"pair_{name}"], want, err_msg=name)
    assert ledger["margin"].shape == (2, 2)              # steps 0 and 1, two probe pairs
