"""Reading Keras model files with json and h5py only: no Keras, no TensorFlow, nothing from the file runs.

Three containers hold Keras weights:

``.keras`` (Keras 3, ``keras/src/saving/saving_lib.py``)
    A zip of ``config.json`` (the model's ``get_config()``, JSON), ``metadata.json`` (``keras_version``,
    ``date_saved``) and ``model.weights.h5``.  In the weights file every object sits at the path of the
    attribute walk Keras makes from the model (``_save_state``): a Sequential or Functional model's
    ``layers`` list first, each layer under ``layers/<snake_case(class name)>`` made unique with ``_1``,
    ``_2`` ... in list order (``_save_container_state``), its own variables in ``<path>/vars/0, 1, ...``
    and its sub-objects below it (a GRU's cell in ``<path>/cell/vars``; a Bidirectional's
    ``forward_layer`` and ``backward_layer``).  Recent Keras 3 releases (3.15 here) also write the
    layer's name as the ``name`` attribute of ``<path>/vars``; the loader checks it where present.  ``model.save_weights("m.weights.h5")`` writes the same file alone.

``.h5`` full model (tf.keras 2 ``keras/saving/hdf5_format.py`` ``save_model_to_hdf5``, and Keras 3's
``legacy_h5_format.py``, which keeps the layout)
    Root attributes ``model_config`` (JSON), ``keras_version``, ``backend``; group ``model_weights``
    with attribute ``layer_names``; one group per layer, named after it, with attribute ``weight_names``
    (the layer's weights in order: trainable then non-trainable) and one dataset per weight at that name
    relative to the group (tf.keras 2: ``gru/gru_cell/kernel:0``; Keras 3: ``sequential/gru/gru_cell/
    kernel``).  ``layer_names`` / ``weight_names`` too long for one HDF5 attribute are split into
    ``layer_names0``, ``layer_names1``, ... (``save_attributes_to_hdf5_group``).

``.h5`` weights only (tf.keras 2 ``model.save_weights("m.h5")``, ``save_weights_to_hdf5_group``)
    The ``model_weights`` group's layout at the root of the file, with no ``model_config``.

This module opens those containers and reads from them under the loaders' common rules:

- the path must be a regular file no larger than ``max_bytes`` (checked on the open descriptor);
- zip members are checked before anything is read: declared sizes against the file and ``max_bytes``
  (:func:`gru_fast._files.check_zip_sizes`), names against path escapes
  (:func:`converters._safe_paths._checked_location`: absolute paths, ``..``, drive letters) and
  duplicates; members are read into memory, never extracted;
- HDF5 objects are reached through hard links only (a soft or external link, which could point into
  another file, is refused), and a dataset is read only after its declared size (shape x itemsize) is
  charged to a :class:`converters._onnx_graph.Budget` of ``max_bytes``, its type is checked to be
  floating point, and it is checked to have no external or virtual storage (data kept in other files);
- JSON is parsed with ``json.loads``; nothing is ever evaluated or unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re

from gru_fast._files import ZIP_ERRORS, check_file_size, check_zip_sizes, open_regular_file

from ._onnx_graph import Budget
from ._safe_paths import _checked_location

__all__ = ["KerasFile", "open_keras_file", "snake_case"]

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MEMBERS = ("config.json", "metadata.json", "model.weights.h5")
_MAX_JSON_DEPTH = 200  # nesting deeper than any real model config; json.loads itself recurses


class KerasFile:
    """What :func:`open_keras_file` found: ``kind`` is "keras" (a .keras zip), "h5-model" (a full-model
    .h5), "h5-weights" (tf.keras 2 weights-only .h5) or "keras-weights" (Keras 3 .weights.h5);
    ``config`` the model config dict or None; ``keras_version`` a string or None; ``weights`` the h5py
    group holding the weights (the keras-3 tree, or the legacy group with ``layer_names``)."""

    def __init__(self, source, kind, config, keras_version, weights, budget):
        self.source = source
        self.kind = kind
        self.config = config
        self.keras_version = keras_version
        self.weights = weights
        self.budget = budget

    @property
    def legacy(self):
        return self.kind in ("h5-model", "h5-weights")


def snake_case(name):
    """Keras 3's ``keras/src/utils/naming.py`` ``to_snake_case``: the path name of a layer class."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def parse_json(text, what):
    """JSON text (str or bytes) -> object, with ValueError for anything that is not JSON."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{what} is not UTF-8 text: {exc}") from None
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected JSON text, got {type(text).__name__}")
    # a bound on nesting before json.loads recurses into it (brackets inside strings count too, so this
    # over-estimates the depth; real configs stay far below the limit)
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > _MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests deeper than {_MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid JSON ({exc})") from None


@contextlib.contextmanager
def open_keras_file(path, max_bytes):
    """Open a .keras / .h5 file; yields a :class:`KerasFile`.  The format is recognised by its first bytes
    (a zip or HDF5 signature), not by the name."""
    import h5py

    path = os.fspath(path)
    source = os.path.basename(path)
    budget = Budget(max_bytes)
    with open_regular_file(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        check_file_size(path, size, max_bytes)
        head = stream.read(8)
        stream.seek(0)
        if head.startswith(_ZIP_MAGIC):
            members = _read_zip(stream, path, size, max_bytes)
            budget.charge(len(members["model.weights.h5"]), f"{path!r}: model.weights.h5")
            config = parse_json(members["config.json"], f"{path!r}: config.json")
            metadata = {}
            if "metadata.json" in members:
                metadata = parse_json(members["metadata.json"], f"{path!r}: metadata.json")
            version = metadata.get("keras_version") if isinstance(metadata, dict) else None
            with _h5_file(h5py, io.BytesIO(members["model.weights.h5"]), f"{path!r}: model.weights.h5") as h5:
                yield KerasFile(source, "keras", config, _version(version), h5, budget)
            return
        if head != _HDF5_MAGIC:
            raise ValueError(f"{path!r} is neither a .keras zip archive nor an HDF5 (.h5) file "
                             f"(first bytes {head!r})")
        with _h5_file(h5py, stream, repr(path)) as h5:
            try:
                found = _classify_h5(h5, path, source, budget)
            except (OSError, RuntimeError, KeyError) as exc:  # h5py on damaged HDF5 structures
                raise ValueError(f"{path!r}: unreadable HDF5 structure (corrupt file?): {exc}") from None
            yield found


def _read_zip(stream, path, size, max_bytes):
    import zipfile

    check_zip_sizes(stream, path, size, max_bytes, npy_headers=False)
    members = {}
    try:
        with zipfile.ZipFile(stream) as archive:
            names = [info.filename for info in archive.infolist()]
            for name in names:
                try:
                    _checked_location(name, name)
                except ValueError:
                    raise ValueError(f"{path!r}: zip member {name!r} is an absolute path or contains '..'; a "
                                     ".keras archive holds plain relative names only") from None
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{path!r}: zip members {duplicates} appear more than once (ambiguous archive)")
            if "config.json" not in names or "model.weights.h5" not in names:
                other = " (weights saved as model.weights.npz are not supported)" \
                    if "model.weights.npz" in names else ""
                raise ValueError(f"{path!r}: not a Keras 3 .keras archive: expected config.json and "
                                 f"model.weights.h5, found {names[:20]}{other}")
            for name in _ZIP_MEMBERS:
                if name in names:
                    members[name] = archive.read(name)
    except ZIP_ERRORS as exc:
        raise ValueError(f"{path!r}: not a readable .keras archive ({type(exc).__name__}: {exc})") from exc
    return members


@contextlib.contextmanager
def _h5_file(h5py, fileobj, what):
    try:
        h5 = h5py.File(fileobj, "r")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(f"{what}: not a readable HDF5 file (truncated or corrupt?): {exc}") from None
    try:
        yield h5
    finally:
        h5.close()


def _version(value):
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)


def _classify_h5(h5, path, source, budget):
    if "model_config" in h5.attrs:
        config = parse_json(read_attr(h5, "model_config", repr(path)), f"{path!r}: model_config")
        weights = group(h5, "model_weights", f"{path!r}")
        version = read_attr(weights, "keras_version", repr(path)) if "keras_version" in weights.attrs else \
            read_attr(h5, "keras_version", repr(path)) if "keras_version" in h5.attrs else None
        return KerasFile(source, "h5-model", config, _version(version), weights, budget)
    if "layer_names" in h5.attrs or "layer_names0" in h5.attrs:
        version = read_attr(h5, "keras_version", repr(path)) if "keras_version" in h5.attrs else None
        return KerasFile(source, "h5-weights", None, _version(version), h5, budget)
    if "model_weights" in h5:
        raise ValueError(f"{path!r}: has a model_weights group but no model_config attribute; not a Keras "
                         "full-model .h5 file as Keras writes it")
    return KerasFile(source, "keras-weights", None, None, h5, budget)


# --------------------------------------------------------------------------------------------------
# HDF5 access under the rules
# --------------------------------------------------------------------------------------------------

def _child(h5py, parent, name, what):
    """``parent[name]`` through a hard link only, or None when absent."""
    try:
        link = parent.get(name, getlink=True)
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        raise ValueError(f"{what}: cannot read {name!r} ({exc})") from None
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{what}: {name!r} is a {type(link).__name__}; only objects stored in the file itself "
                         "are read (soft and external links are refused)")
    try:
        return parent[name]
    except (KeyError, ValueError, OSError, RuntimeError) as exc:
        raise ValueError(f"{what}: cannot read {name!r} (truncated or corrupt file?): {exc}") from None


def resolve(parent, relpath, what):
    """Follow ``relpath`` ('a/b/c') from ``parent`` through hard links; None when a component is absent."""
    import h5py

    node = parent
    for part in [p for p in relpath.split("/") if p]:
        if not isinstance(node, h5py.Group):
            return None
        node = _child(h5py, node, part, what)
        if node is None:
            return None
    return node


def group(parent, relpath, what):
    import h5py

    node = resolve(parent, relpath, what)
    if not isinstance(node, h5py.Group):
        raise ValueError(f"{what}: expected an HDF5 group {relpath!r}, "
                         f"{'found none' if node is None else 'found a dataset'}")
    return node


def children(parent, what):
    """Names of ``parent``'s members (groups and datasets), in the file's order."""
    try:
        return list(parent.keys())
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what}: cannot list {parent.name!r} (truncated or corrupt file?): {exc}") from None


def dataset_shape(parent, relpath, what):
    """(dataset, shape) of a float dataset, checked (hard links, type, storage) but not read."""
    import h5py

    node = resolve(parent, relpath, what)
    where = f"{what}: dataset {relpath!r}"
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{where}: {'missing' if node is None else 'not a dataset'}")
    try:
        dtype, shape = node.dtype, node.shape
        external = node.external
        virtual = node.is_virtual
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{where}: cannot read its header (truncated or corrupt?): {exc}") from None
    if external or virtual:
        raise ValueError(f"{where} keeps its data in other files ({'external' if external else 'virtual'} "
                         "storage); only data inside the file is read")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8) or shape is None or not 1 <= len(shape) <= 2:
        raise ValueError(f"{where}: expected a 1-D or 2-D floating-point array, got dtype {dtype} shape {shape}")
    return node, tuple(int(d) for d in shape)


def read_dataset(parent, relpath, budget, what):
    """Read a float dataset after charging its declared size to ``budget``."""
    node, shape = dataset_shape(parent, relpath, what)
    where = f"{what}: dataset {relpath!r}"
    nbytes = math.prod(shape) * node.dtype.itemsize
    budget.charge(nbytes, where)
    try:
        if node.chunks is None and node.compression is None and node.id.get_storage_size() < nbytes:
            raise ValueError(f"{where} declares {nbytes} bytes but stores {node.id.get_storage_size()} "
                             "(truncated file?)")
        return node[()]
    except (OSError, RuntimeError, TypeError, KeyError) as exc:
        raise ValueError(f"{where}: cannot read its data (truncated or corrupt file?): {exc}") from None


def read_attr(obj, name, what):
    """An attribute's value as str (bytes decoded) or a list of str (arrays of names)."""
    import numpy as np

    try:
        value = obj.attrs[name]
    except (KeyError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{what}: cannot read attribute {name!r} of {obj.name!r}: {exc}") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "OSU" and value.size:
            raise ValueError(f"{what}: attribute {name!r} of {obj.name!r} should hold strings, "
                             f"holds {value.dtype}")
        return [_text(v, what, name) for v in value.reshape(-1)]
    return _text(value, what, name)


def _text(value, what, name):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what}: attribute {name!r} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise ValueError(f"{what}: attribute {name!r} should hold text, holds {type(value).__name__}")
    return value


def read_name_list(obj, name, what):
    """A list-of-names attribute, joined from ``name0``, ``name1``, ... when Keras split it
    (``load_attributes_from_hdf5_group``)."""
    if name in obj.attrs:
        value = read_attr(obj, name, what)
        return [value] if isinstance(value, str) else value
    names, index = [], 0
    while f"{name}{index}" in obj.attrs:
        value = read_attr(obj, f"{name}{index}", what)
        names.extend([value] if isinstance(value, str) else value)
        index += 1
    return names
