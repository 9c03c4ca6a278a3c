"""The decorator every gru_fast kernel function is compiled with.

Numba compiles a jitted function once per signature of argument *types*, and an argument that is a
constant at its call site is typed by its value: ``_gemm(PROJECT, ..., 1, marker)`` and ``_gemm(kind,
..., rows, marker)`` are two signatures (``Literal[int](0)`` and ``int64``), each compiled from scratch.
Across the call tree that doubled the work of a first call (on an empty kernel cache, 34 s -> 18 s of
CPU for the first float32 call when measured here).  A :func:`kernel` types every argument by its class
(``int64``, never ``Literal[int](4)``), so each function is compiled once per dtype.  Kernels still
branch on such values at run time; the fast paths are chosen by those branches, not by copies.
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
    dispatcher = njit(**JIT, inline="always" if inline else "never")(func)
    if type(dispatcher) is CPUDispatcher:  # another Numba's dispatcher: plain njit, only slower to compile
        dispatcher.__class__ = _ValueTypedDispatcher
    return dispatcher
