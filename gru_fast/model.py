"""The engine's model: GRU weights in kernel layout, and the calls that run them.

A :class:`GRU` is built from per-layer ``(W, R, B)`` arrays in ONNX layout and
gate order (z, r, h) — the one canonical form every converter produces.  At
construction the weights are laid out once for the kernels (:mod:`gru_fast._layout`: ``W`` and ``R``
packed in unit tiles of 16 hidden units, biases pre-summed where the equations allow, everything in one
flat ``params`` array with an int64 ``meta`` table of offsets).

How a call is shared between threads, its workspace and its launch belong to :mod:`gru_fast._schedule`;
here every call path validates its arguments and hands their operands to the scheduler: model calls and
bindings through a :class:`_Call` and :func:`_prepare`, a stream step (the call that must cost least) by
writing its few operands itself.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Sequence

import numpy as np

from . import _layout, _schedule
from ._bf16 import from_bf16, to_bf16
from ._memory import address
from ._validate import as_float_array, as_in_place_array, as_lengths, check_no_overlap, check_out_array
from .activations import Activation, parse_activations

__all__ = ["GRU", "Stream", "BoundCall", "BoundStep"]

_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def _as_dtype(dtype) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in _DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def _as_weights(weights, dtype: np.dtype) -> str:
    if weights is None or (isinstance(weights, str) and weights == dtype.name):
        return dtype.name
    if not isinstance(weights, str) or weights != "bfloat16":
        raise ValueError(f"weights must be None, 'bfloat16' or the dtype's name {dtype.name!r}, got {weights!r}")
    if dtype != np.float32:
        raise ValueError(f"weights='bfloat16' computes in float32: dtype must be float32, got {dtype.name}")
    return weights


def build_nbytes(input_size: int, hidden_size: int, num_layers: int = 1, num_directions: int = 1,
                 dtype="float32", weights: str | None = None) -> int:
    """Bytes that building a :class:`GRU` of this shape allocates at its peak, beyond the caller's arrays
    (:func:`gru_fast._layout.build_nbytes`).  A loader charges this against its ``max_bytes`` before it
    reads the weights (see :func:`gru_fast.load`)."""
    bf16 = _as_weights(weights, _as_dtype(dtype)) == "bfloat16"
    return _layout.build_nbytes(input_size, hidden_size, num_layers, num_directions, _as_dtype(dtype).itemsize,
                                bf16)


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
    weights : {"bfloat16"}, optional
        Store W and R rounded to bfloat16 (nearest, ties to even, as ``torch.bfloat16``); biases, state and
        arithmetic stay float32 (``dtype`` must be float32).  Half the bytes a step streams; see
        :meth:`with_weights`.  By default W and R are stored in ``dtype``.
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
        weights: str | None = None,
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
        self.weights = _as_weights(weights, self.dtype)
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
        self._kernel_model = _schedule.kernel_model(self._params, self._meta, self.input_size, self.hidden_size,
                                                    self.num_directions, self.num_layers, self.linear_before_reset,
                                                    self.weights)
        weakref.finalize(self, _schedule.drop_plans, self._kernel_model.token)  # its idle plans go with it

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
            W, R, B = cast(W), cast(R), cast(B)
            if self.weights == "bfloat16":  # the model is its rounded weights: kept, saved and pickled as such
                W, R = from_bf16(to_bf16(W)), from_bf16(to_bf16(R))
            checked.append((W, R, B))
        return checked

    def _pack(self):
        """Lay the weights out once for the kernels (gru_fast._layout)."""
        return _layout.pack(self._weights, self.input_size, self.hidden_size, self.linear_before_reset,
                            self.direction == "reverse", self.clip, self.activations, self.dtype,
                            bf16=self.weights == "bfloat16")

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
            **({"weights": self.weights} if self.weights == "bfloat16" else {}),
        )

    def astype(self, dtype) -> "GRU":
        """A copy computing in another precision."""
        return GRU(self._weights, **dict(self._config(), dtype=_as_dtype(dtype)))

    def with_weights(self, weights: str) -> "GRU":
        """A new model whose W and R are stored as ``weights``: "bfloat16" (float32 arithmetic, see the
        class's ``weights``), or "float32" / "float64" (W and R in that dtype, which the model then
        computes in).  A model made from a bfloat16 one keeps the rounded values: rounding is not undone."""
        if not isinstance(weights, str) or weights not in _layout.WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(map(repr, _layout.WEIGHTS))}, got {weights!r}")
        config = dict(self._config(), dtype="float32" if weights == "bfloat16" else weights)
        config.pop("weights", None)
        return GRU(self._weights, **config, weights="bfloat16" if weights == "bfloat16" else None)

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
            f"direction={self.direction!r}{extra}, bias={self.has_bias}, dtype={self.dtype.name}"
            f"{', weights=' + repr(self.weights) if self.weights == 'bfloat16' else ''})"
        )

    # ---- running ------------------------------------------------------------

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
        if call.batch:  # no sequences: y and h_n are empty
            _schedule.run(self._kernel_model, _prepare(call))
        return call.y, call.h_n

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
        return BoundCall(self._kernel_model, self._checked(x, h0, lengths, out))

    def _checked(self, x, h0, lengths, out) -> "_Call":
        """Validate a call's arguments (see _Call)."""
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
        return _Call(x, steps, batch, self.batch_first and len(shape) == 3, h0, lengths, y, h_n, inputs)

    def stream(self, batch_size: int | None = 1, h0=None) -> "Stream":
        """A streaming session that advances every layer one time step per :meth:`Stream.step`.

        ``batch_size=None`` streams a single unbatched sequence: steps take (I,)
        and return (H,).  Only unidirectional, forward models can stream.
        """
        return Stream(self, batch_size, h0)


def _rebuild(weights, config):
    return GRU(weights, **config)


class _Call(NamedTuple):
    """A call's arguments, validated (GRU._checked; a bound stream step: its x_t and y, and the stream's state
    buffers as h0 and h_n).  Every array is C-contiguous in the model's dtype."""

    x: np.ndarray
    steps: int
    batch: int
    batch_major: bool  # x and y are (B, T, ...)
    h0: np.ndarray | None
    lengths: np.ndarray | None  # int64
    y: np.ndarray
    h_n: np.ndarray
    inputs: dict | None  # with out=: the caller's own arrays by name, which the outputs must not overlap


def _prepare(call: _Call) -> _schedule.Operands:
    """The kernel's operands of a validated call with at least one sequence.  First, when ``call.inputs``
    names the caller's arrays, the caller's outputs that overlap them (copies or not) are refused.  The
    calls of GRU.__call__, GRU.bind and Stream.bind come through here; Stream.step writes its operands
    itself (its overlap check is Stream._checked's)."""
    x_addr, y_addr, h_n_addr = address(call.x), address(call.y), address(call.h_n)
    h0_addr = 0 if call.h0 is None else address(call.h0)
    if call.inputs is not None:
        check_no_overlap({"y": (call.y, y_addr), "h_n": (call.h_n, h_n_addr)}, call.inputs,
                         known={id(call.x): x_addr, id(call.h0): h0_addr})
    lengths_addr = 0 if call.lengths is None else address(call.lengths)
    return _schedule.Operands(x_addr, call.steps, call.batch, int(call.batch_major), h0_addr, lengths_addr, y_addr,
                              h_n_addr)


def _no_sequences() -> None:
    """A bound call of batch 0: nothing to run, y and h_n stay empty."""


class BoundCall:
    """A model call whose arrays were checked once (see :meth:`GRU.bind`); ``call()`` returns (y, h_n)."""

    def __init__(self, kernel_model: _schedule.KernelModel, call: _Call):
        self.y, self.h_n = call.y, call.h_n
        self._guard = _schedule.Guard()  # calls from several threads take turns
        if call.batch == 0:
            self._launch = _no_sequences
            return
        if call.lengths is not None:
            # checked once, so the kernel must not see later edits of the caller's
            call = call._replace(lengths=call.lengths.copy())
        binding = _schedule.bind(kernel_model, [_prepare(call)])
        self._kept = (call, binding)  # the arrays, weights and workspaces the kernel reads by address
        (self._launch,) = binding.launches

    def __call__(self):
        with self._guard.lock:
            self._launch()
        return self.y, self.h_n


class _StreamState(_schedule.Guard):
    """A stream's state in two buffers (L, B, H): a step reads ``buffers[current]`` as h0, writes the other
    as h_n, then switches ``current``, all under ``lock`` (steps, resets and reads take turns).  The
    buffers are written in place, never replaced: ``addresses`` holds their data addresses."""

    __slots__ = ("buffers", "addresses", "current")

    def __init__(self, shape: tuple, dtype: np.dtype):
        super().__init__()
        self.buffers = (np.zeros(shape, dtype), np.zeros(shape, dtype))
        self.addresses = tuple(address(buffer) for buffer in self.buffers)
        self.current = 0

    def call(self, x_t: np.ndarray, y: np.ndarray, current: int) -> _Call:
        """The one-step call on ``x_t`` from state buffer ``current`` (x_t and y checked by Stream._checked)."""
        buffers = self.buffers
        return _Call(x_t, 1, buffers[0].shape[1], False, buffers[current], None, y, buffers[1 - current], None)


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
        self._kernel_model = model._kernel_model
        self._runner = _schedule.ShapeRunner(self._kernel_model, 1, self.batch_size)
        self._state = _StreamState((L, self.batch_size, H), model.dtype)
        self._h0 = None
        self._x_shape = (model.input_size,) if self.unbatched else (self.batch_size, model.input_size)
        self._y_shape = (H,) if self.unbatched else (self.batch_size, H)
        self.reset(h0)

    @property
    def state(self) -> np.ndarray:
        """A copy of the current state, (L, B, H) — (L, H) for an unbatched stream."""
        state = self._state
        with state.lock:
            copy = state.buffers[state.current].copy()
        return copy[:, 0] if self.unbatched else copy

    def reset(self, h0=None) -> None:
        """Return to ``h0`` (or zeros; or the h0 the stream was created with when omitted)."""
        state = self._state
        if h0 is not None:
            L, B, H = state.buffers[0].shape
            expected = (L, H) if self.unbatched else (L, B, H)
            h0 = as_float_array(h0, "h0", self.model.dtype)
            if h0.shape != expected:
                axes = "num_layers, hidden" if self.unbatched else "num_layers, batch, hidden"
                raise ValueError(f"h0 must have shape {expected} ({axes}), got {h0.shape}")
            h0 = h0.reshape((L, B, H)).copy()
        with state.lock:
            if h0 is not None:
                self._h0 = h0
            current = state.buffers[state.current]
            if self._h0 is None:
                current[...] = 0
            else:
                current[...] = self._h0

    def step(self, x_t, out=None) -> np.ndarray:
        """Advance one time step; returns the last layer's output (B, H), or (H,) unbatched."""
        x_t, y, x_addr, y_addr = self._checked(x_t, out)
        state = self._state
        with state.lock:  # one stream, one state: steps from several threads take turns
            current = state.current
            h = state.addresses
            self._runner(_schedule.Operands(x_addr, 1, self.batch_size, 0, h[current], 0, y_addr, h[1 - current]))
            state.current = 1 - current
        return y

    def bind(self, x_t, out=None) -> "BoundStep":
        """Check a step's arrays once; the returned :class:`BoundStep` advances the stream on ``x_t``'s
        current contents (see :meth:`GRU.bind`).  ``x_t`` must be a C-contiguous array of the model's
        dtype; without ``out`` the output is allocated once and overwritten by every step."""
        x_t, y = self._checked(as_in_place_array(x_t, "x_t", self.model.dtype), out)[:2]
        state = self._state
        binding = _schedule.bind(self._kernel_model, [_prepare(state.call(x_t, y, c)) for c in (0, 1)])
        return BoundStep(state, binding, x_t, y)

    def _checked(self, x_t, out):
        """Validate a step's arguments: (x_t, y, their data addresses); an ``out`` that shares memory with the
        caller's x_t is refused."""
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
        x_addr = address(x_t)
        if out is None:
            y = np.empty(y_shape, model.dtype)
            return x_t, y, x_addr, address(y)
        y = check_out_array(out, "out", y_shape, model.dtype)
        y_addr = address(y)
        # x_t is C-contiguous: when it is the caller's array, address ranges decide (0.2 us against 1.5 for
        # the general check); a converted copy cannot overlap y, but what the caller passed might
        if x_t is not x_given or (x_addr < y_addr + y.nbytes and y_addr < x_addr + x_t.nbytes):
            check_no_overlap({"y": (y, y_addr)}, {"x_t": x_given})
        return x_t, y, x_addr, y_addr


class BoundStep:
    """A stream step whose arrays were checked once (see :meth:`Stream.bind`); ``step()`` returns y."""

    def __init__(self, state: _StreamState, binding: _schedule.Binding, x_t, y):
        self.y = y
        self._state = state
        self._launches = binding.launches  # by the state buffer the step reads
        self._kept = (x_t, binding)  # the arrays, weights and workspaces the kernel reads by address

    def __call__(self) -> np.ndarray:
        state = self._state
        with state.lock:
            current = state.current
            self._launches[current]()
            state.current = 1 - current
        return self.y
