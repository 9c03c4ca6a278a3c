"""The ways one call is shared between threads (gru_fast.kernels: MODE_ROWS, MODE_SPLIT, serial).

Authority: ``torch.nn.GRU`` for every mode, at shapes chosen so that the engine picks that mode (each test
asserts the plan it exercised, so a change of thresholds cannot silently leave a mode untested).  The
kernels promise more than parity: every output element is computed by the same operations whichever
thread, row block or chunk of hidden units computes it, so a serial run (one Numba thread) and a parallel
run agree bit for bit; ``np.array_equal`` checks that.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import pytest

from conftest import assert_matches, convert_torch, run_torch, torch_gru
from gru_fast import _schedule, kernels

THREADS = numba.config.NUMBA_NUM_THREADS
needs_two_threads = pytest.mark.skipif(THREADS < 2, reason="the parallel kernels need 2+ Numba threads")


@pytest.fixture(autouse=True)
def parallel_launches(monkeypatch):
    """Count launches of the parallel entry points, and let every call of a parallel plan go parallel: brief
    calls that do not come back to back, and the calls the pace of a plan runs serially (the engine's speed
    policy, gru_fast._schedule, would otherwise run them serially: same results, but the parallel kernel
    untested)."""
    monkeypatch.setattr(_schedule, "_BACK_TO_BACK_S", float("inf"))
    monkeypatch.setattr(_schedule.Pace, "wants_parallel", lambda self: True)
    launches = []
    for key in [key for key in kernels.FORWARD if key[1]]:
        forward = kernels.FORWARD[key]
        monkeypatch.setitem(kernels.FORWARD, key, lambda *args, forward=forward: (launches.append(1), forward(*args)))
    return launches


@contextlib.contextmanager
def numba_threads(n):
    """Numba's thread count for the calling thread (the engine reads it per call)."""
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _plan(model, steps, batch):
    """The plan a call of this shape gets in the calling thread (the mode a test exercises)."""
    return _schedule.take_plan(model._kernel_model, steps, batch)


def _x(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _check_serial_and_parallel(model, x, expected, *, authority, dtype=np.float32, what="", **kwargs):
    """Run ``model(x, **kwargs)`` on one thread and on two: the parallel run must match ``expected`` (the
    authority's (y, h_n)) and the serial run bit for bit."""
    with numba_threads(1):
        y_s, h_s = model(x, **kwargs)
    with numba_threads(min(2, THREADS)):
        y_p, h_p = model(x, **kwargs)
    assert_matches(y_p, expected[0], authority=authority, dtype=dtype, what=f"y{what}")
    assert_matches(h_p, expected[1], authority=authority, dtype=dtype, what=f"h_n{what}")
    assert np.array_equal(y_s, y_p) and np.array_equal(h_s, h_p), f"serial and parallel runs differ{what}"


@needs_two_threads
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("unbatched", [False, True], ids=["B=1", "unbatched"])
def test_one_sequence_splits_hidden_units(num_layers, unbatched, dtype, rng, parallel_launches):
    """MODE_SPLIT: one sequence, H=128, I=64, T=37 (blocks of projected steps and a remainder), with h0 and
    a length shorter than T; equal to torch.nn.GRU and bit-identical to the serial run."""
    module = torch_gru(64, 128, num_layers, dtype=dtype, seed=11)
    model = convert_torch(module)
    T = 37
    with numba_threads(2):
        assert _plan(model, T, 1).mode == kernels.MODE_SPLIT
    x = _x(rng, (T, 64) if unbatched else (T, 1, 64), dtype)
    h0 = _x(rng, (num_layers, 128) if unbatched else (num_layers, 1, 128), dtype)
    lengths = 29 if unbatched else np.array([29])
    for kwargs in ({}, {"h0": h0}, {"h0": h0, "lengths": lengths}):
        expected = run_torch(module, x, kwargs.get("h0"), kwargs.get("lengths"))
        _check_serial_and_parallel(model, x, expected, authority="torch.nn.GRU", dtype=dtype,
                                   what=f" {sorted(kwargs)}", **kwargs)
    assert len(parallel_launches) == 3


@needs_two_threads
@pytest.mark.parametrize("batch, hidden", [(3, 128), (7, 384)])
def test_a_few_rows_split_hidden_units(batch, hidden, rng, parallel_launches):
    """MODE_SPLIT also for a handful of sequences (one or two rows per thread; three or four past
    _ROWS_MAX_RECURRENT_BYTES: R is 1.7 MiB at H=384), with lengths: equal to torch.nn.GRU and
    bit-identical to the serial run."""
    module = torch_gru(40, hidden, 2, seed=18)
    model = convert_torch(module)
    T = 21
    with numba_threads(2):
        assert _plan(model, T, batch).mode == kernels.MODE_SPLIT
    x = _x(rng, (T, batch, 40), np.float32)
    lengths = rng.integers(1, T + 1, size=batch)
    _check_serial_and_parallel(model, x, run_torch(module, x, None, lengths), authority="torch.nn.GRU (packed)",
                               lengths=lengths)
    assert len(parallel_launches) == 1


@needs_two_threads
def test_split_reverse_direction_starts_at_each_sequence_end(rng, parallel_launches):
    """MODE_SPLIT for an ONNX "reverse" model (one direction, running backwards), with a length shorter
    than T.  Authority: the backward half of a bidirectional torch.nn.GRU (same weights), which is that
    direction run from each sequence's last valid step."""
    module = torch_gru(64, 128, 1, bidirectional=True, seed=12)
    both = convert_torch(module)
    W, R, B = both.onnx_weights()[0]
    import gru_fast

    reverse = gru_fast.GRU([(W[1:], R[1:], B[1:])], direction="reverse")
    T = 23
    with numba_threads(2):
        assert _plan(reverse, T, 1).mode == kernels.MODE_SPLIT
    x = _x(rng, (T, 1, 64), np.float32)
    lengths = np.array([17])
    y_ref, h_ref = run_torch(module, x, None, lengths)
    _check_serial_and_parallel(reverse, x, (y_ref[:, :, 128:], h_ref[1:]), authority="torch.nn.GRU (backward half)",
                               lengths=lengths)
    assert len(parallel_launches) == 1


@needs_two_threads
@pytest.mark.parametrize("batch, bidirectional, hidden",
                         [(9, False, 96), (8, False, 96), (1, True, 96), (5, True, 96), (2, False, 128)])
def test_rows_are_shared_between_threads(batch, bidirectional, hidden, rng, parallel_launches):
    """MODE_ROWS in parallel: units of (direction, batch rows), two layers, lengths; bit-identical to the
    serial run.  B=2 on 2 threads is one row per thread, by rows even where one row's step is split.
    Authority: torch.nn.GRU."""
    module = torch_gru(48, hidden, 2, bidirectional=bidirectional, seed=13)
    model = convert_torch(module)
    T = 19
    with numba_threads(2):
        plan = _plan(model, T, batch)
    assert plan.mode == kernels.MODE_ROWS and plan.parallel and plan.workers == 2
    x = _x(rng, (T, batch, 48), np.float32)
    lengths = rng.integers(1, T + 1, size=batch)
    _check_serial_and_parallel(model, x, run_torch(module, x, None, lengths), authority="torch.nn.GRU",
                               lengths=lengths)
    assert len(parallel_launches) == 1


@needs_two_threads
@pytest.mark.parametrize("batch, input_size, hidden, mode", [(2, 64, 384, kernels.MODE_SPLIT),
                                                             (8, 64, 384, kernels.MODE_SPLIT),
                                                             (8, 256, 256, kernels.MODE_ROWS)])
def test_one_or_four_rows_per_thread_split_when_worth_it(batch, input_size, hidden, mode, rng, parallel_launches):
    """Four rows per thread are shared by rows while R (3H x H) is at most _ROWS_MAX_RECURRENT_BYTES, the
    input's size aside (I=256 H=256: 0.75 MiB of R, 1.5 MiB with W); past it (H=384: 1.7 MiB) the step is
    split, for bfloat16 weights too (their arithmetic is float32's).  One row per thread is split from
    _SPLIT_ONE_ROW_MIN_MACS (I=64 H=384: 516K per step), whatever the weights.  Authority: torch.nn.GRU, and
    the serial run bit for bit (the split's products take the rows two at a time at B=2)."""
    module = torch_gru(input_size, hidden, 1, seed=15)
    model = convert_torch(module)
    T = 7
    with numba_threads(2):
        assert _plan(model, T, batch).mode == mode
        assert _plan(model.with_weights("bfloat16"), T, batch).mode == mode
    x = _x(rng, (T, batch, input_size), np.float32)
    _check_serial_and_parallel(model, x, run_torch(module, x, None, None), authority="torch.nn.GRU")
    assert len(parallel_launches) == 1


@needs_two_threads
@pytest.mark.parametrize("num_layers", [1, 2])
def test_stream_step_split_between_threads(num_layers, rng, parallel_launches):
    """A streaming step large enough to share between threads (B=1, I=128, H=256) equals torch.nn.GRU run
    over the frames so far, step after step, and a serial stream bit for bit."""
    module = torch_gru(128, 256, num_layers, seed=14)
    model = convert_torch(module)
    with numba_threads(2):
        assert _plan(model, 1, 1).mode == kernels.MODE_SPLIT
    x = _x(rng, (6, 1, 128), np.float32)
    h0 = 0.5 * _x(rng, (num_layers, 1, 256), np.float32)
    y_ref, h_ref = run_torch(module, x, h0, None)
    with numba_threads(1):
        serial = model.stream(batch_size=1, h0=h0)
        expected = [serial.step(x[t]).copy() for t in range(6)]
    with numba_threads(2):
        stream = model.stream(batch_size=1, h0=h0)
        for t in range(6):
            y_t = stream.step(x[t])
            assert_matches(y_t, y_ref[t], authority="torch.nn.GRU", dtype=np.float32, what=f"y_{t}")
            assert np.array_equal(y_t, expected[t])
        assert_matches(stream.state, h_ref, authority="torch.nn.GRU", dtype=np.float32, what="state")
    assert len(parallel_launches) == 6


@needs_two_threads
def test_stream_follows_thread_count_changes_between_steps(rng, parallel_launches):
    """A stream runs each step with the thread count then in force (a stream keeps plans per count):
    steps alternating between one and two threads equal torch.nn.GRU over the frames so far, and only
    the two-thread steps launch the parallel kernel."""
    module = torch_gru(128, 256, 1, seed=16)
    model = convert_torch(module)
    x = _x(rng, (6, 1, 128), np.float32)
    y_ref, h_ref = run_torch(module, x, None, None)
    stream = model.stream(batch_size=1)
    for t in range(6):
        with numba_threads(1 + t % 2):
            y_t = stream.step(x[t])
        assert_matches(y_t, y_ref[t], authority="torch.nn.GRU", dtype=np.float32, what=f"y_{t}")
    assert_matches(stream.state, h_ref, authority="torch.nn.GRU", dtype=np.float32, what="state")
    assert len(parallel_launches) == 3


def test_small_calls_stay_serial(rng, parallel_launches):
    """Below the work threshold no parallel region is launched (it would cost more than the call)."""
    model = convert_torch(torch_gru(10, 10, 1, bidirectional=True, seed=15))
    assert not _plan(model, 3, 1).parallel
    model(rng.standard_normal((3, 1, 10)).astype(np.float32))
    assert parallel_launches == []


@needs_two_threads
def test_split_call_whose_partner_never_runs_finishes_alone(rng, parallel_launches):
    """The worst case of MODE_SPLIT: only one worker ever runs (here the parallel entry point with one
    Numba thread runs the two workers one after the other).  Worker 0 takes over every one of its partner's items (SYNC_STOLEN
    counts them) and finishes the call without waiting; the result equals torch.nn.GRU."""
    module = torch_gru(64, 128, 2, seed=16)
    model = convert_torch(module)
    T = 9
    with numba_threads(2):
        plan = _plan(model, T, 1)
    assert plan.mode == kernels.MODE_SPLIT and plan.workers == 2
    x = _x(rng, (T, 1, 64), np.float32)
    y, h_n = np.empty((T, 1, 128), np.float32), np.empty((2, 1, 128), np.float32)
    from gru_fast._memory import address

    operands = _schedule.Operands(address(x), T, 1, 0, 0, 0, address(y), address(h_n))
    block = _schedule.argument_block(model._kernel_model, operands, plan)
    with numba_threads(1):
        kernels.FORWARD["float32", True](address(block))
    assert plan.sync[kernels.LINE * kernels.SYNC_STOLEN] == 2 * T  # both layers' T steps of chunk 1
    y_ref, h_ref = run_torch(module, x, None, None)
    assert_matches(y, y_ref, authority="torch.nn.GRU", dtype=np.float32, what="y")
    assert_matches(h_n, h_ref, authority="torch.nn.GRU", dtype=np.float32, what="h_n")


def test_kernel_cache_stamp_covers_every_compiled_module():
    """Numba checks a cached kernel against its own file only; gru_fast stamps its kernels with every
    module whose code they compile (gru_fast._cache._KERNEL_SOURCES), so a release changing one of them
    cannot load a stale kernel.  Every module that defines Numba code must be in that list, gru_fast's
    locator must be the one Numba consults first, and it must serve gru_fast's files only."""
    import re
    from pathlib import Path

    from numba.core import caching

    from gru_fast import _cache

    package = Path(_cache.__file__).parent
    compiled = {path.name for path in package.glob("*.py")
                if re.search(r"@(njit|intrinsic|overload|kernel|register_jitable)\b|\bnjit\(", path.read_text())}
    assert compiled <= set(_cache._KERNEL_SOURCES), compiled - set(_cache._KERNEL_SOURCES)
    first = caching.CacheImpl._locator_classes[0]
    assert first.__name__ == "GruFastCacheLocator", first
    stamp = _cache._kernel_sources_stamp()
    locator = first.from_function(kernels.FORWARD["float32", False].py_func, kernels.__file__)
    assert locator is not None and locator.get_source_stamp() == stamp
    assert locator.get_cache_path() == _cache.kernel_cache_dir()
    assert first.from_function(test_kernel_cache_stamp_covers_every_compiled_module, __file__) is None


@needs_two_threads
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_a_rows_result_does_not_depend_on_its_batch(bidirectional, rng, parallel_launches):
    """Every output element is the same chain of operations whatever rows share its batch: a batch of 9
    (MODE_ROWS: five rows in a six-row pass, the last row repeated, and four) gives each sequence exactly
    what it gets alone (one-row products; MODE_SPLIT for the unidirectional model) and in batches of 3, 5
    and 6 (three-row passes, six-row passes).  So Dask blocks, CLI chunks or any other batching give
    bit-identical results.  Authority for the values: torch.nn.GRU."""
    module = torch_gru(48, 128, 2, bidirectional=bidirectional, seed=17)
    model = convert_torch(module)
    T, B = 13, 9
    x = _x(rng, (T, B, 48), np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    with numba_threads(2):
        y, h_n = model(x, lengths=lengths)
        y_ref, h_ref = run_torch(module, x, None, lengths)
        assert_matches(y, y_ref, authority="torch.nn.GRU (packed)", dtype=np.float32, what="y")
        assert_matches(h_n, h_ref, authority="torch.nn.GRU (packed)", dtype=np.float32, what="h_n")
        for b0, b1 in [(b, b + 1) for b in range(B)] + [(0, 3), (3, 9), (2, 7)]:
            y_b, h_b = model(np.ascontiguousarray(x[:, b0:b1]), lengths=lengths[b0:b1])
            assert np.array_equal(y_b, y[:, b0:b1]) and np.array_equal(h_b, h_n[:, b0:b1]), (b0, b1)
    assert parallel_launches  # the batch of 9 ran in parallel (and, unidirectional, so did each sequence)
