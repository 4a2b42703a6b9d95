"""The ``jaxalign ches`` job: score every pair of a data set and write a table, a summary and a plot.

Steps: load the model (no logits are ever computed) and the data (read, validate with
``on_bad_record``, tokenize jointly with EOS appended; :func:`jaxalign.jobs.common.load_pairs`); sort the
pairs by length into batches of the same padded shape (little padding, few compiled shapes); score each
batch with :func:`jaxalign.analysis.ches.make_scorer` (prompt once, batch sharded over the mesh) in the
jobs' batch loop (:func:`jaxalign.jobs.common.run_batches`); write each finished batch as a Parquet part
(:class:`jaxalign.store.ChunkedTable`). An interrupted run, rerun with the same arguments, skips the
finished batches; at the end the parts are joined, checked (every kept record exactly once), sorted by
record index and committed atomically as ``DIR/scores.parquet``.

Output files in ``DIR``:

``scores.parquet``
    one row per scored record: ``index`` (the record's position in the input), ``ches``, ``ln_ches``,
    ``minus_norm_edit_distance``, ``last_hidden_ip``, ``real_cosine`` (REAL's cosine of the two
    responses embedded alone, :mod:`jaxalign.analysis.real`; NaN with ``real=False``), ``prompt_len``,
    ``chosen_len``, ``rejected_len`` (token counts; response lengths include the EOS and equal the number
    of summed positions); for a built-in format (not TRL's own), also the provenance columns
    ``source_index``, ``chosen_response``, ``rejected_response``, ``chosen_score``, ``rejected_score``,
    ``margin`` (:data:`PROVENANCE`; docs/data.md "Provenance").
``summary.json``
    counts (read, kept, scored, skipped by kind, identical pairs, truncated), quantiles and mean/std of
    each measure, and the Spearman rank correlations between the five measures.
``ches_hist.png``
    histograms of CHES and LN-CHES.
``skipped.jsonl``
    one line per record left out (``on_bad_record="skip"``): index, kind, reason, field, line.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from jaxalign import store
from jaxalign.analysis import baselines
from jaxalign.analysis.stats import spearman
from jaxalign.errors import ConfigError
from jaxalign.jobs import common
from jaxalign.jobs.options import fingerprint
from jaxalign.jobs.settings import Ches

MEASURES = ("ches", "ln_ches", "minus_norm_edit_distance", "last_hidden_ip", "real_cosine")
COLUMNS = ("index",) + MEASURES + ("prompt_len", "chosen_len", "rejected_len")
SCHEMA = pa.schema([("index", pa.int64())] + [(m, pa.float64()) for m in MEASURES]
                   + [(c, pa.int32()) for c in ("prompt_len", "chosen_len", "rejected_len")])
#: the provenance columns (:data:`jaxalign.data.schemas.PROVENANCE_COLUMNS` less ``index``) added to
#: ``scores.parquet`` when the data's format has them (not for TRL's own formats).
PROVENANCE = pa.schema([("source_index", pa.int64()), ("chosen_response", pa.int64()),
                        ("rejected_response", pa.int64()), ("chosen_score", pa.float64()),
                        ("rejected_score", pa.float64()), ("margin", pa.float64())])
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def run_ches(model_path: str, data: str, out_dir: str, *, mesh=None, progress: bool = True,
             after_batch: Callable[[int], None] | None = None, model_and_tokenizer=None, **settings) -> dict:
    """:func:`run` of ``Ches(model=model_path, data=data, out=out_dir, **settings)``."""
    return run(Ches(model=model_path, data=data, out=out_dir, **settings), mesh=mesh, progress=progress,
               after_batch=after_batch, model_and_tokenizer=model_and_tokenizer)


def run(cfg: Ches, *, mesh=None, progress: bool = True, after_batch: Callable[[int], None] | None = None,
        model_and_tokenizer=None) -> dict | None:
    """Scores every pair of ``cfg.data`` with ``cfg.model``; writes ``cfg.out`` (module doc).

    Args:
      cfg: the settings.
      mesh: a ``(data, fsdp, tensor)`` mesh; ``None`` for one device.
      progress: show a progress bar.
      after_batch: called with the batch id after each batch is written (tests use it to interrupt).
      model_and_tokenizer: an already loaded ``(model, tokenizer)`` to use instead of loading.

    Returns:
      the summary (also written to ``summary.json``); ``None`` on processes other than the lead.
    """
    from jaxalign.analysis import ches
    from jaxalign.models import lora

    out = Path(cfg.out)
    table_path = out / "scores.parquet"
    def check(m):
        lora.load_adapter(m, cfg.adapter, mesh=mesh)
        if cfg.layer is not None:
            check_layer(m, cfg.layer, cfg.model)

    model, tokenizer, loaded, plan, lead = common.open_inputs(
        cfg, table_path, job="CHES", mesh=mesh, model_and_tokenizer=model_and_tokenizer, check_model=check)
    tokens = loaded.tokens
    chunks = store.ChunkedTable(table_path, fingerprint=fingerprint(
        cfg, model=store.model_digest(cfg.model), adapter=None if cfg.adapter is None else
        store.model_digest(cfg.adapter), tokens=store.digest(tokens.to_arrays()), pairs=len(tokens),
        plan=plan.digest, real_max_length=cfg.real_max_length if cfg.real else None))
    real_cosine = (make_real_cosine(model, tokenizer, cfg.data, batch_size=cfg.batch_size, mesh=mesh,
                                    max_length=cfg.real_max_length, on_bad_record=cfg.on_bad_record,
                                    **common.data_options(cfg))
                   if cfg.real else None)
    provenance = loaded.provenance if loaded.report.schema not in (None, "trl") else None
    compute = scores_of(ches.make_scorer(model, mesh=mesh, layer=cfg.layer), tokens, real_cosine, provenance)
    if lead:
        common.write_skipped(loaded, out)
    common.run_batches(plan, common.shared_prompt_maker(tokens, loaded.pad_id), compute,
                       common.ChunkSink(chunks), progress=progress, desc="ches", rows_done=chunks.rows_done,
                       after_batch=after_batch)
    if not lead:
        return None
    about = {"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "layer": cfg.layer}
    schema = SCHEMA if provenance is None else pa.unify_schemas([SCHEMA, PROVENANCE])
    table = chunks.commit(expected_keys=tokens.index.tolist(), schema=schema, metadata=about)
    summary = summarize(table, loaded.report, **about, limit=cfg.limit)
    store.write_json(out / "summary.json", summary)
    plot_histograms(table, out / "ches_hist.png", title=f"{Path(cfg.model).name} on {cfg.data}")
    chunks.cleanup()
    return summary


def scores_of(scorer: Callable, tokens, real_cosine: Callable[[np.ndarray], np.ndarray] | None,
              provenance: dict[str, np.ndarray] | None = None) -> Callable[[np.ndarray, dict], pa.Table]:
    """``(rows, batch) -> table`` of the batch's real rows (``real_cosine`` ``None``: NaN), with the
    :data:`PROVENANCE` columns when ``provenance`` (one row per pair of ``tokens``, in its order) is
    given."""

    def compute(rows: np.ndarray, batch: dict) -> pa.Table:
        out = scorer(batch)
        n = len(rows)
        real = (np.full(n, np.nan) if real_cosine is None
                else np.asarray(real_cosine(tokens.index[rows]), np.float64))
        edit = np.array([baselines.minus_norm_edit_distance(tokens.chosen[i], tokens.rejected[i])
                         for i in rows], np.float64)
        table = pa.table({
            "index": pa.array(tokens.index[rows].astype(np.int64)),
            "ches": pa.array(out["ches"][:n].astype(np.float64)),
            "ln_ches": pa.array(out["ln_ches"][:n].astype(np.float64)),
            "minus_norm_edit_distance": pa.array(edit),
            "last_hidden_ip": pa.array(out["last_hidden_ip"][:n].astype(np.float64)),
            "real_cosine": pa.array(real),
            "prompt_len": pa.array(tokens.prompt.lengths[rows].astype(np.int32)),
            "chosen_len": pa.array(tokens.chosen.lengths[rows].astype(np.int32)),
            "rejected_len": pa.array(tokens.rejected.lengths[rows].astype(np.int32)),
        }, schema=SCHEMA)
        if provenance is None:
            return table
        if not np.array_equal(provenance["index"][rows], tokens.index[rows]):
            raise AssertionError("the provenance rows are not in the order of the tokens")
        for f in PROVENANCE:
            table = table.append_column(f, pa.array(provenance[f.name][rows], f.type))
        return table

    return compute


def make_real_cosine(model, tokenizer, data: str, *, batch_size: int, mesh, max_length: int | None,
                     on_bad_record: str, **options) -> Callable[[np.ndarray], np.ndarray]:
    """A function from record indices ``[n]`` to REAL cosines ``[n]`` of those records' responses.

    The records are read again as text (REAL embeds each response alone, tokenized on its own, not the
    joint tokens CHES uses), with the same data ``options`` (format, split, subset) so the indices agree;
    the embedding forward passes run batch by batch, inside the resumable loop.
    """
    from jaxalign import data as data_lib
    from jaxalign.analysis import real as real_lib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data_lib.DataWarning)  # already reported by load_pairs
        pairs, _ = data_lib.read_pairs(data, on_bad_record=on_bad_record, **options)
    by_index = {p.index: p for p in pairs}

    def real_cosine(indices: np.ndarray) -> np.ndarray:
        return real_lib.real_cosines(model, tokenizer, [by_index[int(i)] for i in indices],
                                     batch_size=2 * batch_size, max_length=max_length, mesh=mesh)

    return real_cosine


def check_layer(model, layer: int, source: str = "model") -> None:
    """ConfigError unless ``layer`` indexes the model's ``layer_hidden`` (0 … L, or negative)."""
    import jax
    import jax.numpy as jnp

    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model(ids, jnp.ones_like(ids), return_logits=False,
                                          return_layer_hidden=True).layer_hidden)
    n = len(shapes)
    if not -n <= layer < n:
        raise ConfigError(f"--layer {layer}: {source} has {n} hidden-state layers (0 = embeddings … "
                          f"{n - 1} = last block, negative from the end; 'final' = after the final norm)")


def summarize(table: pa.Table, report, **about) -> dict:
    """The ``summary.json`` contents: counts, per-measure quantiles, Spearman correlations."""
    counts = {"read": report.read, "kept": report.kept, "scored": table.num_rows,
              "skipped": len(report.skipped), "skipped_by_kind": report.counts_by_kind(),
              "identical_pairs": len(report.identical), "truncated": report.truncated,
              "prompt_mismatch": report.prompt_mismatch}
    stats, values = {}, {}
    for m in MEASURES:
        v = table.column(m).to_numpy(zero_copy_only=False).astype(np.float64)
        values[m] = v
        finite = v[np.isfinite(v)]
        entry: dict[str, Any] = {"count": int(finite.size), "nonfinite": int(v.size - finite.size)}
        if finite.size:
            entry.update(mean=float(finite.mean()), std=float(finite.std()),
                         positive_fraction=float((finite > 0).mean()))
            entry["quantiles"] = {f"{q:g}": float(np.quantile(finite, q)) for q in QUANTILES}
        stats[m] = entry
    corr = {a: {b: spearman(values[a], values[b]) for b in MEASURES} for a in MEASURES}
    lengths = {c: float(table.column(c).to_numpy().mean()) if table.num_rows else None
               for c in ("prompt_len", "chosen_len", "rejected_len")}
    return {**about, "counts": counts, "measures": stats, "spearman": corr, "mean_lengths": lengths,
            "source": report.source, "format": report.format}


def plot_histograms(table: pa.Table, path: Path, *, title: str = "") -> None:
    """``ches_hist.png``: histograms of CHES and LN-CHES, written atomically."""
    fig = common.figure(10, 3.8)
    for ax, name, label in zip(fig.subplots(1, 2), ("ches", "ln_ches"), ("CHES", "LN-CHES")):
        v = common.histogram(ax, table.column(name).to_numpy(zero_copy_only=False), label)
        if v.size:
            ax.axvline(float(np.median(v)), color="k", lw=1, ls="--", label="median")
            ax.legend()
        ax.set_title(f"{label} ({v.size} pairs)")
    common.save_figure(fig, path, title)


def format_summary(summary: dict, out_dir: str) -> str:
    """A few readable lines: counts, quantiles of LN-CHES and CHES, rank correlations."""
    c = summary["counts"]
    lines = [f"scored {c['scored']} pairs (read {c['read']}, kept {c['kept']}, skipped {c['skipped']}"
             + (f", limit {summary['limit']}" if summary.get("limit") else "") + f") -> {out_dir}/scores.parquet"]
    for m in MEASURES:
        s = summary["measures"][m]
        if "quantiles" in s:
            q = s["quantiles"]
            lines.append(f"  {m:<26} min {q['0']:>11.4g}  median {q['0.5']:>11.4g}  max {q['1']:>11.4g}  "
                         f"positive {100 * s['positive_fraction']:5.1f}%")
    rho = summary["spearman"]
    others = [m for m in MEASURES if m != "ln_ches"]
    lines.append("  Spearman vs ln_ches: " + ", ".join(
        f"{m} {rho['ln_ches'][m]:+.3f}" if rho["ln_ches"][m] is not None else f"{m} n/a" for m in others))
    return "\n".join(lines)
