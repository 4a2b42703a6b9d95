"""One rule for turning a record with several scored responses into preference pairs.

Every ranked or multi-response reader (:mod:`jaxalign.data.schemas`: UltraFeedback's four rated
completions, Nectar's seven ranked answers, HelpSteer2's two responses with a preference strength) hands
this module the responses' scores (higher is better; ``None`` for a response without a score, which is
never paired) and gets back ``(chosen, rejected)`` positions. Rules:

==================  ==================================================================================
``best-vs-worst``   the best response against the worst (one pair)
``best-vs-each``    the best against every response scored below it (up to ``n - 1`` pairs)
``best-vs-random``  the best against one response drawn at random among those scored below it (the
                    binarization of HuggingFaceH4/ultrafeedback_binarized)
``all-pairs``       every pair ``(i, j)`` with ``score[i] > score[j]``
``random-pairs``    ``k`` pairs drawn at random, without replacement, from ``all-pairs``
==================  ==================================================================================

Common to every rule: a pair needs a strict preference (ties never pair) and, when ``margin`` is set,
``score[chosen] - score[rejected] >= margin``. Among equal scores the first response in the record's
order counts as the best (or the worst). Pairs come in ``(chosen, rejected)`` order: by the chosen
position, then the rejected position. The random rules draw from NumPy's ``default_rng([seed, 1,
source_index])``: the pairs of a record depend only on the seed and the record's position, not on the
other records, the sampling, or the order records are read in.

>>> build_pairs([3.0, 5.0, 1.0, 5.0], PairingRule("best-vs-worst"), source_index=0)
[(1, 2)]
>>> build_pairs([3.0, 5.0, 1.0, None], PairingRule("all-pairs", margin=2.0), source_index=0)
[(0, 2), (1, 0), (1, 2)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxalign.errors import ConfigError

RULES = ("best-vs-worst", "best-vs-each", "best-vs-random", "all-pairs", "random-pairs")


@dataclasses.dataclass(frozen=True)
class PairingRule:
    """How pairs are built from scored responses (module doc).

    Attributes:
      rule: one of :data:`RULES`.
      margin: the least score difference of a pair (``None``: any strict preference).
      k: pairs per record for ``random-pairs`` (fewer when the record has fewer pairs).
      seed: the seed of the random rules.
    """

    rule: str = "best-vs-worst"
    margin: float | None = None
    k: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"pairing must be one of {RULES}, got {self.rule!r}")
        if self.margin is not None and not self.margin > 0:
            raise ConfigError(f"margin must be positive (ties never pair), got {self.margin}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"pairs_per_prompt must be a positive integer, got {self.k!r}")

    def describe(self) -> str:
        """``"best-vs-worst"``, ``"random-pairs (k=3, seed 0), margin >= 2"``, ..."""
        text = self.rule
        if self.rule == "random-pairs":
            text += f" (k={self.k}, seed {self.seed})"
        elif self.rule == "best-vs-random":
            text += f" (seed {self.seed})"
        return text + (f", margin >= {self.margin:g}" if self.margin is not None else "")


def build_pairs(scores: Sequence[float | None], rule: PairingRule, *,
                source_index: int) -> list[tuple[int, int]]:
    """The ``(chosen, rejected)`` positions that ``rule`` picks from responses with ``scores``.

    Args:
      scores: one score per response, higher is better; ``None`` leaves a response out.
      rule: the :class:`PairingRule`.
      source_index: the record's position in its source (seeds the random rules).

    Returns:
      The pairs, ordered by chosen then rejected position; empty when no pair qualifies.
    """
    rated = [i for i, s in enumerate(scores) if s is not None]
    if len(rated) < 2:
        return []
    best = max(rated, key=lambda i: (scores[i], -i))
    if rule.rule == "best-vs-worst":
        worst = min(rated, key=lambda i: (scores[i], i))
        below = [worst] if _ok(scores, best, worst, rule.margin) else []
        return [(best, j) for j in below]
    if rule.rule in ("best-vs-each", "best-vs-random"):
        below = [j for j in rated if _ok(scores, best, j, rule.margin)]
        if rule.rule == "best-vs-random" and below:
            below = [below[int(_rng(rule, source_index).integers(len(below)))]]
        return [(best, j) for j in below]
    every = [(i, j) for i in rated for j in rated if _ok(scores, i, j, rule.margin)]
    if rule.rule == "all-pairs" or len(every) <= rule.k:
        return every
    picked = _rng(rule, source_index).choice(len(every), size=rule.k, replace=False)
    return [every[p] for p in sorted(int(p) for p in picked)]


def _ok(scores: Sequence[float | None], i: int, j: int, margin: float | None) -> bool:
    diff = scores[i] - scores[j]
    return diff > 0 and (margin is None or diff >= margin)


def _rng(rule: PairingRule, source_index: int) -> np.random.Generator:
    return np.random.default_rng([rule.seed, 1, source_index])
