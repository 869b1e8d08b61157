"""The `ldmkit` command: parses arguments, calls the library, maps errors to one line and exit 2.

This module only assembles the parser from the command-group modules beside it and runs the chosen
command; each group module imports its heavy dependencies inside its command functions, so that
`ldmkit --help` stays quick."""

import argparse
import logging
import os
import sys

from ldmkit import __version__
from ldmkit.cli import bench, data, evaluate, generate, listing, models, serve, train, video
from ldmkit.cli.common import _log_to_stderr
from ldmkit.errors import LdmkitError

__all__ = ["build_parser", "main"]

# One entry per sub-parser adder, in the order `ldmkit --help` lists the commands; a group's
# commands need not be neighbours there.
_ADDERS = (
    listing.add_models,
    models.add_inspect,
    models.add_convert,
    generate.add_parsers,
    video.add_parsers,
    evaluate.add_eval,
    serve.add_parsers,
    bench.add_parsers,
    data.add_emoji_data,
    evaluate.add_eval_emoji,
    video.add_eval_video,
    data.add_shapes,
    train.add_parsers,
    models.add_init_model,
)


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line naming it and where help is, as every other error (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ldmkit", description="Latent diffusion models, written to be read.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--version", action="version", version=f"ldmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(logging.INFO if args.verbose else logging.WARNING)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone early shows here, not as a traceback at exit
        return code
    except LdmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except BrokenPipeError:
        # The reader stopped early (`ldmkit models --json | head`): nothing is wrong with the command.
        # Python's own recipe: point stdout at /dev/null so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
