"""Numba settings for every gru_fast kernel, kept in one place.

Three process-wide decisions live here:

* the threading layer: GNU OpenMP when it loads, TBB otherwise.  Numba's
  fallback, ``workqueue``, aborts the process when two Python threads launch
  parallel kernels at once; gru_fast never does that whatever the layer
  (:mod:`gru_fast.model` runs one parallel call at a time, others serially);
* the on-disk kernel cache: next to the package when that is writable,
  otherwise a per-user directory (a read-only site-packages must not turn
  every process start into a full compile);
* the decorator flags shared by all kernels.

A user who sets ``NUMBA_THREADING_LAYER`` or ``NUMBA_CACHE_DIR`` keeps the
choice; gru_fast only fills in what was left unset.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = ["JIT", "PARALLEL_JIT", "parallel_threads", "threading_layer"]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gru_fast" / "numba"


def _choose_cache_dir() -> None:
    """Point Numba's cache at a writable place before any kernel is compiled."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    package_cache = Path(__file__).resolve().parent / "__pycache__"
    if _writable(package_cache):
        return  # Numba's default (the package's __pycache__) works.
    fallback = _user_cache_dir()
    if not _writable(fallback):
        fallback = Path(tempfile.gettempdir()) / f"gru_fast-numba-{os.getuid()}"
        fallback.mkdir(parents=True, exist_ok=True)
    warnings.warn(
        f"gru_fast: the package directory is not writable; caching compiled kernels in {fallback}",
        RuntimeWarning,
        stacklevel=3,
    )
    os.environ["NUMBA_CACHE_DIR"] = str(fallback)


_choose_cache_dir()

from numba.core import config as _numba_config  # noqa: E402  (must follow the cache-directory choice)


# ---- cache invalidation -----------------------------------------------------
# Numba checks a cached kernel against its own source file only.  gru_fast's kernels inline code from
# several modules (kernels.py calls _math.py, _tiles.py, _memory.py and takes its flags from this
# file), so after an upgrade that changed, say, _tiles.py alone, a cache written by the old version
# would be loaded as if it were current (seen here: wrong results until the cache was cleared).  The
# locators below stamp every gru_fast kernel with the content of all of those files together.

_KERNEL_SOURCES = ("_config.py", "_jit.py", "_memory.py", "_math.py", "_tiles.py", "kernels.py")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _kernel_sources_stamp() -> bytes:
    digest = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        with open(os.path.join(_PACKAGE_DIR, name), "rb") as source:
            digest.update(source.read())
    return digest.digest()


def _install_cache_locators() -> None:
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    bases = [getattr(caching, name, None) or getattr(caching, "_" + name, None)
             for name in ("UserProvidedCacheLocator", "InTreeCacheLocator")]
    if impl is None or None in bases or not isinstance(getattr(impl, "_locator_classes", None), list):
        return  # another Numba layout: its own per-file stamps apply
    stamp = _kernel_sources_stamp()

    class _Stamped:
        """Only for gru_fast's own modules; stamped with all kernel sources."""

        def get_source_stamp(self):
            return stamp

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != _PACKAGE_DIR:
                return None
            return super().from_function(py_func, py_file)

    locators = [type(f"GruFast{base.__name__.lstrip('_')}", (_Stamped, base), {"__module__": __name__})
                for base in bases]
    impl._locator_classes[:0] = locators


_install_cache_locators()


def kernel_cache_stats() -> dict:
    """Numba's on-disk cache hits / misses over every gru_fast kernel loaded in this process (a miss is a
    compile).  Module-level, so ``distributed.Client.run`` can send it to workers."""
    import sys

    from numba.core.dispatcher import Dispatcher

    hits = misses = 0
    for name, module in list(sys.modules.items()):
        if name == "gru_fast" or name.startswith("gru_fast."):
            for value in vars(module).values():
                if isinstance(value, Dispatcher):
                    hits += sum(value.stats.cache_hits.values())
                    misses += sum(value.stats.cache_misses.values())
    return {"cache_hits": hits, "cache_misses": misses}


def _layer_loads(name: str) -> bool:
    module = {"omp": "omppool", "tbb": "tbbpool", "workqueue": "workqueue"}[name]
    try:
        __import__(f"numba.np.ufunc.{module}")
    except ImportError:
        return False
    return True


def _first_loading(names) -> str:
    return next((name for name in names if _layer_loads(name)), "workqueue")


def _choose_threading_layer() -> str:
    """The concrete layer Numba will load: a user's choice is kept, and resolved as Numba resolves it.

    Numba also accepts the purposes ``safe``, ``threadsafe`` and ``forksafe`` and ``default``; what they
    select decides whether parallel launches must be serialised (``forksafe`` is ``workqueue`` on Linux
    without TBB, because GNU OpenMP is not fork safe).
    """
    requested = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    if requested in ("omp", "tbb", "workqueue"):
        return requested
    if requested == "safe":
        return "tbb"
    if requested == "threadsafe":
        return _first_loading(("tbb", "omp"))
    if requested == "forksafe":
        return _first_loading(("tbb",) if sys.platform.startswith("linux") else ("tbb", "omp"))
    if requested == "default":
        return _first_loading(("tbb", "omp"))
    if requested:
        return requested  # unknown to us: Numba reports it at the first parallel launch
    name = _first_loading(("omp", "tbb"))
    if name != "workqueue":
        _numba_config.THREADING_LAYER = name
    return name


_LAYER = _choose_threading_layer()


def threading_layer() -> str:
    """The Numba threading layer gru_fast asked for (``omp``, ``tbb`` or ``workqueue``)."""
    return _LAYER


# ---- fork -------------------------------------------------------------------
# GNU OpenMP is not fork safe, and Numba's omp layer enforces it: once a process
# has started the layer (the engine asks for the thread count on each call),
# a parallel launch in a child it forks raises SIGTERM.  A pre-fork server
# (gunicorn, multiprocessing's default on Linux) forks exactly such a process.
# In the child, gru_fast therefore runs its serial kernels: the forking thread's
# Numba thread count is set to 1, which makes the engine choose the serial path.
# Threads the child starts later begin with Numba's default count, so the
# engine must ask parallel_threads(), not numba.get_num_threads(), for its
# thread count.  For parallel kernels in forked workers, the documented setting
# is NUMBA_THREADING_LAYER=workqueue (or forksafe; tbb where installed).

_FORKED_FROM_GNU_OPENMP = False


def _gnu_openmp_started() -> bool:
    from numba.np.ufunc import parallel

    if _LAYER != "omp" or not parallel._is_initialized:
        return False
    try:
        from numba.np.ufunc import omppool
    except ImportError:  # pragma: no cover - omp layer unavailable
        return False
    return getattr(omppool, "openmp_vendor", "") == "GNU"


def _after_fork_in_child() -> None:
    global _FORKED_FROM_GNU_OPENMP
    if _FORKED_FROM_GNU_OPENMP or _gnu_openmp_started():
        _FORKED_FROM_GNU_OPENMP = True
        import numba

        numba.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- OpenMP nesting -----------------------------------------------------------
# Starting its omp layer, Numba turns nested parallelism on (omp_set_nested(1): max-active-levels 255)
# for the starting thread.  Any other OpenMP code that shares that libgomp and is called from the same
# thread then nests a team inside each of its own parallel regions: PyTorch imported after the layer
# started (it then binds to the same libgomp) ran nn.GRU 10x slower here (B=64 T=100 H=256: 32 ms ->
# 324 ms).  gru_fast never nests parallel regions, so it puts back OpenMP's default of one active level,
# unless the user asked for nesting through the environment.

def _undo_openmp_nesting() -> None:
    if _LAYER != "omp" or "OMP_MAX_ACTIVE_LEVELS" in os.environ or "OMP_NESTED" in os.environ:
        return
    try:
        import ctypes

        from numba.np.ufunc import omppool

        # a symbol looked up through the pool's own handle resolves in the libgomp the pool uses
        ctypes.CDLL(omppool.__file__).omp_set_max_active_levels(1)
    except (ImportError, OSError, AttributeError):  # pragma: no cover - no GNU/LLVM OpenMP entry point
        pass


_thread_count = None  # Numba's per-thread count, read straight from the threading layer once it is up


def parallel_threads() -> int:
    """Threads a parallel kernel may use in the calling thread: Numba's count, or 1 where a launch is unsafe.

    A launch is unsafe in a process forked from one that started GNU OpenMP (Numba would terminate it).
    ``numba.get_num_threads()`` costs about 0.9 us (it re-checks the layer's start-up under two locks); once
    the layer has started, its C getter answers the same question in about 0.1 us.
    """
    global _thread_count
    if _FORKED_FROM_GNU_OPENMP:
        return 1
    if _thread_count is not None:
        return _thread_count()
    import numba
    from numba.np.ufunc import parallel

    count = numba.get_num_threads()  # starts the layer
    _undo_openmp_nesting()
    getter = getattr(parallel, "_get_num_threads", None)
    _thread_count = getter if callable(getter) else numba.get_num_threads
    return count


# ``cache=True`` everywhere: a cold compile costs about a second per signature,
# a cache hit about 0.2 s.  No fastmath: NaN and Inf must propagate as they do
# in PyTorch, and float64 parity is held to 1e-10.
JIT = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)
PARALLEL_JIT = dict(JIT, parallel=True)
