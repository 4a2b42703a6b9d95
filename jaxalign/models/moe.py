"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE) for the Llama-like decoder.

Letters: B batch, T tokens, N = B·T tokens flattened, D model width, E experts, F expert MLP width,
K experts per token, M = N·K token-expert assignments.

Each token's router logits ``x · W_r`` go through a float32 softmax over the ``E`` experts; the ``k``
largest probabilities pick the experts (renormalised to sum to one for Mixtral, and for Qwen3-MoE when
``norm_topk_prob``), and the token's output is ``Σ_k p_k · down_k(act(gate_k(x)) · up_k(x))`` (Jiang et al.,
"Mixtral of Experts", 2024, §2.1; transformers' routing, ties aside). The router's auxiliary
load-balancing loss is not computed: the DPO losses never see it.

Two dispatches give the same numbers (float rounding aside):

* ``"sparse"``: each token runs only its ``k`` experts. The ``N·k`` token-expert assignments are sorted by
  expert, each expert's group padded to whole tiles, and the tiles multiplied by their expert's kernels
  (:func:`grouped_experts`); the weighted outputs are added back to their tokens. No token is dropped and
  there is no capacity factor: the groups are as large as the router makes them. FLOPs: ``k`` expert MLPs
  per token plus the tile padding (at most half again); memory: the kernels gathered per tile (up to
  ``3E`` expert kernels per matrix, kept for the backward pass).
* ``"dense"``: every expert runs on every token and the unpicked ones are weighted by zero: ``E / k``
  times the FLOPs, but plain einsums that shard simply. The ``expert`` logical axis maps to the mesh's
  ``expert`` axis (:mod:`jaxalign.parallel`): with ``make_mesh((data, fsdp, tensor, expert))`` each device
  holds ``E / expert`` experts and the sum over the experts becomes an all-reduce.

``"auto"`` (every layer's default) picks sparse, except dense when the current mesh (``jax.set_mesh``, as
the trainer and the jobs set it) has an ``expert`` axis larger than one (a grouped matmul over experts split
across devices needs an all-to-all exchange of the tokens, which this module does not write).
:func:`set_dispatch` forces one. (LoRA adapters cannot sit on the stacked expert kernels:
:func:`jaxalign.models.lora.apply` refuses them, so the grouped path never bypasses one.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import base

DISPATCH = ("auto", "sparse", "dense")


def top_k_routing(router_logits_BTE: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """``(probabilities [B, T, k] float32, experts [B, T, k] int32)``: each token's ``k`` largest softmax
    probabilities (renormalised to sum to one when ``normalize``) and their experts."""
    probs_BTE = jax.nn.softmax(router_logits_BTE.astype(jnp.float32), axis=-1)
    top_p_BTK, top_i_BTK = jax.lax.top_k(probs_BTE, k)
    if normalize:
        top_p_BTK = top_p_BTK / top_p_BTK.sum(-1, keepdims=True)
    return top_p_BTK, top_i_BTK


def routing_weights(router_logits_BTE: jax.Array, k: int, normalize: bool) -> jax.Array:
    """Float32 ``[B, T, E]``: the top-``k`` softmax probabilities of each token (renormalised when asked),
    zero for the other experts."""
    top_p_BTK, top_i_BTK = top_k_routing(router_logits_BTE, k, normalize)
    one_hot_BTKE = jax.nn.one_hot(top_i_BTK, router_logits_BTE.shape[-1], dtype=jnp.float32)
    return jnp.einsum("BTKE,BTK->BTE", one_hot_BTKE, top_p_BTK)


def tile_rows(assignments: int, experts: int) -> int:
    """Rows per tile of :func:`grouped_experts`: about ``M / 2E`` (a multiple of 8), so that at most
    ``3E`` tiles are computed (``M + E·(t − 1)`` rows at most, under 1.5 M when ``M ≥ 2E·8``)."""
    t = max(8, -(-assignments // (2 * experts)))
    return -(-t // 8) * 8


def grouped_experts(x_ND: jax.Array, top_p_NK: jax.Array, top_i_NK: jax.Array, gate_EDF: jax.Array,
                    up_EDF: jax.Array, down_EFD: jax.Array, act) -> jax.Array:
    """Float32 ``[N, D]``: ``Σ_k p_k · down_k(act(gate_k(x)) · up_k(x))``, computing only the chosen experts.

    The ``M = N·K`` assignments are sorted by expert (stably) and each expert's group is padded with zero
    rows to a multiple of :func:`tile_rows` ``t``, so every tile of ``t`` rows belongs to one expert: the
    tiles (``G``, a static bound) are multiplied by their expert's kernels, gathered per tile, in one
    batched matmul, and each assignment's row is read back. Exact: no token is dropped, whatever the
    routing. (``jax.lax.ragged_dot`` would say the same, but on CPU jax 0.10.2 lowers it to a dense product
    over all groups: more FLOPs than the dense dispatch.)
    """
    N, K = top_i_NK.shape
    E, D = gate_EDF.shape[0], x_ND.shape[-1]
    M = N * K
    t = tile_rows(M, E)
    G = (M + E * (t - 1)) // t  # Σ_e ceil(count_e / t) never exceeds this
    expert_M = top_i_NK.reshape(M)
    order_M = jnp.argsort(expert_M, stable=True)
    sorted_M = jnp.take(expert_M, order_M)
    sizes_E = jnp.bincount(expert_M, length=E)
    padded_E = -(-sizes_E // t) * t
    row_M = (jnp.take(jnp.cumsum(padded_E) - padded_E, sorted_M)  # the group's first padded row
             + jnp.arange(M) - jnp.take(jnp.cumsum(sizes_E) - sizes_E, sorted_M))  # the rank in the group
    token_M = order_M // K
    x_GTD = jnp.zeros((G * t, D), x_ND.dtype).at[row_M].set(jnp.take(x_ND, token_M, axis=0)).reshape(G, t, D)
    # each tile's expert; tiles past the last group hold zeros and are read by no one
    expert_G = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(G) * t, side="right"), E - 1)
    gate_GDF, up_GDF, down_GFD = (jnp.take(w, expert_G, axis=0) for w in (gate_EDF, up_EDF, down_EFD))
    h_GTF = act(jnp.einsum("GTD,GDF->GTF", x_GTD, gate_GDF)) * jnp.einsum("GTD,GDF->GTF", x_GTD, up_GDF)
    out_MD = jnp.take(jnp.einsum("GTF,GFD->GTD", h_GTF, down_GFD).reshape(G * t, D), row_M, axis=0)
    weight_M = jnp.take(top_p_NK.reshape(M), order_M)
    return jnp.zeros((N, D), jnp.float32).at[token_M].add(out_MD.astype(jnp.float32) * weight_M[:, None])


def _expert_axis_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get("expert", 1)


class SparseMoE(nnx.Module):
    """``E`` gated expert MLPs (stacked ``[E, …]`` kernels, logical axis ``"expert"``) and a router."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        p = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.router = base.Einsum("BTD,DE->BTE", (D, E), ("embed", "expert"), **p)
        self.expert_gate = base.Einsum("BTD,EDF->BTEF", (E, D, F), ("expert", "embed", "mlp"), **p)
        self.expert_up = base.Einsum("BTD,EDF->BTEF", (E, D, F), ("expert", "embed", "mlp"), **p)
        self.expert_down = base.Einsum("BTEF,EFD->BTED", (E, F, D), ("expert", "mlp", "embed"), **p)
        self.act = base.activation(cfg.hidden_act)
        self.k, self.normalize, self.dtype = cfg.experts_per_token, cfg.norm_topk_prob, dtype
        self.dispatch = "auto"

    def uses_sparse(self) -> bool:
        """Whether a call (traced now) runs the grouped dispatch (``"auto"``: the module doc's rule)."""
        if self.dispatch != "auto":
            return self.dispatch == "sparse"
        return _expert_axis_size() == 1

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        router_logits_BTE = self.router(x_BTD)
        if self.uses_sparse():
            B, T, D = x_BTD.shape
            top_p_BTK, top_i_BTK = top_k_routing(router_logits_BTE, self.k, self.normalize)
            kernels = [m.kernel[...].astype(self.dtype) for m in (self.expert_gate, self.expert_up, self.expert_down)]
            out_ND = grouped_experts(x_BTD.astype(self.dtype).reshape(B * T, D), top_p_BTK.reshape(B * T, self.k),
                                     top_i_BTK.reshape(B * T, self.k), *kernels, self.act)
            return out_ND.reshape(B, T, D).astype(self.dtype)
        weights_BTE = routing_weights(router_logits_BTE, self.k, self.normalize)
        h_BTEF = self.act(self.expert_gate(x_BTD)) * self.expert_up(x_BTD)
        out_BTED = self.expert_down(h_BTEF)
        return jnp.einsum("BTED,BTE->BTD", out_BTED.astype(jnp.float32), weights_BTE).astype(self.dtype)


def set_dispatch(model: nnx.Module, dispatch: str) -> nnx.Module:
    """Sets every :class:`SparseMoE` of ``model`` to ``dispatch`` (one of :data:`DISPATCH`); returns it."""
    if dispatch not in DISPATCH:
        raise ValueError(f"MoE dispatch must be one of {', '.join(DISPATCH)}, got {dispatch!r}")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, SparseMoE):
            module.dispatch = dispatch
    return model
