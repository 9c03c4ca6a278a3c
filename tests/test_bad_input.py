"""Argument checking and input handling of ``model(x, h0, lengths, out)``.

Authority: the API contract.  Wrong shapes and values raise ValueError, wrong dtype kinds raise TypeError,
each with a message naming the argument, before any kernel runs; inputs are never modified (also on the
success path); read-only inputs, non-contiguous and negative-stride views, other float dtypes and CPU
torch tensors are accepted and give the result of the equivalent contiguous array of model.dtype.
"""

from __future__ import annotations

import numpy as np
import pytest

import gru_fast
from conftest import convert_torch, random_onnx_weights

T, B, I, H, L = 5, 3, 4, 6, 2


@pytest.fixture(scope="module")
def model():
    """A 2-layer bidirectional float32 model: L*D = 4."""
    rng = np.random.default_rng(0)
    layers = [random_onnx_weights(rng, 2, I if l == 0 else 2 * H, H) for l in range(L)]
    return gru_fast.GRU(layers, direction="bidirectional")


@pytest.fixture
def data(rng):
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.standard_normal((2 * L, B, H)).astype(np.float32)
    lengths = np.array([5, 2, 4])
    return x, h0, lengths


# --------------------------------------------------------------------------------------------------
# shapes -> ValueError naming the argument
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(I,), (1, T, B, I), (2, 1, T, B, I), ()], ids=["1d", "4d", "5d", "0d"])
def test_x_of_wrong_rank(model, shape):
    with pytest.raises(ValueError, match=r"\bx\b"):
        model(np.zeros(shape, np.float32))


@pytest.mark.parametrize("shape", [(T, B, I + 1), (T, B, I - 1), (T, I + 2)], ids=["I+1", "I-1", "unbatched I"])
def test_x_of_wrong_input_size(model, shape):
    with pytest.raises(ValueError, match=r"\bx\b"):
        model(np.zeros(shape, np.float32))


@pytest.mark.parametrize("shape", [(0, B, I), (0, I)], ids=["batched", "unbatched"])
def test_zero_time_steps(model, shape):
    with pytest.raises(ValueError, match=r"\bx\b"):
        model(np.zeros(shape, np.float32))


def test_no_sequences_gives_empty_outputs_like_torch():
    """Authority: torch.nn.GRU, which returns empty y and h_n for a batch of 0 sequences (and refuses T=0,
    as test_zero_time_steps checks for us)."""
    import torch

    module = torch.nn.GRU(I, H, num_layers=L, bidirectional=True)
    model = convert_torch(module)
    x = np.zeros((T, 0, I), np.float32)
    h0 = np.zeros((2 * L, 0, H), np.float32)
    with torch.inference_mode():
        y_ref, h_ref = module(torch.from_numpy(x), torch.from_numpy(h0))
    for kwargs in ({}, {"h0": h0}, {"h0": h0, "lengths": np.zeros(0, np.int64)}):
        y, h_n = model(x, **kwargs)
        assert y.shape == tuple(y_ref.shape) and h_n.shape == tuple(h_ref.shape)
    y, h_n = model.bind(x, h0)()
    assert y.shape == tuple(y_ref.shape) and h_n.shape == tuple(h_ref.shape)


@pytest.mark.parametrize("shape", [
    (2 * L, B + 1, H),  # B of h0
    (2 * L - 1, B, H),  # L*D of h0
    (L, B, H),  # L instead of L*D
    (2 * L, B, H + 1),  # H
    (B, H),  # rank
    (1, 2 * L, B, H),
], ids=["B", "LD-1", "L", "H", "rank2", "rank4"])
def test_h0_of_wrong_shape(model, data, shape):
    x, _, _ = data
    with pytest.raises(ValueError, match=r"\bh0\b"):
        model(x, np.zeros(shape, np.float32))


def test_unbatched_h0_must_be_two_dimensional(model, data):
    x, h0, _ = data
    with pytest.raises(ValueError, match=r"\bh0\b"):
        model(x[:, 0], h0[:, :1])  # (L*D, 1, H) for a (T, I) input: the contract says (L*D, H)


# --------------------------------------------------------------------------------------------------
# dtype kinds -> TypeError
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object],
                         ids=["int32", "int64", "uint8", "bool", "complex64", "complex128", "object"])
def test_x_of_non_float_dtype(model, dtype):
    x = np.ones((T, B, I), dtype=dtype)
    with pytest.raises(TypeError, match=r"\bx\b"):
        model(x)


def test_x_of_strings(model):
    with pytest.raises(TypeError, match=r"\bx\b"):
        model(np.full((T, B, I), "1.0"))
    with pytest.raises(TypeError, match=r"\bx\b"):
        model("not an array")


def test_ragged_x(model):
    with pytest.raises((TypeError, ValueError), match=r"\bx\b"):
        model([[[0.0] * I] * B, [[0.0] * I] * (B - 1)])


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128, object], ids=["int", "bool", "complex", "object"])
def test_h0_of_non_float_dtype(model, data, dtype):
    x, _, _ = data
    with pytest.raises(TypeError, match=r"\bh0\b"):
        model(x, np.ones((2 * L, B, H), dtype=dtype))


# --------------------------------------------------------------------------------------------------
# lengths -> ValueError
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [
    [5, 2, 6],  # > T
    [5, -1, 3],  # negative
    [5, 2],  # too few
    [5, 2, 4, 1],  # too many
    [5.0, 2.5, 4.0],  # non-integer float
    [5.0, np.nan, 4.0],
    [5.0, np.inf, 4.0],
    [[5, 2, 4]],  # 2-D
    [[5], [2], [4]],
    5,  # scalar for a batched input
], ids=["above_T", "negative", "too_few", "too_many", "fractional", "nan", "inf", "2d_row", "2d_col", "scalar"])
def test_invalid_lengths(model, data, lengths):
    x, h0, _ = data
    with pytest.raises(ValueError, match=r"\blengths\b"):
        model(x, h0, np.asarray(lengths))


@pytest.mark.parametrize("lengths", [6, -1, [1, 2], 2.5], ids=["above_T", "negative", "two", "fractional"])
def test_invalid_unbatched_lengths(model, data, lengths):
    x, _, _ = data
    with pytest.raises(ValueError, match=r"\blengths\b"):
        model(x[:, 0], None, lengths)


# --------------------------------------------------------------------------------------------------
# out
# --------------------------------------------------------------------------------------------------

def _good_out():
    return np.empty((T, B, 2 * H), np.float32), np.empty((2 * L, B, H), np.float32)


def test_out_of_wrong_shape(model, data):
    x, h0, _ = data
    y, h_n = _good_out()
    with pytest.raises(ValueError, match=r"\bout\b"):
        model(x, h0, out=(np.empty((T, B, H), np.float32), h_n))
    with pytest.raises(ValueError, match=r"\bout\b"):
        model(x, h0, out=(y, np.empty((L, B, H), np.float32)))


def test_out_of_wrong_dtype(model, data):
    x, h0, _ = data
    y, h_n = _good_out()
    with pytest.raises(TypeError, match=r"\bout\b"):
        model(x, h0, out=(y.astype(np.float64), h_n))
    with pytest.raises(TypeError, match=r"\bout\b"):
        model(x, h0, out=(y, h_n.astype(np.float64)))


def test_out_not_contiguous(model, data):
    x, h0, _ = data
    y, h_n = _good_out()
    strided = np.empty((T, B, 4 * H), np.float32)[:, :, ::2]
    fortran = np.asfortranarray(np.empty((2 * L, B, H), np.float32))
    with pytest.raises(ValueError, match=r"\bout\b"):
        model(x, h0, out=(strided, h_n))
    with pytest.raises(ValueError, match=r"\bout\b"):
        model(x, h0, out=(y, fortran))


def test_out_read_only(model, data):
    x, h0, _ = data
    y, h_n = _good_out()
    y.flags.writeable = False
    with pytest.raises(ValueError, match=r"\bout\b"):
        model(x, h0, out=(y, h_n))


def test_out_not_a_pair(model, data):
    x, h0, _ = data
    y, _ = _good_out()
    with pytest.raises((TypeError, ValueError), match=r"\bout\b"):
        model(x, h0, out=y)


def test_refused_call_leaves_out_untouched(model, data):
    """Errors are raised before any kernel runs: a bad lengths leaves the out buffers as they were."""
    x, h0, _ = data
    y = np.full((T, B, 2 * H), 7.0, np.float32)
    h_n = np.full((2 * L, B, H), 7.0, np.float32)
    with pytest.raises(ValueError):
        model(x, h0, [5, 2, 9], out=(y, h_n))
    assert np.all(y == 7.0) and np.all(h_n == 7.0)


def test_out_is_written_and_returned(model, data):
    x, h0, lengths = data
    y_ref, h_ref = model(x, h0, lengths)
    y, h_n = np.full_like(y_ref, np.nan), np.full_like(h_ref, np.nan)
    got = model(x, h0, lengths, out=(y, h_n))
    assert got[0] is y and got[1] is h_n
    assert np.array_equal(y, y_ref) and np.array_equal(h_n, h_ref)


# --------------------------------------------------------------------------------------------------
# inputs are never modified; accepted input forms
# --------------------------------------------------------------------------------------------------

def test_inputs_not_modified_on_success(model, data):
    x, h0, lengths = data
    copies = [a.copy() for a in (x, h0, lengths)]
    model(x, h0, lengths)
    model(x, h0, lengths, out=_good_out())
    for original, copy in zip((x, h0, lengths), copies):
        assert np.array_equal(original, copy)


def test_inputs_not_modified_on_failure(model, data):
    x, h0, lengths = data
    copies = [a.copy() for a in (x, h0, lengths)]
    with pytest.raises(ValueError):
        model(x, h0, np.array([5, 2, 9]))
    with pytest.raises(ValueError):
        model(x, h0[:, :2])
    for original, copy in zip((x, h0, lengths), copies):
        assert np.array_equal(original, copy)


def test_read_only_inputs_work(model, data):
    x, h0, lengths = data
    y_ref, h_ref = model(x, h0, lengths)
    for a in (x, h0, lengths):
        a.flags.writeable = False
    y, h_n = model(x, h0, lengths)
    assert np.array_equal(y, y_ref) and np.array_equal(h_n, h_ref)


def test_weights_are_copied_and_not_modified(rng):
    """The constructor copies W, R, B: the caller's arrays are unchanged, and changing them afterwards
    does not change the model."""
    W, R, Bias = random_onnx_weights(rng, 1, 3, 4)
    copies = [a.copy() for a in (W, R, Bias)]
    model = gru_fast.GRU([(W, R, Bias)])
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    y_before, _ = model(x)
    for original, copy in zip((W, R, Bias), copies):
        assert np.array_equal(original, copy)
    W[...] = 0.0
    R[...] = 0.0
    y_after, _ = model(x)
    assert np.array_equal(y_before, y_after)


@pytest.mark.parametrize("view", ["reversed_time", "reversed_batch", "strided_features", "transposed",
                                  "fortran"])
def test_non_contiguous_views_equal_contiguous_copies(model, rng, view):
    """A view (negative strides, steps, a transposed or Fortran-ordered array) gives bitwise the result of
    its contiguous copy."""
    base = rng.standard_normal((T, B, 2 * I)).astype(np.float32)
    if view == "reversed_time":
        x = base[::-1, :, :I]
    elif view == "reversed_batch":
        x = base[:, ::-1, I:]
    elif view == "strided_features":
        x = base[:, :, ::2]
    elif view == "transposed":
        x = rng.standard_normal((B, T, I)).astype(np.float32).transpose(1, 0, 2)
    else:
        x = np.asfortranarray(base[:, :, :I])
    assert not x.flags.c_contiguous
    h0 = rng.standard_normal((2 * L, 2 * B, H)).astype(np.float32)[:, ::-2]
    lengths = np.array([5, 1, 4, 3, 2, 5])[::2]
    y, h_n = model(x, h0, lengths)
    y_ref, h_ref = model(np.ascontiguousarray(x), np.ascontiguousarray(h0), np.ascontiguousarray(lengths))
    assert np.array_equal(y, y_ref) and np.array_equal(h_n, h_ref)


def test_other_float_dtypes_are_cast(model, data):
    """float16 / float64 x and h0 are cast to model.dtype: same result as the float32 copies."""
    x, h0, lengths = data
    x16 = x.astype(np.float16)
    y, h_n = model(x16, h0.astype(np.float64), lengths)
    assert y.dtype == np.float32 and h_n.dtype == np.float32
    y_ref, h_ref = model(x16.astype(np.float32), h0, lengths)
    assert np.array_equal(y, y_ref) and np.array_equal(h_n, h_ref)


def test_nested_lists_are_accepted(model, data):
    x, h0, lengths = data
    y, h_n = model(x.tolist(), h0.tolist(), lengths.tolist())
    y_ref, h_ref = model(x, h0, lengths)
    assert np.array_equal(y, y_ref) and np.array_equal(h_n, h_ref)


def test_cpu_torch_tensor_input(model, data):
    """CPU torch tensors as x, h0 and lengths are accepted and equal the numpy result."""
    import torch

    x, h0, lengths = data
    y, h_n = model(torch.from_numpy(x), torch.from_numpy(h0), torch.from_numpy(lengths))
    y_ref, h_ref = model(x, h0, lengths)
    assert isinstance(y, np.ndarray)
    assert np.array_equal(y, y_ref) and np.array_equal(h_n, h_ref)


# --------------------------------------------------------------------------------------------------
# constructor
# --------------------------------------------------------------------------------------------------

def test_constructor_rejects_inconsistent_weights(rng):
    W, R, Bias = random_onnx_weights(rng, 1, 3, 4)
    with pytest.raises(ValueError):
        gru_fast.GRU([(W, R[:, :, :3], Bias)])  # R not (D, 3H, H)
    with pytest.raises(ValueError):
        gru_fast.GRU([(W, R, Bias[:, :-1])])  # B not (D, 6H)
    with pytest.raises(ValueError):
        gru_fast.GRU([(W, R, Bias)], direction="bidirectional")  # D = 1 weights for D = 2
    with pytest.raises(ValueError):
        gru_fast.GRU([(W, R, Bias), (W, R, Bias)])  # layer 1 input must be D*H = 4, not 3
    with pytest.raises(ValueError):
        gru_fast.GRU([(W, R, Bias)], direction="sideways")


def test_constructor_rejects_bad_activations(rng):
    W, R, Bias = random_onnx_weights(rng, 1, 3, 4)
    with pytest.raises(ValueError, match="activation"):
        gru_fast.GRU([(W, R, Bias)], activations=["Sigmoid", "Swish"])
    with pytest.raises(ValueError, match="activation"):
        gru_fast.GRU([(W, R, Bias)], activations=["Sigmoid", "Tanh", "Tanh"])
    with pytest.raises(ValueError, match="clip"):
        gru_fast.GRU([(W, R, Bias)], clip=-1.0)
