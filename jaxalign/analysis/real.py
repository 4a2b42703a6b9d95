"""REAL: response-embedding pair selection (Zhang, Zhao, Molybog, Zhang, arXiv 2409.17169).

Letters: N texts (or pairs), B batch rows, T tokens, D model width, K responses of one prompt.

Each response is embedded **alone**, without its prompt: it is tokenized as ``tokenizer(text)`` does
(special tokens included, truncated to ``max_length``), run through a causal LM, and its final-layer
hidden states (after the last norm, HF's ``hidden_states[-1]``) are averaged with the attention mask as
weights and L2-normalised::

    e(y) = m / ‖m‖,    m = Σ_t mask_t · h_t / Σ_t mask_t

The similarity of a pair is the cosine ``cos(y+, y−) = ⟨e(y+), e(y−)⟩``. Selection:

* **one pair per prompt** (TRL preference records): ``easy`` keeps the ``fraction`` of pairs with the
  *lowest* cosine, ``hard`` the highest, ``random`` a seeded random ``fraction``. Ties at the cut are
  broken by record order (and counted: a set with few distinct responses, e.g. multiple-choice answers
  ``"(A)"``/``"(B)"``, has one cosine for every pair).
* **several responses per prompt** (records ``{"prompt", "responses": [...], "scores": [...]}`` or
  ``"ranks"``, 1 = best): per prompt one pair among the responses with *different* scores:
  ``hard`` the most similar, ``easy`` the least similar, ``centroid`` the two responses nearest the two
  centroids of a k-means (k = 2) clustering of the prompt's embeddings (each cluster's member nearest its
  own centroid), ``random`` a seeded random pair. The higher-scored response is ``chosen``.

Versus CHES (:mod:`jaxalign.analysis.ches`): REAL is prompt-free, mean-pooled and an uncentred cosine;
CHES is prompt-conditioned, sum-pooled and centred by −‖S(y+)‖². :func:`real_cosines` gives the REAL
cosine of any list of pairs, so both can be compared on the same pairs.

Public API: :func:`mean_pool`, :func:`embed_batch`, :func:`embed_texts`, :func:`real_cosines`,
:func:`select_fraction`, :func:`kmeans2`, :func:`select_in_group`, :func:`read_groups`.
The ``jaxalign select`` job (reading, writing records) is :mod:`jaxalign.jobs.select`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import ConfigError, DataError
from jaxalign.models import parts

SUBSETS_PAIRS = ("easy", "hard", "random")
SUBSETS_GROUPS = ("easy", "hard", "random", "centroid")


# --- embeddings ----------------------------------------------------------------------------------------

def mean_pool(hidden_BTD: jax.Array, attention_mask_BT: jax.Array, *, normalize: bool = True) -> jax.Array:
    """Attention-mask-weighted mean of hidden states, L2-normalised, in float32.

    ``e = m / max(‖m‖, 1e-12)`` with ``m = Σ_t mask_t h_t / max(Σ_t mask_t, 1)``.

    Args:
      hidden_BTD: ``[B, T, D]`` hidden states.
      attention_mask_BT: ``[B, T]`` 1 on real tokens, 0 on padding.
      normalize: divide by the L2 norm (REAL's embedding) or return the plain mean.

    Returns:
      ``[B, D]`` float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> h = jnp.array([[[3.0, 0.0], [1.0, 4.0], [9.0, 9.0]]])
      >>> mean_pool(h, jnp.array([[1, 1, 0]]), normalize=False).tolist()
      [[2.0, 2.0]]
      >>> [round(v, 4) for v in mean_pool(h, jnp.array([[1, 1, 0]]))[0].tolist()]
      [0.7071, 0.7071]
    """
    if hidden_BTD.ndim != 3 or attention_mask_BT.shape != hidden_BTD.shape[:2]:
        raise ValueError(f"hidden {hidden_BTD.shape} and mask {attention_mask_BT.shape} need shapes "
                         "[B, T, D] and [B, T]")
    mask_BT = attention_mask_BT.astype(jnp.float32)
    sum_BD = jnp.einsum("BT,BTD->BD", mask_BT, hidden_BTD.astype(jnp.float32))
    mean_BD = sum_BD / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)[:, None]
    if not normalize:
        return mean_BD
    norm_B = jnp.linalg.norm(mean_BD, axis=-1, keepdims=True)
    return mean_BD / jnp.maximum(norm_B, 1e-12)


def embed_batch(model, input_ids_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
    """REAL embeddings ``[B, D]`` of a right- or left-padded batch of texts (no logits computed)."""
    out = model(input_ids_BT, attention_mask_BT, return_logits=False)
    return mean_pool(out.hidden, attention_mask_BT)


def _embed_rows(model, batch) -> jax.Array:
    """:func:`embed_batch` of ``{"input_ids", "attention_mask"}`` (what :func:`embed_texts` jits)."""
    return embed_batch(model, batch["input_ids"], batch["attention_mask"])


def _padded(n: int, multiple: int = 16) -> int:
    """Padded length for ``n`` tokens: a power of two up to 64, then a multiple of 64."""
    if n <= 64:
        return max(multiple, 1 << max(0, (n - 1)).bit_length())
    return -(-n // 64) * 64


def tokenize_texts(tokenizer, texts: Sequence[str], *, max_length: int | None = 512) -> list[list[int]]:
    """Token ids of each text alone, as ``tokenizer(text)`` gives them (cut to ``max_length``)."""
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=max_length is not None,
                    max_length=max_length)
    return [list(map(int, ids)) for ids in enc["input_ids"]]


def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                max_length: int | None = 512, mesh=None, progress: bool = False) -> np.ndarray:
    """REAL embeddings ``[N, D]`` (float32, unit norm) of ``texts``, each embedded alone.

    Equal texts are embedded once. Texts are sorted by token length and batched (``batch_size`` rows,
    lengths padded to a power of two up to 64, then a multiple of 64), so few shapes are compiled.

    Args:
      model: a ``jaxalign.models`` causal LM.
      tokenizer: its Hugging Face tokenizer.
      texts: the texts (a response each).
      batch_size: rows per forward pass (rounded up to a multiple of the mesh's data × fsdp).
      max_length: most tokens per text (the paper: 512 for HH-RLHF, 128 for SHP-2); ``None``: no limit.
      mesh: a ``jax.sharding.Mesh`` (parameters placed by their logical axes, rows over data × fsdp), or
        ``None`` for one device.
      progress: show a progress bar.

    Returns:
      ``[N, D]`` float32 NumPy array, row ``i`` the embedding of ``texts[i]``.

    Raises:
      DataError: a text that tokenizes to no tokens.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    ids = tokenize_texts(tokenizer, unique, max_length=max_length)
    for t, row in zip(unique, ids):
        if not row:
            raise DataError(f"the response {t[:60]!r} tokenizes to no tokens; REAL cannot embed it")
    embed = parts.host_jit(model, _embed_rows, keys=("input_ids", "attention_mask"), mesh=mesh)
    rows_multiple = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
    B = -(-batch_size // rows_multiple) * rows_multiple
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(unique)), key=lambda i: (len(ids[i]), i))
    D = None
    out = None
    from tqdm.auto import tqdm

    bar = tqdm(total=len(unique), unit="text", desc="real", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(order), B):
            chunk = order[start:start + B]
            T = _padded(max(len(ids[i]) for i in chunk))
            ids_BT = np.full((B, T), pad_id, np.int32)
            mask_BT = np.zeros((B, T), np.int32)
            mask_BT[len(chunk):, 0] = 1  # filler rows: one token, so nothing divides by zero
            for r, i in enumerate(chunk):
                ids_BT[r, :len(ids[i])] = ids[i]
                mask_BT[r, :len(ids[i])] = 1
            emb = embed({"input_ids": ids_BT, "attention_mask": mask_BT})[:len(chunk)]
            if out is None:
                D = emb.shape[1]
                out = np.zeros((len(unique), D), np.float32)
            out[chunk] = emb
            bar.update(len(chunk))
    finally:
        bar.close()
    if out is None:
        return np.zeros((0, 0), np.float32)
    return out[[where[t] for t in texts]]


def response_text(response: Any) -> str:
    """The text REAL embeds for a response: the string, or a message list's contents joined by newlines
    (no chat template: the response alone)."""
    if isinstance(response, str):
        return response
    if isinstance(response, list) and all(isinstance(m, Mapping) and "content" in m for m in response):
        return "\n".join(str(m["content"]) for m in response)
    raise TypeError(f"a response must be a string or a list of messages, got {type(response).__name__}")


def _pair_texts(pair: Any) -> tuple[Any, Any]:
    if isinstance(pair, Mapping):
        return pair["chosen"], pair["rejected"]
    if hasattr(pair, "chosen") and hasattr(pair, "rejected"):
        return pair.chosen, pair.rejected
    chosen, rejected = pair
    return chosen, rejected


def real_cosines(model, tokenizer, pairs: Sequence[Any], batch_size: int = 16, *,
                 max_length: int | None = 512, mesh=None, progress: bool = False) -> np.ndarray:
    """REAL cosine ``⟨e(y+), e(y−)⟩`` of each pair, in the order given.

    Args:
      model, tokenizer: a ``jaxalign.models`` causal LM and its tokenizer.
      pairs: :class:`jaxalign.data.Pair` objects, mappings with ``chosen``/``rejected``, or
        ``(chosen, rejected)`` tuples; responses are strings or message lists (see
        :func:`response_text`). Prompts are not used.
      batch_size, max_length, mesh, progress: see :func:`embed_texts`.

    Returns:
      ``[N]`` float64 NumPy array in ``[-1, 1]``.
    """
    texts = [tuple(response_text(t) for t in _pair_texts(p)) for p in pairs]
    if not texts:
        return np.zeros((0,), np.float64)
    emb = embed_texts(model, tokenizer, [t for pair in texts for t in pair], batch_size=batch_size,
                      max_length=max_length, mesh=mesh, progress=progress).astype(np.float64)
    return np.einsum("ND,ND->N", emb[0::2], emb[1::2])


# --- selection: one pair per prompt -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Selection:
    """Which pairs a fraction-based selection keeps.

    Attributes:
      rows: positions of the kept pairs, ascending (input order).
      cutoff: the cosine of the last pair kept in sort order (``None`` for ``random``).
      ties_at_cutoff: pairs (kept or not) whose cosine equals the cutoff, when some of them are kept and
        some are not (the choice among them follows record order); 0 otherwise.
    """

    rows: np.ndarray
    cutoff: float | None
    ties_at_cutoff: int


def num_kept(fraction: float, n: int) -> int:
    """``round(fraction · n)`` with halves rounded up, at least 1 when ``n > 0``."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    if n == 0:
        return 0
    return min(n, max(1, int(math.floor(fraction * n + 0.5))))


def select_fraction(cosines_N: np.ndarray, subset: str, fraction: float, *, seed: int = 0) -> Selection:
    """REAL selection for one pair per prompt.

    ``easy``: the ``k = round(fraction·N)`` pairs of lowest cosine; ``hard``: of highest cosine (ties
    broken by position, earlier first); ``random``: ``k`` pairs drawn without replacement by
    ``numpy.random.default_rng(seed)``.

    Examples:
      >>> sel = select_fraction(np.array([0.9, 0.1, 0.5, 0.3]), "easy", 0.5)
      >>> sel.rows.tolist(), sel.cutoff
      ([1, 3], 0.3)
      >>> select_fraction(np.array([0.9, 0.1, 0.5, 0.3]), "hard", 0.5).rows.tolist()
      [0, 2]
    """
    cos = np.asarray(cosines_N, np.float64)
    if cos.ndim != 1:
        raise ValueError(f"cosines must be [N], got shape {cos.shape}")
    if subset not in SUBSETS_PAIRS:
        extra = " (centroid needs several responses per prompt)" if subset == "centroid" else ""
        raise ConfigError(f"subset {subset!r} is not one of {', '.join(SUBSETS_PAIRS)}{extra}")
    n = cos.size
    k = num_kept(fraction, n)
    if subset == "random":
        rows = np.random.default_rng(seed).permutation(n)[:k]
        return Selection(np.sort(rows), None, 0)
    if np.isnan(cos).any():
        raise ValueError("cosines contain NaN")
    key = cos if subset == "easy" else -cos
    order = np.lexsort((np.arange(n), key))
    rows = order[:k]
    if k == 0:
        return Selection(rows, None, 0)
    cutoff = float(cos[order[k - 1]])
    tied = int(np.sum(cos == cutoff))
    kept_tied = int(np.sum(cos[rows] == cutoff))
    return Selection(np.sort(rows), cutoff, tied if kept_tied < tied else 0)


# --- selection: several responses per prompt ------------------------------------------------------------

def kmeans2(x_KD: np.ndarray, *, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means with k = 2 (Euclidean, float64): ``(labels [K], centroids [2, D], inertia)``.

    Lloyd's algorithm from every pair of distinct points as the initial centroids (for ``K ≤ 24``; above
    that, 276 pairs drawn by a fixed-seed generator), keeping the lowest inertia (sum of squared distances
    to the assigned centroid). Deterministic; on small sets it finds the optimal 2-partition (tested
    against brute force). Both clusters are non-empty when the points are not all equal; points equal to
    one another always share a cluster.

    Examples:
      >>> labels, cent, inertia = kmeans2(np.array([[0.0], [0.1], [5.0], [5.2]]))
      >>> labels.tolist(), round(inertia, 4)
      ([0, 0, 1, 1], 0.025)
    """
    x = np.asarray(x_KD, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"kmeans2 needs [K, D] with K >= 2, got shape {x.shape}")
    K = x.shape[0]
    distinct = [i for i in range(K) if not any(np.array_equal(x[i], x[j]) for j in range(i))]
    if len(distinct) < 2:
        return np.zeros(K, np.int64), np.stack([x.mean(0), x.mean(0)]), 0.0
    inits = list(itertools.combinations(distinct, 2))
    if len(inits) > 276:
        rng = np.random.default_rng(0)
        inits = [inits[i] for i in sorted(rng.choice(len(inits), 276, replace=False))]
    best = None
    for a, b in inits:
        cent = np.stack([x[a], x[b]])
        labels = None
        for _ in range(max_iter):
            d = ((x[:, None, :] - cent[None]) ** 2).sum(-1)
            new = np.argmin(d, axis=1)  # ties go to cluster 0
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            if labels.min() == labels.max():  # an empty cluster: restart from the farthest point
                far = int(np.argmax(d[np.arange(K), labels]))
                labels = labels.copy()
                labels[far] = 1 - labels[far]
            cent = np.stack([x[labels == c].mean(0) for c in (0, 1)])
        inertia = float(((x - cent[labels]) ** 2).sum())
        if best is None or inertia < best[2] - 1e-12:
            best = (labels.copy(), cent, inertia)
    labels, cent, inertia = best
    if labels[0] == 1:  # canonical labelling: the first point is in cluster 0
        labels, cent = 1 - labels, cent[::-1].copy()
    return labels.astype(np.int64), cent, inertia


def select_in_group(emb_KD: np.ndarray, scores_K: Sequence[float], subset: str, *,
                    rng: np.random.Generator | None = None) -> tuple[int, int] | None:
    """One ``(chosen, rejected)`` pair of response positions for one prompt, or ``None``.

    Candidates are the pairs of responses with different scores (equal scores are no preference).

    * ``hard``: the candidate of highest cosine; ``easy``: of lowest cosine (ties: the first pair in
      ``(i, j)`` order, ``i < j``).
    * ``centroid``: :func:`kmeans2` of the embeddings; in each cluster the member nearest its centroid
      (ties: the earlier response); ``None`` if those two have equal scores.
    * ``random``: a candidate drawn by ``rng``.

    The response with the higher score is ``chosen``. ``None`` when there is no candidate.
    """
    emb = np.asarray(emb_KD, np.float64)
    scores = np.asarray(scores_K, np.float64)
    K = emb.shape[0]
    if scores.shape != (K,):
        raise ValueError(f"{K} embeddings but scores of shape {scores.shape}")
    if subset not in SUBSETS_GROUPS:
        raise ConfigError(f"subset {subset!r} is not one of {', '.join(SUBSETS_GROUPS)}")

    def ordered(i: int, j: int) -> tuple[int, int]:
        return (i, j) if scores[i] > scores[j] else (j, i)

    cands = [(i, j) for i in range(K) for j in range(i + 1, K) if scores[i] != scores[j]]
    if not cands:
        return None
    if subset == "centroid":
        labels, cent, _ = kmeans2(emb)
        if labels.min() == labels.max():
            return None
        picks = []
        for c in (0, 1):
            members = np.flatnonzero(labels == c)
            d = ((emb[members] - cent[c]) ** 2).sum(-1)
            picks.append(int(members[np.argmin(d)]))
        i, j = picks
        return None if scores[i] == scores[j] else ordered(i, j)
    if subset == "random":
        rng = rng if rng is not None else np.random.default_rng(0)
        return ordered(*cands[int(rng.integers(len(cands)))])
    cos = emb @ emb.T
    vals = np.array([cos[i, j] for i, j in cands])
    pick = int(np.argmax(vals)) if subset == "hard" else int(np.argmin(vals))
    return ordered(*cands[pick])


@dataclasses.dataclass(frozen=True)
class Group:
    """A prompt with several scored responses (higher score = better)."""

    index: int
    prompt: Any
    responses: list
    scores: list[float]


@dataclasses.dataclass(frozen=True)
class GroupFields:
    prompt: str = "prompt"
    responses: str = "responses"
    scores: str = "scores"
    ranks: str = "ranks"


def is_grouped(source, fields: GroupFields = GroupFields()) -> bool:
    """Whether the first parsed record of a :class:`jaxalign.data.read.Source` has a responses field."""
    for r in source.records:
        if r.error is None and isinstance(r.value, dict):
            return fields.responses in r.value
    return False


def read_groups(source, fields: GroupFields = GroupFields(), on_bad_record: str = "error"
                ) -> tuple[list[Group], list]:
    """Validates the records of a several-responses source.

    A record needs ``prompt`` (a string or messages), ``responses`` (a list of at least two non-empty
    strings or message lists) and either ``scores`` (numbers, higher is better) or ``ranks`` (numbers,
    1 = best, lower is better) of the same length.

    Returns:
      ``(groups, problems)``; problems are :class:`jaxalign.data.validate.Problem` (skipped records with
      ``on_bad_record="skip"``).

    Raises:
      DataError: a bad record with ``on_bad_record="error"`` (names the file, record and field).
    """
    from jaxalign.data.validate import Problem, check_policy, first_error

    check_policy(on_bad_record)
    groups, problems = [], []
    for raw in source.records:
        def bad(kind, reason, field=None, raw=raw):
            problems.append(Problem(raw.index, kind, reason, field, raw.line))

        if raw.error is not None:
            bad("unparseable", raw.error)
            continue
        v = raw.value
        if not isinstance(v, dict):
            bad("not-an-object", "a record must be an object")
            continue
        if v.get(fields.prompt) is None:
            bad("missing-field", "missing field", fields.prompt)
            continue
        resp = v.get(fields.responses)
        if resp is None:
            bad("missing-field", "missing field", fields.responses)
            continue
        if not isinstance(resp, list) or len(resp) < 2:
            bad("wrong-type", "expected a list of at least two responses", fields.responses)
            continue
        bad_resp = None
        for k, r in enumerate(resp):
            try:
                text = response_text(r)
            except TypeError as err:
                bad_resp = ("wrong-type", str(err), f"{fields.responses}[{k}]")
                break
            if not text.strip():
                bad_resp = ("empty", "empty response", f"{fields.responses}[{k}]")
                break
        if bad_resp:
            bad(*bad_resp)
            continue
        key = fields.scores if fields.scores in v else fields.ranks if fields.ranks in v else None
        if key is None:
            bad("missing-field", f"missing field (need {fields.scores!r} or {fields.ranks!r})", fields.scores)
            continue
        vals = v[key]
        ok = (isinstance(vals, list) and len(vals) == len(resp)
              and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                      for s in vals))
        if not ok:
            bad("wrong-type", f"expected a list of {len(resp)} finite numbers", key)
            continue
        scores = [float(s) for s in vals] if key == fields.scores else [-float(s) for s in vals]
        groups.append(Group(raw.index, v[fields.prompt], list(resp), scores))
    if problems and on_bad_record == "error":
        raise first_error(problems, source.name)
    return groups, problems


__all__ = ["mean_pool", "embed_batch", "tokenize_texts", "embed_texts", "response_text", "real_cosines",
           "Selection", "num_kept", "select_fraction", "kmeans2", "select_in_group", "Group",
           "GroupFields", "is_grouped", "read_groups",
           "SUBSETS_PAIRS", "SUBSETS_GROUPS"]
