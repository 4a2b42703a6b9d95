"""Token-level entanglement and gradient sketches: the paper's heat map, and projections for data-set scale.

Letters: P prompt tokens, Rw / Rl chosen / rejected response tokens, n = Rw + Rl, k sketch dimension,
C pairs per chunk.

**Heat map** (Yuan et al. §4.3, ``analysis/grad_heatmap_1.py``). For one pair, g_{w,t} = ∇θ log π(y_w,t | x,
y_w,<t) and g_{l,s} likewise; :func:`token_gram` returns the ``[n, n]`` Gram matrix of all of them and the
``[Rw, Rl]`` cosine matrix between chosen and rejected tokens. Row ``u`` of the Gram matrix is one reverse
pass (the gradient of token ``u``'s log-prob) followed by one forward-mode pass of all ``n`` token
log-probs along it, so only ``chunk`` gradients are held at a time; the sum of the matrix's chosen block
is ‖g_w‖² (a check). :func:`jaxalign.jobs.entangle.save_heatmap` writes it as ``.npy`` and ``.png``.

**Sketches**. ``Ω g`` for a random ``Ω`` ``[k, |θ|]`` with i.i.d. entries N(0, 1/k) (``gaussian``) or ±1/√k
(``rademacher``), so E⟨Ωa, Ωb⟩ = ⟨a, b⟩: inner products between *different* pairs' gradients at data-set
scale. :func:`make_sketcher` returns ``Ω g_w`` and ``Ω(g_w − g_l)`` per pair from the materialised
per-pair gradients (:func:`jaxalign.analysis.entanglement.pair_grads`). ``Ω`` is never stored: the block
of columns ``[j·b, (j+1)·b)`` of a parameter named ``name`` with ``m`` elements, ``b = min(m, 65536)``, is
drawn from ``fold_in(fold_in(key(seed), crc32(name)), j)``, so a pair's sketch depends only on the seed,
the parameter names and shapes, and the pair — not on the batch, chunk, mesh or order. Drawing ``Ω`` costs
``k·|θ|`` random numbers per chunk of pairs: choose ``k`` and ``chunk_size`` (or ``params``) accordingly.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.analysis import entanglement as ent
from jaxalign.errors import ConfigError

SKETCH_KINDS = ("gaussian", "rademacher")
SKETCH_BLOCK = 1 << 16


# --- token heat map ---------------------------------------------------------------------------------

class TokenGram(NamedTuple):
    """Per-token gradient geometry of one pair (NumPy).

    Attributes:
      gram: ``[n, n]`` inner products ⟨g_u, g_v⟩ over the chosen tokens then the rejected tokens.
      cosine: ``[Rw, Rl]`` cosines between chosen token ``t`` and rejected token ``s`` (the heat map).
      chosen_ids, rejected_ids: the response token ids (EOS included).
      chosen_logps, rejected_logps: ``[Rw]``, ``[Rl]`` the token log-probs.
    """

    gram: np.ndarray
    cosine: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    chosen_logps: np.ndarray
    rejected_logps: np.ndarray


def token_gram(model, prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int],
               *, params: str | Sequence[str] | None = None, last_blocks: int | None = None, chunk: int = 8,
               compiler_options: Mapping[str, Any] | None = None) -> TokenGram:
    """Gram and cosine matrices of the per-token gradients of one pair (module doc).

    Args:
      model: a ``jaxalign.models`` causal LM.
      prompt_ids, chosen_ids, rejected_ids: the pair's token ids, unpadded (responses end with EOS).
      params, last_blocks: which parameters (:func:`jaxalign.analysis.entanglement.select`).
      chunk: token gradients computed (and held) at once.
      compiler_options: passed to ``jax.jit``.
    """
    sm = ent.split_model(model, params, last_blocks)
    diff, fixed = sm.split_leaves(list(sm.leaves))
    p = jnp.asarray(prompt_ids, jnp.int32)
    c = jnp.asarray(chosen_ids, jnp.int32)
    r = jnp.asarray(rejected_ids, jnp.int32)
    Rw, Rl = int(c.shape[0]), int(r.shape[0])
    if not (p.shape[0] and Rw and Rl):
        raise ValueError(f"token_gram needs a non-empty prompt and responses, got {p.shape[0]}, {Rw}, {Rl}")
    n = Rw + Rl

    def tok(d, fixed, rest):
        cache, h = ent.prompt_stage(sm, d, fixed, rest, p, jnp.ones_like(p), p.shape[0] + max(Rw, Rl))
        lw = ent.response_stage(sm, d, fixed, rest, cache, h, c, jnp.ones_like(c))
        ll = ent.response_stage(sm, d, fixed, rest, cache, h, r, jnp.ones_like(r))
        return jnp.concatenate([lw, ll])

    def rows(d, fixed, rest, basis_kn):
        f = lambda d_: tok(d_, fixed, rest)  # noqa: E731
        _, vjp = jax.vjp(f, d)
        g = jax.vmap(lambda e: vjp(e)[0])(basis_kn)
        return jax.vmap(lambda gi: jax.jvp(f, (d,), (gi,))[1])(g)

    rows_j = jax.jit(rows, compiler_options=compiler_options)
    dtype = jax.eval_shape(tok, diff, fixed, sm.rest).dtype  # the token log-probs' (float32 logits)
    eye = np.eye(n, dtype=np.dtype(dtype))
    k = max(1, min(chunk, n))
    out = []
    for start in range(0, n, k):
        basis = np.zeros((k, n), eye.dtype)
        basis[:min(k, n - start)] = eye[start:start + k]
        out.append(np.asarray(rows_j(diff, fixed, sm.rest, basis))[:min(k, n - start)])
    gram = np.concatenate(out, 0).astype(np.float64)
    gram = 0.5 * (gram + gram.T)  # the two triangles differ by rounding only
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    denom = np.outer(norms[:Rw], norms[Rw:])
    cos = np.where(denom > 0, gram[:Rw, Rw:] / np.where(denom > 0, denom, 1.0), 0.0)
    lps = np.asarray(jax.jit(tok)(diff, fixed, sm.rest), np.float64)
    return TokenGram(gram, cos, np.asarray(c), np.asarray(r), lps[:Rw], lps[Rw:])


# --- sketches ---------------------------------------------------------------------------------------

def leaf_key(seed: int, name: str) -> jax.Array:
    """The PRNG key of parameter ``name``'s columns of Ω."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def projection_block(seed: int, name: str, size: int, block: int, k: int, kind: str = "gaussian",
                     dtype=jnp.float32) -> jax.Array:
    """Columns ``[block·b, (block+1)·b)`` of Ω for a parameter of ``size`` elements, ``[k, b]``."""
    b = min(size, SKETCH_BLOCK)
    return _draw(jax.random.fold_in(leaf_key(seed, name), block), (k, b), kind, dtype)


def _draw(key, shape, kind, dtype):
    k = shape[0]
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype) / jnp.sqrt(jnp.asarray(k, dtype))
    return jax.random.rademacher(key, shape, dtype) / jnp.sqrt(jnp.asarray(k, dtype))


def project(flat_Mn: jax.Array, seed: int, name: str, k: int, kind: str) -> jax.Array:
    """``flat @ Ω_leafᵀ`` ``[M, k]`` for rows ``[M, m]`` of one parameter's flattened gradients."""
    M, m = flat_Mn.shape
    b = min(m, SKETCH_BLOCK)
    nb = -(-m // b)
    x = jnp.pad(flat_Mn, ((0, 0), (0, nb * b - m))).reshape(M, nb, b).swapaxes(0, 1)  # [nb, M, b]
    key = leaf_key(seed, name)

    def body(acc, jx):
        j, xj = jx
        omega = _draw(jax.random.fold_in(key, j), (k, b), kind, xj.dtype)
        # The padded tail of the last block multiplies zeros, so it does not matter what it draws.
        return acc + jnp.einsum("Mb,kb->Mk", xj, omega, precision=jax.lax.Precision.HIGHEST), None

    acc, _ = jax.lax.scan(body, jnp.zeros((M, k), flat_Mn.dtype), (jnp.arange(nb), x))
    return acc


def make_sketcher(model, *, k: int = 64, seed: int = 0, kind: str = "gaussian",
                  params: str | Sequence[str] | None = None, last_blocks: int | None = None,
                  chunk_size: int | None = None, mesh=None,
                  compiler_options: Mapping[str, Any] | None = None
                  ) -> Callable[[Mapping[str, Any]], dict[str, np.ndarray]]:
    """A ``batch -> {"chosen": [B, k], "diff": [B, k]}`` function: Ω g_w and Ω(g_w − g_l) per pair.

    Args:
      model: a ``jaxalign.models`` causal LM.
      k: sketch dimension.
      seed: Ω's seed (module doc).
      kind: ``"gaussian"`` or ``"rademacher"``.
      params, last_blocks: which parameters (:func:`jaxalign.analysis.entanglement.select`).
      chunk_size: pairs whose gradients are materialised at once (default: what fits the memory budget).
      mesh: pairs sharded over ``data × fsdp``.
      compiler_options: passed to ``jax.jit``.
    """
    if kind not in SKETCH_KINDS:
        raise ConfigError(f"--sketch-kind must be one of {', '.join(SKETCH_KINDS)}, got {kind!r}")
    if k < 1:
        raise ConfigError(f"--sketch-dim must be at least 1, got {k}")
    sm = ent.split_model(model, params, last_blocks)
    diff, fixed = sm.split_leaves(list(sm.leaves))
    rest = sm.rest
    names = sm.selected_names
    diff_bytes = sum(x.size * x.dtype.itemsize for x in diff)
    chunk = chunk_size or max(1, int(ent.memory_budget() // max(4 * diff_bytes, 1)))
    if mesh is not None:
        rows = int(mesh.shape["data"] * mesh.shape["fsdp"])
        chunk = -(-chunk // rows) * rows

    def chunk_fn(diff, fixed, rest, sub):
        grads, _ = jax.vmap(lambda pair: ent.pair_grads(sm, diff, fixed, rest, pair))(sub)
        C = sub["prompt_ids"].shape[0]
        total = 0.0
        for g, name in zip(grads, names):
            total = total + project(g.reshape(2 * C, -1), seed, name, k, kind)
        total = total.reshape(C, 2, k)
        return {"chosen": total[:, 0], "diff": total[:, 0] - total[:, 1]}

    def fn(diff, fixed, rest, batch):
        return ent.map_chunks(lambda sub: chunk_fn(diff, fixed, rest, sub), batch, chunk)

    jitted = jax.jit(fn, compiler_options=compiler_options)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        from jaxalign import parallel

        diff, fixed, rest = jax.device_put((diff, fixed, rest), NamedSharding(mesh, PartitionSpec()))
        rows_sh = parallel.batch_sharding(mesh, 2)

    def sketcher(batch):
        arrays = {f: np.asarray(batch[f]) for f in ent.BATCH_FIELDS}
        if mesh is None:
            out = jitted(diff, fixed, rest, {f: jnp.asarray(v) for f, v in arrays.items()})
        else:
            with jax.set_mesh(mesh):
                out = jitted(diff, fixed, rest, {f: jax.device_put(v, rows_sh) for f, v in arrays.items()})
        return {key: np.asarray(v) for key, v in out.items()}

    return sketcher
