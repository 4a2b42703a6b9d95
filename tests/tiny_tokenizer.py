"""A tiny byte-level BPE tokenizer built offline, for tests that need a real Hugging Face tokenizer.

``make_tiny_tokenizer(folder)`` writes a ``transformers`` tokenizer folder (``tokenizer.json`` and
``tokenizer_config.json``) that ``AutoTokenizer.from_pretrained(folder)`` loads without network.

The vocabulary is small and fully known, so tests can compute expected ids by hand:

* ids 0-4 are special tokens: ``<|endoftext|>`` (0), ``<|im_start|>`` (1), ``<|im_end|>`` (2, the EOS),
  ``<pad>`` (3, the pad token), ``<s>`` (4, the BOS, added in front of every text when
  ``add_special_tokens=True``);
* ids 5-260 are the 256 bytes in GPT-2's byte-to-unicode alphabet: byte ``b`` has id ``5 + b``
  (see :func:`byte_id`);
* ids 261+ are the merges in :data:`MERGES`, in order: ``he`` (261), ``ll`` (262), ``hell`` (263),
  ``hello`` (264). So ``"hello"`` is one token while ``"hel"`` is ``he`` + ``l``.

The chat template is ChatML (the one SmolLM2-Instruct uses), without a BOS in the template.

Session-scoped fixtures ``tiny_tokenizer_dir`` (the folder) and ``tiny_tokenizer`` (the loaded
tokenizer) are defined here; a test module uses them after
``sys.path.insert(0, os.path.dirname(__file__))`` and
``from tiny_tokenizer import tiny_tokenizer, tiny_tokenizer_dir  # noqa: F401``.
"""

from __future__ import annotations

import os

import pytest

BOS, EOS, PAD, IM_START, ENDOFTEXT = "<s>", "<|im_end|>", "<pad>", "<|im_start|>", "<|endoftext|>"
SPECIALS = [ENDOFTEXT, IM_START, EOS, PAD, BOS]
SPECIAL_IDS = {tok: i for i, tok in enumerate(SPECIALS)}
BYTE_OFFSET = len(SPECIALS)
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The same template with ``{{ bos_token }}`` in front, like Llama 3's and Gemma's templates.
CHATML_WITH_BOS_TEMPLATE = "{{ bos_token }}" + CHATML_TEMPLATE


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_id(b: int) -> int:
    """The id of the single-byte token for byte value ``b``."""
    return BYTE_OFFSET + b


def byte_ids(text: str) -> list[int]:
    """The ids of ``text`` when no merge applies: one token per UTF-8 byte."""
    return [byte_id(b) for b in text.encode("utf-8")]


def make_tiny_tokenizer(path, *, chat_template: str | None = CHATML_TEMPLATE, add_bos: bool = True,
                        add_eos: bool = False, pad_token: str | None = PAD) -> str:
    """Writes the tiny tokenizer to the folder ``path`` and returns the folder as a string.

    Args:
      path: folder to create (or reuse).
      chat_template: Jinja chat template stored with the tokenizer (``None`` for none).
      add_bos: whether ``add_special_tokens=True`` puts ``<s>`` in front of a text.
      add_eos: whether ``add_special_tokens=True`` also puts the EOS after a text (some tokenizers do).
      pad_token: the pad token (``None`` leaves it unset, so code must fall back to the EOS).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[alphabet[b]] = byte_id(b)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if add_bos or add_eos:
        head, tail = (f"{BOS} " if add_bos else ""), (f" {EOS}" if add_eos else "")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{head}$A{tail}", pair=f"{head}$A{tail} {head}$B{tail}",
            special_tokens=[(BOS, SPECIAL_IDS[BOS]), (EOS, SPECIAL_IDS[EOS])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                  unk_token=ENDOFTEXT, pad_token=pad_token)
    if chat_template is not None:
        tok.chat_template = chat_template
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """Session-wide folder of the default tiny tokenizer (import this fixture into a test module)."""
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The default tiny tokenizer, loaded with ``AutoTokenizer`` (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir, local_files_only=True)
