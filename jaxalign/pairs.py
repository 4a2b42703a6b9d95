"""Preference pairs through a causal LM, with the shared prompt computed once.

Letters: B pairs, P prompt length, R response length (padded), D model width, V vocabulary.

A pair is ``(x, y+, y-)``. Both responses continue the same prompt, which is usually most of the
tokens, so :func:`pair_forward` runs the prompt once into a KV cache, tiles the cache for the two
responses and continues chosen and rejected from it: the work is ``P + 2R`` tokens instead of
``2(P + R)``. Gradients flow through the shared prompt from both responses. :func:`sequence_forward`
computes the same quantities from full ``prompt + response`` rows (the unshared path; equal, tested).

Under the sequence convention (DESIGN §3) response token ``k`` of ``y`` is predicted by position
``k - 1``; the first response token is predicted by the last prompt token. So for a response of ``n``
tokens (EOS included):

* ``logps(y)  = log p(y_1 | h_last_prompt) + Σ_{j < n-1} log p(y_{j+2} | h_{y_j+1})``, a **sum**;
* ``S(y)      = h_last_prompt + Σ_{j < n-1} h_{y_j+1}`` (CHES, Razin et al. Def. 2), ``|y| = n``;
* ``last_hidden`` = the hidden state at the last summed position (the last token before EOS; the
  paper's ``last_hidden_embedding_inner_prods`` baseline uses it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxalign import logprobs


class PairOutput(NamedTuple):
    """Per-pair results, each ``[B]`` or ``[B, D]`` (``None`` when not requested)."""

    chosen_logps: jax.Array | None
    rejected_logps: jax.Array | None
    chosen_lengths: jax.Array
    rejected_lengths: jax.Array
    chosen_hidden_sum: jax.Array | None = None
    rejected_hidden_sum: jax.Array | None = None
    chosen_last_hidden: jax.Array | None = None
    rejected_last_hidden: jax.Array | None = None
    prompt_last_hidden: jax.Array | None = None  # [B, D] final hidden state at the last prompt token


def _last_valid_index(mask_BT: jax.Array) -> jax.Array:
    """Index ``[B]`` of the last valid slot of each row (any padding side)."""
    T = mask_BT.shape[1]
    return T - 1 - jnp.argmax(mask_BT[:, ::-1].astype(bool), axis=1)


def _take_B(x_BT_: jax.Array, idx_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BT_, idx_B.reshape((-1, 1) + (1,) * (x_BT_.ndim - 2)), axis=1)[:, 0]


def pair_forward(model, prompt_ids_BP: jax.Array, prompt_mask_BP: jax.Array,
                 chosen_ids_BR: jax.Array, chosen_mask_BR: jax.Array,
                 rejected_ids_BR: jax.Array, rejected_mask_BR: jax.Array, *,
                 logps: bool = True, hidden_sums: bool = False, chunk_size: int | None = 128,
                 layer: int | None = None) -> PairOutput:
    """Log-probs and/or hidden-state sums of chosen and rejected, the prompt run once.

    Args:
      model: a ``jaxalign.models`` causal LM (KV-cache calling convention of ``models/base.py``).
      prompt_ids_BP, prompt_mask_BP: ``[B, P]`` prompts, any padding side.
      chosen_ids_BR, chosen_mask_BR: ``[B, R]`` chosen responses (EOS included), right-padded.
      rejected_ids_BR, rejected_mask_BR: ``[B, R]`` rejected responses, right-padded.
      logps: compute the summed log-probs (needs the unembedding; skipped for CHES).
      hidden_sums: compute ``S(y)`` and the last-position hidden states (float32).
      chunk_size: sequence chunk for the log-softmax (``[B, R, V]`` is never held).
      layer: which hidden states ``hidden_sums`` uses: ``None`` the final ones after the last norm (the
        lm_head input); an integer indexes ``ModelOutput.layer_hidden`` (0 = embeddings, ``i`` = output
        of block ``i`` before any final norm, negative from the end). Log-probs always use the final ones.

    Returns:
      :class:`PairOutput`.
    """
    B, P = prompt_ids_BP.shape
    R = chosen_ids_BR.shape[1]
    cache = model.init_cache(B, P + R)
    want_layers = hidden_sums and layer is not None
    prompt_out = model(prompt_ids_BP, prompt_mask_BP, cache=cache, return_logits=False,
                       return_layer_hidden=want_layers)
    h_last_BD = _take_B(prompt_out.hidden, _last_valid_index(prompt_mask_BP))

    ids_2BR = jnp.concatenate([chosen_ids_BR, rejected_ids_BR], axis=0)
    mask_2BR = jnp.concatenate([chosen_mask_BR, rejected_mask_BR], axis=0).astype(bool)
    resp_out = model(ids_2BR, mask_2BR, cache=prompt_out.cache.repeat(2), return_logits=False,
                     return_layer_hidden=want_layers)
    h_2BRD = resp_out.hidden
    # Position j of a response predicts token j + 1: a response position iff token j + 1 exists.
    pos_mask_2BR = jnp.concatenate([mask_2BR[:, 1:], jnp.zeros_like(mask_2BR[:, :1])], axis=1)
    lengths_2B = jnp.sum(mask_2BR, axis=1).astype(jnp.int32)

    out = dict(chosen_logps=None, rejected_logps=None, chosen_lengths=lengths_2B[:B],
               rejected_lengths=lengths_2B[B:], prompt_last_hidden=h_last_BD)
    if logps:
        h_first_2B1D = jnp.concatenate([h_last_BD, h_last_BD], axis=0)[:, None, :]
        first_2B = logprobs.token_logprobs_from_hidden(
            h_first_2B1D, ids_2BR[:, :1], model.logits, chunk_size=None)[:, 0]
        rest_2BR = logprobs.token_logprobs_from_hidden(
            h_2BRD, logprobs.shift_targets(ids_2BR), model.logits, chunk_size=chunk_size)
        total_2B = first_2B + jnp.sum(jnp.where(pos_mask_2BR, rest_2BR, 0.0), axis=1)
        out.update(chosen_logps=total_2B[:B], rejected_logps=total_2B[B:])
    if hidden_sums:
        if want_layers:
            h_2BRD = _pick_layer(resp_out, layer)
            h_last_BD = _take_B(_pick_layer(prompt_out, layer), _last_valid_index(prompt_mask_BP))
        h32 = h_2BRD.astype(jnp.float32)
        h_last32 = h_last_BD.astype(jnp.float32)
        sums_2BD = jnp.concatenate([h_last32, h_last32], 0) + jnp.einsum("BR,BRD->BD",
                                                                         pos_mask_2BR.astype(h32.dtype), h32)
        # The last summed position: the last prompt token when the response is EOS alone.
        last_idx = lengths_2B - 2
        last_2BD = jnp.where((last_idx >= 0)[:, None], _take_B(h32, jnp.maximum(last_idx, 0)),
                             jnp.concatenate([h_last32, h_last32], 0))
        out.update(chosen_hidden_sum=sums_2BD[:B], rejected_hidden_sum=sums_2BD[B:],
                   chosen_last_hidden=last_2BD[:B], rejected_last_hidden=last_2BD[B:])
    return PairOutput(**out)


def _pick_layer(out, layer: int) -> jax.Array:
    """``out.layer_hidden[layer]`` with a readable error for an index out of range."""
    n = len(out.layer_hidden)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the model has {n} hidden-state layers "
                         f"(0 = embeddings … {n - 1} = last block; None = after the final norm)")
    return out.layer_hidden[layer]


def sequence_forward(model, input_ids_NT: jax.Array, attention_mask_NT: jax.Array,
                     prompt_lengths_N: jax.Array, *, logps: bool = True, hidden_sums: bool = False,
                     chunk_size: int | None = 128, layer: int | None = None) -> dict[str, jax.Array]:
    """The unshared path: full ``prompt + response`` rows (any padding side), one result per row.

    Returns a dict with ``logps`` ``[N]``, ``lengths`` ``[N]`` and, with ``hidden_sums``,
    ``hidden_sum`` ``[N, D]`` and ``last_hidden`` ``[N, D]`` — the same quantities as
    :func:`pair_forward` for rows ``[chosen…; rejected…]``.
    """
    want_layers = hidden_sums and layer is not None
    out = model(input_ids_NT, attention_mask_NT, return_logits=False, return_layer_hidden=want_layers)
    mask_NT = logprobs.response_mask(attention_mask_NT, prompt_lengths_N)
    result = {"lengths": jnp.sum(mask_NT, axis=1).astype(jnp.int32)}
    if logps:
        lp_NT = logprobs.token_logprobs_from_hidden(
            out.hidden, logprobs.shift_targets(input_ids_NT), model.logits, chunk_size=chunk_size)
        result["logps"] = logprobs.sequence_logprobs(lp_NT, mask_NT)[0]
    if hidden_sums:
        h32 = (_pick_layer(out, layer) if want_layers else out.hidden).astype(jnp.float32)
        result["hidden_sum"] = jnp.einsum("NT,NTD->ND", mask_NT.astype(h32.dtype), h32)
        result["last_hidden"] = _take_B(h32, _last_valid_index(mask_NT))
    return result
