"""Long-running use does not grow memory: 100,000 stream steps and 10,000 sequence calls.

A service calls the engine for weeks; a leak of a few bytes per call is a crash after enough calls.  After a
warm-up (every shape and path once), a child process runs each workload and reports its resident set size
(VmRSS from /proc/self/status) and Numba's runtime allocation counters before and after.

Authorities: the kernel's own accounting of resident memory (growth must stay below 1 MB = 2**20 bytes
per workload), and ``numba.core.runtime.rtsys.get_allocation_stats()`` with ``NUMBA_NRT_STATS=1`` (no net
NRT allocation: allocs - frees unchanged, for calls with and without ``out=``).  tests/test_allocation.py
proves the counters are live and that 50 warm calls with ``out=`` allocate nothing; this file runs the
long workloads.  The measured figures are printed in the test's output (``-s``) and asserted here.

Workloads (a 2-layer float32 model, I=4, H=8, so the whole file runs in seconds):

* streams: 100,000 ``step`` calls, half with a fresh result array, half into ``out=``, over a batch of 3
  and an unbatched stream, with periodic ``reset``;
* sequences: 10,000 calls cycling through 12 shapes (more than the 8 workspaces a thread caches, so
  workspaces are evicted and re-created all along), with lengths, h0, batch_first and out=;
* churn: 2,000 models and streams created and dropped, and 300 short-lived threads each making a call
  (thread-local workspaces must die with their thread).
"""

from __future__ import annotations

import textwrap

import pytest

from conftest import last_json_line, run_python

LIMIT = 1 << 20  # bytes of resident memory growth allowed per workload

CHILD = textwrap.dedent(
    """
    import gc
    import json
    import threading

    import numpy as np
    from numba.core.runtime import rtsys

    import gru_fast

    def rss():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def nrt():
        s = rtsys.get_allocation_stats()
        return {"net": s.alloc - s.free, "mi_net": s.mi_alloc - s.mi_free, "alloc": s.alloc}

    rng = np.random.default_rng(0)

    def weights(D, I, H, L):
        return [(rng.uniform(-0.5, 0.5, (D, 3 * H, I if l == 0 else D * H)).astype(np.float32),
                 rng.uniform(-0.5, 0.5, (D, 3 * H, H)).astype(np.float32),
                 rng.uniform(-0.5, 0.5, (D, 6 * H)).astype(np.float32)) for l in range(L)]

    W_FWD = weights(1, 4, 8, 2)
    W_BI = weights(2, 4, 8, 2)
    model = gru_fast.GRU(W_FWD)
    bi_bf = gru_fast.GRU(W_BI, direction="bidirectional", batch_first=True)

    stream_x = rng.standard_normal((64, 3, 4)).astype(np.float32)
    shapes = [(T, B) for T in (1, 5, 17) for B in (1, 2, 7, 9)]  # 12 shapes
    seq_inputs = []
    for i, (T, B) in enumerate(shapes):
        m = bi_bf if i % 3 == 2 else model
        LD = m.num_layers * m.num_directions
        x = rng.standard_normal((B, T, 4) if m.batch_first else (T, B, 4)).astype(np.float32)
        h0 = rng.standard_normal((LD, B, 8)).astype(np.float32) if i % 2 else None
        lengths = rng.integers(0, T + 1, B) if i % 4 == 1 else None
        y, h_n = m(x, h0, lengths)
        seq_inputs.append((m, x, h0, lengths, np.empty_like(y), np.empty_like(h_n)))

    def streams(n):
        batched = model.stream(batch_size=3)
        single = model.stream(batch_size=None)
        buf3 = np.empty((3, 8), np.float32)
        buf1 = np.empty(8, np.float32)
        for i in range(n // 4):
            x = stream_x[i % 64]
            batched.step(x)
            batched.step(x, out=buf3)
            single.step(x[0])
            single.step(x[1], out=buf1)
            if i % 1000 == 999:
                batched.reset()
                single.reset()
        return bool(np.isfinite(buf3).all() and np.isfinite(buf1).all())

    def sequences(n):
        ok = True
        for i in range(n):
            m, x, h0, lengths, y, h_n = seq_inputs[i % len(seq_inputs)]
            if i % 2:
                m(x, h0, lengths, out=(y, h_n))
            else:
                y2, h2 = m(x, h0, lengths)
                ok &= bool(np.isfinite(y2).all())
        return ok

    def churn(n_models, n_threads):
        x = stream_x[:5]
        for i in range(n_models):
            m = gru_fast.GRU(W_FWD if i % 2 else W_BI, direction="forward" if i % 2 else "bidirectional")
            m(x)
            if i % 2:
                m.stream(batch_size=3).step(x[0])
        for i in range(n_threads):
            t = threading.Thread(target=lambda: model(x))
            t.start()
            t.join()
        return True

    def measure(name, work, *args):
        gc.collect()
        rss0, nrt0 = rss(), nrt()
        ok = work(*args)
        gc.collect()
        rss1, nrt1 = rss(), nrt()
        return {"rss_before": rss0, "rss_after": rss1, "rss_growth": rss1 - rss0, "nrt_before": nrt0,
                "nrt_after": nrt1, "ok": ok}

    # warm-up: every path, shape and churn pattern once, at a tenth of the size
    streams(10_000)
    sequences(1_000)
    churn(200, 30)

    # the instruments are live: 4 MiB kept and touched show in VmRSS, an allocating njit call in NRT
    import numba
    from numba.core import config

    @numba.njit(cache=False)
    def allocating_probe(n):
        return np.empty(n)

    kept = []
    report = {"nrt_stats": bool(config.NRT_STATS)}
    report["controls"] = measure("controls", lambda: bool(kept.append(np.ones(1 << 19)) or allocating_probe(4).size))
    report["streams"] = measure("streams", streams, 100_000)
    report["sequences"] = measure("sequences", sequences, 10_000)
    report["churn"] = measure("churn", churn, 2_000, 300)
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    return last_json_line(run_python(CHILD, env={"NUMBA_NRT_STATS": "1"}, timeout=600))


def test_instruments_are_live(report):
    """Controls: keeping 4 MiB of touched memory moves VmRSS by at least that much, and an allocating
    njit call moves the NRT allocation counter."""
    control = report["controls"]
    assert control["rss_growth"] >= 4 << 20, control
    assert control["nrt_after"]["alloc"] > control["nrt_before"]["alloc"], control


@pytest.mark.parametrize("workload", ["streams", "sequences", "churn"])
def test_resident_memory_does_not_grow(report, workload):
    entry = report[workload]
    assert entry["ok"], f"{workload}: a result was not finite"
    print(f"\n{workload}: RSS {entry['rss_before']} -> {entry['rss_after']} bytes "
          f"(growth {entry['rss_growth']} bytes); NRT {entry['nrt_before']} -> {entry['nrt_after']}")
    assert entry["rss_growth"] < LIMIT, f"{workload}: resident memory grew by {entry['rss_growth']} bytes"


@pytest.mark.parametrize("workload", ["streams", "sequences", "churn"])
def test_numba_runtime_allocations_are_balanced(report, workload):
    """Every NRT allocation the kernels make is freed: no net growth of allocations or MemInfo records."""
    assert report["nrt_stats"] is True
    entry = report[workload]
    assert entry["nrt_after"]["net"] == entry["nrt_before"]["net"], entry
    assert entry["nrt_after"]["mi_net"] == entry["nrt_before"]["mi_net"], entry
