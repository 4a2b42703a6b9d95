"""`jaxalign plan`: ahead-of-time compilation of the jobs from abstract inputs, checked independently.

* Parameter and optimizer bytes per device against the shard sizes of real arrays placed on 8 simulated
  CPU devices by the trainer's own code (and, on a TPU topology, against the config's formula).
* The compiled program's argument bytes against the sum of those groups; the compiled train step runs on
  the real arrays.
* FLOPs against the formula 6·N·tokens + attention written out here from the config.
* The HLO collective parser against a hand-written HLO module (counts, bytes, loop trip counts).
* The TPU part compiles for ``v5p:2x2x1`` through libtpu and skips only where libtpu cannot load.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxalign import cli
from jaxalign.jobs import chips
from jaxalign.jobs import plan as P

# D, F, V large enough that the matrices dominate the step's FLOPs (norms, softmax, AdamW are small).
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
SHAPES = P.Shapes(pairs=8, prompt_len=32, response_len=16)


def _param_count(c) -> tuple[int, int, int]:
    """``(matrices in blocks, unembedding, all)`` of a Llama config, from the formula."""
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    N, K = c["num_attention_heads"], c["num_key_value_heads"]
    H = c.get("head_dim") or D // N
    block = D * N * H * 2 + 2 * D * K * H + 3 * D * F
    head = V * D
    tied = c.get("tie_word_embeddings", c["model_type"] in ("gemma", "gemma2"))
    norms = {"llama": 2, "qwen2": 2, "gemma2": 4, "olmo2": 2}[c["model_type"]] * D
    qk = (N * H + K * H) if c["model_type"] == "olmo2" else 0
    bias = (N * H + 2 * K * H) if c["model_type"] == "qwen2" else 0
    total = L * (block + norms + qk + bias) + D + head * (1 if tied else 2)
    return L * block, head, total


def _flops(c, S: P.Shapes, passes: int = 3, logits: bool = True) -> float:
    """6·N·tokens + attention (prompt once, cache of P + R slots), the matrices only."""
    block, head, _ = _param_count(c)
    B, Pl, R = S.pairs, S.prompt_len, S.response_len
    H = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    attn = 4 * c["num_attention_heads"] * H * c["num_hidden_layers"] * (Pl + 2 * R) * (Pl + R)
    return passes * B * (2.0 * block * (Pl + 2 * R) + (2.0 * head * 2 * (R + 1) if logits else 0) + attn)


@pytest.fixture(scope="module")
def cpu_plan():
    run = P.run_config(None, ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"])
    return P.plan(TINY, "tiny", "train", P.target(cpu_devices=8, chip="v5p"), SHAPES, run), run


def test_presets_are_the_published_sizes():
    # Llama-3.1-8B: 8,030,261,248 parameters (meta-llama/Llama-3.1-8B model card: "8B"; safetensors index).
    # One preset per family (the larger sizes of a family go through the same code; they cost seconds each).
    assert len(P.presets()) == 10
    for name in ("Llama-3.2-1B", "Qwen2.5-7B", "Gemma-2-9B", "OLMo-2-7B"):
        hf, _ = P.model_config(name)
        dims = P.model_dims(P.abstract_model(hf, P.run_config()))
        assert dims["params"] == _param_count(hf)[2], name
    assert P.model_dims(P.abstract_model(P.model_config("Llama-3.1-8B")[0], P.run_config()))["params"] \
        == 8_030_261_248


def test_cpu_plan_bytes_equal_the_placed_arrays(cpu_plan):
    from flax import nnx

    from jaxalign import parallel
    from jaxalign.models import registry
    from jaxalign.train import optim
    from jaxalign.train import step as step_lib

    p, run = cpu_plan
    # The trainer's placement of real arrays: a model built on the mesh, state from init_state.
    mesh = parallel.make_mesh((2, 4, 1), jax.devices()[:8])
    cfg = registry.config_from_hf(TINY)
    model = registry.get_family("llama")[1](cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, parallel.state_shardings(state, mesh)))
    parts, params = step_lib.ModelParts.split(model)
    optimizer = optim.make_optimizer(run.optim, 1000)
    ts = step_lib.init_state(optimizer, params, step_lib.shardings_of(params), mesh)
    dev = jax.devices()[0]

    def on_dev(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)

    m = p["memory"]
    assert m["params_bytes"] == on_dev(ts.params)
    assert m["optimizer_bytes"] == on_dev(ts.opt_state)
    # The compiled program's arguments are exactly these groups.
    assert m["argument_bytes"] == sum(m[f"{k}_bytes"] for k in ("params", "optimizer", "batch", "other"))
    assert m["padding_bytes"] == 0  # CPU arrays are not padded
    # train_step on these real arrays, placed by the trainer's code, compiles to the same memory, and runs.
    spec = step_lib.Objective.from_config(run.loss)
    batch = {k: jnp.ones(v.shape, v.dtype) for k, v in P.batch_structs(SHAPES, mesh, with_ref=True)[0].items()}
    batch = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    state_sh = step_lib.shardings_of(ts)
    fn = jax.jit(functools.partial(step_lib.train_step, parts=parts, spec=spec, optimizer=optimizer,
                                   schedule=optim.make_schedule(run.optim, 1000)),
                 in_shardings=(state_sh, step_lib.shardings_of(batch), step_lib.shardings_of(parts.rest), None),
                 out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
    with jax.set_mesh(mesh):  # as step_lib.jit_train_step calls it (the model's activation constraints)
        compiled = fn.lower(ts, batch, parts.rest, None).compile()
    real = compiled.memory_analysis()
    assert (real.argument_size_in_bytes, real.temp_size_in_bytes) == (m["argument_bytes"], m["temp_bytes"])
    new_state, metrics = compiled(ts, batch, parts.rest, None)
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))
    # Hand count: every matrix has the embed dim (128, divisible by fsdp=4) -> sharded 4 ways; the
    # 2·L + 1 norm vectors replicated; float32.
    block, head, total = _param_count(TINY)
    norms = (2 * TINY["num_hidden_layers"] + 1) * TINY["hidden_size"]
    assert m["params_bytes"] == 4 * ((total - norms) // 4 + norms)


def test_cpu_plan_runs_flops_and_collectives(cpu_plan):
    p, _ = cpu_plan
    # Compiler vs 6·N·tokens + attention: the formula leaves out norms, RoPE, softmaxes, the log-softmax
    # and AdamW (5% more on CPU at this width), and XLA counts a multiply-add as 2 FLOPs like the formula.
    analytic = _flops(TINY, SHAPES) / 8
    assert p["flops"]["analytic_per_chip"] == pytest.approx(analytic, rel=1e-9)
    assert p["flops"]["compiler_per_chip"] == pytest.approx(analytic, rel=0.15)
    assert p["collectives"]["all-gather"]["count"] > 0  # fsdp=4: parameters gathered
    r = p["roofline"]
    assert r["step_s"] == max(r["compute_s"], r["hbm_s"], r["collective_s"])
    assert r["mfu"] == pytest.approx(_flops(TINY, SHAPES) / (r["step_s"] * 8 * 459e12))


HLO = """HloModule m

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %p = (s32[], f32[64,128]{1,0}) parameter(0)
  %x = f32[64,128]{1,0} get-tuple-element(%p), index=1
  %ag = f32[256,128]{1,0} all-gather(f32[64,128]{1,0} %x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ar = f32[64,128]{1,0} all-reduce(f32[64,128]{1,0} %x), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[64,128]{1,0}) tuple(%i, %ar)
}

%all-reduce-scatter (input: bf16[8,16]) -> bf16[2,16] {
  %input = bf16[8,16]{1,0} parameter(0)
  %ar2 = bf16[8,16]{1,0:T(8,128)(2,1)} all-reduce(%input), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  ROOT %ds = bf16[2,16]{1,0} dynamic-slice(%ar2, %c, %c), dynamic_slice_sizes={2,16}
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[8,1024]) -> bf16[2,1024] {
  %x = bf16[8,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %rs = bf16[2,1024]{1,0:T(8,128)(2,1)} reduce-scatter(bf16[8,1024]{1,0:T(8,128)(2,1)} %x), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %w = (s32[], f32[64,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %f = bf16[2,16]{1,0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter
  ROOT %r = bf16[2,1024]{1,0} copy(%rs)
}
"""


def test_collectives_parser_by_hand():
    c = P.collectives(HLO, 8)
    # One listed reduce-scatter (group of 4 from [2,4]<=[8]) and one fused TPU-style (mesh axis_1 = 4).
    assert c["reduce-scatter"] == {"count": 2, "bytes": 8 * 1024 * 2 + 8 * 16 * 2,
                                   "traffic_bytes": (8 * 1024 * 2 + 8 * 16 * 2) * 3 / 4}
    assert c["all-gather"]["count"] == 3  # inside the while body, trip count 3
    assert c["all-gather"]["bytes"] == 3 * 256 * 128 * 4
    assert c["all-gather"]["traffic_bytes"] == 3 * 256 * 128 * 4 * 3 / 4
    assert c["all-reduce"]["traffic_bytes"] == 3 * 64 * 128 * 4 * 2 * 1 / 2  # groups of 2: 2·(n−1)/n
    assert c["all-to-all"]["count"] == 0


def test_chip_table_and_roofline_by_hand():
    v5p = chips.get("v5p")
    assert (v5p.hbm_bytes, v5p.peak_bf16_flops, v5p.hbm_bytes_per_s) == (95 * 2**30, 459e12, 2765e9)
    assert chips.from_device_kind("TPU v5 lite") is chips.CHIPS["v5e"]
    assert chips.from_device_kind("NVIDIA H100 80GB HBM3") is chips.CHIPS["h100"]
    assert chips.from_device_kind("cpu") is None
    r = P.roofline(v5p, 4, flops_per_chip=459e12, hbm_bytes_per_chip=2765e9 / 2, ici_bytes_per_chip=0.0,
                   model_flops=2 * 459e12, pairs=8, tokens=8000)
    assert (r["step_s"], r["bound"], r["pairs_per_s"], r["tokens_per_s"]) == (1.0, "compute", 8.0, 8000.0)
    assert r["mfu"] == pytest.approx(0.5)


def test_cli_plan_ches_json_and_errors(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", str(cfg), "mesh.data=2", "mesh.fsdp=4", "--job", "ches", "--cpu-devices", "8",
                   "--chip", "v5e", "--pairs", "8", "--prompt-len", "16", "--response-len", "8", "--out", str(out)])
    assert rc == 0
    p = json.loads(out.read_text())
    assert p["estimate"] is True and p["job"] == "ches" and p["chip"]["name"] == "v5e"
    c = json.loads(cfg.read_text())
    assert p["flops"]["analytic_per_chip"] == pytest.approx(
        _flops(c, P.Shapes(8, 16, 8), passes=1, logits=False) / 8)
    assert "ESTIMATES" in capsys.readouterr().out
    rc = cli.main(["plan", str(cfg), "mesh.data=3", "--job", "ches", "--cpu-devices", "8"])
    assert rc == 2 and "mesh" in capsys.readouterr().err
    rc = cli.main(["plan", "no-such-model", "--cpu-devices", "8"])
    assert rc == 2 and "preset" in capsys.readouterr().err
    rc = cli.main(["plan", str(cfg), "--job", "ches", "--cpu-devices", "8", "--shard-params"])
    assert rc == 2 and "--shard-params" in capsys.readouterr().err


# --- TPU topologies through libtpu ------------------------------------------------------------------

def _tpu_target():
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install jaxalign[tpu])")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # xdist workers each load libtpu
    try:
        return P.target(topology="v5p:2x2x1")
    except P.ConfigError as err:
        pytest.skip(f"libtpu cannot load here: {err}")


def test_tpu_train_ches_gram_compile_on_v5p():
    tgt = _tpu_target()
    assert len(tgt.devices) == 4 and tgt.chip.name == "v5p"
    run = P.run_config(None, ["mesh.data=1", "mesh.fsdp=4", "model.dtype=bfloat16"])
    p = P.plan(TINY, "tiny", "train", tgt, SHAPES, run)
    block, head, total = _param_count(TINY)
    norms = (2 * TINY["num_hidden_layers"] + 1) * TINY["hidden_size"]
    assert p["memory"]["params_bytes"] == 4 * ((total - norms) // 4 + norms)  # float32, fsdp=4
    # TPU pads arrays to its (8, 128) tiles: the arguments are the shard sizes plus that padding.
    groups = sum(p["memory"][f"{k}_bytes"] for k in ("params", "optimizer", "batch", "other"))
    assert p["memory"]["argument_bytes"] == groups + p["memory"]["padding_bytes"]
    assert p["memory"]["padding_bytes"] >= 0
    # TPU's count has the same extras as the CPU's plus its own elementwise choices (1.18 for a D=64 model).
    assert p["flops"]["compiler_per_chip"] == pytest.approx(_flops(TINY, SHAPES) / 4, rel=0.25)
    assert p["collectives"]["all-gather"]["count"] > 0
    assert p["memory"]["fits"] and 0 < p["roofline"]["mfu"] < 1
    # entangle: every method (gram and exact pick the target logit by a masked sum: a gather there
    # aborted libtpu 0.0.42's compiler).
    ches = P.plan(TINY, "tiny", "ches", tgt, SHAPES, run)
    assert ches["flops"]["compiler_per_chip"] == pytest.approx(_flops(TINY, SHAPES, 1, False) / 4, rel=0.25)
    for method in ("jvp", "gram", "exact"):
        ent = P.plan(TINY, "tiny", "entangle", tgt, SHAPES, run, method=method)
        assert ent["options"]["method"] == method
        assert ent["memory"]["total_bytes"] > 0 and ent["flops"]["compiler_per_chip"] > 0


def test_trace_time_kernel_choices_follow_the_target_platform():
    """The forms chosen at trace time for XLA:CPU (row-layout kernel gradients, the RoPE tables behind a
    barrier, the CHES scorer's fused pass) are taken when the program is for a CPU, not whenever the
    host is one: a TPU plan traced on this host gets what a TPU would run."""
    from jaxalign import pairs, parallel
    from jaxalign.models import base

    x, w = jnp.ones((2, 3, 8)), jnp.ones((8, 4))
    pos, inv = jnp.arange(3)[None].repeat(2, 0), jnp.ones((2,))

    def program(platform: str) -> str:
        with parallel.compiling_for(platform):
            return str(jax.make_jaxpr(lambda a, b: (base.contract("BTD,DF->BTF", a, b),
                                                     base.apply_rope(a.reshape(2, 3, 2, 4), pos, inv)))(x, w))

    assert parallel.target_platform() == jax.default_backend()
    cpu, tpu = program("cpu"), program("tpu")
    assert "custom_jvp_call" in cpu and "optimization_barrier" in cpu
    assert "custom_jvp_call" not in tpu and "optimization_barrier" not in tpu
    with parallel.compiling_for("cpu"):
        assert pairs.fused_pays() and pairs.whole_row_attention_pays(56, 3)
    with parallel.compiling_for("tpu"):
        assert parallel.target_platform() == "tpu" and not pairs.fused_pays()
        assert not pairs.whole_row_attention_pays(56, 3)


def test_a_tpu_plan_traces_for_tpu(monkeypatch):
    tgt = _tpu_target()
    from jaxalign import parallel

    seen = []

    def spy(*args, **kwargs):
        seen.append(parallel.target_platform())
        raise RuntimeError("traced")

    monkeypatch.setattr(P, "build_program", spy)
    with pytest.raises(RuntimeError, match="traced"):
        P.plan(TINY, "tiny", "ches", tgt, SHAPES, P.run_config(None, ["mesh.data=1", "mesh.fsdp=4"]))
    assert seen == ["tpu"] and parallel.target_platform() == jax.default_backend()


def test_select_targets_pick_is_the_gather_to_the_bit():
    """The entangle programs' target pick (a masked sum over the vocabulary) equals the gather bit for bit,
    and both equal log-softmax at the target in float64 NumPy (to float32 rounding of the logsumexp)."""
    from jaxalign import logprobs

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 7, 50)) * 4).astype(np.float32)
    targets = rng.integers(0, 50, (3, 7))
    gathered = np.asarray(jax.jit(logprobs.token_logprobs)(jnp.asarray(logits), jnp.asarray(targets)))
    with logprobs.select_targets():
        selected = np.asarray(jax.jit(logprobs.token_logprobs)(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_array_equal(selected, gathered)
    x = logits.astype(np.float64)
    ref = np.take_along_axis(x, targets[..., None], -1)[..., 0] - np.log(np.exp(x).sum(-1))
    np.testing.assert_allclose(selected, ref, rtol=0, atol=1e-5)


def test_search_candidates_and_best(capsys):
    # Every (data, fsdp, tensor) with product 8 and tensor dividing the 4 heads, every grad_accum whose
    # micro-batch divides over data·fsdp, every remat: enumerated independently here.
    want = {((d, f, t), a, r) for d in range(1, 9) for f in range(1, 9) for t in (1, 2, 4)
            if d * f * t == 8 for a in (1, 2, 4, 8) if (8 // a) % (d * f) == 0 for r in (None, "full")}
    cands = P.candidates(8, SHAPES, 4, remats=(None, "full"))
    got = {(c["mesh"], c["grad_accum"], c["remat"]) for c in cands}
    assert got == want
    # Training: each with the activation constraints on and off (mesh.constrain_activations).
    assert len(cands) == 2 * len(want) and {c["constrain"] for c in cands} == {True, False}
    found = P.search(TINY, "tiny", "probe", P.target(cpu_devices=8, chip="v5e"), SHAPES, max_compiles=2,
                     remats=(None,), log=lambda _: None)
    assert len(found["tried"]) == 2 and found["best"] is not None
    best = found["best"]
    assert best["roofline"]["step_s"] == min(t["step_s"] for t in found["tried"])
    assert P.overrides_of(best)[:3] == [f"mesh.{k}={v}" for k, v in best["mesh"].items()]


def test_remat_recompute_is_counted_scanned_or_not():
    """Full remat runs each block's forward again: XLA's count of the unrolled step is ~4 forwards of the
    blocks (3 + the recomputation; the logits are not rematerialised), which `recompute_flops` must
    match; the scanned program's loop body is counted once by XLA, so its roofline takes the formula."""
    tgt = P.target(cpu_devices=8, chip="v5p")
    base = ["mesh.data=2", "mesh.fsdp=4", "model.remat=full"]
    unrolled = P.plan(TINY, "tiny", "train", tgt, SHAPES, P.run_config(None, base))
    want = _flops(TINY, SHAPES) + _flops(TINY, SHAPES, 1, False)  # 3 passes + the blocks' forward again
    assert unrolled["flops"]["recompute_per_chip"] * 8 == pytest.approx(_flops(TINY, SHAPES, 1, False), rel=1e-9)
    assert unrolled["flops"]["compiler_per_chip"] == pytest.approx(want / 8, rel=0.15)
    scanned = P.plan(TINY, "tiny", "train", tgt, SHAPES, P.run_config(None, base + ["model.scan_layers=true"]))
    assert scanned["flops"]["compiler_per_chip"] < 0.8 * want / 8  # the loop body once
    f = scanned["flops"]
    assert scanned["roofline_inputs"]["flops_per_chip"] == f["analytic_per_chip"] + f["recompute_per_chip"]
    assert f["analytic_per_chip"] + f["recompute_per_chip"] == pytest.approx(want / 8, rel=0.01)
    # a plan written before the recomputation was counted, refreshed from its own counts: the same roofline
    old = dict(scanned, flops={k: v for k, v in f.items() if k != "recompute_per_chip"},
               roofline_inputs=dict(scanned["roofline_inputs"],
                                    flops_per_chip=max(f["compiler_per_chip"], f["analytic_per_chip"])))
    assert P.with_recompute(old)["roofline"] == scanned["roofline"]
    assert P.with_recompute(scanned) is scanned


def test_search_skips_and_counts(capsys):
    """A budget nothing fits (1 MB per device): every compiled candidate fails, no candidate with the
    activation constraints off is compiled (its constrained twin did not fit), and every candidate is
    accounted for once: compiled, skipped for one of the three reasons, or left untried."""
    tgt = P.target(cpu_devices=8, chip="v5e", hbm_gb=1e-3)
    found = P.search(TINY, "tiny", "train", tgt, SHAPES, max_compiles=2, remats=(None, "full"), log=lambda _: None)
    assert found["best"] is None and len(found["tried"]) == 2
    assert all(t["constrain"] and not t["fits"] for t in found["tried"])
    assert found["skipped_unconstrained"] > 0 and found["skipped_dominated"] > 0
    parts = ("skipped_state", "skipped_dominated", "skipped_unconstrained", "not_tried")
    assert len(found["tried"]) + sum(found[k] for k in parts) == found["candidates"]
    message = P.search_summary(found)
    assert f"{found['skipped_unconstrained']} with the activation constraints off" in message


def test_cpu_plan_probe_generate_entangle():
    tgt = P.target(cpu_devices=8, chip="v5p")
    run = P.run_config(None, ["mesh.data=2", "mesh.fsdp=4"])
    probe = P.plan(TINY, "tiny", "probe", tgt, SHAPES, run)
    # One pair forward with logits; the same 5% of norms/softmax/log-softmax as the train step.
    assert probe["flops"]["compiler_per_chip"] == pytest.approx(_flops(TINY, SHAPES, 1) / 8, rel=0.15)
    gen = P.plan(TINY, "tiny", "generate", tgt, SHAPES, run)
    # XLA counts the decode loop's body once: prefill (P queries, P + R keys, logits of the last position)
    # plus one decode step (1 query).
    block, head, _ = _param_count(TINY)
    B, Pl, R = SHAPES.pairs, SHAPES.prompt_len, SHAPES.response_len
    attn = 4 * TINY["num_attention_heads"] * TINY["head_dim"] * TINY["num_hidden_layers"] * (Pl + R)
    view = B * (2 * block * Pl + 2 * head + attn * Pl) + B * (2 * block + 2 * head + attn)
    assert gen["flops"]["compiler_per_chip"] == pytest.approx(view / 8, rel=0.15)
    ent = P.plan(TINY, "tiny", "entangle", tgt, SHAPES, run, method="gram")
    assert ent["options"]["method"] == "gram" and ent["memory"]["params_bytes"] == 4 * _param_count(TINY)[2]
    # --shard-params: the weights over fsdp = 4 (the norm scales whole), gathered before use; the pairs
    # still split over all 8 devices (a device's FLOPs are its own pair's, not every pair's).
    sh = P.plan(TINY, "tiny", "entangle", tgt, SHAPES, run, method="gram", shard_params=True)
    norms = (2 * TINY["num_hidden_layers"] + 1) * TINY["hidden_size"]
    assert sh["options"]["shard_params"] and sh["memory"]["params_bytes"] == 4 * (
        (_param_count(TINY)[2] - norms) // 4 + norms)
    assert sh["collectives"]["all-gather"]["count"] > 0 and not ent["collectives"]["all-gather"]["count"]
    assert sh["flops"]["compiler_per_chip"] == pytest.approx(ent["flops"]["compiler_per_chip"], rel=0.05)


SCAN_HLO = """HloModule scan

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %n = s32[]{:T(128)} constant(5)
  %p = (s32[]{:T(128)}, f32[4,8]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%body (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[]{:T(128)}, f32[4,8]{1,0}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%q), index=1
  %ag = f32[16,8]{1,0} all-gather(%x), replica_groups=[1,4]<=[4], dimensions={0}
  %y = f32[4,8]{1,0} slice(%ag), slice={[0:4], [0:8]}
  ROOT %t = (s32[]{:T(128)}, f32[4,8]{1,0}) tuple(%j, %y)
}

ENTRY %main (a: f32[4,8]) -> (s32[], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %z = f32[4,8]{1,0} negate(%a)
  %init = (s32[]{:T(128)}, f32[4,8]{1,0}) tuple(%c0, %z)
  ROOT %w = (s32[]{:T(128)}, f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_loop_without_known_trip_count_counts_from_its_condition():
    """A ``lax.scan`` loop as libtpu leaves it (no ``known_trip_count``): ``i < constant(5)`` runs 5 times."""
    c = P.collectives(SCAN_HLO, 4)
    assert c["all-gather"]["count"] == 5 and c["all-gather"]["bytes"] == 5 * 16 * 8 * 4
    # result bytes: negate 128 outside, the condition's compare 1 (counted once); all-gather 512 and
    # slice 128 in the body, 5 times
    assert P.loop_bytes_factor(SCAN_HLO) == pytest.approx((128 + 1 + 5 * (512 + 128)) / (128 + 1 + 512 + 128))


def test_async_collective_fusion_in_a_loop_counts_once_per_loop():
    """libtpu sinks one weight gather into a windowed-matmul loop as an ``async_collective_fusion`` whose
    progress counters ride along the iterations: one gather per run of the loop, not one per iteration."""
    hlo = SCAN_HLO.replace(
        "  %ag = f32[16,8]{1,0} all-gather(%x), replica_groups=[1,4]<=[4], dimensions={0}\n",
        "  %ag = f32[16,8]{1,0} fusion(%x), kind=kOutput, calls=%async_collective_fusion.1\n")
    hlo = hlo.replace("ENTRY", "%async_collective_fusion.1 (x: f32[4,8]) -> f32[16,8] {\n"
                      "  %x1 = f32[4,8]{1,0} parameter(0)\n"
                      "  ROOT %g = f32[16,8]{1,0} all-gather(%x1), replica_groups=[1,4]<=[4], dimensions={0}\n"
                      "}\n\nENTRY")
    c = P.collectives(hlo, 4)
    assert c["all-gather"]["count"] == 1 and c["all-gather"]["bytes"] == 16 * 8 * 4


def test_a_refused_program_prints_its_memory_and_the_reason():
    """libtpu refuses a program over its HBM at compile time: the plan has no FLOPs, and still prints."""
    msg = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory. HLO temporaries (20.5G)"
    mem = P._refused_memory(msg, {"params": 2 * 10**9, "optimizer": 4 * 10**9}, 17.18e9)
    assert mem["temp_bytes"] == int(20.5 * 2**30) and mem["total_bytes"] == 6 * 10**9 + int(20.5 * 2**30)
    p = {"model": "m", "params": 1e9, "job": "train", "target": "v5e:4x4", "chips": 16,
         "mesh": {"data": 1, "fsdp": 16, "tensor": 1, "expert": 1}, "options": {}, "compile_s": 1.0,
         "shapes": {"pairs": 16, "prompt_len": 512, "response_len": 512}, "memory": mem}
    text = P.format_plan(p)
    assert "DOES NOT FIT: the compiler refused the program" in text and "HLO temporaries (20.5G)" in text
    # libtpu's other wording gives the whole program's use: the temporaries are the rest after the arguments.
    other = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory "
             "in memory space hbm. Used 31.39G of 31.25G hbm. Exceeded hbm capacity by 152.06M.")
    mem = P._refused_memory(other, {"params": 3 * 10**9}, 32e9)
    assert mem["total_bytes"] == int(31.39 * 2**30) and mem["temp_bytes"] == int(31.39 * 2**30) - 3 * 10**9
    old = dict(p, memory={"params_bytes": 3 * 10**9, "fits": False, "compiler_error": other, "temp_bytes": None,
                          "total_bytes": 3 * 10**9, "hbm_bytes": 32 * 10**9})
    assert P.with_reparsed_refusal(old)["memory"]["total_bytes"] == int(31.39 * 2**30)


def test_in_place_updates_are_not_loop_traffic():
    """A scan writes each iteration's slice into a stacked buffer whose result type is the whole buffer:
    ``dynamic-update-slice`` results are left out of the loop weighting."""
    hlo = SCAN_HLO.replace("%y = f32[4,8]{1,0} slice(%ag), slice={[0:4], [0:8]}",
                           "%y = f32[4,8]{1,0} dynamic-update-slice(%x, %x, %j, %j)")
    assert P.loop_bytes_factor(hlo) == pytest.approx((128 + 1 + 5 * 512) / (128 + 1 + 512))
