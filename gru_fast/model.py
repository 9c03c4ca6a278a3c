"""The engine's model: GRU weights in kernel layout, and the calls that run them.

A :class:`GRU` is built from per-layer ``(W, R, B)`` arrays in ONNX layout and
gate order (z, r, h) — the one canonical form every converter produces.  At
construction the weights are laid out once for the kernels:

* ``W`` and ``R`` transposed, their columns put in unit-tile order (z, r, n of 16 hidden units at a
  time, H padded to a multiple of 16) and packed as contiguous (K, 48) groups, the order the
  micro-kernels of :mod:`gru_fast._tiles` stream them in (see "Layout" in :mod:`gru_fast.kernels`);
* the input and recurrent biases of z and r pre-summed (and of n when
  ``linear_before_reset`` is 0; with 1 the recurrent n bias stays separate,
  inside the reset product);
* everything in one flat, 64-byte aligned ``params`` array with an int64
  ``meta`` table of offsets (see :mod:`gru_fast.kernels`).
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from time import perf_counter
from typing import NamedTuple, Sequence

import numpy as np

from . import _layout, kernels
from ._config import parallel_threads
from ._memory import address
from ._validate import as_float_array, as_in_place_array, as_lengths, check_no_overlap, check_out_array
from .activations import Activation, parse_activations

__all__ = ["GRU", "Stream", "BoundCall", "BoundStep"]

_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}

# Below this much work (multiply-adds per call) a parallel region costs more than it saves: a launch
# is about 1.5 us with the workers awake, 40-70 us when they have gone to sleep.
_PARALLEL_MIN_MACS = 1 << 18
# Splitting one sequence's hidden units between threads (MODE_SPLIT) costs a cross-core handshake per
# layer and step (about 0.3 us): worth it from this many multiply-adds per row, layer and step.  Measured
# here, T=1000 I=40, one row, 2 threads: H=128 (64.5K) split 1,940 us vs serial 2,640 us; H=96 (39K) split
# 1,844 vs 1,657; a 2-layer H=64 model (19K) split 235 vs 124.  With exactly one row per thread, rows beat
# a split (B=2: H=96 2,685 vs 4,559 us; H=128 2,764 vs 3,343; H=256 even); from 3 rows the split wins.
_SPLIT_MIN_MACS_PER_LAYER_STEP = 48 << 10
# Projected inputs of a block of steps are computed ahead of the recurrence; a block holds about this
# many floats per worker (128 KiB in float32, well inside the 1 MiB L2 beside the weights).
_BLOCK_FLOATS = 1 << 15
# A call shorter than this many multiply-adds (~0.1 ms) runs in parallel only while calls come back to
# back: a parallel launch costs ~1.5 us while the workers still spin after the previous one, 40-70 us
# once they have gone to sleep (a few ms here), more than such a call saves.
_BRIEF_MACS = 1 << 22
_BACK_TO_BACK_S = 0.002
class _ParallelPolicy:
    """Whether a call whose plan is parallel may launch the parallel kernel now.

    Serial and parallel runs give bit-identical results, so this only decides speed:

    * one parallel call at a time in the process: a call arriving meanwhile runs serially, so concurrent
      callers never put more spinning workers than cores on the machine (and under Numba's workqueue
      layer, which aborts on concurrent launches, gru_fast's own launches never overlap);
    * a brief call goes parallel only when the previous parallel-sized call ended within
      _BACK_TO_BACK_S (the workers are still awake).

    A thread that is late anyway (a busy machine) is handled inside the kernel: the other worker takes
    over its share of each step until it catches up (see gru_fast.kernels, MODE_SPLIT).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.last_end = 0.0

    def acquire(self, plan) -> bool:
        now = perf_counter()
        recent = now - self.last_end <= _BACK_TO_BACK_S
        self.last_end = now
        if plan.brief and not recent:
            return False
        return self.lock.acquire(blocking=False)

    def release(self, plan) -> None:
        self.last_end = perf_counter()
        self.lock.release()


_PARALLEL = _ParallelPolicy()

# What the engine keeps between calls: idle plans (workspaces), shared by every thread and model.  A call
# takes a plan of its shape from the pool (or makes one) and gives it back after the kernel ran; at most
# _PLAN_CACHE_BYTES stay idle in the process, least recently used given up first, and a plan larger than
# _PLAN_KEEP_MAX_BYTES is freed after its call (allocating it costs little next to the call that needs it:
# its workspace holds the sequences of the layers between the first and the last, 2 * T*B*D*H values).
_PLAN_CACHE_BYTES = 64 << 20
_PLAN_KEEP_MAX_BYTES = 16 << 20


class _PlanPool:
    """Idle plans by (model token, steps, batch, threads); see _PLAN_CACHE_BYTES.  ``idle`` is a plain dict
    kept in least-recently-used order: a key is removed when taken and inserted again (at the end) when
    given back, which a steady loop does on every call for the cost of two dict operations."""

    def __init__(self, limit: int, keep_max: int):
        self.lock = threading.Lock()
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


_PLANS = _PlanPool(_PLAN_CACHE_BYTES, _PLAN_KEEP_MAX_BYTES)
_MODEL_TOKENS = itertools.count()

# Streams and bound calls, whose locks a forked child must renew (see _renew_locks_in_child).
_LOCK_OWNERS: weakref.WeakSet = weakref.WeakSet()


def _renew_locks_in_child() -> None:
    """In a child forked while another thread held one of gru_fast's locks (stepping a shared stream,
    running a bound call, a parallel launch, the plan pool), that lock would stay held forever: the
    thread holding it does not exist in the child.  Every lock gru_fast owns is replaced by a free one.
    A stream forked in the middle of a step keeps the state from before that step (a step writes the
    other state buffer and switches to it only when it is done)."""
    _PARALLEL.lock = threading.Lock()
    _PLANS.lock = threading.Lock()
    for owner in list(_LOCK_OWNERS):
        owner._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks_in_child)


class _Plan(NamedTuple):
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
    key: tuple | None  # where the plan pool files it; None for a bound call's own plans


def _as_dtype(dtype) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in _DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def build_nbytes(input_size: int, hidden_size: int, num_layers: int = 1, num_directions: int = 1,
                 dtype="float32") -> int:
    """Bytes that building a :class:`GRU` of this shape allocates at its peak, beyond the caller's arrays
    (:func:`gru_fast._layout.build_nbytes`).  A loader charges this against its ``max_bytes`` before it
    reads the weights (see :func:`gru_fast.load`)."""
    return _layout.build_nbytes(input_size, hidden_size, num_layers, num_directions, _as_dtype(dtype).itemsize)


class GRU:
    """A stacked, optionally bidirectional GRU for inference.

    Parameters
    ----------
    layers : sequence of (W, R, B)
        One entry per stacked layer in ONNX layout and gate order (z, r, h):
        ``W`` (D, 3H, I_l), ``R`` (D, 3H, H), ``B`` (D, 6H) = [Wb, Rb] or None.
        ``I_0`` is the input size and ``I_l = D * H`` above it.  Copied.
    direction : {"forward", "reverse", "bidirectional"}
        ONNX's direction; "reverse" runs each sequence from its last valid step.
    linear_before_reset : bool
        True for PyTorch (reset applied after the recurrent product), False for
        the original GRU (ONNX default, Keras ``reset_after=False``).
    activations, activation_alpha, activation_beta : optional
        ONNX's activation attributes (see :mod:`gru_fast.activations`).
    clip : float, optional
        Clamp every gate pre-activation to [-clip, clip] (ONNX ``clip``).
    batch_first : bool
        Whether x and y are (B, T, ...) instead of (T, B, ...).
    dtype : {"float32", "float64"}, optional
        Compute precision; float64 when W is float64, else float32.
    provenance : dict, optional
        JSON-able facts about where the weights came from; kept by :func:`gru_fast.save`.
    """

    def __init__(
        self,
        layers: Sequence,
        *,
        direction: str = "forward",
        linear_before_reset: bool = True,
        activations: Sequence[str] | None = None,
        activation_alpha: Sequence[float] | None = None,
        activation_beta: Sequence[float] | None = None,
        clip: float | None = None,
        batch_first: bool = False,
        dtype=None,
        provenance: dict | None = None,
    ):
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {sorted(_DIRECTIONS)}, got {direction!r}")
        if isinstance(layers, tuple) and len(layers) == 3 and not isinstance(layers[0], (tuple, list)):
            raise TypeError("layers must be a list of (W, R, B) tuples, one per layer; wrap a single layer in a list")
        layers = list(layers)
        if not layers:
            raise ValueError("layers must hold at least one (W, R, B) layer")
        num_directions = _DIRECTIONS[direction]
        first_w = np.asarray(layers[0][0])
        if dtype is None:
            dtype = np.float64 if first_w.dtype == np.float64 else np.float32
        self.dtype = _as_dtype(dtype)
        self.direction = direction
        self.num_directions = num_directions
        self.linear_before_reset = bool(linear_before_reset)
        self.batch_first = bool(batch_first)
        if clip is not None:
            clip = float(clip)
            if not (np.isfinite(clip) and clip > 0):
                raise ValueError(f"clip must be a positive finite number or None, got {clip}")
        self.clip = clip
        self.activations: tuple[Activation, ...] = parse_activations(
            activations, activation_alpha, activation_beta, num_directions
        )
        self.provenance = dict(provenance or {})
        self._weights = self._check_layers(layers)
        self.num_layers = len(self._weights)
        self.hidden_size = self._weights[0][1].shape[2]
        self.input_size = self._weights[0][0].shape[2]
        self.has_bias = self._weights[0][2] is not None
        self._params, self._meta = self._pack()
        self._params_addr = address(self._params)
        self._meta_addr = address(self._meta)
        self._token = next(_MODEL_TOKENS)  # its plans' key in the plan pool, freed with the model
        weakref.finalize(self, _PLANS.drop, self._token)
        H, D = self.hidden_size, self.num_directions
        # multiply-adds of one time step of one sequence, every layer and direction
        self._macs_per_step = D * 3 * H * ((self.input_size + H) + (self.num_layers - 1) * (D * H + H))

    # ---- construction -------------------------------------------------------

    def _check_layers(self, layers):
        D = self.num_directions
        checked = []
        hidden = None
        has_bias = None
        for index, layer in enumerate(layers):
            if not isinstance(layer, (tuple, list)) or len(layer) != 3:
                raise ValueError(f"layers[{index}] must be a (W, R, B) tuple, B may be None")
            W, R, B = (None if a is None else np.asarray(a) for a in layer)
            for name, arr in (("W", W), ("R", R), ("B", B)):
                if name != "B" and arr is None:
                    raise ValueError(f"layers[{index}].{name} is missing")
                if arr is not None and arr.dtype.kind not in "fiu":
                    raise TypeError(f"layers[{index}].{name} must be numeric, got dtype {arr.dtype}")
            if R.ndim != 3 or R.shape[0] != D or R.shape[1] != 3 * R.shape[2] or R.shape[2] < 1:
                raise ValueError(
                    f"layers[{index}].R must have shape ({D}, 3*H, H) for direction {self.direction!r}, got {R.shape}"
                )
            H = R.shape[2]
            if hidden is not None and H != hidden:
                raise ValueError(f"layers[{index}] has hidden size {H}, layer 0 has {hidden}")
            hidden = H
            expected_in = None if index == 0 else D * H
            if W.ndim != 3 or W.shape[:2] != (D, 3 * H) or W.shape[2] < 1 or (
                expected_in is not None and W.shape[2] != expected_in
            ):
                want = f"({D}, {3 * H}, {'I' if expected_in is None else expected_in})"
                raise ValueError(f"layers[{index}].W must have shape {want}, got {W.shape}")
            if B is not None and B.shape != (D, 6 * H):
                raise ValueError(f"layers[{index}].B must have shape ({D}, {6 * H}) or be None, got {B.shape}")
            if has_bias is not None and (B is not None) != has_bias:
                raise ValueError("either every layer has a bias B or none has")
            has_bias = B is not None
            for name, arr in (("W", W), ("R", R), ("B", B)):
                if arr is not None and not np.all(np.isfinite(arr)):
                    raise ValueError(f"layers[{index}].{name} holds NaN or infinity")
            cast = lambda a: None if a is None else np.array(a, dtype=self.dtype, copy=True)  # noqa: E731
            checked.append((cast(W), cast(R), cast(B)))
        return checked

    def _pack(self):
        """Lay the weights out once for the kernels (gru_fast._layout)."""
        return _layout.pack(self._weights, self.input_size, self.hidden_size, self.linear_before_reset,
                            self.direction == "reverse", self.clip, self.activations, self.dtype)

    # ---- properties ---------------------------------------------------------

    @property
    def bidirectional(self) -> bool:
        return self.num_directions == 2

    def onnx_weights(self):
        """The weights as a list of (W, R, B) copies in ONNX layout (B is None without bias)."""
        return [tuple(None if a is None else a.copy() for a in layer) for layer in self._weights]

    def _config(self) -> dict:
        return dict(
            direction=self.direction,
            linear_before_reset=self.linear_before_reset,
            activations=[a.name for a in self.activations],
            activation_alpha=[a.alpha for a in self.activations if a.takes_alpha],
            activation_beta=[a.beta for a in self.activations if a.takes_beta],
            clip=self.clip,
            batch_first=self.batch_first,
            dtype=self.dtype.name,
            provenance=self.provenance,
        )

    def astype(self, dtype) -> "GRU":
        """A copy computing in another precision."""
        return GRU(self._weights, **dict(self._config(), dtype=_as_dtype(dtype)))

    def __reduce__(self):
        # Pickle by weights and configuration: no kernel objects travel.
        return (_rebuild, (self._weights, self._config()))

    def __repr__(self) -> str:
        extra = "" if self.linear_before_reset else ", linear_before_reset=False"
        if self.batch_first:
            extra += ", batch_first=True"
        if self.clip is not None:
            extra += f", clip={self.clip}"
        if [a.name for a in self.activations[:2]] != ["Sigmoid", "Tanh"] or len(set(self.activations)) > 2:
            extra += f", activations={[a.name for a in self.activations]}"
        return (
            f"GRU(input_size={self.input_size}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
            f"direction={self.direction!r}{extra}, bias={self.has_bias}, dtype={self.dtype.name})"
        )

    # ---- running ------------------------------------------------------------

    def _plan(self, steps: int, batch: int, threads: int | None = None) -> _Plan:
        """A plan for this shape, taken from the plan pool (or made); give it back with ``_PLANS.give``."""
        if threads is None:  # the count only matters for calls large enough to run in parallel
            threads = 1 if steps * batch * self._macs_per_step < _PARALLEL_MIN_MACS else parallel_threads()
        key = (self._token, steps, batch, threads)
        return _PLANS.take(key) or self._make_plan(steps, batch, threads, key)

    def _make_plan(self, steps: int, batch: int, threads: int, key: tuple | None = None) -> _Plan:
        """Choose how a call of this shape is shared between threads (see gru_fast.kernels):

        * MODE_ROWS, the default: units of (direction, batch rows), one worker each for every step;
        * MODE_SPLIT for one direction with fewer than 4 rows per thread (a single sequence, a handful,
          but not exactly one row per thread) when a row's layer-step is large enough to pay for a
          handshake: the threads share each step's hidden units, and every product stays a four-row pass;
        * serial (one worker) below _PARALLEL_MIN_MACS multiply-adds.
        """
        H, D, L = self.hidden_size, self.num_directions, self.num_layers
        per_step = self._macs_per_step // D  # one row, one direction, every layer
        parallel = threads > 1 and steps * batch * self._macs_per_step >= _PARALLEL_MIN_MACS
        mode, chunks, workers = _layout.MODE_ROWS, 1, 1
        split = (parallel and D == 1 and batch < 4 * threads and batch != threads and self.linear_before_reset
                 and per_step // L >= _SPLIT_MIN_MACS_PER_LAYER_STEP and H > _layout.UNITS)
        if split:
            # fewer than 4 rows per thread: sharing each step's hidden units keeps every product a
            # four-row pass (57 GMAC/s here) instead of one-row passes (25 GMAC/s) on a slice of rows
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
        workspace = _layout.aligned_zeros(end, self.dtype)  # zero: padded hidden units start (and stay) finite
        sync = _layout.aligned_zeros(_layout.sync_slots(steps, L, mode, chunks), np.dtype(np.int64))
        macs = steps * batch * self._macs_per_step
        return _Plan(parallel, macs < _BRIEF_MACS, mode, chunks, block_steps, workers, workspace, sync,
                     address(workspace), address(sync), workspace.nbytes + sync.nbytes, key)

    def __call__(self, x, h0=None, lengths=None, out=None):
        """Run the model over whole sequences.

        Parameters
        ----------
        x : array-like
            (T, B, I), or (B, T, I) when ``batch_first``, or (T, I) unbatched.
        h0 : array-like, optional
            Initial state (L*D, B, H) — (L*D, H) unbatched; zeros when omitted.
        lengths : array-like of int, optional
            (B,) valid steps per sequence, each in [0, T] (PackedSequence
            semantics; a length of 0 leaves that sequence's state at h0).
        out : (y, h_n), optional
            Arrays to write the results into (exact dtype and shape, C-contiguous).

        Returns
        -------
        y : ndarray
            (T, B, D*H) (batch_first: (B, T, D*H); unbatched: (T, D*H)); 0 at padded steps.
        h_n : ndarray
            (L*D, B, H) (unbatched: (L*D, H)): the state after each sequence's last valid step.

        Memory: a call runs in a workspace (about 2*T*B*D*H values with 3 or more layers) kept for the
        next call of the same shape: at most 64 MiB of idle workspaces stay in the process, all threads
        and models together, and one over 16 MiB is freed after its call.
        """
        call = self._checked(x, h0, lengths, out)
        self._run(*call)
        return call[6], call[7]

    def bind(self, x, h0=None, lengths=None, out=None) -> "BoundCall":
        """Check a call's arrays once; the returned :class:`BoundCall` runs it on their current contents.

        Like ONNX Runtime's IOBinding: for a loop that refills the same buffers, ``call = model.bind(x,
        h0, out=(y, h_n))`` then ``call()`` skips the per-call checks and conversions (about half the
        time of a call on a small model).  ``x`` and ``h0`` must already be C-contiguous arrays of the
        model's dtype (an ``np.memmap`` too), since the call reads them in place; ``lengths`` are copied
        (fixed at bind time); without ``out`` the outputs are allocated once and overwritten by every
        call.  The thread count is read at bind time.  A bound call runs one call at a time (calls from
        several threads take turns).
        """
        x = as_in_place_array(x, "x", self.dtype)
        if h0 is not None:
            h0 = as_in_place_array(h0, "h0", self.dtype)
        return BoundCall(self, *self._checked(x, h0, lengths, out))

    def _checked(self, x, h0, lengths, out):
        """Validate a call's arguments: (x, steps, batch, batch_major, h0, lengths, y, h_n, inputs), every
        array C-contiguous in the model's dtype; ``inputs`` names the caller's arrays when ``out`` is given
        (outputs must not overlap them, copies or not), else None."""
        dtype = self.dtype
        x_given, h0_given, lengths_given = x, h0, lengths
        x = as_float_array(x, "x", dtype)
        shape = x.shape
        H, D, LD = self.hidden_size, self.num_directions, self.num_layers * self.num_directions
        if len(shape) == 3:
            unbatched = False
            if self.batch_first:
                batch, steps = shape[0], shape[1]
            else:
                steps, batch = shape[0], shape[1]
        elif len(shape) == 2:
            unbatched = True
            steps, batch = shape[0], 1
        else:
            layout = "(B, T, I)" if self.batch_first else "(T, B, I)"
            raise ValueError(f"x must be 3-D {layout} or 2-D (T, I) with I={self.input_size}, got shape {shape}")
        if shape[-1] != self.input_size:
            raise ValueError(f"x must have input size {self.input_size} on its last axis, got shape {shape}")
        if steps == 0:  # as PyTorch: no steps is an error, no sequences (batch 0) an empty result
            raise ValueError(f"x must hold at least one time step, got shape {shape}")
        state_shape = (LD, H) if unbatched else (LD, batch, H)
        if h0 is not None:
            h0 = as_float_array(h0, "h0", dtype)
            if h0.shape != state_shape:
                axes = ("num_layers*num_directions, hidden: x is unbatched" if unbatched
                        else "num_layers*num_directions, batch, hidden")
                raise ValueError(f"h0 must have shape {state_shape} ({axes}), got {h0.shape}")
        if lengths is not None:
            lengths = as_lengths(lengths, batch, steps, unbatched)
        y_shape = shape[:-1] + (D * H,)
        if out is None:
            y = np.empty(y_shape, dtype)
            h_n = np.empty(state_shape, dtype)
            inputs = None
        else:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError("out must be a (y, h_n) pair of arrays")
            y = check_out_array(out[0], "out[0] (y)", y_shape, dtype)
            h_n = check_out_array(out[1], "out[1] (h_n)", state_shape, dtype)
            inputs = {"x": x_given, "h0": h0_given, "lengths": lengths_given}
        return x, steps, batch, self.batch_first and len(shape) == 3, h0, lengths, y, h_n, inputs

    def _kernel_args(self, x_addr, steps, batch, batch_major, h0_addr, lengths_addr, y_addr, h_n_addr, plan):
        return (
            self._params_addr, self._params.size, self._meta_addr, x_addr, steps, batch, int(batch_major), h0_addr,
            lengths_addr, y_addr, h_n_addr, plan.workspace_addr, plan.sync_addr, plan.mode, plan.chunks,
            plan.block_steps, plan.workers,
        )

    def _run(self, x, steps, batch, batch_major, h0, lengths, y, h_n, inputs=None):
        """Run the forward kernel on validated arrays (``x``, ``y``, ``h_n`` C-contiguous, right dtype).

        With ``inputs`` (the caller's own arrays, by name), first refuse outputs that overlap them.
        """
        if batch == 0:
            return  # no sequences: y and h_n are empty
        x_addr, y_addr, h_n_addr = address(x), address(y), address(h_n)
        h0_addr = 0 if h0 is None else address(h0)
        if inputs is not None:
            check_no_overlap({"y": (y, y_addr), "h_n": (h_n, h_n_addr)}, inputs,
                             known={id(x): x_addr, id(h0): h0_addr})
        plan = self._plan(steps, batch)
        if plan.parallel and not _PARALLEL.acquire(plan):
            _PLANS.give(plan)
            plan = self._plan(steps, batch, 1)  # same results, serially
        args = self._kernel_args(x_addr, steps, batch, batch_major, h0_addr,
                                 0 if lengths is None else address(lengths), y_addr, h_n_addr, plan)
        _launch(self.dtype, plan, args)
        _PLANS.give(plan)

    def stream(self, batch_size: int | None = 1, h0=None) -> "Stream":
        """A streaming session that advances every layer one time step per :meth:`Stream.step`.

        ``batch_size=None`` streams a single unbatched sequence: steps take (I,)
        and return (H,).  Only unidirectional, forward models can stream.
        """
        return Stream(self, batch_size, h0)


def _rebuild(weights, config):
    return GRU(weights, **config)


def _launch(dtype, plan, args):
    """Run ``plan``'s forward entry point; a parallel plan was granted by _PARALLEL and is handed back."""
    if plan.parallel:
        try:
            kernels.FORWARD[dtype, True](*args)
        finally:
            _PARALLEL.release(plan)
    else:
        kernels.FORWARD[dtype, False](*args)


class BoundCall:
    """A model call whose arrays were checked once (see :meth:`GRU.bind`); ``call()`` returns (y, h_n)."""

    def __init__(self, model, x, steps, batch, batch_major, h0, lengths, y, h_n, inputs):
        self.y, self.h_n = y, h_n
        self._lock = threading.Lock()
        _LOCK_OWNERS.add(self)
        self._serial = kernels.FORWARD[model.dtype, False]
        self._empty = batch == 0  # no sequences: nothing to run, y and h_n stay empty
        if self._empty:
            self._plans = (_Plan(False, True, _layout.MODE_ROWS, 1, 1, 1, None, None, 0, 0, 0, None),) * 2
            return
        if lengths is not None:
            lengths = lengths.copy()  # checked once, so the kernel must not see later edits of the caller's
        x_addr, y_addr, h_n_addr = address(x), address(y), address(h_n)
        h0_addr = 0 if h0 is None else address(h0)
        if inputs is not None:
            check_no_overlap({"y": (y, y_addr), "h_n": (h_n, h_n_addr)}, inputs,
                             known={id(x): x_addr, id(h0): h0_addr})
        self._arrays = (x, h0, lengths)  # alive as long as the binding: the kernel reads them by address
        self._dtype = model.dtype
        head = (x_addr, steps, batch, batch_major, h0_addr, 0 if lengths is None else address(lengths), y_addr,
                h_n_addr)
        threads = parallel_threads() if steps * batch * model._macs_per_step >= _PARALLEL_MIN_MACS else 1
        plan = model._make_plan(steps, batch, threads)  # its own workspace: a binding is not thread-local
        serial = model._make_plan(steps, batch, 1) if plan.parallel else plan
        self._parallel_args = model._kernel_args(*head, plan) if plan.parallel else None
        self._serial_args = model._kernel_args(*head, serial)
        self._plans = (plan, serial)

    def __call__(self):
        plan = self._plans[0]
        with self._lock:
            if plan.parallel and _PARALLEL.acquire(plan):
                _launch(self._dtype, plan, self._parallel_args)
            elif not self._empty:
                self._serial(*self._serial_args)  # _launch, inlined: the fast path of a small model
        return self.y, self.h_n


class Stream:
    """Step a unidirectional GRU one input frame at a time, keeping its state.

    ``step(x_t)`` takes (B, I) and returns the last layer's new state (B, H);
    with one row (``batch_size`` 1 or None) it also takes (I,) and returns (H,).  ``state`` is (L, B, H).  A step
    with ``out=`` makes no allocation once the stream exists.
    """

    def __init__(self, model: GRU, batch_size: int | None = 1, h0=None):
        if model.num_directions != 1 or model.direction != "forward":
            raise ValueError(
                f"stream() needs a forward, unidirectional model; this one is {model.direction!r} "
                "(a reverse direction needs the whole sequence: call the model instead)"
            )
        self.unbatched = batch_size is None
        batch = 1 if batch_size is None else batch_size
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        self.model = model
        self.batch_size = int(batch)
        H, L = model.hidden_size, model.num_layers
        # The state alternates between two buffers: a step reads one as h0 and writes the other as h_n.
        self._states = (np.zeros((L, self.batch_size, H), model.dtype), np.zeros((L, self.batch_size, H), model.dtype))
        self._current = 0
        self._h0 = None
        self._x_shape = (model.input_size,) if self.unbatched else (self.batch_size, model.input_size)
        self._y_shape = (H,) if self.unbatched else (self.batch_size, H)
        self._lock = threading.Lock()  # one state: steps, resets and reads of it take turns
        _LOCK_OWNERS.add(self)
        self.reset(h0)

    @property
    def state(self) -> np.ndarray:
        """A copy of the current state, (L, B, H) — (L, H) for an unbatched stream."""
        with self._lock:
            state = self._states[self._current].copy()
        return state[:, 0] if self.unbatched else state

    def reset(self, h0=None) -> None:
        """Return to ``h0`` (or zeros; or the h0 the stream was created with when omitted)."""
        if h0 is not None:
            L, B, H = self._states[0].shape
            expected = (L, H) if self.unbatched else (L, B, H)
            h0 = as_float_array(h0, "h0", self.model.dtype)
            if h0.shape != expected:
                axes = "num_layers, hidden" if self.unbatched else "num_layers, batch, hidden"
                raise ValueError(f"h0 must have shape {expected} ({axes}), got {h0.shape}")
            h0 = h0.reshape((L, B, H)).copy()
        with self._lock:
            if h0 is not None:
                self._h0 = h0
            state = self._states[self._current]
            if self._h0 is None:
                state[...] = 0
            else:
                state[...] = self._h0

    def step(self, x_t, out=None) -> np.ndarray:
        """Advance one time step; returns the last layer's output (B, H), or (H,) unbatched."""
        x_t, y, inputs = self._checked(x_t, out)
        with self._lock:  # one stream, one state: steps from several threads take turns
            current = self._current
            self.model._run(x_t, 1, self.batch_size, False, self._states[current], None, y,
                            self._states[1 - current], inputs)
            self._current = 1 - current
        return y

    def bind(self, x_t, out=None) -> "BoundStep":
        """Check a step's arrays once; the returned :class:`BoundStep` advances the stream on ``x_t``'s
        current contents (see :meth:`GRU.bind`).  ``x_t`` must be a C-contiguous array of the model's
        dtype; without ``out`` the output is allocated once and overwritten by every step."""
        x_t = as_in_place_array(x_t, "x_t", self.model.dtype)
        return BoundStep(self, *self._checked(x_t, out))

    def _checked(self, x_t, out):
        """Validate a step's arguments: (x_t, y, inputs) as for GRU._checked."""
        model = self.model
        x_given = x_t
        x_t = as_float_array(x_t, "x_t", model.dtype)
        y_shape = self._y_shape
        if x_t.shape != self._x_shape:
            if self.batch_size == 1 and x_t.shape == (model.input_size,):
                y_shape = (model.hidden_size,)  # one row: (I,) -> (H,), same memory as (1, I) -> (1, H)
            else:
                also = f" or ({model.input_size},)" if self.batch_size == 1 and not self.unbatched else ""
                raise ValueError(f"x_t must have shape {self._x_shape}{also}, got {x_t.shape}")
        if out is None:
            return x_t, np.empty(y_shape, model.dtype), None
        return x_t, check_out_array(out, "out", y_shape, model.dtype), {"x_t": x_given}


class BoundStep:
    """A stream step whose arrays were checked once (see :meth:`Stream.bind`); ``step()`` returns y."""

    def __init__(self, stream: Stream, x_t, y, inputs):
        model = stream.model
        x_addr, y_addr = address(x_t), address(y)
        if inputs is not None:
            check_no_overlap({"y": (y, y_addr)}, inputs, known={id(x_t): x_addr})
        self.y = y
        self._stream = stream
        self._dtype = model.dtype
        self._x_t = x_t  # alive as long as the binding: the kernel reads it by address
        batch = stream.batch_size
        threads = parallel_threads() if batch * model._macs_per_step >= _PARALLEL_MIN_MACS else 1
        plan = model._make_plan(1, batch, threads)
        serial = model._make_plan(1, batch, 1) if plan.parallel else plan
        self._plans = (plan, serial)
        states = [address(state) for state in stream._states]

        def args(current, chosen):  # the stream's state alternates: read states[current], write the other
            return model._kernel_args(x_addr, 1, batch, False, states[current], 0, y_addr, states[1 - current],
                                      chosen)

        self._parallel_args = (args(0, plan), args(1, plan)) if plan.parallel else None
        self._serial_args = (args(0, serial), args(1, serial))

    def __call__(self) -> np.ndarray:
        stream = self._stream
        plan, serial = self._plans
        with stream._lock:
            current = stream._current
            if plan.parallel and _PARALLEL.acquire(plan):
                _launch(self._dtype, plan, self._parallel_args[current])
            else:
                _launch(self._dtype, serial, self._serial_args[current])
            stream._current = 1 - current
        return self.y
