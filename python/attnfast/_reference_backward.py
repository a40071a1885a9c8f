"""Float64 reference of the gradients of :func:`attnfast.reference.attention` (imported by it).

Recomputes the forward in float64 from q, k and v (``out`` and ``lse`` are validated, not used: the
result is the exact gradient of the reference forward), materialising the (..., Lq, Lk) matrices, and
applies the textbook formulas, with every kv operand expanded to the query items that read it::

    P  = the forward's weights        dV = P^T dO        dP = dO V^T
    delta_i = sum_j P_ij dP_ij  (= dO_i . O_i)
    dS = P * (dP - delta)             (0 where a key is hidden)

and dS, the gradient of the final scores (bias included), is chained through the score modifiers --
ALiBi adds a constant (dS passes unchanged), softcap c tanh(r / c) multiplies it by 1 - tanh^2(r / c)
at the method's score r -- and then through the score method:
dot products s = (scale q) . k give dQ = scale dS K and dK = scale dS^T Q; general goes through q W;
concat's s = scale (w_q.q_i + w_k.k_j + b) through its two row sums; additive's
s = scale v_a . tanh(qp_i + kp_j) through 1 - tanh^2, one query at a time (as the forward).

The forward's rules carry over: a hidden key contributes nothing to any gradient whatever its K and V
hold (products are selected by visibility, never multiplied by 0), a row with no visible key gets zero
gradients, and a row whose lse is +inf (scores overflowed to +inf) has P = the forward's weights
(1/count on its +inf scores), so dV gets P^T dO, but dS = 0: its scores cannot move P. Gradients are
then summed to each input's shape and rounded once into its dtype.

Sinks: P = exp(s - lse) with the sink inside lse, so dS keeps its form, and the sink's own weight
P_sink,i = e^{sink - lse_i} gives dsink = -sum_i P_sink,i delta_i (= -sum_i e^{sink - lse_i} dO_i . O_i),
summed over every row of every batch item the sink serves.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from . import _inputs
from . import reference as _forward
from ._grads import AttentionGrads, fold_query_heads, sum_to_shape
from ._types import ArrayLike, CausalAlign, Method, Real, Window

__all__ = ["attention_backward"]

_F64 = np.float64


def attention_backward(dout: ArrayLike, q: ArrayLike, k: ArrayLike, v: ArrayLike, out: ArrayLike, lse: ArrayLike,
                       *, method: Method = "scaled_dot", scale: Optional[Real] = None,
                       mask: Optional[ArrayLike] = None, bias: Optional[ArrayLike] = None, causal: bool = False,
                       causal_align: CausalAlign = "top_left", window: Window = None,
                       kv_lengths: Optional[ArrayLike] = None, w: Optional[ArrayLike] = None,
                       w_q: Optional[ArrayLike] = None, w_k: Optional[ArrayLike] = None,
                       v_a: Optional[ArrayLike] = None, score_bias: Optional[ArrayLike] = None,
                       softcap: Optional[Real] = None, alibi_slopes: Optional[ArrayLike] = None,
                       sinks: Optional[ArrayLike] = None, **unexpected: Any) -> AttentionGrads:
    """Reference for :func:`attnfast.attention_backward`: the gradients in float64 from the explicit formulas.

    Recomputes the forward in float64 from q, k and v (``out`` and ``lse`` are validated, not used: the
    result is the exact gradient of :func:`attnfast.reference.attention`).

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
        dq, dk, dv with the shapes and dtypes of q, k, v; dbias, dw, dw_q, dw_k, dscore_bias, dv_a and
        dsinks where the call has those inputs (see :class:`attnfast.AttentionGrads`), each rounded once
        into its input's dtype.

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
    attnfast.attention_backward

    Notes
    -----
    With P the forward's weights: dV = P^T dO, dP = dO V^T, delta_i = sum_j P_ij dP_ij (= dO_i . O_i),
    dS = P * (dP - delta) (0 where a key is hidden); dS is chained through the score modifiers (ALiBi
    passes it unchanged, softcap multiplies it by 1 - tanh^2(r / c) at the method's score r) and then
    through the score method (dQ = scale dS K and dK = scale dS^T Q for dot products; general through q W;
    concat through its two row sums; additive through 1 - tanh^2, one query at a time). A hidden key
    contributes nothing to any gradient, a row with no visible key gets zero gradients, and a row whose
    lse is +inf passes P^T dO to dV but has dS = 0. dsink = -sum_i e^(sink - lse_i) delta_i. The tests
    check these formulas against central finite differences.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((3, 4)) for _ in range(3))
    >>> out, lse = attnfast.reference.attention(q, k, v, return_lse=True)
    >>> grads = attnfast.reference.attention_backward(np.ones_like(out), q, k, v, out, lse)
    >>> print(round(float(grads.dv.sum()), 6))   # each of 3 rows sends weights summing to 1, 4 features
    12.0
    """
    _inputs.reject_backward_extras(unexpected, attention_backward)
    b = _inputs.check_attention_backward(
        dout, q, k, v, out, lse, method=method, scale=scale, mask=mask, bias=bias, causal=causal,
        causal_align=causal_align, window=window, kv_lengths=kv_lengths, w=w, w_q=w_q, w_k=w_k, v_a=v_a,
        score_bias=score_bias, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
    )
    a = b.forward
    if _inputs.nothing_to_compute(a):
        # No score, or no value feature for the loss to depend on: every gradient is 0.
        grads = {name: np.zeros(np.shape(x)) for name, x in _inputs_of(a).items()}
    else:
        # NaN inputs are data (hidden garbage, or a visible NaN that reaches its rows): no warnings.
        with np.errstate(invalid="ignore", over="ignore"):
            grads = _gradients64(a, b.dout.astype(_F64))
    return _rounded(grads, a, b.grad_dtypes)


def _inputs_of(a: _inputs.AttentionArgs) -> Dict[str, np.ndarray]:
    """The differentiable inputs of the call, by name, as validated (shapes as given)."""
    found = {"q": a.q, "k": a.k, "v": a.v}
    if a.bias is not None:
        found["bias"] = a.bias
    for name in ("w", "w_q", "w_k", "score_bias", "v_a", "sinks"):
        if getattr(a, name) is not None:
            found[name] = getattr(a, name)
    return found


def _rounded(grads: Dict[str, np.ndarray], a: _inputs.AttentionArgs, dtypes: Dict[str, np.dtype]) -> AttentionGrads:
    """The float64 gradients summed to their inputs' shapes and rounded once into their dtypes."""
    shapes = {name: np.shape(x) for name, x in _inputs_of(a).items()}
    fields = {}
    for name, g in grads.items():
        fields["d" + name] = _inputs.round_to(sum_to_shape(np.asarray(g, _F64), shapes[name]), dtypes[name])
    return AttentionGrads(**fields)


def _per_query_item(x: np.ndarray, a: _inputs.AttentionArgs, features: int) -> np.ndarray:
    """k or v in float64, expanded to one item per query item (batch_shape + (Lk, features)): GQA/MQA
    repeats each kv head for the query heads that read it (obvious, not fast)."""
    x = np.broadcast_to(x, a.kv_batch_shape + (a.lk, features)).astype(_F64)
    if a.group > 1:
        x = np.repeat(x, a.group, axis=-3)
    return np.broadcast_to(x, a.batch_shape + (a.lk, features))


def _t(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _gradients64(a: _inputs.AttentionArgs, dout: np.ndarray) -> Dict[str, np.ndarray]:
    """Every gradient in float64, batch-shaped (q-like ones batch + (Lq, .), k/v-like ones per query
    item batch + (Lk, .) before folding), weights already summed over the batch."""
    raw = _forward._method_scores64(a)
    s = _forward._modified_scores64(a, raw)
    shown = _forward._visibility(a)
    p, lse = _forward._masked_softmax64(s, shown, axis=-1, sink=_forward._sink64(a))
    visible = shown & (s != -np.inf)
    p = np.where(visible, p, 0.0)

    q = np.broadcast_to(a.q, a.batch_shape + (a.lq, a.d)).astype(_F64)
    k = _per_query_item(a.k, a, a.dk)
    v = _per_query_item(a.v, a, a.dv)

    dv = _forward._weighted_values64(_t(p), _t(visible), dout)
    dp = dout @ _t(v)
    delta = np.sum(np.where(visible, p * dp, 0.0), axis=-1, keepdims=True)
    ds = np.where(visible, p * (dp - delta), 0.0)
    # Overflowed rows: P is the limit of the softmax, which no finite change of the scores moves.
    ds = np.where((lse == np.inf)[..., None], 0.0, ds)

    grads = _method_gradients64(a, _through_softcap(a, ds, raw, visible), visible, q, k)
    grads["v"] = dv
    if a.bias is not None:
        grads["bias"] = ds
    if a.sinks is not None:
        # The sink's weight e^{sink - lse_i}; 0 in a row whose lse is +inf.
        p_sink = np.exp(_forward._given(_forward._sink64(a))[..., 0] - lse)  # (batch..., Lq)
        grads["sinks"] = -np.sum(p_sink * delta[..., 0], axis=-1)
    for name in ("k", "v"):
        grads[name] = fold_query_heads(grads[name], a.kv_batch_shape, a.group)
    return grads


def _through_softcap(a: _inputs.AttentionArgs, ds: np.ndarray, raw: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """dS chained through s = c tanh(r / c) to the method's score r: dS (1 - tanh^2(r / c)), 0 where
    hidden (never multiplied there: r may be NaN). ALiBi's term is constant in r."""
    if a.softcap is None:
        return ds
    t = np.tanh(raw / a.softcap)
    return np.where(visible, ds * (1.0 - t * t), 0.0)


def _seen_rows(x: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Rows of x (..., L, F) where ``seen`` (..., L) holds, 0 elsewhere: a query with no visible key,
    or a key no query sees, may hold anything, and its gradient term is selected away, not zeroed by a
    multiplication."""
    return np.where(seen[..., None], x, 0.0)


def _batch_sum_outer(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum over every batch item and row of x_r^T y_r: x (..., L, F), y (..., L, G) -> (F, G)."""
    total: np.ndarray = x.reshape(-1, x.shape[-1]).T @ y.reshape(-1, y.shape[-1])
    return total


def _method_gradients64(a: _inputs.AttentionArgs, ds: np.ndarray, visible: np.ndarray, q: np.ndarray, k: np.ndarray
                        ) -> Dict[str, np.ndarray]:
    """dq, dk (per query item) and the method weights' gradients from dS, the scores' gradient."""
    select = _forward._weighted_values64
    rows_seen, keys_seen = np.logical_or.reduce(visible, axis=-1), np.logical_or.reduce(visible, axis=-2)
    scale = a.scale
    if a.method in ("dot", "scaled_dot"):
        return {"q": scale * select(ds, visible, k), "k": scale * select(_t(ds), _t(visible), q)}
    if a.method == "general":
        w = _forward._given(a.w).astype(_F64)
        dqw = scale * select(ds, visible, k)  # gradient of the projected queries q W
        return {
            "q": dqw @ w.T,
            "k": scale * select(_t(ds), _t(visible), q @ w),
            "w": _batch_sum_outer(_seen_rows(q, rows_seen), dqw),
        }
    if a.method == "concat":
        by_query = scale * np.sum(ds, axis=-1)  # d s / d (w_q . q_i), summed over the keys
        by_key = scale * np.sum(ds, axis=-2)
        return {
            "q": by_query[..., None] * _forward._given(a.w_q).astype(_F64),
            "k": by_key[..., None] * _forward._given(a.w_k).astype(_F64),
            "w_q": np.sum(by_query[..., None] * _seen_rows(q, rows_seen), axis=tuple(range(q.ndim - 1))),
            "w_k": np.sum(by_key[..., None] * _seen_rows(k, keys_seen), axis=tuple(range(k.ndim - 1))),
            "score_bias": np.sum(by_query),
        }
    return _additive_gradients64(a, ds, visible, q, k, rows_seen, keys_seen)


def _additive_gradients64(a: _inputs.AttentionArgs, ds: np.ndarray, visible: np.ndarray, q: np.ndarray, k: np.ndarray,
                          rows_seen: np.ndarray, keys_seen: np.ndarray) -> Dict[str, np.ndarray]:
    """Bahdanau scores s_ij = scale v_a . tanh(qp_i + kp_j + b), one query at a time (the forward's
    (..., Lk, A) tensor per query): dz_ija = scale dS_ij v_a[a] (1 - tanh^2) is the gradient of the
    pre-activation, whose sums over j, i and both give dqp, dkp and d score_bias."""
    w_q = None if a.w_q is None else a.w_q.astype(_F64)
    w_k = None if a.w_k is None else a.w_k.astype(_F64)
    b, v_a = _forward._given(a.score_bias).astype(_F64), _forward._given(a.v_a).astype(_F64)
    qp = q if w_q is None else q @ w_q.T
    kp = k if w_k is None else k @ w_k.T
    dqp = np.zeros(qp.shape)
    dkp = np.zeros(kp.shape)
    dv_a = np.zeros(v_a.shape)
    for i in range(a.lq):
        t = np.tanh(qp[..., i, None, :] + kp + b)  # (..., Lk, A)
        seen = visible[..., i, :, None]
        dsi = ds[..., i, :, None]
        dz = np.where(seen, (a.scale * dsi) * (1.0 - t * t), 0.0) * v_a
        dv_a += np.sum(np.where(seen, (a.scale * dsi) * t, 0.0), axis=tuple(range(t.ndim - 1)))
        dqp[..., i, :] = np.sum(dz, axis=-2)
        dkp += dz
    grads = {
        "q": dqp if w_q is None else dqp @ w_q,
        "k": dkp if w_k is None else dkp @ w_k,
        "score_bias": np.sum(dqp, axis=tuple(range(dqp.ndim - 1))),
        "v_a": dv_a,
    }
    if w_q is not None:
        grads["w_q"] = _batch_sum_outer(dqp, _seen_rows(q, rows_seen))
    if w_k is not None:
        grads["w_k"] = _batch_sum_outer(dkp, _seen_rows(k, keys_seen))
    return grads
