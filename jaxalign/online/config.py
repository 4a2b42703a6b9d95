"""The configuration of an online (D2PO) run: typed dataclasses read from YAML plus ``key=value`` overrides.

A run file (``configs/d2po_*.yaml``) has these sections, each documented where it is declared::

    model:          {path, dtype}                       the policy (and, by default, the discriminator)
    prompts:        {source, field, limit, eval_size, chat, max_prompt_length}
    gold:           {kind, word, target, unit, function} the gold labeller (or pass a callable in Python)
    sampling:       {max_new_tokens, temperature, top_p}
    loss:           {name, beta, options, sft_coeff}    the policy's loss (any registry name)
    optim:          {name, lr, ...}                     the policy's optimiser (as ``jaxalign train``)
    discriminator:  {kind, path, trainable, steps, batch_size, beta, min_margin, head_std, optim}
    online:         {rounds, prompts_per_round, gold_per_round, silver_per_round, policy_epochs,
                     batch_size, seed}
    eval:           {probe_size, silver_agreement}
    checkpoint:     {keep_last}
    output_dir:     runs/NAME

Unknown keys and wrong types raise :class:`jaxalign.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Union

from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.errors import ConfigError
from jaxalign.train.config import OptimConfig, loss_terms


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = ""                 # HF folder, .gguf file, or pkg:MODULE/FILE inside an installed package
    dtype: str = "float32"         # parameter dtype of the policy and the discriminator (float32 | bfloat16)


@dataclasses.dataclass(frozen=True)
class PromptsConfig:
    # a file of records with a prompt field (JSONL/JSON/Parquet/CSV/datasets folder), a preference set or
    # built-in name (its prompts), or "synthetic:NAME" (jaxalign.online.d2po.SYNTHETIC_PROMPTS)
    source: str = ""
    field: str = "prompt"          # the prompt field of the records
    limit: int | None = None       # use only the first N distinct prompts
    eval_size: int = 8             # the last N prompts are held out: gold reward, discriminator accuracy
    chat: bool = False             # render each prompt as one user message with the chat template
    max_prompt_length: int | None = None  # keep the last N tokens of longer prompts


@dataclasses.dataclass(frozen=True)
class GoldConfig:
    # keyword: reward = occurrences of `word` (case-insensitive); charset: reward = number of characters
    # of the response that are in `chars` (case-insensitive); length: reward = -|len - target| in `unit`s;
    # python: `function` = "module:function" taking (prompt, response) -> float
    kind: Literal["keyword", "charset", "length", "python"] = "keyword"
    word: str = "yes"
    chars: str = "aeiou"
    target: int = 8
    unit: Literal["words", "chars", "tokens"] = "words"
    function: str | None = None


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 16       # the longest sampled response (a response without EOS stops here)
    temperature: float = 1.0
    top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class OnlineLossConfig:
    name: Union[str, list] = "sigmoid"  # a registry name (jaxalign losses) or a weighted list
    beta: float = 0.1
    options: dict = dataclasses.field(default_factory=dict)
    sft_coeff: float = 0.0


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    # reward_model: a separate LM + scalar head trained with Bradley–Terry on the gold pairs;
    # dpo: a separate LM trained with DPO on the gold pairs, reward = beta * log(pi_D / pi_ref);
    # none: no discriminator, no silver labels (online DPO with gold labels only, the baseline)
    kind: Literal["reward_model", "dpo", "none"] = "reward_model"
    path: str | None = None        # its backbone (default: model.path)
    trainable: Literal["all", "head"] = "all"  # reward_model: train the whole model or the head only
    steps: int = 20                # optimiser steps per round on all gold pairs collected so far
    batch_size: int = 8
    beta: float = 0.1              # dpo discriminator's beta
    min_margin: float = 0.0        # silver pairs whose |r1 - r2| is below this are not used
    head_std: float | None = None  # reward_model head init (default 1/sqrt(D+1))
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-5))


@dataclasses.dataclass(frozen=True)
class RoundsConfig:
    rounds: int = 4
    prompts_per_round: int = 16    # prompts sampled per round, two responses each
    gold_per_round: int = 4        # pairs sent to the gold labeller per round (the label budget)
    silver_per_round: int | None = None  # pairs the discriminator labels (default: all the others)
    policy_epochs: int = 1         # passes over the round's labelled pairs
    batch_size: int = 8            # pairs per policy step
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    probe_size: int = 8            # gold-labelled initial samples whose log-probs are tracked
    silver_agreement: bool = True  # also score silver pairs with the gold labeller (diagnostic only)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    keep_last: int = 2


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    gold: GoldConfig = dataclasses.field(default_factory=GoldConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    loss: OnlineLossConfig = dataclasses.field(default_factory=OnlineLossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)
    online: RoundsConfig = dataclasses.field(default_factory=RoundsConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    output_dir: str = "runs/d2po"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Keys that may change on resume without altering the run's numbers (``online.rounds`` only with constant
#: learning rates: a schedule's length depends on it).
RESUMABLE_CHANGES = ("checkpoint.", "output_dir", "online.rounds")


def _validate(cfg: OnlineConfig) -> OnlineConfig:
    def positive(key, value, allow_none=False):
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value!r}")

    if not cfg.model.path:
        raise ConfigError("model.path: required (a Hugging Face model folder)")
    if not cfg.prompts.source:
        raise ConfigError("prompts.source: required (a prompt file, a preference set or synthetic:NAME)")
    r = cfg.online
    for key in ("rounds", "prompts_per_round", "batch_size", "policy_epochs"):
        positive(f"online.{key}", getattr(r, key))
    if r.gold_per_round < 0 or r.gold_per_round > r.prompts_per_round:
        raise ConfigError(f"online.gold_per_round: must be in [0, online.prompts_per_round = "
                          f"{r.prompts_per_round}], got {r.gold_per_round}")
    if r.silver_per_round is not None and not 0 <= r.silver_per_round <= r.prompts_per_round - r.gold_per_round:
        raise ConfigError(f"online.silver_per_round: must be in [0, prompts_per_round - gold_per_round = "
                          f"{r.prompts_per_round - r.gold_per_round}], got {r.silver_per_round}")
    positive("sampling.max_new_tokens", cfg.sampling.max_new_tokens)
    if cfg.sampling.temperature < 0 or not 0 < cfg.sampling.top_p <= 1:
        raise ConfigError("sampling: need temperature >= 0 and 0 < top_p <= 1")
    positive("optim.lr", cfg.optim.lr)
    positive("discriminator.optim.lr", cfg.discriminator.optim.lr)
    positive("discriminator.steps", cfg.discriminator.steps)
    positive("discriminator.batch_size", cfg.discriminator.batch_size)
    positive("prompts.eval_size", cfg.prompts.eval_size)
    positive("eval.probe_size", cfg.eval.probe_size)
    positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    if cfg.gold.kind == "python" and not cfg.gold.function:
        raise ConfigError("gold.function: required with gold.kind: python (\"module:function\")")
    if cfg.gold.kind == "keyword" and not cfg.gold.word:
        raise ConfigError("gold.word: required with gold.kind: keyword")
    if cfg.gold.kind == "charset" and not cfg.gold.chars:
        raise ConfigError("gold.chars: required with gold.kind: charset")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype: expected float32 or bfloat16, got {cfg.model.dtype!r}")
    terms = loss_terms(cfg.loss)  # the list's shape; then loss names, option types and ranges
    losses.check_options([t[0] for t in terms] if isinstance(cfg.loss.name, list) else cfg.loss.name,
                         {k: v for t in terms for k, v in t[2].items()}, key="loss.name")
    return cfg


def from_dict(raw: dict, overrides=()) -> OnlineConfig:
    """Builds and validates an :class:`OnlineConfig` from plain data and dotted overrides."""
    return config_lib.from_dict(OnlineConfig, raw, overrides, _validate)


def load(path: str | Path, overrides=()) -> OnlineConfig:
    """Reads a YAML run file and applies ``overrides``; ``ConfigError`` names the file or the key."""
    return config_lib.load(OnlineConfig, path, overrides, _validate)


def run_changes(saved: dict, new: OnlineConfig) -> list[str]:
    """Dotted keys whose change between a stored config and ``new`` alters the run."""
    free = RESUMABLE_CHANGES
    if new.optim.schedule != "constant" or new.discriminator.optim.schedule != "constant":
        free = tuple(p for p in free if p != "online.rounds")  # the schedules' length depends on it
    return config_lib.changed_keys(saved, new.to_dict(), free)
