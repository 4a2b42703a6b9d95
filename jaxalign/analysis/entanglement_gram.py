"""Per-example gradient inner products without per-example gradients: probes on the parameters' uses.

Letters: T tokens of one side of a pair, M one factor's size, N the other factor's size.

A weight ``W`` used as ``y_t = x_t · W`` (a ``dot_general``) at tokens ``t`` gets the per-example gradient
``G = Σ_t x_t ⊗ δ_t`` with ``δ_t = ∂s/∂y_t``, so for two examples (or two sides of a pair)
``⟨G, G'⟩ = Σ_{t,s} (x_t·x'_s)(δ_t·δ'_s)``: two ``[T, T']`` Gram matrices, ``O(T·T'·(M + N))``, and
``G`` itself (``M·N`` numbers per example) is never formed. An embedding row lookup ``y_t = E[i_t]`` is
the same with ``x_t`` the one-hot of ``i_t``, so ``x_t·x'_s = [i_t = i'_s]``; a tied unembedding
(``E`` used by a lookup and by a ``dot_general``) sums both uses, cross terms included.

Nothing in the model changes. :func:`analyse` traces a function ``f(leaves, *inputs)`` to a jaxpr and
follows every differentiated leaf through layout operations (dtype casts, transposes, unit-dim
reshapes) to its uses. A leaf whose every use is a recognised ``dot_general`` or row ``gather`` is a
*Gram leaf*; any other use (an elementwise norm scale, a bias add, a broadcast, a use inside a loop)
makes it an *exact leaf*, whose per-example gradient the caller computes directly (those are small).
:func:`probed` re-evaluates the jaxpr primitive by primitive, records the other operand of each Gram
use (``x`` or the indices) and adds a zero *probe* to its output; the cotangent of the probe is ``δ``.
Calls (``jit``, ``checkpoint``, ``custom_jvp``/``custom_vjp``) that receive a parameter are inlined.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.extend.core import primitives as P

# Operations that only re-lay a parameter out (followed symbolically; unit dims may come and go).
_CASTS = {P.convert_element_type_p, P.copy_p, P.reduce_precision_p, P.sharding_constraint_p}
# Calls whose body is inlined when a parameter enters them: primitive -> (param name, closed?).
_CALLS = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr", P.remat_p: "jaxpr",
          P.custom_jvp_call_p: "call_jaxpr", P.custom_vjp_call_p: "call_jaxpr"}


@dataclasses.dataclass(frozen=True)
class _Tag:
    """A value that is leaf ``leaf`` re-laid out: ``dims[i]`` is the leaf dim of value dim ``i``
    (``None`` for a unit dim that the leaf does not have)."""

    leaf: int
    dims: tuple


@dataclasses.dataclass(frozen=True)
class Site:
    """One Gram use of a leaf: a ``dot_general`` (``kind="dot"``) or a row lookup (``kind="gather"``).

    The leaf's gradient from this use is ``Σ_t f1_t ⊗ f2_t`` over its dims split as ``groups``
    (``groups[0]`` holds the leaf's first non-unit dim), in the leaf's own dim order, where the two
    factors are the recorded operand (``x``, or the looked-up indices) and the output cotangent ``δ``.
    """

    leaf: int
    kind: str
    groups: tuple
    x_is_f1: bool
    operand: int              # which eqn operand is recorded (the non-parameter one)
    x_perm: tuple             # transpose of the recorded operand to (tokens..., factor dims)
    out_perm: tuple           # transpose of the output to (tokens..., factor dims)
    tokens: int               # T: product of the token dims
    x_size: int
    out_size: int
    vocab: int = 0            # gather: number of rows
    fill: bool = False        # gather: out-of-range indices give zero (FILL_OR_DROP)
    out_shape: tuple = ()
    out_dtype: Any = None

    def factors(self, recorded: jax.Array, cot: jax.Array):
        """``(f1, f1_is_index, f2)`` for this use from its recorded operand and its output cotangent."""
        if self.kind == "gather":
            ids = recorded.reshape(self.tokens).astype(jnp.int32)
            if self.fill:
                ids = jnp.where((ids >= 0) & (ids < self.vocab), ids, -1)
            else:
                ids = jnp.clip(ids, 0, self.vocab - 1)
            d = jnp.transpose(cot, self.out_perm).reshape(self.tokens, self.out_size)
            return ids, True, d
        x = jnp.transpose(recorded, self.x_perm).reshape(self.tokens, self.x_size)
        d = jnp.transpose(cot, self.out_perm).reshape(self.tokens, self.out_size)
        return (x, False, d) if self.x_is_f1 else (d, False, x)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`probed` does with one traced function.

    Attributes:
      jaxpr: the traced function.
      sites: the Gram uses, in evaluation order; ``probed`` takes one probe per site.
      site_at: eqn path -> index into ``sites``.
      inline: eqn paths of calls evaluated primitive by primitive.
      gram_leaves: leaves handled by Gram products (every use is a site).
      exact_leaves: differentiated leaves with some other use (their gradients are needed directly).
      leaf_groups: leaf -> its ``(G1, G2)`` dim split (the same for every site of the leaf).
      out_tree: the pytree structure of the function's outputs.
      opaque_leaves: leaves with a use that is not a site (they must be differentiated directly).
    """

    jaxpr: Any
    sites: tuple
    site_at: dict
    inline: frozenset
    gram_leaves: tuple
    exact_leaves: tuple
    leaf_groups: dict
    out_tree: Any
    opaque_leaves: frozenset = frozenset()

    def zero_probes(self) -> list[jax.Array]:
        return [jnp.zeros(s.out_shape, s.out_dtype) for s in self.sites]


def _sub_jaxpr(eqn):
    sub = eqn.params[_CALLS[eqn.primitive]]
    if isinstance(sub, jcore.ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


def _layout(eqn, tag: _Tag, shape_in, shape_out) -> _Tag | None:
    """The tag of a re-laid-out parameter, or None when the operation is not a pure re-layout."""
    prim = eqn.primitive
    if prim in _CASTS:
        return tag
    if prim is P.transpose_p:
        return _Tag(tag.leaf, tuple(tag.dims[i] for i in eqn.params["permutation"]))
    if prim is P.squeeze_p:
        drop = {d % len(shape_in) for d in eqn.params["dimensions"]}
        return _Tag(tag.leaf, tuple(d for i, d in enumerate(tag.dims) if i not in drop))
    if prim is P.broadcast_in_dim_p:
        bdims = eqn.params["broadcast_dimensions"]
        if any(shape_in[k] != shape_out[b] for k, b in enumerate(bdims)):
            return None
        if any(shape_out[i] != 1 for i in range(len(shape_out)) if i not in bdims):
            return None
        dims = [None] * len(shape_out)
        for k, b in enumerate(bdims):
            dims[b] = tag.dims[k]
        return _Tag(tag.leaf, tuple(dims))
    if prim is P.reshape_p:
        if eqn.params.get("dimensions") is not None:
            return None
        kept_in = [(i, n) for i, n in enumerate(shape_in) if n != 1]
        kept_out = [i for i, n in enumerate(shape_out) if n != 1]
        if [n for _, n in kept_in] != [shape_out[i] for i in kept_out]:
            return None  # a genuine reshape (merging or splitting dims): not followed
        dims = [None] * len(shape_out)
        for (i, _), o in zip(kept_in, kept_out):
            dims[o] = tag.dims[i]
        return _Tag(tag.leaf, tuple(dims))
    return None


def _groups(leaf_shape, row_dims, col_dims):
    """Canonical ``(G1, G2)`` (non-unit leaf dims) and whether the row group is ``G1``."""
    row = tuple(sorted(d for d in row_dims if d is not None and leaf_shape[d] != 1))
    col = tuple(sorted(d for d in col_dims if d is not None and leaf_shape[d] != 1))
    nonunit = [d for d in range(len(leaf_shape)) if leaf_shape[d] != 1]
    if sorted(row + col) != nonunit:
        return None, False
    first = nonunit[0] if nonunit else 0
    return ((row, col), True) if first in row or not col else ((col, row), False)


def _order_key(d):
    return -1 if d is None else d


def _dot_site(eqn, tags, leaf_shapes) -> Site | None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    w = 0 if tags[0] is not None else 1
    tag = tags[w]
    w_contract, x_contract = (lc, rc) if w == 0 else (rc, lc)
    w_shape = eqn.invars[w].aval.shape
    x_shape = eqn.invars[1 - w].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    w_free = [i for i in range(len(w_shape)) if i not in w_contract]
    x_free = [i for i in range(len(x_shape)) if i not in x_contract]
    # Factor dims in the leaf's own order (unit dims anywhere).
    pairs = sorted(zip(w_contract, x_contract), key=lambda p: _order_key(tag.dims[p[0]]))
    x_perm = tuple(x_free) + tuple(x for _, x in pairs)
    # dot_general output: (lhs free..., rhs free...).
    n_xf, n_wf = len(x_free), len(w_free)
    x_pos = list(range(n_xf)) if w == 1 else list(range(n_wf, n_wf + n_xf))
    w_pos = list(range(n_xf, n_xf + n_wf)) if w == 1 else list(range(n_wf))
    w_pos_sorted = [p for _, p in sorted(zip(w_free, w_pos), key=lambda q: _order_key(tag.dims[q[0]]))]
    out_perm = tuple(x_pos) + tuple(w_pos_sorted)
    leaf_shape = leaf_shapes[tag.leaf]
    groups, x_is_f1 = _groups(leaf_shape, [tag.dims[i] for i in w_contract], [tag.dims[i] for i in w_free])
    if groups is None:
        return None
    tokens = math.prod(x_shape[i] for i in x_free)
    return Site(leaf=tag.leaf, kind="dot", groups=groups, x_is_f1=x_is_f1, operand=1 - w,
                x_perm=x_perm, out_perm=out_perm, tokens=tokens,
                x_size=math.prod(x_shape[i] for i in x_contract),
                out_size=math.prod(w_shape[i] for i in w_free),
                out_shape=tuple(out_shape), out_dtype=eqn.outvars[0].aval.dtype)


def _gather_site(eqn, tags, leaf_shapes) -> Site | None:
    tag = tags[0]
    leaf_shape = leaf_shapes[tag.leaf]
    if tags[1] is not None or tag.dims != tuple(range(len(leaf_shape))) or len(leaf_shape) < 2:
        return None
    dn = eqn.params["dimension_numbers"]
    if (tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
            or dn.operand_batching_dims or tuple(eqn.params["slice_sizes"]) != (1,) + leaf_shape[1:]):
        return None
    idx_shape = eqn.invars[1].aval.shape
    if not idx_shape or idx_shape[-1] != 1:
        return None
    out_shape = eqn.outvars[0].aval.shape
    offset = list(dn.offset_dims)
    batch_pos = [i for i in range(len(out_shape)) if i not in offset]
    groups, _ = _groups(leaf_shape, [0], list(range(1, len(leaf_shape))))
    if groups is None or groups[0] != (0,):
        return None
    mode = eqn.params["mode"]
    fill = mode == jax.lax.GatherScatterMode.FILL_OR_DROP
    return Site(leaf=tag.leaf, kind="gather", groups=groups, x_is_f1=True, operand=1, x_perm=(),
                out_perm=tuple(batch_pos) + tuple(offset), tokens=math.prod(idx_shape[:-1]),
                x_size=leaf_shape[0], out_size=math.prod(leaf_shape[1:]), vocab=leaf_shape[0],
                fill=fill, out_shape=tuple(out_shape), out_dtype=eqn.outvars[0].aval.dtype)


def analyse(fn: Callable, leaves: Sequence[Any], *inputs) -> Plan:
    """Traces ``fn(leaves, *inputs)`` and classifies each of ``leaves`` as a Gram or an exact leaf.

    Args:
      fn: a pure function of a list of differentiated parameter arrays and other inputs (pytrees).
      leaves: the differentiated parameters (arrays or ``jax.ShapeDtypeStruct``).
      *inputs: the other arguments (arrays or ``ShapeDtypeStruct``), never followed.

    Returns:
      the :class:`Plan` that :func:`probed` executes.
    """
    leaves = list(leaves)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(leaves, *inputs)
    out_tree = jax.tree.structure(out_shape)
    leaf_shapes = [tuple(l.shape) for l in leaves]
    sites: list[Site] = []
    site_at: dict = {}
    inline: set = set()
    opaque: set = set()

    def walk(jaxpr, in_tags, path):
        env: dict = {}
        for v, t in zip(jaxpr.invars, in_tags):
            if t is not None:
                env[v] = t
        get = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)  # noqa: E731
        for i, eqn in enumerate(jaxpr.eqns):
            tags = [get(v) for v in eqn.invars]
            if all(t is None for t in tags):
                continue
            p = path + (i,)
            prim = eqn.primitive
            if prim in _CALLS:
                sub, _ = _sub_jaxpr(eqn)
                inline.add(p)
                out_tags = walk(sub, tags, p)
                for v, t in zip(eqn.outvars, out_tags):
                    if t is not None:
                        env[v] = t
                continue
            site = None
            if prim is P.dot_general_p and sum(t is not None for t in tags) == 1:
                site = _dot_site(eqn, tags, leaf_shapes)
            elif prim is P.gather_p:
                site = _gather_site(eqn, tags, leaf_shapes)
            elif len(eqn.invars) == 1 and len(eqn.outvars) == 1:
                new = _layout(eqn, tags[0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)
                if new is not None:
                    env[eqn.outvars[0]] = new
                    continue
            if site is None:
                opaque.update(t.leaf for t in tags if t is not None)
                continue
            site_at[p] = len(sites)
            sites.append(site)
        return [get(v) for v in jaxpr.outvars]

    outs = walk(closed.jaxpr, [_Tag(i, tuple(range(len(s)))) for i, s in enumerate(leaf_shapes)]
                + [None] * (len(closed.jaxpr.invars) - len(leaves)), ())
    opaque.update(t.leaf for t in outs if t is not None)
    # A leaf whose uses split its dims in different ways is not a Gram leaf either.
    leaf_groups: dict = {}
    for s in sites:
        if leaf_groups.setdefault(s.leaf, s.groups) != s.groups:
            opaque.add(s.leaf)
    used = {s.leaf for s in sites}
    gram = tuple(sorted(used - opaque))
    exact = tuple(i for i in range(len(leaves)) if i not in gram)
    keep = [k for k, s in enumerate(sites) if s.leaf in gram]
    renum = {k: j for j, k in enumerate(keep)}
    return Plan(jaxpr=closed, sites=tuple(sites[k] for k in keep),
                site_at={p: renum[k] for p, k in site_at.items() if k in renum},
                inline=frozenset(inline), gram_leaves=gram, exact_leaves=exact,
                leaf_groups={i: leaf_groups[i] for i in gram}, out_tree=out_tree,
                opaque_leaves=frozenset(opaque))


def probed(plan: Plan, probes: Sequence[jax.Array], leaves: Sequence[Any], *inputs,
           gather: Callable[[jax.Array], jax.Array] | None = None):
    """Evaluates the planned function with ``probes`` added to the Gram uses' outputs.

    ``gather``: for parameters stored sharded (FSDP), the function that makes a parameter whole
    (e.g. a sharding constraint to replicated). Each Gram use then gathers its parameter right before
    the use, inside a ``jax.checkpoint`` so that the backward pass gathers it again rather than keeping
    every whole parameter alive from the forward pass to the backward one.

    Returns:
      ``(outputs, recorded)``: the function's outputs (its own pytree) and, per site, the recorded
      operand (the layer input ``x`` or the looked-up indices).
    """
    closed = plan.jaxpr
    recorded: list = [None] * len(plan.sites)

    def run(jaxpr, consts, args, path):
        env: dict = {}
        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
        for i, eqn in enumerate(jaxpr.eqns):
            p = path + (i,)
            invals = [read(v) for v in eqn.invars]
            if p in plan.inline:
                sub, sub_consts = _sub_jaxpr(eqn)
                outs = run(sub, sub_consts, invals, p)
            else:
                k = plan.site_at.get(p)
                with eqn.ctx.manager:
                    if k is not None and gather is not None:
                        ans = _gathered_use(eqn, invals, plan.sites[k], gather)
                    else:
                        ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                outs = ans if eqn.primitive.multiple_results else [ans]
                if k is not None:
                    recorded[k] = invals[plan.sites[k].operand]
                    outs = [outs[0] + probes[k].astype(outs[0].dtype)]
            for v, x in zip(eqn.outvars, outs):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    flat_in = jax.tree.leaves((list(leaves), *inputs))
    outs = run(closed.jaxpr, closed.consts, flat_in, ())
    return jax.tree.unflatten(plan.out_tree, outs), recorded


def _gathered_use(eqn, invals, site: Site, gather):
    """One Gram use with its parameter operand gathered first (:func:`probed`'s ``gather``)."""
    w = 0 if site.kind == "gather" else 1 - site.operand  # the parameter's operand position
    params = eqn.primitive.get_bind_params(eqn.params)

    def use(x, w_part):
        vals = list(invals)
        vals[site.operand], vals[w] = x, gather(w_part)
        return eqn.primitive.bind(*vals, **params)

    return jax.checkpoint(use)(invals[site.operand], invals[w])


# --- Gram products ----------------------------------------------------------------------------------

def _kernel(a, a_idx: bool, b, b_idx: bool) -> jax.Array:
    """``[Ta, Tb]`` inner products of two factor lists (dense ``[T, M]`` or indices ``[T]``)."""
    if a_idx and b_idx:
        return ((a[:, None] == b[None, :]) & (a[:, None] >= 0)).astype(jnp.float32)
    if a_idx:
        return _kernel(b, b_idx, a, a_idx).T
    if b_idx:
        cols = jnp.take(a, jnp.maximum(b, 0), axis=1)           # [Ta, Tb]
        return jnp.where(b[None, :] >= 0, cols, 0)
    return jnp.einsum("TM,SM->TS", a, b, precision=jax.lax.Precision.HIGHEST)


def merge_segments(segments):
    """Concatenates a side's segments of the same kind along tokens: at most two remain."""
    out = []
    for is_idx in (False, True):
        group = [s for s in segments if s[1] == is_idx]
        if group:
            out.append((jnp.concatenate([s[0] for s in group], 0), is_idx,
                        jnp.concatenate([s[2] for s in group], 0)))
    return out


def inner(segments_a, segments_b) -> jax.Array:
    """``⟨G_a, G_b⟩`` for ``G = Σ_segments Σ_t f1_t ⊗ f2_t`` (factor lists from :meth:`Site.factors`)."""
    total = 0.0
    for f1a, ia, f2a in segments_a:
        for f1b, ib, f2b in segments_b:
            k1 = _kernel(f1a, ia, f1b, ib)
            k2 = _kernel(f2a, False, f2b, False)
            total = total + jnp.sum(k1.astype(k2.dtype) * k2)
    return total


@dataclasses.dataclass(eq=False)
class Segment:
    """One use's factors on one stage of a pair: the forward factor (``x`` or indices) and the output
    cotangent of each side it belongs to (``cots["w"]``, ``cots["l"]``: both for the shared prompt)."""

    fwd: jax.Array
    fwd_is_index: bool
    fwd_is_f1: bool
    cots: dict


def segment(site: Site, recorded: jax.Array, cots: Mapping) -> Segment:
    """The :class:`Segment` of ``site`` from its recorded operand and its output cotangents by side."""
    out = {}
    fwd = None
    for side, cot in cots.items():
        f1, f1_idx, f2 = site.factors(recorded, cot)
        fwd, cot_f = (f1, f2) if site.x_is_f1 else (f2, f1)
        out[side] = cot_f
    return Segment(fwd, site.kind == "gather", site.x_is_f1, out)


def pair_inners(segments: Sequence[Segment]) -> jax.Array:
    """``[‖G_w‖², ‖G_l‖², ⟨G_w, G_l⟩]`` of one leaf, ``G_side = Σ`` over the segments holding that side.

    The forward-factor kernel of two segments is computed once and reused by every side pairing (the
    prompt's ``x·xᵀ`` block serves ``ww``, ``ll`` and ``wl``), which saves a third or more of the work on
    linear layers; symmetric terms are computed once.
    """
    fwd_cache: dict = {}

    def fwd_kernel(u, v):
        key = (id(u), id(v))
        if key not in fwd_cache:
            fwd_cache[key] = _kernel(u.fwd, u.fwd_is_index, v.fwd, v.fwd_is_index)
        return fwd_cache[key]

    def term(u, a, v, b):
        if u.fwd_is_f1 == v.fwd_is_f1:
            k1 = fwd_kernel(u, v)
            k2 = _kernel(u.cots[a], False, v.cots[b], False)
        else:  # the two uses lay the leaf out the other way round: pair u's forward with v's cotangent
            k1 = _kernel(u.fwd, u.fwd_is_index, v.cots[b], False)
            k2 = _kernel(u.cots[a], False, v.fwd, v.fwd_is_index)
        return jnp.sum(k1.astype(k2.dtype) * k2)

    def side(a, b):
        total = 0.0
        for i, u in enumerate(segments):
            if a not in u.cots:
                continue
            for j, v in enumerate(segments):
                if b not in v.cots or (a == b and j < i):
                    continue
                t = term(u, a, v, b)
                total = total + (2 * t if (a == b and j > i) else t)
        return total

    return jnp.stack([side("w", "w"), side("l", "l"), side("w", "l")])
