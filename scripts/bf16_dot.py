"""Measures AVX512_BF16's ``vdpbf16ps`` as the bfloat16 product, against what gru_fast uses: widening the
bfloat16 weights on load (one integer operation per 16 weights) into float32 fmas.

    python scripts/bf16_dot.py [--hidden 256 512] [--rounds 30]

The dot kernels here take the same arguments and packed weights as :mod:`gru_fast._tiles`' ``*_bf16``
kernels (k pairs, 48 words per pair row and group), round the rows ``a`` to bfloat16 as well
(``vcvtne2ps2bf16``, 32 values at a time) and do each pair of multiply-adds with one ``vdpbf16ps``.
They are checked against NumPy (float64 sums of the bfloat16-rounded operands) for odd and even K,
then timed on one core, the recurrent product ``h @ R^T`` with K = H, 1 and 4 rows, against the
library's widening kernels and its float32 kernels.  Best of ``rounds`` batches.

Measured on this project's Intel Xeon (model 207, AVX512_BF16, 2 vCPUs), H=256: 4 rows dot 38-42 GMAC/s
against widening 50-70 and float32 49-88 (``vdpbf16ps`` issues at about one every two cycles here); one
row 30-39 against 32-36 (both bound by the L2 cache's delivery of weights).  H=512: 4 rows 36 against 47,
one row 35 against 38.  So gru_fast widens, on every CPU: the dot instruction saves nothing where the
weights stream from L2 and costs a third where the fmas are the limit, and it would also round the
activations (the hidden state, the inputs) to bfloat16.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gru_fast

import numpy as np  # noqa: E402
from llvmlite import binding, ir  # noqa: E402
from numba import njit, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from gru_fast import _tiles as t  # noqa: E402
from gru_fast._bf16 import from_bf16, pack_bf16, to_bf16  # noqa: E402
from gru_fast._layout import pack_into  # noqa: E402
from gru_fast._tiles import GROUP, TILE, _group_starts, _splat  # noqa: E402


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite's IR builder has no such type): the element of the bf16 intrinsics'
    vectors."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash(_BFloat)


def _declare(builder, name, ret, args):
    """The module's declaration of function ``name``, added on first use."""
    return builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ret, args), name)


CHUNK = 32  # k values (16 pairs) converted to bfloat16 at a time by the dot kernels


def _dot_codegen(rows, tiles, start, span):
    """The code of a kernel with :func:`gru_fast._tiles._make_gemm`'s arguments for ``weights="bf16"``
    (the weights in k pairs), the rows ``a`` rounded to bfloat16 too, and every pair of multiply-adds one ``vdpbf16ps``
    (AVX512_BF16): per output lane ``acc += W[2p+1]*a[2p+1]`` then ``+= W[2p]*a[2p]``, products exact,
    each sum rounded to nearest even, denormals flushed to zero.  The rows are rounded (``vcvtne2ps2bf16``,
    nearest even) CHUNK values at a time into a 16-word slot per row (zeros past K, which pair with the
    zero high half of an odd K's last weight pair); every pair's word is broadcast from there."""
    words = GROUP * TILE  # 32-bit words per pair row of a group

    def codegen(context, builder, signature, llargs):
        from numba.core import cgutils

        f32, i32, i64, i8 = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.IntType(8)
        vty, wty, bty = ir.VectorType(f32, TILE), ir.VectorType(i32, TILE), ir.VectorType(_BFloat(), 2 * TILE)
        dot = _declare(builder, "llvm.x86.avx512bf16.dpbf16ps.512", vty, [vty, bty, bty])
        cvt = _declare(builder, "llvm.x86.avx512bf16.cvtne2ps2bf16.512", bty, [vty, vty])
        c_ptrs = [builder.inttoptr(a, f32.as_pointer()) for a in llargs[:rows]]
        a_ptrs = [builder.inttoptr(a, f32.as_pointer()) for a in llargs[rows : 2 * rows]]
        w_ptr = builder.inttoptr(llargs[2 * rows], i32.as_pointer())
        bias_ptr = builder.inttoptr(llargs[2 * rows + 1], f32.as_pointer())
        k_n, n_groups = llargs[2 * rows + 2], llargs[2 * rows + 3]
        slots_mem = [cgutils.alloca_once(builder, ir.ArrayType(i32, TILE)) for _ in range(rows)]
        tail_mem = cgutils.alloca_once(builder, ir.ArrayType(f32, CHUNK))
        for mem in slots_mem + [tail_mem]:
            mem.align = 64

        def const(v):
            return ir.Constant(i64, v)

        pairs_n = builder.ashr(builder.add(k_n, const(1)), const(1))  # pair rows: ceil(K / 2)
        chunks_n = builder.ashr(builder.add(k_n, const(CHUNK - 1)), const(5))
        group_words = builder.mul(pairs_n, const(words))

        def vptr(base, offset, ty=vty):
            return builder.bitcast(builder.gep(base, [offset]), ty.as_pointer())

        def rounded_chunk(m, c):
            """Row m's k values [32c, 32c + 32) (zeros past K) as 16 words of two bfloat16 each, in the slot."""
            at = builder.mul(c, const(CHUNK))
            left = builder.sub(k_n, at)
            whole = builder.append_basic_block(f"dot.row{m}.whole")
            part = builder.append_basic_block(f"dot.row{m}.part")
            done = builder.append_basic_block(f"dot.row{m}.rounded")
            builder.cbranch(builder.icmp_signed(">=", left, const(CHUNK)), whole, part)
            builder.position_at_end(whole)
            lo_w = builder.load(vptr(a_ptrs[m], at), align=4)
            hi_w = builder.load(vptr(a_ptrs[m], builder.add(at, const(TILE))), align=4)
            builder.branch(done)
            builder.position_at_end(part)  # the last chunk: copy what is left into zeros (never read past K)
            tail = builder.bitcast(tail_mem, i8.as_pointer())
            builder.call(_declare(builder, "llvm.memset.p0.i64", ir.VoidType(),
                                  [i8.as_pointer(), i8, i64, ir.IntType(1)]),
                         [tail, ir.Constant(i8, 0), const(4 * CHUNK), ir.Constant(ir.IntType(1), 0)])
            builder.call(_declare(builder, "llvm.memcpy.p0.p0.i64", ir.VoidType(),
                                  [i8.as_pointer(), i8.as_pointer(), i64, ir.IntType(1)]),
                         [tail, builder.bitcast(builder.gep(a_ptrs[m], [at]), i8.as_pointer()),
                          builder.mul(left, const(4)), ir.Constant(ir.IntType(1), 0)])
            tail_f = builder.bitcast(tail_mem, f32.as_pointer())
            lo_p = builder.load(vptr(tail_f, const(0)), align=64)
            hi_p = builder.load(vptr(tail_f, const(TILE)), align=64)
            builder.branch(done)
            builder.position_at_end(done)
            lo, hi = builder.phi(vty), builder.phi(vty)
            lo.add_incoming(lo_w, whole)
            lo.add_incoming(lo_p, part)
            hi.add_incoming(hi_w, whole)
            hi.add_incoming(hi_p, part)
            # result element i: a[32c + i]; word p holds elements 2p (low half) and 2p + 1 (high half)
            builder.store(builder.bitcast(builder.call(cvt, [hi, lo]), wty), builder.bitcast(slots_mem[m], wty.as_pointer()),
                          align=64)

        def broadcast(m, q):
            word = builder.load(builder.gep(builder.bitcast(slots_mem[m], i32.as_pointer()), [q]))
            return builder.bitcast(_splat(builder, word, wty), bty)

        def groups_pass(n_span, g_start, came_from):
            head = builder.append_basic_block(f"dot{n_span}.group")
            init = builder.append_basic_block(f"dot{n_span}.init")
            chunk_head = builder.append_basic_block(f"dot{n_span}.chunk")
            chunk_body = builder.append_basic_block(f"dot{n_span}.round")
            pair_loop = builder.append_basic_block(f"dot{n_span}.pair")
            chunk_end = builder.append_basic_block(f"dot{n_span}.chunk_done")
            store = builder.append_basic_block(f"dot{n_span}.store")
            after = builder.append_basic_block(f"dot{n_span}.next")
            builder.branch(head)

            builder.position_at_end(head)
            g = builder.phi(i64)
            g.add_incoming(g_start, came_from)
            builder.cbranch(builder.icmp_signed("<=", builder.add(g, const(n_span)), n_groups), init, after)

            builder.position_at_end(init)
            slots = [(j, i) for j in range(n_span) for i in tiles]
            cols, w_offsets, first = _group_starts(builder, g, slots, group_words, start, bias_ptr, rows, vty)
            builder.branch(chunk_head)

            # for c in range(ceil(K / 32)): round the rows' chunk, then its pairs
            builder.position_at_end(chunk_head)
            c = builder.phi(i64)
            c.add_incoming(const(0), init)
            acc = [[builder.phi(vty) for _ in slots] for _ in range(rows)]
            for m in range(rows):
                for q in range(len(slots)):
                    acc[m][q].add_incoming(first[m][q], init)
            builder.cbranch(builder.icmp_signed("<", c, chunks_n), chunk_body, store)

            builder.position_at_end(chunk_body)
            for m in range(rows):
                rounded_chunk(m, c)
            p0 = builder.mul(c, const(TILE))
            in_chunk = builder.sub(pairs_n, p0)
            in_chunk = builder.select(builder.icmp_signed("<", in_chunk, const(TILE)), in_chunk, const(TILE))
            rounded = builder.block
            builder.branch(pair_loop)

            # for q in range(pairs of this chunk): acc = vdpbf16ps(acc, W pair row p0 + q, a pair q)
            builder.position_at_end(pair_loop)
            q = builder.phi(i64)
            q.add_incoming(const(0), rounded)
            inner = [[builder.phi(vty) for _ in slots] for _ in range(rows)]
            for m in range(rows):
                for s_ in range(len(slots)):
                    inner[m][s_].add_incoming(acc[m][s_], rounded)
            at = builder.mul(builder.add(p0, q), const(words))
            w = [builder.bitcast(builder.load(vptr(w_ptr, builder.add(o, at), wty), align=4), bty) for o in w_offsets]
            new = []
            for m in range(rows):
                x = broadcast(m, q)
                new.append([builder.call(dot, [inner[m][s_], w[s_], x]) for s_ in range(len(slots))])
            q_next = builder.add(q, const(1))
            q.add_incoming(q_next, pair_loop)
            for m in range(rows):
                for s_ in range(len(slots)):
                    inner[m][s_].add_incoming(new[m][s_], pair_loop)
            builder.cbranch(builder.icmp_signed("<", q_next, in_chunk), pair_loop, chunk_end)

            builder.position_at_end(chunk_end)
            c.add_incoming(builder.add(c, const(1)), chunk_end)
            for m in range(rows):
                for s_ in range(len(slots)):
                    acc[m][s_].add_incoming(new[m][s_], chunk_end)
            builder.branch(chunk_head)

            builder.position_at_end(store)
            for m in range(rows):
                for s_, col in enumerate(cols):
                    builder.store(acc[m][s_], vptr(c_ptrs[m], col), align=4)
            g.add_incoming(builder.add(g, const(n_span)), store)
            builder.branch(head)

            builder.position_at_end(after)
            return g

        g = const(0)
        n_span = span
        while n_span >= 1:
            g = groups_pass(n_span, g, builder.block)
            n_span //= 2
        return context.get_dummy_value()

    return codegen




def _make_dot(rows, start, span):
    """A dot kernel over all three tiles of each group: c_m = s + a_m @ W for ``rows`` rows."""

    def typer(args):
        return types.none(*args), _dot_codegen(rows, range(GROUP), start, span)

    names = [f"c{m}" for m in range(rows)] + [f"a{m}" for m in range(rows)] + ["w", "bias", "k", "n_groups", "marker"]
    namespace = {"typer": typer}
    name = f"dot_{rows}_{start}_x{span}"
    exec(f"def {name}(typingctx, {', '.join(names)}):\n    return typer(({', '.join(names)},))\n", namespace)
    return intrinsic(namespace[name])


dot1, dot4, dot1_bias = _make_dot(1, "zero", t.SPAN_BF16), _make_dot(4, "zero", 1), _make_dot(1, "bias", t.SPAN_BF16)
KERNELS = ("float32 x1", "widen x1", "dot x1", "float32 x4", "widen x4", "dot x4")


@njit
def _run(kind, c, a, w, bias, k, n_groups, n):
    c0, c1, c2, c3 = c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data
    a0, a1, a2, a3 = a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[3].ctypes.data
    m = np.float32(0)
    for _ in range(n):
        if kind == 0:
            t.recur1_all(c0, a0, w.ctypes.data, c0, k, n_groups, m)
        elif kind == 1:
            t.recur1_all_bf16(c0, a0, w.ctypes.data, c0, k, n_groups, m)
        elif kind == 2:
            dot1(c0, a0, w.ctypes.data, c0, k, n_groups, m)
        elif kind == 3:
            t.recur4_all(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, c0, k, n_groups, m)
        elif kind == 4:
            t.recur4_all_bf16(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, c0, k, n_groups, m)
        elif kind == 5:
            dot4(c0, c1, c2, c3, a0, a1, a2, a3, w.ctypes.data, c0, k, n_groups, m)
        else:
            dot1_bias(c0, a0, w.ctypes.data, bias.ctypes.data, k, n_groups, m)


def check(rng) -> None:
    """The dot kernels against NumPy on bfloat16-rounded operands, for odd and even K (float32 sums)."""
    for hidden, k in [(16, 1), (16, 5), (32, 33), (48, 31), (80, 70), (256, 256)]:
        m = rng.uniform(-1, 1, (3 * hidden, k)).astype(np.float32)
        a = rng.uniform(-1, 1, (4, k)).astype(np.float32)
        bias = rng.uniform(-1, 1, 3 * hidden).astype(np.float32)
        groups = hidden // TILE
        # packed column 48u + 16g + l is gate g's unit 16u + l (ONNX's gate-blocked row g * H + 16u + l)
        order = np.array([g * hidden + TILE * u + lane for u in range(groups) for g in range(GROUP)
                          for lane in range(TILE)])
        exact = from_bf16(to_bf16(a)).astype(np.float64) @ from_bf16(to_bf16(m)).T.astype(np.float64)
        for kind, rows in [(2, 1), (5, 4), (6, 1)]:
            c = np.zeros((4, 3 * hidden), np.float32)
            _run(kind, c, a, pack_bf16(m, hidden), bias[order], k, groups, 1)
            expected = exact[:rows, order] + (bias[order] if kind == 6 else 0)
            error = np.abs(c[:rows] - expected).max()
            if error > 1e-6 * k:
                raise AssertionError(f"dot kernel {kind}, H={hidden} K={k}: max error {error:.2e}")
    print("dot kernels agree with NumPy on bfloat16-rounded operands")


def timing(hidden, rounds, rng) -> None:
    k, groups = hidden, hidden // TILE
    m = rng.uniform(-1, 1, (3 * hidden, k)).astype(np.float32)
    w_bf16 = pack_bf16(m, hidden)
    w_f32 = np.zeros(groups * k * GROUP * TILE, np.float32)
    pack_into(w_f32, m, hidden)
    a = rng.uniform(-1, 1, (4, k)).astype(np.float32)
    c = np.zeros((4, 3 * hidden), np.float32)
    print(f"H={hidden}, one core, best of {rounds} batches:")
    for kind, name in enumerate(KERNELS):
        w = w_f32 if name.startswith("float32") else w_bf16
        rows = 4 if name.endswith("x4") else 1
        _run(kind, c, a, w, c[0], k, groups, 10)
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            _run(kind, c, a, w, c[0], k, groups, 200)
            best = min(best, (time.perf_counter() - start) / 200)
        print(f"  {name:10s} {best * 1e6:8.2f} us  {rows * k * 3 * hidden / best / 1e9:6.1f} GMAC/s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    if not binding.get_host_cpu_features().get("avx512bf16"):
        sys.exit("this CPU has no AVX512_BF16: nothing to measure")
    rng = np.random.default_rng(0)
    check(rng)
    for hidden in args.hidden:
        timing(hidden, args.rounds, rng)


if __name__ == "__main__":
    main()
