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
    "docs": Command('build the documentation site (needs "attnfast[docs]")', "attnfast.__main__:docs_main"),
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


def docs_main(argv: Sequence[str]) -> int:
    """``python -m attnfast docs [--open] [OUTDIR]``: build the Sphinx site of a source checkout."""
    import importlib.util
    import subprocess
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m attnfast docs",
                                     description="Build attnfast's documentation (HTML) with Sphinx.")
    parser.add_argument("outdir", nargs="?", help="where to write the HTML (default: docs/_build/html)")
    parser.add_argument("--open", action="store_true", help="open the built index.html in a web browser")
    args = parser.parse_args(list(argv))
    missing = [m for m in ("sphinx", "numpydoc", "furo", "myst_parser", "matplotlib")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"python -m attnfast docs needs {', '.join(missing)}: pip install \"attnfast[docs]\"", file=sys.stderr)
        return 1
    # The sources are not part of the installed package: look in the working directory, then next to
    # this package in a source checkout (python/attnfast/ -> docs/).
    candidates = [Path.cwd() / "docs", Path(__file__).resolve().parents[2] / "docs"]
    source = next((d for d in candidates if (d / "conf.py").is_file()), None)
    if source is None:
        print("python -m attnfast docs builds the docs/ directory of an attnfast source checkout; none found "
              f"(looked in {', '.join(str(d) for d in candidates)}). Run it from the checkout's root.", file=sys.stderr)
        return 1
    outdir = Path(args.outdir) if args.outdir else source / "_build" / "html"
    status = subprocess.call([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", str(source),
                              str(outdir)])
    if status == 0:
        index = (outdir / "index.html").resolve()
        print(f"documentation: {index}")
        if args.open:
            import webbrowser

            webbrowser.open(index.as_uri())
    return status


if __name__ == "__main__":
    sys.exit(main())
