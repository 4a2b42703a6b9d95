"""The ``jaxalign plot`` job: figures and a report of a training run and/or a probe output.

:func:`plot_report` writes PNG figures (:mod:`jaxalign.plots`) and ``report.md`` / ``report.html``
(:mod:`jaxalign.report`) for a training run (``metrics.jsonl``, ``ledger.zarr``) and/or a probe output
(``probe.zarr``, :mod:`jaxalign.jobs.probe`; its run's metrics are found through the store's ``run``
attribute). The statistics on the figures (Spearman's ρ) are computed here and handed to the plots.
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
