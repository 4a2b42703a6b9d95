"""The ``jaxalign filter`` job: keep the pairs a score says are safe, written in the input's format.

Razin et al. (§6) mitigate likelihood displacement by training only on the pairs with the *lowest*
LN-CHES. Three ways to choose (``scores`` is one value per scored record):

* ``drop_top=F``: drop the ``round(F·N)`` highest-scoring records, keep the rest;
* ``keep_lowest=K``: keep the ``K`` lowest-scoring records;
* ``quantile=Q, n=K``: the paper's subset of ``K`` records around the ``Q``-quantile
  (:func:`jaxalign.analysis.baselines.quantile_slice`; ``Q = 0`` is the same as ``keep_lowest``).

Ties are broken by input order (stable sort). The kept records are written in input order and in the
input's format: JSONL lines are copied byte for byte, JSON lists, CSV files, Parquet files and
``datasets`` folders keep their fields and types; a built-in set is written as JSONL (or JSON/Parquet,
by the output's suffix) of its standard-format records. Records without a score (skipped as bad when
scoring) are not written, and are counted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from jaxalign import store
from jaxalign.analysis.baselines import quantile_slice
from jaxalign.errors import ConfigError, DataError

_SUFFIX_KIND = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                ".pq": "parquet", ".csv": "csv"}


def select(scores, *, drop_top: float | None = None, keep_lowest: int | None = None,
           quantile: float | None = None, n: int | None = None) -> np.ndarray:
    """Positions into ``scores`` of the kept examples, in ascending position order (module doc).

    Exactly one of ``drop_top``, ``keep_lowest`` or ``quantile`` (with ``n``) must be given.

    Examples:
      >>> select([0.3, 0.9, 0.1, 0.5], drop_top=0.5).tolist()
      [0, 2]
      >>> select([0.3, 0.9, 0.1, 0.5], keep_lowest=1).tolist()
      [2]
      >>> select([0.3, 0.9, 0.1, 0.5], quantile=1.0, n=2).tolist()
      [1, 3]
    """
    scores = np.asarray(scores, np.float64)
    chosen = [name for name, v in (("--drop-top", drop_top), ("--keep-lowest", keep_lowest),
                                   ("--quantile", quantile)) if v is not None]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --drop-top FRACTION, --keep-lowest N, --quantile Q --n N"
                          + (f" (got {', '.join(chosen)})" if chosen else ""))
    N = scores.size
    order = np.argsort(scores, kind="stable")
    if drop_top is not None:
        if not 0.0 <= drop_top <= 1.0:
            raise ConfigError(f"--drop-top must be a fraction in [0, 1], got {drop_top}")
        kept = order[:N - int(round(drop_top * N))]
    elif keep_lowest is not None:
        if keep_lowest < 0:
            raise ConfigError(f"--keep-lowest must be >= 0, got {keep_lowest}")
        kept = order[:keep_lowest]
    else:
        if n is None:
            raise ConfigError("--quantile needs --n (the number of records to keep)")
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(f"--quantile must be in [0, 1], got {quantile}")
        if n < 0:
            raise ConfigError(f"--n must be >= 0, got {n}")
        kept = quantile_slice(scores, quantile, n)
    if n is not None and quantile is None:
        raise ConfigError("--n only goes with --quantile")
    return np.sort(kept)


def run_filter(data: str, scores_path: str, out: str, *, by: str = "ln_ches", drop_top=None,
               keep_lowest=None, quantile=None, n=None, split: str | None = None) -> dict:
    """Selects records of ``data`` by the ``by`` column of ``scores_path`` and writes them to ``out``.

    Returns:
      counts: ``records`` (in the input), ``scored``, ``unscored``, ``kept``, and ``out``.
    """
    from jaxalign.data.load import open_source

    table = store.read_table(scores_path, columns=["index", by])
    index = table.column("index").to_numpy(zero_copy_only=False).astype(np.int64)
    scores = table.column(by).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise DataError(f"score is {scores[bad[0]]} (not a finite number)", path=scores_path,
                        record=int(index[bad[0]]), field=by)
    source = open_source(data, split)
    by_index = {r.index: r for r in source.records}
    unknown = [int(i) for i in index if int(i) not in by_index]
    if unknown:
        raise DataError(f"index {unknown[0]} is not a record of {source.name} ({len(by_index)} records); "
                        f"were the scores computed on another data set?", path=scores_path,
                        record=unknown[0], field="index")
    if np.unique(index).size != index.size:
        raise DataError("duplicate index values", path=scores_path, field="index")
    kept_pos = select(scores, drop_top=drop_top, keep_lowest=keep_lowest, quantile=quantile, n=n)
    kept_index = np.sort(index[kept_pos])
    _write_like(source, data, kept_index, out)
    return {"records": len(source.records), "scored": int(index.size),
            "unscored": len(source.records) - int(index.size), "kept": int(kept_index.size),
            "out": str(out)}


def _out_kind(source, out: str) -> str:
    suffix = Path(out).suffix.lower()
    if source.kind in ("builtin", "list"):
        if suffix and suffix not in _SUFFIX_KIND:
            raise ConfigError(f"--out {out}: write a built-in set as .jsonl, .json or .parquet")
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
