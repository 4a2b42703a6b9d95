"""Job settings written once: a frozen dataclass per job gives its CLI options, checks and fingerprint.

Each field of a job's settings class is made with :func:`option`, which records the help text, the flag,
the choices and the range of allowed values in the field's metadata. From the class:

* :func:`add_arguments` adds one ``argparse`` option per field (``--batch-size`` for ``batch_size``);
* :func:`from_args` builds the settings from the parsed arguments;
* :func:`check` (called by each class's ``__post_init__``) rejects a value out of range or not among the
  choices with a :class:`~jaxalign.errors.ConfigError` naming the option (``--limit must be at least 1,
  got 0``), so the library call and the CLI refuse the same values;
* :func:`fingerprint` is the dict of the fields that change a job's results (its resume fingerprint).

Example::

    @dataclasses.dataclass(frozen=True)
    class Job:
        data: str = option(help="the pairs", required=True)
        limit: int | None = option(None, help="only the first N pairs", minimum=1, type=int)

        def __post_init__(self):
            check(self)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Callable, Sequence

from jaxalign.errors import ConfigError

_REQUIRED = dataclasses.MISSING


def option(default: Any = _REQUIRED, *, help: str, type: Callable | None = None, minimum: float | None = None,
           maximum: float | None = None, choices: Sequence[Any] | None = None, flag: str | None = None,
           metavar: str | None = None, action: str | None = None, nargs: str | None = None,
           required: bool = False, group: str | None = None, cli: bool = True,
           fingerprint: bool = True) -> Any:
    """A dataclass field of a job's settings (module doc).

    Args:
      default: the default (list defaults are copied per instance).
      help: the CLI help text.
      type: converts the CLI string (``int``, ``float``, a parser); ``None`` keeps the string.
      minimum, maximum: allowed range (inclusive); ``None`` values are always allowed.
      choices: allowed values.
      flag: the CLI flag (default ``--`` + the name with ``-`` for ``_``); the field's own name without
        dashes makes it a positional argument.
      metavar, action, nargs: passed to ``argparse``.
      required: the CLI option is required (in a ``group``: one of the group's options is).
      group: the name of a set of mutually exclusive options.
      cli: add a CLI option for it.
      fingerprint: part of the resume fingerprint.
    """
    meta = dict(help=help, type=type, minimum=minimum, maximum=maximum, choices=choices, flag=flag,
                metavar=metavar, action=action, nargs=nargs, required=required, group=group, cli=cli,
                fingerprint=fingerprint)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def check(settings) -> None:
    """``ConfigError`` naming the option for a value out of range or not among the choices."""
    for f in dataclasses.fields(settings):
        value, meta = getattr(settings, f.name), f.metadata
        if value is None or not meta:
            continue
        flag = flag_of(f)
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ConfigError(f"{flag} must be at least {meta['minimum']:g}, got {value}")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise ConfigError(f"{flag} must be at most {meta['maximum']:g}, got {value}")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``argparse`` option per CLI field of ``cls`` (``dest`` is the field name)."""
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta or not meta.get("cli"):
            continue
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=meta.get("required"))
            target = groups[meta["group"]]
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if meta.get("action") == "append":
            kwargs["default"] = None  # argparse appends to its default; unset means the field's default
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        if meta.get("action"):
            kwargs["action"] = meta["action"]
        if meta.get("action") not in ("store_true", "store_false"):
            for key in ("type", "choices", "metavar", "nargs"):
                if meta.get(key) is not None:
                    kwargs[key] = meta[key]
            if meta.get("required") and not meta.get("group"):
                kwargs["required"] = True
        if not flag_of(f).startswith("-"):  # a positional argument (``flag="model"``): argparse names its dest
            del kwargs["dest"]
            kwargs.pop("required", None)
        target.add_argument(flag_of(f), **kwargs)


def from_args(cls, args: argparse.Namespace, **extra):
    """The settings of ``cls`` from parsed arguments (CLI fields) and ``extra`` (the others)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.metadata.get("cli") and getattr(args, f.name, None) is not None}
    return cls(**values, **extra)


def fingerprint(settings, **extra) -> dict[str, Any]:
    """The fields that change a job's results (``fingerprint=True``), plus ``extra``."""
    out = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
           if f.metadata.get("fingerprint", True)}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}, **extra}


def values(settings, *exclude: str) -> dict[str, Any]:
    """Every field of ``settings`` but ``exclude``, as keyword arguments."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in exclude}


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` (``--loss-option``); values parsed as JSON when possible (numbers, booleans)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--loss-option {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
