"""How a model call runs: how many threads share it and how, its workspace, its launch.

* :class:`KernelModel`: a model as the scheduler sees it (its packed weights and their addresses, the sizes
  a plan is chosen from);
* :class:`Operands`: one call's arrays as the forward entry point reads them (addresses and sizes);
* :func:`make_plan`: how one (steps, batch, threads) shape is shared between threads -- rows or split
  hidden units (see :mod:`gru_fast.kernels`), chunks, workers, steps per projected block -- with its
  workspace and synchronisation arrays;
* the plan pool (:data:`PLANS`): idle plans kept between calls, bounded in bytes;
* the parallel policy (:data:`PARALLEL`): whether a parallel plan may launch now;
* :func:`run` (one call), :class:`ShapeRunner` (calls of one shape that take turns: a stream's steps) and
  :func:`bind` (a call run again and again on the same arrays): the only places that launch
  ``kernels.FORWARD``;
* :class:`Guard`: every lock gru_fast owns, renewed in a forked child.

Serial and parallel runs give bit-identical results, so everything here decides speed and memory only.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import struct
import threading
import weakref
from time import perf_counter
from typing import NamedTuple, Sequence

import numpy as np

from . import _layout, kernels
from ._config import parallel_threads
from ._memory import address

# Below this much work (multiply-adds per call) a parallel region costs more than it saves: a launch
# is about 1.5 us with the workers awake, 40-70 us when they have gone to sleep.
_PARALLEL_MIN_MACS = 1 << 18
# Splitting one sequence's hidden units between threads (MODE_SPLIT) costs a cross-core handshake per
# layer and step (about 0.3 us): worth it from this many multiply-adds per row, layer and step.  Measured
# here, T=1000 I=40, one row, 2 threads: H=128 (64.5K) split 1,940 us vs serial 2,640 us; H=96 (39K) split
# 1,844 vs 1,657; a 2-layer H=64 model (19K) split 235 vs 124.
_SPLIT_MIN_MACS_PER_LAYER_STEP = 48 << 10
# With exactly one row per thread, rows mode runs one-row products (the L2 cache's rate) with no handshake,
# a split two-row products over half the weights: the split wins from about this many multiply-adds per
# row, layer and step.  Measured here, B=2 T=200 I=64, 2 threads, rows vs split, best of 7: H=128 (74K)
# 794 vs 755 us (medians 806 vs 967), H=192 (147K) 1,459 vs 1,324, H=256 (246K) 2,613 vs 2,049.
_SPLIT_ONE_ROW_MIN_MACS = 128 << 10
# One row per thread: in MODE_ROWS every thread reads a layer's whole W and R; past this many bytes they no
# longer stay in a core's L2 (2 MiB here, shared with everything else) and a split is faster, where each
# thread reads its share, however small a row's work.  Measured here, T=200 I=64, B=2 H=384 (1.8 MiB), rows
# vs split: 6,446 vs 3,731 us.
_ROWS_MAX_LAYER_WEIGHT_BYTES = 1 << 20
# Three or four rows per thread: MODE_ROWS runs four-row products over all of R every step (float32: the
# L2 cache's rate for four rows, 60 GMAC/s a core at H=256), a split eight-row products over half of R
# (compute-bound, about 80) plus a handshake per step (a fifth of a B=6 H=128 step spent waiting).  The
# input projection runs in blocks of steps in both, reading W once a block, so R decides, whatever I: a
# split wins past this many bytes of R in the arithmetic's dtype (bfloat16 weights are widened to float32
# and their products cost float32's time).  Measured here, 2 threads, rows vs split, float32: T=200 I=64
# B=8 H=256 (0.75 MiB) 4,469 vs 5,331 us, H=320 (1.2 MiB) 8,261 vs 7,469, H=384 11,491 vs 9,052; B=6
# H=128 1,004 vs 1,281, H=256 3,114 vs 3,409, H=320 7,686 vs 6,392, H=384 11,851 vs 8,315; B=5 H=128 986
# vs 1,192; B=7 H=256 3,474 vs 3,886; T=100 I=128 B=8 H=256, three runs: 3,597 vs 3,688, 1,990 vs 2,236,
# 2,340 vs 2,769; T=100 I=256 B=8 H=256 3,636 vs 3,799, B=6 3,220 vs 3,508, T=200 B=8 H=288 (0.95 MiB)
# 6,016 vs 6,294.  bfloat16, T=200 I=64 B=8: H=320 9,864 vs 9,545, H=384 13,618 vs 12,971.  float64
# (1.5 MiB at H=256), T=200 I=64 B=8: H=192 12,685 vs 13,465, H=256 21,109 vs 19,438.
_ROWS_MAX_RECURRENT_BYTES = 1 << 20
# Two rows per thread run two-row products (the L2 cache's rate for two rows: 32-36 GMAC/s a core here) in
# MODE_ROWS, a split's all rows at once over half the weights: rows win only below this many bytes of a
# layer's weights.  Measured here, B=4 T=200 I=64, rows vs split: H=96 520 vs 639 us, H=128 (0.28 MiB) 749
# vs 887, H=192 (0.56 MiB) 1,387 vs 1,420, H=256 (0.94 MiB) 2,277 vs 2,177, H=320 4,672 vs 4,016.
_ROWS_TWO_MAX_LAYER_WEIGHT_BYTES = 3 << 18
# Projected inputs of a block of steps are computed ahead of the recurrence; a block holds about this
# many floats per worker (128 KiB in float32, well inside the 1 MiB L2 beside the weights).
_BLOCK_FLOATS = 1 << 15
# A call shorter than this many multiply-adds (~0.1 ms) runs in parallel only while calls come back to
# back: a parallel launch costs ~1.5 us while the workers still spin after the previous one, 40-70 us
# once they have gone to sleep (a few ms here), more than such a call saves.
_BRIEF_MACS = 1 << 22
_BACK_TO_BACK_S = 0.002
# What the engine keeps between calls: idle plans (workspaces), shared by every thread and model.  A call
# takes a plan of its shape from the pool (or makes one) and gives it back after the kernel ran; at most
# _PLAN_CACHE_BYTES stay idle in the process, least recently used given up first, and a plan larger than
# _PLAN_KEEP_MAX_BYTES is freed after its call (allocating it costs little next to the call that needs it:
# its workspace holds the sequences of the layers between the first and the last, 2 * T*B*D*H values).
_PLAN_CACHE_BYTES = 64 << 20
_PLAN_KEEP_MAX_BYTES = 16 << 20


# ---- locks -------------------------------------------------------------------------------------------

_GUARDS: weakref.WeakSet = weakref.WeakSet()


class Guard:
    """Owner of one of gru_fast's locks (``with guard.lock:``), which a forked child gets back free.

    In a child forked while another thread held the lock (stepping a shared stream, running a bound call,
    a parallel launch, the plan pool), it would stay held forever: the thread holding it does not exist
    in the child.  So every guard's lock is replaced by a free one in the child.  A stream forked in the
    middle of a step keeps the state from before that step (a step writes the other state buffer and
    switches to it only when it is done).
    """

    __slots__ = ("lock", "__weakref__")

    def __init__(self):
        self.lock = threading.Lock()
        _GUARDS.add(self)


def _renew_locks_in_child() -> None:
    for guard in list(_GUARDS):
        guard.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks_in_child)


# ---- what a plan is made of --------------------------------------------------------------------------

_MODEL_TOKENS = itertools.count()


class KernelModel(NamedTuple):
    """A model as the forward entry point and the planner see it (built by :func:`kernel_model`).  It holds
    the packed weights, so whatever launches with it keeps them alive, the model itself gone or not."""

    dtype: np.dtype  # of the arithmetic, inputs, outputs and workspace
    weights: str  # how W and R are stored: its forward entry points' key in kernels.FORWARD
    params: np.ndarray  # the packed weights (see gru_fast._layout)
    meta: np.ndarray
    params_addr: int
    n_params: int
    meta_addr: int
    hidden: int
    directions: int
    layers: int
    linear_before_reset: bool
    macs_per_step: int  # multiply-adds of one time step of one sequence, every layer and direction
    token: int  # its plans' key in the plan pool


def kernel_model(params: np.ndarray, meta: np.ndarray, input_size: int, hidden: int, directions: int,
                 layers: int, linear_before_reset: bool, weights: str) -> KernelModel:
    """The :class:`KernelModel` of packed ``params`` and ``meta``; its model calls :func:`drop_plans` with
    its token when it is gone."""
    H, D = hidden, directions
    macs_per_step = D * 3 * H * ((input_size + H) + (layers - 1) * (D * H + H))
    return KernelModel(params.dtype, weights, params, meta, address(params), params.size, address(meta), H, D, layers,
                       bool(linear_before_reset), macs_per_step, next(_MODEL_TOKENS))


class Operands(NamedTuple):
    """One call's arrays as the forward entry point reads them: the per-call fields of its argument block,
    in their order (see :func:`argument_block`); an absent h0 or lengths has address 0."""

    x: int
    steps: int
    batch: int
    batch_major: int  # 0 or 1: (B, T, I) x and y
    h0: int
    lengths: int
    y: int
    h_n: int


assert Operands._fields == _layout.ARGS[_layout.ARG_X : _layout.ARG_X + len(Operands._fields)]
_OPERANDS = struct.Struct(f"={len(Operands._fields)}q")  # written into a plan's argument block by run()


class Plan(NamedTuple):
    """How one (steps, batch, threads) shape runs, with its workspace (see gru_fast.kernels)."""

    parallel: bool
    brief: bool  # under _BRIEF_MACS multiply-adds
    mode: int
    chunks: int
    block_steps: int
    workers: int
    workspace: np.ndarray
    sync: np.ndarray
    workspace_addr: int
    sync_addr: int
    nbytes: int  # of workspace and sync
    args: np.ndarray  # the argument block of run()'s calls: model and plan fields set, operands written per call
    args_addr: int
    key: tuple | None  # where the plan pool files it; None for a bound call's own plans
    pace: "Pace | None"  # a parallel plan's recent times against its serial path's (None when serial)


class Pace:
    """Whether a parallel plan still beats its own serial path, from the times of recent calls of its shape.

    A parallel call needs every worker on a core: the kernel hands a late worker's share of a step to
    the other one, but the parallel region itself ends only when each worker thread has run, and on a
    busy machine (a neighbour spinning on the other core) a thread can wait a whole scheduler time slice,
    milliseconds, for its core.  Serial and parallel runs give identical results, so the plan runs
    serially while its parallel calls cost more than its serial ones would:

    * the serial cost is the best of the last four serial calls: the plan's ``CALIBRATE``-th call and
      the next (``CALIBRATIONS`` in all) run serially to have two, so that a hiccup of the host in one
      does not set the cost (while the plan is parallel no serial call refreshes it).  A *cold* call is
      not counted: a brief call after a pause runs serially (:class:`_ParallelPolicy`) and finds its
      weights out of cache (125-215 us for a streaming step of B=1 I=H=256 that takes 17-30 us warm).
      Before any serial call, ``workers`` x the fastest parallel call stands in.  It is no bound: a
      core's share of the weights may fit its L2 cache where all of them do not, and the host's speed
      drifts.  In one phase of the host that step ran 14-17 us in parallel and 28-30 serially; taken as
      a bound, twice its fastest parallel call (10.4 us, in a faster phase) put the serial cost at 20.8
      us, and windows of parallel calls with two or three hiccups of the host (trimmed means of 23-28
      us) turned it serial ten times in 15 rounds of the benchmark's batches (6-48 % of its calls
      serial, at twice the time, in four runs).  The measured serial call also judges stalls sooner
      than the stand-in (B=1 T=100 H=256: 0.95 ms against 1.3; with the stand-in, beside a busy
      neighbour the plan ran 76 parallel calls, a fifth of them stalled 4 ms, before turning serial);
    * the plan turns serial when the mean of its last ``WINDOW`` parallel times, less the slowest
      ``TRIM`` (a lone stall on an idle machine is not a trend), exceeds ``SLOWER`` x that cost, judged
      every ``CHECK_EVERY`` calls from the ``CHECK_EVERY``-th on (beside a busy neighbour the first
      parallel calls of a millisecond-long shape each waited about 4 ms, and every one of them counts
      against the calls' 99th percentile; still the mean decides, not a count of such stalls: another
      engine's thread pool spinning on beside it stalls a few calls in a row, and turning serial on two
      stalls kept a B=8 call serial, 4.9 ms against 2.9, in most of the benchmark's interleaved
      rounds).  Not counted are the first call's time (thread start-up, cache loads) and, while
      parallel, that of a call after a pause of over _BACK_TO_BACK_S (the workers were asleep: a
      wake-up, not the shape's speed);
    * while serial it probes every ``probe_every`` calls with ``PROBE_CALLS`` parallel calls in a row,
      timing only the last: after serial calls the other worker has gone to sleep, and once woken it
      may first run on the caller's core.  Measured here, B=1 H=256 step, 12 us warm: after 512 serial
      calls the first parallel call took 117 us, the second 72, the third 17; after 64, 37, 17 and 15.
      The plan turns parallel again when the mean of its last ``PROBES`` probes, less the slowest
      ``TRIM``, is within ``SLOWER`` x its serial calls' time (the rule that turned it serial).  Each
      probe slower than that doubles ``probe_every``, up to ``MAX_PROBE_EVERY``: beside a neighbour
      spinning on the other core, the calls of a probe often wait a whole time slice (a median of 4.8 ms
      for a 20 us step, measured here), so probes must grow rare (under 0.3 % of the calls) for the
      calls' 99th percentile to stay the serial path's.  The interval starts again from
      ``FIRST_PROBE_EVERY`` when the plan turns serial after ``SHORT`` or more parallel calls, and doubles
      when it turns serial sooner: beside a busy neighbour a probe's last call can be quick (its worker
      has just been given the core) while the calls that follow it stall again;
    * a *long* plan, whose serial cost is ``LONG_CALL_S`` or more: waking the worker is a small part of
      such a call, so a probe is one call; the interval grows to at most ``LONG_PROBE_SPACING_S`` of
      serial calls; and its last ``LONG_PROBES`` probes within the limit turn it parallel again.  By a
      short plan's rules, a plan of 3 ms calls that turned serial during a burst of stalls (another
      engine's thread pool spinning beside it) would come back after 8 probes, 1.5 s at least, and 25 s
      once its probes had grown 1,024 calls apart; by these, after 3 probes, 0.6 s, with probes 2 s
      apart at most.
    """

    WINDOW, TRIM, PROBES, PROBE_CALLS, SLOWER, CHECK_EVERY = 16, 1, 8, 3, 1.1, 4
    FIRST_PROBE_EVERY, MAX_PROBE_EVERY, SHORT = 64, 1024, 256
    LONG_CALL_S, LONG_PROBES, LONG_PROBE_SPACING_S = 0.5e-3, 3, 2.0
    CALIBRATE, CALIBRATIONS = 3, 2
    __slots__ = ("workers", "calls", "fastest", "parallel_times", "serial_times", "probes", "serial_mode",
                 "probe_every", "next_probe", "since", "warming", "after_pause", "cold", "long",
                 "probe_calls", "max_probe_every")

    def __init__(self, workers: int):
        self.workers = workers
        self.calls = 0
        self.fastest = float("inf")  # parallel call
        self.parallel_times = collections.deque(maxlen=self.WINDOW)
        self.serial_times = collections.deque(maxlen=4)
        self.probes = collections.deque(maxlen=self.PROBES)  # the timed calls of the latest probes
        self.serial_mode = False
        self.probe_every = self.FIRST_PROBE_EVERY
        self.next_probe = 0  # the call that starts the next probe
        self.since = -self.SHORT  # the call at which the plan last turned parallel (from the start: long ago)
        self.warming = False  # this call is one of a probe's first, untimed ones
        self.after_pause = False  # this call follows a pause: the workers had gone to sleep (untimed)
        self.cold = False  # this brief call follows a pause and runs serially, its caches cold (untimed)
        self.long = False  # probes of a long plan (set when it turns serial)
        self.probe_calls, self.max_probe_every = self.PROBE_CALLS, self.MAX_PROBE_EVERY

    def wants_parallel(self) -> bool:
        self.calls += 1
        if not self.serial_mode:
            return not self.CALIBRATE <= self.calls < self.CALIBRATE + self.CALIBRATIONS
        phase, timed = self.calls - self.next_probe, self.probe_calls - 1
        if phase > timed:  # the probe's timed call ran serially (another call had the workers): the next one
            self.next_probe = self.calls + self.probe_every
            phase = -self.probe_every
        self.warming = phase < timed
        return 0 <= phase <= timed  # a probe: the warming calls, then the timed one

    def record(self, parallel: bool, seconds: float) -> None:
        if self.calls <= 1:
            return
        if not parallel:
            if not self.cold:
                self.serial_times.append(seconds)
            return
        if self.serial_mode:  # a probe: its warming calls (or, for long calls, its length) absorb a wake-up
            if not self.warming:
                self._probed(seconds)
            return
        if self.after_pause:
            return
        if seconds < self.fastest:
            self.fastest = seconds
        times = self.parallel_times
        times.append(seconds)
        # judged every CHECK_EVERY calls: a stream step's whole budget is microseconds
        if len(times) >= self.CHECK_EVERY and self.calls % self.CHECK_EVERY == 0 \
                and self._trimmed_mean(times) > self.SLOWER * self._serial_cost():
            self._turn_serial()

    def _turn_serial(self) -> None:
        self.serial_mode = True
        self.probes.clear()
        serial_cost = self._serial_cost()
        self.long = serial_cost >= self.LONG_CALL_S
        first = self.FIRST_PROBE_EVERY
        if self.long:
            spacing = int(self.LONG_PROBE_SPACING_S / serial_cost)
            self.probe_calls, self.max_probe_every = 1, max(first, min(self.MAX_PROBE_EVERY, spacing))
        else:
            self.probe_calls, self.max_probe_every = self.PROBE_CALLS, self.MAX_PROBE_EVERY
        if self.calls - self.since >= self.SHORT:
            self.probe_every = first
        else:  # the probes that turned it parallel were misleading: probe less often
            self.probe_every = min(2 * self.probe_every, self.max_probe_every)
        self.next_probe = self.calls + self.probe_every

    def _probed(self, seconds: float) -> None:
        self.fastest = min(self.fastest, seconds)
        limit = self.SLOWER * self._serial_cost()
        if seconds > limit:
            self.probe_every = min(2 * self.probe_every, self.max_probe_every)
        self.next_probe = self.calls + self.probe_every
        probes = self.probes
        probes.append(seconds)
        if self.long:
            back = len(probes) >= self.LONG_PROBES and max(list(probes)[-self.LONG_PROBES:]) <= limit
        else:
            back = len(probes) == self.PROBES and self._trimmed_mean(probes) <= limit
        if back:
            self.serial_mode = False
            self.parallel_times.clear()
            self.since = self.calls

    def _serial_cost(self) -> float:
        return min(self.serial_times) if self.serial_times else self.workers * self.fastest

    @classmethod
    def _trimmed_mean(cls, times) -> float:
        kept = sorted(times)[: len(times) - cls.TRIM]
        return sum(kept) / len(kept)


def _threads(model: KernelModel, steps: int, batch: int) -> int:
    """Threads for a call of this shape: the count only matters for calls large enough to run in parallel."""
    return 1 if steps * batch * model.macs_per_step < _PARALLEL_MIN_MACS else parallel_threads()


def make_plan(model: KernelModel, steps: int, batch: int, threads: int, key: tuple | None = None) -> Plan:
    """Choose how a call of this shape is shared between threads (see gru_fast.kernels):

    * MODE_ROWS, the default: units of (direction, batch rows), one worker each for every step;
    * MODE_SPLIT for one direction with a handful of rows, when a row's layer-step is large enough to pay
      for a handshake: the threads share each step's hidden units, and the products take all the rows in
      one pass (up to eight, four with float64: gru_fast.kernels._rows_per_pass).  That is: one row per
      thread from _SPLIT_ONE_ROW_MIN_MACS (or past _ROWS_MAX_LAYER_WEIGHT_BYTES); one row for some
      threads and two for others, always; two rows per thread past _ROWS_TWO_MAX_LAYER_WEIGHT_BYTES;
      three or four past _ROWS_MAX_RECURRENT_BYTES;
    * serial (one worker) below _PARALLEL_MIN_MACS multiply-adds.
    """
    H, D, L = model.hidden, model.directions, model.layers
    per_step = model.macs_per_step // D  # one row, one direction, every layer
    macs = steps * batch * model.macs_per_step
    parallel = threads > 1 and macs >= _PARALLEL_MIN_MACS
    mode, chunks, workers = _layout.MODE_ROWS, 1, 1
    per_layer = per_step // L
    layer_bytes = per_layer * (2 if model.weights == "bfloat16" else model.dtype.itemsize)
    if batch == threads:
        few_rows = layer_bytes > _ROWS_MAX_LAYER_WEIGHT_BYTES or per_layer >= _SPLIT_ONE_ROW_MIN_MACS
    elif batch < 2 * threads:  # one row for some threads, two for others
        few_rows = True
    elif batch == 2 * threads:
        few_rows = layer_bytes > _ROWS_TWO_MAX_LAYER_WEIGHT_BYTES
    else:
        few_rows = batch <= 4 * threads and 3 * H * H * model.dtype.itemsize > _ROWS_MAX_RECURRENT_BYTES
    split = (parallel and D == 1 and few_rows and model.linear_before_reset
             and per_layer >= _SPLIT_MIN_MACS_PER_LAYER_STEP and H > _layout.UNITS)
    if split:
        # few rows per thread: sharing each step's hidden units makes the products passes over two rows
        # (57 GMAC/s a core here, H=256), three (76) or more (86) instead of one-row passes (31.5) on a
        # slice of rows
        mode, chunks = _layout.MODE_SPLIT, min(threads, -(-H // _layout.UNITS))
        workers = chunks
    elif parallel and D * batch < threads:
        parallel = D > 1  # one unit per direction
        chunks, workers = 1, D
    elif parallel:
        chunks = min(batch, -(-threads // D))
        workers = min(threads, D * chunks)
    if workers < 2:
        parallel, workers = False, 1
    rows = batch if mode == _layout.MODE_SPLIT else -(-batch // chunks)
    block_steps = max(1, min(steps, _BLOCK_FLOATS // (rows * 3 * _layout.padded_hidden(H))))
    end = _layout.workspace_layout(steps, batch, H, D, L, block_steps)[-1]

    workspace = _layout.aligned_zeros(end, model.dtype)  # zero: padded hidden units start (and stay) finite
    sync = _layout.aligned_zeros(_layout.sync_slots(steps, L, mode, chunks), np.dtype(np.int64))
    args = _block(model, Operands(0, steps, batch, 0, 0, 0, 0, 0), address(workspace), address(sync), mode, chunks,
                  block_steps, workers)
    return Plan(parallel, macs < _BRIEF_MACS, mode, chunks, block_steps, workers, workspace, sync,
                address(workspace), address(sync), workspace.nbytes + sync.nbytes, args, address(args), key,
                Pace(workers) if parallel else None)


def _block(model: KernelModel, operands: Operands, *plan_fields) -> np.ndarray:
    return np.array((model.params_addr, model.n_params, model.meta_addr, *operands, *plan_fields), np.int64)


def argument_block(model: KernelModel, operands: Operands, plan: Plan) -> np.ndarray:
    """A call's argument block (int64, the fields of gru_fast._layout.ARGS): the forward entry point of
    gru_fast.kernels.FORWARD takes its address, so the block must live as long as the call may run."""
    return _block(model, operands, plan.workspace_addr, plan.sync_addr, plan.mode, plan.chunks, plan.block_steps,
                  plan.workers)


# ---- the plan pool -----------------------------------------------------------------------------------


class _PlanPool(Guard):
    """Idle plans by (model token, steps, batch, threads); see _PLAN_CACHE_BYTES.  ``idle`` is a plain dict
    kept in least-recently-used order: a key is removed when taken and inserted again (at the end) when
    given back, which a steady loop does on every call for the cost of two dict operations."""

    __slots__ = ("idle", "nbytes", "limit", "keep_max")

    def __init__(self, limit: int, keep_max: int):
        super().__init__()
        self.idle: dict = {}  # key -> non-empty list of plans
        self.nbytes = 0
        self.limit = limit
        self.keep_max = keep_max

    def take(self, key):
        with self.lock:
            plans = self.idle.pop(key, None)
            if plans is None:
                return None
            plan = plans.pop()
            if plans:
                self.idle[key] = plans
            self.nbytes -= plan.nbytes
        return plan

    def give(self, plan) -> None:
        if plan.nbytes > self.keep_max:
            return  # freed with its last reference
        with self.lock:
            plans = self.idle.pop(plan.key, None)
            if plans is None:
                plans = [plan]
            else:
                plans.append(plan)
            self.idle[plan.key] = plans
            self.nbytes += plan.nbytes
            while self.nbytes > self.limit:
                key = next(iter(self.idle))
                oldest = self.idle[key]
                self.nbytes -= oldest.pop(0).nbytes
                if not oldest:
                    del self.idle[key]

    def drop(self, token) -> None:
        """Free the idle plans of a model that is gone."""
        with self.lock:
            for key in [key for key in self.idle if key[0] == token]:
                self.nbytes -= sum(plan.nbytes for plan in self.idle.pop(key))


PLANS = _PlanPool(_PLAN_CACHE_BYTES, _PLAN_KEEP_MAX_BYTES)


def take_plan(model: KernelModel, steps: int, batch: int, threads: int | None = None) -> Plan:
    """A plan for this shape (with the calling thread's thread count unless ``threads`` is given), taken
    from the plan pool or made; give it back with ``PLANS.give``."""
    if threads is None:
        threads = _threads(model, steps, batch)
    key = (model.token, steps, batch, threads)
    return PLANS.take(key) or make_plan(model, steps, batch, threads, key)


def drop_plans(token: int) -> None:
    """Free the idle plans of the model with this token (it is gone)."""
    PLANS.drop(token)


# ---- launching ---------------------------------------------------------------------------------------


class _ParallelPolicy(Guard):
    """Whether a call whose plan is parallel may launch the parallel kernel now.

    Serial and parallel runs give bit-identical results, so this only decides speed:

    * one parallel call at a time in the process: a call arriving meanwhile runs serially, so concurrent
      callers never put more spinning workers than cores on the machine (and under Numba's workqueue
      layer, which aborts on concurrent launches, gru_fast's own launches never overlap);
    * a brief call goes parallel only when the previous parallel-sized call ended within
      _BACK_TO_BACK_S (the workers are still awake);
    * a call goes parallel only while its plan's :class:`Pace` finds parallel calls of its shape faster
      than serial ones;
    * a call that would wake the workers (no parallel call ended within _BACK_TO_BACK_S) runs serially
      while the machine has no core free for them (:func:`_cores_taken`, asked again _BACK_TO_BACK_S
      after it last found none): woken, a worker would wait for a core, a scheduler time slice, and the
      parallel region ends only when each worker has run.

    A thread that is late anyway (a busy machine) is handled inside the kernel: the other worker takes
    over its share of each step until it catches up (see gru_fast.kernels, MODE_SPLIT).
    """

    __slots__ = ("last_end", "parallel_end", "taken_until")

    def __init__(self):
        super().__init__()
        self.last_end = 0.0  # the start of the latest call, or the end of the latest parallel one
        self.parallel_end = 0.0  # the end of the latest parallel call
        self.taken_until = 0.0  # until then, calls that would wake the workers take the machine as busy

    def acquire(self, plan, now: float) -> bool:
        """Whether a call of ``plan`` arriving at ``now`` (``perf_counter()``) may launch in parallel; when
        it may, the lock is held until :meth:`release`."""
        recent = now - self.last_end <= _BACK_TO_BACK_S
        self.last_end = now
        pace = plan.pace
        pace.cold = plan.brief and not recent
        if pace.cold:
            return False
        if not pace.wants_parallel():
            return False
        since = now - self.parallel_end
        if since > _BACK_TO_BACK_S:
            if now < self.taken_until:
                return False
            if _cores_taken(plan.workers, plan.workers - 1 if since < _WORKERS_SPIN_S else 0):
                self.taken_until = now + _BACK_TO_BACK_S
                return False
        pace.after_pause = not recent
        return self.lock.acquire(False)

    def release(self) -> float:
        """End a granted parallel call; returns the time it ended (``perf_counter()``)."""
        self.last_end = self.parallel_end = end = perf_counter()
        self.lock.release()
        return end


def _open_loadavg() -> int | None:
    try:
        return os.open("/proc/loadavg", os.O_RDONLY)
    except OSError:  # not Linux
        return None


_LOADAVG = _open_loadavg()
_CPUS = os.cpu_count() or 1
# After a parallel region, GNU OpenMP's workers spin before they sleep (libgomp's default 300,000 rounds
# of `pause`; here the machine's count of running tasks stayed raised 4-8 ms after a batch of calls): so
# long, they are among the running tasks _cores_taken counts, on the cores a launch would use.
_WORKERS_SPIN_S = 0.02


def _running_tasks() -> int | None:
    """The machine's tasks running or waiting to run right now (the fourth field of /proc/loadavg, the
    caller among them; 1-2 us to read here), or None where it cannot be read."""
    if _LOADAVG is None:
        return None
    try:
        return int(os.pread(_LOADAVG, 64, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _cores_taken(workers: int, spinning: int) -> bool:
    """Whether the machine lacks ``workers - 1`` free CPUs beside the caller's right now; ``spinning``
    running tasks are gru_fast's own workers, still spinning after a recent parallel call.  The count is
    the whole machine's, against all its CPUs: inside a container limited to some of them this finds no
    core free only when every CPU of the host is taken.  False where the count cannot be read."""
    running = _running_tasks()
    return running is not None and running - 1 - spinning > _CPUS - workers


PARALLEL = _ParallelPolicy()


def run(model: KernelModel, operands: Operands) -> None:
    """Run one call in a plan from the pool: in parallel when its plan is and PARALLEL grants it, else
    serially (same results)."""
    steps, batch = operands.steps, operands.batch
    plan = take_plan(model, steps, batch)
    if not plan.parallel:
        _serially(model.weights, plan, operands)
    else:
        start = perf_counter()
        if PARALLEL.acquire(plan, start):
            _OPERANDS.pack_into(plan.args, 8 * _layout.ARG_X, *operands)
            _parallel(model.weights, plan, plan.args_addr, start)
        else:  # its time tells the parallel plan's Pace what the serial path costs
            pace = plan.pace
            PLANS.give(plan)
            plan = take_plan(model, steps, batch, 1)
            start = perf_counter()
            _serially(model.weights, plan, operands)
            pace.record(False, perf_counter() - start)
    PLANS.give(plan)


def _serially(weights: str, plan: Plan, operands: Operands) -> None:
    """Write ``operands`` into the serial ``plan``'s argument block and run it."""
    _OPERANDS.pack_into(plan.args, 8 * _layout.ARG_X, *operands)
    kernels.FORWARD[weights, False](plan.args_addr)


def _parallel(weights: str, plan: Plan, args: int, start: float) -> None:
    """Run ``plan``'s parallel entry point on the argument block at address ``args``, a call PARALLEL
    granted at ``start``; hand the grant back and record the call's time with the plan's Pace.  The entry
    point is looked up in ``kernels.FORWARD`` at every launch."""
    try:
        kernels.FORWARD[weights, True](args)
    finally:
        end = PARALLEL.release()
    plan.pace.record(True, end - start)


def _own_plans(model: KernelModel, steps: int, batch: int, threads: int) -> tuple[Plan, Plan]:
    """(plan, serial plan) of a shape for ``threads``, outside the pool: the plan a call takes when
    PARALLEL grants it, and the one it runs serially otherwise (the same plan when it is serial)."""
    plan = make_plan(model, steps, batch, threads)
    return plan, make_plan(model, steps, batch, 1) if plan.parallel else plan


class ShapeRunner:
    """Runs calls of one model and shape (steps, batch) that never overlap -- a stream's steps, which take
    turns under the stream's lock -- in plans of its own instead of the pool's: per thread count a parallel
    plan (when the shape has one) and a serial one, made at the first call with that count.  A call then
    skips the pool's lookups and lock (1.4 us a call here, where a whole bound step at H=64 takes 3 us);
    otherwise it runs as :func:`run` runs it.  Its plans are not counted in the pool's bytes: they live as
    long as the runner."""

    __slots__ = ("model", "steps", "batch", "plans")

    def __init__(self, model: KernelModel, steps: int, batch: int):
        self.model, self.steps, self.batch = model, steps, batch
        self.plans: dict = {}  # thread count -> (plan, serial plan)

    def __call__(self, operands: Operands) -> None:
        model = self.model
        threads = _threads(model, self.steps, self.batch)
        plans = self.plans.get(threads)
        if plans is None:
            plans = self.plans[threads] = _own_plans(model, self.steps, self.batch, threads)
        plan, serial = plans
        if not plan.parallel:
            _serially(model.weights, plan, operands)
            return
        start = perf_counter()
        if PARALLEL.acquire(plan, start):
            _OPERANDS.pack_into(plan.args, 8 * _layout.ARG_X, *operands)
            _parallel(model.weights, plan, plan.args_addr, start)
        else:
            _serially(model.weights, serial, operands)
            plan.pace.record(False, perf_counter() - start)


class Binding(NamedTuple):
    """Calls prepared once to run again and again (see :func:`bind`).  The launches read the weights and the
    workspaces by address: the binding must be kept as long as they may run."""

    launches: tuple  # one function of no arguments per call given to bind, in order
    model: KernelModel  # its weights
    plans: tuple  # the parallel plan (or the serial one) and the serial plan: their workspaces
    blocks: tuple  # the launches' argument blocks


def bind(model: KernelModel, calls: Sequence[Operands]) -> Binding:
    """Prepare ``calls`` (one shape: same steps and batch) to run again and again on the same arrays.

    The thread count is read now.  The plans are the binding's own, not the pool's (a bound call may run
    from any thread, one at a time), and every argument block is written here: a launch of a serial plan
    is the entry point's call on one integer and nothing else (a ``functools.partial``), the fast path of
    a small model; a parallel plan's launch is a :class:`_BoundParallel`.  The serial entry point is looked
    up now; the parallel one at every launch (see :func:`_parallel`).
    """
    steps, batch = calls[0].steps, calls[0].batch
    plan, serial = _own_plans(model, steps, batch, _threads(model, steps, batch))
    forward = kernels.FORWARD[model.weights, False]
    launches, blocks = [], []
    for operands in calls:
        serial_block = argument_block(model, operands, serial)
        serially = functools.partial(forward, address(serial_block))
        blocks.append(serial_block)
        if plan.parallel:
            block = argument_block(model, operands, plan)
            blocks.append(block)
            launches.append(_BoundParallel(model.weights, plan, address(block), serially))
        else:
            launches.append(serially)
    return Binding(tuple(launches), model, (plan, serial), tuple(blocks))


class _BoundParallel:
    """A bound call of a parallel plan: its parallel kernel when PARALLEL grants it, else ``serially``
    (the serial plan's launch); either way the time goes to the plan's Pace.  A class with slots: a
    streaming step's whole Python path is a few microseconds, and each function it goes through costs."""

    __slots__ = ("weights", "plan", "args", "serially")

    def __init__(self, weights: str, plan: Plan, args: int, serially):
        self.weights, self.plan, self.args, self.serially = weights, plan, args, serially

    def __call__(self) -> None:
        plan = self.plan
        start = perf_counter()
        if PARALLEL.acquire(plan, start):
            _parallel(self.weights, plan, self.args, start)
        else:
            self.serially()
            plan.pace.record(False, perf_counter() - start)
