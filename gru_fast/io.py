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
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ._files import check_output_path, model_file
from .model import GRU

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "gru_fast"
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB of weights

_CONFIG_KEYS = {
    "format", "version", "num_layers", "direction", "linear_before_reset", "activations",
    "activation_alpha", "activation_beta", "clip", "batch_first", "dtype", "has_bias", "provenance",
}


_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}

# What zipfile raises for a damaged archive: a bad CRC, a bad header or name, a seek to a negative
# offset, an unknown compression method or zip version, an "encrypted" flag, truncated data.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError,
               zlib.error, struct.error)

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


def _read_member(archive: zipfile.ZipFile, name: str, budget: list, archive_size: int) -> np.ndarray:
    """Read one .npy member after checking its header against its size and the budget.

    Every size the archive declares is checked against a real one before it sizes a read: the member's
    stored size against the archive's size on disk (zipfile would otherwise allocate a read buffer of
    the declared size), the array's size against the member's and against the budget.
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
        try:
            version = np.lib.format.read_magic(member)
            reader = _HEADER_READERS.get(version)
            if reader is None:
                raise ValueError(f"unsupported .npy version {version}")
            header = reader(member, max_header_size=10_000)
        except ValueError as exc:
            raise ValueError(f"member {name!r} is not a valid .npy array: {exc}") from None
        shape, fortran, dtype = header
        if dtype.hasobject or dtype.kind not in "fu" or dtype.itemsize > 8:
            raise ValueError(f"member {name!r} has dtype {dtype}; only float and uint8 arrays are allowed")
        if any(d < 0 for d in shape):
            raise ValueError(f"member {name!r} declares a negative dimension in shape {shape}")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes > info.file_size:
            raise ValueError(f"member {name!r} declares {nbytes} bytes but holds {info.file_size}")
        budget[0] -= nbytes
        if budget[0] < 0:
            raise ValueError("the file's weights exceed max_bytes; pass a larger max_bytes to load it")
        data = member.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"member {name!r} is truncated")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


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
    if set(config) != _CONFIG_KEYS:
        raise ValueError(f"gru_fast file config has keys {sorted(config)}, expected {sorted(_CONFIG_KEYS)}")
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
    return config


@model_file("gru_fast")
def load(path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> GRU:
    """Read a model written by :func:`save`.  Raises FileNotFoundError for a missing path, ValueError
    naming the file for anything else (for a model file of another kind: naming the loader that reads it).

    ``max_bytes`` caps the bytes of arrays the file may make the loader hold; every size is checked
    from the file's headers, against the real sizes, before anything is allocated.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    path = Path(os.fspath(path))
    budget = [int(max_bytes)]
    try:
        with zipfile.ZipFile(path) as archive:
            archive_size = os.fstat(archive.fp.fileno()).st_size
            raw = _read_member(archive, "config", budget, archive_size)
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise ValueError("not a gru_fast file: config must be a 1-D uint8 array")
            try:
                config = json.loads(raw.tobytes().decode())
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"not a gru_fast file: config is not JSON ({type(exc).__name__})") from None
            config = _check_config(config)
            layers = []
            for index in range(config["num_layers"]):
                W = _read_member(archive, f"layer{index}.W", budget, archive_size)
                R = _read_member(archive, f"layer{index}.R", budget, archive_size)
                B = _read_member(archive, f"layer{index}.B", budget, archive_size) if config["has_bias"] else None
                layers.append((W, R, B))
    except _ZIP_ERRORS as exc:
        raise ValueError(f"{path} is not a readable gru_fast model file (a damaged or truncated .npz): "
                         f"{type(exc).__name__}: {exc}") from None
    options = {k: config[k] for k in _CONFIG_KEYS - {"format", "version", "num_layers", "has_bias"}}
    try:
        return GRU(layers, **options)
    except TypeError as exc:
        raise ValueError(f"gru_fast file holds an invalid model: {exc}") from None
