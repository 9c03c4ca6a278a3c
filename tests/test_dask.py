"""gru_fast.dask on a real ``distributed.LocalCluster`` with 2 worker processes.

Authorities:

* PyTorch's ``nn.GRU`` (``pack_padded_sequence`` for lengths) for every value computed on the cluster;
* the local engine run on the *same batches* for "a distributed run equals a single-process run": the
  comparison is bitwise (``np.array_equal``), since each task is one ordinary ``model(...)`` call;
* the local engine on the *whole* batch, also bitwise: the engine computes every output element by the
  same operations whatever other sequences share its batch (pinned by
  tests/test_kernel_modes.py::test_a_rows_result_does_not_depend_on_its_batch), so blocks change nothing.

The cluster is module scoped (about 3 s to start); each test computes its local reference first, so the
main process has written the on-disk kernel cache before a worker needs it (see
``test_workers_load_kernels_from_disk_cache``).  Tasks that must run on the workers and are not part of
gru_fast are local functions, so cloudpickle ships them by value instead of importing this module there.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal

import cloudpickle
import dask
import dask.array as da
import dask.bag as db
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

import gru_fast
import gru_fast.dask as gd
from gru_fast._cache import kernel_cache_stats
from conftest import assert_matches, convert_torch, run_torch, torch_gru

I, H, LAYERS = 6, 12, 2


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each; Dask retries a task whose worker died up to 3 times.

    The nanny writes OMP_NUM_THREADS and friends into this process's environment before spawning
    workers; it is restored afterwards so later tests' child processes see the environment they expect.
    """
    saved_environ = dict(os.environ)
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 3}):
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.CRITICAL)
        with cluster, Client(cluster, set_as_default=False) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)


@pytest.fixture(scope="module", params=[False, True], ids=["time_major", "batch_first"])
def models(request):
    """(nn.GRU, our GRU): 2 layers, bidirectional, float32, PyTorch's own initialisation."""
    module = torch_gru(I, H, LAYERS, bidirectional=True, batch_first=request.param, seed=7)
    return module, convert_torch(module)


def _inputs(rng, T, B, batch_first):
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T  # pack_padded_sequence needs one full-length sequence for total_length to matter
    h0 = rng.standard_normal((2 * LAYERS, B, H)).astype(np.float32)
    return x, lengths, h0


def _blocks(batch_axis, B, chunk):
    return [slice(start, min(start + chunk, B)) for start in range(0, B, chunk)]


def _local_per_block(model, x, lengths, h0, chunk):
    """The engine in this process on the same batch blocks the cluster runs (the bitwise reference)."""
    batch_axis = 0 if model.batch_first else 1
    ys, hs = [], []
    for rows in _blocks(batch_axis, x.shape[batch_axis], chunk):
        y, h_n = model(x[rows] if model.batch_first else x[:, rows], h0[:, rows], lengths[rows])
        ys.append(y)
        hs.append(h_n)
    return np.concatenate(ys, axis=batch_axis), np.concatenate(hs, axis=1)


# --------------------------------------------------------------------------------------------------
# the model travels by weights
# --------------------------------------------------------------------------------------------------

def test_pickled_model_gives_identical_outputs(models, rng):
    """Workers rebuild the model from its pickled weights; the rebuilt model computes the same bits."""
    module, model = models
    x, lengths, h0 = _inputs(rng, 9, 11, model.batch_first)
    clone = pickle.loads(pickle.dumps(model))
    want_y, want_h = model(x, h0, lengths)
    got_y, got_h = clone(x, h0, lengths)
    assert np.array_equal(got_y, want_y) and np.array_equal(got_h, want_h)
    assert_matches(got_y, run_torch(module, x, h0, lengths)[0], authority="PyTorch", dtype=np.float32,
                   what="unpickled model y")


# --------------------------------------------------------------------------------------------------
# dask arrays
# --------------------------------------------------------------------------------------------------

def test_map_sequences_equals_torch_and_the_local_engine(client, models, rng):
    module, model = models
    T, B, chunk = 13, 38, 16  # blocks of 16, 16 and 6 rows: the last takes the engine's row path
    x, lengths, h0 = _inputs(rng, T, B, model.batch_first)
    batch_axis = 0 if model.batch_first else 1
    local_y, local_h = _local_per_block(model, x, lengths, h0, chunk)
    xd = da.from_array(x, chunks={batch_axis: chunk})

    y, h_n = gd.map_sequences(model, xd, lengths=lengths, h0=h0, output="both")
    assert y.shape == local_y.shape and h_n.shape == local_h.shape
    assert y.dtype == np.float32 and h_n.dtype == np.float32
    assert y.chunks[batch_axis] == (16, 16, 6) and h_n.chunks == ((2 * LAYERS,), (16, 16, 6), (H,))
    with get_task_stream(client) as stream:
        got_y, got_h = client.compute([y, h_n], sync=True)
    model_calls = [task for task in stream.data if "gru_fast-run" in str(task["key"])]
    assert len(model_calls) == 3, "computing y and h_n together must run the model once per block"

    assert np.array_equal(got_y, local_y) and np.array_equal(got_h, local_h)
    torch_y, torch_h = run_torch(module, x, h0, lengths)
    assert_matches(got_y, torch_y, authority="PyTorch", dtype=np.float32, what="dask y")
    assert_matches(got_h, torch_h, authority="PyTorch", dtype=np.float32, what="dask h_n")
    whole_y, whole_h = model(x, h0, lengths)
    assert np.array_equal(got_y, whole_y) and np.array_equal(got_h, whole_h)


def test_map_sequences_single_outputs_dask_lengths_and_time_chunks(client, rng):
    """output="y" / "h_n" alone; lengths and h0 as dask arrays chunked differently from x; x chunked along
    time with rechunk=True.  No h0 means zeros, as in PyTorch."""
    module = torch_gru(I, H, LAYERS, bidirectional=True, seed=3)
    model = convert_torch(module)
    T, B = 10, 24
    x, lengths, _ = _inputs(rng, T, B, False)
    torch_y, torch_h = run_torch(module, x, None, lengths)

    xd = da.from_array(x, chunks=(5, 12, I))
    lengths_d = da.from_array(lengths, chunks=5)
    y = gd.map_sequences(model, xd, lengths=lengths_d, output="y", rechunk=True)
    h_n = gd.map_sequences(model, xd, lengths=lengths_d, output="h_n", rechunk=True)
    assert y.chunks == ((T,), (12, 12), (2 * H,)) and h_n.chunks == ((2 * LAYERS,), (12, 12), (H,))
    got_y, got_h = client.compute([y, h_n], sync=True)
    assert_matches(got_y, torch_y, authority="PyTorch", dtype=np.float32, what="dask y, dask lengths")
    assert_matches(got_h, torch_h, authority="PyTorch", dtype=np.float32, what="dask h_n, dask lengths")

    h0 = rng.standard_normal((2 * LAYERS, B, H)).astype(np.float32)
    got = client.compute(gd.map_sequences(model, xd.rechunk((T, 12, I)), h0=da.from_array(h0, chunks=(1, 8, 4)),
                                          output="h_n"), sync=True)
    assert_matches(got, run_torch(module, x, h0)[1], authority="PyTorch", dtype=np.float32, what="dask h0")


def test_map_sequences_builds_the_graph_without_computing():
    """Nothing runs until the caller computes: an input whose blocks would raise is not touched."""
    model = convert_torch(torch_gru(I, H, 1))

    def never(block):
        raise AssertionError("map_sequences computed its input")

    x = da.zeros((4, 20, I), dtype=np.float32, chunks=(4, 10, I)).map_blocks(never, dtype=np.float32)
    lengths = da.ones(20, dtype=np.int64, chunks=10).map_blocks(never, dtype=np.int64)
    y, h_n = gd.map_sequences(model, x, lengths=lengths, output="both")
    assert y.shape == (4, 20, H) and h_n.shape == (1, 20, H)


def test_unknown_batch_chunk_sizes(rng):
    """x after a boolean selection has unknown (NaN) batch chunks: runs as is; a numpy lengths then needs
    the sizes, and the error says how to get them."""
    module = torch_gru(I, H, 1, batch_first=True, seed=9)
    model = convert_torch(module)
    x = rng.standard_normal((30, 5, I)).astype(np.float32)
    keep = x[:, 0, 0] > 0
    xd = da.from_array(x, chunks=(10, 5, I))
    selected = xd[xd[:, 0, 0] > 0]
    assert np.isnan(selected.chunks[0][0])
    y, h_n = gd.map_sequences(model, selected, output="both")
    got_y, got_h = dask.compute(y, h_n, scheduler="sync")
    torch_y, torch_h = run_torch(module, x[keep])
    assert_matches(got_y, torch_y, authority="PyTorch", dtype=np.float32, what="y, unknown chunks")
    assert_matches(got_h, torch_h, authority="PyTorch", dtype=np.float32, what="h_n, unknown chunks")
    with pytest.raises(ValueError, match=r"lengths given as a numpy array .*compute_chunk_sizes"):
        gd.map_sequences(model, selected, lengths=np.full(int(keep.sum()), 5))


def test_empty_inputs_give_empty_results(client):
    model = convert_torch(torch_gru(I, H, LAYERS, bidirectional=True))
    x = da.zeros((5, 0, I), dtype=np.float32, chunks=(5, 8, I))
    y, h_n = client.compute(list(gd.map_sequences(model, x, lengths=np.zeros(0, np.int64), output="both")),
                            sync=True)
    assert y.shape == (5, 0, 2 * H) and h_n.shape == (2 * LAYERS, 0, H)
    assert y.dtype == np.float32 and h_n.dtype == np.float32
    assert client.compute(gd.map_bag(model, db.from_sequence([], npartitions=1)), sync=True) == []


# --------------------------------------------------------------------------------------------------
# dask bags
# --------------------------------------------------------------------------------------------------

def test_map_bag_variable_lengths_in_input_order(client, models, rng):
    """Sequences of lengths 0..20 in shuffled order, 3 partitions, batches of 4: each result matches
    PyTorch run on that sequence alone, and results come back in the input order."""
    module, model = models
    lengths = rng.permutation(np.repeat(np.arange(21), 2))
    sequences = [rng.standard_normal((n, I)).astype(np.float32) for n in lengths]
    bag = db.from_sequence(sequences, npartitions=3)
    results = client.compute(gd.map_bag(model, bag, batch_size=4, output="both"), sync=True)

    assert len(results) == len(sequences)
    for index, (seq, (y_i, h_i)) in enumerate(zip(sequences, results)):
        assert y_i.shape == (len(seq), 2 * H) and h_i.shape == (2 * LAYERS, H), index
        if len(seq) == 0:  # PyTorch refuses empty sequences; PackedSequence semantics: the state stays h0 = 0
            assert np.array_equal(h_i, np.zeros((2 * LAYERS, H), np.float32)), index
            continue
        x = seq[None] if model.batch_first else seq[:, None]
        torch_y, torch_h = run_torch(module, x)
        assert_matches(y_i, torch_y[0] if model.batch_first else torch_y[:, 0], authority="PyTorch",
                       dtype=np.float32, what=f"bag element {index} y")
        assert_matches(h_i, torch_h[:, 0], authority="PyTorch", dtype=np.float32, what=f"bag element {index} h_n")

    only_y = client.compute(gd.map_bag(model, bag, batch_size=4, output="y"), sync=True)
    only_h = client.compute(gd.map_bag(model, bag, batch_size=4, output="h_n"), sync=True)
    assert all(np.array_equal(a, b[0]) for a, b in zip(only_y, results))
    assert all(np.array_equal(a, b[1]) for a, b in zip(only_h, results))


# --------------------------------------------------------------------------------------------------
# how the work reaches the workers
# --------------------------------------------------------------------------------------------------

def test_model_enters_the_graph_once():
    """One graph entry carries the weights; the 8 per-block tasks only name its key."""
    model = convert_torch(torch_gru(I, 64, LAYERS, bidirectional=True))
    model_bytes = len(pickle.dumps(model))
    x = da.zeros((6, 64, I), dtype=np.float32, chunks=(6, 8, I))
    y, h_n = gd.map_sequences(model, x, output="both")
    bag = gd.map_bag(model, db.from_sequence(range(8), npartitions=8).map(lambda _: np.zeros((3, I))))
    for name, collection in (("array", y), ("optimized array", dask.optimize(y, h_n)[0]), ("bag", bag)):
        graph = dict(collection.__dask_graph__())
        heavy = [key for key, task in graph.items() if len(cloudpickle.dumps(task)) >= model_bytes // 2]
        assert len(heavy) == 1, f"{name}: {len(heavy)} graph entries carry the model's weights"
        assert len(graph) > 8


def test_each_worker_unpickles_the_model_at_most_once(client, rng):
    """Count rebuilds from pickle on the workers over a 12-task job: at most one per worker."""
    model = convert_torch(torch_gru(I, H, LAYERS, bidirectional=True, seed=11))
    rebuild = type(model).__reduce__(model)[0]
    module_name, function_name = rebuild.__module__, rebuild.__name__

    def count_rebuilds():
        import importlib

        module = importlib.import_module(module_name)
        original = getattr(module, function_name)
        counter = {"rebuilds": 0}

        def counting(*args, **kwargs):
            counter["rebuilds"] += 1
            return original(*args, **kwargs)

        counting.counter = counter
        counting.original = original
        setattr(module, function_name, counting)

    def read_and_restore():
        import importlib

        module = importlib.import_module(module_name)
        counting = getattr(module, function_name)
        setattr(module, function_name, counting.original)
        return counting.counter["rebuilds"]

    x = rng.standard_normal((7, 96, I)).astype(np.float32)
    expected = _local_per_block(model, x, np.full(96, 7), np.zeros((2 * LAYERS, 96, H), np.float32), 8)[0]
    client.run(count_rebuilds)
    try:
        got = client.compute(gd.map_sequences(model, da.from_array(x, chunks=(7, 8, I))), sync=True)
    finally:
        rebuilds = client.run(read_and_restore)
    assert np.array_equal(got, expected)
    assert 1 <= sum(rebuilds.values()) and max(rebuilds.values()) <= 1, rebuilds


def test_job_survives_a_worker_killed_mid_job(client, rng, tmp_path):
    """The first attempt at block 2 SIGKILLs its worker process; the nanny restarts it, the scheduler
    reschedules the lost tasks (the model key included) and the result is still exact."""
    module = torch_gru(I, H, LAYERS, bidirectional=True, seed=5)
    model = convert_torch(module)
    T, B, chunk = 8, 48, 8
    x, lengths, h0 = _inputs(rng, T, B, False)
    expected = _local_per_block(model, x, lengths, h0, chunk)
    marker = str(tmp_path / "killed")

    def kill_worker_once(block, block_info=None):
        if block_info[None]["chunk-location"][1] == 2 and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return block

    pids_before = set(client.run(os.getpid).values())
    xd = da.from_array(x, chunks=(T, chunk, I)).map_blocks(kill_worker_once, dtype=np.float32)
    got_y, got_h = client.compute(list(gd.map_sequences(model, xd, lengths, h0, output="both")), sync=True)

    with open(marker) as f:
        killed = int(f.read())
    assert killed in pids_before
    assert np.array_equal(got_y, expected[0]) and np.array_equal(got_h, expected[1])
    assert_matches(got_y, run_torch(module, x, h0, lengths)[0], authority="PyTorch", dtype=np.float32,
                   what="y after a worker died")
    client.wait_for_workers(2, timeout=60)
    assert killed not in set(client.run(os.getpid).values())


def test_workers_load_kernels_from_disk_cache(client, rng):
    """Every kernel a worker ran came from Numba's on-disk cache (written by this process's local run):
    no worker compiled anything, so later tasks on a worker cost no compile either."""
    model = convert_torch(torch_gru(I, H, LAYERS, bidirectional=True, seed=13)).astype(np.float64)
    x = rng.standard_normal((6, 40, I))
    expected = _local_per_block(model, x, np.full(40, 6), np.zeros((2 * LAYERS, 40, H)), 10)[0]
    got = client.compute(gd.map_sequences(model, da.from_array(x, chunks=(6, 10, I))), sync=True)
    assert np.array_equal(got, expected)

    stats = client.run(kernel_cache_stats)
    assert all(s["cache_misses"] == 0 for s in stats.values()), f"workers compiled kernels: {stats}"
    assert sum(s["cache_hits"] for s in stats.values()) > 0, f"no worker loaded a kernel: {stats}"


# --------------------------------------------------------------------------------------------------
# bad input: refused before any graph runs
# --------------------------------------------------------------------------------------------------

def test_bad_arguments_are_refused_before_scheduling():
    model = convert_torch(torch_gru(I, H, 1))
    x = da.zeros((5, 12, I), dtype=np.float32, chunks=(5, 6, I))
    cases = [
        (TypeError, "x must be a dask.array.Array", dict(x=np.zeros((5, 12, I), np.float32))),
        (ValueError, "x must be 3-D", dict(x=da.zeros((5, I), chunks=(5, I)))),
        (ValueError, "x must have input size", dict(x=da.zeros((5, 12, I + 1), chunks=(5, 6, I + 1)))),
        (TypeError, "x must hold floating-point", dict(x=da.zeros((5, 12, I), dtype=np.int32, chunks=(5, 6, I)))),
        (ValueError, "x must not be chunked along axis 0 (time)", dict(x=x.rechunk((2, 6, I)))),
        (ValueError, "x must not be chunked along axis 2 (features)", dict(x=x.rechunk((5, 6, 2)))),
        (ValueError, "x must hold at least one time step", dict(x=da.zeros((0, 12, I), chunks=(1, 6, I)))),
        (ValueError, "lengths must have shape (12,)", dict(lengths=np.full(11, 5))),
        (ValueError, "lengths must have shape (12,)", dict(lengths=da.full(13, 5, chunks=6))),
        (ValueError, "lengths must lie in [0, 5]", dict(lengths=np.full(12, 6))),
        (TypeError, "lengths must hold integers", dict(lengths=da.ones(12, dtype=bool, chunks=6))),
        (ValueError, "h0 must have shape (1, 12, 12)", dict(h0=np.zeros((1, 11, H), np.float32))),
        (TypeError, "h0 must hold floating-point", dict(h0=np.zeros((1, 12, H), np.int64))),
        (ValueError, "output must be one of", dict(output="states")),
        (TypeError, "model must be a gru_fast.GRU", dict(model="model.npz")),
    ]
    for error, message, overrides in cases:
        kwargs = dict(dict(model=model, x=x), **overrides)
        with pytest.raises(error) as info:
            gd.map_sequences(**kwargs)
        assert message in str(info.value), (message, str(info.value))

    bag = db.from_sequence([np.zeros((3, I), np.float32)])
    for error, message, kwargs in [
        (TypeError, "bag must be a dask.bag.Bag", dict(bag=[np.zeros((3, I))])),
        (ValueError, "batch_size must be a positive integer", dict(bag=bag, batch_size=0)),
        (ValueError, "batch_size must be a positive integer", dict(bag=bag, batch_size=2.5)),
        (ValueError, "output must be one of", dict(bag=bag, output="h")),
    ]:
        with pytest.raises(error, match=None) as info:
            gd.map_bag(model, **kwargs)
        assert message in str(info.value), (message, str(info.value))


def test_bad_values_fail_the_task_with_a_clear_error():
    """What can only be seen in the data (dask lengths out of range, a malformed bag element) raises in
    the task, naming the argument; run on the synchronous scheduler, the error reaches the caller as is."""
    model = convert_torch(torch_gru(I, H, 1))
    x = da.zeros((5, 12, I), dtype=np.float32, chunks=(5, 6, I))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        gd.map_sequences(model, x, lengths=da.full(12, 9, chunks=6)).compute(scheduler="sync")
    bag = db.from_sequence([np.zeros((3, I), np.float32), np.zeros((3, I + 1), np.float32)], npartitions=1)
    with pytest.raises(ValueError, match=r"bag element 1 of its partition must be one sequence of shape"):
        gd.map_bag(model, bag).compute(scheduler="sync")


def test_importing_gru_fast_does_not_import_dask():
    from conftest import run_python

    proc = run_python("import sys, gru_fast; print(sorted(m for m in ('dask', 'distributed', 'gru_fast.dask') "
                      "if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
