"""Scan over layers (run config ``model.scan_layers: true``): one block's parameters stacked on a leading
layer axis and run with ``jax.lax.scan``, so a compiled program holds one copy of the block, not ``L``.

Letters: L layers, B batch, T new tokens, S cache slots, D model width, K key/value heads, H head dim.

:func:`stack_layers` turns the ``L`` blocks of a built model (``nnx.List``) into a :class:`ScannedLayers`
holding a single block whose every variable has shape ``[L, …]`` and logical axes ``("layers", …)`` (the
``layers`` axis is never sharded: :data:`jaxalign.parallel.RULES`); :func:`unstack_layers` undoes it.
The blocks must have the same structure: same parameters and the same static options (window, RoPE
scaling, dense or mixture-of-experts MLP); a block's own index (its ``layer`` attribute, used only to pick
its entry of a KV cache) is set to 0, because the scanned block sees a one-layer view of the cache.

:func:`run_scanned` is the forward pass: the carry is the residual stream ``[B, T, D]``, the scanned inputs
are the block's ``[L, …]`` variables and, with a KV cache, the stacked keys and values ``[L, B, S, K, H]``;
the block runs through the model's layer runner (rematerialised with its policy, the activation
constraints kept), so the backward pass saves one ``[B, T, D]`` carry per layer under full remat.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.errors import ModelError

LAYER_AXIS = "layers"


class ScannedLayers(nnx.Module):
    """``L`` blocks as one: ``block`` is a block whose variables carry a leading ``[L]`` axis."""

    def __init__(self, block: nnx.Module, num_layers: int):
        self.block = block
        self.num_layers = num_layers

    def __len__(self) -> int:
        return self.num_layers


def _stack_values(values: Sequence) -> jax.Array | jax.ShapeDtypeStruct:
    """``[L, …]`` from ``L`` equal-shaped arrays, or a shape-only struct from shape-only ones."""
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values),) + tuple(first.shape), first.dtype)
    return jnp.stack(values)


def _relabel(state: nnx.State, add: bool) -> None:
    """Adds (or removes) the leading ``"layers"`` logical axis of every variable in ``state``, in place."""
    for _, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            continue
        var.set_metadata(logical_axes=(LAYER_AXIS, *axes) if add else tuple(axes[1:]))


def _set_index(block: nnx.Module, layer: int) -> nnx.Module:
    """``block`` with every sub-module's ``layer`` index set to ``layer`` (0: the scanned block's view of
    the cache holds one layer)."""
    for _, node in nnx.iter_graph(block):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "layer", None), int):
            node.layer = layer
    return block


def stack_layers(layers: Sequence[nnx.Module]) -> ScannedLayers:
    """One :class:`ScannedLayers` from ``L`` blocks of the same structure (``ModelError`` otherwise).

    The blocks' variables are copied into ``[L, …]`` arrays (shape-only structs stay shape-only)."""
    if isinstance(layers, ScannedLayers):
        return layers
    splits = [nnx.split(_set_index(layer, 0)) for layer in layers]
    graphdef = splits[0][0]
    for i, (other, _) in enumerate(splits[1:], start=1):
        if other != graphdef:
            for j, layer in enumerate(layers):  # the blocks stay as they were, each with its own index
                _set_index(layer, j)
            raise ModelError(f"model.scan_layers: layer {i} differs from layer 0 in its parameters or "
                             "options (e.g. a mixture-of-experts MLP beside dense ones, a per-layer attention "
                             "scale); this model's layers cannot be scanned, set model.scan_layers=false")
    stacked = jax.tree.map(lambda *xs: _stack_values(xs), *[state for _, state in splits])
    _relabel(stacked, add=True)
    return ScannedLayers(nnx.merge(graphdef, stacked), len(layers))


def unstack_layers(scanned: ScannedLayers) -> nnx.List:
    """The ``L`` blocks of a :class:`ScannedLayers`, block ``i`` with its ``layer`` index ``i`` again."""
    graphdef, state = nnx.split(scanned.block)

    def layer(i: int) -> nnx.Module:
        state_i = jax.tree.map(lambda x: x[i], state)  # new variables: the stacked ones keep their axes
        _relabel(state_i, add=False)
        return _set_index(nnx.merge(graphdef, state_i), i)

    return nnx.List([layer(i) for i in range(scanned.num_layers)])


def per_layer_inputs(layer_args: Sequence[tuple]):
    """The blocks' inputs as scan operands: ``(shared, None)`` when every block gets the same objects,
    else ``(stacked, index_L)`` with the ``U`` distinct input tuples stacked ``[U, …]`` and block ``l``
    taking entry ``index_L[l]`` (Gemma 2: sliding-window and full-attention masks, ``U = 2``)."""
    keys = [tuple(id(leaf) for leaf in jax.tree.leaves(args)) for args in layer_args]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == 1:
        return layer_args[0], None
    firsts = [layer_args[keys.index(k)] for k in distinct]
    if len({jax.tree.structure(a) for a in firsts}) > 1 or any(
            [x.shape for x in jax.tree.leaves(a)] != [x.shape for x in jax.tree.leaves(firsts[0])] for a in firsts):
        raise ModelError("model.scan_layers: the layers' inputs (masks, RoPE tables) differ in shape; this "
                         "model's layers cannot be scanned, set model.scan_layers=false")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *firsts)
    return stacked, jnp.asarray([distinct.index(k) for k in keys], jnp.int32)


def run_scanned(run: Callable, scanned: ScannedLayers, x_BTD: jax.Array, layer_args: Sequence[tuple], cache, *,
                collect_hidden: bool = False):
    """``run(block, x_BTD, *layer_args[l], cache)`` for each of the ``L`` stacked blocks in turn, with
    ``lax.scan``.

    Args:
      run: the model's layer runner (``DecoderLM.layer_runner``): returns ``(x_BTD, cache)``.
      scanned: the stacked blocks.
      x_BTD: the embeddings' output.
      layer_args: block ``l``'s inputs (positions, RoPE frequencies, mask), one tuple per block; blocks
        whose inputs are other objects (alternating windows) select theirs inside the loop
        (:func:`per_layer_inputs`).
      cache: ``None`` or a ``KVCache`` with ``L`` layers of keys/values ``[B, S, K, H]``.
      collect_hidden: also return each block's output.

    Returns:
      ``(x_BTD, hidden, cache)``: the last block's output, a list of the ``L`` block outputs (or ``None``)
      and the cache with every layer's new keys and values written.
    """
    graphdef, state = nnx.split(scanned.block)
    kv = None if cache is None else (jnp.stack(cache.keys), jnp.stack(cache.values))
    inputs, index_L = per_layer_inputs(layer_args)

    def body(x_BTD, xs):
        state_l, kv_l, index = xs
        args = inputs if index is None else jax.tree.map(lambda a: a[index], inputs)
        view = None if kv_l is None else cache.replace(keys=(kv_l[0],), values=(kv_l[1],))
        x_BTD, view = run(nnx.merge(graphdef, state_l), x_BTD, *args, view)
        new_kv = None if view is None else (view.keys[0], view.values[0])
        return x_BTD, (x_BTD if collect_hidden else None, new_kv)

    x_BTD, (hidden_LBTD, kv) = jax.lax.scan(body, x_BTD, (state, kv, index_L))
    hidden = None if hidden_LBTD is None else list(hidden_LBTD)
    if cache is not None:
        cache = cache.replace(keys=tuple(kv[0]), values=tuple(kv[1]))
    return x_BTD, hidden, cache
