"""A fixed probe set measured at every checkpoint: the ``probe.zarr`` store, checkpoint sources, measures.

``jaxalign probe`` (:mod:`jaxalign.analysis.probe_run`) restores each checkpoint of a run in turn, measures
every probe pair and appends one row per checkpoint to ``DIR/probe.zarr``. This module holds the pieces:

* :class:`ProbeStore` — the zarr v3 group (written with tensorstore), one resizable ``checkpoint`` axis;
* :func:`run_sources` / :func:`folder_sources` — the checkpoints of a run (Orbax, restored onto the current
  mesh, plus the initial weights as step 0) or a list of Hugging Face folders;
* :class:`Measurer` — per checkpoint: log-probs and CHES from one prompt-once forward pass
  (:func:`jaxalign.train.step.probe_step`), and the entanglement quantities
  (:func:`jaxalign.analysis.entanglement.make_probe` compiled once per shape, then fed each checkpoint's
  parameters, and :func:`~jaxalign.analysis.entanglement.weigh`).

Letters: K checkpoints (rows, in the order probed), N probe pairs.

``probe.zarr`` (zarr v3 group; each array's ``dimension_names`` are ``checkpoint``/``example``, so
``xarray.open_zarr`` names the axes):

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
========================  ======  ===============================================================

Group attributes: ``rows`` (K committed), ``checkpoints`` (``[{"step", "source"}]`` per row),
``measures``, ``cases``, ``fingerprint`` (the job's settings; a rerun with other settings is refused),
``loss``/``beta`` (margin weights of the entanglement predictions; the reference log-probs are row 0).

A row is committed by rewriting the group's ``zarr.json`` (atomically) after its arrays are written; arrays
longer than ``rows`` (a run killed mid-row) are cut back when the store is reopened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxalign import store
from jaxalign.errors import CheckpointError, ConfigError

WHAT = ("logps", "ches", "entangle")
LOGP_MEASURES = ("chosen_logps", "rejected_logps")
CHES_MEASURES = ("ches", "ln_ches")
ENTANGLE_MEASURES = ("grad_chosen_sqnorm", "grad_rejected_sqnorm", "grad_inner", "grad_cosine",
                     "weight_chosen", "weight_rejected", "pred_dlogp_chosen", "pred_dlogp_rejected", "case")
PER_EXAMPLE = ("index", "prompt_len", "chosen_len", "rejected_len")
STORE_NAME = "probe.zarr"
TABLE_NAME = "probe.parquet"


def parse_what(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"logps,ches"`` → ``("logps", "ches")`` in canonical order; ``logps`` is always included."""
    items = [w.strip() for w in (text.split(",") if isinstance(text, str) else text) if w.strip()]
    bad = [w for w in items if w not in WHAT]
    if bad:
        raise ConfigError(f"--what: unknown measure {bad[0]!r} (known: {', '.join(WHAT)})")
    return tuple(w for w in WHAT if w in items or w == "logps")


def measures_for(what: Sequence[str]) -> tuple[str, ...]:
    return (LOGP_MEASURES + (CHES_MEASURES if "ches" in what else ())
            + (ENTANGLE_MEASURES if "entangle" in what else ()))


# --- the zarr store ---------------------------------------------------------------------------------

def _spec(path: Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


def _create(path: Path, shape: Sequence[int], chunks: Sequence[int], dtype: str, dims: Sequence[str]):
    import tensorstore as ts

    metadata = {"shape": list(shape), "data_type": dtype, "dimension_names": list(dims),
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                "fill_value": 0 if dtype.startswith("int") else float("nan")}
    return ts.open(dict(_spec(path), metadata=metadata), create=True, delete_existing=True).result()


def _open(path: Path):
    import tensorstore as ts

    return ts.open(_spec(path), open=True).result()


def read_group_attributes(path: str | Path) -> dict:
    """The attributes of the zarr v3 group at ``path`` (a folder with ``zarr.json``)."""
    meta = Path(path) / "zarr.json"
    if not meta.exists():
        raise CheckpointError(f"{path}: not a zarr v3 group (no zarr.json)")
    return store.read_json(meta).get("attributes", {})


class ProbeStore:
    """``DIR/probe.zarr``: created fresh, or reopened to append (module doc).

    Args:
      path: the ``probe.zarr`` folder.
      per_example: ``index``, ``prompt_len``, ``chosen_len``, ``rejected_len`` arrays ``[N]``.
      measures: the ``[K, N]`` arrays to hold.
      attributes: fixed group attributes (``fingerprint``, ``loss``, ``beta``, …).
      overwrite: replace a store with another fingerprint instead of refusing.
    """

    def __init__(self, path: str | Path, *, per_example: Mapping[str, np.ndarray], measures: Sequence[str],
                 attributes: Mapping[str, Any], overwrite: bool = False):
        import shutil

        from jaxalign.analysis.entanglement import CASES

        self.path = Path(path)
        self.measures = tuple(measures)
        self.N = int(len(per_example["index"]))
        self.attributes = dict(attributes, measures=list(self.measures), cases=list(CASES))
        fp = json.loads(json.dumps(self.attributes.get("fingerprint", {}), default=str))
        if (self.path / "zarr.json").exists():
            old = read_group_attributes(self.path)
            if old.get("fingerprint") != fp and not overwrite:
                a, b = old.get("fingerprint", {}), fp
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                details = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in diff)
                raise CheckpointError(f"{self.path}: holds a probe with other settings ({details}); rerun "
                                      "with the same settings to continue it, or pass --overwrite")
            if old.get("fingerprint") != fp:
                shutil.rmtree(self.path)
        chunk_n = max(1, min(self.N, 1 << 16))
        if (self.path / "zarr.json").exists():
            old = read_group_attributes(self.path)
            self.rows = int(old.get("rows", 0))
            self.checkpoints = list(old.get("checkpoints", []))
            self._step = _open(self.path / "step")
            self._arrays = {m: _open(self.path / m) for m in self.measures}
            self._resize(self.rows)  # cut back a row a killed run left half-written
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.rows, self.checkpoints = 0, []
            for name in PER_EXAMPLE:
                dtype = "int64" if name == "index" else "int32"
                arr = _create(self.path / name, [self.N], [chunk_n], dtype, ["example"])
                arr.write(np.asarray(per_example[name]).astype(dtype)).result()
            self._step = _create(self.path / "step", [0], [1024], "int64", ["checkpoint"])
            self._arrays = {m: _create(self.path / m, [0, self.N], [1, chunk_n],
                                       "int8" if m == "case" else "float64", ["checkpoint", "example"])
                            for m in self.measures}
            self._commit()

    def _resize(self, rows: int) -> None:
        def rs(arr, shape):
            if list(arr.shape) == list(shape):
                return arr
            return arr.resize(exclusive_max=list(shape), shrink_only=False, resize_metadata_only=False).result()

        self._step = rs(self._step, [rows])
        self._arrays = {m: rs(a, [rows, self.N]) for m, a in self._arrays.items()}

    def _commit(self) -> None:
        attrs = dict(self.attributes, rows=self.rows, checkpoints=self.checkpoints)
        store.write_json(self.path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})

    @property
    def steps(self) -> list[int]:
        return [int(c["step"]) for c in self.checkpoints]

    def append(self, step: int, source: str, values: Mapping[str, np.ndarray]) -> None:
        """Writes one checkpoint's row (every measure ``[N]``) and commits it."""
        missing = [m for m in self.measures if m not in values]
        if missing:
            raise ValueError(f"row of step {step} lacks {missing}")
        k = self.rows
        self._resize(k + 1)
        for m, arr in self._arrays.items():
            arr[k].write(np.asarray(values[m]).astype(arr.dtype.numpy_dtype)).result()
        self._step[k].write(np.int64(step)).result()
        self.rows = k + 1
        self.checkpoints.append({"step": int(step), "source": str(source)})
        self._commit()

    def read(self, name: str) -> np.ndarray:
        return _open(self.path / name).read().result()


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
        out[name] = _open(p / name).read().result()
    steps = _open(p / "step").read().result()[:rows]
    order = np.argsort(steps, kind="stable")
    out["step"] = steps[order]
    for m in attrs.get("measures", []):
        out[m] = _open(p / m).read().result()[:rows][order]
    return out


def long_table(data: Mapping[str, Any]):
    """The long-form ``probe.parquet`` table of :func:`read_probe`'s output: one row per (checkpoint,
    pair) with ``step``, ``index``, the lengths and every measure (``case`` as its name)."""
    import pyarrow as pa

    from jaxalign.analysis.entanglement import CASES

    K, N = len(data["step"]), len(data["index"])
    cols: dict[str, Any] = {"step": pa.array(np.repeat(data["step"].astype(np.int64), N)),
                            "index": pa.array(np.tile(data["index"].astype(np.int64), K))}
    for name in ("prompt_len", "chosen_len", "rejected_len"):
        cols[name] = pa.array(np.tile(data[name].astype(np.int32), K))
    for m in data["attributes"].get("measures", []):
        v = np.asarray(data[m]).reshape(-1)
        cols[m] = (pa.array(np.asarray(CASES, dtype=object)[v.astype(np.int64)].tolist(), pa.string())
                   if m == "case" else pa.array(v.astype(np.float64)))
    return pa.table(cols)


# --- checkpoint sources -----------------------------------------------------------------------------

class Source(NamedTuple):
    """One checkpoint to probe: its step, a name for the record, and a loader of its parameters (a pure
    dict like :meth:`jaxalign.train.step.ModelParts.split`'s, placed in the current mesh's shardings)."""

    step: int
    name: str
    load: Callable[[], Any]


def _abstract(params):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        params)


class RunCheckpoints:
    """The Orbax checkpoints of a training run, read-only (a live run keeps saving next to us).

    Only the ``params`` of each saved ``state`` are read (a partial restore, no optimiser state), into the
    shardings of ``params_like`` — the current mesh, which may differ from the one that saved them.
    """

    def __init__(self, run_dir: str | Path):
        import orbax.checkpoint as ocp

        self.directory = Path(run_dir).absolute() / "checkpoints"
        self._ocp = ocp
        self._manager = None

    def _mgr(self):
        if self._manager is None:
            if not self.directory.is_dir():
                return None
            ocp = self._ocp
            # read_only: never delete anything (the run's own manager owns retention and temp folders).
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
            absl = logging.getLogger("absl")
            level = absl.level
            absl.setLevel(logging.ERROR)  # "directory is read only": what we asked for
            try:
                self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                      item_names=("state", "data", "meta"))
            finally:
                absl.setLevel(level)
        return self._manager

    def steps(self) -> list[int]:
        mgr = self._mgr()
        if mgr is None:
            return []
        mgr.reload()
        return sorted(int(s) for s in mgr.all_steps())

    def meta(self, step: int) -> dict:
        ocp = self._ocp
        return self._mgr().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_params(self, step: int, params_like):
        ocp = self._ocp
        target = {"params": _abstract(params_like)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            out = self._mgr().restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True)))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise CheckpointError(f"{self.directory}/{step}: cannot restore the parameters: {err}") from None
        return out["state"]["params"]


def load_run(run_dir: str | Path, mesh=None):
    """``(cfg, model, tokenizer)`` of a training run folder: its ``config.json`` and initial weights, with
    the run's parameter dtype, compute dtype and attention implementation."""
    import jax.numpy as jnp

    from jaxalign import models
    from jaxalign.models import base as model_base
    from jaxalign.train import config as config_lib
    from jaxalign.train import loop

    run = Path(run_dir)
    cfg_path = run / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"--run {run}: not a training run folder (no config.json; made by `jaxalign train`)")
    try:
        cfg = config_lib.from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_path}: not valid JSON ({err})") from None
    model_path = loop.resolve_model_path(cfg.model.path)
    model, tokenizer = models.load_pretrained(model_path, dtype=jnp.dtype(cfg.model.param_dtype), mesh=mesh)
    model_base.configure(model, dtype=None if cfg.model.dtype is None else jnp.dtype(cfg.model.dtype),
                         attention_impl=cfg.model.attention_impl, remat=None)
    return cfg, model, tokenizer, model_path


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


def folder_sources(paths: Sequence[str], parts, params0, *, mesh=None, dtype=None, every: int | None = None,
                   skip: Sequence[int] = ()) -> list[Source]:
    """Hugging Face folders (or ``.gguf`` files) as sources; the first one's parameters are ``params0``.

    Every folder must hold the same architecture (parameter names and shapes) as the first.
    """
    import jax

    def load(path):
        import jax.numpy as jnp

        from jaxalign import models
        from jaxalign.train import step as step_lib

        model, _ = models.load_pretrained(path, dtype=dtype or jnp.float32, mesh=mesh)
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

class Measurer:
    """Measures every probe pair under given parameters (compiled once per padded shape, for all
    checkpoints of one architecture).

    Args:
      parts: :class:`jaxalign.train.step.ModelParts` of the model.
      params0: the first checkpoint's parameters (the entanglement probe is built from them).
      tokens, pad_id: the tokenized probe set.
      what: :func:`parse_what`'s output.
      loss, beta, loss_options: margin weights of the entanglement predictions.
      method, params, last_blocks, chunk_size, compiler_options: of :func:`jaxalign.analysis.entanglement.make_probe`.
      batch_size: pairs per batch.
      mesh: a ``(data, fsdp, tensor)`` mesh or ``None``.
    """

    def __init__(self, parts, params0, tokens, pad_id: int, *, what: Sequence[str], loss="sigmoid",
                 beta: float = 0.1, loss_options: Mapping[str, Any] | None = None, method: str = "auto",
                 params: Sequence[str] | None = None, last_blocks: int | None = None,
                 chunk_size: int | None = None, batch_size: int = 8, mesh=None,
                 compiler_options: Mapping[str, Any] | None = None):
        import jax

        from jaxalign.analysis import ches_run
        from jaxalign.train import step as step_lib

        self.parts, self.tokens, self.pad_id, self.what, self.mesh = parts, tokens, pad_id, tuple(what), mesh
        self.loss, self.beta, self.loss_options = loss, beta, dict(loss_options or {})
        self.param_patterns, self.last_blocks = params, last_blocks
        self.rows_multiple = 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])
        self.batch_size = -(-batch_size // self.rows_multiple) * self.rows_multiple
        self.resp_len = np.maximum(tokens.chosen.lengths, tokens.rejected.lengths)
        self.batches = ches_run.plan_batches(tokens.prompt.lengths, self.resp_len, batch_size)
        fn = step_lib.probe_step if "ches" in self.what else step_lib.logps_step
        self._logps = jax.jit(lambda p, b, r: fn(p, b, r, parts=parts))
        self._probe = None
        self._compiled: dict = {}
        if "entangle" in self.what:
            from jaxalign.analysis import entanglement as ent

            self._probe = ent.make_probe(parts.merge(params0), method=method, params=params,
                                         last_blocks=last_blocks, chunk_size=chunk_size, mesh=mesh,
                                         compiler_options=compiler_options)

    def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        from jaxalign.analysis import ches_run
        from jaxalign.data.batch import shared_prompt_batch

        padded = np.full(self.batch_size, rows[0], np.int64)  # fillers repeat the first pair
        padded[:len(rows)] = rows
        return shared_prompt_batch(self.tokens, padded, pad_id=self.pad_id,
                                   prompt_length=ches_run.bucket(int(self.tokens.prompt.lengths[rows].max())),
                                   response_length=ches_run.bucket(int(self.resp_len[rows].max())))

    def _grads(self, model_k, batch):
        """The entanglement probe on ``model_k``'s parameters, reusing the compiled program per shape."""
        import jax

        from jaxalign.analysis import entanglement as ent

        probe = self._probe
        sm = ent.split_model(model_k, self.param_patterns, self.last_blocks)
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

    def measure(self, params, *, ref: Mapping[str, np.ndarray] | None = None,
                progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Every measure ``[N]`` (positions in ``tokens`` order) under ``params``.

        Args:
          ref: ``chosen_logps``/``rejected_logps`` ``[N]`` of the reference (row 0) for the margin weights;
            ``None``: this checkpoint is the reference.
          progress: called with the number of pairs after each batch.
        """
        from jaxalign.train import loop

        N = len(self.tokens)
        out = {m: np.full(N, np.nan) for m in measures_for(self.what)}
        if "case" in out:
            out["case"] = np.zeros(N, np.int8)
        rest = self.parts.rest
        model_k = self.parts.merge(params) if self._probe is not None else None
        for rows in self.batches:
            n = len(rows)
            batch = self._batch(rows)
            if self.mesh is None:
                import jax.numpy as jnp

                placed = {k: jnp.asarray(v) for k, v in batch.items()}
                res = self._logps(params, placed, rest)
            else:
                import jax

                with jax.set_mesh(self.mesh):
                    res = self._logps(params, loop.to_device(batch, self.mesh), rest)
            for k, v in res.items():
                out[k][rows] = loop.to_host(v)[:n]
            if self._probe is not None:
                from jaxalign.analysis import entanglement as ent

                grads = self._grads(model_k, batch)
                pad = np.concatenate([rows, np.full(self.batch_size - n, rows[0])])
                src = out if ref is None else ref
                res_e = ent.weigh(grads, batch, loss=self.loss, beta=self.beta,
                                  ref_chosen_logps=src["chosen_logps"][pad],
                                  ref_rejected_logps=src["rejected_logps"][pad], loss_options=self.loss_options)
                for m in ENTANGLE_MEASURES:
                    out[m][rows] = np.asarray(getattr(res_e, m))[:n]
            if progress is not None:
                progress(n)
        return out

