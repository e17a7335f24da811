"""The ``gnn-transformer`` command line.

Subcommands: ``compare`` (the main experiment), ``verify``, ``show``, ``train``, ``bench``,
``analyze``, ``view`` and ``perplexity``, one module each in this package (``add_parser(sub)`` and ``run(args)``).
``gnn-transformer <command> --help`` lists the options of each; ``python -m gnn_transformer`` runs
the same command line.

Exit codes: 0 success; 1 a check failed (``verify`` found a mismatch) or the run failed;
2 bad usage (unknown option, bad value, unknown topology, missing CUDA or optional dependency).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import analyze, bench, compare, perplexity, show, train, verify, view
from ._common import EXIT_FAIL, EXIT_USAGE, UsageError, error, name_option

COMMANDS = (compare, verify, show, train, bench, analyze, view, perplexity)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="gnn-transformer",
        description="Transformers are graph neural networks: attention as message passing on "
        "explicit token graphs, checked against dense attention.",
        epilog="Start with 'gnn-transformer compare'. Each command has --help.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


# the options of the commands that size their work, in the order an out-of-memory error names them
SIZE_OPTIONS = ("batch_size", "lengths", "n", "sizes", "samples", "eval_size", "d_model", "layers", "heads", "context")


def _refuse_empty(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an empty string given to any option or argument of the command: a path, spec or
    text of ``''`` was otherwise taken as not given (its default used) or as the current folder."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[args.command]._actions:
        value = getattr(args, action.dest, None)
        if value == "" or (isinstance(value, list) and "" in value):
            name = "/".join(action.option_strings) or (action.metavar or action.dest).upper()
            raise UsageError(f"{name}: expected a non-empty value (got '')")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        _refuse_empty(parser, args)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe (gnn-transformer show ... | head) shows here
        return code
    except BrokenPipeError:
        # the reader is gone: send what Python flushes at exit to devnull, exit 1 like Python
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except UsageError as e:
        error(str(e))
        return EXIT_USAGE
    except ValueError as e:  # the library's boundary checks name the argument and the value
        error(name_option(str(e), args))
        return EXIT_USAGE
    except ImportError as e:
        error(str(e))
        return EXIT_USAGE
    except FloatingPointError as e:
        error(str(e))
        return EXIT_FAIL
    except (MemoryError, RuntimeError) as e:  # sizes the machine cannot hold (torch.OutOfMemoryError
        # and the CPU allocator's RuntimeError): the request is too large, not a failed run
        text = str(e)
        if isinstance(e, RuntimeError) and not ("out of memory" in text or "can't allocate memory" in text):
            raise
        sizes = [f"--{name.replace('_', '-')}" for name in SIZE_OPTIONS if name in vars(args)]
        error(
            f"out of memory ({text.splitlines()[0][:200] if text else type(e).__name__}): ask for less"
            + (f" ({', '.join(sizes)}, ...)" if sizes else "")
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        error("interrupted")
        return 130
