"""The benchmark's side of the engines: the models of a case, parity, the cold start.

The engines are set up and timed by the peer harness the package ships, :mod:`gru_fast.peers` (also what
``gru-fast demo`` uses): how each engine is built for its best run (``model.bind``, IOBinding, shared
OpenVINO tensors, crossed state buffers for one-step calls), :func:`~gru_fast.peers.time_interleaved`
(rounds in a shuffled order, batches of calls, busy rounds left out) and the thread limits.  Here:

- :class:`Artifacts`: a case's models built from the same weights -- the ``nn.GRU`` the case's state dict
  loads into, the gru_fast model converted from it (``converters.from_torch.convert``; from the numpy
  weights with ``from_state_dict`` when torch is absent), the ONNX file ``torch.onnx.export(...,
  dynamo=False)`` writes from the module (one GRU node run with ``initial_h``; without torch
  :func:`gru_fast.peers.onnx_gru` writes the same graph), and the parity reference;
- :func:`build_runner` / :func:`with_threads`: a harness runner of one engine on a case's inputs;
  :func:`build_engines`: every engine of a case, built and checked;
- :func:`check_parity`: a runner's outputs against PyTorch (or the float64 equations without torch);
- :func:`cold_start`: a fresh process importing an engine, loading a saved model, first output, peak memory.

Every engine runs on ``THREADS`` threads (:func:`configure_threads`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# importing gru_fast here is fine: bench/__init__ has capped the thread pools through the environment already
from gru_fast import peers
from gru_fast.peers import (ENGINE_LABELS, ENGINES, ONNX_OPSET, Runner, Timing, threadpool_summary,
                            time_interleaved)

from . import THREAD_ENV_VARS, THREADS
from .cases import PARITY_TOLERANCE, Case, Problem, make_problem, reference_gru

__all__ = [
    "ENGINES", "ENGINE_LABELS", "THREADS", "Artifacts", "Runner", "Timing", "build_engines", "build_runner",
    "check_parity",
    "cold_start", "configure_threads", "missing_reason", "parity_ok", "threadpool_summary", "time_interleaved",
    "with_threads",
]

OPENVINO_CONFIG = peers.openvino_config(THREADS)


def configure_threads(threads: int = THREADS) -> dict:
    """Give every engine ``threads`` threads for the rest of the run (:func:`gru_fast.peers.limit_threads`).

    Imports the installed engines first so that their runtimes are loaded when the limit is applied.
    Returns a description of the thread pools for the report.
    """
    for engine in ENGINES:
        if missing_reason(engine) is None:
            importlib.import_module(peers.ENGINE_MODULES[engine])
    return peers.limit_threads(threads)


@functools.lru_cache(maxsize=None)
def missing_reason(engine: str) -> str | None:
    """None when ``engine`` can run here, else why not (e.g. "not installed (openvino)")."""
    reason = peers.missing_reason(engine)
    if reason is None and engine in ("onnxruntime", "openvino") and missing_reason("pytorch") is not None:
        try:  # without torch the ONNX file is written with the onnx package
            importlib.import_module("onnx")
        except ImportError:
            return "not installed (neither torch nor onnx, needed to write the ONNX file)"
    return reason


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
            x = self.problem.x
            path.write_bytes(peers.onnx_gru(self.gru_fast_model, x.shape[0], x.shape[1]).SerializeToString())
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


# ----------------------------------------------------------------------------------------------------
# runners: one built engine for one case
# ----------------------------------------------------------------------------------------------------

def build_runner(engine: str, artifacts: Artifacts) -> Runner:
    """Build ``engine`` for the case of ``artifacts`` (raises if the engine is not installed): a
    :class:`gru_fast.peers.Runner` on the case's inputs, peers on ``THREADS`` threads."""
    reason = missing_reason(engine)
    if reason is not None:
        raise RuntimeError(f"{engine}: {reason}")
    problem = artifacts.problem
    sources = {"gru_fast": {"model": artifacts.gru_fast_model} if engine == "gru_fast" else {},
               "pytorch": {"torch_module": artifacts.torch_module},
               "onnxruntime": {"onnx_file": artifacts.onnx_path},
               "openvino": {"onnx_file": artifacts.onnx_path}}.get(engine)
    if sources is None:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    return peers.build_runner(engine, problem.x, problem.h0, stream=problem.case.stream, threads=THREADS,
                              **sources)


def with_threads(engine: str, artifacts: Artifacts, threads: int) -> Runner:
    """``engine`` built and run with ``threads`` threads (a gru_fast binding reads its thread count when
    it is made, so the runner is built under the limit too)."""
    with peers.thread_limit(threads):
        return peers.ThreadPinned(build_runner(engine, artifacts), threads)


def build_engines(artifacts: Artifacts, engines, log=None) -> tuple[dict, dict]:
    """Every engine of ``engines`` built on ``artifacts`` and checked for parity -> (runners of the engines
    that built, passed or failed parity, per-engine result rows: ``status``, ``parity_err``, ``parity_ok``,
    ``config``).  An engine that is missing or fails to build is a row with the reason, not an exception;
    ``log`` (a callable taking a line) hears about failures."""
    runners, rows = {}, {}
    for engine in engines:
        reason = missing_reason(engine)
        if reason is not None:
            rows[engine] = {"status": reason}
            continue
        try:
            runner = build_runner(engine, artifacts)
            err = check_parity(runner, artifacts)
        except Exception as exc:  # noqa: BLE001 - an engine failing is a result, not a crash
            rows[engine] = {"status": f"error: {type(exc).__name__}: {exc}"}
            if log is not None:
                log(f"    {engine}: {type(exc).__name__}: {exc}")
                if engine == "gru_fast":
                    import traceback
                    log(traceback.format_exc())
            continue
        runners[engine] = runner
        rows[engine] = {"status": "ok", "parity_err": err, "parity_ok": parity_ok(err), "config": runner.config}
    return runners, rows


def time_rows(runners: dict, rows: dict, rounds: int, batch_seconds: float, seed: int, **timing) -> bool:
    """Time ``runners`` interleaved (:func:`time_interleaved`, ``timing`` its keyword options) into their
    ``rows`` of :func:`build_engines`, and drop the rows' ``config``; whether any row was busy."""
    if runners:
        for engine, result in time_interleaved(runners, rounds, batch_seconds, seed, **timing).items():
            rows[engine].update(result.as_dict())
    for row in rows.values():
        row.pop("config", None)
    return any(row.get("busy") for row in rows.values())


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
