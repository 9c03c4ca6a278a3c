"""Engine files: one ``.npz`` holding the weights and a JSON description.

The format never executes code: arrays are plain numeric ``.npy`` members
read with ``allow_pickle=False``, the configuration is JSON.  Before an array
is read, its header is checked against the member's real size and a memory
cap, so a hostile header cannot make the loader allocate what it declares.

Members: ``config`` (uint8, UTF-8 JSON) and ``layer{l}.W``, ``layer{l}.R``
and, with a bias, ``layer{l}.B`` in ONNX layout (see :class:`gru_fast.GRU`).
Weights are stored in that canonical form, not the kernel layout, so files
outlive kernel changes.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._files import DEFAULT_MAX_BYTES, ZIP_ERRORS, check_build, check_max_bytes, check_output_path, model_file, \
    npy_header
from .model import GRU

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "gru_fast"
FORMAT_VERSION = 1

_CONFIG_KEYS = {
    "format", "version", "num_layers", "direction", "linear_before_reset", "activations",
    "activation_alpha", "activation_beta", "clip", "batch_first", "dtype", "has_bias", "provenance",
}

_OPTIONAL_KEYS = {"weights"}  # written only for a model with bfloat16 weights (GRU.with_weights)

_READ_CHUNK = 1 << 20  # bytes decompressed at a time into an array being read

_BOOL_KEYS = ("linear_before_reset", "batch_first", "has_bias")


def save(model: GRU, path) -> None:
    """Write ``model`` to ``path`` (a ``.npz`` file; the suffix is not added for you).  The folder must
    exist: FileNotFoundError naming it otherwise."""
    if not isinstance(model, GRU):
        raise TypeError(f"model must be a gru_fast.GRU, got {type(model).__name__}")
    check_output_path(path)
    config = model._config()
    config.update(format=FORMAT, version=FORMAT_VERSION, num_layers=model.num_layers, has_bias=model.has_bias)
    try:
        blob = json.dumps(config, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.provenance must hold only JSON values: {exc}") from None
    arrays = {"config": np.frombuffer(blob, dtype=np.uint8)}
    for index, (W, R, B) in enumerate(model.onnx_weights()):
        arrays[f"layer{index}.W"] = W
        arrays[f"layer{index}.R"] = R
        if B is not None:
            arrays[f"layer{index}.B"] = B
    with open(os.fspath(path), "wb") as handle:
        np.savez(handle, **arrays)


class _Member(NamedTuple):
    info: zipfile.ZipInfo
    shape: tuple
    fortran: bool
    dtype: np.dtype
    nbytes: int


def _member_header(archive: zipfile.ZipFile, name: str, archive_size: int) -> _Member:
    """Check one .npy member's header against its size, before anything sizes a read.

    Every size the archive declares is checked against a real one: the member's stored size against
    the archive's size on disk (zipfile would otherwise allocate a read buffer of the declared size),
    the array's size against the member's.
    """
    try:
        info = archive.getinfo(name + ".npy")
    except KeyError:
        raise ValueError(f"not a gru_fast file: member {name!r} is missing") from None
    if info.compress_size > archive_size:
        raise ValueError(f"member {name!r} declares {info.compress_size} stored bytes but the file holds "
                         f"{archive_size}")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise ValueError(f"member {name!r} is stored uncompressed but declares {info.file_size} bytes "
                         f"in {info.compress_size}")
    with archive.open(info) as member:
        shape, fortran, dtype = npy_header(member, f"member {name!r}")
    if dtype.hasobject or dtype.kind not in "fu" or dtype.itemsize > 8:
        raise ValueError(f"member {name!r} has dtype {dtype}; only float and uint8 arrays are allowed")
    if any(d < 0 for d in shape):
        raise ValueError(f"member {name!r} declares a negative dimension in shape {shape}")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > info.file_size:
        raise ValueError(f"member {name!r} declares {nbytes} bytes but holds {info.file_size}")
    return _Member(info, shape, fortran, dtype, nbytes)


def _read_member(archive: zipfile.ZipFile, name: str, header: _Member) -> np.ndarray:
    """The array of a member whose header :func:`_member_header` checked (and the caller charged).

    Read in chunks into the array itself: ``member.read(n)`` would hold a decompressed chunk of up to
    n bytes and the n-byte result at once, twice the charged size.
    """
    data = np.empty(header.nbytes, np.uint8)
    view = memoryview(data)
    filled = 0
    with archive.open(header.info) as member:
        if npy_header(member, f"member {name!r}") != (header.shape, header.fortran, header.dtype):
            raise ValueError(f"member {name!r} changed while it was read")
        while filled < header.nbytes:
            chunk = member.read(min(_READ_CHUNK, header.nbytes - filled))
            if not chunk:
                break
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
    if filled != header.nbytes:
        raise ValueError(f"member {name!r} is truncated")
    return data.view(header.dtype).reshape(header.shape, order="F" if header.fortran else "C")


def _check_build(path, config: dict, headers: dict, held: int, max_bytes: int) -> None:
    """Refuse the file when its ``held`` bytes of arrays and what building its model from them allocates
    (gru_fast._files.check_build) do not fit in ``max_bytes`` together.

    The sizes come from layer 0's W (D, 3H, I) and R (D, 3H, H) headers.  Arrays whose shapes do not fit
    together are refused by the GRU's shape checks, which run before it copies or packs anything.
    """
    W, R = headers["layer0.W"].shape, headers["layer0.R"].shape
    input_size, hidden_size = (W[2], R[2]) if len(W) == 3 and len(R) == 3 else (0, 0)  # 0: no build charged
    directions = 2 if config["direction"] == "bidirectional" else 1
    dtype = "float64" if config["dtype"] == "float64" else "float32"  # another name: GRU refuses it first
    check_build(f"loading {path}", held, "the file's arrays", max_bytes, input_size, hidden_size,
                config["num_layers"], directions, dtype, config.get("weights"))


def _check_config(config) -> dict:
    """The JSON configuration, with every value of the type :func:`save` writes (ValueError otherwise).

    Types are checked strictly, not coerced: ``"false"`` is not a bool, and a number too large for a
    float is refused rather than overflowing later.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError("not a gru_fast file: config has no format 'gru_fast'")
    version = config.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"unsupported gru_fast file version {version!r} (this is {FORMAT_VERSION})")
    if set(config) - _OPTIONAL_KEYS != _CONFIG_KEYS:
        raise ValueError(f"gru_fast file config has keys {sorted(config)}, expected {sorted(_CONFIG_KEYS)} "
                         f"and optionally {sorted(_OPTIONAL_KEYS)}")
    num_layers = config["num_layers"]
    if type(num_layers) is not int or not 1 <= num_layers <= 1024:
        raise ValueError(f"gru_fast file declares num_layers={num_layers!r}")

    def fail(key, expected):
        raise ValueError(f"gru_fast file config: {key} must be {expected}, got {config[key]!r:.80}")

    def is_number(value):
        if type(value) not in (int, float):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:
            return False

    for key in _BOOL_KEYS:
        if type(config[key]) is not bool:
            fail(key, "true or false")
    if type(config["direction"]) is not str:
        fail("direction", "a string")
    if type(config["dtype"]) is not str:
        fail("dtype", "a string")
    activations = config["activations"]
    if type(activations) is not list or not all(type(a) is str for a in activations):
        fail("activations", "a list of activation names")
    for key in ("activation_alpha", "activation_beta"):
        if type(config[key]) is not list or not all(is_number(v) for v in config[key]):
            fail(key, "a list of finite numbers")
    if config["clip"] is not None and not is_number(config["clip"]):
        fail("clip", "a finite number or null")
    if type(config["provenance"]) is not dict:
        fail("provenance", "an object")
    if "weights" in config and config["weights"] != "bfloat16":
        fail("weights", "'bfloat16' when present")
    return config


@model_file("gru_fast")
def load(path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> GRU:
    """Read a model written by :func:`save`.  Raises FileNotFoundError for a missing path, ValueError
    naming the file for anything else (for a model file of another kind: naming the loader that reads it).

    ``max_bytes`` caps the bytes the load may hold: the file's arrays plus what building the model
    from them allocates (the weights copied in the model's dtype and packed for the kernels, hidden
    units padded to a multiple of 16: see :func:`gru_fast.model.build_nbytes`).  Every size is checked
    from the file's headers, against the real sizes, before any array is read; a file over the cap
    raises ValueError naming the bytes it needs and the cap.
    """
    max_bytes = check_max_bytes(max_bytes)
    path = Path(os.fspath(path))
    try:
        with zipfile.ZipFile(path) as archive:
            archive_size = os.fstat(archive.fp.fileno()).st_size
            header = _member_header(archive, "config", archive_size)
            if header.nbytes > max_bytes:
                raise ValueError(f"{path}'s config needs {header.nbytes} bytes, over the memory cap "
                                 f"max_bytes={max_bytes}; pass a larger max_bytes if the model is genuine")
            raw = _read_member(archive, "config", header)
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise ValueError("not a gru_fast file: config must be a 1-D uint8 array")
            try:
                config = json.loads(raw.tobytes().decode())
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"not a gru_fast file: config is not JSON ({type(exc).__name__})") from None
            config = _check_config(config)
            names = [f"layer{index}.{array}" for index in range(config["num_layers"])
                     for array in ("WRB" if config["has_bias"] else "WR")]
            headers = {name: _member_header(archive, name, archive_size) for name in names}
            # Everything the load will hold, charged before any array is read: the config, the arrays as
            # stored, and what building the model from them allocates (copies, padded packed weights).
            declared = header.nbytes + sum(h.nbytes for h in headers.values())
            _check_build(path, config, headers, declared, max_bytes)
            arrays = {name: _read_member(archive, name, headers[name]) for name in names}
            layers = [(arrays[f"layer{index}.W"], arrays[f"layer{index}.R"], arrays.get(f"layer{index}.B"))
                      for index in range(config["num_layers"])]
            del arrays
    except ZIP_ERRORS as exc:
        raise ValueError(f"{path} is not a readable gru_fast model file (a damaged or truncated .npz): "
                         f"{type(exc).__name__}: {exc}") from None
    options = {k: config[k] for k in (_CONFIG_KEYS | _OPTIONAL_KEYS) - {"format", "version", "num_layers", "has_bias"}
               if k in config}
    try:
        return GRU(layers, **options)
    except TypeError as exc:
        raise ValueError(f"gru_fast file holds an invalid model: {exc}") from None
