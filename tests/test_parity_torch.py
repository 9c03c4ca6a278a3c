"""Parity with PyTorch: gru_fast models converted from ``torch.nn.GRU`` reproduce the module's own output.

Authority for every test here: ``torch.nn.GRU`` itself (``run_torch`` in conftest), with variable lengths
expressed the PyTorch way, ``pack_padded_sequence(enforce_sorted=False)`` then
``pad_packed_sequence(total_length=T)``.  Models are built with ``converters.from_torch.convert``.
Tolerances: max abs error <= 1e-5 in float32, <= 1e-10 in float64 (module built with ``.double()``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_matches, convert_torch, run_torch, torch_gru


def _inputs(rng, module, *, batch, steps, unbatched, with_h0, with_lengths, dtype):
    """Random x (laid out as the module expects), h0 and lengths (1..T, PyTorch refuses 0)."""
    I, H = module.input_size, module.hidden_size
    LD = module.num_layers * (2 if module.bidirectional else 1)
    if unbatched:
        x = rng.standard_normal((steps, I))
        h0 = rng.standard_normal((LD, H)) if with_h0 else None
        lengths = int(rng.integers(1, steps + 1)) if with_lengths else None
    else:
        shape = (batch, steps, I) if module.batch_first else (steps, batch, I)
        x = rng.standard_normal(shape)
        h0 = rng.standard_normal((LD, batch, H)) if with_h0 else None
        lengths = rng.integers(1, steps + 1, size=batch) if with_lengths else None
    x = x.astype(dtype)
    h0 = None if h0 is None else h0.astype(dtype)
    return x, h0, lengths


def _check(module, x, h0, lengths, dtype, what):
    model = convert_torch(module)
    assert model.dtype == np.dtype(dtype)
    y, h_n = model(x, h0, lengths)
    y_ref, h_ref = run_torch(module, x, h0, lengths)
    assert y.dtype == np.dtype(dtype) and h_n.dtype == np.dtype(dtype)
    assert_matches(y, y_ref, authority="torch.nn.GRU", dtype=dtype, what=f"{what}: y")
    assert_matches(h_n, h_ref, authority="torch.nn.GRU", dtype=dtype, what=f"{what}: h_n")


# --------------------------------------------------------------------------------------------------
# property-based grid
# --------------------------------------------------------------------------------------------------

_size = st.one_of(st.just(1), st.integers(1, 9))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    unbatched=st.booleans(),
    with_h0=st.booleans(),
    with_lengths=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    input_size=_size,
    hidden_size=_size,
    batch=_size,
    steps=_size,
    seed=st.integers(0, 2**31 - 1),
)
def test_random_configurations_match_torch(num_layers, bidirectional, batch_first, bias, unbatched, with_h0,
                                           with_lengths, dtype, input_size, hidden_size, batch, steps, seed):
    """Authority: torch.nn.GRU (packed sequences for lengths).  Random layers (1-3), directions, layouts,
    unbatched input, h0, bias, lengths and sizes down to 1, in float32 and float64."""
    module = torch_gru(input_size, hidden_size, num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias, dtype=dtype, seed=seed % 10_000)
    rng = np.random.default_rng(seed)
    x, h0, lengths = _inputs(rng, module, batch=batch, steps=steps, unbatched=unbatched, with_h0=with_h0,
                             with_lengths=with_lengths, dtype=dtype)
    _check(module, x, h0, lengths, dtype, "hypothesis case")


# --------------------------------------------------------------------------------------------------
# explicit cases
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_stacked_layers_with_h0_and_lengths(num_layers, bidirectional, dtype, rng):
    """Authority: torch.nn.GRU with pack_padded_sequence(enforce_sorted=False) / pad_packed_sequence."""
    module = torch_gru(5, 6, num_layers, bidirectional=bidirectional, dtype=dtype, seed=num_layers)
    x, h0, _ = _inputs(rng, module, batch=4, steps=7, unbatched=False, with_h0=True, with_lengths=False,
                       dtype=dtype)
    lengths = np.array([7, 3, 1, 5])  # unsorted, with a full-length and a length-1 row
    _check(module, x, h0, lengths, dtype, "lengths")
    _check(module, x, h0, None, dtype, "no lengths")
    _check(module, x, None, None, dtype, "no h0")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_without_bias(bidirectional, dtype, rng):
    """Authority: torch.nn.GRU(bias=False)."""
    module = torch_gru(4, 5, 2, bidirectional=bidirectional, bias=False, dtype=dtype, seed=3)
    model = convert_torch(module)
    assert model.has_bias is False
    x, h0, lengths = _inputs(rng, module, batch=3, steps=6, unbatched=False, with_h0=True, with_lengths=True,
                             dtype=dtype)
    _check(module, x, h0, lengths, dtype, "bias=False")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_batch_first(bidirectional, dtype, rng):
    """Authority: torch.nn.GRU(batch_first=True): x and y are (B, T, .), h0/h_n stay (L*D, B, H)."""
    module = torch_gru(3, 4, 2, bidirectional=bidirectional, batch_first=True, dtype=dtype, seed=4)
    model = convert_torch(module)
    assert model.batch_first is True
    x, h0, lengths = _inputs(rng, module, batch=5, steps=6, unbatched=False, with_h0=True, with_lengths=True,
                             dtype=dtype)
    assert x.shape == (5, 6, 3)
    y, _ = model(x, h0)
    assert y.shape == (5, 6, (2 if bidirectional else 1) * 4)
    _check(module, x, h0, None, dtype, "batch_first")
    _check(module, x, h0, lengths, dtype, "batch_first with lengths")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_unbatched_input(bidirectional, batch_first, dtype, rng):
    """Authority: torch.nn.GRU on an unbatched (T, I) input (batch_first does not apply to it);
    h0/h_n are (L*D, H) and y is (T, D*H)."""
    module = torch_gru(3, 5, 2, bidirectional=bidirectional, batch_first=batch_first, dtype=dtype, seed=5)
    x, h0, _ = _inputs(rng, module, batch=1, steps=6, unbatched=True, with_h0=True, with_lengths=False,
                       dtype=dtype)
    model = convert_torch(module)
    y, h_n = model(x, h0)
    D = 2 if bidirectional else 1
    assert y.shape == (6, D * 5) and h_n.shape == (2 * D, 5)
    _check(module, x, h0, None, dtype, "unbatched")
    _check(module, x, None, None, dtype, "unbatched, no h0")
    _check(module, x, h0, 4, dtype, "unbatched, scalar length")
    _check(module, x, h0, np.array([2]), dtype, "unbatched, length of shape (1,)")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_all_sizes_one(bidirectional, dtype, rng):
    """Authority: torch.nn.GRU with I = H = B = T = 1."""
    for num_layers in (1, 3):
        module = torch_gru(1, 1, num_layers, bidirectional=bidirectional, dtype=dtype, seed=6)
        x, h0, lengths = _inputs(rng, module, batch=1, steps=1, unbatched=False, with_h0=True,
                                 with_lengths=True, dtype=dtype)
        _check(module, x, h0, lengths, dtype, f"sizes 1, {num_layers} layers")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch", [4, 8, 16])
def test_large_enough_for_the_parallel_kernels(batch, bidirectional, dtype, rng):
    """Authority: torch.nn.GRU.  H=64, T=20, two layers, B = 4 / 8 / 16: sizes at which the engine shares
    a call between threads, by hidden units (few rows, one direction) or by rows and directions, with
    four-row products and their left-over rows (tests/test_kernel_modes.py pins which mode runs)."""
    module = torch_gru(16, 64, 2, bidirectional=bidirectional, dtype=dtype, seed=7, bias_scale=0.5)
    x, h0, _ = _inputs(rng, module, batch=batch, steps=20, unbatched=False, with_h0=True, with_lengths=False,
                       dtype=dtype)
    lengths = np.array([20, 1, 7, 20, 13, 2, 19, 9, 20, 3, 11, 5, 16, 20, 8, 1])[:batch]
    _check(module, x, h0, None, dtype, "large")
    _check(module, x, h0, lengths, dtype, "large with lengths")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_long_sequence(dtype, rng):
    """Authority: torch.nn.GRU over T=300 steps (errors must not accumulate beyond tolerance)."""
    module = torch_gru(4, 16, 1, dtype=dtype, seed=8)
    x, h0, lengths = _inputs(rng, module, batch=3, steps=300, unbatched=False, with_h0=True, with_lengths=True,
                             dtype=dtype)
    _check(module, x, h0, lengths, dtype, "T=300")


def test_gru_cell_matches_torch(rng):
    """Authority: torch.nn.GRUCell, stepped by hand over a sequence, equals the converted model run over
    the whole sequence (the converter maps a cell to a one-layer forward GRU)."""
    import torch

    torch.manual_seed(9)
    cell = torch.nn.GRUCell(3, 5).eval()
    model = convert_torch(cell)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    h0 = rng.standard_normal((2, 5)).astype(np.float32)
    h = torch.from_numpy(h0)
    ys = []
    with torch.no_grad():
        for t in range(6):
            h = cell(torch.from_numpy(x[t]), h)
            ys.append(h.numpy())
    y, h_n = model(x, h0[None])
    assert_matches(y, np.stack(ys), authority="torch.nn.GRUCell", dtype=np.float32, what="y")
    assert_matches(h_n[0], ys[-1], authority="torch.nn.GRUCell", dtype=np.float32, what="h_n")


def test_float32_model_casts_float64_input(rng):
    """Authority: torch.nn.GRU in float32 on the input rounded to float32: x of another float dtype is
    cast to model.dtype, and outputs come back in model.dtype."""
    module = torch_gru(3, 4, 1, dtype=np.float32, seed=10)
    model = convert_torch(module)
    x64 = rng.standard_normal((5, 2, 3))
    y, h_n = model(x64)
    assert y.dtype == np.float32 and h_n.dtype == np.float32
    y_ref, h_ref = run_torch(module, x64.astype(np.float32))
    assert_matches(y, y_ref, authority="torch.nn.GRU", dtype=np.float32, what="y")
    assert_matches(h_n, h_ref, authority="torch.nn.GRU", dtype=np.float32, what="h_n")
