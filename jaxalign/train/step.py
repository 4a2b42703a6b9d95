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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxalign import losses, pairs
from jaxalign.errors import ConfigError, LossError

BATCH_KEYS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
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
class ModelParts:
    """A model taken apart for pure functions: ``nnx.merge(graphdef, params, rest)`` rebuilds it.

    ``abstract`` is the params' ``nnx.State`` with shape-only leaves, used to turn a pure dict back into
    a State inside jit; ``rest`` holds non-trainable variables (passed as an argument, never a constant).
    """

    graphdef: Any
    abstract: Any
    rest: Any

    @classmethod
    def split(cls, model) -> tuple["ModelParts", dict]:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        abstract = jax.eval_shape(lambda: params)
        return cls(graphdef, abstract, rest), nnx.to_pure_dict(params)

    def merge(self, params: dict, rest=None):
        state = jax.tree.map(lambda x: x, self.abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.rest if rest is None else rest)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The static description of the objective (hashable: it is a jit static argument).

    Attributes:
      names, weights: ``losses.compute``'s loss name(s) and mixture weights (``None``: a single loss).
      beta: β.
      options: the loss options as sorted ``(key, value)`` pairs.
      sft_coeff: weight of ``mean(−s_w)`` (Razin et al.'s SFT regulariser; summed log-probs).
      shared_prompt: pair_forward (True) or full rows (False).
      grad_accum: micro-batches per step, ``A``.
      chunk_size: sequence chunk of the log-softmax.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...] | None
    beta: float
    options: tuple[tuple[str, Any], ...] = ()
    sft_coeff: float = 0.0
    shared_prompt: bool = True
    grad_accum: int = 1
    chunk_size: int | None = 128

    @property
    def needs_reference(self) -> bool:
        return any("ref_chosen_logps" in losses.REGISTRY[n].inputs for n in self.names)

    @classmethod
    def from_config(cls, loss_cfg, *, shared_prompt: bool = True, grad_accum: int = 1) -> "LossSpec":
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
                   shared_prompt=shared_prompt, grad_accum=grad_accum)
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

def pair_logps(model, batch: dict, *, shared_prompt: bool = True, chunk_size: int | None = 128
               ) -> dict[str, jax.Array]:
    """``chosen_logps``, ``rejected_logps``, ``chosen_lengths``, ``rejected_lengths``, each ``[B]``."""
    if shared_prompt:
        out = pairs.pair_forward(model, batch["prompt_ids"], batch["prompt_mask"], batch["chosen_ids"],
                                 batch["chosen_mask"], batch["rejected_ids"], batch["rejected_mask"],
                                 chunk_size=chunk_size)
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


def _objective(spec: LossSpec, lp: dict, batch: dict) -> tuple[jax.Array, dict]:
    """Mean loss and the TRL metrics of one (micro-)batch from its log-probs."""
    ref_c = batch.get("ref_chosen_logps")
    ref_r = batch.get("ref_rejected_logps")
    per_example = losses.compute(
        list(spec.names) if spec.weights else spec.names[0], chosen_logps=lp["chosen_logps"],
        rejected_logps=lp["rejected_logps"], ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
        chosen_lengths=lp["chosen_lengths"], rejected_lengths=lp["rejected_lengths"], beta=spec.beta,
        weights=spec.weights, **dict(spec.options))
    loss = jnp.mean(per_example)
    if spec.sft_coeff:
        loss = loss + spec.sft_coeff * jnp.mean(-lp["chosen_logps"])
    return loss, _reward_metrics(spec.beta, lp, ref_c, ref_r, loss)


def _reward_metrics(beta, lp, ref_c, ref_r, loss) -> dict:
    c, r = jax.lax.stop_gradient(lp["chosen_logps"]), jax.lax.stop_gradient(lp["rejected_logps"])
    rc = beta * (c - ref_c) if ref_c is not None else beta * c
    rr = beta * (r - ref_r) if ref_r is not None else beta * r
    return {"loss": jax.lax.stop_gradient(loss), "rewards/chosen": jnp.mean(rc),
            "rewards/rejected": jnp.mean(rr), "rewards/margins": jnp.mean(rc - rr),
            "rewards/accuracies": jnp.mean((rc > rr).astype(jnp.float32)),
            "logps/chosen": jnp.mean(c), "logps/rejected": jnp.mean(r)}


def _with_reference(parts: ModelParts, ref_params, batch: dict, spec: LossSpec) -> dict:
    """Adds the reference log-probs from ``ref_params`` (the online reference) to the batch."""
    if ref_params is None:
        return batch
    ref = pair_logps(parts.merge(ref_params), batch, shared_prompt=spec.shared_prompt,
                     chunk_size=spec.chunk_size)
    return dict(batch, ref_chosen_logps=jax.lax.stop_gradient(ref["chosen_logps"]),
                ref_rejected_logps=jax.lax.stop_gradient(ref["rejected_logps"]))


def loss_fn(params, batch: dict, *, parts: ModelParts, spec: LossSpec, rest=None):
    """``(loss, metrics)`` of one micro-batch: a function of the parameters (for ``jax.grad``)."""
    model = parts.merge(params, rest)
    lp = pair_logps(model, batch, shared_prompt=spec.shared_prompt, chunk_size=spec.chunk_size)
    return _objective(spec, lp, batch)


def _micro_batches(batch: dict, A: int) -> dict:
    """``[B, …]`` → ``[A, M, …]``; micro-batch ``a`` holds rows ``a, a + A, …`` (even across devices)."""
    def split(x):
        B = x.shape[0]
        return jnp.swapaxes(x.reshape((B // A, A) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, rest, ref_params, *, parts: ModelParts, spec: LossSpec,
               optimizer: optax.GradientTransformation, schedule) -> tuple[TrainState, dict]:
    """One optimiser step over ``A`` accumulated micro-batches. Returns the new state and metrics."""
    grad = jax.value_and_grad(functools.partial(loss_fn, parts=parts, spec=spec, rest=rest), has_aux=True)
    A = spec.grad_accum

    def one(batch_):
        batch_ = _with_reference(parts, ref_params, batch_, spec)
        (_, metrics), g = grad(state.params, batch_)
        return g, metrics

    if A == 1:
        grads, metrics = one(batch)
    else:
        def body(carry, mb):
            g, m = one(mb)
            return jax.tree.map(jnp.add, carry, (g, m)), None
        zeros = jax.eval_shape(one, jax.tree.map(lambda x: x[0], _micro_batches(batch, A)))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, metrics), _ = jax.lax.scan(body, zeros, _micro_batches(batch, A))
        grads = jax.tree.map(lambda g: g / A, grads)
        metrics = jax.tree.map(lambda m: m / A, metrics)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def eval_step(params, batch: dict, rest, ref_params, *, parts: ModelParts, spec: LossSpec
              ) -> tuple[dict, dict]:
    """Metrics of a batch without updating (eval), and the per-example log-probs (probe/ledger)."""
    batch = _with_reference(parts, ref_params, batch, spec)
    model = parts.merge(params, rest)
    lp = pair_logps(model, batch, shared_prompt=spec.shared_prompt, chunk_size=spec.chunk_size)
    _, metrics = _objective(spec, lp, batch)
    return metrics, {k: lp[k] for k in ("chosen_logps", "rejected_logps")}


def logps_step(params, batch: dict, rest, *, parts: ModelParts, shared_prompt: bool = True,
               chunk_size: int | None = 128) -> dict:
    """Per-example ``chosen_logps`` and ``rejected_logps`` (the reference cache, the probe set)."""
    lp = pair_logps(parts.merge(params, rest), batch, shared_prompt=shared_prompt, chunk_size=chunk_size)
    return {k: lp[k] for k in ("chosen_logps", "rejected_logps")}


def probe_step(params, batch: dict, rest, *, parts: ModelParts, shared_prompt: bool = True,
               chunk_size: int | None = 128) -> dict:
    """``logps_step`` plus, with the shared prompt, each pair's CHES and LN-CHES (Razin et al. Def. 2–3)
    from the final hidden states of the same forward pass."""
    try:
        from jaxalign.analysis import ches
    except ImportError:  # the analysis package is optional here
        ches = None
    if not shared_prompt or ches is None:
        return logps_step(params, batch, rest, parts=parts, shared_prompt=shared_prompt, chunk_size=chunk_size)
    out = pairs.pair_forward(parts.merge(params, rest), batch["prompt_ids"], batch["prompt_mask"],
                             batch["chosen_ids"], batch["chosen_mask"], batch["rejected_ids"],
                             batch["rejected_mask"], hidden_sums=True, chunk_size=chunk_size)
    scores = ches.scores_from_sums(out)
    return {"chosen_logps": out.chosen_logps, "rejected_logps": out.rejected_logps,
            "ches": scores["ches"], "ln_ches": scores["ln_ches"]}


# --- jit with shardings --------------------------------------------------------------------------------

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


def init_state(optimizer, params, param_shardings, mesh, seed: int = 0) -> TrainState:
    """A step-0 :class:`TrainState` with the optimiser state created in its sharding."""
    opt_sh = opt_state_shardings(optimizer, params, param_shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    step = jnp.zeros((), jnp.int32)
    rng = jax.random.key_data(jax.random.key(seed))
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step, rng = jax.device_put(step, replicated), jax.device_put(rng, replicated)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def jit_train_step(*, parts: ModelParts, spec: LossSpec, optimizer, schedule, state_shardings,
                   batch_shardings, rest_shardings, ref_shardings, mesh):
    """``train_step`` jitted with explicit in/out shardings and the state donated."""
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = functools.partial(train_step, parts=parts, spec=spec, optimizer=optimizer, schedule=schedule)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    return jax.jit(fn, in_shardings=(state_shardings, batch_shardings, rest_shardings, ref_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
