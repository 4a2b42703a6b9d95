"""The ``jaxalign plot`` job: figures and a report of a training run and/or a probe output.

:func:`plot_report` writes PNG figures (:mod:`jaxalign.plots`) and ``report.md`` / ``report.html``
(:mod:`jaxalign.report`) for a training run (``metrics.jsonl``, ``ledger.zarr``) and/or a probe output
(``probe.zarr``, :mod:`jaxalign.jobs.probe`; its run's metrics are found through the store's ``run``
attribute). The statistics on the figures (Spearman's ρ) are computed here and handed to the plots.

A probe with ``squeeze`` adds the squeezing figures (:func:`_squeeze_section`); a run with per-pair
telemetry (:func:`jaxalign.train.telemetry.read_table`) adds the pairs × steps heat map of Δ log π(y+|x),
the gradient cosine against the realised change (:func:`telemetry_views` makes their arrays) and the loss
with the alarm steps marked (without a table, from ``displacement/alarm_frac`` in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxalign.analysis.entanglement import CASES
from jaxalign.analysis.stats import spearman
from jaxalign.errors import ConfigError, DataError
from jaxalign.jobs import probe as probe_job

#: Columns of the per-pair telemetry table of a run (:func:`jaxalign.train.telemetry.read_table`) used here.
TELEMETRY_COLUMNS = ("step", "pair_id", "logp_chosen", "ref_logp_chosen", "grad_cos", "alarm")
ALARM_METRIC = "displacement/alarm_frac"
#: The squeezing probe's responses (:mod:`jaxalign.jobs.squeeze`): measure suffix → legend label.
SQUEEZE_RESPONSES = {"greedy": "greedy ŷ", "chosen": "chosen y+", "rejected": "rejected y−"}
TRAINING_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                 "logps/chosen", "logps/rejected")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a bad line is a ``DataError`` naming the line)."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{i}: not a JSON object ({err})") from None
    return records


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
    probe_dir = src if (src / probe_job.STORE_NAME).exists() else None
    data = probe_job.read_probe(probe_dir) if probe_dir else None
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

    metrics: list[dict] = []
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

    if data is not None and "greedy_logps" in data["attributes"].get("measures", []):
        _squeeze_section(rep, data, dest)
    if data is not None and len(data["step"]) >= 2:
        _probe_sections(rep, data, dest, top)
    elif data is not None:
        rep.text("Only one checkpoint probed: changes need at least two.")
    table = read_telemetry(run_dir) if run_dir is not None else None
    if table is not None or any(ALARM_METRIC in r for r in metrics):
        _telemetry_section(rep, table, metrics, dest)
    md, _ = rep.write(dest)
    return md


def _probe_sections(rep, data: Mapping[str, Any], dest: Path, top: int) -> None:
    from jaxalign import plots
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
            rho = spearman(data[key][0], change)
            rep.figure(save_figure(plots.score_vs_change(data[key][0], change, rho=rho, score_name=name,
                                                         change_name=change_name), dest / fname),
                       f"{name} against the realised change of log π(y+|x)")
            rho_rows.append([name, rho])
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


# --- the squeezing probe ----------------------------------------------------------------------------

def _squeeze_section(rep, data: Mapping[str, Any], dest: Path) -> None:
    """Figures and a table of ``probe --what squeeze`` (:mod:`jaxalign.jobs.squeeze`)."""
    from jaxalign import plots
    from jaxalign.report import save_figure

    steps, s0 = data["step"], int(data["step"][0])
    rep.section("Squeezing (Ren & Sutherland, ICLR 2025)")
    rep.text("Under a negative gradient on off-policy responses, probability mass moves to the tokens the "
             "model already favours: the greedy response ŷ gains log-probability, other responses lose it "
             "and the next-token distributions get peakier (top-1 mass up, entropy down). ŷ is each "
             "checkpoint's own greedy response; 'other' is the chosen response of the next pair "
             "(σ(i) = i + 1 mod N) under this prompt.")
    deltas = {"greedy ŷ": "greedy_logps", "chosen y+": "chosen_logps", "rejected y−": "rejected_logps",
              "other pair's y+": "other_logps"}
    rep.figure(save_figure(plots.mean_bands(steps, {k: data[m] - data[m][:1] for k, m in deltas.items()},
                                            ylabel=f"Δ log π(y|x) since step {s0} (nats)",
                                            title="Log-probabilities: greedy, chosen, rejected, other"),
                           dest / "squeeze_logps.png"),
               f"Change of each response's summed log-probability since step {s0} (mean over pairs)")
    for key, ylabel in (("top1", "mean top-1 probability"), ("entropy", "mean next-token entropy (nats)")):
        rep.figure(save_figure(plots.mean_bands(steps, {lab: data[f"{key}_{r}"] for r, lab in
                                                        SQUEEZE_RESPONSES.items()}, ylabel=ylabel),
                               dest / f"squeeze_{key}.png"),
                   f"{ylabel[0].upper() + ylabel[1:]} over the positions of each response")
    cols = ["greedy_logps", "other_logps", "greedy_len"] + [f"{k}_{r}" for k in ("top1", "entropy")
                                                             for r in SQUEEZE_RESPONSES]
    rep.table(["step"] + [f"mean {c}" for c in cols],
              [[int(s)] + [float(np.nanmean(data[c][k])) for c in cols] for k, s in enumerate(steps)])


# --- per-pair telemetry of a training run -----------------------------------------------------------

def read_telemetry(run_dir: str | Path):
    """The run's per-pair telemetry table (:func:`jaxalign.train.telemetry.read_table`), or ``None`` when
    the run recorded none."""
    from jaxalign.train import telemetry

    read = getattr(telemetry, "read_table", None)
    if read is None:
        return None
    try:
        table = read(run_dir)
    except FileNotFoundError:
        return None
    return table if table is not None and len(table) else None


def telemetry_views(table) -> dict[str, np.ndarray]:
    """What the telemetry figures draw, from the per-pair table (a ``pandas.DataFrame``, one row per pair
    and step, with at least :data:`TELEMETRY_COLUMNS`).

    Returns:
      ``steps`` ``[S]`` and ``pair_ids`` ``[P]`` (sorted); ``dlogp_PS`` ``[P, S]`` log π(y+|x) − its
      reference log-prob (before the step's update; NaN where the pair was not in the step's batch, the
      mean if it was there twice); ``cos`` and ``change`` ``[M]``, one per row followed by a later row
      of the same pair: cos(g_w, g_l) at the step, and the realised change of log π(y+|x) from that step
      to the next step the pair is seen (the updates of every step in between included);
      ``alarm_steps`` ``[A]`` with ``alarm_fraction`` ``[A]``: the steps where any pair raised the alarm
      and the fraction of the step's rows that did.

    Raises:
      DataError: a column is missing.
    """
    missing = [c for c in TELEMETRY_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"the telemetry table lacks the column(s) {missing}")
    t = table.assign(dlogp=table["logp_chosen"] - table["ref_logp_chosen"])
    per = t.groupby(["pair_id", "step"], sort=True).agg(dlogp=("dlogp", "mean"), logp=("logp_chosen", "mean"),
                                                        cos=("grad_cos", "mean")).reset_index()
    grid = per.pivot(index="pair_id", columns="step", values="dlogp")
    nxt = per.groupby("pair_id")["logp"].shift(-1)
    later = nxt.notna().to_numpy()
    frac = t.groupby("step")["alarm"].mean()
    frac = frac[frac > 0]
    return {"steps": grid.columns.to_numpy(), "pair_ids": grid.index.to_numpy(),
            "dlogp_PS": grid.to_numpy(np.float64), "cos": per["cos"].to_numpy(np.float64)[later],
            "change": (nxt - per["logp"]).to_numpy(np.float64)[later],
            "alarm_steps": frac.index.to_numpy(), "alarm_fraction": frac.to_numpy(np.float64)}


def _telemetry_section(rep, table, metrics: list[dict], dest: Path) -> None:
    """The heat map, cosine-vs-change scatter and alarm-marked loss curve of a run's telemetry."""
    from jaxalign import plots
    from jaxalign.report import save_figure

    rep.section("Per-pair telemetry of the training batches")
    views = telemetry_views(table) if table is not None else None
    if views is not None:
        rep.figure(save_figure(plots.pair_step_heatmap(views["steps"], views["pair_ids"], views["dlogp_PS"],
                                                       label="log π(y+|x) − log π_ref(y+|x) (nats)"),
                               dest / "telemetry_heatmap.png"),
                   "Δ log π(y+|x) against the reference of each pair at each step it was trained on")
        rho = spearman(views["cos"], views["change"])
        rep.figure(save_figure(plots.score_vs_change(
            views["cos"], views["change"], rho=rho, score_name="cos(g_w, g_l) at the step",
            change_name="realised Δ log π(y+|x) to the pair's next step (nats)"), dest / "telemetry_cosine.png"),
            "Gradient cosine of a pair against the change of its log π(y+|x) until it is next seen")
        alarm_steps, alarm_fraction = views["alarm_steps"], views["alarm_fraction"]
    else:
        flagged = [r for r in metrics if (r.get(ALARM_METRIC) or 0) > 0]
        alarm_steps = np.array([r.get("step", 0) for r in flagged])
        alarm_fraction = np.array([r[ALARM_METRIC] for r in flagged], np.float64)
    if metrics:
        rep.figure(save_figure(plots.loss_with_alarms([r.get("step", i) for i, r in enumerate(metrics)],
                                                      [r["loss"] for r in metrics], alarm_steps, alarm_fraction),
                               dest / "loss_alarms.png"),
                   "Loss with the steps where pairs raised the displacement alarm (y+ fell while the margin "
                   "rose, or a predicted case other than ideal)")
    rep.text(f"{len(alarm_steps)} step(s) raised the alarm" + (
        f"; the first: {', '.join(str(int(s)) for s in alarm_steps[:10])}." if len(alarm_steps) else "."))
