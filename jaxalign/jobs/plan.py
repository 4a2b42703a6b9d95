"""``jaxalign plan``: compile a job ahead of time for a model size and a device set, and predict its cost.

No weights are read. The model is built with shapes only (:func:`jaxalign.models.params.abstract_model`),
its parameters, optimizer state and batch are ``jax.ShapeDtypeStruct``s placed by the project's sharding
rules (:mod:`jaxalign.parallel`), and the job's own jitted function is lowered and compiled:

* ``train`` — :func:`jaxalign.train.step.jit_train_step` (the function the trainer runs) with the run
  config's loss, optimizer, dtypes, remat, grad_accum, mesh and reference mode;
* ``ches`` — :func:`jaxalign.analysis.ches.pair_scores`, placed as :func:`jaxalign.analysis.ches.make_scorer`
  places it;
* ``entangle`` — the jitted per-pair gradient function of :func:`jaxalign.analysis.entanglement.make_pair_grads`
  (``--method gram|exact|jvp``; parameters replicated, or with ``--shard-params`` sharded as training shards
  them and gathered at each use; pairs over ``data × fsdp``, as the probe places them);
* ``probe`` — :func:`jaxalign.train.step.probe_step` (log-probs and CHES of the probe set);
* ``generate`` — :func:`jaxalign.models.generate._generate` (prefill, then a ``while`` loop of decode steps).

Targets: a TPU topology through libtpu (``v5p:2x2x1``, ``num_slices``), ``N`` simulated CPU devices, or the
devices of the current backend.

What the plan reports, per chip, and how (every number is an **estimate**):

* memory — XLA's ``memory_analysis()``: arguments (split into params, optimizer state, batch and other by
  the shard sizes of the placed inputs), temporaries, outputs not aliased to a donated input, code; their
  sum against the chip's HBM (:mod:`jaxalign.jobs.chips`);
* FLOPs — XLA's ``cost_analysis()`` beside the analytic count (:func:`analytic_flops`). XLA counts the body
  of a ``while`` loop once (a grad_accum scan, the decode loop), so the compiler number is low there;
* collectives — parsed from the optimized HLO (:func:`collectives`): count and bytes of all-gather,
  reduce-scatter, all-reduce, all-to-all and collective-permute, loop bodies multiplied by their known
  trip counts;
* roofline — step time = max(compute, HBM traffic, collective traffic) with perfect overlap assumed:
  compute = max(compiler, analytic) FLOPs / peak bf16 rate; HBM = bytes accessed / HBM bandwidth;
  collectives = ring traffic ((n − 1)/n of the buffer, twice for all-reduce) / ICI bandwidth. Then
  pairs/s, tokens/s (prompt once + both responses) and MFU = analytic FLOPs / (time · chips · peak).

Letters: B pairs, P prompt length, R response length, L layers, D width, N query heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign import parallel
from jaxalign.errors import ConfigError, ModelError
from jaxalign.jobs import chips as chips_lib

JOBS = ("train", "ches", "entangle", "probe", "generate")
ENTANGLE_METHODS = ("gram", "exact", "jvp")
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
SEARCH_REMAT = (None, "dots_with_no_batch_dims_saveable", "full")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The padded shapes of one step: ``pairs`` B, ``prompt_len`` P, ``response_len`` R (generate: the
    number of new tokens)."""

    pairs: int = 8
    prompt_len: int = 512
    response_len: int = 512


@dataclasses.dataclass
class Target:
    """Where the program is compiled for: devices, the chip (``None``: no roofline) and a label."""

    devices: list
    chip: chips_lib.Chip | None
    label: str
    memory_budget: float | None = None  # bytes per device that must hold the program (default: the chip's HBM)

    @property
    def hbm_bytes(self) -> float | None:
        return self.memory_budget or (self.chip.hbm_bytes if self.chip else None)


# --- model and target -----------------------------------------------------------------------------

def presets() -> list[str]:
    """Names of the shipped model presets (``configs/models/*.json``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def model_config(source: str) -> tuple[dict, str]:
    """``(HF config dict, name)`` of a preset name, an HF folder, a ``config.json`` or a ``.gguf`` file.

    Only the configuration (GGUF: the header's metadata) is read, never weights.
    """
    p = Path(source)
    if p.is_dir():
        from jaxalign.models.hf_folder import read_config

        return read_config(p), p.name
    if p.is_file() and p.suffix.lower() == ".gguf":
        from jaxalign.models.gguf_file import GGUFFile, hf_config

        return hf_config(GGUFFile(p)), p.stem
    if p.is_file():
        try:
            return json.loads(p.read_text()), p.parent.name if p.name == "config.json" else p.stem
        except json.JSONDecodeError as err:
            raise ModelError(f"{p}: not valid JSON ({err})") from None
    preset = PRESETS_DIR / f"{source}.json"
    if preset.is_file():
        return json.loads(preset.read_text()), source
    raise ModelError(f"{source}: not a model folder, config.json, .gguf file or preset "
                     f"(presets: {', '.join(presets())})")


def target(*, topology: str | None = None, slices: int = 1, cpu_devices: int | None = None,
           chip: str | None = None, hbm_gb: float | None = None) -> Target:
    """The devices to compile for: a libtpu topology, ``cpu_devices`` simulated CPUs, or the backend's.

    ``hbm_gb``: the memory per device the program must fit in (GB, 10⁹ bytes), instead of the chip's HBM
    (a CPU has none: without it a CPU plan has no budget)."""
    tgt = _target(topology=topology, slices=slices, cpu_devices=cpu_devices, chip=chip)
    if hbm_gb is not None:
        if hbm_gb <= 0:
            raise ConfigError(f"--hbm-gb must be positive, got {hbm_gb}")
        tgt.memory_budget = hbm_gb * 1e9
    return tgt


def _target(*, topology: str | None, slices: int, cpu_devices: int | None, chip: str | None) -> Target:
    if topology and cpu_devices:
        raise ConfigError("--topology and --cpu-devices: give one target, not both")
    if topology:
        try:
            from jax.experimental import topologies

            desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=slices)
        except Exception as err:  # libtpu missing or a bad name: both are the user's to fix
            hint = ("; another process holds libtpu: set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to share it"
                    if "lockfile" in str(err) else "")
            raise ConfigError(f"--topology {topology}: cannot get the TPU topology through libtpu "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); install "
                              f"jaxalign[tpu] and use names like v5p:2x2x1, v5e:4x4{hint}") from None
        label = topology + (f" x{slices} slices" if slices > 1 else "")
        return Target(list(desc.devices), chips_lib.get(chip) if chip else chips_lib.from_topology(topology),
                      label)
    if cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", int(cpu_devices))
        except RuntimeError:  # the CPU backend is up already; its device count is fixed
            pass
        devices = jax.devices("cpu")
        if len(devices) < cpu_devices:
            raise ConfigError(f"--cpu-devices {cpu_devices}: the CPU backend already started with "
                              f"{len(devices)} devices (set XLA_FLAGS=--xla_force_host_platform_device_count)")
        return Target(devices[:cpu_devices], chips_lib.get(chip) if chip else None,
                      f"cpu x{cpu_devices}")
    devices = jax.devices()
    kind = devices[0].device_kind
    spec = chips_lib.get(chip) if chip else chips_lib.from_device_kind(kind)
    return Target(devices, spec, f"{kind} x{len(devices)}")


def make_mesh(shape: Sequence[int], devices: Sequence[Any]):
    """``parallel.make_mesh`` with a ConfigError naming the mesh keys."""
    try:
        return parallel.make_mesh(list(shape), list(devices))
    except ValueError as err:
        raise ConfigError(f"mesh.data/mesh.fsdp/mesh.tensor: {err}") from None


def run_config(raw: Mapping | None = None, overrides: Sequence[str] = ()):
    """The train run config of ``raw`` (a YAML dict) and ``key=value`` overrides, with defaults for the
    parts a plan does not need (``model.path``, ``data.train``)."""
    from jaxalign.train import config as tcfg

    data = tcfg.apply_overrides(dict(raw or {}), list(overrides))
    data.setdefault("model", {}).setdefault("path", "plan")
    data.setdefault("data", {}).setdefault("train", "plan")
    return tcfg.from_dict(data)


def abstract_model(hf: dict, run) -> Any:
    """The model of ``hf`` with shape-only parameters, configured as the trainer configures it."""
    from jaxalign.models import base, params, registry

    cfg = registry.config_from_hf(hf)
    model = params.abstract_model(hf["model_type"], cfg, dtype=jnp.dtype(run.model.param_dtype))
    if run.lora.enabled:  # fresh adapters (float32, as lora.apply makes them), shapes only
        from flax import nnx

        from jaxalign.models import lora

        settings = lora.LoRASettings(target=run.lora.target, r=run.lora.r, alpha=run.lora.alpha,
                                     rslora=run.lora.rslora)
        graphdef, state = nnx.split(model)
        model = nnx.eval_shape(lambda: lora.apply(nnx.merge(graphdef, jax.tree.map(
            lambda x: jnp.zeros(x.shape, x.dtype), state)), settings, seed=run.lora.seed))
    return base.configure(model, dtype=None if run.model.dtype is None else jnp.dtype(run.model.dtype),
                          attention_impl=run.model.attention_impl, remat=run.model.remat,
                          scan_layers=run.model.scan_layers)


# --- placed abstract inputs -------------------------------------------------------------------------

def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _pure_shardings(state, mesh) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(parallel.state_shardings(state, mesh))


def batch_structs(shapes: Shapes, mesh, *, with_ref: bool) -> tuple[dict, dict]:
    """``(structs, shardings)`` of a shared-prompt batch ``[B, P]``/``[B, R]`` (int32) and ``[B]`` refs."""
    from jaxalign.train import step as step_lib

    B, P, R = shapes.pairs, shapes.prompt_len, shapes.response_len
    dims = {"prompt_ids": (B, P), "prompt_mask": (B, P), "chosen_ids": (B, R), "chosen_mask": (B, R),
            "rejected_ids": (B, R), "rejected_mask": (B, R)}
    structs = {k: jax.ShapeDtypeStruct(dims[k], jnp.int32) for k in step_lib.BATCH_KEYS}
    if with_ref:
        structs.update({k: jax.ShapeDtypeStruct((B,), jnp.float32) for k in step_lib.REF_KEYS})
    return structs, {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in structs.items()}


def per_chip_bytes(structs, shardings) -> int:
    """Bytes one device holds of ``structs`` placed by ``shardings`` (a tree prefix of ``structs``)."""
    def one(sharding, sub):
        return sum(math.prod(sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(sub))
    return int(sum(jax.tree.leaves(jax.tree.map(one, shardings, structs,
                                                is_leaf=lambda s: isinstance(s, NamedSharding)))))


@dataclasses.dataclass
class Program:
    """A lowered job: ``lowered`` plus the per-chip bytes of its argument groups."""

    lowered: Any
    groups: dict[str, int]
    info: dict = dataclasses.field(default_factory=dict)


def _train_program(model, run, shapes: Shapes, mesh) -> Program:
    from jaxalign.train import optim
    from jaxalign.train import step as step_lib

    spec = step_lib.Objective.from_config(run.loss, shared_prompt=run.data.shared_prompt,
                                                  fused_pairs=run.data.fused_pairs, grad_accum=run.train.grad_accum)
    from flax import nnx

    from jaxalign.models import lora

    # As the trainer splits it: with LoRA only the adapters train (the base weights are in parts.rest).
    parts, params = step_lib.ModelParts.split(model, lora.LoRAParam if run.lora.enabled else nnx.Param)
    total = run.train.steps or 1000  # the schedule's length does not change the program
    optimizer, schedule = optim.make_optimizer(run.optim, total), optim.make_schedule(run.optim, total)
    param_sh = _pure_shardings(parts.abstract, mesh)
    opt_struct = jax.eval_shape(optimizer.init, params)
    opt_sh = step_lib.opt_state_shardings(optimizer, params, param_sh, mesh)
    rep = _replicated(mesh)
    state = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_struct,
                                rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    state_sh = step_lib.TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)
    online = spec.needs_reference and run.loss.reference == "online"
    batch, batch_sh = batch_structs(shapes, mesh, with_ref=spec.needs_reference and not online)
    rest_sh = parallel.state_shardings(parts.rest, mesh)
    # train_step jitted with the shardings and donation of step_lib.jit_train_step (whose wrapper is
    # being reworked; it is the same function, placed the same way).
    fn = jax.jit(functools.partial(step_lib.train_step, parts=parts, spec=spec, optimizer=optimizer,
                                   schedule=schedule),
                 in_shardings=(state_sh, batch_sh, rest_sh, param_sh if online else None),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))
    # As step_lib.jit_train_step calls it: the model's constraints see the mesh (unless switched off).
    with jax.set_mesh(mesh), parallel.activation_constraints(run.mesh.constrain_activations):
        lowered = fn.lower(state, batch, parts.rest, params if online else None)
    groups = {"params": per_chip_bytes(params, param_sh), "optimizer": per_chip_bytes(opt_struct, opt_sh),
              "batch": per_chip_bytes(batch, batch_sh),
              "other": per_chip_bytes((state.step, state.rng, parts.rest), (rep, rep, rest_sh))}
    if run.lora.enabled:  # the frozen base weights: in parts.rest, reported on their own line
        groups["frozen_base"] = per_chip_bytes(parts.rest, rest_sh)
        groups["other"] -= groups["frozen_base"]
    if online:
        groups["reference"] = groups["params"]
    return Program(lowered, groups)


def _ches_scores(graphdef, state, batch):
    from flax import nnx

    from jaxalign.analysis import ches

    return ches.pair_scores(nnx.merge(graphdef, state), *(batch[k] for k in ches.BATCH_FIELDS))


def _ches_program(model, shapes: Shapes, mesh) -> Program:
    """:func:`jaxalign.analysis.ches.pair_scores` (what the CHES scorer jits), parameters placed by their
    logical axes and pairs over ``data × fsdp``, as :func:`jaxalign.analysis.ches.make_scorer` places them."""
    from flax import nnx

    from jaxalign.analysis import ches

    graphdef, state = nnx.split(model)
    state_sh = parallel.state_shardings(state, mesh)
    batch, batch_sh = batch_structs(shapes, mesh, with_ref=False)
    batch_sh = {k: batch_sh[k] for k in ches.BATCH_FIELDS}
    batch = {k: batch[k] for k in ches.BATCH_FIELDS}
    jitted = jax.jit(_ches_scores, static_argnums=(0,), in_shardings=(state_sh, batch_sh),
                     out_shardings=_replicated(mesh))
    with jax.set_mesh(mesh):
        lowered = jitted.lower(graphdef, state, batch)
    return Program(lowered, {"params": per_chip_bytes(state, state_sh), "batch": per_chip_bytes(batch, batch_sh)})


def _probe_program(model, shapes: Shapes, mesh) -> Program:
    from jaxalign.train import step as step_lib

    parts, params = step_lib.ModelParts.split(model)
    param_sh = _pure_shardings(parts.abstract, mesh)
    batch, batch_sh = batch_structs(shapes, mesh, with_ref=False)
    rest_sh = parallel.state_shardings(parts.rest, mesh)
    jitted = jax.jit(lambda p, b, r: step_lib.probe_step(p, b, r, parts=parts), in_shardings=(
        param_sh, batch_sh, rest_sh), out_shardings=_replicated(mesh))
    with jax.set_mesh(mesh):
        lowered = jitted.lower(params, batch, parts.rest)
    return Program(lowered, {"params": per_chip_bytes(params, param_sh), "batch": per_chip_bytes(batch, batch_sh)})


def place(structs, shardings):
    """``structs`` with each leaf a ``ShapeDtypeStruct`` carrying its sharding (``shardings``: a prefix
    tree, e.g. one sharding per ``nnx.Variable``, or a single sharding for the whole tree)."""
    def one(sharding, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), sub)
    return jax.tree.map(one, shardings, structs, is_leaf=lambda s: isinstance(s, NamedSharding))


def _entangle_program(model, shapes: Shapes, mesh, method: str, budget: float, shard_params: bool) -> Program:
    from jaxalign.analysis import entanglement

    probe = entanglement.make_pair_grads(model, method=method, budget=int(budget), shard_params=shard_params)
    choice = probe.choice(shapes.prompt_len, shapes.response_len)
    rows = int(mesh.shape["data"] * mesh.shape["fsdp"])
    chunk = -(-choice.chunk // rows) * rows  # as make_pair_grads rounds it on a mesh
    sm = probe.split
    diff, fixed = sm.split_leaves(list(sm.leaves))
    rep = _replicated(mesh)
    diff_sh = sm.diff_shardings(mesh) if shard_params else rep
    batch, batch_sh = batch_structs(shapes, mesh, with_ref=False)
    batch = {k: batch[k] for k in entanglement.BATCH_FIELDS}
    batch_sh = {k: batch_sh[k] for k in entanglement.BATCH_FIELDS}
    with jax.set_mesh(mesh):
        lowered = probe.jitted.lower(place(diff, diff_sh), place(fixed, rep), place(sm.rest, rep),
                                     place(batch, batch_sh), method_=choice.method, chunk=chunk)
    return Program(lowered, {"params": per_chip_bytes(diff, diff_sh) + per_chip_bytes(fixed, rep),
                             "batch": per_chip_bytes(batch, batch_sh)},
                   {"method": choice.method, "chunk": min(chunk, shapes.pairs), "shard_params": shard_params})


def _generate_program(model, shapes: Shapes, mesh) -> Program:
    from flax import nnx

    from jaxalign.models.generate import _generate

    graphdef, state = nnx.split(model)
    state_sh = parallel.state_shardings(state, mesh)
    rows, rep = parallel.batch_sharding(mesh, 2), _replicated(mesh)
    ids = jax.ShapeDtypeStruct((shapes.pairs, shapes.prompt_len), jnp.int32)
    scalars = (jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
               jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.float32),
               jax.ShapeDtypeStruct((), jnp.float32))
    with jax.set_mesh(mesh):
        lowered = _generate.lower(graphdef, place(state, state_sh), place(ids, rows), place(ids, rows),
                                           *place(scalars, rep), max_new_tokens=shapes.response_len,
                                           sample=False)
    return Program(lowered, {"params": per_chip_bytes(state, state_sh), "batch": 2 * per_chip_bytes(ids, rows)})


# --- what the compiler says ------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|called_computations)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(text: str) -> list[float]:
    out = []
    for dtype, dims in _SHAPE.findall(text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(size * _DTYPE_BYTES.get(dtype, 1))
    return out


def _operands(line: str, start: int) -> str:
    """The text of the operand list that opens at ``line[start] == '('`` (layouts may hold parentheses)."""
    depth = 0
    for i in range(start, len(line)):
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        if depth == 0:
            return line[start + 1:i]
    return line[start + 1:]


def _group_size(line: str, num_devices: int) -> int:
    """Devices per replica group: ``[G,n]<=[…]`` (iota), ``{{0,1,…},…}`` (listed) or
    ``mesh['axis_0'=4,…] {'axis_0'}`` (the named axes' sizes multiplied); all devices when empty."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m and m.group(1):
        return len(m.group(1).split(","))
    return num_devices


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, name = "", None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps, entry


_LT_CONSTANT = re.compile(r"ROOT .*compare\(%[\w.\-]+, %(?P<c>[\w.\-]+)\), direction=LT")


def _condition_trips(comps: dict[str, list[str]], condition: str) -> int:
    """Trip count of a ``while`` whose condition is ``counter < constant(N)`` (``lax.scan``'s loops and
    libtpu's windowed matmul loops, whose counters start at 0 and step by 1, the form they lower to);
    1 when the condition has another form. For loops without XLA's ``known_trip_count``."""
    lines = comps.get(condition.lstrip("%"), [])
    for line in lines:
        m = _LT_CONSTANT.search(line)
        if m:
            for other in lines:
                k = re.search(r"%" + re.escape(m.group("c")) + r" = [su]\d+\[\][^=]*constant\((\d+)\)", other)
                if k:
                    return int(k.group(1))
    return 1


def _multiplicity(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of ``entry`` (while bodies × trip counts).

    libtpu's ``async_collective_fusion`` computations inside a loop body (a weight gather sunk into a
    windowed-matmul loop, its progress counters among the operands) carry one collective across the
    loop's iterations: they count once per run of the loop, not once per iteration."""
    mult: dict[str, int] = {}

    def visit(name: str, times: int, depth: int = 0, loop_trips: int = 1) -> None:
        if name not in comps or depth > 64:
            return
        mult[name] = mult.get(name, 0) + times
        for line in comps[name]:
            trip = _TRIP.search(line)
            callees = _CALLEE.findall(line)
            n = int(trip.group(1)) if trip else _condition_trips(comps, dict(callees).get("condition", ""))
            for kind, callee in callees:
                for c in re.findall(r"%?([\w.\-]+)", callee):
                    if kind == "body":
                        visit(c, times * n, depth + 1, n)
                    elif c.startswith("async_collective_fusion"):  # one collective spread over the loop
                        visit(c, max(1, times // loop_trips), depth + 1, loop_trips)
                    else:
                        visit(c, times, depth + 1, loop_trips)

    visit(entry, 1)
    return mult


_RESULT = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>[\w\-]+)\(")
_NOT_TRAFFIC = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional",
                "call", "after-all", "partition-id", "replica-id")


def loop_bytes_factor(hlo: str) -> float:
    """How much more data a step writes than XLA's ``cost_analysis()`` sees, which counts a ``while``
    body once: the result bytes of the instructions of the entry and of every loop body and branch,
    weighted by how many times each runs (:func:`_multiplicity`), over the same sum unweighted (in-place
    updates left out: a scan's writes into its stacked ``[L, …]`` buffers). 1.0 for a program without
    loops. Scales ``bytes accessed`` for the roofline (a scan over layers, grad_accum)."""
    comps, entry = _computations(hlo)
    mult = _multiplicity(comps, entry)
    control = {entry}
    for lines in comps.values():
        for line in lines:
            for kind, callee in _CALLEE.findall(line):
                if kind in ("body", "condition", "branch_computations"):
                    control.update(re.findall(r"%?([\w.\-]+)", callee))
    weighted = plain = 0.0
    for name in control & set(comps):
        for line in comps[name]:
            m = _RESULT.search(line)
            in_place = m and (m.group("op") == "dynamic-update-slice" or "output_to_operand_aliasing" in line)
            if m and m.group("op") not in _NOT_TRAFFIC and not in_place:  # in place: the result type is the
                b = sum(_shape_bytes(m.group("type")))                      # whole buffer, the write a slice
                weighted, plain = weighted + b * mult.get(name, 0), plain + b
    return weighted / plain if plain else 1.0


def _collective_records(hlo: str, num_devices: int):
    """``(kind, times, bytes, traffic, result type)`` of every collective instruction of the module."""
    comps, entry = _computations(hlo)
    mult = _multiplicity(comps, entry)
    for name, lines in comps.items():
        times = mult.get(name, 0)
        for line in lines:
            m = _OP.search(line)
            if not m or times == 0:
                continue
            op = m.group("op")
            if op == "all-reduce" and name.startswith("all-reduce-scatter"):
                op = "reduce-scatter"  # TPU's reduce-scatter: an all-reduce + slice fused as one collective
            result = _shape_bytes(m.group("type"))
            operands = _shape_bytes(_operands(line, m.end() - 1))
            size = max(max(result, default=0.0), sum(operands))
            n = _group_size(line, num_devices)
            factor = 1.0 if op == "collective-permute" else (n - 1) / max(n, 1) * (2 if op == "all-reduce" else 1)
            yield op, times, size, size * factor, " ".join(f"{d}[{s}]" for d, s in _SHAPE.findall(m.group("type")))


def collectives(hlo: str, num_devices: int) -> dict[str, dict[str, float]]:
    """Count, bytes and ring traffic per device of each collective kind in an optimized HLO module.

    ``bytes`` is the larger of the operands and the result (the full buffer: an all-gather's output, a
    reduce-scatter's input; optimized TPU HLO prints operands without shapes, and its reduce-scatter is
    an all-reduce of the full buffer and a slice fused as ``all-reduce-scatter``, counted here as a
    reduce-scatter); ``traffic`` what one device sends on a ring: ``(n − 1)/n`` of it, twice for an
    all-reduce, all of it for a collective-permute. Executions inside ``while`` bodies with a known trip
    count are multiplied by it.
    """
    out = {k: {"count": 0, "bytes": 0.0, "traffic_bytes": 0.0} for k in COLLECTIVES}
    for op, times, size, traffic, _ in _collective_records(hlo, num_devices):
        out[op]["count"] += times
        out[op]["bytes"] += times * size
        out[op]["traffic_bytes"] += times * traffic
    return out


def largest_collectives(hlo: str, num_devices: int, top: int = 8) -> list[dict[str, Any]]:
    """The ``top`` (kind, result shape) groups by bytes sent per device: where the traffic goes."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for op, times, size, traffic, shape in _collective_records(hlo, num_devices):
        g = groups.setdefault((op, shape), {"kind": op, "shape": shape, "count": 0, "traffic_bytes": 0.0})
        g["count"] += times
        g["traffic_bytes"] += times * traffic
    return sorted(groups.values(), key=lambda g: -g["traffic_bytes"])[:top]


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def memory(compiled, groups: Mapping[str, int], hbm: float | None) -> dict[str, Any]:
    """Per-device memory from ``memory_analysis()``: argument groups, temp, output (not aliased), total."""
    m = compiled.memory_analysis()
    args, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    code = int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
    total = args + temp + out - alias + code
    res: dict[str, Any] = {f"{k}_bytes": int(v) for k, v in groups.items()}
    # The arguments beyond their shard sizes: TPU pads arrays to its tiles (e.g. (8, 128) for float32).
    res.update(padding_bytes=args - sum(groups.values()), argument_bytes=args, temp_bytes=temp,
               output_bytes=out - alias, aliased_bytes=alias, code_bytes=code, total_bytes=total)
    if hbm:
        res.update(hbm_bytes=int(hbm), fits=total <= hbm, headroom_bytes=int(hbm - total),
                   headroom_fraction=(hbm - total) / hbm)
    return res


# --- analytic counts and the roofline ---------------------------------------------------------------

def model_dims(model) -> dict[str, int]:
    """Parameter counts and attention sizes of a (possibly abstract) model.

    ``block_params``: matrices (≥ 2 dims) outside the embedding and the unembedding — the weights every
    token meets; ``head_params``: the unembedding ``V·D`` (the embedding table when tied); ``params``: all.
    """
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    named = [(".".join(str(getattr(k, "key", k)) for k in path), x) for path, x in flat]
    lookups = [x for n, x in named if "embed" in n or n.split(".")[-1] in ("wte", "wpe")]
    head = [x for n, x in named if n.startswith("lm_head") or n.startswith("embed_out")]
    cfg = model.cfg
    V, D = (head or lookups)[0].shape[:2] if (head or lookups) else (0, 0)
    blocks = sum(math.prod(x.shape) for n, x in named if len(x.shape) >= 2 and not any(
        x is y for y in lookups + head))
    return dict(params=sum(math.prod(x.shape) for _, x in named), block_params=int(blocks),
                head_params=int(V * D), layers=int(getattr(cfg, "num_layers", 0)),
                heads=int(getattr(cfg, "num_heads", 0)), head_dim=int(getattr(cfg, "head_dim", 0)),
                kv_heads=int(getattr(cfg, "num_kv_heads", getattr(cfg, "num_heads", 0))))


def _forward(dims: Mapping[str, int], B: int, queries: int, keys: int, logit_rows: int) -> float:
    """FLOPs of a forward pass: ``2·block_params`` per query token, ``2·head_params`` per logits row, and
    attention's two products over the full ``queries × keys`` rectangle (as the model computes it)."""
    attn = 4.0 * dims["heads"] * dims["head_dim"] * dims["layers"] * queries * keys
    return B * (2.0 * dims["block_params"] * queries + 2.0 * dims["head_params"] * logit_rows + attn)


def analytic_flops(job: str, dims: Mapping[str, int], shapes: Shapes, *, online_ref: bool = False
                   ) -> dict[str, float]:
    """Analytic FLOPs of one step (all devices): ``total``, and ``compiled_view`` (what XLA's count
    covers: for ``generate`` the prefill and one decode step, the loop body being counted once).

    The prompt runs once per pair into a cache of ``P + R`` slots and both responses continue from it:
    a pair forward is ``P + 2R`` query tokens against ``P + R`` keys, logits on the ``2(R + 1)`` response
    positions (none for CHES). Training is forward + backward = 3 forwards (6·N·tokens for the matrices),
    plus a forward of the reference when it runs online. ``entangle`` is approximated by the pair forward
    plus two backward passes (chosen and rejected sequences, ``P + R`` tokens each); the Gram/exact/JVP
    method's own products are not counted.
    """
    B, P, R = shapes.pairs, shapes.prompt_len, shapes.response_len
    pair = _forward(dims, B, P + 2 * R, P + R, 2 * (R + 1))
    if job == "train":
        total = 3 * pair + (pair if online_ref else 0.0)
    elif job == "ches":
        total = _forward(dims, B, P + 2 * R, P + R, 0)
    elif job == "probe":
        total = pair
    elif job == "entangle":
        total = pair + 2 * 2 * _forward(dims, B, P + R, P + R, R + 1)
    elif job == "generate":
        prefill = _forward(dims, B, P, P + R, 1)
        step = _forward(dims, B, 1, P + R, 1)
        return {"total": prefill + (R - 1) * step, "compiled_view": prefill + step}
    else:
        raise ConfigError(f"--job must be one of {', '.join(JOBS)}, got {job!r}")
    return {"total": total, "compiled_view": total}


def recompute_flops(job: str, dims: Mapping[str, int], shapes: Shapes, remat: str | None) -> float:
    """FLOPs a rematerialised train step runs again in its backward pass (all devices): the blocks'
    forward under ``full`` (or ``nothing_saveable``), attention's two products under a ``dots…`` policy
    (they have batch dims, so they are not saved), else 0. Hardware FLOPs = model FLOPs + these (the
    "hardware FLOPs" of Chowdhery et al., PaLM, Appendix B). XLA's own count includes them, except in a
    scanned program, whose loop body it counts once: the roofline takes the larger of the two."""
    if job != "train" or not remat:
        return 0.0
    B, P, R = shapes.pairs, shapes.prompt_len, shapes.response_len
    if remat in ("full", "nothing_saveable"):
        return _forward(dims, B, P + 2 * R, P + R, 0)
    if remat.startswith("dots"):
        return B * 4.0 * dims["heads"] * dims["head_dim"] * dims["layers"] * (P + 2 * R) * (P + R)
    return 0.0


def tokens_per_step(job: str, shapes: Shapes) -> int:
    """Tokens a step processes: the prompt once plus both responses per pair (generate: new tokens)."""
    B, P, R = shapes.pairs, shapes.prompt_len, shapes.response_len
    return B * R if job == "generate" else B * (P + 2 * R)


def roofline(chip: chips_lib.Chip, n_chips: int, *, flops_per_chip: float, hbm_bytes_per_chip: float,
             ici_bytes_per_chip: float, model_flops: float, pairs: int, tokens: int) -> dict[str, float]:
    """Estimated step time = max(compute, HBM, collectives) (perfect overlap), throughput and MFU."""
    compute = flops_per_chip / chip.peak_bf16_flops
    hbm = hbm_bytes_per_chip / chip.hbm_bytes_per_s
    ici = ici_bytes_per_chip / chip.ici_bytes_per_s
    step = max(compute, hbm, ici, 1e-12)
    serial = max(compute + hbm + ici, 1e-12)
    bound = ("compute", "hbm", "collectives")[[compute, hbm, ici].index(max(compute, hbm, ici))]
    peak = n_chips * chip.peak_bf16_flops
    return dict(compute_s=compute, hbm_s=hbm, collective_s=ici, step_s=step, bound=bound,
                pairs_per_s=pairs / step, tokens_per_s=tokens / step, mfu=model_flops / (step * peak),
                step_s_no_overlap=serial, mfu_no_overlap=model_flops / (serial * peak))


# --- the plan ------------------------------------------------------------------------------------------

def mesh_shape(run, n_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` of the run's mesh section on ``n_devices`` (one ``-1`` inferred)."""
    shape = [run.mesh.data, run.mesh.fsdp, run.mesh.tensor]
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n_devices % known:
            raise ConfigError(f"mesh: {shape} does not divide the {n_devices} devices")
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ConfigError(f"mesh: data×fsdp×tensor = {math.prod(shape)} but the target has {n_devices} "
                          "devices (set mesh.data=-1 to fill it)")
    return tuple(shape)


def _check_batch(job: str, shapes: Shapes, shape: Sequence[int], grad_accum: int) -> None:
    rows = shape[0] * shape[1]
    micro = shapes.pairs // grad_accum if job == "train" else shapes.pairs
    if job == "train" and shapes.pairs % grad_accum:
        raise ConfigError(f"--pairs {shapes.pairs} does not divide into train.grad_accum={grad_accum}")
    if job != "entangle" and micro % rows:
        raise ConfigError(f"--pairs: the {'micro-batch' if job == 'train' else 'batch'} of {micro} pairs "
                          f"does not divide over data×fsdp = {rows} devices")


def build_program(job: str, model, run, shapes: Shapes, mesh, *, method: str, chip,
                  shard_params: bool = False) -> Program:
    """Lowers ``job``'s jitted function for ``model`` (abstract) on ``mesh``."""
    if job == "train":
        return _train_program(model, run, shapes, mesh)
    if job == "ches":
        return _ches_program(model, shapes, mesh)
    if job == "probe":
        return _probe_program(model, shapes, mesh)
    if job == "entangle":
        if method not in ENTANGLE_METHODS:
            raise ConfigError(f"--method must be one of {', '.join(ENTANGLE_METHODS)}, got {method!r}")
        budget = chip.hbm_bytes / 2 if chip else 4 << 30  # the probe's own rule: half the device memory
        return _entangle_program(model, shapes, mesh, method, budget, shard_params)
    if job == "generate":
        return _generate_program(model, shapes, mesh)
    raise ConfigError(f"--job must be one of {', '.join(JOBS)}, got {job!r}")


def _estimate(job: str, prog: Program, compiled, tgt: Target, dims, shapes, run, n: int) -> dict:
    cost = _cost(compiled)
    hlo = compiled.as_text()
    coll = collectives(hlo, n)
    online = job == "train" and run.loss.reference == "online"
    flops = analytic_flops(job, dims, shapes, online_ref=online)
    est: dict[str, Any] = {
        "flops": {"compiler_per_chip": cost["flops"], "analytic_per_chip": flops["compiled_view"] / n,
                  "analytic_total": flops["total"],
                  "compiler_over_analytic": cost["flops"] / max(flops["compiled_view"] / n, 1.0)},
        "bytes_accessed_per_chip": cost["bytes_accessed"], "collectives": coll,
        "largest_collectives": largest_collectives(hlo, n)}
    if tgt.chip is None:
        return est
    hbm_bytes = hbm_traffic(cost["bytes_accessed"], hlo, compiler_flops=cost["flops"],
                            analytic_flops=flops["compiled_view"] / n)
    recompute = recompute_flops(job, dims, shapes, run.model.remat)
    est["flops"]["recompute_per_chip"] = recompute / n
    hw_flops = max(cost["flops"], (flops["compiled_view"] + recompute) / n)
    if job == "generate":  # the decode loop's body is in the compiler's counts once: add the other steps
        hw_flops = flops["total"] / n
        hbm_bytes += (shapes.response_len - 2) * (prog.groups["params"] + _kv_bytes(dims, shapes, run, n))
    inputs = dict(flops_per_chip=hw_flops, hbm_bytes_per_chip=hbm_bytes,
                  ici_bytes_per_chip=sum(c["traffic_bytes"] for c in coll.values()), model_flops=flops["total"],
                  pairs=shapes.pairs, tokens=tokens_per_step(job, shapes))
    est["roofline_inputs"] = inputs
    est["roofline"] = roofline(tgt.chip, n, **inputs)
    return est


def hbm_traffic(bytes_accessed: float, hlo: str, *, compiler_flops: float, analytic_flops: float) -> float:
    """HBM bytes per chip per step for the roofline: XLA's ``bytes accessed`` scaled for the loops it
    counts once, by :func:`loop_bytes_factor` where the HLO has loops with a trip count, else by the
    analytic over the compiler's FLOPs (at least 1)."""
    loops = loop_bytes_factor(hlo)
    return bytes_accessed * (loops if loops > 1.0 else max(1.0, analytic_flops / max(compiler_flops, 1.0)))


def _kv_bytes(dims, shapes: Shapes, run, n: int) -> float:
    itemsize = jnp.dtype(run.model.dtype or run.model.param_dtype).itemsize
    return (2.0 * dims["layers"] * shapes.pairs * (shapes.prompt_len + shapes.response_len)
            * dims["kv_heads"] * dims["head_dim"] * itemsize / n)


def plan(hf: dict, name: str, job: str, tgt: Target, shapes: Shapes, run=None, *, method: str = "gram",
         shard_params: bool = False, hlo_path: str | Path | None = None) -> dict[str, Any]:
    """Compiles ``job`` for the model of ``hf`` on ``tgt`` and returns the plan (a JSON-able dict).

    Raises:
      ConfigError: a mesh that does not use the devices, a batch that does not divide over it, an
        unknown job or method, a bad run option.
      ModelError: a config that is not a supported model.

    ``shard_params``: ``entangle`` with the parameters sharded by the training rules and gathered at each
    use (``make_pair_grads(shard_params=True)``). ``hlo_path``: also write the compiled program's
    optimized HLO text there.
    """
    run = run or run_config()
    shape = mesh_shape(run, len(tgt.devices))
    _check_batch(job, shapes, shape, run.train.grad_accum)
    mesh = make_mesh(shape, tgt.devices)
    model = abstract_model(hf, run)
    dims = model_dims(model)
    t0 = time.perf_counter()
    with parallel.compiling_for(tgt.devices[0].platform):  # the target's kernels, not the host's
        prog = build_program(job, model, run, shapes, mesh, method=method, chip=tgt.chip,
                             shard_params=shard_params)
    lower_s = time.perf_counter() - t0  # tracing and lowering to StableHLO; the rest is XLA's compile
    compiled, refused = _compile(prog.lowered)
    compile_s = time.perf_counter() - t0
    if hlo_path and compiled is not None:
        Path(hlo_path).parent.mkdir(parents=True, exist_ok=True)
        Path(hlo_path).write_text(compiled.as_text())
    n = len(tgt.devices)
    result = {
        "estimate": True, "model": name, "model_type": hf.get("model_type"), "job": job,
        "target": tgt.label, "chips": n, "chip": dataclasses.asdict(tgt.chip) if tgt.chip else None,
        "mesh": dict(zip(parallel.MESH_AXES, shape)),
        "shapes": dataclasses.asdict(shapes), "params": dims["params"], "dims": dims,
        "options": _options(job, run, prog), "compile_s": round(compile_s, 1), "lower_s": round(lower_s, 1)}
    hbm = tgt.hbm_bytes
    if compiled is None:  # the TPU compiler refuses a program that cannot fit its HBM
        result["memory"] = _refused_memory(refused, prog.groups, hbm)
        return result
    result["memory"] = memory(compiled, prog.groups, hbm)
    result.update(_estimate(job, prog, compiled, tgt, dims, shapes, run, n))
    return result


def _compile(lowered):
    """``(compiled, None)``, or ``(None, message)`` when the compiler finds the program too big for the
    device (TPU: ``RESOURCE_EXHAUSTED: Ran out of memory on HBM``)."""
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return None, str(err).strip().splitlines()[0]


def _refused_memory(message: str, groups: Mapping[str, int], hbm: float | None) -> dict[str, Any]:
    """The memory section of a plan the compiler refused: the argument groups, the temporaries the message
    names (XLA's ``G`` is GiB), fits = False."""
    out: dict[str, Any] = {f"{k}_bytes": int(v) for k, v in groups.items()}
    args = sum(groups.values())
    temp = re.search(r"HLO temporaries \(([\d.]+)G\)", message)
    used = re.search(r"Used ([\d.]+)G of [\d.]+G hbm", message)  # libtpu's other form: the whole program
    temp_bytes = (int(float(temp.group(1)) * 2**30) if temp else
                  max(int(float(used.group(1)) * 2**30) - args, 0) if used else None)
    out.update(fits=False, compiler_error=message, temp_bytes=temp_bytes)
    out["total_bytes"] = args + (temp_bytes or 0)
    if hbm:
        out.update(hbm_bytes=int(hbm), headroom_bytes=int(hbm - out["total_bytes"]),
                   headroom_fraction=(hbm - out["total_bytes"]) / hbm)
    return out


def with_reparsed_refusal(p: dict) -> dict:
    """``p`` with the memory of a refused program read again from the compiler's message
    (:func:`_refused_memory`; plans written before Session 9 missed libtpu's "Used …G of …G hbm" form)."""
    m = p.get("memory") or {}
    if "compiler_error" not in m:
        return p
    groups = {k[:-6]: v for k, v in m.items()
              if k.endswith("_bytes") and k not in ("temp_bytes", "total_bytes", "hbm_bytes", "headroom_bytes")}
    return dict(p, memory=_refused_memory(m["compiler_error"], groups, m.get("hbm_bytes")))


def _options(job: str, run, prog: Program) -> dict[str, Any]:
    out = {"param_dtype": run.model.param_dtype, "dtype": run.model.dtype or run.model.param_dtype,
           "remat": run.model.remat, "scan_layers": run.model.scan_layers}
    if job == "train":
        out.update(loss=run.loss.name, optimizer=run.optim.name, grad_accum=run.train.grad_accum,
                   reference=run.loss.reference, shared_prompt=run.data.shared_prompt,
                   fused_pairs=run.data.fused_pairs, constrain_activations=run.mesh.constrain_activations)
    if run.lora.enabled:
        out.update(lora_target=run.lora.target, lora_r=run.lora.r)
    out.update(prog.info)
    return out


def with_recompute(p: dict) -> dict:
    """``p`` as it would be with rematerialisation's recomputation in its hardware FLOPs
    (:func:`recompute_flops`; plans written before Session 8 left it out of scanned programs), from the
    counts the plan holds: no compile, no HLO. Plans that have it, or have no roofline, are returned as is."""
    if "recompute_per_chip" in p.get("flops", {}) or not p.get("roofline_inputs") or p["job"] == "generate":
        return p
    n = p["chips"]
    rec = recompute_flops(p["job"], p["dims"], Shapes(**p["shapes"]), p["options"].get("remat")) / n
    flops = dict(p["flops"], recompute_per_chip=rec)
    hw = max(flops["compiler_per_chip"], flops["analytic_per_chip"] + rec)
    inputs = dict(p["roofline_inputs"], flops_per_chip=hw)
    chip = chips_lib.get(p["chip"]["name"])
    return dict(p, flops=flops, roofline_inputs=inputs, roofline=roofline(chip, n, **inputs))


def reanalyse(p: dict, hlo: str) -> dict:
    """``p`` with its collectives and roofline recomputed from the program's saved HLO text (``--hlo``):
    a plan refreshed after the parser changes, without compiling again."""
    n = p["chips"]
    p = dict(p, collectives=collectives(hlo, n), largest_collectives=largest_collectives(hlo, n))
    if p.get("chip") and p.get("roofline_inputs"):
        chip = chips_lib.get(p["chip"]["name"])  # today's table
        inputs = dict(p["roofline_inputs"], ici_bytes_per_chip=sum(
            c["traffic_bytes"] for c in p["collectives"].values()))
        if p["job"] != "generate":  # generate's decode loop is priced by its own formula (_estimate)
            inputs["hbm_bytes_per_chip"] = hbm_traffic(
                p["bytes_accessed_per_chip"], hlo, compiler_flops=p["flops"]["compiler_per_chip"],
                analytic_flops=p["flops"]["analytic_per_chip"])
        total = p["memory"]["total_bytes"]
        p["memory"] = dict(p["memory"], hbm_bytes=int(chip.hbm_bytes), fits=total <= chip.hbm_bytes,
                           headroom_bytes=int(chip.hbm_bytes - total),
                           headroom_fraction=(chip.hbm_bytes - total) / chip.hbm_bytes)
        p.update(chip=dataclasses.asdict(chip), roofline_inputs=inputs, roofline=roofline(chip, n, **inputs))
    return p


def overrides_of(p: Mapping[str, Any]) -> list[str]:
    """The ``key=value`` overrides of ``jaxalign train`` that reproduce a plan's mesh and options."""
    out = [f"mesh.{k}={v}" for k, v in p["mesh"].items()]
    out.append(f"model.remat={p['options']['remat'] if p['options']['remat'] else 'null'}")
    if p["job"] == "train":
        out.append(f"train.grad_accum={p['options']['grad_accum']}")
        if not p["options"].get("constrain_activations", True):
            out.append("mesh.constrain_activations=false")
        if p["options"].get("fused_pairs"):
            out.append("data.fused_pairs=true")
    if p["options"].get("scan_layers"):
        out.append("model.scan_layers=true")
    return out


# --- search ----------------------------------------------------------------------------------------

def candidates(n: int, shapes: Shapes, heads: int, *, job: str = "train",
               remats: Sequence[str | None] = SEARCH_REMAT) -> list[dict]:
    """Mesh factorisations ``data × fsdp × tensor = n`` (tensor dividing the heads), remat policies and
    grad_accum values (train) whose micro-batch divides over ``data × fsdp``; for training each with the
    activation constraints on and off (``mesh.constrain_activations``)."""
    out = []
    for t in (d for d in range(1, n + 1) if n % d == 0 and heads % d == 0):
        for f in (d for d in range(1, n // t + 1) if (n // t) % d == 0):
            data = n // (t * f)
            accums = [a for a in range(1, shapes.pairs + 1) if shapes.pairs % a == 0] if job == "train" else [1]
            for a in accums:
                if (shapes.pairs // a) % (data * f):
                    continue
                for r in remats:
                    for on in ((True, False) if job == "train" else (True,)):
                        out.append({"mesh": (data, f, t), "remat": r, "grad_accum": a, "constrain": on})
    return out


_REMAT_MEMORY = {None: 2, "dots_with_no_batch_dims_saveable": 1, "full": 0}  # higher keeps more activations


def _footprint(c: Mapping[str, Any], pairs: int) -> tuple[int, float, int]:
    """What sets a candidate's memory: (remat rank, pairs per device per micro-batch, state shards)."""
    data, fsdp, tensor = c["mesh"]
    return _REMAT_MEMORY.get(c["remat"], 1), pairs / (c["grad_accum"] * data * fsdp), fsdp * tensor


def _needs_no_less(c, failed, pairs: int) -> bool:
    """Whether candidate ``c`` keeps at least the memory of a candidate that did not fit."""
    r, m, s = _footprint(c, pairs)
    r0, m0, s0 = _footprint(failed, pairs)  # the activations' layout changes the memory: compare like with like
    return r >= r0 and m >= m0 and s <= s0 and c.get("constrain") == failed.get("constrain")


def search(hf: dict, name: str, job: str, tgt: Target, shapes: Shapes, run=None, *, method: str = "gram",
           shard_params: bool = False, max_compiles: int = 8, remats: Sequence[str | None] = SEARCH_REMAT, log=print) -> dict[str, Any]:
    """Plans the candidates (:func:`candidates`) and picks the fastest predicted one that fits.

    Order: the activation constraints on before off (off changes only the speed), less accumulation first,
    the state sharded over more devices first (fsdp before tensor), and for each mesh every remat policy,
    none first: remat adds compute but saves memory traffic, and which is faster the roofline decides,
    so each mesh's policies are compiled before the next mesh's. Skipped without compiling: candidates
    whose parameters and optimizer state alone exceed the chip (``skipped_state``); candidates that keep at least the memory of one that did not fit
    (same or more activations kept, same or more pairs per device, state over as many devices or fewer,
    the same activation constraints; ``skipped_dominated``); and a candidate with the activation
    constraints off unless the same configuration with them on fit (off changes only the speed, and it
    needed more memory in every pair this project compiled; ``skipped_unconstrained``). At most
    ``max_compiles`` compiles; ``not_tried`` counts the candidates left after them. Returns ``{"best":
    plan or None, "tried": [summary rows], "skipped": n, "candidates": n}`` plus those counts.
    """
    run = run or run_config()
    dims = model_dims(abstract_model(hf, run))
    cands = candidates(len(tgt.devices), shapes, dims["heads"] or 1, job=job, remats=remats)
    cands.sort(key=lambda c: (not c["constrain"], c["grad_accum"], -c["mesh"][1] * c["mesh"][2], c["mesh"][2],
                              -_REMAT_MEMORY.get(c["remat"], 1)))
    hbm = tgt.hbm_bytes
    state_bytes = _state_bytes_per_param(job, run)
    tried, failed, fit, best = [], [], [], None
    counts = dict(skipped_state=0, skipped_dominated=0, skipped_unconstrained=0, not_tried=0)
    for i, c in enumerate(cands):
        twin = dict(c, constrain=True)
        if hbm and dims["params"] * state_bytes / (c["mesh"][1] * c["mesh"][2]) > hbm:
            counts["skipped_state"] += 1
        elif any(_needs_no_less(c, f, shapes.pairs) for f in failed):
            counts["skipped_dominated"] += 1
        elif not c["constrain"] and twin not in fit:
            counts["skipped_unconstrained"] += 1
        elif len(tried) >= max_compiles:
            counts["not_tried"] = len(cands) - i
            break
        else:
            p = plan(hf, name, job, tgt, shapes, _with_candidate(run, c), method=method, shard_params=shard_params)
            row = summary_row(p)
            tried.append(row)
            log("  tried " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()))
            if not p["memory"].get("fits", True):
                failed.append(c)
                continue
            fit.append(c)
            if best is None or _step(p) < _step(best):
                best = p
    skipped = counts["skipped_state"] + counts["skipped_dominated"] + counts["skipped_unconstrained"]
    return {"best": best, "tried": tried, "skipped": skipped, "candidates": len(cands), **counts}


def _with_candidate(run, c: Mapping[str, Any]):
    """``run`` with candidate ``c``'s mesh, activation constraints, remat policy and accumulation."""
    return dataclasses.replace(
        run, mesh=dataclasses.replace(run.mesh, data=c["mesh"][0], fsdp=c["mesh"][1], tensor=c["mesh"][2],
                                      constrain_activations=c["constrain"]),
        model=dataclasses.replace(run.model, remat=c["remat"]),
        train=dataclasses.replace(run.train, grad_accum=c["grad_accum"]))


def search_summary(found: Mapping[str, Any]) -> str:
    """Why a search found nothing: how many it compiled, skipped for each reason, and left untried."""
    return (f"none of the {len(found['tried'])} configurations compiled fits; skipped without compiling: "
            f"{found['skipped_state']} whose parameters and optimizer state alone exceed the chip, "
            f"{found['skipped_dominated']} that keep at least the memory of one that did not fit, "
            f"{found['skipped_unconstrained']} with the activation constraints off whose constrained twin did "
            f"not fit; {found['not_tried']} not tried (--max-compiles)")


def _state_bytes_per_param(job: str, run) -> float:
    """Bytes per parameter of the state that stays resident: params (+ AdamW's two moments in training)."""
    item = jnp.dtype(run.model.param_dtype).itemsize
    return item * (3 if job == "train" and run.optim.name == "adamw" else 1)


def _step(p) -> float:
    return p.get("roofline", {}).get("step_s", p["memory"]["total_bytes"])


def summary_row(p: Mapping[str, Any]) -> dict[str, Any]:
    m, r = p["memory"], p.get("roofline", {})
    row = {"mesh": "x".join(str(v) for v in p["mesh"].values()), "remat": p["options"]["remat"],
           "grad_accum": p["options"].get("grad_accum", 1)}
    if "constrain_activations" in p["options"]:
        row["constrain"] = p["options"]["constrain_activations"]
    row.update(gb_per_chip=m["total_bytes"] / 1e9, fits=m.get("fits"))
    if "compiler_error" in m:
        row["refused"] = "compiler: out of HBM"
    if r:
        row.update({"step_s": r["step_s"], "mfu": r["mfu"]})
    return row


# --- output --------------------------------------------------------------------------------------------

def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if abs(x) >= 1e8 else f"{x / 1e6:.2f} MB"


def _flop(x: float) -> str:
    return f"{x / 1e12:.3f} TFLOP" if x >= 1e10 else f"{x / 1e9:.3f} GFLOP"


def format_plan(p: Mapping[str, Any]) -> str:
    """The terminal table of a plan (every number an estimate)."""
    m, f = p["memory"], p.get("flops")  # no FLOPs when the compiler refused the program
    lines = [f"jaxalign plan (ESTIMATES) — {p['model']} ({p['params'] / 1e9:.2f} B params), job {p['job']}, "
             f"{p['target']} ({p['chips']} chips), mesh " + " ".join(f"{k}={v}" for k, v in p["mesh"].items()),
             f"  shapes: {p['shapes']['pairs']} pairs, prompt {p['shapes']['prompt_len']}, response "
             f"{p['shapes']['response_len']}; options: " + ", ".join(f"{k}={v}" for k, v in p["options"].items()),
             f"  compiled in {p['compile_s']} s", "", "  memory per chip"]
    for k in ("params", "optimizer", "frozen_base", "reference", "batch", "other", "padding"):
        if f"{k}_bytes" in m:
            lines.append(f"    {k:<22}{_gb(m[f'{k}_bytes']):>12}")
    for k, label in (("temp", "temp"), ("output", "output (not donated)"), ("code", "code")):
        if m.get(f"{k}_bytes") is not None:
            lines.append(f"    {label:<22}{_gb(m[f'{k}_bytes']):>12}")
    lines.append(f"    {'total':<22}{_gb(m['total_bytes']):>12}")
    if "hbm_bytes" in m:
        lines.append(f"    {'HBM':<22}{_gb(m['hbm_bytes']):>12}   {'fits' if m['fits'] else 'DOES NOT FIT'}, "
                     f"headroom {_gb(m['headroom_bytes'])} ({100 * m['headroom_fraction']:.1f}%)")
    if "compiler_error" in m:
        return "\n".join(lines + [f"  DOES NOT FIT: the compiler refused the program: {m['compiler_error']}"])
    lines += ["", "  FLOPs per chip per step",
              f"    compiler (XLA cost analysis) {_flop(f['compiler_per_chip']):>14}",
              f"    analytic (6·N·tokens + attn) {_flop(f['analytic_per_chip']):>14}   "
              f"ratio {f['compiler_over_analytic']:.3f}", "", "  collectives per step (per chip)"]
    for k, c in p["collectives"].items():
        if c["count"]:
            lines.append(f"    {k:<20}{c['count']:>6} ×   {_gb(c['bytes']):>12} buffers, "
                         f"{_gb(c['traffic_bytes'])} sent")
    if not any(c["count"] for c in p["collectives"].values()):
        lines.append("    none")
    for g in p.get("largest_collectives", [])[:3]:
        lines.append(f"    largest: {g['kind']} {g['shape'][:60]} ×{g['count']}: {_gb(g['traffic_bytes'])} sent")
    r = p.get("roofline")
    if r:
        lines += ["", f"  roofline estimate ({p['chip']['name']}: peak {p['chip']['peak_bf16_flops'] / 1e12:.0f} "
                  "TFLOP/s, perfect overlap)",
                  f"    compute {r['compute_s'] * 1e3:.1f} ms, HBM {r['hbm_s'] * 1e3:.1f} ms, collectives "
                  f"{r['collective_s'] * 1e3:.1f} ms -> step {r['step_s'] * 1e3:.1f} ms ({r['bound']}-bound)",
                  f"    {r['pairs_per_s']:.2f} pairs/s, {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}% "
                  "(an upper bound: peak rates, full overlap)",
                  f"    without overlap (the three in series): step {r['step_s_no_overlap'] * 1e3:.1f} ms, MFU "
                  f"{100 * r['mfu_no_overlap']:.1f}%"]
    else:
        lines += ["", "  roofline: no chip spec for this target (pass --chip v5p|v5e|v6e|v4|h100|h200)"]
    return "\n".join(lines)


def write_json(p: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(p, indent=2, default=str) + "\n")
    return path


# --- jaxalign train --plan -----------------------------------------------------------------------------

class DoesNotFit(ConfigError):
    """``jaxalign train --plan``: the run's step does not fit the devices' memory (the message names
    overrides that would fit, when the search found some)."""


def train_shapes(run) -> Shapes:
    """The padded step shapes of a run config, known before any data is read: ``train.batch_size`` pairs,
    ``data.prompt_length`` (else ``data.max_prompt_length``) and ``data.response_length`` (else
    ``data.max_length`` minus the prompt)."""
    d = run.data
    prompt = d.prompt_length or d.max_prompt_length
    response = d.response_length or (d.max_length - prompt if d.max_length and prompt else None)
    if not prompt or not response or response < 1:
        raise ConfigError("train --plan: the padded lengths are unknown before the data is read; set "
                          "data.prompt_length and data.response_length (or data.max_prompt_length and "
                          "data.max_length)")
    return Shapes(run.train.batch_size, int(prompt), int(response))


def check_train(run, *, hbm_gb: float | None = None, max_compiles: int = 4, log=print) -> dict[str, Any]:
    """``jaxalign train --plan``: compiles the run's own train step for the devices at hand (no weights
    read) and returns the plan when it fits.

    The budget is the chip's HBM (a TPU or GPU in :mod:`jaxalign.jobs.chips`) or ``hbm_gb``. Without
    either (a CPU) the plan is printed and nothing is refused.

    Raises:
      DoesNotFit: the step needs more memory per device than the budget; the message names the
        overrides of the fastest fitting configuration :func:`search` found (at most ``max_compiles``
        compiles), or says that none was found.
    """
    from jaxalign.models.paths import resolve_model_path

    hf, name = model_config(resolve_model_path(run.model.path))
    shapes, tgt = train_shapes(run), target(hbm_gb=hbm_gb)
    p = plan(hf, name, "train", tgt, shapes, run)
    log(format_plan(p))
    m = p["memory"]
    if m.get("fits", True):
        if "fits" not in m:
            log("train --plan: no memory budget for these devices (pass --hbm-gb); not checked")
        return p
    log(f"train --plan: does not fit; searching (at most {max_compiles} compiles)")
    found = search(hf, name, "train", tgt, shapes, run, max_compiles=max_compiles, log=log)
    hint = ("these overrides fit (estimate): " + " ".join(overrides_of(found["best"])) if found["best"] else
            search_summary(found) + "; try more devices, model.param_dtype=bfloat16, LoRA or a smaller "
            "train.batch_size")
    raise DoesNotFit(f"train --plan: the step needs {m['total_bytes'] / 1e9:.3f} GB per device, more than "
                     f"the {m['hbm_bytes'] / 1e9:.3f} GB available on {tgt.label}; {hint}")
