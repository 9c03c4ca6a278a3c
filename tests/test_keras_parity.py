"""converters.from_keras.load against Keras itself: real files written by Keras 3 (torch backend) and the
Keras model's own outputs as the authority.

Every model here is built and given random weights (biases included) with Keras, saved in the formats
Keras 3 writes -- ``model.save("m.keras")``, the legacy ``model.save("m.h5")`` and
``model.save_weights("m.weights.h5")`` -- and loaded back with :func:`from_keras.load`, which reads the
files with json and h5py only.  The converted GRUs are then run on the inputs Keras' GRU layers saw and
compared with what the Keras model returned for those layers, within 1e-5 (float32).

Keras 2 (tf.keras) files cannot be written by Keras 3; tests/test_keras_files.py builds them with h5py.
"""

from __future__ import annotations

import json
import os
import zipfile

os.environ["KERAS_BACKEND"] = "torch"  # Keras 3 on the installed torch; TensorFlow is not used anywhere

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from converters import from_keras  # noqa: E402

# Keras 3 on numpy 2 warns about __array__'s copy keyword on every weight it converts
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

I, H, T, B = 4, 5, 6, 3
ATOL = 1e-5
L = keras.layers
FORMATS = ["keras", "h5", "weights"]


def _x(scale=1.0, seed=1, features=I):
    return (np.random.default_rng(seed).standard_normal((B, T, features)) * scale).astype(np.float32)


def _np(value):
    return keras.ops.convert_to_numpy(value)


def _randomize(model, seed=0):
    """Random weights for every variable, biases too (Keras initialises them to zero)."""
    rng = np.random.default_rng(seed)
    model.set_weights([(rng.standard_normal(w.shape) * 0.5).astype(w.dtype) for w in model.get_weights()])
    return model


def _outputs(model, x):
    out = model(x)
    return [_np(o) for o in out] if isinstance(out, (list, tuple)) else _np(out)


def _save_and_load(model, tmp_path, fmt, **kw):
    if fmt == "keras":
        path = tmp_path / "m.keras"
        model.save(path)
        return from_keras.load(path, **kw)
    if fmt == "h5":
        path = tmp_path / "m.h5"
        model.save(path)  # Keras 3's legacy HDF5 writer (a warning says it is legacy)
        return from_keras.load(path, **kw)
    path = tmp_path / "m.weights.h5"
    model.save_weights(path)
    return from_keras.load(path, config=model.to_json(), keras_version=keras.__version__, **kw)


def _close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------
# GRU layers in Sequential and functional models
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("reset_after", [True, False])
def test_sequential_single_gru(tmp_path, fmt, reset_after):
    model = _randomize(keras.Sequential([keras.Input((T, I)),
                                         L.GRU(H, return_sequences=True, reset_after=reset_after, name="g")]))
    models = _save_and_load(model, tmp_path, fmt)
    assert list(models) == ["g"]
    gru = models["g"]
    assert gru.linear_before_reset is reset_after and gru.batch_first and gru.direction == "forward"
    assert gru.provenance["return_sequences"] is True and gru.provenance["keras_version"] == keras.__version__
    x = _x()
    y, h_n = gru(x)
    expected = _outputs(model, x)
    _close(y, expected)
    _close(h_n[0], expected[:, -1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_stacked_grus_and_go_backwards(tmp_path, fmt):
    model = _randomize(keras.Sequential([
        keras.Input((T, I)),
        L.GRU(H, return_sequences=True, name="g1"),
        L.GRU(H + 1, return_sequences=True, go_backwards=True, reset_after=False, name="g2"),
        L.GRU(3, name="g3"),  # return_sequences=False: the last output
    ]), seed=3)
    models = _save_and_load(model, tmp_path, fmt)
    assert list(models) == ["g1", "g2", "g3"]
    assert models["g2"].direction == "reverse" and models["g2"].provenance["go_backwards"] is True
    x = _x()
    y1, _ = models["g1"](x)
    _close(y1, _outputs(keras.Sequential(model.layers[:1]), x))
    y2, h2 = models["g2"](y1)
    keras_y2 = _outputs(keras.Sequential(model.layers[:2]), x)
    _close(y2[:, ::-1], keras_y2)  # Keras returns a go_backwards sequence in processing order
    _close(h2[0], keras_y2[:, -1])
    _, h3 = models["g3"](keras_y2)  # the next layer reads Keras' (reversed) sequence
    _close(h3[0], _outputs(model, x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_functional_gru_in_the_middle_with_return_state(tmp_path, fmt):
    inp = keras.Input((T, I))
    d = L.Dense(7, activation="relu", name="d")(inp)
    seq, state = L.GRU(H, return_sequences=True, return_state=True, name="g")(d)
    head = L.Dense(2, name="head")(seq)
    model = _randomize(keras.Model(inp, [d, seq, state, head]), seed=4)
    models = _save_and_load(model, tmp_path, fmt)
    assert list(models) == ["g"]
    gru = models["g"]
    assert gru.provenance["return_state"] is True and gru.input_size == 7
    x = _x()
    keras_d, keras_seq, keras_state, _ = _outputs(model, x)
    y, h_n = gru(keras_d)
    _close(y, keras_seq)
    _close(h_n[0], keras_state)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("return_sequences", [True, False])
def test_bidirectional_concat(tmp_path, fmt, return_sequences):
    inp = keras.Input((T, I))
    out = L.Bidirectional(L.GRU(H, return_sequences=return_sequences, return_state=True, reset_after=False),
                          name="bi")(inp)
    model = _randomize(keras.Model(inp, out), seed=5)
    models = _save_and_load(model, tmp_path, fmt)
    gru = models["bi"]
    assert gru.direction == "bidirectional" and gru.provenance["merge_mode"] == "concat"
    assert gru.linear_before_reset is False
    x = _x()
    keras_y, keras_h_fw, keras_h_bw = _outputs(model, x)
    y, h_n = gru(x)
    _close(h_n[0], keras_h_fw)
    _close(h_n[1], keras_h_bw)
    if return_sequences:
        _close(y, keras_y)
    else:
        _close(np.concatenate([h_n[0], h_n[1]], axis=-1), keras_y)


@pytest.mark.parametrize("merge_mode", ["sum", "mul", "ave", None])
def test_bidirectional_other_merge_modes(tmp_path, merge_mode):
    model = _randomize(keras.Sequential([keras.Input((T, I)),
                                         L.Bidirectional(L.GRU(H, return_sequences=True), merge_mode=merge_mode,
                                                         name="bi")]), seed=6)
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match="merge_mode.*other_merge_modes='concat'"):
        from_keras.load(tmp_path / "m.keras")
    gru = from_keras.load(tmp_path / "m.keras", other_merge_modes="concat")["bi"]
    assert gru.provenance["merge_mode"] == merge_mode
    x = _x()
    y, _ = gru(x)
    a, b = y[..., :H], y[..., H:]
    expected = _outputs(model, x)
    combined = {"sum": lambda: a + b, "mul": lambda: a * b, "ave": lambda: (a + b) / 2}
    if merge_mode is None:
        _close(a, expected[0])
        _close(b, expected[1])
    else:
        _close(combined[merge_mode](), expected)


@pytest.mark.parametrize("activation, recurrent_activation", [
    ("tanh", "hard_sigmoid"),
    ("relu", "sigmoid"),
    ("softsign", "hard_sigmoid"),
])
@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_activations_from_the_config(tmp_path, fmt, activation, recurrent_activation):
    model = _randomize(keras.Sequential([keras.Input((T, I)),
                                         L.GRU(H, return_sequences=True, activation=activation,
                                               recurrent_activation=recurrent_activation, name="g")]), seed=7)
    gru = _save_and_load(model, tmp_path, fmt)["g"]
    if recurrent_activation == "hard_sigmoid":
        # Keras 3 wrote the file: its hard_sigmoid is clip(x/6 + 0.5, 0, 1)
        assert gru.provenance["hard_sigmoid"] == "keras3"
        assert gru.activations[0].name == "HardSigmoid" and gru.activations[0].alpha == pytest.approx(1 / 6)
    x = _x(scale=4.0)  # reach the clipped parts of hard_sigmoid
    expected = _outputs(model, x)
    _close(gru(x)[0], expected, atol=ATOL * max(1.0, float(np.abs(expected).max())))


# ------------------------------------------------------------------------------------------------
# nested models, Lambda layers, weights-only files
# ------------------------------------------------------------------------------------------------

def _nested_model():
    inp = keras.Input((T, I))
    x = L.Dense(6, name="d")(inp)
    inner = keras.Sequential([keras.Input((T, 6)), L.GRU(H, return_sequences=True, name="g_in")], name="inner")
    x = inner(x)
    x = L.Lambda(lambda t: t * 2.0, name="lam")(x)
    x = L.GRU(3, return_sequences=True, name="g_out")(x)
    return _randomize(keras.Model(inp, x), seed=8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_model_and_lambda_layer(tmp_path, fmt):
    model = _nested_model()
    models = _save_and_load(model, tmp_path, fmt)
    assert list(models) == ["inner/g_in", "g_out"]
    x = _x()
    inner_in = _outputs(keras.Model(model.input, model.get_layer("d").output), x)
    inner_out = _outputs(keras.Model(model.input, model.get_layer("inner").output), x)
    _close(models["inner/g_in"](inner_in)[0], inner_out)
    _close(models["g_out"](inner_out * 2.0)[0], _outputs(model, x))  # the Lambda ran in Keras only


def test_lambda_code_is_never_decoded(tmp_path):
    """The Lambda's serialized bytecode is replaced by bytes that are not code at all; the loader never looks
    at it, so loading still works (Keras' own loader would refuse it in safe mode, or run it)."""
    model = _nested_model()
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    lam = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Lambda")
    lam["config"]["function"]["config"]["code"] = "not base64 bytecode; raise SystemExit"
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(tmp_path / "tampered.keras", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert list(from_keras.load(tmp_path / "tampered.keras")) == ["inner/g_in", "g_out"]


def test_weights_only_file_without_config_assumes_keras_defaults(tmp_path):
    model = _randomize(keras.Sequential([keras.Input((T, I)), L.GRU(H, return_sequences=True, name="g"),
                                         L.Bidirectional(L.GRU(2, return_sequences=True), name="bi")]), seed=9)
    model.save_weights(tmp_path / "m.weights.h5")
    with pytest.warns(RuntimeWarning, match="weights only.*defaults"):
        models = from_keras.load(tmp_path / "m.weights.h5")
    assert sorted(models) == ["bi", "g"]  # a weights file records no layer order
    assert models["g"].provenance["settings"].startswith("Keras defaults")
    x = _x()
    y, _ = models["g"](x)
    _close(y, _outputs(keras.Sequential(model.layers[:1]), x))
    _close(models["bi"](y)[0], _outputs(model, x))


def test_weights_only_file_needs_the_version_for_hard_sigmoid(tmp_path):
    model = _randomize(keras.Sequential([keras.Input((T, I)),
                                         L.GRU(H, return_sequences=True, recurrent_activation="hard_sigmoid",
                                               name="g")]))
    model.save_weights(tmp_path / "m.weights.h5")
    with pytest.raises(ValueError, match="hard_sigmoid.*keras_version"):
        from_keras.load(tmp_path / "m.weights.h5", config=model.get_config())
    gru = from_keras.load(tmp_path / "m.weights.h5", config=model.get_config(), keras_version="3")["g"]
    x = _x(scale=4.0)
    _close(gru(x)[0], _outputs(model, x))


def test_non_gru_model_lists_its_layers(tmp_path):
    model = keras.Sequential([keras.Input((T, I)), L.LSTM(3, return_sequences=True, name="lstm"),
                              L.Bidirectional(L.SimpleRNN(2), name="bi_rnn"), L.Dense(1, name="d")])
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match=r"no GRU layer.*lstm \(LSTM\).*bi_rnn \(Bidirectional\(SimpleRNN\)\)"
                                         r".*d \(Dense\)"):
        from_keras.load(tmp_path / "m.keras")


def test_file_that_does_not_match_its_config(tmp_path):
    model = _randomize(keras.Sequential([keras.Input((T, I)), L.GRU(H, return_sequences=True, name="g")]))
    other = keras.Sequential([keras.Input((T, I)), L.GRU(H + 1, return_sequences=True, name="g")])
    model.save_weights(tmp_path / "m.weights.h5")
    with pytest.raises(ValueError, match="units=6 but recurrent_kernel has H=5"):
        from_keras.load(tmp_path / "m.weights.h5", config=other.to_json())


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------

def test_cli_info_convert_and_run(tmp_path, capsys):
    from gru_fast.cli import main

    model = _nested_model()
    model.save(tmp_path / "m.keras")
    assert main(["info", str(tmp_path / "m.keras")]) == 0
    out = capsys.readouterr().out
    assert "inner/g_in" in out and "g_out" in out
    (tmp_path / "out").mkdir()
    assert main(["convert", str(tmp_path / "m.keras"), "-o", str(tmp_path / "out")]) == 0
    converted = sorted((tmp_path / "out").iterdir())
    assert len(converted) == 2
    import gru_fast

    restored = {gru_fast.load(p).provenance["layer"] for p in converted}
    assert restored == {"inner/g_in", "g_out"}
    x = _x()
    inner_out = _outputs(keras.Model(model.input, model.get_layer("inner").output), x)
    np.save(tmp_path / "x.npy", inner_out * 2.0)
    assert main(["run", str(tmp_path / "m.keras"), "--node", "g_out", "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "y.npy"), "--no-progress"]) == 0
    _close(np.load(tmp_path / "y.npy"), _outputs(model, x))
    assert main(["run", str(tmp_path / "m.keras"), "--node", "nope", "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "z.npy")]) == 1
    assert "no GRU layer named 'nope'" in capsys.readouterr().err


def test_same_layer_name_in_two_nested_models(tmp_path):
    inp = keras.Input((T, I))
    a = keras.Sequential([keras.Input((T, I)), L.GRU(H, return_sequences=True, name="g")], name="a")
    b = keras.Sequential([keras.Input((T, H)), L.GRU(2, return_sequences=True, name="g")], name="b")
    model = _randomize(keras.Model(inp, b(a(inp))), seed=11)
    models = _save_and_load(model, tmp_path, "keras")
    assert list(models) == ["a/g", "b/g"]
    model.save_weights(tmp_path / "w.weights.h5")
    with pytest.warns(RuntimeWarning):
        weights_only = from_keras.load(tmp_path / "w.weights.h5")
    assert len(weights_only) == 2  # keyed by name, then by path where the name is taken
    x = _x()
    y_a = _outputs(keras.Model(inp, model.layers[1].output), x)
    _close(models["a/g"](x)[0], y_a)
    _close(models["b/g"](y_a)[0], _outputs(model, x))
    by_input = {m.input_size: m for m in weights_only.values()}
    _close(by_input[I](x)[0], y_a)
    _close(by_input[H](y_a)[0], _outputs(model, x))
