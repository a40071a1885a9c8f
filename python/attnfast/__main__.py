"""``python -m attnfast COMMAND [...]``: the command-line entry point.

Each command is one line of :data:`COMMANDS`: its name, the one-line summary ``--help`` prints, and
the ``module:function`` that runs it.  The function takes the arguments after the command name and
returns the exit status; its module is imported only when the command runs, so ``--help`` stays fast
and a command's optional dependencies are needed only by that command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class Command(NamedTuple):
    summary: str  #: shown by ``python -m attnfast --help``; at most 60 characters keeps it one line
    target: str  #: ``"module:function"``; the function takes argv (after the command) and returns a status


#: The commands, in the order ``--help`` lists them.  Adding one is adding a line here.
COMMANDS: Dict[str, Command] = {
    "bench": Command("time attnfast against NumPy and the installed peers", "attnfast.bench.cli:main"),
    "demo": Command("walk through scores, softmax and aggregate on a tiny example", "attnfast.demo:main"),
    "config": Command("print the version, the SIMD targets and the thread count",
                      "attnfast.__main__:config_main"),
}


def config_main(argv: Sequence[str]) -> int:
    """``python -m attnfast config``: :func:`attnfast.show_config`."""
    argparse.ArgumentParser(prog="python -m attnfast config", description=COMMANDS["config"].summary
                            ).parse_args(list(argv))
    from . import show_config

    show_config()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one sub-command per :data:`COMMANDS` entry, its options left to it."""
    parser = argparse.ArgumentParser(
        prog="python -m attnfast",
        description="attnfast: fused, SIMD attention for NumPy arrays.",
        epilog="Add -h after a command for its options, e.g. python -m attnfast bench -h")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        # add_help=False: "-h" after the command belongs to the command's own parser.
        sub.add_parser(name, help=cmd.summary, add_help=False)
    return parser


def _run(name: str, argv: List[str]) -> int:
    module_name, _, function = COMMANDS[name].target.partition(":")
    entry = getattr(importlib.import_module(module_name), function)
    return int(entry(argv) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``python -m attnfast`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Without a command the help goes to stderr with status 2, argparse's convention for a missing
    required argument (``--help`` prints it to stdout with status 0).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] in COMMANDS:
        # Dispatched by hand, not by parse_args: the command's own parser sees its arguments untouched.
        return _run(argv[0], argv[1:])
    parser.parse_args(argv)  # --help exits 0; an unknown command exits 2 naming the valid ones
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
