"""The registry of loss names, and the one place where loss names and options are checked.

:func:`register` records a loss function under a name as a :class:`LossInfo` (its inputs and options are
read from its signature); :data:`REGISTRY` maps names to them. :func:`check_options` validates options by
type and range: the CLI and the train and online configs call it before any model is loaded, and
:func:`jaxalign.losses.compute` calls it on every concrete option value, so the rules cannot differ.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxalign.errors import LossOptionError

#: The array arguments of :func:`jaxalign.losses.compute`, in order; losses name their inputs from it.
ARRAY_ARGS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
              "chosen_lengths", "rejected_lengths")

ARRAY_MEANING = {
    "chosen_logps": "policy summed log-probs of the chosen responses",
    "rejected_logps": "policy summed log-probs of the rejected responses",
    "ref_chosen_logps": "reference-model summed log-probs of the chosen responses",
    "ref_rejected_logps": "reference-model summed log-probs of the rejected responses",
    "chosen_lengths": "chosen response lengths in tokens",
    "rejected_lengths": "rejected response lengths in tokens",
}

#: Values of the ``f_divergence_type`` option (TRL's f-DPO reparameterisations of the log-ratio).
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

#: A rule ``(test, text)``: ``test`` takes the typed value; ``text`` ends "option X must be ...".
Rule = tuple[Callable[[Any], bool], str]

ANY: Rule = (lambda v: True, "")
UNIT: Rule = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
POSITIVE: Rule = (lambda v: v > 0.0, "> 0")
NONNEG: Rule = (lambda v: v >= 0.0, ">= 0")
_F_TYPE: Rule = (lambda v: v in F_DIVERGENCE_TYPES, "one of " + ", ".join(F_DIVERGENCE_TYPES))
#: Rules of options shared by several losses; a loss may narrow them (``register(checks=...)``).
_DEFAULT_RULES: Mapping[str, Rule] = {"label_smoothing": UNIT, "f_divergence_type": _F_TYPE}


@dataclasses.dataclass(frozen=True)
class LossInfo:
    """What :func:`jaxalign.losses.compute` needs to know about one loss.

    Attributes:
      name: the registry name (TRL's ``loss_type`` where TRL has the loss).
      fn: the loss function.
      inputs: the array arguments it requires (names of ``compute``'s arguments).
      options: its options (keyword arguments other than ``beta``) with their defaults; a ``str``
        default makes a name option, a ``float`` default a number option.
      uses_beta: whether it takes ``beta``.
      couples_examples: whether one example's loss depends on other examples (sorting across the batch).
      formula: a one-line formula (notation of the :mod:`jaxalign.losses` docstring).
      source: where the formula comes from.
      checks: option -> ``(test, text)``, the values each option takes (every option has one).
    """

    name: str
    fn: Callable[..., jax.Array]
    inputs: tuple[str, ...]
    options: Mapping[str, Any]
    uses_beta: bool
    couples_examples: bool
    formula: str
    source: str
    checks: Mapping[str, Rule] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, LossInfo] = {}
#: Name -> :class:`LossInfo`, TRL's ``DPOTrainer`` loss types first, then the other methods (read-only).
REGISTRY: Mapping[str, LossInfo] = types.MappingProxyType(_REGISTRY)


def register(name: str, *, formula: str, source: str, couples_examples: bool = False,
             checks: Mapping[str, Rule] | None = None):
    """Records a loss function under ``name``; its inputs and options are read from its signature.

    Positional parameters are the required array inputs; keyword-only parameters other than ``beta`` are
    the options, and their defaults are the options' defaults. So the record cannot drift from the
    function. ``checks`` gives the range of number options (default: any finite number).
    """

    def decorate(fn):
        params = inspect.signature(fn).parameters.values()
        inputs = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = [i for i in inputs if i not in ARRAY_ARGS]
        undefaulted = [p.name for p in keyword if p.name != "beta" and p.default is p.empty]
        if unknown or undefaulted:
            raise TypeError(f"loss {name!r}: inputs {unknown} are not arguments of compute, "
                            f"options {undefaulted} have no default")
        options = {p.name: p.default for p in keyword if p.name != "beta"}
        rules = {k: (checks or {}).get(k, _DEFAULT_RULES.get(k, ANY)) for k in options}
        info = LossInfo(name=name, fn=fn, inputs=inputs, options=types.MappingProxyType(options),
                        uses_beta=any(p.name == "beta" for p in keyword), couples_examples=couples_examples,
                        formula=formula, source=source, checks=types.MappingProxyType(rules))
        for option, default in options.items():  # a default outside its own rule is a programming error
            if _typed(info, option, default) != default:
                raise TypeError(f"loss {name!r}: default of {option!r} changes when checked")
        _REGISTRY[name] = info
        return fn

    return decorate


# --- checking names and options ---------------------------------------------------------------------

def loss_names(loss: Any, key: str = "loss") -> list[str]:
    """``loss`` (a name or a list of names) as a list of registered names; ``key`` names the source."""
    if isinstance(loss, str):
        names, keys = [loss], [key]
    elif isinstance(loss, Sequence) and all(isinstance(n, str) for n in loss):
        names, keys = list(loss), [f"{key}[{i}]" for i in range(len(loss))]
    else:
        raise LossOptionError(f"{key}: expected a loss name or a list of names, got {loss!r}")
    if not names:
        raise LossOptionError(f"{key}: the list of loss names is empty")
    for name, where in zip(names, keys):
        if name not in _REGISTRY:
            raise LossOptionError(f"{where}: unknown loss {name!r} (known: {', '.join(_REGISTRY)})")
    return names


def _as_number(value: Any) -> float | None:
    """A real number (ints become floats, numeric text is parsed); ``None`` when ``value`` is not one."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return float(value)
    if isinstance(value, numbers.Real):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _typed(info: LossInfo, option: str, value: Any) -> Any:
    """``value`` as the type of ``info``'s option, checked against its rule (LossOptionError if not)."""
    if isinstance(value, (jax.Array, np.ndarray)):
        return value  # arrays and tracers (an option traced under jit) are the caller's responsibility
    test, text = info.checks[option]
    where = f"loss {info.name!r}: option {option!r} must be"
    if isinstance(info.options[option], str):
        if not (isinstance(value, str) and test(value)):
            raise LossOptionError(f"{where} {text}, got {value!r}")
        return value
    number = _as_number(value)
    if number is None or not math.isfinite(number):
        raise LossOptionError(f"{where} a finite number{' ' + text if text else ''}, got {value!r}")
    if not test(number):
        raise LossOptionError(f"{where} {text}, got {value!r}")
    return number


def check_options(loss: str | Sequence[str], options: Mapping[str, Any], *,
                  key: str = "loss") -> dict[str, Any]:
    """Checks loss options by type and range and returns them typed (numbers as floats).

    Each option goes to the losses of ``loss`` that declare it (:data:`REGISTRY`); one that none of them
    declares is an error. Numbers may be given as numeric text (``"0.3"``, from a command line); ``bool``,
    non-finite numbers and other text are refused, as are values outside the option's range and
    unknown names of a name option (``f_divergence_type``). Arrays (traced options) pass unchecked.

    Args:
      loss: a name from :data:`REGISTRY` or a list of names (a mixture).
      options: option name -> value.
      key: where ``loss`` came from, for the message of an unknown name (``loss.name``, ``--loss``).

    Returns:
      The options with typed values, in the given order.

    Raises:
      LossOptionError: (a ``ConfigError`` and a ``LossError``) an unknown loss or option, a value of the
        wrong type or out of range; the message names the loss, the option and what it expects.

    Examples:
      >>> from jaxalign import losses
      >>> losses.check_options("simpo", {"simpo_gamma": "0.3", "label_smoothing": 0})
      {'simpo_gamma': 0.3, 'label_smoothing': 0.0}
      >>> losses.check_options("simpo", {"simpo_gamma": "abc"})
      Traceback (most recent call last):
      ...
      jaxalign.errors.LossOptionError: loss 'simpo': option 'simpo_gamma' must be a finite number, got 'abc'
    """
    names = loss_names(loss, key)
    infos = [_REGISTRY[n] for n in names]
    label = names[0] if len(names) == 1 else names
    typed = {}
    for option, value in options.items():
        owners = [info for info in infos if option in info.options]
        if not owners:
            known = sorted({o for info in infos for o in info.options})
            raise LossOptionError(f"loss {label!r}: unknown option {option!r}; its options are: "
                                  + (", ".join(known) if known else "(none)"))
        for info in owners:
            typed[option] = _typed(info, option, value)
    _check_f_divergence(infos, typed.get("f_divergence_type", "reverse_kl"))
    return typed


def _check_f_divergence(infos: list[LossInfo], f_type: Any) -> None:
    """As in TRL, f-DPO applies only to losses of the chosen-rejected reward difference."""
    if isinstance(f_type, str) and f_type != "reverse_kl":
        for info in infos:
            if "ref_chosen_logps" in info.inputs and "f_divergence_type" not in info.options:
                raise LossOptionError(
                    f"loss {info.name!r}: option 'f_divergence_type'={f_type!r} is not supported (only "
                    "reverse_kl; as in TRL, the f-DPO reparameterisation is valid only for losses of the "
                    "chosen-rejected reward difference)")
