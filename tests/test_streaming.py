"""Streaming: ``model.stream(batch_size, h0)`` advances every layer one time step per ``step``.

Authorities: the documented equivalence (API contract) — T calls of ``step`` equal one ``model(x, h0)``
call over T steps (y_t == y[t], final state == h_n) — and PyTorch itself (``nn.GRU`` over the whole
sequence, ``nn.GRUCell`` step by step).  Tolerances are the parity ones (1e-5 float32, 1e-10 float64),
though the engine computes each element by the same operations in a step and in a whole call.
"""

from __future__ import annotations

import numpy as np
import pytest

import gru_fast
from conftest import assert_matches, convert_torch, random_onnx_weights, run_torch, torch_gru

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])


def _onnx_model(rng, num_layers, *, lbr=True, dtype=np.float32, I=4, H=5, **attrs):
    layers = [random_onnx_weights(rng, 1, I if l == 0 else H, H, dtype=dtype) for l in range(num_layers)]
    return gru_fast.GRU(layers, linear_before_reset=lbr, **attrs)


def _close(got, want, dtype, what):
    assert_matches(got, want, authority="model(x, h0) (documented equivalence)", dtype=dtype, what=what)


@DTYPES
@pytest.mark.parametrize("lbr", [True, False], ids=["lbr1", "lbr0"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_steps_equal_one_whole_sequence_call(num_layers, lbr, dtype, rng):
    """Documented equivalence: stream(batch_size=B, h0) stepped T times gives y_t == y[t] of
    model(x, h0) and a final state == h_n; both candidate variants, 1-3 layers."""
    attrs = {} if lbr else dict(activations=["HardSigmoid", "Softsign"], activation_alpha=[0.25],
                                activation_beta=[0.5], clip=3.0)
    model = _onnx_model(rng, num_layers, lbr=lbr, dtype=dtype, **attrs)
    T, B = 9, 3
    x = rng.standard_normal((T, B, 4)).astype(dtype)
    h0 = rng.standard_normal((num_layers, B, 5)).astype(dtype)
    y, h_n = model(x, h0)
    s = model.stream(batch_size=B, h0=h0)
    assert np.array_equal(s.state, h0)
    for t in range(T):
        y_t = s.step(x[t])
        assert y_t.shape == (B, 5) and y_t.dtype == np.dtype(dtype)
        _close(y_t, y[t], dtype, f"y_{t}")
    assert s.state.shape == (num_layers, B, 5)
    _close(s.state, h_n, dtype, "final state")


@DTYPES
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_stream_matches_torch(num_layers, dtype, rng):
    """Authority: torch.nn.GRU over the whole sequence: each step's output equals torch's y[t] and the
    final state equals torch's h_n."""
    module = torch_gru(3, 6, num_layers, dtype=dtype, seed=num_layers)
    model = convert_torch(module)
    T, B = 8, 2
    x = rng.standard_normal((T, B, 3)).astype(dtype)
    h0 = rng.standard_normal((num_layers, B, 6)).astype(dtype)
    y_ref, h_ref = run_torch(module, x, h0)
    s = model.stream(batch_size=B, h0=h0)
    for t in range(T):
        assert_matches(s.step(x[t]), y_ref[t], authority="torch.nn.GRU", dtype=dtype, what=f"y_{t}")
    assert_matches(s.state, h_ref, authority="torch.nn.GRU", dtype=dtype, what="state")


@DTYPES
def test_stream_matches_torch_gru_cell(dtype, rng):
    """Authority: torch.nn.GRUCell: stream.step(x_t) equals cell(x_t, h) step after step."""
    import torch

    torch.manual_seed(5)
    cell = torch.nn.GRUCell(4, 3)
    if dtype == np.float64:
        cell = cell.double()
    model = convert_torch(cell.eval())
    x = rng.standard_normal((7, 2, 4)).astype(dtype)
    h = rng.standard_normal((2, 3)).astype(dtype)
    s = model.stream(batch_size=2, h0=h[None])
    h_t = torch.from_numpy(h)
    with torch.no_grad():
        for t in range(7):
            h_t = cell(torch.from_numpy(x[t]), h_t)
            assert_matches(s.step(x[t]), h_t.numpy(), authority="torch.nn.GRUCell", dtype=dtype, what=f"y_{t}")


def test_stream_from_zero_state_without_h0(rng):
    """Authority: torch.nn.GRU with h0 omitted (zeros): a stream created without h0 starts from zeros."""
    module = torch_gru(3, 4, 2, seed=4)
    model = convert_torch(module)
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    y_ref, h_ref = run_torch(module, x)
    s = model.stream(batch_size=3)
    assert np.array_equal(s.state, np.zeros((2, 3, 4), np.float32))
    for t in range(5):
        assert_matches(s.step(x[t]), y_ref[t], authority="torch.nn.GRU", dtype=np.float32, what=f"y_{t}")
    assert_matches(s.state, h_ref, authority="torch.nn.GRU", dtype=np.float32, what="state")


def test_batch_first_model_streams_batch_rows(rng):
    """Documented equivalence for a batch_first model: x_t is (B, I) and y_t equals y[:, t] of the
    (B, T, I) whole-sequence call."""
    model = _onnx_model(rng, 2, batch_first=True)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    y, h_n = model(x)
    s = model.stream(batch_size=3)
    for t in range(6):
        _close(s.step(x[:, t]), y[:, t], np.float32, f"y_{t}")
    _close(s.state, h_n, np.float32, "state")


@DTYPES
@pytest.mark.parametrize("num_layers", [1, 2])
def test_unbatched_stream(num_layers, dtype, rng):
    """Documented equivalence on an unbatched stream (batch_size=None): step((I,)) -> (H,) equals y[t] of
    model(x) on the unbatched (T, I) input; h0 and state are (L, H).  Checked against torch too."""
    module = torch_gru(4, 5, num_layers, dtype=dtype, seed=6)
    model = convert_torch(module)
    x = rng.standard_normal((6, 4)).astype(dtype)
    h0 = rng.standard_normal((num_layers, 5)).astype(dtype)
    y, h_n = model(x, h0)
    y_ref, h_ref = run_torch(module, x, h0)
    s = model.stream(batch_size=None, h0=h0)
    for t in range(6):
        y_t = s.step(x[t])
        assert y_t.shape == (5,)
        _close(y_t, y[t], dtype, f"y_{t}")
        assert_matches(y_t, y_ref[t], authority="torch.nn.GRU", dtype=dtype, what=f"y_{t}")
    assert s.state.shape == (num_layers, 5)
    _close(s.state, h_n, dtype, "state")
    assert_matches(s.state, h_ref, authority="torch.nn.GRU", dtype=dtype, what="state")


def test_batch_size_one_accepts_a_single_vector(rng):
    """API contract: ``s.step(x_t)`` takes (B, I) -> (B, H), "or (I,) -> (H,) when batch_size == 1".
    Authority: torch.nn.GRU on the unbatched sequence."""
    module = torch_gru(4, 5, 2, seed=7)
    model = convert_torch(module)
    x = rng.standard_normal((4, 4)).astype(np.float32)
    y_ref, _ = run_torch(module, x)
    s = model.stream(batch_size=1)
    for t in range(4):
        y_t = s.step(x[t])
        assert y_t.shape == (5,)
        assert_matches(y_t, y_ref[t], authority="torch.nn.GRU", dtype=np.float32, what=f"y_{t}")


def test_reset_restores_h0(rng):
    """Documented: reset() returns to the stream's h0, reset(h0=new) to a new one; stepping after a reset
    repeats the first run exactly (same kernel, same inputs)."""
    model = _onnx_model(rng, 2)
    x = rng.standard_normal((5, 2, 4)).astype(np.float32)
    h0 = rng.standard_normal((2, 2, 5)).astype(np.float32)
    s = model.stream(batch_size=2, h0=h0)
    first = [s.step(x[t]).copy() for t in range(5)]
    assert not np.array_equal(s.state, h0)
    s.reset()
    assert np.array_equal(s.state, h0)
    again = [s.step(x[t]).copy() for t in range(5)]
    for t in range(5):
        assert np.array_equal(first[t], again[t]), f"step {t} differs after reset()"

    new_h0 = rng.standard_normal((2, 2, 5)).astype(np.float32)
    s.reset(h0=new_h0)
    assert np.array_equal(s.state, new_h0)
    y, h_n = model(x, new_h0)
    for t in range(5):
        _close(s.step(x[t]), y[t], np.float32, f"y_{t} after reset(new h0)")
    _close(s.state, h_n, np.float32, "state after reset(new h0)")

    zero = model.stream(batch_size=2)
    zero.step(x[0])
    zero.reset()
    assert np.array_equal(zero.state, np.zeros((2, 2, 5), np.float32))


def test_step_with_out_buffer(rng):
    """Documented: step(x_t, out=buf) writes into buf and returns it; values equal a step without out."""
    model = _onnx_model(rng, 2)
    x = rng.standard_normal((4, 3, 4)).astype(np.float32)
    plain = model.stream(batch_size=3)
    buffered = model.stream(batch_size=3)
    buf = np.full((3, 5), np.nan, np.float32)
    for t in range(4):
        expected = plain.step(x[t])
        got = buffered.step(x[t], out=buf)
        assert got is buf
        assert np.array_equal(buf, expected)


def test_step_refuses_out_overlapping_x_t(rng):
    """API contract: ``out`` may not share memory with ``x_t`` (ValueError naming out, raised before the
    step: x_t and the state are left as they were); an ``out`` that starts right after x_t in the same
    buffer shares none and gives what a step on separate arrays gives."""
    model = _onnx_model(rng, 2)  # I=4, H=5
    buf = rng.standard_normal(12).astype(np.float32)
    stream = model.stream(batch_size=1)
    for start in (0, 3, 2):  # the same memory; y's first element on x_t's last; from its third on
        before = buf.copy()
        with pytest.raises(ValueError, match="out y shares memory with x_t"):
            stream.step(buf[:4].reshape(1, 4), out=buf[start : start + 5].reshape(1, 5))
        assert np.array_equal(buf, before), "the caller's x_t was overwritten"
        assert np.array_equal(stream.state, np.zeros((2, 1, 5), np.float32)), "a refused step moved the state"
    x_t = buf[:4].reshape(1, 4)
    expected = model.stream(batch_size=1).step(x_t.copy())
    assert np.array_equal(stream.step(x_t, out=buf[4:9].reshape(1, 5)), expected)


def test_step_does_not_modify_its_input_or_h0(rng):
    """Documented: inputs are never modified (x_t, and the h0 given to stream())."""
    model = _onnx_model(rng, 2)
    x_t = rng.standard_normal((2, 4)).astype(np.float32)
    h0 = rng.standard_normal((2, 2, 5)).astype(np.float32)
    x_copy, h0_copy = x_t.copy(), h0.copy()
    s = model.stream(batch_size=2, h0=h0)
    for _ in range(3):
        s.step(x_t)
    s.reset()
    assert np.array_equal(x_t, x_copy) and np.array_equal(h0, h0_copy)


@pytest.mark.parametrize("direction", ["bidirectional", "reverse"])
def test_stream_refuses_models_that_need_the_whole_sequence(direction, rng):
    """Documented: bidirectional and reverse models raise ValueError from stream()."""
    D = 2 if direction == "bidirectional" else 1
    model = gru_fast.GRU([random_onnx_weights(rng, D, 3, 4)], direction=direction)
    with pytest.raises(ValueError):
        model.stream(batch_size=1)
    with pytest.raises(ValueError):
        model.stream(batch_size=2, h0=np.zeros((1, 2, 4), np.float32))


def test_stream_bad_inputs(rng):
    """Errors name the argument: x_t of the wrong shape or dtype kind, h0 of the wrong shape, a
    non-positive batch size."""
    model = _onnx_model(rng, 2)
    s = model.stream(batch_size=2)
    with pytest.raises(ValueError, match="x"):
        s.step(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="x"):
        s.step(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="x"):
        s.step(np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="h0"):
        model.stream(batch_size=2, h0=np.zeros((2, 3, 5), np.float32))
    with pytest.raises(ValueError, match="h0"):
        s.reset(h0=np.zeros((1, 2, 5), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        model.stream(batch_size=0)
    with pytest.raises(ValueError, match="out"):
        s.step(np.zeros((2, 4), np.float32), out=np.empty((2, 4), np.float32))
