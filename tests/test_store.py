"""Parquet tables: atomic writes, metadata, resumable chunked writing."""

import os

import numpy as np
import pyarrow as pa
import pytest

from jaxalign import store
from jaxalign.errors import CheckpointError, DataError


def test_write_read_table_roundtrip_with_metadata(tmp_path):
    path = tmp_path / "sub" / "t.parquet"
    store.write_table({"index": np.arange(3), "x": [0.5, 1.5, 2.5], "s": ["a", "b", "c"]}, path,
                      metadata={"model": "m", "n": 3})
    t = store.read_table(path)
    assert t.column("index").to_pylist() == [0, 1, 2]
    assert t.column("s").to_pylist() == ["a", "b", "c"]
    assert store.table_metadata(path) == {"model": "m", "n": 3}
    assert [p.name for p in path.parent.iterdir()] == ["t.parquet"]  # no temporary file left


def test_write_table_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    store.write_table({"index": [1, 2]}, path)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store.pq, "write_table", boom)
    with pytest.raises(RuntimeError):
        store.write_table({"index": [7]}, path)
    assert store.read_table(path).column("index").to_pylist() == [1, 2]  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_unequal_columns_raise(tmp_path):
    with pytest.raises(ValueError, match="different lengths"):
        store.write_table({"a": [1, 2], "b": [1]}, tmp_path / "t.parquet")


def test_read_table_errors_name_file_and_column(tmp_path):
    with pytest.raises(DataError, match="nope.parquet"):
        store.read_table(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet.*not a Parquet"):
        store.read_table(bad)
    good = tmp_path / "good.parquet"
    store.write_table({"index": [0]}, good)
    with pytest.raises(DataError, match="good.parquet.*'score'"):
        store.read_table(good, columns=["score"])


def test_write_json_atomic_and_numpy(tmp_path):
    path = store.write_json(tmp_path / "s.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert store.read_json(path) == {"a": 1.5, "b": [0, 1]}
    with pytest.raises(DataError, match="missing.json"):
        store.read_json(tmp_path / "missing.json")


def _chunks(n, size):
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def test_chunked_table_resume_equals_uninterrupted(tmp_path):
    n, chunks = 23, _chunks(23, 5)[::-1]  # written out of key order, like length-sorted batches
    fp = {"model": "m", "batch_size": 5}

    full = store.ChunkedTable(tmp_path / "full.parquet", fingerprint=fp)
    for cid, idx in enumerate(chunks):
        full.write_chunk(cid, {"index": idx, "v": idx * 2.0})
    expected = full.commit(expected_keys=range(n))
    full.cleanup()
    assert not full.parts_dir.exists()

    # Interrupted after 2 chunks, then resumed by a fresh object (a new process).
    first = store.ChunkedTable(tmp_path / "r.parquet", fingerprint=fp)
    for cid, idx in enumerate(chunks[:2]):
        first.write_chunk(cid, {"index": idx, "v": idx * 2.0})
    second = store.ChunkedTable(tmp_path / "r.parquet", fingerprint=fp)
    assert second.resuming and second.done == {0, 1} and second.rows_done == 8
    written = []
    for cid, idx in enumerate(chunks):
        if second.is_done(cid):
            continue
        written.append(cid)
        second.write_chunk(cid, {"index": idx, "v": idx * 2.0})
    assert written == [2, 3, 4]
    got = second.commit(expected_keys=range(n))
    assert got.equals(expected)
    assert store.read_table(tmp_path / "r.parquet").equals(expected)
    assert got.column("index").to_pylist() == list(range(n))


def test_unrecorded_part_is_rewritten(tmp_path):
    t = store.ChunkedTable(tmp_path / "t.parquet")
    t.write_chunk(0, {"index": [0, 1]})
    # A crash after the part file but before the progress update leaves an unrecorded part.
    store.write_table({"index": [2, 3]}, t._part_path(1))
    t2 = store.ChunkedTable(tmp_path / "t.parquet")
    assert t2.done == {0}
    t2.write_chunk(1, {"index": [2, 3]})
    assert t2.commit(expected_keys=range(4)).num_rows == 4


def test_fingerprint_mismatch_refused(tmp_path):
    t = store.ChunkedTable(tmp_path / "t.parquet", fingerprint={"batch_size": 4, "model": "a"})
    t.write_chunk(0, {"index": [0]})
    with pytest.raises(CheckpointError, match="batch_size: 4 then, 8 now"):
        store.ChunkedTable(tmp_path / "t.parquet", fingerprint={"batch_size": 8, "model": "a"})


def test_commit_detects_duplicates_and_gaps(tmp_path):
    t = store.ChunkedTable(tmp_path / "t.parquet")
    t.write_chunk(0, {"index": [0, 1]})
    t.write_chunk(1, {"index": [1, 2]})
    with pytest.raises(CheckpointError, match="duplicate index values.*\\[1\\]"):
        t.commit()
    u = store.ChunkedTable(tmp_path / "u.parquet")
    u.write_chunk(0, {"index": [0, 2]})
    with pytest.raises(CheckpointError, match="missing index \\[1\\]"):
        u.commit(expected_keys=range(3))
    assert not os.path.exists(tmp_path / "u.parquet")


def test_empty_commit_needs_schema(tmp_path):
    t = store.ChunkedTable(tmp_path / "t.parquet")
    schema = pa.schema([("index", pa.int64()), ("v", pa.float64())])
    assert t.commit(schema=schema).num_rows == 0
    with pytest.raises(ValueError, match="schema"):
        store.ChunkedTable(tmp_path / "u.parquet").commit()


def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path):
    """``mkstemp`` creates 0600 files; committed outputs must be readable like any file the user writes."""
    import stat

    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    atomic = store.write_bytes(tmp_path / "atomic.bin", b"x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
