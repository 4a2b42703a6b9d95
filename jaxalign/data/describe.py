"""Human-readable summaries of data sets, for ``jaxalign data inspect`` and ``jaxalign data list``."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxalign.data.builtin import builtin_info, builtin_source, list_builtin, list_prompt_sets
from jaxalign.data.load import load_pairs, read_pairs
from jaxalign.data.schemas import SCHEMAS, formats_table
from jaxalign.errors import ModelError

_SAMPLE_CHARS = 240


def builtin_table() -> str:
    """One line per built-in set: name, number of pairs, conversion, packaged file."""
    lines = [f"{'name':44s} {'pairs':>6s}  {'conversion':26s} file"]
    for name in list_builtin():
        info = builtin_info(name)
        count = len(builtin_source(name).records)
        lines.append(f"{name:44s} {count:6d}  {info.conversion:26s} {info.module}/{info.path}")
    return "\n".join(lines)


def prompt_sets_table() -> str:
    """One line per built-in prompt set (``jaxalign sample --data``): name, number of prompts, files."""
    names = list_prompt_sets()
    w = max(len(n) for n in names)
    lines = [f"{'prompt set (jaxalign sample)':{w}s} {'prompts':>7s}  file"]
    for name in names:
        info = builtin_info(name)
        lines.append(f"{name:{w}s} {len(builtin_source(name).records):7d}  {info.module}/{info.path}")
    return "\n".join(lines)


def list_text() -> str:
    """What ``jaxalign data list`` prints: the built-in sets and prompt sets, then the formats read by name or
    detected."""
    return (builtin_table() + "\n\n" + prompt_sets_table()
            + "\n\nformats (detected from the columns, or --format NAME; docs/data.md):\n" + formats_table())


def load_any_tokenizer(path: str):
    """A tokenizer from a Hugging Face folder or a ``.gguf`` file (through :mod:`jaxalign.models`)."""
    from jaxalign.models import tokenizer as tokenizers

    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return tokenizers.tokenizer_from_gguf(path)
    if not os.path.isdir(path):
        raise ModelError(f"{path}: expected a Hugging Face folder or a .gguf file")
    tok = tokenizers.load_tokenizer(path)
    if tok is None:
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return tok


def inspect(source: Any, model: str | None = None, *, report: str | None = None, cache: bool = True,
            **options: Any) -> str:
    """Reads (and with ``model``, tokenizes) a data set; returns the text ``jaxalign data inspect`` prints.

    Args:
      source: a path, a built-in name or a list of dicts.
      model: a tokenizer folder or ``.gguf`` file; adds token-length statistics.
      report: a file to write the skipped records to.
      cache: use the tokenization cache.
      **options: :class:`~jaxalign.data.load.LoadConfig` fields.
    """
    pairs, data_report = read_pairs(source, report=None, **options)
    lines = [f"data: {data_report.source}", f"format: {data_report.format}",
             f"  why: {data_report.detected}"]
    if data_report.schema in SCHEMAS:
        schema = SCHEMAS[data_report.schema]
        lines.append(f"  reads: {schema.dataset} ({schema.card}): {schema.pairs}")
    if data_report.pairing:
        lines.append(f"  pairs by: {data_report.pairing}")
    dataset = None
    if model is not None:
        dataset = load_pairs(source, load_any_tokenizer(model), report=report, cache=cache, **options)
        data_report = dataset.report
    elif report is not None:
        read_pairs(source, report=report, **options)
    lines.append(f"records: {data_report.summary()}")
    for problem in data_report.skipped[:5]:
        where = f" (line {problem.line})" if problem.line is not None else ""
        field = f" field {problem.field!r}:" if problem.field else ""
        lines.append(f"  skipped record {problem.index}{where}:{field} {problem.reason}")
    if len(data_report.skipped) > 5:
        lines.append(f"  ... and {len(data_report.skipped) - 5} more")
    if report is not None:
        lines.append(f"skipped records written to {report}")
    if data_report.no_pair:
        shown = ", ".join(str(i) for i in data_report.no_pair[:10])
        lines.append(f"records without a pair (ties, margin): {shown}"
                     + (" ..." if len(data_report.no_pair) > 10 else ""))
    if data_report.identical:
        shown = ", ".join(str(i) for i in data_report.identical[:10])
        lines.append(f"chosen == rejected in records: {shown}"
                     + (" ..." if len(data_report.identical) > 10 else ""))
    if pairs:
        pair = pairs[0]
        lines.append(f"sample pair (record {pair.index}):")
        for name in ("prompt", "chosen", "rejected"):
            lines.append(f"  {name + ':':9s} {_short(getattr(pair, name))}")
    if dataset is not None and len(dataset):
        lines.append(f"token lengths (tokenizer: {model}; responses include EOS):")
        lines.extend(_length_table(dataset.tokens))
    return "\n".join(lines)


def _short(text: Any) -> str:
    shown = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    shown = repr(shown) if isinstance(text, str) else shown
    return shown if len(shown) <= _SAMPLE_CHARS else shown[:_SAMPLE_CHARS] + f"... ({len(shown)} chars)"


def _length_table(tokens) -> list[str]:
    p, c, r = tokens.prompt.lengths, tokens.chosen.lengths, tokens.rejected.lengths
    rows = {"prompt": p, "chosen": c, "rejected": r, "longest seq": p + np.maximum(c, r)}
    out = [f"  {'':12s} {'min':>7s} {'mean':>9s} {'median':>8s} {'p95':>7s} {'max':>7s}"]
    for name, x in rows.items():
        out.append(f"  {name:12s} {x.min():7d} {x.mean():9.1f} {np.median(x):8.1f} "
                   f"{np.percentile(x, 95):7.1f} {x.max():7d}")
    return out
