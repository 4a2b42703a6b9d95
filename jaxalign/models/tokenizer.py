"""Tokenizers: from a Hugging Face folder (``AutoTokenizer``, local files only) or built from a GGUF file.

transformers' own GGUF tokenizer path imports torch, so for GGUF files we build the tokenizer here from
the file's metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``) with the ``tokenizers``
library and wrap it in ``transformers.PreTrainedTokenizerFast``.

Supported GGUF tokenizers (``tokenizer.ggml.model``):

* ``"gpt2"``: byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2, StarCoder, …) with one of the
  pre-tokenizers in :data:`GGUF_PRE_TOKENIZERS` (``tokenizer.ggml.pre``; absent means GPT-2's).
* ``"llama"``: SentencePiece BPE with byte fallback (Gemma, Llama 2, Mistral, Phi-3). A GGUF stores no
  merges for it, only the pieces and their scores; SentencePiece's BPE merges, at each step, the adjacent
  pair whose concatenation is the best-ranked piece (Kudo & Richardson, "SentencePiece", 2018, §3), so the
  merge list is every ``(left, right)`` split of a piece into two pieces, ranked by the merged piece. The
  rank is the score, except for Gemma, whose scores do not follow its merge order but whose file order does
  (as transformers' GGUF converter ranks them), and whose all-space pieces llama.cpp writes with real
  spaces (respelled ``▁``). Spaces are spelled ``▁``; a prefix ``▁`` is added when
  ``tokenizer.ggml.add_space_prefix`` (default true; false for Gemma); characters with no piece become
  ``<0xXX>`` byte tokens.

Unigram (``"t5"``) and WordPiece (``"bert"``) GGUF tokenizers raise ``ModelError``; convert such a
model with its original HF tokenizer files instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from jaxalign.errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Splitting regexes of llama.cpp's byte-level pre-tokenizers (before the byte-to-unicode mapping).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how text is split before BPE: "gpt2" (GPT-2's regex), "digits" (each digit
# alone, then GPT-2's regex: StarCoder/SmolLM), or a regex.
GGUF_PRE_TOKENIZERS: Mapping[str, str] = {
    "default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2",
    "starcoder": "digits", "smollm": "digits", "refact": "digits",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPM_SPACE = "\u2581"  # SentencePiece's spelling of a space
# Gemma's SentencePiece pieces are ranked by file order, not by score, and its all-space pieces are
# written with real spaces
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def load_tokenizer(folder: str | os.PathLike):
    """``AutoTokenizer`` of a HF folder (local files only), or ``None`` when it has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}: cannot load the tokenizer: {err}") from None


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str | None, source: str):
    from tokenizers import Regex, pre_tokenizers

    kind = GGUF_PRE_TOKENIZERS.get(pre or "default")
    if kind is None:
        raise ModelError(f"{source}: GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; "
                         f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_backend(metadata: Mapping[str, Any], source: str):
    """``(tokenizers.Tokenizer, pieces as the vocabulary spells them)`` of a ``"gpt2"`` GGUF tokenizer."""
    from tokenizers import Tokenizer, decoders, models

    if "tokenizer.ggml.merges" not in metadata:
        raise ModelError(f"{source}: GGUF metadata key 'tokenizer.ggml.merges' is missing")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre"), source)
    tok.decoder = decoders.ByteLevel()
    return tok, spelled


def sentencepiece_merges(pieces: list[str], rank: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's greedy merging over ``pieces``.

    Args:
      pieces: the vocabulary, index = token id.
      rank: per piece, higher merges first (the score, or minus the position).

    Returns every ``(left, right)`` with ``left``, ``right`` and ``left + right`` all pieces, best merged
    piece first. Equal ranks (two splits of one piece, or pieces with one score) put the longer left part
    first, then the earlier piece: the order transformers' converter gives these ties, which SentencePiece
    itself breaks by position in the text.
    """
    ids = {p: i for i, p in enumerate(pieces)}
    best = {p: r for p, r in zip(pieces, rank)}  # a repeated piece keeps its last rank, as ``ids`` its last id
    keyed = []
    for order, piece in enumerate(ids):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                keyed.append(((-best[piece], -cut, cut - len(piece), order), left, right))
    keyed.sort(key=lambda item: item[0])
    return [(left, right) for _, left, right in keyed]


def _sentencepiece_backend(metadata: Mapping[str, Any], source: str):
    """``(tokenizers.Tokenizer, pieces as the vocabulary spells them)`` of a ``"llama"`` GGUF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    arch = str(metadata.get("general.architecture", ""))
    pieces = list(metadata["tokenizer.ggml.tokens"])
    if arch in _GEMMA_ARCHITECTURES:  # the text is matched with "▁"s (other files keep such pieces added)
        pieces = [_SPM_SPACE * len(t) if t and not t.strip(" ") else t for t in pieces]
        rank = [-float(i) for i in range(len(pieces))]
    elif "tokenizer.ggml.scores" in metadata:
        rank = [float(x) for x in metadata["tokenizer.ggml.scores"]]
    else:
        raise ModelError(f"{source}: GGUF metadata key 'tokenizer.ggml.scores' is missing")
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    unk_piece = pieces[int(unk)] if unk is not None and 0 <= int(unk) < len(pieces) else None
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                               merges=sentencepiece_merges(pieces, rank),
                               unk_token=unk_piece, fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch == "phi3":  # a "▁" before the text and before every space, as Phi-3's own tokenizer.json does
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE),
                                               normalizers.Replace(" ", _SPM_SPACE)])
    elif prefix:  # a "▁" before the first piece of the text only
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPM_SPACE, prepend_scheme="first",
                                                     split=False)
    else:  # the whole text is one word: merges may cross spaces, as in SentencePiece
        tok.normalizer = normalizers.Replace(" ", _SPM_SPACE)
    if prefix or arch == "phi3":
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok, pieces


_BACKENDS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str = "GGUF file"):
    """Builds a ``PreTrainedTokenizerFast`` from GGUF tokenizer metadata (``tokenizer.ggml.*``).

    Args:
      metadata: GGUF key -> value (strings, ints, lists), as :class:`jaxalign.models.gguf_file.GGUFFile`
        reads them (``general.architecture`` picks Gemma's and Phi-3's SentencePiece variants).
      source: the file, for error messages.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in _BACKENDS:
        raise ModelError(f"{source}: GGUF tokenizer model tokenizer.ggml.model={kind!r} is not supported; "
                         "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")
    if "tokenizer.ggml.tokens" not in metadata:
        raise ModelError(f"{source}: GGUF metadata key 'tokenizer.ggml.tokens' is missing")
    tok, spelled = _BACKENDS[kind](metadata, source)
    tokens = list(metadata["tokenizer.ggml.tokens"])
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = set(spelled)
    # Control tokens (<|im_start|>, <start_of_turn>) are matched whole and are special; user-defined
    # ones (<think>, Gemma's "\n\n") are matched whole too. In a byte-level vocabulary a "control"
    # token outside the byte alphabet is a llama.cpp mislabel of an ordinary token and stays ordinary.
    letters = set(_byte_alphabet().values()) if kind == "gpt2" else None
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types)
                            if ty == _CONTROL and (letters is None or set(t) <= letters)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        def template(seq):
            return ([bos] if add_bos else []) + [seq] + ([eos] if add_eos else [])

        used = {t for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        tok.post_processor = processors.TemplateProcessing(
            single=template("$A"), pair=template("$A") + template("$B:1"),
            special_tokens=[(t, tok.token_to_id(t)) for t in used])
    kwargs = {name: value for name, value in (("bos_token", bos), ("eos_token", eos),
                                              ("unk_token", token("unknown_token_id")),
                                              ("pad_token", token("padding_token_id")))
              if value is not None}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    template = metadata.get("tokenizer.chat_template")
    if template is not None:
        wrapped.chat_template = template
    return wrapped


def tokenizer_from_gguf(gguf) -> Any:
    """Tokenizer of a GGUF file (a path or an opened :class:`~jaxalign.models.gguf_file.GGUFFile`)."""
    from jaxalign.models.gguf_file import GGUFFile

    g = gguf if isinstance(gguf, GGUFFile) else GGUFFile(gguf)
    return tokenizer_from_gguf_metadata(g.metadata, source=g.path)
