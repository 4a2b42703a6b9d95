"""Mixture-of-experts dispatch: the sparse (grouped, top-k only) path against float64 NumPy brute force
and against the dense path (logits and gradients), the ``auto`` choice, and the compiled FLOP count.

transformers parity of the MoE families (run on the default, sparse path) is in test_models_families.py;
the expert-sharded mesh (dense under ``auto``) in test_expert_axis.py."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import make_tiny  # noqa: E402

from jaxalign import parallel  # noqa: E402
from jaxalign.errors import ModelError  # noqa: E402
from jaxalign.models import load_pretrained, lora, moe  # noqa: E402


def _silu64(x):
    return x / (1.0 + np.exp(-x))


def _brute(x, top_p, top_i, gate, up, down):
    """Float64: each token's Σ_k p_k · down_k(silu(gate_k x) · up_k x), one token and expert at a time."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for p, e in zip(top_p[n], top_i[n]):
            out[n] += p * ((_silu64(x[n] @ gate[e]) * (x[n] @ up[e])) @ down[e])
    return out


@pytest.mark.parametrize("routing", ["random", "one_expert", "two_of_eight"])
def test_grouped_experts_equal_brute_force(routing):
    """Any routing, including every token on one expert (nothing is dropped) and empty experts."""
    rng = np.random.default_rng(0)
    N, K, E, D, F = 37, 2, 8, 12, 20
    x = rng.normal(size=(N, D))
    gate, up, down = rng.normal(size=(E, D, F)) / 3, rng.normal(size=(E, D, F)) / 3, rng.normal(size=(E, F, D)) / 4
    top_i = np.stack([rng.permutation(E)[:K] for _ in range(N)])
    if routing == "one_expert":
        top_i = np.stack([np.full(N, 5), rng.integers(0, 5, N)], 1)  # expert 5 gets every token
    elif routing == "two_of_eight":
        top_i = np.tile([3, 6], (N, 1))  # six experts empty
    top_p = rng.dirichlet(np.ones(K), size=N)
    got = moe.grouped_experts(*(jnp.asarray(a, jnp.float32) for a in (x, top_p)), jnp.asarray(top_i, jnp.int32),
                              *(jnp.asarray(a, jnp.float32) for a in (gate, up, down)), jax.nn.silu)
    # float32 against float64 on O(1) values through three matmuls of width ≤ 20: 1e-5
    np.testing.assert_allclose(np.asarray(got), _brute(x, top_p, top_i, gate, up, down), atol=1e-5, rtol=1e-5)


def _loss_and_grads(model, ids, mask):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(ids, mask).logits
        return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., 7])

    logits = nnx.merge(graphdef, state)(ids, mask).logits
    return np.asarray(logits), jax.grad(loss)(state)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_sparse_equals_dense_logits_and_gradients(model_type, tmp_path):
    model, _ = load_pretrained(make_tiny(model_type, tmp_path / model_type))
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(5, 120, size=(3, 9)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    dense = _loss_and_grads(moe.set_dispatch(model, "dense"), ids, mask)
    sparse = _loss_and_grads(moe.set_dispatch(model, "sparse"), ids, mask)
    valid = np.asarray(mask) > 0
    # the same float32 products summed in another order (K terms, not E with zeros): 1e-5
    np.testing.assert_allclose(sparse[0][valid], dense[0][valid], atol=1e-5)
    flat_d, flat_s = jax.tree.leaves(dense[1]), jax.tree.leaves(sparse[1])
    scale = max(float(np.abs(g).max()) for g in flat_d)
    assert scale > 0
    for gd, gs in zip(flat_d, flat_s):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), atol=1e-5 * scale)


def test_auto_dispatch_choice(tmp_path):
    model, _ = load_pretrained(make_tiny("qwen3_moe", tmp_path / "moe"))
    layer = model.layers[0].mlp
    assert layer.dispatch == "auto" and layer.uses_sparse()
    with jax.set_mesh(parallel.make_mesh((2, 1, 1, 4))):
        assert not layer.uses_sparse()  # experts split over devices: dense
    with jax.set_mesh(parallel.make_mesh((8, 1, 1, 1))):
        assert layer.uses_sparse()
    with pytest.raises(ModelError, match="LoRA needs a kernel"):  # so the grouped path never skips one
        lora.apply(model, lora.LoRASettings(target=r"layers\.0\.mlp\.expert_up", r=2, alpha=4.0))
    with pytest.raises(ValueError, match="MoE dispatch must be one of auto, sparse, dense"):
        moe.set_dispatch(model, "grouped")


def test_sparse_compiles_to_fewer_flops(tmp_path):
    """XLA's own FLOP count of the forward pass: top-2 of 4 experts is under the dense count (which runs
    all 4), by more than the router and attention could hide."""
    model, _ = load_pretrained(make_tiny("qwen3_moe", tmp_path / "moe", moe_intermediate_size=256))
    ids = jnp.ones((2, 64), jnp.int32)

    def flops(dispatch):
        graphdef, state = nnx.split(moe.set_dispatch(model, dispatch))
        fn = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, jnp.ones_like(ids)).logits)
        cost = fn.lower(state).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    assert flops("sparse") < 0.8 * flops("dense")
