"""Numba kernels: the GRU recurrence over preallocated buffers.

The cell is the GRU of Cho et al. (2014) as the ONNX GRU operator writes it,
gates ordered (z, r, n)::

    z  = f(x W_z^T + h R_z^T + b_z)                  b_z = Wb_z + Rb_z (pre-summed)
    r  = f(x W_r^T + h R_r^T + b_r)                  b_r = Wb_r + Rb_r (pre-summed)
    n  = g(x W_n^T + Wb_n + r * (h R_n^T + Rb_n))    linear_before_reset = 1 (PyTorch)
    n  = g(x W_n^T + (r * h) R_n^T + Wb_n + Rb_n)    linear_before_reset = 0 (ONNX default)
    h' = (1 - z) * n + z * h

with an optional clip of every pre-activation to [-clip, clip].  The parity
tests (tests/test_parity_torch.py, tests/test_parity_onnx.py) pin these
kernels to PyTorch's nn.GRU and to ONNX Runtime's GRU.

Matrix products
    :func:`gemm4` and :func:`gemm1` compute ``c[j0:j1] += a @ bt[:, j0:j1]``
    for four rows / one row, with weights pre-transposed to ``bt`` (K, N) so
    the inner loop streams contiguous memory and vectorises; blocks of 8
    values of k are summed in a fixed tree.  Both functions apply the same
    operations to every element, so a result does not depend on how rows are
    grouped, which columns a thread owns, or whether a lane is vector or
    scalar: serial and parallel runs agree bit for bit.  Four rows per pass
    reuse each weight load four times (about 45 GMAC/s per core here, on par
    with OpenBLAS; see shared/docs/performance.md), so no BLAS is called and
    no second thread pool competes for the cores.

Input projection
    ``x W^T + b`` is computed ahead of the recurrence in blocks of
    ``block_steps`` time steps (a block's projections stay in cache until the
    recurrence reads them), into the workspace.

Two ways to share a call between threads
    ``MODE_ROWS``: *units* of (direction, slice of batch rows) are independent
    for a whole layer: each worker claims units from an atomic counter and
    runs every time step of its rows.  Layers follow each other: a worker
    waits until every unit of the previous layer is done.
    ``MODE_SPLIT``: one sequence (B smaller than the thread count) has no
    independent rows to hand out, so the hidden units are split into
    ``chunks`` column ranges, and *items* (step, chunk) are claimed through
    compare-and-swap flags.  A worker runs its own chunk of each step after
    the previous step is complete (an atomic counter of finished items).  If
    its partner has not claimed a chunk after a while (descheduled on a busy
    machine, or the threading layer ran the workers one after another), the
    waiting worker takes that chunk itself and runs the rest of the call
    alone (recorded in the SYNC_SOLO counter, which the caller reads to back
    off from parallel calls for a while), so the scheme cannot deadlock,
    never depends on how many threads actually run, and a busy machine costs
    one wait per call, not one per step.  Used for linear_before_reset=1,
    where a step is one product per chunk.

Kernels take raw addresses (see :mod:`gru_fast._memory`) and a scalar
``marker`` whose type selects float32 or float64.  Weights live in one flat
``params`` array described by an int64 ``meta`` table built by
:mod:`gru_fast.model`; the layout constants below are shared with it.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from ._config import JIT, PARALLEL_JIT
from ._math import SIGMOID, TANH, activate, clip_range, like, sigmoid, tanh
from ._memory import atomic_add, atomic_cas, atomic_load, pointer, spin_pause, yield_cpu

# The matrix products may fuse a*b + c into one FMA (``contract``): every output element is the same
# expression in every context, so the fusion is the same too.  The element-wise code keeps strict IEEE
# semantics, so it rounds identically whether LLVM vectorises a loop or not (float64's libm calls make
# the two differ) and NaN/Inf behave as in PyTorch.
GEMM_JIT = dict(JIT, fastmath={"contract"})

# ---- layout of the int64 ``meta`` table ------------------------------------
META_LAYERS = 0
META_DIRECTIONS = 1
META_HIDDEN = 2
META_INPUT = 3
META_LBR = 4
META_REVERSE = 5  # 1 when the single direction runs backwards (ONNX "reverse")
META_CODES = 6  # 4 entries: f, g activation codes of direction 0, then direction 1
META_OFFSETS = 10  # then per (layer, direction): offsets in params of W^T, R^T, b_x, b_hn
OFFSET_W, OFFSET_R, OFFSET_BX, OFFSET_BHN = 0, 1, 2, 3
OFFSETS_PER_BLOCK = 4

# ---- layout of the header of the flat ``params`` array ---------------------
PARAM_CLIP = 0  # 0 means no clip
PARAM_ACT = 1  # 4 entries per direction: f alpha, f beta, g alpha, g beta
PARAM_HEADER = 16  # weights start here (64-byte aligned in float32)

# ---- how a call is shared between threads -----------------------------------
MODE_ROWS = 0
MODE_SPLIT = 1

# ---- workspace ---------------------------------------------------------------
LINE = 8  # int64 counters sit one per 64-byte cache line
# MODE_SPLIT's counter lines: items done; the worker that went on alone; workers that have started
SYNC_DONE, SYNC_SOLO, SYNC_ARRIVED = 0, 1, 2
ALIGN = 16  # float blocks start on 64-byte boundaries (in float32 elements)
SPIN_PAUSES = 1024  # a waiting worker spins with ``pause`` (~40 ns each) this long, then yields its core
STEAL_EVERY = 1024  # then takes over unclaimed chunks of the step it waits for, and goes on alone;
START_WAIT = 1280  # but while its partner has not even started (waking a sleeping worker takes 40-70 us),
#                    it waits this long first (~40 us of pauses and ~250 yields, about 0.25 ms)


def meta_size(num_layers: int, num_directions: int) -> int:
    return META_OFFSETS + OFFSETS_PER_BLOCK * num_layers * num_directions


@njit(**JIT)
def _padded(n):
    return -(-n // ALIGN) * ALIGN


@njit(**JIT)
def workspace_layout(steps, batch, hidden, directions, layers, mode, chunks, block_steps, workers):
    """Offsets (in elements) in the float workspace: (zeros, mid0, mid1, scratch, scratch size, end).

    ``zeros`` is one row of H zeros (the state before the first step without h0; zeroed once when the
    workspace is allocated, never written by a kernel), ``mid0``/``mid1`` hold
    the sequences of the layers below the last, and each worker (MODE_ROWS) or the whole call
    (MODE_SPLIT) has a scratch area: projected inputs of ``block_steps`` steps, recurrent products and
    r * h for its rows.  The int64 counters and flags live in a separate array (:func:`sync_slots`).
    """
    rows_per_unit = batch if mode == MODE_SPLIT else -(-batch // chunks)
    n_mid = steps * batch * directions * hidden
    o_zeros = 0
    o_mid0 = o_zeros + _padded(hidden)
    o_mid1 = o_mid0 + (_padded(n_mid) if layers > 1 else 0)
    o_scratch = o_mid1 + (_padded(n_mid) if layers > 2 else 0)
    scratch = (_padded(block_steps * rows_per_unit * 3 * hidden) + _padded(rows_per_unit * 3 * hidden)
               + _padded(rows_per_unit * hidden))
    n_scratch = 1 if mode == MODE_SPLIT else workers
    return o_zeros, o_mid0, o_mid1, o_scratch, scratch, o_scratch + n_scratch * scratch


@njit(**JIT)
def sync_slots(steps, layers, mode, chunks):
    """int64 slots of the synchronisation area: 2 counters per layer, then the MODE_SPLIT claim flags."""
    flags = chunks * steps * layers if mode == MODE_SPLIT else 0
    return LINE * (2 * layers + 1) + flags


# ---------------------------------------------------------------------------
# matrix products
# ---------------------------------------------------------------------------


@njit(**GEMM_JIT)
def gemm4(c0, c1, c2, c3, a0, a1, a2, a3, bt, j0, j1):
    """c_m[j0:j1] += a_m @ bt[:, j0:j1] for four rows m; bt is (K, N) with K = len(a_m).

    Every loop runs over views sliced at j0 from index 0: with ``range(j0, j1)`` Numba must allow a
    negative index, and the wrap-around select it adds stops LLVM from vectorising (6 GMAC/s, not 45).
    """
    K = bt.shape[0]
    n = j1 - j0
    d0, d1, d2, d3 = c0[j0:j1], c1[j0:j1], c2[j0:j1], c3[j0:j1]
    k = 0
    while k + 8 <= K:
        b0, b1, b2, b3 = bt[k, j0:j1], bt[k + 1, j0:j1], bt[k + 2, j0:j1], bt[k + 3, j0:j1]
        b4, b5, b6, b7 = bt[k + 4, j0:j1], bt[k + 5, j0:j1], bt[k + 6, j0:j1], bt[k + 7, j0:j1]
        x00, x01, x02, x03, x04, x05, x06, x07 = a0[k], a0[k + 1], a0[k + 2], a0[k + 3], a0[k + 4], a0[k + 5], a0[k + 6], a0[k + 7]
        x10, x11, x12, x13, x14, x15, x16, x17 = a1[k], a1[k + 1], a1[k + 2], a1[k + 3], a1[k + 4], a1[k + 5], a1[k + 6], a1[k + 7]
        x20, x21, x22, x23, x24, x25, x26, x27 = a2[k], a2[k + 1], a2[k + 2], a2[k + 3], a2[k + 4], a2[k + 5], a2[k + 6], a2[k + 7]
        x30, x31, x32, x33, x34, x35, x36, x37 = a3[k], a3[k + 1], a3[k + 2], a3[k + 3], a3[k + 4], a3[k + 5], a3[k + 6], a3[k + 7]
        for j in range(n):
            w0, w1, w2, w3, w4, w5, w6, w7 = b0[j], b1[j], b2[j], b3[j], b4[j], b5[j], b6[j], b7[j]
            d0[j] += ((x00 * w0 + x01 * w1) + (x02 * w2 + x03 * w3)) + ((x04 * w4 + x05 * w5) + (x06 * w6 + x07 * w7))
            d1[j] += ((x10 * w0 + x11 * w1) + (x12 * w2 + x13 * w3)) + ((x14 * w4 + x15 * w5) + (x16 * w6 + x17 * w7))
            d2[j] += ((x20 * w0 + x21 * w1) + (x22 * w2 + x23 * w3)) + ((x24 * w4 + x25 * w5) + (x26 * w6 + x27 * w7))
            d3[j] += ((x30 * w0 + x31 * w1) + (x32 * w2 + x33 * w3)) + ((x34 * w4 + x35 * w5) + (x36 * w6 + x37 * w7))
        k += 8
    while k < K:
        b = bt[k, j0:j1]
        x0, x1, x2, x3 = a0[k], a1[k], a2[k], a3[k]
        for j in range(n):
            w = b[j]
            d0[j] += x0 * w
            d1[j] += x1 * w
            d2[j] += x2 * w
            d3[j] += x3 * w
        k += 1


@njit(**GEMM_JIT)
def gemm1(c, a, bt, j0, j1):
    """c[j0:j1] += a @ bt[:, j0:j1]: one row, the same operations per element as :func:`gemm4`."""
    K = bt.shape[0]
    n = j1 - j0
    d = c[j0:j1]
    k = 0
    while k + 8 <= K:
        b0, b1, b2, b3 = bt[k, j0:j1], bt[k + 1, j0:j1], bt[k + 2, j0:j1], bt[k + 3, j0:j1]
        b4, b5, b6, b7 = bt[k + 4, j0:j1], bt[k + 5, j0:j1], bt[k + 6, j0:j1], bt[k + 7, j0:j1]
        x0, x1, x2, x3, x4, x5, x6, x7 = a[k], a[k + 1], a[k + 2], a[k + 3], a[k + 4], a[k + 5], a[k + 6], a[k + 7]
        for j in range(n):
            d[j] += ((x0 * b0[j] + x1 * b1[j]) + (x2 * b2[j] + x3 * b3[j])) + ((x4 * b4[j] + x5 * b5[j]) + (x6 * b6[j] + x7 * b7[j]))
        k += 8
    while k < K:
        b = bt[k, j0:j1]
        x = a[k]
        for j in range(n):
            d[j] += x * b[j]
        k += 1


# ---------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------


@njit(**JIT)
def _gates_after_reset(xp, g, b_hn, h_prev, h_out, lo, hi, hidden, f, f_alpha, f_beta, gc, g_alpha, g_beta, clip):
    """linear_before_reset=1: ``g`` holds h R^T for all three gates; write h' for units [lo, hi) to ``h_out``
    (memory apart from every input, or the loop does not vectorise)."""
    H = hidden
    n = hi - lo
    one = like(clip, 1.0)
    xz, xr, xn = xp[lo:hi], xp[H + lo : H + hi], xp[2 * H + lo : 2 * H + hi]
    gz, gr, gn = g[lo:hi], g[H + lo : H + hi], g[2 * H + lo : 2 * H + hi]
    bn, hp, ho = b_hn[lo:hi], h_prev[lo:hi], h_out[lo:hi]
    if f == SIGMOID and gc == TANH and clip == 0:
        for j in range(n):
            z = sigmoid(xz[j] + gz[j])
            r = sigmoid(xr[j] + gr[j])
            h_new = tanh(xn[j] + r * (gn[j] + bn[j]))
            ho[j] = (one - z) * h_new + z * hp[j]
        return
    for j in range(n):
        gz[j] += xz[j]
        gr[j] += xr[j]
    clip_range(gz, clip)
    clip_range(gr, clip)
    activate(gz, f, f_alpha, f_beta)
    activate(gr, f, f_alpha, f_beta)
    for j in range(n):
        gn[j] = xn[j] + gr[j] * (gn[j] + bn[j])
    clip_range(gn, clip)
    activate(gn, gc, g_alpha, g_beta)
    for j in range(n):
        z = gz[j]
        ho[j] = (one - z) * gn[j] + z * hp[j]


@njit(**JIT)
def _update_and_reset_gates(xp, g, h_prev, rh, hidden, f, f_alpha, f_beta, clip):
    """linear_before_reset=0, first half: ``g[:2H]`` holds h R_zr^T; leave z in g[:H], r * h in ``rh``."""
    H = hidden
    if f == SIGMOID and clip == 0:
        for j in range(H):
            g[j] = sigmoid(xp[j] + g[j])
            rh[j] = sigmoid(xp[H + j] + g[H + j]) * h_prev[j]
        return
    for j in range(2 * H):
        g[j] += xp[j]
    clip_range(g[: 2 * H], clip)
    activate(g[: 2 * H], f, f_alpha, f_beta)
    for j in range(H):
        rh[j] = g[H + j] * h_prev[j]


@njit(**JIT)
def _candidate_and_state(xp, g, h_prev, h_out, hidden, gc, g_alpha, g_beta, clip):
    """linear_before_reset=0, second half: ``g[2H:]`` holds (r * h) R_n^T; z is in g[:H]; write h'."""
    H = hidden
    one = like(clip, 1.0)
    if gc == TANH and clip == 0:
        for j in range(H):
            z = g[j]
            h_out[j] = (one - z) * tanh(xp[2 * H + j] + g[2 * H + j]) + z * h_prev[j]
        return
    for j in range(H):
        g[2 * H + j] += xp[2 * H + j]
    clip_range(g[2 * H :], clip)
    activate(g[2 * H :], gc, g_alpha, g_beta)
    for j in range(H):
        z = g[j]
        h_out[j] = (one - z) * g[2 * H + j] + z * h_prev[j]


# ---------------------------------------------------------------------------
# views over the flat buffers
# ---------------------------------------------------------------------------


@njit(**JIT)
def _meta(meta_addr):
    head = carray(pointer(meta_addr, np.int64(0)), (META_OFFSETS,))
    size = META_OFFSETS + OFFSETS_PER_BLOCK * head[META_LAYERS] * head[META_DIRECTIONS]
    return carray(pointer(meta_addr, np.int64(0)), (size,))


@njit(**JIT)
def _layer_weights(params, meta, layer, d, n_in):
    """Views of one (layer, direction): W^T (I, 3H), R^T (H, 3H), b_x (3H), b_hn (H)."""
    hidden = meta[META_HIDDEN]
    base = META_OFFSETS + OFFSETS_PER_BLOCK * (layer * meta[META_DIRECTIONS] + d)
    o_w = meta[base + OFFSET_W]
    o_r = meta[base + OFFSET_R]
    o_bx = meta[base + OFFSET_BX]
    o_bhn = meta[base + OFFSET_BHN]
    w_t = params[o_w : o_w + n_in * 3 * hidden].reshape((n_in, 3 * hidden))
    r_t = params[o_r : o_r + hidden * 3 * hidden].reshape((hidden, 3 * hidden))
    return w_t, r_t, params[o_bx : o_bx + 3 * hidden], params[o_bhn : o_bhn + hidden]


@njit(**JIT)
def _time_of(s, n_valid, reverse):
    """The time index of step s of a sequence of n_valid steps (a reverse direction starts at its end)."""
    if s >= n_valid:
        return 0  # a finished row: any valid row index, its results are never used
    return n_valid - 1 - s if reverse else s


@njit(**JIT)
def _project(seq_in, w_t, b_x, xp, s0, s1, b0, b1, st, sb, lengths, has_lengths, steps, reverse, j0, j1):
    """xp[(s - s0) * rows + (b - b0), j0:j1] = seq_in[row(t(s, b), b)] @ w_t[:, j0:j1] + b_x[j0:j1]."""
    rows = b1 - b0
    n = (s1 - s0) * rows
    for i in range(n):
        xp[i, j0:j1] = b_x[j0:j1]
    i = 0
    while i < n:
        take = min(4, n - i)
        r0 = _input_row(seq_in, i, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse)
        if take == 4:
            r1 = _input_row(seq_in, i + 1, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse)
            r2 = _input_row(seq_in, i + 2, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse)
            r3 = _input_row(seq_in, i + 3, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse)
            gemm4(xp[i], xp[i + 1], xp[i + 2], xp[i + 3], r0, r1, r2, r3, w_t, j0, j1)
        else:
            gemm1(xp[i], r0, w_t, j0, j1)
            take = 1
        i += take


@njit(**JIT)
def _input_row(seq_in, i, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse):
    s = s0 + i // rows
    b = b0 + i % rows
    n_valid = lengths[b] if has_lengths else steps
    return seq_in[_time_of(s, n_valid, reverse) * st + b * sb]


# ---------------------------------------------------------------------------
# MODE_ROWS: a unit is (direction, batch rows b0..b1), every step, one worker
# ---------------------------------------------------------------------------


@njit(**JIT)
def _run_unit(params, meta, layer, d, b0, b1, steps, st, sb, lengths, has_lengths, seq_in, n_in, seq_out,
              h0, has_h0, h_n, scratch, block_steps, codes, acts, clip):
    H = meta[META_HIDDEN]
    D = meta[META_DIRECTIONS]
    lbr = meta[META_LBR] != 0
    reverse = meta[META_REVERSE] != 0 or d == 1
    f, gc = codes[2 * d], codes[2 * d + 1]
    f_alpha, f_beta, g_alpha, g_beta = acts[4 * d], acts[4 * d + 1], acts[4 * d + 2], acts[4 * d + 3]
    w_t, r_t, b_x, b_hn = _layer_weights(params, meta, layer, d, n_in)
    rows = b1 - b0
    o_g = _padded(block_steps * rows * 3 * H)
    o_rh = o_g + _padded(rows * 3 * H)
    xp = scratch[: block_steps * rows * 3 * H].reshape((block_steps * rows, 3 * H))
    g = scratch[o_g : o_g + rows * 3 * H].reshape((rows, 3 * H))
    rh = scratch[o_rh : o_rh + rows * H].reshape((rows, H))
    state = h_n[layer * D + d]
    col = d * H
    zero = like(clip, 0.0)
    for b in range(b0, b1):
        if has_h0:
            state[b, :] = h0[layer * D + d, b]
        else:
            state[b, :] = zero
        n_valid = lengths[b] if has_lengths else steps
        for t in range(n_valid, steps):  # PackedSequence: y is 0 at padded steps
            out_row = seq_out[t * st + b * sb]
            out_row[col : col + H] = zero
    width = 3 * H if lbr else 2 * H
    for s0 in range(0, steps, block_steps):
        s1 = min(steps, s0 + block_steps)
        _project(seq_in, w_t, b_x, xp, s0, s1, b0, b1, st, sb, lengths, has_lengths, steps, reverse, 0, 3 * H)
        for s in range(s0, s1):
            g[:, :] = zero
            _products(g, state, b0, b1, r_t, 0, width, 0)
            base = (s - s0) * rows
            if not lbr:
                for b in range(b0, b1):
                    _update_and_reset_gates(xp[base + b - b0], g[b - b0], state[b], rh[b - b0], H, f, f_alpha, f_beta, clip)
                _products(g, rh, b0, b1, r_t, 2 * H, 3 * H, b0)
            for b in range(b0, b1):
                n_valid = lengths[b] if has_lengths else steps
                if s >= n_valid:
                    continue
                # h' goes to the output row, then back into the state: writing it over h in place would
                # make LLVM's overlap check fail at run time and fall back to scalar code
                h = state[b]
                h_out = seq_out[_time_of(s, n_valid, reverse) * st + b * sb][col : col + H]
                if lbr:
                    _gates_after_reset(xp[base + b - b0], g[b - b0], b_hn, h, h_out, 0, H, H, f, f_alpha, f_beta,
                                       gc, g_alpha, g_beta, clip)
                else:
                    _candidate_and_state(xp[base + b - b0], g[b - b0], h, h_out, H, gc, g_alpha, g_beta, clip)
                h[:] = h_out


@njit(**JIT)
def _products(g, a, b0, b1, r_t, j0, j1, a_base):
    """g[b - b0, j0:j1] += a[b - a_base] @ r_t[:, j0:j1] for rows b0..b1, four at a time."""
    b = b0
    while b + 4 <= b1:
        i = b - b0
        k = b - a_base
        gemm4(g[i], g[i + 1], g[i + 2], g[i + 3], a[k], a[k + 1], a[k + 2], a[k + 3], r_t, j0, j1)
        b += 4
    while b < b1:
        gemm1(g[b - b0], a[b - a_base], r_t, j0, j1)
        b += 1


# ---------------------------------------------------------------------------
# MODE_SPLIT: items (step, chunk of hidden units), claimed with flags
# ---------------------------------------------------------------------------


@njit(**JIT)
def _chunk_bounds(hidden, chunks, c):
    """Hidden units of chunk c: boundaries on 16-element (64-byte) multiples so chunks share no cache line."""
    units = -(-hidden // ALIGN)
    lo = min(hidden, ALIGN * (c * units // chunks))
    hi = min(hidden, ALIGN * ((c + 1) * units // chunks))
    return lo, hi


@njit(**JIT)
def _run_item(params, meta, layer, s, c, chunks, steps, batch, st, sb, lengths, has_lengths, seq_in, n_in,
              seq_out, h0, has_h0, h_n, zeros, scratch, block_steps, codes, acts, clip):
    """Step s of ``layer`` for the hidden units of chunk c (one direction, linear_before_reset=1)."""
    H = meta[META_HIDDEN]
    reverse = meta[META_REVERSE] != 0
    f, gc = codes[0], codes[1]
    f_alpha, f_beta, g_alpha, g_beta = acts[0], acts[1], acts[2], acts[3]
    w_t, r_t, b_x, b_hn = _layer_weights(params, meta, layer, 0, n_in)
    lo, hi = _chunk_bounds(H, chunks, c)
    if lo >= hi:
        return
    o_g = _padded(block_steps * batch * 3 * H)
    xp = scratch[: block_steps * batch * 3 * H].reshape((block_steps * batch, 3 * H))
    g = scratch[o_g : o_g + batch * 3 * H].reshape((batch, 3 * H))
    s0 = s - s % block_steps
    if s == s0:
        s1 = min(steps, s0 + block_steps)
        for gate in range(3):
            _project(seq_in, w_t, b_x, xp, s0, s1, 0, batch, st, sb, lengths, has_lengths, steps, reverse,
                     gate * H + lo, gate * H + hi)
    zero = like(clip, 0.0)
    for b in range(batch):
        g[b, lo:hi] = zero
        g[b, H + lo : H + hi] = zero
        g[b, 2 * H + lo : 2 * H + hi] = zero
    # h_{s-1} of every row: the previous step's output row, h0, or zeros (finished rows: zeros, unused)
    b = 0
    while b < batch:
        take = min(4, batch - b)
        if take == 4:
            p0 = _previous_state(s, b, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0, has_h0, zeros)
            p1 = _previous_state(s, b + 1, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0, has_h0, zeros)
            p2 = _previous_state(s, b + 2, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0, has_h0, zeros)
            p3 = _previous_state(s, b + 3, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0, has_h0, zeros)
            for gate in range(3):
                gemm4(g[b], g[b + 1], g[b + 2], g[b + 3], p0, p1, p2, p3, r_t, gate * H + lo, gate * H + hi)
        else:
            p0 = _previous_state(s, b, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0, has_h0, zeros)
            for gate in range(3):
                gemm1(g[b], p0, r_t, gate * H + lo, gate * H + hi)
            take = 1
        b += take
    base = (s - s0) * batch
    for b in range(batch):
        n_valid = lengths[b] if has_lengths else steps
        if s >= n_valid:
            continue
        h_prev = _previous_state(s, b, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0, has_h0, zeros)
        h_out = seq_out[_time_of(s, n_valid, reverse) * st + b * sb]
        _gates_after_reset(xp[base + b], g[b], b_hn, h_prev, h_out, lo, hi, H, f, f_alpha, f_beta, gc, g_alpha,
                           g_beta, clip)
    if s == steps - 1:
        # the layer's last step: final states and padding, for this chunk's columns
        for b in range(batch):
            n_valid = lengths[b] if has_lengths else steps
            h_last = _previous_state(n_valid, b, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0,
                                     has_h0, zeros)
            h_n[layer, b, lo:hi] = h_last[lo:hi]
            for t in range(n_valid, steps):
                out_row = seq_out[t * st + b * sb]
                out_row[lo:hi] = zero


@njit(**JIT)
def _previous_state(s, b, layer, steps, st, sb, lengths, has_lengths, reverse, seq_out, h0, has_h0, zeros):
    """h_{s-1} of row b: the output row of step s-1, h0 (or zeros) before the first step.

    Also the final state when s is the row's length (zeros or h0 for an empty sequence).
    """
    n_valid = lengths[b] if has_lengths else steps
    if s == 0 or n_valid == 0:
        return h0[layer, b] if has_h0 else zeros
    if s > n_valid:
        return zeros
    return seq_out[_time_of(s - 1, n_valid, reverse) * st + b * sb]


# ---------------------------------------------------------------------------
# forward over whole sequences
# ---------------------------------------------------------------------------


@njit(**JIT)
def _back_off(spins):
    """One round of a spin-wait: ``pause`` at first, then give the core away (the awaited thread may be
    descheduled on a busy machine, and spinning would keep it off the core)."""
    if spins < SPIN_PAUSES:
        spin_pause()
    else:
        yield_cpu()


@njit(**JIT)
def _layer_output(layer, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker):
    """Where a layer writes its sequence: y for the last layer, else one of two alternating buffers."""
    if layer == layers - 1:
        return carray(pointer(y_addr, marker), (rows, width))
    if layer % 2 == 0:
        return ws[o_mid0 : o_mid0 + rows * width].reshape((rows, width))
    return ws[o_mid1 : o_mid1 + rows * width].reshape((rows, width))


@njit(**JIT)
def _split_item(g, c, marker, params, meta, steps, batch, st, sb, lengths, has_lengths, x_addr, y_addr, ws, o_mid0,
                o_mid1, h0, has_h0, h_n, zeros, scratch, chunks, block_steps, codes, acts, clip):
    """Run item (global step g, chunk c) of MODE_SPLIT; g counts the steps of every layer in order."""
    layers = meta[META_LAYERS]
    width = meta[META_HIDDEN]
    rows = steps * batch
    layer = g // steps
    if layer == 0:
        n_in = meta[META_INPUT]
        seq_in = carray(pointer(x_addr, marker), (rows, n_in))
    else:
        n_in = width
        seq_in = _layer_output(layer - 1, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker)
    seq_out = _layer_output(layer, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker)
    _run_item(params, meta, layer, g % steps, c, chunks, steps, batch, st, sb, lengths, has_lengths, seq_in, n_in,
              seq_out, h0, has_h0, h_n, zeros, scratch, block_steps, codes, acts, clip)


@njit(**JIT)
def _worker(w, marker, params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major, h0_addr,
            lengths_addr, y_addr, h_n_addr, ws_addr, sync_addr, mode, chunks, block_steps, workers):
    """Everything one worker does in a forward call (worker 0 alone does it all in a serial call)."""
    meta = _meta(meta_addr)
    params = carray(pointer(params_addr, marker), (n_params,))
    layers = meta[META_LAYERS]
    directions = meta[META_DIRECTIONS]
    hidden = meta[META_HIDDEN]
    codes = meta[META_CODES : META_CODES + 4]
    acts = params[PARAM_ACT : PARAM_ACT + 8]
    clip = params[PARAM_CLIP]
    rows = steps * batch
    st = 1 if batch_major else batch
    sb = steps if batch_major else 1
    o_zeros, o_mid0, o_mid1, o_scratch, scratch_size, end = workspace_layout(
        steps, batch, hidden, directions, layers, mode, chunks, block_steps, workers)
    ws = carray(pointer(ws_addr, marker), (end,))
    zeros = ws[o_zeros : o_zeros + hidden]
    has_h0 = h0_addr != 0
    has_lengths = lengths_addr != 0
    lengths = carray(pointer(lengths_addr if has_lengths else meta_addr, np.int64(0)), (batch if has_lengths else 1,))
    h_n = carray(pointer(h_n_addr, marker), (layers * directions, batch, hidden))
    h0 = carray(pointer(h0_addr if has_h0 else h_n_addr, marker), (layers * directions, batch, hidden))
    width = directions * hidden

    if mode == MODE_SPLIT:
        scratch = ws[o_scratch : o_scratch + scratch_size]
        total = layers * steps
        done = sync_addr + 8 * LINE * SYNC_DONE  # items finished, all layers
        solo = sync_addr + 8 * LINE * SYNC_SOLO  # 0, or 1 + the worker that runs the rest alone
        flags = sync_addr + 8 * LINE * (2 * layers + 1)  # flags[c * total + g]: item claimed
        own = w % chunks
        arrived = sync_addr + 8 * LINE * SYNC_ARRIVED
        atomic_add(arrived, 1)
        for g in range(total + 1):
            # Every item of the previous step (or layer) must be complete.  A partner that has not claimed
            # its chunk of that step within STEAL_EVERY spins is not running (descheduled on a busy
            # machine, or the layer runs the workers one after another): this worker takes the chunk over
            # and runs the rest of the call alone, so a busy machine costs one wait, not one per step.
            spins = 0
            while atomic_load(done) < g * chunks:
                spins += 1
                _back_off(spins)
                patience = STEAL_EVERY if atomic_load(arrived) == workers else START_WAIT
                if spins % patience == 0:
                    atomic_cas(solo, 0, w + 1)
                    for c in range(chunks):
                        if atomic_cas(flags + 8 * (c * total + g - 1), 0, 1):
                            _split_item(g - 1, c, marker, params, meta, steps, batch, st, sb, lengths, has_lengths,
                                        x_addr, y_addr, ws, o_mid0, o_mid1, h0, has_h0, h_n, zeros, scratch, chunks,
                                        block_steps, codes, acts, clip)
                            atomic_add(done, 1)
            if g == total:
                break
            leader = atomic_load(solo)
            if leader != 0 and leader != w + 1:
                break  # the other worker runs the remaining items alone
            for i in range(chunks if leader == w + 1 else 1):
                c = (own + i) % chunks
                if atomic_cas(flags + 8 * (c * total + g), 0, 1):
                    _split_item(g, c, marker, params, meta, steps, batch, st, sb, lengths, has_lengths, x_addr,
                                y_addr, ws, o_mid0, o_mid1, h0, has_h0, h_n, zeros, scratch, chunks, block_steps,
                                codes, acts, clip)
                    atomic_add(done, 1)
        return

    scratch = ws[o_scratch + w * scratch_size : o_scratch + (w + 1) * scratch_size]
    units = directions * chunks
    n_in = meta[META_INPUT]
    seq_in = carray(pointer(x_addr, marker), (rows, n_in))
    for layer in range(layers):
        seq_out = _layer_output(layer, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker)
        if layer > 0:
            seq_in = _layer_output(layer - 1, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker)
            n_in = width
            # every unit of the previous layer has been claimed by a running worker: wait until all are done
            spins = 0
            while atomic_load(sync_addr + 8 * LINE * (2 * layer - 1)) < units:
                spins += 1
                _back_off(spins)
        while True:
            u = atomic_add(sync_addr + 8 * LINE * (2 * layer), 1)
            if u >= units:
                break
            d = u // chunks
            c = u % chunks
            b0 = c * batch // chunks
            b1 = (c + 1) * batch // chunks
            if b1 > b0:
                _run_unit(params, meta, layer, d, b0, b1, steps, st, sb, lengths, has_lengths, seq_in, n_in,
                          seq_out, h0, has_h0, h_n, scratch, block_steps, codes, acts, clip)
            atomic_add(sync_addr + 8 * LINE * (2 * layer + 1), 1)


@njit(**JIT)
def _reset_sync(meta_addr, sync_addr, steps, mode, chunks):
    """Zero the counters and claim flags.  Not inlined into the parallel entry point: its parfor pass
    would see a store to an array nothing reads afterwards (the workers reach it by address) and drop it."""
    layers = carray(pointer(meta_addr, np.int64(0)), (META_OFFSETS,))[META_LAYERS]
    sync = carray(pointer(sync_addr, np.int64(0)), (sync_slots(steps, layers, mode, chunks),))
    sync[:] = 0


def _make_forward(parallel, dtype):
    """Build a forward entry point.  One per (serial | parallel, float32 | float64), each compiled on its
    first call only: the float type is fixed here, not passed, which also keeps every argument a plain
    integer (Numba's dispatcher checks those fastest: about 0.4 us for the 17 arguments)."""
    loop = prange if parallel else range
    float_type = np.float32 if dtype == np.float32 else np.float64

    def forward(params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major, h0_addr, lengths_addr,
                y_addr, h_n_addr, ws_addr, sync_addr, mode, chunks, block_steps, workers):
        """Run every layer: ``workers`` workers share the call (see the module docstring)."""
        marker = float_type(0)
        _reset_sync(meta_addr, sync_addr, steps, mode, chunks)
        for w in loop(workers):
            _worker(w, marker, params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major, h0_addr,
                    lengths_addr, y_addr, h_n_addr, ws_addr, sync_addr, mode, chunks, block_steps, workers)

    name = f"forward_{'parallel' if parallel else 'serial'}_{np.dtype(dtype).name}"
    forward.__name__ = forward.__qualname__ = name
    return njit(**(PARALLEL_JIT if parallel else JIT))(forward)


FORWARD = {(np.dtype(dtype), parallel): _make_forward(parallel, dtype)
           for dtype in (np.float32, np.float64) for parallel in (False, True)}
"""The forward entry points by (dtype, parallel)."""
