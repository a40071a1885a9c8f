"""Input validation: exact exception types and messages, and no needless copies.

The checks live in ``attnfast._inputs`` and are shared by the fast path and the
reference; the tests call the reference so they also cover the wiring.
"""

import re

import numpy as np
import pytest

import attnfast
from attnfast import _inputs
from attnfast import reference as ref


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def arr(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def exact(message):
    """Regex matching ``message`` literally (messages contain parentheses)."""
    return re.escape(message)


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((2, 3), dtype=np.int64),
        np.ones((2, 3), dtype=np.uint8),
        np.ones((2, 3), dtype=bool),
        np.ones((2, 3), dtype=np.complex128),
        np.ones((2, 3), dtype=np.int8),
        np.ones((2, 3), dtype=np.complex64),
        np.ones((2, 3), dtype=object),
        np.full((2, 3), "a"),
    ],
    ids=lambda a: str(a.dtype),
)
def test_non_float_q_is_type_error(rng, bad):
    k = arr(rng, 4, 3)
    msg = (f"attnfast computes in float32 or float64; q has dtype {bad.dtype}. "
           f"Convert it with q.astype(np.float32) (or np.float64). It also takes float16 and "
           f"ml_dtypes.bfloat16 arrays as they are (computed in float32): the accepted dtypes are float64, "
           f"float32, float16 or ml_dtypes.bfloat16.")
    with pytest.raises(TypeError, match=exact(msg)):
        ref.scores(bad, k)
    with pytest.raises(TypeError, match=exact(msg)):
        ref.attention(bad, k, k)


@pytest.mark.parametrize("name", ["k", "v"])
def test_non_float_k_v_is_type_error(rng, name):
    args = {"q": arr(rng, 2, 3), "k": arr(rng, 4, 3), "v": arr(rng, 4, 3)}
    args[name] = np.ones((4, 3), dtype=np.int32)
    with pytest.raises(TypeError, match=exact(f"{name} has dtype int32. Convert it with {name}.astype")):
        ref.attention(**args)


def test_softmax_aggregate_merge_dtypes(rng):
    with pytest.raises(TypeError, match=exact("x has dtype int64")):
        ref.softmax(np.arange(3))
    with pytest.raises(TypeError, match=exact("weights has dtype complex128")):
        ref.aggregate(np.ones((2, 3), complex), arr(rng, 3, 2))
    with pytest.raises(TypeError, match=exact("lses[1] has dtype int16")):
        ref.merge_states([arr(rng, 2, 3)] * 2, [arr(rng, 2), np.zeros(2, np.int16)])


def test_mixed_float_dtypes_promote(rng):
    a = _inputs.check_attention(arr(rng, 2, 3, dtype=np.float32), arr(rng, 4, 3), arr(rng, 4, 2, dtype=np.float32))
    assert a.dtype == np.float64 and a.q.dtype == a.k.dtype == a.v.dtype == np.float64
    s = _inputs.check_scores(arr(rng, 2, 3, dtype=np.float32), arr(rng, 4, 3, dtype=np.float32))
    assert s.dtype == np.float32


def test_lists_are_accepted(rng):
    s = _inputs.check_scores([[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]], method="dot")
    assert s.q.dtype == np.float64 and (s.lq, s.lk, s.d) == (1, 2, 2)


def test_ragged_input_is_value_error():
    with pytest.raises(ValueError, match=exact("q could not be converted to a NumPy array")):
        ref.scores([[1.0, 2.0], [3.0]], [[1.0, 2.0]])


# --------------------------------------------------------------------------
# no copies
# --------------------------------------------------------------------------


def test_matching_dtype_is_never_copied(rng):
    base = arr(rng, 3, 6, 4)
    q = base[::-1, ::2]  # negative and non-unit strides
    k = np.asfortranarray(arr(rng, 5, 4))
    v = arr(rng, 2, 5).T[::-1]  # transposed, then reversed: shape (5, 2)
    a = _inputs.check_attention(q, k, v)
    assert np.shares_memory(a.q, q) and a.q.strides == q.strides
    assert a.k.flags.f_contiguous and np.shares_memory(a.k, k)
    assert np.shares_memory(a.v, v) and a.v.strides == v.strides


def test_mask_bias_kv_lengths_not_broadcast_or_copied(rng):
    q, k, v = arr(rng, 2, 3, 4), arr(rng, 2, 5, 4), arr(rng, 2, 5, 4)
    mask = np.ones((1, 5), bool)
    bias = arr(rng, 3, 1)
    n = np.array([5, 3])
    a = _inputs.check_attention(q, k, v, mask=mask, bias=bias, kv_lengths=n)
    assert a.mask is mask and a.bias is bias and a.kv_lengths is n


# --------------------------------------------------------------------------
# ranks and shapes
# --------------------------------------------------------------------------


def test_q_rank(rng):
    msg = ("q must have at least 2 dimensions (..., Lq, D); got shape (5,). "
           "Use q[None, :] for a single query.")
    with pytest.raises(ValueError, match=exact(msg)):
        ref.scores(arr(rng, 5), arr(rng, 3, 5))
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(arr(rng, 5), arr(rng, 3, 5), arr(rng, 3, 5))


@pytest.mark.parametrize("name,layout", [("k", "(..., Lk, Dk)"), ("v", "(..., Lk, Dv)")])
def test_k_v_rank(rng, name, layout):
    args = {"q": arr(rng, 2, 4), "k": arr(rng, 3, 4), "v": arr(rng, 3, 4)}
    args[name] = np.float64(1.0)
    with pytest.raises(ValueError, match=exact(f"{name} must have at least 2 dimensions {layout}; got shape ().")):
        ref.attention(**args)


def test_d_mismatch_for_dot(rng):
    msg = ("method='scaled_dot' needs q and k with the same feature size D; got q shape (2, 4) (D=4) "
           "and k shape (3, 5) (D=5). Use method='general'")
    with pytest.raises(ValueError, match=exact(msg)):
        ref.scores(arr(rng, 2, 4), arr(rng, 3, 5))
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(arr(rng, 2, 4), arr(rng, 3, 5), arr(rng, 3, 1))


def test_lk_mismatch(rng):
    msg = "k and v must have the same number of keys Lk (axis -2); got k shape (2, 3, 4) and v shape (2, 5, 4)."
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(arr(rng, 2, 1, 4), arr(rng, 2, 3, 4), arr(rng, 2, 5, 4))
    with pytest.raises(ValueError, match=exact("weights has Lk=3 keys (last axis, shape (2, 3))")):
        ref.aggregate(arr(rng, 2, 3), arr(rng, 4, 2))


def test_non_broadcasting_batches(rng):
    with pytest.raises(ValueError, match=exact("do not broadcast: q (2, 3), k (4,).")):
        ref.scores(arr(rng, 2, 3, 1, 4), arr(rng, 4, 1, 4))
    with pytest.raises(ValueError, match=exact("do not broadcast: k (3, 1), v (2, 1).")):
        ref.attention(arr(rng, 1, 1, 4), arr(rng, 3, 1, 1, 4), arr(rng, 2, 1, 1, 4))
    with pytest.raises(ValueError, match=exact("do not broadcast: q (3,), k/v (2,).")):
        ref.attention(arr(rng, 3, 4, 1, 4), arr(rng, 2, 4, 1, 4), arr(rng, 2, 4, 1, 4))


def test_broadcast_batch_helper():
    assert _inputs.broadcast_batch((2, 1), (3,), ()) == (2, 3)
    with pytest.raises(ValueError, match=exact("do not broadcast: argument 0 (2,), argument 1 (3,).")):
        _inputs.broadcast_batch((2,), (3,))


def test_gqa_heads_must_divide(rng):
    msg = "q has 8 heads (axis -3) but k/v have 3; the kv heads must divide the query heads"
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(arr(rng, 8, 2, 4), arr(rng, 3, 5, 4), arr(rng, 3, 5, 4))


@pytest.mark.parametrize(
    "q_batch,kv_batch,batch,kv_out,group",
    [
        ((8,), (2,), (8,), (2,), 4),
        ((8,), (8,), (8,), (8,), 1),
        ((8,), (1,), (8,), (1,), 8),
        ((1,), (4,), (4,), (4,), 1),
        ((3, 6), (2,), (3, 6), (3, 2), 3),
        ((5, 1, 6), (4, 3), (5, 4, 6), (5, 4, 3), 2),
        ((), (2, 3), (2, 3), (2, 3), 1),
        ((2, 3), (), (2, 3), (2, 3), 1),
    ],
)
def test_gqa_batch_rule(rng, q_batch, kv_batch, batch, kv_out, group):
    a = _inputs.check_attention(
        arr(rng, *q_batch, 2, 4), arr(rng, *kv_batch, 5, 4), arr(rng, *kv_batch, 5, 3))
    assert (a.batch_shape, a.kv_batch_shape, a.group) == (batch, kv_out, group)


# --------------------------------------------------------------------------
# method, scale and method weights
# --------------------------------------------------------------------------


def test_unknown_method(rng):
    msg = ("unknown method 'cosine'; valid methods are 'dot', 'scaled_dot', 'general', "
           "'concat', 'additive'.")
    with pytest.raises(ValueError, match=exact(msg)):
        ref.scores(arr(rng, 2, 3), arr(rng, 2, 3), method="cosine")
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(arr(rng, 2, 3), arr(rng, 2, 3), arr(rng, 2, 3), method="cosine")


def test_scale_defaults_and_validation(rng):
    q, k = arr(rng, 2, 16), arr(rng, 3, 16)
    assert _inputs.check_scores(q, k).scale == 0.25
    assert _inputs.check_scores(q, k, method="dot").scale == 1.0
    assert _inputs.check_scores(q, k, scale=np.float32(2)).scale == 2.0
    with pytest.raises(ValueError, match=exact("scale must be finite; got inf.")):
        ref.scores(q, k, scale=np.inf)
    with pytest.raises(ValueError, match=exact("scale must be finite; got nan.")):
        ref.attention(q, k, k, scale=float("nan"))
    with pytest.raises(TypeError, match=exact("scale must be a real number")):
        ref.scores(q, k, scale="0.5")


@pytest.mark.parametrize(
    "method,kwargs,message",
    [
        ("general", {}, "method='general' requires w of shape (D, Dk) = (4, 6); got None."),
        ("general", {"w": np.ones((6, 4))},
         "w for method='general' must have shape (D, Dk) = (4, 6); got shape (6, 4)."),
        ("concat", {"w_k": np.ones(6)}, "method='concat' requires w_q of shape (D,) = (4,); got None."),
        ("concat", {"w_q": np.ones(4)}, "method='concat' requires w_k of shape (Dk,) = (6,); got None."),
        ("concat", {"w_q": np.ones(4), "w_k": np.ones(4)},
         "w_k for method='concat' must have shape (Dk,) = (6,); got shape (4,)."),
        ("concat", {"w_q": np.ones(4), "w_k": np.ones(6), "score_bias": np.ones(1)},
         "score_bias for method='concat' must be a scalar (shape ()); got shape (1,)."),
        ("additive", {"w_k": np.ones((3, 6))},
         "method='additive' with w_q=None takes q as already projected queries W_q q of shape (..., Lq, A) = "
         "(..., Lq, 3); got D=4. Pass w_q of shape (A, D) = (3, 4) to project them."),
        ("additive", {"w_q": np.ones((3, 5)), "w_k": np.ones((3, 6))},
         "w_q for method='additive' must have shape (A, D) = (A, 4); got shape (3, 5)."),
        ("additive", {"w_q": np.ones((3, 4))},
         "method='additive' with w_k=None takes k as already projected keys W_k k of shape (..., Lk, A) = "
         "(..., Lk, 3); got Dk=6. Pass w_k of shape (A, Dk) = (3, 6) to project them."),
        ("additive", {"w_q": np.ones((3, 4)), "w_k": np.ones((2, 6))},
         "w_k for method='additive' must have shape (A, Dk) = (3, 6); got shape (2, 6)."),
        ("additive", {"w_q": np.ones((3, 4)), "w_k": np.ones((3, 6)), "v_a": np.ones(2)},
         "v_a for method='additive' must have shape (A,) = (3,); got shape (2,)."),
        ("additive", {"w_q": np.ones((3, 4)), "w_k": np.ones((3, 6)), "score_bias": 0.5},
         "score_bias for method='additive' must have shape (A,) = (3,); got shape ()."),
    ],
)
def test_method_weights_missing_or_misshaped(rng, method, kwargs, message):
    q, k = arr(rng, 2, 4), arr(rng, 5, 6)
    with pytest.raises(ValueError, match=exact(message)):
        ref.scores(q, k, method=method, **kwargs)
    with pytest.raises(ValueError, match=exact(message)):
        ref.attention(q, k, arr(rng, 5, 2), method=method, **kwargs)


@pytest.mark.parametrize(
    "method,kwargs,message",
    [
        ("scaled_dot", {"w": np.ones((4, 4))}, "w is only used by method='general'; got method='scaled_dot'."),
        ("dot", {"v_a": np.ones(3)}, "v_a is only used by method='additive'; got method='dot'."),
        ("general", {"w": np.ones((4, 4)), "w_q": np.ones(4)},
         "w_q is only used by method='concat' or method='additive'; got method='general'."),
        ("concat", {"w_q": np.ones(4), "w_k": np.ones(4), "v_a": np.ones(1)},
         "v_a is only used by method='additive'; got method='concat'."),
        ("additive", {"w": np.ones((4, 4))}, "w is only used by method='general'; got method='additive'."),
        ("dot", {"score_bias": 0.0}, "score_bias is only used by method='concat' or method='additive'"),
    ],
)
def test_unused_method_weights(rng, method, kwargs, message):
    q, k = arr(rng, 2, 4), arr(rng, 5, 4)
    with pytest.raises(ValueError, match=exact(message)):
        ref.scores(q, k, method=method, **kwargs)


def test_method_weight_dtypes(rng):
    q, k = arr(rng, 2, 4, dtype=np.float32), arr(rng, 5, 3, dtype=np.float32)
    # Integer weights convert exactly; the computation dtype stays that of q/k.
    a = _inputs.check_scores(q, k, method="general", w=np.ones((4, 3), dtype=np.int64))
    assert a.w.dtype == np.float32
    with pytest.raises(TypeError, match=exact("w must be a real floating-point array; got dtype complex128.")):
        ref.scores(q, k, method="general", w=np.ones((4, 3), complex))


def test_method_weight_defaults(rng):
    q, k = arr(rng, 2, 4), arr(rng, 5, 3)
    c = _inputs.check_scores(q, k, method="concat", w_q=np.ones(4), w_k=np.ones(3))
    assert c.score_bias.shape == () and c.score_bias == 0.0 and c.hidden == 0
    a = _inputs.check_scores(q, k, method="additive", w_q=np.ones((7, 4)), w_k=np.ones((7, 3)))
    assert a.hidden == 7
    np.testing.assert_array_equal(a.v_a, np.ones(7))
    np.testing.assert_array_equal(a.score_bias, np.zeros(7))
    assert a.w is None


# --------------------------------------------------------------------------
# softmax arguments
# --------------------------------------------------------------------------


def test_softmax_axis_checks(rng):
    x = arr(rng, 2, 3)
    assert _inputs.check_softmax(x, -1, None).axis == 1
    assert _inputs.check_softmax(x, np.int64(-2), None).axis == 0
    with pytest.raises(ValueError, match=exact("axis 2 is out of range for x with 2 dimension(s)")):
        ref.softmax(x, axis=2)
    with pytest.raises(TypeError, match=exact("axis must be an integer; got 1.0")):
        ref.softmax(x, axis=1.0)
    with pytest.raises(ValueError, match=exact("x must have at least 1 dimension; got shape ().")):
        ref.softmax(np.float64(1.0))


def test_softmax_mask_checks(rng):
    x = arr(rng, 2, 3)
    with pytest.raises(TypeError, match=exact("mask must be a boolean array (True = attend); got dtype int64.")):
        ref.softmax(x, mask=np.ones((2, 3), dtype=np.int64))
    msg = "mask has shape (3, 2), which does not broadcast to the shape of x (2, 3)."
    with pytest.raises(ValueError, match=exact(msg)):
        ref.softmax(x, mask=np.ones((3, 2), bool))
    # A mask must not enlarge x.
    with pytest.raises(ValueError, match=exact("mask has shape (4, 2, 3)")):
        ref.softmax(x, mask=np.ones((4, 2, 3), bool))


# --------------------------------------------------------------------------
# attention-only arguments
# --------------------------------------------------------------------------


@pytest.fixture
def batch_qkv(rng):
    # batch (2, 4 heads), Lq=3, Lk=5
    return arr(rng, 2, 4, 3, 8), arr(rng, 2, 4, 5, 8), arr(rng, 2, 4, 5, 6)


def test_bad_mask(batch_qkv):
    q, k, v = batch_qkv
    with pytest.raises(TypeError, match=exact("mask must be a boolean array (True = attend); got dtype float64.")):
        ref.attention(q, k, v, mask=np.ones((3, 5)))
    msg = ("mask has shape (5, 3), which does not broadcast to the score shape batch_shape + (Lq, Lk) "
           "(2, 4, 3, 5).")
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(q, k, v, mask=np.ones((5, 3), bool))


def test_bad_bias(batch_qkv):
    q, k, v = batch_qkv
    msg = "bias has shape (2, 3, 5), which does not broadcast to the score shape"
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(q, k, v, bias=np.zeros((2, 3, 5)))
    with pytest.raises(TypeError, match=exact("bias must be a real floating-point array; got dtype bool.")):
        ref.attention(q, k, v, bias=np.zeros((3, 5), bool))


def test_bad_kv_lengths(batch_qkv):
    q, k, v = batch_qkv
    with pytest.raises(ValueError, match=exact("kv_lengths must lie in [0, Lk] = [0, 5]; got -1.")):
        ref.attention(q, k, v, kv_lengths=np.array([[-1], [3]]))
    with pytest.raises(ValueError, match=exact("kv_lengths must lie in [0, Lk] = [0, 5]; got 6.")):
        ref.attention(q, k, v, kv_lengths=6)
    with pytest.raises(TypeError, match=exact("kv_lengths must be an integer array")):
        ref.attention(q, k, v, kv_lengths=np.array([2.0, 3.0])[:, None])
    msg = ("kv_lengths has shape (2,), which does not broadcast to the batch shape (2, 4). "
           "Batch axes align from the right; for one length per leading batch entry add trailing "
           "size-1 axes, e.g. kv_lengths[:, None].")
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(q, k, v, kv_lengths=np.array([2, 3]))


def test_kv_lengths_become_int64(batch_qkv):
    q, k, v = batch_qkv
    a = _inputs.check_attention(q, k, v, kv_lengths=np.array([[2], [5]], dtype=np.uint8))
    assert a.kv_lengths.dtype == np.int64 and a.kv_lengths.shape == (2, 1)


def test_causal_align_and_offset(batch_qkv):
    q, k, v = batch_qkv
    assert _inputs.check_attention(q, k, v).diagonal_offset == 0
    assert _inputs.check_attention(q, k, v, causal=True, causal_align="bottom_right").diagonal_offset == 2
    msg = "unknown causal_align 'bottom'; valid values are 'top_left', 'bottom_right'."
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(q, k, v, causal=True, causal_align="bottom")
    # A non-string (an array compares elementwise) gets the same message, not NumPy's truth-value error.
    for f in (ref.attention, attnfast.attention):
        with pytest.raises(ValueError, match="^unknown causal_align array"):
            f(q, k, v, causal=True, causal_align=np.array(["top_left", "bottom_right"]))
    with pytest.raises(TypeError, match=exact("causal must be True or False; got 'yes'")):
        ref.attention(q, k, v, causal="yes")


def test_window_values(batch_qkv):
    q, k, v = batch_qkv
    for window, expected in [(None, (-1, -1)), ((3, 0), (3, 0)), ((None, 2), (-1, 2)), ([0, None], (0, -1))]:
        a = _inputs.check_attention(q, k, v, window=window)
        assert (a.window_left, a.window_right) == expected


def test_bad_window(batch_qkv):
    q, k, v = batch_qkv
    with pytest.raises(ValueError, match=exact("window left must be >= 0 (or None for unbounded); got -1.")):
        ref.attention(q, k, v, window=(-1, 0))
    with pytest.raises(ValueError, match=exact("window must be a pair (left, right); got 3 values")):
        ref.attention(q, k, v, window=(1, 2, 3))
    msg = "window must be a pair (left, right) of non-negative ints or None; got 4."
    with pytest.raises(TypeError, match=exact(msg)):
        ref.attention(q, k, v, window=4)
    with pytest.raises(TypeError, match=exact("window right must be an int >= 0 or None; got 1.5.")):
        ref.attention(q, k, v, window=(1, 1.5))


def test_bad_out(batch_qkv):
    q, k, v = batch_qkv
    msg = ("out has shape (2, 4, 3, 5) but the result has shape batch_shape + (Lq, Dv) = (2, 4, 3, 6). "
           "Allocate it with np.empty((2, 4, 3, 6), dtype=np.float64).")
    with pytest.raises(ValueError, match=exact(msg)):
        ref.attention(q, k, v, out=np.empty((2, 4, 3, 5)))
    msg = ("out has dtype int64 but the result has dtype float64 (the promoted dtype of q, k, v), and out= "
           "must have one of the dtypes float64, float32, float16 or ml_dtypes.bfloat16 (the result is rounded "
           "once into it). Allocate out with dtype=np.float64.")
    with pytest.raises(TypeError, match=exact(msg)):
        ref.attention(q, k, v, out=np.empty((2, 4, 3, 6), np.int64))
    read_only = np.zeros((2, 4, 3, 6))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=exact("out is read-only")):
        ref.attention(q, k, v, out=read_only)
    with pytest.raises(TypeError, match=exact("out must be a NumPy ndarray of shape (2, 4, 3, 6)")):
        ref.attention(q, k, v, out=np.zeros((2, 4, 3, 6)).tolist())


def test_failed_call_leaves_out_untouched(batch_qkv):
    q, k, v = batch_qkv
    out = np.full((2, 4, 3, 6), 7.0)
    with pytest.raises(ValueError):
        ref.attention(q, k, v, out=out, kv_lengths=99)
    assert np.all(out == 7.0)


def test_out_is_not_copied(batch_qkv):
    q, k, v = batch_qkv
    out = np.empty((2, 4, 3, 6))
    assert _inputs.check_attention(q, k, v, out=out).out is out


def test_return_flags_must_be_bool(batch_qkv):
    q, k, v = batch_qkv
    with pytest.raises(TypeError, match=exact("return_lse must be True or False; got 1")):
        ref.attention(q, k, v, return_lse=1)


# --------------------------------------------------------------------------
# merge_states
# --------------------------------------------------------------------------


def test_merge_states_mismatches(rng):
    o, s = arr(rng, 2, 3, 4), arr(rng, 2, 3)
    with pytest.raises(ValueError, match=exact("merge_states needs at least one part; got empty outs.")):
        ref.merge_states([], [])
    with pytest.raises(ValueError, match=exact("outs and lses must have the same length; got 2 outs and 1 lses.")):
        ref.merge_states([o, o], [s])
    with pytest.raises(ValueError, match=exact("outs[1] has shape (2, 3, 5) but outs[0] has shape (2, 3, 4)")):
        ref.merge_states([o, arr(rng, 2, 3, 5)], [s, s])
    msg = "lses[0] has shape (2, 4) but must have shape outs.shape[:-1] = (2, 3)."
    with pytest.raises(ValueError, match=exact(msg)):
        ref.merge_states([o, o], [arr(rng, 2, 4), s])
    msg = "outs[0] must have at least 2 dimensions (..., Lq, Dv); got shape (4,)."
    with pytest.raises(ValueError, match=exact(msg)):
        ref.merge_states([arr(rng, 4)], [np.float64(0.0)])
    with pytest.raises(TypeError, match=exact("outs and lses must be lists (one entry per part); got an ndarray.")):
        ref.merge_states(np.stack([o, o]), np.stack([s, s]))


def test_merge_states_promotes(rng):
    m = _inputs.check_merge_states([arr(rng, 2, 3, dtype=np.float32)], [arr(rng, 2)])
    assert m.dtype == np.float64 and m.shape == (2, 3)


# --------------------------------------------------------------------------
# the fast path raises exactly what the reference raises
# --------------------------------------------------------------------------

_F = np.ones((2, 3, 4, 8), np.float32)
_K = np.ones((2, 3, 6, 8), np.float32)
_BAD_CALLS = {
    "int q": ("attention", (np.ones((4, 8), int), _K[0, 0], _K[0, 0]), {}),
    "complex k": ("scores", (_F, np.ones((2, 3, 6, 8), complex)), {}),
    "int8 v": ("attention", (_F, _K, np.ones((2, 3, 6, 8), np.int8)), {}),
    "object x": ("softmax", (np.ones((2, 3), object),), {}),
    "1-D q": ("attention", (np.ones(8, np.float32), _K, _K), {}),
    "D mismatch": ("attention", (_F, np.ones((2, 3, 6, 7), np.float32), _K), {}),
    "Lk mismatch": ("attention", (_F, _K, np.ones((2, 3, 5, 8), np.float32)), {}),
    "batch mismatch": ("attention", (_F, np.ones((3, 3, 6, 8), np.float32), np.ones((3, 3, 6, 8), np.float32)), {}),
    "heads do not divide": ("attention", (np.ones((2, 4, 4, 8), np.float32), _K, _K), {}),
    "mask dtype": ("attention", (_F, _K, _K), {"mask": np.ones((4, 6))}),
    "mask shape": ("attention", (_F, _K, _K), {"mask": np.ones((4, 5), bool)}),
    "bias shape": ("attention", (_F, _K, _K), {"bias": np.ones((3, 6))}),
    "kv_lengths negative": ("attention", (_F, _K, _K), {"kv_lengths": np.array(-1)}),
    "kv_lengths too large": ("attention", (_F, _K, _K), {"kv_lengths": np.array([[7, 1, 1]] * 2)}),
    "kv_lengths float": ("attention", (_F, _K, _K), {"kv_lengths": np.array(2.5)}),
    "unknown method": ("attention", (_F, _K, _K), {"method": "cosine"}),
    "unknown causal_align": ("attention", (_F, _K, _K), {"causal": True, "causal_align": "center"}),
    "negative window": ("attention", (_F, _K, _K), {"window": (-1, 2)}),
    "missing w": ("attention", (_F, _K, _K), {"method": "general"}),
    "w shape": ("scores", (_F, _K), {"method": "general", "w": np.ones((8, 7))}),
    "unused weight": ("attention", (_F, _K, _K), {"w": np.ones((8, 8))}),
    "out shape": ("attention", (_F, _K, _K), {"out": np.empty((2, 3, 4, 7), np.float32)}),
    "out dtype": ("attention", (_F, _K, _K), {"out": np.empty((2, 3, 4, 8), np.int32)}),
    "out read-only": ("attention", (_F, _K, _K), {"out": np.broadcast_to(np.float32(0), (2, 3, 4, 8))}),
    "softmax axis": ("softmax", (_F,), {"axis": 4}),
    "aggregate Lk": ("aggregate", (np.ones((4, 6), np.float32), np.ones((5, 2), np.float32)), {}),
    "merge mismatch": ("merge_states", ([np.ones((4, 8))] * 2, [np.ones(4), np.ones(5)]), {}),
}


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_fast_path_raises_exactly_what_the_reference_raises(case):
    import attnfast

    fn, args, kwargs = _BAD_CALLS[case]
    with pytest.raises((TypeError, ValueError)) as expected:
        getattr(ref, fn)(*args, **kwargs)
    out = kwargs.get("out")
    before = None if out is None else out.copy()
    with pytest.raises(expected.type, match=exact(str(expected.value))):
        getattr(attnfast, fn)(*args, **kwargs)
    if out is not None:
        assert np.array_equal(out, before, equal_nan=True)  # a caller's out= is untouched on error
