"""CHES and LN-CHES: which preference pairs cause likelihood displacement (Razin et al., ICLR 2025).

Letters: B pairs, T sequence length, P prompt length, R response length (padded), D model width.

For a pair ``(x, y+, y−)`` under the sequence convention of DESIGN §3 (EOS appended to each response), let
``h_k(y)`` be the last-layer hidden state after the final norm (the ``lm_head`` input) at the position that
predicts response token ``k`` (``k = 1`` is the last prompt token). Then

* ``S(y) = Σ_k h_k(y)`` over the ``|y|`` response positions (EOS included in ``|y|``);
* ``CHES = ⟨S(y+), S(y−)⟩ − ‖S(y+)‖²``  (Definition 2);
* ``LN-CHES = ⟨S(y+), S(y−)⟩ / (|y+|·|y−|) − ‖S(y+)‖² / |y+|²``  (Definition 3, App. A).

A higher score means the two responses look more alike to the model, and training on the pair is more
likely to *lower* ``log π(y+|x)``. LN-CHES is the one to filter with: raw CHES grows with the length of y−.

Pure functions (:func:`hidden_sum`, :func:`ches`, :func:`ln_ches`, :func:`scores_from_sums`) work on any
batch; :func:`pair_scores` runs a model on a batch of pairs with the prompt computed once
(:func:`jaxalign.pairs.pair_forward`, no logits; on CPU one pass over ``[prompt | chosen | rejected]``,
:func:`jaxalign.pairs.fused_pays`); :func:`make_scorer` jits it with the batch sharded over
a mesh's ``data``/``fsdp`` axes. The whole-dataset job (tokenize, sort by length, score, write Parquet,
resume) is :func:`jaxalign.jobs.ches.run_ches`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import pairs
from jaxalign.models import parts

#: The per-pair arrays :func:`pair_scores` returns (all ``[B]``).
SCORE_FIELDS = ("ches", "ln_ches", "last_hidden_ip", "chosen_len", "rejected_len")

#: The batch arrays :func:`pair_scores` and :func:`make_scorer` take.
BATCH_FIELDS = pairs.KEYS


def hidden_sum(hidden_BTD: jax.Array, response_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``S(y)`` and ``|y|``: the hidden states summed over the response positions, in float32.

    Args:
      hidden_BTD: ``[B, T, D]`` hidden states of full ``prompt + response`` rows.
      response_mask_BT: ``[B, T]`` the response positions (:func:`jaxalign.logprobs.response_mask`):
        from the last prompt token to the second-to-last token.

    Returns:
      ``S`` ``[B, D]`` float32 and ``|y|`` ``[B]`` int32.

    Examples:
      >>> import jax.numpy as jnp
      >>> S, n = hidden_sum(jnp.arange(12.0).reshape(1, 4, 3), jnp.array([[0, 1, 1, 0]]))
      >>> S.tolist(), n.tolist()
      ([[9.0, 11.0, 13.0]], [2])
    """
    if hidden_BTD.ndim != 3 or response_mask_BT.shape != hidden_BTD.shape[:2]:
        raise ValueError(f"hidden {hidden_BTD.shape} and mask {response_mask_BT.shape} need shapes "
                         "[B, T, D] and [B, T]")
    mask = response_mask_BT.astype(jnp.float32)
    S_BD = jnp.einsum("BT,BTD->BD", mask, hidden_BTD.astype(jnp.float32))
    return S_BD, jnp.sum(response_mask_BT.astype(bool), axis=1).astype(jnp.int32)


def ches(chosen_sum_BD: jax.Array, rejected_sum_BD: jax.Array) -> jax.Array:
    """``CHES = ⟨S(y+), S(y−)⟩ − ‖S(y+)‖²`` per pair (Razin et al., Definition 2).

    Args:
      chosen_sum_BD: ``[B, D]`` ``S(y+)``.
      rejected_sum_BD: ``[B, D]`` ``S(y−)``.

    Returns:
      ``[B]`` float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> ches(jnp.array([[1.0, 2.0]]), jnp.array([[3.0, 0.0]])).tolist()  # 3 - 5
      [-2.0]
    """
    _check_pair(chosen_sum_BD, rejected_sum_BD)
    sp = chosen_sum_BD.astype(jnp.float32)
    sm = rejected_sum_BD.astype(jnp.float32)
    return jnp.einsum("BD,BD->B", sp, sm) - jnp.einsum("BD,BD->B", sp, sp)


def ln_ches(chosen_sum_BD: jax.Array, rejected_sum_BD: jax.Array, chosen_len_B: jax.Array,
            rejected_len_B: jax.Array) -> jax.Array:
    """``LN-CHES = ⟨S(y+), S(y−)⟩ / (|y+|·|y−|) − ‖S(y+)‖² / |y+|²`` (Razin et al., Definition 3).

    Equivalently ``⟨m+, m−⟩ − ‖m+‖²`` with the mean hidden states ``m = S / |y|``.

    Args:
      chosen_sum_BD, rejected_sum_BD: ``[B, D]`` ``S(y+)``, ``S(y−)``.
      chosen_len_B, rejected_len_B: ``[B]`` ``|y+|``, ``|y−|`` (number of summed positions, >= 1).

    Returns:
      ``[B]`` float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> ln_ches(jnp.array([[2.0, 4.0]]), jnp.array([[9.0, 0.0]]), jnp.array([2]), jnp.array([3])).tolist()
      [-2.0]
    """
    _check_pair(chosen_sum_BD, rejected_sum_BD)
    mp = chosen_sum_BD.astype(jnp.float32) / jnp.asarray(chosen_len_B, jnp.float32)[:, None]
    mm = rejected_sum_BD.astype(jnp.float32) / jnp.asarray(rejected_len_B, jnp.float32)[:, None]
    return jnp.einsum("BD,BD->B", mp, mm) - jnp.einsum("BD,BD->B", mp, mp)


def _check_pair(a, b) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"S(y+) {a.shape} and S(y-) {b.shape} need the same shape [B, D]")


def scores_from_sums(out: pairs.PairOutput) -> dict[str, jax.Array]:
    """CHES, LN-CHES, the last-hidden-state baseline and the lengths from a :class:`PairOutput`."""
    return {
        "ches": ches(out.chosen_hidden_sum, out.rejected_hidden_sum),
        "ln_ches": ln_ches(out.chosen_hidden_sum, out.rejected_hidden_sum, out.chosen_lengths,
                           out.rejected_lengths),
        "last_hidden_ip": jnp.einsum("BD,BD->B", out.chosen_last_hidden, out.rejected_last_hidden),
        "chosen_len": out.chosen_lengths,
        "rejected_len": out.rejected_lengths,
    }


def pair_scores(model, prompt_ids: jax.Array, prompt_mask: jax.Array, chosen_ids: jax.Array,
                chosen_mask: jax.Array, rejected_ids: jax.Array, rejected_mask: jax.Array, *,
                layer: int | None = None, return_sums: bool = False) -> dict[str, jax.Array]:
    """Scores a batch of pairs with the model; the prompt runs once and no logits are computed.

    Args:
      model: a ``jaxalign.models`` causal LM.
      prompt_ids, prompt_mask: ``[B, P]`` prompts (any padding side).
      chosen_ids, chosen_mask, rejected_ids, rejected_mask: ``[B, R]`` responses with EOS, right-padded.
      layer: ``None`` (default) for the last layer after the final norm, as the paper; an integer ``i``
        for ``layer_hidden[i]`` (``0`` = embeddings, ``i`` = output of block ``i``, *before* any final
        norm; negative values count from the end, so ``-1`` is the last block before the final norm).
      return_sums: also return ``chosen_sum``/``rejected_sum`` ``[B, D]``.

    Returns:
      a dict of ``[B]`` arrays named as :data:`SCORE_FIELDS` (plus the sums when asked).
    """
    out = pairs.pair_forward(model, prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids,
                             rejected_mask, logps=False, hidden_sums=True, layer=layer,
                             fused=pairs.fused_pays())
    result = scores_from_sums(out)
    if return_sums:
        result.update(chosen_sum=out.chosen_hidden_sum, rejected_sum=out.rejected_hidden_sum)
    return result


def make_scorer(model, *, mesh=None, layer: int | None = None, return_sums: bool = False
                ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A jitted ``batch -> scores`` function for this model, the batch sharded over ``mesh``.

    The model is split once (``nnx.split``); its parameters are placed by their logical axes
    (:func:`jaxalign.parallel.state_shardings`) and the batch rows over the mesh's ``data`` and ``fsdp``
    axes. The batch size must be a multiple of ``data × fsdp`` (the runner pads batches). On several hosts
    every process passes the same global batch; each device takes its rows from its own host's copy.

    Args:
      model: a ``jaxalign.models`` causal LM.
      mesh: a ``jax.sharding.Mesh`` from :func:`jaxalign.parallel.make_mesh`, or ``None`` (one device).
      layer: see :func:`pair_scores`.
      return_sums: see :func:`pair_scores`.

    Returns:
      ``scorer(batch)`` taking a mapping with :data:`BATCH_FIELDS` (NumPy ``[B, P]``/``[B, R]``, the
      whole batch on every process) and returning NumPy arrays (all rows, on every process).
    """
    return parts.host_jit(model, score_batch, keys=BATCH_FIELDS, mesh=mesh, options=(layer, return_sums))


def score_batch(model, batch: Mapping[str, jax.Array], layer: int | None = None, return_sums: bool = False
                ) -> dict[str, jax.Array]:
    """:func:`pair_scores` of a batch mapping (:data:`BATCH_FIELDS`); what :func:`make_scorer` jits."""
    return pair_scores(model, *(batch[k] for k in BATCH_FIELDS), layer=layer, return_sums=return_sums)
