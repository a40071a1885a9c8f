"""``python -m attnfast bench [...]`` and ``python -m attnfast demo [...]``."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m attnfast {bench,demo,config} [options]   (add -h after a command for its options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench.cli import main as bench_main

        return bench_main(rest) or 0
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest) or 0
    if command == "docs":
        return _docs(rest)
    if command == "config":
        from . import show_config

        show_config()
        return 0
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


def _docs(argv: list[str]) -> int:
    """``python -m attnfast docs [--open] [OUTDIR]``: build the Sphinx site of a source checkout."""
    import argparse
    import importlib.util
    import subprocess
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m attnfast docs",
                                     description="Build attnfast's documentation (HTML) with Sphinx.")
    parser.add_argument("outdir", nargs="?", help="where to write the HTML (default: docs/_build/html)")
    parser.add_argument("--open", action="store_true", help="open the built index.html in a web browser")
    args = parser.parse_args(argv)
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
