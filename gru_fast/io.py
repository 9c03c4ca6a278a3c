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
import os
import zipfile
from pathlib import Path

import numpy as np

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


def save(model: GRU, path) -> None:
    """Write ``model`` to ``path`` (a ``.npz`` file; the suffix is not added for you)."""
    if not isinstance(model, GRU):
        raise TypeError(f"model must be a gru_fast.GRU, got {type(model).__name__}")
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


def _read_member(archive: zipfile.ZipFile, name: str, budget: list) -> np.ndarray:
    """Read one .npy member after checking its header against its size and the budget."""
    try:
        info = archive.getinfo(name + ".npy")
    except KeyError:
        raise ValueError(f"not a gru_fast file: member {name!r} is missing") from None
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


def load(path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> GRU:
    """Read a model written by :func:`save`.  Raises ValueError for anything else."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    budget = [int(max_bytes)]
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path} is not a gru_fast model file (.npz): {exc}") from None
    with archive:
        raw = _read_member(archive, "config", budget)
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError("not a gru_fast file: config must be a 1-D uint8 array")
        try:
            config = json.loads(raw.tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a gru_fast file: config is not JSON ({exc})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError("not a gru_fast file: config has no format 'gru_fast'")
        if config.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported gru_fast file version {config.get('version')!r} (this is {FORMAT_VERSION})")
        if set(config) != _CONFIG_KEYS:
            raise ValueError(f"gru_fast file config has keys {sorted(config)}, expected {sorted(_CONFIG_KEYS)}")
        num_layers = config["num_layers"]
        if not isinstance(num_layers, int) or not 1 <= num_layers <= 1024:
            raise ValueError(f"gru_fast file declares num_layers={num_layers!r}")
        layers = []
        for index in range(num_layers):
            W = _read_member(archive, f"layer{index}.W", budget)
            R = _read_member(archive, f"layer{index}.R", budget)
            B = _read_member(archive, f"layer{index}.B", budget) if config["has_bias"] else None
            layers.append((W, R, B))
    options = {k: config[k] for k in _CONFIG_KEYS - {"format", "version", "num_layers", "has_bias"}}
    try:
        return GRU(layers, **options)
    except TypeError as exc:
        raise ValueError(f"gru_fast file holds an invalid model: {exc}") from None
