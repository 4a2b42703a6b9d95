"""The one-pass pair layout and the projections' kernel-gradient layout (issue 20):

* ``base.branch_positions`` against a brute-force count: each branch token's position and visible keys are
  those of the row ``[trunk | its branch]`` alone;
* ``pair_forward(fused=True)`` (rows ``[prompt | chosen | rejected]``, responses as branches) equals the
  KV-cache path ``fused=False`` on several families (sliding windows and soft-capping included);
* ``base.contract`` (``rows_matmul``) equals a float64 NumPy einsum in value and gradients.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from hf_tiny import make_tiny  # noqa: E402
from test_pairs import _examples, _shared_batch  # noqa: E402

from jaxalign import pairs  # noqa: E402
from jaxalign.models import base  # noqa: E402


def _brute_positions(mask, branch):
    """Per token: the valid tokens it sees (trunk or own branch) before it; its visible valid keys."""
    T = len(mask)
    pos, vis = np.zeros(T, int), np.zeros((T, T), bool)
    for t in range(T):
        sees = [s for s in range(T) if mask[s] and branch[s] in (0, branch[t])]
        vis[t, sees] = True
        before = sum(1 for s in sees if s < t)
        pos[t] = before  # a padding token takes the next valid token's position, as positions_from_mask
    return pos, vis


def test_branch_positions_match_brute_force():
    rng = np.random.default_rng(0)
    P, R = 5, 3
    branch = np.repeat([0, 1, 2], [P, R, R])
    masks = np.ones((6, P + 2 * R), np.int32)
    masks[0, :2] = 0  # left-padded prompt
    masks[1, 3:P] = 0  # right-padded prompt
    masks[2, P + 1:P + R] = 0  # short chosen
    masks[3, P + R + 2:] = 0  # short rejected
    masks[4] = rng.integers(0, 2, P + 2 * R)  # gaps anywhere
    pos, vis = base.branch_positions(jnp.asarray(masks), jnp.asarray(branch)[None])
    for b in range(len(masks)):
        want_pos, want_vis = _brute_positions(masks[b], branch)
        np.testing.assert_array_equal(np.asarray(pos[b]), want_pos)
        np.testing.assert_array_equal(np.asarray(vis[b]), want_vis)
    # a branch token's position continues its own row [trunk | branch] and never counts the other branch
    np.testing.assert_array_equal(np.asarray(pos[5, P + R:]), np.arange(P, P + R))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3_moe"])
@pytest.mark.parametrize("prompt_side", ["left", "right"])
def test_fused_pair_forward_equals_cache_path(family, prompt_side, tmp_path):
    from jaxalign.models import load_pretrained

    model, _ = load_pretrained(make_tiny(family, tmp_path / family, seed=5))
    batch = _shared_batch(_examples(4), prompt_side)
    args = [batch[k] for k in pairs.KEYS]
    graphdef, state = nnx.split(model)

    @jax.jit
    def both(state):
        m = nnx.merge(graphdef, state)
        kw = dict(logps=True, hidden_sums=True, chunk_size=2)
        return (pairs.pair_forward(m, *args, fused=True, **kw), pairs.pair_forward(m, *args, fused=False, **kw),
                pairs.pair_forward(m, *args, fused=True, logps=False, hidden_sums=True, layer=1),
                pairs.pair_forward(m, *args, fused=False, logps=False, hidden_sums=True, layer=1))

    fused, cached, fused_l1, cached_l1 = both(state)
    # float32 through two layers; the two paths attend over differently sized key sets (masked slots
    # differ), so sums are ordered differently: rounding only.
    for got, want in ((fused, cached), (fused_l1, cached_l1)):
        for name, a in got._asdict().items():
            if a is not None:
                np.testing.assert_allclose(np.asarray(a), np.asarray(getattr(want, name)), rtol=1e-5, atol=1e-5,
                                           err_msg=name)


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 4, 5)),
    ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 8)),
    ("BTD,DF->BTF", (3, 2, 8), (8, 6)),
    ("BTD,EDF->BTEF", (2, 3, 8), (2, 8, 6)),  # not a row matmul: plain einsum
])
def test_contract_value_and_gradients_match_float64(equation, x_shape, w_shape):
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    c = rng.normal(size=np.einsum(equation, x, w).shape)  # the output cotangent
    y, vjp = jax.vjp(lambda a, b: base.contract(equation, a, b), jnp.asarray(x, jnp.float32),
                     jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(c, jnp.float32))
    ins, out = equation.split("->")
    xs, ws = ins.split(",")
    # float32 products of ≤ 20 terms of unit-scale numbers: rounding ≈ 1e-6 relative
    np.testing.assert_allclose(np.asarray(y), np.einsum(equation, x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.einsum(f"{out},{ws}->{xs}", c, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum(f"{xs},{out}->{ws}", x, c), rtol=1e-5, atol=1e-5)
    # forward mode too (jvp of the gradient: the entanglement probe's `jvp` method)
    t = rng.normal(size=w_shape)
    _, tan = jax.jvp(lambda b: base.contract(equation, jnp.asarray(x, jnp.float32), b),
                     (jnp.asarray(w, jnp.float32),), (jnp.asarray(t, jnp.float32),))
    np.testing.assert_allclose(np.asarray(tan), np.einsum(equation, x, t), rtol=1e-5, atol=1e-5)
