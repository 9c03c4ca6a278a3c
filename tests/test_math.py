"""The float32 sigmoid and tanh of gru_fast._math against float64 libm (numpy's exp and tanh), directly.

The parity tests pin them inside whole models; this pins the functions themselves: within 1.5e-7
absolute in float32 (the outputs lie in (-1, 1); measured 8.9e-8 and 7.0e-8) and 1e-15 in float64,
over [-30, 30] and far out, exact limits at +-inf, NaN propagated.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from gru_fast._math import sigmoid, tanh


@njit(cache=False)
def _evaluate(x, out_sigmoid, out_tanh):
    for i in range(x.size):
        out_sigmoid[i] = sigmoid(x[i])
        out_tanh[i] = tanh(x[i])


def _run(x):
    s, t = np.empty_like(x), np.empty_like(x)
    _evaluate(x, s, t)
    return s, t


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_tanh_match_float64_libm(dtype):
    x = np.concatenate([np.linspace(-30, 30, 200_001), [0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 100.0, -100.0,
                                                       1e4, -1e4]]).astype(dtype)
    s, t = _run(x)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(1e4) is inf in the reference: 1 / inf = 0, as wanted
        reference = 1.0 / (1.0 + np.exp(-x64))
    bound = 1.5e-7 if dtype == np.float32 else 1e-15
    assert np.max(np.abs(s - reference)) <= bound
    assert np.max(np.abs(t - np.tanh(x64))) <= bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_limits_and_nan(dtype):
    s, t = _run(np.array([np.inf, -np.inf, np.nan], dtype))
    assert s[0] == 1 and s[1] == 0 and np.isnan(s[2])
    assert t[0] == 1 and t[1] == -1 and np.isnan(t[2])
