"""The ``jaxalign entangle`` job: gradient entanglement of every pair of a data set, written to ``DIR``.

Steps: load the model (and ``--ref``), read, validate (``on_bad_record``) and tokenize the data with EOS
appended (:func:`jaxalign.analysis.ches_run.load_pairs`); sort the pairs by length into batches of one
padded shape; per batch run the probe (:func:`jaxalign.analysis.entanglement.make_probe`: prompt once,
pairs sharded over the mesh), the margin weights of ``--loss`` and the first-order predictions; write the
batch as a Parquet part (and its rows of ``layers.zarr`` / ``sketch.zarr``). A rerun with the same
arguments skips finished batches; at the end the parts are checked (every kept record exactly once),
sorted by record index and committed atomically.

Reference log-probs (losses that need them): the reference is the model itself at the start of training
(Δ = 0, e.g. DPO's weight is β/2 for every pair) unless ``--ref PATH`` names another model, whose
log-probs are then computed with the same prompt-once forward pass.

Output files in ``DIR``:

``pairs.parquet``
    one row per record: ``index``, ``grad_chosen_sqnorm`` ‖g_w‖², ``grad_rejected_sqnorm`` ‖g_l‖²,
    ``grad_inner`` ⟨g_w,g_l⟩, ``grad_cosine``, ``weight_chosen`` w_c, ``weight_rejected`` w_r,
    ``pred_dlogp_chosen`` = w_c‖g_w‖² − w_r⟨g_w,g_l⟩ and ``pred_dlogp_rejected`` = w_c⟨g_w,g_l⟩ − w_r‖g_l‖²
    (first-order change after one SGD step of size η = 1 on that pair alone), ``case`` (``ideal``,
    ``both_down``, ``both_up``, ``inverted``), then ``logp_chosen``, ``logp_rejected``, ``prompt_len``,
    ``chosen_len``, ``rejected_len``.
``summary.json``
    counts, the method used per padded shape, case fractions, quantiles of the cosine and of the
    norms, the fraction of pairs whose chosen log-prob is predicted to fall.
``scatter.png``
    predicted Δ log π(y_w) against Δ log π(y_l), coloured by case, and a cosine histogram.
``layers.zarr`` (``--per-layer``)
    zarr v3 group with arrays ``grad_chosen_sqnorm``, ``grad_rejected_sqnorm``, ``grad_inner`` ``[N, G]``
    (row = the pair's position in ``index``; ``G`` parameter arrays named in the group attribute
    ``groups``) and ``index`` ``[N]``.
``sketch.zarr`` (``--sketch-dim k``)
    zarr v3 group with ``chosen`` = Ω g_w and ``diff`` = Ω(g_w − g_l) ``[N, k]`` and ``index`` ``[N]``.
``heatmap_<index>.npy`` / ``.png`` (``--heatmap INDEX``)
    the token cosine matrix of that record (:func:`jaxalign.analysis.entanglement_tokens.token_gram`).
``skipped.jsonl``
    one line per record left out (``on_bad_record="skip"``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from jaxalign import store
from jaxalign.analysis import ches_run, jobs
from jaxalign.analysis import entanglement as ent
from jaxalign.errors import ConfigError

NUMERIC = ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner", "grad_cosine", "weight_chosen",
           "weight_rejected", "pred_dlogp_chosen", "pred_dlogp_rejected")
SCHEMA = pa.schema([("index", pa.int64())] + [(c, pa.float64()) for c in NUMERIC]
                   + [("case", pa.string()), ("logp_chosen", pa.float64()), ("logp_rejected", pa.float64())]
                   + [(c, pa.int32()) for c in ("prompt_len", "chosen_len", "rejected_len")])
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
LAYER_ARRAYS = ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner")


# --- zarr v3 through tensorstore --------------------------------------------------------------------

def _zarr_group(path: Path, attributes: Mapping[str, Any]) -> None:
    store.write_json(path / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                          "attributes": dict(attributes)})


def zarr_array(path: Path, shape: Sequence[int], dtype: str, *, create: bool):
    """Opens (or creates) a zarr v3 array with tensorstore; the first axis is chunked by 1024 rows."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if create:
        chunks = [max(1, min(1024, shape[0]))] + list(shape[1:])
        spec["metadata"] = {"shape": list(shape), "data_type": dtype,
                            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}}}
        return ts.open(spec, create=True, delete_existing=True).result()
    arr = ts.open(spec, open=True).result()
    if list(arr.shape) != list(shape):
        raise ConfigError(f"{path}: holds shape {list(arr.shape)}, this run needs {list(shape)}; remove it "
                          "to start over")
    return arr


def read_zarr(path) -> np.ndarray:
    """A whole zarr v3 array as NumPy."""
    import tensorstore as ts

    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}},
                   open=True).result().read().result()


class _Arrays:
    """The rows-by-pair zarr groups of a run (``layers.zarr``, ``sketch.zarr``), created or resumed."""

    def __init__(self, folder: Path, arrays: Mapping[str, tuple], attributes: Mapping[str, Any],
                 index: np.ndarray, resuming: bool):
        self.arrays = {}
        fresh = not resuming or not (folder / "zarr.json").exists()
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            _zarr_group(folder, attributes)
        for name, (shape, dtype) in arrays.items():
            self.arrays[name] = zarr_array(folder / name, shape, dtype, create=fresh)
        idx = zarr_array(folder / "index", (len(index),), "int64", create=fresh)
        if fresh:
            idx.write(index.astype(np.int64)).result()

    def write(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        order = np.argsort(rows)
        rows = rows[order]
        for name, v in values.items():
            arr = self.arrays[name]
            v = np.asarray(v)[order]
            # rows of one batch are not contiguous: write runs of consecutive rows.
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [rows.size]])):
                arr[int(rows[a]):int(rows[b - 1]) + 1].write(v[a:b].astype(arr.dtype.numpy_dtype)).result()


# --- the job ----------------------------------------------------------------------------------------

def run_entangle(model_path: str, data: str, out_dir: str, *, loss: str = "sigmoid", beta: float = 0.1,
                 loss_options: Mapping[str, Any] | None = None, method: str = "auto",
                 params: Sequence[str] | None = None, last_blocks: int | None = None,
                 per_layer: bool = False, batch_size: int = 8,
                 chunk_size: int | None = None, limit: int | None = None, max_length: int | None = None,
                 ref: str | None = None, on_bad_record: str = "error", chat: bool = False,
                 sketch_dim: int | None = None,
                 sketch_kind: str = "gaussian", sketch_seed: int = 0, heatmaps: Sequence[int] = (),
                 mesh=None, overwrite: bool = False, progress: bool = True,
                 after_batch: Callable[[int], None] | None = None, model_and_tokenizer=None,
                 compiler_options: Mapping[str, Any] | None = None) -> dict:
    """Computes the entanglement of every pair of ``data`` and writes ``out_dir`` (module doc).

    Args:
      model_path: a Hugging Face folder or ``.gguf`` file.
      data: a data file, a ``datasets`` folder or a built-in set name.
      out_dir: the output folder.
      loss, beta, loss_options: the loss whose margin weights make the predictions.
      method: ``auto``, ``exact``, ``jvp`` or ``gram``.
      params: parameter name patterns (regular expressions); ``None`` for all.
      last_blocks: only the parameters of the last ``n`` blocks.
      per_layer: write ``layers.zarr``.
      batch_size: pairs per batch (rounded up to a multiple of the mesh's ``data × fsdp``).
      chunk_size: pairs computed at once inside a batch (default: what fits the memory budget).
      limit: only the first ``limit`` records of the input.
      max_length: longest ``prompt + response`` in tokens (longer ones are truncated and counted).
      ref: a reference model for the loss (default: the model itself).
      on_bad_record: ``"error"`` or ``"skip"``.
      chat: render standard-format pairs with the tokenizer's chat template.
      sketch_dim, sketch_kind, sketch_seed: write ``sketch.zarr`` with ``k = sketch_dim``.
      heatmaps: record indices whose token heat maps to write.
      mesh: a ``(data, fsdp, tensor)`` mesh or ``None``.
      overwrite: replace a finished run.
      progress: show a progress bar.
      after_batch: called with the batch id after each batch is written (tests interrupt with it).
      model_and_tokenizer: an already loaded ``(model, tokenizer)``.
      compiler_options: passed to ``jax.jit``.

    Returns:
      the summary (also ``summary.json``).
    """
    from jaxalign import losses

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if method not in ent.METHODS:
        raise ConfigError(f"--method must be one of {', '.join(ent.METHODS)}, got {method!r}")
    if per_layer and method == "jvp":
        raise ConfigError("--per-layer needs --method exact, gram or auto (jvp gives totals only)")
    # Unknown losses or options fail now, not after the first batch.
    losses.margin_weights(loss, chosen_logps=np.zeros(1), rejected_logps=np.zeros(1),
                          ref_chosen_logps=np.zeros(1), ref_rejected_logps=np.zeros(1),
                          chosen_lengths=np.ones(1), rejected_lengths=np.ones(1), beta=beta,
                          **dict(loss_options or {}))
    out = Path(out_dir)
    table_path = out / "pairs.parquet"
    jobs.guard_finished(table_path, overwrite)
    model, tokenizer = jobs.load_model(model_path, job="entangle", mesh=mesh,
                                       model_and_tokenizer=model_and_tokenizer)
    ref_model = None
    if ref is not None:
        from jaxalign.models import load_pretrained

        ref_model, _ = load_pretrained(ref, mesh=mesh)
    out.mkdir(parents=True, exist_ok=True)
    loaded = ches_run.load_pairs(data, tokenizer, max_length=max_length, limit=limit,
                                 on_bad_record=on_bad_record, chat=chat, report=str(out / "skipped.jsonl"))
    tokens = loaded.tokens
    N = len(tokens)
    rows_multiple = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
    resp_len = np.maximum(tokens.chosen.lengths, tokens.rejected.lengths)
    batches = ches_run.plan_batches(tokens.prompt.lengths, resp_len, batch_size)
    fingerprint = {"model": os.path.abspath(model_path), "model_files": jobs.model_stamp(model_path),
                   "ref": None if ref is None else os.path.abspath(ref),
                   "ref_files": None if ref is None else jobs.model_stamp(ref),
                   "data": data, "tokens": jobs.tokens_digest(tokens), "chat": chat, "loss": loss,
                   "beta": beta,
                   "loss_options": dict(loss_options or {}), "method": method,
                   "params": list(params) if params else None, "last_blocks": last_blocks,
                   "per_layer": per_layer,
                   "batch_size": batch_size, "max_length": max_length, "limit": limit,
                   "on_bad_record": on_bad_record, "sketch": [sketch_dim, sketch_kind, sketch_seed],
                   "pairs": N, "plan": jobs.plan_digest(batches)}
    chunks = store.ChunkedTable(table_path, fingerprint=fingerprint)

    probe = ent.make_probe(model, method=method, params=params, last_blocks=last_blocks, per_layer=per_layer,
                           chunk_size=chunk_size,
                           mesh=mesh, compiler_options=compiler_options)
    names = probe.split.selected_names
    layers = sketches = sketcher = None
    if per_layer:
        G = len(names)
        layers = _Arrays(out / "layers.zarr", {a: ((N, G), "float64") for a in LAYER_ARRAYS},
                         {"groups": list(names), "rows": "pairs in the order of the index array"},
                         tokens.index, chunks.resuming)
    if sketch_dim:
        from jaxalign.analysis import entanglement_tokens as tok_lib

        sketcher = tok_lib.make_sketcher(model, k=sketch_dim, seed=sketch_seed, kind=sketch_kind,
                                         params=params, last_blocks=last_blocks, chunk_size=chunk_size,
                                         mesh=mesh,
                                         compiler_options=compiler_options)
        sketches = _Arrays(out / "sketch.zarr", {a: ((N, sketch_dim), "float32") for a in ("chosen", "diff")},
                           {"k": sketch_dim, "kind": sketch_kind, "seed": sketch_seed,
                            "params": list(params) if params else None,
                            "block": tok_lib.SKETCH_BLOCK}, tokens.index, chunks.resuming)
    ref_fn = None if ref_model is None else _logps_fn(ref_model, mesh)

    from tqdm.auto import tqdm

    from jaxalign.data.batch import shared_prompt_batch

    rows_per_batch = -(-batch_size // rows_multiple) * rows_multiple
    methods_used: dict[str, str] = {}
    bar = tqdm(total=N, initial=chunks.rows_done, unit="pair", desc="entangle", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch_id, rows in enumerate(batches):
            if chunks.is_done(batch_id):
                continue
            padded = np.full(rows_per_batch, -1, np.int64)
            padded[:len(rows)] = rows
            # Filler rows repeat the first pair (a filler's empty prompt has no token to continue).
            padded[len(rows):] = rows[0]
            p_len = tokens.prompt.lengths[rows]
            r_len = resp_len[rows]
            Tp, Tr = ches_run.bucket(int(p_len.max())), ches_run.bucket(int(r_len.max()))
            batch = shared_prompt_batch(tokens, padded, pad_id=loaded.pad_id, prompt_length=Tp,
                                        response_length=Tr)
            grads = probe(batch)
            methods_used[f"{Tp}x{Tr}"] = grads.method
            ref_w = ref_l = None
            if ref_fn is not None:
                ref_w, ref_l = ref_fn(batch)
            res = ent.weigh(grads, batch, loss=loss, beta=beta, ref_chosen_logps=ref_w,
                            ref_rejected_logps=ref_l, loss_options=loss_options)
            n = len(rows)
            if layers is not None:
                layers.write(np.asarray(rows), {a: res.layers[:n, j] for j, a in enumerate(LAYER_ARRAYS)})
            if sketcher is not None:
                sk = sketcher(batch)
                sketches.write(np.asarray(rows), {a: sk[a][:n] for a in ("chosen", "diff")})
            chunks.write_chunk(batch_id, pa.table({
                "index": pa.array(tokens.index[rows].astype(np.int64)),
                **{c: pa.array(np.asarray(getattr(res, c))[:n].astype(np.float64)) for c in NUMERIC},
                "case": pa.array([ent.CASES[i] for i in np.asarray(res.case)[:n]], pa.string()),
                "logp_chosen": pa.array(res.chosen_logps[:n].astype(np.float64)),
                "logp_rejected": pa.array(res.rejected_logps[:n].astype(np.float64)),
                "prompt_len": pa.array(p_len.astype(np.int32)),
                "chosen_len": pa.array(tokens.chosen.lengths[rows].astype(np.int32)),
                "rejected_len": pa.array(tokens.rejected.lengths[rows].astype(np.int32)),
            }, schema=SCHEMA))
            bar.update(n)
            if after_batch is not None:
                after_batch(batch_id)
    finally:
        bar.close()
    for index in heatmaps:
        _heatmap(model, tokenizer, tokens, int(index), out, params, last_blocks, compiler_options)
    about = {"model": model_path, "data": data, "loss": loss, "beta": beta,
             "loss_options": dict(loss_options or {}), "method": method, "methods_used": methods_used,
             "params": list(params) if params else None, "last_blocks": last_blocks, "ref": ref,
             "parameters": int(sum(int(np.prod(probe.split.leaves[i].shape)) for i in probe.split.selected))}
    table = chunks.commit(expected_keys=tokens.index.tolist(), schema=SCHEMA, metadata=about)
    summary = summarize(table, loaded.report, **about)
    store.write_json(out / "summary.json", summary)
    plot_scatter(table, out / "scatter.png", title=f"{Path(model_path).name} on {data} ({loss})")
    chunks.cleanup()
    return summary


def _logps_fn(model, mesh):
    """``batch -> (s_w, s_l)`` of a (reference) model with the prompt run once."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxalign import pairs

    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, batch):
        out = pairs.pair_forward(nnx.merge(graphdef, state), *(batch[k] for k in ent.BATCH_FIELDS))
        return out.chosen_logps, out.rejected_logps

    def logps(batch):
        arrays = {k: jnp.asarray(batch[k]) for k in ent.BATCH_FIELDS}
        if mesh is not None:
            with jax.set_mesh(mesh):
                w, l_ = fn(state, arrays)
        else:
            w, l_ = fn(state, arrays)
        return np.asarray(w, np.float64), np.asarray(l_, np.float64)

    return logps


def _heatmap(model, tokenizer, tokens, index: int, out: Path, params, last_blocks, compiler_options) -> None:
    from jaxalign.analysis import entanglement_tokens as tok_lib

    where = np.flatnonzero(tokens.index == index)
    if where.size == 0:
        raise ConfigError(f"--heatmap {index}: no kept record has this index")
    row = int(where[0])
    tg = tok_lib.token_gram(model, tokens.prompt[row], tokens.chosen[row], tokens.rejected[row],
                            params=params, last_blocks=last_blocks, compiler_options=compiler_options)
    label = lambda ids: [tokenizer.decode([int(t)]) for t in ids]  # noqa: E731
    tok_lib.save_heatmap(tg, out / f"heatmap_{index}", chosen_labels=label(tg.chosen_ids),
                         rejected_labels=label(tg.rejected_ids), title=f"record {index}: token cosines")


def summarize(table: pa.Table, report, **about) -> dict:
    """The ``summary.json`` contents (module doc)."""
    counts = {"read": report.read, "kept": report.kept, "probed": table.num_rows,
              "skipped": len(report.skipped), "skipped_by_kind": report.counts_by_kind(),
              "identical_pairs": len(report.identical), "truncated": report.truncated}
    cases = table.column("case").to_pylist()
    n = max(len(cases), 1)
    fractions = {c: cases.count(c) / n for c in ent.CASES}
    stats = {}
    for c in ("grad_cosine", "grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner"):
        v = table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
        v = v[np.isfinite(v)]
        stats[c] = ({"mean": float(v.mean()), "quantiles": {f"{q:g}": float(np.quantile(v, q))
                                                            for q in QUANTILES}} if v.size else {})
    dw = table.column("pred_dlogp_chosen").to_numpy(zero_copy_only=False)
    sq_w = table.column("grad_chosen_sqnorm").to_numpy(zero_copy_only=False)
    sq_l = table.column("grad_rejected_sqnorm").to_numpy(zero_copy_only=False)
    ip = table.column("grad_inner").to_numpy(zero_copy_only=False)
    # Yuan et al.'s Grad_Condition, with the bug of their code fixed: ⟨g_w,g_l⟩ / min(‖g_w‖², ‖g_l‖²).
    cond = ip / np.maximum(np.minimum(sq_w, sq_l), 1e-300) if ip.size else np.zeros(0)
    return {**about, "counts": counts, "case_fractions": fractions,
            "chosen_down_fraction": float((dw < 0).mean()) if dw.size else None,
            "grad_condition_mean": float(cond.mean()) if cond.size else None,
            "measures": stats, "source": report.source, "format": report.format}


def plot_scatter(table: pa.Table, path: Path, *, title: str = "") -> None:
    """``scatter.png``: predicted Δs_w vs Δs_l by case, and the histogram of the cosines."""
    from jaxalign import report

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax, hx = fig.subplots(1, 2)
    dw = table.column("pred_dlogp_chosen").to_numpy(zero_copy_only=False)
    dl = table.column("pred_dlogp_rejected").to_numpy(zero_copy_only=False)
    cases = np.asarray(table.column("case").to_pylist(), dtype=object)
    colours = {"ideal": "#2ca02c", "both_down": "#d62728", "both_up": "#1f77b4", "inverted": "#9467bd"}
    for c in ent.CASES:
        sel = cases == c
        if sel.any():
            ax.scatter(dw[sel], dl[sel], s=10, alpha=0.7, color=colours[c], label=f"{c} ({int(sel.sum())})")
    ax.axhline(0, color="k", lw=0.7)
    ax.axvline(0, color="k", lw=0.7)
    ax.set_xlabel("predicted Δ log π(y_w)  (η = 1)")
    ax.set_ylabel("predicted Δ log π(y_l)  (η = 1)")
    ax.legend(fontsize=8)
    cos = table.column("grad_cosine").to_numpy(zero_copy_only=False)
    cos = cos[np.isfinite(cos)]
    if cos.size:
        hx.hist(cos, bins=min(50, max(5, cos.size // 4)), color="#4c72b0")
    hx.set_xlabel("cos(g_w, g_l)")
    hx.set_ylabel("pairs")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=100)


def format_summary(summary: dict, out_dir: str) -> str:
    """A few readable lines: counts, methods, case fractions, cosine quantiles."""
    c = summary["counts"]
    lines = [f"probed {c['probed']} pairs (read {c['read']}, kept {c['kept']}, skipped {c['skipped']}) "
             f"-> {out_dir}/pairs.parquet",
             f"  method: {summary['method']} ("
             + ", ".join(f"{k}: {v}" for k, v in summary["methods_used"].items()) + ")",
             "  cases: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["case_fractions"].items())]
    q = summary["measures"]["grad_cosine"].get("quantiles")
    if q:
        lines.append(f"  cos(g_w, g_l): min {q['0']:.3g}  median {q['0.5']:.3g}  max {q['1']:.3g}")
    return "\n".join(lines)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` loss options; values parsed as JSON when possible (numbers, booleans)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--loss-option {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
