"""The fused kernel on an int8 KV cache with per-row float32 scales, on every SIMD target.

Key j of an int8 cache stands for k_int8[j] * k_scale[j] (and likewise V): every result is held to the
float64 reference on those dequantised values, with the suite's tolerance (2x the error of a naive
float32 implementation on the dequantised cache, rounded to float32, plus the float32 floor). Covered:
the row-wise (decode) and tiled (prefill) paths and both with the keys split into chunks, GQA, awkward
feature and length sizes, causal (both alignments), windows, bool masks with fully masked rows,
kv_lengths, scales that broadcast (stride 0) or are strided, zero scales, lse and weights; hidden keys
whose rows and scales hold garbage never reach a result, and rows past kv_lengths are never read (they
lie in a page that faults on access). The kernel is called through the binding
(``_core.attention(..., k_scale=, v_scale=)``, struct ServingArgs in cpp/bindings/module.cpp) with the
call the Python layer would make.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import pytest

import attnfast
from attnfast import _attnfast as _core
from attnfast import reference

from conftest import assert_close_to_reference, check_attention, naive_attention

pytestmark = pytest.mark.usefixtures("isa")


# ---- the call, the dequantised cache and the comparison -------------------------------------------


def int8_attention(q, k8, v8, k_scale, v_scale, *, causal=False, causal_align="top_left", window=None,
                   kv_lengths=None, mask=None, scale=None, return_weights=False):
    """(out, lse[, weights]) of the fused kernel on int8 k8 / v8 (kv batch (B, Hk)) with float32 scales
    broadcastable to their shapes without the last axis; q float32 (B, Hq, Lq, D)."""
    batch, (lq, d) = q.shape[:-2], q.shape[-2:]
    kv_batch, lk = k8.shape[:-2], k8.shape[-2]
    full = batch + (lq, lk)
    scale = 1.0 / np.sqrt(d) if scale is None and d > 0 else (1.0 if scale is None else scale)
    out = np.empty(batch + (lq, v8.shape[-1]), np.float32)
    lse = np.empty(batch + (lq,), np.float32)
    weights = np.empty(full, np.float32) if return_weights else None
    lengths = None
    if kv_lengths is not None:
        lengths = np.ascontiguousarray(np.broadcast_to(np.asarray(kv_lengths, np.int64).reshape(-1, 1), batch))
    left, right = (-1, -1) if window is None else tuple(-1 if w is None else w for w in window)
    offset = lk - lq if causal_align == "bottom_right" else 0
    # bottom_right with kv_lengths aligns each item's diagonal to its own length (README "Numerics").
    offsets = None if lengths is None or causal_align != "bottom_right" else np.ascontiguousarray(lengths - lq)
    _core.attention(q, k8, v8, out, list(batch), list(kv_batch), batch[-1] // kv_batch[-1], scale,
                    None if mask is None else np.broadcast_to(mask, full), None, lengths, causal, offset, left,
                    right, lse, weights, diagonal_offsets=None if offsets is None else offsets.reshape(-1),
                    k_scale=np.broadcast_to(k_scale, k8.shape[:-1]), v_scale=np.broadcast_to(v_scale, v8.shape[:-1]))
    return (out, lse, weights) if return_weights else (out, lse)


def dequantised(x8, scale):
    """The cache's values in float64 (exact: an int8 times a float32 fits in float64)."""
    return x8.astype(np.float64) * np.asarray(scale, np.float64)[..., None]


def reference_kwargs(kw):
    kw = dict(kw)
    if kw.get("kv_lengths") is not None:
        kw["kv_lengths"] = np.asarray(kw["kv_lengths"]).reshape(-1, 1)  # per (B,), over the heads
    return kw


def check_int8(q, k8, v8, k_scale, v_scale, *, what="int8", **kw):
    """Runs the kernel (with weights) and holds out, lse and weights to the float64 reference on the
    dequantised cache, against a naive float32 implementation on that cache rounded to float32."""
    out, lse, w = int8_attention(q, k8, v8, k_scale, v_scale, return_weights=True, **kw)
    kd, vd = dequantised(k8, k_scale), dequantised(v8, v_scale)
    rkw = reference_kwargs(kw)
    r_out, r_lse, r_w = reference.attention(q.astype(np.float64), kd, vd, return_lse=True, return_weights=True,
                                            **rkw)
    n_out, n_lse, n_w = naive_attention(q, kd.astype(np.float32), vd.astype(np.float32), **rkw)
    v_mag = float(np.max(np.abs(vd), initial=0.0)) or 1.0
    assert_close_to_reference(out, r_out, n_out, np.float32, scale=v_mag, what=f"{what}: out")
    assert_close_to_reference(lse, r_lse, n_lse, np.float32, what=f"{what}: lse")
    assert_close_to_reference(w, r_w, n_w, np.float32, scale=1.0, what=f"{what}: weights")
    empty = r_lse == -np.inf
    assert np.all(out[empty] == 0) and np.all(w[empty] == 0), f"{what}: rows with no visible key give 0"
    assert np.all(w[r_w == 0] == 0), f"{what}: hidden keys must weigh exactly 0"
    return out, lse, w


def quantised_cache(rng, kv_batch, lk, d, dv=None):
    """int8 K and V (all of [-127, 127]) with positive per-row scales of varied sizes."""
    dv = d if dv is None else dv
    k8 = rng.integers(-127, 128, kv_batch + (lk, d)).astype(np.int8)
    v8 = rng.integers(-127, 128, kv_batch + (lk, dv)).astype(np.int8)
    k_scale = (rng.uniform(0.2, 1.0, kv_batch + (lk,)) / 127).astype(np.float32)
    v_scale = (rng.uniform(0.2, 1.0, kv_batch + (lk,)) / 127).astype(np.float32)
    return k8, v8, k_scale, v_scale


def queries(rng, batch, lq, d):
    return rng.standard_normal(batch + (lq, d)).astype(np.float32)


# ---- paths and sizes --------------------------------------------------------------------------------

# Row-wise: GQA group 2 x 2 query rows = 4 rows per kv item (<= 16, attention.h). Tiled: 40 or 97 query
# rows per item (> 16).
SIZES_D = [1, 3, 17, 63, 65, 97]
SIZES_L = [1, 2, 97, 1025]


@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("lk", SIZES_L)
def test_rowwise_matches_reference(rng, d, lk):
    k8, v8, ks, vs = quantised_cache(rng, (2, 2), lk, d)
    check_int8(queries(rng, (2, 4), 2, d), k8, v8, ks, vs, what=f"rowwise D={d} Lk={lk}")


@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("lk", SIZES_L)
def test_tiled_matches_reference(rng, d, lk):
    k8, v8, ks, vs = quantised_cache(rng, (2, 1), lk, d, dv=max(1, d - 2))
    lq = 40 if lk < 97 else 97
    check_int8(queries(rng, (2, 2), lq, d), k8, v8, ks, vs, what=f"tiled D={d} Lk={lk}")


# (q batch, kv batch, Lq, Lk, D): keys split into chunks merged by log-sum-exp (attention_schedule.h):
# row-wise, one kv item over 2500 keys (3 chunks); tiled, two 40-row blocks over 2100 keys.
SPLITS = {"rowwise_split": ((1, 2), (1, 1), 1, 2500, 33), "tiled_split": ((1, 2), (1, 1), 40, 2100, 64)}


@pytest.mark.parametrize("path", list(SPLITS))
def test_key_split_matches_reference_and_is_thread_independent(rng, path, threads):
    qb, kvb, lq, lk, d = SPLITS[path]
    k8, v8, ks, vs = quantised_cache(rng, kvb, lk, d)
    q = queries(rng, qb, lq, d)
    attnfast.set_num_threads(1)
    one = check_int8(q, k8, v8, ks, vs, what=path, causal=True, causal_align="bottom_right")
    attnfast.set_num_threads(2)
    two = int8_attention(q, k8, v8, ks, vs, causal=True, causal_align="bottom_right", return_weights=True)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("path", ["rowwise", "tiled"])
@pytest.mark.parametrize("hiding", ["causal_top_left", "causal_bottom_right", "window", "mask", "kv_lengths",
                                    "combined"])
def test_visibility_rules(rng, path, hiding):
    lq, lk, d, dv = (3, 200, 64, 40) if path == "rowwise" else (70, 200, 64, 40)
    batch, kv_batch = ((2, 4), (2, 2)) if path == "rowwise" else ((2, 2), (2, 1))
    k8, v8, ks, vs = quantised_cache(rng, kv_batch, lk, d, dv)
    kw = {}
    if hiding.startswith("causal"):
        kw = {"causal": True, "causal_align": hiding.split("_", 1)[1]}
    elif hiding == "window":
        kw = {"window": (5, 3), "causal_align": "bottom_right"}
    elif hiding in ("mask", "combined"):
        mask = rng.random(batch + (lq, lk)) < 0.5
        mask[0, 1, 1] = False  # a fully masked row: out 0, lse -inf
        mask[1, 0, lq - 1] = False
        kw = {"mask": mask}
    if hiding in ("kv_lengths", "combined"):
        kw["kv_lengths"] = np.array([lk - 3, 1])
    if hiding == "combined":
        kw.update(causal=True, causal_align="bottom_right", window=(60, None))
    out, lse, _ = check_int8(queries(rng, batch, lq, d), k8, v8, ks, vs, what=f"{path} {hiding}", **kw)
    if "mask" in kw:
        assert np.all(out[0, 1, 1] == 0) and lse[0, 1, 1] == -np.inf


# ---- scales -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["rowwise", "tiled"])
@pytest.mark.parametrize("layout", ["per_head", "per_key", "strided", "transposed"])
def test_scale_layouts(rng, path, layout):
    """Scales as views: one per kv head broadcast over the keys (row stride 0), one per key shared by
    the heads (head stride 0), every other element of a larger array, and (Lk, Hk) memory transposed."""
    lq = 2 if path == "rowwise" else 50
    k8, v8, ks, vs = quantised_cache(rng, (2, 2), 150, 24)
    if layout == "per_head":
        ks, vs = ks[..., :1], vs[..., :1]  # (2, 2, 1): broadcast to (2, 2, 150) by the call
    elif layout == "per_key":
        ks, vs = ks[:, :1], vs[:, :1]
    elif layout == "strided":
        ks, vs = np.repeat(ks, 2, axis=-1)[..., ::2], np.repeat(vs, 2, axis=-1)[..., ::2]
    else:
        ks, vs = np.ascontiguousarray(np.swapaxes(ks, -1, -2)).swapaxes(-1, -2), vs
    check_int8(queries(rng, (2, 4), lq, 24), k8, v8, ks, vs, what=f"{path} {layout}")


@pytest.mark.parametrize("path", ["rowwise", "tiled"])
def test_zero_scales(rng, path):
    """A zero k_scale makes the key's score 0 and a zero v_scale its value 0 (an all-zero row as
    quantize_kv stores it), whatever the int8 values."""
    lq = 2 if path == "rowwise" else 50
    k8, v8, ks, vs = quantised_cache(rng, (1, 2), 300, 32)
    ks[..., ::3] = 0
    vs[..., 1::4] = 0
    vs[0, 1] = 0  # one head's values all zero: its outputs are exactly 0
    out, _, _ = check_int8(queries(rng, (1, 2), lq, 32), k8, v8, ks, vs, what=f"{path} zero scales")
    assert np.all(out[0, 1] == 0)


# ---- hidden keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["rowwise", "tiled", "rowwise_split", "tiled_split"])
def test_hidden_keys_never_reach_results(rng, path):
    """NaN / inf scales and arbitrary int8 rows in keys past kv_lengths and in a key the mask hides give
    bitwise the results of the clean cache."""
    shapes = {"rowwise": ((2, 4), (2, 2), 3, 300, 40), "tiled": ((2, 2), (2, 1), 60, 300, 40),
              **SPLITS}
    qb, kvb, lq, lk, d = shapes[path]
    k8, v8, ks, vs = quantised_cache(rng, kvb, lk, d)
    q = queries(rng, qb, lq, d)
    lengths = np.array([lk - 5, lk // 2][: qb[0]])
    mask = np.ones(qb + (lq, lk), bool)
    masked_key = 70
    mask[..., masked_key] = False
    kw = dict(kv_lengths=lengths, mask=mask)
    clean = int8_attention(q, k8, v8, ks, vs, return_weights=True, **kw)
    dk8, dv8, dks, dvs = k8.copy(), v8.copy(), ks.copy(), vs.copy()
    for b, n in enumerate(lengths):
        dk8[b, :, n:] = rng.integers(-128, 128, dk8[b, :, n:].shape)
        dv8[b, :, n:] = rng.integers(-128, 128, dv8[b, :, n:].shape)
        dks[b, :, n:] = np.nan
        dvs[b, :, n:] = np.inf
    dk8[..., masked_key, :] = -128
    dks[..., masked_key] = np.inf
    dvs[..., masked_key] = np.nan
    dirty = int8_attention(q, dk8, dv8, dks, dvs, return_weights=True, **kw)
    for a, b in zip(clean, dirty):
        np.testing.assert_array_equal(a, b)
    check_int8(q, k8, v8, ks, vs, what=f"{path} hidden keys", **kw)


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class _Guarded:
    """Arrays whose elements from a given row on lie in pages that fault on any access (PROT_NONE)."""

    def __init__(self):
        self._maps = []

    def array(self, values, readable_rows):
        """A copy of ``values`` (one item: (1, 1, rows) + features) whose rows >= readable_rows fault."""
        row_bytes = int(np.prod(values.shape[3:], dtype=np.int64)) * values.itemsize
        head = readable_rows * row_bytes
        tail = values.nbytes - head
        head_pages = -(-head // _PAGE) + 1
        tail_pages = -(-tail // _PAGE) + 1
        mm = mmap.mmap(-1, (head_pages + tail_pages) * _PAGE)
        self._maps.append(mm)
        raw = np.frombuffer(mm, np.uint8)
        start = head_pages * _PAGE - head  # the first unreadable row starts the guard pages
        arr = raw[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
        arr[...] = values
        address = raw.ctypes.data + head_pages * _PAGE
        assert _libc.mprotect(address, tail_pages * _PAGE, 0) == 0, ctypes.get_errno()
        return arr

    def release(self):
        for mm in self._maps:
            raw = np.frombuffer(mm, np.uint8)
            _libc.mprotect(raw.ctypes.data, len(mm), mmap.PROT_READ | mmap.PROT_WRITE)


@pytest.mark.parametrize("path", ["rowwise", "tiled", "rowwise_split"])
@pytest.mark.parametrize("length", [1, 77, 129])
def test_rows_past_kv_lengths_are_never_read(rng, path, length):
    """K, V, k_scale and v_scale rows from kv_lengths on sit in pages that fault when touched: the call
    neither crashes nor differs from the call on a cache that ends at kv_lengths."""
    lq, lk, d = {"rowwise": (4, 300, 48), "tiled": (60, 300, 48), "rowwise_split": (1, 2500, 32)}[path]
    qb = (1, 2) if path != "rowwise" else (1, 4)
    k8, v8, ks, vs = quantised_cache(rng, (1, 1), lk, d)
    q = queries(rng, qb, lq, d)
    guard = _Guarded()
    try:
        gk8, gv8 = guard.array(k8, length), guard.array(v8, length)
        gks, gvs = guard.array(ks[..., None], length)[..., 0], guard.array(vs[..., None], length)[..., 0]
        got = int8_attention(q, gk8, gv8, gks, gvs, kv_lengths=[length])
    finally:
        guard.release()
    short = int8_attention(q, k8[:, :, :length], v8[:, :, :length], ks[..., :length], vs[..., :length])
    for a, b in zip(got, short):
        np.testing.assert_array_equal(a, b)


# ---- numerics ---------------------------------------------------------------------------------------


def test_scores_are_scaled_after_the_integer_dot_product(rng):
    """Row-wise: with integer queries the dot product with an int8 row is exact in float32, so the
    score is the one rounding of k_scale * (q . k): lse of one visible key equals it bitwise."""
    d = 64
    q = rng.integers(-8, 9, (1, 1, 1, d)).astype(np.float32)
    k8, v8, ks, vs = quantised_cache(rng, (1, 1), 5, d)
    mask = np.zeros((1, 1, 1, 5), bool)
    mask[..., 3] = True
    _, lse = int8_attention(q, k8, v8, ks, vs, mask=mask, scale=1.0)
    dot = np.float32(q[0, 0, 0].astype(np.int64) @ k8[0, 0, 3].astype(np.int64))
    assert lse[0, 0, 0] == ks[0, 0, 3] * dot


# ---- paged int8 cache -------------------------------------------------------------------------------


def paged_int8_cache(rng, *, batch, hk, bs, max_blocks, d, kv_lengths):
    """A paged int8 cache (num_blocks, Hk, bs, D) with its scales (num_blocks, Hk, bs), shuffled blocks,
    table entries past kv_lengths -1 (never valid), and the same keys gathered into a contiguous cache
    (B, Hk, max_blocks * bs, D). Scales no item may read are NaN, their int8 rows arbitrary."""
    needed = [-(-int(n) // bs) for n in kv_lengths]
    num_blocks = sum(needed) + 2
    order = rng.permutation(num_blocks)
    table = np.full((batch, max_blocks), -1, np.int32)
    at = 0
    for b in range(batch):
        table[b, :needed[b]] = order[at:at + needed[b]]
        at += needed[b]
    k8 = rng.integers(-128, 128, (num_blocks, hk, bs, d)).astype(np.int8)
    v8 = rng.integers(-128, 128, (num_blocks, hk, bs, d)).astype(np.int8)
    ks = np.full((num_blocks, hk, bs), np.nan, np.float32)
    vs = np.full((num_blocks, hk, bs), np.nan, np.float32)
    lk = bs * max_blocks
    gathered = [np.zeros((batch, hk, lk, d), np.int8), np.zeros((batch, hk, lk, d), np.int8),
                np.full((batch, hk, lk), np.nan, np.float32), np.full((batch, hk, lk), np.nan, np.float32)]
    for b in range(batch):
        for j in range(int(kv_lengths[b])):
            page, row = table[b, j // bs], j % bs
            ks[page, :, row] = rng.uniform(0.2, 1.0, hk) / 127
            vs[page, :, row] = rng.uniform(0.2, 1.0, hk) / 127
            for dst, src in zip(gathered, (k8, v8, ks, vs)):
                dst[b, :, j] = src[page, :, row]
    return (k8, v8, ks, vs, table), gathered


def paged_int8_attention(q, k8, v8, ks, vs, *, group, lk, kv_lengths, table=None):
    b, hq, lq, d = q.shape
    out = np.empty((b, hq, lq, v8.shape[-1]), np.float32)
    lse = np.empty((b, hq, lq), np.float32)
    lengths = np.repeat(np.asarray(kv_lengths, np.int64), hq)
    _core.attention(q, k8, v8, out, [b, hq], [b, hq // group], group, 1.0 / np.sqrt(d), None, None, lengths, True,
                    lk - lq, -1, -1, lse, None, diagonal_offsets=lengths - lq, block_table=table, k_scale=ks,
                    v_scale=vs)
    return out, lse


# (q heads per kv head, Lq, block size, blocks per item): row-wise decode, row-wise over enough keys to
# split them, tiled chunked prefill.
PAGED = {"rowwise": (2, 1, 16, 12), "rowwise_split": (2, 1, 128, 24), "tiled": (1, 50, 3, 70),
         "rowwise_bs1": (2, 2, 1, 150)}


@pytest.mark.parametrize("path", list(PAGED))
def test_paged_int8_equals_contiguous(rng, path):
    """A paged int8 cache (K, V and their scales through the block table) gives bitwise the results of
    the same keys contiguous, and matches the reference on the dequantised values."""
    group, lq, bs, max_blocks = PAGED[path]
    lk = bs * max_blocks
    kv_lengths = np.array([lk - bs - 1, lk // 2 + 1])
    paged, gathered = paged_int8_cache(rng, batch=2, hk=2, bs=bs, max_blocks=max_blocks, d=40, kv_lengths=kv_lengths)
    q = queries(rng, (2, 2 * group), lq, 40)
    k8, v8, ks, vs, table = paged
    got = paged_int8_attention(q, k8, v8, ks, vs, group=group, lk=lk, kv_lengths=kv_lengths, table=table)
    want = paged_int8_attention(q, *gathered, group=group, lk=lk, kv_lengths=kv_lengths)
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a, e)
    gk8, gv8, gks, gvs = gathered
    visible = np.arange(lk)[None, None, :] < kv_lengths[:, None, None]
    visible = visible & (np.arange(lk)[None, None, :] <= np.arange(lq)[None, :, None] + (kv_lengths - lq)[:, None, None])
    mask = np.broadcast_to(visible[:, None], (2, 2 * group, lq, lk))
    kd = np.nan_to_num(dequantised(gk8, gks))
    vd = np.nan_to_num(dequantised(gv8, gvs))
    r_out, r_lse = reference.attention(q.astype(np.float64), kd, vd, mask=mask, return_lse=True)
    n_out, n_lse, _ = naive_attention(q, kd.astype(np.float32), vd.astype(np.float32), mask=mask)
    assert_close_to_reference(got[0], r_out, n_out, np.float32, scale=float(np.abs(vd).max()), what=f"{path}: out")
    assert_close_to_reference(got[1], r_lse, n_lse, np.float32, what=f"{path}: lse")


# ---- through the Python API -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["rowwise", "tiled"])
def test_api_calls_the_same_kernel(rng, path):
    """attnfast.attention(..., k_scale=, v_scale=) on an int8 cache gives bitwise the kernel's result."""
    lq = 2 if path == "rowwise" else 50
    k8, v8, ks, vs = quantised_cache(rng, (2, 2), 130, 40)
    q = queries(rng, (2, 4), lq, 40)
    out, lse = attnfast.attention(q, k8, v8, k_scale=ks, v_scale=vs, causal=True, kv_lengths=np.array([[100], [7]]),
                                  causal_align="bottom_right", return_lse=True)
    want = int8_attention(q, k8, v8, ks, vs, causal=True, kv_lengths=[100, 7], causal_align="bottom_right")
    np.testing.assert_array_equal(out, want[0])
    np.testing.assert_array_equal(lse, want[1])


@pytest.mark.parametrize("path", ["rowwise", "tiled"])
@pytest.mark.parametrize("modifier", ["softcap", "alibi", "sinks"])
def test_score_modifiers_on_an_int8_cache(rng, path, modifier):
    """The score modifiers apply to the dequantised score k_scale (q . k), as on a float cache."""
    lq = 3 if path == "rowwise" else 50
    k8, v8, ks, vs = quantised_cache(rng, (1, 2), 200, 48)
    q = queries(rng, (1, 4), lq, 48) * np.float32(3)
    kw = {"softcap": {"softcap": 2.0}, "alibi": {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
          "sinks": {"sinks": np.array([0.0, 1.0, -1.0, 3.0])}}[modifier]
    check_attention(q, k8, v8, dtype=np.float32, what=f"{path} int8 {modifier}", k_scale=ks, v_scale=vs,
                    causal=True, causal_align="bottom_right", **kw)
