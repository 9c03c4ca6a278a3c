"""Element-wise math of the kernels: activations that vectorise.

Without Intel's SVML (pip's llvmlite has none), ``np.exp`` and ``np.tanh``
inside a Numba loop become one scalar libm call per element: about 20 cycles
each, which at B=64, H=256 costs more than the recurrent matrix product.  For
float32 this module evaluates them with branch-free polynomials that LLVM
vectorises (in 256-bit vectors on this project's Xeons, which LLVM prefers
there; the float32 cell, :mod:`gru_fast._cell`, does the same operations on
16-lane vectors):

* ``exp``: Cody-Waite range reduction ``x = n ln2 + r`` and the degree-6
  minimax polynomial of Cephes' ``expf`` (S. L. Moshier, *Methods and Programs
  for Mathematical Functions*, 1989), scaled by ``2**n`` built from its bits;
  within 2 ulp of the correctly rounded result on [-86.6, 88.7];
* both polynomials and the reduction in fused multiply-adds (one rounding each;
  the float32 cell took 32 ns a unit tile with them, 60 ns with a multiply
  and an add);
* ``sigmoid(x) = 1 / (1 + exp(-x))``;
* ``tanh``: Cephes' ``tanhf`` (odd polynomial below |x| = 0.625,
  ``1 - 2 / (exp(2|x|) + 1)`` above), within 2 ulp.

NaN propagates (every clamp is written so that a NaN compares false and passes
through), and the infinities land where PyTorch puts them: sigmoid(+inf) = 1,
sigmoid(-inf) = 0 (here 1e-38), tanh(+-inf) = +-1.  float64 keeps libm's
``np.exp`` / ``np.tanh``: float64 parity is held to 1e-10, and float64 is not
the fast path.

Loops run over whole 1-D views from index 0: Numba must allow a negative
index in ``range(lo, hi)`` and the wrap-around select it adds stops LLVM from
vectorising, so callers pass ``v[lo:hi]``.

The parity tests against PyTorch and ONNX Runtime (tests/test_parity_*.py)
pin these functions: with them a float32 model stays within 1e-5 of
``torch.nn.GRU``; ``tests/test_math.py`` measures them against float64 libm
directly.

:func:`activation` is one of the ONNX RNN activations (codes from
:mod:`gru_fast.activations`) of one value, :func:`clipped` ONNX's clip.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from ._config import JIT
from ._jit import kernel
from ._memory import fused_multiply_add as fma, int32_bits_as_float32

__all__ = ["exp", "sigmoid", "tanh", "like", "activate", "clip_range"]

# activation codes (the table lives in gru_fast.activations)
SIGMOID, TANH, RELU, HARD_SIGMOID, LEAKY_RELU, THRESHOLDED_RELU = 0, 1, 2, 3, 4, 5
SCALED_TANH, AFFINE, ELU, SOFTSIGN, SOFTPLUS = 6, 7, 8, 9, 10

# Cephes expf constants
# Clamped to [-86.6, 88.7]: 2**n is built as 2**(n-1) * 2 so that n = 128 (x up to ln(FLT_MAX)) does not
# overflow the exponent field, and n stays >= -125 so 2**(n-1) is a normal number.
_EXP_HI = np.float32(88.72283935546875)
_EXP_LO = np.float32(-86.6)
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
# Cephes tanhf: odd polynomial on |x| < 0.625
_T0 = np.float32(-5.70498872745e-3)
_T1 = np.float32(2.06390887954e-2)
_T2 = np.float32(-5.37397155531e-2)
_T3 = np.float32(1.33314422036e-1)
_T4 = np.float32(-3.33332819422e-1)
_TANH_SMALL = np.float32(0.625)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)


def _exp_f32(x):
    # Clamps written "bound if x beyond bound else x": a NaN fails both tests and passes through.
    x = _EXP_HI if x > _EXP_HI else x
    x = _EXP_LO if x < _EXP_LO else x
    fx = np.floor(fma(x, _LOG2E, _HALF))
    r = fma(fx, -_LN2_HI, x)
    r = fma(fx, -_LN2_LO, r)
    z = r * r
    p = fma(fma(fma(fma(fma(_P0, r, _P1), r, _P2), r, _P3), r, _P4), r, _P5)
    p = fma(p, z, r) + _ONE
    fx = fx if fx == fx else _ZERO  # a NaN's exponent must not reach the integer conversion
    return p * int32_bits_as_float32((np.int64(fx) + 126) << 23) * _TWO


def _tanh_f32(x):
    a = abs(x)
    z = x * x
    small = fma(fma(fma(fma(fma(_T0, z, _T1), z, _T2), z, _T3), z, _T4) * z, x, x)
    e = exp(_TWO * a)
    large = _ONE - _TWO / (e + _ONE)
    large = -large if x < _ZERO else large
    return small if a < _TANH_SMALL else large


def exp(x):
    """exp(x): the vectorising polynomial for float32, libm for float64."""
    raise NotImplementedError("call from a Numba kernel")


def tanh(x):
    """tanh(x): the vectorising polynomial for float32, libm for float64."""
    raise NotImplementedError("call from a Numba kernel")


@overload(exp, jit_options=dict(JIT, inline="always"))
def _exp_overload(x):
    if x == types.float32:
        return _exp_f32
    if isinstance(x, types.Float):
        return lambda x: np.exp(x)
    return None


@overload(tanh, jit_options=dict(JIT, inline="always"))
def _tanh_overload(x):
    if x == types.float32:
        return _tanh_f32
    if isinstance(x, types.Float):
        return lambda x: np.tanh(x)
    return None


def like(x, value):
    """``value`` as a scalar of ``x``'s float type (a bare ``1.0`` is float64 and would widen float32 math)."""
    raise NotImplementedError("call from a Numba kernel")


@overload(like, jit_options=dict(JIT, inline="always"))
def _like_overload(x, value):
    if isinstance(x, types.Float):
        cast = np.float32 if x == types.float32 else np.float64
        return lambda x, value: cast(value)
    return None


@njit(**JIT, inline="always")
def sigmoid(x):
    one = like(x, 1.0)
    return one / (one + exp(-x))


@njit(**JIT, inline="always")
def clipped(x, clip):
    """x clamped to [-clip, clip] (ONNX ``clip``; 0 means none).  NaN passes through."""
    if clip > 0:
        x = clip if x > clip else x
        x = -clip if x < -clip else x
    return x


@kernel
def clip_range(v, clip):
    """Clamp v in place to [-clip, clip] (:func:`clipped` of each value).  The kernels clip value by value;
    this array form is the smallest gru_fast kernel a Python caller can run, which the cache tests use."""
    for i in range(v.size):
        v[i] = clipped(v[i], clip)


@njit(**JIT, inline="always")
def activation(x, code, alpha, beta):
    """ONNX RNN activation ``code`` of one value (see the module docstring).

    ``alpha`` and ``beta`` have the dtype of ``x``, so every constant below is typed from them.  In a loop
    over lanes the branch on ``code`` is taken per value: the kernels use it for activations other than
    sigmoid and tanh, which they call directly (see gru_fast.kernels, the cell).
    """
    zero = like(alpha, 0.0)
    one = like(alpha, 1.0)
    if code == SIGMOID:
        return sigmoid(x)
    if code == TANH:
        return tanh(x)
    if code == RELU:
        return zero if x < zero else x
    if code == HARD_SIGMOID:
        y = alpha * x + beta
        y = zero if y < zero else y
        return one if y > one else y
    if code == LEAKY_RELU:
        return alpha * x if x < zero else x
    if code == THRESHOLDED_RELU:
        return zero if x < alpha else x
    if code == SCALED_TANH:
        return alpha * tanh(beta * x)
    if code == AFFINE:
        return alpha * x + beta
    if code == ELU:
        return alpha * (exp(x) - one) if x < zero else x
    if code == SOFTSIGN:
        return x / (one + abs(x))
    # SOFTPLUS: log(1 + e^x) without overflow for large x; libm (a rare activation, not the fast path)
    return x + np.log1p(np.exp(-x)) if x > zero else np.log1p(np.exp(x))
