"""Per-pair training telemetry: the table of every trained pair at every step, its summaries, the alarm.

The train step returns, for the pairs of its batch, the arrays of :data:`jaxalign.train.step.PAIR_KEYS`
(log-probs before the update, reference log-probs, the loss's margin weight; every run) and, with
``telemetry.pairs: true``, :data:`jaxalign.train.step.TELEMETRY_KEYS` (‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩, the
cosine and Yuan et al.'s predicted case, from the step's own forward and backward pass). This module
turns them into

* ``OUTPUT/telemetry/part-<first>-<last>.parquet``: one row per (step, pair), :data:`COLUMNS`, read
  back with :func:`read_table` (written with ``telemetry.pairs: true``; flushed at every checkpoint and
  at the end, and truncated after the restored step on ``--resume``, so a resumed run holds each row once);
* ``metrics.jsonl`` entries: ``telemetry/<key>_mean`` and ``telemetry/case_<case>_frac``, and the
  alarm's ``displacement/alarm_frac`` and ``displacement/alarm_pairs``;
* the alarm (:func:`alarm`), a warning naming the pairs (at most one per :data:`WARN_EVERY` steps), and
  ``train.stop_on_displacement`` (:func:`streak`): :class:`DisplacementStop`, exit status
  :data:`EXIT_CODE` from the CLI, after a checkpoint.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from jaxalign.analysis.entanglement import CASES
from jaxalign.errors import JaxAlignError

log = logging.getLogger(__name__)

COLUMNS = ("step", "pair_id", "logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected",
           "grad_sq_chosen", "grad_sq_rejected", "grad_dot", "grad_cos", "margin_weight", "predicted_case",
           "alarm")
_FLOATS = COLUMNS[2:11]
_MEANS = ("grad_sq_chosen", "grad_sq_rejected", "grad_dot", "grad_cos", "margin_weight")
FOLDER = "telemetry"
EXIT_CODE = 3
WARN_EVERY = 10
_PART = re.compile(r"part-(\d+)-(\d+)\.parquet$")


class DisplacementStop(JaxAlignError):
    """``train.stop_on_displacement`` stopped the run (a checkpoint of the last step was saved)."""

    exit_code = EXIT_CODE


# --- the alarm (pure) ------------------------------------------------------------------------------------

#: Changes of a summed log-prob smaller than this (nats) are not counted as a fall or a rise: the policy's
#: log-probs and the cached reference's come from different XLA programs, whose float32 sums over a
#: response differ in the last bits (~R·2⁻²⁴·|s| ≈ 1e-5 nats for R = 100, |s| = 100), so before any
#: update the two can differ by noise, which must not raise the alarm.
NOISE_NATS = 1e-3


def alarm(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, predicted_case=None) -> np.ndarray:
    """Per pair ``[B]`` bool: the margin rose while log π(y+) fell, both against the reference, or
    (with ``predicted_case``) the predicted case is not ``ideal``.

    ``(s_w − s_w^ref) < −NOISE_NATS`` and ``(s_w − s_l) − (s_w^ref − s_l^ref) > NOISE_NATS``; NaN reference
    log-probs (a reference-free loss) never raise the first condition.

    >>> alarm([-11.0, -9.0, -10.0 - 1e-5], [-30.0, -30.0, -20.0 - 1e-5], [-10.0] * 3, [-20.0] * 3).tolist()
    [True, False, False]
    """
    c, r = np.asarray(logp_chosen, np.float64), np.asarray(logp_rejected, np.float64)
    rc, rr = np.asarray(ref_logp_chosen, np.float64), np.asarray(ref_logp_rejected, np.float64)
    with np.errstate(invalid="ignore"):
        flags = ((c - rc) < -NOISE_NATS) & (((c - r) - (rc - rr)) > NOISE_NATS)
    if predicted_case is not None:
        flags = flags | (np.asarray(predicted_case) != CASES.index("ideal"))
    return flags


def streak(previous: int, alarm_frac: float, frac: float) -> int:
    """Consecutive steps so far whose alarm fraction exceeds ``frac`` (0 when this one does not)."""
    return previous + 1 if alarm_frac > frac else 0


def summarize(rows: Mapping[str, np.ndarray], flags: np.ndarray) -> dict[str, float]:
    """The ``metrics.jsonl`` entries of one step from its pairs' arrays and alarm flags."""
    out: dict[str, float] = {}
    for k in _MEANS:
        if k in rows:
            out[f"telemetry/{k}_mean"] = float(np.mean(np.asarray(rows[k], np.float64)))
    if "predicted_case" in rows:
        case = np.asarray(rows["predicted_case"])
        for i, name in enumerate(CASES):
            out[f"telemetry/case_{name}_frac"] = float(np.mean(case == i))
    out["displacement/alarm_frac"] = float(np.mean(flags))
    out["displacement/alarm_pairs"] = int(np.sum(flags))
    return out


# --- the table ------------------------------------------------------------------------------------------

def _frame(step: int, pair_ids: np.ndarray, rows: Mapping[str, np.ndarray], flags: np.ndarray):
    import pandas as pd

    n = len(pair_ids)
    data = {"step": np.full(n, step, np.int64), "pair_id": np.asarray(pair_ids, np.int64)}
    for k in _FLOATS:
        data[k] = np.asarray(rows[k], np.float64) if k in rows else np.full(n, np.nan)
    case = rows.get("predicted_case")
    data["predicted_case"] = [CASES[int(i)] for i in case] if case is not None else [None] * n
    data["alarm"] = np.asarray(flags, bool)
    return pd.DataFrame(data, columns=list(COLUMNS))


def _parts(folder: Path) -> list[tuple[int, int, Path]]:
    found = []
    for p in folder.glob("part-*.parquet") if folder.is_dir() else ():
        m = _PART.search(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def _part_path(folder: Path, first: int, last: int) -> Path:
    return folder / f"part-{first:09d}-{last:09d}.parquet"


def truncate(run_dir: str | Path, step: int) -> None:
    """Drops the table's rows of steps after ``step`` (``-1``: all rows): the resume rule."""
    import pandas as pd

    folder = Path(run_dir) / FOLDER
    for first, last, path in _parts(folder):
        if last <= step:
            continue
        if first <= step:
            kept = pd.read_parquet(path)
            kept[kept["step"] <= step].to_parquet(_part_path(folder, first, step), index=False)
        path.unlink()


class TableWriter:
    """Buffers the table's rows and writes them as one Parquet part per :meth:`flush`."""

    def __init__(self, run_dir: str | Path, resume_step: int | None):
        self.folder = Path(run_dir) / FOLDER
        truncate(run_dir, -1 if resume_step is None else resume_step)
        self._frames: list = []

    def add(self, frame) -> None:
        self._frames.append(frame)

    def flush(self) -> None:
        import pandas as pd

        if not self._frames:
            return
        frame = pd.concat(self._frames, ignore_index=True)
        self._frames = []
        self.folder.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(_part_path(self.folder, int(frame["step"].min()), int(frame["step"].max())), index=False)


# --- what the loop calls --------------------------------------------------------------------------------

class Monitor:
    """The loop's per-step hook: alarm, metrics, warning, table rows, the stop rule.

    Args:
      run_dir: the run's output folder (``None``: no table, e.g. on processes other than 0).
      table: write the table (``telemetry.pairs: true``).
      stop: ``train.stop_on_displacement`` as ``(steps, frac)`` or ``None``.
      resume_step: the restored step (rows after it are dropped) or ``None`` for a new run.
    """

    def __init__(self, run_dir: str | Path | None, *, table: bool, stop: tuple[int, float] | None,
                 resume_step: int | None):
        self.writer = TableWriter(run_dir, resume_step) if (table and run_dir is not None) else None
        self.stop = stop
        self.streak = 0
        self.stop_step: int | None = None  # the step whose alarm completed the streak
        self._step = 0
        self._last_warned: int | None = None

    def observe(self, step: int, pair_ids: np.ndarray, rows: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Step ``step``'s metrics from its pairs (``pair_ids`` ``[B]``: their indices in the training
        data, ``-1`` for filler rows, which are left out)."""
        self._step = step
        keep = np.asarray(pair_ids) >= 0
        rows = {k: np.asarray(v)[keep] for k, v in rows.items()}
        ids = np.asarray(pair_ids)[keep]
        flags = alarm(rows["logp_chosen"], rows["logp_rejected"], rows["ref_logp_chosen"],
                      rows["ref_logp_rejected"], rows.get("predicted_case"))
        if flags.any() and (self._last_warned is None or step - self._last_warned >= WARN_EVERY):
            self._last_warned = step
            log.warning("step %d: displacement alarm on %d of %d pairs (ids %s): log π(y+) fell while the "
                        "margin rose, or the predicted case is not ideal", step, int(flags.sum()), len(flags),
                        ", ".join(map(str, ids[flags][:20])) + (", …" if flags.sum() > 20 else ""))
        if self.writer is not None:
            self.writer.add(_frame(step, ids, rows, flags))
        out = summarize(rows, flags)
        if self.stop is not None:
            self.streak = streak(self.streak, out["displacement/alarm_frac"], self.stop[1])
        return out

    def should_stop(self) -> bool:
        if self.stop is not None and self.streak >= self.stop[0] and self.stop_step is None:
            self.stop_step = self._step
        return self.stop_step is not None

    def stop_error(self, step: int, checkpoint_dir) -> DisplacementStop:
        """The error of a stop after step ``step`` (the last one dispatched, checkpointed)."""
        steps, frac = self.stop
        return DisplacementStop(
            f"train.stop_on_displacement: the displacement alarm fired on more than {frac:.0%} of the pairs "
            f"of {steps} consecutive step(s) up to step {self.stop_step} (log π(y+) fell while the margin "
            f"rose, or a predicted case was not ideal); stopped after step {step} with its checkpoint in "
            f"{checkpoint_dir}. The pairs are in {FOLDER}/ (jaxalign.train.telemetry.read_table) and "
            "metrics.jsonl")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()


def read_table(run_dir: str | Path):
    """The per-pair, per-step table of a run as a ``pandas.DataFrame`` with :data:`COLUMNS`, sorted by
    step and pair (empty, with the columns, when the run wrote none)."""
    import pandas as pd

    parts = [pd.read_parquet(p) for _, _, p in _parts(Path(run_dir) / FOLDER)]
    if not parts:
        return pd.DataFrame({c: [] for c in COLUMNS})
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(["step", "pair_id"], kind="stable").reset_index(drop=True)[list(COLUMNS)]
