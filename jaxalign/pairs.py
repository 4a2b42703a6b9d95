"""Preference pairs through a causal LM, with the shared prompt computed once.

Letters: B pairs, P prompt length, R response length (padded), D model width, V vocabulary.

A pair is ``(x, y+, y-)``. Both responses continue the same prompt, which is usually most of the
tokens, so :func:`pair_forward` runs the prompt once into a KV cache, tiles the cache for the two
responses and continues chosen and rejected from it: the work is ``P + 2R`` tokens instead of
``2(P + R)``. Gradients flow through the shared prompt from both responses. With ``fused=True`` the
same happens in one pass over rows ``[prompt | chosen | rejected]``, the responses as branches that do not
see each other (:func:`encode_pair`). :func:`sequence_forward` computes the same quantities from full
``prompt + response`` rows (the unshared path; equal, tested).

Under the sequence convention (DESIGN §3) response token ``k`` of ``y`` is predicted by position
``k - 1``; the first response token is predicted by the last prompt token. So for a response of ``n``
tokens (EOS included):

* ``logps(y)  = log p(y_1 | h_last_prompt) + Σ_{j < n-1} log p(y_{j+2} | h_{y_j+1})``, a **sum**;
* ``S(y)      = h_last_prompt + Σ_{j < n-1} h_{y_j+1}`` (CHES, Razin et al. Def. 2), ``|y| = n``;
* ``last_hidden`` = the hidden state at the last summed position (the last token before EOS; the
  paper's ``last_hidden_embedding_inner_prods`` baseline uses it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import logprobs, parallel

#: The six arrays of a pair batch as plain mapping keys (host batches, shardings, checkpoints).
KEYS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairBatch:
    """``B`` preference pairs in the shared-prompt layout (a pytree: jit, vmap and shard it whole).

    Attributes:
      prompt_ids_BP, prompt_mask_BP: ``[B, P]`` prompts, any padding side.
      chosen_ids_BR, chosen_mask_BR: ``[B, R]`` chosen responses (EOS included), right-padded.
      rejected_ids_BR, rejected_mask_BR: ``[B, R]`` rejected responses, right-padded.
    """

    prompt_ids_BP: Any
    prompt_mask_BP: Any
    chosen_ids_BR: Any
    chosen_mask_BR: Any
    rejected_ids_BR: Any
    rejected_mask_BR: Any

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> "PairBatch":
        """From a mapping with the :data:`KEYS` (extra keys, e.g. reference log-probs, are ignored)."""
        return cls(*(batch[k] for k in KEYS))

    def as_dict(self) -> dict[str, Any]:
        """The six arrays under :data:`KEYS`."""
        return dict(zip(KEYS, dataclasses.astuple(self)))

    def responses_2BR(self) -> tuple[Any, Any]:
        """``(ids, mask)`` ``[2B, R]``: the chosen rows, then the rejected rows."""
        return (jnp.concatenate([self.chosen_ids_BR, self.rejected_ids_BR], axis=0),
                jnp.concatenate([self.chosen_mask_BR, self.rejected_mask_BR], axis=0))


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


def last_valid_index(mask_BT: jax.Array) -> jax.Array:
    """Index ``[B]`` of the last valid slot of each row (any padding side)."""
    T = mask_BT.shape[1]
    return T - 1 - jnp.argmax(mask_BT[:, ::-1].astype(bool), axis=1)


def take_rows(x_BT_: jax.Array, idx_B: jax.Array) -> jax.Array:
    """``x[b, idx[b]]`` for every row: ``[B, T, …]`` → ``[B, …]``."""
    return jnp.take_along_axis(x_BT_, idx_B.reshape((-1, 1) + (1,) * (x_BT_.ndim - 2)), axis=1)[:, 0]


class PromptEncoding(NamedTuple):
    """A prompt run into a KV cache with room for the responses (:func:`encode_prompt`).

    Attributes:
      cache: the ``KVCache`` of ``B`` rows and ``P + R`` slots, the prompt written.
      out: the prompt's ``ModelOutput`` (``hidden`` ``[B, P, D]``; ``layer_hidden`` when asked for).
      last_index_B: ``[B]`` the slot of each prompt's last token.
    """

    cache: Any
    out: Any
    last_index_B: jax.Array

    def last_hidden(self, layer: int | None = None) -> jax.Array:
        """``[B, D]`` hidden state at the last prompt token (``layer`` as in :func:`pair_forward`)."""
        h = self.out.hidden if layer is None else _pick_layer(self.out, layer)
        return take_rows(h, self.last_index_B)


def encode_prompt(model, prompt_ids_BP: jax.Array, prompt_mask_BP: jax.Array, *, response_length: int,
                  layer_hidden: bool = False) -> PromptEncoding:
    """Stage one of the prompt-once forward: the prompts into a cache with ``response_length`` free slots.

    ``layer_hidden`` also keeps every layer's hidden states (CHES at another layer).
    """
    B, P = prompt_ids_BP.shape
    cache = model.init_cache(B, P + response_length)
    # `end` as the default integer: under vmap with x64 the cache write's Python 0 index becomes int64,
    # and the batched dynamic_update_slice needs matching index types.
    cache = cache.replace(end=cache.end.astype(jnp.asarray(0).dtype))
    out = model(prompt_ids_BP, prompt_mask_BP, cache=cache, return_logits=False,
                return_layer_hidden=layer_hidden)
    return PromptEncoding(out.cache, out, last_valid_index(prompt_mask_BP))


def continue_responses(model, prompt: PromptEncoding, ids_NR: jax.Array, mask_NR: jax.Array, *,
                       layer_hidden: bool = False):
    """Stage two: ``N = k·B`` right-padded responses continuing the prompts (row ``b + j·B`` continues
    prompt ``b``). Returns the responses' ``ModelOutput`` (``hidden`` ``[N, R, D]``, no logits)."""
    k = ids_NR.shape[0] // prompt.cache.positions.shape[0]
    cache = prompt.cache if k == 1 else prompt.cache.repeat(k)
    return model(ids_NR, mask_NR, cache=cache, return_logits=False, return_layer_hidden=layer_hidden)


def encode_pair(model, pb: PairBatch, *, layer_hidden: bool = False):
    """The prompt and both responses in one pass, no cache: each row is ``[prompt | chosen | rejected]``
    with the responses as two branches of the prompt (``branch_BT``, ``models/base.py``): each response
    sees the prompt and itself, not the other, at the positions that continue the prompt.

    Returns ``(prompt, responses)``: a :class:`PromptEncoding` (no cache; ``out`` the prompt's columns)
    and the responses' ``ModelOutput`` as :func:`continue_responses` gives it (``hidden`` ``[2B, R, D]``,
    rows ``[chosen…; rejected…]``).
    """
    P, R = pb.prompt_ids_BP.shape[1], pb.chosen_ids_BR.shape[1]
    ids_BT = jnp.concatenate([pb.prompt_ids_BP, pb.chosen_ids_BR, pb.rejected_ids_BR], axis=1)
    mask_BT = jnp.concatenate([m.astype(bool) for m in (pb.prompt_mask_BP, pb.chosen_mask_BR,
                                                        pb.rejected_mask_BR)], axis=1)
    if whole_row_attention_pays(P, R):
        branches = jnp.asarray(np.repeat(np.arange(3, dtype=np.int32), (P, R, R))[None])
    else:
        branches = (P, R, 2)  # attention per part: models/base.py, Branches
    out = model(ids_BT, mask_BT, branch_BT=branches, return_logits=False, return_layer_hidden=layer_hidden)

    def columns(fn):
        return out._replace(hidden=fn(out.hidden), layer_hidden=None if out.layer_hidden is None else
                            tuple(map(fn, out.layer_hidden)))

    prompt = PromptEncoding(None, columns(lambda x: x[:, :P]), last_valid_index(pb.prompt_mask_BP))
    return prompt, columns(lambda x: jnp.concatenate([x[:, P:P + R], x[:, P + R:]], axis=0))


def response_logprobs(model, h_prompt_last_ND: jax.Array, h_NRD: jax.Array, ids_NR: jax.Array, *,
                      chunk_size: int | None = 128) -> tuple[jax.Array, jax.Array]:
    """Log-probs of the response tokens under the sequence convention (DESIGN §3).

    Returns ``(first_N, next_NR)``: ``first_N`` ``[N]`` = log p(token 0 | the prompt's last hidden state);
    ``next_NR`` ``[N, R]`` = at response position ``j``, log p(token ``j + 1``) (position ``R − 1`` predicts
    nothing: mask it, e.g. with :func:`next_token_mask`).
    """
    first_N = logprobs.token_logprobs_from_hidden(h_prompt_last_ND[:, None, :], ids_NR[:, :1], model.logits,
                                                  chunk_size=None)[:, 0]
    next_NR = logprobs.token_logprobs_from_hidden(h_NRD, logprobs.shift_targets(ids_NR), model.logits,
                                                  chunk_size=chunk_size)
    return first_N, next_NR


def summed_logprobs(model, h_prompt_last_ND: jax.Array, h_NRD: jax.Array, ids_NR: jax.Array, mask_NR: jax.Array,
                    *, chunk_size: int | None = 128) -> jax.Array:
    """``[N]`` summed log-probs of right-padded responses (the first token always counts, as EOS does).

    Token ``k`` is predicted by the hidden state before it (the prompt's last for ``k = 0``), so the
    ``R`` predicting states ``[h_last, h_0 … h_{R−2}]`` go through one unembedding (the last response
    position predicts nothing and is skipped): what :func:`response_logprobs` gives, in one pass. ``h_NRD``
    may hold all ``R`` positions or only the first ``R − 1`` (:func:`run_length`).
    """
    h_in_NRD = jnp.concatenate([h_prompt_last_ND[:, None].astype(h_NRD.dtype), h_NRD[:, :ids_NR.shape[1] - 1]],
                               axis=1)
    lp_NR = logprobs.token_logprobs_from_hidden(h_in_NRD, ids_NR, model.logits, chunk_size=chunk_size)
    counted_NR = mask_NR.astype(bool).at[:, 0].set(True)
    return jnp.sum(jnp.where(counted_NR, lp_NR, 0.0), axis=1)


def next_token_mask(mask_NR: jax.Array) -> jax.Array:
    """``[N, R]`` bool: response position ``j`` predicts a token (token ``j + 1`` exists)."""
    mask_NR = mask_NR.astype(bool)
    return jnp.concatenate([mask_NR[:, 1:], jnp.zeros_like(mask_NR[:, :1])], axis=1)


def run_length(R: int) -> int:
    """How many response positions :func:`pair_forward` runs through the model for responses padded to
    ``R``: ``R − 1``. The last position's hidden state predicts no token (it is never a log-prob's input
    nor a summed CHES position), and causal attention keeps it out of the others; an ``R`` of 1 runs as is."""
    return R - 1 if R > 1 else R


def fused_pays() -> bool:
    """Whether ``pair_forward(fused=True)`` is the faster forward pass: on CPU, at every measured shape.

    Measured with ``scripts/bench_ab.py`` on SmolLM2-135M (docs/benchmarks.md, "Changes tried (issue 20,
    session 10)"): the CHES scorer 0.96× the KV-cache path's time at ``P = 56, R = 4``, 0.985× at
    ``P = 64, R = 64``, 1.00× at ``P = 64, R = 256``; the train step 1.00× at ``P = 96, R = 32``, with 3%
    fewer XLA temporaries. Not measured on accelerators: ``False`` there.
    """
    return parallel.target_platform() == "cpu"


def whole_row_attention_pays(P: int, R: int) -> bool:
    """Whether the one pass (:func:`encode_pair`, ``R`` response columns run) attends over the whole row
    ``[prompt | chosen | rejected]`` under a branch mask rather than per part (``models/base.py``,
    ``Branches``): on CPU, when the responses are short beside the prompt (``8·R ≤ P``).

    The whole row scores the masked prompt × response and chosen × rejected blocks too; per part does not,
    but runs more, smaller operations. Measured (docs/benchmarks.md, "Changes tried (issue 20, session
    10)"): the whole row 0.97–0.98× per part's time at ``P = 56, R = 3`` (the CHES scorer's shape), per part
    0.90× the whole row's at ``P = 64, R = 63`` and 0.98× at ``P = 96, R = 31`` (the train step's).
    """
    return parallel.target_platform() == "cpu" and 8 * R <= P


def _leading_columns(pb: PairBatch, R: int) -> PairBatch:
    """``pb`` with the responses cut to their first ``R`` columns."""
    return dataclasses.replace(pb, chosen_ids_BR=pb.chosen_ids_BR[:, :R], chosen_mask_BR=pb.chosen_mask_BR[:, :R],
                               rejected_ids_BR=pb.rejected_ids_BR[:, :R],
                               rejected_mask_BR=pb.rejected_mask_BR[:, :R])


def pair_forward(model, *batch, logps: bool = True, hidden_sums: bool = False, chunk_size: int | None = 128,
                 layer: int | None = None, fused: bool = False) -> PairOutput:
    """Log-probs and/or hidden-state sums of chosen and rejected, the prompt run once.

    Args:
      model: a ``jaxalign.models`` causal LM (KV-cache calling convention of ``models/base.py``).
      *batch: a :class:`PairBatch`, or its six arrays in order (``prompt_ids_BP, prompt_mask_BP,
        chosen_ids_BR, chosen_mask_BR, rejected_ids_BR, rejected_mask_BR``).
      logps: compute the summed log-probs (needs the unembedding; skipped for CHES).
      hidden_sums: compute ``S(y)`` and the last-position hidden states (float32).
      chunk_size: sequence chunk for the log-softmax (``[B, R, V]`` is never held).
      layer: which hidden states ``hidden_sums`` uses: ``None`` the final ones after the last norm (the
        lm_head input); an integer indexes ``ModelOutput.layer_hidden`` (0 = embeddings, ``i`` = output
        of block ``i`` before any final norm, negative from the end). Log-probs always use the final ones.
      fused: one pass over ``[prompt | chosen | rejected]`` rows (:func:`encode_pair`) instead of the
        prompt into a KV cache tiled for the responses (:func:`encode_prompt`, :func:`continue_responses`).
        Equal results; on CPU faster or as fast at every measured shape (:func:`fused_pays`).

    Returns:
      :class:`PairOutput`.
    """
    pb = batch[0] if len(batch) == 1 and isinstance(batch[0], PairBatch) else PairBatch(*batch)
    B = pb.prompt_ids_BP.shape[0]
    want_layers = hidden_sums and layer is not None
    ids_2BR, mask_2BR = pb.responses_2BR()
    mask_2BR = mask_2BR.astype(bool)
    run = _leading_columns(pb, run_length(ids_2BR.shape[1]))
    if fused:
        prompt, resp_out = encode_pair(model, run, layer_hidden=want_layers)
    else:
        prompt = encode_prompt(model, run.prompt_ids_BP, run.prompt_mask_BP,
                               response_length=run.chosen_ids_BR.shape[1], layer_hidden=want_layers)
        resp_out = continue_responses(model, prompt, *run.responses_2BR(), layer_hidden=want_layers)
    h_last_BD = prompt.last_hidden()
    pos_mask_2BR = next_token_mask(mask_2BR)
    lengths_2B = jnp.sum(mask_2BR, axis=1).astype(jnp.int32)

    out = dict(chosen_logps=None, rejected_logps=None, chosen_lengths=lengths_2B[:B],
               rejected_lengths=lengths_2B[B:], prompt_last_hidden=h_last_BD)
    if logps:
        total_2B = summed_logprobs(model, jnp.concatenate([h_last_BD, h_last_BD], axis=0), resp_out.hidden,
                                   ids_2BR, mask_2BR, chunk_size=chunk_size)
        out.update(chosen_logps=total_2B[:B], rejected_logps=total_2B[B:])
    if hidden_sums:
        h_2BRD = _pick_layer(resp_out, layer) if want_layers else resp_out.hidden
        if want_layers:
            h_last_BD = prompt.last_hidden(layer)
        out.update(_hidden_sums(h_2BRD, jnp.concatenate([h_last_BD, h_last_BD], 0), pos_mask_2BR, lengths_2B, B))
    return PairOutput(**out)


def _hidden_sums(h_2BRD, h_last_2BD, pos_mask_2BR, lengths_2B, B: int) -> dict[str, jax.Array]:
    """``S(y)`` and the last summed position's hidden state of both responses, float32 (``h_2BRD`` may
    lack the last response position, which is never summed)."""
    h32 = h_2BRD.astype(jnp.float32)
    h_last32 = h_last_2BD.astype(jnp.float32)
    sums_2BD = h_last32 + jnp.einsum("BR,BRD->BD", pos_mask_2BR[:, :h32.shape[1]].astype(h32.dtype), h32)
    # The last summed position: the last prompt token when the response is EOS alone.
    last_idx = lengths_2B - 2
    last_2BD = jnp.where((last_idx >= 0)[:, None], take_rows(h32, jnp.maximum(last_idx, 0)), h_last32)
    return dict(chosen_hidden_sum=sums_2BD[:B], rejected_hidden_sum=sums_2BD[B:],
                chosen_last_hidden=last_2BD[:B], rejected_last_hidden=last_2BD[B:])


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
        result["last_hidden"] = take_rows(h32, last_valid_index(mask_NT))
    return result
