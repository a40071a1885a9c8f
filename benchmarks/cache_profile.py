"""How the fused attention's rate depends on where its inputs live: the encoder shape's (L = 512, D = 64,
float32) GFLOP/s as the number of heads, and with it the working set, grows past the caches.

Each (batch, head) pair reads Q, K and V and writes the output, 128 KiB each at L = 512, D = 64: one pair
stays in a core's L2, 64 pairs (the benchmark's encoder shape, 32 MiB) come from memory on every call.
Then, at the largest count, the same call with some inputs broadcast over (B, H) (stride-0 views of one
pair's array, which the kernel reads in place): those inputs stay cached, and the difference is what
fetching them costs. The FMA peak is measured by the same probe as ``python -m attnfast bench`` with the
same thread count.

Configurations take turns, round after round, with the interleaved timing of ``python -m attnfast bench``
(attnfast.bench.timing), and the median per-call time counts: on a shared machine a burst of load then
hits all of them alike.

    python benchmarks/cache_profile.py                  # one thread
    python benchmarks/cache_profile.py --threads 2 --seconds 4
"""

from __future__ import annotations

import argparse
from typing import Callable

import numpy as np

import attnfast
from attnfast.bench import probes
from attnfast.bench.timing import TimingPolicy, median, time_interleaved


def _encoder_call(pairs: int, seq: int, depth: int, broadcast: str) -> Callable[[], object]:
    """A call on (1, pairs, seq, seq, depth) inputs; `broadcast` names the inputs shared by every pair."""
    rng = np.random.default_rng(0)
    shape = (1, pairs, seq, depth)

    def make(name: str) -> np.ndarray:
        if name in broadcast:
            return np.broadcast_to(rng.standard_normal((1, 1, seq, depth), dtype=np.float32), shape)
        return rng.standard_normal(shape, dtype=np.float32)

    q, k, v = make("q"), make("k"), make("v")
    out = np.empty(shape, np.float32)
    return lambda: attnfast.attention(q, k, v, out=out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512, help="Lq = Lk (default 512)")
    parser.add_argument("--depth", type=int, default=64, help="D (default 64)")
    parser.add_argument("--pairs", default="1,2,4,8,16,32,64", help="B*H values, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per configuration, over all rounds")
    args = parser.parse_args(argv)

    attnfast.set_num_threads(args.threads)
    pairs = [int(p) for p in args.pairs.split(",")]
    largest = max(pairs)
    calls = {f"pairs={p}": _encoder_call(p, args.seq, args.depth, "") for p in pairs}
    shared = {"K, V": "kv", "Q": "q", "Q, K, V": "qkv"}
    calls.update({f"shared={label}": _encoder_call(largest, args.seq, args.depth, names)
                  for label, names in shared.items()})
    policy = TimingPolicy(min_repeats=5, max_repeats=10_000, budget_s=args.seconds * len(calls),
                          cap_s=float("inf"))
    medians = {name: median(t) for name, t in time_interleaved(calls, policy).items()}
    peak = probes.fma_peak(0.3, np.float32, args.threads)["flops_per_s"]

    pair_bytes = 4 * args.seq * args.depth * 4  # Q, K, V and the output of one pair

    def rate(name: str, pair_count: int) -> str:
        flops_per_s = 4 * pair_count * args.seq * args.seq * args.depth / medians[name]
        return f"{flops_per_s / 1e9:7.1f}  {100 * flops_per_s / peak:5.0f}%"

    caps = attnfast.capabilities()
    print(f"attnfast {caps['version']}, ISA {caps['isa']}, {args.threads} thread(s), float32, "
          f"Lq = Lk = {args.seq}, D = {args.depth}; FMA peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'B*H':>5}  {'working set':>12}  {'GFLOP/s':>7}  {'% peak':>6}")
    for p in pairs:
        print(f"{p:>5}  {p * pair_bytes / 2**20:9.1f} MiB  {rate(f'pairs={p}', p)}")
    print(f"\nB*H = {largest}, inputs shared by every (batch, head) pair (broadcast, stay cached):")
    print(f"{'none':>9}  {rate(f'pairs={largest}', largest)}")
    for label in shared:
        print(f"{label:>9}  {rate(f'shared={label}', largest)}")


if __name__ == "__main__":
    main()
