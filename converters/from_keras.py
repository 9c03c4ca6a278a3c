"""Keras -> gru_fast converters, from numpy arrays or from Keras files (no TensorFlow or Keras needed).

:func:`convert` and friends take a layer's arrays; :func:`load` reads every GRU layer of a ``.keras`` or
``.h5`` file with json and h5py (the file formats: :mod:`converters._keras_files`).

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

from gru_fast._files import DEFAULT_MAX_BYTES, check_max_bytes, model_file

__all__ = ["convert", "convert_weights", "convert_bidirectional", "convert_config", "load", "KERAS_ACTIVATIONS",
           "DEFAULT_MAX_BYTES"]

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


def _hard_sigmoid_for(keras_version):
    """The hard_sigmoid of the Keras that wrote a file: "3.x" -> 'keras3', "1.x" / "2.x" -> 'tf2', else None."""
    if keras_version is None:
        return None
    major = str(keras_version).strip().split(".")[0]
    return "keras3" if major == "3" else "tf2" if major in ("1", "2") else None


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
    if hard_sigmoid is None:
        hard_sigmoid = _hard_sigmoid_for(keras_version)
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


# --------------------------------------------------------------------------------------------------
# files: .keras and .h5
# --------------------------------------------------------------------------------------------------

_MODEL_CLASSES = ("Sequential", "Functional", "Model")
_GRU_CLASSES = ("GRU",)
_WEIGHT_KINDS = ("kernel", "recurrent_kernel", "bias")


@model_file("keras")
def load(path, *, config=None, keras_version=None, other_merge_modes="refuse", max_bytes=DEFAULT_MAX_BYTES):
    """Convert every GRU layer of a Keras model file to a :class:`gru_fast.GRU`, reading the file with
    json and h5py only (``pip install 'gru_fast[keras]'``); Keras and TensorFlow are never imported and
    nothing in the file is run: a ``Lambda`` layer's code is never touched, the configs are JSON.

    Files (recognised by their first bytes): ``.keras`` (Keras 3: a zip of config.json, metadata.json and
    model.weights.h5), ``.h5`` full models (tf.keras 2 ``model.save("m.h5")``, Keras 3's legacy h5),
    ``.h5`` weights files (tf.keras 2 ``model.save_weights("m.h5")``) and ``.weights.h5`` (Keras 3
    ``model.save_weights``).  The file layouts are described in :mod:`converters._keras_files`.

    Layers converted: ``GRU`` and ``Bidirectional(GRU)``, at any depth of Sequential and functional
    models (nested models included).  Every other layer is left out; the models returned are the GRU
    layers alone, to be run where the Keras model ran them.

    Parameters
    ----------
    path : str or os.PathLike
    config : dict or str, optional
        The model's configuration (``model.get_config()``, or the JSON text of ``model.to_json()``).  A
        weights-only file records no settings; without ``config`` its GRUs are converted with Keras'
        defaults (activation tanh, recurrent_activation sigmoid, go_backwards False, reset_after read
        from the bias shape) and a RuntimeWarning says so.  Given for a full-model file, it replaces the
        file's configuration.
    keras_version : str, optional
        The Keras version that wrote the file, which fixes what ``hard_sigmoid`` means (Keras 3:
        clip(x/6 + 0.5, 0, 1); tf.keras 2: clip(0.2x + 0.5, 0, 1)).  Read from metadata.json (.keras)
        or the ``keras_version`` attribute (.h5) when not given; a Keras 3 .weights.h5 records none.
    other_merge_modes : "refuse" or "concat"
        ``Bidirectional`` with ``merge_mode`` "sum", "mul", "ave" or None is refused by default: the
        engine returns the "concat" layout ``y = [forward, backward]`` (B, T, 2H).  With "concat" such
        layers are converted to that layout, and the caller combines the halves ``a = y[..., :H]``,
        ``b = y[..., H:]`` as Keras did: sum ``a + b``, mul ``a * b``, ave ``(a + b) / 2``, None
        ``[a, b]``; ``provenance["merge_mode"]`` records the layer's mode.
    max_bytes : int
        Memory cap (default 2 GiB): a larger file is refused unread; zip members' declared sizes and each
        HDF5 dataset's declared size (shape x itemsize) are checked against it before they are read.

    Returns
    -------
    dict[str, gru_fast.GRU]
        Keyed by layer name (``"outer/inner"`` for a layer inside a nested model), in the model's layer
        order (a Keras 3 weights-only file records no order: its layers come in the file's order).  Each model is batch-major (``batch_first=True``) unless the layer had ``time_major``.

    What Keras returned, from the engine's ``y, h_n = model(x)`` (``h_n`` is (D, B, H))
        - ``GRU(return_sequences=True)``: ``y``, or ``y[:, ::-1]`` with ``go_backwards=True`` (Keras
          returns that layer's outputs in processing order, the engine aligns them with the input);
        - ``GRU(return_sequences=False)``: ``h_n[0]`` (the last output is the final state);
        - ``return_state=True`` adds the final state ``h_n[0]``;
        - ``Bidirectional(merge_mode="concat")``: ``y`` with ``return_sequences=True``, else
          ``concatenate([h_n[0], h_n[1]], -1)``; ``return_state=True`` adds ``h_n[0], h_n[1]``.
        ``provenance`` records ``return_sequences``, ``return_state``, ``go_backwards`` and the rest.

    Not converted: Keras masking (pass ``lengths=`` instead), dropout (inference ignores it), a stateful
    layer's carried state (pass ``h0=``), ``RNN(GRUCell)``, ``TimeDistributed``, subclassed models, Keras
    1 files, and a Bidirectional whose forward layer has ``go_backwards=True``.

    Raises
    ------
    ValueError
        For a file that is not a Keras file, truncated or corrupt bytes, sizes over ``max_bytes``, links,
        zip members or storage pointing outside the file, no GRU layer (the message lists the layers
        found), and settings the engine cannot honour (the message names the layer).
    """
    from . import _keras_files

    max_bytes = check_max_bytes(max_bytes)
    if other_merge_modes not in ("refuse", "concat"):
        raise ValueError(f"other_merge_modes must be 'refuse' or 'concat', got {other_merge_modes!r}")
    if config is not None:
        if isinstance(config, (str, bytes)):
            config = _keras_files.parse_json(config, "config")
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (model.get_config()) or JSON text (model.to_json()), "
                            f"got {type(config).__name__}")
    with _keras_files.open_keras_file(path, max_bytes) as kf:
        try:
            return _convert_file(kf, config, keras_version, other_merge_modes)
        except (OSError, RuntimeError, KeyError, IndexError, AttributeError) as exc:
            # h5py raises these for damaged HDF5 structures (bad heaps, addresses past the end); a config
            # of unexpected shape raises the last three
            raise ValueError(f"{kf.source}: unreadable or inconsistent Keras file ({type(exc).__name__}: "
                             f"{exc})") from None


def _convert_file(kf, config, keras_version, other_merge_modes):
    version = keras_version if keras_version is not None else kf.keras_version
    if kf.legacy and version is not None and str(version).strip().startswith("1"):
        raise ValueError(f"{kf.source}: written by Keras {version}; Keras 1 files (per-gate GRU weights) "
                         "are not supported: load and re-save the model with Keras 2 or 3")
    model_config = config if config is not None else kf.config
    if model_config is None:
        found, seen = _find_without_config(kf)
        if found:
            import warnings

            warnings.warn(f"{kf.source} holds weights only: its GRU settings (activations, go_backwards, "
                          "Bidirectional merge mode) are not recorded, so Keras' defaults were assumed; "
                          "pass config=model.to_json() to use the model's own", RuntimeWarning, stacklevel=3)
    else:
        found, seen = _find_in_config(kf, model_config)
    if not found:
        listing = ", ".join(seen[:40]) + (f", ... ({len(seen)} in all)" if len(seen) > 40 else "")
        raise ValueError(f"{kf.source}: no GRU layer found (GRU and Bidirectional(GRU) are converted); "
                         f"layers found: {listing or 'none'}")
    hard_sigmoid = _hard_sigmoid_for(version)
    models = {}
    for entry in found:
        models[entry["key"]] = _entry_model(kf, entry, hard_sigmoid, version, other_merge_modes)
    return models


# ----- the model's layers, from its config ------------------------------------------------------------

def _find_in_config(kf, model_config):
    """-> ([entry, ...] for each GRU / Bidirectional layer, ["name (Class)", ...] of every layer seen)."""
    found, seen = [], []
    top = model_config
    if "class_name" not in top and "layers" in top:  # a bare get_config() of a model
        # a functional model's config names its inputs and outputs; a Sequential's does not
        top = {"class_name": "Functional" if "input_layers" in top else "Sequential", "config": top}
    cls = top.get("class_name")
    if cls not in _MODEL_CLASSES and not isinstance(_inner_config(top).get("layers"), list):
        # a single layer saved as the model (rare); treat it as a one-layer Functional
        top = {"class_name": "Functional", "config": {"layers": [top]}}
    _walk_layers(kf, top, keys=(), k3_path="", legacy_top=None, found=found, seen=seen, depth=0)
    return found, seen


def _inner_config(layer):
    cfg = layer.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _layer_list(model):
    cfg = model.get("config")
    if isinstance(cfg, list):  # old Keras 2 Sequential configs: the layer list itself
        return cfg
    layers = _inner_config(model).get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"model config of class {model.get('class_name')!r} has no layer list")
    return layers


def _walk_layers(kf, model, *, keys, k3_path, legacy_top, found, seen, depth):
    from ._keras_files import snake_case

    if depth > 20:
        raise ValueError(f"{kf.source}: models nested more than 20 deep")
    layers = _layer_list(model)
    sequential = model.get("class_name") == "Sequential"
    used = {}
    for index, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
            raise ValueError(f"{kf.source}: layer #{index} of {'/'.join(keys) or 'the model'} is not a "
                             "serialized Keras layer")
        cls = layer["class_name"]
        name = _inner_config(layer).get("name", layer.get("name"))
        if not isinstance(name, str) or not name:
            name = f"{snake_case(cls)}_{index}"
        # Keras 3's Sequential.layers leaves out its leading InputLayer, so the weights file does too
        if sequential and index == 0 and cls == "InputLayer":
            seen.append(f"{name} (InputLayer)")
            continue
        base = snake_case(cls)
        slot = base if base not in used else f"{base}_{used[base] + 1}"
        used[base] = used.get(base, -1) + 1
        path = f"{k3_path}layers/{slot}"
        key = "/".join(keys + (name,))
        top = legacy_top if legacy_top is not None else name
        if cls in _MODEL_CLASSES or (isinstance(_inner_config(layer).get("layers"), list)
                                     and cls not in ("Bidirectional", "TimeDistributed")):
            seen.append(f"{key} ({cls})")
            _walk_layers(kf, layer, keys=keys + (name,), k3_path=path + "/", legacy_top=top, found=found,
                         seen=seen, depth=depth + 1)
            continue
        inner = _inner_config(layer).get("layer")
        if cls in _GRU_CLASSES or (cls == "Bidirectional" and isinstance(inner, dict)
                                   and inner.get("class_name") in _GRU_CLASSES):
            found.append({"key": key, "name": name, "class_name": cls, "config": _inner_config(layer),
                          "k3_path": path, "legacy_top": top, "nested": legacy_top is not None})
        elif cls == "Bidirectional" and isinstance(inner, dict):
            seen.append(f"{key} (Bidirectional({inner.get('class_name')}))")
        elif cls == "RNN" and isinstance(_inner_config(layer).get("cell"), dict):
            seen.append(f"{key} (RNN({_inner_config(layer)['cell'].get('class_name')}), not converted)")
        else:
            seen.append(f"{key} ({cls})")


def _flag(cfg, key, default, where):
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: config {key}={value!r} is not true/false")
    return value


def _settings(cfg, where):
    """A GRU layer config -> the settings the conversion uses, type-checked."""
    units = cfg.get("units")
    if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units <= 0):
        raise ValueError(f"{where}: config units={units!r} is not a positive integer")
    reset_after = cfg.get("reset_after")
    if reset_after is not None and not isinstance(reset_after, bool):
        raise ValueError(f"{where}: config reset_after={reset_after!r} is not true/false")
    return {
        "units": units,
        "reset_after": reset_after,  # None: read from the bias shape
        "use_bias": _flag(cfg, "use_bias", True, where),
        "activation": cfg.get("activation", "tanh"),
        "recurrent_activation": cfg.get("recurrent_activation", "sigmoid"),
        "go_backwards": _flag(cfg, "go_backwards", False, where),
        "time_major": _flag(cfg, "time_major", False, where),
        "return_sequences": _flag(cfg, "return_sequences", False, where),
        "return_state": _flag(cfg, "return_state", False, where),
        "stateful": _flag(cfg, "stateful", False, where),
    }


# ----- weights-only files -----------------------------------------------------------------------------

_DEFAULT_SETTINGS = {"class_name": "GRU", "config": {}}


def _find_without_config(kf):
    """GRU-shaped weights of a weights-only file -> entries with Keras' default settings."""
    from . import _keras_files as kfiles

    found, seen = [], []
    if kf.kind == "h5-weights":
        for name in kfiles.read_name_list(kf.weights, "layer_names", kf.source):
            layer = kfiles.group(kf.weights, name, kf.source)
            names = kfiles.read_name_list(layer, "weight_names", kf.source)
            split = _legacy_split(kf, layer, names, bidirectional=len(names) in (4, 6)
                                  and any("backward" in n for n in names[len(names) // 2:]))
            if split is None:
                seen.append(name)
                continue
            cls = "Bidirectional" if len(split) == 2 else "GRU"
            config = {"name": name, "layer": _DEFAULT_SETTINGS} if cls == "Bidirectional" else {"name": name}
            found.append({"key": name, "name": name, "class_name": cls, "config": config, "legacy_top": name,
                          "nested": False, "defaults": True})
        return found, seen

    import h5py

    def walk(node, path, depth):
        if depth > 40:
            raise ValueError(f"{kf.source}: groups nested more than 40 deep")
        members = kfiles.children(node, kf.source)
        name = _k3_name(kf, path) or path
        if any(entry["key"] == name for entry in found):  # layers of nested models may share a name
            name = path
        if "forward_layer" in members and "backward_layer" in members \
                and _k3_gru_shaped(kf, f"{path}/forward_layer") and _k3_gru_shaped(kf, f"{path}/backward_layer"):
            found.append({"key": name, "name": name, "class_name": "Bidirectional", "k3_path": path,
                          "config": {"name": name, "layer": _DEFAULT_SETTINGS}, "defaults": True})
            return
        if "cell" in members and _k3_gru_shaped(kf, path):
            found.append({"key": name, "name": name, "class_name": "GRU", "k3_path": path,
                          "config": {"name": name}, "defaults": True})
            return
        if path and "vars" in members and ("layers" in path.split("/")[-2:-1]):
            seen.append(name)
        for member in members:
            if member == "vars":
                continue
            child = kfiles.resolve(kf.weights, f"{path}/{member}", kf.source)
            if isinstance(child, h5py.Group):
                walk(child, f"{path}/{member}".lstrip("/"), depth + 1)

    walk(kf.weights, "", 0)
    return found, seen


def _k3_name(kf, path):
    from . import _keras_files as kfiles

    variables = kfiles.resolve(kf.weights, f"{path}/vars", kf.source)
    if variables is not None and "name" in variables.attrs:
        name = kfiles.read_attr(variables, "name", kf.source)
        return name if isinstance(name, str) else None
    return None


def _k3_var_names(kf, path):
    """The dataset names '0', '1', ... under ``path``, in numeric order; None when ``path`` is absent."""
    import h5py

    from . import _keras_files as kfiles

    node = kfiles.resolve(kf.weights, path, kf.source)
    if not isinstance(node, h5py.Group):
        return None
    names = kfiles.children(node, kf.source)
    if not all(n.isdigit() for n in names) or sorted(int(n) for n in names) != list(range(len(names))):
        raise ValueError(f"{kf.source}: {path!r} holds {names}, not the variables '0', '1', ... Keras writes")
    return [str(i) for i in range(len(names))]


def _k3_gru_shaped(kf, path):
    from . import _keras_files as kfiles

    names = _k3_var_names(kf, f"{path}/cell/vars")
    if names is None or len(names) not in (2, 3):
        return False
    _, recurrent = kfiles.dataset_shape(kf.weights, f"{path}/cell/vars/1", kf.source)
    return len(recurrent) == 2 and recurrent[1] == 3 * recurrent[0]


# ----- reading one layer's weights ------------------------------------------------------------------

def _k3_arrays(kf, path, where):
    from . import _keras_files as kfiles

    names = _k3_var_names(kf, f"{path}/cell/vars")
    if names is None:
        raise ValueError(f"{where}: the weights file has no {path}/cell/vars (the file does not match its "
                         "config, or the model is not a Sequential or functional model)")
    if len(names) not in (2, 3):
        raise ValueError(f"{where}: {path}/cell/vars holds {len(names)} arrays; a GRU cell has 3 "
                         "(kernel, recurrent_kernel, bias), or 2 without bias")
    return [kfiles.read_dataset(kf.weights, f"{path}/cell/vars/{n}", kf.budget, where) for n in names]


def _legacy_kind(weight_name):
    last = weight_name.rsplit("/", 1)[-1]
    return last[:-2] if last.endswith(":0") else last


def _legacy_split(kf, layer_group, names, *, bidirectional):
    """Legacy weight names -> [[kernel, recurrent_kernel(, bias)]] (one list per direction) of names, or None
    when they are not a GRU's.  Keras loads these by order (``load_weights_from_hdf5_group``; a
    Bidirectional's first half is the forward layer), so order decides; the names' last components and
    the recurrent kernel's shape (H, 3H) confirm the reading."""
    from . import _keras_files as kfiles

    halves = [names[: len(names) // 2], names[len(names) // 2:]] if bidirectional else [names]
    for half in halves:
        kinds = [_legacy_kind(n) for n in half]
        if kinds not in (list(_WEIGHT_KINDS), list(_WEIGHT_KINDS[:2])):
            return None
        _, recurrent = kfiles.dataset_shape(layer_group, half[1], kf.source)
        if len(recurrent) != 2 or recurrent[1] != 3 * recurrent[0]:
            return None
    return halves


def _legacy_arrays(kf, entry, where):
    from . import _keras_files as kfiles

    top = kfiles.group(kf.weights, entry["legacy_top"], where)
    names = kfiles.read_name_list(top, "weight_names", where)
    if entry["nested"]:  # a nested model's group holds all its layers' weights: take this layer's
        names = [n for n in names if entry["name"] in n.split("/")]
    bidirectional = entry["class_name"] == "Bidirectional"
    split = _legacy_split(kf, top, names, bidirectional=bidirectional)
    if split is None:
        raise ValueError(f"{where}: the file's weights for this layer are {names}; expected "
                         f"{'two sets of ' if bidirectional else ''}kernel, recurrent_kernel and (optionally) "
                         "bias with recurrent_kernel of shape (H, 3H)")
    return [[kfiles.read_dataset(top, n, kf.budget, where) for n in half] for half in split]


def _entry_model(kf, entry, hard_sigmoid, version, other_merge_modes):
    where = f"{kf.source}: layer {entry['key']!r}"
    cfg = entry["config"]
    bidirectional = entry["class_name"] == "Bidirectional"
    merge_mode = "concat"
    if bidirectional:
        merge_mode = cfg.get("merge_mode", "concat")
        if merge_mode not in ("concat", "sum", "mul", "ave", None):
            raise ValueError(f"{where}: unknown Bidirectional merge_mode={merge_mode!r}")
        if merge_mode != "concat" and other_merge_modes == "refuse":
            raise ValueError(f"{where}: Bidirectional merge_mode={merge_mode!r} is not converted: the engine "
                             "returns the 'concat' layout y = [forward, backward]; load(..., "
                             "other_merge_modes='concat') converts it to that layout and you combine "
                             "y[..., :H] and y[..., H:] as Keras does (sum a+b, mul a*b, ave (a+b)/2, None [a, b])")
        forward_cfg = _inner_config(cfg["layer"])
        backward = cfg.get("backward_layer")
        if isinstance(backward, dict):
            if backward.get("class_name") not in _GRU_CLASSES:
                raise ValueError(f"{where}: the backward layer is a {backward.get('class_name')!r}, not a GRU")
            backward_cfg = _inner_config(backward)
        else:  # Keras builds the backward layer from the forward config with go_backwards flipped
            backward_cfg = {**forward_cfg, "go_backwards": not forward_cfg.get("go_backwards", False)}
        settings = [_settings(forward_cfg, where + " (forward)"), _settings(backward_cfg, where + " (backward)")]
        if settings[0]["go_backwards"] or not settings[1]["go_backwards"]:
            raise ValueError(f"{where}: a Bidirectional whose forward layer has go_backwards=True is not "
                             "converted (Keras then returns the forward half in reversed order)")
        for key in ("reset_after", "activation", "recurrent_activation", "units", "time_major"):
            if settings[0][key] != settings[1][key]:
                raise ValueError(f"{where}: forward and backward layers differ in {key} "
                                 f"({settings[0][key]!r} vs {settings[1][key]!r}); the engine runs both "
                                 "directions with the same settings")
    else:
        settings = [_settings(cfg, where)]
    if entry.get("k3_path") is not None and not kf.legacy:
        name = _k3_name(kf, entry["k3_path"])
        if name is not None and not entry.get("defaults") and name != entry["name"]:
            raise ValueError(f"{where}: the weights file holds layer {name!r} at {entry['k3_path']}, where the "
                             "config places this layer; the file does not match its config")
        paths = [entry["k3_path"] + "/forward_layer", entry["k3_path"] + "/backward_layer"] if bidirectional \
            else [entry["k3_path"]]
        weights = [_k3_arrays(kf, p, where) for p in paths]
    else:
        weights = _legacy_arrays(kf, entry, where)

    s = settings[0]
    try:
        activations = (_activation_name(s["activation"], "activation"),
                       _activation_name(s["recurrent_activation"], "recurrent_activation"))
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if "hard_sigmoid" in activations and hard_sigmoid is None:
        raise ValueError(f"{where}: uses hard_sigmoid, which is clip(x/6 + 0.5, 0, 1) in Keras 3 and "
                         "clip(0.2x + 0.5, 0, 1) in tf.keras 2, and the file does not record its Keras version "
                         f"({version!r}); pass keras_version='3' or '2'")
    arrays, inferred = [], None
    for settings_d, w in zip(settings, weights):
        kernel, recurrent_kernel, bias = _split_weights(w, where + " ")
        if settings_d["use_bias"] != (bias is not None):
            raise ValueError(f"{where}: config says use_bias={settings_d['use_bias']} but the file holds "
                             f"{len(w)} arrays")
        reset_after = settings_d["reset_after"]
        if reset_after is None:  # not in the config: the bias shape tells, (2, 3H) or (3H,)
            reset_after = bias is None or np.ndim(bias) == 2
        if arrays and reset_after != inferred:
            raise ValueError(f"{where}: the forward and backward layers' biases differ in form (reset_after)")
        inferred = reset_after
        arrays.append(_direction_arrays(kernel, recurrent_kernel, bias, reset_after, where + " "))
        hidden = arrays[-1][1].shape[1]
        if settings_d["units"] is not None and settings_d["units"] != hidden:
            raise ValueError(f"{where}: config units={settings_d['units']} but recurrent_kernel has H={hidden}")
    if bidirectional and arrays[0][0].shape != arrays[1][0].shape:
        raise ValueError(f"{where}: forward and backward kernels differ in shape")
    provenance = {
        "framework": "keras", "source": kf.source, "layer": entry["key"], "class_name": entry["class_name"],
        "keras_version": None if version is None else str(version), "reset_after": bool(reset_after),
        "go_backwards": s["go_backwards"], "return_sequences": s["return_sequences"],
        "return_state": s["return_state"], "stateful": s["stateful"],
        "hard_sigmoid": hard_sigmoid if "hard_sigmoid" in activations else None,
    }
    if bidirectional:
        provenance["merge_mode"] = merge_mode
    if entry.get("defaults"):
        provenance["settings"] = "Keras defaults (weights-only file)"
    direction = "bidirectional" if bidirectional else "reverse" if s["go_backwards"] else "forward"
    try:
        return _make_model(arrays, direction=direction, reset_after=reset_after, activation=s["activation"],
                           recurrent_activation=s["recurrent_activation"], hard_sigmoid=hard_sigmoid,
                           batch_first=not s["time_major"], provenance=provenance)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
