"""The displacement ledger: per-probe-pair log-probs, rewards and margins, appended every N steps.

``OUTPUT/ledger.zarr`` is a zarr v3 group written with tensorstore. Letters: S recorded steps (a
resizable axis), N probe pairs.

=====================  ========  ==========================================================
array                  shape     meaning
=====================  ========  ==========================================================
``step``               [S]       int64 optimiser step of each row (0 = before training)
``chosen_logps``       [S, N]    summed log-prob of each probe pair's chosen response
``rejected_logps``     [S, N]    same for the rejected response
``chosen_rewards``     [S, N]    β·(chosen_logps − reference chosen_logps)
``rejected_rewards``   [S, N]    β·(rejected_logps − reference rejected_logps)
``margin``             [S, N]    chosen_rewards − rejected_rewards
``pair_index``         [N]       the record index of each probe pair in its data set
``pair_<provenance>``  [N]       where each pair came from (``source_index``, ``chosen_response``,
                                 ``rejected_response``, ``chosen_score``, ``rejected_score``,
                                 ``margin``: :data:`jaxalign.data.schemas.PROVENANCE_COLUMNS`)
=====================  ========  ==========================================================

Rows are appended in step order; on resume :meth:`Ledger.truncate` drops rows after the restored
checkpoint so the ledger continues exactly as the uninterrupted run would have written it.
Read it with ``tensorstore`` (``ts.open({"driver": "zarr3", "kvstore": "file://…/ledger.zarr/margin"})``)
or any zarr v3 reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from jaxalign import store

COLUMNS = ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "margin")
CHUNK_ROWS = 64


class Ledger:
    """Opens (or creates) ``path`` for ``num_pairs`` probe pairs (a :class:`jaxalign.store.ZarrGroup`)."""

    def __init__(self, path: str | Path, num_pairs: int, pairs: Mapping[str, np.ndarray] | None = None):
        self.path = Path(path)
        self.num_pairs = num_pairs
        self._group = store.ZarrGroup(self.path, attributes={})
        g = self._group
        for name, shape, chunks, dtype in [("step", [0], [CHUNK_ROWS], "int64")] + [
                (c, [0, num_pairs], [CHUNK_ROWS, max(num_pairs, 1)], "float32") for c in COLUMNS]:
            if g.has(name):
                g.open(name)
            else:
                g.create(name, shape, dtype, chunks=chunks)
        held = int(g.arrays["margin"].shape[1])
        if held != num_pairs:
            raise ValueError(f"{self.path}: ledger has {held} probe pairs, the run has {num_pairs}")
        if pairs is not None:
            self._write_pairs(pairs)

    def _write_pairs(self, pairs: Mapping[str, np.ndarray]) -> None:
        """The probe pairs' record ``index`` and provenance as ``pair_<name>`` arrays ``[N]`` (once)."""
        g = self._group
        for name, values in pairs.items():
            values = np.asarray(values)
            if values.shape != (self.num_pairs,):
                raise ValueError(f"{self.path}: pairs[{name!r}] has shape {values.shape}, expected "
                                 f"({self.num_pairs},)")
            key = f"pair_{name}"
            if not g.has(key):
                g.create(key, [self.num_pairs], values.dtype.name, chunks=[max(self.num_pairs, 1)],
                         dims=["example"])
                g.arrays[key].write(values).result()
            g.arrays.pop(key, None)  # not appended by step: keep it out of the row resizes

    @property
    def num_rows(self) -> int:
        return self._group.num_rows("step")

    def steps(self) -> np.ndarray:
        return self._group.read("step")

    def append(self, step: int, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
               beta: float) -> None:
        """Appends the row of ``step`` (arrays ``[N]``; reference ``None`` for reference-free losses)."""
        c = np.asarray(chosen_logps, np.float32)
        r = np.asarray(rejected_logps, np.float32)
        rc = beta * (c - (0.0 if ref_chosen_logps is None else np.asarray(ref_chosen_logps, np.float32)))
        rr = beta * (r - (0.0 if ref_rejected_logps is None else np.asarray(ref_rejected_logps, np.float32)))
        row = dict(chosen_logps=c, rejected_logps=r, chosen_rewards=rc, rejected_rewards=rr, margin=rc - rr)
        n = self.num_rows
        self._group.resize(n + 1)
        for col, value in row.items():
            self._group.write_row(col, n, value.astype(np.float32))
        self._group.write_row("step", n, np.int64(step))

    def truncate(self, last_step: int) -> None:
        """Drops the rows whose step is greater than ``last_step`` (resume)."""
        steps = self.steps()
        keep = int(np.sum(steps <= last_step))
        if keep != len(steps):
            self._group.resize(keep)

    def read(self, column: str) -> np.ndarray:
        return self._group.read(column)


def read_ledger(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a ledger as NumPy (``step`` ``[S]``, the columns ``[S, N]``, the ``pair_*`` ``[N]``)."""
    pair_arrays = sorted(p.name for p in Path(path).glob("pair_*") if (p / "zarr.json").exists())
    return {name: store.read_zarr(Path(path) / name) for name in ("step",) + COLUMNS + tuple(pair_arrays)}
