"""pytest-benchmark suite: one benchmark per engine per case, grouped by case.

    python -m pytest bench/test_bench.py --benchmark-json=bench/results/bench.json

Not collected by the unit-test suite (``testpaths = ["tests"]``).  Peers that are not installed are
skipped with the reason.  Each benchmark first checks the engine's output against PyTorch (max abs
error, recorded in ``extra_info``): a gru_fast mismatch fails the test, a peer's mismatch is a warning.
No timing is asserted; the ratios to the targets are printed in the terminal summary (see conftest.py).
For interleaved, noise-resistant numbers use ``python -m bench``.
"""

from __future__ import annotations

import warnings

import pytest

from bench.cases import CASES, PARITY_TOLERANCE
from bench.engines import ENGINE_LABELS, ENGINES, build_runner, check_parity, missing_reason, parity_ok


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_engine(benchmark, case, engine, artifacts_for, thread_config, medians):
    reason = missing_reason(engine)
    if reason is not None:
        pytest.skip(f"{ENGINE_LABELS[engine]} {reason}")
    benchmark.group = f"{case.name}: {case.title} ({case.shape})"
    artifacts = artifacts_for(case)
    runner = build_runner(engine, artifacts)
    err = check_parity(runner, artifacts)
    benchmark.extra_info.update({
        "engine": engine, "case": case.name, "shape": case.shape, "flops": case.flops,
        "target_ratio": case.target, "parity_max_abs_err": err, "reference": artifacts.reference[2],
        "threads": thread_config["threads"], "setup": runner.config.get("call", ""),
    })
    if not parity_ok(err):
        message = (f"{ENGINE_LABELS[engine]} differs from {artifacts.reference[2]} by {err:.2e} "
                   f"(> {PARITY_TOLERANCE:g}) on {case.name}")
        if engine == "gru_fast":
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)
    with runner.context():
        benchmark(runner.call)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        medians[(case.name, engine)] = (stats.median, err)


# ----------------------------------------------------------------------------------------------------
# the report's own arithmetic and rendering (no timing is asserted: fake results, or outputs only)
# ----------------------------------------------------------------------------------------------------

import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench import bf16, sweep, tails  # noqa: E402
from bench.cases import Case  # noqa: E402
from bench.report import latency_rows, markdown as report_markdown, round_spread, summarize_case  # noqa: E402


def test_percentiles_follow_the_linear_rank_definition_and_numpy():
    # 1..1000 ns sorted: p99 sits at rank 0.99 * 999 = 989.01, between 990 and 991 ns -> 990.01 ns
    stats = tails.percentiles(np.arange(1000, 0, -1))
    assert stats["p99_us"] == pytest.approx(0.99001)
    assert stats["p50_us"] == pytest.approx(0.5005)
    assert stats["calls"] == 1000 and stats["max_us"] == pytest.approx(1.0)
    samples = np.random.default_rng(1).integers(10_000, 5_000_000, 1234)
    stats = tails.percentiles(samples)
    for p in tails.PERCENTILES:
        assert stats[f"p{p}_us"] == pytest.approx(np.percentile(samples, p) / 1e3)
    with pytest.raises(ValueError, match="samples_ns"):
        tails.percentiles([])


def _proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs os.sched_setaffinity (Linux)")
def test_busy_neighbour_is_pinned_spins_and_is_killed():
    core = sorted(os.sched_getaffinity(0))[0]
    with tails.busy_neighbour(core) as neighbour:
        assert os.sched_getaffinity(neighbour.pid) == {core}
        deadline = time.monotonic() + 10
        while _proc_cpu_seconds(neighbour.pid) < 0.05 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _proc_cpu_seconds(neighbour.pid) >= 0.05  # it runs, it does not sleep
        assert neighbour.process.poll() is None
    assert neighbour.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(neighbour.pid, 0)
    with pytest.raises(RuntimeError, match="inside"):  # killed when the block raises, too
        with tails.busy_neighbour() as neighbour:
            raise RuntimeError("inside")
    assert neighbour.process.poll() is not None
    with pytest.raises(ValueError, match="core"):
        with tails.busy_neighbour(core=10_000):
            pass


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs os.sched_setaffinity (Linux)")
def test_busy_neighbour_ends_when_its_parent_is_killed():
    import signal
    import subprocess
    import sys

    script = ("import sys, time\nfrom bench import tails\nwith tails.busy_neighbour() as n:\n"
              "    print(n.pid, flush=True)\n    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)  # no finally runs in the parent
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break  # exited, waiting for init to reap it
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the neighbour kept spinning after its parent was killed")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()


class _Sleeper:
    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def call(self):
        self.calls += 1
        time.sleep(self.seconds)

    def context(self):
        import contextlib
        return contextlib.nullcontext()


def test_time_calls_times_each_call_and_stops_past_its_deadline():
    runner = _Sleeper(0.01)
    samples = tails.time_calls(runner, 1000, max_seconds=0.05)
    assert samples.dtype == np.int64
    assert 1 <= len(samples) < 20 and runner.calls == len(samples) + 1  # one untimed wake-up call
    assert np.all(samples >= 10_000_000)  # time.sleep(0.01) lasts at least 10 ms
    assert len(tails.time_calls(_Sleeper(0.0), 7)) == 7
    cold = _Sleeper(0.0)
    assert len(tails.time_calls(cold, 1, warm=False)) == 1 and cold.calls == 1


def test_warm_up_and_the_number_of_calls_planned():
    runner = _Sleeper(0.01)
    assert tails.warm_up(runner) >= 0.01 and runner.calls == 8
    slow = _Sleeper(0.3)
    tails.warm_up(slow)
    assert slow.calls == 2  # past max_seconds after two calls
    settings = tails.TailSettings(budget_s=1.0, min_calls=1000, max_calls=20_000, cap_s=3.0, rounds=5)
    assert settings.calls(18e-6) == 20_000  # 1 s would be 55,555 calls: capped
    assert settings.calls(0.5e-3) == 2000  # 1 s of calls
    assert settings.calls(2e-3) == 1000  # at least 1000 ...
    assert settings.calls(5e-3) == 600  # ... unless that is over cap_s
    assert settings.calls(10.0) == 5  # one call per round at least


def test_tail_verdict():
    def stats(p50, p99):
        return {"p50_us": p50, "p90_us": p50, "p99_us": p99}

    v = tails.verdict({"gru_fast": stats(10, 15)},
                      {"gru_fast": stats(11, 20), tails.SERIAL: stats(10, 19)})
    assert v["idle_p99_over_p50"] == pytest.approx(1.5) and v["idle_met"] is True
    assert v["neighbour_p50_over_serial"] == pytest.approx(1.1) and v["neighbour_met"] is True
    v = tails.verdict({"gru_fast": stats(10, 15.1)}, {"gru_fast": stats(10, 22), tails.SERIAL: stats(10, 19)})
    assert v["idle_met"] is False and v["neighbour_met"] is False
    assert tails.verdict({}, {"gru_fast": stats(1, 2)})["neighbour_met"] is None


def _timing(median, samples=None, shares=None):
    samples = samples or [median]
    return {"status": "ok", "median_us": median, "parity_ok": True, "parity_err": 1e-7, "samples_us": samples,
            "busy_shares": shares or [0.0] * len(samples)}


def _fake_sweep():
    points = []
    medians = {(1, 96): (100, 200, 150, None), (1, 128): (100, 120, 90, 400), (3, 96): (100, 50, 500, 500)}
    for (b, h), (gf, torch_us, ort, ov) in medians.items():
        case = Case(f"B={b} H={h}", "sweep", b, 200, 64, h, target=sweep.TARGET)
        rows = {"gru_fast": _timing(gf), "pytorch": _timing(torch_us), "onnxruntime": _timing(ort),
                "openvino": _timing(ov) if ov else {"status": "not installed (openvino)"}}
        if (b, h) == (3, 96):
            rows["pytorch"]["parity_ok"] = False  # a peer that disagrees is not the best peer
        points.append({"batch": b, "hidden": h, "shape": case.shape, "engines": rows, "busy": False,
                       "summary": summarize_case(case, rows, None)})
    return {"batches": [1, 3], "hidden": [96, 128], "steps": 200, "input_size": 64, "target": sweep.TARGET,
            "threads": 2, "rounds": 3, "batch_seconds": 0.002, "points": points}


def test_sweep_grid_table_and_heat_map(tmp_path):
    result = _fake_sweep()
    grid = sweep.ratio_grid(result)
    # best peer / gru_fast: min(200, 150) / 100; min(120, 90, 400) / 100; PyTorch (50) disagrees -> 500 / 100
    np.testing.assert_allclose(grid, [[1.5, 0.9], [5.0, np.nan]])
    text = sweep.markdown(result)
    assert "| 1 | 1.50x | **0.90x** |" in text
    assert "| 3 | 5.00x | - |" in text
    assert "Target met at 2 of 3 points measured" in text and "lowest 0.90x" in text
    report = {"sweep": result, "settings": {"quick": True}, "cases": []}
    path = tmp_path / "sweep.png"
    assert sweep.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not sweep.plot({"settings": {"quick": True}, "cases": []}, tmp_path / "none.png")
    assert [c.shape for c in sweep.sweep_cases(quick=False)][:2] == ["B=1 T=200 I=64 H=96", "B=1 T=200 I=64 H=128"]
    assert len(sweep.sweep_cases(quick=False)) == 36


def test_round_spread_uses_the_rounds_the_median_uses():
    assert round_spread({"samples_us": [3.0, 1.0, 2.0, 100.0], "busy_shares": [0, 0, 0, 0.9]}) == (1.0, 3.0)
    # too few quiet rounds: every round counts (as in the median)
    assert round_spread({"samples_us": [3.0, 1.0, 100.0], "busy_shares": [0.9, 0.9, 0]}) == (1.0, 100.0)
    assert round_spread({"median_us": 1.0}) is None


def test_latency_rows_interleaved_and_alone():
    report = {"cases": [
        {"name": "stream", "shape": "B=1 T=1 I=256 H=256", "target": 2.5,
         "engines": {"gru_fast": _timing(10, [9, 10, 12]), "onnxruntime": _timing(30, [28, 30, 31]),
                     "openvino": {"status": "not installed (openvino)"}}},
        {"name": "throughput_64", "shape": "B=64", "target": 1.0, "engines": {"gru_fast": _timing(1)}},
    ], "isolated": {"stream": {"gru_fast": {"median_us": 20, "min_us": 19, "max_us": 25, "parity_ok": True},
                               "pytorch": {"median_us": 40, "parity_ok": True}}}}
    rows = latency_rows(report)
    assert [r["name"] for r in rows] == ["stream"]
    inter, alone = rows[0]["interleaved"], rows[0]["alone"]
    assert inter["ratio"] == pytest.approx(3.0) and inter["met"] is True and inter["best_peer"] == "onnxruntime"
    assert (inter["gru_fast"]["min_us"], inter["gru_fast"]["max_us"]) == (9, 12)
    assert alone["ratio"] == pytest.approx(2.0) and alone["met"] is False
    del report["isolated"]
    assert latency_rows(report)[0]["alone"] is None


def test_bf16_model_reports_a_missing_or_broken_api():
    class Old:
        pass

    class New:
        weights = "float32"

        def __init__(self, fail=False):
            self.fail = fail

        def with_weights(self, kind):
            if self.fail:
                raise ValueError("no bf16 here")
            converted = New()
            converted.weights = kind
            return converted

    model, reason = bf16.bf16_model(Old())
    assert model is None and "with_weights" in reason
    model, reason = bf16.bf16_model(New())
    assert reason is None and model.weights == "bfloat16"
    model, reason = bf16.bf16_model(New(fail=True))
    assert model is None and "no bf16 here" in reason


def test_bf16_summary_and_table():
    rows = {"gru_fast": _timing(100), "pytorch": _timing(500), "onnxruntime": _timing(300),
            "openvino": _timing(400), bf16.OV_BF16: dict(_timing(150), parity_err=5e-3, compiled_precision="bf16"),
            bf16.GF_BF16: dict(_timing(50), parity_err=4e-3)}
    s = bf16.summarize(rows, 3.0)
    assert s["best_peer"] == bf16.OV_BF16 and s["ratio"] == pytest.approx(3.0) and s["met"] is True
    assert s["bf16_speedup"] == pytest.approx(2.0)
    rows[bf16.OV_BF16]["parity_err"] = 3e-2  # over the bf16 bar: not a peer
    s = bf16.summarize(rows, 3.0)
    assert s["best_peer"] == "onnxruntime" and s["ratio"] == pytest.approx(6.0)
    rows[bf16.GF_BF16]["parity_err"] = 3e-2  # gru_fast bf16 over the bar: not met, however fast
    assert bf16.summarize(rows, 3.0)["met"] is False

    reason = "this gru_fast has no GRU.with_weights"
    rows[bf16.GF_BF16] = {"status": f"unavailable: {reason}"}
    result = {"rounds": 3, "threads": 2, "gru_fast_bf16": reason, "cases": [
        {"name": "stream", "shape": "B=1 T=1 I=256 H=256", "reference": "PyTorch", "engines": rows,
         "summary": bf16.summarize(rows, 3.0)}]}
    assert result["cases"][0]["summary"]["ratio"] is None and result["cases"][0]["summary"]["met"] is None
    text = bf16.markdown(result)
    assert f"gru_fast bf16 is unavailable here: {reason}" in text
    row = next(line for line in text.splitlines() if line.startswith("| stream |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "unavailable" and cells[9] == "-" and cells[11] == "-" and cells[12] == "-"


@pytest.mark.skipif(missing_reason("openvino") is not None or missing_reason("pytorch") is not None,
                    reason="needs OpenVINO and PyTorch")
def test_openvino_bf16_hint_against_pytorch(tmp_path):
    from bench.cases import make_problem
    from bench.engines import Artifacts, check_parity
    from gru_fast import peers

    case = Case("small", "small", 2, 5, 16, 32)
    artifacts = Artifacts(make_problem(case), tmp_path)
    p = artifacts.problem
    runner = peers.build_runner("openvino", p.x, p.h0, onnx_file=artifacts.onnx_path, openvino_precision="bf16")
    assert runner.config["requested"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert check_parity(runner, artifacts) <= bf16.ERROR_TARGET
    f32 = peers.build_runner("openvino", p.x, p.h0, onnx_file=artifacts.onnx_path)
    assert "32" in f32.config["INFERENCE_PRECISION_HINT"]
    assert check_parity(f32, artifacts) <= PARITY_TOLERANCE
    with pytest.raises(ValueError, match="precision"):
        peers.openvino_config(2, "int4")


def test_new_stages_have_flags_and_the_isolated_children_skip_them():
    import inspect

    from bench import __main__ as cli

    args = cli._parse(["--no-sweep", "--no-tails", "--no-bf16"])
    assert args.no_sweep and args.no_tails and args.no_bf16
    source = inspect.getsource(cli.run_isolated)
    assert all(flag in source for flag in ("--no-sweep", "--no-tails", "--no-bf16"))


def test_report_markdown_shows_the_latency_rows():
    report = {"machine": {"cpu_model": "x", "usable_cores": 2, "cpu_simd_flags": [], "versions": {}},
              "settings": {"quick": True, "rounds": 3, "batch_seconds": 0.002, "case_budget_seconds": 5},
              "engines": ["gru_fast", "onnxruntime"], "reference": "PyTorch",
              "cases": [{"name": "stream", "title": "one step", "shape": "B=1 T=1 I=256 H=256", "target": 2.5,
                         "sgemm_target": None, "engines": {"gru_fast": _timing(10, [9, 10, 12]),
                                                           "onnxruntime": _timing(30, [28, 30, 31])},
                         "summary": {"ratio": 3.0, "met": True, "best_peer": "onnxruntime", "notes": []}}]}
    text = report_markdown(report)
    assert "## Latency rows (B=1..8)" in text
    assert ("| stream | B=1 T=1 I=256 H=256 | >= 2.5x | 10.0 (9.0-12.0) | ONNX Runtime 30.0 (28.0-31.0) | 3.00x "
            "| yes |") in text
    assert "*Alone*: not run in this report" in text


def test_bf16_model_of_a_gru_fast_model_is_close_to_the_float32_reference(tmp_path):
    from bench.cases import make_problem
    from bench.engines import Artifacts, check_parity
    from gru_fast import peers

    for case in (Case("small", "small", 2, 5, 16, 32), Case("step", "step", 1, 1, 16, 32, stream=True)):
        artifacts = Artifacts(make_problem(case), tmp_path / case.name)
        model, reason = bf16.bf16_model(artifacts.gru_fast_model)
        if model is None:
            pytest.skip(f"gru_fast bf16 unavailable: {reason}")
        p = artifacts.problem
        runner = peers.build_runner("gru_fast", p.x, p.h0, stream=case.stream, model=model)
        err = check_parity(runner, artifacts)
        assert 0 < err <= bf16.ERROR_TARGET  # rounded weights (not float32's 1e-7), within the bf16 bar
