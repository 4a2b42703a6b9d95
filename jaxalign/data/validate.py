"""Checking every record, the bad-record policy and the skip report.

Each raw record is either turned into a :class:`Pair` or described by a :class:`Problem` naming its
index, line, field and reason. Problem kinds:

==================  ==============================================================================
``unparseable``     a JSONL line that is not valid JSON, or a CSV row with too many cells
``not-utf8``        a string holding bytes that are not UTF-8 (or an unpaired surrogate)
``not-an-object``   a record that is not a dict
``missing-field``   a required field is absent (or an empty CSV cell at the end of a short row)
``wrong-type``      a field of the wrong type (a string where messages are expected, a message without
                    ``role``/``content``, a prompt field in an implicit-prompt data set, ...)
``empty``           an empty (or whitespace-only) prompt or response
``chat-template``   the chat template rejects the messages (found while tokenizing)
``over-long``       longer than ``max_length``/``max_prompt_length`` and not truncated (while tokenizing)
``mismatch``        a record whose parts disagree in a built-in schema (a first user turn that is not
                    ``prompt``, a rejected transcript that does not continue chosen's prompt, ...)
``bad-value``       a label or score outside its range (``labels`` not 0/1, a strength outside -3…3)
==================  ==============================================================================

``chosen == rejected`` is not an error: the pair is kept (its CHES is defined, training on it is useless)
and counted in :attr:`DataReport.identical`, with a :class:`DataWarning`.

With ``on_bad_record="error"`` the first problem raises :class:`jaxalign.errors.DataError` (its message
also says how many other records are bad); with ``"skip"`` bad records are left out, counted, and can be
written to a JSONL report with :func:`write_report`. Counts always reconcile:
``read == kept + len(skipped)``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any

from jaxalign.data.formats import Fields, Format, Text, detect_format, extract_prompt
from jaxalign.data.read import RawRecord, Source
from jaxalign.errors import ConfigError, DataError

POLICIES = ("error", "skip")


class DataWarning(UserWarning):
    """Something in the data that is kept but worth knowing (identical pairs, truncation, skips)."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """A valid preference record (strings, or lists of messages when conversational).

    Attributes:
      index: position of the record in its source.
      prompt, chosen, rejected: the texts; ``prompt + chosen`` is the chosen sequence.
    """

    index: int
    prompt: Text
    chosen: Text
    rejected: Text


@dataclasses.dataclass(frozen=True)
class Problem:
    """Why one record was rejected: ``kind`` (see module doc), ``reason`` in words, and where."""

    index: int
    kind: str
    reason: str
    field: str | None = None
    line: int | None = None

    def to_error(self, source_name: str, suffix: str = "") -> DataError:
        where = f"(line {self.line}) " if self.line is not None else ""
        return DataError(where + self.reason + suffix, path=source_name, record=self.index,
                         field=self.field)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DataReport:
    """What happened to the records of one source.

    Attributes:
      source: the source's name (path, built-in name or ``<list of N records>``).
      format: the detected format's name (``"standard"``, ``"conversational (implicit prompt)"``, ...).
      read: number of records read.
      kept: number of records kept.
      skipped: the problems of the records left out (``on_bad_record="skip"``, ``overlong="drop"``).
      identical: indices of kept records with ``chosen == rejected``.
      truncated: number of kept records shortened to fit ``max_length``/``max_prompt_length``.
      prompt_mismatch: number of kept records whose joint tokenization changed the prompt's tokens.
      schema: the built-in format the records were read with (:mod:`jaxalign.data.schemas`), or
        ``"trl"``.
      detected: why that format was used (one line).
      records: the number of records in the source when a schema reader built the pairs (``read`` then
        counts the pairs built plus the bad records), else ``None``.
      no_pair: source positions of the records that gave no pair (tied scores, a margin not reached).
      unselected: valid pairs left out by ``limit`` or ``sample``.
      pairing: the aspect and pairing rule in words (ranked formats), else ``""``.
    """

    source: str
    format: str
    read: int
    kept: int
    skipped: tuple[Problem, ...] = ()
    identical: tuple[int, ...] = ()
    truncated: int = 0
    prompt_mismatch: int = 0
    schema: str = "trl"
    detected: str = ""
    records: int | None = None
    no_pair: tuple[int, ...] = ()
    unselected: int = 0
    pairing: str = ""

    def counts_by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(p.kind for p in self.skipped))

    def summary(self) -> str:
        """One line: ``read 10, kept 8, skipped 2 (missing-field 2); 1 pair with chosen == rejected``."""
        text = f"read {self.read}, kept {self.kept}, skipped {len(self.skipped)}"
        if self.records is not None:
            text = f"{self.records} records gave {self.read} rows (pairs and bad records); " + text
        kinds = self.counts_by_kind()
        if kinds:
            text += " (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")"
        if self.unselected:
            text += f", not selected {self.unselected} (limit/sample)"
        notes = []
        if self.no_pair:
            notes.append(f"{len(self.no_pair)} record(s) gave no pair (tied scores or margin)")
        if self.identical:
            notes.append(f"{len(self.identical)} kept pair(s) with chosen == rejected")
        if self.truncated:
            notes.append(f"{self.truncated} truncated")
        if self.prompt_mismatch:
            notes.append(f"{self.prompt_mismatch} with prompt tokens changed by joint tokenization")
        return "; ".join([text] + notes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skipped"] = [p.to_json() for p in self.skipped]
        out["identical"] = list(self.identical)
        out["no_pair"] = list(self.no_pair)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataReport:
        data = dict(data)
        data["skipped"] = tuple(Problem(**p) for p in data["skipped"])
        data["identical"] = tuple(data["identical"])
        data["no_pair"] = tuple(data.get("no_pair", ()))
        return cls(**data)


def check_policy(on_bad_record: str) -> None:
    if on_bad_record not in POLICIES:
        raise ConfigError(f"on_bad_record must be one of {POLICIES}, got {on_bad_record!r}")


def validate_source(source: Source, fields: Fields, on_bad_record: str = "error",
                    fmt: Format | None = None) -> tuple[list[Pair], DataReport]:
    """Checks every record of a source.

    Args:
      source: the raw records.
      fields: the field names.
      on_bad_record: ``"error"`` raises on the first bad record; ``"skip"`` leaves bad records out.
      fmt: the format to require; detected from the first record with a chosen field if ``None``.

    Returns:
      The valid pairs in source order and the :class:`DataReport` (``read == kept + len(skipped)``).

    Raises:
      DataError: a bad record under ``on_bad_record="error"``.
    """
    check_policy(on_bad_record)
    if fmt is None:
        fmt = detect_format([r.value for r in source.records if r.error is None], fields)
    pairs, problems, identical = [], [], []
    for raw in source.records:
        result = check_record(raw, fields, fmt)
        if isinstance(result, Problem):
            problems.append(result)
            continue
        pairs.append(result)
        if result.chosen == result.rejected:
            identical.append(result.index)
    if problems and on_bad_record == "error":
        raise first_error(problems, source.name)
    report = DataReport(source.name, fmt.name, len(source.records), len(pairs), tuple(problems),
                        tuple(identical))
    return pairs, report


def first_error(problems: list[Problem], source_name: str) -> DataError:
    """The DataError of the first problem, saying how many more there are."""
    more = ""
    if len(problems) > 1:
        more = (f" ({len(problems) - 1} more bad record(s); on_bad_record='skip' leaves them out and "
                f"a report file lists them)")
    return problems[0].to_error(source_name, more)


def check_record(raw: RawRecord, fields: Fields, fmt: Format) -> Pair | Problem:
    """Turns one raw record into a :class:`Pair`, or the first :class:`Problem` found in it."""

    def problem(kind: str, reason: str, field: str | None = None) -> Problem:
        return Problem(raw.index, kind, reason, field, raw.line)

    if raw.error is not None:
        return problem(raw.error_kind, raw.error, raw.error_field)
    value = raw.value
    if not isinstance(value, dict):
        return problem("not-an-object", f"a record must be an object, found {type_name(value)}")
    names = [fields.chosen, fields.rejected]
    if fmt.implicit_prompt:
        if fields.prompt in value:
            return problem("wrong-type", "a prompt field in a data set whose first record has none "
                           "(implicit prompt)", fields.prompt)
    else:
        names.insert(0, fields.prompt)
    texts = {}
    for name in names:
        if name not in value or value[name] is None:
            return problem("missing-field", "missing field", name)
        found = _check_text(value[name], name, fmt.conversational)
        if isinstance(found, tuple):
            return problem(*found)
        texts[name] = value[name]
    if fmt.implicit_prompt:
        prompt, chosen, rejected = extract_prompt(texts[fields.chosen], texts[fields.rejected])
    else:
        prompt, chosen, rejected = (texts[fields.prompt], texts[fields.chosen],
                                    texts[fields.rejected])
    for name, text in ((fields.prompt, prompt), (fields.chosen, chosen), (fields.rejected, rejected)):
        if _is_empty(text):
            why = ("empty prompt: chosen and rejected share no common prefix"
                   if fmt.implicit_prompt and name == fields.prompt else f"empty {_role(name, fields)}")
            return problem("empty", why, name)
    return Pair(raw.index, prompt, chosen, rejected)


def _role(name: str, fields: Fields) -> str:
    return {fields.prompt: "prompt", fields.chosen: "response", fields.rejected: "response"}[name]


def _check_text(value: Any, name: str, conversational: bool) -> tuple[str, str, str] | None:
    """``(kind, reason, field)`` when ``value`` is not a valid text of the format, else ``None``."""
    if not conversational:
        if not isinstance(value, str):
            return ("wrong-type", f"expected a string, found {type_name(value)} (a data set is "
                    f"conversational only if its first record's chosen field is a list)", name)
        return _check_utf8(value, name)
    if not isinstance(value, list):
        return ("wrong-type", f"expected a list of messages, found {type_name(value)} (the first "
                f"record is conversational)", name)
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            return ("wrong-type", f"a message must be an object, found {type_name(message)}", where)
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                return ("missing-field", "missing field", f"{where}.{key}")
            if not isinstance(message[key], str):
                return ("wrong-type", f"expected a string, found {type_name(message[key])}",
                        f"{where}.{key}")
            bad = _check_utf8(message[key], f"{where}.{key}")
            if bad:
                return bad
    return None


def _check_utf8(text: str, field: str) -> tuple[str, str, str] | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return ("not-utf8", f"bytes that are not UTF-8 at character {err.start}", field)
    return None


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return not any(m["content"].strip() for m in text)


def type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def write_report(path: str | os.PathLike, report: DataReport) -> None:
    """Writes one JSON line per skipped record: ``index``, ``kind``, ``reason``, ``field``, ``line``.

    The file is written even when nothing was skipped (then it is empty).
    """
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in report.skipped:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
