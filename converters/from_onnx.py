"""ONNX -> gru_fast importer.

``load(path_or_model)`` converts every ``GRU`` node of an ONNX graph into a :class:`gru_fast.GRU`.
ONNX's GRU is the engine's native dialect (weights ``W (D, 3H, I)``, ``R (D, 3H, H)``,
``B (D, 6H)`` in gate order z, r, h), so the conversion is a matter of finding the weights and reading
every attribute faithfully; see the README's "Semantics" section and the ONNX operator specification.

Where the weights come from
    Initializers, ``Constant`` nodes, or chains of Slice / Concat / Unsqueeze / Squeeze / Transpose /
    Reshape / Gather / Cast / CastLike / Identity / Expand / ConstantOfShape / Shape / Split over
    constants, as ``torch.onnx.export(..., do_constant_folding=False)`` writes them.  The chains are
    folded in numpy by :mod:`converters._onnx_graph` following each operator's specification for the
    model's opset.  Weights that depend on a graph input or on any other operator are refused.  An
    initializer that is also listed as a graph input (``keep_initializers_as_inputs=True``) is a
    default a runtime could override; the importer converts that default.

What the converted model expects at run time
    ``model(x, h0=..., lengths=...)`` takes the node's ``X``, ``initial_h`` and ``sequence_lens``.
    The engine has no stored initial state or lengths, so:

    - ``initial_h`` computed at run time (a graph input, a slice of one, ...) is the caller's ``h0=``.
      ``initial_h`` that is constant zeros -- including the ``Expand`` of a zero constant to the
      run-time batch size that ``torch.onnx.export`` writes for ``h0=None`` -- equals the engine's
      default (``h0=None``) and is accepted.  A constant *non-zero* ``initial_h`` cannot be honoured
      and is refused with ValueError.
    - ``sequence_lens`` computed at run time is the caller's ``lengths=``; a constant ``sequence_lens``
      is refused.  For a length of 0 the engine returns ``h_n = h0`` (zeros when ``h0`` is None), as
      ONNX Runtime does when no ``initial_h`` is given.

Shapes (``model.batch_first`` is True exactly when the node has ``layout=1``)
    layout=0: ONNX ``X`` (T, B, I) is ``x``; ``Y`` (T, D, B, H) is
    ``y.reshape(T, B, D, H).transpose(0, 2, 1, 3)``; ``initial_h`` and ``Y_h`` (D, B, H) are ``h0`` and
    ``h_n`` as they are.

    layout=1: ONNX ``X`` (B, T, I) is ``x``; ``Y`` (B, T, D, H) is ``y.reshape(B, T, D, H)``; but
    ``initial_h`` and ``Y_h`` are (B, D, H) while the engine's ``h0`` and ``h_n`` stay (D, B, H) --
    its ``batch_first`` covers ``x`` and ``y`` only -- so callers pass
    ``h0=initial_h.transpose(1, 0, 2)`` and read ``Y_h = h_n.transpose(1, 0, 2)``.

Stacks (``stack=True``, the default)
    A chain of GRU nodes that is exactly a stacked GRU -- ``torch.onnx.export`` writes
    ``nn.GRU(num_layers=L)`` as L nodes joined by Squeeze / Transpose / Reshape -- converts to one
    L-layer model (:mod:`converters._onnx_stack` states the rule).  It takes the first node's ``X``,
    ``sequence_lens`` and, as ``h0``, the tensor whose slices are the layers' ``initial_h``; its ``y``
    is the last node's ``Y`` and its ``h_n`` every node's ``Y_h`` in layer order.  Connected nodes that
    do not form such a chain stay separate, with a :class:`StackWarning` saying why.  A bidirectional
    layer written as a forward and a reverse node whose Ys are concatenated counts as one layer.

Safety
    Everything a file says is checked before memory is committed: attribute values and types, the
    consistency of ``hidden_size`` with the shapes of W, R and B, tensor sizes against ``max_bytes``
    (from the tensor headers, before decoding; folded intermediates before they are computed; the
    engine's copy and packed, padded layout of the weights before the model is built), and external
    data, which is read only from regular, singly linked files inside the model's directory
    (:mod:`converters._safe_paths`).  Unreadable
    bytes and every refusal raise ValueError naming the node and the input at fault.

onnx is imported inside :func:`load` only; onnxruntime is never used.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import warnings

import numpy as np

from gru_fast._files import DEFAULT_MAX_BYTES, build_charge, check_file_size, check_max_bytes, model_file

from ._onnx_graph import Budget, ConstantFolder, NotConstant, attr_value, attributes, decode_tensor
from ._onnx_stack import find_stacks

__all__ = ["load", "DEFAULT_MAX_BYTES", "StackWarning"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
# the activation names of the ONNX RNN operators (matched case-insensitively, as ONNX Runtime does)
_ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "Affine", "LeakyRelu", "ThresholdedRelu", "ScaledTanh",
                "HardSigmoid", "Elu", "Softsign", "Softplus")
_ATTRIBUTE_KINDS = {
    "activation_alpha": "floats", "activation_beta": "floats", "activations": "strings", "clip": "float",
    "direction": "string", "hidden_size": "int", "linear_before_reset": "int", "layout": "int",
    "output_sequence": "int",
}
_INPUT_ROLES = ("X", "W", "R", "B", "sequence_lens", "initial_h")


@model_file("onnx")
def load(path_or_model, *, max_bytes=DEFAULT_MAX_BYTES, stack=True):
    """Convert the GRU nodes of an ONNX model to :class:`gru_fast.GRU` models.

    Parameters
    ----------
    path_or_model : str, os.PathLike or onnx.ModelProto
        A model file (external data is resolved inside its directory only), or a ModelProto already
        in memory (which must then carry no external data).  The ModelProto is only read.
    max_bytes : int
        Memory cap, in bytes.  A model file larger than this is refused unread, and the arrays the
        importer holds at any moment -- decoded tensors, folded intermediates, the models being built
        (their weight copies and packed parameters, whose hidden axis the engine pads to whole 16-unit
        tiles, plus the packing's scratch copies) and the models converted so far -- may not exceed
        it.  Every size is checked from shapes before the allocation.  Default 2 GiB.
    stack : bool
        Default True: chains of GRU nodes that are exactly a stacked GRU -- as ``torch.onnx.export``
        writes ``nn.GRU(num_layers=L)``, one node per layer joined by Squeeze / Transpose / Reshape --
        become one L-layer model (see :mod:`converters._onnx_stack` for the precise rule).  Pairs of
        GRU nodes that are connected some other way stay separate, and a :class:`StackWarning` says
        why for each.  False: one single-layer model per node.

    Returns
    -------
    dict[str, gru_fast.GRU]
        One model per GRU node of the main graph, or per stack of nodes, in graph order, keyed by the
        node's name (a stack: its first node's name); an unnamed node (or one whose name another GRU
        node already uses) is keyed by its first named output.  Each model's ``provenance`` is
        ``{"framework": "onnx", "source": <file name, or "<ModelProto>">, "node": <key>, "opset":
        <default-domain opset>}``; a stack's also has ``"stacked_nodes"``, the keys of its nodes from
        the first layer on (a layer written as two nodes: forward, then reverse), and
        ``"initial_h"``, the tensor whose rows [l*D, (l+1)*D) are layer l's initial state (the
        stacked model's ``h0=``; None when every layer starts from zeros).
        GRU nodes inside control-flow subgraphs or model-local functions are not converted (a
        RuntimeWarning says so).

    Raises
    ------
    ValueError
        For unreadable bytes (truncated or garbage files), a model without GRU nodes, and anything a
        node asks that the engine cannot honour: weights that are not constant, unknown or
        ill-typed attributes, unknown activations, inconsistent shapes, ``hidden_size`` disagreeing
        with R, sizes over ``max_bytes``, unsafe external data, a constant non-zero ``initial_h`` or a
        constant ``sequence_lens``.  The message names the node.
    TypeError
        When ``path_or_model`` is neither a path nor a ModelProto.

    Notes
    -----
    Shapes: see the module docstring.  In short, ``y`` is ONNX's ``Y`` with the direction axis merged
    into the feature axis, and with ``layout=1`` ONNX's ``initial_h`` / ``Y_h`` are the engine's
    ``h0`` / ``h_n`` transposed by ``(1, 0, 2)``.  A stacked model takes its first node's ``X`` and
    returns its last node's ``Y`` (direction axis merged) and every node's ``Y_h`` concatenated, layer
    by layer, as ``h_n``.
    """
    import onnx

    max_bytes = check_max_bytes(max_bytes)
    model, base_dir, source = _read_model(onnx, path_or_model, max_bytes)

    if not model.HasField("graph"):
        raise ValueError(f"{source}: not an ONNX model (no graph); is the file truncated or not ONNX?")
    opset = _default_opset(model, source)
    graph = model.graph
    gru_nodes = [n for n in graph.node if n.op_type == "GRU" and n.domain in _DEFAULT_DOMAINS]
    nested = _count_nested_grus(model)
    if not gru_nodes:
        where = (f"; {nested} GRU node(s) sit inside control-flow subgraphs or model-local functions, which "
                 "are not supported") if nested else ""
        raise ValueError(f"{source}: the graph has no GRU node{where}")
    if nested:
        warnings.warn(f"{source}: {nested} GRU node(s) inside control-flow subgraphs or model-local functions "
                      "were not converted", RuntimeWarning, stacklevel=2)

    if not isinstance(stack, bool):
        raise TypeError(f"stack must be True or False, got {stack!r}")
    schema_attributes = _schema_attributes(onnx, opset, source)
    budget = Budget(max_bytes)
    folder = ConstantFolder(graph, opset=opset, base_dir=base_dir, budget=budget)
    keys = _node_keys(gru_nodes)
    configs = [_read_attributes(node, f"GRU node {key!r}", opset, schema_attributes)
               for node, key in zip(gru_nodes, keys)]
    groups = [([[i]], None) for i in range(len(gru_nodes))]
    if stack and len(gru_nodes) > 1:
        groups, notes = find_stacks(graph, gru_nodes, keys, [_stack_config(n, c, folder) for n, c in
                                                             zip(gru_nodes, configs)],
                                    folder, opset, functools.partial(_initial_h_kind, folder))
        for note in notes:
            warnings.warn(f"{source}: {note}", StackWarning, stacklevel=3)  # past the model_file wrapper
    models = {}
    for layers, initial_h in groups:
        indices = [i for layer in layers for i in layer]
        key = keys[indices[0]]
        provenance = {"framework": "onnx", "source": source, "node": key, "opset": opset}
        if len(indices) > 1:
            provenance["stacked_nodes"] = [keys[i] for i in indices]
            provenance["initial_h"] = initial_h
        built = _convert_group([[(gru_nodes[i], keys[i], configs[i]) for i in layer] for layer in layers],
                               folder, budget, provenance)
        models.update(built)
    return models


class StackWarning(UserWarning):
    """GRU nodes connected in the graph stay separate models; the message says why."""


# --------------------------------------------------------------------------------------------------
# reading the file
# --------------------------------------------------------------------------------------------------

def _read_model(onnx, path_or_model, max_bytes):
    """-> (ModelProto, directory for external data or None, source name for messages/provenance)."""
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model, None, "<ModelProto>"
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise TypeError(f"load() expects a path or an onnx.ModelProto, got {type(path_or_model).__name__}")
    path = os.fsdecode(os.fspath(path_or_model))
    source = os.path.basename(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path!r}: cannot read the model file ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path!r} is not a regular file")
    check_file_size(path, info.st_size, max_bytes)
    from google.protobuf.message import DecodeError

    try:
        # format="protobuf": never let the file name pick the text or JSON parser
        model = onnx.load(path, format="protobuf", load_external_data=False)
    except DecodeError as exc:
        raise ValueError(f"{path!r}: not a valid ONNX protobuf (truncated or corrupt?): {exc}") from exc
    except (OSError, EOFError, RuntimeError, TypeError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path!r}: cannot read the ONNX model ({type(exc).__name__}: {exc})") from exc
    return model, os.path.dirname(os.path.abspath(path)), source


def _default_opset(model, source):
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise ValueError(f"{source}: the model declares no opset for the default ONNX domain "
                         "(truncated or not an ONNX model?)")
    if len(versions) > 1:
        raise ValueError(f"{source}: the default ONNX domain is imported {len(versions)} times")
    if versions[0] < 1:
        raise ValueError(f"{source}: invalid opset version {versions[0]}")
    return int(versions[0])


def _schema_attributes(onnx, opset, source):
    try:
        schema = onnx.defs.get_schema("GRU", opset)
    except Exception as exc:  # onnx raises SchemaError, an internal class
        raise ValueError(f"{source}: the installed onnx has no GRU schema for opset {opset}: {exc}") from exc
    return frozenset(schema.attributes)


def _count_nested_grus(model):
    """GRU nodes inside control-flow subgraphs and model-local functions (not converted)."""
    count = 0
    stack = [(list(f.node), True) for f in model.functions] + [(list(model.graph.node), False)]
    while stack:
        nodes, nested = stack.pop()
        for node in nodes:
            if nested and node.op_type == "GRU" and node.domain in _DEFAULT_DOMAINS:
                count += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append((list(attr.g.node), True))
                for sub in attr.graphs:
                    stack.append((list(sub.node), True))
    return count


def _node_keys(nodes):
    keys, used = [], set()
    for index, node in enumerate(nodes):
        candidates = [node.name] + [o for o in node.output] + [f"GRU_{index}"]
        key = next(c for c in candidates if c and c not in used)
        used.add(key)
        keys.append(key)
    return keys


# --------------------------------------------------------------------------------------------------
# one GRU node
# --------------------------------------------------------------------------------------------------

def _convert_group(layers, folder, budget, provenance):
    """-> [(key, model)]: one model of the layers of one stack, each layer one node or a forward and a
    reverse node (one bidirectional layer); or, when their folded weights do not chain (element types
    differ, or a layer's input size is not the previous layer's output size), one model per node, with
    a StackWarning."""
    specs, nodes = [], [entry for layer in layers for entry in layer]
    try:
        for node, key, config in nodes:
            specs.append(_read_node(node, key, config, folder, budget))
        layer_specs, position = [], 0
        for layer in layers:
            layer_specs.append(specs[position:position + len(layer)])
            position += len(layer)
        mismatch = _pairs_do_not_match(layer_specs)
        if mismatch is None:
            merged = []
            for group in layer_specs:
                merged.append(group[0] if len(group) == 1 else _pair_spec(group, budget))
                if len(group) > 1:
                    specs.append(merged[-1])  # released below
            mismatch = _weights_do_not_chain(merged)
        if mismatch is None:
            config = _layer_config(layers[0])
            return [(nodes[0][1], _build(merged, config, budget, provenance, merged[0]["label"]))]
        keys = [key for _, key, _ in nodes]
        warnings.warn(f"{provenance['source']}: GRU nodes {', '.join(map(repr, keys))} stay separate: "
                      f"{mismatch}", StackWarning, stacklevel=4)
        single = {k: v for k, v in provenance.items() if k not in ("stacked_nodes", "initial_h")}
        return [(key, _build([spec], config, budget, dict(single, node=key), spec["label"]))
                for (_, key, config), spec in zip(nodes, specs)]
    finally:
        for spec in specs:
            folder.release(spec["weights"])


def _layer_config(layer):
    """The build configuration of one layer: its node's, or a forward and a reverse node's together."""
    if len(layer) == 1:
        return layer[0][2]
    (_, _, forward), (_, _, reverse) = layer
    names = [n for config in (forward, reverse) for n in (config["activations"] or ["Sigmoid", "Tanh"])]
    return dict(forward, direction="bidirectional", activations=names)


def _pair_spec(pair, budget):
    """One bidirectional layer's weights from a forward and a reverse node's (checked alike by
    _pairs_do_not_match), charged to ``budget``."""
    forward, reverse = pair
    label = f"{forward['label']} with {reverse['label']}"
    arrays = []
    for a, b in zip(forward["weights"], reverse["weights"]):
        if a is not None:
            budget.charge(a.nbytes + b.nbytes, f"{label}: the weights of both directions")
        arrays.append(None if a is None else np.concatenate([a, b], axis=0))
    return {"label": label, "weights": tuple(arrays), "dtype": forward["dtype"]}


def _pairs_do_not_match(layer_specs):
    for group in layer_specs:
        if len(group) == 2 and group[0]["dtype"] != group[1]["dtype"]:
            return "a forward and a reverse node's element types differ"
        if len(group) == 2 and any((a is None) != (b is None) or (a is not None and a.shape != b.shape)
                                   for a, b in zip(group[0]["weights"], group[1]["weights"])):
            return "a forward and a reverse node's weight shapes differ"
    return None


def _weights_do_not_chain(specs):
    for previous, spec in zip(specs, specs[1:]):
        if spec["dtype"] != previous["dtype"]:
            return f"their weights' element types differ ({previous['dtype'].__name__}, {spec['dtype'].__name__})"
        W, R = spec["weights"][0], previous["weights"][1]
        if W.shape[2] != R.shape[0] * R.shape[2]:
            return (f"{spec['label']} takes {W.shape[2]} input features, the previous layer gives "
                    f"{R.shape[0] * R.shape[2]}")
        if (spec["weights"][2] is None) != (previous["weights"][2] is None):
            return "one has a bias B and the other not"
    return None


def _read_node(node, key, config, folder, budget):
    """Fold one node's weights (they stay charged to ``budget``) and check everything but the model."""
    label = f"GRU node {key!r}"
    D = _DIRECTIONS[config["direction"]]
    if not 3 <= len(node.input) <= 6:
        raise ValueError(f"{label}: expected 3 to 6 inputs (X, W, R, B, sequence_lens, initial_h), "
                         f"got {len(node.input)}")
    if len(node.output) > 2:
        raise ValueError(f"{label}: expected at most 2 outputs (Y, Y_h), got {len(node.output)}")
    inputs = {role: (node.input[i] if i < len(node.input) else "") for i, role in enumerate(_INPUT_ROLES)}
    for role in ("X", "W", "R"):
        if not inputs[role]:
            raise ValueError(f"{label}: input {role} is required")

    hidden = config["hidden_size"]
    if hidden is not None:
        # R alone would be (D, 3H, H): refuse an absurd hidden_size before anything is decoded
        _check_cap(D * 3 * hidden * hidden * 4, budget, f"{label}: hidden_size={hidden} implies R of shape "
                   f"({D}, {3 * hidden}, {hidden}), which")
    _check_static_shapes(folder, inputs, D, hidden, label)

    weights = {}
    try:
        for role in ("W", "R", "B"):
            if inputs[role]:
                weights[role] = _fold_weight(folder, inputs[role], role, label)
        W, R, B = weights["W"], weights["R"], weights.get("B")
        _check_shapes(W, R, B, D, hidden, label)
        dtype = _weight_dtype(W, R, B, label)
        _check_runtime_inputs(folder, budget, inputs, label)
    except BaseException:
        folder.release(weights.values())
        raise
    return {"label": label, "weights": (W, R, B), "dtype": dtype}


def _build(specs, config, budget, provenance, label):
    """One gru_fast.GRU of the layers in ``specs``; what building it allocates is charged to ``budget``."""
    import gru_fast

    dtype = specs[0]["dtype"]
    layers = [spec["weights"] for spec in specs]  # the engine copies them into `dtype`
    W0, R0 = layers[0][0], layers[0][1]  # W (D, 3H, I), R (D, 3H, H), checked by _check_shapes
    needed, what = build_charge(W0.shape[2], R0.shape[2], len(layers), R0.shape[0], dtype)
    budget.charge(needed, f"{label}: {what}")
    try:
        model = gru_fast.GRU(
            layers,
            direction=config["direction"],
            linear_before_reset=bool(config["linear_before_reset"]),
            activations=config["activations"],
            activation_alpha=config["activation_alpha"],
            activation_beta=config["activation_beta"],
            clip=config["clip"],
            batch_first=config["layout"] == 1,
            dtype="float64" if dtype == np.float64 else "float32",
            provenance=provenance,
        )
    except (ValueError, TypeError) as exc:
        budget.release(needed)
        raise ValueError(f"{label}: {exc}") from exc
    return model  # still charged: the model keeps its copies and packed layout


def _stack_config(node, config, folder):
    """What two nodes must share to be layers of one stack (see converters._onnx_stack)."""
    from gru_fast.activations import parse_activations

    D = _DIRECTIONS[config["direction"]]
    hidden = config["hidden_size"]
    if hidden is None and len(node.input) > 2 and node.input[2]:
        shape = folder.static_shape(node.input[2])
        if shape is None:  # R computed from constants: its shape is known once folded
            try:
                R = folder.fold([node.input[2]])[node.input[2]]
            except ValueError:  # NotConstant included: the conversion refuses the node and says why
                R = None
            shape = None if R is None else R.shape
            folder.release([R])
        hidden = shape[2] if shape is not None and len(shape) == 3 else None
    try:
        activations = parse_activations(config["activations"], config["activation_alpha"],
                                        config["activation_beta"], D)
    except (ValueError, TypeError):
        activations = ("invalid", node.name)  # the conversion refuses the node and says why
    return {"direction": config["direction"], "hidden": hidden,
            "activation_params": bool(config["activation_alpha"] or config["activation_beta"]),
            "linear_before_reset": config["linear_before_reset"], "activations": tuple(activations),
            "clip": config["clip"], "layout": config["layout"],
            "sequence_lens": node.input[4] if len(node.input) > 4 else ""}


def _initial_h_kind(folder, node):
    """'zero' when the node's initial_h is absent or constant zeros, else 'other'."""
    name = node.input[5] if len(node.input) > 5 else ""
    if not name:
        return "zero"
    try:
        value = _constant_initial_h(folder, name, f"GRU node {node.name!r}")
    except ValueError:
        return "other"  # the conversion refuses the node and says why
    if value is None:
        return "other"
    try:
        return "other" if np.any(value != 0) else "zero"
    finally:
        folder.release([value])


def _read_attributes(node, label, opset, schema_attributes):
    attrs = attributes(node, label)
    for name in attrs:
        if name not in schema_attributes:
            raise ValueError(f"{label}: attribute {name!r} is not defined for GRU in opset {opset} "
                             f"(known: {', '.join(sorted(schema_attributes))})")
        if name not in _ATTRIBUTE_KINDS:  # a future opset's attribute this importer does not know
            raise ValueError(f"{label}: attribute {name!r} is not supported by this importer")
    value = {name: attr_value(attrs, name, kind, label) for name, kind in _ATTRIBUTE_KINDS.items()}

    direction = value["direction"] if value["direction"] is not None else "forward"
    if direction not in _DIRECTIONS:
        raise ValueError(f"{label}: direction must be forward, reverse or bidirectional, got {direction!r}")
    hidden = value["hidden_size"]
    if hidden is not None and hidden <= 0:
        raise ValueError(f"{label}: hidden_size must be positive, got {hidden}")
    lbr = value["linear_before_reset"] if value["linear_before_reset"] is not None else 0
    if lbr not in (0, 1):
        raise ValueError(f"{label}: linear_before_reset must be 0 or 1, got {lbr}")
    layout = value["layout"] if value["layout"] is not None else 0
    if layout not in (0, 1):
        raise ValueError(f"{label}: layout must be 0 or 1, got {layout}")
    if value["output_sequence"] not in (None, 0, 1):
        raise ValueError(f"{label}: output_sequence must be 0 or 1, got {value['output_sequence']}")
    # output_sequence (GRU-1 only) just says whether Y is produced; the engine always returns y.

    clip = value["clip"]
    if clip is not None:
        if not clip > 0:  # also refuses NaN
            raise ValueError(f"{label}: clip must be positive, got {clip}")
        if math.isinf(clip):
            clip = None
        else:
            clip = float(clip)
    activations = value["activations"] or None
    if activations is not None:
        D = _DIRECTIONS[direction]
        if len(activations) not in (2, 2 * D):
            raise ValueError(f"{label}: activations must list 2 names per direction ({2 * D} in all), got "
                             f"{len(activations)}: {activations}")
        known = {a.lower(): a for a in _ACTIVATIONS}
        for name in activations:
            if name.lower() not in known:
                raise ValueError(f"{label}: unknown activation {name!r}; ONNX defines "
                                 f"{', '.join(_ACTIVATIONS)}")
    alpha = [float(a) for a in value["activation_alpha"]] if value["activation_alpha"] else None
    beta = [float(b) for b in value["activation_beta"]] if value["activation_beta"] else None
    return {"direction": direction, "hidden_size": hidden, "linear_before_reset": lbr, "layout": layout,
            "clip": clip, "activations": activations, "activation_alpha": alpha, "activation_beta": beta}


def _check_cap(nbytes, budget, what):
    if nbytes > budget.max_bytes - budget.live:
        raise ValueError(f"{what} needs {nbytes} bytes, over the memory cap max_bytes={budget.max_bytes}")


def _expected_shapes(D, H, I):
    """Expected (W, R, B) shapes; None entries are wildcards."""
    three_h = None if H is None else 3 * H
    six_h = None if H is None else 6 * H
    return {"W": (D, three_h, I), "R": (D, three_h, H), "B": (D, six_h)}


def _shape_matches(shape, expected):
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _describe(expected):
    names = {0: "D", 1: "3*H", 2: "I"}
    return "(" + ", ".join(str(e) if e is not None else names.get(i, "?") for i, e in enumerate(expected)) + ")"


def _check_static_shapes(folder, inputs, D, hidden, label):
    """Shape checks from tensor headers (initializers, Constant nodes), before anything is decoded."""
    shapes = {role: folder.static_shape(inputs[role]) for role in ("W", "R", "B") if inputs[role]}
    H = hidden
    if H is None and shapes.get("R") is not None and len(shapes["R"]) == 3:
        H = shapes["R"][2]
    I = shapes["W"][2] if shapes.get("W") is not None and len(shapes["W"]) == 3 else None
    expected = _expected_shapes(D, H, I)
    for role, shape in shapes.items():
        if shape is not None and not _shape_matches(shape, expected[role]):
            raise ValueError(_shape_message(label, role, inputs[role], shape, expected[role], D, hidden))


def _shape_message(label, role, name, shape, expected, D, hidden):
    why = f"direction gives D={D}"
    if hidden is not None:
        why += f", hidden_size={hidden}"
    layout = {"W": "(D, 3*H, input_size)", "R": "(D, 3*H, H)", "B": "(D, 6*H)"}[role]
    return (f"{label}: {role} ({name!r}) has shape {tuple(shape)}, expected {_describe(expected)} "
            f"= {layout} ({why})")


def _check_shapes(W, R, B, D, hidden, label):
    if R.ndim != 3 or R.shape[1] != 3 * R.shape[2]:
        raise ValueError(f"{label}: R has shape {R.shape}, expected (D, 3*H, H)")
    H = R.shape[2]
    if hidden is not None and hidden != H:
        raise ValueError(f"{label}: hidden_size={hidden} disagrees with R of shape {R.shape} (H={H})")
    if H == 0:
        raise ValueError(f"{label}: hidden size 0 (R has shape {R.shape})")
    if W.ndim != 3:
        raise ValueError(f"{label}: W has shape {W.shape}, expected (D, 3*H, input_size)")
    expected = _expected_shapes(D, H, W.shape[2])
    for role, array in (("W", W), ("R", R), ("B", B)):
        if array is not None and not _shape_matches(array.shape, expected[role]):
            raise ValueError(_shape_message(label, role, role, array.shape, expected[role], D, hidden)
                             .replace(f"({role!r}) ", ""))
    if W.shape[2] == 0:
        raise ValueError(f"{label}: input size 0 (W has shape {W.shape})")
    return H


def _weight_dtype(W, R, B, label):
    arrays = {"W": W, "R": R, "B": B}
    kinds = {role: a.dtype for role, a in arrays.items() if a is not None}
    for role, dtype in kinds.items():
        if dtype.kind != "f":
            raise ValueError(f"{label}: {role} has element type {dtype}; GRU weights must be floating point")
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{role} {dtype}" for role, dtype in kinds.items())
        raise ValueError(f"{label}: W, R and B must share one element type (ONNX type T), got {listing}")
    return np.float64 if W.dtype == np.float64 else np.float32  # float16 / bfloat16 widen to float32


def _fold_weight(folder, name, role, label):
    try:
        return folder.fold([name])[name]
    except NotConstant as exc:
        raise ValueError(f"{label}: input {role} ({name!r}) is not a constant: {exc.reason}. gru_fast needs "
                         "the weights at import time: an initializer, a Constant node, or a chain of "
                         "foldable operators over them") from exc
    except ValueError as exc:
        raise ValueError(f"{label}: input {role} ({name!r}): {exc}") from exc


def _check_runtime_inputs(folder, budget, inputs, label):
    """initial_h and sequence_lens must be run-time values (or, for initial_h, constant zeros)."""
    name = inputs["sequence_lens"]
    if name:
        try:
            value = folder.fold([name])[name]
        except NotConstant:
            pass  # a run-time input: the caller's lengths=
        except ValueError as exc:
            raise ValueError(f"{label}: input sequence_lens ({name!r}): {exc}") from exc
        else:
            folder.release([value])
            raise ValueError(f"{label}: sequence_lens ({name!r}) is a constant; gru_fast takes sequence "
                             "lengths at run time only (lengths=), so a stored constant cannot be honoured")
    name = inputs["initial_h"]
    if name:
        value = _constant_initial_h(folder, name, label)
        if value is not None:
            try:
                nonzero = bool(np.any(value != 0))
            finally:
                folder.release([value])
            if nonzero:
                raise ValueError(f"{label}: initial_h ({name!r}) is a constant with non-zero values; gru_fast "
                                 "keeps no initial state in the model, so it cannot be honoured (pass it as "
                                 "h0= yourself after removing it from the graph, or make it a graph input)")


def _constant_initial_h(folder, name, label):
    """The constant value of initial_h (or of the constant it is broadcast from), None at run time."""
    value = _broadcast_constant(folder, name, label)
    if value is not None:
        return value
    # Around packed sequences torch.onnx.export writes h0=None as Slices [l*D, (l+1)*D) of
    # ConstantOfShape([L*D, batch, H]): a slice of zeros is zeros, whatever the run-time shape.
    node, sliced = folder.producer(name), False
    while node is not None and node.domain in _DEFAULT_DOMAINS and node.op_type == "Slice" and node.input[0]:
        name, node, sliced = node.input[0], folder.producer(node.input[0]), True
    if not sliced:
        return None
    value = _broadcast_constant(folder, name, label)
    if value is not None and np.any(value != 0):  # which part is sliced is known only at run time
        folder.release([value])
        return None
    return value


def _broadcast_constant(folder, name, label):
    """The value of ``name`` when constant, or of the constant an Expand / ConstantOfShape broadcasts to a
    run-time shape (torch.onnx.export writes h0=None as Expand(zeros, [D, batch, H])); else None."""
    try:
        return folder.fold([name])[name]
    except NotConstant:
        pass
    except ValueError as exc:
        raise ValueError(f"{label}: input initial_h ({name!r}): {exc}") from exc
    node = folder.producer(name)
    if node is None or node.domain not in _DEFAULT_DOMAINS:
        return None
    if node.op_type == "Expand" and node.input and node.input[0]:
        try:
            return folder.fold([node.input[0]])[node.input[0]]
        except NotConstant:
            return None
        except ValueError as exc:
            raise ValueError(f"{label}: input initial_h ({name!r}): {exc}") from exc
    if node.op_type == "ConstantOfShape":
        attr = next((a for a in node.attribute if a.name == "value"), None)
        if attr is None:  # the default fill, 0
            folder.budget.charge(4, f"{label}: initial_h fill value")
            return np.zeros((), np.float32)
        return decode_tensor(attr.t, budget=folder.budget, base_dir=folder.base_dir,
                             what=f"{label}: initial_h fill value")
    return None
