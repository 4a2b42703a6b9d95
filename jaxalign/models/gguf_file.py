"""GGUF files (llama.cpp's format) read as a Hugging Face checkpoint: config dict, HF-named tensors.

A GGUF holds the config as metadata under llama.cpp key names (``llama.block_count``, …), the
tokenizer as metadata (``tokenizer.ggml.*``, see :mod:`jaxalign.models.tokenizer`), and the weights,
often block-quantised, under llama.cpp tensor names (``blk.0.attn_q.weight``). This module turns the
metadata into an HF-style ``config.json`` dict and each tensor into an HF-named :class:`LazyTensor`
that is dequantised with the ``gguf`` package's NumPy code (``gguf.quants.dequantize``) only when read.
The model itself is then built by the family's ``params.from_hf_tensors`` as for any HF folder.

Two layout differences are undone:

* llama.cpp's converter reorders the rows of ``q_proj``/``k_proj`` (and their biases) of ``llama``
  models for its interleaved-pairs RoPE: within each head, HF's rows ``[0..H/2) | [H/2..H)`` (the
  "rotate half" halves) are interleaved as ``0, H/2, 1, H/2+1, …``. We invert that per head
  (``n_kv_heads`` heads for ``k``). Architectures with NeoX-style RoPE (``qwen2``) are stored unpermuted.
* GPT-2's ``Conv1D`` weights are ``[in, out]`` in HF and ``[out, in]`` in GGUF: transposed back.
* llama.cpp stores Gemma's RMSNorm weights as ``1 + w`` (its norm multiplies by the weight alone):
  ``1`` is subtracted again from every ``*norm.weight`` of ``gemma3``.

What llama.cpp does not write to the metadata but hard-codes for ``gemma3`` is filled in the same way:
every sixth layer global, the others sliding; a RoPE base of 10 000 on sliding layers (the metadata's
``rope.freq_base`` and any ``rope.scaling`` are the global layers'); ``query_pre_attn_scalar`` the head
dim (``hidden / heads`` for the 62-layer 27B). Phi-3's fused ``attn_qkv`` and ``ffn_up`` (gate and up)
keep HF's row order; a Phi-3 GGUF with LongRoPE factors (``rope_factors_long.weight``) is refused.

Mixture-of-experts files: llama.cpp writes Mixtral as architecture ``llama`` with a positive
``llama.expert_count`` (read here as ``mixtral``), Qwen3-MoE as ``qwen3moe``. Each block holds the router
(``ffn_gate_inp``, HF's ``[E, D]``) and the experts stacked along the first axis (``ffn_gate_exps``,
``ffn_up_exps``: ``[E, F, D]``; ``ffn_down_exps``: ``[E, D, F]``, i.e. HF's per-expert ``[out, in]``
weights stacked): each is read back as one HF tensor per expert, slicing expert ``e`` before
dequantising. llama.cpp's ``qwen3moe`` has experts in every layer, renormalises the top-k probabilities
(``norm_topk_prob``) and has no sliding window; the expert width is ``expert_feed_forward_length``
(``feed_forward_length / expert_used_count`` when absent, as llama.cpp falls back).

Supported ``general.architecture`` values: see :data:`SUPPORTED_ARCHITECTURES`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxalign.errors import ModelError
from jaxalign.models.hf_folder import LazyTensor

# GGUF architecture -> HF model_type (``llama`` with experts is ``mixtral``: :func:`model_type`).
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
                           "gemma3": "gemma3_text", "phi3": "phi3", "gpt2": "gpt2"}

_HF_CLASS = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
             "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10000.0  # hard-coded in llama.cpp, not in the metadata


class GGUFFile:
    """An opened GGUF file: ``metadata`` (key -> Python value) and ``tensors`` (name -> ReaderTensor)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = str(path)
        if not Path(path).is_file():
            raise ModelError(f"{path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as err:  # the gguf package raises ValueError/struct errors on bad files
            raise ModelError(f"{path}: cannot read as GGUF: {err}") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value = field.contents()
            self.metadata[key] = value
        self.tensors = {t.name: t for t in self.reader.tensors}

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = ..., *, arch: bool = True) -> Any:
        """Metadata value of ``{architecture}.{key}`` (or ``key`` with ``arch=False``)."""
        full = f"{self.architecture}.{key}" if arch else key
        if full in self.metadata:
            return self.metadata[full]
        if default is ...:
            raise ModelError(f"{self.path}: GGUF metadata key {full!r} is missing")
        return default

    def dequantized(self, name: str, index: int | None = None) -> np.ndarray:
        """Tensor ``name`` in GGUF layout (row-major, llama.cpp names), or its slice ``[index]`` along the
        first axis (one expert of a stacked ``[E, …]`` tensor; only that slice is dequantised); quantised
        types as float32."""
        import gguf

        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        data = t.data  # quantised: [..., bytes per row], blocks never cross a row
        if index is not None:
            shape, data = shape[1:], data[index]
        kind = gguf.GGMLQuantizationType(int(t.tensor_type))
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            value = np.asarray(data)
        else:
            try:
                value = gguf.quants.dequantize(data, kind)
            except NotImplementedError:
                raise ModelError(f"{self.path}: tensor {name!r} has quantisation {kind.name}, which the "
                                 "gguf package cannot dequantise") from None
        return value.reshape(shape)

    def numpy_dtype(self, name: str) -> np.dtype:
        import gguf

        kind = gguf.GGMLQuantizationType(int(self.tensors[name].tensor_type))
        return np.dtype(np.float16 if kind == gguf.GGMLQuantizationType.F16 else np.float32)

    def same_data(self, a: str, b: str) -> bool:
        ta, tb = self.tensors[a], self.tensors[b]
        return (int(ta.tensor_type) == int(tb.tensor_type) and list(ta.shape) == list(tb.shape)
                and np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)))


# --- config --------------------------------------------------------------------------------------------


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def model_type(g: GGUFFile) -> str:
    """The HF ``model_type`` of ``g``: its architecture's, ``mixtral`` for ``llama`` with experts."""
    arch = g.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{g.path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    if arch == "llama" and int(g.get("expert_count", 0) or 0) > 0:
        return "mixtral"
    return SUPPORTED_ARCHITECTURES[arch]


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """The HF ``config.json`` dict this GGUF describes."""
    arch, family = g.architecture, model_type(g)
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    embd = g.tensors.get("token_embd.weight")
    vocab = g.get("vocab_size", None)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else (int(embd.shape[1]) if embd is not None else None)
    if vocab is None:
        raise ModelError(f"{g.path}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokens)")
    tied = "output.weight" not in g.tensors or (
        "token_embd.weight" in g.tensors and g.same_data("output.weight", "token_embd.weight"))
    common = {
        "model_type": family,
        "architectures": [_HF_CLASS[family]],
        "vocab_size": int(vocab),
        "tie_word_embeddings": bool(tied),
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id", None, arch=False),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id", None, arch=False),
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id", None, arch=False),
    }
    if arch == "gpt2":
        return common | {
            "n_embd": int(g.get("embedding_length")),
            "n_layer": int(g.get("block_count")),
            "n_head": int(g.get("attention.head_count")),
            "n_inner": int(g.get("feed_forward_length")),
            "n_positions": int(g.get("context_length")),
            "layer_norm_epsilon": _f32(g.get("attention.layer_norm_epsilon")),
            "activation_function": "gelu_new",
        }
    hidden, heads = int(g.get("embedding_length")), int(g.get("attention.head_count"))
    head_dim = int(g.get("attention.key_length", hidden // heads))
    rope_dim = int(g.get("rope.dimension_count", head_dim))
    if rope_dim != head_dim and arch != "phi3":
        raise ModelError(f"{g.path}: partial rotary embedding ({arch}.rope.dimension_count={rope_dim}, "
                         f"head dim {head_dim}) is not supported for {arch}")
    theta = _f32(g.get("rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = g.get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ModelError(f"{g.path}: {arch}.rope.scaling.type={scaling!r} is not supported (only linear)")
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": _f32(g.get("rope.scaling.factor"))}
    config = common | {
        "hidden_size": hidden,
        "intermediate_size": int(g.get("feed_forward_length")),
        "num_hidden_layers": int(g.get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(g.get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(g.get("context_length")),
        "hidden_act": "silu",
        "rope_theta": theta,
        "rope_parameters": rope,
    }
    if family == "llama":
        config |= {"attention_bias": "blk.0.attn_q.bias" in g.tensors, "mlp_bias": False}
    if family in ("mixtral", "qwen3_moe"):
        config |= _moe_config(g, family, config)
    if arch == "gemma3":
        del config["hidden_act"]  # Gemma 3 reads hidden_activation
        config |= _gemma3_config(g, config)
    if arch == "phi3":
        if "rope_factors_long.weight" in g.tensors:
            raise ModelError(f"{g.path}: a phi3 GGUF with LongRoPE factors (rope_factors_long.weight) is not "
                             "supported; load the Hugging Face folder instead")
        window = g.get("attention.sliding_window", None)
        config |= {"partial_rotary_factor": rope_dim / head_dim, "sliding_window": int(window) if window else None,
                   "original_max_position_embeddings": config["max_position_embeddings"]}
    return config


def _moe_config(g: GGUFFile, family: str, config: dict[str, Any]) -> dict[str, Any]:
    """The expert keys of a ``mixtral`` (``llama`` with experts) or ``qwen3moe`` GGUF."""
    experts, used = int(g.get("expert_count")), int(g.get("expert_used_count"))
    if family == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": used, "sliding_window": None}
    width = g.get("expert_feed_forward_length", None)
    return {"num_experts": experts, "num_experts_per_tok": used, "norm_topk_prob": True,
            "moe_intermediate_size": int(width) if width else config["intermediate_size"] // used,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}


def _gemma3_config(g: GGUFFile, config: dict[str, Any]) -> dict[str, Any]:
    """The ``gemma3_text`` keys of a llama.cpp ``gemma3`` GGUF (see the module docstring)."""
    layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    types = ["sliding_attention" if (i + 1) % _GEMMA3_PATTERN else "full_attention" for i in range(layers)]
    local = {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_THETA}
    return {"hidden_activation": "gelu_pytorch_tanh", "layer_types": types,
            "sliding_window": int(g.get("attention.sliding_window")),
            "query_pre_attn_scalar": hidden // heads if layers == 62 else config["head_dim"],
            "rope_parameters": {"full_attention": config["rope_parameters"], "sliding_attention": local},
            "rope_local_base_freq": _GEMMA3_LOCAL_THETA}


# --- tensors -------------------------------------------------------------------------------------------


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, interleaved pairs back to two halves."""
    rows = w.shape[0]
    if rows % (2 * heads):
        raise ModelError(f"cannot undo the RoPE row permutation: {rows} rows, {heads} heads")
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_Rule = tuple[str, str, str]  # GGUF name regex, HF name template, transform name

_LLAMA_RULES: list[_Rule] = [
    (r"token_embd\.weight", "model.embed_tokens.weight", ""),
    (r"output_norm\.weight", "model.norm.weight", ""),
    (r"output\.weight", "lm_head.weight", ""),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight", ""),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}", "rope_q"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}", "rope_k"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}", ""),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}", ""),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight", ""),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight", ""),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight", ""),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight", ""),
]

_NORM = "norm_shift"
_GEMMA3_RULES: list[_Rule] = [
    (r"token_embd\.weight", "model.embed_tokens.weight", ""),
    (r"output_norm\.weight", "model.norm.weight", _NORM),
    (r"output\.weight", "lm_head.weight", ""),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight", _NORM),
    (r"blk\.(\d+)\.post_attention_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight", _NORM),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.pre_feedforward_layernorm.weight", _NORM),
    (r"blk\.(\d+)\.post_ffw_norm\.weight", "model.layers.{0}.post_feedforward_layernorm.weight", _NORM),
    (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{0}.self_attn.q_norm.weight", _NORM),
    (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{0}.self_attn.k_norm.weight", _NORM),
    *[r for r in _LLAMA_RULES if r[0].startswith("blk") and "norm" not in r[0]],  # projections
]

_QK_NORM_RULES: list[_Rule] = [
    (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{0}.self_attn.q_norm.weight", ""),
    (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{0}.self_attn.k_norm.weight", ""),
]

_PHI3_RULES: list[_Rule] = [
    (r"blk\.(\d+)\.attn_qkv\.weight", "model.layers.{0}.self_attn.qkv_proj.weight", ""),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.gate_up_proj.weight", ""),
    *[r for r in _LLAMA_RULES if not re.search(r"attn_[qkv]\\|ffn_(up|gate)", r[0])],
]

_GPT2_RULES: list[_Rule] = [
    (r"token_embd\.weight", "transformer.wte.weight", ""),
    (r"position_embd\.weight", "transformer.wpe.weight", ""),
    (r"output_norm\.(weight|bias)", "transformer.ln_f.{0}", ""),
    (r"output\.weight", "lm_head.weight", ""),
    (r"blk\.(\d+)\.attn_norm\.(weight|bias)", "transformer.h.{0}.ln_1.{1}", ""),
    (r"blk\.(\d+)\.attn_qkv\.weight", "transformer.h.{0}.attn.c_attn.weight", "transpose"),
    (r"blk\.(\d+)\.attn_qkv\.bias", "transformer.h.{0}.attn.c_attn.bias", ""),
    (r"blk\.(\d+)\.attn_output\.weight", "transformer.h.{0}.attn.c_proj.weight", "transpose"),
    (r"blk\.(\d+)\.attn_output\.bias", "transformer.h.{0}.attn.c_proj.bias", ""),
    (r"blk\.(\d+)\.ffn_norm\.(weight|bias)", "transformer.h.{0}.ln_2.{1}", ""),
    (r"blk\.(\d+)\.ffn_up\.weight", "transformer.h.{0}.mlp.c_fc.weight", "transpose"),
    (r"blk\.(\d+)\.ffn_up\.bias", "transformer.h.{0}.mlp.c_fc.bias", ""),
    (r"blk\.(\d+)\.ffn_down\.weight", "transformer.h.{0}.mlp.c_proj.weight", "transpose"),
    (r"blk\.(\d+)\.ffn_down\.bias", "transformer.h.{0}.mlp.c_proj.bias", ""),
]

_EXPERTS = "experts"  # a stacked [E, …] tensor read as one HF tensor per expert ({e} in the template)


def _moe_rules(block: str, gate: str, up: str, down: str) -> list[_Rule]:
    L = "model.layers.{0}." + block
    return [(r"blk\.(\d+)\.ffn_gate_inp\.weight", L + "gate.weight", ""),
            (r"blk\.(\d+)\.ffn_gate_exps\.weight", L + "experts.{e}." + gate + ".weight", _EXPERTS),
            (r"blk\.(\d+)\.ffn_up_exps\.weight", L + "experts.{e}." + up + ".weight", _EXPERTS),
            (r"blk\.(\d+)\.ffn_down_exps\.weight", L + "experts.{e}." + down + ".weight", _EXPERTS)]


# HF model_type -> rules
_RULES = {"llama": _LLAMA_RULES, "qwen2": _LLAMA_RULES, "qwen3": _LLAMA_RULES + _QK_NORM_RULES,
          "mixtral": _LLAMA_RULES + _moe_rules("block_sparse_moe.", "w1", "w3", "w2"),
          "qwen3_moe": _LLAMA_RULES + _QK_NORM_RULES + _moe_rules("mlp.", "gate_proj", "up_proj", "down_proj"),
          "gemma3_text": _GEMMA3_RULES, "phi3": _PHI3_RULES, "gpt2": _GPT2_RULES}


def _transform(kind: str, arch: str, config: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray] | None:
    if kind == "transpose":
        return lambda w: np.ascontiguousarray(w.T)
    if kind == _NORM:
        return lambda w: w - np.asarray(1, w.dtype)
    if kind in ("rope_q", "rope_k") and arch == "llama":  # NeoX-RoPE architectures are not permuted
        heads = config["num_attention_heads"] if kind == "rope_q" else config["num_key_value_heads"]
        return lambda w: _unpermute_rows(w, heads)
    return None


def hf_tensors(g: GGUFFile, config: dict[str, Any]) -> dict[str, LazyTensor]:
    """HF name -> lazily dequantised tensor in HF layout. Unknown GGUF tensor names raise ``ModelError``."""
    arch = g.architecture
    rules = [(re.compile(p), t, k) for p, t, k in _RULES[config["model_type"]]]
    out: dict[str, LazyTensor] = {}
    unknown = []
    for name, t in g.tensors.items():
        for pattern, template, kind in rules:
            m = pattern.fullmatch(name)
            if m:
                break
        else:
            unknown.append(name)
            continue
        if template == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # a copy of the embedding (llama.cpp writes one for some architectures)
        shape = tuple(int(d) for d in reversed(t.shape))
        fn = _transform(kind, arch, config)
        if kind == "transpose":
            shape = shape[::-1]
        for e in range(shape[0]) if kind == _EXPERTS else (None,):
            hf_name = template.format(*m.groups(), e=e)
            out[hf_name] = LazyTensor(hf_name, shape if e is None else shape[1:], g.numpy_dtype(name),
                                      read=_reader(g, name, fn, e), source=f"{g.path}:{name}")
    if unknown:
        raise ModelError(f"{g.path}: GGUF tensor(s) with no Hugging Face name for architecture {arch!r}: "
                         f"{', '.join(unknown[:10])}{' …' if len(unknown) > 10 else ''}")
    return out


def _reader(g: GGUFFile, name: str, fn, index: int | None) -> Callable[[], np.ndarray]:
    """Reads tensor ``name`` (its slice ``[index]`` when given) and applies ``fn``."""
    def read():
        w = g.dequantized(name, index)
        return fn(w) if fn is not None else w

    return read


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, LazyTensor], GGUFFile]:
    """``(hf_config, hf_tensors, gguf_file)`` of a GGUF file; nothing is dequantised yet."""
    g = GGUFFile(path)
    config = hf_config(g)
    return config, hf_tensors(g, config), g


def gguf_to_hf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantises a GGUF file into a Hugging Face folder that ``transformers`` and jaxalign load.

    Writes ``config.json``, ``model.safetensors`` (float32 for quantised tensors, else the stored
    dtype) and the tokenizer files built from the GGUF metadata. Returns ``out_dir``.
    """
    from jaxalign.models.hf_folder import save_safetensors, write_config
    from jaxalign.models.tokenizer import tokenizer_from_gguf

    config, tensors, g = read_gguf(gguf_path)
    tokenizer = tokenizer_from_gguf(g)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({name: t.numpy() for name, t in tensors.items()}, out)
    write_config(config, out)
    tokenizer.save_pretrained(str(out))
    return out
