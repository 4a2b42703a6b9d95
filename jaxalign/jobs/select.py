"""The ``jaxalign select`` job: keep the pairs REAL's response-embedding cosine marks as easy or hard.

One pair per prompt (TRL records): the kept records are written unchanged (the input's fields, in input
order). Several responses per prompt: one standard record per prompt, ``{"prompt", "chosen",
"rejected", "score_chosen", "score_rejected"}`` (TRL's binarized names; ranks are written as negated
scores). The maths (embeddings, cosines, selection rules) is :mod:`jaxalign.analysis.real`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxalign import store
from jaxalign.analysis import real
from jaxalign.errors import ConfigError, DataError
from jaxalign.jobs import common
from jaxalign.jobs.settings import Select

#: Output suffixes :func:`write_records` knows.
OUT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv")


def run_select(model_path: str | None, data: str, out: str, *, fields: real.GroupFields = real.GroupFields(),
               mesh=None, progress: bool = True, model_and_tokenizer=None, **settings) -> dict:
    """Selects pairs by REAL cosine and writes them (module doc); ``settings`` are :class:`Select`'s.

    Returns:
      a summary dict (counts, cosine statistics of all and of the kept pairs, ties at the cut).
    """
    from jaxalign.data.load import open_source

    cfg = Select(model=model_path, data=data, out=out, **settings)
    model, tokenizer = common.load_model(cfg.model, job="REAL", mesh=mesh, model_and_tokenizer=model_and_tokenizer)
    source = open_source(cfg.data, cfg.split, cfg.data_subset)
    summary: dict[str, Any] = {"method": cfg.method, "model": cfg.model, "data": cfg.data, "subset": cfg.subset,
                               "seed": cfg.seed, "max_length": cfg.max_length}
    embed = partial(real.embed_texts, model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                    mesh=mesh, progress=progress)
    if real.is_grouped(source, fields):
        return _select_groups(cfg, source, fields, embed, summary)
    from jaxalign.data.formats import Fields
    from jaxalign.data.validate import validate_source

    fraction = 0.5 if cfg.fraction is None else cfg.fraction
    pairs, report = validate_source(source, Fields(), cfg.on_bad_record)
    if not pairs:
        raise DataError(f"no usable preference pairs: read {report.read} records, skipped "
                        f"{len(report.skipped)}", path=cfg.data)
    cos = real.real_cosines(model, tokenizer, pairs, cfg.batch_size, max_length=cfg.max_length, mesh=mesh,
                            progress=progress)
    sel = real.select_fraction(cos, cfg.subset, fraction, seed=cfg.seed)
    by_index = {r.index: r.value for r in source.records}
    write_records(cfg.out, [by_index[pairs[i].index] for i in sel.rows])
    selected = np.zeros(len(pairs), bool)
    selected[sel.rows] = True
    summary.update(format=report.format, read=report.read, kept=report.kept, skipped=len(report.skipped),
                   fraction=fraction, written=int(sel.rows.size), cutoff=sel.cutoff,
                   ties_at_cutoff=sel.ties_at_cutoff, cosine_all=_stats(cos),
                   cosine_selected=_stats(cos[sel.rows]))
    if cfg.scores_out:
        store.write_table({"index": np.asarray([p.index for p in pairs], np.int64), "real_cosine": cos,
                           "selected": selected}, cfg.scores_out)
    return summary


def _select_groups(cfg: Select, source, fields: real.GroupFields, embed, summary: dict) -> dict:
    """Several responses per prompt: one pair per prompt (module doc)."""
    if cfg.fraction is not None:
        raise ConfigError("--fraction applies to one pair per prompt; with several responses per "
                          "prompt every prompt gives one pair")
    groups, problems = real.read_groups(source, fields, cfg.on_bad_record)
    if not groups:
        raise DataError(f"no usable prompts with several responses: read {len(source.records)} records, "
                        f"skipped {len(problems)}", path=cfg.data)
    texts = [real.response_text(r) for g in groups for r in g.responses]
    emb = embed(texts)
    rng = np.random.default_rng(cfg.seed)
    records, cos, idx, no_pair = [], [], [], []
    pos = 0
    for g in groups:
        e = emb[pos:pos + len(g.responses)]
        pos += len(g.responses)
        pick = real.select_in_group(e, g.scores, cfg.subset, rng=rng)
        if pick is None:
            no_pair.append(g.index)
            continue
        c, r = pick
        cos.append(float(np.dot(e[c].astype(np.float64), e[r].astype(np.float64))))
        idx.append(g.index)
        records.append({"prompt": g.prompt, "chosen": g.responses[c], "rejected": g.responses[r],
                        "score_chosen": g.scores[c], "score_rejected": g.scores[r]})
    write_records(cfg.out, records)
    summary.update(format="several responses per prompt", read=len(source.records),
                   groups=len(groups), skipped=len(problems), written=len(records),
                   no_preference_pair=len(no_pair), no_preference_records=no_pair[:100],
                   cosine_selected=_stats(np.asarray(cos)))
    if cfg.scores_out:
        store.write_table({"index": np.asarray(idx, np.int64), "real_cosine": np.asarray(cos)}, cfg.scores_out)
    return summary


def write_records(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    """Writes records atomically in the format of the suffix: JSONL, JSON list, Parquet or CSV.

    Strings holding undecodable bytes (read with ``surrogateescape``) are written back as those bytes.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUT_SUFFIXES:
        raise ConfigError(f"--out {path}: unknown file type; use one of {', '.join(OUT_SUFFIXES)}")
    if suffix in (".parquet", ".pq"):
        import pyarrow as pa

        return store.write_table(pa.Table.from_pylist(list(records)), path)
    if suffix in (".jsonl", ".ndjson"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif suffix == ".json":
        text = json.dumps(list(records), ensure_ascii=False, indent=1) + "\n"
    else:
        buf = io.StringIO()
        names = list(dict.fromkeys(k for r in records for k in r))
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow(r)
        text = buf.getvalue()
    return store.write_bytes(path, text.encode("utf-8", "surrogateescape"))


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return {"count": 0}
    return {"count": int(x.size), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "median": float(np.median(x)), "max": float(x.max()), "distinct": int(np.unique(x).size)}


def format_summary(summary: Mapping[str, Any], out: str) -> str:
    """The lines ``jaxalign select`` prints."""
    lines = []
    if "groups" in summary:
        lines.append(f"{summary['data']}: {summary['read']} records, {summary['groups']} prompts with "
                     f"several responses, {summary['skipped']} skipped; {summary['written']} "
                     f"{summary['subset']} pairs written to {out}")
        if summary["no_preference_pair"]:
            lines.append(f"{summary['no_preference_pair']} prompt(s) gave no pair (all candidate responses "
                         "had equal scores)")
    else:
        lines.append(f"{summary['data']}: read {summary['read']}, kept {summary['kept']}, skipped "
                     f"{summary['skipped']}; {summary['written']} {summary['subset']} pairs "
                     f"(fraction {summary['fraction']:g}) written to {out}")
        a = summary["cosine_all"]
        if a.get("count"):
            lines.append(f"REAL cosine: all mean {a['mean']:.4f} (min {a['min']:.4f}, max {a['max']:.4f}, "
                         f"{a['distinct']} distinct)")
        if summary.get("ties_at_cutoff"):
            lines.append(f"warning: {summary['ties_at_cutoff']} pairs share the cut-off cosine "
                         f"{summary['cutoff']:.6g}; among them, earlier records were kept")
    s = summary["cosine_selected"]
    if s.get("count"):
        lines.append(f"REAL cosine of the selected pairs: mean {s['mean']:.4f} (min {s['min']:.4f}, "
                     f"max {s['max']:.4f})")
    return "\n".join(lines)
