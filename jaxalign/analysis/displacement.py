"""Token-level likelihood displacement between two checkpoints (Razin et al., ICLR 2025, §3 and App. H.1).

Letters: B pairs, V vocabulary, D model width, K rising tokens kept per pair.

Given a checkpoint *before* and one *after* preference training, and the pairs ``(x, y+, y−)``:

* per pair, ``log π(y+|x)`` and ``log π(y−|x)`` (sums over response tokens, EOS included; DESIGN §3)
  under both checkpoints and their changes. Likelihood displacement (Definition 1) is a fall of the
  mean ``log π(y+|x)``;
* per pair, the next-token distribution after the prompt under both checkpoints, and the ``K`` tokens
  whose probability rose most, with their probabilities before and after. With single-token responses
  (the paper's persona setting) these are the tokens the lost mass went to: benign (``Yes`` → ``_Yes``)
  or catastrophic (``No`` → ``Yes``);
* for **single-token pairs** (each response one token, then EOS), the theory quantities of Theorems 1–2
  (and Table 13), from the unembedding ``W`` (``model.unembedding()``, ``[V, D]``) of the *before*
  checkpoint:

  - ``w_chosen_dot_rejected`` = ``⟨W_y+, W_y−⟩``;
  - ``w_diff_proj_on_chosen`` = ``⟨W_y+ − W_y−, W_y+⟩ / ‖W_y+‖``, the signed length of the projection
    of ``W_y+ − W_y−`` on ``W_y+``, and ``w_diff_orth_norm`` = the norm of the part orthogonal to
    ``W_y+`` (the paper finds the orthogonal part larger, which is why unrelated tokens can gain);
  - ``theorem1_term`` = ``⟨W_y+, W_y−⟩ + Σ_{z ∉ {y+, y−}} π(z|x) ⟨W_z, W_y+ − W_y−⟩`` under the before
    checkpoint: the larger, the faster ``log π(y+|x)`` falls at the start of training;
  - per rising token ``z``, ``w_z_dot_diff`` = ``⟨W_z, W_y+ − W_y−⟩`` (Theorem 2: tokens with a large
    value gain probability).

:func:`pair_statistics` is the per-batch function (jit-ed, prompt once); :func:`theory_quantities`
the pure function of ``W``; :func:`run_displacement` the job behind ``jaxalign displacement``, which writes
``DIR/pairs.parquet`` (one row per pair), ``DIR/rising_tokens.parquet`` (``K`` rows per pair) and
``DIR/summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import pairs, store
from jaxalign.errors import ModelError

PAIR_COLUMNS = (
    "index", "prompt_len", "chosen_len", "rejected_len", "single_token", "chosen_token", "rejected_token",
    "logp_chosen_before", "logp_chosen_after", "delta_logp_chosen",
    "logp_rejected_before", "logp_rejected_after", "delta_logp_rejected",
    "p_first_chosen_before", "p_first_chosen_after", "p_first_rejected_before", "p_first_rejected_after",
    "w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term")
_BATCH_KEYS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
TOKEN_COLUMNS = ("index", "rank", "token_id", "token", "prob_before", "prob_after", "prob_increase",
                 "is_chosen", "is_rejected", "w_z_dot_diff")


def pair_statistics(model, batch: dict) -> dict[str, jax.Array]:
    """Summed log-probs of both responses and the next-token log-distribution after the prompt.

    Args:
      model: a ``jaxalign.models`` causal LM.
      batch: the shared-prompt layout (:func:`jaxalign.data.shared_prompt_batch`).

    Returns:
      ``chosen_logps`` ``[B]``, ``rejected_logps`` ``[B]`` and ``next_logprobs`` ``[B, V]`` (float32).
    """
    out = pairs.pair_forward(model, batch["prompt_ids"], batch["prompt_mask"], batch["chosen_ids"],
                             batch["chosen_mask"], batch["rejected_ids"], batch["rejected_mask"],
                             logps=True)
    logits_BV = model.logits(out.prompt_last_hidden[:, None, :])[:, 0].astype(jnp.float32)
    return {"chosen_logps": out.chosen_logps, "rejected_logps": out.rejected_logps,
            "next_logprobs": jax.nn.log_softmax(logits_BV, axis=-1)}


def theory_quantities(W_VD: jax.Array, chosen_B: jax.Array, rejected_B: jax.Array,
                      probs_BV: jax.Array | None = None) -> dict[str, jax.Array]:
    """The single-token quantities of Razin et al. Theorems 1–2 / Table 13 (module doc).

    Args:
      W_VD: ``[V, D]`` the unembedding (rows are output token embeddings).
      chosen_B, rejected_B: ``[B]`` token ids ``y+``, ``y−``.
      probs_BV: ``[B, V]`` next-token probabilities ``π(·|x)``, for ``theorem1_term`` (optional).

    Returns:
      ``w_chosen_dot_rejected``, ``w_diff_proj_on_chosen``, ``w_diff_orth_norm`` ``[B]``,
      ``w_dot_diff`` ``[B, V]`` (``⟨W_z, W_y+ − W_y−⟩`` for every ``z``) and, with ``probs_BV``,
      ``theorem1_term`` ``[B]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> W = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
      >>> q = theory_quantities(W, jnp.array([0]), jnp.array([1]))
      >>> [float(q[k][0]) for k in ("w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm")]
      [1.0, 0.0, 1.0]
    """
    W = W_VD.astype(jnp.float32)
    wp_BD, wm_BD = W[chosen_B], W[rejected_B]
    diff_BD = wp_BD - wm_BD
    wp_norm_B = jnp.linalg.norm(wp_BD, axis=-1)
    proj_B = jnp.einsum("BD,BD->B", diff_BD, wp_BD) / wp_norm_B
    orth_BD = diff_BD - (proj_B / wp_norm_B)[:, None] * wp_BD
    w_dot_diff_BV = jnp.einsum("VD,BD->BV", W, diff_BD)
    out = {"w_chosen_dot_rejected": jnp.einsum("BD,BD->B", wp_BD, wm_BD),
           "w_diff_proj_on_chosen": proj_B, "w_diff_orth_norm": jnp.linalg.norm(orth_BD, axis=-1),
           "w_dot_diff": w_dot_diff_BV}
    if probs_BV is not None:
        V = W.shape[0]
        others_BV = ~(jax.nn.one_hot(chosen_B, V, dtype=bool) | jax.nn.one_hot(rejected_B, V, dtype=bool))
        out["theorem1_term"] = out["w_chosen_dot_rejected"] + jnp.sum(
            jnp.where(others_BV, probs_BV.astype(jnp.float32) * w_dot_diff_BV, 0.0), axis=-1)
    return out


_theory_jit = jax.jit(theory_quantities)


def top_rising(probs_before_BV: np.ndarray, probs_after_BV: np.ndarray, k: int) -> np.ndarray:
    """``[B, K]`` token ids with the largest ``π_after − π_before``, largest first (ties: lower id)."""
    diff = np.asarray(probs_after_BV, np.float64) - np.asarray(probs_before_BV, np.float64)
    k = min(k, diff.shape[-1])
    order = np.argsort(-diff, axis=-1, kind="stable")
    return order[:, :k]


def _single_token(tokens, rows: np.ndarray, eos_id: int) -> np.ndarray:
    """Whether each pair's responses are one token each followed by EOS, and different."""
    out = np.zeros(len(rows), bool)
    for j, i in enumerate(rows):
        c, r = tokens.chosen[i], tokens.rejected[i]
        out[j] = (len(c) == 2 and len(r) == 2 and c[-1] == eos_id and r[-1] == eos_id and c[0] != r[0])
    return out


def _stats(graphdef, state, batch):
    from flax import nnx

    return pair_statistics(nnx.merge(graphdef, state), batch)


# The model's structure is static: the before and after checkpoints share one compilation per shape.
_stats_jit = jax.jit(_stats, static_argnums=0)


def _jitted(model) -> Callable:
    from flax import nnx

    graphdef, state = nnx.split(model)
    return lambda batch: _stats_jit(graphdef, state, {k: jnp.asarray(batch[k]) for k in _BATCH_KEYS})


def compare(before, after, dataset, *, top_k: int = 10, batch_size: int = 8, tokenizer=None,
            progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-pair and per-rising-token columns (:data:`PAIR_COLUMNS`, :data:`TOKEN_COLUMNS`).

    Args:
      before, after: the two loaded models (same vocabulary).
      dataset: a :class:`jaxalign.data.PairDataset`.
      top_k: rising tokens kept per pair.
      batch_size: pairs per forward pass.
      tokenizer: to decode the rising tokens (``token`` column; empty strings without one).
      progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from jaxalign.analysis.ches_run import bucket, plan_batches
    from jaxalign.data.batch import shared_prompt_batch

    W = before.unembedding()
    V_before, V_after = W.shape[0], after.unembedding().shape[0]
    if V_before != V_after:
        raise ModelError(f"the checkpoints have different vocabularies ({V_before} and {V_after} tokens)")
    tokens = dataset.tokens
    f_before, f_after = _jitted(before), _jitted(after)
    theory = _theory_jit
    resp = np.maximum(tokens.chosen.lengths, tokens.rejected.lengths)
    batches = plan_batches(tokens.prompt.lengths, resp, batch_size)
    cols: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    tcols: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
    bar = tqdm(total=len(tokens), unit="pair", desc="displacement", disable=not progress, dynamic_ncols=True)
    for rows in batches:
        n = len(rows)
        padded = np.full(batch_size, -1, np.int64)
        padded[:n] = rows
        batch = shared_prompt_batch(tokens, padded, pad_id=dataset.pad_id,
                                    prompt_length=bucket(int(tokens.prompt.lengths[rows].max())),
                                    response_length=bucket(int(resp[rows].max())))
        b, a = f_before(batch), f_after(batch)
        lp_b = np.asarray(b["next_logprobs"])[:n].astype(np.float64)
        lp_a = np.asarray(a["next_logprobs"])[:n].astype(np.float64)
        pb, pa = np.exp(lp_b), np.exp(lp_a)
        first_c = np.array([tokens.chosen[i][0] for i in rows])
        first_r = np.array([tokens.rejected[i][0] for i in rows])
        single = _single_token(tokens, rows, dataset.eos_id)
        q = {k: np.asarray(v) for k, v in theory(W, jnp.asarray(first_c), jnp.asarray(first_r),
                                                    jnp.asarray(pb, jnp.float32)).items()}
        nan = np.full(n, np.nan)
        ar = np.arange(n)
        values = {
            "index": tokens.index[rows], "prompt_len": tokens.prompt.lengths[rows],
            "chosen_len": tokens.chosen.lengths[rows], "rejected_len": tokens.rejected.lengths[rows],
            "single_token": single, "chosen_token": first_c, "rejected_token": first_r,
            "logp_chosen_before": np.asarray(b["chosen_logps"])[:n],
            "logp_chosen_after": np.asarray(a["chosen_logps"])[:n],
            "logp_rejected_before": np.asarray(b["rejected_logps"])[:n],
            "logp_rejected_after": np.asarray(a["rejected_logps"])[:n],
            "p_first_chosen_before": pb[ar, first_c], "p_first_chosen_after": pa[ar, first_c],
            "p_first_rejected_before": pb[ar, first_r], "p_first_rejected_after": pa[ar, first_r],
        }
        values["delta_logp_chosen"] = values["logp_chosen_after"] - values["logp_chosen_before"]
        values["delta_logp_rejected"] = values["logp_rejected_after"] - values["logp_rejected_before"]
        for k in ("w_chosen_dot_rejected", "w_diff_proj_on_chosen", "w_diff_orth_norm", "theorem1_term"):
            values[k] = np.where(single, q[k], nan)
        for k in PAIR_COLUMNS:
            cols[k].append(np.asarray(values[k]))
        top = top_rising(pb, pa, top_k)
        for j in range(n):
            for rank, z in enumerate(top[j]):
                tcols["index"].append(int(tokens.index[rows[j]]))
                tcols["rank"].append(rank + 1)
                tcols["token_id"].append(int(z))
                tcols["token"].append(tokenizer.decode([int(z)]) if tokenizer is not None else "")
                tcols["prob_before"].append(float(pb[j, z]))
                tcols["prob_after"].append(float(pa[j, z]))
                tcols["prob_increase"].append(float(pa[j, z] - pb[j, z]))
                tcols["is_chosen"].append(bool(z == first_c[j]))
                tcols["is_rejected"].append(bool(z == first_r[j]))
                tcols["w_z_dot_diff"].append(float(q["w_dot_diff"][j, z]) if single[j] else float("nan"))
        bar.update(n)
    bar.close()
    pair_cols = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    order = np.argsort(pair_cols["index"], kind="stable")
    pair_cols = {k: v[order] for k, v in pair_cols.items()}
    token_cols = {k: (np.asarray(v, dtype=object) if k == "token" else np.asarray(v))
                  for k, v in tcols.items()}
    if token_cols["index"].size:
        torder = np.lexsort((token_cols["rank"], token_cols["index"]))
        token_cols = {k: v[torder] for k, v in token_cols.items()}
    return pair_cols, token_cols


def summarize(pair_cols: dict[str, np.ndarray], report, **about) -> dict:
    """Means of the changes (the paper's Δ mean log π(y+|x) is a difference of means) and counts."""
    d_c, d_r = pair_cols["delta_logp_chosen"], pair_cols["delta_logp_rejected"]
    n = int(d_c.size)
    single = pair_cols["single_token"].astype(bool)
    return {**about, "pairs": n, "read": report.read, "skipped": len(report.skipped),
            "single_token_pairs": int(single.sum()),
            "mean_delta_logp_chosen": float(d_c.mean()) if n else None,
            "mean_delta_logp_rejected": float(d_r.mean()) if n else None,
            "mean_delta_margin": float((d_c - d_r).mean()) if n else None,
            "fraction_chosen_down": float((d_c < 0).mean()) if n else None,
            "likelihood_displacement": bool(n and d_c.mean() < 0),
            "mean_orth_over_proj": (float(np.nanmean(np.abs(pair_cols["w_diff_orth_norm"][single])
                                                     / np.abs(pair_cols["w_diff_proj_on_chosen"][single])))
                                    if single.any() else None)}


def run_displacement(before_path: str, after_path: str, data: str, out_dir: str, *, top_k: int = 10,
                     batch_size: int = 8, max_length: int | None = None, limit: int | None = None,
                     on_bad_record: str = "error", chat: bool = False, progress: bool = True) -> dict:
    """Loads both checkpoints and the data, compares them (:func:`compare`) and writes ``out_dir``.

    The data is tokenized with the *before* checkpoint's tokenizer. Returns a dict with ``summary``,
    ``pairs`` and ``tokens`` (the column dicts), for :func:`format_table`.
    """
    from jaxalign.analysis.ches_run import load_pairs
    from jaxalign.errors import ConfigError
    from jaxalign.models import load_pretrained

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    before, tokenizer = load_pretrained(before_path)
    after, _ = load_pretrained(after_path)
    if tokenizer is None:
        raise ConfigError(f"{before_path}: no tokenizer files; the before checkpoint must have a tokenizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_pairs(data, tokenizer, limit=limit, max_length=max_length, on_bad_record=on_bad_record,
                         chat=chat, report=str(out / "skipped.jsonl"))
    pair_cols, token_cols = compare(before, after, dataset, top_k=top_k, batch_size=batch_size,
                                    tokenizer=tokenizer, progress=progress)
    store.write_table(pair_cols, out / "pairs.parquet", metadata={"before": before_path, "after": after_path,
                                                                   "data": data})
    store.write_table(token_cols, out / "rising_tokens.parquet", metadata={"top_k": top_k})
    summary = summarize(pair_cols, dataset.report, before=before_path, after=after_path, data=data,
                        top_k=top_k)
    store.write_json(out / "summary.json", summary)
    return {"summary": summary, "pairs": pair_cols, "tokens": token_cols, "out": str(out)}


def format_table(result: dict, show: int = 20) -> str:
    """A readable table: per pair the changes of log π(y±|x) and the three tokens that rose most."""
    s, p, t = result["summary"], result["pairs"], result["tokens"]
    lines = [f"{s['pairs']} pairs ({s['single_token_pairs']} single-token); mean Δlog π(y+|x) "
             f"{_f(s['mean_delta_logp_chosen'])}, mean Δlog π(y−|x) {_f(s['mean_delta_logp_rejected'])}; "
             f"y+ fell on {_pct(s['fraction_chosen_down'])} of pairs"
             + (" — likelihood displacement" if s["likelihood_displacement"] else ""),
             f"{'index':>6} {'logπ(y+) before→after':>24} {'Δ':>8} {'logπ(y−) before→after':>24} "
             f"{'Δ':>8}  top rising tokens (p before→after)"]
    by_index: dict[int, list[str]] = {}
    for i, tok, pb, pa in zip(t["index"], t["token"], t["prob_before"], t["prob_after"]):
        entry = by_index.setdefault(int(i), [])
        if len(entry) < 3:
            entry.append(f"{str(tok)!r} {pb:.3f}→{pa:.3f}")
    for j in range(min(show, len(p["index"]))):
        i = int(p["index"][j])
        lines.append(f"{i:>6} {p['logp_chosen_before'][j]:>11.3f}→{p['logp_chosen_after'][j]:<11.3f} "
                     f"{p['delta_logp_chosen'][j]:>+8.3f} {p['logp_rejected_before'][j]:>11.3f}→"
                     f"{p['logp_rejected_after'][j]:<11.3f} {p['delta_logp_rejected'][j]:>+8.3f}  "
                     + ", ".join(by_index.get(i, [])))
    if len(p["index"]) > show:
        lines.append(f"… {len(p['index']) - show} more in {result['out']}/pairs.parquet")
    return "\n".join(lines)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
