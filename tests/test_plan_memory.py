"""What the engine keeps between calls: idle workspaces, bounded by bytes across all threads and models.

Documented bound (README, gru_fast._schedule): at most ``_PLAN_CACHE_BYTES`` (64 MiB) of idle plans stay in
the process, and a workspace over ``_PLAN_KEEP_MAX_BYTES`` (16 MiB) is freed after its call.

Authorities: ``tracemalloc`` (numpy reports every array allocation to it) for the bytes numpy still holds
once the caller's results are gone, and the process's resident set size (/proc/self/statm) for a large
workspace, which glibc maps and unmaps on its own.  Each check runs in a fresh child process.
"""

from __future__ import annotations

import random
import textwrap
from types import SimpleNamespace

from conftest import last_json_line, run_python

from gru_fast import _schedule

CHILD = textwrap.dedent(
    """
    import gc, json, threading, tracemalloc
    import numpy as np
    import gru_fast
    from gru_fast import _schedule as engine

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    rng = np.random.default_rng(0)
    I = 8

    def gru(H, L=3):
        return gru_fast.GRU([(rng.uniform(-0.1, 0.1, (1, 3 * H, I if l == 0 else H)).astype(np.float32),
                              rng.uniform(-0.1, 0.1, (1, 3 * H, H)).astype(np.float32), None) for l in range(L)])

    report = {"cache_bytes": engine._PLAN_CACHE_BYTES, "keep_max": engine._PLAN_KEEP_MAX_BYTES}
    big, wide = gru(64), gru(128)
    for m in (big, wide):  # kernels loaded, serial and parallel, before anything is measured
        m(np.ones((2, 1, I), np.float32)), m(np.ones((300, 64, I), np.float32))
    engine.drop_plans(big._kernel_model.token), engine.drop_plans(wide._kernel_model.token)
    gc.collect()
    tracemalloc.start()

    # one large call: its workspace holds two layers' sequences, 2 * 2000*64*64 floats (62.5 MiB)
    traced, resident = tracemalloc.get_traced_memory()[0], rss()
    y, h = big(np.ones((2000, 64, I), np.float32))
    del y, h
    gc.collect()
    report["big_call"] = {"traced": tracemalloc.get_traced_memory()[0] - traced, "rss": rss() - resident}

    # 16 threads, each one T=500 B=16 call (a 7.8 MiB workspace each), then idle but alive
    traced = tracemalloc.get_traced_memory()[0]
    ready, release = threading.Barrier(17), threading.Event()

    def work():
        y, h = wide(np.ones((500, 16, I), np.float32))
        del y, h
        ready.wait()
        release.wait()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    ready.wait()
    gc.collect()
    report["idle_threads"] = {"traced": tracemalloc.get_traced_memory()[0] - traced, "pool": engine.PLANS.nbytes}
    release.set()
    for t in threads:
        t.join()
    del wide, m
    gc.collect()
    report["model_gone"] = {"traced": tracemalloc.get_traced_memory()[0] - traced, "pool": engine.PLANS.nbytes}
    print(json.dumps(report))
    """
)


def test_kept_workspaces_stay_under_the_documented_bound():
    """A call with a 62.5 MiB workspace keeps nothing once its results are freed (before: +62.5 MiB,
    traced and resident); 16 idle threads that each made a call keep at most 64 MiB in all (before:
    16 x 7.8 MiB, one plan per thread); a model that is gone keeps nothing."""
    report = last_json_line(run_python(CHILD, timeout=300))
    MiB = 1 << 20
    assert report["cache_bytes"] == 64 * MiB and report["keep_max"] == 16 * MiB, report
    assert report["big_call"]["traced"] < MiB, report
    assert report["big_call"]["rss"] < 16 * MiB, report
    assert report["idle_threads"]["pool"] <= report["cache_bytes"], report
    assert report["idle_threads"]["traced"] <= report["cache_bytes"] + MiB, report
    assert report["model_gone"]["pool"] == 0 and report["model_gone"]["traced"] < MiB, report


# --------------------------------------------------------------------------------------------------
# the pace of a parallel plan: serial while parallel calls of its shape are slower
# --------------------------------------------------------------------------------------------------

def _paced(parallel_seconds, serial_seconds, calls):
    """Drive a Pace as gru_fast._schedule.run does, with the given times; returns which calls ran parallel."""
    pace = _schedule.Pace(workers=2)
    ran = []
    for _ in range(calls):
        parallel = pace.wants_parallel()
        pace.record(parallel, parallel_seconds() if parallel else serial_seconds)
        ran.append(parallel)
    return pace, ran


def _all_but_calibration(ran):
    """Every call ran parallel but those that measured the serial path (from the CALIBRATE-th)."""
    first, end = _schedule.Pace.CALIBRATE - 1, _schedule.Pace.CALIBRATE - 1 + _schedule.Pace.CALIBRATIONS
    return not any(ran[first:end]) and all(ran[:first] + ran[end:])


def test_pace_keeps_a_parallel_plan_parallel_while_it_is_faster():
    pace, ran = _paced(lambda: 10e-6, 16e-6, 2000)
    assert not pace.serial_mode and _all_but_calibration(ran)
    assert list(pace.serial_times) == [16e-6] * _schedule.Pace.CALIBRATIONS


def test_pace_measures_the_serial_path_to_judge_stalls():
    """B=1 T=100 H=256 beside a busy neighbour: parallel calls of 0.65 ms, one in six stalled 4.9 ms, a
    serial call 0.95 ms.  The mean of the parallel calls is under 1.1 x twice the fastest (what stands in
    for the serial cost before any serial call), so without the measured serial call the plan would stay
    parallel; with it, the plan turns serial within the first two windows."""
    calls = iter(range(10**6))
    pace, ran = _paced(lambda: 4.9e-3 if next(calls) % 6 == 5 else 0.65e-3, 0.95e-3, 200)
    calibrated = _schedule.Pace.CALIBRATE - 1 + _schedule.Pace.CALIBRATIONS
    assert pace.serial_mode and False in ran[calibrated : 2 * _schedule.Pace.WINDOW]


def test_pace_takes_the_measured_serial_cost_over_a_share_of_the_fastest_parallel_call():
    """A streaming step of B=1 I=H=256 measured here: 14-17 us in parallel (10 us in a fast phase of the
    host), 29 us serially -- more than twice, because one core's half of the weights fits its L2 cache
    and all of them do not.  Windows of parallel calls with three hiccups of the host (trimmed means near
    30 us) stay under 1.1 x the measured serial call, so the plan stays parallel; twice the fastest
    parallel call (20 us) taken as the serial cost would have turned it serial."""
    calls = iter(range(10**6))

    def parallel_seconds():
        call = next(calls)
        if call < 40:
            return 10e-6
        return {3: 100e-6, 8: 150e-6, 12: 400e-6}.get(call % 16, 15e-6)

    pace, ran = _paced(parallel_seconds, 29e-6, 2000)
    assert not pace.serial_mode and _all_but_calibration(ran)


def test_pace_calibrates_the_serial_cost_on_more_than_one_call():
    """A hiccup of the host in a calibration call must not set the serial cost (nothing refreshes it while
    the plan is parallel): calibrated on 300 us and 29 us the cost is 29 us, and once its parallel calls
    slow from 15 to 45 us (another engine's pool spinning on the second core) the plan turns serial
    within two windows."""
    pace = _schedule.Pace(workers=2)
    serial = iter([300e-6, 29e-6])
    ran = []
    for call in range(300):
        parallel = pace.wants_parallel()
        pace.record(parallel, (15e-6 if call < 100 else 45e-6) if parallel else next(serial, 29e-6))
        ran.append(parallel)
    assert pace._serial_cost() == 29e-6 and pace.serial_mode
    assert False in ran[100 : 100 + 2 * _schedule.Pace.WINDOW]


def test_pace_does_not_count_cold_serial_calls(monkeypatch):
    """A brief call after a pause of over _BACK_TO_BACK_S runs serially (PARALLEL does not wake the
    workers for it) and finds the weights out of cache: 125-215 us for a 17-30 us streaming step.  Its
    time is not the serial path's: calls that come in batches (a benchmark's, a server's bursts) would
    otherwise fill the last serial times with cold ones within four pauses."""
    clock = [100.0]
    monkeypatch.setattr(_schedule, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(_schedule, "_running_tasks", lambda: 1)  # an idle machine
    policy, pace = _schedule._ParallelPolicy(), _schedule.Pace(workers=2)
    plan = SimpleNamespace(brief=True, pace=pace, workers=2)

    def call(after):
        clock[0] += after
        granted = policy.acquire(plan, clock[0])
        seconds = 15e-6 if granted else 200e-6 if pace.cold else 29e-6
        clock[0] += seconds
        if granted:
            policy.release()
        pace.record(granted, seconds)
        return granted

    for _ in range(6):
        assert not call(0.03) and pace.cold  # a batch's first call: after a pause, serial and cold
        for _ in range(20):
            call(1e-6)
    assert list(pace.serial_times) == [29e-6] * _schedule.Pace.CALIBRATIONS and pace._serial_cost() == 29e-6


def test_a_call_that_would_wake_the_workers_waits_for_a_free_core(monkeypatch):
    """PARALLEL reads the machine's count of running tasks (/proc/loadavg) when a parallel launch would
    wake sleeping workers: on a 2-CPU machine with a neighbour running beside the caller the call runs
    serially (its second worker would wait for the neighbour's time slice), and the machine counts as busy
    for _BACK_TO_BACK_S before it is read again.  Within _WORKERS_SPIN_S of a parallel call gru_fast's own
    worker may still be spinning, one of the running tasks; back to back, nothing is read."""
    clock, running, reads = [100.0], [1], []

    def running_tasks():
        reads.append(clock[0])
        return running[0]

    monkeypatch.setattr(_schedule, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(_schedule, "_running_tasks", running_tasks)
    monkeypatch.setattr(_schedule, "_CPUS", 2)
    policy = _schedule._ParallelPolicy()
    pace = _schedule.Pace(workers=2)
    plan = SimpleNamespace(brief=False, pace=pace, workers=2)
    pace.calls = 10  # past the calibration calls

    def call(after, seconds=1e-3):
        clock[0] += after
        granted = policy.acquire(plan, clock[0])
        clock[0] += seconds
        if granted:
            policy.release()
        return granted

    assert call(1.0) and len(reads) == 1  # idle, workers asleep: read, parallel
    assert call(1e-6) and len(reads) == 1  # back to back: not read
    running[0] = 2
    assert call(5e-3) and len(reads) == 2  # 5 ms after a parallel call: the other task is our worker
    running[0] = 3
    assert not call(5e-3) and len(reads) == 3  # one task more: no core free
    assert not call(5e-4) and len(reads) == 3  # within _BACK_TO_BACK_S of that: busy, not read
    running[0] = 2
    assert not call(0.05) and len(reads) == 4  # workers asleep since: a neighbour beside the caller
    running[0] = 1
    assert call(3e-3) and len(reads) == 5  # the neighbour is gone


def test_pace_ignores_a_lone_stall_on_an_idle_machine():
    times = iter([10e-6] * 50 + [8e-3] + [10e-6] * 1000)
    pace, ran = _paced(lambda: next(times), 16e-6, 1000)
    assert not pace.serial_mode and _all_but_calibration(ran)


def test_pace_probes_long_calls_with_one_call():
    """Where a serial call takes LONG_CALL_S or more, waking the other worker is a small part of a parallel
    call: a probe is one parallel call (each of which may stall beside a neighbour), not PROBE_CALLS.
    Shorter calls keep PROBE_CALLS calls a probe."""
    for serial_seconds, probe_calls in ((0.9e-3, 1), (16e-6, _schedule.Pace.PROBE_CALLS)):
        pace = _schedule.Pace(workers=2)
        ran = []
        for call in range(5000):
            parallel = pace.wants_parallel()
            stalled = call >= 50
            pace.record(parallel, (8e-3 if stalled else serial_seconds / 1.5) if parallel else serial_seconds)
            ran.append(parallel)
        assert pace.serial_mode
        runs = [len(run) for run in "".join("p" if p else "." for p in ran[100:]).split(".") if run]
        assert runs and set(runs) == {probe_calls}, runs


def test_pace_judges_probes_that_follow_long_serial_calls():
    """Serial calls of 3 ms each leave the workers idle for longer than _BACK_TO_BACK_S, so every probe
    comes "after a pause" (PARALLEL.acquire sets ``after_pause``); probes are judged all the same: beside
    a neighbour (every parallel call stalls, 8 ms) they grow rare, LONG_PROBE_SPACING_S of serial calls
    apart at most (a long plan's), and once it is gone (2 ms parallel calls) the plan turns parallel
    again."""
    pace = _schedule.Pace(workers=2)
    ran = []

    def call(parallel_seconds):
        parallel = pace.wants_parallel()
        if parallel:
            pace.after_pause = pace.serial_mode  # as PARALLEL.acquire finds it after a 3 ms serial call
        pace.record(parallel, parallel_seconds if parallel else 3e-3)
        ran.append(parallel)

    for i in range(6000):
        call(2e-3 if i < 50 else 8e-3)
    cap = int(_schedule.Pace.LONG_PROBE_SPACING_S / 3e-3)  # the measured serial cost
    assert pace.serial_mode and pace.long and pace.probe_every == pace.max_probe_every == cap
    assert sum(ran[100:]) <= len(ran[100:]) // 200
    for _ in range(3 * _schedule.Pace.PROBES * _schedule.Pace.MAX_PROBE_EVERY):
        call(2e-3)
    assert not pace.serial_mode


def test_pace_brings_a_long_plan_back_soon_after_a_burst():
    """A 2.5 ms call (4 ms serially) stalls in a burst (another engine's thread pool spinning beside it:
    parallel calls of 10 ms in a row) and turns serial; once the burst is over, the plan is parallel
    again after LONG_PROBES one-call probes FIRST_PROBE_EVERY calls apart, not after PROBES probes of a
    short plan."""
    pace = _schedule.Pace(workers=2)
    ran = []
    for call in range(300):
        parallel = pace.wants_parallel()
        pace.record(parallel, (10e-3 if 30 <= call < 40 else 2.5e-3) if parallel else 4e-3)
        ran.append(parallel)
    turned = ran.index(False, _schedule.Pace.CALIBRATE - 1 + _schedule.Pace.CALIBRATIONS)
    assert 30 < turned <= 40 and pace.long
    back = turned + _schedule.Pace.LONG_PROBES * _schedule.Pace.FIRST_PROBE_EVERY
    assert ran[turned:back].count(True) == _schedule.Pace.LONG_PROBES and all(ran[back:])
    assert not pace.serial_mode


def test_pace_runs_serially_beside_a_neighbour_and_probes_back():
    """One parallel call in ten, at random, waits a scheduler time slice (8 ms) for its second core: the
    mean is far over the serial path's, so calls run serially with ever rarer parallel probes (PROBE_CALLS
    calls each); when the machine frees up, the probes bring the plan back to parallel."""
    rng = random.Random(2)
    busy = lambda: 8e-3 if rng.random() < 0.1 else 10e-6  # noqa: E731
    pace, ran = _paced(busy, 16e-6, 3000)
    assert pace.serial_mode and pace.serial_times  # serial calls measured their own time
    tail = ran[1000:]
    assert tail.count(True) <= _schedule.Pace.PROBE_CALLS * len(tail) // _schedule.Pace.FIRST_PROBE_EVERY
    for _ in range(3 * _schedule.Pace.PROBES * _schedule.Pace.MAX_PROBE_EVERY):  # the neighbour is gone
        parallel = pace.wants_parallel()
        pace.record(parallel, 10e-6 if parallel else 16e-6)
    assert not pace.serial_mode


def test_pace_comes_back_when_only_the_first_calls_after_serial_ones_are_slow():
    """Parallel calls right after serial ones find the other worker asleep, then sharing the caller's
    core (measured here after 512 serial calls of a B=1 H=256 step: 117 us, 72 us, then 17 us warm against
    25 us serially): probes time the last of PROBE_CALLS parallel calls, so a plan that went serial during
    a burst of stalls turns parallel again once the burst is over."""
    pace = _schedule.Pace(workers=2)
    in_a_row = 0  # parallel calls since the last serial one
    for call in range(3000):
        parallel = pace.wants_parallel()
        if not parallel:
            seconds, in_a_row = 25e-6, 0
        elif call < 200:
            seconds = 8e-3 if call % 4 == 0 else 12e-6  # the burst: one parallel call in four stalls
        else:
            seconds = (117e-6, 72e-6)[in_a_row] if in_a_row < 2 else 17e-6
            in_a_row += 1
        pace.record(parallel, seconds)
        if call == 199:
            assert pace.serial_mode
    assert not pace.serial_mode


def test_pace_probes_grow_rare_while_they_fail():
    """Beside a neighbour that never lets go, every parallel call stalls (8 ms against 16 us serially):
    each failed probe doubles the interval to the next, so probes are under 0.5 % of the calls and the
    calls' 99th percentile is the serial path's."""
    pace = _schedule.Pace(workers=2)
    ran = []
    for call in range(20000):
        parallel = pace.wants_parallel()
        pace.record(parallel, (10e-6 if call < 100 else 8e-3) if parallel else 16e-6)
        ran.append(parallel)
    assert pace.serial_mode and pace.probe_every == _schedule.Pace.MAX_PROBE_EVERY
    assert sum(ran[100:]) <= len(ran[100:]) // 200


def test_pace_probes_grow_rare_when_the_parallel_calls_after_them_stall():
    """Beside a neighbour on the other core, a probe's last call is often quick (the worker has just been
    woken and given the core) while the parallel calls after it stall again (here one in three waits
    8 ms): each short-lived return to parallel doubles the probe interval, so stalled calls stay under
    0.5 % of the calls and the calls' 99th percentile is the serial path's."""
    rng = random.Random(5)
    pace = _schedule.Pace(workers=2)
    in_a_row, slow = 0, 0
    for call in range(40000):
        parallel = pace.wants_parallel()
        if not parallel:
            seconds, in_a_row = 16e-6, 0
        else:
            in_a_row += 1
            if in_a_row < _schedule.Pace.PROBE_CALLS:
                seconds = 130e-6  # waking the worker
            elif in_a_row == _schedule.Pace.PROBE_CALLS:
                seconds = 10e-6
            else:
                seconds = 8e-3 if rng.random() < 1 / 3 else 10e-6
        slow += seconds > 1e-3
        pace.record(parallel, seconds)
    assert pace.probe_every == _schedule.Pace.MAX_PROBE_EVERY
    assert slow <= 40000 // 200, slow
