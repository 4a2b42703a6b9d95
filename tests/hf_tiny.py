"""Tiny random ``transformers`` models for tests: one per supported family, saved as safetensors folders.

``make_tiny("llama", tmp_path / "m")`` writes ``config.json`` and ``model.safetensors`` for a 2-layer model
with random (not default-initialised) weights: norm weights and biases are randomised too, so every switch
of our model code changes the output. Extra keyword arguments override the ``transformers`` config, e.g.
``make_tiny("llama", path, rope_scaling={"rope_type": "llama3", ...}, tie_word_embeddings=True)``.
No network access; no tokenizer files (the loader's tests add those).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

VOCAB = 128

# Shared small sizes: hidden 64, 4 query heads, 2 key/value heads where the family has GQA.
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_BASE, rms_norm_eps=1e-5, rope_theta=10000.0),
    "mistral": dict(_BASE, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None),
    "qwen2": dict(_BASE, rms_norm_eps=1e-6, rope_theta=1000000.0),
    "gemma": dict(_BASE, head_dim=24, rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                  tie_word_embeddings=True),
    "gemma2": dict(_BASE, head_dim=24, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=32, sliding_window=4, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, tie_word_embeddings=True),
    "qwen3": dict(_BASE, head_dim=24, rms_norm_eps=1e-6, rope_theta=1000000.0),
    # 5 layers: sliding (window 4) on all but every third, separate local/global RoPE bases.
    "gemma3_text": dict(_BASE, num_hidden_layers=5, head_dim=24, rms_norm_eps=1e-6,
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32, sliding_window=4,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                     "sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                        tie_word_embeddings=True),
    "phi3": dict(_BASE, rms_norm_eps=1e-5, rope_theta=10000.0, original_max_position_embeddings=128),
    "mixtral": dict(_BASE, rms_norm_eps=1e-5, rope_theta=10000.0, num_local_experts=4, num_experts_per_tok=2),
    # 3 layers, the middle one dense (mlp_only_layers); k=2 of 4 experts, probabilities not renormalised.
    "qwen3_moe": dict(_BASE, num_hidden_layers=3, head_dim=24, rms_norm_eps=1e-6, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False),
    # Gemma 3 image-text: the text decoder above plus a one-layer SigLIP tower (2 × 2 patches -> 4 tokens).
    "gemma3": dict(text_config=dict(_BASE, num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=32,
                                    sliding_window=4, sliding_window_pattern=2),
                   vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
                   mm_tokens_per_image=4, image_token_index=VOCAB, boi_token_index=VOCAB + 1,
                   eoi_token_index=VOCAB + 2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "olmo": dict(_BASE, clip_qkv=0.5, rope_theta=10000.0),
    "olmo2": dict(_BASE, rms_norm_eps=1e-6, rope_theta=500000.0),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 activation_function="gelu_new", bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=True),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                     rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
}


def hf_config(model_type: str, **overrides):
    """The ``transformers`` config object of the tiny model of ``model_type``."""
    import transformers

    if model_type not in CONFIGS:
        raise KeyError(f"no tiny config for {model_type!r}; known: {sorted(CONFIGS)}")
    kwargs = copy.deepcopy(dict(CONFIGS[model_type], **overrides))  # transformers edits nested dicts
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"  # the reference: plain softmax attention in float32
    return config


def randomize_(model, seed: int = 0, std: float = 0.15) -> None:
    """Overwrites every parameter with seeded random values (norm weights stay near their offset)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight"):
                p.add_(0.2 * noise)  # ones stay around 1 (Llama), zeros around 0 (Gemma's 1 + w)
            else:
                p.copy_(std * noise)


def make_model(model_type: str, seed: int = 0, **overrides):
    """A float32 ``AutoModelForCausalLM`` in eval mode with random weights (not saved)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type, **overrides),
                                                          dtype=torch.float32)
    randomize_(model, seed)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def make_tiny(model_type: str, path, seed: int = 0, **overrides) -> Path:
    """Builds a tiny random ``transformers`` model of ``model_type`` and saves it (safetensors) to ``path``.

    Args:
      model_type: one of :data:`CONFIGS` (HF ``model_type``).
      path: folder to write (created).
      seed: torch seed for the weights.
      **overrides: ``transformers`` config keys replacing the defaults above.

    Returns:
      ``Path(path)``.
    """
    path = Path(path)
    model = make_model(model_type, seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    return path
