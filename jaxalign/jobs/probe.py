"""The ``jaxalign probe`` job: a fixed probe set measured at every checkpoint of a run, in ``probe.zarr``.

``run_probe``: load the model of a run (``--run``: its ``config.json``, initial weights and dtypes) or the
first of ``--checkpoints``; read, validate and tokenize the probe data with EOS appended
(:func:`jaxalign.jobs.common.load_pairs`); then for each checkpoint not yet in ``DIR/probe.zarr`` (step
order; with ``--every N`` only steps that are multiples of N) restore its parameters onto the current
mesh, measure every pair (:class:`Measurer`, in the jobs' batch loop) and append the row. After each pass
``DIR/probe.parquet`` (long form) is rewritten atomically. A rerun continues where the last stopped;
``--follow`` keeps polling a live run for new checkpoints until the run's last step is probed, its
``final/`` export appears with nothing new, or ``idle_timeout_s`` passes without a new checkpoint.

The pieces: :class:`ProbeStore` (the zarr v3 group, a :class:`jaxalign.store.ZarrGroup` with one
resizable ``checkpoint`` axis); :func:`run_sources` / :func:`folder_sources` (the checkpoints of a run,
restored read-only onto the current mesh, plus the initial weights as step 0, or a list of Hugging Face
folders); :class:`Measurer` (per checkpoint: log-probs and CHES from one prompt-once forward pass,
:func:`jaxalign.train.step.probe_step`, and the entanglement quantities,
:func:`jaxalign.analysis.entanglement.make_pair_grads` compiled once per shape, then fed each checkpoint's
parameters, and :func:`~jaxalign.analysis.entanglement.weigh`).

Letters: K checkpoints (rows, in the order probed), N probe pairs.

``probe.zarr`` (each array's ``dimension_names`` are ``checkpoint``/``example``, so ``xarray.open_zarr``
names the axes):

========================  ======  ===============================================================
array                     shape   meaning
========================  ======  ===============================================================
``step``                  [K]     int64 training step of each checkpoint (0 = the initial weights)
``index``                 [N]     int64 record index of each probe pair in the input data
``prompt_len`` …          [N]     int32 ``prompt_len``, ``chosen_len``, ``rejected_len`` (tokens; EOS counted)
``chosen_logps``          [K, N]  log π(y+|x), summed over the response tokens (nats)
``rejected_logps``        [K, N]  log π(y−|x)
``ches``, ``ln_ches``     [K, N]  CHES and LN-CHES (Razin et al. Def. 2–3) under that checkpoint (``ches``)
``grad_chosen_sqnorm``    [K, N]  ‖g_w‖² (``entangle``; also ``grad_rejected_sqnorm``, ``grad_inner``,
                                  ``grad_cosine``, ``weight_chosen``, ``weight_rejected``,
                                  ``pred_dlogp_chosen``, ``pred_dlogp_rejected`` as in ``jaxalign entangle``)
``case``                  [K, N]  int8 index into the group attribute ``cases`` (``entangle``)
``greedy_logps`` …        [K, N]  the squeezing probe (``squeeze``, :mod:`jaxalign.jobs.squeeze`):
                                  ``greedy_len``, ``greedy_logps``, ``other_logps``, ``top1_*`` and
                                  ``entropy_*`` of ``chosen``/``rejected``/``greedy``
``greedy_ids``            [K, N,  int32 greedy response tokens, -1 after the end (``squeeze``;
                          M]      ``M = max_new_tokens``; dimension ``token``)
========================  ======  ===============================================================

Group attributes: ``rows`` (K committed), ``checkpoints`` (``[{"step", "source"}]`` per row),
``measures``, ``cases``, ``fingerprint`` (the job's settings; a rerun with other settings is refused),
``loss``/``beta`` (margin weights of the entanglement predictions; the reference log-probs are row 0).
A row is committed by rewriting the group's ``zarr.json`` (atomically) after its arrays are written;
arrays longer than ``rows`` (a run killed mid-row) are cut back when the store is reopened.

``probe.parquet``: one row per (checkpoint, pair): ``step``, ``index``, ``prompt_len``, ``chosen_len``,
``rejected_len`` and every measure (``case`` as ``ideal``/``both_down``/``both_up``/``inverted``).
``skipped.jsonl``: records left out (``on_bad_record="skip"``), written once the inputs passed every
check (:func:`jaxalign.jobs.common.write_skipped`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxalign import store
from jaxalign.analysis.entanglement import CASES
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.jobs import common, squeeze
from jaxalign.jobs.options import fingerprint
from jaxalign.jobs.settings import Probe, parse_what

LOGP_MEASURES = ("chosen_logps", "rejected_logps")
CHES_MEASURES = ("ches", "ln_ches")
ENTANGLE_MEASURES = ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner", "grad_cosine",
                     "weight_chosen", "weight_rejected", "pred_dlogp_chosen", "pred_dlogp_rejected", "case")
ENTANGLE_SETTINGS = ("loss", "beta", "loss_options", "method", "params", "last_blocks")
SQUEEZE_SETTINGS = ("max_new_tokens",)
PER_EXAMPLE = ("index", "prompt_len", "chosen_len", "rejected_len")
STORE_NAME = "probe.zarr"
TABLE_NAME = "probe.parquet"


def measures_for(what: Sequence[str]) -> tuple[str, ...]:
    return (LOGP_MEASURES + (CHES_MEASURES if "ches" in what else ())
            + (ENTANGLE_MEASURES if "entangle" in what else ())
            + (squeeze.MEASURES + (squeeze.TOKENS,) if "squeeze" in what else ()))


# --- the zarr store ---------------------------------------------------------------------------------

class ProbeStore:
    """``DIR/probe.zarr``: created fresh, or reopened to append (module doc).

    Args:
      path: the ``probe.zarr`` folder.
      per_example: ``index``, ``prompt_len``, ``chosen_len``, ``rejected_len`` arrays ``[N]``.
      measures: the ``[K, N]`` arrays to hold.
      attributes: fixed group attributes (``fingerprint``, ``loss``, ``beta``, …).
      overwrite: replace a store with another fingerprint instead of refusing.
      tokens: ``M``, the last axis of the ``[K, N, M]`` ``greedy_ids`` (``squeeze``).
    """

    def __init__(self, path: str | Path, *, per_example: Mapping[str, np.ndarray], measures: Sequence[str],
                 attributes: Mapping[str, Any], overwrite: bool = False, tokens: int = 1):
        self.path, self.tokens = Path(path), int(tokens)
        self.measures = tuple(measures)
        self.N = int(len(per_example["index"]))
        self.attributes = dict(attributes, measures=list(self.measures), cases=list(CASES))
        existing = (self.path / "zarr.json").exists()
        if existing:
            old = read_group_attributes(self.path).get("fingerprint", {})
            new = json.loads(json.dumps(self.attributes.get("fingerprint", {}), default=str))
            if old != new and not overwrite:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                details = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
                raise CheckpointError(f"{self.path}: holds a probe with other settings ({details}); rerun "
                                      "with the same settings to continue it, or pass --overwrite")
            existing = old == new
        self.group = store.ZarrGroup(self.path, fresh=not existing)
        if existing:
            old = self.group.attributes
            self.rows, self.checkpoints = int(old.get("rows", 0)), list(old.get("checkpoints", []))
            for name in ("step",) + self.measures:
                self.group.open(name)
            self.group.resize(self.rows, self.row_arrays)  # cut back a row a killed run left half-written
        else:
            self._create(per_example)

    def _create(self, per_example: Mapping[str, np.ndarray]) -> None:
        g, chunk_n = self.group, max(1, min(self.N, 1 << 16))
        self.rows, self.checkpoints = 0, []
        for name in PER_EXAMPLE:
            dtype = "int64" if name == "index" else "int32"
            g.create(name, [self.N], dtype, chunks=[chunk_n], dims=["example"], fill_value=0)
            g.write_rows(name, np.arange(self.N), np.asarray(per_example[name]))
        g.create("step", [0], "int64", chunks=[1024], dims=["checkpoint"], fill_value=0)
        for m in self.measures:
            if m == squeeze.TOKENS:
                g.create(m, [0, self.N, self.tokens], "int32", chunks=[1, chunk_n, self.tokens],
                         dims=["checkpoint", "example", "token"], fill_value=-1)
                continue
            g.create(m, [0, self.N], "int8" if m == "case" else "float64", chunks=[1, chunk_n],
                     dims=["checkpoint", "example"], fill_value=0 if m == "case" else float("nan"))
        self._commit()

    def _commit(self) -> None:
        self.group.set_attributes(dict(self.attributes, rows=self.rows, checkpoints=self.checkpoints))

    @property
    def row_arrays(self) -> tuple[str, ...]:
        """The arrays with a row per checkpoint."""
        return ("step",) + self.measures

    @property
    def steps(self) -> list[int]:
        return [int(c["step"]) for c in self.checkpoints]

    def append(self, step: int, source: str, values: Mapping[str, np.ndarray]) -> None:
        """Writes one checkpoint's row (every measure ``[N]``) and commits it."""
        missing = [m for m in self.measures if m not in values]
        if missing:
            raise ValueError(f"row of step {step} lacks {missing}")
        k = self.rows
        self.group.resize(k + 1, self.row_arrays)
        for m in self.measures:
            self.group.write_row(m, k, values[m])
        self.group.write_row("step", k, np.int64(step))
        self.rows = k + 1
        self.checkpoints.append({"step": int(step), "source": str(source)})
        self._commit()

    def read(self, name: str) -> np.ndarray:
        return self.group.read(name)


def read_group_attributes(path: str | Path) -> dict:
    """The attributes of the zarr v3 group at ``path`` (a folder with ``zarr.json``)."""
    meta = Path(path) / "zarr.json"
    if not meta.exists():
        raise CheckpointError(f"{path}: not a zarr v3 group (no zarr.json)")
    return store.read_json(meta).get("attributes", {})


def read_probe(path: str | Path) -> dict[str, Any]:
    """A probe output as NumPy: ``step`` ``[K]``, the per-example arrays ``[N]``, each measure ``[K, N]``,
    and ``attributes`` (the group's). ``path`` is the output folder or its ``probe.zarr``.

    Rows are sorted by step (they are stored in the order probed).
    """
    p = Path(path)
    if p.name != STORE_NAME:
        p = p / STORE_NAME
    attrs = read_group_attributes(p)
    rows = int(attrs.get("rows", 0))
    out: dict[str, Any] = {"attributes": attrs}
    for name in PER_EXAMPLE:
        out[name] = store.read_zarr(p / name)
    steps = store.read_zarr(p / "step")[:rows]
    order = np.argsort(steps, kind="stable")
    out["step"] = steps[order]
    for m in attrs.get("measures", []):
        out[m] = store.read_zarr(p / m)[:rows][order]
    return out


def long_table(data: Mapping[str, Any]):
    """The long-form ``probe.parquet`` table of :func:`read_probe`'s output: one row per (checkpoint,
    pair) with ``step``, ``index``, the lengths and every measure (``case`` as its name)."""
    import pyarrow as pa

    K, N = len(data["step"]), len(data["index"])
    cols: dict[str, Any] = {"step": pa.array(np.repeat(data["step"].astype(np.int64), N)),
                            "index": pa.array(np.tile(data["index"].astype(np.int64), K))}
    for name in ("prompt_len", "chosen_len", "rejected_len"):
        cols[name] = pa.array(np.tile(data[name].astype(np.int32), K))
    for m in data["attributes"].get("measures", []):
        if m == squeeze.TOKENS:  # [K, N, M] token ids: in probe.zarr only
            continue
        v = np.asarray(data[m]).reshape(-1)
        cols[m] = (pa.array(np.asarray(CASES, dtype=object)[v.astype(np.int64)].tolist(), pa.string())
                   if m == "case" else pa.array(v.astype(np.float64)))
    return pa.table(cols)


def write_table(out: str | Path) -> Path:
    """(Re)writes ``DIR/probe.parquet`` from ``DIR/probe.zarr`` (atomically)."""
    data = read_probe(out)
    attrs = data["attributes"]
    return store.write_table(long_table(data), Path(out) / TABLE_NAME,
                             metadata={"run": attrs.get("run"), "data": attrs.get("data"),
                                       "loss": attrs.get("loss"), "beta": attrs.get("beta")})


# --- checkpoint sources -----------------------------------------------------------------------------

class Source(NamedTuple):
    """One checkpoint to probe: its step, a name for the record, and a loader of its parameters (a pure
    dict like :meth:`jaxalign.train.step.ModelParts.split`'s, placed in the current mesh's shardings)."""

    step: int
    name: str
    load: Callable[[], Any]


class RunCheckpoints:
    """The Orbax checkpoints of a training run, read through :meth:`Checkpointer.reader` (a live run keeps
    saving next to us; nothing is created or deleted).

    Only the ``params`` of each saved ``state`` are read (a partial restore, no optimiser state), into the
    shardings of ``params_like`` — the current mesh, which may differ from the one that saved them.
    """

    def __init__(self, run_dir: str | Path):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self._reader = None

    def _open(self):
        from jaxalign.train.checkpoint import Checkpointer

        if self._reader is None and self.directory.is_dir():
            self._reader = Checkpointer.reader(self.directory)
        return self._reader

    def steps(self) -> list[int]:
        reader = self._open()
        return [] if reader is None else reader.all_steps()

    def meta(self, step: int) -> dict:
        return self._open().read_meta(step)

    def restore_params(self, step: int, params_like):
        return self._open().restore_params(step, params_like)


def load_run(run_dir: str | Path, mesh=None):
    """``(cfg, model, tokenizer, model_path)`` of a training run folder: its ``config.json`` and initial
    weights, with the run's parameter dtype, compute dtype and attention implementation."""
    import jax.numpy as jnp

    from jaxalign import models
    from jaxalign.models import base as model_base
    from jaxalign.models.paths import resolve_model_path
    from jaxalign.train import config as config_lib

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"--run {run}: not a training run folder (no config.json; made by `jaxalign train`)")
    try:
        cfg = config_lib.from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_path}: not valid JSON ({err})") from None
    model_path = resolve_model_path(cfg.model.path)
    model, tokenizer = models.load_pretrained(model_path, dtype=jnp.dtype(cfg.model.param_dtype), mesh=mesh)
    _add_run_adapters(model, cfg.lora, mesh)
    model_base.configure(model, dtype=None if cfg.model.dtype is None else jnp.dtype(cfg.model.dtype),
                         attention_impl=cfg.model.attention_impl, remat=None)
    return cfg, model, tokenizer, model_path


def _add_run_adapters(model, lo, mesh) -> None:
    """The adapters a LoRA run starts from (its ``lora:`` section): read from ``lora.adapter``, or fresh
    with the run's seed (the same ``A``, and ``B = 0``, as the trainer's step 0)."""
    from jaxalign.models import lora

    if lo.adapter is not None:
        lora.load_adapter(model, lo.adapter, option="lora.adapter", mesh=mesh)
    elif lo.target is not None:
        lora.apply(model, lora.LoRASettings(target=lo.target, r=lo.r, alpha=lo.alpha, rslora=lo.rslora),
                   seed=lo.seed, mesh=mesh)


def run_sources(ckpts: RunCheckpoints, params0, *, every: int | None = None,
                skip: Sequence[int] = ()) -> list[Source]:
    """The initial weights (step 0) and every saved checkpoint of a run whose step is a multiple of
    ``every`` (all when ``None``), leaving out the steps in ``skip`` (already probed)."""
    out = []
    saved = ckpts.steps()
    for s in [0] + [s for s in saved if s != 0]:
        if s in skip or (every and s % every):
            continue
        if s == 0 and 0 not in saved:
            out.append(Source(0, "initial weights (model.path)", lambda: params0))
        else:
            out.append(Source(s, f"checkpoints/{s}", lambda s=s: ckpts.restore_params(s, params0)))
    return out


def folder_steps(paths: Sequence[str]) -> list[int]:
    """Steps of checkpoint folders: the trailing number of every name (``checkpoint-500`` → 500) when all
    have one and they differ, else the positions 0, 1, …"""
    nums = [re.search(r"(\d+)$", Path(p).name.rstrip("/")) for p in paths]
    steps = [int(m.group(1)) for m in nums if m]
    if len(steps) == len(paths) and len(set(steps)) == len(steps):
        return steps
    return list(range(len(paths)))


def folder_sources(paths: Sequence[str], params0, *, mesh=None, dtype=None, every: int | None = None,
                   skip: Sequence[int] = (), adapter: str | None = None) -> list[Source]:
    """Hugging Face folders (or ``.gguf`` files) as sources; the first one's parameters are ``params0``.

    Every folder must hold the same architecture (parameter names and shapes) as the first; the PEFT
    folder ``adapter`` (if any) is loaded onto each.
    """
    import jax

    def load(path):
        import jax.numpy as jnp

        from jaxalign import models
        from jaxalign.train import step as step_lib

        from jaxalign.models import lora

        model, _ = models.load_pretrained(path, dtype=dtype or jnp.float32, mesh=mesh)
        lora.load_adapter(model, adapter, mesh=mesh)
        _, params = step_lib.ModelParts.split(model)
        a, b = jax.tree.structure(params), jax.tree.structure(params0)
        shapes = [x.shape for x in jax.tree.leaves(params)] == [x.shape for x in jax.tree.leaves(params0)]
        if a != b or not shapes:
            raise CheckpointError(f"--checkpoints {path}: another architecture than {paths[0]} (parameter "
                                  "names or shapes differ)")
        return params

    out = []
    for i, (path, step) in enumerate(zip(paths, folder_steps(paths))):
        if step in skip or (every and step % every):
            continue
        out.append(Source(step, str(path), (lambda: params0) if i == 0 else (lambda p=path: load(p))))
    return out


# --- measures of one checkpoint ---------------------------------------------------------------------

class ArraySink:
    """Each batch's measures written into ``[N]`` arrays at the batch's positions (in memory)."""

    in_memory = True

    def __init__(self, out: dict[str, np.ndarray]):
        self.out = out

    def is_done(self, batch_id: int) -> bool:
        return False

    def write(self, batch_id: int, rows: np.ndarray, result: Mapping[str, np.ndarray]) -> None:
        for k, v in result.items():
            self.out[k][rows] = v


class Measurer:
    """Measures every probe pair under given parameters (compiled once per padded shape, for all
    checkpoints of one architecture).

    Args:
      parts: :class:`jaxalign.train.step.ModelParts` of the model.
      params0: the first checkpoint's parameters (the entanglement probe is built from them).
      tokens, pad_id: the tokenized probe set.
      cfg: the job's settings (what, loss, beta, loss_options, method, params, last_blocks, chunk_size,
        batch_size), with the loss resolved.
      what: :func:`parse_what`'s output.
      mesh: a ``(data, fsdp, tensor)`` mesh or ``None``.
      compiler_options: of :func:`jaxalign.analysis.entanglement.make_pair_grads`.
      eos_id: where greedy responses end (``squeeze``; the EOS appended to the probe responses).
    """

    def __init__(self, parts, params0, tokens, pad_id: int, cfg: Probe, *, what: Sequence[str], mesh=None,
                 compiler_options: Mapping[str, Any] | None = None, eos_id: int | None = None):
        from jaxalign.train import step as step_lib

        self.parts, self.tokens, self.cfg, self.what, self.mesh = parts, tokens, cfg, tuple(what), mesh
        self.pad_id, self.eos_id = pad_id, eos_id
        self._squeeze = squeeze.jit_response_stats(parts) if "squeeze" in self.what else None
        self.plan = common.Plan.of(tokens, cfg.batch_size, mesh)
        self.make_batch = common.shared_prompt_maker(tokens, pad_id)
        self._logps = step_lib.jit_pair_scores(parts, with_ches="ches" in self.what)
        self._probe = None
        self._compiled: dict = {}
        if "entangle" in self.what:
            from jaxalign.analysis import entanglement as ent

            self._probe = ent.make_pair_grads(parts.merge(params0), method=cfg.method, params=cfg.params,
                                         last_blocks=cfg.last_blocks, chunk_size=cfg.chunk_size, mesh=mesh,
                                         compiler_options=compiler_options)

    def _grads(self, model_k, batch):
        """The entanglement probe on ``model_k``'s parameters, reusing the compiled program per shape."""
        import contextlib

        import jax

        from jaxalign.analysis import entanglement as ent

        probe = self._probe
        sm = ent.split_model(model_k, self.cfg.params, self.cfg.last_blocks)
        diff, fixed = probe.split.split_leaves(list(sm.leaves))
        args, static = probe.inputs(batch)
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            diff, fixed = jax.device_put((diff, fixed), NamedSharding(self.mesh, PartitionSpec()))
        key = (batch["prompt_ids"].shape, batch["chosen_ids"].shape)
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            if key not in self._compiled:
                self._compiled[key] = probe.lower(batch).compile()
            out = self._compiled[key](diff, fixed, args[2], args[3])
        return probe.unpack(out, static["method_"])

    def _put(self, batch: Mapping[str, np.ndarray]) -> dict:
        """A host batch on the devices (sharded over the mesh's batch axes when there is a mesh)."""
        import jax.numpy as jnp

        from jaxalign.train.measure import to_device

        return {k: jnp.asarray(v) for k, v in batch.items()} if self.mesh is None else to_device(batch, self.mesh)

    def _on_mesh(self, fn: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """``fn()`` under the mesh (if any), its results on the host."""
        import contextlib

        import jax

        from jaxalign.train.measure import to_host

        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return {k: to_host(v) for k, v in fn().items()}

    def _logps_of(self, params, batch) -> dict[str, np.ndarray]:
        return self._on_mesh(lambda: self._logps(params, self._put(batch), self.parts.rest))

    def _squeeze_of(self, params, model_k, rows: np.ndarray, batch: dict) -> dict[str, np.ndarray]:
        """The squeezing measures (:mod:`jaxalign.jobs.squeeze`) of the ``n`` real rows of ``batch``."""
        return self._on_mesh(lambda: squeeze.measure_rows(
            model_k, self._squeeze, params, self.parts.rest, self.tokens, rows, batch,
            padded_rows=self.plan.rows, max_new_tokens=self.cfg.max_new_tokens, eos_id=self.eos_id,
            pad_id=self.pad_id, put=self._put))

    def measure(self, params, *, ref: Mapping[str, np.ndarray] | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Every measure ``[N]`` (positions in ``tokens`` order) under ``params``.

        Args:
          ref: ``chosen_logps``/``rejected_logps`` ``[N]`` of the reference (row 0) for the margin weights;
            ``None``: this checkpoint is the reference.
          progress: called with the number of pairs after each batch.
        """
        N = len(self.tokens)
        out = {m: np.full(N, np.nan) for m in measures_for(self.what)}
        if "case" in out:
            out["case"] = np.zeros(N, np.int8)
        if squeeze.TOKENS in out:
            out[squeeze.TOKENS] = np.full((N, self.cfg.max_new_tokens), -1, np.int32)
        need_model = self._probe is not None or self._squeeze is not None
        model_k = self.parts.merge(params) if need_model else None

        def compute(rows: np.ndarray, batch: dict) -> dict[str, np.ndarray]:
            n = len(rows)
            res = {k: v[:n] for k, v in self._logps_of(params, batch).items()}
            if self._squeeze is not None:
                res.update(self._squeeze_of(params, model_k, rows, batch))
            if self._probe is not None:
                res.update(self._entangle(model_k, rows, batch, res if ref is None else
                                          {k: ref[k][rows] for k in LOGP_MEASURES}))
            return res

        after = None if progress is None else (lambda i: progress(len(self.plan.batches[i])))
        common.run_batches(self.plan, self.make_batch, compute, ArraySink(out), progress=False, after_batch=after)
        return out

    def _entangle(self, model_k, rows: np.ndarray, batch: dict, ref_n: Mapping[str, np.ndarray]) -> dict:
        """The entanglement measures of the ``n`` real rows; ``ref_n`` the reference log-probs ``[n]``
        (filler rows get 0: their results are dropped)."""
        from jaxalign.analysis import entanglement as ent

        n, B = len(rows), batch["index"].shape[0]
        full = {k: np.concatenate([np.asarray(ref_n[k], np.float64), np.zeros(B - n)]) for k in LOGP_MEASURES}
        res = ent.weigh(self._grads(model_k, batch), batch, loss=self.cfg.loss, beta=self.cfg.beta,
                        ref_chosen_logps=full["chosen_logps"], ref_rejected_logps=full["rejected_logps"],
                        loss_options=self.cfg.loss_options or {})
        return {m: np.asarray(getattr(res, m))[:n] for m in ENTANGLE_MEASURES}


# --- the job ----------------------------------------------------------------------------------------

def _loss_from_run(cfg) -> tuple[Any, float, dict]:
    """The margin-weight loss of a run: ``(name or names, beta, options)`` as the trainer uses them."""
    from jaxalign.train import step as step_lib

    spec = step_lib.Objective.from_config(cfg.loss, shared_prompt=True)
    options = dict(spec.options, **({"weights": list(spec.weights)} if spec.weights else {}))
    return (list(spec.names) if spec.weights else spec.names[0]), spec.beta, options


def _load_source(cfg: Probe, mesh):
    """``(model, tokenizer, cfg with the loss and max_length resolved, source identity)``."""
    if cfg.run is not None:
        run_cfg, model, tokenizer, model_path = load_run(cfg.run, mesh=mesh)
        run_loss, run_beta, run_opts = _loss_from_run(run_cfg)
        max_length = run_cfg.data.max_length if cfg.max_length is None else cfg.max_length
        source_id = {"run": os.path.abspath(cfg.run), "model": store.model_digest(model_path)}
    else:
        from jaxalign.models import load_pretrained

        for p in cfg.checkpoints:
            if not Path(p).exists():
                raise ConfigError(f"--checkpoints {p}: no such folder or file")
        from jaxalign.models import lora

        model, tokenizer = load_pretrained(cfg.checkpoints[0], mesh=mesh)
        lora.load_adapter(model, cfg.adapter, mesh=mesh)
        run_loss, run_beta, run_opts, max_length = "sigmoid", 0.1, {}, cfg.max_length
        source_id = {"first": store.model_digest(cfg.checkpoints[0])}
    if tokenizer is None:
        raise ConfigError(f"{cfg.run or cfg.checkpoints[0]}: the model has no tokenizer files; probe needs them")
    loss, opts = (run_loss, run_opts if cfg.loss_options is None else cfg.loss_options) if cfg.loss is None \
        else (cfg.loss, cfg.loss_options)
    resolved = dataclasses.replace(cfg, loss=loss, loss_options=dict(opts or {}), max_length=max_length,
                                   beta=run_beta if cfg.beta is None else cfg.beta)
    return model, tokenizer, resolved, source_id


def run_probe(out_dir: str, data: str, *, mesh=None, progress: bool = True,
              after_checkpoint: Callable[[int], None] | None = None,
              compiler_options: Mapping[str, Any] | None = None, **settings) -> dict:
    """Probes every checkpoint of ``run`` (or the folders ``checkpoints``) on ``data``; writes ``out_dir``.

    ``settings`` are :class:`Probe`'s fields; ``after_checkpoint`` is called with each step after its row
    is committed (tests interrupt with it); ``compiler_options`` go to the entanglement probe's ``jax.jit``.

    Returns:
      ``{"out", "pairs", "steps" (all rows), "probed" (this call's steps)}``.

    Raises:
      ConfigError: bad arguments; CheckpointError: an output with other settings, or a checkpoint that
      cannot be restored; DataError / ModelError: bad data or model files.
    """
    return run(Probe(out=out_dir, data=data, **settings), mesh=mesh, progress=progress,
               after_checkpoint=after_checkpoint, compiler_options=compiler_options)


def run(cfg: Probe, *, mesh=None, progress: bool = True, after_checkpoint: Callable[[int], None] | None = None,
        compiler_options: Mapping[str, Any] | None = None) -> dict:
    """:func:`run_probe` with its settings (module doc)."""
    from jaxalign.train import step as step_lib

    what = parse_what(cfg.what)
    out = Path(cfg.out)
    model, tokenizer, cfg, source_id = _load_source(cfg, mesh)
    if "entangle" in what:
        common.check_loss(cfg.loss, cfg.beta, cfg.loss_options)
    from flax import nnx

    from jaxalign.models import lora

    # a LoRA run's checkpoints hold its adapters only (the trainer's params); the base is model.path
    parts, params0 = step_lib.ModelParts.split(
        model, lora.LoRAParam if cfg.run is not None and lora.has_adapters(model) else nnx.Param)
    del model
    loaded = common.load_pairs(cfg.data, tokenizer, max_length=cfg.max_length, limit=cfg.limit,
                               on_bad_record=cfg.on_bad_record, chat=cfg.chat, **common.data_options(cfg))
    common.require_pairs(loaded, cfg.data)
    tokens = loaded.tokens
    if "squeeze" in what and len(tokens) < 2:
        raise ConfigError(f"--what squeeze needs at least 2 probe pairs (each prompt is scored with another "
                          f"pair's response); {cfg.data} has {len(tokens)} usable")
    fp = {k: v for k, v in fingerprint(cfg, **source_id, tokens=store.digest(tokens.to_arrays()),
                                       what=list(what)).items()
          if ("entangle" in what or k not in ENTANGLE_SETTINGS) and ("squeeze" in what or k not in SQUEEZE_SETTINGS)}
    per_example = {"index": tokens.index, "prompt_len": tokens.prompt.lengths,
                   "chosen_len": tokens.chosen.lengths, "rejected_len": tokens.rejected.lengths}
    measurer = Measurer(parts, params0, tokens, loaded.pad_id, cfg, what=what, mesh=mesh,
                        compiler_options=compiler_options, eos_id=loaded.eos_id)
    # the store's fingerprint check is the last check of the inputs: only then is anything written
    zarr_store = ProbeStore(out / STORE_NAME, per_example=per_example, measures=measures_for(what),
                            attributes={"fingerprint": fp, "run": None if cfg.run is None else os.path.abspath(cfg.run),
                                        "data": cfg.data, "loss": cfg.loss, "beta": cfg.beta, "what": list(what)},
                            overwrite=cfg.overwrite, tokens=cfg.max_new_tokens)
    if common.is_lead():
        common.write_skipped(loaded, out)
    ckpts = RunCheckpoints(cfg.run) if cfg.run is not None else None

    def sources():
        if ckpts is not None:
            return run_sources(ckpts, params0, every=cfg.every, skip=zarr_store.steps)
        return folder_sources(list(cfg.checkpoints), params0, mesh=mesh, every=cfg.every, skip=zarr_store.steps,
                              adapter=cfg.adapter)

    probed = _probe_loop(cfg, out, zarr_store, measurer, sources, ckpts, len(tokens), progress, after_checkpoint)
    return {"out": str(out), "pairs": len(tokens), "steps": sorted(zarr_store.steps), "probed": probed}


def _probe_loop(cfg: Probe, out: Path, zarr_store: ProbeStore, measurer: Measurer, sources: Callable,
                ckpts, n_pairs: int, progress: bool, after_checkpoint) -> list[int]:
    """Measures and appends every source not yet probed; with ``follow``, polls for more (module doc)."""
    from tqdm.auto import tqdm

    ref = {m: zarr_store.read(m)[0] for m in LOGP_MEASURES} if zarr_store.rows else None
    probed: list[int] = []
    last_new = time.monotonic()
    while True:
        todo = sources()
        for src in todo:
            bar = tqdm(total=n_pairs, unit="pair", desc=f"probe step {src.step}", disable=not progress,
                       dynamic_ncols=True, leave=False)
            try:
                values = measurer.measure(src.load(), ref=ref, progress=bar.update)
            finally:
                bar.close()
            zarr_store.append(src.step, src.name, values)
            if ref is None:
                ref = {m: values[m] for m in LOGP_MEASURES}
            probed.append(src.step)
            if after_checkpoint is not None:
                after_checkpoint(src.step)
        if todo or not (out / TABLE_NAME).exists():
            write_table(out)
            last_new = time.monotonic()
        if not cfg.follow or _run_finished(ckpts, Path(cfg.run), zarr_store.steps, bool(todo)):
            break
        if time.monotonic() - last_new > cfg.idle_timeout_s:
            break
        time.sleep(cfg.poll_s)
    return probed


def _run_finished(ckpts: RunCheckpoints, run: Path, done: Sequence[int], new: bool) -> bool:
    """Whether a followed run has nothing more to come: its last step is probed, or it exported
    ``final/`` and the last poll found nothing new."""
    steps = ckpts.steps()
    if steps:
        try:
            total = ckpts.meta(steps[-1]).get("total_steps")
        except (ValueError, KeyError, FileNotFoundError):
            total = None
        if total is not None and int(total) in done:
            return True
    return (run / "final").is_dir() and not new
