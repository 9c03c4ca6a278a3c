"""What a first use compiles, how the user hears about it, and how to do it ahead of time.

The engine has six entry points, (float32 | float64 | bfloat16 weights) x (serial | parallel)
(:data:`gru_fast.kernels.FORWARD`);
each compiles on its first call in a process with an empty kernel cache, and later processes load it from
the cache in a fraction of a second.  A compile takes seconds, so:

* when one starts, a one-line notice goes to stderr at once, saying what is compiled and about how long
  it takes (set ``GRU_FAST_COMPILE_NOTICE=0`` to silence it).  Loads from the cache print nothing;
* :func:`warmup` (``gru-fast warmup [MODEL]``) compiles the entry points a model needs, or all four,
  ahead of time: for Dockerfiles, CI images and workers that should answer their first request quickly.
"""

from __future__ import annotations

import os
import sys
import threading
from time import perf_counter

from numba.core import event, types

from . import kernels

__all__ = ["warmup", "ENTRY_SECONDS"]

# About how long each entry point takes to compile on an empty cache, measured on the project's 2-core
# machine with `NUMBA_CACHE_DIR=$(mktemp -d)`, the serial one first: (weights, parallel) -> seconds.  Only
# for the notice.  A parallel entry point compiled first also compiles what it shares with the serial one.
ENTRY_SECONDS = {("float32", False): 16, ("float64", False): 15, ("bfloat16", False): 16,
                 ("float32", True): 12, ("float64", True): 12, ("bfloat16", True): 15}

_ENTRY_SIGNATURE = (types.int64,)  # an entry point takes the address of its argument block (see kernels)
_ENTRIES = {id(dispatcher): key for key, dispatcher in kernels.FORWARD.items()}


def _describe(key) -> str:
    weights, parallel = key
    kind = "bfloat16-weight" if weights == "bfloat16" else weights
    return f"{kind} {'parallel' if parallel else 'serial'}"


class _CompileNotice(event.Listener):
    """Prints one line when an entry point starts compiling (nested kernel compiles stay silent)."""

    def __init__(self):
        self.serial_compiled = set()  # weights whose serial entry point this process compiled

    def on_start(self, ev):
        key = _ENTRIES.get(id(ev.data["dispatcher"]))
        if key is None:
            return
        weights, parallel = key
        seconds = ENTRY_SECONDS[key]
        if not parallel:
            self.serial_compiled.add(weights)
        elif weights not in self.serial_compiled:
            seconds += ENTRY_SECONDS[weights, False]  # the parts shared with the serial entry point too
        if os.environ.get("GRU_FAST_COMPILE_NOTICE", "1") == "0":
            return
        where = ev.data["dispatcher"].stats.cache_path or "nowhere: caching is off"
        print(f"gru_fast: compiling the {_describe(key)} kernels for this machine (about {seconds} s, "
              f"once: later runs load them from {where}; `gru-fast warmup` does it ahead of time)",
              file=sys.stderr, flush=True)

    def on_end(self, ev):
        pass


event.register("numba:compile", _CompileNotice())

_LOCK = threading.Lock()


def warmup(model=None, *, parallel: bool | None = None) -> list[dict]:
    """Compile (or load from the kernel cache) the entry points ``model`` needs, or all six.

    Parameters
    ----------
    model : gru_fast.GRU, optional
        Compile for how this model stores its weights only (``model.weights``); without it, for float32,
        float64 and bfloat16 weights.
    parallel : bool, optional
        Only the serial (False) or parallel (True) entry points; both by default.

    Returns one dict per entry point: ``weights``, ``parallel``, ``seconds`` and ``source`` ("compiled",
    "cache" or "memory": already loaded in this process).  Nothing runs: the kernels are compiled for
    their signature (one integer).
    """
    kinds = list(kernels.WEIGHTS) if model is None else [model.weights]
    modes = [False, True] if parallel is None else [bool(parallel)]
    done = []
    with _LOCK:
        for weights in kinds:
            for mode in modes:
                dispatcher = kernels.FORWARD[weights, mode]
                loaded = _ENTRY_SIGNATURE in dispatcher.overloads
                misses = sum(dispatcher.stats.cache_misses.values())
                start = perf_counter()
                dispatcher.compile(_ENTRY_SIGNATURE)
                compiled = sum(dispatcher.stats.cache_misses.values()) > misses
                source = "memory" if loaded else "compiled" if compiled else "cache"
                done.append(dict(weights=weights, parallel=mode, seconds=perf_counter() - start, source=source))
    return done
