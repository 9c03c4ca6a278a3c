"""Per-call latency tails of the B=1 cases: p50 / p90 / p99 of every engine, idle and beside a busy neighbour.

The main table gives medians of batches of calls; a low-latency user lives at the slow calls.  Here every
call is timed on its own (``time.perf_counter_ns`` around it, after warm-up calls), for each B=1 case
(:data:`TAIL_CASES`) and each engine, plus gru_fast built and run serially (``gru_fast.threads(1)``, via
:func:`bench.engines.with_threads`), under two conditions:

- ``idle``: nothing started by the benchmark beside it (the machine's other load is measured and shown);
- ``neighbour``: one process running a pure-Python busy loop pinned to one core with
  ``os.sched_setaffinity`` (:func:`busy_neighbour`), started before the condition and killed after it.

The engines of a case are timed in rounds, in a shuffled order per round, a pause before each engine's
block of calls (the previous engine's thread pool stops spinning) and the garbage collector off while a
block runs.  Targets (issue 13): gru_fast's p99 at most :data:`IDLE_P99_OVER_P50` times its p50 when
idle; beside the neighbour, its p50 and p99 at most :data:`NEIGHBOUR_OVER_SERIAL` times those of its own
serial path beside the same neighbour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import time

import numpy as np

from gru_fast.peers import CpuMeter, timing

from .cases import CASE_BY_NAME, make_problem
from .engines import ENGINE_LABELS, Artifacts, build_engines, with_threads

__all__ = ["IDLE_P99_OVER_P50", "NEIGHBOUR_OVER_SERIAL", "PERCENTILES", "TAIL_CASES", "Neighbour", "TailSettings",
           "busy_neighbour", "markdown", "percentiles", "run", "time_calls", "verdict", "warm_up"]

#: the B=1 cases whose tails are measured
TAIL_CASES = ("stream", "latency", "long_seq")
PERCENTILES = (50, 90, 99)
#: target: gru_fast's p99 on an idle machine at most this many times its p50
IDLE_P99_OVER_P50 = 1.5
#: target: beside the neighbour, gru_fast's p50 and p99 at most this many times its serial path's
NEIGHBOUR_OVER_SERIAL = 1.10
#: the key of gru_fast run serially, beside the engines of :data:`bench.engines.ENGINES`
SERIAL = "gru_fast_serial"
CONDITIONS = ("idle", "neighbour")
LABELS = dict(ENGINE_LABELS, **{SERIAL: "gru_fast serial"})


@dataclasses.dataclass(frozen=True)
class TailSettings:
    """How many calls each engine makes per condition: about ``budget_s`` of calls, at least
    ``min_calls`` (the p99 of 1000 calls rests on its 10 slowest), at most ``max_calls``, and never more
    than ``cap_s`` of calls (a 2 ms call gets ``cap_s / 2 ms``, not ``min_calls``, when that is fewer).
    The calls are planned from the fastest warm-up call (:func:`warm_up`); a block of calls that runs
    past its share of ``cap_s`` (slower calls, or calls stalled by a neighbour) stops there, so fewer calls
    than planned may be measured."""

    budget_s: float = 1.0
    min_calls: int = 1000
    max_calls: int = 20_000
    cap_s: float = 3.0
    rounds: int = 5
    gap_s: float = 0.03
    #: the untimed first calls stop after this long (at least two run)
    warm_s: float = 0.5

    def calls(self, seconds_per_call: float) -> int:
        per_call = max(seconds_per_call, 1e-9)
        calls = min(self.max_calls, max(self.min_calls, round(self.budget_s / per_call)))
        return max(self.rounds, min(calls, int(self.cap_s / per_call)))


FULL = TailSettings()
QUICK = TailSettings(budget_s=0.2, min_calls=200, max_calls=4000, cap_s=0.3, rounds=3, warm_s=0.2)


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------

def percentiles(samples_ns, points=PERCENTILES) -> dict:
    """Per-call statistics of ``samples_ns`` (nanoseconds) in microseconds: ``p50_us``, ``p90_us``, ...
    (numpy's default linear interpolation between the two nearest ranks), ``mean_us``, ``max_us`` and
    ``calls``."""
    values = np.asarray(samples_ns, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"samples_ns must be a non-empty 1-d sequence of times, got shape {values.shape}")
    us = values / 1e3
    result = {f"p{p:g}_us": float(v) for p, v in zip(points, np.percentile(us, points))}
    result.update(mean_us=float(us.mean()), max_us=float(us.max()), calls=int(us.size))
    return result


def verdict(idle: dict, neighbour: dict) -> dict:
    """The two tail targets from the statistics (:func:`percentiles`) of gru_fast and of its serial path:
    ``idle`` and ``neighbour`` map ``"gru_fast"`` / :data:`SERIAL` to their statistics (missing -> None).
    A target is met (True), missed (False) or not measured (None)."""
    result = {"idle_p99_over_p50": None, "idle_met": None, "neighbour_p50_over_serial": None,
              "neighbour_p99_over_serial": None, "neighbour_met": None}
    gf = idle.get("gru_fast")
    if gf:
        result["idle_p99_over_p50"] = gf["p99_us"] / gf["p50_us"]
        result["idle_met"] = result["idle_p99_over_p50"] <= IDLE_P99_OVER_P50
    gf, serial = neighbour.get("gru_fast"), neighbour.get(SERIAL)
    if gf and serial:
        result["neighbour_p50_over_serial"] = gf["p50_us"] / serial["p50_us"]
        result["neighbour_p99_over_serial"] = gf["p99_us"] / serial["p99_us"]
        result["neighbour_met"] = max(result["neighbour_p50_over_serial"],
                                      result["neighbour_p99_over_serial"]) <= NEIGHBOUR_OVER_SERIAL
    return result


# ----------------------------------------------------------------------------------------------------
# the busy neighbour
# ----------------------------------------------------------------------------------------------------

# the loop checks now and then that its parent is alive: a benchmark killed by a signal (no ``finally``
# runs) must not leave it spinning
_NEIGHBOUR_SCRIPT = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
parent = int(sys.argv[2])
sys.stdout.write("pinned\\n")
sys.stdout.flush()
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@dataclasses.dataclass(frozen=True)
class Neighbour:
    pid: int
    core: int
    process: subprocess.Popen


@contextlib.contextmanager
def busy_neighbour(core: int | None = None):
    """A child process spinning a pure-Python busy loop on one core for the block: ``with
    busy_neighbour() as n:`` (``n.pid``, ``n.core``).  ``core`` defaults to the last core this process may
    run on.  The child pins itself (``os.sched_setaffinity``) before it reports back, so the block starts
    with it pinned; it is killed and reaped on leaving, whatever happens in the block, and it ends by
    itself within milliseconds when this process dies without leaving the block (killed by a signal)."""
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("a pinned neighbour needs os.sched_setaffinity (Linux)")
    allowed = sorted(os.sched_getaffinity(0))
    if core is None:
        core = allowed[-1]
    elif core not in allowed:
        raise ValueError(f"core must be one of this process's cores {allowed}, got {core!r}")
    process = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR_SCRIPT, str(core), str(os.getpid())],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = process.stdout.readline()
        if line.strip() != b"pinned":
            process.kill()
            _, err = process.communicate(timeout=10)
            raise RuntimeError(f"the busy neighbour did not start: {err.decode(errors='replace').strip()[-300:]}")
        yield Neighbour(process.pid, core, process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------

def time_calls(runner, calls: int, max_seconds: float | None = None, warm: bool = True) -> np.ndarray:
    """Nanoseconds of each of ``calls`` calls of ``runner`` (with ``warm``, one untimed call first wakes its
    thread pool; the garbage collector is off meanwhile) -> int64 array.  With ``max_seconds``, the calls
    stop after the first one that ends past that long: the array is then shorter."""
    clock = time.perf_counter_ns
    samples = np.empty(calls, np.int64)
    done = calls
    with timing(runner, warm) as call:
        deadline = None if max_seconds is None else clock() + int(max_seconds * 1e9)
        for i in range(calls):
            start = clock()
            call()
            end = clock()
            samples[i] = end - start
            if deadline is not None and end > deadline:
                done = i + 1
                break
    return samples[:done]


def warm_up(runner, calls: int = 8, max_seconds: float = 0.5) -> float:
    """Make ``calls`` untimed first calls (lazy initialisation, a first parallel launch), fewer once
    ``max_seconds`` have passed (at least two) -> the seconds of the fastest after the first.  The fastest,
    not a median: first calls can be slow for a while, and planning too many calls costs nothing (a block
    stops at its deadline) where planning too few loses samples."""
    times = []
    with runner.context():
        started = time.perf_counter()
        for i in range(calls):
            start = time.perf_counter()
            runner.call()
            times.append(time.perf_counter() - start)
            if i >= 1 and time.perf_counter() - started > max_seconds:
                break
    return min(times[1:])


def _condition(runners: dict, calls: dict, settings: TailSettings, rng: random.Random) -> tuple[dict, float]:
    """Every runner's per-call samples over ``settings.rounds`` shuffled rounds -> (name -> statistics,
    share of the CPUs other processes used meanwhile)."""
    samples = {name: [] for name in runners}
    order = list(runners)
    meter = CpuMeter()
    for round_ in range(settings.rounds):
        rng.shuffle(order)
        for name in order:
            time.sleep(settings.gap_s)
            block = calls[name] // settings.rounds + (round_ < calls[name] % settings.rounds)
            if block:  # a call too slow for more than one a block is not woken first (as in time_interleaved)
                samples[name].append(time_calls(runners[name], block, settings.cap_s / settings.rounds,
                                                warm=block > 1))
    others = meter.share()
    return {name: percentiles(np.concatenate(parts)) for name, parts in samples.items()}, others


def _runners(artifacts: Artifacts, engines, log) -> tuple[dict, dict]:
    runners, rows = build_engines(artifacts, engines, log=log)
    status = {e: r["status"] if r["status"] != "ok" or r["parity_ok"] else
              f"disagrees with the reference (max abs err {r['parity_err']:.1e})" for e, r in rows.items()}
    if "gru_fast" in runners:
        try:
            runners[SERIAL] = with_threads("gru_fast", artifacts, 1)
            status[SERIAL] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            status[SERIAL] = f"error: {type(exc).__name__}: {exc}"
    return runners, status


def run(engines, quick: bool, seed: int = 0, workdir=None, artifacts_by_case=None, log=print,
        settings: TailSettings | None = None) -> dict:
    """The tail table: per case of :data:`TAIL_CASES`, per condition, per engine, :func:`percentiles`."""
    import tempfile

    settings = settings or (QUICK if quick else FULL)
    artifacts_by_case = artifacts_by_case or {}
    rng = random.Random(seed)
    result = {"settings": dataclasses.asdict(settings), "cases": []}
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gru_fast-tails-"))
        for name in TAIL_CASES:
            case = CASE_BY_NAME[name]
            log(f"  tails {name} ({case.shape})")
            artifacts = artifacts_by_case.get(name) or Artifacts(make_problem(case, seed), f"{workdir}/tails-{name}")
            runners, status = _runners(artifacts, engines, log)
            calls = {engine: settings.calls(warm_up(runner, max_seconds=settings.warm_s))
                     for engine, runner in runners.items()}
            row = {"name": name, "shape": case.shape, "status": status, "planned_calls": calls, "conditions": {},
                   "others_share": {}}
            for condition in CONDITIONS:
                try:
                    with busy_neighbour() if condition == "neighbour" else contextlib.nullcontext() as neighbour:
                        if neighbour is not None:
                            row["neighbour_core"] = neighbour.core
                        stats, share = _condition(runners, calls, settings, rng)
                except Exception as exc:  # noqa: BLE001 - a condition that cannot run is reported
                    row["conditions"][condition] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                row["conditions"][condition] = stats
                row["others_share"][condition] = share
            row["verdict"] = verdict(*(row["conditions"].get(c, {}) for c in CONDITIONS))
            result["cases"].append(row)
    return result


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------

def _us(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _met(flag) -> str:
    return {True: "yes", False: "**no**", None: "-"}[flag]


def markdown(tails: dict) -> str:
    s = tails["settings"]
    lines = ["## Latency tails (B=1, every call timed)", ""]
    lines.append(
        f"Each call timed on its own with `time.perf_counter_ns` after warm-up calls; per engine and condition "
        f"about {s['budget_s']:g} s of calls, at least {s['min_calls']} (fewer only where {s['min_calls']} calls "
        f"would take over {s['cap_s']:g} s, or calls stalled past that), in {s['rounds']} rounds with the engines "
        f"in a shuffled order and a "
        f"{1e3 * s['gap_s']:.0f} ms pause before each block; garbage collector off.  *idle*: nothing started "
        f"beside it; *neighbour*: one pure-Python busy loop pinned to one core (`os.sched_setaffinity`), killed "
        f"after.  *gru_fast serial*: the same model built and run under `gru_fast.threads(1)`.  Times in us; "
        f"\"others\" is the share of the CPUs other processes used meanwhile (the neighbour included).  The p99 "
        f"of fewer than 100 calls is about the slowest call.")
    lines.append("")
    lines.append("| case | engine | idle calls | p50 | p90 | p99 | p99/p50 | neighbour calls | p50 | p90 | p99 "
                 "| p99/p50 |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for row in tails["cases"]:
        engines = list(row["status"])
        for engine in engines:
            cells = [f"{row['name']} ({row['shape']})", LABELS.get(engine, engine)]
            for condition in CONDITIONS:
                stats = row["conditions"].get(condition, {}).get(engine)
                if not isinstance(stats, dict):
                    cells += ["-"] * 5
                    continue
                cells += [str(stats["calls"]), _us(stats["p50_us"]), _us(stats["p90_us"]), _us(stats["p99_us"]),
                          f"{stats['p99_us'] / stats['p50_us']:.2f}"]
            if row["status"][engine] != "ok":
                cells[1] += f" ({row['status'][engine]})"
            lines.append("| " + " | ".join(cells) + " |")
        for condition in CONDITIONS:
            entry = row["conditions"].get(condition, {})
            if "error" in entry:
                notes.append(f"{row['name']}, {condition}: not measured: {entry['error']}")
        shares = ", ".join(f"{c} {100 * v:.0f} %" for c, v in row["others_share"].items())
        if shares:
            notes.append(f"{row['name']}: others' share of the CPUs: {shares}"
                         + (f"; neighbour on core {row['neighbour_core']}" if "neighbour_core" in row else ""))
    lines.append("")
    lines.extend(f"- {note}" for note in notes)
    lines.append("")
    lines.append(f"| case | gru_fast idle p99/p50 (target <= {IDLE_P99_OVER_P50:g}) | met? | beside the neighbour: "
                 f"gru_fast / its serial path, p50 | p99 (target <= {NEIGHBOUR_OVER_SERIAL:.2f} both) | met? |")
    lines.append("|---|---|---|---|---|---|")
    for row in tails["cases"]:
        v = row["verdict"]
        ratio = (lambda x: "-" if x is None else f"{x:.2f}")
        lines.append(f"| {row['name']} ({row['shape']}) | {ratio(v['idle_p99_over_p50'])} | {_met(v['idle_met'])} | "
                     f"{ratio(v['neighbour_p50_over_serial'])} | {ratio(v['neighbour_p99_over_serial'])} | "
                     f"{_met(v['neighbour_met'])} |")
    lines.append("")
    return "\n".join(lines)
