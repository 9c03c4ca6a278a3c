"""The engines under test, how each is set up for its best run, and how they are timed.

Engines (each optional except gru_fast; a missing one is reported as "not installed", never a failure):

- ``gru_fast``: built with ``converters.from_torch.convert(module)`` from the same ``nn.GRU`` the peers
  run (``converters.from_torch.from_state_dict`` on the numpy weights when torch is absent).  Like the
  peers' IOBinding / shared tensors, the buffers are bound once: sequence cases call
  ``model.bind(x, h0, out=(y, h_n))()``, the stream case ``model.stream(batch_size=1, h0).bind(x_t,
  out=y_t)()`` (the unbound ``model(x, h0, out=...)`` adds its argument checks, about 2-4 us a call).
- ``pytorch``: ``nn.GRU`` under ``torch.inference_mode()``, ``torch.set_num_threads(2)``, inputs created
  once as tensors.
- ``onnxruntime``: the module exported with ``torch.onnx.export(..., dynamo=False)`` (one GRU node run
  with ``initial_h``), ``intra_op_num_threads=2``, ``inter_op_num_threads=1``, inputs and outputs bound
  once to numpy buffers with an ``IOBinding`` (measurably faster than ``session.run`` on small calls).
- ``openvino``: compiled from the same ONNX file with ``INFERENCE_NUM_THREADS=2``,
  ``INFERENCE_PRECISION_HINT=f32`` (no bf16/f16 down-conversion), one stream, latency hint; one infer
  request reused, its input and output tensors sharing memory with numpy buffers, run with
  ``start_async(); wait()`` (``infer()`` builds a result dictionary on every call).

One-step calls: the peers run a T=1 sequence call with their state fed back.  To avoid a copy per step
they alternate between two bindings / infer requests whose state buffers are crossed (A -> B, B -> A).

Timing (:func:`time_interleaved`): every engine of a case is built first; then, round after round, the
engines run in a freshly shuffled order, each timing a batch of calls (sized so a batch lasts about
``batch_seconds``, so the timer's resolution does not matter).  Each batch gives one per-call sample;
the reported figure is the median over rounds.  Before each batch the harness sleeps a few
milliseconds (thread pools of the previous engine stop spinning) and makes one untimed call (wakes
this engine's pool); the garbage collector is off while a batch runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import THREAD_ENV_VARS, THREADS
from .cases import PARITY_TOLERANCE, Case, Problem, make_problem, reference_gru

# the demo's batch timer (same runner protocol: ``call`` and ``context()``); importing gru_fast here is
# fine: bench/__init__ has capped the thread pools through the environment already
from gru_fast._demo import CpuMeter, quiet_rounds, seconds_per_call

__all__ = [
    "ENGINES", "ENGINE_LABELS", "THREADS", "Artifacts", "Timing", "build_runner", "check_parity",
    "cold_start", "configure_threads", "missing_reason", "parity_ok", "threadpool_summary",
    "time_interleaved",
    "with_threads",
]

ENGINES = ("gru_fast", "pytorch", "onnxruntime", "openvino")
ENGINE_LABELS = {"gru_fast": "gru_fast", "pytorch": "PyTorch", "onnxruntime": "ONNX Runtime",
                 "openvino": "OpenVINO"}
_IMPORT_NAMES = {"gru_fast": "gru_fast", "pytorch": "torch", "onnxruntime": "onnxruntime",
                 "openvino": "openvino"}
ONNX_OPSET = 17


# ----------------------------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------------------------

_LIMITER = None  # the process-wide threadpoolctl limit (kept alive on purpose)


def configure_threads(threads: int = THREADS) -> dict:
    """Give every engine ``threads`` threads: torch and Numba by their own calls, every BLAS / OpenMP
    runtime loaded so far by threadpoolctl (ONNX Runtime and OpenVINO get theirs per session).

    Imports the installed engines first so that their runtimes are loaded when the limit is applied.
    Returns a description of the thread pools for the report.
    """
    global _LIMITER
    for engine in ENGINES:
        if missing_reason(engine) is None:
            importlib.import_module(_IMPORT_NAMES[engine])
    info = {"threads": threads}
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # starts Numba's threading layer
    # ... which, as omp, turns OpenMP nesting on for this thread; the engine's first call puts it back, and so
    # does this, before any peer is timed (nested, torch's own OpenMP regions ran 10x slower)
    importlib.import_module("gru_fast._config").parallel_threads()
    info["numba_threads"] = numba.get_num_threads()
    try:
        info["numba_threading_layer"] = importlib.import_module("gru_fast").threading_layer()
    except Exception as exc:  # noqa: BLE001 - informational only
        info["numba_threading_layer"] = f"unknown ({exc})"
    if missing_reason("pytorch") is None:
        import torch
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


def threadpool_summary() -> list[dict] | str:
    """The BLAS / OpenMP runtimes loaded in this process and their thread counts (threadpoolctl)."""
    try:
        import threadpoolctl
    except ImportError:
        return "threadpoolctl not installed"
    return [{k: pool.get(k) for k in ("user_api", "internal_api", "num_threads", "version", "filepath")}
            for pool in threadpoolctl.threadpool_info()]


@contextlib.contextmanager
def _thread_limit(threads: int):
    import numba
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        import threadpoolctl
    except ImportError:
        limiter = contextlib.nullcontext()
    else:
        limiter = threadpoolctl.threadpool_limits(limits=threads)
    try:
        with limiter:
            yield
    finally:
        numba.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def missing_reason(engine: str) -> str | None:
    """None when ``engine`` can run here, else why not (e.g. "not installed (openvino)")."""
    try:
        importlib.import_module(_IMPORT_NAMES[engine])
    except ImportError as exc:
        return f"not installed ({exc.name or exc})"
    if engine in ("onnxruntime", "openvino") and missing_reason("pytorch") is not None:
        try:  # without torch the ONNX file is written with the onnx package
            importlib.import_module("onnx")
        except ImportError:
            return "not installed (neither torch nor onnx, needed to write the ONNX file)"
    return None


# ----------------------------------------------------------------------------------------------------
# models built from one problem
# ----------------------------------------------------------------------------------------------------

class Artifacts:
    """The models of one case, built lazily from the same weights and cached: the torch module, the
    gru_fast model converted from it, the ONNX file exported from it, and the parity reference."""

    def __init__(self, problem: Problem, workdir: str | os.PathLike):
        self.problem = problem
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    @functools.cached_property
    def torch_module(self):
        if missing_reason("pytorch") is not None:
            return None
        import torch
        case = self.problem.case
        module = torch.nn.GRU(case.input_size, case.hidden_size, bidirectional=case.bidirectional)
        module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.problem.state_dict.items()})
        return module.eval()

    @functools.cached_property
    def gru_fast_model(self):
        from converters import from_torch
        if self.torch_module is not None:
            model = from_torch.convert(self.torch_module)
        else:
            model = from_torch.from_state_dict(self.problem.state_dict)
        if np.dtype(model.dtype) != np.float32:
            raise RuntimeError(f"the converted gru_fast model is {model.dtype}, expected float32")
        return model

    @functools.cached_property
    def onnx_path(self) -> Path:
        path = self.workdir / f"{self.problem.case.name.replace('=', '')}.onnx"
        if self.torch_module is not None:
            _export_onnx(self.torch_module, self.problem, path)
        else:
            _onnx_from_weights(self.gru_fast_model, self.problem, path)
        return path

    @functools.cached_property
    def reference(self) -> tuple[np.ndarray, np.ndarray, str]:
        """(y, h_n, authority) on ``problem.parity_x`` from ``problem.h0``: PyTorch's output, or the
        float64 numpy transcription of nn.GRU when torch is missing."""
        p = self.problem
        if self.torch_module is None:
            y, h_n = reference_gru(p.state_dict, p.parity_x, p.h0)
            return y, h_n, "numpy float64 nn.GRU equations (torch not installed)"
        import torch
        with torch.inference_mode():
            y, h_n = self.torch_module(torch.from_numpy(p.parity_x), torch.from_numpy(p.h0))
        return y.numpy().copy(), h_n.numpy().copy(), "PyTorch"


def _export_onnx(module, problem: Problem, path: Path) -> None:
    import torch
    args = (torch.from_numpy(problem.x), torch.from_numpy(problem.h0))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=["x", "h0"], output_names=["y", "h_n"],
                          opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False)


def _onnx_from_weights(model, problem: Problem, path: Path) -> None:
    """Without torch: one ONNX GRU node (linear_before_reset=1) from gru_fast's ONNX-layout weights,
    then the same Transpose / Reshape torch's exporter writes, so outputs are (T, B, D*H) and (D, B, H)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    case = problem.case
    T, B, I, H, D = problem.x.shape[0], case.batch, case.input_size, case.hidden_size, case.num_directions
    (W, R, Bias), = model.onnx_weights()
    inits = [numpy_helper.from_array(np.asarray(W, np.float32), "W"),
             numpy_helper.from_array(np.asarray(R, np.float32), "R"),
             numpy_helper.from_array(np.asarray(Bias, np.float32), "B"),
             numpy_helper.from_array(np.array([T, B, D * H], np.int64), "y_shape")]
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["Y", "h_n"], hidden_size=H,
                         linear_before_reset=1, direction="bidirectional" if D == 2 else "forward"),
        helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["Yt", "y_shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "gru",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, I]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [D, B, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, B, D * H]),
         helper.make_tensor_value_info("h_n", TensorProto.FLOAT, [D, B, H])],
        inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)]), str(path))


# ----------------------------------------------------------------------------------------------------
# runners: one built engine for one case
# ----------------------------------------------------------------------------------------------------

class Runner:
    """One engine set up for one case.  ``call()`` runs one timed call on inputs fixed at build time.

    Sequence runners: ``outputs()`` is (y (T, B, D*H), h_n (D, B, H)) of the last call.
    Stream runners (``stream = True``) also have ``reset(h0)`` and ``set_frame(x_t)`` (B, I), and
    ``outputs()`` is (y_t (B, H), state (1, B, H)).
    """

    engine = ""
    stream = False

    def __init__(self):
        self.config: dict = {}

    def context(self):
        """Entered around a batch of calls (torch: inference mode; thread-pinned variants: limits)."""
        return contextlib.nullcontext()

    def call(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def outputs(self):  # pragma: no cover - overridden
        raise NotImplementedError


def _f32(shape):
    return np.zeros(shape, np.float32)


class GruFastSequence(Runner):
    engine = "gru_fast"

    def __init__(self, model, problem: Problem):
        super().__init__()
        case = problem.case
        self.x, self.h0 = problem.x.copy(), problem.h0.copy()
        T, B, H, D = self.x.shape[0], case.batch, case.hidden_size, case.num_directions
        self.y, self.h_n = _f32((T, B, D * H)), _f32((D, B, H))
        self.call = model.bind(self.x, self.h0, out=(self.y, self.h_n))
        self.config = {"call": "model.bind(x, h0, out=(y, h_n))()"}

    def outputs(self):
        return self.y.copy(), self.h_n.copy()


class GruFastStream(Runner):
    engine = "gru_fast"
    stream = True

    def __init__(self, model, problem: Problem):
        super().__init__()
        case = problem.case
        self.session = model.stream(batch_size=case.batch, h0=problem.h0)
        self.x_t, self.y_t = _f32((case.batch, case.input_size)), _f32((case.batch, case.hidden_size))
        self.set_frame(problem.x[0])
        self.call = self.session.bind(self.x_t, out=self.y_t)
        self.config = {"call": "model.stream(batch_size=B, h0).bind(x_t, out=y_t)()"}

    def set_frame(self, x_t):
        self.x_t[...] = x_t

    def reset(self, h0):
        self.session.reset(h0)

    def outputs(self):
        return self.y_t.copy(), self.session.state.copy()


class TorchSequence(Runner):
    engine = "pytorch"

    def __init__(self, module, problem: Problem):
        super().__init__()
        import torch
        self._torch = torch
        self.x, self.h0 = torch.from_numpy(problem.x.copy()), torch.from_numpy(problem.h0.copy())
        self.result = None
        x, h0 = self.x, self.h0

        def call():
            self.result = module(x, h0)
        self.call = call
        self.config = {"call": "module(x, h0) under torch.inference_mode()",
                       "threads": torch.get_num_threads()}

    def context(self):
        return self._torch.inference_mode()

    def outputs(self):
        y, h_n = self.result
        return y.numpy().copy(), h_n.numpy().copy()


class TorchStream(Runner):
    engine = "pytorch"
    stream = True

    def __init__(self, module, problem: Problem):
        super().__init__()
        import torch
        self._torch = torch
        self.x = torch.from_numpy(problem.x.copy())  # (1, B, I)
        self.y = None
        self.reset(problem.h0)
        x = self.x

        def call():
            self.y, self.h = module(x, self.h)
        self.call = call
        self.config = {"call": "y, h = module(x_t[None], h) (T=1, state fed back) under inference_mode",
                       "threads": torch.get_num_threads()}

    def context(self):
        return self._torch.inference_mode()

    def set_frame(self, x_t):
        self.x.numpy()[0] = x_t

    def reset(self, h0):
        self.h = self._torch.from_numpy(np.array(h0, np.float32))

    def outputs(self):
        return self.y.numpy()[0].copy(), self.h.numpy().copy()


def _ort_session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = []
    with contextlib.suppress(Exception):
        import onnx
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    config = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1, "io_binding": True,
              "graph": ops, "providers": session.get_providers()}
    return session, config


def _bind(binding, name, array, output=False):
    bind = binding.bind_output if output else binding.bind_input
    bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)


class OrtSequence(Runner):
    engine = "onnxruntime"

    def __init__(self, path: Path, problem: Problem):
        super().__init__()
        self.session, self.config = _ort_session(path)
        case = problem.case
        self.x, self.h0 = problem.x.copy(), problem.h0.copy()
        T, B, H, D = self.x.shape[0], case.batch, case.hidden_size, case.num_directions
        self.y, self.h_n = _f32((T, B, D * H)), _f32((D, B, H))
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

    def set_frame(self, x_t):
        self.x[0] = x_t

    def reset(self, h0):
        self.states[0][...] = h0
        self.current = 0

    def outputs(self):
        return self.y[0].copy(), self.states[self.current].copy()


class OrtStream(_CrossedStream):
    engine = "onnxruntime"

    def __init__(self, path: Path, problem: Problem):
        super().__init__()
        self.session, self.config = _ort_session(path)
        case = problem.case
        B, H = case.batch, case.hidden_size
        self.x, self.y = problem.x.copy(), _f32((1, B, H))
        self.states = (_f32((1, B, H)), _f32((1, B, H)))
        self.bindings = []
        for src, dst in ((0, 1), (1, 0)):  # two bindings with crossed state buffers: no copy per step
            binding = self.session.io_binding()
            _bind(binding, "x", self.x)
            _bind(binding, "h0", self.states[src])
            _bind(binding, "y", self.y, output=True)
            _bind(binding, "h_n", self.states[dst], output=True)
            self.bindings.append(binding)
        self.reset(problem.h0)
        run = self.session.run_with_iobinding

        def call():
            run(self.bindings[self.current])
            self.current ^= 1
        self.call = call
        self.config["call"] = ("run_with_iobinding on a T=1 model, alternating two bindings whose "
                               "h0 / h_n buffers are crossed (state fed back without a copy)")


OPENVINO_CONFIG = {"INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1,
                   "PERFORMANCE_HINT": "LATENCY"}


def _ov_compile(path: Path):
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", dict(OPENVINO_CONFIG))
    config = {"requested": dict(OPENVINO_CONFIG)}
    for key in ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS", "PERFORMANCE_HINT"):
        with contextlib.suppress(Exception):
            config[key] = str(compiled.get_property(key))
    precision = config.get("INFERENCE_PRECISION_HINT", "")
    if precision and "32" not in precision:
        raise RuntimeError(f"OpenVINO compiled with precision {precision}, expected f32")
    return ov, compiled, config


def _ov_request(ov, compiled, tensors: dict):
    request = compiled.create_infer_request()
    for port in compiled.inputs:
        request.set_tensor(port, ov.Tensor(tensors[port.get_any_name()], shared_memory=True))
    for port in compiled.outputs:
        request.set_tensor(port, ov.Tensor(tensors[port.get_any_name()], shared_memory=True))
    return request


class OpenVinoSequence(Runner):
    engine = "openvino"

    def __init__(self, path: Path, problem: Problem):
        super().__init__()
        ov, compiled, self.config = _ov_compile(path)
        case = problem.case
        self.x, self.h0 = problem.x.copy(), problem.h0.copy()
        T, B, H, D = self.x.shape[0], case.batch, case.hidden_size, case.num_directions
        self.y, self.h_n = _f32((T, B, D * H)), _f32((D, B, H))
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

    def __init__(self, path: Path, problem: Problem):
        super().__init__()
        ov, compiled, self.config = _ov_compile(path)
        case = problem.case
        B, H = case.batch, case.hidden_size
        self.x, self.y = problem.x.copy(), _f32((1, B, H))
        self.states = (_f32((1, B, H)), _f32((1, B, H)))
        self.requests = [
            _ov_request(ov, compiled, {"x": self.x, "h0": self.states[src], "y": self.y,
                                       "h_n": self.states[dst]})
            for src, dst in ((0, 1), (1, 0))
        ]
        self.reset(problem.h0)
        pairs = [(r.start_async, r.wait) for r in self.requests]

        def call():
            start, wait = pairs[self.current]
            start()
            wait()
            self.current ^= 1
        self.call = call
        self.config["call"] = ("start_async(); wait() on a T=1 model, alternating two requests whose "
                               "h0 / h_n tensors are crossed (state fed back without a copy)")


def build_runner(engine: str, artifacts: Artifacts) -> Runner:
    """Build ``engine`` for the case of ``artifacts`` (raises if the engine is not installed)."""
    reason = missing_reason(engine)
    if reason is not None:
        raise RuntimeError(f"{engine}: {reason}")
    problem = artifacts.problem
    stream = problem.case.stream
    if engine == "gru_fast":
        cls = GruFastStream if stream else GruFastSequence
        return cls(artifacts.gru_fast_model, problem)
    if engine == "pytorch":
        return (TorchStream if stream else TorchSequence)(artifacts.torch_module, problem)
    if engine == "onnxruntime":
        return (OrtStream if stream else OrtSequence)(artifacts.onnx_path, problem)
    if engine == "openvino":
        return (OpenVinoStream if stream else OpenVinoSequence)(artifacts.onnx_path, problem)
    raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")


class _ThreadPinned(Runner):
    """Another runner, run with ``threads`` threads (Numba and BLAS) instead of the default."""

    def __init__(self, runner: Runner, threads: int):
        super().__init__()
        self.inner, self.threads = runner, threads
        self.engine, self.stream = runner.engine, runner.stream
        self.call = runner.call
        self.config = dict(runner.config, threads=threads)

    @contextlib.contextmanager
    def context(self):
        with _thread_limit(self.threads), self.inner.context():
            yield

    def outputs(self):
        return self.inner.outputs()


def with_threads(engine: str, artifacts: Artifacts, threads: int) -> Runner:
    """``engine`` built and run with ``threads`` threads (a gru_fast binding reads its thread count when
    it is made, so the runner is built under the limit too)."""
    with _thread_limit(threads):
        return _ThreadPinned(build_runner(engine, artifacts), threads)


# ----------------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------------

def check_parity(runner: Runner, artifacts: Artifacts) -> float:
    """Max abs difference between ``runner``'s outputs (y and h_n) and the reference, on the parity
    inputs.  A stream runner is stepped through ``PARITY_STEPS`` frames from h0, then put back on the
    timed frame with its state reset, so the check covers the state feedback the timing relies on."""
    problem = artifacts.problem
    y_ref, h_ref, _ = artifacts.reference
    with runner.context():
        if runner.stream:
            inner = getattr(runner, "inner", runner)
            inner.reset(problem.h0)
            ys = []
            for x_t in problem.parity_x:
                inner.set_frame(x_t)
                runner.call()
                y_t, h = runner.outputs()
                ys.append(y_t)
            y = np.stack(ys)
            inner.reset(problem.h0)
            inner.set_frame(problem.x[0])
        else:
            runner.call()
            y, h = runner.outputs()
    if y.shape != y_ref.shape or h.shape != h_ref.shape:
        raise RuntimeError(f"{runner.engine}: output shapes {y.shape}, {h.shape} differ from the "
                           f"reference {y_ref.shape}, {h_ref.shape}")
    with np.errstate(invalid="ignore"):
        err = max(float(np.max(np.abs(y - y_ref))), float(np.max(np.abs(h - h_ref))))
    return err if np.isfinite(err) else float("inf")


def parity_ok(err: float | None) -> bool:
    return err is not None and err <= PARITY_TOLERANCE


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Per-call time of one engine in one case, in microseconds (median over rounds)."""

    median_us: float
    q1_us: float
    q3_us: float
    min_us: float
    calls_per_batch: int
    rounds: int
    samples_us: list = field(default_factory=list)
    #: per round, the share of the CPUs other processes used (gru_fast._demo.CpuMeter)
    busy_shares: list = field(default_factory=list)
    #: too few quiet rounds: the figures are over every round and unreliable
    busy: bool = False

    def as_dict(self) -> dict:
        return {"median_us": self.median_us, "q1_us": self.q1_us, "q3_us": self.q3_us,
                "min_us": self.min_us, "calls_per_batch": self.calls_per_batch, "rounds": self.rounds,
                "samples_us": [round(s, 3) for s in self.samples_us],
                "busy_shares": [round(s, 3) for s in self.busy_shares], "busy": self.busy}


def calibrate(runner: Runner, batch_seconds: float, max_calls: int = 100_000) -> int:
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


def time_interleaved(runners: dict, rounds: int, batch_seconds: float, seed: int = 0,
                     gap_seconds: float = 0.003, budget_seconds: float | None = None,
                     min_rounds: int = 3) -> dict[str, Timing]:
    """Time every runner of ``runners`` (name -> Runner) round by round, in a shuffled order per round.

    Returns name -> Timing.  Batches longer than ``batch_seconds`` hold a single call; those skip the
    untimed warm-up call (a pool wake-up is noise against a call that long).  With ``budget_seconds``,
    rounds stop early once the budget is spent and ``min_rounds`` are done (a busy machine or a very
    slow engine must not stretch the report to hours).  A round during which other processes used more
    than ``BUSY_SHARE`` of the CPUs is left out of the statistics (``gru_fast._demo.quiet_rounds``, the
    demo's rule); when fewer than ``min_rounds`` are quiet, every round counts and ``Timing.busy`` says
    the figures are unreliable.  ``Timing.rounds`` is the number of rounds the statistics use.
    """
    rng = random.Random(seed)
    start = time.perf_counter()
    calls = {name: calibrate(runner, batch_seconds) for name, runner in runners.items()}
    samples = {name: [] for name in runners}
    shares = []
    order = list(runners)
    meter = CpuMeter(THREADS)
    for done in range(rounds):
        if budget_seconds is not None and done >= min_rounds and time.perf_counter() - start > budget_seconds:
            break
        rng.shuffle(order)
        meter.share()
        for name in order:
            time.sleep(gap_seconds)
            samples[name].append(1e6 * seconds_per_call(runners[name], calls[name], warm=calls[name] > 1))
        shares.append(meter.share())
    keep, busy = quiet_rounds(shares, min_rounds)
    result = {}
    for name, all_values in samples.items():
        values = [all_values[i] for i in keep]
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        result[name] = Timing(statistics.median(values), q[0], q[2], min(values), calls[name], len(values),
                              all_values, shares, busy)
    return result


# ----------------------------------------------------------------------------------------------------
# cold start and peak memory
# ----------------------------------------------------------------------------------------------------

_CHILD_HEAD = """
import time
_t0 = time.perf_counter()
import json, resource, sys
args = json.loads(sys.argv[1])
"""

_CHILD_TAIL = """
_t3 = time.perf_counter()
y = np.asarray(y)
def _peak_rss_mib():
    # VmHWM, not ru_maxrss: Linux carries the spawning parent's high-water mark into ru_maxrss across
    # vfork + exec, so ru_maxrss would report the (large) benchmark process instead of this one.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss"
_peak, _source = _peak_rss_mib()
print("RESULT " + json.dumps({
    "import_s": _t1 - _t0, "load_s": _t2 - _t1, "first_output_s": _t3 - _t2, "in_process_s": _t3 - _t0,
    "peak_rss_mib": _peak, "peak_rss_source": _source,
    "y_last": [float(v) for v in y[-1].ravel()[:8]]}))
"""

_CHILD_BODY = {
    "gru_fast": """
import numpy as np
import gru_fast
_t1 = time.perf_counter()
model = gru_fast.load(args["path"])
_t2 = time.perf_counter()
x = np.load(args["x"]); h0 = np.load(args["h0"])
y, h_n = model(x, h0)
""",
    "pytorch": """
import numpy as np
import torch
torch.set_num_threads(args["threads"])
_t1 = time.perf_counter()
module = torch.nn.GRU(args["input_size"], args["hidden_size"], bidirectional=args["bidirectional"])
module.load_state_dict(torch.load(args["path"], weights_only=True))
module.eval()
_t2 = time.perf_counter()
x = torch.from_numpy(np.load(args["x"])); h0 = torch.from_numpy(np.load(args["h0"]))
with torch.inference_mode():
    y, h_n = module(x, h0)
y = y.numpy()
""",
    "onnxruntime": """
import numpy as np
import onnxruntime as ort
_t1 = time.perf_counter()
options = ort.SessionOptions()
options.intra_op_num_threads = args["threads"]; options.inter_op_num_threads = 1
session = ort.InferenceSession(args["path"], options, providers=["CPUExecutionProvider"])
_t2 = time.perf_counter()
y, h_n = session.run(None, {"x": np.load(args["x"]), "h0": np.load(args["h0"])})
""",
    "openvino": """
import numpy as np
import openvino as ov
_t1 = time.perf_counter()
compiled = ov.Core().compile_model(args["path"], "CPU", args["ov_config"])
_t2 = time.perf_counter()
request = compiled.create_infer_request()
result = request.infer({"x": np.load(args["x"]), "h0": np.load(args["h0"])})
y = result[compiled.output("y")]
""",
}


def _repo_root() -> str:
    import gru_fast
    return str(Path(gru_fast.__file__).resolve().parent.parent)


def _run_child(engine: str, args: dict, env: dict, timeout: float = 300) -> dict:
    script = _CHILD_HEAD + _CHILD_BODY[engine] + _CHILD_TAIL
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no output within {timeout} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [l.strip() for l in lines if re.match(r"^\w+(\.\w+)*(Error|Exception)\b", l.strip())]
        summary = errors[-1] if errors else (lines[-1].strip() if lines else "no output")
        return {"error": f"exit {proc.returncode}: {summary}", "stderr_tail": "\n".join(lines[-20:])}
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"error": "no result line"}
    result = json.loads(line[len("RESULT "):])
    result["wall_s"] = wall
    return result


def cold_start(case: Case, workdir: str | os.PathLike, repeats: int = 2, seed: int = 0,
               empty_cache: bool = True) -> dict:
    """Wall time and peak RSS of a fresh process that imports an engine, loads a saved model of
    ``case`` and produces its first output.

    gru_fast: ``gru_fast.save`` / ``gru_fast.load`` (.npz); measured with an empty kernel cache
    (``NUMBA_CACHE_DIR`` = a fresh directory: every kernel is compiled) and then with that cache warm
    (run ``repeats`` times, the last reported); ``empty_cache=False`` leaves out the empty-cache run (it
    compiles every kernel: tens of seconds).  Peers: PyTorch (state dict via ``torch.save`` /
    ``torch.load(weights_only=True)``), ONNX Runtime and OpenVINO (the exported ONNX file), each run
    ``repeats`` times, the last reported.  Wall time is measured by the parent (interpreter start to
    exit); the child reports its own import / load / first-output split and its peak resident memory.

    Peak memory is the child's ``VmHWM`` (/proc/self/status), falling back to ``ru_maxrss`` off Linux:
    on Linux ``getrusage(...).ru_maxrss`` of a process started with vfork + exec (what subprocess does)
    starts at the spawning parent's high-water mark, i.e. it would report this benchmark process.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    problem = make_problem(case, seed)
    artifacts = Artifacts(problem, workdir)
    x_path, h0_path = workdir / "cold_x.npy", workdir / "cold_h0.npy"
    np.save(x_path, problem.x)
    np.save(h0_path, problem.h0)
    base = {"x": str(x_path), "h0": str(h0_path), "threads": THREADS, "input_size": case.input_size,
            "hidden_size": case.hidden_size, "bidirectional": case.bidirectional,
            "ov_config": dict(OPENVINO_CONFIG)}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_repo_root(), env.get("PYTHONPATH")) if p)
    for var in THREAD_ENV_VARS:
        env[var] = str(THREADS)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    y_ref = artifacts.reference[0] if not case.stream else None
    results = {"case": case.name, "shape": case.shape, "repeats": repeats}

    def finish(result):
        if "y_last" in result and y_ref is not None:
            ref = y_ref[-1].ravel()[:8]
            result["max_abs_err"] = float(np.max(np.abs(np.asarray(result.pop("y_last")) - ref)))
        return result

    import gru_fast
    model_path = workdir / "cold_model.npz"
    gru_fast.save(artifacts.gru_fast_model, model_path)
    args = dict(base, path=str(model_path))
    if empty_cache:
        cache_dir = tempfile.mkdtemp(prefix="numba-cache-", dir=workdir)
        gf_env = dict(env, NUMBA_CACHE_DIR=cache_dir)
        results["gru_fast (empty kernel cache)"] = finish(_run_child("gru_fast", args, gf_env))
    else:  # the kernel cache this process uses, warm already
        gf_env = env
    warm = {}
    for _ in range(repeats):
        warm = _run_child("gru_fast", args, gf_env)
    results["gru_fast (warm kernel cache)"] = finish(warm)

    for engine in ("pytorch", "onnxruntime", "openvino"):
        reason = missing_reason(engine)
        if reason is not None:
            results[ENGINE_LABELS[engine]] = {"skipped": reason}
            continue
        if engine == "pytorch":
            import torch
            path = workdir / "cold_model.pt"
            torch.save(artifacts.torch_module.state_dict(), path)
        else:
            path = artifacts.onnx_path
        result = {}
        for _ in range(repeats):
            result = _run_child(engine, dict(base, path=str(path)), env)
        results[ENGINE_LABELS[engine]] = finish(result)
    return results
