"""The decorator every gru_fast kernel function is compiled with.

Numba compiles a jitted function once per signature of argument *types*, and an argument that is a
constant at its call site is typed by its value: ``_gemm(PROJECT, ..., 1, marker)`` and ``_gemm(kind,
..., rows, marker)`` are two signatures (``Literal[int](0)`` and ``int64``), each compiled from scratch.
Across the call tree that doubled the work of a first call (on an empty kernel cache, 34 s -> 18 s of
CPU for the first float32 call when measured here).  A :func:`kernel` types every argument by its class
(``int64``, never ``Literal[int](4)``), so each function is compiled once per dtype.  Kernels still
branch on such values at run time; the fast paths are chosen by those branches, not by copies.

A kernel compiled on its own is compiled without the Numba runtime (``_nrt=False``).  With it, every
function increments, and on return decrements, the reference count of each array in its arguments --
gru_fast's records hold about twenty views -- through a call per array even for a view that owns nothing
(a null count).  Measured here, those calls were 14 % of a small model's call (B=1 T=3 H=10
bidirectional); without them, calls ran (interleaved with the previous version, medians) 39 % faster for
that model, 13 % for B=1 T=1000 H=128, 7 % for B=1 T=100 H=256, 4 % for B=8.  A kernel allocates
nothing (its arrays are views of the caller's memory, :func:`gru_fast._memory.array_at`), and one that
tried to would fail to compile.  The flag is set on every such kernel: Numba lets a callee without it
inherit its caller's.
"""

from __future__ import annotations

from numba import njit, types
from numba.core.registry import CPUDispatcher

from ._config import JIT

__all__ = ["kernel"]


class _ValueTypedDispatcher(CPUDispatcher):
    """A CPU dispatcher that compiles calls from other jitted code with literal types widened."""

    def get_call_template(self, args, kws):
        return super().get_call_template(tuple(types.unliteral(a) for a in args),
                                          {name: types.unliteral(a) for name, a in kws.items()})


def kernel(func=None, *, inline=False):
    """``njit`` with gru_fast's flags (:data:`gru_fast._config.JIT`), typing arguments by class only.

    ``@kernel(inline=True)``: Numba inlines the function's IR into each caller instead of compiling it
    on its own (for small helpers; see gru_fast.kernels on what a separately compiled function costs)."""
    if func is None:
        return lambda f: kernel(f, inline=inline)
    dispatcher = njit(**JIT, inline="always" if inline else "never", **({} if inline else {"_nrt": False}))(func)
    if type(dispatcher) is CPUDispatcher:  # another Numba's dispatcher: plain njit, only slower to compile
        dispatcher.__class__ = _ValueTypedDispatcher
    return dispatcher
