"""Deterministic, resumable, multi-process iteration over batches of pairs.

**Order.** Epoch ``e`` visits the records in the order :func:`epoch_order` gives: unshuffled, or sorted
by a SplitMix64 hash of ``(seed, e, position)``, which is the same on every machine and NumPy version.

**Steps.** ``batch_size`` is the *global* batch (pairs per step over all processes). Step ``k`` of an
epoch takes the global rows ``order[k*G : (k+1)*G]`` (:func:`global_rows`); an epoch has ``N // G``
steps with ``drop_remainder=True`` and ``ceil(N / G)`` otherwise, the last global batch then being
filled with filler pairs (index -1; see :mod:`jaxalign.data.batch`).

**Processes.** ``batch_size`` must be divisible by ``process_count`` (ConfigError otherwise); process
``p`` gets the ``p``-th of the ``process_count`` equal slices of each global batch
(:func:`process_rows`). So the slices partition every epoch, every process runs the same number of
steps, and the sequence of global batches does not depend on the number of processes. Every process
reads and tokenizes the whole data set (cheap, and cached) but builds arrays only for its slice. The
padded length is computed from the whole global batch, so all processes produce arrays of one shape, as
``jax.make_array_from_process_local_data`` needs.

**State.** :meth:`PairIterator.state` is a small dict of ints, ``{"seed", "epoch", "step",
"batch_size", "num_records"}``, naming the *next* batch; store it in a checkpoint and pass it back
(``PairIterator(..., state=state)`` or :meth:`PairIterator.restore`) to continue exactly where the run
stopped. Restoring a state whose seed, batch size or data size differ from the iterator's raises
:class:`jaxalign.errors.CheckpointError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxalign.data.batch import (Bucket, bucket_length, check_padding_side, longest, pair_batch,
                                 shared_prompt_batch)
from jaxalign.data.tokenize import TokenizedPairs
from jaxalign.errors import CheckpointError, ConfigError

LAYOUTS = ("pairs", "shared_prompt")
_STATE_KEYS = ("seed", "epoch", "step", "batch_size", "num_records")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def epoch_order(num_records: int, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """``[N]`` int64: the positions of the records in the order epoch ``epoch`` visits them.

    >>> epoch_order(4, seed=0, epoch=0, shuffle=False).tolist()
    [0, 1, 2, 3]
    >>> sorted(epoch_order(5, seed=1, epoch=2).tolist())
    [0, 1, 2, 3, 4]
    """
    positions = np.arange(num_records, dtype=np.int64)
    if not shuffle:
        return positions
    key = _splitmix64(_splitmix64(np.uint64(seed % 2**64)) ^ np.uint64(epoch % 2**64))
    return np.argsort(_splitmix64(positions.astype(np.uint64) ^ key), kind="stable")


def steps_per_epoch(num_records: int, batch_size: int, drop_remainder: bool) -> int:
    """``N // G`` with ``drop_remainder``, else ``ceil(N / G)``."""
    if drop_remainder:
        return num_records // batch_size
    return -(-num_records // batch_size)


def global_rows(order: np.ndarray, step: int, batch_size: int) -> np.ndarray:
    """``[G]`` int64: the positions of step ``step``'s global batch; -1 fills a short last batch."""
    rows = np.full(batch_size, -1, np.int64)
    chunk = order[step * batch_size:(step + 1) * batch_size]
    rows[:len(chunk)] = chunk
    return rows


def process_rows(rows: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """``[G / process_count]``: process ``process_index``'s slice of a global batch."""
    local = len(rows) // process_count
    return rows[process_index * local:(process_index + 1) * local]


class PairIterator:
    """Batches of a tokenized data set, resumable and sliced per process (module doc).

    Yields dicts of NumPy int32 arrays in the layout of :func:`jaxalign.data.batch.pair_batch`
    (``layout="pairs"``, [2B, T] rows) or :func:`jaxalign.data.batch.shared_prompt_batch`
    (``layout="shared_prompt"``), with ``B = batch_size / process_count`` pairs.

    Args:
      data: a :class:`~jaxalign.data.load.PairDataset` (or :class:`TokenizedPairs` with ``pad_id``).
      batch_size: the global number of pairs per step.
      pad_id: the pad id (default: the data set's).
      shuffle, seed: the order (module doc).
      drop_remainder: leave out the last, short global batch of each epoch instead of filling it.
      bucket: how padded lengths are rounded up (:func:`jaxalign.data.batch.bucket_length`).
      padding_side: ``"right"`` or ``"left"`` (pairs layout only).
      layout: ``"pairs"`` or ``"shared_prompt"``.
      process_index, process_count: this process and the number of processes.
      num_epochs: stop after this many epochs (``None``: never stop).
      state: a dict from :meth:`state` to continue from.
    """

    def __init__(self, data: Any, batch_size: int, *, pad_id: int | None = None, shuffle: bool = True,
                 seed: int = 0, drop_remainder: bool = False, bucket: Bucket = "pow2",
                 padding_side: str = "right", layout: str = "pairs", process_index: int = 0,
                 process_count: int = 1, num_epochs: int | None = None,
                 state: dict[str, int] | None = None):
        self.tokens: TokenizedPairs = data if isinstance(data, TokenizedPairs) else data.tokens
        if pad_id is None and isinstance(data, TokenizedPairs):
            raise ConfigError("pad_id is needed when iterating over TokenizedPairs")
        self.pad_id = int(pad_id if pad_id is not None else data.pad_id)
        _check_options(len(self.tokens), batch_size, drop_remainder, layout, process_index,
                       process_count, num_epochs)
        check_padding_side(padding_side)
        bucket_length(1, bucket)  # rejects a bad bucket now rather than at the first batch
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.drop_remainder, self.bucket, self.padding_side = drop_remainder, bucket, padding_side
        self.layout, self.num_epochs = layout, num_epochs
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.steps_per_epoch = steps_per_epoch(len(self.tokens), self.batch_size, drop_remainder)
        self.epoch, self.step = 0, 0
        self._order = None
        if state is not None:
            self.restore(state)

    def state(self) -> dict[str, int]:
        """The position of the next batch, as a dict of ints (module doc)."""
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step,
                "batch_size": self.batch_size, "num_records": len(self.tokens)}

    def restore(self, state: dict[str, int]) -> None:
        """Continues from a :meth:`state`; CheckpointError if it belongs to another run."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"data iterator state lacks {missing}; found {sorted(state)}")
        mine = self.state()
        for key in ("seed", "batch_size", "num_records"):
            if int(state[key]) != mine[key]:
                raise CheckpointError(f"data iterator state has {key}={state[key]}, this run has "
                                      f"{mine[key]}; resuming would change the data order")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise CheckpointError(f"data iterator state epoch={epoch}, step={step} is out of range "
                                  f"({self.steps_per_epoch} steps per epoch)")
        self.epoch, self.step, self._order = epoch, step, None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        if self._order is None:
            self._order = epoch_order(len(self.tokens), seed=self.seed, epoch=self.epoch,
                                      shuffle=self.shuffle)
        rows = global_rows(self._order, self.step, self.batch_size)
        batch = self._batch(rows)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self._order = self.epoch + 1, 0, None
        return batch

    def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        full, prompt, response = longest(self.tokens, rows)
        mine = process_rows(rows, self.process_index, self.process_count)
        if self.layout == "pairs":
            return pair_batch(self.tokens, mine, pad_id=self.pad_id, padding_side=self.padding_side,
                              length=bucket_length(full, self.bucket))
        return shared_prompt_batch(self.tokens, mine, pad_id=self.pad_id,
                                   prompt_length=bucket_length(prompt, self.bucket),
                                   response_length=bucket_length(response, self.bucket))


def _check_options(num_records, batch_size, drop_remainder, layout, process_index, process_count,
                   num_epochs) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ConfigError(f"process_count must be a positive integer, got {process_count!r}")
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
        raise ConfigError(f"batch_size {batch_size} (the global batch) must be divisible by "
                          f"process_count {process_count}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if num_epochs is not None and num_epochs < 0:
        raise ConfigError(f"num_epochs must be None or >= 0, got {num_epochs}")
    if steps_per_epoch(num_records, batch_size, drop_remainder) == 0:
        raise ConfigError(f"the data has {num_records} pairs: not one batch of {batch_size}"
                          + (" (drop_remainder=True)" if drop_remainder and num_records else ""))
