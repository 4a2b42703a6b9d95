"""The judges of ``jaxalign sample``: each gives every sampled response a score; higher is preferred.

Letters: N responses scored at once, T the padded length of ``prompt + response``.

A judge is named on the command line as ``NAME`` or ``NAME:ARGUMENT`` (:func:`parse_judge`):

``refusal``
    1 when the response contains one of the phrases of :data:`REFUSAL_PATTERNS` (case-insensitive,
    curly apostrophes read as straight ones), else 0: refusals are preferred, as in Razin et al.
    (ICLR 2025, §6), who made pairs from on-policy samples with the refusal preferred.
``length``
    ``len(response)``: the number of characters of the decoded response (longer is preferred; use
    ``python:`` for the opposite).
``logp`` or ``logp:MODEL`` (a folder, ``.gguf`` or ``pkg:MODULE/FILE``)
    ``log π(y|x)`` summed over the sampled response tokens (the EOS included when the response ended with
    one) under MODEL (default: the sampling model itself). MODEL must use the sampling model's tokenizer
    (the same vocabulary), because the sampled token ids are scored as they are.
``reward-model:RUN_DIR``
    ``r(x, y)`` of the reward model (discriminator) of a ``jaxalign online`` run whose
    ``discriminator.kind`` is ``reward_model``, at its latest checkpoint
    (:mod:`jaxalign.online.reward_model`: a linear head on the last token's final hidden state). Its
    backbone must use the sampling model's tokenizer.
``python:MODULE:FUNCTION``
    ``FUNCTION(prompt, response) -> float`` imported from MODULE (on ``sys.path``); ``prompt`` is the
    prompt as read (a string, or a list of messages), ``response`` the decoded text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from jaxalign import pairs
from jaxalign.errors import ConfigError, JaxAlignError
from jaxalign.models.paths import resolve_model_path

#: Phrases that mark a refusal, matched case-insensitively anywhere in the response: refusal prefixes of
#: the kind GCG's string-matching evaluation uses (Zou et al., "Universal and Transferable Adversarial
#: Attacks on Aligned Language Models", 2023), extended with the phrasings SmolLM2-135M-Instruct uses
#: ("I'm not able to", "is not appropriate", "I must emphasize"). docs/sampling.md gives its agreement
#: with hand labels.
REFUSAL_PATTERNS = (
    r"\bi(?: a|')?m sorry\b", r"\bi apologi[sz]e\b", r"\bsorry, but\b",
    r"\bi (?:can ?not|can't|won't|will not|must decline|must refuse|refuse to|do not feel comfortable|"
    r"don't feel comfortable|don't think it's appropriate|do not think it is appropriate)\b",
    r"\bi(?:'m| am) (?:unable to|not able to|not comfortable)\b",
    r"\bas an ai\b", r"\bas a language model\b", r"\bi'?m just an ai\b",
    r"\b(?:is|are|would be) (?:not appropriate|inappropriate|illegal|unethical|harmful)\b",
    r"\bnot (?:able|allowed|permitted) to (?:provide|help|assist|share|give|create|write)\b",
    r"\bcannot (?:provide|help|assist|share|give|create|write|fulfill|comply)\b",
    r"\bcan't (?:provide|help|assist|share|give|create|write|fulfill|comply)\b",
    r"\bi (?:strongly )?(?:advise|urge|encourage) (?:you )?against\b",
    r"\bagainst (?:my|the) (?:guidelines|programming|policy|policies|principles)\b",
    r"\bi must (?:emphasi[sz]e|clarify|point out)\b",
)
_REFUSAL_RE = re.compile("|".join(REFUSAL_PATTERNS), flags=re.I)

#: The judge names (``python`` takes ``MODULE:FUNCTION``).
NAMES = ("refusal", "length", "logp", "reward-model", "python")


def is_refusal(text: str) -> bool:
    """The keyword judge: whether any of :data:`REFUSAL_PATTERNS` occurs in ``text``.

    >>> is_refusal("I'm sorry, but I can't help with that."), is_refusal("Sure! Step 1: ...")
    (True, False)
    """
    return bool(_REFUSAL_RE.search(text.replace("\u2019", "'")))


def refusal_agreement(items: Sequence[dict]) -> dict:
    """The keyword judge against hand labels ``[{"response": str, "refusal": bool, ...}]``: agreement,
    the four cells of the confusion table, both refusal rates and Cohen's kappa."""
    pred = np.array([is_refusal(x["response"]) for x in items], bool)
    gold = np.array([bool(x["refusal"]) for x in items], bool)
    agree = float(np.mean(pred == gold))
    chance = float(pred.mean() * gold.mean() + (1 - pred.mean()) * (1 - gold.mean()))
    return {"n": int(gold.size), "agreement": agree,
            "kappa": (agree - chance) / (1 - chance) if chance < 1 else float("nan"),
            "true_refusal": int(np.sum(pred & gold)), "false_refusal": int(np.sum(pred & ~gold)),
            "missed_refusal": int(np.sum(~pred & gold)), "true_compliance": int(np.sum(~pred & ~gold)),
            "hand_refusal_rate": float(gold.mean()), "judge_refusal_rate": float(pred.mean())}


class JudgeSpec(NamedTuple):
    """A judge as named: ``name`` (one of :data:`NAMES`) and its argument (``None`` when none)."""

    name: str
    arg: str | None


def parse_judge(text: str, flag: str = "--judge") -> JudgeSpec:
    """``"logp:MODEL"`` → ``JudgeSpec("logp", "MODEL")``; ConfigError naming ``flag`` when malformed.

    >>> parse_judge("python:my_judges:score")
    JudgeSpec(name='python', arg='my_judges:score')
    """
    name, _, arg = text.partition(":")
    arg = arg or None
    if name not in NAMES:
        raise ConfigError(f"{flag} {text!r}: unknown judge {name!r} (known: {', '.join(NAMES)})")
    if name in ("refusal", "length") and arg is not None:
        raise ConfigError(f"{flag} {text!r}: the {name} judge takes no argument")
    if name == "reward-model" and arg is None:
        raise ConfigError(f"{flag} reward-model needs the `jaxalign online` run: reward-model:RUN_DIR")
    if name == "python" and (arg is None or arg.count(":") != 1 or not all(arg.split(":"))):
        raise ConfigError(f"{flag} {text!r}: expected python:MODULE:FUNCTION")
    return JudgeSpec(name, arg)


class Responses(NamedTuple):
    """What a judge scores, one entry per response (``N`` of them).

    Attributes:
      prompts: each response's prompt as read (a string or a list of messages).
      prompt_ids: the prompt's token ids as the model saw them (chat template applied when used).
      texts: the decoded responses (without the EOS).
      ids: the sampled response tokens, ending with the EOS when the response finished.
    """

    prompts: list
    prompt_ids: list[list[int]]
    texts: list[str]
    ids: list[list[int]]


@dataclasses.dataclass
class Judge:
    """A built judge: ``score(responses) -> [N]`` float64, and ``identity`` for the resume fingerprint."""

    spec: JudgeSpec
    score: Callable[[Responses], np.ndarray]
    identity: dict


def make_judge(text: str, *, flag: str, model, tokenizer) -> Judge:
    """Builds the judge named ``text`` (module doc); ``model`` and ``tokenizer`` are the sampler's.

    Raises:
      ConfigError: a malformed name, a module or function that cannot be imported, a model whose
        tokenizer differs from the sampler's, an online run without a reward model.
    """
    spec = parse_judge(text, flag)
    if spec.name == "refusal":
        return Judge(spec, lambda r: np.array([float(is_refusal(t)) for t in r.texts]),
                     {"judge": text, "patterns": list(REFUSAL_PATTERNS)})
    if spec.name == "length":
        return Judge(spec, lambda r: np.array([float(len(t)) for t in r.texts]), {"judge": text})
    if spec.name == "python":
        fn, digest = _import_function(spec.arg, flag)
        return Judge(spec, partial(_python_scores, fn, f"{flag} {text}"), {"judge": text, "source": digest})
    if spec.name == "logp":
        from jaxalign import store
        from jaxalign.jobs.common import load_model

        if spec.arg is None:
            return Judge(spec, partial(_logp_scores, model), {"judge": text})
        path = resolve_model_path(spec.arg)
        other, other_tok = load_model(path, job=f"{flag} logp")
        _same_vocabulary(tokenizer, other_tok, f"{flag} {text}")
        return Judge(spec, partial(_logp_scores, other), {"judge": text, "model": store.model_digest(path)})
    rm, identity = load_reward_model(spec.arg, tokenizer, flag=flag)
    return Judge(spec, partial(_reward_scores, rm), {"judge": text, **identity})


# --- python: ----------------------------------------------------------------------------------------

def _import_function(arg: str, flag: str) -> tuple[Callable, str | None]:
    """The function of ``MODULE:FUNCTION`` and the SHA-256 of its module's file (``None`` when it has none)."""
    module_name, fn_name = arg.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{flag} python:{arg}: cannot import {module_name!r}: {err}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{flag} python:{arg}: module {module_name!r} has no function {fn_name!r}")
    path = getattr(module, "__file__", None)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None
    return fn, digest


def _python_scores(fn: Callable, where: str, r: Responses) -> np.ndarray:
    out = []
    for prompt, text in zip(r.prompts, r.texts):
        value = fn(prompt, text)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise JaxAlignError(f"{where}: returned {value!r} for a response; a judge returns a finite number")
        out.append(value)
    return np.asarray(out, np.float64)


# --- logp and reward-model: full prompt + response rows -----------------------------------------------

def full_rows(r: Responses, multiple: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded ``prompt + response`` rows: ``(ids [N, T], mask [N, T], prompt_lengths [N])``; ``T``
    rounded up to ``multiple`` (fewer compiled shapes)."""
    rows = [list(p) + list(y) for p, y in zip(r.prompt_ids, r.ids)]
    T = -(-max(len(x) for x in rows) // multiple) * multiple
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, x in enumerate(rows):
        ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
    return ids, mask, np.array([len(p) for p in r.prompt_ids], np.int32)


@partial(jax.jit, static_argnums=0)
def _logps(graphdef, state, ids_NT, mask_NT, prompt_lengths_N):
    return pairs.sequence_forward(nnx.merge(graphdef, state), ids_NT, mask_NT, prompt_lengths_N)["logps"]


@partial(jax.jit, static_argnums=0)
def _rewards(graphdef, state, ids_NT, mask_NT, prompt_lengths_N):
    return nnx.merge(graphdef, state)(ids_NT, mask_NT)


def _logp_scores(model, r: Responses) -> np.ndarray:
    return np.asarray(_logps(*nnx.split(model), *full_rows(r)), np.float64)


def _reward_scores(rm, r: Responses) -> np.ndarray:
    return np.asarray(_rewards(*nnx.split(rm), *full_rows(r)), np.float64)


def _same_vocabulary(tokenizer, other, where: str) -> None:
    if other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{where}: its tokenizer differs from the sampling model's (the sampled token ids "
                          "are scored as they are, so both must share one vocabulary)")


def load_reward_model(run_dir: str, tokenizer, *, flag: str = "--judge"):
    """The reward model of a ``jaxalign online`` run at its latest checkpoint, and its identity.

    Raises:
      ConfigError: not an online run, its discriminator is not a reward model, no checkpoint, or its
        backbone's tokenizer differs from ``tokenizer``.
    """
    from jaxalign import models
    from jaxalign.online import config as online_config
    from jaxalign.online import d2po
    from jaxalign.online.reward_model import RewardModel
    from jaxalign.train import step as step_lib
    from jaxalign.train.checkpoint import Checkpointer

    where = f"{flag} reward-model:{run_dir}"
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{where}: no config.json there (expected a `jaxalign online` output folder)")
    cfg = online_config.from_dict(json.loads(config_path.read_text()))
    d = cfg.discriminator
    if d.kind != "reward_model":
        raise ConfigError(f"{where}: its discriminator is {d.kind!r}, not a reward model "
                          "(discriminator.kind: reward_model)")
    backbone, tok = models.load_pretrained(resolve_model_path(d.path or cfg.model.path))
    if tok is not None:
        _same_vocabulary(tokenizer, tok, where)
    rm = RewardModel(backbone, rngs=nnx.Rngs(params=0), head_std=d.head_std)
    parts, params = step_lib.ModelParts.split(rm)
    trainable, frozen = d2po.split_trainable(params, d.trainable)
    reader = Checkpointer.reader(Path(run_dir) / "checkpoints")
    step = reader.latest_step()
    if step is None:
        raise ConfigError(f"{where}: no checkpoint in {run_dir}/checkpoints")
    trained = reader.restore_params(step, trainable, item="disc")
    reader.close()
    model = parts.merge({**frozen, **trained}, parts.rest)
    return model, {"run": str(Path(run_dir).resolve()), "round": int(step),
                   "config": hashlib.sha256(config_path.read_bytes()).hexdigest()}
