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
   (a round during which other processes used over a quarter of the CPUs is left out,
   :class:`gru_fast.peers.CpuMeter`); when too few rounds are quiet the table is printed with a warning
   that its times are unreliable.

The engines are set up and timed by the peer harness, :mod:`gru_fast.peers` (the benchmark's too).  Peers
run the same weights: PyTorch a time-major ``nn.GRU`` (:func:`gru_fast.peers.torch_gru`), ONNX Runtime
and OpenVINO a GRU-only ONNX graph in time-major layout built from the engine's weights with
``onnx.helper`` (:func:`gru_fast.peers.onnx_gru`; the shipped file also holds the lengths handling and
the head, which would not be a like-for-like comparison).  Each peer's output is checked against
gru_fast's before it is timed.

Optional packages are imported only here, only when present: onnx (checks 3, the peers' graph),
onnxruntime, openvino, torch (only to time it as a peer).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import peers as harness

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
THREADS = harness.THREADS
PEERS = ("PyTorch", "ONNX Runtime", "OpenVINO")
_ENGINE = {label: engine for engine, label in harness.ENGINE_LABELS.items()}  # "PyTorch" -> "pytorch"
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
    L, H = model.num_layers, model.hidden_size
    batch_x = np.ascontiguousarray(data.x[:64, :64])
    if batch_x.shape[1] < 64:
        batch_x = np.pad(batch_x, ((0, 0), (0, 64 - batch_x.shape[1]), (0, 0)))
    batch_x = np.ascontiguousarray(batch_x.transpose(1, 0, 2))  # the harness's layout: (T, B, I)
    cases = [("stream step", "B=1", batch_x[:1, :1], True),
             ("sequence", "B=1 T=64", batch_x[:, :1], False),
             ("batch", "B=64 T=64", batch_x, False)]
    missing = [p for p in wanted if not _installed(harness.ENGINE_MODULES[_ENGINE[p]])]
    if not _installed("onnx"):  # the peers' graph is built with onnx.helper
        missing += [p for p in ("ONNX Runtime", "OpenVINO") if p in wanted and p not in missing]
    peers_timed = [p for p in PEERS if p in wanted and p not in missing]
    notes, rows, kept, busy_cases, shares, left_out = [], [], [], [], [], 0
    import gru_fast

    with harness.thread_limit(threads):
        description = f"{gru_fast.get_num_threads()} threads per engine"
        module = None
        if "PyTorch" in peers_timed:
            import torch

            torch.set_num_threads(threads)
            module = harness.torch_gru(model)
        for name, shape, x, stream in cases:
            h0 = np.zeros((L, x.shape[1], H), np.float32)
            runners = {"gru_fast": harness.build_runner("gru_fast", x, h0, stream=stream, model=model)}
            for peer in peers_timed:
                try:
                    runners[peer] = harness.build_runner(_ENGINE[peer], x, h0, stream=stream, model=model,
                                                       torch_module=module, threads=threads)
                except Exception as exc:  # noqa: BLE001 - a peer failing to build is reported, not fatal
                    notes.append(f"{peer} ({name}) failed to build: {type(exc).__name__}: {exc}")
            # every peer's first output against gru_fast's before anything is timed
            reference, mismatched = None, set()
            for peer, runner in runners.items():
                with runner.context():
                    runner.call()
                y, h = runner.outputs()
                if stream:
                    runner.reset(h0)
                if reference is None:
                    reference = (y, h)
                    continue
                err = max(float(np.abs(y - reference[0]).max()), float(np.abs(h - reference[1]).max()))
                if err > TOLERANCE:
                    notes.append(f"{peer} ({name}) differs from gru_fast by {err:.1e}: its time is marked *")
                    mismatched.add(peer)
            timings = harness.time_interleaved(runners, rounds, 0.01, gap_seconds=0.002, budget_seconds=2.5,
                                             busy_extra_rounds=rounds, threads=threads)
            first = timings["gru_fast"]
            kept.append(first.rounds)
            left_out += first.rounds_run - first.rounds
            shares.append(statistics.fmean(first.busy_shares))
            if first.busy:
                busy_cases.append(f"{name}: {first.quiet_rounds} of {first.rounds_run} rounds quiet")
            rows.append((name, shape, {p: t.median_us * 1e-6 for p, t in timings.items()}, mismatched))

    columns = ["gru_fast"] + peers_timed
    low, high = min(kept), max(kept)
    span = f"{low}" if low == high else f"{low}-{high}"
    dropped = f" ({left_out} busy round{'s' * (left_out != 1)} left out)" if left_out else ""
    say(f"timing: microseconds per call, median of {span} interleaved rounds{dropped}, {description}"
        + ("  [BUSY MACHINE: unreliable, see the warning below]" if busy_cases else ""))
    header = f"  {'call':<12s} {'shape':<10s}" + "".join(f"{c:>14s}" for c in columns)
    if peers_timed:
        header += f"{'best peer / gru_fast':>22s}"
    say(header)
    for name, shape, times, mismatched in rows:
        line = f"  {name:<12s} {shape:<10s}"
        for column in columns:
            value = times.get(column)
            text = "failed" if value is None else _fmt_us(value) + ("*" if column in mismatched else "")
            line += f"{text:>14s}"
        peer_times = [times[p] for p in peers_timed if p in times and p not in mismatched]
        if peer_times:
            line += f"{'x' + format(min(peer_times) / times['gru_fast'], '.1f'):>22s}"
        say(line)
    if missing:
        say(f"  not timed (not installed): {', '.join(missing)}")
    for note in notes:
        say(f"  note: {note}")
    if busy_cases:
        say(harness.busy_warning(max(shares), "; ".join(busy_cases)))
