"""Token and sequence log-probabilities under the sequence convention of DESIGN §3.

Letters: B rows, T sequence length, D model width, V vocabulary, C chunk length.

The convention. A row holds ``prompt_ids + response_ids`` (``response_ids`` ends with EOS), padded on
either side. Position ``t`` *predicts* token ``t + 1``, so the target of position ``t`` is
``input_ids[t + 1]``. The **response positions** are the positions that predict response tokens: from the
last prompt token to the second-to-last token of the row. A sequence log-prob is the **sum** of the
target log-probs over the response positions; its length is the number of those positions (= the number
of response tokens, EOS included).

Nothing here materialises a ``[B, T, V]`` float32 log-softmax: the log-prob of the target is
``logit[target] - logsumexp(logits)``, evaluated chunk by chunk over the sequence, and when the logits
come from hidden states each chunk's logits are recomputed in the backward pass (``jax.checkpoint``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp


def shift_targets(input_ids_BT: jax.Array, pad_id: int = 0) -> jax.Array:
    """Targets ``[B, T]``: ``input_ids[:, t + 1]``; the last column (nothing to predict) is ``pad_id``."""
    pad = jnp.full_like(input_ids_BT[:, :1], pad_id)
    return jnp.concatenate([input_ids_BT[:, 1:], pad], axis=1)


def response_mask(attention_mask_BT: jax.Array, prompt_lengths_B: jax.Array) -> jax.Array:
    """Mask ``[B, T]`` of response positions (those predicting response tokens).

    Works for left, right or mixed padding: the response tokens of a row are its valid tokens after the
    first ``prompt_lengths[b]`` valid ones, and position ``t`` is a response position iff token ``t + 1``
    is a response token.

    Args:
      attention_mask_BT: ``[B, T]`` 1 for real tokens, 0 for padding.
      prompt_lengths_B: ``[B]`` number of prompt tokens of each row.

    Returns:
      ``[B, T]`` bool.

    Examples:
      >>> import jax.numpy as jnp
      >>> response_mask(jnp.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]), jnp.array([2, 1])).astype(int)
      Array([[0, 1, 1, 0, 0],
             [0, 1, 1, 1, 0]], dtype=int32)
    """
    mask = attention_mask_BT.astype(bool)
    rank_BT = jnp.cumsum(mask, axis=1) - 1  # index of each valid token among the valid tokens
    is_response_token = mask & (rank_BT >= prompt_lengths_B[:, None])
    return jnp.concatenate([is_response_token[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)


_SELECT_PICK = contextvars.ContextVar("select_pick", default=False)


@contextlib.contextmanager
def select_targets(enabled: bool = True):
    """Trace the target logit's pick as a masked sum over the vocabulary (``where(v == target, logit,
    0)`` summed: the same float32 value, only zeros added) instead of a gather. libtpu 0.0.42.1's
    compiler aborts on the gather's lowering inside the per-pair gradient programs of ``jaxalign
    entangle`` (exact and Gram methods; docs/plan.md, Known problems), which enter this context with
    ``enabled`` true when they are traced for a TPU (the extra vocabulary-wide pass is not paid elsewhere)."""
    token = _SELECT_PICK.set(bool(enabled))
    try:
        yield
    finally:
        _SELECT_PICK.reset(token)


def _target_logprobs_dense(logits_BCV: jax.Array, targets_BC: jax.Array) -> jax.Array:
    logits = logits_BCV.astype(jnp.float32)
    lse_BC = jax.nn.logsumexp(logits, axis=-1)
    if _SELECT_PICK.get():
        hit_BCV = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets_BC[..., None]
        target_BC = jnp.sum(jnp.where(hit_BCV, logits, 0.0), axis=-1)
    else:
        target_BC = jnp.take_along_axis(logits, targets_BC[..., None], axis=-1)[..., 0]
    return target_BC - lse_BC


def _chunked(fn: Callable[[jax.Array, jax.Array], jax.Array], xs_BT_: jax.Array, targets_BT: jax.Array,
             chunk_size: int | None, remat: bool) -> jax.Array:
    """Applies ``fn(x_BC_, targets_BC) -> [B, C]`` over sequence chunks and concatenates."""
    B, T = targets_BT.shape
    if chunk_size is None or chunk_size >= T:
        return fn(xs_BT_, targets_BT)
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    xs = jnp.pad(xs_BT_, [(0, 0), (0, pad)] + [(0, 0)] * (xs_BT_.ndim - 2))
    ts = jnp.pad(targets_BT, [(0, 0), (0, pad)])
    xs_nBC_ = jnp.moveaxis(xs.reshape(B, n, chunk_size, *xs.shape[2:]), 1, 0)
    ts_nBC = jnp.moveaxis(ts.reshape(B, n, chunk_size), 1, 0)
    body = jax.checkpoint(fn) if remat else fn
    out_nBC = jax.lax.map(lambda a: body(*a), (xs_nBC_, ts_nBC))
    return jnp.moveaxis(out_nBC, 0, 1).reshape(B, n * chunk_size)[:, :T]


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, *, chunk_size: int | None = None
                   ) -> jax.Array:
    """Log-probability ``[B, T]`` (float32) of each target token under the logits.

    ``log_softmax(logits)[b, t, targets[b, t]]`` computed as ``logit - logsumexp`` in float32, over
    sequence chunks of ``chunk_size`` (all at once when ``None``).

    Examples:
      >>> import jax.numpy as jnp
      >>> lp = token_logprobs(jnp.log(jnp.array([[[0.5, 0.25, 0.25]]])), jnp.array([[1]]))
      >>> round(float(jnp.exp(lp[0, 0])), 6)
      0.25
    """
    return _chunked(_target_logprobs_dense, logits_BTV, targets_BT, chunk_size, remat=False)


def token_logprobs_from_hidden(hidden_BTD: jax.Array, targets_BT: jax.Array,
                               unembed: Callable[[jax.Array], jax.Array], *,
                               chunk_size: int | None = 128) -> jax.Array:
    """Target log-probs ``[B, T]`` from final hidden states, never holding ``[B, T, V]`` logits.

    Args:
      hidden_BTD: ``[B, T, D]`` final hidden states (after the last norm).
      targets_BT: ``[B, T]`` target ids.
      unembed: maps ``[B, C, D]`` hidden states to ``[B, C, V]`` logits (e.g. ``model.logits``).
      chunk_size: sequence chunk length ``C``; each chunk's logits are recomputed in the backward pass.
    """
    fn = lambda h_BCD, t_BC: _target_logprobs_dense(unembed(h_BCD), t_BC)  # noqa: E731
    return _chunked(fn, hidden_BTD, targets_BT, chunk_size, remat=True)


def sequence_logprobs(token_logprobs_BT: jax.Array, response_mask_BT: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Summed response log-prob ``[B]`` and response length ``[B]`` (int32).

    Examples:
      >>> import jax.numpy as jnp
      >>> s, n = sequence_logprobs(jnp.array([[-1.0, -2.0, -4.0]]), jnp.array([[0, 1, 1]]))
      >>> float(s[0]), int(n[0])
      (-6.0, 2)
    """
    mask = response_mask_BT.astype(bool)
    total_B = jnp.sum(jnp.where(mask, token_logprobs_BT, 0.0), axis=-1)
    return total_B, jnp.sum(mask, axis=-1).astype(jnp.int32)
