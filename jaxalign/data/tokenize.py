"""Joint tokenization of preference pairs (the sequence convention, DESIGN §3), and length limits.

For a pair with prompt text ``x`` and response text ``y`` (chosen or rejected)::

    prompt_ids   = tok(x)
    full_ids     = tok(x + y)
    response_ids = full_ids[len(prompt_ids):] + [eos]

* Plain text (standard format) is tokenized with ``add_special_tokens=True``, so a BOS appears exactly
  when the tokenizer adds one; special tokens a tokenizer would add at the *end* (an EOS some tokenizers
  append) are removed before the split. Chat-template-rendered text (conversational format, or
  ``chat=True``) is tokenized with ``add_special_tokens=False``: the template already holds every special
  token it wants, BOS included, so no second BOS appears.
* The EOS (``tokenizer.eos_token_id``) is appended unless the response already ends with it (a chat
  template that closes the turn with the EOS token, as ChatML with ``<|im_end|>`` as EOS).
  With ``append_eos=False`` nothing is appended (a response is its own tokens: a one-token answer
  stays one token); a response with no tokens is then a bad record (kind ``empty-response``).
* When ``full_ids[:len(prompt_ids)] != prompt_ids`` (a token merges across the boundary) the split above
  is still used, and the number of such records is reported (``DataReport.prompt_mismatch``) with a
  warning.

Length limits (``None`` = none), never silent:

* ``max_prompt_length``: a longer prompt is cut to its last (``truncation_mode="keep_end"``, TRL's
  default) or first (``"keep_start"``) ``max_prompt_length`` tokens.
* ``max_length``: a longer ``prompt + response`` keeps the start of its response (the EOS is then cut
  too). A record whose prompt leaves no room for one response token is a bad record.
* ``overlong``: ``"truncate"`` (default; counted in ``DataReport.truncated``), ``"drop"`` (the record is
  skipped with kind ``over-long``, whatever ``on_bad_record`` says) or ``"error"`` (DataError).

Tokens are stored ragged: one flat ``int32`` array per field plus ``int64`` offsets.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxalign.data.formats import as_messages, render_chat
from jaxalign.data.validate import Pair, Problem
from jaxalign.errors import ConfigError

TRUNCATION_MODES = ("keep_end", "keep_start")
OVERLONG_POLICIES = ("truncate", "drop", "error")
_CHUNK = 2048  # records per batched tokenizer call


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Variable-length rows stored flat: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``.

    Attributes:
      values: ``[sum of lengths]`` int32.
      offsets: ``[N + 1]`` int64, ``offsets[0] == 0``.
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[list[int]]) -> Ragged:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32,
                             count=int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """``[N]`` int64."""
        return np.diff(self.offsets)


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of the kept records.

    Attributes:
      index: ``[N]`` int64, each record's position in its source.
      prompt: the prompt ids (BOS included when the tokenizer adds one).
      chosen: the chosen response ids, EOS included.
      rejected: the rejected response ids, EOS included.
    """

    index: np.ndarray
    prompt: Ragged
    chosen: Ragged
    rejected: Ragged

    def __len__(self) -> int:
        return len(self.index)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"index": self.index}
        for name in ("prompt", "chosen", "rejected"):
            part = getattr(self, name)
            out[f"{name}_ids"], out[f"{name}_offsets"] = part.values, part.offsets
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TokenizedPairs:
        parts = {name: Ragged(np.asarray(arrays[f"{name}_ids"], np.int32),
                              np.asarray(arrays[f"{name}_offsets"], np.int64))
                 for name in ("prompt", "chosen", "rejected")}
        return cls(np.asarray(arrays["index"], np.int64), **parts)


@dataclasses.dataclass(frozen=True)
class TokenizeResult:
    """The output of :func:`tokenize_pairs`.

    Attributes:
      tokens: the kept records.
      problems: records that could not be tokenized (subject to ``on_bad_record``).
      dropped: over-long records left out because ``overlong="drop"``.
      truncated: how many kept records were shortened.
      prompt_mismatch: how many kept records had their prompt tokens changed by joint tokenization.
    """

    tokens: TokenizedPairs
    problems: list[Problem]
    dropped: list[Problem]
    truncated: int
    prompt_mismatch: int


def check_length_options(max_length: int | None, max_prompt_length: int | None,
                         truncation_mode: str, overlong: str) -> None:
    """Raises ConfigError naming the option when a length option is out of range."""
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
    if max_length is not None and max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (one prompt and one response token), "
                          f"got {max_length}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")


def special_ids(tokenizer) -> tuple[int, int]:
    """``(eos_id, pad_id)``; the pad id falls back to the EOS when the tokenizer has no pad token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token (eos_token_id is None); set one, e.g. "
                          "tokenizer.eos_token = '</s>'")
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(eos), int(eos if pad is None else pad)


def tokenize_pairs(pairs: list[Pair], tokenizer, *, conversational: bool = False, chat: bool = False,
                   max_length: int | None = None, max_prompt_length: int | None = None,
                   truncation_mode: str = "keep_end", overlong: str = "truncate",
                   source_name: str = "<data>", line_of: dict[int, int] | None = None,
                   append_eos: bool = True) -> TokenizeResult:
    """Tokenizes pairs jointly (module doc), in batches, and applies the length limits.

    Args:
      pairs: valid pairs (:func:`jaxalign.data.validate.validate_source`).
      tokenizer: any tokenizer with the Hugging Face call interface (``PreTrainedTokenizerBase``).
      conversational: the pairs hold messages; they are rendered with the chat template.
      chat: render standard-format pairs as one user and one assistant message with the template.
      max_length, max_prompt_length, truncation_mode, overlong: the length limits (module doc).
      source_name: for error messages.
      line_of: source line of each record index, for error messages.
      append_eos: end each response with EOS (module doc); ``False``: the response's tokens only.

    Returns:
      The :class:`TokenizeResult`; its tokens keep the order of ``pairs``.

    Raises:
      ConfigError: a bad option, no EOS token, or no chat template when one is needed.
      DataError: an over-long record with ``overlong="error"``.
    """
    check_length_options(max_length, max_prompt_length, truncation_mode, overlong)
    eos, _ = special_ids(tokenizer)
    templated = conversational or chat
    if templated and getattr(tokenizer, "chat_template", None) is None:
        why = "conversational data needs" if conversational else "chat=True needs"
        raise ConfigError(f"{why} a chat template, and the tokenizer has none")
    line_of = line_of or {}
    texts, problems = _texts(pairs, tokenizer, conversational, chat, line_of)
    suffix = 0 if templated else _special_suffix_length(tokenizer)
    rows: dict[str, list] = {"index": [], "prompt": [], "chosen": [], "rejected": []}
    dropped, truncated, mismatch = [], 0, 0
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start:start + _CHUNK]
        p_ids, c_full, r_full = (
            _encode(tokenizer, [t[k] for t in chunk], not templated, suffix) for k in (1, 2, 3))
        for (index, *_), p, cf, rf in zip(chunk, p_ids, c_full, r_full):
            c, r = _response(cf, len(p), eos, append_eos), _response(rf, len(p), eos, append_eos)
            if not (c and r):
                problems.append(Problem(index, "empty-response", "a response has no tokens (and append_eos "
                                        "is off)", None, line_of.get(index)))
                continue
            fitted = _fit(p, c, r, max_length, max_prompt_length, truncation_mode)
            cannot_fit = isinstance(fitted, str)
            if cannot_fit or (fitted[1] and overlong != "truncate"):
                reason = fitted if cannot_fit else _too_long_reason(p, c, r, max_length,
                                                                    max_prompt_length)
                problem = Problem(index, "over-long", reason, None, line_of.get(index))
                if overlong == "error":
                    raise problem.to_error(source_name)
                # under "truncate", a record that cannot be cut to fit is a bad record
                (problems if overlong == "truncate" else dropped).append(problem)
                continue
            (p2, c2, r2), was_cut = fitted
            truncated += was_cut
            mismatch += cf[:len(p)] != p or rf[:len(p)] != p
            for key, value in (("index", index), ("prompt", p2), ("chosen", c2), ("rejected", r2)):
                rows[key].append(value)
    tokens = TokenizedPairs(np.asarray(rows["index"], np.int64), Ragged.from_rows(rows["prompt"]),
                            Ragged.from_rows(rows["chosen"]), Ragged.from_rows(rows["rejected"]))
    return TokenizeResult(tokens, problems, dropped, truncated, int(mismatch))


def _texts(pairs, tokenizer, conversational, chat, line_of):
    """``[(index, prompt, prompt + chosen, prompt + rejected)]`` as strings, and rendering problems."""
    from jinja2 import TemplateError

    texts, problems = [], []
    for pair in pairs:
        if not (conversational or chat):
            texts.append((pair.index, pair.prompt, pair.prompt + pair.chosen,
                          pair.prompt + pair.rejected))
            continue
        messages = ((pair.prompt, pair.chosen, pair.rejected) if conversational
                    else as_messages(pair.prompt, pair.chosen, pair.rejected))
        try:
            prompt, chosen, rejected = render_chat(tokenizer, *messages)
        except TemplateError as err:
            problems.append(Problem(pair.index, "chat-template", f"the chat template failed: {err}",
                                    None, line_of.get(pair.index)))
            continue
        texts.append((pair.index, prompt, prompt + chosen, prompt + rejected))
    return texts, problems


def _encode(tokenizer, texts: list[str], add_special: bool, suffix: int) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=add_special, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    return [list(row[:len(row) - suffix]) for row in ids]


def _special_suffix_length(tokenizer) -> int:
    """How many special tokens ``add_special_tokens=True`` puts *after* a text (usually 0)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def _response(full: list[int], prompt_length: int, eos: int, append_eos: bool = True) -> list[int]:
    response = full[prompt_length:]
    if append_eos and (not response or response[-1] != eos):
        response = response + [eos]
    return response


def _fit(p, c, r, max_length, max_prompt_length, truncation_mode):
    """``((p, c, r), was_cut)`` within the limits, or the reason (a string) they cannot be met."""
    cut = False
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p = p[-max_prompt_length:] if truncation_mode == "keep_end" else p[:max_prompt_length]
        cut = True
    if max_length is not None:
        room = max_length - len(p)
        if room < 1:
            return (f"over-long: the prompt has {len(p)} tokens, which leaves no room for a response "
                    f"within max_length={max_length}")
        if len(c) > room or len(r) > room:
            c, r, cut = c[:room], r[:room], True
    return (p, c, r), cut


def _too_long_reason(p, c, r, max_length, max_prompt_length) -> str:
    if max_prompt_length is not None and len(p) > max_prompt_length:
        return f"over-long: prompt has {len(p)} tokens > max_prompt_length={max_prompt_length}"
    return (f"over-long: prompt + response has {len(p) + max(len(c), len(r))} tokens > "
            f"max_length={max_length}")
