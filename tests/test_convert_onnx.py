"""converters.from_onnx against its authorities.

- ONNX backend test cases (``onnx.backend.test.case.node``, every ``test_gru*``): their shipped inputs
  and expected outputs, the layout=1 case included.
- PyTorch: ``torch.onnx.export(dynamo=False)`` of nn.GRU (1-3 layers, bidirectional, batch_first,
  constant folding on and off, several opsets, packed sequences), compared with the module itself and
  with ONNX Runtime running the exported file.
- ONNX Runtime: hand-built graphs whose weights come from Constant nodes and from foldable chains
  (Cast / Transpose / Gather / Reshape / Slice / Concat / Split / Expand / ...), attribute variants,
  sequence_lens and initial_h, external data.
- ONNX reference evaluator: layout=1 graphs, which ONNX Runtime rejects.
- Hostile files: truncated and garbage bytes, inconsistent shapes, absurd sizes, external-data escapes;
  each must raise ValueError with a message naming what is wrong, before allocating.
"""

from __future__ import annotations

import functools
import os
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters import from_onnx  # noqa: E402

ATOL = 1e-5          # float32, as the issue asks
ATOL64 = 1e-10       # float64 weights
INT64_MAX = 2 ** 63 - 1
INT64_MIN = -(2 ** 63)
MEASURED = {}        # test id -> max abs error, printed with pytest -s


def record(key, *diffs):
    err = max(float(np.max(np.abs(d))) if np.size(d) else 0.0 for d in diffs)
    MEASURED[key] = err
    print(f"[max abs err] {key}: {err:.3g}")
    return err


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def engine_as_onnx(model, x, initial_h=None, lengths=None):
    """Run a converted model and return ONNX's (Y, Y_h) layouts (see from_onnx's docstring)."""
    D, H = model.num_directions, model.hidden_size
    if model.batch_first:  # layout=1: X (B, T, I), Y (B, T, D, H), initial_h / Y_h (B, D, H)
        h0 = None if initial_h is None else np.ascontiguousarray(np.transpose(initial_h, (1, 0, 2)))
        y, h_n = model(x, h0=h0, lengths=lengths)
        B, T = x.shape[:2]
        return y.reshape(B, T, D, H), np.transpose(h_n, (1, 0, 2))
    y, h_n = model(x, h0=initial_h, lengths=lengths)
    T, B = x.shape[:2]
    return y.reshape(T, B, D, H).transpose(0, 2, 1, 3), h_n


def ort_session(model_or_path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_run(model, feeds):
    session = ort_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def make_model(nodes, inputs, outputs, initializers=(), opset=14):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return model


def value_info(name, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, None)


def random_weights(rng, D, H, I, dtype=np.float32, bias=True):
    W = (rng.standard_normal((D, 3 * H, I)) * 0.5).astype(dtype)
    R = (rng.standard_normal((D, 3 * H, H)) * 0.5).astype(dtype)
    B = (rng.standard_normal((D, 6 * H)) * 0.5).astype(dtype) if bias else None
    return W, R, B


def gru_model(W, R, B=None, *, opset=14, seq_lens=False, initial_h=False, weights_as="initializer",
              node_name="gru", elem=TensorProto.FLOAT, **attrs):
    """A one-GRU-node model; X (and optionally sequence_lens / initial_h) are graph inputs."""
    attrs.setdefault("hidden_size", R.shape[-1])
    attrs = {k: v for k, v in attrs.items() if v is not None}  # hidden_size=None: left for R to decide
    nodes, initializers = [], []
    for name, array in (("W", W), ("R", R), ("B", B)):
        if array is None:
            continue
        if weights_as == "initializer":
            initializers.append(numpy_helper.from_array(array, name))
        else:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array)))
    inputs = ["X", "W", "R", "B" if B is not None else "", "seq" if seq_lens else "", "h0" if initial_h else ""]
    while inputs[-1] == "":
        inputs.pop()
    nodes.append(helper.make_node("GRU", inputs, ["Y", "Y_h"], name=node_name, **attrs))
    graph_inputs = [value_info("X", elem)]
    if seq_lens:
        graph_inputs.append(value_info("seq", TensorProto.INT32))
    if initial_h:
        graph_inputs.append(value_info("h0", elem))
    return make_model(nodes, graph_inputs, [value_info("Y", elem), value_info("Y_h", elem)], initializers, opset)


def only(models):
    assert len(models) == 1, list(models)
    return next(iter(models.values()))


def compare_with_ort(onnx_model, converted, x, initial_h=None, lengths=None, key=None, atol=ATOL):
    feeds = {"X": x}
    if lengths is not None:
        feeds["seq"] = np.asarray(lengths, dtype=np.int32)
    if initial_h is not None:
        feeds["h0"] = initial_h
    ref = ort_run(onnx_model, feeds)
    Y, Y_h = engine_as_onnx(converted, x, initial_h, None if lengths is None else np.asarray(lengths))
    assert Y.shape == ref["Y"].shape and Y_h.shape == ref["Y_h"].shape
    err = record(key or "ort", Y - ref["Y"], Y_h - ref["Y_h"])
    assert err <= atol
    return ref


# --------------------------------------------------------------------------------------------------
# authority 1: the ONNX backend test cases
# --------------------------------------------------------------------------------------------------

BACKEND_CASES = ["test_gru_defaults", "test_gru_with_initial_bias", "test_gru_seq_length", "test_gru_batchwise",
                 "test_gru_reverse", "test_gru_bidirectional"]


@functools.lru_cache(maxsize=1)
def backend_cases():
    from onnx.backend.test.case import node as case_node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = case_node.collect_testcases("GRU")
    return {case.name: case for case in cases if case.name.startswith("test_gru")}


def test_backend_case_list_is_complete():
    """A new GRU case in a future onnx release must be added to BACKEND_CASES, not silently skipped."""
    assert sorted(backend_cases()) == sorted(BACKEND_CASES)


def _bake_inputs_into_initializers(case_model, feeds, keep):
    """The backend cases feed W/R/B as graph inputs; the importer needs them constant, so they become
    initializers holding exactly the case's data."""
    model = onnx.ModelProto()
    model.CopyFrom(case_model)
    graph = model.graph
    kept = [i for i in graph.input if i.name in keep]
    for name, array in feeds.items():
        if name not in keep:
            graph.initializer.append(numpy_helper.from_array(array, name))
    del graph.input[:]
    graph.input.extend(kept)
    return model


@pytest.mark.parametrize("name", BACKEND_CASES)
def test_onnx_backend_case(name):
    case = backend_cases()[name]
    inputs, expected = case.data_sets[0]
    graph = case.model.graph
    feeds = dict(zip([i.name for i in graph.input], inputs))
    expected = dict(zip([o.name for o in graph.output], expected))
    node = graph.node[0]
    runtime = {node.input[0]} | {n for n in node.input[4:] if n}  # X, sequence_lens, initial_h
    model = _bake_inputs_into_initializers(case.model, feeds, runtime)

    converted = only(from_onnx.load(model))
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    assert converted.batch_first == (layout == 1)
    x = feeds[node.input[0]]
    h0 = feeds.get(node.input[5]) if len(node.input) > 5 and node.input[5] else None
    lengths = feeds.get(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    Y, Y_h = engine_as_onnx(converted, x, h0, lengths)
    ours = dict(zip(node.output, (Y, Y_h)))
    diffs = []
    for out_name, want in expected.items():
        assert ours[out_name].shape == want.shape, out_name
        diffs.append(ours[out_name] - want)
    assert record(name, *diffs) <= ATOL


# --------------------------------------------------------------------------------------------------
# authority 2: PyTorch, through torch.onnx.export (TorchScript exporter)
# --------------------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _export(module, args, path, *, fold, opset, input_names, output_names, dynamic_axes=None):
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, do_constant_folding=fold, opset_version=opset,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)


def _chain(models, x, h0_layers=None, lengths=None):
    """Feed layer l's y into layer l+1 (the GRU nodes of a torch export, in graph order)."""
    states = []
    for index, model in enumerate(models):
        h0 = None if h0_layers is None else h0_layers[index]
        x, h_n = model(x, h0=h0, lengths=lengths)
        states.append(h_n)
    return x, np.concatenate(states, axis=0)


TORCH_CASES = [
    # layers, bidirectional, batch_first, constant folding, opset, bias, with h0
    (1, False, False, False, 14, True, False),
    (1, False, False, True, 14, True, False),
    (1, True, True, False, 9, True, False),     # opset 9: Slice / Unsqueeze take attributes
    (2, False, True, False, 11, True, False),
    (2, True, False, True, 13, True, False),
    (2, True, False, False, 17, False, False),  # bias=False: no B input
    (3, True, True, False, 14, True, True),     # h0 given: initial_h is a run-time Slice of it
    (3, False, False, True, 7, True, True),
]


@pytest.mark.parametrize("layers,bidirectional,batch_first,fold,opset,bias,with_h0", TORCH_CASES)
def test_torch_export_round_trip(tmp_path, layers, bidirectional, batch_first, fold, opset, bias, with_h0):
    torch = _torch()
    torch.manual_seed(layers * 10 + opset)
    module = torch.nn.GRU(5, 7, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                          bias=bias).eval()
    D = 2 if bidirectional else 1
    T, B = 6, 3
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5))
    h0 = torch.randn(layers * D, B, 7) if with_h0 else None
    path = tmp_path / "gru.onnx"
    args = (x, h0) if with_h0 else (x,)
    names = ["x", "h0"] if with_h0 else ["x"]
    _export(module, args, path, fold=fold, opset=opset, input_names=names, output_names=["y", "h_n"])

    models = list(from_onnx.load(path).values())
    assert len(models) == layers
    for model in models:
        assert model.linear_before_reset and model.num_directions == D and model.hidden_size == 7
        assert not model.batch_first  # the exporter transposes x around layout=0 GRU nodes
        assert model.provenance["framework"] == "onnx" and model.provenance["source"] == "gru.onnx"
        assert model.provenance["opset"] == opset
    assert models[0].has_bias == bias

    with torch.no_grad():
        y_ref, h_ref = module(*args)
    x_np = x.numpy()
    x_time_major = np.ascontiguousarray(x_np.transpose(1, 0, 2)) if batch_first else x_np
    h0_layers = None if h0 is None else [h0.numpy()[k * D:(k + 1) * D] for k in range(layers)]
    y, h_n = _chain(models, x_time_major, h0_layers)
    if batch_first:
        y = y.transpose(1, 0, 2)
    key = f"torch L{layers} bi={bidirectional} bf={batch_first} fold={fold} opset={opset}"
    assert record(key + " vs torch", y - y_ref.numpy(), h_n - h_ref.numpy()) <= ATOL

    feeds = {"x": x_np} if h0 is None else {"x": x_np, "h0": h0.numpy()}
    ref = ort_run(path, feeds)
    assert record(key + " vs ORT", y - ref["y"], h_n - ref["h_n"]) <= ATOL


def test_torch_export_single_layer_module_equivalence(tmp_path):
    """For a 1-layer export the single node reproduces the module, h_n included, at every length."""
    torch = _torch()
    torch.manual_seed(3)
    module = torch.nn.GRU(4, 6, bidirectional=True).eval()
    path = tmp_path / "one.onnx"
    _export(module, (torch.randn(5, 2, 4),), path, fold=False, opset=14, input_names=["x"],
            output_names=["y", "h_n"], dynamic_axes={"x": {0: "T", 1: "B"}})
    model = only(from_onnx.load(path))
    for T, B in ((1, 1), (9, 4)):
        x = torch.randn(T, B, 4)
        with torch.no_grad():
            y_ref, h_ref = module(x)
        y, h_n = model(x.numpy())
        assert record(f"torch 1-layer T={T} B={B}", y - y_ref.numpy(), h_n - h_ref.numpy()) <= ATOL


@pytest.mark.parametrize("fold", [False, True])
def test_torch_export_packed_sequence(tmp_path, fold):
    """pack_padded_sequence -> GRU -> pad_packed_sequence exports lengths as sequence_lens (a run-time
    input, the engine's lengths=)."""
    torch = _torch()
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(3, 5, num_layers=2, bidirectional=True)

        def forward(self, x, lengths):
            packed = pack_padded_sequence(x, lengths, enforce_sorted=True)
            y, h = self.gru(packed)
            y, _ = pad_packed_sequence(y, total_length=x.shape[0])
            return y, h

    torch.manual_seed(4)
    module = Packed().eval()
    x = torch.randn(7, 3, 3)
    lengths = torch.tensor([7, 4, 1])
    path = tmp_path / "packed.onnx"
    _export(module, (x, lengths), path, fold=fold, opset=14, input_names=["x", "lengths"],
            output_names=["y", "h_n"], dynamic_axes={"x": {0: "T", 1: "B"}, "lengths": {0: "B"}})
    models = list(from_onnx.load(path).values())
    assert len(models) == 2
    y, h_n = _chain(models, x.numpy(), lengths=lengths.numpy())
    with torch.no_grad():
        y_ref, h_ref = module(x, lengths)
    assert record(f"torch packed fold={fold} vs torch", y - y_ref.numpy(), h_n - h_ref.numpy()) <= ATOL
    ref = ort_run(path, {"x": x.numpy(), "lengths": lengths.numpy()})
    assert record(f"torch packed fold={fold} vs ORT", y - ref["y"], h_n - ref["h_n"]) <= ATOL


# --------------------------------------------------------------------------------------------------
# authority 3: ONNX Runtime on hand-built graphs
# --------------------------------------------------------------------------------------------------

VARIANTS = [
    # direction, linear_before_reset, extra attributes
    ("forward", 0, {}),
    ("forward", 1, {}),
    ("reverse", 0, {}),
    ("reverse", 1, {"clip": 0.7}),
    ("bidirectional", 0, {}),
    ("bidirectional", 1, {"clip": 1.5}),
    ("forward", 0, {"activations": ["HardSigmoid", "LeakyRelu"], "activation_alpha": [0.3, 0.05],
                    "activation_beta": [0.45]}),
    ("bidirectional", 1, {"activations": ["Sigmoid", "ScaledTanh", "HardSigmoid", "Softsign"],
                          "activation_alpha": [0.9, 0.25], "activation_beta": [1.1, 0.55]}),
    ("reverse", 0, {"activations": ["Sigmoid", "Elu"], "activation_alpha": [0.8]}),
    ("forward", 1, {"activations": ["Sigmoid", "Softplus"]}),
]


@pytest.mark.parametrize("direction,lbr,extra", VARIANTS)
@pytest.mark.parametrize("weights_as", ["initializer", "constant"])
def test_attribute_variants_vs_ort(direction, lbr, extra, weights_as):
    rng = np.random.default_rng(len(direction) + lbr)
    D = 2 if direction == "bidirectional" else 1
    H, I, T, B = 4, 3, 6, 3
    W, R, Bias = random_weights(rng, D, H, I)
    model = gru_model(W, R, Bias, direction=direction, linear_before_reset=lbr, weights_as=weights_as,
                      seq_lens=True, initial_h=True, **extra)
    converted = only(from_onnx.load(model))
    assert converted.direction == direction and converted.linear_before_reset == bool(lbr)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.standard_normal((D, B, H)).astype(np.float32)
    compare_with_ort(model, converted, x, h0, [T, 4, 1], key=f"variant {direction} lbr={lbr} {extra}")


def test_two_activation_names_shared_by_both_directions():
    """The spec lists 2*D names; ONNX Runtime refuses 2 names on a bidirectional node, the importer
    (like the engine) reads them as shared.  Authority: ORT on the same node with the names doubled."""
    rng = np.random.default_rng(10)
    W, R, B = random_weights(rng, 2, 3, 2)
    extra = {"activation_alpha": [0.25], "activation_beta": [0.6]}
    shared = gru_model(W, R, B, direction="bidirectional", activations=["HardSigmoid", "Tanh"], **extra)
    doubled = gru_model(W, R, B, direction="bidirectional",
                        activations=["HardSigmoid", "Tanh", "HardSigmoid", "Tanh"],
                        activation_alpha=[0.25, 0.25], activation_beta=[0.6, 0.6])
    converted = only(from_onnx.load(shared))
    compare_with_ort(doubled, converted, rng.standard_normal((4, 2, 2)).astype(np.float32),
                     key="2 activation names, bidirectional")


def test_sequence_lens_zero_length_vs_ort():
    """Length 0 without initial_h: ONNX Runtime and the engine both give Y = 0 and Y_h = 0."""
    rng = np.random.default_rng(11)
    W, R, B = random_weights(rng, 2, 3, 2)
    model = gru_model(W, R, B, direction="bidirectional", seq_lens=True)
    converted = only(from_onnx.load(model))
    x = rng.standard_normal((5, 4, 2)).astype(np.float32)
    compare_with_ort(model, converted, x, None, [5, 0, 3, 2], key="sequence_lens with a 0")


@pytest.mark.parametrize("lbr", [0, 1])
def test_float64_weights_vs_reference_evaluator(lbr):
    """ONNX Runtime's GRU has no double kernel; the ONNX reference evaluator computes in float64."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(12)
    W, R, B = random_weights(rng, 2, 4, 3, dtype=np.float64)
    model = gru_model(W, R, B, direction="bidirectional", linear_before_reset=lbr, initial_h=True,
                      elem=TensorProto.DOUBLE)
    converted = only(from_onnx.load(model))
    assert converted.dtype == np.float64
    x = rng.standard_normal((5, 2, 3))
    h0 = rng.standard_normal((2, 2, 4))
    ref_Y, ref_Y_h = ReferenceEvaluator(model).run(None, {"X": x, "h0": h0})
    Y, Y_h = engine_as_onnx(converted, x, h0)
    assert record(f"float64 lbr={lbr} vs reference", Y - ref_Y, Y_h - ref_Y_h) <= ATOL64


def test_float16_weights_widen_to_float32():
    rng = np.random.default_rng(13)
    W, R, B = random_weights(rng, 1, 3, 2, dtype=np.float16)
    converted = only(from_onnx.load(gru_model(W, R, B, elem=TensorProto.FLOAT16)))
    assert converted.dtype == np.float32
    W2, R2, B2 = converted.onnx_weights()[0]
    np.testing.assert_array_equal(W2, W.astype(np.float32))
    np.testing.assert_array_equal(R2, R.astype(np.float32))
    np.testing.assert_array_equal(B2, B.astype(np.float32))


class Builder:
    """Emits the opset-appropriate form of each op (attributes before opset 10 / 13, inputs after)."""

    def __init__(self, opset):
        self.opset = opset
        self.nodes = []
        self.initializers = []
        self.count = 0

    def fresh(self, prefix):
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, array):
        out = self.fresh("const")
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(np.asarray(array))))
        return out

    def init(self, array):
        out = self.fresh("init")
        self.initializers.append(numpy_helper.from_array(np.asarray(array), out))
        return out

    def op(self, op_type, inputs, outputs=1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), **attrs))
        return outs[0] if outputs == 1 else outs

    def ints(self, values):
        return self.const(np.asarray(values, dtype=np.int64))

    def unsqueeze(self, x, axes):
        if self.opset < 13:
            return self.op("Unsqueeze", [x], axes=axes)
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def squeeze(self, x, axes):
        if self.opset < 13:
            return self.op("Squeeze", [x], axes=axes)
        return self.op("Squeeze", [x, self.ints(axes)])

    def slice(self, x, starts, ends, axes, steps=None):
        if self.opset < 10:
            assert steps is None
            return self.op("Slice", [x], starts=starts, ends=ends, axes=axes)
        inputs = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
        if steps is not None:
            inputs.append(self.ints(steps))
        return self.op("Slice", inputs)

    def reshape(self, x, shape):
        return self.op("Reshape", [x, self.ints(shape)])

    def split(self, x, sizes, axis):
        if self.opset < 13:
            return self.op("Split", [x], outputs=len(sizes), axis=axis, split=sizes)
        return self.op("Split", [x, self.ints(sizes)], outputs=len(sizes), axis=axis)


def _rzn(block, H):
    """(z, r, h) rows -> PyTorch-style (r, z, n) rows, for storing weights the way exporters find them."""
    return np.concatenate([block[H:2 * H], block[:H], block[2 * H:]], axis=0)


@pytest.mark.parametrize("opset", [9, 11, 13, 18])
def test_foldable_chains_vs_ort(opset):
    """Weights reach the GRU node only through constant-foldable chains; ONNX Runtime evaluates the
    same chains itself."""
    rng = np.random.default_rng(opset)
    H, I, T, Bt = 4, 3, 5, 2
    W, R, B = random_weights(rng, 2, H, I)
    g = Builder(opset)
    zrh_from_rzn = np.concatenate([np.arange(H, 2 * H), np.arange(H), np.arange(2 * H, 3 * H)])

    # W: each direction stored transposed, in (r, z, n) order, as float64 -> Cast -> Transpose ->
    # Gather (negative indices) -> Unsqueeze; the two directions joined by Concat.
    w_dirs = []
    for d in range(2):
        stored = g.init(_rzn(W[d], H).T.astype(np.float64))
        cast = g.op("Cast", [stored], to=TensorProto.FLOAT)
        transposed = g.op("Transpose", [cast], perm=[1, 0])
        gathered = g.op("Gather", [transposed, g.const((zrh_from_rzn - 3 * H).astype(np.int64))], axis=0)
        w_dirs.append(g.unsqueeze(gathered, [0]))
    w_name = g.op("Concat", w_dirs, axis=0)

    # R: one flat Constant (value_floats) -> Reshape -> per direction, Slice the three gate blocks and
    # Concat them; Unsqueeze twice and Squeeze once; opset >= 10 adds a double reversal with steps -1.
    g.nodes.append(helper.make_node("Constant", [], ["r_flat"], value_floats=R.reshape(-1).tolist()))
    r_all = g.reshape("r_flat", [2, 3 * H, H])
    if opset >= 10:
        reversed_once = g.slice(r_all, [-1], [INT64_MIN], [1], [-1])
        r_all = g.slice(reversed_once, [INT64_MAX], [INT64_MIN], [-2], [-1])
    blocks = [g.slice(r_all, [k * H], [(k + 1) * H], [1]) for k in range(3)]
    r_cat = g.op("Concat", blocks, axis=1)
    r_name = g.squeeze(g.unsqueeze(r_cat, [0, 2]), [2])
    r_name = g.squeeze(r_name, [0])

    # B: initializer (2, 6H) -> Split into Wb / Rb halves -> Concat -> Identity; Expand (opset >= 8).
    halves = g.split(g.init(B), [3 * H, 3 * H], axis=1)
    b_cat = g.op("Identity", [g.op("Concat", halves, axis=1)])
    b_name = g.op("Expand", [b_cat, g.ints([2, 1])])

    g.nodes.append(helper.make_node("GRU", ["X", w_name, r_name, b_name], ["Y", "Y_h"], name="chained",
                                    direction="bidirectional", hidden_size=H))
    model = make_model(g.nodes, [value_info("X")], [value_info("Y"), value_info("Y_h")], g.initializers, opset)
    converted = from_onnx.load(model)["chained"]
    W2, R2, B2 = converted.onnx_weights()[0]
    np.testing.assert_allclose(W2, W, rtol=0, atol=1e-7)  # float32 -> float64 -> float32 is exact
    np.testing.assert_array_equal(R2, R)
    np.testing.assert_array_equal(B2, B)
    x = rng.standard_normal((T, Bt, I)).astype(np.float32)
    compare_with_ort(model, converted, x, key=f"foldable chain opset {opset}")


def test_more_folded_ops_vs_ort():
    """Shape / ConstantOfShape / CastLike / Split(num_outputs) / Reshape with 0 and -1 / Gather on axis 1."""
    opset = 18
    rng = np.random.default_rng(21)
    H, I = 3, 2
    W, R, B = random_weights(rng, 1, H, I)
    g = Builder(opset)
    # W: Reshape with 0 (copy) and -1 (infer), then Gather the identity permutation on axis 1
    w = g.reshape(g.init(W.reshape(1, 3 * H * I)), [0, -1, I])
    w = g.op("Gather", [w, g.const(np.arange(3 * H, dtype=np.int32))], axis=1)
    # R: built as float64 and CastLike'd to a float32 Constant
    r = g.op("CastLike", [g.init(R.astype(np.float64)), g.const(np.zeros(1, np.float32))])
    # B: Split(num_outputs=2) then Concat, plus an all-zeros addend shaped by Shape -> ConstantOfShape
    parts = g.op("Split", [g.init(B)], outputs=2, axis=1, num_outputs=2)
    b = g.op("Concat", parts, axis=1)
    zeros = g.op("ConstantOfShape", [g.op("Shape", [b])],
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    b = g.op("Concat", [g.slice(b, [0], [6 * H], [1]), g.slice(zeros, [0], [0], [1])], axis=1)
    g.nodes.append(helper.make_node("GRU", ["X", w, r, b], ["Y", "Y_h"], name="more", hidden_size=H))
    model = make_model(g.nodes, [value_info("X")], [value_info("Y"), value_info("Y_h")], g.initializers, opset)
    converted = from_onnx.load(model)["more"]
    x = rng.standard_normal((4, 2, I)).astype(np.float32)
    compare_with_ort(model, converted, x, key="more folded ops")


def test_deep_identity_chain_folds_without_recursion():
    rng = np.random.default_rng(22)
    W, R, B = random_weights(rng, 1, 2, 2)
    g = Builder(14)
    w = g.init(W)
    for _ in range(3000):
        w = g.op("Identity", [w])
    g.nodes.append(helper.make_node("GRU", ["X", w, g.init(R), g.init(B)], ["Y", "Y_h"], name="deep"))
    model = make_model(g.nodes, [value_info("X")], [value_info("Y"), value_info("Y_h")], g.initializers)
    converted = from_onnx.load(model)["deep"]
    np.testing.assert_array_equal(converted.onnx_weights()[0][0], W)


# --------------------------------------------------------------------------------------------------
# initial_h, layout=1 and the GRU-1 dialect
# --------------------------------------------------------------------------------------------------

def _with_initial_h_node(W, R, B, make_h0_nodes, direction="forward"):
    nodes = make_h0_nodes()
    nodes.append(helper.make_node("GRU", ["X", "W", "R", "B", "", "h0"], ["Y", "Y_h"], name="gru",
                                  direction=direction, hidden_size=R.shape[2]))
    inits = [numpy_helper.from_array(a, n) for n, a in (("W", W), ("R", R), ("B", B))]
    return make_model(nodes, [value_info("X")], [value_info("Y"), value_info("Y_h")], inits)


def _runtime_shape_nodes(fill_name):
    """Expand(fill, [D, batch(X), H]): the shape torch.onnx.export writes for h0=None."""
    return [
        helper.make_node("Shape", ["X"], ["x_shape"]),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Gather", ["x_shape", "one"], ["batch"], axis=0),
        helper.make_node("Constant", [], ["d"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], ["h"], value=numpy_helper.from_array(np.array([3], np.int64))),
        helper.make_node("Concat", ["d", "batch", "h"], ["h0_shape"], axis=0),
        helper.make_node("Expand", [fill_name, "h0_shape"], ["h0"]),
    ]


def test_initial_h_constant_zeros_accepted_vs_ort():
    rng = np.random.default_rng(31)
    W, R, B = random_weights(rng, 1, 3, 2)

    def constant(name, shape):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.zeros(shape, np.float32)))

    def zero_fill():
        return [constant("zero", (1, 1, 3))] + _runtime_shape_nodes("zero")
    model = _with_initial_h_node(W, R, B, zero_fill)
    converted = only(from_onnx.load(model))
    compare_with_ort(model, converted, rng.standard_normal((4, 2, 2)).astype(np.float32), key="initial_h Expand(0)")

    def constant_zeros():
        return [constant("h0", (1, 2, 3))]
    model = _with_initial_h_node(W, R, B, constant_zeros)
    converted = only(from_onnx.load(model))
    compare_with_ort(model, converted, rng.standard_normal((4, 2, 2)).astype(np.float32), key="initial_h zeros")


@pytest.mark.parametrize("form", ["constant", "initializer", "expand", "constant_of_shape"])
def test_initial_h_constant_nonzero_refused(form):
    rng = np.random.default_rng(32)
    W, R, B = random_weights(rng, 1, 3, 2)
    half = np.full((1, 2, 3), 0.5, np.float32)

    def nodes():
        if form == "constant":
            return [helper.make_node("Constant", [], ["h0"], value=numpy_helper.from_array(half))]
        if form == "initializer":
            return [helper.make_node("Identity", ["h0_init"], ["h0"])]
        if form == "expand":
            return [helper.make_node("Constant", [], ["fill"], value=numpy_helper.from_array(half[:, :1]))] \
                + _runtime_shape_nodes("fill")
        return _runtime_shape_nodes("unused")[:-1] + [
            helper.make_node("ConstantOfShape", ["h0_shape"], ["h0"],
                             value=numpy_helper.from_array(np.array([0.5], np.float32)))]
    model = _with_initial_h_node(W, R, B, nodes)
    if form == "initializer":
        model.graph.initializer.append(numpy_helper.from_array(half, "h0_init"))
    with pytest.raises(ValueError, match=r"GRU node 'gru'.*initial_h.*non-zero"):
        from_onnx.load(model)


def test_constant_sequence_lens_refused():
    rng = np.random.default_rng(33)
    W, R, B = random_weights(rng, 1, 3, 2)
    model = gru_model(W, R, B)
    model.graph.initializer.append(numpy_helper.from_array(np.array([2, 2], np.int32), "lens"))
    model.graph.node[-1].input.extend(["lens"])
    with pytest.raises(ValueError, match=r"GRU node 'gru'.*sequence_lens.*constant"):
        from_onnx.load(model)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_layout1_vs_reference_evaluator_and_ort(direction):
    """layout=1 (ORT refuses it): against onnx.reference, and against ORT running the same weights with
    layout=0 on transposed inputs, sequence_lens and clip included."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(41)
    D = 2 if direction == "bidirectional" else 1
    H, I, T, Bt = 4, 3, 5, 3
    W, R, B = random_weights(rng, D, H, I)
    x_bt = rng.standard_normal((Bt, T, I)).astype(np.float32)
    h0_bd = rng.standard_normal((Bt, D, H)).astype(np.float32)

    model1 = gru_model(W, R, B, direction=direction, layout=1, initial_h=True)
    converted = only(from_onnx.load(model1))
    assert converted.batch_first
    Y, Y_h = engine_as_onnx(converted, x_bt, h0_bd)
    ref_Y, ref_Y_h = ReferenceEvaluator(model1).run(None, {"X": x_bt, "h0": h0_bd})
    assert Y.shape == (Bt, T, D, H) and Y_h.shape == (Bt, D, H)
    assert record(f"layout=1 {direction} vs reference", Y - ref_Y, Y_h - ref_Y_h) <= ATOL

    # the same weights, layout=0, through ORT with sequence_lens and clip
    lengths = np.array([T, 2, 1])
    model1c = gru_model(W, R, B, direction=direction, layout=1, initial_h=True, seq_lens=True, clip=0.9)
    model0c = gru_model(W, R, B, direction=direction, initial_h=True, seq_lens=True, clip=0.9)
    converted = only(from_onnx.load(model1c))
    Y, Y_h = engine_as_onnx(converted, x_bt, h0_bd, lengths)
    ref = ort_run(model0c, {"X": np.ascontiguousarray(x_bt.transpose(1, 0, 2)),
                            "h0": np.ascontiguousarray(h0_bd.transpose(1, 0, 2)),
                            "seq": lengths.astype(np.int32)})
    assert record(f"layout=1 {direction} vs ORT layout=0",
                  Y - ref["Y"].transpose(2, 0, 1, 3), Y_h - ref["Y_h"].transpose(1, 0, 2)) <= ATOL


def test_gru1_dialect_output_sequence_and_default_lbr():
    """GRU-1 (opset 1-2) has output_sequence and no linear_before_reset: it computes what GRU-7 with
    lbr=0 computes, which ONNX Runtime runs."""
    rng = np.random.default_rng(42)
    W, R, B = random_weights(rng, 1, 3, 2)
    model1 = gru_model(W, R, B, opset=1, output_sequence=1)
    converted = only(from_onnx.load(model1))
    assert converted.linear_before_reset is False and converted.provenance["opset"] == 1
    compare_with_ort(gru_model(W, R, B, opset=7), converted, rng.standard_normal((4, 2, 2)).astype(np.float32),
                     key="GRU-1 as GRU-7")

    with pytest.raises(ValueError, match=r"'linear_before_reset' is not defined for GRU in opset 1"):
        from_onnx.load(gru_model(W, R, B, opset=1, linear_before_reset=1))
    with pytest.raises(ValueError, match=r"'layout' is not defined for GRU in opset 13"):
        from_onnx.load(gru_model(W, R, B, opset=13, layout=0))
    with pytest.raises(ValueError, match=r"'output_sequence' is not defined for GRU in opset 7"):
        from_onnx.load(gru_model(W, R, B, opset=7, output_sequence=1))


# --------------------------------------------------------------------------------------------------
# inputs, keys, provenance
# --------------------------------------------------------------------------------------------------

def test_path_str_and_modelproto_agree(tmp_path):
    rng = np.random.default_rng(51)
    W, R, B = random_weights(rng, 1, 3, 2)
    model = gru_model(W, R, B)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((3, 2, 2)).astype(np.float32)
    outs = []
    for source in (path, str(path), model):
        converted = from_onnx.load(source)["gru"]
        outs.append(converted(x)[0])
        expected_source = "<ModelProto>" if source is model else "m.onnx"
        assert converted.provenance == {"framework": "onnx", "source": expected_source, "node": "gru",
                                        "opset": 14}
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    with pytest.raises(TypeError):
        from_onnx.load(12)


def test_keys_unnamed_and_duplicate_nodes():
    rng = np.random.default_rng(52)
    W, R, B = random_weights(rng, 1, 3, 2)
    inits = [numpy_helper.from_array(a, n) for n, a in (("W", W), ("R", R), ("B", B))]
    nodes = [
        helper.make_node("GRU", ["X", "W", "R", "B"], ["Y1", "Yh1"], name="same"),
        helper.make_node("GRU", ["X", "W", "R", "B"], ["Y2", "Yh2"], name="same"),
        helper.make_node("GRU", ["X", "W", "R", "B"], ["", "Yh3"]),
    ]
    model = make_model(nodes, [value_info("X")], [value_info(n) for n in ("Y1", "Yh1", "Y2", "Yh2", "Yh3")], inits)
    models = from_onnx.load(model)
    assert list(models) == ["same", "Y2", "Yh3"]
    assert [m.provenance["node"] for m in models.values()] == ["same", "Y2", "Yh3"]


def test_model_without_gru_refused():
    model = make_model([helper.make_node("Relu", ["X"], ["Y"])], [value_info("X")], [value_info("Y")])
    with pytest.raises(ValueError, match="no GRU node"):
        from_onnx.load(model)


# --------------------------------------------------------------------------------------------------
# hostile and malformed models
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _small_model_bytes():
    rng = np.random.default_rng(61)
    W, R, B = random_weights(rng, 2, 8, 5)
    return gru_model(W, R, B, direction="bidirectional").SerializeToString()


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_truncated_file_refused(tmp_path, fraction):
    data = _small_model_bytes()
    cut = max(0, min(len(data) - 1, int(len(data) * fraction)))
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError):
        from_onnx.load(path)


@pytest.mark.parametrize("seed", range(6))
def test_garbage_file_refused(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "garbage.onnx"
    path.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 4000)), dtype=np.uint8).tobytes())
    with pytest.raises(ValueError):
        from_onnx.load(path)


def test_text_and_directory_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("this is not an ONNX model\n" * 20)
    with pytest.raises(ValueError):
        from_onnx.load(path)
    with pytest.raises(ValueError, match="not a regular file"):
        from_onnx.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        from_onnx.load(tmp_path / "missing.onnx")


def _shapes(D, H, I, **override):
    shapes = {"W": (D, 3 * H, I), "R": (D, 3 * H, H), "B": (D, 6 * H)}
    shapes.update(override)
    return shapes


@pytest.mark.parametrize("direction,shapes,attrs,message", [
    ("forward", _shapes(2, 3, 2), {}, r"W \('W'\) has shape \(2, 9, 2\)"),
    ("bidirectional", _shapes(1, 3, 2), {}, r"has shape \(1, 9, 2\)"),
    ("forward", _shapes(1, 3, 2, R=(1, 12, 3)), {}, r"R \('R'\) has shape \(1, 12, 3\)"),
    ("forward", _shapes(1, 3, 2, R=(1, 9, 4)), {"hidden_size": 3}, r"R \('R'\) has shape \(1, 9, 4\)"),
    ("forward", _shapes(1, 3, 2, B=(1, 17)), {}, r"B \('B'\) has shape \(1, 17\)"),
    ("forward", _shapes(1, 3, 2, B=(18,)), {}, r"B \('B'\) has shape \(18,\)"),
    ("forward", _shapes(1, 3, 2, W=(9, 2)), {}, r"W \('W'\) has shape \(9, 2\)"),
    ("forward", _shapes(1, 3, 2, W=(1, 12, 2)), {}, r"W \('W'\) has shape \(1, 12, 2\)"),
    ("forward", _shapes(1, 3, 2), {"hidden_size": 4}, r"hidden_size=4"),
])
def test_inconsistent_shapes_refused(direction, shapes, attrs, message):
    arrays = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    model = gru_model(arrays["W"], arrays["R"], arrays["B"], direction=direction,
                      hidden_size=attrs.get("hidden_size"))
    with pytest.raises(ValueError, match=r"GRU node 'gru'.*" + message):
        from_onnx.load(model)


def test_inconsistent_shapes_caught_after_folding():
    """Shapes hidden behind a chain are checked once folded (static checks cannot see them)."""
    W, R, B = random_weights(np.random.default_rng(62), 1, 3, 2)
    model = gru_model(W, R, B)
    model.graph.node.insert(0, helper.make_node("Identity", ["R_raw"], ["R_chain"]))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros((1, 9, 2), np.float32), "R_raw"))
    model.graph.node[-1].input[2] = "R_chain"
    with pytest.raises(ValueError, match=r"GRU node 'gru'.*R has shape \(1, 9, 2\)"):
        from_onnx.load(model)


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        start = time.perf_counter()
        try:
            fn()
        finally:
            elapsed = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, elapsed


def test_absurd_hidden_size_refused_quickly_without_allocating():
    R = np.zeros((1, 9, 3), np.float32)
    model = gru_model(np.zeros((1, 9, 2), np.float32), R, None, hidden_size=10 ** 9)
    errors = []

    def attempt():
        try:
            from_onnx.load(model)
        except ValueError as exc:
            errors.append(str(exc))

    peak, elapsed = _peak_bytes(attempt)
    assert errors and "hidden_size=1000000000" in errors[0] and "max_bytes" in errors[0]
    assert elapsed < 1.0 and peak < 1 << 20


@pytest.mark.parametrize("where", ["initializer", "constant", "expand", "external"])
def test_tensor_claiming_huge_dims_refused_before_allocating(tmp_path, where):
    """A tensor whose dims claim ~1.2 TB (with a few bytes of data) hits the memory cap from its header."""
    H, I = 100_000, 1_000_000
    model = gru_model(np.zeros((1, 3, 2), np.float32), np.zeros((1, 3, 1), np.float32), None, hidden_size=None)
    node = model.graph.node[-1]
    del model.graph.initializer[:]
    # both claim consistent shapes (H = 100000), so only the memory cap can refuse them
    huge_w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1, 3 * H, I], raw_data=b"\0" * 16)
    huge_r = TensorProto(name="R", data_type=TensorProto.FLOAT, dims=[1, 3 * H, H], raw_data=b"\0" * 16)
    model.graph.initializer.append(huge_r)
    assert list(node.input) == ["X", "W", "R"]
    if where == "initializer":
        model.graph.initializer.append(huge_w)
    elif where == "constant":
        model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], value=huge_w))
    elif where == "expand":
        model.graph.node.insert(0, helper.make_node("Constant", [], ["fill"], value=numpy_helper.from_array(
            np.zeros((1, 1, 1), np.float32))))
        model.graph.node.insert(1, helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(
            np.array([1, 3 * H, I], np.int64))))
        model.graph.node.insert(2, helper.make_node("Expand", ["fill", "shape"], ["W"]))
    else:
        (tmp_path / "w.bin").write_bytes(b"\0" * 64)
        huge_w.ClearField("raw_data")
        huge_w.data_location = TensorProto.EXTERNAL
        huge_w.external_data.add(key="location", value="w.bin")
        model.graph.initializer.append(huge_w)
        path = tmp_path / "huge.onnx"
        onnx.save(model, str(path))
        model = path
    errors = []

    def attempt():
        try:
            from_onnx.load(model)
        except ValueError as exc:
            errors.append(str(exc))

    peak, elapsed = _peak_bytes(attempt)
    assert errors and "max_bytes" in errors[0], errors
    assert elapsed < 2.0 and peak < 4 << 20


def test_max_bytes_cap_applies_to_legitimate_models(tmp_path):
    rng = np.random.default_rng(63)
    W, R, B = random_weights(rng, 1, 16, 8)
    model = gru_model(W, R, B)
    with pytest.raises(ValueError, match="max_bytes=1000"):
        from_onnx.load(model, max_bytes=1000)
    assert only(from_onnx.load(model, max_bytes=W.nbytes + R.nbytes + B.nbytes + 64)).hidden_size == 16
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="over the memory cap"):
        from_onnx.load(path, max_bytes=path.stat().st_size - 1)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes"):
            from_onnx.load(model, max_bytes=bad)


def test_raw_data_length_mismatch_refused():
    W, R, B = random_weights(np.random.default_rng(64), 1, 3, 2)
    model = gru_model(W, R, B)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    with pytest.raises(ValueError, match=r"GRU node 'gru'.*W.*raw_data holds 68 bytes.*needs 72"):
        from_onnx.load(model)


def test_weights_from_graph_input_refused():
    W, R, B = random_weights(np.random.default_rng(65), 1, 3, 2)
    model = gru_model(W, R, B)
    del model.graph.initializer[0]
    model.graph.input.append(value_info("W"))
    with pytest.raises(ValueError, match=r"GRU node 'gru': input W \('W'\) is not a constant: it is the graph input"):
        from_onnx.load(model)


def test_weights_from_unfoldable_op_refused():
    W, R, B = random_weights(np.random.default_rng(66), 1, 3, 2)
    model = gru_model(W, R, B)
    model.graph.node.insert(0, helper.make_node("Add", ["R_a", "R_a"], ["R2"], name="adder"))
    model.graph.initializer[1].name = "R_a"
    model.graph.node[-1].input[2] = "R2"
    with pytest.raises(ValueError, match=r"input R \('R2'\) is not a constant: it is computed by Add node 'adder'"):
        from_onnx.load(model)


def test_graph_cycle_refused():
    W, R, B = random_weights(np.random.default_rng(67), 1, 3, 2)
    model = gru_model(W, R, B)
    model.graph.node.insert(0, helper.make_node("Identity", ["b"], ["a"]))
    model.graph.node.insert(0, helper.make_node("Identity", ["a"], ["b"]))
    model.graph.node[-1].input[1] = "a"
    with pytest.raises(ValueError, match="cycle"):
        from_onnx.load(model)


@pytest.mark.parametrize("attrs,message", [
    ({"activations": ["Sigmoid", "Swish"]}, r"unknown activation 'Swish'"),
    ({"activations": ["Sigmoid"]}, r"activations must list 2 names"),
    ({"direction": "sideways"}, r"direction must be"),
    ({"layout": 2}, r"layout must be 0 or 1"),
    ({"linear_before_reset": 3}, r"linear_before_reset must be 0 or 1"),
    ({"clip": -1.0}, r"clip must be positive"),
    ({"hidden_size": 0}, r"hidden_size must be positive"),
    ({"hidden_size": 3.0}, r"'hidden_size' should be of type int"),
    ({"foo": 1}, r"'foo' is not defined for GRU"),
    ({"activation_alpha": [0.5]}, r"activation_alpha"),
])
def test_bad_attributes_refused(attrs, message):
    W, R, B = random_weights(np.random.default_rng(68), 1, 3, 2)
    attrs = dict(attrs)
    model = gru_model(W, R, B, **attrs)
    with pytest.raises(ValueError, match=r"GRU node 'gru'.*" + message):
        from_onnx.load(model)


# --------------------------------------------------------------------------------------------------
# external data
# --------------------------------------------------------------------------------------------------

def _external_model(directory, rng, location="weights.bin"):
    """A bidirectional GRU whose W, R and B live in one external file; returns (path, model, weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    W, R, B = random_weights(rng, 2, 4, 3)
    model = gru_model(W, R, B, direction="bidirectional", seq_lens=True)
    path = directory / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path, (W, R, B)


def _rewrite_external(path, tensor_name, **entries):
    """Edit one tensor's external_data entries in place (location / offset / length)."""
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
    current = {e.key: e.value for e in tensor.external_data}
    current.update({k: str(v) for k, v in entries.items()})
    del tensor.external_data[:]
    for key, value in current.items():
        tensor.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())


def test_external_data_inside_directory_loads_and_matches_ort(tmp_path):
    rng = np.random.default_rng(71)
    path, weights = _external_model(tmp_path / "model", rng)
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    converted = only(from_onnx.load(path))
    for ours, theirs in zip(converted.onnx_weights()[0], weights):
        np.testing.assert_array_equal(ours, theirs)
    x = rng.standard_normal((5, 3, 3)).astype(np.float32)
    lengths = np.array([5, 3, 2])
    ref = ort_run(path, {"X": x, "seq": lengths.astype(np.int32)})
    Y, Y_h = engine_as_onnx(converted, x, None, lengths)
    assert record("external data vs ORT", Y - ref["Y"], Y_h - ref["Y_h"]) <= ATOL


def test_external_data_symlink_inside_directory_accepted(tmp_path):
    path, weights = _external_model(tmp_path / "model", np.random.default_rng(72))
    os.symlink("weights.bin", tmp_path / "model" / "alias.bin")
    (tmp_path / "model" / "sub").mkdir()
    os.symlink("../weights.bin", tmp_path / "model" / "sub" / "alias.bin")  # stays inside
    _rewrite_external(path, "W", location="alias.bin")
    _rewrite_external(path, "R", location="sub/alias.bin")
    converted = only(from_onnx.load(path))
    np.testing.assert_array_equal(converted.onnx_weights()[0][1], weights[1])


def _outside_copy(tmp_path):
    """A copy of the model's weight file outside its directory: the bytes are right, the place is not."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes((tmp_path / "model" / "weights.bin").read_bytes())
    return outside


@pytest.mark.parametrize("attack", ["absolute", "dotdot", "dotdot_hidden", "symlink_out", "symlink_dir_out",
                                    "hardlink", "offset_past_eof", "length_past_eof", "length_mismatch",
                                    "directory", "missing", "bad_offset", "fifo"])
def test_external_data_escapes_refused(tmp_path, attack):
    path, _ = _external_model(tmp_path / "model", np.random.default_rng(73))
    model_dir = tmp_path / "model"
    size = (model_dir / "weights.bin").stat().st_size
    if attack == "absolute":
        _rewrite_external(path, "W", location=str(_outside_copy(tmp_path)))
        message = "absolute path"
    elif attack == "dotdot":
        _outside_copy(tmp_path)
        _rewrite_external(path, "W", location="../outside.bin")
        message = r"'\.\.' component"
    elif attack == "dotdot_hidden":
        _outside_copy(tmp_path)
        _rewrite_external(path, "W", location="sub\\..\\..\\outside.bin")
        message = r"'\.\.' component"
    elif attack == "symlink_out":
        os.symlink(_outside_copy(tmp_path), model_dir / "link.bin")
        _rewrite_external(path, "W", location="link.bin")
        message = "outside the model's directory"
    elif attack == "symlink_dir_out":
        _outside_copy(tmp_path)
        os.symlink(tmp_path, model_dir / "up")
        _rewrite_external(path, "W", location="up/outside.bin")
        message = "outside the model's directory"
    elif attack == "hardlink":
        os.link(_outside_copy(tmp_path), model_dir / "hard.bin")
        _rewrite_external(path, "W", location="hard.bin")
        message = "hard links"
    elif attack == "offset_past_eof":
        _rewrite_external(path, "R", offset=size + 4096)
        message = "past the end"
    elif attack == "length_past_eof":
        _rewrite_external(path, "R", offset=size - 8, length=4 * 12 * 4 * 2)
        message = "runs past the end"
    elif attack == "length_mismatch":
        _rewrite_external(path, "R", length=8)
        message = "does not match"
    elif attack == "directory":
        (model_dir / "adir").mkdir()
        _rewrite_external(path, "W", location="adir")
        message = "not a regular file"
    elif attack == "missing":
        _rewrite_external(path, "W", location="nope.bin")
        message = "cannot open"
    elif attack == "bad_offset":
        _rewrite_external(path, "W", offset="-4")
        message = "not a non-negative integer"
    else:
        os.mkfifo(model_dir / "pipe.bin")
        _rewrite_external(path, "W", location="pipe.bin")
        message = "not a regular file"
    with pytest.raises(ValueError, match=r"GRU node 'gru'.*" + message):
        from_onnx.load(path)


def test_external_data_in_modelproto_needs_a_path(tmp_path):
    path, _ = _external_model(tmp_path / "model", np.random.default_rng(74))
    model = onnx.load(str(path), load_external_data=False)
    with pytest.raises(ValueError, match="pass the model's path"):
        from_onnx.load(model)
    # loaded by onnx itself (external data pulled in), the ModelProto is self-contained and accepted
    assert only(from_onnx.load(onnx.load(str(path)))).hidden_size == 4


def test_caller_modelproto_not_modified(tmp_path):
    W, R, B = random_weights(np.random.default_rng(75), 1, 3, 2)
    model = gru_model(W, R, B)
    before = model.SerializeToString()
    from_onnx.load(model)
    assert model.SerializeToString() == before


def test_onnxruntime_not_imported_by_engine_import():
    """The importer loads onnx lazily and never needs onnxruntime (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, gru_fast, converters.from_onnx; "
            "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules, sorted(sys.modules)")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


def test_initializers_listed_as_inputs_convert_their_value(tmp_path):
    """keep_initializers_as_inputs=True (older exporters' default): the initializer is the value."""
    torch = _torch()
    torch.manual_seed(5)
    module = torch.nn.GRU(3, 4).eval()
    path = tmp_path / "inputs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(4, 2, 3),), str(path), dynamo=False, opset_version=14,
                          input_names=["x"], output_names=["y", "h_n"], keep_initializers_as_inputs=True)
    model = onnx.load(str(path))
    assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}
    converted = only(from_onnx.load(path))
    x = torch.randn(4, 2, 3)
    with torch.no_grad():
        y_ref, h_ref = module(x)
    y, h_n = converted(x.numpy())
    assert record("keep_initializers_as_inputs vs torch", y - y_ref.numpy(), h_n - h_ref.numpy()) <= ATOL


def _if_with_gru_branch(W, R, B):
    branch_inits = [numpy_helper.from_array(a, n) for n, a in (("bW", W), ("bR", R), ("bB", B))]
    branch = helper.make_graph([helper.make_node("GRU", ["X", "bW", "bR", "bB"], ["bY", "bYh"], name="inner")],
                               "then", [], [value_info("bYh")], initializer=branch_inits)
    return helper.make_node("If", ["cond"], ["if_out"], name="if", then_branch=branch, else_branch=branch)


def test_gru_inside_subgraph_not_converted():
    W, R, B = random_weights(np.random.default_rng(76), 1, 3, 2)
    graph_inputs = [value_info("X"), value_info("cond", TensorProto.BOOL)]
    only_nested = make_model([_if_with_gru_branch(W, R, B)], graph_inputs, [value_info("if_out")])
    with pytest.raises(ValueError, match=r"no GRU node; 2 GRU node\(s\) sit inside control-flow subgraphs"):
        from_onnx.load(only_nested)

    both = gru_model(W, R, B)
    both.graph.node.append(_if_with_gru_branch(W, R, B))
    both.graph.input.append(value_info("cond", TensorProto.BOOL))
    with pytest.warns(RuntimeWarning, match="2 GRU node"):
        models = from_onnx.load(both)
    assert list(models) == ["gru"]
