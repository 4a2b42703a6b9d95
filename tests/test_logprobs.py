"""Log-probs and response masks against float64 NumPy and hand-built cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import EPS32, assert_close_to_scale

from jaxalign import logprobs


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture
def logits_and_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(3, 11, 37)).astype(np.float32)
    logits[0, 0, 5] = 80.0  # large logit: a naive exp would overflow in float32 without max-shifting
    targets = rng.integers(0, 37, size=(3, 11))
    return logits, targets


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 11, 64])
def test_token_logprobs_equal_float64_numpy(logits_and_targets, chunk_size):
    logits, targets = logits_and_targets
    expected = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    got = logprobs.token_logprobs(jnp.asarray(logits), jnp.asarray(targets), chunk_size=chunk_size)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_use_float32_softmax(logits_and_targets):
    logits, targets = logits_and_targets
    bf = jnp.asarray(logits, jnp.bfloat16)
    expected = np.take_along_axis(_np_log_softmax(np.asarray(bf.astype(jnp.float32))),
                                  targets[..., None], -1)[..., 0]
    got = logprobs.token_logprobs(bf, jnp.asarray(targets))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("jit", [False, True])
def test_from_hidden_chunked_equals_dense_values_and_grads(jit):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(8, 29)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 29, size=(2, 13)))

    def total(h, w, chunk):
        lp = logprobs.token_logprobs_from_hidden(h, targets, lambda x: x @ w, chunk_size=chunk)
        return jnp.sum(lp * jnp.arange(13.0))

    f = jax.jit(total, static_argnums=2) if jit else total
    dense = f(hidden, W, None)
    expected = np.take_along_axis(_np_log_softmax(np.asarray(hidden, np.float64) @ np.asarray(W)),
                                  np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(dense), (expected * np.arange(13.0)).sum(), rtol=1e-5)
    for chunk in (1, 5, 13):
        # another program (logsumexp merged over vocabulary chunks): a weighted sum of 13 log-probs of
        # one sign, each good to a few ulps: 1e-5 ≈ 170 ulps
        np.testing.assert_allclose(float(f(hidden, W, chunk)), float(dense), rtol=1e-5)
        g_chunk = jax.grad(f, argnums=(0, 1))(hidden, W, chunk)
        g_dense = jax.grad(f, argnums=(0, 1))(hidden, W, None)
        for a, b in zip(g_chunk, g_dense):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_shift_targets():
    ids = jnp.array([[5, 6, 7], [8, 9, 1]])
    np.testing.assert_array_equal(logprobs.shift_targets(ids, pad_id=0), [[6, 7, 0], [9, 1, 0]])


def _mask_by_hand(row_tokens, prompt_len):
    """Brute force: list the (position, target) pairs whose target is a response token."""
    valid = [i for i, t in enumerate(row_tokens) if t is not None]
    response_token_idx = set(valid[prompt_len:])
    return [1 if (t + 1) in response_token_idx else 0 for t in range(len(row_tokens))]


@pytest.mark.parametrize("side", ["right", "left"])
def test_response_mask_follows_the_convention(side):
    # prompt of 3 tokens, response of 2 (+EOS): positions predicting the 3 response tokens are
    # the last prompt token and the first two response tokens.
    rows = [([1, 2, 3], [4, 5, 99]), ([1], [7, 99]), ([1, 2, 3, 4, 5], [99])]
    T = 8
    ids, attn, prompt_lens, by_hand = [], [], [], []
    for prompt, response in rows:
        toks = prompt + response
        pad = [None] * (T - len(toks))
        row = toks + pad if side == "right" else pad + toks
        ids.append([0 if t is None else t for t in row])
        attn.append([0 if t is None else 1 for t in row])
        prompt_lens.append(len(prompt))
        by_hand.append(_mask_by_hand(row, len(prompt)))
    mask = logprobs.response_mask(jnp.array(attn), jnp.array(prompt_lens))
    np.testing.assert_array_equal(np.asarray(mask, int), by_hand)
    # Each response position's target is exactly a response token, in order.
    targets = np.asarray(logprobs.shift_targets(jnp.array(ids)))
    for b, (prompt, response) in enumerate(rows):
        assert list(targets[b][np.asarray(mask[b])]) == response


def test_sequence_logprobs_sum_over_response_positions():
    rng = np.random.default_rng(2)
    lp = rng.normal(size=(4, 9)).astype(np.float32)
    mask = rng.integers(0, 2, size=(4, 9)).astype(bool)
    total, length = logprobs.sequence_logprobs(jnp.asarray(lp), jnp.asarray(mask))
    # a float32 sum of 9 terms of both signs: within 9·2⁻²⁴ of the sum of their magnitudes
    assert_close_to_scale(total, (lp.astype(np.float64) * mask).sum(-1), 9 * EPS32,
                          scale=(np.abs(lp.astype(np.float64)) * mask).sum(-1), err_msg="sequence sums")
    np.testing.assert_array_equal(np.asarray(length), mask.sum(-1))
