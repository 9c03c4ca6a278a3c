"""Argument checks shared by the model and the stream.

Everything a kernel relies on (dtype, shape, C-contiguity, alignment, ranges)
is established here, before any kernel runs, with messages that name the
argument and what was expected.  Inputs are never written: a conversion makes
a new array, and outputs may not overlap inputs.
"""

from __future__ import annotations

import sys

import numpy as np

from ._memory import address

__all__ = ["as_float_array", "as_in_place_array", "as_lengths", "check_out_array", "check_no_overlap"]


def as_float_array(value, name: str, dtype: np.dtype) -> np.ndarray:
    """``value`` as a C-contiguous, aligned array of ``dtype`` (a copy only when needed)."""
    if type(value) is np.ndarray and value.dtype == dtype:
        flags = value.flags
        if flags.c_contiguous and flags.aligned:
            return value  # the common case, checked first: a call on small inputs is a few microseconds
    arr = value if type(value) is np.ndarray else _asarray(value, name)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must hold floating-point numbers (float16/32/64), got dtype {arr.dtype}")
    return np.require(arr, dtype, "CA")  # keeps the shape of a 0-d array (ascontiguousarray makes it (1,))


def as_in_place_array(value, name: str, dtype: np.dtype) -> np.ndarray:
    """``value`` as the ndarray a bound call reads in place, or TypeError saying what is wrong with it.

    An ``np.memmap`` is read in place through a plain-ndarray view of it (the view keeps the mapping
    alive); any other ndarray subclass is refused, since what it stands for may not be its memory.
    """
    if isinstance(value, np.memmap):
        value = value.view(np.ndarray)
    if type(value) is np.ndarray and value.dtype == dtype and value.flags.c_contiguous and value.flags.aligned:
        return value
    if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        problem = (f"an instance of the ndarray subclass {type(value).__module__}.{type(value).__qualname__}; "
                   f"pass np.asarray({name}) if its memory is what should be read")
    elif type(value) is not np.ndarray:
        kind = type(value)
        name_of_kind = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        problem = f"a {name_of_kind}, not a numpy array"
    elif value.dtype != dtype:
        problem = f"an array of dtype {value.dtype}"
    elif not value.flags.c_contiguous:
        problem = f"a non-contiguous array (shape {value.shape}, strides {value.strides})"
    else:
        problem = "an array whose data is not aligned to its item size"
    raise TypeError(f"bind() reads {name} in place, so it must be a C-contiguous, aligned numpy array of dtype "
                    f"{dtype}; got {problem}")


def _asarray(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        arr = _widened_tensor(value)
        if arr is None:
            raise TypeError(f"{name} must be array-like (numpy array, CPU tensor, nested lists): {exc}") from None
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got an object array (ragged or mixed input?)")
    return arr


def _widened_tensor(value):
    """A CPU torch tensor of a float dtype numpy lacks (bfloat16, float8) as float32, exactly: numpy
    cannot take it as it is.  None for anything else.  torch is only looked up if it is already loaded:
    a tensor implies it is."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    if value.device.type != "cpu" or value.requires_grad:
        return None  # np.asarray's own refusal explains these
    return value.to(torch.float32).numpy()


def as_lengths(value, batch: int, steps: int, unbatched: bool) -> np.ndarray:
    """Validate sequence lengths: integers in [0, steps], one per batch row; returns int64 (batch,)."""
    arr = _asarray(value, "lengths")
    expected = "a scalar or shape (1,)" if unbatched else f"shape ({batch},)"
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise TypeError(f"lengths must hold integers, got dtype {arr.dtype}")
    if unbatched and arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (batch,):
        raise ValueError(f"lengths must have {expected} (one length per sequence), got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError("lengths must be finite integers, got NaN or infinity")
        if not np.all(arr == np.round(arr)):
            raise ValueError("lengths must be whole numbers, got fractional values")
    if arr.size and (arr.min() < 0 or arr.max() > steps):
        raise ValueError(
            f"lengths must lie in [0, {steps}] (the number of time steps), got values from {arr.min()} to {arr.max()}"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_out_array(arr, name: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An output buffer must be exactly what the kernel writes: dtype, shape, C-contiguous, writeable."""
    if type(arr) is not np.ndarray:
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not (arr.flags.c_contiguous and arr.flags.aligned):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    if not arr.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return arr


def check_no_overlap(outputs: dict, inputs: dict, known: dict | None = None) -> None:
    """Refuse outputs that share memory with an input or with each other.

    ``outputs`` maps a name to (C-contiguous array, its data address); ``inputs`` maps a name to anything
    the caller passed (None is skipped); ``known`` maps ``id(array)`` to an address already read.
    Contiguous arrays are compared by address range (``np.may_share_memory`` costs 0.2-0.4 us a pair,
    as much as a whole call on a small model); anything else goes through ``np.may_share_memory``.
    """
    known = known or {}
    spans = {name: (addr, addr + arr.nbytes) for name, (arr, addr) in outputs.items()}
    names = list(outputs)
    for i, name in enumerate(names):
        out = outputs[name][0]
        for other, arr in inputs.items():
            if arr is not None and _overlap(out, spans[name], arr, known):
                raise ValueError(f"out {name} shares memory with {other}; outputs must not overlap inputs")
        for other in names[i + 1 :]:
            if spans[name][0] < spans[other][1] and spans[other][0] < spans[name][1]:
                raise ValueError(f"out {name} and {other} share memory")


def _overlap(out, out_span, arr, known) -> bool:
    if type(arr) is np.ndarray and arr.flags.c_contiguous:
        start = known.get(id(arr)) or address(arr)
        return start < out_span[1] and out_span[0] < start + arr.nbytes
    return bool(np.may_share_memory(out, arr))
