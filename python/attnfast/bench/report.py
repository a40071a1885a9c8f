"""Text view of a benchmark report: machine facts, then one table per case."""

from __future__ import annotations

from typing import List, Optional

__all__ = ["format_report", "format_header", "format_case"]


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _num(x: Optional[float], fmt: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_header(report: dict) -> str:
    m = report["machine"]
    cfg = report["config"]
    probes = report["probes"]
    caps = m.get("attnfast") or {}
    v = m.get("versions") or {}
    peak = probes.get("fma_peak_flops_per_s")
    measured = probes.get("fma_measured") or {}
    theory = probes.get("fma_theoretical") or {}
    lines = [
        "attnfast benchmark",
        f"  CPU        {m.get('cpu')}  ({m.get('cores')} usable cores, {m.get('mhz') or '?'} MHz,"
        f" SIMD: {' '.join(m.get('cpu_simd') or []) or '?'})",
        f"  attnfast   {caps.get('version', v.get('attnfast')) or '-'}  ISA in use: {caps.get('isa', '-')}"
        f"  usable: {', '.join(caps.get('isas') or []) or '-'}"
        + (f"  ({caps['error']})" if "error" in caps else ""),
        f"  threads    {cfg['threads']} (pinned: "
        + ", ".join(f"{k}={'-' if n is None else n}" for k, n in (m.get("threads_per_impl") or {}).items())
        + ")",
        f"  dtype      {cfg['dtype']}{'  causal' if cfg.get('causal') else ''}"
        f"{'  (--quick)' if cfg.get('quick') else ''}",
        "  versions   " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"  FMA peak   {_num(peak and peak / 1e9, '.0f')} GFLOP/s used for '% peak'"
        f"  [measured {_num(measured.get('flops_per_s') and measured['flops_per_s'] / 1e9, '.0f')}"
        f" by {measured.get('source', '?')}; spec {_num(theory.get('flops_per_s') and theory['flops_per_s'] / 1e9, '.0f')}"
        f" = {theory.get('cores')} cores × {theory.get('flops_per_cycle_per_core')} FLOP/cycle"
        f" × {_num(theory.get('mhz'), '.0f')} MHz]",
    ]
    if probes.get("fma_note"):
        lines.append(f"  WARNING    {probes['fma_note']}")
    for bw in probes.get("read_bandwidth") or []:
        lines.append(f"  read BW    {bw['bytes_per_s'] / 1e9:.1f} GB/s on {bw['nbytes'] / 1e6:.1f} MB"
                     f" ({bw['source']})")
    missing = report.get("missing") or {}
    for name, d in missing.items():
        lines.append(f"  not found  {d['label']}: {d.get('error')}  -> {d.get('install')}")
    if report.get("memory_note"):
        lines.append(f"  memory     {report['memory_note']}")
    return "\n".join(lines)


def format_case(res: dict) -> str:
    memory_bound = res["bound"] == "memory"
    limit_name = "% BW" if memory_bound else "% peak"
    headers = ["implementation", "median", "GFLOP/s"] + (["GB/s"] if memory_bound else []) + [
        limit_name, "× NumPy", "× best peer", "max |err|", "peak MiB"]
    rows = []
    notes = []
    for r in res["rows"]:
        if r.get("skipped"):
            notes.append(f"    {r['label']}: skipped ({r['skipped']})")
            continue
        cells = [r["label"], _fmt_time(r.get("median_s")), _num(r.get("gflops"), ".1f")]
        if memory_bound:
            cells.append(_num(r.get("gbps"), ".1f"))
        cells += [_num(r.get("pct_of_limit"), ".0f", "%"), _num(r.get("speedup_vs_numpy"), ".2f", "×"),
                  _num(r.get("speedup_vs_best_peer"), ".2f", "×"), _num(r.get("max_abs_err"), ".1e"),
                  _mib(r.get("peak_extra_bytes"))]
        rows.append(cells)
    title = f"{res['name']}" + (f"  — {res['label']}" if res.get("label") else "")
    bound = (f"memory-bound: {res['bytes'] / 1e6:.1f} MB moved, % of the read bandwidth of that size"
             if memory_bound else f"compute-bound: {res['flops'] / 1e9:.2f} GFLOP per call, % of FMA peak")
    parts = [title, f"  ({bound}; peak MiB = peak RSS growth beyond the output)"]
    if rows:
        parts.append(_table(headers, rows))
    parts += notes
    if res.get("reference_note"):
        parts.append(f"    {res['reference_note']}")
    return "\n".join(parts)


def format_report(report: dict) -> str:
    blocks = [format_header(report)]
    blocks += [format_case(res) for res in report["results"]]
    blocks.append(f"done in {report['elapsed_s']:.1f} s")
    return "\n\n".join(blocks)
