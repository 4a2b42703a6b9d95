"""TRL's preference formats: detection, implicit prompts and chat-template rendering.

Formats (the names TRL uses):

* **standard**: ``{"prompt": str, "chosen": str, "rejected": str}``; the sequences are the plain
  concatenations ``prompt + chosen`` and ``prompt + rejected``.
* **conversational**: ``prompt``, ``chosen`` and ``rejected`` are lists of ``{"role", "content"}``
  messages; the prompt is rendered with the tokenizer's chat template and
  ``add_generation_prompt=True`` (or ``continue_final_message=True`` when the prompt ends with an
  assistant message), each response as the rest of ``template(prompt + response)``.
* **implicit prompt** (either of the above without a ``prompt`` field): the prompt is the longest
  common prefix of ``chosen`` and ``rejected`` (of messages, or of characters for strings), like TRL's
  ``extract_prompt``; at least one element is left to each response, and for strings a space at the end of
  the prefix moves into the responses.

The format of a data set is decided by its first record that has a ``chosen`` field (a list means
conversational, no ``prompt`` field means implicit); every record must then have that format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

Messages = list[dict[str, str]]
Text = str | Messages


@dataclasses.dataclass(frozen=True)
class Fields:
    """Field names of a record (TRL's by default)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclasses.dataclass(frozen=True)
class Format:
    """The format of a data set.

    Attributes:
      conversational: prompt and responses are lists of messages.
      implicit_prompt: records have no prompt field; it is extracted from chosen and rejected.
    """

    conversational: bool = False
    implicit_prompt: bool = False

    @property
    def name(self) -> str:
        base = "conversational" if self.conversational else "standard"
        return base + (" (implicit prompt)" if self.implicit_prompt else "")


def detect_format(values: list[Any], fields: Fields) -> Format:
    """The format of the first record that is a dict with a chosen field (standard if none is)."""
    for value in values:
        if isinstance(value, dict) and fields.chosen in value:
            return Format(conversational=isinstance(value[fields.chosen], list),
                          implicit_prompt=fields.prompt not in value)
    return Format()


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Splits two sequences that share a prompt into ``(prompt, chosen, rejected)``.

    The prompt is their longest common prefix, cut so that each response keeps at least one element
    (message or character); for strings a trailing space of the prefix moves into the responses, as in
    TRL's ``extract_prompt``.

    >>> extract_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5")
    ('Q: 2+2? A:', ' 4', ' 5')
    """
    limit = min(len(chosen), len(rejected)) - 1
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = min(common_prefix_length(chosen, rejected), max(limit, 0))
    else:
        n = 0
        while n < limit and chosen[n] == rejected[n]:
            n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def as_messages(prompt: str, chosen: str, rejected: str) -> tuple[Messages, Messages, Messages]:
    """Wraps a standard-format pair as one user turn and one assistant turn (whitespace stripped)."""
    return ([{"role": "user", "content": prompt.strip()}],
            [{"role": "assistant", "content": chosen.strip()}],
            [{"role": "assistant", "content": rejected.strip()}])


def render_chat(tokenizer, prompt: Messages, chosen: Messages,
                rejected: Messages) -> tuple[str, str, str]:
    """Renders a conversational pair with the tokenizer's chat template.

    The prompt text is ``template(prompt, add_generation_prompt=True)`` (``continue_final_message`` when
    the prompt ends with an assistant message); each response text is the rest of
    ``template(prompt + response)`` after the prompt text. When a template renders the prompt
    differently alone and followed by a response (some insert a ``<think>`` tag), the prompt text is the
    common prefix of the three renderings, as in TRL. When a response ends with the EOS token followed
    only by whitespace (ChatML's ``<|im_end|>\\n``), the whitespace is dropped: a model stops at the EOS,
    and the EOS is then not appended a second time.

    Returns:
      ``(prompt_text, chosen_text, rejected_text)``; ``prompt_text + chosen_text`` is the chosen sequence.

    Raises:
      jinja2.TemplateError: the template rejects the messages (the caller reports the record).
    """
    continue_final = bool(prompt) and prompt[-1].get("role") == "assistant"
    options = {"continue_final_message": True} if continue_final else {"add_generation_prompt": True}
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, **options)
    full_chosen = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    full_rejected = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    n = common_prefix_length(prompt_text, full_chosen, full_rejected)
    eos = getattr(tokenizer, "eos_token", None)
    return (full_chosen[:n], _strip_after_eos(full_chosen[n:], eos),
            _strip_after_eos(full_rejected[n:], eos))


def common_prefix_length(*texts: str) -> int:
    """Length of the longest common prefix of strings (binary search on slices, fast for long texts).

    >>> common_prefix_length("abcd", "abxd", "abc")
    2
    """
    lo, hi = 0, min(len(t) for t in texts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        head = texts[0][:mid]
        if all(t[:mid] == head for t in texts[1:]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _strip_after_eos(text: str, eos: str | None) -> str:
    stripped = text.rstrip()
    if eos and stripped.endswith(eos):
        return stripped
    return text
