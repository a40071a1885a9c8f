"""Inputs at the edges of what NumPy allows, on every function and every SIMD target.

* ``out=`` overlapping any input (same buffer, reversed view, partial overlap) gives the right result,
  and a failed call leaves ``out`` untouched;
* integers at and beyond the int64 limits (window sides, kv_lengths, offsets, thread counts) either
  work exactly or raise a ValueError naming the argument; no signed overflow (tools/sanitize.sh runs
  this file under UBSan);
* a scale that is not finite in the computation dtype is rejected;
* every layout NumPy can make (zero, negative, unaligned, non-multiple strides) and every byte order
  is accepted, with the same values as a C-contiguous native copy;
* empty results cost O(1) whatever the (broadcast) batch size.
"""

import math
import re
import sys
import time

import numpy as np
import pytest

import attnfast
from attnfast import _attnfast as _core
from attnfast import _inputs
from attnfast import reference as ref
from conftest import DTYPES, assert_close_fixed, up

IMPLS = {"attnfast": attnfast, "reference": ref}
INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)


def exact(message):
    return re.escape(message)


def _qkv(rng, batch, lq, lk, d, dv, dtype):
    return (rng.standard_normal(batch + (lq, d)).astype(dtype), rng.standard_normal(batch + (lk, d)).astype(dtype),
            rng.standard_normal(batch + (lk, dv)).astype(dtype))


def _reference_attention(q, k, v, **kw):
    """The float64 reference of attention() on exactly up-cast copies of the inputs."""
    kw = {name: (np.array(val, dtype=np.float64) if name in ("bias", "w", "w_q", "w_k", "v_a", "score_bias")
                 else np.array(val) if isinstance(val, np.ndarray) else val)
          for name, val in kw.items() if val is not None}
    return ref.attention(up(q), up(k), up(v), **kw)


# --------------------------------------------------------------------------
# 2. out= overlapping an input
# --------------------------------------------------------------------------

B, LK, D, DV, A = 2, 6, 4, 3, 3


def _overlap_case(rng, name, dtype, lq):
    """Attention arguments where ``name`` is an input; the method its weights need."""
    q, k, v = _qkv(rng, (B,), lq, LK, D, DV, dtype)
    kw = {"q": q, "k": k, "v": v}
    method = {"w": "general", "w_q": "additive", "w_k": "additive", "v_a": "additive",
              "score_bias": "additive"}.get(name, "scaled_dot")
    if method == "general":
        kw["w"] = rng.standard_normal((D, D)).astype(dtype) / 2
    if method == "additive":
        kw.update(w_q=rng.standard_normal((A, D)).astype(dtype), w_k=rng.standard_normal((A, D)).astype(dtype),
                  v_a=rng.standard_normal(A).astype(dtype), score_bias=rng.standard_normal(A).astype(dtype))
    if name == "bias":
        kw["bias"] = rng.standard_normal((B, lq, LK)).astype(dtype)
    if name == "mask":
        kw["mask"] = rng.random((B, lq, LK)) < 0.7
    if name == "kv_lengths":
        kw["kv_lengths"] = np.array([LK, 2], np.int64)
    return kw, method


def _overlapping_pair(value, out_shape, out_dtype, mode):
    """(input, out): ``input`` holds ``value`` and shares memory with ``out`` as ``mode`` says."""
    in_bytes = value.nbytes
    out_bytes = int(np.prod(out_shape)) * np.dtype(out_dtype).itemsize
    shift = 0 if mode != "partial" else (min(in_bytes, out_bytes) // 2) // 8 * 8
    raw = np.zeros(max(in_bytes, shift + out_bytes) + 16, np.uint8)
    inp = raw[:in_bytes].view(value.dtype).reshape(value.shape)
    flat_out = raw[shift:shift + out_bytes].view(out_dtype)
    out = (flat_out[::-1] if mode == "reversed" else flat_out).reshape(out_shape)
    inp[...] = value
    assert np.shares_memory(inp, out)
    return inp, out


OVERLAP_INPUTS = ["q", "k", "v", "bias", "mask", "kv_lengths", "w", "w_q", "w_k", "v_a", "score_bias"]


@pytest.mark.parametrize("mode", ["same", "reversed", "partial"])
@pytest.mark.parametrize("name", OVERLAP_INPUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lq", [5, 70])
def test_out_overlapping_an_input_gives_the_reference(isa, rng, impl, lq, dtype, name, mode):
    kw, method = _overlap_case(rng, name, dtype, lq)
    expected = _reference_attention(**kw, method=method)
    kw[name], out = _overlapping_pair(kw[name], (B, lq, DV), dtype, mode)
    result = IMPLS[impl].attention(**kw, method=method, out=out)
    assert result is out
    assert_close_fixed(out, expected, dtype, scale=float(np.abs(kw["v"]).max()),
                       what=f"{impl} out= overlapping {name} ({mode})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [4, 64, 97])
def test_out_is_the_bias_reversed(isa, rng, dtype, n):
    # The reported case: bias=buf, out=buf[::-1] (Lk == Dv so both have one shape); the tiled path
    # (n >= 64) wrote rows of out that later rows still read as bias.
    q, k, v = _qkv(rng, (), n, n, 64, n, dtype)
    buf = rng.standard_normal((n, n)).astype(dtype)
    expected = _reference_attention(q, k, v, bias=buf.copy())
    got = attnfast.attention(q, k, v, bias=buf, out=buf[::-1])
    assert_close_fixed(got, expected, dtype, scale=float(np.abs(v).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_plain_path_out_is_an_input(isa, rng, dtype, name):
    # No extras: the compiled plain path sees the call first and must hand the overlap back.
    q, k, v = _qkv(rng, (2,), 4, 4, 4, 4, dtype)
    args = {"q": q, "k": k, "v": v}
    expected = _reference_attention(q, k, v, causal=True)
    got = attnfast.attention(**args, causal=True, out=args[name])
    assert got is args[name]
    assert_close_fixed(got, expected, dtype, scale=float(np.abs(v).max()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [dict(scale=1e39), dict(window=(0, 2**64)), dict(kv_lengths=[7, 0]),
                                 dict(causal="yes"), dict(bias=np.ones((3, 3)))])
def test_failed_call_leaves_out_untouched(rng, impl, bad):
    q, k, v = _qkv(rng, (2,), 5, 6, 4, 3, np.float32)
    out = np.full((2, 5, 3), 7.0, np.float32)
    with pytest.raises((ValueError, TypeError)):
        IMPLS[impl].attention(q, k, v, out=out, **bad)
    assert np.all(out == 7.0)


# --------------------------------------------------------------------------
# 3. integers at the int64 limits
# --------------------------------------------------------------------------

HUGE_SIDES = [sys.maxsize, INT64_MAX, np.int64(INT64_MAX), np.uint64(INT64_MAX), 10**9]


@pytest.mark.parametrize("huge", HUGE_SIDES, ids=lambda x: f"{type(x).__name__}{x}")
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk", [(5, 23), (37, 11), (1, 1025)])
def test_huge_window_sides_mean_unbounded(isa, rng, dtype, lq, lk, align, huge):
    q, k, v = _qkv(rng, (2,), lq, lk, 17, 3, dtype)
    for window, same_as in [((3, huge), (3, None)), ((huge, 2), (None, 2)), ((huge, huge), None)]:
        for causal in (False, True):
            kw = dict(causal=causal, causal_align=align, return_lse=True)
            out, lse = attnfast.attention(q, k, v, window=window, **kw)
            want_out, want_lse = attnfast.attention(q, k, v, window=same_as, **kw)
            r_out, r_lse = ref.attention(q, k, v, window=window, **kw)
            np.testing.assert_array_equal(out, want_out)
            np.testing.assert_array_equal(lse, want_lse)
            if same_as is None and not causal:
                assert np.all(np.isfinite(lse)), "no row may lose its keys to an overflowed window"
            assert_close_fixed(out, r_out.astype(np.float64), dtype, scale=float(np.abs(v).max()))
            assert_close_fixed(lse, r_lse.astype(np.float64), dtype)


def test_window_sides_are_clamped_to_lq_plus_lk(rng):
    q, k, v = _qkv(rng, (), 5, 7, 4, 3, np.float64)
    a = _inputs.check_attention(q, k, v, window=(sys.maxsize, 12))
    assert (a.window_left, a.window_right) == (12, 12)
    a = _inputs.check_attention(q, k, v, window=(11, None))
    assert (a.window_left, a.window_right) == (11, -1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("side,value", [("right", 2**64), ("left", 2**63), ("right", np.uint64(2**63)),
                                        ("left", 10**30)])
def test_window_beyond_int64_is_value_error(rng, impl, side, value):
    q, k, v = _qkv(rng, (), 3, 4, 2, 2, np.float32)
    window = (0, value) if side == "right" else (value, 0)
    msg = (f"window {side} must fit in a 64-bit signed integer (at most {INT64_MAX}); got {int(value)}. "
           f"Pass None for an unbounded side.")
    with pytest.raises(ValueError, match=exact(msg)):
        IMPLS[impl].attention(q, k, v, window=window)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window,shape", [(np.array([[1, 2]]), "(1, 2)"), (np.zeros((2, 2), np.int64), "(2, 2)"),
                                          (np.array([1, 2, 3]), "(3,)")])
def test_window_array_of_the_wrong_shape_is_named(rng, impl, window, shape):
    q, k, v = _qkv(rng, (), 3, 4, 2, 2, np.float32)
    with pytest.raises(ValueError, match=exact(f"window must be a pair (left, right); got an array of shape {shape}. "
                                               f"Use e.g. window=(128, 0), or window=None for no window.")):
        IMPLS[impl].attention(q, k, v, window=window)
    # A 0-d array is a scalar, as window=3 is (it had no len(): 'len() of unsized object').
    with pytest.raises(TypeError, match=exact("window must be a pair (left, right) of non-negative ints or None; "
                                              "got array(3). Use e.g. window=(128, 0)")):
        IMPLS[impl].attention(q, k, v, window=np.array(3))
    assert_close_fixed(IMPLS[impl].attention(q, k, v, window=np.array([1, 0])),
                       ref.attention(up(q), up(k), up(v), window=(1, 0)), np.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths,bad", [([2**70], 2**70), ([1, -2**70], -2**70), (np.array([2**63], np.uint64), 2**63),
                                         (np.array([2**64 - 1], np.uint64), 2**64 - 1), (2**70, 2**70),
                                         ([INT64_MAX], INT64_MAX), ([INT64_MIN], INT64_MIN),
                                         ([-1, 2**64 - 1], -1), ([np.uint64(2**63), 0], 2**63)])
def test_kv_lengths_beyond_lk_or_int64_is_value_error(rng, impl, lengths, bad):
    q, k, v = _qkv(rng, (np.size(lengths),), 3, 4, 2, 2, np.float32)
    with pytest.raises(ValueError, match=exact(f"kv_lengths must lie in [0, Lk] = [0, 4]; got {bad}.")):
        IMPLS[impl].attention(q, k, v, kv_lengths=lengths)


def test_kv_lengths_python_ints_in_an_object_array(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 2, 2, np.float64)
    lengths = np.array([4, 1], dtype=object)
    np.testing.assert_array_equal(attnfast.attention(q, k, v, kv_lengths=lengths),
                                  attnfast.attention(q, k, v, kv_lengths=np.array([4, 1])))


def _core_attention(q, k, v, *, causal, offset, left, right):
    """The compiled kernel called directly, past the Python layer's clamps: (out, lse)."""
    batch = list(q.shape[:-2])
    out = np.empty(q.shape[:-1] + v.shape[-1:], q.dtype)
    lse = np.empty(q.shape[:-1], q.dtype)
    _core.attention(q, k, v, out, batch, batch, 1, 1.0, None, None, None, causal, offset, left, right, lse, None)
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk", [(5, 23), (37, 11)])
def test_kernel_visibility_saturates(isa, rng, dtype, lq, lk):
    # The kernels' own defence: window sides and offsets at the int64 limits must saturate, not wrap
    # (UBSan, in tools/sanitize.sh, flags any signed overflow).
    q, k, v = _qkv(rng, (2,), lq, lk, 8, 3, dtype)
    # Cases where the exact (unbounded) arithmetic makes every key visible, causal rows, or none.
    everything, all_lse = _core_attention(q, k, v, causal=False, offset=0, left=-1, right=-1)
    for causal, offset, left, right in [(False, 0, INT64_MAX, INT64_MAX), (True, INT64_MAX, -1, -1),
                                        (False, INT64_MIN, INT64_MAX, -1), (False, INT64_MAX, -1, INT64_MAX),
                                        (False, lk - lq, INT64_MAX, INT64_MAX)]:
        out, lse = _core_attention(q, k, v, causal=causal, offset=offset, left=left, right=right)
        np.testing.assert_array_equal(out, everything)
        np.testing.assert_array_equal(lse, all_lse)
    causal_out, causal_lse = _core_attention(q, k, v, causal=True, offset=0, left=-1, right=-1)
    out, lse = _core_attention(q, k, v, causal=True, offset=0, left=INT64_MAX, right=INT64_MAX)
    np.testing.assert_array_equal(out, causal_out)
    np.testing.assert_array_equal(lse, causal_lse)
    for causal, offset, left, right in [(False, INT64_MAX, 0, -1), (False, INT64_MIN, -1, 0),
                                        (True, INT64_MIN, -1, -1), (True, INT64_MIN, INT64_MAX, INT64_MAX),
                                        (False, INT64_MIN, INT64_MAX, 0)]:
        out, lse = _core_attention(q, k, v, causal=causal, offset=offset, left=left, right=right)
        assert np.all(out == 0) and np.all(lse == -np.inf)


def _zeros_view(shape, dtype=np.float32, last_stride=0):
    """A read-only view of ``shape`` over one row of zeros: any number of (broadcast) elements, no memory."""
    row = np.zeros(shape[-1] if last_stride else 1, dtype)
    strides = (0,) * (len(shape) - 1) + ((row.itemsize if last_stride else 0),)
    return np.lib.stride_tricks.as_strided(row, shape, strides, writeable=False)


N32 = 2**32
TOO_MANY = "more than one NumPy array can hold"


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_broadcasting_beyond_int64_is_not_called_a_mismatch(impl):
    # (2^32, 1) and (1, 2^32) do broadcast; to 2^64 items, which no array holds.
    f, z = IMPLS[impl], _zeros_view
    with pytest.raises(ValueError, match=exact(
            f"the scores would have shape (4294967296, 4294967296, 4, 0) ({2**68} bytes of float32), {TOO_MANY} "
            f"(at most {INT64_MAX} bytes); q has shape (4294967296, 1, 4, 8) and k (1, 4294967296, 0, 8).")):
        f.scores(z((N32, 1, 4, 8)), z((1, N32, 0, 8)))
    with pytest.raises(ValueError, match=exact(
            f"the result would have shape (4294967296, 4294967296, 4, 0) ({2**68} bytes of float32), {TOO_MANY} "
            f"(at most {INT64_MAX} bytes); weights has shape (4294967296, 1, 4, 6) and v (1, 4294967296, 6, 0).")):
        f.aggregate(z((N32, 1, 4, 6)), z((1, N32, 6, 0)))


@pytest.mark.parametrize("kw", [{}, {"causal": True, "return_lse": True}, {"kv_lengths": 0},
                                {"mask": np.ones((1, 1), bool)}, {"method": "general", "w": np.eye(8)}])
@pytest.mark.parametrize("lk,dv", [(6, 4), (0, 4), (6, 0)])
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_result_beyond_int64_is_a_clear_value_error(impl, lk, dv, kw):
    # An empty result is refused too: NumPy cannot make an array whose other extents multiply past int64.
    z = _zeros_view
    with pytest.raises(ValueError, match=exact(
            f"the result would have shape (4294967296, 4294967296, 4, {dv}) ") + r".*" + exact(
            f"{TOO_MANY} (at most {INT64_MAX} bytes); q has shape (4294967296, 1, 4, 8), k (1, 4294967296, {lk}, 8) "
            f"and v (1, 4294967296, {lk}, {dv}). Loop over a part of the batch or of the queries.")):
        IMPLS[impl].attention(z((N32, 1, 4, 8)), z((1, N32, lk, 8)), z((1, N32, lk, dv)), **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_path_result_beyond_int64_is_a_clear_value_error(impl):
    # Every input fits (2^62 bytes at most) but the result, 2^58 x 4 x 4 float32, does not.
    z = _zeros_view
    q, k, v = z((2**58, 4, 1)), z((2**58, 1, 1)), z((2**58, 1, 4), last_stride=True)
    with pytest.raises(ValueError, match=exact(f"the result would have shape ({2**58}, 4, 4) ({2**64} bytes of "
                                               f"float32), {TOO_MANY}")):
        IMPLS[impl].attention(q, k, v)


@pytest.mark.parametrize("kw,what", [({"mask": np.ones((1, 1), bool)}, "mask broadcast to the score shape"),
                                     ({"bias": np.zeros((1, 1))}, "bias broadcast to the score shape"),
                                     ({"return_weights": True}, "weights (return_weights=True)")])
@pytest.mark.parametrize("impl", IMPLS)
def test_score_shape_beyond_int64_is_a_clear_value_error(impl, kw, what):
    # Lq x Lk = 2^64: the result (2^31 x 4) fits, the score-shaped operand does not; not a shape mismatch.
    z = _zeros_view
    with pytest.raises(ValueError, match=exact(f"{what} would have shape (2147483648, 8589934592) (")):
        IMPLS[impl].attention(z((2**31, 8)), z((2**33, 8)), z((2**33, 4)), **kw)


# --------------------------------------------------------------------------
# 5. scale out of the computation dtype's range
# --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1e39, -1e39, np.float64(4e38), 10**39])
def test_scale_overflowing_float32_is_value_error(rng, impl, scale):
    q, k, v = _qkv(rng, (2,), 3, 4, 2, 2, np.float32)
    msg = (f"scale={float(scale)!r} overflows float32 (the computation dtype, whose largest value is "
           f"3.4028235e+38); pass a smaller scale, or float64 inputs.")
    f = IMPLS[impl]
    for call in (lambda: f.attention(q, k, v, scale=scale), lambda: f.scores(q, k, scale=scale),
                 lambda: f.attention(q, k, v, scale=scale, method="dot"),
                 lambda: f.attention(q, k, v, scale=scale, return_lse=True),
                 lambda: f.scores(q, k, scale=scale, method="general", w=np.eye(2))):
        with pytest.raises(ValueError, match=exact(msg)):
            call()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf, np.float32(np.inf), 10**400])
def test_non_finite_scale_is_value_error(rng, impl, scale):
    q, k, v = _qkv(rng, (2,), 3, 4, 2, 2, np.float64)
    shown = float(scale) if not isinstance(scale, int) else float("inf")
    msg = f"scale must be finite; got {shown!r}. Pass a finite float or None for the default."
    with pytest.raises(ValueError, match=exact(msg)):
        IMPLS[impl].attention(q, k, v, scale=scale)
    with pytest.raises(ValueError, match=exact(msg)):
        IMPLS[impl].scores(q, k, scale=scale)


def test_scale_1e39_is_fine_in_float64(isa, rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 2, 2, np.float64)
    q *= 1e-40
    got = attnfast.attention(q, k, v, scale=1e39)
    assert_close_fixed(got, ref.attention(q, k, v, scale=1e39), np.float64, scale=float(np.abs(v).max()))
    assert_close_fixed(attnfast.scores(q, k, scale=1e39), ref.scores(q, k, scale=1e39), np.float64)


def test_float32_scale_boundary(isa, rng):
    # The largest float64 that rounds to a finite float32 is accepted; the next one rounds to inf.
    q, k, v = _qkv(rng, (2,), 3, 4, 2, 2, np.float32)
    first_inf = 2.0**128 - 2.0**103
    for big in (float(np.finfo(np.float32).max), math.nextafter(first_inf, 0.0)):
        assert np.isfinite(np.float32(big))
        np.testing.assert_array_equal(attnfast.scores(q * 0, k, scale=big), np.zeros((2, 3, 4), np.float32))
        assert_close_fixed(attnfast.attention(q * 0, k, v, scale=-big), ref.attention(up(q * 0), up(k), up(v)),
                           np.float32, scale=float(np.abs(v).max()))
    with pytest.raises(ValueError, match="overflows float32"):
        attnfast.attention(q, k, v, scale=first_inf)


# --------------------------------------------------------------------------
# 7. every layout NumPy can make
# --------------------------------------------------------------------------

LAYOUTS = ["broadcast_last", "broadcast_rows", "packed_field", "misaligned", "negative", "reversed_rows",
           "every_third"]


def weird(a, layout):
    """(values, view): ``view`` holds ``values`` in an unusual layout (the values may be changed to fit
    it: a broadcast last axis repeats its first entry)."""
    a = np.asarray(a)
    if layout == "broadcast_last":
        values = np.broadcast_to(a[..., :1], a.shape)
        return np.array(values), values
    if layout == "broadcast_rows":
        if a.ndim < 2:
            return weird(a, "broadcast_last")
        values = np.broadcast_to(a[..., :1, :], a.shape)
        return np.array(values), values
    if layout == "packed_field":
        # Row stride 1 + n * itemsize: not a multiple of the item size, and unaligned.
        rec = np.zeros(a.shape[:-1], dtype=[("pad", "u1"), ("x", a.dtype, a.shape[-1:])])
        view = rec["x"]
        view[...] = a
        assert view.shape == a.shape and (a.itemsize == 1 or not view.flags.aligned)
        return a, view
    if layout == "misaligned":
        raw = np.zeros(a.nbytes + 1, np.uint8)
        view = raw[1:].view(a.dtype).reshape(a.shape)
        view[...] = a
        return a, view
    if layout == "negative":
        view = np.array(a[(slice(None, None, -1),) * a.ndim])[(slice(None, None, -1),) * a.ndim]
        return a, view
    if layout == "reversed_rows":
        if a.ndim < 2:
            return weird(a, "negative")
        return a, np.array(a[..., ::-1, :])[..., ::-1, :]
    if layout == "every_third":
        base = np.zeros(a.shape[:-1] + (3 * a.shape[-1],), a.dtype)
        base[..., ::3] = a
        return a, base[..., ::3]
    raise ValueError(layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arg", ["weights", "v"])
def test_aggregate_any_layout(isa, rng, dtype, arg, layout):
    args = {"weights": rng.random((2, 5, 17)).astype(dtype), "v": rng.standard_normal((2, 17, 3)).astype(dtype)}
    args[arg], view = weird(args[arg], layout)
    expected = ref.aggregate(up(args["weights"]), up(args["v"]))
    args[arg] = view
    assert_close_fixed(attnfast.aggregate(**args), expected, dtype)


def test_aggregate_constant_weights_reported_case(isa):
    w = np.broadcast_to(np.float32(0.2), (4, 5))
    v = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.testing.assert_allclose(attnfast.aggregate(w, v), np.full((4, 5), 0.2) @ v, rtol=1e-6)
    np.testing.assert_allclose(attnfast.aggregate(np.ones((4, 5), np.float32), np.broadcast_to(np.float32(0.2), (5, 3))),
                               np.ones((4, 3)), rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arg", ["x", "mask"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_any_layout(isa, rng, dtype, arg, layout, axis):
    args = {"x": rng.standard_normal((6, 17)).astype(dtype), "mask": rng.random((6, 17)) < 0.7}
    args[arg], view = weird(args[arg], layout)
    expected = ref.softmax(up(args["x"]), axis, mask=args["mask"])
    args[arg] = view
    assert_close_fixed(attnfast.softmax(args["x"], axis, mask=args["mask"]), expected, dtype, scale=1.0)


def test_softmax_packed_field_reported_case(isa):
    x = np.zeros(10, dtype=[("a", "u1"), ("x", "<f4", (4,))])["x"]
    assert x.strides == (17, 4)
    np.testing.assert_array_equal(attnfast.softmax(x), np.full((10, 4), 0.25, np.float32))


SCORE_ARGS = {"dot": ["q", "k"], "general": ["q", "k", "w"], "concat": ["q", "k", "w_q", "w_k"],
              "additive": ["q", "k", "w_q", "w_k", "v_a", "score_bias"]}


def _method_kwargs(rng, method, dtype, d=17, hidden=5):
    if method == "general":
        return {"w": rng.standard_normal((d, d)).astype(dtype) / 4}
    if method == "concat":
        return {"w_q": rng.standard_normal(d).astype(dtype), "w_k": rng.standard_normal(d).astype(dtype)}
    if method == "additive":
        return {"w_q": rng.standard_normal((hidden, d)).astype(dtype), "w_k": rng.standard_normal((hidden, d)).astype(dtype),
                "v_a": rng.standard_normal(hidden).astype(dtype), "score_bias": rng.standard_normal(hidden).astype(dtype)}
    return {}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,arg", [(m, a) for m, names in SCORE_ARGS.items() for a in names])
def test_scores_any_layout(isa, rng, dtype, method, arg, layout):
    args = {"q": rng.standard_normal((2, 5, 17)).astype(dtype), "k": rng.standard_normal((2, 9, 17)).astype(dtype),
            **_method_kwargs(rng, method, dtype)}
    args[arg], view = weird(args[arg], layout)
    expected = ref.scores(**{n: up(x) for n, x in args.items()}, method=method)
    args[arg] = view
    got = attnfast.scores(**args, method=method)
    assert_close_fixed(got, expected, dtype, scale=float(np.abs(expected).max()))


ATTENTION_ARGS = [("scaled_dot", a) for a in ("q", "k", "v", "mask", "bias", "kv_lengths", "out")] + [
    (m, a) for m in ("general", "concat", "additive") for a in SCORE_ARGS[m][2:]]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,arg", ATTENTION_ARGS)
@pytest.mark.parametrize("lq", [3, 40])
def test_attention_any_layout(isa, rng, dtype, method, arg, layout, lq):
    q, k, v = _qkv(rng, (2,), lq, 33, 17, 5, dtype)
    args = {"q": q, "k": k, "v": v, "mask": rng.random((2, lq, 33)) < 0.8,
            "bias": rng.standard_normal((2, lq, 33)).astype(dtype), **_method_kwargs(rng, method, dtype)}
    if arg == "kv_lengths":
        args["kv_lengths"] = np.array([33, 7])
    if arg == "out":
        if layout.startswith("broadcast"):
            pytest.skip("a broadcast view is read-only")
        _, out = weird(np.zeros((2, lq, 5), dtype), layout)
    else:
        args[arg], view = weird(args[arg], layout)
        out = None
    expected = _reference_attention(**args, method=method)
    if arg != "out":
        args[arg] = view
    got = attnfast.attention(**args, method=method, out=out)
    if out is not None:
        assert got is out
    assert_close_fixed(got, expected, dtype, scale=float(np.abs(v).max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_out_overlapping_itself(isa, rng, dtype):
    # A writeable out= whose rows all alias one row (zero stride): NumPy's rule, the last write wins,
    # so every row holds the result of one of the query rows; no thread may race on it half-written.
    q, k, v = _qkv(rng, (), 40, 33, 17, 5, dtype)
    expected = ref.attention(up(q), up(k), up(v))
    base = np.zeros(5, dtype)
    out = np.lib.stride_tricks.as_strided(base, shape=(40, 5), strides=(0, base.itemsize))
    attnfast.attention(q, k, v, bias=np.zeros((40, 33)), out=out)
    assert_close_fixed(base, expected[-1], dtype, scale=float(np.abs(v).max()))


def _interleaved(dtype, shape, strides_in_items):
    """A writeable as_strided view whose rows share elements (e.g. row i starting at element i)."""
    itemsize = np.dtype(dtype).itemsize
    span = 1 + sum((n - 1) * st for n, st in zip(shape, strides_in_items))
    base = np.zeros(span, dtype)
    return base, np.lib.stride_tricks.as_strided(base, shape, tuple(st * itemsize for st in strides_in_items))


@pytest.mark.parametrize("strides", [(1, 1), (3, 1), (1, 40)], ids=["rows-shifted-by-1", "rows-shifted-by-3",
                                                                    "columns-shifted-by-1"])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"bias": np.zeros((97, 33))}], ids=["plain", "causal", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_out_with_interleaved_rows(isa, rng, dtype, kw, strides):
    # Not a zero stride but the same hazard: rows that share elements. The result lands as NumPy's
    # np.copyto of the reference would leave it, never as threads racing on the shared elements.
    q, k, v = _qkv(rng, (), 97, 33, 17, 6, dtype)
    expected = ref.attention(up(q), up(k), up(v), **kw).astype(dtype)
    base, out = _interleaved(dtype, (97, 6), strides)
    want_base, want = _interleaved(dtype, (97, 6), strides)
    np.copyto(want, expected)
    assert attnfast.attention(q, k, v, out=out, **kw) is out
    assert_close_fixed(base, want_base, dtype, scale=float(np.abs(v).max()))


def test_only_self_overlapping_out_is_copied(rng):
    from attnfast._api import _overlaps_itself

    a = np.zeros((4, 6, 5), np.float32)
    packed = np.zeros((4, 6), dtype=[("a", "u1"), ("x", "<f4")])["x"]
    for distinct in (a, a.T, np.asfortranarray(a), a[::-1, :, ::-2], a[:, 1:4], a.transpose(1, 0, 2), packed,
                     a[:, :1], a[:0]):
        assert not _overlaps_itself(distinct)
    for shared in (np.broadcast_to(a[:1], a.shape), _interleaved(np.float32, (5, 6), (1, 1))[1],
                   _interleaved(np.float32, (5, 6), (6, 2))[1], _interleaved(np.float32, (2, 5, 6), (5, 6, 1))[1]):
        assert _overlaps_itself(shared)


def test_attention_packed_field_bias_reported_case(isa):
    bias = np.zeros(10, dtype=[("a", "u1"), ("x", "<f4", (4,))])["x"]
    bias[...] = np.arange(4, dtype=np.float32)
    q, k, v = np.ones((10, 4), np.float32), np.ones((4, 4), np.float32), np.eye(4, dtype=np.float32)
    expected = ref.attention(q, k, v, bias=np.array(bias))
    assert_close_fixed(attnfast.attention(q, k, v, bias=bias), expected, np.float32)


MANY = (1,) * 29 + (2,) + (1,) * 30  # 60 batch axes: beyond np.broadcast_shapes' 32, within NumPy's 64


@pytest.mark.parametrize("dtype", DTYPES)
def test_batches_of_up_to_64_axes_broadcast(isa, rng, dtype):
    # q, the weights and outs with 62 axes meet k, v and masks with 2: batch broadcasting is not limited
    # to the 32 axes np.broadcast_shapes takes.
    q = rng.standard_normal(MANY + (5, 8)).astype(dtype)
    k, v = rng.standard_normal((7, 8)).astype(dtype), rng.standard_normal((7, 3)).astype(dtype)
    mask = rng.random((5, 7)) < 0.8
    for kw in ({}, {"mask": mask}, {"causal": True, "return_weights": True}, {"kv_lengths": np.array(4)}):
        expected = _reference_attention(q, k, v, **kw)
        for f in IMPLS.values():
            for got, want in zip(*(x if isinstance(x, tuple) else (x,) for x in (f.attention(q, k, v, **kw), expected))):
                assert_close_fixed(got, want, dtype, scale=1.0)
    for f in IMPLS.values():
        assert_close_fixed(f.scores(q, k), ref.scores(up(q), up(k)), dtype)
        weights = attnfast.softmax(f.scores(q, k))
        assert_close_fixed(f.aggregate(weights, v), ref.aggregate(up(weights), up(v)), dtype)
        assert_close_fixed(f.softmax(q, axis=29, mask=mask[0, :1, None].T), ref.softmax(up(q), axis=29,
                           mask=mask[0, :1, None].T), dtype, scale=1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_additive_scores_of_64_axis_inputs(rng, impl):
    # The reference's tanh tensor has one axis more than the scores: it must not need a 65th.
    q, k, v = rng.standard_normal((1,) * 62 + (5, 8)), rng.standard_normal((7, 6)), rng.standard_normal((7, 3))
    weights = dict(method="additive", w_q=rng.standard_normal((4, 8)), w_k=rng.standard_normal((4, 6)),
                   v_a=rng.standard_normal(4), score_bias=rng.standard_normal(4))
    flat = ref.scores(q.reshape(5, 8), k, **weights)
    np.testing.assert_allclose(IMPLS[impl].scores(q, k, **weights).reshape(5, 7), flat, rtol=1e-12, atol=1e-12)
    flat = ref.attention(q.reshape(5, 8), k, v, **weights)
    np.testing.assert_allclose(IMPLS[impl].attention(q, k, v, **weights).reshape(5, 3), flat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_states_of_64_axis_parts(rng, impl):
    outs = [rng.standard_normal((1,) * 62 + (3, 2)) for _ in range(3)]
    lses = [rng.standard_normal((1,) * 62 + (3,)) for _ in range(3)]
    out, lse = IMPLS[impl].merge_states(outs, lses)
    flat_out, flat_lse = ref.merge_states([o.reshape(3, 2) for o in outs], [s.reshape(3) for s in lses])
    assert out.shape == outs[0].shape and lse.shape == lses[0].shape
    np.testing.assert_allclose(out.reshape(3, 2), flat_out, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(lse.reshape(3), flat_lse, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------
# 8. byte order, ISA names and conversion hints
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_native_byte_order_gives_the_native_result(isa, rng, dtype):
    swapped = np.dtype(dtype).newbyteorder(">" if sys.byteorder == "little" else "<")
    q, k, v = _qkv(rng, (2,), 7, 9, 5, 3, dtype)
    bias = rng.standard_normal((2, 7, 9)).astype(dtype)
    mask = rng.random((2, 7, 9)) < 0.8
    lengths = np.array([9, 4])
    s = lambda a: a.astype(a.dtype.newbyteorder("S"))  # noqa: E731
    for impl in IMPLS.values():
        want = impl.attention(q, k, v, bias=bias, mask=mask, kv_lengths=lengths, return_lse=True)
        got = impl.attention(q.astype(swapped), s(k), s(v), bias=s(bias), mask=mask.astype(">?"),
                             kv_lengths=s(lengths), return_lse=True)
        for g, w in zip(got, want):
            assert g.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(g, w)
        out = np.zeros((2, 7, 3), swapped)
        assert impl.attention(s(q), k, v, out=out) is out
        np.testing.assert_array_equal(out, impl.attention(q, k, v))
        np.testing.assert_array_equal(impl.scores(s(q), s(k)), impl.scores(q, k))
        np.testing.assert_array_equal(impl.softmax(s(bias), mask=mask), impl.softmax(bias, mask=mask))
        np.testing.assert_array_equal(impl.aggregate(s(bias), s(v)), impl.aggregate(bias, v))
        o, l = impl.merge_states([s(q), q], [s(q[..., 0]), q[..., 0]])
        o2, l2 = impl.merge_states([q, q], [q[..., 0], q[..., 0]])
        np.testing.assert_array_equal(o, o2)
        np.testing.assert_array_equal(l, l2)


def test_non_native_int_byte_order_kv_lengths(isa, rng):
    q, k, v = _qkv(rng, (3,), 2, 5, 4, 3, np.float32)
    for lengths in (np.array([5, 2, 0], ">i8"), np.array([5, 2, 0], ">u4"), np.array([5, 2, 0], ">i2")):
        np.testing.assert_array_equal(attnfast.attention(q, k, v, kv_lengths=lengths),
                                      attnfast.attention(q, k, v, kv_lengths=np.array([5, 2, 0])))


@pytest.mark.parametrize("impl", IMPLS)
def test_conversion_hints_fit_the_input(rng, impl):
    f = IMPLS[impl]
    msg = ("attnfast computes in float32 or float64; x has dtype int64. "
           "Convert it with np.asarray(x, dtype=np.float32) (or np.float64).")
    with pytest.raises(TypeError, match=exact(msg)):
        f.softmax([1, 2, 3])
    with pytest.raises(TypeError, match=exact("Convert it with x.astype(np.float32) (or np.float64).")):
        f.softmax(np.arange(3))
    q = np.ones((2, 3))
    with pytest.raises(TypeError, match=exact("Convert it with np.asarray(k, dtype=np.float32)")):
        f.attention(q, [[1, 2, 3]], q)
    with pytest.raises(TypeError, match=exact("Convert it with np.asarray(weights, dtype=np.float32)")):
        f.aggregate([[1, 2]], q)
    msg = ("kv_lengths must be an integer array (the number of visible keys per batch entry); got dtype "
           "float64. Convert it with np.asarray(kv_lengths, dtype=np.int64).")
    with pytest.raises(TypeError, match=exact(msg)):
        f.attention(q[None], q[None], q[None], kv_lengths=[1.5])
    with pytest.raises(TypeError, match=exact("Convert it with kv_lengths.astype(np.int64).")):
        f.attention(q[None], q[None], q[None], kv_lengths=np.array([1.5]))
    with pytest.raises(TypeError, match=exact("Convert it with np.asarray(bias, dtype=np.float64).")):
        f.attention(q, q, q, bias=[[1j, 2, 3], [1, 2, 3]])
    with pytest.raises(TypeError, match=exact("e.g. mask = (np.asarray(m) != 0), or pass")):
        f.attention(q, q, q, mask=[[1, 0], [0, 1]])
    with pytest.raises(TypeError, match=exact("e.g. mask = (m != 0), or pass")):
        f.attention(q, q, q, mask=np.eye(2))
    with pytest.raises(TypeError, match=exact("Convert it with np.asarray(lses[0], dtype=np.float32)")):
        f.merge_states([q], [[1, 2]])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias,fix", [([0.5], "Pass a float: score_bias=0.5."),
                                      (np.array([[0.25]]), "Pass a float: score_bias=0.25."),
                                      (np.zeros(3), "Pass a float: concat adds one bias to every score "
                                                    "(method='additive' takes an (A,) one).")])
def test_concat_score_bias_hint_names_the_argument(impl, bias, fix):
    # It said float(b[0]): no argument is called b, and for an (A,) bias that drops all but one value.
    q = np.ones((2, 3))
    with pytest.raises(ValueError, match=exact(f"score_bias for method='concat' must be a scalar (shape ()); got "
                                               f"shape {np.shape(bias)}. {fix}")):
        IMPLS[impl].scores(q, q, method="concat", w_q=np.ones(3), w_k=np.ones(3), score_bias=bias)


@pytest.mark.parametrize("impl", IMPLS)
def test_indexing_hints_fit_the_input(impl):
    f = IMPLS[impl]
    with pytest.raises(ValueError, match=exact("got shape (3,). Use np.asarray(q)[None, :] for a single query.")):
        f.scores([1.0, 2.0, 3.0], np.ones((2, 3)))
    with pytest.raises(ValueError, match=exact("got shape (3,). Use q[None, :] for a single query.")):
        f.scores(np.ones(3), np.ones((2, 3)))
    with pytest.raises(ValueError, match=exact("Use np.asarray(k)[None, :] for a single key.")):
        f.attention(np.ones((2, 3)), [1.0, 2.0, 3.0], np.ones((1, 3)))
    with pytest.raises(ValueError, match=exact("Use np.asarray(v)[:, None] for scalar values.")):
        f.aggregate(np.ones((2, 3)), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=exact("Use v[:, None] for scalar values.")):
        f.aggregate(np.ones((2, 3)), np.ones(3))
    q = np.ones((2, 3, 4, 5))
    with pytest.raises(ValueError, match=exact("size-1 axes, e.g. np.asarray(kv_lengths)[:, None].")):
        f.attention(q, q, q, kv_lengths=[1, 2])


@pytest.mark.parametrize("spelling", ["AVX2", "Scalar", " avx512 ", "\tAvx2\n", "SCALAR "])
def test_isa_names_ignore_case_and_whitespace(spelling):
    from test_attention import _probe

    target = spelling.strip().lower()
    if target not in attnfast.capabilities()["isas"]:
        pytest.skip(f"{target} is not usable on this CPU")
    res = _probe(spelling)
    assert res["caps"]["isa"] == target and res["ok"]
    assert not [w for w in res["warnings"] if w[0] == "RuntimeWarning"]
    original = _core.isa()
    try:
        assert _core.set_isa(spelling) and _core.isa() == target
    finally:
        _core.set_isa(original)


# --------------------------------------------------------------------------
# 9. empty outputs cost O(1)
# --------------------------------------------------------------------------

HUGE = 10**8  # items in a broadcast batch: a per-item table of 8-byte offsets would be 800 MB


def _huge(lead, lq, d, dtype=np.float32):
    return np.broadcast_to(np.zeros((1,) * len(lead) + (lq, d), dtype), lead + (lq, d))


def _fast(fn, limit=1.0):
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    assert elapsed < limit, f"an empty result took {elapsed:.2f} s"
    return result


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_results_of_a_huge_broadcast_batch_are_o1(isa, impl):
    f = IMPLS[impl]
    lead = (HUGE, 1)
    q, k0 = _huge(lead, 4, 8), np.zeros((0, 8), np.float32)
    assert _fast(lambda: f.scores(q, k0)).shape == lead + (4, 0)
    assert _fast(lambda: f.scores(q, k0, method="general", w=np.eye(8))).shape == lead + (4, 0)
    assert _fast(lambda: f.scores(_huge(lead, 0, 8), np.zeros((5, 8), np.float32), method="additive",
                                  w_q=np.ones((3, 8)), w_k=np.ones((3, 8)))).shape == lead + (0, 5)
    q0, kv = _huge(lead, 0, 8), _huge(lead, 4, 8)
    assert _fast(lambda: f.attention(q0, kv, kv)).shape == lead + (0, 8)  # the plain path
    out, lse = _fast(lambda: f.attention(q0, kv, kv, causal=True, return_lse=True, kv_lengths=np.array(2)))
    assert out.shape == lead + (0, 8) and lse.shape == lead + (0,)
    v0 = _huge(lead, 4, 0)
    assert _fast(lambda: f.attention(q, kv, v0)).shape == lead + (4, 0)
    assert _fast(lambda: f.attention(q, kv, v0, method="general", w=np.eye(8))).shape == lead + (4, 0)
    assert _fast(lambda: f.aggregate(_huge(lead, 0, 4), kv)).shape == lead + (0, 8)
    assert _fast(lambda: f.aggregate(_huge(lead, 4, 4), v0)).shape == lead + (4, 0)
    assert _fast(lambda: f.softmax(_huge(lead, 4, 0))).shape == lead + (4, 0)


_EMPTY_CALLS = """
import resource, sys
import numpy as np
import attnfast
from attnfast import reference

def huge(lq, d):
    return np.broadcast_to(np.zeros((1, 1, lq, d), np.float32), (10**8, 1, lq, d))

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for f in (attnfast, reference):
    f.scores(huge(4, 8), np.zeros((0, 8), np.float32))
    f.attention(huge(0, 8), huge(4, 8), huge(4, 8))
    f.attention(huge(0, 8), huge(4, 8), huge(4, 8), kv_lengths=np.array(3), return_lse=True)
    f.attention(huge(4, 8), huge(4, 8), huge(4, 0))
    f.attention(huge(4, 8), huge(4, 8), huge(4, 0), method="general", w=np.eye(8))
    f.aggregate(huge(0, 4), huge(4, 8))
    f.softmax(huge(4, 0))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_empty_results_of_a_huge_broadcast_batch_allocate_nothing():
    # Peak memory of a fresh process (ru_maxrss only grows): a table of one 8-byte offset per batch
    # item would add 800 MB, a materialised broadcast several GB.
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _EMPTY_CALLS], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": __import__("os").pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    grown_mb = int(proc.stdout.strip().splitlines()[-1])
    assert grown_mb < 50, f"empty results grew the peak memory by {grown_mb} MB"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_no_keys_gives_zeros_and_minus_inf_lse(isa, impl, dtype):
    lead = (10**4, 2)
    q, k0 = _huge(lead, 3, 8, dtype), np.zeros((0, 8), dtype)
    v0 = np.zeros((0, 5), dtype)
    out, lse, w = _fast(lambda: IMPLS[impl].attention(q, k0, v0, return_lse=True, return_weights=True))
    assert out.shape == lead + (3, 5) and out.dtype == dtype and np.all(out == 0)
    assert lse.shape == lead + (3,) and np.all(lse == -np.inf)
    assert w.shape == lead + (3, 0)
    target = np.full(lead + (3, 5), 7.0, dtype)
    assert IMPLS[impl].attention(q, k0, v0, out=target) is target and np.all(target == 0)
    agg = _fast(lambda: IMPLS[impl].aggregate(_huge(lead, 3, 0, dtype), v0))
    assert agg.shape == lead + (3, 5) and np.all(agg == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_dv_still_gives_lse_and_weights(isa, rng, dtype):
    q, k, _ = _qkv(rng, (3, 2), 5, 40, 8, 1, dtype)
    v0 = np.zeros((3, 2, 40, 0), dtype)
    out, lse, w = attnfast.attention(q, k, v0, causal=True, return_lse=True, return_weights=True)
    r_out, r_lse, r_w = ref.attention(up(q), up(k), up(v0), causal=True, return_lse=True, return_weights=True)
    assert out.shape == (3, 2, 5, 0)
    assert_close_fixed(lse, r_lse, dtype)
    assert_close_fixed(w, r_w, dtype, scale=1.0)
