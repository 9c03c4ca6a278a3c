"""``gru-fast demo``: the shipped model, checked against its authorities and timed against the peers.

The package ships a small GRU classifier trained by ``scripts/train_default_model.py`` (see
``gru_fast/data/default_model.json`` for the record).  The demo

1. loads the engine file with :func:`gru_fast.load` and the linear head from ``default_head.npz``;
2. classifies the 512 held-out sequences of ``default_eval.npz`` (variable lengths, ``lengths=``) and
   prints the accuracy next to the figure recorded at training time;
3. checks the outputs against three authorities: the logits PyTorch itself produced for the same
   sequences at training time (stored in the eval file, so no torch is needed), the ONNX reference
   evaluator running the shipped ``default_gru.onnx`` (which ignores ``sequence_lens``, so it runs a
   batch cut to one common length), and ONNX Runtime running the same file with the lengths;
4. times the model on three calls -- one streaming step (B=1), one sequence (B=1, T=64) and a batch
   (B=64, T=64) -- against whichever of PyTorch, ONNX Runtime and OpenVINO are installed, each on 2
   threads, interleaved round by round; the figure is the median per-call time over the quiet rounds
   (a round during which other processes used over a quarter of the CPUs is left out, :class:`CpuMeter`);
   when too few rounds are quiet the table is printed with a warning that its times are unreliable.

Peers run the same weights: PyTorch an ``nn.GRU(batch_first=True)`` (the trained module's layout),
ONNX Runtime and OpenVINO a GRU-only ONNX graph in time-major layout built from the engine's weights
with ``onnx.helper`` (the shipped file also holds the lengths handling and the head, which would not
be a like-for-like comparison).  Each peer's output is checked against gru_fast's before it is timed.

Optional packages are imported only here, only when present: onnx (checks 3, the peers' graph),
onnxruntime, openvino, torch (only to time it as a peer).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
MODEL_FILE = DATA_DIR / "default_gru.npz"
ONNX_FILE = DATA_DIR / "default_gru.onnx"
HEAD_FILE = DATA_DIR / "default_head.npz"
EVAL_FILE = DATA_DIR / "default_eval.npz"
RECORD_FILE = DATA_DIR / "default_model.json"

#: max abs error accepted against an authority, float32: GRU outputs / logits (|logits| reach ~20)
TOLERANCE = 1e-5
LOGITS_TOLERANCE = 1e-4
#: sequences of the ONNX reference check (the evaluator is a Python loop: keep it small)
REFERENCE_BATCH = 64
THREADS = 2
PEERS = ("PyTorch", "ONNX Runtime", "OpenVINO")
_PEER_MODULES = {"PyTorch": "torch", "ONNX Runtime": "onnxruntime", "OpenVINO": "openvino"}
#: the names ``gru-fast demo --peers`` takes
PEER_OPTIONS = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


# --------------------------------------------------------------------------------------------------
# the shipped files
# --------------------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    x: np.ndarray            # (N, T_max, I) float32, zero past each length
    lengths: np.ndarray      # (N,) int64
    labels: np.ndarray       # (N,) int64
    torch_logits: np.ndarray  # (N, K) float32, PyTorch's output recorded at training time


def load_eval_set(path=None) -> EvalSet:
    """The held-out sequences, unpacked from their ragged storage (frames of all sequences in a row)."""
    path = EVAL_FILE if path is None else path
    with np.load(path, allow_pickle=False) as archive:
        frames, lengths = archive["x"], archive["lengths"].astype(np.int64)
        labels, logits = archive["labels"].astype(np.int64), archive["torch_logits"]
    if lengths.sum() != len(frames):
        raise ValueError(f"{path}: lengths add up to {lengths.sum()} frames, the file holds {len(frames)}")
    x = np.zeros((len(lengths), int(lengths.max()), frames.shape[1]), np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for i, (start, length) in enumerate(zip(starts, lengths)):
        x[i, :length] = frames[start : start + length]
    return EvalSet(x, lengths, labels, np.asarray(logits, np.float32))


def load_head(path=None):
    """-> (weight (K, H), bias (K,), class names)."""
    path = HEAD_FILE if path is None else path
    with np.load(path, allow_pickle=False) as archive:
        return archive["weight"], archive["bias"], [str(c) for c in archive["classes"]]


def accuracy_sets(record=None) -> str:
    """Which sequences each accuracy figure of the shipped model is on (the README, the demo and
    ``gru-fast info`` all quote one of them)."""
    record = json.loads(RECORD_FILE.read_text()) if record is None else record
    acc = record["accuracy"]
    return (f"{100 * acc['test']:.2f} % on the model's {acc['test_size']:,} held-out test sequences "
            f"(test_accuracy in its provenance), {100 * acc['shipped_eval']:.2f} % on the first "
            f"{acc['shipped_eval_size']:,} of them, shipped as {EVAL_FILE.name} (what `gru-fast demo` runs)")


def classify(model, head, x, lengths):
    """Logits (N, K): the head on the last layer's state after each sequence's last valid step."""
    weight, bias = head[0], head[1]
    _, h_n = model(x, lengths=lengths)
    return h_n[-1] @ weight.T + bias


# --------------------------------------------------------------------------------------------------
# the peers' models, built from the engine's weights
# --------------------------------------------------------------------------------------------------

def gru_only_onnx(model, steps: int, batch: int):
    """A time-major ONNX graph of ``model`` (forward, lbr=1): x (T, B, I), h0 (L, B, H) -> y, h_n.

    One GRU node per layer, chained through Squeeze, as torch.onnx.export writes a stacked nn.GRU."""
    from onnx import TensorProto, helper, numpy_helper

    L, H, I = model.num_layers, model.hidden_size, model.input_size
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes, layer_input, finals = [], "x", []
    for layer, (W, R, B) in enumerate(model.onnx_weights()):
        names = [f"W{layer}", f"R{layer}", f"B{layer}"]
        inits += [numpy_helper.from_array(np.asarray(a, np.float32), n) for a, n in zip((W, R, B), names)]
        inits += [numpy_helper.from_array(np.array([layer], np.int64), f"start{layer}"),
                  numpy_helper.from_array(np.array([layer + 1], np.int64), f"end{layer}")]
        nodes.append(helper.make_node("Slice", ["h0", f"start{layer}", f"end{layer}"], [f"h0_{layer}"]))
        nodes.append(helper.make_node("GRU", [layer_input, *names, "", f"h0_{layer}"], [f"Y{layer}", f"Yh{layer}"],
                                      hidden_size=H, linear_before_reset=1))
        layer_input = "y" if layer == L - 1 else f"x{layer + 1}"
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", "axis1"], [layer_input]))
        finals.append(f"Yh{layer}")
    nodes.append(helper.make_node("Concat", finals, ["h_n"], axis=0))
    graph = helper.make_graph(
        nodes, "gru_fast_demo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, batch, I]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [L, batch, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [steps, batch, H]),
         helper.make_tensor_value_info("h_n", TensorProto.FLOAT, [L, batch, H])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def torch_module(model):
    """``nn.GRU(batch_first=True)`` with the engine's weights (ONNX z, r, h -> PyTorch r, z, n)."""
    import torch

    H = model.hidden_size
    module = torch.nn.GRU(model.input_size, H, num_layers=model.num_layers, batch_first=True)
    reorder = np.r_[H : 2 * H, 0:H, 2 * H : 3 * H]
    state = {}
    for layer, (W, R, B) in enumerate(model.onnx_weights()):
        state[f"weight_ih_l{layer}"] = W[0][reorder]
        state[f"weight_hh_l{layer}"] = R[0][reorder]
        state[f"bias_ih_l{layer}"] = B[0, : 3 * H][reorder]
        state[f"bias_hh_l{layer}"] = B[0, 3 * H :][reorder]
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()})
    return module.eval()


# --------------------------------------------------------------------------------------------------
# runners: one engine on one case.  call() runs one timed call; result() is (y (B, T, H), h_n (L, B, H))
# of the last call (a stream step's y is (B, 1, H)); reset() puts a stream back on a zero state.
# --------------------------------------------------------------------------------------------------

class Runner:
    context = staticmethod(contextlib.nullcontext)

    def reset(self):
        pass


class GruFastRunner(Runner):
    def __init__(self, model, x, stream):
        B, T, _ = x.shape
        L, H = model.num_layers, model.hidden_size
        # buffers bound once, as the peers bind theirs (IOBinding, shared tensors): see GRU.bind
        if stream:
            self.session = model.stream(batch_size=B)
            x_t, self.y = np.ascontiguousarray(x[:, 0]), np.zeros((B, H), np.float32)
            self.call = self.session.bind(x_t, out=self.y)
        else:
            self.session = None
            x = np.ascontiguousarray(x)
            self.y, self.h_n = np.zeros((B, T, H), np.float32), np.zeros((L, B, H), np.float32)
            self.call = model.bind(x, out=(self.y, self.h_n))

    def reset(self):
        if self.session is not None:
            self.session.reset()

    def result(self):
        if self.session is not None:
            return self.y[:, None].copy(), self.session.state
        return self.y.copy(), self.h_n.copy()


class TorchRunner(Runner):
    def __init__(self, module, x, stream):
        import torch

        self.context = torch.inference_mode
        B, L, H = x.shape[0], module.num_layers, module.hidden_size
        self.x = torch.from_numpy(np.ascontiguousarray(x[:, :1] if stream else x))
        self.zeros = torch.zeros(L, B, H)
        self.reset()
        x_t = self.x

        def call():
            self.y, h = module(x_t, self.h)
            if stream:
                self.h = h  # the state is fed back: the next call is the next step
            self.h_n = h
        self.call = call

    def reset(self):
        self.h = self.h_n = self.zeros.clone()

    def result(self):
        return self.y.numpy().copy(), self.h_n.numpy().copy()


class _CrossedStates:
    """Two state buffers whose roles swap each call: the state is fed back without a copy."""

    def __init__(self, shape):
        self.states = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        self.current = 0

    def reset(self):
        self.states[0][...] = 0
        self.current = 0


class _CrossedRunner(Runner):
    """A peer runner over crossed state buffers (``self.crossed``): in a stream the call alternates
    between two bindings, so the newest state is ``states[current]``; a sequence call writes states[1]."""

    def reset(self):
        self.crossed.reset()

    def result(self):
        c = self.crossed
        h = c.states[c.current] if self.stream else c.states[1]
        return self.y.transpose(1, 0, 2).copy(), h.copy()


class OrtRunner(_CrossedRunner):
    """ONNX Runtime with inputs and outputs bound once to numpy buffers (IOBinding)."""

    def __init__(self, onnx_bytes, x_time_major, L, H, stream):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        options.log_severity_level = 3
        session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        T, B, _ = x_time_major.shape
        self.x, self.y = np.ascontiguousarray(x_time_major), np.zeros((T, B, H), np.float32)
        self.crossed = _CrossedStates((L, B, H))
        pairs = ((0, 1), (1, 0)) if stream else ((0, 1),)
        self.bindings = []
        for src, dst in pairs:
            binding = session.io_binding()
            for name, array, output in (("x", self.x, False), ("h0", self.crossed.states[src], False),
                                        ("y", self.y, True), ("h_n", self.crossed.states[dst], True)):
                bind = binding.bind_output if output else binding.bind_input
                bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
            self.bindings.append(binding)
        run, crossed, bindings = session.run_with_iobinding, self.crossed, self.bindings
        self.stream = stream

        def call():
            run(bindings[crossed.current])
            if stream:
                crossed.current ^= 1
        self.call = call


class OpenVinoRunner(_CrossedRunner):
    """OpenVINO, f32 precision, one reused infer request per state buffer, tensors sharing numpy memory."""

    def __init__(self, onnx_path, x_time_major, L, H, stream):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": THREADS, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY"}
        compiled = ov.Core().compile_model(str(onnx_path), "CPU", config)
        T, B, _ = x_time_major.shape
        self.x, self.y = np.ascontiguousarray(x_time_major), np.zeros((T, B, H), np.float32)
        self.crossed = _CrossedStates((L, B, H))
        self.requests = []
        for src, dst in (((0, 1), (1, 0)) if stream else ((0, 1),)):
            request = compiled.create_infer_request()
            tensors = {"x": self.x, "h0": self.crossed.states[src], "y": self.y, "h_n": self.crossed.states[dst]}
            for port in list(compiled.inputs) + list(compiled.outputs):
                request.set_tensor(port, ov.Tensor(tensors[port.get_any_name()], shared_memory=True))
            self.requests.append(request)
        pairs, crossed = [(r.start_async, r.wait) for r in self.requests], self.crossed
        self.stream = stream

        def call():
            start, wait = pairs[crossed.current]
            start()
            wait()
            if stream:
                crossed.current ^= 1
        self.call = call


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------

def seconds_per_call(runner, calls: int, warm: bool = True) -> float:
    """Seconds per call of a batch of ``calls`` calls (after one untimed call that wakes this engine's
    thread pool, when ``warm``), with the garbage collector off.  ``runner`` has ``call`` and ``context()``;
    the benchmark harness (bench/engines.py) times its batches with this too."""
    call = runner.call
    with runner.context():
        if warm:
            call()
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.perf_counter()
            for _ in range(calls):
                call()
            elapsed = time.perf_counter() - start
        finally:
            if gc_enabled:
                gc.enable()
    return elapsed / calls


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
    must be shown with a warning.  The demo and the benchmark harness (bench/engines.py) both use it.
    """
    quiet = [i for i, share in enumerate(shares) if share <= BUSY_SHARE]
    if len(quiet) >= min(min_rounds, len(shares)):
        return quiet, False
    return list(range(len(shares))), True


def busy_warning(share: float, detail: str = "") -> str:
    """The one-line warning printed beside figures timed on a busy machine."""
    return (f"WARNING: busy machine: other processes used {100 * share:.0f} % of the CPUs while timing"
            f"{f' ({detail})' if detail else ''}; these times are unreliable, rerun on a quiet machine")


def time_interleaved(runners: dict, rounds: int, *, batch_seconds: float = 0.01, budget_seconds: float = 2.5,
                     seed: int = 0, threads: int = THREADS):
    """Median seconds per call of each runner over the quiet rounds: (medians, rounds kept, quiet rounds,
    rounds run, the share of the CPUs other processes used over all rounds, busy).

    Each round runs every runner once, in a fresh random order, as a batch of calls lasting about
    ``batch_seconds`` (one call for slower engines).  Fewer rounds (at least 3) run when ``rounds`` of
    them would exceed ``budget_seconds``: a slow peer must not stretch the demo.  A round during which
    other processes used more than :data:`BUSY_SHARE` of the CPUs is left out (:func:`quiet_rounds`);
    while too few rounds are quiet, up to as many rounds again run, within another ``budget_seconds``.
    ``busy`` is True when that was still not enough: every round is then kept, to be shown with
    :func:`busy_warning`."""
    estimate = {name: seconds_per_call(runner, 1, warm=True) for name, runner in runners.items()}
    calls = {name: max(1, min(20_000, round(batch_seconds / max(t, 1e-7)))) for name, t in estimate.items()}
    round_seconds = sum((calls[n] + (calls[n] > 1)) * estimate[n] + 0.002 for n in runners)
    rounds = max(3, min(rounds, int(budget_seconds / max(round_seconds, 1e-9))))
    samples, shares = {name: [] for name in runners}, []
    order, rng = list(runners), random.Random(seed)
    overall, meter = CpuMeter(threads), CpuMeter(threads)
    started = time.perf_counter()
    while True:
        rng.shuffle(order)
        meter.share()
        for name in order:
            time.sleep(0.002)
            samples[name].append(seconds_per_call(runners[name], calls[name], warm=calls[name] > 1))
        shares.append(meter.share())
        keep, busy = quiet_rounds(shares)
        if len(shares) >= rounds and (not busy or len(shares) >= 2 * rounds
                                      or time.perf_counter() - started > 2 * budget_seconds):
            break
    medians = {name: statistics.median(values[i] for i in keep) for name, values in samples.items()}
    quiet = sum(share <= BUSY_SHARE for share in shares)
    return medians, len(keep), quiet, len(shares), overall.share(), busy


def _limit_threads(threads: int) -> str:
    """Give gru_fast ``threads`` Numba threads (its kernels use no BLAS); the peers get theirs when built."""
    import numba

    from ._config import parallel_threads

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    parallel_threads()  # as the engine's first call does: OpenMP nesting back off before any peer runs
    return f"{numba.get_num_threads()} threads per engine"


# --------------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------------

def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f}" if us < 100 else f"{us:,.0f}"


def run(*, timing: bool = True, rounds: int = 7, threads: int = THREADS, peers=PEERS, out=None) -> int:
    """Run the demo; returns 0, or 4 when a check against an authority failed.

    ``peers``: which of :data:`PEERS` to time when installed (the others are not tried).
    """
    out = sys.stdout if out is None else out
    import gru_fast

    def say(text=""):
        print(text, file=out, flush=True)

    record = json.loads(RECORD_FILE.read_text())
    model = gru_fast.load(MODEL_FILE)
    head = load_head()
    data = load_eval_set()
    failures = []

    K = len(head[2])
    say(f"gru_fast {gru_fast.__version__} demo: the model shipped in {DATA_DIR}")
    say(f"  {model} + Linear({model.hidden_size} -> {K})")
    say(f"  task: {record['task']}")
    say(f"  trained by {model.provenance.get('source', '?')} (torch {record['versions']['torch']}, "
        f"{record['training']['wall_seconds']:.0f} s on {record['training']['threads']} threads)")
    say()

    started = time.perf_counter()
    classify(model, head, data.x, data.lengths)  # loads the kernels (the first time ever: compiles them)
    first = time.perf_counter() - started
    if first > 2.0:
        say(f"(gru_fast compiled its kernels in {first:.0f} s: first run only, they are cached on disk)")
    started = time.perf_counter()
    logits = classify(model, head, data.x, data.lengths)
    seconds = time.perf_counter() - started
    accuracy = float((logits.argmax(1) == data.labels).mean())
    recorded = record["accuracy"]["shipped_eval"]
    N = len(data.labels)
    say(f"accuracy on the {N} shipped held-out sequences (lengths {data.lengths.min()}-{data.lengths.max()}): "
        f"{100 * accuracy:.2f} %   (recorded at training {100 * recorded:.2f} %, chance "
        f"{100 / K:.1f} %; {1e3 * seconds:.0f} ms)")
    say(f"  accuracy figures: {accuracy_sets(record)}")
    if accuracy < recorded - 2 / N:
        failures.append("accuracy below the recorded figure")

    say(f"parity, max abs error in float32 (tolerance {TOLERANCE:g}; logits {LOGITS_TOLERANCE:g}):")

    def check(label, err, tol):
        ok = err <= tol
        say(f"  {label:<71s} {err:.1e}  {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(label)

    check(f"logits  vs PyTorch, its output recorded at training ({N} sequences)",
          float(np.abs(logits - data.torch_logits).max()), LOGITS_TOLERANCE)
    if not _installed("onnx"):
        say("  ONNX checks skipped: the onnx package is not installed (pip install 'gru_fast[onnx]')")
    else:
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(ONNX_FILE))
        common = int(data.lengths[:REFERENCE_BATCH].min())
        x_ref = np.ascontiguousarray(data.x[:REFERENCE_BATCH, :common])
        full = np.full(REFERENCE_BATCH, common, np.int64)
        ref_logits, ref_y, ref_h = ReferenceEvaluator(proto).run(None, {"x": x_ref, "lengths": full})
        y, h_n = model(x_ref)
        check(f"y, h_n  vs ONNX reference evaluator, {ONNX_FILE.name} ({REFERENCE_BATCH} x {common} steps)",
              max(float(np.abs(y - ref_y).max()), float(np.abs(h_n - ref_h).max())), TOLERANCE)
        if _installed("onnxruntime"):
            import onnxruntime as ort

            session = ort.InferenceSession(ONNX_FILE.read_bytes(), providers=["CPUExecutionProvider"])
            ort_logits, ort_y, ort_h = session.run(None, {"x": data.x, "lengths": data.lengths})
            y, h_n = model(data.x, lengths=data.lengths)
            check(f"y, h_n  vs ONNX Runtime, {ONNX_FILE.name} ({N} sequences)",
                  max(float(np.abs(y - ort_y).max()), float(np.abs(h_n - ort_h).max())), TOLERANCE)
            check(f"logits  vs ONNX Runtime, {ONNX_FILE.name} ({N} sequences)",
                  float(np.abs(logits - ort_logits).max()), LOGITS_TOLERANCE)
        else:
            say("  ONNX Runtime check skipped: onnxruntime is not installed")

    if timing and failures:
        say()
        say("timing skipped: the checks above failed")
    elif timing:
        say()
        _timing_table(model, data, rounds, threads, peers, say)
    if failures:
        say()
        say(f"FAILED: {'; '.join(failures)}")
        return 4
    return 0


def _timing_table(model, data, rounds, threads, wanted, say):
    description = _limit_threads(threads)
    L, H = model.num_layers, model.hidden_size
    batch_x = np.ascontiguousarray(data.x[:64, :64])
    if batch_x.shape[1] < 64:
        batch_x = np.pad(batch_x, ((0, 0), (0, 64 - batch_x.shape[1]), (0, 0)))
    cases = [("stream step", "B=1", batch_x[:1, :1], True),
             ("sequence", "B=1 T=64", batch_x[:1], False),
             ("batch", "B=64 T=64", batch_x, False)]
    missing = [p for p in wanted if not _installed(_PEER_MODULES[p])]
    if not _installed("onnx"):  # the peers' graph is built with onnx.helper
        missing += [p for p in ("ONNX Runtime", "OpenVINO") if p in wanted and p not in missing]
    peers = [p for p in PEERS if p in wanted and p not in missing]
    module = None
    if "PyTorch" in peers:
        import torch

        torch.set_num_threads(threads)
        module = torch_module(model)
    notes, rows, rounds_done, busy_cases, shares, left_out = [], [], [], [], [], 0
    with tempfile.TemporaryDirectory(prefix="gru_fast-demo-") as tmp:
        for name, shape, x, stream in cases:
            runners = {"gru_fast": GruFastRunner(model, x, stream)}
            x_tm = np.ascontiguousarray(x.transpose(1, 0, 2))
            T, B = x_tm.shape[:2]
            for peer in peers:
                try:
                    if peer == "PyTorch":
                        runners[peer] = TorchRunner(module, x, stream)
                    else:
                        proto = gru_only_onnx(model, T, B)
                        if peer == "ONNX Runtime":
                            runners[peer] = OrtRunner(proto.SerializeToString(), x_tm, L, H, stream)
                        else:
                            path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
                            path.write_bytes(proto.SerializeToString())
                            runners[peer] = OpenVinoRunner(path, x_tm, L, H, stream)
                except Exception as exc:  # noqa: BLE001 - a peer failing to build is reported, not fatal
                    notes.append(f"{peer} ({name}) failed to build: {type(exc).__name__}: {exc}")
            # every peer's first output against gru_fast's before anything is timed
            reference = None
            for peer, runner in runners.items():
                runner.reset()
                with runner.context():
                    runner.call()
                y, h = runner.result()
                runner.reset()
                if reference is None:
                    reference = (y, h)
                    continue
                err = max(float(np.abs(y - reference[0]).max()), float(np.abs(h - reference[1]).max()))
                if err > TOLERANCE:
                    notes.append(f"{peer} ({name}) differs from gru_fast by {err:.1e}: its time is marked *")
                    runners[peer].mismatch = True
            times, done, quiet, run_, share, busy = time_interleaved(runners, rounds, threads=threads)
            rounds_done.append(done)
            left_out += run_ - done
            shares.append(share)
            if busy:
                busy_cases.append(f"{name}: {quiet} of {run_} rounds quiet")
            rows.append((name, shape, times, {p for p, r in runners.items() if getattr(r, "mismatch", False)}))

    columns = ["gru_fast"] + peers
    low, high = min(rounds_done), max(rounds_done)
    span = f"{low}" if low == high else f"{low}-{high}"
    dropped = f" ({left_out} busy round{'s' * (left_out != 1)} left out)" if left_out else ""
    say(f"timing: microseconds per call, median of {span} interleaved rounds{dropped}, {description}"
        + ("  [BUSY MACHINE: unreliable, see the warning below]" if busy_cases else ""))
    header = f"  {'call':<12s} {'shape':<10s}" + "".join(f"{c:>14s}" for c in columns)
    if peers:
        header += f"{'best peer / gru_fast':>22s}"
    say(header)
    for name, shape, times, mismatched in rows:
        line = f"  {name:<12s} {shape:<10s}"
        for column in columns:
            value = times.get(column)
            text = "failed" if value is None else _fmt_us(value) + ("*" if column in mismatched else "")
            line += f"{text:>14s}"
        peer_times = [times[p] for p in peers if p in times and p not in mismatched]
        if peer_times:
            line += f"{'x' + format(min(peer_times) / times['gru_fast'], '.1f'):>22s}"
        say(line)
    if missing:
        say(f"  not timed (not installed): {', '.join(missing)}")
    for note in notes:
        say(f"  note: {note}")
    if busy_cases:
        say(busy_warning(max(shares), "; ".join(busy_cases)))
