"""The ``gru-fast`` command line, end to end: every command runs as ``python -m gru_fast`` in a child
process on temporary files, and so does every error path a user can hit.

Outputs are checked against authorities: PyTorch (``nn.GRU`` on the converted checkpoints), ONNX
Runtime (the shipped ``default_gru.onnx``, one-node GRU graphs), and the ONNX graph itself for what
``info`` reports.  ``run``'s chunked output is also compared with one in-memory call of the engine.
User mistakes must end with one line on stderr, ``gru-fast...: error: ...``, the documented exit code
(1 bad input, 2 usage, 3 missing package, 4 failed demo check) and no traceback.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

import gru_fast

from conftest import REPO_ROOT, assert_matches, run_onnxruntime, run_torch, torch_gru

DATA = REPO_ROOT / "gru_fast" / "data"
ENGINE = DATA / "default_gru.npz"
ONNX = DATA / "default_gru.onnx"


def cli(*args, cwd=None):
    """``python -m gru_fast ARGS`` with stdout and stderr piped (so never a terminal)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gru_fast", *map(str, args)], cwd=cwd or REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def child(code):
    """A Python child (the repository on sys.path) for the cases that need a monkeypatch first."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def user_error(proc, code, *fragments):
    """One line on stderr naming the problem, the exit code, no traceback, nothing on stdout."""
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(r"gru-fast( \w+)?: error: ", lines[0]), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the tests: a checkpoint with two GRUs, input arrays, bad files."""
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("cli")
    encoder = torch_gru(5, 7, num_layers=2, bidirectional=True, seed=1)
    decoder = torch_gru(14, 6, seed=2)
    state = {f"encoder.gru.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.gru.{k}": v for k, v in decoder.state_dict().items()})
    torch.save(state, d / "two.pt")
    np.savez(d / "two.npz", **{k: v.numpy() for k, v in state.items()})  # the same, readable without torch
    torch.save(encoder, d / "pickled_module.pt")  # a whole pickled module: refused by weights_only
    batch_first = torch_gru(4, 3, batch_first=True, seed=3)
    np.savez(d / "state_dict.npz", **{k: v.numpy() for k, v in batch_first.state_dict().items()})

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 40, 8)).astype(np.float32)
    lengths = rng.integers(1, 41, 300)
    np.save(d / "x.npy", x)
    np.save(d / "lengths.npy", lengths)
    np.save(d / "x16.npy", x[:50].astype(np.float16))
    np.save(d / "x_int.npy", (10 * x).astype(np.int32))
    np.save(d / "x_2d.npy", x[0])
    np.save(d / "x_wrong_i.npy", x[:, :, :5])
    np.save(d / "x_empty.npy", x[:0])
    np.save(d / "lengths_float.npy", lengths.astype(np.float64))
    np.save(d / "lengths_short.npy", lengths[:10])
    np.save(d / "lengths_big.npy", np.where(np.arange(300) == 7, 41, lengths))
    np.save(d / "lengths_negative.npy", np.where(np.arange(300) == 3, -1, lengths))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(d / "archive.npz", x=x)
    np.savez(d / "not_a_model.npz", weights=rng.standard_normal(10))
    (d / "text.npy").write_text("not an array\n")
    (d / "garbage.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf model")
    (d / "model.txt").write_text("GRU\n")
    return {"dir": d, "x": x, "lengths": lengths, "encoder": encoder, "decoder": decoder,
            "batch_first": batch_first}


# --------------------------------------------------------------------------------------------------
# help, version, usage errors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["", "demo", "info", "convert", "run", "bench"])
def test_help_on_every_command(command):
    proc = ok(cli(*([command] if command else []), "--help"))
    assert proc.stdout.startswith(f"usage: gru-fast {command}".rstrip())
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal's width
    if command == "":
        assert "Exit codes: 0 ok; 1 bad input file or data; 2 usage error; 3 optional package missing" in text
    if command == "run":
        assert "(N, T, I)" in text and "h_n (N, L*D, H)" in text


def test_version():
    assert ok(cli("--version")).stdout == f"gru-fast {gru_fast.__version__}\n"


def test_console_script_is_declared_and_runs():
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="console_scripts", name="gru-fast")
    assert entry.value == "gru_fast.cli:main"
    script = Path(sys.executable).parent / "gru-fast"
    assert script.is_file(), "the package is not installed in this environment (pip install -e .)"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"gru-fast {gru_fast.__version__}\n"


@pytest.mark.parametrize("args, fragment", [
    ((), "the following arguments are required: COMMAND"),
    (("frob",), "invalid choice: 'frob'"),
    (("run", ENGINE), "the following arguments are required: --input, --output"),
    (("run", ENGINE, "--input", "x.npy", "--output", "y.npz", "--batch-size", "0"), "expected a positive integer"),
    (("convert", ENGINE), "the following arguments are required: -o/--output"),
    (("demo", "--peers", "tensorflow"), "invalid choice: 'tensorflow'"),
    (("info",), "the following arguments are required: FILE"),
])
def test_usage_errors_exit_2(args, fragment):
    user_error(cli(*args), 2, fragment)


@pytest.mark.parametrize("package", ["onnx", "torch"])
def test_missing_optional_package_exits_3(package, tmp_path):
    """The package made unimportable in the child (as if not installed): one line naming it, exit 3."""
    if package == "onnx":
        args = ["info", str(ONNX)]
    else:
        import zipfile

        with zipfile.ZipFile(tmp_path / "model.pt", "w") as archive:  # torch.save's container format
            archive.writestr("model/data.pkl", b"a checkpoint only torch could read")
        args = ["convert", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out.npz")]
    code = (f"import sys; sys.modules[{package!r}] = None\n"
            f"from gru_fast.cli import main; sys.exit(main({args!r}))")
    user_error(child(code), 3, f"needs the '{package}' package, which is not installed")


# --------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------

def test_info_on_the_shipped_engine_file():
    record = json.loads((DATA / "default_model.json").read_text())["model"]
    out = ok(cli("info", ENGINE)).stdout
    assert out.splitlines()[0].startswith(f"{ENGINE}: gru_fast engine file")
    facts = dict(re.findall(r"^  (\w+)\s+(.*)$", out, re.M))
    assert facts["layers"] == f"{record['num_layers']}, forward"
    assert facts["sizes"] == f"input {record['input_size']}, hidden {record['hidden_size']}, " \
                             f"output {record['hidden_size']} per step"
    assert facts["variant"].startswith("linear_before_reset=1")  # nn.GRU's form
    assert facts["activations"] == "f=Sigmoid, g=Tanh"
    assert facts["dtype"] == "float32" and facts["batch_first"].startswith("True")
    assert facts["clip"] == "none" and facts["bias"] == "yes"
    assert json.loads(facts["provenance"])["source"] == "scripts/train_default_model.py"
    from gru_fast._demo import accuracy_sets  # which sequences test_accuracy is on (test_default_model)

    assert facts["accuracy"] == accuracy_sets()


def test_info_json_on_onnx_lists_every_gru_node_as_the_graph_declares_it():
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    report = json.loads(ok(cli("info", ONNX, "--json", "--no-stack")).stdout)
    graph = onnx.load(str(ONNX)).graph
    nodes = [n for n in graph.node if n.op_type == "GRU"]
    assert report["kind"] == "ONNX model" and list(report["models"]) == [n.name for n in nodes]
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in nodes:
        facts, attrs = report["models"][node.name], {a.name: a for a in node.attribute}
        W = initializers[node.input[1]]
        assert (facts["input_size"], facts["hidden_size"]) == (W.shape[2], attrs["hidden_size"].i)
        assert facts["linear_before_reset"] == bool(attrs["linear_before_reset"].i)
        assert facts["direction"] == "forward" and facts["num_layers"] == 1
        assert facts["parameters"] == sum(initializers[name].size for name in node.input[1:4])
        assert facts["provenance"]["node"] == node.name


def test_info_on_a_state_dict_with_prefix(files):
    proc = ok(cli("info", files["dir"] / "two.npz", "--prefix", "encoder.gru.", "--json"))
    (facts,) = json.loads(proc.stdout)["models"].values()
    encoder = files["encoder"]
    assert (facts["input_size"], facts["hidden_size"], facts["num_layers"], facts["direction"]) == (
        encoder.input_size, encoder.hidden_size, encoder.num_layers, "bidirectional")
    assert facts["parameters"] == sum(p.numel() for p in encoder.parameters())
    assert facts["provenance"]["prefix"] == "encoder.gru."


def test_info_on_a_state_dict_with_two_grus_asks_for_a_prefix(files):
    user_error(cli("info", files["dir"] / "two.npz"), 1, "encoder.gru.", "decoder.gru.")


# --------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------

def test_convert_onnx_writes_every_node_and_they_reproduce_onnxruntime(tmp_path):
    """Each GRU node of the shipped graph becomes its own file; the files, chained, give what ONNX
    Runtime computes for the whole graph."""
    ort = pytest.importorskip("onnxruntime")
    proc = ok(cli("convert", ONNX, "-o", tmp_path / "m.npz"))
    first, second = tmp_path / "m.gru_GRU.npz", tmp_path / "m.gru_GRU_1.npz"
    assert sorted(tmp_path.iterdir()) == [first, second]
    assert str(first) in proc.stdout and str(second) in proc.stdout
    x = np.random.default_rng(1).standard_normal((6, 11, 8)).astype(np.float32)
    layer0, layer1 = gru_fast.load(first), gru_fast.load(second)
    y0, h0 = layer0(x.transpose(1, 0, 2))
    y1, h1 = layer1(y0)
    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    _, y, h_n = session.run(None, {"x": x, "lengths": np.full(6, 11, np.int64)})
    assert_matches(y1.transpose(1, 0, 2), y, authority="ONNX Runtime", dtype=np.float32, what="chained y")
    assert_matches(np.concatenate([h0, h1]), h_n, authority="ONNX Runtime", dtype=np.float32, what="h_n")


def test_convert_one_onnx_node_into_a_directory(tmp_path):
    pytest.importorskip("onnx")
    from converters import from_onnx

    ok(cli("convert", ONNX, "--node", "/gru/GRU_1", "-o", f"{tmp_path}/"))
    assert [p.name for p in tmp_path.iterdir()] == ["gru_GRU_1.npz"]
    written = gru_fast.load(tmp_path / "gru_GRU_1.npz").onnx_weights()[0]
    expected = from_onnx.load(ONNX, stack=False)["/gru/GRU_1"].onnx_weights()[0]
    assert all(np.array_equal(a, b) for a, b in zip(written, expected))


def test_convert_pytorch_checkpoint_matches_pytorch(files, tmp_path):
    """A .pt file (torch.load, weights only) with --prefix and --dtype float64, against PyTorch in float64."""
    dtype = "float64"
    out = tmp_path / "encoder.npz"
    ok(cli("convert", files["dir"] / "two.pt", "--prefix", "encoder.gru", "-o", out, "--dtype", dtype))
    model = gru_fast.load(out)
    assert model.dtype == np.dtype(dtype) and model.provenance["source"] == "two.pt"
    encoder = copy.deepcopy(files["encoder"]).to(getattr(__import__("torch"), dtype))
    x = np.random.default_rng(2).standard_normal((9, 3, 5)).astype(dtype)
    y_ref, h_ref = run_torch(encoder, x)
    y, h_n = model(x)
    assert_matches(y, y_ref, authority="PyTorch", dtype=dtype, what="converted checkpoint y")
    assert_matches(h_n, h_ref, authority="PyTorch", dtype=dtype, what="converted checkpoint h_n")


def test_convert_numpy_state_dict_with_batch_first(files, tmp_path):
    ok(cli("convert", files["dir"] / "state_dict.npz", "--batch-first", "-o", f"{tmp_path}/"))
    model = gru_fast.load(tmp_path / "state_dict.npz")
    assert model.batch_first
    x = np.random.default_rng(3).standard_normal((2, 6, 4)).astype(np.float32)
    y_ref, h_ref = run_torch(files["batch_first"], x)
    y, h_n = model(x)
    assert_matches(y, y_ref, authority="PyTorch", dtype=np.float32, what="batch_first state dict y")
    assert_matches(h_n, h_ref, authority="PyTorch", dtype=np.float32, what="batch_first state dict h_n")


def test_convert_engine_file_to_float64(tmp_path):
    ok(cli("convert", ENGINE, "-o", tmp_path / "f64.npz", "--dtype", "float64"))
    original, converted = gru_fast.load(ENGINE), gru_fast.load(tmp_path / "f64.npz")
    assert converted.dtype == np.float64 and converted.provenance == original.provenance
    for a, b in zip(original.onnx_weights(), converted.onnx_weights()):
        assert all(np.array_equal(p.astype(np.float64), q) for p, q in zip(a, b))


def test_convert_with_bfloat16_weights_matches_pytorch_with_rounded_weights(files, tmp_path):
    """--weights bfloat16: the written model reads back as bfloat16 and runs as PyTorch does with its weight
    matrices rounded by torch.bfloat16."""
    torch = __import__("torch")
    out = tmp_path / "bf16.npz"
    ok(cli("convert", files["dir"] / "two.pt", "--prefix", "encoder.gru", "-o", out, "--weights", "bfloat16"))
    model = gru_fast.load(out)
    assert model.weights == "bfloat16" and model.dtype == np.float32
    rounded = copy.deepcopy(files["encoder"])
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.startswith("weight"):
                p.copy_(p.to(torch.bfloat16).float())
    x = np.random.default_rng(4).standard_normal((9, 3, 5)).astype(np.float32)
    y_ref, h_ref = run_torch(rounded, x)
    y, h_n = model(x)
    assert_matches(y, y_ref, authority="PyTorch (bfloat16-rounded weights)", dtype=np.float32, what="y")
    assert_matches(h_n, h_ref, authority="PyTorch (bfloat16-rounded weights)", dtype=np.float32, what="h_n")
    user_error(cli("convert", files["dir"] / "two.pt", "--prefix", "encoder.gru", "-o", tmp_path / "x.npz",
                   "--weights", "bfloat16", "--dtype", "float64"), 2, "--weights bfloat16", "float64")


@pytest.mark.parametrize("case", [
    "missing", "unknown_node", "wrong_prefix", "not_a_model", "garbage_onnx", "unsupported_suffix",
    "output_not_npz", "output_dir_missing", "node_on_checkpoint", "pickled_module",
])
def test_convert_errors(files, tmp_path, case):
    d = files["dir"]
    args, code, fragments = {
        "missing": ((d / "nope.onnx", "-o", tmp_path / "o.npz"), 1, ["nope.onnx", "no such file"]),
        "unknown_node": ((ONNX, "--node", "nope", "-o", tmp_path / "o.npz"), 1,
                         ["no GRU node named 'nope'", "'/gru/GRU'", "'/gru/GRU_1'"]),
        "wrong_prefix": ((d / "two.npz", "--prefix", "nope.", "-o", tmp_path / "o.npz"), 1,
                         ["prefix 'nope.'", "encoder.gru."]),
        "not_a_model": ((d / "not_a_model.npz", "-o", tmp_path / "o.npz"), 1,
                        ["neither a gru_fast engine file", "nor a numpy state dict"]),
        "garbage_onnx": ((d / "garbage.onnx", "-o", tmp_path / "o.npz"), 1, ["garbage.onnx"]),
        "unsupported_suffix": ((d / "model.txt", "-o", tmp_path / "o.npz"), 1, ["unsupported file type '.txt'"]),
        "output_not_npz": ((ENGINE, "-o", tmp_path / "o.onnx"), 2, ["must be a .npz file or a directory"]),
        "output_dir_missing": ((ENGINE, "-o", tmp_path / "no" / "o.npz"), 1, ["does not exist"]),
        "node_on_checkpoint": ((d / "two.pt", "--node", "x", "-o", tmp_path / "o.npz"), 2,
                               ["--node applies to .onnx files only"]),
        "pickled_module": ((d / "pickled_module.pt", "-o", tmp_path / "o.npz"), 1, ["refused to load"]),
    }[case]
    user_error(cli("convert", *args), code, *fragments)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------

def test_run_in_chunks_matches_one_call_and_onnxruntime(files, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    d, x, lengths = files["dir"], files["x"], files["lengths"]
    out = tmp_path / "out.npz"
    proc = ok(cli("run", ENGINE, "--input", d / "x.npy", "--lengths", d / "lengths.npy", "--output", out,
                  "--batch-size", 64))
    assert proc.stderr == ""  # piped: no progress bar
    assert f"wrote {out}" in proc.stdout and "300 sequences" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]  # no temporary files left behind
    with np.load(out, allow_pickle=False) as result:
        assert sorted(result.files) == ["h_n", "y"]
        y, h_n = result["y"], result["h_n"]
    model = gru_fast.load(ENGINE)
    assert y.shape == (300, 40, 64) and h_n.shape == (300, 2, 64) and y.dtype == np.float32
    y_one, h_one = model(x, lengths=lengths)  # one in-memory call over all 300 sequences
    np.testing.assert_allclose(y, y_one, rtol=0, atol=1e-6)
    np.testing.assert_allclose(h_n, h_one.transpose(1, 0, 2), rtol=0, atol=1e-6)
    session = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    _, y_ref, h_ref = session.run(None, {"x": x, "lengths": lengths.astype(np.int64)})
    assert_matches(y, y_ref, authority="ONNX Runtime", dtype=np.float32, what="run y")
    assert_matches(h_n, h_ref.transpose(1, 0, 2), authority="ONNX Runtime", dtype=np.float32, what="run h_n")
    assert np.all(y[np.arange(40)[None, :] >= lengths[:, None]] == 0)  # padding steps are zero


def test_run_time_major_model_float16_input_npy_output(files, tmp_path):
    """A (T, B, I) model (an ONNX node) still reads and writes sequence-major files; .npy holds one array."""
    pytest.importorskip("onnxruntime")
    ok(cli("convert", ONNX, "--node", "/gru/GRU", "-o", tmp_path / "layer0.npz"))
    model = gru_fast.load(tmp_path / "layer0.npz")
    assert not model.batch_first
    d = files["dir"]
    ok(cli("run", tmp_path / "layer0.npz", "--input", d / "x16.npy", "--output", tmp_path / "y.npy",
           "--batch-size", 7))
    ok(cli("run", tmp_path / "layer0.npz", "--input", d / "x16.npy", "--output", tmp_path / "h.npy",
           "--outputs", "h_n"))
    y, h_n = np.load(tmp_path / "y.npy"), np.load(tmp_path / "h.npy")
    x = files["x"][:50].astype(np.float16).astype(np.float32).transpose(1, 0, 2)
    W, R, B = model.onnx_weights()[0]
    y_ref, h_ref = run_onnxruntime(x, W, R, B, linear_before_reset=1)
    assert_matches(y, y_ref.transpose(1, 0, 2), authority="ONNX Runtime", dtype=np.float32, what="y.npy")
    assert_matches(h_n, h_ref.transpose(1, 0, 2), authority="ONNX Runtime", dtype=np.float32, what="h.npy")


def test_run_draws_a_progress_bar_on_a_terminal_only(files, tmp_path):
    """stderr a terminal (a pseudo-terminal here): tqdm draws the bar; piped (every other test): none."""
    d = files["dir"]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "gru_fast", "run", str(ENGINE), "--input", str(d / "x.npy"),
                             "--output", str(tmp_path / "o.npz"), "--batch-size", "50"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    drawn = b"".join(chunks).decode(errors="replace")
    assert "gru-fast run" in drawn and "300/300" in drawn and "100%" in drawn, drawn


@pytest.mark.parametrize("case", [
    "missing_input", "int_dtype", "two_dims", "wrong_input_size", "no_sequences", "npz_input", "not_npy",
    "object_array", "lengths_shape", "lengths_too_big", "lengths_negative", "lengths_float", "output_suffix",
    "npy_with_two_outputs", "output_dir_missing", "output_overwrites_input", "model_with_two_nodes",
    "not_a_model",
])
def test_run_errors(files, tmp_path, case):
    d = files["dir"]
    x, out = d / "x.npy", tmp_path / "out.npz"
    args, code, fragments = {
        "missing_input": ((ENGINE, "--input", d / "nope.npy", "--output", out), 1, ["nope.npy: no such file"]),
        "int_dtype": ((ENGINE, "--input", d / "x_int.npy", "--output", out), 1, ["floating-point", "int32"]),
        "two_dims": ((ENGINE, "--input", d / "x_2d.npy", "--output", out), 1, ["shape (N, T, 8)", "(40, 8)"]),
        "wrong_input_size": ((ENGINE, "--input", d / "x_wrong_i.npy", "--output", out), 1, ["(300, 40, 5)"]),
        "no_sequences": ((ENGINE, "--input", d / "x_empty.npy", "--output", out), 1, ["at least one sequence"]),
        "npz_input": ((ENGINE, "--input", d / "archive.npz", "--output", out), 1, ["expected a .npy array"]),
        "not_npy": ((ENGINE, "--input", d / "text.npy", "--output", out), 1, ["not a readable .npy array"]),
        "object_array": ((ENGINE, "--input", d / "objects.npy", "--output", out), 1, ["not a readable .npy"]),
        "lengths_shape": ((ENGINE, "--input", x, "--lengths", d / "lengths_short.npy", "--output", out), 1,
                          ["lengths must have shape (300,)", "(10,)"]),
        "lengths_too_big": ((ENGINE, "--input", x, "--lengths", d / "lengths_big.npy", "--output", out), 1,
                            ["[0, 40]", "41 at index 7"]),
        "lengths_negative": ((ENGINE, "--input", x, "--lengths", d / "lengths_negative.npy", "--output", out),
                             1, ["-1 at index 3"]),
        "lengths_float": ((ENGINE, "--input", x, "--lengths", d / "lengths_float.npy", "--output", out), 1,
                          ["lengths must hold integers", "float64"]),
        "output_suffix": ((ENGINE, "--input", x, "--output", tmp_path / "out.csv"), 2, [".npz", ".npy"]),
        "npy_with_two_outputs": ((ENGINE, "--input", x, "--output", tmp_path / "o.npy", "--outputs", "y", "h_n"),
                                 2, ["holds one array"]),
        "output_dir_missing": ((ENGINE, "--input", x, "--output", tmp_path / "no" / "o.npz"), 1,
                               ["does not exist"]),
        "output_overwrites_input": ((ENGINE, "--input", x, "--output", x), 1, ["would overwrite an input"]),
        "model_with_two_nodes": ((ONNX, "--no-stack", "--input", x, "--output", out), 1, ["2 GRU models", "--node"]),
        "not_a_model": ((d / "not_a_model.npz", "--input", x, "--output", out), 1, ["neither a gru_fast"]),
    }[case]
    user_error(cli("run", *args), code, *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left behind


def test_run_cannot_write_its_output(files, tmp_path):
    """An output path that is an existing directory: the OSError becomes one line, exit 1, and the
    temporary files are gone."""
    (tmp_path / "out.npz").mkdir()
    user_error(cli("run", ENGINE, "--input", files["dir"] / "x.npy", "--output", tmp_path / "out.npz"), 1,
               f"cannot write {tmp_path / 'out.npz'}")
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"] and not any((tmp_path / "out.npz").iterdir())


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------

def test_demo_reports_accuracy_parity_and_a_timing_table():
    pytest.importorskip("onnxruntime")
    started = time.perf_counter()
    out = ok(cli("demo", "--peers", "onnxruntime", "--rounds", "3")).stdout
    assert time.perf_counter() - started < 120  # generous: a sanity bound, not a timing assertion
    # the accuracy it prints is the engine's on the shipped labels
    from gru_fast import _demo

    data = _demo.load_eval_set()
    logits = _demo.classify(gru_fast.load(ENGINE), _demo.load_head(), data.x, data.lengths)
    accuracy = 100 * float((logits.argmax(1) == data.labels).mean())
    assert re.search(rf"accuracy on the 512 shipped held-out sequences .*: {accuracy:.2f} %", out), out
    assert f"  accuracy figures: {_demo.accuracy_sets()}\n" in out  # which set each figure is on
    checks = re.findall(r"^  (logits|y, h_n)\s+vs (.*?)\s+(\S+)\s+(ok|FAILED)$", out, re.M)
    assert [c[3] for c in checks] == ["ok"] * 4, out
    assert {c[1].split(",")[0] for c in checks} >= {"PyTorch", "ONNX reference evaluator", "ONNX Runtime"}
    assert all(float(c[2]) <= 1e-4 for c in checks)
    header = next(line for line in out.splitlines() if line.strip().startswith("call"))
    assert "gru_fast" in header and "ONNX Runtime" in header and "PyTorch" not in header
    for row in ("stream step", "sequence", "batch"):
        line = next(line for line in out.splitlines() if line.strip().startswith(row))
        numbers = re.findall(r"[\d,]+\.?\d*", line.split(maxsplit=3)[-1])
        assert len(numbers) >= 2, line  # gru_fast and ONNX Runtime timed


def test_demo_without_onnx_still_checks_against_pytorchs_record_and_exits_0():
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
            "from gru_fast.cli import main\n"
            "status = main(['demo', '--no-timing'])\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(status)")
    out = ok(child(code)).stdout
    assert "ONNX checks skipped: the onnx package is not installed" in out
    assert re.search(r"logits\s+vs PyTorch.*ok$", out, re.M)
    assert out.rstrip().endswith("torch not imported")


def test_demo_exits_4_when_a_check_fails(tmp_path):
    """A tampered authority record (PyTorch's logits shifted) must fail the demo, and skip the timing."""
    with np.load(DATA / "default_eval.npz") as archive:
        arrays = dict(archive)
    arrays["torch_logits"] = arrays["torch_logits"] + 0.01
    np.savez(tmp_path / "eval.npz", **arrays)
    code = ("import sys; sys.modules['onnx'] = None  # only the PyTorch check, which is the one tampered\n"
            "from gru_fast import _demo\n"
            f"_demo.EVAL_FILE = __import__('pathlib').Path({str(tmp_path / 'eval.npz')!r})\n"
            "from gru_fast.cli import main; sys.exit(main(['demo', '--peers', 'onnxruntime']))")
    proc = child(code)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert re.search(r"logits\s+vs PyTorch.*FAILED$", proc.stdout, re.M)
    assert "timing skipped: the checks above failed" in proc.stdout and "FAILED:" in proc.stdout


@pytest.mark.parametrize("command", [["info", str(ENGINE)], ["info", str(ONNX)]])
def test_commands_do_not_import_torch(command):
    """Reading engine and ONNX files needs no torch (the demo: test_demo_without_onnx_...)."""
    code = (f"import sys; from gru_fast.cli import main; status = main({command!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(status)")
    ok(child(code))


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------

def test_bench_passes_its_options_to_the_harness_of_the_checkout():
    code = ("import json, subprocess, sys; from gru_fast import cli\n"
            "subprocess.call = lambda command, cwd: print(json.dumps([command, str(cwd)])) or 0\n"
            "sys.exit(cli.main(['bench', '--quick', '--cases', 'stream', 'tiny_bidir', '--out-dir', 'o']))")
    command, cwd = json.loads(ok(child(code)).stdout)
    assert command == [sys.executable, "-m", "bench", "--quick", "--cases", "stream", "tiny_bidir", "--out-dir", "o"]
    assert Path(cwd) == REPO_ROOT and (REPO_ROOT / "bench" / "__main__.py").is_file()


def test_bench_outside_a_checkout_is_a_usage_error():
    code = ("import sys; from gru_fast import cli; cli.bench_root = lambda: None\n"
            "sys.exit(cli.main(['bench', '--quick']))")
    user_error(child(code), 2, "source checkout")
