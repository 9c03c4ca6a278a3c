"""The float32 gate cell with sigmoid and tanh, written in LLVM IR 16 lanes at a time.

Numba's loop over a unit tile's 16 lanes (gru_fast.kernels, the cell) vectorises, but LLVM gives it
256-bit vectors on this project's Xeons (it prefers them there), and the cell's three activations are
about 35 vector operations each: at B=4 H=256 the cell took about a quarter of a step.  These kernels do
the same operations, in the same order and with the same constants as :mod:`gru_fast._math` (fused
multiply-adds exactly where it has them), on ``<16 x float>`` vectors: one 512-bit register per unit tile, so
their results equal the Numba cell's bit for bit (tests/test_cell.py) and the activations keep the
errors tests/test_math.py measures.

Each kernel runs over ``n`` unit tiles; rows of gates are in the engine layout (gru_fast._layout: per
unit tile 48 values, z | r | n of 16 units), rows of states and biases 16 values per tile:

* :func:`cell_whole` (linear_before_reset=1): ``h' = (1 - z) n + z h`` with
  ``z = sigmoid(x_z + hr_z)``, ``r = sigmoid(x_r + hr_r)``, ``n = tanh(x_n + r (hr_n + b_hn))``;
* :func:`cell_reset` (linear_before_reset=0, before the n product): z into hr's z tile, ``r h`` into rh;
* :func:`cell_update` (after it, hr's n tile holding ``(r h) R_n^T``): ``n = tanh(x_n + hr_n)``, h'.

``clip`` > 0 clamps every pre-activation to [-clip, clip] (ONNX's clip; a NaN passes).  Arguments are
int64 addresses, the tile count and the float32 clip.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import _math as m
from ._tiles import GROUP, TILE, _splat

__all__ = ["cell_whole", "cell_reset", "cell_update"]

_F32 = ir.FloatType()
_V = ir.VectorType(_F32, TILE)
_I32V = ir.VectorType(ir.IntType(32), TILE)
_I64 = ir.IntType(64)


class _Vec:
    """The vector operations of the cell on one IR builder."""

    def __init__(self, builder):
        self.b = builder
        module = builder.module

        def declare(name, operands=1):
            return module.globals.get(name) or ir.Function(module, ir.FunctionType(_V, [_V] * operands), name)

        self._floor, self._fabs = declare("llvm.floor.v16f32"), declare("llvm.fabs.v16f32")
        self._fma = declare("llvm.fma.v16f32", 3)

    @staticmethod
    def const(value):
        return ir.Constant(_V, [float(np.float32(value))] * TILE)

    def add(self, a, b):
        return self.b.fadd(a, b)

    def sub(self, a, b):
        return self.b.fsub(a, b)

    def mul(self, a, b):
        return self.b.fmul(a, b)

    def fma(self, a, b, c):
        """``a * b + c`` rounded once."""
        return self.b.call(self._fma, [a, b, c])

    def div(self, a, b):
        return self.b.fdiv(a, b)

    def above(self, a, b, then):
        """``then if a > b else a`` lane by lane (a NaN compares false and stays)."""
        return self.b.select(self.b.fcmp_ordered(">", a, b), then, a)

    def below(self, a, b, then):
        """``then if a < b else a``."""
        return self.b.select(self.b.fcmp_ordered("<", a, b), then, a)

    def exp(self, x):
        """:func:`gru_fast._math._exp_f32`."""
        x = self.above(x, self.const(m._EXP_HI), self.const(m._EXP_HI))
        x = self.below(x, self.const(m._EXP_LO), self.const(m._EXP_LO))
        fx = self.b.call(self._floor, [self.fma(x, self.const(m._LOG2E), self.const(m._HALF))])
        r = self.fma(fx, self.const(-m._LN2_HI), x)
        r = self.fma(fx, self.const(-m._LN2_LO), r)
        z = self.mul(r, r)
        p = self.const(m._P0)
        for c in (m._P1, m._P2, m._P3, m._P4, m._P5):
            p = self.fma(p, r, self.const(c))
        p = self.add(self.fma(p, z, r), self.const(m._ONE))
        fx = self.b.select(self.b.fcmp_ordered("==", fx, fx), fx, self.const(m._ZERO))
        biased = self.b.add(self.b.fptosi(fx, _I32V), ir.Constant(_I32V, [126] * TILE))
        scale = self.b.bitcast(self.b.shl(biased, ir.Constant(_I32V, [23] * TILE)), _V)  # 2**(fx - 1)
        return self.mul(self.mul(p, scale), self.const(m._TWO))

    def sigmoid(self, x):
        """:func:`gru_fast._math.sigmoid`: 1 / (1 + exp(-x))."""
        one = self.const(m._ONE)
        return self.div(one, self.add(one, self.exp(self.b.fneg(x))))

    def tanh(self, x):
        """:func:`gru_fast._math._tanh_f32`."""
        a = self.b.call(self._fabs, [x])
        z = self.mul(x, x)
        small = self.const(m._T0)
        for c in (m._T1, m._T2, m._T3, m._T4):
            small = self.fma(small, z, self.const(c))
        small = self.fma(self.mul(small, z), x, x)
        e = self.exp(self.mul(self.const(m._TWO), a))
        large = self.sub(self.const(m._ONE), self.div(self.const(m._TWO), self.add(e, self.const(m._ONE))))
        large = self.b.select(self.b.fcmp_ordered("<", x, self.const(m._ZERO)), self.b.fneg(large), large)
        return self.b.select(self.b.fcmp_ordered("<", a, self.const(m._TANH_SMALL)), small, large)

    def blend(self, z, n, h):
        """(1 - z) n + z h."""
        return self.add(self.mul(self.sub(self.const(m._ONE), z), n), self.mul(z, h))


def _make(part):
    """The kernel of ``part``: "whole", "reset" or "update" (see the module docstring)."""
    names = {"whole": ("x", "hr", "b_hn", "h_prev", "h_new"), "reset": ("x", "hr", "h_prev", "rh"),
             "update": ("x", "hr", "h_prev", "h_new")}[part]

    def typer(args):
        if len(args) != len(names) + 2 or args[-1] != types.float32:
            return None
        if not all(isinstance(a, types.Integer) for a in args[:-1]):
            return None
        return types.none(*args), codegen

    def codegen(context, builder, signature, llargs):
        v = _Vec(builder)
        ptr = dict(zip(names, (builder.inttoptr(a, _F32.as_pointer()) for a in llargs[: len(names)])))
        n_tiles, clip = llargs[len(names)], llargs[len(names) + 1]
        # clip <= 0: no clamp, as comparisons with +inf (a NaN clip clamps nothing either)
        on = builder.fcmp_ordered(">", clip, ir.Constant(_F32, 0.0))
        bound = builder.select(on, clip, ir.Constant(_F32, float("inf")))
        hi = _splat(builder, bound, _V)
        lo = builder.fneg(hi)

        def clipped(x):
            return v.below(v.above(x, hi, hi), lo, lo)

        def at(name, offset):
            return builder.bitcast(builder.gep(ptr[name], [offset]), _V.as_pointer())

        before = builder.block
        head = builder.append_basic_block(f"cell_{part}.tile")
        body = builder.append_basic_block(f"cell_{part}.body")
        after = builder.append_basic_block(f"cell_{part}.done")
        builder.branch(head)
        builder.position_at_end(head)
        u = builder.phi(_I64)
        u.add_incoming(ir.Constant(_I64, 0), before)
        builder.cbranch(builder.icmp_signed("<", u, n_tiles), body, after)

        builder.position_at_end(body)
        gates = builder.mul(u, ir.Constant(_I64, GROUP * TILE))
        units = builder.mul(u, ir.Constant(_I64, TILE))
        z_at, r_at, n_at = (builder.add(gates, ir.Constant(_I64, g * TILE)) for g in range(GROUP))

        def load(name, offset):
            return builder.load(at(name, offset), align=4)

        def store(value, name, offset):
            builder.store(value, at(name, offset), align=4)

        h = load("h_prev", units)
        if part == "update":
            n = v.tanh(clipped(v.add(load("x", n_at), load("hr", n_at))))
            store(v.blend(load("hr", z_at), n, h), "h_new", units)
        else:
            z = v.sigmoid(clipped(v.add(load("x", z_at), load("hr", z_at))))
            r = v.sigmoid(clipped(v.add(load("x", r_at), load("hr", r_at))))
            if part == "reset":
                store(z, "hr", z_at)
                store(v.mul(r, h), "rh", units)
            else:
                pre = v.add(load("x", n_at), v.mul(r, v.add(load("hr", n_at), load("b_hn", units))))
                store(v.blend(z, v.tanh(clipped(pre)), h), "h_new", units)
        u.add_incoming(builder.add(u, ir.Constant(_I64, 1)), body)
        builder.branch(head)

        builder.position_at_end(after)
        return context.get_dummy_value()

    # Numba's intrinsics take fixed parameters (see gru_fast._tiles)
    params = ", ".join(names + ("n", "clip"))
    namespace = {"typer": typer}
    exec(f"def cell_{part}(typingctx, {params}):\n    return typer(({params},))\n", namespace)
    return intrinsic(namespace[f"cell_{part}"])


cell_whole, cell_reset, cell_update = _make("whole"), _make("reset"), _make("update")
