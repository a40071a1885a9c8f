"""The fused backward of additive (Bahdanau) scores, `_core.attention_backward` with v_a, on every target.

The kernel gets exactly the operands the forward's kernel got (the projected queries qp, bias included,
and keys kp; `_api._kernel_operands`) plus the forward's out and lse, and returns the gradients of qp,
kp, v, the scores and v_a. The oracle below is the explicit formula in NumPy, run in float64 (the
reference) and in the input dtype (the naive computation of the tolerance table):
    t = tanh(qp_i + kp_j), s = scale t . v_a (+ bias), P = softmax(s) over the visible keys,
    dV = P^T dO, dS = P (dO V^T - rowsum(dO O)) (0 where hidden),
    dqp_i = sum_j dS_ij scale v_a (1 - t^2), dkp_j = sum_i (same), dv_a = scale sum_ij dS_ij t.
"""

import numpy as np
import pytest

import attnfast
from attnfast import _api, _core, _inputs, reference
from conftest import SIXTEEN_BIT, _finite_abs, assert_close_fixed, assert_close_to_reference

DTYPES = [np.float32, np.float64]


def _visible(a):
    """Key j visible to query i, as the forward decides it: ranges, mask, and a -inf bias."""
    vis = reference._visibility(a)
    if a.bias is not None:
        vis = vis & (np.broadcast_to(a.bias, vis.shape) != -np.inf)
    return np.broadcast_to(vis, a.batch_shape + (a.lq, a.lk))


def _flat(x, shape):
    """x broadcast to `shape` and flattened to one batch axis (a view where possible)."""
    x = np.broadcast_to(x, shape)
    return x.reshape((-1,) + shape[-2:]) if len(shape) > 2 else x[None]


def oracle(a, qp, kp, v, va, dout, dtype):
    """The gradients from the explicit formulas, computed in `dtype`, plus (float64 only) the size of
    the terms each gradient sums: its rounding errors scale with those, not with its value."""
    dtype = np.dtype(dtype)
    batch, kv_batch, g = a.batch_shape, a.kv_batch_shape, a.group
    lq, lk, hidden, dv = a.lq, a.lk, qp.shape[-1], v.shape[-1]
    vis = _flat(_visible(a), batch + (lq, lk))
    q = _flat(qp, batch + (lq, hidden)).astype(dtype)
    kvi = np.arange(vis.shape[0]) // g  # the kv item of each batch item
    k = _flat(kp, kv_batch + (lk, hidden)).astype(dtype)[kvi]
    vv = _flat(v, kv_batch + (lk, dv)).astype(dtype)[kvi]
    do = _flat(dout, batch + (lq, dv)).astype(dtype)
    w = va.astype(dtype)
    c = dtype.type(a.scale)
    # Hidden pairs are replaced before any arithmetic: the poisoned-key tests put NaN and inf there.
    t = np.where(vis[..., None], np.tanh(q[:, :, None, :] + k[:, None, :, :]), dtype.type(0))
    vv_kept = np.where(vis.any(1)[..., None], vv, dtype.type(0))
    s = c * (t @ w)
    if a.bias is not None:
        s = s + np.where(vis, _flat(a.bias, batch + (lq, lk)).astype(dtype), dtype.type(0))
    s = np.where(vis, s, -np.inf).astype(dtype)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, dtype.type(0))
    e = np.where(vis, np.exp(s - m), dtype.type(0))
    l = e.sum(-1, keepdims=True)
    p = np.where(l > 0, e / np.where(l > 0, l, dtype.type(1)), dtype.type(0))
    o = p @ vv_kept
    dp = do @ np.swapaxes(vv_kept, -1, -2)
    delta = (do * o).sum(-1, keepdims=True)
    ds = np.where(vis, p * (dp - delta), dtype.type(0))
    dt = c * w * (1 - t * t)
    dq = np.einsum("bij,bija->bia", ds, dt)
    dk_items = np.einsum("bij,bija->bja", ds, dt)
    dv_items = np.swapaxes(p, -1, -2) @ do
    dva = c * np.einsum("bij,bija->a", ds, t)

    def per_kv_item(x):
        return x.reshape((-1, g) + x.shape[1:]).sum(1)

    grads = {
        "dq": dq.reshape(batch + (lq, hidden)),
        "dk": per_kv_item(dk_items).reshape(kv_batch + (lk, hidden)),
        "dv": per_kv_item(dv_items).reshape(kv_batch + (lk, dv)),
        "dscores": ds.reshape(batch + (lq, lk)),
        "dv_a": dva,
    }
    if dtype != np.float64:
        return grads, None
    # Term sizes: |dS| bounded by P (|dO| |V| + |dO . O| + |dP - delta| (|s| + |lse|)), the last term
    # for P's own rounding (exp of s - lse), then carried through each gradient's sum.
    lse = np.where(np.isfinite(m), m + np.log(np.where(l > 0, l, 1.0)), 0.0)
    s_abs = abs(c) * (np.abs(t) @ np.abs(w))
    ds_abs = p * (_finite_abs(do) @ np.swapaxes(_finite_abs(vv_kept), -1, -2) + np.abs(delta)
                  + np.abs(dp - delta) * (s_abs + np.abs(lse) + 1))
    ds_abs = np.where(vis, ds_abs, 0.0)
    dq_terms = np.einsum("bij,a->bia", ds_abs, abs(c) * np.abs(w))
    dk_terms = per_kv_item(np.einsum("bij,a->bja", ds_abs, abs(c) * np.abs(w)))
    sizes = {
        "dq": float(dq_terms.max(initial=0.0)) or 1.0,
        "dk": float(dk_terms.max(initial=0.0)) or 1.0,
        "dv": float(per_kv_item(np.swapaxes(p, -1, -2) @ np.abs(do)).max(initial=0.0)) or 1.0,
        "dscores": float(ds_abs.max(initial=0.0)) or 1.0,
        "dv_a": float((abs(c) * np.einsum("bij,bija->a", ds_abs, np.abs(t))).max(initial=0.0)) or 1.0,
    }
    return grads, sizes


def kernel_backward(qp, kp, v, va, dout, *, want_dscores=True, **kw):
    """Forward through attnfast.attention (out, lse), then `_core.attention_backward` with the operands
    the forward's kernel got. Outputs start as NaN: every element must be written."""
    kw = dict(method="additive", w_q=None, w_k=None, v_a=va, **kw)
    out, lse = attnfast.attention(qp, kp, v, return_lse=True, **kw)
    a = _inputs.check_attention(qp, kp, v, return_lse=True, **kw)
    qq, kk, vv, kernel_scale, v_a = _api._kernel_operands(a)
    batch, kv_batch = a.batch_shape, a.kv_batch_shape
    full = batch + (a.lq, a.lk)
    mask = None if a.mask is None else np.broadcast_to(a.mask, full)
    bias = None if a.bias is None else _api._kernel_layout(np.broadcast_to(a.bias, full))
    lengths = None if a.kv_lengths is None else np.ascontiguousarray(np.broadcast_to(a.kv_lengths, batch),
                                                                     dtype=np.int64)
    t = a.compute
    hidden = qq.shape[-1]
    grads = {
        "dq": np.full(batch + (a.lq, hidden), np.nan, t),
        "dk": np.full(kv_batch + (a.lk, hidden), np.nan, t),
        "dv": np.full(kv_batch + (a.lk, a.dv), np.nan, t),
        "dscores": np.full(full, np.nan, t) if want_dscores else None,
        "dv_a": np.full(hidden, np.nan, t),
    }
    dout_k = np.ascontiguousarray(np.broadcast_to(dout, batch + (a.lq, a.dv)), dtype=t)
    _core.attention_backward(qq, kk, vv, out, dout_k, lse, grads["dq"], grads["dk"], grads["dv"],
                             grads["dscores"], grads["dv_a"], list(batch), list(kv_batch), a.group,
                             kernel_scale, mask, bias, lengths, a.causal, a.diagonal_offset, a.window_left,
                             a.window_right, v_a, **_api._serving_kernel_args(a, forward=False))
    return a, grads, lse


def check_against_oracle(qp, kp, v, va, dout, dtype, **kw):
    a, got, lse = kernel_backward(qp, kp, v, va, dout, **kw)
    ref, sizes = oracle(a, qp, kp, v, va, dout, np.float64)
    naive, _ = oracle(a, qp, kp, v, va, dout, dtype)
    for name, value in got.items():
        assert_close_to_reference(value, ref[name], naive[name], dtype, scale=sizes[name], what=name)
    return a, got, lse


def inputs(rng, dtype, batch, lq, lk, hidden, dv, kv_batch=None, va_scale=1.0):
    kv_batch = batch if kv_batch is None else kv_batch
    qp = rng.standard_normal(batch + (lq, hidden)).astype(dtype)
    kp = rng.standard_normal(kv_batch + (lk, hidden)).astype(dtype)
    v = rng.standard_normal(kv_batch + (lk, dv)).astype(dtype)
    va = (va_scale * rng.standard_normal(hidden) / np.sqrt(hidden)).astype(dtype)
    dout = rng.standard_normal(batch + (lq, dv)).astype(dtype)
    return qp, kp, v, va, dout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 3, 17, 256])
@pytest.mark.parametrize("lq,lk", [(1, 1), (2, 40), (40, 97), (97, 2)])
def test_matches_the_formulas(isa, rng, dtype, hidden, lq, lk):
    qp, kp, v, va, dout = inputs(rng, dtype, (2,), lq, lk, hidden, 19, va_scale=3.0)
    check_against_oracle(qp, kp, v, va, dout, dtype, scale=0.8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_size_beyond_one_sum_block(isa, rng, dtype):
    # More than kVectorSumBlock = 1024 features: the score is summed as a tree of blocks, as the forward.
    qp, kp, v, va, dout = inputs(rng, dtype, (1,), 3, 5, 1100, 4)
    check_against_oracle(qp, kp, v, va, dout, dtype)


MASKINGS = {
    "causal_top_left": dict(causal=True),
    "causal_bottom_right": dict(causal=True, causal_align="bottom_right"),
    "window": dict(window=(3, 1)),
    "window_causal": dict(window=(4, 0), causal=True, causal_align="bottom_right"),
    "kv_lengths": dict(kv_lengths=np.array([0, 1, 7, 40])),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk", [(17, 40), (40, 17)])
@pytest.mark.parametrize("masking", sorted(MASKINGS))
def test_visible_ranges(isa, rng, dtype, lq, lk, masking):
    kw = dict(MASKINGS[masking])
    if "kv_lengths" in kw:
        kw["kv_lengths"] = np.minimum(kw["kv_lengths"], lk)
    qp, kp, v, va, dout = inputs(rng, dtype, (4,), lq, lk, 17, 9)
    check_against_oracle(qp, kp, v, va, dout, dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bool_mask_and_bias(isa, rng, dtype):
    qp, kp, v, va, dout = inputs(rng, dtype, (3,), 40, 33, 17, 8)
    mask = rng.random((3, 40, 33)) < 0.6
    mask[1, 5] = False  # a row that sees no key
    bias = rng.standard_normal((3, 40, 33)).astype(dtype)
    bias[rng.random(bias.shape) < 0.2] = -np.inf  # -inf hides the key, as the mask does
    bias[2, 7] = -np.inf  # another row that sees no key
    a, got, lse = check_against_oracle(qp, kp, v, va, dout, dtype, mask=mask, bias=bias)
    for b, i in [(1, 5), (2, 7)]:
        assert lse[b, i] == -np.inf
        assert np.all(got["dq"][b, i] == 0) and np.all(got["dscores"][b, i] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_bias_and_key_mask(isa, rng, dtype):
    qp, kp, v, va, dout = inputs(rng, dtype, (2, 3), 9, 20, 17, 8)
    key_mask = rng.random((2, 1, 1, 20)) < 0.7
    per_key_bias = rng.standard_normal((20,)).astype(dtype)
    check_against_oracle(qp, kp, v, va, dout, dtype, mask=key_mask, bias=per_key_bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 1), (1, 3)])  # GQA, MQA, one query head over three kv heads
def test_grouped_and_broadcast_heads(isa, rng, dtype, hq, hk):
    lq, lk, hidden, dv = 11, 23, 17, 5
    qp = rng.standard_normal((2, hq, lq, hidden)).astype(dtype)
    kp = rng.standard_normal((2, hk, lk, hidden)).astype(dtype)
    v = rng.standard_normal((2, hk, lk, dv)).astype(dtype)
    va = rng.standard_normal(hidden).astype(dtype)
    dout = rng.standard_normal((2, max(hq, hk), lq, dv)).astype(dtype)
    a, got, _ = check_against_oracle(qp, kp, v, va, dout, dtype, causal=True, kv_lengths=np.array([[lk], [9]]))
    assert a.group == (hq // hk if hq >= hk else 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_kv_items_get_their_own_rows(isa, rng, dtype):
    # k and v broadcast over the batch axis (stride 0): each kv item of the broadcast gets its own
    # gradient rows (the Python layer sums them), computed from its own query item only.
    qp, kp, v, va, dout = inputs(rng, dtype, (3,), 7, 12, 17, 6, kv_batch=(1,))
    kp, v = np.broadcast_to(kp, (3, 12, 17)), np.broadcast_to(v, (3, 12, 6))
    a, got, _ = check_against_oracle(qp, kp, v, va, dout, dtype)
    assert got["dk"].shape == (3, 12, 17) and not np.array_equal(got["dk"][0], got["dk"][1])


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_keys_contribute_nothing(isa, rng, dtype, garbage):
    """Garbage in every key a row cannot see (past kv_lengths, masked, -inf bias) changes no gradient
    bit: those keys are skipped, never multiplied by a zero weight. Their own dk and dv rows are 0."""
    b, lq, lk, hidden, dv = 3, 20, 30, 17, 9
    qp, kp, v, va, dout = inputs(rng, dtype, (b,), lq, lk, hidden, dv)
    lengths = np.array([0, 11, 30])
    mask = np.ones((b, 1, lk), bool)
    mask[:, :, 4] = False
    bias = np.zeros((lk,), dtype)
    bias[20] = -np.inf
    kw = dict(kv_lengths=lengths, mask=mask, bias=bias)
    _, clean, _ = kernel_backward(qp, kp, v, va, dout, **kw)
    dirty_k, dirty_v = kp.copy(), v.copy()
    for item, n in enumerate(lengths):
        dirty_k[item, n:] = garbage
        dirty_v[item, n:] = garbage
    for j in (4, 20):
        dirty_k[:, j] = garbage
        dirty_v[:, j] = garbage
    _, dirty, _ = kernel_backward(qp, dirty_k, dirty_v, va, dout, **kw)
    for name in clean:
        assert np.array_equal(clean[name], dirty[name]), name
        assert np.isfinite(dirty[name]).all(), name
    for item, n in enumerate(lengths):
        hidden_keys = sorted(set(range(n, lk)) | {4, 20})
        assert np.all(dirty["dk"][item, hidden_keys] == 0) and np.all(dirty["dv"][item, hidden_keys] == 0)
    assert np.all(dirty["dq"][0] == 0)  # kv_lengths 0: no row of item 0 sees a key
    check_against_oracle(qp, kp, v, va, dout, dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_visible_keys_read_nothing(isa, rng, dtype):
    """A row that sees no key (masked whole, or kv_lengths 0) has zero gradients whatever its query and
    its dO hold: NaN there changes no bit of any gradient."""
    qp, kp, v, va, dout = inputs(rng, dtype, (2,), 9, 12, 17, 5)
    mask = np.ones((2, 9, 12), bool)
    mask[1, 3] = False
    kw = dict(mask=mask, kv_lengths=np.array([0, 12]))
    _, clean, _ = kernel_backward(qp, kp, v, va, dout, **kw)
    dirty_q, dirty_dout = qp.copy(), dout.copy()
    dirty_q[0], dirty_dout[0] = np.nan, np.nan
    dirty_q[1, 3], dirty_dout[1, 3] = np.nan, np.nan
    _, dirty, _ = kernel_backward(dirty_q, kp, v, va, dirty_dout, **kw)
    for name in clean:
        assert np.array_equal(clean[name], dirty[name]), name
    assert np.all(dirty["dq"][0] == 0) and np.all(dirty["dq"][1, 3] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_with_infinite_lse(isa, rng, dtype):
    """A +inf bias saturates its row: the forward weighs the +inf keys 1/count each, lse is +inf, and
    the backward gives dS = 0 for the row (no dq, dk, dv_a contribution) and dV = P^T dO."""
    lq, lk, hidden, dv = 4, 6, 17, 5
    qp, kp, v, va, dout = inputs(rng, dtype, (1,), lq, lk, hidden, dv)
    bias = np.zeros((1, lq, lk), dtype)
    bias[0, 1, [2, 5]] = np.inf
    _, got, lse = kernel_backward(qp, kp, v, va, dout, bias=bias)
    assert lse[0, 1] == np.inf
    assert np.all(got["dq"][0, 1] == 0) and np.all(got["dscores"][0, 1] == 0)
    # Without row 1, the other rows' gradients; row 1 only adds dO_1 / 2 to dv rows 2 and 5.
    others = np.ones((1, lq, lk), bool)
    others[0, 1] = False
    dout_others = dout.copy()
    dout_others[0, 1] = 0
    _, rest, _ = kernel_backward(qp, kp, v, va, dout_others, mask=others)
    expected_dv = rest["dv"].astype(np.float64)
    expected_dv[0, [2, 5]] += dout[0, 1].astype(np.float64) / 2
    # Row 1's share is added between rows 0 and 2, not last: equal up to the rounding of that order.
    assert_close_fixed(got["dv"], expected_dv, dtype, scale=np.abs(expected_dv).max(), what="dv")
    for name in ("dk", "dv_a"):
        np.testing.assert_array_equal(got[name], rest[name], err_msg=name)


@pytest.mark.parametrize("batch,lq,lk", [((0,), 5, 6), ((2,), 0, 6), ((2,), 5, 0)])
def test_empty_calls_write_zeros(isa, rng, batch, lq, lk):
    """No query, no key or no batch item: no pair contributes, every gradient that exists is 0."""
    qp, kp, v, va, dout = inputs(rng, np.float32, batch, lq, lk, 17, 4)
    _, got, _ = kernel_backward(qp, kp, v, va, dout)
    for name, value in got.items():
        assert np.all(value == 0), name


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_unprojected_sixteen_bit_keys_are_widened(isa, rng, dtype):
    """Additive scores with w_k=None over 16-bit keys: the kernels (forward and backward) take kp in
    the compute type, so the keys are widened like a projection, never read as a 16-bit cache (they
    were, and the forward then computed dot-product scores)."""
    qp, kp, v = (rng.standard_normal(shape).astype(dtype) for shape in [(2, 5, 8), (2, 6, 8), (2, 6, 3)])
    va = rng.standard_normal(8).astype(np.float32)
    kw = dict(method="additive", w_q=None, w_k=None, v_a=va)
    got = attnfast.attention(qp, kp, v, **kw)
    assert got.dtype == dtype
    assert_close_fixed(got, reference.attention(qp, kp, v, **kw), dtype, scale=_finite_abs(v).max())
    a = _inputs.check_attention(qp, kp, v, **kw)
    assert _api._kernel_operands(a)[1].dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_dscores(isa, rng, dtype):
    qp, kp, v, va, dout = inputs(rng, dtype, (2,), 13, 21, 17, 7)
    _, with_ds, _ = kernel_backward(qp, kp, v, va, dout, causal=True)
    _, without, _ = kernel_backward(qp, kp, v, va, dout, causal=True, want_dscores=False)
    assert without["dscores"] is None
    for name in ("dq", "dk", "dv", "dv_a"):
        np.testing.assert_array_equal(with_ds[name], without[name], err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_schedules_sum_in_the_same_order(isa, rng, dtype):
    """Nine kv items run as one task each, one kv item as key-block then query-block tasks (the kernel
    chooses by the number of kv items): every dq, dk, dv and dS element is summed in the same order
    either way, so the items agree bitwise; dv_a is grouped into other partials (equal to rounding)."""
    qp, kp, v, va, dout = inputs(rng, dtype, (9, 2), 21, 70, 17, 6, kv_batch=(9, 1))
    bias = rng.standard_normal((9, 2, 21, 70)).astype(dtype)
    bias[0, 1, 3, [5, 66]] = np.inf  # one row with lse +inf, across two key blocks
    kw = dict(causal=True, causal_align="bottom_right", bias=bias)
    _, whole, _ = kernel_backward(qp, kp, v, va, dout, **kw)
    dva_items = np.zeros_like(whole["dv_a"], dtype=np.float64)
    for item in range(9):
        _, one, _ = kernel_backward(qp[item:item + 1], kp[item:item + 1], v[item:item + 1], va,
                                    dout[item:item + 1], **dict(kw, bias=bias[item:item + 1]))
        for name in ("dq", "dk", "dv", "dscores"):
            assert np.array_equal(one[name][0], whole[name][item]), (item, name)
        dva_items += one["dv_a"]
    assert_close_fixed(whole["dv_a"], dva_items, dtype, scale=np.abs(dva_items).max(), what="dv_a")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batches", [2, 5])  # 4 kv items: key-block and query-block tasks; 10: one per item
def test_bitwise_identical_for_any_thread_count(isa, rng, dtype, batches, threads):
    qp, kp, v, va, dout = inputs(rng, dtype, (batches, 4), 40, 97, 33, 20, kv_batch=(batches, 2))
    mask = rng.random((batches, 4, 40, 97)) < 0.8
    results = []
    for n in (1, 2, 3, 5):
        attnfast.set_num_threads(n)
        results.append(kernel_backward(qp, kp, v, va, dout, mask=mask)[1])
    for other in results[1:]:
        for name in results[0]:
            assert np.array_equal(results[0][name], other[name]), name
