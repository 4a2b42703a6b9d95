"""D2PO versus online DPO with gold labels only, at the same gold-label budget (Singhal et al., 2024).

Runs ``jaxalign.online.run_online`` twice per seed from one config (``configs/d2po_<setting>.yaml``):

* ``gold_only``: ``discriminator.kind=none`` — each round the policy trains on its gold-labelled pairs;
* ``d2po``: the same gold pairs train a separate reward model too, which silver-labels the rest of the
  round's samples; the policy trains on gold + silver.

Both see the same prompts, samples (round 1), gold budget and policy steps per pair. The paper's claim:
D2PO reaches a given gold reward with fewer gold labels. The script prints and writes
(``OUT/results.md``, ``OUT/results.json``) the gold reward of held-out samples against the number of gold
labels used, per round, mean and spread over seeds, and the labels each method needs to reach the
gold-only run's final reward.

    python scripts/repro_d2po.py --setting tiny --seeds 0 1 2               # tiny random Llama, ~minutes
    python scripts/repro_d2po.py --setting smollm --seeds 0 --rounds 3      # SmolLM2-135M, slower

The tiny setting's model (a random 2-layer Llama with a byte-level tokenizer) is created on first use.
Compiled programs are cached in ``OUT/.jax_cache`` so later runs do not compile again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_tiny_model(path: Path) -> Path:
    """A random 2-layer Llama (hidden 64) with the tiny byte-level tokenizer of the tests."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hf_tiny import make_tiny
    from tiny_tokenizer import make_tiny_tokenizer

    make_tiny("llama", path, vocab_size=272, pad_token_id=3, eos_token_id=2, bos_token_id=4,
              max_position_embeddings=128, seed=0)
    make_tiny_tokenizer(path)
    return path


def run(args) -> dict:
    import jax

    from jaxalign.online import config, d2po

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cfg_path = ROOT / "configs" / f"d2po_{args.setting}.yaml"
    overrides = list(args.set)
    if args.rounds:
        overrides.append(f"online.rounds={args.rounds}")
    if args.setting == "tiny":
        model_dir = out / "tiny_model"
        if not (model_dir / "config.json").exists():
            make_tiny_model(model_dir)
        overrides.append(f"model.path={model_dir}")
    methods = {"gold_only": ["discriminator.kind=none"], "d2po": []}
    histories: dict[str, list] = {m: [] for m in methods}
    t0 = time.time()
    for seed in args.seeds:
        for method, extra in methods.items():
            run_dir = out / f"{method}_seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = config.load(cfg_path, overrides + extra + [f"online.seed={seed}", f"output_dir={run_dir}"])
            print(f"--- {method}, seed {seed}", flush=True)
            summary = d2po.run_online(cfg, progress=True)
            histories[method].append(summary["history"])
            print(f"    ({time.time() - t0:.0f}s)", flush=True)
    result = summarize(histories)
    result.update(setting=args.setting, seeds=args.seeds, overrides=overrides, seconds=time.time() - t0,
                  config=str(cfg_path.relative_to(ROOT)))
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return result


def summarize(histories: dict[str, list]) -> dict:
    """Per round: gold labels used and gold reward (mean, min, max over seeds) of each method."""
    table = {}
    for method, runs in histories.items():
        rounds = min(len(h) for h in runs)
        rows = []
        for r in range(rounds):
            rew = np.array([h[r]["gold/reward"] for h in runs])
            labels = np.array([h[r].get("gold/labels_used", 0) for h in runs])
            row = {"round": r, "gold_labels": float(labels.mean()), "gold_reward_mean": float(rew.mean()),
                   "gold_reward_min": float(rew.min()), "gold_reward_max": float(rew.max())}
            for key in ("discriminator/accuracy", "silver/pairs", "silver/agreement",
                        "displacement/chosen_logps_change", "displacement/rejected_logps_change"):
                vals = [h[r][key] for h in runs if key in h[r]]
                if vals:
                    row[key] = float(np.mean(vals))
            rows.append(row)
        table[method] = rows
    target = table["gold_only"][-1]["gold_reward_mean"]
    reach = {}
    for method, rows in table.items():
        hit = next((row for row in rows if row["gold_reward_mean"] >= target), None)
        reach[method] = None if hit is None else hit["gold_labels"]
    return {"per_round": table, "target_reward": target, "labels_to_reach_target": reach}


def markdown(res: dict) -> str:
    lines = [f"# D2PO vs gold-only online DPO ({res['setting']}, seeds {res['seeds']})", "",
             "| round | gold labels | gold reward: gold-only | gold reward: D2PO | D2PO disc. acc. | "
             "silver pairs | silver agreement |", "|---|---|---|---|---|---|---|"]
    g, d = res["per_round"]["gold_only"], res["per_round"]["d2po"]
    for a, b in zip(g, d):
        def rng(row):
            return (f"{row['gold_reward_mean']:.3f} [{row['gold_reward_min']:.2f}, "
                    f"{row['gold_reward_max']:.2f}]")
        acc = b.get("discriminator/accuracy")
        sil = b.get("silver/pairs")
        agr = b.get("silver/agreement")
        lines.append(f"| {a['round']} | {a['gold_labels']:.0f} | {rng(a)} | {rng(b)} | "
                     f"{'—' if acc is None else f'{acc:.2f}'} | {'—' if sil is None else f'{sil:.1f}'} | "
                     f"{'—' if agr is None else f'{agr:.2f}'} |")
    lines += ["", f"Gold labels to reach the gold-only final reward ({res['target_reward']:.3f}): "
              + ", ".join(f"{k} {'not reached' if v is None else f'{v:.0f}'}"
                          for k, v in res["labels_to_reach_target"].items()),
              f"Wall time {res['seconds']:.0f}s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=("tiny", "smollm"), default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, help="override online.rounds")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more config overrides")
    ap.add_argument("--out", help="output folder (default runs/repro_d2po_<setting>)")
    ap.add_argument("--make-tiny", metavar="DIR", help="only write the tiny model to DIR and exit")
    args = ap.parse_args(argv)
    if args.make_tiny:
        print(make_tiny_model(Path(args.make_tiny)))
        return 0
    args.out = args.out or f"runs/repro_d2po_{args.setting}"
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
