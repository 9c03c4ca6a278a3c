"""GMAC/s per core of the recurrent product ``h @ R^T`` with float32 weights against bfloat16 weights.

    python scripts/bf16_gemm.py [--hidden 256 384 512] [--rounds 100] [--batch-ms 2] [--json PATH]
                              [--no-experimental]

One thread, K = H, n_groups = H / 16 (3H output columns), 1 and 4 rows, zero start: the kernels
``recur1_all`` / ``recur4_all`` (float32 weights, 12 H^2 bytes) against ``recur1_all_bf16`` /
``recur4_all_bf16`` (bfloat16 weights widened on load, 6 H^2 bytes) of :mod:`gru_fast._tiles`.  The
weights are reused call after call, as in a GRU's steps, so they stay in whichever cache holds them.
A timed call runs the kernel enough times to last about 0.5 ms; the variants are timed interleaved
round by round in a shuffled order (:func:`bench.engines.time_interleaved`, which also leaves out
rounds during which other processes used the CPUs, unless too few are left).  "median" is the median
over rounds with its interquartile range, "best" the fastest round: on a shared machine the best is
the steadier estimate of what the kernel can do, the median of what it did.

Experimental kernels, defined here and used nowhere else, are timed too (``--no-experimental`` leaves
them out):

* ``float32 x2``, ``bf16 x2`` (and x4), one row: the library's layout and arithmetic, but 2 (4) groups
  per pass over k, so 6 (12) independent fma chains instead of 3.  Each column's chain is unchanged, so
  are the bits (checked against the library kernel and printed).
* ``pairs`` (and ``pairs x2``, ``pairs x4`` for one row): bfloat16 weights packed with pairs of k
  interleaved: per group and pair of rows (2p, 2p+1), three tiles of 16 int32 words, word i =
  (W[2p+1, col i] << 16) | W[2p, col i].  Row 2p's weights are the word shifted left 16 bits, row
  2p+1's the word with its low half cleared: one integer operation per 16 weights instead of the
  library's zero-extension and shift (two, one of them on the shuffle port).  Same fma chains, same
  bits as ``recur*_all_bf16`` (checked).  K must be even.
* ``dpbf16``: AVX512-BF16's ``vdpbf16ps`` (``llvm.x86.avx512bf16.dpbf16ps.512``) on the k-pair
  layout, 32 multiply-adds per instruction.  It multiplies bfloat16 by bfloat16, so the activations are
  rounded to bfloat16 as well (in the timed loop, every call, as a GRU step would have to), and it adds
  the two products of a pair before the accumulator: its results differ from the fma chain.  Its error
  against the float64 product of the bfloat16 weights and the unrounded activations is printed next to
  the error of the widening kernels.  Only on CPUs with avx512_bf16.
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
from gru_fast._layout import aligned_zeros as _aligned_zeros, pack_into as _pack_into

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's bench package
from bench.engines import Runner, time_interleaved  # noqa: E402
from bench.report import machine_info  # noqa: E402

TILE, GROUP_COLS = t.TILE, t.GROUP * t.TILE
SPANS = (2, 4)  # groups per pass of the experimental one-row kernels


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


def _make_pair_gemm(rows, mode, span=1):
    """c_m[0 : 48 n_groups] = a_m @ W for ``rows`` rows, W packed in k pairs (see the module's doc).

    Arguments: c_0.., a_0.. (``mode="widen"``: float32 rows of K values; ``"dot"``: uint32 rows of K/2
    bfloat16 pairs), w, K (even), n_groups (a multiple of ``span``), all int64.  ``span`` groups are
    computed per pass over k: 3 * span * rows independent accumulator chains."""
    nt = 3 * span  # tiles per pass; tile i is tile i % 3 of group g + i // 3, columns 48 g + 16 i

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
            acc = [[builder.phi(vf) for _ in range(nt)] for _ in range(rows)]
            for m in range(rows):
                for q in range(nt):
                    acc[m][q].add_incoming(start, init)
            base = builder.add(w_group, builder.mul(p, ir.Constant(i64, words)))
            group_words = builder.mul(pairs, ir.Constant(i64, words))
            wv = []
            for i in range(nt):
                at = builder.add(builder.add(base, builder.mul(ir.Constant(i64, i // 3), group_words)),
                                 ir.Constant(i64, 16 * (i % 3)))
                wv.append(builder.load(builder.bitcast(builder.gep(w_ptr, [at]), vi.as_pointer()), align=4))
            new = []
            if mode == "widen":
                lo = [builder.bitcast(builder.shl(w, shift), vf) for w in wv]  # row 2p
                hi = [builder.bitcast(builder.and_(w, high), vf) for w in wv]  # row 2p + 1
                k0 = builder.shl(p, one64)
                for m in range(rows):
                    x0 = splat(builder.load(builder.gep(a_ptrs[m], [k0])), vf)
                    x1 = splat(builder.load(builder.gep(a_ptrs[m], [builder.add(k0, one64)])), vf)
                    new.append([builder.call(op, [x1, hi[q], builder.call(op, [x0, lo[q], acc[m][q]])])
                                for q in range(nt)])
            else:
                wb = [builder.bitcast(w, vb) for w in wv]
                for m in range(rows):
                    x = builder.bitcast(splat(builder.load(builder.gep(a_ptrs[m], [p])), vi), vb)
                    new.append([builder.call(op, [acc[m][q], x, wb[q]]) for q in range(nt)])
            p_next = builder.add(p, one64)
            p.add_incoming(p_next, body)
            for m in range(rows):
                for q in range(nt):
                    acc[m][q].add_incoming(new[m][q], body)
            builder.cbranch(builder.icmp_signed("<", p_next, pairs), body, store)

            builder.position_at_end(store)
            final = [[builder.phi(vf) for _ in range(nt)] for _ in range(rows)]
            for m in range(rows):
                for q in range(nt):
                    final[m][q].add_incoming(start, init)
                    final[m][q].add_incoming(new[m][q], body)
            col = builder.mul(g, ir.Constant(i64, GROUP_COLS))
            for m in range(rows):
                for q in range(nt):
                    dst = builder.gep(c_ptrs[m], [builder.add(col, ir.Constant(i64, 16 * q))])
                    builder.store(final[m][q], builder.bitcast(dst, vf.as_pointer()), align=4)
            g.add_incoming(builder.add(g, ir.Constant(i64, span)), store)
            builder.branch(head)
            builder.position_at_end(after)
            return context.get_dummy_value()

        return types.none(*args), codegen

    names = [f"c{m}" for m in range(rows)] + [f"a{m}" for m in range(rows)] + ["w", "k", "n_groups"]
    namespace = {"typer": typer}
    name = f"pair_gemm_{rows}_{mode}_{span}"
    exec(f"def {name}(typingctx, {', '.join(names)}):\n    return typer(({', '.join(names)},))\n", namespace)
    return intrinsic(namespace[name])


pairs1, pairs4 = _make_pair_gemm(1, "widen"), _make_pair_gemm(4, "widen")
pairs1_x2, pairs1_x4 = _make_pair_gemm(1, "widen", 2), _make_pair_gemm(1, "widen", 4)
dpbf16_1, dpbf16_4 = _make_pair_gemm(1, "dot"), _make_pair_gemm(4, "dot")



def _make_span_gemm(span, bf16):
    """One row, zero start, all three tiles, the library's packed layout (float32, or bfloat16 widened by
    zero-extension and shift as in gru_fast._tiles), but ``span`` groups per pass over k: 3 * span
    independent fma chains instead of 3 (each column's chain, so its result, is the library kernel's).
    Arguments: c, a, w, K, n_groups (a multiple of span), all int64."""

    def typer(args):
        if len(args) != 5 or not all(isinstance(x, types.Integer) for x in args):
            return None

        def codegen(context, builder, signature, llargs):
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vf, vi = ir.VectorType(f32, TILE), ir.VectorType(i32, TILE)
            wty = ir.VectorType(ir.IntType(16), TILE) if bf16 else vf
            mod = builder.module
            fma = mod.globals.get("llvm.fma.v16f32") or ir.Function(mod, ir.FunctionType(vf, [vf] * 3),
                                                                     "llvm.fma.v16f32")
            c_ptr = builder.inttoptr(llargs[0], f32.as_pointer())
            a_ptr = builder.inttoptr(llargs[1], f32.as_pointer())
            w_ptr = builder.inttoptr(llargs[2], (ir.IntType(16) if bf16 else f32).as_pointer())
            k_n, n_groups = llargs[3], llargs[4]
            zero64, one64 = ir.Constant(i64, 0), ir.Constant(i64, 1)
            lane0 = ir.Constant(vi, [0] * TILE)
            undef = ir.Constant(vf, ir.Undefined)
            group_elems = builder.mul(k_n, ir.Constant(i64, GROUP_COLS))
            slots = [(j, q) for j in range(span) for q in range(3)]

            before = builder.block
            head = builder.append_basic_block("sg.group")
            init = builder.append_basic_block("sg.init")
            body = builder.append_basic_block("sg.k")
            store = builder.append_basic_block("sg.store")
            after = builder.append_basic_block("sg.next")
            builder.branch(head)
            builder.position_at_end(head)
            g = builder.phi(i64)
            g.add_incoming(zero64, before)
            builder.cbranch(builder.icmp_signed("<", g, n_groups), init, after)

            builder.position_at_end(init)
            offsets = [builder.add(builder.mul(builder.add(g, ir.Constant(i64, j)), group_elems),
                                   ir.Constant(i64, 16 * q)) for j, q in slots]
            start = ir.Constant(vf, None)
            builder.cbranch(builder.icmp_signed(">", k_n, zero64), body, store)

            builder.position_at_end(body)
            k = builder.phi(i64)
            k.add_incoming(zero64, init)
            acc = [builder.phi(vf) for _ in slots]
            for x in acc:
                x.add_incoming(start, init)
            k_off = builder.mul(k, ir.Constant(i64, GROUP_COLS))
            ws = [builder.load(builder.bitcast(builder.gep(w_ptr, [builder.add(o, k_off)]), wty.as_pointer()),
                               align=2 if bf16 else 4) for o in offsets]
            if bf16:
                ws = [builder.bitcast(builder.shl(builder.zext(w, vi), ir.Constant(vi, [16] * TILE)), vf) for w in ws]
            x = builder.load(builder.gep(a_ptr, [k]))
            xv = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, lane0)
            new = [builder.call(fma, [xv, w, a]) for w, a in zip(ws, acc)]
            k_next = builder.add(k, one64)
            k.add_incoming(k_next, body)
            for a, n in zip(acc, new):
                a.add_incoming(n, body)
            builder.cbranch(builder.icmp_signed("<", k_next, k_n), body, store)

            builder.position_at_end(store)
            final = [builder.phi(vf) for _ in slots]
            for f, n in zip(final, new):
                f.add_incoming(start, init)
                f.add_incoming(n, body)
            for f, (j, q) in zip(final, slots):
                col = builder.add(builder.mul(builder.add(g, ir.Constant(i64, j)), ir.Constant(i64, GROUP_COLS)),
                                  ir.Constant(i64, 16 * q))
                builder.store(f, builder.bitcast(builder.gep(c_ptr, [col]), vf.as_pointer()), align=4)
            g.add_incoming(builder.add(g, ir.Constant(i64, span)), store)
            builder.branch(head)
            builder.position_at_end(after)
            return context.get_dummy_value()

        return types.none(*args), codegen

    namespace = {"typer": typer}
    name = f"span_gemm_{span}_{'bf16' if bf16 else 'f32'}"
    exec(f"def {name}(typingctx, c, a, w, k, n_groups):\n    return typer((c, a, w, k, n_groups))\n", namespace)
    return intrinsic(namespace[name])


span2_f32, span4_f32 = _make_span_gemm(2, False), _make_span_gemm(4, False)
span2_bf16, span4_bf16 = _make_span_gemm(2, True), _make_span_gemm(4, True)

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



@njit(cache=False)
def _loop_span(span, bf16, c, a, w, k, n_groups, n):
    """One row, ``span`` groups per pass; bf16: 0 float32, 1 bfloat16 (library layout), 2 k pairs."""
    c0, a0 = c[0].ctypes.data, a[0].ctypes.data
    for _ in range(n):
        if bf16 == 2:
            if span == 2:
                pairs1_x2(c0, a0, w.ctypes.data, k, n_groups)
            else:
                pairs1_x4(c0, a0, w.ctypes.data, k, n_groups)
        elif bf16:
            if span == 2:
                span2_bf16(c0, a0, w.ctypes.data, k, n_groups)
            else:
                span4_bf16(c0, a0, w.ctypes.data, k, n_groups)
        elif span == 2:
            span2_f32(c0, a0, w.ctypes.data, k, n_groups)
        else:
            span4_f32(c0, a0, w.ctypes.data, k, n_groups)

# each variant its own compiled loop: a CPU without avx512_bf16 never compiles the dpbf16 one
LOOPS = {"float32": _loop_float32, "bf16": _loop_bf16, "pairs": _loop_pairs, "dpbf16": _loop_dpbf16}


class _GemmRunner(Runner):
    engine = "gemm"

    def __init__(self, variant, rows, a, w, k, n_groups, inner):
        super().__init__()
        c = np.zeros((4, GROUP_COLS * n_groups), np.float32)
        if " x" in variant:  # "float32 x2": one row, 2 groups per pass
            dtype, span = variant.split(" x")
            self.loop = _loop_span
            self.args = (int(span), {"float32": 0, "bf16": 1, "pairs": 2}[dtype], c, a, w, k, n_groups)
        else:
            self.loop = LOOPS[variant]
            self.args = (rows, c, a, np.zeros((4, k // 2), np.uint32), w, k, n_groups)
        self.c = c
        self.inner = inner

    def call(self):
        self.loop(*self.args, self.inner)

    def outputs(self):
        return self.c


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


def run(hiddens=(256, 384, 512), rounds=100, batch_ms=2.0, experimental=True):
    have_bf16 = "avx512_bf16" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
    variants = ["float32", "bf16"]
    if experimental:
        variants += ["pairs"] + (["dpbf16"] if have_bf16 else [])
        variants += [f"{dtype} x{span}" for span in SPANS for dtype in ("float32", "bf16", "pairs")]
    rows_out = []
    errors = {}
    same_bits = {}
    for hidden in hiddens:
        if hidden % 16:
            raise ValueError(f"hidden sizes must be multiples of 16, got {hidden}")
        k, n_groups = hidden, hidden // 16
        m, a, w = _weights(hidden)
        w["pairs"] = w["dpbf16"] = pack_pairs(m, hidden)
        for span in SPANS:
            w[f"float32 x{span}"], w[f"bf16 x{span}"], w[f"pairs x{span}"] = w["float32"], w["bf16"], w["pairs"]
        outputs = {}
        for rows in (1, 4):
            names = [n for n in variants if rows == 1 or " x" not in n]
            macs = rows * k * GROUP_COLS * n_groups
            inner = max(1, int(0.5e-3 * 25e9 / macs))  # about 0.5 ms at 25 GMAC/s
            runners = {name: _GemmRunner(name, rows, a, w[name], k, n_groups, inner) for name in names}
            timings = time_interleaved(runners, rounds=rounds, batch_seconds=batch_ms / 1e3, min_rounds=5)
            for name in names:
                tm = timings[name]
                per_kernel_s = tm.median_us * 1e-6 / inner
                rows_out.append({"hidden": hidden, "rows": rows, "variant": name,
                                 "weight_kib": w[name].nbytes / 1024, "gmac_s": macs / per_kernel_s / 1e9,
                                 "q1_gmac_s": macs / (tm.q3_us * 1e-6 / inner) / 1e9,
                                 "q3_gmac_s": macs / (tm.q1_us * 1e-6 / inner) / 1e9,
                                 "best_gmac_s": macs / (tm.min_us * 1e-6 / inner) / 1e9,
                                 "us_per_kernel": per_kernel_s * 1e6, "rounds": tm.rounds, "busy": tm.busy})
                if rows == 4:
                    outputs[name] = runners[name].outputs().copy()
                # the widening kernels run the library kernels' fma chains: they must give their bits
                base = "float32" if name.startswith("float32") else "bf16"
                if name not in ("float32", "bf16", "dpbf16"):
                    same = np.array_equal(runners[name].outputs()[:rows], runners[base].outputs()[:rows])
                    same_bits[f"H={hidden} rows={rows} {name}"] = bool(same)
        errors[hidden] = _errors(m, a, hidden, outputs)
    return {"machine": machine_info(), "results": rows_out, "errors": errors, "same_bits_as_library": same_bits}


def markdown(report) -> str:
    lines = ["| H | rows | variant | weights KiB | GMAC/s median | IQR | best | us/call (median) | rounds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        busy = " (busy)" if r["busy"] else ""
        lines.append(f"| {r['hidden']} | {r['rows']} | {r['variant']} | {r['weight_kib']:.0f} | {r['gmac_s']:.1f} | "
                     f"{r['q1_gmac_s']:.1f}-{r['q3_gmac_s']:.1f} | {r['best_gmac_s']:.1f} | {r['us_per_kernel']:.2f} | "
                     f"{r['rounds']}{busy} |")
    lines += ["", "| H | variant | max abs error | max error / sum_k abs(a_k w_k) |", "|---|---|---|---|"]
    for hidden, errs in report["errors"].items():
        for name, e in errs.items():
            lines.append(f"| {hidden} | {name} | {e['max_abs']:.3g} | {e['max_rel_to_scale']:.3g} |")
    if report["same_bits_as_library"]:
        lines += ["", "same bits as the library kernel (recur*_all or recur*_all_bf16): " +
                  ", ".join(f"{k}: {v}" for k, v in report["same_bits_as_library"].items())]
    info = report["machine"]
    lines += ["", f"CPU: {info['cpu_model']}; load average {info['load_average']}"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 384, 512])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--batch-ms", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-experimental", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.hidden, args.rounds, args.batch_ms, not args.no_experimental)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
