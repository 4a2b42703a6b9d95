"""pair_forward (prompt once, both responses from its KV cache) equals sequence_forward (full rows) on tiny
llama and gpt2 models: log-probs, lengths, hidden sums, last hidden states, other layers, gradients; with
the prompt padded on either side and the full rows padded on either side."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from hf_tiny import VOCAB, make_tiny  # noqa: E402

from jaxalign import pairs  # noqa: E402

FAMILIES = ["llama", "gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_model(request, tmp_path_factory):
    from jaxalign.models import load_pretrained

    path = make_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=3)
    model, _ = load_pretrained(path)
    return model


def _examples(seed=0):
    """Four pairs of different prompt and response lengths (responses end with EOS id 2); the last
    chosen response is the EOS alone, so its only response position is the last prompt token."""
    rng = np.random.default_rng(seed)
    ex = []
    for P, Rc, Rr in ((5, 3, 6), (2, 1, 4), (7, 5, 2), (3, 1, 2)):
        ids = lambda n: rng.integers(3, VOCAB, size=n).tolist()  # noqa: E731
        ex.append((ids(P), ids(Rc - 1) + [2], ids(Rr - 1) + [2]))
    return ex


def _shared_batch(ex, prompt_side):
    B = len(ex)
    Tp = max(len(p) for p, _, _ in ex) + 1  # one extra column of padding for every row
    Tr = max(max(len(c), len(r)) for _, c, r in ex) + 1
    out = {k: np.zeros((B, Tp if k.startswith("prompt") else Tr), np.int32)
           for k in ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids",
                     "rejected_mask")}
    for b, (p, c, r) in enumerate(ex):
        s = Tp - len(p) if prompt_side == "left" else 0
        out["prompt_ids"][b, s:s + len(p)], out["prompt_mask"][b, s:s + len(p)] = p, 1
        for name, y in (("chosen", c), ("rejected", r)):
            out[f"{name}_ids"][b, :len(y)], out[f"{name}_mask"][b, :len(y)] = y, 1
    return {k: jnp.asarray(v) for k, v in out.items()}


def _full_rows(ex, side):
    """Rows [chosen…; rejected…] of prompt + response, padded on ``side``."""
    rows = [p + c for p, c, _ in ex] + [p + r for p, _, r in ex]
    plen = [len(p) for p, _, _ in ex] * 2
    T = max(map(len, rows)) + 2
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, row in enumerate(rows):
        s = T - len(row) if side == "left" else 0
        ids[i, s:s + len(row)], mask[i, s:s + len(row)] = row, 1
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(plen)


def _pair(model, batch, **kw):
    return pairs.pair_forward(model, *(batch[k] for k in ("prompt_ids", "prompt_mask", "chosen_ids",
                                                          "chosen_mask", "rejected_ids", "rejected_mask")),
                              **kw)


def _close(a, b, rtol=1e-4, atol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _both(model, ex, prompt_side, row_side, **kw):
    """pair_forward and sequence_forward in one compiled call."""
    batch = _shared_batch(ex, prompt_side)
    rows = _full_rows(ex, row_side)
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, batch, rows):
        m = nnx.merge(graphdef, state)
        return (_pair(m, batch, **kw),
                pairs.sequence_forward(m, *rows, **{k: v for k, v in kw.items() if k != "chunk_size"}))

    return f(state, batch, rows)


@pytest.mark.parametrize("prompt_side,row_side", [("left", "right"), ("right", "left")])
def test_pair_forward_equals_sequence_forward(tiny_model, prompt_side, row_side):
    ex = _examples()
    B = len(ex)
    got, ref = _both(tiny_model, ex, prompt_side, row_side, logps=True, hidden_sums=True, chunk_size=2)
    assert got.chosen_lengths.tolist() == [len(c) for _, c, _ in ex]
    assert got.rejected_lengths.tolist() == [len(r) for _, _, r in ex]
    assert ref["lengths"].tolist() == got.chosen_lengths.tolist() + got.rejected_lengths.tolist()
    _close(got.chosen_logps, ref["logps"][:B])
    _close(got.rejected_logps, ref["logps"][B:])
    _close(got.chosen_hidden_sum, ref["hidden_sum"][:B])
    _close(got.rejected_hidden_sum, ref["hidden_sum"][B:])
    _close(got.chosen_last_hidden, ref["last_hidden"][:B])
    _close(got.rejected_last_hidden, ref["last_hidden"][B:])
    # EOS-only response: one position, the last prompt token, so the sum is the last hidden state.
    _close(got.chosen_last_hidden[3], got.chosen_hidden_sum[3])


def test_layer_option_equals_sequence_forward(tiny_model):
    ex = _examples(1)
    B = len(ex)
    batch, rows = _shared_batch(ex, "left"), _full_rows(ex, "left")
    graphdef, state = nnx.split(tiny_model)

    @jax.jit
    def f(state):
        m = nnx.merge(graphdef, state)
        return (_pair(m, batch, logps=False, hidden_sums=True, layer=-1),
                pairs.sequence_forward(m, *rows, logps=False, hidden_sums=True, layer=-1),
                pairs.sequence_forward(m, *rows, logps=False, hidden_sums=True))

    got, ref, final = f(state)
    _close(got.chosen_hidden_sum, ref["hidden_sum"][:B])
    _close(got.rejected_hidden_sum, ref["hidden_sum"][B:])
    _close(got.rejected_last_hidden, ref["last_hidden"][B:])
    # the last block's output before the final norm differs from the normed one
    assert not np.allclose(np.asarray(final["hidden_sum"]), np.asarray(ref["hidden_sum"]))


def test_layer_out_of_range_is_a_clear_error(tiny_model):
    batch = _shared_batch(_examples(1), "left")
    with pytest.raises(ValueError, match="layer 99 is out of range"):
        jax.eval_shape(lambda b: _pair(tiny_model, b, logps=False, hidden_sums=True, layer=99), batch)


def test_gradients_through_shared_prompt_equal_full_rows(tiny_model):
    if type(tiny_model).__name__ != "Llama":
        pytest.skip("one family suffices for gradients (the forward parity covers gpt2's cache path)")
    """d/dθ Σ (logp(y+) − 0.5·logp(y−)) is the same whether the prompt runs once or twice."""
    ex = _examples(2)
    B = len(ex)
    batch = _shared_batch(ex, "left")
    rows = _full_rows(ex, "right")
    graphdef, state = nnx.split(tiny_model)

    def via_pairs(state):
        out = _pair(nnx.merge(graphdef, state), batch)
        return jnp.sum(out.chosen_logps - 0.5 * out.rejected_logps)

    def via_rows(state):
        lp = pairs.sequence_forward(nnx.merge(graphdef, state), *rows, logps=True)["logps"]
        return jnp.sum(lp[:B] - 0.5 * lp[B:])

    g1 = jax.jit(jax.grad(via_pairs))(state)
    g2 = jax.jit(jax.grad(via_rows))(state)
    flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(flat1) == len(flat2) > 0
    # One scale for all leaves: some (e.g. GPT-2's key bias, which softmax ignores) have a true
    # gradient of zero and only float32 noise, so a per-leaf relative check would compare noise.
    scale = max(float(jnp.max(jnp.abs(b))) for b in flat2)
    for a, b in zip(flat1, flat2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5 * scale)
