"""The three stages on their own, float32: attnfast vs PyTorch vs NumPy.

scores (64,512,64)·(64,512,64)ᵀ, softmax over (64,512,512), aggregate (64,512,512)@(64,512,64).
"""

import pytest

from attnfast.bench.cases import stage_cases

STAGES = {case.stage: case for case in stage_cases()}


@pytest.mark.parametrize("impl", ["attnfast", "torch", "numpy"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage(run_case, stage, impl):
    run_case(impl, STAGES[stage])
