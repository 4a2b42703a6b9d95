"""Mixture-of-experts GGUF files: Mixtral (llama.cpp's ``llama`` with ``expert_count``) and Qwen3-MoE
(``qwen3moe``), written here from a tiny HF folder the way llama.cpp's converter writes them (router as
``ffn_gate_inp``, each expert matrix stacked over the experts into ``ffn_{gate,up,down}_exps``, Llama's q/k
rows permuted), and checked against the HF folder they came from: our model from the folder, transformers
on the folder, and for Qwen3-MoE transformers' own GGUF loader. transformers reads no Mixtral GGUF (it
takes a ``llama`` file as ``LlamaForCausalLM`` and has no name for the stacked experts).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402
import test_models_parity as parity  # noqa: E402
from test_models_gguf import _permute, write_tensors  # noqa: E402  (llama.cpp's q/k row order)

from jaxalign.errors import ModelError  # noqa: E402
from jaxalign.models import load_pretrained  # noqa: E402
from jaxalign.models.gguf_file import read_gguf  # noqa: E402

# llama.cpp's qwen3moe has experts in every layer and always renormalises the top-k probabilities; its
# llama (Mixtral) has no sliding window. The tiny configs follow, so the GGUF can say the same model.
CASES = {"llama": ("mixtral", dict(sliding_window=None)),
         "qwen3moe": ("qwen3_moe", dict(mlp_only_layers=[], norm_topk_prob=True))}
_EXPERT_NAMES = {"llama": ("block_sparse_moe.", {"w1": "gate", "w3": "up", "w2": "down"}),
                 "qwen3moe": ("mlp.", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"})}
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def _gguf_tensors(c: dict, hf: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """HF tensors renamed and stacked as llama.cpp's converter does (per block: router, then for each
    expert matrix ``np.stack`` over the experts of HF's ``[out, in]`` weights)."""
    block, experts = _EXPERT_NAMES[arch]
    E = c.get("num_local_experts") or c["num_experts"]
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(c["num_hidden_layers"]):
        L = f"model.layers.{i}."
        for name, gname in _NAMES.items():
            if L + name + ".weight" not in hf:
                continue
            w = hf[L + name + ".weight"]
            if arch == "llama" and gname in ("attn_q", "attn_k"):  # interleaved RoPE: rows permuted
                w = _permute(w, c["num_attention_heads" if gname == "attn_q" else "num_key_value_heads"])
            out[f"blk.{i}.{gname}.weight"] = w
        out[f"blk.{i}.ffn_gate_inp.weight"] = hf[L + block + "gate.weight"]
        for name, kind in experts.items():
            out[f"blk.{i}.ffn_{kind}_exps.weight"] = np.stack(
                [hf[f"{L}{block}experts.{e}.{name}.weight"] for e in range(E)])
    return out


def write_moe_gguf(folder: Path, path: Path, arch: str, quant: str = "F32", extra: dict | None = None) -> Path:
    """The HF folder ``folder`` as llama.cpp converts it to ``arch`` (float32, or ``quant`` for matrices),
    plus the ``extra`` tensors."""
    import gguf

    c = json.loads((folder / "config.json").read_text())
    hf = {k: v.astype(np.float32) for k, v in safetensors.numpy.load_file(folder / "model.safetensors").items()}
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    theta = (c.get("rope_parameters") or {}).get("rope_theta") or c["rope_theta"]
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [("vocab_size", c["vocab_size"]), ("context_length", c["max_position_embeddings"]),
                       ("embedding_length", c["hidden_size"]), ("feed_forward_length", c["intermediate_size"]),
                       ("block_count", c["num_hidden_layers"]), ("attention.head_count", c["num_attention_heads"]),
                       ("attention.head_count_kv", c["num_key_value_heads"]), ("rope.dimension_count", head_dim),
                       ("expert_count", c.get("num_local_experts") or c["num_experts"]),
                       ("expert_used_count", c["num_experts_per_tok"])]:
        w.add_uint32(f"{arch}.{key}", int(value))
    if arch == "qwen3moe":
        for key, value in [("attention.key_length", head_dim), ("attention.value_length", head_dim),
                           ("expert_feed_forward_length", c["moe_intermediate_size"])]:
            w.add_uint32(f"{arch}.{key}", int(value))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", theta)
    return write_tensors(w, _gguf_tensors(c, hf, arch) | (extra or {}), quant, path)


def _logits(model, ids, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)


def _torch_logits(hf_model, ids, mask) -> np.ndarray:
    pos = np.where(mask > 0, np.maximum(np.cumsum(mask, -1) - 1, 0), 1)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("arch", list(CASES))
def test_moe_gguf_equals_hf_folder_and_transformers(arch, tmp_path):
    import transformers

    model_type, overrides = CASES[arch]
    folder = hf_tiny.make_tiny(model_type, tmp_path / "hf", **overrides)
    path = write_moe_gguf(folder, tmp_path / f"{arch}.gguf", arch)
    from_gguf, tok = load_pretrained(path)
    from_folder, _ = load_pretrained(folder)
    assert tok is None
    # the files hold no tokenizer, hence no special token ids; the rest of the config is the folder's
    assert dataclasses.replace(from_gguf.cfg, bos_token_id=1, eos_token_id=2, pad_token_id=0) == from_folder.cfg
    ids, mask = parity._batch("left")
    got, where = _logits(from_gguf, ids, mask), mask > 0
    # the same float32 weights through two readers into the same code: equal up to nothing
    np.testing.assert_array_equal(got, _logits(from_folder, ids, mask))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert parity._maxdiff(got, _torch_logits(hf_model, ids, mask), where) < parity.TOL
    if arch == "qwen3moe":  # transformers' GGUF loader drops expert_feed_forward_length: passed by hand
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32,
            moe_intermediate_size=from_folder.cfg.moe_intermediate_size).eval()
        assert parity._maxdiff(got, _torch_logits(ref, ids, mask), where) < parity.TOL


def test_quantised_experts_are_dequantised_one_slice_each(tmp_path):
    """Each expert's HF tensor is its slice of the stacked Q8_0 tensor, dequantised whole by the gguf
    package; the shapes are HF's per-expert ``[out, in]``."""
    import gguf

    folder = hf_tiny.make_tiny("mixtral", tmp_path / "hf", sliding_window=None)
    path = write_moe_gguf(folder, tmp_path / "q.gguf", "llama", quant="Q8_0")
    config, tensors, g = read_gguf(path)
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    hf = safetensors.numpy.load_file(folder / "model.safetensors")
    for gname, hf_name in [("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")]:
        t = g.tensors[f"blk.1.{gname}.weight"]
        whole = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.Q8_0)
        for e in range(4):
            name = f"model.layers.1.block_sparse_moe.experts.{e}.{hf_name}.weight"
            assert tensors[name].shape == hf[name].shape
            np.testing.assert_array_equal(np.asarray(tensors[name]), whole[e])


def test_dense_tensor_in_a_moe_file_is_refused_by_name(tmp_path):
    folder = hf_tiny.make_tiny("qwen3_moe", tmp_path / "hf", mlp_only_layers=[], norm_topk_prob=True)
    dense = np.zeros((96, 64), np.float32)  # [intermediate_size, hidden]: a dense MLP llama.cpp's qwen3moe lacks
    path = write_moe_gguf(folder, tmp_path / "d.gguf", "qwen3moe", extra={"blk.0.ffn_gate.weight": dense})
    with pytest.raises(ModelError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: this qwen3_moe config has no"):
        load_pretrained(path)
