"""Handing arrays to kernels as raw addresses.

Numba wraps every ndarray argument in a fresh runtime MemInfo on each call,
which counts as a Numba runtime allocation.  gru_fast promises that a
steady-state call allocates nothing, so kernels take data addresses (plain
integers) and rebuild array views with :func:`numba.carray`, which owns no
memory.  The Python wrappers validate dtype, shape and C-contiguity before an
address is taken, and keep the arrays alive for the duration of the call.
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["address", "pointer"]


@intrinsic
def pointer(typingctx, addr, marker):
    """``(int address, scalar marker) -> CPointer(typeof(marker))`` inside a kernel."""
    if not isinstance(addr, types.Integer):
        return None
    ptr_type = types.CPointer(marker)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(addr, marker), codegen


# The data pointer is the first field after the object header of NumPy's
# PyArrayObject (``PyObject_HEAD; char *data; ...``).  Reading it directly costs
# about 0.2 us, against 1.4 us for ``arr.ctypes.data``, which matters for small
# models where a whole call takes a few microseconds.  The layout is checked
# once at import; any mismatch falls back to the public route.
_DATA_FIELD_OFFSET = object.__basicsize__
_read_address = ctypes.c_size_t.from_address


def _address_fast(arr: np.ndarray) -> int:
    return _read_address(id(arr) + _DATA_FIELD_OFFSET).value


def _address_public(arr: np.ndarray) -> int:
    return arr.ctypes.data


def _fast_route_agrees() -> bool:
    probes = (np.zeros(3, np.float32), np.zeros((4, 5), np.float64)[1:, 2:], np.empty(0, np.int64))
    try:
        return all(_address_fast(p) == p.ctypes.data for p in probes if p.size)
    except Exception:  # pragma: no cover - exotic interpreters
        return False


address = _address_fast if _fast_route_agrees() else _address_public
address.__doc__ = "Data address of an ndarray (the caller guarantees it is a real ndarray)."
