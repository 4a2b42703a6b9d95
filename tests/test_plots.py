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
