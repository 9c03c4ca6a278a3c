"""Reliability under concurrency: 8 Python threads, thousands of calls, shared and separate models.

Extends tests/test_concurrency.py (4 threads x 200 calls on one shared model) to the load a service puts on
the engine: 8 threads, 600 sequence calls and 600 stream steps each, over a pool of mixed shapes (every
kernel path: the parallel kernel split by rows and directions or by hidden units, the serial kernel,
unbatched, batch_first, lengths, h0, out=), float32 and float64,
on models shared by all threads and on models each thread builds for itself from the same weights.

Authorities:

* for a sequence call, the serial result of the same call computed first in one thread: a call's result
  must not depend on what other threads are doing, so equality is bitwise (np.array_equal);
* for streams, PyTorch: two streams of one model stepped in interleaved order (in one thread, and from
  several threads) each give ``torch.nn.GRU``'s answer for their own sequence (tolerance 1e-5).

Everything runs in child processes so that an abort in a threading layer fails one test instead of killing
pytest; a thread still alive after the join timeout is reported as a deadlock.  ``NUMBA_NUM_THREADS=2`` is
fixed so the parallel kernel runs on any machine, and the child counts its launches (a wrapper around
``kernels.FORWARD``'s parallel entries) to prove that path ran under contention.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from conftest import last_json_line, run_python, torch_gru

THREADS, CALLS = 8, 600

CHILD = textwrap.dedent(
    """
    import json
    import os
    import sys
    import threading

    import numpy as np

    import gru_fast
    from gru_fast import _schedule, kernels

    _schedule._cores_taken = lambda workers, spinning: False  # launch even on a busy machine (see test_plan_memory)
    THREADS = int(os.environ.get("TEST_THREADS", %(threads)d))
    CALLS = int(os.environ.get("TEST_CALLS", %(calls)d))
    JOIN_TIMEOUT = 240.0

    parallel_launches = []  # list.append is atomic under the GIL

    def counting(forward):
        def counting_forward_parallel(*args):
            parallel_launches.append(1)
            return forward(*args)
        return counting_forward_parallel

    for key in [key for key in kernels.FORWARD if key[1]]:  # (weights, parallel) entry points
        kernels.FORWARD[key] = counting(kernels.FORWARD[key])  # model.py looks them up on each call

    rng = np.random.default_rng(0)

    def weights(num_layers, D, I, H, dtype):
        return [(rng.uniform(-0.3, 0.3, (D, 3 * H, I if l == 0 else D * H)).astype(dtype),
                 rng.uniform(-0.3, 0.3, (D, 3 * H, H)).astype(dtype),
                 rng.uniform(-0.3, 0.3, (D, 6 * H)).astype(dtype)) for l in range(num_layers)]

    SPECS = {
        "big_bi": (weights(1, 2, 16, 64, np.float32), dict(direction="bidirectional")),
        "deep_fwd": (weights(2, 1, 8, 64, np.float32), dict()),
        "small_lbr0": (weights(2, 1, 3, 5, np.float32),
                       dict(linear_before_reset=False, activations=["HardSigmoid", "Softsign"], clip=3.0)),
        "f64_bi_bf": (weights(2, 2, 4, 6, np.float64), dict(direction="bidirectional", batch_first=True)),
        "reverse": (weights(1, 1, 5, 32, np.float32), dict(direction="reverse")),
    }
    shared = {name: gru_fast.GRU(w, **kw) for name, (w, kw) in SPECS.items()}

    def case(name, T, B, *, lengths=False, h0=False, unbatched=False):
        m = shared[name]
        I, H, LD = m.input_size, m.hidden_size, m.num_layers * m.num_directions
        if unbatched:
            x = rng.standard_normal((T, I)).astype(m.dtype)
        elif m.batch_first:
            x = rng.standard_normal((B, T, I)).astype(m.dtype)
        else:
            x = rng.standard_normal((T, B, I)).astype(m.dtype)
        state = None
        if h0:
            state = rng.standard_normal((LD, H) if unbatched else (LD, B, H)).astype(m.dtype)
        n = None
        if lengths:
            n = int(rng.integers(0, T + 1)) if unbatched else rng.integers(0, T + 1, B)
        return name, x, state, n

    cases = [
        case("big_bi", 20, 4, lengths=True, h0=True),   # parallel kernel (units = directions)
        case("big_bi", 12, 3),                          # parallel kernel
        case("big_bi", 20, 9, h0=True),                 # parallel kernel (units = directions x rows)
        case("big_bi", 7, 1, unbatched=True),
        case("deep_fwd", 16, 4, lengths=True),          # parallel kernel (units = row slices)
        case("deep_fwd", 9, 2, h0=True),
        case("deep_fwd", 25, 12, lengths=True, h0=True),
        case("deep_fwd", 1, 1),
        case("small_lbr0", 5, 2),
        case("small_lbr0", 9, 4, lengths=True, h0=True),
        case("small_lbr0", 6, 3, unbatched=True, h0=True),
        case("small_lbr0", 3, 11, lengths=True),
        case("f64_bi_bf", 6, 3, lengths=True, h0=True),
        case("f64_bi_bf", 11, 8),
        case("reverse", 14, 5, lengths=True),
        case("reverse", 30, 2, h0=True),
    ]
    launches_before = len(parallel_launches)
    serial = [shared[name](x, h0, n) for name, x, h0, n in cases]
    serial_parallel_launches = len(parallel_launches) - launches_before

    mismatches, errors, done = [], [], [0] * THREADS

    def worker(tid):
        r = np.random.default_rng(1000 + tid)
        try:
            own = {name: gru_fast.GRU(w, **kw) for name, (w, kw) in SPECS.items()}  # separate models
            for i in range(CALLS):
                k = int(r.integers(len(cases)))
                name, x, h0, n = cases[k]
                m = own[name] if i %% 3 == 2 else shared[name]
                if i %% 2:
                    y, h = np.empty_like(serial[k][0]), np.empty_like(serial[k][1])
                    m(x, h0, n, out=(y, h))
                else:
                    y, h = m(x, h0, n)
                if not (np.array_equal(y, serial[k][0]) and np.array_equal(h, serial[k][1])):
                    mismatches.append([tid, i, k, "own" if i %% 3 == 2 else "shared"])
                done[tid] += 1
        except BaseException as exc:  # reported to the parent, which fails the test
            errors.append(f"thread {tid}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    alive = [i for i, t in enumerate(threads) if t.is_alive()]
    print(json.dumps({"mismatches": mismatches[:20], "n_mismatches": len(mismatches), "errors": errors,
                      "done": done, "deadlocked_threads": alive, "serial_parallel_launches": serial_parallel_launches,
                      "parallel_launches": len(parallel_launches) - launches_before - serial_parallel_launches,
                      "threading_layer": gru_fast.threading_layer()}), flush=True)
    os._exit(0)  # daemon threads still stuck would otherwise block interpreter exit
    """
) % {"threads": THREADS, "calls": CALLS}

ENV = {"NUMBA_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def report():
    return last_json_line(run_python(CHILD, env=ENV, timeout=300))


def test_eight_threads_thousands_of_calls_equal_serial_results(report):
    """8 threads x 600 calls over 16 shapes (one model instance shared by all threads, or one per thread
    built from the same weights): every result bitwise equals the serial one; no error, abort or deadlock."""
    assert report["deadlocked_threads"] == [], f"threads still running after the join timeout: {report}"
    assert report["errors"] == []
    assert report["done"] == [CALLS] * THREADS
    assert report["n_mismatches"] == 0, f"results differ from serial: {report['mismatches']}"


def test_parallel_kernel_ran_under_contention(report):
    """The instrument: the pool reaches the parallel kernel while other threads are calling too.  The engine
    runs one parallel call at a time and the calls that arrive meanwhile serially (bit-identical results),
    so under 8-way contention only a fraction of the parallel-sized calls launch the parallel kernel."""
    assert report["serial_parallel_launches"] >= 2  # e.g. big_bi 20x4 and 12x3, deep_fwd 16x4
    assert report["parallel_launches"] > 0  # how many depends on timing: the gate admits one at a time


@pytest.mark.parametrize("layer", ["workqueue", "forksafe"])
def test_eight_threads_on_a_non_thread_safe_threading_layer(layer):
    """Numba's workqueue layer aborts when two threads launch parallel kernels at once; gru_fast serialises
    launches when it is the layer (chosen by the user, or what ``forksafe`` resolves to without TBB).
    8 threads x 150 calls suffice to overlap launches."""
    env = dict(ENV, NUMBA_THREADING_LAYER=layer, TEST_CALLS="150")
    proc = run_python(CHILD, env=env, timeout=300)
    out = last_json_line(proc)
    assert out["deadlocked_threads"] == [] and out["errors"] == [], out
    assert out["n_mismatches"] == 0, out["mismatches"]
    assert out["parallel_launches"] > 0


# --------------------------------------------------------------------------------------------------
# independent streams
# --------------------------------------------------------------------------------------------------

STREAMS_CHILD = textwrap.dedent(
    """
    import json
    import sys
    import threading

    import numpy as np

    import gru_fast

    data = np.load(sys.argv[1])
    layers = [(data[f"W{l}"], data[f"R{l}"], data[f"B{l}"]) for l in range(int(data["L"]))]
    model = gru_fast.GRU(layers)
    xs = data["xs"]                  # (S, T, B, I): one sequence per stream
    S, T = xs.shape[0], xs.shape[1]

    # one thread, interleaved: stream 0 step 0, stream 1 step 0, ..., stream 0 step 1, ...
    streams = [model.stream(batch_size=xs.shape[2]) for _ in range(S)]
    interleaved = np.empty(xs.shape[:3] + (model.hidden_size,), np.float32)
    for t in range(T):
        for s in range(S):
            interleaved[s, t] = streams[s].step(xs[s, t])

    # several threads, one stream each, stepping at the same time
    threaded = np.empty_like(interleaved)
    errors = []

    def run(s):
        try:
            st = model.stream(batch_size=xs.shape[2])
            for t in range(T):
                threaded[s, t] = st.step(xs[s, t])
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(S)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    np.savez(sys.argv[2], interleaved=interleaved, threaded=threaded)
    print(json.dumps({"errors": errors, "alive": sum(th.is_alive() for th in threads)}))
    """
)


def test_interleaved_streams_of_one_model_are_independent(tmp_path):
    """Authority: PyTorch.  Four streams of one 2-layer model over four different sequences, stepped
    interleaved in one thread and concurrently from four threads: each stream's outputs equal
    nn.GRU run on that stream's own sequence."""
    from conftest import run_torch

    module = torch_gru(6, 16, 2, seed=3)
    rng = np.random.default_rng(5)
    S, T, B = 4, 40, 3
    xs = rng.standard_normal((S, T, B, 6)).astype(np.float32)
    from converters.from_torch import convert

    layers = convert(module).onnx_weights()
    arrays = {"L": np.array(len(layers)), "xs": xs}
    for l, (W, R, Bias) in enumerate(layers):
        arrays.update({f"W{l}": W, f"R{l}": R, f"B{l}": Bias})
    np.savez(tmp_path / "in.npz", **arrays)
    proc = run_python(STREAMS_CHILD.replace("sys.argv[1]", repr(str(tmp_path / "in.npz")))
                      .replace("sys.argv[2]", repr(str(tmp_path / "out.npz"))), timeout=300)
    out = last_json_line(proc)
    assert out == {"errors": [], "alive": 0}
    got = np.load(tmp_path / "out.npz")
    for s in range(S):
        want, _ = run_torch(module, xs[s])  # (T, B, H): the top layer's state at each step
        for mode in ("interleaved", "threaded"):
            err = float(np.max(np.abs(got[mode][s] - want)))
            assert err <= 1e-5, f"stream {s} ({mode}): max abs error {err:.2e} vs torch"


# --------------------------------------------------------------------------------------------------
# OpenMP state left to the other libraries in the process
# --------------------------------------------------------------------------------------------------

OPENMP_CHILD = textwrap.dedent(
    """
    import ctypes
    import json

    import numpy as np
    from numba.np.ufunc import omppool

    omp = ctypes.CDLL(omppool.__file__)  # resolves in the libgomp Numba's pool runs on
    default_levels = omp.omp_get_max_active_levels()  # before anything started a team

    import gru_fast
    from gru_fast import _schedule, kernels

    _schedule._cores_taken = lambda workers, spinning: False  # launch even on a busy machine (see test_plan_memory)
    launches = []
    for key in [key for key in kernels.FORWARD if key[1]]:
        kernels.FORWARD[key] = (lambda f: lambda *a: (launches.append(1), f(*a))[1])(kernels.FORWARD[key])

    r = np.random.default_rng(0)
    W = r.uniform(-0.1, 0.1, (1, 3 * 128, 32)).astype(np.float32)
    R = r.uniform(-0.1, 0.1, (1, 3 * 128, 128)).astype(np.float32)
    model = gru_fast.GRU([(W, R, None)])
    model(r.standard_normal((10, 32, 32)).astype(np.float32))  # starts Numba's omp layer here

    import torch  # imported after the layer started, torch binds to the same libgomp
    mapped = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line})
    print(json.dumps({"default": default_levels, "after": omp.omp_get_max_active_levels(),
                      "layer": gru_fast.threading_layer(), "vendor": omppool.openmp_vendor,
                      "launches": len(launches), "libgomp": mapped}))
    """
)


def test_engine_leaves_openmp_nesting_at_the_runtime_default(monkeypatch):
    """Starting its omp layer, Numba calls omp_set_nested(1) (max-active-levels 255) in the starting thread;
    torch, sharing that libgomp, then nested a team inside each of its parallel regions and nn.GRU ran 10x
    slower (B=64 T=100 H=256: 32 ms -> 324 ms on 2 cores).  Authority: the OpenMP runtime's own default for
    max-active-levels, read before anything started a team, must hold again after the engine's parallel
    kernel ran (the ICV is what torch's regions consult)."""
    for var in ("OMP_MAX_ACTIVE_LEVELS", "OMP_NESTED"):  # set, they are the user's choice and kept
        monkeypatch.delenv(var, raising=False)
    out = last_json_line(run_python(OPENMP_CHILD, env=dict(ENV, NUMBA_THREADING_LAYER="omp"), timeout=300))
    assert out["layer"] == "omp" and out["vendor"] == "GNU" and out["launches"] >= 1, out
    assert len(out["libgomp"]) == 1, out  # one runtime in the process: its ICV is the one torch reads
    assert out["after"] == out["default"], out


THREADS_CHILD = textwrap.dedent(
    """
    import ctypes
    import json
    import os
    import sys

    ORDER = sys.argv[1]
    if ORDER == "torch_first":
        import torch
        torch.set_num_threads(3)

    import numpy as np
    from numba.np.ufunc import omppool

    # the runtime the pool's omp_* calls bind to: a global definition (torch's libgomp, loaded first) or
    # the pool's own libgomp
    global_scope = ctypes.CDLL(None)
    omp = global_scope if hasattr(global_scope, "omp_get_max_threads") else ctypes.CDLL(omppool.__file__)

    def icvs():
        return [omp.omp_get_max_threads(), omp.omp_get_max_active_levels()]

    import gru_fast

    before = icvs()
    torch_before = torch.get_num_threads() if ORDER == "torch_first" else None
    r = np.random.default_rng(0)
    W = r.uniform(-0.1, 0.1, (1, 3 * 128, 32)).astype(np.float32)
    R = r.uniform(-0.1, 0.1, (1, 3 * 128, 128)).astype(np.float32)
    gru_fast.GRU([(W, R, None)])(r.standard_normal((10, 32, 32)).astype(np.float32))  # parallel-sized
    after = icvs()
    if ORDER != "torch_first":
        import torch
    print(json.dumps({"before": before, "after": after, "torch_before": torch_before,
                      "torch_after": torch.get_num_threads(), "layer": gru_fast.threading_layer(),
                      "vendor": omppool.openmp_vendor}))
    """
)


@pytest.mark.parametrize("order", ["torch_first", "torch_after"])
def test_numba_num_threads_1_leaves_torch_its_thread_count(order, monkeypatch):
    """Issue 11.10: under NUMBA_NUM_THREADS=1 (the README's advice for Dask workers), Numba starting its omp
    layer called omp_set_num_threads(1) in the calling thread, and torch, which reads that ICV, dropped from
    3 threads (set by the application) to 1; nesting (max-active-levels) changed the same way.  Authority:
    torch.get_num_threads() and the OpenMP runtime's own ICVs, read before the first parallel-sized call,
    hold after it, whichever of torch and gru_fast loaded its OpenMP runtime first."""
    for var in ("OMP_NUM_THREADS", "OMP_MAX_ACTIVE_LEVELS", "OMP_NESTED"):
        monkeypatch.delenv(var, raising=False)
    env = {"NUMBA_NUM_THREADS": "1", "NUMBA_THREADING_LAYER": "omp"}
    code = THREADS_CHILD.replace("sys.argv[1]", repr(order))
    out = last_json_line(run_python(code, env=env, timeout=300))
    assert out["layer"] == "omp" and out["vendor"] == "GNU", out
    assert out["after"] == out["before"], out
    if order == "torch_first":
        assert out["torch_before"] == 3 and out["torch_after"] == 3, out
    else:
        assert out["torch_after"] == out["before"][0], out


WORKQUEUE_CHILD = textwrap.dedent(
    """
    import json
    import threading
    import warnings

    import numpy as np

    def count(caught):
        return sum("workqueue" in str(w.message) for w in caught)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import gru_fast
        r = np.random.default_rng(0)
        W = r.uniform(-0.1, 0.1, (1, 3 * 128, 32)).astype(np.float32)
        R = r.uniform(-0.1, 0.1, (1, 3 * 128, 128)).astype(np.float32)
        model = gru_fast.GRU([(W, R, None)])
        x = r.standard_normal((10, 32, 32)).astype(np.float32)
        model(x[:2, :1])  # too small for threads
        before_parallel = count(caught)
        model(x)  # parallel-sized: the first parallel call
        first = count(caught)
        worker = threading.Thread(target=model, args=(x,))
        worker.start()
        worker.join()
        model(x)
        messages = [str(w.message) for w in caught if "workqueue" in str(w.message)]
    import numba
    print(json.dumps({"before_parallel": before_parallel, "first": first, "total": count(caught),
                      "messages": messages, "layer": numba.threading_layer()}))
    """
)


@pytest.mark.parametrize("layer, warnings_expected", [("workqueue", 1), ("omp", 0)])
def test_workqueue_layer_is_warned_about_once_at_the_first_parallel_call(layer, warnings_expected):
    """Issue 11.9: under Numba's workqueue layer, gru_fast's parallel calls plus the application's own
    parallel=True function in another thread abort the process (SIGABRT, reproduced; not run here: an
    abort depends on timing).  gru_fast cannot serialise code it does not own, so it warns, once, at its
    first parallel call (Numba's own layer report is the authority for which layer ran)."""
    out = last_json_line(run_python(WORKQUEUE_CHILD, env=dict(ENV, NUMBA_THREADING_LAYER=layer), timeout=300))
    assert out["layer"] == layer, out
    assert out["before_parallel"] == 0 and out["first"] == warnings_expected, out
    assert out["total"] == warnings_expected, out
    if warnings_expected:
        assert "SIGABRT" in out["messages"][0] and "tbb" in out["messages"][0], out
