"""The fast path: validate with :mod:`attnfast._inputs`, allocate, call the compiled core.

Every function here has the same signature, errors and semantics as its twin in
:mod:`attnfast.reference`; the tests hold the two together.

Storage and computation dtypes: the compiled core reads arrays stored in a dtype S (float64, float32,
float16 or bfloat16) and computes in T = float64 for S = float64, else float32. Each kernel takes the
operands it streams (k and v; the stage kernels' inputs) in one S, q in S or T, writes its result in S or
T, and takes everything else (bias, lse, weights, v_a, projections) in T. This module converts what does
not fit exactly (e.g. k bfloat16 with v float16: both to float32; a float64 q with a bfloat16 cache: the
cache to float64) and rounds a result the kernel cannot write (a float16 out= of a bfloat16 attention)
once, from T.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, SupportsIndex, Tuple, overload

import numpy as np

from . import _attnfast as _core
from . import _inputs
from ._grads import AttentionGrads, sum_to_shape
from ._types import Array, ArrayLike, AttentionOutput, CausalAlign, FloatArray, Method, Real, Window

__all__ = ["scores", "softmax", "aggregate", "attention", "merge_states", "attention_backward"]


def _one_storage(x: np.ndarray, y: np.ndarray, compute: np.dtype) -> Tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` in one storage dtype whose kernels compute in ``compute``: as given when they
    already are, else both converted (exactly) to ``compute``."""
    if x.dtype == y.dtype and _inputs.compute_dtype(x.dtype) == compute:
        return x, y
    return x.astype(compute), y.astype(compute)


def _storage_or_compute(x: np.ndarray, storage: np.dtype, compute: np.dtype) -> np.ndarray:
    """``x`` as given when its dtype is ``storage`` or ``compute`` (what the kernels take for q), else
    converted to ``compute``."""
    return x if x.dtype == storage or x.dtype == compute else x.astype(compute)


def _written(result: np.dtype, storage: np.dtype, compute: np.dtype) -> np.dtype:
    """The dtype a kernel reading ``storage`` writes a result of dtype ``result`` in: that dtype when it
    can (the storage or the computation dtype), else the computation dtype (rounded once afterwards):
    e.g. a bfloat16 concat attention, whose keys became float32 projections and v with them."""
    return result if result == storage or result == compute else compute


def _finished(result: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A result computed in the computation dtype, rounded once into the result ``dtype``."""
    return result if result.dtype == dtype else _inputs.round_to(result, dtype)


def _copy_rounded(target: np.ndarray, result: np.ndarray) -> None:
    """Copy ``result`` into ``target`` (any storage dtype and byte order), rounding once."""
    if result.dtype != target.dtype.newbyteorder("="):
        result = _inputs.round_to(result, target.dtype.newbyteorder("="))
    np.copyto(target, result, casting="unsafe")


def _kernel_layout(a: np.ndarray, unit_last_axis: bool = False) -> np.ndarray:
    """Return ``a`` in a layout the kernels read, copying only if it is not one already.

    The kernels take any element strides (negative and zero included) but need aligned elements, so an
    unaligned array (e.g. a packed structured-field view, strides (17, 4) for float32) is copied once;
    with ``unit_last_axis`` (the operands the kernels vectorise along the feature axis) a transposed,
    strided or broadcast last axis is copied too. Other broadcast (stride-0) axes stay broadcast: only
    the distinct data is copied, never the broadcast expansion.
    """
    if a.ndim == 0 or a.flags.aligned and (not unit_last_axis or a.shape[-1] <= 1 or a.strides[-1] == a.itemsize):
        return a
    keep_broadcast = [st == 0 and n > 1 for n, st in zip(a.shape, a.strides)]
    if unit_last_axis:
        keep_broadcast[-1] = False
    distinct = tuple(slice(0, 1) if b else slice(None) for b in keep_broadcast)
    # np.array, not np.ascontiguousarray: the latter returns an unaligned C-contiguous array as it is.
    return np.broadcast_to(np.array(a[distinct], order="C"), a.shape)


def _unit_last_axis(a: np.ndarray) -> np.ndarray:
    """``a`` aligned with a unit-stride last axis (see :func:`_kernel_layout`)."""
    return _kernel_layout(a, unit_last_axis=True)


def _projected(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w over the last axis of x, as one 2-D GEMM.

    Projections (general: q W; concat: w_q.q; additive: W_q q, W_k k) are plain GEMMs done once per
    call, and NumPy's BLAS does them well; but a stacked (..., L, D) @ (D, A) matmul runs one small
    GEMM per batch item, 100x slower here than folding the batch axes into the rows first.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]) if x.size else x.reshape(int(np.prod(lead)), x.shape[-1])
    # NaN and inf are data (e.g. garbage in keys a mask hides, which the kernels never read): no warning.
    with np.errstate(invalid="ignore", over="ignore"):
        product = flat @ w
    return np.ascontiguousarray(product.reshape(lead + w.shape[1:]))


def scores(q: ArrayLike, k: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
           w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None, w_k: Optional[ArrayLike] = None,
           v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None, **unexpected: Any) -> Array:
    """Score every query against every key: the first of attention's three stages.

    Parameters
    ----------
    q : array_like, (..., Lq, D)
        Queries: float64, float32, float16 or ml_dtypes.bfloat16. Leading axes are batch axes that
        broadcast against k's and v's as in np.matmul; axis -3 is the head axis (Hq).
    k : array_like, (..., Lk, Dk)
        Keys, in one of the same four dtypes. Dk = D for "dot" and "scaled_dot"; "general", "concat" and
        "additive" allow any Dk (and "additive" with ``w_k=None`` takes keys already projected, Dk = A).
    method : {"scaled_dot", "dot", "general", "concat", "additive"}, default "scaled_dot"
        The score rule: "dot" q_i . k_j; "scaled_dot" (q_i . k_j) * scale; "general" q_i W k_j (Luong);
        "concat" w_q . q_i + w_k . k_j + b; "additive" v_a . tanh(W_q q_i + W_k k_j + b) (Bahdanau).
    scale : float, optional
        Multiplies every method's score; default 1/sqrt(D) for "scaled_dot", 1 otherwise. Must be finite in
        the computation dtype.
    w : array_like, (D, Dk), optional
        The bilinear weight of "general" (required there, rejected elsewhere). This and the other method
        weights may have any floating storage dtype or an integer dtype: they are converted to the
        computation dtype.
    w_q : array_like, optional
        "concat": (D,), required. "additive": (A, D), or None when q is already projected (D = A).
    w_k : array_like, optional
        "concat": (Dk,), required. "additive": (A, Dk), or None when k is already projected (Dk = A).
    v_a : array_like, (A,), optional
        The output weights of "additive"; default ones.
    score_bias : array_like, optional
        "concat": a scalar (default 0); "additive": (A,) (default zeros), added inside the tanh.
    **unexpected
        No other keyword argument is accepted: TypeError, naming attnfast's equivalent of a PyTorch,
        flash-attn or JAX name (``is_causal``, ``attn_mask``, ``dim``...) or the closest accepted name.

    Returns
    -------
    ndarray, (..., Lq, Lk)
        The scores s_ij, in the promoted dtype of q and k (NumPy's promotion; float16 with bfloat16 gives
        float32).

    Raises
    ------
    TypeError
        An array of a dtype attnfast does not compute with (integers for the floating inputs, complex,
        float8, long double, object; a torch bfloat16 tensor, with how to pass it), a non-bool mask or flag,
        a non-integer kv_lengths or window side, an unexpected keyword argument.
    ValueError
        Shapes that do not match or broadcast, an unknown method or causal_align, a method weight missing
        or given to a method that does not take it, a scale that is not finite in the computation dtype,
        window sides or kv_lengths out of range, or a result too large for one array. Every message names
        the argument, what was received and what was expected.

    See Also
    --------
    softmax : the second stage.
    attention : all three stages fused, without the (..., Lq, Lk) matrix.
    attnfast.reference.scores : the float64 reference.

    Notes
    -----
    Computed in float32 (float64 when q or k is float64); 16-bit inputs are converted exactly on load and
    the result rounded once. Dot products are (q . k) * scale (the fused :func:`attention` scales q first,
    which differs only where q . k overflows); a score beyond the computation dtype's range is +-inf. The
    projections of "general", "concat" and "additive" are computed once per call, in the computation dtype.
    Long dot products are summed in blocks of 512 terms, so the error grows with log D.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> k = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    >>> attnfast.scores(q, k, method="dot")
    array([[1., 0., 1.],
           [0., 1., 1.]], dtype=float32)
    >>> print(attnfast.scores(q, k).round(4))  # scaled by 1/sqrt(2)
    [[0.7071 0.     0.7071]
     [0.     0.7071 0.7071]]

    Bahdanau's additive score with learned projections (A = 3):

    >>> rng = np.random.default_rng(0)
    >>> w_q, w_k = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    >>> attnfast.scores(q, k, method="additive", w_q=w_q, w_k=w_k).shape
    (2, 3)
    """
    if unexpected:
        _inputs.reject_unexpected(scores, unexpected)
    a = _inputs.check_scores(q, k, method=method, scale=scale, w=w, w_q=w_q, w_k=w_k, v_a=v_a,
                             score_bias=score_bias)
    shape = a.batch_shape + (a.lq, a.lk)
    if 0 in shape:
        # O(1) whatever the (broadcast) batch: no projection, no kernel, no per-item table.
        return np.empty(shape, a.dtype)
    batch = list(a.batch_shape)
    t = a.compute
    if a.method in ("dot", "scaled_dot"):
        qq, kk = _one_storage(a.q, a.k, t)
        out = np.empty(shape, _written(a.dtype, kk.dtype, t))
        _core.scores_dot(_unit_last_axis(qq), _unit_last_axis(kk), out, batch, a.scale)
        return _finished(out, a.dtype)
    # The projected methods compute in t from q and k converted to t, and round once at the end.
    q_t, k_t = a.q.astype(t, copy=False), a.k.astype(t, copy=False)
    out = np.empty(shape, t)
    if a.method == "general":
        assert a.w is not None  # check_scores gives every method its weights
        _core.scores_dot(_projected(q_t, a.w), _unit_last_axis(k_t), out, batch, a.scale)
    elif a.method == "concat":
        assert a.w_q is not None and a.w_k is not None
        # Separable: w_q.q_i + w_k.k_j + b is an outer sum of two projections.
        q_term = _projected(q_t, a.w_q)[..., :, None]
        k_term = _projected(k_t, a.w_k)[..., None, :]
        np.add(q_term, k_term, out=out)
        out += a.score_bias
        if a.scale != 1.0:
            out *= t.type(a.scale)
    else:
        qp = (q_t if a.w_q is None else _projected(q_t, a.w_q.T)) + a.score_bias
        kp = _unit_last_axis(k_t) if a.w_k is None else _projected(k_t, a.w_k.T)
        assert a.v_a is not None
        _core.scores_additive(qp, kp, _unit_last_axis(a.v_a), out, batch, a.scale)
    return _finished(out, a.dtype)


def softmax(x: ArrayLike, axis: SupportsIndex = -1, *, mask: Optional[ArrayLike] = None,
            **unexpected: Any) -> Array:
    """Numerically stable softmax along ``axis``, with an optional bool mask.

    Parameters
    ----------
    x : array_like
        Logits: float64, float32, float16 or ml_dtypes.bfloat16, any shape with at least one axis.
        -inf entries get weight 0.
    axis : int, default -1
        The axis to normalise over.
    mask : array_like of bool, optional
        Broadcastable to x's shape; True = keep, False = weight exactly 0.
    **unexpected
        No other keyword argument is accepted: TypeError, naming attnfast's equivalent of a PyTorch,
        flash-attn or JAX name (``is_causal``, ``attn_mask``, ``dim``...) or the closest accepted name.

    Returns
    -------
    ndarray
        The weights, x's shape and dtype; each row sums to 1 over its visible entries.

    Raises
    ------
    TypeError
        x of a dtype attnfast does not compute with, a mask that is not bool, or an axis that is not an int.
    ValueError
        x is 0-d, axis is out of range, or the mask does not broadcast to x.

    See Also
    --------
    scores, aggregate, attnfast.reference.softmax

    Notes
    -----
    The maximum of each row's visible entries is subtracted first, so any finite logits work (+-1e30, or
    spreads of 1e4). Computed in float32 (float64 for float64 x), the result rounded once. A row with no
    visible entry (all masked, or all -inf) gives all zeros, never NaN. A row whose maximum is +inf splits
    its weight evenly over its +inf entries, the others weigh 0. Rows are summed in blocks of 1024 entries
    added pairwise.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> print(attnfast.softmax(np.array([1.0, 2.0, 3.0])).round(4))
    [0.09   0.2447 0.6652]
    >>> x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    >>> mask = np.array([[True, True, False], [False, False, False]])
    >>> print(attnfast.softmax(x, mask=mask).round(4))  # the empty second row gives zeros
    [[0.2689 0.7311 0.    ]
     [0.     0.     0.    ]]
    """
    if unexpected:
        _inputs.reject_unexpected(softmax, unexpected)
    a = _inputs.check_softmax(x, axis, mask)
    out = np.empty(a.x.shape, a.dtype)
    if out.size == 0:
        return out
    xv = np.moveaxis(a.x, a.axis, -1)
    ov = np.moveaxis(out, a.axis, -1)
    mv = None if a.mask is None else np.moveaxis(np.broadcast_to(a.mask, a.x.shape), a.axis, -1)
    if xv.ndim == 1:
        xv, ov = xv[None], ov[None]
        mv = None if mv is None else mv[None]
    _core.softmax(_kernel_layout(xv), mv, ov)
    return out


def aggregate(weights: ArrayLike, v: ArrayLike, **unexpected: Any) -> Array:
    """Context vectors C_i = sum_j a_ij v_j: the third stage, weights @ v.

    Parameters
    ----------
    weights : array_like, (..., Lq, Lk)
        The attention weights (e.g. :func:`softmax` of :func:`scores`): float64, float32, float16 or
        ml_dtypes.bfloat16.
    v : array_like, (..., Lk, Dv)
        The values, in one of the same dtypes. Batch axes broadcast with weights' as in np.matmul.
    **unexpected
        No other keyword argument is accepted: TypeError, naming attnfast's equivalent of a PyTorch,
        flash-attn or JAX name (``is_causal``, ``attn_mask``, ``dim``...) or the closest accepted name.

    Returns
    -------
    ndarray, (..., Lq, Dv)
        In the promoted dtype of weights and v. Lk = 0 gives zeros (an empty sum).

    Raises
    ------
    TypeError
        An input of a dtype attnfast does not compute with.
    ValueError
        Lk of weights and v differ, or the batch axes do not broadcast.

    See Also
    --------
    attention : the three stages fused.
    attnfast.reference.aggregate : the float64 reference.

    Notes
    -----
    Computed in float32 (float64 when an input is float64), 16-bit inputs converted exactly on load and the
    result rounded once; the sum over Lk runs in blocks of 512 terms, so the error grows with log Lk.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> weights = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    >>> v = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    >>> attnfast.aggregate(weights, v)
    array([[0.5, 0.5],
           [0.5, 0.5]], dtype=float32)
    """
    if unexpected:
        _inputs.reject_unexpected(aggregate, unexpected)
    a = _inputs.check_aggregate(weights, v)
    if a.lk == 0:
        # An empty sum; also O(1) for an empty result, whatever the (broadcast) batch.
        return np.zeros(a.batch_shape + (a.lq, a.dv), a.dtype)
    shape = a.batch_shape + (a.lq, a.dv)
    if 0 in shape:
        return np.empty(shape, a.dtype)
    weights, v = _one_storage(a.weights, a.v, a.compute)
    out = np.empty(shape, _written(a.dtype, v.dtype, a.compute))
    _core.aggregate(_unit_last_axis(weights), _unit_last_axis(v), out, list(a.batch_shape))
    return _finished(out, a.dtype)


def _score_operands(a: _inputs.AttentionArgs) -> Tuple[np.ndarray, np.ndarray, float, Optional[np.ndarray]]:
    """q, k, scale and v_a for the fused kernel's score rule (v_a is None for dot-product scores).

    general folds W into q once; concat becomes a 2-feature dot product
    [scale (w_q.q_i + b), scale] . [1, w_k.k_j]; additive hands over the projected queries (bias
    included) and keys, and the kernel evaluates v_a . tanh(qp_i + kp_j) tile by tile. Projections are
    computed in the computation dtype from q and k converted to it; unprojected operands stay as stored.
    """
    t = a.compute
    if a.method in ("dot", "scaled_dot"):
        return a.q, a.k, a.scale, None
    if a.method == "general":
        assert a.w is not None  # check_attention gives every method its weights
        return _projected(a.q.astype(t, copy=False), a.w), a.k, a.scale, None
    if a.method == "concat":
        assert a.w_q is not None and a.w_k is not None
        q_term = (_projected(a.q.astype(t, copy=False), a.w_q) + a.score_bias) * t.type(a.scale)
        qq = np.stack([q_term, np.full_like(q_term, a.scale)], axis=-1)
        k_term = _projected(a.k.astype(t, copy=False), a.w_k)
        kk = np.stack([np.ones_like(k_term), k_term], axis=-1)
        return qq, kk, 1.0, None
    qp = (a.q.astype(t, copy=False) if a.w_q is None else _projected(a.q.astype(t, copy=False), a.w_q.T)) \
        + a.score_bias
    # The kernels evaluate tanh(qp + kp) only on compute-type operands: unprojected 16-bit keys are
    # widened (exactly) like the projections, never read as a 16-bit cache.
    kp = a.k.astype(t, copy=False) if a.w_k is None else _projected(a.k.astype(t, copy=False), a.w_k.T)
    assert a.v_a is not None
    return qp, kp, a.scale, _unit_last_axis(a.v_a)


def _kernel_operands(a: _inputs.AttentionArgs
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float, Optional[np.ndarray]]:
    """q, k, v, scale and v_a as the fused kernel takes them: k and v in one storage dtype S, q in S
    or the computation dtype (see the module docstring), each with an aligned unit-stride last axis.
    An int8 cache stays int8 (its kernels dequantise on load), with q in float32."""
    qq, kk, kernel_scale, v_a = _score_operands(a)
    if a.k_scale is None:
        kk, vv = _one_storage(kk, a.v, a.compute)
    else:
        vv = a.v
    qq = _storage_or_compute(qq, kk.dtype, a.compute)
    return _unit_last_axis(qq), _unit_last_axis(kk), _unit_last_axis(vv), kernel_scale, v_a


def per_item(x: np.ndarray, batch: Sequence[int], dtype: Any) -> np.ndarray:
    """``x`` broadcast to the batch shape as the kernels take per-item arguments: one C-contiguous,
    aligned vector of ``dtype``, batch items in C order."""
    return np.array(np.broadcast_to(x, tuple(batch)), dtype=dtype, order="C").reshape(-1)


def modifier_kernel_args(softcap: Optional[float], alibi_slopes: Optional[np.ndarray], sinks: Optional[np.ndarray],
                         batch: Sequence[int], compute: np.dtype) -> Dict[str, Any]:
    """The compiled core's keyword arguments for validated score modifiers (see
    :func:`attnfast._inputs.check_score_modifiers`): softcap a float (0 = none), alibi_slopes and
    sinks one value per batch item in the computation dtype; only those the call has."""
    args: Dict[str, Any] = {}
    if softcap is not None:
        args["softcap"] = float(softcap)
    if alibi_slopes is not None:
        args["alibi_slopes"] = per_item(alibi_slopes, batch, compute)
    if sinks is not None:
        args["sinks"] = per_item(sinks, batch, compute)
    return args


def _serving_kernel_args(a: _inputs.AttentionArgs, forward: bool) -> Dict[str, Any]:
    """The compiled core's serving keyword arguments for a validated call: per-item diagonals, score
    modifiers and (forward only) the block table and int8 scales."""
    args = modifier_kernel_args(a.softcap, a.alibi_slopes, a.sinks, a.batch_shape, a.compute)
    if a.diagonal_offsets is not None:
        args["diagonal_offsets"] = per_item(a.diagonal_offsets, a.batch_shape, np.int64)
    if forward and a.block_table is not None:
        args["block_table"] = a.block_table
    if forward and a.k_scale is not None and a.v_scale is not None:  # both or neither
        # One scale per row of the cache (paged: of each block); broadcast views, never copies.
        rows = a.kv_batch_shape + (a.lk,) if a.block_table is None else a.k.shape[:-1]
        args["k_scale"] = np.broadcast_to(a.k_scale, rows)
        args["v_scale"] = np.broadcast_to(a.v_scale, rows if a.block_table is None else a.v.shape[:-1])
    return args


@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
              mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
              causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
              return_lse: Literal[False] = False, return_weights: Literal[False] = False,
              out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
              w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None,
              score_bias: Optional[ArrayLike] = None, softcap: Optional[Real] = None,
              alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
              block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
              v_scale: Optional[ArrayLike] = None) -> Array: ...


@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
              mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
              causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
              return_lse: Literal[True], return_weights: Literal[False] = False,
              out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
              w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None,
              score_bias: Optional[ArrayLike] = None, softcap: Optional[Real] = None,
              alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
              block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
              v_scale: Optional[ArrayLike] = None) -> Tuple[Array, FloatArray]: ...


@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
              mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
              causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
              return_lse: Literal[False] = False, return_weights: Literal[True],
              out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
              w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None,
              score_bias: Optional[ArrayLike] = None, softcap: Optional[Real] = None,
              alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
              block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
              v_scale: Optional[ArrayLike] = None) -> Tuple[Array, Array]: ...


@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
              mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
              causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
              return_lse: Literal[True], return_weights: Literal[True],
              out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
              w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None,
              score_bias: Optional[ArrayLike] = None, softcap: Optional[Real] = None,
              alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
              block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
              v_scale: Optional[ArrayLike] = None) -> Tuple[Array, FloatArray, Array]: ...


@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
              mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
              causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
              return_lse: bool = False, return_weights: bool = False,
              out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
              w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None,
              score_bias: Optional[ArrayLike] = None, softcap: Optional[Real] = None,
              alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
              block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
              v_scale: Optional[ArrayLike] = None) -> AttentionOutput: ...


def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
              mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
              causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
              return_lse: bool = False, return_weights: bool = False,
              out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
              w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None,
              score_bias: Optional[ArrayLike] = None, softcap: Optional[Real] = None,
              alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
              block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
              v_scale: Optional[ArrayLike] = None, **unexpected: Any) -> AttentionOutput:
    """Fused attention: softmax(scores(q, k) + bias, visible keys only) @ v, without the Lq x Lk matrix.

    Parameters
    ----------
    q : array_like, (..., Lq, D)
        Queries: float64, float32, float16 or ml_dtypes.bfloat16. Leading axes are batch axes that
        broadcast against k's and v's as in np.matmul; axis -3 is the head axis (Hq).
        With ``block_table``: (B, Hq, Lq, D).
    k : array_like, (..., Lk, Dk)
        Keys: float64, float32, float16 or ml_dtypes.bfloat16 (int8 with ``k_scale``). Batch axes broadcast
        with q's; the head axis may divide q's (GQA/MQA: query head h reads kv head h // (Hq / Hk)), without
        copying. Dk = D except for "general", "concat" and "additive".
    v : array_like, (..., Lk, Dv)
        Values, the same batch and head layout as k (int8 with ``v_scale``).
    method : {"scaled_dot", "dot", "general", "concat", "additive"}, default "scaled_dot"
        The score rule: "dot" q_i . k_j; "scaled_dot" (q_i . k_j) * scale; "general" q_i W k_j (Luong);
        "concat" w_q . q_i + w_k . k_j + b; "additive" v_a . tanh(W_q q_i + W_k k_j + b) (Bahdanau).
    scale : float, optional
        Multiplies every method's score; default 1/sqrt(D) for "scaled_dot", 1 otherwise. Must be finite in
        the computation dtype.
    mask : array_like of bool, optional
        Broadcastable to (..., Lq, Lk); True = attend, False hides the key from that query.
    bias : array_like, optional
        Added to the scores (after ``scale``, softcap and ALiBi); broadcastable to (..., Lq, Lk), any
        floating or integer dtype (converted to the computation dtype). A -inf bias hides its key.
    causal : bool, default False
        Key j is visible to query i only when j <= diag_i (see ``causal_align``).
    causal_align : {"top_left", "bottom_right"}, default "top_left"
        The diagonal that ``causal``, ``window`` and ``alibi_slopes`` use: diag_i = i ("top_left") or
        i + Lk - Lq ("bottom_right": the last query sees the last key); with ``kv_lengths``,
        "bottom_right" aligns each batch item to its own length, diag_i = i + kv_lengths[b] - Lq.
    window : tuple of (int or None, int or None), optional
        (left, right): only keys with diag_i - left <= j <= diag_i + right are visible; None leaves a side
        unbounded, sides beyond Lq + Lk are unbounded too. Sides are ints >= 0.
    kv_lengths : array_like of int, optional
        Broadcastable to the batch shape (the leading axes of the result, aligned from the right as in
        NumPy: one length per item of a (B, H) batch is (B, 1)); item b sees only its first kv_lengths[b]
        keys, values in [0, Lk]. Keys past the length are never read. With ``block_table``: (B,), default
        max_blocks * block_size.
    return_lse : bool, default False
        Also return the log-sum-exp of each row's scores, (..., Lq).
    return_weights : bool, default False
        Also return the weights (..., Lq, Lk) (computed tile by tile; only this output has that size).
    out : ndarray, optional
        (..., Lq, Dv), the full result shape, of any of the four floating dtypes: the result is rounded
        once into it and it is returned. Written only when the call succeeds; it may overlap the inputs.
    w : array_like, (D, Dk), optional
        The bilinear weight of "general" (required there, rejected elsewhere). This and the other method
        weights may have any floating storage dtype or an integer dtype: they are converted to the
        computation dtype.
    w_q : array_like, optional
        "concat": (D,), required. "additive": (A, D), or None when q is already projected (D = A).
    w_k : array_like, optional
        "concat": (Dk,), required. "additive": (A, Dk), or None when k is already projected (Dk = A).
    v_a : array_like, (A,), optional
        The output weights of "additive"; default ones.
    score_bias : array_like, optional
        "concat": a scalar (default 0); "additive": (A,) (default zeros), added inside the tanh.
    softcap : float, optional
        A cap c > 0 (Gemma 2): every score becomes c * tanh(s / c), applied to the method's score (scale
        included) before ALiBi and bias.
    alibi_slopes : array_like, optional
        One slope per query head, broadcastable to the batch shape ((Hq,) or (B, Hq)); the score of key j
        for query i loses slope * ``|diag_i - j|`` (MPT, BLOOM), after softcap, before bias.
    sinks : array_like, optional
        One logit per query head, broadcastable to the batch shape ((Hq,) or (B, Hq)), that joins each
        row's softmax denominator without a value (attention sinks, gpt-oss).
    block_table : array_like of int, (B, max_blocks), optional
        Paged KV caches: k and v are then (num_blocks, Hk, block_size, D) and (num_blocks, Hk, block_size,
        Dv), q is (B, Hq, Lq, D), and key j of item b is row j % block_size of block
        block_table[b, j // block_size]; Lk = max_blocks * block_size. Only the entries an item's
        kv_lengths reaches are validated and read. Methods "dot", "scaled_dot" and "general" only.
    k_scale, v_scale : array_like of float32, optional
        int8 KV caches (see :func:`attnfast.quantize_kv`): with int8 k and v, the key row is k * k_scale and
        the value row v * v_scale, one scale per row, broadcastable to k.shape[:-1] / v.shape[:-1] (paged:
        (num_blocks, Hk, block_size)). q must be float32 or 16-bit; the result is float32. Methods "dot",
        "scaled_dot" and "general" only.
    **unexpected
        No other keyword argument is accepted: TypeError, naming attnfast's equivalent of a PyTorch,
        flash-attn or JAX name (``is_causal``, ``attn_mask``, ``dim``...) or the closest accepted name.

    Returns
    -------
    out : ndarray, (..., Lq, Dv)
        In NumPy's promotion of the floating inputs (float16 with bfloat16: float32; int8 caches: float32),
        or ``out`` itself. The batch shape (...) is the broadcast of q's, k's and v's leading axes.
    lse : ndarray, (..., Lq)
        Only with ``return_lse=True``; float32 for a 16-bit result, else the result dtype.
    weights : ndarray, (..., Lq, Lk)
        Only with ``return_weights=True``; the result dtype. Returned as (out, lse, weights) in that order,
        each only when asked for.

    Raises
    ------
    TypeError
        An array of a dtype attnfast does not compute with (integers for the floating inputs, complex,
        float8, long double, object; a torch bfloat16 tensor, with how to pass it), a non-bool mask or flag,
        a non-integer kv_lengths or window side, an unexpected keyword argument.
    ValueError
        Shapes that do not match or broadcast, an unknown method or causal_align, a method weight missing
        or given to a method that does not take it, a scale that is not finite in the computation dtype,
        window sides or kv_lengths out of range, or a result too large for one array. Every message names
        the argument, what was received and what was expected.
        Paged and int8 caches raise ValueError for the methods "concat" and "additive", a
        block_table entry out of range, or scales whose shape does not broadcast; TypeError for scales
        without an int8 cache.

    See Also
    --------
    attention_backward : the gradients, from this call's out and lse.
    attention_varlen : packed variable-length sequences.
    merge_states : combine calls over disjoint key sets.
    attnfast.reference.attention : the float64 reference, same signature.

    Notes
    -----
    Numerics. Everything is computed in float32, or in float64 when any floating input is float64;
    float16 and bfloat16 values are converted exactly on load (a 16-bit KV cache is read in place) and a
    16-bit result is rounded to nearest-even once, on the final store. The scores are s = (scale * q) . k
    for the dot-product methods (scale folded into q), then softcap, ALiBi and bias in that order; a score
    beyond the computation dtype's range is +-inf. The softmax is online over key tiles (a running row
    maximum and sum), never storing the (..., Lq, Lk) matrix; with AVX512_BF16, bfloat16 q, k, v use
    ``vdpbf16ps`` products and round the probabilities to bfloat16 before P . V (see the numerics guide).
    Results are bitwise identical for any thread count.

    Visibility. Key j is hidden from query i when ``mask`` is False there, ``causal``, ``window`` or
    ``kv_lengths`` exclude it, its bias is -inf or its final score is -inf. A hidden key contributes
    nothing, whatever its K and V hold (NaN, inf, uninitialised memory): out, lse and weights are exactly
    those without it. A row with no visible key gets out 0, weights 0 and lse -inf (lse = the sink with
    ``sinks``), never NaN. A NaN among a row's visible scores makes that row NaN; a NaN or inf in a visible
    V row reaches every row that sees it. A row whose maximum score is +inf splits its weight evenly over
    its +inf scores, and its lse is +inf.

    lse. The natural-log log-sum-exp of each row's final scores over its visible keys (and the sink):
    lse_i = log(e^sink + sum_j e^s_ij). Outputs over disjoint key sets combine exactly with
    :func:`merge_states`, and :func:`attention_backward` takes the forward's out and lse. With ``sinks``,
    out_i = sum_j e^(s_ij - m) v_j / (e^(sink - m) + sum_j e^(s_ij - m)) and the returned weights are those
    of the real keys (rows sum to 1 - e^(sink - lse_i)).

    Costs. Calls with an empty result, and Lk = 0 (out 0, lse -inf), run no kernel and take O(1) time
    and memory whatever the broadcast batch. Only the distinct elements of a broadcast input are ever
    copied.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)        # (Lq, D) = (2, 2)
    >>> k = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    >>> v = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=np.float32)
    >>> print(attnfast.attention(q, k, v, method="dot").round(4))
    [[0.6335 0.3665]
     [0.3665 0.6335]]

    Causal, with the log-sum-exp: the first query sees only the first key.

    >>> out, lse = attnfast.attention(q, k, v, method="dot", causal=True, return_lse=True)
    >>> print(out.round(4), lse.round(4))
    [[1.     0.    ]
     [0.2689 0.7311]] [1.     1.3133]

    Batched multi-head attention with GQA (8 query heads over 2 kv heads) and padding lengths:

    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 16, 64), dtype=np.float32)
    >>> k = rng.standard_normal((2, 2, 32, 64), dtype=np.float32)
    >>> v = rng.standard_normal((2, 2, 32, 64), dtype=np.float32)
    >>> out = attnfast.attention(q, k, v, kv_lengths=np.array([[32], [20]]))
    >>> out.shape, out.dtype
    ((2, 8, 16, 64), dtype('float32'))
    >>> ref = attnfast.reference.attention(q, k, v, kv_lengths=np.array([[32], [20]]))
    >>> bool(np.abs(out - ref).max() < 1e-5)
    True
    """
    if unexpected:  # one test of an empty dict: PyTorch's names get attnfast's, not a bare TypeError
        _inputs.reject_unexpected(attention, unexpected)
    # The most common call (ndarrays, dot scores, no mask, lse or weights) is recognised and run by the
    # compiled core without this module's validation, which would cost ~5 us of a ~100 us decoder step;
    # it returns None for anything else. tests/test_attention.py checks both paths agree bitwise.
    if mask is None and bias is None and window is None and kv_lengths is None and return_lse is False \
            and return_weights is False and w is None and w_q is None and w_k is None and v_a is None \
            and score_bias is None and softcap is None and alibi_slopes is None and sinks is None \
            and block_table is None and k_scale is None and v_scale is None:
        result = _core.plain_attention(q, k, v, out, method, scale, causal, causal_align)
        if result is not None:
            return result
    a = _inputs.check_attention(q, k, v, method=method, scale=scale, mask=mask, bias=bias, causal=causal,
                                causal_align=causal_align, window=window, kv_lengths=kv_lengths,
                                return_lse=return_lse, return_weights=return_weights, out=out, w=w, w_q=w_q,
                                w_k=w_k, v_a=v_a, score_bias=score_bias, softcap=softcap,
                                alibi_slopes=alibi_slopes, sinks=sinks, block_table=block_table,
                                k_scale=k_scale, v_scale=v_scale)
    return attention_from_args(a)


def attention_from_args(a: _inputs.AttentionArgs) -> AttentionOutput:
    """:func:`attention` on arguments :func:`_inputs.check_attention` validated.

    The seam for callers that adjust validated arguments before the kernel runs: attnfast.dask's block
    tasks shift ``diagonal_offset(s)`` so that a block of queries and keys sees the global diagonal.
    """
    batch = a.batch_shape
    full = batch + (a.lq, a.lk)
    if _inputs.nothing_to_compute(a):
        return _inputs.result_without_scores(a)
    qq, kk, vv, kernel_scale, v_a = _kernel_operands(a)
    mask_view = None if a.mask is None else np.broadcast_to(a.mask, full)
    bias_view = None if a.bias is None else _kernel_layout(np.broadcast_to(a.bias, full))
    lengths = None
    if a.kv_lengths is not None:
        lengths = np.ascontiguousarray(np.broadcast_to(a.kv_lengths, batch), dtype=np.int64)
        if not lengths.flags.aligned:  # np.ascontiguousarray keeps an unaligned C-contiguous array as it is
            lengths = lengths.copy()

    # The kernel writes its result in the storage dtype of k and v or in the computation dtype; any other
    # result or out= dtype gets the result computed in the computation dtype and rounded into it once.
    t = a.compute
    target = a.out
    work = _written(a.dtype if target is None else target.dtype, kk.dtype, t)
    # Write straight into the caller's out= only when it is safe: native dtype the kernel writes, aligned
    # unit last axis, no overlap with anything the kernel reads while it writes (NumPy's ufuncs are
    # overlap-safe, and so is this: an overlapping out= gets the result through a temporary), and no
    # second pass that could still fail after out was written.
    operands = (qq, kk, vv, mask_view, bias_view, lengths, v_a)
    direct = (target is not None and not a.return_weights and target.dtype == work
              and target.flags.aligned and (a.dv <= 1 or target.strides[-1] == target.itemsize)
              and not _overlaps_itself(target)
              and not any(x is not None and np.may_share_memory(target, x) for x in operands))
    result = target if direct and target is not None else np.empty(batch + (a.lq, a.dv), work)
    # lse and weights are made in the computation dtype; lse's is already lse_dtype(a.dtype).
    lse = np.empty(batch + (a.lq,), t) if a.return_lse else None
    weights = np.empty(full, t) if a.return_weights else None
    _core.attention(qq, kk, vv, result, list(batch), list(a.kv_batch_shape), a.group,
                    kernel_scale, mask_view, bias_view, lengths, a.causal, a.diagonal_offset, a.window_left,
                    a.window_right, lse, weights, v_a, **_serving_kernel_args(a, forward=True))
    if target is not None and not direct:
        _copy_rounded(target, result)
        result = target
    result = _finished(result, a.dtype) if target is None else result
    if weights is not None:
        weights = _finished(weights, a.dtype)
    if weights is None:
        return result if lse is None else (result, lse)
    return (result, weights) if lse is None else (result, lse, weights)


def _overlaps_itself(a: np.ndarray) -> bool:
    """True unless the elements of ``a`` provably occupy distinct memory: with the axes sorted by stride
    size, each stride must clear the whole span of the smaller axes (C, Fortran, transposed, sliced and
    reversed layouts all do). A zero stride, or an np.lib.stride_tricks view whose rows interleave,
    fails this: the kernel's threads would race on the shared elements, so such an out= gets the
    result through a copy, with NumPy's assignment rule for which write lands last."""
    span = a.itemsize
    for n, stride in sorted(((n, abs(st)) for n, st in zip(a.shape, a.strides) if n > 1), key=lambda x: x[1]):
        if stride < span:
            return True
        span += stride * (n - 1)
    return False


def merge_states(outs: Sequence[ArrayLike], lses: Sequence[ArrayLike]) -> Tuple[Array, FloatArray]:
    """Combine attention computed over disjoint key sets (split-KV, out-of-core, distributed).

    Parameters
    ----------
    outs : sequence of array_like, each (..., Lq, Dv)
        The normalised outputs of each part, e.g. ``attention(q, k_part, v_part, return_lse=True)[0]``:
        float64, float32, float16 or ml_dtypes.bfloat16, all of one shape.
    lses : sequence of array_like, each (..., Lq)
        Each part's log-sum-exp (-inf for a row with no visible key in that part), as many as ``outs``.

    Returns
    -------
    out : ndarray, (..., Lq, Dv)
        sum_i exp(lse_i - lse) * out_i, in the promoted dtype of ``outs``; 0 where every part is empty.
    lse : ndarray, (..., Lq)
        log(sum_i exp(lse_i)); -inf where every part is empty. float32 for a 16-bit out, else out's dtype.

    Raises
    ------
    TypeError
        A part of a dtype attnfast does not compute with, or outs / lses that are not lists or tuples of
        parts (an ndarray of stacked parts: pass list(outs), list(lses)).
    ValueError
        No parts, a different number of outs and lses, or parts whose shapes differ.

    See Also
    --------
    attention : returns the (out, lse) parts with ``return_lse=True``.
    attnfast.reference.merge_states : the float64 reference.

    Notes
    -----
    Computed in float32 (float64 for float64 parts), 16-bit parts rounded once at the end. The result
    equals attention over the union of the key sets up to rounding. A part with lse_i = -inf contributes
    nothing, whatever its out holds; any other part's NaN or inf reaches the result even when its factor
    exp(lse_i - lse) underflows to 0. Parts with lse_i = +inf share the row evenly, the others weigh 0 and
    the merged lse is +inf (as attention's rows whose maximum score is +inf). The parts are added as a
    balanced tree, so the rounding error grows like log n in the number of parts.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((4, 8, 16), dtype=np.float32)
    >>> k = rng.standard_normal((4, 64, 16), dtype=np.float32)
    >>> v = rng.standard_normal((4, 64, 16), dtype=np.float32)
    >>> o1, l1 = attnfast.attention(q, k[:, :40], v[:, :40], return_lse=True)
    >>> o2, l2 = attnfast.attention(q, k[:, 40:], v[:, 40:], return_lse=True)
    >>> out, lse = attnfast.merge_states([o1, o2], [l1, l2])
    >>> whole, whole_lse = attnfast.attention(q, k, v, return_lse=True)
    >>> bool(np.allclose(out, whole, atol=1e-5) and np.allclose(lse, whole_lse, atol=1e-5))
    True
    """
    a = _inputs.check_merge_states(outs, lses)
    # Elementwise and memory-bound: NumPy in the computation dtype (the parts' own for float32/float64;
    # float32 for 16-bit parts, rounded once at the end) is as fast as a kernel would be.
    t = a.compute
    s = np.stack([x.astype(t, copy=False) for x in a.lses])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(s, axis=0)
        saturated = m == np.inf
        shift = np.where((m == -np.inf) | saturated, 0, m)
        e = np.where(saturated, (s == np.inf).astype(s.dtype), np.exp(s - shift))
        total = _pairwise_sum(iter(e))
        lse = np.where(saturated, np.inf, shift + np.log(total)).astype(s.dtype, copy=False)
        factor = e / np.where(total == 0, 1, total)
        # Select, never multiply, an empty part away: its out may hold anything.
        terms = (np.where(empty[..., None], 0, f[..., None] * part.astype(t, copy=False))
                 for part, f, empty in zip(a.outs, factor, s == -np.inf))
        merged = _pairwise_sum(terms)
    return _finished(merged.astype(t, copy=False), a.dtype), lse.astype(a.lse_dtype, copy=False)


def _pairwise_sum(terms: Iterable[np.ndarray]) -> np.ndarray:
    """Sum of an iterable of same-shape arrays as a balanced binary tree, holding O(log n) partial sums.

    NumPy reduces over a stacked leading axis one row at a time, whose float32 rounding errors grow in
    proportion to the number of parts (~700 eps over 65536 parts); the tree's grow like log n, as the
    kernels' long sums do.
    """
    pending: List[Tuple[int, np.ndarray]] = []  # (level, sum of 2**level terms), levels strictly decreasing
    for t in terms:
        level = 0
        while pending and pending[-1][0] == level:
            t = pending.pop()[1] + t
            level += 1
        pending.append((level, t))
    total = pending.pop()[1]
    while pending:
        total = pending.pop()[1] + total
    return total


# --------------------------------------------------------------------------
# attention_backward
# --------------------------------------------------------------------------


def attention_backward(dout: ArrayLike, q: ArrayLike, k: ArrayLike, v: ArrayLike, out: ArrayLike, lse: ArrayLike,
                       *, method: Method = "scaled_dot", scale: Optional[Real] = None,
                       mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
                       causal_align: CausalAlign = "top_left", window: Window = None,
                       kv_lengths: Optional[ArrayLike] = None, w: Optional[ArrayLike] = None,
                       w_q: Optional[ArrayLike] = None, w_k: Optional[ArrayLike] = None,
                       v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
                       softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None,
                       sinks: Optional[ArrayLike] = None, **unexpected: Any) -> AttentionGrads:
    """Gradients of :func:`attention` with respect to q, k, v, bias, the method weights and sinks.

    A FlashAttention-2-style fused backward: the weights are recomputed tile by tile from ``lse``, never
    stored as an Lq x Lk matrix (except the gradient of the scores when ``bias`` is given, which has that
    shape anyway). Results are bitwise identical for any thread count.

    Parameters
    ----------
    dout : array_like, (..., Lq, Dv)
        Gradient of the loss with respect to attention's output (the full result shape), in one of the
        four floating dtypes.
    q, k, v : array_like
        The forward's inputs, as in :func:`attention`: (..., Lq, D), (..., Lk, Dk), (..., Lk, Dv).
    out : array_like, (..., Lq, Dv)
        The forward's output for the same inputs and keyword arguments.
    lse : array_like, (..., Lq)
        The forward's log-sum-exp: ``out, lse = attention(q, k, v, return_lse=True, **kwargs)``.
    method : {"scaled_dot", "dot", "general", "concat", "additive"}, default "scaled_dot"
        The forward's score rule.
    scale : float, optional
        The forward's scale (default 1/sqrt(D) for "scaled_dot", else 1).
    mask : array_like of bool, optional
        The forward's mask, broadcastable to (..., Lq, Lk); not differentiable.
    bias : array_like, optional
        The forward's bias, broadcastable to (..., Lq, Lk); gets ``dbias``.
    causal : bool, default False
        As in the forward.
    causal_align : {"top_left", "bottom_right"}, default "top_left"
        As in the forward.
    window : tuple of (int or None, int or None), optional
        As in the forward.
    kv_lengths : array_like of int, optional
        As in the forward, broadcastable to the batch shape; not differentiable.
    w, w_q, w_k, v_a, score_bias : array_like, optional
        The forward's method weights (shapes as in :func:`attention`); each gets its gradient.
    softcap : float, optional
        As in the forward (gradients pass through 1 - tanh^2(s / c)).
    alibi_slopes : array_like, optional
        As in the forward; not differentiable.
    sinks : array_like, optional
        As in the forward; gets ``dsinks``.
    **unexpected
        Nothing else is accepted: ``block_table``, ``k_scale`` and ``v_scale`` raise ValueError (a paged
        or int8 cache has no gradients: densify it first), anything else (``return_lse``,
        ``return_weights``, ``out``, PyTorch's or flash-attn's names...) TypeError saying what to pass.

    Returns
    -------
    AttentionGrads
        A named tuple: ``dq``, ``dk``, ``dv`` with the shapes and dtypes of q, k, v (summed over broadcast
        axes and over the query heads sharing a kv head); ``dbias`` with bias's shape; ``dw`` ("general"),
        ``dw_q``, ``dw_k``, ``dscore_bias`` ("concat", "additive"), ``dv_a`` ("additive") and ``dsinks``
        (sinks' shape); None where the call has no such input. A method weight or bias given as an array of
        a storage dtype gets its gradient in that dtype, otherwise (Python numbers, lists, integers) in the
        computation dtype.

    Raises
    ------
    TypeError
        An array of a dtype attnfast does not compute with (integers for the floating inputs, complex,
        float8, long double, object; a torch bfloat16 tensor, with how to pass it), a non-bool mask or flag,
        a non-integer kv_lengths or window side, an unexpected keyword argument.
    ValueError
        Shapes that do not match or broadcast, an unknown method or causal_align, a method weight missing
        or given to a method that does not take it, a scale that is not finite in the computation dtype,
        window sides or kv_lengths out of range, or a result too large for one array. Every message names
        the argument, what was received and what was expected.
        dout, out or lse whose shapes do not match the forward's result are a ValueError too.

    See Also
    --------
    AttentionGrads, attention, attnfast.reference.attention_backward

    Notes
    -----
    With P = exp(s - lse) recomputed per tile: dV = P^T dO, dS = P * (dO V^T - delta) with
    delta_i = dO_i . O_i from the forward's out, dQ = scale dS K and dK = scale dS^T Q; additive scores
    recompute tanh per (query, key) pair. The projections of "general", "concat" and "additive" are
    chained back in NumPy. Each gradient is computed in float64 if any of q, k, v is float64, else in
    float32, and rounded once into its input's dtype; for 16-bit inputs delta uses the 16-bit out, as
    FlashAttention's bfloat16 backward does. A hidden key gets exactly zero dK and dV whatever its K and V
    hold, a row with no visible key gets zero gradients, and a row whose lse is +inf passes its weights'
    share of dout to dv but has zero score gradients. dsinks = -sum_i e^(sink - lse_i) (dO_i . O_i) over
    the rows and batch items each sink serves. See :func:`attnfast.reference.attention_backward` for the
    formulas.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 4, 8, 16), dtype=np.float32)
    >>> k = rng.standard_normal((2, 1, 12, 16), dtype=np.float32)   # one kv head (MQA)
    >>> v = rng.standard_normal((2, 1, 12, 16), dtype=np.float32)
    >>> out, lse = attnfast.attention(q, k, v, causal=True, return_lse=True)
    >>> dout = np.ones_like(out)                                      # d(out.sum()) / d(out)
    >>> grads = attnfast.attention_backward(dout, q, k, v, out, lse, causal=True)
    >>> grads.dq.shape, grads.dk.shape, grads.dv.shape, grads.dbias
    ((2, 4, 8, 16), (2, 1, 12, 16), (2, 1, 12, 16), None)

    Each of the 4 * 8 query rows sends its weights (summing to 1) to dv, so for the loss out.sum() dv's
    entries sum to 2 * 4 * 8 * 16 = 1024:

    >>> print(round(float(grads.dv.sum()), 2))
    1024.0
    """
    _inputs.reject_backward_extras(unexpected, attention_backward)
    b = _inputs.check_attention_backward(
        dout, q, k, v, out, lse, method=method, scale=scale, mask=mask, bias=bias, causal=causal,
        causal_align=causal_align, window=window, kv_lengths=kv_lengths, w=w, w_q=w_q, w_k=w_k, v_a=v_a,
        score_bias=score_bias, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
    )
    return attention_backward_from_args(b)


def attention_backward_from_args(b: _inputs.AttentionBackwardArgs) -> AttentionGrads:
    """:func:`attention_backward` on arguments :func:`_inputs.check_attention_backward` validated (the
    seam of :func:`attention_from_args`, for the backward)."""
    a = b.forward
    if _inputs.nothing_to_compute(a):
        return _zero_gradients(a, b.grad_dtypes)
    kernel = _backward_kernel(a, b)
    grads = {"v": sum_to_shape(kernel["dv"], a.v.shape)}
    grads.update(_chained_gradients(a, kernel))
    if a.bias is not None:
        grads["bias"] = sum_to_shape(kernel["dscores"], a.bias.shape)
    if a.sinks is not None:
        grads["sinks"] = _sink_gradient(a, b)
    return AttentionGrads(**{"d" + name: _finished(g, b.grad_dtypes[name]) for name, g in grads.items()})


def _sink_gradient(a: _inputs.AttentionArgs, b: _inputs.AttentionBackwardArgs) -> np.ndarray:
    """dsinks = -sum_i e^{sink - lse_i} (dO_i . O_i) from the forward's out and lse (the sink's weight
    in each row times the row's delta), summed to sinks' shape; in the computation dtype."""
    t = a.compute
    assert a.sinks is not None
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.einsum("...d,...d->...", b.dout.astype(t, copy=False), b.out.astype(t, copy=False))
        p_sink = np.exp(a.sinks[..., None] - b.lse.astype(t, copy=False))
        per_item = -np.add.reduce(p_sink * delta, axis=-1)
    return sum_to_shape(per_item, a.sinks.shape)


def _zero_gradients(a: _inputs.AttentionArgs, dtypes: Dict[str, np.dtype]) -> AttentionGrads:
    """The gradients of a call whose loss depends on nothing (no key, no query, no value feature)."""
    shapes = {"q": a.q.shape, "k": a.k.shape, "v": a.v.shape}
    if a.bias is not None:
        shapes["bias"] = a.bias.shape
    for name in ("w", "w_q", "w_k", "score_bias", "v_a", "sinks"):
        if getattr(a, name) is not None:
            shapes[name] = getattr(a, name).shape
    return AttentionGrads(**{"d" + name: np.zeros(shape, dtypes[name]) for name, shape in shapes.items()})


def _as_kernel_input(x: np.ndarray, storage: np.dtype, compute: np.dtype) -> np.ndarray:
    """dout or out as the backward kernel reads them: in the storage dtype of k and v or the
    computation dtype (else converted to the latter), aligned with a unit-stride last axis."""
    return _unit_last_axis(_storage_or_compute(x, storage, compute))


def _backward_kernel(a: _inputs.AttentionArgs, b: _inputs.AttentionBackwardArgs) -> Dict[str, Any]:
    """Run the fused backward on the forward's kernel operands. Returns the gradients of those operands
    in the computation dtype: dq (batch + (Lq, depth)), dk and dv (kv_batch + (Lk, .)), dscores
    (batch + (Lq, Lk), only with a bias) and dv_a (additive only)."""
    t = a.compute
    batch, kv_batch = a.batch_shape, a.kv_batch_shape
    full = batch + (a.lq, a.lk)
    qq, kk, vv, kernel_scale, v_a = _kernel_operands(a)
    depth = qq.shape[-1]
    mask_view = None if a.mask is None else np.broadcast_to(a.mask, full)
    bias_view = None if a.bias is None else _kernel_layout(np.broadcast_to(a.bias, full))
    lengths = None
    if a.kv_lengths is not None:
        lengths = np.array(np.broadcast_to(a.kv_lengths, batch), dtype=np.int64, order="C")
    lse = np.ascontiguousarray(b.lse, dtype=t)  # (batch, Lq), indexed densely by the kernel
    if not lse.flags.aligned:  # np.ascontiguousarray keeps an unaligned C-contiguous array as it is
        lse = lse.copy()
    grads: Dict[str, Any] = {
        "dq": np.empty(batch + (a.lq, depth), t),
        "dk": np.empty(kv_batch + (a.lk, depth), t),
        "dv": np.empty(kv_batch + (a.lk, a.dv), t),
        "dscores": None if a.bias is None else np.empty(full, t),
        "dv_a": None if v_a is None else np.empty(v_a.shape, t),
    }
    _core.attention_backward(
        qq, kk, vv, _as_kernel_input(b.out, kk.dtype, t), _as_kernel_input(b.dout, kk.dtype, t), lse,
        grads["dq"], grads["dk"], grads["dv"], grads["dscores"], grads["dv_a"], list(batch), list(kv_batch),
        a.group, kernel_scale, mask_view, bias_view, lengths, a.causal, a.diagonal_offset, a.window_left,
        a.window_right, v_a, **_serving_kernel_args(a, forward=False),
    )
    return grads


def _chained_gradients(a: _inputs.AttentionArgs, kernel: Dict[str, Any]) -> Dict[str, Any]:
    """The gradients of q, k and the method weights from those of the kernel's operands (the chain
    rule through the projections _score_operands made), in the computation dtype, summed to each
    input's shape: q-like ones reduced to q's batch shape before any product with a weight, so a
    broadcast q costs one product, not one per batch item it was broadcast to."""
    t = a.compute
    dq, dk = kernel["dq"], kernel["dk"]
    q_shape, k_shape = a.q.shape, a.k.shape
    if a.method in ("dot", "scaled_dot"):
        return {"q": sum_to_shape(dq, q_shape), "k": sum_to_shape(dk, k_shape)}
    q, k = a.q.astype(t, copy=False), a.k.astype(t, copy=False)
    if a.method == "general":
        # The kernel saw q W: dq is the gradient of q W, dk already that of k.
        dqw = sum_to_shape(dq, q_shape[:-1] + (a.dk,))
        assert a.w is not None
        return {"q": _projected(dqw, a.w.T), "k": sum_to_shape(dk, k_shape), "w": _weight_gradient(q, dqw)}
    if a.method == "concat":
        # Operands [scale (w_q.q_i + b), scale] and [1, w_k.k_j]: feature 0 of dq is the gradient of
        # scale (w_q.q_i + b), feature 1 of dk that of w_k.k_j.
        by_query = sum_to_shape(dq[..., 0] * t.type(a.scale), q_shape[:-1])
        by_key = sum_to_shape(dk[..., 1], k_shape[:-1])
        return {
            "q": by_query[..., None] * a.w_q,
            "k": by_key[..., None] * a.w_k,
            "w_q": _weight_gradient(q, by_query[..., None])[:, 0],
            "w_k": _weight_gradient(k, by_key[..., None])[:, 0],
            "score_bias": np.asarray(np.add.reduce(by_query, axis=None)),
        }
    # additive: dq and dk are the gradients of qp = W_q q + b and kp = W_k k (or of q, k themselves).
    dqp = sum_to_shape(dq, q_shape[:-1] + (a.hidden,))
    dkp = sum_to_shape(dk, k_shape[:-1] + (a.hidden,))
    grads = {
        "q": dqp if a.w_q is None else _projected(dqp, a.w_q),
        "k": dkp if a.w_k is None else _projected(dkp, a.w_k),
        "score_bias": np.add.reduce(dqp.reshape(-1, a.hidden), axis=0),
        "v_a": kernel["dv_a"],
    }
    if a.w_q is not None:
        grads["w_q"] = _weight_gradient(q, dqp).T
    if a.w_k is not None:
        grads["w_k"] = _weight_gradient(k, dkp).T
    return grads


def _weight_gradient(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """sum over every batch item and row r of x_r^T g_r, (F, G): the gradient of a weight W that
    projected x (..., L, F) into features whose gradient is g (x's shape but G features).

    One GEMM over the flattened rows. A row whose gradient is exactly 0 (a query with no visible key,
    a key no query sees) must add nothing even if x holds NaN or inf there, so when the GEMM is not
    finite it is redone with those rows of x selected away.
    """
    # A broadcast (stride-0) axis of x: sum g over it first, so that flattening x copies nothing.
    shared = tuple(i for i in range(x.ndim - 1) if x.strides[i] == 0 and x.shape[i] > 1)
    if shared:
        g = np.add.reduce(g, axis=shared, keepdims=True)
        x = x[tuple(slice(0, 1) if i in shared else slice(None) for i in range(x.ndim))]
    xf = x.reshape(-1, x.shape[-1])
    gf = g.reshape(-1, g.shape[-1])
    with np.errstate(invalid="ignore", over="ignore"):
        result: np.ndarray = xf.T @ gf
        if np.all(np.isfinite(result)):
            return result
        used = np.any(gf != 0, axis=1)
        result = np.where(used[:, None], xf, 0).T @ gf
        return result
