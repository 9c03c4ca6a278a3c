"""Run a GRU over more sequences than one machine holds, on Dask.

gru_fast does not bring its own cluster: it builds ordinary Dask graphs, so the
same code runs on the threaded scheduler, on a ``distributed.LocalCluster`` or
on a multi-machine cluster behind ``distributed.Client("tcp://scheduler:8786")``.

Two entry points:

* :func:`map_sequences` — a dask array of padded sequences, chunked along the
  batch axis, to dask arrays of outputs and/or final states (one task per
  batch block, built with :func:`dask.array.blockwise`; nothing is computed
  until the caller asks);
* :func:`map_bag` — a :class:`dask.bag.Bag` whose elements are single
  sequences of different lengths.  Within each partition the sequences are
  sorted by length and cut into batches of similar lengths, so padding wastes
  little work; results come back one per element, in the input order.

How the work reaches the workers:

* the model enters the graph once, as a single key holding the :class:`GRU`
  (``dask.delayed(model, pure=True)``); every task names that key, so the
  weights are pickled once into the graph and fetched once per worker, never
  once per task.  A GRU pickles by its weights and configuration (no kernel
  objects), and a worker that dies simply recomputes the key: unlike a
  scattered future, nothing is lost with it;
* kernels are compiled once per worker process at most, and not at all where
  the worker's machine already holds them in the on-disk cache
  (``NUMBA_CACHE_DIR``, ``gru_fast/__pycache__`` or a private per-user
  directory: :mod:`gru_fast._cache`);
* results equal a single-process run bit for bit, whatever the blocks: each
  task is one ordinary ``model(x, h0, lengths)`` call, and the engine computes
  every output element by the same operations whatever other sequences share
  its batch (tests/test_kernel_modes.py).

``dask[distributed]`` is an optional extra (``pip install gru_fast[dask]``);
``import gru_fast`` never imports this module.
"""

from __future__ import annotations

import math
import operator

import numpy as np

try:
    import dask
    import dask.array as da
    import dask.bag as db
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gru_fast.dask needs Dask: pip install 'gru_fast[dask]' (or 'dask[distributed]')"
    ) from exc

from ._validate import as_lengths
from .model import GRU

__all__ = ["map_sequences", "map_bag", "OUTPUTS"]

OUTPUTS = ("y", "h_n", "both")
"""What a call returns: the outputs ``y``, the final states ``h_n``, or both."""


# --------------------------------------------------------------------------------------------------
# argument checks (all before any graph is built)
# --------------------------------------------------------------------------------------------------

def _check_model(model) -> GRU:
    if not isinstance(model, GRU):
        raise TypeError(f"model must be a gru_fast.GRU, got {type(model).__name__}")
    return model


def _check_output(output) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    return output


def _model_node(model: GRU):
    """The model as one graph key that every task depends on (pickled once, fetched once per worker).

    The key is derived from the weights and configuration, so two calls with the
    same model share it, and a recomputation after a lost worker rebuilds it.
    """
    token = dask.base.tokenize(model)
    return dask.delayed(model, pure=True, traverse=False, name=f"gru_fast-model-{token}")


def _known(size) -> bool:
    return not (isinstance(size, float) and math.isnan(size))


def _single_chunk(x, axis: int, what: str, rechunk: bool, hint: str):
    """x with one chunk along ``axis``; rechunked when allowed, else a ValueError saying how."""
    if len(x.chunks[axis]) == 1:
        return x
    if rechunk:
        return x.rechunk({axis: -1})
    raise ValueError(
        f"{what} must not be chunked along axis {axis} ({hint}); got chunks {x.chunks[axis]}. "
        f"Chunk along the batch axis only: {what} = {what}.rechunk({{{axis}: -1}}), or pass rechunk=True"
    )


def _chunked_like_batch(arr, name: str, batch_axis: int, batch_chunks: tuple):
    """``arr`` (dask or numpy) as a dask array whose batch axis is chunked exactly like x's, other axes whole."""
    target = tuple(batch_chunks if axis == batch_axis else (size,) for axis, size in enumerate(arr.shape))
    if not isinstance(arr, da.Array):
        if not all(_known(c) for c in batch_chunks):
            raise ValueError(
                f"{name} given as a numpy array needs x's batch chunk sizes, which are unknown; "
                "call x.compute_chunk_sizes() first"
            )
        return da.from_array(arr, chunks=target)
    if arr.chunks == target:
        return arr
    if not (all(_known(c) for c in batch_chunks) and all(_known(c) for c in arr.chunks[batch_axis])):
        raise ValueError(
            f"{name} must have the same chunks as x along the batch axis; with unknown chunk sizes they cannot "
            f"be matched (x: {batch_chunks}, {name}: {arr.chunks[batch_axis]}); call compute_chunk_sizes() on both"
        )
    return arr.rechunk(target)


def _check_shape(arr, name: str, shape: tuple, meaning: str) -> None:
    same = arr.ndim == len(shape) and all(
        not (_known(want) and _known(got)) or want == got for want, got in zip(shape, arr.shape)
    )
    if not same:
        raise ValueError(f"{name} must have shape {shape} ({meaning}), got {arr.shape}")


def _lengths_array(lengths, steps: int, batch, batch_chunks: tuple):
    """lengths (B,) as int64 dask array chunked like x's batch axis (numpy values checked now)."""
    if isinstance(lengths, da.Array):
        if lengths.dtype.kind == "b" or lengths.dtype.kind not in "iuf":
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        _check_shape(lengths, "lengths", (batch,), "one length per sequence")
    elif _known(batch):
        lengths = as_lengths(lengths, batch, steps, unbatched=False)
    else:
        raise ValueError("lengths given as a numpy array needs x's batch size, which is unknown; "
                         "call x.compute_chunk_sizes() first")
    return _chunked_like_batch(lengths, "lengths", 0, batch_chunks)


def _h0_array(h0, shape: tuple, batch_chunks: tuple):
    """h0 (L*D, B, H) as a dask array chunked like x's batch axis."""
    if not isinstance(h0, da.Array):
        try:
            h0 = np.asarray(h0)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"h0 must be array-like: {exc}") from None
    if h0.dtype.kind != "f":
        raise TypeError(f"h0 must hold floating-point numbers (float16/32/64), got dtype {h0.dtype}")
    _check_shape(h0, "h0", shape, "num_layers*num_directions, batch, hidden")
    return _chunked_like_batch(h0, "h0", 1, batch_chunks)


# --------------------------------------------------------------------------------------------------
# dask arrays
# --------------------------------------------------------------------------------------------------

def _only_block(value):
    """The block itself: blockwise hands axes that are absent from the output over as nested lists, here
    of one block each (x and h0 are single chunks along time, features, layers and hidden).  Unwrapping
    them beats ``concatenate=True``, which would copy every block into a new array first."""
    while isinstance(value, list):
        (value,) = value
    return value


def _run_block(x, lengths, h0, *, model: GRU):
    """One task: the model over one batch block (empty blocks included); (y, h_n) in the model's layout."""
    return model(_only_block(x), h0=_only_block(h0), lengths=lengths)


def map_sequences(model: GRU, x, lengths=None, h0=None, *, output: str = "y", rechunk: bool = False):
    """Run ``model`` over a dask array of padded sequences, one task per batch block.

    Parameters
    ----------
    model : gru_fast.GRU
        The network.  It enters the graph once (one key), whatever the number of blocks.
    x : dask.array.Array
        (T, B, I), or (B, T, I) when ``model.batch_first``; any float dtype (computed in
        ``model.dtype``).  Chunked along the batch axis only: each chunk is one task, so
        chunks of hundreds to thousands of sequences keep the per-task overhead (about a
        millisecond) small and give the engine rows to share between its threads.
    lengths : dask or numpy array of int, optional
        (B,) valid steps per sequence, each in [0, T] (PackedSequence semantics: ``y`` is 0
        at padded steps, ``h_n`` is the state after each sequence's last valid step).  A
        numpy array is checked now; a dask array is rechunked to x's batch chunks if needed
        and its values are checked by each task (ValueError at compute time).
    h0 : dask or numpy array, optional
        (L*D, B, H) initial states; zeros when omitted.  Rechunked to x's batch chunks.
    output : {"y", "h_n", "both"}
        Return the outputs, the final states, or both as a pair.  Compute a pair together
        (``dask.compute(y, h_n)``): computed one at a time, each would rerun the model.
    rechunk : bool
        With True, x (and h0) chunked along time or features are first rechunked to one
        chunk along those axes (a concatenation within each batch block).  With False,
        such chunking is a ValueError, so no data movement happens unasked.

    Returns
    -------
    y : dask.array.Array
        (T, B, D*H) (batch_first: (B, T, D*H)), chunked like x along the batch axis.
    h_n : dask.array.Array
        (L*D, B, H), chunked like x along the batch axis.

    Raises
    ------
    TypeError
        ``model`` is not a GRU, ``x`` is not a dask array, or a dtype is not numeric as needed.
    ValueError
        Wrong rank, input size, shape of ``lengths`` / ``h0``, chunking along time or
        features (without ``rechunk``), unknown time / feature sizes, or no time step.

    Examples
    --------
    >>> import dask.array as da, gru_fast, gru_fast.dask
    >>> x = da.from_zarr("features.zarr")                      # (T, B, I), chunks (T, 4096, I)
    >>> y, h_n = gru_fast.dask.map_sequences(model, x, output="both")
    >>> da.to_zarr(y, "outputs.zarr")                          # computed on the cluster
    """
    model = _check_model(model)
    output = _check_output(output)
    if not isinstance(x, da.Array):
        raise TypeError(
            f"x must be a dask.array.Array, got {type(x).__name__}; wrap a numpy array with "
            "dask.array.from_array(x, chunks={batch_axis: rows_per_task})"
        )
    layout = "(B, T, I)" if model.batch_first else "(T, B, I)"
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D {layout} with I={model.input_size}, got shape {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(f"x must hold floating-point numbers (float16/32/64), got dtype {x.dtype}")
    batch_axis, time_axis = (0, 1) if model.batch_first else (1, 0)
    steps, features = x.shape[time_axis], x.shape[2]
    if not (_known(steps) and _known(features)):
        raise ValueError(f"x must have known time and feature sizes, got shape {x.shape}; call x.compute_chunk_sizes()")
    if features != model.input_size:
        raise ValueError(f"x must have input size {model.input_size} on its last axis, got shape {x.shape}")
    if steps == 0:
        raise ValueError(f"x must hold at least one time step, got shape {x.shape}")
    x = _single_chunk(x, time_axis, "x", rechunk, "time")
    x = _single_chunk(x, 2, "x", rechunk, "features")
    batch, batch_chunks = x.shape[batch_axis], x.chunks[batch_axis]

    H, D, LD = model.hidden_size, model.num_directions, model.num_layers * model.num_directions
    x_index = "bti" if model.batch_first else "tbi"
    args = [x, x_index]
    if lengths is None:
        args += [None, None]
    else:
        args += [_lengths_array(lengths, steps, batch, batch_chunks), "b"]
    if h0 is None:
        args += [None, None]
    else:
        args += [_h0_array(h0, (LD, batch, H), batch_chunks), "kbh"]

    dtype = model.dtype
    empty3 = np.empty((0, 0, 0), dtype)
    per_block = da.blockwise(
        _run_block, "b", *args, model=_model_node(model), concatenate=False,
        token="gru_fast-run", meta=(empty3, empty3),
    )
    y_index = "bto" if model.batch_first else "tbo"
    results = {}
    if output in ("y", "both"):
        results["y"] = da.blockwise(
            operator.getitem, y_index, per_block, "b", 0, None, new_axes={"t": steps, "o": D * H},
            token="gru_fast-y", dtype=dtype, meta=empty3,
        )
    if output in ("h_n", "both"):
        results["h_n"] = da.blockwise(
            operator.getitem, "kbh", per_block, "b", 1, None, new_axes={"k": LD, "h": H},
            token="gru_fast-h_n", dtype=dtype, meta=empty3,
        )
    if output == "both":
        return results["y"], results["h_n"]
    return results[output]


# --------------------------------------------------------------------------------------------------
# dask bags
# --------------------------------------------------------------------------------------------------

def _as_sequence(element, index: int, model: GRU) -> np.ndarray:
    try:
        arr = np.asarray(element)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"bag element {index} of its partition must be array-like: {exc}") from None
    if arr.ndim != 2 or arr.shape[1] != model.input_size:
        raise ValueError(
            f"bag element {index} of its partition must be one sequence of shape (T_i, {model.input_size}), "
            f"got shape {arr.shape}"
        )
    if arr.dtype.kind != "f":
        raise TypeError(f"bag element {index} of its partition must hold floating-point numbers, got dtype {arr.dtype}")
    return arr


def _run_partition(partition, model: GRU, batch_size: int, returns: str) -> list:
    """One task: bucket a partition's sequences by length, run the batches, return per-sequence results.

    Sequences are sorted by length (stably) and cut into batches of ``batch_size``, each
    padded to its longest member and run with ``lengths=``; each result is copied out of
    its batch so it holds no reference to the padded buffers.
    """
    sequences = [_as_sequence(element, index, model) for index, element in enumerate(partition)]
    lengths = np.array([seq.shape[0] for seq in sequences], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    results: list = [None] * len(sequences)
    batch_first = model.batch_first
    for start in range(0, len(sequences), batch_size):
        members = order[start : start + batch_size]
        batch_lengths = lengths[members]
        steps = max(1, int(batch_lengths.max()))  # an all-empty batch still runs one (masked) step
        shape = (len(members), steps, model.input_size) if batch_first else (steps, len(members), model.input_size)
        x = np.zeros(shape, model.dtype)
        for row, member in enumerate(members):
            n = batch_lengths[row]
            if batch_first:
                x[row, :n] = sequences[member]
            else:
                x[:n, row] = sequences[member]
        y, h_n = model(x, lengths=batch_lengths)
        for row, member in enumerate(members):
            n = batch_lengths[row]
            y_row = (y[row, :n] if batch_first else y[:n, row]).copy() if returns != "h_n" else None
            h_row = h_n[:, row].copy() if returns != "y" else None
            results[member] = y_row if returns == "y" else h_row if returns == "h_n" else (y_row, h_row)
    return results


def map_bag(model: GRU, bag, *, batch_size: int = 256, output: str = "y"):
    """Run ``model`` over a bag of variable-length sequences, batching similar lengths together.

    Parameters
    ----------
    model : gru_fast.GRU
        The network.  It enters the graph once (one key), whatever the number of partitions.
    bag : dask.bag.Bag
        Each element one sequence: an array (T_i, I) of floats (computed in ``model.dtype``);
        T_i may be 0.  The element layout is the same whatever ``model.batch_first``.
    batch_size : int
        Sequences per engine call.  Each partition is sorted by length and cut into batches
        of this size, each padded to its longest sequence, so the padding waste depends on
        how many sequences a partition holds: partitions of several batches keep it small.
    output : {"y", "h_n", "both"}
        Per element: ``y_i`` (T_i, D*H), ``h_n_i`` (L*D, H), or the pair ``(y_i, h_n_i)``.

    Returns
    -------
    dask.bag.Bag
        One result per input element, same partitions, same order.  ``h_n_i`` of an empty
        sequence is zeros (the initial state).

    Raises
    ------
    TypeError, ValueError
        Now for a bad ``model``, ``bag``, ``batch_size`` or ``output``; at compute time for an
        element that is not a (T_i, I) float array (the message names its index in the partition).

    Examples
    --------
    >>> import dask.bag as db, gru_fast.dask
    >>> bag = db.from_sequence(files, npartitions=64).map(load_features)    # (T_i, I) arrays
    >>> states = gru_fast.dask.map_bag(model, bag, batch_size=256, output="h_n")
    >>> embeddings = np.stack(states.compute())
    """
    model = _check_model(model)
    output = _check_output(output)
    if not isinstance(bag, db.Bag):
        raise TypeError(f"bag must be a dask.bag.Bag, got {type(bag).__name__}; build one with dask.bag.from_sequence")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return bag.map_partitions(
        _run_partition, _model_node(model), batch_size=int(batch_size), returns=output, token="gru_fast-bag"
    )
