"""Handing arrays to kernels as raw addresses.

Numba wraps every ndarray argument in a fresh runtime MemInfo on each call,
which counts as a Numba runtime allocation.  gru_fast promises that a
steady-state call allocates nothing, so kernels take data addresses (plain
integers) and rebuild array views with :func:`array_at`, which owns no
memory.  The Python wrappers validate dtype, shape and C-contiguity before an
address is taken, and keep the arrays alive for the duration of the call.
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

__all__ = ["address", "array_at", "fused_multiply_add", "atomic_add", "atomic_load", "atomic_cas", "spin_pause",
           "yield_cpu", "int32_bits_as_float32"]


@intrinsic
def array_at(typingctx, addr, marker, shape):
    """``(int address, scalar marker, tuple of sizes) -> C-contiguous array of typeof(marker)`` over the
    memory at ``addr`` inside a kernel: a view that owns nothing, as ``numba.carray`` makes from a pointer,
    but built in the caller's own code.  ``numba.carray`` is a compiled function that returns a new array,
    which a kernel compiled without the runtime's reference counts (see gru_fast._jit.kernel) may not call."""
    if not isinstance(addr, types.Integer) or not isinstance(shape, types.BaseTuple) or not all(
            isinstance(size, types.Integer) for size in shape):
        return None
    array_type = types.Array(marker, len(shape), "C")

    def codegen(context, builder, signature, args):
        sizes = [context.cast(builder, value, size_type, types.intp)
                 for size_type, value in zip(shape, cgutils.unpack_tuple(builder, args[2], len(shape)))]
        itemsize = cgutils.intp_t(context.get_abi_sizeof(context.get_data_type(marker)))
        strides, stride = [], itemsize
        for size in reversed(sizes):
            strides.append(stride)
            stride = builder.mul(stride, size)
        view = make_array(array_type)(context, builder)
        populate_array(view, data=builder.inttoptr(args[0], context.get_data_type(marker).as_pointer()), shape=sizes,
                       strides=strides[::-1], itemsize=itemsize, meminfo=None)
        return view._getvalue()

    return array_type(addr, marker, shape), codegen


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


# ---------------------------------------------------------------------------
# atomics and bit casts for the kernels
# ---------------------------------------------------------------------------
# The cooperative kernels (see gru_fast.kernels) let two threads share the time
# steps of one sequence.  They coordinate through int64 counters in the
# workspace, read and written with these sequentially consistent atomics; a
# counter's release (fetch_add) orders the thread's earlier plain stores of
# hidden state before it, and the acquire load orders the partner's later
# plain loads after it.


def _int64_ptr(context, builder, addr):
    from llvmlite import ir

    return builder.inttoptr(addr, ir.IntType(64).as_pointer())


@intrinsic
def atomic_add(typingctx, addr, value):
    """``old = *addr; *addr += value`` atomically on an int64 at ``addr``; returns ``old``."""
    if not (isinstance(addr, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _int64_ptr(context, builder, args[0])
        val = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.atomic_rmw("add", ptr, val, "seq_cst")

    return types.int64(addr, value), codegen


@intrinsic
def atomic_load(typingctx, addr):
    """Acquire load of the int64 at ``addr``."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ptr = _int64_ptr(context, builder, args[0])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(addr), codegen


@intrinsic
def atomic_cas(typingctx, addr, expected, new):
    """Compare-and-swap on the int64 at ``addr``; True when ``*addr`` was ``expected`` and is now ``new``."""
    if not all(isinstance(a, types.Integer) for a in (addr, expected, new)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _int64_ptr(context, builder, args[0])
        cmp = context.cast(builder, args[1], signature.args[1], types.int64)
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        pair = builder.cmpxchg(ptr, cmp, val, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return types.boolean(addr, expected, new), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 ``pause`` hint inside a spin-wait (``llvm.x86.sse2.pause``; a no-op elsewhere)."""
    import platform

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            fnty = ir.FunctionType(ir.VoidType(), [])
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=fnty)
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def yield_cpu(typingctx):
    """``sched_yield()``: a waiting worker gives its core to the thread it waits for (an oversubscribed
    machine may have descheduled that thread, and spinning would only keep it off the core)."""

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = builder.module.globals.get("sched_yield") or ir.Function(builder.module, fnty, "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def int32_bits_as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (vectorises, unlike ``np.ldexp``)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def fused_multiply_add(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``), for floats of one type; vectorises to FMA instructions."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        ty = args[0].type
        name = f"llvm.fma.f{a.bitwidth}"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ty, [ty] * 3), name)
        return builder.call(fn, args)

    return a(a, b, c), codegen
