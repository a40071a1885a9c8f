"""attnfast.dask on a real Dask cluster: throughput, memory under a limit, weak scaling and traffic.

Three cases (issue "Beyond one machine", Scale table), each on a ``distributed.LocalCluster`` of
worker *processes* with one thread each, on loopback and without a dashboard:

a  (1, 8, 65536, 65536, 64) float32 causal, query and key chunks of 8192, 2 workers x 1 thread, against
   one in-process ``attnfast.attention`` on 2 threads over the same values, both timed in the same run,
   taking turns. Goal: the cluster reaches >= 0.8x the in-process throughput.
b  the same graph with each worker's ``memory_limit`` below the bytes of K and V: it completes, no worker
   is restarted (worker pids, addresses and the scheduler's remove-worker events before and after), and
   every worker's peak RSS (sampled every 5 ms inside the worker) is reported.
c  weak scaling on 1, 2, 4, 8 workers: one query chunk against n key chunks (the key-split, "long
   context" layout), work growing with n. Per level of the merge tree it prints the task count and the
   bytes moved between workers (from distributed's transfer logs), next to the formula of docs/dask.md,
   and per task the thread CPU time, which, unlike wall time, does not grow when 8 workers share 2 cores.

Inputs are generated inside the workers, chunk by chunk, from a seeded generator per chunk (no K or V
crosses from the client); the in-process run generates the same chunks in the client, so both compute
on identical values, and the two results are compared.

    python benchmarks/bench_dask.py                    # all three cases at full size (a few minutes)
    python benchmarks/bench_dask.py --quick            # reduced sizes, < 2 minutes in total
    python benchmarks/bench_dask.py --case a --repeats 5 --json dask_a.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

try:
    import attnfast
except ImportError:  # a source checkout without the package installed: use its python/ directory
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))
    import attnfast

from attnfast.bench.machine import cpu_info, load_average, usable_cores

MiB = 1 << 20
SEED = 20261201
TENSORS = {"q": 0, "k": 1, "v": 2}


# --------------------------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Problem:
    """One attention call: shape (B, H, Lq, Lk, D) with Dv = D, chunk sizes along Lq and Lk."""

    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    q_chunk: int
    k_chunk: int
    causal: bool
    dtype: str = "float32"
    h_chunk: int = 0  # heads per chunk (0: all heads in one chunk)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def shape(self, tensor: str) -> Tuple[int, int, int, int]:
        return (self.B, self.H, self.Lq if tensor == "q" else self.Lk, self.D)

    def chunks(self, tensor: str) -> Tuple[Tuple[int, ...], ...]:
        length, step = (self.Lq, self.q_chunk) if tensor == "q" else (self.Lk, self.k_chunk)
        along = tuple(min(step, length - s) for s in range(0, length, step))
        hc = self.h_chunk or self.H
        heads = tuple(min(hc, self.H - s) for s in range(0, self.H, hc))
        return ((self.B,), heads, along, (self.D,))

    def nbytes(self, tensor: str) -> int:
        return int(np.prod(self.shape(tensor))) * self.itemsize

    def visible_pairs(self) -> int:
        """(query, key) pairs the call computes: all of them, or the causal (top-left) triangle."""
        if not self.causal:
            return self.Lq * self.Lk
        rows = np.minimum(np.arange(self.Lq, dtype=np.int64) + 1, self.Lk)
        return int(rows.sum())

    def flops(self) -> float:
        # Two products (Q K^T and P V) of 2 FLOPs per multiply-add each, over the visible pairs.
        return 4.0 * self.B * self.H * self.D * self.visible_pairs()

    def label(self) -> str:
        heads = f", head chunks {self.h_chunk}" if self.h_chunk else ""
        return (f"({self.B}, {self.H}, {self.Lq}, {self.Lk}, {self.D}) {self.dtype}"
                f"{' causal' if self.causal else ''}, query chunks {self.q_chunk}, key chunks {self.k_chunk}"
                f"{heads}")


def case_a_problem(quick: bool) -> Problem:
    if quick:
        return Problem(1, 8, 16384, 16384, 64, 4096, 4096, causal=True)
    return Problem(1, 8, 65536, 65536, 64, 8192, 8192, causal=True)


def case_b_problem(quick: bool) -> Problem:
    # --quick: smaller chunks than (a)'s, so that a task's chunks fit the small limit's room.
    return Problem(1, 8, 16384, 16384, 64, 2048, 2048, causal=True) if quick else case_a_problem(False)


def case_c_problem(n: int, quick: bool) -> Problem:
    # One query chunk against n key chunks: the work and the keys grow with the workers.
    c = 2048 if quick else 8192
    heads = 4 if quick else 8
    return Problem(1, heads, c, n * c, 64, c, c, causal=False)


# ------------------------------------------------------------------------------------------ inputs

TILE = 1024  # rows generated from one seed: chunks along the length axis are multiples of it


def chunk_values(tensor: str, row0: int, shape: Sequence[int], dtype: str,
                 heads: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Rows [row0, row0 + shape[2]) of a (B, H, L, D) input, all batch items and heads (or the heads
    [h0, h1) of ``heads``, shape[1] being then the call's H), wherever it runs.

    Each TILE rows come from a generator seeded by (seed, tensor, tile index), so the values do not
    depend on how the length axis is chunked (any multiple of TILE gives the same array).
    """
    b, h, rows, d = (int(x) for x in shape)
    if row0 % TILE:
        raise ValueError(f"chunks along the length axis must start at multiples of {TILE}; got row {row0}")
    h0, h1 = heads if heads is not None else (0, h)
    out = np.empty((b, h1 - h0, rows, d), np.dtype(dtype))
    for start in range(0, rows, TILE):
        rng = np.random.default_rng([SEED, TENSORS[tensor], (row0 + start) // TILE])
        stop = min(start + TILE, rows)
        tile = rng.standard_normal((b, h, TILE, d), dtype=np.dtype(dtype))
        out[:, :, start:stop] = tile[:, h0:h1, :stop - start]
    return out


def _chunk_for_dask(tensor, dtype, block_info=None):
    info = block_info[None]
    b, _, rows, d = info["chunk-shape"]
    heads = info["array-location"][1]
    return chunk_values(tensor, info["array-location"][2][0], (b, info["shape"][1], rows, d), dtype,
                        heads=tuple(heads))


def dask_input(problem: Problem, tensor: str):
    """A Dask array whose every chunk is generated by the task that makes it (on a worker)."""
    import dask.array as da

    return da.map_blocks(_chunk_for_dask, tensor, problem.dtype, dtype=problem.dtype,
                         chunks=problem.chunks(tensor), meta=np.empty((0, 0, 0, 0), problem.dtype),
                         name=f"input-{tensor}-{SEED}-{problem.B}-{problem.H}-{problem.shape(tensor)[2]}-"
                              f"{problem.D}-{problem.q_chunk if tensor == 'q' else problem.k_chunk}-{problem.h_chunk}")


def numpy_input(problem: Problem, tensor: str) -> np.ndarray:
    """The same values as :func:`dask_input`, generated chunk by chunk in this process."""
    shape = problem.shape(tensor)
    out = np.empty(shape, problem.dtype)
    for row0 in range(0, shape[2], 8 * TILE):
        rows = min(8 * TILE, shape[2] - row0)
        out[:, :, row0:row0 + rows] = chunk_values(tensor, row0, shape[:2] + (rows, shape[3]), problem.dtype)
    return out


def block_slices(chunks) -> Iterator[Tuple[Tuple[int, ...], Tuple[slice, ...]]]:
    starts = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in chunks]
    for block_id in np.ndindex(*[len(c) for c in chunks]):
        yield block_id, tuple(slice(s[i], s[i + 1]) for s, i in zip(starts, block_id))


# ------------------------------------------------------------------------------- cluster plumbing

def require_dask():
    try:
        import attnfast.dask  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        sys.exit(f"bench_dask.py needs Dask and distributed ({exc}); install them with "
                 f'pip install "attnfast[dask]"')


@contextlib.contextmanager
def local_cluster(n_workers: int, memory_limit="auto"):
    """A LocalCluster of ``n_workers`` processes x 1 thread on loopback, and a Client to it."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, memory_limit=memory_limit,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        client.wait_for_workers(n_workers, timeout=120)
        # One kernel thread per worker process: the worker's one thread is its share of the cores.
        client.run(_set_threads, 1)
        yield cluster, client


def _set_threads(n):
    import attnfast as af
    af.set_num_threads(n)
    return af.get_num_threads()


def worker_snapshot(dask_worker) -> dict:
    """What one worker has done so far: its process, CPU time, transfers and task metrics."""
    import psutil

    proc = psutil.Process()
    cpu = proc.cpu_times()
    digests = {}
    for key, value in dask_worker.digests_total.items():
        # ("execute", span, prefix, activity, unit): keep per prefix and activity, any span.
        if isinstance(key, tuple) and key[0] == "execute" and len(key) == 5:
            name = ("execute", key[2], key[3], key[4])
            digests[name] = digests.get(name, 0.0) + float(value)
        elif isinstance(key, tuple) and key[0] == "memory-monitor":
            digests[key] = digests.get(key, 0.0) + float(value)
    return {"pid": os.getpid(), "address": dask_worker.address, "rss": proc.memory_info().rss,
            "cpu_seconds": cpu.user + cpu.system, "digests": digests,
            "threads": attnfast.get_num_threads(),
            "incoming": [dict(e, keys={str(k): v for k, v in e["keys"].items()})
                         for e in dask_worker.transfer_incoming_log],
            "outgoing_bytes_total": dask_worker.transfer_outgoing_bytes_total}


def clear_transfer_logs(dask_worker):
    dask_worker.transfer_incoming_log.clear()
    dask_worker.transfer_outgoing_log.clear()


class _Sampler(threading.Thread):
    """Peak RSS and pauses of the worker process it runs in, sampled every ``period`` seconds."""

    def __init__(self, dask_worker, period):
        super().__init__(daemon=True, name="bench-rss-sampler")
        import psutil
        self.proc, self.worker, self.period = psutil.Process(), dask_worker, period
        self.peak, self.samples, self.paused = 0, 0, 0.0
        self.stop_event = threading.Event()

    def run(self):
        last = time.monotonic()
        while not self.stop_event.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            now = time.monotonic()
            # distributed pauses a worker (no new tasks) above 80% of its memory_limit
            if str(getattr(self.worker, "status", "")).endswith("paused"):
                self.paused += now - last
            last = now
            self.stop_event.wait(self.period)


def start_sampler(dask_worker, period=0.005):
    sampler = _Sampler(dask_worker, period)
    dask_worker._bench_sampler = sampler
    sampler.start()


def stop_sampler(dask_worker):
    sampler = getattr(dask_worker, "_bench_sampler", None)
    if sampler is None:  # a worker process started after the sampler was (a restart)
        return None
    sampler.stop_event.set()
    sampler.join()
    return {"peak_rss": sampler.peak, "samples": sampler.samples, "paused_seconds": sampler.paused}


def removed_workers(client, since: float) -> List[dict]:
    """The scheduler's remove-worker events (a worker that died or was restarted) after ``since``."""
    return [msg for t, msg in client.get_events("all")
            if t >= since and isinstance(msg, dict) and msg.get("action") == "remove-worker"]


def wait_idle(client, keep: int = 0, timeout: float = 60.0):
    """Wait until the scheduler forgot every task but ``keep`` (released results of the last run)."""
    gc.collect()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.run_on_scheduler(_scheduler_task_count) <= keep:
            return
        time.sleep(0.05)


def _scheduler_task_count(dask_scheduler):
    return len(dask_scheduler.tasks)


def stream_to_client(client, array, target: Optional[np.ndarray] = None) -> np.ndarray:
    """Compute ``array`` with each output chunk sent to the client (and released) as soon as it is
    done: no worker ever holds the whole result, as when writing to a store."""
    from distributed import as_completed

    if target is None:
        target = np.empty(array.shape, array.dtype)
    slices = dict(block_slices(array.chunks))
    delayed = array.to_delayed()
    ids = list(np.ndindex(*delayed.shape))
    futures = client.compute([delayed[i] for i in ids])
    where = {f.key: ids[n] for n, f in enumerate(futures)}
    for future in as_completed(futures):
        target[slices[where[future.key]]] = future.result()
        future.release()
    return target


# ------------------------------------------------------------------------------- graph structure

def graph_levels(arrays) -> Dict[str, Tuple[int, str]]:
    """key -> (depth, role) of the graph the scheduler runs (optimized as persist / compute do).

    Depth 0 is an input (a generator task, a key outside the graph such as a persisted chunk or a
    future, and any task on inputs only), depth 1 an attention block task, and each merge level one
    more. Roles: "input", "block", "merge",
    with "+root" when the task also finishes an output block (Dask fuses the root and the output's
    getitem into the last task of a linear chain), and "alias" for keys that only rename another key
    (they take their target's depth and are not counted as tasks).
    """
    import dask

    # The expression Client.persist / Client.compute submit: the same keys as the transfer logs.
    dsk = dict(dask.base.collections_to_expr(list(arrays), optimize_graph=True).optimize().__dask_graph__())
    found: Dict = {}

    def visit(key):
        if key in found:
            return found[key][0]
        if key not in dsk:
            found[key] = (0, "input")
            return 0
        deps = task_dependencies(dsk, key)
        below = max((visit(d) for d in deps), default=-1)
        role = "alias" if is_alias(dsk[key]) else role_of(key, bool(deps))
        # Only attention's own tasks make a level; others (inputs, concatenations of them) keep their
        # inputs' depth.
        counts = role.startswith(("block", "merge"))
        found[key] = (below + 1 if counts else max(below, 0), role)
        return found[key][0]

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for key in dsk:
        visit(key)
    return {str(k): v for k, v in found.items()}


def task_dependencies(dsk, key):
    """Every key a task reads, including those outside the graph (persisted inputs, futures)."""
    from dask.core import get_dependencies

    deps = getattr(dsk[key], "dependencies", None)  # dask >= 2024.12 task objects know them
    return set(deps) if deps is not None else get_dependencies(dsk, key)


def is_alias(task) -> bool:
    try:
        from dask._task_spec import Alias
    except ImportError:  # older dask: no alias tasks
        return False
    return isinstance(task, Alias)


def role_of(key, has_deps: bool) -> str:
    name = re.sub(r"-[0-9a-f]{32}", "", key[0] if isinstance(key, tuple) else str(key))
    role = "merge" if "merge" in name else "block" if "block" in name else name if has_deps else "input"
    if role in ("merge", "block") and "state" in name:
        role += "+root"
    return role


def level_table(levels: Dict[str, Tuple[int, str]]) -> Dict[Tuple[int, str], int]:
    """Task count per (depth, role), aliases left out."""
    table: Dict[Tuple[int, str], int] = {}
    for depth, role in levels.values():
        if role != "alias":
            table[(depth, role)] = table.get((depth, role), 0) + 1
    return dict(sorted(table.items()))


def predicted_merges(parts: int) -> List[int]:
    """Merge tasks per level of a balanced binary tree over ``parts`` ordered partial states
    (neighbours pair up; an odd last node passes up unmerged): the formula of docs/dask.md."""
    out = []
    while parts > 1:
        out.append(parts // 2)
        parts = (parts + 1) // 2
    return out


def visible_key_chunks(p: Problem) -> List[int]:
    """Per query chunk, the key chunks that hold a key visible to one of its queries (causal top-left:
    key chunk [k0, k1) is visible to queries [q0, q1) when k0 <= q1 - 1)."""
    q_edges = np.cumsum((0,) + p.chunks("q")[2])
    k_starts = np.cumsum((0,) + p.chunks("k")[2])[:-1]
    return [int(np.sum(k_starts <= q1 - 1)) if p.causal else len(k_starts) for q1 in q_edges[1:]]


def predicted_levels(p: Problem) -> Dict[int, int]:
    """Tasks per depth the formula gives: depth 1 one block per visible (query chunk, key chunk), depth
    1 + l the merges of level l summed over the query chunks; times the batch and head chunks, which
    repeat the same blocks."""
    counts = visible_key_chunks(p)
    batch_blocks = len(p.chunks("q")[0]) * len(p.chunks("q")[1])
    out = {1: sum(counts) * batch_blocks}
    for m in counts:
        for level, merges in enumerate(predicted_merges(m), start=2):
            out[level] = out.get(level, 0) + merges * batch_blocks
    return out


def print_levels(table: Dict[Tuple[int, str], int], predicted: Dict[int, int]):
    print("  tasks per depth of the graph (0: input chunks, 1: attention blocks, 2...: merge levels) "
          "and the formula's count:")
    for depth in sorted({d for d, _ in table}):
        roles = ", ".join(f"{role} {n}" for (d, role), n in table.items() if d == depth)
        total = sum(n for (d, _), n in table.items() if d == depth)
        expect = f"formula {predicted[depth]}" if depth in predicted else ""
        print(f"    depth {depth}: {total:4d} tasks ({roles}) {expect}")


# ---------------------------------------------------------------------------------------- output

def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_b(n: float) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def spread(values: Sequence[float]) -> str:
    return f"min {fmt_s(min(values))} (range {fmt_s(min(values))}-{fmt_s(max(values))}, {len(values)} runs)"


def machine_header() -> dict:
    info = cpu_info()
    flags = set(info["flags"])
    import dask
    import distributed
    facts = {
        "cpu": info["model"], "vendor": info["vendor"], "family": info["family"], "mhz": info["mhz"],
        "simd_flags": [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile")
                       if f in flags],
        "cores": usable_cores(), "memory_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
        "attnfast": getattr(attnfast, "__version__", None), "isa": attnfast.capabilities().get("isa"),
        "dask": dask.__version__, "distributed": distributed.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "load_average": load_average(),
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    print(f"machine: {facts['cpu']} (vendor {facts['vendor']}, family {facts['family']}), {facts['cores']} cores, "
          f"{facts['memory_bytes'] / (1 << 30):.0f} GiB, flags {' '.join(facts['simd_flags'])}")
    print(f"attnfast {facts['attnfast']} on its {facts['isa']} target; dask {facts['dask']}, distributed "
          f"{facts['distributed']}, NumPy {facts['numpy']}, Python {facts['python']}; {facts['utc']} UTC, "
          f"load average {facts['load_average']}")
    return facts


# ---------------------------------------------------------------------------------------- case a

_reference_cache: Dict[Problem, Tuple[Tuple[np.ndarray, ...], np.ndarray]] = {}


def _unchunked(problem: Problem) -> Problem:
    # The values do not depend on the chunks (see chunk_values): one cache entry per shape.
    return dataclasses.replace(problem, q_chunk=0, k_chunk=0)


def numpy_inputs(problem: Problem) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k, v in this process (kept for the next case on the same shape: (a) and (b) share them)."""
    key = _unchunked(problem)
    if key in _reference_cache:
        return _reference_cache[key][0]
    _reference_cache.clear()
    arrays = tuple(numpy_input(problem, t) for t in ("q", "k", "v"))
    _reference_cache[key] = (arrays, None)
    return arrays


def in_process_reference(problem: Problem, threads: int = 2) -> np.ndarray:
    q, k, v = numpy_inputs(problem)
    ref = _reference_cache[_unchunked(problem)][1]
    if ref is None:
        attnfast.set_num_threads(threads)
        ref = attnfast.attention(q, k, v, causal=problem.causal)
        _reference_cache[_unchunked(problem)] = ((q, k, v), ref)
    return ref


def compare(name: str, got: np.ndarray, ref: np.ndarray) -> dict:
    same = bool(np.array_equal(got, ref))
    diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    print(f"  {name} vs in-process attnfast.attention: " +
          ("bitwise identical" if same else f"max |diff| {diff:.2e} (max |out| {scale:.2f})"))
    return {"bitwise_identical": same, "max_abs_diff": diff}


def case_a(p: Problem, repeats: int) -> dict:
    import attnfast.dask as ad
    from distributed import wait

    print(f"\n(a) throughput: {p.label()}; LocalCluster 2 processes x 1 thread against one in-process "
          f"attnfast.attention on 2 threads, taking turns, {repeats} repeats")
    q, k, v = numpy_inputs(p)
    with local_cluster(2) as (cluster, client):
        t0 = time.perf_counter()
        qd, kd, vd = client.persist([dask_input(p, t) for t in ("q", "k", "v")])
        wait([qd, kd, vd])
        generate = time.perf_counter() - t0
        inputs_in_cluster = client.run_on_scheduler(_scheduler_task_count)
        print(f"  inputs generated in the workers: {fmt_s(generate)} ({inputs_in_cluster} chunks; q, k, v "
              f"{fmt_b(p.nbytes('q'))} each)")
        levels = graph_levels([ad.attention(qd, kd, vd, causal=p.causal)])
        times: Dict[str, List[float]] = {"dask": [], "in_process": []}
        cpu: Dict[str, List[float]] = {"dask_task_cpu": [], "dask_worker_cpu": [], "in_process_cpu": []}
        transfers = []
        client.run(start_sampler)
        for r in range(repeats):
            order = ("dask", "in_process") if r % 2 == 0 else ("in_process", "dask")
            for which in order:
                if which == "dask":
                    client.run(clear_transfer_logs)
                    before = client.run(worker_snapshot)
                    t0 = time.perf_counter()
                    # Building the graph is part of the call's cost; the result stays in the workers'
                    # memory, as the in-process result stays in this process's.
                    out = client.persist(ad.attention(qd, kd, vd, causal=p.causal))
                    wait(out)
                    times["dask"].append(time.perf_counter() - t0)
                    after = client.run(worker_snapshot)
                    cpu["dask_task_cpu"].append(sum(task_cpu_by_prefix(before, after).values()))
                    cpu["dask_worker_cpu"].append(sum(after[w]["cpu_seconds"] - before[w]["cpu_seconds"]
                                                      for w in after))
                    transfers.append(transfer_summary(after, levels))
                    del out
                    wait_idle(client, keep=inputs_in_cluster)
                else:
                    attnfast.set_num_threads(2)
                    c0, t0 = time.process_time(), time.perf_counter()
                    ref = attnfast.attention(q, k, v, causal=p.causal)
                    times["in_process"].append(time.perf_counter() - t0)
                    cpu["in_process_cpu"].append(time.process_time() - c0)
                    _reference_cache[_unchunked(p)] = ((q, k, v), ref)
                    del ref
            print(f"  repeat {r + 1}: dask {fmt_s(times['dask'][-1])}, in-process {fmt_s(times['in_process'][-1])}")
        peaks = client.run(stop_sampler)
        got = stream_to_client(client, ad.attention(qd, kd, vd, causal=p.causal))
        check = compare("dask result", got, in_process_reference(p))
        del got
    ratios = [i / d for d, i in zip(times["dask"], times["in_process"])]
    gflops = {k_: p.flops() / min(v_) / 1e9 for k_, v_ in times.items()}
    print(f"  dask (2 workers x 1 thread): {spread(times['dask'])}, {gflops['dask']:.0f} GFLOP/s")
    print(f"  in-process (2 threads):      {spread(times['in_process'])}, {gflops['in_process']:.0f} GFLOP/s")
    print(f"  throughput dask / in-process: {min(times['in_process']) / min(times['dask']):.2f}x of the "
          f"minimum times (per repeat {min(ratios):.2f}-{max(ratios):.2f}x); goal >= 0.8x")
    print(f"  CPU seconds per run: dask tasks {mean(cpu['dask_task_cpu']):.1f} (thread CPU), worker processes "
          f"{mean(cpu['dask_worker_cpu']):.1f}; in-process call {mean(cpu['in_process_cpu']):.1f}")
    print(f"  peak worker RSS: {', '.join(fmt_b(x['peak_rss']) for x in peaks.values() if x)}; kernel threads "
          f"per worker: {', '.join(str(s['threads']) for s in before.values())}")
    table = level_table(levels)
    print_levels(table, predicted_levels(p))
    print_transfers(transfers[-1], p, "the last run")
    return {"problem": asdict(p), "flops": p.flops(), "times": times, "cpu_seconds": cpu,
            "generate_seconds": generate, "ratio_of_min_times": min(times["in_process"]) / min(times["dask"]),
            "ratio_per_repeat": ratios, "gflops_at_min": gflops, "check": check,
            "peak_worker_rss": [x["peak_rss"] for x in peaks.values() if x],
            "tasks_per_depth": [[d, role, n] for (d, role), n in table.items()],
            "predicted_tasks_per_depth": predicted_levels(p), "transfers_per_run": transfers}


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def task_cpu_by_prefix(before: dict, after: dict) -> Dict[str, float]:
    """Thread CPU seconds of the tasks run between two snapshots, per task prefix (all workers)."""
    out: Dict[str, float] = {}
    for w, snap in after.items():
        old = before.get(w, {"digests": {}})["digests"]
        for key, value in snap["digests"].items():
            if key[0] == "execute" and key[2] == "thread-cpu":
                out[key[1]] = out.get(key[1], 0.0) + value - old.get(key, 0.0)
    return out


def transfer_summary(after: dict, levels: Dict[str, Tuple[int, str]]) -> dict:
    """Bytes each worker received from the others since its transfer log was cleared, and the keys
    moved per (depth, role) of the graph."""
    per_worker: Dict[str, int] = {}
    by_depth: Dict[str, List[int]] = {}
    for w, snap in after.items():
        per_worker[w] = sum(entry["total"] for entry in snap["incoming"])
        for entry in snap["incoming"]:
            for key, nbytes in entry["keys"].items():
                depth, role = levels.get(key, (-1, "other"))
                slot = by_depth.setdefault(f"{depth}:{role}", [0, 0])
                slot[0] += 1
                slot[1] += nbytes
    return {"per_worker": per_worker, "total": sum(per_worker.values()), "by_depth": dict(sorted(by_depth.items()))}


def partial_nbytes(p: Problem) -> int:
    """One partial state of an output block: out (B, H, Lq chunk, Dv) and lse (B, H, Lq chunk) in the
    computation dtype (float32 here)."""
    return p.B * p.H * p.q_chunk * (p.D + 1) * 4


def print_transfers(t: dict, p: Problem, what: str):
    chunk = p.B * p.H * p.q_chunk * p.D * p.itemsize
    print(f"  moved between workers in {what}: {fmt_b(t['total'])} "
          f"({', '.join(fmt_b(x) for x in t['per_worker'].values())} received per worker); by what was moved "
          f"(an input chunk is {fmt_b(chunk)}, a partial state B*H*Lq_chunk*(Dv+1) values = "
          f"{fmt_b(partial_nbytes(p))}):")
    for cls, (count, nbytes) in t["by_depth"].items():
        depth, role = cls.split(":", 1)
        print(f"    depth {depth} {role}: {count} keys, {fmt_b(nbytes)}")


# ---------------------------------------------------------------------------------------- case b

def case_b(p: Problem, quick: bool, memory_limit: Optional[int]) -> dict:
    import attnfast.dask as ad

    kv = p.nbytes("k") + p.nbytes("v")
    limit = memory_limit if memory_limit is not None else default_memory_limit(p, quick)
    print(f"\n(b) memory: {p.label()}; 2 workers x 1 thread, memory_limit {fmt_b(limit)} per worker "
          f"(K and V: {fmt_b(kv)}); inputs generated inside the graph, output chunks streamed to the client")
    ref = in_process_reference(p)
    error = None
    with local_cluster(2, memory_limit=limit) as (cluster, client):
        since = time.time()
        idle = client.run(worker_snapshot)
        client.run(start_sampler)
        graph = ad.attention(*[dask_input(p, t) for t in ("q", "k", "v")], causal=p.causal)
        t0 = time.perf_counter()
        try:
            got = stream_to_client(client, graph)
        except Exception as exc:  # noqa: BLE001 - a failed run is the measurement: report it
            got, error = None, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - t0
        peaks = client.run(stop_sampler)
        after = client.run(worker_snapshot)
        removed = removed_workers(client, since)
    check = compare("result under the memory limit", got, ref) if got is not None else None
    del got
    same_workers = ({s["address"]: s["pid"] for s in idle.values()} ==
                    {s["address"]: s["pid"] for s in after.values()})
    spilled = sum(v for s in after.values() for key, v in s["digests"].items()
                  if "disk-write" in key and key[-1] == "bytes")
    spilled -= sum(v for s in idle.values() for key, v in s["digests"].items()
                   if "disk-write" in key and key[-1] == "bytes")
    status = "FAILED: " + error if error else "completed"
    print(f"  {status} in {fmt_s(elapsed)}; workers removed or restarted: {len(removed)}; same worker "
          f"pids and addresses before and after: {same_workers}")
    for w in sorted(idle):
        peak = peaks.get(w)
        print(f"  worker {w}: idle RSS {fmt_b(idle[w]['rss'])}, " + (
            f"peak RSS {fmt_b(peak['peak_rss'])} ({peak['peak_rss'] / limit:.0%} of the limit), paused "
            f"~{peak['paused_seconds']:.1f} s" if peak else "restarted (no sample from the original process)"))
    print(f"  spilled to disk: {fmt_b(spilled)}")
    return {"problem": asdict(p), "memory_limit": limit, "kv_bytes": kv, "seconds": elapsed, "error": error,
            "removed_workers": len(removed), "same_workers": same_workers, "spilled_bytes": spilled,
            "idle_rss": {w: s["rss"] for w, s in idle.items()},
            "peak_rss": {w: s["peak_rss"] for w, s in peaks.items() if s},
            "paused_seconds": {w: s["paused_seconds"] for w, s in peaks.items() if s}, "check": check}


def default_memory_limit(p: Problem, quick: bool) -> int:
    """15/16 of the bytes of K and V (240 MiB at full size); in --quick mode, whose K and V are smaller
    than an idle worker process (~100 MiB with NumPy, Dask and attnfast loaded), 112 MiB + 3/4 of those
    bytes, so that the room above the idle process is still smaller than K and V."""
    kv = p.nbytes("k") + p.nbytes("v")
    limit = 112 * MiB + 0.75 * kv if quick else kv * 15 / 16
    return int(limit) // MiB * MiB


# ---------------------------------------------------------------------------------------- case c

def case_c(quick: bool, worker_counts: Sequence[int], problem=None) -> dict:
    import dask.array as da
    from distributed import get_task_stream, wait

    import attnfast.dask as ad

    cores = usable_cores()
    print(f"\n(c) weak scaling: one query chunk against one key chunk per worker, non-causal, key/value "
          f"chunk j generated on worker j and the query chunk on worker 0; {cores} cores shared by the workers")
    rows = []
    for n in worker_counts:
        p = (problem or case_c_problem)(n, quick)
        with local_cluster(n) as (cluster, client):
            workers = sorted(client.scheduler_info()["workers"])

            def placed(tensor, j, worker):
                rows = p.q_chunk if tensor == "q" else p.k_chunk
                shape = (p.B, p.H, rows, p.D)
                fut = client.submit(chunk_values, tensor, j * rows, shape, p.dtype, workers=[worker],
                                    key=f"input-{tensor}-{j}", pure=False)
                return fut, da.from_delayed(fut, shape=shape, dtype=p.dtype)

            qf, qd = placed("q", 0, workers[0])
            kv_parts = [(placed("k", j, workers[j % n]), placed("v", j, workers[j % n])) for j in range(n)]
            kd = da.concatenate([kp[1] for kp, _ in kv_parts], axis=2)
            vd = da.concatenate([vp[1] for _, vp in kv_parts], axis=2)
            wait([qf] + [f for kp, vp in kv_parts for f in (kp[0], vp[0])])
            client.run(clear_transfer_logs)
            graph = ad.attention(qd, kd, vd, causal=p.causal)
            levels = graph_levels([graph])
            before = client.run(worker_snapshot)
            with get_task_stream(client) as ts:
                t0 = time.perf_counter()
                out = client.persist(graph)
                wait(out)
                wall = time.perf_counter() - t0
            after = client.run(worker_snapshot)
            cpu = task_cpu_by_prefix(before, after)
            compute_wall: Dict[str, List[float]] = {}
            for rec in ts.data:
                role = levels.get(str(rec["key"]), (-1, "other"))[1]
                for ss in rec["startstops"]:
                    if ss["action"] == "compute":
                        compute_wall.setdefault(role, []).append(ss["stop"] - ss["start"])
            transfers = transfer_summary(after, levels)
            got = stream_to_client(client, out)
            del out
        q, k, v = (numpy_input(p, t) for t in ("q", "k", "v"))
        attnfast.set_num_threads(2)
        print(f"  n = {n} workers: {p.label()}")
        check = compare(f"n={n} result", got, attnfast.attention(q, k, v, causal=p.causal))
        del q, k, v, got
        rows.append(report_c(n, p, cores, wall, level_table(levels), cpu, compute_wall, transfers, check))
    summarize_c(rows)
    return {"rows": rows}


def report_c(n, p, cores, wall, table, cpu, compute_wall, transfers, check) -> dict:
    blocks = sum(c for (d, role), c in table.items() if role.startswith("block"))
    merges = sum(c for (d, role), c in table.items() if role.startswith("merge"))
    block_cpu = sum(v for pre, v in cpu.items() if "block" in pre) / max(blocks, 1)
    merge_cpu = sum(v for pre, v in cpu.items() if "merge" in pre) / max(merges, 1)
    block_wall = mean([x for role, xs in compute_wall.items() if role.startswith("block") for x in xs])
    partial = partial_nbytes(p)
    q_bytes = p.nbytes("q")
    merge_levels = predicted_merges(n)
    print(f"    wall {fmt_s(wall)} ({fmt_s(wall * min(n, cores) / n)} scaled by cores/workers = {min(n, cores)}/{n}); "
          f"{blocks} block tasks: thread CPU {fmt_s(block_cpu)} each, compute wall {fmt_s(block_wall)} each; "
          f"{merges} merge tasks: thread CPU {fmt_s(merge_cpu)} each")
    formula = {0: ((n - 1) * q_bytes, "the query chunk to each of the n - 1 workers without it")}
    for level, m in enumerate(merge_levels, start=1):
        formula[level] = (m * partial, f"{m} partial state{'s' if m > 1 else ''} into merge level {level}")
    moved_by_depth: Dict[int, int] = {}
    for cls, (count, nbytes) in transfers["by_depth"].items():
        moved_by_depth[int(cls.split(":")[0])] = moved_by_depth.get(int(cls.split(":")[0]), 0) + nbytes
    print("    per depth: tasks (formula), bytes moved of what that depth produced (formula):")
    for depth in sorted(set(d for d, _ in table) | set(formula)):
        tasks = sum(c for (d, _), c in table.items() if d == depth)
        expect_tasks = {1: n}.get(depth, merge_levels[depth - 2] if 2 <= depth <= len(merge_levels) + 1 else None)
        expect_bytes = formula.get(depth, (0, "nothing: the root's result stays where it is"))
        print(f"      depth {depth}: {tasks} tasks" + (f" ({expect_tasks})" if expect_tasks is not None else "") +
              f"; moved {fmt_b(moved_by_depth.get(depth, 0))} ({fmt_b(expect_bytes[0])}: {expect_bytes[1]})")
    expected_total = sum(b for b, _ in formula.values())
    print(f"    total moved {fmt_b(transfers['total'])} (formula {fmt_b(expected_total)} = (n-1) x B*H*Lq*D x 4 B "
          f"+ (n-1) merges x B*H*Lq*(Dv+1) x 4 B); per worker received: "
          + ", ".join(fmt_b(x) for x in transfers["per_worker"].values()))
    # The worker that finishes the root receives one partial per level (and the queries, unless it
    # holds them): the most any worker should receive.
    bound = q_bytes + len(merge_levels) * partial if n > 1 else 0
    print(f"    most received by one worker: {fmt_b(max(transfers['per_worker'].values(), default=0))} (formula: at "
          f"most one query chunk + ceil(log2 n) = {len(merge_levels)} partials = {fmt_b(bound)})")
    unclassified = transfers["by_depth"].get("-1:other")
    if unclassified:
        print(f"    transfers of keys outside the graph: {unclassified[0]} keys, {fmt_b(unclassified[1])}")
    return {"workers": n, "problem": asdict(p), "wall_seconds": wall, "block_tasks": blocks, "merge_tasks": merges,
            "block_thread_cpu_seconds": block_cpu, "merge_thread_cpu_seconds": merge_cpu,
            "block_compute_wall_seconds": block_wall,
            "tasks_per_depth": [[d, role, c] for (d, role), c in table.items()], "cpu_by_prefix": cpu,
            "transfers": transfers, "formula_bytes": {d: b for d, (b, _) in formula.items()},
            "formula_total_bytes": expected_total, "formula_per_worker_bound": bound, "partial_bytes": partial,
            "check": check}


def summarize_c(rows):
    if not rows:
        return
    base = rows[0]["block_thread_cpu_seconds"]
    print("  weak scaling (work per worker fixed; thread CPU does not grow with oversubscription, wall does):")
    print("    workers  wall     wall x cores/workers  block CPU (x first)  moved total (formula)       most to one worker (bound)")
    for r in rows:
        n, cores = r["workers"], usable_cores()
        print(f"    {n:7d}  {fmt_s(r['wall_seconds']):8s} {fmt_s(r['wall_seconds'] * min(n, cores) / n):21s} "
              f"{fmt_s(r['block_thread_cpu_seconds'])} ({r['block_thread_cpu_seconds'] / base:.2f}x)"
              f"{'':6s} {fmt_b(r['transfers']['total'])} ({fmt_b(r['formula_total_bytes'])})"
              f"{'':6s} {fmt_b(max(r['transfers']['per_worker'].values(), default=0))} "
              f"({fmt_b(r['formula_per_worker_bound'])})")


# ------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=["a", "b", "c"],
                    help="run this case (repeatable; default: all three)")
    ap.add_argument("--quick", action="store_true", help="reduced sizes, < 2 minutes in total (a smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of case (a) (default 3, --quick 2)")
    ap.add_argument("--memory-limit", type=int, default=None, metavar="MIB",
                    help="case (b): each worker's memory_limit in MiB (default 0.9 x the bytes of K and V)")
    ap.add_argument("--length", type=int, metavar="L",
                    help="cases (a) and (b): Lq = Lk = L instead of 65536 (--quick: 16384)")
    ap.add_argument("--chunk", type=int, metavar="C",
                    help="cases (a) and (b): query and key chunks of C instead of 8192 (--quick: 4096, 2048)")
    ap.add_argument("--head-chunk", type=int, metavar="N",
                    help="cases (a) and (b): chunks of N heads (default: all heads in one chunk)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="case (c): worker counts (default 1 2 4 8)")
    ap.add_argument("--json", metavar="FILE", help="write the measurements to FILE")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.memory_limit is not None and args.memory_limit < 1:
        ap.error(f"--memory-limit must be >= 1 (MiB); got {args.memory_limit}")
    for name in ("length", "chunk"):
        value = getattr(args, name)
        if value is not None and (value < TILE or value % TILE):
            ap.error(f"--{name} must be a positive multiple of {TILE} (the rows of one generator seed); got {value}")
    if args.head_chunk is not None and args.head_chunk < 1:
        ap.error(f"--head-chunk must be >= 1; got {args.head_chunk}")
    if any(n < 1 for n in args.workers):
        ap.error(f"--workers must all be >= 1; got {args.workers}")
    return args


def sized(p: Problem, args) -> Problem:
    """The case's problem with --length / --chunk applied."""
    if args.length is not None:
        p = dataclasses.replace(p, Lq=args.length, Lk=args.length)
    if args.chunk is not None:
        p = dataclasses.replace(p, q_chunk=args.chunk, k_chunk=args.chunk)
    if args.head_chunk is not None:
        p = dataclasses.replace(p, h_chunk=args.head_chunk)
    return p


def main(argv=None):
    args = parse_args(argv)
    require_dask()
    cases = args.case or ["a", "b", "c"]
    repeats = args.repeats or (2 if args.quick else 3)
    start = time.perf_counter()
    result = {"machine": machine_header(), "quick": args.quick, "cases": {}}
    if "a" in cases:
        result["cases"]["a"] = case_a(sized(case_a_problem(args.quick), args), repeats)
    if "b" in cases:
        limit = None if args.memory_limit is None else args.memory_limit * MiB
        result["cases"]["b"] = case_b(sized(case_b_problem(args.quick), args), args.quick, limit)
    if "c" in cases:
        result["cases"]["c"] = case_c(args.quick, args.workers)
    result["seconds"] = time.perf_counter() - start
    print(f"\ntotal {fmt_s(result['seconds'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
