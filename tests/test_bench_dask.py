"""Smoke test of benchmarks/bench_dask.py: its inputs, its task-count formula and one small traffic run.

The benchmark's figures rest on three things checked here: the in-process run sees the same values as
the workers (whatever the chunking), the formula for tasks per merge level matches the graph that
attnfast.dask.attention builds, and the bytes it reads from distributed's transfer logs equal the
formula of docs/dask.md on a 2-worker LocalCluster (a few seconds). Skipped without Dask.
"""

import os
import sys

import numpy as np
import pytest

pytest.importorskip("dask.array")
pytest.importorskip("distributed")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import bench_dask  # noqa: E402

from bench_dask import Problem  # noqa: E402


def test_inputs_do_not_depend_on_the_chunking():
    a = Problem(1, 2, 4096, 3072, 8, 1024, 2048, causal=True)
    b = Problem(1, 2, 4096, 3072, 8, 4096, 1024, causal=True)
    for t in ("q", "k", "v"):
        on_workers = bench_dask.dask_input(a, t).compute(scheduler="sync")
        np.testing.assert_array_equal(on_workers, bench_dask.numpy_input(b, t))
        np.testing.assert_array_equal(on_workers, bench_dask.dask_input(b, t).compute(scheduler="sync"))
    q, k = bench_dask.numpy_input(a, "q"), bench_dask.numpy_input(a, "k")
    assert not np.array_equal(q[:, :, :3072], k)  # each tensor has its own values


def test_chunks_must_start_at_tiles():
    with pytest.raises(ValueError, match="multiples of 1024; got row 512"):
        bench_dask.chunk_values("q", 512, (1, 1, 512, 4), "float32")


@pytest.mark.parametrize("causal, lq, lk, qc, kc", [
    (True, 8192, 8192, 1024, 1024),   # 8 query chunks seeing 1..8 key chunks: odd and even trees
    (True, 6144, 6144, 2048, 1024),   # query chunks of two key chunks each
    (False, 1024, 7168, 1024, 1024),  # one query chunk, 7 key chunks: levels of 3, 2, 1 merges
])
def test_task_counts_per_level_match_the_formula(causal, lq, lk, qc, kc):
    import attnfast.dask as ad

    p = Problem(1, 2, lq, lk, 8, qc, kc, causal=causal)
    graph = ad.attention(*(bench_dask.dask_input(p, t) for t in ("q", "k", "v")), causal=causal)
    table = bench_dask.level_table(bench_dask.graph_levels([graph]))
    per_depth = {}
    for (depth, _), n in table.items():
        if depth > 0:
            per_depth[depth] = per_depth.get(depth, 0) + n
    assert per_depth == bench_dask.predicted_levels(p)


def test_predicted_merges():
    assert bench_dask.predicted_merges(1) == []
    assert bench_dask.predicted_merges(7) == [3, 2, 1]
    assert bench_dask.predicted_merges(8) == [4, 2, 1]
    assert sum(bench_dask.predicted_merges(13)) == 12  # n parts always take n - 1 pairwise merges


def test_measured_traffic_equals_the_formula(capsys):
    def tiny(n, quick):
        return Problem(1, 2, 1024, n * 1024, 16, 1024, 1024, causal=False)

    (row,) = bench_dask.case_c(True, [2], problem=tiny)["rows"]
    p = tiny(2, True)
    assert row["block_tasks"] == 2 and row["merge_tasks"] == 1
    assert row["formula_total_bytes"] == p.nbytes("q") + 1 * 2 * 1024 * 17 * 4
    # distributed counts a partial state, a tuple (out, lse), with the tuple's few dozen bytes
    moved = row["transfers"]
    keys = sum(count for count, _ in moved["by_depth"].values())
    assert keys == 2  # the query chunk and one partial state
    assert 0 <= moved["total"] - row["formula_total_bytes"] <= 64 * keys
    assert row["check"]["max_abs_diff"] < 1e-5
    assert "total moved" in capsys.readouterr().out
