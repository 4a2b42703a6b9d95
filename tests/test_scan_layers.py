"""``model.scan_layers``: the blocks stacked on a leading layer axis and run with ``lax.scan``.

* A tiny Llama scanned (its blocks stacked from the unrolled model's own weights) against the same model
  unrolled: logits, every block's output, every parameter's gradient (with remat inside the scanned body),
  the KV-cache path (prompt, then continuation) and a jitted call.
* Loaded from ``transformers`` weights and scanned: logits against ``transformers``' PyTorch forward;
  exported back: the very tensors of the file.
* Layers whose inputs alternate (Gemma 2's sliding-window and full-attention masks; Gemma 3's two RoPE
  bases too) scan, each block selecting its own: against ``transformers`` and the unrolled model, with
  windows shorter than the sequence so the two masks differ.
* Layers that cannot share one program (dense and MoE layers mixed, a per-layer attention scale, LoRA
  adapters) give a ``ModelError`` naming the option; the stacked axis is never sharded.
* ``jaxalign plan`` with ``model.scan_layers=true``: the same per-device parameter bytes as unrolled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from jax.sharding import PartitionSpec

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402

from jaxalign import parallel  # noqa: E402
from jaxalign.errors import ModelError  # noqa: E402
from jaxalign.models import base, params, registry, scan  # noqa: E402
from jaxalign.models.llama import Llama, LlamaConfig  # noqa: E402

# float32 throughout; the scanned program runs the same operations in another loop structure, so XLA may
# fuse and reassociate differently: a few ulps of values of order 1 (observed 3e-8), far below any bug.
TOL = 1e-5
# against transformers' PyTorch forward (another library's kernels), as tests/test_models_parity.py
TOL_HF = 1e-4

CFG = LlamaConfig("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=4)


def _pair(remat=None):
    """The same weights twice: unrolled, and scanned (stacked from a copy of it)."""
    unrolled = Llama(CFG, rngs=nnx.Rngs(0), remat=remat)
    scanned = base.configure(nnx.clone(unrolled), scan_layers=True)
    return unrolled, scanned


def _batch():
    ids = jnp.asarray(np.random.default_rng(0).integers(1, CFG.vocab_size, (2, 6)))
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # one left-padded row
    return ids, mask


def _close(a, b, tol=TOL, msg=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol, err_msg=msg)


def test_stacked_parameters_have_a_layer_axis():
    unrolled, scanned = _pair()
    assert isinstance(scanned.layers, scan.ScannedLayers) and len(scanned.layers) == CFG.num_layers
    kernel = scanned.layers.block.mlp.up_proj.kernel
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "mlp")
    for i in range(CFG.num_layers):
        np.testing.assert_array_equal(kernel[...][i], unrolled.layers[i].mlp.up_proj.kernel[...])
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    assert parallel.logical_to_spec(("layers", "embed", "mlp"), kernel[...].shape, mesh) == PartitionSpec(
        None, None, None)
    back = base.configure(nnx.clone(scanned), scan_layers=False)
    assert [layer.attn.layer for layer in back.layers] == list(range(CFG.num_layers))
    np.testing.assert_array_equal(back.layers[2].attn.q_proj.kernel[...], unrolled.layers[2].attn.q_proj.kernel[...])


@pytest.mark.parametrize("remat", [None, "full"])
def test_scanned_forward_and_gradients_equal_unrolled(remat):
    unrolled, scanned = _pair(remat)
    ids, mask = _batch()
    a = unrolled(ids, mask, return_layer_hidden=True)
    b = scanned(ids, mask, return_layer_hidden=True)
    _close(b.logits, a.logits, msg="logits")
    assert len(b.layer_hidden) == CFG.num_layers + 1
    for i, (x, y) in enumerate(zip(b.layer_hidden, a.layer_hidden)):
        _close(x, y, msg=f"layer_hidden {i}")

    def loss(model):
        logp = jax.nn.log_softmax(model(ids, mask).logits)
        return jnp.sum(logp[..., 0] * mask)

    ga, gb = nnx.grad(loss)(unrolled), nnx.grad(loss)(scanned)
    flat_a = dict(nnx.to_flat_state(ga))
    for path, var in nnx.to_flat_state(gb):
        if path[:2] != ("layers", "block"):
            _close(var[...], flat_a[path][...], msg=str(path))
            continue
        for i in range(CFG.num_layers):
            _close(var[...][i], flat_a[("layers", i) + path[2:]][...], msg=f"layer {i} {path[2:]}")


def test_scanned_cache_path_and_jit_equal_unrolled():
    unrolled, scanned = _pair()
    ids, mask = _batch()
    outs = []
    for model in (unrolled, scanned):
        first = model(ids[:, :4], mask[:, :4], cache=model.init_cache(2, 6))
        second = model(ids[:, 4:], mask[:, 4:], cache=first.cache.repeat(1))
        outs.append((first, second))
    (a1, a2), (b1, b2) = outs
    _close(b1.logits, a1.logits, msg="prompt")
    _close(b2.logits, a2.logits, msg="continuation")
    for k_a, k_b in zip(a2.cache.keys + a2.cache.values, b2.cache.keys + b2.cache.values):
        _close(k_b, k_a, msg="cache")
    assert int(b2.cache.end) == 6
    jitted = nnx.jit(lambda m, i, k: m(i, k).logits)
    _close(jitted(scanned, ids, mask), unrolled(ids, mask).logits, msg="jit")


def test_loaded_scanned_model_matches_transformers_and_exports_the_file(tmp_path):
    path = hf_tiny.make_tiny("llama", tmp_path / "llama")
    hf = hf_tiny.make_model("llama")
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    cfg = registry.config_from_hf(json.loads((path / "config.json").read_text()))
    model = base.configure(params.from_hf_tensors(None, cfg, tensors), scan_layers=True)
    assert isinstance(model.layers, scan.ScannedLayers)
    ids = np.random.default_rng(1).integers(3, hf_tiny.VOCAB, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    pos = np.where(mask > 0, np.maximum(np.cumsum(mask, -1) - 1, 0), 1)  # HF's positions of a left pad
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    valid = mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() < TOL_HF
    out = params.to_hf_tensors(model)
    assert sorted(out) == sorted(tensors)
    for name, value in out.items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_alternating_windows_scan_and_match_transformers(tmp_path, model_type):
    path = hf_tiny.make_tiny(model_type, tmp_path / model_type)
    hf = hf_tiny.make_model(model_type)
    cfg = registry.config_from_hf(json.loads((path / "config.json").read_text()))
    assert len({cfg.window(i) for i in range(cfg.num_layers)}) == 2  # the two masks differ (window 4 < 9)
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    unrolled = params.from_hf_tensors(None, cfg, tensors)
    scanned = base.configure(nnx.clone(unrolled), scan_layers=True)
    assert isinstance(scanned.layers, scan.ScannedLayers)
    ids = np.random.default_rng(2).integers(3, hf_tiny.VOCAB, (2, 9))
    mask = np.ones((2, 9), np.int64)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = scanned(jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(ours.logits) - ref).max() < TOL_HF
    _close(ours.logits, unrolled(jnp.asarray(ids), jnp.asarray(mask)).logits, msg="unrolled")
    first = scanned(jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), cache=scanned.init_cache(2, 9))
    second = scanned(jnp.asarray(ids[:, 6:]), jnp.asarray(mask[:, 6:]), cache=first.cache)
    _close(second.logits, ours.logits[:, 6:], msg="cache path")


@pytest.mark.parametrize("model_type,overrides,says", [
    ("qwen3_moe", dict(mlp_only_layers=[0]), "differs from layer 0"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "differs from layer 0"),
])
def test_layers_that_differ_name_the_option(model_type, overrides, says):
    cfg = registry.config_from_hf(hf_tiny.hf_config(model_type, **overrides).to_dict())
    model = params.abstract_model(model_type, cfg)
    with pytest.raises(ModelError, match=f"model.scan_layers.*{says}|{says}.*model.scan_layers"):
        base.configure(model, scan_layers=True)
    assert [layer.attn.layer for layer in model.layers] == list(range(cfg.num_layers))  # left unscanned


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "olmo2"])
def test_other_families_scan_to_the_same_logits(model_type):
    cfg = registry.config_from_hf(hf_tiny.hf_config(model_type).to_dict())
    _, cls, _ = registry.get_family(model_type)
    unrolled = cls(cfg, rngs=nnx.Rngs(0))
    scanned = base.configure(nnx.clone(unrolled), scan_layers=True)
    assert isinstance(scanned.layers, scan.ScannedLayers)
    ids, mask = _batch()
    _close(scanned(ids % cfg.vocab_size, mask).logits, unrolled(ids % cfg.vocab_size, mask).logits)


def test_lora_adapters_are_refused():
    from jaxalign.models import lora

    model = lora.apply(Llama(CFG, rngs=nnx.Rngs(0)), lora.LoRASettings(target="all", r=2, alpha=4.0), seed=0)
    with pytest.raises(ModelError, match="model.scan_layers.*LoRA"):
        base.configure(model, scan_layers=True)


def test_plan_parameter_bytes_agree_scanned_and_unrolled():
    from jaxalign.jobs import plan as P

    hf = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    shapes, tgt = P.Shapes(pairs=4, prompt_len=8, response_len=8), P.target(cpu_devices=4)
    plans = [P.plan(hf, "tiny", "train", tgt, shapes, P.run_config(None, [
        "mesh.data=1", "mesh.fsdp=4", "model.remat=full", "data.fused_pairs=true", f"model.scan_layers={s}"]))
        for s in ("false", "true")]
    a, b = (p["memory"] for p in plans)
    assert b["params_bytes"] == a["params_bytes"] and b["optimizer_bytes"] == a["optimizer_bytes"]
    assert "model.scan_layers=true" in P.overrides_of(plans[1])
    assert plans[1]["options"]["scan_layers"] is True
