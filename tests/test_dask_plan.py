"""attnfast.dask._plan: the block planner the Dask forward and backward share.

Every pruning decision is checked against the visibility matrix built key by key from the definition
(causal, window, kv_lengths, per-item diagonals); the local offsets and kv_lengths of each block must
reproduce the global visibility inside that block.
"""

import numpy as np
import pytest

pytest.importorskip("dask.array")

from attnfast.dask import _plan  # noqa: E402


def visibility(lq, lk, *, causal, offsets, left, right, lengths):
    """(items..., Lq, Lk) bool: key j visible to query i, straight from the definition."""
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    diag = i + np.asarray(offsets)[..., None, None]
    vis = np.ones(np.broadcast_shapes(diag.shape, (lq, lk)), dtype=bool)
    if causal:
        vis = vis & (j <= diag)
    if left >= 0:
        vis = vis & (j >= diag - left)
    if right >= 0:
        vis = vis & (j <= diag + right)
    if lengths is not None:
        vis = vis & (j < np.asarray(lengths)[..., None, None])
    return vis


def random_chunks(rng, n, max_parts=4):
    """Random chunk sizes summing to n (zero-size chunks only when n == 0)."""
    if n == 0:
        return (0,)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, max_parts))), replace=False))
    return tuple(int(c) for c in np.diff(np.concatenate([[0], cuts, [n]])))


CASES = [
    dict(causal=True, align="top_left", window=None, lengths=False),
    dict(causal=True, align="bottom_right", window=None, lengths=False),
    dict(causal=True, align="bottom_right", window=None, lengths=True),
    dict(causal=True, align="top_left", window=None, lengths=True),
    dict(causal=False, align="top_left", window=(3, 2), lengths=False),
    dict(causal=False, align="bottom_right", window=(0, 0), lengths=True),
    dict(causal=True, align="top_left", window=(4, None), lengths=False),
    dict(causal=False, align="top_left", window=(None, 1), lengths=False),
    dict(causal=False, align="top_left", window=None, lengths=True),
    dict(causal=False, align="top_left", window=None, lengths=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_pruning_and_local_coordinates_match_the_definition(rng, case):
    for _ in range(12):
        batch = (int(rng.integers(1, 3)), int(rng.integers(1, 4)))
        lq, lk = int(rng.integers(1, 14)), int(rng.integers(1, 14))
        lengths = rng.integers(0, lk + 1, size=batch) if case["lengths"] else None
        if case["align"] == "bottom_right" and lengths is not None:
            offset, offsets = lk - lq, lengths - lq  # what check_attention makes
        else:
            offset, offsets = (0 if case["align"] == "top_left" else lk - lq), None
        left, right = (-1, -1) if case["window"] is None else (
            -1 if case["window"][0] is None else case["window"][0], -1 if case["window"][1] is None else case["window"][1])
        batch_chunks = [random_chunks(rng, n) for n in batch]
        qc, kc = random_chunks(rng, lq), random_chunks(rng, lk)
        plan = _plan.plan_blocks(batch_chunks, qc, kc, causal=case["causal"], diagonal_offset=offset,
                                 diagonal_offsets=offsets, window_left=left, window_right=right,
                                 kv_lengths=lengths)
        vis = visibility(lq, lk, causal=case["causal"], offsets=np.broadcast_to(offset if offsets is None else offsets, batch),
                         left=left, right=right, lengths=lengths)
        assert len(plan.blocks) == np.prod([len(c) for c in batch_chunks]) * len(qc)
        for block in plan.blocks:
            sub = vis[block.batch_slices][..., block.q0:block.q1, :]
            expected = [ki for ki, (k0, k1) in enumerate(plan.key_bounds) if sub[..., k0:k1].any()]
            assert [kb.index for kb in block.keys] == expected, (block, batch_chunks, qc, kc)
            for kb in block.keys:
                # The block's own view, in local coordinates, equals the global one.
                local_offsets = kb.diagonal_offset if kb.diagonal_offsets is None else kb.diagonal_offsets
                local = visibility(block.q1 - block.q0, kb.k1 - kb.k0, causal=case["causal"],
                                   offsets=np.broadcast_to(local_offsets, sub.shape[:-2]), left=left, right=right,
                                   lengths=kb.kv_lengths)
                np.testing.assert_array_equal(np.broadcast_to(local, sub[..., kb.k0:kb.k1].shape),
                                              sub[..., kb.k0:kb.k1])


def test_causal_prunes_the_upper_triangle_of_chunks():
    plan = _plan.plan_blocks([(1,)], (4,) * 4, (4,) * 4, causal=True)
    assert [[kb.index for kb in b.keys] for b in plan.blocks] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert plan.num_block_tasks == 10
    # bottom_right with more keys than queries: every query chunk sees the first (Lk - Lq) keys too.
    plan = _plan.plan_blocks([], (4, 4), (4,) * 4, causal=True, diagonal_offset=8)
    assert [[kb.index for kb in b.keys] for b in plan.blocks] == [[0, 1, 2], [0, 1, 2, 3]]
    assert plan.blocks[0].keys[2].diagonal_offset == 8 + 0 - 8


def test_kv_lengths_are_localised_and_prune_per_item():
    lengths = np.array([3, 9])
    plan = _plan.plan_blocks([(1, 1)], (4,), (4, 4, 4), kv_lengths=lengths)
    first, second = plan.blocks
    assert [kb.index for kb in first.keys] == [0]            # item 0 sees keys 0..2
    assert [kb.index for kb in second.keys] == [0, 1, 2]      # item 1 keys 0..8
    assert [int(kb.kv_lengths[0]) for kb in second.keys] == [4, 4, 1]
    # Both items in one batch block: a chunk visible to either one is computed.
    plan = _plan.plan_blocks([(2,)], (4,), (4, 4, 4), kv_lengths=lengths)
    (block,) = plan.blocks
    assert [kb.kv_lengths.tolist() for kb in block.keys] == [[3, 4], [0, 4], [0, 1]]


def test_window_prunes_both_sides():
    plan = _plan.plan_blocks([], (4,) * 4, (4,) * 4, window_left=1, window_right=1)
    assert [[kb.index for kb in b.keys] for b in plan.blocks] == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]


def test_by_key_chunk_inverts_the_plan():
    plan = _plan.plan_blocks([(2, 1)], (3, 3), (2, 2, 2), causal=True)
    table = plan.by_key_chunk()
    assert [b.query_index for b, _ in table[((0,), 0)]] == [0, 1]
    assert [b.query_index for b, _ in table[((1,), 2)]] == [1]
    assert sum(len(v) for v in table.values()) == plan.num_block_tasks


def test_widen_to_groups_and_boundaries():
    assert _plan.widen_to_groups((3, 5), 2) == (4, 4)
    assert _plan.widen_to_groups((1, 1, 1, 1), 4) == (4,)
    assert _plan.widen_to_groups((1, 2, 3), 1) == (1, 2, 3)
    assert _plan.boundaries((2, 0, 3)) == [(0, 2), (2, 2), (2, 5)]


@pytest.mark.parametrize("n", range(0, 9))
def test_merge_levels_is_a_balanced_binary_tree_over_every_part(n):
    levels = _plan.merge_levels(n)
    width = n
    for level in levels:
        flat = [i for node in level for i in node]
        assert flat == list(range(width)) and all(1 <= len(node) <= 2 for node in level)
        width = len(level)
    assert width == (1 if n else 0)
    assert len(levels) == (0 if n == 0 else max(1, int(np.ceil(np.log2(n)))))


def test_negative_chunks_are_rejected():
    with pytest.raises(ValueError, match=r"key_chunks must hold chunk sizes >= 0; got \(2, -1\)"):
        _plan.plan_blocks([], (2,), (2, -1))


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(_plan, raise_on_error=False)
    assert result.attempted >= 4 and result.failed == 0
