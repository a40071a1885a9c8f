"""The fused kernels on a paged KV cache (Operand::pages), through _core.attention(block_table=...).

A paged cache is (num_blocks, Hk, block_size, D / Dv) with block_table int32 (B, max_blocks): key j of
item b is cache[table[b, j // bs], :, j % bs]. Each case builds a cache with shuffled (and, where asked,
shared) blocks, NaN in every page and row no item may read, and table entries past kv_lengths set to -1
or to a huge index (never valid, so a kernel that read one would crash or read NaN into a result), and
checks:

* bitwise equality with the same call on the gathered contiguous cache (B, Hk, max_blocks * bs, D):
  both paths add the same terms in the same order (the row-wise path reads a paged K / V run by run in
  key order, the tiled path reads a tile in place or gathers it unchanged into its scratch, the
  bfloat16 pair and AMX paths pack the same pairs), and the key split depends on max_blocks * bs only;
* against the float64 reference on the gathered cache for a subset (the tolerance table of conftest).
"""

from __future__ import annotations

import numpy as np
import pytest

from attnfast import _attnfast as _core
from attnfast import _inputs
from conftest import BFLOAT16, FLOAT16, SIXTEEN_BIT, assert_close_to_reference, naive_attention, ref_attention64

pytestmark = pytest.mark.usefixtures("isa")

DTYPES = [np.dtype(np.float64), np.dtype(np.float32), FLOAT16, BFLOAT16]
HUGE = np.iinfo(np.int32).max


def compute_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class PagedCase:
    """A paged cache, its block table and the same keys as a contiguous cache."""

    def __init__(self, rng, dtype, *, batch, hk, bs, max_blocks, d, dv, kv_lengths, shared=False, past=-1,
                 spare_blocks=3):
        self.bs, self.max_blocks, self.lk = bs, max_blocks, bs * max_blocks
        self.kv_lengths = None if kv_lengths is None else np.asarray(kv_lengths, np.int64)
        lengths = np.full(batch, self.lk) if kv_lengths is None else self.kv_lengths
        needed = [-(-int(n) // bs) for n in lengths]
        num_blocks = sum(needed) + spare_blocks
        order = rng.permutation(num_blocks)
        table = np.full((batch, max_blocks), past, np.int64)
        at = 0
        for b in range(batch):
            table[b, :needed[b]] = order[at:at + needed[b]]
            at += needed[b]
        if shared and batch > 1:
            # Item 1 starts with item 0's blocks (a shared prompt prefix); its own first ones go unused.
            common = min(needed[0], needed[1]) - 1
            table[1, :max(common, 0)] = table[0, :max(common, 0)]
        self.table = table.astype(np.int32)
        # Every element starts as NaN: pages no item reads, and rows past an item's length in its last page.
        self.k = np.full((num_blocks, hk, bs, d), np.nan, np.float64)
        self.v = np.full((num_blocks, hk, bs, dv), np.nan, np.float64)
        self.kc = np.full((batch, hk, self.lk, d), np.nan, np.float64)
        self.vc = np.full((batch, hk, self.lk, dv), np.nan, np.float64)
        for b in range(batch):
            for j in range(int(lengths[b])):
                page, row = self.table[b, j // bs], j % bs
                if np.isnan(self.k[page, 0, row, 0]):
                    self.k[page, :, row] = rng.standard_normal((hk, d))
                    self.v[page, :, row] = rng.standard_normal((hk, dv))
                self.kc[b, :, j], self.vc[b, :, j] = self.k[page, :, row], self.v[page, :, row]
        self.k, self.v = self.k.astype(dtype), self.v.astype(dtype)
        self.kc, self.vc = self.kc.astype(dtype), self.vc.astype(dtype)


def core_attention(q, k, v, *, group, lk, table=None, kv_lengths=None, causal=False, lse=False, weights=False):
    """_core.attention as attnfast.attention calls it; causal is bottom-right aligned to kv_lengths."""
    b, hq, lq, d = q.shape
    dv = v.shape[-1]
    t = compute_dtype(q.dtype)
    out = np.empty((b, hq, lq, dv), q.dtype)
    lse_out = np.empty((b, hq, lq), t) if lse else None
    w_out = np.empty((b, hq, lq, lk), t) if weights else None
    lengths = None if kv_lengths is None else np.repeat(np.asarray(kv_lengths, np.int64), hq)
    offsets = None if lengths is None or not causal else lengths - lq
    _core.attention(q, k, v, out, [b, hq], [b, hq // group], group, 1.0 / np.sqrt(d), None, None, lengths, causal,
                    lk - lq, -1, -1, lse_out, w_out, diagonal_offsets=offsets,
                    block_table=None if table is None else table)
    return out, lse_out, w_out


def run_both(case, q, group, *, causal=False, lse=False, weights=False):
    kw = dict(group=group, lk=case.lk, kv_lengths=case.kv_lengths, causal=causal, lse=lse, weights=weights)
    paged = core_attention(q, case.k, case.v, table=case.table, **kw)
    contiguous = core_attention(q, case.kc, case.vc, **kw)
    return paged, contiguous


def assert_bitwise(paged, contiguous):
    for name, a, e in zip(("out", "lse", "weights"), paged, contiguous):
        if e is None:
            continue
        assert np.all(np.isfinite(a.astype(np.float64)) | np.isinf(a.astype(np.float64))), f"{name}: NaN leaked"
        np.testing.assert_array_equal(a.view(np.uint8), e.view(np.uint8), err_msg=f"{name} differs bitwise")


def visible_mask(case, batch, hq, lq, causal):
    """The keys each row sees: below kv_lengths and, for causal, up to its bottom-right diagonal."""
    lengths = np.full(batch, case.lk) if case.kv_lengths is None else case.kv_lengths
    j = np.arange(case.lk)
    i = np.arange(lq)
    m = j[None, None, :] < lengths[:, None, None]
    if causal:
        m = m & (j[None, None, :] <= (i[None, :, None] + lengths[:, None, None] - lq))
    return np.broadcast_to(m[:, None], (batch, hq, lq, case.lk))


def check_reference(case, q, out, lse, group, causal):
    batch, hq, lq, _ = q.shape
    mask = visible_mask(case, batch, hq, lq, causal)
    kc = np.where(np.isnan(case.kc.astype(np.float64)), 0, case.kc).astype(case.kc.dtype)
    vc = np.where(np.isnan(case.vc.astype(np.float64)), 0, case.vc).astype(case.vc.dtype)
    r_out, r_lse, _ = ref_attention64(q, kc, vc, mask=mask)
    dtype = q.dtype
    n_out, n_lse, _ = naive_attention(q, kc, vc, mask=mask, rounded=dtype if dtype in SIXTEEN_BIT else None)
    if dtype in SIXTEEN_BIT:
        _, n_lse, _ = naive_attention(q, kc, vc, mask=mask)
    scale = None if dtype in SIXTEEN_BIT else float(np.max(np.abs(vc.astype(np.float64)), initial=0.0)) or 1.0
    assert_close_to_reference(out, r_out, n_out, dtype, scale=scale, what="paged out")
    assert_close_to_reference(lse, r_lse, n_lse, _inputs.lse_dtype(dtype), what="paged lse")


def queries(rng, dtype, batch, hq, lq, d):
    return rng.standard_normal((batch, hq, lq, d)).astype(dtype)


# ---- decode: the row-wise path (group * Lq <= 16 rows per kv head) ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", [1, 3, 16, 128, 256])
def test_decode_matches_contiguous_bitwise(rng, dtype, bs):
    max_blocks = max(2, -(-300 // bs))
    lk = bs * max_blocks
    lengths = [lk, 1, 0, lk - bs // 2 - 1 if lk > bs else lk - 1]
    case = PagedCase(rng, dtype, batch=4, hk=2, bs=bs, max_blocks=max_blocks, d=17, dv=65, kv_lengths=lengths,
                     shared=True)
    q = queries(rng, dtype, 4, 8, 1, 17)
    paged, contiguous = run_both(case, q, group=4, lse=True)
    assert_bitwise(paged, contiguous)
    check_reference(case, q, paged[0], paged[1], 4, False)


@pytest.mark.parametrize("past", [-1, HUGE])
@pytest.mark.parametrize("bs", [16, 128])
def test_decode_never_reads_past_kv_lengths(rng, bs, past):
    # Table entries past kv_lengths are invalid page indices: a kernel that looked them up would crash
    # (huge) or read NaN (-1 reads the byte before the cache ... or crash); both results must be exact.
    case = PagedCase(rng, np.float32, batch=3, hk=1, bs=bs, max_blocks=6, d=64, dv=64,
                     kv_lengths=[bs * 2 + 5, bs, 1], past=past)
    q = queries(rng, np.float32, 3, 2, 1, 64)
    paged, contiguous = run_both(case, q, group=2, lse=True, weights=True)
    assert_bitwise(paged, contiguous)
    w = paged[2]
    for b, n in enumerate(case.kv_lengths):
        assert np.all(w[b, :, :, n:] == 0)
    check_reference(case, q, paged[0], paged[1], 2, False)


@pytest.mark.parametrize("bs", [16, 128])
def test_decode_long_cache_key_split(rng, bs):
    # One kv item and many keys: the row-wise path splits the keys into chunks merged by lse.
    lk = 4096
    case = PagedCase(rng, np.float32, batch=1, hk=1, bs=bs, max_blocks=lk // bs, d=128, dv=128,
                     kv_lengths=[lk - 37], shared=False)
    q = queries(rng, np.float32, 1, 4, 1, 128)
    paged, contiguous = run_both(case, q, group=4, lse=True)
    assert_bitwise(paged, contiguous)
    check_reference(case, q, paged[0], paged[1], 4, False)


def test_decode_without_kv_lengths_reads_every_block(rng):
    case = PagedCase(rng, np.float32, batch=2, hk=2, bs=16, max_blocks=5, d=8, dv=3, kv_lengths=None)
    q = queries(rng, np.float32, 2, 2, 1, 8)
    paged, contiguous = run_both(case, q, group=1, lse=True, weights=True)
    assert_bitwise(paged, contiguous)
    check_reference(case, q, paged[0], paged[1], 1, False)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BFLOAT16], ids=str)
def test_decode_few_queries_causal_bottom_right(rng, dtype):
    # Speculative decoding: 3 new rows per item see the cache up to their own position.
    case = PagedCase(rng, dtype, batch=3, hk=2, bs=16, max_blocks=8, d=64, dv=64, kv_lengths=[100, 3, 17])
    q = queries(rng, dtype, 3, 4, 3, 64)
    paged, contiguous = run_both(case, q, group=2, causal=True, lse=True, weights=True)
    assert_bitwise(paged, contiguous)
    check_reference(case, q, paged[0], paged[1], 2, True)


# ---- prefill and chunked prefill: the tiled path ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", [1, 3, 16, 128, 256])
def test_tiled_matches_contiguous_bitwise(rng, dtype, bs):
    max_blocks = max(2, -(-200 // bs))
    lk = bs * max_blocks
    lengths = [lk, 97, 0, 1]
    case = PagedCase(rng, dtype, batch=4, hk=2, bs=bs, max_blocks=max_blocks, d=63, dv=33, kv_lengths=lengths,
                     shared=True, past=HUGE)
    q = queries(rng, dtype, 4, 2, 97, 63)
    paged, contiguous = run_both(case, q, group=1, lse=True)
    assert_bitwise(paged, contiguous)
    check_reference(case, q, paged[0], paged[1], 1, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", [3, 16, 128])
def test_chunked_prefill_causal_bottom_right(rng, dtype, bs):
    # A chunk of 50 new rows per item appended to a cache filled to kv_lengths: row i sees keys up to
    # i + kv_lengths[b] - 50. GQA 2.
    max_blocks = -(-400 // bs)
    case = PagedCase(rng, dtype, batch=3, hk=2, bs=bs, max_blocks=max_blocks, d=64, dv=64,
                     kv_lengths=[350, 50, 211], shared=True)
    q = queries(rng, dtype, 3, 4, 50, 64)
    paged, contiguous = run_both(case, q, group=2, causal=True, lse=True, weights=True)
    assert_bitwise(paged, contiguous)
    check_reference(case, q, paged[0], paged[1], 2, True)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BFLOAT16], ids=str)
def test_tiled_many_queries_key_split(rng, dtype):
    # One item, one head, many keys: the tiled path splits the keys into chunks (its own key split).
    case = PagedCase(rng, dtype, batch=1, hk=1, bs=16, max_blocks=256, d=64, dv=64, kv_lengths=[4000])
    q = queries(rng, dtype, 1, 1, 64, 64)
    paged, contiguous = run_both(case, q, group=1, lse=True)
    assert_bitwise(paged, contiguous)
    check_reference(case, q, paged[0], paged[1], 1, False)


@pytest.mark.parametrize("past", [-1, HUGE])
def test_tiled_weights_never_read_past_kv_lengths(rng, past):
    case = PagedCase(rng, np.float32, batch=2, hk=1, bs=16, max_blocks=12, d=32, dv=32, kv_lengths=[70, 1],
                     past=past)
    q = queries(rng, np.float32, 2, 1, 60, 32)
    paged, contiguous = run_both(case, q, group=1, lse=True, weights=True)
    assert_bitwise(paged, contiguous)
    for b, n in enumerate(case.kv_lengths):
        assert np.all(paged[2][b, :, :, n:] == 0)
    check_reference(case, q, paged[0], paged[1], 1, False)


def test_tiled_multiple_query_batches_warm_prefetch(rng):
    # Several query blocks per item and several items per thread: the tiled path fetches the next item's
    # K and V ahead (only rows below that item's kv_lengths: the rest have no page).
    case = PagedCase(rng, np.float32, batch=6, hk=1, bs=16, max_blocks=16, d=64, dv=64,
                     kv_lengths=[256, 5, 200, 16, 17, 130], past=HUGE)
    q = queries(rng, np.float32, 6, 1, 200, 64)
    paged, contiguous = run_both(case, q, group=1, lse=True)
    assert_bitwise(paged, contiguous)
