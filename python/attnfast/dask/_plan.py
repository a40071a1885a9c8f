"""Block planning for attention over chunked arrays: which (query chunk, key chunk) blocks to compute.

Pure Python + NumPy (no Dask import): both the Dask forward (``_forward.py``) and the Dask backward
(``_backward.py``) build their graphs from the same :class:`Plan`, so they agree on which blocks exist,
on each block's local diagonal and kv_lengths, and on the order partial results are combined in.

Coordinates. The call's output has batch shape ``batch_shape`` (the broadcast of q's and k/v's batch
axes, GQA applied on the head axis), ``Lq`` queries and ``Lk`` keys. The caller chooses chunk sizes
along every batch axis (``batch_chunks``), the query axis (``query_chunks``) and the key axis
(``key_chunks``), in Dask's format (a tuple of sizes per axis). A *batch block* is one chunk along
every batch axis; an *output block* is a batch block x one query chunk.

Visibility (as :class:`attnfast._inputs.AttentionArgs` defines it): key j is visible to query i of
batch item b when

* ``j < kv_lengths[b]`` (when kv_lengths is given), and, with ``diag = i + offset_b``,
* ``j <= diag`` (causal), ``j >= diag - window_left`` (window_left >= 0), ``j <= diag + window_right``
  (window_right >= 0),

where ``offset_b`` is the call's ``diagonal_offset`` or, when given, ``diagonal_offsets[b]`` (causal
bottom_right with kv_lengths aligns each item to its own length). A key chunk is *visible* to an output
block when at least one key of the chunk is visible to at least one query of the block for at least one
batch item; only visible blocks get a task. A mask or a bias hides keys too, but by their values, which
the planner does not read: such blocks are computed (and their rows give lse = -inf).

Local coordinates. A block of queries [q0, q1) and keys [k0, k1) sees the global diagonal when the
kernel is given ``offset + q0 - k0`` as its offset (query i' = i - q0, key j' = j - k0) and
``clip(kv_lengths - k0, 0, k1 - k0)`` as its kv_lengths; :class:`KeyBlock` holds both. The window sides
stay the call's global ones (validated once for the whole call).

Combining order. :func:`merge_levels` gives the fixed balanced binary tree in which the partial states
of one output block (in key-chunk order) are merged, so that the result does not depend on the
scheduler; the backward uses the same tree for its sums over blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Chunks", "KeyBlock", "OutputBlock", "Plan", "plan_blocks", "boundaries", "widen_to_groups",
           "merge_levels", "visible_items"]

Chunks = Tuple[int, ...]


def boundaries(chunks: Sequence[int]) -> List[Tuple[int, int]]:
    """The global range of each chunk of an axis.

    Parameters
    ----------
    chunks : sequence of int
        The axis's chunk sizes (Dask's format), e.g. (4, 4, 2).

    Returns
    -------
    list of (int, int)
        (start, stop) of each chunk, in order.

    Examples
    --------
    >>> boundaries((4, 4, 2))
    [(0, 4), (4, 8), (8, 10)]
    """
    edges = np.concatenate([[0], np.cumsum(np.asarray(chunks, dtype=np.int64))]).astype(int).tolist()
    return list(zip(edges[:-1], edges[1:]))


def widen_to_groups(chunks: Sequence[int], group: int) -> Chunks:
    """Chunk sizes of a query-head axis with every boundary moved up to a multiple of ``group``.

    With grouped-query attention query head h reads kv head h // group; a chunk of whole groups reads
    a contiguous range of kv heads, chunked as the result divided by ``group``.

    Parameters
    ----------
    chunks : sequence of int
        The query-head axis's chunk sizes.
    group : int
        Query heads per kv head (1: no change).

    Returns
    -------
    tuple of int
        The widened chunk sizes; a chunk swallowed by the move disappears.

    Examples
    --------
    >>> widen_to_groups((3, 5), 2)
    (4, 4)
    """
    if group <= 1:
        return tuple(int(c) for c in chunks)
    total = int(sum(chunks))
    edges = sorted({min(total, -(-stop // group) * group) for _, stop in boundaries(chunks)} | {0})
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]) if b > a)


def merge_levels(n: int) -> List[List[Tuple[int, ...]]]:
    """The fixed balanced binary tree that combines ``n`` ordered parts.

    Parameters
    ----------
    n : int
        The number of parts (e.g. the visible key chunks of an output block, in key order).

    Returns
    -------
    list of list of tuple of int
        One list per level; level 0 combines the parts, level l > 0 the nodes of level l - 1. Each
        entry is a tuple of one or two indices into the previous level: (2m, 2m + 1) pairs neighbours,
        and an odd last node passes up alone as (2m,). The last level has a single entry (the root);
        ``n == 1`` gives ``[[(0,)]]`` and ``n == 0`` gives ``[]``. The shape depends on ``n`` only.

    Raises
    ------
    ValueError
        When n < 0.

    Examples
    --------
    >>> merge_levels(3)
    [[(0, 1), (2,)], [(0, 1)]]
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if n == 0:
        return []
    if n == 1:
        return [[(0,)]]
    levels = []
    while n > 1:
        level = [tuple(range(i, min(i + 2, n))) for i in range(0, n, 2)]
        levels.append(level)
        n = len(level)
    return levels


def visible_items(q0: int, q1: int, k0: int, k1: int, *, causal: bool, offsets: np.ndarray,
                  window_left: int, window_right: int, kv_lengths: Optional[np.ndarray]) -> np.ndarray:
    """Per batch item, whether any key of [k0, k1) is visible to any query of [q0, q1).

    Parameters
    ----------
    q0, q1, k0, k1 : int or array_like of int
        The global query range [q0, q1) and key range [k0, k1); arrays broadcast with the items'
        (the planner asks for every pair of chunks at once).
    causal : bool
        Whether key j must satisfy j <= i + offset.
    offsets : array_like of int
        Each item's diagonal offset (any shape; a scalar for the call's single offset).
    window_left, window_right : int
        The window sides, -1 for unbounded.
    kv_lengths : array_like of int or None
        Each item's number of keys, broadcastable with ``offsets``.

    Returns
    -------
    ndarray of bool
        Of the broadcast shape of all the arguments.

    Notes
    -----
    Exact, in O(1) per item: for query i the visible keys of the chunk are
    ``A(i) = max(k0, i + off - left) <= j <= B(i) = min(k1 - 1, n - 1, i + off [causal], i + off + right)``.
    B is concave and A convex in i (a min and a max of lines of slope 0 or 1), so B - A is concave and
    its maximum over the integers of [q0, q1) lies at an end of the range or at one of the breakpoints
    of A and B, all integers: the chunk is visible iff B - A >= 0 at one of those candidates.
    """
    q0, q1, k0, k1 = (np.asarray(x, dtype=np.int64) for x in (q0, q1, k0, k1))
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = k1 if kv_lengths is None else np.asarray(kv_lengths, dtype=np.int64)
    lower_shift = offsets - window_left if window_left >= 0 else None
    upper_shifts = []
    if causal:
        upper_shifts.append(offsets)
    if window_right >= 0:
        upper_shifts.append(offsets + window_right)
    upper_shift = np.minimum.reduce(upper_shifts) if upper_shifts else None
    cap = np.minimum(k1 - 1, lengths - 1)  # the upper bound that does not move with i
    last = q1 - 1
    # Candidate query rows: the ends and the breakpoints (where a line meets a constant bound).
    candidates = [q0, last]
    if lower_shift is not None:
        candidates.append(k0 - lower_shift)
    if upper_shift is not None:
        candidates.append(cap - upper_shift)
    best = None
    for c in candidates:
        i = np.minimum(np.maximum(c, q0), last)
        a = k0 if lower_shift is None else np.maximum(k0, i + lower_shift)
        b = cap if upper_shift is None else np.minimum(cap, i + upper_shift)
        room = b - a
        best = room if best is None else np.maximum(best, room)
    shape = np.broadcast_shapes(q0.shape, q1.shape, k0.shape, k1.shape, offsets.shape, np.shape(lengths))
    return np.broadcast_to((best >= 0) & (q1 > q0) & (k1 > k0), shape)


@dataclass(frozen=True)
class KeyBlock:
    """One visible key chunk of an output block: what its block task needs.

    Attributes
    ----------
    index : int
        The key chunk's index (into ``Plan.key_bounds``).
    k0, k1 : int
        Its global key range [k0, k1).
    diagonal_offset : int
        The local diagonal offset ``offset + q0 - k0`` (the call's single offset).
    diagonal_offsets : ndarray of int64 or None
        With per-item offsets: each item's local offset, shape = the batch block's shape (batch axes of
        size 1 in the call stay 1). None otherwise.
    kv_lengths : ndarray of int64 or None
        With kv_lengths: ``clip(kv_lengths - k0, 0, k1 - k0)`` over the batch block (same shape rule).
    """

    index: int
    k0: int
    k1: int
    diagonal_offset: int
    diagonal_offsets: Optional[np.ndarray]
    kv_lengths: Optional[np.ndarray]


@dataclass(frozen=True)
class OutputBlock:
    """One output block (a batch block x a query chunk) and the key chunks visible to it.

    Attributes
    ----------
    batch_index : tuple of int
        The chunk index along each batch axis.
    batch_slices : tuple of slice
        The global ranges of those chunks, one slice per batch axis.
    query_index : int
        The query chunk's index; ``q0, q1`` its global range.
    keys : tuple of KeyBlock
        The visible key chunks in increasing key order; empty when every key is hidden from every
        query of the block (its result is then out 0, lse -inf, or the sink's lse).
    """

    batch_index: Tuple[int, ...]
    batch_slices: Tuple[slice, ...]
    query_index: int
    q0: int
    q1: int
    keys: Tuple[KeyBlock, ...]

    @property
    def index(self) -> Tuple[int, ...]:
        """The block's chunk index in the output: batch_index + (query_index,)."""
        return self.batch_index + (self.query_index,)


@dataclass(frozen=True)
class Plan:
    """The blocks of one attention call over chunked arrays (see :func:`plan_blocks`).

    Attributes
    ----------
    batch_chunks, query_chunks, key_chunks
        The chunking the plan was made for (Dask's format).
    batch_bounds : list (per batch axis) of list of (start, stop)
    query_bounds, key_bounds : list of (start, stop)
    blocks : list of OutputBlock
        Every output block, batch blocks in C order, then query chunks.
    """

    batch_chunks: Tuple[Chunks, ...]
    query_chunks: Chunks
    key_chunks: Chunks
    batch_bounds: List[List[Tuple[int, int]]]
    query_bounds: List[Tuple[int, int]]
    key_bounds: List[Tuple[int, int]]
    blocks: List[OutputBlock]

    @property
    def num_block_tasks(self) -> int:
        """The number of (output block, visible key chunk) pairs: the block tasks a graph has."""
        return sum(len(b.keys) for b in self.blocks)

    def by_key_chunk(self) -> Dict[Tuple[Tuple[int, ...], int], List[Tuple[OutputBlock, KeyBlock]]]:
        """For the backward's dK/dV sums: (batch_index, key chunk index) -> the (output block, key
        block) pairs that read that key chunk, in increasing query-chunk order."""
        table: Dict[Tuple[Tuple[int, ...], int], List[Tuple[OutputBlock, KeyBlock]]] = {}
        for block in self.blocks:
            for kb in block.keys:
                table.setdefault((block.batch_index, kb.index), []).append((block, kb))
        return table


def _as_batch(x: Optional[np.ndarray], ndim: int) -> Optional[np.ndarray]:
    """A per-item array (broadcastable to the batch shape) with exactly ``ndim`` axes (left-padded)."""
    if x is None:
        return None
    x = np.asarray(x, dtype=np.int64)
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _read_only(x: np.ndarray) -> np.ndarray:
    """``x`` made read-only: a plan's arrays are shared between its blocks."""
    x.setflags(write=False)
    return x


def _block_of(x: Optional[np.ndarray], slices: Tuple[slice, ...]) -> Optional[np.ndarray]:
    """The batch block ``slices`` of a per-item array, axes of size 1 (broadcast) kept whole."""
    if x is None:
        return None
    return x[tuple(slice(None) if n == 1 else s for n, s in zip(x.shape, slices))]


def plan_blocks(batch_chunks: Sequence[Sequence[int]], query_chunks: Sequence[int], key_chunks: Sequence[int], *,
                causal: bool = False, diagonal_offset: int = 0, diagonal_offsets: Optional[np.ndarray] = None,
                window_left: int = -1, window_right: int = -1,
                kv_lengths: Optional[np.ndarray] = None) -> Plan:
    """Plan the blocks of an attention call over chunked arrays.

    Parameters
    ----------
    batch_chunks : sequence (one per batch axis) of sequences of int
        Chunk sizes along each batch axis of the output (Dask's ``chunks`` format); ``()`` for no batch.
    query_chunks, key_chunks : sequence of int
        Chunk sizes along the query axis (summing to Lq) and the key axis (summing to Lk).
    causal : bool
        Key j is visible to query i only when j <= i + offset.
    diagonal_offset : int
        The call's diagonal offset (0 for top_left, Lk - Lq for bottom_right), as validated by
        ``attnfast._inputs.check_attention``.
    diagonal_offsets : array_like of int, optional
        Per-item offsets broadcastable to the batch shape, replacing ``diagonal_offset`` (causal
        bottom_right with kv_lengths: kv_lengths - Lq).
    window_left, window_right : int
        The validated window sides; -1 for an unbounded side.
    kv_lengths : array_like of int, optional
        Visible keys per batch item, broadcastable to the batch shape, each in [0, Lk].

    Returns
    -------
    Plan
        Its ``blocks`` list every output block with its visible key chunks, each carrying its local
        diagonal offset(s) and localised kv_lengths (see :class:`KeyBlock`).

    Raises
    ------
    ValueError
        When a chunk size is negative.

    Examples
    --------
    Four queries and four keys in chunks of two, causal: the upper-right block is pruned.

    >>> plan = plan_blocks([], (2, 2), (2, 2), causal=True)
    >>> [(b.query_index, [kb.index for kb in b.keys]) for b in plan.blocks]
    [(0, [0]), (1, [0, 1])]
    >>> plan.blocks[1].keys[0].diagonal_offset  # query chunk 1 against key chunk 0: 0 + 2 - 0
    2
    """
    batch_chunks = tuple(tuple(int(c) for c in axis) for axis in batch_chunks)
    query_chunks = tuple(int(c) for c in query_chunks)
    key_chunks = tuple(int(c) for c in key_chunks)
    for name, sizes in [("query_chunks", query_chunks), ("key_chunks", key_chunks)] + \
            [(f"batch_chunks[{i}]", c) for i, c in enumerate(batch_chunks)]:
        if any(c < 0 for c in sizes):
            raise ValueError(f"{name} must hold chunk sizes >= 0; got {sizes}")
    nb = len(batch_chunks)
    batch_bounds = [boundaries(c) for c in batch_chunks]
    query_bounds, key_bounds = boundaries(query_chunks), boundaries(key_chunks)
    offsets = _as_batch(diagonal_offsets, nb)
    lengths = _as_batch(kv_lengths, nb)
    uses_diagonal = causal or window_left >= 0 or window_right >= 0
    # Every (query chunk, key chunk) pair at once: axes (query chunk, key chunk) + the batch block's.
    qb = np.array(query_bounds, dtype=np.int64).reshape(-1, 1, 2)
    kb = np.array(key_bounds, dtype=np.int64).reshape(1, -1, 2)

    def seen_pairs(item_offsets, item_lengths):
        """(query chunks, key chunks) bool: some key of the pair visible to some query, some item."""
        if not (uses_diagonal or item_lengths is not None):
            return np.broadcast_to((qb[..., 1] > qb[..., 0]) & (kb[..., 1] > kb[..., 0]), (len(qb), kb.shape[1]))
        pad = (1,) * nb
        with_items = lambda x: x.reshape(x.shape + pad)  # noqa: E731
        vis = visible_items(
            with_items(qb[..., 0]), with_items(qb[..., 1]), with_items(kb[..., 0]), with_items(kb[..., 1]),
            causal=causal, offsets=np.int64(diagonal_offset) if item_offsets is None else item_offsets,
            window_left=window_left if uses_diagonal else -1, window_right=window_right if uses_diagonal else -1,
            kv_lengths=item_lengths)
        return vis.reshape(vis.shape[:2] + (-1,)).any(axis=-1)

    shared = seen_pairs(None, None) if offsets is None and lengths is None else None
    blocks = []
    for batch_index in product(*(range(len(b)) for b in batch_bounds)):
        slices = tuple(slice(*batch_bounds[ax][i]) for ax, i in enumerate(batch_index))
        item_offsets = _block_of(offsets, slices)
        item_lengths = _block_of(lengths, slices)
        seen = shared if shared is not None else seen_pairs(item_offsets, item_lengths)
        local_lengths = {}  # per key chunk, shared by the query chunks (read-only)
        for qi, (q0, q1) in enumerate(query_bounds):
            keys = []
            for ki in np.flatnonzero(seen[qi]).tolist():
                k0, k1 = key_bounds[ki]
                if item_lengths is not None and ki not in local_lengths:
                    local_lengths[ki] = _read_only(np.clip(item_lengths - k0, 0, k1 - k0))
                keys.append(KeyBlock(
                    index=ki, k0=k0, k1=k1,
                    diagonal_offset=int(diagonal_offset) + q0 - k0,
                    diagonal_offsets=None if item_offsets is None else _read_only(item_offsets + (q0 - k0)),
                    kv_lengths=local_lengths.get(ki),
                ))
            blocks.append(OutputBlock(batch_index=tuple(batch_index), batch_slices=slices, query_index=qi,
                                      q0=q0, q1=q1, keys=tuple(keys)))
    return Plan(batch_chunks=batch_chunks, query_chunks=query_chunks, key_chunks=key_chunks,
                batch_bounds=batch_bounds, query_bounds=query_bounds, key_bounds=key_bounds, blocks=blocks)
