"""Result tables: Parquet files written atomically, and long jobs written in resumable row chunks.

Every per-example result of jaxalign (CHES scores, displacement, entanglement, …) is a Parquet table with
documented column names. Two rules make long jobs safe to interrupt:

* **Atomic commit.** A finished file is written to a temporary name in the same folder and renamed over
  the target (:func:`write_table`, :func:`write_json`, :func:`write_bytes`), so a reader sees either the
  old file or the complete new one, never half a file.
* **Resumable chunks.** :class:`ChunkedTable` writes each completed unit of work (a batch, a checkpoint, …)
  as a part file ``<table>.parts/part-<id>.parquet`` and then records the id in
  ``<table>.parts/progress.json``. A rerun skips the recorded ids; :meth:`ChunkedTable.commit` joins the
  parts, checks that the key column (e.g. ``index``) has no duplicates (and, if asked, no gaps), sorts by
  it and commits the table atomically. The progress file stores a *fingerprint* of the run (its
  arguments and inputs); resuming with a different fingerprint is refused, since the parts would mix two
  runs.

* **Zarr rows.** :class:`ZarrGroup` is a zarr v3 group (written with ``tensorstore``) of arrays whose
  first axis is rows: the training ledger (a row per recorded step), the ``entangle`` job's per-pair
  arrays (a row per pair) and the ``probe`` store (a row per checkpoint) all use it.
* **One digest.** :func:`digest` is the SHA-256 of named arrays (token ids, batch plans);
  :func:`model_digest` is a model's identity: the SHA-256 of the names and *contents* of its weight files
  (``*.safetensors``, ``.gguf``) and ``config.json``. Content, not file names, sizes or times: a copied
  or re-downloaded model resumes, a model rewritten in place with other weights does not (the reference
  cache key and every job fingerprint use this one rule; reading costs about a second per GB).

Example::

    chunks = ChunkedTable("out/scores.parquet", fingerprint={"model": "m", "batch_size": 8})
    for batch_id, batch in enumerate(batches):
        if chunks.is_done(batch_id):
            continue
        chunks.write_chunk(batch_id, {"index": batch.index, "score": compute(batch)})
    table = chunks.commit(expected_keys=range(n))
    chunks.cleanup()
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxalign.errors import CheckpointError, DataError

PROGRESS_NAME = "progress.json"


# --- atomic files -----------------------------------------------------------------------------------

def _file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (``mkstemp`` would give 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()  # once, at import: os.umask is process-wide and not thread-safe


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    The file gets the permissions a plain ``open(path, "wb")`` would give it (others can read shared run
    outputs), not the private mode of the temporary file.
    """
    def fill(f) -> None:
        f.write(data)

    return _replace_atomically(path, fill)


def _replace_atomically(path: str | os.PathLike, fill) -> Path:
    """Writes ``path`` through ``fill(binary file)`` into a temporary file in the same folder (the mode of
    a plain ``open``), fsyncs it and renames it over ``path``; the temporary file goes on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Writes ``obj`` as JSON atomically (NumPy scalars and arrays are converted)."""
    text = json.dumps(obj, indent=indent, default=_json_default, sort_keys=False)
    return write_bytes(path, (text + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file; a missing or broken file raises ``DataError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err})", path=str(path)) from None


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} as JSON")


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- digests ----------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of named arrays: each name, then its C-order bytes, in name order.

    >>> digest({"a": np.arange(3, dtype=np.int64)}) == digest({"a": np.arange(3, dtype=np.int64)})
    True
    """
    h = hashlib.sha256()
    for name, arr in sorted(arrays.items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def model_digest(path: str | os.PathLike) -> str:
    """A model's identity (module doc): SHA-256 over the names and contents of the weight files of a
    model folder (or one ``.gguf`` file) and its ``config.json``."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name == "config.json")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# --- tables -----------------------------------------------------------------------------------------

def to_table(data: pa.Table | Mapping[str, Any]) -> pa.Table:
    """A ``pyarrow.Table`` from a table or a mapping of column name to array/list (equal lengths)."""
    if isinstance(data, pa.Table):
        return data
    columns = {}
    lengths = set()
    for name, values in data.items():
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            columns[name] = values
        else:
            arr = np.asarray(values)
            # NumPy's fixed-width strings drop trailing NUL characters: text goes in as Python strings.
            columns[name] = pa.array(arr) if arr.dtype.kind not in "OUS" else pa.array(list(values))
        lengths.add(len(columns[name]))
    if len(lengths) > 1:
        sizes = {k: len(v) for k, v in columns.items()}
        raise ValueError(f"columns have different lengths: {sizes}")
    return pa.table(columns)


def write_table(data: pa.Table | Mapping[str, Any], path: str | os.PathLike, *,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Writes a Parquet table atomically.

    Args:
      data: a ``pyarrow.Table`` or a mapping of column name to 1-D array/list.
      path: target ``.parquet`` file (its folder is created).
      metadata: JSON-serialisable key/values stored in the file's schema metadata under ``jaxalign``
        (read back with :func:`table_metadata`).

    Returns:
      the path written.
    """
    table = to_table(data)
    if metadata is not None:
        meta = dict(table.schema.metadata or {})
        meta[b"jaxalign"] = json.dumps(metadata, default=_json_default).encode()
        table = table.replace_schema_metadata(meta)
    return _replace_atomically(path, lambda f: pq.write_table(table, f))


def read_table(path: str | os.PathLike, columns: Iterable[str] | None = None) -> pa.Table:
    """Reads a Parquet table; a missing file, a non-Parquet file or a missing column raises
    ``DataError`` naming the file (and the column)."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=str(path))
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a Parquet file ({err})", path=str(path)) from None
    if columns is not None:
        columns = list(columns)
        for c in columns:
            if c not in schema.names:
                raise DataError(f"no such column (columns: {', '.join(schema.names)})", path=str(path),
                                field=c)
    return pq.read_table(path, columns=columns)


def table_metadata(path_or_table: str | os.PathLike | pa.Table) -> dict[str, Any]:
    """The ``metadata`` given to :func:`write_table` (``{}`` when none)."""
    schema = (path_or_table.schema if isinstance(path_or_table, pa.Table)
              else pq.read_schema(path_or_table))
    raw = (schema.metadata or {}).get(b"jaxalign")
    return json.loads(raw) if raw else {}


# --- resumable chunked tables -----------------------------------------------------------------------

class ChunkedTable:
    """A Parquet table written in chunks that survive an interrupted run.

    Args:
      path: the final table, e.g. ``out/scores.parquet``. Parts go to ``out/scores.parquet.parts/``.
      fingerprint: JSON-serialisable description of the run (arguments, input files and sizes). A rerun
        with parts from a run of another fingerprint raises ``CheckpointError`` naming the differences.
      key: the column that identifies rows (unique in the committed table; its sort order).

    A chunk is identified by a non-negative integer id (e.g. the batch number). ``write_chunk`` writes the
    part file atomically *then* records the id in the progress file (also atomically), so a crash between
    the two leaves an unrecorded part that the rerun simply rewrites.
    """

    def __init__(self, path: str | os.PathLike, *, fingerprint: Mapping[str, Any] | None = None,
                 key: str = "index"):
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.progress_path = self.parts_dir / PROGRESS_NAME
        self.key = key
        self.fingerprint = json.loads(json.dumps(dict(fingerprint or {}), default=_json_default))
        self._done: dict[int, int] = {}
        if self.progress_path.exists():
            progress = read_json(self.progress_path)
            old = progress.get("fingerprint", {})
            if old != self.fingerprint:
                diff = sorted(k for k in set(old) | set(self.fingerprint)
                              if old.get(k) != self.fingerprint.get(k))
                details = "; ".join(f"{k}: {old.get(k)!r} then, {self.fingerprint.get(k)!r} now"
                                    for k in diff)
                raise CheckpointError(
                    f"{self.progress_path}: an interrupted run with other settings is there ({details}); "
                    f"rerun it with the same settings to resume, or remove {self.parts_dir} to start over")
            self._done = {int(k): int(v) for k, v in progress.get("done", {}).items()}

    @property
    def done(self) -> frozenset[int]:
        """Ids of the chunks already written."""
        return frozenset(self._done)

    @property
    def rows_done(self) -> int:
        return sum(self._done.values())

    @property
    def resuming(self) -> bool:
        return bool(self._done)

    def is_done(self, chunk_id: int) -> bool:
        return int(chunk_id) in self._done

    def _part_path(self, chunk_id: int) -> Path:
        return self.parts_dir / f"part-{int(chunk_id):08d}.parquet"

    def write_chunk(self, chunk_id: int, data: pa.Table | Mapping[str, Any]) -> None:
        """Writes one chunk's rows (must contain the key column) and records it as done."""
        chunk_id = int(chunk_id)
        if chunk_id < 0:
            raise ValueError(f"chunk ids are non-negative, got {chunk_id}")
        table = to_table(data)
        if self.key not in table.column_names:
            raise ValueError(f"chunk has no key column {self.key!r} (columns: {table.column_names})")
        write_table(table, self._part_path(chunk_id))
        self._done[chunk_id] = table.num_rows
        self._write_progress()

    def _write_progress(self) -> None:
        write_json(self.progress_path, {"fingerprint": self.fingerprint,
                                        "done": {str(k): v for k, v in sorted(self._done.items())}},
                   indent=None)

    def read_parts(self) -> pa.Table | None:
        """All recorded parts as one table (in chunk order), or ``None`` when nothing was written."""
        tables = [pq.read_table(self._part_path(i)) for i in sorted(self._done)]
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    def commit(self, *, expected_keys: Iterable[int] | None = None,
               metadata: Mapping[str, Any] | None = None, schema: pa.Schema | None = None) -> pa.Table:
        """Joins the parts, checks the key column, sorts by it and writes the final table atomically.

        Args:
          expected_keys: when given, the committed keys must be exactly these (no gaps, no extras).
          metadata: stored with :func:`write_table`.
          schema: the table's schema when no part was written (an empty result).

        Returns:
          the committed table. The parts stay until :meth:`cleanup` (so a crash after the commit but
          before the caller's own final writes can still be rerun).
        """
        table = self.read_parts()
        if table is None:
            if schema is None:
                raise ValueError("no chunk was written and no schema given for the empty table")
            table = schema.empty_table()
        keys = np.asarray(table.column(self.key).to_numpy(zero_copy_only=False))
        uniq, counts = np.unique(keys, return_counts=True)
        if np.any(counts > 1):
            dups = uniq[counts > 1][:10].tolist()
            raise CheckpointError(f"{self.parts_dir}: duplicate {self.key} values in the parts: {dups}")
        if expected_keys is not None:
            expected = np.unique(np.fromiter(expected_keys, dtype=np.int64))
            missing = np.setdiff1d(expected, uniq)
            extra = np.setdiff1d(uniq, expected)
            if missing.size or extra.size:
                raise CheckpointError(
                    f"{self.parts_dir}: the parts do not cover the run: missing {self.key} "
                    f"{missing[:10].tolist()}, unexpected {extra[:10].tolist()}")
        table = table.take(pa.array(np.argsort(keys, kind="stable")))
        write_table(table, self.path, metadata=metadata)
        return table

    def cleanup(self) -> None:
        """Removes the parts folder (after the caller has written everything that depends on them)."""
        shutil.rmtree(self.parts_dir, ignore_errors=True)


# --- zarr rows --------------------------------------------------------------------------------------

class ZarrGroup:
    """A zarr v3 group of arrays written with ``tensorstore``; the first axis of each array is rows.

    Args:
      path: the group folder (``…/ledger.zarr``).
      attributes: written to the group's ``zarr.json`` when it has none yet; ``None`` leaves that to a
        later :meth:`set_attributes` (a group whose ``zarr.json`` is written last is complete once it
        exists).
      fresh: delete whatever is at ``path`` first.

    Arrays are created with :meth:`create` (replacing one of the same name) or opened with :meth:`open`;
    both keep the handle under the array's name. :meth:`set_attributes` rewrites ``zarr.json``
    atomically: a job that records its committed row count there (``probe``) commits a row with it.
    """

    def __init__(self, path: str | os.PathLike, *, attributes: Mapping[str, Any] | None = None,
                 fresh: bool = False):
        self.path = Path(path)
        if fresh:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.arrays: dict[str, Any] = {}
        if attributes is not None and not (self.path / "zarr.json").exists():
            self.set_attributes(attributes)

    @property
    def attributes(self) -> dict[str, Any]:
        return read_json(self.path / "zarr.json").get("attributes", {})

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        write_json(self.path / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                             "attributes": dict(attributes)})

    def has(self, name: str) -> bool:
        return (self.path / name / "zarr.json").exists()

    def _spec(self, name: str) -> dict:
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}

    def create(self, name: str, shape: Sequence[int], dtype: str, *, chunks: Sequence[int],
               dims: Sequence[str] | None = None, fill_value: Any = None):
        """Creates (or replaces) array ``name`` of ``shape`` and ``dtype`` chunked by ``chunks``."""
        import tensorstore as ts

        metadata: dict[str, Any] = {"shape": list(shape), "data_type": dtype, "chunk_grid": {
            "name": "regular", "configuration": {"chunk_shape": [max(1, int(c)) for c in chunks]}}}
        if dims is not None:
            metadata["dimension_names"] = list(dims)
        if fill_value is not None:
            metadata["fill_value"] = fill_value
        self.arrays[name] = ts.open(dict(self._spec(name), metadata=metadata), create=True,
                                    delete_existing=True).result()
        return self.arrays[name]

    def open(self, name: str, shape: Sequence[int] | None = None):
        """Opens array ``name``; with ``shape``, a ``CheckpointError`` unless it holds that shape."""
        import tensorstore as ts

        arr = ts.open(self._spec(name), open=True).result()
        if shape is not None and list(arr.shape) != list(shape):
            raise CheckpointError(f"{self.path / name}: holds shape {list(arr.shape)}, this run needs "
                                  f"{list(shape)}; remove it to start over")
        self.arrays[name] = arr
        return arr

    def num_rows(self, name: str) -> int:
        return int(self.arrays[name].shape[0])

    def resize(self, rows: int, names: Iterable[str] | None = None) -> None:
        """Sets the first axis of the arrays ``names`` (default: every open array) to ``rows``."""
        for name in list(self.arrays) if names is None else names:
            arr = self.arrays[name]
            if int(arr.shape[0]) != rows:
                self.arrays[name] = arr.resize(exclusive_max=[rows] + list(arr.shape[1:]), shrink_only=False,
                                               resize_metadata_only=False).result()

    def write_row(self, name: str, row: int, value) -> None:
        arr = self.arrays[name]
        arr[int(row)].write(np.asarray(value).astype(arr.dtype.numpy_dtype)).result()

    def write_rows(self, name: str, rows_B: np.ndarray, values_B) -> None:
        """Writes ``values_B[i]`` to row ``rows_B[i]`` (rows in any order), one write per run of
        consecutive rows."""
        arr = self.arrays[name]
        order = np.argsort(rows_B)
        rows, v = np.asarray(rows_B)[order], np.asarray(values_B)[order]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [rows.size]])):
            arr[int(rows[a]):int(rows[b - 1]) + 1].write(v[a:b].astype(arr.dtype.numpy_dtype)).result()

    def read(self, name: str) -> np.ndarray:
        return (self.arrays[name] if name in self.arrays else self.open(name)).read().result()


def read_zarr(path: str | os.PathLike) -> np.ndarray:
    """A whole zarr v3 array (the folder holding its ``zarr.json``) as NumPy."""
    import tensorstore as ts

    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(path))}},
                   open=True).result().read().result()
