"""Reading raw records from files, folders and Python lists, before any validation.

A *source* is one of

* a JSONL file (``.jsonl``, ``.ndjson``; also a ``.json`` file whose first character is not ``[``):
  one JSON object per line, blank lines ignored;
* a JSON file holding a list of objects (``.json``);
* a Parquet file (``.parquet``, ``.pq``);
* a CSV file with a header row (``.csv``; standard format only, every cell is a string);
* any of the files above compressed with gzip (``.jsonl.gz``, ``.json.gz``, ``.parquet`` excepted);
* a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (read with
  pyarrow directly: ``datasets`` is never imported);
* a folder of data files as a data set's repository holds them (a *hub folder*:
  ``data/train_prefs-00000-of-00001.parquet``, ``harmless-base/train.jsonl.gz``,
  ``data/Alpaca-7B/test.jsonl``). A file's *split* is its name up to the first ``-`` or ``.``
  (``train_prefs``, ``train``); its *subset* is its folder below the root, a leading ``data/`` left out
  (``harmless-base``, ``Alpaca-7B``; files directly in the root or in ``data/`` have none). ``split``
  picks one split (default ``train``, else the only one); ``subset`` one subset (default: all, in path
  order). The chosen files are read in path order and their records numbered on, as one source;
  :attr:`Source.parts` lists them;
* a Python sequence or iterable of dicts (a list, or a ``datasets.Dataset``).

:func:`read_source` turns it into :class:`RawRecord` s, one per record, in file order. A record that cannot
be parsed (an invalid JSON line) becomes a ``RawRecord`` with ``error`` set instead of an exception, so
that the ``skip`` policy can report it and go on. Bytes that are not UTF-8 are decoded with
``surrogateescape``, so they survive as lone surrogates inside strings and validation reports them on
the record and field where they occur. Errors about the whole file (missing file, a JSON list that
does not parse, a broken Parquet file) raise :class:`jaxalign.errors.DataError` at once.

Each source also gets a content fingerprint (SHA-256 of its bytes, or of the canonical JSON of a Python
list) used as part of the tokenization cache key.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from jaxalign.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One record as read, before validation.

    Attributes:
      index: 0-based position of the record in its source (blank JSONL lines are not records).
      value: the parsed object (normally a dict), or ``None`` when ``error`` is set.
      error: why the record could not be parsed, or ``None``.
      line: 1-based line number in a JSONL or CSV file, else ``None`` (also for the records of a
        hub folder of several files).
      error_kind, error_field: the problem kind and field of ``error`` (a record that a schema reader
        found bad, :mod:`jaxalign.data.schemas`).
    """

    index: int
    value: Any
    error: str | None = None
    line: int | None = None
    error_kind: str = "unparseable"
    error_field: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    """The records of one source.

    Attributes:
      name: the path or a short description (``"<list of 3 records>"``), used in messages.
      kind: ``"jsonl"``, ``"json"``, ``"parquet"``, ``"csv"``, ``"arrow"`` (a ``datasets`` folder),
        ``"list"`` or ``"builtin"``.
      records: the raw records, in order.
      fingerprint: hex SHA-256 of the content (with the kind and split).
      parts: for a hub folder, ``(file, number of records)`` of each file read, in order.
    """

    name: str
    kind: str
    records: list[RawRecord]
    fingerprint: str
    parts: tuple[tuple[str, int], ...] = ()


def read_source(source: Any, *, split: str | None = None, subset: str | None = None) -> Source:
    """Reads every record of a file, a ``datasets`` folder or a Python iterable of dicts.

    Args:
      source: a path (``str`` or ``os.PathLike``) or an iterable of mappings.
      split: for a ``DatasetDict`` folder or a hub folder, the split to read (default ``"train"``, or
        the only split).
      subset: for a hub folder, the subset (sub-folder) to read (default: all).

    Returns:
      The :class:`Source`; unparseable records carry an ``error`` instead of raising.

    Raises:
      DataError: the file is missing, of an unknown type, or broken as a whole.
    """
    if isinstance(source, (str, os.PathLike)):
        return read_path(os.fspath(source), split=split, subset=subset)
    if split is not None or subset is not None:
        raise DataError("split and subset apply to folders only, not to a list of records")
    if isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise DataError(f"expected a path or a list of records, got {type(source).__name__}")
    return read_list(source)


def read_list(rows: Iterable[Any], *, name: str | None = None, kind: str = "list",
              fingerprint_extra: str = "") -> Source:
    """Wraps an iterable of records (normally dicts) as a :class:`Source`."""
    values = list(rows)
    digest = hashlib.sha256(f"{kind}\0{fingerprint_extra}\0".encode())
    digest.update(json.dumps(values, sort_keys=True, ensure_ascii=True, default=repr).encode())
    name = name or f"<list of {len(values)} records>"
    return Source(name, kind, [RawRecord(i, v) for i, v in enumerate(values)], digest.hexdigest())


def read_path(path: str, *, split: str | None = None, subset: str | None = None) -> Source:
    """Reads a file or a folder, choosing the reader from the suffix (see module doc)."""
    if os.path.isdir(path):
        if _is_arrow_folder(path):
            if subset is not None:
                raise DataError(f"subset={subset!r} applies to a hub folder, not to a datasets folder",
                                path=path)
            return _read_arrow_folder(path, split)
        return _read_hub_folder(path, split, subset)
    if not os.path.exists(path):
        raise DataError("no such file or folder", path=path)
    if split is not None or subset is not None:
        raise DataError("split/subset apply to folders only, not to one file", path=path)
    return _read_file(path)


def _read_file(path: str) -> Source:
    lower = path.lower()
    data = _read_bytes(path)
    if lower.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DataError(f"cannot decompress gzip: {err}", path=path) from None
        lower = lower[:-3]
    if lower.endswith(JSONL_SUFFIXES):
        return _read_jsonl(path, data)
    if lower.endswith(JSON_SUFFIXES):
        if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
            return _read_json_list(path, data)
        return _read_jsonl(path, data)
    if lower.endswith(PARQUET_SUFFIXES):
        return _read_parquet(path, data)
    if lower.endswith(CSV_SUFFIXES):
        return _read_csv(path, data)
    known = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES
    raise DataError(f"unknown file type; expected one of {', '.join(known)} (or .gz of the text "
                    f"ones), a datasets folder (save_to_disk) or a folder of such files", path=path)


def _is_arrow_folder(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def _data_files(root: str) -> list[tuple[str, str, str]]:
    """``(relative path, split, subset)`` of every data file under ``root``, in path order."""
    suffixes = tuple(s + z for s in JSONL_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES for z in ("", ".gz"))
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(suffixes + PARQUET_SUFFIXES):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)
            parts = rel.split(os.sep)[:-1]
            parts = parts[1:] if parts[:1] == ["data"] else parts
            split = name.split("-", 1)[0].split(".", 1)[0]
            found.append((rel, split, "/".join(parts)))
    return sorted(found)


def _read_hub_folder(path: str, split: str | None, subset: str | None) -> Source:
    """Reads the files of one split (and subset) of a folder of data files (module doc)."""
    files = _data_files(path)
    if not files:
        raise DataError("no data files (.parquet, .jsonl, .json, .csv, optionally .gz) in this folder, "
                        "and it is not a datasets folder written by save_to_disk (no state.json or "
                        "dataset_dict.json)", path=path)
    splits = sorted({s for _, s, _ in files})
    if split is None:
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise DataError(f"choose a split with split=... (--split); this folder has {splits}", path=path)
    if split not in splits:
        raise DataError(f"no split {split!r}; this folder has {splits}", path=path)
    files = [f for f in files if f[1] == split]
    subsets = sorted({s for _, _, s in files})
    if subset is not None:
        if subset not in subsets:
            raise DataError(f"no subset {subset!r} in split {split!r}; subsets: {subsets}", path=path)
        files = [f for f in files if f[2] == subset]
    records, parts, prints = [], [], []
    for rel, _, _ in files:
        part = _read_file(os.path.join(path, rel))
        parts.append((rel, len(part.records)))
        prints.append(part.fingerprint.encode())
        start, single = len(records), len(files) == 1
        records.extend(dataclasses.replace(r, index=start + k, line=r.line if single else None)
                       for k, r in enumerate(part.records))
    name = f"{path} [split {split}" + (f", subset {subset}" if subset is not None else "") + "]"
    return Source(name, "hub", records, _fingerprint(f"hub:{split}:{subset}", *prints), tuple(parts))


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataError(f"cannot read: {err.strerror or err}", path=path) from None


def _fingerprint(kind: str, *chunks: bytes) -> str:
    digest = hashlib.sha256(f"{kind}\0".encode())
    for chunk in chunks:
        digest.update(hashlib.sha256(chunk).digest())
    return digest.hexdigest()


def _decode(data: bytes) -> str:
    """UTF-8 with a BOM removed; invalid bytes become lone surrogates that validation reports."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _read_jsonl(path: str, data: bytes) -> Source:
    records = []
    for line_no, raw in enumerate(_decode(data).split("\n"), start=1):
        if not raw.strip():
            continue
        index = len(records)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            records.append(RawRecord(index, None, f"invalid JSON at column {err.colno}: {err.msg}",
                                     line_no))
            continue
        records.append(RawRecord(index, value, None, line_no))
    return Source(path, "jsonl", records, _fingerprint("jsonl", data))


def _read_json_list(path: str, data: bytes) -> Source:
    try:
        value = json.loads(_decode(data))
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg} "
                        f"(a JSON file must hold one list of records; use JSONL to skip bad lines)",
                        path=path) from None
    if not isinstance(value, list):
        raise DataError(f"a JSON file must hold a list of records, found {type(value).__name__}",
                        path=path)
    return Source(path, "json", [RawRecord(i, v) for i, v in enumerate(value)],
                  _fingerprint("json", data))


def _read_csv(path: str, data: bytes) -> Source:
    text = _decode(data)
    reader = csv.DictReader(io.StringIO(text, newline=""), restval=None)
    records, line_no = [], 1
    try:
        for row in reader:
            start, line_no = line_no + 1, reader.line_num
            extra = row.pop(None, None)
            error = f"{len(extra)} more cells than header columns" if extra else None
            records.append(RawRecord(len(records), None if error else row, error, start))
    except csv.Error as err:
        raise DataError(f"invalid CSV near line {reader.line_num}: {err}", path=path) from None
    if reader.fieldnames is None:
        raise DataError("empty CSV file (no header row)", path=path)
    return Source(path, "csv", records, _fingerprint("csv", data))


def _read_parquet(path: str, data: bytes) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read Parquet: {err}", path=path) from None
    rows = table.to_pylist()
    return Source(path, "parquet", [RawRecord(i, v) for i, v in enumerate(rows)],
                  _fingerprint("parquet", data))


def _read_arrow_folder(path: str, split: str | None) -> Source:
    """Reads a folder written by ``Dataset.save_to_disk`` (or one split of a ``DatasetDict``)."""
    import pyarrow as pa

    dict_file = os.path.join(path, "dataset_dict.json")
    if os.path.exists(dict_file):
        splits = _load_json_file(dict_file).get("splits", [])
        if split is None:
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split not in splits:
            raise DataError(f"choose a split with split=...; this DatasetDict has {splits}", path=path)
        path = os.path.join(path, split)
    elif split is not None:
        raise DataError(f"split={split!r} given but the folder is a single Dataset", path=path)
    state_file = os.path.join(path, "state.json")
    if not os.path.exists(state_file):
        raise DataError("a folder must be written by datasets' save_to_disk (no state.json or "
                        "dataset_dict.json found)", path=path)
    files = [f["filename"] for f in _load_json_file(state_file).get("_data_files", [])]
    tables, chunks = [], []
    for name in files:
        data = _read_bytes(os.path.join(path, name))
        try:
            tables.append(pa.ipc.open_stream(data).read_all())
        except pa.ArrowException as err:
            raise DataError(f"cannot read Arrow file {name}: {err}", path=path) from None
        chunks.append(data)
    rows = [row for table in tables for row in table.to_pylist()]
    return Source(path, "arrow", [RawRecord(i, v) for i, v in enumerate(rows)],
                  _fingerprint(f"arrow:{split}", *chunks))


def _load_json_file(path: str) -> dict:
    try:
        value = json.loads(_read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"invalid JSON: {err}", path=path) from None
    if not isinstance(value, dict):
        raise DataError("expected a JSON object", path=path)
    return value
