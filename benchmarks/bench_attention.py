"""Fused attention: the five shapes of the fused-attention issue and a sequence-length sweep.

One ``benchmark.group`` per shape, so ``--benchmark-group-by=group`` (the default) prints one table per
shape with every implementation side by side.
"""

import pytest

from attnfast.bench.cases import DEFAULT_SHAPES, SWEEP_B_H_D, SWEEP_FULL, AttentionCase

IMPLS = ["attnfast", "torch", "onnxruntime", "jax", "numpy"]

SHAPES = [pytest.param(AttentionCase(*shape, label=label), id="x".join(map(str, shape)))
          for shape, label in DEFAULT_SHAPES]

_B, _H, _D = SWEEP_B_H_D
SWEEP = [pytest.param(AttentionCase(_B, _H, n, n, _D, group="sweep"), id=f"L{n}") for n in SWEEP_FULL]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SHAPES)
def test_attention(run_case, case, impl):
    run_case(impl, case)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SHAPES[:2])
def test_attention_causal(run_case, case, impl):
    run_case(impl, case, causal=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SWEEP)
def test_attention_sweep(run_case, case, impl):
    run_case(impl, case)
