"""Padded batches of preference pairs, in two layouts, with bucketed lengths.

Letters: ``B`` pairs in the batch, ``T`` padded sequence length, ``Tp`` padded prompt length, ``Tr``
padded response length. For one row, ``P`` is its prompt length and ``R`` its response length (EOS
included), ``L = P + R``.

**Pairs layout** (:func:`pair_batch`), used by the loss and log-prob code. ``2B`` rows: the ``B`` chosen
sequences ``prompt + chosen`` first, then the ``B`` rejected sequences in the same order (row ``b`` and
row ``B + b`` are one pair). Keys:

====================  ========  ================================================================
``input_ids``         [2B, T]   token ids, ``pad_id`` in padding
``attention_mask``    [2B, T]   1 on the ``L`` real tokens
``response_mask``     [2B, T]   1 on the ``R`` positions that *predict* a response token
``prompt_lengths``    [2B]      ``P``
``response_lengths``  [2B]      ``R`` (= ``response_mask.sum(-1)``)
``index``             [B]       each pair's record index in its source; -1 for a filler pair
====================  ========  ================================================================

With right padding (the default) a row's tokens sit at columns ``0 … L−1``; with left padding at
``T−L … T−1``. Writing ``s`` for the first real column (0, or ``T−L``): the prompt occupies
``s … s+P−1``, the response ``s+P … s+L−1``, and ``response_mask`` is 1 exactly on columns
``s+P−1 … s+L−2``: from the last prompt token to the second-to-last token. The logits at column ``t``
predict the token at column ``t+1``, so ``sum(response_mask * log_softmax(logits)[t, ids[t+1]])`` is
the response's log-prob, and CHES sums the hidden states over the same columns (DESIGN §3).

**Shared-prompt layout** (:func:`shared_prompt_batch`), for running each prompt once and continuing
both responses from its KV cache. Prompts are always *left*-padded, so every prompt ends at column
``Tp−1`` and the responses continue at column ``Tp``; responses are right-padded. Keys:
``prompt_ids``/``prompt_mask`` [B, Tp], ``chosen_ids``/``chosen_mask`` and ``rejected_ids``/
``rejected_mask`` [B, Tr] (one ``Tr`` for both), ``prompt_lengths``, ``chosen_lengths``,
``rejected_lengths`` and ``index`` [B]. Response token ``k`` of a row is predicted by the hidden state
at prompt column ``Tp−1`` when ``k = 0`` and at response column ``k−1`` otherwise; the position id of
prompt column ``j`` is ``j − (Tp − P)`` and of response column ``k`` is ``P + k``.

**Filler pairs**: a batch short of ``B`` pairs (the end of an epoch) is filled with pairs whose
``index`` is -1, all ids ``pad_id`` and every mask and length 0; weight results by ``index >= 0``.

**Bucketing** (``bucket``): ``T`` (and ``Tp``, ``Tr``) is the longest row rounded up so that jit sees
few shapes: an int ``m`` rounds up to a multiple of ``m``; ``"pow2"`` (the default) to a power of two,
at least 16; ``"jobs"`` to the smallest of :data:`LENGTH_BUCKETS`, beyond them to a multiple of 256 (the
analysis jobs: ``ches``, ``entangle``, ``probe``, ``displacement``); a sequence of sizes picks the
smallest that fits; ``None`` keeps the exact length.

**Job batches** (:func:`plan_batches`): the analysis jobs sort the pairs by padded shape and length and
cut them into batches of at most ``batch_size`` real pairs, padded with filler rows (-1) to a fixed row
count; :func:`head` keeps the first ``n`` tokenized pairs (``--limit``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxalign.data.tokenize import TokenizedPairs
from jaxalign.errors import ConfigError

Bucket = int | str | Sequence[int] | None
PADDING_SIDES = ("right", "left")
POW2_MINIMUM = 16
#: Padded lengths of ``bucket="jobs"`` (prompt and response each): a row is padded to the smallest that
#: fits; beyond the list, to a multiple of :data:`JOBS_STEP`. Steps of 1.14-1.25x (multiples of 8, then
#: 16, 32, 64, 128) keep padding near a tenth; each (prompt, response) bucket pair used is one compiled
#: shape (seconds each on CPU).
LENGTH_BUCKETS = (4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
                  448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)
JOBS_STEP = 256


def bucket_length(n: int, bucket: Bucket = "pow2") -> int:
    """The padded length for a longest row of ``n`` tokens (module doc, **Bucketing**).

    >>> [bucket_length(n) for n in (1, 16, 17, 100)]
    [16, 16, 32, 128]
    >>> bucket_length(33, 32), bucket_length(33, (48, 64)), bucket_length(33, None)
    (64, 48, 33)
    >>> bucket_length(33, "jobs"), bucket_length(3000, "jobs")
    (40, 3072)
    """
    n = max(int(n), 1)
    if bucket is None:
        return n
    if isinstance(bucket, str):
        if bucket == "jobs":
            return next((b for b in LENGTH_BUCKETS if n <= b), -(-n // JOBS_STEP) * JOBS_STEP)
        if bucket != "pow2":
            raise ConfigError(f"bucket must be an int, 'pow2', 'jobs', a list of sizes or None, got {bucket!r}")
        return max(POW2_MINIMUM, 1 << (n - 1).bit_length())
    if isinstance(bucket, (int, np.integer)):
        if bucket < 1:
            raise ConfigError(f"bucket must be a positive multiple, got {bucket}")
        return -(-n // int(bucket)) * int(bucket)
    fits = [int(b) for b in bucket if int(b) >= n]
    if not fits:
        raise ConfigError(f"a row of {n} tokens is longer than the largest bucket "
                          f"{max(bucket, default=0)}; add a bucket or set max_length")
    return min(fits)


def check_padding_side(padding_side: str) -> None:
    if padding_side not in PADDING_SIDES:
        raise ConfigError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")


def longest(tokens: TokenizedPairs, rows: np.ndarray) -> tuple[int, int, int]:
    """``(max P + R, max P, max R)`` over the real rows (``rows >= 0``) of a batch; 0s if none."""
    real = rows[rows >= 0]
    if real.size == 0:
        return 0, 0, 0
    p = tokens.prompt.lengths[real]
    r = np.maximum(tokens.chosen.lengths[real], tokens.rejected.lengths[real])
    return int((p + r).max()), int(p.max()), int(r.max())


def pair_batch(tokens: TokenizedPairs, rows: np.ndarray, *, pad_id: int, bucket: Bucket = "pow2",
               padding_side: str = "right", length: int | None = None) -> dict[str, np.ndarray]:
    """The pairs layout (module doc) of the records at positions ``rows`` of ``tokens``.

    Args:
      tokens: the tokenized data set.
      rows: ``[B]`` positions into ``tokens`` (not record indices); -1 makes a filler pair.
      pad_id: the id written in padding.
      bucket: how ``T`` is rounded up (module doc); ignored when ``length`` is given.
      padding_side: ``"right"`` or ``"left"``.
      length: ``T`` to use (it must fit every row); the iterator passes the global batch's.

    Returns:
      A dict of int32 NumPy arrays: ``input_ids``, ``attention_mask``, ``response_mask`` [2B, T],
      ``prompt_lengths``, ``response_lengths`` [2B], ``index`` [B].
    """
    check_padding_side(padding_side)
    rows = np.asarray(rows, np.int64)
    need = longest(tokens, rows)[0]
    T = bucket_length(need, bucket) if length is None else int(length)
    if T < need:
        raise ValueError(f"length {T} is shorter than the longest row ({need} tokens)")
    B = len(rows)
    ids = np.full((2 * B, T), pad_id, np.int32)
    attention, response = np.zeros((2 * B, T), np.int32), np.zeros((2 * B, T), np.int32)
    prompt_lengths, response_lengths = np.zeros(2 * B, np.int32), np.zeros(2 * B, np.int32)
    for b, row in enumerate(rows):
        if row < 0:
            continue
        prompt = tokens.prompt[row]
        for out, answer in ((b, tokens.chosen[row]), (B + b, tokens.rejected[row])):
            P, R = len(prompt), len(answer)
            s = 0 if padding_side == "right" else T - P - R
            ids[out, s:s + P], ids[out, s + P:s + P + R] = prompt, answer
            attention[out, s:s + P + R] = 1
            response[out, s + P - 1:s + P + R - 1] = 1
            prompt_lengths[out], response_lengths[out] = P, R
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response,
            "prompt_lengths": prompt_lengths, "response_lengths": response_lengths,
            "index": _record_index(tokens, rows)}


def shared_prompt_batch(tokens: TokenizedPairs, rows: np.ndarray, *, pad_id: int,
                        bucket: Bucket = "pow2", prompt_length: int | None = None,
                        response_length: int | None = None) -> dict[str, np.ndarray]:
    """The shared-prompt layout (module doc) of the records at positions ``rows`` of ``tokens``.

    Args:
      tokens: the tokenized data set.
      rows: ``[B]`` positions into ``tokens``; -1 makes a filler pair.
      pad_id: the id written in padding.
      bucket: how ``Tp`` and ``Tr`` are rounded up, each on its own.
      prompt_length, response_length: ``Tp`` and ``Tr`` to use instead (they must fit every row).

    Returns:
      A dict of int32 NumPy arrays: ``prompt_ids``, ``prompt_mask`` [B, Tp] (left-padded),
      ``chosen_ids``, ``chosen_mask``, ``rejected_ids``, ``rejected_mask`` [B, Tr] (right-padded),
      ``prompt_lengths``, ``chosen_lengths``, ``rejected_lengths``, ``index`` [B].
    """
    rows = np.asarray(rows, np.int64)
    _, need_p, need_r = longest(tokens, rows)
    Tp = bucket_length(need_p, bucket) if prompt_length is None else int(prompt_length)
    Tr = bucket_length(need_r, bucket) if response_length is None else int(response_length)
    if Tp < need_p or Tr < need_r:
        raise ValueError(f"lengths ({Tp}, {Tr}) are shorter than the longest rows ({need_p}, {need_r})")
    B = len(rows)
    out = {"prompt_ids": np.full((B, Tp), pad_id, np.int32), "prompt_mask": np.zeros((B, Tp), np.int32)}
    for name in ("chosen", "rejected"):
        out[f"{name}_ids"] = np.full((B, Tr), pad_id, np.int32)
        out[f"{name}_mask"] = np.zeros((B, Tr), np.int32)
    for name in ("prompt", "chosen", "rejected"):
        out[f"{name}_lengths"] = np.zeros(B, np.int32)
    for b, row in enumerate(rows):
        if row < 0:
            continue
        prompt = tokens.prompt[row]
        P = len(prompt)
        out["prompt_ids"][b, Tp - P:], out["prompt_mask"][b, Tp - P:] = prompt, 1
        out["prompt_lengths"][b] = P
        for name in ("chosen", "rejected"):
            answer = getattr(tokens, name)[row]
            R = len(answer)
            out[f"{name}_ids"][b, :R], out[f"{name}_mask"][b, :R] = answer, 1
            out[f"{name}_lengths"][b] = R
    out["index"] = _record_index(tokens, rows)
    return out


def _record_index(tokens: TokenizedPairs, rows: np.ndarray) -> np.ndarray:
    """``[B]`` int32: the source index of each row's record, -1 for filler rows."""
    out = np.full(len(rows), -1, np.int32)
    real = rows >= 0
    out[real] = tokens.index[rows[real]]
    return out


def plan_batches(prompt_lengths_N: np.ndarray, response_lengths_N: np.ndarray, batch_size: int,
                 bucket: Bucket = "jobs") -> list[np.ndarray]:
    """Positions of the pairs in each batch, grouped by padded shape and sorted by length.

    Pairs are ordered by (prompt bucket, response bucket, prompt length, response length, position), so a
    batch mixes shapes only at a bucket boundary; each batch holds at most ``batch_size`` pairs. The plan
    depends only on the lengths, so a rerun of the same job makes the same batches.

    >>> [b.tolist() for b in plan_batches(np.array([30, 3, 5]), np.array([1, 1, 1]), 2)]
    [[1, 2], [0]]
    """
    p = np.asarray(prompt_lengths_N, np.int64)
    r = np.asarray(response_lengths_N, np.int64)
    pb = np.array([bucket_length(x, bucket) for x in p], np.int64)
    rb = np.array([bucket_length(x, bucket) for x in r], np.int64)
    order = np.lexsort((np.arange(p.size), r, p, rb, pb))
    return [order[start:start + batch_size] for start in range(0, order.size, batch_size)]


def head(tokens: TokenizedPairs, n: int | None) -> TokenizedPairs:
    """The first ``n`` pairs of ``tokens`` (all of them when ``n`` is ``None`` or not smaller)."""
    if n is None or n >= len(tokens):
        return tokens
    ragged = [getattr(tokens, k) for k in ("prompt", "chosen", "rejected")]
    return TokenizedPairs(tokens.index[:n], *(type(r)(r.values[:r.offsets[n]], r.offsets[:n + 1])
                                               for r in ragged))
