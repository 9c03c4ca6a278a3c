"""Where gru_fast's compiled kernels are cached on disk, and how a cached kernel is checked.

Numba keeps a compiled kernel as pickles (an index ``.nbi`` and data ``.nbc`` files) and unpickles what it
finds in the cache directory, so whoever can write that directory runs code in every process that loads
gru_fast's kernels.  One directory is chosen when gru_fast is imported, before any kernel is decorated:

1. ``NUMBA_CACHE_DIR`` when it is set and writable: the user's choice, kept as Numba lays it out;
2. the package's ``__pycache__`` when writable (Numba's default; whoever can write there can also replace
   the package's own code and bytecode, so it is trusted as Python trusts it);
3. ``$XDG_CACHE_HOME/gru_fast/numba`` (default ``~/.cache/gru_fast/numba``), then
   ``<tempdir>/gru_fast-numba-<uid>``, each only when it is private (:func:`_not_private`); what is missing
   is created with mode 0o700;
4. nowhere: the kernels are decorated with ``cache=False`` and compile in each process.

A ``RuntimeWarning`` names the choice whenever it is not 1 or 2, and says why each place before it was
passed over.  The choice never makes ``import gru_fast`` fail.

Numba checks a cached kernel against its own source file only.  gru_fast's kernels inline code from
several modules (kernels.py calls _math.py, _tiles.py and _memory.py and takes its flags from _config.py),
so a cache written by another version that changed, say, _tiles.py alone would be loaded as current.  The
one locator below serves every gru_fast kernel, wherever it is cached, and stamps it with the content of
all of those files together; Numba's own locators (which stamp per file, and fall back to Numba's
user-wide cache) never see a gru_fast kernel.  Where that locator cannot be installed, caching is off.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import warnings

__all__ = ["CACHE_PATH", "kernel_cache_dir", "kernel_cache_stats"]

_KERNEL_SOURCES = ("_config.py", "_jit.py", "_layout.py", "_memory.py", "_math.py", "_tiles.py", "kernels.py")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _kernel_sources_stamp() -> bytes:
    digest = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        with open(os.path.join(_PACKAGE_DIR, name), "rb") as source:
            digest.update(source.read())
    return digest.digest()


# ---- choosing the directory --------------------------------------------------------------------------

def _writable(directory: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def _make_dirs(path: str, mode: int) -> None:
    """Create ``path`` and its missing parents with ``mode`` (less the umask); existing ones are kept."""
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass


def _not_private(path: str) -> str | None:
    """Why another user could write into ``path`` or swap it for a directory of theirs; None if neither.

    Private: ``path`` resolves to a directory owned by this user and writable by nobody else, and every
    parent is owned by this user or root and writable by nobody else, unless sticky (as /tmp is: there
    nobody may rename or delete another user's entry).
    """
    uid = os.getuid()
    real = os.path.realpath(path)
    info = os.stat(real)
    if not stat.S_ISDIR(info.st_mode):
        return f"{real} is not a directory"
    if info.st_uid != uid:
        return f"{real} belongs to uid {info.st_uid}, not to this user (uid {uid})"
    if info.st_mode & 0o022:
        return f"{real} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    parent = os.path.dirname(real)
    while True:
        info = os.stat(parent)
        if info.st_uid not in (uid, 0):
            return f"its parent {parent} belongs to uid {info.st_uid}"
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return f"its parent {parent} is writable by other users and not sticky"
        if os.path.dirname(parent) == parent:
            return None
        parent = os.path.dirname(parent)


def _subpath() -> str:
    """The package's directory below a shared cache root, laid out as Numba lays out ``NUMBA_CACHE_DIR``
    (``<dir name>_<sha1 of its path>``), so two installs sharing one root never share a kernel file."""
    return "_".join([os.path.basename(_PACKAGE_DIR), hashlib.sha1(_PACKAGE_DIR.encode()).hexdigest()])


def _user_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gru_fast", "numba")


def _made_writable(path: str) -> bool:
    """Whether ``path`` is (created if missing, then) a directory this process can write: for places the
    user chose or that only the package's owner can write, where ownership is not checked."""
    try:
        _make_dirs(path, 0o777)
    except OSError:
        pass
    return _writable(path)


def _choose_cache_path() -> tuple[str | None, list[str]]:
    """The directory gru_fast's kernels are cached in (None: not cached) and why each place before it was
    passed over."""
    passed = []
    user = os.environ.get("NUMBA_CACHE_DIR")
    if user:
        path = os.path.join(os.path.abspath(user), _subpath())
        if _made_writable(path):
            return path, passed
        passed.append(f"NUMBA_CACHE_DIR={user} is not writable")
    path = os.path.join(_PACKAGE_DIR, "__pycache__")
    if _made_writable(path):
        return path, passed
    passed.append(f"the package directory {_PACKAGE_DIR} is not writable")
    if not hasattr(os, "getuid"):  # no owners to check: per-user places only
        return None, passed
    for root in (_user_cache_root(), os.path.join(tempfile.gettempdir(), f"gru_fast-numba-{os.getuid()}")):
        try:
            _make_dirs(root, 0o700)
            why = _not_private(root)
            if why is None:
                path = os.path.join(os.path.realpath(root), _subpath())  # resolved and checked: no link in it
                _make_dirs(path, 0o700)
                why = _not_private(path) or (None if _writable(path) else f"{path} is not writable")
        except OSError as error:
            why = f"it cannot be created or inspected ({error.strerror})"
        if why is None:
            return path, passed
        passed.append(f"{root} is not used: {why}")
    return None, passed


# ---- the stamped locator -----------------------------------------------------------------------------

def _install_locator(path: str) -> str | None:
    """Put gru_fast's locator first in Numba's list; why it could not be, or None."""
    from numba.core import caching
    from numba.core import config as numba_config

    if getattr(numba_config, "CACHE_LOCATOR_CLASSES", ""):
        return "NUMBA_CACHE_LOCATOR_CLASSES replaces the locators gru_fast stamps its kernels with"
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    base = getattr(caching, "_CacheLocator", None)
    if impl is None or base is None or not isinstance(getattr(impl, "_locator_classes", None), list):
        return f"this Numba ({getattr(caching, '__file__', '?')}) has no locator list gru_fast can extend"
    stamp = _kernel_sources_stamp()

    class GruFastCacheLocator(base):
        """Every function defined in gru_fast's package: cached in ``path``, stamped with all kernel
        sources.  ``path`` was checked when gru_fast was imported, just before its kernels were decorated,
        so a gru_fast kernel never falls through to Numba's other locators."""

        def __init__(self, py_func, py_file):
            self._lineno = py_func.__code__.co_firstlineno

        def get_cache_path(self):
            return path

        def get_source_stamp(self):
            return stamp

        def get_disambiguator(self):
            return str(self._lineno)

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _PACKAGE_DIR:
                return None
            return cls(py_func, py_file)

    impl._locator_classes.insert(0, GruFastCacheLocator)
    return None


def _configure() -> str | None:
    path, passed = _choose_cache_path()
    if path is not None:
        why = _install_locator(path)
        if why is not None:
            passed.append(why)
            path = None
    if passed:
        choice = (f"caching compiled kernels in {path}" if path is not None else
                  "compiled kernels are not cached (each process compiles them again); set NUMBA_CACHE_DIR "
                  "to a writable directory only you can write")
        warnings.warn(f"gru_fast: {'; '.join(passed)}; {choice}", RuntimeWarning, stacklevel=2)
    return path


CACHE_PATH = _configure()  # None: kernels are decorated with cache=False


def kernel_cache_dir() -> str | None:
    """The directory gru_fast's compiled kernels are cached in, or None when they are not cached."""
    return CACHE_PATH


def kernel_cache_stats() -> dict:
    """Numba's on-disk cache hits / misses over every gru_fast kernel loaded in this process (a miss is a
    compile).  Module-level, so ``distributed.Client.run`` can send it to workers."""
    import sys

    from numba.core.dispatcher import Dispatcher

    dispatchers = {}
    for name, module in list(sys.modules.items()):
        if name == "gru_fast" or name.startswith("gru_fast."):
            for value in vars(module).values():
                for candidate in value.values() if isinstance(value, dict) else (value,):  # kernels.FORWARD
                    if isinstance(candidate, Dispatcher):
                        dispatchers[id(candidate)] = candidate
    hits = sum(sum(d.stats.cache_hits.values()) for d in dispatchers.values())
    misses = sum(sum(d.stats.cache_misses.values()) for d in dispatchers.values())
    return {"cache_hits": hits, "cache_misses": misses}
