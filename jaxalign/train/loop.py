"""The training loop: ``train(cfg)`` runs one DPO-family run from a :class:`config.RunConfig`;
``train_loaded(model, tokenizer, pairs, cfg)`` runs one on a model already in memory.

:func:`setup` builds a :class:`Run` — everything the loop needs — in this order:

1. builds the ``(data, fsdp, tensor)`` mesh and loads the policy sharded onto it (:func:`train_loaded`:
   places the given model's weights onto it, leaving the model itself untouched);
2. tokenizes the train, eval and probe sets (``jaxalign.data``; ``data.chat`` renders standard pairs with
   the chat template, ``data.append_eos: false`` leaves responses without EOS), each padded to one fixed
   shape (``data.prompt_length`` / ``data.response_length`` fix it for every set);
3. gets the reference log-probs: from the disk cache (:mod:`ref_cache`), computed once, or — with
   ``loss.reference: online`` — from a frozen copy of the initial weights every step; reference-free
   losses skip them on the train set;
4. restores the latest checkpoint with ``resume=True`` (refusing a config change that alters the run).

:func:`run_loop` then loops: step ``s + 1`` is dispatched before step ``s``'s metrics are read; a
non-finite loss or gradient norm stops the run naming the step (checkpoints already written stay); every
interval it logs (``metrics.jsonl``, a tqdm bar with loss and tokens/s), measures (:mod:`measure`: eval,
``displacement/*``, ``ches/*``, optionally ``entanglement/*``, the ledger) and saves a checkpoint; at the
end it saves the last checkpoint and exports the final model as a Hugging Face folder ``OUTPUT/final``.

Output folder: ``config.json`` (the resolved config), ``metrics.jsonl``, ``ledger.zarr``,
``checkpoints/<step>/``, ``final/`` (and ``tensorboard/`` when ``tensorboardX`` is installed). The
reference log-probs and the tokenized data are cached in ``cache_dir`` (default ``OUTPUT/../.ref_cache``).

Data order: each epoch visits the pairs in ``jaxalign.data.epoch_order(N, seed, epoch)``; the last
incomplete batch of an epoch is dropped. The iterator's position is checkpointed, so a resumed run
sees the same batches; on CPU the resumed run's final parameters are bit-identical to an
uninterrupted run's (tested by killing a subprocess).

Compilation: the jitted step and log-prob functions are keyed by the model's graphdef, the objective and
the optimiser's config (:class:`jaxalign.train.step.Static`), so runs with equal keys and equal padded
shapes — e.g. :func:`train_loaded` on many pair sets with fixed ``data.prompt_length`` and
``data.response_length`` — trace and compile once.

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
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import parallel
from flax import nnx

from jaxalign.errors import CheckpointError, ConfigError, JaxAlignError, ModelError
from jaxalign.models import lora
from jaxalign.models.paths import resolve_model_path
from jaxalign.train import optim, pair_rules, ref_cache, telemetry
from jaxalign.train import step as step_lib
from jaxalign.train.checkpoint import Checkpointer
from jaxalign.train.config import RunConfig, fingerprint, run_changes, stop_rule
from jaxalign.train.ledger import Ledger
from jaxalign.train.measure import (DataSet, Measurer, Scorer, device_keys, host_batch, reference,  # noqa: F401
                                    to_device, to_host)

__all__ = ["train", "train_loaded", "setup", "setup_loaded", "run_loop", "Run", "TrainingDiverged",
           "PairOrder", "load_tokens", "subset", "padded_lengths", "host_batch", "to_device", "to_host",
           "make_run_mesh", "export", "resolve_model_path"]


class TrainingDiverged(JaxAlignError):
    """The loss or the gradient norm became NaN or infinite (the message names the step)."""


# --- data ---------------------------------------------------------------------------------------------

def load_tokens(source, tokenizer, data_cfg, *, cache_dir: str | None = None, limit: int | None = None):
    """Reads, validates and tokenizes one preference set (``jaxalign.data.load_pairs``, cached): a path,
    a built-in name or a list of records; returns its ``TokenizedPairs`` (the first ``limit`` pairs)."""
    return load_tokens_and_provenance(source, tokenizer, data_cfg, cache_dir=cache_dir, limit=limit)[0]


def load_tokens_and_provenance(source, tokenizer, data_cfg, *, cache_dir: str | None = None,
                               limit: int | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """:func:`load_tokens` and the pairs' provenance (``jaxalign.data.PairDataset.provenance``: the
    record ``index`` and where each pair came from, one row per pair in token order)."""
    from jaxalign import data

    dataset = data.load_pairs(source, tokenizer, max_length=data_cfg.max_length,
                              max_prompt_length=data_cfg.max_prompt_length, cache_dir=cache_dir,
                              format=data_cfg.format, chat=data_cfg.chat, append_eos=data_cfg.append_eos)
    tokens = dataset.tokens
    provenance = dict(dataset.provenance or {"index": np.asarray(tokens.index, np.int64)})
    if limit is not None and limit < len(tokens):
        tokens = subset(tokens, np.arange(limit))
        provenance = {k: v[:limit] for k, v in provenance.items()}
    if len(tokens) == 0:
        name = source if isinstance(source, (str, os.PathLike)) else "the given pairs"
        raise ConfigError(f"{name}: no usable preference pairs")
    return tokens, provenance


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


def set_lengths(tokens, data_cfg, name: str) -> tuple[int, int]:
    """``(Tp, Tr)`` of a set: ``data.prompt_length`` / ``data.response_length`` when set (checked to
    hold every pair), else :func:`padded_lengths`."""
    auto = padded_lengths(tokens)
    fixed = (data_cfg.prompt_length, data_cfg.response_length)
    longest = (int(tokens.prompt.lengths.max()),
               int(max(tokens.chosen.lengths.max(), tokens.rejected.lengths.max())))
    for key, size, need in zip(("data.prompt_length", "data.response_length"), fixed, longest):
        if size is not None and need > size:
            raise ConfigError(f"{key}: {size} tokens, but the {name} set has a pair with {need}; raise it "
                              "or truncate with data.max_prompt_length / data.max_length")
    return tuple(a if f is None else f for a, f in zip(auto, fixed))


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
    shape = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, mesh_cfg.expert]
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


# --- the metrics log ------------------------------------------------------------------------------------

class MetricsLog:
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
            path.write_text("".join(line + "\n" for line in _lines_upto(path, resume_step)))
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


def _lines_upto(path: Path, step: int) -> list[str]:
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut short by the kill
            continue
    return keep


# --- setup ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything the loop needs, built by :func:`setup` / :func:`setup_loaded`.

    Attributes:
      cfg: the run config; out: the output folder; primary: this is process 0 (it writes).
      mesh: the device mesh; spec: the objective; parts, rest: the model taken apart; tokenizer.
      sets: ``train``, ``probe`` and optionally ``eval`` :class:`~jaxalign.train.measure.DataSet`\\ s.
      order: the resumable data order; total_steps: the run's length.
      state: the :class:`~jaxalign.train.step.TrainState` (donated to ``train_fn`` every step).
      ref_params: the frozen initial weights (``loss.reference: online``) or ``None``.
      train_fn: the jitted step ``(state, batch, rest, ref_params) -> (state, metrics)``.
      measure: probe, ledger, eval and entanglement; ckpt: the checkpointer; log: ``metrics.jsonl``.
      meta: stored with each checkpoint; start_step: the restored step (0 for a new run);
      resumed: a checkpoint was restored.
      pair_counts: ``data/pairs_{kept,dropped,mitigated}`` when pair rules are set (step 0's metrics line).
    """

    cfg: RunConfig
    out: Path
    primary: bool
    mesh: Any
    spec: step_lib.Objective
    parts: step_lib.ModelParts
    rest: Any
    tokenizer: Any
    sets: dict[str, DataSet]
    order: PairOrder
    total_steps: int
    state: step_lib.TrainState
    ref_params: Any
    train_fn: Any
    measure: Measurer
    ckpt: Checkpointer
    meta: dict
    log: MetricsLog | None = None
    start_step: int = 0
    resumed: bool = False
    pair_counts: dict = dataclasses.field(default_factory=dict)  # data/pairs_*: what the pair rules did
    monitor: Any = None            # telemetry.Monitor: per-pair table, alarm, stop_on_displacement


def _refuse_existing_run(out: Path, resume: bool) -> None:
    ckpt_dir = out / "checkpoints"
    existing = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if existing and not resume:
        raise CheckpointError(f"{out}: holds a run already (checkpoints in {ckpt_dir}); pass --resume to "
                              "continue it or choose another output_dir")


def _configure(model, cfg: RunConfig) -> None:
    from jaxalign.models import base as model_base

    model_base.configure(model, dtype=None if cfg.model.dtype is None else jnp.dtype(cfg.model.dtype),
                         attention_impl=cfg.model.attention_impl, remat=cfg.model.remat,
                         scan_layers=cfg.model.scan_layers)


def _load_sets(cfg: RunConfig, tokenizer, train_source, cache_dir: str) -> dict[str, DataSet]:
    """The train, eval (when ``data.eval``) and probe sets, tokenized (cached in ``cache_dir``)."""
    d = cfg.data
    tok_cache = str(Path(cache_dir) / "tokenized")
    train_tokens, train_prov = load_tokens_and_provenance(train_source, tokenizer, d, cache_dir=tok_cache,
                                                          limit=d.limit)
    sets = {"train": DataSet("train", train_tokens, set_lengths(train_tokens, d, "train"), provenance=train_prov)}
    if d.eval:
        t = load_tokens(d.eval, tokenizer, d, cache_dir=tok_cache)
        sets["eval"] = DataSet("eval", t, set_lengths(t, d, "eval"))
    probe_src, probe_prov = (load_tokens_and_provenance(d.probe, tokenizer, d, cache_dir=tok_cache) if d.probe
                             else (train_tokens, train_prov))
    n = min(d.probe_size, len(probe_src))
    probe_tokens = subset(probe_src, np.arange(n))
    sets["probe"] = DataSet("probe", probe_tokens, set_lengths(probe_tokens, d, "probe"),
                            provenance={k: v[:n] for k, v in probe_prov.items()})
    return sets


def _reference_pass(cfg: RunConfig, spec, sets: dict[str, DataSet], ref_scorer: Scorer, params, *,
                    cache_dir: str, weights_key: str | None, write: bool) -> None:
    """Sets each set's reference log-probs (``ref``) and, when pair rules are configured, the training
    pairs' ``scores`` (:mod:`pair_rules`; ``ches`` and ``ln_ches`` from the same shared-prompt pass, cached
    with the log-probs). Without rules the pass is the plain log-prob program, so runs without rules keep
    their compiled programs (and the bit-identical kill-and-resume of ``tests/test_train.py``).

    The training set's pass is skipped when neither the loss (cached reference) nor a pair rule needs it.
    """
    online = spec.needs_reference and cfg.loss.reference == "online"
    rules = pair_rules.uses_rules(cfg.data, cfg.mitigations)
    for s in sets.values():
        train = s.name == "train"
        uses_ref = not (train and (online or not spec.needs_reference))
        if not (uses_ref or (train and rules)):
            continue
        arrays = reference(ref_scorer, s, params, cache_dir=cache_dir, weights_key=weights_key,
                           dtype=f"{cfg.model.param_dtype}/{cfg.model.dtype}",
                           shared_prompt=spec.shared_prompt, write=write, with_ches=train and rules)
        s.ref = {k: arrays[k] for k in step_lib.REF_KEYS} if uses_ref else None
        if train:
            s.scores = pair_rules.pair_scores(arrays, s.tokens)


def _route_pairs(cfg: RunConfig, train: DataSet, source, out: Path, primary: bool) -> tuple[DataSet, dict]:
    """The training set after ``data.filter``, ``data.weights`` and ``mitigations`` (:mod:`pair_rules`):
    dropped pairs removed, the per-pair arrays attached; ``OUTPUT/filtered.jsonl`` and
    ``OUTPUT/mitigated.jsonl`` written and a line printed (process 0). Returns it and the counts."""
    d = cfg.data
    if not pair_rules.uses_rules(d, cfg.mitigations):
        return train, {}
    column = (pair_rules.column_weights(source, d.weights, train.provenance) if isinstance(d.weights, str)
              else None)
    plan = pair_rules.plan(d, cfg.mitigations, train.scores, column)
    names = pair_rules.scores_needed(d, cfg.mitigations)
    counts = pair_rules.count(plan)
    if primary:
        pair_rules.write_reports(out, plan, train.provenance["index"], train.scores, names)
        print(f"pair rules: kept {counts['kept']} of {len(plan.reasons)} training pairs, dropped "
              f"{counts['dropped']}, mitigated {counts['mitigated']} (see {out}/filtered.jsonl and "
              f"{out}/mitigated.jsonl)", file=sys.stderr)
    keep = np.flatnonzero(plan.keep)
    if keep.size == 0:
        keys = sorted({r.split(":")[0] for r in plan.reasons if r})
        raise ConfigError(f"{' and '.join(keys)}: every one of the {len(plan.reasons)} training pairs is "
                          f"dropped (the reasons are in {out}/filtered.jsonl)")
    pick = lambda arrays: None if arrays is None else {k: v[keep] for k, v in arrays.items()}  # noqa: E731
    kept = DataSet("train", subset(train.tokens, keep), train.lengths, ref=pick(train.ref),
                   provenance=pick(train.provenance), scores=pick(train.scores), pair_arrays=pick(plan.arrays))
    return kept, {f"data/pairs_{k}": v for k, v in counts.items()}


def _restore(run: Run) -> None:
    """Continues ``run`` from the latest checkpoint, refusing a config change that alters the run."""
    latest = run.ckpt.latest_step()
    if latest is None:
        return
    saved = run.ckpt.read_meta(latest)
    changes = run_changes(saved["config"], run.cfg)
    if changes:
        raise CheckpointError(f"{run.out}: --resume with a config that would change the run "
                              f"({', '.join(changes)}); revert these keys or start a new output_dir")
    run.state, data_state, _ = run.ckpt.restore(latest, run.state)
    run.order.restore(data_state)
    run.start_step, run.resumed = latest, True


def _checks(cfg: RunConfig, resume: bool) -> tuple[Any, int, step_lib.Objective]:
    """What can be refused before loading anything: ``(mesh, micro-batch size, objective)``."""
    mesh = make_run_mesh(cfg.mesh)
    micro = _batch_size_check(cfg, mesh)
    spec = step_lib.Objective.from_config(cfg.loss, shared_prompt=cfg.data.shared_prompt,
                                          fused_pairs=cfg.data.fused_pairs, grad_accum=cfg.train.grad_accum)
    spec = dataclasses.replace(spec, pair_outputs=True, telemetry=cfg.telemetry.pairs,  # telemetry.py
                               telemetry_params=cfg.telemetry.params)
    for m in pair_rules.parse_mitigations(cfg.mitigations):
        if m.action == "dpop" and not spec.needs_reference:
            raise ConfigError(f"{m.key}.action: dpop needs reference log-probs; the loss {cfg.loss.name!r} "
                              "is reference-free")
    _refuse_existing_run(Path(cfg.output_dir), resume)
    return mesh, micro, spec


def _build(cfg: RunConfig, model, tokenizer, train_source, *, weights_key: str | None, checked: tuple,
           resume: bool) -> Run:
    """The :class:`Run` of ``cfg`` on a loaded, configured ``model`` (its weights placed on the mesh);
    ``checked`` is :func:`_checks`' result. With ``lora`` the adapters are added here and only they are
    trained (the optimiser state is theirs alone); the base weights ride in ``rest``."""
    from jaxalign.data import special_ids

    base_key = weights_key
    model, weights_key = _with_lora(model, cfg, checked[0], weights_key)
    mesh, micro, spec = checked
    out, primary = Path(cfg.output_dir), jax.process_index() == 0
    parts, params = step_lib.ModelParts.split(model, lora.LoRAParam if cfg.lora.enabled else nnx.Param)
    _, pad_id = special_ids(tokenizer)
    cache_dir = cfg.cache_dir or str(out.parent / ".ref_cache")
    sets = _load_sets(cfg, tokenizer, train_source, cache_dir)
    scorer = Scorer(mesh, micro, pad_id, parts.rest,
                    step_lib.jit_pair_scores(parts, shared_prompt=spec.shared_prompt),
                    step_lib.jit_pair_scores(parts, shared_prompt=spec.shared_prompt, with_ches=True))
    online = spec.needs_reference and cfg.loss.reference == "online"
    ref_scorer = scorer
    if cfg.loss.reference == "adapter_off":  # frozen base weights: computed once, equal every step
        ref_scorer = dataclasses.replace(scorer, logps_fn=step_lib.jit_pair_scores(
            parts, shared_prompt=spec.shared_prompt, adapters=False), probe_fn=step_lib.jit_pair_scores(
            parts, shared_prompt=spec.shared_prompt, with_ches=True, adapters=False))
        weights_key = base_key
    _reference_pass(cfg, spec, sets, ref_scorer, params, cache_dir=cache_dir, weights_key=weights_key,
                    write=primary)
    sets["train"], pair_counts = _route_pairs(cfg, sets["train"], train_source, out, primary)
    order = PairOrder(len(sets["train"].tokens), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
    total_steps = cfg.train.steps or max(1, int(math.ceil(cfg.train.epochs * order.batches_per_epoch)))
    opt_key = (cfg.optim, total_steps)
    optimizer = optim.make_optimizer(cfg.optim, total_steps)
    ref_params = jax.tree.map(jnp.copy, params) if online else None
    state = step_lib.init_state(optimizer, params, step_lib.shardings_of(params), mesh, seed=cfg.train.seed,
                                key=opt_key)
    del params
    batch_sh = {k: parallel.batch_sharding(mesh, 2 if k in step_lib.BATCH_KEYS else 1)
                for k in step_lib.BATCH_KEYS + (step_lib.REF_KEYS if sets["train"].ref is not None else ())
                + (step_lib.MITIGATION_KEYS if sets["train"].pair_arrays is not None else ())}
    train_fn = step_lib.jit_train_step(
        parts=parts, spec=spec, optimizer=optimizer, schedule=optim.make_schedule(cfg.optim, total_steps),
        state_shardings=step_lib.shardings_of(state), batch_shardings=batch_sh,
        rest_shardings=step_lib.shardings_of(parts.rest),
        ref_shardings=None if ref_params is None else step_lib.shardings_of(ref_params), mesh=mesh, key=opt_key,
        constrain_activations=cfg.mesh.constrain_activations)
    ckpt = Checkpointer(out / "checkpoints", keep_last=cfg.checkpoint.keep_last, best_metric=cfg.checkpoint.best_metric,
                        best_mode=cfg.checkpoint.best_mode, async_save=cfg.checkpoint.async_save)
    measure = Measurer(scorer, parts, spec, sets["probe"], sets.get("eval"))
    meta = {"config": cfg.to_dict(), "fingerprint": fingerprint(cfg.to_dict()), "total_steps": total_steps}
    run = Run(cfg, out, primary, mesh, spec, parts, parts.rest, tokenizer, sets, order, total_steps, state,
              ref_params, train_fn, measure, ckpt, meta, pair_counts=pair_counts)
    if resume:
        _restore(run)
    _open_writers(run)
    return run


def _with_lora(model, cfg: RunConfig, mesh, weights_key: str | None):
    """``model`` with the adapters of ``cfg.lora`` (fresh, or read from ``lora.adapter``), and the
    reference cache key of its initial policy (a fresh adapter leaves the base model unchanged)."""
    lo = cfg.lora
    if not lo.enabled:
        return model, weights_key
    try:
        if lo.adapter is not None:
            lora.load_peft(model, lo.adapter, mesh=mesh)
            if weights_key is not None:
                weights_key = fingerprint([weights_key, ref_cache.weights_fingerprint(lo.adapter),
                                           (Path(lo.adapter) / "adapter_config.json").read_text()])
        else:
            lora.apply(model, lora.LoRASettings(target=lo.target, r=lo.r, alpha=lo.alpha, rslora=lo.rslora),
                       seed=lo.seed, mesh=mesh)
    except ModelError as err:
        raise ConfigError(f"lora.{'adapter' if lo.adapter else 'target'}: {err}") from None
    _configure(model, cfg)  # the adapters compute in the run's dtype too
    return model, weights_key


def _open_writers(run: Run) -> None:
    """``config.json``, the ledger (truncated after the restored step) and ``metrics.jsonl`` (process 0)."""
    cfg, out = run.cfg, run.out
    if run.primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if cfg.intervals.ledger:
            probe = run.sets["probe"]
            run.measure.ledger = Ledger(out / "ledger.zarr", len(probe.tokens), pairs=probe.provenance)
            run.measure.ledger.truncate(run.start_step if run.resumed else -1)
    run.log = MetricsLog(out / "metrics.jsonl", run.primary, run.start_step if run.resumed else None)
    run.monitor = telemetry.Monitor(out if run.primary else None, table=cfg.telemetry.pairs,
                                    stop=stop_rule(cfg.train), resume_step=run.start_step if run.resumed else None)


def _check_sources(cfg: RunConfig) -> None:
    if not cfg.model.path:
        raise ConfigError("model.path: required (a Hugging Face model folder)")
    if not cfg.data.train:
        raise ConfigError("data.train: required (a preference data file or a built-in name)")


def setup(cfg: RunConfig, *, resume: bool = False) -> Run:
    """The :class:`Run` of ``cfg``: the model loaded from ``model.path`` onto the mesh, the data
    tokenized, the reference log-probs, the state (restored with ``resume``), the jitted step."""
    from jaxalign import models

    _check_sources(cfg)
    checked = _checks(cfg, resume)
    mesh = checked[0]
    model_path = resolve_model_path(cfg.model.path)
    model, tokenizer = models.load_pretrained(model_path, dtype=jnp.dtype(cfg.model.param_dtype), mesh=mesh)
    if tokenizer is None:
        raise ConfigError(f"model.path: {cfg.model.path} has no tokenizer files")
    _configure(model, cfg)
    p = Path(model_path)
    weights_key = ref_cache.weights_fingerprint(p) if p.exists() else model_path
    return _build(cfg, model, tokenizer, cfg.data.train, weights_key=weights_key, checked=checked,
                  resume=resume)


def setup_loaded(model, tokenizer, pairs, cfg: RunConfig) -> Run:
    """The :class:`Run` of ``cfg`` on ``model`` (a loaded ``jaxalign.models`` LM) and ``pairs`` (records,
    a path or a built-in name; replaces ``data.train``). The model's weights are copied onto the mesh
    (``model`` itself is not changed); ``model.path`` and ``model.param_dtype`` are not used; the
    reference log-probs are computed, never cached (the weights have no file to fingerprint)."""
    from flax import nnx

    checked = _checks(cfg, False)
    mesh = checked[0]
    graphdef, state = nnx.split(model)
    placed = jax.device_put(state, parallel.state_shardings(state, mesh), may_alias=False)
    copy = nnx.merge(graphdef, placed)
    _configure(copy, cfg)
    return _build(cfg, copy, tokenizer, pairs, weights_key=None, checked=checked, resume=False)


# --- the loop -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Tally:
    """What the loop carries between steps: the last good checkpoint, tokens since the last log line."""

    last_good: int | None
    t_last: float
    tokens_since: int = 0
    final_metrics: dict = dataclasses.field(default_factory=dict)


def _due(cfg: RunConfig, s: int, end_step: int, has_eval: bool) -> dict[str, bool]:
    """What happens after step ``s`` (the same on every process: probe and eval are collective)."""
    def every(interval):
        return interval is not None and (s % interval == 0 or s == end_step)
    iv = cfg.intervals
    return {"log": every(iv.log), "probe": every(iv.probe), "ledger": every(iv.ledger),
            "eval": has_eval and every(iv.eval), "entanglement": every(iv.entanglement),
            "checkpoint": every(iv.checkpoint) or s == end_step}


def _diverged(run: Run, s: int, metrics: dict, last_good: int | None) -> TrainingDiverged:
    run.ckpt.wait()
    where = (f"the last good checkpoint is step {last_good} in {run.ckpt.directory}" if last_good
             else "no checkpoint was written")
    return TrainingDiverged(f"step {s}: the loss is {metrics['loss']} and the gradient norm "
                            f"{metrics['grad_norm']}; stopped ({where})")


def _finish(run: Run, pending: tuple, tally: _Tally, todo: dict, bar) -> None:
    """Reads step ``s``'s metrics, logs, measures and checkpoints what ``todo`` asks."""
    s, metrics_dev, ntok, data_state = pending
    metrics_dev = dict(metrics_dev)
    pairs_dev, pair_ids = metrics_dev.pop("pairs", None), metrics_dev.pop("pair_ids", None)
    metrics = {k: float(to_host(v)) for k, v in metrics_dev.items()}
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        raise _diverged(run, s, metrics, tally.last_good)
    tally.tokens_since += ntok
    tally.final_metrics = metrics
    record = {"step": s, "epoch": data_state["epoch"] + data_state["step"] / run.order.batches_per_epoch}
    if todo["log"]:
        now = time.perf_counter()
        rate = tally.tokens_since / max(now - tally.t_last, 1e-9)
        tally.t_last, tally.tokens_since = now, 0
        record.update(metrics, tokens_per_s=rate)
        if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{rate:.0f}")
    if pairs_dev is not None:  # every step (the table, the stop rule); logged with the metrics
        pair_metrics = run.monitor.observe(s, pair_ids, {k: to_host(v) for k, v in pairs_dev.items()})
        if todo["log"]:
            record.update(pair_metrics)
    host = run.measure.at(s, run.state.params, todo)
    record.update(host)
    if len(record) > 2:
        run.log.write(record)
    if todo["checkpoint"]:
        run.ckpt.save(s, run.state, data_state, dict(run.meta, step=s), metrics=host or None)
        tally.last_good = s
        run.monitor.flush()
    if bar is not None:
        bar.update(1)


def _train_batch(run: Run, rows: np.ndarray) -> tuple[dict, int]:
    """The host batch of ``rows`` (with cached reference log-probs) and its token count."""
    train = run.sets["train"]
    b = host_batch(train.tokens, rows, train.lengths, run.measure.scorer.pad_id)
    if train.ref is not None:
        b["ref_chosen_logps"] = train.ref["ref_chosen_logps"][rows].astype(np.float32)
        b["ref_rejected_logps"] = train.ref["ref_rejected_logps"][rows].astype(np.float32)
    for k, v in (train.pair_arrays or {}).items():
        b[k] = v[rows]
    ntok = int(2 * b["prompt_mask"].sum() + b["chosen_mask"].sum() + b["rejected_mask"].sum())
    return device_keys(b), ntok


def _pair_ids(train: DataSet, rows: np.ndarray) -> np.ndarray:
    """The training-data index of each row of a batch (``provenance["index"]`` after the pair rules)."""
    index = (train.provenance or {}).get("index")
    return np.asarray(rows if index is None else np.asarray(index)[rows], np.int64)


def _stop_on_displacement(run: Run, s: int, pending, tally: _Tally, due, bar) -> None:
    """``train.stop_on_displacement``: finishes step ``s`` (the last dispatched), checkpoints it unless
    that was done, and raises :class:`~jaxalign.train.telemetry.DisplacementStop`."""
    if pending is not None:
        _finish(run, pending, tally, due(pending[0]), bar)
    if tally.last_good != s:
        run.ckpt.save(s, run.state, run.order.state(), dict(run.meta, step=s))
        tally.last_good = s
        run.monitor.flush()
    run.ckpt.wait()
    raise run.monitor.stop_error(s, run.ckpt.directory)


def run_loop(run: Run, *, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Trains ``run`` to its last step (or ``stop_after`` more steps); returns the summary of :func:`train`."""
    cfg = run.cfg
    iv = cfg.intervals
    if not run.resumed and (iv.probe or iv.ledger or run.pair_counts):
        m = run.measure.probe_and_ledger(0, run.state.params, bool(iv.probe), bool(iv.ledger)) if (
            iv.probe or iv.ledger) else {}
        run.log.write({"step": 0, **run.pair_counts, **m})
    bar = None
    if progress and run.primary:
        from tqdm import tqdm
        bar = tqdm(total=run.total_steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True)
    end_step = run.total_steps if stop_after is None else min(run.total_steps, run.start_step + stop_after)
    tally = _Tally(last_good=run.start_step if run.resumed else None, t_last=time.perf_counter())
    due = lambda s: _due(cfg, s, end_step, "eval" in run.sets)  # noqa: E731
    pending = None  # (step, metrics, tokens, data_state) of the last dispatched step
    try:
        for s in range(run.start_step + 1, end_step + 1):
            rows = run.order.next_rows()
            batch, ntok = _train_batch(run, rows)
            data_state = run.order.state()
            todo = due(s)
            needs_state = any(todo[k] for k in ("checkpoint", "probe", "ledger", "eval", "entanglement"))
            run.state, metrics = run.train_fn(run.state, to_device(batch, run.mesh), run.rest, run.ref_params)
            metrics = dict(metrics, pair_ids=_pair_ids(run.sets["train"], rows))
            if pending is not None:  # dispatch-ahead: step s-1's metrics are read while step s runs
                _finish(run, pending, tally, due(pending[0]), bar)
            pending = (s, metrics, ntok, data_state)
            if needs_state:  # the state of step s is read on the host now, before it is donated
                _finish(run, pending, tally, todo, bar)
                pending = None
            if run.monitor.should_stop():
                _stop_on_displacement(run, s, pending, tally, due, bar)
        if pending is not None:
            _finish(run, pending, tally, due(pending[0]), bar)
        run.ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        run.monitor.flush()
        run.log.close()
        run.ckpt.close()
    exported = None
    if cfg.checkpoint.export and end_step == run.total_steps:
        exported = export(run.parts, run.state.params, run.rest, run.tokenizer, run.out / "final", run.primary)
    return {"steps": end_step, "final_metrics": tally.final_metrics, "output_dir": str(run.out),
            "exported": None if exported is None else str(exported)}


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
    return run_loop(setup(cfg, resume=resume), progress=progress, stop_after=stop_after)


def train_loaded(model, tokenizer, pairs, cfg: RunConfig, *, progress: bool = False,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Trains a copy of a loaded model on ``pairs`` as :func:`train` would (no reload, and no recompile
    across calls whose model graphdef, objective, optimiser config, run length and padded shapes are
    equal: fix the shapes with ``data.prompt_length`` and ``data.response_length``).

    Args:
      model: a ``jaxalign.models`` causal LM (left unchanged: its weights are copied).
      tokenizer: its tokenizer.
      pairs: the training pairs: a list of records (standard or conversational), a path or a built-in
        name (``data.chat`` and ``data.append_eos`` apply); ``data.train`` is ignored.
      cfg: the run configuration (``model.path`` unused; ``output_dir`` receives the logs as in ``train``).
      progress, stop_after: as :func:`train`.

    Returns:
      :func:`train`'s summary plus ``params`` (the trained parameters, a pure dict) and ``model`` (a new
      model with them).
    """
    run = setup_loaded(model, tokenizer, pairs, cfg)
    summary = run_loop(run, progress=progress, stop_after=stop_after)
    params = run.state.params
    return dict(summary, params=params, model=run.parts.merge(params, run.rest))


def export(parts: step_lib.ModelParts, params, rest, tokenizer, path: Path, primary: bool):
    """Writes the model with ``params`` as a Hugging Face folder (process 0; params gathered)."""
    from jaxalign import models

    if jax.process_count() > 1:
        params = jax.tree.map(to_host, params)
    if not primary:
        return None
    host = jax.tree.map(lambda x: np.asarray(x), params)
    model = parts.merge(host, jax.tree.map(lambda x: np.asarray(to_host(x)), rest))
    if lora.has_adapters(model):  # the adapters as a PEFT folder, and merged into the HF folder
        _replace_folder(path.with_name(path.name + "_adapter"), lambda tmp: lora.save_peft(model, tmp))
        model = lora.merged(model)
    return _replace_folder(path, lambda tmp: models.save_pretrained(model, tokenizer, tmp))


def _replace_folder(path: Path, write) -> Path:
    """``write(tmp)`` then ``tmp`` renamed to ``path``: a reader sees no folder or the complete one."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
