"""The `ldmkit` command: parses arguments, calls the library, maps errors to one line and exit 2.

This module only assembles the parser from the command-group modules beside it and runs the chosen
command; each group module imports its heavy dependencies inside its command functions, so that
`ldmkit --help` stays quick."""

import argparse
import logging
import sys

from ldmkit.cli import bench, data, evaluate, generate, models, serve, train
from ldmkit.cli.common import _log_to_stderr
from ldmkit.errors import LdmkitError

__all__ = ["build_parser", "main"]

# One entry per sub-parser adder, in the order `ldmkit --help` lists the commands; a group's
# commands need not be neighbours there.
_ADDERS = (
    models.add_inspect,
    models.add_convert,
    generate.add_parsers,
    evaluate.add_eval,
    serve.add_parsers,
    bench.add_parsers,
    data.add_emoji_data,
    evaluate.add_eval_emoji,
    data.add_shapes,
    train.add_parsers,
    models.add_init_model,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmkit", description="Latent diffusion models, written to be read.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except LdmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
