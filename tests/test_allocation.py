"""Allocation-free steady state: with ``out=`` buffers, repeated calls make no Numba (NRT) allocation.

Authority: Numba's own runtime allocation counters, ``numba.core.runtime.rtsys.get_allocation_stats()``
(alloc / mi_alloc count every NRT allocation of memory and of MemInfo records).  They only count when
``NUMBA_NRT_STATS=1`` is set before numba is imported, so each check runs in a child process that sets it,
warms the call up once for its shape, reads the counters, makes 50 more calls, reads them again and prints
the numbers as JSON for this process to assert on.  The child first proves the counters work by calling
a small allocating njit function.
"""

from __future__ import annotations

import textwrap

import pytest

from conftest import last_json_line, run_python

CHILD = textwrap.dedent(
    """
    import json
    import numba
    import numpy as np
    from numba.core.runtime import rtsys

    import gru_fast

    REPEATS = 50

    @numba.njit(cache=False)
    def _allocating_probe(n):
        return np.empty(n)

    def stats():
        s = rtsys.get_allocation_stats()
        return {"alloc": s.alloc, "free": s.free, "mi_alloc": s.mi_alloc, "mi_free": s.mi_free}

    rng = np.random.default_rng(0)

    def model(num_layers, direction, I, H, dtype, **attrs):
        D = 2 if direction == "bidirectional" else 1
        layers = []
        for l in range(num_layers):
            n_in = I if l == 0 else D * H
            layers.append((rng.uniform(-0.3, 0.3, (D, 3 * H, n_in)).astype(dtype),
                           rng.uniform(-0.3, 0.3, (D, 3 * H, H)).astype(dtype),
                           rng.uniform(-0.3, 0.3, (D, 6 * H)).astype(dtype)))
        return gru_fast.GRU(layers, direction=direction, **attrs)

    report = {"nrt_stats": bool(numba.config.NRT_STATS), "threads": numba.get_num_threads(),
              "calls": {}, "streams": {}, "bound": {}}

    _allocating_probe(4)
    before = stats()
    _allocating_probe(4)
    report["probe"] = {"before": before, "after": stats()}

    def check_call(name, m, x, h0=None, lengths=None):
        y_plain, h_plain = m(x, h0, lengths)
        y = np.empty_like(y_plain)
        h_n = np.empty_like(h_plain)
        m(x, h0, lengths, out=(y, h_n))  # warm-up for this shape
        before = stats()
        for _ in range(REPEATS):
            m(x, h0, lengths, out=(y, h_n))
        after = stats()
        report["calls"][name] = {"before": before, "after": after,
                                 "out_written": bool(np.array_equal(y, y_plain) and np.array_equal(h_n, h_plain))}

    def check_stream(name, m, batch_size, x_t, h0=None):
        s = m.stream(batch_size=batch_size, h0=h0)
        buf = np.empty_like(s.step(x_t))
        s.step(x_t, out=buf)  # warm-up
        before = stats()
        for _ in range(REPEATS):
            s.step(x_t, out=buf)
        after = stats()
        report["streams"][name] = {"before": before, "after": after, "finite": bool(np.isfinite(buf).all())}

    def check_bound(name, m, x, h0=None):
        call = m.bind(x, h0)
        call()  # warm-up
        before = stats()
        for _ in range(REPEATS):
            call()
        after = stats()
        report["bound"][name] = {"before": before, "after": after}

    for dtype in (np.float32, np.float64):
        tag = np.dtype(dtype).name
        m = model(1, "forward", 3, 4, dtype)
        check_call(f"forward small {tag}", m, rng.standard_normal((5, 2, 3)).astype(dtype))

        m = model(2, "bidirectional", 16, 64, dtype)
        x = rng.standard_normal((20, 8, 16)).astype(dtype)
        h0 = rng.standard_normal((4, 8, 64)).astype(dtype)
        lengths = np.array([20, 1, 7, 20, 13, 2, 19, 9])
        check_call(f"2-layer bidirectional B=8 H=64 T=20 with lengths {tag}", m, x, h0, lengths)
        m = model(1, "bidirectional", 8, 32, dtype)
        check_call(f"bidirectional B=4 H=32 T=16 {tag}", m, rng.standard_normal((16, 4, 8)).astype(dtype))

        m = model(2, "forward", 4, 6, dtype, linear_before_reset=False, clip=2.0,
                  activations=["HardSigmoid", "Softsign"], activation_alpha=[0.25], activation_beta=[0.5])
        check_call(f"lbr=0 activations clip {tag}", m, rng.standard_normal((6, 3, 4)).astype(dtype),
                   rng.standard_normal((2, 3, 6)).astype(dtype), np.array([6, 0, 3]))

        m = model(1, "reverse", 4, 6, dtype)
        check_call(f"reverse with lengths {tag}", m, rng.standard_normal((6, 3, 4)).astype(dtype),
                   None, np.array([2, 6, 4]))

        m = model(2, "bidirectional", 4, 6, dtype, batch_first=True)
        check_call(f"batch_first {tag}", m, rng.standard_normal((3, 6, 4)).astype(dtype))
        check_call(f"unbatched {tag}", m, rng.standard_normal((6, 4)).astype(dtype),
                   rng.standard_normal((4, 6)).astype(dtype), 5)

        m = model(2, "bidirectional", 16, 64, dtype)
        check_bound(f"bound 2-layer bidirectional B=8 {tag}", m, rng.standard_normal((20, 8, 16)).astype(dtype))
        m = model(1, "forward", 64, 128, dtype)
        check_bound(f"bound one sequence H=128 (split between threads) {tag}", m,
                    rng.standard_normal((30, 1, 64)).astype(dtype), rng.standard_normal((1, 1, 128)).astype(dtype))

        m = model(2, "forward", 16, 64, dtype)
        check_stream(f"stream 2 layers B=4 {tag}", m, 4, rng.standard_normal((4, 16)).astype(dtype),
                     rng.standard_normal((2, 4, 64)).astype(dtype))
        m = model(3, "forward", 3, 5, dtype, linear_before_reset=False)
        check_stream(f"stream 3 layers lbr=0 unbatched {tag}", m, None, rng.standard_normal(3).astype(dtype))

    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    proc = run_python(CHILD, env={"NUMBA_NRT_STATS": "1"}, timeout=600)
    return last_json_line(proc)


def test_counters_are_live(report):
    """The instrument works: NRT stats are on in the child and an allocating njit call moves them."""
    assert report["nrt_stats"] is True
    probe = report["probe"]
    assert probe["after"]["alloc"] > probe["before"]["alloc"]
    assert probe["after"]["mi_alloc"] > probe["before"]["mi_alloc"]


def _assert_no_growth(entries):
    assert entries, "the child reported no cases"
    grown = {name: (e["before"], e["after"]) for name, e in entries.items()
             if e["after"]["alloc"] != e["before"]["alloc"] or e["after"]["mi_alloc"] != e["before"]["mi_alloc"]}
    assert not grown, f"NRT allocations during 50 warm calls with out=: {grown}"


def test_calls_with_out_do_not_allocate(report):
    """Numba allocation counters do not grow over 50 warm model(x, h0, lengths, out=(y, h_n)) calls:
    serial and parallel sizes, both dtypes, both variants, reverse, bidirectional with lengths,
    batch_first and unbatched input."""
    assert len(report["calls"]) == 14
    _assert_no_growth(report["calls"])
    assert all(e["out_written"] for e in report["calls"].values()), "out= buffers differ from a plain call"


def test_bound_calls_do_not_allocate(report):
    """Numba allocation counters do not grow over 50 warm calls of a bound call (GRU.bind), serial and
    split between threads."""
    assert len(report["bound"]) == 4
    _assert_no_growth(report["bound"])


def test_stream_steps_with_out_do_not_allocate(report):
    """Numba allocation counters do not grow over 50 warm stream.step(x_t, out=buf) calls."""
    assert len(report["streams"]) == 4
    _assert_no_growth(report["streams"])
    assert all(e["finite"] for e in report["streams"].values())
