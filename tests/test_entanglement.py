"""Gradient entanglement: every method equals brute force (a Python loop of ``jax.grad`` over full
``prompt + response`` rows, flattened with ``ravel_pytree``) in float64 and float32 on tiny llama and gpt2
models, for DPO-like, length-normalised and SFT-augmented losses (weights derived by hand); first-order
predictions match one real SGD step with an error shrinking like η²; 8 devices equal 1; PyTorch
``torch.autograd.grad`` on the same transformers model agrees; the Gram probes on hand-written functions;
the token heat map and the sketches against explicit computations; the ``entangle`` job and its CLI.

Relative errors of inner products are measured against ‖g_w‖‖g_l‖ (an inner product can be ~0)."""

import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(__file__))
from hf_tiny import VOCAB, make_tiny  # noqa: E402

from jaxalign import pairs  # noqa: E402
from jaxalign.analysis import entanglement as ent  # noqa: E402
from jaxalign.analysis import entanglement_gram as gram_lib  # noqa: E402
from jaxalign.analysis import entanglement_tokens as tok_lib  # noqa: E402
from jaxalign.errors import ConfigError  # noqa: E402

FAMILIES = ["llama", "gpt2"]
METHODS = ["exact", "jvp", "gram"]
FAST = {"xla_backend_optimization_level": "0"}  # halves compile time; numerics unchanged
BETA = 0.1
TOL = {"float64": 1e-5, "float32": 1e-4}


# --- data and brute force ---------------------------------------------------------------------------

def _examples():
    """8 pairs (prompt, chosen, rejected) of mixed lengths; pair 1 shares a 4-token suffix."""
    rng = np.random.default_rng(7)
    ids = lambda n: rng.integers(3, VOCAB, size=n).tolist()  # noqa: E731
    ex = []
    for P, Rc, Rr in ((5, 3, 6), (4, 6, 6), (7, 5, 2), (3, 1, 4), (6, 4, 4), (2, 6, 3), (7, 2, 5), (5, 5, 1)):
        ex.append((ids(P), ids(Rc - 1) + [2], ids(Rr - 1) + [2]))
    suffix = ids(3) + [2]
    ex[1] = (ex[1][0], ids(2) + suffix, ids(2) + suffix)
    return ex


def _batch(ex):
    """Shared-prompt layout: prompts left-padded to 8, responses right-padded to 7."""
    B, Tp, Tr = len(ex), 8, 7
    out = {k: np.zeros((B, Tp if k.startswith("prompt") else Tr), np.int32) for k in ent.BATCH_FIELDS}
    for b, (p, c, r) in enumerate(ex):
        out["prompt_ids"][b, Tp - len(p):], out["prompt_mask"][b, Tp - len(p):] = p, 1
        for name, y in (("chosen", c), ("rejected", r)):
            out[f"{name}_ids"][b, :len(y)], out[f"{name}_mask"][b, :len(y)] = y, 1
    return out


def _brute(model, ex):
    """Per pair, per side: the gradient of s = Σ log π(y_t|·) over the full row, one ``jax.grad`` each.

    Returns ``(g [B, 2] list of State, flat [B, 2, |θ|] float64, s [B, 2] float64)``.
    """
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    T = max(len(p) + max(len(c), len(r)) for p, c, r in ex)

    @jax.jit
    def grad_s(state, ids, mask, plen):
        def s(st):
            out = pairs.sequence_forward(nnx.merge(graphdef, st, rest), ids, mask, plen)
            return out["logps"][0]
        return jax.value_and_grad(s)(state)

    g, flat, svals = [], [], []
    for p, c, r in ex:
        row_g, row_f, row_s = [], [], []
        for y in (c, r):
            seq = p + y
            ids = np.zeros((1, T), np.int32)
            mask = np.zeros((1, T), np.int32)
            ids[0, :len(seq)], mask[0, :len(seq)] = seq, 1
            val, grad = grad_s(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray([len(p)]))
            row_g.append(grad)
            row_f.append(np.asarray(ravel_pytree(grad)[0], np.float64))
            row_s.append(float(val))
        g.append(row_g)
        flat.append(row_f)
        svals.append(row_s)
    return g, np.asarray(flat), np.asarray(svals)


def _hand_weights(loss, s, lengths):
    """(w_c, w_r) derived by hand; the reference is the policy itself (Δ = 0)."""
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    if loss == "sigmoid":  # −logσ(βΔ), Δ = 0
        w = np.full(len(s), BETA * sig(0.0))
        return w, w
    if loss == "dpo_sft":  # DPO + 0.1·(−s_w)
        w = np.full(len(s), BETA * sig(0.0))
        return w + 0.1, w
    if loss == "simpo":  # −logσ(β(s_w/|y_w| − s_l/|y_l|) − γ), γ = 0.5
        z = BETA * (s[:, 0] / lengths[:, 0] - s[:, 1] / lengths[:, 1]) - 0.5
        return BETA * sig(-z) / lengths[:, 0], BETA * sig(-z) / lengths[:, 1]
    raise KeyError(loss)


def _stats(flat):
    gw, gl = flat[:, 0], flat[:, 1]
    return (gw * gw).sum(1), (gl * gl).sum(1), (gw * gl).sum(1)


def _rel_close(got, want, scale, tol, what):
    err = np.max(np.abs(np.asarray(got, np.float64) - want) / scale)
    assert err < tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


# --- fixtures: one tiny model per family, results of every method in float32 and float64 ------------

def _load(path, dtype):
    from jaxalign.models import load_pretrained

    return load_pretrained(path, dtype=dtype)[0]


_RESULTS: dict = {}  # family -> results, shared by the fixtures below (computed once per session)


def _results_for(name, tmp_path_factory):
    """Brute force in float64; every method in float64, exact (in chunks) and gram also in float32."""
    if name in _RESULTS:
        return _RESULTS[name]
    path = make_tiny(name, tmp_path_factory.mktemp(name), seed=3)
    ex = _examples()
    batch = _batch(ex)
    out = {}
    for dtype, methods in (("float64", METHODS), ("float32", ("exact", "gram"))):
        with jax.enable_x64(dtype == "float64"):
            model = _load(path, jnp.dtype(dtype))
            if dtype == "float64":
                g, flat, s = _brute(model, ex)
            got = {}
            for method in methods:
                probe = ent.make_pair_grads(model, method=method, per_layer=method != "jvp",
                                       chunk_size=3 if method == "exact" else None, compiler_options=FAST)
                got[method] = probe(batch)
            # float32 results are compared with the float64 brute force (the closer reference).
            out[dtype] = dict(model=model, grads=g, flat=flat, s=s, got=got, names=probe.split.selected_names)
    _RESULTS[name] = dict(family=name, path=path, ex=ex, batch=batch, **out)
    return _RESULTS[name]


@pytest.fixture(scope="module", params=FAMILIES)
def results(request, tmp_path_factory):
    return _results_for(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _results_for("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _results_for("gpt2", tmp_path_factory)


# --- pure pieces ------------------------------------------------------------------------------------

def test_predict_cases_and_conditions():
    # DPO (w_c = w_r = 1): chosen up iff ⟨·,·⟩ ≤ ‖g_w‖², rejected down iff ⟨·,·⟩ ≤ ‖g_l‖².
    sq_w = np.array([1.0, 1.0, 4.0, 1.0, 2.0])
    sq_l = np.array([4.0, 4.0, 1.0, 1.0, 2.0])
    ip = np.array([0.5, 2.0, 2.0, -1.0, 2.0])
    dw, dl, case = ent.predict(sq_w, sq_l, ip, np.ones(5), np.ones(5))
    assert [ent.CASES[i] for i in case] == ["ideal", "both_down", "both_up", "ideal", "ideal"]
    np.testing.assert_allclose(dw - dl, (sq_w + sq_l - 2 * ip))  # the margin grows by ‖g_w − g_l‖²
    # chosen down and rejected up needs w_c < 0 for the chosen (e.g. apo_down).
    _, _, case = ent.predict(np.array([1.0]), np.array([1.0]), np.array([0.0]), np.array([-1.0]),
                             np.array([-1.0]))
    assert ent.CASES[int(case[0])] == "inverted"


def test_select_patterns_and_errors():
    from jaxalign.errors import ConfigError

    names = ["embed.embedding", "layers.0.attn.q_proj.kernel", "layers.0.attn.k_proj.kernel",
             "layers.1.attn.q_proj.kernel", "layers.1.mlp.up_proj.kernel", "final_norm.scale"]
    assert ent.select(names) == tuple(range(6))
    assert ent.select(names, r"attn\.[qk]_proj") == (1, 2, 3)
    assert ent.select(names, last_blocks=1) == (3, 4)
    assert ent.select(names, ["embed", "final"]) == (0, 5)
    with pytest.raises(ConfigError, match="select no parameter"):
        ent.select(names, "nothing")
    with pytest.raises(ConfigError, match="not a regular expression"):
        ent.select(names, "(")


def test_gram_probes_on_hand_written_functions():
    """Per-leaf ⟨∇f_a, ∇f_b⟩ from probes and token Gram matrices equals brute force, for the uses a model
    makes of its weights: x·W, W·x, Wᵀ, a unit dim, a 3-d einsum, a lookup tied to an unembedding; a bias
    add and an elementwise scale are left to exact differentiation."""
    rng = np.random.default_rng(0)
    V, D, F, T = 11, 4, 5, 6
    leaves = [jnp.asarray(rng.normal(size=s)) for s in
              [(V, D), (D, F), (F, D), (D, 2, 3), (F,), (D,)]]

    def f(lv, ids, x):
        E, W1, W2, U, b, scale = lv
        h = jnp.take(E, ids, axis=0) + x                     # lookup (gather)
        h = jnp.tanh(h @ W1 + b)                             # x·W, bias add (exact)
        h = jnp.einsum("TF,DF->TD", h, W2.T) * scale         # Wᵀ (transpose chain), scale (exact)
        u = jnp.einsum("TD,DNH->TNH", h, U[None][0])          # 3-d einsum through a unit dim
        logits = jnp.einsum("TD,VD->TV", h + u.sum((1, 2))[:, None], E)  # tied unembedding
        return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(T), ids])

    ids = [jnp.asarray(rng.integers(0, V, T)) for _ in range(2)]
    ids[1] = ids[1].at[:2].set(ids[0][:2])                   # shared tokens across examples
    xs = [jnp.asarray(rng.normal(size=(T, D))) for _ in range(2)]
    with jax.enable_x64(True):
        leaves = [x.astype(jnp.float64) for x in leaves]
        xs = [x.astype(jnp.float64) for x in xs]
        plan = gram_lib.analyse(f, leaves, ids[0], xs[0])
        assert plan.gram_leaves == (0, 1, 2, 3) and plan.exact_leaves == (4, 5)

        @jax.jit
        def both(leaves, ids, xs):
            segs = []
            for i_, x_ in zip(ids, xs):
                out, vjp, rec = jax.vjp(lambda pr: gram_lib.probed(plan, pr, leaves, i_, x_),
                                        plan.zero_probes(), has_aux=True)
                (cot,) = vjp(jnp.ones_like(out))
                per_leaf = {i: [] for i in plan.gram_leaves}
                for k, site in enumerate(plan.sites):
                    per_leaf[site.leaf].append(site.factors(rec[k], cot[k]))
                segs.append({i: gram_lib.merge_segments(v) for i, v in per_leaf.items()})
            grads = [jax.grad(f)(leaves, i_, x_) for i_, x_ in zip(ids, xs)]
            pairs_ = ((0, 0), (0, 1), (1, 1))
            got = jnp.array([[gram_lib.inner(segs[a][i], segs[b][i]) for a, b in pairs_]
                             for i in plan.gram_leaves])
            want = jnp.array([[jnp.vdot(grads[a][i], grads[b][i]) for a, b in pairs_]
                              for i in plan.gram_leaves])
            return got, want

        got, want = both(leaves, ids, xs)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


# --- methods against brute force --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_methods_equal_brute_force(results, dtype):
    r = {**results["float64"], "got": results[dtype]["got"]}
    sq_w, sq_l, ip = _stats(r["flat"])
    scale = np.sqrt(sq_w * sq_l)
    tol = TOL[dtype]
    for method, got in r["got"].items():
        assert got.method == method
        _rel_close(got.grad_chosen_sqnorm, sq_w, sq_w, tol, f"{method} ‖g_w‖²")
        _rel_close(got.grad_rejected_sqnorm, sq_l, sq_l, tol, f"{method} ‖g_l‖²")
        _rel_close(got.grad_inner, ip, scale, tol, f"{method} ⟨g_w,g_l⟩")
        _rel_close(got.chosen_logps, r["s"][:, 0], np.abs(r["s"][:, 0]), tol, f"{method} s_w")
        _rel_close(got.rejected_logps, r["s"][:, 1], np.abs(r["s"][:, 1]), tol, f"{method} s_l")
    # The per-parameter breakdown of exact and gram against brute force, leaf by leaf.
    per_leaf = []
    for g_w, g_l in r["grads"]:
        lw, ll = jax.tree.leaves(g_w), jax.tree.leaves(g_l)
        per_leaf.append([[np.vdot(a, a), np.vdot(b, b), np.vdot(a, b)]
                         for a, b in ((np.asarray(x, np.float64), np.asarray(y, np.float64))
                                      for x, y in zip(lw, ll))])
    per_leaf = np.asarray(per_leaf).transpose(0, 2, 1)  # [B, 3, G]
    # Scale of each leaf's numbers; some are exactly 0 (a key bias does not change the softmax).
    leaf_scale = np.maximum(np.sqrt(per_leaf[:, 0] * per_leaf[:, 1]), 1e-6 * scale[:, None])[:, None]
    for method in ("exact", "gram"):
        got = r["got"][method]
        assert got.layer_names == r["names"] and got.layers.shape == per_leaf.shape
        err = np.abs(got.layers - per_leaf) / np.maximum(leaf_scale, np.abs(per_leaf))
        assert err.max() < tol, f"{method} per-leaf relative error {err.max():.2e}"
    assert np.abs(r["got"]["gram"].grad_inner[1]) > 0  # the shared-suffix pair


def test_parameter_subset_equals_brute_force_restricted(llama):
    """``params`` and ``last_blocks`` select leaves; the totals are the brute-force sums over them."""
    results = llama
    r = results["float64"]
    model = results["float32"]["model"]
    probe = ent.make_pair_grads(model, method="gram", params=[r"attn\.[qkv]_proj", "embed"], last_blocks=1,
                           compiler_options=FAST)
    names = probe.split.selected_names
    assert names and all(n.startswith("layers.1.attn.") and n.split(".")[3] in ("q_proj", "k_proj", "v_proj")
                          for n in names)
    got = probe(results["batch"])
    keep = [r["names"].index(n) for n in names]
    want = np.zeros((len(results["ex"]), 3))
    for b, (g_w, g_l) in enumerate(r["grads"]):
        lw, ll = jax.tree.leaves(g_w), jax.tree.leaves(g_l)
        for i in keep:
            a, c = np.asarray(lw[i], np.float64).ravel(), np.asarray(ll[i], np.float64).ravel()
            want[b] += [a @ a, c @ c, a @ c]
    scale = np.sqrt(want[:, 0] * want[:, 1])
    _rel_close(got.grad_chosen_sqnorm, want[:, 0], want[:, 0], 1e-4, "subset ‖g_w‖²")
    _rel_close(got.grad_rejected_sqnorm, want[:, 1], want[:, 1], 1e-4, "subset ‖g_l‖²")
    _rel_close(got.grad_inner, want[:, 2], scale, 1e-4, "subset ⟨g_w,g_l⟩")


@pytest.mark.parametrize("loss", ["sigmoid", "simpo", "dpo_sft"])
def test_predictions_equal_hand_derived(results, loss):
    for dtype in ("float64", "float32"):
        r = {**results["float64"], "got": results[dtype]["got"]}
        batch = results["batch"]
        lengths = np.stack([batch["chosen_mask"].sum(1), batch["rejected_mask"].sum(1)], 1).astype(float)
        w_c, w_r = _hand_weights(loss, r["s"], lengths)
        sq_w, sq_l, ip = _stats(r["flat"])
        want_w, want_l = w_c * sq_w - w_r * ip, w_c * ip - w_r * sq_l
        scale = (np.abs(w_c) + np.abs(w_r)) * (sq_w + sq_l)
        for method, grads in r["got"].items():
            res = ent.weigh(grads, batch, loss=loss, beta=BETA)
            _rel_close(res.weight_chosen, w_c, np.abs(w_c), TOL[dtype], f"{loss} w_c")
            _rel_close(res.weight_rejected, w_r, np.abs(w_r), TOL[dtype], f"{loss} w_r")
            _rel_close(res.pred_dlogp_chosen, want_w, scale, TOL[dtype], f"{method} {loss} Δs_w")
            _rel_close(res.pred_dlogp_rejected, want_l, scale, TOL[dtype], f"{method} {loss} Δs_l")
            clear = (np.abs(want_w) > 1e-3 * scale) & (np.abs(want_l) > 1e-3 * scale)
            _, _, case = ent.predict(sq_w, sq_l, ip, w_c, w_r)
            assert np.array_equal(res.case[clear], np.asarray(case)[clear])
            np.testing.assert_allclose(res.grad_cosine, ip / np.sqrt(sq_w * sq_l), atol=TOL[dtype] * 10)


def test_first_order_predictions_match_an_sgd_step(llama):
    """θ' = θ − η∇ℓ on one pair: the realised change of s_w and s_l minus η·prediction is O(η²)."""
    results = llama
    r = results["float64"]
    batch = results["batch"]
    ex = results["ex"]
    with jax.enable_x64(True):
        model = r["model"]
        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        flat0, unravel = ravel_pytree(state)
        T = 14

        @jax.jit
        def s_of(flat, ids, mask, plen):
            out = pairs.sequence_forward(nnx.merge(graphdef, unravel(flat), rest), ids, mask, plen)
            return out["logps"]

        for loss, b in itertools.product(("sigmoid", "simpo", "dpo_sft"), (0, 3)):
            res = ent.weigh(r["got"]["gram"], batch, loss=loss, beta=BETA)
            p, c, rj = ex[b]
            ids = np.zeros((2, T), np.int32)
            mask = np.zeros((2, T), np.int32)
            for i, y in enumerate((c, rj)):
                ids[i, :len(p) + len(y)], mask[i, :len(p) + len(y)] = p + y, 1
            args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray([len(p)] * 2))
            s0 = np.asarray(s_of(flat0, *args))
            # the SGD direction −∇ℓ = w_c g_w − w_r g_l, from brute-force gradients
            step = res.weight_chosen[b] * r["flat"][b, 0] - res.weight_rejected[b] * r["flat"][b, 1]
            pred = np.array([res.pred_dlogp_chosen[b], res.pred_dlogp_rejected[b]])
            # Steps that move a log-prob by 0.2 and 0.1: the η² error (~1e-3) is far above the float32
            # rounding of the logits (~1e-6; the models compute logits in float32).
            errs = []
            for d in (0.2, 0.1):
                e = d / np.max(np.abs(pred))
                s1 = np.asarray(s_of(flat0 + e * jnp.asarray(step), *args))
                errs.append(np.abs((s1 - s0) - e * pred))
                assert np.all(errs[-1] < 0.05 * d), (loss, b, s1 - s0, e * pred)
            clear = errs[0] > 2e-4  # a side whose second-order term is not lost in the rounding
            assert clear.any()
            ratio = errs[0][clear] / errs[1][clear]
            assert np.all((ratio > 3.3) & (ratio < 4.7)), f"{loss} pair {b}: error ratio {ratio} (want ≈ 4)"


# --- sharding, PyTorch ------------------------------------------------------------------------------

def test_eight_devices_equal_one(gpt2):
    from jaxalign import parallel

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    results = gpt2
    mesh = parallel.make_mesh()
    r = results["float32"]
    probe = ent.make_pair_grads(r["model"], method="gram", per_layer=True, mesh=mesh, compiler_options=FAST)
    got = probe(results["batch"])
    want = r["got"]["gram"]
    scale = np.sqrt(want.grad_chosen_sqnorm * want.grad_rejected_sqnorm)
    for field in ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner"):
        _rel_close(getattr(got, field), getattr(want, field), scale, 1e-5, field)
    _rel_close(got.layers, want.layers, scale[:, None, None], 1e-5, "layers")
    np.testing.assert_allclose(got.chosen_logps, want.chosen_logps, rtol=1e-5)


def test_sharded_parameters_equal_replicated(llama):
    """``shard_params``: weights stored over fsdp × tensor (as training places them), gathered at each use;
    the same numbers as the one-device probe (itself checked against brute force and PyTorch here)."""
    from jaxalign import parallel

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    r = llama["float32"]
    mesh = parallel.make_mesh((1, 4, 2))
    probe = ent.make_pair_grads(r["model"], method="auto", per_layer=True, mesh=mesh, compiler_options=FAST,
                                shard_params=True)
    specs = [x.sharding.spec for x in probe.diff]
    assert any("fsdp" in str(s) for s in specs) and any("tensor" in str(s) for s in specs), specs
    got = probe(llama["batch"])
    want = r["got"]["gram"]
    assert got.method == "gram"
    scale = np.sqrt(want.grad_chosen_sqnorm * want.grad_rejected_sqnorm)
    for field in ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner"):
        _rel_close(getattr(got, field), getattr(want, field), scale, 1e-5, field)
    _rel_close(got.layers, want.layers, scale[:, None, None], 1e-5, "layers")
    np.testing.assert_allclose(got.chosen_logps, want.chosen_logps, rtol=1e-5)
    for method in ("exact", "jvp"):
        with pytest.raises(ConfigError, match="--shard-params"):
            ent.make_pair_grads(r["model"], method=method, shard_params=True)


def test_equals_pytorch_autograd(results):
    """``torch.autograd.grad`` of the summed response log-prob, one unpadded example at a time, all
    parameters of the transformers model (tied weights once), float64."""
    torch = pytest.importorskip("torch")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(results["path"], dtype=torch.float64).eval()
    params = [p for p in hf.parameters() if p.requires_grad]
    stats = []
    for p, c, rj in results["ex"]:
        flat = []
        for y in (c, rj):
            ids = torch.tensor([p + y])
            logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            s = logp[torch.arange(len(p) - 1, len(p) + len(y) - 1), ids[0, len(p):]].sum()
            flat.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(s, params)]).numpy())
        stats.append([flat[0] @ flat[0], flat[1] @ flat[1], flat[0] @ flat[1]])
    stats = np.asarray(stats)
    got = results["float64"]["got"]["gram"]
    scale = np.sqrt(stats[:, 0] * stats[:, 1])
    _rel_close(got.grad_chosen_sqnorm, stats[:, 0], stats[:, 0], 1e-5, "torch ‖g_w‖²")
    _rel_close(got.grad_rejected_sqnorm, stats[:, 1], stats[:, 1], 1e-5, "torch ‖g_l‖²")
    _rel_close(got.grad_inner, stats[:, 2], scale, 1e-5, "torch ⟨g_w,g_l⟩")


# --- token level, sketches --------------------------------------------------------------------------

def test_token_gram_equals_per_token_brute_force(gpt2, tmp_path):
    results = gpt2  # the paper's heat maps are GPT-2's
    r = results["float64"]
    p, c, rj = results["ex"][1]
    with jax.enable_x64(True):
        tg = tok_lib.token_gram(r["model"], p, c, rj, chunk=3, compiler_options=FAST)
        graphdef, state, rest = nnx.split(r["model"], nnx.Param, ...)

        def token_logps(st, y):
            m = nnx.merge(graphdef, st, rest)
            ids = jnp.asarray([p + y])
            h = m(ids, jnp.ones_like(ids), return_logits=False).hidden
            lp = jax.nn.log_softmax(m.logits(h)[0, len(p) - 1:-1].astype(jnp.float64))
            return lp[jnp.arange(len(y)), jnp.asarray(y)]

        rows = []
        for y in (c, rj):
            jac = jax.jacrev(token_logps)(state, y)  # leaves [len(y), *leaf]
            rows += [np.asarray(ravel_pytree(jax.tree.map(lambda a: a[i], jac))[0]) for i in range(len(y))]
    J = np.stack(rows)
    want = J @ J.T
    scale = np.sqrt(np.outer(np.diag(want), np.diag(want)))
    assert np.max(np.abs(tg.gram - want) / scale) < 1e-5
    Rw = len(c)
    np.testing.assert_allclose(tg.gram[:Rw, :Rw].sum(), _stats(r["flat"])[0][1], rtol=1e-5)
    # the shared suffix's identical tokens are far more aligned than the differing first tokens (the
    # paper's heat-map pattern; this tiny model is random, so only the ordering is asserted)
    assert np.diag(tg.cosine[2:, 2:]).min() > 0.5 > np.abs(tg.cosine[:2, :2]).max()
    from jaxalign.jobs.entangle import save_heatmap

    npy, png = save_heatmap(tg, tmp_path / "heat", title="pair 1")
    np.testing.assert_array_equal(np.load(npy), tg.cosine)
    assert png.stat().st_size > 1000


def test_sketches_equal_explicit_projection(llama):
    results = llama
    r = results["float64"]
    k, seed = 6, 3
    with jax.enable_x64(True):
        sk = tok_lib.make_sketcher(r["model"], k=k, seed=seed, kind="rademacher", chunk_size=3,
                                   compiler_options=FAST)(results["batch"])
        blocks = []
        for name, leaf in zip(r["names"], jax.tree.leaves(r["grads"][0][0])):
            n = leaf.size
            b = min(n, tok_lib.SKETCH_BLOCK)
            om = np.concatenate([np.asarray(tok_lib.projection_block(seed, name, n, j, k, "rademacher",
                                                                     jnp.float64))
                                 for j in range(-(-n // b))], 1)[:, :n]
            blocks.append(om)
    omega = np.concatenate(blocks, 1)  # [k, |θ|] in ravel_pytree order
    assert set(np.unique(np.abs(omega) * np.sqrt(k)).round(6)) == {1.0}
    want_c = r["flat"][:, 0] @ omega.T
    want_d = (r["flat"][:, 0] - r["flat"][:, 1]) @ omega.T
    # the gradients agree to ~1e-6 (both paths round the logits to float32), so the sketches do too
    norm = np.linalg.norm(r["flat"][:, 0], axis=1)[:, None] * np.abs(omega).max() * 10
    _rel_close(sk["chosen"], want_c, norm, 1e-5, "sketch of g_w")
    _rel_close(sk["diff"], want_d, norm, 1e-5, "sketch of g_w - g_l")


# --- the job and the CLI ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny llama with the tiny tokenizer, and 8 JSONL records of which one is bad. Every prompt has
    15 tokens and every response 10 (one padded shape, one compilation)."""
    from tiny_tokenizer import make_tiny_tokenizer

    path = make_tiny("llama", tmp_path_factory.mktemp("cli_llama"), seed=5, vocab_size=300)
    make_tiny_tokenizer(path)
    data = tmp_path_factory.mktemp("cli_data") / "pairs.jsonl"
    rng = np.random.default_rng(1)
    words = ["sure", "nope", "okay", "fine", "yes!", "no!!", "mayb", "else"]  # 4 bytes each
    lines = []
    for i in range(7):
        w = lambda: " ".join(rng.choice(words, 2))  # noqa: E731
        lines.append(json.dumps({"prompt": f"Q{i}: " + w(), "chosen": w(), "rejected": w()}))
    lines.insert(3, json.dumps({"prompt": "no answers"}))  # a bad record (missing fields)
    data.write_text("\n".join(lines) + "\n")
    return str(path), str(data)


def test_entangle_job_writes_resumes_and_is_consistent(cli_model, tmp_path):
    from jaxalign import store
    from jaxalign.jobs import entangle as entanglement_run

    model_path, data = cli_model
    out = tmp_path / "run"
    kw = dict(loss="simpo", beta=2.0, per_layer=True, batch_size=4, on_bad_record="skip", progress=False,
              compiler_options=FAST, method="gram")

    class Stop(Exception):
        pass

    def stop(batch_id):
        raise Stop

    with pytest.raises(Stop):
        entanglement_run.run_entangle(model_path, data, str(out), after_batch=stop, **kw)
    assert (out / "pairs.parquet.parts").is_dir() and not (out / "pairs.parquet").exists()
    summary = entanglement_run.run_entangle(model_path, data, str(out), heatmaps=[0], **kw)
    table = store.read_table(out / "pairs.parquet").to_pandas()
    assert list(table.columns[:10]) == [
        "index", "grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner", "grad_cosine", "weight_chosen",
        "weight_rejected", "pred_dlogp_chosen", "pred_dlogp_rejected", "case"]
    assert table["index"].tolist() == [0, 1, 2, 4, 5, 6, 7]  # record 3 is bad and skipped
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["probed"] == 7
    assert abs(sum(summary["case_fractions"].values()) - 1) < 1e-9
    w_c, w_r = table["weight_chosen"], table["weight_rejected"]
    np.testing.assert_allclose(table["pred_dlogp_chosen"],
                               w_c * table["grad_chosen_sqnorm"] - w_r * table["grad_inner"], rtol=1e-9)
    layers = {a: store.read_zarr(out / "layers.zarr" / a) for a in entanglement_run.LAYER_ARRAYS}
    index = store.read_zarr(out / "layers.zarr" / "index")
    order = np.argsort(index)
    scale = np.sqrt(table["grad_chosen_sqnorm"] * table["grad_rejected_sqnorm"]).to_numpy()
    _rel_close(layers["grad_inner"].sum(1)[order], table["grad_inner"].to_numpy(), scale, 1e-6, "layers sum")
    groups = json.loads((out / "layers.zarr" / "zarr.json").read_text())["attributes"]["groups"]
    assert len(groups) == layers["grad_inner"].shape[1] and "embed.embedding" in groups
    assert set(summary["methods_used"].values()) == {"gram"}  # padded shape depends on bucketing
    for f in ("summary.json", "scatter.png", "heatmap_0.npy", "heatmap_0.png", "skipped.jsonl"):
        assert (out / f).is_file(), f
    assert not (out / "pairs.parquet.parts").exists()
    # The same settings uninterrupted: the same batches through the same programs, so bit-identical.
    again = tmp_path / "again"
    entanglement_run.run_entangle(model_path, data, str(again), heatmaps=[0], **kw)
    assert store.read_table(again / "pairs.parquet").equals(store.read_table(out / "pairs.parquet"))
    for a in entanglement_run.LAYER_ARRAYS + ("index",):
        np.testing.assert_array_equal(store.read_zarr(again / "layers.zarr" / a),
                                      store.read_zarr(out / "layers.zarr" / a), err_msg=a)
    np.testing.assert_array_equal(np.load(again / "heatmap_0.npy"), np.load(out / "heatmap_0.npy"))


def test_ref_model_equal_to_the_policy_gives_the_default_weights(cli_model, tmp_path):
    """``--ref`` names a model whose log-probs are computed with the same forward pass: the model itself
    as ``--ref`` must give Δ = 0, the weights of the default (reference = the model)."""
    from jaxalign import store
    from jaxalign.jobs import entangle as entangle_job

    model_path, data = cli_model
    kw = dict(loss="sigmoid", beta=0.5, batch_size=4, limit=5, on_bad_record="skip", progress=False,
              compiler_options=FAST, method="gram")
    entangle_job.run_entangle(model_path, data, str(tmp_path / "self"), **kw)
    entangle_job.run_entangle(model_path, data, str(tmp_path / "ref"), ref=model_path, **kw)
    a, b = (store.read_table(tmp_path / d / "pairs.parquet") for d in ("self", "ref"))
    # DPO's weight is beta * sigmoid(-beta * h) = beta / 2 at h = Δ_w - Δ_l = 0. The reference log-probs
    # come from another compiled program (pair_forward) than the policy's (the probe), so h is float32
    # rounding of log-probs of ~30 nats, |h| < 1e-4, and the weight moves by beta^2/4 * |h| < 1e-5.
    np.testing.assert_allclose(a.column("weight_chosen").to_numpy(), 0.25, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.column("weight_chosen").to_numpy(), 0.25, rtol=0, atol=1e-5)
    np.testing.assert_allclose(b.column("weight_rejected").to_numpy(), 0.25, rtol=0, atol=1e-5)


def test_entangle_job_with_sharded_parameters(cli_model, tmp_path):
    """``--shard-params`` on 8 devices: the job makes the mesh all-fsdp, the weights sharded over it, and
    writes what the one-device job writes."""
    from jaxalign import parallel, store
    from jaxalign.jobs import entangle as entangle_job

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    model_path, data = cli_model
    kw = dict(loss="sigmoid", beta=0.5, batch_size=8, on_bad_record="skip", progress=False,
              compiler_options=FAST, method="gram")
    entangle_job.run_entangle(model_path, data, str(tmp_path / "one"), **kw)
    entangle_job.run_entangle(model_path, data, str(tmp_path / "sharded"), mesh=parallel.make_mesh(),
                              shard_params=True, **kw)
    a, b = (store.read_table(tmp_path / d / "pairs.parquet").to_pandas() for d in ("one", "sharded"))
    assert a["index"].tolist() == b["index"].tolist() and len(a) == 7
    scale = np.sqrt(a["grad_chosen_sqnorm"] * a["grad_rejected_sqnorm"]).to_numpy()
    for field in ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner"):
        _rel_close(b[field].to_numpy(), a[field].to_numpy(), scale, 1e-5, field)


def test_zarr_rows_written_by_batch_and_resumed(tmp_path):
    """The zarr groups of the job: rows of non-contiguous batches land at their rows; a resumed run keeps
    what was written."""
    from jaxalign import store
    from jaxalign.jobs import entangle as entanglement_run

    index = np.array([10, 11, 13, 14, 20])
    arrays = entanglement_run.rows_group(tmp_path / "s.zarr", {"diff": ((5, 3), "float32")}, {"k": 3}, index,
                                         resuming=False)
    arrays.write_rows("diff", np.array([4, 0, 2]), np.array([[4.0] * 3, [0.0] * 3, [2.0] * 3]))
    again = entanglement_run.rows_group(tmp_path / "s.zarr", {"diff": ((5, 3), "float32")}, {"k": 3}, index,
                                        resuming=True)
    again.write_rows("diff", np.array([1, 3]), np.array([[1.0] * 3, [3.0] * 3]))
    got = store.read_zarr(tmp_path / "s.zarr" / "diff")
    np.testing.assert_array_equal(got[:, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(store.read_zarr(tmp_path / "s.zarr" / "index"), index)
    meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert meta["node_type"] == "group" and meta["attributes"] == {"k": 3}


def test_cli_wiring_and_errors(cli_model, tmp_path, monkeypatch, capsys):
    from jaxalign import cli
    from jaxalign.jobs import entangle as entanglement_run

    seen = {}

    def fake(model, data, out, **kw):
        seen.update(kw, model=model, data=data, out=out)
        return {"counts": {"probed": 1, "read": 1, "kept": 1, "skipped": 0}, "method": "auto",
                "methods_used": {"16x16": "gram"}, "case_fractions": {c: 0.25 for c in ent.CASES},
                "measures": {"grad_cosine": {}}}

    monkeypatch.setattr(entanglement_run, "run_entangle", fake)
    model_path, data = cli_model
    rc = cli.main(["entangle", "--model", model_path, "--data", data, "--out", str(tmp_path), "--loss",
                   "simpo", "--beta", "2", "--loss-option", "simpo_gamma=0.3", "--params", "q_proj",
                   "--last-blocks", "1", "--per-layer", "--limit", "3", "--method", "gram", "--shard-params"])
    assert rc == 0 and seen["shard_params"]
    assert seen["loss"] == "simpo" and seen["beta"] == 2.0 and seen["loss_options"] == {"simpo_gamma": 0.3}
    assert seen["params"] == ["q_proj"] and seen["last_blocks"] == 1 and seen["per_layer"]
    assert seen["limit"] == 3 and seen["method"] == "gram"
    assert "probed 1 pairs" in capsys.readouterr().out
    monkeypatch.undo()
    rc = cli.main(["entangle", "--model", model_path, "--data", data, "--out", str(tmp_path / "x"),
                   "--loss", "no_such_loss"])
    assert rc == 2 and "no_such_loss" in capsys.readouterr().err
