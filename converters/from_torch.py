"""PyTorch -> gru_fast converters.

PyTorch stacks the three gates of ``nn.GRU`` / ``nn.GRUCell`` in the order (r, z, n); gru_fast uses the
ONNX layout and gate order (z, r, h).  PyTorch always computes the candidate in the "linear before reset"
form, so every converted model has ``linear_before_reset=True``.

Inference only: ``nn.GRU``'s ``dropout`` is applied between layers during training and never at
inference, so it is ignored here.

torch is imported only inside the functions that need it (``convert``, and ``load`` for .pt files); the
core of the conversion works on plain numpy arrays, so ``from_state_dict`` accepts numpy state dicts and
``load`` reads .npz state dicts without torch.
"""

from __future__ import annotations

import os
import re

import numpy as np

from gru_fast._files import model_file

__all__ = ["convert", "from_state_dict", "load", "DEFAULT_MAX_BYTES"]

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


def _params_from_state_dict(state_dict, prefix):
    """-> (prefix, params, num_layers, num_directions, has_bias) for the GRU under ``prefix``, where
    ``params[(layer, direction)] = (w_ih, w_hh, b_ih, b_hh, names)`` holds numpy arrays in PyTorch layout."""
    groups = _split_prefixes(state_dict.keys())
    if prefix is None:
        if not groups:
            raise ValueError("no GRU parameters found: expected keys such as 'weight_ih_l0', 'weight_hh_l0' "
                             "(nn.GRU) or 'weight_ih', 'weight_hh' (nn.GRUCell), with or without a module prefix")
        if len(groups) > 1:
            listing = ", ".join(repr(p) for p in sorted(groups))
            raise ValueError(f"the state dict holds {len(groups)} GRUs; pick one with prefix=: {listing}")
        prefix = next(iter(groups))
    else:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if prefix and not prefix.endswith(".") and prefix + "." in groups and prefix not in groups:
            prefix = prefix + "."
        if prefix not in groups:
            listing = ", ".join(repr(p) for p in sorted(groups)) or "none"
            raise ValueError(f"prefix {prefix!r} names no GRU in the state dict; candidates: {listing}")
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

def from_state_dict(state_dict, *, batch_first=False, prefix=None, _source="state_dict"):
    """Build a gru_fast.GRU from an nn.GRU / nn.GRUCell state dict.

    Parameters
    ----------
    state_dict : mapping
        Keys ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` (plus ``_reverse``
        variants for a bidirectional GRU), or ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` for a
        GRUCell, optionally behind a module prefix such as ``"encoder.gru."``.  Values may be torch tensors
        or numpy arrays.  Layers, directions, sizes and bias are inferred from the keys and shapes.
    batch_first : bool
        The state dict does not record it; pass the module's setting.
    prefix : str, optional
        Picks one GRU out of a larger model's state dict (``"encoder.gru."`` or ``"encoder.gru"``).  When
        the dict holds several GRUs and no prefix is given, ValueError lists the candidates.
    """
    if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    prefix, params, num_layers, num_directions, has_bias = _params_from_state_dict(state_dict, prefix)
    return _build(params, num_layers=num_layers, num_directions=num_directions, has_bias=has_bias,
                  batch_first=batch_first,
                  provenance={"framework": "torch", "source": _source, "prefix": prefix or None})


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
                               batch_first=False, _source="module")
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
                            batch_first=module.batch_first, _source="module")
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


DEFAULT_MAX_BYTES = 2 * 1024 ** 3


@model_file("torch")
def load(path, prefix=None, *, batch_first=False, max_bytes=DEFAULT_MAX_BYTES):
    """Load a GRU from a PyTorch checkpoint (.pt / .pth) or a numpy .npz state dict, executing no pickled code.

    A checkpoint is read with ``torch.load(path, weights_only=True, map_location="cpu")`` only: one whose
    pickle would need arbitrary classes or callables (a whole pickled module, a malicious payload) is
    refused with ValueError, never run.  It may hold a bare state dict or a dict with a ``"state_dict"`` /
    ``"model_state_dict"`` entry.  A ``.npz`` file (``np.savez(path, **state_dict)``) is read with
    ``np.load(allow_pickle=False)``, so object arrays are refused.  Paths that are not regular files
    (directories, FIFOs, devices) are refused before anything is opened.

    ``max_bytes`` (default 2 GiB) caps the file and the arrays it declares: a file larger than the cap is
    refused unread, and in an .npz or a zip-format checkpoint every member's declared size is checked
    against the cap and against the bytes really in the file before anything is read, so a header
    cannot make the loader allocate what it claims.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    path = os.fspath(path)
    with _open_regular_file(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"{path!r} is {size} bytes, over the memory cap max_bytes={max_bytes}")
        if path.lower().endswith(".npz"):
            _check_zip_sizes(stream, path, size, max_bytes, npy_headers=True)
            state_dict = _load_npz(stream, path)
        else:
            _refuse_legacy_checkpoint(stream, path)
            _check_zip_sizes(stream, path, size, max_bytes, npy_headers=False)
            state_dict = _load_checkpoint(stream, path)
    return from_state_dict(state_dict, batch_first=batch_first, prefix=prefix,
                           _source=os.path.basename(path))


def _open_regular_file(path):
    """Open ``path`` for reading only if it is a regular file.  The check is made on the opened descriptor,
    so the file cannot be swapped for a FIFO or device between check and read; O_NONBLOCK keeps a FIFO
    from hanging the open itself."""
    import stat

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ValueError(f"{path!r} is not a regular file ({exc.strerror or exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path!r} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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


def _zip_errors():
    import struct
    import zipfile
    import zlib

    # what zipfile raises for a damaged archive (bad CRC or header, negative seek, unknown compression
    # method or zip version, an "encrypted" flag, truncated data)
    return (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError,
            zlib.error, struct.error, KeyError)


def _check_zip_sizes(stream, path, size, max_bytes, *, npy_headers):
    """Refuse a zip whose members declare more bytes than the file holds or than ``max_bytes``.

    Readers size their buffers from these declarations (zipfile from the stored size, np.load from the
    .npy header's shape, torch from the record's size), so they are checked before any reader runs.
    A file that is not a zip (a legacy torch checkpoint) is left to its reader.
    """
    import zipfile

    try:
        if not zipfile.is_zipfile(stream):
            return
        total = 0
        with zipfile.ZipFile(stream) as archive:
            for info in archive.infolist():
                where = f"{path!r}: member {info.filename!r}"
                if info.compress_size > size or (info.compress_type == zipfile.ZIP_STORED
                                                 and info.compress_size != info.file_size):
                    raise ValueError(f"{where} declares {info.file_size} bytes in {info.compress_size} stored, "
                                     f"but the file holds {size}")
                declared = info.file_size
                if npy_headers and info.filename.endswith(".npy"):
                    declared = _npy_nbytes(archive, info, where)
                    if declared > info.file_size:
                        raise ValueError(f"{where} declares an array of {declared} bytes in {info.file_size}")
                total += declared
                if total > max_bytes:
                    raise ValueError(f"{where}: the arrays exceed the memory cap max_bytes={max_bytes}")
    except _zip_errors() as exc:
        raise ValueError(f"{path!r}: not a readable zip archive ({type(exc).__name__}: {exc})") from exc
    finally:
        stream.seek(0)


def _npy_nbytes(archive, info, where):
    """Bytes of the array a .npy member declares, from its header alone."""
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = readers[version](member, max_header_size=10_000)
        except ValueError as exc:
            raise ValueError(f"{where} is not a valid .npy array: {exc}") from exc
    if dtype.hasobject:
        raise ValueError(f"{where}: refused to load: it is an object array, which needs pickle "
                         "(allow_pickle=False)")
    if any(d < 0 for d in shape):
        raise ValueError(f"{where} declares a negative dimension in shape {shape}")
    count = 1
    for d in shape:
        count *= d
    return count * dtype.itemsize


def _load_npz(stream, path):
    try:
        with np.load(stream, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:  # object arrays: "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path!r}: refused to load: {exc}") from exc
    except _zip_errors() as exc:
        raise ValueError(f"{path!r}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def _load_checkpoint(stream, path):
    import pickle

    import torch

    try:
        obj = torch.load(stream, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path!r}: refused to load: the checkpoint needs arbitrary unpickling, which "
                         f"weights_only=True forbids (save a state dict instead): {_one_line(exc)}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path!r}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                         f"{_one_line(exc)})") from exc
    state_dict = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                state_dict = obj[key]
                break
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path!r}: expected a state dict (or a dict with 'state_dict' / 'model_state_dict'), "
                         f"got {type(state_dict).__name__}")
    return state_dict
