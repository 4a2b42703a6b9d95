"""``jaxalign.plots``: every figure has labelled axes, a title and a legend, saves as a PNG that opens,
and rejects arrays of the wrong shape. Spearman ρ in the scatter title is checked against SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxalign import plots
from jaxalign.report import save_figure

RNG = np.random.default_rng(0)
STEPS = np.array([0, 10, 20, 30])
CHOSEN = -40 + np.cumsum(RNG.normal(-1, 1, (4, 12)), 0)
REJECTED = -45 + np.cumsum(RNG.normal(-3, 1, (4, 12)), 0)


def _check(fig, path, *, legend=True):
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_title() or (fig._suptitle is not None and fig._suptitle.get_text())
    if legend:
        assert ax.get_legend() is not None
    saved = save_figure(fig, path)
    assert saved.stat().st_size > 1000
    with Image.open(saved) as im:
        im.verify()
    with Image.open(saved) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_each_figure(tmp_path):
    _check(plots.logp_trajectories(STEPS, CHOSEN, REJECTED), tmp_path / "a.png")
    _check(plots.fraction_fallen(STEPS, CHOSEN), tmp_path / "b.png")
    _check(plots.case_fractions(STEPS, {"ideal": [1, .5, .4, .3], "both_down": [0, .5, .6, .7]}),
           tmp_path / "c.png")
    _check(plots.case_fractions(STEPS[:1], {"ideal": [.6], "both_down": [.4]}), tmp_path / "c1.png")
    _check(plots.cosine_histogram(RNG.uniform(-1, 1, 50)), tmp_path / "d.png")
    _check(plots.cosine_histogram({"step 0": RNG.uniform(0, .1, 9), "step 9": RNG.uniform(0, .2, 9)}),
           tmp_path / "e.png")
    metrics = [{"step": i, "loss": 0.7 - 0.01 * i, "rewards/margins": 0.02 * i} for i in range(1, 40)]
    fig = plots.training_curves(metrics, keys=("loss", "rewards/margins", "absent"))
    assert len([a for a in fig.axes if a.get_visible() and a.lines]) == 2
    _check(fig, tmp_path / "f.png")
    empty = save_figure(plots.training_curves([], keys=("loss",)), tmp_path / "f0.png")  # a note, no axes
    assert empty.stat().st_size > 500
    _check(plots.subset_bars(["top CHES", "random"], [-2.0, 0.3], [0.4, 0.2], ylabel="Δ log π(y+|x) (nats)"),
           tmp_path / "g.png")
    _check(plots.subset_bars(["a", "b", "c"], [1.0, 2.0, 3.0], ylabel="x (nats)"), tmp_path / "h.png",
           legend=False)


def test_fraction_fallen_values():
    chosen = np.array([[0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, -2.0], [-1.0, -1.0, -1.0, -1.0]])
    fig = plots.fraction_fallen([0, 1, 2], chosen)
    y = fig.axes[0].lines[0].get_ydata()
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0])


def test_score_vs_change_spearman_equals_scipy(tmp_path):
    from scipy.stats import spearmanr

    x = RNG.normal(size=30)
    y = -x + RNG.normal(scale=0.8, size=30)
    y[3] = np.nan  # left out, as SciPy's nan_policy="omit"
    from jaxalign.analysis.stats import spearman

    fig = plots.score_vs_change(x, y, rho=spearman(x, y), score_name="CHES at step 0")
    rho = spearmanr(x, y, nan_policy="omit").statistic
    assert f"{rho:+.3f}" in fig.axes[0].get_title()
    assert "29 pairs" in fig.axes[0].get_legend().get_texts()[0].get_text()
    _check(fig, tmp_path / "s.png")


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[S, N\]"):
        plots.logp_trajectories([0, 1], np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="same length"):
        plots.score_vs_change([1, 2], [1, 2, 3], rho=None, score_name="x")
    with pytest.raises(ValueError, match="one per step"):
        plots.case_fractions([0, 1], {"ideal": [1.0]})
    with pytest.raises(ValueError, match="one entry per name"):
        plots.subset_bars(["a"], [1.0, 2.0], ylabel="y")


# --- the squeezing probe and the per-pair telemetry of a run ------------------------------------------

CASE_NAMES = ("ideal", "both_down", "both_up", "inverted")


def _telemetry_table(seed: int = 1):
    """A synthetic per-pair table with the columns of ``jaxalign.train.telemetry.read_table``: 7 pairs,
    steps 1-9, 3 pairs a step (pair 2 twice at step 4), log-probs drifting down, some alarms."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, 10):
        ids = [(step * 3 + k) % 7 for k in range(3)] + ([2] if step == 4 else [])
        for pid in ids:
            lc, lr = -20 - 0.3 * step + rng.normal(), -25 - 0.8 * step + rng.normal()
            gw, gl = rng.uniform(1, 2, 2)
            rows.append(dict(step=step, pair_id=pid, logp_chosen=lc, logp_rejected=lr,
                             ref_logp_chosen=-20.0 + 0.1 * pid, ref_logp_rejected=-25.0, grad_sq_chosen=gw,
                             grad_sq_rejected=gl, grad_dot=0.5, grad_cos=rng.uniform(-1, 1),
                             margin_weight=0.05, predicted_case=CASE_NAMES[rng.integers(4)],
                             alarm=bool(rng.uniform() < 0.3)))
    return pd.DataFrame(rows)


def test_telemetry_views_equal_brute_force():
    from jaxalign.jobs.plot import telemetry_views

    df = _telemetry_table()
    v = telemetry_views(df)
    steps, pids = sorted(set(df.step)), sorted(set(df.pair_id))
    assert v["steps"].tolist() == steps and v["pair_ids"].tolist() == pids
    recs = df.to_dict("records")
    for i, p in enumerate(pids):
        for j, s in enumerate(steps):
            here = [r["logp_chosen"] - r["ref_logp_chosen"] for r in recs if r["pair_id"] == p and r["step"] == s]
            if here:
                np.testing.assert_allclose(v["dlogp_PS"][i, j], sum(here) / len(here), rtol=1e-12)
            else:
                assert np.isnan(v["dlogp_PS"][i, j])
    # realised change: each (pair, step) to the same pair's next step, by a plain loop
    cos, change = [], []
    for p in pids:
        seen = sorted({r["step"] for r in recs if r["pair_id"] == p})
        mean = lambda s, k: np.mean([r[k] for r in recs if r["pair_id"] == p and r["step"] == s])  # noqa: E731
        for a, b in zip(seen, seen[1:]):
            cos.append(mean(a, "grad_cos"))
            change.append(mean(b, "logp_chosen") - mean(a, "logp_chosen"))
    np.testing.assert_allclose(v["cos"], cos, rtol=1e-12)
    np.testing.assert_allclose(v["change"], change, rtol=1e-12)
    frac = {s: np.mean([r["alarm"] for r in recs if r["step"] == s]) for s in steps}
    assert v["alarm_steps"].tolist() == [s for s in steps if frac[s] > 0]
    np.testing.assert_allclose(v["alarm_fraction"], [frac[s] for s in steps if frac[s] > 0], rtol=1e-12)
    from jaxalign.errors import DataError

    with pytest.raises(DataError, match="grad_cos"):
        telemetry_views(df.drop(columns=["grad_cos"]))


def test_telemetry_and_squeeze_figures(tmp_path):
    from jaxalign.jobs.plot import telemetry_views

    v = telemetry_views(_telemetry_table())
    fig = plots.pair_step_heatmap(v["steps"], v["pair_ids"], v["dlogp_PS"], label="Δ log π(y+|x) (nats)")
    img = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_array_equal(img.mask, np.isnan(v["dlogp_PS"]))
    np.testing.assert_array_equal(img.filled(0), np.nan_to_num(v["dlogp_PS"]))
    _check(fig, tmp_path / "heat.png", legend=False)
    loss_steps = np.arange(1, 10)
    fig = plots.loss_with_alarms(loss_steps, 0.7 - 0.01 * loss_steps, v["alarm_steps"], v["alarm_fraction"])
    markers = [ln for ln in fig.axes[0].lines if ln.get_marker() == "v"][0]
    np.testing.assert_array_equal(markers.get_xdata(), v["alarm_steps"])
    _check(fig, tmp_path / "alarms.png")
    series = {"greedy": CHOSEN, "chosen": REJECTED}
    fig = plots.mean_bands(STEPS, series, ylabel="log π (nats)")
    for line, values in zip(fig.axes[0].lines, series.values()):
        np.testing.assert_allclose(line.get_ydata(), values.mean(axis=1), rtol=1e-12)
    _check(fig, tmp_path / "bands.png")
    with pytest.raises(ValueError, match=r"\[P, S\]"):
        plots.pair_step_heatmap([0, 1], [5], np.zeros((2, 2)), label="x")


def test_plot_report_draws_the_run_telemetry(tmp_path):
    """``jaxalign plot RUN`` with a run whose telemetry table is the synthetic one, read back through
    ``jaxalign.train.telemetry.read_table`` from a part file where a training run writes it."""
    import json
    import shutil

    from jaxalign import cli
    from jaxalign.train import telemetry

    df = _telemetry_table()
    run = tmp_path / "run"
    (run / telemetry.FOLDER).mkdir(parents=True)
    df.to_parquet(run / telemetry.FOLDER / "part-1-9.parquet")
    assert len(telemetry.read_table(run)) == len(df)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.7 - 0.01 * s, "displacement/alarm_frac": float(s % 3 == 0)}) + "\n"
        for s in range(1, 10)))
    assert cli.main(["plot", str(run)]) == 0
    md = (run / "plots" / "report.md").read_text()
    for name in ("telemetry_heatmap.png", "telemetry_cosine.png", "loss_alarms.png", "training.png"):
        assert f"]({name})" in md and (run / "plots" / name).stat().st_size > 1000, name
    # without the table, the alarm steps come from metrics.jsonl
    shutil.rmtree(run / telemetry.FOLDER)
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "p2")]) == 0
    md = (tmp_path / "p2" / "report.md").read_text()
    assert "loss_alarms.png" in md and "telemetry_heatmap.png" not in md
    assert "3 step(s) raised the alarm; the first: 3, 6, 9." in md
