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
    if command == "config":
        from . import show_config

        show_config()
        return 0
    print(f"unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
