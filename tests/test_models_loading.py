"""Loading and saving Hugging Face folders: single and sharded safetensors, save → transformers, a mesh,
lazy tensors, and the errors users see (each naming the file, tensor or model_type)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers: hf_tiny, tiny_tokenizer

import hf_tiny  # noqa: E402
import tiny_tokenizer  # noqa: E402

from jaxalign import parallel  # noqa: E402
from jaxalign.errors import ModelError  # noqa: E402
from jaxalign.models import load_pretrained, save_pretrained, supported_model_types  # noqa: E402
from jaxalign.models.hf_folder import SafetensorsCheckpoint  # noqa: E402

IDS = np.array([[5, 17, 99, 3, 42, 8, 11, 64, 7], [0, 0, 0, 7, 120, 33, 2, 90, 1]], np.int32)
MASK = np.array([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int32)
TYPES = ["llama", "qwen2", "gpt2", "gpt_neox"]


def torch_logits(hf_model, ids=IDS, mask=MASK) -> np.ndarray:
    """transformers' logits with positions from the mask (HF's default ``arange`` ignores left padding)."""
    import torch

    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                        position_ids=torch.tensor(positions).long()).logits.numpy()


def logits(model, ids=IDS, mask=MASK) -> np.ndarray:
    return np.asarray(model(ids, mask).logits)


def assert_close_valid(got, want, tol=1e-4):
    np.testing.assert_allclose(got[MASK > 0], want[MASK > 0], atol=tol, rtol=tol)


@pytest.fixture(scope="module", params=TYPES)
def tiny(request, tmp_path_factory):
    """``(model_type, folder, hf_model)``: a tiny random model saved with its torch twin."""
    path = tmp_path_factory.mktemp(request.param)
    hf_model = hf_tiny.make_model(request.param, seed=1)
    hf_model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.make_tiny_tokenizer(path)
    return request.param, path, hf_model


def _write_sharded(src: Path, dst: Path) -> None:
    """Splits ``src``'s ``model.safetensors`` into two shards + index (as transformers shards)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    dst.mkdir()
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_folder_logits_equal_transformers(tiny):
    model_type, path, hf_model = tiny
    model, tok = load_pretrained(path)
    assert_close_valid(logits(model), torch_logits(hf_model))
    assert tok("hello")["input_ids"] == [tiny_tokenizer.SPECIAL_IDS[tiny_tokenizer.BOS], 264]


def test_sharded_checkpoint_equals_single_file(tiny, tmp_path):
    model_type, path, hf_model = tiny
    _write_sharded(path, tmp_path / "sharded")
    sharded, tok = load_pretrained(tmp_path / "sharded")
    assert tok is None  # no tokenizer files in that folder
    single, _ = load_pretrained(path)
    np.testing.assert_array_equal(logits(sharded), logits(single))
    assert_close_valid(logits(sharded), torch_logits(hf_model))


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_save_pretrained_loads_in_transformers(tiny, tmp_path, max_shard_bytes):
    import torch
    import transformers

    model_type, path, hf_model = tiny
    model, tok = load_pretrained(path)
    out = save_pretrained(model, tok, tmp_path / "saved", max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in out.iterdir())
    assert ("model.safetensors.index.json" in files) == (max_shard_bytes is not None), files
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert reloaded.config.model_type == model_type
    assert_close_valid(torch_logits(reloaded), torch_logits(hf_model))
    again, tok2 = load_pretrained(out)
    np.testing.assert_array_equal(logits(again), logits(model))
    text = "hello <|im_end|> wörld"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert transformers.AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == tok(text)["input_ids"]


def test_save_over_sharded_folder_removes_stale_shards(tmp_path):
    hf_model = hf_tiny.make_model("gpt2", seed=5)
    hf_model.save_pretrained(tmp_path / "src", safe_serialization=True)
    model, _ = load_pretrained(tmp_path / "src")
    save_pretrained(model, None, tmp_path / "out", max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    save_pretrained(model, None, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_tied_embeddings_and_bfloat16(tmp_path):
    import jax.numpy as jnp
    import ml_dtypes
    import torch
    import transformers
    from safetensors import safe_open

    hf_model = hf_tiny.make_model("llama", seed=2, tie_word_embeddings=True)
    hf_model.save_pretrained(tmp_path / "tied", safe_serialization=True)
    model, _ = load_pretrained(tmp_path / "tied")
    assert_close_valid(logits(model), torch_logits(hf_model))
    model16, _ = load_pretrained(tmp_path / "tied", dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(jax.tree.map(lambda x: x.dtype, jax.tree.leaves(model16)))
    assert all(d == jnp.bfloat16 for d in leaves), set(leaves)
    assert_close_valid(logits(model16), torch_logits(hf_model), tol=0.15)
    out = save_pretrained(model16, None, tmp_path / "saved16")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in f.keys()  # tied: transformers re-ties it
        assert f.get_tensor("model.norm.weight").dtype == ml_dtypes.bfloat16
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert_close_valid(torch_logits(reloaded), np.asarray(model16(IDS, MASK).logits, np.float32), tol=0.05)


def test_mesh_loading_equals_one_device(tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    hf_model = hf_tiny.make_model("llama", seed=3)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    mesh = parallel.make_mesh((2, 2, 2))
    model, _ = load_pretrained(tmp_path, mesh=mesh)
    emb = model.embed.embedding[...]
    assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
    assert_close_valid(logits(model), torch_logits(hf_model))


def test_lazy_tensors_read_slices(tiny):
    _, path, hf_model = tiny
    name, ref = next(iter(hf_model.state_dict().items()))
    with SafetensorsCheckpoint(path) as ckpt:
        t = ckpt[name]
        assert t.shape == tuple(ref.shape) and t.dtype == np.float32
        np.testing.assert_array_equal(t[1:3], ref.numpy()[1:3])
        np.testing.assert_array_equal(np.asarray(t), ref.numpy())


# --- errors ---------------------------------------------------------------------------------------------

@pytest.fixture
def llama_folder(tmp_path):
    return hf_tiny.make_tiny("llama", tmp_path / "llama")


def test_error_unsupported_model_type(llama_folder):
    cfg = json.loads((llama_folder / "config.json").read_text())
    (llama_folder / "config.json").write_text(json.dumps(cfg | {"model_type": "mamba"}))
    with pytest.raises(ModelError, match=r"'mamba' is not supported") as err:
        load_pretrained(llama_folder)
    assert str(llama_folder) in str(err.value)
    assert all(t in str(err.value) for t in supported_model_types())
    assert {"llama", "gpt2", "gpt_neox", "qwen2"} <= set(supported_model_types())


def test_error_missing_safetensors(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    (llama_folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match=r"no model\.safetensors and no model\.safetensors\.index\.json.*"
                                         r"pytorch_model\.bin.*pickle"):
        load_pretrained(llama_folder)


def test_error_missing_shard(llama_folder, tmp_path):
    _write_sharded(llama_folder, tmp_path / "sharded")
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model-00002-of-00002\.safetensors"):
        load_pretrained(tmp_path / "sharded")


def test_error_missing_config(llama_folder):
    (llama_folder / "config.json").unlink()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_pretrained(llama_folder)


def test_error_wrong_tensor_shape_and_name(llama_folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(llama_folder / "model.safetensors"))
    bad = "model.layers.1.self_attn.k_proj.weight"
    tensors[bad] = np.zeros((3, 64), np.float32)
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, str(llama_folder / "model.safetensors"))
    with pytest.raises(ModelError) as err:
        load_pretrained(llama_folder)
    msg = str(err.value)
    assert bad in msg and "(3, 64)" in msg, msg
    assert "model.layers.0.mlp.extra.weight" in msg, msg
    assert str(llama_folder) in msg


def test_error_missing_tensor(llama_folder):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(llama_folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(llama_folder / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing tensor for parameter final_norm"):
        load_pretrained(llama_folder)


def test_error_path_neither_folder_nor_gguf(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelError, match=r"weights\.txt: neither a model folder nor a \.gguf file"):
        load_pretrained(tmp_path / "weights.txt")
    with pytest.raises(ModelError, match=r"nothing-here: no such model folder"):
        load_pretrained(tmp_path / "nothing-here")
