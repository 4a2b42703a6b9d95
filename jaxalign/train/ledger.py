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
=====================  ========  ==========================================================

Rows are appended in step order; on resume :meth:`Ledger.truncate` drops rows after the restored
checkpoint so the ledger continues exactly as the uninterrupted run would have written it.
Read it with ``tensorstore`` (``ts.open({"driver": "zarr3", "kvstore": "file://…/ledger.zarr/margin"})``)
or any zarr v3 reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "margin")


def _spec(path: Path, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}


class Ledger:
    """Opens (or creates) ``path`` for ``num_pairs`` probe pairs."""

    def __init__(self, path: str | Path, num_pairs: int):
        import tensorstore as ts

        self.path = Path(path)
        self.num_pairs = num_pairs
        self.path.mkdir(parents=True, exist_ok=True)
        group = self.path / "zarr.json"
        if not group.exists():
            group.write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}\n')
        chunk_rows = 64

        def open_(name, shape, chunks, dtype):
            if (self.path / name / "zarr.json").exists():
                return ts.open(_spec(self.path, name), open=True).result()
            metadata = {"shape": list(shape), "data_type": dtype,
                        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}}
            return ts.open(dict(_spec(self.path, name), metadata=metadata), create=True).result()

        self._step = open_("step", [0], [chunk_rows], "int64")
        self._arrays = {c: open_(c, [0, num_pairs], [chunk_rows, max(num_pairs, 1)], "float32")
                        for c in COLUMNS}
        if self._arrays["margin"].shape[1] != num_pairs:
            raise ValueError(f"{self.path}: ledger has {self._arrays['margin'].shape[1]} probe pairs, "
                             f"the run has {num_pairs}")

    @property
    def num_rows(self) -> int:
        return int(self._step.shape[0])

    def steps(self) -> np.ndarray:
        return self._step.read().result()

    def _resize(self, rows: int) -> None:
        self._step = self._step.resize(exclusive_max=[rows], shrink_only=False,
                                       resize_metadata_only=False).result()
        for c, arr in self._arrays.items():
            self._arrays[c] = arr.resize(exclusive_max=[rows, self.num_pairs], shrink_only=False,
                                         resize_metadata_only=False).result()

    def append(self, step: int, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
               beta: float) -> None:
        """Appends the row of ``step`` (arrays ``[N]``; reference ``None`` for reference-free losses)."""
        c = np.asarray(chosen_logps, np.float32)
        r = np.asarray(rejected_logps, np.float32)
        rc = beta * (c - (0.0 if ref_chosen_logps is None else np.asarray(ref_chosen_logps, np.float32)))
        rr = beta * (r - (0.0 if ref_rejected_logps is None else np.asarray(ref_rejected_logps, np.float32)))
        row = dict(chosen_logps=c, rejected_logps=r, chosen_rewards=rc, rejected_rewards=rr, margin=rc - rr)
        n = self.num_rows
        self._resize(n + 1)
        for col, value in row.items():
            self._arrays[col][n].write(value.astype(np.float32)).result()
        self._step[n].write(np.int64(step)).result()

    def truncate(self, last_step: int) -> None:
        """Drops the rows whose step is greater than ``last_step`` (resume)."""
        steps = self.steps()
        keep = int(np.sum(steps <= last_step))
        if keep != len(steps):
            self._resize(keep)

    def read(self, column: str) -> np.ndarray:
        return (self._step if column == "step" else self._arrays[column]).read().result()


def read_ledger(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a ledger as NumPy (``step`` ``[S]`` and the columns ``[S, N]``)."""
    import tensorstore as ts

    path = Path(path)
    return {name: ts.open(_spec(path, name)).result().read().result() for name in ("step",) + COLUMNS}
