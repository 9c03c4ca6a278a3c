"""gru_fast.save / gru_fast.load: a plain .npz that round-trips every field and never runs code.

Authority: the original model: every field of the loaded model equals the saved one (weights bitwise via
onnx_weights(), configuration, provenance), and outputs are bitwise equal.  Malformed files (object arrays,
missing members, a wrong format version, not a zip) are refused with ValueError (API contract).
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

import gru_fast
from conftest import convert_torch, random_onnx_weights, torch_gru


def _onnx_style_model(rng):
    """float64, bidirectional, lbr=0, per-direction activations with parameters, clip, batch_first,
    no bias, 2 layers."""
    layers = [random_onnx_weights(rng, 2, 3 if l == 0 else 8, 4, bias=False, dtype=np.float64) for l in range(2)]
    return gru_fast.GRU(layers, direction="bidirectional", linear_before_reset=False,
                        activations=["HardSigmoid", "ScaledTanh", "LeakyRelu", "Affine"],
                        activation_alpha=[0.25, 0.75, 0.0625, 0.875], activation_beta=[0.5, 1.25, 0.125],
                        clip=2.5, batch_first=True,
                        provenance={"framework": "onnx", "node": "gru_1", "opset": 14, "tags": ["a", "b"],
                                    "nested": {"ok": True, "none": None}})


def _reverse_model(rng):
    layers = [random_onnx_weights(rng, 1, 5, 3, dtype=np.float32)]
    return gru_fast.GRU(layers, direction="reverse", activations=["Sigmoid", "Elu"], activation_alpha=[0.5])


def _torch_model(rng):
    return convert_torch(torch_gru(4, 6, 3, bidirectional=False, seed=1))


MODELS = {"onnx_bidirectional_f64": _onnx_style_model, "reverse_f32": _reverse_model,
          "torch_3_layers_f32": _torch_model}


def _fields(model):
    return dict(
        input_size=model.input_size, hidden_size=model.hidden_size, num_layers=model.num_layers,
        num_directions=model.num_directions, direction=model.direction, bidirectional=model.bidirectional,
        batch_first=model.batch_first, linear_before_reset=model.linear_before_reset,
        activations=tuple(tuple(a) for a in model.activations), clip=model.clip, dtype=np.dtype(model.dtype),
        has_bias=model.has_bias, provenance=model.provenance,
    )


def _inputs(model, rng):
    T, B = 6, 3
    shape = (B, T, model.input_size) if model.batch_first else (T, B, model.input_size)
    x = rng.standard_normal(shape).astype(model.dtype)
    h0 = rng.standard_normal((model.num_layers * model.num_directions, B, model.hidden_size)).astype(model.dtype)
    return x, h0, np.array([6, 0, 3])


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_keeps_every_field(name, rng, tmp_path):
    model = MODELS[name](rng)
    path = tmp_path / "model.npz"
    gru_fast.save(model, path)
    loaded = gru_fast.load(path)
    assert isinstance(loaded, gru_fast.GRU)
    assert _fields(loaded) == _fields(model)
    for (W0, R0, B0), (W1, R1, B1) in zip(model.onnx_weights(), loaded.onnx_weights(), strict=True):
        for a, b in ((W0, W1), (R0, R1)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        assert (B0 is None) == (B1 is None)
        if B0 is not None:
            assert B0.dtype == B1.dtype and np.array_equal(B0, B1)
    x, h0, lengths = _inputs(model, rng)
    for args in ((x,), (x, h0), (x, h0, lengths)):
        y0, h0_n = model(*args)
        y1, h1_n = loaded(*args)
        assert np.array_equal(y0, y1) and np.array_equal(h0_n, h1_n)


def test_round_trip_accepts_str_paths_and_is_stable(rng, tmp_path):
    """Saving the loaded model again writes the same arrays."""
    model = _onnx_style_model(rng)
    first, second = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    gru_fast.save(model, first)
    gru_fast.save(gru_fast.load(first), second)
    with np.load(first, allow_pickle=False) as a, np.load(second, allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def test_file_is_plain_npz_without_pickles(rng, tmp_path):
    """np.load(allow_pickle=False) reads every member; none is an object array."""
    model = _onnx_style_model(rng)
    path = tmp_path / "m.npz"
    gru_fast.save(model, path)
    with np.load(path, allow_pickle=False) as archive:
        assert archive.files
        for key in archive.files:
            arr = archive[key]
            assert not arr.dtype.hasobject, key


# --------------------------------------------------------------------------------------------------
# malformed files -> ValueError
# --------------------------------------------------------------------------------------------------

def _members(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _config_key(members):
    """The member holding the JSON configuration (found by content, not by name)."""
    for key, arr in members.items():
        if arr.dtype == np.uint8 or arr.dtype.kind in "SU":
            try:
                text = arr.tobytes().decode() if arr.dtype == np.uint8 else str(arr)
                config = json.loads(text)
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(config, dict):
                return key, config
    raise AssertionError(f"no JSON configuration member among {sorted(members)}")


def _write(path, members, *, allow_pickle=False):
    buffer = io.BytesIO()
    np.savez(buffer, **members)
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def saved(rng, tmp_path):
    model = _reverse_model(rng)
    path = tmp_path / "good.npz"
    gru_fast.save(model, path)
    return path, _members(path)


def test_object_array_member_is_refused(saved, tmp_path):
    path, members = saved
    weight_key = next(k for k, v in members.items() if v.dtype.kind == "f")
    bad = dict(members)
    bad[weight_key] = np.array([object(), 1.0], dtype=object)[1:]  # pickled by np.savez
    target = tmp_path / "object.npz"
    _write(target, bad)
    with pytest.raises(ValueError):
        gru_fast.load(target)


def test_extra_object_member_is_refused_or_ignored_without_unpickling(saved, tmp_path):
    """A pickled member the format does not name must never be unpickled; a pickle that would run code
    on load proves it (the loader may refuse the file with ValueError or ignore the member)."""
    path, members = saved
    bad = dict(members)
    bad["extra"] = np.array([_Boom()], dtype=object)
    target = tmp_path / "extra.npz"
    _write(target, bad)
    _Boom.triggered = False
    try:
        gru_fast.load(target)
    except ValueError:
        pass
    assert _Boom.triggered is False


class _Boom:
    triggered = False

    def __reduce__(self):
        return (_trigger, ())


def _trigger():
    _Boom.triggered = True
    return None


@pytest.mark.parametrize("which", ["weight", "config"])
def test_missing_member_is_refused(saved, tmp_path, which):
    path, members = saved
    config_key, _ = _config_key(members)
    if which == "config":
        drop = config_key
    else:
        drop = next(k for k, v in members.items() if v.dtype.kind == "f")
    bad = {k: v for k, v in members.items() if k != drop}
    target = tmp_path / f"missing_{which}.npz"
    _write(target, bad)
    with pytest.raises(ValueError):
        gru_fast.load(target)


def test_missing_config_key_is_refused(saved, tmp_path):
    path, members = saved
    key, config = _config_key(members)
    for missing in ("direction", "activations", "dtype"):
        assert missing in config
        broken = {k: v for k, v in config.items() if k != missing}
        bad = dict(members)
        bad[key] = np.frombuffer(json.dumps(broken).encode(), dtype=np.uint8)
        target = tmp_path / f"no_{missing}.npz"
        _write(target, bad)
        with pytest.raises(ValueError):
            gru_fast.load(target)


def test_wrong_format_version_is_refused(saved, tmp_path):
    path, members = saved
    key, config = _config_key(members)
    version_keys = [k for k in config if "version" in k.lower()]
    assert version_keys, f"the configuration records no format version: {sorted(config)}"
    for bump in (lambda v: v + 1 if isinstance(v, int) else "999", lambda v: "1.0.0-not-a-version"):
        changed = dict(config)
        for k in version_keys:
            changed[k] = bump(config[k])
        bad = dict(members)
        bad[key] = np.frombuffer(json.dumps(changed).encode(), dtype=np.uint8)
        target = tmp_path / "version.npz"
        _write(target, bad)
        with pytest.raises(ValueError):
            gru_fast.load(target)


def test_unmodified_rewrite_still_loads(saved, tmp_path):
    """Control for the refusal tests: the members rewritten unchanged by this test's own writer load."""
    path, members = saved
    target = tmp_path / "same.npz"
    _write(target, members)
    original = gru_fast.load(path)
    rewritten = gru_fast.load(target)
    x = np.random.default_rng(0).standard_normal((4, 2, 5)).astype(np.float32)
    assert all(np.array_equal(a, b) for a, b in zip(original(x), rewritten(x)))


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04garbage"],
                         ids=["empty", "text", "broken_zip"])
def test_not_an_npz_is_refused(tmp_path, content):
    target = tmp_path / "bad.npz"
    target.write_bytes(content)
    with pytest.raises(ValueError):
        gru_fast.load(target)


def test_zip_without_npy_members_is_refused(tmp_path):
    target = tmp_path / "plain.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ValueError):
        gru_fast.load(target)
