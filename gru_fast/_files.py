"""One rule for every model-file loader and writer: what a wrong path or a file of another kind raises.

- a path that does not exist: ``FileNotFoundError`` naming it;
- a path that is not a regular file (a directory, a FIFO, a device): ``ValueError`` naming it, raised
  before anything opens it for reading (a FIFO would block the reader);
- a file of a kind another loader reads -- recognised by its first bytes (zip archives by their member
  names, HDF5 by its signature) or, for ONNX, whose protobuf has no signature, by its suffix --:
  ``ValueError`` naming the file, its kind and the loader that reads it;
- every ``ValueError`` the loader raises names the file exactly once: a message that does not already
  name it (its path or its file name) gets the path in front.

Loaders apply the rule with the :func:`model_file` decorator; :func:`check_output_path` is the writers'
half (``gru_fast.save``: a missing folder is ``FileNotFoundError`` naming the folder).

The loaders' memory cap, ``max_bytes`` (:data:`DEFAULT_MAX_BYTES` unless given), is checked with the
helpers here too: :func:`check_max_bytes` for the argument, :func:`check_file_size` for the file,
:func:`check_zip_sizes` for what a zip's members declare (before any reader sizes a buffer from it), and
:func:`build_charge` / :func:`check_build` for what building the engine's model from the weights allocates.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import re
import stat
import struct
import zipfile
import zlib

import numpy as np

__all__ = ["DEFAULT_MAX_BYTES", "KINDS", "ZIP_ERRORS", "build_charge", "check_build", "check_file_size",
           "check_max_bytes", "check_model_file", "check_output_path", "check_zip_sizes", "model_file", "name_file",
           "npy_header", "open_regular_file", "sniff"]

DEFAULT_MAX_BYTES = 2 << 30  # every loader's default memory cap: 2 GiB

# What reading a damaged zip archive raises: a bad CRC, a bad header or name, a seek to a negative offset,
# an unknown compression method or zip version, an "encrypted" flag, truncated data; KeyError for a
# member looked up by a name the archive lacks (ZipFile.getinfo, and np.load's NpzFile over it).
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError,
              zlib.error, struct.error, KeyError)

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}

#: kind -> (what it is, the loader that reads it)
KINDS = {
    "gru_fast": ("a gru_fast engine file", "gru_fast.load"),
    "torch": ("a PyTorch checkpoint or state dict", "converters.from_torch.load"),
    "onnx": ("an ONNX model", "converters.from_onnx.load"),
    "keras": ("a Keras model file", "converters.from_keras.load"),
}

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # HDF5 superblock signature: Keras 2 .h5 files
# what torch.save wrote before PyTorch 1.6: a pickle (protocol 2) whose first object is torch's magic number
_LEGACY_TORCH = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_SUFFIXES = {".onnx": "onnx", ".pt": "torch", ".pth": "torch", ".keras": "keras", ".h5": "keras",
             ".hdf5": "keras"}
_MAX_DIRECTORY = 16 << 20  # bytes of zip central directory read to tell the kind of an archive
_STATE_DICT_KEY = re.compile(r"(^|\.)(weight|bias)_(ih|hh)(_l\d+)?(_reverse)?\.npy$")


def _not_found(path) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "No such file or directory", os.fspath(path))


def _zip_kind(names: list[str]) -> str | None:
    if "config.npy" in names and "layer0.W.npy" in names:
        return "gru_fast"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):  # torch.save's zip format
        return "torch"
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):  # Keras 3 .keras
        return "keras"
    if any(_STATE_DICT_KEY.search(n) for n in names):  # np.savez(path, **module.state_dict())
        return "torch"
    return None


def _member_names(stream) -> list[str]:
    """The member names of a zip archive, read only when its central directory declares at most
    :data:`_MAX_DIRECTORY` bytes (the loaders' memory caps apply later); [] for a damaged archive."""
    try:
        end = zipfile._EndRecData(stream)  # the end-of-central-directory record, as ZipFile reads it
        if end is None or end[zipfile._ECD_SIZE] > _MAX_DIRECTORY:
            return []
        stream.seek(0)
        with zipfile.ZipFile(stream) as archive:
            return archive.namelist()
    except Exception:  # noqa: BLE001 - a damaged zip is its loader's to report
        return []


def open_regular_file(path):
    """Open ``path`` for reading only if it is a regular file.  The check is made on the opened descriptor,
    so the file cannot be swapped for a FIFO or device between check and read; O_NONBLOCK keeps a FIFO
    from hanging the open itself."""
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


def sniff(path) -> str | None:
    """The kind of model file (a key of :data:`KINDS`) at ``path``, a regular file; None when unknown.

    Content first, so a renamed file is recognised: zip archives by their member names, HDF5 and the
    legacy torch pickle by their first bytes.  Then, for what has no signature (ONNX protobuf), the
    suffix.  A file that cannot be read is unknown: its loader reports why.
    """
    try:
        stream = open_regular_file(path)
    except ValueError:
        return None
    with stream:
        try:
            head = stream.read(len(_LEGACY_TORCH))
            if head.startswith(_HDF5_SIGNATURE):
                return "keras"
            if head == _LEGACY_TORCH:
                return "torch"
            if head.startswith(b"PK"):
                names = _member_names(stream)
                kind = _zip_kind(names)
                if kind is not None:
                    return kind
        except OSError:
            return None
    return _SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower())


def check_model_file(path, kind: str) -> None:
    """Apply the rule of this module to ``path`` before the loader of ``kind`` reads it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
        raise ValueError(f"{path} is not a regular file ({what})")
    found = sniff(path)
    if found is not None and found != kind:
        (description, loader), (expected, _) = KINDS[found], KINDS[kind]
        raise ValueError(f"{path} is {description}, not {expected}: read it with {loader}")


def name_file(message: str, path) -> str:
    """``message`` naming the file at ``path`` once: as it is when it names the file already (its path,
    or its file name when that is distinctive: ONNX messages use the file name, as its provenance does),
    else with the path in front."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if path in message or (len(name) > 3 and name in message):
        return message
    return f"{path}: {message}"


def model_file(kind: str):
    """Decorator for a loader whose first argument is the path (or, for some, an object in memory):
    applies :func:`check_model_file` and names the file in every ValueError the loader raises."""

    def decorate(load):
        first = next(iter(inspect.signature(load).parameters))

        @functools.wraps(load)
        def checked(*args, **kwargs):
            target = args[0] if args else kwargs.get(first)
            if not isinstance(target, (str, bytes, os.PathLike)):
                return load(*args, **kwargs)  # a ModelProto, a bad type: the loader's own checks
            path = os.fsdecode(os.fspath(target))
            check_model_file(path, kind)
            try:
                return load(*args, **kwargs)
            except ValueError as exc:
                if exc.args and isinstance(exc.args[0], str):
                    exc.args = (name_file(exc.args[0], path),) + exc.args[1:]
                raise

        return checked

    return decorate


def check_output_path(path) -> None:
    """A file is to be written at ``path``: its folder must exist (FileNotFoundError naming the folder;
    writers do not create folders, as ``open`` and ``np.save`` do not)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        problem = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(errno.ENOENT, f"cannot write {os.fspath(path)}: its folder {problem}", folder)


# --------------------------------------------------------------------------------------------------
# the memory cap
# --------------------------------------------------------------------------------------------------

def check_max_bytes(max_bytes) -> int:
    """``max_bytes`` as an int: a positive integer (a bool is not one), else ValueError."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return int(max_bytes)


def check_file_size(path, size: int, max_bytes: int) -> None:
    """Refuse a file of ``size`` bytes over ``max_bytes`` before anything reads it."""
    if size > max_bytes:
        raise ValueError(f"{path!r} is {size} bytes, over the memory cap max_bytes={max_bytes}")


def npy_header(member, where: str):
    """(shape, fortran_order, dtype) from the header of the .npy file open in ``member``; ValueError
    saying that ``where`` is not a valid .npy array for an unsupported version or a malformed header."""
    try:
        version = np.lib.format.read_magic(member)
        reader = _NPY_HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        return reader(member, max_header_size=10_000)
    except ValueError as exc:
        raise ValueError(f"{where} is not a valid .npy array: {exc}") from None


def _npy_nbytes(archive, info, where):
    """Bytes of the array a .npy member declares, from its header alone."""
    with archive.open(info) as member:
        shape, _, dtype = npy_header(member, where)
    if dtype.hasobject:
        raise ValueError(f"{where}: refused to load: it is an object array, which needs pickle "
                         "(allow_pickle=False)")
    if any(d < 0 for d in shape):
        raise ValueError(f"{where} declares a negative dimension in shape {shape}")
    count = 1
    for d in shape:
        count *= d
    return count * dtype.itemsize


def check_zip_sizes(stream, path, size: int, max_bytes: int, *, npy_headers: bool) -> None:
    """Refuse a zip whose members declare more bytes than the file (of ``size`` bytes) holds or, all
    together, than ``max_bytes``; with ``npy_headers``, a ``.npy`` member counts as the array its header
    declares (which must fit in the member).

    Readers size their buffers from these declarations (zipfile from the stored size, np.load from the
    .npy header's shape, torch from the record's size), so they are checked before any reader runs.
    A file that is not a zip (a legacy torch checkpoint) is left to its reader.  ``stream`` is left at 0.
    """
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
    except ZIP_ERRORS as exc:
        raise ValueError(f"{path!r}: not a readable zip archive ({type(exc).__name__}: {exc})") from exc
    finally:
        stream.seek(0)


def build_charge(input_size: int, hidden_size: int, num_layers: int, num_directions: int,
                 dtype, weights: str | None = None) -> tuple[int, str]:
    """(bytes, what they are) that building the engine's model of these sizes from a file's weights
    allocates: the copy of the weights and their packed layout, hidden units padded to 16-unit tiles
    (:func:`gru_fast.model.build_nbytes`).  ``dtype`` is the model's (a name, a numpy dtype or type),
    ``weights`` how it stores W and R ("bfloat16", or None for its dtype).

    A size below 1 charges 0: such weights are malformed, and the GRU's shape checks refuse them before
    they copy or pack anything."""
    from . import model

    what = ("the engine's copy of the weights and their packed layout (hidden size "
            f"{hidden_size} padded to 16-unit tiles)")
    if min(input_size, hidden_size, num_layers, num_directions) < 1:
        return 0, what
    return model.build_nbytes(input_size, hidden_size, num_layers, num_directions, dtype, weights), what


def check_build(what: str, held: int, held_for: str, max_bytes: int, input_size: int, hidden_size: int,
                num_layers: int, num_directions: int, dtype, weights: str | None = None) -> int:
    """Refuse, before the weights are read or converted, a model whose build (:func:`build_charge`) does
    not fit in ``max_bytes`` beside the ``held`` bytes a loader already holds (``held_for`` says what
    they are).  ValueError naming ``what`` is loaded, the bytes it needs, what they are, and the cap.
    Returns the build's bytes."""
    build, built = build_charge(input_size, hidden_size, num_layers, num_directions, dtype, weights)
    if held + build > max_bytes:
        raise ValueError(f"{what} needs {held + build} bytes ({held} for {held_for}, {build} for {built}), "
                         f"over the memory cap max_bytes={max_bytes}; pass a larger max_bytes if the model is "
                         "genuine")
    return build
