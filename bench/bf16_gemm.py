"""GMAC/s per core of the recurrent product ``h @ R^T`` with float32 weights against bfloat16 weights.

    python -m bench.bf16_gemm [--hidden 256 384 512] [--rounds 60] [--batch-ms 20] [--json PATH]
                              [--no-experimental]

One thread, K = H, n_groups = H / 16 (3H output columns), 1 and 4 rows, zero start: the kernels
``recur1_all`` / ``recur4_all`` (float32 weights, 12 H^2 bytes) against ``recur1_all_bf16`` /
``recur4_all_bf16`` (bfloat16 weights widened on load, 6 H^2 bytes) of :mod:`gru_fast._tiles`.  The
weights are reused call after call, as in a GRU's steps, so they stay in whichever cache holds them.
A timed call runs the kernel enough times to last about 1 ms; the variants are timed interleaved round
by round in a shuffled order (:func:`bench.engines.time_interleaved`, which also leaves out rounds
during which other processes used the CPUs), and a figure is the median over rounds.

Two experimental kernels, defined here and used nowhere else, are timed too (``--no-experimental``
leaves them out).  Both read the weights packed with pairs of k interleaved: per group and pair of rows
(2p, 2p+1), three tiles of 16 int32 words, word i = (W[2p+1, col i] << 16) | W[2p, col i]:

* ``pairs``: the same float32 arithmetic as the library's bf16 kernels (row 2p's weights are the word
  shifted left 16 bits, row 2p+1's the word with its low half cleared: one integer operation per 16
  weights instead of a zero-extension and a shift), so the same bits;
* ``dpbf16``: AVX512-BF16's ``vdpbf16ps`` (``llvm.x86.avx512bf16.dpbf16ps.512``), 32 multiply-adds
  per instruction.  It multiplies bfloat16 by bfloat16, so the activations are rounded to bfloat16
  as well (done in the timed loop, every call, as a GRU step would have to), and it adds the two
  products of a pair before the accumulator: its results differ from the fma chain.  Its error against
  the float64 product of the bfloat16 weights and the unrounded activations is printed next to the
  error of the widening kernels.  Only on CPUs with avx512_bf16.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from gru_fast import _tiles as t
from gru_fast._bf16 import from_bf16, pack_bf16, to_bf16
from gru_fast.model import _aligned_zeros, _pack_into

from .engines import Runner, time_interleaved
from .report import machine_info

TILE, GROUP_COLS = t.TILE, t.GROUP * t.TILE


# ---------------------------------------------------------------------------------------------------
# experimental kernels: k-pair interleaved bfloat16 weights
# ---------------------------------------------------------------------------------------------------

class _BFloat(ir.types.Type):
    """LLVM's ``bfloat`` (llvmlite has no such type; only bitcasts to and from it are emitted)."""

    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash(_BFloat)


def _make_pair_gemm(rows, mode):
    """c_m[0 : 48 n_groups] = a_m @ W for ``rows`` rows, W packed in k pairs (see the module's doc).

    Arguments: c_0.., a_0.. (``mode="widen"``: float32 rows of K values; ``"dot"``: uint32 rows of K/2
    bfloat16 pairs), w, K (even), n_groups, all int64."""

    def typer(args):
        if len(args) != 2 * rows + 3 or not all(isinstance(a, types.Integer) for a in args):
            return None

        def codegen(context, builder, signature, llargs):
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vf, vi = ir.VectorType(f32, TILE), ir.VectorType(i32, TILE)
            vb = ir.VectorType(_BFloat(), 2 * TILE)
            mod = builder.module
            if mode == "widen":
                name = "llvm.fma.v16f32"
                op = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(vf, [vf] * 3), name)
            else:
                name = "llvm.x86.avx512bf16.dpbf16ps.512"
                op = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(vf, [vf, vb, vb]), name)
            c_ptrs = [builder.inttoptr(v, f32.as_pointer()) for v in llargs[:rows]]
            a_ptrs = [builder.inttoptr(v, (f32 if mode == "widen" else i32).as_pointer())
                      for v in llargs[rows : 2 * rows]]
            w_ptr = builder.inttoptr(llargs[2 * rows], i32.as_pointer())
            k_n, n_groups = llargs[2 * rows + 1], llargs[2 * rows + 2]
            pairs = builder.ashr(k_n, ir.Constant(i64, 1))
            zero64, one64 = ir.Constant(i64, 0), ir.Constant(i64, 1)
            lane0 = ir.Constant(vi, [0] * TILE)
            words = GROUP_COLS  # int32 words per pair of rows: 3 tiles of 16
            shift = ir.Constant(vi, [16] * TILE)
            high = ir.Constant(vi, [-65536] * TILE)  # 0xFFFF0000

            def splat(value, vty):
                u = ir.Constant(vty, ir.Undefined)
                return builder.shuffle_vector(builder.insert_element(u, value, ir.Constant(i32, 0)), u, lane0)

            before = builder.block
            head = builder.append_basic_block("pg.group")
            init = builder.append_basic_block("pg.init")
            body = builder.append_basic_block("pg.k")
            store = builder.append_basic_block("pg.store")
            after = builder.append_basic_block("pg.next")
            builder.branch(head)
            builder.position_at_end(head)
            g = builder.phi(i64)
            g.add_incoming(zero64, before)
            builder.cbranch(builder.icmp_signed("<", g, n_groups), init, after)

            builder.position_at_end(init)
            w_group = builder.mul(g, builder.mul(pairs, ir.Constant(i64, words)))
            start = ir.Constant(vf, None)
            builder.cbranch(builder.icmp_signed(">", pairs, zero64), body, store)

            builder.position_at_end(body)
            p = builder.phi(i64)
            p.add_incoming(zero64, init)
            acc = [[builder.phi(vf) for _ in range(3)] for _ in range(rows)]
            for m in range(rows):
                for q in range(3):
                    acc[m][q].add_incoming(start, init)
            base = builder.add(w_group, builder.mul(p, ir.Constant(i64, words)))
            wv = [builder.load(builder.bitcast(builder.gep(w_ptr, [builder.add(base, ir.Constant(i64, 16 * q))]),
                                               vi.as_pointer()), align=4) for q in range(3)]
            new = []
            if mode == "widen":
                lo = [builder.bitcast(builder.shl(w, shift), vf) for w in wv]  # row 2p
                hi = [builder.bitcast(builder.and_(w, high), vf) for w in wv]  # row 2p + 1
                k0 = builder.shl(p, one64)
                for m in range(rows):
                    x0 = splat(builder.load(builder.gep(a_ptrs[m], [k0])), vf)
                    x1 = splat(builder.load(builder.gep(a_ptrs[m], [builder.add(k0, one64)])), vf)
                    new.append([builder.call(op, [x1, hi[q], builder.call(op, [x0, lo[q], acc[m][q]])])
                                for q in range(3)])
            else:
                wb = [builder.bitcast(w, vb) for w in wv]
                for m in range(rows):
                    x = builder.bitcast(splat(builder.load(builder.gep(a_ptrs[m], [p])), vi), vb)
                    new.append([builder.call(op, [acc[m][q], x, wb[q]]) for q in range(3)])
            p_next = builder.add(p, one64)
            p.add_incoming(p_next, body)
            for m in range(rows):
                for q in range(3):
                    acc[m][q].add_incoming(new[m][q], body)
            builder.cbranch(builder.icmp_signed("<", p_next, pairs), body, store)

            builder.position_at_end(store)
            final = [[builder.phi(vf) for _ in range(3)] for _ in range(rows)]
            for m in range(rows):
                for q in range(3):
                    final[m][q].add_incoming(start, init)
                    final[m][q].add_incoming(new[m][q], body)
            col = builder.mul(g, ir.Constant(i64, GROUP_COLS))
            for m in range(rows):
                for q in range(3):
                    dst = builder.gep(c_ptrs[m], [builder.add(col, ir.Constant(i64, 16 * q))])
                    builder.store(final[m][q], builder.bitcast(dst, vf.as_pointer()), align=4)
            g.add_incoming(builder.add(g, one64), store)
            builder.branch(head)
            builder.position_at_end(after)
            return context.get_dummy_value()

        return types.none(*args), codegen

    names = [f"c{m}" for m in range(rows)] + [f"a{m}" for m in range(rows)] + ["w", "k", "n_groups"]
    namespace = {"typer": typer}
    name = f"pair_gemm_{rows}_{mode}"
    exec(f"def {name}(typingctx, {', '.join(names)}):\n    return typer(({', '.join(names)},))\n", namespace)
    return intrinsic(namespace[name])


pairs1, pairs4 = _make_pair_gemm(1, "widen"), _make_pair_gemm(4, "widen")
dpbf16_1, dpbf16_4 = _make_pair_gemm(1, "dot"), _make_pair_gemm(4, "dot")


def pack_pairs(m, hidden):
    """``m`` (3H, K) float32, K even, rounded to bfloat16 and packed in k pairs: uint16, per group and pair
    (2p, 2p+1) 48 pairs (W[2p, col], W[2p+1, col]).  Built from :func:`gru_fast._bf16.pack_bf16`'s
    layout: group (K, 48) -> (K/2, 2, 48) -> (K/2, 48, 2)."""
    k = m.shape[1]
    if k % 2:
        raise ValueError(f"K must be even, got {k}")
    groups = pack_bf16(m, hidden).reshape(-1, k // 2, 2, GROUP_COLS)
    out = _aligned_zeros(groups.size, np.dtype(np.uint16))
    out.reshape(-1, k // 2, GROUP_COLS, 2)[...] = groups.transpose(0, 1, 3, 2)
    return out


@njit(cache=False)
def _round_pairs(a, out):
    """a (float32, K even) rounded to bfloat16, to nearest even (as gru_fast._bf16.to_bf16; the values
    here are finite), two to a uint32 word: out[p] = bf16(a[2p]) | bf16(a[2p + 1]) << 16."""
    bits = a.view(np.uint32)
    for p in range(out.size):
        lo, hi = bits[2 * p], bits[2 * p + 1]
        lo = (lo + np.uint32(0x7FFF) + ((lo >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        hi = (hi + np.uint32(0x7FFF) + ((hi >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        out[p] = lo | (hi << np.uint32(16))


# ---------------------------------------------------------------------------------------------------
# timed loops: the kernel ``n`` times on the same operands
# ---------------------------------------------------------------------------------------------------

@njit(cache=False)
def _loop_float32(rows, c, a, a_pairs, w, k, n_groups, n):
    c0, c1, c2, c3 = c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data
    a0, a1, a2, a3 = a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[3].ctypes.data
    for _ in range(n):
        if rows == 1:
            t.recur1_all(c0, a0, w.ctypes.data, c0, k, n_groups, np.float32(0))
        else:
            t.recur4_all(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, c0, k, n_groups, np.float32(0))


@njit(cache=False)
def _loop_bf16(rows, c, a, a_pairs, w, k, n_groups, n):
    c0, c1, c2, c3 = c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data
    a0, a1, a2, a3 = a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[3].ctypes.data
    for _ in range(n):
        if rows == 1:
            t.recur1_all_bf16(c0, a0, w.ctypes.data, c0, k, n_groups, np.float32(0))
        else:
            t.recur4_all_bf16(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, c0, k, n_groups, np.float32(0))


@njit(cache=False)
def _loop_pairs(rows, c, a, a_pairs, w, k, n_groups, n):
    c0, c1, c2, c3 = c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data
    a0, a1, a2, a3 = a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[3].ctypes.data
    for _ in range(n):
        if rows == 1:
            pairs1(c0, a0, w.ctypes.data, k, n_groups)
        else:
            pairs4(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, k, n_groups)


@njit(cache=False)
def _loop_dpbf16(rows, c, a, a_pairs, w, k, n_groups, n):
    c0, c1, c2, c3 = c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data
    p0, p1, p2, p3 = (a_pairs[0].ctypes.data, a_pairs[1].ctypes.data, a_pairs[2].ctypes.data,
                      a_pairs[3].ctypes.data)
    for _ in range(n):
        for r in range(rows):  # the activations' rounding is part of a step
            _round_pairs(a[r], a_pairs[r])
        if rows == 1:
            dpbf16_1(c0, p0, w.ctypes.data, k, n_groups)
        else:
            dpbf16_4(c0, c1, c2, c3, p0, p1, p2, p3, w.ctypes.data, k, n_groups)


# each variant its own compiled loop: a CPU without avx512_bf16 never compiles the dpbf16 one
LOOPS = {"float32": _loop_float32, "bf16": _loop_bf16, "pairs": _loop_pairs, "dpbf16": _loop_dpbf16}


class _GemmRunner(Runner):
    engine = "gemm"

    def __init__(self, variant, rows, a, w, k, n_groups, inner):
        super().__init__()
        self.loop = LOOPS[variant]
        self.args = (rows, np.zeros((4, GROUP_COLS * n_groups), np.float32), a,
                     np.zeros((4, k // 2), np.uint32), w, k, n_groups)
        self.inner = inner

    def call(self):
        self.loop(*self.args, self.inner)

    def outputs(self):
        return self.args[1]


def _weights(hidden, seed=0):
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal((3 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    a = np.tanh(rng.standard_normal((4, hidden))).astype(np.float32)  # a hidden state: in (-1, 1)
    w32 = _aligned_zeros(m.size, np.dtype(np.float32))
    _pack_into(w32, m, hidden)
    w16 = _aligned_zeros(m.size, np.dtype(np.uint16))
    w16[:] = pack_bf16(m, hidden)
    return m, a, {"float32": w32, "bf16": w16, "pairs": None, "dpbf16": None}


def _errors(m, a, hidden, outputs):
    """Max abs error of each variant's 4-row output against the float64 product of the bfloat16 weights
    (float32 for "float32") and the float32 activations, over the largest possible error scale
    sum_k |a_k w_k| of a column."""
    wide = from_bf16(to_bf16(m)).astype(np.float64)
    result = {}
    for name, c in outputs.items():
        w = m.astype(np.float64) if name == "float32" else wide
        exact = a.astype(np.float64) @ w.T  # (4, 3H) in ONNX gate order
        scale = np.abs(a.astype(np.float64)) @ np.abs(w.T)
        # packed column 48g + 16q + j is gate q of unit 16g + j
        cols = np.array([q * hidden + 16 * g + j for g in range(hidden // 16) for q in range(3) for j in range(16)])
        err = np.abs(c.astype(np.float64) - exact[:, cols])
        result[name] = {"max_abs": float(err.max()), "max_rel_to_scale": float((err / scale[:, cols]).max())}
    return result


def run(hiddens=(256, 384, 512), rounds=60, batch_ms=20.0, experimental=True):
    have_bf16 = "avx512_bf16" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
    names = ["float32", "bf16"] + (["pairs"] + (["dpbf16"] if have_bf16 else []) if experimental else [])
    rows_out = []
    errors = {}
    for hidden in hiddens:
        if hidden % 16:
            raise ValueError(f"hidden sizes must be multiples of 16, got {hidden}")
        k, n_groups = hidden, hidden // 16
        m, a, w = _weights(hidden)
        w["pairs"] = w["dpbf16"] = pack_pairs(m, hidden)
        outputs = {}
        for rows in (1, 4):
            macs = rows * k * GROUP_COLS * n_groups
            inner = max(1, int(1e-3 * 25e9 / macs))  # about 1 ms at 25 GMAC/s
            runners = {name: _GemmRunner(name, rows, a, w[name], k, n_groups, inner) for name in names}
            timings = time_interleaved(runners, rounds=rounds, batch_seconds=batch_ms / 1e3, min_rounds=5)
            for name in names:
                tm = timings[name]
                per_kernel_s = tm.median_us * 1e-6 / inner
                rows_out.append({"hidden": hidden, "rows": rows, "variant": name,
                                 "weight_kib": w[name].nbytes / 1024, "gmac_s": macs / per_kernel_s / 1e9,
                                 "q1_gmac_s": macs / (tm.q3_us * 1e-6 / inner) / 1e9,
                                 "q3_gmac_s": macs / (tm.q1_us * 1e-6 / inner) / 1e9,
                                 "us_per_kernel": per_kernel_s * 1e6, "rounds": tm.rounds, "busy": tm.busy})
                if rows == 4:
                    outputs[name] = runners[name].outputs().copy()
        errors[hidden] = _errors(m, a, hidden, outputs)
    return {"machine": machine_info(), "results": rows_out, "errors": errors}


def markdown(report) -> str:
    lines = ["| H | rows | variant | weights KiB | GMAC/s median | IQR | us/call | rounds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        busy = " (busy)" if r["busy"] else ""
        lines.append(f"| {r['hidden']} | {r['rows']} | {r['variant']} | {r['weight_kib']:.0f} | {r['gmac_s']:.1f} | "
                     f"{r['q1_gmac_s']:.1f}-{r['q3_gmac_s']:.1f} | {r['us_per_kernel']:.2f} | {r['rounds']}{busy} |")
    lines += ["", "| H | variant | max abs error | max error / sum_k abs(a_k w_k) |", "|---|---|---|---|"]
    for hidden, errs in report["errors"].items():
        for name, e in errs.items():
            lines.append(f"| {hidden} | {name} | {e['max_abs']:.3g} | {e['max_rel_to_scale']:.3g} |")
    info = report["machine"]
    lines += ["", f"CPU: {info['cpu_model']}; load average {info['load_average']}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batch-ms", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-experimental", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.hidden, args.rounds, args.batch_ms, not args.no_experimental)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
