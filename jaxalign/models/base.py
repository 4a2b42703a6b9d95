"""What every causal LM in ``jaxalign.models`` shares: outputs, the KV cache, positions, attention, RoPE.

Letters: B batch, T new tokens, S cache length (keys), D model width, N query heads, K key/value heads,
H head dim, V vocabulary, L layers.

The calling convention of every model (``model(input_ids_BT, attention_mask_BT, cache=None, ...)``):

* Positions come from the mask: the position of a token is the number of valid tokens before it in its
  row (counting the cache). So left padding, right padding and gaps all give HF's positions.
* Causality is by position: a query attends to valid keys whose position is ``<=`` its own. A cache may
  hold padding (``valid`` False) anywhere; the continuation of a right-padded prompt is therefore exact.
* With a cache, the new tokens' keys/values are written at ``[cache.end, cache.end + T)`` and the queries
  attend over all ``S`` slots. The shared-prompt trick: run the prompt ``[B, Tp]`` into a cache sized
  ``Tp + Tr``, ``cache.repeat(2)``, then run chosen and rejected responses ``[2B, Tr]`` against it.
  Generation uses the same path one token at a time.
* Branches (``branch_BT``, no cache): one row ``[trunk | branch 1 | branch 2 …]`` whose branches each
  continue the trunk without seeing each other (:func:`branch_positions`): the shared-prompt pair in one
  pass, ``[prompt | chosen | rejected]``, with no cache written or tiled. An integer ``branch_BT`` masks
  the whole ``[T, T]`` score block; a static layout ``(trunk, length, count)`` (:class:`Branches`) attends
  per part, the trunk over itself and each branch over ``[trunk | itself]``, never scoring masked blocks.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.custom_derivatives import SymbolicZero

from jaxalign import parallel
from jaxalign.errors import ModelError
from jaxalign.models import scan


class ModelOutput(NamedTuple):
    """Result of a forward pass.

    Attributes:
      logits: ``[B, T, V]`` float32, or ``None`` when ``return_logits=False`` (the CHES path).
      hidden: ``[B, T, D]`` the final hidden states after the last norm (the lm_head input).
      layer_hidden: ``None``, or a tuple of ``L + 1`` arrays ``[B, T, D]``: the embeddings' output and
        each block's output (HF ``output_hidden_states`` order, except that HF's last entry is after the
        final norm; ours is the raw last block output and ``hidden`` is the normed one).
      cache: the updated :class:`KVCache` when one was passed, else ``None``.
    """

    logits: jax.Array | None
    hidden: jax.Array
    layer_hidden: tuple[jax.Array, ...] | None = None
    cache: "KVCache | None" = None


@struct.dataclass
class KVCache:
    """Keys and values of earlier tokens, one entry per layer.

    Attributes:
      keys: tuple of ``L`` arrays ``[B, S, K, H]``.
      values: tuple of ``L`` arrays ``[B, S, K, H]``.
      positions: ``[B, S]`` int32 position of each slot.
      valid: ``[B, S]`` bool, whether the slot holds a real token.
      end: int32 scalar, the first free slot.
    """

    keys: tuple
    values: tuple
    positions: jax.Array
    valid: jax.Array
    end: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        zeros = lambda: jnp.zeros((batch, length, num_kv_heads, head_dim), dtype)  # noqa: E731
        return cls(keys=tuple(zeros() for _ in range(num_layers)),
                   values=tuple(zeros() for _ in range(num_layers)),
                   positions=jnp.zeros((batch, length), jnp.int32),
                   valid=jnp.zeros((batch, length), bool),
                   end=jnp.zeros((), jnp.int32))

    def next_positions(self, attention_mask_BT: jax.Array) -> jax.Array:
        """Positions ``[B, T]`` of new tokens continuing this cache."""
        return positions_from_mask(attention_mask_BT, offset_B=self.valid.sum(-1).astype(jnp.int32))

    def append_tokens(self, positions_BT: jax.Array, attention_mask_BT: jax.Array) -> "KVCache":
        """Records the new tokens' positions and validity (keys/values are written per layer)."""
        start = (0, self.end)
        return self.replace(
            positions=jax.lax.dynamic_update_slice(self.positions, positions_BT.astype(jnp.int32), start),
            valid=jax.lax.dynamic_update_slice(self.valid, attention_mask_BT.astype(bool), start))

    def write_layer(self, layer: int, k_BTKH: jax.Array, v_BTKH: jax.Array) -> "KVCache":
        """Writes layer ``layer``'s new keys and values at ``[end, end + T)``."""
        start = (0, self.end, 0, 0)
        keys = list(self.keys)
        values = list(self.values)
        keys[layer] = jax.lax.dynamic_update_slice(keys[layer], k_BTKH.astype(keys[layer].dtype), start)
        values[layer] = jax.lax.dynamic_update_slice(values[layer], v_BTKH.astype(values[layer].dtype),
                                                     start)
        return self.replace(keys=tuple(keys), values=tuple(values))

    def advance(self, num_tokens: int) -> "KVCache":
        return self.replace(end=self.end + num_tokens)

    def repeat(self, n: int) -> "KVCache":
        """Tiles the batch ``n`` times: rows ``[b, b + B, …]`` continue row ``b`` (chosen; rejected)."""
        tile = lambda x: jnp.concatenate([x] * n, axis=0)  # noqa: E731
        return self.replace(keys=tuple(map(tile, self.keys)), values=tuple(map(tile, self.values)),
                            positions=tile(self.positions), valid=tile(self.valid))


def positions_from_mask(attention_mask_BT: jax.Array, offset_B: jax.Array | None = None) -> jax.Array:
    """Position of each token = number of valid tokens before it in its row (plus ``offset_B``).

    Padding tokens get the position of the next valid token (clipped at 0); they are masked anyway.
    """
    mask = attention_mask_BT.astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    pos = jnp.where(mask > 0, pos, jnp.maximum(jnp.cumsum(mask, axis=-1), 0))
    if offset_B is not None:
        pos = pos + offset_B[:, None]
    return pos.astype(jnp.int32)


def attention_mask_BTS(q_pos_BT, k_pos_BS, q_valid_BT, k_valid_BS, sliding_window: int | None = None):
    """Boolean ``[B, T, S]``: valid keys at positions ``<=`` the query's (and within the window).

    ``k_valid`` is ``[B, S]``, or ``[B, T, S]`` when validity depends on the query (branches:
    :func:`branch_positions`), or a :class:`BranchKeys` (a static branch layout), which gives a
    :class:`SplitMask` of the parts instead. A padding query attends to the first valid key only, so no
    softmax row is empty (no NaN gradients); its output is never used.
    """
    if isinstance(k_valid_BS, BranchKeys):
        return _split_mask(q_pos_BT, q_valid_BT, k_valid_BS, sliding_window)
    k_valid_BTS = k_valid_BS[:, None, :] if k_valid_BS.ndim == 2 else k_valid_BS
    allowed = (k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]) & k_valid_BTS
    if sliding_window is not None:
        allowed &= (q_pos_BT[:, :, None] - k_pos_BS[:, None, :]) < sliding_window
    q_valid = q_valid_BT.astype(bool)[:, :, None]
    first_key = jax.nn.one_hot(jnp.argmax(k_valid_BTS, axis=-1), k_valid_BS.shape[-1], dtype=bool)
    return jnp.where(q_valid, allowed, first_key)


def branch_positions(attention_mask_BT: jax.Array, branch_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Positions ``[B, T]`` and key visibility ``[B, T, S=T]`` of a row holding a shared trunk and branches.

    ``branch_BT`` (any integer shape broadcastable to ``[B, T]``): 0 marks the trunk (e.g. a prompt), ``k > 0``
    branch ``k`` (e.g. one response). A token sees the trunk's valid tokens and its own branch's, never
    another branch's; its position counts the valid tokens it sees before it, as
    :func:`positions_from_mask` does for a plain row. So with the trunk first, each branch is computed
    exactly as the row ``[trunk | branch]`` alone would be (and as a branch continuing the trunk's cache).
    """
    valid_BT = attention_mask_BT.astype(bool)
    branch_BT = jnp.broadcast_to(branch_BT, valid_BT.shape)
    q_br, k_br = branch_BT[:, :, None], branch_BT[:, None, :]
    visible_BTS = ((k_br == 0) | (k_br == q_br)) & valid_BT[:, None, :]
    T = valid_BT.shape[1]
    seen_BT = jnp.sum(visible_BTS & jnp.tril(jnp.ones((T, T), bool)), axis=-1, dtype=jnp.int32)
    positions_BT = jnp.where(valid_BT, jnp.maximum(seen_BT - 1, 0), seen_BT)
    return positions_BT, visible_BTS


@dataclasses.dataclass(frozen=True)
class Branches:
    """A static ``branch_BT``: rows ``[trunk | branch 1 | … | branch count]``, ``count`` branches of
    ``length`` columns after a ``trunk`` of ``trunk`` columns (the shared-prompt pair ``[prompt | chosen |
    rejected]``: ``Branches(P, R, 2)``).

    Each branch sees the trunk and itself, as with an integer ``branch_BT``, and attention runs per part
    (:class:`SplitMask`): the trunk over its own keys, the branches batched over ``[trunk | own branch]``
    keys, so the masked trunk × branch and branch × branch blocks of a ``[T, T]`` mask are never scored.
    The keys are the same, in the same order, as a branch continuing the trunk's KV cache.
    """

    trunk: int
    length: int
    count: int

    def split_rows(self, x_BT_: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, T, …]`` → the trunk ``[B, trunk, …]`` and the branches ``[B·count, length, …]`` (branch ``j``
        of row ``b`` at row ``b·count + j``: a row's branches stay beside it, on its device when the rows
        are sharded)."""
        B, rest = x_BT_.shape[0], x_BT_.shape[2:]
        return x_BT_[:, :self.trunk], x_BT_[:, self.trunk:].reshape(B * self.count, self.length, *rest)

    def join_rows(self, trunk_BP_: jax.Array, branches_NR_: jax.Array) -> jax.Array:
        """The inverse of :meth:`split_rows`."""
        B, rest = trunk_BP_.shape[0], branches_NR_.shape[2:]
        return jnp.concatenate([trunk_BP_, branches_NR_.reshape(B, self.count * self.length, *rest)], axis=1)

    def keys(self, trunk_BP_: jax.Array, branches_NR_: jax.Array) -> jax.Array:
        """The keys of each branch row: ``[B·count, trunk + length, …]`` = its row's trunk, then itself."""
        return jnp.concatenate([jnp.repeat(trunk_BP_, self.count, axis=0), branches_NR_], axis=1)

    def positions(self, attention_mask_BT: jax.Array) -> jax.Array:
        """Positions ``[B, T]``: the trunk's from its mask; a branch's continue its row's valid trunk
        tokens (as ``KVCache.next_positions`` does for a branch run after the trunk)."""
        trunk_BP, branches_NR = self.split_rows(attention_mask_BT.astype(jnp.int32))
        offset_N = jnp.repeat(jnp.sum(trunk_BP, axis=1), self.count)
        return self.join_rows(positions_from_mask(trunk_BP), positions_from_mask(branches_NR, offset_N))


@struct.dataclass
class BranchKeys:
    """The keys' validity of a :class:`Branches` call (``DecoderLM.call_positions`` gives it in place of a
    ``[B, S]`` array): :func:`attention_mask_BTS` turns it into a :class:`SplitMask`."""

    positions_BT: jax.Array
    valid_BT: jax.Array
    layout: Branches = struct.field(pytree_node=False)


@struct.dataclass
class SplitMask:
    """The attention mask of a :class:`Branches` call, per part: ``trunk_BPP`` ``[B, P, P]`` and
    ``branches_NRS`` ``[B·count, R, P + R]`` (keys: the row's trunk, then the branch). :func:`attend`
    attends each part over its own keys and joins the outputs."""

    trunk_BPP: jax.Array
    branches_NRS: jax.Array
    layout: Branches = struct.field(pytree_node=False)

    def attend(self, attend_fn, q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array) -> jax.Array:
        """``[B, T, N, H]``: ``attend_fn(q, k, v, mask)`` on the trunk and on the branches, joined."""
        split = self.layout.split_rows
        (q_p, q_b), (k_p, k_b), (v_p, v_b) = split(q_BTNH), split(k_BTKH), split(v_BTKH)
        out_trunk = attend_fn(q_p, k_p, v_p, self.trunk_BPP)
        out_branches = attend_fn(q_b, self.layout.keys(k_p, k_b), self.layout.keys(v_p, v_b), self.branches_NRS)
        return self.layout.join_rows(out_trunk, out_branches)


def _split_mask(q_pos_BT, q_valid_BT, keys: BranchKeys, sliding_window: int | None) -> SplitMask:
    L = keys.layout
    (qp_p, qp_b), (qv_p, qv_b) = L.split_rows(q_pos_BT), L.split_rows(q_valid_BT)
    (kp_p, kp_b), (kv_p, kv_b) = L.split_rows(keys.positions_BT), L.split_rows(keys.valid_BT)
    return SplitMask(attention_mask_BTS(qp_p, kp_p, qv_p, kv_p, sliding_window),
                     attention_mask_BTS(qp_b, L.keys(kp_p, kp_b), qv_b, L.keys(kv_p, kv_b), sliding_window), L)


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array, *,
              scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Grouped-query softmax attention, the reference (``"xla"``) path; returns ``[B, T, N, H]``.

    ``N`` must be a multiple of ``K``: query head ``n`` uses key/value head ``n // (N // K)``. The two
    products take the inputs' dtype with float32 accumulation (bfloat16 tensor cores on accelerators);
    scores, soft-capping and the softmax are float32. With float32 inputs everything is float32.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    if T > 1 and parallel.target_platform() == "cpu":
        return _attention_head_major(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=scale, softcap=softcap)
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(q_BTNH.dtype),
                              preferred_element_type=jnp.float32) * scale
    probs = _masked_softmax(scores_BKGTS, mask_BTS[:, None, None], softcap)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v_BSKH.dtype), v_BSKH,
                           preferred_element_type=jnp.float32)
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def _masked_softmax(scores: jax.Array, mask: jax.Array, softcap: float | None) -> jax.Array:
    """Float32 softmax over the last axis of (soft-capped) scores, masked-out keys at the float32 minimum."""
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


def _attention_head_major(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale: float, softcap: float | None):
    """:func:`attention` with ``q``, ``k``, ``v`` moved to ``[B, K, ·, H]`` first (a group's ``G·T`` query
    rows together), so that every product, forward and backward, is a plain batched matmul over ``(B, K)``.
    On XLA:CPU the 5-D einsums' backward ran in a strided layout (6 GFLOP/s in the train step's profile);
    this form measured 0.93–0.95x the train step's time (docs/benchmarks.md, session 7). Same sums."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k_BKSH = k_BSKH.astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
    v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
    scores_BKMS = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, k_BKSH, preferred_element_type=jnp.float32) * scale
    mask_B1MS = jnp.broadcast_to(mask_BTS[:, None], (B, G, T, S)).reshape(B, 1, G * T, S)
    probs = _masked_softmax(scores_BKMS, mask_B1MS, softcap)
    out_BKMH = jnp.einsum("BKMS,BKSH->BKMH", probs.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32)
    return out_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


# --- Attention implementations ---------------------------------------------------------------------

ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn")
"""Names of the attention implementations (a model's ``attention_impl``):

* ``"xla"`` — :func:`attention`, einsums and a float32 softmax; every mask, soft-capping; the reference.
* ``"dot_product"`` — ``jax.nn.dot_product_attention(implementation="xla")`` with our boolean mask.
* ``"cudnn"`` — ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's fused (flash)
  attention on NVIDIA GPUs, the mask passed as an additive bias; bfloat16/float16 only, head dim a
  multiple of 8 (≤ 128, 256 from Hopper), no soft-capping; ``[B, N, T, S]`` scores are never stored.
* ``"auto"`` — ``"cudnn"`` on a CUDA GPU when the model qualifies (bfloat16/float16 activations, head dim
  a multiple of 8 and ≤ 128, no soft-capping) and the call's query and key lengths are even (cuDNN's
  rule for a bias in training); ``"xla"`` otherwise (CPU, TPU, float32, Gemma 2).
"""


def _on_cuda() -> bool:
    return parallel.target_platform() in ("gpu", "cuda")


def check_attention_impl(name: str) -> str:
    """``name`` if it is one of :data:`ATTENTION_IMPLS`, else ``ModelError``."""
    if name not in ATTENTION_IMPLS:
        raise ModelError(f"attention_impl {name!r} is not known (choices: {', '.join(ATTENTION_IMPLS)})")
    return name


def resolve_attention_impl(name: str, *, dtype, head_dim: int, softcap: float | None = None,
                           per_call: bool = False) -> str:
    """The implementation a model of this ``dtype``/``head_dim``/``softcap`` uses for ``name``.

    ``"auto"`` resolves as in :data:`ATTENTION_IMPLS`; with ``per_call`` a ``"cudnn"`` choice stays
    ``"auto"`` so that :func:`attend` applies the sequence-length rule to each call's shapes. An explicit
    ``"dot_product"`` or ``"cudnn"`` that cannot serve the model is a ``ModelError`` (never a silent
    fallback).
    """
    check_attention_impl(name)
    low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        cudnn_ok = _on_cuda() and low_precision and head_dim % 8 == 0 and head_dim <= 128
        if cudnn_ok and softcap is None:
            return "auto" if per_call else "cudnn"
        return "xla"
    if name in ("dot_product", "cudnn") and softcap is not None:
        raise ModelError(f"attention_impl {name!r} cannot soft-cap attention scores (attn_logit_softcapping "
                         f"{softcap}); use 'xla' or 'auto'")
    if name == "cudnn":
        if not _on_cuda():
            raise ModelError(f"attention_impl 'cudnn' needs a CUDA GPU (the default backend is "
                             f"{jax.default_backend()!r}); use 'auto', 'xla' or 'dot_product'")
        if not low_precision:
            raise ModelError(f"attention_impl 'cudnn' needs bfloat16 or float16 activations, the model "
                             f"computes in {jnp.dtype(dtype).name}; use 'auto', 'xla' or 'dot_product'")
    return name


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array, *,
           scale: float | None = None, softcap: float | None = None, impl: str = "xla") -> jax.Array:
    """Attention of ``q`` over ``k``/``v`` under the boolean ``mask_BTS`` with a resolved ``impl``.

    ``impl`` comes from :func:`resolve_attention_impl` (``"auto"`` is accepted too and resolved here from
    the query dtype). All implementations compute the same function (tested on CPU at float32, 1e-5).
    """
    q_BTNH = parallel.constrain(q_BTNH, parallel.ACT_BTNH)
    k_BSKH, v_BSKH = (parallel.constrain(a, parallel.ACT_BTKH) for a in (k_BSKH, v_BSKH))
    if isinstance(mask_BTS, SplitMask):
        out_BTNH = mask_BTS.attend(functools.partial(_attend, scale=scale, softcap=softcap, impl=impl),
                                   q_BTNH, k_BSKH, v_BSKH)
        return parallel.constrain(out_BTNH, parallel.ACT_BTNH)
    out_BTNH = _attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=scale, softcap=softcap, impl=impl)
    return parallel.constrain(out_BTNH, parallel.ACT_BTNH)


def _attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, scale, softcap, impl):
    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    if impl == "auto":
        impl = resolve_attention_impl("auto", dtype=q_BTNH.dtype, head_dim=H, softcap=softcap)
        if impl == "cudnn" and (T % 2 or S % 2):
            impl = "xla"
    if impl == "xla":
        return attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale=scale, softcap=softcap)
    if impl not in ("dot_product", "cudnn"):
        raise ModelError(f"attention_impl {impl!r} is not a resolved implementation")
    if softcap is not None:
        raise ModelError(f"attention_impl {impl!r} cannot soft-cap attention scores; use 'xla'")
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    k_BSKH, v_BSKH = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None, :, :], scale=scale,
        implementation="xla" if impl == "dot_product" else "cudnn").astype(q_BTNH.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq_F: jax.Array,
               attention_scaling: float = 1.0) -> jax.Array:
    """Rotary embedding in HF's "rotate half" layout; only the first ``2F`` dims rotate (partial RoPE)."""
    rot = 2 * inv_freq_F.shape[0]
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
    # On CPU the [B, T, F] tables are written once (the barrier), not re-evaluated per head element inside
    # the consumers' fusions: 0.96x the CHES scorer's time (docs/benchmarks.md, session 7). Accelerators fuse.
    cos_BTF, sin_BTF = jnp.cos(angles_BTF) * attention_scaling, jnp.sin(angles_BTF) * attention_scaling
    if parallel.target_platform() == "cpu":
        cos_BTF, sin_BTF = jax.lax.optimization_barrier((cos_BTF, sin_BTF))
    cos, sin = (jnp.concatenate([t, t], axis=-1)[:, :, None, :] for t in (cos_BTF, sin_BTF))
    x_rot, x_pass = x_BTNH[..., :rot].astype(jnp.float32), x_BTNH[..., rot:]
    out = x_rot * cos + rotate_half(x_rot) * sin
    return jnp.concatenate([out.astype(x_BTNH.dtype), x_pass], axis=-1)


# --- Building blocks shared by the model families -------------------------------------------------

REMAT_POLICIES = ("full", "nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


def remat_policy(name: str | None):
    """``jax.checkpoint`` policy for a per-block remat name (``None``: no remat).

    ``"full"`` saves nothing (the whole block is recomputed in the backward pass); the other names of
    :data:`REMAT_POLICIES` are ``jax.checkpoint_policies`` attributes.
    """
    if name is None or name == "full":
        return None
    if name not in REMAT_POLICIES:
        raise ModelError(f"remat policy {name!r} is not known (choices: None, {', '.join(REMAT_POLICIES)})")
    return getattr(jax.checkpoint_policies, name)


def remat_block(fn, remat: str | None, *, prevent_cse: bool = True):
    """``fn`` (a function of an ``nnx.Module`` and arrays) rematerialised with the named policy."""
    if remat is None:
        return fn
    return nnx.remat(fn, policy=remat_policy(remat), prevent_cse=prevent_cse)


_KEEP = object()


def configure(model: nnx.Module, *, dtype=None, attention_impl: str | None = None, remat=_KEEP,
              scan_layers: bool | None = None) -> nnx.Module:
    """Sets a built model's run-time options in place (the loaders build with the defaults); returns it.

    Args:
      model: a ``jaxalign.models`` causal LM.
      dtype: the compute (activation) dtype of every layer, e.g. ``jnp.bfloat16`` over float32
        parameters (mixed precision: float32 master weights, bfloat16 matmuls; norms and softmaxes
        compute in float32, logits and log-probs are float32). Parameters keep their storage dtype.
      attention_impl: one of :data:`ATTENTION_IMPLS`.
      remat: a per-block rematerialisation policy name (:func:`remat_policy`) or ``None``.
      scan_layers: ``True`` stacks the blocks into one scanned block (:func:`set_scan_layers`), ``False``
        unstacks them, ``None`` keeps them as they are.

    Set options before ``nnx.split``/``jax.jit``: they are static (part of the graph definition).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxalign.models.llama import Llama, LlamaConfig
      >>> cfg = LlamaConfig("llama", 64, 16, 32, 1, 2, 1, 8)
      >>> m = configure(Llama(cfg, rngs=nnx.Rngs(0)), dtype=jnp.bfloat16, attention_impl="dot_product")
      >>> [jnp.dtype(x).name for x in (m.dtype, m.layers[0].mlp.up_proj.dtype, m.embed.embedding.dtype)]
      ['bfloat16', 'bfloat16', 'float32']
      >>> m.attention_impl
      'dot_product'
    """
    if attention_impl is not None:
        model.attention_impl = check_attention_impl(attention_impl)
    if remat is not _KEEP:
        remat_policy(remat)
        model.remat = remat
    if dtype is not None:
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
                node.dtype = dtype
    if scan_layers is not None:
        set_scan_layers(model, scan_layers)
    return model


def set_scan_layers(model: nnx.Module, on: bool) -> nnx.Module:
    """Stacks ``model.layers`` for a scan over layers (``on``) or back into a list, in place.

    ``ModelError`` naming ``model.scan_layers`` when the blocks differ in structure (e.g. dense and
    mixture-of-experts MLPs) or carry LoRA adapters. Blocks that differ only in their inputs (Gemma 2's
    alternating sliding-window and full-attention masks) scan, each selecting its own inside the loop.
    Stacking copies the blocks' parameters once (the unstacked ones are freed when nothing else holds them)."""
    scanned = isinstance(model.layers, scan.ScannedLayers)
    if on and not scanned:
        if any(getattr(node, "lora", None) is not None for _, node in nnx.iter_graph(model.layers)):
            raise ModelError("model.scan_layers: LoRA adapters are attached (their per-layer paths are not "
                             "stacked); this model's layers cannot be scanned, set model.scan_layers=false")
        model.layers = scan.stack_layers(list(model.layers))
    elif scanned and not on:
        model.layers = scan.unstack_layers(model.layers)
    return model


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str, key: str = "hidden_act"):
    """The activation function of HF name ``name`` (``ModelError`` naming ``key`` if unsupported)."""
    if name not in _ACTIVATIONS:
        raise ModelError(f"{key} {name!r} is not supported (supported: {', '.join(sorted(_ACTIVATIONS))})")
    return _ACTIVATIONS[name]


def _param(rngs, init, shape, axes, param_dtype):
    return nnx.Param(init(rngs.params(), shape, param_dtype), logical_axes=tuple(axes))


def _row_split(equation: str) -> int | None:
    """For ``"<batch><k>,<k><out>-><batch><out>"`` (the input's trailing dims contracted with the kernel's
    leading ones, e.g. ``"BTNH,NHD->BTD"``) the number of contracted dims; else ``None``."""
    ins, out = equation.split("->")
    x_sub, k_sub = ins.split(",")
    for n in range(min(len(x_sub), len(k_sub)), 0, -1):
        if x_sub[-n:] == k_sub[:n] and out == x_sub[:-n] + k_sub[n:]:
            return n
    return None


@jax.custom_jvp
def rows_matmul(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    """``x @ w`` whose kernel gradient is ``xᵀ @ dy`` with ``xᵀ`` materialised once (row layout).

    Without it XLA:CPU forms the kernel gradient ``dot(x, dy)`` over the rows by writing ``dy``
    transposed, inside the elementwise fusion that produces ``dy`` (e.g. SiLU's backward), at several
    times the cost of a row-major write; ``xᵀ`` ``[K, M]`` is written once and shared by every kernel
    reading the same input (gate and up, q/k/v). It paid off for every projection of the train step, the
    down projection (``K`` > ``N``) included (docs/benchmarks.md, "Changes tried"). Same numbers up to
    rounding; forward-mode and higher derivatives work (a ``custom_jvp``).
    """
    return x_MK @ w_KN


def _rows_matmul_jvp(primals, tangents):
    x_MK, w_KN = primals
    dx_MK, dw_KN = tangents
    y_MN = x_MK @ w_KN
    terms = []  # symbolic zeros skipped: no xᵀ where the kernel is not differentiated
    if not isinstance(dx_MK, SymbolicZero):
        terms.append(dx_MK @ w_KN)
    if not isinstance(dw_KN, SymbolicZero):
        xT_KM = jax.lax.optimization_barrier(x_MK.T)  # kept as a transposed copy (not folded into the dot)
        terms.append(xT_KM.T @ dw_KN)
    return y_MN, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y_MN)


rows_matmul.defjvp(_rows_matmul_jvp, symbolic_zeros=True)


_ROWS_MATMUL = contextvars.ContextVar("rows_matmul", default=True)


@contextlib.contextmanager
def plain_projections():
    """Trace :func:`contract` as plain einsums, without :func:`rows_matmul`. The per-pair telemetry step
    differentiates each pair's factors rather than only the kernels, and there the row-layout copy of
    every layer input costs more than it saves (1.10× its time on CPU, docs/benchmarks.md)."""
    token = _ROWS_MATMUL.set(False)
    try:
        yield
    finally:
        _ROWS_MATMUL.reset(token)


def contract(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``einsum(equation, x, kernel)``; on CPU a row-batched matmul goes through :func:`rows_matmul`
    (accelerators' matmuls take transposed operands as they are: plain einsum there), except inside
    :func:`plain_projections`."""
    n = _row_split(equation)
    if n is None or parallel.target_platform() != "cpu" or not _ROWS_MATMUL.get():
        return jnp.einsum(equation, x, kernel)
    lead, k_shape, out_shape = x.shape[:x.ndim - n], kernel.shape[:n], kernel.shape[n:]
    y = rows_matmul(x.reshape(-1, math.prod(k_shape)), kernel.reshape(math.prod(k_shape), -1))
    return y.reshape(*lead, *out_shape)


class Einsum(nnx.Module):
    """``y = einsum(equation, x, kernel) + bias``: a linear map whose kernel keeps the head dims apart.

    E.g. the query projection is ``Einsum("BTD,DNH->BTNH", (D, N, H), ("embed", "heads", "head_dim"))``.
    The bias (optional) has the output's trailing shape.
    """

    def __init__(self, equation: str, kernel_shape, kernel_axes, *, bias_shape=None, bias_axes=None,
                 rngs, dtype=jnp.float32, param_dtype=jnp.float32, stddev: float = 0.02):
        self.equation = equation
        self.dtype = dtype
        self.kernel = _param(rngs, nnx.initializers.normal(stddev), kernel_shape, kernel_axes, param_dtype)
        self.bias = (None if bias_shape is None else
                     _param(rngs, nnx.initializers.zeros_init(), bias_shape, bias_axes, param_dtype))
        self.lora = nnx.data(None)  # a jaxalign.models.lora.LoRA adapter, added by lora.apply

    def __call__(self, x: jax.Array) -> jax.Array:
        y = contract(self.equation, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None and self.lora.enabled:
            y = y + self.lora(x)
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table ``[V, D]`` (its transpose is the tied unembedding)."""

    def __init__(self, num: int, dim: int, *, rngs, axes=("vocab", "embed"), dtype=jnp.float32,
                 param_dtype=jnp.float32, stddev: float = 0.02):
        self.dtype = dtype
        self.embedding = _param(rngs, nnx.initializers.normal(stddev), (num, dim), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in float32. ``kind``: ``"llama"`` (w · cast(x̂)), ``"gemma"`` (cast(x̂ · (1 + w))),
    ``"olmo2"`` (cast(w · x̂)); the three agree in float32 except Gemma's ``1 + w``."""

    def __init__(self, dim: int, *, eps: float, kind: str = "llama", rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if kind not in ("llama", "gemma", "olmo2"):
            raise ValueError(f"unknown RMSNorm kind {kind!r}")
        self.eps, self.kind, self.dtype = eps, kind, dtype
        init = nnx.initializers.zeros_init() if kind == "gemma" else nnx.initializers.ones_init()
        self.scale = _param(rngs, init, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...]
        if self.kind == "llama":
            return w.astype(self.dtype) * normed.astype(self.dtype)
        if self.kind == "gemma":
            return (normed * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
        return (w.astype(jnp.float32) * normed).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm in float32; ``use_scale=use_bias=False`` is OLMo's non-parametric norm."""

    def __init__(self, dim: int, *, eps: float, use_scale: bool = True, use_bias: bool = True, rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = _param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype) \
            if use_scale else None
        self.bias = _param(rngs, nnx.initializers.zeros_init(), (dim,), ("norm",), param_dtype) \
            if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def unembed(hidden_BTD: jax.Array, table_VD: jax.Array, softcap: float | None = None) -> jax.Array:
    """Logits ``[B, T, V]`` float32 = ``hidden · tableᵀ`` (float32 accumulation), maybe soft-capped."""
    logits_BTV = parallel.constrain_logits(jnp.einsum("BTD,VD->BTV", hidden_BTD, table_VD.astype(hidden_BTD.dtype),
                                                      preferred_element_type=jnp.float32))
    if softcap is not None:
        logits_BTV = softcap * jnp.tanh(logits_BTV / softcap)
    return logits_BTV


class DecoderLM(nnx.Module):
    """What the decoders share: options, the bookkeeping of positions and cache of a call, the final
    norm and the (tied) unembedding. A subclass calls :meth:`setup` first, builds its token embedding
    (attribute named by ``embed_name``), ``layers`` and ``final_norm``, then calls :meth:`make_lm_head`.
    Its ``cfg`` has ``vocab_size``, ``hidden_size``, ``num_layers``, ``num_kv_heads``,
    ``head_dim``, ``tie_word_embeddings`` and optionally ``final_logit_softcap``.
    """

    embed_name = "embed"

    def setup(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype, remat: str | None, attention_impl: str) -> dict:
        """Checks and stores the options; returns the keyword arguments every layer takes."""
        remat_policy(remat)
        self.attention_impl = check_attention_impl(attention_impl)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        return dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def make_lm_head(self, rngs: nnx.Rngs, param_dtype) -> None:
        """An output embedding ``[V, D]`` of its own unless the model ties it to the input embedding."""
        cfg = self.cfg
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size,
                                     cfg.hidden_size), param_dtype), logical_axes=("vocab", "embed"))

    @staticmethod
    def call_positions(attention_mask_BT: jax.Array, cache: KVCache | None,
                       branch_BT: jax.Array | tuple | None = None):
        """Positions ``[B, T]`` of this call's tokens, their validity, the keys' positions and validity
        ``[B, S]`` (this call's tokens, or the cache's slots), and the cache holding this call's tokens.

        With ``branch_BT`` (no cache) the keys' validity is ``[B, T, S]``: :func:`branch_positions`; with a
        static ``branch_BT`` ``(trunk, length, count)`` (:class:`Branches`) it is a :class:`BranchKeys`, whose
        masks attend per part."""
        valid_BT = attention_mask_BT.astype(bool)
        if branch_BT is not None:
            if cache is not None:
                raise ModelError("branch_BT and a cache cannot be combined")
            if isinstance(branch_BT, tuple):  # a static layout: attention per part
                layout = Branches(*branch_BT)
                if layout.trunk + layout.count * layout.length != attention_mask_BT.shape[1]:
                    raise ModelError(f"branch_BT {branch_BT} (trunk, length, count) covers "
                                     f"{layout.trunk + layout.count * layout.length} columns; the rows have "
                                     f"{attention_mask_BT.shape[1]}")
                positions_BT = layout.positions(attention_mask_BT)
                return positions_BT, valid_BT, positions_BT, BranchKeys(positions_BT, valid_BT, layout), None
            positions_BT, visible_BTS = branch_positions(attention_mask_BT, branch_BT)
            return positions_BT, valid_BT, positions_BT, visible_BTS, None
        if cache is None:
            positions_BT = positions_from_mask(attention_mask_BT)
            return positions_BT, valid_BT, positions_BT, valid_BT, None
        positions_BT = cache.next_positions(attention_mask_BT)
        cache = cache.append_tokens(positions_BT, valid_BT)
        return positions_BT, valid_BT, cache.positions, cache.valid, cache

    def layer_runner(self, softcap: float | None = None, *, scanned: bool = False):
        """``run(layer, *args)`` = ``layer(*args, impl)`` with the attention implementation resolved for
        this call and the block rematerialised with the model's policy (a closure: ``nnx.remat`` takes it).
        Inside a scan (``scanned``) the remat skips its common-subexpression barrier, which a scan's
        loop body does not need (``jax.checkpoint``'s ``prevent_cse``)."""
        impl = resolve_attention_impl(self.attention_impl, dtype=self.dtype, head_dim=self.cfg.head_dim,
                                      softcap=softcap, per_call=True)

        def run(layer, x_BTD, *args):  # the residual stream stays sharded by rows between blocks
            x_BTD, cache = layer(parallel.constrain(x_BTD, parallel.ACT_BTD), *args, impl)
            return parallel.constrain(x_BTD, parallel.ACT_BTD), cache

        return remat_block(run, self.remat, prevent_cse=not scanned)

    def run_layers(self, x_BTD: jax.Array, layer_args, cache: KVCache | None, *, softcap: float | None = None,
                   collect_hidden: bool = True):
        """Runs the blocks on the embeddings' output ``x_BTD``: a Python loop over ``self.layers``, or one
        ``lax.scan`` when they are stacked (``model.scan_layers``, :mod:`jaxalign.models.scan`).

        ``layer_args(i)`` gives block ``i``'s inputs before the cache (positions, mask, …); a scanned model
        stacks the distinct ones and each block selects its own (:func:`scan.per_layer_inputs`). Returns
        ``(x_BTD, layer_hidden, cache)`` with ``layer_hidden`` the embeddings' output then each block's output (a
        scanned model stacks them only when ``collect_hidden``; otherwise the list is empty)."""
        if isinstance(self.layers, scan.ScannedLayers):
            run = self.layer_runner(softcap, scanned=True)
            x_in_BTD = x_BTD
            x_BTD, hidden, cache = scan.run_scanned(run, self.layers, x_BTD,
                                                    [layer_args(i) for i in range(len(self.layers))], cache,
                                                    collect_hidden=collect_hidden)
            return x_BTD, [x_in_BTD] + hidden if collect_hidden else [], cache
        run = self.layer_runner(softcap)
        hidden = [x_BTD]
        for i, layer in enumerate(self.layers):
            x_BTD, cache = run(layer, x_BTD, *layer_args(i), cache)
            hidden.append(x_BTD)
        return x_BTD, hidden, cache

    def finish(self, x_BTD: jax.Array, layer_hidden: list, cache: KVCache | None, num_tokens: int, *,
               return_logits: bool, return_layer_hidden: bool) -> ModelOutput:
        """Final norm, logits if asked, and the cache advanced past this call's ``num_tokens``."""
        if cache is not None:
            cache = cache.advance(num_tokens)
        hidden_BTD = parallel.constrain(self.final_norm(x_BTD), parallel.ACT_BTD)
        return ModelOutput(logits=self.logits(hidden_BTD) if return_logits else None, hidden=hidden_BTD,
                           layer_hidden=tuple(layer_hidden) if return_layer_hidden else None, cache=cache)

    def unembedding(self) -> jax.Array:
        """The output embedding matrix ``W`` ``[V, D]`` (the input embeddings when tied)."""
        if self.cfg.tie_word_embeddings:
            return getattr(self, self.embed_name).embedding[...]
        return self.lm_head[...]

    def logits(self, hidden_BTD: jax.Array) -> jax.Array:
        """Float32 logits ``[B, T, V]`` of final hidden states (soft-capped where the config says so)."""
        return unembed(hidden_BTD, self.unembedding(), getattr(self.cfg, "final_logit_softcap", None))

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        """An empty :class:`KVCache` of ``length`` slots."""
        cfg = self.cfg
        return KVCache.create(cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim,
                              dtype=dtype or self.dtype)
