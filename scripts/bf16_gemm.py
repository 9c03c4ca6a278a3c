"""GMAC/s per core of the recurrent product ``h @ R^T`` with float32 weights against bfloat16 weights, and
the time of a B=1 model call with each.

    python scripts/bf16_gemm.py [--hidden 256 384 512] [--rounds 100] [--batch-ms 2] [--json PATH]
                              [--no-spans] [--no-model] [--no-gemm]

Kernels: one thread, K = H, n_groups = H / 16 (3H output columns), 1, 4 and 8 rows, zero start: the
kernels ``recur1_all`` / ``recur4_all`` / ``recur8_all`` (float32 weights, 12 H^2 bytes) against
``recur1_all_bf16`` / ``recur4_all_bf16`` / ``recur8_all_bf16`` (bfloat16 weights in k pairs, 6 H^2
bytes) of :mod:`gru_fast._tiles`.  The weights are reused call after call, as in a GRU's steps, so they
stay in whichever cache holds them.  A timed call runs the kernel enough times to last about 0.5 ms.
For one row, ``bf16 x1`` and ``bf16 x2`` are the library's one-row kernel built with 1 and 2 groups per
pass over k instead of :data:`gru_fast._tiles.SPAN_BF16` (``--no-spans`` leaves them out); their bits
are checked equal to the library kernel's.

Model (B=1): ``gru_fast.GRU`` I=H=256 with random weights, ``model.stream(1).bind(x_t, out=y_t)`` (one
step per call) against the same with ``model.with_weights("bfloat16")``; and T=100 I=64 H=256, the whole
call (``model.bind``); each with one thread and with two.

The variants of a table are timed interleaved round by round in a shuffled order
(:func:`gru_fast.peers.time_interleaved`, which also leaves out rounds during which other processes
used the CPUs, unless too few are left).  "median" is the median over rounds with its interquartile
range, "best" the fastest round: on a shared machine the best is the steadier estimate of what the
code can do, the median of what it did.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gru_fast and bench

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

import gru_fast  # noqa: E402
from gru_fast import _tiles as t  # noqa: E402
from gru_fast._bf16 import from_bf16, pack_bf16, to_bf16
from gru_fast._layout import aligned_zeros as _aligned_zeros, pack_into as _pack_into
from gru_fast.peers import GruFastSequence, GruFastStream, Runner, ThreadPinned, thread_limit, time_interleaved
from bench.report import machine_info

TILE, GROUP_COLS = t.TILE, t.GROUP * t.TILE
SPANS = (1, 2)  # groups per pass of the one-row variants timed next to the library's SPAN_BF16

# the library's one-row bf16 product, built with other numbers of groups per pass
recur1_all_bf16_x1 = t._make_gemm(1, *t.GEMM_ALL, "zero", "bf16", 1)
recur1_all_bf16_x2 = t._make_gemm(1, *t.GEMM_ALL, "zero", "bf16", 2)


# ---------------------------------------------------------------------------------------------------
# timed loops: the kernel ``n`` times on the same operands
# ---------------------------------------------------------------------------------------------------

@njit(cache=False)
def _loop_float32(rows, c, a, w, k, n_groups, n):
    c0, c1, c2, c3, c4, c5, c6, c7 = (c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data,
                                      c[4].ctypes.data, c[5].ctypes.data, c[6].ctypes.data, c[7].ctypes.data)
    a0, a1, a2, a3, a4, a5, a6, a7 = (a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[3].ctypes.data,
                                      a[4].ctypes.data, a[5].ctypes.data, a[6].ctypes.data, a[7].ctypes.data)
    for _ in range(n):
        if rows == 1:
            t.recur1_all(c0, a0, w.ctypes.data, c0, k, n_groups, np.float32(0))
        elif rows == 4:
            t.recur4_all(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, c0, k, n_groups, np.float32(0))
        else:
            t.recur8_all(c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3, a4, a5, a6, a7, w.ctypes.data, c0, k,
                         n_groups, np.float32(0))


@njit(cache=False)
def _loop_bf16(rows, c, a, w, k, n_groups, n):
    """rows 8, 4, 1: recur8_all_bf16, recur4_all_bf16, recur1_all_bf16; rows -1, -2: the one-row form
    with 1, 2 groups per pass."""
    c0, c1, c2, c3, c4, c5, c6, c7 = (c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data,
                                      c[4].ctypes.data, c[5].ctypes.data, c[6].ctypes.data, c[7].ctypes.data)
    a0, a1, a2, a3, a4, a5, a6, a7 = (a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[3].ctypes.data,
                                      a[4].ctypes.data, a[5].ctypes.data, a[6].ctypes.data, a[7].ctypes.data)
    for _ in range(n):
        if rows == 1:
            t.recur1_all_bf16(c0, a0, w.ctypes.data, c0, k, n_groups, np.float32(0))
        elif rows == 4:
            t.recur4_all_bf16(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, c0, k, n_groups, np.float32(0))
        elif rows == 8:
            t.recur8_all_bf16(c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3, a4, a5, a6, a7, w.ctypes.data, c0, k,
                              n_groups, np.float32(0))
        elif rows == -1:
            recur1_all_bf16_x1(c0, a0, w.ctypes.data, c0, k, n_groups, np.float32(0))
        else:
            recur1_all_bf16_x2(c0, a0, w.ctypes.data, c0, k, n_groups, np.float32(0))


class _GemmRunner(Runner):
    engine = "gemm"

    def __init__(self, variant, rows, a, w, k, n_groups, inner):
        super().__init__()
        self.c = np.zeros((8, GROUP_COLS * n_groups), np.float32)
        if variant == "float32":
            self.loop, mode = _loop_float32, rows
        else:  # "bf16", "bf16 x1", "bf16 x2"
            self.loop, mode = _loop_bf16, (rows if variant == "bf16" else -int(variant.split(" x")[1]))
        self.args = (mode, self.c, a, w, k, n_groups)
        self.inner = inner

    def call(self):
        self.loop(*self.args, self.inner)

    def outputs(self):
        return self.c


def _weights(hidden, seed=0):
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal((3 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    a = np.tanh(rng.standard_normal((8, hidden))).astype(np.float32)  # hidden states: in (-1, 1)
    w32 = _aligned_zeros(m.size, np.dtype(np.float32))
    _pack_into(w32, m, hidden)
    packed = pack_bf16(m, hidden)
    w16 = _aligned_zeros(packed.size, np.dtype(np.uint32))
    w16[:] = packed
    return m, a, {"float32": w32, "bf16": w16}


def _errors(m, a, hidden, outputs):
    """Max abs error of each variant's 8-row output against the float64 product of the bfloat16 weights
    (float32 for "float32") and the float32 activations, over the largest possible error scale
    sum_k |a_k w_k| of a column."""
    wide = from_bf16(to_bf16(m)).astype(np.float64)
    result = {}
    for name, c in outputs.items():
        w = m.astype(np.float64) if name == "float32" else wide
        exact = a.astype(np.float64) @ w.T  # (8, 3H) in ONNX gate order
        scale = np.abs(a.astype(np.float64)) @ np.abs(w.T)
        # packed column 48g + 16q + j is gate q of unit 16g + j
        cols = np.array([q * hidden + 16 * g + j for g in range(hidden // 16) for q in range(3) for j in range(16)])
        err = np.abs(c.astype(np.float64) - exact[:, cols])
        result[name] = {"max_abs": float(err.max()), "max_rel_to_scale": float((err / scale[:, cols]).max())}
    return result


def _row(table, name, timing, work, unit):
    """A result row: ``work`` per call (MACs, or 1 for a model call) over the timing's microseconds."""
    def rate(us):
        return work / (us * 1e-6) / 1e9

    return {"table": table, "variant": name, "median_us": timing.median_us, "q1_us": timing.q1_us,
            "q3_us": timing.q3_us, "min_us": timing.min_us, "rounds": timing.rounds, "busy": timing.busy,
            "gmac_s": rate(timing.median_us) if unit else None, "q1_gmac_s": rate(timing.q3_us) if unit else None,
            "q3_gmac_s": rate(timing.q1_us) if unit else None, "best_gmac_s": rate(timing.min_us) if unit else None}


def run_gemm(hiddens=(256, 384, 512), rounds=100, batch_ms=2.0, spans=True):
    rows_out, errors, same_bits = [], {}, {}
    for hidden in hiddens:
        if hidden % 16:
            raise ValueError(f"hidden sizes must be multiples of 16, got {hidden}")
        k, n_groups = hidden, hidden // 16
        m, a, w = _weights(hidden)
        outputs = {}
        for rows in (1, 4, 8):
            names = ["float32", "bf16"] + ([f"bf16 x{s}" for s in SPANS] if spans and rows == 1 else [])
            macs = rows * k * GROUP_COLS * n_groups
            inner = max(1, int(0.5e-3 * 25e9 / macs))  # about 0.5 ms at 25 GMAC/s
            runners = {name: _GemmRunner(name, rows, a, w[name.split(" ")[0]], k, n_groups, inner) for name in names}
            timings = time_interleaved(runners, rounds=rounds, batch_seconds=batch_ms / 1e3, min_rounds=5)
            for name in names:
                r = _row(f"H={hidden} rows={rows}", name, timings[name], macs * inner, True)
                r.update(hidden=hidden, rows=rows, weight_kib=w[name.split(" ")[0]].nbytes / 1024,
                         us_per_kernel=timings[name].median_us / inner)
                rows_out.append(r)
                if rows == 8:
                    outputs[name] = runners[name].outputs().copy()
                if " x" in name:  # another span: the same fma chains, the same bits
                    same_bits[f"H={hidden} {name}"] = bool(np.array_equal(runners[name].outputs()[:1],
                                                                          runners["bf16"].outputs()[:1]))
        errors[hidden] = _errors(m, a, hidden, outputs)
    return {"results": rows_out, "errors": errors, "same_bits_as_library": same_bits}


class _Pinned(ThreadPinned):
    """ThreadPinned's runner built under its thread count (a binding plans its call when it is made)."""

    def __init__(self, make, threads):
        with thread_limit(threads):
            super().__init__(make(), threads)


def _model(input_size, hidden, seed=0):
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(hidden)
    layer = (rng.uniform(-s, s, (1, 3 * hidden, input_size)).astype(np.float32),
             rng.uniform(-s, s, (1, 3 * hidden, hidden)).astype(np.float32),
             rng.uniform(-s, s, (1, 6 * hidden)).astype(np.float32))
    return gru_fast.GRU([layer])


def run_model(rounds=100, batch_ms=10.0):
    """The model-level B=1 timings, float32 against bfloat16 weights, with 1 and 2 threads: one bound
    stream step (I=H=256), and the whole T=100 I=64 H=256 call."""
    rng = np.random.default_rng(1)
    h0 = np.zeros((1, 1, 256), np.float32)

    def float32_against_bf16(label, model, runner, x):
        """``model`` and its bfloat16 copy on 1 and 2 threads, timed interleaved -> rows."""
        runners = {}
        for threads in (1, 2):
            for name, version in (("float32", model), ("bf16", model.with_weights("bfloat16"))):
                runners[f"{name} {threads} thread{'s' if threads > 1 else ''}"] = _Pinned(
                    lambda version=version: runner(version, x, h0), threads)
        timings = time_interleaved(runners, rounds=rounds, batch_seconds=batch_ms / 1e3, min_rounds=5)
        return [_row(label, name, timings[name], 1, False) for name in runners]

    out = float32_against_bf16("stream step I=H=256 B=1", _model(256, 256), GruFastStream,
                               rng.standard_normal((1, 1, 256)).astype(np.float32))
    out += float32_against_bf16("call T=100 B=1 I=64 H=256", _model(64, 256), GruFastSequence,
                                rng.standard_normal((100, 1, 64)).astype(np.float32))
    return {"results": out}


def markdown(report) -> str:
    lines = []
    gemm = report.get("gemm")
    if gemm:
        lines += ["| H | rows | variant | weights KiB | GMAC/s median | IQR | best | us/call (median) | rounds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in gemm["results"]:
            busy = " (busy)" if r["busy"] else ""
            lines.append(f"| {r['hidden']} | {r['rows']} | {r['variant']} | {r['weight_kib']:.0f} | "
                         f"{r['gmac_s']:.1f} | {r['q1_gmac_s']:.1f}-{r['q3_gmac_s']:.1f} | {r['best_gmac_s']:.1f} | "
                         f"{r['us_per_kernel']:.2f} | {r['rounds']}{busy} |")
        lines += ["", "| H | variant | max abs error | max error / sum_k abs(a_k w_k) |", "|---|---|---|---|"]
        for hidden, errs in gemm["errors"].items():
            for name, e in errs.items():
                lines.append(f"| {hidden} | {name} | {e['max_abs']:.3g} | {e['max_rel_to_scale']:.3g} |")
        if gemm["same_bits_as_library"]:
            lines += ["", "same bits as recur1_all_bf16: " +
                      ", ".join(f"{k}: {v}" for k, v in gemm["same_bits_as_library"].items())]
        lines.append("")
    model = report.get("model")
    if model:
        lines += ["| case | variant | us/call median | IQR | best | rounds |", "|---|---|---|---|---|---|"]
        for r in model["results"]:
            busy = " (busy)" if r["busy"] else ""
            lines.append(f"| {r['table']} | {r['variant']} | {r['median_us']:.1f} | "
                         f"{r['q1_us']:.1f}-{r['q3_us']:.1f} | {r['min_us']:.1f} | {r['rounds']}{busy} |")
        lines.append("")
    info = report["machine"]
    lines += [f"CPU: {info['cpu_model']}; load average {info['load_average']}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--batch-ms", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-spans", action="store_true")
    parser.add_argument("--no-gemm", action="store_true")
    parser.add_argument("--no-model", action="store_true")
    args = parser.parse_args(argv)
    report = {"machine": machine_info()}
    if not args.no_gemm:
        report["gemm"] = run_gemm(args.hidden, args.rounds, args.batch_ms, not args.no_spans)
    if not args.no_model:
        report["model"] = run_model(args.rounds)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
