"""Smoke test of the installed package on an emulated older CPU (run under qemu-x86_64 -cpu MODEL).

Checks that the import-time dispatch picks a target the CPU has, and that every public function runs
and agrees with the reference there. Used by CI as:
    qemu-x86_64 -cpu Nehalem  python tools/portable_smoke.py --expect-isa scalar
    qemu-x86_64 -cpu Haswell  python tools/portable_smoke.py --expect-isa avx2
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import attnfast
from attnfast import reference


def check(name: str, got: np.ndarray, want: np.ndarray, tol: float) -> None:
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    print(f"  {name:<10} max error {err:.2e}")
    if not err <= tol:
        raise SystemExit(f"{name}: error {err} above {tol}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Spelled as ATTNFAST_ISA may be: any case, surrounding whitespace ignored.
    parser.add_argument("--expect-isa", required=True, type=lambda s: s.strip().lower(),
                        choices=["scalar", "avx2", "avx512"])
    args = parser.parse_args()
    caps = attnfast.capabilities()
    print(f"attnfast {caps['version']}: isa={caps['isa']} usable={caps['isas']}")
    if caps["isa"] != args.expect_isa:
        raise SystemExit(f"expected the {args.expect_isa} target on this CPU, got {caps['isa']}")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 50, 17)).astype(np.float32)
    k = rng.standard_normal((2, 2, 70, 17)).astype(np.float32)
    v = rng.standard_normal((2, 2, 70, 9)).astype(np.float32)
    out, lse = attnfast.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True)
    check("attention", out, ref_out, 1e-5)
    check("lse", lse, ref_lse, 1e-5)
    decode = attnfast.attention(q[:, :, :1], k, v)
    check("decode", decode, reference.attention(q[:, :, :1], k, v), 1e-5)
    kk = np.repeat(k, 2, axis=1)
    check("scores", attnfast.scores(q, kk), reference.scores(q, kk), 1e-5)
    s = reference.scores(q, kk)
    check("softmax", attnfast.softmax(s), reference.softmax(s), 1e-6)
    w = reference.softmax(s)
    vv = np.repeat(v, 2, axis=1)
    check("aggregate", attnfast.aggregate(w, vv), reference.aggregate(w, vv), 1e-5)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
