"""``python -m attnfast bench``: attnfast against NumPy and the installed peers, on this machine.

Examples::

    python -m attnfast bench --quick                      # about a minute
    python -m attnfast bench --json run.json --plot run.png
    python -m attnfast bench --shape 1,8,4096,4096,64 --threads 1 --causal
    python -m attnfast bench --dtype bfloat16             # every library in bfloat16, + attnfast float32
    python -m attnfast bench --backward --json bwd.json   # gradients: attnfast vs PyTorch autograd
    python -m attnfast bench --serving --json srv.json    # varlen, paged and int8 caches, modifiers
    python -m attnfast bench --compare old.json new.json  # new's medians / old's, case by case
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from .cases import DTYPES, AttentionCase, default_cases, parse_shape, stage_cases

__all__ = ["build_parser", "main"]


def _shape(text: str) -> AttentionCase:
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attnfast bench",
        description="Benchmark attnfast's fused attention and its three stages against NumPy and the "
                    "installed peers (PyTorch SDPA, ONNX Runtime MultiHeadAttention, JAX), interleaved "
                    "in one process with the same thread count.",
        epilog="Peers are optional: missing ones are listed with the command that installs them.")
    p.add_argument("--quick", action="store_true",
                   help="fewer sweep points and repeats (about a minute on 2 cores)")
    p.add_argument("--shape", action="append", type=_shape, metavar="B,H,Lq,Lk,D", default=None,
                   help="attention shape to run (repeatable); replaces the default suite")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage dtype of every input (default float32). bfloat16 (ml_dtypes) and float16 "
                        "runs hand every library 16-bit arrays, add the decode shapes with a float32 q "
                        "over 16-bit K/V, and time attnfast in float32 on the same shapes as a baseline")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads for every library (default: all usable cores)")
    p.add_argument("--causal", action="store_true", help="causal (top-left aligned) attention")
    p.add_argument("--json", metavar="FILE", help="write every figure and the machine facts as JSON")
    p.add_argument("--plot", metavar="FILE",
                   help="write a PNG: GFLOP/s and peak memory against sequence length (needs matplotlib)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="instead of running: B's median / A's median for every case and implementation in both "
                        "--json files (matched by case, dtype, causal and implementation); cases in one file "
                        "only are listed")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory column (saves a child process)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--impl", action="append", metavar="NAME", default=None,
                   help="only these implementations (attnfast, numpy, torch, onnxruntime, jax); repeatable")
    p.add_argument("--backward", action="store_true",
                   help="the backward suite instead: forward+backward and the backward alone against PyTorch "
                        "autograd (float32, bfloat16 rows, additive scores) and the peak memory of a "
                        "forward+backward at L=32768. With --shape: forward+backward and backward-alone rows "
                        "of those shapes in --dtype (and --causal)")
    p.add_argument("--serving", action="store_true",
                   help="the serving suite instead: packed variable-length batches against padding (attnfast "
                        "and PyTorch SDPA), paged and int8 KV-cache decode against the contiguous float32 "
                        "cache, softcap / ALiBi / sinks against the plain call; float32, side by side. Exit "
                        "status 1 when an attnfast row could not be measured")
    return p


def _cases(args: argparse.Namespace) -> List[Any]:
    if args.shape:
        return list(args.shape)
    return default_cases(args.quick, args.dtype) + stage_cases()


#: OpenBLAS worker threads busy-wait ~2^28 cycles (~0.1 s) after each BLAS call.  Interleaved with NumPy,
#: that spinning took a core from whichever library ran next (measured: PyTorch SDPA 2x slower).  2^4
#: cycles makes them sleep at once.  OpenBLAS reads it only when it loads, so the command re-executes
#: itself with it set (NumPy is loaded by then: ``python -m attnfast`` imports attnfast first).
_BLAS_QUIET_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}


def _reexec_with_quiet_blas() -> None:
    """Restart ``python -m attnfast bench ...`` once with :data:`_BLAS_QUIET_ENV` set."""
    if all(os.environ.get(k) is not None for k in _BLAS_QUIET_ENV):
        return
    script = os.path.normpath(sys.argv[0]) if sys.argv else ""
    if script.endswith(os.path.join("attnfast", "__main__.py")) and sys.argv[1:2] == ["bench"]:
        module = "attnfast"
    elif script.endswith(os.path.join("attnfast", "bench", "cli.py")):
        module = "attnfast.bench.cli"
    else:
        return  # called as a function (tests, notebooks): leave the process alone
    env = dict(os.environ, **_BLAS_QUIET_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (without the leading ``bench``), run, print the tables; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        return _main_compare(parser, args)
    _reexec_with_quiet_blas()
    if args.plot and not (args.serving or args.backward):  # those two reject --plot below
        from .plot import have_matplotlib
        if not have_matplotlib():
            parser.error("--plot needs matplotlib: pip install matplotlib")
    if args.dtype == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            parser.error("--dtype bfloat16 needs ml_dtypes: pip install ml_dtypes")

    if args.serving:
        for given, option in ((args.backward, "--backward"), (args.plot, "--plot"), (args.shape, "--shape"),
                              (args.causal, "--causal"), (args.dtype != "float32", "--dtype")):
            if given:
                parser.error(f"{option} is not available with --serving (its cases are the issue's rows)")
        return _main_serving(args)
    if args.backward:
        if args.plot:
            parser.error("--plot is not available with --backward")
        if args.dtype not in ("float32", "bfloat16"):
            parser.error(f"--backward runs float32 and bfloat16; got --dtype {args.dtype}")
        return _main_backward(args)

    # Heavy imports (NumPy work, peers) only after the arguments are known to be good.
    from .machine import usable_cores
    from .report import format_report
    from .runner import BenchConfig, run_benchmark

    cfg = BenchConfig(cases=_cases(args), dtype=args.dtype, threads=args.threads or usable_cores(),
                      causal=args.causal, quick=args.quick, measure_memory=args.memory,
                      progress=args.progress, only=args.impl)
    report = run_benchmark(cfg)
    print(format_report(report))
    _write_json(report, args.json)
    if args.plot:
        from .plot import plot_report
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _main_backward(args: argparse.Namespace) -> int:
    from .backward import MEMORY_CASE, default_backward_cases, shape_backward_cases
    from .backward_report import format_backward_report
    from .backward_run import BackwardConfig, run_backward_benchmark
    from .machine import usable_cores

    if args.shape:
        cases = shape_backward_cases(args.shape, args.dtype, args.causal)
        memory_case = None  # the memory row is the shape, part of the default suite only
    else:
        cases = default_backward_cases()
        memory_case = MEMORY_CASE if args.memory else None
    cfg = BackwardConfig(cases=cases, threads=args.threads or usable_cores(), quick=args.quick,
                         memory_case=memory_case, progress=args.progress, only=args.impl)
    report = run_backward_benchmark(cfg)
    print(format_backward_report(report))
    _write_json(report, args.json)
    return 0


def _main_serving(args: argparse.Namespace) -> int:
    from . import serving
    from .machine import usable_cores
    from .serving_report import format_serving_report
    from .serving_run import ServingConfig, run_serving_benchmark

    cfg = ServingConfig(cases=serving.default_serving_cases(), threads=args.threads or usable_cores(),
                        quick=args.quick, progress=args.progress, only=args.impl)
    report = run_serving_benchmark(cfg)
    print(format_serving_report(report))
    _write_json(report, args.json)
    return 1 if report["not_measured"] else 0


def _main_compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .compare import compare_reports, format_comparison, load_report

    for given, option in ((args.json, "--json"), (args.plot, "--plot"), (args.shape, "--shape"),
                          (args.backward, "--backward"), (args.serving, "--serving")):
        if given:
            parser.error(f"{option} is not available with --compare (it compares two saved runs)")
    path_a, path_b = args.compare
    try:
        cmp = compare_reports(load_report(path_a), load_report(path_b), path_a, path_b)
    except ValueError as exc:
        parser.error(str(exc))
    print(format_comparison(cmp, path_a, path_b))
    return 0


def _write_json(report: Dict[str, Any], path: Optional[str]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
