"""Scaling out with Dask: sequences per second on 1 vs 2 worker processes, against one process.

    python -m bench.dask_scaling [--quick] [--out bench/results/dask-scaling.json]

The workload: ``sequences`` padded sequences (T=50, I=40) through a one-layer GRU (H=128, float32),
``rows_per_task`` sequences per engine call, final states only (``output="h_n"``: the embedding use
case, and it keeps the results' trip to the client out of the measurement).  Every block of input is
generated from its own seed, so every configuration scores the same numbers.

Every engine runs on one thread: Dask workers and plain processes get ``NUMBA_NUM_THREADS=1`` and the
BLAS / OpenMP variables before they start (Dask's ``distributed.nanny.pre-spawn-environ``), one Dask
thread each; this process runs under ``gru_fast.peers.thread_limit(1)`` (gru_fast and the threadpoolctl
pools on one thread).

Configurations, all kept up together and timed in ``repeats`` rounds, each round in a fresh random order
(a burst of load from elsewhere on this shared machine lands on all of them alike; the figure is the
median):

* single process: the blocks, one engine call each, in a loop in this process;
* plain processes: the blocks split over 2 spawned processes without Dask (a barrier starts them
  together) -- what 2 processes get from this machine, the ceiling for 2 workers;
* Dask, 1 and 2 workers (``LocalCluster(processes=True, threads_per_worker=1)``): the input is
  generated on the workers and persisted first (not timed), then ``map_sequences`` is computed.

The first, untimed computation on each fresh cluster gives per-worker task durations from the task
stream: the first model task on a worker (the model fetched and unpickled, kernels loaded) against
the median of its later ones, and the workers' Numba cache hits / misses (a miss is a compile).  A
last 1-worker cluster with an empty ``NUMBA_CACHE_DIR`` shows what the first task costs when the
worker must compile.

Writes the JSON record and prints the markdown (:func:`markdown`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["run", "markdown", "NEEDS", "WORKLOAD", "QUICK_WORKLOAD"]

WORKLOAD = dict(sequences=20_000, steps=50, input_size=40, hidden_size=128, rows_per_task=500, repeats=5)
QUICK_WORKLOAD = dict(sequences=2_000, steps=50, input_size=40, hidden_size=128, rows_per_task=250, repeats=2)
WORKER_COUNTS = (1, 2)
#: the optional modules this measurement imports (bench.missing_modules names the extras)
NEEDS = ("dask", "distributed", "threadpoolctl")
ONE_THREAD_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                  "MKL_NUM_THREADS": "1", "BLIS_NUM_THREADS": "1"}
RESULT_PATH = Path(__file__).resolve().parent / "results" / "dask-scaling.json"


# ----------------------------------------------------------------------------------------------------
# the workload
# ----------------------------------------------------------------------------------------------------

def _model(workload: dict):
    import gru_fast

    rng = np.random.default_rng(0)
    H, I = workload["hidden_size"], workload["input_size"]
    scale = 1.0 / np.sqrt(H)
    W = rng.uniform(-scale, scale, (1, 3 * H, I)).astype(np.float32)
    R = rng.uniform(-scale, scale, (1, 3 * H, H)).astype(np.float32)
    B = rng.uniform(-scale, scale, (1, 6 * H)).astype(np.float32)
    return gru_fast.GRU([(W, R, B)])


def _block_count(workload: dict) -> int:
    return -(-workload["sequences"] // workload["rows_per_task"])


def _block(workload: dict, index: int) -> np.ndarray:
    """Input block ``index`` (T, rows, I), from its own seed."""
    rows = min(workload["rows_per_task"], workload["sequences"] - index * workload["rows_per_task"])
    shape = (workload["steps"], rows, workload["input_size"])
    return np.random.default_rng(1000 + index).standard_normal(shape, dtype=np.float32)


def _dask_input(workload: dict):
    """The same blocks as a dask array, each generated on the worker that holds it."""
    import dask.array as da

    def make(block_info=None):
        return _block(workload, block_info[None]["chunk-location"][1])

    rows = workload["rows_per_task"]
    batch_chunks = tuple(min(rows, workload["sequences"] - start) for start in range(0, workload["sequences"], rows))
    chunks = ((workload["steps"],), batch_chunks, (workload["input_size"],))
    return da.map_blocks(make, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))


def _summary(times: list, sequences: int) -> dict:
    median = statistics.median(times)
    return {"seconds": times, "median_s": median, "sequences_per_s": sequences / median}


@contextlib.contextmanager
def _one_thread_children():
    """Children spawned inside see one-thread engines; this process's environment is restored after."""
    saved = dict(os.environ)
    os.environ.update(ONE_THREAD_ENV)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------------------------------
# without Dask
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _single_process(model, workload: dict):
    """Yields a runner: the blocks, one engine call each, in this process on one thread; -> seconds."""
    from gru_fast.peers import thread_limit

    blocks = [_block(workload, index) for index in range(_block_count(workload))]

    def once() -> float:
        with thread_limit(1):  # gru_fast and the BLAS / OpenMP pools (threadpoolctl) on one thread
            start = time.perf_counter()
            for block in blocks:
                model(block)
            return time.perf_counter() - start

    model(blocks[0])  # kernels loaded outside the timing
    yield once


_POOL_STATE: dict = {}


def _pool_init(workload: dict, barrier) -> None:
    _POOL_STATE.update(model=_model(workload), workload=workload, barrier=barrier)
    _POOL_STATE["model"](_block(workload, 0))  # kernels loaded before any timing


def _pool_run(indices: list) -> tuple[float, float]:
    """Run this process's share of the blocks once all processes are ready; (start, stop) on the shared clock."""
    model, workload = _POOL_STATE["model"], _POOL_STATE["workload"]
    blocks = [_block(workload, index) for index in indices]
    _POOL_STATE["barrier"].wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    for block in blocks:
        model(block)
    return start, time.perf_counter()


@contextlib.contextmanager
def _plain_processes(workload: dict, processes: int):
    """Yields a runner: the blocks split over ``processes`` spawned processes, no Dask; -> seconds from the
    first start to the last stop (a barrier starts them together; a process blocked on it takes no second
    share, so each process gets exactly one)."""
    context = multiprocessing.get_context("spawn")
    indices = list(range(_block_count(workload)))
    barrier = context.Barrier(processes)  # reusable: it resets once every process has passed
    with _one_thread_children():
        pool = context.Pool(processes, initializer=_pool_init, initargs=(workload, barrier))
    with pool:
        def once() -> float:
            spans = pool.map(_pool_run, [indices[k::processes] for k in range(processes)], chunksize=1)
            return max(stop for _, stop in spans) - min(start for start, _ in spans)

        yield once


@contextlib.contextmanager
def _cluster(workers: int, extra_env: dict | None = None):
    """A LocalCluster of ``workers`` one-thread processes running one-thread engines, and its client."""
    import dask
    from distributed import Client, LocalCluster

    pre_spawn = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}), **ONE_THREAD_ENV, **(extra_env or {}))
    with _one_thread_children():  # the nanny also writes its pre-spawn variables here
        with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.CRITICAL)
        with cluster, Client(cluster, set_as_default=False) as client:
            yield client


def _first_task_costs(task_stream: list) -> list:
    """Per worker: the first model task's duration vs the median of its later ones (seconds)."""
    per_worker: dict = {}
    for task in task_stream:
        if "gru_fast-run" not in str(task["key"]):  # the model calls, not the model key or the getitems
            continue
        compute = [s for s in task["startstops"] if s["action"] == "compute"]
        if compute:
            per_worker.setdefault(task["worker"], []).append((compute[0]["start"], compute[0]["stop"]))
    costs = []
    for worker, spans in sorted(per_worker.items()):
        durations = [stop - start for start, stop in sorted(spans)]
        costs.append({
            "worker": worker,
            "tasks": len(durations),
            "first_task_s": durations[0],
            "later_tasks_median_s": statistics.median(durations[1:]) if len(durations) > 1 else None,
        })
    return costs


@contextlib.contextmanager
def _on_cluster(model, workload: dict, workers: int, first_run: dict, extra_env: dict | None = None):
    """Yields a runner computing the final states on a fresh cluster; -> seconds.

    Before yielding: the input is generated on the workers, persisted and spread evenly (as a storage
    read would leave it), and the first computation is recorded into ``first_run`` (its duration, the
    per-worker task costs, the workers' kernel cache hits / misses).
    """
    import gru_fast.dask as gd
    from distributed import futures_of, get_task_stream, wait
    from gru_fast import kernel_cache_stats

    with _cluster(workers, extra_env) as client, client.as_current():
        x = client.persist(_dask_input(workload))
        wait(futures_of(x))
        client.rebalance(futures_of(x))
        h_n = gd.map_sequences(model, x, output="h_n")
        with get_task_stream(client) as stream:
            start = time.perf_counter()
            client.compute(h_n, sync=True)
            first_run["first_run_s"] = time.perf_counter() - start
        cache = client.run(kernel_cache_stats)
        first_run["first_task_per_worker"] = _first_task_costs(stream.data)
        for entry in first_run["first_task_per_worker"]:
            entry.update(cache.get(entry["worker"], {}))
        first_run["input_blocks_per_worker"] = sorted(len(keys) for keys in client.has_what().values())

        def once() -> float:
            start = time.perf_counter()
            client.compute(h_n, sync=True)
            return time.perf_counter() - start

        yield once


# ----------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------

def run(quick: bool = False) -> dict:
    """Measure single process, 2 plain processes, and 1 / 2 Dask workers on this machine; the result record.

    All four stay up together and are timed in rounds, each round in a fresh random order, so a burst
    of load from elsewhere on the machine lands on every configuration alike.
    """
    import random

    from .report import machine_info

    workload = dict(QUICK_WORKLOAD if quick else WORKLOAD)
    model = _model(workload)
    result = {"workload": workload, "quick": quick, "machine": machine_info(), "worker_env": ONE_THREAD_ENV}
    first_runs = {str(n): {} for n in WORKER_COUNTS}
    names = ["single_process", "plain_processes_2"] + [f"dask_workers_{n}" for n in WORKER_COUNTS]
    times: dict = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        runners = {
            "single_process": stack.enter_context(_single_process(model, workload)),
            "plain_processes_2": stack.enter_context(_plain_processes(workload, 2)),
        }
        for n in WORKER_COUNTS:
            runners[f"dask_workers_{n}"] = stack.enter_context(_on_cluster(model, workload, n, first_runs[str(n)]))
        shuffle = random.Random(0)
        for _ in range(workload["repeats"]):
            order = list(names)
            shuffle.shuffle(order)
            for name in order:
                times[name].append(runners[name]())
    for name in names:
        result[name] = _summary(times[name], workload["sequences"])
    for n in WORKER_COUNTS:
        result[f"dask_workers_{n}"].update(first_runs[str(n)])
    if not quick:  # a worker compiling every kernel: tens of seconds, the full run's row
        cold: dict = {}
        with tempfile.TemporaryDirectory(prefix="gru_fast-cold-cache-") as empty_cache:
            with _on_cluster(model, workload, 1, cold, extra_env={"NUMBA_CACHE_DIR": empty_cache}):
                pass
        result["dask_cold_cache"] = cold
    result["load_average_at_end"] = list(os.getloadavg())
    base = result["single_process"]["sequences_per_s"]
    for name in names:
        result[name]["vs_single_process"] = result[name]["sequences_per_s"] / base
    result["dask_2_vs_1_workers"] = (result["dask_workers_2"]["sequences_per_s"]
                                     / result["dask_workers_1"]["sequences_per_s"])
    return result


def markdown(result: dict) -> str:
    """The scaling entry of the benchmark report."""
    w, machine = result["workload"], result["machine"]
    load = lambda values: "/".join(f"{v:.1f}" for v in values)  # noqa: E731
    rows = [("single process (same blocks, 1 thread)", result["single_process"]),
            ("2 plain processes, no Dask (ceiling for 2 workers)", result["plain_processes_2"])]
    rows += [(f"Dask, {n} worker{'s' if n != 1 else ''} x 1 thread", result[f"dask_workers_{n}"])
             for n in WORKER_COUNTS]
    lines = [
        "## Scaling out with Dask (LocalCluster on this machine)",
        "",
        f"{w['sequences']:,} sequences, T={w['steps']}, I={w['input_size']}, H={w['hidden_size']}, one layer, "
        f"float32, {w['rows_per_task']} sequences per task, final states returned; every engine on 1 thread; "
        f"median of {w['repeats']} interleaved rounds.  {machine.get('cpu_model')}, {machine.get('usable_cores')} usable cores; "
        f"load average {load(machine.get('load_average') or [])} at start, "
        f"{load(result.get('load_average_at_end') or [])} at end (the machine is shared: other processes' load "
        "shows in the 2-process rows first).",
        "",
        "| configuration | median s | sequences/s | vs single process |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, entry in rows:
        lines.append(f"| {label} | {entry['median_s']:.2f} | {entry['sequences_per_s']:,.0f} | "
                     f"{entry.get('vs_single_process', 1.0):.2f} |")
    lines += [
        "",
        f"Dask 2 workers vs 1: x{result['dask_2_vs_1_workers']:.2f}.",
        "",
        "First computation on a fresh cluster: the first model task on a worker (model fetched and unpickled, "
        "kernels loaded) vs its later tasks; Numba cache hits / misses on the worker (a miss is a compile).",
        "",
        "| cluster | tasks | first task s | later tasks median s | cache hits / misses |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    clusters = [(f"{n} worker{'s' if n != 1 else ''}, warm cache", result[f"dask_workers_{n}"]) for n in WORKER_COUNTS]
    if "dask_cold_cache" in result:
        clusters.append(("1 worker, empty NUMBA_CACHE_DIR", result["dask_cold_cache"]))
    for label, entry in clusters:
        for cost in entry["first_task_per_worker"]:
            later = cost["later_tasks_median_s"]
            lines.append(f"| {label} | {cost['tasks']} | {cost['first_task_s']:.3f} | "
                         f"{'-' if later is None else f'{later:.3f}'} | "
                         f"{cost.get('cache_hits', '?')} / {cost.get('cache_misses', '?')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dask_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller workload, no empty-cache worker (well under a minute)")
    parser.add_argument("--out", type=Path, default=RESULT_PATH, help="where the JSON record goes")
    args = parser.parse_args(argv)
    from . import missing_modules
    from .report import write_json

    missing = missing_modules(NEEDS)
    if missing:
        raise SystemExit(f"python -m bench.dask_scaling: {missing}")
    result = run(quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
