"""Pure-NumPy float64 reference for every attnfast function.

Same signatures and the same input validation (:mod:`attnfast._inputs`) as the
fast path, so the two raise identical errors.  Everything is computed in
float64 with the textbook formulas and returned in the input's dtype.  This
module favours obviousness over speed: it materialises the full (..., Lq, Lk)
score matrix (and, for ``method="additive"``, the (..., Lq, Lk, A) tensor).

Numerics that the kernels must reproduce
-----------------------------------------
* Softmax subtracts the maximum of the *visible* entries of each row, so any
  finite logits (e.g. +-1e30) work.
* An entry is invisible when masked out (mask False, causal, window,
  kv_lengths) or when its score is -inf (e.g. from ``bias``).  A row with no
  visible entry gets weights 0, output 0 and lse -inf: never NaN.
* A NaN among a row's visible scores makes that row NaN (weights, output and
  lse) and leaves the other rows alone.  A +inf visible score also yields NaN
  (inf - inf), as it does in the kernels.
"""

from __future__ import annotations

import numpy as np

from . import _inputs

__all__ = ["scores", "softmax", "aggregate", "attention", "merge_states"]

_F64 = np.float64


def _swap(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


def _scores64(q: np.ndarray, k: np.ndarray, a) -> np.ndarray:
    """Scores of float64 q (..., Lq, D), k (..., Lk, Dk) with the method of ``a``.

    ``a`` is a ScoresArgs or AttentionArgs (only the method fields are read).
    Batch axes broadcast as in ``np.matmul``.
    """
    m = a.method
    if m in ("dot", "scaled_dot"):
        s = q @ _swap(k)
    elif m == "general":
        s = (q @ a.w.astype(_F64)) @ _swap(k)
    elif m == "concat":
        # A linear layer over [q_i; k_j] splits into a query term and a key term.
        sq = q @ a.w_q.astype(_F64)  # (..., Lq)
        sk = k @ a.w_k.astype(_F64)  # (..., Lk)
        s = sq[..., :, None] + sk[..., None, :] + float(a.score_bias)
    else:  # additive (Bahdanau)
        # w_q / w_k None: q / k are already the projections (A features).
        pq = q if a.w_q is None else q @ _swap(a.w_q.astype(_F64))  # (..., Lq, A)
        pk = k if a.w_k is None else k @ _swap(a.w_k.astype(_F64))  # (..., Lk, A)
        hidden = np.tanh(pq[..., :, None, :] + pk[..., None, :, :] + a.score_bias.astype(_F64))
        s = hidden @ a.v_a.astype(_F64)  # (..., Lq, Lk)
    return s * a.scale


def _masked_softmax64(s: np.ndarray, visible, axis: int):
    """Softmax over ``axis`` of float64 ``s`` restricted to ``visible``.

    Returns (weights, lse).  ``visible`` is a bool array broadcastable to
    ``s`` or None.  Rows with no visible finite-or-+inf entry give weights 0
    and lse -inf.
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
        # An all -inf row has max -inf; shifting by 0 instead keeps exp(-inf)
        # = 0 rather than exp(-inf - -inf) = NaN.
        shift = np.where(m == -np.inf, 0.0, m)
        e = np.exp(s - shift)
        total = np.sum(e, axis=axis, keepdims=True)
        weights = e / np.where(total == 0.0, 1.0, total)
        lse = shift + np.log(total)  # log(0) = -inf for empty rows
    return weights, np.squeeze(lse, axis=axis)


def scores(q, k, *, method="scaled_dot", scale=None, w=None, w_q=None, w_k=None, v_a=None, score_bias=None):
    """Attention scores of every query against every key.

    Parameters
    ----------
    q : array_like, (..., Lq, D)
        Queries.
    k : array_like, (..., Lk, Dk)
        Keys.  Batch axes broadcast with q's.
    method : {"dot", "scaled_dot", "general", "concat", "additive"}
        Score rule (see DESIGN.md).
    scale : float, optional
        Multiplies every method's score; 1/sqrt(D) for "scaled_dot", else 1.
    w : array_like, (D, Dk)
        Bilinear weight of "general".
    w_q, w_k : array_like
        (D,) and (Dk,) for "concat"; (A, D) and (A, Dk) for "additive".
    v_a : array_like, (A,), optional
        Output weights of "additive" (default ones).
    score_bias : array_like, optional
        Scalar for "concat" (default 0), (A,) for "additive" (default zeros).

    Returns
    -------
    ndarray, (..., Lq, Lk)
        In the promoted dtype of q and k.
    """
    a = _inputs.check_scores(
        q, k, method=method, scale=scale, w=w, w_q=w_q, w_k=w_k, v_a=v_a, score_bias=score_bias
    )
    if 0 in a.batch_shape or a.lq == 0 or a.lk == 0:
        return np.empty(a.batch_shape + (a.lq, a.lk), a.dtype)  # without up-casting a broadcast batch
    return _scores64(a.q.astype(_F64), a.k.astype(_F64), a).astype(a.dtype)


def softmax(x, axis=-1, *, mask=None):
    """Numerically safe softmax with an optional boolean mask.

    Parameters
    ----------
    x : array_like, float32 or float64
        Logits.  -inf entries get weight 0.
    axis : int, default -1
        Axis to normalise over.
    mask : array_like of bool, optional
        Broadcastable to ``x.shape``; True = attend, False = weight 0.

    Returns
    -------
    ndarray, same shape and dtype as x
        Rows with no visible entry are all zeros.
    """
    a = _inputs.check_softmax(x, axis, mask)
    if a.x.size == 0:
        return np.empty(a.x.shape, a.dtype)  # without up-casting a broadcast batch
    weights, _ = _masked_softmax64(a.x.astype(_F64), a.mask, a.axis)
    return weights.astype(a.dtype)


def aggregate(weights, v):
    """Weighted sum of the values, ``weights @ v``.

    Parameters
    ----------
    weights : array_like, (..., Lq, Lk)
    v : array_like, (..., Lk, Dv)

    Returns
    -------
    ndarray, (..., Lq, Dv)
    """
    a = _inputs.check_aggregate(weights, v)
    if 0 in a.batch_shape or a.lq == 0 or a.dv == 0 or a.lk == 0:
        return np.zeros(a.batch_shape + (a.lq, a.dv), a.dtype)  # an empty sum is 0
    return (a.weights.astype(_F64) @ a.v.astype(_F64)).astype(a.dtype)


def _visibility(a) -> np.ndarray:
    """Bool (batch..., Lq, Lk) array: key j visible to query i (before -inf scores)."""
    i = np.arange(a.lq)[:, None]
    j = np.arange(a.lk)[None, :]
    diag = i + a.diagonal_offset
    vis = np.ones((a.lq, a.lk), dtype=bool)
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


def _attention_scores64(a) -> np.ndarray:
    """Scores (batch..., Lq, Lk) in float64, with GQA done by reshaping, not repeating."""
    q = np.broadcast_to(a.q, a.batch_shape + (a.lq, a.d)).astype(_F64)
    k = np.broadcast_to(a.k, a.kv_batch_shape + (a.lk, a.dk)).astype(_F64)
    hk = a.kv_batch_shape[-1] if a.kv_batch_shape else 1
    if a.group == 1 or hk == 1:
        return _scores64(q, k, a)
    # Query head h = kv_head * group + g, so splitting the head axis into
    # (Hk, group) lines each query head up with kv head h // group.
    rest = a.batch_shape[:-1]
    qg = q.reshape(rest + (hk, a.group, a.lq, a.d))
    kg = k[..., None, :, :]  # (rest, Hk, 1, Lk, Dk)
    return _scores64(qg, kg, a).reshape(a.batch_shape + (a.lq, a.lk))


def _gqa_values64(a) -> np.ndarray:
    """v as float64 indexed by output head (a broadcast view when group == 1)."""
    v = np.broadcast_to(a.v, a.kv_batch_shape + (a.lk, a.dv)).astype(_F64)
    hk = a.kv_batch_shape[-1] if a.kv_batch_shape else 1
    if a.group == 1 or hk == 1:
        return v
    return v[..., None, :, :]  # (rest, Hk, 1, Lk, Dv) broadcasts against (rest, Hk, group, ...)


def attention(
    q,
    k,
    v,
    *,
    method="scaled_dot",
    scale=None,
    mask=None,
    bias=None,
    causal=False,
    causal_align="top_left",
    window=None,
    kv_lengths=None,
    return_lse=False,
    return_weights=False,
    out=None,
    w=None,
    w_q=None,
    w_k=None,
    v_a=None,
    score_bias=None,
):
    """Full attention: scores, masking, softmax and weighted sum of values.

    Parameters
    ----------
    q : array_like, (..., Lq, D)
    k : array_like, (..., Lk, Dk)
    v : array_like, (..., Lk, Dv)
        Batch axes broadcast; on the head axis (-3) the kv heads may divide the
        query heads (GQA/MQA: query head h reads kv head h // (Hq/Hk)).
    method, scale, w, w_q, w_k, v_a, score_bias
        Score rule, as in :func:`scores`.
    mask : array_like of bool, optional
        Broadcastable to (..., Lq, Lk); True = attend.
    bias : array_like, optional
        Added to the scores (after ``scale``); broadcastable to (..., Lq, Lk).
    causal : bool
        Key j visible to query i only when j <= i + offset.
    causal_align : {"top_left", "bottom_right"}
        offset = 0 or Lk - Lq; also aligns ``window``.
    window : (int or None, int or None), optional
        (left, right): keys with i + offset - left <= j <= i + offset + right.
    kv_lengths : array_like of int, optional
        Broadcastable to the batch shape; only the first n keys are visible.
    return_lse, return_weights : bool
        Also return the log-sum-exp (..., Lq) / the weights (..., Lq, Lk).
    out : ndarray, optional
        (..., Lq, Dv) array of the result dtype to write the output into.

    Returns
    -------
    out : ndarray, (..., Lq, Dv)
        Or a tuple (out, lse), (out, weights) or (out, lse, weights).
    """
    a = _inputs.check_attention(
        q, k, v, method=method, scale=scale, mask=mask, bias=bias, causal=causal,
        causal_align=causal_align, window=window, kv_lengths=kv_lengths, return_lse=return_lse,
        return_weights=return_weights, out=out, w=w, w_q=w_q, w_k=w_k, v_a=v_a, score_bias=score_bias,
    )
    if a.lk == 0 or a.lq == 0 or 0 in a.batch_shape or (a.dv == 0 and not (a.return_lse or a.return_weights)):
        return _attention_without_keys_or_outputs(a)
    return _attention_from_args(a)


def _attention_without_keys_or_outputs(a):
    """attention() with no key (out 0, lse -inf) or nothing to compute, without materialising a
    broadcast batch: the outputs are the only allocation."""
    if a.out is not None:
        a.out[...] = 0
        result = a.out
    else:
        result = np.zeros(a.batch_shape + (a.lq, a.dv), a.dtype)
    extras = []
    if a.return_lse:
        extras.append(np.full(a.batch_shape + (a.lq,), -np.inf, a.dtype))
    if a.return_weights:
        extras.append(np.zeros(a.batch_shape + (a.lq, a.lk), a.dtype))
    return (result, *extras) if extras else result


def _attention_from_args(a):
    s = _attention_scores64(a)
    if a.bias is not None:
        s = s + a.bias.astype(_F64)
    weights, lse = _masked_softmax64(s, _visibility(a), axis=-1)

    vv = _gqa_values64(a)
    hk = a.kv_batch_shape[-1] if a.kv_batch_shape else 1
    if a.group == 1 or hk == 1:
        o = weights @ vv
    else:
        rest = a.batch_shape[:-1]
        wg = weights.reshape(rest + (hk, a.group, a.lq, a.lk))
        o = (wg @ vv).reshape(a.batch_shape + (a.lq, a.dv))

    if a.out is not None:
        a.out[...] = o
        result = a.out
    else:
        result = o.astype(a.dtype)
    extras = []
    if a.return_lse:
        extras.append(lse.astype(a.dtype))
    if a.return_weights:
        extras.append(weights.astype(a.dtype))
    return (result, *extras) if extras else result


def merge_states(outs, lses):
    """Combine attention computed over disjoint key sets.

    Parameters
    ----------
    outs : sequence of array_like, each (..., Lq, Dv)
        Normalised outputs of each part.
    lses : sequence of array_like, each (..., Lq)
        Log-sum-exp of each part (-inf for a part with no visible key).

    Returns
    -------
    out : ndarray, (..., Lq, Dv)
        sum_i exp(lse_i - lse) * out_i; 0 where every part is empty.
    lse : ndarray, (..., Lq)
        log(sum_i exp(lse_i)); -inf where every part is empty.
    """
    a = _inputs.check_merge_states(outs, lses)
    o = np.stack([x.astype(_F64) for x in a.outs])  # (n, ..., Lq, Dv)
    s = np.stack([x.astype(_F64) for x in a.lses])  # (n, ..., Lq)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(s, axis=0)
        shift = np.where(m == -np.inf, 0.0, m)
        e = np.exp(s - shift)
        total = np.sum(e, axis=0)
        lse = shift + np.log(total)
        # An empty part (lse_i = -inf) contributes nothing, even if its out
        # holds garbage; an all-empty row stays 0.
        factor = np.where(s == -np.inf, 0.0, e / np.where(total == 0.0, 1.0, total))
        contrib = np.where((s == -np.inf)[..., None], 0.0, factor[..., None] * o)
        merged = np.sum(contrib, axis=0)
    return merged.astype(a.dtype), lse.astype(a.dtype)
