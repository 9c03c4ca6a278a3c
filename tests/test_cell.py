"""gru_fast._cell, the float32 sigmoid/tanh cell in LLVM IR, 16 lanes at a time.

Authorities: the GRU equations (gru_fast.kernels' module docstring, ONNX's GRU operator) evaluated in
float64 with NumPy's exp and tanh, within a few float32 ulps; and, bit for bit, the Numba cell made for
sigmoid and tanh (gru_fast.kernels._make_cell), whose activations tests/test_math.py holds against libm and
which float64 models run.  Inputs include NaN, the infinities, signed zeros and a clip.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from gru_fast import _cell, kernels

WHOLE, RESET, UPDATE = 0, 1, 2
SIG, TANH = (np.int64(0), np.float32(0), np.float32(0)), (np.int64(1), np.float32(0), np.float32(0))


@njit(cache=False)
def _run_ir(part, x, hr, b_hn, h_prev, out, n, clip):
    if part == WHOLE:
        _cell.cell_whole(x.ctypes.data, hr.ctypes.data, b_hn.ctypes.data, h_prev.ctypes.data, out.ctypes.data, n,
                         clip)
    elif part == RESET:
        _cell.cell_reset(x.ctypes.data, hr.ctypes.data, h_prev.ctypes.data, out.ctypes.data, n, clip)
    else:
        _cell.cell_update(x.ctypes.data, hr.ctypes.data, h_prev.ctypes.data, out.ctypes.data, n, clip)


@njit(cache=False)
def _run_numba(part, x, hr, b_hn, h_prev, out, n, clip):
    x3, hr3 = x.reshape((n, 3, 16)), hr.reshape((n, 3, 16))
    b_hn3, h_prev3, out3 = b_hn.reshape((n, 1, 16)), h_prev.reshape((n, 1, 16)), out.reshape((n, 1, 16))
    for u in range(n):
        if part == WHOLE:
            kernels._whole_fast(x3, hr3, b_hn3, h_prev3, out3, u, SIG, TANH, clip)
        elif part == RESET:
            kernels._reset_fast(x3, hr3, h_prev3, out3, u, SIG, clip)
        else:
            kernels._update_fast(x3, hr3, h_prev3, out3, u, TANH, clip)


def _inputs(rng, tiles, scale):
    x = (rng.standard_normal(48 * tiles) * scale).astype(np.float32)
    hr = (rng.standard_normal(48 * tiles) * scale).astype(np.float32)
    x[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40]  # z lanes of tile 0
    hr[16:19] = [np.nan, np.inf, -np.inf]  # r lanes
    x[32:35] = [np.inf, -np.inf, np.nan]  # n lanes
    b_hn = rng.standard_normal(16 * tiles).astype(np.float32)
    h_prev = rng.uniform(-1, 1, 16 * tiles).astype(np.float32)
    return x, hr, b_hn, h_prev


def _equations(part, x, hr, b_hn, h_prev, clip):
    """The cell in float64: (hr after the call, the output row)."""
    c = np.clip if clip > 0 else (lambda v, lo, hi: v)
    x, hr, b_hn, h = (a.astype(np.float64) for a in (x, hr, b_hn, h_prev))
    tiles = h.size // 16
    x3, hr3 = x.reshape(tiles, 3, 16), hr.reshape(tiles, 3, 16).copy()
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    with np.errstate(over="ignore", invalid="ignore"):
        if part == UPDATE:
            n = np.tanh(c(x3[:, 2] + hr3[:, 2], -clip, clip))
            z = hr3[:, 0]
            return hr3.ravel(), ((1 - z) * n + z * h.reshape(tiles, 16)).ravel()
        z = sig(c(x3[:, 0] + hr3[:, 0], -clip, clip))
        r = sig(c(x3[:, 1] + hr3[:, 1], -clip, clip))
        if part == RESET:
            hr3[:, 0] = z
            return hr3.ravel(), (r * h.reshape(tiles, 16)).ravel()
        n = np.tanh(c(x3[:, 2] + r * (hr3[:, 2] + b_hn.reshape(tiles, 16)), -clip, clip))
        return hr3.ravel(), ((1 - z) * n + z * h.reshape(tiles, 16)).ravel()


@pytest.mark.parametrize("part", [WHOLE, RESET, UPDATE], ids=["whole", "reset", "update"])
@pytest.mark.parametrize("clip", [0.0, 3.0])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_vector_cell_matches_the_equations_and_the_numba_cell(part, clip, scale):
    rng = np.random.default_rng(int(scale * 100) + 7 * part + int(clip))
    tiles = 5
    x, hr, b_hn, h_prev = _inputs(rng, tiles, scale)
    if part == UPDATE:  # hr's z tile holds z, a sigmoid's value, after the reset part
        hr.reshape(tiles, 3, 16)[:, 0] = rng.uniform(0, 1, (tiles, 16))
    results = []
    for run in (_run_ir, _run_numba):
        hr_run, out = hr.copy(), np.full(16 * tiles, -7.0, np.float32)
        run(part, x, hr_run, b_hn, h_prev, out, tiles, np.float32(clip))
        results.append((hr_run, out))
    (hr_ir, out_ir), (hr_nb, out_nb) = results
    np.testing.assert_array_equal(hr_ir.view(np.uint32), hr_nb.view(np.uint32))
    np.testing.assert_array_equal(out_ir.view(np.uint32), out_nb.view(np.uint32))

    hr_eq, out_eq = _equations(part, x, hr, b_hn, h_prev, clip)
    for got, want in ((hr_ir, hr_eq), (out_ir, out_eq)):
        assert np.array_equal(np.isnan(got), np.isnan(want))
        finite = ~np.isnan(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=4e-7, atol=4e-7)


def test_vector_cell_leaves_other_tiles_alone():
    """n tiles are written and nothing past them (the next tile of every row keeps its values)."""
    rng = np.random.default_rng(3)
    x, hr, b_hn, h_prev = _inputs(rng, 3, 1.0)
    out = np.full(48, -7.0, np.float32)
    hr_run = hr.copy()
    _run_ir(RESET, x, hr_run, b_hn, h_prev, out, 2, np.float32(0.0))
    assert np.all(out[32:] == -7.0) and np.array_equal(hr_run[96:], hr[96:])
    _run_ir(WHOLE, x, hr, b_hn, h_prev, out, 1, np.float32(0.0))
    assert np.all(out[32:] == -7.0)
