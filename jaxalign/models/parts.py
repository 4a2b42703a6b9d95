"""A model taken apart for pure functions, and the one way jobs jit a function of a model.

:class:`ModelParts` splits an ``nnx`` model into its trainable parameters (a pure dict, what optimisers
and gradients see) and everything else, and merges them back inside traced code.

:func:`host_jit` turns ``fn(model, batch, *options) -> arrays`` into a host function
``call(batch) -> NumPy arrays``: the model is split once and its state placed by the sharding rules
(:func:`jaxalign.parallel.state_shardings`), the batch rows go over the mesh's ``data`` and ``fsdp`` axes,
and the results come back replicated, so every process can read all rows. The jitted program is keyed
by the model's structure, not its weights: two checkpoints of one architecture share compiled programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from jaxalign import parallel


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model taken apart for pure functions: ``nnx.merge(graphdef, params, rest)`` rebuilds it.

    ``abstract`` is the params' ``nnx.State`` with shape-only leaves, used to turn a pure dict back into
    a State inside jit; ``rest`` holds non-trainable variables (passed as an argument, never a constant).
    """

    graphdef: Any
    abstract: Any
    rest: Any

    @classmethod
    def split(cls, model, wrt=nnx.Param) -> tuple["ModelParts", dict]:
        """``(parts, params)`` with ``params`` the ``wrt`` leaves (default every ``nnx.Param``; LoRA
        training: ``nnx.LoRAParam``, the adapters only) as a pure nested dict."""
        graphdef, params, rest = nnx.split(model, wrt, ...)
        abstract = jax.eval_shape(lambda: params)
        return cls(graphdef, abstract, rest), nnx.to_pure_dict(params)

    def merge(self, params: dict, rest=None):
        """The model with ``params`` (a pure dict like :meth:`split`'s) and ``rest`` (default: the split's)."""
        state = jax.tree.map(lambda x: x, self.abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.rest if rest is None else rest)


def apply(fn, graphdef, options, state, batch):
    """``fn(nnx.merge(graphdef, state), batch, *options)``: the pure function :func:`host_jit` compiles
    (``fn``, ``graphdef`` and ``options`` static); ``jaxalign plan`` lowers the same one."""
    return fn(nnx.merge(graphdef, state), batch, *options)


_APPLY = jax.jit(apply, static_argnums=(0, 1, 2))


def host_jit(model, fn: Callable, *, keys: tuple[str, ...], mesh=None, options: tuple = ()
             ) -> Callable[[Mapping[str, np.ndarray]], Any]:
    """``call(batch)``: ``fn(model, {k: batch[k]}, *options)`` jitted, returning NumPy arrays.

    Args:
      model: a ``jaxalign.models`` module (split once, here).
      fn: a module-level function ``fn(model, batch: dict[str, jax.Array], *options) -> pytree`` (static:
        one compiled program per function, model structure, options and batch shape).
      keys: the batch arrays ``fn`` reads, each with rows first.
      mesh: a ``(data, fsdp, tensor)`` mesh or ``None`` (one device). With a mesh the row count must be a
        multiple of ``data × fsdp``; on several hosts every process passes the same global batch and each
        device takes its rows from its own host's copy.
      options: hashable extra arguments of ``fn``.
    """
    graphdef, state = nnx.split(model)
    to_host = lambda out: jax.tree.map(np.asarray, out)  # noqa: E731
    if mesh is None:
        return lambda batch: to_host(_APPLY(fn, graphdef, options, state, {k: batch[k] for k in keys}))

    from jax.sharding import NamedSharding, PartitionSpec

    state_sh = parallel.state_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    rows = parallel.batch_sharding(mesh, 2)
    jitted = jax.jit(apply, static_argnums=(0, 1, 2), in_shardings=(state_sh, {k: rows for k in keys}),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))

    def call(batch):
        arrays = {}
        for k in keys:
            host = np.asarray(batch[k])
            arrays[k] = jax.make_array_from_callback(host.shape, rows, lambda idx, h=host: h[idx])
        with jax.set_mesh(mesh):
            return to_host(jitted(fn, graphdef, options, state, arrays))

    return call
