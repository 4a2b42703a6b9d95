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


# --- main -------------------------------------------------------------------------------------------

_REGISTER = [_register_losses]


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
