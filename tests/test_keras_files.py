"""converters.from_keras.load on tf.keras 2 (.h5) files and on hostile files, built with h5py and zipfile
(no Keras needed here; files written by Keras 3 itself are tested in tests/test_keras_parity.py).

tf.keras 2 layout, as its writer lays it out (keras-team/keras ``keras/saving/hdf5_format.py``, TF 2.x
``save_model_to_hdf5`` / ``save_weights_to_hdf5_group`` / ``save_subset_weights_to_hdf5_group`` /
``save_attributes_to_hdf5_group``), reproduced by :func:`write_tf_keras2_h5`:

- full model: root attributes ``keras_version`` (e.g. b"2.15.0"), ``backend`` (b"tensorflow") and
  ``model_config`` (``json.dumps(config).encode("utf8")``); the weights in group ``model_weights``;
- weights only (``model.save_weights("m.h5")``): the same weights layout at the root, no ``model_config``;
- the weights group has attributes ``layer_names`` (the model's layers, in order, utf-8 bytes),
  ``backend`` and ``keras_version``; an attribute over 64512 bytes is split into ``layer_names0``,
  ``layer_names1``, ...;
- one group per layer (created in sorted name order), with attribute ``weight_names``: the layer's
  trainable then non-trainable weights, in order, by variable name (``gru/gru_cell/kernel:0``,
  ``gru/gru_cell/recurrent_kernel:0``, ``gru/gru_cell/bias:0``; a Bidirectional's forward layer's weights
  then its backward layer's); each weight a dataset at that name inside the layer's group
  (``f.create_dataset(name, val.shape, dtype=val.dtype)``), so ``model_weights/gru/gru/gru_cell/kernel:0``.

Keras loads those by order (``load_weights_from_hdf5_group``).  The outputs are checked against the Keras
GRU equations (``keras_gru`` in tests/test_convert_keras.py) with tf.keras 2's hard_sigmoid,
clip(0.2x + 0.5, 0, 1).
"""

from __future__ import annotations

import json
import re
import zipfile

import h5py
import numpy as np
import pytest

from converters import from_keras
from test_convert_keras import keras_gru

I, H, T, B = 4, 5, 6, 3
ATOL = 1e-5
HDF5_OBJECT_HEADER_LIMIT = 64512


def _rng_arrays(seed, input_size, units, reset_after=True, use_bias=True):
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal((input_size, 3 * units)) * 0.5).astype(np.float32),
              (rng.standard_normal((units, 3 * units)) * 0.5).astype(np.float32)]
    if use_bias:
        arrays.append((rng.standard_normal((2, 3 * units) if reset_after else (3 * units,)) * 0.5)
                      .astype(np.float32))
    return arrays


def _x(scale=1.0, seed=1, features=I):
    return (np.random.default_rng(seed).standard_normal((B, T, features)) * scale).astype(np.float32)


def _gru_config(name, units, **kw):
    """A GRU layer's get_config() as tf.keras 2.15 serializes it."""
    config = {"name": name, "trainable": True, "dtype": "float32", "return_sequences": True,
              "return_state": False, "go_backwards": False, "stateful": False, "unroll": False,
              "time_major": False, "units": units, "activation": "tanh", "recurrent_activation": "sigmoid",
              "use_bias": True, "dropout": 0.0, "recurrent_dropout": 0.0, "reset_after": True}
    config.update(kw)
    return {"module": "keras.layers", "class_name": "GRU", "config": config, "registered_name": None}


def _weight_names(prefix, arrays):
    kinds = ["kernel", "recurrent_kernel", "bias"][: len(arrays)]
    return [(f"{prefix}/{kind}:0", a) for kind, a in zip(kinds, arrays)]


def _save_attributes(group, name, data):
    """``save_attributes_to_hdf5_group``: split a list of names over several attributes when too long."""
    data_npy = np.asarray(data)
    num_chunks = 1
    chunked = np.array_split(data_npy, num_chunks)
    while any(x.nbytes > HDF5_OBJECT_HEADER_LIMIT for x in chunked):
        num_chunks += 1
        chunked = np.array_split(data_npy, num_chunks)
    if num_chunks > 1:
        for index, chunk in enumerate(chunked):
            group.attrs[f"{name}{index}"] = chunk
    else:
        group.attrs[name] = data


def write_tf_keras2_h5(path, layers, *, model_config=None, keras_version="2.15.0"):
    """layers: [(layer name, [(weight name, array), ...]), ...] in model order."""
    with h5py.File(path, "w") as f:
        if model_config is not None:
            f.attrs["keras_version"] = keras_version.encode("utf8")
            f.attrs["backend"] = b"tensorflow"
            f.attrs["model_config"] = json.dumps(model_config).encode("utf8")
            weights = f.create_group("model_weights")
        else:
            weights = f
        _save_attributes(weights, "layer_names", [name.encode("utf8") for name, _ in layers])
        weights.attrs["backend"] = b"tensorflow"
        weights.attrs["keras_version"] = keras_version.encode("utf8")
        for name, named_arrays in sorted(layers, key=lambda item: item[0]):
            group = weights.create_group(name)
            _save_attributes(group, "weight_names", [n.encode("utf8") for n, _ in named_arrays])
            for weight_name, value in named_arrays:
                dataset = group.create_dataset(weight_name, value.shape, dtype=value.dtype)
                dataset[:] = value


def _sequential_config(layers):
    return {"class_name": "Sequential",
            "config": {"name": "sequential", "layers": [
                {"module": "keras.layers", "class_name": "InputLayer",
                 "config": {"batch_input_shape": [None, T, I], "dtype": "float32", "sparse": False,
                            "ragged": False, "name": "input_1"}, "registered_name": None}] + layers},
            "keras_version": "2.15.0", "backend": "tensorflow"}


def _tf2_model(path, *, full_model=True):
    """Sequential: GRU 'gru' (hard_sigmoid gates, go_backwards) -> Dense 'dense' -> Bidirectional(GRU)
    'bidirectional' (reset_after=False) -> GRU 'gru_2' (return_sequences=False)."""
    gru = _rng_arrays(1, I, H)
    dense = [np.random.default_rng(2).standard_normal((H, 3)).astype(np.float32), np.zeros(3, np.float32)]
    fw, bw = _rng_arrays(3, 3, 2, reset_after=False), _rng_arrays(4, 3, 2, reset_after=False)
    last = _rng_arrays(5, 4, 3)
    config = _sequential_config([
        _gru_config("gru", H, recurrent_activation="hard_sigmoid", go_backwards=True),
        {"module": "keras.layers", "class_name": "Dense", "config": {"name": "dense", "units": 3}},
        {"module": "keras.layers", "class_name": "Bidirectional",
         "config": {"name": "bidirectional", "layer": _gru_config("gru_1", 2, reset_after=False),
                    "merge_mode": "concat"}},
        _gru_config("gru_2", 3, return_sequences=False),
    ])
    write_tf_keras2_h5(path, [
        ("gru", _weight_names("gru/gru_cell", gru)),
        ("dense", [("dense/kernel:0", dense[0]), ("dense/bias:0", dense[1])]),
        ("bidirectional", _weight_names("bidirectional/forward_gru_1/gru_cell", fw)
         + _weight_names("bidirectional/backward_gru_1/gru_cell", bw)),
        ("gru_2", _weight_names("gru_2/gru_cell", last)),
    ], model_config=config if full_model else None)
    return {"gru": gru, "dense": dense, "fw": fw, "bw": bw, "last": last}


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# tf.keras 2 files
# ------------------------------------------------------------------------------------------------

def test_tf_keras2_full_model_matches_the_keras_equations(tmp_path):
    w = _tf2_model(tmp_path / "m.h5")
    models = from_keras.load(tmp_path / "m.h5")
    assert list(models) == ["gru", "bidirectional", "gru_2"]
    gru = models["gru"]
    assert gru.provenance["keras_version"] == "2.15.0" and gru.provenance["hard_sigmoid"] == "tf2"
    assert gru.activations[0].alpha == pytest.approx(0.2) and gru.direction == "reverse"

    x = _x(scale=4.0)  # reach the clipped parts of hard_sigmoid
    ref_y, ref_h = keras_gru(x, *w["gru"], recurrent_activation="hard_sigmoid", hard_sigmoid="tf2",
                             go_backwards=True)
    y, h_n = gru(x)
    _close(y[:, ::-1], ref_y)
    _close(h_n[0], ref_h)
    # the test tells the two hard_sigmoids apart: Keras 3's would give other numbers here
    other, _ = keras_gru(x, *w["gru"], recurrent_activation="hard_sigmoid", hard_sigmoid="keras3",
                         go_backwards=True)
    assert np.abs(other - ref_y).max() > 1e-2

    d = ref_y @ w["dense"][0] + w["dense"][1]  # the Dense layer, applied to Keras' sequence
    ref_fw, ref_hfw = keras_gru(d, *w["fw"], reset_after=False)
    ref_bw, ref_hbw = keras_gru(d, *w["bw"], reset_after=False, go_backwards=True)
    y, h_n = models["bidirectional"](d)
    assert models["bidirectional"].linear_before_reset is False
    _close(y, np.concatenate([ref_fw, ref_bw[:, ::-1]], axis=-1))
    _close(h_n[0], ref_hfw)
    _close(h_n[1], ref_hbw)

    _, ref_last = keras_gru(y, *w["last"])
    _, h_n = models["gru_2"](y)
    _close(h_n[0], ref_last)
    assert models["gru_2"].provenance["return_sequences"] is False


def test_tf_keras2_weights_only_file(tmp_path):
    w = _tf2_model(tmp_path / "w.h5", full_model=False)
    with pytest.warns(RuntimeWarning, match="weights only"):
        models = from_keras.load(tmp_path / "w.h5")
    assert list(models) == ["gru", "bidirectional", "gru_2"]
    # defaults assumed: sigmoid gates, forward -- not this model's settings, as the warning says
    assert models["gru"].direction == "forward" and models["gru"].activations is not None
    x = _x()
    ref_y, _ = keras_gru(x, *w["gru"])
    _close(models["gru"](x)[0], ref_y)
    # with the model's config the file reads as the full model does
    config = json.loads(json.dumps(_sequential_config([
        _gru_config("gru", H, recurrent_activation="hard_sigmoid", go_backwards=True),
        {"class_name": "Dense", "config": {"name": "dense", "units": 3}},
        {"class_name": "Bidirectional", "config": {"name": "bidirectional",
                                                   "layer": _gru_config("gru_1", 2, reset_after=False)}},
        _gru_config("gru_2", 3, return_sequences=False)])))
    models = from_keras.load(tmp_path / "w.h5", config=config)
    ref_y, _ = keras_gru(x, *w["gru"], recurrent_activation="hard_sigmoid", hard_sigmoid="tf2", go_backwards=True)
    _close(models["gru"](x)[0][:, ::-1], ref_y)


def test_tf_keras2_split_layer_names_and_time_major(tmp_path):
    """``layer_names`` over 64512 bytes is split into layer_names0, layer_names1, ... by the writer."""
    names = [f"dense_{i:05d}_" + "x" * 200 for i in range(400)]
    w = _rng_arrays(7, I, H)
    layers = [(n, []) for n in names] + [("gru", _weight_names("gru/gru_cell", w))]
    config = _sequential_config([{"class_name": "Dense", "config": {"name": n}} for n in names]
                                + [_gru_config("gru", H, time_major=True)])
    write_tf_keras2_h5(tmp_path / "m.h5", layers, model_config=config)
    with h5py.File(tmp_path / "m.h5") as f:
        assert "layer_names" not in f["model_weights"].attrs and "layer_names1" in f["model_weights"].attrs
    gru = from_keras.load(tmp_path / "m.h5")["gru"]
    assert gru.batch_first is False
    x = _x()
    _close(gru(x.transpose(1, 0, 2))[0].transpose(1, 0, 2), keras_gru(x, *w)[0])
    # and the weights-only reading of the same layout
    write_tf_keras2_h5(tmp_path / "w.h5", layers)
    with pytest.warns(RuntimeWarning):
        assert list(from_keras.load(tmp_path / "w.h5")) == ["gru"]


def test_tf_keras2_nested_model(tmp_path):
    """A nested Sequential is one layer group whose weight_names hold all its layers' weights."""
    w1, w2 = _rng_arrays(8, I, H), _rng_arrays(9, H, 2, use_bias=False)
    inner = {"class_name": "Sequential", "config": {"name": "inner", "layers": [
        _gru_config("gru_a", H), _gru_config("gru_b", 2, use_bias=False)]}}
    config = {"class_name": "Functional", "config": {"name": "model", "layers": [
        {"class_name": "InputLayer", "config": {"name": "input_1"}, "name": "input_1", "inbound_nodes": []},
        {**inner, "name": "inner", "inbound_nodes": [[["input_1", 0, 0, {}]]]}]}}
    write_tf_keras2_h5(tmp_path / "m.h5", [("input_1", []), ("inner", _weight_names("gru_a/gru_cell", w1)
                                                             + _weight_names("gru_b/gru_cell", w2))],
                       model_config=config)
    models = from_keras.load(tmp_path / "m.h5")
    assert list(models) == ["inner/gru_a", "inner/gru_b"]
    assert models["inner/gru_b"].has_bias is False
    x = _x()
    y1 = keras_gru(x, *w1)[0]
    _close(models["inner/gru_a"](x)[0], y1)
    _close(models["inner/gru_b"](y1)[0], keras_gru(y1, *w2, None)[0])


def test_keras1_files_are_refused(tmp_path):
    _tf2_model(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f.attrs["keras_version"] = b"1.2.2"
        f["model_weights"].attrs["keras_version"] = b"1.2.2"
    with pytest.raises(ValueError, match="Keras 1"):
        from_keras.load(tmp_path / "m.h5")


# ------------------------------------------------------------------------------------------------
# hostile and broken files
# ------------------------------------------------------------------------------------------------

def _keras3_weights(path, shape=None, dtype=np.float32):
    """A Keras 3 .weights.h5 holding one GRU, as saving_lib lays it out (layers/gru/cell/vars/0..2);
    ``shape`` declares a kernel of that shape without writing its data."""
    arrays = _rng_arrays(10, I, H)
    with h5py.File(path, "w") as f:
        f.create_group("layers/gru/vars").attrs["name"] = "gru"
        cell = f.create_group("layers/gru/cell/vars")
        for index, array in enumerate(arrays):
            if index == 0 and shape is not None:
                cell.create_dataset("0", shape=shape, dtype=dtype, chunks=True)  # nothing written
            else:
                cell.create_dataset(str(index), data=array.astype(dtype))
        f.create_group("vars").attrs["name"] = "sequential"
    return arrays


def _keras_zip(path, weights_path, extra=(), config=None):
    config = config or {"class_name": "Sequential", "config": {"name": "sequential", "layers": [
        {"class_name": "InputLayer", "config": {"name": "input_layer"}}, _gru_config("gru", H)]}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        archive.writestr("config.json", json.dumps(config))
        archive.write(weights_path, "model.weights.h5")
        for name, data in extra:
            archive.writestr(name, data)


def test_hand_written_keras3_archive_matches_the_equations(tmp_path):
    """The fixture files below are valid: the refusals that follow come from what was changed."""
    arrays = _keras3_weights(tmp_path / "w.h5")
    _keras_zip(tmp_path / "m.keras", tmp_path / "w.h5")
    gru = from_keras.load(tmp_path / "m.keras")["gru"]
    assert gru.provenance["keras_version"] == "3.6.0"
    x = _x()
    _close(gru(x)[0], keras_gru(x, *arrays)[0])


def test_oversized_dataset_declaration_is_refused_before_reading(tmp_path):
    _keras3_weights(tmp_path / "w.h5", shape=(200_000, 300_000))  # 240 GB declared in a small file
    assert (tmp_path / "w.h5").stat().st_size < 100_000
    with pytest.raises(ValueError, match="memory cap"):
        from_keras.load(tmp_path / "w.h5", config=_sequential_config([_gru_config("gru", H)]))
    _keras_zip(tmp_path / "m.keras", tmp_path / "w.h5")
    with pytest.raises(ValueError, match="memory cap"):
        from_keras.load(tmp_path / "m.keras")
    # a genuine file under a cap its datasets exceed (but its size does not)
    _keras3_weights(tmp_path / "ok.h5", shape=(I, 3 * 2000))  # 96 kB declared, chunked and unwritten
    size = (tmp_path / "ok.h5").stat().st_size
    with pytest.raises(ValueError, match="memory cap"):
        from_keras.load(tmp_path / "ok.h5", config=_sequential_config([_gru_config("gru", H)]),
                        max_bytes=size + 1000)
    with pytest.raises(ValueError, match="over the memory cap"):
        from_keras.load(tmp_path / "ok.h5", max_bytes=size - 1)


def test_zip_members_that_escape_are_refused(tmp_path):
    _keras3_weights(tmp_path / "w.h5")
    for bad in ("../escape.txt", "/etc/passwd", "assets/../../x", "C:evil"):
        _keras_zip(tmp_path / "m.keras", tmp_path / "w.h5", extra=[(bad, b"x")])
        with pytest.raises(ValueError, match=f"zip member '{re.escape(bad)}' is an absolute path or contains"):
            from_keras.load(tmp_path / "m.keras")


def test_zip_member_sizes_are_checked_against_the_cap(tmp_path):
    _keras3_weights(tmp_path / "w.h5")
    _keras_zip(tmp_path / "m.keras", tmp_path / "w.h5", extra=[("assets/pad.bin", b"\0" * 2_000_000)])
    with pytest.raises(ValueError, match="memory cap"):
        from_keras.load(tmp_path / "m.keras", max_bytes=1_000_000)
    with zipfile.ZipFile(tmp_path / "z.keras", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": []}}))
        archive.write(tmp_path / "w.h5", "model.weights.h5")
        archive.writestr("assets/bomb.bin", b"\0" * 5_000_000)  # compresses to a few kB
    assert (tmp_path / "z.keras").stat().st_size < 1_000_000
    with pytest.raises(ValueError, match="memory cap"):
        from_keras.load(tmp_path / "z.keras", max_bytes=1_000_000)


def test_links_and_storage_outside_the_file_are_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("k", data=np.zeros((I, 3 * H), np.float32))
    config = _sequential_config([_gru_config("gru", H)])
    arrays = _rng_arrays(10, I, H)

    def build(path, how):
        with h5py.File(path, "w") as f:
            cell = f.create_group("layers/gru/cell/vars")
            if how == "external link":
                cell["0"] = h5py.ExternalLink(str(other), "k")
            elif how == "soft link":
                f.create_dataset("elsewhere", data=arrays[0])
                cell["0"] = h5py.SoftLink("/elsewhere")
            else:  # external raw storage: the dataset's bytes live in another file
                raw = tmp_path / "raw.bin"
                raw.write_bytes(arrays[0].tobytes())
                cell.create_dataset("0", shape=arrays[0].shape, dtype=np.float32,
                                    external=[(str(raw), 0, arrays[0].nbytes)])
            cell.create_dataset("1", data=arrays[1])
            cell.create_dataset("2", data=arrays[2])

    for how, message in (("external link", "ExternalLink"), ("soft link", "SoftLink"),
                         ("external storage", "other files")):
        build(tmp_path / "m.h5", how)
        with pytest.raises(ValueError, match=message):
            from_keras.load(tmp_path / "m.h5", config=config)


def test_truncated_and_garbage_files_give_value_errors(tmp_path):
    _tf2_model(tmp_path / "m.h5")
    _keras3_weights(tmp_path / "w.h5")
    _keras_zip(tmp_path / "m.keras", tmp_path / "w.h5")
    for name in ("m.h5", "m.keras"):
        data = (tmp_path / name).read_bytes()
        for cut in (8, 100, len(data) // 3, len(data) // 2, len(data) - 200):
            (tmp_path / f"cut_{name}").write_bytes(data[:cut])
            with pytest.raises(ValueError):
                from_keras.load(tmp_path / f"cut_{name}")
    # a whole zip whose weights member is cut short
    weights = (tmp_path / "w.h5").read_bytes()
    (tmp_path / "cut_w.h5").write_bytes(weights[: len(weights) // 2])
    _keras_zip(tmp_path / "inner_cut.keras", tmp_path / "cut_w.h5")
    with pytest.raises(ValueError, match="model.weights.h5: not a readable HDF5 file"):
        from_keras.load(tmp_path / "inner_cut.keras")
    (tmp_path / "junk.h5").write_bytes(b"not a model at all" * 10)
    with pytest.raises(ValueError, match="neither a .keras zip archive nor an HDF5"):
        from_keras.load(tmp_path / "junk.h5")
    with pytest.raises(ValueError, match="not a regular file"):
        from_keras.load(tmp_path)


def test_hostile_configs_are_refused(tmp_path):
    _keras3_weights(tmp_path / "w.h5")
    cases = [
        (_gru_config("gru", H, go_backwards="yes"), "go_backwards='yes'"),
        (_gru_config("gru", "five"), "units='five'"),
        (_gru_config("gru", H, activation="swish"), "swish"),
        (_gru_config("gru", H, activation={"class_name": "function", "config": "my_activation"}),
         "my_activation"),
        (_gru_config("gru", H, use_bias=False), "use_bias=False"),
        # a serialized hard_sigmoid in a file that records no Keras version: which one is meant is unknown
        (_gru_config("gru", H, recurrent_activation={"class_name": "function", "config": "hard_sigmoid"}),
         "keras_version='3' or '2'"),
    ]
    for layer, message in cases:
        with pytest.raises(ValueError, match=message):
            from_keras.load(tmp_path / "w.h5", config=_sequential_config([layer]))
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nests deeper"):
        from_keras.load(tmp_path / "w.h5", config=deep)
    with pytest.raises(TypeError, match="config must be"):
        from_keras.load(tmp_path / "w.h5", config=[1, 2])
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes"):
            from_keras.load(tmp_path / "w.h5", max_bytes=bad)


def test_non_float_weights_are_refused(tmp_path):
    _keras3_weights(tmp_path / "w.h5", shape=(I, 3 * H), dtype=np.int32)
    with pytest.raises(ValueError, match="floating-point"):
        from_keras.load(tmp_path / "w.h5", config=_sequential_config([_gru_config("gru", H)]))


def test_non_gru_tf_keras2_model_lists_its_layers(tmp_path):
    config = _sequential_config([
        {"class_name": "LSTM", "config": {"name": "lstm"}},
        {"class_name": "Lambda", "config": {"name": "lam", "function": ["garbage", None, None]}},
        {"class_name": "Dense", "config": {"name": "dense"}}])
    write_tf_keras2_h5(tmp_path / "m.h5", [("lstm", []), ("lam", []), ("dense", [])], model_config=config)
    with pytest.raises(ValueError, match=r"no GRU layer.*lstm \(LSTM\), lam \(Lambda\), dense \(Dense\)"):
        from_keras.load(tmp_path / "m.h5")


def test_cli_reads_a_tf_keras2_file(tmp_path, capsys):
    from gru_fast.cli import main

    _tf2_model(tmp_path / "m.h5")
    assert main(["info", str(tmp_path / "m.h5"), "--node", "bidirectional"]) == 0
    out = capsys.readouterr().out
    assert "bidirectional" in out and "gru_2" not in out
    (tmp_path / "bad.keras").write_bytes(b"PK\x03\x04 truncated")
    assert main(["info", str(tmp_path / "bad.keras")]) == 1
    err = capsys.readouterr().err
    assert "bad.keras" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# mutation fuzz
# ------------------------------------------------------------------------------------------------

_FUZZ_CHILD = r'''
import io, json, sys, tempfile, warnings, zipfile, pathlib
sys.path.insert(0, "tests")
import h5py
import numpy as np
import test_keras_files as t
from converters import from_keras

warnings.simplefilter("ignore", RuntimeWarning)
d = pathlib.Path(tempfile.mkdtemp())
t._tf2_model(d / "m.h5")
t._keras3_weights(d / "w.h5")
t._keras_zip(d / "m.keras", d / "w.h5")
KINDS = ("kernel", "recurrent_kernel", "bias")
LEGACY = {"gru": ["model_weights/gru/gru/gru_cell"],
          "bidirectional": ["model_weights/bidirectional/bidirectional/forward_gru_1/gru_cell",
                            "model_weights/bidirectional/bidirectional/backward_gru_1/gru_cell"],
          "gru_2": ["model_weights/gru_2/gru_2/gru_cell"]}

def direct(path, name, key):
    """The layer's arrays read with plain h5py at the paths the writer used: [[k, rk, b] per direction]."""
    if name == "m.h5":
        with h5py.File(path, "r") as f:
            return [[f[f"{p}/{k}:0"][()] for k in KINDS] for p in LEGACY[key]]
    blob = zipfile.ZipFile(path).read("model.weights.h5") if name == "m.keras" else path.read_bytes()
    with h5py.File(io.BytesIO(blob), "r") as f:
        assert key == "gru", key
        return [[f[f"layers/gru/cell/vars/{i}"][()] for i in range(3)]]

rng = np.random.default_rng(int(sys.argv[1]))
counts = {"loaded": 0, "refused": 0, "no_authority": 0}
for name in ("m.h5", "m.keras", "w.h5"):
    data = (d / name).read_bytes()
    for _ in range(int(sys.argv[2])):
        m = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:
            for _ in range(rng.integers(1, 8)):
                m[rng.integers(len(m))] = rng.integers(256)
        elif kind == 1:
            m[rng.integers(len(m))] ^= 1 << int(rng.integers(8))
        elif kind == 2:
            p, n = rng.integers(len(m)), rng.integers(1, 64)
            m[p:p + n] = bytes([int(rng.choice([0, 255, 127, 128]))]) * n
        else:
            p = rng.integers(len(m))
            del m[p:p + rng.integers(1, 32)]
        path = d / ("mut_" + name)
        path.write_bytes(bytes(m))
        config = json.dumps(t._sequential_config([t._gru_config("gru", t.H)])) if name == "w.h5" else None
        try:
            models = from_keras.load(path, config=config, max_bytes=1 << 20)
        except (ValueError, TypeError):
            counts["refused"] += 1
            continue
        counts["loaded"] += 1
        for key, model in models.items():
            try:
                expected = direct(path, name, key)
            except Exception:
                counts["no_authority"] += 1
                continue
            W, R, B = model.onnx_weights()[0]
            for k, (kernel, recurrent, bias) in enumerate(expected):
                np.testing.assert_array_equal(W[k], kernel.T, err_msg=f"{name} {key}")
                np.testing.assert_array_equal(R[k], recurrent.T, err_msg=f"{name} {key}")
                np.testing.assert_array_equal(B[k][: bias.size], bias.reshape(-1), err_msg=f"{name} {key}")
print(json.dumps(counts))
'''


def test_mutated_files_load_faithfully_or_are_refused():
    """Random byte overwrites, bit flips, runs of 0x00/0xFF/0x7F/0x80 and deletions in a tf.keras 2 .h5, a
    .keras and a Keras 3 .weights.h5, loaded in a child process (so a crash in the HDF5 library fails the
    test): each mutated file is refused with ValueError / TypeError, or loads weights equal to the ones
    plain h5py reads at the paths the writer used."""
    from conftest import last_json_line, run_python

    counts = last_json_line(run_python(_FUZZ_CHILD.replace("sys.argv[1]", "0").replace("sys.argv[2]", "150")))
    assert counts["loaded"] + counts["refused"] == 450
    assert counts["refused"] > 50 and counts["loaded"] > 50  # both branches are exercised
