"""Constant folding of ONNX graphs in numpy, for the ONNX importer.

Exporters rarely hand a GRU node its weights as plain initializers.  ``torch.onnx.export`` without
constant folding slices PyTorch's (r, z, n) blocks out of each parameter, concatenates them in ONNX's
(z, r, h) order and unsqueezes the direction axis; other exporters keep weights in ``Constant`` nodes
or add Transpose / Reshape / Gather / Cast steps.  :class:`ConstantFolder` evaluates such chains from
the graph's constants, following the operator specifications of the model's opset (Slice takes
attributes before opset 10 and inputs after; Unsqueeze / Squeeze take ``axes`` as an input from opset
13, Reshape its shape from opset 5, and so on).

Folded ops: Constant, Identity, Cast, CastLike, Slice, Concat, Unsqueeze, Squeeze, Transpose, Reshape,
Gather, Expand, ConstantOfShape, Shape, Split.  A value that depends on a graph input or on any other
op is not constant: :class:`NotConstant` says which input or node it depends on.

Every array the folder materializes (a decoded initializer, a folded intermediate) is charged to a
:class:`Budget` *before* it is allocated, from shapes alone, and released once every consumer has
used it, so a tensor whose dims claim terabytes is refused without touching memory.  Tensor bytes
are decoded here rather than by ``onnx.numpy_helper`` so that the size checks come first; external
data is read through :mod:`converters._safe_paths`.
"""

from __future__ import annotations

import math

import numpy as np

from ._safe_paths import read_external

__all__ = ["Budget", "ConstantFolder", "NotConstant", "decode_tensor", "tensor_nbytes"]


class NotConstant(ValueError):
    """The value depends on something only known at run time (``reason`` says what)."""

    def __init__(self, name, reason):
        super().__init__(f"{name!r} is not a constant: {reason}")
        self.name = name
        self.reason = reason


class Budget:
    """Bytes the importer holds at once, charged before each allocation and capped at ``max_bytes``."""

    def __init__(self, max_bytes):
        self.max_bytes = int(max_bytes)
        self.live = 0

    def charge(self, nbytes, what):
        nbytes = int(nbytes)
        if nbytes > self.max_bytes - self.live:
            raise ValueError(f"{what} needs {_human(nbytes)}, over the memory cap max_bytes={self.max_bytes} "
                             f"({_human(self.live)} already held); raise max_bytes if the model is genuine")
        self.live += nbytes

    def release(self, nbytes):
        self.live = max(0, self.live - int(nbytes))


def _human(nbytes):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# TensorProto decoding
# --------------------------------------------------------------------------------------------------

# ONNX TensorProto.DataType -> (name, numpy dtype held in memory, bytes per element in raw_data,
#                               typed field that carries the values when raw_data is absent)
_ELEMENT_TYPES = {
    1: ("float", np.float32, 4, "float_data"),
    2: ("uint8", np.uint8, 1, "int32_data"),
    3: ("int8", np.int8, 1, "int32_data"),
    4: ("uint16", np.uint16, 2, "int32_data"),
    5: ("int16", np.int16, 2, "int32_data"),
    6: ("int32", np.int32, 4, "int32_data"),
    7: ("int64", np.int64, 8, "int64_data"),
    9: ("bool", np.bool_, 1, "int32_data"),
    10: ("float16", np.float16, 2, "int32_data"),
    11: ("double", np.float64, 8, "double_data"),
    12: ("uint32", np.uint32, 4, "uint64_data"),
    13: ("uint64", np.uint64, 8, "uint64_data"),
    16: ("bfloat16", np.float32, 2, "int32_data"),  # widened to float32 exactly
}
_RAW_DTYPES = {2: "<u1", 3: "<i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "<u1", 10: "<f2", 11: "<f8",
               12: "<u4", 13: "<u8", 1: "<f4", 16: "<u2"}
_NUMPY_TO_ONNX = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.uint16): 4,
                  np.dtype(np.int16): 5, np.dtype(np.int32): 6, np.dtype(np.int64): 7, np.dtype(np.bool_): 9,
                  np.dtype(np.float16): 10, np.dtype(np.float64): 11, np.dtype(np.uint32): 12,
                  np.dtype(np.uint64): 13}
_TYPE_NAMES = {0: "undefined", 8: "string", 14: "complex64", 15: "complex128", 17: "float8e4m3fn",
               18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
               23: "float4e2m1"}
_STRING_CAST_NAMES = {"FLOAT": 1, "UINT8": 2, "INT8": 3, "UINT16": 4, "INT16": 5, "INT32": 6, "INT64": 7,
                      "BOOL": 9, "FLOAT16": 10, "DOUBLE": 11, "UINT32": 12, "UINT64": 13, "BFLOAT16": 16}
_EXTERNAL = 1  # TensorProto.EXTERNAL


def element_type_name(code):
    if code in _ELEMENT_TYPES:
        return _ELEMENT_TYPES[code][0]
    return _TYPE_NAMES.get(code, f"type code {code}")


def _checked_dims(dims, what):
    dims = tuple(int(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"{what}: negative dimension in shape {dims}")
    return dims


def tensor_nbytes(tensor, what):
    """(dims, numpy dtype, bytes once decoded, bytes as stored) of a TensorProto, from its header only."""
    code = tensor.data_type
    if code not in _ELEMENT_TYPES:
        raise ValueError(f"{what}: element type {element_type_name(code)} is not supported")
    dims = _checked_dims(tensor.dims, what)
    _, dtype, stored_size, _ = _ELEMENT_TYPES[code]
    count = math.prod(dims)
    return dims, np.dtype(dtype), count * np.dtype(dtype).itemsize, count * stored_size


def _bfloat16_bits_to_float32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def decode_tensor(tensor, *, budget, base_dir, what):
    """TensorProto -> numpy array, charging ``budget`` before any allocation.

    Raw little-endian bytes, the typed ``*_data`` fields and external data (read through
    :func:`converters._safe_paths.read_external`) are accepted; a byte count or value count that does
    not match the dims raises ValueError.  float16 stays float16, bfloat16 widens to float32.
    """
    dims, dtype, nbytes, stored_nbytes = tensor_nbytes(tensor, what)
    if tensor.HasField("segment"):
        raise ValueError(f"{what}: segmented tensors are not supported")
    code = tensor.data_type
    external = tensor.data_location == _EXTERNAL
    # The stored bytes and the decoded array may be alive together for a moment.
    transient = stored_nbytes if (external or code == 16) else 0
    budget.charge(nbytes + transient, what)
    try:
        count = math.prod(dims)
        if external:
            raw = read_external(tensor, base_dir, stored_nbytes, what)
        elif tensor.raw_data:
            raw = tensor.raw_data
            if len(raw) != stored_nbytes:
                raise ValueError(f"{what}: raw_data holds {len(raw)} bytes, but shape {dims} of "
                                 f"{element_type_name(code)} needs {stored_nbytes}")
        else:
            raw = None
        if raw is not None:
            values = np.frombuffer(raw, dtype=np.dtype(_RAW_DTYPES[code]), count=count)
        else:
            field = _ELEMENT_TYPES[code][3]
            stored = getattr(tensor, field)
            if len(stored) != count:
                raise ValueError(f"{what}: {field} holds {len(stored)} values, but shape {dims} needs {count}")
            if code in (1, 11, 7, 12, 13):
                values = np.array(stored, dtype=dtype)
            else:  # narrow types and 16-bit floats travel as int32 bit patterns / values
                values = np.array(stored, dtype=np.int64)
                if code in (10, 16):
                    values = values.astype(np.uint16)
                    values = values.view(np.float16) if code == 10 else values
                elif code == 9:
                    values = values != 0
                else:
                    values = values.astype(dtype)
        if code == 16:
            values = _bfloat16_bits_to_float32(np.asarray(values, dtype=np.uint16))
        elif code == 9:
            values = np.asarray(values).astype(np.bool_)
        array = np.array(values, dtype=dtype, copy=True).reshape(dims)  # native byte order, owned, writable
    except (OverflowError, TypeError) as exc:
        budget.release(nbytes + transient)
        raise ValueError(f"{what}: cannot decode the stored values ({exc})") from exc
    except BaseException:
        budget.release(nbytes + transient)
        raise
    budget.release(transient)
    return array


# --------------------------------------------------------------------------------------------------
# attributes
# --------------------------------------------------------------------------------------------------

def attributes(node, what):
    """{name: AttributeProto}; duplicates and graph-function references are refused."""
    found = {}
    for attr in node.attribute:
        if attr.name in found:
            raise ValueError(f"{what}: attribute {attr.name!r} given twice")
        if attr.ref_attr_name:
            raise ValueError(f"{what}: attribute {attr.name!r} refers to a function attribute "
                             f"({attr.ref_attr_name!r}); only plain values are supported")
        found[attr.name] = attr
    return found


_ATTR_FIELDS = {1: "f", 2: "i", 3: "s", 4: "t", 6: "floats", 7: "ints", 8: "strings"}
_ATTR_KINDS = {1: "float", 2: "int", 3: "string", 4: "tensor", 6: "floats", 7: "ints", 8: "strings"}


def attr_value(attrs, name, kind, what, default=None):
    """The value of attribute ``name`` of the given kind ('int', 'ints', 'float', 'floats', 'string',
    'strings', 'tensor'), or ``default`` when absent."""
    attr = attrs.get(name)
    if attr is None:
        return default
    got = _ATTR_KINDS.get(attr.type, f"type {attr.type}")
    if got != kind:
        raise ValueError(f"{what}: attribute {name!r} should be of type {kind}, got {got}")
    value = getattr(attr, _ATTR_FIELDS[attr.type])
    if kind == "string":
        return _text(value, name, what)
    if kind == "strings":
        return [_text(v, name, what) for v in value]
    if kind in ("ints", "floats"):
        return list(value)
    return value


def _text(value, name, what):
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: attribute {name!r} is not valid UTF-8") from exc


# --------------------------------------------------------------------------------------------------
# constant folding
# --------------------------------------------------------------------------------------------------

_DEFAULT_DOMAINS = ("", "ai.onnx")
FOLDABLE = frozenset({"Constant", "Identity", "Cast", "CastLike", "Slice", "Concat", "Unsqueeze", "Squeeze",
                      "Transpose", "Reshape", "Gather", "Expand", "ConstantOfShape", "Shape", "Split"})


def _node_label(node):
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node (unnamed, output " \
        f"{next((o for o in node.output if o), '?')!r})"


class ConstantFolder:
    """Evaluates the constant part of one ONNX graph on demand.

    Parameters
    ----------
    graph : onnx.GraphProto
    opset : int
        The model's version of the default ONNX domain; selects each operator's signature.
    base_dir : str or None
        Directory for external data (None: external tensors are refused).
    budget : Budget
        Charged for every array materialized; what :meth:`fold` returns stays charged until the caller
        releases it.
    """

    def __init__(self, graph, *, opset, base_dir, budget):
        self.opset = int(opset)
        self.base_dir = base_dir
        self.budget = budget
        self.initializers = {}
        for tensor in graph.initializer:
            if tensor.name in self.initializers:
                raise ValueError(f"initializer {tensor.name!r} is defined twice")
            self.initializers[tensor.name] = tensor
        self.sparse_initializers = {t.values.name or t.indices.name for t in graph.sparse_initializer}
        self.graph_inputs = {i.name for i in graph.input}
        self.producers = {}
        for node in graph.node:
            for out in node.output:
                if not out:
                    continue
                if out in self.producers or out in self.initializers:
                    raise ValueError(f"value {out!r} is produced more than once (by {_node_label(node)} and "
                                     "another node or an initializer); the graph is not in SSA form")
                self.producers[out] = node

    # ---- structure ------------------------------------------------------------------------------

    def producer(self, name):
        """The node producing ``name``, or None (initializer, graph input or undefined)."""
        return self.producers.get(name)

    def static_shape(self, name):
        """Shape of ``name`` when known without evaluating anything (initializers and Constant tensors)."""
        tensor = self.initializers.get(name)
        if tensor is None:
            node = self.producers.get(name)
            if node is not None and node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                attr = next((a for a in node.attribute if a.name == "value" and a.type == 4), None)
                tensor = attr.t if attr is not None else None
        if tensor is None:
            return None
        try:
            return _checked_dims(tensor.dims, name)
        except ValueError:
            return None

    def _resolve(self, name):
        """("leaf", None) for an initializer, ("node", node) for a foldable node's output, or NotConstant."""
        if name in self.initializers:
            return "leaf", None
        node = self.producers.get(name)
        if node is None:
            if name in self.graph_inputs:
                raise NotConstant(name, f"it is the graph input {name!r}, supplied at run time")
            if name in self.sparse_initializers:
                raise NotConstant(name, f"{name!r} is a sparse initializer, which is not supported")
            raise NotConstant(name, f"{name!r} is not defined in the graph (no initializer, input or node "
                                    "output of that name)")
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in FOLDABLE:
            domain = f" of domain {node.domain!r}" if node.domain not in _DEFAULT_DOMAINS else ""
            raise NotConstant(name, f"it is computed by {_node_label(node)}{domain}, which the importer does "
                                    "not fold")
        return "node", node

    def _plan(self, roots):
        """Nodes needed for ``roots`` in dependency order, or NotConstant naming the first runtime
        dependency met.  Iterative depth-first search: deep chains cannot exhaust the Python stack, and
        a cycle (possible only in a malformed graph) is refused."""
        order, state = [], {}
        for root in roots:
            kind, node = self._resolve(root)
            if kind == "leaf" or state.get(id(node)) == "done":
                continue
            state[id(node)] = "active"
            stack = [(node, iter([d for d in node.input if d]))]
            while stack:
                parent, deps = stack[-1]
                for dep in deps:
                    kind, child = self._resolve(dep)
                    if kind == "leaf" or state.get(id(child)) == "done":
                        continue
                    if state.get(id(child)) == "active":
                        raise ValueError(f"value {dep!r} depends on itself (the graph has a cycle)")
                    state[id(child)] = "active"
                    stack.append((child, iter([d for d in child.input if d])))
                    break
                else:
                    stack.pop()
                    state[id(parent)] = "done"
                    order.append(parent)
        return order

    def fold(self, names):
        """{name: array} for every name in ``names`` (empty strings skipped).

        Raises NotConstant when one depends on a runtime value, ValueError for malformed constants or
        for a memory cap overrun.  The returned arrays stay charged to the budget; release them with
        :meth:`release`.  Intermediates are dropped (and released) as soon as their last consumer ran.
        """
        roots = list(dict.fromkeys(n for n in names if n))
        nodes = self._plan(roots)
        pending = {}  # remaining consumers of each value, the caller counting as one for the roots
        for node in nodes:
            for dep in node.input:
                if dep:
                    pending[dep] = pending.get(dep, 0) + 1
        for root in roots:
            pending[root] = pending.get(root, 0) + 1
        values = {}

        def fetch(name):
            if name not in values:  # only initializers are fetched before being computed
                values[name] = decode_tensor(self.initializers[name], budget=self.budget,
                                             base_dir=self.base_dir, what=f"initializer {name!r}")
            return values[name]

        try:
            for node in nodes:
                args = [fetch(dep) if dep else None for dep in node.input]
                outputs = self._run(node, args)
                if len(outputs) != len([o for o in node.output]):
                    raise ValueError(f"{_node_label(node)}: expected {len(node.output)} outputs, "
                                     f"computed {len(outputs)}")
                del args
                for out, value in zip(node.output, outputs):
                    if out and pending.get(out, 0) > 0:
                        values[out] = value
                    else:  # an output nobody in the plan asked for
                        self.budget.release(value.nbytes)
                for dep in node.input:
                    if dep:
                        pending[dep] -= 1
                        if pending[dep] == 0:
                            self.budget.release(values.pop(dep).nbytes)
            result = {root: fetch(root) for root in roots}
        except BaseException:
            for value in values.values():
                self.budget.release(value.nbytes)
            raise
        return result

    def release(self, arrays):
        for array in arrays:
            if array is not None:
                self.budget.release(array.nbytes)

    # ---- operators ------------------------------------------------------------------------------

    def _new(self, shape, dtype, node):
        """Charge the budget for an output of ``shape`` before it is computed."""
        shape = tuple(int(d) for d in shape)
        self.budget.charge(math.prod(shape) * np.dtype(dtype).itemsize, _node_label(node))
        return shape

    def _run(self, node, args):
        what = _node_label(node)
        attrs = attributes(node, what)
        op = node.op_type
        handler = getattr(self, f"_op_{op}")
        try:
            with np.errstate(all="ignore"):
                outputs = handler(node, attrs, args, what)
        except NotConstant:
            raise
        except ValueError as exc:
            if str(exc).startswith(what):
                raise
            raise ValueError(f"{what}: {exc}") from exc
        except (IndexError, TypeError, OverflowError) as exc:
            raise ValueError(f"{what}: cannot fold ({type(exc).__name__}: {exc})") from exc
        return outputs

    def _charged_copy(self, array, node):
        self._new(array.shape, array.dtype, node)
        return np.array(array, copy=True, order="C")

    @staticmethod
    def _need(args, required, what, most=None):
        """``required`` inputs present, at most ``most`` (default: exactly ``required``) in all."""
        most = required if most is None else most
        if not required <= len(args) <= most:
            raise ValueError(f"expected {required if most == required else f'{required} to {most}'} inputs, "
                             f"got {len(args)}")
        for i in range(required):
            if args[i] is None:
                raise ValueError(f"input {i} is required")

    @staticmethod
    def _int_list(array, what, label):
        array = np.asarray(array)
        if array.dtype.kind not in "iu" or array.ndim > 1:
            raise ValueError(f"{what}: {label} must be a 1-D integer tensor, got {array.dtype} {array.shape}")
        return [int(v) for v in array.reshape(-1)]

    @staticmethod
    def _axis(axis, rank, what):
        if not -rank <= axis < rank:
            raise ValueError(f"{what}: axis {axis} out of range for rank {rank}")
        return axis + rank if axis < 0 else axis

    def _op_Constant(self, node, attrs, args, what):
        if args:
            raise ValueError("Constant takes no inputs")
        if len(attrs) != 1:
            raise ValueError(f"expected exactly one value attribute, got {sorted(attrs)}")
        (name, attr), = attrs.items()
        if name == "value":
            tensor = attr_value(attrs, "value", "tensor", what)
            return [decode_tensor(tensor, budget=self.budget, base_dir=self.base_dir, what=what)]
        if name in ("value_float", "value_floats", "value_int", "value_ints"):
            kind = name[len("value_"):]
            value = attr_value(attrs, name, kind, what)
            dtype = np.float32 if kind.startswith("float") else np.int64
            array = np.asarray(value, dtype=dtype)
            return [self._charged_copy(array, node)]
        raise ValueError(f"Constant attribute {name!r} is not supported (only numeric tensors)")

    def _op_Identity(self, node, attrs, args, what):
        self._need(args, 1, what)
        return [self._charged_copy(args[0], node)]

    def _cast_to(self, array, code, node):
        if code not in _ELEMENT_TYPES:
            raise ValueError(f"cast to {element_type_name(code)} is not supported")
        dtype = np.dtype(_ELEMENT_TYPES[code][1])
        self._new(array.shape, dtype, node)
        if code == 16:  # bfloat16: round to nearest even on the top 16 bits, kept widened in float32
            bits = np.asarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32) << 16
            nan = np.isnan(np.asarray(array, dtype=np.float32))
            result = rounded.astype(np.uint32).view(np.float32)
            result[nan] = np.nan
            return result
        if code == 9:
            return np.asarray(array != 0, dtype=np.bool_)
        return np.asarray(array).astype(dtype)

    def _op_Cast(self, node, attrs, args, what):
        self._need(args, 1, what)
        attr = attrs.get("to")
        if attr is None:
            raise ValueError("attribute 'to' is required")
        if attr.type == 3:  # Cast-1 .. Cast-5 name the type as a string
            name = attr_value(attrs, "to", "string", what)
            if name.upper() not in _STRING_CAST_NAMES:
                raise ValueError(f"cast to {name!r} is not supported")
            code = _STRING_CAST_NAMES[name.upper()]
        else:
            code = attr_value(attrs, "to", "int", what)
        return [self._cast_to(args[0], code, node)]

    def _op_CastLike(self, node, attrs, args, what):
        self._need(args, 2, what)
        target = np.asarray(args[1]).dtype
        if target not in _NUMPY_TO_ONNX:
            raise ValueError(f"cast to {target} is not supported")
        return [self._cast_to(args[0], _NUMPY_TO_ONNX[target], node)]

    def _op_Slice(self, node, attrs, args, what):
        data = args[0] if args else None
        if data is None:
            raise ValueError("input 'data' is required")
        if self.opset < 10:
            if len(args) != 1:
                raise ValueError(f"Slice-1 takes one input, got {len(args)}")
            starts = attr_value(attrs, "starts", "ints", what)
            ends = attr_value(attrs, "ends", "ints", what)
            axes = attr_value(attrs, "axes", "ints", what)
            steps = None
            if starts is None or ends is None:
                raise ValueError("attributes 'starts' and 'ends' are required before opset 10")
        else:
            self._need(args, 3, what, most=5)
            starts = self._int_list(args[1], what, "starts")
            ends = self._int_list(args[2], what, "ends")
            axes = self._int_list(args[3], what, "axes") if len(args) > 3 and args[3] is not None else None
            steps = self._int_list(args[4], what, "steps") if len(args) > 4 and args[4] is not None else None
        rank = data.ndim
        if axes is None:
            axes = list(range(len(starts)))
        if steps is None:
            steps = [1] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise ValueError(f"starts, ends, axes and steps differ in length ({len(starts)}, {len(ends)}, "
                             f"{len(axes)}, {len(steps)})")
        index = [slice(None)] * rank
        seen = set()
        for start, end, axis, step in zip(starts, ends, axes, steps):
            axis = self._axis(axis, rank, what)
            if axis in seen:
                raise ValueError(f"axis {axis} sliced twice")
            seen.add(axis)
            if step == 0:
                raise ValueError("step 0")
            dim = data.shape[axis]
            start = start + dim if start < 0 else start
            end = end + dim if end < 0 else end
            if step > 0:
                start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            else:
                start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            index[axis] = slice(start, end if end >= 0 else None, step)
        view = data[tuple(index)]
        return [self._charged_copy(view, node)]

    def _op_Concat(self, node, attrs, args, what):
        if not args or any(a is None for a in args):
            raise ValueError("every input is required")
        default = 1 if self.opset < 4 else None
        axis = attr_value(attrs, "axis", "int", what, default)
        if axis is None:
            raise ValueError("attribute 'axis' is required")
        rank = args[0].ndim
        if any(a.ndim != rank for a in args):
            raise ValueError(f"inputs of different ranks {[a.shape for a in args]}")
        if rank == 0:
            raise ValueError("cannot concatenate scalars")
        axis = self._axis(axis, rank, what)
        for a in args:
            if a.shape[:axis] + a.shape[axis + 1:] != args[0].shape[:axis] + args[0].shape[axis + 1:]:
                raise ValueError(f"input shapes {[a.shape for a in args]} differ off axis {axis}")
        if len({a.dtype for a in args}) > 1:
            raise ValueError(f"inputs of different element types {[str(a.dtype) for a in args]}")
        shape = list(args[0].shape)
        shape[axis] = sum(a.shape[axis] for a in args)
        self._new(shape, args[0].dtype, node)
        return [np.concatenate(args, axis=axis)]

    def _axes_arg(self, attrs, args, what, since_input=13):
        if self.opset < since_input:
            if len(args) != 1:
                raise ValueError(f"takes one input before opset {since_input}, got {len(args)}")
            return attr_value(attrs, "axes", "ints", what)
        if len(args) > 2:
            raise ValueError(f"expected at most 2 inputs, got {len(args)}")
        if len(args) == 2 and args[1] is not None:
            return self._int_list(args[1], what, "axes")
        return None

    def _op_Unsqueeze(self, node, attrs, args, what):
        data = args[0] if args else None
        if data is None:
            raise ValueError("input 'data' is required")
        axes = self._axes_arg(attrs, args, what)
        if not axes:
            raise ValueError("axes are required")
        rank = data.ndim + len(axes)
        normalized = [self._axis(a, rank, what) for a in axes]
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"repeated axes {axes}")
        return [self._charged_copy(np.expand_dims(data, tuple(normalized)), node)]

    def _op_Squeeze(self, node, attrs, args, what):
        data = args[0] if args else None
        if data is None:
            raise ValueError("input 'data' is required")
        axes = self._axes_arg(attrs, args, what)
        if axes is None or len(axes) == 0:
            normalized = tuple(i for i, d in enumerate(data.shape) if d == 1)
        else:
            normalized = tuple(self._axis(a, data.ndim, what) for a in axes)
            if len(set(normalized)) != len(normalized):
                raise ValueError(f"repeated axes {axes}")
            for axis in normalized:
                if data.shape[axis] != 1:
                    raise ValueError(f"cannot squeeze axis {axis} of size {data.shape[axis]}")
        return [self._charged_copy(np.squeeze(data, axis=normalized), node)]

    def _op_Transpose(self, node, attrs, args, what):
        self._need(args, 1, what)
        data = args[0]
        perm = attr_value(attrs, "perm", "ints", what)
        if perm is None:
            perm = list(range(data.ndim))[::-1]
        if sorted(perm) != list(range(data.ndim)):
            raise ValueError(f"perm {perm} is not a permutation of the {data.ndim} axes")
        return [self._charged_copy(np.transpose(data, perm), node)]

    def _op_Reshape(self, node, attrs, args, what):
        if self.opset < 5:
            self._need(args, 1, what)
            shape = attr_value(attrs, "shape", "ints", what)
            if shape is None:
                raise ValueError("attribute 'shape' is required before opset 5")
        else:
            self._need(args, 2, what)
            shape = self._int_list(args[1], what, "shape")
        data = args[0]
        allow_zero = attr_value(attrs, "allowzero", "int", what, 0) if self.opset >= 14 else 0
        target = []
        for i, d in enumerate(shape):
            if d == 0 and not allow_zero:
                if i >= data.ndim:
                    raise ValueError(f"shape {shape}: 0 at position {i} copies a dimension the input lacks")
                target.append(data.shape[i])
            elif d < -1:
                raise ValueError(f"invalid shape entry {d}")
            else:
                target.append(d)
        if target.count(-1) > 1:
            raise ValueError(f"shape {shape} has more than one -1")
        if -1 in target:
            known = math.prod(d for d in target if d != -1)
            if known == 0 or data.size % known:
                raise ValueError(f"cannot reshape {data.shape} to {shape}")
            target[target.index(-1)] = data.size // known
        if math.prod(target) != data.size:
            raise ValueError(f"cannot reshape {data.shape} ({data.size} elements) to {shape}")
        return [self._charged_copy(data.reshape(target), node)]

    def _op_Gather(self, node, attrs, args, what):
        self._need(args, 2, what)
        data, indices = args
        if np.asarray(indices).dtype.kind not in "iu":
            raise ValueError(f"indices must be integers, got {indices.dtype}")
        if data.ndim == 0:
            raise ValueError("cannot gather from a scalar")
        axis = self._axis(attr_value(attrs, "axis", "int", what, 0), data.ndim, what)
        dim = data.shape[axis]
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -dim or idx.max() >= dim):
            raise ValueError(f"indices out of range [{-dim}, {dim - 1}] on axis {axis}")
        idx = np.where(idx < 0, idx + dim, idx)
        shape = data.shape[:axis] + idx.shape + data.shape[axis + 1:]
        self._new(shape, data.dtype, node)
        return [np.take(data, idx, axis=axis)]

    def _op_Expand(self, node, attrs, args, what):
        self._need(args, 2, what)
        data = args[0]
        shape = self._int_list(args[1], what, "shape")
        try:
            out_shape = np.broadcast_shapes(data.shape, tuple(shape))
        except ValueError as exc:
            raise ValueError(f"shape {shape} does not broadcast with {data.shape}") from exc
        self._new(out_shape, data.dtype, node)
        return [np.array(np.broadcast_to(data, out_shape), copy=True)]

    def _op_ConstantOfShape(self, node, attrs, args, what):
        self._need(args, 1, what)
        shape = self._int_list(args[0], what, "shape")
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in {shape}")
        value = attr_value(attrs, "value", "tensor", what)
        if value is None:
            fill = np.zeros((), dtype=np.float32)
        else:
            fill = decode_tensor(value, budget=self.budget, base_dir=self.base_dir, what=what)
            self.budget.release(fill.nbytes)
            if fill.size != 1:
                raise ValueError("attribute 'value' must hold one element")
        self._new(shape, fill.dtype, node)
        return [np.full(shape, fill.reshape(()), dtype=fill.dtype)]

    def _op_Shape(self, node, attrs, args, what):
        self._need(args, 1, what)
        dims = list(args[0].shape)
        rank = len(dims)
        start = attr_value(attrs, "start", "int", what, 0) if self.opset >= 15 else 0
        end = attr_value(attrs, "end", "int", what, rank) if self.opset >= 15 else rank
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        array = np.asarray(dims[start:end], dtype=np.int64)
        return [self._charged_copy(array, node)]

    def _op_Split(self, node, attrs, args, what):
        data = args[0] if args else None
        if data is None:
            raise ValueError("input 'input' is required")
        if data.ndim == 0:
            raise ValueError("cannot split a scalar")
        axis = self._axis(attr_value(attrs, "axis", "int", what, 0), data.ndim, what)
        outputs = len(node.output)
        split = None
        if self.opset >= 13 or (self.opset < 2 and len(args) > 1):
            if len(args) > 2:
                raise ValueError(f"expected at most 2 inputs, got {len(args)}")
            if len(args) == 2 and args[1] is not None:
                split = self._int_list(args[1], what, "split")
        elif len(args) != 1:
            raise ValueError(f"expected one input, got {len(args)}")
        if split is None and self.opset < 13:
            split = attr_value(attrs, "split", "ints", what)
        dim = data.shape[axis]
        if split is None:
            parts = attr_value(attrs, "num_outputs", "int", what) if self.opset >= 18 else None
            parts = parts or outputs
            if parts <= 0:
                raise ValueError("no outputs")
            if self.opset >= 18 and attrs.get("num_outputs") is not None:
                size = -(-dim // parts)
                split = [min(size, max(dim - size * i, 0)) for i in range(parts)]
            else:
                if dim % parts:
                    raise ValueError(f"axis of size {dim} does not split evenly into {parts}")
                split = [dim // parts] * parts
        if any(s < 0 for s in split) or sum(split) != dim or len(split) != outputs:
            raise ValueError(f"split {split} does not cover axis {axis} of size {dim} with {outputs} outputs")
        self._new(data.shape, data.dtype, node)
        bounds = np.cumsum([0] + split)
        return [np.array(np.take(data, np.arange(a, b), axis=axis), copy=True)
                for a, b in zip(bounds[:-1], bounds[1:])]
