"""Thread safety: one model shared by several Python threads gives exactly the serial results.

Authority: the same model's serial results on the same inputs (computed first, in one thread): a call's
result must not depend on what other threads are running, so np.array_equal, not a tolerance.  Runs in a
child process so that a crash or abort of the threading layer (exit 134) fails this test instead of
killing pytest.  Sizes cover both the engine's serial kernels (small model) and its parallel kernels
(bidirectional, B=8, H=64, T=20).
"""

from __future__ import annotations

import textwrap

import pytest

from conftest import last_json_line, run_python

CHILD = textwrap.dedent(
    """
    import json
    import threading

    import numpy as np

    import gru_fast

    THREADS, CALLS = 4, 200
    rng = np.random.default_rng(0)

    def model(num_layers, direction, I, H, **attrs):
        D = 2 if direction == "bidirectional" else 1
        layers = [(rng.uniform(-0.3, 0.3, (D, 3 * H, I if l == 0 else D * H)).astype(np.float32),
                   rng.uniform(-0.3, 0.3, (D, 3 * H, H)).astype(np.float32),
                   rng.uniform(-0.3, 0.3, (D, 6 * H)).astype(np.float32)) for l in range(num_layers)]
        return gru_fast.GRU(layers, direction=direction, **attrs)

    big = model(1, "bidirectional", 16, 64)
    small = model(2, "forward", 3, 5, linear_before_reset=False, activations=["HardSigmoid", "Softsign"])
    streamable = model(2, "forward", 4, 6)

    def inputs(T, B, I, LD, H, lengths=False, h0=False):
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        h = rng.standard_normal((LD, B, H)).astype(np.float32) if h0 else None
        n = rng.integers(1, T + 1, B) if lengths else None
        return x, h, n

    cases = [
        (big,) + inputs(20, 8, 16, 2, 64, lengths=True, h0=True),
        (big,) + inputs(20, 8, 16, 2, 64),
        (big,) + inputs(11, 3, 16, 2, 64, h0=True),
        (small,) + inputs(5, 2, 3, 2, 5),
        (small,) + inputs(9, 4, 3, 2, 5, lengths=True, h0=True),
        (small, rng.standard_normal((6, 3)).astype(np.float32), None, None),
    ]
    serial = [m(x, h0, n) for m, x, h0, n in cases]
    stream_x = rng.standard_normal((12, 3, 4)).astype(np.float32)
    s = streamable.stream(batch_size=3)
    stream_serial = [s.step(stream_x[t]).copy() for t in range(12)]

    mismatches, errors, done = [], [], [0] * THREADS

    def worker(tid):
        r = np.random.default_rng(100 + tid)
        try:
            own_stream = streamable.stream(batch_size=3)
            for i in range(CALLS):
                k = int(r.integers(len(cases)))
                m, x, h0, n = cases[k]
                if i % 2:
                    y = np.empty_like(serial[k][0])
                    h = np.empty_like(serial[k][1])
                    m(x, h0, n, out=(y, h))
                else:
                    y, h = m(x, h0, n)
                if not (np.array_equal(y, serial[k][0]) and np.array_equal(h, serial[k][1])):
                    mismatches.append([tid, i, k])
                t = i % 12
                if t == 0:
                    own_stream.reset()
                if not np.array_equal(own_stream.step(stream_x[t]), stream_serial[t]):
                    mismatches.append([tid, i, "stream"])
                done[tid] += 1
        except BaseException as exc:  # reported to the parent, which fails the test
            errors.append(f"thread {tid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"mismatches": mismatches[:20], "n_mismatches": len(mismatches), "errors": errors,
                      "done": done, "threading_layer": gru_fast.threading_layer()}))
    """
)


@pytest.fixture(scope="module")
def report():
    return last_json_line(run_python(CHILD, timeout=600))


def test_threads_sharing_a_model_equal_serial_results(report):
    """4 threads x 200 calls, mixed shapes (parallel-kernel and serial-kernel sizes, lengths, h0, out=,
    unbatched), plus a stream per thread: every result equals the serial one bitwise, no thread raised,
    and the child did not crash."""
    assert report["errors"] == []
    assert report["done"] == [200] * 4
    assert report["n_mismatches"] == 0, f"results differ from serial: {report['mismatches']}"
