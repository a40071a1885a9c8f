"""Pure-NumPy float64 reference for every attnfast function.

Same signatures and the same input validation as the fast path (both run attnfast's one set of
checks), so the two raise identical errors. Everything is computed in float64 with the textbook
formulas, on the values as given (16-bit inputs are converted exactly), and rounded to nearest-even
once into the result dtype (the promotion of the inputs; ``lse`` is float32 for a 16-bit result). This
module favours obviousness over speed: it materialises the full (..., Lq, Lk) score matrix (and, for
``method="additive"``, a (..., Lk, A) tensor per query).

Numerics that the kernels must reproduce
----------------------------------------
* Softmax subtracts the maximum of the *visible* entries of each row, so any finite logits (e.g.
  +-1e30) work.
* An entry is invisible (hidden) when masked out (mask False, causal, window, kv_lengths), when its
  bias is -inf (whatever the score: even a NaN from K) or when its score is -inf. A hidden key
  contributes nothing to the row, whatever its K and V hold (NaN, inf, garbage): out, lse and weights
  are as if the key were removed, its weight exactly 0. The products of the weights with V are
  therefore selected by visibility, never multiplied by 0. A row with no visible entry gets weights 0,
  output 0 and lse -inf: never NaN.
* A NaN among a row's visible scores makes that row NaN (output, lse and the weights of its visible
  keys; hidden keys still weigh 0 in attention) and leaves the other rows alone; a NaN or inf in a
  visible key's V reaches the rows that see it (even at weight 0, as 0 * NaN).
* Overflow: attention scores are s = (scale * q) . k (+ bias), scale applied to q first (dot,
  scaled_dot, general) as the fused kernels do; computed in float64, a score that does not fit the
  computation dtype (it would round past float32's largest finite value) becomes +-inf. A row whose
  maximum is +inf splits its weight evenly over its +inf scores (the limit of the softmax as they grow
  together), every other key weighs exactly 0, and its lse is +inf. :func:`softmax` and
  :func:`merge_states` (parts with lse +inf) follow the same rule.
* Serving additions, in this order after the method's score s: softcap c: s <- c tanh(s / c);
  alibi_slopes: s <- s - slope ``|diag_i - j|``, diag_i = i + offset the aligned diagonal; then bias;
  then masks. sinks join each row's denominator without a value. With kv_lengths, bottom_right aligns
  each item to its own length: offset = kv_lengths[b] - Lq. Paged and int8 caches are turned into the
  plain float64 cache they describe before anything else, so every rule above applies to them
  unchanged.
* Gradients (:func:`attention_backward`) follow the same visibility: a hidden key contributes nothing
  to any gradient, a row with no visible key gets zero gradients, and a row whose lse is +inf passes
  P^T dO to dV but has dS = 0.

Examples
--------
>>> import numpy as np
>>> import attnfast
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((2, 16, 8), dtype=np.float32) for _ in range(3))
>>> fast = attnfast.attention(q, k, v, causal=True)
>>> slow = attnfast.reference.attention(q, k, v, causal=True)
>>> bool(np.abs(fast - slow).max() < 1e-6)
True
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, SupportsIndex, Tuple, Union, overload

import numpy as np

from . import _inputs
from ._types import Array, ArrayLike, AttentionOutput, CausalAlign, FloatArray, Method, Real, Window

__all__ = ["scores", "softmax", "aggregate", "attention", "merge_states", "attention_backward"]

_F64 = np.float64


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _saturate(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float64 ``x`` with the values that overflow the computation dtype ``dtype`` (float32) replaced by
    +-inf."""
    if np.dtype(dtype).itemsize >= 8:
        return x  # float64 arithmetic overflows by itself
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(x) >= _inputs.FLOAT32_OVERFLOW, np.copysign(np.inf, x), x)


def _given(x: Optional[np.ndarray]) -> np.ndarray:
    """A method weight the method uses (the checks fill in every weight a method uses)."""
    assert x is not None
    return x


def _scores64(q: np.ndarray, k: np.ndarray, a: Union[_inputs.ScoresArgs, _inputs.AttentionArgs],
              scale_first: bool = False) -> np.ndarray:
    """Scores of float64 q (..., Lq, D), k (..., Lk, Dk) with the method of ``a``.

    ``a`` is a ScoresArgs or AttentionArgs (only the method fields are read).
    Batch axes broadcast as in ``np.matmul``.  ``scale_first``: dot-product
    methods compute (scale * q) . k, saturated to the computation dtype, as
    the fused attention does (see the module docstring); otherwise
    (q . k) * scale, as :func:`attnfast.scores` does.
    """
    m = a.method
    if scale_first and m in ("dot", "scaled_dot", "general"):
        qq = q @ _given(a.w).astype(_F64) if m == "general" else q
        qq = _saturate(_saturate(qq, a.compute) * a.scale, a.compute)
        return _saturate(qq @ _swap(k), a.compute)
    # scores(): (q . k) * scale, with q . k (and q W) saturated to the computation dtype as the fast
    # path's products are.
    if m in ("dot", "scaled_dot"):
        s = _saturate(q @ _swap(k), a.compute)
    elif m == "general":
        s = _saturate(_saturate(q @ _given(a.w).astype(_F64), a.compute) @ _swap(k), a.compute)
    elif m == "concat":
        # A linear layer over [q_i; k_j] splits into a query term and a key term.
        sq = q @ _given(a.w_q).astype(_F64)  # (..., Lq)
        sk = k @ _given(a.w_k).astype(_F64)  # (..., Lk)
        s = sq[..., :, None] + sk[..., None, :] + float(_given(a.score_bias))
    else:  # additive (Bahdanau)
        # w_q / w_k None: q / k are already the projections (A features).
        pq = q if a.w_q is None else q @ _swap(a.w_q.astype(_F64))  # (..., Lq, A)
        pk = k if a.w_k is None else k @ _swap(a.w_k.astype(_F64))  # (..., Lk, A)
        bias, v_a = _given(a.score_bias).astype(_F64), _given(a.v_a).astype(_F64)
        # One query at a time: the (..., Lk, A) tanh tensor has as many axes as q, where a whole
        # (..., Lq, Lk, A) one would need one more than NumPy's 64 for inputs with 64.
        batch = _inputs.broadcast_batch(pq.shape[:-2], pk.shape[:-2])
        s = np.empty(batch + (pq.shape[-2], pk.shape[-2]))
        for i in range(pq.shape[-2]):
            s[..., i, :] = np.tanh(pq[..., i, None, :] + pk + bias) @ v_a
    return s * a.scale


def _masked_softmax64(s: np.ndarray, visible: Optional[np.ndarray], axis: int, sink: Optional[np.ndarray] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Softmax over ``axis`` of float64 ``s`` restricted to ``visible``.

    Returns (weights, lse).  ``visible`` is a bool array broadcastable to
    ``s`` or None.  Rows with no visible finite-or-+inf entry give weights 0
    and lse -inf.  Rows whose maximum is +inf give each +inf entry the weight
    1 / (their count), every other entry 0, and lse +inf.

    ``sink`` (float64, broadcastable to ``s`` with ``axis`` of extent 1, or
    None): a logit that joins each row's denominator but is no entry of the
    row: weights_j = e^{s_j - m} / (e^{sink - m} + sum_j e^{s_j - m}) with
    m = max(sink, max_j s_j), lse = log(e^{sink} + sum_j e^{s_j}).  A row
    with no visible entry then has weights 0 and lse = sink.
    """
    if visible is not None:
        # Hiding an entry by -inf (rather than multiplying by 0) also hides a
        # NaN or inf that sits under the mask.
        s = np.where(visible, s, -np.inf)
    axis = axis % s.ndim
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if s.shape[axis]:
            m = np.max(s, axis=axis, keepdims=True)
        else:  # no keys at all: every row is empty
            m = np.full(s.shape[:axis] + (1,) + s.shape[axis + 1 :], -np.inf)
        if sink is not None:
            m = np.maximum(m, sink)  # NaN stays NaN
        # An all -inf row has max -inf; shifting by 0 instead keeps exp(-inf)
        # = 0 rather than exp(-inf - -inf) = NaN.
        saturated = m == np.inf
        shift = np.where((m == -np.inf) | saturated, 0.0, m)
        # A row with max +inf: the limit of the softmax as its +inf scores grow
        # together, weight 1 each before normalising, 0 for every other entry.
        e = np.where(saturated, (s == np.inf).astype(_F64), np.exp(s - shift))
        total = np.sum(e, axis=axis, keepdims=True)
        if sink is not None:
            # The sink weighs nothing next to +inf scores.
            total = total + np.where(saturated, 0.0, np.exp(sink - shift))
        weights = e / np.where(total == 0.0, 1.0, total)
        lse = np.where(saturated, np.inf, shift + np.log(total))  # log(0) = -inf for empty rows
    return weights, np.squeeze(lse, axis=axis)


def scores(q: ArrayLike, k: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
           w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None, w_k: Optional[ArrayLike] = None,
           v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None, **unexpected: Any) -> Array:
    """Reference for :func:`attnfast.scores`: every query scored against every key, in float64.

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
        In the promoted dtype of q and k.

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
    attnfast.scores

    Notes
    -----
    Computed in float64 from the textbook formulas on the values as given (16-bit inputs converted
    exactly) and rounded to nearest-even once into the result dtype; slow and obvious on purpose (it
    materialises the full score matrix). The same validation as the kernel (:mod:`attnfast`), so the two
    raise identical errors; the test suite holds every kernel to this function. Dot products are (q . k) * scale, as :func:`attnfast.scores` computes them, with q . k
    saturated to +-inf where it exceeds the computation dtype's range (float32 for float32 inputs), as the
    kernels' products are.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> q = np.array([[1.0, 2.0]], dtype=np.float32)
    >>> k = np.array([[3.0, 4.0], [-1.0, 0.5]], dtype=np.float32)
    >>> attnfast.reference.scores(q, k, method="dot")
    array([[11.,  0.]], dtype=float32)
    """
    if unexpected:
        _inputs.reject_unexpected(scores, unexpected)
    a = _inputs.check_scores(
        q, k, method=method, scale=scale, w=w, w_q=w_q, w_k=w_k, v_a=v_a, score_bias=score_bias
    )
    if 0 in a.batch_shape or a.lq == 0 or a.lk == 0:
        return np.empty(a.batch_shape + (a.lq, a.lk), a.dtype)  # without up-casting a broadcast batch
    with np.errstate(invalid="ignore", over="ignore"):  # overflowing scores are +-inf, as in the kernels
        return _inputs.round_to(_scores64(a.q.astype(_F64), a.k.astype(_F64), a), a.dtype)


def softmax(x: ArrayLike, axis: SupportsIndex = -1, *, mask: Optional[ArrayLike] = None,
            **unexpected: Any) -> Array:
    """Reference for :func:`attnfast.softmax`: a numerically safe softmax with an optional bool mask.

    Parameters
    ----------
    x : array_like
        Logits: float64, float32, float16 or ml_dtypes.bfloat16, at least one axis. -inf entries get
        weight 0.
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
        x's shape and dtype. Rows with no visible entry are all zeros.

    Raises
    ------
    TypeError
        x of a dtype attnfast does not compute with, a mask that is not bool, or an axis that is not an int.
    ValueError
        x is 0-d, axis is out of range, or the mask does not broadcast to x.

    See Also
    --------
    attnfast.softmax

    Notes
    -----
    The maximum of each row's visible entries is subtracted first; a row whose maximum is +inf splits its
    weight evenly over its +inf entries. Computed in float64 and rounded once.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> print(attnfast.reference.softmax(np.array([0.0, np.log(3.0)])))
    [0.25 0.75]
    """
    if unexpected:
        _inputs.reject_unexpected(softmax, unexpected)
    a = _inputs.check_softmax(x, axis, mask)
    if a.x.size == 0:
        return np.empty(a.x.shape, a.dtype)  # without up-casting a broadcast batch
    weights, _ = _masked_softmax64(a.x.astype(_F64), a.mask, a.axis)
    return _inputs.round_to(weights, a.dtype)


def aggregate(weights: ArrayLike, v: ArrayLike, **unexpected: Any) -> Array:
    """Reference for :func:`attnfast.aggregate`: the weighted sum of the values, ``weights @ v``, in float64.

    Parameters
    ----------
    weights : array_like, (..., Lq, Lk)
        The attention weights: float64, float32, float16 or ml_dtypes.bfloat16.
    v : array_like, (..., Lk, Dv)
        The values; batch axes broadcast with weights' as in np.matmul.
    **unexpected
        No other keyword argument is accepted: TypeError, naming attnfast's equivalent of a PyTorch,
        flash-attn or JAX name (``is_causal``, ``attn_mask``, ``dim``...) or the closest accepted name.

    Returns
    -------
    ndarray, (..., Lq, Dv)
        In the promoted dtype of weights and v; zeros when Lk = 0.

    Raises
    ------
    TypeError
        An input of a dtype attnfast does not compute with.
    ValueError
        Lk of weights and v differ, or the batch axes do not broadcast.

    See Also
    --------
    attnfast.aggregate

    Notes
    -----
    One float64 matmul, rounded once into the result dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> attnfast.reference.aggregate(np.array([[0.25, 0.75]]), np.array([[4.0], [8.0]]))
    array([[7.]])
    """
    if unexpected:
        _inputs.reject_unexpected(aggregate, unexpected)
    a = _inputs.check_aggregate(weights, v)
    if 0 in a.batch_shape or a.lq == 0 or a.dv == 0 or a.lk == 0:
        return np.zeros(a.batch_shape + (a.lq, a.dv), a.dtype)  # an empty sum is 0
    return _inputs.round_to(a.weights.astype(_F64) @ a.v.astype(_F64), a.dtype)


def _diagonals(a: _inputs.AttentionArgs) -> np.ndarray:
    """int64 (..., Lq, 1): the key on each query row's diagonal, which causal, window and ALiBi align to.

    i + offset, with offset 0 (top_left) or Lk - Lq (bottom_right); with kv_lengths, bottom_right
    aligns each item to its own length: offset kv_lengths[b] - Lq (``a.diagonal_offsets``)."""
    i = np.arange(a.lq, dtype=np.int64)[:, None]
    offset = a.diagonal_offset if a.diagonal_offsets is None else a.diagonal_offsets[..., None, None]
    diagonal: np.ndarray = i + offset
    return diagonal


def _visibility(a: _inputs.AttentionArgs) -> np.ndarray:
    """Bool (batch..., Lq, Lk) array: key j visible to query i (before -inf scores)."""
    j = np.arange(a.lk)[None, :]
    diag = _diagonals(a)
    vis = np.ones(np.broadcast_shapes(diag.shape, (a.lq, a.lk)), dtype=bool)
    if a.causal:
        vis &= j <= diag
    if a.window_left >= 0:
        vis &= j >= diag - a.window_left
    if a.window_right >= 0:
        vis &= j <= diag + a.window_right
    vis = np.broadcast_to(vis, a.batch_shape + (a.lq, a.lk))
    if a.mask is not None:
        vis = vis & a.mask
    if a.kv_lengths is not None:
        vis = vis & (j < a.kv_lengths[..., None, None])
    return vis


def _cache64(a: _inputs.AttentionArgs, x: np.ndarray, scale: Optional[np.ndarray], features: int) -> np.ndarray:
    """k or v as float64 of kv_batch_shape + (Lk, features): an int8 cache dequantised (int8 * scale,
    in float64), a paged cache gathered (key j of item b is row j % block_size of block
    block_table[b, j // block_size]); a broadcast view otherwise."""
    x = x.astype(_F64)
    if scale is not None:
        x = x * scale.astype(_F64)[..., None]
    if a.block_table is not None:
        # Entries past an item's kv_lengths were not validated and its keys there are hidden: any
        # in-range block stands in for them.
        table = np.where((a.block_table >= 0) & (a.block_table < x.shape[0]), a.block_table, 0)
        blocks = x[table]  # (B, max_blocks, Hk, block_size, features)
        b, hk = a.kv_batch_shape
        x = blocks.transpose(0, 2, 1, 3, 4).reshape(b, hk, a.lk, features)
    return np.broadcast_to(x, a.kv_batch_shape + (a.lk, features))


def _keys64(a: _inputs.AttentionArgs) -> np.ndarray:
    return _cache64(a, a.k, a.k_scale, a.dk)


def _values64(a: _inputs.AttentionArgs) -> np.ndarray:
    return _cache64(a, a.v, a.v_scale, a.dv)


def _sink64(a: _inputs.AttentionArgs) -> Optional[np.ndarray]:
    """The sinks as float64 (..., 1, 1) against the (batch..., Lq, Lk) scores, or None."""
    return None if a.sinks is None else a.sinks.astype(_F64)[..., None, None]


def _attention_scores64(a: _inputs.AttentionArgs) -> np.ndarray:
    """Final scores (batch..., Lq, Lk) in float64: the method's, then softcap, ALiBi and bias, each
    saturated to the dtype.  A -inf bias gives -inf whatever the score."""
    return _modified_scores64(a, _method_scores64(a))


def _modified_scores64(a: _inputs.AttentionArgs, s: np.ndarray) -> np.ndarray:
    """The score modifiers applied to the method's scores ``s``, in the issue's order:
    softcap s <- c tanh(s / c); ALiBi s <- s - slope |diag_i - j|; then s + bias."""
    with np.errstate(invalid="ignore", over="ignore"):
        if a.softcap is not None:
            s = a.softcap * np.tanh(s / a.softcap)
        if a.alibi_slopes is not None:
            slope = a.alibi_slopes.astype(_F64)[..., None, None]
            distance = np.abs(_diagonals(a) - np.arange(a.lk)[None, :]).astype(_F64)
            s = _saturate(s - slope * distance, a.compute)
        if a.bias is not None:
            b = a.bias.astype(_F64)
            s = np.where(b == -np.inf, -np.inf, _saturate(s + b, a.compute))
    return s


def _method_scores64(a: _inputs.AttentionArgs) -> np.ndarray:
    """The method's scores (batch..., Lq, Lk) in float64 (scale included), saturated to the dtype.

    GQA by reshaping, not repeating.
    """
    q = np.broadcast_to(a.q, a.batch_shape + (a.lq, a.d)).astype(_F64)
    k = _keys64(a)
    hk = a.kv_batch_shape[-1] if a.kv_batch_shape else 1
    with np.errstate(invalid="ignore", over="ignore"):
        if a.group == 1 or hk == 1:
            s = _saturate(_scores64(q, k, a, scale_first=True), a.compute)
        else:
            # Query head h = kv_head * group + g, so splitting the head axis into
            # (Hk, group) lines each query head up with kv head h // group.
            rest = a.batch_shape[:-1]
            qg = q.reshape(rest + (hk, a.group, a.lq, a.d))
            kg = k[..., None, :, :]  # (rest, Hk, 1, Lk, Dk)
            s = _saturate(_scores64(qg, kg, a, scale_first=True), a.compute).reshape(a.batch_shape + (a.lq, a.lk))
    return s


def _weighted_values64(weights: np.ndarray, visible: np.ndarray, v: np.ndarray) -> np.ndarray:
    """weights @ v, where row i takes key j's product only when j is visible to i.

    A hidden key's V never reaches the row, not even as 0 * NaN; a visible
    key's NaN or inf does (at any weight).  Broadcasts like ``np.matmul``:
    weights and visible (..., Lq, Lk), v (..., Lk, Dv).  The finite part of v
    goes through one matmul; only keys holding a NaN or inf are redone with a
    select, in slices of keys that keep the (..., Lq, keys, Dv) products small.
    """
    finite = np.isfinite(v)
    out = weights @ np.where(finite, v, 0.0)
    bad = np.flatnonzero(~np.all(finite, axis=tuple(range(v.ndim - 2)) + (v.ndim - 1,)))
    if bad.size == 0:
        return out
    v_bad = np.where(finite, 0.0, v)  # only the non-finite entries, 0 elsewhere
    per_key = max(1, out.size)
    step = max(1, (1 << 24) // per_key)
    with np.errstate(invalid="ignore"):
        for start in range(0, bad.size, step):
            keys = bad[start:start + step]
            w = weights[..., :, keys][..., None]  # (..., Lq, n, 1)
            seen = np.broadcast_to(visible, weights.shape)[..., :, keys][..., None]
            vk = v_bad[..., keys, :][..., None, :, :]  # (..., 1, n, Dv)
            out = out + np.sum(np.where(seen, w * vk, 0.0), axis=-2)
    return out


def _gqa_values64(a: _inputs.AttentionArgs) -> np.ndarray:
    """v as float64 indexed by output head (a broadcast view when group == 1)."""
    v = _values64(a)
    hk = a.kv_batch_shape[-1] if a.kv_batch_shape else 1
    if a.group == 1 or hk == 1:
        return v
    return v[..., None, :, :]  # (rest, Hk, 1, Lk, Dv) broadcasts against (rest, Hk, group, ...)



def _rounded_result(a: _inputs.AttentionArgs, o: np.ndarray) -> np.ndarray:
    """The float64 result o rounded once into the call's result: into out= (whichever of the storage
    dtypes it has) when given, else a new array of the result dtype. ``a``: the checked arguments."""
    if a.out is None:
        return _inputs.round_to(o, a.dtype)
    native = a.out.dtype if a.out.dtype.isnative else a.out.dtype.newbyteorder("=")
    np.copyto(a.out, _inputs.round_to(o, native), casting="unsafe")
    return a.out

@overload
def attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
    return_lse: Literal[False] = False, return_weights: Literal[False] = False,
    out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
    w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
    block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
    v_scale: Optional[ArrayLike] = None,
) -> Array: ...


@overload
def attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
    return_lse: Literal[True], return_weights: Literal[False] = False,
    out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
    w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
    block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
    v_scale: Optional[ArrayLike] = None,
) -> Tuple[Array, FloatArray]: ...


@overload
def attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
    return_lse: Literal[False] = False, return_weights: Literal[True],
    out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
    w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
    block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
    v_scale: Optional[ArrayLike] = None,
) -> Tuple[Array, Array]: ...


@overload
def attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
    return_lse: Literal[True], return_weights: Literal[True],
    out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
    w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
    block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
    v_scale: Optional[ArrayLike] = None,
) -> Tuple[Array, FloatArray, Array]: ...


@overload
def attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
    return_lse: bool = False, return_weights: bool = False,
    out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
    w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
    block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
    v_scale: Optional[ArrayLike] = None,
) -> AttentionOutput: ...


def attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[ArrayLike] = None,
    return_lse: bool = False, return_weights: bool = False,
    out: Optional[Array] = None, w: Optional[ArrayLike] = None, w_q: Optional[ArrayLike] = None,
    w_k: Optional[ArrayLike] = None, v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None,
    block_table: Optional[ArrayLike] = None, k_scale: Optional[ArrayLike] = None,
    v_scale: Optional[ArrayLike] = None, **unexpected: Any,
) -> AttentionOutput:
    """Reference for :func:`attnfast.attention`: scores, masking, softmax and weighted sum of values.

    Same signature, validation, errors and semantics as :func:`attnfast.attention`, computed in float64
    with the full (..., Lq, Lk) score matrix.

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
        Also return the weights (..., Lq, Lk).
    out : ndarray, optional
        (..., Lq, Dv) of any of the four floating dtypes to write the (once-rounded) result into.
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
        In the result dtype (or ``out`` itself).
    lse : ndarray, (..., Lq)
        Only with ``return_lse=True``; float32 for a 16-bit result, else the result dtype.
    weights : ndarray, (..., Lq, Lk)
        Only with ``return_weights=True``, in the result dtype; returned as (out, lse, weights), each only
        when asked for.

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
    attnfast.attention

    Notes
    -----
    Computed in float64 from the textbook formulas on the values as given (16-bit inputs converted
    exactly) and rounded to nearest-even once into the result dtype; slow and obvious on purpose (it
    materialises the full score matrix). The same validation as the kernel (:mod:`attnfast`), so the two
    raise identical errors; the test suite holds every kernel to this function.

    The rules the kernels reproduce: scores are s = (scale * q) . k for "dot", "scaled_dot" and "general"
    (scale applied to q first, as the fused kernels do), saturated to +-inf beyond the computation dtype's
    range; then softcap c tanh(s / c), ALiBi s - slope ``|diag_i - j|``, bias, and the masks. Hidden keys
    (mask, causal, window, kv_lengths, a -inf bias or score) are selected away, so whatever their K and V
    hold never reaches a row; a row with no visible key has out 0, weights 0 and lse -inf (the sink with
    ``sinks``). A row whose maximum is +inf splits its weight evenly over its +inf scores and has lse
    +inf. Paged and int8 caches are first turned into the float64 cache they describe (gathered through
    ``block_table``, dequantised as int8 * scale). See :func:`attnfast.attention` for the full contract.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> q = np.zeros((1, 2))
    >>> k = np.zeros((4, 2))
    >>> v = np.arange(4.0).reshape(4, 1)
    >>> out, weights = attnfast.reference.attention(q, k, v, kv_lengths=3, return_weights=True)
    >>> print(out, weights)
    [[1.]] [[0.33333333 0.33333333 0.33333333 0.        ]]
    """
    if unexpected:
        _inputs.reject_unexpected(attention, unexpected)
    a = _inputs.check_attention(
        q, k, v, method=method, scale=scale, mask=mask, bias=bias, causal=causal,
        causal_align=causal_align, window=window, kv_lengths=kv_lengths, return_lse=return_lse,
        return_weights=return_weights, out=out, w=w, w_q=w_q, w_k=w_k, v_a=v_a, score_bias=score_bias,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, block_table=block_table, k_scale=k_scale,
        v_scale=v_scale,
    )
    if _inputs.nothing_to_compute(a):
        return _inputs.result_without_scores(a)
    return _attention_from_args(a)


def _attention_from_args(a: _inputs.AttentionArgs) -> AttentionOutput:
    # NaN inputs are data here (a KV cache from np.empty holds signalling NaNs too): no warnings.
    with np.errstate(invalid="ignore"):
        return _attention_from_args_checked(a)


def _attention_from_args_checked(a: _inputs.AttentionArgs) -> AttentionOutput:
    s = _attention_scores64(a)
    visible = _visibility(a)
    weights, lse = _masked_softmax64(s, visible, axis=-1, sink=_sink64(a))
    visible = visible & (s != -np.inf)  # a -inf score (or bias) hides the key too
    weights = np.where(visible, weights, 0.0)  # 0 even in a row a NaN score made NaN

    vv = _gqa_values64(a)
    hk = a.kv_batch_shape[-1] if a.kv_batch_shape else 1
    if a.group == 1 or hk == 1:
        o = _weighted_values64(weights, visible, vv)
    else:
        rest = a.batch_shape[:-1]
        wg = weights.reshape(rest + (hk, a.group, a.lq, a.lk))
        vg = visible.reshape(rest + (hk, a.group, a.lq, a.lk))
        o = _weighted_values64(wg, vg, vv).reshape(a.batch_shape + (a.lq, a.dv))

    result = _rounded_result(a, o)
    lse_out = lse.astype(_inputs.lse_dtype(a.dtype)) if a.return_lse else None
    if not a.return_weights:
        return result if lse_out is None else (result, lse_out)
    weights_out = _inputs.round_to(weights, a.dtype)
    return (result, weights_out) if lse_out is None else (result, lse_out, weights_out)


def merge_states(outs: Sequence[ArrayLike], lses: Sequence[ArrayLike]) -> Tuple[Array, FloatArray]:
    """Reference for :func:`attnfast.merge_states`: combine attention over disjoint key sets, in float64.

    Parameters
    ----------
    outs : sequence of array_like, each (..., Lq, Dv)
        Normalised outputs of each part (float64, float32, float16 or ml_dtypes.bfloat16), one shape.
    lses : sequence of array_like, each (..., Lq)
        Log-sum-exp of each part (-inf for a row with no visible key in that part).

    Returns
    -------
    out : ndarray, (..., Lq, Dv)
        sum_i exp(lse_i - lse) * out_i; 0 where every part is empty.
    lse : ndarray, (..., Lq)
        log(sum_i exp(lse_i)); -inf where every part is empty. float32 for a 16-bit out.

    Raises
    ------
    TypeError
        A part of a dtype attnfast does not compute with, or outs / lses that are not lists or tuples.
    ValueError
        No parts, a different number of outs and lses, or parts whose shapes differ.

    See Also
    --------
    attnfast.merge_states

    Notes
    -----
    A NaN or inf in the out of a part whose lse is not -inf reaches the result even when its weight
    exp(lse_i - lse) underflows to 0; an empty part contributes nothing whatever its out holds. Where some
    parts have lse +inf, they share the weight evenly, the others weigh 0 and the merged lse is +inf, as
    in :func:`attnfast.attention`.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> out, lse = attnfast.reference.merge_states([np.array([[1.0]]), np.array([[3.0]])],
    ...                                            [np.array([0.0]), np.array([0.0])])
    >>> print(out, lse.round(4))
    [[2.]] [0.6931]
    """
    a = _inputs.check_merge_states(outs, lses)
    # The lses are stacked, the outs summed part by part: stacking them would add an axis, one too many
    # for outs that already have NumPy's maximum of 64.
    s = np.stack([x.astype(_F64) for x in a.lses])  # (n, ..., Lq)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(s, axis=0)
        saturated = m == np.inf
        shift = np.where((m == -np.inf) | saturated, 0.0, m)
        e = np.where(saturated, (s == np.inf).astype(_F64), np.exp(s - shift))
        total = np.sum(e, axis=0)
        lse = np.where(saturated, np.inf, shift + np.log(total))
        # An empty part (lse_i = -inf) contributes nothing, even if its out
        # holds garbage; an all-empty row stays 0.
        factor = np.where(s == -np.inf, 0.0, e / np.where(total == 0.0, 1.0, total))
        merged = np.zeros(a.shape, _F64)
        for part, f, empty in zip(a.outs, factor, s == -np.inf):
            merged += np.where(empty[..., None], 0.0, f[..., None] * part.astype(_F64))
    return _inputs.round_to(merged, a.dtype), lse.astype(a.lse_dtype)


# The backward lives in its own module (it reads this one's private helpers); imported last so that
# they exist when it is.
from ._reference_backward import attention_backward  # noqa: E402
from ._reference_varlen import attention_varlen  # noqa: E402
