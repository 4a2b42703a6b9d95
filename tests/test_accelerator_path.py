"""The accelerator path on CPU: attention implementations, bfloat16, memory-lean log-probs, donation,
fsdp × tensor sharding, and the device script (``scripts/device_check.sh --cpu``).

Tests whose name contains ``gpu`` run only on a CUDA GPU (``scripts/device_check.sh`` runs them there);
on CPU they are skipped.
"""

from __future__ import annotations

import dataclasses
import doctest
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_trees_close_to_scale

from jaxalign import logprobs, pairs, parallel
from jaxalign.errors import ModelError
from jaxalign.models import base
from jaxalign.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from jaxalign.models.llama import FULL, SLIDING, Llama, LlamaConfig

REPO = Path(__file__).resolve().parent.parent
ON_GPU = jax.default_backend() in ("gpu", "cuda")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(ON_GPU, reason="CPU behaviour")

V = 256
# Tiny models compile in about half the time without XLA's CPU backend optimisations (values agree).
FAST = {} if ON_GPU else {"xla_backend_optimization_level": "0"}
LLAMA = LlamaConfig("llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, layer_types=(SLIDING, FULL), sliding_window=6)
LLAMA1 = dataclasses.replace(LLAMA, num_layers=1, layer_types=(FULL,))  # where one block shows it


def randomize(model, seed: int = 0, std: float = 0.15):
    """Every parameter random (norm scales around their init), so every path changes the output."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten_with_path(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for (path, x), key in zip(leaves, keys):
        noise = jax.random.normal(key, x.shape, jnp.float32)
        value = x.astype(jnp.float32) + 0.2 * noise if "norm" in jax.tree_util.keystr(path) else std * noise
        new.append(value.astype(x.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


@functools.lru_cache(maxsize=None)
def _random_llama(cfg):
    return randomize(Llama(cfg, rngs=nnx.Rngs(0)))


def llama(dtype=jnp.float32, param_dtype=None, cfg=LLAMA, **kw):
    """The test Llama (GQA, a sliding and a full layer) with the same random weights in any dtype; a
    fresh module each call, sharing the (read-only) weight arrays."""
    model = nnx.clone(_random_llama(cfg))
    if param_dtype is not None and param_dtype != jnp.float32:
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x.astype(param_dtype), state))
    return base.configure(model, dtype=dtype, **kw)


def pair_batch(B=3, P=10, R=8, seed=0):
    """Pairs with left-padded prompts and right-padded responses of different lengths."""
    rng = np.random.default_rng(seed)
    pm = np.ones((B, P), np.int32)
    pm[0, :3] = 0
    lens = lambda n: (np.arange(R)[None] < np.resize(n, B)[:, None]).astype(np.int32)  # noqa: E731
    return [jnp.asarray(x) for x in (rng.integers(3, V, (B, P)), pm, rng.integers(3, V, (B, R)),
                                     lens([8, 5, 3]), rng.integers(3, V, (B, R)), lens([4, 8, 6]))]


# --- attention implementations ------------------------------------------------------------------------

def _mask_case(kind: str, seed=0, T=7, P=5):
    """``q, k, v, mask_BTS, valid queries`` for one mask kind (float32); ``P`` cached prompt slots."""
    rng = np.random.default_rng(seed)
    B, N, K, H = 2, 4, 2, 8
    window = None
    if kind == "mha":
        K = N
    if kind == "mqa":
        K = 1
    q_mask = np.ones((B, T), np.int32)
    if kind in ("left-pad", "mha", "mqa", "window"):
        q_mask[0, :3] = 0
    if kind == "right-pad":
        q_mask[1, -2:] = 0
    if kind == "window":
        window = 3
    if kind == "cache-gap":  # a right-padded prompt in the cache, then new tokens after it
        p_mask = np.ones((B, P), np.int32)
        p_mask[0, 3:] = 0
        q_mask[0, -1] = 0
        p_pos = base.positions_from_mask(jnp.asarray(p_mask))
        q_pos = base.positions_from_mask(jnp.asarray(q_mask), offset_B=jnp.asarray(p_mask.sum(-1)))
        k_pos = jnp.concatenate([p_pos, q_pos], 1)
        k_valid = jnp.concatenate([jnp.asarray(p_mask), jnp.asarray(q_mask)], 1).astype(bool)
        S = P + T
    else:
        q_pos = k_pos = base.positions_from_mask(jnp.asarray(q_mask))
        k_valid = jnp.asarray(q_mask).astype(bool)
        S = T
    mask = base.attention_mask_BTS(q_pos, k_pos, jnp.asarray(q_mask), k_valid, sliding_window=window)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), jnp.float32)
    return q, k, v, mask, q_mask.astype(bool)


@pytest.mark.parametrize("kind", ["left-pad", "right-pad", "window", "cache-gap", "mqa"])
def test_dot_product_attention_equals_reference(kind):
    """``jax.nn.dot_product_attention`` (XLA) with our masks = base.attention, values and gradients
    (padding, causal by position, the gap of a right-padded cached prompt, a window, GQA and MQA)."""
    q, k, v, mask, _ = _mask_case(kind)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    @jax.jit
    def run(q, k, v, mask):
        def loss(impl, q, k, v):
            return jnp.sum(base.attend(q, k, v, mask, scale=0.3, impl=impl) * w)
        outs = [base.attend(q, k, v, mask, scale=0.3, impl=i) for i in ("xla", "dot_product", "auto")]
        grads = [jax.grad(loss, argnums=(1, 2, 3))(i, q, k, v) for i in ("xla", "dot_product")]
        return outs, grads

    (ref, dot, auto), (g_ref, g_dot) = run(q, k, v, mask)
    np.testing.assert_allclose(dot, ref, atol=1e-5)
    np.testing.assert_array_equal(auto, ref)  # auto is the reference path on CPU
    for a, b in zip(g_dot, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _families():
    neox = GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    return {"llama": lambda: llama(), "gpt_neox": lambda: randomize(GPTNeoX(neox, rngs=nnx.Rngs(0)))}


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_models_agree_across_attention_impls(family):
    """Whole models in float32: Llama (GQA, a sliding and a full layer), GPT-NeoX (multi-head, partial
    RoPE); left-padded prompts, the shared prompt's cache with a gap, right-padded responses."""
    model = _families()[family]()
    batch = pair_batch()
    ids = jnp.concatenate([batch[0], batch[2]], 1)
    mask = jnp.concatenate([batch[1], batch[3]], 1)

    def run(state):
        m = nnx.merge(graphdef, state)
        out = pairs.pair_forward(m, *batch, chunk_size=4)
        return m(ids, mask).logits, out.chosen_logps, out.rejected_logps

    results = {}
    for impl in ("xla", "dot_product"):
        graphdef, state = nnx.split(base.configure(model, attention_impl=impl))
        results[impl] = jax.jit(run, compiler_options=FAST)(state)
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(results["dot_product"][0])[valid],
                               np.asarray(results["xla"][0])[valid], atol=1e-5)
    for a, b in zip(results["dot_product"][1:], results["xla"][1:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_attention_impl_is_checked_and_named():
    with pytest.raises(ModelError, match="attention_impl 'flash' is not known.*cudnn"):
        Llama(LLAMA, rngs=nnx.Rngs(0), attention_impl="flash")
    with pytest.raises(ModelError, match="attention_impl 'flash'"):
        base.configure(llama(), attention_impl="flash")
    soft = LlamaConfig("gemma2", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=16, attn_logit_softcap=50.0, norm_kind="gemma")
    ids = jnp.ones((1, 4), jnp.int32)
    run = lambda impl: jax.eval_shape(  # noqa: E731  (traced only: the errors are raised while tracing)
        lambda: Llama(soft, rngs=nnx.Rngs(0), attention_impl=impl)(ids, ids).logits)
    with pytest.raises(ModelError, match="cannot soft-cap.*50.0.*'xla' or 'auto'"):
        run("dot_product")
    assert run("auto").shape == (1, 4, V)  # auto takes the XLA path for soft-capping


@cpu_only
def test_cudnn_is_refused_off_gpu():
    model = llama(attention_impl="cudnn")
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ModelError, match="'cudnn' needs a CUDA GPU"):
        jax.eval_shape(lambda: model(ids, ids))


def test_auto_resolution(monkeypatch):
    r = base.resolve_attention_impl
    assert r("auto", dtype=jnp.bfloat16, head_dim=64) == ("cudnn" if ON_GPU else "xla")
    monkeypatch.setattr(base, "_on_cuda", lambda: True)
    assert r("auto", dtype=jnp.bfloat16, head_dim=64) == "cudnn"
    assert r("auto", dtype=jnp.float16, head_dim=128, per_call=True) == "auto"
    assert r("auto", dtype=jnp.float32, head_dim=64) == "xla"
    assert r("auto", dtype=jnp.bfloat16, head_dim=64, softcap=50.0) == "xla"
    assert r("auto", dtype=jnp.bfloat16, head_dim=12) == "xla"
    assert r("auto", dtype=jnp.bfloat16, head_dim=256) == "xla"
    with pytest.raises(ModelError, match="bfloat16 or float16"):
        r("cudnn", dtype=jnp.float32, head_dim=64)
    # Per call, odd query or key lengths (cuDNN's rule for a bias in training) take the XLA path.
    q, k, v, mask, _ = _mask_case("left-pad")
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    assert q.shape[1] % 2 == 1
    np.testing.assert_array_equal(base.attend(q, k, v, mask, impl="auto"), base.attention(q, k, v, mask))


# --- bfloat16 -------------------------------------------------------------------------------------------

def _objective(model):
    out = pairs.pair_forward(model, *pair_batch(), chunk_size=4)
    return jnp.sum(out.chosen_logps) - 0.5 * jnp.sum(out.rejected_logps), out


def _flat_grads(grads) -> dict[str, np.ndarray]:
    leaves = jax.tree.flatten_with_path(grads)[0]
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64).ravel() for p, x in leaves}


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bfloat16_and_mixed_precision_agree_with_float32():
    """bfloat16 (params and activations) and mixed (float32 params, bfloat16 compute) against float32:
    forward logits, summed pair log-probs (pair_forward) and the gradients' cosine."""
    ids = jnp.concatenate([pair_batch()[0], pair_batch()[2]], 1)
    mask = jnp.concatenate([pair_batch()[1], pair_batch()[3]], 1)
    valid = np.asarray(mask, bool)

    def run(model):
        graphdef, state = nnx.split(model)

        def fn(state):
            m = nnx.merge(graphdef, state)
            (_, out), grads = nnx.value_and_grad(_objective, has_aux=True)(m)
            return m(ids, mask).logits, out, nnx.state(grads, nnx.Param)
        return jax.jit(fn, compiler_options=FAST)(state)

    logits32, out32, g32 = run(llama(cfg=LLAMA1))
    scale = float(np.abs(np.asarray(logits32))[valid].max())
    assert np.asarray(logits32)[valid].std() > 0.5  # the random model is far from uniform
    f32 = _flat_grads(g32)
    for name, model in (("bfloat16", llama(jnp.bfloat16, jnp.bfloat16, cfg=LLAMA1)),
                        ("mixed", llama(jnp.bfloat16, cfg=LLAMA1))):
        logits, out, grads = run(model)
        assert logits.dtype == jnp.float32 and out.chosen_logps.dtype == jnp.float32, name
        param_dtype = jnp.bfloat16 if name == "bfloat16" else jnp.float32
        assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(param_dtype)}, name
        diff = np.abs(np.asarray(logits) - np.asarray(logits32))[valid]
        assert diff.max() < 0.05 * scale and np.sqrt(np.mean(diff ** 2)) < 0.01 * scale, (name, diff.max())
        for got, ref in ((out.chosen_logps, out32.chosen_logps), (out.rejected_logps, out32.rejected_logps)):
            np.testing.assert_allclose(got, ref, rtol=0.02, atol=0.05, err_msg=name)
        f = _flat_grads(grads)
        total = _cos(np.concatenate([f[k] for k in sorted(f)]), np.concatenate([f32[k] for k in sorted(f)]))
        worst = min(_cos(f[k], f32[k]) for k in f)
        assert total > 0.995 and worst > 0.98, (name, total, worst)


def test_configure_compute_dtype_keeps_parameter_dtype():
    model = llama(jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert model.layers[1].attn.q_proj.dtype == jnp.bfloat16 and model.final_norm.dtype == jnp.bfloat16
    assert model.init_cache(1, 4).keys[0].dtype == jnp.bfloat16
    assert doctest.testmod(base, optionflags=doctest.ELLIPSIS).failed == 0


# --- no [B, T, V] logits ----------------------------------------------------------------------------------

def _avals(jaxpr, out=None):
    """Every intermediate aval of a (closed) jaxpr, sub-jaxprs (scan, checkpoint, pjit…) included."""
    out = [] if out is None else out
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        out.extend(v.aval for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    _avals(sub, out)
    return out


def test_pair_logprob_gradient_never_holds_full_logits():
    """``jax.grad`` of summed pair log-probs: no intermediate ``[.., T, V]`` beyond one sequence chunk, and
    compiled temporary memory well below ``rows · T · V · 4`` bytes (the full float32 logits)."""
    Vb, C = 32768, 8
    cfg = LlamaConfig("llama", vocab_size=Vb, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    B, P, R = 2, 32, 128
    rng = np.random.default_rng(0)
    ones = lambda n: jnp.ones((B, n), jnp.int32)  # noqa: E731
    ids = lambda n: jnp.asarray(rng.integers(0, Vb, (B, n)))  # noqa: E731
    batch = (ids(P), ones(P), ids(R), ones(R), ids(R), ones(R))

    def logp(state, batch, chunk):
        out = pairs.pair_forward(nnx.merge(graphdef, state), *batch, chunk_size=chunk)
        return jnp.sum(out.chosen_logps - out.rejected_logps)

    rows = 2 * B

    def vocab_shapes(chunk):
        avals = _avals(jax.make_jaxpr(jax.grad(logp), static_argnums=2)(state, batch, chunk))
        return {tuple(a.shape) for a in avals if Vb in a.shape and a.shape != (Vb, cfg.hidden_size)}

    shapes = vocab_shapes(C)
    assert (rows, C, Vb) in shapes
    assert all(np.prod(s) // Vb <= rows * C for s in shapes), shapes
    assert (rows, R, Vb) in vocab_shapes(None)  # the check sees full logits when they exist
    compiled = jax.jit(jax.grad(logp), static_argnums=2, compiler_options=FAST).lower(state, batch, C).compile()
    full = rows * (P + R) * Vb * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * full, (temp, full)


# --- remat, donation, sharding -----------------------------------------------------------------------------

def test_remat_policy_names_exist_and_full_remat_saves_memory():
    for name in base.REMAT_POLICIES:
        assert name == "full" or callable(base.remat_policy(name)), name
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (8, 64)))

    def temp_bytes(remat):
        model = llama(cfg=LLAMA1, remat=remat)
        graphdef, state = nnx.split(model)

        def loss(state):
            m = nnx.merge(graphdef, state)
            out = m(ids, jnp.ones_like(ids), return_logits=False)
            return jnp.sum(logprobs.token_logprobs_from_hidden(out.hidden, ids, m.logits, chunk_size=16))

        compiled = jax.jit(jax.grad(loss), compiler_options=FAST).lower(state).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < temp_bytes(None)


def test_train_step_donates_bfloat16_state():
    """The jitted step (donate_argnums=0) reuses the state's buffers: bf16 params and AdamW moments keep
    their dtypes, so nothing donated is left unusable and the old state is deleted."""
    import optax

    from jaxalign.train import step as step_lib

    parts, params = step_lib.ModelParts.split(llama(jnp.bfloat16, jnp.bfloat16, cfg=LLAMA1))
    params = jax.tree.map(jnp.copy, params)  # donated below: not the cached test weights
    optimizer = optax.adamw(1e-3)
    state = step_lib.init_state(optimizer, params, None, None)
    spec = step_lib.Objective(names=("sigmoid",), weights=None, beta=0.1)
    step = step_lib.jit_train_step(parts=parts, spec=spec, optimizer=optimizer,
                                   schedule=optax.constant_schedule(1e-3), state_shardings=None,
                                   batch_shardings=None, rest_shardings=None, ref_shardings=None, mesh=None)
    keys = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
    batch = dict(zip(keys, pair_batch()), ref_chosen_logps=jnp.full((3,), -40.0),
                 ref_rejected_logps=jnp.full((3,), -40.0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*donated buffers were not usable.*")
        new, metrics = step(state, batch, parts.rest, None)
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
    assert jax.tree.map(lambda x: x.dtype, new.params) == jax.tree.map(lambda x: x.dtype, params)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS host device count)")
def test_fsdp_tensor_mesh_matches_one_device():
    """Parameters sharded by parallel.RULES on a (data 1, fsdp 2, tensor 4) mesh give the 1-device
    log-probs and gradients; kv_heads (2) do not divide tensor (4) and stay replicated."""
    from jax.sharding import PartitionSpec as P

    model = llama(cfg=LLAMA1)
    graphdef, state = nnx.split(model)
    mesh = parallel.make_mesh((1, 2, 4))
    shardings = parallel.state_shardings(state, mesh)
    spec = lambda s: s.spec  # noqa: E731
    layer = shardings["layers"][0]
    assert spec(layer["attn"]["q_proj"]["kernel"]) == P("fsdp", "tensor", None)
    assert spec(layer["attn"]["k_proj"]["kernel"]) == P("fsdp", None, None)
    assert spec(layer["attn"]["o_proj"]["kernel"]) == P("tensor", None, "fsdp")
    assert spec(layer["mlp"]["down_proj"]["kernel"]) == P("tensor", "fsdp")
    assert spec(shardings["embed"]["embedding"]) == P(("fsdp", "tensor"), None)  # rows: vocabulary-parallel
    assert spec(shardings["final_norm"]["scale"]) == P(None)

    def fn(state, batch):
        def obj(state):
            out = pairs.pair_forward(nnx.merge(graphdef, state), *batch, chunk_size=4)
            return jnp.sum(out.chosen_logps) - jnp.sum(out.rejected_logps), out.chosen_logps
        return jax.value_and_grad(obj, has_aux=True)(state)

    batch = pair_batch(B=4)
    (ref_loss, ref_lp), ref_g = jax.jit(fn, compiler_options=FAST)(state, batch)
    rows = parallel.batch_sharding(mesh, 2)
    with jax.set_mesh(mesh):
        placed = jax.device_put(state, shardings)
        (loss, lp), g = jax.jit(fn, in_shardings=(shardings, rows), compiler_options=FAST)(
            placed, [jax.device_put(x, rows) for x in batch])
    # Another program (sharded matmuls reduce over fsdp/tensor shards in another order): a log-prob sums
    # ~10 token log-probs of size ~5, good to a few hundred ulps of that; a gradient entry sums B·T
    # cancelling products, so its error is bounded by its leaf's scale, not by itself (tests/numerics.py).
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)
    assert_trees_close_to_scale(g, ref_g, 1e-4, "grad")


# --- GPU only: cuDNN attention -----------------------------------------------------------------------------

@gpu_only
@pytest.mark.parametrize("kind", ["right-pad", "cache-gap", "mha"])
def test_gpu_cudnn_attention_matches_reference_bfloat16(kind):
    q, k, v, mask, valid = _mask_case(kind, T=8, P=6)  # even lengths: cuDNN's rule for a bias in training
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * valid[:, :, None, None]

    def loss(impl, q, k, v):
        return jnp.sum(base.attend(q, k, v, mask, impl=impl).astype(jnp.float32) * w)

    out = base.attend(q, k, v, mask, impl="cudnn").astype(jnp.float32)
    ref = base.attention(q, k, v, mask).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=3e-2)
    g = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    for a, b in zip(g("cudnn", q, k, v), g("xla", q, k, v)):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        assert _cos(a, b) > 0.99


@gpu_only
def test_gpu_auto_picks_cudnn_and_agrees_with_xla():
    results = {}
    for impl in ("auto", "xla"):
        model = llama(jnp.bfloat16, jnp.bfloat16, attention_impl=impl)
        results[impl] = nnx.jit(lambda m: nnx.value_and_grad(_objective, has_aux=True)(m))(model)
    (_, out_a), g_a = results["auto"]
    (_, out_x), g_x = results["xla"]
    np.testing.assert_allclose(out_a.chosen_logps, out_x.chosen_logps, rtol=0.02, atol=0.1)
    fa, fx = _flat_grads(g_a), _flat_grads(g_x)
    assert _cos(np.concatenate([fa[k] for k in sorted(fa)]), np.concatenate([fx[k] for k in sorted(fa)])) > 0.99
    ids = jnp.ones((2, 8), jnp.int32)
    graphdef, state = nnx.split(llama(jnp.bfloat16, jnp.bfloat16))
    hlo = jax.jit(lambda st: nnx.merge(graphdef, st)(ids, ids).logits).lower(state).as_text()
    assert "cudnn" in hlo.lower() or "fmha" in hlo.lower()


# --- the device script ---------------------------------------------------------------------------------------

@pytest.mark.slow
@cpu_only
def test_device_check_runs_on_cpu(tmp_path):
    """``scripts/device_check.sh --cpu``: every stage runs and the table prints (< 2 min on a quiet
    machine; the budget is raised here so that a loaded CI machine does not cut stages)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(OUT=str(tmp_path), DEVICE_CHECK_BUDGET="1200", DEVICE_CHECK_STAGE_SCALE="6", PYTHON=sys.executable,
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    proc = subprocess.run(["bash", "scripts/device_check.sh", "--cpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    table = (tmp_path / "device_check" / "table.txt").read_text()
    assert "versions: python" in table and "matmul float32" in table, table
    assert "tests (cpu): ok" in table, table
    for model in ("135m", "1b"):
        for task in ("forward", "train", "ches", "entangle"):
            line = next((line for line in table.splitlines() if line.split()[:2] == [model, task]), None)
            assert line is not None and line.rstrip().endswith("ok"), (model, task, table)
    assert "n/a (cpu run)" in table
    import json

    rows = [json.loads(line) for line in (tmp_path / "device_check" / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" for r in rows if r.get("stage") == "process"), rows
