"""Text view of a benchmark report: machine facts, one table per case, and (16-bit runs) a summary.

Every table names the dtype.  In a 16-bit run the ratio columns "× NumPy" and "× best peer" compare
rows of that dtype only; "× af f32" is each row's speed relative to attnfast in float32 on the same
shape, timed in the same rounds (the "attnfast float32 (baseline)" row).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .peers import BASELINE_NAME

__all__ = ["format_report", "format_header", "format_legend", "format_case", "format_summary"]

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


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _spread(r: Dict[str, Any]) -> str:
    """Fastest and slowest repeat relative to the median: "-2/+7%"."""
    t, lo, hi = r.get("median_s"), r.get("min_s"), r.get("max_s")
    if not t or lo is None or hi is None:
        return "-"
    return f"-{100 * (t - lo) / t:.0f}/+{100 * (hi - t) / t:.0f}%"


def _table(headers: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells: List[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_header(report: Dict[str, Any]) -> str:
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
    elif probes.get("fma_implied_mhz") and peak == measured.get("flops_per_s"):
        lines.append(f"             measured above spec: the cores ran at ~{probes['fma_implied_mhz']:.0f} MHz, not the"
                     f" {_num(theory.get('mhz'), '.0f')} MHz the OS reports (turbo/boost clock); '% peak' uses"
                     " the measured figure")
    for bw in probes.get("read_bandwidth") or []:
        lines.append(f"  read BW    {bw['bytes_per_s'] / 1e9:.1f} GB/s from {bw.get('measures', '?')}:"
                     f" {_mb(bw['nbytes'])} read by {cfg['threads']} thread(s) ({bw['source']})")
        if bw.get("used_by"):
            lines.append(f"             the '% BW' limit of: {', '.join(bw['used_by'])}")
    missing = report.get("missing") or {}
    for name, d in missing.items():
        lines.append(f"  not found  {d['label']}: {d.get('error')}  -> {d.get('install')}")
    if report.get("memory_note"):
        lines.append(f"  memory     {report['memory_note']}")
    return "\n".join(lines)


def legend_entries(report: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(column, meaning) of every column this report's tables show."""
    cfg = report["config"]
    warm = ("after one unmeasured call of ONNX Runtime, whose first call does one-time work (JAX is "
            "compiled before)" if cfg.get("quick") else "after one unmeasured call")
    entries = [
        ("median", "median wall time of one call over its n timed repeats; the implementations take turns, "
                   "round after round, in this one process, after untimed warm-up calls"),
        ("spread", "the fastest and the slowest of those repeats relative to the median (-min/+max %)"),
        ("n", "timed repeats behind the median"),
        ("GFLOP/s", "4·B·H·Lq·Lk·D / median: QKᵀ and P·V at 2 FLOPs per multiply-add (a causal call is "
                    "credited in full)"),
        ("GB/s", "memory-bound cases: the least bytes a call moves (q, K, V read once, the output written "
                 "once) / median"),
        ("% peak", "compute-bound cases: GFLOP/s as a share of the FMA peak above"),
        ("% BW", "memory-bound cases: GB/s as a share of the read bandwidth probed on a buffer of that size"),
        ("× NumPy", "NumPy's median / this row's median: above 1 is faster than NumPy"),
        ("× best peer", "the fastest peer's median / this row's median; the peers are PyTorch, ONNX Runtime "
                        "and JAX (not NumPy), so the fastest peer's own row reads 1.00×; '-': no peer ran"),
    ]
    if cfg["dtype"] in _HALF:
        entries.append(("× af f32", "attnfast float32's median on the same shape, in the same rounds / this "
                                    "row's median"))
    entries.append(("max |err|", "largest |output - reference| over a slice of the output (2 batch entries "
                                 "× 2 heads × 256 query rows; stages: 8 batch entries); the reference is "
                                 "attnfast.reference in float64 on the same inputs"))
    if cfg.get("measure_memory", True):
        entries.append(("peak MiB", "memory one call needs beyond its output: the growth of the process's "
                                    "peak resident set (VmHWM, reset just before the call) over its resident "
                                    "set just before, minus the output array. Measured in a separate process "
                                    "(glibc maps large blocks afresh and unmaps them on free; ONNX Runtime's "
                                    f"arena off), {warm}. It counts the score matrix, temporaries and copies "
                                    "of the inputs, not the inputs" + ("; --quick leaves the stages out" if cfg.get("quick") else "")))
    return entries


def format_legend(report: Dict[str, Any], width: int = 104) -> str:
    """What every column of the tables means (benchmarks/README.md says the same)."""
    import textwrap

    pad = 2 + max(len(name) for name, _ in legend_entries(report)) + 2
    lines = ["Columns"]
    for name, text in legend_entries(report):
        wrapped = textwrap.wrap(text, width - pad) or [""]
        lines.append(f"  {name.ljust(pad - 4)}  {wrapped[0]}")
        lines += [" " * pad + more for more in wrapped[1:]]
    return "\n".join(lines)


def _skip_note(r: Dict[str, Any], dtype: str) -> str:
    if r.get("unsupported"):
        return f"    {r['label']}: n/a in {dtype} ({r['skipped']})"
    return f"    {r['label']}: skipped ({r['skipped']})"


def format_case(res: Dict[str, Any], config: Optional[Dict[str, Any]] = None) -> str:
    config = config or {}
    dtype = res.get("dtype") or config.get("dtype", "?")
    memory_bound = res["bound"] == "memory"
    limit_name = "% BW" if memory_bound else "% peak"
    with_baseline = any(r.get("speedup_vs_attnfast_float32") for r in res["rows"])
    headers = (["implementation", "median", "spread", "n", "GFLOP/s"] + (["GB/s"] if memory_bound else [])
               + [limit_name, "× NumPy", "× best peer"] + (["× af f32"] if with_baseline else [])
               + ["max |err|", "peak MiB"])
    rows = []
    notes = []
    for r in res["rows"]:
        if r.get("skipped"):
            notes.append(_skip_note(r, dtype))
            continue
        cells = [r["label"], _fmt_time(r.get("median_s")), _spread(r), str(r.get("repeats") or "-"),
                 _num(r.get("gflops"), ".1f")]
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
    bound = (f"memory-bound: {_mb(res['bytes'])} moved, % of the read bandwidth of that size"
             if memory_bound else f"compute-bound: {res['flops'] / 1e9:.2f} GFLOP per call, % of FMA peak")
    parts = [title, f"  ({bound})"]
    if rows:
        parts.append(_table(headers, rows))
    parts += notes
    if res.get("reference_note"):
        parts.append(f"    {res['reference_note']}")
    return "\n".join(parts)


def _rows_by_impl(res: Dict[str, Any]) -> Dict[str, Any]:
    return {r["impl"]: r for r in res["rows"] if r.get("median_s")}


def _shape_text(res: Dict[str, Any]) -> str:
    if res.get("kind") == "stage":
        return str(res["name"])
    text = ",".join(str(res[k]) for k in ("B", "H", "Lq", "Lk", "D"))
    if res.get("q_dtype"):
        text += f" q {res['q_dtype']}"
    if res.get("label") not in (None, "", "--shape") and res.get("group") != "sweep":
        text += f" ({res['label']})"
    return text


def format_summary(report: Dict[str, Any]) -> str:
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

        def time_of(name: str) -> str:
            return _fmt_time(by[name]["median_s"]) if name in by else "n/a"

        def faster(name: str) -> str:
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


def format_report(report: Dict[str, Any]) -> str:
    blocks = [format_header(report), format_legend(report)]
    blocks += [format_case(res, report["config"]) for res in report["results"]]
    if report["config"]["dtype"] in _HALF and report["results"] and "attnfast" in report["implementations"]:
        blocks.append(format_summary(report))
    blocks.append(f"done in {report['elapsed_s']:.1f} s")
    return "\n\n".join(blocks)
