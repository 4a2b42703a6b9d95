"""Every model family against ``transformers``' PyTorch classes on the same tiny random weights.

Weights come from ``tests/hf_tiny.py`` (saved with ``save_pretrained``), are read with
``safetensors.numpy`` and loaded by ``params.from_hf_tensors``. HF gets the positions a left-padded batch
has in ``generate`` (``cumsum(mask) - 1``), which is what our models derive from the mask.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_to_scale, assert_trees_close_to_scale
import safetensors.numpy
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import hf_tiny  # noqa: E402

from jaxalign.errors import ModelError  # noqa: E402
from jaxalign.models import base, params, registry  # noqa: E402
from jaxalign.models.rope import RopeConfig  # noqa: E402

TOL = 1e-4

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {  # id -> (model_type, config overrides)
    "llama": ("llama", {}),
    "llama-llama3-tied": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-linear-bias": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                        attention_bias=True, mlp_bias=True)),
    "llama-dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                    max_position_embeddings=6)),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),  # sliding window 4, soft-capping, query_pre_attn_scalar 32
    "olmo": ("olmo", {}),  # clip_qkv 0.5
    "olmo2": ("olmo2", {}),
    "gpt2": ("gpt2", {}),
    "gpt2-untied-layerscale": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False,
                                            activation_function="relu")),
    "gpt_neox": ("gpt_neox", {}),  # parallel residual, rotary_pct 0.5
    "gpt_neox-sequential": ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=0.25)),
}


class Case:
    def __init__(self, name: str, root: Path, spec: tuple[str, dict] | None = None):
        self.name = name
        self.model_type, overrides = spec or CASES[name]  # spec: (model_type, overrides) of another module
        self.path = hf_tiny.make_tiny(self.model_type, root / name, **overrides)
        self.hf = hf_tiny.make_model(self.model_type, **overrides)
        self.config_json = json.loads((self.path / "config.json").read_text())
        self.tensors = safetensors.numpy.load_file(self.path / "model.safetensors")
        self.cfg = registry.config_from_hf(self.config_json)
        self.model = params.from_hf_tensors(None, self.cfg, self.tensors)

    def hf_forward(self, ids, mask, model=None):
        pos = np.where(mask > 0, np.maximum(np.cumsum(mask, -1) - 1, 0), 1)
        with torch.no_grad():
            return (model or self.hf)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                      position_ids=torch.tensor(pos), output_hidden_states=True)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp("hf"))


def _batch(side: str, B=3, T=9, lens=(9, 6, 4), seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, hf_tiny.VOCAB, (B, T))
    mask = np.zeros((B, T), np.int64)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1 if side == "left" else 0
        if side == "right":
            mask[b, :n] = 1
    return ids, mask


def _maxdiff(a, b, where):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[where].max())


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_matches_transformers(case, side):
    ids, mask = _batch(side)
    ref = case.hf_forward(ids, mask)
    out = case.model(jnp.asarray(ids), jnp.asarray(mask), return_layer_hidden=True)
    valid = mask.astype(bool)
    assert out.logits.dtype == jnp.float32 and out.logits.shape == (3, 9, hf_tiny.VOCAB)
    assert _maxdiff(out.logits, ref.logits.numpy(), valid) < TOL
    assert _maxdiff(out.hidden, ref.hidden_states[-1].numpy(), valid) < TOL
    L = len(ref.hidden_states) - 1
    assert len(out.layer_hidden) == L + 1
    for layer in range(L):  # HF's last entry is after the final norm; ours is `hidden`
        assert _maxdiff(out.layer_hidden[layer], ref.hidden_states[layer].numpy(), valid) < TOL
    # the same D-term matmul in another program: a few ulps of the largest logit
    assert_close_to_scale(case.model.logits(out.hidden), out.logits, 1e-5, err_msg="logits")
    np.testing.assert_array_equal(case.model.unembedding(),
                                  case.hf.get_output_embeddings().weight.detach().numpy())
    no_logits = case.model(jnp.asarray(ids), jnp.asarray(mask), return_logits=False)
    assert no_logits.logits is None and no_logits.layer_hidden is None and no_logits.cache is None


def test_cache_continuation_equals_full_forward(case):
    """Prompt into a cache, then responses (chunk, then token by token, and `repeat(2)` for two
    different responses) equal full forwards; the prompt is right padded, leaving a gap in the cache."""
    if getattr(case.cfg, "rope", None) and case.cfg.rope.rope_type == "dynamic":
        pytest.skip("dynamic RoPE rescales with the call's length, so cached keys differ (as in HF)")
    model = case.model
    rng = np.random.default_rng(1)
    B, Tp, Tr = 2, 6, 5
    p_lens, r_lens = (6, 3), ((5, 4), (2, 5))  # per response set (chosen, rejected)
    prompt = rng.integers(3, hf_tiny.VOCAB, (B, Tp))
    p_mask = (np.arange(Tp)[None] < np.array(p_lens)[:, None]).astype(np.int32)
    resp = rng.integers(3, hf_tiny.VOCAB, (2, B, Tr))
    r_mask = (np.arange(Tr)[None, None] < np.array(r_lens)[:, :, None]).astype(np.int32)

    cache = model.init_cache(B, Tp + Tr)
    pre = model(jnp.asarray(prompt), jnp.asarray(p_mask), cache=cache)
    assert int(pre.cache.end) == Tp
    both = model(jnp.asarray(resp.reshape(2 * B, Tr)), jnp.asarray(r_mask.reshape(2 * B, Tr)),
                 cache=pre.cache.repeat(2))
    assert int(both.cache.end) == Tp + Tr
    # Reference: each (prompt, response) row without its gap, left padded, in one full forward.
    rows = [np.concatenate([prompt[b, :p_lens[b]], resp[s, b, :r_lens[s][b]]])
            for s in range(2) for b in range(B)]
    ref_ids = np.stack([np.pad(r, (Tp + Tr - len(r), 0)) for r in rows])
    ref_mask = np.stack([np.pad(np.ones_like(r), (Tp + Tr - len(r), 0)) for r in rows])
    full = model(jnp.asarray(ref_ids), jnp.asarray(ref_mask))
    for s in range(2):
        for b in range(B):
            row, n, m = s * B + b, p_lens[b], r_lens[s][b]
            start = Tp + Tr - n - m
            np.testing.assert_allclose(pre.logits[b, :n], full.logits[row, start:start + n], atol=TOL)
            np.testing.assert_allclose(both.logits[row, :m], full.logits[row, start + n:], atol=TOL)
            np.testing.assert_allclose(both.hidden[row, :m], full.hidden[row, start + n:], atol=TOL)

    # Token by token (the generation path) continues the same cache.
    step_cache = pre.cache
    for t in range(Tr):
        step = model(jnp.asarray(resp[0, :, t:t + 1]), jnp.asarray(r_mask[0, :, t:t + 1]), cache=step_cache)
        step_cache = step.cache
        live = r_mask[0, :, t] > 0
        np.testing.assert_allclose(step.logits[:, 0][live], both.logits[:B, t][live], atol=TOL)


def test_to_hf_tensors_round_trip(case, tmp_path):
    """Our tensors under HF names reproduce the file exactly, and transformers loads the saved folder."""
    import transformers

    out = params.to_hf_tensors(case.model)
    assert sorted(out) == sorted(case.tensors)
    for name, value in out.items():
        np.testing.assert_array_equal(value, case.tensors[name], err_msg=name)
    assert type(case.cfg).from_hf(case.cfg.to_hf()) == case.cfg
    safetensors.numpy.save_file(out, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(case.cfg.to_hf()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids, mask = _batch("left")
    ref = case.hf_forward(ids, mask, model=hf)
    ours = case.model(jnp.asarray(ids), jnp.asarray(mask))
    assert _maxdiff(ours.logits, ref.logits.numpy(), mask.astype(bool)) < TOL


def test_bfloat16_params_match_float32(case):
    model = params.from_hf_tensors(None, case.cfg, case.tensors, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ids, mask = _batch("left")
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    ref = case.model(jnp.asarray(ids), jnp.asarray(mask))
    assert out.logits.dtype == jnp.float32
    valid = mask.astype(bool)
    scale = float(np.abs(np.asarray(ref.logits))[valid].max())
    assert _maxdiff(out.logits, ref.logits, valid) < 0.05 * scale
    lp, lp_ref = jax.nn.log_softmax(out.logits), jax.nn.log_softmax(ref.logits)
    assert _maxdiff(lp, lp_ref, valid) < 0.05 * scale


@pytest.mark.parametrize("name,remat", [("llama", "dots_saveable"), ("gpt2", "full"),
                                        ("gpt_neox", "dots_with_no_batch_dims_saveable")])
def test_remat_same_values_and_gradients(name, remat, tmp_path):
    case = Case(name, tmp_path)
    plain = case.model
    rematted = params.from_hf_tensors(None, case.cfg, case.tensors, remat=remat)
    ids, mask = _batch("right")
    targets = jnp.asarray(np.roll(ids, -1, axis=1))

    def loss(model):
        logits = model(jnp.asarray(ids), jnp.asarray(mask)).logits
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return -(lp * mask).sum()

    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(plain)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(rematted)
    # remat changes the program (recomputed forward, other fusions): the loss sums B·T log-probs of one
    # sign (1e-5 ≈ 170 ulps); gradient entries cancel, bounded by their leaf's scale (tests/numerics.py)
    np.testing.assert_allclose(l0, l1, rtol=1e-5)
    assert_trees_close_to_scale(g0, g1, 1e-5, "remat grads")


# --- configs, registry and parameter tables -----------------------------------------------------------

def test_registry_lists_supported_types():
    assert sorted(registry.FAMILIES) == ["gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "gpt_neox", "llama",
                                         "mistral", "mixtral", "olmo", "olmo2", "phi3", "qwen2", "qwen3",
                                         "qwen3_moe"]
    with pytest.raises(ModelError, match="'bert' is not supported.*gpt_neox.*llama"):
        registry.get_family("bert")


@pytest.mark.parametrize("model_type,override,key", [
    ("llama", dict(rope_scaling={"rope_type": "su", "factor": 2.0}), "rope_type 'su'"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "mscale": 1.0}), "mscale"),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    ("llama", dict(hidden_act="mish"), "hidden_act 'mish'"),
    ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gpt2", dict(add_cross_attention=True), "add_cross_attention"),
    ("gpt2", dict(activation_function="mish"), "activation_function 'mish'"),
    ("qwen2", dict(layer_types=["full_attention", "chunked_attention"], use_sliding_window=True,
                   sliding_window=4), "chunked_attention"),
])
def test_unsupported_config_keys_are_named(model_type, override, key):
    config = dict(hf_tiny.CONFIGS[model_type], model_type=model_type, **override)
    with pytest.raises(ModelError, match=key):
        registry.config_from_hf(config)


def test_rope_config_reads_v4_and_v5_spellings():
    v4 = {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3, rope_type=None, type="llama3"),
          "max_position_embeddings": 64}
    v5 = {"rope_parameters": dict(LLAMA3, rope_theta=500000.0), "max_position_embeddings": 64}
    assert RopeConfig.from_hf(v4) == RopeConfig.from_hf(v5)
    cfg = RopeConfig.from_hf(v5)
    assert cfg.rope_type == "llama3" and cfg.theta == 500000.0
    assert RopeConfig.from_hf(dict(cfg.to_hf(), max_position_embeddings=64)) == cfg


def test_load_errors_are_collected_and_named(tmp_path):
    case = Case("qwen2-window", tmp_path)
    tensors = dict(case.tensors)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 64), np.float32)
    tensors["model.layers.0.extra.weight"] = np.zeros((2,), np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)  # ignored buffer
    with pytest.raises(ModelError) as err:
        params.from_hf_tensors("qwen2", case.cfg, tensors)
    msg = str(err.value)
    assert "3 problems" in msg
    assert "model.layers.0.extra.weight: no qwen2 parameter" in msg
    assert "model.layers.0.self_attn.q_proj.weight: shape (3, 64)" in msg
    assert "missing tensor for parameter layers.1.mlp.up_proj.kernel" in msg


def test_switch_disagreeing_with_weights_is_an_error(tmp_path):
    case = Case("llama-linear-bias", tmp_path)  # weights have biases
    cfg = registry.config_from_hf(dict(case.config_json, attention_bias=False, mlp_bias=False))
    with pytest.raises(ModelError, match="has no parameter layers.0.attn.q_proj.bias"):
        params.from_hf_tensors(None, cfg, case.tensors)


def test_tied_lm_head_and_gpt2_names_without_prefix(tmp_path):
    case = Case("gpt2", tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in case.tensors.items()}
    tensors["lm_head.weight"] = tensors["wte.weight"]  # a tied copy is accepted
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old causal-mask buffer
    model = params.from_hf_tensors("gpt2", case.cfg, tensors)
    ids, mask = _batch("left")
    np.testing.assert_array_equal(model(jnp.asarray(ids), jnp.asarray(mask)).logits,
                                  case.model(jnp.asarray(ids), jnp.asarray(mask)).logits)


def test_remat_policy_names():
    assert base.remat_policy(None) is None and base.remat_policy("full") is None
    assert base.remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    with pytest.raises(ModelError, match="remat policy 'sometimes'"):
        base.remat_policy("sometimes")
