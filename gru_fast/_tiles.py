"""The matrix-product micro-kernels, written in LLVM IR: accumulators that stay in registers.

The GRU's products are ``c = s + a @ W`` with ``a`` one to eight rows (a batch's hidden states or
inputs), ``W`` (K, N) weights and ``s`` zero or a bias row.  Written as Numba loops, the best form
streams a block of weight rows over the output and stores the output back after every block: at B=1
that costs about a third of the time, and every block of every slice of columns pays a loop set-up
(runtime alias checks and prologues), which made a thread's share of a split step as slow as the
whole step.  Numba has no vector types, so these kernels are generated as LLVM IR through
``numba.extending.intrinsic``:

* the output columns are processed in *groups* of 48 (three 16-column *tiles*: the z, r and n gates
  of 16 hidden units, see gru_fast.kernels), with one ``<16 x float>`` accumulator per tile and row:
  12 registers for four rows, 24 for eight, started at zero or at the bias;
* the weights are packed once (:func:`gru_fast.model._pack_into`) group by group, each group's K
  rows of 48 values contiguous, so a pass over k reads one stream (three streams per group ran slower);
* every output element is ``s + a[0]*w[0] + a[1]*w[1] + ...`` as a chain of fused multiply-adds in k
  order, the same whether it is computed with 1, 2, 3, 4, 6 or 8 rows, by whichever thread, for
  whichever range of groups: serial and parallel runs agree bit for bit;
* every line of the rows ``a`` is prefetched before the first pass (:func:`_prefetch_rows`): in a split
  step half of ``h`` was just written by the other core, and a streaming step's input by the caller's
  thread, and the pass would otherwise wait for those lines one by one.  Measured here with two
  threads, medians of ten alternating runs: B=1 T=1000 H=128 -5.7 %, B=1 T=100 H=256 -4 %, B=3 T=200
  H=256 -7.4 %, the streaming step I=H=256 -3.4 %.

On one core here (about 2.9 GHz: 93 GMAC/s of fmas at most), K=256 and 16 groups (768 KiB of weights,
in the L2 cache), medians of interleaved rounds: one row 31.5 GMAC/s and two 57 (the rate the L2 cache
delivers weights: one 64-byte load per fma, or per two), three 76, four 86, six 87 and eight 86 (the
fmas' rate); the same at K=192-384 and with half the groups.  Three, six and eight rows are float32
and bfloat16 only.
``<16 x double>`` is the same code for float64 (LLVM splits it into two registers), and machines
without AVX-512 get it split into narrower vectors.

The ``*_bf16`` kernels (``_make_gemm(..., weights="bf16")``) read bfloat16 weights in *k pairs*
(:func:`gru_fast._bf16.pack_bf16`): per group, ceil(K/2) rows of 48 32-bit words, word j of row p
holding W[2p, j] in its low half and W[2p + 1, j] in its high half.  Shifting a word left 16 bits gives
its low half as a float32, clearing its low half (``and 0xFFFF0000``) its high half: one integer
operation per 16 weights (widening uint16 loads takes two, one of them on the shuffle port), fed to the
same fma chains in k order, so their results are the float32 kernels' on the widened weights, bit for
bit.  A pair is two dependent fmas per accumulator, so one row computes :data:`SPAN_BF16` (4) groups per
pass: 12 independent chains.  scripts/bf16_gemm.py measures them on one core (medians of interleaved
rounds, the range over four runs on a shared machine): one row 32-34 GMAC/s against float32's 24-25 at
H=256 (best rounds 44 against 31), 26-34 against 13-16 at H=384, 24-27 against 6 at H=512 (3 MiB of
float32 weights, past L2); four rows 51-53 against 53-58 at H=256 (compute-bound there, and the integer
operations take vector-port slots the fmas would use), 49-52 against 32-39 at H=384, 38-42 against
21-24 at H=512; eight rows (medians, one run) 71 against four rows' 65 and float32's 80 at H=256, 72
against 67 and 71 at H=384.  With two groups per pass one row ran 2-3 GMAC/s slower than with four,
with one group about 6 slower.  AVX512_BF16's ``vdpbf16ps`` (a pair of multiply-adds per lane, the
rows rounded to bfloat16 too) is not used: here it issues about once every two cycles, so four rows ran
37-42 GMAC/s against widening's 48-70, and one row, bound by L2 either way, 28-39 against 28-36
(scripts/bf16_dot.py).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["TILE", "GROUP", "SPAN_BF16"] + [f"{name}{rows}{kind}{weights}" for name, kind in
                                            (("project", ""), ("recur", "_all"), ("recur", "_zr"), ("recur", "_n"))
                                            for rows in (1, 2, 3, 4, 6, 8) for weights in ("", "_bf16")]

TILE = 16  # columns per tile
GROUP = 3  # tiles per group: one tile of each gate


def _float_ir(marker):
    return ir.FloatType() if marker.bitwidth == 32 else ir.DoubleType()


def _splat(builder, value, vty):
    """``value``, a scalar of ``vty``'s element type, in every lane of a ``vty`` vector."""
    undef = ir.Constant(vty, ir.Undefined)
    lane0 = ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count)
    return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0)), undef, lane0)


def _group_starts(builder, g, slots, group_stride, start, bias_ptr, rows, vty):
    """The set-up of a pass over k for the (group offset j, tile i) ``slots`` of the groups from ``g``:
    each slot's first output column (48 per group), the offset of its weights (``group_stride`` values
    or words per group), and per row the accumulators' start: the bias row's columns for ``start ==
    "bias"``, else zeros."""
    i64 = ir.IntType(64)
    cols, w_offsets = [], []
    for j, i in slots:
        gj = builder.add(g, ir.Constant(i64, j))
        cols.append(builder.add(builder.mul(gj, ir.Constant(i64, GROUP * TILE)), ir.Constant(i64, i * TILE)))
        w_offsets.append(builder.add(builder.mul(gj, group_stride), ir.Constant(i64, i * TILE)))
    if start == "bias":
        biases = [builder.load(builder.bitcast(builder.gep(bias_ptr, [col]), vty.as_pointer()), align=4)
                  for col in cols]
        return cols, w_offsets, [biases for _ in range(rows)]
    return cols, w_offsets, [[ir.Constant(vty, None) for _ in slots] for _ in range(rows)]


def _prefetch_rows(builder, a_ptrs, k_n, per_line):
    """Ask for every cache line of the rows ``a_ptrs`` (K values each, ``per_line`` to a 64-byte line) at
    once, before the first pass: a pass reads a row's values one k after another into its fma chains,
    so a line another core has just written (the other half of a split step's hidden state, a streaming
    step's input) would stall the pass once per line, one after another."""
    i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
    name = "llvm.prefetch.p0i8"
    prefetch = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name)
    zero, line = ir.Constant(i64, 0), ir.Constant(i64, per_line)
    with cgutils.for_range_slice(builder, zero, k_n, line, intp=i64) as (k, _):
        for ptr in a_ptrs:  # read, keep in all cache levels, data
            builder.call(prefetch, [builder.bitcast(builder.gep(ptr, [k]), i8p), ir.Constant(i32, 0),
                                    ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _pairs_codegen(rows, tiles, start, span):
    """The code of a bf16 kernel of :func:`_make_gemm` (its arguments, weights in k pairs): passes of
    ``span`` (a power of two) groups while that many are left, then of span/2, ..., 1 group."""
    words = GROUP * TILE  # 32-bit words per pair row of a group

    def codegen(context, builder, signature, llargs):
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vty, wty = ir.VectorType(f32, TILE), ir.VectorType(i32, TILE)
        name = f"llvm.fma.v{TILE}f32"
        fma = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vty, [vty] * 3), name)
        c_ptrs = [builder.inttoptr(a, f32.as_pointer()) for a in llargs[:rows]]
        a_ptrs = [builder.inttoptr(a, f32.as_pointer()) for a in llargs[rows : 2 * rows]]
        w_ptr = builder.inttoptr(llargs[2 * rows], i32.as_pointer())
        bias_ptr = builder.inttoptr(llargs[2 * rows + 1], f32.as_pointer())
        k_n, n_groups = llargs[2 * rows + 2], llargs[2 * rows + 3]
        _prefetch_rows(builder, a_ptrs, k_n, 16)

        def const(v):
            return ir.Constant(i64, v)

        full = builder.ashr(k_n, const(1))  # pairs with both rows: k = 2p, 2p + 1 < K
        odd = builder.icmp_signed("!=", builder.and_(k_n, const(1)), const(0))  # one row 2 * full left
        group_words = builder.mul(builder.add(full, builder.and_(k_n, const(1))), const(words))
        last_k = builder.sub(k_n, const(1))
        shift = ir.Constant(wty, [16] * TILE)
        high = ir.Constant(wty, [-65536] * TILE)  # 0xFFFF0000: the word's high half

        def splat(ptr, k):
            return _splat(builder, builder.load(builder.gep(ptr, [k])), vty)

        def load_words(offsets, pair):
            at = builder.mul(pair, const(words))
            return [builder.load(builder.bitcast(builder.gep(w_ptr, [builder.add(o, at)]), wty.as_pointer()),
                                 align=4) for o in offsets]

        def vptr(base, offset):
            return builder.bitcast(builder.gep(base, [offset]), vty.as_pointer())

        def groups_pass(n_span, g_start, came_from):
            """for g in range(g_start, n_groups - n_span + 1, n_span): groups g .. g + n_span - 1 in one pass
            over k.  Returns the first group it left (its loop variable, valid in the block it ends in)."""
            head = builder.append_basic_block(f"pairs{n_span}.group")
            init = builder.append_basic_block(f"pairs{n_span}.init")
            body = builder.append_basic_block(f"pairs{n_span}.k")
            mid = builder.append_basic_block(f"pairs{n_span}.pairs_done")
            tail = builder.append_basic_block(f"pairs{n_span}.odd")
            store = builder.append_basic_block(f"pairs{n_span}.store")
            after = builder.append_basic_block(f"pairs{n_span}.next")
            builder.branch(head)

            builder.position_at_end(head)
            g = builder.phi(i64)
            g.add_incoming(g_start, came_from)
            builder.cbranch(builder.icmp_signed("<=", builder.add(g, const(n_span)), n_groups), init, after)

            # accumulators start from zero or the bias
            builder.position_at_end(init)
            slots = [(j, i) for j in range(n_span) for i in tiles]
            cols, w_offsets, first = _group_starts(builder, g, slots, group_words, start, bias_ptr, rows, vty)
            builder.cbranch(builder.icmp_signed(">", full, const(0)), body, mid)

            # for p in range(K // 2): acc = fma(a[2p + 1], W[2p + 1], fma(a[2p], W[2p], acc))
            builder.position_at_end(body)
            p = builder.phi(i64)
            p.add_incoming(const(0), init)
            acc = [[builder.phi(vty) for _ in slots] for _ in range(rows)]
            for m in range(rows):
                for q in range(len(slots)):
                    acc[m][q].add_incoming(first[m][q], init)
            pair = load_words(w_offsets, p)
            even = [builder.bitcast(builder.shl(w, shift), vty) for w in pair]  # row 2p
            odd_row = [builder.bitcast(builder.and_(w, high), vty) for w in pair]  # row 2p + 1
            k0 = builder.shl(p, const(1))
            k1 = builder.add(k0, const(1))
            new = []
            for m in range(rows):
                x0, x1 = splat(a_ptrs[m], k0), splat(a_ptrs[m], k1)
                new.append([builder.call(fma, [x1, odd_row[q], builder.call(fma, [x0, even[q], acc[m][q]])])
                            for q in range(len(slots))])
            p_next = builder.add(p, const(1))
            p.add_incoming(p_next, body)
            for m in range(rows):
                for q in range(len(slots)):
                    acc[m][q].add_incoming(new[m][q], body)
            builder.cbranch(builder.icmp_signed("<", p_next, full), body, mid)

            builder.position_at_end(mid)
            done = [[builder.phi(vty) for _ in slots] for _ in range(rows)]
            for m in range(rows):
                for q in range(len(slots)):
                    done[m][q].add_incoming(first[m][q], init)  # K < 2
                    done[m][q].add_incoming(new[m][q], body)
            builder.cbranch(odd, tail, store)

            # odd K: row K - 1 is the low half of pair row K // 2
            builder.position_at_end(tail)
            last = [builder.bitcast(builder.shl(w, shift), vty) for w in load_words(w_offsets, full)]
            ends = []
            for m in range(rows):
                x = splat(a_ptrs[m], last_k)
                ends.append([builder.call(fma, [x, last[q], done[m][q]]) for q in range(len(slots))])
            builder.branch(store)

            builder.position_at_end(store)
            final = [[builder.phi(vty) for _ in slots] for _ in range(rows)]
            for m in range(rows):
                for q in range(len(slots)):
                    final[m][q].add_incoming(done[m][q], mid)
                    final[m][q].add_incoming(ends[m][q], tail)
            for m in range(rows):
                for q, col in enumerate(cols):
                    builder.store(final[m][q], vptr(c_ptrs[m], col), align=4)
            g.add_incoming(builder.add(g, const(n_span)), store)
            builder.branch(head)

            builder.position_at_end(after)
            return g

        g = const(0)
        n_span = span
        while n_span >= 1:  # span groups at a time, then what is left: half as many, ..., one
            g = groups_pass(n_span, g, builder.block)
            n_span //= 2
        return context.get_dummy_value()

    return codegen


def _make_gemm(rows, first, ntiles, start, weights="float", span=1):
    """A kernel computing, for groups g < n_groups and tiles i of [first, first + ntiles) in each group,
    ``c_m[48g + 16i : 48g + 16i + 16] = s + a_m @ W[:, 48g + 16i : ...]`` for ``rows`` rows m, where s
    is 0 (``start="zero"``) or the same columns of a bias row (``start="bias"``): starting the
    accumulators there saves a pass that fills c before the product.

    Arguments (all int64 addresses or counts, then a float marker giving the dtype): c_0..c_{rows-1}
    (output rows, positioned at the first group's column 0), a_0..a_{rows-1} (input rows of K values),
    w (packed weights, positioned at the first group's first tile), bias (positioned like c; unused
    with "zero"), K, n_groups, marker.  Columns of other tiles are left as they are.

    ``weights="bf16"``: w points at bfloat16 weights in k pairs (:func:`gru_fast._bf16.pack_bf16`):
    per group, ceil(K/2) rows of 48 32-bit words, word j of pair row p holding the bfloat16 bit patterns
    of W[2p, j] (low half) and W[2p + 1, j] (high half; zero past an odd K).  Everything else is
    float32 (the marker must be float32).  Shifting a word left 16 bits gives W[2p, j] as a float32,
    clearing its low half W[2p + 1, j]: one integer operation per 16 weights, fed to the same fma chain
    in k order (2p, then 2p + 1; an odd K's last row alone, a[K] is never read), so the result equals
    the float32 kernel's on the widened weights.  ``span`` (a power of two) groups are computed per pass
    over k, their accumulators independent chains (left-over groups: span/2, ..., 1 at a time); the bits
    do not depend on it.
    """
    bf16 = weights == "bf16"
    if weights not in ("float", "bf16"):
        raise ValueError(f"weights must be 'float' or 'bf16', got {weights!r}")
    if span != 1 and not bf16:
        raise ValueError("span is for the bf16 kernels")
    if span < 1 or span & (span - 1):
        raise ValueError(f"span must be a power of two, got {span}")

    def typer(args):
        if len(args) != 2 * rows + 5 or not isinstance(args[-1], types.Float):
            return None
        if not all(isinstance(a, types.Integer) for a in args[:-1]):
            return None
        marker = args[-1]
        if bf16 and marker.bitwidth != 32:
            return None
        sig = types.none(*args)
        if bf16:
            return sig, _pairs_codegen(rows, range(first, first + ntiles), start, span)

        def codegen(context, builder, signature, llargs):
            fty = _float_ir(marker)
            vty = ir.VectorType(fty, TILE)
            i64 = ir.IntType(64)
            name = f"llvm.fma.v{TILE}f{marker.bitwidth}"
            fma = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                                                  name)
            c_ptrs = [builder.inttoptr(a, fty.as_pointer()) for a in llargs[:rows]]
            a_ptrs = [builder.inttoptr(a, fty.as_pointer()) for a in llargs[rows : 2 * rows]]
            w_ptr = builder.inttoptr(llargs[2 * rows], fty.as_pointer())
            bias_ptr = builder.inttoptr(llargs[2 * rows + 1], fty.as_pointer())
            k_n, n_groups = llargs[2 * rows + 2], llargs[2 * rows + 3]
            _prefetch_rows(builder, a_ptrs, k_n, 64 // (marker.bitwidth // 8))
            zero64 = ir.Constant(i64, 0)
            one64 = ir.Constant(i64, 1)
            group_elems = builder.mul(k_n, ir.Constant(i64, GROUP * TILE))  # elements per packed group

            def vptr(base, offset):
                return builder.bitcast(builder.gep(base, [offset]), vty.as_pointer())

            tiles = range(first, first + ntiles)

            # for g in range(n_groups): one pass over k per group
            before = builder.block
            head = builder.append_basic_block("gemm.group")
            load = builder.append_basic_block("gemm.init")
            body = builder.append_basic_block("gemm.k")
            store = builder.append_basic_block("gemm.store")
            after = builder.append_basic_block("gemm.next")
            builder.branch(head)

            builder.position_at_end(head)
            g = builder.phi(i64)
            g.add_incoming(zero64, before)
            builder.cbranch(builder.icmp_signed("<", g, n_groups), load, after)

            # accumulators start from zero or the bias
            builder.position_at_end(load)
            slots = list(tiles)
            cols, w_offsets, init = _group_starts(builder, g, [(0, i) for i in slots], group_elems, start, bias_ptr,
                                                  rows, vty)
            has_k = builder.icmp_signed(">", k_n, zero64)
            loaded = builder.block
            builder.cbranch(has_k, body, store)

            # for k in range(K): acc[m][slot] = fma(a_m[k], W[k, tile of slot], acc[m][slot])
            builder.position_at_end(body)
            k = builder.phi(i64)
            acc = [[builder.phi(vty) for _ in slots] for _ in range(rows)]
            k.add_incoming(zero64, loaded)
            for m in range(rows):
                for q in range(len(slots)):
                    acc[m][q].add_incoming(init[m][q], loaded)
            k_off = builder.mul(k, ir.Constant(i64, GROUP * TILE))
            weights = [builder.load(vptr(w_ptr, builder.add(offset, k_off)), align=4) for offset in w_offsets]
            new = []
            for m in range(rows):
                xv = _splat(builder, builder.load(builder.gep(a_ptrs[m], [k])), vty)
                new.append([builder.call(fma, [xv, weights[q], acc[m][q]]) for q in range(len(slots))])
            k_next = builder.add(k, one64)
            k.add_incoming(k_next, body)
            for m in range(rows):
                for q in range(len(slots)):
                    acc[m][q].add_incoming(new[m][q], body)
            builder.cbranch(builder.icmp_signed("<", k_next, k_n), body, store)

            builder.position_at_end(store)
            final = [[builder.phi(vty) for _ in slots] for _ in range(rows)]  # phis first in a block
            for m in range(rows):
                for q in range(len(slots)):
                    final[m][q].add_incoming(init[m][q], loaded)  # K == 0: just the start values
                    final[m][q].add_incoming(new[m][q], body)
            for m in range(rows):
                for q, col in enumerate(cols):
                    builder.store(final[m][q], vptr(c_ptrs[m], col), align=4)
            g.add_incoming(builder.add(g, one64), store)
            builder.branch(head)

            builder.position_at_end(after)
            return context.get_dummy_value()

        return sig, codegen

    # Numba's intrinsics take fixed parameters (a *args one would arrive packed as a tuple)
    name = f"gemm_{rows}_{first}_{ntiles}_{start}" + (f"_bf16_x{span}" if bf16 else "")
    names = [f"c{m}" for m in range(rows)] + [f"a{m}" for m in range(rows)] + ["w", "bias", "k", "n_groups",
                                                                                 "marker"]
    namespace = {"typer": typer}
    exec(f"def {name}(typingctx, {', '.join(names)}):\n    return typer(({', '.join(names)},))\n", namespace)
    return intrinsic(namespace[name])


# which tiles of each group a product computes: all three gates, z and r only, n only (lbr=0 needs
# (r * h) R_n^T after z and r are known)
GEMM_ALL, GEMM_ZR, GEMM_N = (0, 3), (0, 2), (2, 1)
project1, project2, project4 = (_make_gemm(rows, *GEMM_ALL, "bias") for rows in (1, 2, 4))  # x W^T + b
recur1_all, recur2_all, recur4_all = (_make_gemm(rows, *GEMM_ALL, "zero") for rows in (1, 2, 4))  # h R^T
recur1_zr, recur2_zr, recur4_zr = (_make_gemm(rows, *GEMM_ZR, "zero") for rows in (1, 2, 4))  # lbr=0: h R_zr^T
recur1_n, recur2_n, recur4_n = (_make_gemm(rows, *GEMM_N, "zero") for rows in (1, 2, 4))  # lbr=0: (r*h) R_n^T
# three, six and eight rows, for float32 (float64's eight would take 48 registers): each weight loaded
# once per pass, so three rows need no fourth, repeated row, and five to eight no eight-row pass over
# repeated rows (see gru_fast.kernels._rows_per_pass)
project3, recur3_all, recur3_zr, recur3_n, project6, recur6_all, recur6_zr, recur6_n, \
    project8, recur8_all, recur8_zr, recur8_n = (
        _make_gemm(rows, *tiles, start) for rows in (3, 6, 8)
        for tiles, start in ((GEMM_ALL, "bias"), (GEMM_ALL, "zero"), (GEMM_ZR, "zero"), (GEMM_N, "zero")))

# the same products with bfloat16 weights (k pairs) and float32 everything else; one row computes
# SPAN_BF16 groups per pass, two rows half as many: twelve independent fma chains instead of three or six
# (scripts/bf16_gemm.py measures the one-row span)
SPAN_BF16 = 4
project1_bf16 = _make_gemm(1, *GEMM_ALL, "bias", "bf16", SPAN_BF16)
project2_bf16 = _make_gemm(2, *GEMM_ALL, "bias", "bf16", SPAN_BF16 // 2)
project4_bf16 = _make_gemm(4, *GEMM_ALL, "bias", "bf16")
recur1_all_bf16 = _make_gemm(1, *GEMM_ALL, "zero", "bf16", SPAN_BF16)
recur2_all_bf16 = _make_gemm(2, *GEMM_ALL, "zero", "bf16", SPAN_BF16 // 2)
recur4_all_bf16 = _make_gemm(4, *GEMM_ALL, "zero", "bf16")
recur1_zr_bf16 = _make_gemm(1, *GEMM_ZR, "zero", "bf16", SPAN_BF16)
recur2_zr_bf16 = _make_gemm(2, *GEMM_ZR, "zero", "bf16", SPAN_BF16 // 2)
recur4_zr_bf16 = _make_gemm(4, *GEMM_ZR, "zero", "bf16")
recur1_n_bf16 = _make_gemm(1, *GEMM_N, "zero", "bf16", SPAN_BF16)
recur2_n_bf16 = _make_gemm(2, *GEMM_N, "zero", "bf16", SPAN_BF16 // 2)
recur4_n_bf16 = _make_gemm(4, *GEMM_N, "zero", "bf16")
# three, six and eight rows, as float32's: each pair row of weights loaded and widened once per pass
project3_bf16, recur3_all_bf16, recur3_zr_bf16, recur3_n_bf16, project6_bf16, recur6_all_bf16, recur6_zr_bf16, \
    recur6_n_bf16, project8_bf16, recur8_all_bf16, recur8_zr_bf16, recur8_n_bf16 = (
        _make_gemm(rows, *tiles, start, "bf16") for rows in (3, 6, 8)
        for tiles, start in ((GEMM_ALL, "bias"), (GEMM_ALL, "zero"), (GEMM_ZR, "zero"), (GEMM_N, "zero")))
