"""A train step's gradient and every pair's gradient geometry from one forward and one backward pass.

Letters: B pairs of the (micro-)batch, 2 sides (chosen, rejected), T tokens, G parameter leaves.

The batch loss L depends on the parameters only through the pairs' summed log-probs ``s [B, 2]``, so
with ``c = ∂L/∂s`` (a ``[B, 2]`` array, cheap: the loss formula alone)

    ∇θ L = Σ_b Σ_side c[b, side] · g[b, side],      g[b, side] = ∇θ s[b, side].

:func:`jaxalign.analysis.entanglement.gram_factors` runs each pair forward once (the prompt once, the two
responses from its cache) and backward once per side with a unit cotangent, keeping for every linear use
(``dot_general``) of a weight its input ``x_t`` and output cotangent ``δ_t`` and, for the other parameters
(norm scales, biases: the *exact* leaves), their per-side gradients. From those factors:

* the update's gradient of a weight is ``Σ_{b,side,t} x_t ⊗ (c[b,side]·δ_t)`` (the product the backward
  pass of the batch loss would form; the prompt's cotangent is ``c_w·δ^w + c_l·δ^l``), of an exact leaf
  ``Σ c·g``;
* the pair's ``‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩`` are token Gram products ``Σ_{t,s}(x_t·x_s)(δ_t·δ_s)``
  (:mod:`jaxalign.analysis.entanglement_gram`) over the selected leaves.

No per-pair gradient of a weight matrix is formed (per-pair gradients exist only for the exact leaves,
which are small). Equal to ``make_pair_grads(method="exact")`` and to the plain batch gradient (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxalign import parallel
from jaxalign.analysis import entanglement as ent


@dataclasses.dataclass(frozen=True)
class StepSplit:
    """The duck-typed :class:`~jaxalign.analysis.entanglement.SplitModel` of a trainer's model:
    ``merge(diff, fixed, rest)`` rebuilds it from the trained leaves ``diff`` (``fixed`` is empty)."""

    merge_fn: Callable  # (list of trained leaves, rest) -> model

    def merge(self, diff, fixed, rest):
        del fixed
        return self.merge_fn(list(diff), rest)


class StepGeometry(NamedTuple):
    """What :func:`step_geometry` returns.

    Attributes:
      grads: per trained leaf, ``∇θ L`` (the update's gradient).
      logps: ``[B, 2]`` s_w, s_l before the update.
      coeffs: ``[B, 2]`` ``c = ∂L/∂s``.
      stats: ``[B, 3]`` ‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩ over the selected leaves (float32 or wider).
      aux: the objective's auxiliary output.
    """

    grads: list
    logps: jax.Array
    coeffs: jax.Array
    stats: jax.Array
    aux: Any


def _outer(f1, f1_is_index: bool, f2, vocab: int) -> jax.Array:
    """``Σ_t f1_t ⊗ f2_t`` ``[M, N]`` (``f1`` indices ``[T]``: rows of a ``vocab``-row table, −1 none)."""
    if f1_is_index:
        ids = jnp.where(f1 >= 0, f1, vocab)
        return jax.ops.segment_sum(f2, ids, num_segments=vocab)  # row `vocab` (no row) is dropped
    return jnp.einsum("TM,TN->MN", f1, f2, precision=jax.lax.Precision.HIGHEST)


def _to_leaf(mat_MN: jax.Array, groups, leaf_shape) -> jax.Array:
    """An ``[M, N]`` matrix over the leaf's dim groups ``(G1, G2)`` laid out as the leaf."""
    order = tuple(groups[0]) + tuple(groups[1])
    shaped = mat_MN.reshape([leaf_shape[d] for d in order])
    perm = sorted(range(len(order)), key=lambda k: order[k])
    return jnp.transpose(shaped, perm).reshape(leaf_shape)


def _site_factors(site, recorded, cot):
    """``(f1, f1_is_index, f2)`` of a site over a leading batch of rows, tokens of all rows joined."""
    def one(r, c):
        f1, _, f2 = site.factors(r, c)
        return f1, f2

    f1, f2 = jax.vmap(one)(recorded, cot)
    is_idx = site.kind == "gather"
    f1 = f1.reshape((-1,) if is_idx else (-1, f1.shape[-1]))
    return f1, is_idx, f2.reshape(-1, f2.shape[-1])


def _batch_grads(plans: ent.GramPlans, fac: ent.GramFactors, coeffs_B2: jax.Array, leaves) -> list:
    """``∇θ L = Σ c·g`` per leaf from the batch's :class:`GramFactors` (every field ``[B, ...]``)."""
    grads: list = [None] * len(leaves)
    for j, i in enumerate(plans.exact_leaves):
        g = jnp.tensordot(coeffs_B2.astype(fac.exact_grads[j].dtype), fac.exact_grads[j], axes=[[0, 1], [0, 1]])
        grads[i] = g.astype(leaves[i].dtype)
    acc: dict = {}

    def add(site, recorded, cot):
        f1, is_idx, f2 = _site_factors(site, recorded, cot)
        part = _outer(f1, is_idx, f2, site.vocab)
        acc[site.leaf] = part if site.leaf not in acc else acc[site.leaf] + part

    for k, site in enumerate(plans.prompt.sites):  # both sides' cotangents through the one prompt
        cot_B2 = fac.prompt_cots[k]
        c = coeffs_B2.reshape(coeffs_B2.shape + (1,) * (cot_B2.ndim - 2)).astype(cot_B2.dtype)
        # two products and an add, not a sum over the side axis: XLA:CPU's reduction over that middle
        # axis ran at ~12 ns/element, a fifth of the whole step (docs/benchmarks.md)
        add(site, fac.prompt_recorded[k], c[:, 0] * cot_B2[:, 0] + c[:, 1] * cot_B2[:, 1])
    for k, site in enumerate(plans.response.sites):
        cot_B2 = fac.response_cots[k]
        c = coeffs_B2.reshape(coeffs_B2.shape + (1,) * (cot_B2.ndim - 2)).astype(cot_B2.dtype)
        rec_B2 = fac.response_recorded[k]
        flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  [B, 2, ...] -> [2B, ...]
        add(site, flat(rec_B2), flat(c * cot_B2))
    for i in plans.gram_leaves:
        grads[i] = _to_leaf(acc[i], plans.prompt.leaf_groups.get(i, plans.response.leaf_groups.get(i)),
                            leaves[i].shape).astype(leaves[i].dtype)
    return grads


def step_geometry(split: StepSplit, leaves: Sequence[jax.Array], rest, batch: dict,
                  coeffs_fn: Callable, selected: Sequence[int]) -> StepGeometry:
    """The batch gradient and the per-pair geometry of one (micro-)batch from one pass.

    Args:
      split: rebuilds the model from the trained leaves and ``rest``.
      leaves: the trained parameter leaves (all of them get the update's gradient).
      rest: the model's other state (frozen weights, LoRA base weights).
      batch: the shared-prompt layout, ``[B, P]`` prompts and ``[B, R]`` responses.
      coeffs_fn: ``s [B, 2] -> (c [B, 2], aux)``: ``c = ∂L/∂s`` of the batch loss at ``s``.
      selected: indices into ``leaves`` over which the geometry is summed.

    Returns:
      :class:`StepGeometry`.
    """
    keys = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
    pairs_ = {k: jnp.asarray(batch[k]).astype(jnp.int32) for k in keys}
    P, R = pairs_["prompt_ids"].shape[1], pairs_["chosen_ids"].shape[1]
    leaves = list(leaves)
    plans = ent.gram_plans(split, leaves, [], rest, P, R)
    fac = jax.vmap(lambda pair: ent.gram_factors(plans, leaves, [], rest, pair))(pairs_)
    coeffs, aux = coeffs_fn(jax.lax.stop_gradient(fac.logps))

    def pair_stats(f):
        stats = [s for s in ent.gram_stats(plans, f, selected) if s is not None]
        dtype = jnp.result_type(jnp.float32, *[s.dtype for s in stats])
        return sum(s.astype(dtype) for s in stats)

    # Each pair's factors on its own rows, their other axes whole: with the vocabulary tables split by
    # rows (parallel.RULES) the unembedding's cotangents arrive split over fsdp × tensor while the pairs
    # are split over data × fsdp, and XLA:CPU's partitioner then gave zero Gram stats to the pairs of the
    # second data shard (tests/test_telemetry_mesh.py, mesh 2×2×2).
    fac = jax.tree.map(lambda x: parallel.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), fac)
    stats = jax.vmap(pair_stats)(fac)
    grads = _batch_grads(plans, fac, coeffs, leaves)
    return StepGeometry(grads, fac.logps, coeffs, stats, aux)
