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
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import re
import stat
import zipfile

__all__ = ["KINDS", "check_model_file", "check_output_path", "model_file", "name_file", "open_regular_file",
           "sniff"]

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
