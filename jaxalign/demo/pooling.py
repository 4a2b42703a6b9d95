"""Pool the results of several ``jaxalign demo`` runs that differ only in ``--seed``.

One demo run gives each subset's mean change of log π(y+) with a standard error over its pairs. Whether
the highest-LN-CHES subset's fall is real is a question about the *seeds*: each seed draws which prompts
get which kind of pair and the training order, so the seeds are independent repetitions of the whole
experiment. The pooled estimate is the mean of the seeds' subset means; its standard error is the
between-seed one, ``sd(means, ddof=1) / √n`` (it includes the pair-level noise and the seed-to-seed
spread), and whether it differs from zero is a two-sided one-sample t-test over the seeds' means
(``n − 1`` degrees of freedom, so two or three seeds rarely suffice). The seeds are not fully
independent, though: they draw from the same prompts, so a subset's pairs repeat between seeds and the
seeds' means can agree more closely than the pairs' spread suggests. The within-seed standard error
``√(Σ se²) / n`` (pairs as the unit) is therefore computed too, and a pooled change is called
significant only when both agree: ``p < 0.05`` over the seeds *and* ``|mean| > 2 ×`` the within-seed s.e.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from scipy import stats

from jaxalign.errors import JaxAlignError

RUNS = ("high", "low", "filtered", "sft")
FULL_SEEDS = "0-5"  # `jaxalign demo --full`: the six seeds declared before they ran (docs/demo.md, T5)
RUN_TITLES = {"high": "highest LN-CHES", "low": "lowest LN-CHES", "filtered": "filtered pool",
              "sft": "DPO+SFT (highest)"}
_SETTINGS_FREE = ("seed", "out")  # the only settings that may differ between pooled runs


class PoolingError(JaxAlignError):
    """Demo outputs that cannot be pooled (missing, unfinished, or run with different settings)."""


def load_summaries(dirs: list[str | Path]) -> list[dict]:
    """The ``summary.json`` of each demo output folder, checked to be poolable (same settings but the seed)."""
    if len(dirs) < 2:
        raise PoolingError(f"pooling needs at least two demo output folders, got {len(dirs)}")
    summaries = []
    for d in dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise PoolingError(f"{path}: not found (is {d} a finished `jaxalign demo` output folder?)")
        try:
            s = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PoolingError(f"{path}: not valid JSON ({e})") from None
        missing = [k for k in ("settings", "subsets") if k not in s]
        if missing:
            raise PoolingError(f"{path}: no {', '.join(missing)} (not a demo summary)")
        summaries.append(s)
    _check_same_settings(summaries, dirs)
    return summaries


def _check_same_settings(summaries: list[dict], dirs) -> None:
    def strip(s):
        return {k: v for k, v in s["settings"].items() if k not in _SETTINGS_FREE}
    first = strip(summaries[0])
    seeds = set()
    for s, d in zip(summaries, dirs):
        diff = sorted(k for k in set(first) | set(strip(s)) if first.get(k) != strip(s).get(k))
        if diff:
            raise PoolingError(f"{d}: settings differ from {dirs[0]}'s in {', '.join(diff)}; "
                               "only runs that differ in --seed can be pooled")
        seed = s["settings"].get("seed")
        if seed in seeds:
            raise PoolingError(f"{d}: seed {seed} appears twice")
        seeds.add(seed)


def pool_run(summaries: list[dict], run: str) -> dict | None:
    """Pooled change of mean log π(y+) of one run (``high``, ``low``, ``filtered``, ``sft``) over seeds.

    Returns ``None`` when no summary has that run (e.g. ``--no-mitigations``), else a dict with the
    seeds' means, ``mean`` (nats), ``se_between`` (sd of the means / √n), ``se_within`` (√(Σ se²)/n),
    ``p_value`` (two-sided t-test of mean 0 over the seeds' means, ``nan`` if they are all equal),
    ``significant`` (``p_value < 0.05`` and ``|mean| > 2 se_within``),
    ``seeds_fell`` (seeds whose subset mean fell) and ``pairs_fell``/``pairs`` summed over the seeds.
    """
    rows = [s["subsets"][run] for s in summaries if run in s["subsets"]]
    if not rows:
        return None
    if len(rows) != len(summaries):
        raise PoolingError(f"run {run!r} is in {len(rows)} of the {len(summaries)} summaries")
    means = [float(r["d_chosen_mean"]) for r in rows]
    n = len(means)
    mean = sum(means) / n
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
    se = sd / math.sqrt(n)
    p_value = float(2 * stats.t.sf(abs(mean) / se, df=n - 1)) if se > 0 else math.nan
    se_within = math.sqrt(sum(float(r["d_chosen_se"]) ** 2 for r in rows)) / n
    return dict(means=means, mean=mean, se_between=se, p_value=p_value, se_within=se_within,
                significant=bool(p_value < 0.05 and abs(mean) > 2 * se_within),
                seeds_fell=sum(m < 0 for m in means),
                pairs_fell=sum(round(r["chosen_fell_fraction"] * r["pairs"]) for r in rows),
                pairs=sum(int(r["pairs"]) for r in rows))


def pool(summaries: list[dict]) -> dict:
    """Every run's pooled numbers (:func:`pool_run`), keyed by run, plus the seeds in order."""
    return dict(seeds=[s["settings"].get("seed") for s in summaries],
                runs={run: p for run in RUNS if (p := pool_run(summaries, run)) is not None})


def format_pooled(pooled: dict) -> str:
    """A Markdown table: one row per run, each seed's mean, the pooled mean ± between-seed s.e."""
    seeds = pooled["seeds"]
    head = ("| run | " + " | ".join(f"seed {s}" for s in seeds)
            + " | pooled mean ± s.e. (between seeds) | t-test over seeds | within-seed s.e. | significant"
            " | seeds fell | pairs fell |")
    lines = [head, "|" + "---|" * (len(seeds) + 7)]
    for run, p in pooled["runs"].items():
        test = "–" if math.isnan(p["p_value"]) else f"p = {p['p_value']:.3f}"
        lines.append(f"| {RUN_TITLES[run]} | " + " | ".join(f"{m:+.3f}" for m in p["means"])
                     + f" | **{p['mean']:+.3f} ± {p['se_between']:.3f}** | {test}"
                     + f" | {p['se_within']:.3f} | {'**yes**' if p['significant'] else 'no'}"
                     + f" | {p['seeds_fell']} of {len(seeds)}"
                     + f" | {p['pairs_fell']} of {p['pairs']} |")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    """``"0-5"`` → ``[0, 1, 2, 3, 4, 5]``; ``"0,3,7"`` → ``[0, 3, 7]``; ranges and lists mix (``"0-2,9"``)."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise PoolingError(f"--seeds {text!r}: {part.strip()!r} is not a seed or a range like 0-5") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise PoolingError(f"--seeds {text!r}: give two or more different non-negative seeds")
    return seeds


def write_pooled(dirs: list[str | Path], out: str | Path) -> dict:
    """Pool the demo outputs ``dirs`` and write ``OUT/pooled.json`` and ``OUT/pooled.md``; returns the pool."""
    pooled = pool(load_summaries(dirs))
    pooled["outputs"] = [str(d) for d in dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pooled.json").write_text(json.dumps(pooled, indent=1) + "\n")
    (out / "pooled.md").write_text(
        f"# jaxalign demo over {len(dirs)} seeds\n\nChange of mean log π(y+) (nats) after training, per seed "
        "and pooled (mean of the seeds' means ± their standard error). Significant = p < 0.05 in a t-test "
        "over the seeds' means and beyond 2 within-seed standard errors (pairs repeat between seeds).\n\n"
        + format_pooled(pooled) + "\n")
    return pooled
