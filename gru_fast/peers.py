"""The peer harness: gru_fast and the engines it is compared with, each set up for its best run, and a fair timer.

``gru-fast demo`` (:mod:`gru_fast._demo`) and the benchmark harness (``python -m bench``) both build their
engines and time them with this module.  Engines (:data:`ENGINES`), each imported only when a runner of
it is built:

- ``gru_fast``: the buffers are bound once, like the peers' IOBinding / shared tensors: a sequence runner
  calls ``model.bind(x, h0, out=(y, h_n))()``, a stream runner ``model.stream(batch_size=B, h0=h0).bind(x_t,
  out=y_t)()`` (the unbound ``model(x, h0, out=...)`` adds its argument checks, about 2-4 us a call).
- ``pytorch``: an ``nn.GRU`` (time-major) under ``torch.inference_mode()``, inputs created once as tensors.
- ``onnxruntime``: a GRU graph (:func:`onnx_gru` or any file with inputs ``x``, ``h0`` and outputs ``y``,
  ``h_n``), ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, inputs and outputs bound once to
  numpy buffers with an ``IOBinding`` (measurably faster than ``session.run`` on small calls).
- ``openvino``: the same graph compiled with ``INFERENCE_NUM_THREADS=threads``,
  ``INFERENCE_PRECISION_HINT=f32`` (no bf16/f16 down-conversion; ``openvino_precision="bf16"`` asks for
  bfloat16 arithmetic instead, where the CPU has it), one stream, latency hint; one infer
  request reused, its tensors sharing memory with numpy buffers, run with ``start_async(); wait()``
  (``infer()`` builds a result dictionary on every call).

One-step calls: the peers run a T=1 sequence call with their state fed back.  To avoid a copy per step
they alternate between two bindings / infer requests whose state buffers are crossed (A -> B, B -> A).

Every runner takes time-major inputs -- x (T, B, I), h0 (L*D, B, H) -- and gives time-major outputs
(:class:`Runner`), whatever the layout of the model it runs.

Timing (:func:`time_interleaved`): every engine of a case is built first; then, round after round, the
engines run in a freshly shuffled order, each timing a batch of calls (sized so a batch lasts about
``batch_seconds``, so the timer's resolution does not matter).  Each batch gives one per-call sample; the
figure is the median over the quiet rounds: a round during which other processes used more than
:data:`BUSY_SHARE` of the CPUs is left out (:class:`CpuMeter`, :func:`quiet_rounds`), and when too few
rounds are quiet every round counts and the figures carry :func:`busy_warning`.  Before each batch the
harness sleeps a few milliseconds (thread pools of the previous engine stop spinning) and makes one
untimed call (wakes this engine's pool); the garbage collector is off while a batch runs.

Threads: :func:`limit_threads` (process-wide) and :func:`thread_limit` (for a block) give gru_fast its
count through :func:`gru_fast.set_num_threads` and every BLAS / OpenMP runtime loaded so far through
threadpoolctl when it is installed; the peers get theirs when built.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "BUSY_SHARE", "ENGINES", "ENGINE_LABELS", "ENGINE_MODULES", "ONNX_OPSET", "OPENVINO_PRECISIONS", "THREADS",
    "CpuMeter", "GruFastSequence", "GruFastStream", "OpenVinoSequence", "OpenVinoStream", "OrtSequence", "OrtStream",
    "Runner", "ThreadPinned", "Timing", "TorchSequence", "TorchStream", "build_runner", "busy_warning",
    "calibrate", "limit_threads", "missing_reason", "onnx_gru", "openvino_config", "ort_session", "ov_compile",
    "quiet_rounds", "seconds_per_call", "thread_limit", "threadpool_summary", "time_interleaved", "timing",
    "torch_gru",
]

#: threads per engine unless told otherwise
THREADS = 2
ENGINES = ("gru_fast", "pytorch", "onnxruntime", "openvino")
ENGINE_LABELS = {"gru_fast": "gru_fast", "pytorch": "PyTorch", "onnxruntime": "ONNX Runtime",
                 "openvino": "OpenVINO"}
#: the module each engine imports
ENGINE_MODULES = {"gru_fast": "gru_fast", "pytorch": "torch", "onnxruntime": "onnxruntime",
                  "openvino": "openvino"}
ONNX_OPSET = 17


def missing_reason(engine: str) -> str | None:
    """None when ``engine``'s module imports here, else why not (e.g. "not installed (openvino)")."""
    if engine not in ENGINE_MODULES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    try:
        importlib.import_module(ENGINE_MODULES[engine])
    except ImportError as exc:
        return f"not installed ({exc.name or exc})"
    return None


# --------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------

_LIMITER = None  # the process-wide threadpoolctl limit of limit_threads (kept alive on purpose)


def _numba_count(threads: int) -> int:
    from numba.core import config

    return max(1, min(threads, config.NUMBA_NUM_THREADS))


def limit_threads(threads: int = THREADS) -> dict:
    """Give gru_fast ``threads`` threads for the rest of the process (:func:`gru_fast.set_num_threads`, at
    most ``NUMBA_NUM_THREADS``), PyTorch too when it is imported, and every BLAS / OpenMP runtime loaded so
    far by threadpoolctl when installed (ONNX Runtime and OpenVINO get theirs per session).

    Returns a description of the thread pools for a report."""
    global _LIMITER
    import gru_fast

    gru_fast.set_num_threads(_numba_count(threads))
    info = {"threads": threads, "numba_threads": gru_fast.get_num_threads(),
            "numba_threading_layer": gru_fast.threading_layer()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # only allowed before any inter-op work
            torch.set_num_interop_threads(1)
        info["torch_threads"] = torch.get_num_threads()
    try:
        import threadpoolctl
    except ImportError:
        info["threadpoolctl"] = "not installed: BLAS pools limited through the environment only"
    else:
        _LIMITER = threadpoolctl.threadpool_limits(limits=threads)
        info["threadpools"] = threadpool_summary()
    return info


@contextlib.contextmanager
def thread_limit(threads: int):
    """gru_fast on ``threads`` threads (at most ``NUMBA_NUM_THREADS``) and every BLAS / OpenMP runtime
    loaded so far too (threadpoolctl, when installed) for the block; the counts before are put back."""
    import gru_fast

    try:
        import threadpoolctl
    except ImportError:
        limiter = contextlib.nullcontext()
    else:
        limiter = threadpoolctl.threadpool_limits(limits=threads)
    with gru_fast.threads(_numba_count(threads)), limiter:
        yield


def threadpool_summary() -> list[dict] | str:
    """The BLAS / OpenMP runtimes loaded in this process and their thread counts (threadpoolctl)."""
    try:
        import threadpoolctl
    except ImportError:
        return "threadpoolctl not installed"
    return [{k: pool.get(k) for k in ("user_api", "internal_api", "num_threads", "version", "filepath")}
            for pool in threadpoolctl.threadpool_info()]


# --------------------------------------------------------------------------------------------------
# the peers' models, built from a gru_fast model's weights
# --------------------------------------------------------------------------------------------------

def torch_gru(model):
    """A time-major ``nn.GRU`` (eval mode) with the weights of ``model`` (forward or bidirectional,
    stacked, ``linear_before_reset``: PyTorch's own cell).  ONNX's gate order z, r, h becomes PyTorch's
    r, z, n."""
    import torch

    if not model.linear_before_reset:
        raise ValueError("model must use linear_before_reset=1 (PyTorch's cell) to run as an nn.GRU")
    H, D = model.hidden_size, model.num_directions
    module = torch.nn.GRU(model.input_size, H, num_layers=model.num_layers, bidirectional=D == 2)
    reorder = np.r_[H : 2 * H, 0:H, 2 * H : 3 * H]
    state = {}
    for layer, (W, R, B) in enumerate(model.onnx_weights()):
        for d in range(D):
            suffix = f"l{layer}" + ("_reverse" if d else "")
            state[f"weight_ih_{suffix}"] = W[d][reorder]
            state[f"weight_hh_{suffix}"] = R[d][reorder]
            state[f"bias_ih_{suffix}"] = B[d, : 3 * H][reorder]
            state[f"bias_hh_{suffix}"] = B[d, 3 * H :][reorder]
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()})
    return module.eval()


def onnx_gru(model, steps: int, batch: int):
    """A time-major ONNX graph (``onnx.ModelProto``) of ``model``: x (T, B, I), h0 (L*D, B, H) -> y (T, B,
    D*H), h_n (L*D, B, H), float32, shapes fixed to ``steps`` and ``batch``.

    One GRU node per layer (``linear_before_reset`` as the model's), each layer's initial state sliced
    from h0, and between layers what ``torch.onnx.export`` writes for a stacked ``nn.GRU``: Squeeze of the
    directions axis (forward), Transpose and Reshape to (T, B, 2H) (bidirectional)."""
    from onnx import TensorProto, helper, numpy_helper

    L, H, I, D = model.num_layers, model.hidden_size, model.input_size, model.num_directions
    direction = "bidirectional" if D == 2 else "forward"
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([steps, batch, D * H], np.int64), "y_shape")]
    nodes, layer_input, finals = [], "x", []
    for layer, (W, R, B) in enumerate(model.onnx_weights()):
        names = [f"W{layer}", f"R{layer}", f"B{layer}"]
        inits += [numpy_helper.from_array(np.asarray(a, np.float32), n) for a, n in zip((W, R, B), names)]
        inits += [numpy_helper.from_array(np.array([layer * D], np.int64), f"start{layer}"),
                  numpy_helper.from_array(np.array([(layer + 1) * D], np.int64), f"end{layer}")]
        nodes.append(helper.make_node("Slice", ["h0", f"start{layer}", f"end{layer}"], [f"h0_{layer}"]))
        nodes.append(helper.make_node("GRU", [layer_input, *names, "", f"h0_{layer}"], [f"Y{layer}", f"Yh{layer}"],
                                      hidden_size=H, linear_before_reset=int(model.linear_before_reset),
                                      direction=direction))
        layer_input = "y" if layer == L - 1 else f"x{layer + 1}"
        if D == 1:
            nodes.append(helper.make_node("Squeeze", [f"Y{layer}", "axis1"], [layer_input]))
        else:
            nodes.append(helper.make_node("Transpose", [f"Y{layer}"], [f"Yt{layer}"], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Reshape", [f"Yt{layer}", "y_shape"], [layer_input]))
        finals.append(f"Yh{layer}")
    nodes.append(helper.make_node("Concat", finals, ["h_n"], axis=0) if L > 1
                 else helper.make_node("Identity", finals, ["h_n"]))
    graph = helper.make_graph(
        nodes, "gru_fast_peer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, batch, I]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [L * D, batch, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [steps, batch, D * H]),
         helper.make_tensor_value_info("h_n", TensorProto.FLOAT, [L * D, batch, H])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])


# --------------------------------------------------------------------------------------------------
# runners: one engine set up for one fixed input
# --------------------------------------------------------------------------------------------------

class Runner:
    """One engine set up for one case.  ``call()`` runs one timed call on inputs fixed at build time.

    Sequence runners: ``outputs()`` is (y (T, B, D*H), h_n (L*D, B, H)) of the last call.
    Stream runners (``stream = True``) also have ``reset(h0)`` and ``set_frame(x_t)`` (B, I), and
    ``outputs()`` is (y_t (B, H), state (L, B, H)).  ``config`` describes the setup for a report.
    """

    engine = ""
    stream = False

    def __init__(self):
        self.config: dict = {}

    def context(self):
        """Entered around a batch of calls (torch: inference mode; :class:`ThreadPinned`: the limits)."""
        return contextlib.nullcontext()

    def call(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def outputs(self):  # pragma: no cover - overridden
        raise NotImplementedError


def _f32(shape):
    return np.zeros(shape, np.float32)


class GruFastSequence(Runner):
    engine = "gru_fast"

    def __init__(self, model, x, h0):
        super().__init__()
        T, B, _ = x.shape
        D, H = model.num_directions, model.hidden_size
        self.batch_first = model.batch_first
        self.x = np.ascontiguousarray(x.transpose(1, 0, 2) if self.batch_first else x, np.float32)
        self.h0 = np.array(h0, np.float32)
        self.y = _f32((B, T, D * H) if self.batch_first else (T, B, D * H))
        self.h_n = _f32(self.h0.shape)
        self.model = model  # alive as long as the runner: a BoundCall reads the weights by address only
        self.call = model.bind(self.x, self.h0, out=(self.y, self.h_n))
        self.config = {"call": "model.bind(x, h0, out=(y, h_n))()"}

    def outputs(self):
        y = self.y.transpose(1, 0, 2) if self.batch_first else self.y
        return y.copy(), self.h_n.copy()


class GruFastStream(Runner):
    engine = "gru_fast"
    stream = True

    def __init__(self, model, x, h0):
        super().__init__()
        B = x.shape[1]
        self.session = model.stream(batch_size=B, h0=h0)
        self.x_t, self.y_t = _f32((B, model.input_size)), _f32((B, model.hidden_size))
        self.set_frame(x[0])
        self.call = self.session.bind(self.x_t, out=self.y_t)
        self.config = {"call": "model.stream(batch_size=B, h0).bind(x_t, out=y_t)()"}

    def set_frame(self, x_t):
        self.x_t[...] = x_t

    def reset(self, h0):
        self.session.reset(h0)

    def outputs(self):
        return self.y_t.copy(), self.session.state.copy()


class _Torch(Runner):
    engine = "pytorch"

    def __init__(self, module):
        super().__init__()
        import torch

        if module.batch_first:
            raise ValueError("the module must be time-major (batch_first=False): runners take x as (T, B, I)")
        self._torch = torch

    def context(self):
        return self._torch.inference_mode()


class TorchSequence(_Torch):
    def __init__(self, module, x, h0):
        super().__init__(module)
        torch = self._torch
        self.x, self.h0 = torch.from_numpy(np.array(x, np.float32)), torch.from_numpy(np.array(h0, np.float32))
        self.result = None
        x, h0 = self.x, self.h0

        def call():
            self.result = module(x, h0)
        self.call = call
        self.config = {"call": "module(x, h0) under torch.inference_mode()", "threads": torch.get_num_threads()}

    def outputs(self):
        y, h_n = self.result
        return y.numpy().copy(), h_n.numpy().copy()


class TorchStream(_Torch):
    stream = True

    def __init__(self, module, x, h0):
        super().__init__(module)
        torch = self._torch
        self.x = torch.from_numpy(np.array(x[:1], np.float32))  # (1, B, I)
        self.y = None
        self.reset(h0)
        x = self.x

        def call():
            self.y, self.h = module(x, self.h)
        self.call = call
        self.config = {"call": "y, h = module(x_t[None], h) (T=1, state fed back) under inference_mode",
                       "threads": torch.get_num_threads()}

    def set_frame(self, x_t):
        self.x.numpy()[0] = x_t

    def reset(self, h0):
        self.h = self._torch.from_numpy(np.array(h0, np.float32))

    def outputs(self):
        return self.y.numpy()[0].copy(), self.h.numpy().copy()


def _graph_bytes(onnx_file) -> bytes:
    return onnx_file if isinstance(onnx_file, bytes) else Path(onnx_file).read_bytes()


def ort_session(onnx_file, threads: int = THREADS):
    """An ONNX Runtime CPU session of ``onnx_file`` (a path or the serialized model) on ``threads`` intra-op
    threads, one inter-op thread, sequential, every graph optimisation -> (session, config for a report)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    source = onnx_file if isinstance(onnx_file, bytes) else str(onnx_file)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    ops = []
    with contextlib.suppress(Exception):  # informational: the graph's operators
        import onnx

        ops = [node.op_type for node in onnx.load_from_string(_graph_bytes(onnx_file)).graph.node]
    config = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "io_binding": True, "graph": ops,
              "providers": session.get_providers()}
    return session, config


def _bind(binding, name, array, output=False):
    bind = binding.bind_output if output else binding.bind_input
    bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)


class OrtSequence(Runner):
    engine = "onnxruntime"

    def __init__(self, onnx_file, x, h0, threads: int = THREADS):
        super().__init__()
        self.session, self.config = ort_session(onnx_file, threads)
        self.x, self.h0 = np.array(x, np.float32), np.array(h0, np.float32)
        y, h_n = self.session.run(["y", "h_n"], {"x": self.x, "h0": self.h0})  # the output shapes
        self.y, self.h_n = _f32(y.shape), _f32(h_n.shape)
        binding = self.session.io_binding()
        _bind(binding, "x", self.x)
        _bind(binding, "h0", self.h0)
        _bind(binding, "y", self.y, output=True)
        _bind(binding, "h_n", self.h_n, output=True)
        run = self.session.run_with_iobinding
        self.call = lambda: run(binding)
        self.config["call"] = "session.run_with_iobinding(binding) (x, h0, y, h_n bound to numpy buffers)"

    def outputs(self):
        return self.y.copy(), self.h_n.copy()


class _CrossedStream(Runner):
    """A peer's one-step runner whose two state buffers are crossed (``states``, ``current``): step i
    reads states[current] and writes the other, so the state is fed back without a copy."""

    stream = True

    def _buffers(self, x, h0):
        self.x = np.array(x[:1], np.float32)  # (1, B, I)
        self.states = (np.array(h0, np.float32), _f32(np.shape(h0)))
        self.y = _f32((1, self.x.shape[1], self.states[0].shape[2]))
        self.current = 0

    def set_frame(self, x_t):
        self.x[0] = x_t

    def reset(self, h0):
        self.states[0][...] = h0
        self.current = 0

    def outputs(self):
        return self.y[0].copy(), self.states[self.current].copy()


class OrtStream(_CrossedStream):
    engine = "onnxruntime"

    def __init__(self, onnx_file, x, h0, threads: int = THREADS):
        super().__init__()
        self.session, self.config = ort_session(onnx_file, threads)
        self._buffers(x, h0)
        self.bindings = []
        for src, dst in ((0, 1), (1, 0)):  # two bindings with crossed state buffers: no copy per step
            binding = self.session.io_binding()
            _bind(binding, "x", self.x)
            _bind(binding, "h0", self.states[src])
            _bind(binding, "y", self.y, output=True)
            _bind(binding, "h_n", self.states[dst], output=True)
            self.bindings.append(binding)
        run = self.session.run_with_iobinding

        def call():
            run(self.bindings[self.current])
            self.current ^= 1
        self.call = call
        self.config["call"] = ("run_with_iobinding on a T=1 model, alternating two bindings whose "
                               "h0 / h_n buffers are crossed (state fed back without a copy)")


#: the values of OpenVINO's ``INFERENCE_PRECISION_HINT`` a runner may ask for
OPENVINO_PRECISIONS = ("f32", "bf16", "f16")


def openvino_config(threads: int = THREADS, precision: str = "f32") -> dict:
    """What OpenVINO is compiled with: ``threads`` threads, ``precision`` (default f32: no bf16/f16
    down-conversion), one stream, latency hint."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
    return {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"}


def ov_compile(onnx_file, threads: int = THREADS, precision: str = "f32"):
    """OpenVINO's CPU model of ``onnx_file`` (a path or the serialized model) -> (openvino, compiled model,
    config for a report); with ``precision="f32"`` raises if OpenVINO did not keep f32.  Another
    precision is a hint the CPU plugin may not follow (bf16 without the instructions for it): the
    precision it compiled with is ``config["INFERENCE_PRECISION_HINT"]``."""
    import openvino as ov

    core = ov.Core()
    requested = openvino_config(threads, precision)
    source = core.read_model(onnx_file, b"") if isinstance(onnx_file, bytes) else str(onnx_file)
    compiled = core.compile_model(source, "CPU", dict(requested))
    config = {"requested": requested}
    for key in requested:
        with contextlib.suppress(Exception):
            config[key] = str(compiled.get_property(key))
    compiled_precision = config.get("INFERENCE_PRECISION_HINT", "")
    if precision == "f32" and compiled_precision and "32" not in compiled_precision:
        raise RuntimeError(f"OpenVINO compiled with precision {compiled_precision}, expected f32")
    return ov, compiled, config


def _ov_request(ov, compiled, tensors: dict):
    request = compiled.create_infer_request()
    for port in list(compiled.inputs) + list(compiled.outputs):
        request.set_tensor(port, ov.Tensor(tensors[port.get_any_name()], shared_memory=True))
    return request


class OpenVinoSequence(Runner):
    engine = "openvino"

    def __init__(self, onnx_file, x, h0, threads: int = THREADS, precision: str = "f32"):
        super().__init__()
        ov, compiled, self.config = ov_compile(onnx_file, threads, precision)
        self.x, self.h0 = np.array(x, np.float32), np.array(h0, np.float32)
        shapes = {port.get_any_name(): tuple(port.get_shape()) for port in compiled.outputs}
        self.y, self.h_n = _f32(shapes["y"]), _f32(shapes["h_n"])
        request = _ov_request(ov, compiled, {"x": self.x, "h0": self.h0, "y": self.y, "h_n": self.h_n})
        self._request = request
        start, wait = request.start_async, request.wait

        def call():
            start()
            wait()
        self.call = call
        self.config["call"] = "request.start_async(); request.wait() (one reused request, shared tensors)"

    def outputs(self):
        return self.y.copy(), self.h_n.copy()


class OpenVinoStream(_CrossedStream):
    engine = "openvino"

    def __init__(self, onnx_file, x, h0, threads: int = THREADS, precision: str = "f32"):
        super().__init__()
        ov, compiled, self.config = ov_compile(onnx_file, threads, precision)
        self._buffers(x, h0)
        self.requests = [
            _ov_request(ov, compiled, {"x": self.x, "h0": self.states[src], "y": self.y, "h_n": self.states[dst]})
            for src, dst in ((0, 1), (1, 0))
        ]
        pairs = [(r.start_async, r.wait) for r in self.requests]

        def call():
            start, wait = pairs[self.current]
            start()
            wait()
            self.current ^= 1
        self.call = call
        self.config["call"] = ("start_async(); wait() on a T=1 model, alternating two requests whose "
                               "h0 / h_n tensors are crossed (state fed back without a copy)")


class ThreadPinned(Runner):
    """Another runner, run with ``threads`` threads (gru_fast and BLAS, :func:`thread_limit`).  A gru_fast
    binding plans its call when it is made, so build the runner under ``thread_limit(threads)`` too."""

    def __init__(self, runner: Runner, threads: int):
        super().__init__()
        self.inner, self.threads = runner, threads
        self.engine, self.stream = runner.engine, runner.stream
        self.call = runner.call
        self.config = dict(runner.config, threads=threads)

    @contextlib.contextmanager
    def context(self):
        with thread_limit(self.threads), self.inner.context():
            yield

    def outputs(self):
        return self.inner.outputs()


def build_runner(engine: str, x, h0, *, stream: bool = False, model=None, torch_module=None, onnx_file=None,
                 threads: int = THREADS, openvino_precision: str = "f32") -> Runner:
    """``engine`` set up on x (T, B, I) from h0 (L*D, B, H); a stream runner steps through ``x[0]``.

    ``model`` (a :class:`gru_fast.GRU`) is what gru_fast runs, and what the peers' models are built from
    when not given: ``torch_module`` (else :func:`torch_gru`), ``onnx_file`` (a path or the serialized
    model; else :func:`onnx_gru`).  ONNX Runtime and OpenVINO run on ``threads`` threads; gru_fast and
    PyTorch on their process-wide counts (:func:`limit_threads`).  ``openvino_precision``: OpenVINO's
    ``INFERENCE_PRECISION_HINT`` (:func:`ov_compile`)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "gru_fast" or (engine == "pytorch" and torch_module is None) or (
            engine in ("onnxruntime", "openvino") and onnx_file is None):
        if model is None:
            raise TypeError(f"building {engine} needs model= (a gru_fast.GRU)")
    if engine == "gru_fast":
        return (GruFastStream if stream else GruFastSequence)(model, x, h0)
    if engine == "pytorch":
        module = torch_gru(model) if torch_module is None else torch_module
        return (TorchStream if stream else TorchSequence)(module, x, h0)
    if onnx_file is None:
        onnx_file = onnx_gru(model, 1 if stream else x.shape[0], x.shape[1]).SerializeToString()
    if engine == "onnxruntime":
        return (OrtStream if stream else OrtSequence)(onnx_file, x, h0, threads)
    return (OpenVinoStream if stream else OpenVinoSequence)(onnx_file, x, h0, threads, openvino_precision)


# --------------------------------------------------------------------------------------------------
# how busy the machine is
# --------------------------------------------------------------------------------------------------

#: a timing round counts as busy when other processes used more than this share of the machine's CPU
#: time while it ran (on 2 cores: half a core); its samples are then left out of the median
BUSY_SHARE = 0.25
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_snapshot():
    """(CPU seconds the whole machine has spent busy, including time stolen by a hypervisor, or None
    without /proc/stat; this process's CPU seconds; wall seconds)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
        machine = (sum(fields) - fields[3] - fields[4]) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        machine = None
    return machine, time.process_time(), time.perf_counter()


class CpuMeter:
    """The share of the machine's CPU time that other processes used since the last :meth:`share`.

    From /proc/stat (the machine's busy time) minus this process's own CPU time, over the wall time
    times the CPUs.  /proc/stat counts in clock ticks (10 ms): the difference of two readings is off
    by less than one tick, so one tick is taken off before a share is reported, and a quiet interval
    never reads as busy.  Without /proc/stat (not Linux) the 1-minute load average stands in, less
    this process's ``threads``.
    """

    def __init__(self, threads: int = 1):
        self.cpus = os.cpu_count() or 1
        self.threads = threads
        self.last = _cpu_snapshot()

    def share(self) -> float:
        now = _cpu_snapshot()
        (machine0, own0, wall0), (machine1, own1, wall1), self.last = self.last, now, now
        if machine0 is None or machine1 is None:
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            return min(1.0, max(0.0, (load - self.threads) / self.cpus))
        others = (machine1 - machine0) - (own1 - own0) - 1.0 / _CLOCK_TICKS
        return min(1.0, max(0.0, others / (max(wall1 - wall0, 1e-9) * self.cpus)))


def quiet_rounds(shares: list, min_rounds: int = 3) -> tuple[list, bool]:
    """Which rounds to keep given each round's :meth:`CpuMeter.share`: (round indices, busy).

    The rounds at or under :data:`BUSY_SHARE`, when there are at least ``min_rounds`` of them
    (``busy`` False); otherwise every round, and ``busy`` True: the figures are then unreliable and
    must be shown with a warning (:func:`busy_warning`).
    """
    quiet = [i for i, share in enumerate(shares) if share <= BUSY_SHARE]
    if len(quiet) >= min(min_rounds, len(shares)):
        return quiet, False
    return list(range(len(shares))), True


def busy_warning(share: float, detail: str = "") -> str:
    """The one-line warning printed beside figures timed on a busy machine."""
    return (f"WARNING: busy machine: other processes used {100 * share:.0f} % of the CPUs while timing"
            f"{f' ({detail})' if detail else ''}; these times are unreliable, rerun on a quiet machine")


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def timing(runner, warm: bool = True):
    """``with timing(runner) as call:`` -- ``runner.call`` inside the runner's context, after one untimed
    call that wakes its engine's thread pool (when ``warm``), with the garbage collector off until the
    block ends.  ``runner`` has ``call`` and ``context()``."""
    call = runner.call
    with runner.context():
        if warm:
            call()
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            yield call
        finally:
            if gc_enabled:
                gc.enable()


def seconds_per_call(runner, calls: int, warm: bool = True) -> float:
    """Seconds per call of a batch of ``calls`` calls, timed as :func:`timing` sets them up."""
    with timing(runner, warm) as call:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        elapsed = time.perf_counter() - start
    return elapsed / calls


def calibrate(runner, batch_seconds: float, max_calls: int = 100_000) -> int:
    """Calls per batch so that one batch lasts about ``batch_seconds`` (at least one call)."""
    # first calls: lazy initialisation, JIT, allocations.  Several: an engine may take another path on
    # its second call (gru_fast's first parallel call of a shape loads that kernel), and a slow call
    # here would leave one call per batch, every batch then starting with its thread pool asleep.
    # Nine calls, or fewer (at least two) once they have taken half a second: a call that slow is past
    # its first-call paths, and nine of them would dominate a quick run.
    started = time.perf_counter()
    seconds_per_call(runner, 1, warm=True)
    for _ in range(7):
        if time.perf_counter() - started > 0.5:
            break
        seconds_per_call(runner, 1, warm=False)
    calls = 1
    while True:
        per_call = seconds_per_call(runner, calls, warm=False)
        if per_call * calls >= batch_seconds / 5 or calls >= max_calls:
            break
        calls *= 4
    return max(1, min(max_calls, round(batch_seconds / max(per_call, 1e-9))))


@dataclass
class Timing:
    """Per-call time of one engine in one case, in microseconds (median over the rounds kept)."""

    median_us: float
    q1_us: float
    q3_us: float
    min_us: float
    calls_per_batch: int
    #: the rounds the statistics use: the quiet ones, or every round when ``busy``
    rounds: int
    #: every round's sample, kept or not
    samples_us: list = field(default_factory=list)
    #: per round, the share of the CPUs other processes used (:class:`CpuMeter`)
    busy_shares: list = field(default_factory=list)
    #: too few quiet rounds: the figures are over every round and unreliable
    busy: bool = False

    @property
    def rounds_run(self) -> int:
        return len(self.busy_shares)

    @property
    def quiet_rounds(self) -> int:
        return sum(share <= BUSY_SHARE for share in self.busy_shares)

    def as_dict(self) -> dict:
        return {"median_us": self.median_us, "q1_us": self.q1_us, "q3_us": self.q3_us,
                "min_us": self.min_us, "calls_per_batch": self.calls_per_batch, "rounds": self.rounds,
                "samples_us": [round(s, 3) for s in self.samples_us],
                "busy_shares": [round(s, 3) for s in self.busy_shares], "busy": self.busy}


def time_interleaved(runners: dict, rounds: int, batch_seconds: float = 0.01, seed: int = 0, *,
                     gap_seconds: float = 0.003, budget_seconds: float | None = None, min_rounds: int = 3,
                     busy_extra_rounds: int = 0, threads: int = THREADS) -> dict[str, Timing]:
    """Time every runner of ``runners`` (name -> Runner) round by round, in a shuffled order per round.

    Returns name -> :class:`Timing`.  Batches longer than ``batch_seconds`` hold a single call; those skip
    the untimed warm-up call (a pool wake-up is noise against a call that long).  With ``budget_seconds``,
    rounds stop early once the budget (calibration included) is spent and ``min_rounds`` are done: a busy
    machine or a very slow engine must not stretch a report.  A round during which other processes used
    more than :data:`BUSY_SHARE` of the CPUs is left out of the statistics (:func:`quiet_rounds`); while
    fewer than ``min_rounds`` are quiet after ``rounds``, up to ``busy_extra_rounds`` more run (within twice
    the budget); if that is still not enough, every round counts and ``Timing.busy`` says the figures are
    unreliable.  ``threads``: this process's threads, for :class:`CpuMeter` off Linux.
    """
    rounds = max(1, rounds)
    rng = random.Random(seed)
    start = time.perf_counter()
    calls = {name: calibrate(runner, batch_seconds) for name, runner in runners.items()}
    samples = {name: [] for name in runners}
    shares, busy = [], False
    order = list(runners)
    meter = CpuMeter(threads)
    while True:
        done, elapsed = len(shares), time.perf_counter() - start
        if done >= rounds and (not busy or done >= rounds + busy_extra_rounds
                               or (budget_seconds is not None and elapsed > 2 * budget_seconds)):
            break
        if done < rounds and done >= min_rounds and budget_seconds is not None and elapsed > budget_seconds:
            break
        rng.shuffle(order)
        meter.share()
        for name in order:
            time.sleep(gap_seconds)
            samples[name].append(1e6 * seconds_per_call(runners[name], calls[name], warm=calls[name] > 1))
        shares.append(meter.share())
        _, busy = quiet_rounds(shares, min_rounds)
    keep, busy = quiet_rounds(shares, min_rounds)
    result = {}
    for name, all_values in samples.items():
        values = [all_values[i] for i in keep]
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        result[name] = Timing(statistics.median(values), q[0], q[2], min(values), calls[name], len(values),
                              all_values, shares, busy)
    return result
