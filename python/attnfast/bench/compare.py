"""``python -m attnfast bench --compare A.json B.json``: B's medians against A's, case by case.

A regression check across attnfast versions (or machines, thread counts, builds): run
``bench --json`` with each, then compare.  Rows match when their case (the case's name, which spells
its kind and shape, its dtype and whether it was causal) and their implementation (and, in the serving
suite, the variant) are equal.  Cases or rows present in one file only are listed, not compared.

Both files must be reports of the same suite (forward, ``--backward`` or ``--serving``) with a schema
version this module reads (:data:`READABLE`); anything else is a :class:`ValueError` saying what the
file is and how to get a comparable one.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["READABLE", "load_report", "compare_reports", "format_comparison"]

#: Schema families and the versions of each this module reads.  Version 2 of the forward suite only
#: added fields (see benchmarks/README.md), so version 1 files compare as well.
READABLE: Dict[str, Tuple[int, ...]] = {
    "attnfast-bench": (1, 2),
    "attnfast-bench-backward": (1,),
    "attnfast-bench-serving": (1,),
}

_HOW = "write one with: python -m attnfast bench --json FILE"

CaseKey = Tuple[str, Optional[str], bool]
RowKey = Tuple[str, Optional[str]]


def _schema(report: object, path: str) -> Tuple[str, int]:
    if not isinstance(report, dict) or not isinstance(report.get("schema"), str):
        raise ValueError(f"{path} is not an attnfast bench report (no 'schema' field); {_HOW}")
    family, _, version = report["schema"].rpartition("/")
    if family not in READABLE or not version.isdigit():
        raise ValueError(f"{path} is not an attnfast bench report: its schema is {report['schema']!r}, "
                         f"not one of {', '.join(sorted(READABLE))} followed by /VERSION; {_HOW}")
    if int(version) not in READABLE[family]:
        known = ", ".join(f"{family}/{v}" for v in READABLE[family])
        raise ValueError(f"{path} has schema {report['schema']!r}, which this attnfast cannot read (it reads "
                         f"{known}): compare it with the attnfast version that wrote it, or rerun the "
                         f"benchmark with this one")
    if not isinstance(report.get("results"), list):
        raise ValueError(f"{path} says schema {report['schema']!r} but has no 'results' list; {_HOW}")
    return family, int(version)


def load_report(path: str) -> Dict[str, Any]:
    """Read a ``bench --json`` file, checking that it is one (ValueError otherwise)."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); {_HOW}") from None
    _schema(report, path)
    checked: Dict[str, Any] = report
    return checked


def _cases(report: Dict[str, Any]) -> Dict[CaseKey, Dict[str, Any]]:
    config = report.get("config") or {}
    out: Dict[CaseKey, Dict[str, Any]] = {}
    for res in report["results"]:
        causal = bool(res.get("causal", config.get("causal", False)))
        out[(res["name"], res.get("dtype") or config.get("dtype"), causal)] = res
    return out


def _rows(res: Dict[str, Any]) -> Dict[RowKey, Dict[str, Any]]:
    return {(r["impl"], r.get("variant")): r for r in res.get("rows", []) if r.get("median_s")}


def compare_reports(a: Dict[str, Any], b: Dict[str, Any], a_name: str = "A", b_name: str = "B") -> Dict[str, Any]:
    """B against A: per matching (case, implementation) both medians and ``ratio`` = B's / A's.

    Returns ``{"rows": [...], "only_a": [...], "only_b": [...], "notes": [...]}``; ``rows`` in A's
    order.  A ratio above 1 means B took longer.
    """
    family_a, _ = _schema(a, a_name)
    family_b, _ = _schema(b, b_name)
    if family_a != family_b:
        raise ValueError(f"{a_name} is a {family_a} report and {b_name} a {family_b} report: compare two runs "
                         "of the same suite (both plain, both --backward or both --serving)")
    cases_a, cases_b = _cases(a), _cases(b)
    rows: List[Dict[str, Any]] = []
    only_a: List[str] = []
    only_b: List[str] = []

    def label(key: CaseKey, row: Optional[RowKey] = None) -> str:
        name, dtype, causal = key
        text = f"{name} [{dtype}{', causal' if causal else ''}]"
        if row is not None:
            text += f" {row[0]}" + (f" ({row[1]})" if row[1] else "")
        return text

    for key, res_a in cases_a.items():
        if key not in cases_b:
            only_a.append(label(key))
            continue
        rows_a, rows_b = _rows(res_a), _rows(cases_b[key])
        for rkey, ra in rows_a.items():
            if rkey not in rows_b:
                only_a.append(label(key, rkey))
                continue
            rb = rows_b[rkey]
            rows.append({"case": label(key), "impl": rkey[0], "variant": rkey[1], "label": ra.get("label", rkey[0]),
                         "a_median_s": ra["median_s"], "b_median_s": rb["median_s"],
                         "ratio": rb["median_s"] / ra["median_s"]})
        only_b += [label(key, rkey) for rkey in rows_b if rkey not in rows_a]
    only_b += [label(key) for key in cases_b if key not in cases_a]

    notes = []
    getters: Tuple[Tuple[str, Callable[[Dict[str, Any]], Any]], ...] = (
        ("CPU", lambda r: (r.get("machine") or {}).get("cpu")),
        ("threads", lambda r: (r.get("config") or {}).get("threads")),
        ("attnfast", lambda r: ((r.get("machine") or {}).get("versions") or {}).get("attnfast")))
    for what, get in getters:
        va, vb = get(a), get(b)
        if va != vb:
            notes.append(f"{what}: {a_name} {va}, {b_name} {vb}")
    return {"rows": rows, "only_a": only_a, "only_b": only_b, "notes": notes}


def format_comparison(cmp: Dict[str, Any], a_name: str = "A", b_name: str = "B") -> str:
    from .report import _fmt_time, _table

    lines = [f"A  {a_name}", f"B  {b_name}",
             "ratio = B's median / A's median (above 1: slower in B, below 1: faster)"]
    lines += [f"differs: {n}" for n in cmp["notes"]]
    if cmp["rows"]:
        table, previous = [], None
        for r in cmp["rows"]:
            # The case is named on its first row only: the table stays readable.
            table.append(["" if r["case"] == previous else r["case"],
                          r["label"] + (f" ({r['variant']})" if r["variant"] else ""),
                          _fmt_time(r["a_median_s"]), _fmt_time(r["b_median_s"]), f"{r['ratio']:.3f}"])
            previous = r["case"]
        lines.append(_table(["case", "implementation", "A", "B", "ratio"], table))
    else:
        lines.append("  no case and implementation is in both files")
    for side, items in ((a_name, cmp["only_a"]), (b_name, cmp["only_b"])):
        if items:
            lines.append(f"only in {'A' if side == a_name else 'B'} (not compared):")
            lines += [f"  {item}" for item in items]
    return "\n".join(lines)
