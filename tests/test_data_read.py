"""Reading and validating preference records: every file type and format, every kind of bad record,
the skip policy and its report, and property-based fuzzing of malformed JSONL files."""

import json
import os
import string
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxalign import data
from jaxalign.errors import ConfigError, DataError, JaxAlignError

sys.path.insert(0, os.path.dirname(__file__))
from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir  # noqa: E402,F401

STANDARD = [
    {"prompt": "Q: hi\n", "chosen": "A: hello", "rejected": "A: no"},
    {"prompt": "Q: 2+2?\n", "chosen": "4", "rejected": "5"},
    {"prompt": "Say ünïcode ✓\n", "chosen": "✓ done", "rejected": "no"},
]
EXPECTED = [(i, r["prompt"], r["chosen"], r["rejected"]) for i, r in enumerate(STANDARD)]


def _messages(role, text):
    return [{"role": role, "content": text}]


CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
     "chosen": _messages("assistant", "hello"), "rejected": _messages("assistant", "go away")},
    {"prompt": _messages("user", "2+2?"), "chosen": _messages("assistant", "4"),
     "rejected": _messages("assistant", "5")},
]


def _as_tuples(pairs):
    return [(p.index, p.prompt, p.chosen, p.rejected) for p in pairs]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _write(kind, tmp_path, rows):
    """Writes ``rows`` as a file (or folder) of ``kind``; returns the source to read."""
    if kind == "jsonl":
        return _write_jsonl(tmp_path / "d.jsonl", rows)
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
        return str(tmp_path / "d.json")
    if kind == "json_as_jsonl":  # a .json file holding JSON lines
        return _write_jsonl(tmp_path / "d.json", rows)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "csv":
        import csv
        with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return str(tmp_path / "d.csv")
    if kind == "datasets_folder":
        import datasets
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        return str(tmp_path / "ds")
    if kind == "datasets_dict_folder":
        import datasets
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(
                                  str(tmp_path / "dd"))
        return str(tmp_path / "dd")
    if kind == "list":
        return [dict(r) for r in rows]
    if kind == "datasets_object":
        import datasets
        return datasets.Dataset.from_list(rows)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_as_jsonl", "parquet", "csv", "datasets_folder",
                                  "datasets_dict_folder", "list", "datasets_object"])
def test_standard_format_every_source(kind, tmp_path):
    pairs, report = data.read_pairs(_write(kind, tmp_path, STANDARD))
    assert _as_tuples(pairs) == EXPECTED
    assert (report.read, report.kept, report.skipped, report.format) == (3, 3, (), "standard")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "datasets_folder", "list"])
def test_conversational_format(kind, tmp_path):
    pairs, report = data.read_pairs(_write(kind, tmp_path, CONVERSATIONAL))
    expected = [(i, r["prompt"], r["chosen"], r["rejected"]) for i, r in enumerate(CONVERSATIONAL)]
    assert _as_tuples(pairs) == expected
    assert report.format == "conversational"


def test_datasets_dict_split(tmp_path):
    source = _write("datasets_dict_folder", tmp_path, STANDARD)
    pairs, _ = data.read_pairs(source, split="test")
    assert _as_tuples(pairs) == EXPECTED[:1]
    with pytest.raises(DataError, match="choose a split"):
        data.read_pairs(source, split="validation")


def test_implicit_prompt_standard():
    rows = [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},   # space moves into the responses
            {"chosen": "The cat sat.", "rejected": "The car sat."},   # split inside a word, as TRL
            {"chosen": "abc", "rejected": "abcd"}]                     # a prefix: one char left to each
    pairs, report = data.read_pairs(rows)
    assert report.format == "standard (implicit prompt)"
    assert _as_tuples(pairs) == [(0, "Q: 2+2? A:", " 4", " 5"), (1, "The ca", "t sat.", "r sat."),
                                 (2, "ab", "c", "cd")]


def test_implicit_prompt_conversational():
    user, sys_ = _messages("user", "hi"), _messages("system", "Be brief.")
    rows = [{"chosen": sys_ + user + _messages("assistant", "hello"),
             "rejected": sys_ + user + _messages("assistant", "bye")}]
    pairs, report = data.read_pairs(rows)
    assert report.format == "conversational (implicit prompt)"
    assert _as_tuples(pairs) == [(0, sys_ + user, _messages("assistant", "hello"),
                                  _messages("assistant", "bye"))]


def test_implicit_prompt_without_common_prefix_is_an_error():
    with pytest.raises(DataError, match=r"record 0, field 'prompt': empty prompt: chosen and "
                                        r"rejected share no common prefix"):
        data.read_pairs([{"chosen": "yes", "rejected": "no"}])


def test_custom_field_names(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in STANDARD]
    pairs, _ = data.read_pairs(_write("jsonl", tmp_path, rows), prompt_field="question",
                               chosen_field="good", rejected_field="bad")
    assert _as_tuples(pairs) == EXPECTED
    with pytest.raises(DataError, match="field 'prompt': missing field"):
        data.read_pairs(rows)


GOOD = json.dumps(STANDARD[0]).encode()

# (name, JSONL lines as bytes, expected (index, line, kind, field) of the one bad record)
BAD_LINES = [
    ("invalid json", [GOOD, b'{"prompt": "a", "chosen": ', GOOD], (1, 2, "unparseable", None)),
    ("not utf-8", [GOOD, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'],
     (1, 2, "not-utf8", "prompt")),
    ("missing field", [b'{"prompt": "a", "chosen": "b"}'], (0, 1, "missing-field", "rejected")),
    ("null field", [b'{"prompt": "a", "chosen": null, "rejected": "c"}'],
     (0, 1, "missing-field", "chosen")),
    ("wrong type", [GOOD, GOOD, b'{"prompt": "a", "chosen": 3, "rejected": "c"}'],
     (2, 3, "wrong-type", "chosen")),
    ("messages in a standard set", [GOOD, json.dumps(CONVERSATIONAL[1]).encode()],
     (1, 2, "wrong-type", "prompt")),
    ("empty prompt", [b'{"prompt": "", "chosen": "b", "rejected": "c"}'], (0, 1, "empty", "prompt")),
    ("blank response", [b'{"prompt": "a", "chosen": "b", "rejected": " \\n "}'],
     (0, 1, "empty", "rejected")),
    ("not an object", [GOOD, b'["a", "b", "c"]'], (1, 2, "not-an-object", None)),
    ("blank lines are not records", [b"", GOOD, b"   ", b"7"], (1, 4, "not-an-object", None)),
]


@pytest.mark.parametrize("name,lines,bad", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_record_error_names_file_record_line_field(name, lines, bad, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    index, line, kind, field = bad
    with pytest.raises(DataError) as info:
        data.read_pairs(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}, record {index}")
    assert f"(line {line})" in message
    assert (info.value.path, info.value.record, info.value.field) == (str(path), index, field)


@pytest.mark.parametrize("name,lines,bad", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_record_skip_reports_it(name, lines, bad, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report_file = tmp_path / "skipped.jsonl"
    with pytest.warns(data.DataWarning, match="skipped 1"):
        pairs, report = data.read_pairs(str(path), on_bad_record="skip", report=str(report_file))
    index, line, kind, field = bad
    records = [ln for ln in lines if ln.strip()]
    assert report.read == len(records) and report.kept == len(records) - 1 == len(pairs)
    assert [(p.index, p.line, p.kind, p.field) for p in report.skipped] == [bad]
    written = [json.loads(ln) for ln in report_file.read_text().splitlines()]
    assert [(w["index"], w["line"], w["kind"], w["field"]) for w in written] == [bad]
    assert all(p.prompt == STANDARD[0]["prompt"] for p in pairs)


def test_messages_are_checked(tmp_path):
    rows = [CONVERSATIONAL[0],
            {"prompt": [{"role": "user"}], "chosen": _messages("assistant", "a"),
             "rejected": _messages("assistant", "b")},
            {"prompt": _messages("user", "q"), "chosen": "a string",
             "rejected": _messages("assistant", "b")},
            {"prompt": _messages("user", "q"), "chosen": [{"role": "assistant", "content": 5}],
             "rejected": _messages("assistant", "b")},
            {"prompt": _messages("user", "q"), "chosen": [],
             "rejected": _messages("assistant", "b")}]
    with pytest.warns(data.DataWarning):
        pairs, report = data.read_pairs(rows, on_bad_record="skip")
    assert [p.index for p in pairs] == [0]
    assert [(p.index, p.kind, p.field) for p in report.skipped] == [
        (1, "missing-field", "prompt[0].content"), (2, "wrong-type", "chosen"),
        (3, "wrong-type", "chosen[0].content"), (4, "empty", "chosen")]


def test_error_says_how_many_more_are_bad(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b"}, STANDARD[0], {"prompt": "c"}]
    with pytest.raises(DataError, match=r"record 0, field 'chosen': missing field \(2 more bad"):
        data.read_pairs(rows)


def test_identical_pair_is_kept_with_a_warning():
    rows = [STANDARD[0], {"prompt": "p", "chosen": "same", "rejected": "same"}]
    with pytest.warns(data.DataWarning, match="1 kept pair"):
        pairs, report = data.read_pairs(rows)
    assert len(pairs) == 2 and report.identical == (1,) and report.skipped == ()


def test_report_file_is_written_even_when_nothing_is_skipped(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean data set warns about nothing
        data.read_pairs(STANDARD, report=str(tmp_path / "r.jsonl"))
    assert (tmp_path / "r.jsonl").read_text() == ""


def test_csv_rows_with_missing_or_extra_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"Q: a\nmore",b,c\nonly,two\nx,y,z,extra\nok,1,2\n',
                    encoding="utf-8")
    with pytest.warns(data.DataWarning):
        pairs, report = data.read_pairs(str(path), on_bad_record="skip")
    assert _as_tuples(pairs) == [(0, "Q: a\nmore", "b", "c"), (3, "ok", "1", "2")]
    assert [(p.index, p.line, p.kind, p.field) for p in report.skipped] == [
        (1, 4, "missing-field", "rejected"), (2, 5, "unparseable", None)]


@pytest.mark.parametrize("content,suffix,match", [
    (b'[{"prompt": "a", "chosen": "b", "rejected": "c"},', ".json", "invalid JSON at line 1"),
    (b'{"rows": []}', ".json", None),  # parsed as JSONL: one record that lacks the fields
    (b'"just a string"', ".json", None),
    (b"not parquet", ".parquet", "cannot read Parquet"),
    (b"a,b", ".txt", "unknown file type"),
    (b"", ".csv", "empty CSV"),
])
def test_broken_files(content, suffix, match, tmp_path):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        data.read_pairs(str(path))
    assert str(path) in str(info.value)


def test_missing_paths_and_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        data.read_pairs(str(tmp_path / "folder"))
    with pytest.raises(DataError, match="expected a path or a list"):
        data.read_pairs(42)
    with pytest.raises(DataError, match="expected a path or a list"):
        data.read_pairs({"prompt": "a", "chosen": "b", "rejected": "c"})


def test_bad_options():
    with pytest.raises(ConfigError, match="on_bad_record"):
        data.read_pairs(STANDARD, on_bad_record="ignore")
    with pytest.raises(ConfigError, match="unknown data option"):
        data.read_pairs(STANDARD, prompt_key="q")
    with pytest.raises(ConfigError, match="three different names"):
        data.LoadConfig(prompt_field="x", chosen_field="x")
    with pytest.raises(ConfigError, match="truncation_mode"):
        data.LoadConfig(truncation_mode="middle")


# --- property-based fuzzing of malformed JSONL files -------------------------------------------------

_TEXT = st.text(alphabet=string.ascii_letters + " \n\t✓é日", max_size=12)
_VALID = st.fixed_dictionaries({"prompt": _TEXT, "chosen": _TEXT, "rejected": _TEXT})
_CORRUPTIONS = st.sampled_from(["truncated", "bad-utf8", "drop-field", "int-field", "list", "blank"])


@st.composite
def _jsonl_lines(draw):
    """``(lines, expected)``: JSONL lines (bytes) and, per non-blank line, the expected valid record
    (a dict) or the expected problem kind (a string)."""
    lines, expected = [], []
    for _ in range(draw(st.integers(0, 8))):
        record = draw(_VALID)
        corruption = draw(st.one_of(st.none(), _CORRUPTIONS))
        text = json.dumps(record, ensure_ascii=False).encode()
        if corruption is None:
            valid = all(v.strip() for v in record.values())
            expected.append(record if valid else "empty")
        elif corruption == "truncated":
            text = text[:draw(st.integers(0, len(text) - 1))]
            if not text.strip():
                corruption = "blank"
            else:
                expected.append("unparseable")
        elif corruption == "bad-utf8":
            text = text.replace(b'"prompt": "', b'"prompt": "\xff\xfe', 1)
            expected.append("not-utf8")
        elif corruption == "drop-field":
            # Not the prompt: a file whose first record has no prompt is read as implicit-prompt
            # data (TRL's extract_prompt), which is a different format, not a bad record.
            field = draw(st.sampled_from(["chosen", "rejected"]))
            text = json.dumps({k: v for k, v in record.items() if k != field}).encode()
            expected.append("missing-field")
        elif corruption == "int-field":
            field = draw(st.sampled_from(sorted(record)))
            text = json.dumps({**record, field: 7}).encode()
            expected.append("wrong-type")
        elif corruption == "list":
            text = json.dumps(list(record.values())).encode()
            expected.append("not-an-object")
        if corruption == "blank":
            text = draw(st.sampled_from([b"", b"  ", b"\t"]))
        lines.append(text)
    return lines, expected


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_jsonl_lines())
def test_fuzz_malformed_jsonl(case, tmp_path, tiny_tokenizer):
    lines, expected = case
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    valid = [(i, e) for i, e in enumerate(expected) if isinstance(e, dict)]
    bad = [(i, e) for i, e in enumerate(expected) if isinstance(e, str)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DataWarning)
        pairs, report = data.read_pairs(str(path), on_bad_record="skip")
        ds = data.load_pairs(str(path), tiny_tokenizer, on_bad_record="skip", cache=False)
    # nothing valid is dropped, nothing invalid is kept, counts reconcile
    assert [(p.index, p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (i, e["prompt"], e["chosen"], e["rejected"]) for i, e in valid]
    assert [(p.index, p.kind) for p in report.skipped] == bad
    assert report.read == len(expected) == report.kept + len(report.skipped)
    assert ds.report.read == ds.report.kept + len(ds.report.skipped) == len(expected)
    assert ds.tokens.index.tolist() == [i for i, _ in valid]
    # with the error policy, the first bad record (and nothing else) raises
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DataWarning)
        if bad:
            with pytest.raises(DataError) as info:
                data.read_pairs(str(path))
            assert info.value.record == bad[0][0]
        else:
            data.read_pairs(str(path))


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_fuzz_random_bytes_only_raise_jaxalign_errors(content, suffix, tmp_path):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.DataWarning)
        try:
            pairs, report = data.read_pairs(str(path), on_bad_record="skip")
        except JaxAlignError:
            return
    assert report.read == report.kept + len(report.skipped) == len(pairs) + len(report.skipped)
    for pair in pairs:
        for text in (pair.prompt, pair.chosen, pair.rejected):
            text.encode("utf-8")  # kept texts are valid UTF-8


def test_counts_reconcile_on_a_mixed_file(tmp_path):
    rng = np.random.default_rng(0)
    lines, n_good = [], 0
    for i in range(200):
        if rng.random() < 0.7:
            lines.append(json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}))
            n_good += 1
        else:
            lines.append('{"prompt": ')
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    with pytest.warns(data.DataWarning, match=f"read 200, kept {n_good}, skipped {200 - n_good}"):
        pairs, report = data.read_pairs(str(path), on_bad_record="skip", report=str(tmp_path / "r"))
    assert len((tmp_path / "r").read_text().splitlines()) == 200 - n_good
    assert sorted([p.index for p in pairs] + [p.index for p in report.skipped]) == list(range(200))
