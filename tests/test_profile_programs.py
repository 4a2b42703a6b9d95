"""scripts/profile_programs.py: the thunk classification against programs whose ops are known by hand."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import profile_programs as pp  # noqa: E402


def _matmul_and_tanh(a, b):
    return jnp.tanh(a @ b) * 2.0


@pytest.fixture(scope="module")
def matmul_tanh_profile(tmp_path_factory):
    M, K, N = 192, 256, 128
    a = jnp.asarray(np.random.default_rng(0).standard_normal((M, K)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((K, N)), jnp.float32)
    prog = pp.Program(jax.jit(_matmul_and_tanh).lower, (a, b))
    hlo = pp.parse_hlo(prog.lower(a, b).compile().as_text())
    return (M, K, N), hlo, pp.profile(prog, calls=2, trace_dir=tmp_path_factory.mktemp("trace"))


def test_matmul_time_comes_from_the_dot_thunk(matmul_tanh_profile):
    (M, K, N), hlo, r = matmul_tanh_profile
    entry = [n for n in hlo.comps[list(hlo.comps)[-1]] if hlo.instrs[n].opcode not in ("parameter", "constant")]
    matmul = [n for n in entry if pp.is_matmul(hlo, n)]
    # One thunk holds the dot (its called computation has a `dot`), the tanh·2 is elementwise elsewhere.
    assert len(matmul) == 1
    called = hlo.comps[hlo.instrs[matmul[0]].calls[0]] if hlo.instrs[matmul[0]].calls else [matmul[0]]
    assert "dot" in [hlo.instrs[n].opcode for n in called]
    # The dot FLOPs per call: 2·M·K·N from the shapes, counted once per execution (2 profiled calls).
    assert r["matmul_gflop_per_call"] == pytest.approx(2 * M * K * N / 1e9, rel=1e-12)
    assert 0.0 < r["matmul_share"] < 1.0
    # Everything not in the dot thunk is listed as "other", and the tanh is among it.
    others = {o["name"] for o in r["top_other"]}
    assert matmul[0] not in others and others
    assert any("tanh" in o["kind"] or "tanh" in o["op"] for o in r["top_other"])


def test_summarize_shares_are_the_thunk_times(matmul_tanh_profile):
    (M, K, N), hlo, _ = matmul_tanh_profile
    entry = list(hlo.comps)[-1]
    dot = next(n for n in hlo.comps[entry] if pp.is_matmul(hlo, n))
    other = next(n for n in hlo.comps[entry] if not pp.is_matmul(hlo, n)
                 and hlo.instrs[n].opcode not in ("parameter", "constant"))
    s = pp.summarize({dot: (300.0, 2), other: (100.0, 2)}, hlo, calls=2)
    assert s["matmul_share"] == pytest.approx(0.75, rel=1e-12)
    assert s["thunk_ms_per_call"] == pytest.approx(0.2, rel=1e-12)
    # 2 executions of a 2·M·K·N dot in 300 µs
    assert s["matmul_gflops"] == pytest.approx(2 * 2 * M * K * N / 300e-6 / 1e9, rel=1e-12)
    assert [o["name"] for o in s["top_other"]] == [other]


def test_dots_inside_a_loop_count_per_execution(tmp_path):
    steps, K = 3, 64

    def f(a, b):
        return jax.lax.map(lambda x: jnp.sum(jnp.tanh(x @ b)), a)

    a = jnp.ones((steps, K, K), jnp.float32)
    b = jnp.ones((K, K), jnp.float32)
    r = pp.profile(pp.Program(jax.jit(f).lower, (a, b)), calls=2, trace_dir=tmp_path)
    # The while thunk only contains the body's thunks: the dot counts once per iteration, never twice.
    assert r["matmul_gflop_per_call"] == pytest.approx(steps * 2 * K ** 3 / 1e9, rel=1e-12)
    assert all(o["kind"] != "while" for o in r["top_other"])


def test_parse_hlo_reads_shapes_operands_and_calls():
    text = """HloModule m

%fused (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> (f32[4,2], f32[]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused
  %c = f32[] constant(0)
  ROOT %t = (f32[4,2]{1,0}, f32[]) tuple(%ynn_fusion, %c)
}
"""
    hlo = pp.parse_hlo(text)
    assert hlo.comps["main"] == ["a", "b", "ynn_fusion", "c", "t"]
    assert hlo.instrs["d"].dims == (4, 2) and hlo.instrs["d"].operands == ("p0", "p1")
    assert hlo.instrs["d"].op_name == "jit(f)/dot_general" and hlo.instrs["t"].dims is None
    assert pp.is_matmul(hlo, "ynn_fusion") and not pp.is_matmul(hlo, "c")
    assert pp.dot_flops(hlo, "ynn_fusion") == 2 * 4 * 8 * 2


def test_tiny_ches_scorer_dot_flops_match_the_formula(tmp_path):
    model = pp.tiny_model()
    cfg = model.cfg
    B, P, R = 4, 12, 4
    r = pp.profile(pp.ches_program(model, B, P, R), calls=1, trace_dir=tmp_path)
    D, F, N, K, H, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.num_layers)
    per_token = 2 * L * (D * N * H * 2 + D * K * H * 2 + 3 * D * F)
    # The one pass attending per part at these shapes; the responses run without their last column (it
    # predicts nothing).
    from jaxalign import pairs

    Rr = pairs.run_length(R)
    assert pairs.fused_pays() and not pairs.whole_row_attention_pays(P, Rr)
    # Scores and weighted sums: the prompt over its P keys, each of the 2B responses over its P + Rr keys
    # (no score of the masked prompt × response or chosen × rejected blocks).
    attention = 2 * 2 * L * N * H * (B * P * P + 2 * B * Rr * (P + Rr))
    expected = per_token * (B * P + 2 * B * Rr) + attention
    # The hidden-sum and score einsums add a few [B, D]-sized dots (< 1% of the model's at these sizes).
    assert r["matmul_gflop_per_call"] * 1e9 == pytest.approx(expected, rel=1e-2)
    assert r["matmul_gflop_per_call"] * 1e9 >= expected
    assert r["gflop"] * 1e9 >= expected  # XLA's count includes the elementwise work too


def test_bench_ab_variants_trace_their_own_programs():
    """scripts/bench_ab.py: each variant is its own compiled program (the swapped function is what was
    traced: the `einsum` variant has no materialised xᵀ, so fewer transposes) and every round times each."""
    import bench_ab

    model = pp.tiny_model()
    program, lower = bench_ab.PROGRAMS["train"](model)
    texts = {name: lower(name).compile().as_text() for name in ("base", "einsum")}
    count = {name: text.count("jvp()/transpose") for name, text in texts.items()}
    assert count["base"] > count["einsum"]
    with pytest.raises(KeyError):
        with bench_ab.variant("base+nosuch"):
            pass
    out = bench_ab.run(model, "ches", ["cache", "fused"], rounds=2)
    assert set(out["variants"]) == {"cache", "fused"} and len(out["loads"]) == 2
    assert out["variants"]["cache"]["round_ratios"] == [1.0, 1.0]
    assert all(len(v["times"]) == 2 for v in out["variants"].values())
