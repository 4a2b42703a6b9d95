"""Orbax checkpoints of a run: train state, data-iterator position and run metadata.

A small wrapper over ``orbax.checkpoint.CheckpointManager`` (``save``, ``latest_step``, ``restore``,
``wait``, ``close``). Each step folder holds three items:

* ``state`` — the :class:`jaxalign.train.step.TrainState` (step, params, optimizer state) as arrays;
  restored into the shardings of the *current* mesh, which may differ from the one that saved it;
* ``data`` — the data iterator's state (JSON), so the resumed run sees the same batches;
* ``meta`` — JSON: the step, the run config and its fingerprint.

Saves are asynchronous by default (the arrays are copied to host before ``save`` returns, so the
donated state can be reused at once). Orbax writes into a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous checkpoint as the latest.
Retention: the last ``keep_last`` checkpoints, plus the best one by ``best_metric`` when set.

A second process that only reads a run (``jaxalign probe`` on a run still training) opens it with
``Checkpointer(directory, read_only=True)`` or :meth:`Checkpointer.reader`: it creates nothing, deletes
nothing (neither old checkpoints nor the temporary folder of a save in progress) and cannot save.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxalign.errors import CheckpointError


class Checkpointer:
    """Saves and restores a run's checkpoints under ``directory`` (``read_only``: restores only)."""

    def __init__(self, directory: str | Path, *, keep_last: int = 2, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True, read_only: bool = False):
        policies: list = [pp.LatestN(n=keep_last)]
        if best_metric is not None:
            policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                     n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies), create=not read_only,
            enable_async_checkpointing=async_save and not read_only, cleanup_tmp_directories=not read_only,
            read_only=read_only)
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint folder")
        self.read_only = read_only
        self._best_metric = best_metric
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    @classmethod
    def reader(cls, directory: str | Path) -> "Checkpointer":
        """A read-only view of the run's checkpoints under ``directory`` (safe next to a writer)."""
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # Orbax logs "directory is read only": what we asked for
        try:
            return cls(directory, async_save=False, read_only=True)
        finally:
            absl.setLevel(level)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, ascending (a reader looks again: a live run may have saved since)."""
        if self.read_only:
            self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def restore_params(self, step: int, params_like, item: str | None = None):
        """The ``params`` of checkpoint ``step`` alone (a partial restore: no optimizer state is read),
        placed like ``params_like`` (arrays or ``jax.ShapeDtypeStruct``s with shardings); ``item`` names
        the part of a state of several learners (``"disc"`` of a ``jaxalign online`` run)."""
        target = {"params": _abstract(params_like)}
        target = target if item is None else {item: target}
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the parameters: {err}") from None
        return (out["state"] if item is None else out["state"][item])["params"]

    def save(self, step: int, state, data_state: dict, meta: dict, metrics: dict | None = None) -> None:
        """Saves ``state`` (arrays), ``data_state`` and ``meta`` (JSON) as checkpoint ``step``."""
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only; cannot save step {step}")
        if metrics is not None and self._best_metric is not None and self._best_metric not in metrics:
            metrics = None
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)),
            metrics={k: float(v) for k, v in metrics.items()} if metrics else None)

    def read_meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, step: int, target) -> tuple[Any, dict, dict]:
        """``(state, data_state, meta)`` of checkpoint ``step``.

        Args:
          target: a pytree like the state whose leaves are placed arrays or ``jax.ShapeDtypeStruct``s
            with the shardings to restore into (the current mesh).
        """
        abstract = _abstract(target)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the checkpoint: {err}") from None
        return out["state"], out["data"], out["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(tree):
    """``jax.ShapeDtypeStruct``s (with the leaves' shardings) of a pytree of arrays or structs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
