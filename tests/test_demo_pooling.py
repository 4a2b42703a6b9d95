"""``jaxalign demo --seeds``: several seeds' runs pooled (``jaxalign.demo.pooling``).

The pooled numbers are recomputed from the training ledgers each seed wrote (tensorstore + NumPy), with
``scipy.stats.ttest_1samp`` as the independent t-test; the formatting and the errors on hand-built summaries.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))

from test_demo import ANSWERS, _demo, _read_ledger, tiny  # noqa: E402,F401  (tiny: the module fixture)

from jaxalign.demo import pooling  # noqa: E402


def _summary(seed: int, high: tuple[float, float, float], **settings) -> dict:
    """A hand-built demo summary: the high subset's (Δ mean, s.e., fell fraction) of 32 pairs."""
    mean, se, fell = high
    return {"settings": {"seed": seed, "out": f"o{seed}", "pairs": 128, **settings},
            "subsets": {"high": {"pairs": 32, "d_chosen_mean": mean, "d_chosen_se": se,
                                 "chosen_fell_fraction": fell}}}


def _write(tmp_path: Path, summaries: list[dict]) -> list[Path]:
    dirs = []
    for s in summaries:
        d = tmp_path / f"seed-{s['settings']['seed']}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(s))
        dirs.append(d)
    return dirs


def test_pool_matches_the_formulas_on_hand_built_summaries(tmp_path):
    highs = [(-0.19, 0.30, 15 / 32), (-0.25, 0.31, 13 / 32), (0.05, 0.28, 10 / 32), (-0.4, 0.2, 20 / 32)]
    dirs = _write(tmp_path, [_summary(s, h) for s, h in enumerate(highs)])
    pooled = pooling.pool(pooling.load_summaries(dirs))
    p = pooled["runs"]["high"]
    means = np.array([h[0] for h in highs])
    assert pooled["seeds"] == [0, 1, 2, 3] and list(pooled["runs"]) == ["high"]
    assert p["mean"] == pytest.approx(means.mean(), rel=1e-12)
    assert p["se_between"] == pytest.approx(means.std(ddof=1) / 2, rel=1e-12)
    assert p["p_value"] == pytest.approx(stats.ttest_1samp(means, 0.0).pvalue, rel=1e-9)
    assert p["se_within"] == pytest.approx(np.sqrt(np.sum(np.square([h[1] for h in highs]))) / 4, rel=1e-12)
    assert (p["seeds_fell"], p["pairs_fell"], p["pairs"]) == (3, 58, 128)
    # p ≈ 0.19 here: not significant, and the table says so.
    assert not p["significant"]
    row = next(line for line in pooling.format_pooled(pooled).splitlines() if line.startswith("| highest"))
    assert f"**{means.mean():+.3f} ± {means.std(ddof=1) / 2:.3f}**" in row and "| no |" in row


def test_significance_needs_both_the_seeds_and_the_pairs(tmp_path):
    # Seeds agreeing closely (tiny between-seed s.e.) but each with a wide pair-level s.e.: not significant.
    dirs = _write(tmp_path, [_summary(s, (-0.2 + 0.001 * s, 0.3, 0.4)) for s in range(5)])
    assert not pooling.pool(pooling.load_summaries(dirs))["runs"]["high"]["significant"]
    # Both tight: significant.
    tight = tmp_path / "tight"
    tight.mkdir()
    dirs = _write(tight, [_summary(s, (-0.2 + 0.01 * s, 0.05, 0.6)) for s in range(5)])
    p = pooling.pool(pooling.load_summaries(dirs))["runs"]["high"]
    assert p["p_value"] < 0.05 and abs(p["mean"]) > 2 * p["se_within"] and p["significant"]


def test_pooling_refuses_what_it_cannot_pool(tmp_path):
    with pytest.raises(pooling.PoolingError, match="at least two"):
        pooling.load_summaries([tmp_path])
    with pytest.raises(pooling.PoolingError, match=r"missing/summary\.json: not found"):
        pooling.load_summaries([tmp_path / "missing", tmp_path])
    dirs = _write(tmp_path, [_summary(0, (0.1, 0.1, 0.1)), _summary(1, (0.1, 0.1, 0.1), pairs=64)])
    with pytest.raises(pooling.PoolingError, match="settings differ .* in pairs; only runs that differ in --seed"):
        pooling.load_summaries(dirs)
    same = tmp_path / "same"
    same.mkdir()
    a, b = same / "a", same / "b"
    for d in (a, b):
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(_summary(3, (0.1, 0.1, 0.1))))
    with pytest.raises(pooling.PoolingError, match="seed 3 appears twice"):
        pooling.load_summaries([a, b])


@pytest.mark.parametrize("text, seeds", [("0-3", [0, 1, 2, 3]), ("0,3,7", [0, 3, 7]), ("0-2, 9", [0, 1, 2, 9])])
def test_parse_seeds(text, seeds):
    assert pooling.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["3", "1,1", "a-b", "0,x", "-1,2", ""])
def test_parse_seeds_rejects(text):
    with pytest.raises(pooling.PoolingError, match="--seeds"):
        pooling.parse_seeds(text)


def test_seed_and_seeds_together_exit_2(tiny, tmp_path):
    r = _demo("--quick", "--model", str(tiny["model"]), "--seed", "1", "--seeds", "0-2",
              "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "give --seed or --seeds, not both" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_over_two_seeds_pools_what_the_ledgers_say(tiny, tmp_path):
    out = tmp_path / "pooled_out"
    r = _demo("--quick", "--model", str(tiny["model"]), "--answers", str(tiny["questions"]), *ANSWERS,
              "--no-mitigations", "--lr", "1e-3", "--seeds", "0,1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    pooled = json.loads((out / "pooled.json").read_text())
    assert pooled["seeds"] == [0, 1] and set(pooled["runs"]) == {"high", "low"}
    for run in ("high", "low"):
        means, fell = [], 0
        for seed in (0, 1):
            ledger = _read_ledger(out / f"seed-{seed}" / "train" / run / "ledger.zarr")
            d = ledger["chosen_logps"][-1].astype(np.float64) - ledger["chosen_logps"][0]
            means.append(d.mean())
            fell += int((d < 0).sum())
        p = pooled["runs"][run]
        assert p["means"] == pytest.approx(means, abs=1e-5)  # float32 ledger, summed in float64 either way
        assert p["mean"] == pytest.approx(np.mean(means), abs=1e-5)
        assert p["pairs_fell"] == fell
        if not math.isnan(p["p_value"]):
            assert p["p_value"] == pytest.approx(stats.ttest_1samp(means, 0.0).pvalue, rel=1e-4)
    md = (out / "pooled.md").read_text()
    assert "| highest LN-CHES |" in md and "pooled over seeds 0,1" in r.stdout


def test_full_is_not_combined_with_quick_or_seeds(tiny, tmp_path):
    for extra in (["--quick"], ["--seed", "2"], ["--seeds", "0,1"]):
        r = _demo("--full", *extra, "--model", str(tiny["model"]), "--out", str(tmp_path / "o"), timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, extra
        assert "--full is the default demo over seeds 0-5" in r.stderr and not (tmp_path / "o").exists()
