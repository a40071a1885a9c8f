"""The ``python -m attnfast bench`` command: arguments, the JSON report, the plot, missing peers.

Runs tiny shapes with attnfast and NumPy only (no peer is imported, so these tests need none installed
and stay fast); the ``--backward`` tests also run PyTorch when it is installed and expect its rows to be
left out when it is not.  Nothing here asserts on a time: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from attnfast.bench import cli, peers
from attnfast.bench.cases import (AttentionCase, case_from_dict, default_cases, make_attention_inputs,
                                  parse_shape, stage_cases)
from attnfast.bench.memory import reset_peak_rss
from attnfast.bench.peers import INSTALL_HINTS, all_impls

TINY = "1,2,16,24,8"
DECODE = "2,2,1,40,16"
FAST = ["--no-progress", "--quick", "--threads", "1", "--impl", "attnfast", "--impl", "numpy"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run shared by the report tests: a compute-bound and a memory-bound shape, with memory."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("bench") / "run.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["--shape", TINY, "--shape", DECODE, "--json", str(path), *FAST]) == 0
    with open(path) as f:
        return buf.getvalue(), json.load(f)


@pytest.fixture(scope="module")
def tiny_report(tiny_run):
    return tiny_run[1]


@pytest.fixture(scope="module")
def tiny_text(tiny_run):
    return tiny_run[0]


# -- argument parsing ---------------------------------------------------------------------------------
def test_parse_shape_accepts_five_integers():
    case = parse_shape("8,8,512,512,64")
    assert case.shape == (8, 8, 512, 512, 64)
    assert case.flops() == 4 * 8 * 8 * 512 * 512 * 64


@pytest.mark.parametrize("bad", ["8,8,512,64", "8,8,512,512,64,1", "a,b,c,d,e", "0,1,1,1,1"])
def test_bad_shape_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--shape", bad])
    assert exc.value.code == 2
    assert "--shape" in capsys.readouterr().err


def test_options_parse():
    args = cli.build_parser().parse_args(["--quick", "--shape", TINY, "--shape", DECODE, "--dtype",
                                          "float64", "--threads", "2", "--causal", "--json", "a.json",
                                          "--plot", "a.png"])
    assert args.quick and args.causal
    assert [c.shape for c in args.shape] == [(1, 2, 16, 24, 8), (2, 2, 1, 40, 16)]
    assert (args.dtype, args.threads, args.json, args.plot) == ("float64", 2, "a.json", "a.png")


@pytest.mark.parametrize("argv", [["--dtype", "int8"], ["--threads", "0"], ["--threads", "x"]])
def test_invalid_options_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_dtype_option_takes_the_four_storage_types(dtype):
    assert cli.build_parser().parse_args(["--dtype", dtype]).dtype == dtype


@pytest.mark.parametrize("bad", ["bf16", "fp16", "half", "float128", "int16", "Float16"])
def test_bad_dtype_is_a_usage_error_listing_the_choices(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--dtype", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --dtype: invalid choice: '{bad}'" in err
    assert "'float32', 'float64', 'bfloat16', 'float16'" in err


def test_default_suite_has_the_issue_shapes_sweep_and_stages():
    full = [c.shape for c in default_cases(quick=False)]
    for shape in [(8, 8, 512, 512, 64), (1, 8, 4096, 4096, 64), (64, 1, 40, 50, 256),
                  (64, 1, 1, 50, 256), (1, 32, 1, 4096, 128)]:
        assert shape in full
    sweep = sorted(c.Lk for c in default_cases(quick=False) if "sweep" in c.group)
    assert sweep == [256, 512, 1024, 2048, 4096, 8192]
    assert len([c for c in default_cases(quick=True) if "sweep" in c.group]) < len(sweep)
    assert [s.stage for s in stage_cases()] == ["scores", "softmax", "aggregate"]


def test_cases_round_trip_through_json():
    for case in default_cases(quick=True, dtype="float16") + stage_cases():
        assert case_from_dict(json.loads(json.dumps(case.to_dict()))) == case


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_suites_add_the_float32_query_decode_shapes(dtype):
    for quick in (True, False):
        mixed = [(c.shape, c.q_dtype) for c in default_cases(quick, dtype) if c.q_dtype]
        assert mixed == [((1, 32, 1, 4096, 128), "float32"), ((64, 1, 1, 50, 256), "float32")]
        # The all-16-bit decode shapes stay: the two runs differ only in q's dtype.
        shapes = [c.shape for c in default_cases(quick, dtype) if not c.q_dtype]
        assert shapes == [c.shape for c in default_cases(quick)]
    assert not any(c.q_dtype for c in default_cases(quick=False, dtype="float32"))
    assert not any(c.q_dtype for c in default_cases(quick=False, dtype="float64"))


def test_float32_query_over_a_16_bit_cache_counts_its_bytes_per_operand():
    case = AttentionCase(1, 32, 1, 4096, 128, q_dtype="float32")
    kv = 2 * 32 * 4096 * 128
    q_and_out = 2 * 32 * 1 * 128
    assert case.bytes_moved(2) == kv * 2 + q_and_out * 4  # K, V in 16 bits; q and the float32 output
    assert case.bytes_moved(2, q_itemsize=4) == case.bytes_moved(2)
    assert AttentionCase(1, 32, 1, 4096, 128).bytes_moved(2) == (kv + q_and_out) * 2
    assert case.output_bytes(2) == 32 * 128 * 4
    assert case.name.endswith("q=float32") and case.name != AttentionCase(1, 32, 1, 4096, 128).name
    q, k, v = make_attention_inputs(AttentionCase(1, 2, 1, 8, 4, q_dtype="float32"), np.float16)
    assert (q.dtype, k.dtype, v.dtype) == (np.float32, np.float16, np.float16)


def test_decode_shapes_are_memory_bound():
    assert AttentionCase(64, 1, 1, 50, 256).memory_bound
    assert not AttentionCase(8, 8, 512, 512, 64).memory_bound


# -- the report -----------------------------------------------------------------------------------------
def test_json_schema(tiny_report):
    r = tiny_report
    assert r["schema"] == "attnfast-bench/2"
    for key in ("cpu", "cores", "threads", "attnfast", "versions", "memory_available_bytes"):
        assert key in r["machine"]
    assert r["machine"]["attnfast"].get("isa"), r["machine"]["attnfast"]
    assert r["machine"]["versions"]["numpy"]
    assert r["config"]["threads"] == 1 and r["config"]["dtype"] == "float32"
    assert r["probes"]["fma_peak_flops_per_s"] > 0
    assert r["probes"]["fma_measured"]["source"]
    assert r["probes"]["read_bandwidth"] and r["probes"]["read_bandwidth"][0]["bytes_per_s"] > 0
    assert set(r["implementations"]) == {"attnfast", "numpy"}
    assert [res["bound"] for res in r["results"]] == ["compute", "memory"]
    for res in r["results"]:
        assert res["flops"] > 0 and res["bytes"] > 0
        rows = {row["impl"]: row for row in res["rows"]}
        assert set(rows) == {"attnfast", "numpy"}
        for row in rows.values():
            assert row["skipped"] is None
            assert row["median_s"] > 0 and len(row["times_s"]) == row["repeats"] >= 3
            assert row["min_s"] == min(row["times_s"]) and row["max_s"] == max(row["times_s"])
            assert row["min_s"] <= row["q1_s"] <= row["median_s"] <= row["q3_s"] <= row["max_s"]
            for key in ("gflops", "gbps", "pct_of_limit", "speedup_vs_numpy", "max_abs_err"):
                assert isinstance(row[key], float), key
            assert row["max_abs_err"] < 1e-4
            assert "peak_extra_bytes" in row
        assert rows["numpy"]["speedup_vs_numpy"] == pytest.approx(1.0)
        # No peer was run, so there is no best peer to compare with.
        assert res["best_peer"] is None and rows["attnfast"]["speedup_vs_best_peer"] is None


def test_text_report_has_machine_facts_and_a_table_per_shape(capsys):
    assert cli.main(["--shape", TINY, "--no-memory", *FAST]) == 0
    out = capsys.readouterr().out
    assert "CPU" in out and "ISA in use" in out and "FMA peak" in out
    assert "attention B=1 H=2 Lq=16 Lk=24 D=8" in out
    assert "GFLOP/s" in out and "× NumPy" in out and "max |err|" in out


def test_float64_and_causal_run(tmp_path):
    path = tmp_path / "r.json"
    assert cli.main(["--shape", TINY, "--dtype", "float64", "--causal", "--no-memory", "--json", str(path),
                     *FAST]) == 0
    report = json.loads(path.read_text())
    assert report["config"]["dtype"] == "float64" and report["config"]["causal"]
    for row in report["results"][0]["rows"]:
        assert row["max_abs_err"] < 1e-10


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_plot_writes_a_png(tmp_path, dtype):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    assert cli.main(["--shape", "1,2,32,32,8", "--shape", "1,2,64,64,8", "--dtype", dtype, "--plot", str(path),
                     *FAST]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_peer_is_reported_with_install_hint(monkeypatch, capsys, tmp_path):
    # A None entry in sys.modules makes "import jax" raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "jax", None)
    path = tmp_path / "r.json"
    assert cli.main(["--shape", TINY, "--no-memory", "--json", str(path), *FAST, "--impl", "jax"]) == 0
    out = capsys.readouterr().out
    assert "not found" in out and INSTALL_HINTS["jax"] in out
    report = json.loads(path.read_text())
    assert "jax" in report["missing"] and report["missing"]["jax"]["install"] == INSTALL_HINTS["jax"]
    assert all(row["impl"] != "jax" for row in report["results"][0]["rows"])


def test_every_peer_has_an_install_hint():
    for impl in all_impls():
        if impl.name != "numpy":
            assert impl.name in INSTALL_HINTS


def test_progress_bar_or_lines_do_not_break_the_run(capsys):
    argv = [a for a in FAST if a != "--no-progress"]
    assert cli.main(["--shape", TINY, "--no-memory", *argv]) == 0
    assert "Lq=16" in capsys.readouterr().out


def test_module_entry_point_dispatches_bench():
    proc = subprocess.run([sys.executable, "-m", "attnfast", "bench", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--shape" in proc.stdout and "--json" in proc.stdout


def test_short_calls_are_warmed_before_each_timed_call_and_long_ones_are_not(monkeypatch):
    from attnfast.bench import timing

    monkeypatch.setattr(timing, "SETTLE_S", 0.0)
    monkeypatch.setattr(timing, "START_SETTLE_S", 0.0)
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1

    def long():
        calls["long"] += 1
        timing.time.sleep(0.03)  # well above rewarm_below_s below

    policy = timing.TimingPolicy(warmup=1, rewarm_s=0.002, rewarm_below_s=0.01, min_repeats=3, max_repeats=3,
                                 budget_s=0.0, floor_repeats=3, cap_s=60.0)
    times = timing.time_interleaved({"short": short, "long": long}, policy)
    assert len(times["short"]) == len(times["long"]) == 3
    assert calls["long"] == 1 + 3  # the warm-up call and the timed calls only
    assert calls["short"] > 1 + 2 * 3  # at least one untimed call before each timed one (2 ms of them)


@pytest.mark.parametrize("flags, vendor, family, expected", [
    (["avx", "avx2", "fma"], "GenuineIntel", 6, 32),               # Haswell .. : 2 x 8-lane FMA
    (["avx", "avx2", "fma", "avx512f"], "GenuineIntel", 6, 64),    # Skylake-SP and later: 2 x 16 lanes
    (["avx", "avx2", "fma", "avx512f"], "AuthenticAMD", 25, 32),   # Zen 4: 512-bit FMA on 256-bit pipes
    (["avx", "avx2", "fma", "avx512f"], "AuthenticAMD", 26, 64),   # Zen 5: full 512-bit pipes
    (["avx", "avx2", "fma"], "AuthenticAMD", 25, 32),              # Zen 3
    (["sse2"], None, None, 8),                                     # no FMA: 4 lanes, mul and add pipes
])
def test_spec_flops_per_cycle_knows_zen4_runs_avx512_at_half_rate(flags, vendor, family, expected):
    from attnfast.bench.machine import flops_per_cycle_per_core

    assert flops_per_cycle_per_core(flags, 4, vendor, family) == expected
    assert flops_per_cycle_per_core(flags, 8, vendor, family) == expected // 2


def test_run_summary_spec_peak_uses_the_cpu_vendor_and_family(monkeypatch):
    from attnfast.bench import machine, runner

    zen4 = {"model": "AMD EPYC", "vendor": "AuthenticAMD", "family": 25, "flags": ["avx2", "fma", "avx512f"],
            "mhz": 2600.0, "max_mhz": None}
    monkeypatch.setattr(machine, "cpu_info", lambda: dict(zen4))
    sample = {"flops_per_s": 2.3e11, "source": "attnfast._attnfast.probe_fma_peak"}
    peaks = runner._summarise_peaks(runner.BenchConfig(cases=[], threads=1), {"mhz": 2600.0, "max_mhz": None},
                                    [sample])
    assert peaks["fma_theoretical"]["flops_per_cycle_per_core"] == 32


# -- 16-bit runs ----------------------------------------------------------------------------------------
#: Largest error of a float32 computation rounded once to the dtype, for outputs of magnitude <= ~2
#: (half an ulp at 2: 2^-7 for bfloat16's 8-bit significand, 2^-10 for float16's 11 bits), with margin.
HALF_OUTPUT_ERROR = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}


def _half_dtype(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_run(request, tmp_path_factory):
    """A tiny 16-bit run (attnfast, its float32 baseline, NumPy), with peak memory: (dtype, text, report)."""
    _half_dtype(request.param)
    path = tmp_path_factory.mktemp("bench16") / "run.json"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["--dtype", request.param, "--shape", TINY, "--shape", DECODE, "--json", str(path),
                         *FAST]) == 0
    with open(path) as f:
        return request.param, buf.getvalue(), json.load(f)


def test_half_run_names_the_dtype_in_every_table(half_run):
    dtype, text, report = half_run
    assert report["config"]["dtype"] == dtype
    assert f"dtype      {dtype}" in text
    titles = [line for line in text.splitlines() if line.startswith("attention ")]
    assert len(titles) == 2 and all(f"[{dtype}, 1 threads]" in t for t in titles), titles
    assert f"Summary: attnfast {dtype} vs its own float32 and the peers in {dtype}" in text
    assert all(res["dtype"] == dtype for res in report["results"])


def test_half_run_times_attnfast_float32_as_a_same_run_baseline(half_run):
    dtype, text, report = half_run
    assert "attnfast float32 (baseline)" in text and "× af f32" in text
    assert set(report["implementations"]) == {"attnfast", "attnfast-float32", "numpy"}
    for res in report["results"]:
        rows = {row["impl"]: row for row in res["rows"]}
        base, numpy_row = rows["attnfast-float32"], rows["numpy"]
        assert base["output_dtype"] == "float32" and base["max_abs_err"] < 1e-5
        assert base["speedup_vs_attnfast_float32"] == pytest.approx(1.0)
        # The baseline is another dtype: it is no peer and no NumPy row to compare with.
        assert base["speedup_vs_numpy"] is None and base["speedup_vs_best_peer"] is None
        assert (numpy_row["speedup_vs_attnfast_float32"]
                == pytest.approx(base["median_s"] / numpy_row["median_s"]))
        # The baseline reads and writes float32: twice the bytes of the 16-bit rows.
        assert base["bytes"] == pytest.approx(2 * numpy_row["bytes"])
        assert base["peak_extra_bytes"] is not None


def test_half_run_numpy_row_computes_in_float32_and_rounds_once(half_run):
    dtype, text, report = half_run
    assert (f"NumPy (float32 math): converts the 16-bit inputs to float32 and rounds the result to {dtype}, "
            "in the timed call") in text
    for res in report["results"]:
        row = {r["impl"]: r for r in res["rows"]}["numpy"]
        assert row["label"] == "NumPy (float32 math)" and row["output_dtype"] == dtype
        assert 0 < row["max_abs_err"] < HALF_OUTPUT_ERROR[dtype]


def test_half_run_measures_attnfast_in_the_16_bit_dtype(half_run):
    dtype, text, report = half_run
    for res in report["results"]:
        rows = {r["impl"]: r for r in res["rows"]}
        row = rows["attnfast"]
        assert row["skipped"] is None and row["label"] == "attnfast"
        # One rounding of a float32 result: within the dtype's half ulp, as NumPy's float32-then-round.
        assert row["output_dtype"] == dtype and 0 < row["max_abs_err"] < HALF_OUTPUT_ERROR[dtype]
        assert row["speedup_vs_attnfast_float32"] == pytest.approx(rows["attnfast-float32"]["median_s"]
                                                                    / row["median_s"])
        assert row["bytes"] == rows["numpy"]["bytes"]  # 16-bit K/V/q/out


class _Float32Only(peers.Impl):
    """A peer that takes one dtype for q, k and v, and only float32: TypeError otherwise."""

    name = "torch"  # counted as a peer
    label = "float32-only peer"

    def __init__(self):
        super().__init__()
        self.q_dtypes = []

    def prepare_attention(self, case, q, k, v, causal):
        self.q_dtypes.append(q.dtype)
        if k.dtype != np.float32:
            raise TypeError(f"float32-only peer takes float32, got {k.dtype}")
        return (lambda: peers.numpy_attention(q, k, v, causal)), np.asarray


def test_a_peer_raising_type_error_is_reported_unsupported_and_the_run_goes_on(monkeypatch, capsys):
    fake = _Float32Only()
    monkeypatch.setattr(peers, "all_impls", lambda threads=None, dtype=None: [peers.NumpyImpl(), fake])
    assert cli.main(["--dtype", "float16", "--shape", TINY, "--no-memory", "--no-progress", "--quick",
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert ("float32-only peer: n/a in float16 (unsupported: TypeError: float32-only peer takes float32, "
            "got float16)") in out
    assert "NumPy (float32 math)" in out  # measured as usual


def test_a_peer_needing_one_dtype_gets_q_converted_and_says_so():
    fake = _Float32Only()
    case = AttentionCase(1, 2, 1, 8, 4, q_dtype="float32")
    inputs = make_attention_inputs(case, np.float16)
    assert fake.input_note(case, inputs) == ("q converted to float16 before timing "
                                             "(needs one dtype for q, k and v)")
    with pytest.raises(TypeError, match="float32-only peer takes float32, got float16"):
        fake.prepare(case, inputs, causal=False)
    assert fake.q_dtypes == [np.float16]
    # attnfast takes the float32 q as it is.
    assert peers.AttnfastImpl().input_note(case, inputs) is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float32_query_decode_case_runs_against_the_reference(dtype):
    """The mixed case through the whole runner: attnfast takes the float32 q and returns float32, the
    float32 reference on the same 16-bit K/V values agrees to float32 accuracy; NumPy promotes too."""
    from attnfast.bench.runner import BenchConfig, run_benchmark

    _half_dtype(dtype)
    case = AttentionCase(2, 2, 1, 40, 16, label="decode", q_dtype="float32")
    report = run_benchmark(BenchConfig(cases=[case], dtype=dtype, threads=1, quick=True,
                                       measure_memory=False, progress=False, only=["attnfast", "numpy"]))
    (res,) = report["results"]
    rows = {r["impl"]: r for r in res["rows"]}
    assert res["q_dtype"] == "float32" and set(rows) == {"attnfast", "attnfast-float32", "numpy"}
    for row in rows.values():
        assert row["skipped"] is None and row["output_dtype"] == "float32" and row["max_abs_err"] < 1e-6
    assert rows["attnfast"]["note"] is None
    assert rows["numpy"]["note"] == "converts the 16-bit inputs to float32, in the timed call"
    # q and the output in float32, K and V in 16 bits; the baseline's K and V in float32.
    assert rows["attnfast"]["bytes"] == case.bytes_moved(2)
    assert rows["attnfast-float32"]["bytes"] == case.bytes_moved(4)


def test_torch_tensors_share_the_16_bit_buffers():
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    impl = peers.TorchImpl()
    assert impl.available()
    for dtype, tdtype in ((ml_dtypes.bfloat16, torch.bfloat16), (np.float16, torch.float16)):
        a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(dtype)
        t = impl._tensor(a)
        assert t.dtype == tdtype and t.data_ptr() == a.ctypes.data
        back = impl._to_numpy(t * 2)
        assert back.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(back.astype(np.float32), 2 * a.astype(np.float32))


def test_fma_peak_of_a_half_run_is_the_float32_one(half_run):
    _, text, report = half_run
    assert report["probes"]["fma_dtype"] == "float32"
    assert "(float32 FMA)" in text


def test_a_stage_the_library_has_no_runner_for_is_skipped_as_such_not_as_a_dtype(monkeypatch):
    from attnfast.bench.cases import StageCase
    from attnfast.bench.runner import BenchConfig, run_benchmark

    class NoFloat16(peers.Impl):
        name, label = "jax", "no-float16 peer"

        def dtype_unsupported(self, dtype):
            return f"no {np.dtype(dtype).name} here"

    monkeypatch.setattr(peers, "all_impls", lambda threads=None, dtype=None: [NoFloat16()])
    cases = [StageCase("softmax", 2, 8, 8, 4), AttentionCase(1, 1, 4, 4, 4)]
    report = run_benchmark(BenchConfig(cases=cases, dtype="float16", threads=1, quick=True,
                                       measure_memory=False, progress=False))
    stage_row, attention_row = (res["rows"][0] for res in report["results"])
    assert (stage_row["skipped"], stage_row["unsupported"]) == ("stage not benchmarked for this library", False)
    assert (attention_row["skipped"], attention_row["unsupported"]) == ("no float16 here", True)


# -- the backward suite (--backward) ---------------------------------------------------------------------
BACKWARD_FAST = ["--backward", "--no-progress", "--quick", "--threads", "1"]


def _has_attnfast_backward() -> bool:
    import attnfast
    from attnfast import _attnfast
    return hasattr(attnfast, "attention_backward") and hasattr(_attnfast, "attention_backward")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _expected_backward_impls():
    """The implementations whose rows a run has here: a missing peer's rows are dropped."""
    return {name for name, present in (("attnfast", _has_attnfast_backward()), ("torch", _has_torch()))
            if present}


@pytest.fixture(scope="module")
def backward_report(tmp_path_factory):
    """``bench --backward --shape TINY --causal``: its text and its JSON report."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("bwd") / "bwd.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main([*BACKWARD_FAST, "--shape", TINY, "--causal", "--json", str(path)]) == 0
    with open(path) as f:
        return buf.getvalue(), json.load(f)


def test_backward_options_parse_and_reject_what_they_cannot_run(capsys):
    assert cli.build_parser().parse_args(["--backward"]).backward
    assert not cli.build_parser().parse_args([]).backward
    for argv, message in ((["--plot", "a.png"], "--plot is not available with --backward"),
                          (["--dtype", "float64"], "--backward runs float32 and bfloat16; got --dtype float64")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["--backward", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_backward_default_suite_has_the_issue_rows():
    from attnfast.bench.backward import MEMORY_CASE, default_backward_cases

    rows = [(c.kind, c.shape, c.causal, c.dtype) for c in default_backward_cases()]
    for shape, causal in (((8, 8, 512, 512, 64), False), ((1, 8, 2048, 2048, 64), False),
                          ((1, 8, 2048, 2048, 64), True), ((64, 1, 40, 50, 256), False)):
        assert ("fwdbwd", shape, causal, "float32") in rows
    assert ("fwdbwd", (8, 8, 512, 512, 64), False, "bfloat16") in rows
    assert ("bwd", (1, 8, 4096, 4096, 64), False, "float32") in rows
    assert ("additive", (64, 40, 50, 256, 256), False, "float32") in rows  # (B, Lq, Lk, D, A)
    assert MEMORY_CASE.shape == (1, 2, 32768, 32768, 64) and MEMORY_CASE.kind == "fwdbwd"
    assert MEMORY_CASE.gradient_bytes() == 3 * 32768 * 2 * 64 * 4  # dq, dk, dv in float32: 48 MiB


def test_backward_flops_count_five_products_and_the_forward_two():
    from attnfast.bench.backward import BackwardCase

    work = 2 * 8 * 8 * 512 * 512 * 64
    assert BackwardCase("bwd", 8, 8, 512, 512, 64).flops() == 10 * work // 2
    assert BackwardCase("fwdbwd", 8, 8, 512, 512, 64).flops() == 14 * work // 2
    assert BackwardCase("additive", 64, 1, 40, 50, 256, A=256).flops() is None
    # Causal rows count the pairs they see: the top-left triangle, and whole rows past Lk.
    assert BackwardCase("bwd", 1, 2, 4, 4, 8, causal=True).flops() == 10 * 2 * (1 + 2 + 3 + 4) * 8
    assert BackwardCase("bwd", 1, 1, 5, 3, 8, causal=True).flops() == 10 * (1 + 2 + 3 + 3 + 3) * 8
    with pytest.raises(ValueError, match="kind must be one of fwdbwd, bwd, additive; got 'forward'"):
        BackwardCase("forward", 1, 1, 1, 1, 1)


def test_backward_run_report_and_json(backward_report):
    text, report = backward_report
    assert report["schema"] == "attnfast-bench-backward/1"
    assert report["config"]["threads"] == 1 and report["config"]["backward"]
    assert report["probes"]["fma_peak_flops_per_s"] > 0
    assert report["memory"] is None  # --shape runs have no memory row
    assert [(res["kind"], res["causal"]) for res in report["results"]] == [("fwdbwd", True), ("bwd", True)]
    expected = _expected_backward_impls()
    for res in report["results"]:
        rows = {r["impl"]: r for r in res["rows"]}
        assert set(rows) == expected
        for row in rows.values():
            assert row["skipped"] is None, row
            assert row["median_s"] > 0 and len(row["times_s"]) == row["repeats"] >= 3
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
            assert row["gflops"] > 0 and row["pct_of_peak"] > 0
            if res["reference_note"] is None:
                assert row["max_rel_err"] < 1e-5, row
        if "torch" in expected:  # SDPA's own fused CPU backward, named so the comparison is clear
            assert rows["torch"]["note"].startswith("autograd node ScaledDotProduct"), rows["torch"]["note"]
        if {"attnfast", "torch"} <= expected:
            assert rows["attnfast"]["speedup_vs_torch"] == pytest.approx(rows["torch"]["median_s"]
                                                                          / rows["attnfast"]["median_s"])
    assert "forward+backward B=1 H=2 Lq=16 Lk=24 D=8 causal float32" in text
    assert "Summary: attnfast backward vs PyTorch autograd" in text
    assert "≥ 1.5× PyTorch" in text and "≥ 60% peak" in text
    assert "load avg" in text


def test_backward_missing_peers_are_named_and_their_rows_dropped(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # "import torch" raises ImportError
    path = tmp_path / "r.json"
    assert cli.main([*BACKWARD_FAST, "--shape", TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["missing"]["torch"]["install"] == INSTALL_HINTS["torch"]
    assert "not found  PyTorch SDPA" in out and INSTALL_HINTS["torch"] in out
    if not _has_attnfast_backward():
        assert "attention_backward" in report["missing"]["attnfast"]["error"]
    for res in report["results"]:
        assert {r["impl"] for r in res["rows"]} == _expected_backward_impls() - {"torch"}
        assert res["goal"]["value"] is None or "attnfast" in {r["impl"] for r in res["rows"]}


def test_backward_additive_and_bfloat16_rows_through_the_runner():
    from attnfast.bench.backward import BackwardCase
    from attnfast.bench.backward_run import BackwardConfig, run_backward_benchmark

    pytest.importorskip("ml_dtypes")
    additive = BackwardCase("additive", 10, 1, 5, 7, 12, A=6, label="tiny additive")
    half = BackwardCase("fwdbwd", 1, 2, 16, 24, 8, dtype="bfloat16")
    report = run_backward_benchmark(BackwardConfig(cases=[additive, half], threads=1, quick=True,
                                                   memory_case=None, progress=False))
    res_add, res_half = report["results"]
    assert res_add["gradient_bytes"] == (10 * (5 + 2 * 7) * 12 + 2 * 6 * 12 + 2 * 6) * 4
    for res, tolerance in ((res_add, 1e-5), (res_half, 2.0 ** -6)):
        rows = {r["impl"]: r for r in res["rows"]}
        assert set(rows) == _expected_backward_impls()
        for row in rows.values():
            if row["unsupported"]:
                continue  # an implementation without this dtype says so; the others are measured
            assert row["skipped"] is None and row["median_s"] > 0, row
            if res["reference_note"] is None:
                assert row["max_rel_err"] < tolerance, row
    assert res_add["goal"]["least"] == 5.0 and res_add["goal"]["metric"] == "speedup_vs_torch"
    assert res_half["goal"] is None  # the issue's goals are for float32
    assert all(r["gflops"] is None for r in res_add["rows"] if r.get("median_s"))


def test_backward_goal_is_judged_on_attnfasts_row():
    from attnfast.bench.backward import BackwardCase
    from attnfast.bench.backward_run import _derive

    case = BackwardCase("bwd", 1, 1, 100, 100, 10)  # 1e6 FLOPs
    res = {"rows": [{"impl": "attnfast", "median_s": 1e-3}, {"impl": "torch", "median_s": 4e-3}]}
    _derive(res, case, peak=2e9)
    own = res["rows"][0]
    assert own["gflops"] == pytest.approx(1.0) and own["pct_of_peak"] == pytest.approx(50.0)
    assert own["speedup_vs_torch"] == pytest.approx(4.0)
    assert res["goal"] == {"metric": "pct_of_peak", "least": 60.0, "value": own["pct_of_peak"], "met": False}


@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_backward_memory_child_measures_one_call_against_gradients_plus_64_mib():
    from attnfast.bench.backward import BackwardCase, backward_impls
    from attnfast.bench.backward_run import MEMORY_SLACK_BYTES, _memory_result

    case = BackwardCase("fwdbwd", 1, 2, 300, 300, 16, label="memory")
    impls = [i for i in backward_impls() if i.available()]
    mem = _memory_result(case, impls, threads=1)
    assert mem["limit_bytes"] == case.gradient_bytes() + MEMORY_SLACK_BYTES
    assert {r["impl"] for r in mem["rows"]} == _expected_backward_impls()
    for row in mem["rows"]:
        assert row["note"] is None, row
        assert row["peak_rss_delta_bytes"] is not None and row["within_limit"], row
        assert row["beyond_gradients_bytes"] == row["peak_rss_delta_bytes"] - case.gradient_bytes()
        assert row["seconds"] > 0


# -- the serving suite (--serving) ------------------------------------------------------------------------
SERVING_FAST = ["--serving", "--no-progress", "--quick", "--threads", "1"]


def _tiny_serving_cases():
    """Every kind of serving case at a size that runs in milliseconds (awkward lengths on purpose)."""
    from attnfast.bench import serving

    return [serving.VarlenCase(sequences=4, min_len=1, max_len=9, H=2, D=8),
            serving.PagedDecodeCase(B=2, H=2, Lk=48, D=8, block_sizes=(16, 48)),
            serving.Int8DecodeCase(B=2, H=2, Lk=40, D=8),
            serving.ModifierCase(B=1, H=2, L=24, D=8)]


@pytest.fixture(scope="module")
def serving_report(tmp_path_factory):
    """``bench --serving --quick`` on the tiny cases: exit status, text and JSON report."""
    import contextlib
    import io

    from attnfast.bench import serving

    path = tmp_path_factory.mktemp("srv") / "srv.json"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr(serving, "default_serving_cases", _tiny_serving_cases)
        status = cli.main([*SERVING_FAST, "--json", str(path)])
    with open(path) as f:
        return status, buf.getvalue(), json.load(f)


@pytest.mark.parametrize("option, argv", [("--backward", ["--backward"]), ("--plot", ["--plot", "a.png"]),
                                          ("--shape", ["--shape", TINY]), ("--causal", ["--causal"]),
                                          ("--dtype", ["--dtype", "bfloat16"])])
def test_serving_rejects_the_options_of_the_other_suites(option, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--serving", *argv])
    assert exc.value.code == 2
    assert f"{option} is not available with --serving (its cases are the issue's rows)" in capsys.readouterr().err


def test_serving_default_suite_has_the_issue_rows():
    from attnfast.bench import serving

    cases = serving.default_serving_cases()
    varlen = cases[0]
    assert (varlen.kind, varlen.sequences, varlen.min_len, varlen.max_len, varlen.H, varlen.D) == \
        ("varlen", 32, 16, 512, 8, 64)
    lengths = varlen.lengths()
    assert lengths.min() >= 16 and lengths.max() <= 512
    np.testing.assert_array_equal(lengths, serving.VarlenCase().lengths())  # a fixed seed
    assert [(g.subject, g.baseline, g.bound) for g in varlen.goals()] == [("varlen", "padded", 1.5),
                                                                           ("varlen", "torch_padded", 2.5)]
    decode = [(c.kind, c.shape) for c in cases if c.kind in ("paged", "int8")]
    assert decode == [(kind, shape) for kind in ("paged", "int8")
                      for shape in ((1, 32, 1, 4096, 128), (8, 8, 1, 8192, 128))]
    for case in cases:
        if case.kind == "paged":
            assert case.block_sizes == (16, 128)
            assert [(g.subject, g.baseline, g.bound) for g in case.goals()] == [
                ("paged16", "contiguous", 0.9), ("paged128", "contiguous", 0.9)]
        if case.kind == "int8":
            assert [(g.subject, g.baseline, g.bound, g.metric) for g in case.goals()] == [
                ("int8", "float32", 2.5, "speedup"), ("int8", "naive float32", 2.0, "error_ratio")]
    modifiers = cases[-1]
    assert (modifiers.B, modifiers.H, modifiers.L, modifiers.L, modifiers.D) == (8, 8, 512, 512, 64)
    assert [(g.subject, g.baseline, g.bound) for g in modifiers.goals()] == [
        (name, "plain", 0.85) for name in ("softcap", "alibi", "sinks")]


def test_serving_paged_cache_holds_key_j_at_its_block_table_entry():
    from attnfast.bench.serving import paged_cache, shuffled_block_table

    rng = np.random.default_rng(3)
    cache = rng.standard_normal((3, 2, 40, 5)).astype(np.float32)
    table = shuffled_block_table(3, 40, 8, rng)
    pages = paged_cache(cache, table)
    assert pages.shape == (15, 2, 8, 5) and table.shape == (3, 5) and table.dtype == np.int32
    assert sorted(table.ravel()) == list(range(15))  # every page used once
    assert not np.array_equal(table.ravel(), np.arange(15))  # shuffled
    for b in range(3):
        for j in range(40):
            np.testing.assert_array_equal(pages[table[b, j // 8], :, j % 8], cache[b, :, j])
    with pytest.raises(ValueError, match="block_size 16 does not divide the cache length 40"):
        shuffled_block_table(3, 40, 16, rng)


def test_serving_alibi_slopes_are_the_papers_geometric_series():
    from attnfast.bench.serving import alibi_slopes

    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])


def test_serving_modifiers_change_the_result_far_beyond_the_feature_tolerance():
    """An attnfast that ignored a modifier would fail the reference check, not report the plain time."""
    from attnfast.bench.serving import ModifierCase
    from attnfast.bench.serving_run import FEATURE_TOLERANCE, _relative_error

    case = ModifierCase(B=1, H=2, L=64, D=16)
    inputs = case.make_inputs()
    plain = case.reference(inputs, "plain")
    for name in ("softcap", "alibi", "sinks"):
        assert _relative_error(case.reference(inputs, name), plain) > 100 * FEATURE_TOLERANCE, name


def test_serving_run_measures_every_row_and_judges_every_goal(serving_report):
    status, text, report = serving_report
    assert report["schema"] == "attnfast-bench-serving/1"
    assert report["config"]["threads"] == 1 and report["config"]["serving"]
    assert report["machine"]["threads_per_impl"]["attnfast"] == 1
    assert report["machine"]["cpu"]
    assert report["not_measured"] == [] and status == 0, report["not_measured"]
    assert [res["kind"] for res in report["results"]] == ["varlen", "paged", "int8", "modifier"]
    for res in report["results"]:
        for row in res["rows"]:
            if row["impl"] == "torch" and not _has_torch():
                assert row["skipped"].startswith("not measured: PyTorch SDPA not available"), row
                continue
            assert row["skipped"] is None, row
            assert row["min_s"] <= row["median_s"] <= row["max_s"] and len(row["times_s"]) == row["repeats"] >= 3
            assert row["max_rel_err"] <= 1e-4, row
            if res["kind"] in ("paged", "int8"):
                assert row["gbps"] > 0 and row["pct_of_read_bandwidth"] > 0, row
            else:
                assert row["gflops"] > 0, row
        for goal in res["goals"]:
            if goal["baseline"] == "torch_padded" and not _has_torch():
                assert goal["value"] is None and goal["met"] is None
                continue
            assert goal["value"] > 0 and goal["met"] in (True, False), goal
            if goal["metric"] == "speedup":
                assert goal["min"] <= goal["max"]
    int8 = report["results"][2]
    assert int8["naive_float32_error"] > 0
    rows = {r["variant"]: r for r in int8["rows"]}
    q_and_out = 2 * 2 * 2 * 8 * 4  # (B, H, 1, D) float32, read and written
    assert rows["int8"]["bytes"] == 2 * 2 * 2 * 40 * (8 + 4) + q_and_out  # 1-byte K/V + a float32 scale per row
    assert rows["float32"]["bytes"] == 2 * 2 * 2 * 40 * 8 * 4 + q_and_out
    error_goal = int8["goals"][1]
    assert error_goal["value"] == pytest.approx(rows["int8"]["max_rel_err"] / int8["naive_float32_error"])
    assert "Summary: the serving goals" in text and "int8 vs float32" in text
    # Only the goal against PyTorch's padded call can go unmeasured, and only without PyTorch.
    assert ("NOT MEASURED" in text) == (not _has_torch()), text


def test_serving_a_missing_or_ignored_feature_is_not_measured(monkeypatch, capsys):
    """No number for a row whose feature is absent, or accepted but not computed: exit status 1."""
    import attnfast
    from attnfast.bench import serving

    real_attention = attnfast.attention

    def ignores_softcap(*args, softcap=None, **kwargs):
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(attnfast, "attention", ignores_softcap)
    monkeypatch.delattr(attnfast, "attention_varlen", raising=False)
    monkeypatch.setattr(serving, "default_serving_cases", lambda: [serving.VarlenCase(sequences=3, max_len=9,
                                                                                        min_len=2, H=1, D=4),
                                                                   serving.ModifierCase(B=1, H=2, L=32, D=8)])
    assert cli.main([*SERVING_FAST, "--impl", "attnfast"]) == 1
    out = capsys.readouterr().out
    assert ("varlen (attnfast attention_varlen (packed)): not measured (needs attnfast.attention_varlen): "
            "AttributeError: module 'attnfast' has no attribute 'attention_varlen'") in out
    assert ("softcap (attnfast, softcap=5): not measured (needs attention(softcap=)): its result differs from "
            "the float64 reference by") in out
    assert "NOT MEASURED: 2 attnfast row(s):" in out


def test_serving_without_torch_leaves_its_row_out_and_still_succeeds(monkeypatch, capsys):
    from attnfast.bench import serving

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(serving, "default_serving_cases",
                        lambda: [serving.VarlenCase(sequences=2, min_len=3, max_len=5, H=1, D=4)])
    assert cli.main(SERVING_FAST) == 0  # an optional peer missing is not a failure
    out = capsys.readouterr().out
    assert "not found  PyTorch SDPA" in out and INSTALL_HINTS["torch"] in out
    assert "torch_padded (PyTorch SDPA, padded + bool mask): not measured: PyTorch SDPA not available" in out
    assert "varlen vs torch_padded" in out and "NOT MEASURED" in out  # the goal that needs it


# -- python -m attnfast: the command table ----------------------------------------------------------------
def test_help_lists_every_command_with_its_summary_on_one_line():
    from attnfast.__main__ import COMMANDS

    proc = subprocess.run([sys.executable, "-m", "attnfast", "--help"], capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert set(COMMANDS) >= {"bench", "demo", "config"}
    for name, cmd in COMMANDS.items():
        assert any(line.split() == [name, *cmd.summary.split()] for line in lines), (name, proc.stdout)


def test_bare_call_prints_the_help_to_stderr_with_status_2(capsys):
    from attnfast.__main__ import COMMANDS, main

    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: python -m attnfast")
    assert all(cmd.summary in err for cmd in COMMANDS.values())


def test_help_option_exits_0_and_unknown_command_exits_2(capsys):
    from attnfast.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "commands:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["benhc"])
    assert exc.value.code == 2
    assert "invalid choice: 'benhc' (choose from 'bench', 'demo', 'config'" in capsys.readouterr().err


def _fake_command(argv):
    print("fake got", list(argv))
    return 3


def test_a_command_is_one_table_line_listed_and_dispatched_with_its_arguments(monkeypatch, capsys):
    import attnfast.__main__ as entry

    monkeypatch.setitem(entry.COMMANDS, "fake", entry.Command("a command added in one line",
                                                              f"{__name__}:_fake_command"))
    with pytest.raises(SystemExit):
        entry.main(["-h"])
    assert "a command added in one line" in capsys.readouterr().out
    assert entry.main(["fake", "-h", "--x", "1"]) == 3  # "-h" after the command is the command's
    assert capsys.readouterr().out == "fake got ['-h', '--x', '1']\n"


def test_config_command_prints_the_configuration(capsys):
    from attnfast.__main__ import main

    assert main(["config"]) == 0
    assert capsys.readouterr().out.startswith("attnfast ")


# -- the legend, the spread, the probe labels, the turbo note ---------------------------------------------
def _fake_result(memory_bound: bool, baseline: bool = False) -> dict:
    row = {"impl": "attnfast", "label": "attnfast", "median_s": 2e-3, "min_s": 1.8e-3, "max_s": 2.5e-3,
           "repeats": 5, "gflops": 1.0, "gbps": 1.0, "pct_of_limit": 10.0, "speedup_vs_numpy": 2.0,
           "speedup_vs_best_peer": 1.5, "max_abs_err": 1e-7, "peak_extra_bytes": 2**20,
           "speedup_vs_attnfast_float32": 1.0 if baseline else None}
    return {"name": "attention B=1 H=1 Lq=1 Lk=8 D=4", "label": "x", "bound": "memory" if memory_bound else
            "compute", "bytes": 1e6, "flops": 1e6, "rows": [row], "dtype": "float32"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_legend_explains_every_column_the_tables_show(dtype):
    from attnfast.bench import report

    rep = {"config": {"dtype": dtype, "quick": True, "measure_memory": True, "threads": 1}}
    legend = report.format_legend(rep)
    names = {name for name, _ in report.legend_entries(rep)}
    for memory_bound in (True, False):
        table = report.format_case(_fake_result(memory_bound, baseline=dtype != "float32"), rep["config"])
        header = table.splitlines()[2]
        columns = [c.strip() for c in header.split("  ") if c.strip()]
        assert set(columns) - {"implementation"} <= names, (columns, names)
    text = dict(report.legend_entries(rep))
    assert "float64" in text["max |err|"] and "attnfast.reference" in text["max |err|"]
    assert "(not NumPy)" in text["× best peer"]
    assert "VmHWM" in text["peak MiB"] and "minus the output" in text["peak MiB"]
    assert "separate process" in text["peak MiB"] and "not the inputs" in text["peak MiB"]
    assert all(len(line) <= 104 for line in legend.splitlines())


def test_spread_fields_and_their_text():
    from attnfast.bench.report import _spread
    from attnfast.bench.timing import spread

    got = spread([4.0, 1.0, 2.0, 3.0, 10.0])
    assert got == {"times_s": [4.0, 1.0, 2.0, 3.0, 10.0], "median_s": 3.0, "min_s": 1.0, "max_s": 10.0,
                   "q1_s": 2.0, "q3_s": 4.0, "repeats": 5}
    assert _spread({"median_s": 2.0, "min_s": 1.8, "max_s": 2.5}) == "-10/+25%"
    assert _spread({"median_s": None}) == "-"
    assert spread([])["repeats"] == 0


_CACHES = [{"level": 1, "bytes": 48 * 2**10, "shared_cpus": 1}, {"level": 2, "bytes": 2**20, "shared_cpus": 1},
           {"level": 3, "bytes": 32 * 2**20, "shared_cpus": 2}]


@pytest.mark.parametrize("nbytes, threads, expected", [
    (40_000, 1, "L1 cache (48 KiB per core)"),
    (1_500_000, 2, "L2 cache (1 MiB per core)"),     # 750 kB per thread
    (1_500_000, 1, "L3 cache (32 MiB shared)"),
    (6_700_000, 2, "L3 cache (32 MiB shared)"),
    (134_000_000, 2, "main memory (DRAM; beyond the 32 MiB L3)"),
])
def test_read_bandwidth_probe_names_the_memory_level_it_reads(nbytes, threads, expected):
    from attnfast.bench.probes import memory_level

    assert memory_level(nbytes, threads, _CACHES) == expected
    assert memory_level(nbytes, threads, []) == "unknown cache sizes"


def test_read_bandwidth_probes_of_nearly_equal_buffers_are_one_probe(monkeypatch):
    from attnfast.bench import probes

    calls = []

    def fake(nbytes, seconds, threads):
        calls.append(nbytes)
        return {"bytes_per_s": float(nbytes), "nbytes": nbytes, "source": "fake"}

    monkeypatch.setattr(probes, "read_bandwidth", fake)
    bw = probes.BandwidthCache(0.1, 2, _CACHES)
    assert bw.rate(134_300_000, "KV-cache decode") == 134_300_000.0
    assert bw.rate(134_200_000, "row softmax") == 134_300_000.0  # within 10%: the same probe
    assert bw.rate(6_700_000, "one decoder step") == 6_700_000.0
    assert calls == [134_300_000, 6_700_000]
    big = bw.results[134_300_000]
    assert big["used_by"] == ["KV-cache decode", "row softmax"]
    assert big["measures"] == "main memory (DRAM; beyond the 32 MiB L3)"


def test_fma_peak_above_the_spec_clock_gets_the_clock_that_explains_it(monkeypatch):
    from attnfast.bench import machine, report, runner

    zen5 = {"model": "AMD EPYC", "vendor": "AuthenticAMD", "family": 26, "flags": ["avx2", "fma", "avx512f"],
            "mhz": 2500.0, "max_mhz": None}
    monkeypatch.setattr(machine, "cpu_info", lambda: dict(zen5))
    sample = {"flops_per_s": 2 * 64 * 4.0e9, "source": "attnfast._attnfast.probe_fma_peak"}  # 4 GHz
    cfg = runner.BenchConfig(cases=[], threads=2)
    peaks = runner._summarise_peaks(cfg, {"mhz": 2500.0, "max_mhz": None}, [sample])
    assert peaks["fma_theoretical"]["flops_per_s"] == 2 * 64 * 2.5e9
    assert peaks["fma_implied_mhz"] == pytest.approx(4000.0)
    assert peaks["fma_peak_flops_per_s"] == sample["flops_per_s"]
    rep = {"machine": {"cpu": "AMD EPYC"}, "config": cfg.to_dict(), "probes": peaks}
    header = report.format_header(rep)
    assert ("measured above spec: the cores ran at ~4000 MHz, not the 2500 MHz the OS reports (turbo/boost "
            "clock)") in header
    below = runner._summarise_peaks(cfg, {"mhz": 2500.0, "max_mhz": None},
                                    [dict(sample, flops_per_s=2 * 64 * 2.4e9)])
    assert below["fma_implied_mhz"] is None
    assert "turbo" not in report.format_header(dict(rep, probes=below))
    # A probe below the spec figure was disturbed: the spec figure counts, and the header says why.
    assert below["fma_peak_flops_per_s"] == 2 * 64 * 2.5e9
    assert "FMA probe below the spec figure (other processes busy?)" in report.format_header(dict(rep, probes=below))


def test_text_report_has_the_legend_spread_and_labelled_probes(tiny_text):
    assert "Columns\n  median " in tiny_text
    assert "spread" in tiny_text and "peak MiB     memory one call needs beyond its output" in tiny_text
    assert "read BW" in tiny_text and " read by 1 thread(s)" in tiny_text
    assert "the '% BW' limit of: attention B=2 H=2 Lq=1 Lk=40 D=16" in tiny_text


# -- the JSON schema and --compare ------------------------------------------------------------------------
def test_report_carries_the_documented_schema_version(tiny_report):
    from attnfast.bench import compare, runner

    assert tiny_report["schema"] == runner.SCHEMA == "attnfast-bench/2"
    assert 2 in compare.READABLE["attnfast-bench"]
    assert [s["step"] for s in tiny_report["steps"]][:2] == [
        "start-up: import the peers (and, meanwhile, the memory child), machine facts", "probing FMA peak"]
    assert all(s["seconds"] >= 0 for s in tiny_report["steps"])


def _readme_fields():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "README.md").read_text()
    return text, set(re.findall(r"`([A-Za-z_0-9]+)`", text))


def test_benchmarks_readme_documents_every_field_of_the_report(tiny_report):
    text, documented = _readme_fields()
    assert "attnfast-bench/2" in text
    missing = set(tiny_report) - documented
    for section in ("machine", "config", "probes"):
        missing |= {f"{section}.{k}" for k in tiny_report[section] if k not in documented}
    missing |= {f"timing.{k}" for k in tiny_report["config"]["timing"] if k not in documented}
    for res in tiny_report["results"]:
        missing |= {f"result.{k}" for k in res if k not in documented}
        for row in res["rows"]:
            missing |= {f"row.{k}" for k in row if k not in documented}
    for bw in tiny_report["probes"]["read_bandwidth"]:
        missing |= {f"read_bandwidth.{k}" for k in bw if k not in documented}
    assert not missing, sorted(missing)


def _report(schema="attnfast-bench/2", causal=False, **rows_by_case):
    results = []
    for name, rows in rows_by_case.items():
        results.append({"name": name.replace("_", " "), "dtype": "float32",
                        "rows": [{"impl": impl, "label": impl.upper(), "median_s": t} for impl, t in rows.items()]})
    return {"schema": schema, "config": {"dtype": "float32", "causal": causal, "threads": 2},
            "machine": {"cpu": "cpu", "versions": {"attnfast": "0.1.0"}}, "results": results}


@pytest.fixture
def two_runs(tmp_path):
    a = _report(case_1={"attnfast": 0.002, "numpy": 0.010, "jax": 0.5},
                case_2={"attnfast": 0.004},
                case_old={"attnfast": 1.0})
    b = _report(case_1={"attnfast": 0.003, "numpy": 0.005, "torch": 0.1},
                case_2={"attnfast": 0.001},
                case_new={"attnfast": 2.0})
    b["machine"]["versions"]["attnfast"] = "0.2.0"
    pa, pb = tmp_path / "A.json", tmp_path / "B.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    return str(pa), str(pb)


def test_compare_gives_b_over_a_per_matching_case_and_implementation(two_runs):
    from attnfast.bench.compare import compare_reports, load_report

    pa, pb = two_runs
    cmp = compare_reports(load_report(pa), load_report(pb), "A", "B")
    assert [(r["case"], r["impl"], r["ratio"]) for r in cmp["rows"]] == [
        ("case 1 [float32]", "attnfast", 0.003 / 0.002),
        ("case 1 [float32]", "numpy", 0.005 / 0.010),
        ("case 2 [float32]", "attnfast", 0.001 / 0.004)]
    assert cmp["only_a"] == ["case 1 [float32] jax", "case old [float32]"]
    assert cmp["only_b"] == ["case 1 [float32] torch", "case new [float32]"]
    assert cmp["notes"] == ["attnfast: A 0.1.0, B 0.2.0"]


def test_compare_command_prints_the_ratios_and_the_unmatched(two_runs, capsys):
    pa, pb = two_runs
    assert cli.main(["--compare", pa, pb]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"A  {pa}\nB  {pb}\nratio = B's median / A's median (above 1: slower in B")
    assert f"differs: attnfast: {pa} 0.1.0, {pb} 0.2.0" in out
    rows = [line.split() for line in out.splitlines() if line.rstrip().endswith(("1.500", "0.500", "0.250"))]
    assert rows == [["case", "1", "[float32]", "ATTNFAST", "2.00", "ms", "3.00", "ms", "1.500"],
                    ["NUMPY", "10.00", "ms", "5.00", "ms", "0.500"],  # the case is named on its first row
                    ["case", "2", "[float32]", "ATTNFAST", "4.00", "ms", "1.00", "ms", "0.250"]]
    assert "only in A (not compared):\n  case 1 [float32] jax\n  case old [float32]" in out
    assert "only in B (not compared):\n  case 1 [float32] torch\n  case new [float32]" in out


def test_compare_matches_causal_runs_only_with_causal_runs(tmp_path):
    from attnfast.bench.compare import compare_reports

    a = _report(case_1={"attnfast": 1.0})
    b = _report(causal=True, case_1={"attnfast": 2.0})
    cmp = compare_reports(a, b)
    assert cmp["rows"] == [] and cmp["only_a"] == ["case 1 [float32]"] and cmp["only_b"] == [
        "case 1 [float32, causal]"]


@pytest.mark.parametrize("content, message", [
    ({"schema": "attnfast-bench/9", "results": []},
     r"has schema 'attnfast-bench/9', which this attnfast cannot read \(it reads attnfast-bench/1, "
     r"attnfast-bench/2\): compare it with the attnfast version that wrote it, or rerun"),
    ({"schema": "something-else/1", "results": []}, r"is not an attnfast bench report: its schema is 'something-else/1'"),
    ({"results": []}, r"is not an attnfast bench report \(no 'schema' field\); write one with: python -m attnfast "
                      r"bench --json FILE"),
    ([1, 2, 3], r"is not an attnfast bench report \(no 'schema' field\)"),
    ({"schema": "attnfast-bench/2"}, r"says schema 'attnfast-bench/2' but has no 'results' list"),
])
def test_compare_rejects_other_files_saying_why(tmp_path, content, message):
    from attnfast.bench.compare import load_report

    path = tmp_path / "x.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_report(str(path))


def test_compare_errors_are_usage_errors_of_the_command(tmp_path, two_runs, capsys):
    pa, _ = two_runs
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    backward = tmp_path / "bwd.json"
    backward.write_text(json.dumps(_report(schema="attnfast-bench-backward/1")))
    for other, message in ((str(bad), f"{bad} is not JSON"),
                           (str(tmp_path / "missing.json"), "cannot read"),
                           (str(backward), f"{pa} is a attnfast-bench report and {backward} a "
                                           "attnfast-bench-backward report: compare two runs of the same suite")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["--compare", pa, other])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["--compare", pa, pa, "--json", "x.json"])
    assert exc.value.code == 2
    assert "--json is not available with --compare" in capsys.readouterr().err


def test_compare_reads_schema_1_files(two_runs, tmp_path):
    from attnfast.bench.compare import compare_reports, load_report

    pa, _ = two_runs
    old = _report(schema="attnfast-bench/1", case_2={"attnfast": 0.008})
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    cmp = compare_reports(load_report(str(path)), load_report(pa))
    assert [r["ratio"] for r in cmp["rows"]] == [0.004 / 0.008]


# -- the memory child -------------------------------------------------------------------------------------
@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_tiny_run_measured_peak_memory_in_the_early_started_child(tiny_report):
    assert tiny_report["memory_note"] is None
    assert tiny_report["memory_seconds"]["startup"] > 0
    assert set(tiny_report["memory_seconds"]["cases"]) == {res["name"] for res in tiny_report["results"]}
    for res in tiny_report["results"]:
        for row in res["rows"]:
            assert row["peak_rss_delta_bytes"] is not None, row
            output = res["output_bytes"]
            assert row["peak_extra_bytes"] == max(0, row["peak_rss_delta_bytes"] - output)


def test_a_memory_child_that_dies_becomes_a_note_not_an_error():
    from attnfast.bench.memory import MemoryChild

    child = MemoryChild.start(["numpy"], "float32", False, 1)
    child._proc.kill()
    mem = child.measure([{"case": AttentionCase(1, 1, 4, 4, 4).to_dict(), "impls": ["numpy"]}])
    assert mem["results"] == {} and mem["note"].startswith("memory child did not start (no answer)")


def test_quick_runs_leave_the_stages_out_of_the_memory_child():
    from attnfast.bench.runner import _memory_jobs

    cases = [AttentionCase(1, 1, 4, 4, 4), *stage_cases()]
    results = [{"kind": c.kind, "rows": [{"impl": "numpy", "skipped": None}]} for c in cases]
    assert [j["case"]["kind"] for j in _memory_jobs(results, cases)] == ["attention"] + ["stage"] * 3
    assert [j["case"]["kind"] for j in _memory_jobs(results, cases, quick=True)] == ["attention"]
