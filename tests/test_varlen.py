"""attention_varlen: packed variable-length sequences equal one attention call per sequence.

What the kernel guarantees for a packed batch (and what these tests hold it to): a sequence's result
depends on its own query rows, keys and values only. No key of another sequence is read (each item's
keys are bounded by its kv_lengths, which the kernels never read past), no query row of another
sequence is read and no output or lse row outside the sequence is written (q_lengths). The tests
poison every other sequence's q, k and v with NaN and require the sequence's rows bitwise unchanged.
"""

import numpy as np
import pytest

import attnfast
from attnfast import _inputs, reference

from conftest import (BFLOAT16, SIXTEEN_BIT, assert_close_fixed, assert_close_to_reference, naive_attention,
                      ref_attention64)


def cumulative(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def packed(rng, lengths_q, lengths_k, lead_q, lead_kv, d, dv, dtype):
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    q = rng.standard_normal(lead_q + (int(cu_q[-1]), d)).astype(dtype)
    k = rng.standard_normal(lead_kv + (int(cu_k[-1]), d)).astype(dtype)
    v = rng.standard_normal(lead_kv + (int(cu_k[-1]), dv)).astype(dtype)
    return q, k, v, cu_q, cu_k


def per_sequence(q, k, v, cu_q, cu_k, dtype, **kw):
    """The float64 reference and the naive same-precision computation, one attention per sequence:
    ((out64, lse64), (out_naive, lse_naive)), each (..., Tq, Dv) / (..., Tq)."""
    batch = _inputs.check_attention(q, k, v).batch_shape
    tq, dv = q.shape[-2], v.shape[-1]
    ref_o, ref_l = np.zeros(batch + (tq, dv)), np.full(batch + (tq,), -np.inf)
    nai_o, nai_l = np.zeros(batch + (tq, dv)), np.full(batch + (tq,), -np.inf)
    for s in range(cu_q.size - 1):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        args = (q[..., rows, :], k[..., keys, :], v[..., keys, :])
        o, lse, _ = ref_attention64(*args, **kw)
        ref_o[..., rows, :], ref_l[..., rows] = o, lse
        n_o, n_l, _ = naive_attention(*args, **kw)
        if np.dtype(dtype) in SIXTEEN_BIT:
            n_o = naive_attention(*args, rounded=dtype, **kw)[0]
        nai_o[..., rows, :], nai_l[..., rows] = n_o, n_l
    return (ref_o, ref_l), (nai_o, nai_l)


def check_varlen(q, k, v, cu_q, cu_k, dtype, **kw):
    out, lse = attnfast.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    (r_o, r_l), (n_o, n_l) = per_sequence(q, k, v, cu_q, cu_k, dtype, **kw)
    scale = None if np.dtype(dtype) in SIXTEEN_BIT else float(np.max(np.abs(v.astype(np.float64)), initial=0)) or 1.0
    assert_close_to_reference(out, r_o, n_o, dtype, scale=scale, what="varlen out")
    assert_close_to_reference(lse, r_l, n_l, _inputs.lse_dtype(np.dtype(dtype)), what="varlen lse")
    empty = r_l == -np.inf
    assert np.all(lse[empty] == -np.inf) and np.all(out[empty] == 0)
    # The reference's own varlen agrees with the per-sequence loop.
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    assert ref_out.dtype == out.dtype and ref_lse.dtype == lse.dtype
    assert_close_fixed(ref_out, r_o, dtype, what="reference.attention_varlen out")
    return out, lse


# Lengths 0 and 1, a sequence with queries but no keys and one with keys but no queries, sizes around
# the tiled path's 48-row blocks and 64-key tiles, and decode-like rows next to long prefills.
LENGTHS = [
    ([3, 0, 5, 1, 40, 97, 1], [3, 2, 7, 0, 40, 130, 65]),
    ([1, 1, 2, 1, 4], [50, 1025, 7, 1, 3]),
    ([49, 0, 96, 200], [49, 0, 97, 200]),
]


@pytest.mark.parametrize("lengths_q, lengths_k", LENGTHS)
@pytest.mark.parametrize("causal, align", [(False, "top_left"), (True, "top_left"), (True, "bottom_right")])
def test_matches_per_sequence_attention(isa, rng, lengths_q, lengths_k, causal, align):
    q, k, v, cu_q, cu_k = packed(rng, lengths_q, lengths_k, (4,), (2,), 17, 9, np.float32)  # GQA 4:2
    check_varlen(q, k, v, cu_q, cu_k, np.float32, causal=causal, causal_align=align)


@pytest.mark.parametrize("window", [(3, 1), (None, 0), (0, None), (10, 10)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_windows(isa, rng, window, align):
    q, k, v, cu_q, cu_k = packed(rng, *LENGTHS[0], (2,), (2,), 8, 8, np.float32)
    check_varlen(q, k, v, cu_q, cu_k, np.float32, window=window, causal_align=align)
    check_varlen(q, k, v, cu_q, cu_k, np.float32, window=window, causal=True, causal_align=align)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, BFLOAT16])
def test_dtypes(isa, rng, dtype):
    q, k, v, cu_q, cu_k = packed(rng, *LENGTHS[2], (2,), (1,), 64, 64, dtype)  # MQA
    out, lse = check_varlen(q, k, v, cu_q, cu_k, dtype, causal=True)
    assert out.dtype == np.dtype(dtype)


@pytest.mark.parametrize("d", [1, 3, 63, 65])
@pytest.mark.parametrize("method, scale", [("dot", None), ("scaled_dot", None), ("scaled_dot", 0.3), ("dot", 2.0)])
def test_depths_and_scores(isa, rng, d, method, scale):
    q, k, v, cu_q, cu_k = packed(rng, [2, 50, 1], [9, 50, 3], (3,), (3,), d, 5, np.float32)
    check_varlen(q, k, v, cu_q, cu_k, np.float32, method=method, scale=scale, causal=True)


@pytest.mark.parametrize("lead_q, lead_kv, batch", [((), (), ()), ((2, 4), (2, 2), (2, 4)), ((2, 4), (1, 4), (2, 4)),
                                                    ((6,), (1,), (6,))])
def test_batch_shapes(isa, rng, lead_q, lead_kv, batch):
    q, k, v, cu_q, cu_k = packed(rng, [5, 17, 1], [5, 20, 30], lead_q, lead_kv, 16, 16, np.float32)
    out = check_varlen(q, k, v, cu_q, cu_k, np.float32, causal=True, causal_align="bottom_right")[0]
    assert out.shape == batch + (q.shape[-2], 16)


def test_equals_attention_per_sequence_calls(isa, rng):
    """Against attnfast.attention itself: the same kernels on the same rows."""
    q, k, v, cu_q, cu_k = packed(rng, *LENGTHS[1], (8,), (2,), 32, 32, np.float32)
    for kw in ({"causal": True, "causal_align": "bottom_right"}, {"window": (2, 0)}, {}):
        out, lse = attnfast.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
        for s in range(cu_q.size - 1):
            rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
            o, l = attnfast.attention(q[..., rows, :], k[..., keys, :], v[..., keys, :], return_lse=True, **kw)
            assert_close_fixed(out[..., rows, :], o, np.float32, what=f"sequence {s}")
            assert_close_fixed(lse[..., rows], l, np.float32, what=f"sequence {s} lse")


def test_long_decode_keys_use_split_kv(isa, rng):
    """Few sequences of one query row over long caches: the row-wise path splits their keys."""
    q, k, v, cu_q, cu_k = packed(rng, [1, 1, 3], [4097, 2500, 33], (2,), (1,), 64, 64, np.float32)
    check_varlen(q, k, v, cu_q, cu_k, np.float32, causal=True, causal_align="bottom_right")


def _poisoned(x, cu, keep):
    dirty = x.astype(np.float32 if x.dtype.itemsize < 4 else x.dtype, copy=True).astype(x.dtype)
    mask = np.ones(x.shape[-2], bool)
    mask[cu[keep]:cu[keep + 1]] = False
    dirty[..., mask, :] = np.nan
    return dirty


@pytest.mark.parametrize("lengths_q, lengths_k", LENGTHS)
@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16])
def test_other_sequences_never_reach_a_result(isa, rng, lengths_q, lengths_k, dtype):
    q, k, v, cu_q, cu_k = packed(rng, lengths_q, lengths_k, (4,), (2,), 24, 24, dtype)
    clean, clean_lse = attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    for s in range(cu_q.size - 1):
        rows = slice(cu_q[s], cu_q[s + 1])
        out, lse = attnfast.attention_varlen(_poisoned(q, cu_q, s), _poisoned(k, cu_k, s), _poisoned(v, cu_k, s),
                                             cu_q, cu_k, causal=True, return_lse=True)
        np.testing.assert_array_equal(out[..., rows, :], clean[..., rows, :])
        np.testing.assert_array_equal(lse[..., rows], clean_lse[..., rows])


def test_rows_of_other_sequences_are_not_written(isa, rng):
    """Every row of a NaN-filled out= is written, by the kernel directly (one tiled call: every sequence
    has more than 16 rows), with the same values as a call into a fresh array."""
    q, k, v, cu_q, cu_k = packed(rng, [60, 17, 100], [60, 7, 100], (2,), (2,), 16, 16, np.float32)
    out = np.full((2, int(cu_q[-1]), 16), np.nan, np.float32)
    result = attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True, out=out)
    assert result is out and np.isfinite(out).all()
    np.testing.assert_array_equal(out, attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True))


def test_bitwise_identical_for_any_thread_count(rng, threads):
    q, k, v, cu_q, cu_k = packed(rng, [300, 1, 2, 150, 40], [300, 3000, 2, 150, 41], (4,), (2,), 64, 64, np.float32)
    results = []
    for n in (1, 2, 3):
        attnfast.set_num_threads(n)
        results.append(attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True))
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


def test_out_and_overlap(rng):
    q, k, v, cu_q, cu_k = packed(rng, [5, 30], [7, 30], (2,), (2,), 8, 8, np.float32)
    expected = attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    out = np.empty_like(expected)
    assert attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True, out=out) is out
    np.testing.assert_array_equal(out, expected)
    # out= overlapping q (the kernel reads q while writing): the result goes through a temporary.
    q_again = q.copy()
    got = attnfast.attention_varlen(q_again, k, v, cu_q, cu_k, causal=True, out=q_again)
    assert got is q_again
    np.testing.assert_array_equal(q_again, expected)
    # A float16 out= of a float32 call: rounded once.
    out16 = np.empty(expected.shape, np.float16)
    attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True, out=out16)
    np.testing.assert_array_equal(out16, expected.astype(np.float16))


def test_failed_call_writes_nothing_to_out(rng):
    q, k, v, cu_q, cu_k = packed(rng, [5, 30], [7, 30], (2,), (2,), 8, 8, np.float32)
    out = np.full((2, 35, 8), 7.0, np.float32)
    with pytest.raises(ValueError, match="cu_seqlens_k must end at"):
        attnfast.attention_varlen(q, k, v, cu_q, cu_k[:-1].tolist() + [36], out=out)
    assert (out == 7.0).all()


def test_empty_inputs(rng):
    q = np.zeros((2, 0, 4), np.float32)
    k = np.zeros((2, 0, 4), np.float32)
    out, lse = attnfast.attention_varlen(q, k, k, [0], [0], return_lse=True)
    assert out.shape == (2, 0, 4) and lse.shape == (2, 0)
    out, lse = attnfast.attention_varlen(q, k, k, [0, 0, 0], [0, 0, 0], return_lse=True)
    assert out.shape == (2, 0, 4)
    # Queries but not a single key: out 0, lse -inf.
    q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    out, lse = attnfast.attention_varlen(q, k, k, [0, 1, 3], [0, 0, 0], return_lse=True)
    assert (out == 0).all() and (lse == -np.inf).all()
    ref_out, ref_lse = attnfast.reference.attention_varlen(q, k, k, [0, 1, 3], [0, 0, 0], return_lse=True)
    assert (ref_out == 0).all() and (ref_lse == -np.inf).all()


def test_cu_seqlens_dtypes(rng):
    q, k, v, cu_q, cu_k = packed(rng, [5, 6], [7, 8], (1,), (1,), 4, 4, np.float32)
    expected = attnfast.attention_varlen(q, k, v, cu_q, cu_k)
    for cast in (np.int32, np.uint16, list, tuple):
        got = attnfast.attention_varlen(q, k, v, cast(cu_q) if cast in (list, tuple) else cu_q.astype(cast),
                                        cast(cu_k) if cast in (list, tuple) else cu_k.astype(cast))
        np.testing.assert_array_equal(got, expected)


# ---- Errors: exact type and message ----

@pytest.mark.parametrize("fn", [attnfast.attention_varlen, reference.attention_varlen])
@pytest.mark.parametrize("cu_q, cu_k, error, message", [
    ([0.0, 5.0], [0, 7], TypeError, r"cu_seqlens_q must be a 1-D integer array of cumulative sequence lengths; "
                                    r"got dtype float64\. Convert it with np\.asarray\(cu_seqlens_q, dtype=np\.int64\)"),
    ([0, 5], [True, False], TypeError, r"cu_seqlens_k must be a 1-D integer array .*got dtype bool"),
    (5, [0, 7], TypeError, r"cu_seqlens_q must be a 1-D integer array .*got the scalar 5\. For one sequence of 5 "
                           r"rows pass \[0, 5\]"),
    ([[0, 5]], [0, 7], ValueError, r"cu_seqlens_q must be 1-D \(n \+ 1 cumulative sequence lengths\); got an array "
                                   r"of shape \(1, 2\)"),
    ([], [0, 7], TypeError, r"cu_seqlens_q must be a 1-D integer array .*got an empty array of dtype float64"),
    (np.zeros(0, np.int64), [0, 7], ValueError, r"cu_seqlens_q must hold n \+ 1 values .*got an empty array"),
    ([1, 5], [0, 7], ValueError, r"cu_seqlens_q must start at 0 \(the first sequence starts at row 0\); "
                                 r"got cu_seqlens_q\[0\] = 1"),
    ([0, 3, 2, 5], [0, 1, 2, 7], ValueError, r"cu_seqlens_q must be non-decreasing \(sequence s is rows "
                                             r"\[cu_seqlens_q\[s\], cu_seqlens_q\[s\+1\]\)\); got cu_seqlens_q\[1\] "
                                             r"= 3 > cu_seqlens_q\[2\] = 2"),
    ([0, 4], [0, 7], ValueError, r"cu_seqlens_q must end at Tq \(q's axis -2\) = 5 \(every row belongs to one "
                                 r"sequence\); got cu_seqlens_q\[-1\] = 4"),
    ([0, 5], [0, 8], ValueError, r"cu_seqlens_k must end at Tk \(k's and v's axis -2\) = 7"),
    ([0, 2, 5], [0, 7], ValueError, r"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; "
                                    r"got 2 and 1 \(3 and 2 values\)"),
])
def test_bad_cu_seqlens(rng, fn, cu_q, cu_k, error, message):
    q, k, v, _, _ = packed(rng, [5], [7], (2,), (2,), 4, 4, np.float32)
    with pytest.raises(error, match=message):
        fn(q, k, v, cu_q, cu_k)


@pytest.mark.parametrize("fn", [attnfast.attention_varlen, reference.attention_varlen])
def test_bad_arguments(rng, fn):
    q, k, v, cu_q, cu_k = packed(rng, [5], [7], (4,), (2,), 4, 4, np.float32)
    with pytest.raises(ValueError, match=r"attention_varlen supports method 'dot' and 'scaled_dot'; got 'general'"):
        fn(q, k, v, cu_q, cu_k, method="general")
    with pytest.raises(ValueError, match=r"unknown method 'nope'"):
        fn(q, k, v, cu_q, cu_k, method="nope")
    with pytest.raises(ValueError, match=r"q has 4 heads \(axis -3\) but k/v have 3"):
        fn(q, k[:1].repeat(3, 0), v[:1].repeat(3, 0), cu_q, cu_k)
    with pytest.raises(ValueError, match=r"k and v must have the same number of keys Lk"):
        fn(q, k, v[:, :6], cu_q, cu_k)
    with pytest.raises(ValueError, match=r"unknown causal_align 'middle'"):
        fn(q, k, v, cu_q, cu_k, causal=True, causal_align="middle")
    with pytest.raises(ValueError, match=r"window left must be >= 0"):
        fn(q, k, v, cu_q, cu_k, window=(-2, 0))
    with pytest.raises(ValueError, match=r"out has shape \(4, 5, 3\) but the result has shape"):
        fn(q, k, v, cu_q, cu_k, out=np.empty((4, 5, 3), np.float32))
    with pytest.raises(TypeError, match=r"attention_varlen takes floating-point k and v; got v of dtype int8\. "
                                        r"Dequantise the cache first \(v_int8 \* v_scale\[\.\.\., None\]\)"):
        fn(q, k, v.astype(np.int8), cu_q, cu_k)
    # The modifiers' checks are attention's (the same messages).
    with pytest.raises(ValueError, match=r"softcap must be a positive finite number \(the cap c of s -> c \* "
                                         r"tanh\(s / c\)\) or None; got -1\.0\. Pass e\.g\. softcap=50\.0"):
        fn(q, k, v, cu_q, cu_k, softcap=-1.0)
    with pytest.raises(TypeError, match=r"softcap must be a positive finite number .* got 'big'"):
        fn(q, k, v, cu_q, cu_k, softcap="big")
    with pytest.raises(ValueError, match=r"sinks has shape \(3,\), which does not broadcast to the batch shape"):
        fn(q, k, v, cu_q, cu_k, sinks=np.zeros(3))
    with pytest.raises(ValueError, match=r"alibi_slopes must be finite in float32 \(the computation dtype\); got nan"):
        fn(q, k, v, cu_q, cu_k, alibi_slopes=np.array([1.0, np.nan, 0, 0]))


# ---- Score modifiers: per sequence, against the float64 reference of each sequence ----

@pytest.mark.parametrize("modifiers", [{"softcap": 2.0}, {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
                                       {"sinks": np.array([0.0, 1.0, -1.0, 3.0])},
                                       {"softcap": 5.0, "alibi_slopes": np.array([0.1, 0.2, 0.3, 0.4]),
                                        "sinks": np.array([0.5, 0.5, 0.5, 0.5])}])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_modifiers_match_per_sequence_attention(isa, rng, modifiers, align):
    q, k, v, cu_q, cu_k = packed(rng, *LENGTHS[0], (4,), (2,), 16, 16, np.float32)
    out, lse = attnfast.attention_varlen(q, k, v, cu_q, cu_k, causal=True, causal_align=align, return_lse=True,
                                         **modifiers)
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, causal=True, causal_align=align,
                                                  return_lse=True, **modifiers)
    for s in range(cu_q.size - 1):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        if rows.stop == rows.start:
            continue
        o, l = reference.attention(q[..., rows, :].astype(np.float64), k[..., keys, :].astype(np.float64),
                                   v[..., keys, :].astype(np.float64), causal=True, causal_align=align,
                                   return_lse=True, **modifiers)
        assert_close_fixed(out[..., rows, :], o, np.float32, what=f"sequence {s}")
        assert_close_fixed(lse[..., rows], l, np.float32, what=f"sequence {s} lse")
        assert_close_fixed(ref_out[..., rows, :], o, np.float32, what=f"reference sequence {s}")
