"""Reading ONNX external tensor data without leaving the model's directory.

An ONNX tensor stored outside the model file names its bytes with ``external_data`` entries
(``location``, ``offset``, ``length``; see ``onnx/external_data_helper.py``).  ``location`` comes from
the file, so a hostile model can point it anywhere: ``/etc/shadow``, ``../../secret``, a symlink or a
hard link planted next to the model, or an offset past the end of a real file.  :func:`read_external`
reads the bytes only when the location is a plain relative path that resolves, after every symlink,
to a regular, singly linked file inside the model's directory, and the byte range lies inside that
file; anything else raises ValueError naming the tensor and the reason.
"""

from __future__ import annotations

import io
import os
import re
import stat

__all__ = ["read_external"]

_DECIMAL = re.compile(r"[0-9]{1,20}")
_DRIVE = re.compile(r"^[A-Za-z]:")


def _entries(tensor, what):
    """``external_data`` as a dict; a key given twice is ambiguous and refused."""
    entries = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise ValueError(f"{what}: external_data key {entry.key!r} appears twice")
        entries[entry.key] = entry.value
    return entries


def _non_negative(entries, key, what):
    value = entries.get(key)
    if value is None or value == "":
        return None
    if not _DECIMAL.fullmatch(value):
        raise ValueError(f"{what}: external_data {key}={value!r} is not a non-negative integer")
    return int(value)


def _checked_location(location, what):
    """The location's path components, or ValueError for anything but a plain relative path."""
    if not location:
        raise ValueError(f"{what}: external data has no location")
    if "\x00" in location:
        raise ValueError(f"{what}: external data location contains a NUL byte")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or _DRIVE.match(location):
        raise ValueError(f"{what}: external data location {location!r} is an absolute path; only paths "
                         "relative to the model's directory are accepted")
    parts = [p for p in re.split(r"[/\\]", location) if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{what}: external data location {location!r} contains a '..' component; only "
                         "files inside the model's directory are accepted")
    if not parts:
        raise ValueError(f"{what}: external data location {location!r} names the model's directory itself")
    return parts


def read_external(tensor, base_dir, expected_nbytes, what):
    """Read the ``expected_nbytes`` bytes of an external tensor stored under ``base_dir``.

    Returns a bytearray of exactly ``expected_nbytes`` bytes.

    Parameters
    ----------
    tensor : onnx.TensorProto
        A tensor with ``data_location == EXTERNAL``.
    base_dir : str or None
        The directory of the model file.  None (a ModelProto given without a path) refuses.
    expected_nbytes : int
        The size implied by the tensor's dims and element type; ``length`` (or, when absent, the rest of
        the file after ``offset``) must equal it.  The caller has already checked it against its memory cap.
    what : str
        How error messages name the tensor.
    """
    entries = _entries(tensor, what)
    location = entries.get("location", "")
    if base_dir is None:
        raise ValueError(f"{what}: the tensor's data lives in an external file ({location!r}) but the model "
                         "was given as a ModelProto, so there is no directory to resolve it in; pass the "
                         "model's path instead")
    parts = _checked_location(location, what)
    offset = _non_negative(entries, "offset", what) or 0
    length = _non_negative(entries, "length", what)

    root = os.path.realpath(base_dir)
    target = os.path.realpath(os.path.join(root, *parts))
    try:
        inside = os.path.commonpath([root, target]) == root and target != root
    except ValueError:  # different drives on Windows
        inside = False
    if not inside:
        raise ValueError(f"{what}: external data location {location!r} resolves to {target!r}, outside the "
                         f"model's directory {root!r} (a symlink?)")

    # O_NOFOLLOW: the last component cannot be swapped for a symlink after the check above;
    # O_NONBLOCK: a FIFO planted as the data file cannot hang the open (it is refused just below).
    flags = os.O_RDONLY
    for name in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, name, 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise ValueError(f"{what}: cannot open external data file {location!r}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what}: external data location {location!r} is not a regular file")
        if info.st_nlink > 1:
            raise ValueError(f"{what}: external data file {location!r} has {info.st_nlink} hard links; a hard "
                             "link may point at a file outside the model's directory, so it is refused")
        size = info.st_size
        if offset > size:
            raise ValueError(f"{what}: external data offset {offset} is past the end of {location!r} "
                             f"({size} bytes)")
        if length is None:
            length = size - offset
        if offset + length > size:
            raise ValueError(f"{what}: external data range offset={offset} length={length} runs past the end "
                             f"of {location!r} ({size} bytes)")
        if length != expected_nbytes:
            raise ValueError(f"{what}: external data length {length} does not match the tensor's shape and "
                             f"type ({expected_nbytes} bytes)")
        buffer = bytearray(length)  # read in place: no second copy of a large tensor
        view = memoryview(buffer)
        with io.FileIO(fd, "rb", closefd=False) as stream:
            stream.seek(offset)
            filled = 0
            while filled < length:
                got = stream.readinto(view[filled:])
                if not got:
                    raise ValueError(f"{what}: external data file {location!r} ended early (changed while "
                                     "reading?)")
                filled += got
        view.release()
        return buffer
    finally:
        os.close(fd)
