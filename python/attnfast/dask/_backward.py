"""attnfast.dask.attention_backward: the gradients of attention over Dask arrays, block by block.

The forward's lse makes the backward separable. For a block of queries (one chunk of q's batch and
query axes) and a chunk of keys, attnfast's fused backward recomputes the weights as
P = exp(s - lse) and the row term delta = rowsum(dO * O) from the forward's out and lse; given the
GLOBAL out and lse rows of that query chunk (not a block-local forward's), both are exactly the whole
call's, so each (output block, key chunk) task yields that block's exact share of every gradient:
dq of its queries, dk and dv of its keys, dbias of its scores, and the method weights' terms. The
shares are then added up, each in a fixed balanced tree (so the result does not depend on the
scheduler), and rounded once into the input's dtype: dq over key chunks, dk and dv over query chunks
(and over batch blocks where k and v were broadcast), dbias over the blocks that read one block of
bias, the weights over every block.

Sinks never reach the block tasks: the global lse already includes each sink (it is the sink's share of
the softmax denominator), and the sink's own gradient, dsinks = -sum_i e^(sink - lse_i) dO_i . O_i, is
a per-row sum of dout, out and lse alone, computed once per output block.

A key chunk that causal, the window or kv_lengths hides from every query of an output block gets no
task (its share is zero); the planner in :mod:`attnfast.dask._plan` decides which, for the forward
and the backward alike.
"""

from __future__ import annotations

import itertools
import operator
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import _api, _inputs
from . import _forward, _plan
from .._grads import AttentionGrads, sum_to_shape

__all__ = ["attention_backward"]

# Inputs that may be as large as the activations: chunked and streamed through the graph.
_LARGE = ("dout", "q", "k", "v", "out", "lse", "mask", "bias")
# The method weights: every block task contributes to their gradients (AttentionGrads' "d" + name).
_WEIGHT_FIELDS = ("w", "w_q", "w_k", "score_bias", "v_a")


def _is_dask(x: Any) -> bool:
    import dask.array as da

    return isinstance(x, da.Array)


def _eager(x: Any) -> Any:
    """A small argument (per head at most, or kv_lengths) given as a dask array, computed now on the
    caller's scheduler; anything else as given."""
    return np.asarray(x.compute()) if _is_dask(x) else x


def _stand_in(x: Any, dtype: Optional[np.dtype] = None) -> np.ndarray:
    """A zero-stride array of ``x``'s shape (and ``dtype`` or its own): validation sees the shape and
    dtype without computing a chunk or allocating the array."""
    return np.broadcast_to(np.zeros((), x.dtype if dtype is None else dtype), x.shape)


def _validation_dtypes(large: Dict[str, Any]) -> Tuple[Dict[str, np.dtype], Optional[np.dtype]]:
    """The dtypes to give the stand-ins of dask q, k, v and bias so that validation converts nothing:
    check_attention casts a float32/float64 input to the promoted result dtype and bias to the
    computation dtype, which on a broadcast stand-in would allocate the whole array. Returns
    ({name: dtype}, computation dtype or None when the dtypes are not valid ones, which validation
    then reports as attnfast.attention does)."""
    dtypes: Dict[str, np.dtype] = {}
    try:
        native = [np.dtype(large[n].dtype if hasattr(large[n], "dtype") else np.asarray(large[n]).dtype)
                  for n in ("q", "k", "v")]
        native = [d.newbyteorder("=") if d.kind == "f" else d for d in native]
        if not all(d in _inputs.STORAGE_DTYPES for d in native):
            return dtypes, None
        result = _inputs.result_dtype(*native)
    except (TypeError, ValueError):
        return dtypes, None
    for name, d in zip(("q", "k", "v"), native):
        if _is_dask(large[name]):
            dtypes[name] = d if d in _inputs._SIXTEEN_BIT else result
    return dtypes, _inputs.compute_dtype(result)


def _validate(large: Dict[str, Any], small: Dict[str, Any], kwargs: Dict[str, Any]) -> _inputs.AttentionBackwardArgs:
    """attnfast.attention_backward's validation of the whole call, once, on stand-ins of the dask
    arrays (so its errors are attention_backward's); the gradient dtypes are those of the real inputs."""
    dtypes, compute = _validation_dtypes(large)
    given: Dict[str, Any] = {}
    for name, x in large.items():
        if not _is_dask(x):
            given[name] = x
        elif name == "bias" and compute is not None and (x.dtype.kind in "iuf" or x.dtype == _inputs._BFLOAT16):
            given[name] = _stand_in(x, compute)
        elif x.dtype.kind == "f" and not x.dtype.isnative:
            given[name] = _stand_in(x, x.dtype.newbyteorder("="))
        else:
            given[name] = _stand_in(x, dtypes.get(name))
    b = _inputs.check_attention_backward(
        given["dout"], given["q"], given["k"], given["v"], given["out"], given["lse"],
        mask=given["mask"], bias=given["bias"], **small, **kwargs,
    )
    for name in ("q", "k", "v"):
        if _is_dask(large[name]):
            b.grad_dtypes[name] = _inputs._float_array(name, np.empty(0, large[name].dtype)).dtype
    if b.forward.bias is not None and _is_dask(large["bias"]):
        b.grad_dtypes["bias"] = _inputs._gradient_dtype(np.empty(0, large["bias"].dtype), b.forward.compute)
    return b


# --------------------------------------------------------------------------
# The block grid
# --------------------------------------------------------------------------


class _Grid:
    """Where each input's chunks lie among the plan's blocks. The call's coordinates are the output's
    batch axes ("b", i), the kv batch axes ("kb", i) (kv heads on the head axis), the queries "lq" and
    the keys "lk"; every axis of an input is one of these, a feature axis "f" (one chunk), or an axis
    of extent 1 it is broadcast along (one chunk, which every block reads)."""

    def __init__(self, a: _inputs.AttentionArgs, plan: _plan.Plan) -> None:
        nb = len(a.batch_shape)
        self.coords: Dict[Any, Tuple[int, ...]] = {("b", i): c for i, c in enumerate(plan.batch_chunks)}
        for i, (c, n, m) in enumerate(zip(plan.batch_chunks, a.batch_shape, a.kv_batch_shape)):
            # The kv head axis of grouped-query attention: the (whole-group) head chunks / group.
            self.coords[("kb", i)] = c if m == n or m == 1 else tuple(s // a.group for s in c)
        self.coords["lq"], self.coords["lk"] = plan.query_chunks, plan.key_chunks
        self.nb = nb

    def roles(self, name: str, ndim: int) -> List[Any]:
        """The coordinate of each axis of input ``name`` (of ``ndim`` dimensions)."""
        tail = {"q": ["lq", "f"], "k": ["lk", "f"], "v": ["lk", "f"], "dout": ["lq", "f"], "out": ["lq", "f"],
                "lse": ["lq"], "mask": ["lq", "lk"], "bias": ["lq", "lk"]}[name]
        kind = "kb" if name in ("k", "v") else "b"
        full = [(kind, i) for i in range(self.nb)] + tail
        return full[len(full) - ndim:]

    def chunks(self, name: str, shape: Tuple[int, ...]) -> Tuple[Tuple[int, ...], ...]:
        """The chunks input ``name`` of ``shape`` is rechunked to."""
        return tuple((n,) if r == "f" or n == 1 else self.coords[r]
                     for r, n in zip(self.roles(name, len(shape)), shape))

    def index(self, name: str, shape: Tuple[int, ...], block: _plan.OutputBlock, ki: int) -> Tuple[int, ...]:
        """The chunk of input ``name`` that output block ``block`` reads with key chunk ``ki``."""
        at = {"lq": block.query_index, "lk": ki}
        return tuple(0 if r == "f" or n == 1 else (at[r] if isinstance(r, str) else block.batch_index[r[1]])
                     for r, n in zip(self.roles(name, len(shape)), shape))


def _block_chunks(a: _inputs.AttentionArgs, large: Dict[str, Any]) -> Tuple[Tuple[Tuple[int, ...], ...], Tuple[int, ...], Tuple[int, ...]]:
    """(batch chunks, query chunks, key chunks) of the blocks: exactly the forward's
    (:func:`attnfast.dask.attention` on the same q, k, v), so dq is chunked like its out."""
    q, k, v = large["q"], large["k"], large["v"]
    kv_heads = a.kv_batch_shape[-1] if a.batch_shape else 1
    batch = _forward._output_batch_chunks(q, k, v, a.batch_shape, kv_heads, a.group)
    queries = tuple(int(c) for c in q.chunks[-2]) if _is_dask(q) else (a.lq,)
    source = k if _is_dask(k) else v if _is_dask(v) else None
    keys = tuple(int(c) for c in source.chunks[-2]) if source is not None else (a.lk,)
    return batch, queries, keys


# --------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------


class _BlockSpec:
    """What one (output block, key chunk) task needs besides its chunks: the call's parameters, its
    diagonal (global offsets shifted by q0 - k0), the global window, its localised kv_lengths and
    its batch block's ALiBi slopes."""

    __slots__ = ("call", "offset", "offsets", "window", "kv_lengths", "alibi_slopes")

    def __init__(self, call: Dict[str, Any], offset: int, offsets: Optional[np.ndarray], window: Tuple[int, int],
                 kv_lengths: Optional[np.ndarray], alibi_slopes: Optional[np.ndarray]) -> None:
        self.call, self.offset, self.offsets, self.window = call, offset, offsets, window
        self.kv_lengths, self.alibi_slopes = kv_lengths, alibi_slopes


def _block_gradients(spec: _BlockSpec, dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                     lse: np.ndarray, mask: Optional[np.ndarray], bias: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    """attnfast's fused backward on one block, with the global out and lse rows of its queries: its
    exact share of every gradient, in the computation dtype (unrounded), by AttentionGrads field."""
    b = _inputs.check_attention_backward(dout, q, k, v, out, lse, mask=mask, bias=bias,
                                         kv_lengths=spec.kv_lengths, alibi_slopes=spec.alibi_slopes, **spec.call)
    a = b.forward
    # The block's own validation aligns the diagonal with its corner and clamps the window to its own
    # Lq + Lk: both replaced by the global call's, seen from the block.
    a.diagonal_offset, a.diagonal_offsets = spec.offset, spec.offsets
    a.window_left, a.window_right = spec.window
    b.grad_dtypes = dict.fromkeys(b.grad_dtypes, a.compute)
    grads = _api.attention_backward_from_args(b)
    return {field: g for field, g in zip(grads._fields, grads) if g is not None}


def _sink_partial(dout: np.ndarray, out: np.ndarray, lse: np.ndarray, sinks: np.ndarray) -> np.ndarray:
    """-sum_i e^(sink - lse_i) dO_i . O_i over one output block's rows, per batch item (computation
    dtype): its share of dsinks, from the global out and lse alone."""
    t = sinks.dtype
    with np.errstate(invalid="ignore", over="ignore"):
        delta = np.einsum("...d,...d->...", dout.astype(t, copy=False), out.astype(t, copy=False))
        p_sink = np.exp(sinks[..., None] - lse.astype(t, copy=False))
        return np.asarray(-np.add.reduce(p_sink * delta, axis=-1))


def _sink_total(parts: List[List[np.ndarray]], slices: List[Tuple[slice, ...]], batch: Tuple[int, ...],
                compute: np.dtype, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """dsinks from the per-block shares ``parts`` (per batch block, the list over query chunks):
    summed over query chunks in a fixed tree, placed per batch item, summed to sinks' shape and
    rounded once."""
    total = np.zeros(batch, compute)
    for row, bsl in zip(parts, slices):
        total[bsl] = _api._pairwise_sum(row)
    return _api._finished(sum_to_shape(total, shape), dtype)


def _add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # inf - inf in a gradient is data (the kernels propagate it as attention_backward does).
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(x + y)


def _rounded(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return _api._finished(np.asarray(x), dtype)


def _zeros(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.zeros(shape, dtype)


def _tree(dsk: Dict[Any, Any], prefix: Tuple[Any, ...], leaves: List[Any]) -> Any:
    """The key of the sum of ``leaves`` (keys, in order) in the fixed balanced tree of
    :func:`attnfast.dask._plan.merge_levels` (the forward's merge order), whatever runs first."""
    for depth, level in enumerate(_plan.merge_levels(len(leaves)) if len(leaves) > 1 else []):
        nodes = []
        for j, node in enumerate(level):
            if len(node) == 1:
                nodes.append(leaves[node[0]])
                continue
            key = prefix + (depth, j)
            dsk[key] = (_add, leaves[node[0]], leaves[node[1]])
            nodes.append(key)
        leaves = nodes
    return leaves[0]


# --------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------


def _as_dask(name: str, x: Any) -> Any:
    """A dask array of ``x`` (a NumPy array becomes one chunk)."""
    import dask.array as da

    if _is_dask(x):
        return x
    x = _inputs._asarray(name, x)
    return da.from_array(x, chunks=tuple(max(n, 1) for n in x.shape) or ())


def _result_array(graph: Any, name: str, chunks: Tuple[Tuple[int, ...], ...], dtype: np.dtype) -> Any:
    import dask.array as da

    return da.Array(graph, name, chunks=chunks, dtype=dtype,
                    meta=np.empty((0,) * len(chunks), dtype))


def _zero_gradients(a: _inputs.AttentionArgs, dtypes: Dict[str, np.dtype]) -> AttentionGrads:
    """The gradients of a call with nothing to compute (no key, no query, no value feature): zeros."""
    import dask.array as da

    shapes = {"q": a.q.shape, "k": a.k.shape, "v": a.v.shape}
    for name in ("bias", *_WEIGHT_FIELDS, "sinks"):
        if getattr(a, name) is not None:
            shapes[name] = getattr(a, name).shape
    return AttentionGrads(**{"d" + n: da.zeros(s, dtype=dtypes[n]) for n, s in shapes.items()})


def attention_backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *, method: str = "scaled_dot",
                       scale: Any = None, mask: Any = None, bias: Any = None, causal: bool = False,
                       causal_align: str = "top_left", window: Any = None, kv_lengths: Any = None, w: Any = None,
                       w_q: Any = None, w_k: Any = None, v_a: Any = None, score_bias: Any = None,
                       softcap: Any = None, alibi_slopes: Any = None, sinks: Any = None,
                       **unexpected: Any) -> AttentionGrads:
    """Compute the gradients of :func:`attnfast.dask.attention` over Dask arrays, block by block.

    Same arguments, semantics and errors as :func:`attnfast.attention_backward`. The call is
    validated once, eagerly; the result is lazy.

    Parameters
    ----------
    dout : dask.array.Array or array_like, batch_shape + (Lq, Dv)
        Gradient of the loss with respect to attention's output; rechunked to the output blocks.
    q : dask.array.Array or array_like, (..., Lq, D)
        The forward's queries. Its chunks along the batch axes (head chunks widened to whole GQA
        groups) and the query axis make the output blocks, as in :func:`attnfast.dask.attention`
        (a NumPy array is one chunk).
    k : dask.array.Array or array_like, (..., Lk, Dk)
        The forward's keys (a storage dtype: an int8 cache has no gradients). Its chunks along Lk are
        the key chunks.
    v : dask.array.Array or array_like, (..., Lk, Dv)
        The forward's values; rechunked to the key chunks.
    out : dask.array.Array or array_like, batch_shape + (Lq, Dv)
        The forward's output, as ``attnfast.dask.attention(..., return_lse=True)`` (or
        :func:`attnfast.attention`) returned it.
    lse : dask.array.Array or array_like, batch_shape + (Lq,)
        The forward's log-sum-exp, unconverted (float32 for 16-bit results).
    method : {"dot", "scaled_dot", "general", "concat", "additive"}
        The forward's score rule.
    scale : float, optional
        The forward's score scale (default as in :func:`attnfast.attention`).
    mask : dask.array.Array or array_like of bool, optional
        The forward's mask, broadcastable to batch_shape + (Lq, Lk); rechunked to the blocks.
    bias : dask.array.Array or array_like, optional
        The forward's additive scores, broadcastable to batch_shape + (Lq, Lk); rechunked to the
        blocks, and ``dbias`` has its shape (summed over its broadcast axes).
    causal : bool
        The forward's causal flag.
    causal_align : {"top_left", "bottom_right"}
        The forward's diagonal alignment.
    window : (int or None, int or None), optional
        The forward's (left, right) window.
    kv_lengths : dask.array.Array or array_like of int, optional
        The forward's visible keys per batch item; computed at once (it decides which blocks exist).
    w, w_q, w_k, v_a, score_bias : array_like, optional
        The forward's method weights (Dask arrays are computed at once: they are small); their
        gradients sum over every block.
    softcap : float, optional
        The forward's score cap.
    alibi_slopes : array_like, optional
        The forward's ALiBi slopes, broadcastable to the batch shape.
    sinks : array_like, optional
        The forward's attention sinks, broadcastable to the batch shape; ``dsinks`` has their shape.
    **unexpected
        Keywords attention_backward does not take: ``block_table``, ``k_scale``, ``v_scale`` (a paged
        or int8 cache has no gradients: ValueError) and the forward-only ``return_lse``,
        ``return_weights``, ``out`` (TypeError), with attention_backward's messages.

    Returns
    -------
    AttentionGrads
        Of Dask arrays: ``dq``, ``dk``, ``dv`` with the shapes and dtypes of q, k, v and chunked like
        them (after the rechunking described below), ``dbias`` like bias, the method weights'
        gradients and ``dsinks`` as one chunk each; None where the call has no such input.

    Raises
    ------
    ValueError, TypeError
        The errors :func:`attnfast.attention_backward` raises for the same call, at once (the whole
        call is validated before the graph is built); ValueError for inputs with unknown chunk sizes.

    See Also
    --------
    attnfast.attention_backward : The same gradients of NumPy arrays, in one call.
    attnfast.dask.attention : The forward whose out and lse this takes.

    Notes
    -----
    Blocks are the forward's: q's batch chunks (head chunks widened to whole GQA groups) times its
    query chunks, against k's key chunks (v, mask and bias rechunked to match, feature axes whole).
    Each (block, key chunk) task runs attnfast's fused backward with the global out and lse rows of
    its queries, which makes its share of every gradient exact; a key chunk that causal, the window
    or kv_lengths hides from the whole block gets no task. The shares are summed in fixed balanced
    trees (dq over key chunks; dk, dv over query chunks and broadcast batch blocks; dbias over the
    blocks reading each of its chunks; the weights over all blocks) and each gradient is rounded once
    into its input's dtype, so the result is the same on every scheduler and, up to the order of
    those sums, attention_backward's.

    Examples
    --------
    A training step's attention on Dask: the forward, then the gradients of ``out.sum()``.

    >>> import numpy as np, dask.array as da
    >>> import attnfast, attnfast.dask as ad
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 64, 16)).astype(np.float32) for _ in range(3))
    >>> qd, kd, vd = (da.from_array(x, chunks=(1, 16, 16)) for x in (q, k, v))
    >>> out, lse = ad.attention(qd, kd, vd, causal=True, return_lse=True)
    >>> grads = ad.attention_backward(da.ones_like(out), qd, kd, vd, out, lse, causal=True)
    >>> grads.dk.chunks
    ((1, 1), (16, 16, 16, 16), (16,))
    >>> o, l = attnfast.attention(q, k, v, causal=True, return_lse=True)
    >>> whole = attnfast.attention_backward(np.ones_like(o), q, k, v, o, l, causal=True)
    >>> bool(np.allclose(grads.dq.compute(), whole.dq, rtol=1e-4, atol=1e-5))
    True
    """
    _inputs.reject_backward_extras(unexpected)
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    large = {"dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": lse, "mask": mask, "bias": bias}
    # Small arguments (per head at most) computed now: kv_lengths decides which blocks exist, the rest
    # go into every task.
    small = {name: _eager(x) for name, x in
             (("w", w), ("w_q", w_q), ("w_k", w_k), ("v_a", v_a), ("score_bias", score_bias),
              ("alibi_slopes", alibi_slopes), ("sinks", sinks))}
    kwargs = {"method": method, "causal": causal, "causal_align": causal_align, "window": window,
              **{name: _eager(x) for name, x in
                 (("scale", scale), ("kv_lengths", kv_lengths), ("softcap", softcap))}}
    for name, x in large.items():
        _forward._check_known_chunks(name, x)
    b = _validate(large, small, kwargs)
    a = b.forward
    if _inputs.nothing_to_compute(a):
        return _zero_gradients(a, b.grad_dtypes)

    batch_chunks, query_chunks, key_chunks = _block_chunks(a, large)
    plan = _plan.plan_blocks(batch_chunks, query_chunks, key_chunks, causal=a.causal,
                             diagonal_offset=a.diagonal_offset, diagonal_offsets=a.diagonal_offsets,
                             window_left=a.window_left, window_right=a.window_right, kv_lengths=a.kv_lengths)
    grid = _Grid(a, plan)
    arrays = {name: _as_dask(name, x) for name, x in large.items() if x is not None}
    arrays = {name: x.rechunk(grid.chunks(name, x.shape)) for name, x in arrays.items()}
    shapes = {name: x.shape for name, x in arrays.items()}

    # Everything but the sinks, as validated (the kernels' dtypes); the diagonal and the window come
    # per block.
    call = {"method": a.method, "scale": a.scale, "causal": a.causal, "softcap": a.softcap, "w": a.w,
            "w_q": a.w_q, "w_k": a.w_k, "v_a": a.v_a, "score_bias": a.score_bias}
    token = tokenize(*(x.name for x in arrays.values()), a.method, a.scale, a.causal, a.softcap,
                     a.diagonal_offset, a.diagonal_offsets, a.window_left, a.window_right, a.kv_lengths,
                     a.alibi_slopes, a.sinks, small)
    names = {"block": "attention_backward-block-" + token, "pick": "attention_backward-pick-" + token,
             "sum": "attention_backward-sum-" + token, "sink": "attention_backward-sinks-" + token}
    dsk: Dict[Any, Any] = {}
    grad_inputs = ("q", "k", "v") + (("bias",) if a.bias is not None else ())
    fields = list(grad_inputs) + [n for n in _WEIGHT_FIELDS if getattr(a, n) is not None]
    shares: Dict[str, Dict[Tuple[int, ...], List[Any]]] = {n: {} for n in grad_inputs}
    weight_shares: Dict[str, List[Any]] = {n: [] for n in fields if n not in shares}
    sink_parts: Dict[Tuple[int, ...], List[Any]] = {}
    sink_slices: Dict[Tuple[int, ...], Tuple[slice, ...]] = {}
    window = (a.window_left, a.window_right)

    def per_item(x: Optional[np.ndarray], block: _plan.OutputBlock) -> Optional[np.ndarray]:
        """A per-item parameter (broadcastable to the batch shape) of one batch block."""
        return None if x is None else np.broadcast_to(x, a.batch_shape)[block.batch_slices]

    def chunk_key(n: str, block: _plan.OutputBlock, ki: int) -> Optional[Tuple[Any, ...]]:
        return None if n not in arrays else (arrays[n].name, *grid.index(n, shapes[n], block, ki))

    for block in plan.blocks:  # batch blocks in C order, then query chunks
        if a.sinks is not None:
            key = (names["sink"], *block.index)
            dsk[key] = (_sink_partial, *(chunk_key(n, block, 0) for n in ("dout", "out", "lse")),
                        per_item(a.sinks, block))
            sink_parts.setdefault(block.batch_index, []).append(key)
            sink_slices[block.batch_index] = block.batch_slices
        for kb in block.keys:  # the visible key chunks, in key order
            spec = _BlockSpec(call, kb.diagonal_offset, kb.diagonal_offsets, window, kb.kv_lengths,
                              per_item(a.alibi_slopes, block))
            key = (names["block"], *block.index, kb.index)
            chunk = {n: chunk_key(n, block, kb.index) for n in _LARGE}
            dsk[key] = (_block_gradients, spec, *(chunk[n] for n in _LARGE))
            for n in fields:
                pick = (names["pick"] + "-" + n, *block.index, kb.index)
                dsk[pick] = (operator.getitem, key, "d" + n)
                if n in weight_shares:
                    weight_shares[n].append(pick)
                else:  # q, k, v, bias: the input chunk the share belongs to
                    source = chunk[n]
                    assert source is not None
                    shares[n].setdefault(source[1:], []).append(pick)

    grads: Dict[str, Any] = {}
    for n in grad_inputs:
        x = arrays[n]
        name = f"attention_backward-d{n}-{token}"
        for index in itertools.product(*(range(len(c)) for c in x.chunks)):
            leaves = shares[n].get(index)
            if leaves:
                dsk[(name, *index)] = (_rounded, _tree(dsk, (names["sum"] + "-" + n, *index), leaves),
                                       b.grad_dtypes[n])
            else:  # no visible block reads this chunk
                dsk[(name, *index)] = (_zeros, tuple(c[i] for c, i in zip(x.chunks, index)), b.grad_dtypes[n])
        grads[n] = (name, x.chunks)
    for n in _WEIGHT_FIELDS:
        if getattr(a, n) is None:
            continue
        shape = getattr(a, n).shape
        name = f"attention_backward-d{n}-{token}"
        leaves = weight_shares.get(n)
        root = (name,) + (0,) * len(shape)
        if leaves:
            dsk[root] = (_rounded, _tree(dsk, (names["sum"] + "-" + n,), leaves), b.grad_dtypes[n])
        else:
            dsk[root] = (_zeros, shape, b.grad_dtypes[n])
        grads[n] = (name, tuple((s,) for s in shape))
    if a.sinks is not None:
        shape = a.sinks.shape
        name = f"attention_backward-dsinks-{token}"
        dsk[(name,) + (0,) * len(shape)] = (_sink_total, list(sink_parts.values()), list(sink_slices.values()),
                                            a.batch_shape, a.compute, shape, b.grad_dtypes["sinks"])
        grads["sinks"] = (name, tuple((s,) for s in shape))

    # One layer per result, named like it (dask finds an array's tasks by its name: an array whose
    # layer is missing cannot be combined with others), over one layer of everything before the roots.
    results: Dict[str, Dict[Any, Any]] = {name: {} for name, _ in grads.values()}
    inner: Dict[Any, Any] = {}
    for key, task in dsk.items():
        (results[key[0]] if key[0] in results else inner)[key] = task
    base = HighLevelGraph.from_collections(names["block"], inner, dependencies=list(arrays.values()))
    graph = HighLevelGraph({**base.layers, **results},
                           {**base.dependencies, **{name: {names["block"]} for name in results}})
    return AttentionGrads(**{"d" + n: _result_array(graph, name, chunks, b.grad_dtypes[n])
                             for n, (name, chunks) in grads.items()})

