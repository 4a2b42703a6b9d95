"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE) for the Llama-like decoder.

Letters: B batch, T tokens, D model width, E experts, F expert MLP width.

Each token's router logits ``x · W_r`` go through a float32 softmax over the ``E`` experts; the ``k``
largest probabilities pick the experts (renormalised to sum to one for Mixtral, and for Qwen3-MoE when
``norm_topk_prob``), and the token's output is ``Σ_k p_k · down_k(act(gate_k(x)) · up_k(x))`` (Jiang et al.,
"Mixtral of Experts", 2024, §2.1; transformers' routing, ties aside). The router's auxiliary
load-balancing loss is not computed: the DPO losses never see it.

Dispatch is dense: every expert runs on every token and the unpicked ones are weighted by zero. That is
exact, and simple to shard, but costs ``E / k`` times the FLOPs of a grouped dispatch. The ``expert``
logical axis maps to the mesh's ``expert`` axis (:mod:`jaxalign.parallel`): with
``make_mesh((data, fsdp, tensor, expert))`` each device holds ``E / expert`` experts and the sum over the
experts becomes an all-reduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import base


def routing_weights(router_logits_BTE: jax.Array, k: int, normalize: bool) -> jax.Array:
    """Float32 ``[B, T, E]``: the top-``k`` softmax probabilities of each token (renormalised when asked),
    zero for the other experts."""
    probs_BTE = jax.nn.softmax(router_logits_BTE.astype(jnp.float32), axis=-1)
    top_p_BTK, top_i_BTK = jax.lax.top_k(probs_BTE, k)
    if normalize:
        top_p_BTK = top_p_BTK / top_p_BTK.sum(-1, keepdims=True)
    one_hot_BTKE = jax.nn.one_hot(top_i_BTK, probs_BTE.shape[-1], dtype=jnp.float32)
    return jnp.einsum("BTKE,BTK->BTE", one_hot_BTKE, top_p_BTK)


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

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        weights_BTE = routing_weights(self.router(x_BTD), self.k, self.normalize)
        h_BTEF = self.act(self.expert_gate(x_BTD)) * self.expert_up(x_BTD)
        out_BTED = self.expert_down(h_BTEF)
        return jnp.einsum("BTED,BTE->BTD", out_BTED.astype(jnp.float32), weights_BTE).astype(self.dtype)
