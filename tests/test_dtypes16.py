"""float16 and bfloat16 end to end: every public function x the dtype mixes x every SIMD target.

The contract (README, Numerics): arrays may be stored in float64, float32, float16 or
ml_dtypes.bfloat16; the result dtype is NumPy's promotion of the floating inputs, with float16 +
bfloat16 -> float32; the kernels compute in float32 (float64 when the result is float64), convert
16-bit values exactly on load and round once, on the final store; lse is float32 beside a 16-bit
result; out= may have any of the four dtypes. Values are held to the float64 reference on the same
16-bit inputs with the tolerance table of conftest.py (for 16-bit results: 2x the error of the
computation done in the 16-bit type as PyTorch's math SDPA does, plus one ulp of the data scale).
"""

import re

import ml_dtypes
import numpy as np
import pytest

import attnfast
from attnfast import _attnfast as _core
from attnfast import _inputs
from attnfast import reference as ref
from conftest import (BFLOAT16, FLOAT16, SIXTEEN_BIT, assert_close_fixed, assert_close_to_reference,
                      check_attention, method_weights, naive16_aggregate, naive16_scores, naive16_softmax,
                      naive_scores, naive_softmax, poisoned_kv, random_qkv, relayout, rounded_to,
                      scores_magnitude, sum_magnitude, up, weights64)

F16, BF16 = FLOAT16, BFLOAT16
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

# (q, k, v) storage dtypes of the grid: all-16-bit, a float32 decoder over a 16-bit cache, the pair NumPy
# cannot promote, and a float64 query (whose cache the Python layer widens to float64).
MIXES = {
    "f16": (F16, F16, F16),
    "bf16": (BF16, BF16, BF16),
    "f32q+bf16kv": (F32, BF16, BF16),
    "f16q+bf16kv": (F16, BF16, BF16),
    "f64q+bf16kv": (F64, BF16, BF16),
}


def exact(message):
    return re.escape(message)


def result_of(mix):
    return _inputs.result_dtype(*MIXES[mix])


def qkv16(rng, mix, batch, lq, lk, d, dv=None, kv_batch=None):
    return random_qkv(rng, MIXES[mix], batch, lq, lk, d, dv=dv, kv_batch=kv_batch)


# --------------------------------------------------------------------------
# Result dtypes (table-driven)
# --------------------------------------------------------------------------

# (q, k, v) -> result. Written out rather than derived, so the table checks the promotion helper.
RESULT_TABLE = [
    ((BF16, BF16, BF16), BF16),
    ((F16, F16, F16), F16),
    ((F32, BF16, BF16), F32),
    ((F32, F16, F16), F32),
    ((F16, BF16, BF16), F32),
    ((BF16, F16, F16), F32),
    ((BF16, BF16, F16), F32),
    ((BF16, F16, BF16), F32),
    ((F64, BF16, BF16), F64),
    ((BF16, F64, BF16), F64),
    ((F16, F32, F16), F32),
    ((F64, F16, F32), F64),
    ((F32, F32, F32), F32),
    ((F64, F64, F64), F64),
]


@pytest.mark.parametrize("dtypes,expected", RESULT_TABLE, ids=lambda x: str(x))
def test_result_dtype_of_every_mix(rng, dtypes, expected):
    dq, dk, dv = dtypes
    assert _inputs.result_dtype(*dtypes) == expected
    if not ({F16, BF16} <= set(dtypes)):  # NumPy (ml_dtypes) defines every other mix itself
        assert np.result_type(*dtypes) == expected
    lse_expected = F32 if expected in SIXTEEN_BIT else expected
    q = rng.standard_normal((2, 3, 4)).astype(dq)
    k = rng.standard_normal((2, 5, 4)).astype(dk)
    v = rng.standard_normal((2, 5, 4)).astype(dv)
    for impl in (attnfast, ref):
        out, lse, w = impl.attention(q, k, v, return_lse=True, return_weights=True)
        assert (out.dtype, lse.dtype, w.dtype) == (expected, lse_expected, expected)
        assert impl.attention(q, k, v).dtype == expected  # the plain fast path too
        assert impl.scores(q, k).dtype == _inputs.result_dtype(dq, dk)
        assert impl.aggregate(w.astype(dq), v).dtype == _inputs.result_dtype(dq, dv)
        assert impl.softmax(q).dtype == dq
        merged, merged_lse = impl.merge_states([out, out], [lse, lse])
        assert (merged.dtype, merged_lse.dtype) == (expected, lse_expected)


def test_merge_states_dtypes(rng):
    o16 = rng.standard_normal((3, 4)).astype(BF16)
    for impl in (attnfast, ref):
        # float32 lses (what attention returns beside 16-bit outs) keep 16-bit outs 16-bit ...
        assert [a.dtype for a in impl.merge_states([o16], [np.zeros(3, F32)])] == [BF16, F32]
        assert [a.dtype for a in impl.merge_states([o16], [np.zeros(3, BF16)])] == [BF16, F32]
        # ... float64 ones, or outs of two 16-bit types, promote as everywhere.
        assert [a.dtype for a in impl.merge_states([o16], [np.zeros(3, F64)])] == [F64, F64]
        assert [a.dtype for a in impl.merge_states([o16, o16.astype(F16)], [np.zeros(3, F32)] * 2)] == [F32, F32]


def test_empty_results_have_the_contract_dtypes():
    q = np.ones((2, 0, 4), BF16)
    for impl in (attnfast, ref):
        out, lse, w = impl.attention(q, np.ones((2, 5, 4), BF16), np.ones((2, 5, 3), BF16), return_lse=True,
                                     return_weights=True)
        assert (out.shape, out.dtype, lse.dtype, w.dtype) == ((2, 0, 3), BF16, F32, BF16)
        out, lse = impl.attention(np.ones((2, 3, 4), F16), np.ones((2, 0, 4), F16), np.ones((2, 0, 3), F16),
                                  return_lse=True)
        assert out.dtype == F16 and lse.dtype == F32 and np.all(lse == -np.inf) and np.all(out == 0)


# --------------------------------------------------------------------------
# attention: the grid
# --------------------------------------------------------------------------


def _attention_case(rng, mix, case):
    """(q, k, v, kwargs) for one grid case."""
    if case == "plain":
        q, k, v = qkv16(rng, mix, (2, 3), 7, 11, 8, dv=5)
        return q, k, v, {}
    if case == "causal_top_left":
        q, k, v = qkv16(rng, mix, (2,), 9, 9, 16)
        return q, k, v, {"causal": True}
    if case == "causal_bottom_right":
        q, k, v = qkv16(rng, mix, (2,), 5, 19, 16)
        return q, k, v, {"causal": True, "causal_align": "bottom_right"}
    if case == "window":
        q, k, v = qkv16(rng, mix, (2,), 13, 13, 8)
        return q, k, v, {"window": (3, 1)}
    if case == "kv_lengths":
        q, k, v = qkv16(rng, mix, (3,), 4, 17, 8)
        return q, k, v, {"kv_lengths": np.array([17, 6, 0])}
    if case == "mask_with_empty_rows":
        q, k, v = qkv16(rng, mix, (2,), 6, 10, 8)
        mask = rng.random((2, 6, 10)) < 0.6
        mask[:, 2] = False
        return q, k, v, {"mask": mask}
    if case == "bias":
        q, k, v = qkv16(rng, mix, (2,), 6, 10, 8)
        bias = rng.standard_normal((6, 10)).astype(MIXES[mix][1])  # 16-bit bias: converted exactly
        bias[1, ::3] = -np.inf
        return q, k, v, {"bias": bias}
    if case == "gqa":
        q, k, v = qkv16(rng, mix, (2, 4), 5, 9, 8, kv_batch=(2, 2))
        return q, k, v, {}
    if case == "strided":
        q, k, v = qkv16(rng, mix, (2,), 6, 9, 8)
        return relayout(q, "transposed"), relayout(k, "every_other_col"), relayout(v, "negative"), {}
    if case == "broadcast":
        q, k, v = qkv16(rng, mix, (3,), 4, 9, 8, kv_batch=(1,))
        return q, np.broadcast_to(k, (3, 9, 8)), v, {"causal": True}
    raise ValueError(case)


CASES = ["plain", "causal_top_left", "causal_bottom_right", "window", "kv_lengths", "mask_with_empty_rows",
         "bias", "gqa", "strided", "broadcast"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mix", list(MIXES))
def test_attention(isa, rng, mix, case):
    q, k, v, kw = _attention_case(rng, mix, case)
    # check_attention: out, lse (float32 for 16-bit results) and weights against the float64 reference,
    # rows with no visible key give out 0, lse -inf and weights 0, hidden keys weigh exactly 0.
    check_attention(q, k, v, dtype=result_of(mix), what=f"{mix} {case}", **kw)


@pytest.mark.parametrize("method", ["dot", "general", "concat", "additive"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_attention_methods(isa, rng, mix, method):
    q, k, v = qkv16(rng, mix, (2,), 6, 9, 8)
    kw = method_weights(rng, method, 8, 8, MIXES[mix][1].type)  # weights in the cache's dtype
    check_attention(q, k, v, dtype=result_of(mix), what=f"{mix} {method}", method=method, causal=True, **kw)


AWKWARD_D = [1, 3, 17, 63, 65, 97]
AWKWARD_L = [(1, 1), (2, 2), (97, 97), (1, 1025), (1025, 2), (2, 1025)]


@pytest.mark.parametrize("lq,lk", AWKWARD_L)
@pytest.mark.parametrize("d", AWKWARD_D)
@pytest.mark.parametrize("mix", ["bf16", "f16", "f32q+bf16kv"])
def test_attention_awkward_sizes(isa, rng, mix, d, lq, lk):
    q, k, v = qkv16(rng, mix, (), lq, lk, d)
    out = attnfast.attention(q, k, v, causal=lq > 1, causal_align="bottom_right")
    kw = {"causal": lq > 1, "causal_align": "bottom_right"}
    r_out = ref.attention(up(q), up(k), up(v), **kw)
    dtype = result_of(mix)
    naive = naive_attention_out(q, k, v, dtype, **kw)
    scale = None if dtype in SIXTEEN_BIT else float(np.max(np.abs(up(v))))  # as check_attention
    assert_close_to_reference(out, r_out, naive, dtype, scale=scale, what=f"D={d}")


def naive_attention_out(q, k, v, dtype, **kw):
    from conftest import naive_attention

    return naive_attention(q, k, v, rounded=dtype if dtype in SIXTEEN_BIT else None, **kw)[0]


def test_k_and_v_in_different_16_bit_dtypes(isa, rng):
    # No kernel reads k and v of two storage dtypes: both are widened to float32 (exactly).
    q = rng.standard_normal((2, 5, 8)).astype(BF16)
    k = rng.standard_normal((2, 7, 8)).astype(BF16)
    v = rng.standard_normal((2, 7, 8)).astype(F16)
    out = check_attention(q, k, v, dtype=F32, mask=rng.random((5, 7)) < 0.7)[0]
    assert np.array_equal(attnfast.attention(q, k, v), attnfast.attention(q, k, v.astype(F32)))
    assert out.dtype == F32


@pytest.mark.parametrize("mix", list(MIXES))
def test_plain_fast_path_agrees_with_the_validated_path(isa, rng, mix):
    q, k, v = qkv16(rng, mix, (2, 2), 9, 33, 16)
    plain = attnfast.attention(q, k, v, causal=True)
    # kv_lengths (all keys) takes the validating Python path to the same kernels.
    general = attnfast.attention(q, k, v, causal=True, kv_lengths=np.array(33))
    assert plain.dtype == general.dtype == result_of(mix)
    assert np.array_equal(plain, general, equal_nan=True)
    out = np.empty_like(plain)
    assert attnfast.attention(q, k, v, causal=True, out=out) is out
    assert np.array_equal(out, plain)


@pytest.mark.parametrize("mix", ["f16", "bf16", "f32q+bf16kv"])
def test_the_fast_path_takes_one_16_bit_cache_and_float32_or_same_type_queries(rng, mix):
    # The compiled core runs these calls itself (a decoder step over a 16-bit cache must not pay the
    # validating layer); the result has q's dtype, bitwise what the validated path gives.
    q, k, v = qkv16(rng, mix, (3, 2), 1, 50, 32)
    fast = _core.plain_attention(q, k, v, None, "scaled_dot", None, False, "top_left")
    assert fast is not None and fast.dtype == q.dtype == result_of(mix)
    assert np.array_equal(fast, attnfast.attention(q, k, v, kv_lengths=np.array(50)))


@pytest.mark.parametrize("mix", ["f16q+bf16kv", "f64q+bf16kv"])
def test_the_fast_path_leaves_other_mixes_to_the_validated_path(rng, mix):
    q, k, v = qkv16(rng, mix, (3, 2), 1, 50, 32)
    assert _core.plain_attention(q, k, v, None, "scaled_dot", None, False, "top_left") is None


# --------------------------------------------------------------------------
# out= of every dtype: the result is rounded once into it
# --------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [F64, F32, F16, BF16], ids=str)
@pytest.mark.parametrize("mix", list(MIXES))
def test_out_of_every_dtype(isa, rng, mix, out_dtype):
    q, k, v = qkv16(rng, mix, (2,), 6, 40, 8)
    kw = {"mask": rng.random((6, 40)) < 0.8}
    result = result_of(mix)
    compute = _inputs.compute_dtype(result)
    # The result in the computation dtype, as the kernel writes it ...
    wide = np.empty((2, 6, 8), compute)
    assert attnfast.attention(q, k, v, out=wide, **kw) is wide
    # ... and in any out= dtype that value rounded once: bitwise, also where the kernel itself writes
    # the 16-bit storage dtype (same value, same rounding) and through a strided out= (a copy).
    expected = _inputs.round_to(wide, out_dtype)
    out = np.full((2, 6, 8), 7, out_dtype)
    assert attnfast.attention(q, k, v, out=out, **kw) is out
    assert np.array_equal(out, expected)
    strided = np.full((2, 6, 16), 7, out_dtype)[..., ::2]
    out, lse = attnfast.attention(q, k, v, out=strided, return_lse=True, **kw)
    assert out is strided and np.array_equal(strided, expected) and lse.dtype == _inputs.lse_dtype(result)
    assert np.array_equal(attnfast.attention(q, k, v, **kw), _inputs.round_to(wide, result))
    # The reference rounds its float64 result once into out's dtype.
    r_out = np.empty((2, 6, 8), out_dtype)
    ref.attention(q, k, v, out=r_out, **kw)
    assert np.array_equal(r_out, _inputs.round_to(ref.attention(up(q), up(k), up(v), **kw), out_dtype))


def test_byte_swapped_float16_in_and_out(isa, rng):
    q, k, v = qkv16(rng, "f16", (2,), 5, 9, 8)
    expected = attnfast.attention(q, k, v)
    swapped = [x.astype(">f2") for x in (q, k, v)]
    for impl in (attnfast, ref):
        assert impl.attention(*swapped).dtype == F16
    assert np.array_equal(attnfast.attention(*swapped), expected)
    out = np.empty((2, 5, 8), ">f2")
    assert attnfast.attention(q, k, v, out=out) is out and np.array_equal(out, expected)
    out = np.empty((2, 5, 8), ">f4")  # another dtype and byte order: the float32 result as it is
    assert attnfast.attention(q, k, v, out=out) is out
    assert np.array_equal(out, attnfast.attention(q, k, v, out=np.empty((2, 5, 8), F32)))


def test_round_to_rounds_float64_to_bfloat16_once():
    # ml_dtypes' float64 -> bfloat16 goes through float32 and rounds twice; round_to must not.
    x = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 1 + 3 * 2**-8, 2.0**-133, 2.0**-134,
                  2.0**-134 + 2.0**-160, 3.5e38, -np.inf, np.nan, 0.0, -0.0, 3.3895313892515355e38, 1e-45])
    got = _inputs.round_to(x, BF16)
    # bfloat16's smallest subnormal is 2^-133: 2^-134 is a tie (to even: 0), anything above it rounds up.
    expected = [1 + 2**-7, -(1 + 2**-7), 1.0, 1 + 2**-6, 2.0**-133, 0.0, 2.0**-133, np.inf, -np.inf, np.nan,
                0.0, -0.0, 3.3895313892515355e38, 0.0]
    np.testing.assert_array_equal(got.astype(np.float64), expected)
    assert np.signbit(got.astype(np.float64)[11])
    # Random doubles against the nearest of their two bfloat16 neighbours (exact in float64), ties to even.
    r = np.random.default_rng(1)
    x = r.standard_normal(100_000) * 2.0 ** r.integers(-120, 125, 100_000)
    x[::7] = (r.integers(1, 2**8, x[::7].size) + 0.5) * 2.0 ** -7 * 2.0 ** r.integers(-20, 20, x[::7].size)
    got = _inputs.round_to(x, BF16).astype(np.float64)
    lo = _truncated_bf16(x)
    hi = _next_away_bf16(lo)
    nearest = np.where(np.abs(x - lo) < np.abs(hi - x), lo, hi)
    tie = np.abs(x - lo) == np.abs(hi - x)
    even = np.where((lo.astype(BF16).view(np.uint16) & 1) == 0, lo, hi)
    np.testing.assert_array_equal(got, np.where(tie, even, nearest))
    # Every float32 value agrees with ml_dtypes' (correct) float32 -> bfloat16 rounding.
    bits = np.random.default_rng(0).integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    f32 = bits.view(np.float32)
    f32 = f32[~np.isnan(f32)]  # NaN payloads (signalling ones warn when cast) are not a rounding question
    np.testing.assert_array_equal(_inputs.round_to(f32.astype(np.float64), BF16).view(np.uint16),
                                  f32.astype(BF16).view(np.uint16))


def _truncated_bf16(x):
    """x (float64, normal and finite in bfloat16) truncated toward zero to bfloat16, as float64."""
    bits = x.astype(np.float32).view(np.uint32)
    f32 = x.astype(np.float32).astype(np.float64)
    # float32 rounding may have gone away from zero: step back one float32 ulp first.
    bits = np.where(np.abs(f32) > np.abs(x), bits - 1, bits)
    return (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)


def _next_away_bf16(lo):
    """The bfloat16 neighbour of bfloat16 value ``lo`` (float64) one ulp further from zero."""
    bits = lo.astype(np.float32).view(np.uint32) + np.uint32(0x10000)
    return bits.view(np.float32).astype(np.float64)


# --------------------------------------------------------------------------
# Stage functions
# --------------------------------------------------------------------------


def _naive_scores_in(dtype, q, k, method, kw):
    if dtype in SIXTEEN_BIT:
        return naive16_scores(q, k, dtype, method=method, **kw)
    t = np.dtype(dtype)
    return naive_scores(q.astype(t), k.astype(t), method=method,
                        **{n: (t.type(x) if np.ndim(x) == 0 else np.asarray(x, t)) for n, x in kw.items()})


@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "concat", "additive"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_scores(isa, rng, mix, method):
    dq, dk, _ = MIXES[mix]
    q = rng.standard_normal((2, 7, 17)).astype(dq)
    k = rng.standard_normal((2, 9, 17)).astype(dk)
    kw = method_weights(rng, method, 17, 17, dk.type)
    dtype = _inputs.result_dtype(dq, dk)
    s = attnfast.scores(q, k, method=method, **kw)
    r = ref.scores(up(q), up(k), method=method, **weights64(kw))
    assert s.dtype == ref.scores(q, k, method=method, **kw).dtype == dtype
    naive = _naive_scores_in(dtype, q, k, method, kw)
    # A 16-bit result's error is its final rounding, relative to the result (max |ref|); a float32/64
    # one's is the sum's, relative to its terms.
    scale = None if dtype in SIXTEEN_BIT else scores_magnitude(q, k, method, **weights64(kw))
    assert_close_to_reference(s, r, naive, dtype, scale=scale, what=f"scores {method}")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_softmax(isa, rng, dtype, masked):
    x = (3 * rng.standard_normal((3, 5, 97))).astype(dtype)
    mask = None
    if masked:
        mask = rng.random((5, 97)) < 0.5
        mask[1] = False  # a fully masked row: zeros
    got = attnfast.softmax(x, mask=mask)
    assert got.dtype == dtype
    assert_close_to_reference(got, ref.softmax(up(x), mask=mask), naive16_softmax(x, dtype, mask=mask), dtype,
                              scale=1.0, what="softmax")
    if masked:
        assert np.all(got[:, 1] == 0) and np.all(got[:, ~mask] == 0)
    # Another axis, through a transposed view.
    got = attnfast.softmax(x, axis=1)
    assert_close_to_reference(got, ref.softmax(up(x), axis=1), naive16_softmax(x, dtype, axis=1), dtype,
                              scale=1.0, what="softmax axis=1")


@pytest.mark.parametrize("mix", list(MIXES))
def test_aggregate(isa, rng, mix):
    dw, _, dv = MIXES[mix]
    w = rng.random((2, 7, 65)).astype(dw)
    v = relayout(rng.standard_normal((2, 65, 17)).astype(dv), "F")
    dtype = _inputs.result_dtype(dw, dv)
    got = attnfast.aggregate(w, v)
    if dtype in SIXTEEN_BIT:
        naive = naive16_aggregate(w, v, dtype)
    else:
        naive = w.astype(dtype) @ v.astype(dtype)
    scale = None if dtype in SIXTEEN_BIT else sum_magnitude(w, v)  # as in test_scores
    assert_close_to_reference(got, ref.aggregate(up(w), up(v)), naive, dtype, scale=scale, what="aggregate")


@pytest.mark.parametrize("mix", list(MIXES))
def test_merge_states(isa, rng, mix):
    q, k, v = qkv16(rng, mix, (2,), 5, 30, 8)
    mask = rng.random((5, 30)) < 0.7
    mask[3, :10] = False  # row 3 is empty in the first part
    outs, lses = [], []
    for lo, hi in ((0, 10), (10, 30)):
        o, s = attnfast.attention(q, k[..., lo:hi, :], v[..., lo:hi, :], mask=mask[:, lo:hi], return_lse=True)
        outs.append(o)
        lses.append(s)
    dtype = result_of(mix)
    merged, lse = attnfast.merge_states(outs, lses)
    r_merged, r_lse = ref.merge_states(outs, lses)
    assert merged.dtype == r_merged.dtype == dtype and lse.dtype == r_lse.dtype == _inputs.lse_dtype(dtype)
    # The same value rounded once in each: at most one ulp apart.
    assert_close_fixed(merged, r_merged, dtype, scale=float(np.max(np.abs(up(v)))), what="merged out")
    assert_close_fixed(lse, r_lse, lse.dtype, what="merged lse")
    # And the merge is the attention over all keys, up to the parts' own rounding (one ulp each).
    full, full_lse = attnfast.attention(q, k, v, mask=mask, return_lse=True)
    assert_close_fixed(merged, full, dtype, scale=2 * float(np.max(np.abs(up(v)))), what="merged vs full")


# --------------------------------------------------------------------------
# Hidden keys: garbage in a 16-bit cache never reaches a visible row
# --------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mix", ["bf16", "f16", "f32q+bf16kv"])
def test_hidden_garbage_never_reaches_visible_rows(isa, rng, mix, garbage):
    q, k, v = qkv16(rng, mix, (2,), 6, 40, 16)
    lengths = np.array([25, 3])
    mask = np.ones((6, 40), bool)
    mask[:, 5] = False
    dirty_k, dirty_v = poisoned_kv(k, v, lengths, 5, garbage)  # key 5: masked
    for kw in ({"kv_lengths": lengths, "mask": mask}, {"kv_lengths": lengths, "mask": mask, "causal": True}):
        clean = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
        dirty = attnfast.attention(q, dirty_k, dirty_v, return_lse=True, return_weights=True, **kw)
        for c, d in zip(clean, dirty):
            assert np.array_equal(c, d), f"hidden {garbage} changed the result ({kw.keys()})"
        assert np.all(np.isfinite(up(dirty[0])))
        # The decode shape takes the row-wise kernel.
        clean1 = attnfast.attention(q[:, :1], k, v, kv_lengths=lengths, mask=mask[:1])
        assert np.array_equal(attnfast.attention(q[:, :1], dirty_k, dirty_v, kv_lengths=lengths, mask=mask[:1]),
                              clean1)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------

ACCEPTED_NOTE = ("It also takes float16 and ml_dtypes.bfloat16 arrays as they are (computed in float32): the "
                 "accepted dtypes are float64, float32, float16 or ml_dtypes.bfloat16.")

_UNSUPPORTED = [np.dtype(np.int8), np.dtype(np.complex64), np.dtype(object), np.dtype(ml_dtypes.float8_e4m3fn)]
if np.dtype(np.longdouble).itemsize > 8:
    _UNSUPPORTED.append(np.dtype(np.longdouble))


@pytest.mark.parametrize("bad", _UNSUPPORTED, ids=str)
@pytest.mark.parametrize("impl", [attnfast, ref], ids=["attnfast", "reference"])
def test_still_unsupported_dtypes(rng, impl, bad):
    x = np.ones((2, 3), bad)
    good = np.ones((4, 3), BF16)

    def message(name):
        return (f"attnfast computes in float32 or float64; {name} has dtype {bad}. Convert it with "
                f"{name}.astype(np.float32) (or np.float64). {ACCEPTED_NOTE}")

    if bad == np.int8:  # an int8 KV cache is accepted, with its scales
        with pytest.raises(TypeError, match=r"k is int8 but k_scale is None: an int8 cache needs its per-row scales"):
            impl.attention(good, x, x)
    else:
        with pytest.raises(TypeError, match=exact(message("k"))):
            impl.attention(good, x, x)
    for call, name in [(lambda: impl.attention(x, good, good), "q"),
                       (lambda: impl.scores(good, x), "k"), (lambda: impl.softmax(x), "x"),
                       (lambda: impl.aggregate(x, np.ones((3, 2), F16)), "weights"),
                       (lambda: impl.merge_states([x], [np.zeros(2)]), "outs[0]"),
                       (lambda: impl.merge_states([np.ones((2, 3))], [np.ones(2, bad)]), "lses[0]")]:
        with pytest.raises(TypeError, match=exact(message(name))):
            call()
    if bad.kind not in "iuf":  # integer and float bias convert to the computation dtype
        with pytest.raises(TypeError, match=exact(f"bias must be a real floating-point array; got dtype {bad}.")):
            impl.attention(good[:2], good, good, bias=np.ones((2, 4), bad))
    msg = (f"out has dtype {bad} but the result has dtype bfloat16 (the promoted dtype of q, k, v), and out= must "
           f"have one of the dtypes float64, float32, float16 or ml_dtypes.bfloat16 (the result is rounded once "
           f"into it). Allocate out with dtype=ml_dtypes.bfloat16.")
    out = np.ones((4, 3), bad)
    with pytest.raises(TypeError, match=exact(msg)):
        impl.attention(good, good, good, out=out)


def test_hints_spell_bfloat16_as_ml_dtypes(rng):
    q = np.ones((4, 3), BF16)
    msg = ("out has shape (4, 2) but the result has shape batch_shape + (Lq, Dv) = (4, 3). Allocate it with "
           "np.empty((4, 3), dtype=ml_dtypes.bfloat16).")
    with pytest.raises(ValueError, match=exact(msg)):
        attnfast.attention(q, q, q, out=np.empty((4, 2), BF16))
    # Weights convert to the computation dtype (float32 for 16-bit data), and the hint says so.
    with pytest.raises(TypeError, match=exact("Convert it with w.astype(np.float32).")):
        attnfast.scores(q, q, method="general", w=np.ones((3, 3), complex))


def test_16_bit_scale_and_weights_are_accepted(rng):
    q = rng.standard_normal((4, 8)).astype(BF16)
    expected = attnfast.attention(q, q, q, scale=0.5)
    assert np.array_equal(attnfast.attention(q, q, q, scale=ml_dtypes.bfloat16(0.5)), expected)
    assert np.array_equal(attnfast.attention(q, q, q, scale=np.array(0.5, BF16)), expected)
    a = _inputs.check_attention(q, q, q, method="general", w=np.eye(8, dtype=BF16), bias=np.zeros(4, F16))
    assert a.w.dtype == a.bias.dtype == F32 and a.q.dtype == BF16  # kept as stored, weights in float32


# --------------------------------------------------------------------------
# torch tensors (optional: skipped without torch; torch is never imported by attnfast)
# --------------------------------------------------------------------------

TORCH_HINT = ("{name} is a torch.Tensor of dtype torch.bfloat16, which NumPy cannot wrap. Pass "
              "{name}.view(torch.int16).numpy().view(ml_dtypes.bfloat16) (the same memory, no copy; call "
              ".detach().cpu() first for a tensor on a GPU or one that requires grad).")


@pytest.mark.parametrize("impl", [attnfast, ref], ids=["attnfast", "reference"])
def test_torch_bfloat16_tensors_get_a_how_to_message(impl):
    torch = pytest.importorskip("torch")
    t = torch.ones((4, 8), dtype=torch.bfloat16)
    n = np.ones((4, 8), BF16)
    for call, name in [(lambda: impl.attention(t, n, n), "q"), (lambda: impl.attention(n, t, n), "k"),
                       (lambda: impl.attention(n, n, t), "v"), (lambda: impl.scores(n, t), "k"),
                       (lambda: impl.softmax(t), "x"), (lambda: impl.aggregate(t[:, :4], n[:4]), "weights"),
                       (lambda: impl.attention(n, n, n, bias=t[:, :4]), "bias"),
                       (lambda: impl.attention(n, n, n, mask=t[:, :4]), "mask"),
                       (lambda: impl.merge_states([t], [n[:, 0]]), "outs[0]")]:
        with pytest.raises(TypeError, match=exact(TORCH_HINT.format(name=name))):
            call()
    # The hint works, and torch's float16/float32 tensors convert through np.asarray as they are.
    ok = impl.attention(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), n, n)
    assert ok.dtype == BF16 and np.array_equal(ok, impl.attention(n, n, n))
    for dt, npdt in ((torch.float16, F16), (torch.float32, F32)):
        assert impl.attention(torch.ones((4, 8), dtype=dt), n, n).dtype == _inputs.result_dtype(npdt, BF16)


def test_the_compiled_core_stores_what_the_python_layer_accepts():
    from attnfast import _attnfast as core

    assert list(core.storage_types()) == [d.name for d in _inputs.STORAGE_DTYPES]


def test_importing_attnfast_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, attnfast; bad = [m for m in ('torch', 'jax', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_16_bit_cache_is_kept_as_stored(rng):
    # Validation never widens or copies 16-bit arrays (the kernels convert them on load).
    q = rng.standard_normal((2, 3, 8)).astype(F32)
    k = rng.standard_normal((2, 9, 8)).astype(BF16)[:, ::-1]  # a view with negative strides
    v = rng.standard_normal((2, 9, 8)).astype(BF16)
    a = _inputs.check_attention(q, k, v)
    assert a.k is k and a.v is v and a.q is q and (a.dtype, a.compute) == (F32, F32)
    s = _inputs.check_scores(k, k)
    assert s.q is k and s.k is k and (s.dtype, s.compute) == (BF16, F32)


def test_16_bit_results_overflow_like_the_reference(isa, rng):
    # float16's range ends at 65504: scores beyond it are +-inf in the kernel as in the reference (both
    # round the finite float32/float64 value once), and large float16 logits still give an exact softmax.
    q = (300 * np.abs(rng.standard_normal((3, 64)))).astype(F16)
    s = attnfast.scores(q, q, method="dot")
    assert np.isinf(up(s)).any() and np.array_equal(s, ref.scores(q, q, method="dot"))
    x = np.array([[60000, 60000, -np.inf, 1]], F16)
    assert np.array_equal(attnfast.softmax(x), np.array([[0.5, 0.5, 0, 0]], F16))
