"""Batched text generation with the KV cache: greedy or sampled (temperature, top-p), stopping at EOS.

Letters: B batch, P prompt length (padded), N new tokens, V vocabulary, D model width.

One jitted function does the whole generation: allocate ``init_cache(B, P + N)``, run the padded
prompts through it (prefill), then a ``jax.lax.while_loop`` of one-token steps that ends when every
row has produced an EOS or ``N`` tokens. Prompts may be left- or right-padded: positions come from the
attention mask (see :mod:`jaxalign.models.base`), so both give the unpadded prompt's continuation.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.errors import ModelError


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_token_id: int, *, padding_side: str = "left",
                multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pads token lists into ``(ids [B, P], mask [B, P])``; ``P`` is rounded up to ``multiple``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompt_ids)
    P = -(-P // multiple) * multiple
    ids = np.full((len(prompt_ids), P), pad_token_id, np.int32)
    mask = np.zeros((len(prompt_ids), P), np.int32)
    for b, p in enumerate(prompt_ids):
        sl = slice(P - len(p), P) if padding_side == "left" else slice(0, len(p))
        ids[b, sl] = p
        mask[b, sl] = 1
    return ids, mask


def _sample(logits_BV, key, temperature, top_p, sample: bool):
    """Next tokens ``[B]``: argmax, or a draw from the temperature-scaled top-p nucleus."""
    logits_BV = logits_BV.astype(jnp.float32)
    if not sample:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    probs_BV = jax.nn.softmax(logits_BV, axis=-1)
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(probs_BV, order_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always).
    keep_sorted_BV = (jnp.cumsum(sorted_BV, axis=-1) - sorted_BV) < top_p
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(
        keep_sorted_BV)
    logits_BV = jnp.where(keep_BV, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample"))
def _generate(graphdef, state, ids_BP, mask_BP, eos_E, pad_id, key, temperature, top_p, *,
              max_new_tokens: int, sample: bool):
    model = nnx.merge(graphdef, state)
    B, P = ids_BP.shape
    N = max_new_tokens
    cache = model.init_cache(B, P + N)
    out = model(ids_BP, mask_BP, cache=cache, return_logits=False)
    # The last real prompt token of each row (the prompt may be left- or right-padded).
    last_B = P - 1 - jnp.argmax(mask_BP[:, ::-1], axis=-1)
    hidden_B1D = jnp.take_along_axis(out.hidden, last_B[:, None, None], axis=1)
    logits_BV = model.logits(hidden_B1D)[:, 0]

    def is_eos(tok_B):
        return jnp.any(tok_B[:, None] == eos_E[None, :], axis=-1)

    key, sub = jax.random.split(key)
    tok_B = _sample(logits_BV, sub, temperature, top_p, sample)
    tokens_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok_B)
    done_B = is_eos(tok_B)

    def cond(carry):
        step, _, _, done_B, _, _ = carry
        return (step < N) & ~jnp.all(done_B)

    def body(carry):
        step, tok_B, tokens_BN, done_B, cache, key = carry
        out = model(tok_B[:, None], jnp.ones((B, 1), jnp.int32), cache=cache, return_logits=True)
        key, sub = jax.random.split(key)
        new_B = _sample(out.logits[:, -1], sub, temperature, top_p, sample)
        new_B = jnp.where(done_B, pad_id, new_B)
        tokens_BN = jax.lax.dynamic_update_slice(tokens_BN, new_B[:, None], (0, step))
        return step + 1, new_B, tokens_BN, done_B | is_eos(new_B), out.cache, key

    carry = (jnp.int32(1), tok_B, tokens_BN, done_B, out.cache, key)
    _, _, tokens_BN, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens_BN


def generate_ids(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                 eos_token_id: int | Sequence[int] | None, pad_token_id: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 padding_side: str = "left", pad_multiple: int = 8) -> np.ndarray:
    """Generates up to ``max_new_tokens`` after each prompt; returns the new tokens ``[B, N]``.

    A row ends with its first EOS token (kept); the slots after it hold ``pad_token_id``, as in
    ``transformers``' ``generate(...)[:, P:]``. Generation stops early when every row has ended.

    Args:
      model: a jaxalign causal LM.
      prompt_ids: ``B`` lists of token ids (different lengths allowed).
      max_new_tokens: ``N``.
      eos_token_id: one id or several (any ends a row); ``None`` never stops early.
      pad_token_id: fills prompt padding and the slots after EOS (default: the first EOS, else 0).
      temperature: 0 is greedy (argmax); above 0 samples from ``softmax(logits / temperature)``.
      top_p: nucleus sampling: sample only from the smallest set of tokens whose mass reaches ``top_p``.
      seed: PRNG seed for sampling.
      padding_side: how prompts are padded ("left" or "right"); the result is the same.
      pad_multiple: the padded prompt length is rounded up to this, so fewer shapes are compiled.

    Returns:
      ``[B, N]`` int32 NumPy array.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if eos_token_id is None:
        eos = []
    else:
        eos = [int(eos_token_id)] if np.ndim(eos_token_id) == 0 else [int(e) for e in eos_token_id]
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    ids, mask = pad_prompts(prompt_ids, pad_token_id, padding_side=padding_side, multiple=pad_multiple)
    eos_E = jnp.asarray(eos if eos else [-1], jnp.int32)
    graphdef, state = nnx.split(model)
    tokens = _generate(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), eos_E, jnp.int32(pad_token_id),
                       jax.random.key(seed), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                       max_new_tokens=int(max_new_tokens), sample=temperature > 0)
    return np.asarray(tokens)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Generates a continuation of each prompt string; returns the new text of each (without EOS).

    Prompts are tokenised as given (apply the chat template first for chat models). A row ends at the
    tokenizer's ``eos_token_id`` or at any EOS id of the model config (``eos_token_id`` may be a list in
    HF configs). See :func:`generate_ids` for the arguments.
    """
    if tokenizer is None:
        raise ModelError("generate needs a tokenizer (this model was loaded from a folder without one)")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    eos, pad = stop_and_pad_ids(model, tokenizer)
    tokens = generate_ids(model, prompt_ids, max_new_tokens, eos_token_id=eos or None, pad_token_id=pad,
                          temperature=temperature, top_p=top_p, seed=seed)
    texts = []
    for row in tokens.tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        texts.append(tokenizer.decode(row[:ends[0]] if ends else row, skip_special_tokens=True))
    return texts


def stop_and_pad_ids(model, tokenizer) -> tuple[list[int], int]:
    """``(eos, pad)``: the EOS ids a generated row ends at — the tokenizer's first, then any others the
    model config names (HF ``eos_token_id`` lists) — and the padding id (the tokenizer's, else the first
    EOS, else 0)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(getattr(model, "cfg", None), "eos_token_id", None)
    for i in ([extra] if isinstance(extra, int) else list(extra or ())):
        if i not in eos:
            eos.append(int(i))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return eos, pad
