"""The ``jaxalign filter`` job: keep the pairs a score says are safe, written in the input's format.

The rule (:func:`jaxalign.analysis.filtering.select`: ``--drop-top``, ``--keep-lowest`` or ``--quantile``
with ``--n``) picks records by a column of a scores table (``jaxalign ches``'s ``scores.parquet``). The
kept records are written in input order and in the input's format: JSONL lines are copied byte for byte,
JSON lists, CSV files, Parquet files and ``datasets`` folders keep their fields and types; a built-in set
is written as JSONL (or JSON/Parquet, by the output's suffix) of its standard-format records. Records
without a score (skipped as bad when scoring) are not written, and are counted.

A multi-pair format (``ultrafeedback`` raw, ``nectar``: :mod:`jaxalign.data.schemas`) numbers pairs, not
records: there the scores' ``index`` names a pair built from a record, so the kept *pairs* are written,
as standard ``{"prompt", "chosen", "rejected"}`` records (JSONL, or JSON/Parquet by the output's suffix),
built with the same rule as ``jaxalign ches`` used (``--format``, ``--split``, ``--subset`` must match).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from jaxalign import store
from jaxalign.analysis.filtering import select
from jaxalign.errors import ConfigError, DataError
from jaxalign.jobs.settings import Filter

#: source kinds written as standard records (a built-in set, a list, the pairs of a multi-pair format)
_STANDARD_KINDS = ("builtin", "list", "pairs")

_SUFFIX_KIND = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                ".pq": "parquet", ".csv": "csv"}


def run_filter(data: str, scores_path: str, out: str, **settings) -> dict:
    """Selects records of ``data`` by the ``by`` column of ``scores_path`` and writes them to ``out``;
    ``settings`` are :class:`Filter`'s other fields.

    Returns:
      counts: ``records`` (in the input), ``scored``, ``unscored``, ``kept``, and ``out``.
    """
    from jaxalign.data.load import open_source

    cfg = Filter(data=data, scores=scores_path, out=out, **settings)
    by = cfg.by
    table = store.read_table(scores_path, columns=["index", by])
    index = table.column("index").to_numpy(zero_copy_only=False).astype(np.int64)
    scores = table.column(by).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise DataError(f"score is {scores[bad[0]]} (not a finite number)", path=scores_path,
                        record=int(index[bad[0]]), field=by)
    if not index.size:
        raise DataError("no scored records (an empty table)", path=scores_path)
    source = pairs_source(open_source(data, cfg.split, cfg.data_subset), cfg.format)
    by_index = {r.index: r for r in source.records}
    unknown = [int(i) for i in index if int(i) not in by_index]
    if unknown:
        raise DataError(f"index {unknown[0]} is not a record of {source.name} ({len(by_index)} records); "
                        f"were the scores computed on another data set?", path=scores_path,
                        record=unknown[0], field="index")
    if np.unique(index).size != index.size:
        raise DataError("duplicate index values", path=scores_path, field="index")
    kept_pos = select(scores, drop_top=cfg.drop_top, keep_lowest=cfg.keep_lowest, quantile=cfg.quantile, n=cfg.n)
    kept_index = np.sort(index[kept_pos])
    _write_like(source, data, kept_index, out)
    return {"records": len(source.records), "scored": int(index.size),
            "unscored": len(source.records) - int(index.size), "kept": int(kept_index.size),
            "out": str(out)}


def pairs_source(source, format: str | None = None):
    """``source`` itself, or, when its format (``format``, else detected) builds several pairs per record,
    the valid pairs built from it (kind ``"pairs"``: one standard record per pair, keyed by the pair's
    ``index``, as in ``scores.parquet``)."""
    from jaxalign.data.schemas import SCHEMAS, convert_source

    converted = convert_source(source, format=format)
    schema = SCHEMAS.get(converted.schema)
    if schema is None or not schema.multi:
        return source
    pairs = [r for r in converted.source.records if r.error is None and r.value is not None]
    return dataclasses.replace(converted.source, kind="pairs", records=pairs)


def _out_kind(source, out: str) -> str:
    suffix = Path(out).suffix.lower()
    if source.kind in _STANDARD_KINDS:
        if suffix and suffix not in _SUFFIX_KIND or suffix == ".csv":
            raise ConfigError(f"--out {out}: write a built-in set or the pairs of a multi-pair format as "
                              ".jsonl, .json or .parquet")
        return _SUFFIX_KIND.get(suffix, "jsonl")
    if source.kind == "arrow":
        if suffix in _SUFFIX_KIND:
            raise ConfigError(f"--out {out}: the input is a datasets folder, so the output is a folder too "
                              "(give a path without a file suffix)")
        return "arrow"
    expected = [s for s, k in _SUFFIX_KIND.items() if k == source.kind]
    if _SUFFIX_KIND.get(suffix) != source.kind:
        raise ConfigError(f"--out {out}: the input is {source.kind.upper()}, so the output must end in "
                          f"{' or '.join(expected)}")
    return source.kind


def _write_like(source, data: str, kept_index: np.ndarray, out: str) -> None:
    kind = _out_kind(source, out)
    records = {r.index: r for r in source.records}
    values = [records[int(i)].value for i in kept_index]
    if kind == "jsonl" and source.kind == "jsonl":
        lines = Path(data).read_bytes().split(b"\n")
        body = b"".join(lines[records[int(i)].line - 1].rstrip(b"\r") + b"\n" for i in kept_index)
        store.write_bytes(out, body)
    elif kind == "jsonl":
        store.write_bytes(out, "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values).encode())
    elif kind == "json":
        store.write_bytes(out, (json.dumps(values, ensure_ascii=False, indent=2) + "\n").encode())
    elif kind == "parquet":
        if source.kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(data).take(kept_index)
        else:
            import pyarrow as pa

            table = pa.Table.from_pylist(values)
        store.write_table(table, out)
    elif kind == "csv":
        with open(data, newline="", encoding="utf-8", errors="surrogateescape") as f:
            header = next(csv.reader(f))
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(values)
        store.write_bytes(out, buf.getvalue().encode("utf-8", errors="surrogateescape"))
    else:
        _write_arrow_folder(source, kept_index, out)


def _write_arrow_folder(source, kept_index: np.ndarray, out: str) -> None:
    """A ``datasets.save_to_disk``-style folder (one Arrow stream file, ``state.json``), written to a
    temporary folder and renamed into place."""
    import pyarrow as pa

    from jaxalign.data.read import _load_json_file

    folder = source.name
    state = _load_json_file(os.path.join(folder, "state.json"))
    tables = [pa.ipc.open_stream(Path(folder, f["filename"]).read_bytes()).read_all()
              for f in state.get("_data_files", [])]
    table = pa.concat_tables(tables).take(kept_index) if tables else pa.table({})
    target = Path(out)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(tmp / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    new_state = dict(state, _data_files=[{"filename": name}], _fingerprint=None)
    (tmp / "state.json").write_text(json.dumps(new_state, indent=2))
    info = Path(folder, "dataset_info.json")
    if info.exists():
        shutil.copy(info, tmp / "dataset_info.json")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
