"""GGUF loading: config and tensor names, llama.cpp's q/k permutation, dequantisation, the torch-free
tokenizer, and SmolLM2-135M-Instruct against transformers' own GGUF loader (torch, tests only; its greedy
"Paris" answer is checked in test_generate.py).

Tiny GGUF files are written here with ``gguf.GGUFWriter`` from tiny random HF models, applying
llama.cpp's conversion (names, q/k row permutation, GPT-2 transposes) independently of the loader.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers: hf_tiny, smollm, tiny_tokenizer

import hf_tiny  # noqa: E402
import tiny_tokenizer  # noqa: E402
from smollm import smollm_gguf, smollm_model  # noqa: E402

from jaxalign.errors import ModelError  # noqa: E402
from jaxalign.models import load_pretrained, tokenizer_from_gguf  # noqa: E402
from jaxalign.models.gguf_file import GGUFFile, hf_config  # noqa: E402
from jaxalign.models.tokenizer import tokenizer_from_gguf_metadata  # noqa: E402

TOKENIZER_TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading spaces,\ttabs\n\nand blank lines\n",
    "numbers 12345 3.14159 -7e10 1,000,000",
    "unicode: héllo wörld — 日本語 😀 ﬁ Привет",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
    " ",
    "a" * 40,
]
CHAT = [[{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2=?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 × 3?"}]]


# --- writing tiny GGUF files (llama.cpp's conversion, written out here) ---------------------------------

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF q/k row order: per head, the two rotate-half halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_llama_tensors(state: dict, cfg) -> dict[str, np.ndarray]:
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state and not cfg.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    names |= {f"self_attn.{x}_proj.bias": f"attn_{x}.bias" for x in "qkv"}  # Qwen2
    permute = cfg.model_type == "llama"  # llama.cpp permutes q/k of llama (interleaved RoPE) only
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            if f"model.layers.{i}.{hf}" not in state:
                continue
            w = state[f"model.layers.{i}.{hf}"]
            if permute and gg.startswith("attn_q."):
                w = _permute(w, cfg.num_attention_heads)
            elif permute and gg.startswith("attn_k."):
                w = _permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}"] = w
    return out


def _gguf_gpt2_tensors(state: dict, cfg) -> dict[str, np.ndarray]:
    out = {"token_embd.weight": state["transformer.wte.weight"],
           "position_embd.weight": state["transformer.wpe.weight"],
           "output_norm.weight": state["transformer.ln_f.weight"],
           "output_norm.bias": state["transformer.ln_f.bias"],
           "output.weight": state["transformer.wte.weight"]}  # llama.cpp writes the tied copy for GPT-2
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(cfg.n_layer):
        for hf, gg in names.items():
            w, b = state[f"transformer.h.{i}.{hf}.weight"], state[f"transformer.h.{i}.{hf}.bias"]
            out[f"blk.{i}.{gg}.weight"] = w if hf.startswith("ln") else np.ascontiguousarray(w.T)
            out[f"blk.{i}.{gg}.bias"] = b
    return out


def _add_tiny_tokenizer(w, vocab_size: int) -> None:
    import json

    tok_json = json.loads(Path(tiny_tokenizer.make_tiny_tokenizer(w._jaxalign_tmp / "tok")).joinpath(
        "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    tokens = [None] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    types = [3 if i < len(tiny_tokenizer.SPECIALS) else 1 for i in range(vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in tiny_tokenizer.MERGES])
    w.add_bos_token_id(tiny_tokenizer.SPECIAL_IDS[tiny_tokenizer.BOS])
    w.add_eos_token_id(tiny_tokenizer.SPECIAL_IDS[tiny_tokenizer.EOS])
    w.add_pad_token_id(tiny_tokenizer.SPECIAL_IDS[tiny_tokenizer.PAD])
    w.add_add_bos_token(False)
    w.add_chat_template(tiny_tokenizer.CHATML_TEMPLATE)


def write_tiny_gguf(hf_model, path: Path, quant: str = "F32", tokenizer: bool = True) -> Path:
    """Writes the torch model ``hf_model`` as llama.cpp would convert it (``quant``: F32, F16 or Q8_0)."""
    import gguf

    cfg = hf_model.config
    state = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    arch = "gpt2" if cfg.model_type == "gpt2" else cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w._jaxalign_tmp = path.parent
    if arch == "gpt2":
        tensors = _gguf_gpt2_tensors(state, cfg)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        tensors = _gguf_llama_tensors(state, cfg)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        _add_tiny_tokenizer(w, cfg.vocab_size)
    return write_tensors(w, tensors, quant, path)


def write_tensors(w, tensors: dict[str, np.ndarray], quant: str, path: Path) -> Path:
    """Adds ``tensors`` to the ``gguf.GGUFWriter`` ``w`` (vectors as float32, matrices as ``quant``: F32,
    F16 or Q8_0) and writes the file ``path``."""
    import gguf

    for name, t in tensors.items():
        if t.ndim == 1 or quant == "F32":
            w.add_tensor(name, t.astype(np.float32))
        elif quant == "F16":
            w.add_tensor(name, t.astype(np.float16))
        else:
            qtype = getattr(gguf.GGMLQuantizationType, quant)
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _torch_logits(hf_model, ids, mask):
    import torch

    mask = np.asarray(mask)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # HF's default is arange, even under left padding
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(np.asarray(ids)).long(),
                        attention_mask=torch.tensor(mask).long(),
                        position_ids=torch.tensor(positions).long()).logits.numpy()


IDS = np.array([[5, 17, 99, 3, 42, 8, 11, 64], [0, 0, 7, 120, 33, 2, 90, 1]], np.int32)
MASK = np.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]], np.int32)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_tiny_gguf_f32_equals_transformers(tmp_path, model_type):
    """A float32 GGUF written as llama.cpp does loads to the original HF model's logits."""
    hf_model = hf_tiny.make_model(model_type, vocab_size=272)
    path = write_tiny_gguf(hf_model, tmp_path / "tiny.gguf", "F32")
    model, tok = load_pretrained(path)
    got = np.asarray(model(IDS, MASK).logits)
    want = _torch_logits(hf_model, IDS, MASK)
    np.testing.assert_allclose(got[MASK > 0], want[MASK > 0], atol=1e-4, rtol=1e-4)
    assert tok("hello hel")["input_ids"] == [264, tiny_tokenizer.byte_id(ord(" ")), 261,
                                             tiny_tokenizer.byte_id(ord("l"))]  # merges 261 he, 264 hello


def test_tiny_gguf_q8_0_equals_transformers_gguf_loader(tmp_path):
    """Quantised (Q8_0) tensors dequantise as transformers' GGUF loader does: same logits."""
    import torch
    import transformers

    hf_model = hf_tiny.make_model("llama", vocab_size=272)
    path = write_tiny_gguf(hf_model, tmp_path / "tiny-q8.gguf", "Q8_0")
    model, _ = load_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    got = np.asarray(model(IDS, MASK).logits)
    np.testing.assert_allclose(got[MASK > 0], _torch_logits(ref, IDS, MASK)[MASK > 0], atol=1e-4, rtol=1e-4)
    # and close to the unquantised model (Q8_0 keeps ~2-3 significant digits)
    assert np.abs(got - _torch_logits(hf_model, IDS, MASK))[MASK > 0].max() < 0.5


def test_gguf_config_keys(tmp_path):
    hf_model = hf_tiny.make_model("llama", vocab_size=272, tie_word_embeddings=True)
    path = write_tiny_gguf(hf_model, tmp_path / "t.gguf", "F16")
    cfg = hf_config(GGUFFile(path))
    ref = hf_model.config
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rms_norm_eps"] == ref.rms_norm_eps
    assert cfg["rope_parameters"]["rope_theta"] == ref.rope_parameters["rope_theta"]
    model, _ = load_pretrained(path)  # float16 tensors, tied embeddings
    want = _torch_logits(hf_model, IDS, MASK)
    np.testing.assert_allclose(np.asarray(model(IDS, MASK).logits)[MASK > 0], want[MASK > 0], atol=2e-2)


def test_gguf_errors(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError, match=r"mamba.gguf.*architecture 'mamba' is not supported.*llama"):
        load_pretrained(tmp_path / "mamba.gguf")
    with pytest.raises(ModelError, match="nope.gguf"):
        load_pretrained(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="junk.gguf"):
        load_pretrained(tmp_path / "junk.gguf")
    with pytest.raises(ModelError, match=r"tokenizer.ggml.model='t5' is not supported.*gpt2.*llama"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "t5"}, "x.gguf")


# --- SmolLM2-135M-Instruct (real weights) -----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_tokenizers():
    from transformers import AutoTokenizer

    path = smollm_gguf()
    return tokenizer_from_gguf(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm_tokenizer_equals_transformers_gguf_tokenizer(smollm_tokenizers):
    ours, ref = smollm_tokenizers
    texts = TOKENIZER_TEXTS + [ref.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                               for c in CHAT]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    for chat in CHAT:
        assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
                == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.all_special_ids == ref.all_special_ids


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_pre_tokenizers_equal_transformers(tmp_path, pre):
    """The split regexes of other byte-level GGUF tokenizers, on SmolLM2's first 6000 tokens."""
    import gguf
    from transformers import AutoTokenizer

    src = GGUFFile(smollm_gguf())
    tokens = src.metadata["tokenizer.ggml.tokens"][:6000]
    kept = set(tokens)
    merges = [m for m in src.metadata["tokenizer.ggml.merges"]
              if m.replace(" ", "") in kept and set(m.split(" ")) <= kept]
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(src.metadata["tokenizer.ggml.token_type"][:6000])
    w.add_token_merges(merges)
    w.add_bos_token_id(1), w.add_eos_token_id(2)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours = tokenizer_from_gguf(tmp_path / "tok.gguf")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    for text in TOKENIZER_TEXTS + ["12345678 tokens, 1st 22nd\r\n\r\n   x"]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], (pre, text)


def test_gguf_loading_imports_no_torch(tmp_path):
    path = write_tiny_gguf(hf_tiny.make_model("llama", vocab_size=272), tmp_path / "tiny.gguf", "Q8_0")
    code = ("import sys; from jaxalign.models import load_pretrained, generate; "
            f"m, t = load_pretrained({str(path)!r}); "
            "assert len(generate(m, t, ['hello'], max_new_tokens=2)) == 1; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.fixture(scope="module")
def smollm_models():
    import torch
    import transformers

    model, tok = smollm_model()
    path = smollm_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    return model, tok, ref


def test_smollm_logits_equal_transformers_gguf_loader(smollm_models):
    model, tok, ref = smollm_models
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:",
               tok.apply_chat_template(CHAT[0], tokenize=False, add_generation_prompt=True)]
    batch = tok(prompts, padding=True, padding_side="left", return_tensors="np")
    got = np.asarray(model(batch["input_ids"], batch["attention_mask"]).logits)
    want = _torch_logits(ref, batch["input_ids"], batch["attention_mask"])
    valid = batch["attention_mask"] > 0
    assert np.abs(got - want)[valid].max() < 1e-3
