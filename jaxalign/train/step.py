"""The train step: a module-level pure function, jitted with explicit shardings and a donated state.

Letters: B pairs in the step's batch, A micro-batches (gradient accumulation), M = B / A, P prompt length,
R response length.

A batch is a dict of arrays in the shared-prompt layout (``jaxalign.data``):
``prompt_ids``/``prompt_mask`` ``[B, P]`` (any padding side), ``chosen_ids``/``chosen_mask`` and
``rejected_ids``/``rejected_mask`` ``[B, R]`` (right-padded, EOS included), plus
``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` when the reference log-probs are cached.

The policy's log-probs come from :func:`jaxalign.pairs.pair_forward` (the prompt once, both responses
from its KV cache) or, with ``shared_prompt=False``, from full rows through
:func:`jaxalign.pairs.sequence_forward` (equal; tested). The loss is
``mean_B(losses.compute(...)) + sft_coeff · mean_B(−logps(chosen))``. Gradients of the ``A``
micro-batches are averaged in a ``lax.scan`` (equal micro-batches, so the mean of means is the mean).

Metrics are TRL's: ``loss``, ``rewards/chosen`` = β·mean(s_w − s_w^ref), ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies`` = mean(r_w > r_l), ``logps/chosen``, ``logps/rejected``;
plus ``grad_norm`` (before clipping) and ``learning_rate``. Reference-free losses have rewards β·s.
With ``Objective.pair_outputs`` the metrics also hold ``pairs``: ``[B]`` arrays per pair in batch order
(:data:`PAIR_KEYS`; with ``Objective.telemetry`` also :data:`TELEMETRY_KEYS`, from the step's own pass:
:func:`telemetry_grads`), read by :mod:`jaxalign.train.telemetry`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxalign import losses, pairs, parallel
from jaxalign.models import lora
from jaxalign.models.base import plain_projections
from jaxalign.models.parts import ModelParts  # noqa: F401  (re-exported: the trainer's model split)
from jaxalign.analysis import ches
from jaxalign.analysis import entanglement as ent
from jaxalign.analysis import entanglement_step as ent_step
from jaxalign.errors import ConfigError, LossError

BATCH_KEYS = pairs.KEYS
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
MITIGATION_KEYS = ("pair_weight", "sft_weight", "dpop_lambda")  # per-pair mitigations (train/pair_rules.py)
METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; donated to the step).

    Attributes:
      step: int32 scalar, optimiser steps done.
      params: the trainable parameters as a pure nested dict (``nnx.to_pure_dict`` of the ``nnx.Param``s).
      opt_state: the optax state.
      rng: uint32 ``[2]`` raw PRNG key, split every step; the key of step ``s`` is what a stochastic part
        of the step would use (none today: the models have no dropout). Checkpointed with the state.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static description of the objective (hashable: it is a jit static argument).

    Attributes:
      names, weights: ``losses.compute``'s loss name(s) and mixture weights (``None``: a single loss).
      beta: β.
      options: the loss options as sorted ``(key, value)`` pairs.
      sft_coeff: weight of ``mean(−s_w)`` (Razin et al.'s SFT regulariser; summed log-probs).
      shared_prompt: pair_forward (True) or full rows (False).
      fused_pairs: with ``shared_prompt``, pair_forward's one pass over ``[prompt | chosen | rejected]``
        rows instead of the prompt's KV cache (equal numbers; ``data.fused_pairs``).
      grad_accum: micro-batches per step, ``A``.
      chunk_size: sequence chunk of the log-softmax.
      pair_outputs: the step also returns the per-pair ``pairs`` arrays (:func:`train_step`).
      telemetry: the step computes each pair's gradient geometry from its own pass
        (:func:`telemetry_grads`; shared prompt only); implies ``pair_outputs``.
      telemetry_params: regex of the trained parameters the geometry covers (``None``: all).
    """

    names: tuple[str, ...]
    weights: tuple[float, ...] | None
    beta: float
    options: tuple[tuple[str, Any], ...] = ()
    sft_coeff: float = 0.0
    shared_prompt: bool = True
    fused_pairs: bool = False
    grad_accum: int = 1
    chunk_size: int | None = 128
    pair_outputs: bool = False
    telemetry: bool = False
    telemetry_params: str | None = None

    @property
    def needs_reference(self) -> bool:
        return any("ref_chosen_logps" in losses.REGISTRY[n].inputs for n in self.names)

    @classmethod
    def from_config(cls, loss_cfg, *, shared_prompt: bool = True, fused_pairs: bool = False,
                    grad_accum: int = 1) -> "Objective":
        from jaxalign.train.config import loss_terms

        terms = loss_terms(loss_cfg)
        names = tuple(t[0] for t in terms)
        for i, n in enumerate(names):
            if n not in losses.REGISTRY:
                key = "loss.name" if isinstance(loss_cfg.name, str) else f"loss.name[{i}]"
                raise ConfigError(f"{key}: unknown loss {n!r} (known: {', '.join(losses.NAMES)})")
        options: dict = {}
        for i, (_, _, opts) in enumerate(terms):
            for k, v in opts.items():
                if k in options and options[k] != v:  # losses.compute passes one value to every loss
                    raise ConfigError(f"loss.name[{i}].options.{k}: {v!r} conflicts with {options[k]!r} given "
                                      "to another loss of the list; an option has one value per run")
                options[k] = v
        weights = None if isinstance(loss_cfg.name, str) else tuple(t[1] for t in terms)
        spec = cls(names=names, weights=weights, beta=float(loss_cfg.beta),
                   options=tuple(sorted(options.items())), sft_coeff=float(loss_cfg.sft_coeff),
                   shared_prompt=shared_prompt, fused_pairs=fused_pairs, grad_accum=grad_accum)
        spec.check()
        return spec

    def check(self) -> None:
        """Evaluates the loss once on dummy inputs so a bad option fails before training (LossError)."""
        one = jnp.zeros((1,))
        try:
            losses.compute(list(self.names) if self.weights else self.names[0],
                           chosen_logps=one, rejected_logps=one, ref_chosen_logps=one,
                           ref_rejected_logps=one, chosen_lengths=one + 1, rejected_lengths=one + 1,
                           beta=self.beta, weights=self.weights, **dict(self.options))
        except LossError as err:
            raise ConfigError(f"loss: {err}") from None


# --- per-example log-probs ----------------------------------------------------------------------------

def pair_logps(model, batch: dict, *, shared_prompt: bool = True, chunk_size: int | None = 128,
               fused: bool = False) -> dict[str, jax.Array]:
    """``chosen_logps``, ``rejected_logps``, ``chosen_lengths``, ``rejected_lengths``, each ``[B]``
    (``fused``: the shared prompt's one-pass form, :func:`jaxalign.pairs.encode_pair`)."""
    if shared_prompt:
        out = pairs.pair_forward(model, pairs.PairBatch.of(batch), chunk_size=chunk_size, fused=fused)
        return dict(chosen_logps=out.chosen_logps, rejected_logps=out.rejected_logps,
                    chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths)
    # Unshared: rows [prompt | response] (padding on the left of the prompt and/or inside is fine: the
    # model's positions come from the mask), chosen rows then rejected rows.
    B = batch["prompt_ids"].shape[0]
    prompt_ids = jnp.concatenate([batch["prompt_ids"]] * 2, 0)
    prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2, 0)
    resp_ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], 0)
    resp_mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], 0)
    ids = jnp.concatenate([prompt_ids, resp_ids], 1)
    mask = jnp.concatenate([prompt_mask, resp_mask], 1)
    out = pairs.sequence_forward(model, ids, mask, jnp.sum(prompt_mask, 1).astype(jnp.int32),
                                 chunk_size=chunk_size)
    return dict(chosen_logps=out["logps"][:B], rejected_logps=out["logps"][B:],
                chosen_lengths=out["lengths"][:B], rejected_lengths=out["lengths"][B:])


def _mean(x: jax.Array, weights: jax.Array | None) -> jax.Array:
    """``mean_B(x)``, or ``Σ w·x / max(Σ w, 1)`` with per-pair weights (0 for filler rows)."""
    if weights is None:
        return jnp.mean(x)
    return jnp.sum(weights * x) / jnp.maximum(jnp.sum(weights), 1.0)


def weighted_objective(spec: Objective, lp: dict, refs: dict, weights: jax.Array | None = None
                       ) -> tuple[jax.Array, dict]:
    """The loss of one (micro-)batch from its log-probs, and TRL's metrics.

    ``loss = mean_B(losses.compute(...)) + sft_coeff · mean_B(−s_w)``; with ``weights`` ``[B]`` every
    mean is the weighted mean ``Σ w·x / max(Σ w, 1)`` (D2PO's batches weigh filler rows 0).

    Args:
      spec: the objective.
      lp: ``chosen_logps``, ``rejected_logps``, ``chosen_lengths``, ``rejected_lengths``, each ``[B]``.
      refs: ``ref_chosen_logps`` and ``ref_rejected_logps`` ``[B]`` when the loss needs them, and the
        per-pair mitigations :data:`MITIGATION_KEYS` ``[B]`` when the run routes pairs (:func:`_pair_mitigations`;
        other keys are ignored, so a whole batch may be passed).
      weights: per-pair weights ``[B]``, or ``None`` for the plain mean.

    Returns:
      ``(loss, metrics)``: a scalar, and ``loss``, ``rewards/*``, ``logps/*`` (stopped gradients).
    """
    ref_c, ref_r = refs.get("ref_chosen_logps"), refs.get("ref_rejected_logps")
    per_example = losses.compute(
        list(spec.names) if spec.weights else spec.names[0], chosen_logps=lp["chosen_logps"],
        rejected_logps=lp["rejected_logps"], ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
        chosen_lengths=lp["chosen_lengths"], rejected_lengths=lp["rejected_lengths"], beta=spec.beta,
        weights=spec.weights, **dict(spec.options))
    per_example, pair_weight = _pair_mitigations(spec, lp, refs, per_example)
    loss = _mean(per_example, weights)
    if spec.sft_coeff:
        loss = loss + spec.sft_coeff * _mean(-lp["chosen_logps"] * pair_weight, weights)
    return loss, _reward_metrics(spec.beta, lp, ref_c, ref_r, loss, weights)


def _pair_mitigations(spec: Objective, lp: dict, refs: dict, per_example: jax.Array
                      ) -> tuple[jax.Array, jax.Array | float]:
    """The per-pair mitigations of :data:`MITIGATION_KEYS` in ``refs`` (each ``[B]``, absent: none) applied to
    the per-example loss: where ``dpop_lambda > 0`` the loss is DPO-Positive with that λ
    (:func:`jaxalign.losses.dpop`), ``sft_weight·(−s_w)`` is added, and the sum is multiplied by
    ``pair_weight`` (returned too: it also scales the run-wide ``sft_coeff`` term)."""
    lam, sft, pair_weight = refs.get("dpop_lambda"), refs.get("sft_weight"), refs.get("pair_weight")
    if lam is not None:
        dpop = losses.dpop(lp["chosen_logps"], lp["rejected_logps"], refs["ref_chosen_logps"],
                           refs["ref_rejected_logps"], beta=spec.beta, dpop_lambda=lam)
        per_example = jnp.where(lam > 0, dpop, per_example)
    if sft is not None:
        per_example = per_example + sft * -lp["chosen_logps"]
    if pair_weight is None:
        return per_example, 1.0
    return pair_weight * per_example, pair_weight


def _reward_metrics(beta, lp, ref_c, ref_r, loss, weights=None) -> dict:
    c, r = jax.lax.stop_gradient(lp["chosen_logps"]), jax.lax.stop_gradient(lp["rejected_logps"])
    rc = beta * (c - ref_c) if ref_c is not None else beta * c
    rr = beta * (r - ref_r) if ref_r is not None else beta * r
    return {"loss": jax.lax.stop_gradient(loss), "rewards/chosen": _mean(rc, weights),
            "rewards/rejected": _mean(rr, weights), "rewards/margins": _mean(rc - rr, weights),
            "rewards/accuracies": _mean((rc > rr).astype(jnp.float32), weights),
            "logps/chosen": _mean(c, weights), "logps/rejected": _mean(r, weights)}


def _with_reference(parts: ModelParts, ref_params, batch: dict, spec: Objective, rest=None) -> dict:
    """Adds the reference log-probs from ``ref_params`` (the online reference) to the batch."""
    if ref_params is None:
        return batch
    ref = pair_logps(parts.merge(ref_params, rest), batch, shared_prompt=spec.shared_prompt,
                     chunk_size=spec.chunk_size, fused=spec.fused_pairs)
    return dict(batch, ref_chosen_logps=jax.lax.stop_gradient(ref["chosen_logps"]),
                ref_rejected_logps=jax.lax.stop_gradient(ref["rejected_logps"]))


def loss_fn(params, batch: dict, *, parts: ModelParts, spec: Objective, rest=None):
    """``(loss, metrics)`` of one micro-batch: a function of the parameters (for ``jax.grad``)."""
    model = parts.merge(params, rest)
    lp = pair_logps(model, batch, shared_prompt=spec.shared_prompt, chunk_size=spec.chunk_size,
                    fused=spec.fused_pairs)
    loss, metrics = weighted_objective(spec, lp, batch)
    if spec.pair_outputs:
        metrics = dict(metrics, pairs=pair_record(spec, lp, batch, pair_coeffs(spec, lp, batch)))
    return loss, metrics


# --- per-pair outputs and telemetry ---------------------------------------------------------------------

PAIR_KEYS = ("logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected", "margin_weight")
TELEMETRY_KEYS = ("grad_sq_chosen", "grad_sq_rejected", "grad_dot", "grad_cos", "predicted_case")


def pair_coeffs(spec: Objective, lp: dict, batch: dict) -> jax.Array:
    """``c = ∂loss/∂(s_w, s_l)`` ``[B, 2]`` of the (micro-)batch loss: each pair's weight in the gradient
    (``∇loss = Σ_b c_w g_w + c_l g_l``). Only the loss formula is differentiated, not the model."""
    s = jax.lax.stop_gradient(jnp.stack([lp["chosen_logps"], lp["rejected_logps"]], axis=1))

    def loss_of(s_B2):
        return weighted_objective(spec, dict(lp, chosen_logps=s_B2[:, 0], rejected_logps=s_B2[:, 1]), batch)[0]

    return jax.grad(loss_of)(s)


def pair_record(spec: Objective, lp: dict, batch: dict, coeffs_B2: jax.Array) -> dict:
    """The cheap per-pair arrays ``[B]`` of :data:`PAIR_KEYS` (stopped gradients).

    ``margin_weight`` = ``B · (c_l − c_w) / 2``: the loss's weight on ``∇(s_w − s_l)`` for the pair in
    per-pair units (for a loss of the margin alone, −∂ℓ/∂margin, e.g. βσ(−βΔ) for DPO); the reference
    log-probs are NaN where the loss has none.
    """
    c = jax.lax.stop_gradient(lp["chosen_logps"])
    nan = jnp.full_like(c, jnp.nan)
    B = c.shape[0]
    return {"logp_chosen": c, "logp_rejected": jax.lax.stop_gradient(lp["rejected_logps"]),
            "ref_logp_chosen": batch.get("ref_chosen_logps", nan).astype(c.dtype),
            "ref_logp_rejected": batch.get("ref_rejected_logps", nan).astype(c.dtype),
            "margin_weight": B * (coeffs_B2[:, 1] - coeffs_B2[:, 0]) / 2}


def _trained_leaves(params):
    """``(names, leaves, treedef)`` of the trained parameters (dotted names as in ``entangle --params``)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return tuple(ent.leaf_name(p) for p, _ in flat), [v for _, v in flat], treedef


def telemetry_grads(params, batch: dict, *, parts: ModelParts, spec: Objective, rest=None):
    """``(grads, metrics, pairs)`` of one micro-batch: the gradient of its loss and, per pair, the
    :data:`PAIR_KEYS` and :data:`TELEMETRY_KEYS` arrays, all from one forward and one backward pass
    (:func:`jaxalign.analysis.entanglement_step.step_geometry`).

    ``predicted_case`` indexes :data:`jaxalign.analysis.entanglement.CASES` (Yuan et al.'s sign pattern
    of the first-order changes of s_w and s_l under a step on the pair alone)."""
    if not spec.shared_prompt:
        raise ConfigError("telemetry.pairs: needs data.shared_prompt: true (the pass runs each prompt once)")
    names, leaves, treedef = _trained_leaves(params)
    try:
        selected = ent.select(names, spec.telemetry_params)
    except ConfigError as err:
        raise ConfigError(f"telemetry.params: {err}") from None
    lengths = {f"{k}_lengths": jnp.sum(batch[f"{k}_mask"], axis=1).astype(jnp.int32)
               for k in ("chosen", "rejected")}

    def coeffs_fn(s_B2):
        lp = dict(lengths, chosen_logps=s_B2[:, 0], rejected_logps=s_B2[:, 1])
        _, metrics = weighted_objective(spec, lp, batch)
        coeffs = pair_coeffs(spec, lp, batch)
        return coeffs, (metrics, pair_record(spec, lp, batch, coeffs))

    split = ent_step.StepSplit(lambda d, r: parts.merge(jax.tree.unflatten(treedef, d), r))
    # `rest` of the trainer and the parts' own graph state both ride in the merge's `rest` argument
    with plain_projections():  # rows_matmul slows this program down (docs/benchmarks.md)
        geo = ent_step.step_geometry(split, leaves, rest, batch, coeffs_fn, selected)
    metrics, record = geo.aux
    sq_w, sq_l, dot = geo.stats[:, 0], geo.stats[:, 1], geo.stats[:, 2]
    _, _, case = ent.predict(sq_w, sq_l, dot, -geo.coeffs[:, 0], geo.coeffs[:, 1])
    record = dict(record, grad_sq_chosen=sq_w, grad_sq_rejected=sq_l, grad_dot=dot,
                  grad_cos=ent.cosine(sq_w, sq_l, dot), predicted_case=case)
    return jax.tree.unflatten(treedef, geo.grads), metrics, record


def _micro_batches(batch: dict, A: int) -> dict:
    """``[B, …]`` → ``[A, M, …]``; micro-batch ``a`` holds rows ``a, a + A, …`` (even across devices)."""
    def split(x):
        B = x.shape[0]
        return jnp.swapaxes(x.reshape((B // A, A) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, rest, ref_params, *, parts: ModelParts, spec: Objective,
               optimizer: optax.GradientTransformation, schedule) -> tuple[TrainState, dict]:
    """One optimiser step over ``A`` accumulated micro-batches. Returns the new state and metrics."""
    grad = jax.value_and_grad(functools.partial(loss_fn, parts=parts, spec=spec, rest=rest), has_aux=True)
    A = spec.grad_accum

    def one(batch_):
        batch_ = _with_reference(parts, ref_params, batch_, spec, rest)
        if spec.telemetry:
            return telemetry_grads(state.params, batch_, parts=parts, spec=spec, rest=rest)
        (_, metrics), g = grad(state.params, batch_)
        return g, metrics, metrics.pop("pairs", None)

    if A == 1:
        grads, metrics, per_pair = one(batch)
    else:
        def body(carry, mb):
            g, m, p = one(mb)
            return jax.tree.map(jnp.add, carry, (g, m)), p
        zeros = jax.eval_shape(lambda b: one(b)[:2], jax.tree.map(lambda x: x[0], _micro_batches(batch, A)))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, metrics), per_pair = jax.lax.scan(body, zeros, _micro_batches(batch, A))
        grads = jax.tree.map(lambda g: g / A, grads)
        metrics = jax.tree.map(lambda m: m / A, metrics)
        # [A, M] -> [B]: micro-batch a holds rows a, a + A, … (_micro_batches); per micro-batch values
        per_pair = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1), per_pair)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
    if per_pair is not None:
        metrics["pairs"] = per_pair
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def eval_step(params, batch: dict, rest, ref_params, *, parts: ModelParts, spec: Objective
              ) -> tuple[dict, dict]:
    """Metrics of a batch without updating (eval), and the per-example log-probs (probe/ledger)."""
    batch = _with_reference(parts, ref_params, batch, spec, rest)
    model = parts.merge(params, rest)
    lp = pair_logps(model, batch, shared_prompt=spec.shared_prompt, chunk_size=spec.chunk_size,
                    fused=spec.fused_pairs)
    _, metrics = weighted_objective(spec, lp, batch)
    return metrics, {k: lp[k] for k in ("chosen_logps", "rejected_logps")}


def policy(parts: ModelParts, params, rest=None, *, adapters: bool = True):
    """The model of ``params`` (and ``rest``); ``adapters=False``: its LoRA adapters switched off (the
    ``loss.reference: adapter_off`` reference: the base weights alone, no second copy)."""
    model = parts.merge(params, rest)
    return model if adapters else lora.set_adapters(model, False)


def logps_step(params, batch: dict, rest, *, parts: ModelParts, shared_prompt: bool = True,
               chunk_size: int | None = 128, adapters: bool = True) -> dict:
    """Per-example ``chosen_logps`` and ``rejected_logps`` (the reference cache, the probe set)."""
    lp = pair_logps(policy(parts, params, rest, adapters=adapters), batch, shared_prompt=shared_prompt,
                    chunk_size=chunk_size)
    return {k: lp[k] for k in ("chosen_logps", "rejected_logps")}


def probe_step(params, batch: dict, rest, *, parts: ModelParts, shared_prompt: bool = True,
               chunk_size: int | None = 128, adapters: bool = True) -> dict:
    """``logps_step`` plus, with the shared prompt, each pair's CHES and LN-CHES (Razin et al. Def. 2–3)
    from the final hidden states of the same forward pass (the reference pass's scores too)."""
    if not shared_prompt:
        return logps_step(params, batch, rest, parts=parts, shared_prompt=shared_prompt, chunk_size=chunk_size,
                          adapters=adapters)
    out = pairs.pair_forward(policy(parts, params, rest, adapters=adapters), batch["prompt_ids"], batch["prompt_mask"],
                             batch["chosen_ids"], batch["chosen_mask"], batch["rejected_ids"],
                             batch["rejected_mask"], hidden_sums=True, chunk_size=chunk_size)
    scores = ches.scores_from_sums(out)
    return {"chosen_logps": out.chosen_logps, "rejected_logps": out.rejected_logps,
            "ches": scores["ches"], "ln_ches": scores["ln_ches"]}


# --- jit with shardings --------------------------------------------------------------------------------
#
# The jitted functions below wrap module-level functions and take what configures them as one static
# argument compared by a hashable key (the model's graphdef, the objective, the optimiser's config). Two
# runs with equal keys and equal shapes therefore share one traced and compiled program (jit's own
# cache): ``loop.train_loaded`` trains many pair sets on one loaded model without recompiling.

@dataclasses.dataclass(frozen=True, eq=False)
class Static:
    """A jit static argument: hashed and compared by ``key``; carries unhashable ``value`` (equal keys
    must mean interchangeable values, e.g. equal graphdefs for two copies of one architecture)."""

    key: Any
    value: Any

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Static) and self.key == other.key


def shardings_of(tree):
    """The shardings of a pytree of placed arrays (``None`` leaves stay ``None``)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def opt_state_shardings(optimizer, params, param_shardings, mesh):
    """Shardings of ``optimizer.init(params)``: param-shaped leaves as the params, the rest replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    if mesh is None:
        return jax.tree.map(lambda _: None, abstract)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated)


def _opt_init(static: Static, params):
    return static.value.init(params)


def init_state(optimizer, params, param_shardings, mesh, seed: int = 0, *, key: Any = None) -> TrainState:
    """A step-0 :class:`TrainState` with the optimiser state created in its sharding.

    ``key``: a hashable stand-in for ``optimizer`` (its config) so equal optimisers share one program.
    """
    opt_sh = opt_state_shardings(optimizer, params, param_shardings, mesh)
    static = Static(optimizer if key is None else key, optimizer)
    opt_state = jax.jit(_opt_init, static_argnums=0, out_shardings=opt_sh)(static, params)
    step = jnp.zeros((), jnp.int32)
    rng = jax.random.key_data(jax.random.key(seed))
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step, rng = jax.device_put(step, replicated), jax.device_put(rng, replicated)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def _train_step(static: Static, state, batch, rest, ref_params):
    parts, spec, optimizer, schedule = static.value
    return train_step(state, batch, rest, ref_params, parts=parts, spec=spec, optimizer=optimizer,
                      schedule=schedule)


def jit_train_step(*, parts: ModelParts, spec: Objective, optimizer, schedule, state_shardings,
                   batch_shardings, rest_shardings, ref_shardings, mesh, key: Any = None,
                   constrain_activations: bool = True):
    """``train_step`` jitted with explicit in/out shardings and the state donated.

    ``key``: a hashable stand-in for ``(optimizer, schedule)`` (e.g. their config and the run length):
    steps built with equal keys, objectives and model graphdefs share one compiled program.
    ``constrain_activations``: the model's activation sharding constraints on or off
    (``mesh.constrain_activations``; ``parallel.activation_constraints``).
    """
    static = Static((parts.graphdef, spec, (optimizer, schedule) if key is None else key, constrain_activations),
                    (parts, spec, optimizer, schedule))
    if mesh is None:
        fn = jax.jit(_train_step, static_argnums=0, donate_argnames="state")
    else:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        fn = jax.jit(_train_step, static_argnums=0, donate_argnames="state",
                     in_shardings=(state_shardings, batch_shardings, rest_shardings, ref_shardings),
                     out_shardings=(state_shardings, replicated))
    return parallel.in_mesh(functools.partial(fn, static), mesh,  # the model's activation constraints
                            constrain_activations=constrain_activations)


def _pair_scores(static: Static, params, batch, rest):
    _, shared_prompt, with_ches, adapters = static.key
    if with_ches:
        return probe_step(params, batch, rest, parts=static.value, shared_prompt=shared_prompt, adapters=adapters)
    return logps_step(params, batch, rest, parts=static.value, shared_prompt=shared_prompt, adapters=adapters)


def jit_pair_scores(parts: ModelParts, *, shared_prompt: bool = True, with_ches: bool = False,
                    adapters: bool = True):
    """``(params, batch, rest) -> logps_step(...)`` (``with_ches``: :func:`probe_step`; ``adapters=False``:
    the LoRA adapters off) jitted; one program per model graphdef and shape."""
    static = Static((parts.graphdef, shared_prompt, with_ches, adapters), parts)
    return functools.partial(jax.jit(_pair_scores, static_argnums=0), static)
