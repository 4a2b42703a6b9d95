"""Generation: greedy equals transformers' greedy ``generate`` token for token (tiny llama, gpt2,
gpt_neox; SmolLM2), EOS stops rows, left = right padding, and sampling follows the tempered top-p law."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers

import hf_tiny  # noqa: E402
import tiny_tokenizer  # noqa: E402
from smollm import smollm_folder, smollm_model  # noqa: E402

from jaxalign.models import generate, generate_ids, load_pretrained  # noqa: E402
from jaxalign.models.generate import pad_prompts  # noqa: E402

VOCAB = 272  # room for the tiny tokenizer's 265 tokens
PROMPTS = [[4, 17, 99, 3, 42, 8, 11], [4, 120], [4, 33, 2, 90, 1]]


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = hf_tiny.make_model(request.param, seed=4, vocab_size=VOCAB)
    hf_model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.make_tiny_tokenizer(path)
    model, tok = load_pretrained(path)
    return model, tok, hf_model


def hf_greedy(hf_model, prompts, max_new_tokens, eos, pad):
    """transformers' greedy generate on left-padded prompts; the new tokens, padded to max_new_tokens."""
    import torch

    ids, mask = pad_prompts(prompts, pad, padding_side="left")
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                pad_token_id=pad, min_length=0).numpy()
    new = out[:, ids.shape[1]:]
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=pad)


def test_greedy_equals_transformers(tiny):
    model, _, hf_model = tiny
    # No EOS first (all rows run the full length), then an EOS that the greedy path of row 0 emits.
    free = generate_ids(model, PROMPTS, 12, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(free, hf_greedy(hf_model, PROMPTS, 12, eos=None, pad=0))
    eos = int(free[0, 4])
    got = generate_ids(model, PROMPTS, 12, eos_token_id=eos, pad_token_id=0)
    want = hf_greedy(hf_model, PROMPTS, 12, eos=eos, pad=0)
    np.testing.assert_array_equal(got, want)
    stop = list(got[0]).index(eos)
    assert stop <= 4 and (got[0, stop + 1:] == 0).all()


def test_right_padding_equals_left_padding(tiny):
    model, _, hf_model = tiny
    if hf_model.config.model_type == "gpt_neox":
        pytest.skip("same rotary path as llama; saves a compile")
    left = generate_ids(model, PROMPTS, 6, eos_token_id=None, padding_side="left")
    right = generate_ids(model, PROMPTS, 6, eos_token_id=None, padding_side="right", pad_multiple=16)
    np.testing.assert_array_equal(left, right)


def test_generate_strings_equal_transformers(tiny):
    model, tok, hf_model = tiny
    prompts = ["hello", "hi there, friend", "<|im_start|>user\nhello<|im_end|>\n"]
    got = generate(model, tok, prompts, max_new_tokens=8)
    ids = [tok(p)["input_ids"] for p in prompts]
    want = hf_greedy(hf_model, ids, 8, eos=tok.eos_token_id, pad=tok.pad_token_id)
    expected = []
    for row in want.tolist():
        row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        expected.append(tok.decode(row, skip_special_tokens=True))
    assert got == expected


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """One model for the sampler tests (the sampler does not depend on the family)."""
    path = tmp_path_factory.mktemp("llama-sampling")
    hf_tiny.make_model("llama", seed=5, vocab_size=VOCAB).save_pretrained(path, safe_serialization=True)
    return load_pretrained(path)[0]


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tiny_llama):
    model = tiny_llama
    greedy = generate_ids(model, PROMPTS, 6, eos_token_id=None)
    nucleus1 = generate_ids(model, PROMPTS, 6, eos_token_id=None, temperature=1.0, top_p=1e-6, seed=3)
    np.testing.assert_array_equal(nucleus1, greedy)
    a = generate_ids(model, PROMPTS, 6, eos_token_id=None, temperature=1.5, seed=1)
    b = generate_ids(model, PROMPTS, 6, eos_token_id=None, temperature=1.5, seed=1)
    c = generate_ids(model, PROMPTS, 6, eos_token_id=None, temperature=1.5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected >= 5 times (the rest pooled) and its dof."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def _tempered_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[(np.cumsum(p[order]) - p[order]) < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.6)])
def test_sampling_follows_tempered_nucleus(tiny_llama, temperature, top_p):
    """First-token counts over 4000 draws fit softmax(logits / T) restricted to the top-p set (a chi-square
    test at ~5 sigma), and reject the law with another temperature (the test has power)."""
    model = tiny_llama
    prompt = [4, 17, 99, 3]
    logits = np.asarray(model(np.array([prompt]), np.ones((1, 4), np.int32)).logits[0, -1], np.float64)
    q = _tempered_nucleus(logits, temperature, top_p)
    draws = generate_ids(model, [prompt] * 4000, 1, eos_token_id=None, temperature=temperature, top_p=top_p,
                         seed=7)[:, 0]
    assert (q[draws] > 0).all(), "sampled a token outside the nucleus"
    counts = np.bincount(draws, minlength=q.size).astype(np.float64)
    stat, dof = _chi2(counts, q)
    assert stat < dof + 5 * np.sqrt(2 * dof), (stat, dof)
    wrong_stat, wrong_dof = _chi2(counts, _tempered_nucleus(logits, 2 * temperature, 1.0))
    assert wrong_stat > wrong_dof + 5 * np.sqrt(2 * wrong_dof), (wrong_stat, wrong_dof)


def test_smollm_greedy_equals_transformers_and_answers_paris():
    """Real weights: batched greedy answers of different lengths, token for token; and the capital."""
    import torch
    import transformers

    model, tok = smollm_model()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_folder()),
                                                                 dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}]]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    prompts.append("def add(a, b):")
    ids = [tok(p)["input_ids"] for p in prompts]
    got = generate_ids(model, ids, 16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    want = hf_greedy(hf_model, ids, 16, eos=tok.eos_token_id, pad=tok.pad_token_id)
    np.testing.assert_array_equal(got, want)
    answers = generate(model, tok, prompts, max_new_tokens=16)  # same shapes: no new compile
    assert "Paris" in answers[0], answers[0]
    assert answers[0] == tok.decode(list(got[0]), skip_special_tokens=True)
