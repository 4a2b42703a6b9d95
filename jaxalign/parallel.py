"""Device mesh, logical-axis sharding rules, multi-host initialisation.

Every parameter is created with a ``logical_axes`` metadata tuple (one name per dimension, e.g.
``("vocab", "embed")``). One rules table maps logical names to mesh axes; this module is the only place
that knows the mapping. Without a mesh everything is a no-op, so the same model code runs on one CPU,
on 8 simulated CPU devices and on a pod.

Mesh axes: ``data`` (pairs), ``fsdp`` (parameters sharded, batch too), ``tensor`` (model-parallel),
``expert`` (the experts of a mixture-of-experts layer; size 1 unless asked for).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical axis name -> mesh axis (or None: replicated). Batch-like axes go over data and fsdp.
RULES: Mapping[str, Any] = {
    "batch": ("data", "fsdp"),
    "batch_data": "data",  # rows of an activation whose other axis takes fsdp (the logits: vocab)
    # Vocabulary tables [V, D] split by rows over fsdp × tensor (vocabulary-parallel, as in Shoeybi et al.,
    # Megatron-LM, 2019, §3): the lookup and the logits then never gather a whole table, and each chip's
    # table gradient is its own rows (docs/scale.md, "8B DPO on v5e-16").
    "vocab": ("fsdp", "tensor"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,
    "norm": None,
    "positions": None,
    "layers": None,  # the leading axis of blocks stacked for a scan over layers (model.scan_layers)
    "lora_rank": None,  # LoRA's A [in…, r] and B [r, out…] shard their other axes like the kernel
    "expert": "expert",  # MoE kernels [E, …] and router [D, E]: experts split over the expert axis
}


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor, expert)`` mesh.

    Args:
      shape: sizes of the axes (three sizes: ``expert`` is 1); ``None`` puts every device on ``data``.
        One entry may be -1 and is then inferred from the device count.
      devices: devices to use (default: all of ``jax.devices()``).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape if shape is not None else (len(devices), 1, 1))
    if len(shape) == 3:
        shape.append(1)
    if len(shape) != 4:
        raise ValueError(f"mesh shape needs 3 or 4 sizes (data, fsdp, tensor[, expert]), got {shape}")
    if shape.count(-1) == 1:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} does not use the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: Mesh | None) -> P:
    """PartitionSpec for an array with these logical axes; axes that do not divide stay replicated."""
    if mesh is None or logical_axes is None:
        return P()
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        target = RULES.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used and mesh.shape.get(t, 1) > 1)
        if targets and size % math.prod(mesh.shape[t] for t in targets) == 0:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
        else:
            spec.append(None)
    return P(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh | None):
    """NamedSharding for ``logical_axes`` on ``mesh`` (``None`` without a mesh)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def batch_sharding(mesh: Mesh | None, ndim: int):
    """Sharding of a batch-major array: leading axis over (data, fsdp), the rest replicated."""
    if mesh is None:
        return None
    return named_sharding(("batch",) + (None,) * (ndim - 1), (math.prod(
        mesh.shape[a] for a in ("data", "fsdp")),) + (1,) * (ndim - 1), mesh)


def state_shardings(state, mesh: Mesh | None):
    """Maps an ``nnx.State`` of ``nnx.Variable``s to NamedShardings from their ``logical_axes``."""
    from flax import nnx

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        axes = getattr(var, "logical_axes", None) if hasattr(var, "get_metadata") else None
        return named_sharding(axes, value.shape, mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# Logical axes of the activations the model code constrains: rows over the batch axes (data × fsdp), the
# model width replicated (the weights are gathered to it: FSDP), heads and the MLP width over ``tensor``.
ACT_BTD = ("batch", None, None)
ACT_BTNH = ("batch", None, "heads", None)
ACT_BTKH = ("batch", None, "kv_heads", None)
ACT_BTF = ("batch", None, "mlp")
# Logits [B, T, V]: the vocabulary split as the tables' rows, the rows over data only (each chip's
# logits are all rows × its vocabulary rows; the hidden chunk is gathered, the table never).
ACT_BTV = ("batch_data", None, "vocab")
# Logits when the vocabulary does not divide over fsdp × tensor (e.g. GPT-2's 50257): rows as every
# activation, the tables split by D.
ACT_BTV_ROWS = ("batch", None, "vocab")


# The platform the program being traced is for, when it is not the host's: a TPU plan traces on a CPU host.
_TARGET_PLATFORM = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str | None):
    """Within the block, :func:`target_platform` is ``platform`` (``"tpu"``, ``"gpu"``, ``"cpu"``); ``None``
    leaves it to JAX's default backend."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform the program being traced will run on: the one :func:`compiling_for` names, else JAX's
    default backend. Trace-time choices made for one backend (XLA:CPU's kernel layouts, libtpu
    workarounds) ask this rather than ``jax.default_backend()``, so that ``jaxalign plan`` compiles for a
    TPU what a TPU would run."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


# Whether :func:`constrain` places the activations (``mesh.constrain_activations`` of a run). Off, XLA's
# partitioner chooses their layout itself: at a small per-chip batch on a memory-bound chip that can move
# fewer bytes (docs/scale.md, Llama-3.2-1B on v5e:2x2).
_CONSTRAIN_ACTIVATIONS = contextvars.ContextVar("constrain_activations", default=True)


@contextlib.contextmanager
def activation_constraints(enabled: bool = True):
    """Within the block, functions traced have their :func:`constrain` calls on (default) or off."""
    token = _CONSTRAIN_ACTIVATIONS.set(bool(enabled))
    try:
        yield
    finally:
        _CONSTRAIN_ACTIVATIONS.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
    """``with_sharding_constraint`` of ``x`` by logical axes (:data:`RULES`).

    ``mesh``: the mesh; ``None`` takes the one set by ``jax.set_mesh`` around the trace. Identity when
    there is none or it has one device, so model code can call it unconditionally, and inside
    ``activation_constraints(False)``. Axes that do not divide stay replicated (e.g. a batch of 1 in
    decoding).
    """
    if not _CONSTRAIN_ACTIVATIONS.get():
        return x
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
    if math.prod(mesh.shape.values()) == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    target = spec if isinstance(mesh, jax.sharding.AbstractMesh) else NamedSharding(mesh, spec)
    return jax.lax.with_sharding_constraint(x, target)


def replicate(x: jax.Array) -> jax.Array:
    """``x`` made whole on every device of the mesh set around the trace (an all-gather of a sharded
    parameter: FSDP's gather before use); identity without a mesh or on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P())


def constrain_logits(logits_BTV: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """:func:`constrain` of logits ``[B, T, V]``: :data:`ACT_BTV` where the vocabulary tables are split
    by rows on this mesh (``V`` divides over fsdp × tensor), else :data:`ACT_BTV_ROWS`."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return logits_BTV
    rows_split = logical_to_spec(("vocab",), logits_BTV.shape[-1:], mesh)[0] is not None
    return constrain(logits_BTV, ACT_BTV if rows_split else ACT_BTV_ROWS, mesh)


def in_mesh(fn, mesh: Mesh | None, *, constrain_activations: bool = True):
    """``fn`` called under ``jax.set_mesh(mesh)`` (``fn`` itself without a mesh): a jitted function traced
    there sees the mesh, so the model's :func:`constrain` calls take effect (unless
    ``constrain_activations`` is false). A jitted ``fn`` must key its trace on that flag itself: JAX's
    trace cache does not see it."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh), activation_constraints(constrain_activations):
            return fn(*args, **kwargs)

    return call


def initialize_distributed(**kwargs) -> None:
    """Calls ``jax.distributed.initialize`` (multi-host); on CPU selects gloo collectives first."""
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
