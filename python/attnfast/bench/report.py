"""Text view of a benchmark report: machine facts, one table per case, and (16-bit runs) a summary.

Every table names the dtype.  In a 16-bit run the ratio columns "× NumPy" and "× best peer" compare
rows of that dtype only; "× af f32" is each row's speed relative to attnfast in float32 on the same
shape, timed in the same rounds (the "attnfast float32 (baseline)" row).
"""

from __future__ import annotations

from typing import List, Optional

from .peers import BASELINE_NAME

__all__ = ["format_report", "format_header", "format_case", "format_summary"]

_HALF = ("bfloat16", "float16")


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
        f"{'  (--quick)' if cfg.get('quick') else ''}"
        + (f"  (computed in float32; '× af f32' = speed vs attnfast float32, same shape, same run)"
           if cfg["dtype"] in _HALF else ""),
        "  versions   " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"  FMA peak   {_num(peak and peak / 1e9, '.0f')} GFLOP/s used for '% peak'"
        f"  [measured {_num(measured.get('flops_per_s') and measured['flops_per_s'] / 1e9, '.0f')}"
        f" by {measured.get('source', '?')}; spec {_num(theory.get('flops_per_s') and theory['flops_per_s'] / 1e9, '.0f')}"
        f" = {theory.get('cores')} cores × {theory.get('flops_per_cycle_per_core')} FLOP/cycle"
        f" × {_num(theory.get('mhz'), '.0f')} MHz]"
        + (f"  ({probes['fma_dtype']} FMA)" if probes.get("fma_dtype") else ""),
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


def _skip_note(r: dict, dtype: str) -> str:
    if r.get("unsupported"):
        return f"    {r['label']}: n/a in {dtype} ({r['skipped']})"
    return f"    {r['label']}: skipped ({r['skipped']})"


def format_case(res: dict, config: Optional[dict] = None) -> str:
    config = config or {}
    dtype = res.get("dtype") or config.get("dtype", "?")
    memory_bound = res["bound"] == "memory"
    limit_name = "% BW" if memory_bound else "% peak"
    with_baseline = any(r.get("speedup_vs_attnfast_float32") for r in res["rows"])
    headers = (["implementation", "median", "GFLOP/s"] + (["GB/s"] if memory_bound else [])
               + [limit_name, "× NumPy", "× best peer"] + (["× af f32"] if with_baseline else [])
               + ["max |err|", "peak MiB"])
    rows = []
    notes = []
    for r in res["rows"]:
        if r.get("skipped"):
            notes.append(_skip_note(r, dtype))
            continue
        cells = [r["label"], _fmt_time(r.get("median_s")), _num(r.get("gflops"), ".1f")]
        if memory_bound:
            cells.append(_num(r.get("gbps"), ".1f"))
        cells += [_num(r.get("pct_of_limit"), ".0f", "%"), _num(r.get("speedup_vs_numpy"), ".2f", "×"),
                  _num(r.get("speedup_vs_best_peer"), ".2f", "×")]
        if with_baseline:
            cells.append(_num(r.get("speedup_vs_attnfast_float32"), ".2f", "×"))
        cells += [_num(r.get("max_abs_err"), ".1e"), _mib(r.get("peak_extra_bytes"))]
        rows.append(cells)
        if r.get("note"):
            notes.append(f"    {r['label']}: {r['note']}")
    threads = config.get("threads")
    tag = f"[{dtype}" + (f", q {res['q_dtype']}" if res.get("q_dtype") else "") + (
        f", {threads} threads]" if threads else "]")
    title = f"{res['name']}" + (f"  — {res['label']}" if res.get("label") else "") + f"  {tag}"
    bound = (f"memory-bound: {res['bytes'] / 1e6:.1f} MB moved, % of the read bandwidth of that size"
             if memory_bound else f"compute-bound: {res['flops'] / 1e9:.2f} GFLOP per call, % of FMA peak")
    parts = [title, f"  ({bound}; peak MiB = peak RSS growth beyond the output)"]
    if rows:
        parts.append(_table(headers, rows))
    parts += notes
    if res.get("reference_note"):
        parts.append(f"    {res['reference_note']}")
    return "\n".join(parts)


def _rows_by_impl(res: dict) -> dict:
    return {r["impl"]: r for r in res["rows"] if r.get("median_s")}


def _shape_text(res: dict) -> str:
    if res.get("kind") == "stage":
        return res["name"]
    text = ",".join(str(res[k]) for k in ("B", "H", "Lq", "Lk", "D"))
    if res.get("q_dtype"):
        text += f" q {res['q_dtype']}"
    if res.get("label") not in (None, "", "--shape") and res.get("group") != "sweep":
        text += f" ({res['label']})"
    return text


def format_summary(report: dict) -> str:
    """One line per case: attnfast in the run's dtype against its own float32 and the peers."""
    cfg, m = report["config"], report["machine"]
    dtype = cfg["dtype"]
    headers = ["case (B,H,Lq,Lk,D)", f"attnfast {dtype}", "attnfast f32", "× own f32",
               f"PyTorch {dtype}", "× PyTorch", f"best peer {dtype}", "× best peer"]
    rows = []
    for res in report["results"]:
        by = _rows_by_impl(res)
        own = by.get("attnfast")
        best = by.get(res.get("best_peer") or "")

        def time_of(name):
            return _fmt_time(by[name]["median_s"]) if name in by else "n/a"

        def faster(name):
            """How many times faster attnfast is than ``name`` (its median over attnfast's)."""
            if own is None or name not in by:
                return "-"
            return _num(by[name]["median_s"] / own["median_s"], ".2f", "×")

        best_name = best["impl"] if best else ""
        rows.append([_shape_text(res), time_of("attnfast"), time_of(BASELINE_NAME),
                     faster(BASELINE_NAME), time_of("torch"), faster("torch"),
                     f"{time_of(best_name)} {best['label']}" if best else "-", faster(best_name)])
    simd = " ".join(m.get("cpu_simd") or []) or "?"
    isa = (m.get("attnfast") or {}).get("isa", "-")
    title = (f"Summary: attnfast {dtype} vs its own float32 and the peers in {dtype}"
             f" — {m.get('cpu')}, {cfg['threads']} threads, SIMD {simd}, ISA {isa}")
    return "\n".join([title, "  (× = how many times faster attnfast is; median times)",
                      _table(headers, rows)])


def format_report(report: dict) -> str:
    blocks = [format_header(report)]
    blocks += [format_case(res, report["config"]) for res in report["results"]]
    if report["config"]["dtype"] in _HALF and report["results"] and "attnfast" in report["implementations"]:
        blocks.append(format_summary(report))
    blocks.append(f"done in {report['elapsed_s']:.1f} s")
    return "\n\n".join(blocks)
