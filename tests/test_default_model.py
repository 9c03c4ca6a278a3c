"""The model shipped in gru_fast/data: its accuracy, its parity with the authorities it came with, and
that every shipped file describes the same trained weights.

Authorities: PyTorch (its logits for the evaluation set, recorded by scripts/train_default_model.py at
training time, and, when torch is installed, the classifier rebuilt from the shipped weights), ONNX
Runtime and the ONNX reference evaluator running the shipped default_gru.onnx.  The evaluation set is
unpacked here from its raw storage, not through gru_fast._demo, so the demo's helpers are checked too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import gru_fast
from gru_fast import _demo, peers

from conftest import REPO_ROOT, assert_matches

DATA = REPO_ROOT / "gru_fast" / "data"
FILES = ("default_gru.npz", "default_gru.onnx", "default_head.npz", "default_eval.npz", "default_model.json")
#: the accuracy the README states for the shipped model on its 512 held-out sequences (chance: 12.5%)
ACCURACY_THRESHOLD = 0.90
LOGITS_TOL = 1e-4  # logits reach ~20 in magnitude; y and h_n use the float32 default, 1e-5


@pytest.fixture(scope="module")
def record():
    return json.loads((DATA / "default_model.json").read_text())


@pytest.fixture(scope="module")
def model():
    return gru_fast.load(DATA / "default_gru.npz")


@pytest.fixture(scope="module")
def head():
    with np.load(DATA / "default_head.npz", allow_pickle=False) as archive:
        return archive["weight"].copy(), archive["bias"].copy(), list(archive["classes"])


@pytest.fixture(scope="module")
def eval_set():
    """(x (N, T_max, 8) float32 zero-padded, lengths, labels, PyTorch's recorded logits)."""
    with np.load(DATA / "default_eval.npz", allow_pickle=False) as archive:
        frames, lengths = archive["x"], archive["lengths"].astype(np.int64)
        labels, logits = archive["labels"].astype(np.int64), archive["torch_logits"]
    x = np.zeros((len(lengths), lengths.max(), frames.shape[1]), np.float32)
    offsets = np.cumsum(lengths) - lengths
    for i, (offset, length) in enumerate(zip(offsets, lengths)):
        x[i, :length] = frames[offset : offset + length]
    assert offsets[-1] + lengths[-1] == len(frames)
    return x, lengths, labels, logits


def _logits(model, head, x, lengths):
    _, h_n = model(x, lengths=lengths)
    return h_n[-1] @ head[0].T + head[1]


# --------------------------------------------------------------------------------------------------
# the files
# --------------------------------------------------------------------------------------------------

def test_shipped_files_are_small_and_the_ones_recorded(record):
    sizes = {name: (DATA / name).stat().st_size for name in FILES}
    assert sum(sizes.values()) < 1 << 20, sizes
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, f"{name} changed since training"


def test_engine_file_describes_the_recorded_model(model, record, head):
    spec = record["model"]
    assert (model.input_size, model.hidden_size, model.num_layers) == (
        spec["input_size"], spec["hidden_size"], spec["num_layers"])
    assert model.direction == "forward" and model.linear_before_reset and model.batch_first
    assert model.dtype == np.float32
    assert model.provenance["framework"] == "torch"
    assert model.provenance["test_accuracy"] == record["accuracy"]["test"]
    assert head[0].shape == (len(record["classes"]), model.hidden_size)
    assert [str(c) for c in head[2]] == record["classes"]
    gru_params = sum(a.size for layer in model.onnx_weights() for a in layer)
    assert gru_params + head[0].size + head[1].size == spec["parameters"]


def test_onnx_file_holds_the_same_weights(model, head):
    """Layer l of the engine file is GRU node l of the ONNX file, bit for bit, and the ONNX graph's
    head (its Gemm) is default_head.npz."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from converters import from_onnx

    nodes = list(from_onnx.load(DATA / "default_gru.onnx", stack=False).values())
    assert len(nodes) == model.num_layers
    for index, (node, ours) in enumerate(zip(nodes, model.onnx_weights())):
        for name, a, b in zip("WRB", node.onnx_weights()[0], ours):
            assert np.array_equal(a, b), f"layer {index} {name} differs between the .onnx and the .npz"
    graph = onnx.load(str(DATA / "default_gru.onnx")).graph
    gemm = [n for n in graph.node if n.op_type == "Gemm"]
    assert len(gemm) == 1
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight, bias = (initializers[name] for name in gemm[0].input[1:3])
    transposed = any(a.name == "transB" and a.i == 1 for a in gemm[0].attribute)
    assert np.array_equal(weight if transposed else weight.T, head[0])
    assert np.array_equal(bias, head[1])


def test_eval_set_is_the_scripts_held_out_test_data(eval_set, record):
    """The shipped sequences are the first test sequences the training script generates (seed
    "test"), not training data: regenerate them with the script's own generator."""
    spec = importlib.util.spec_from_file_location("train_default_model",
                                                  REPO_ROOT / "scripts" / "train_default_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    x, lengths, labels, _ = eval_set
    n = len(labels)
    assert script.SEEDS["test"] not in (script.SEEDS["train"], script.SEEDS["validation"])
    tx, tl, ty = script.make_dataset(script.SIZES["test"], script.SEEDS["test"])
    assert np.array_equal(tl[:n], lengths) and np.array_equal(ty[:n], labels)
    assert np.array_equal(tx[:n, : x.shape[1]], x)
    assert record["accuracy"]["shipped_eval_size"] == n


# --------------------------------------------------------------------------------------------------
# accuracy and parity
# --------------------------------------------------------------------------------------------------

def test_accuracy_on_the_held_out_set(model, head, eval_set, record):
    x, lengths, labels, _ = eval_set
    accuracy = float((_logits(model, head, x, lengths).argmax(1) == labels).mean())
    assert accuracy >= ACCURACY_THRESHOLD
    assert record["accuracy"]["test"] >= ACCURACY_THRESHOLD  # the 4000-sequence figure the README quotes
    # PyTorch's accuracy on the same sequences, recorded at training; a near-tie may flip one prediction
    assert abs(accuracy - record["accuracy"]["shipped_eval"]) <= 1 / len(labels) + 1e-9


def test_each_accuracy_figure_says_which_sequences_it_is_on(model, head, eval_set, record):
    """README (91.45 %), demo (92.97 %) and info (0.9145) quote different sets: each says which."""
    x, lengths, labels, _ = eval_set
    acc = record["accuracy"]
    assert acc["test_size"] == record["data"]["sizes"]["test"] and acc["shipped_eval_size"] == len(labels)
    assert acc["test"] == model.provenance["test_accuracy"]  # what `gru-fast info` prints
    measured = float((_logits(model, head, x, lengths).argmax(1) == labels).mean())
    text = _demo.accuracy_sets(record)  # the demo and `info` print this line
    assert f"{100 * acc['test']:.2f} % on the model's {acc['test_size']:,} held-out test sequences" in text
    assert f"{100 * measured:.2f} % on the first {len(labels)} of them" in text
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert (f"{100 * acc['test']:.2f} % accuracy on its {acc['test_size']:,} held-out test sequences, the figure "
            "`gru-fast info` shows as test_accuracy") in readme
    assert (f"classifies the first {len(labels)} of those sequences, which ship with it ({100 * measured:.2f} % "
            "on them, the figure the demo prints)") in readme


def test_logits_match_pytorchs_recorded_output(model, head, eval_set):
    x, lengths, _, torch_logits = eval_set
    assert_matches(_logits(model, head, x, lengths), torch_logits, authority="PyTorch (recorded)",
                   dtype=np.float32, tol=LOGITS_TOL, what="default model logits")


def test_rebuilt_pytorch_classifier_reproduces_its_recorded_output(model, head, eval_set):
    """The shipped engine weights and head, loaded back into nn.GRU + nn.Linear, give the logits PyTorch
    recorded at training: the files hold the trained model, converted without loss."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence

    x, lengths, _, torch_logits = eval_set
    module = peers.torch_gru(model)
    linear = torch.nn.Linear(model.hidden_size, head[0].shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(head[0]))
        linear.bias.copy_(torch.from_numpy(head[1]))
        packed = pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths), batch_first=True,
                                      enforce_sorted=False)
        _, h_n = module(packed)
        logits = linear(h_n[-1]).numpy()
    assert_matches(logits, torch_logits, authority="PyTorch", dtype=np.float32, tol=LOGITS_TOL,
                   what="rebuilt classifier vs recorded logits")


def test_parity_with_onnxruntime_on_the_shipped_onnx(model, head, eval_set):
    """The shipped ONNX graph (lengths as sequence_lens, unsorted) against the engine with lengths=."""
    ort = pytest.importorskip("onnxruntime")
    x, lengths, _, _ = eval_set
    assert not np.all(np.diff(lengths) <= 0), "the check needs unsorted lengths"
    session = ort.InferenceSession(str(DATA / "default_gru.onnx"), providers=["CPUExecutionProvider"])
    ort_logits, ort_y, ort_h = session.run(None, {"x": x, "lengths": lengths})
    y, h_n = model(x, lengths=lengths)
    assert_matches(y, ort_y, authority="ONNX Runtime", dtype=np.float32, what="default model y")
    assert_matches(h_n, ort_h, authority="ONNX Runtime", dtype=np.float32, what="default model h_n")
    assert_matches(h_n[-1] @ head[0].T + head[1], ort_logits, authority="ONNX Runtime", dtype=np.float32,
                   tol=LOGITS_TOL, what="default model logits")


def test_parity_with_the_onnx_reference_evaluator(model):
    """The reference evaluator ignores sequence_lens: a batch of full-length sequences."""
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(5).standard_normal((16, 30, model.input_size)).astype(np.float32)
    evaluator = ReferenceEvaluator(onnx.load(str(DATA / "default_gru.onnx")))
    _, ref_y, ref_h = evaluator.run(None, {"x": x, "lengths": np.full(16, 30, np.int64)})
    y, h_n = model(x)
    assert_matches(y, ref_y, authority="ONNX reference", dtype=np.float32, what="default model y")
    assert_matches(h_n, ref_h, authority="ONNX reference", dtype=np.float32, what="default model h_n")


def test_demo_helpers_read_the_files_as_this_test_does(model, head, eval_set):
    x, lengths, labels, logits = eval_set
    data = _demo.load_eval_set()
    assert np.array_equal(data.x, x) and np.array_equal(data.lengths, lengths)
    assert np.array_equal(data.labels, labels) and np.array_equal(data.torch_logits, logits)
    weight, bias, classes = _demo.load_head()
    assert np.array_equal(weight, head[0]) and np.array_equal(bias, head[1])
    assert np.array_equal(_demo.classify(model, (weight, bias), x, lengths), _logits(model, head, x, lengths))


def test_peer_graph_of_the_demo_matches_onnxruntime_on_the_shipped_file(model, eval_set):
    """The GRU-only graph the demo times ONNX Runtime / OpenVINO on (gru_fast.peers.onnx_gru) computes what
    the shipped file does."""
    ort = pytest.importorskip("onnxruntime")
    x = np.ascontiguousarray(eval_set[0][:8, :24])
    proto = peers.onnx_gru(model, 24, 8)
    h0 = np.zeros((model.num_layers, 8, model.hidden_size), np.float32)
    y, h_n = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ascontiguousarray(x.transpose(1, 0, 2)), "h0": h0})
    shipped = ort.InferenceSession(str(DATA / "default_gru.onnx"), providers=["CPUExecutionProvider"])
    _, ref_y, ref_h = shipped.run(None, {"x": x, "lengths": np.full(8, 24, np.int64)})
    assert_matches(y.transpose(1, 0, 2), ref_y, authority="ONNX Runtime", dtype=np.float32, what="demo graph y")
    assert_matches(h_n, ref_h, authority="ONNX Runtime", dtype=np.float32, what="demo graph h_n")


def test_shipped_files_are_package_data():
    """pyproject ships gru_fast/data/* in wheels (a clean install has no repository beside it)."""
    import tomllib

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "gru_fast.data" in config["packages"]
    patterns = config["package-data"]["gru_fast.data"]
    for name in FILES:
        assert any(Path(name).match(p) for p in patterns), name
