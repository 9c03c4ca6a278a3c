"""``from_onnx.load(stack=True)``: chains of GRU nodes that are exactly a stacked GRU become one model;
and the importer's memory cap covers the engine's packed, padded copy of the weights.

Authorities:
- PyTorch: ``torch.onnx.export(dynamo=False)`` of ``nn.GRU`` with 1-4 layers, uni- and bidirectional,
  batch_first on and off, with and without h0; the stacked model must reproduce the module, and
- the ONNX reference evaluator (``onnx.reference.ReferenceEvaluator``) running the whole exported
  graph, and hand-built graphs (layout=1 chains, Identity / Unsqueeze joins) the same way.
- Graphs where GRU nodes are joined by anything but a plain stack (Relu, Add, MatMul, a transposed
  direction axis, a second consumer, other activations or linear_before_reset, inconsistent initial
  states) must stay separate, with a StackWarning naming the reason; the separate nodes, chained as
  the graph chains them, must reproduce the reference evaluator (so the reason is real).
- ``gru-fast info`` / ``run`` on a stacked export (ONNX Runtime on the shipped classifier).
- Memory: a 233-byte graph whose W is ``Expand(0, [1, 3, 8e6])`` with hidden_size=1 (the engine pads H
  to 16 units) is refused under ``max_bytes=200 MiB`` with the cap named, and the child's peak RSS stays
  within the cap plus the interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from conftest import REPO_ROOT, last_json_line, run_python  # noqa: E402
from converters import from_onnx  # noqa: E402
from converters.from_onnx import StackWarning  # noqa: E402

ATOL = 1e-5


def _max_err(*pairs):
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in pairs)


# --------------------------------------------------------------------------------------------------
# torch.onnx.export of nn.GRU
# --------------------------------------------------------------------------------------------------

TORCH_CASES = [
    # layers, bidirectional, batch_first, with h0, opset
    (1, False, False, False, 14),
    (2, False, True, True, 14),
    (2, True, False, False, 13),
    (3, True, True, True, 14),
    (3, False, True, False, 9),   # Squeeze / Slice take attributes
    (4, False, False, True, 11),
    (4, True, True, False, 17),
]


def _export(tmp_path, layers, bidirectional, batch_first, with_h0, opset, seed=0):
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    module = torch.nn.GRU(5, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).eval()
    D, T, B = 2 if bidirectional else 1, 4, 3
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5))
    h0 = torch.randn(layers * D, B, 8) if with_h0 else None
    args, names = ((x, h0), ["x", "h0"]) if with_h0 else ((x,), ["x"])
    path = tmp_path / "gru.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["y", "h_n"])
    with torch.no_grad():
        y_ref, h_ref = module(*args)
    feeds = {name: a.numpy() for name, a in zip(names, args)}
    return path, feeds, y_ref.numpy(), h_ref.numpy()


@pytest.mark.parametrize("layers,bidirectional,batch_first,with_h0,opset", TORCH_CASES)
def test_torch_export_stacks_into_one_model(tmp_path, layers, bidirectional, batch_first, with_h0, opset):
    path, feeds, y_ref, h_ref = _export(tmp_path, layers, bidirectional, batch_first, with_h0, opset,
                                        seed=layers + 10 * opset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report: the export is exactly a stack
        models = from_onnx.load(path)
    assert len(models) == 1
    (key, model), = models.items()
    graph_nodes = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "GRU"]
    assert key == graph_nodes[0] and model.num_layers == layers
    assert model.num_directions == (2 if bidirectional else 1) and model.hidden_size == 8
    if layers > 1:
        assert model.provenance["stacked_nodes"] == graph_nodes
        assert model.provenance["initial_h"] == ("h0" if with_h0 else None)
    else:
        assert "stacked_nodes" not in model.provenance

    x = feeds["x"]
    x_tm = np.ascontiguousarray(x.transpose(1, 0, 2)) if batch_first else x  # the GRU nodes are layout=0
    y, h_n = model(x_tm, h0=feeds.get("h0"))
    if batch_first:
        y = y.transpose(1, 0, 2)
    assert _max_err((y, y_ref), (h_n, h_ref)) <= ATOL
    y_onnx, h_onnx = ReferenceEvaluator(str(path)).run(None, feeds)
    assert _max_err((y, y_onnx), (h_n, h_onnx)) <= ATOL


def test_stack_false_keeps_one_model_per_node(tmp_path):
    path, feeds, y_ref, h_ref = _export(tmp_path, 3, True, False, True, 14)
    models = from_onnx.load(path, stack=False)
    assert [m.num_layers for m in models.values()] == [1, 1, 1]
    stacked = from_onnx.load(path, stack=True)["/GRU"]
    for layer, single in enumerate(models.values()):
        for ours, theirs in zip(stacked.onnx_weights()[layer], single.onnx_weights()[0]):
            np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(TypeError, match="stack must be True or False"):
        from_onnx.load(path, stack="yes")


# --------------------------------------------------------------------------------------------------
# hand-built two-layer graphs
# --------------------------------------------------------------------------------------------------

T, B, I, H = 4, 3, 5, 8


class Graph:
    """Two GRU nodes 'a' and 'b' (and whatever joins them), run by the reference evaluator."""

    def __init__(self, D=1, layout=0, seed=0):
        self.D, self.layout = D, layout
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs = [], [], [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)]
        self.outputs = []
        self.count = 0

    def const(self, array):
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, **attrs):
        self.count += 1
        out = f"v{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{self.count}", **attrs))
        return out

    def gru(self, name, x, n_in, initial_h="", D=None, **attrs):
        D = D or self.D
        W = self.rng.uniform(-0.4, 0.4, (D, 3 * H, n_in)).astype(np.float32)
        R = self.rng.uniform(-0.4, 0.4, (D, 3 * H, H)).astype(np.float32)
        Bias = self.rng.uniform(-0.2, 0.2, (D, 6 * H)).astype(np.float32)
        attrs.setdefault("linear_before_reset", 1)
        attrs.setdefault("direction", "bidirectional" if D == 2 else "forward")
        inputs = [x, self.const(W), self.const(R), self.const(Bias), "", initial_h]
        while not inputs[-1]:
            inputs.pop()
        self.nodes.append(helper.make_node("GRU", inputs, [f"{name}_Y", f"{name}_Yh"], name=name, hidden_size=H,
                                           layout=self.layout, **attrs))
        return f"{name}_Y"

    def merge_directions(self, y):
        """Y (T, D, B, H) -> (T, B, D*H) as torch.onnx.export writes it (layout=1: (B, T, D, H) -> (B, T, D*H))."""
        if self.layout == 1:
            return self.node("Reshape", [y, self.const(np.array([0, 0, -1], np.int64))])
        if self.D == 1:
            return self.node("Squeeze", [y, self.const(np.array([1], np.int64))])
        moved = self.node("Transpose", [y], perm=[0, 2, 1, 3])
        return self.node("Reshape", [moved, self.const(np.array([0, 0, -1], np.int64))])

    def model(self, *outputs):
        graph = helper.make_graph(self.nodes, "g", self.inputs,
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  initializer=self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])

    def x(self):
        shape = (B, T, I) if self.layout == 1 else (T, B, I)
        return self.rng.standard_normal(shape).astype(np.float32)


def _onnx_y(model, y):
    """The engine's y (layout 0: (T, B, D*H)) in ONNX's Y layout."""
    D = model.num_directions
    if model.batch_first:
        return y.reshape(y.shape[0], y.shape[1], D, H)
    return y.reshape(y.shape[0], y.shape[1], D, H).transpose(0, 2, 1, 3)


def _assert_two_layer_stack(g, proto):
    """``proto`` loads, without a warning, as one 2-layer model keyed "a" that matches the reference
    evaluator on the whole graph."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = from_onnx.load(proto)["a"]
    assert model.num_layers == 2
    x = g.x()
    (Y,) = ReferenceEvaluator(proto).run(None, {"X": x})
    assert _max_err((_onnx_y(model, model(x)[0]), Y)) <= ATOL


def _join_fixed_shape(g, y, target):
    """Y (T, D, B, H) -> Transpose -> Reshape to a constant shape, as torch.onnx.export(dynamo=True) writes
    it without dynamic shapes (torch 2.13, onnxscript 0.7.2): [T, B, D*H] with the export's T and B."""
    moved = g.node("Transpose", [y], perm=[0, 2, 1, 3])
    return g.node("Reshape", [moved, g.const(np.array(target, np.int64))])


@pytest.mark.parametrize("D", [1, 2])
def test_fixed_reshape_stacks_when_the_declared_input_fixes_t_and_b(D):
    g = Graph(D=D, seed=30 + D)
    g.inputs[0] = helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, I])
    g.gru("b", _join_fixed_shape(g, g.gru("a", "X", I), [T, B, D * H]), D * H)
    proto = g.model("b_Y")
    _assert_two_layer_stack(g, proto)


@pytest.mark.parametrize("declared,target,reason", [
    (["T", "B", I], [T, B, 2 * H], r"a fixed size 4 would include the run-time dimension T"),
    ([T, B, I], [B, T, 2 * H], r"shape \[3, 4, 16\] splits a dimension of the input"),
])
def test_fixed_reshape_without_fixed_sizes_stays_separate(declared, target, reason):
    """A fixed Reshape is a stack only for the T and B the declared input fixes: with T and B symbolic,
    or fixed but swapped by the Reshape (a reinterpretation of the data), the nodes stay separate."""
    g = Graph(D=2, seed=40)
    g.inputs[0] = helper.make_tensor_value_info("X", TensorProto.FLOAT, declared)
    g.gru("b", _join_fixed_shape(g, g.gru("a", "X", I), target), 2 * H)
    proto = g.model("b_Y")
    with pytest.warns(StackWarning, match=reason):
        models = from_onnx.load(proto)
    assert list(models) == ["a", "b"]
    x = g.x()
    (Y,) = ReferenceEvaluator(proto).run(None, {"X": x})
    y_a, _ = models["a"](x)
    x_b = _onnx_y(models["a"], y_a).transpose(0, 2, 1, 3).reshape(target)  # what the graph's Reshape does
    y_b, _ = models["b"](np.ascontiguousarray(x_b))
    assert _max_err((_onnx_y(models["b"], y_b), Y)) <= ATOL


@pytest.mark.parametrize("D", [1, 2])
def test_layout1_chain_with_sliced_h0_stacks(D):
    """layout=1 nodes: Y (B, T, D, H) -> Reshape (B, T, D*H); initial_h are slices of h0 (B, 2D, H) on axis 1."""
    g = Graph(D=D, layout=1, seed=D)
    g.inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, None))
    axis = g.const(np.array([1], np.int64))
    first = g.node("Slice", ["h0", g.const(np.array([0], np.int64)), g.const(np.array([D], np.int64)), axis])
    second = g.node("Slice", ["h0", g.const(np.array([D], np.int64)), g.const(np.array([2 * D], np.int64)), axis])
    y_a = g.gru("a", "X", I, initial_h=first)
    g.gru("b", g.merge_directions(y_a), D * H, initial_h=second)
    proto = g.model("b_Y", "a_Yh", "b_Yh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = from_onnx.load(proto)["a"]
    assert model.num_layers == 2 and model.batch_first and model.provenance["initial_h"] == "h0"
    x, h0 = g.x(), g.rng.standard_normal((B, 2 * D, H)).astype(np.float32)
    Y, Yh_a, Yh_b = ReferenceEvaluator(proto).run(None, {"X": x, "h0": h0})
    y, h_n = model(x, h0=np.ascontiguousarray(h0.transpose(1, 0, 2)))
    assert _max_err((_onnx_y(model, y), Y), (h_n.transpose(1, 0, 2), np.concatenate([Yh_a, Yh_b], axis=1))) <= ATOL


def test_identity_and_unsqueeze_squeeze_joins_stack():
    g = Graph(D=1, seed=3)
    joined = g.node("Identity", [g.merge_directions(g.gru("a", "X", I))])
    joined = g.node("Unsqueeze", [joined, g.const(np.array([0], np.int64))])
    joined = g.node("Squeeze", [joined, g.const(np.array([0], np.int64))])
    g.gru("b", joined, H)
    proto = g.model("b_Y")
    _assert_two_layer_stack(g, proto)


def _join_computed_shape(g, y, order=(0, 1, 2, 3)):
    """Y (T, D, B, H) -> (T, B, D*H) as torch.onnx.export(dynamo=True) writes it with dynamic shapes
    (torch 2.13, onnxscript 0.7.2): Transpose, then Reshape to [s0, s1, s2*s3] taken from its Shape
    (``order`` permutes the four sizes)."""
    moved = g.node("Transpose", [y], perm=[0, 2, 1, 3])
    shape = g.node("Shape", [moved])
    parts = [g.node("Slice", [shape, g.const(np.array([k], np.int64)), g.const(np.array([k + 1], np.int64))])
             for k in range(4)]
    product = g.node("Mul", [parts[order[2]], parts[order[3]]])
    product = g.node("Reshape", [product, g.const(np.array([-1], np.int64))])
    return g.node("Reshape", [moved, g.node("Concat", [parts[order[0]], parts[order[1]], product], axis=0)])


@pytest.mark.parametrize("D,order", [(1, (0, 1, 2, 3)), (2, (0, 1, 2, 3)), (2, (0, 1, 3, 2))])
def test_reshape_to_a_shape_computed_from_y_stacks(D, order):
    """[s0, s1, s3*s2] is the same shape as [s0, s1, s2*s3]: it stacks too."""
    g = Graph(D=D, seed=20 + D)
    g.gru("b", _join_computed_shape(g, g.gru("a", "X", I), order), D * H)
    proto = g.model("b_Y")
    _assert_two_layer_stack(g, proto)


def _direction_pair(g, name, x, n_in, concat_axis):
    """A bidirectional layer as two nodes: forward and reverse over the same X, their Ys joined by a
    Concat (axis 1: of the Ys, giving the bidirectional Y; axis 2: of the squeezed Ys, directions merged)."""
    ys = [g.gru(f"{name}_{d}", x, n_in, D=1, direction=d) for d in ("forward", "reverse")]
    if concat_axis == 2:
        ys = [g.node("Squeeze", [y, g.const(np.array([1], np.int64))]) for y in ys]
    joined = g.node("Concat", ys, axis=concat_axis)
    if concat_axis == 1:  # (T, 2, B, H) -> (T, B, 2H), as after a bidirectional node
        joined = g.node("Transpose", [joined], perm=[0, 2, 1, 3])
        joined = g.node("Reshape", [joined, g.const(np.array([0, 0, -1], np.int64))])
    return joined


@pytest.mark.parametrize("concat_axis,second", [(2, "pair"), (1, "pair"), (1, "node"), (2, "none")])
def test_concat_of_directions_is_one_bidirectional_layer(concat_axis, second):
    """Layer a as a forward and a reverse node; layer b another such pair, one bidirectional node, or
    none.  The whole graph (last y and every Y_h) against the reference evaluator."""
    g = Graph(D=2, seed=50 + concat_axis)
    x_b = _direction_pair(g, "a", "X", I, concat_axis)
    states = ["a_forward_Yh", "a_reverse_Yh"]
    if second == "pair":
        y_name = _direction_pair(g, "b", x_b, 2 * H, concat_axis)
        states += ["b_forward_Yh", "b_reverse_Yh"]
    elif second == "node":
        y_name = g.gru("b", x_b, 2 * H)
        states += ["b_Yh"]
    else:
        y_name = x_b
    proto = g.model(y_name, *states)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = from_onnx.load(proto)
    (key, model), = models.items()
    assert key == "a_forward" and model.direction == "bidirectional"
    assert model.num_layers == (1 if second == "none" else 2)
    assert model.provenance["stacked_nodes"] == ["a_forward", "a_reverse"] + {
        "pair": ["b_forward", "b_reverse"], "node": ["b"], "none": []}[second]
    x = g.x()
    Y, *Y_h = ReferenceEvaluator(proto).run(None, {"X": x})
    y, h_n = model(x)
    if second == "node":
        y = _onnx_y(model, y)
    assert _max_err((y, Y), (h_n, np.concatenate(Y_h, axis=0))) <= ATOL


@pytest.mark.parametrize("flip_back,then_gru", [(True, False), (True, True), (False, False)])
def test_flipped_forward_gru_is_a_reverse_direction(tmp_path, flip_back, then_gru):
    """A hand-made bidirectional layer in torch: a forward GRU, and another run on torch.flip(x) whose
    output is flipped back, concatenated (optionally followed by a bidirectional nn.GRU).  torch exports
    the flips as Slices with step -1; the pair is one bidirectional layer -- unless the output is not
    flipped back, which is no reverse direction.  Against the module and the reference evaluator."""
    torch = pytest.importorskip("torch")

    class Manual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fwd, self.bwd = torch.nn.GRU(I, H), torch.nn.GRU(I, H)
            self.top = torch.nn.GRU(2 * H, H, bidirectional=True) if then_gru else None

        def forward(self, x):
            backward = self.bwd(torch.flip(x, [0]))[0]
            y = torch.cat([self.fwd(x)[0], torch.flip(backward, [0]) if flip_back else backward], dim=2)
            return self.top(y)[0] if then_gru else y

    torch.manual_seed(7)
    module = Manual().eval()
    x = torch.randn(T, B, I)
    path = tmp_path / "manual.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=14, input_names=["x"],
                          output_names=["y"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = from_onnx.load(path)
    if not flip_back:
        assert len(models) == 2 and all(m.num_layers == 1 for m in models.values())
        return
    (model,) = models.values()
    assert model.direction == "bidirectional" and model.num_layers == (2 if then_gru else 1)
    assert len(model.provenance["stacked_nodes"]) == (3 if then_gru else 2)
    y, _ = model(x.numpy())
    with torch.no_grad():
        y_ref = module(x).numpy()
    (y_onnx,) = ReferenceEvaluator(str(path)).run(None, {"x": x.numpy()})
    assert _max_err((y, y_ref), (y, y_onnx)) <= ATOL


def test_concat_of_directions_in_the_wrong_order_stays_separate():
    """Concat(reverse, forward) is not a bidirectional Y (ONNX puts the forward direction first)."""
    g = Graph(D=2, seed=60)
    ys = [g.node("Squeeze", [g.gru(f"a_{d}", "X", I, D=1, direction=d), g.const(np.array([1], np.int64))])
          for d in ("reverse", "forward")]
    g.gru("b", g.node("Concat", ys, axis=2), 2 * H)
    with pytest.warns(StackWarning, match=r"Concat node 'concat\d+' sits between them"):
        models = from_onnx.load(g.model("b_Y"))
    assert list(models) == ["a_reverse", "a_forward", "b"]


def _join_relu(g, y):
    return g.node("Relu", [g.merge_directions(y)])


def _join_add(g, y):
    return g.node("Add", [g.merge_directions(y), g.const(np.full((g.D * H,), 0.25, np.float32))])


def _join_matmul(g, y):
    g.matrix = g.rng.uniform(-0.3, 0.3, (g.D * H, g.D * H)).astype(np.float32)
    return g.node("MatMul", [g.merge_directions(y), g.const(g.matrix)])


def _join_swapped_directions(g, y):
    """(T, D, B, H) -> (T, B, H, D) -> (T, B, H*D): the right shape, the features in the wrong order."""
    moved = g.node("Transpose", [y], perm=[0, 2, 3, 1])
    return g.node("Reshape", [moved, g.const(np.array([0, 0, -1], np.int64))])


def _numpy_join(kind, y, g):
    """The join applied to ONNX's Y (T, D, B, H) in numpy, giving the next node's X."""
    merged = y.transpose(0, 2, 1, 3).reshape(T, B, -1)
    if kind == "relu":
        return np.maximum(merged, 0)
    if kind == "add":
        return merged + np.float32(0.25)
    if kind == "matmul":
        return merged @ g.matrix
    if kind == "swapped":
        return y.transpose(0, 2, 3, 1).reshape(T, B, -1)
    if kind == "computed_bt":  # (T, B, D, H) read as (B, T, D*H): the next node runs B steps of T rows
        return merged.reshape(B, T, -1)
    return merged


NEGATIVE = {
    # kind: (D, join, attributes of node b, reason)
    "relu": (1, _join_relu, {}, r"Relu node 'relu\d+' sits between them"),
    "add": (1, _join_add, {}, r"Add node 'add\d+' sits between them"),
    "matmul": (2, _join_matmul, {}, r"MatMul node 'matmul\d+' sits between them"),
    "swapped": (2, _join_swapped_directions, {}, r"rearranged as \(T, B, H\*D\), not .*\(T, B, D\*H\)"),
    "computed_bt": (2, lambda g, y: _join_computed_shape(g, y, order=(1, 0, 2, 3)), {},
                    r"shape entry B at 0 does not match the input there"),
    "activations": (1, None, {"activations": ["HardSigmoid", "Tanh"]}, r"their activations differ"),
    "lbr": (1, None, {"linear_before_reset": 0}, r"their linear_before_reset differ \(1 and 0\)"),
}


@pytest.mark.parametrize("kind", sorted(NEGATIVE))
def test_non_stack_joins_stay_separate_with_the_reason(kind):
    D, join, attrs_b, reason = NEGATIVE[kind]
    g = Graph(D=D, seed=len(kind))
    y_a = g.gru("a", "X", I)
    x_b = join(g, y_a) if join else g.merge_directions(y_a)
    g.gru("b", x_b, D * H, **attrs_b)
    proto = g.model("b_Y")
    with pytest.warns(StackWarning, match=r"GRU node 'a' .*GRU node 'b'.*" + reason):
        models = from_onnx.load(proto)
    assert list(models) == ["a", "b"] and all(m.num_layers == 1 for m in models.values())
    if kind == "activations":  # the reference evaluator runs default activations only
        return
    x = g.x()
    (Y_b,) = ReferenceEvaluator(proto).run(None, {"X": x})
    y_a, _ = models["a"](x)
    y_b, _ = models["b"](np.ascontiguousarray(_numpy_join(kind, _onnx_y(models["a"], y_a), g)))
    assert _max_err((_onnx_y(models["b"], y_b), Y_b)) <= ATOL


def test_layers_whose_weights_do_not_chain_stay_separate():
    """The graph links 'a' to 'b', but b's weights are float64 (an element type X cannot have)."""
    g = Graph(D=1, seed=17)
    g.gru("b", g.merge_directions(g.gru("a", "X", I)), H)
    for tensor in g.inits[-3:]:  # b's W, R, B
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    with pytest.warns(StackWarning, match=r"GRU nodes 'a', 'b' stay separate: their weights' element types differ"):
        models = from_onnx.load(g.model("b_Y"))
    assert [(k, m.dtype.name) for k, m in models.items()] == [("a", "float32"), ("b", "float64")]
    assert [m.provenance["node"] for m in models.values()] == ["a", "b"]
    assert not any("stacked_nodes" in m.provenance for m in models.values())


@pytest.mark.parametrize("second", ["graph_output", "relu"])
def test_y_with_a_second_consumer_stays_separate(second):
    g = Graph(D=1, seed=7)
    merged = g.merge_directions(g.gru("a", "X", I))
    g.gru("b", merged, H)
    outputs = ["b_Y"]
    if second == "graph_output":
        outputs.append(merged)
        reason = rf"{merged!r} \(on the way from Y\) is also a graph output"
    else:
        outputs.append(g.node("Relu", [merged]))
        reason = rf"{merged!r} \(on the way from Y\) feeds 2 nodes \(GRU node 'b', Relu node"
    with pytest.warns(StackWarning, match=reason):
        models = from_onnx.load(g.model(*outputs))
    assert list(models) == ["a", "b"]


@pytest.mark.parametrize("case", ["zeros_then_sliced", "sliced_out_of_order"])
def test_inconsistent_initial_states_stay_separate(case):
    g = Graph(D=1, seed=11)
    g.inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, None))
    axis = g.const(np.array([0], np.int64))

    def rows(start):
        return g.node("Slice", ["h0", g.const(np.array([start], np.int64)), g.const(np.array([start + 1], np.int64)),
                                axis])

    first = "" if case == "zeros_then_sliced" else rows(1)
    second = rows(1) if case == "zeros_then_sliced" else rows(0)
    g.gru("b", g.merge_directions(g.gru("a", "X", I, initial_h=first)), H, initial_h=second)
    reason = "initial states do not fit one stacked h0" if case == "zeros_then_sliced" else \
        r"not the consecutive slices .* starts \[1, 0\]"
    with pytest.warns(StackWarning, match=r"GRU nodes 'a', 'b' form a chain but stay separate: .*" + reason):
        models = from_onnx.load(g.model("b_Y"))
    assert list(models) == ["a", "b"]


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------

def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gru_fast", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_info_and_run_use_the_stack(tmp_path):
    """The shipped classifier (a 2-layer nn.GRU exported with packed sequences): info reports one
    stacked model; run uses it and matches ONNX Runtime on the whole graph; --no-stack lists nodes."""
    ort = pytest.importorskip("onnxruntime")
    shipped = REPO_ROOT / "gru_fast" / "data" / "default_gru.onnx"
    info = _cli("info", shipped, "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)["models"]
    assert list(report) == ["/gru/GRU"] and report["/gru/GRU"]["num_layers"] == 2
    assert report["/gru/GRU"]["provenance"]["stacked_nodes"] == ["/gru/GRU", "/gru/GRU_1"]
    text = _cli("info", shipped).stdout
    assert "stacked      2 ONNX GRU nodes as one model: '/gru/GRU', '/gru/GRU_1'" in text
    separate = json.loads(_cli("info", shipped, "--json", "--no-stack").stdout)["models"]
    assert list(separate) == ["/gru/GRU", "/gru/GRU_1"]

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 9, 8)).astype(np.float32)
    lengths = rng.integers(1, 10, 6)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lengths.npy", lengths)
    run = _cli("run", shipped, "--input", tmp_path / "x.npy", "--lengths", tmp_path / "lengths.npy",
               "--output", tmp_path / "out.npz")
    assert run.returncode == 0, run.stderr
    assert "2 GRU nodes stacked as one 2-layer model ('/gru/GRU', '/gru/GRU_1'" in run.stdout
    with np.load(tmp_path / "out.npz") as out:
        y, h_n = out["y"], out["h_n"]
    session = ort.InferenceSession(str(shipped), providers=["CPUExecutionProvider"])
    _, y_ref, h_ref = session.run(None, {"x": x, "lengths": lengths.astype(np.int64)})
    assert _max_err((y, y_ref), (h_n, h_ref.transpose(1, 0, 2))) <= ATOL

    layer = _cli("info", shipped, "--node", "/gru/GRU_1")
    assert layer.returncode == 1 and "is a layer of the stacked model '/gru/GRU'; add --no-stack" in layer.stderr


def test_cli_prints_why_nodes_stay_separate(tmp_path):
    g = Graph(D=1, seed=13)
    g.gru("b", _join_relu(g, g.gru("a", "X", I)), H)
    onnx.save(g.model("b_Y"), str(tmp_path / "relu.onnx"))
    proc = _cli("info", tmp_path / "relu.onnx")
    assert proc.returncode == 0 and "2 GRU models" in proc.stdout
    assert "gru-fast: note: relu.onnx: GRU node 'a' and GRU node 'b' stay separate: Relu node" in proc.stderr


# --------------------------------------------------------------------------------------------------
# memory: the engine's packed, padded layout is charged before it is built
# --------------------------------------------------------------------------------------------------

_EXPANDED_W = """
import json, resource, numpy as np
from onnx import TensorProto, helper, numpy_helper
nodes = [helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros((1,), np.float32))),
         helper.make_node("Constant", [], ["shape"],
                          value=numpy_helper.from_array(np.array([1, 3, 8_000_000], np.int64))),
         helper.make_node("Expand", ["zero", "shape"], ["W"]),
         helper.make_node("GRU", ["X", "W", "R"], ["Y"], name="gru", hidden_size=1)]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(np.zeros((1, 3, 1), np.float32), "R")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
import gru_fast
from converters import from_onnx
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    from_onnx.load(model, max_bytes=200 * 2**20)
    error = None
except ValueError as exc:
    error = str(exc)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"bytes": len(model.SerializeToString()), "error": error, "before": before, "peak": peak}))
"""


def test_expanded_weights_padded_by_the_engine_are_refused_within_the_cap():
    """W = Expand(0, [1, 3, 8e6]) with hidden_size=1: 96 MB folded, but the engine's packed layout
    pads H to 16 units (1.5 GB, plus the packing's copies).  Refused, naming the size and the cap, with
    the child's peak RSS under the interpreter's plus the cap."""
    result = last_json_line(run_python(_EXPANDED_W))
    cap = 200 * 2**20
    assert result["bytes"] < 300
    assert result["error"] is not None, "the model loaded"
    assert "GRU node 'gru'" in result["error"] and "packed layout" in result["error"]
    assert re.search(r"needs \d+\.\d GiB, over the memory cap max_bytes=" + str(cap), result["error"])
    assert result["peak"] - result["before"] <= cap, (result["peak"] - result["before"]) / 2**20
