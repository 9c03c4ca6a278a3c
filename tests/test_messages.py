"""Messages that say what is true, and inputs the README says are accepted.

* a 0-d input is reported with its own shape ``()``, not ``(1,)``;
* ``bind()`` says why an array cannot be read in place (a subclass, its dtype, its strides), and reads an
  ``np.memmap`` in place;
* a bfloat16 CPU tensor is widened to float32 as the README's "inputs of another float dtype are converted"
  says (numpy has no bfloat16, so ``np.asarray`` alone refuses it);
* an unbatched call's h0 message names the axes of the shape it prints.

Authority for the accepted inputs: ``torch.nn.GRU`` on the same values.
"""

from __future__ import annotations

import numpy as np
import pytest

import gru_fast
from conftest import assert_matches, convert_torch, run_torch, torch_gru

I, H = 4, 16


@pytest.fixture(scope="module")
def module():
    return torch_gru(I, H, seed=5)


@pytest.fixture(scope="module")
def model(module):
    return convert_torch(module)


@pytest.mark.parametrize("value", [np.float32(1.0), np.array(1.0), 1.0], ids=["numpy-scalar", "0-d", "float"])
def test_zero_dimensional_input_is_reported_as_shape_empty(model, value):
    with pytest.raises(ValueError, match=r"x must be 3-D .* got shape \(\)$"):
        model(value)
    with pytest.raises(ValueError, match=r"x_t must have shape \(1, 4\) or \(4,\), got \(\)$"):
        model.stream().step(value)


def test_bind_reads_a_memmap_in_place(model, module, tmp_path, rng):
    x = rng.standard_normal((5, 2, I)).astype(np.float32)
    mapped = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mapped[:] = x
    call = model.bind(mapped)
    want_y, want_h = run_torch(module, x)
    y, h_n = call()
    assert_matches(y, want_y, authority="torch.nn.GRU", dtype=np.float32, what="bound memmap y")
    assert_matches(h_n, want_h, authority="torch.nn.GRU", dtype=np.float32, what="bound memmap h_n")
    mapped[:] = 2 * x  # read in place: the next call sees the file's new contents
    assert_matches(call()[0], run_torch(module, 2 * x)[0], authority="torch.nn.GRU", dtype=np.float32,
                   what="bound memmap y after a refill")
    read_only = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=x.shape)
    assert_matches(model.bind(read_only)()[0], run_torch(module, 2 * x)[0], authority="torch.nn.GRU",
                   dtype=np.float32, what="read-only memmap")
    step = model.stream(batch_size=2).bind(mapped[0])
    assert_matches(step(), run_torch(module, 2 * x[:1])[0][0], authority="torch.nn.GRU", dtype=np.float32,
                   what="bound stream step on a memmap row")


class Tagged(np.ndarray):
    """An ndarray subclass (what it stands for need not be its memory, so bind() refuses it)."""


@pytest.mark.parametrize("value, reason", [
    (np.zeros((3, I), np.float32).view(Tagged), r"got an instance of the ndarray subclass test_messages\.Tagged; "
                                                r"pass np\.asarray\(x\)"),
    (np.zeros((3, 2, I), np.float64), r"got an array of dtype float64$"),
    (np.zeros((3, 2, 2 * I), np.float32)[..., ::2], r"got a non-contiguous array \(shape \(3, 2, 4\), strides"),
    ([[0.0] * I], r"got a list, not a numpy array$"),
], ids=["subclass", "dtype", "strides", "list"])
def test_bind_refusal_names_the_real_reason(model, value, reason):
    with pytest.raises(TypeError, match=r"bind\(\) reads x in place, so it must be a C-contiguous, aligned numpy "
                                        r"array of dtype float32; " + reason):
        model.bind(value)
    with pytest.raises(TypeError, match="bind\\(\\) reads x_t in place"):
        model.stream().bind(value)


def test_bfloat16_tensor_is_widened_to_float32(model, module, rng):
    torch = pytest.importorskip("torch")
    x = torch.as_tensor(rng.standard_normal((6, 3, I)).astype(np.float32)).to(torch.bfloat16)
    want_y, want_h = run_torch(module, x.float().numpy())  # bfloat16 -> float32 is exact
    y, h_n = model(x)
    assert_matches(y, want_y, authority="torch.nn.GRU", dtype=np.float32, what="bfloat16 x")
    h0 = torch.zeros(1, 3, H, dtype=torch.bfloat16)
    assert_matches(model(x, h0=h0)[1], want_h, authority="torch.nn.GRU", dtype=np.float32, what="bfloat16 h0")
    stream = model.stream(batch_size=3)
    assert_matches(stream.step(x[0]), want_y[0], authority="torch.nn.GRU", dtype=np.float32,
                   what="bfloat16 x_t")
    with pytest.raises(TypeError, match="x must be array-like"):  # numpy's own refusal: detach it first
        model(x.requires_grad_(True))


def test_unbatched_h0_message_names_the_axes_it_prints(model):
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 16\) \(num_layers\*num_directions, hidden: "
                                         r"x is unbatched\), got \(1, 2, 16\)$"):
        model(np.zeros((3, I), np.float32), h0=np.zeros((1, 2, H), np.float32))
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 2, 16\) \(num_layers\*num_directions, batch, "
                                         r"hidden\), got \(1, 16\)$"):
        model(np.zeros((3, 2, I), np.float32), h0=np.zeros((1, H), np.float32))
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 16\) \(num_layers, hidden\), got \(1, 1, 16\)$"):
        model.stream(batch_size=None).reset(np.zeros((1, 1, H), np.float32))
