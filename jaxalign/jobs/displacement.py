"""The ``jaxalign displacement`` job: compare two checkpoints on preference pairs (Razin et al., §3).

Loads the *before* and *after* checkpoints and the pairs (tokenized with the before checkpoint's
tokenizer), runs both models over every batch of the jobs' batch loop
(:func:`jaxalign.jobs.common.run_batches`; :func:`jaxalign.analysis.displacement.pair_statistics`,
prompt once) and writes ``DIR/pairs.parquet`` (one row per pair,
:data:`~jaxalign.analysis.displacement.PAIR_COLUMNS`), ``DIR/rising_tokens.parquet`` (``top_k`` rows per
pair, :data:`~jaxalign.analysis.displacement.TOKEN_COLUMNS`) and ``DIR/summary.json``.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxalign import store
from jaxalign.analysis import displacement as disp
from jaxalign.errors import ConfigError, ModelError
from jaxalign.jobs import common
from jaxalign.jobs.settings import Displacement


def run_displacement(before_path: str, after_path: str, data: str, out_dir: str, *, progress: bool = True,
                     **settings) -> dict:
    """Loads both checkpoints and the data, compares them (:func:`compare`) and writes ``out_dir``.

    ``settings`` are :class:`Displacement`'s other fields. The data is tokenized with the *before*
    checkpoint's tokenizer. Returns a dict with ``summary``, ``pairs`` and ``tokens`` (the column dicts),
    for :func:`format_table`.
    """
    from jaxalign.models import load_pretrained, lora

    cfg = Displacement(before=before_path, after=after_path, data=data, out=out_dir, **settings)
    before, tokenizer = load_pretrained(cfg.before)
    after = lora.load_adapter(load_pretrained(cfg.after)[0], cfg.adapter)
    if tokenizer is None:
        raise ConfigError(f"{cfg.before}: no tokenizer files; the before checkpoint must have a tokenizer")
    out = Path(cfg.out)
    dataset = common.load_pairs(cfg.data, tokenizer, limit=cfg.limit, max_length=cfg.max_length,
                                on_bad_record=cfg.on_bad_record, chat=cfg.chat, **common.data_options(cfg))
    common.require_pairs(dataset, cfg.data)
    common.write_skipped(dataset, out)
    pair_cols, token_cols = compare(before, after, dataset, top_k=cfg.top_k, batch_size=cfg.batch_size,
                                    tokenizer=tokenizer, progress=progress)
    store.write_table(pair_cols, out / "pairs.parquet", metadata={"before": cfg.before, "after": cfg.after,
                                                                   "adapter": cfg.adapter, "data": cfg.data})
    store.write_table(token_cols, out / "rising_tokens.parquet", metadata={"top_k": cfg.top_k})
    summary = summarize(pair_cols, dataset.report, before=cfg.before, after=cfg.after, data=cfg.data,
                        top_k=cfg.top_k)
    store.write_json(out / "summary.json", summary)
    return {"summary": summary, "pairs": pair_cols, "tokens": token_cols, "out": str(out)}


def compare(before, after, dataset, *, top_k: int = 10, batch_size: int = 8, tokenizer=None,
            progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-pair and per-rising-token columns (``PAIR_COLUMNS``, ``TOKEN_COLUMNS``).

    Args:
      before, after: the two loaded models (same vocabulary).
      dataset: a :class:`jaxalign.data.PairDataset`.
      top_k: rising tokens kept per pair.
      batch_size: pairs per forward pass.
      tokenizer: to decode the rising tokens (``token`` column; empty strings without one).
      progress: show a progress bar.
    """
    W = before.unembedding()
    V_before, V_after = W.shape[0], after.unembedding().shape[0]
    if V_before != V_after:
        raise ModelError(f"the checkpoints have different vocabularies ({V_before} and {V_after} tokens)")
    tokens = dataset.tokens
    f_before, f_after = disp.statistics_fn(before), disp.statistics_fn(after)

    def compute(rows: np.ndarray, batch: dict):
        values, probs_before, probs_after, w_dot_diff = _pair_values(
            tokens, rows, f_before(batch), f_after(batch), W, dataset.eos_id)
        return values, _token_values(tokens, rows, values, probs_before, probs_after, w_dot_diff, top_k,
                                     tokenizer)

    sink = common.ListSink()
    common.run_batches(common.Plan.of(tokens, batch_size), common.shared_prompt_maker(tokens, dataset.pad_id),
                       compute, sink, progress=progress, desc="displacement")
    pair_cols = {k: np.concatenate([r[0][k] for _, r in sink.results]) if sink.results else np.zeros(0)
                 for k in disp.PAIR_COLUMNS}
    order = np.argsort(pair_cols["index"], kind="stable")
    pair_cols = {k: v[order] for k, v in pair_cols.items()}
    token_cols = {k: [x for _, r in sink.results for x in r[1][k]] for k in disp.TOKEN_COLUMNS}
    token_cols = {k: (np.asarray(v, dtype=object) if k == "token" else np.asarray(v)) for k, v in token_cols.items()}
    if token_cols["index"].size:
        torder = np.lexsort((token_cols["rank"], token_cols["index"]))
        token_cols = {k: v[torder] for k, v in token_cols.items()}
    return pair_cols, token_cols


def _pair_values(tokens, rows: np.ndarray, b: dict, a: dict, W, eos_id: int):
    """The :data:`~jaxalign.analysis.displacement.PAIR_COLUMNS` of the ``n`` real rows, the next-token
    probabilities before and after ``[n, V]`` and ``⟨W_z, W_y+ − W_y−⟩`` ``[n, V]``."""
    n = len(rows)
    pb = np.exp(np.asarray(b["next_logprobs"])[:n].astype(np.float64))
    pa = np.exp(np.asarray(a["next_logprobs"])[:n].astype(np.float64))
    first_c = np.array([tokens.chosen[i][0] for i in rows])
    first_r = np.array([tokens.rejected[i][0] for i in rows])
    single = disp.single_token(tokens, rows, eos_id)
    q = {k: np.asarray(v) for k, v in disp.theory_jit(W, jnp.asarray(first_c), jnp.asarray(first_r),
                                                        jnp.asarray(pb, jnp.float32)).items()}
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
        values[k] = np.where(single, q[k], np.full(n, np.nan))
    return {k: np.asarray(values[k]) for k in disp.PAIR_COLUMNS}, pb, pa, q["w_dot_diff"]


def _token_values(tokens, rows, values, pb, pa, w_dot_diff, top_k: int, tokenizer) -> dict[str, list]:
    """The :data:`~jaxalign.analysis.displacement.TOKEN_COLUMNS` (``top_k`` rows per pair) as lists."""
    cols: dict[str, list] = {c: [] for c in disp.TOKEN_COLUMNS}
    top = disp.top_rising(pb, pa, top_k)
    for j in range(len(rows)):
        single = bool(values["single_token"][j])
        for rank, z in enumerate(top[j]):
            cols["index"].append(int(tokens.index[rows[j]]))
            cols["rank"].append(rank + 1)
            cols["token_id"].append(int(z))
            cols["token"].append(tokenizer.decode([int(z)]) if tokenizer is not None else "")
            cols["prob_before"].append(float(pb[j, z]))
            cols["prob_after"].append(float(pa[j, z]))
            cols["prob_increase"].append(float(pa[j, z] - pb[j, z]))
            cols["is_chosen"].append(bool(z == values["chosen_token"][j]))
            cols["is_rejected"].append(bool(z == values["rejected_token"][j]))
            cols["w_z_dot_diff"].append(float(w_dot_diff[j, z]) if single else float("nan"))
    return cols


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
