"""PNG of a benchmark report: speed and peak memory against sequence length, one line per implementation.

Left: GFLOP/s of the Lq = Lk sweep with the measured FMA peak as a horizontal line.  Right: peak memory
beyond the output on a log scale, where the unfused implementations' quadratic growth shows against
attnfast's flat line.  Also usable on a saved report: ``python -m attnfast.bench.plot run.json out.png``.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Tuple

__all__ = ["plot_report", "sweep_series", "have_matplotlib"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def sweep_series(report: Dict[str, Any]) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """``{impl label: {"gflops": [(L, value)], "memory_mib": [(L, value)]}}`` from the sweep cases.

    Without a sweep (a ``--shape`` run), every Lq = Lk attention case is a point.
    """
    series: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    picked = [r for r in report["results"] if "sweep" in r.get("group", "")]
    if not picked:  # --shape runs have no sweep: plot the self-attention shapes there are
        picked = [r for r in report["results"] if r.get("kind") == "attention" and r["Lq"] == r["Lk"]]
    for res in picked:
        length = res["Lk"]
        for r in res["rows"]:
            s = series.setdefault(r["label"], {"gflops": [], "memory_mib": []})
            if r.get("gflops"):
                s["gflops"].append((length, r["gflops"]))
            if r.get("peak_extra_bytes") is not None:
                # Floor at 0.1 MiB so a flat ~0 line stays visible on the log axis.
                s["memory_mib"].append((length, max(r["peak_extra_bytes"] / 2**20, 0.1)))
    for s in series.values():
        for key in s:
            s[key].sort()
    return series


def plot_report(report: Dict[str, Any], path: str) -> str:
    """Write the PNG to ``path`` and return it; raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, no GUI backend probed
    import matplotlib.pyplot as plt

    series = sweep_series(report)
    m, cfg = report["machine"], report["config"]
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for label, s in series.items():
        if s["gflops"]:
            xs, ys = zip(*s["gflops"])
            ax_speed.plot(xs, ys, marker="o", label=label)
        if s["memory_mib"]:
            xs, ys = zip(*s["memory_mib"])
            ax_mem.plot(xs, ys, marker="o", label=label)
    peak = report["probes"].get("fma_peak_flops_per_s")
    if peak:
        fma_dtype = report["probes"].get("fma_dtype")
        which = f" ({fma_dtype})" if fma_dtype and fma_dtype != cfg["dtype"] else ""
        ax_speed.axhline(peak / 1e9, color="black", linestyle="--", linewidth=1,
                         label=f"FMA peak{which} {peak / 1e9:.0f} GFLOP/s")
    title = (f"Lq=Lk, {cfg['dtype']}, {cfg['threads']} threads"
             f"{', causal' if cfg.get('causal') else ''}")
    ax_speed.set(xscale="log", xlabel="sequence length", ylabel="GFLOP/s", title=f"Speed — {title}")
    ax_speed.set_ylim(bottom=0)
    ax_mem.set(xscale="log", yscale="log", xlabel="sequence length",
               ylabel="peak memory beyond output (MiB)", title="Peak extra memory (RSS)")
    for ax in (ax_speed, ax_mem):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"attnfast bench on {m.get('cpu')} ({m.get('cores')} cores)", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m attnfast.bench.plot REPORT.json OUT.png")
    with open(sys.argv[1]) as f:
        plot_report(json.load(f), sys.argv[2])
