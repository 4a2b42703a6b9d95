"""The jobs layer: settings written once (CLI options, checks, fingerprint), the one batch loop, and the
exit-2 checks of every command's arguments (issue 21: numbers checked, flags never silently dropped)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from jaxalign import store  # noqa: E402
from jaxalign.cli import main  # noqa: E402
from jaxalign.errors import ConfigError  # noqa: E402
from jaxalign.jobs import common, options, settings  # noqa: E402
from jaxalign.jobs.options import check, option  # noqa: E402


@dataclasses.dataclass(frozen=True)
class _Toy:
    data: str = option(help="the pairs", required=True)
    limit: int | None = option(None, help="first N", type=int, minimum=1)
    fraction: float = option(0.5, help="share", type=float, minimum=0.0, maximum=1.0)
    kind: str = option("a", help="kind", choices=("a", "b"))
    fast: bool = option(False, help="go fast", action="store_true", fingerprint=False)
    tags: list = option([], help="a tag", flag="--tag", action="append")

    def __post_init__(self):
        check(self)


def test_options_give_parser_checks_and_fingerprint():
    p = argparse.ArgumentParser()
    options.add_arguments(p, _Toy)
    args = p.parse_args(["--data", "d.jsonl", "--limit", "3", "--tag", "x", "--tag", "y", "--fast"])
    toy = options.from_args(_Toy, args)
    assert toy == _Toy(data="d.jsonl", limit=3, fast=True, tags=["x", "y"])
    assert options.from_args(_Toy, p.parse_args(["--data", "d"])).tags == []  # the field's default
    assert options.fingerprint(toy, extra=1) == {"data": "d.jsonl", "limit": 3, "fraction": 0.5, "kind": "a",
                                                 "tags": ["x", "y"], "extra": 1}
    for bad, needle in [(dict(limit=0), "--limit must be at least 1, got 0"),
                        (dict(limit=-2), "--limit must be at least 1, got -2"),
                        (dict(fraction=1.5), "--fraction must be at most 1, got 1.5"),
                        (dict(kind="c"), "--kind must be one of a, b, got 'c'")]:
        with pytest.raises(ConfigError, match=needle):
            _Toy(data="d", **bad)


def test_light_constants_agree_with_the_maths():
    """settings.py must not import JAX, so it repeats two tuples: they must stay equal."""
    from jaxalign.analysis import entanglement, real

    assert settings.ENTANGLE_METHODS == entanglement.METHODS
    assert settings.SELECT_SUBSETS == real.SUBSETS_GROUPS


# --- the batch loop ---------------------------------------------------------------------------------

def _plan():
    return common.Plan((np.array([4, 1, 3]), np.array([0, 2])), rows=4)


def test_plan_pads_with_filler_rows_and_has_a_stable_digest():
    plan = _plan()
    assert plan.padded(1).tolist() == [0, 2, -1, -1] and plan.total == 5
    assert plan.digest == common.Plan((np.array([4, 1, 3]), np.array([0, 2])), rows=8).digest
    assert plan.digest != common.Plan((np.array([1, 4, 3]), np.array([0, 2])), rows=4).digest


def test_run_batches_resumes_and_writes_from_the_lead_only(tmp_path, monkeypatch):
    plan, seen = _plan(), []

    def compute(rows, batch):
        seen.append(batch.tolist())
        return pa.table({"index": pa.array(rows.astype(np.int64)), "x": pa.array(2.0 * rows)})

    chunks = store.ChunkedTable(tmp_path / "t.parquet", fingerprint={"plan": plan.digest})
    chunks.write_chunk(0, compute(plan.batches[0], plan.padded(0)))  # batch 0 done by an earlier run
    seen.clear()
    done = []
    common.run_batches(plan, lambda rows: rows, compute, common.ChunkSink(chunks), progress=False,
                       after_batch=done.append)
    assert seen == [[0, 2, -1, -1]] and done == [1]  # only the unfinished batch, with its filler rows
    table = chunks.commit(expected_keys=range(5))
    assert table.column("x").to_pylist() == [0.0, 2.0, 4.0, 6.0, 8.0]

    monkeypatch.setattr(common, "is_lead", lambda: False)
    other = store.ChunkedTable(tmp_path / "u.parquet")
    common.run_batches(plan, lambda rows: rows, compute, common.ChunkSink(other), progress=False)
    assert other.done == frozenset()  # computed (a multi-host step needs every process), not written
    memory = common.ListSink()
    common.run_batches(plan, lambda rows: rows, compute, memory, progress=False)
    assert [r.tolist() for r, _ in memory.results] == [[4, 1, 3], [0, 2]]  # in memory: kept everywhere


def test_require_pairs_says_what_was_read_and_skipped(tmp_path):
    from tiny_tokenizer import make_tiny_tokenizer

    from jaxalign.models import load_tokenizer

    tok = load_tokenizer(make_tiny_tokenizer(tmp_path / "tok"))
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n" + json.dumps({"x": 1}) + "\n")
    ds = common.load_pairs(str(data), tok, on_bad_record="skip")
    with pytest.raises(Exception, match=r"bad.jsonl: no usable preference pairs: read 2 records, skipped 2 "
                                        r"\(missing-field: 2\)"):
        common.require_pairs(ds, str(data))


# --- every command's numeric arguments: exit 2 naming the option, before any model is loaded ---------

_BASE = {
    "ches": ["--model", "M", "--data", "D", "--out", "O"],
    "entangle": ["--model", "M", "--data", "D", "--out", "O"],
    "displacement": ["--before", "B", "--after", "A", "--data", "D", "--out", "O"],
    "probe": ["--run", "R", "--data", "D", "--out", "O"],
    "select": ["--model", "M", "--data", "D", "--out", "O.jsonl", "--subset", "easy"],
    "filter": ["--data", "D", "--scores", "S", "--out", "O.jsonl"],
}
_BAD = [("ches", ["--limit", "-2"]), ("ches", ["--limit", "0"]), ("ches", ["--batch-size", "0"]),
        ("ches", ["--max-length", "0"]),
        ("entangle", ["--chunk-size", "0"]), ("entangle", ["--limit", "-2"]), ("entangle", ["--batch-size", "0"]),
        ("entangle", ["--sketch-dim", "0"]), ("entangle", ["--last-blocks", "0"]),
        ("displacement", ["--limit", "-2"]), ("displacement", ["--limit", "0"]),
        ("displacement", ["--batch-size", "0"]), ("displacement", ["--top-k", "0"]), ("displacement", ["--show", "-1"]),
        ("probe", ["--limit", "0"]), ("probe", ["--every", "0"]), ("probe", ["--batch-size", "0"]),
        ("probe", ["--chunk-size", "0"]), ("probe", ["--poll", "-1"]),
        ("select", ["--batch-size", "0"]), ("select", ["--fraction", "2"]), ("select", ["--max-length", "0"]),
        ("filter", ["--keep-lowest", "-1"]), ("filter", ["--drop-top", "1.5"]),
        ("filter", ["--quantile", "0.5", "--n", "-1"])]


@pytest.mark.parametrize("command,extra", _BAD, ids=[f"{c}{' '.join(e)}" for c, e in _BAD])
def test_bad_numbers_exit_2_naming_the_option(command, extra, capsys):
    assert main([command] + _BASE[command] + extra) == 2
    err = capsys.readouterr().err
    assert extra[-2] in err and "must be" in err and "Traceback" not in err  # the option with the bad value


@pytest.mark.parametrize("argv,needle", [
    (["train", "c.yaml", "--num-processes", "2"], "--num-processes only apply to a multi-host run"),
    (["train", "c.yaml", "--process-id", "1"], "--process-id only apply to a multi-host run"),
    (["train", "c.yaml", "--coordinator", "h:1", "--num-processes", "0"], "--num-processes must be at least 1"),
    (["plot", "somewhere", "--top", "0"], "--top must be at least 1"),
    (["demo", "--pairs", "0"], "--pairs must be at least 1"),
    (["demo", "--steps", "-1"], "--steps must be at least 1"),
])
def test_other_commands_check_their_numbers(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_select_method_is_checked():
    """``select --method`` has one value and is used: it names the method in the summary."""
    s = settings.Select(model="m", data="d", out="o.jsonl", subset="easy")
    assert s.method == "real"
    with pytest.raises(ConfigError, match="--method must be one of real"):
        settings.Select(model="m", data="d", out="o.jsonl", subset="easy", method="ches")
