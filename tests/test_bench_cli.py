"""The ``python -m attnfast bench`` command: arguments, the JSON report, the plot, missing peers.

Runs tiny shapes with attnfast and NumPy only (no peer is imported, so these tests need none installed
and stay fast).  Nothing here asserts on a time: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnfast.bench import cli
from attnfast.bench.cases import AttentionCase, case_from_dict, default_cases, parse_shape, stage_cases
from attnfast.bench.peers import INSTALL_HINTS, all_impls

TINY = "1,2,16,24,8"
DECODE = "2,2,1,40,16"
FAST = ["--no-progress", "--quick", "--threads", "1", "--impl", "attnfast", "--impl", "numpy"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One tiny run shared by the JSON tests: a compute-bound and a memory-bound shape, with memory."""
    path = tmp_path_factory.mktemp("bench") / "run.json"
    assert cli.main(["--shape", TINY, "--shape", DECODE, "--json", str(path), *FAST]) == 0
    with open(path) as f:
        return json.load(f)


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


@pytest.mark.parametrize("argv", [["--dtype", "float16"], ["--threads", "0"], ["--threads", "x"]])
def test_invalid_options_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2


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
    for case in default_cases(quick=True) + stage_cases():
        assert case_from_dict(json.loads(json.dumps(case.to_dict()))) == case


def test_decode_shapes_are_memory_bound():
    assert AttentionCase(64, 1, 1, 50, 256).memory_bound
    assert not AttentionCase(8, 8, 512, 512, 64).memory_bound


# -- the report -----------------------------------------------------------------------------------------
def test_json_schema(tiny_report):
    r = tiny_report
    assert r["schema"] == "attnfast-bench/1"
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


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    assert cli.main(["--shape", "1,2,32,32,8", "--shape", "1,2,64,64,8", "--plot", str(path), *FAST]) == 0
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
