"""What the per-pair jobs (``ches``, ``entangle``, ``probe``, ``displacement``, ``select``) share.

* the model and its tokenizer (loaded, or given by the caller), and the guard that keeps a finished
  output from being overwritten by accident;
* the pairs: read, validated and tokenized with EOS appended (:func:`load_pairs`), none left being an
  error that says how many records were read and skipped, and why (:func:`require_pairs`); the list of
  skipped records, ``skipped.jsonl``, written by :func:`write_skipped` only once every check of the job's
  inputs has passed, so a refused run leaves no file behind (and does not overwrite an earlier run's);
* **the one batch loop** (:func:`run_batches`) over a :class:`Plan`;
* the resume fingerprint's parts: the model's identity (:func:`jaxalign.store.model_digest`, the content
  of its weight files), the token ids' digest, the plan's digest. A job that finds parts written under
  another fingerprint refuses to mix them (:class:`jaxalign.store.ChunkedTable`).

**The batch loop.** A :class:`Plan` cuts the pairs into batches of one padded shape
(:func:`jaxalign.data.batch.plan_batches`, bucketing ``"jobs"``). Every batch has the same number of rows,
``batch_size`` rounded up to a multiple of the mesh's ``data × fsdp``; the rows a batch is short of are
**filler rows, position -1**: :func:`jaxalign.data.batch.shared_prompt_batch` makes them all padding with
every mask and length 0 and ``index`` -1, and :func:`run_batches` hands ``compute`` the real rows so it
keeps only the first ``len(rows)`` outputs. For each batch the sink has not recorded, the loop builds the
batch, computes it on every process (a multi-host mesh needs all of them), and — on the lead process
(``jax.process_index() == 0``) only, unless the sink is in memory — writes the result. Batches are
visited in plan order and the plan depends only on the token lengths, so a resumed run sends the same
batches through the same compiled programs as an uninterrupted one: its results are bit-identical.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from jaxalign import store
from jaxalign.data import batch as batch_lib
from jaxalign.errors import ConfigError, DataError


# --- model and output guard -------------------------------------------------------------------------

def load_model(model_path: str, *, job: str, mesh=None, model_and_tokenizer=None):
    """``(model, tokenizer)`` of ``model_path`` (or ``model_and_tokenizer`` when given).

    Raises:
      ConfigError: the model comes without a tokenizer (``job`` names what needs it).
    """
    if model_and_tokenizer is None:
        from jaxalign.models import load_pretrained

        model_and_tokenizer = load_pretrained(model_path, mesh=mesh)
    if model_and_tokenizer[1] is None:
        raise ConfigError(f"{model_path}: the model has no tokenizer files; {job} needs the tokenizer")
    return model_and_tokenizer


def guard_finished(table_path: Path, overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, delete) a finished table: one without a ``.parts`` folder beside it."""
    parts = table_path.with_name(table_path.name + ".parts")
    if table_path.exists() and not parts.exists():
        if not overwrite:
            raise ConfigError(f"{table_path} already exists (a finished run); pass --overwrite to replace "
                              "it or choose another --out")
        table_path.unlink()


def is_lead() -> bool:
    """Whether this is the process that writes files (process 0 of a multi-host run)."""
    import jax

    return jax.process_index() == 0


# --- pairs ------------------------------------------------------------------------------------------

SKIPPED_NAME = "skipped.jsonl"


def load_pairs(data: str, tokenizer, *, limit: int | None = None, **options):
    """Reads, validates and tokenizes ``data`` (:func:`jaxalign.data.load_pairs`; ``options`` are its
    :class:`~jaxalign.data.LoadConfig` fields), then keeps the first ``limit`` kept pairs (input order).
    Nothing is written: the skipped records go to a file through :func:`write_skipped`.
    """
    from jaxalign import data as data_lib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data_lib.DataWarning)  # the job's summary holds the same counts
        ds = data_lib.load_pairs(data, tokenizer, **options)
    return dataclasses.replace(ds, tokens=batch_lib.head(ds.tokens, limit))


def write_skipped(dataset, out: Path) -> Path:
    """Writes ``out/skipped.jsonl`` (one JSON line per record left out; empty when none; atomically).

    Call it after every check of the job's inputs (data, model, options, an earlier output's
    fingerprint), just before the job's first result is written: a run refused before that leaves
    nothing behind.
    """
    from jaxalign.data.validate import write_report

    path = Path(out) / SKIPPED_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(path, dataset.report)
    return path


def data_options(cfg) -> dict[str, Any]:
    """The :class:`~jaxalign.data.LoadConfig` fields chosen by a job's ``--format``, ``--split`` and
    ``--subset`` (settings ``format``, ``split``, ``data_subset``), checked now: an unknown format fails
    before any model is loaded."""
    from jaxalign.data.load import make_config

    options = {"format": cfg.format, "split": cfg.split, "subset": cfg.data_subset}
    make_config(**options)
    return options


class Inputs(NamedTuple):
    """What a per-pair job works on: the model, its tokenizer, the pairs, their batches, and whether this
    process writes the files."""

    model: Any
    tokenizer: Any
    dataset: Any
    plan: Plan
    lead: bool


def open_inputs(cfg, table_path: Path, *, job: str, mesh=None, model_and_tokenizer=None,
                check_model: Callable[[Any], None] | None = None) -> Inputs:
    """The common start of a resumable job whose settings ``cfg`` have ``model``, ``data``, ``batch_size``,
    ``max_length``, ``limit``, ``on_bad_record``, ``chat``, ``overwrite`` and the data choice
    (:func:`data_options`): refuse a finished
    ``table_path`` (:func:`guard_finished`), load the model (``check_model(model)`` may refuse it), load
    the pairs (none left is an error) and plan the batches. Nothing is written: the job calls
    :func:`write_skipped` (lead process) once its own checks have passed."""
    guard_finished(table_path, cfg.overwrite)
    options = data_options(cfg)
    model, tokenizer = load_model(cfg.model, job=job, mesh=mesh, model_and_tokenizer=model_and_tokenizer)
    if check_model is not None:
        check_model(model)
    loaded = load_pairs(cfg.data, tokenizer, max_length=cfg.max_length, limit=cfg.limit,
                        on_bad_record=cfg.on_bad_record, chat=cfg.chat, **options)
    require_pairs(loaded, cfg.data)
    return Inputs(model, tokenizer, loaded, Plan.of(loaded.tokens, cfg.batch_size, mesh), is_lead())


def require_pairs(dataset, data: str) -> None:
    """``DataError`` when no pair is left: how many records were read and skipped, and why."""
    if len(dataset.tokens):
        return
    r = dataset.report
    kinds = r.counts_by_kind()
    why = f" ({', '.join(f'{k}: {v}' for k, v in kinds.items())})" if kinds else ""
    raise DataError(f"no usable preference pairs: read {r.read} records, skipped {len(r.skipped)}{why}",
                    path=data)


def check_loss(loss, beta: float, loss_options) -> None:
    """Unknown losses or options fail now, before a model is loaded, not after the first batch."""
    from jaxalign import losses

    one, zero = np.ones(1), np.zeros(1)
    losses.margin_weights(loss, chosen_logps=zero, rejected_logps=zero, ref_chosen_logps=zero,
                          ref_rejected_logps=zero, chosen_lengths=one, rejected_lengths=one, beta=beta,
                          **dict(loss_options or {}))


# --- figures ----------------------------------------------------------------------------------------

def figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def histogram(ax, values, xlabel: str) -> np.ndarray:
    """A histogram of the finite ``values`` on ``ax`` (about four pairs a bin, 5 to 50 bins); returns them."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size:
        ax.hist(v, bins=min(50, max(5, v.size // 4)), color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    return v


def save_figure(fig, path: Path, title: str = "") -> Path:
    """Titles, lays out and writes ``fig`` as a PNG atomically (:func:`jaxalign.report.save_figure`)."""
    from jaxalign import report

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return report.save_figure(fig, path, dpi=100)


# --- the batch loop ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """The batches of a job (module doc).

    Attributes:
      batches: per batch, the positions of its real pairs in the tokenized data.
      rows: rows of every batch (real ones first, then filler rows -1).
    """

    batches: tuple[np.ndarray, ...]
    rows: int

    @classmethod
    def of(cls, tokens, batch_size: int, mesh=None) -> Plan:
        """Batches of at most ``batch_size`` pairs of ``tokens``, rounded up to the mesh's
        ``data × fsdp``."""
        multiple = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
        resp_len = np.maximum(tokens.chosen.lengths, tokens.rejected.lengths)
        batches = batch_lib.plan_batches(tokens.prompt.lengths, resp_len, batch_size)
        return cls(tuple(batches), -(-batch_size // multiple) * multiple)

    @property
    def total(self) -> int:
        return int(sum(len(b) for b in self.batches))

    @property
    def digest(self) -> str:
        """SHA-256 of the plan (the positions of every batch, in order)."""
        flat = np.concatenate(self.batches) if self.batches else np.zeros(0)
        return store.digest({"plan": flat.astype(np.int64)})

    def padded(self, batch_id: int) -> np.ndarray:
        """``[rows]`` positions of batch ``batch_id`` with filler rows -1."""
        real = self.batches[batch_id]
        out = np.full(self.rows, -1, np.int64)
        out[:len(real)] = real
        return out


def shared_prompt_maker(tokens, pad_id: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """``rows -> batch``: the shared-prompt layout with the jobs' bucketing (``"jobs"``)."""
    return lambda rows: batch_lib.shared_prompt_batch(tokens, rows, pad_id=pad_id, bucket="jobs")


class Sink(Protocol):
    """Where :func:`run_batches` puts each batch's result."""

    in_memory: bool  # written on every process (True) or by the lead process only (False)

    def is_done(self, batch_id: int) -> bool: ...

    def write(self, batch_id: int, rows: np.ndarray, result: Any) -> None: ...


class ChunkSink:
    """Each batch's ``pa.Table`` as a part of a :class:`jaxalign.store.ChunkedTable`; ``side(rows,
    extra)`` first writes whatever else ``compute`` returned (``result = (table, extra)``)."""

    in_memory = False

    def __init__(self, chunks: store.ChunkedTable, side: Callable[[np.ndarray, Any], None] | None = None):
        self.chunks, self.side = chunks, side

    def is_done(self, batch_id: int) -> bool:
        return self.chunks.is_done(batch_id)

    def write(self, batch_id: int, rows: np.ndarray, result: Any) -> None:
        if self.side is not None:
            result, extra = result
            self.side(rows, extra)
        self.chunks.write_chunk(batch_id, result)


class ListSink:
    """Every batch's result kept in memory, in plan order (``results``), on every process."""

    in_memory = True

    def __init__(self):
        self.results: list[tuple[np.ndarray, Any]] = []

    def is_done(self, batch_id: int) -> bool:
        return False

    def write(self, batch_id: int, rows: np.ndarray, result: Any) -> None:
        self.results.append((rows, result))


def run_batches(plan: Plan, make_batch: Callable[[np.ndarray], Any], compute: Callable[[np.ndarray, Any], Any],
                sink: Sink, *, progress: bool = True, desc: str = "", rows_done: int = 0,
                after_batch: Callable[[int], None] | None = None) -> None:
    """Computes every batch of ``plan`` the sink has not recorded and writes it (module doc).

    Args:
      plan: the batches.
      make_batch: ``[rows]`` positions (filler -1) → the batch.
      compute: ``(real positions [n], batch) → result`` of the ``n`` real rows.
      sink: records results (:class:`ChunkSink`, :class:`ListSink`).
      progress: show a progress bar (on the lead process), ``desc`` its label; ``rows_done`` pairs already
        done (a resumed run).
      after_batch: called with the batch id after each batch is written (tests interrupt with it).
    """
    from tqdm.auto import tqdm

    lead = is_lead()
    bar = tqdm(total=plan.total, initial=rows_done, unit="pair", desc=desc, disable=not (progress and lead),
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch_id, rows in enumerate(plan.batches):
            if sink.is_done(batch_id):
                continue
            result = compute(rows, make_batch(plan.padded(batch_id)))
            if lead or sink.in_memory:
                sink.write(batch_id, rows, result)
            bar.update(len(rows))
            if after_batch is not None:
                after_batch(batch_id)
    finally:
        bar.close()
