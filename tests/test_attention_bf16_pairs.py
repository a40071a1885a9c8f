"""bfloat16 attention through the tiled path, where the avx512bf16 target runs both products on vdpbf16ps.

On that target (kernels/attention_tiles_bf16.h) bfloat16 q, k and v take a different product code than
the widening path of every other target: queries packed as feature pairs, K broadcast in place (an odd
depth's last feature alone), P rounded to bfloat16 and packed as key pairs with l summing the rounded P,
V packed per tile as key pairs (an odd key count padded with zeros). These tests give that code the
shapes that reach it -- more than 16 query rows per kv head, so not the row-wise path -- with odd and
awkward sizes, every mask, the careful pass, the key split, lse and weights, and hold the results to the
float64 reference with the tolerance table (conftest.py: for bfloat16 results, twice the error of the
computation in bfloat16 as PyTorch's math SDPA does it, plus one bfloat16 ulp). Through the `isa`
fixture they run on every target, so every target is held to the same bounds on these shapes.
"""

import ml_dtypes
import numpy as np
import pytest

import attnfast
from conftest import ISAS, check_attention, up

BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16(rng, *shape):
    return rng.standard_normal(shape).astype(BF16)


def qkv(rng, batch, lq, lk, d, dv=None, kv_batch=None):
    kv_batch = batch if kv_batch is None else kv_batch
    return bf16(rng, *batch, lq, d), bf16(rng, *kv_batch, lk, d), bf16(rng, *kv_batch, lk, d if dv is None else dv)


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_avx512bf16_is_the_default_target_where_the_cpu_has_the_instruction():
    flags = cpu_flags()
    if not {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_bf16"} <= flags:
        pytest.skip("this CPU has no AVX512_BF16 (the emulated build offers the target on AVX2)")
    # Only the amx target (AMX-BF16 tiles, where the CPU and OS allow them, or the model build) ranks higher.
    assert ISAS[0] == "avx512bf16" or ISAS[:2] == ["amx", "avx512bf16"], f"usable targets, best first: {ISAS}"


# (batch, lq, lk, d, dv): the depth odd and even (the last feature pair of an odd depth is broadcast
# alone), key counts around the tile of 64 and odd (the last key pair padded), a depth past the chain of
# 512 products, value widths that are not whole microkernel blocks.
SHAPES = [
    ((2, 3), 50, 130, 64, 40),
    ((1,), 49, 97, 1, 1),
    ((1,), 20, 65, 3, 5),
    ((2,), 97, 63, 17, 17),
    ((1,), 33, 64, 63, 65),
    ((1,), 48, 2, 65, 33),
    ((1,), 17, 1, 97, 97),
    ((1,), 40, 1025, 16, 24),
    ((1,), 18, 70, 1100, 8),
]


@pytest.mark.parametrize("batch,lq,lk,d,dv", SHAPES)
def test_sizes(isa, rng, batch, lq, lk, d, dv):
    q, k, v = qkv(rng, batch, lq, lk, d, dv)
    out = check_attention(q, k, v, dtype=BF16, what=f"{batch} lq={lq} lk={lk} d={d} dv={dv}")[0]
    assert out.dtype == BF16


def _masked_case(rng, case):
    if case == "causal_top_left":
        return qkv(rng, (2,), 100, 100, 32), {"causal": True}
    if case == "causal_bottom_right":
        return qkv(rng, (2,), 60, 151, 32), {"causal": True, "causal_align": "bottom_right"}
    if case == "window":  # rows start at odd keys: tiles that begin with an odd key
        return qkv(rng, (2,), 90, 90, 16), {"window": (17, 2)}
    if case == "kv_lengths":  # odd lengths: the last key pair of a row's tiles is padded
        return qkv(rng, (3,), 40, 97, 16), {"kv_lengths": np.array([97, 33, 0])}
    if case == "mask":
        (q, k, v) = qkv(rng, (2,), 50, 80, 16)
        mask = rng.random((2, 50, 80)) < 0.6
        mask[:, 7] = False
        return (q, k, v), {"mask": mask}
    if case == "key_padding_mask":
        (q, k, v) = qkv(rng, (2,), 50, 80, 16)
        mask = np.ones((2, 1, 80), bool)
        mask[0, :, 61:] = False
        return (q, k, v), {"mask": mask}
    if case == "bias":
        (q, k, v) = qkv(rng, (2,), 50, 80, 16)
        bias = rng.standard_normal((50, 80)).astype(np.float32)
        bias[3, ::3] = -np.inf
        return (q, k, v), {"bias": bias}
    if case == "gqa":
        return qkv(rng, (2, 4), 30, 70, 16, kv_batch=(2, 2)), {"causal": True}
    if case == "strided":
        q, k, v = qkv(rng, (2,), 50, 70, 16)
        return (q.transpose(0, 2, 1).copy().transpose(0, 2, 1), k[:, ::-1], v[:, ::-1]), {}
    if case == "key_split":  # one query block over many keys: chunks merged by log-sum-exp
        return qkv(rng, (1,), 48, 3000, 64), {}
    raise ValueError(case)


MASKED = ["causal_top_left", "causal_bottom_right", "window", "kv_lengths", "mask", "key_padding_mask", "bias",
          "gqa", "strided", "key_split"]


@pytest.mark.parametrize("case", MASKED)
def test_masks_split_lse_and_weights(isa, rng, case):
    (q, k, v), kw = _masked_case(rng, case)
    # check_attention: out, lse and weights against the reference; rows without a visible key give
    # out 0, lse -inf, weights 0; hidden keys weigh exactly 0.
    check_attention(q, k, v, dtype=BF16, what=case, **kw)


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
def test_hidden_garbage_never_reaches_visible_rows(isa, rng, garbage):
    # An odd kv length pairs the last visible key with the first hidden one in memory, and a window makes
    # tiles begin at odd keys: neither may let a hidden key's K or V meet a visible row, not even as 0 * NaN.
    q, k, v = qkv(rng, (2,), 50, 90, 17, 9)
    lengths = np.array([41, 6])
    mask = np.ones((50, 90), bool)
    mask[:, 5] = False
    past_lengths = np.arange(90) >= lengths[:, None]
    for kw, hidden in (({"kv_lengths": lengths, "mask": mask}, past_lengths | ~mask[0]),
                       ({"kv_lengths": lengths, "window": (7, 0)}, past_lengths)):
        dirty_k, dirty_v = k.copy(), v.copy()
        dirty_k[hidden] = garbage
        dirty_v[hidden] = garbage
        clean = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
        dirty = attnfast.attention(q, dirty_k, dirty_v, return_lse=True, return_weights=True, **kw)
        for c, d in zip(clean, dirty):
            assert np.array_equal(c, d), f"hidden {garbage} changed the result ({sorted(kw)})"
        assert np.all(np.isfinite(up(dirty[0])))


def test_visible_non_finite_values_and_infinite_scores(isa, rng):
    # The careful pass: a visible NaN in V makes its rows NaN, an infinite V entry their column infinite
    # or NaN as in the reference, and +inf scores (here from the bias) share their row evenly.
    q, k, v = qkv(rng, (2,), 40, 100, 16, 8)
    v[0, 30, 2] = np.nan
    v[1, 70, 5] = np.inf
    bias = np.zeros((2, 40, 100), np.float32)
    bias[1, 10, [3, 50]] = np.inf
    check_attention(q, k, v, dtype=BF16, what="careful", bias=bias)


def test_the_row_sum_adds_the_rounded_probabilities(isa, rng):
    # P is rounded to bfloat16 before P.V on the avx512bf16 target; l must add those same rounded values,
    # so that the output stays a convex combination of V rows. A constant V column then comes out as that
    # constant to float32 rounding, while a sum of the unrounded P would scale it by sum P / sum round(P):
    # here every key of the second tile has P = exp(0.296875) = 1.3457, which rounds to 1.34375 (the
    # running max stays at the first tile's 1), 8e-4 off for the whole row.
    lq, lk = 20, 128
    q = np.ones((lq, 1), BF16)
    k = np.where(np.arange(lk) < 64, 1.0, 1.296875).reshape(lk, 1).astype(BF16)
    v = rng.standard_normal((lk, 4)).astype(BF16)
    v[:, 1] = 0.7734375
    out = np.empty((lq, 4), np.float32)
    attnfast.attention(q, k, v, scale=1.0, out=out)
    # 2e-5: FIXED's float32 rtol (conftest.py); the float32 path's own error here is ~7e-7.
    np.testing.assert_allclose(out[:, 1], 0.7734375, rtol=2e-5, atol=0)
