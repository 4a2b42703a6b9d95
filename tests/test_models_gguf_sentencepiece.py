"""SentencePiece GGUF tokenizers (``tokenizer.ggml.model = "llama"``: Gemma, Llama 2, Phi-3) built with
``tokenizers`` alone, against transformers' own GGUF tokenizer conversion (tests only) on tiny
vocabularies written here with ``gguf.GGUFWriter``. The real Gemma-3-270M tokenizer is checked in
test_models_families.py."""

from __future__ import annotations

import pytest

from jaxalign.models import tokenizer_from_gguf
from jaxalign.models.tokenizer import sentencepiece_merges

SPACE = "\u2581"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "  ", "\t", "<think>"]  # "  " written with real spaces, as llama.cpp does Gemma's
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'()-=+*#<>/") + [
    SPACE, "é", "ö", "日", "本"]
# merged pieces in merge order (best first); some take several routes (▁the: ▁t+he or ▁+the)
MERGED = ["he", "th", SPACE + "t", "the", SPACE + "the", "ll", "llo", "hello", SPACE + "hello", "in", "ing",
          "or", "ld", "orld", "wor", SPACE + "w", SPACE + "world", "12", "123", SPACE + SPACE, SPACE + "a",
          "an", "and", SPACE + "and", "er", "re", "ere", "here", "t" + SPACE, "日本", "é" + SPACE, "x" + SPACE + "y"]
TEXTS = [
    "hello world", "Hello World", "the there here and", " hello", "  two leading", "a  b   c    d", "   ",
    "trailing space ", "tabs\tand\nnew\n\nlines\n\n\n", "12345 1234 0.5", "héllo wörld 日本 日本語",
    "😀 emoji ﬁ Привет 𠀋", "\x01\x02 control bytes", "<start_of_turn>user\nhi<end_of_turn>\n",
    "<bos>the<eos><pad><unk>", "<think>x y</think>", "<0x41> is a byte token spelled out", "x y", "", " ",
    "the" * 12,
]
CHAT = [[{"role": "user", "content": "hello world"}],
        [{"role": "user", "content": "12+3?"}, {"role": "assistant", "content": "the  answer"},
         {"role": "user", "content": "and here?"}]]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                 "else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _vocab(shuffle_scores: bool):
    """``(tokens, scores, types)``: specials, byte tokens, characters, merged pieces."""
    tokens = SPECIALS + USER_DEFINED + [f"<0x{b:02X}>" for b in range(256)] + CHARS + MERGED
    types = [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [6] * 256 + [1] * (len(CHARS) + len(MERGED))
    n_fixed = len(tokens) - len(MERGED)
    scores = [-1000.0] * len(SPECIALS) + [0.0] * (len(USER_DEFINED) + 256) + [-500.0] * len(CHARS)
    merged = [-float(i) for i in range(len(MERGED))]
    if shuffle_scores:  # scores that disagree with the file order: only scores may rank the merges
        merged = merged[1::2] + merged[0::2]
    assert len(scores) == n_fixed
    return tokens, scores + merged, types


def _write(path, arch: str, *, shuffle_scores=False, add_space_prefix=None, chat=True):
    import gguf

    tokens, scores, types = _vocab(shuffle_scores)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_unk_token_id(3), w.add_pad_token_id(0)
    w.add_add_bos_token(True), w.add_add_eos_token(False)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if chat:
        w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


CASES = {  # id -> (architecture, writer options)
    "gemma3": ("gemma3", dict(add_space_prefix=False)),  # merges ranked by file order, no prefix space
    "gemma3-scores-ignored": ("gemma3", dict(add_space_prefix=False, shuffle_scores=True)),
    "llama-scores": ("llama", dict(shuffle_scores=True)),  # ranked by score, "▁" prefix
    "phi3": ("phi3", dict(add_space_prefix=True)),  # "▁" before the text and every space
}


@pytest.fixture(scope="module", params=list(CASES))
def tokenizers_pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    arch, options = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    path = _write(folder / "tok.gguf", arch, **options)
    return tokenizer_from_gguf(path), AutoTokenizer.from_pretrained(str(folder), gguf_file="tok.gguf")


def test_ids_and_decoding_equal_transformers(tokenizers_pair):
    ours, ref = tokenizers_pair
    for text in TEXTS:
        got = ours(text)["input_ids"]
        assert got == ref(text)["input_ids"], text
        assert got[:1] == [2]  # add_bos_token
        assert ours.decode(got) == ref.decode(got), text
        assert ours.decode(got, skip_special_tokens=True) == ref.decode(got, skip_special_tokens=True), text
    batch = ["hello", "the world and"]
    for side in ("left", "right"):  # GemmaTokenizer's class default is left; a GGUF does not say
        assert (ours(batch, padding=True, padding_side=side)["input_ids"]
                == ref(batch, padding=True, padding_side=side)["input_ids"])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr


def test_byte_fallback_and_round_trip(tokenizers_pair):
    ours, _ = tokenizers_pair
    ids = ours("😀", add_special_tokens=False)["input_ids"]
    tokens = ours.convert_ids_to_tokens(ids)
    want = [f"<0x{b:02X}>" for b in "😀".encode()]
    assert tokens[-4:] == want  # after an optional "▁" prefix piece
    # (no added tokens in these: with a prefix "▁", transformers prepends one after each added token too)
    for text in ("héllo wörld 日本 😀 𠀋", "x y z", "the end."):
        assert ours.decode(ours(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_equals_transformers(tokenizers_pair):
    ours, ref = tokenizers_pair
    for chat in CHAT:
        text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<bos><start_of_turn>user\n")
        assert (ours(text, add_special_tokens=False)["input_ids"]
                == ref(text, add_special_tokens=False)["input_ids"])


def test_merges_brute_force():
    """The merge list on a hand-sized vocabulary, written out from SentencePiece's rule."""
    pieces = ["a", "b", "c", "ab", "bc", "abc", "ca"]
    rank = [0, 0, 0, -1.0, -2.0, -3.0, -0.5]
    # ca (rank -0.5) first, then ab, bc, then abc's two splits, longer left part first
    assert sentencepiece_merges(pieces, rank) == [("c", "a"), ("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
