"""Token-level likelihood displacement between two checkpoints (Razin et al., ICLR 2025, §3 and App. H.1).

Letters: B pairs, V vocabulary, D model width, K rising tokens kept per pair.

Given a checkpoint *before* and one *after* preference training, and the pairs ``(x, y+, y−)``:

* per pair, ``log π(y+|x)`` and ``log π(y−|x)`` (sums over response tokens, EOS included; DESIGN §3)
  under both checkpoints and their changes. Likelihood displacement (Definition 1) is a fall of the
  mean ``log π(y+|x)``;
* per pair, the next-token distribution after the prompt under both checkpoints, and the ``K`` tokens
  whose probability rose most, with their probabilities before and after. With single-token responses
  (the paper's persona setting) these are the tokens the lost mass went to: benign (``Yes`` → ``_Yes``)
  or catastrophic (``No`` → ``Yes``);
* for **single-token pairs** (each response one token, then EOS), the theory quantities of Theorems 1–2
  (and Table 13), from the unembedding ``W`` (``model.unembedding()``, ``[V, D]``) of the *before*
  checkpoint:

  - ``w_chosen_dot_rejected`` = ``⟨W_y+, W_y−⟩``;
  - ``w_diff_proj_on_chosen`` = ``⟨W_y+ − W_y−, W_y+⟩ / ‖W_y+‖``, the signed length of the projection
    of ``W_y+ − W_y−`` on ``W_y+``, and ``w_diff_orth_norm`` = the norm of the part orthogonal to
    ``W_y+`` (the paper finds the orthogonal part larger, which is why unrelated tokens can gain);
  - ``theorem1_term`` = ``⟨W_y+, W_y−⟩ + Σ_{z ∉ {y+, y−}} π(z|x) ⟨W_z, W_y+ − W_y−⟩`` under the before
    checkpoint: the larger, the faster ``log π(y+|x)`` falls at the start of training;
  - per rising token ``z``, ``w_z_dot_diff`` = ``⟨W_z, W_y+ − W_y−⟩`` (Theorem 2: tokens with a large
    value gain probability).

:func:`pair_statistics` is the per-batch function (jit-ed, prompt once); :func:`theory_quantities`
the pure function of ``W``. The job behind ``jaxalign displacement`` (the batch loop, the tables and
``summary.json``) is :mod:`jaxalign.jobs.displacement`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import pairs
from jaxalign.models import parts

PAIR_COLUMNS = (
    "index", "prompt_len", "chosen_len", "rejected_len", "single_token", "chosen_token", "rejected_token",
    "logp_chosen_before", "logp_chosen_after", "delta_logp_chosen",
    "logp_rejected_before", "logp_rejected_after", "delta_logp_rejected",
    "p_first_chosen_before", "p_first_chosen_after", "p_first_rejected_before", "p_first_rejected_after",
    "w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term")
_BATCH_KEYS = pairs.KEYS
TOKEN_COLUMNS = ("index", "rank", "token_id", "token", "prob_before", "prob_after", "prob_increase",
                 "is_chosen", "is_rejected", "w_z_dot_diff")


def pair_statistics(model, batch: dict) -> dict[str, jax.Array]:
    """Summed log-probs of both responses and the next-token log-distribution after the prompt.

    Args:
      model: a ``jaxalign.models`` causal LM.
      batch: the shared-prompt layout (:func:`jaxalign.data.shared_prompt_batch`).

    Returns:
      ``chosen_logps`` ``[B]``, ``rejected_logps`` ``[B]`` and ``next_logprobs`` ``[B, V]`` (float32).
    """
    out = pairs.pair_forward(model, batch["prompt_ids"], batch["prompt_mask"], batch["chosen_ids"],
                             batch["chosen_mask"], batch["rejected_ids"], batch["rejected_mask"],
                             logps=True)
    logits_BV = model.logits(out.prompt_last_hidden[:, None, :])[:, 0].astype(jnp.float32)
    return {"chosen_logps": out.chosen_logps, "rejected_logps": out.rejected_logps,
            "next_logprobs": jax.nn.log_softmax(logits_BV, axis=-1)}


def theory_quantities(W_VD: jax.Array, chosen_B: jax.Array, rejected_B: jax.Array,
                      probs_BV: jax.Array | None = None) -> dict[str, jax.Array]:
    """The single-token quantities of Razin et al. Theorems 1–2 / Table 13 (module doc).

    Args:
      W_VD: ``[V, D]`` the unembedding (rows are output token embeddings).
      chosen_B, rejected_B: ``[B]`` token ids ``y+``, ``y−``.
      probs_BV: ``[B, V]`` next-token probabilities ``π(·|x)``, for ``theorem1_term`` (optional).

    Returns:
      ``w_chosen_dot_rejected``, ``w_diff_proj_on_chosen``, ``w_diff_orth_norm`` ``[B]``,
      ``w_dot_diff`` ``[B, V]`` (``⟨W_z, W_y+ − W_y−⟩`` for every ``z``) and, with ``probs_BV``,
      ``theorem1_term`` ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> W = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
      >>> q = theory_quantities(W, jnp.array([0]), jnp.array([1]))
      >>> [float(q[k][0]) for k in ("w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm")]
      [1.0, 0.0, 1.0]
    """
    W = W_VD.astype(jnp.float32)
    wp_BD, wm_BD = W[chosen_B], W[rejected_B]
    diff_BD = wp_BD - wm_BD
    wp_norm_B = jnp.linalg.norm(wp_BD, axis=-1)
    proj_B = jnp.einsum("BD,BD->B", diff_BD, wp_BD) / wp_norm_B
    orth_BD = diff_BD - (proj_B / wp_norm_B)[:, None] * wp_BD
    w_dot_diff_BV = jnp.einsum("VD,BD->BV", W, diff_BD)
    out = {"w_chosen_dot_rejected": jnp.einsum("BD,BD->B", wp_BD, wm_BD),
           "w_diff_proj_on_chosen": proj_B, "w_diff_orth_norm": jnp.linalg.norm(orth_BD, axis=-1),
           "w_dot_diff": w_dot_diff_BV}
    if probs_BV is not None:
        V = W.shape[0]
        others_BV = ~(jax.nn.one_hot(chosen_B, V, dtype=bool) | jax.nn.one_hot(rejected_B, V, dtype=bool))
        out["theorem1_term"] = out["w_chosen_dot_rejected"] + jnp.sum(
            jnp.where(others_BV, probs_BV.astype(jnp.float32) * w_dot_diff_BV, 0.0), axis=-1)
    return out


theory_jit = jax.jit(theory_quantities)


def top_rising(probs_before_BV: np.ndarray, probs_after_BV: np.ndarray, k: int) -> np.ndarray:
    """``[B, K]`` token ids with the largest ``π_after − π_before``, largest first (ties: lower id)."""
    diff = np.asarray(probs_after_BV, np.float64) - np.asarray(probs_before_BV, np.float64)
    k = min(k, diff.shape[-1])
    order = np.argsort(-diff, axis=-1, kind="stable")
    return order[:, :k]


def single_token(tokens, rows: np.ndarray, eos_id: int) -> np.ndarray:
    """Whether each pair's responses are one token each followed by EOS, and different."""
    out = np.zeros(len(rows), bool)
    for j, i in enumerate(rows):
        c, r = tokens.chosen[i], tokens.rejected[i]
        out[j] = (len(c) == 2 and len(r) == 2 and c[-1] == eos_id and r[-1] == eos_id and c[0] != r[0])
    return out


def statistics_fn(model, mesh=None) -> Callable:
    """``batch -> pair_statistics(model, batch)`` as NumPy, jitted (:func:`jaxalign.models.parts.host_jit`:
    the model's structure is static, so the before and after checkpoints share one compilation per shape).
    """
    return parts.host_jit(model, pair_statistics, keys=_BATCH_KEYS, mesh=mesh)
