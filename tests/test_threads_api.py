"""gru_fast.set_num_threads / get_num_threads / threads: the public thread count, process-wide.

Authorities: Numba's own per-thread count (``numba.get_num_threads()``) read in the calling thread at the
moment gru_fast launches its parallel kernel -- Numba sizes the launch's team by it -- and the OpenMP
runtime's own ICVs (max-active-levels, max-threads) read before anything started a team.  The stateful
checks run in a child process: the count and Numba's threading layer are process-wide.  No speed is
asserted.
"""

from __future__ import annotations

import textwrap

import numba
import numpy as np
import pytest

import gru_fast

from conftest import last_json_line, run_python

CHILD = textwrap.dedent(
    """
    import ctypes
    import json
    import threading

    import numpy as np
    from numba.np.ufunc import omppool

    omp = ctypes.CDLL(omppool.__file__)  # the libgomp Numba's pool runs on (no torch in this process)
    icvs_default = [omp.omp_get_max_threads(), omp.omp_get_max_active_levels()]  # before any team

    import numba
    import gru_fast
    from gru_fast import _layout, _schedule, kernels

    _schedule.Pace.wants_parallel = lambda self: True  # every call of a parallel plan launches in parallel,
    _schedule._cores_taken = lambda workers, spinning: False  # beside whatever else runs

    seen = []  # Numba's count in the launching thread, and the workers gru_fast planned, per parallel launch
    workers = lambda args: ctypes.c_int64.from_address(args + 8 * _layout.ARGS.index("workers")).value
    for key in [key for key in kernels.FORWARD if key[1]]:
        kernels.FORWARD[key] = (lambda f: lambda a: (seen.append((numba.get_num_threads(), workers(a))), f(a))[1])(
            kernels.FORWARD[key])

    out = {"numba_num_threads": numba.config.NUMBA_NUM_THREADS, "layer": gru_fast.threading_layer(),
           "vendor": omppool.openmp_vendor}
    gru_fast.set_num_threads(2)  # the first thing that starts Numba's threading layer in this process
    out["icvs_default"], out["icvs_after_set"] = icvs_default, [omp.omp_get_max_threads(),
                                                                omp.omp_get_max_active_levels()]
    out["get_main"] = gru_fast.get_num_threads()

    r = np.random.default_rng(0)
    W = r.uniform(-0.1, 0.1, (1, 3 * 128, 32)).astype(np.float32)
    R = r.uniform(-0.1, 0.1, (1, 3 * 128, 128)).astype(np.float32)
    model = gru_fast.GRU([(W, R, None)])
    x = r.standard_normal((10, 32, 32)).astype(np.float32)  # parallel-sized

    def in_new_thread(name):
        def work():
            before = numba.get_num_threads()  # Numba's own default in a fresh thread
            del seen[:]
            model(x)
            out[name] = {"numba_before": before, "get": gru_fast.get_num_threads(), "launches": list(seen)}
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()

    in_new_thread("other_thread")
    numba.set_num_threads(1)  # Numba's per-thread setter no longer changes gru_fast's count
    del seen[:]
    model(x)
    out["main_after_numba_set_1"] = list(seen)

    with gru_fast.threads(1):
        out["get_in_block"] = gru_fast.get_num_threads()
        in_new_thread("other_thread_in_block")
    out["get_after_block"] = gru_fast.get_num_threads()
    out["icvs_end"] = [omp.omp_get_max_threads(), omp.omp_get_max_active_levels()]
    print(json.dumps(out))
    """
)


def test_set_num_threads_is_process_wide_and_keeps_openmp_state(monkeypatch):
    """Numba's count is per thread: a thread that never called numba.set_num_threads runs NUMBA_NUM_THREADS
    workers.  gru_fast.set_num_threads(2) under NUMBA_NUM_THREADS=3 must make a parallel call from a thread
    started afterwards launch with Numba's count at 2 there; ``threads(1)`` must do the same for its block
    and put 2 back.  Starting the layer, it must leave the OpenMP runtime's ICVs at their defaults
    (numba.set_num_threads alone turns nesting on: max-active-levels 255, which slowed torch 10x)."""
    for var in ("OMP_NUM_THREADS", "OMP_MAX_ACTIVE_LEVELS", "OMP_NESTED"):
        monkeypatch.delenv(var, raising=False)
    out = last_json_line(run_python(CHILD, env={"NUMBA_NUM_THREADS": "3", "NUMBA_THREADING_LAYER": "omp"}))
    assert out["numba_num_threads"] == 3 and out["layer"] == "omp" and out["vendor"] == "GNU", out
    assert out["icvs_after_set"] == out["icvs_default"], out
    assert out["icvs_end"] == out["icvs_default"], out
    assert out["get_main"] == 2, out
    other = out["other_thread"]
    assert other["numba_before"] == 3, out  # Numba's default in a fresh thread: what set_num_threads overrides
    assert other["get"] == 2 and other["launches"], out
    assert all(count == 2 and workers <= 2 for count, workers in other["launches"]), out
    assert out["main_after_numba_set_1"] and all(c == 2 for c, _ in out["main_after_numba_set_1"]), out
    assert out["get_in_block"] == 1, out
    assert out["other_thread_in_block"]["get"] == 1, out
    assert out["other_thread_in_block"]["launches"] == [], out  # one thread: the serial kernel ran
    assert out["get_after_block"] == 2, out


@pytest.mark.parametrize("n", [0, -1, numba.config.NUMBA_NUM_THREADS + 1])
def test_thread_count_out_of_range_is_a_value_error(n):
    before = gru_fast.get_num_threads()
    with pytest.raises(ValueError, match=rf"n must be between 1 and NUMBA_NUM_THREADS=\d+.*got {n}"):
        gru_fast.set_num_threads(n)
    with pytest.raises(ValueError, match="n must be between 1 and NUMBA_NUM_THREADS"):
        with gru_fast.threads(n):
            pass
    assert gru_fast.get_num_threads() == before


@pytest.mark.parametrize("n", [2.0, "2", None, True, np.float32(1)])
def test_thread_count_that_is_not_an_int_is_a_type_error(n):
    before = gru_fast.get_num_threads()
    with pytest.raises(TypeError, match="n must be an int"):
        gru_fast.set_num_threads(n)
    assert gru_fast.get_num_threads() == before


def test_threads_block_takes_a_numpy_integer_and_restores_the_count():
    before = gru_fast.get_num_threads()
    with gru_fast.threads(np.int64(1)) as n:
        assert n == 1 and gru_fast.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert gru_fast.get_num_threads() == before and numba.get_num_threads() == before
