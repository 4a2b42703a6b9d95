"""The demo's numbers and its report, computed only from the files the steps wrote.

:func:`measure` reads ``ches/scores.parquet``, ``entangle/pairs.parquet``, ``data/subsets.json`` and
the two runs' ``ledger.zarr`` and ``metrics.jsonl`` and returns the per-pair table and the summary
numbers; :func:`write_report` draws the figures (:mod:`jaxalign.plots`) and writes ``report.md``,
``report.html`` (:class:`jaxalign.report.Report`) and ``summary.json``.

Realised changes are per trained pair: log π(y±|x) in the ledger's last row minus its first row (step 0,
the initial model). "Δ mean log π(y+)" of a subset is the mean of these over its pairs (= the change of
the mean), with its standard error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign import plots, store
from jaxalign.analysis import stats
from jaxalign.analysis.entanglement import CASES
from jaxalign.demo.pipeline import RUN_DATA, RUNS
from jaxalign.jobs.ches import MEASURES  # the score columns of scores.parquet
from jaxalign.report import Report, save_figure

SUBSETS = ("high", "low")
SUBSET_NAMES = {"high": "highest LN-CHES", "low": "lowest LN-CHES", "filtered": "filtered pool",
                "sft": "DPO+SFT, highest LN-CHES"}
MEASURE_NAMES = {"ches": "CHES", "ln_ches": "LN-CHES", "minus_norm_edit_distance": "−edit distance",
                 "last_hidden_ip": "last hidden ⟨h+, h−⟩", "real_cosine": "REAL cos(e+, e−)"}


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(out: str | Path) -> dict[str, Any]:
    """The demo's numbers from its output folder (module doc).

    Returns a dict with ``pairs`` (per trained pair: ``subset``, ``index``, the CHES measures and baselines,
    ``d_chosen``, ``d_rejected``), ``subsets`` (per subset: counts, means, standard errors, fraction of
    pairs whose y+ fell, final metrics), ``spearman`` (measure → {all, high, low}: ρ with the realised
    Δ log π(y+)), ``entangle`` (per probed pair and the case fractions), and ``trajectories``.
    """
    out = Path(out)
    scores = store.read_table(out / "ches" / "scores.parquet")
    by_index = {int(i): k for k, i in enumerate(_column(scores, "index"))}
    subsets = store.read_json(out / "data" / "subsets.json")
    rows, per_subset, trajectories, metrics = [], {}, {}, {}
    for name in RUNS if "filtered" in subsets else SUBSETS:  # the mitigation runs are optional
        idx = np.asarray(subsets[RUN_DATA[name]], np.int64)
        run_rows, per_subset[name], trajectories[name], metrics[name] = _run_numbers(
            out, name, idx, scores, by_index)
        if name in SUBSETS:
            rows += run_rows
    d_all = np.array([r["d_chosen"] for r in rows])
    which = np.array([r["subset"] for r in rows])
    spearman = {}
    for m in MEASURES:
        x = np.array([r[m] for r in rows])
        spearman[m] = {"all": stats.spearman(x, d_all),
                       **{s: stats.spearman(x[which == s], d_all[which == s]) for s in SUBSETS}}
    return {"pairs": rows, "subsets": per_subset, "spearman": spearman,
            "entangle": _entangle(out, rows), "trajectories": trajectories, "metrics": metrics,
            "scores": {m: _column(scores, m).astype(np.float64) for m in MEASURES},
            "subset_info": subsets}


def _run_numbers(out: Path, name: str, idx: np.ndarray, scores, by_index: dict) -> tuple:
    """One run's per-pair rows, its summary numbers, its ledger trajectories and its metrics log."""
    from jaxalign.train.ledger import read_ledger

    led = read_ledger(out / "train" / name / "ledger.zarr")
    chosen, rejected = led["chosen_logps"].astype(np.float64), led["rejected_logps"].astype(np.float64)
    if chosen.shape[1] != idx.size:
        raise ValueError(f"{out}/train/{name}/ledger.zarr has {chosen.shape[1]} pairs, the subset {idx.size}")
    dc, dr = chosen[-1] - chosen[0], rejected[-1] - rejected[0]
    pos = np.array([by_index[int(i)] for i in idx])
    vals = {m: _column(scores, m).astype(np.float64)[pos] for m in MEASURES}
    rows = [{"subset": name, "index": int(i), **{m: float(vals[m][j]) for m in MEASURES},
             "d_chosen": float(dc[j]), "d_rejected": float(dr[j])} for j, i in enumerate(idx)]
    log = read_metrics(out / "train" / name / "metrics.jsonl")
    final = next((r for r in reversed(log) if "loss" in r), {})
    numbers = {
        "pairs": int(idx.size), "steps": int(led["step"][-1]),
        "ln_ches_mean": float(vals["ln_ches"].mean()), "ches_mean": float(vals["ches"].mean()),
        "ln_ches_min": float(vals["ln_ches"].min()), "ln_ches_max": float(vals["ln_ches"].max()),
        "logp_chosen_start": float(chosen[0].mean()),
        "d_chosen_mean": float(dc.mean()), "d_chosen_se": _se(dc),
        "d_rejected_mean": float(dr.mean()), "d_rejected_se": _se(dr),
        "chosen_fell_fraction": float((dc < 0).mean()),
        "final_loss": final.get("loss"), "final_margin": final.get("rewards/margins"),
        "final_accuracy": final.get("rewards/accuracies")}
    return rows, numbers, {"steps": led["step"], "chosen": chosen, "rejected": rejected}, log


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def _entangle(out: Path, rows: list[dict]) -> dict[str, Any]:
    """Per probed pair: case, cosine, predicted Δ (η = 1) and the realised Δ of its training run."""
    from jaxalign.analysis.entanglement import CASES

    table = store.read_table(out / "entangle" / "pairs.parquet")
    sample = store.read_json(out / "data" / "subsets.json")["entangle"]
    trained = {r["index"]: r for r in rows}
    probed = []
    for k, pos in enumerate(_column(table, "index")):
        i = int(sample[int(pos)])  # entangle.jsonl line -> pairs.jsonl line
        r = trained[i]
        probed.append({"index": i, "subset": r["subset"], "ln_ches": r["ln_ches"],
                       "case": table.column("case")[k].as_py(),
                       **{c: float(_column(table, c)[k]) for c in (
                           "grad_cosine", "grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner",
                           "pred_dlogp_chosen", "pred_dlogp_rejected")},
                       "d_chosen": r["d_chosen"], "d_rejected": r["d_rejected"]})
    fractions = {}
    for group in ("all",) + SUBSETS:
        cases = [p["case"] for p in probed if group == "all" or p["subset"] == group]
        fractions[group] = {c: (cases.count(c) / len(cases) if cases else float("nan")) for c in CASES}
        fractions[group]["pairs"] = len(cases)
    pred = np.array([p["pred_dlogp_chosen"] for p in probed])
    real = np.array([p["d_chosen"] for p in probed])
    pred_l = np.array([p["pred_dlogp_rejected"] for p in probed])
    real_l = np.array([p["d_rejected"] for p in probed])
    summary = store.read_json(out / "entangle" / "summary.json")
    return {"pairs": probed, "case_fractions": fractions, "method": summary.get("methods_used"),
            "spearman_chosen": stats.spearman(pred, real),
            "spearman_rejected": stats.spearman(pred_l, real_l),
            "sign_agreement_chosen": float(np.mean((pred < 0) == (real < 0))) if pred.size else None,
            "sign_agreement_rejected": float(np.mean((pred_l < 0) == (real_l < 0))) if pred.size else None}


def data_source(st: dict) -> str:
    """What the pairs came from: the data set, the prompts the model answered (on-policy pairs), or the
    answer-swap pairs of prompts with a known answer."""
    if st.get("prompts") is not None:
        return f"on-policy pairs for {st['prompts']}"
    if st.get("answers") is not None:
        return f"answer-swap pairs of {st['answers']}"
    return st["data"]


def pair_kinds(out: Path) -> dict[int, str] | None:
    """``data/pairs.jsonl`` line → kind of answer-swap pair (``answers/pairs.jsonl``), or ``None``."""
    made = out / "answers" / "pairs.jsonl"
    if not made.exists():
        return None
    kinds = [json.loads(line)["kind"] for line in made.read_text(encoding="utf-8").splitlines() if line.strip()]
    source = store.read_json(out / "data" / "pairs_index.json")["source_index"]
    return {line: kinds[i] for line, i in enumerate(source)}


def kind_counts(m: dict, kinds: dict[int, str]) -> dict[str, dict[str, int]]:
    """Per run, how many of its trained pairs are of each answer-swap kind."""
    from jaxalign.demo.answer_pairs import KINDS

    out = {}
    for name in m["subsets"]:
        idx = m["subset_info"][RUN_DATA[name]]
        out[name] = {k: sum(kinds[int(i)] == k for i in idx) for k in KINDS}
    return out


def sign_counts(probed: list[dict], subset: str) -> tuple[int, int, int, int]:
    """(probed pairs, predicted Δ log π(y+) < 0, realised Δ log π(y+) < 0, signs equal) of a subset."""
    ps = [p for p in probed if p["subset"] == subset]
    pred = [p["pred_dlogp_chosen"] < 0 for p in ps]
    real = [p["d_chosen"] < 0 for p in ps]
    return len(ps), sum(pred), sum(real), sum(a == b for a, b in zip(pred, real))


# --- the report -----------------------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if isinstance(x, float) else str(x)


def subset_table(m: dict) -> tuple[list[str], list[list]]:
    """The headline table: one row per subset (headers, rows)."""
    headers = ["subset", "pairs", "LN-CHES mean", "CHES mean", "Δ mean log π(y+) (nats)", "± s.e.",
               "Δ mean log π(y−) (nats)", "± s.e.", "y+ fell (fraction)", "final loss", "final margin"]
    rows = []
    for name, s in m["subsets"].items():
        rows.append([SUBSET_NAMES[name], s["pairs"], s["ln_ches_mean"], s["ches_mean"], s["d_chosen_mean"],
                     s["d_chosen_se"], s["d_rejected_mean"], s["d_rejected_se"], s["chosen_fell_fraction"],
                     s["final_loss"], s["final_margin"]])
    return headers, rows


_CTX = tuple("out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name".split(", "))  # what every section reads


def _intro_section(rep, c: dict) -> None:
    """The title paragraph: what the run measures."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.text(
        "DPO trains a model to prefer a chosen response y+ over a rejected y−, yet it often makes y+ *less* "
        "likely: **likelihood displacement** (Razin et al., ICLR 2025). The CHES score of a pair, computed "
        "from the model's hidden states before any training, predicts which pairs do it. The mechanism is "
        "**gradient entanglement** (Yuan et al., ICLR 2025): the gradients of log π(y+) and log π(y−) "
        "overlap, so pushing y− down drags y+ down whenever ⟨g+, g−⟩ > ‖g+‖². This run measures both on a "
        "real instruction-tuned model and real preference pairs, then trains DPO from the same start with the "
        "same hyper-parameters — once on the pairs CHES flags most and once on those it flags least, and, "
        "with the mitigations, on the pool without the flagged pairs and with an SFT term — and checks the "
        "prediction. Every number below comes from this run "
        f"({'--quick, ' if st['quick'] else ''}{run['wall_seconds']:.0f} s of wall time).")



def _result_section(rep, c: dict) -> None:
    """The headline table, the two numbers and the bar chart."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.section("The result")
    headers, rows = subset_table(m)
    rep.table(headers, rows)
    diff = hi["d_chosen_mean"] - lo["d_chosen_mean"]
    rho = m["spearman"]["ches"]["all"]
    rho_ln = m["spearman"]["ln_ches"]["all"]
    rep.text(
        f"After {hi['steps']} DPO steps, the mean log π(y+|x) of the highest-LN-CHES pairs changed by "
        f"**{hi['d_chosen_mean']:+.3f}** nats and that of the lowest-LN-CHES pairs by "
        f"**{lo['d_chosen_mean']:+.3f}** nats (difference {diff:+.3f}). Across all "
        f"{hi['pairs'] + lo['pairs']} trained pairs, Spearman ρ between the pair's score before training and "
        f"its realised Δ log π(y+) is **{_fmt(rho)}** for CHES and **{_fmt(rho_ln)}** for LN-CHES "
        "(negative: higher score, larger fall).")
    fig = plots.subset_bars([SUBSET_NAMES[s] for s in SUBSETS],
                            [m["subsets"][s]["d_chosen_mean"] for s in SUBSETS],
                            [m["subsets"][s]["d_chosen_se"] for s in SUBSETS],
                            ylabel="Δ mean log π(y+|x) (nats)",
                            title=f"Change of log π(y+) after {hi['steps']} DPO steps (± s.e.)")
    rep.figure(save_figure(fig, figs / "subset_bars.png"), "Mean change of log π(y+|x) per training subset, "
               "with standard errors over pairs")



def _significance(mean: float, se: float) -> str:
    """Whether a mean change is told apart from zero: beyond two standard errors (over pairs) or not."""
    return "beyond 2 s.e. of zero" if abs(mean) > 2 * se else "within 2 s.e. of zero: not significant"


def _verdicts(m: dict) -> list[tuple[str, bool, str]]:
    """The demo's claims, each checked on this run's numbers: (claim, holds, the numbers)."""
    sub = m["subsets"]

    def change(name):
        s = sub[name]
        return (f"Δ mean log π(y+) {s['d_chosen_mean']:+.3f} ± {s['d_chosen_se']:.3f} nats "
                f"({_significance(s['d_chosen_mean'], s['d_chosen_se'])}); y+ fell for "
                f"{round(s['chosen_fell_fraction'] * s['pairs'])} of {s['pairs']} pairs")

    out = [("the highest-LN-CHES subset's mean log π(y+) falls", sub["high"]["d_chosen_mean"] < 0, change("high")),
           ("the lowest-LN-CHES subset's mean log π(y+) rises", sub["low"]["d_chosen_mean"] > 0, change("low"))]
    if "filtered" in sub:
        out += [("the filtered pool's mean log π(y+) does not fall", sub["filtered"]["d_chosen_mean"] >= 0,
                 change("filtered")),
                ("DPO+SFT on the highest-LN-CHES subset: mean log π(y+) does not fall",
                 sub["sft"]["d_chosen_mean"] >= 0, change("sft"))]
    probed = [sign_counts(m["entangle"]["pairs"], s) for s in SUBSETS]
    n, agree = sum(p[0] for p in probed), sum(p[3] for p in probed)
    out.append(("the entanglement probe predicts the sign of Δ log π(y+) for most probed pairs", 2 * agree > n,
                f"{agree} of {n} signs agree"))
    return out


def _mitigation_section(rep, c: dict) -> None:
    """The claims checked, and the two mitigations."""
    m, st, hi = c["m"], c["st"], c["hi"]
    rep.section("What this run shows")
    rep.table(["claim", "holds in this run", "measured"],
              [[claim, "yes" if ok else "**no**", numbers] for claim, ok, numbers in _verdicts(m)])
    high = m["subsets"]["high"]
    if abs(high["d_chosen_mean"]) <= 2 * high["d_chosen_se"]:
        rep.text("One run cannot tell the highest-LN-CHES subset's change from zero here. `jaxalign demo "
                 "--seeds 0-5` (with these options; `--full` for the defaults) repeats the demo with six "
                 "seeds and pools them into `pooled.md`: a t-test over the seeds and the pairs' standard error "
                 "(docs/demo.md).")
    if "filtered" not in m["subsets"]:
        return
    fi, sf = m["subsets"]["filtered"], m["subsets"]["sft"]
    rep.text(
        f"Mitigations, with the same optimiser, steps and batch: **the filter** (Razin et al. §6; `jaxalign "
        f"filter --drop-top`) trains on the {fi['pairs']} pairs of the pool left after removing its "
        f"{hi['pairs']} highest-LN-CHES pairs: mean log π(y+) changed by **{fi['d_chosen_mean']:+.3f}** nats "
        f"(y+ fell for {100 * fi['chosen_fell_fraction']:.0f}% of its pairs). **DPO+SFT** (`loss.sft_coeff` "
        f"{st['sft_coeff']:g}: the summed −log π(y+) added to the loss) on the highest-LN-CHES pairs: "
        f"**{sf['d_chosen_mean']:+.3f}** nats (y+ fell for {100 * sf['chosen_fell_fraction']:.0f}%), against "
        f"{hi['d_chosen_mean']:+.3f} without the SFT term.")


def _setup_section(rep, c: dict) -> None:
    """Model, data, subsets and training settings."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.section("Setup")
    sampled = out / "sample" / "pairs.summary.json"
    if st.get("prompts") is not None and sampled.exists():
        smp = store.read_json(sampled)
        rep.text(
            f"**How the pairs were made** (`jaxalign sample`): {smp['prompts']} prompts of `{st['prompts']}`, "
            f"rendered with the chat template; {smp['samples_per_prompt']} responses per prompt sampled from "
            f"the model itself (temperature {smp['temperature']:g}, top-p {smp['top_p']:g}, at most "
            f"{smp['max_new_tokens']} new tokens, seed {smp['seed']}; {100 * smp['finished_fraction']:.0f}% of "
            f"the responses ended before the limit); the `{smp['judge']}` judge orders each pair (mean score "
            f"{smp['mean_score']:.3g}), ties in random order: {smp['pairs']} pairs, {smp['ties_kept']} of them "
            f"ties, {smp['single_response']} prompts with one distinct response left out. Nothing was written "
            "by hand: these are on-policy pairs, as in Razin et al. §6.")
    _answers_text(rep, out, m, st)
    rep.text(
        f"* Model: `{run['model_path']}`.\n"
        f"* Data: `{data_source(st)}` — {data_info['read']} records read, {data_info['valid']} valid, "
        f"{data_info['used']} used{' (rendered with the chat template)' if data_info['chat'] else ''}; "
        f"{ches_summary['counts']['scored']} scored.\n"
        f"* Training subsets: from {m['subset_info']['pool_rule']}, the {hi['pairs']} highest-LN-CHES "
        f"(LN-CHES {hi['ln_ches_min']:.4g} … {hi['ln_ches_max']:.4g}) and the {lo['pairs']} lowest "
        f"({lo['ln_ches_min']:.4g} … {lo['ln_ches_max']:.4g}).\n"
        f"* Every run: DPO (`sigmoid`, β = {st['beta']}), {_optimizer_text(st)}, batch {st['batch_size']}, "
        f"{st['steps']} steps, seed {st['seed']}, float32, reference = the initial model; log-probs of every "
        f"trained pair recorded every {st['ledger_every']} steps (`train/*/ledger.zarr`).\n"
        f"* Entanglement: {ent['case_fractions']['all']['pairs']} of the trained pairs (half per subset, "
        f"evenly spaced in LN-CHES), all parameters, method "
        + ", ".join(f"{v} ({k.replace('x', ' + ')} padded tokens)" for k, v in (ent["method"] or {}).items()) + ".")



def _optimizer_text(st: dict) -> str:
    """``adamw lr 5e-06, 10% linear warm-up then linear decay, clipping at 1`` (settings of older runs lack
    the schedule fields)."""
    text = f"{st['optimizer']} lr {st['lr']:g}"
    if st.get("warmup_ratio"):
        text += f", {100 * st['warmup_ratio']:.0f}% linear warm-up"
    if st.get("schedule", "constant") != "constant":
        text += f", then {st['schedule']} decay"
    if st.get("max_grad_norm") is not None:
        text += f", gradient clipping at global norm {st['max_grad_norm']:g}"
    return text


def _answers_text(rep, out: Path, m: dict, st: dict) -> None:
    """How answer-swap pairs were made, and how many of each kind each run trained on."""
    made = out / "answers" / "pairs.summary.json"
    if st.get("prompts") is not None or st.get("answers") is None or not made.exists():
        return
    a = store.read_json(made)
    rep.text(
        f"**How the pairs were made** (`jaxalign.demo.answer_pairs`, in the style of Yuan et al. §4.3): the "
        f"first {a['pairs']} prompts of `{a['data']}` (a question with a known right and wrong one-word "
        f"answer){', rendered with the chat template' if a['chat'] else ''}. Each response opens with "
        f"`{a['opening']}` with the right (y+) or the wrong (y−) answer; the model then continues by greedy "
        f"decoding, cut at the end of its first sentence (at most {a['max_new_tokens']} tokens; "
        f"{100 * a['ended_fraction']:.0f}% ended with a sentence; {a['continuation_tokens_mean']:.1f} tokens "
        "on average). y+ = the right answer and the model's own continuation after it. A seeded draw (seed "
        f"{a['seed']}) makes {a['kinds']['shared_suffix']} pairs **shared-suffix** (y− = the wrong answer "
        "followed by the *same* continuation: the responses differ in one word) and "
        f"{a['kinds']['own_continuation']} **own-continuation** (y− = the wrong answer followed by the "
        "model's own continuation after it). Nothing is written by hand but the question and the opening; "
        "every pair's provenance is in `answers/pairs.jsonl`.")
    kinds = pair_kinds(out)
    counts = kind_counts(m, kinds)
    rep.table(["run", "pairs", "shared-suffix", "own-continuation"],
              [[SUBSET_NAMES[n], m["subsets"][n]["pairs"], c["shared_suffix"], c["own_continuation"]]
               for n, c in counts.items()])


def _ches_section(rep, c: dict) -> None:
    """1. CHES of every pair before training."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.section("1. CHES before training")
    rep.text(
        "CHES = ⟨S(y+), S(y−)⟩ − ‖S(y+)‖² with S(y) the sum of the last hidden states over the response; "
        "LN-CHES normalises by the lengths (docs/ches.md; with equal response lengths everywhere the two "
        "rank the pairs alike, and a constant baseline has no rank correlation, shown as –). Rank "
        f"correlations between the {len(MEASURES)} measures over the {ches_summary['counts']['scored']} scored pairs:")
    sp = ches_summary["spearman"]
    rep.table(["Spearman ρ"] + [MEASURE_NAMES[b] for b in MEASURES],
              [[MEASURE_NAMES[a]] + [sp[a][b] for b in MEASURES] for a in MEASURES], digits=3)
    rep.figure(out / "ches" / "ches_hist.png", "CHES and LN-CHES of every scored pair")



def _prediction_section(rep, c: dict) -> None:
    """2. Scores against the realised change of log π(y+)."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.section("2. Does the score predict the fall of log π(y+)?")
    rep.text("Spearman ρ between each score before training and the realised Δ log π(y+|x) of the pair in "
             "its run (all trained pairs, and within each subset):")
    rep.table(["score", "all pairs", SUBSET_NAMES["high"], SUBSET_NAMES["low"]],
              [[MEASURE_NAMES[s], m["spearman"][s]["all"], m["spearman"][s]["high"], m["spearman"][s]["low"]]
               for s in MEASURES], digits=3)
    score = np.array([r["ches"] for r in m["pairs"]])
    change = np.array([r["d_chosen"] for r in m["pairs"]])
    rep.figure(save_figure(plots.score_vs_change(score, change, rho=stats.spearman(score, change),
                                                 score_name="CHES before training"),
                           figs / "ches_vs_change.png"), "CHES against the realised Δ log π(y+|x), all trained pairs")
    ln = np.array([r["ln_ches"] for r in m["pairs"]])
    rep.figure(save_figure(plots.score_vs_change(ln, change, rho=stats.spearman(ln, change),
                                                 score_name="LN-CHES before training"),
                           figs / "ln_ches_vs_change.png"), "LN-CHES against the realised Δ log π(y+|x)")
    for name in SUBSETS:
        t = m["trajectories"][name]
        fig = plots.logp_trajectories(t["steps"], t["chosen"], t["rejected"],
                                      title=f"{SUBSET_NAMES[name]} pairs")
        rep.figure(save_figure(fig, figs / f"logps_{name}.png"),
                   f"log π(y+|x) and log π(y−|x) of every {SUBSET_NAMES[name]} pair during its run")



def _entanglement_section(rep, c: dict) -> None:
    """3. The entanglement cases of the probed pairs."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.section("3. Gradient entanglement under DPO")
    cf = ent["case_fractions"]
    rep.text(
        "Per pair, one SGD step on that pair alone changes log π(y+) by ≈ η·w(‖g+‖² − ⟨g+, g−⟩) and "
        "log π(y−) by ≈ η·w(⟨g+, g−⟩ − ‖g−‖²) (w = β/2 at the start of DPO). The case is the sign pattern: "
        "`ideal` (y+ up, y− down), `both_down`, `both_up`. Fractions of the probed pairs:")
    rep.table(["pairs probed"] + list(CASES) + ["pairs"],
              [[g if g == "all" else SUBSET_NAMES[g]] + [cf[g][c] for c in CASES] + [cf[g]["pairs"]]
               for g in ("all",) + SUBSETS], digits=3)
    cos = {SUBSET_NAMES[s]: [p["grad_cosine"] for p in ent["pairs"] if p["subset"] == s] for s in SUBSETS}
    rep.figure(save_figure(plots.cosine_histogram(cos), figs / "cosines.png"),
               "cos(g+, g−) of the probed pairs, per subset")



def _predicted_section(rep, c: dict) -> None:
    """4. First-order predictions against realised changes."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.section("4. Predicted against realised changes")
    rep.text(
        "The prediction is first order, for one SGD step (η = 1) on one pair; the runs take "
        f"{st['steps']} {st['optimizer']} steps on batches of {st['batch_size']}, so compare signs and ranks, "
        f"not sizes. Spearman ρ (predicted, realised): log π(y+) **{_fmt(ent['spearman_chosen'])}**, "
        f"log π(y−) **{_fmt(ent['spearman_rejected'])}**; sign agreement: log π(y+) "
        f"{_fmt(ent['sign_agreement_chosen'], 2)}, log π(y−) {_fmt(ent['sign_agreement_rejected'], 2)}.")
    rep.table(["pair", "subset", "LN-CHES", "cos(g+, g−)", "case", "predicted Δ log π(y+) (η=1)",
               "realised Δ log π(y+)", "predicted Δ log π(y−) (η=1)", "realised Δ log π(y−)"],
              [[p["index"], SUBSET_NAMES[p["subset"]], p["ln_ches"], p["grad_cosine"], p["case"],
                p["pred_dlogp_chosen"], p["d_chosen"], p["pred_dlogp_rejected"], p["d_rejected"]]
               for p in sorted(ent["pairs"], key=lambda p: -p["ln_ches"])])
    rep.text("The probe's predicted sign of Δ log π(y+) against the realised sign, per subset:")
    rep.table(["subset", "pairs probed", "predicted to fall", "fell", "sign agrees"],
              [[SUBSET_NAMES[s]] + list(sign_counts(ent["pairs"], s)) for s in SUBSETS])
    pred = np.array([p["pred_dlogp_chosen"] for p in ent["pairs"]])
    real = np.array([p["d_chosen"] for p in ent["pairs"]])
    rep.figure(save_figure(plots.score_vs_change(pred, real, rho=stats.spearman(pred, real),
                                                 score_name="predicted Δ log π(y+|x) (η = 1, nats)"),
                           figs / "predicted_vs_realised.png"),
               "First-order predicted change of log π(y+|x) against the realised change, probed pairs")



def _timings_section(rep, c: dict) -> None:
    """Training curves, timings and the machine."""
    out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name = (c[k] for k in _CTX)
    rep.section("Training curves")
    for name in SUBSETS:
        rep.figure(save_figure(plots.training_curves(m["metrics"][name], title=f"{SUBSET_NAMES[name]} run"),
                               figs / f"training_{name}.png"), f"Training metrics of the {SUBSET_NAMES[name]} run")

    rep.section("Timings and machine")
    labels = {"data": "preparing the pairs", "ches": "1. CHES of every pair", "select": "choosing the subsets",
              "entangle": "2. entanglement probe", "train_high": "3. DPO run, highest LN-CHES",
              "train_low": "3. DPO run, lowest LN-CHES", "sample": "sampling on-policy pairs",
              "answers": "making the answer-swap pairs",
              "train_filtered": "3. DPO run, filtered pool", "train_sft": "3. DPO+SFT run, highest LN-CHES"}
    rep.table(["step", "wall seconds", "this invocation"],
              [[labels.get(k, k), v.get("seconds"), "reused" if k in run["reused"] else "ran"]
               for k, v in run["steps"].items()], digits=3)
    mach = run["machine"]
    lb, la = run["load_before"], run["load_after"]
    rep.text(
        f"Total wall time of this invocation (model loading and compilation included, report excluded): "
        f"**{run['wall_seconds']:.0f} s**. Machine: {mach['cpu']}, {mach['cpu_count']} CPU cores, "
        f"{mach['platform']}, Python {mach['python']}; JAX backend `{mach['backend']}` "
        f"({', '.join(mach['devices'])}); load average {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f} before and "
        f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} after. Versions: "
        + ", ".join(f"{k} {v}" for k, v in mach["versions"].items() if v) + ".")
    rep.text("Files: `ches/scores.parquet` (every pair's scores), `entangle/pairs.parquet` (probed pairs), "
             "`train/high`, `train/low` (metrics.jsonl, ledger.zarr), `data/` (the pairs and subsets), "
             "`summary.json` (the numbers of this report).")

_SECTIONS = (_intro_section, _result_section, _mitigation_section, _setup_section, _ches_section, _prediction_section,
             _entanglement_section, _predicted_section, _timings_section)


def write_report(out: str | Path, run: dict) -> dict:
    """Measures (:func:`measure`), draws the figures and writes ``report.md``, ``report.html`` and
    ``summary.json`` into ``out``; ``run`` holds the settings, step log, machine and timings."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    m = measure(out)
    st = run["settings"]
    data_info = store.read_json(out / "data" / "pairs_index.json")
    ches_summary = store.read_json(out / "ches" / "summary.json")
    ent = m["entangle"]
    hi, lo = m["subsets"]["high"], m["subsets"]["low"]
    model_name = Path(run["model_path"]).name

    c = dict(zip(_CTX, (out, figs, m, st, run, data_info, ches_summary, ent, hi, lo, model_name)))
    rep = Report(f"Likelihood displacement and gradient entanglement: {model_name} on {data_source(st)}")
    for write_section in _SECTIONS:
        write_section(rep, c)
    md, html = rep.write(out)
    summary = {"report_md": str(md), "report_html": str(html), "subsets": m["subsets"],
               "spearman": m["spearman"], "case_fractions": ent["case_fractions"],
               "predicted_vs_realised": {k: ent[k] for k in ("spearman_chosen", "spearman_rejected",
                                                             "sign_agreement_chosen", "sign_agreement_rejected")},
               "verdicts": [{"claim": claim, "holds": bool(ok), "measured": numbers}
                            for claim, ok, numbers in _verdicts(m)],
               "sign_counts": {s: dict(zip(("probed", "predicted_fall", "fell", "agree"), sign_counts(ent["pairs"], s)))
                               for s in SUBSETS},
               "pairs": m["pairs"], "entangle_pairs": ent["pairs"], "steps": run["steps"],
               "reused": run["reused"], "wall_seconds": run["wall_seconds"], "machine": run["machine"],
               "load_before": run["load_before"], "load_after": run["load_after"], "settings": st}
    store.write_json(out / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """The lines ``jaxalign demo`` prints at the end."""
    lines = []
    for name, s in summary["subsets"].items():
        lines.append(f"  {SUBSET_NAMES[name]:<25} {s['pairs']:>3} pairs: Δ mean log π(y+) {s['d_chosen_mean']:+.3f} "
                     f"± {s['d_chosen_se']:.3f}, Δ mean log π(y−) {s['d_rejected_mean']:+.3f}, "
                     f"y+ fell for {100 * s['chosen_fell_fraction']:.0f}%")
    rho = summary["spearman"]
    lines.append(f"  Spearman ρ(score, Δ log π(y+)): CHES {_fmt(rho['ches']['all'])}, "
                 f"LN-CHES {_fmt(rho['ln_ches']['all'])}")
    cf = summary["case_fractions"]["all"]
    lines.append("  entanglement cases: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in cf.items()
                                                     if k != "pairs"))
    lines.append(f"  wall time {summary['wall_seconds']:.0f} s; report: {summary['report_html']} "
                 f"(and {Path(summary['report_md']).name} with figures/ beside it)")
    return "\n".join(lines)
