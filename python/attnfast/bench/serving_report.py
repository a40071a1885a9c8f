"""Text view of a ``bench --serving`` report: the shared header, one table per case, the goals.

The summary lists every goal of the serving issue: a speed ratio is the baseline's median over the
subject's (both timed in the same rounds), with the range of the per-round ratios; the int8 error goal
is attnfast's int8 error over a naive float32 implementation's, both against the float64 reference on
the dequantised cache. A row that could not be measured says why, and so does its goal.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .backward_report import _load_line
from .report import _fmt_time, _num, _table, format_header

__all__ = ["format_serving_report", "format_serving_case", "format_serving_goals"]


def _tag(res: Dict[str, Any], threads: Optional[int]) -> str:
    load = res.get("load_average_at_start")
    return "[float32" + (f", {threads} threads" if threads else "") + (f", load {load[0]:.1f}" if load else "") + "]"


def format_serving_case(res: Dict[str, Any], threads: Optional[int] = None) -> str:
    decode = any(r.get("bytes") for r in res["rows"])
    headers = (["variant", "what", "median", "min..max"] + (["GB/s", "% read BW"] if decode else ["GFLOP/s"])
               + ["max rel err"])
    rows, notes = [], []
    for r in res["rows"]:
        if not r.get("median_s"):
            notes.append(f"    {r['variant']} ({r['label']}): {r.get('skipped')}")
            continue
        cells = [r["variant"], r["label"], _fmt_time(r["median_s"]), f"{_fmt_time(r['min_s'])}..{_fmt_time(r['max_s'])}"]
        if decode:
            cells += [_num(r.get("gbps"), ".1f"), _num(r.get("pct_of_read_bandwidth"), ".0f", "%")]
        else:
            cells.append(_num(r.get("gflops"), ".1f"))
        rows.append(cells + [_num(r.get("max_rel_err"), ".1e")])
    parts = [f"{res['name']}  — {res['label']}  {_tag(res, threads)}",
             "  (max rel err = max|out - ref| / max|ref| against the float64 reference"
             + (" on the dequantised cache" if res["kind"] == "int8" else "")
             + ("; % read BW: of a read probe on a buffer of the row's bytes, same run" if decode else "")
             + ")"]
    if rows:
        parts.append(_table(headers, rows))
    if res.get("naive_float32_error") is not None:
        notes.append(f"    naive float32 (NumPy, unfused) on the dequantised cache: max rel err "
                     f"{res['naive_float32_error']:.1e}")
    return "\n".join(parts + notes)


def _goal_cells(res: Dict[str, Any], goal: Dict[str, Any]) -> List[str]:
    if goal["metric"] == "error_ratio":
        what = f"{goal['subject']} error / naive float32 error"
    else:
        what = f"{goal['subject']} vs {goal['baseline']}"
    measured = _num(goal["value"], ".2f", "×")
    if goal.get("min") is not None:
        measured += f" ({goal['min']:.2f}–{goal['max']:.2f})"
    met = {None: "NOT MEASURED", True: "yes", False: "no"}[goal["met"]]
    want = f"≥ {goal['bound']:g}×" if goal["metric"] == "speedup" else f"≤ {goal['bound']:g}×"
    return [res["name"], what, measured, want, met]


def format_serving_goals(report: Dict[str, Any]) -> str:
    headers = ["case", "comparison", "measured (per-round range)", "goal", "met"]
    rows = [_goal_cells(res, g) for res in report["results"] for g in res.get("goals") or []]
    m, cfg = report["machine"], report["config"]
    title = (f"Summary: the serving goals — {m.get('cpu')}, {cfg['threads']} threads, "
             f"ISA {(m.get('attnfast') or {}).get('isa', '-')}")
    lines = [title, "  (variants as named in the tables; speed: the baseline's median / the subject's, timed in the same rounds)",
             _table(headers, rows)]
    missing = report.get("not_measured") or []
    if missing:
        lines.append(f"NOT MEASURED: {len(missing)} attnfast row(s):")
        lines += [f"  {line}" for line in missing]
    return "\n".join(lines)


def format_serving_report(report: Dict[str, Any]) -> str:
    threads = report["config"]["threads"]
    blocks = [format_header(report) + "\n" + _load_line(report)]
    blocks += [format_serving_case(res, threads) for res in report["results"]]
    if report["results"]:
        blocks.append(format_serving_goals(report))
    blocks.append(f"done in {report['elapsed_s']:.1f} s")
    return "\n\n".join(blocks)
