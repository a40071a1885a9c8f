"""int8 KV-cache decode against float32 decode, same run: python tools/bench_int8_decode.py [repeats].

For each of the issue's decode shapes (B, Hq, Lq, Lk, D) and 1 and 2 threads: the float32 call
attnfast.attention(q, k, v) and the int8 call attnfast.attention(q, k8, v8, k_scale=, v_scale=) on the
same cache quantised per row by attnfast.quantize_kv, timed alternately (best of `repeats` rounds of a few calls each, wall clock), and
both errors against the float64 reference on the dequantised cache next to a naive float32
implementation's (NumPy: q @ k^T * scale, softmax, @ v on the dequantised cache in float32).
"""
import sys
import time

import numpy as np

import attnfast
from attnfast import _attnfast as _core
from attnfast import reference

SHAPES = [(1, 32, 1, 4096, 128), (8, 8, 1, 8192, 128)]


def int8_attention(q, k8, v8, ks, vs):
    return attnfast.attention(q, k8, v8, k_scale=ks, v_scale=vs)


def naive32(q, k, v):
    s = (q @ np.swapaxes(k, -1, -2)) * np.float32(1 / np.sqrt(q.shape[-1]))
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


def best_of(f, calls, repeats, other):
    times = {id(f): [], id(other): []}
    for _ in range(repeats):
        for g in (f, other):  # alternate, so both see the same machine state
            t0 = time.perf_counter()
            for _ in range(calls):
                g()
            times[id(g)].append((time.perf_counter() - t0) / calls)
    return min(times[id(f)]), min(times[id(other)])


def main():
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    rng = np.random.default_rng(0)
    print(f"isa {_core.isa()}")
    for shape in SHAPES:
        b, h, lq, lk, d = shape
        q = rng.standard_normal((b, h, lq, d)).astype(np.float32)
        k = rng.standard_normal((b, h, lk, d)).astype(np.float32)
        v = rng.standard_normal((b, h, lk, d)).astype(np.float32)
        k8, ks = attnfast.quantize_kv(k)
        v8, vs = attnfast.quantize_kv(v)
        kd = k8.astype(np.float64) * ks[..., None]
        vd = v8.astype(np.float64) * vs[..., None]
        ref = reference.attention(q.astype(np.float64), kd, vd)
        err8 = np.abs(int8_attention(q, k8, v8, ks, vs) - ref).max()
        errn = np.abs(naive32(q, kd.astype(np.float32), vd.astype(np.float32)) - ref).max()
        for threads in (1, 2):
            attnfast.set_num_threads(threads)
            t32, t8 = best_of(lambda: attnfast.attention(q, k, v), 5, repeats,
                              lambda: int8_attention(q, k8, v8, ks, vs))
            print(f"{shape} threads {threads}: float32 {t32 * 1e3:.3f} ms, int8 {t8 * 1e3:.3f} ms, "
                  f"speedup {t32 / t8:.2f}x; error int8 {err8:.2e}, naive float32 {errn:.2e} "
                  f"(ratio {err8 / errn:.2f})")
    attnfast.set_num_threads(0)


if __name__ == "__main__":
    main()
