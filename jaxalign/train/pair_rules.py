"""Per-pair rules applied before training: the data filter, per-pair weights and mitigations.

Letters: N training pairs.

Every training pair has scores known before the first step, computed in the reference pass
(:func:`jaxalign.train.measure.reference`) and read with :func:`pair_scores`:

* ``ches``, ``ln_ches`` — Razin et al.'s CHES and LN-CHES under the initial model ("Unintentional
  Unalignment", ICLR 2025, Definitions 2–3; higher: the pair is more likely to lower log π(y+));
* ``ref_chosen_logps``, ``ref_rejected_logps`` — summed log-probs under the reference;
* ``ref_margin`` — ``ref_chosen_logps − ref_rejected_logps``;
* ``chosen_length``, ``rejected_length`` — the scored response tokens (EOS included when appended).

A **rule** is ``"SCORE OP VALUE"``, or several joined by ``and``; ``OP`` is one of ``<``, ``<=``, ``>``,
``>=``; ``VALUE`` is a number or ``qF``, the ``F``-quantile of ``SCORE`` over the whole training set
(NumPy's linear interpolation, ``0 <= F <= 1``): ``"ln_ches > q0.9"``, ``"ref_margin < 0 and ches > 2.5"``.

* ``data.filter: {score, drop_top, drop_bottom, min, max}`` drops pairs (Razin et al. §6: train on the
  pairs of low LN-CHES). ``drop_top: F`` drops the ``round(F·N)`` highest scores
  (:func:`jaxalign.analysis.filtering.select`, ties by input order), ``drop_bottom`` the lowest; ``min`` /
  ``max`` drop the pairs below / above a value.
* ``data.weights`` is a per-pair weight: the name of a numeric column of the data records, or
  ``{rule: RULE, weight: W}``.
* ``mitigations: [{rule, action, coeff}]`` routes the pairs a rule selects to one action: ``drop``;
  ``weight`` (the pair's loss is multiplied by ``coeff``); ``sft`` (adds ``coeff·(−log π(y+))`` to the
  pair's loss: Razin et al. §6's DPO+SFT on those pairs only); ``dpop`` (the pair's loss becomes
  DPO-Positive with ``λ = coeff``: Pal et al., "Smaug", Eq. 3, :func:`jaxalign.losses.dpop`).
  A pair matched by several rules gets all their actions: weights multiply, ``sft`` and ``dpop``
  coefficients add.

All scores, quantiles and fractions are over the training set before anything is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.analysis.filtering import select
from jaxalign.errors import ConfigError, DataError
from jaxalign.train.step import MITIGATION_KEYS

SCORES = ("ches", "ln_ches", "ref_chosen_logps", "ref_rejected_logps", "ref_margin", "chosen_length",
          "rejected_length")
CHES_SCORES = ("ches", "ln_ches")
ACTIONS = ("drop", "weight", "sft", "dpop")
FILTER_KEYS = ("score", "drop_top", "drop_bottom", "min", "max")

_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>)\s*(q?)([-+0-9.eE]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Condition:
    """``score op value``; ``quantile``: ``value`` is a fraction F and the threshold the F-quantile."""

    score: str
    op: str
    value: float
    quantile: bool = False

    def threshold(self, scores: dict[str, np.ndarray]) -> float:
        x = np.asarray(scores[self.score], np.float64)
        return float(np.quantile(x, self.value)) if self.quantile else self.value

    def mask(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        x, t = np.asarray(scores[self.score], np.float64), self.threshold(scores)
        return {"<": x < t, "<=": x <= t, ">": x > t, ">=": x >= t}[self.op]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A parsed rule: its text (for reports) and its conditions (all must hold)."""

    text: str
    conditions: tuple[Condition, ...]

    def mask(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """``[N]`` bool: the pairs the rule selects."""
        out = np.ones(len(next(iter(scores.values()))), bool)
        for c in self.conditions:
            out &= c.mask(scores)
        return out

    @property
    def scores(self) -> set[str]:
        return {c.score for c in self.conditions}


@dataclasses.dataclass(frozen=True)
class Mitigation:
    """One routing: the pairs ``rule`` selects get ``action`` with ``coeff``; ``key`` names it in errors
    and reports (``mitigations[0]``)."""

    rule: Rule
    action: str
    coeff: float
    key: str


def parse_rule(text: Any, key: str) -> Rule:
    """``text`` (module doc) as a :class:`Rule`; a ConfigError names ``key`` and the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{key}: expected a rule such as \"ln_ches > q0.9\", got {text!r}")
    conditions = []
    for part in re.split(r"\s+and\s+", text.strip()):
        m = _CONDITION.match(part)
        if m is None:
            raise ConfigError(f"{key}: cannot read {part!r}; a rule is SCORE OP VALUE [and …] with OP one of "
                              "< <= > >= and VALUE a number or qF (a quantile), e.g. \"ln_ches > q0.9\"")
        score, op, q, number = m.groups()
        if score not in SCORES:
            raise ConfigError(f"{key}: unknown score {score!r} (known: {', '.join(SCORES)})")
        try:
            value = float(number)
        except ValueError:
            raise ConfigError(f"{key}: {number!r} in {part!r} is not a number") from None
        if not math.isfinite(value) or (q and not 0.0 <= value <= 1.0):
            raise ConfigError(f"{key}: {part!r}: {'a quantile qF needs 0 <= F <= 1' if q else 'not finite'}")
        conditions.append(Condition(score, op, value, bool(q)))
    return Rule(text.strip(), tuple(conditions))


def _number(value: Any, key: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(f"{key}: expected a number {bounds}, got {value!r}")
    return float(value)


def parse_filter(raw: dict | None, key: str = "data.filter") -> dict | None:
    """``data.filter`` checked: ``{score, drop_top?, drop_bottom?, min?, max?}`` (at least one criterion)."""
    if raw is None:
        return None
    unknown = sorted(set(raw) - set(FILTER_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key {key}.{unknown[0]} (known: {', '.join(FILTER_KEYS)})")
    if raw.get("score") not in SCORES:
        raise ConfigError(f"{key}.score: expected one of {', '.join(SCORES)}, got {raw.get('score')!r}")
    out = {"score": raw["score"]}
    for name in ("drop_top", "drop_bottom"):
        if raw.get(name) is not None:
            out[name] = _number(raw[name], f"{key}.{name}", high=1.0)
    for name in ("min", "max"):
        if raw.get(name) is not None:
            out[name] = _number(raw[name], f"{key}.{name}", low=-math.inf)
    if len(out) == 1:
        raise ConfigError(f"{key}: give drop_top, drop_bottom, min or max (what to drop by {out['score']})")
    return out


def parse_mitigations(items: Any, key: str = "mitigations") -> list[Mitigation]:
    """``mitigations`` checked: a list of ``{rule, action, coeff}`` (``coeff`` unused by ``drop``)."""
    if not isinstance(items, list):
        raise ConfigError(f"{key}: expected a list of {{rule, action, coeff}}, got {items!r}")
    out = []
    for i, item in enumerate(items):
        k = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{k}: expected {{rule, action, coeff}}, got {item!r}")
        unknown = sorted(set(item) - {"rule", "action", "coeff"})
        if unknown:
            raise ConfigError(f"unknown config key {k}.{unknown[0]} (known: rule, action, coeff)")
        action = item.get("action")
        if action not in ACTIONS:
            raise ConfigError(f"{k}.action: expected one of {', '.join(ACTIONS)}, got {action!r}")
        if action != "drop" and "coeff" not in item:
            raise ConfigError(f"{k}.coeff: required by action {action!r}")
        coeff = 0.0 if action == "drop" else _number(item["coeff"], f"{k}.coeff")
        out.append(Mitigation(parse_rule(item.get("rule"), f"{k}.rule"), action, coeff, k))
    return out


def parse_weights(raw: Any, key: str = "data.weights") -> str | Mitigation | None:
    """``data.weights``: a column name (str), or ``{rule, weight}`` as a ``weight`` :class:`Mitigation`."""
    if raw is None or (isinstance(raw, str) and raw):
        return raw
    if not isinstance(raw, dict) or set(raw) != {"rule", "weight"}:
        raise ConfigError(f"{key}: expected a column name or {{rule: RULE, weight: W}}, got {raw!r}")
    return Mitigation(parse_rule(raw["rule"], f"{key}.rule"), "weight",
                      _number(raw["weight"], f"{key}.weight"), key)


def check(data_cfg, mitigations: Any) -> None:
    """Every rule of ``data.filter``, ``data.weights`` and ``mitigations`` parses, and CHES-based ones
    have the shared prompt (the scores come from :func:`jaxalign.pairs.pair_forward`'s hidden sums)."""
    needed = scores_needed(data_cfg, mitigations)
    if needed & set(CHES_SCORES) and not data_cfg.shared_prompt:
        raise ConfigError(f"data.shared_prompt: {sorted(needed & set(CHES_SCORES))[0]} is computed in the "
                          "shared-prompt reference pass; set data.shared_prompt: true")


def scores_needed(data_cfg, mitigations: Any) -> set[str]:
    """The score names the rules of a run read (empty: nothing to compute beyond the reference)."""
    names = set()
    f = parse_filter(data_cfg.filter)
    if f is not None:
        names.add(f["score"])
    w = parse_weights(data_cfg.weights)
    for m in parse_mitigations(mitigations) + ([w] if isinstance(w, Mitigation) else []):
        names |= m.rule.scores
    return names


def uses_rules(data_cfg, mitigations: Any) -> bool:
    """Whether the run has any of ``data.filter``, ``data.weights``, ``mitigations``."""
    return data_cfg.filter is not None or data_cfg.weights is not None or bool(mitigations)


def uses_pair_arrays(data_cfg, mitigations: Any) -> bool:
    """Whether the batches carry :data:`MITIGATION_KEYS` (a weight, sft or dpop routing is configured)."""
    return data_cfg.weights is not None or any(m.action != "drop" for m in parse_mitigations(mitigations))


def pair_scores(ref: dict[str, np.ndarray], tokens) -> dict[str, np.ndarray]:
    """The scores of every pair (module doc) from the reference pass's arrays and the tokens."""
    out = {k: np.asarray(ref[k], np.float64) for k in ("ches", "ln_ches", "ref_chosen_logps",
                                                       "ref_rejected_logps") if k in ref}
    if "ref_chosen_logps" in out:
        out["ref_margin"] = out["ref_chosen_logps"] - out["ref_rejected_logps"]
    out["chosen_length"] = np.asarray(tokens.chosen.lengths, np.float64)
    out["rejected_length"] = np.asarray(tokens.rejected.lengths, np.float64)
    return out


def filter_reasons(spec: dict | None, scores: dict[str, np.ndarray]) -> list[str | None]:
    """Per pair, why ``data.filter`` drops it (the first criterion that does), or ``None`` (kept)."""
    n = len(scores["chosen_length"])
    reasons: list[str | None] = [None] * n
    if spec is None:
        return reasons
    name = spec["score"]
    x = np.asarray(scores[name], np.float64)
    drops = []
    if "drop_top" in spec:
        drops.append((np.setdiff1d(np.arange(n), select(x, drop_top=spec["drop_top"])),
                      f"data.filter: {name} in the top {spec['drop_top']:g}"))
    if "drop_bottom" in spec:
        drops.append((np.setdiff1d(np.arange(n), select(-x, drop_top=spec["drop_bottom"])),
                      f"data.filter: {name} in the bottom {spec['drop_bottom']:g}"))
    if "min" in spec:
        drops.append((np.flatnonzero(x < spec["min"]), f"data.filter: {name} < min {spec['min']:g}"))
    if "max" in spec:
        drops.append((np.flatnonzero(x > spec["max"]), f"data.filter: {name} > max {spec['max']:g}"))
    for rows, why in drops:
        for r in rows:
            reasons[int(r)] = reasons[int(r)] or why
    return reasons


@dataclasses.dataclass
class PairPlan:
    """What happens to each of the ``N`` training pairs.

    Attributes:
      reasons: ``[N]`` why a pair is dropped, ``None`` for a kept pair.
      arrays: :data:`MITIGATION_KEYS` ``[N]`` float32 (``None`` when no weight/sft/dpop routing is configured).
      routed: ``[N]`` the keys of the rules that routed each pair (``mitigations[0]``, ``data.weights``).
    """

    reasons: list[str | None]
    arrays: dict[str, np.ndarray] | None
    routed: list[list[str]]

    @property
    def keep(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], bool)


def plan(data_cfg, mitigations: Any, scores: dict[str, np.ndarray],
         column_weights: np.ndarray | None = None) -> PairPlan:
    """The :class:`PairPlan` of a run (``column_weights``: the ``data.weights`` column, ``[N]``)."""
    n = len(scores["chosen_length"])
    reasons = filter_reasons(parse_filter(data_cfg.filter), scores)
    rules = parse_mitigations(mitigations)
    w = parse_weights(data_cfg.weights)
    if isinstance(w, Mitigation):
        rules.append(w)
    arrays = None
    if uses_pair_arrays(data_cfg, mitigations):
        weight = np.ones(n) if column_weights is None else np.asarray(column_weights, np.float64).copy()
        arrays = dict(zip(MITIGATION_KEYS, (weight, np.zeros(n), np.zeros(n))))  # pair_weight, sft_weight, dpop_lambda
    routed: list[list[str]] = [[] if column_weights is None else ["data.weights"] for _ in range(n)]
    for m in rules:
        hit = m.rule.mask(scores)
        for r in np.flatnonzero(hit):
            routed[int(r)].append(m.key)
            if m.action == "drop":
                reasons[int(r)] = reasons[int(r)] or f"{m.key}: {m.rule.text}"
        if m.action == "weight":
            arrays["pair_weight"][hit] *= m.coeff
        elif m.action in ("sft", "dpop"):
            arrays["sft_weight" if m.action == "sft" else "dpop_lambda"][hit] += m.coeff
    if arrays is not None:
        arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    return PairPlan(reasons, arrays, routed)


def column_weights(source: Any, column: str, provenance: dict[str, np.ndarray]) -> np.ndarray:
    """``[N]`` the numeric field ``column`` of the record each pair came from (``data.weights: COLUMN``)."""
    from jaxalign.data.load import open_source

    src = open_source(source)
    values = {r.index: r.value for r in src.records}
    rows = provenance.get("source_index", provenance["index"])
    out = np.empty(len(rows), np.float64)
    for k, i in enumerate(rows):
        record = values.get(int(i))
        v = record.get(column) if isinstance(record, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise DataError(f"data.weights: must be a finite number >= 0, got {v!r}", path=src.name,
                            record=int(i), field=column)
        out[k] = v
    return out


def count(pair_plan: PairPlan) -> dict[str, int]:
    """``{"kept", "dropped", "mitigated"}``: mitigated = kept pairs that a rule routed."""
    keep = pair_plan.keep
    return {"kept": int(keep.sum()), "dropped": int((~keep).sum()),
            "mitigated": int(sum(bool(r) for r, k in zip(pair_plan.routed, keep) if k))}


def write_reports(out: Path, pair_plan: PairPlan, index: np.ndarray, scores: dict[str, np.ndarray],
                  names: set[str]) -> None:
    """``OUTPUT/filtered.jsonl`` (one line per dropped pair: ``index`` (the record's), ``row`` (its
    position in the training set), the scores the rules read, ``reason``) and ``OUTPUT/mitigated.jsonl``
    (one per kept pair that a rule routed: the same, its :data:`MITIGATION_KEYS` and ``rules``)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "filtered.jsonl", "w") as fd, open(out / "mitigated.jsonl", "w") as fm:
        for r, why in enumerate(pair_plan.reasons):
            row = {"index": int(index[r]), "row": r, **{k: float(scores[k][r]) for k in sorted(names)}}
            if why is not None:
                fd.write(json.dumps(dict(row, reason=why)) + "\n")
            elif pair_plan.routed[r]:
                extra = {k: float(v[r]) for k, v in (pair_plan.arrays or {}).items()}
                fm.write(json.dumps(dict(row, **extra, rules=pair_plan.routed[r])) + "\n")
