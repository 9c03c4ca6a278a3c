"""Keras -> gru_fast converters, from plain numpy arrays (no TensorFlow or Keras needed).

A Keras ``GRU`` layer holds ``kernel`` (I, 3H), ``recurrent_kernel`` (H, 3H) and ``bias``, with the gates
stacked in the order (z, r, h) -- the ONNX order -- along the last axis.  ``layer.get_weights()`` returns
``[kernel, recurrent_kernel, bias]`` (``[kernel, recurrent_kernel]`` when ``use_bias=False``).

The cell, as written in the Keras 3 source (``keras/src/layers/rnn/gru.py``, ``GRUCell.call``, identical in
tf.keras 2.x ``keras/layers/rnn/gru.py``)::

    matrix_x = x @ kernel + input_bias
    reset_after=True  (bias (2, 3H) = [input_bias, recurrent_bias]):
        matrix_inner = h @ recurrent_kernel + recurrent_bias
        z = rec_act(x_z + inner_z); r = rec_act(x_r + inner_r)
        hh = act(x_h + r * inner_h)
    reset_after=False (bias (3H,) = input_bias; there is no recurrent bias):
        z, r as above with inner = h @ recurrent_kernel[:, :2H]
        hh = act(x_h + (r * h) @ recurrent_kernel[:, 2H:])
    h_new = z * h + (1 - z) * hh

which is ONNX's GRU with W = kernel.T, R = recurrent_kernel.T, B = [input_bias, recurrent_bias] and
``linear_before_reset = reset_after``.

Keras layers are batch-major, so converted models default to ``batch_first=True``: x is (B, T, I).
"""

from __future__ import annotations

import numpy as np

__all__ = ["convert", "convert_weights", "convert_bidirectional", "convert_config", "KERAS_ACTIVATIONS"]

# Keras activation name -> (ONNX name, alpha, beta).  None means "depends on hard_sigmoid=".
KERAS_ACTIVATIONS = {
    "tanh": ("Tanh", None, None),
    "sigmoid": ("Sigmoid", None, None),
    "relu": ("Relu", None, None),
    "linear": ("Affine", 1.0, 0.0),
    "softsign": ("Softsign", None, None),
    "softplus": ("Softplus", None, None),
    "elu": ("Elu", 1.0, None),
    "leaky_relu": ("LeakyRelu", 0.2, None),  # Keras 3 negative_slope=0.2; tf.nn.leaky_relu alpha=0.2
    "hard_sigmoid": ("HardSigmoid", None, None),
}

# hard_sigmoid(x) = clip(alpha * x + beta, 0, 1)
#   Keras 3 (keras/src/backend/*/nn.py): x / 6 + 0.5 clipped to [0, 1]  (= relu6(x + 3) / 6 exactly in
#   real arithmetic; the two float forms can differ by an ulp)
#   tf.keras <= 2.15 (keras/backend.py hard_sigmoid): 0.2 * x + 0.5 clipped to [0, 1]
_HARD_SIGMOID = {"keras3": (1.0 / 6.0, 0.5), "tf2": (0.2, 0.5)}

_DEFAULT_PAIR = ("Sigmoid", "Tanh")


def _activation_name(value, role):
    if value is None:
        return "linear"  # Keras: "If you pass None, no activation is applied"
    if isinstance(value, dict):  # a serialized activation from a layer config
        inner = value.get("config", value.get("class_name"))
        if isinstance(inner, dict):
            inner = inner.get("name")
        value = inner
    if not isinstance(value, str):
        raise TypeError(f"{role}: expected a Keras activation name such as 'tanh', got {type(value).__name__}; "
                        "custom callables cannot be converted")
    name = value.lower()
    if name not in KERAS_ACTIVATIONS:
        raise ValueError(f"{role}: Keras activation {value!r} has no ONNX GRU equivalent; supported: "
                         f"{', '.join(sorted(KERAS_ACTIVATIONS))}")
    return name


def _onnx_activations(activation, recurrent_activation, hard_sigmoid, num_directions):
    """-> (names, alphas, betas) for gru_fast.GRU, or (None, None, None) for the default pair."""
    resolved = []
    for value, role in ((recurrent_activation, "recurrent_activation"), (activation, "activation")):
        name = _activation_name(value, role)
        onnx_name, alpha, beta = KERAS_ACTIVATIONS[name]
        if name == "hard_sigmoid":
            if hard_sigmoid not in _HARD_SIGMOID:
                raise ValueError(f"{role}='hard_sigmoid' means clip(x/6 + 0.5, 0, 1) in Keras 3 but "
                                 "clip(0.2*x + 0.5, 0, 1) in tf.keras <= 2.15: pass hard_sigmoid='keras3' or "
                                 f"hard_sigmoid='tf2' (got {hard_sigmoid!r})")
            alpha, beta = _HARD_SIGMOID[hard_sigmoid]
        resolved.append((onnx_name, alpha, beta))
    if tuple(r[0] for r in resolved) == _DEFAULT_PAIR:
        return None, None, None
    # Spell out every direction and every parameter so nothing depends on defaults or queue sharing.
    resolved = resolved * num_directions
    names = [r[0] for r in resolved]
    alphas = [r[1] for r in resolved if r[1] is not None]
    betas = [r[2] for r in resolved if r[2] is not None]
    return names, alphas or None, betas or None


def _as_float_array(value, name):
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()  # a Keras / TF variable or tensor, if the caller has one
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {array.dtype}")
    return array


def _direction_arrays(kernel, recurrent_kernel, bias, reset_after, where=""):
    """Keras arrays of one GRU direction -> (W (3H, I), R (3H, H), B (6H,) or None), float64 or float32."""
    kernel = _as_float_array(kernel, f"{where}kernel")
    recurrent_kernel = _as_float_array(recurrent_kernel, f"{where}recurrent_kernel")
    if recurrent_kernel.ndim != 2 or recurrent_kernel.shape[1] != 3 * recurrent_kernel.shape[0] \
            or recurrent_kernel.shape[0] == 0:
        raise ValueError(f"{where}recurrent_kernel: expected shape (H, 3*H), got {recurrent_kernel.shape}")
    hidden = recurrent_kernel.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 3 * hidden:
        raise ValueError(f"{where}kernel: expected shape (input_size, {3 * hidden}) (I, 3*H with H={hidden} "
                         f"from recurrent_kernel), got {kernel.shape}")
    arrays = [kernel, recurrent_kernel]
    if bias is not None:
        bias = _as_float_array(bias, f"{where}bias")
        arrays.append(bias)
        if reset_after:
            if bias.shape != (2, 3 * hidden):
                hint = " (a (3H,) bias belongs to reset_after=False)" if bias.shape == (3 * hidden,) else ""
                raise ValueError(f"{where}bias: reset_after=True expects shape (2, {3 * hidden}) "
                                 f"[input bias, recurrent bias], got {bias.shape}{hint}")
            onnx_bias = bias.reshape(6 * hidden)
        else:
            if bias.shape != (3 * hidden,):
                hint = " (a (2, 3H) bias belongs to reset_after=True)" if bias.shape == (2, 3 * hidden) else ""
                raise ValueError(f"{where}bias: reset_after=False expects shape ({3 * hidden},) (input bias "
                                 f"only), got {bias.shape}{hint}")
            onnx_bias = np.concatenate([bias, np.zeros_like(bias)])  # Keras has no recurrent bias here
    dtype = np.float64 if all(a.dtype == np.float64 for a in arrays) else np.float32
    W = np.ascontiguousarray(kernel.T, dtype=dtype)
    R = np.ascontiguousarray(recurrent_kernel.T, dtype=dtype)
    B = None if bias is None else np.ascontiguousarray(onnx_bias, dtype=dtype)
    return W, R, B


def _make_model(directions, *, direction, reset_after, activation, recurrent_activation, hard_sigmoid,
                batch_first, provenance):
    import gru_fast

    dtype = np.float64 if all(a.dtype == np.float64 for d in directions for a in d if a is not None) \
        else np.float32
    if any(d[2] is not None for d in directions) and any(d[2] is None for d in directions):
        directions = [(W, R, B if B is not None else np.zeros(2 * R.shape[0], dtype)) for W, R, B in directions]
    has_bias = directions[0][2] is not None
    W = np.stack([d[0] for d in directions]).astype(dtype, copy=False)
    R = np.stack([d[1] for d in directions]).astype(dtype, copy=False)
    B = np.stack([d[2] for d in directions]).astype(dtype, copy=False) if has_bias else None
    names, alphas, betas = _onnx_activations(activation, recurrent_activation, hard_sigmoid, len(directions))
    return gru_fast.GRU(
        [(W, R, B)],
        direction=direction,
        linear_before_reset=bool(reset_after),
        activations=names,
        activation_alpha=alphas,
        activation_beta=betas,
        batch_first=bool(batch_first),
        dtype="float64" if dtype == np.float64 else "float32",
        provenance=provenance,
    )


def _check_kw(hard_sigmoid):
    if hard_sigmoid is not None and hard_sigmoid not in _HARD_SIGMOID:
        raise ValueError(f"hard_sigmoid must be 'keras3' or 'tf2', got {hard_sigmoid!r}")


def convert(kernel, recurrent_kernel, bias=None, *, reset_after=True, activation="tanh",
            recurrent_activation="sigmoid", hard_sigmoid=None, go_backwards=False, batch_first=True,
            return_sequences=None, _source="arrays"):
    """Convert one Keras ``GRU`` layer's weights (numpy arrays) to a gru_fast.GRU.

    Parameters
    ----------
    kernel : (I, 3H) array, gates z, r, h along the last axis.
    recurrent_kernel : (H, 3H) array.
    bias : (2, 3H) array for ``reset_after=True`` ([input bias, recurrent bias]), (3H,) for
        ``reset_after=False`` (input bias only; the recurrent bias is zero), or None (``use_bias=False``).
    reset_after : the layer's setting; True -> ``linear_before_reset=True``, False -> False.
    activation, recurrent_activation : Keras activation names ('tanh', 'sigmoid', 'relu', 'linear' or None,
        'softsign', 'softplus', 'elu', 'leaky_relu', 'hard_sigmoid').  ``recurrent_activation`` is ONNX's f
        (gates), ``activation`` is g (candidate).
    hard_sigmoid : 'keras3' (clip(x/6 + 0.5, 0, 1)) or 'tf2' (clip(0.2x + 0.5, 0, 1), tf.keras <= 2.15).
        Required when either activation is 'hard_sigmoid'; ignored otherwise.
    go_backwards : the layer's setting.  The converted model has ``direction="reverse"``: it reads the
        sequence from the last step to the first, as Keras does, but its ``y`` is aligned with the input
        time axis: ``y[:, t]`` is the state after consuming steps T-1 .. t.  Keras with
        ``return_sequences=True`` returns the outputs in processing order, i.e. reversed:
        ``keras_y == y[:, ::-1]`` (batch_first).  Keras' last output (``return_sequences=False``) and final
        state equal ``h_n[0] == y[:, 0]``.  ``go_backwards=False`` gives ``direction="forward"`` and
        ``keras_y == y``.
    batch_first : default True, because Keras inputs are (batch, time, features).
    return_sequences : irrelevant (accepted and ignored): the model always returns the whole sequence
        ``y`` and the final state ``h_n``; Keras' ``return_sequences=False`` output is ``h_n[0]``.

    Keras masking is not converted; pass ``lengths=`` to the model instead.  ``h_n`` then matches the
    masked Keras final state for right-padded masks; padded steps of ``y`` are 0 here (Keras repeats the
    previous output there).
    """
    _check_kw(hard_sigmoid)
    W, R, B = _direction_arrays(kernel, recurrent_kernel, bias, reset_after)
    return _make_model(
        [(W, R, B)], direction="reverse" if go_backwards else "forward", reset_after=reset_after,
        activation=activation, recurrent_activation=recurrent_activation, hard_sigmoid=hard_sigmoid,
        batch_first=batch_first,
        provenance={"framework": "keras", "source": _source, "reset_after": bool(reset_after),
                    "go_backwards": bool(go_backwards), "hard_sigmoid": hard_sigmoid})


def _split_weights(weights, where=""):
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{where}weights: expected a list [kernel, recurrent_kernel, bias] "
                        f"(layer.get_weights()), got {type(weights).__name__}")
    weights = list(weights)
    if len(weights) == 3:
        return weights[0], weights[1], weights[2]
    if len(weights) == 2:
        return weights[0], weights[1], None
    raise ValueError(f"{where}weights: expected [kernel, recurrent_kernel, bias] or [kernel, recurrent_kernel] "
                     f"(use_bias=False), got {len(weights)} arrays")


def convert_weights(weights, **kw):
    """``convert(*weights, **kw)`` for the list ``layer.get_weights()`` returns:
    ``[kernel, recurrent_kernel, bias]``, or ``[kernel, recurrent_kernel]`` when ``use_bias=False``."""
    kernel, recurrent_kernel, bias = _split_weights(weights)
    kw.setdefault("_source", "weights")
    return convert(kernel, recurrent_kernel, bias, **kw)


def convert_bidirectional(forward_weights, backward_weights, merge_mode="concat", *, reset_after=True,
                          activation="tanh", recurrent_activation="sigmoid", hard_sigmoid=None,
                          batch_first=True, return_sequences=None):
    """Convert ``keras.layers.Bidirectional(GRU(...), merge_mode="concat")``.

    ``forward_weights`` / ``backward_weights``: each ``[kernel, recurrent_kernel, bias]`` (the wrapper's
    ``get_weights()`` is the forward list followed by the backward list).  The wrapper runs its backward
    layer with ``go_backwards=True`` and flips that layer's output sequence back before concatenating, so
    the result is exactly a bidirectional ONNX GRU: ``y[..., :H]`` forward, ``y[..., H:]`` backward, both
    aligned with the input time axis, equal to Keras' output; ``h_n[0]`` / ``h_n[1]`` are the forward /
    backward final states (Keras' ``return_state`` order).  Both directions share the given settings.

    Only ``merge_mode="concat"`` is converted (the engine's output layout); for "sum", "mul", "ave" or
    None, convert with "concat" and combine ``y[..., :H]`` and ``y[..., H:]`` yourself -- other modes
    raise ValueError rather than silently returning a different shape.
    """
    _check_kw(hard_sigmoid)
    if merge_mode != "concat":
        raise ValueError(f"merge_mode={merge_mode!r} is not supported: the engine returns the 'concat' layout "
                         "[forward, backward]; convert with merge_mode='concat' and combine y[..., :H] and "
                         "y[..., H:] yourself")
    fw = _direction_arrays(*_split_weights(forward_weights, "forward "), reset_after, "forward ")
    bw = _direction_arrays(*_split_weights(backward_weights, "backward "), reset_after, "backward ")
    if fw[0].shape != bw[0].shape:
        raise ValueError(f"forward and backward layers differ in shape: kernel.T {fw[0].shape} vs {bw[0].shape}")
    return _make_model(
        [fw, bw], direction="bidirectional", reset_after=reset_after, activation=activation,
        recurrent_activation=recurrent_activation, hard_sigmoid=hard_sigmoid, batch_first=batch_first,
        provenance={"framework": "keras", "source": "bidirectional", "reset_after": bool(reset_after),
                    "merge_mode": "concat", "hard_sigmoid": hard_sigmoid})


def convert_config(config, weights, *, hard_sigmoid=None, keras_version=None):
    """Convert from a Keras GRU layer's ``get_config()`` dict and its ``get_weights()`` list.

    Reads ``reset_after``, ``activation``, ``recurrent_activation``, ``go_backwards``, ``use_bias``,
    ``units`` and (tf.keras) ``time_major``.  ``hard_sigmoid`` may instead be inferred from
    ``keras_version`` (e.g. the ``keras_version`` in a ``.keras`` file's metadata.json): "3.x" -> 'keras3',
    "2.x" -> 'tf2'.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (layer.get_config()), got {type(config).__name__}")
    if isinstance(config.get("config"), dict) and "class_name" in config:  # a serialized layer
        config = config["config"]
    if hard_sigmoid is None and keras_version is not None:
        major = str(keras_version).split(".")[0]
        if major == "3":
            hard_sigmoid = "keras3"
        elif major in ("1", "2"):
            hard_sigmoid = "tf2"
    kernel, recurrent_kernel, bias = _split_weights(weights)
    if config.get("use_bias", True) and bias is None:
        raise ValueError("config says use_bias=True but weights hold no bias")
    if not config.get("use_bias", True) and bias is not None:
        raise ValueError("config says use_bias=False but weights hold a bias")
    model = convert(kernel, recurrent_kernel, bias,
                    reset_after=config.get("reset_after", True),
                    activation=config.get("activation", "tanh"),
                    recurrent_activation=config.get("recurrent_activation", "sigmoid"),
                    hard_sigmoid=hard_sigmoid,
                    go_backwards=config.get("go_backwards", False),
                    batch_first=not config.get("time_major", False),
                    _source="config")
    units = config.get("units")
    if units is not None and units != model.hidden_size:
        raise ValueError(f"config units={units} but recurrent_kernel has H={model.hidden_size}")
    return model
