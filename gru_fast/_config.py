"""Numba settings for every gru_fast kernel, kept in one place.

Process-wide decisions live here:

* the threading layer: GNU OpenMP when it loads, TBB otherwise.  Numba's
  fallback, ``workqueue``, aborts the process when two Python threads launch
  parallel kernels at once; gru_fast never does that itself whatever the layer
  (:mod:`gru_fast._schedule` runs one parallel call at a time, others serially),
  but it cannot stop the application's own parallel Numba code from doing it,
  so it warns once when it finds workqueue in use;
* the OpenMP state of the thread that starts Numba's omp layer, put back as it
  was (other libraries sharing the OpenMP runtime read it);
* what a forked child may launch;
* the thread count a user sets for gru_fast (:func:`set_num_threads`), in every thread;
* the decorator flags shared by all kernels, caching included
  (:mod:`gru_fast._cache` chooses where, or whether, kernels are cached).

A user who sets ``NUMBA_THREADING_LAYER`` keeps the choice; gru_fast only
fills in what was left unset.
"""

from __future__ import annotations

import contextlib
import operator
import os
import sys
import warnings

from numba.core import config as _numba_config

from . import _cache

__all__ = ["JIT", "PARALLEL_JIT", "get_num_threads", "parallel_threads", "set_num_threads", "threading_layer",
           "threads"]


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
# thread count.  For parallel kernels in worker processes, the README advises
# the spawn or forkserver start method, or the tbb layer where TBB is installed.

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


# ---- OpenMP state of the starting thread -------------------------------------------------------
# Starting its omp layer, Numba calls omp_set_num_threads(NUMBA_NUM_THREADS) and omp_set_nested(1)
# (max-active-levels 255) in the starting thread.  Other OpenMP code sharing that runtime and called from
# the same thread reads both: PyTorch then ran one thread under NUMBA_NUM_THREADS=1 (nn.GRU B=64 T=100
# H=256: 32 -> 52 ms), and nested a team inside each of its own parallel regions (32 -> 324 ms).  Numba's
# own launches name their team size explicitly and never nest in gru_fast, so gru_fast reads those ICVs
# before it starts the layer and puts them back after.  If the application started the layer, the values
# before are unknown; gru_fast then puts back OpenMP's default of one active level, unless the user asked
# for nesting through the environment.
#
# Which runtime the pool calls: its omp_* symbols bind to a definition already in the process's global
# scope (torch loads its own libgomp that way when imported first), else to the libgomp the pool links.
# Both are adjusted; in the one the pool does not use, the values written are the values read.

_OPENMP_ICVS = (("omp_get_max_threads", "omp_set_num_threads"), ("omp_get_nested", "omp_set_nested"),
                ("omp_get_max_active_levels", "omp_set_max_active_levels"))


def _openmp_runtimes() -> list:
    try:
        import ctypes

        from numba.np.ufunc import omppool

        handles = [ctypes.CDLL(None), ctypes.CDLL(omppool.__file__)]
    except (ImportError, OSError):  # pragma: no cover - no omp layer
        return []
    return [handle for handle in handles if all(hasattr(handle, name) for pair in _OPENMP_ICVS for name in pair)]


def _read_openmp_state(runtimes) -> list:
    return [(runtime, [getattr(runtime, get)() for get, _ in _OPENMP_ICVS]) for runtime in runtimes]


def _write_openmp_state(state) -> None:
    for runtime, values in state:
        for (_, set_), value in zip(_OPENMP_ICVS, values):
            getattr(runtime, set_)(value)


def _undo_openmp_nesting(runtimes) -> None:
    if "OMP_MAX_ACTIVE_LEVELS" in os.environ or "OMP_NESTED" in os.environ:
        return
    for runtime in runtimes:
        runtime.omp_set_max_active_levels(1)


_WORKQUEUE_WARNING = (
    "gru_fast: Numba's threading layer is 'workqueue', which aborts the process (SIGABRT) when two threads "
    "launch parallel Numba code at the same time.  gru_fast launches one parallel kernel at a time, but a "
    "parallel Numba function of the application running in another thread meanwhile aborts the process.  "
    "The 'omp' layer (GNU OpenMP, gru_fast's default) and 'tbb' take concurrent launches; see the README "
    "(Reliability: fork / spawn) for worker processes.")


_warned_workqueue = False


def _first_frame_outside_gru_fast() -> int:
    """The ``stacklevel`` that points a warning raised by its caller at the application's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "gru_fast":
        frame, level = frame.f_back, level + 1
    return level


def _start_layer() -> int:
    """Start Numba's threading layer from the calling thread, leave that thread's OpenMP state as it was,
    and warn once if the layer is workqueue.  Returns Numba's thread count for this thread."""
    import numba
    from numba.np.ufunc import parallel

    global _warned_workqueue
    started_here = not parallel._is_initialized
    runtimes = _openmp_runtimes() if _LAYER == "omp" else []
    before = _read_openmp_state(runtimes) if started_here else None
    count = numba.get_num_threads()  # starts the layer
    layer = numba.threading_layer()
    if layer == "omp":
        if before is not None:
            _write_openmp_state(before)
        else:
            _undo_openmp_nesting(runtimes)
    elif layer == "workqueue" and not _warned_workqueue:
        _warned_workqueue = True
        warnings.warn(_WORKQUEUE_WARNING, RuntimeWarning, stacklevel=_first_frame_outside_gru_fast())
    return count


_thread_count = None  # Numba's per-thread count, read straight from the threading layer once it is up

# ---- the thread count a user sets -----------------------------------------------------------------
# Numba's count is per calling thread: numba.set_num_threads(n) in one thread leaves every other thread on
# NUMBA_NUM_THREADS.  gru_fast.set_num_threads(n) is process-wide instead, as torch.set_num_threads is:
# _requested_threads holds n (0: none set), and parallel_threads() -- which every parallel-sized call asks
# first -- sets Numba's count of the calling thread to n whenever it differs, so a thread's next call runs
# n workers whichever thread set it.  A binding (GRU.bind, Stream.bind) plans its call when it is made,
# with the count then in force.


_requested_threads = 0


def parallel_threads() -> int:
    """Threads a parallel kernel may use in the calling thread: the count set by :func:`set_num_threads`,
    else Numba's count of this thread; 1 where a launch is unsafe.

    A launch is unsafe in a process forked from one that started GNU OpenMP (Numba would terminate it).
    ``numba.get_num_threads()`` costs about 0.9 us (it re-checks the layer's start-up under two locks); once
    the layer has started, its C getter answers the same question in about 0.1 us.  The first call starts
    the layer (:func:`_start_layer`).  With a count set, Numba's count of the calling thread is set to it
    where it differs (Numba sizes a launch's team by the launching thread's count).
    """
    global _thread_count
    if _FORKED_FROM_GNU_OPENMP:
        return 1
    if _thread_count is None:
        import numba
        from numba.np.ufunc import parallel

        _start_layer()
        getter = getattr(parallel, "_get_num_threads", None)
        _thread_count = getter if callable(getter) else numba.get_num_threads
    count = _thread_count()
    requested = _requested_threads
    if requested and count != requested:
        import numba

        numba.set_num_threads(requested)
        return requested
    return count


def _checked_thread_count(n) -> int:
    if isinstance(n, bool):
        raise TypeError(f"n must be an int (the number of threads), got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int (the number of threads), got {type(n).__name__} {n!r}") from None
    limit = _numba_config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"n must be between 1 and NUMBA_NUM_THREADS={limit} (the threads Numba starts; set the "
                         f"NUMBA_NUM_THREADS environment variable before the first import for more), got {n}")
    return n


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for gru_fast's parallel calls, in every thread of the process.

    Process-wide, like ``torch.set_num_threads``: the count holds for calls made from any thread, now or
    later (Numba's own ``numba.set_num_threads`` only changes the calling thread; gru_fast sets Numba's
    count of each thread that calls a model to ``n``, so a ``numba.set_num_threads`` in that thread no
    longer changes gru_fast's count).  ``n`` is an int from 1 to ``NUMBA_NUM_THREADS``
    (``numba.config.NUMBA_NUM_THREADS``, the threads Numba starts): ValueError outside that range,
    TypeError for anything but an int.  Bindings made before keep the count they were planned with.

    Starting Numba's threading layer here leaves the OpenMP state of this thread as it was, which
    ``numba.set_num_threads`` called first does not do: it turns OpenMP nesting on, and PyTorch's parallel
    regions run from the same thread then nest a team each (10x slower; README, Reliability).  In a
    process forked from one that started GNU OpenMP, calls still run serially (README, fork / spawn).
    """
    global _requested_threads
    n = _checked_thread_count(n)
    _requested_threads = n
    if not _FORKED_FROM_GNU_OPENMP:
        parallel_threads()  # starts the layer with the OpenMP state kept, then sets this thread's count


def get_num_threads() -> int:
    """The threads a parallel gru_fast call made now from the calling thread may use: the count set by
    :func:`set_num_threads`, else Numba's count of this thread (``NUMBA_NUM_THREADS`` unless changed); 1 in
    a process forked from one that started GNU OpenMP.  Starts Numba's threading layer as a call would."""
    if _FORKED_FROM_GNU_OPENMP:
        return 1
    return _requested_threads or parallel_threads()


@contextlib.contextmanager
def threads(n: int):
    """``with gru_fast.threads(n):`` -- :func:`set_num_threads` for the block, then the count before it back.

    The count is process-wide, so the block changes it for every thread while it runs: meant for scripts
    and benchmarks, not for limits per request in a threaded server.  On leaving, Numba's count of the
    calling thread is put back as well."""
    global _requested_threads
    n = _checked_thread_count(n)
    previous_requested = _requested_threads
    previous_own = get_num_threads()
    set_num_threads(n)
    try:
        yield n
    finally:
        _requested_threads = previous_requested
        if not _FORKED_FROM_GNU_OPENMP:
            import numba

            numba.set_num_threads(previous_requested or previous_own)


# Cached wherever gru_fast._cache found a place (a cold compile costs about a
# second per signature, a cache hit about 0.2 s), else not at all.  No fastmath:
# NaN and Inf must propagate as they do in PyTorch, and float64 parity is held
# to 1e-10.
JIT = dict(cache=_cache.CACHE_PATH is not None, nogil=True, error_model="numpy", boundscheck=False)
PARALLEL_JIT = dict(JIT, parallel=True)
