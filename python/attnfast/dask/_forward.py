"""attnfast.dask.attention: the fused forward as a Dask graph of block tasks and merge trees.

The graph (one custom HighLevelGraph layer, plus one per result):

* every input is rechunked to the plan: q to the output's batch chunks x its query chunks, k and v
  (and k_scale / v_scale) to the same batch chunks (divided by the GQA group on the head axis) x the
  key chunks, mask and bias to batch x query x key chunks; the feature axes to one chunk;
* per (output block, visible key chunk) a *block task* validates its chunks with
  ``attnfast._inputs.check_attention`` and runs ``attnfast._api.attention_from_args`` with the
  global diagonal shifted into the block, the call's window sides and the localised kv_lengths (see
  ``_plan``), returning a partial (out, lse) in the computation dtype;
* the partials of one output block combine in the fixed balanced tree of ``_plan.merge_levels`` with
  ``attnfast.merge_states``; the root task merges the sinks (one extra state: out 0, lse = sink) and
  rounds once into the result dtype.

Nothing here reads the data of q, k, v, mask or bias before the graph runs; kv_lengths (and the other
per-item or weight arguments, which are small) are made concrete at once, kv_lengths to prune.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from .. import _api, _inputs
from . import _plan

__all__ = ["attention"]

_INT8 = np.dtype(np.int8)
_FLOAT_WIDE = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------
# Block tasks (module-level functions: worker processes unpickle them by name)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockSpec:
    """What a block task needs besides its chunks: the call's static keyword arguments and the
    block's local diagonal, window and kv_lengths."""

    kwargs: dict  # method, scale, method weights, softcap (as the caller gave them, made concrete)
    alibi_slopes: Optional[np.ndarray]
    kv_lengths: Optional[np.ndarray]
    causal: bool
    diagonal_offset: int
    diagonal_offsets: Optional[np.ndarray]
    window_left: int
    window_right: int


def _block_state(q, k, v, mask, bias, k_scale, v_scale, spec: _BlockSpec):
    """The partial (out, lse) of one block of queries against one chunk of keys, in the computation
    dtype (no rounding: the root rounds once)."""
    a = _inputs.check_attention(q, k, v, mask=mask, bias=bias, kv_lengths=spec.kv_lengths, return_lse=True,
                                alibi_slopes=spec.alibi_slopes, k_scale=k_scale, v_scale=v_scale, **spec.kwargs)
    # The block's validation knows only its own Lq and Lk: the diagonal and the window come from the
    # whole call's (check_window clamps a side to the block's Lq + Lk, too short once the diagonal moved).
    a = dataclasses.replace(a, dtype=a.compute, causal=spec.causal, diagonal_offset=spec.diagonal_offset,
                            diagonal_offsets=spec.diagonal_offsets, window_left=spec.window_left,
                            window_right=spec.window_right)
    out, lse = _api.attention_from_args(a)
    return out, lse


def _merge_pair(first, second):
    """Two partial states of the same queries over disjoint keys, merged (in the computation dtype)."""
    return _api.merge_states([first[0], second[0]], [first[1], second[1]])


def _empty_state(shape: Tuple[int, ...], dv: int, compute: np.dtype):
    """The state of queries that see no key: out 0, lse -inf. ``shape``: batch block + (Lq,)."""
    return np.zeros(shape + (dv,), compute), np.full(shape, -np.inf, compute)


def _finish(state, sinks: Optional[np.ndarray], dtype: np.dtype):
    """The root of an output block: merge the sinks (if any) as one more state, then round once."""
    out, lse = state
    if sinks is not None:
        sink_lse = np.broadcast_to(np.asarray(sinks, dtype=lse.dtype)[..., None], lse.shape)
        out, lse = _api.merge_states([out, np.zeros_like(out)], [lse, sink_lse])
    if out.dtype != dtype:
        out = _inputs.round_to(out, dtype)
    return out, lse


# --------------------------------------------------------------------------
# Eager validation
# --------------------------------------------------------------------------


def _stand_in(x, dtype: Optional[np.dtype] = None) -> np.ndarray:
    """A zero-stride array with ``x``'s shape: validation reads shapes and dtypes, never the data, and
    an O(1) stand-in keeps it O(1) for a lazy array of any size."""
    return np.broadcast_to(np.zeros((), x.dtype if dtype is None else dtype), x.shape)


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.kind == "f" and not dtype.isnative else dtype


def _predicted_dtypes(q, k, v) -> Optional[Tuple[np.dtype, np.dtype]]:
    """(result, computation) dtype check_attention will find, or None when the dtypes are invalid (it
    then raises before converting anything)."""
    dq, dk, dv = (_native(np.dtype(x.dtype)) for x in (q, k, v))
    if dq not in _inputs.STORAGE_DTYPES:
        return None
    if dk == _INT8 and dv == _INT8:
        result = np.dtype(np.float32)
    elif dk in _inputs.STORAGE_DTYPES and dv in _inputs.STORAGE_DTYPES:
        result = _inputs.result_dtype(dq, dk, dv)
    else:
        return None
    return result, _inputs.compute_dtype(result)


def _stand_ins(arrays: dict) -> dict:
    """Zero-stride stand-ins for the Dask arrays among q, k, v, mask, bias, k_scale, v_scale, in the
    dtype validation would convert each to (the conversion of a stand-in would allocate its full size);
    NumPy arrays and other values as given."""
    predicted = _predicted_dtypes(*(arrays[n] for n in ("q", "k", "v")))
    given = {}
    for name, x in arrays.items():
        if not isinstance(x, da.Array):
            given[name] = x
            continue
        dtype = _native(np.dtype(x.dtype))
        if predicted is not None:
            result, compute = predicted
            if name in ("q", "k", "v") and dtype in _FLOAT_WIDE:
                dtype = result
            elif name == "bias" and (dtype.kind in "iuf" or dtype == _inputs._BFLOAT16):
                dtype = compute
        given[name] = _stand_in(x, dtype)
    return given


def _concrete(x: Any) -> Any:
    """A small argument (kv_lengths, slopes, sinks, weights, scale) given as a Dask array, computed."""
    return np.asarray(x.compute()) if isinstance(x, da.Array) else x


def _check_known_chunks(name: str, x: Any) -> None:
    if isinstance(x, da.Array) and any(math.isnan(c) for axis in x.chunks for c in axis):
        raise ValueError(
            f"{name} has unknown chunk sizes (NaN in {name}.chunks), e.g. after boolean indexing; the graph "
            f"needs them to plan its blocks. Call {name}.compute_chunk_sizes() first."
        )


# --------------------------------------------------------------------------
# Chunk layout
# --------------------------------------------------------------------------


def _output_batch_chunks(q, k, v, batch, kv_heads: int, group: int):
    """The output's chunks along each batch axis: q's where q spans the axis, else k's (v's), else one
    chunk; on the head axis of grouped-query attention, widened to whole groups and, when only the kv
    heads are chunked, multiplied back by the group."""
    nb = len(batch)
    chunks = []
    for ax, n in enumerate(batch):
        choice = None
        for x in (q, k, v):
            if not isinstance(x, da.Array):
                continue
            lead = x.ndim - 2
            ia = ax - (nb - lead)
            if ia >= 0 and x.shape[ia] == n and n != 1:
                choice = x.chunks[ia]
                break
            if ia >= 0 and x is not q and ax == nb - 1 and group > 1 and kv_heads > 1 and x.shape[ia] == kv_heads:
                choice = tuple(c * group for c in x.chunks[ia])
                break
        choice = (n,) if choice is None else tuple(int(c) for c in choice)
        if ax == nb - 1 and group > 1 and kv_heads > 1:
            choice = _plan.widen_to_groups(choice, group)
        chunks.append(choice)
    return tuple(chunks)


def _lead_chunks(shape_lead, out_chunks, kv_side: bool, group: int, kv_heads: int, nb: int):
    """Target chunks of an input's own batch axes (aligned right): size-1 axes one chunk, the kv head
    axis the output's head chunks divided by the group, the others the output's."""
    chunks = []
    for ia, n in enumerate(shape_lead):
        ax = ia + nb - len(shape_lead)
        if n == 1:
            chunks.append((1,))
        elif kv_side and ax == nb - 1 and group > 1 and kv_heads > 1:
            chunks.append(tuple(c // group for c in out_chunks[ax]))
        else:
            chunks.append(out_chunks[ax])
    return chunks


def _lead_index(shape_lead, batch_index, nb: int):
    """An input's chunk index along its own batch axes for the output batch block ``batch_index``."""
    return tuple(0 if n == 1 else batch_index[ia + nb - len(shape_lead)] for ia, n in enumerate(shape_lead))


def _laid_out(x, chunks):
    """``x`` as a Dask array of exactly ``chunks`` (a NumPy array is sliced into them)."""
    chunks = tuple(tuple(int(c) for c in axis) for axis in chunks)
    if isinstance(x, da.Array):
        return x.rechunk(chunks)
    return da.from_array(np.asarray(x), chunks=chunks)


def _per_item_block(x: Optional[np.ndarray], nb: int, slices) -> Optional[np.ndarray]:
    """A per-item array (alibi slopes, sinks) cut to one batch block, broadcast axes kept."""
    if x is None:
        return None
    x = np.asarray(x)
    x = x.reshape((1,) * (nb - x.ndim) + x.shape)
    return np.ascontiguousarray(x[tuple(slice(None) if n == 1 else s for n, s in zip(x.shape, slices))])


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def attention(q, k, v, *, method="scaled_dot", scale=None, mask=None, bias=None, causal=False,
              causal_align="top_left", window=None, kv_lengths=None, return_lse=False,
              return_weights=False, out=None, w=None, w_q=None, w_k=None, v_a=None, score_bias=None,
              softcap=None, alibi_slopes=None, sinks=None, block_table=None, k_scale=None, v_scale=None):
    """Fused attention over Dask arrays: :func:`attnfast.attention`, chunk by chunk, as a lazy graph.

    Same keyword arguments and semantics as :func:`attnfast.attention`; the result is a Dask array
    whose chunks are computed by attnfast's kernels on any Dask scheduler.

    Parameters
    ----------
    q : dask.array.Array or array_like, (..., Lq, D)
        Queries, float64, float32, float16 or ml_dtypes.bfloat16. Its chunks along the batch axes and
        the query axis Lq become the output's (a NumPy array is one chunk).
    k : dask.array.Array or array_like, (..., Lk, Dk)
        Keys, a storage dtype, or int8 with ``k_scale``. Its chunks along Lk are the key chunks.
    v : dask.array.Array or array_like, (..., Lk, Dv)
        Values, like k; rechunked to k's key chunks.
    method : {"dot", "scaled_dot", "general", "concat", "additive"}
        The score rule, as in :func:`attnfast.attention`.
    scale : float, optional
        Multiplies every score; default 1/sqrt(D) for scaled_dot, else 1.
    mask : dask.array.Array or array_like of bool, optional
        Broadcastable to batch_shape + (Lq, Lk), True = attend; rechunked to the blocks.
    bias : dask.array.Array or array_like, optional
        Real, broadcastable to batch_shape + (Lq, Lk), added to the scores; rechunked to the blocks.
    causal : bool
        Key j visible to query i only when j <= i + offset.
    causal_align : {"top_left", "bottom_right"}
        offset 0, or Lk - Lq (with kv_lengths: each item's kv_lengths - Lq).
    window : (int or None, int or None), optional
        (left, right): keys with diag_i - left <= j <= diag_i + right.
    kv_lengths : dask.array.Array or array_like of int, optional
        Visible keys per batch item, broadcastable to the batch shape; computed at once (it decides
        which blocks exist).
    return_lse : bool
        Also return the log-sum-exp of each query's scores.
    return_weights : bool
        Must be False: the weights are an Lq x Lk matrix (a ValueError says what to do instead).
    out : None
        Must be None: the result is lazy (a ValueError says how to store it).
    w, w_q, w_k, v_a, score_bias : array_like, optional
        The method's weights, as in :func:`attnfast.attention` (small: made concrete at once).
    softcap : float, optional
        Scores become softcap * tanh(s / softcap).
    alibi_slopes : array_like, optional
        Broadcastable to the batch shape (..., Hq): s <- s - slope * |diag_i - j|.
    sinks : array_like, optional
        Broadcastable to the batch shape (..., Hq): one extra logit per row with no value; merged as
        one extra state (out 0, lse = sink) at each output block's root.
    block_table : None
        Must be None: a paged cache is not a Dask layout (a ValueError says what to pass).
    k_scale, v_scale : dask.array.Array or array_like of float32, optional
        The per-row scales of an int8 k and v, broadcastable to k.shape[:-1] / v.shape[:-1].

    Returns
    -------
    out : dask.array.Array, batch_shape + (Lq, Dv)
        In the result dtype (the promotion of q, k, v; float32 for an int8 cache); chunks: the batch
        chunks (head chunks widened to whole GQA groups), q's query chunks, one Dv chunk.
    lse : dask.array.Array, batch_shape + (Lq,)
        Only with ``return_lse=True``; float32 for 16-bit results, else the result dtype.

    Raises
    ------
    ValueError, TypeError
        The errors :func:`attnfast.attention` raises for the same call, at once (the whole call is
        validated before the graph is built); ValueError for ``out=``, ``return_weights=True`` and
        ``block_table``, and for inputs with unknown chunk sizes.

    Notes
    -----
    Each (output block, key chunk) pair whose keys causal, the window or kv_lengths leave visible to
    some query of the block is one task, which holds one chunk of each input and returns a partial
    (out, lse) in the computation dtype (float32, or float64 for float64 inputs). The partials of an
    output block combine in a fixed balanced binary tree of :func:`attnfast.merge_states` in key order,
    so the result is the same on every scheduler, bit for bit; it differs from
    :func:`attnfast.attention`'s by the rounding of those merges (a few ulps of the computation dtype),
    and is rounded once into the result dtype at the root. No task holds an Lq x Lk matrix larger than
    one query chunk x one key chunk, nor more than one key chunk of K and V.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> import attnfast, attnfast.dask as ad
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 256, 32), dtype=np.float32) for _ in range(3))
    >>> dq, dk, dv = (da.from_array(x, chunks=(1, 4, 64, 32)) for x in (q, k, v))
    >>> out = ad.attention(dq, dk, dv, causal=True)
    >>> out.chunks[2]
    (64, 64, 64, 64)
    >>> result = out.compute(scheduler="threads")
    >>> bool(np.allclose(result, attnfast.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6))
    True
    """
    if out is not None:
        raise ValueError(
            "out= is not available on Dask: the result is a lazy dask array, computed chunk by chunk by "
            "the scheduler. Drop out= and store the result yourself, e.g. da.store(result, target) or "
            "target[...] = result.compute()."
        )
    if return_weights is True or (isinstance(return_weights, np.bool_) and bool(return_weights)):
        raise ValueError(
            "return_weights=True is not available on Dask: the weights are the batch x Lq x Lk matrix the "
            "chunked graph exists to avoid. Compute them on a slice with attnfast.attention(q_slice, k, v, "
            "return_weights=True), or use attnfast.scores and attnfast.softmax on dask blocks."
        )
    if block_table is not None:
        raise ValueError(
            "block_table is not available on Dask: a paged cache is a serving layout for one process. "
            "Pass the dense k and v (k[block_table].transpose(0, 2, 1, 3, 4).reshape(B, Hk, -1, D)) as dask "
            "arrays chunked along Lk."
        )
    arrays = {"q": q, "k": k, "v": v, "mask": mask, "bias": bias, "k_scale": k_scale, "v_scale": v_scale}
    for name, x in arrays.items():
        _check_known_chunks(name, x)
    # Small arguments: concrete now (kv_lengths decides which blocks exist; the rest go into every task).
    small = {name: _concrete(x) for name, x in dict(
        scale=scale, kv_lengths=kv_lengths, w=w, w_q=w_q, w_k=w_k, v_a=v_a, score_bias=score_bias,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks).items()}
    given = _stand_ins(arrays)
    a = _inputs.check_attention(
        given["q"], given["k"], given["v"], method=method, mask=given["mask"], bias=given["bias"], causal=causal,
        causal_align=causal_align, window=window, return_lse=return_lse, return_weights=return_weights,
        k_scale=given["k_scale"], v_scale=given["v_scale"], **small)
    # Every array input as a Dask array; NumPy ones (and lists) as validated shapes say.
    lazy = {name: (x if isinstance(x, da.Array) else (None if x is None else np.asarray(x)))
            for name, x in arrays.items()}
    return _build(a, lazy, small, method)


def _build(a: _inputs.AttentionArgs, x: dict, small: dict, method: str):
    """The graph of a validated call (``a`` from stand-ins; ``x`` the inputs, Dask or NumPy)."""
    batch = a.batch_shape
    nb = len(batch)
    kv_heads = a.kv_batch_shape[-1] if nb else 1
    q, k, v = x["q"], x["k"], x["v"]
    # Chunking of the output and the key axis.
    out_batch = _output_batch_chunks(q, k, v, batch, kv_heads, a.group)
    query_chunks = tuple(int(c) for c in q.chunks[-2]) if isinstance(q, da.Array) else (a.lq,)
    key_source = k if isinstance(k, da.Array) else v if isinstance(v, da.Array) else None
    key_chunks = tuple(int(c) for c in key_source.chunks[-2]) if key_source is not None else (a.lk,)

    plan = _plan.plan_blocks(out_batch, query_chunks, key_chunks, causal=a.causal,
                             diagonal_offset=a.diagonal_offset, diagonal_offsets=a.diagonal_offsets,
                             window_left=a.window_left, window_right=a.window_right, kv_lengths=a.kv_lengths)

    # Inputs laid out on the plan's chunks.
    laid = {}
    lead_shapes = {}
    for name in ("q", "k", "v"):
        arr = x[name]
        own = tuple(arr.shape[:-2])
        kv_side = name != "q"
        axis = query_chunks if name == "q" else key_chunks
        chunks = _lead_chunks(own, out_batch, kv_side, a.group, kv_heads, nb) + [axis, (arr.shape[-1],)]
        laid[name], lead_shapes[name] = _laid_out(arr, chunks), own
    for name in ("mask", "bias"):
        arr = x[name]
        if arr is None:
            continue
        tail = arr.shape[-2:] if arr.ndim >= 2 else (1,) * (2 - arr.ndim) + tuple(arr.shape)
        own = tuple(arr.shape[:-2]) if arr.ndim > 2 else ()
        chunks = _lead_chunks(own, out_batch, False, a.group, kv_heads, nb)
        if arr.ndim >= 2:
            chunks.append((1,) if tail[0] == 1 else query_chunks)
        if arr.ndim >= 1:
            chunks.append((1,) if tail[-1] == 1 else key_chunks)
        laid[name], lead_shapes[name] = _laid_out(arr, chunks), own
    for name in ("k_scale", "v_scale"):
        arr = x[name]
        if arr is None:
            continue
        own = tuple(arr.shape[:-1]) if arr.ndim > 1 else ()
        chunks = _lead_chunks(own, out_batch, True, a.group, kv_heads, nb)
        if arr.ndim >= 1:
            chunks.append((1,) if arr.shape[-1] == 1 else key_chunks)
        laid[name], lead_shapes[name] = _laid_out(arr, chunks), own

    # Each input's chunk index: its batch axes' (cached per batch block), then per trailing axis the
    # query chunk ("q"), the key chunk ("k") or 0 (a broadcast or a feature axis).
    tails = {}
    for name, arr in laid.items():
        n_tail = arr.ndim - len(lead_shapes[name])
        if name == "q":
            tails[name] = ("q", 0)
        elif name in ("k", "v"):
            tails[name] = ("k", 0)
        else:  # mask, bias: (Lq, Lk) or (Lk,); the scales: (Lk,)
            axes = ("q", "k")[2 - n_tail:] if name in ("mask", "bias") else ("k",)[1 - n_tail:]
            tails[name] = tuple(0 if size == 1 else axis for axis, size in zip(axes, arr.shape[arr.ndim - n_tail:]))
    prefixes = {}

    def chunk_key(name, batch_index, qi, ki):
        """The key of input ``name``'s chunk for an output batch block, query and key chunk."""
        tail = tails.get(name)
        if tail is None:
            return None
        prefix = prefixes.get((name, batch_index))
        if prefix is None:
            prefix = prefixes[name, batch_index] = (laid[name].name,) + _lead_index(lead_shapes[name], batch_index, nb)
        return prefix + tuple(qi if t == "q" else ki if t == "k" else 0 for t in tail)

    token = tokenize(*(laid.get(n) for n in ("q", "k", "v", "mask", "bias", "k_scale", "v_scale")),
                     {n: small[n] for n in small}, method, a.causal, a.diagonal_offset, a.diagonal_offsets,
                     a.window_left, a.window_right, a.dtype)
    block_name, merge_name, root_name = (f"attnfast-{s}-{token}" for s in ("block", "merge", "state"))
    out_name, lse_name = f"attnfast-attention-{token}", f"attnfast-attention-lse-{token}"
    kwargs = {name: small[name] for name in ("scale", "w", "w_q", "w_k", "v_a", "score_bias", "softcap")}
    kwargs["method"] = method
    dsk, out_dsk, lse_dsk = {}, {}, {}
    for block in plan.blocks:
        index = block.index
        leaves = []
        for kb in block.keys:
            spec = _BlockSpec(kwargs=kwargs,
                              alibi_slopes=_per_item_block(small["alibi_slopes"], nb, block.batch_slices),
                              kv_lengths=kb.kv_lengths, causal=a.causal, diagonal_offset=kb.diagonal_offset,
                              diagonal_offsets=kb.diagonal_offsets, window_left=a.window_left,
                              window_right=a.window_right)
            key = (block_name,) + index + (kb.index,)
            dsk[key] = (_block_state,) + tuple(
                chunk_key(n, block.batch_index, block.query_index, kb.index)
                for n in ("q", "k", "v", "mask", "bias", "k_scale", "v_scale")) + (spec,)
            leaves.append(key)
        if not leaves:
            shape = tuple(s.stop - s.start for s in block.batch_slices) + (block.q1 - block.q0,)
            key = (merge_name,) + index + ("empty",)
            dsk[key] = (_empty_state, shape, a.dv, a.compute)
            leaves = [key]
        for level_number, level in enumerate(_plan.merge_levels(len(leaves)) if len(leaves) > 1 else []):
            nodes = []
            for node_number, node in enumerate(level):
                if len(node) == 1:
                    nodes.append(leaves[node[0]])
                    continue
                key = (merge_name,) + index + (level_number, node_number)
                dsk[key] = (_merge_pair, leaves[node[0]], leaves[node[1]])
                nodes.append(key)
            leaves = nodes
        root = (root_name,) + index
        dsk[root] = (_finish, leaves[0], _per_item_block(a.sinks, nb, block.batch_slices), a.dtype)
        out_dsk[(out_name,) + index + (0,)] = (operator.getitem, root, 0)
        lse_dsk[(lse_name,) + index] = (operator.getitem, root, 1)

    # One layer of block, merge and root tasks; out and lse each a layer of its own (named as the
    # array, as Dask's optimisations expect) that picks its half of the roots.
    partials = HighLevelGraph.from_collections(f"attnfast-partials-{token}", dsk, dependencies=list(laid.values()))

    def array_of(name, layer, chunks, dtype):
        layers, deps = dict(partials.layers), dict(partials.dependencies)
        layers[name], deps[name] = MaterializedLayer(layer), {f"attnfast-partials-{token}"}
        return da.Array(HighLevelGraph(layers, deps), name, chunks=chunks, dtype=dtype,
                        meta=np.empty((0,) * len(chunks), dtype))

    result = array_of(out_name, out_dsk, out_batch + (query_chunks, (a.dv,)), a.dtype)
    if not a.return_lse:
        return result
    return result, array_of(lse_name, lse_dsk, out_batch + (query_chunks,), _inputs.lse_dtype(a.dtype))
