"""PyTorch -> gru_fast converters.

PyTorch stacks the three gates of ``nn.GRU`` / ``nn.GRUCell`` in the order (r, z, n); gru_fast uses the
ONNX layout and gate order (z, r, h).  PyTorch always computes the candidate in the "linear before reset"
form, so every converted model has ``linear_before_reset=True``.

Inference only: ``nn.GRU``'s ``dropout`` is applied between layers during training and never at
inference, so it is ignored here.

``accelerate(model)`` goes the other way: it leaves a torch model in torch and runs each of its nn.GRU /
nn.GRUCell modules with a converted gru_fast model.

torch is imported only inside the functions that need it (``convert``, ``accelerate``, and ``load`` for
.pt files); the core of the conversion works on plain numpy arrays, so ``from_state_dict`` accepts numpy
state dicts and ``load`` reads .npz state dicts without torch.
"""

from __future__ import annotations

import os
import re

import numpy as np

from gru_fast._files import (DEFAULT_MAX_BYTES, ZIP_ERRORS, check_build, check_file_size, check_max_bytes,
                             check_zip_sizes, model_file, open_regular_file)

__all__ = ["accelerate", "convert", "from_state_dict", "load", "DEFAULT_MAX_BYTES"]

# weight_ih_l0, bias_hh_l3_reverse, ... (nn.GRU) and weight_ih, bias_hh (nn.GRUCell)
_GRU_KEY = re.compile(r"^(?P<prefix>.*?)(?P<kind>weight|bias)_(?P<mat>ih|hh)_l(?P<layer>\d+)(?P<rev>_reverse)?$")
_CELL_KEY = re.compile(r"^(?P<prefix>.*?)(?P<kind>weight|bias)_(?P<mat>ih|hh)$")


# --------------------------------------------------------------------------------------------------
# numpy core
# --------------------------------------------------------------------------------------------------

def _to_numpy(value, name):
    """A tensor or array-like -> numpy array (float32 or float64), never sharing memory with torch."""
    if hasattr(value, "detach") and hasattr(value, "dtype") and not isinstance(value, np.ndarray):
        tensor = value.detach().cpu()
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
        if str(tensor.dtype) != "torch.float64":
            tensor = tensor.float()  # numpy has no bfloat16; float16/bfloat16 are exact in float32
        return np.array(tensor.numpy(), copy=True)
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {array.dtype}")
    if array.dtype != np.float64:
        array = array.astype(np.float32)
    return array


def _rzn_to_zrh(matrix, hidden_size):
    """Reorder PyTorch's stacked (r, z, n) rows into ONNX's (z, r, h)."""
    h = hidden_size
    return np.concatenate([matrix[h:2 * h], matrix[:h], matrix[2 * h:3 * h]], axis=0)


def _build(params, *, num_layers, num_directions, has_bias, batch_first, provenance):
    """Build a gru_fast.GRU from ``params[(layer, direction)] = (w_ih, w_hh, b_ih, b_hh, names)`` (numpy,
    PyTorch layout; ``names`` maps "weight_ih" etc. to the state-dict key, for error messages).  Validates
    every shape with a message naming the offending parameter, then reorders the gates."""
    import gru_fast

    w_hh0 = params[(0, 0)][1]
    if w_hh0.ndim != 2 or w_hh0.shape[0] % 3 or w_hh0.shape[0] != 3 * w_hh0.shape[1]:
        raise ValueError(f"{params[(0, 0)][4]['weight_hh']}: expected shape (3*H, H), got {w_hh0.shape}")
    hidden_size = w_hh0.shape[1]
    if hidden_size == 0:
        raise ValueError("hidden size is 0")
    w_ih0 = params[(0, 0)][0]
    if w_ih0.ndim != 2:
        raise ValueError(f"{params[(0, 0)][4]['weight_ih']}: expected a 2-D (3*H, I) matrix, got {w_ih0.shape}")
    input_size = w_ih0.shape[1]

    dtype = np.float64 if all(
        a.dtype == np.float64 for p in params.values() for a in p[:4] if a is not None) else np.float32
    layers = []
    for layer in range(num_layers):
        expected_in = input_size if layer == 0 else num_directions * hidden_size
        ws, rs, bs = [], [], []
        for direction in range(num_directions):
            w_ih, w_hh, b_ih, b_hh, names = params[(layer, direction)]
            three_h = 3 * hidden_size
            if w_ih.shape != (three_h, expected_in):
                raise ValueError(f"{names['weight_ih']}: expected shape ({three_h}, {expected_in}) "
                                 f"(3*H, {'input_size' if layer == 0 else 'D*H'}), got {w_ih.shape}")
            if w_hh.shape != (three_h, hidden_size):
                raise ValueError(f"{names['weight_hh']}: expected shape ({three_h}, {hidden_size}) (3*H, H), "
                                 f"got {w_hh.shape}")
            ws.append(_rzn_to_zrh(w_ih.astype(dtype), hidden_size))
            rs.append(_rzn_to_zrh(w_hh.astype(dtype), hidden_size))
            if has_bias:
                for key, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
                    if b.shape != (three_h,):
                        raise ValueError(f"{names[key]}: expected shape ({three_h},) (3*H,), got {b.shape}")
                bs.append(np.concatenate([_rzn_to_zrh(b_ih.astype(dtype), hidden_size),
                                          _rzn_to_zrh(b_hh.astype(dtype), hidden_size)]))
        W = np.ascontiguousarray(np.stack(ws))
        R = np.ascontiguousarray(np.stack(rs))
        B = np.ascontiguousarray(np.stack(bs)) if has_bias else None
        layers.append((W, R, B))

    return gru_fast.GRU(
        layers,
        direction="bidirectional" if num_directions == 2 else "forward",
        linear_before_reset=True,
        batch_first=bool(batch_first),
        dtype="float64" if dtype == np.float64 else "float32",
        provenance=provenance,
    )


def _split_prefixes(keys):
    """Group GRU parameter keys by module prefix.

    Returns ``{prefix: {"gru": {(kind, mat, layer, direction): key}, "cell": {(kind, mat): key}}}`` for every
    prefix that holds at least one recurrent weight matrix (``weight_hh...``)."""
    groups = {}
    for key in keys:
        if not isinstance(key, str):
            continue
        m = _GRU_KEY.match(key)
        if m:
            g = groups.setdefault(m["prefix"], {"gru": {}, "cell": {}})
            g["gru"][(m["kind"], m["mat"], int(m["layer"]), 1 if m["rev"] else 0)] = key
            continue
        m = _CELL_KEY.match(key)
        if m:
            g = groups.setdefault(m["prefix"], {"gru": {}, "cell": {}})
            g["cell"][(m["kind"], m["mat"])] = key
    # a group is a candidate if it has at least one recurrent weight matrix
    return {p: g for p, g in groups.items()
            if any(k[:2] == ("weight", "hh") for k in g["gru"]) or ("weight", "hh") in g["cell"]}


def _pick_prefix(groups, prefix, where="the state dict", seen=None):
    """The key prefix of the one GRU ``prefix`` names among ``groups`` (from :func:`_split_prefixes`).

    ``prefix`` None: the only GRU there is.  Otherwise the GRU whose prefix is ``prefix`` (with or without
    its trailing dot) or ends with ``"." + prefix``, so ``"encoder.gru."`` finds ``"model.encoder.gru."``
    inside a checkpoint's ``"model"`` entry.  ``seen`` describes what was searched, for the message when no
    GRU is found."""
    if prefix is None:
        if not groups:
            raise ValueError(f"no GRU parameters found in {where}: expected keys such as 'weight_ih_l0', "
                             "'weight_hh_l0' (nn.GRU) or 'weight_ih', 'weight_hh' (nn.GRUCell), with or without a "
                             f"module prefix{seen or ''}")
        if len(groups) > 1:
            listing = ", ".join(repr(p) for p in sorted(groups))
            raise ValueError(f"{where} holds {len(groups)} GRUs; pick one with prefix= (--prefix): {listing}")
        return next(iter(groups))
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    wanted = prefix if not prefix or prefix.endswith(".") else prefix + "."
    for exact in (prefix, wanted):
        if exact in groups:
            return exact
    matches = sorted(p for p in groups if wanted and p.endswith("." + wanted))
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(repr(p) for p in sorted(groups)) or "none"
    if matches:
        raise ValueError(f"prefix {prefix!r} matches {len(matches)} GRUs in {where}; give the full prefix: "
                         f"{', '.join(repr(p) for p in matches)}")
    raise ValueError(f"prefix {prefix!r} names no GRU in {where}; candidates: {listing}")


def _params_from_state_dict(state_dict, prefix, where="the state dict", seen=None):
    """-> (prefix, params, num_layers, num_directions, has_bias) for the GRU under ``prefix``, where
    ``params[(layer, direction)] = (w_ih, w_hh, b_ih, b_hh, names)`` holds numpy arrays in PyTorch layout."""
    groups = _split_prefixes(state_dict.keys())
    prefix = _pick_prefix(groups, prefix, where, seen)
    group = groups[prefix]
    if group["gru"] and group["cell"]:
        raise ValueError(f"prefix {prefix!r} mixes nn.GRU keys (weight_ih_l0, ...) and nn.GRUCell keys "
                         "(weight_ih, ...)")

    def fetch(key):
        return _to_numpy(state_dict[key], key)

    if group["cell"]:
        entries = group["cell"]
        for req in (("weight", "ih"), ("weight", "hh")):
            if req not in entries:
                raise ValueError(f"missing {prefix}{req[0]}_{req[1]}")
        has_bias = ("bias", "ih") in entries or ("bias", "hh") in entries
        if has_bias and not (("bias", "ih") in entries and ("bias", "hh") in entries):
            raise ValueError(f"{prefix}: bias_ih and bias_hh must both be present or both absent")
        names = {f"{k}_{m}": prefix + f"{k}_{m}" for k in ("weight", "bias") for m in ("ih", "hh")}
        params = {(0, 0): (fetch(entries[("weight", "ih")]), fetch(entries[("weight", "hh")]),
                           fetch(entries[("bias", "ih")]) if has_bias else None,
                           fetch(entries[("bias", "hh")]) if has_bias else None, names)}
        return prefix, params, 1, 1, has_bias

    entries = group["gru"]
    layers = sorted({k[2] for k in entries})
    if layers != list(range(len(layers))):
        raise ValueError(f"{prefix or 'state dict'}: layer numbering must be contiguous from l0, "
                         f"got layers {layers}")
    num_layers = len(layers)
    num_directions = 2 if any(k[3] == 1 for k in entries) else 1
    has_bias = any(k[0] == "bias" for k in entries)
    params = {}
    for layer in range(num_layers):
        for direction in range(num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            names = {f"{k}_{m}": f"{prefix}{k}_{m}{suffix}" for k in ("weight", "bias") for m in ("ih", "hh")}
            needed = [("weight", "ih"), ("weight", "hh")] + ([("bias", "ih"), ("bias", "hh")] if has_bias else [])
            for kind, mat in needed:
                if (kind, mat, layer, direction) not in entries:
                    raise ValueError(f"missing {names[f'{kind}_{mat}']} (expected for a "
                                     f"{num_layers}-layer {'bidirectional ' if num_directions == 2 else ''}GRU"
                                     f"{' with bias' if has_bias else ''})")
            params[(layer, direction)] = (
                fetch(entries[("weight", "ih", layer, direction)]),
                fetch(entries[("weight", "hh", layer, direction)]),
                fetch(entries[("bias", "ih", layer, direction)]) if has_bias else None,
                fetch(entries[("bias", "hh", layer, direction)]) if has_bias else None,
                names,
            )
    return prefix, params, num_layers, num_directions, has_bias


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------

_LAYOUTS = {False: "time-major (T, B, I)", True: "batch-major (B, T, I)"}


def _layout(batch_first, origin):
    """The provenance entries that say which input layout a converted model takes and why."""
    if batch_first is None:
        return {"layout": f"{_LAYOUTS[False]}, assumed: the weights do not record batch_first; pass "
                          "batch_first=True (gru-fast: --batch-first) if the module was built with "
                          "batch_first=True", "layout_assumed": True}
    return {"layout": f"{_LAYOUTS[bool(batch_first)]}, {origin}", "layout_assumed": False}


def from_state_dict(state_dict, *, batch_first=None, prefix=None, _source="state_dict", _layout_origin=None):
    """Build a gru_fast.GRU from an nn.GRU / nn.GRUCell state dict.

    Parameters
    ----------
    state_dict : mapping
        Keys ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` (plus ``_reverse``
        variants for a bidirectional GRU), or ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` for a
        GRUCell, optionally behind a module prefix such as ``"encoder.gru."``.  Values may be torch tensors
        or numpy arrays.  Layers, directions, sizes and bias are inferred from the keys and shapes.
    batch_first : bool, optional
        The state dict does not record it; pass the module's setting.  When omitted the model is
        time-major, (T, B, I), and its ``provenance["layout"]`` says that this was assumed
        (``provenance["layout_assumed"]`` is True).
    prefix : str, optional
        Picks one GRU out of a larger model's state dict (``"encoder.gru."`` or ``"encoder.gru"``; a unique
        ending such as ``"gru."`` also finds ``"model.gru."``).  When the dict holds several GRUs and no
        prefix is given, ValueError lists the candidates.
    """
    if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if batch_first is not None and not isinstance(batch_first, (bool, np.bool_)):
        raise TypeError(f"batch_first must be True, False or None, got {batch_first!r}")
    prefix, params, num_layers, num_directions, has_bias = _params_from_state_dict(state_dict, prefix)
    provenance = {"framework": "torch", "source": _source, "prefix": prefix or None}
    provenance.update(_layout(batch_first, _layout_origin or f"as given (batch_first={bool(batch_first)})"))
    return _build(params, num_layers=num_layers, num_directions=num_directions, has_bias=has_bias,
                  batch_first=bool(batch_first), provenance=provenance)


def convert(module):
    """Convert a ``torch.nn.GRU`` or ``torch.nn.GRUCell`` to a gru_fast.GRU.

    - nn.GRU: any ``num_layers``, ``bidirectional``, ``batch_first``, ``bias``.  ``dropout`` is a
      training-time regularizer between layers and is ignored (inference never applies it).
    - nn.GRUCell: a one-layer forward model; ``model.stream(batch_size=B, h0=h[None]).step(x)`` equals
      ``cell(x, h)``, and ``model(x_seq)`` runs the cell over a sequence.

    Refused: ``proj_size`` != 0 (ValueError), other recurrent modules such as nn.LSTM / nn.RNN (ValueError),
    anything else, including quantized GRUs (TypeError), and parameters that disagree with the module's
    input_size / hidden_size / num_layers / bidirectional (ValueError).  Parametrized weights (e.g.
    ``weight_norm``) are read as the effective weights.  The module is only read; its weights are copied.
    """
    import torch

    if isinstance(module, torch.nn.GRUCell):
        return from_state_dict(_module_parameters(module, ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
                               batch_first=False, _source="module", _layout_origin="nn.GRUCell (one step at a time)")
    if not isinstance(module, torch.nn.GRU):
        if isinstance(module, torch.nn.RNNBase):
            raise ValueError(f"convert() handles nn.GRU and nn.GRUCell only, got {type(module).__name__} "
                             f"(mode {getattr(module, 'mode', '?')})")
        raise TypeError(f"convert() expects a torch.nn.GRU or torch.nn.GRUCell, got {type(module).__name__}")
    if getattr(module, "mode", "GRU") != "GRU":
        raise ValueError(f"unsupported RNN mode {module.mode!r}")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"nn.GRU with proj_size={module.proj_size} is not supported")
    model = from_state_dict(_module_parameters(module, module._flat_weights_names),
                            batch_first=module.batch_first, _source="module",
                            _layout_origin=f"from the module (batch_first={module.batch_first})")
    expected = (module.input_size, module.hidden_size, module.num_layers, 2 if module.bidirectional else 1)
    got = (model.input_size, model.hidden_size, model.num_layers, model.num_directions)
    if expected != got:  # e.g. a module whose parameters were swapped for something odd
        raise ValueError(f"module attributes (input_size, hidden_size, num_layers, D)={expected} disagree "
                         f"with its parameters {got}")
    return model


def _module_parameters(module, names):
    """The module's effective weights by name.  Reading the attributes (rather than state_dict()) gives the
    weights a parametrization or weight_norm computes, not its raw factors."""
    params = {}
    for name in names:
        value = getattr(module, name, None)
        if value is not None:
            params[name] = value
    return params


@model_file("torch")
def load(path, prefix=None, *, batch_first=None, max_bytes=DEFAULT_MAX_BYTES):
    """Load a GRU from a PyTorch checkpoint (.pt / .pth) or a numpy .npz state dict, executing no pickled code.

    A checkpoint is read with ``torch.load(path, weights_only=True, map_location="cpu")`` only: one whose
    pickle would need arbitrary classes or callables (a whole pickled module, a malicious payload) is
    refused with ValueError, never run.  A ``.npz`` file (``np.savez(path, **state_dict)``) is read with
    ``np.load(allow_pickle=False)``, so object arrays are refused.  Paths that are not regular files
    (directories, FIFOs, devices) are refused before anything is opened.

    Where the GRU is: anywhere in the checkpoint's nested dicts (and lists), as checkpoints are saved --
    a bare ``model.state_dict()``, ``{"model": sd, "epoch": 3}``, ``{"state_dict": sd}`` (PyTorch
    Lightning, keys like ``"model.gru.weight_ih_l0"``), ``{"model_state_dict": sd}``, ``{"net": sd}``,
    DataParallel's ``"module."`` keys, or deeper.  Each GRU is named by its full dotted path, e.g.
    ``"state_dict.model.gru."``.  Without ``prefix`` the file must hold exactly one GRU; with several,
    ValueError lists every one by that path, and with none it lists the file's top-level keys.
    ``prefix`` is that full path or a unique ending of it (``"gru."``, ``"encoder.gru"``).

    Layout: ``batch_first`` given (True/False) is used.  Otherwise it is taken from the checkpoint when
    one of its dicts records a boolean ``"batch_first"`` (a saved config, Lightning's
    ``"hyper_parameters"``) and every such entry agrees; else the model is time-major, (T, B, I).
    ``provenance["layout"]`` says which, and ``provenance["layout_assumed"]`` is True when it was guessed.

    ``max_bytes`` (default 2 GiB) caps the file and the arrays it declares: a file larger than the cap is
    refused unread, and in an .npz or a zip-format checkpoint every member's declared size is checked
    against the cap and against the bytes really in the file before anything is read, so a header
    cannot make the loader allocate what it claims.  Then the tensors' own sizes (elements x element
    size, what converting them allocates) are summed and checked against the cap before any is copied:
    a tensor can be a broadcast view (stride 0) of a far smaller storage.
    """
    max_bytes = check_max_bytes(max_bytes)
    if batch_first is not None and not isinstance(batch_first, (bool, np.bool_)):
        raise TypeError(f"batch_first must be True, False or None, got {batch_first!r}")
    path = os.fspath(path)
    with open_regular_file(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        check_file_size(path, size, max_bytes)
        if path.lower().endswith(".npz"):
            check_zip_sizes(stream, path, size, max_bytes, npy_headers=True)
            obj = _load_npz(stream, path)
        else:
            _refuse_legacy_checkpoint(stream, path)
            check_zip_sizes(stream, path, size, max_bytes, npy_headers=False)
            obj = _load_checkpoint(stream, path)
    tensors, flags = _flatten_checkpoint(obj, path, max_bytes)
    top = list(obj.keys())[:20] if isinstance(obj, dict) else []
    seen = ("; its top-level keys are: " + ", ".join(repr(k) for k in top) + (", ..." if len(obj) > 20 else "")
            if top else "; it holds no dict")
    groups = _split_prefixes(tensors.keys())
    found = _pick_prefix(groups, prefix, "the checkpoint", seen)  # model_file puts the path in front
    _charge_build(tensors, groups[found], found, max_bytes)
    origin = None
    if batch_first is None:
        batch_first, origin = _recorded_batch_first(flags)
    else:
        origin = f"as given (batch_first={bool(batch_first)})"
    return from_state_dict(tensors, batch_first=batch_first, prefix=found, _source=os.path.basename(path),
                           _layout_origin=origin)


_MAX_DEPTH = 64  # nesting deeper than any checkpoint writer produces; a hostile pickle can nest far deeper


def _flatten_checkpoint(obj, path, max_bytes):
    """Walk a loaded checkpoint's dicts, lists and tuples without recursion and without copying a tensor.

    Returns ``({dotted path: tensor or array}, {dotted path: bool})``: every tensor / array by its full
    path (``"state_dict.model.gru.weight_ih_l0"``), and every boolean entry called ``batch_first``.  The
    tensors' sizes (elements x element size) are summed as they are met and ValueError is raised, naming
    the size and the cap, as soon as the total exceeds ``max_bytes``: nothing has been copied yet.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r}: expected a state dict (a dict of tensors, possibly inside other dicts), "
                         f"got {type(obj).__name__}")
    tensors, flags, total = {}, {}, 0
    visited = set()
    stack = [("", obj, 0)]
    while stack:
        where, node, depth = stack.pop()
        if id(node) in visited:  # a pickle can make a dict contain itself
            continue
        visited.add(id(node))
        if depth > _MAX_DEPTH:
            raise ValueError(f"{path!r}: nested more than {_MAX_DEPTH} levels deep at {where[:200]!r}")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            name = f"{where}{key}"
            if isinstance(value, (dict, list, tuple)):
                stack.append((name + ".", value, depth + 1))
                continue
            if isinstance(key, str) and key == "batch_first" and isinstance(value, bool):
                flags[name] = value
                continue
            nbytes = _logical_nbytes(value)
            if nbytes is None:
                continue
            total += nbytes
            if total > max_bytes:
                raise ValueError(f"{path!r}: the tensors hold {total} bytes or more once materialised "
                                 f"({name!r} alone is {nbytes} bytes, shape {tuple(value.shape)}), over the "
                                 f"memory cap max_bytes={max_bytes}")
            tensors[name] = value
    return tensors, flags


def _charge_build(tensors, group, prefix, max_bytes):
    """Refuse a GRU whose engine model would not fit in ``max_bytes`` beside the checkpoint's tensors: the
    engine pads the hidden size to 16-unit tiles and packs the weights (gru_fast._files.check_build), so
    an H=1 GRU with a long input takes ~16x its weights.  The sizes come from layer 0's weight_ih (3H, I)
    and weight_hh (3H, H) and the keys' layers and directions."""
    if group["gru"]:
        entries = group["gru"]
        num_layers = 1 + max(k[2] for k in entries)
        num_directions = 2 if any(k[3] for k in entries) else 1
        w_ih, w_hh = entries.get(("weight", "ih", 0, 0)), entries.get(("weight", "hh", 0, 0))
    else:
        num_layers = num_directions = 1
        w_ih, w_hh = group["cell"].get(("weight", "ih")), group["cell"].get(("weight", "hh"))
    if w_ih is None or w_hh is None or len(tensors[w_ih].shape) != 2 or len(tensors[w_hh].shape) != 2:
        return  # malformed: from_state_dict names what is wrong
    hidden, inputs = tensors[w_hh].shape[1], tensors[w_ih].shape[1]
    if min(hidden, inputs) < 1:
        return
    dtype = "float64" if _logical_nbytes(tensors[w_hh]) >= 8 * tensors[w_hh].shape[0] * hidden else "float32"
    held = sum(_logical_nbytes(value) for value in tensors.values())
    check_build(f"the GRU {prefix!r}", held, "the checkpoint's tensors", max_bytes, inputs, hidden, num_layers,
                num_directions, dtype)


def _logical_nbytes(value):
    """Elements x element size of a torch tensor or numpy array (None for anything else): what a dense
    copy of it takes, whatever its storage holds (an ``expand``-ed view stores one element)."""
    if isinstance(value, np.ndarray):
        return int(value.size) * value.dtype.itemsize
    if hasattr(value, "element_size") and hasattr(value, "numel") and hasattr(value, "shape"):
        return int(value.numel()) * int(value.element_size())
    return None


def _recorded_batch_first(flags):
    """(batch_first, where it came from) from the checkpoint's ``batch_first`` entries, or (None, None)."""
    if not flags:
        return None, None
    values = set(flags.values())
    if len(values) > 1:
        return None, None
    names = ", ".join(repr(k) for k in sorted(flags))
    return values.pop(), f"from the checkpoint's {names}"


def _refuse_legacy_checkpoint(stream, path):
    """torch.save has written zip archives since PyTorch 1.6.  The older format is a bare pickle whose
    storages torch.load sizes from the pickle itself, before anything can check them against the file
    (a 300-byte file made it try to allocate 1.2 GB), so it is refused."""
    import zipfile

    try:
        is_zip = zipfile.is_zipfile(stream)
    finally:
        stream.seek(0)
    if not is_zip:
        raise ValueError(f"{path!r}: refused to load: not a zip-format PyTorch checkpoint (torch.save writes zip "
                         "archives since PyTorch 1.6; the legacy format sizes its tensors from an unchecked "
                         "pickle). Re-save it with a current torch.save, or save the state dict with np.savez")


def _one_line(message) -> str:
    """torch's messages span lines and carry terminal colour codes: keep the first line, plain."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(message)).strip()
    return text.splitlines()[0] if text else text


def _load_npz(stream, path):
    try:
        with np.load(stream, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:  # object arrays: "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path!r}: refused to load: {exc}") from exc
    except ZIP_ERRORS as exc:
        raise ValueError(f"{path!r}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def _load_checkpoint(stream, path):
    import pickle

    import torch

    try:
        obj = torch.load(stream, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ValueError(_pickled_objects_message(path, exc)) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path!r}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{_one_line(exc)})") from exc
    return obj


def _pickled_objects_message(path, exc):
    """Why a checkpoint that torch.load(weights_only=True) refuses is not loaded, and the two ways out."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" ({found.group(1)})" if found else ""
    return (f"{path!r}: refused to load: the file holds pickled Python objects{what}, not only tensors, and "
            "unpickling them could run code from the file, so torch.load(weights_only=True) stops. What to do: "
            "re-save the weights with torch.save(model.state_dict(), path) and load that; or, only for a file "
            "you trust, load it yourself with torch.load(path, weights_only=False) and pass the nn.GRU (or "
            "nn.GRUCell) to converters.from_torch.convert(module)")


# --------------------------------------------------------------------------------------------------
# accelerate: nn.GRU / nn.GRUCell inside a torch model, run by gru_fast
# --------------------------------------------------------------------------------------------------

def accelerate(module):
    """Run every ``torch.nn.GRU`` and ``torch.nn.GRUCell`` inside ``module`` with gru_fast; returns ``module``.

    In place: each GRU (or the module itself, if it is one) keeps its identity, parameters, state_dict
    keys, ``isinstance(m, nn.GRU)`` and attributes; only its class becomes ``AcceleratedGRU`` /
    ``AcceleratedGRUCell`` (a subclass), whose ``forward`` runs a gru_fast model converted from the
    module's weights.  The rest of the model (convolutions, heads) stays torch.

    ``forward`` takes and returns what nn.GRU's does: ``(input, hx=None) -> (output, h_n)`` with
    ``batch_first``, unbatched (T, I) input, and PackedSequence in and out; nn.GRUCell's
    ``(input, hx=None) -> h'``, batched (B, I) or unbatched (I,).  Contiguous CPU tensors are read in
    place (``tensor.numpy()``) and the results are tensors over gru_fast's output arrays
    (``torch.from_numpy``), so no copy is made on the way in or out; other inputs are made contiguous
    first.

    Inference only.  The converted weights are refreshed whenever a parameter changes (``load_state_dict``,
    an in-place update, ``.double()``), checked through the parameters' version counters.  eval() vs
    train(): in eval mode a call always runs, and its results carry no autograd graph (gradients stop
    at the GRU, even for inputs that require grad).  In training mode with autograd on -- where a
    gradient is what the caller wants -- a call raises RuntimeError naming the fix (``model.eval()``, or
    ``torch.no_grad()`` / ``torch.inference_mode()``).  Training mode under no_grad runs as eval mode
    would, except for an nn.GRU with ``dropout`` > 0 between layers, which torch applies in training
    mode (RuntimeError).

    float32 and float64 modules run in their own precision; inputs must have the module's dtype (as
    torch requires).  CPU only: a module or input on another device raises ValueError, and so does a
    module that cannot be converted (``proj_size``, other dtypes); ``accelerate`` checks every GRU before
    changing any.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"accelerate() expects a torch.nn.Module, got {type(module).__name__}")
    targets = [(name or type(m).__name__, m) for name, m in module.named_modules()
               if isinstance(m, (torch.nn.GRU, torch.nn.GRUCell)) and not isinstance(m, _Accelerated)]
    for name, m in targets:
        _check_servable(m, name)
    for _, m in targets:
        m.__class__ = _accelerated_class(type(m))
        m.__dict__.pop("_gru_fast", None)
        m._gru_fast_model()  # convert now, so a module gru_fast cannot run fails here, not mid-model
    return module


class _Accelerated:
    """Marker base of the accelerated classes."""


def _check_servable(module, name):
    import torch

    params = list(module.parameters())
    for p in params:
        if p.device.type != "cpu":
            raise ValueError(f"{name}: gru_fast runs on the CPU only, the module's parameters are on {p.device} "
                             "(move the model with .cpu() first)")
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name}: gru_fast runs float32 and float64 modules, this one is {p.dtype} "
                             "(convert it with .float() first)")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"{name}: nn.GRU with proj_size={module.proj_size} is not supported")


_CLASSES = {}


def _accelerated_class(base):
    """``AcceleratedGRU`` / ``AcceleratedGRUCell`` for nn.GRU / nn.GRUCell (importable from this module, so
    an accelerated model pickles), or a subclass of another base (a user's GRU subclass, a parametrized
    module's class)."""
    import torch

    if base not in _CLASSES:
        cell = issubclass(base, torch.nn.GRUCell)
        mixin = _cell_mixin() if cell else _gru_mixin()
        if base in (torch.nn.GRU, torch.nn.GRUCell):
            name, qualname = "Accelerated" + base.__name__, "Accelerated" + base.__name__
        else:
            name, qualname = "Accelerated" + base.__name__, "_accelerated_class.<locals>.Accelerated" + base.__name__
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": qualname})
        _CLASSES[base] = cls
    return _CLASSES[base]


def __getattr__(name):
    """``AcceleratedGRU`` and ``AcceleratedGRUCell``, made on first use (they subclass torch's classes,
    and torch is imported only where it is used)."""
    if name in ("AcceleratedGRU", "AcceleratedGRUCell"):
        import torch

        return _accelerated_class(getattr(torch.nn, name[len("Accelerated"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _AcceleratedBase(_Accelerated):
    """What the accelerated GRU and GRUCell share: the converted model, kept in step with the weights, and
    the checks made on every call."""

    def _gru_fast_model(self):
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cached = self.__dict__.get("_gru_fast")
        if cached is None or cached[0] != key:
            import torch

            _check_servable(self, type(self).__name__)
            with torch.no_grad():
                cached = (key, convert(self))
            self.__dict__["_gru_fast"] = cached
        return cached[1]

    def _gru_fast_check(self, tensors):
        import torch

        name = type(self).__name__
        dtype = next(self.parameters()).dtype
        for what, t in tensors:
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type != "cpu":
                raise ValueError(f"{name}: gru_fast runs on the CPU only, {what} is on {t.device}")
            if t.dtype != dtype:
                raise TypeError(f"{name}: {what} has dtype {t.dtype}, the module's parameters {dtype} (as in torch, "
                                "they must match)")
        if self.training and torch.is_grad_enabled():
            wanting = [what for what, t in tensors if t is not None and t.requires_grad]
            if wanting or any(p.requires_grad for p in self.parameters()):
                because = f"{' and '.join(wanting)} requires grad" if wanting else "its parameters require grad"
                raise RuntimeError(f"{name} is run by gru_fast, an inference engine without gradients, and is "
                                   f"in training mode with autograd on ({because}): call model.eval() or run it "
                                   "under torch.no_grad() / torch.inference_mode()")


def _as_numpy(tensor):
    """A CPU tensor as a numpy array sharing its memory (a contiguous copy first when it is not contiguous)."""
    t = tensor.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def _gru_mixin():
    import torch
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

    class _GRUForward(_AcceleratedBase):
        def forward(self, input, hx=None):  # noqa: A002 - nn.GRU's own argument name
            model = self._gru_fast_model()
            packed = isinstance(input, PackedSequence)
            if self.training and self.dropout and self.num_layers > 1:
                raise RuntimeError(f"{type(self).__name__}: in training mode nn.GRU applies dropout="
                                   f"{self.dropout} between layers, which gru_fast (inference only) does not: "
                                   "call model.eval()")
            if packed:
                self._gru_fast_check([("input.data", input.data), ("hx", hx)])
                x, lengths = pad_packed_sequence(input, batch_first=self.batch_first)
                lengths = lengths.numpy()
            else:
                self._gru_fast_check([("input", input), ("hx", hx)])
                x, lengths = input, None
            y, h_n = model(_as_numpy(x), h0=None if hx is None else _as_numpy(hx), lengths=lengths)
            y, h_n = torch.from_numpy(y), torch.from_numpy(h_n)
            if not packed:
                return y, h_n
            # back to the packed order: time-major, the rows of step t are the first batch_sizes[t]
            # sequences in sorted order
            steps_first = y.transpose(0, 1) if self.batch_first else y
            if input.sorted_indices is not None:
                steps_first = steps_first.index_select(1, input.sorted_indices)
            batch_sizes = input.batch_sizes
            mask = torch.arange(steps_first.shape[1])[None, :] < batch_sizes[:, None]
            return PackedSequence(steps_first[mask], batch_sizes, input.sorted_indices, input.unsorted_indices), h_n

    return _GRUForward


def _cell_mixin():
    import torch

    class _GRUCellForward(_AcceleratedBase):
        def forward(self, input, hx=None):  # noqa: A002 - nn.GRUCell's own argument name
            model = self._gru_fast_model()
            self._gru_fast_check([("input", input), ("hx", hx)])
            if input.dim() not in (1, 2):
                raise ValueError(f"{type(self).__name__}: expected input to be 1-D or 2-D, got {input.dim()}-D "
                                 f"shape {tuple(input.shape)}")
            x = _as_numpy(input)[None]  # one time step: (1, B, I), or (1, I) unbatched
            h0 = None if hx is None else _as_numpy(hx)[None]
            y, _ = model(x, h0=h0)
            return torch.from_numpy(y[0])

    return _GRUCellForward
