"""Timing on a busy machine: the demo and the benchmark harness leave out the rounds during which other
processes used the CPUs (gru_fast.peers.CpuMeter / quiet_rounds, in the harness both use), and when too few
rounds are quiet they print their figures with a warning -- the demo's table, the report's markdown and
its charts.  Also the harness's other promises to a user: stale charts are not left beside a new
report, and a measurement that cannot run names every missing module and the extra that brings it.

No speed is asserted: the busy machine is simulated through the meter's source (/proc/stat).  Two tests
run on a real busy machine (child processes spinning on every CPU): the meter's, and the engine's, which
runs a parallel-sized call serially while no core is free for its second worker and in parallel again once
the spinners are gone (gru_fast._schedule: PARALLEL reads the machine's count of running tasks).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import gru_fast
from gru_fast import _demo, _schedule, kernels, peers

from conftest import REPO_ROOT

_environment = dict(os.environ)
import bench  # noqa: E402  (sets thread-count defaults in os.environ for its own runs: put back below)
import bench.__main__  # noqa: E402
import bench.dask_scaling  # noqa: E402
import bench.engines  # noqa: E402
import bench.report  # noqa: E402

os.environ.clear()
os.environ.update(_environment)


def _machine_busy_snapshot():
    """/proc/stat as on a machine where other processes keep 90 % of the CPUs busy beside this one."""
    wall, own = time.perf_counter(), time.process_time()
    return own + 0.9 * (os.cpu_count() or 1) * wall, own, wall


def _machine_quiet_snapshot():
    """/proc/stat as on a machine where only this process runs."""
    own = time.process_time()
    return own, own, time.perf_counter()


@contextlib.contextmanager
def _spinning_on_every_cpu():
    """A child process spinning in a Python loop on every CPU, up and spinning inside the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)  # the children are up and spinning
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_the_meter_sees_other_processes_spinning_on_every_cpu():
    if not os.path.exists("/proc/stat"):
        pytest.skip("the meter reads /proc/stat (Linux); elsewhere it falls back to the load average")
    with _spinning_on_every_cpu():
        meter = peers.CpuMeter()
        time.sleep(1.0)
        share = meter.share()
    assert share > peers.BUSY_SHARE, share


def test_a_parallel_call_runs_serially_while_no_core_is_free(monkeypatch):
    """Woken beside processes spinning on every CPU, the second worker of a parallel call would wait for a
    core (a scheduler time slice, milliseconds): the call runs serially instead, with the same bits, and
    once the machine is free again the calls run in parallel."""
    if _schedule._running_tasks() is None or gru_fast.get_num_threads() < 2:
        pytest.skip("needs /proc/loadavg (Linux) and two threads")
    monkeypatch.setattr(_schedule.Pace, "wants_parallel", lambda self: True)  # only the machine decides
    launches = []
    forward = kernels.FORWARD["float32", True]
    monkeypatch.setitem(kernels.FORWARD, ("float32", True), lambda args: (launches.append(1), forward(args))[1])
    rng = np.random.default_rng(0)
    H, I = 256, 64
    model = gru_fast.GRU([(rng.uniform(-0.1, 0.1, (1, 3 * H, I)).astype(np.float32),
                           rng.uniform(-0.1, 0.1, (1, 3 * H, H)).astype(np.float32), None)])
    x = rng.standard_normal((100, 1, I)).astype(np.float32)
    call = model.bind(x)  # B=1 T=100: split in two
    with gru_fast.threads(1):
        expected = model(x)[0]
    call()  # compiles (or loads) the parallel kernel before the machine is busy
    with _spinning_on_every_cpu():
        del launches[:]
        busy = [call()[0].copy() for _ in range(10)]
        assert launches == []
    # until a reading finds a core free: any one reading may catch a transient task of the machine's own
    free, deadline = [], time.perf_counter() + 2.0
    while not launches and time.perf_counter() < deadline:
        time.sleep(0.01)
        free.append(call()[0].copy())
    assert launches, f"no parallel launch in 2 s once the spinners were gone (running tasks now: " \
                     f"{_schedule._running_tasks()})"
    assert all(np.array_equal(y, expected) for y in busy + free)


def test_quiet_rounds_leaves_busy_rounds_out_and_says_when_too_few_are_quiet():
    low, high = peers.BUSY_SHARE / 2, min(1.0, 2 * peers.BUSY_SHARE)
    assert peers.quiet_rounds([low, high, low, low, high]) == ([0, 2, 3], False)
    assert peers.quiet_rounds([high, low, high, low, high]) == ([0, 1, 2, 3, 4], True)


@pytest.fixture(scope="module")
def shipped():
    return gru_fast.load(_demo.MODEL_FILE), _demo.load_eval_set()


@pytest.mark.parametrize("machine", ["busy", "quiet"])
def test_demo_timing_table_warns_on_a_busy_machine_only(shipped, monkeypatch, machine):
    model, data = shipped
    snapshot = _machine_busy_snapshot if machine == "busy" else _machine_quiet_snapshot
    monkeypatch.setattr(peers, "_cpu_snapshot", snapshot)
    lines = []
    _demo._timing_table(model, data, 3, 2, (), lines.append)  # gru_fast alone: no peer to build
    text = "\n".join(lines)
    header = next(line for line in lines if line.startswith("timing:"))
    if machine == "busy":
        assert "BUSY MACHINE" in header, text
        assert lines[-1].startswith("WARNING: busy machine: other processes used"), text
        assert "these times are unreliable" in lines[-1]
        assert "median of 6 interleaved rounds" in header  # as many rounds again were tried
    else:
        assert "WARNING" not in text and "BUSY" not in text, text
        assert "median of 3 interleaved rounds," in header


# --------------------------------------------------------------------------------------------------
# the benchmark harness
# --------------------------------------------------------------------------------------------------

class _Runner:
    engine, stream, config = "fake", False, {}

    def call(self):
        pass

    def context(self):
        return contextlib.nullcontext()


def test_bench_timing_uses_the_demos_rule(monkeypatch):
    from bench import engines

    shares = iter([0.0, 0.9, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0])  # reset, round 0, reset, round 1, ...

    class Meter:
        def __init__(self, threads=1):
            pass

        def share(self):
            return next(shares)

    monkeypatch.setattr(peers, "CpuMeter", Meter)  # the harness bench times with
    timing = engines.time_interleaved({"a": _Runner()}, 5, 1e-4, gap_seconds=0)["a"]
    assert timing.busy_shares == [0.9, 0.0, 0.9, 0.0, 0.0] and timing.rounds == 3 and not timing.busy

    shares = iter([0.0, 0.9] * 5)
    timing = engines.time_interleaved({"a": _Runner()}, 5, 1e-4, gap_seconds=0)["a"]
    assert timing.busy and timing.rounds == 5


def _report(busy: bool) -> dict:
    from bench.cases import CASE_BY_NAME
    from bench.report import summarize_case

    case = CASE_BY_NAME["tiny_bidir"]
    engines = {name: {"status": "ok", "median_us": us, "parity_err": 1e-7, "parity_ok": True, "rounds": 3,
                      "busy_shares": [0.9, 0.8, 0.1] if busy else [0.0, 0.1, 0.0], "busy": busy}
               for name, us in (("gru_fast", 4.0), ("onnxruntime", 10.0))}
    row = {"name": case.name, "title": case.title, "shape": case.shape, "target": case.target,
           "sgemm_target": None, "engines": engines, "reference": "PyTorch"}
    row["summary"] = summarize_case(case, engines, None)
    return {"settings": {"quick": True, "rounds": 3, "batch_seconds": 0.002, "case_budget_seconds": 5.0},
            "machine": {"cpu_model": "cpu", "usable_cores": 2, "cpu_simd_flags": [], "versions": {}},
            "engines": ["gru_fast", "onnxruntime"], "cases": [row], "reference": "PyTorch"}


@pytest.mark.parametrize("busy", [True, False])
def test_report_and_charts_carry_the_busy_machine_warning(monkeypatch, busy):
    from matplotlib.figure import Figure  # in the test extra: this test must run, not skip

    from bench.report import markdown, plot_ratios

    report = _report(busy)
    texts = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: texts.extend(t.get_text() for t in fig.texts))
    assert plot_ratios(report, "unused.png")
    warned = [t for t in texts if "busy machine" in t]
    assert ("busy machine" in markdown(report)) == busy and bool(warned) == busy
    if busy:
        assert "tiny_bidir" in warned[0] and "unreliable" in warned[0]


def test_a_new_report_removes_the_charts_of_an_earlier_one(tmp_path):
    from bench.__main__ import write_files

    for stale in ("report-quick-ratios.png", "report-quick-scaling.png"):
        (tmp_path / stale).write_bytes(b"an earlier run's chart")
    (tmp_path / "report-ratios.png").write_bytes(b"the full report's chart, another name")
    report = _report(False)
    report["cases"][0]["summary"]["ratio"] = None  # nothing to chart: no ratio, no scaling sweep
    files = write_files(report, "# report\n", tmp_path, "report-quick")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-quick.json", "report-quick.md",
                                                          "report-ratios.png"]
    assert set(files) == {"markdown", "json"}


def test_a_measurement_that_cannot_run_names_every_missing_module_and_its_extra(monkeypatch):
    import importlib.util

    import bench
    from bench import dask_scaling

    missing = {"dask", "distributed", "threadpoolctl"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    message = bench.missing_modules(dask_scaling.NEEDS)
    assert message == ("not installed: dask, distributed (extra [dask]); threadpoolctl (extra [bench]): "
                       "pip install 'gru_fast[dask,bench]'")
    # the extras named are the ones of pyproject.toml that install those modules
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("dask[distributed]") for r in extras["dask"])
    assert any(r.startswith("threadpoolctl") for r in extras["bench"])
    for module, extra in bench.EXTRAS.items():
        package = {"pytest_benchmark": "pytest-benchmark", "distributed": "dask[distributed]"}.get(module, module)
        assert any(r.startswith(package) for r in extras[extra]), (module, extra)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert bench.missing_modules(["numpy"]) is None
