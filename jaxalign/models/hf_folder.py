"""Hugging Face model folders: ``config.json`` plus safetensors weights, read lazily and written back.

A folder holds either one ``model.safetensors`` or shards listed in ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). Tensors are opened with
``safetensors.safe_open(framework="numpy")`` and wrapped in :class:`LazyTensor`, which reads nothing
until a value or a slice of it is asked for; with a device mesh each device's shard is sliced straight
from the (memory-mapped) file. Only safetensors are read: never pickle (``*.bin``/``*.pt``) files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from jaxalign.errors import ModelError

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class LazyTensor:
    """One tensor of a checkpoint, read on demand.

    Has ``shape`` and ``dtype``; ``np.asarray(t)`` reads it whole, ``t[index]`` reads only the slice
    (what ``jax.make_array_from_callback`` asks for). ``transform`` (a function of a NumPy array) is
    applied after reading; slicing then reads the whole tensor first, which only the GGUF path uses.
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype, read, read_slice=None,
                 source: str = ""):
        self.name, self.shape, self.dtype, self.source = name, tuple(shape), np.dtype(dtype), source
        self._read, self._read_slice = read, read_slice

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numpy(self) -> np.ndarray:
        return np.asarray(self._read())

    def __array__(self, dtype=None, copy=None):
        value = self.numpy()
        return value if dtype is None else value.astype(dtype, copy=False)

    def __getitem__(self, index) -> np.ndarray:
        if self._read_slice is not None:
            return np.asarray(self._read_slice(index))
        return self.numpy()[index]

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape}, dtype={self.dtype}, source={self.source!r})"


def _safetensors_tensor(path: str, name: str, handle) -> LazyTensor:
    sl = handle.get_slice(name)
    shape = tuple(sl.get_shape())
    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
    if dtype is None:
        raise ModelError(f"{path}: tensor {name!r} has dtype {sl.get_dtype()}, which jaxalign cannot read")

    def read_slice(index):
        if shape == ():
            return handle.get_tensor(name)[index]
        return sl[index]

    return LazyTensor(name, shape, dtype, read=lambda: handle.get_tensor(name), read_slice=read_slice,
                      source=path)


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}


_SAFETENSORS_DTYPES = _dtypes()


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict (``ModelError`` naming the file when missing or bad)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{folder}: no {CONFIG_NAME} (a Hugging Face model folder needs one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None


def checkpoint_files(folder: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> safetensors file holding it, from the index or the single file.

    Raises ``ModelError`` naming the missing file (the single file, the index, or a shard it lists).
    """
    folder = Path(folder)
    index_path, single_path = folder / INDEX_NAME, folder / SINGLE_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelError(f"{index_path}: not a safetensors index (needs a 'weight_map'): {err}") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelError(f"{index_path}: shard file(s) missing from {folder}: {', '.join(missing)}")
        return {name: str(folder / f) for name, f in weight_map.items()}
    if single_path.is_file():
        return {"": str(single_path)}
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f" (found {', '.join(pickles)}: pickle checkpoints are not loaded; convert them to "
            "safetensors)") if pickles else ""
    raise ModelError(f"{folder}: no {SINGLE_NAME} and no {INDEX_NAME}{hint}")


class SafetensorsCheckpoint(Mapping[str, LazyTensor]):
    """All tensors of a folder as a read-only mapping of :class:`LazyTensor`; use as a context manager
    (or call :meth:`close`) to release the open files."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        files = checkpoint_files(folder)
        self._handles = []
        self._tensors: dict[str, LazyTensor] = {}
        for path in sorted(set(files.values())):
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as err:  # safetensors raises its own SafetensorError
                raise ModelError(f"{path}: cannot read as safetensors: {err}") from None
            self._handles.append(handle)
            for name in handle.keys():
                if "" not in files and files.get(name, path) != path:
                    continue  # a duplicate: the index assigns this tensor to another shard
                self._tensors[name] = _safetensors_tensor(path, name, handle)
        if "" not in files:
            absent = sorted(n for n in files if n not in self._tensors)
            if absent:
                raise ModelError(f"{Path(folder) / INDEX_NAME}: tensor(s) listed but not in their shard: "
                                 f"{', '.join(absent[:10])}")

    def __getitem__(self, name: str) -> LazyTensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def close(self) -> None:
        self._handles.clear()  # safe_open handles close when garbage-collected

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_safetensors(tensors: Mapping[str, np.ndarray], folder: str | os.PathLike,
                     max_shard_bytes: int | None = None) -> list[str]:
    """Writes ``tensors`` as ``model.safetensors`` or, above ``max_shard_bytes``, as shards plus the index.

    Returns the file names written. Weight files of an earlier save in ``folder`` are removed first, so
    a stale index or shard cannot shadow the new weights.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / SINGLE_NAME, folder / INDEX_NAME, *folder.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    total = sum(a.nbytes for a in arrays.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(arrays, str(folder / SINGLE_NAME), metadata={"format": "np"})
        return [SINGLE_NAME]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in arrays.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(folder / fname), metadata={"format": "np"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return names + [INDEX_NAME]


def write_config(config: Mapping[str, Any], folder: str | os.PathLike) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
