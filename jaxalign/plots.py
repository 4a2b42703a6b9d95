"""Figures of a training run or a checkpoint probe, as matplotlib figures (Agg backend, no display).

Every function is pure: arrays in, a :class:`matplotlib.figure.Figure` out, with labelled axes (units in
the label, log-probs in nats), a legend where there is more than one series, and a title. Save with
:func:`jaxalign.report.save_figure`. ``jaxalign plot`` (:mod:`jaxalign.jobs.plot`) and
``jaxalign demo`` build their reports from these.

Letters: ``S`` checkpoints (steps), ``N`` probe pairs.

Example::

    from jaxalign import plots
    from jaxalign.report import save_figure
    fig = plots.logp_trajectories(steps, chosen_SN, rejected_SN, title="probe set")
    save_figure(fig, "out/logps.png")
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LOGP_CHOSEN = "log π(y+|x) (nats)"
LOGP_REJECTED = "log π(y−|x) (nats)"
CHOSEN_COLOR = "tab:blue"
REJECTED_COLOR = "tab:red"
#: Per-example traces drawn at most (a random but fixed subset beyond this), so big probe sets stay legible.
MAX_TRACES = 200
CASE_LABELS = {"ideal": "ideal (y+ ↑, y− ↓)", "both_down": "both_down (y+ ↓, y− ↓)",
               "both_up": "both_up (y+ ↑, y− ↑)", "inverted": "inverted (y+ ↓, y− ↑)"}
CASE_COLORS = {"ideal": "tab:green", "both_down": "tab:red", "both_up": "tab:orange", "inverted": "tab:purple"}
DEFAULT_CURVE_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    # ``Figure`` directly (not pyplot): no global figure manager, nothing to leak between calls.
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _integer_steps(ax, axis: str = "x") -> None:
    """Whole-number ticks on a step axis (a run with 3 checkpoints should not show step 1.25)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def _step_axes(ax, ylabel: str, title: str) -> None:
    """The common finish of a figure over training steps: labels, whole-number steps, grid, legend."""
    ax.set_xlabel("training step")
    _integer_steps(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _trace_subset(n: int) -> np.ndarray:
    if n <= MAX_TRACES:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_TRACES, replace=False))


def _as_2d(name: str, x, steps: np.ndarray) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] != steps.shape[0]:
        raise ValueError(f"{name} must be [S, N] with S={steps.shape[0]} steps; got shape {a.shape}")
    return a


def logp_trajectories(steps, chosen, rejected, *, title: str = "") -> Figure:
    """Chosen and rejected summed log-probs over training: mean per side plus thin per-example traces.

    Args:
      steps: ``[S]`` training steps of the checkpoints.
      chosen: ``[S, N]`` log π(y+|x) of each probe pair at each checkpoint (nats).
      rejected: ``[S, N]`` log π(y−|x).
    """
    steps = np.asarray(steps)
    chosen, rejected = _as_2d("chosen", chosen, steps), _as_2d("rejected", rejected, steps)
    fig = _figure()
    ax = fig.add_subplot()
    for values, color, label in ((chosen, CHOSEN_COLOR, "chosen y+"), (rejected, REJECTED_COLOR, "rejected y−")):
        idx = _trace_subset(values.shape[1])
        alpha = max(0.06, min(0.35, 6.0 / max(len(idx), 1)))
        ax.plot(steps, values[:, idx], color=color, lw=0.6, alpha=alpha)
        ax.plot(steps, np.nanmean(values, axis=1), color=color, lw=2.4, marker="o", ms=3.5,
                label=f"{label}: mean over {values.shape[1]} pairs")
    ax.plot([], [], color="gray", lw=0.6, alpha=0.6, label="single pairs")
    _step_axes(ax, "log π(y|x), summed over response tokens (nats)",
               title or "Chosen and rejected log-probabilities over training")
    return fig


def fraction_fallen(steps, chosen, *, title: str = "") -> Figure:
    """Fraction of pairs whose chosen log-prob is below its value at the first step, per step.

    Args:
      steps: ``[S]`` training steps.
      chosen: ``[S, N]`` log π(y+|x) (nats); row 0 is the reference (usually step 0).
    """
    steps = np.asarray(steps)
    chosen = _as_2d("chosen", chosen, steps)
    fell = chosen < chosen[:1]
    frac = fell.mean(axis=1)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, frac, color=CHOSEN_COLOR, lw=2, marker="o", ms=4,
            label=f"log π(y+|x) below its step-{steps[0]} value")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--", label="half of the pairs")
    ax.set_ylim(-0.02, 1.02)
    _step_axes(ax, f"fraction of the {chosen.shape[1]} pairs", title or "Pairs whose chosen log-probability fell")
    return fig


def score_vs_change(score, change, *, rho: float | None, score_name: str,
                    change_name: str = "Δ log π(y+|x) (nats)", title: str = "") -> Figure:
    """Scatter of a per-pair score (e.g. CHES at step 0) against a realised change, with Spearman ρ.

    Args:
      score: ``[N]`` score of each pair (x axis).
      change: ``[N]`` realised change of each pair (y axis), e.g. log π(y+|x) at the last checkpoint minus
        at the first.
      rho: Spearman's ρ of ``score`` and ``change`` (:func:`jaxalign.analysis.stats.spearman`; ``None``
        when undefined), computed by the caller: this module draws and does no statistics.
      score_name: x-axis label (with units where there are any).
      change_name: y-axis label.
    """
    x, y = np.asarray(score, np.float64).ravel(), np.asarray(change, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"score and change must have the same length; got {x.shape} and {y.shape}")
    rho_txt = "n/a" if rho is None else f"{rho:+.3f}"
    fig = _figure(5.6, 4.4)
    ax = fig.add_subplot()
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], s=14, alpha=0.7, color=CHOSEN_COLOR, edgecolors="none",
               label=f"{int(ok.sum())} pairs, Spearman ρ = {rho_txt}")
    ax.axhline(0.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(score_name)
    ax.set_ylabel(change_name)
    ax.set_title(title or f"{score_name.split(' (')[0]} vs realised change (ρ = {rho_txt})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def case_fractions(steps, fractions: Mapping[str, Sequence[float]], *, title: str = "") -> Figure:
    """Fractions of the entanglement cases (ideal, both_down, both_up, inverted) over training, stacked.

    Args:
      steps: ``[S]`` training steps.
      fractions: case name → ``[S]`` fraction of pairs in that case at each step (each column sums to 1).
    """
    steps = np.asarray(steps)
    names = list(fractions)
    vals = np.stack([np.asarray(fractions[k], np.float64) for k in names]) if names else np.zeros((0, steps.size))
    if vals.shape[1:] != steps.shape:
        raise ValueError(f"each fraction must have {steps.size} values (one per step); got {vals.shape}")
    fig = _figure()
    ax = fig.add_subplot()
    colors = [CASE_COLORS.get(k, f"C{i}") for i, k in enumerate(names)]
    if steps.size > 1:
        ax.stackplot(steps, vals, labels=[CASE_LABELS.get(k, k) for k in names], colors=colors, alpha=0.85)
    else:  # one checkpoint: a single stacked bar
        bottom = 0.0
        for k, v, c in zip(names, vals[:, 0], colors):
            ax.bar(steps, v, bottom=bottom, color=c, label=CASE_LABELS.get(k, k), width=0.8)
            bottom += v
    ax.set_ylim(0, 1)
    ax.set_xlabel("training step")
    _integer_steps(ax)
    ax.set_ylabel("fraction of pairs")
    ax.set_title(title or "Predicted entanglement case of each pair over training")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small",
              title="predicted case\n(first-order Δ log π)")
    return fig


def cosine_histogram(cosines, *, title: str = "", bins: int = 40) -> Figure:
    """Histogram of cos(g_w, g_l); a dict draws one outlined histogram per key (e.g. per step).

    Args:
      cosines: ``[N]`` cosines, or label → ``[N]`` cosines.
    """
    series = dict(cosines) if isinstance(cosines, Mapping) else {"pairs": cosines}
    fig = _figure()
    ax = fig.add_subplot()
    finite = [np.asarray(v, np.float64).ravel() for v in series.values()]
    finite = np.concatenate([v[np.isfinite(v)] for v in finite]) if finite else np.zeros(0)
    # [-1, 1] unless every cosine lies in a narrow band (then zoom, so the bins resolve it).
    lo, hi = (-1.0, 1.0) if finite.size == 0 else (max(-1.0, finite.min() - 0.05), min(1.0, finite.max() + 0.05))
    if hi - lo > 1.0:
        lo, hi = -1.0, 1.0
    edges = np.linspace(lo, hi, bins + 1)
    for i, (label, v) in enumerate(series.items()):
        v = np.asarray(v, np.float64).ravel()
        v = v[np.isfinite(v)]
        med = f", median {np.median(v):+.2f}" if v.size else ""
        ax.hist(v, bins=edges, histtype="step" if len(series) > 1 else "stepfilled", lw=1.6,
                color=f"C{i}", alpha=1.0 if len(series) > 1 else 0.75, label=f"{label} ({v.size} pairs{med})")
    ax.axvline(0.0, color="gray", lw=0.8, ls="--")
    ax.set_xlim(lo, hi)
    _integer_steps(ax, "y")
    ax.set_xlabel("cos(∇log π(y+|x), ∇log π(y−|x))" + ("" if (lo, hi) == (-1.0, 1.0) else "  (zoomed)"))
    ax.set_ylabel("number of pairs")
    ax.set_title(title or "Gradient cosine between chosen and rejected")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


_CURVE_LABELS = {
    "loss": "loss", "rewards/margins": "β·(log-ratio margin) (nats)", "rewards/accuracies": "reward accuracy",
    "rewards/chosen": "β·log π/π_ref (y+) (nats)", "rewards/rejected": "β·log π/π_ref (y−) (nats)",
    "logps/chosen": "log π(y+|x) (nats)", "logps/rejected": "log π(y−|x) (nats)",
}


def training_curves(metrics: Sequence[Mapping], *, keys: Sequence[str] = DEFAULT_CURVE_KEYS,
                    title: str = "") -> Figure:
    """Training metrics against step from ``metrics.jsonl`` records (TRL names), one panel per key.

    Records without a ``step`` use their position; keys absent from every record are left out; records
    from evaluation (with an ``eval/`` key prefix) are drawn as their own key if asked for.

    Args:
      metrics: records, each a mapping with ``step`` and metric values.
      keys: metric names to draw, in panel order.
    """
    present = [k for k in keys if any(k in r and r[k] is not None for r in metrics)]
    if not present:
        fig = _figure(6.4, 2.0)
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, f"no metrics among {', '.join(keys)}", ha="center", va="center")
        return fig
    ncols = 1 if len(present) == 1 else 2
    nrows = -(-len(present) // ncols)
    fig = _figure(5.2 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, present):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(metrics) if r.get(key) is not None]
        s, v = np.array([p[0] for p in pts], np.float64), np.array([p[1] for p in pts], np.float64)
        ax.plot(s, v, lw=1.2, color="C0", label=key, marker="o" if s.size <= 30 else None, ms=3)
        if s.size >= 20:  # a running mean over ~5% of the points makes noisy curves readable
            w = max(3, s.size // 20)
            ax.plot(s[w - 1:], np.convolve(v, np.ones(w) / w, mode="valid"), lw=2, color="C1",
                    label=f"running mean ({w} logs)")
        ax.set_xlabel("training step")
        _integer_steps(ax)
        ax.set_ylabel(_CURVE_LABELS.get(key, key))
        ax.set_title(key, fontsize="medium")
        ax.grid(alpha=0.3)
        if s.size >= 20:
            ax.legend(loc="best", fontsize="x-small")
    for ax in axes[len(present):]:
        ax.axis("off")
    fig.suptitle(title or "Training metrics")
    return fig


def subset_bars(names: Sequence[str], values, errors=None, *, ylabel: str, title: str = "") -> Figure:
    """Bar chart of one value per subset with optional error bars (e.g. mean Δ log π(y+) ± s.e.).

    Args:
      names: ``[K]`` subset names (x tick labels).
      values: ``[K]`` bar heights.
      errors: ``[K]`` symmetric error-bar half-widths, or ``None``.
      ylabel: y-axis label with units.
    """
    v = np.asarray(values, np.float64)
    if v.shape != (len(names),):
        raise ValueError(f"values must have one entry per name ({len(names)}); got shape {v.shape}")
    e = None if errors is None else np.asarray(errors, np.float64)
    fig = _figure(max(4.0, 1.1 * len(names) + 2.0), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    colors = [REJECTED_COLOR if val < 0 else CHOSEN_COLOR for val in v]
    ax.bar(x, v, yerr=e, capsize=5, color=colors, alpha=0.85, edgecolor="black", lw=0.6)
    # Values under the names (a label on the bar would collide with its error bar).
    ticks = [f"{n}\n{val:+.3g}" + ("" if e is None else f" ± {err:.2g}") for n, val, err in
             zip(names, v, e if e is not None else v)]
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, ticks, rotation=0 if max(map(len, names), default=0) < 12 else 20, ha="center")
    ax.set_xlabel("subset")
    ax.set_ylabel(ylabel)
    ax.set_title(title or ylabel)
    ax.grid(axis="y", alpha=0.3)
    if e is not None:
        ax.plot([], [], color="black", label="error bars: ± given error")
        ax.legend(loc="best", fontsize="small")
    ax.margins(y=0.15)
    return fig


def mean_bands(steps, series: Mapping[str, object], *, ylabel: str, title: str = "") -> Figure:
    """The mean over pairs of each series per step, with its 25–75 % band (e.g. the squeezing probe).

    Args:
      steps: ``[S]`` training steps.
      series: label → ``[S, N]`` values of the ``N`` pairs at each step (NaN left out).
      ylabel: y-axis label with units.
    """
    steps = np.asarray(steps)
    fig = _figure()
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(series.items()):
        v = _as_2d(label, values, steps)
        ok = np.isfinite(v).any(axis=1)
        lo, hi = np.full(len(steps), np.nan), np.full(len(steps), np.nan)
        lo[ok], hi[ok] = np.nanpercentile(v[ok], 25, axis=1), np.nanpercentile(v[ok], 75, axis=1)
        mean = np.full(len(steps), np.nan)
        mean[ok] = np.nanmean(v[ok], axis=1)
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2, lw=0)
        ax.plot(steps, mean, color=f"C{i}", lw=2, marker="o", ms=3.5, label=f"{label} (mean, 25–75 % band)")
    _step_axes(ax, ylabel, title or ylabel)
    return fig


def pair_step_heatmap(steps, pair_ids, values_PS, *, label: str, title: str = "") -> Figure:
    """Heat map of a per-pair value over training steps (e.g. Δ log π(y+|x) against the reference).

    Args:
      steps: ``[S]`` training steps (columns, in order).
      pair_ids: ``[P]`` pair ids (rows, in order).
      values_PS: ``[P, S]`` values; NaN where a pair was not in that step's batch (drawn grey).
      label: colour-bar label with units. The colours are centred on 0 (red below, blue above).
    """
    v = np.asarray(values_PS, np.float64)
    steps, pair_ids = np.asarray(steps), np.asarray(pair_ids)
    if v.shape != (pair_ids.size, steps.size):
        raise ValueError(f"values must be [P, S] = [{pair_ids.size}, {steps.size}]; got shape {v.shape}")
    from matplotlib import colormaps

    cmap = colormaps["RdBu"].with_extremes(bad="#dddddd")
    finite = v[np.isfinite(v)]
    lim = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    fig = _figure(max(5.0, min(12.0, 3.0 + 0.08 * steps.size)), max(3.5, min(10.0, 1.5 + 0.12 * pair_ids.size)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(v), aspect="auto", interpolation="nearest", cmap=cmap, vmin=-lim,
                   vmax=lim, origin="upper")
    for axis, ticks, n in ((ax.xaxis, steps, 12), (ax.yaxis, pair_ids, 25)):
        at = np.unique(np.linspace(0, ticks.size - 1, min(n, ticks.size)).round().astype(int)) if ticks.size else []
        axis.set_ticks(at, [str(ticks[i]) for i in at])
    ax.set_xlabel("training step")
    ax.set_ylabel("pair id")
    ax.set_title(title or f"{label} per pair and step (grey: pair not in the batch)")
    fig.colorbar(im, ax=ax, label=label)
    return fig


def loss_with_alarms(steps, loss, alarm_steps, alarm_fraction=None, *, title: str = "") -> Figure:
    """The training loss with the steps that raised the displacement alarm marked.

    Args:
      steps: ``[S]`` logged steps; ``loss``: ``[S]`` their loss.
      alarm_steps: ``[A]`` steps where at least one pair raised the alarm (red lines and markers).
      alarm_fraction: ``[A]`` fraction of the step's pairs in alarm (drawn on a second axis), or ``None``.
    """
    s, y = np.asarray(steps, np.float64), np.asarray(loss, np.float64)
    a = np.asarray(alarm_steps, np.float64)
    if s.shape != y.shape:
        raise ValueError(f"steps and loss must have the same length; got {s.shape} and {y.shape}")
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.plot(s, y, color="C0", lw=1.4, label="loss")
    for x in a:
        ax.axvline(x, color=REJECTED_COLOR, lw=0.6, alpha=0.35)
    at = np.interp(a, s, y) if s.size else a
    ax.plot(a, at, ls="none", marker="v", ms=6, color=REJECTED_COLOR, label=f"alarm ({a.size} steps)")
    if alarm_fraction is not None:
        f = np.asarray(alarm_fraction, np.float64)
        if f.shape != a.shape:
            raise ValueError(f"alarm_fraction must have one value per alarm step ({a.size}); got {f.shape}")
        ax2 = ax.twinx()
        ax2.bar(a, f, width=max(0.8, 0.008 * (np.ptp(s) if s.size else 1)), color=REJECTED_COLOR, alpha=0.3)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("fraction of the step's pairs in alarm")
    _step_axes(ax, "loss", title or "Training loss with displacement alarms")
    return fig
