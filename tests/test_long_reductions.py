"""Accuracy of long reductions: softmax rows, aggregate over Lk, dot products over D.

Every kernel sums long runs of terms as a tree of short chains (see README, Numerics): the
stage softmax adds blocks of 1024 entries pairwise, the GEMM microkernel (scores, aggregate, the
tiled attention's Q.K^T) cuts depths beyond 512 into pieces of 512^j terms, the row-wise
attention's dot cuts D beyond 1024 features the same way. A single running sum instead loses
accuracy in proportion to its length: for terms of one sign its rounding errors all push the same
way (each add rounds relative to the whole partial sum), so a float32 row of 16M softmax terms
drifted by up to 3% and an aggregate over 1M keys by ~6e-5.

The bounds asserted here, and why:

* Same-sign sums (softmax row sums, aggregate of positive values, scores of positive vectors):
  relative error <= eps * log2(n). The tree's worst case is about
  (block + block + ...) eps = block * ceil(log_block n) eps, but its rounding errors are
  independent and of both signs, so they grow like sqrt(block) per level and average out over
  the blocks; measured: <= 0.13 eps log2(n) on every target. One chain reaches 4-23 eps log2(n)
  on these sizes (and grows linearly in n), so the bound separates the two by a wide margin.
* The fused attention at a long D, where the scores' errors reach the output through the
  softmax: NAIVE_FACTOR (the tolerance table's) times the error of the same computation in plain
  float32 NumPy (blocked BLAS products, pairwise sums), plus the few ulp the kernel's exp and
  reciprocal may add (see the test). Over a long Lk, the table's rule as is.

Sizes are awkward on purpose (a tail past the last whole block, vector and microkernel tiles)
and the inputs are built once per module: the whole file runs in a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnfast
from attnfast import reference as ref

from conftest import (NAIVE_FACTOR, assert_close_to_reference, check_attention, naive_attention, naive_scores,
                      naive_softmax, ref_attention64, scores_magnitude, sum_magnitude, up)

DTYPES = [np.float32, np.float64]


def eps(dtype):
    return float(np.finfo(dtype).eps)


def max_relative_error(actual, expected64):
    expected64 = np.asarray(expected64, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(actual, dtype=np.float64) - expected64) / np.abs(expected64)))


def assert_log_bound(err, n, dtype, what):
    bound = eps(dtype) * np.log2(n)
    assert err <= bound, f"{what}: relative error {err:.3e} > eps * log2({n}) = {bound:.3e}"


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_logits():
    rng = np.random.default_rng(20)
    return (rng.standard_normal((2, (1 << 20) + 5)) * 2).astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_long_rows_sum_to_one(isa, long_logits, dtype):
    # Each output is e_j * (1 / S) with S the kernel's own sum of its e_j, so sum_j out_j - 1 is the
    # relative error of S (plus one rounding of 1 / S and averaging roundings of the products).
    x = long_logits.astype(dtype)
    got = attnfast.softmax(x)
    assert got.dtype == np.dtype(dtype)
    n = x.shape[-1]
    row_sums = np.sum(got.astype(np.float64), axis=-1)
    assert_log_bound(float(np.max(np.abs(row_sums - 1.0))), n, dtype, "softmax row sum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_long_rows_match_the_reference(isa, long_logits, dtype):
    x = long_logits.astype(dtype)
    expected = ref.softmax(up(x))
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    naive = e / e.sum(axis=-1, keepdims=True)  # np.sum is pairwise along a contiguous axis
    assert_close_to_reference(attnfast.softmax(x), expected, naive, dtype, what="softmax n = 2^20 + 5")


def test_softmax_16m_row_sums_to_one(isa):
    # 16M float32 terms (64 MiB), once per target: a per-lane running sum drifted here by 57 eps (16
    # lanes), 800 eps (8 lanes) and 4e-2 (one lane).
    x = np.random.default_rng(21).standard_normal((1, 1 << 24), dtype=np.float32)
    total = float(np.sum(attnfast.softmax(x), dtype=np.float64))
    assert_log_bound(abs(total - 1.0), x.shape[-1], np.float32, "softmax row sum, n = 2^24")


def test_softmax_long_masked_row(isa):
    # The buffered path (mask, strided axis) sums the same way.
    rng = np.random.default_rng(22)
    n = (1 << 20) + 3
    x = rng.standard_normal((n, 1)).astype(np.float32)
    mask = rng.random((n, 1)) < 0.75
    got = attnfast.softmax(x, axis=0, mask=mask)
    assert np.all(got[~mask] == 0)
    assert_log_bound(abs(float(np.sum(got, dtype=np.float64)) - 1.0), n, np.float32, "masked softmax row sum")


# --------------------------------------------------------------------------
# aggregate over Lk
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_aggregate_inputs():
    rng = np.random.default_rng(23)
    lk = (1 << 20) + 3
    w = rng.random((1, 2, lk))
    w /= w.sum(axis=-1, keepdims=True)
    v = rng.uniform(0.5, 1.5, (1, lk, 3))  # positive: no cancellation hides the drift of a chain
    return w, v


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_long_lk(isa, long_aggregate_inputs, dtype):
    w, v = (a.astype(dtype) for a in long_aggregate_inputs)
    got = attnfast.aggregate(w, v)
    assert got.dtype == np.dtype(dtype)
    err = max_relative_error(got, ref.aggregate(up(w), up(v)))
    assert_log_bound(err, w.shape[-1], dtype, "aggregate over Lk = 2^20 + 3")


# --------------------------------------------------------------------------
# scores over D
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_depth_qk():
    rng = np.random.default_rng(24)
    d = 65536 + 17
    return rng.random((2, 5, d)), rng.random((2, 3, d))  # positive, as above


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dot", "scaled_dot"])
def test_scores_long_depth(isa, long_depth_qk, dtype, method):
    q, k = (a.astype(dtype) for a in long_depth_qk)
    got = attnfast.scores(q, k, method=method)
    err = max_relative_error(got, ref.scores(up(q), up(k), method=method))
    assert_log_bound(err, q.shape[-1], dtype, f"scores ({method}) over D = 65553")


# --------------------------------------------------------------------------
# fused attention
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_depth_attention_case():
    """Inputs, float64 reference and naive float32 output (computed once: the reference is slow)."""
    rng = np.random.default_rng(25)
    d = 8192
    q = rng.standard_normal((1, 2, 48, d)).astype(np.float32)
    k = rng.standard_normal((1, 2, 97, d)).astype(np.float32)
    v = rng.standard_normal((1, 2, 97, 5)).astype(np.float32)
    return q, k, v, ref_attention64(q, k, v)[0], naive_attention(q, k, v)[0]


@pytest.mark.parametrize("rows", [48, 3], ids=["tiled", "rowwise"])
def test_attention_long_depth(isa, long_depth_attention_case, rows):
    # 48 query rows per head run the tiled kernel (Q.K^T through the microkernel), 3 the row-wise one.
    # Bound: NAIVE_FACTOR times the plain float32 NumPy error, plus 3 eps max|v| (not the table's FLOOR
    # of ~8 eps, which would hide the defect): the kernel's exp2 (<= 1.6 ulp) and its multiply by
    # 1 / sum (<= 1.5 ulp) may cost each weight ~3 ulp more than NumPy's exp and division, which reach
    # the output (a convex combination of the rows of v) as at most ~3 eps max|v|. A single chain over
    # D = 8192 measured 5.4-5.8 eps max|v| on the tiled path against 0.6-1.0 blocked, bound ~4.2.
    q, k, v, expected, naive = long_depth_attention_case
    got = attnfast.attention(q[:, :, :rows], k, v)
    expected, naive = expected[:, :, :rows], naive[:, :, :rows]
    v_max = float(np.abs(v).max())
    err = float(np.max(np.abs(got - expected)))
    bound = NAIVE_FACTOR * float(np.max(np.abs(naive - expected))) + 3 * eps(np.float32) * v_max
    assert err <= bound, f"attention D = 8192 ({rows} rows): max error {err:.3e} > {bound:.3e}"


@pytest.fixture(scope="module", params=[(1, (1 << 20) + 7), (48, (1 << 18) + 7)], ids=["rowwise", "tiled"])
def long_lk_attention_case(request):
    rows, lk = request.param
    rng = np.random.default_rng(26)
    q = rng.standard_normal((1, rows, 8)).astype(np.float32)
    k = rng.standard_normal((1, lk, 8)).astype(np.float32)
    v = rng.standard_normal((1, lk, 3)).astype(np.float32)
    return q, k, v, ref_attention64(q, k, v)[0], naive_attention(q, k, v)[0]


def test_attention_long_lk_stays_accurate(isa, long_lk_attention_case):
    # The fused kernels' sums over keys are blocked by key tiles (and key chunks merged by log-sum-exp):
    # a guard that they stay as accurate as the naive float32 computation for a long Lk.
    q, k, v, expected, naive = long_lk_attention_case
    got = attnfast.attention(q, k, v)
    assert_close_to_reference(got, expected, naive, np.float32, scale=float(np.abs(v).max()),
                              what=f"attention Lk = {k.shape[-2]}")


# --------------------------------------------------------------------------
# additive scores over a long hidden size
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_hidden_inputs():
    rng = np.random.default_rng(27)
    hidden = 65536 + 17
    # Already projected queries and keys (w_q = w_k = None): tanh(q + k) in [0.46, 0.76] and v_a > 0, so
    # every term is positive, as above.
    q = rng.uniform(0.25, 0.5, (1, 48, hidden))
    k = rng.uniform(0.25, 0.5, (1, 5, hidden))
    v_a = rng.uniform(0.5, 1.5, hidden)
    return q, k, v_a


def tanh_log_bound(n, dtype):
    # eps * log2(n) for the sum (as above) plus 4 eps: the vectorised tanh is within 3.3 ulp per term in
    # float32 (~1 ulp in float64), which a sum of positive terms can carry over to its total.
    return eps(dtype) * (np.log2(n) + 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_additive_scores_long_hidden(isa, long_hidden_inputs, dtype):
    q, k, v_a = (a.astype(dtype) for a in long_hidden_inputs)
    got = attnfast.scores(q[:, :3], k, method="additive", v_a=v_a)
    err = max_relative_error(got, ref.scores(up(q[:, :3]), up(k), method="additive", v_a=up(v_a)))
    bound = tanh_log_bound(q.shape[-1], dtype)
    assert err <= bound, f"additive scores over hidden = 65553: relative error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("rows", [48, 3], ids=["tiled", "rowwise"])
def test_additive_attention_long_hidden(isa, long_hidden_inputs, rows):
    # lse = log sum_j exp(s_j) moves by at most max_j |error of s_j|: bounded by the scores' relative
    # bound times max s.
    q, k, v_a = (a.astype(np.float32) for a in long_hidden_inputs)
    q = q[:, :rows]
    v = np.random.default_rng(28).standard_normal((1, k.shape[1], 3)).astype(np.float32)
    _, lse = attnfast.attention(q, k, v, method="additive", v_a=v_a, return_lse=True)
    _, expected_lse, _ = ref_attention64(q, k, v, method="additive", v_a=v_a)
    s_max = float(np.max(ref.scores(up(q), up(k), method="additive", v_a=up(v_a))))
    err = float(np.max(np.abs(lse - expected_lse)))
    bound = tanh_log_bound(q.shape[-1], np.float32) * s_max
    assert err <= bound, f"additive attention lse over hidden = 65553 ({rows} rows): error {err:.3e} > {bound:.3e}"


# --------------------------------------------------------------------------
# the blocking depends on the shape only
# --------------------------------------------------------------------------


def test_long_reductions_do_not_depend_on_the_thread_count(isa, threads, long_depth_qk, long_aggregate_inputs):
    q, k = (a.astype(np.float32) for a in long_depth_qk)
    lk = (1 << 17) + 3
    w, v = long_aggregate_inputs[0][:, :, :lk].astype(np.float32), long_aggregate_inputs[1][:, :lk].astype(np.float32)
    x = np.random.default_rng(29).standard_normal((3, (1 << 18) + 1)).astype(np.float32)
    values = np.random.default_rng(30).standard_normal((2, 3, 5)).astype(np.float32)
    results = []
    for n in (1, 2):
        attnfast.set_num_threads(n)
        results.append((attnfast.scores(q, k), attnfast.aggregate(w, v), attnfast.softmax(x),
                        attnfast.attention(q[:, :, :8192], k[:, :, :8192], values)))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


# --------------------------------------------------------------------------
# block boundaries: lengths just below, at and above a block (512 terms per chain in the microkernel,
# 1024 elements in the vectorised sums and the softmax), held to the tolerance table like every other
# stage test. (Above a microkernel block squared, 2^18: the long aggregate test above, 2^20 + 3.)
# --------------------------------------------------------------------------

EDGE_LENGTHS = [255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2049, 4097]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_block_edges_scores_and_aggregate(isa, rng, dtype, n):
    q = rng.standard_normal((2, 13, n)).astype(dtype)
    k = rng.standard_normal((2, 35, n)).astype(dtype)
    assert_close_to_reference(attnfast.scores(q, k), ref.scores(up(q), up(k)), naive_scores(q, k), dtype,
                              scale=scores_magnitude(q, k), what=f"scores D = {n}")
    w = rng.random((2, 13, n)).astype(dtype)
    v = rng.standard_normal((2, n, 35)).astype(dtype)
    assert_close_to_reference(attnfast.aggregate(w, v), ref.aggregate(up(w), up(v)), (w @ v).astype(dtype), dtype,
                              scale=sum_magnitude(w, v), what=f"aggregate Lk = {n}")


@pytest.mark.parametrize("n", EDGE_LENGTHS)
def test_block_edges_softmax(isa, rng, n):
    x = (rng.standard_normal((3, n)) * 3).astype(np.float32)
    assert_close_to_reference(attnfast.softmax(x), ref.softmax(up(x)), naive_softmax(x), np.float32,
                              what=f"softmax n = {n}")


@pytest.mark.parametrize("n", [1023, 1024, 1025, 4097])
@pytest.mark.parametrize("rows", [48, 2], ids=["tiled", "rowwise"])
def test_block_edges_attention(isa, rng, n, rows):
    q = rng.standard_normal((2, rows, n)).astype(np.float32)
    k = rng.standard_normal((2, 19, n)).astype(np.float32)
    v = rng.standard_normal((2, 19, 3)).astype(np.float32)
    check_attention(q, k, v, dtype=np.float32, what=f"attention D = {n}")


# --------------------------------------------------------------------------
# merge_states over many parts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_states_many_parts(dtype):
    # 65539 split-KV parts of one sign: the sums over the parts (of exp(lse_i - m), and of the weighted
    # outs) are trees, so the merged out and lse stay within eps * log2(n) of the exact merge. NumPy's
    # reduction over a stacked axis adds one part at a time: ~700 eps on this float32 input.
    rng = np.random.default_rng(21)
    n = (1 << 16) + 3
    outs = [(1.0 + 0.1 * rng.random((2, 3))).astype(dtype) for _ in range(n)]
    lses = [(3.0 + 0.01 * rng.random(2)).astype(dtype) for _ in range(n)]
    out, lse = attnfast.merge_states(outs, lses)
    # The exact merge in x87 extended precision (64-bit significand): float64's own sums over 65539
    # parts would be off by more than the float64 bound.
    o_x, l_x = np.stack(outs).astype(np.longdouble), np.stack(lses).astype(np.longdouble)
    m = l_x.max(axis=0)
    e = np.exp(l_x - m)
    exact_out = ((e[..., None] * o_x).sum(axis=0) / e.sum(axis=0)[:, None]).astype(np.float64)
    exact_lse = (m + np.log(e.sum(axis=0))).astype(np.float64)
    assert_log_bound(max_relative_error(out, exact_out), n, dtype, "merged out")
    assert_log_bound(max_relative_error(lse, exact_lse), n, dtype, "merged lse")
