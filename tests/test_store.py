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


# --- digests ----------------------------------------------------------------------------------------

def test_digest_is_sha256_of_names_then_bytes():
    import hashlib

    a, b = np.arange(4, dtype=np.int64), np.array([1.5, -2.0])
    want = hashlib.sha256(b"a" + a.tobytes() + b"b" + b.tobytes()).hexdigest()  # names sorted
    assert store.digest({"b": b, "a": a}) == want
    assert store.digest({"a": a}) != store.digest({"a": a.astype(np.int32)})  # dtype is in the bytes


def test_model_digest_follows_content_not_stamps(tmp_path):
    import hashlib

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"n": 1}')
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "tokenizer.json").write_text("{}")  # not part of the identity (tokens have their own digest)
    want = hashlib.sha256(b"config.json" + b'{"n": 1}' + b"model.safetensors" + b"weights").hexdigest()
    assert store.model_digest(model) == want
    os.utime(model / "model.safetensors", (1, 1))  # a new time stamp: same model
    (model / "tokenizer.json").write_text('{"x": 2}')
    assert store.model_digest(model) == want
    (model / "model.safetensors").write_bytes(b"weightz")  # same size, other content: another model
    assert store.model_digest(model) != want
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF...")
    assert store.model_digest(gguf) == hashlib.sha256(b"m.gguf" + b"GGUF...").hexdigest()


def test_reference_cache_uses_the_one_digest(tmp_path):
    from jaxalign.data.tokenize import Ragged, TokenizedPairs
    from jaxalign.train import ref_cache

    r = Ragged.from_rows([[1, 2], [3]])
    tokens = TokenizedPairs(np.array([0, 1]), r, r, r)
    assert ref_cache.tokens_fingerprint(tokens) == store.digest(tokens.to_arrays())
    (tmp_path / "config.json").write_text("{}")
    assert ref_cache.weights_fingerprint(tmp_path) == store.model_digest(tmp_path)


# --- zarr rows --------------------------------------------------------------------------------------

def test_zarr_group_rows_resize_and_reopen(tmp_path):
    import json

    g = store.ZarrGroup(tmp_path / "g.zarr", attributes={"k": 1})
    g.create("x", [0, 3], "float32", chunks=[2, 3], dims=["row", "col"], fill_value=float("nan"))
    g.create("step", [0], "int64", chunks=[4])
    for k in range(3):
        g.resize(k + 1)
        g.write_row("x", k, np.full(3, k, np.float32))
        g.write_row("step", k, 10 * k)
    g.write_rows("x", np.array([2, 0]), np.array([[7.0] * 3, [5.0] * 3]))  # any order, runs of rows
    meta = json.loads((tmp_path / "g.zarr" / "x" / "zarr.json").read_text())
    assert meta["dimension_names"] == ["row", "col"] and meta["shape"] == [3, 3]
    again = store.ZarrGroup(tmp_path / "g.zarr", attributes={"ignored": True})  # existing: kept
    assert again.attributes == {"k": 1}
    again.open("x", [3, 3])
    again.resize(2)
    np.testing.assert_array_equal(store.read_zarr(tmp_path / "g.zarr" / "x")[:, 0], [5.0, 1.0])
    np.testing.assert_array_equal(again.read("step"), [0, 10, 20])  # not opened: not resized
    with pytest.raises(CheckpointError, match="holds shape"):
        again.open("x", [5, 3])
    store.ZarrGroup(tmp_path / "g.zarr", fresh=True)
    assert not (tmp_path / "g.zarr" / "x").exists()


def test_ledger_rows_on_zarr_group_truncate_and_reopen(tmp_path):
    """The training ledger is a ZarrGroup: rows appended by step, cut back on resume, reopened."""
    from jaxalign.train.ledger import Ledger, read_ledger

    led = Ledger(tmp_path / "ledger.zarr", 2)
    for step in (0, 2, 4):
        led.append(step, [step, -1.0], [0.5, 0.25], [0.0, 0.0], None, beta=0.5)
    led.truncate(2)
    again = Ledger(tmp_path / "ledger.zarr", 2)
    assert again.num_rows == 2
    again.append(3, [1.0, 1.0], [0.0, 0.0], None, None, beta=1.0)
    got = read_ledger(tmp_path / "ledger.zarr")
    assert got["step"].tolist() == [0, 2, 3]
    # rewards = beta * (logps - reference); reference-free when None
    np.testing.assert_allclose(got["chosen_rewards"], [[0.0, -0.5], [1.0, -0.5], [1.0, 1.0]])
    np.testing.assert_allclose(got["rejected_rewards"], [[0.25, 0.125], [0.25, 0.125], [0.0, 0.0]])
    np.testing.assert_allclose(got["margin"], got["chosen_rewards"] - got["rejected_rewards"])
    with pytest.raises(ValueError, match="ledger has 2 probe pairs, the run has 3"):
        Ledger(tmp_path / "ledger.zarr", 3)


def test_to_table_keeps_trailing_nul_characters():
    # A sampled response may end in "\x00"; NumPy's "<U" arrays would silently drop it.
    texts = ["ends in nul\x00", "plain", "\x00\x00"]
    table = store.to_table({"text": texts, "n": [1, 2, 3]})
    assert table.column("text").to_pylist() == texts
    assert table.column("n").to_pylist() == [1, 2, 3]
