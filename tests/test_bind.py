"""Bound calls (``GRU.bind``, ``Stream.bind``): arrays checked once, then run on their current contents.

Authority: ``torch.nn.GRU`` on the same contents at every call (the binding must read the caller's buffers
in place, not a snapshot taken at bind time), and the argument checks of the unbound API for what a
binding must refuse.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from conftest import assert_matches, convert_torch, last_json_line, run_python, run_torch, torch_gru


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("size", ["small", "parallel"])
def test_bound_call_reads_buffers_in_place(size, bidirectional, rng):
    """Refill x and h0 in place between calls: every call equals torch.nn.GRU on the new contents."""
    I, H, B, T = (5, 7, 3, 4) if size == "small" else (48, 128, 1, 30)
    module = torch_gru(I, H, 2, bidirectional=bidirectional, seed=21)
    model = convert_torch(module)
    D = 2 if bidirectional else 1
    x = np.zeros((T, B, I), np.float32)
    h0 = np.zeros((2 * D, B, H), np.float32)
    y, h_n = np.empty((T, B, D * H), np.float32), np.empty((2 * D, B, H), np.float32)
    call = model.bind(x, h0, out=(y, h_n))
    for round_ in range(3):
        x[...] = rng.standard_normal(x.shape)
        h0[...] = rng.standard_normal(h0.shape)
        got_y, got_h = call()
        assert got_y is y and got_h is h_n
        y_ref, h_ref = run_torch(module, x, h0, None)
        assert_matches(y, y_ref, authority="torch.nn.GRU", dtype=np.float32, what=f"round {round_}: y")
        assert_matches(h_n, h_ref, authority="torch.nn.GRU", dtype=np.float32, what=f"round {round_}: h_n")


def test_bound_call_lengths_are_fixed_at_bind_time(rng):
    """lengths are copied when binding (so a later edit cannot push them out of range)."""
    module = torch_gru(4, 6, 1, seed=22)
    model = convert_torch(module)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    lengths = np.array([5, 2, 3])
    call = model.bind(x, lengths=lengths)
    lengths[:] = 99
    y, h_n = call()
    y_ref, h_ref = run_torch(module, x, None, np.array([5, 2, 3]))
    assert_matches(y, y_ref, authority="torch.nn.GRU (packed)", dtype=np.float32, what="y")
    assert_matches(h_n, h_ref, authority="torch.nn.GRU (packed)", dtype=np.float32, what="h_n")


def test_bind_refuses_what_it_cannot_read_in_place(rng):
    """A binding reads x and h0 where they are: other dtypes, non-contiguous views and lists are refused
    (a converted copy would silently stop following the caller's buffer); out= must not overlap inputs."""
    model = convert_torch(torch_gru(4, 6, 1, seed=23))
    x = np.zeros((5, 2, 4), np.float32)
    with pytest.raises(TypeError, match="x"):
        model.bind(x.astype(np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        model.bind(np.zeros((5, 2, 8), np.float32)[:, :, ::2])
    with pytest.raises(TypeError, match="x"):
        model.bind(x.tolist())
    with pytest.raises(TypeError, match="h0"):
        model.bind(x, h0=np.zeros((1, 2, 6), np.float64))
    with pytest.raises(ValueError, match="h0"):
        model.bind(x, h0=np.zeros((1, 3, 6), np.float32))
    y = np.empty((5, 2, 6), np.float32)
    with pytest.raises(ValueError, match="y and h_n share memory"):
        model.bind(x, out=(y, y[0, :, :].reshape(1, 2, 6)))
    buffer = np.empty(5 * 2 * 6 + 1 * 2 * 6, np.float32)
    with pytest.raises(ValueError, match="shares memory with x"):
        model.bind(buffer[: 5 * 2 * 4].reshape(5, 2, 4), out=(buffer[:60].reshape(5, 2, 6), np.empty((1, 2, 6), np.float32)))


@pytest.mark.parametrize("I, H", [(5, 7), (128, 256)], ids=["small", "parallel"])
def test_bound_stream_step_follows_torch(I, H, rng):
    """A bound step and plain steps share the stream's state: interleaved, they equal torch.nn.GRU over the
    frames so far."""
    module = torch_gru(I, H, 2, seed=24)
    model = convert_torch(module)
    xs = rng.standard_normal((6, 1, I)).astype(np.float32)
    y_ref, h_ref = run_torch(module, xs, None, None)
    stream = model.stream(batch_size=1)
    frame = np.empty((1, I), np.float32)
    out = np.empty((1, H), np.float32)
    step = stream.bind(frame, out=out)
    for t in range(6):
        if t % 2:
            y_t = stream.step(xs[t])
        else:
            frame[...] = xs[t]
            y_t = step()
            assert y_t is out
        assert_matches(y_t, y_ref[t], authority="torch.nn.GRU", dtype=np.float32, what=f"step {t}")
    assert_matches(stream.state, h_ref, authority="torch.nn.GRU", dtype=np.float32, what="state")


def test_stream_bind_refuses_other_dtypes_and_shapes(rng):
    model = convert_torch(torch_gru(4, 6, 1, seed=25))
    stream = model.stream(batch_size=2)
    with pytest.raises(TypeError, match="x_t"):
        stream.bind(np.zeros((2, 4), np.float64))
    with pytest.raises(ValueError, match="x_t must have shape"):
        stream.bind(np.zeros((3, 4), np.float32))
    x_t = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="out"):
        stream.bind(x_t, out=np.zeros((2, 5), np.float32))


KEEP_ALIVE_CHILD = textwrap.dedent(
    """
    import gc, json
    import numpy as np
    import torch
    from converters.from_torch import convert

    torch.manual_seed(26)
    I, H = 64, 512  # 3.5 MB of packed weights: glibc maps them apart and unmaps them when they are freed
    module = torch.nn.GRU(I, H).eval()
    x = np.random.default_rng(0).standard_normal((3, 1, I)).astype(np.float32)
    with torch.no_grad():
        y_ref, h_ref = (t.numpy() for t in module(torch.from_numpy(x)))
    call = convert(module).bind(x)  # each binding from a model of its own, which is gone at once
    step = convert(module).stream(batch_size=1).bind(np.ascontiguousarray(x[0]))
    gc.collect()
    y, h_n = call()
    y_0 = step()
    print(json.dumps({"call_y": float(np.max(np.abs(y - y_ref))), "call_h_n": float(np.max(np.abs(h_n - h_ref))),
                      "step_y": float(np.max(np.abs(y_0 - y_ref[0])))}))
    """
)


def test_bindings_keep_the_model_weights_alive():
    """A binding outlives the model it came from: ``call = GRU(...).bind(x)`` (or a stream's bind) with the
    model itself gone still reads the model's packed weights, not freed memory (unmapped or reused: a child
    process, so a crash fails this test only).  Authority: torch.nn.GRU on the same weights, in the child."""
    errors = last_json_line(run_python(KEEP_ALIVE_CHILD, timeout=300))
    assert all(error <= 1e-5 for error in errors.values()), errors
