"""The serving suite's rows as pytest-benchmark groups: one group per case, one benchmark per variant.

Cases and calls are those of ``python -m attnfast bench --serving`` (:mod:`attnfast.bench.serving`):
varlen against the padded batch (attnfast and PyTorch SDPA), paged decode (block sizes 16 and 128)
against the contiguous cache, int8 decode against float32, softcap / ALiBi / sinks against the plain
call. Each variant's first call is checked against the float64 reference before it is timed: a missing
feature errors, a build that ignores an argument fails, neither gets a time. The command times the
variants of a case interleaved and reports the goals; this file tracks each one across commits.

    pytest benchmarks/bench_serving.py --benchmark-enable
"""

from __future__ import annotations

import pytest

from attnfast.bench.serving import default_serving_cases
from attnfast.bench.serving_run import FEATURE_TOLERANCE, OutputCheck

CASES = default_serving_cases()


def _id(case, variant) -> str:
    shape = getattr(case, "shape", None)
    return "-".join([case.kind] + (["x".join(map(str, shape))] if shape else []) + [variant.name])


PARAMS = [pytest.param(case, variant, id=_id(case, variant)) for case in CASES for variant in case.variants()]

_inputs = {}  # one set of inputs per case (the decode caches take seconds to build)


def _case_inputs(case):
    if case not in _inputs:
        _inputs.clear()  # the cases run in order: keep one case's arrays alive at a time
        inputs = case.make_inputs()
        _inputs[case] = (inputs, OutputCheck(case, inputs))
    return _inputs[case]


@pytest.mark.parametrize("case, variant", PARAMS)
def test_serving(benchmark, implementations, case, variant):
    impl = implementations[variant.impl]
    if not impl.available():
        pytest.skip(f"{impl.label} not available ({impl.error})")
    inputs, check = _case_inputs(case)
    run, to_checked = case.prepare(variant, inputs, impl)
    err = check.error(variant, to_checked(run()))  # also the call outside the timings
    assert err <= FEATURE_TOLERANCE, f"{variant.label}: {err:.2e} from the float64 reference"
    benchmark.group = case.name
    benchmark.extra_info.update({"variant": variant.name, "label": variant.label, "max_rel_err": err})
    benchmark(run)
