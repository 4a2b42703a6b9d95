"""The one-pass pair layout and the projections' kernel-gradient layout (issue 20):

* ``base.branch_positions`` against a brute-force count: each branch token's position and visible keys are
  those of the row ``[trunk | its branch]`` alone;
* ``base.Branches`` (the static layout that attends per part) against the same brute force: positions, and
  the trunk's and branches' masks over their own keys (gaps, both padding sides, a sliding window);
* ``pair_forward(fused=True)`` (rows ``[prompt | chosen | rejected]``, responses as branches) equals the
  KV-cache path ``fused=False`` on several families (sliding windows and soft-capping included);
* ``base.contract`` (``rows_matmul``) equals a float64 NumPy einsum in value and gradients;
* responses that fill their padded length (the EOS in the last column, which ``pair_forward`` does not run:
  ``pairs.run_length``) give the full rows' log-probs, sums and gradients on both layouts, and the CHES
  scorer's one pass (``pairs.fused_pays``, the whole row for short responses) gives the full rows' scores.
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
from test_pairs import _examples, _full_rows, _shared_batch  # noqa: E402

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


def _brute_mask(q_pos, q_valid, k_pos, k_valid, window=None):
    """[Tq, Tk] by the definition: a valid query sees valid keys at positions <= its own (within the
    window); a padding query sees the first valid key only."""
    m = np.zeros((len(q_pos), len(k_pos)), bool)
    for t in range(len(q_pos)):
        if q_valid[t]:
            m[t] = k_valid & (k_pos <= q_pos[t]) & ((q_pos[t] - k_pos) < window if window else True)
        else:
            m[t, np.argmax(k_valid)] = True
    return m


@pytest.mark.parametrize("window", [None, 2])
def test_static_branches_attend_per_part_as_brute_force(window):
    rng = np.random.default_rng(4)
    P, R, C = 5, 3, 2
    branch = np.repeat(np.arange(C + 1), [P] + [R] * C)
    masks = np.ones((5, P + C * R), np.int32)
    masks[0, :2] = 0  # left-padded prompt
    masks[1, 3:P] = 0  # right-padded prompt
    masks[2, P + 1:P + R] = 0  # short first branch
    masks[3] = rng.integers(0, 2, P + C * R)  # gaps anywhere
    masks[3, 0] = 1  # (at least one valid key for every query)
    layout = base.Branches(P, R, C)
    pos = np.asarray(layout.positions(jnp.asarray(masks)))
    valid = jnp.asarray(masks).astype(bool)
    split = base.attention_mask_BTS(jnp.asarray(pos), jnp.asarray(pos), valid,
                                    base.BranchKeys(jnp.asarray(pos), valid, layout), sliding_window=window)
    assert isinstance(split, base.SplitMask)
    assert split.trunk_BPP.shape == (5, P, P) and split.branches_NRS.shape == (5 * C, R, P + R)
    for b in range(len(masks)):
        want_pos, _ = _brute_positions(masks[b], branch)
        np.testing.assert_array_equal(pos[b], want_pos)
        m = masks[b].astype(bool)
        np.testing.assert_array_equal(np.asarray(split.trunk_BPP[b]),
                                      _brute_mask(want_pos[:P], m[:P], want_pos[:P], m[:P], window))
        for j in range(C):
            cols = np.r_[0:P, P + j * R:P + (j + 1) * R]  # the row [trunk | branch j]
            np.testing.assert_array_equal(
                np.asarray(split.branches_NRS[b * C + j]),
                _brute_mask(want_pos[cols[P:]], m[cols[P:]], want_pos[cols], m[cols], window), err_msg=f"{b} {j}")
    # the split and the join are inverses, and each branch row's keys are its own trunk, then itself
    x = jnp.arange(5 * (P + C * R) * 2).reshape(5, P + C * R, 2)
    trunk, branches = layout.split_rows(x)
    np.testing.assert_array_equal(np.asarray(layout.join_rows(trunk, branches)), np.asarray(x))
    keys = np.asarray(layout.keys(trunk, branches))
    np.testing.assert_array_equal(keys[3 * C + 1], np.asarray(x)[3, np.r_[0:P, P + R:P + 2 * R]])
    # a layout that does not cover the rows is refused by name
    with pytest.raises(base.ModelError, match=r"branch_BT \(5, 3, 3\) .* covers 14 columns; the rows have 11"):
        base.DecoderLM.call_positions(jnp.asarray(masks), None, (P, R, 3))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3_moe"])
@pytest.mark.parametrize("prompt_side,whole_row", [("left", False), ("right", False), ("left", True)])
def test_fused_pair_forward_equals_cache_path(family, prompt_side, whole_row, tmp_path, monkeypatch):
    from jaxalign.models import load_pretrained

    # both attention forms of the one pass: per part (base.Branches) and the whole row under a branch mask
    monkeypatch.setattr(pairs, "whole_row_attention_pays", lambda P, R: whole_row)

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


def _tight_batch(ex, prompt_side="left"):
    """:func:`test_pairs._shared_batch` without its extra response column: the longest response's EOS
    sits in the last column."""
    batch = _shared_batch(ex, prompt_side)
    return {k: v[:, :-1] if k.startswith(("chosen", "rejected")) else v for k, v in batch.items()}


@pytest.mark.parametrize("layout", ["cache", "per_part", "whole_row"])
def test_responses_filling_their_length_equal_full_rows(layout, tmp_path, monkeypatch):
    from jaxalign.models import load_pretrained

    fused = layout != "cache"
    monkeypatch.setattr(pairs, "whole_row_attention_pays", lambda P, R: layout == "whole_row")

    model, _ = load_pretrained(make_tiny("llama", tmp_path / "llama", seed=7))
    ex = _examples(2)
    B = len(ex)
    batch, rows = _tight_batch(ex), _full_rows(ex, "right")
    assert batch["rejected_ids"].shape[1] == max(len(r) for _, _, r in ex)
    graphdef, state = nnx.split(model)

    def total(state, f):  # Σ log-probs of both responses: one scalar to differentiate
        m = nnx.merge(graphdef, state)
        return jnp.sum(f(m))

    pair = lambda m: pairs.pair_forward(m, *(batch[k] for k in pairs.KEYS), chunk_size=2,  # noqa: E731
                                        fused=fused).chosen_logps
    full = lambda m: pairs.sequence_forward(m, *rows)["logps"][:B]  # noqa: E731
    (got, g_got), (want, g_want) = (jax.jit(jax.value_and_grad(total), static_argnums=1)(state, f)
                                    for f in (pair, full))
    # float32 through two layers, sums in another order: rounding only
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    out = jax.jit(lambda s: pairs.pair_forward(nnx.merge(graphdef, s), *(batch[k] for k in pairs.KEYS),
                                               logps=True, hidden_sums=True, fused=fused))(state)
    ref = jax.jit(lambda s: pairs.sequence_forward(nnx.merge(graphdef, s), *rows, hidden_sums=True))(state)
    for got_BD, want_BD in ((out.rejected_logps, ref["logps"][B:]), (out.rejected_hidden_sum, ref["hidden_sum"][B:]),
                            (out.rejected_last_hidden, ref["last_hidden"][B:])):
        np.testing.assert_allclose(np.asarray(got_BD), np.asarray(want_BD), rtol=1e-4, atol=1e-4)


def test_ches_scorer_short_responses_take_one_pass_and_equal_full_rows(tmp_path):
    from jaxalign.analysis import ches
    from jaxalign.models import load_pretrained

    model, _ = load_pretrained(make_tiny("llama", tmp_path / "llama", seed=8))
    rng = np.random.default_rng(3)
    ex = [(rng.integers(3, 60, size=P).tolist(), rng.integers(3, 60, size=c - 1).tolist() + [2],
           rng.integers(3, 60, size=r - 1).tolist() + [2]) for P, c, r in ((17, 3, 2), (9, 2, 3), (20, 1, 3))]
    batch = _tight_batch(ex)
    P, R = batch["prompt_ids"].shape[1], batch["chosen_ids"].shape[1]
    assert pairs.fused_pays() and pairs.whole_row_attention_pays(P, R - 1)
    assert not pairs.whole_row_attention_pays(P, 4 * R)  # longer responses: attention per part
    got = jax.jit(lambda b: ches.pair_scores(model, *(b[k] for k in pairs.KEYS), return_sums=True))(batch)
    rows = _full_rows(ex, "left")
    ref = jax.jit(lambda r: pairs.sequence_forward(model, *r, logps=False, hidden_sums=True))(rows)
    S = np.asarray(ref["hidden_sum"], np.float64)
    sp, sm = S[:len(ex)], S[len(ex):]
    want = np.sum(sp * sm, 1) - np.sum(sp * sp, 1)  # Razin et al., Definition 2, in float64
    # float32 hidden states of unit scale summed over ≤ 3 positions and 64 dims: rounding ≈ 1e-5
    np.testing.assert_allclose(np.asarray(got["chosen_sum"]), sp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got["ches"]), want, rtol=1e-4, atol=1e-3)
