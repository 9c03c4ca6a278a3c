"""converters.from_keras's array converters against the Keras GRU equations (no Keras needed; files
written by Keras itself are tested in tests/test_keras_parity.py).

Authority: the Keras 3 source, ``keras/src/layers/rnn/gru.py`` (``GRUCell.call``, implementation 2,
identical in tf.keras 2.x ``keras/layers/rnn/gru.py``), transcribed into numpy below as
``keras_gru``::

    matrix_x = x @ kernel + input_bias                       # x_z, x_r, x_h = split(matrix_x, 3)
    reset_after=True:   matrix_inner = h @ recurrent_kernel + recurrent_bias
    reset_after=False:  matrix_inner = h @ recurrent_kernel[:, :2H]
    z = recurrent_activation(x_z + inner_z);  r = recurrent_activation(x_r + inner_r)
    reset_after=True:   hh = activation(x_h + r * inner_h)
    reset_after=False:  hh = activation(x_h + (r * h) @ recurrent_kernel[:, 2H:])
    h = z * h_prev + (1 - z) * hh

with ``bias`` (2, 3H) = [input_bias, recurrent_bias] when reset_after=True and (3H,) = input_bias when
False.  ``go_backwards=True`` (keras/src/layers/rnn/rnn.py -> backend rnn) feeds the steps from last to
first and returns the outputs in processing order; ``Bidirectional`` (keras/src/layers/rnn/bidirectional.py)
flips the backward output back and concatenates [forward, backward] for merge_mode="concat".

Activations follow the Keras 3 numpy backend (keras/src/backend/numpy/nn.py); hard_sigmoid is
clip(x/6 + 0.5, 0, 1) in Keras 3 and clip(0.2x + 0.5, 0, 1) in tf.keras <= 2.15 (keras/backend.py).
"""

import numpy as np
import pytest

from converters import from_keras

I, H, T, B = 5, 6, 7, 3
ATOL32 = 1e-5
ATOL64 = 1e-12

KERAS_ACT = {
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "linear": lambda x: x,
    None: lambda x: x,
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(x, 0.0),
    "elu": lambda x: np.where(x >= 0.0, x, np.expm1(x)),
    "leaky_relu": lambda x: np.maximum(x, 0.2 * x),
    ("hard_sigmoid", "keras3"): lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    ("hard_sigmoid", "tf2"): lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0),
}


def _act(name, hard_sigmoid):
    return KERAS_ACT[(name, hard_sigmoid)] if name == "hard_sigmoid" else KERAS_ACT[name]


def keras_gru(x, kernel, recurrent_kernel, bias, *, reset_after=True, activation="tanh",
              recurrent_activation="sigmoid", hard_sigmoid=None, go_backwards=False, h0=None):
    """Keras GRU forward (return_sequences=True, return_state=True) in float64 numpy.

    x: (B, T, I).  Returns (outputs (B, T, H) in Keras' order, final state (B, H))."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    recurrent_kernel = np.asarray(recurrent_kernel, np.float64)
    units = recurrent_kernel.shape[0]
    act, rec_act = _act(activation, hard_sigmoid), _act(recurrent_activation, hard_sigmoid)
    if bias is None:
        input_bias = recurrent_bias = np.zeros(3 * units)
    elif reset_after:
        input_bias, recurrent_bias = np.asarray(bias, np.float64)
    else:
        input_bias, recurrent_bias = np.asarray(bias, np.float64), None
    h = np.zeros((x.shape[0], units)) if h0 is None else np.asarray(h0, np.float64)
    steps = range(x.shape[1] - 1, -1, -1) if go_backwards else range(x.shape[1])
    outputs = []
    for t in steps:
        matrix_x = x[:, t] @ kernel + input_bias
        x_z, x_r, x_h = np.split(matrix_x, 3, axis=-1)
        if reset_after:
            matrix_inner = h @ recurrent_kernel + recurrent_bias
        else:
            matrix_inner = h @ recurrent_kernel[:, : 2 * units]
        recurrent_z = matrix_inner[:, :units]
        recurrent_r = matrix_inner[:, units: 2 * units]
        z = rec_act(x_z + recurrent_z)
        r = rec_act(x_r + recurrent_r)
        if reset_after:
            recurrent_h = r * matrix_inner[:, 2 * units:]
        else:
            recurrent_h = (r * h) @ recurrent_kernel[:, 2 * units:]
        hh = act(x_h + recurrent_h)
        h = z * h + (1 - z) * hh
        outputs.append(h)
    return np.stack(outputs, axis=1), h


def _weights(reset_after=True, use_bias=True, dtype=np.float32, seed=0, input_size=I, units=H):
    rng = np.random.default_rng(seed)
    kernel = (rng.standard_normal((input_size, 3 * units)) * 0.5).astype(dtype)
    recurrent_kernel = (rng.standard_normal((units, 3 * units)) * 0.5).astype(dtype)
    if not use_bias:
        return [kernel, recurrent_kernel]
    shape = (2, 3 * units) if reset_after else (3 * units,)
    return [kernel, recurrent_kernel, (rng.standard_normal(shape) * 0.5).astype(dtype)]


def _x(dtype=np.float32, seed=1):
    return np.random.default_rng(seed).standard_normal((B, T, I)).astype(dtype)


def _bias_of(weights):
    return weights[2] if len(weights) == 3 else None


# ------------------------------------------------------------------------------------------------
# parity with the Keras equations
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_convert_matches_keras(reset_after, use_bias, go_backwards):
    w = _weights(reset_after, use_bias)
    model = from_keras.convert(w[0], w[1], _bias_of(w), reset_after=reset_after, go_backwards=go_backwards)
    assert model.linear_before_reset is reset_after
    assert model.batch_first is True
    assert model.has_bias is use_bias
    assert model.direction == ("reverse" if go_backwards else "forward")
    assert model.dtype == np.float32
    x = _x()
    h0 = np.random.default_rng(4).standard_normal((B, H)).astype(np.float32)
    y_keras, h_keras = keras_gru(x, *w[:2], _bias_of(w), reset_after=reset_after, go_backwards=go_backwards,
                                 h0=h0)
    y, h_n = model(x, h0=h0[None])
    # go_backwards: Keras returns the sequence in processing order (reversed); ours is time-aligned
    np.testing.assert_allclose(y[:, ::-1] if go_backwards else y, y_keras, rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n[0], h_keras, rtol=0, atol=ATOL32)
    # return_sequences=False output: Keras' last output == the final state
    np.testing.assert_allclose(y_keras[:, -1], h_n[0], rtol=0, atol=ATOL32)


@pytest.mark.parametrize("activation, recurrent_activation, hard_sigmoid", [
    ("relu", "sigmoid", None),
    ("linear", "sigmoid", None),
    (None, None, None),
    ("softsign", "softplus", None),
    ("elu", "hard_sigmoid", "keras3"),
    ("tanh", "hard_sigmoid", "tf2"),
    ("hard_sigmoid", "hard_sigmoid", "keras3"),
    ("leaky_relu", "sigmoid", None),
])
@pytest.mark.parametrize("reset_after", [True, False])
def test_activations_match_keras(activation, recurrent_activation, hard_sigmoid, reset_after):
    w = _weights(reset_after, seed=2)
    if recurrent_activation is None:
        w = [a * 0.3 for a in w]  # unbounded "gates": keep the recurrence from blowing up
    model = from_keras.convert(*w, reset_after=reset_after, activation=activation,
                               recurrent_activation=recurrent_activation, hard_sigmoid=hard_sigmoid)
    x = _x() * (3.0 if hard_sigmoid else 1.0)  # reach the clipped parts of hard_sigmoid
    y_keras, h_keras = keras_gru(x, *w, reset_after=reset_after, activation=activation,
                                 recurrent_activation=recurrent_activation, hard_sigmoid=hard_sigmoid)
    y, h_n = model(x)
    np.testing.assert_allclose(y, y_keras, rtol=0, atol=ATOL32 * max(1.0, np.abs(y_keras).max()))
    np.testing.assert_allclose(h_n[0], h_keras, rtol=0, atol=ATOL32 * max(1.0, np.abs(h_keras).max()))


def test_hard_sigmoid_parameters():
    w = _weights()
    k3 = from_keras.convert(*w, recurrent_activation="hard_sigmoid", hard_sigmoid="keras3")
    tf2 = from_keras.convert(*w, recurrent_activation="hard_sigmoid", hard_sigmoid="tf2")
    f3, f2 = k3.activations[0], tf2.activations[0]
    assert f3.name == f2.name == "HardSigmoid"
    assert f3.alpha == pytest.approx(1.0 / 6.0) and f3.beta == 0.5
    assert f2.alpha == pytest.approx(0.2) and f2.beta == 0.5
    assert k3.activations[1].name == "Tanh"


def test_keras3_hard_sigmoid_is_relu6_form():
    """Keras 3's TF backend has used relu6(x + 3) / 6 and its numpy backend clip(x/6 + 0.5, 0, 1): the same
    function (breakpoints at -3 and 3), equal to float rounding, i.e. ONNX HardSigmoid(1/6, 0.5)."""
    x = np.concatenate([np.linspace(-10, 10, 20001), [-3.0, 3.0, -3.0 - 1e-12, 3.0 + 1e-12]])
    relu6_form = np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0
    clip_form = np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    onnx_form = np.maximum(0.0, np.minimum(1.0, (1.0 / 6.0) * x + 0.5))
    np.testing.assert_allclose(relu6_form, clip_form, rtol=0, atol=4e-16)
    np.testing.assert_allclose(onnx_form, clip_form, rtol=0, atol=4e-16)


def test_float64_weights_give_float64_model():
    w = _weights(dtype=np.float64)
    model = from_keras.convert(*w)
    assert model.dtype == np.float64
    x = _x(np.float64)
    y_keras, h_keras = keras_gru(x, *w)
    y, h_n = model(x)
    np.testing.assert_allclose(y, y_keras, rtol=0, atol=ATOL64)
    np.testing.assert_allclose(h_n[0], h_keras, rtol=0, atol=ATOL64)


def test_convert_weights_list_and_time_major():
    w = _weights(reset_after=False)
    model = from_keras.convert_weights(w, reset_after=False)
    assert model.provenance["framework"] == "keras" and model.provenance["source"] == "weights"
    x = _x()
    y_keras, _ = keras_gru(x, *w, reset_after=False)
    np.testing.assert_allclose(model(x)[0], y_keras, rtol=0, atol=ATOL32)
    tm = from_keras.convert_weights(w, reset_after=False, batch_first=False)
    np.testing.assert_allclose(tm(x.transpose(1, 0, 2))[0], y_keras.transpose(1, 0, 2), rtol=0, atol=ATOL32)
    no_bias = _weights(use_bias=False)
    model = from_keras.convert_weights(no_bias)
    np.testing.assert_allclose(model(x)[0], keras_gru(x, *no_bias, None)[0], rtol=0, atol=ATOL32)


def test_onnx_layout_of_converted_weights():
    kernel, recurrent_kernel, bias = _weights()
    W, R, Bias = from_keras.convert(kernel, recurrent_kernel, bias).onnx_weights()[0]
    np.testing.assert_array_equal(W[0], kernel.T)
    np.testing.assert_array_equal(R[0], recurrent_kernel.T)
    np.testing.assert_array_equal(Bias[0], bias.reshape(-1))
    kernel, recurrent_kernel, bias = _weights(reset_after=False)
    Bias = from_keras.convert(kernel, recurrent_kernel, bias, reset_after=False).onnx_weights()[0][2]
    np.testing.assert_array_equal(Bias[0], np.concatenate([bias, np.zeros_like(bias)]))


# ------------------------------------------------------------------------------------------------
# Bidirectional
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reset_after", [True, False])
def test_bidirectional_concat_matches_keras(reset_after):
    fw, bw = _weights(reset_after, seed=5), _weights(reset_after, seed=6)
    model = from_keras.convert_bidirectional(fw, bw, reset_after=reset_after)
    assert model.direction == "bidirectional" and model.batch_first
    x = _x()
    y_fw, h_fw = keras_gru(x, *fw, reset_after=reset_after)
    y_bw, h_bw = keras_gru(x, *bw, reset_after=reset_after, go_backwards=True)
    # keras Bidirectional: backward output flipped back to input order, then concat
    y_keras = np.concatenate([y_fw, y_bw[:, ::-1]], axis=-1)
    y, h_n = model(x)
    np.testing.assert_allclose(y, y_keras, rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n[0], h_fw, rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n[1], h_bw, rtol=0, atol=ATOL32)


def test_bidirectional_with_activations_and_refusals():
    fw, bw = _weights(seed=5), _weights(seed=6)
    model = from_keras.convert_bidirectional(fw, bw, activation="relu", recurrent_activation="hard_sigmoid",
                                             hard_sigmoid="tf2")
    x = _x()
    kw = dict(activation="relu", recurrent_activation="hard_sigmoid", hard_sigmoid="tf2")
    y_fw, _ = keras_gru(x, *fw, **kw)
    y_bw, _ = keras_gru(x, *bw, go_backwards=True, **kw)
    np.testing.assert_allclose(model(x)[0], np.concatenate([y_fw, y_bw[:, ::-1]], -1), rtol=0,
                               atol=ATOL32 * 10)
    for mode in ("sum", "mul", "ave", None):
        with pytest.raises(ValueError, match="merge_mode"):
            from_keras.convert_bidirectional(fw, bw, merge_mode=mode)
    with pytest.raises(ValueError, match="differ in shape"):
        from_keras.convert_bidirectional(fw, _weights(input_size=I + 1))


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------

def test_convert_config():
    w = _weights(reset_after=False)
    config = {"name": "gru", "units": H, "activation": "tanh", "recurrent_activation": "hard_sigmoid",
              "use_bias": True, "reset_after": False, "go_backwards": True, "return_sequences": True}
    with pytest.raises(ValueError, match="hard_sigmoid"):
        from_keras.convert_config(config, w)
    model = from_keras.convert_config(config, w, keras_version="2.15.0")
    assert model.direction == "reverse" and model.provenance["hard_sigmoid"] == "tf2"
    x = _x()
    y_keras, _ = keras_gru(x, *w, reset_after=False, recurrent_activation="hard_sigmoid", hard_sigmoid="tf2",
                           go_backwards=True)
    np.testing.assert_allclose(model(x)[0][:, ::-1], y_keras, rtol=0, atol=ATOL32)
    k3 = from_keras.convert_config({"class_name": "GRU", "config": config}, w, keras_version="3.6.0")
    assert k3.activations[0].alpha == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="units"):
        from_keras.convert_config({**config, "units": H + 1}, w, hard_sigmoid="tf2")
    with pytest.raises(ValueError, match="use_bias"):
        from_keras.convert_config({**config, "use_bias": False}, w, hard_sigmoid="tf2")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_hard_sigmoid_requires_a_version():
    w = _weights()
    with pytest.raises(ValueError, match="keras3.*tf2"):
        from_keras.convert(*w, recurrent_activation="hard_sigmoid")
    with pytest.raises(ValueError, match="hard_sigmoid must be"):
        from_keras.convert(*w, hard_sigmoid="keras2")


@pytest.mark.parametrize("name", ["swish", "gelu", "selu", "relu6", "softmax"])
def test_unsupported_activation_is_refused(name):
    with pytest.raises(ValueError, match=name):
        from_keras.convert(*_weights(), activation=name)


def test_callable_activation_is_refused():
    with pytest.raises(TypeError, match="callable"):
        from_keras.convert(*_weights(), activation=np.tanh)


def test_bad_shapes_are_refused():
    kernel, recurrent_kernel, bias = _weights()
    with pytest.raises(ValueError, match=r"reset_after=True expects shape \(2, 18\)"):
        from_keras.convert(kernel, recurrent_kernel, bias[0])
    with pytest.raises(ValueError, match=r"reset_after=False expects shape \(18,\)"):
        from_keras.convert(kernel, recurrent_kernel, bias, reset_after=False)
    with pytest.raises(ValueError, match="recurrent_kernel"):
        from_keras.convert(kernel, recurrent_kernel[:, :-1], bias)
    with pytest.raises(ValueError, match="recurrent_kernel"):
        from_keras.convert(kernel, recurrent_kernel.T, bias)
    with pytest.raises(ValueError, match="kernel"):
        from_keras.convert(kernel[:, :-3], recurrent_kernel, bias)
    with pytest.raises(ValueError, match="kernel"):
        from_keras.convert(kernel.T, recurrent_kernel, bias)
    with pytest.raises(TypeError, match="floating"):
        from_keras.convert(kernel.astype(np.int32), recurrent_kernel, bias)
    with pytest.raises(ValueError, match="got 4 arrays"):
        from_keras.convert_weights([kernel, recurrent_kernel, bias, bias])
    with pytest.raises(TypeError, match="get_weights"):
        from_keras.convert_weights("kernel")


def test_caller_arrays_are_copied_not_modified():
    w = _weights()
    copies = [a.copy() for a in w]
    model = from_keras.convert(*w)
    for a, c in zip(w, copies):
        np.testing.assert_array_equal(a, c)
        a += 1.0  # the model must not see later changes
    y_keras, _ = keras_gru(_x(), *copies)
    np.testing.assert_allclose(model(_x())[0], y_keras, rtol=0, atol=ATOL32)
