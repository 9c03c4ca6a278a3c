"""Finding stacked GRUs in an ONNX graph, for ``from_onnx.load(stack=True)``.

``torch.onnx.export`` writes an ``nn.GRU(num_layers=L)`` as L GRU nodes: layer l's ``Y`` (T, D, B, H)
reaches layer l+1's ``X`` (T, B, D*H) through Squeeze (D=1) or Transpose + Reshape (D=2), and each
layer's ``initial_h`` is a Slice of rows [l*D, (l+1)*D) of the module's h0 (or zeros when h0 is None).
:func:`find_stacks` recognises such chains so that they convert to one multi-layer model.

A link from node A to node B is accepted only when B's ``X`` equals A's ``Y`` with its direction axis
merged into the feature axis, as the engine feeds one layer to the next.  This is checked
symbolically: the axes of ``Y`` are followed as lists of named dimensions (T, B, D, H; those of size 1
dropped) through Identity / Transpose / Squeeze / Unsqueeze / Reshape, whose axes must be constants
and whose target shapes constants or computed from the Shape of the values on the way (Shape, Slice,
Gather, Concat, Mul, Squeeze, Unsqueeze, Reshape of sizes: ``torch.onnx.export(dynamo=True)`` with
dynamic shapes writes [s0, s1, s2*s3]), and the result must be (T, B, D*H) (``layout=1``: (B, T,
D*H)) with D before H.  T and B are sizes known at run time only, unless the declared shape of the
first layer's X (a graph input, or a Transpose of one) fixes them -- as the dynamo exporter without
dynamic shapes writes it, with Reshapes to those fixed sizes between the layers; a runtime accepts no
other input shape, so the stack equals the graph on every input the graph accepts.  Each value
on the way may have no other consumer than that chain, except ``Shape`` nodes (which read no data;
torch's exporter takes the batch size of the zero h0 of the next layer from one), and may not be a
graph output.  The two nodes must agree on direction, hidden size, linear_before_reset, activations,
clip, layout and sequence_lens.  A chain as a whole must have the same initial state for every
layer: absent or constant zeros everywhere, or consecutive Slices [l*D, (l+1)*D) of one tensor along
its direction axis.

A bidirectional layer may also be written as two nodes ("Concat of directions"): a forward and a
reverse node reading the same X, alike in everything else, both starting from zeros, whose Ys --
through shape operations -- are the two inputs of one Concat, forward first, along the direction axis
(the bidirectional Y) or the feature axis of the squeezed Ys (directions merged).  Such a pair is one
layer, alone or anywhere in a chain; the next layer may be such a pair too.  A time-reversed forward
node -- its X and its Y each through a Slice reversing the time axis, as ``torch.flip`` exports -- is
such a reverse node (without sequence_lens, which a reversal of the padded sequence would not honour).

Anything else stays separate, and :func:`find_stacks` returns a sentence saying why for every pair of
GRU nodes where one's output reaches the other's input.
"""

from __future__ import annotations

import collections

import numpy as np

from ._onnx_graph import NotConstant, attr_value, attributes

__all__ = ["find_stacks"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
_SHAPE_OPS = ("Identity", "Transpose", "Squeeze", "Unsqueeze", "Reshape")
_SEARCH_LIMIT = 10_000  # nodes visited when looking for a GRU downstream of a value (hostile graphs)


class _NoLink(Exception):
    """The value between two GRU nodes is not the previous layer's output as the next layer takes it."""


def _label(node):
    name = f" {node.name!r}" if node.name else f" (output {next((o for o in node.output if o), '?')!r})"
    return f"{node.op_type} node{name}"


class _Graph:
    def __init__(self, graph, folder, opset):
        self.folder = folder
        self.opset = opset
        self.outputs = {o.name for o in graph.output}
        self.consumers = {}
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, index))

    def data_consumers(self, name):
        """Consumers that read the data of ``name`` (a Shape node reads only its shape)."""
        return [(n, i) for n, i in self.consumers.get(name, [])
                if not (n.op_type == "Shape" and n.domain in _DEFAULT_DOMAINS)]

    def constant_ints(self, name, what):
        try:
            value = self.folder.fold([name])[name]
        except NotConstant as exc:
            raise _NoLink(f"{what} is not a constant ({exc.reason})") from None
        except ValueError as exc:
            raise _NoLink(f"{what}: {exc}") from None
        try:
            array = np.asarray(value)
            if array.dtype.kind not in "iu" or array.ndim > 1:
                raise _NoLink(f"{what} is not a 1-D integer tensor")
            return [int(v) for v in array.reshape(-1)]
        finally:
            self.folder.release([value])

    def shape_entries(self, name, known, what, depth=0):
        """A 1-D integer tensor computed from constants and from the Shape of values on the chain (whose
        axes ``known`` gives), as (entries, is_scalar): an entry is an int or, for a size known only at run
        time, the tuple of dimensions it is the product of.  torch.onnx.export(dynamo=True) computes the
        Reshape between layers this way, as [Shape(y)[0], Shape(y)[1], Shape(y)[2] * Shape(y)[3]]."""
        try:
            value = self.folder.fold([name])[name]
        except NotConstant:
            pass
        except ValueError as exc:
            raise _NoLink(f"{what}: {exc}") from None
        else:
            try:
                array = np.asarray(value)
                if array.dtype.kind not in "iu" or array.ndim > 1:
                    raise _NoLink(f"{what} is not an integer scalar or 1-D tensor")
                return [int(v) for v in array.reshape(-1)], array.ndim == 0
            finally:
                self.folder.release([value])
        node = self.folder.producer(name)
        if node is None or node.domain not in _DEFAULT_DOMAINS or depth > 32:
            raise _NoLink(f"{what} is not a constant, nor computed from the shapes of the values between the layers")
        label = _label(node)
        attrs = attributes(node, label)
        op, inputs = node.op_type, [i for i in node.input]
        if op == "Shape":
            if inputs[0] not in known:
                raise _NoLink(f"{what} reads the shape of {inputs[0]!r}, which is not on the way between the layers")
            dims = known[inputs[0]]
            rank = len(dims)
            start = attr_value(attrs, "start", "int", label, 0) if self.opset >= 15 else 0
            end = attr_value(attrs, "end", "int", label, rank) if self.opset >= 15 else rank
            start = min(max(start + rank if start < 0 else start, 0), rank)
            end = min(max(end + rank if end < 0 else end, 0), rank)
            return [tuple(axis) for axis in dims[start:end]], False
        def operand(index):
            if index >= len(inputs) or not inputs[index]:
                raise _NoLink(f"{what}: {label} lacks input {index}")
            return self.shape_entries(inputs[index], known, what, depth + 1)

        if op in ("Identity", "Cast"):
            return operand(0)
        if op in ("Squeeze", "Unsqueeze", "Reshape"):  # of a single size: to a scalar or a 1-element vector
            entries, _ = operand(0)
            if len(entries) != 1:
                raise _NoLink(f"{what}: {label} of {len(entries)} values")
            if op == "Reshape":
                target = self.constant_ints(inputs[1], f"{label}: shape") if len(inputs) > 1 and inputs[1] else None
                if target not in ([], [1], [-1]):
                    raise _NoLink(f"{what}: {label} to {target}")
                return entries, target == []
            return entries, op == "Squeeze"
        if op == "Concat":
            entries = []
            for index in range(len(inputs)):
                part, scalar = operand(index)
                if scalar:
                    raise _NoLink(f"{what}: {label} of a scalar")
                entries += part
            return entries, False
        if op == "Slice" and self.opset >= 10:
            entries, scalar = operand(0)
            starts = self.constant_ints(inputs[1], f"{label}: starts") if len(inputs) > 1 else None
            ends = self.constant_ints(inputs[2], f"{label}: ends") if len(inputs) > 2 else None
            axes = self.constant_ints(inputs[3], f"{label}: axes") if len(inputs) > 3 and inputs[3] else [0]
            steps = self.constant_ints(inputs[4], f"{label}: steps") if len(inputs) > 4 and inputs[4] else [1]
            if scalar or starts is None or ends is None or len(starts) != 1 or len(ends) != 1 \
                    or axes not in ([0], [-1]) or steps != [1]:
                raise _NoLink(f"{what}: {label} is not a plain slice of a shape")
            return entries[starts[0]:ends[0]], False  # Python's clamping is Slice's for step 1
        if op == "Gather":
            entries, scalar = operand(0)
            index, index_scalar = operand(1)
            if scalar or attr_value(attrs, "axis", "int", label, 0) not in (0, -1) or \
                    not all(isinstance(i, int) and -len(entries) <= i < len(entries) for i in index):
                raise _NoLink(f"{what}: {label} is not a gather from a shape")
            return [entries[i] for i in index], index_scalar
        if op == "Mul":
            (left, left_scalar), (right, right_scalar) = operand(0), operand(1)
            if len(left) != 1 or len(right) != 1:
                raise _NoLink(f"{what}: {label} of {len(left)} and {len(right)} values")
            a, b = left[0], right[0]
            if isinstance(a, int) and isinstance(b, int):
                product = a * b
            elif isinstance(a, tuple) and isinstance(b, tuple):
                product = a + b
            elif (a if isinstance(a, int) else b) == 1:
                product = b if isinstance(a, int) else a
            else:
                raise _NoLink(f"{what}: {label} multiplies a run-time size by a number")
            return [product], left_scalar and right_scalar
        raise _NoLink(f"{what} is computed by {label}, which the importer does not follow")

    def reaches_gru(self, name):
        """The first GRU node downstream of ``name`` (a bounded breadth-first search), or None."""
        seen, queue = set(), collections.deque([name])
        while queue and len(seen) < _SEARCH_LIMIT:
            value = queue.popleft()
            for node, _ in self.consumers.get(value, []):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == "GRU" and node.domain in _DEFAULT_DOMAINS:
                    return node
                queue.extend(o for o in node.output if o)
        return None


# ---- the symbolic shape of a GRU output ----------------------------------------------------------
# A tensor is a list of axes; an axis is a tuple of named dimensions in row-major order.  T and B are
# run-time sizes (None); D and H are known.  Dimensions of size 1 are left out, so an axis () has size 1.

def _squeeze(axes, drop, what):
    for a in drop:
        if axes[a]:
            raise _NoLink(f"{what} squeezes axis {a}, which is not of size 1")
    return [axis for i, axis in enumerate(axes) if i not in drop]


def _reshape(axes, shape, allow_zero, sizes, what):
    stream = [dim for axis in axes for dim in axis]
    bounds = [0]
    for axis in axes:
        bounds.append(bounds[-1] + len(axis))

    def take(entry, position, start, forward):
        """Dimensions of output axis ``position`` beginning at ``start`` of the stream (read backwards
        from ``start`` when not ``forward``) -> (dims, new start)."""
        if isinstance(entry, tuple):  # a size computed from Shapes: the product of these dimensions
            dims = tuple(stream[start:start + len(entry)] if forward else stream[max(start - len(entry), 0):start])
            if sorted(dims) != sorted(entry):  # products of run-time sizes are equal iff their factors are
                raise _NoLink(f"{what}: shape entry {'*'.join(entry)} at {position} does not match the input "
                              f"there")
            return dims, (start + len(dims) if forward else start - len(dims))
        if entry == 0 and not allow_zero:
            if position >= len(axes):
                raise _NoLink(f"{what}: shape entry 0 at {position} copies an axis the input lacks")
            aligned = bounds[position] if forward else bounds[position + 1]
            if start != aligned:
                raise _NoLink(f"{what}: shape entry 0 at {position} does not keep input axis {position} whole")
            dims = axes[position]
            return dims, (start + len(dims) if forward else start - len(dims))
        if entry < 0:
            raise _NoLink(f"{what}: shape entry {entry}")
        dims, product = [], 1
        while product < entry:
            index = start if forward else start - 1
            if not 0 <= index < len(stream):
                raise _NoLink(f"{what}: shape {shape} does not fit the input")
            dim = stream[index]
            if sizes[dim] is None:
                raise _NoLink(f"{what}: a fixed size {entry} would include the run-time dimension {dim}")
            product *= sizes[dim]
            dims.append(dim)
            start = start + 1 if forward else start - 1
        if product != entry:
            raise _NoLink(f"{what}: shape {shape} splits a dimension of the input")
        return tuple(dims if forward else dims[::-1]), start

    if shape.count(-1) > 1:
        raise _NoLink(f"{what}: shape {shape} has more than one -1")
    split = shape.index(-1) if -1 in shape else len(shape)
    left, start = [], 0
    for position in range(split):
        dims, start = take(shape[position], position, start, True)
        left.append(dims)
    if split == len(shape):
        if start != len(stream):
            raise _NoLink(f"{what}: shape {shape} does not hold the whole input")
        return left
    right, end = [], len(stream)
    for position in range(len(shape) - 1, split, -1):
        offset = position - len(shape) + len(axes)  # entry 0 counts input axes from the same end
        dims, end = take(shape[position], offset, end, False)
        right.append(dims)
    if end < start:
        raise _NoLink(f"{what}: shape {shape} does not fit the input")
    return left + [tuple(stream[start:end])] + right[::-1]


def _apply(graph, node, axes, sizes, known):
    what = _label(node)
    attrs = attributes(node, what)
    op = node.op_type
    opset = graph.opset
    if op == "Identity":
        return axes
    if op == "Transpose":
        perm = attr_value(attrs, "perm", "ints", what)
        perm = list(range(len(axes)))[::-1] if perm is None else perm
        if sorted(perm) != list(range(len(axes))):
            raise _NoLink(f"{what}: perm {perm} is not a permutation of {len(axes)} axes")
        return [axes[p] for p in perm]
    if op in ("Squeeze", "Unsqueeze"):
        if opset < 13:
            listed = attr_value(attrs, "axes", "ints", what)
        elif len(node.input) > 1 and node.input[1]:
            listed = graph.constant_ints(node.input[1], f"{what}: axes")
        else:
            listed = None
        if op == "Squeeze":
            if not listed:  # would also drop T or B whenever they are 1 at run time
                raise _NoLink(f"{what} has no axes: it would squeeze whichever dimensions are 1 at run time")
            rank = len(axes)
            drop = {a + rank if a < 0 else a for a in listed}
            if any(not 0 <= a < rank for a in drop):
                raise _NoLink(f"{what}: axes {listed} out of range")
            return _squeeze(axes, drop, what)
        if not listed:
            raise _NoLink(f"{what} has no axes")
        rank = len(axes) + len(listed)
        added = sorted(a + rank if a < 0 else a for a in listed)
        if any(not 0 <= a < rank for a in added) or len(set(added)) != len(added):
            raise _NoLink(f"{what}: axes {listed} out of range or repeated")
        result, source = [], iter(axes)
        for position in range(rank):
            result.append(() if position in added else next(source))
        return result
    if op == "Reshape":
        if opset < 5:
            shape = attr_value(attrs, "shape", "ints", what)
        elif len(node.input) > 1 and node.input[1]:
            shape, scalar = graph.shape_entries(node.input[1], known, f"{what}: shape")
            if scalar:
                raise _NoLink(f"{what}: shape is a scalar")
        else:
            shape = None
        if shape is None:
            raise _NoLink(f"{what} has no shape")
        shape = [1 if e == () else e for e in shape]  # an axis of size 1
        allow_zero = attr_value(attrs, "allowzero", "int", what, 0) if opset >= 14 else 0
        return _reshape(axes, shape, allow_zero, sizes, what)
    raise _NoLink(f"{what} is not a shape operation")  # pragma: no cover - filtered by the caller


def _output_axes(layout, sizes):
    """(axes of Y, axes the next layer's X must have), leaving out dimensions of size 1."""
    def keep(*dims):
        return tuple(d for d in dims if sizes[d] != 1)

    if layout == 0:
        return [keep("T"), keep("D"), keep("B"), keep("H")], [keep("T"), keep("B"), keep("D", "H")]
    return [keep("B"), keep("T"), keep("D"), keep("H")], [keep("B"), keep("T"), keep("D", "H")]


def _follow(graph, node, config, keys, fixed, pairs=None, start=None):
    """-> (next GRU node, None) when ``node``'s Y is exactly the next layer's X; (None, reason) when
    the Y reaches another GRU node some other way; (None, None) when no GRU node is downstream.
    ``fixed``: {"T": ..., "B": ...} when the graph's declared input shape fixes them, else {}.
    ``pairs``: {id(forward node): reverse node} of the layers written as two nodes; the next layer may
    be one (its two nodes then both read the value as X; the forward node is returned).  ``start``:
    (value, axes) to follow instead of ``node``'s Y (a pair's Concat of directions)."""
    pairs = pairs or {}
    key = keys[id(node)]
    if not node.output or not node.output[0]:
        return None, None
    D, H, layout = _DIRECTIONS[config["direction"]], config["hidden"], config["layout"]
    if H is None:
        target = graph.reaches_gru(node.output[0])
        if target is None:
            return None, None
        return None, (f"GRU node {key!r} and GRU node {keys.get(id(target), target.name)!r} stay separate: the "
                      f"hidden size of {key!r} is unknown (no hidden_size attribute, R not foldable)")
    sizes = {"T": fixed.get("T"), "B": fixed.get("B"), "D": D, "H": H}
    axes, expected = _output_axes(layout, sizes)
    value = node.output[0]
    if start is not None:
        value, axes = start
    known = {value: axes}  # the values on the way, by their symbolic axes (Shape nodes may read them)
    while True:
        target = graph.reaches_gru(value)
        if target is None:
            return None, None
        reason_head = f"GRU node {key!r} and GRU node {keys.get(id(target), target.name)!r} stay separate: "
        if value in graph.outputs:
            return None, reason_head + f"{value!r} (on the way from Y) is also a graph output"
        consumers = graph.data_consumers(value)
        if len(consumers) == 2 and all(n.op_type == "GRU" and n.domain in _DEFAULT_DOMAINS and i == 0
                                       for n, i in consumers):
            first, second = (n for n, _ in consumers)
            if pairs.get(id(second)) is first:
                first, second = second, first
            if pairs.get(id(first)) is second:  # the next layer is a forward and a reverse node
                consumers = [(first, 0)]
        if len(consumers) != 1:
            listed = ", ".join(_label(n) for n, _ in consumers)
            return None, reason_head + f"{value!r} (on the way from Y) feeds {len(consumers)} nodes ({listed})"
        consumer, index = consumers[0]
        if consumer.domain in _DEFAULT_DOMAINS and consumer.op_type == "GRU":
            if index != 0:
                return None, reason_head + f"Y reaches input {index} of {_label(consumer)}, not its X"
            if [tuple(a) for a in axes] != [tuple(a) for a in expected]:
                return None, reason_head + (f"Y reaches X rearranged as {_pretty(axes)}, not as the "
                                            f"previous layer's output {_pretty(expected)}")
            return consumer, None
        if consumer.domain not in _DEFAULT_DOMAINS or consumer.op_type not in _SHAPE_OPS or index != 0:
            return None, reason_head + (f"{_label(consumer)} sits between them (only "
                                        f"{', '.join(_SHAPE_OPS)} may join stacked layers)")
        try:
            axes = _apply(graph, consumer, axes, sizes, known)
        except _NoLink as exc:
            return None, reason_head + str(exc)
        except ValueError as exc:
            return None, reason_head + f"{_label(consumer)}: {exc}"
        if len(consumer.output) != 1:
            return None, reason_head + f"{_label(consumer)} has {len(consumer.output)} outputs"
        value = consumer.output[0]
        known[value] = axes


def _pretty(axes):
    return "(" + ", ".join("*".join(a) if a else "1" for a in axes) + ")"


def _same_layer_kind(a, b):
    """None when layers with configs ``a`` and ``b`` can stack, else what differs."""
    for field, what in (("direction", "direction"), ("hidden", "hidden_size"),
                        ("linear_before_reset", "linear_before_reset"), ("activations", "activations"),
                        ("clip", "clip"), ("layout", "layout"), ("sequence_lens", "sequence_lens")):
        if a[field] != b[field]:
            return f"their {what} differ ({a[field]!r} and {b[field]!r})"
    return None


def _initial_state(graph, node, config, initial_h_kind):
    """('zero', None, None) | ('slice', source, start) | ('other', name, None) for a node's initial_h."""
    name = node.input[5] if len(node.input) > 5 else ""
    if not name or initial_h_kind(node) == "zero":
        return "zero", None, None
    producer = graph.folder.producer(name)
    if producer is None or producer.domain not in _DEFAULT_DOMAINS or producer.op_type != "Slice":
        return "other", name, None
    axis = 0 if config["layout"] == 0 else 1
    D = _DIRECTIONS[config["direction"]]
    what = _label(producer)
    try:
        if graph.opset < 10:
            attrs = attributes(producer, what)
            starts = attr_value(attrs, "starts", "ints", what)
            ends = attr_value(attrs, "ends", "ints", what)
            axes = attr_value(attrs, "axes", "ints", what)
            steps = None
        else:
            inputs = list(producer.input) + [""] * 5
            starts = graph.constant_ints(inputs[1], f"{what}: starts")
            ends = graph.constant_ints(inputs[2], f"{what}: ends")
            axes = graph.constant_ints(inputs[3], f"{what}: axes") if inputs[3] else None
            steps = graph.constant_ints(inputs[4], f"{what}: steps") if inputs[4] else None
    except (_NoLink, ValueError):
        return "other", name, None
    axes = list(range(len(starts or []))) if axes is None else axes
    if (starts is None or ends is None or len(starts) != 1 or len(ends) != 1 or axes != [axis]
            or steps not in (None, [1]) or starts[0] < 0 or ends[0] - starts[0] != D):
        return "other", name, None
    return "slice", producer.input[0], starts[0]


_FAR = 2 ** 62  # a Slice bound past any real axis length


def _reverses(graph, node, axis, rank):
    """Whether ``node`` is a Slice reversing the whole of ``axis`` (of a ``rank``-D input), as
    ``torch.flip`` exports: starts [-1], ends [-(2**63 - 1)], steps [-1]."""
    if node is None or node.op_type != "Slice" or node.domain not in _DEFAULT_DOMAINS or graph.opset < 10:
        return False
    inputs = list(node.input) + [""] * 5
    if not all(inputs[1:5]):
        return False
    try:
        starts, ends, axes, steps = (graph.constant_ints(inputs[k], _label(node)) for k in (1, 2, 3, 4))
    except _NoLink:
        return False
    return (len(starts) == len(ends) == len(axes) == len(steps) == 1 and steps == [-1]
            and axes[0] + (rank if axes[0] < 0 else 0) == axis and (starts[0] == -1 or starts[0] >= _FAR)
            and ends[0] <= -_FAR)


def _walk_to_join(graph, node, config, fixed):
    """Follow a single-direction node's Y through shape operations, and Slices reversing the time axis,
    to the first other consumer: -> (consumer, input index, axes there, whether time is reversed there),
    or None."""
    H, layout = config["hidden"], config["layout"]
    if H is None or not node.output or not node.output[0]:
        return None
    sizes = {"T": fixed.get("T"), "B": fixed.get("B"), "D": 1, "H": H}
    axes, _ = _output_axes(layout, sizes)
    value = node.output[0]
    known = {value: axes}
    flipped = False
    while True:
        consumers = graph.data_consumers(value)
        if value in graph.outputs or len(consumers) != 1:
            return None
        consumer, index = consumers[0]
        time_axis = next((k for k, a in enumerate(axes) if tuple(a) == ("T",)), None)
        if index == 0 and time_axis is not None and _reverses(graph, consumer, time_axis, len(axes)):
            flipped = not flipped
            value = consumer.output[0] if len(consumer.output) == 1 else None
            if value is None:
                return None
            known[value] = axes
            continue
        if consumer.domain not in _DEFAULT_DOMAINS or consumer.op_type not in _SHAPE_OPS or index != 0:
            return consumer, index, axes, flipped
        try:
            axes = _apply(graph, consumer, axes, sizes, known)
        except (_NoLink, ValueError):
            return None
        if len(consumer.output) != 1:
            return None
        value = consumer.output[0]
        known[value] = axes


def _find_pairs(graph, nodes, configs, fixed, initial_h_kind):
    """Bidirectional layers written as two nodes: a forward and a reverse node reading the same X, alike
    in everything else, both starting from zeros, whose Ys (through shape operations) are the two inputs
    of one Concat, forward first, along an axis where the direction axis belongs (so the Concat is the
    bidirectional node's Y, or that Y with the directions merged).
    -> {forward index: (reverse index, Concat output, its axes)}."""
    by_x = collections.defaultdict(list)
    flipped_x = set()  # nodes whose X is their pair's X reversed in time (a forward node run backwards)
    for i, node in enumerate(nodes):
        if not node.input or not node.input[0]:
            continue
        x = node.input[0]
        producer = graph.folder.producer(x)
        time_axis = configs[i]["layout"]  # of X: (T, B, I) or, layout=1, (B, T, I)
        if configs[i]["direction"] == "forward" and _reverses(graph, producer, time_axis, 3):
            x = producer.input[0]
            flipped_x.add(i)
        by_x[x].append(i)
    pairs = {}
    for indices in by_x.values():
        if len(indices) != 2:
            continue
        f, r = sorted(indices, key=lambda k: (k in flipped_x, configs[k]["direction"] != "forward"))
        cf, cr = configs[f], configs[r]
        backwards = "forward" if r in flipped_x else "reverse"
        if f in flipped_x or (cf["direction"], cr["direction"]) != ("forward", backwards) \
                or (r in flipped_x and cr["sequence_lens"]) or cf["activation_params"] or \
                cr["activation_params"] or _same_layer_kind(cf, dict(cr, direction="forward")) is not None:
            continue
        if initial_h_kind(nodes[f]) != "zero" or initial_h_kind(nodes[r]) != "zero":
            continue
        ends = [_walk_to_join(graph, nodes[k], configs[k], fixed.get(f, {})) for k in (f, r)]
        if None in ends:
            continue
        (concat, index_f, axes_f, flipped_f), (other, index_r, axes_r, flipped_r) = ends
        if flipped_f or flipped_r != (r in flipped_x):  # a time-reversed run must be reversed back
            continue
        if (concat is not other or concat.op_type != "Concat" or concat.domain not in _DEFAULT_DOMAINS
                or (index_f, index_r) != (0, 1) or len(concat.input) != 2 or axes_f != axes_r
                or len(concat.output) != 1):
            continue
        axis = attr_value(attributes(concat, _label(concat)), "axis", "int", _label(concat))
        if axis is None or not -len(axes_f) <= axis < len(axes_f):
            continue
        axis += len(axes_f) if axis < 0 else 0
        joined = list(axes_f)
        joined[axis] = ("D",) + tuple(axes_f[axis])
        pairs[f] = (r, concat.output[0], joined)
    return pairs


def _declared_sizes(graph_proto, folder, node, layout):
    """{"T": t, "B": b} when ``node``'s X is a graph input (or a Transpose of one) whose declared shape
    fixes them -- torch.onnx.export(dynamo=True) without dynamic shapes writes Reshapes to these fixed
    sizes between layers, and a runtime accepts no other input shape -- else {}."""
    if not node.input or not node.input[0]:
        return {}
    name, perm = node.input[0], None
    producer = folder.producer(name)
    if producer is not None:
        if producer.domain not in _DEFAULT_DOMAINS or producer.op_type != "Transpose" or not producer.input:
            return {}
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), None)
        name = producer.input[0]
        if folder.producer(name) is not None:
            return {}
    declared = next((v for v in graph_proto.input if v.name == name), None)
    if declared is None or name in folder.initializers or not declared.type.HasField("tensor_type"):
        return {}
    shape = declared.type.tensor_type
    if not shape.HasField("shape") or len(shape.shape.dim) != 3:
        return {}
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.shape.dim]
    if perm is not None:
        if sorted(perm) != [0, 1, 2]:
            return {}
        dims = [dims[p] for p in perm]
    T, B = (dims[0], dims[1]) if layout == 0 else (dims[1], dims[0])
    return {k: v for k, v in (("T", T), ("B", B)) if v is not None}


def find_stacks(graph_proto, nodes, keys, configs, folder, opset, initial_h_kind):
    """Group GRU nodes into stacks.

    ``nodes``: the main graph's GRU nodes in graph order; ``keys``: their keys; ``configs``: for each,
    a dict with direction, hidden (hidden size or None), linear_before_reset, activations (resolved
    tuple), clip, layout and sequence_lens (input name or ''); ``initial_h_kind(node)``: 'zero' when
    the node's initial_h is absent or constant zeros.

    Returns ``(groups, notes)``: ``groups`` a list of ``(layers, initial_h source or None)`` in graph
    order of each group's first node, a layer being the list of its nodes' indices (one node, or a
    forward and a reverse node that together are one bidirectional layer); ``notes`` one sentence per
    pair of GRU nodes that stay separate although one's output reaches the other's input.
    """
    graph = _Graph(graph_proto, folder, opset)
    index_of = {id(n): i for i, n in enumerate(nodes)}
    key_of = {id(n): k for n, k in zip(nodes, keys)}
    following, notes = {}, []
    fixed = {i: _declared_sizes(graph_proto, folder, n, configs[i]["layout"]) for i, n in enumerate(nodes)}
    pairs = _find_pairs(graph, nodes, configs, fixed, initial_h_kind)
    partner = {f: r for f, (r, _, _) in pairs.items()}
    paired = {id(nodes[f]): nodes[r] for f, r in partner.items()}
    configs = list(configs)
    for f, r in partner.items():  # a pair is one bidirectional layer
        configs[f] = dict(configs[f], direction="bidirectional",
                          activations=configs[f]["activations"] + configs[r]["activations"])
    for i, node in enumerate(nodes):
        if i in partner.values():
            continue
        start = (pairs[i][1], pairs[i][2]) if i in pairs else None
        target, reason = _follow(graph, node, configs[i], key_of, fixed[i], paired, start)
        if target is None:
            if reason:
                notes.append(reason)
            continue
        j = index_of[id(target)]
        differ = _same_layer_kind(configs[i], configs[j])
        if differ:
            notes.append(f"GRU node {keys[i]!r} feeds GRU node {keys[j]!r}, but they stay separate: {differ}")
            continue
        following[i] = j
        fixed[j] = fixed[i]
    preceded = set(following.values())
    groups = []
    for i in range(len(nodes)):
        if i in preceded or i in partner.values():
            continue
        chain = [i]
        while chain[-1] in following and len(chain) <= len(nodes):
            chain.append(following[chain[-1]])
        if len(chain) == 1:
            groups.append(([[i, partner[i]] if i in partner else [i]], None))
            continue
        states = [("zero", None, None) if k in partner else _initial_state(graph, nodes[k], configs[k], initial_h_kind)
                  for k in chain]
        D = _DIRECTIONS[configs[i]["direction"]]
        kinds = {s[0] for s in states}
        source = None
        reason = None
        if kinds == {"slice"}:
            sources = {s[1] for s in states}
            starts = [s[2] for s in states]
            if len(sources) == 1 and starts == [layer * D for layer in range(len(chain))]:
                source = sources.pop()
            else:
                reason = ("their initial_h are not the consecutive slices [l*D, (l+1)*D) of one tensor "
                          f"(sources {sorted(sources)}, starts {starts})")
        elif kinds != {"zero"}:
            described = ", ".join(f"{keys[k]!r}: {s[0] if s[0] != 'other' else 'computed (' + repr(s[1]) + ')'}"
                                  for k, s in zip(chain, states))
            reason = f"their initial states do not fit one stacked h0 ({described})"
        layers = [[k, partner[k]] if k in partner else [k] for k in chain]
        if reason is not None:
            notes.append(f"GRU nodes {', '.join(repr(keys[k]) for k in chain)} form a chain but stay separate: "
                         f"{reason}")
            groups.extend(([layer], None) for layer in layers)
        else:
            groups.append((layers, source))
    covered = {k for layers, _ in groups for layer in layers for k in layer}
    groups.extend(([[k]], None) for k in range(len(nodes)) if k not in covered)  # a cyclic (malformed) graph
    groups.sort(key=lambda group: group[0][0][0])
    return groups, notes
