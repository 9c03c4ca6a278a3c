"""One rule for every model-file loader (gru_fast._files): a missing path is FileNotFoundError naming it;
a file another loader reads says which loader; every message names the file once -- through the API and
through the CLI (a child process, as a user runs it).  ``gru_fast.save`` to a missing folder is
FileNotFoundError naming the folder; ``gru-fast convert -o DIR/`` creates DIR.
"""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

import gru_fast
from converters import from_onnx, from_torch

from conftest import REPO_ROOT
from test_cli import cli, ok, user_error

DATA = REPO_ROOT / "gru_fast" / "data"
ENGINE = DATA / "default_gru.npz"
ONNX = DATA / "default_gru.onnx"

LOADERS = {"gru_fast.load": gru_fast.load, "converters.from_torch.load": from_torch.load,
           "converters.from_onnx.load": from_onnx.load}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds")
    shutil.copy(ENGINE, d / "engine.npz")
    shutil.copy(ENGINE, d / "engine_renamed.pt")  # an engine file under a torch suffix: its content decides
    shutil.copy(ONNX, d / "gru.onnx")
    rng = np.random.default_rng(0)
    H, I = 4, 3
    state = {"weight_ih_l0": rng.standard_normal((3 * H, I), dtype=np.float32),
             "weight_hh_l0": rng.standard_normal((3 * H, H), dtype=np.float32),
             "bias_ih_l0": rng.standard_normal(3 * H, dtype=np.float32),
             "bias_hh_l0": rng.standard_normal(3 * H, dtype=np.float32)}
    np.savez(d / "state_dict.npz", **state)
    np.savez(d / "not_a_model.npz", weights=rng.standard_normal(10))
    # Keras 3 writes a .keras file as a zip of config.json, metadata.json and model.weights.h5
    with zipfile.ZipFile(d / "model.keras", "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("metadata.json", "{}")
        archive.writestr("model.weights.h5", b"")
    # a Keras 2 .h5 file is HDF5: its first bytes are the HDF5 signature (HDF5 file format specification)
    (d / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(504))
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((3, 2), np.float32), "w")])
    onnx.save(helper.make_model(graph), str(d / "linear.onnx"))
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, d / "state_dict.pt")
    return d


@pytest.mark.parametrize("loader", LOADERS)
def test_a_missing_path_is_file_not_found_naming_it(loader, tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError) as info:
        LOADERS[loader](missing)
    assert info.value.filename == str(missing) and str(missing) in str(info.value)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_directory_is_refused_as_not_a_regular_file(loader, tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        LOADERS[loader](tmp_path)


@pytest.mark.parametrize("loader, name, right", [
    ("gru_fast.load", "gru.onnx", "converters.from_onnx.load"),
    ("gru_fast.load", "state_dict.pt", "converters.from_torch.load"),
    ("gru_fast.load", "state_dict.npz", "converters.from_torch.load"),
    ("gru_fast.load", "model.keras", "converters.from_keras.load"),
    ("gru_fast.load", "model.h5", "converters.from_keras.load"),
    ("converters.from_torch.load", "engine.npz", "gru_fast.load"),
    ("converters.from_torch.load", "engine_renamed.pt", "gru_fast.load"),
    ("converters.from_torch.load", "gru.onnx", "converters.from_onnx.load"),
    ("converters.from_torch.load", "model.h5", "converters.from_keras.load"),
    ("converters.from_onnx.load", "state_dict.pt", "converters.from_torch.load"),
    ("converters.from_onnx.load", "engine.npz", "gru_fast.load"),
    ("converters.from_onnx.load", "model.keras", "converters.from_keras.load"),
])
def test_a_file_of_another_kind_names_the_loader_that_reads_it(files, loader, name, right):
    path = files / name
    with pytest.raises(ValueError) as info:
        LOADERS[loader](path)
    message = str(info.value)
    assert f"read it with {right}" in message, message
    assert message.count(name) == 1, message


def test_the_suggested_loaders_read_those_files(files):
    """The suggestions are true: each named loader reads the file it was named for."""
    assert gru_fast.load(files / "engine_renamed.pt").hidden_size == 64
    assert from_torch.load(files / "state_dict.npz").hidden_size == 4
    assert from_torch.load(files / "state_dict.pt").hidden_size == 4
    assert list(from_onnx.load(files / "gru.onnx"))


@pytest.mark.parametrize("loader, name", [
    ("gru_fast.load", "not_a_model.npz"),
    ("converters.from_torch.load", "not_a_model.npz"),
    ("converters.from_onnx.load", "linear.onnx"),
])
def test_every_refusal_names_the_file_once(files, loader, name):
    with pytest.raises(ValueError) as info:
        LOADERS[loader](files / name)
    assert str(info.value).count(name) == 1, str(info.value)


def test_save_to_a_missing_folder_is_file_not_found_naming_the_folder(tmp_path):
    model = gru_fast.load(ENGINE)
    with pytest.raises(FileNotFoundError) as info:
        gru_fast.save(model, tmp_path / "no" / "such" / "model.npz")
    assert info.value.filename == str(tmp_path / "no" / "such")
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fragment", [
    ("linear.onnx", "the graph has no GRU node"),
    ("not_a_model.npz", "is neither a gru_fast engine file"),
    ("engine_renamed.pt", "read it with gru_fast.load"),
])
def test_cli_errors_name_the_file_once(files, name, fragment):
    line = user_error(cli("info", files / name), 1, fragment)
    assert line.count(name) == 1, line


def test_cli_reads_a_numpy_state_dict_and_an_engine_file_by_their_content(files):
    assert "numpy state dict" in ok(cli("info", files / "state_dict.npz")).stdout
    assert "gru_fast engine file" in ok(cli("info", files / "engine.npz")).stdout


def test_convert_into_a_directory_that_does_not_exist_creates_it(tmp_path):
    out = tmp_path / "new" / "models"
    ok(cli("convert", ENGINE, "-o", f"{out}/"))
    written = out / "default_gru.npz"
    assert sorted(p.name for p in out.iterdir()) == ["default_gru.npz"]
    source, copy = gru_fast.load(ENGINE), gru_fast.load(written)
    for a, b in zip(source.onnx_weights(), copy.onnx_weights()):
        assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_convert_to_a_file_in_a_missing_directory_is_still_an_error(tmp_path):
    user_error(cli("convert", ENGINE, "-o", tmp_path / "no" / "o.npz"), 1, "does not exist")
    assert not (tmp_path / "no").exists()


def test_a_zip_declaring_a_huge_directory_is_left_to_the_loader(tmp_path):
    """The kind of a zip is read from its member names only when its central directory is small; a
    declared 2 GiB directory is not read for that, and the loader refuses the damaged file."""
    data = bytearray(ENGINE.read_bytes())
    end = data.rindex(b"PK\x05\x06")  # end-of-central-directory record (zip APPNOTE 4.3.16)
    data[end + 12 : end + 16] = (2**31).to_bytes(4, "little")  # size of the central directory
    path = tmp_path / "huge_directory.npz"
    path.write_bytes(bytes(data))
    from gru_fast._files import sniff

    assert sniff(path) is None
    with pytest.raises(ValueError) as info:
        gru_fast.load(path)
    assert str(info.value).count("huge_directory.npz") == 1, str(info.value)
