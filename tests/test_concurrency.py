"""Concurrency and determinism: the GIL is released during compute, concurrent callers get the same
answers as serial ones, results do not depend on the thread count, and attnfast coexists with other
thread pools (NumPy's BLAS, a ThreadPoolExecutor, PyTorch when installed) without deadlock.

No test here measures speed: progress and equality are asserted, never durations.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading

import numpy as np
import pytest

import attnfast


@pytest.fixture
def one_kernel_thread():
    attnfast.set_num_threads(1)
    yield
    attnfast.set_num_threads(0)


def _problem(seed: int, lq: int = 300, lk: int = 700, d: int = 64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, lq, d)).astype(np.float32)
    k = rng.standard_normal((2, 2, lk, d)).astype(np.float32)
    v = rng.standard_normal((2, 2, lk, d)).astype(np.float32)
    return q, k, v


def test_gil_is_released_during_compute(one_kernel_thread):
    # A pure-Python worker records, at every step, whether the main thread is inside attnfast. With a
    # long switch interval the interpreter never hands the GIL over between bytecodes, so the worker
    # can only run while the main thread has released the GIL: if the kernel held it, no step could
    # ever see the flag set.
    q, k, v = _problem(0, lq=512, lk=1024)
    state = {"in_call": False, "stop": False}
    seen_in_call = []

    def python_worker():
        while not state["stop"]:
            if state["in_call"]:
                seen_in_call.append(1)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(2.0)
    worker = threading.Thread(target=python_worker)
    try:
        worker.start()
        for _ in range(10):
            state["in_call"] = True
            attnfast.attention(q, k, v)
            state["in_call"] = False
            if seen_in_call:
                break
    finally:
        state["stop"] = True
        sys.setswitchinterval(old_interval)
        worker.join()
    assert seen_in_call, "no Python bytecode ran while attnfast was computing: the GIL was held"


def test_concurrent_callers_match_serial(one_kernel_thread):
    problems = [_problem(seed, lq=97, lk=130) for seed in range(8)]
    serial = [attnfast.attention(*p, causal=True, return_lse=True) for p in problems]

    def call(i):
        return attnfast.attention(*problems[i % 8], causal=True, return_lse=True)

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(32)))
    for i, (out, lse) in enumerate(results):
        assert np.array_equal(out, serial[i % 8][0])
        assert np.array_equal(lse, serial[i % 8][1])


def test_concurrent_stage_calls_match_serial():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 50, 70)).astype(np.float32)
    v = rng.standard_normal((4, 70, 9)).astype(np.float32)
    expected = attnfast.aggregate(attnfast.softmax(x), v)
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: attnfast.aggregate(attnfast.softmax(x), v), range(16)))
    assert all(np.array_equal(r, expected) for r in results)


@pytest.mark.parametrize("shape", [(2, 4, 300, 700, 64), (1, 2, 1, 5000, 64), (3, 8, 1, 50, 32)])
def test_results_identical_across_thread_counts_and_runs(shape):
    b, h, lq, lk, d = shape
    rng = np.random.default_rng(2)
    q = rng.standard_normal((b, h, lq, d)).astype(np.float32)
    k = rng.standard_normal((b, h, lk, d)).astype(np.float32)
    v = rng.standard_normal((b, h, lk, d)).astype(np.float32)
    results = []
    try:
        for threads in (1, 2, 3, 1):
            attnfast.set_num_threads(threads)
            results.append(attnfast.attention(q, k, v, return_lse=True))
    finally:
        attnfast.set_num_threads(0)
    for out, lse in results[1:]:
        assert np.array_equal(out, results[0][0]) and np.array_equal(lse, results[0][1])


def test_inside_thread_pool_with_blas_busy():
    # attnfast called from pool threads while NumPy's BLAS runs matmuls in other threads: everything
    # finishes (the executor's timeout turns a deadlock into a failure) with the serial answers.
    q, k, v = _problem(3, lq=64, lk=200)
    expected = attnfast.attention(q, k, v)
    a = np.random.default_rng(4).standard_normal((300, 300))

    def mixed(i):
        if i % 2:
            return np.array_equal(attnfast.attention(q, k, v), expected)
        return bool(np.isfinite(a @ a).all())

    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(mixed, i) for i in range(24)]
        assert all(f.result(timeout=120) for f in futures)


def test_with_torch_thread_pool_loaded():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional peer")
    q, k, v = _problem(5, lq=64, lk=200)
    expected = attnfast.attention(q, k, v)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def both(_):
        torch.nn.functional.scaled_dot_product_attention(tq, tk.repeat_interleave(2, 1), tv.repeat_interleave(2, 1))
        return np.array_equal(attnfast.attention(q, k, v), expected)

    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        assert all(f.result(timeout=120) for f in [pool.submit(both, i) for i in range(9)])


def test_threadpoolctl_limits_attnfast():
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="installed by the test extra")
    before = attnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(1):
        assert attnfast.get_num_threads() == 1
    assert attnfast.get_num_threads() == before


def test_set_num_threads_validates_and_restores():
    with pytest.raises(TypeError, match="set_num_threads expects an int, got float"):
        attnfast.set_num_threads(1.5)
    attnfast.set_num_threads(1)
    try:
        assert attnfast.get_num_threads() == 1
    finally:
        attnfast.set_num_threads(0)
    assert attnfast.get_num_threads() >= 1
