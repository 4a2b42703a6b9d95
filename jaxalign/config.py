"""YAML run files as typed, frozen dataclasses: one loader for ``jaxalign train`` and ``jaxalign online``.

A run file is a mapping of sections; each section is built into the dataclass its field is annotated
with (:func:`build_dataclass`), every value checked against the annotation (``int``, ``float``, ``bool``,
``str``, ``Literal``, ``X | None``, ``list``, ``dict``, nested dataclasses). Dotted ``key=value``
overrides (values parsed as YAML) are applied before building (:func:`apply_overrides`).

Unknown keys and values of the wrong type raise :class:`jaxalign.errors.ConfigError` naming the dotted
key (``optim.lr: expected a number, got 'fast'``); :func:`load` adds the file name.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union

import yaml

from jaxalign.errors import ConfigError

T = TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, key)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else
                      f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")


def _coerce_scalar(value: Any, tp: type, key: str) -> Any:
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if tp in (float, int, bool, str):
        return _coerce_scalar(value, tp, key)
    if tp in (list, dict) or origin in (list, dict):
        base = origin or tp
        if not isinstance(value, base):
            raise ConfigError(f"{key}: expected a {base.__name__}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def build_dataclass(cls: type[T], values: Any, prefix: str = "") -> T:
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
    kwargs = {name: coerce(v, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, v in values.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``a.b=value`` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of config keys at the top level, got a {type(raw).__name__}")
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


def from_dict(cls: type[T], raw: dict | None, overrides=(), validate: Callable[[T], T] = lambda c: c) -> T:
    """``validate(cls)`` built from plain data and dotted ``overrides``."""
    return validate(build_dataclass(cls, apply_overrides(raw or {}, list(overrides))))


def load(cls: type[T], path: str | Path, overrides=(), validate: Callable[[T], T] = lambda c: c) -> T:
    """Reads the YAML file ``path`` into ``cls`` (:func:`from_dict`); ``ConfigError`` names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    try:
        return from_dict(cls, raw, overrides, validate)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (``options`` mappings stay whole: they are one value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(saved: dict, new: dict, free: tuple[str, ...]) -> list[str]:
    """Dotted keys that differ between two config dicts, except those starting with a ``free`` prefix."""
    old, cur = flatten(saved), flatten(new)
    changed = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
    return [k for k in changed if not any(k.startswith(p) for p in free)]
