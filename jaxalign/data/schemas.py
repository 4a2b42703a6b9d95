"""Built-in readers for the published schemas of the most-used preference data sets.

A *format* names one schema: the columns a data set's card documents, read as they are. Each reader turns
a record into zero or more preference pairs (TRL's standard or conversational form, with an explicit
prompt) plus their *provenance*: the record they came from, which of its responses were paired, and those
responses' scores (higher is better). The converted pairs then go through the same validation as any file
(:mod:`jaxalign.data.validate`). docs/data.md has the table of formats, columns and pair rules.

Choosing the reader: ``format=NAME`` forces one; otherwise the first record that is an object decides,
by its columns (and, where two schemas share columns, the type of a value): the first format of
:data:`DETECT_ORDER` whose required columns it has. No match, or field names other than
``prompt``/``chosen``/``rejected`` given, means ``trl`` (TRL's own formats, :mod:`jaxalign.data.formats`).

Indices: for a format with at most one pair per record, a pair's ``index`` is its record's position in
the source (as for TRL files). For the multi-response formats (``ultrafeedback``, ``nectar``) it is the
pair's position in the list of pairs built, in which each bad record also takes one position; the
provenance column ``source_index`` gives the record. Records that give no pair (tied scores, a margin
not reached, a ``tie`` status) are not errors: they are counted in ``no_pair``.

Provenance columns (one row per pair ``index``, bad records included with -1/NaN):
``source_index`` (int64), ``chosen_response`` and ``rejected_response`` (int64: the response's position
in the record's list, or the number in its field name: PKU ``response_0``/``response_1`` → 0/1,
HelpSteer2 ``response_1``/``response_2`` → 1/2; A/B and chosen/rejected → 0/1), ``chosen_score``,
``rejected_score`` (float64, NaN where the set has no score) and ``margin`` (their difference).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxalign.data.formats import Fields, Format, Messages, Text, detect_format, extract_prompt
from jaxalign.data.pairing import PairingRule, build_pairs
from jaxalign.data.read import RawRecord, Source
from jaxalign.data.validate import type_name
from jaxalign.errors import ConfigError

NAN = float("nan")
TRANSCRIPTS = ("text", "messages")
PROVENANCE_COLUMNS = ("index", "source_index", "chosen_response", "rejected_response", "chosen_score",
                      "rejected_score", "margin")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One pair built from a record, before validation (texts as in :class:`~jaxalign.data.Pair`)."""

    prompt: Text
    chosen: Text
    rejected: Text
    chosen_response: int = 0
    rejected_response: int = 1
    chosen_score: float = NAN
    rejected_score: float = NAN


@dataclasses.dataclass(frozen=True)
class ReaderOptions:
    """Options of the schema readers; ``None`` means not given (the format's default).

    Attributes:
      aspect: which label or rating to pair by (formats with :attr:`Schema.aspects`).
      pairing: the :class:`~jaxalign.data.pairing.PairingRule` of ranked formats.
      transcript: ``"text"`` (default) or ``"messages"`` for the Human/Assistant transcript formats.
    """

    aspect: str | None = None
    pairing: PairingRule | None = None
    transcript: str | None = None


class BadRecord(Exception):
    """A record that does not fit its schema: a :mod:`~jaxalign.data.validate` problem kind, why, where."""

    def __init__(self, kind: str, reason: str, field: str | None):
        super().__init__(reason)
        self.kind, self.reason, self.field = kind, reason, field


@dataclasses.dataclass(frozen=True)
class Schema:
    """One built-in format.

    Attributes:
      name: the format name (``--format NAME``, ``data.format``).
      dataset: the data set it reads (its Hugging Face id).
      card: the data set card the columns were taken from.
      columns: the columns a record must have (auto-detection matches on them).
      optional: further columns read when present (scores, labels).
      pairs: how pairs are built, in words.
      convert: ``(record, options, source_index) -> list[Candidate]``; raises :class:`BadRecord`.
      match: a further test of the first record for auto-detection (value types), or ``None``.
      aspects: the choices of ``aspect``, the default first.
      ranked: pairs come from :func:`~jaxalign.data.pairing.build_pairs` (the pairing options apply).
      multi: a record can give several pairs (``index`` numbers pairs, not records).
      transcript: reads Human/Assistant transcripts (``transcript`` applies; the pairs are
        conversational if ``"messages"``, else text); the other formats give conversational pairs.
    """

    name: str
    dataset: str
    card: str
    columns: tuple[str, ...]
    optional: tuple[str, ...]
    pairs: str
    convert: Callable[[dict, ReaderOptions, int], list[Candidate]]
    match: Callable[[dict], bool] | None = None
    aspects: tuple[str, ...] = ()
    ranked: bool = False
    multi: bool = False
    transcript: bool = False


@dataclasses.dataclass(frozen=True)
class Converted:
    """A source read through a schema.

    Attributes:
      source: one record per pair built (``{"prompt", "chosen", "rejected"}``), plus one per bad record
        (``error`` set); for ``trl``, the source itself.
      schema: the format name.
      fmt: the TRL format of the pairs (what validation and tokenization expect).
      fields: the field names of ``source``'s records.
      detected: why this format was used (one line).
      records: the number of records in the original source.
      no_pair: positions of the records that gave no pair (not errors).
      provenance: :data:`PROVENANCE_COLUMNS` as arrays, one row per record of ``source``.
      pairing: the pairing rule in words (ranked formats), else ``""``.
    """

    source: Source
    schema: str
    fmt: Format
    fields: Fields
    detected: str
    records: int
    no_pair: tuple[int, ...]
    provenance: dict[str, np.ndarray]
    pairing: str = ""


# --- reading values ---------------------------------------------------------------------------------

def _get(record: dict, name: str, kind: type = str, field: str | None = None) -> Any:
    field = field or name
    value = record.get(name)
    if value is None:
        raise BadRecord("missing-field", "missing field", field)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {str: "a string", list: "a list", dict: "an object", int: "an integer"}[kind]
        raise BadRecord("wrong-type", f"expected {what}, found {type_name(value)}", field)
    return value


def _number(record: dict, name: str, field: str | None = None, *, required: bool = True) -> float | None:
    """A numeric value (a number or a numeric string); ``None`` for ``"N/A"`` or, if not required,
    for a missing value."""
    field = field or name
    value = record.get(name)
    if value is None and not required:
        return None
    if isinstance(value, str) and value.strip().upper() == "N/A":
        return None
    try:
        if value is None or isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        if value is None:
            raise BadRecord("missing-field", "missing field", field) from None
        raise BadRecord("wrong-type", f"expected a number, found {type_name(value)}", field) from None


def _score(record: dict, name: str) -> float:
    value = _number(record, name, required=False)
    return NAN if value is None else value


def _conversation(record: dict, name: str) -> Messages:
    value = _get(record, name, list)
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord("wrong-type", f"a message must be an object, found {type_name(message)}",
                            f"{name}[{i}]")
        for key in ("role", "content"):
            _get(message, key, str, f"{name}[{i}].{key}")
    return value


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


# --- readers ----------------------------------------------------------------------------------------

def _prompt_and_conversations(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
    """HuggingFaceH4/ultrafeedback_binarized: ``prompt`` plus conversations that repeat it."""
    prompt = _get(record, "prompt")
    chosen, rejected = _conversation(record, "chosen"), _conversation(record, "rejected")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if len(conv) < 2 or conv[-1]["role"] != "assistant":
            raise BadRecord("mismatch", "expected the conversation to end with an assistant turn after "
                            "at least one other turn", name)
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("mismatch", "the turns before the last assistant turn differ from chosen's",
                        "rejected")
    users = [m for m in chosen if m["role"] == "user"]
    if not users or users[0]["content"] != prompt:
        raise BadRecord("mismatch", "the first user turn of chosen differs from 'prompt'", "chosen")
    return [Candidate(chosen[:-1], chosen[-1:], rejected[-1:], 0, 1, _score(record, "score_chosen"),
                      _score(record, "score_rejected"))]


def _implicit(chosen_score: str, rejected_score: str):
    """Conversations without a prompt column (trl-lib's and argilla's): the prompt is their common
    opening turns, as TRL's ``extract_prompt``."""

    def convert(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
        chosen, rejected = _conversation(record, "chosen"), _conversation(record, "rejected")
        prompt, chosen_rest, rejected_rest = extract_prompt(chosen, rejected)
        if not prompt:
            raise BadRecord("mismatch", "chosen and rejected share no opening turn (no prompt)", "rejected")
        return [Candidate(prompt, chosen_rest, rejected_rest, 0, 1, _score(record, chosen_score),
                          _score(record, rejected_score))]

    return convert


_TURN = re.compile(r"\n\n(Human|Assistant):")
_ASSISTANT = "\n\nAssistant:"


def _transcript_messages(text: str, field: str) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` → user a, assistant b, user c."""
    pieces = _TURN.split(text)
    if pieces[0].strip():
        raise BadRecord("mismatch", "text before the first '\\n\\nHuman:' turn", field)
    turns = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
             for role, content in zip(pieces[1::2], pieces[2::2])]
    if not turns or turns[-1]["role"] != "assistant" or turns[-1]["content"]:
        raise BadRecord("mismatch", "the prompt must end with an empty '\\n\\nAssistant:' turn", field)
    return turns[:-1]


def _transcript_pair(prompt: str, chosen: str, rejected: str, options: ReaderOptions,
                     field: str) -> tuple[Text, Text, Text]:
    if options.transcript == "messages":
        return (_transcript_messages(prompt, field), _assistant(chosen.strip()),
                _assistant(rejected.strip()))
    return prompt, chosen, rejected


def _hh_rlhf(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
    """Anthropic/hh-rlhf: two transcripts; the prompt runs to chosen's last ``\\n\\nAssistant:``."""
    chosen, rejected = _get(record, "chosen"), _get(record, "rejected")
    cut = chosen.rfind(_ASSISTANT)
    if cut < 0:
        raise BadRecord("mismatch", "no '\\n\\nAssistant:' turn in the transcript", "chosen")
    prompt = chosen[:cut + len(_ASSISTANT)]
    if not rejected.startswith(prompt) or _TURN.search(rejected[len(prompt):]):
        raise BadRecord("mismatch", "rejected is not chosen's prompt (the transcript up to its last "
                        "'\\n\\nAssistant:') followed by one answer", "rejected")
    texts = _transcript_pair(prompt, chosen[len(prompt):], rejected[len(prompt):], options, "chosen")
    return [Candidate(*texts, 0, 1)]


def _ranked(prompt: Text, responses: list[Text], scores: list[float | None], options: ReaderOptions,
            index: int, ids: list[int] | None = None) -> list[Candidate]:
    """The pairs the pairing rule picks among ``responses`` (each already in the output form)."""
    ids = ids or list(range(len(responses)))
    rule = options.pairing or PairingRule()
    return [Candidate(prompt, responses[i], responses[j], ids[i], ids[j], scores[i], scores[j])
            for i, j in build_pairs(scores, rule, source_index=index)]


def _nectar(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
    """berkeley-nest/Nectar: a Human/Assistant prompt and ranked answers (rank 1 best; score −rank)."""
    prompt = _get(record, "prompt").rstrip()
    if not prompt.endswith(_ASSISTANT.strip()):
        raise BadRecord("mismatch", "the prompt must end with 'Assistant:'", "prompt")
    answers = _get(record, "answers", list)
    texts, scores = [], []
    for i, answer in enumerate(answers):
        where = f"answers[{i}]"
        if not isinstance(answer, dict):
            raise BadRecord("wrong-type", f"expected an object, found {type_name(answer)}", where)
        texts.append(_get(answer, "answer", str, f"{where}.answer").strip())
        rank = _number(answer, "rank", f"{where}.rank")
        scores.append(None if rank is None else -rank)
    if options.transcript == "messages":
        return _ranked(_transcript_messages(prompt, "prompt"), [_assistant(t) for t in texts], scores,
                       options, index)
    return _ranked(prompt, [" " + t for t in texts], scores, options, index)


UF_RATINGS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
UF_ASPECTS = ("overall", "fine-grained", "mean-rating") + UF_RATINGS


def _uf_score(completion: dict, aspect: str, where: str) -> float | None:
    if aspect == "overall":
        return _number(completion, "overall_score", f"{where}.overall_score")
    if aspect == "fine-grained":
        return _number(completion, "fine-grained_score", f"{where}.fine-grained_score")
    notes = _get(completion, "annotations", dict, f"{where}.annotations")
    names = UF_RATINGS if aspect == "mean-rating" else (aspect,)
    ratings = []
    for name in names:
        entry = _get(notes, name, dict, f"{where}.annotations.{name}")
        ratings.append(_number(entry, "Rating", f"{where}.annotations.{name}.Rating"))
    ratings = [r for r in ratings if r is not None]
    return sum(ratings) / len(ratings) if ratings else None


def _ultrafeedback(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
    """openbmb/UltraFeedback: an instruction and rated completions, paired by one aspect."""
    instruction = _get(record, "instruction")
    texts, scores = [], []
    for i, completion in enumerate(_get(record, "completions", list)):
        where = f"completions[{i}]"
        if not isinstance(completion, dict):
            raise BadRecord("wrong-type", f"expected an object, found {type_name(completion)}", where)
        texts.append(_assistant(_get(completion, "response", str, f"{where}.response")))
        scores.append(_uf_score(completion, options.aspect or UF_ASPECTS[0], where))
    return _ranked(_user(instruction), texts, scores, options, index)


def _helpsteer_prompt(text: str) -> Messages:
    """HelpSteer2 writes earlier turns inline: ``u1 <extra_id_1>Assistant\\na1 <extra_id_1>User\\nu2``."""
    pieces = text.split("<extra_id_1>")
    turns = _user(pieces[0].strip())
    for piece in pieces[1:]:
        marker, _, content = piece.partition("\n")
        role = {"User": "user", "Assistant": "assistant"}.get(marker.strip())
        if role is None:
            raise BadRecord("mismatch", f"unknown turn marker '<extra_id_1>{marker.strip()}'", "prompt")
        turns.append({"role": role, "content": content.strip()})
    return turns


def _helpsteer2(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
    """nvidia/HelpSteer2 preference: ``preference_strength`` −3…3, negative when response_1 is better
    (response_1 scored 0, response_2 scored the strength; 0 is a tie)."""
    prompt = _helpsteer_prompt(_get(record, "prompt"))
    responses = [_assistant(_get(record, "response_1")), _assistant(_get(record, "response_2"))]
    strength = _number(record, "preference_strength")
    if strength is None or not -3 <= strength <= 3:
        raise BadRecord("bad-value", f"expected a number from -3 to 3, found {strength}",
                        "preference_strength")
    return _ranked(prompt, responses, [0.0, strength], options, index, ids=[1, 2])


def _labelled(prompt: Messages, responses: tuple[str, str], best: int,
              scores: tuple[float, float] = (NAN, NAN)) -> list[Candidate]:
    other = 1 - best
    return [Candidate(prompt, _assistant(responses[best]), _assistant(responses[other]), best, other,
                      scores[best], scores[other])]


def _shp(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
    """stanfordnlp/SHP: a post and two comments; ``labels`` 1 when A is preferred."""
    history = _get(record, "history")
    responses = (_get(record, "human_ref_A"), _get(record, "human_ref_B"))
    label = _get(record, "labels", int)
    if label not in (0, 1):
        raise BadRecord("bad-value", f"expected 0 or 1, found {label}", "labels")
    return _labelled(_user(history), responses, 0 if label == 1 else 1,
                     (_score(record, "score_A"), _score(record, "score_B")))


def _pku(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
    """PKU-Alignment/PKU-SafeRLHF: two responses, ``better_response_id`` and ``safer_response_id``."""
    prompt = _get(record, "prompt")
    responses = (_get(record, "response_0"), _get(record, "response_1"))
    key = f"{options.aspect or 'better'}_response_id"
    best = _get(record, key, int)
    if best not in (0, 1):
        raise BadRecord("bad-value", f"expected 0 or 1, found {best}", key)
    return _labelled(_user(prompt), responses, best)


def _orca(question: str, ties: bool):
    """Intel/orca_dpo_pairs and argilla/distilabel-intel-orca-dpo-pairs: a system prompt, a question and
    two answers (the distilabel set: a ``status`` of ``tie`` gives no pair, ``rating`` the scores)."""

    def convert(record: dict, options: ReaderOptions, index: int) -> list[Candidate]:
        system = record.get("system") or ""
        if not isinstance(system, str):
            raise BadRecord("wrong-type", f"expected a string, found {type_name(system)}", "system")
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + _user(
            _get(record, question))
        responses = (_get(record, "chosen"), _get(record, "rejected"))
        if ties and record.get("status") == "tie":
            return []
        rating = record.get("rating") if ties else None
        scores = (NAN, NAN)
        if isinstance(rating, list) and len(rating) == 2 and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) for r in rating):
            scores = (float(max(rating)), float(min(rating)))
        return _labelled(prompt, responses, 0, scores)

    return convert


def _first_user_is_prompt(record: dict) -> bool:
    return isinstance(record.get("prompt"), str) and isinstance(record.get("chosen"), list)


def _no_prompt_conversations(record: dict) -> bool:
    return "prompt" not in record and isinstance(record.get("chosen"), list)


def _hh_transcript(record: dict) -> bool:
    chosen = record.get("chosen")
    return "prompt" not in record and isinstance(chosen, str) and _ASSISTANT in chosen


_HF = "https://huggingface.co/datasets/"
SCHEMAS = {s.name: s for s in [
    Schema("ultrafeedback-binarized", "HuggingFaceH4/ultrafeedback_binarized",
           _HF + "HuggingFaceH4/ultrafeedback_binarized",
           ("prompt", "chosen", "rejected"), ("score_chosen", "score_rejected"),
           "one pair per record: prompt = the turns before the last assistant turn (the first user turn "
           "must equal `prompt`; rejected must share them), responses = the last assistant turns",
           _prompt_and_conversations, match=_first_user_is_prompt),
    Schema("trl-ultrafeedback", "trl-lib/ultrafeedback_binarized", _HF + "trl-lib/ultrafeedback_binarized",
           ("chosen", "rejected", "score_chosen", "score_rejected"), (),
           "one pair per record: prompt = the common opening turns, responses = the rest",
           _implicit("score_chosen", "score_rejected"), match=_no_prompt_conversations),
    Schema("dpo-mix", "argilla/dpo-mix-7k", _HF + "argilla/dpo-mix-7k",
           ("chosen", "rejected", "chosen_rating", "rejected_rating"), (),
           "one pair per record: prompt = the common opening turns, responses = the rest",
           _implicit("chosen_rating", "rejected_rating"), match=_no_prompt_conversations),
    Schema("hh-rlhf", "Anthropic/hh-rlhf", _HF + "Anthropic/hh-rlhf", ("chosen", "rejected"), (),
           "one pair per record: prompt = chosen up to and including its last `\\n\\nAssistant:` "
           "(rejected must start with it and add one answer), responses = the rest; "
           "`transcript=messages` turns the transcript into user/assistant messages",
           _hh_rlhf, match=_hh_transcript, transcript=True),
    Schema("shp", "stanfordnlp/SHP", _HF + "stanfordnlp/SHP",
           ("history", "human_ref_A", "human_ref_B", "labels"), ("score_A", "score_B"),
           "one pair per record: prompt = `history` as a user turn; chosen = comment A if `labels` "
           "is 1, else B", _shp),
    Schema("pku-saferlhf", "PKU-Alignment/PKU-SafeRLHF",
           _HF + "PKU-Alignment/PKU-SafeRLHF",
           ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id"), (),
           "one pair per record: chosen = response_{`better_response_id`} (aspect better, default) or "
           "response_{`safer_response_id`} (aspect safer)", _pku, aspects=("better", "safer")),
    Schema("helpsteer2-preference", "nvidia/HelpSteer2",
           _HF + "nvidia/HelpSteer2", ("prompt", "response_1", "response_2", "preference_strength"), (),
           "pair builder on scores (response_1: 0, response_2: `preference_strength`): negative "
           "strength prefers response_1, 0 gives no pair; `margin` keeps |strength| >= m",
           _helpsteer2, ranked=True),
    Schema("ultrafeedback", "openbmb/UltraFeedback",
           _HF + "openbmb/UltraFeedback", ("instruction", "completions"), (),
           "pair builder on one score per completion (aspect: `overall_score` (default), "
           "`fine-grained_score`, the mean of the four ratings, or one rating; N/A left out)",
           _ultrafeedback, aspects=UF_ASPECTS, ranked=True, multi=True),
    Schema("nectar", "berkeley-nest/Nectar",
           _HF + "berkeley-nest/Nectar", ("prompt", "answers"), (),
           "pair builder on score = −rank (rank 1 is best); prompt = the transcript up to its final "
           "`Assistant:`, responses = `\" \" + answer`; `transcript=messages` as for hh-rlhf",
           _nectar, ranked=True, multi=True, transcript=True),
    Schema("orca-dpo", "Intel/orca_dpo_pairs", _HF + "Intel/orca_dpo_pairs",
           ("system", "question", "chosen", "rejected"), (),
           "one pair per record: prompt = `system` (when not empty) and `question` as messages",
           _orca("question", ties=False)),
    Schema("distilabel-orca", "argilla/distilabel-intel-orca-dpo-pairs",
           _HF + "argilla/distilabel-intel-orca-dpo-pairs", ("system", "input", "chosen", "rejected"),
           ("status", "rating"),
           "as orca-dpo with `input` for the question; a `status` of `tie` gives no pair; scores = "
           "`rating` (higher for chosen)", _orca("input", ties=True)),
]}
TRL = "trl"
DETECT_ORDER = ("ultrafeedback", "nectar", "pku-saferlhf", "helpsteer2-preference", "shp",
                "distilabel-orca", "orca-dpo", "ultrafeedback-binarized", "trl-ultrafeedback", "dpo-mix",
                "hh-rlhf")
FORMATS = tuple(SCHEMAS) + (TRL,)


def check_format(name: str | None) -> None:
    if name is not None and name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; known: {', '.join(FORMATS)} (jaxalign data list)")


def detect_schema(values: list[Any], fields: Fields = Fields()) -> tuple[str, str]:
    """The format of the first record that is an object, and why (one line)."""
    first = next(((i, v) for i, v in enumerate(values) if isinstance(v, dict)), None)
    if first is None:
        return TRL, "no record is an object; TRL's formats"
    i, record = first
    if fields != Fields():
        return TRL, "field names given; TRL's formats"
    for name in DETECT_ORDER:
        schema = SCHEMAS[name]
        if all(c in record for c in schema.columns) and (schema.match is None or schema.match(record)):
            return name, (f"record {i} has the columns {', '.join(schema.columns)} of "
                          f"{schema.dataset}")
    shown = ", ".join(sorted(record)[:12]) + (", ..." if len(record) > 12 else "")
    return TRL, f"no built-in schema matches the columns of record {i} ({shown}); TRL's formats"


def _check_options(schema: Schema | None, options: ReaderOptions, name: str) -> None:
    def used_by(test) -> str:
        return ", ".join(s.name for s in SCHEMAS.values() if test(s))

    if options.aspect is not None:
        if schema is None or not schema.aspects:
            raise ConfigError(f"aspect applies to the formats {used_by(lambda s: s.aspects)}, not {name}")
        if options.aspect not in schema.aspects:
            raise ConfigError(f"aspect of {name} must be one of {schema.aspects}, got {options.aspect!r}")
    if options.pairing is not None and (schema is None or not schema.ranked):
        raise ConfigError(f"pairing, margin and pairs_per_prompt apply to the ranked formats "
                          f"{used_by(lambda s: s.ranked)}, not {name}")
    if options.transcript is not None:
        if options.transcript not in TRANSCRIPTS:
            raise ConfigError(f"transcript must be one of {TRANSCRIPTS}, got {options.transcript!r}")
        if schema is None or not schema.transcript:
            raise ConfigError(f"transcript applies to the formats {used_by(lambda s: s.transcript)}, "
                              f"not {name}")


def convert_source(src: Source, *, format: str | None = None, fields: Fields = Fields(),
                   options: ReaderOptions = ReaderOptions()) -> Converted:
    """Reads ``src`` through the format ``format`` (detected when ``None``; module doc).

    Raises:
      ConfigError: an unknown format, or an option that the format does not have.
    """
    check_format(format)
    values = [r.value for r in src.records if r.error is None]
    name, why = (format, f"format {format!r} given") if format else detect_schema(values, fields)
    schema = SCHEMAS.get(name)
    _check_options(schema, options, name)
    if schema is None:
        fmt = detect_format(values, fields)
        n = len(src.records)
        idx = np.array([r.index for r in src.records], np.int64)
        prov = _provenance(idx, idx, [Candidate("", "", "", 0, 1)] * n)
        return Converted(src, TRL, fmt, fields, why, n, (), prov)
    if fields != Fields():
        raise ConfigError(f"prompt_field, chosen_field and rejected_field apply to the trl format, not "
                          f"{name}")
    return _convert(src, schema, options, why)


def _convert(src: Source, schema: Schema, options: ReaderOptions, why: str) -> Converted:
    rows, sources, candidates, no_pair = [], [], [], []
    empty = Candidate("", "", "", -1, -1)
    for raw in src.records:
        index = len(rows) if schema.multi else raw.index
        note = f" (source record {raw.index})" if schema.multi else ""
        bad = None
        if raw.error is not None:
            bad = RawRecord(index, None, raw.error + note, raw.line, raw.error_kind, raw.error_field)
        elif not isinstance(raw.value, dict):
            bad = RawRecord(index, None, f"a record must be an object, found {type_name(raw.value)}"
                            + note, raw.line, "not-an-object")
        else:
            try:
                built = schema.convert(raw.value, options, raw.index)
            except BadRecord as err:
                bad = RawRecord(index, None, err.reason + note, raw.line, err.kind, err.field)
        if bad is not None:
            rows.append(bad)
            sources.append(raw.index)
            candidates.append(empty)
            continue
        if not built:
            no_pair.append(raw.index)
        for c in built:
            value = {"prompt": c.prompt, "chosen": c.chosen, "rejected": c.rejected}
            rows.append(RawRecord(len(rows) if schema.multi else raw.index, value, None, raw.line))
            sources.append(raw.index)
            candidates.append(c)
    conversational = options.transcript == "messages" if schema.transcript else True
    idx = np.array([r.index for r in rows], np.int64)
    pairing = (options.pairing or PairingRule()).describe() if schema.ranked else ""
    if schema.aspects:
        pairing = f"aspect {options.aspect or schema.aspects[0]}" + (f", {pairing}" if pairing else "")
    out = Source(src.name, src.kind, rows, src.fingerprint, src.parts)
    return Converted(out, schema.name, Format(conversational=conversational), Fields(), why,
                     len(src.records), tuple(no_pair),
                     _provenance(idx, np.array(sources, np.int64), candidates), pairing)


def _provenance(index: np.ndarray, source_index: np.ndarray,
                candidates: list[Candidate]) -> dict[str, np.ndarray]:
    def column(name: str, dtype) -> np.ndarray:
        return np.array([getattr(c, name) for c in candidates], dtype).reshape(-1)

    chosen, rejected = column("chosen_score", np.float64), column("rejected_score", np.float64)
    return {"index": index, "source_index": source_index,
            "chosen_response": column("chosen_response", np.int64),
            "rejected_response": column("rejected_response", np.int64),
            "chosen_score": chosen, "rejected_score": rejected, "margin": chosen - rejected}


def formats_table() -> str:
    """One line per format: name, data set, columns read (for ``jaxalign data list``)."""
    lines = [f"{'format':24s} {'data set':44s} columns read"]
    for s in SCHEMAS.values():
        cols = ", ".join(s.columns + tuple(f"[{c}]" for c in s.optional))
        lines.append(f"{s.name:24s} {s.dataset:44s} {cols}")
    lines.append(f"{TRL:24s} {'(TRL: standard, conversational, implicit)':44s} prompt, chosen, rejected")
    return "\n".join(lines)
