"""Gradient entanglement (Yuan et al., ICLR 2025): per pair ‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩ and what they predict.

Letters: B pairs, C pairs per chunk, P prompt length, R response length (EOS included), D model width,
V vocabulary, G parameter groups (one per parameter array, "leaf").

With s_w, s_l the summed response log-probs of a pair (DESIGN §3), g_w = ∇θ s_w and g_l = ∇θ s_l, and
``(w_c, w_r) = jaxalign.losses.margin_weights(loss, ...)`` (−∂ℓ/∂s_w, +∂ℓ/∂s_l), one SGD step of size η
on **that pair alone** moves θ by η(w_c g_w − w_r g_l), so to first order

    Δs_w ≈ η (w_c ‖g_w‖² − w_r ⟨g_w, g_l⟩),    Δs_l ≈ η (w_c ⟨g_w, g_l⟩ − w_r ‖g_l‖²).

The *case* of a pair is the sign pattern of the two: ``ideal`` (chosen up, rejected down), ``both_down``,
``both_up``, ``inverted`` (chosen down, rejected up); a change of exactly 0 counts as up for the chosen
and as down for the rejected (the paper's non-strict conditions). A batch step is the **mean** over its
pairs, so it moves each pair also through the other pairs' gradients: the per-pair predictions describe a
step on one pair, not the batch step (:func:`predict` docstring).

Three methods compute the same numbers (tested equal to brute force and to PyTorch):

``exact``
    ``jax.vmap`` over the pairs of a chunk of the per-pair gradients, materialised: the prompt runs once,
    both responses continue from its KV cache, the two response backward passes run batched and so do the
    two backward passes through the shared prompt. Per-leaf breakdown. Memory ``C × 2 × |θ|``.
``jvp``
    one reverse pass for g_l, then forward mode ``jax.jvp`` of s_w along g_l gives ⟨g_w, g_l⟩, and a reverse
    pass for s_w gives ‖g_w‖²: one gradient alive at a time. Totals only.
``gram``
    one forward and one (batched) backward pass; every ``dot_general`` weight's per-example gradient is
    ``Σ_t x_t ⊗ δ_t``, so inner products come from token Gram matrices of layer inputs and output
    cotangents, found by tracing the model (:mod:`jaxalign.analysis.entanglement_gram`); embedding
    lookups likewise (index equality). Norm scales, biases and any other parameter use are differentiated
    exactly (they are small). No per-example gradient of a weight matrix is formed. Per-leaf breakdown.
``auto``
    ``gram`` when its token Gram products cost less than forming the weight gradients (short sequences
    relative to the layer widths, which is the usual case), else ``exact``; ``jvp`` when ``exact`` is
    chosen but two gradients per pair do not fit the memory budget.

Entry points: :func:`make_pair_grads` (a reusable jitted ``batch -> results`` function, the batch sharded over a
mesh), :func:`entanglement` (one batch, with margin weights and predictions), :func:`predict`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Collection, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import logprobs, pairs, parallel
from jaxalign.analysis import entanglement_gram as gram_lib
from jaxalign.errors import ConfigError

METHODS = ("auto", "exact", "jvp", "gram")
CASES = ("ideal", "both_down", "both_up", "inverted")
#: ``--params lora``: the LoRA adapters (``nnx.LoRAParam`` leaves) only.
LORA = "lora"
BATCH_FIELDS = pairs.KEYS


# --- predictions ------------------------------------------------------------------------------------

def predict(chosen_sqnorm, rejected_sqnorm, inner, weight_chosen, weight_rejected, lr: float = 1.0):
    """First-order changes of s_w and s_l after one SGD step of size ``lr`` on one pair, and the case.

    Δs_w = lr·(w_c‖g_w‖² − w_r⟨g_w,g_l⟩), Δs_l = lr·(w_c⟨g_w,g_l⟩ − w_r‖g_l‖²); the case index into
    :data:`CASES` is 0 ideal (Δs_w ≥ 0, Δs_l ≤ 0), 1 both_down, 2 both_up, 3 inverted. For a batch the
    actual step is the mean over pairs; these are the predictions for a step on each pair alone.

    Args:
      chosen_sqnorm, rejected_sqnorm, inner: ``[B]`` ‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩.
      weight_chosen, weight_rejected: ``[B]`` from :func:`jaxalign.losses.margin_weights`.
      lr: the step size η.

    Returns:
      ``(dlogp_chosen [B], dlogp_rejected [B], case [B] int32)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> dw, dl, case = predict(jnp.array([1.0, 1.0]), jnp.array([4.0, 4.0]), jnp.array([0.5, 2.0]),
      ...                        jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0]))
      >>> dw.tolist(), dl.tolist(), [CASES[i] for i in case.tolist()]
      ([0.5, -1.0], [-3.5, -2.0], ['ideal', 'both_down'])
    """
    dw = lr * (weight_chosen * chosen_sqnorm - weight_rejected * inner)
    dl = lr * (weight_chosen * inner - weight_rejected * rejected_sqnorm)
    up = dw >= 0
    down = dl <= 0
    case = jnp.where(up, jnp.where(down, 0, 2), jnp.where(down, 1, 3)).astype(jnp.int32)
    return dw, dl, case


def cosine(chosen_sqnorm, rejected_sqnorm, inner):
    """⟨g_w, g_l⟩ / (‖g_w‖ ‖g_l‖), 0 where a gradient is zero."""
    denom = jnp.sqrt(chosen_sqnorm) * jnp.sqrt(rejected_sqnorm)
    return jnp.where(denom > 0, inner / jnp.where(denom > 0, denom, 1), 0.0)


# --- the model as flat pure functions ---------------------------------------------------------------

def _key_name(k) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name == "value" else k.name
    return str(k)


def leaf_name(path) -> str:
    """Dotted name of a parameter from its pytree path, e.g. ``layers.3.attn.q_proj.kernel``."""
    return ".".join(n for n in map(_key_name, path) if n is not None)


def select(names: Sequence[str], params: str | Sequence[str] | None = None,
           last_blocks: int | None = None, lora_names: Collection[str] = ()) -> tuple[int, ...]:
    """Indices of the parameters to probe: names matching any of ``params`` (regular expressions,
    ``re.search``; ``None`` for all) and, with ``last_blocks=n``, inside the last ``n`` blocks
    (``layers.{i}.``). The word :data:`LORA` among ``params`` keeps only the LoRA adapters (the names in
    ``lora_names``); the other patterns then choose among them.

    >>> select(["embed.embedding", "layers.0.attn.q_proj.kernel", "layers.1.attn.q_proj.kernel",
    ...         "layers.1.mlp.up_proj.kernel"], r"q_proj", last_blocks=1)
    (2,)

    Raises:
      ConfigError: a pattern that is not a regular expression, or a selection that is empty.
    """
    keep = list(range(len(names)))
    patterns = None if params is None else [params] if isinstance(params, str) else list(params)
    if patterns is not None and LORA in patterns:
        if not lora_names:
            raise ConfigError(f"--params {LORA}: the model has no LoRA adapters (load some with --adapter "
                              "PATH, a PEFT adapter folder)")
        keep = [i for i in keep if names[i] in lora_names]
        patterns = [p for p in patterns if p != LORA] or None
    if patterns is not None:
        try:
            regexes = [re.compile(p) for p in patterns]
        except re.error as err:
            raise ConfigError(f"--params: {err.pattern!r} is not a regular expression ({err})") from None
        keep = [i for i in keep if any(r.search(names[i]) for r in regexes)]
    if last_blocks is not None:
        blocks = {i: int(m.group(1)) for i, n in enumerate(names) if (m := re.match(r"layers\.(\d+)\.", n))}
        if last_blocks < 1 or not blocks:
            raise ConfigError(f"--last-blocks {last_blocks}: needs N >= 1 and a model with layers.<i>. "
                              "parameters")
        if last_blocks > max(blocks.values()) + 1:
            raise ConfigError(f"--last-blocks {last_blocks}: the model has {max(blocks.values()) + 1} blocks")
        first = max(blocks.values()) + 1 - last_blocks
        keep = [i for i in keep if blocks.get(i, -1) >= first]
    if not keep:
        raise ConfigError(f"--params {params!r} / --last-blocks {last_blocks!r} select no parameter; names "
                          f"look like {', '.join(list(names)[:4])}, …")
    return tuple(keep)


def _for_tpu() -> bool:
    """Whether the program being traced is for a TPU (``jaxalign plan --topology`` traces on the host)."""
    return parallel.target_platform() == "tpu"


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """A model as ``graphdef`` + parameter leaves (differentiated subset ``selected``) + other state."""

    graphdef: Any
    treedef: Any
    names: tuple[str, ...]
    selected: tuple[int, ...]
    leaves: tuple
    rest: Any
    axes: tuple = ()  # per leaf, its logical axes (``nnx.Param`` metadata; ``None`` where it has none)

    @property
    def selected_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.selected)

    def split_leaves(self, leaves):
        sel = set(self.selected)
        diff = [leaves[i] for i in self.selected]
        fixed = [leaves[i] for i in range(len(leaves)) if i not in sel]
        return diff, fixed

    def diff_shardings(self, mesh) -> list:
        """The differentiated leaves' shardings on ``mesh`` by the model's sharding rules (as training
        places them: FSDP and tensor axes)."""
        axes = self.axes or (None,) * len(self.names)
        return [parallel.named_sharding(axes[i], self.leaves[i].shape, mesh) for i in self.selected]

    def merge(self, diff, fixed, rest):
        from flax import nnx

        sel = set(self.selected)
        it_d, it_f = iter(diff), iter(fixed)
        leaves = [next(it_d) if i in sel else next(it_f) for i in range(len(self.names))]
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves), rest)


def split_model(model, params: str | Sequence[str] | None = None,
                last_blocks: int | None = None) -> SplitModel:
    """Splits ``model`` into its parameter leaves and the rest; :func:`select` picks the probed ones.

    Args:
      model: a ``jaxalign.models`` causal LM (``flax.nnx`` module).
      params: ``None`` for every parameter (base weights and adapters), or regular expressions of which
        one must match a parameter's dotted name (:func:`leaf_name`), e.g. ``r"attn\\.[qkv]_proj"``;
        ``"lora"`` among them: only the ``nnx.LoRAParam`` leaves (LoRA's ``A`` and ``B``).
      last_blocks: only parameters of the last ``n`` blocks.
    """
    from flax import nnx

    from jaxalign.models import lora

    graphdef, state, rest = nnx.split(model, nnx.Param, ...)  # LoRAParam is a kind of Param: both
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = tuple(leaf_name(p) for p, _ in flat)
    leaves = tuple(v for _, v in flat)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    axes = tuple(getattr(v, "logical_axes", None) for v in variables) if len(variables) == len(leaves) else ()
    selected = select(names, params, last_blocks, lora.adapter_names(model, leaf_name))
    return SplitModel(graphdef, treedef, names, selected, leaves, rest, axes)


def _float_split(tree):
    """``(float leaves, non-float leaves, rebuild)`` of a pytree (the KV cache: keys/values vs ints)."""
    leaves, tdef = jax.tree.flatten(tree)
    is_f = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
    floats = [x for x, f in zip(leaves, is_f) if f]
    others = [x for x, f in zip(leaves, is_f) if not f]

    def rebuild(fl, ot):
        it_f, it_o = iter(fl), iter(ot)
        return jax.tree.unflatten(tdef, [next(it_f) if f else next(it_o) for f in is_f])

    return floats, others, rebuild


def prompt_stage(sm: SplitModel, diff, fixed, rest, prompt_ids_P, prompt_mask_P, total: int):
    """One prompt into a KV cache of ``total`` slots: ``(cache, h_last [D])`` (:func:`pairs.encode_prompt`,
    B = 1, so that it vmaps over the pairs)."""
    P = prompt_ids_P.shape[0]
    prompt = pairs.encode_prompt(sm.merge(diff, fixed, rest), prompt_ids_P[None], prompt_mask_P[None],
                                 response_length=total - P)
    return prompt.cache, prompt.last_hidden()[0]


def response_stage(sm: SplitModel, diff, fixed, rest, cache, h_last_D, ids_R, mask_R):
    """Token log-probs ``[R]`` (0 on padding) of one response continuing the prompt's cache
    (:func:`pairs.continue_responses`); their sum is s.

    Response token ``k`` is predicted by ``h_last`` for ``k = 0`` and by the response position ``k − 1``
    otherwise (DESIGN §3).
    """
    model = sm.merge(diff, fixed, rest)
    prompt = pairs.PromptEncoding(cache, None, None)
    out = pairs.continue_responses(model, prompt, ids_R[None], mask_R[None])
    first_1, next_1R = pairs.response_logprobs(model, h_last_D[None].astype(out.hidden.dtype), out.hidden,
                                               ids_R[None], chunk_size=None)
    lp_R = jnp.concatenate([first_1, next_1R[0, :-1]], axis=0)
    return jnp.where(mask_R.astype(bool), lp_R, 0.0)


def _sum_sq(tree):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


# --- per-pair computations (vmapped over the pairs of a chunk) --------------------------------------

def pair_grads(sm: SplitModel, diff, fixed, rest, pair):
    """Per-leaf gradients ``[2, *leaf]`` (chosen, rejected) and ``s`` ``[2]`` of one pair, materialised.

    The prompt runs once; the two responses continue from its cache as a batch of two, their backward
    passes run batched, then the two cache cotangents go back through the prompt in one batched pass.
    """
    P, R = pair["prompt_ids"].shape[0], pair["chosen_ids"].shape[0]

    def prompt_fn(d):
        cache, h = prompt_stage(sm, d, fixed, rest, pair["prompt_ids"], pair["prompt_mask"], P + R)
        fl, ot, rebuild = _float_split(cache)
        return (fl, h), (ot, rebuild)

    (fl, h), prompt_vjp, (ot, rebuild) = _vjp_aux(prompt_fn, diff)

    def one(ids, mask):
        def f(d, fl_h):
            cache = rebuild(fl_h[0], ot)
            tok = response_stage(sm, d, fixed, rest, cache, fl_h[1], ids, mask)
            return jnp.sum(tok)

        s, vjp = jax.vjp(f, diff, (fl, h))
        g_d, g_c = vjp(jnp.ones_like(s))
        return s, g_d, g_c

    ids2 = jnp.stack([pair["chosen_ids"], pair["rejected_ids"]])
    mask2 = jnp.stack([pair["chosen_mask"], pair["rejected_mask"]])
    s2, g_resp2, g_cache2 = jax.vmap(one)(ids2, mask2)
    (g_prompt2,) = jax.vmap(prompt_vjp)(g_cache2)
    return [a + b for a, b in zip(g_resp2, g_prompt2)], s2


def _leaf_stats(g2) -> jax.Array:
    gw, gl = g2[0].ravel(), g2[1].ravel()
    return jnp.stack([jnp.vdot(gw, gw), jnp.vdot(gl, gl), jnp.vdot(gw, gl)])


def _pair_exact(sm, diff, fixed, rest, pair):
    """Per-leaf ``(‖g_w‖², ‖g_l‖², ⟨g_w,g_l⟩)`` ``[3, G]`` and ``s`` ``[2]`` of one pair."""
    grads, s2 = pair_grads(sm, diff, fixed, rest, pair)
    return jnp.stack([_leaf_stats(g) for g in grads], axis=1), s2


def _vjp_aux(fn, *primals):
    """``jax.vjp`` with a Python-object aux (the cache rebuild function) passed through by closure."""
    box = {}

    def wrapped(*args):
        out, (arrays, extra) = fn(*args)
        box["extra"] = extra
        return out, arrays

    out, vjp, arrays = jax.vjp(wrapped, *primals, has_aux=True)
    return out, vjp, (arrays, box["extra"])


def _pair_jvp(sm, diff, fixed, rest, pair):
    """Totals ``[3, 1]`` and ``s`` ``[2]`` by two reverse passes and one forward-mode pass."""
    P, R = pair["prompt_ids"].shape[0], pair["chosen_ids"].shape[0]

    def s_of(d, which):
        cache, h = prompt_stage(sm, d, fixed, rest, pair["prompt_ids"], pair["prompt_mask"], P + R)
        return jnp.sum(response_stage(sm, d, fixed, rest, cache, h, pair[f"{which}_ids"],
                                      pair[f"{which}_mask"]))

    s_l, g_l = jax.value_and_grad(lambda d: s_of(d, "rejected"))(diff)
    sq_l = _sum_sq(g_l)
    s_w, inner = jax.jvp(lambda d: s_of(d, "chosen"), (diff,), (g_l,))
    sq_w = _sum_sq(jax.grad(lambda d: s_of(d, "chosen"))(diff))
    return jnp.stack([sq_w, sq_l, inner])[:, None], jnp.stack([s_w, s_l])


@dataclasses.dataclass(frozen=True)
class GramPlans:
    """The two stages' plans with a common split of the selected leaves into Gram and exact leaves."""

    prompt: gram_lib.Plan
    response: gram_lib.Plan
    gram_leaves: tuple
    exact_leaves: tuple


def _restrict(plan: gram_lib.Plan, gram_leaves) -> gram_lib.Plan:
    keep = [k for k, s in enumerate(plan.sites) if s.leaf in gram_leaves]
    renum = {k: j for j, k in enumerate(keep)}
    return dataclasses.replace(
        plan, sites=tuple(plan.sites[k] for k in keep),
        site_at={p: renum[k] for p, k in plan.site_at.items() if k in renum},
        gram_leaves=tuple(gram_leaves),
        leaf_groups={i: g for i, g in plan.leaf_groups.items() if i in gram_leaves})


def gram_plans(sm: SplitModel, diff, fixed, rest, P: int, R: int, dtypes=None) -> GramPlans:
    """Traces both stages for prompts of ``P`` and responses of ``R`` tokens and splits the leaves."""
    sds = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))  # noqa: E731
    diff_s = [sds(x) for x in diff]
    fixed_s, rest_s = jax.tree.map(sds, (list(fixed), rest))
    ids_p = jax.ShapeDtypeStruct((P,), jnp.int32)
    ids_r = jax.ShapeDtypeStruct((R,), jnp.int32)

    def prompt_flat(d, f, r, ids, mask):
        return prompt_stage(sm, d, f, r, ids, mask, P + R)

    plan_p = gram_lib.analyse(prompt_flat, diff_s, fixed_s, rest_s, ids_p, ids_p)
    cache_s, h_s = jax.eval_shape(prompt_flat, diff_s, fixed_s, rest_s, ids_p, ids_p)

    def resp_flat(d, f, r, cache, h, ids, mask):
        return response_stage(sm, d, f, r, cache, h, ids, mask)

    plan_r = gram_lib.analyse(resp_flat, diff_s, fixed_s, rest_s, cache_s, h_s, ids_r, ids_r)
    # A leaf is a Gram leaf only if no stage uses it any other way, with one dim split for both.
    gram = (set(plan_p.gram_leaves) | set(plan_r.gram_leaves)) - plan_p.opaque_leaves - plan_r.opaque_leaves
    gram = {i for i in gram if i not in plan_p.leaf_groups or i not in plan_r.leaf_groups
            or plan_p.leaf_groups[i] == plan_r.leaf_groups[i]}
    gram_t = tuple(sorted(gram))
    exact_t = tuple(i for i in range(len(diff)) if i not in gram)
    return GramPlans(_restrict(plan_p, gram), _restrict(plan_r, gram), gram_t, exact_t)


class GramFactors(NamedTuple):
    """One pair's forward and backward pass as :func:`gram_factors` records it (``2``: chosen, rejected).

    Attributes:
      logps: ``[2]`` s_w, s_l.
      prompt_recorded: per prompt site, the recorded operand (``x`` or indices).
      prompt_cots: per prompt site, ``[2, *out]`` the output cotangent of s_w and of s_l.
      response_recorded, response_cots: per response site, ``[2, ...]`` each side's operand and cotangent.
      exact_grads: per exact leaf, ``[2, *leaf]`` ∇s_w and ∇s_l (prompt and response uses summed).
    """

    logps: jax.Array
    prompt_recorded: list
    prompt_cots: list
    response_recorded: list
    response_cots: list
    exact_grads: list


def gram_factors(plans: GramPlans, diff, fixed, rest, pair, gather=None) -> GramFactors:
    """One forward pass of a pair (prompt once) with probes, and the backward passes of s_w and s_l.

    The two responses continue the prompt's cache as a batch of two and run backward batched; the two
    cache cotangents then go back through the prompt in one batched pass. Only the probes' cotangents
    (``δ`` of every Gram use) and the exact leaves' gradients are formed, never a Gram leaf's gradient.
    ``gather``: Gram leaves stored sharded are made whole at each use (:func:`gram_lib.probed`).
    """
    ex_idx = plans.exact_leaves
    ex = [diff[i] for i in ex_idx]

    def assemble(ex_vals):
        d = list(diff)
        for i, v in zip(ex_idx, ex_vals):
            d[i] = v
        return d

    def prompt_fn(probes, ex_vals):
        (cache, h), rec = gram_lib.probed(plans.prompt, probes, assemble(ex_vals), fixed, rest,
                                          pair["prompt_ids"], pair["prompt_mask"], gather=gather)
        fl, ot, rebuild = _float_split(cache)
        return (fl, h), ((ot, rec), rebuild)

    (fl, h), prompt_vjp, ((ot, rec_p), rebuild) = _vjp_aux(prompt_fn, plans.prompt.zero_probes(), ex)

    def one(ids, mask):
        def f(probes, ex_vals, fl_h):
            cache = rebuild(fl_h[0], ot)
            tok, rec = gram_lib.probed(plans.response, probes, assemble(ex_vals), fixed, rest, cache,
                                       fl_h[1], ids, mask, gather=gather)
            return jnp.sum(tok), rec

        s, vjp, rec = jax.vjp(f, plans.response.zero_probes(), ex, (fl, h), has_aux=True)
        d_probes, d_ex, d_cache = vjp(jnp.ones_like(s))
        return s, rec, d_probes, d_ex, d_cache

    ids2 = jnp.stack([pair["chosen_ids"], pair["rejected_ids"]])
    mask2 = jnp.stack([pair["chosen_mask"], pair["rejected_mask"]])
    s2, rec_r2, dpr2, dex_r2, dcache2 = jax.vmap(one)(ids2, mask2)
    dpp2, dex_p2 = jax.vmap(prompt_vjp)(dcache2)
    return GramFactors(s2, list(rec_p), list(dpp2), list(rec_r2), list(dpr2),
                       [a + b for a, b in zip(dex_r2, dex_p2)])


def gram_stats(plans: GramPlans, fac: GramFactors, leaves: Sequence[int] | None = None) -> list:
    """Per leaf ``[3]`` (‖g_w‖², ‖g_l‖², ⟨g_w,g_l⟩) of one pair from its :class:`GramFactors`
    (``leaves``: only these leaf indices; the others are ``None``)."""
    n = len(plans.gram_leaves) + len(plans.exact_leaves)
    want = set(range(n) if leaves is None else leaves)
    stats = [None] * n
    for j, i in enumerate(plans.exact_leaves):
        if i in want:
            stats[i] = _leaf_stats(fac.exact_grads[j])
    segs: dict = {i: [] for i in plans.gram_leaves if i in want}
    for k, site in enumerate(plans.prompt.sites):  # the prompt: one forward factor, both cotangents
        if site.leaf in segs:
            cot = fac.prompt_cots[k]
            segs[site.leaf].append(gram_lib.segment(site, fac.prompt_recorded[k], {"w": cot[0], "l": cot[1]}))
    for k, site in enumerate(plans.response.sites):
        if site.leaf in segs:
            for j, side in enumerate("wl"):
                segs[site.leaf].append(gram_lib.segment(site, fac.response_recorded[k][j],
                                                        {side: fac.response_cots[k][j]}))
    for i in segs:
        stats[i] = gram_lib.pair_inners(segs[i])
    return stats


def _pair_gram(sm, plans: GramPlans, diff, fixed, rest, pair, gather=None):
    """Per-leaf stats ``[3, G]`` and ``s`` ``[2]`` of one pair from probes and token Gram matrices."""
    fac = gram_factors(plans, diff, fixed, rest, pair, gather)
    stats = gram_stats(plans, fac)
    dtype = jnp.result_type(*[s.dtype for s in stats])
    return jnp.stack([s.astype(dtype) for s in stats], axis=1), fac.logps


# --- batching, method choice, the probe -------------------------------------------------------------

def map_chunks(chunk_fn, batch: Mapping[str, jax.Array], chunk: int):
    """``chunk_fn`` (a function of a batch of ``C`` pairs) over the batch, ``chunk`` pairs at a time.

    Chunk ``j`` holds rows ``j, j + n, j + 2n, …`` (``n`` chunks, a scan over them), so with the batch
    sharded in contiguous blocks every chunk is spread evenly over the devices. Results are per row.
    """
    B = next(iter(batch.values())).shape[0]
    if chunk >= B:
        return chunk_fn(batch)
    n = -(-B // chunk)
    pad = n * chunk - B
    padded = {k: jnp.concatenate([v, jnp.repeat(v[:1], pad, axis=0)], 0) if pad else v
              for k, v in batch.items()}
    xs = {k: jnp.swapaxes(v.reshape(chunk, n, *v.shape[1:]), 0, 1) for k, v in padded.items()}
    out = jax.lax.map(chunk_fn, xs)
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(n * chunk, *y.shape[2:])[:B], out)


def memory_budget() -> int:
    """Bytes the per-pair work may use: half the accelerator's memory, or a third of the host's RAM."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"] // 2)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class Choice(NamedTuple):
    """What :func:`choose_method` decided for one padded shape.

    Attributes:
      method: the method used.
      chunk: pairs computed at once.
      gram_cost, exact_cost: multiply-adds per pair that the two methods do *beyond* the common forward and
        backward passes: the token Gram products, and forming the weight gradients (0 without a plan).
      pair_bytes: the estimated memory of one pair for ``method``.
    """

    method: str
    chunk: int
    gram_cost: float
    exact_cost: float
    pair_bytes: float


def _extra_costs(plans: GramPlans, P: int, R: int) -> tuple[float, float]:
    """``(gram, exact)`` extra multiply-adds per pair for the Gram leaves (see :class:`Choice`).

    Per leaf with factor sizes ``m × n`` used at ``T`` tokens of a side: the Gram method does three
    ``T × T`` products of both factors, ``3T²(m + n)`` (a lookup's index factor costs nothing); the exact
    method forms both sides' gradients, ``2Tmn`` (a lookup: ``2Tn``), and three inner products ``3mn``.
    """
    tokens: dict = {}
    sizes: dict = {}
    for plan in (plans.prompt, plans.response):
        for site in plan.sites:
            tokens[site.leaf] = tokens.get(site.leaf, 0) + site.tokens
            f1, f2 = (site.x_size, site.out_size) if site.x_is_f1 else (site.out_size, site.x_size)
            sizes.setdefault(site.leaf, []).append((site.kind, f1, f2))
    gram = exact = 0.0
    for leaf, T in tokens.items():
        kinds = sizes[leaf]
        m, n = kinds[0][1], kinds[0][2]
        lookups_only = all(k == "gather" for k, _, _ in kinds)
        gram += 3.0 * T * T * ((0 if lookups_only else m) + n)
        exact += 2.0 * T * (1 if lookups_only else m) * n + 3.0 * m * n
    return gram, exact


def _activation_bytes(sm: SplitModel, P: int, R: int) -> float:
    """Rough memory of one pair's activations (float32): every weight's input and output at every token
    (a weight's two sides are its cheapest split into leading and trailing dims), kept for the backward
    pass, and their cotangents."""
    def sides(shape):
        return min(math.prod(shape[:k]) + math.prod(shape[k:]) for k in range(1, len(shape)))

    width = sum(sides(x.shape) for x in sm.leaves if len(x.shape) >= 2)
    return 4.0 * 2 * (P + 2 * R) * width


def choose_method(method: str, plans: GramPlans | None, sm: SplitModel, P: int, R: int, *,
                  per_layer: bool, chunk_size: int | None, budget: int) -> Choice:
    """Resolves ``auto`` and the chunk size from the Gram plan's costs and the memory budget.

    ``auto`` is ``gram`` when its token Gram products cost less than forming the weight gradients
    (``exact``), else ``exact`` when two gradients per pair fit the budget, else ``jvp`` (one at a time).
    The chunk is the number of pairs whose estimated memory fits ``budget`` (at least 1).
    """
    diff_bytes = float(sum(math.prod(sm.leaves[i].shape) * jnp.dtype(sm.leaves[i].dtype).itemsize
                           for i in sm.selected))
    act = _activation_bytes(sm, P, R)
    gram_cost, exact_cost = _extra_costs(plans, P, R) if plans is not None else (0.0, 0.0)
    per_pair = {"exact": 4 * diff_bytes + act, "jvp": 2 * diff_bytes + act, "gram": 1.5 * act}
    if method == "auto":
        if plans is not None and plans.gram_leaves and gram_cost < exact_cost:
            method = "gram"
        elif per_pair["exact"] <= budget or per_layer:
            method = "exact"
        else:
            method = "jvp"
    chunk = chunk_size or max(1, int(budget // max(per_pair[method], 1.0)))
    return Choice(method, int(chunk), gram_cost, exact_cost, per_pair[method])


class PairGrads(NamedTuple):
    """What a probe returns (NumPy arrays, this process's rows).

    Attributes:
      chosen_logps, rejected_logps: ``[B]`` s_w, s_l.
      grad_chosen_sqnorm, grad_rejected_sqnorm, grad_inner: ``[B]`` ‖g_w‖², ‖g_l‖², ⟨g_w, g_l⟩ over the
        selected parameters.
      layers: ``[B, 3, G]`` the same per parameter leaf (``None`` for ``jvp`` or without ``per_layer``).
      layer_names: the ``G`` leaf names.
      method: the method used.
    """

    chosen_logps: np.ndarray
    rejected_logps: np.ndarray
    grad_chosen_sqnorm: np.ndarray
    grad_rejected_sqnorm: np.ndarray
    grad_inner: np.ndarray
    layers: np.ndarray | None
    layer_names: tuple
    method: str


def make_pair_grads(model, *, method: str = "auto", params: str | Sequence[str] | None = None,
                    last_blocks: int | None = None, per_layer: bool = False, chunk_size: int | None = None,
                    mesh=None, budget: int | None = None, compiler_options: Mapping[str, Any] | None = None,
                    shard_params: bool = False) -> "PairGradsFn":
    """A ``batch -> PairGrads`` function: per-pair gradient norms and inner products of ``model``.

    Args:
      model: a ``jaxalign.models`` causal LM.
      method: ``"auto"``, ``"exact"``, ``"jvp"`` or ``"gram"`` (module doc).
      params: parameter name patterns (:func:`select`); ``None`` for all parameters.
      last_blocks: only the parameters of the last ``n`` blocks (:func:`select`).
      per_layer: also return the per-leaf breakdown (``exact`` and ``gram``).
      chunk_size: pairs computed at once (vmapped); ``None`` sizes it to ``budget``.
      mesh: a ``(data, fsdp, tensor)`` mesh: pairs sharded over ``data × fsdp``, parameters replicated
        (or sharded: ``shard_params``). The batch size must be a multiple of ``data × fsdp``.
      budget: bytes of memory for the per-pair work (default :func:`memory_budget`).
      compiler_options: passed to ``jax.jit`` (e.g. ``{"xla_backend_optimization_level": "0"}`` halves
        CPU compile time for tiny models, as the tests do).
      shard_params: store the differentiated parameters sharded by the model's rules (FSDP over
        ``fsdp``, ``tensor``), as training does, and gather each weight whole right before each of its
        uses (again in the backward pass): the memory of one pair's work plus one weight at a time
        instead of every parameter on every device; the price is the gathers' traffic. For models whose
        parameters do not fit one device (70B). Gram method only (``auto`` becomes ``gram``).

    Returns:
      a :class:`PairGradsFn`: call it with a mapping with :data:`BATCH_FIELDS` (the shared-prompt layout
      of :func:`jaxalign.data.shared_prompt_batch`: prompts ``[B, P]`` any padding, responses ``[B, R]``
      right-padded, EOS included) to get :class:`PairGrads`.

    Raises:
      ConfigError: an unknown method, ``per_layer`` with ``jvp``, ``shard_params`` with a method other
        than gram, or patterns that select nothing.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if shard_params and method not in ("gram", "auto"):
        raise ConfigError(f"sharded parameters (--shard-params) need --method gram, got {method!r}: the "
                          "exact and jvp methods form whole per-pair gradients")
    method = "gram" if shard_params else method
    if per_layer and method == "jvp":
        raise ConfigError("--per-layer needs --method exact, gram or auto (jvp gives totals only)")
    return PairGradsFn(split_model(model, params, last_blocks), method=method, per_layer=per_layer,
                       chunk_size=chunk_size, mesh=mesh, budget=budget or memory_budget(),
                       compiler_options=compiler_options, shard_params=shard_params)


class PairGradsFn:
    """The jitted per-pair gradient function of :func:`make_pair_grads` (one compile per padded shape).

    Attributes:
      split: the :class:`SplitModel` (which parameters are differentiated).
      jitted: the jitted ``fn(diff, fixed, rest, batch, *, method_, chunk)`` (``jaxalign plan`` lowers it
        from placed abstract inputs).
    """

    def __init__(self, sm: SplitModel, *, method: str, per_layer: bool, chunk_size: int | None, mesh,
                 budget: int, compiler_options, shard_params: bool = False):
        self.split, self.method, self.per_layer, self.chunk_size = sm, method, per_layer, chunk_size
        self.mesh, self.budget, self.shard_params = mesh, budget, shard_params
        self._plans: dict = {}
        self._choices: dict = {}
        self.diff, self.fixed = sm.split_leaves(list(sm.leaves))
        self.rest = sm.rest
        self.jitted = jax.jit(self._fn, static_argnames=("method_", "chunk"), compiler_options=compiler_options)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            replicated = NamedSharding(mesh, PartitionSpec())
            self.fixed, self.rest = jax.device_put((self.fixed, self.rest), replicated)
            diff_sh = sm.diff_shardings(mesh) if shard_params else replicated
            self.diff = jax.device_put(self.diff, diff_sh)
            self._rows = parallel.batch_sharding(mesh, 2)

    def _plans_for(self, P: int, R: int):
        if (P, R) not in self._plans:
            with logprobs.select_targets(_for_tpu()):  # the programs the plans are read from, as _fn traces them
                self._plans[(P, R)] = gram_plans(self.split, self.diff, self.fixed, self.rest, P, R)
        return self._plans[(P, R)]

    def choice(self, P: int, R: int) -> Choice:
        """Which method and chunk a ``(P, R)`` shape gets (chunks rounded to the mesh's rows)."""
        if (P, R) not in self._choices:
            plans = self._plans_for(P, R) if self.method in ("auto", "gram") else None
            c = choose_method(self.method, plans, self.split, P, R, per_layer=self.per_layer,
                              chunk_size=self.chunk_size, budget=self.budget)
            if self.mesh is not None:
                rows = int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])
                c = c._replace(chunk=-(-c.chunk // rows) * rows)
            self._choices[(P, R)] = c
        return self._choices[(P, R)]

    def _fn(self, diff, fixed, rest, batch, *, method_, chunk):
        with logprobs.select_targets(_for_tpu()):  # the same numbers; a gather crashes libtpu 0.0.42's compiler
            return self._traced(diff, fixed, rest, batch, method_=method_, chunk=chunk)

    def _traced(self, diff, fixed, rest, batch, *, method_, chunk):
        sm = self.split
        if method_ == "exact":
            per_pair = lambda pair: _pair_exact(sm, diff, fixed, rest, pair)  # noqa: E731
        elif method_ == "jvp":
            per_pair = lambda pair: _pair_jvp(sm, diff, fixed, rest, pair)  # noqa: E731
        else:
            plans = self._plans_for(batch["prompt_ids"].shape[1], batch["chosen_ids"].shape[1])
            gather = parallel.replicate if self.shard_params else None
            per_pair = lambda pair: _pair_gram(sm, plans, diff, fixed, rest, pair, gather)  # noqa: E731
        stats, s2 = map_chunks(jax.vmap(per_pair), batch, chunk)
        return {"stats": stats, "logps": s2}

    def inputs(self, batch: Mapping[str, Any]):
        """``(args, static)`` of :attr:`jitted` for ``batch`` (arrays placed on the mesh)."""
        arrays = {k: np.asarray(batch[k]) for k in BATCH_FIELDS}
        c = self.choice(arrays["prompt_ids"].shape[1], arrays["chosen_ids"].shape[1])
        if self.mesh is None:
            placed = {k: jnp.asarray(v) for k, v in arrays.items()}
        else:
            placed = {k: jax.device_put(v, self._rows) for k, v in arrays.items()}
        return (self.diff, self.fixed, self.rest, placed), dict(method_=c.method, chunk=c.chunk)

    def lower(self, batch: Mapping[str, Any]):
        """The ``jax.stages.Lowered`` computation for ``batch``'s shape (cost and memory analysis)."""
        args, static = self.inputs(batch)
        return self.jitted.lower(*args, **static)

    def __call__(self, batch: Mapping[str, Any]) -> PairGrads:
        args, static = self.inputs(batch)
        if self.mesh is None:
            out = self.jitted(*args, **static)
        else:
            with jax.set_mesh(self.mesh):
                out = self.jitted(*args, **static)
        return self.unpack(out, static["method_"])

    def unpack(self, out, method_: str) -> PairGrads:
        """:class:`PairGrads` from :attr:`jitted`'s output dict (``lower(...).compile()(*args)``)."""
        stats = np.asarray(out["stats"])  # [B, 3, G]
        logps = np.asarray(out["logps"])  # [B, 2]
        totals = stats.astype(np.float64).sum(-1)
        layers = stats if (self.per_layer and method_ != "jvp") else None
        return PairGrads(logps[:, 0], logps[:, 1], totals[:, 0], totals[:, 1], totals[:, 2], layers,
                         self.split.selected_names if layers is not None else (), method_)


# --- one call: weights, predictions, cases ----------------------------------------------------------

class Entanglement(NamedTuple):
    """Per-pair results of :func:`entanglement` (NumPy ``[B]``; ``layers`` as in :class:`PairGrads`)."""

    chosen_logps: np.ndarray
    rejected_logps: np.ndarray
    grad_chosen_sqnorm: np.ndarray
    grad_rejected_sqnorm: np.ndarray
    grad_inner: np.ndarray
    grad_cosine: np.ndarray
    weight_chosen: np.ndarray
    weight_rejected: np.ndarray
    pred_dlogp_chosen: np.ndarray
    pred_dlogp_rejected: np.ndarray
    case: np.ndarray
    layers: np.ndarray | None
    layer_names: tuple
    method: str


def weigh(grads: PairGrads, batch: Mapping[str, Any], *, loss: str | Sequence[str] = "sigmoid",
          beta: float = 0.1, ref_chosen_logps=None, ref_rejected_logps=None,
          loss_options: Mapping[str, Any] | None = None) -> Entanglement:
    """Adds margin weights (:func:`jaxalign.losses.margin_weights`), predictions (η = 1) and cases.

    Without reference log-probs the reference is the policy itself (Δ = 0), as at the start of training.
    """
    from jaxalign import losses

    s_w = np.asarray(grads.chosen_logps, np.float64)
    s_l = np.asarray(grads.rejected_logps, np.float64)
    ref_w = s_w if ref_chosen_logps is None else np.asarray(ref_chosen_logps, np.float64)
    ref_l = s_l if ref_rejected_logps is None else np.asarray(ref_rejected_logps, np.float64)
    lengths_w = np.asarray(batch["chosen_mask"]).sum(-1)
    lengths_l = np.asarray(batch["rejected_mask"]).sum(-1)
    w_c, w_r = losses.margin_weights(loss, chosen_logps=s_w, rejected_logps=s_l, ref_chosen_logps=ref_w,
                                     ref_rejected_logps=ref_l, chosen_lengths=lengths_w,
                                     rejected_lengths=lengths_l, beta=beta, **dict(loss_options or {}))
    w_c, w_r = np.asarray(w_c, np.float64), np.asarray(w_r, np.float64)
    sq_w = np.asarray(grads.grad_chosen_sqnorm, np.float64)
    sq_l = np.asarray(grads.grad_rejected_sqnorm, np.float64)
    ip = np.asarray(grads.grad_inner, np.float64)
    dw, dl, case = predict(sq_w, sq_l, ip, w_c, w_r)
    cos = np.where(sq_w * sq_l > 0, ip / np.sqrt(np.maximum(sq_w * sq_l, 1e-300)), 0.0)
    return Entanglement(s_w, s_l, sq_w, sq_l, ip, cos, w_c, w_r, np.asarray(dw), np.asarray(dl),
                        np.asarray(case), grads.layers, grads.layer_names, grads.method)


def entanglement(model, batch: Mapping[str, Any], *, loss: str | Sequence[str] = "sigmoid",
                 beta: float = 0.1, ref_chosen_logps=None, ref_rejected_logps=None,
                 loss_options: Mapping[str, Any] | None = None, **probe_options) -> Entanglement:
    """Gradient entanglement of every pair of one batch (builds the function; use :func:`make_pair_grads` to reuse).

    Args:
      model: a ``jaxalign.models`` causal LM.
      batch: the shared-prompt layout (:data:`BATCH_FIELDS`).
      loss, beta, loss_options: the loss whose margin weights are used (:mod:`jaxalign.losses`).
      ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs; ``None``: the policy itself.
      **probe_options: ``method``, ``params``, ``per_layer``, ``chunk_size``, ``mesh``, ``budget`` of
        :func:`make_pair_grads`.

    Returns:
      :class:`Entanglement`.
    """
    grads = make_pair_grads(model, **probe_options)(batch)
    return weigh(grads, batch, loss=loss, beta=beta, ref_chosen_logps=ref_chosen_logps,
                 ref_rejected_logps=ref_rejected_logps, loss_options=loss_options)
