"""The ``jaxalign entangle`` job: gradient entanglement of every pair of a data set, written to ``DIR``.

Steps: load the model (and ``--ref``), read, validate (``on_bad_record``) and tokenize the data with EOS
appended (:func:`jaxalign.jobs.common.load_pairs`); sort the pairs by length into batches of one padded
shape; per batch (:func:`jaxalign.jobs.common.run_batches`) run the probe
(:func:`jaxalign.analysis.entanglement.make_pair_grads`: prompt once, pairs sharded over the mesh), the
margin weights of ``--loss`` and the first-order predictions; write the batch as a Parquet part (and its
rows of ``layers.zarr`` / ``sketch.zarr``). A rerun with the same arguments skips finished batches; at
the end the parts are checked (every kept record exactly once), sorted by record index and committed
atomically.

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

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from jaxalign import parallel, store
from jaxalign.analysis import entanglement as ent
from jaxalign.errors import ConfigError
from jaxalign.jobs import common
from jaxalign.jobs.options import fingerprint
from jaxalign.jobs.settings import Entangle
from jaxalign.models import lora

NUMERIC = ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner", "grad_cosine", "weight_chosen",
           "weight_rejected", "pred_dlogp_chosen", "pred_dlogp_rejected")
SCHEMA = pa.schema([("index", pa.int64())] + [(c, pa.float64()) for c in NUMERIC]
                   + [("case", pa.string()), ("logp_chosen", pa.float64()), ("logp_rejected", pa.float64())]
                   + [(c, pa.int32()) for c in ("prompt_len", "chosen_len", "rejected_len")])
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
LAYER_ARRAYS = ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner")
SKETCH_ARRAYS = ("chosen", "diff")


def run_entangle(model_path: str, data: str, out_dir: str, *, mesh=None, progress: bool = True,
                 after_batch: Callable[[int], None] | None = None, model_and_tokenizer=None,
                 compiler_options: Mapping[str, Any] | None = None, **settings) -> dict:
    """:func:`run` of ``Entangle(model=model_path, data=data, out=out_dir, **settings)``."""
    return run(Entangle(model=model_path, data=data, out=out_dir, **settings), mesh=mesh, progress=progress,
               after_batch=after_batch, model_and_tokenizer=model_and_tokenizer,
               compiler_options=compiler_options)


def run(cfg: Entangle, *, mesh=None, progress: bool = True, after_batch: Callable[[int], None] | None = None,
        model_and_tokenizer=None, compiler_options: Mapping[str, Any] | None = None) -> dict | None:
    """Computes the entanglement of every pair of ``cfg.data`` and writes ``cfg.out`` (module doc).

    Args:
      cfg: the settings.
      mesh: a ``(data, fsdp, tensor)`` mesh or ``None``.
      progress: show a progress bar.
      after_batch: called with the batch id after each batch is written (tests interrupt with it).
      model_and_tokenizer: an already loaded ``(model, tokenizer)``.
      compiler_options: passed to ``jax.jit``.

    Returns:
      the summary (also ``summary.json``); ``None`` on processes other than the lead.
    """
    common.check_loss(cfg.loss, cfg.beta, cfg.loss_options)
    if cfg.shard_params and mesh is not None:  # the weights over every device, and the pairs too
        mesh = parallel.make_mesh((1, -1, 1), list(mesh.devices.flat))
    out = Path(cfg.out)
    table_path = out / "pairs.parquet"
    model, tokenizer, loaded, plan, lead = common.open_inputs(
        cfg, table_path, job="entangle", mesh=mesh, model_and_tokenizer=model_and_tokenizer,
        check_model=lambda m: lora.load_adapter(m, cfg.adapter, mesh=mesh))
    tokens = loaded.tokens
    missing = [i for i in cfg.heatmaps if int(i) not in set(tokens.index.tolist())]
    if missing:  # checked before any pair is computed, so a bad index leaves no partial output
        raise ConfigError(f"--heatmap {missing[0]}: no kept record has this index")
    # the parameter selection (--params, --last-blocks) is checked here too, before anything is written
    probe = ent.make_pair_grads(model, method=cfg.method, params=cfg.params, last_blocks=cfg.last_blocks,
                           per_layer=cfg.per_layer, chunk_size=cfg.chunk_size, mesh=mesh,
                           compiler_options=compiler_options, shard_params=cfg.shard_params)
    chunks = store.ChunkedTable(table_path, fingerprint=fingerprint(
        cfg, model=store.model_digest(cfg.model), ref=None if cfg.ref is None else store.model_digest(cfg.ref),
        adapter=None if cfg.adapter is None else store.model_digest(cfg.adapter),
        tokens=store.digest(tokens.to_arrays()), pairs=len(tokens), plan=plan.digest))
    methods_used: dict[str, str] = {}
    compute, side = _batch_fns(cfg, model, probe, tokens, out, chunks.resuming, mesh, compiler_options,
                               methods_used)
    if lead:
        common.write_skipped(loaded, out)
    common.run_batches(plan, common.shared_prompt_maker(tokens, loaded.pad_id), compute,
                       common.ChunkSink(chunks, side), progress=progress, desc="entangle",
                       rows_done=chunks.rows_done, after_batch=after_batch)
    if not lead:
        return None
    for index in cfg.heatmaps:
        _heatmap(model, tokenizer, tokens, int(index), out, cfg.params, cfg.last_blocks, compiler_options)
    about = {"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data, "loss": cfg.loss, "beta": cfg.beta,
             "loss_options": dict(cfg.loss_options), "method": cfg.method, "methods_used": methods_used,
             "params": list(cfg.params) if cfg.params else None, "last_blocks": cfg.last_blocks, "ref": cfg.ref,
             "parameters": int(sum(int(np.prod(probe.split.leaves[i].shape)) for i in probe.split.selected))}
    table = chunks.commit(expected_keys=tokens.index.tolist(), schema=SCHEMA, metadata=about)
    summary = summarize(table, loaded.report, **about)
    store.write_json(out / "summary.json", summary)
    plot_scatter(table, out / "scatter.png", title=f"{Path(cfg.model).name} on {cfg.data} ({cfg.loss})")
    chunks.cleanup()
    return summary


def _batch_fns(cfg: Entangle, model, probe, tokens, out: Path, resuming: bool, mesh, compiler_options,
               methods_used: dict) -> tuple[Callable, Callable]:
    """``compute(rows, batch) -> (table, arrays)`` and ``side(rows, arrays)`` (the zarr rows)."""
    N, lead = len(tokens), common.is_lead()
    groups: dict[str, store.ZarrGroup] = {}  # written by the lead process only
    sketcher = None
    if cfg.per_layer and lead:
        names = probe.split.selected_names
        groups["layers"] = rows_group(out / "layers.zarr", {a: ((N, len(names)), "float64") for a in LAYER_ARRAYS},
                                      {"groups": list(names), "rows": "pairs in the order of the index array"},
                                      tokens.index, resuming)
    if cfg.sketch_dim:
        from jaxalign.analysis import entanglement_tokens as tok_lib

        sketcher = tok_lib.make_sketcher(model, k=cfg.sketch_dim, seed=cfg.sketch_seed, kind=cfg.sketch_kind,
                                         params=cfg.params, last_blocks=cfg.last_blocks,
                                         chunk_size=cfg.chunk_size, mesh=mesh, compiler_options=compiler_options)
        if lead:
            groups["sketch"] = rows_group(out / "sketch.zarr",
                                          {a: ((N, cfg.sketch_dim), "float32") for a in SKETCH_ARRAYS},
                                          {"k": cfg.sketch_dim, "kind": cfg.sketch_kind, "seed": cfg.sketch_seed,
                                           "params": list(cfg.params) if cfg.params else None,
                                           "block": tok_lib.SKETCH_BLOCK}, tokens.index, resuming)
    ref_fn = None
    if cfg.ref is not None:
        from jaxalign.models import load_pretrained

        ref_fn = _logps_fn(load_pretrained(cfg.ref, mesh=mesh)[0], mesh)

    def compute(rows: np.ndarray, batch: dict):
        grads = probe(batch)
        methods_used["{}x{}".format(batch["prompt_ids"].shape[1], batch["chosen_ids"].shape[1])] = grads.method
        ref_w, ref_l = ref_fn(batch) if ref_fn is not None else (None, None)
        res = ent.weigh(grads, batch, loss=cfg.loss, beta=cfg.beta, ref_chosen_logps=ref_w,
                        ref_rejected_logps=ref_l, loss_options=cfg.loss_options)
        n = len(rows)
        arrays = {}
        if cfg.per_layer:
            arrays["layers"] = {a: res.layers[:n, j] for j, a in enumerate(LAYER_ARRAYS)}
        if sketcher is not None:
            sk = sketcher(batch)
            arrays["sketch"] = {a: sk[a][:n] for a in SKETCH_ARRAYS}
        return _table(res, tokens, rows), arrays

    def side(rows: np.ndarray, arrays: dict) -> None:
        for group, values in arrays.items():
            for name, v in values.items():
                groups[group].write_rows(name, np.asarray(rows), v)

    return compute, side


def _table(res, tokens, rows: np.ndarray) -> pa.Table:
    n = len(rows)
    return pa.table({
        "index": pa.array(tokens.index[rows].astype(np.int64)),
        **{c: pa.array(np.asarray(getattr(res, c))[:n].astype(np.float64)) for c in NUMERIC},
        "case": pa.array([ent.CASES[i] for i in np.asarray(res.case)[:n]], pa.string()),
        "logp_chosen": pa.array(res.chosen_logps[:n].astype(np.float64)),
        "logp_rejected": pa.array(res.rejected_logps[:n].astype(np.float64)),
        "prompt_len": pa.array(tokens.prompt.lengths[rows].astype(np.int32)),
        "chosen_len": pa.array(tokens.chosen.lengths[rows].astype(np.int32)),
        "rejected_len": pa.array(tokens.rejected.lengths[rows].astype(np.int32)),
    }, schema=SCHEMA)


def rows_group(folder: Path, arrays: Mapping[str, tuple], attributes: Mapping[str, Any], index: np.ndarray,
               resuming: bool) -> store.ZarrGroup:
    """A rows-by-pair zarr group (``layers.zarr``, ``sketch.zarr``): created fresh, or reopened when the
    run resumes; ``index`` ``[N]`` holds the record index of each row."""
    fresh = not resuming or not (folder / "zarr.json").exists()
    group = store.ZarrGroup(folder, attributes=attributes, fresh=fresh)
    for name, (shape, dtype) in dict(arrays, index=((len(index),), "int64")).items():
        if fresh:
            group.create(name, shape, dtype, chunks=[min(1024, shape[0])] + list(shape[1:]))
        else:
            group.open(name, shape)
    if fresh:
        group.write_rows("index", np.arange(len(index)), index.astype(np.int64))
    return group


def _pair_logps(model, batch: dict):
    """``(s_w, s_l)`` ``[B]`` of a (reference) model, the prompt run once."""
    from jaxalign import pairs

    out = pairs.pair_forward(model, *(batch[k] for k in ent.BATCH_FIELDS))
    return out.chosen_logps, out.rejected_logps


def _logps_fn(model, mesh):
    """``batch -> (s_w, s_l)`` float64 NumPy of a (reference) model, jitted once per shape."""
    from jaxalign.models import parts

    call = parts.host_jit(model, _pair_logps, keys=ent.BATCH_FIELDS, mesh=mesh)

    def logps(batch):
        w, l_ = call(batch)
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
    save_heatmap(tg, out / f"heatmap_{index}", chosen_labels=label(tg.chosen_ids),
                         rejected_labels=label(tg.rejected_ids), title=f"record {index}: token cosines")


def save_heatmap(tg, stem, *, chosen_labels: Sequence[str] | None = None,
                 rejected_labels: Sequence[str] | None = None, title: str = "") -> tuple[Any, Any]:
    """Writes ``stem.npy`` (the cosine matrix of a
    :class:`~jaxalign.analysis.entanglement_tokens.TokenGram`) and ``stem.png`` (its heat map), atomically.

    Returns:
      the two paths.
    """
    import io

    stem = Path(stem)
    buf = io.BytesIO()
    np.save(buf, tg.cosine)
    npy = store.write_bytes(stem.with_suffix(".npy"), buf.getvalue())
    Rw, Rl = tg.cosine.shape
    fig = common.figure(min(3 + 0.35 * Rl, 20), min(2.5 + 0.3 * Rw, 20))
    ax = fig.subplots()
    im = ax.imshow(tg.cosine, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, label="cosine of token gradients")
    ax.set_xlabel("rejected response token")
    ax.set_ylabel("chosen response token")
    if rejected_labels is not None and Rl <= 60:
        ax.set_xticks(range(Rl), list(rejected_labels), rotation=90, fontsize=7)
    if chosen_labels is not None and Rw <= 60:
        ax.set_yticks(range(Rw), list(chosen_labels), fontsize=7)
    if title:
        ax.set_title(title)
    return npy, common.save_figure(fig, stem.with_suffix(".png"))


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
    fig = common.figure(11, 4.2)
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
    common.histogram(hx, table.column("grad_cosine").to_numpy(zero_copy_only=False), "cos(g_w, g_l)")
    common.save_figure(fig, path, title)


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
