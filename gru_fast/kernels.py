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

Layout: tiles of 16 hidden units
    The hidden units are padded to ``Hp``, a multiple of 16, and taken 16 at a
    time: *unit tile* u holds units 16u..16u+15 and owns the 48 columns
    48u..48u+47 of every gate-sized row: 16 of z, then 16 of r, then 16 of n.
    Weights are packed in that column order as 16-column tiles
    (:mod:`gru_fast._tiles`), so any range of unit tiles is one contiguous
    block of weights, projections and products, and every element-wise loop
    runs over whole 16-lane vectors, whatever H is.  Padded units have zero
    weights; they are computed and never read: products sum over the H real
    units only, and outputs copy the H real units only.

Matrix products
    ``c += a @ W`` for one or four rows ``a``, by the LLVM-IR micro-kernels of
    :mod:`gru_fast._tiles` (accumulators in registers, about 57 GMAC/s per core
    for four rows and 25 GMAC/s for one here).  No BLAS is called, so no second
    thread pool competes for the cores, and every output element is the same
    chain of fused multiply-adds whichever thread, row group or unit range
    computes it: serial and parallel runs agree bit for bit.

Input projection
    ``x W^T + b`` is computed ahead of the recurrence in blocks of
    ``block_steps`` time steps into the workspace (a block stays in cache
    until the recurrence reads it).

State
    Each direction keeps two padded state rows per sequence, written on
    alternate steps (step s reads ``state[(s + 1) % 2]`` and writes
    ``state[s % 2]``), so threads that each write part of a step never
    overwrite what another still reads.  Finished sequences (step >= length)
    carry their state forward; y is 0 at their padded steps.

Two ways to share a call between threads
    ``MODE_ROWS``: *units* of (direction, slice of batch rows) are independent
    for a whole layer: each worker claims units from an atomic counter and
    runs every time step of its rows.  Layers follow each other: a worker
    waits until every unit of the previous layer is done.
    ``MODE_SPLIT``: one sequence (B smaller than the thread count) has no
    independent rows to hand out, so the unit tiles are split into ``chunks``
    ranges, and *items* (step, chunk) are claimed through compare-and-swap
    flags.  A worker runs its own chunk of each step after the previous step
    is complete (an atomic counter of finished items).  An item still
    unclaimed when the other worker has finished its own is taken over by
    that worker at once (its owner is still waking, descheduled on a busy
    machine, or not run at all); the late worker finds its item taken and
    rejoins at the next step.  So the scheme cannot deadlock, never depends
    on how many threads actually run, a lone worker is never kept waiting,
    and two workers stay in step whenever both run.  Used for
    linear_before_reset=1, where a step is one    product per chunk.

Kernels take raw addresses (see :mod:`gru_fast._memory`) and build views with
``carray``; weights live in one flat ``params`` array described by an int64
``meta`` table built by :mod:`gru_fast.model`; the layout constants below are
shared with it.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from ._config import JIT, PARALLEL_JIT
from ._jit import kernel
from ._math import SIGMOID, TANH, activate, clip_range, like, sigmoid, tanh
from ._memory import atomic_add, atomic_cas, atomic_load, pointer, spin_pause, yield_cpu
from ._tiles import (TILE, project1, project4, recur1_all, recur1_n, recur1_zr, recur4_all, recur4_n,
                     recur4_zr)

# ---- layout of the int64 ``meta`` table ------------------------------------
META_LAYERS = 0
META_DIRECTIONS = 1
META_HIDDEN = 2
META_INPUT = 3
META_LBR = 4
META_REVERSE = 5  # 1 when the single direction runs backwards (ONNX "reverse")
META_CODES = 6  # 4 entries: f, g activation codes of direction 0, then direction 1
META_OFFSETS = 10  # then per (layer, direction): offsets in params of packed W, packed R, b_x, b_hn
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
# MODE_SPLIT's counter lines: items done; items taken over from the other worker
SYNC_DONE, SYNC_STOLEN = 0, 1
ALIGN = 16  # float blocks start on 64-byte boundaries (in float32 elements)
UNITS = TILE  # hidden units per unit tile
GATES = 3 * TILE  # columns per unit tile: z, r, n
SPIN_PAUSES = 1024  # a waiting worker spins with ``pause`` (~40 ns each) this long, then yields its core


def meta_size(num_layers: int, num_directions: int) -> int:
    return META_OFFSETS + OFFSETS_PER_BLOCK * num_layers * num_directions


@kernel
def padded_hidden(hidden):
    """H rounded up to whole unit tiles."""
    return -(-hidden // UNITS) * UNITS


@kernel
def _padded(n):
    return -(-n // ALIGN) * ALIGN


@kernel
def workspace_layout(steps, batch, hidden, directions, layers, block_steps):
    """Offsets (in elements) in the float workspace: (mid0, mid1, per-direction base, its size, end).

    ``mid0``/``mid1`` hold the sequences of the layers below the last.  Each direction then has:
    projected inputs of ``block_steps`` steps for every row (xp), recurrent products (g), r * h
    (lbr=0) and the two alternating state rows; see :func:`_direction_buffers`.  The caller zeroes the
    workspace once when it allocates it (padded units then start from 0 and stay finite).  The int64
    counters and flags live in a separate array (:func:`sync_slots`).
    """
    hp = padded_hidden(hidden)
    n_mid = steps * batch * directions * hidden
    o_mid0 = 0
    o_mid1 = o_mid0 + (_padded(n_mid) if layers > 1 else 0)
    o_dirs = o_mid1 + (_padded(n_mid) if layers > 2 else 0)
    per_direction = (_padded(block_steps * batch * 3 * hp) + _padded(batch * 3 * hp) + _padded(batch * hp)
                     + 2 * _padded(batch * hp))
    return o_mid0, o_mid1, o_dirs, per_direction, o_dirs + directions * per_direction


@kernel
def sync_slots(steps, layers, mode, chunks):
    """int64 slots of the synchronisation area: 2 counters per layer, then the MODE_SPLIT claim flags."""
    flags = chunks * steps * layers if mode == MODE_SPLIT else 0
    return LINE * (2 * layers + 1) + flags


@kernel
def _matrix(ws, start, rows, cols):
    """``ws[start : start + rows * cols]`` as a (rows, cols) view.  carray, not ``reshape``: a reshape
    carries a shape-mismatch error path whose message formatting costs a second of compile time."""
    return carray(pointer(ws.ctypes.data + start * ws.itemsize, ws[0]), (rows, cols))  # ws[0]: its type


@kernel
def _copy(dst, src, lo, hi, at):
    """dst[at : at + hi - lo] = src[lo:hi] as a loop: a slice assignment carries a shape-mismatch error
    path whose message formatting costs about a second of compile time."""
    for j in range(hi - lo):
        dst[at + j] = src[lo + j]


@kernel
def _direction_buffers(ws, o_dirs, per_direction, d, block_steps, batch, hidden):
    """Views of direction d's buffers: xp (block_steps*B, 3Hp), g (B, 3Hp), rh (B, Hp), state (2, B, Hp)."""
    hp = padded_hidden(hidden)
    base = o_dirs + d * per_direction
    o_g = base + _padded(block_steps * batch * 3 * hp)
    o_rh = o_g + _padded(batch * 3 * hp)
    o_state = o_rh + _padded(batch * hp)
    xp = _matrix(ws, base, block_steps * batch, 3 * hp)
    g = _matrix(ws, o_g, batch, 3 * hp)
    rh = _matrix(ws, o_rh, batch, hp)
    s0 = _matrix(ws, o_state, batch, hp)
    s1 = _matrix(ws, o_state + _padded(batch * hp), batch, hp)
    return xp, g, rh, s0, s1


# ---------------------------------------------------------------------------
# views over the flat buffers
# ---------------------------------------------------------------------------


@kernel
def _meta(meta_addr):
    head = carray(pointer(meta_addr, np.int64(0)), (META_OFFSETS,))
    size = META_OFFSETS + OFFSETS_PER_BLOCK * head[META_LAYERS] * head[META_DIRECTIONS]
    return carray(pointer(meta_addr, np.int64(0)), (size,))


@kernel
def _layer_weights(params, meta, layer, d):
    """Addresses of one (layer, direction)'s packed W and R, and views of b_x (3Hp) and b_hn (Hp)."""
    hp = padded_hidden(meta[META_HIDDEN])
    base = META_OFFSETS + OFFSETS_PER_BLOCK * (layer * meta[META_DIRECTIONS] + d)
    o_bx = meta[base + OFFSET_BX]
    o_bhn = meta[base + OFFSET_BHN]
    start = params.ctypes.data
    size = params.itemsize
    return (start + size * meta[base + OFFSET_W], start + size * meta[base + OFFSET_R],
            params[o_bx : o_bx + 3 * hp], params[o_bhn : o_bhn + hp])


@kernel
def _time_of(s, n_valid, reverse):
    """The time index of step s of a sequence of n_valid steps (a reverse direction starts at its end)."""
    if s >= n_valid:
        return 0  # a finished row: any valid row index, its results are never used
    return n_valid - 1 - s if reverse else s


@kernel
def _length(lengths, has_lengths, b, steps):
    return lengths[b] if has_lengths else steps


# ---------------------------------------------------------------------------
# products
# ---------------------------------------------------------------------------


@kernel
def _addr(row, col):
    """Address of element ``col`` of a 1-D view."""
    return row.ctypes.data + col * row.itemsize


# what a product computes (gru_fast._tiles): x W^T + b_x, h R^T, h R_zr^T, (r * h) R_n^T
PROJECT, RECUR, RECUR_ZR, RECUR_N = 0, 1, 2, 3


@kernel
def _gemm(kind, c0, c1, c2, c3, a0, a1, a2, a3, w, bias, k, u0, u1, rows, marker):
    """Product ``kind`` into rows c_m[48*u0 : 48*u1] for ``rows`` (1 or 4) rows a_m (K = k values)."""
    n = u1 - u0
    if n <= 0:
        return
    col = GATES * u0
    w_at = w + GATES * u0 * k * c0.itemsize  # group u0: K rows of 48
    b_at = _addr(bias, col)
    if rows == 4:
        c0_, c1_, c2_, c3_ = _addr(c0, col), _addr(c1, col), _addr(c2, col), _addr(c3, col)
        x0, x1, x2, x3 = a0.ctypes.data, a1.ctypes.data, a2.ctypes.data, a3.ctypes.data
        if kind == PROJECT:
            project4(c0_, c1_, c2_, c3_, x0, x1, x2, x3, w_at, b_at, k, n, marker)
        elif kind == RECUR:
            recur4_all(c0_, c1_, c2_, c3_, x0, x1, x2, x3, w_at, b_at, k, n, marker)
        elif kind == RECUR_ZR:
            recur4_zr(c0_, c1_, c2_, c3_, x0, x1, x2, x3, w_at, b_at, k, n, marker)
        else:
            recur4_n(c0_, c1_, c2_, c3_, x0, x1, x2, x3, w_at, b_at, k, n, marker)
    elif kind == PROJECT:
        project1(_addr(c0, col), a0.ctypes.data, w_at, b_at, k, n, marker)
    elif kind == RECUR:
        recur1_all(_addr(c0, col), a0.ctypes.data, w_at, b_at, k, n, marker)
    elif kind == RECUR_ZR:
        recur1_zr(_addr(c0, col), a0.ctypes.data, w_at, b_at, k, n, marker)
    else:
        recur1_n(_addr(c0, col), a0.ctypes.data, w_at, b_at, k, n, marker)


@kernel
def _last_rows(n, i):
    """Rows i..i+3 for a four-row product; past the last of n rows, the last one again.  Two or three
    left-over rows cost one four-row pass (compute-bound, ~57 GMAC/s) instead of two or three one-row
    passes (bandwidth-bound, ~25 GMAC/s); a repeated row computes the same values into the same place."""
    last = n - 1
    return min(i, last), min(i + 1, last), min(i + 2, last), min(i + 3, last)


@kernel
def _project(seq_in, w, b_x, xp, s0, s1, b0, b1, batch, st, sb, lengths, has_lengths, steps, reverse, n_in, u0, u1,
             marker):
    """xp[(s - s0) * B + b, tiles u0..u1] = seq_in[row(t(s, b), b)] @ W + b_x for s in [s0, s1), b in [b0, b1)."""
    rows = b1 - b0
    n = (s1 - s0) * rows  # the (step, row) pairs of the block, taken four at a time whatever B is
    i = 0
    while i < n:
        if n - i == 1:
            x0 = _input_row(seq_in, i, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse)
            o0 = xp[_xp_row(i, s0, b0, rows, batch)]
            _gemm(PROJECT, o0, o0, o0, o0, x0, x0, x0, x0, w, b_x, n_in, u0, u1, 1, marker)
            break
        i0, i1, i2, i3 = _last_rows(n, i)
        _gemm(PROJECT, xp[_xp_row(i0, s0, b0, rows, batch)], xp[_xp_row(i1, s0, b0, rows, batch)],
              xp[_xp_row(i2, s0, b0, rows, batch)], xp[_xp_row(i3, s0, b0, rows, batch)],
              _input_row(seq_in, i0, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse),
              _input_row(seq_in, i1, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse),
              _input_row(seq_in, i2, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse),
              _input_row(seq_in, i3, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse),
              w, b_x, n_in, u0, u1, 4, marker)
        i += 4


@kernel
def _xp_row(i, s0, b0, rows, batch):
    """Row of xp holding pair i of a block: step s0 + i // rows, batch row b0 + i % rows."""
    return (i // rows) * batch + b0 + i % rows


@kernel
def _input_row(seq_in, i, s0, b0, rows, st, sb, lengths, has_lengths, steps, reverse):
    """The input row of pair i of a block (see _xp_row)."""
    s = s0 + i // rows
    b = b0 + i % rows
    return seq_in[_time_of(s, _length(lengths, has_lengths, b, steps), reverse) * st + b * sb]


@kernel
def _products(kind, g, rows_in, b0, b1, w, hidden, u0, u1, marker):
    """g[b, the kind's tiles of unit tiles u0..u1] = rows_in[b] @ R for rows b0..b1, four at a time
    (RECUR: all three gates, RECUR_ZR: z and r, RECUR_N: n; the other columns are left alone)."""
    b = b0
    while b < b1:
        if b1 - b == 1:
            _gemm(kind, g[b], g[b], g[b], g[b], rows_in[b], rows_in[b], rows_in[b], rows_in[b], w, g[b], hidden,
                  u0, u1, 1, marker)
            break
        i0, i1, i2, i3 = _last_rows(b1 - b0, b - b0)
        r0, r1, r2, r3 = b0 + i0, b0 + i1, b0 + i2, b0 + i3
        _gemm(kind, g[r0], g[r1], g[r2], g[r3], rows_in[r0], rows_in[r1], rows_in[r2], rows_in[r3], w, g[r0],
              hidden, u0, u1, 4, marker)
        b += 4


# ---------------------------------------------------------------------------
# gates, one unit tile (16 units, 48 columns) at a time
# ---------------------------------------------------------------------------


@kernel
def _tiles(row, u0, u1, gates):
    """Unit tiles u0..u1 of a row as a (tiles, gates, 16) view (gates 3: xp, g; 1: states, b_hn).

    Views indexed from 0 by loop counters: with ``range(lo, hi)`` or a slice per tile, Numba must allow
    a negative index (the wrap-around select stops LLVM from vectorising) or builds a view per tile (at
    B=64 that cost a fifth of the call)."""
    start = row.ctypes.data + gates * UNITS * u0 * row.itemsize
    return carray(pointer(start, row[0]), (u1 - u0, gates, UNITS))  # row[0]: only its type is used


@kernel
def _update_and_reset_tile(x3, g3, u, f, f_alpha, f_beta, clip):
    """z and r of unit tile u in place in g3, for any activation and clip (the general, slower path)."""
    gz, gr = g3[u, 0], g3[u, 1]
    for j in range(UNITS):
        gz[j] += x3[u, 0, j]
        gr[j] += x3[u, 1, j]
    clip_range(gz, clip)
    clip_range(gr, clip)
    activate(gz, f, f_alpha, f_beta)
    activate(gr, f, f_alpha, f_beta)


@kernel
def _gates_after_reset(xp, g, b_hn, h_prev, h_new, u0, u1, f, f_alpha, f_beta, gc, g_alpha, g_beta, clip):
    """linear_before_reset=1: ``g`` holds h R^T for all three gates; write h' of unit tiles u0..u1."""
    one = like(clip, 1.0)
    x3, g3 = _tiles(xp, u0, u1, 3), _tiles(g, u0, u1, 3)
    bn, hp, hn = _tiles(b_hn, u0, u1, 1), _tiles(h_prev, u0, u1, 1), _tiles(h_new, u0, u1, 1)
    if f == SIGMOID and gc == TANH and clip == 0:
        for u in range(u1 - u0):
            for j in range(UNITS):
                z = sigmoid(x3[u, 0, j] + g3[u, 0, j])
                r = sigmoid(x3[u, 1, j] + g3[u, 1, j])
                n = tanh(x3[u, 2, j] + r * (g3[u, 2, j] + bn[u, 0, j]))
                hn[u, 0, j] = (one - z) * n + z * hp[u, 0, j]
        return
    for u in range(u1 - u0):  # any other activations or clip: one pass per step of the equations
        _update_and_reset_tile(x3, g3, u, f, f_alpha, f_beta, clip)
        gz, gr, gn = g3[u, 0], g3[u, 1], g3[u, 2]
        for j in range(UNITS):
            gn[j] = x3[u, 2, j] + gr[j] * (gn[j] + bn[u, 0, j])
        clip_range(gn, clip)
        activate(gn, gc, g_alpha, g_beta)
        for j in range(UNITS):
            z = gz[j]
            hn[u, 0, j] = (one - z) * gn[j] + z * hp[u, 0, j]


@kernel
def _update_and_reset_gates(xp, g, h_prev, rh, n_tiles, f, f_alpha, f_beta, clip):
    """linear_before_reset=0, first half: ``g`` holds h R_zr^T in its z and r tiles; leave z there and
    r * h in ``rh``."""
    x3, g3 = _tiles(xp, 0, n_tiles, 3), _tiles(g, 0, n_tiles, 3)
    hp, r_h = _tiles(h_prev, 0, n_tiles, 1), _tiles(rh, 0, n_tiles, 1)
    if f == SIGMOID and clip == 0:
        for u in range(n_tiles):
            for j in range(UNITS):
                g3[u, 0, j] = sigmoid(x3[u, 0, j] + g3[u, 0, j])
                r_h[u, 0, j] = sigmoid(x3[u, 1, j] + g3[u, 1, j]) * hp[u, 0, j]
        return
    for u in range(n_tiles):
        _update_and_reset_tile(x3, g3, u, f, f_alpha, f_beta, clip)
        for j in range(UNITS):
            r_h[u, 0, j] = g3[u, 1, j] * hp[u, 0, j]


@kernel
def _candidate_and_state(xp, g, h_prev, h_new, n_tiles, gc, g_alpha, g_beta, clip):
    """linear_before_reset=0, second half: the n tiles of ``g`` hold (r * h) R_n^T, the z tiles z."""
    one = like(clip, 1.0)
    x3, g3 = _tiles(xp, 0, n_tiles, 3), _tiles(g, 0, n_tiles, 3)
    hp, hn = _tiles(h_prev, 0, n_tiles, 1), _tiles(h_new, 0, n_tiles, 1)
    if gc == TANH and clip == 0:
        for u in range(n_tiles):
            for j in range(UNITS):
                z = g3[u, 0, j]
                hn[u, 0, j] = (one - z) * tanh(x3[u, 2, j] + g3[u, 2, j]) + z * hp[u, 0, j]
        return
    for u in range(n_tiles):
        gn = g3[u, 2]
        for j in range(UNITS):
            gn[j] += x3[u, 2, j]
        clip_range(gn, clip)
        activate(gn, gc, g_alpha, g_beta)
        for j in range(UNITS):
            z = g3[u, 0, j]
            hn[u, 0, j] = (one - z) * gn[j] + z * hp[u, 0, j]


# ---------------------------------------------------------------------------
# one layer and direction, for batch rows b0..b1 and unit tiles u0..u1
# ---------------------------------------------------------------------------


@kernel
def _begin(layer, d, b0, b1, u0, u1, steps, st, sb, lengths, has_lengths, h0, has_h0, seq_out, states, hidden,
           directions, marker):
    """Before step 0: the state rows read by step 0 hold h0 (or zeros) for these units; y is 0 at every
    padded step of these rows (PackedSequence)."""
    lo, hi = UNITS * u0, min(UNITS * u1, hidden)
    zero = like(marker, 0.0)
    col = d * hidden
    before = states[1]  # step 0 reads state[(0 + 1) % 2]
    for b in range(b0, b1):
        if has_h0:
            _copy(before[b], h0[layer * directions + d, b], lo, hi, lo)
        else:
            before[b, lo:hi] = zero
        for t in range(_length(lengths, has_lengths, b, steps), steps):
            seq_out[t * st + b * sb, col + lo : col + hi] = zero


@kernel
def _advance(s, layer, d, b0, b1, u0, u1, steps, st, sb, lengths, has_lengths, reverse, seq_in, n_in, seq_out, h0,
             has_h0, h_n, bufs, w_x, w_h, b_x, b_hn, block_steps, batch, hidden, directions, lbr, codes, acts,
             clip, marker):
    """Step s of rows b0..b1, unit tiles u0..u1: project a new block of steps when s starts one, then the
    recurrent product and the gates; write y, the state rows of step s and, after the last step, h_n."""
    xp, g, rh, state0, state1 = bufs
    f, gc = codes[2 * d], codes[2 * d + 1]
    f_alpha, f_beta, g_alpha, g_beta = acts[4 * d], acts[4 * d + 1], acts[4 * d + 2], acts[4 * d + 3]
    s0 = s - s % block_steps
    if s == s0:
        _project(seq_in, w_x, b_x, xp, s0, min(steps, s0 + block_steps), b0, b1, batch, st, sb, lengths,
                 has_lengths, steps, reverse, n_in, u0, u1, marker)
    prev = state1 if s % 2 == 0 else state0
    new = state0 if s % 2 == 0 else state1
    # The product reads the H real units of h_{s-1}: the previous state rows, but at step 0 h0 itself
    # (another thread may still be copying its units of h0 into the state rows); zero without h0.
    lo, hi = UNITS * u0, min(UNITS * u1, hidden)
    first = s == 0
    if first and not has_h0:
        g[b0:b1, GATES * u0 : GATES * u1] = like(marker, 0.0)
    else:
        _products(RECUR if lbr else RECUR_ZR, g, h0[layer * directions + d] if first else prev, b0, b1, w_h, hidden,
                  u0, u1, marker)
    base = (s - s0) * batch
    col = d * hidden
    n_tiles = u1 - u0
    if not lbr:  # whole rows only (u0 == 0): r * h must be complete before its product
        for b in range(b0, b1):
            _update_and_reset_gates(xp[base + b], g[b], prev[b], rh[b], n_tiles, f, f_alpha, f_beta, clip)
        _products(RECUR_N, g, rh, b0, b1, w_h, hidden, u0, u1, marker)
    for b in range(b0, b1):
        n_valid = _length(lengths, has_lengths, b, steps)
        if s >= n_valid:
            _copy(new[b], prev[b], lo, hi, lo)  # a finished sequence carries its state
            continue
        if lbr:
            _gates_after_reset(xp[base + b], g[b], b_hn, prev[b], new[b], u0, u1, f, f_alpha, f_beta, gc, g_alpha,
                               g_beta, clip)
        else:
            _candidate_and_state(xp[base + b], g[b], prev[b], new[b], n_tiles, gc, g_alpha, g_beta, clip)
        _copy(seq_out[_time_of(s, n_valid, reverse) * st + b * sb], new[b], lo, hi, col + lo)
    if s == steps - 1:
        for b in range(b0, b1):
            _copy(h_n[layer * directions + d, b], new[b], lo, hi, lo)


@kernel
def _layer_views(layer, d, marker, params, meta, x_addr, y_addr, ws, o_mid0, o_mid1, o_dirs, per_direction, steps,
                 batch, block_steps):
    """What a layer reads and writes, and direction d's weights and buffers."""
    layers = meta[META_LAYERS]
    hidden = meta[META_HIDDEN]
    width = meta[META_DIRECTIONS] * hidden
    rows = steps * batch
    if layer == 0:
        n_in = meta[META_INPUT]
        seq_in = carray(pointer(x_addr, marker), (rows, n_in))
    else:
        n_in = width
        seq_in = _layer_output(layer - 1, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker)
    seq_out = _layer_output(layer, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker)
    w_x, w_h, b_x, b_hn = _layer_weights(params, meta, layer, d)
    bufs = _direction_buffers(ws, o_dirs, per_direction, d, block_steps, batch, hidden)
    return seq_in, n_in, seq_out, w_x, w_h, b_x, b_hn, bufs


@kernel
def _layer_output(layer, layers, ws, o_mid0, o_mid1, rows, width, y_addr, marker):
    """Where a layer writes its sequence: y for the last layer, else one of two alternating buffers."""
    if layer == layers - 1:
        return carray(pointer(y_addr, marker), (rows, width))
    return _matrix(ws, o_mid0 if layer % 2 == 0 else o_mid1, rows, width)


@kernel
def _chunk_tiles(hidden, chunks, c):
    """Unit tiles [u0, u1) of chunk c: whole tiles, so chunks share no cache line."""
    tiles = padded_hidden(hidden) // UNITS
    return c * tiles // chunks, (c + 1) * tiles // chunks


@kernel
def _back_off(spins):
    """One round of a spin-wait: ``pause`` at first, then give the core away (the awaited thread may be
    descheduled on a busy machine, and spinning would keep it off the core)."""
    if spins < SPIN_PAUSES:
        spin_pause()
    else:
        yield_cpu()


# ---------------------------------------------------------------------------
# forward over whole sequences
# ---------------------------------------------------------------------------


def _make_worker(split):
    """A worker, with (``split`` True, for the parallel entry points) or without MODE_SPLIT.  ``split`` is
    a constant of the closure, so Numba prunes the branch before typing it: a serial first call does
    not compile a split step (a serial call never runs MODE_SPLIT)."""

    def worker(w, marker, params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major, h0_addr,
                lengths_addr, y_addr, h_n_addr, ws_addr, sync_addr, mode, chunks, block_steps, workers):
        """Everything one worker does in a forward call (worker 0 alone does it all in a serial call)."""
        meta = _meta(meta_addr)
        params = carray(pointer(params_addr, marker), (n_params,))
        layers = meta[META_LAYERS]
        directions = meta[META_DIRECTIONS]
        hidden = meta[META_HIDDEN]
        lbr = meta[META_LBR] != 0
        codes = meta[META_CODES : META_CODES + 4]
        acts = params[PARAM_ACT : PARAM_ACT + 8]
        clip = params[PARAM_CLIP]
        st = 1 if batch_major else batch
        sb = steps if batch_major else 1
        o_mid0, o_mid1, o_dirs, per_direction, end = workspace_layout(steps, batch, hidden, directions, layers,
                                                                      block_steps)
        ws = carray(pointer(ws_addr, marker), (end,))
        has_h0 = h0_addr != 0
        has_lengths = lengths_addr != 0
        lengths = carray(pointer(lengths_addr if has_lengths else meta_addr, np.int64(0)), (batch if has_lengths else 1,))
        h_n = carray(pointer(h_n_addr, marker), (layers * directions, batch, hidden))
        h0 = carray(pointer(h0_addr if has_h0 else h_n_addr, marker), (layers * directions, batch, hidden))
        reverse_only = meta[META_REVERSE] != 0

        if split and mode == MODE_SPLIT:  # ``split``: see _make_worker
            total = layers * steps
            done = sync_addr + 8 * LINE * SYNC_DONE  # items finished, all layers
            stolen = sync_addr + 8 * LINE * SYNC_STOLEN  # items a worker took from the other's chunk
            flags = sync_addr + 8 * LINE * (2 * layers + 1)  # flags[c * total + g]: item claimed
            own = w % chunks
            for g in range(total + 1):
                # Every item of the previous step (or layer) must be complete.  An item of that step nobody
                # has claimed by the time this worker finished its own belongs to a worker that is not
                # keeping up (still waking, descheduled, or not run at all): take it now.  Claimed items are
                # being computed: wait for them.  A late worker finds its items taken and rejoins at the
                # next step, so the two stay in step whenever both run, and one alone is never blocked.
                spins = 0
                while atomic_load(done) < g * chunks:
                    for c in range(chunks):
                        if g > 0 and atomic_cas(flags + 8 * (c * total + g - 1), 0, 1):
                            _split_item(g - 1, c, marker, params, meta, x_addr, y_addr, ws, o_mid0, o_mid1, o_dirs,
                                        per_direction, steps, batch, st, sb, lengths, has_lengths, reverse_only, h0,
                                        has_h0, h_n, block_steps, chunks, lbr, codes, acts, clip)
                            atomic_add(done, 1)
                            atomic_add(stolen, 1)
                    spins += 1
                    _back_off(spins)  # a thread sharing this core must be able to run
                if g < total and atomic_cas(flags + 8 * (own * total + g), 0, 1):
                    _split_item(g, own, marker, params, meta, x_addr, y_addr, ws, o_mid0, o_mid1, o_dirs,
                                per_direction, steps, batch, st, sb, lengths, has_lengths, reverse_only, h0, has_h0,
                                h_n, block_steps, chunks, lbr, codes, acts, clip)
                    atomic_add(done, 1)
            return

        units = directions * chunks
        tiles = padded_hidden(hidden) // UNITS
        for layer in range(layers):
            if layer > 0:
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
                    seq_in, n_in, seq_out, w_x, w_h, b_x, b_hn, bufs = _layer_views(
                        layer, d, marker, params, meta, x_addr, y_addr, ws, o_mid0, o_mid1, o_dirs, per_direction,
                        steps, batch, block_steps)
                    reverse = reverse_only or d == 1
                    _begin(layer, d, b0, b1, 0, tiles, steps, st, sb, lengths, has_lengths, h0, has_h0, seq_out, bufs[3:],
                           hidden, directions, marker)
                    for s in range(steps):
                        _advance(s, layer, d, b0, b1, 0, tiles, steps, st, sb, lengths, has_lengths, reverse, seq_in,
                                 n_in, seq_out, h0, has_h0, h_n, bufs, w_x, w_h, b_x, b_hn, block_steps, batch, hidden,
                                 directions, lbr, codes, acts, clip, marker)
                atomic_add(sync_addr + 8 * LINE * (2 * layer + 1), 1)

    worker.__name__ = worker.__qualname__ = f"_worker_{'split' if split else 'rows'}"  # distinct cache entries
    return kernel(worker)


@kernel
def _split_item(g, c, marker, params, meta, x_addr, y_addr, ws, o_mid0, o_mid1, o_dirs, per_direction, steps, batch,
                st, sb, lengths, has_lengths, reverse, h0, has_h0, h_n, block_steps, chunks, lbr, codes, acts, clip):
    """Item (global step g, chunk c) of MODE_SPLIT (one direction); g counts the steps of every layer."""
    hidden = meta[META_HIDDEN]
    layer = g // steps
    s = g % steps
    u0, u1 = _chunk_tiles(hidden, chunks, c)
    if u1 <= u0:
        return
    seq_in, n_in, seq_out, w_x, w_h, b_x, b_hn, bufs = _layer_views(
        layer, 0, marker, params, meta, x_addr, y_addr, ws, o_mid0, o_mid1, o_dirs, per_direction, steps, batch,
        block_steps)
    if s == 0:
        _begin(layer, 0, 0, batch, u0, u1, steps, st, sb, lengths, has_lengths, h0, has_h0, seq_out, bufs[3:], hidden,
               1, marker)
    _advance(s, layer, 0, 0, batch, u0, u1, steps, st, sb, lengths, has_lengths, reverse, seq_in, n_in, seq_out, h0,
             has_h0, h_n, bufs, w_x, w_h, b_x, b_hn, block_steps, batch, hidden, 1, lbr, codes, acts, clip, marker)


_worker_rows = _make_worker(False)
_worker_split = _make_worker(True)


@kernel
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
    split = parallel  # a bool of the closure (it keys the cache entry stably): the serial entry never splits

    def forward(params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major, h0_addr, lengths_addr,
                y_addr, h_n_addr, ws_addr, sync_addr, mode, chunks, block_steps, workers):
        """Run every layer: ``workers`` workers share the call (see the module docstring)."""
        marker = float_type(0)
        _reset_sync(meta_addr, sync_addr, steps, mode, chunks)
        for w in loop(workers):
            if split:
                _worker_split(w, marker, params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major,
                              h0_addr, lengths_addr, y_addr, h_n_addr, ws_addr, sync_addr, mode, chunks,
                              block_steps, workers)
            else:
                _worker_rows(w, marker, params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major,
                             h0_addr, lengths_addr, y_addr, h_n_addr, ws_addr, sync_addr, mode, chunks,
                             block_steps, workers)

    name = f"forward_{'parallel' if parallel else 'serial'}_{np.dtype(dtype).name}"
    forward.__name__ = forward.__qualname__ = name
    return njit(**(PARALLEL_JIT if parallel else JIT))(forward)


FORWARD = {(np.dtype(dtype), parallel): _make_forward(parallel, dtype)
           for dtype in (np.float32, np.float64) for parallel in (False, True)}
"""The forward entry points by (dtype, parallel)."""
