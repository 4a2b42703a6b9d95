"""The ``jaxalign probe`` job (a fixed probe set across checkpoints) and the ``jaxalign plot`` report.

``run_probe``: load the model of a run (``--run``: its ``config.json``, initial weights and dtypes) or the
first of ``--checkpoints``; read, validate and tokenize the probe data with EOS appended
(:func:`jaxalign.analysis.ches_run.load_pairs`); then for each checkpoint not yet in ``DIR/probe.zarr``
(step order; with ``--every N`` only steps that are multiples of N) restore its parameters onto the
current mesh, measure every pair (:class:`jaxalign.analysis.probe.Measurer`) and append the row. After
each pass ``DIR/probe.parquet`` (long form) is rewritten atomically. A rerun continues where the last
stopped; ``--follow`` keeps polling a live run for new checkpoints until the run's last step is probed,
its ``final/`` export appears with nothing new, or ``idle_timeout_s`` passes without a new checkpoint.

Output files in ``DIR``:

``probe.zarr``
    zarr v3 group, layout in :mod:`jaxalign.analysis.probe`.
``probe.parquet``
    one row per (checkpoint, pair): ``step``, ``index``, ``prompt_len``, ``chosen_len``, ``rejected_len``
    and every measure (``case`` as ``ideal``/``both_down``/``both_up``/``inverted``).
``skipped.jsonl``
    records left out (``on_bad_record="skip"``).

``plot_report(DIR)`` writes PNG figures and ``report.md`` / ``report.html`` (:mod:`jaxalign.report`) for a
training run (``metrics.jsonl``, ``ledger.zarr``) and/or a probe output (``probe.zarr``; its run's
metrics are found through the store's ``run`` attribute).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxalign import store
from jaxalign.analysis import jobs
from jaxalign.analysis import probe as probe_lib
from jaxalign.errors import ConfigError


def _loss_from_run(cfg) -> tuple[Any, float, dict]:
    """The margin-weight loss of a run: ``(name or names, beta, options)`` as ``loop.train`` uses them."""
    from jaxalign.train import step as step_lib

    spec = step_lib.LossSpec.from_config(cfg.loss, shared_prompt=True)
    options = dict(spec.options, **({"weights": list(spec.weights)} if spec.weights else {}))
    return (list(spec.names) if spec.weights else spec.names[0]), spec.beta, options


def run_probe(out_dir: str, data: str, *, run: str | None = None, checkpoints: Sequence[str] | None = None,
              what: str | Sequence[str] = "logps,ches", every: int | None = None, follow: bool = False,
              poll_s: float = 30.0, idle_timeout_s: float = 3600.0, loss: str | None = None,
              beta: float | None = None, loss_options: Mapping[str, Any] | None = None,
              method: str = "auto", params: Sequence[str] | None = None, last_blocks: int | None = None,
              chunk_size: int | None = None, batch_size: int = 8, limit: int | None = None,
              max_length: int | None = None, chat: bool = False, on_bad_record: str = "error", mesh=None,
              overwrite: bool = False, progress: bool = True,
              after_checkpoint: Callable[[int], None] | None = None,
              compiler_options: Mapping[str, Any] | None = None) -> dict:
    """Probes every checkpoint of ``run`` (or the folders ``checkpoints``) on ``data``; writes ``out_dir``.

    Args:
      out_dir: the output folder (module doc).
      data: the probe pairs: a data file, a ``datasets`` folder or a built-in set name.
      run: a ``jaxalign train`` output folder: step 0 is its initial weights, then each Orbax checkpoint.
      checkpoints: Hugging Face folders (or ``.gguf`` files) instead of ``run``, probed in the order given;
        steps from their names' trailing numbers (``checkpoint-500``), else positions.
      what: ``logps``, ``ches``, ``entangle`` (comma-separated; log-probs are always measured).
      every: only steps that are multiples of ``every``.
      follow: keep polling ``run`` for new checkpoints (module doc); ``poll_s`` between polls.
      idle_timeout_s: with ``follow``, stop after this long without a new checkpoint.
      loss, beta, loss_options: margin weights for the entanglement predictions (default: the run's loss,
        else ``sigmoid`` with β 0.1); the reference log-probs are the first row's (step 0 of a run).
      method, params, last_blocks, chunk_size: of :func:`jaxalign.analysis.entanglement.make_probe`.
      batch_size: pairs per batch (rounded up to a multiple of the mesh's ``data × fsdp``).
      limit, max_length, chat, on_bad_record: how the data are read (as ``jaxalign ches``); with ``run``,
        ``max_length`` defaults to the run's ``data.max_length``.
      mesh: a ``(data, fsdp, tensor)`` mesh or ``None``.
      overwrite: replace an output made with other settings instead of refusing.
      progress: show a progress bar.
      after_checkpoint: called with each step after its row is committed (tests interrupt with it).
      compiler_options: passed to ``jax.jit`` of the entanglement probe.

    Returns:
      ``{"out", "pairs", "steps" (all rows), "probed" (this call's steps)}``.

    Raises:
      ConfigError: bad arguments; CheckpointError: an output with other settings, or a checkpoint that
      cannot be restored; DataError / ModelError: bad data or model files.
    """
    from tqdm.auto import tqdm

    from jaxalign.analysis import ches_run
    from jaxalign.train import step as step_lib

    if (run is None) == (not checkpoints):
        raise ConfigError("give exactly one of --run DIR or --checkpoints PATH …")
    if follow and run is None:
        raise ConfigError("--follow needs --run (a list of --checkpoints does not grow)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if every is not None and every < 1:
        raise ConfigError(f"--every must be at least 1, got {every}")
    what_t = probe_lib.parse_what(what)
    out = Path(out_dir)

    cfg = None
    if run is not None:
        cfg, model, tokenizer, model_path = probe_lib.load_run(run, mesh=mesh)
        run_loss, run_beta, run_opts = _loss_from_run(cfg)
        if max_length is None:
            max_length = cfg.data.max_length
        source_id = {"run": os.path.abspath(run), "model": model_path,
                     "model_files": jobs.model_stamp(model_path)}
    else:
        from jaxalign.models import load_pretrained

        for p in checkpoints:
            if not Path(p).exists():
                raise ConfigError(f"--checkpoints {p}: no such folder or file")
        model, tokenizer = load_pretrained(checkpoints[0], mesh=mesh)
        run_loss, run_beta, run_opts = "sigmoid", 0.1, {}
        source_id = {"first": os.path.abspath(checkpoints[0]),
                     "model_files": jobs.model_stamp(checkpoints[0])}
    if tokenizer is None:
        raise ConfigError(f"{run or checkpoints[0]}: the model has no tokenizer files; probe needs them")
    if loss is None:
        loss, loss_options = run_loss, (run_opts if loss_options is None else loss_options)
    beta = run_beta if beta is None else beta
    if "entangle" in what_t:
        from jaxalign import losses

        losses.margin_weights(loss, chosen_logps=np.zeros(1), rejected_logps=np.zeros(1),
                              ref_chosen_logps=np.zeros(1), ref_rejected_logps=np.zeros(1),
                              chosen_lengths=np.ones(1), rejected_lengths=np.ones(1), beta=beta,
                              **dict(loss_options or {}))
    parts, params0 = step_lib.ModelParts.split(model)
    del model

    out.mkdir(parents=True, exist_ok=True)
    loaded = ches_run.load_pairs(data, tokenizer, max_length=max_length, limit=limit,
                                 on_bad_record=on_bad_record, chat=chat, report=str(out / "skipped.jsonl"))
    tokens = loaded.tokens
    if len(tokens) == 0:
        raise ConfigError(f"--data {data}: no pair left to probe")
    fingerprint = dict(source_id, data=data, tokens=jobs.tokens_digest(tokens), what=list(what_t), chat=chat,
                       max_length=max_length, limit=limit, on_bad_record=on_bad_record,
                       **({"loss": loss, "beta": beta, "loss_options": dict(loss_options or {}),
                           "method": method, "params": list(params) if params else None,
                           "last_blocks": last_blocks} if "entangle" in what_t else {}))
    per_example = {"index": tokens.index, "prompt_len": tokens.prompt.lengths,
                   "chosen_len": tokens.chosen.lengths, "rejected_len": tokens.rejected.lengths}
    zarr_store = probe_lib.ProbeStore(
        out / probe_lib.STORE_NAME, per_example=per_example, measures=probe_lib.measures_for(what_t),
        attributes={"fingerprint": fingerprint, "run": None if run is None else os.path.abspath(run),
                    "data": data, "loss": loss, "beta": beta, "what": list(what_t)},
        overwrite=overwrite)
    measurer = probe_lib.Measurer(parts, params0, tokens, loaded.pad_id, what=what_t, loss=loss, beta=beta,
                                  loss_options=loss_options, method=method, params=params,
                                  last_blocks=last_blocks, chunk_size=chunk_size, batch_size=batch_size,
                                  mesh=mesh, compiler_options=compiler_options)
    ref = None
    if zarr_store.rows:
        ref = {m: zarr_store.read(m)[0] for m in probe_lib.LOGP_MEASURES}

    ckpts = probe_lib.RunCheckpoints(run) if run is not None else None

    def sources():
        if ckpts is not None:
            return probe_lib.run_sources(ckpts, params0, every=every, skip=zarr_store.steps)
        return probe_lib.folder_sources(list(checkpoints), parts, params0, mesh=mesh, every=every,
                                        skip=zarr_store.steps)

    probed: list[int] = []
    last_new = time.monotonic()
    while True:
        todo = sources()
        for src in todo:
            bar = tqdm(total=len(tokens), unit="pair", desc=f"probe step {src.step}", disable=not progress,
                       dynamic_ncols=True, leave=False)
            try:
                values = measurer.measure(src.load(), ref=ref, progress=bar.update)
            finally:
                bar.close()
            zarr_store.append(src.step, src.name, values)
            if ref is None:
                ref = {m: values[m] for m in probe_lib.LOGP_MEASURES}
            probed.append(src.step)
            if after_checkpoint is not None:
                after_checkpoint(src.step)
        if todo or not (out / probe_lib.TABLE_NAME).exists():
            write_table(out)
            last_new = time.monotonic()
        if not follow or _run_finished(ckpts, Path(run), zarr_store.steps, bool(todo)):
            break
        if time.monotonic() - last_new > idle_timeout_s:
            break
        time.sleep(poll_s)
    return {"out": str(out), "pairs": len(tokens), "steps": sorted(zarr_store.steps), "probed": probed}


def _run_finished(ckpts: probe_lib.RunCheckpoints, run: Path, done: Sequence[int], new: bool) -> bool:
    """Whether a followed run has nothing more to come: its last step is probed, or it exported
    ``final/`` and the last poll found nothing new."""
    steps = ckpts.steps()
    if steps:
        try:
            total = ckpts.meta(steps[-1]).get("total_steps")
        except (ValueError, KeyError, FileNotFoundError):
            total = None
        if total is not None and int(total) in done:
            return True
    return (run / "final").is_dir() and not new


def write_table(out: str | Path) -> Path:
    """(Re)writes ``DIR/probe.parquet`` from ``DIR/probe.zarr`` (atomically)."""
    data = probe_lib.read_probe(out)
    attrs = data["attributes"]
    return store.write_table(probe_lib.long_table(data), Path(out) / probe_lib.TABLE_NAME,
                             metadata={"run": attrs.get("run"), "data": attrs.get("data"),
                                       "loss": attrs.get("loss"), "beta": attrs.get("beta")})


# --- jaxalign plot ----------------------------------------------------------------------------------

TRAINING_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                 "logps/chosen", "logps/rejected")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a bad line is a ``DataError`` naming the line)."""
    from jaxalign.errors import DataError

    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{i}: not a JSON object ({err})") from None
    return records


def _rho(x, y) -> float | None:
    from jaxalign.analysis.ches_run import spearman

    return spearman(x, y)


def plot_report(path: str | Path, out: str | Path | None = None, *, top: int = 10) -> Path:
    """Writes the figures and ``report.md``/``report.html`` for a run and/or probe output ``path``.

    Args:
      path: a ``jaxalign train`` output folder, a ``jaxalign probe`` output folder, or one holding both.
      out: where to write (default ``path/plots``).
      top: rows of the table of pairs whose chosen log-prob fell most.

    Returns:
      the ``report.md`` path.

    Raises:
      ConfigError: ``path`` holds neither ``metrics.jsonl``, ``ledger.zarr`` nor ``probe.zarr``.
    """
    from jaxalign import plots
    from jaxalign.report import Report, save_figure

    src = Path(path)
    dest = Path(out) if out is not None else src / "plots"
    probe_dir = src if (src / probe_lib.STORE_NAME).exists() else None
    data = probe_lib.read_probe(probe_dir) if probe_dir else None
    run_dir = src if (src / "metrics.jsonl").exists() or (src / "ledger.zarr").exists() else None
    if run_dir is None and data is not None and data["attributes"].get("run"):
        cand = Path(data["attributes"]["run"])
        run_dir = cand if (cand / "metrics.jsonl").exists() else None
    if data is None and run_dir is None:
        raise ConfigError(f"{src}: nothing to plot (no metrics.jsonl, ledger.zarr or probe.zarr); give a "
                          "`jaxalign train` or `jaxalign probe` output folder")
    dest.mkdir(parents=True, exist_ok=True)
    rep = Report(f"Run report: {src.resolve().name}")
    rep.text(f"Source: `{src}`" + (f"; training run `{run_dir}`" if run_dir and run_dir != src else "")
             + ". Log-probabilities are summed over the response tokens (nats).")

    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        metrics = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
        if metrics:
            rep.section("Training curves")
            rep.figure(save_figure(plots.training_curves(metrics, keys=TRAINING_KEYS), dest / "training.png"),
                       "Loss, rewards and mean log-probs of the training batches (metrics.jsonl, TRL names)")

    if data is not None:
        steps, chosen, rejected = data["step"], data["chosen_logps"], data["rejected_logps"]
        label = f"probe set ({chosen.shape[1]} pairs, {len(steps)} checkpoints)"
    elif run_dir is not None and (run_dir / "ledger.zarr").exists():
        from jaxalign.train.ledger import read_ledger

        led = read_ledger(run_dir / "ledger.zarr")
        steps, chosen, rejected = led["step"], led["chosen_logps"], led["rejected_logps"]
        label = f"ledger ({chosen.shape[1]} probe pairs, {len(steps)} rows)"
    else:
        steps = None
    if steps is not None and len(steps):
        rep.section("Chosen and rejected log-probabilities")
        rep.figure(save_figure(plots.logp_trajectories(steps, chosen, rejected, title=f"Log-probs, {label}"),
                               dest / "logps.png"),
                   "Mean (thick) and per-pair (thin) log π(y+|x) and log π(y−|x) at each checkpoint")
        rep.figure(save_figure(plots.fraction_fallen(steps, chosen), dest / "fraction_fallen.png"),
                   f"Fraction of pairs whose log π(y+|x) is below its step-{int(steps[0])} value")
        fell = chosen < chosen[:1]
        rep.table(["step", "mean log π(y+)", "mean log π(y−)", "mean Δ log π(y+)", "fraction y+ fell"],
                  [[int(s), float(np.nanmean(c)), float(np.nanmean(r)), float(np.nanmean(c - chosen[0])),
                    float(f.mean())] for s, c, r, f in zip(steps, chosen, rejected, fell)])

    if data is not None and len(data["step"]) >= 2:
        _probe_sections(rep, data, dest, top)
    elif data is not None:
        rep.text("Only one checkpoint probed: changes need at least two.")
    md, _ = rep.write(dest)
    return md


def _probe_sections(rep, data: Mapping[str, Any], dest: Path, top: int) -> None:
    from jaxalign import plots
    from jaxalign.analysis.entanglement import CASES
    from jaxalign.report import save_figure

    steps, chosen = data["step"], data["chosen_logps"]
    s0, s1 = int(steps[0]), int(steps[-1])
    change = chosen[-1] - chosen[0]
    change_name = f"Δ log π(y+|x), step {s0} → {s1} (nats)"
    measures = data["attributes"].get("measures", [])
    rho_rows = []
    predictors = []
    if "ches" in measures:
        predictors += [("ches", f"CHES at step {s0} (⟨S(y+),S(y−)⟩ − ‖S(y+)‖²)"),
                       ("ln_ches", f"LN-CHES at step {s0} (length-normalised)")]
    if "pred_dlogp_chosen" in measures:
        predictors += [("pred_dlogp_chosen", f"predicted Δ log π(y+|x) at step {s0} (first order, η=1)")]
    if predictors:
        rep.section("Did the step-0 scores predict the change?")
        rep.text("Razin et al.: pairs with a higher CHES lose more chosen probability (expect ρ < 0 for CHES "
                 "and LN-CHES against Δ log π(y+|x)). Yuan et al.: the first-order prediction "
                 "w_c‖g_w‖² − w_r⟨g_w,g_l⟩ has the sign of the change (expect ρ > 0).")
        for key, name in predictors:
            fname = f"{key}_vs_change.png"
            rep.figure(save_figure(plots.score_vs_change(data[key][0], change, score_name=name,
                                                         change_name=change_name), dest / fname),
                       f"{name} against the realised change of log π(y+|x)")
            rho_rows.append([name, _rho(data[key][0], change)])
        rep.table(["score", "Spearman ρ with Δ log π(y+|x)"], rho_rows)

    if "case" in measures:
        rep.section("Gradient entanglement")
        case = data["case"]
        fr = {c: (case == i).mean(axis=1) for i, c in enumerate(CASES)}
        rep.figure(save_figure(plots.case_fractions(steps, fr), dest / "case_fractions.png"),
                   "Fraction of pairs in each predicted case (ideal: y+ up and y− down; both_down: y+ falls)")
        cos = data["grad_cosine"]
        rep.figure(save_figure(plots.cosine_histogram({f"step {s0}": cos[0], f"step {s1}": cos[-1]}),
                               dest / "cosine_hist.png"),
                   "cos(g_w, g_l) of the probe pairs at the first and last checkpoint")
        rep.table(["step"] + list(CASES) + ["median cosine"],
                  [[int(s)] + [float(fr[c][k]) for c in CASES] + [float(np.nanmedian(cos[k]))]
                   for k, s in enumerate(steps)])

    rep.section("Pairs whose chosen log-probability fell most")
    order = np.argsort(change, kind="stable")[:top]
    n_fell = int((change < 0).sum())
    rep.text(f"{n_fell} of {change.size} pairs end with a lower log π(y+|x) at step {s1} than at step {s0}"
             + ("; the table lists those with the smallest change." if n_fell == 0 else
                f"; the {min(top, change.size)} with the lowest change:"))
    fell = chosen < chosen[:1]
    first = [int(steps[np.argmax(f)]) if f.any() else None for f in fell.T]
    headers = ["index", change_name, f"first step below step {s0}"]
    extra = [m for m in ("ches", "ln_ches", "pred_dlogp_chosen") if m in measures]
    rep.table(headers + [f"{m} at step {s0}" for m in extra],
              [[int(data["index"][i]), float(change[i]), first[i]] + [float(data[m][0][i]) for m in extra]
               for i in order])
