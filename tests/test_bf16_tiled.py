"""bfloat16 Q, K and V through the fused attention's tiled path, on every SIMD target.

Query blocks of more than 16 rows per kv item take the tiled path (attention_tiled.h), where targets with
bfloat16 hardware run both products on it: vdpbf16ps on the avx512bf16 target, AMX tiles on the amx
target (on the scalar model of the tile operations in the ATTNFAST_AMX_MODEL test build:
tools/amx_model.sh). Those paths pack the queries and P as bfloat16 pairs, pad the depth, the keys and
the value features to whole tiles, round P to bfloat16 and apply the scale after the product, so the
shapes here put every edge of those tiles in play: depths and value widths around 16 and 32, key
counts that leave partial tiles, blocks of 17 to 48 queries, masks that hide whole tiles, the key split
and its merge, the weights pass, and the careful pass for non-finite values. Everything is held to the
float64 reference on the same bfloat16 values with the one tolerance table (conftest.check_attention).
"""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import attnfast
from conftest import BFLOAT16, check_attention, poisoned_kv, random_qkv, relayout, up

BF16 = np.dtype(ml_dtypes.bfloat16)


def qkv(rng, batch, lq, lk, d, dv=None, kv_batch=None):
    return random_qkv(rng, (BF16, BF16, BF16), batch, lq, lk, d, dv=dv, kv_batch=kv_batch)


# (lq, lk, d, dv): depth and value width on both sides of 16 and 32 and odd; keys leaving partial tiles of
# 16 and 64; 17..48 queries (one block, partly empty C tiles) and several blocks.
SHAPES = [
    (17, 1, 1, 1),
    (17, 2, 3, 5),
    (24, 17, 16, 16),
    (40, 33, 31, 17),
    (48, 64, 32, 32),
    (49, 65, 33, 63),
    (64, 97, 63, 65),
    (97, 130, 65, 97),
    (33, 200, 97, 33),
    (50, 129, 128, 128),
]


@pytest.mark.parametrize("lq,lk,d,dv", SHAPES)
def test_shapes(isa, rng, lq, lk, d, dv):
    q, k, v = qkv(rng, (2,), lq, lk, d, dv)
    check_attention(q, k, v, dtype=BFLOAT16, what=f"bf16 tiled {lq}x{lk} d={d} dv={dv}")


@pytest.mark.parametrize("case", ["causal_top_left", "causal_bottom_right", "window", "kv_lengths", "mask",
                                  "key_mask", "bias", "gqa", "strided", "scale"])
def test_masks_and_layouts(isa, rng, case):
    lq, lk, d = 45, 77, 40
    if case == "gqa":
        q, k, v = qkv(rng, (2, 4), lq, lk, d, 24, kv_batch=(2, 2))
    else:
        q, k, v = qkv(rng, (3,), lq, lk, d, 24)
    kw = {}
    if case == "causal_top_left":
        kw = {"causal": True}
    elif case == "causal_bottom_right":
        kw = {"causal": True, "causal_align": "bottom_right"}
    elif case == "window":
        kw = {"window": (20, 3)}
    elif case == "kv_lengths":
        kw = {"kv_lengths": np.array([77, 19, 0])}
    elif case == "mask":
        mask = rng.random((3, lq, lk)) < 0.5
        mask[:, 7] = False  # a row with no visible key
        mask[:, :, 64:] = False  # a key tile hidden from every row
        kw = {"mask": mask}
    elif case == "key_mask":
        mask = np.ones((3, 1, lk), bool)
        mask[1, :, 3:70] = False
        kw = {"mask": mask}
    elif case == "bias":
        bias = rng.standard_normal((lq, lk)).astype(np.float32)
        bias[2, ::5] = -np.inf
        kw = {"bias": bias}
    elif case == "strided":
        q, k, v = relayout(q, "transposed"), relayout(k, "every_other_col"), relayout(v, "negative")
    elif case == "scale":
        kw = {"scale": 0.3}  # not a power of two
    check_attention(q, k, v, dtype=BFLOAT16, what=f"bf16 tiled {case}", **kw)


def test_key_split_and_merge(isa, rng):
    # One block of queries over many keys: the keys are split into chunks, merged by log-sum-exp, and the
    # weights pass runs from the merge.
    q, k, v = qkv(rng, (1,), 40, 2100, 64, 48)
    check_attention(q, k, v, dtype=BFLOAT16, what="bf16 tiled key split", causal=True, causal_align="bottom_right")


@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_hidden_non_finite_values_stay_hidden(isa, rng, garbage):
    # Non-finite K and V past kv_lengths and at masked keys never reach a visible row (the careful pass
    # runs for blocks whose rows went non-finite).
    q, k, v = qkv(rng, (2,), 30, 90, 20, 20)
    lengths = np.array([70, 5])
    mask = np.ones((30, 90), bool)
    mask[:, 9] = False
    dirty_k, dirty_v = poisoned_kv(k, v, lengths, 9, garbage)
    kw = {"kv_lengths": lengths, "mask": mask}
    clean = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
    dirty = attnfast.attention(q, dirty_k, dirty_v, return_lse=True, return_weights=True, **kw)
    for c, x in zip(clean, dirty):
        assert np.array_equal(c, x), f"hidden {garbage} changed the result"
    check_attention(q, k, v, dtype=BFLOAT16, what=f"bf16 tiled hidden {garbage} (clean inputs)", **kw)


def test_visible_infinite_value_reaches_its_column_only(isa, rng):
    q, k, v = qkv(rng, (1,), 20, 40, 8, 6)
    v[0, 13, 2] = np.inf
    out = up(attnfast.attention(q, k, v))
    assert np.all(np.isposinf(out[0, :, 2])), "every row sees key 13, whose feature 2 is +inf"
    others = np.delete(out[0], 2, axis=-1)
    assert np.all(np.isfinite(others)), "the other features stay finite"


_PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import attnfast, ml_dtypes, numpy as np
    from attnfast import reference
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 40, 24)).astype(ml_dtypes.bfloat16) for _ in range(3))
    out = attnfast.attention(q, k, v, causal=True, out=np.empty((2, 40, 24), np.float32))
    r = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    err = float(np.max(np.abs(out - r)))
print(json.dumps({"caps": attnfast.capabilities(), "err": err,
                  "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
"""


def test_env_selects_the_amx_target_or_falls_back():
    # ATTNFAST_ISA=amx: the amx target where it is usable (AMX-BF16 and the OS's permission, or the model
    # build), otherwise a RuntimeWarning and the best usable target.
    caps = attnfast.capabilities()
    if "amx" not in caps["compiled_isas"]:
        pytest.skip("this build has no amx target")
    env = dict(os.environ, ATTNFAST_ISA="amx")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(attnfast.__file__)),
                                                    env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    runtime = [msg for cat, msg in res["warnings"] if cat == "RuntimeWarning"]
    if "amx" in caps["isas"]:
        assert res["caps"]["isa"] == "amx" and res["caps"]["isas"][0] == "amx" and not runtime
    else:
        assert res["caps"]["isa"] == caps["isas"][0]
        assert len(runtime) == 1 and "ATTNFAST_ISA=amx" in runtime[0] and "not supported" in runtime[0]
    # bfloat16 inputs, float32 out: P rounded to bfloat16 (2^-9) bounds the error well below 1e-2.
    assert res["err"] < 1e-2
