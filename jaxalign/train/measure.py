"""Measurement during training: reference log-probs, the probe set (``displacement/*``, ``ches/*``, the
ledger), ``eval/*`` and ``entanglement/*``.

Everything here reads the current parameters and returns host numbers; nothing updates the state. The
per-example log-probs of a set come from one jitted function per padded shape, in micro-batches of the
run's size whose last one is filled with ``-1`` rows (dropped from the result).

* :func:`reference` — the initial model's log-probs of a set, through the disk cache
  (:mod:`jaxalign.train.ref_cache`) when the weights have a fingerprint.
* :class:`Measurer` — probe + ledger, eval and entanglement of one run (:meth:`Measurer.at`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import parallel
from jaxalign.analysis import entanglement as ent
from jaxalign.errors import CheckpointError
from jaxalign.models import lora
from jaxalign.train import ref_cache
from jaxalign.train import step as step_lib
from jaxalign.train.ledger import Ledger


# --- host ⇄ device ---------------------------------------------------------------------------------------

def host_batch(tokens, rows: np.ndarray, lengths: tuple[int, int], pad_id: int) -> dict[str, np.ndarray]:
    """The shared-prompt batch of ``tokens[rows]`` (``-1`` rows are fillers) padded to ``lengths``."""
    from jaxalign.data.batch import shared_prompt_batch

    return shared_prompt_batch(tokens, rows, pad_id=pad_id, prompt_length=lengths[0],
                               response_length=lengths[1])


def device_keys(batch: dict) -> dict:
    """The entries of a host batch that the jitted steps take."""
    keys = step_lib.BATCH_KEYS + step_lib.REF_KEYS + step_lib.MITIGATION_KEYS
    return {k: v for k, v in batch.items() if k in keys}


def to_device(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's slice of a batch (the whole batch on one process)."""
    out = {}
    nproc, pid = jax.process_count(), jax.process_index()
    for k, v in batch.items():
        sharding = parallel.batch_sharding(mesh, v.ndim)
        if nproc == 1:
            out[k] = jax.device_put(v, sharding)
        else:
            n = v.shape[0] // nproc
            out[k] = jax.make_array_from_process_local_data(sharding, v[pid * n:(pid + 1) * n], v.shape)
    return out


def to_host(x) -> np.ndarray:
    """NumPy value of a (possibly multi-process) array: gathered when sharded across processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- per-example log-probs of a set ------------------------------------------------------------------

@dataclasses.dataclass
class DataSet:
    """One tokenized data set with its padded shape ``(Tp, Tr)`` and (when known) reference log-probs."""

    name: str
    tokens: Any
    lengths: tuple[int, int]
    ref: dict[str, np.ndarray] | None = None
    provenance: dict[str, np.ndarray] | None = None  # record index and origin of each pair (the ledger's)
    scores: dict[str, np.ndarray] | None = None      # train: the reference pass's per-pair scores (pair_rules)
    pair_arrays: dict[str, np.ndarray] | None = None  # train: step.MITIGATION_KEYS [N] of the per-pair mitigations


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Runs a jitted per-example function over a whole set in micro-batches of ``micro`` pairs."""

    mesh: Any
    micro: int
    pad_id: int
    rest: Any
    logps_fn: Callable  # (params, batch, rest) -> {"chosen_logps", "rejected_logps"}
    probe_fn: Callable  # the same plus "ches", "ln_ches" with the shared prompt

    def logps(self, params, s: DataSet, fn: Callable | None = None) -> dict[str, np.ndarray]:
        """``{name: [N]}`` of every pair of ``s`` under ``params`` (``fn`` default: ``logps_fn``)."""
        fn = fn or self.logps_fn
        n = len(s.tokens)
        outs: dict[str, list] = {}
        for start in range(0, n, self.micro):
            rows = np.arange(start, start + self.micro)
            rows = np.where(rows < n, rows, -1)
            b = host_batch(s.tokens, rows, s.lengths, self.pad_id)
            res = fn(params, to_device(device_keys(b), self.mesh), self.rest)
            for k, v in res.items():
                outs.setdefault(k, []).append(to_host(v)[rows >= 0])
        return {k: np.concatenate(v) for k, v in outs.items()}


def reference(scorer: Scorer, s: DataSet, params, *, cache_dir: str | None, weights_key: str | None,
              dtype: str, shared_prompt: bool, write: bool, with_ches: bool = False) -> dict[str, np.ndarray]:
    """The log-probs of ``s`` under ``params`` (the initial model) as ``ref_chosen_logps`` and
    ``ref_rejected_logps`` ``[N]``, through the disk cache unless ``weights_key`` is ``None``.

    ``with_ches`` (shared prompt only): the same forward pass (``scorer.probe_fn``) also gives every
    pair's ``ches`` and ``ln_ches`` ``[N]``, cached in the same entry (:mod:`ref_cache`).
    """
    need = ("ches", "ln_ches") if with_ches and shared_prompt else ()

    def compute() -> dict[str, np.ndarray]:
        lp = scorer.logps(params, s, scorer.probe_fn if need else None)
        return {"ref_chosen_logps": lp["chosen_logps"], "ref_rejected_logps": lp["rejected_logps"],
                "index": s.tokens.index, **{k: lp[k] for k in need}}

    if weights_key is None or cache_dir is None:
        arrays = compute()
    else:
        key = ref_cache.cache_key(weights=weights_key, dtype=dtype,
                                  tokens=ref_cache.tokens_fingerprint(s.tokens), lengths=s.lengths,
                                  shared_prompt=shared_prompt)
        path = Path(cache_dir) / f"{key}.npz"
        hit = ref_cache.has_entry(cache_dir, key, need)
        if jax.process_count() > 1:  # compute together unless every process can read the entry
            from jax.experimental import multihost_utils
            hit = bool(np.all(multihost_utils.process_allgather(np.asarray(hit))))

        def compute_once() -> dict[str, np.ndarray]:
            if hit:  # present but unreadable: computing alone would hang the other processes
                raise CheckpointError(f"{path}: the reference cache entry cannot be read; delete it")
            return compute()

        arrays, _ = ref_cache.load_or_compute(cache_dir, key, compute_once, write=write, need=need)
    return {k: arrays[k] for k in ("ref_chosen_logps", "ref_rejected_logps") + need}


# --- metrics -----------------------------------------------------------------------------------------------

def displacement_metrics(lp: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """``displacement/*`` (mean change of log π(y±) since the reference, fraction of y+ down) and, when
    the log-probs carry them, ``ches/mean`` and ``ches/ln_ches_mean``."""
    dc = lp["chosen_logps"] - ref["ref_chosen_logps"]
    dr = lp["rejected_logps"] - ref["ref_rejected_logps"]
    metrics = {"displacement/chosen_logps_change": float(np.mean(dc)),
               "displacement/rejected_logps_change": float(np.mean(dr)),
               "displacement/fraction_chosen_down": float(np.mean(dc < 0))}
    if "ches" in lp:
        metrics.update({"ches/mean": float(np.mean(lp["ches"])), "ches/ln_ches_mean": float(np.mean(lp["ln_ches"]))})
    return metrics


def entanglement_metrics(res, n: int) -> dict[str, float]:
    """``entanglement/*`` means over the first ``n`` rows of an ``entanglement.entanglement`` result."""
    keep = slice(0, min(n, len(res.grad_inner)))
    out = {"entanglement/grad_inner_mean": float(np.mean(res.grad_inner[keep])),
           "entanglement/grad_cosine_mean": float(np.mean(res.grad_cosine[keep])),
           "entanglement/grad_chosen_sqnorm_mean": float(np.mean(res.grad_chosen_sqnorm[keep])),
           "entanglement/grad_rejected_sqnorm_mean": float(np.mean(res.grad_rejected_sqnorm[keep]))}
    for i, case in enumerate(ent.CASES):  # res.case holds indices into CASES
        out[f"entanglement/fraction_{case}"] = float(np.mean(np.asarray(res.case)[keep] == i))
    return out


@dataclasses.dataclass
class Measurer:
    """The measurements of one run: the probe set against its reference, the ledger, eval, entanglement.

    Attributes:
      scorer: the run's :class:`Scorer`.
      parts: the model's :class:`jaxalign.train.step.ModelParts` (entanglement merges a model).
      spec: the objective (eval loss, entanglement's loss and β).
      probe: the probe set, its ``ref`` set.
      eval_set: the eval set or ``None``.
      ledger: the open ledger or ``None`` (process 0 with ``intervals.ledger``).
    """

    scorer: Scorer
    parts: Any
    spec: step_lib.Objective
    probe: DataSet
    eval_set: DataSet | None = None
    ledger: Ledger | None = None

    def probe_and_ledger(self, step: int, params, do_probe: bool, do_ledger: bool) -> dict:
        lp = self.scorer.logps(params, self.probe, self.scorer.probe_fn)
        ref = self.probe.ref
        if do_ledger and self.ledger is not None:
            self.ledger.append(step, lp["chosen_logps"], lp["rejected_logps"], ref["ref_chosen_logps"],
                               ref["ref_rejected_logps"], self.spec.beta)
        return displacement_metrics(lp, ref) if do_probe else {}

    def evaluate(self, params) -> dict:
        """``eval/*``: the objective's metrics over the whole eval set."""
        s = self.eval_set
        lp = self.scorer.logps(params, s)
        lengths = {f"{k}_lengths": jnp.asarray(getattr(s.tokens, k).lengths) for k in ("chosen", "rejected")}
        lp_all = {**{k: jnp.asarray(v) for k, v in lp.items()}, **lengths}
        refs = {k: jnp.asarray(v) for k, v in (s.ref or {}).items()}
        _, metrics = step_lib.weighted_objective(self.spec, lp_all, refs)
        return {f"eval/{k}": float(v) for k, v in metrics.items()}

    def entangle(self, params) -> dict:
        """``entanglement/*`` of the probe pairs under ``params`` (Yuan et al.; this process's pairs): mean
        ⟨g_w, g_l⟩, cosine, squared norms, and the fractions of the predicted cases. The gradients are
        over the trained parameters: all of them, or a LoRA run's adapters."""
        spec, probe, micro = self.spec, self.probe, self.scorer.micro
        n = len(probe.tokens)
        rows = np.arange(-(-n // micro) * micro)
        b = host_batch(probe.tokens, np.where(rows < n, rows, -1), probe.lengths, self.scorer.pad_id)
        refs = {k: np.pad(v, (0, len(rows) - n)) for k, v in probe.ref.items()}
        options = dict(spec.options, **({"weights": spec.weights} if spec.weights else {}))
        model = self.parts.merge(params, self.scorer.rest)
        # a LoRA run trains the adapters only: their entanglement is the one its steps act on
        trained = ent.LORA if lora.has_adapters(model) else None
        res = ent.entanglement(model, {k: b[k] for k in ent.BATCH_FIELDS},
                               loss=list(spec.names) if spec.weights else spec.names[0], beta=spec.beta,
                               loss_options=options, mesh=self.scorer.mesh, params=trained,
                               ref_chosen_logps=refs["ref_chosen_logps"],
                               ref_rejected_logps=refs["ref_rejected_logps"])
        return entanglement_metrics(res, n)

    def at(self, step: int, params, todo: dict[str, bool]) -> dict:
        """The host metrics due after ``step`` (``todo``: which of probe, ledger, eval, entanglement)."""
        host = {}
        if todo["probe"] or todo["ledger"]:
            host.update(self.probe_and_ledger(step, params, todo["probe"], todo["ledger"]))
        if todo["eval"]:
            host.update(self.evaluate(params))
        if todo["entanglement"]:
            host.update(self.entangle(params))
        return host
