"""Text view of a ``bench --backward`` report: the shared header, one table per case, memory, a summary.

The summary lists each case against the issue's goal: "× PyTorch" is PyTorch's median over attnfast's
(both timed in the same rounds), "% peak" is of the FMA peak measured in the same run.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .report import _fmt_time, _mib, _num, _table, format_header

__all__ = ["format_backward_report", "format_backward_case", "format_memory", "format_goals"]


def _flop_note(res: Dict[str, Any]) -> str:
    if not res.get("flops"):
        return "no nominal FLOP count for additive scores: times and ratios only"
    work = ("14·B·H·Lq·Lk·D: forward 4, backward 10" if res["kind"] == "fwdbwd"
            else "10·B·H·Lq·Lk·D")
    if res.get("causal"):
        work += "; causal: the visible pairs only, Lq·Lk → Lq (Lq + 1) / 2"
    return f"{res['flops'] / 1e9:.2f} GFLOP per call ({work}), % of FMA peak"


def format_backward_case(res: Dict[str, Any], threads: Optional[int] = None) -> str:
    headers = ["implementation", "median", "min..max", "GFLOP/s", "% peak", "× PyTorch", "max rel err"]
    rows, notes = [], []
    for r in res["rows"]:
        if r.get("skipped"):
            notes.append(f"    {r['label']}: {'n/a' if r.get('unsupported') else 'skipped'} ({r['skipped']})")
            continue
        spread = f"{_fmt_time(r.get('min_s'))}..{_fmt_time(r.get('max_s'))}"
        rows.append([r["label"], _fmt_time(r.get("median_s")), spread, _num(r.get("gflops"), ".1f"),
                     _num(r.get("pct_of_peak"), ".0f", "%"), _num(r.get("speedup_vs_torch"), ".2f", "×"),
                     _num(r.get("max_rel_err"), ".1e")])
        if r.get("note"):
            notes.append(f"    {r['label']}: {r['note']}")
    load = res.get("load_average_at_start")
    tag = (f"[{res['dtype']}" + (f", {threads} threads" if threads else "")
           + (f", load {load[0]:.1f}" if load else "") + "]")
    parts = [f"{res['name']}  — {res['label']}  {tag}" if res.get("label") else f"{res['name']}  {tag}",
             f"  ({_flop_note(res)}; max rel err = max over the gradients of max|g - g_ref| / max|g_ref|,"
             f" float64 reference)"]
    if rows:
        parts.append(_table(headers, rows))
    parts += notes
    if res.get("reference_note"):
        parts.append(f"    {res['reference_note']}")
    return "\n".join(parts)


def format_memory(mem: Dict[str, Any], threads: Optional[int] = None) -> str:
    grads = mem["gradient_bytes"]
    headers = ["implementation", "peak RSS growth MiB", "beyond gradients MiB", f"≤ grads + "
               f"{mem['slack_bytes'] / 2**20:.0f} MiB", "call"]
    rows, notes = [], []
    for r in mem["rows"]:
        if r.get("peak_rss_delta_bytes") is None:
            notes.append(f"    {r['label']}: not measured ({r.get('note')})")
            continue
        rows.append([r["label"], _mib(r["peak_rss_delta_bytes"]), _mib(r["beyond_gradients_bytes"]),
                     "yes" if r["within_limit"] else "NO", _fmt_time(r.get("seconds"))])
        if r.get("note"):
            notes.append(f"    {r['label']}: {r['note']}")
    parts = [f"peak memory: {mem['name']}  [{threads} threads, one call in a fresh process each]",
             f"  (gradients {grads / 2**20:.1f} MiB; limit {mem['limit_bytes'] / 2**20:.1f} MiB = gradients"
             f" + {mem['slack_bytes'] / 2**20:.0f} MiB; the growth includes out and lse)"]
    if rows:
        parts.append(_table(headers, rows))
    return "\n".join(parts + notes)


def _goal_text(goal: Optional[Dict[str, Any]]) -> List[str]:
    if not goal:
        return ["-", "-", "-"]
    metric, least, value = goal["metric"], goal["least"], goal["value"]
    if metric == "pct_of_peak":
        want, got = f"≥ {least:.0f}% peak", _num(value, ".0f", "% peak")
    else:
        want, got = f"≥ {least:g}× PyTorch", _num(value, ".2f", "×")
    met = "-" if goal["met"] is None else ("yes" if goal["met"] else "no")
    return [want, got, met]


def format_goals(report: Dict[str, Any]) -> str:
    """One line per case: attnfast, PyTorch, the ratio and the issue's goal."""
    headers = ["case", "attnfast", "PyTorch", "× PyTorch", "% peak", "goal", "measured", "met"]
    rows = []
    for res in report["results"]:
        by = {r["impl"]: r for r in res["rows"] if r.get("median_s")}
        own, torch = by.get("attnfast", {}), by.get("torch", {})
        case = f"{res['name']} ({res['label']})" if res.get("label") else res["name"]
        rows.append([case, _fmt_time(own.get("median_s")), _fmt_time(torch.get("median_s")),
                     _num(own.get("speedup_vs_torch"), ".2f", "×"), _num(own.get("pct_of_peak"), ".0f", "%"),
                     *_goal_text(res.get("goal"))])
    mem = report.get("memory")
    if mem:
        no_row: Dict[str, Any] = {}
        own = next((r for r in mem["rows"] if r["impl"] == "attnfast"), no_row)
        torch = next((r for r in mem["rows"] if r["impl"] == "torch"), no_row)
        within = own.get("within_limit")
        rows.append([f"peak RSS growth, {mem['name']}", f"{_mib(own.get('peak_rss_delta_bytes'))} MiB",
                     f"{_mib(torch.get('peak_rss_delta_bytes'))} MiB", "-", "-",
                     f"≤ {mem['limit_bytes'] / 2**20:.0f} MiB", f"{_mib(own.get('peak_rss_delta_bytes'))} MiB",
                     "-" if within is None else ("yes" if within else "no")])
    m, cfg = report["machine"], report["config"]
    title = (f"Summary: attnfast backward vs PyTorch autograd — {m.get('cpu')}, {cfg['threads']} threads, "
             f"ISA {(m.get('attnfast') or {}).get('isa', '-')}")
    return "\n".join([title, "  (median times; × PyTorch = PyTorch's median / attnfast's)", _table(headers, rows)])


def _load_line(report: Dict[str, Any]) -> str:
    m = report["machine"]
    start, end = m.get("load_average"), m.get("load_average_end")

    def fmt(la: Optional[Sequence[float]]) -> str:
        return "-" if not la else " ".join(f"{x:.2f}" for x in la)

    return f"  load avg   {fmt(start)} at the start, {fmt(end)} at the end (1, 5, 15 min)"


def format_backward_report(report: Dict[str, Any]) -> str:
    threads = report["config"]["threads"]
    blocks = [format_header(report) + "\n" + _load_line(report)]
    blocks += [format_backward_case(res, threads) for res in report["results"]]
    if report.get("memory"):
        blocks.append(format_memory(report["memory"], threads))
    if report["results"] or report.get("memory"):
        blocks.append(format_goals(report))
    blocks.append(f"done in {report['elapsed_s']:.1f} s")
    return "\n\n".join(blocks)
