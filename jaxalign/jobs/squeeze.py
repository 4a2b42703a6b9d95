"""The squeezing probe of ``jaxalign probe --what squeeze`` (Ren & Sutherland, "Learning Dynamics of LLM
Finetuning", ICLR 2025, §3.3 and Appendix C: the "squeezing effect").

Their finding: a negative gradient on an off-policy response (DPO's ``y−``) pushes probability away from
it towards the tokens the model already favours, so the greedy response ``ŷ`` gains probability, almost
every other response loses it, and each next-token distribution grows peakier. Per checkpoint and probe
pair ``i`` this module measures, under that checkpoint's own policy:

* ``greedy_ids`` ``[M]`` — the greedy response to prompt ``x_i``: argmax decoding with the KV cache
  (:func:`jaxalign.models.generate.generate_ids`, temperature 0) for at most ``M = max_new_tokens``
  tokens, ending with the first EOS (the data's EOS, the one appended to ``y±``; kept); ``-1`` after the end;
* ``greedy_len`` — its length in tokens (EOS counted) and ``greedy_logps`` = log π(ŷ|x), the sum over
  its tokens, **each scored at its own position** (token ``k`` by the hidden state that produced it: the
  prompt's last token for ``k = 0``, response token ``k − 1`` otherwise);
* ``other_logps`` = log π(y+_σ(i) | x_i): the chosen response of another pair, under this prompt. ``σ`` is
  the fixed derangement ``σ(i) = (i + 1) mod N`` over the probe pairs in input order (:func:`derangement`);
* ``top1_*`` and ``entropy_*`` for the responses ``chosen`` (y+), ``rejected`` (y−) and ``greedy`` (ŷ):
  the mean over the response's positions (one per token, EOS included) of the top-1 probability
  ``max_v π(v | x, y_<k)`` and of the entropy ``−Σ_v π log π`` (nats) of the next-token distribution.

Log-probs are float32 sums, as the other probe measures; the means are float32.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from jaxalign.data import batch as batch_lib
from jaxalign.data.tokenize import Ragged, TokenizedPairs

#: The ``[K, N]`` measures of the squeezing probe (module doc), then the ``[K, N, M]`` token array.
MEASURES = ("greedy_len", "greedy_logps", "other_logps", "top1_chosen", "entropy_chosen", "top1_rejected",
            "entropy_rejected", "top1_greedy", "entropy_greedy")
TOKENS = "greedy_ids"


def derangement(n: int) -> np.ndarray:
    """``[n]`` positions ``σ(i) = (i + 1) mod n``: every pair gets another pair's response (``n >= 2``).

    >>> derangement(3).tolist()
    [1, 2, 0]
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 pairs, got {n}")
    return (np.arange(n) + 1) % n


def response_stats(model, batch: dict) -> dict[str, Any]:
    """Per response of a shared-prompt batch (:func:`jaxalign.data.batch.shared_prompt_batch`): the
    summed log-prob ``[2B]``, and the mean over its positions of the top-1 probability and of the
    entropy (nats) ``[2B]``; rows ``0…B−1`` are the ``chosen`` responses, ``B…2B−1`` the ``rejected``.

    The prompt runs once; position ``k`` of the ``[2B, R]`` responses is the hidden state predicting
    token ``k`` (the prompt's last one for ``k = 0``). The ``[R, V]`` logits are formed one row at a time.
    """
    import jax
    import jax.numpy as jnp

    from jaxalign import pairs

    pb = pairs.PairBatch.of(batch)
    prompt = pairs.encode_prompt(model, pb.prompt_ids_BP, pb.prompt_mask_BP,
                                 response_length=pb.chosen_ids_BR.shape[1])
    ids_2BR, mask_2BR = pb.responses_2BR()
    h_2BRD = pairs.continue_responses(model, prompt, ids_2BR, mask_2BR).hidden
    h_last_2BD = jnp.concatenate([prompt.last_hidden()] * 2, axis=0)
    h_pred_2BRD = jnp.concatenate([h_last_2BD[:, None], h_2BRD[:, :-1]], axis=1)  # position k predicts token k

    def row(args):
        h_RD, ids_R = args
        logp_RV = jax.nn.log_softmax(model.logits(h_RD[None])[0].astype(jnp.float32), axis=-1)
        target_R = jnp.take_along_axis(logp_RV, ids_R[:, None], axis=-1)[:, 0]
        entropy_R = -jnp.sum(jnp.exp(logp_RV) * logp_RV, axis=-1)
        return target_R, jnp.exp(jnp.max(logp_RV, axis=-1)), entropy_R

    target, top1, entropy = jax.lax.map(row, (h_pred_2BRD, ids_2BR))
    mask = mask_2BR.astype(bool)
    n_2B = jnp.maximum(jnp.sum(mask, axis=1), 1)
    total = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=1)  # noqa: E731
    return {"logps": total(target), "top1": total(top1) / n_2B, "entropy": total(entropy) / n_2B}


def _stats(static, params, batch, rest):
    return response_stats(static.value.merge(params, rest), batch)


def jit_response_stats(parts):
    """``(params, batch, rest) -> response_stats(...)`` jitted, one program per graphdef and shape."""
    import jax

    from jaxalign.train.step import Static

    return functools.partial(jax.jit(_stats, static_argnums=0), Static((parts.graphdef, "squeeze"), parts))


def greedy_responses(model, prompts: list[np.ndarray], *, rows: int, max_new_tokens: int, eos_id: int,
                     pad_id: int) -> list[np.ndarray]:
    """The greedy response to each prompt (module doc), EOS kept, nothing after it.

    The prompts are decoded ``rows`` at a time (the batch is filled up with copies of the first prompt, so
    every call has one shape); :func:`jaxalign.models.generate.generate_ids` left-pads them.
    """
    from jaxalign.models.generate import generate_ids

    out: list[np.ndarray] = []
    for start in range(0, len(prompts), rows):
        chunk = [np.asarray(p).tolist() for p in prompts[start:start + rows]]
        filled = chunk + [chunk[0]] * (rows - len(chunk))
        new_BM = generate_ids(model, filled, max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
        for tokens_M in new_BM[:len(chunk)]:
            end = np.flatnonzero(tokens_M == eos_id)
            out.append(tokens_M[:end[0] + 1] if end.size else tokens_M)
    return out


def other_pairs(tokens: TokenizedPairs, rows: np.ndarray, greedy: list[np.ndarray]) -> TokenizedPairs:
    """The pairs ``(x_i, ŷ_i, y+_σ(i))`` of positions ``rows`` (``greedy[j]`` the greedy response of
    ``rows[j]``), as ``chosen`` and ``rejected`` of a :class:`TokenizedPairs` for the batch layouts."""
    sigma = derangement(len(tokens))
    return TokenizedPairs(np.asarray(tokens.index)[rows],
                          Ragged.from_rows([tokens.prompt[r].tolist() for r in rows]),
                          Ragged.from_rows([g.tolist() for g in greedy]),
                          Ragged.from_rows([tokens.chosen[sigma[r]].tolist() for r in rows]))


def measure_rows(model, stats, params, rest, tokens: TokenizedPairs, rows: np.ndarray, batch: dict, *,
                 padded_rows: int, max_new_tokens: int, eos_id: int, pad_id: int,
                 put=lambda b: b) -> dict[str, np.ndarray]:
    """Every squeezing measure of the pairs at positions ``rows`` (``n`` real rows of ``batch``, the
    probe's own shared-prompt batch of ``padded_rows`` rows): ``[n]`` per measure, ``[n, M]`` ids.

    ``model`` is ``params`` merged (generation), ``stats`` :func:`jit_response_stats`, ``put`` places a
    host batch on the devices.
    """
    from jaxalign.train.measure import to_host

    n = len(rows)
    greedy = greedy_responses(model, [tokens.prompt[r] for r in rows], rows=padded_rows,
                              max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    own = {k: to_host(v) for k, v in stats(params, put(batch), rest).items()}
    fill = np.concatenate([np.arange(n), np.full(padded_rows - n, -1)])
    gen = batch_lib.shared_prompt_batch(other_pairs(tokens, rows, greedy), fill, pad_id=pad_id, bucket="jobs")
    new = {k: to_host(v) for k, v in stats(params, put(gen), rest).items()}
    B = padded_rows
    ids = np.full((n, max_new_tokens), -1, np.int32)
    for j, g in enumerate(greedy):
        ids[j, :len(g)] = g
    return {"greedy_len": np.array([len(g) for g in greedy], np.float64),
            "greedy_logps": new["logps"][:n], "other_logps": new["logps"][B:B + n],
            "top1_greedy": new["top1"][:n], "entropy_greedy": new["entropy"][:n],
            "top1_chosen": own["top1"][:n], "entropy_chosen": own["entropy"][:n],
            "top1_rejected": own["top1"][B:B + n], "entropy_rejected": own["entropy"][B:B + n],
            TOKENS: ids}
