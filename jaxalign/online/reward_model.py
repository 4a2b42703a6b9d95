"""A reward model: a causal-LM backbone with a scalar head, trained with the Bradley–Terry loss.

Letters: B pairs, P prompt length, R response length (padded), D model width.

``r(x, y) = w · h_last(x, y) + b``, where ``h_last`` is the final hidden state (after the last norm) at
the **last valid token** of ``prompt + response`` (the EOS when the response has one), as TRL's reward
models. The Bradley–Terry loss of a preference pair is ``−log σ(r(x, y+) − r(x, y−))``.

Pairs are scored with the prompt computed once (the shared-prompt layout of :mod:`jaxalign.data`): the
prompt runs into a KV cache, which is tiled for the two responses (as :func:`jaxalign.pairs.pair_forward`).
In D2PO (:mod:`jaxalign.online.d2po`) the reward model is the **discriminator** that silver-labels the
policy's samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxalign import pairs


class RewardModel(nnx.Module):
    """A ``jaxalign.models`` causal LM (``backbone``) plus a linear head ``D → 1``.

    Args:
      backbone: the causal LM (its ``lm_head`` is kept but never used).
      rngs: ``nnx.Rngs`` for the head's initialisation.
      head_std: standard deviation of the head's initial weights (default ``1/√(D+1)``, TRL's
        ``nn.Linear`` scale); the bias starts at 0.
    """

    def __init__(self, backbone, *, rngs: nnx.Rngs, head_std: float | None = None):
        D = int(backbone.cfg.hidden_size)
        self.backbone = backbone
        std = (1.0 / (D + 1) ** 0.5) if head_std is None else head_std
        self.head = nnx.Linear(D, 1, kernel_init=nnx.initializers.normal(std),
                               bias_init=nnx.initializers.zeros_init(), rngs=rngs)

    def score_hidden(self, h_BD: jax.Array) -> jax.Array:
        """Rewards ``[B]`` float32 of last-token hidden states ``[B, D]``."""
        return self.head(h_BD.astype(jnp.float32))[:, 0]

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
        """Rewards ``[B]`` of full ``prompt + response`` rows (any padding side)."""
        out = self.backbone(input_ids_BT, attention_mask_BT, return_logits=False)
        return self.score_hidden(last_token(out.hidden, attention_mask_BT))


def last_token(hidden_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """The hidden state ``[B, D]`` at each row's last valid position."""
    return pairs.take_rows(hidden_BTD, pairs.last_valid_index(mask_BT))


def pair_last_hidden(model: RewardModel, prompt_ids_BP: jax.Array, prompt_mask_BP: jax.Array,
                     chosen_ids_BR: jax.Array, chosen_mask_BR: jax.Array, rejected_ids_BR: jax.Array,
                     rejected_mask_BR: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Last-token hidden states ``[B, D]`` of ``x + y+`` and ``x + y−``, the prompt computed once.

    Prompts may be padded on either side; responses are right-padded. A response with no tokens gets the
    prompt's last hidden state.
    """
    batch = pairs.PairBatch(prompt_ids_BP, prompt_mask_BP, chosen_ids_BR, chosen_mask_BR, rejected_ids_BR,
                            rejected_mask_BR)
    B = prompt_ids_BP.shape[0]
    prompt = pairs.encode_prompt(model.backbone, prompt_ids_BP, prompt_mask_BP,
                                 response_length=chosen_ids_BR.shape[1])
    h_prompt_BD = prompt.last_hidden()
    ids_2BR, mask_2BR = batch.responses_2BR()
    resp_out = pairs.continue_responses(model.backbone, prompt, ids_2BR, mask_2BR)
    h_2BD = last_token(resp_out.hidden, mask_2BR)
    empty_2B = jnp.sum(mask_2BR, axis=1) == 0
    h_2BD = jnp.where(empty_2B[:, None], jnp.concatenate([h_prompt_BD] * 2, 0), h_2BD)
    return h_2BD[:B], h_2BD[B:]


def pair_rewards(model: RewardModel, prompt_ids_BP: jax.Array, prompt_mask_BP: jax.Array,
                 chosen_ids_BR: jax.Array, chosen_mask_BR: jax.Array, rejected_ids_BR: jax.Array,
                 rejected_mask_BR: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(r(x, y+), r(x, y−))``, each ``[B]``, with the prompt computed once (see :func:`pair_last_hidden`)."""
    h_c, h_r = pair_last_hidden(model, prompt_ids_BP, prompt_mask_BP, chosen_ids_BR, chosen_mask_BR,
                                rejected_ids_BR, rejected_mask_BR)
    return model.score_hidden(h_c), model.score_hidden(h_r)


def head_rewards(head: dict, h_BD: jax.Array) -> jax.Array:
    """Rewards ``[B]`` of hidden states under a head given as a pure dict ``{"kernel": [D, 1], "bias": [1]}``
    (``nnx.to_pure_dict`` of :attr:`RewardModel.head`)."""
    return (h_BD.astype(jnp.float32) @ head["kernel"].astype(jnp.float32))[:, 0] + head["bias"][0]


def bradley_terry(chosen_rewards: ArrayLike, rejected_rewards: ArrayLike) -> jax.Array:
    """Bradley–Terry loss per pair: ``−log σ(r+ − r−) = softplus(r− − r+)``.

    Args:
      chosen_rewards: ``[B]`` rewards of the preferred responses.
      rejected_rewards: ``[B]`` rewards of the other responses.

    Returns:
      ``[B]`` float32 losses (unreduced).

    Examples:
      >>> import jax.numpy as jnp
      >>> [round(v, 4) for v in bradley_terry(jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0])).tolist()]
      [0.3133, 0.6931]

    References:
      Bradley & Terry (1952); Ouyang et al. (2022), Eq. 1.
    """
    rc = jnp.asarray(chosen_rewards, jnp.float32)
    rr = jnp.asarray(rejected_rewards, jnp.float32)
    if rc.shape != rr.shape:
        raise ValueError(f"chosen rewards {rc.shape} and rejected rewards {rr.shape} differ in shape")
    return jax.nn.softplus(rr - rc)


def bt_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array, weights: jax.Array) -> dict:
    """Weighted mean loss, accuracy (r+ > r−) and margin of a batch (``weights`` 0 for fillers)."""
    w = weights.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    loss = jnp.sum(w * bradley_terry(chosen_rewards, rejected_rewards)) / n
    acc = jnp.sum(w * (chosen_rewards > rejected_rewards)) / n
    margin = jnp.sum(w * (chosen_rewards - rejected_rewards)) / n
    return {"loss": loss, "accuracy": acc, "margin": margin}
