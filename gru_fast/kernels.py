"""Numba kernels: the GRU recurrence over preallocated buffers.

The cell is the GRU of Cho et al. (2014) as the ONNX GRU operator writes it,
gates ordered (z, r, n)::

    z  = f(x W_z^T + h R_z^T + b_z)                  b_z = Wb_z + Rb_z (pre-summed)
    r  = f(x W_r^T + h R_r^T + b_r)                  b_r = Wb_r + Rb_r (pre-summed)
    n  = g(x W_n^T + Wb_n + r * (h R_n^T + Rb_n))    linear_before_reset = 1 (PyTorch)
    n  = g(x W_n^T + (r * h) R_n^T + Wb_n + Rb_n)    linear_before_reset = 0 (ONNX default)
    h' = (1 - z) * n + z * h

with an optional clip of every pre-activation to [-clip, clip].  :func:`_make_cell` writes these
equations once, lane by lane for one unit tile; the cell is made for sigmoid and tanh, the GRU's own,
and for any ONNX activation (:data:`_CELLS`).  In float32 with sigmoid and tanh, :mod:`gru_fast._cell`
computes the same operations 16 lanes at a time in LLVM IR.  The parity tests (tests/test_parity_torch.py,
tests/test_parity_onnx.py) pin the kernels to PyTorch's nn.GRU and to ONNX Runtime's GRU.

Records
    The entry point (:data:`FORWARD`) takes one integer: the address of the call's argument block
    (:data:`gru_fast._layout.ARGS`: addresses and sizes).  :func:`_records` turns it, in one place, into
    two records that every other function takes: :data:`Config` (sizes, flags, strides, how the call is shared) and
    :data:`Run` (views of the inputs, outputs, weights and workspace).  :func:`_layer` gives the
    :data:`Layer` record of one (layer, direction): what it reads and writes, its weights, buffers and
    activations.  The layout of all of it is :mod:`gru_fast._layout`'s.  The views own no memory
    (:func:`gru_fast._memory.array_at`), so the functions are compiled without the runtime's reference
    counts (:func:`gru_fast._jit.kernel`).

Matrix products
    ``c += a @ W`` for one, two, four or (float32, bfloat16) eight rows ``a``, by the LLVM-IR micro-kernels of
    :mod:`gru_fast._tiles` (accumulators in registers).  No BLAS is called, so no second thread pool
    competes for the cores, and every output element is the same chain of fused multiply-adds
    whichever thread, row group or unit range computes it: serial and parallel runs agree bit for bit.

Input projection
    ``x W^T + b`` is computed ahead of the recurrence in blocks of ``block_steps`` time steps into the
    workspace (a block stays in cache until the recurrence reads it).

State
    Each direction keeps two padded state rows per sequence, written on alternate steps (step s reads
    ``states[(s + 1) % 2]`` and writes ``states[s % 2]``), so threads that each write part of a step
    never overwrite what another still reads.  Finished sequences (step >= length) carry their state
    forward; y is 0 at their padded steps.

Two ways to share a call between threads
    ``MODE_ROWS``: *units* of (direction, slice of batch rows) are independent for a whole layer: each
    worker claims units from an atomic counter and runs every time step of its rows.  Layers follow
    each other: a worker waits until every unit of the previous layer is done.
    ``MODE_SPLIT``: one sequence (B smaller than the thread count) has no independent rows to hand
    out, so the unit tiles are split into ``chunks`` ranges, and *items* (step, chunk) are claimed
    through compare-and-swap flags.  A worker runs its own chunk of each step after the previous step
    is complete (an atomic counter of finished items).  An item still unclaimed when the other worker
    has finished its own is taken over by that worker at once (its owner is still waking, descheduled
    on a busy machine, or not run at all); the late worker finds its item taken and rejoins at the
    next step.  So the scheme cannot deadlock, never depends on how many threads actually run, a lone
    worker is never kept waiting, and two workers stay in step whenever both run.  Used for
    linear_before_reset=1, where a step is one product per chunk.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._config import JIT, PARALLEL_JIT
from ._jit import kernel
from ._layout import (ARGS, GROUP_COLUMNS, LINE, META_CODES, META_DIRECTIONS, META_HIDDEN, META_INPUT, META_LAYERS,
                      META_LBR, META_OFFSETS, META_REVERSE, MODE_ROWS, MODE_SPLIT, OFFSET_BHN, OFFSET_BX,
                      OFFSET_R, OFFSET_W, OFFSETS_PER_BLOCK, PARAM_ACT, PARAM_CLIP, SYNC_DONE, SYNC_STOLEN, UNITS,
                      WEIGHTS, direction_offsets, padded_hidden, sync_slots, workspace_layout)
from ._math import SIGMOID, TANH, activation, clipped, like, sigmoid, tanh
from ._memory import array_at, atomic_add, atomic_cas, atomic_load, spin_pause, yield_cpu
from . import _tiles
from ._cell import cell_reset, cell_update, cell_whole

__all__ = ["FORWARD", "WEIGHTS", "MODE_ROWS", "MODE_SPLIT"]

WEIGHT_BLOCK_BYTES = 256 << 10  # weights a product over many rows keeps in the L2 cache at a time
SPIN_PAUSES = 1024  # a waiting worker spins with ``pause`` (~40 ns each) this long, then yields its core

Config = namedtuple("Config", [
    "layers", "directions", "hidden", "hidden_padded", "input_size",
    "lbr",  # linear_before_reset
    "reverse",  # the single direction runs backwards (ONNX "reverse"); direction 1 always does
    "clip",  # 0: none
    "steps", "batch",
    "step_stride", "row_stride",  # rows of x and y between steps, between sequences
    "has_h0", "has_lengths",
    "mode", "chunks", "block_steps",
    "weights",  # a zero of the type W and R are stored in: the float type, or uint16 for bfloat16
    "directions_at", "direction_size",  # where the directions' buffers start in the workspace, and their size
])
"""Sizes and choices of one call, fixed for its duration."""

Run = namedtuple("Run", [
    "x",  # (steps * batch, input_size)
    "y",  # (steps * batch, directions * hidden)
    "mid0", "mid1",  # (steps * batch, directions * hidden): layer l < layers - 1 writes mid0 (l even) or mid1
    "h0", "h_n",  # (layers * directions, batch, hidden); h0 has 0 rows without h0
    "lengths",  # (batch,) int64; empty without lengths
    "params", "meta",  # the packed model (gru_fast._layout)
    "workspace",
    "sync",  # address of the int64 counters and claim flags
])
"""Every array of one call, as views."""

Layer = namedtuple("Layer", [
    "index",  # layer * directions + direction: its row of h0 and h_n
    "reverse",
    "seq_in", "input_size", "seq_out",
    "column",  # of its hidden units in seq_out's rows
    "w_x", "w_h",  # addresses of packed W and R
    "b_x", "b_hn",  # (3 * hidden_padded,), (hidden_padded,)
    "xp",  # projected inputs of a block of steps, (block_steps * batch, 3 * hidden_padded)
    "hr",  # recurrent products h R^T, (batch, 3 * hidden_padded)
    "rh",  # r * h (linear_before_reset=0), (batch, hidden_padded)
    "states",  # two (batch, hidden_padded) state rows: step s writes states[s % 2]
    "f", "g",  # activations: (code, alpha, beta)
])
"""One (layer, direction): what it reads and writes, its weights, buffers and activations."""


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------


@kernel(inline=True)
def _matrix(base, start, rows, cols):
    """``base[start : start + rows * cols]`` as a (rows, cols) view.  A view by address, not ``reshape``: a reshape
    carries a shape-mismatch error path whose message formatting costs a second of compile time."""
    return array_at(base.ctypes.data + start * base.itemsize, base[0], (rows, cols))  # base[0]: its type


N_ARGS = len(ARGS)
assert N_ARGS == 17, "_arguments reads ARGS's fields one by one"


@kernel(inline=True)
def _arguments(args):
    """The fields of the argument block at address ``args``, in gru_fast._layout.ARGS's order."""
    a = array_at(args, np.int64(0), (N_ARGS,))
    return (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15],
            a[16])


@kernel(inline=True)
def _records(markers, args):
    """The argument block at address ``args`` as (Config, Run): the one place raw addresses become views.
    ``markers``: zeros of the float type and of the weights' storage type."""
    marker, weights = markers
    (params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major, h0_addr, lengths_addr, y_addr, h_n_addr,
     ws_addr, sync_addr, mode, chunks, block_steps, _) = _arguments(args)
    head = array_at(meta_addr, np.int64(0), (META_OFFSETS,))
    layers, directions, hidden = head[META_LAYERS], head[META_DIRECTIONS], head[META_HIDDEN]
    meta = array_at(meta_addr, np.int64(0), (META_OFFSETS + OFFSETS_PER_BLOCK * layers * directions,))
    params = array_at(params_addr, marker, (n_params,))
    o_mid0, o_mid1, o_dirs, per_direction, end = workspace_layout(steps, batch, hidden, directions, layers,
                                                                  block_steps)
    cfg = Config(layers, directions, hidden, padded_hidden(hidden), meta[META_INPUT], meta[META_LBR] != 0,
                 meta[META_REVERSE] != 0, params[PARAM_CLIP], steps, batch, 1 if batch_major else batch,
                 steps if batch_major else 1, h0_addr != 0, lengths_addr != 0, mode, chunks, block_steps,
                 weights, o_dirs, per_direction)
    workspace = array_at(ws_addr, marker, (end,))
    rows, width = steps * batch, directions * hidden
    state_shape = (layers * directions, batch, hidden)
    run = Run(array_at(x_addr, marker, (rows, cfg.input_size)), array_at(y_addr, marker, (rows, width)),
              _matrix(workspace, o_mid0, rows if layers > 1 else 0, width),
              _matrix(workspace, o_mid1, rows if layers > 2 else 0, width),
              array_at(h0_addr, marker, state_shape if h0_addr != 0 else (0, batch, hidden)),
              array_at(h_n_addr, marker, state_shape),
              array_at(lengths_addr, np.int64(0), (batch if lengths_addr != 0 else 0,)),
              params, meta, workspace, sync_addr)
    return cfg, run


@kernel(inline=True)
def _mid(run, layer):
    """Where layer ``layer`` (not the last) writes its sequence."""
    return run.mid0 if layer % 2 == 0 else run.mid1


@kernel(inline=True)
def _layer(cfg, run, layer, d):
    """The Layer record of (layer, direction d)."""
    index = layer * cfg.directions + d
    last = cfg.layers - 1
    seq_in = run.x if layer == 0 else _mid(run, layer - 1)
    seq_out = run.y if layer == last else _mid(run, layer)
    input_size = cfg.input_size if layer == 0 else cfg.directions * cfg.hidden
    offsets = META_OFFSETS + OFFSETS_PER_BLOCK * index
    params, meta = run.params, run.meta
    o_bx, o_bhn = meta[offsets + OFFSET_BX], meta[offsets + OFFSET_BHN]
    hp = cfg.hidden_padded
    o_xp, o_hr, o_rh, o_state0, o_state1 = direction_offsets(cfg.directions_at + d * cfg.direction_size,
                                                             cfg.block_steps, cfg.batch, cfg.hidden)
    ws, batch = run.workspace, cfg.batch
    acts = PARAM_ACT + 4 * d
    return Layer(index, cfg.reverse or d == 1, seq_in, input_size, seq_out, d * cfg.hidden,
                 params.ctypes.data + params.itemsize * meta[offsets + OFFSET_W],
                 params.ctypes.data + params.itemsize * meta[offsets + OFFSET_R],
                 params[o_bx : o_bx + 3 * hp], params[o_bhn : o_bhn + hp],
                 _matrix(ws, o_xp, cfg.block_steps * batch, 3 * hp), _matrix(ws, o_hr, batch, 3 * hp),
                 _matrix(ws, o_rh, batch, hp), (_matrix(ws, o_state0, batch, hp), _matrix(ws, o_state1, batch, hp)),
                 (meta[META_CODES + 2 * d], params[acts], params[acts + 1]),
                 (meta[META_CODES + 2 * d + 1], params[acts + 2], params[acts + 3]))


@kernel(inline=True)
def _length(cfg, run, b):
    """Valid steps of sequence b."""
    return run.lengths[b] if cfg.has_lengths else cfg.steps


@kernel(inline=True)
def _time_of(s, n_valid, reverse):
    """The time index of step s of a sequence of n_valid steps (a reverse direction starts at its end)."""
    if s >= n_valid:
        return 0  # a finished row: any valid row index, its results are never used
    return n_valid - 1 - s if reverse else s


@kernel(inline=True)
def _copy(dst, src, lo, hi, at):
    """dst[at : at + hi - lo] = src[lo:hi] as a loop: a slice assignment carries a shape-mismatch error
    path whose message formatting costs about a second of compile time."""
    for j in range(hi - lo):
        dst[at + j] = src[lo + j]


# ---------------------------------------------------------------------------
# products
# ---------------------------------------------------------------------------

# what a product computes (gru_fast._tiles): x W^T + b_x, h R^T, h R_zr^T, (r * h) R_n^T
PROJECT, RECUR, RECUR_ZR, RECUR_N = 0, 1, 2, 3


def _micro(kind, rows, c, a, w, w_offset, bias, k, n, marker, weights):
    """The micro-kernel of ``kind`` for ``rows`` of the eight (c, a) row addresses (gru_fast._tiles): 1, 2
    or 4, and where :func:`_most_rows` is eight also 3, 6 or 8, for weights stored as ``weights``' type,
    ``w_offset`` weights past address ``w`` (bfloat16: counted as K rows, stored in k pairs).  Typed by
    ``weights``: float and bfloat16 models each compile only their own kernels."""
    raise NotImplementedError("call from a Numba kernel")


def _most_rows(weights):
    """The most rows of a product pass for weights stored as ``weights``' type: eight for float32 and
    bfloat16, four for float64 (eight rows' 24 accumulators of 16 doubles would not stay in registers)."""
    raise NotImplementedError("call from a Numba kernel")


@overload(_most_rows, jit_options=dict(JIT, inline="always"))
def _most_rows_overload(weights):
    most = 4 if weights == types.float64 else 8
    return lambda weights: most


def _kernels_of(rows, weights):
    """The (PROJECT, RECUR, RECUR_ZR, RECUR_N) micro-kernels of gru_fast._tiles for ``rows`` rows."""
    suffix = "_bf16" if weights == "bfloat16" else ""
    return tuple(getattr(_tiles, f"{name}{rows}{kind}{suffix}")
                 for name, kind in (("project", ""), ("recur", "_all"), ("recur", "_zr"), ("recur", "_n")))


@overload(_micro, jit_options=dict(JIT, inline="always"))
def _micro_overload(kind, rows, c, a, w, w_offset, bias, k, n, marker, weights):
    if isinstance(weights, types.Float):
        pairs, itemsize, stored = False, weights.bitwidth // 8, "float"
    elif weights == types.uint16:
        pairs, itemsize, stored = True, 4, "bfloat16"  # bfloat16 in k pairs (gru_fast._bf16.pack_bf16): 4-byte words
    else:
        return None
    p1, all1, zr1, n1 = _kernels_of(1, stored)
    p2, all2, zr2, n2 = _kernels_of(2, stored)
    p4, all4, zr4, n4 = _kernels_of(4, stored)

    @njit(**JIT, inline="always")
    def at_most_four(kind, rows, c, a, at, bias, k, n, marker):
        c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
        a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
        if rows == 4:
            if kind == PROJECT:
                p4(c0, c1, c2, c3, a0, a1, a2, a3, at, bias, k, n, marker)
            elif kind == RECUR:
                all4(c0, c1, c2, c3, a0, a1, a2, a3, at, bias, k, n, marker)
            elif kind == RECUR_ZR:
                zr4(c0, c1, c2, c3, a0, a1, a2, a3, at, bias, k, n, marker)
            else:
                n4(c0, c1, c2, c3, a0, a1, a2, a3, at, bias, k, n, marker)
        elif rows == 2:
            if kind == PROJECT:
                p2(c0, c1, a0, a1, at, bias, k, n, marker)
            elif kind == RECUR:
                all2(c0, c1, a0, a1, at, bias, k, n, marker)
            elif kind == RECUR_ZR:
                zr2(c0, c1, a0, a1, at, bias, k, n, marker)
            else:
                n2(c0, c1, a0, a1, at, bias, k, n, marker)
        elif kind == PROJECT:
            p1(c0, a0, at, bias, k, n, marker)
        elif kind == RECUR:
            all1(c0, a0, at, bias, k, n, marker)
        elif kind == RECUR_ZR:
            zr1(c0, a0, at, bias, k, n, marker)
        else:
            n1(c0, a0, at, bias, k, n, marker)

    @njit(**JIT, inline="always")
    def weights_at(w, w_offset, k):
        if pairs:  # w_offset = 48 * u0 * k values: u0 groups of ceil(k / 2) rows of 48 words
            return w + (w_offset // k) * ((k + 1) // 2) * itemsize if k > 0 else w
        return w + w_offset * itemsize

    if weights == types.float64:
        def micro(kind, rows, c, a, w, w_offset, bias, k, n, marker, weights):
            at_most_four(kind, rows, c, a, weights_at(w, w_offset, k), bias, k, n, marker)

        return micro
    p3, all3, zr3, n3 = _kernels_of(3, stored)
    p6, all6, zr6, n6 = _kernels_of(6, stored)
    p8, all8, zr8, n8 = _kernels_of(8, stored)

    @njit(**JIT, inline="always")
    def three(kind, c, a, at, bias, k, n, marker):
        if kind == PROJECT:
            p3(c[0], c[1], c[2], a[0], a[1], a[2], at, bias, k, n, marker)
        elif kind == RECUR:
            all3(c[0], c[1], c[2], a[0], a[1], a[2], at, bias, k, n, marker)
        elif kind == RECUR_ZR:
            zr3(c[0], c[1], c[2], a[0], a[1], a[2], at, bias, k, n, marker)
        else:
            n3(c[0], c[1], c[2], a[0], a[1], a[2], at, bias, k, n, marker)

    @njit(**JIT, inline="always")
    def six(kind, c, a, at, bias, k, n, marker):
        if kind == PROJECT:
            p6(c[0], c[1], c[2], c[3], c[4], c[5], a[0], a[1], a[2], a[3], a[4], a[5], at, bias, k, n, marker)
        elif kind == RECUR:
            all6(c[0], c[1], c[2], c[3], c[4], c[5], a[0], a[1], a[2], a[3], a[4], a[5], at, bias, k, n, marker)
        elif kind == RECUR_ZR:
            zr6(c[0], c[1], c[2], c[3], c[4], c[5], a[0], a[1], a[2], a[3], a[4], a[5], at, bias, k, n, marker)
        else:
            n6(c[0], c[1], c[2], c[3], c[4], c[5], a[0], a[1], a[2], a[3], a[4], a[5], at, bias, k, n, marker)

    def micro_eight(kind, rows, c, a, w, w_offset, bias, k, n, marker, weights):
        at = weights_at(w, w_offset, k)
        if rows == 3:
            three(kind, c, a, at, bias, k, n, marker)
        elif rows == 6:
            six(kind, c, a, at, bias, k, n, marker)
        elif rows != 8:
            at_most_four(kind, rows, c, a, at, bias, k, n, marker)
        elif kind == PROJECT:
            p8(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], at, bias,
               k, n, marker)
        elif kind == RECUR:
            all8(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], at,
                 bias, k, n, marker)
        elif kind == RECUR_ZR:
            zr8(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], at,
                bias, k, n, marker)
        else:
            n8(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], at, bias,
               k, n, marker)

    return micro_eight


@kernel
def _gemm(kind, rows, c, a, w, bias, k, u0, u1, weights, marker):
    """Product ``kind`` into rows c[m][48*u0 : 48*u1] from rows a[m] (K = k values), for ``rows`` (1, 2, 3,
    4, 6 or 8: :func:`_rows_per_pass`) of the eight (c, a) pairs, given as the rows' addresses (every
    array passed to a compiled function costs a reference-count call on the way in and one on the way
    out); ``bias`` the bias row's address; W stored as ``weights``' type, the rows as ``marker``'s."""
    n = u1 - u0
    if n <= 0:
        return
    at = GROUP_COLUMNS * u0 * _value_bytes(marker)
    _micro(kind, rows, (c[0] + at, c[1] + at, c[2] + at, c[3] + at, c[4] + at, c[5] + at, c[6] + at, c[7] + at), a,
           w, GROUP_COLUMNS * u0 * k, bias + at, k, n, marker, weights)  # group u0 starts after u0 groups of K rows


@kernel(inline=True)
def _row_at(m, r):
    """Address of row r of a 2-D array."""
    return m.ctypes.data + r * m.strides[0]


@kernel(inline=True)
def _rows_per_pass(left, weights):
    """Rows of the next product pass with ``left`` rows to go: eight while seven or more are left, six for
    five or six, else all of them; up to four with float64 (:func:`_most_rows`), where three rows take a
    four-row pass.  A pass over fewer rows than its kernel's repeats the last row (see :func:`_eight_of`).
    Measured on one core here (float32, H=256; gru_fast._tiles): one row runs 31.5 GMAC/s, two 57, three
    76, four 86, six 87, eight 86, so a kernel per row count up to four, and six for five or six rows:
    as a pass of the next size up three rows ran 64.5 GMAC/s (four rows' time), six 65 (eight rows'),
    five 54 in an eight-row pass against 72.5 in a six-row one; seven take an eight-row pass (75)."""
    if left <= 2:
        return left
    if _most_rows(weights) == 4:
        return 4
    if left <= 4:
        return left
    return 6 if left <= 6 else 8


@kernel(inline=True)
def _eight_of(n, i):
    """Rows i..i+7 for a product pass (the first :func:`_rows_per_pass` of them used); past
    the last of n rows, the last one again: a repeated row computes the same values into the same place."""
    last = n - 1
    return (min(i, last), min(i + 1, last), min(i + 2, last), min(i + 3, last), min(i + 4, last), min(i + 5, last),
            min(i + 6, last), min(i + 7, last))


@kernel
def _project(cfg, run, lv, block_start, block_end, b0, b1, u0, u1):
    """xp[(s - block_start) * B + b, tiles u0..u1] = x_row(s, b) @ W + b_x for steps s in
    [block_start, block_end) and rows b in [b0, b1), up to eight (step, row) pairs at a time
    (:func:`_rows_per_pass`), block by block of unit tiles when there are more than eight (see
    :func:`_products`)."""
    rows = b1 - b0
    n = (block_end - block_start) * rows
    block = u1 - u0 if n <= 8 else _group_block(lv.input_size, cfg.weights)
    for g0 in range(u0, u1, block):
        g1 = min(u1, g0 + block)
        i = 0
        while i < n:
            count = _rows_per_pass(n - i, cfg.weights)
            i0, i1, i2, i3, i4, i5, i6, i7 = _eight_of(n, i)
            c = (_row_at(lv.xp, _xp_row(cfg, i0, b0, rows)), _row_at(lv.xp, _xp_row(cfg, i1, b0, rows)),
                 _row_at(lv.xp, _xp_row(cfg, i2, b0, rows)), _row_at(lv.xp, _xp_row(cfg, i3, b0, rows)),
                 _row_at(lv.xp, _xp_row(cfg, i4, b0, rows)), _row_at(lv.xp, _xp_row(cfg, i5, b0, rows)),
                 _row_at(lv.xp, _xp_row(cfg, i6, b0, rows)), _row_at(lv.xp, _xp_row(cfg, i7, b0, rows)))
            a = (_input_row(cfg, run, lv, i0, block_start, b0, rows),
                 _input_row(cfg, run, lv, i1, block_start, b0, rows),
                 _input_row(cfg, run, lv, i2, block_start, b0, rows),
                 _input_row(cfg, run, lv, i3, block_start, b0, rows),
                 _input_row(cfg, run, lv, i4, block_start, b0, rows),
                 _input_row(cfg, run, lv, i5, block_start, b0, rows),
                 _input_row(cfg, run, lv, i6, block_start, b0, rows),
                 _input_row(cfg, run, lv, i7, block_start, b0, rows))
            _gemm(PROJECT, count, c, a, lv.w_x, lv.b_x.ctypes.data, lv.input_size, g0, g1, cfg.weights, cfg.clip)
            i += count


@kernel(inline=True)
def _xp_row(cfg, i, b0, rows):
    """Row of xp holding pair i of a block: (step i // rows of the block, batch row b0 + i % rows)."""
    return (i // rows) * cfg.batch + b0 + i % rows


@kernel(inline=True)
def _input_row(cfg, run, lv, i, block_start, b0, rows):
    """Address of the input row of pair i of a block (see _xp_row)."""
    s = block_start + i // rows
    b = b0 + i % rows
    return _row_at(lv.seq_in, _time_of(s, _length(cfg, run, b), lv.reverse) * cfg.step_stride + b * cfg.row_stride)


def _value_bytes(marker):
    """Bytes of a value of ``marker``'s type: a float's size; 2 for a weight stored as bfloat16 (uint16,
    in pairs)."""
    raise NotImplementedError("call from a Numba kernel")


@overload(_value_bytes, jit_options=dict(JIT, inline="always"))
def _value_bytes_overload(marker):
    size = 2 if marker == types.uint16 else marker.bitwidth // 8
    return lambda marker: size


@kernel(inline=True)
def _group_block(k, weights):
    """Unit tiles whose weights (k rows of 48 each) fit in WEIGHT_BLOCK_BYTES: a product over more rows
    than one pass takes runs block by block, so the rows' passes reuse a block from the L2 cache instead
    of streaming all the weights again per pass (an H=512 R is 3 MiB)."""
    return max(1, WEIGHT_BLOCK_BYTES // max(1, k * GROUP_COLUMNS * _value_bytes(weights)))


@kernel
def _products(kind, hr, rows_in, b0, b1, w, k, u0, u1, weights):
    """hr[b, the kind's tiles of unit tiles u0..u1] = rows_in[b] @ R for rows b0..b1, up to eight at a time
    (RECUR: all three gates, RECUR_ZR: z and r, RECUR_N: n; the other columns are left alone).  Over more
    than eight rows, block by block of unit tiles (:func:`_group_block`); every output element is the same
    chain of multiply-adds either way."""
    block = u1 - u0 if b1 - b0 <= 8 else _group_block(k, weights)
    for g0 in range(u0, u1, block):
        g1 = min(u1, g0 + block)
        b = b0
        while b < b1:
            count = _rows_per_pass(b1 - b, weights)
            i0, i1, i2, i3, i4, i5, i6, i7 = _eight_of(b1 - b, 0)
            r0, r1, r2, r3, r4, r5, r6, r7 = b + i0, b + i1, b + i2, b + i3, b + i4, b + i5, b + i6, b + i7
            _gemm(kind, count, (_row_at(hr, r0), _row_at(hr, r1), _row_at(hr, r2), _row_at(hr, r3), _row_at(hr, r4),
                                _row_at(hr, r5), _row_at(hr, r6), _row_at(hr, r7)),
                  (_row_at(rows_in, r0), _row_at(rows_in, r1), _row_at(rows_in, r2), _row_at(rows_in, r3),
                   _row_at(rows_in, r4), _row_at(rows_in, r5), _row_at(rows_in, r6), _row_at(rows_in, r7)), w,
                  _row_at(hr, r0), k, g0, g1, weights, hr[0, 0])  # no bias; hr[0, 0]: only its type is used
            b += count


# ---------------------------------------------------------------------------
# the cell, one unit tile (16 units, 48 columns) at a time
# ---------------------------------------------------------------------------


@kernel(inline=True)
def _unit_tiles(row, u0, u1, width):
    """Unit tiles u0..u1 of a row as a (tiles, width, 16) view (width 3: xp, hr; 1: states, b_hn, rh).

    Views indexed from 0 by loop counters: with ``range(lo, hi)`` or a slice per tile, Numba must allow
    a negative index (the wrap-around select stops LLVM from vectorising) or builds a view per tile (at
    B=64 that cost a fifth of the call)."""
    start = row.ctypes.data + width * UNITS * u0 * row.itemsize
    return array_at(start, row[0], (u1 - u0, width, UNITS))  # row[0]: only its type is used


@njit(**JIT, inline="always")
def _sigmoid(x, act):
    return sigmoid(x)


@njit(**JIT, inline="always")
def _tanh(x, act):
    return tanh(x)


@kernel
def _any(x, act):
    """Any ONNX activation of one value: compiled once and called per value.  Inlined, its eleven cases at
    every use in the cell cost LLVM several seconds of compile; activations other than sigmoid and tanh
    are rare (Keras 2's hard sigmoid is the common one), and run about 1.6x slower this way."""
    return activation(x, act[0], act[1], act[2])


def _make_cell(f, g):
    """The cell for activations ``f`` (z, r) and ``g`` (n), each ``(value, (code, alpha, beta)) -> value``:
    the equations of the module docstring for one unit tile u, one lane at a time with every value in a
    register and one store per lane, so each loop vectorises.  Made twice (:data:`_CELLS`): with sigmoid
    and tanh called directly, the GRU's own (float64 runs it; float32 runs gru_fast._cell's kernels, which
    compute the same bits); and with any ONNX activation chosen per value.

    * ``whole``, linear_before_reset=1: hr3 holds h R^T of all three gates; writes h';
    * ``reset``, linear_before_reset=0, before the n product: leaves z in hr3's z tile and r * h in rh3;
    * ``update``, linear_before_reset=0, after it: hr3's n tile holds (r * h) R_n^T; writes h'.
    """

    @njit(**JIT, inline="always")
    def gate(pre, act, clip):
        return f(clipped(pre, clip), act)

    @njit(**JIT, inline="always")
    def candidate(pre, act, clip):
        return g(clipped(pre, clip), act)

    @njit(**JIT, inline="always")
    def blend(z, n, h):
        return (like(h, 1.0) - z) * n + z * h

    @njit(**JIT, inline="always")
    def whole(x3, hr3, b_hn3, h_prev3, h_new3, u, f_act, g_act, clip):
        for j in range(UNITS):
            z = gate(x3[u, 0, j] + hr3[u, 0, j], f_act, clip)
            r = gate(x3[u, 1, j] + hr3[u, 1, j], f_act, clip)
            n = candidate(x3[u, 2, j] + r * (hr3[u, 2, j] + b_hn3[u, 0, j]), g_act, clip)
            h_new3[u, 0, j] = blend(z, n, h_prev3[u, 0, j])

    @njit(**JIT, inline="always")
    def reset(x3, hr3, h_prev3, rh3, u, f_act, clip):
        for j in range(UNITS):
            z = gate(x3[u, 0, j] + hr3[u, 0, j], f_act, clip)
            r = gate(x3[u, 1, j] + hr3[u, 1, j], f_act, clip)
            hr3[u, 0, j] = z
            rh3[u, 0, j] = r * h_prev3[u, 0, j]

    @njit(**JIT, inline="always")
    def update(x3, hr3, h_prev3, h_new3, u, g_act, clip):
        for j in range(UNITS):
            n = candidate(x3[u, 2, j] + hr3[u, 2, j], g_act, clip)
            h_new3[u, 0, j] = blend(hr3[u, 0, j], n, h_prev3[u, 0, j])

    return whole, reset, update


_CELLS = (_make_cell(_sigmoid, _tanh), _make_cell(_any, _any))
(_whole_fast, _reset_fast, _update_fast), (_whole_any, _reset_any, _update_any) = _CELLS


def _vector_cell(part, x, hr, b_hn, h_prev, out, n, clip):
    """``part`` of the sigmoid/tanh cell over n unit tiles by gru_fast._cell's 16-lane kernels (addresses
    of the tiles' rows); returns whether it ran: float32 only, a float64 cell runs the Numba loops."""
    raise NotImplementedError("call from a Numba kernel")


@overload(_vector_cell, jit_options=dict(JIT, inline="always"))
def _vector_cell_overload(part, x, hr, b_hn, h_prev, out, n, clip):
    if clip != types.float32:
        return lambda part, x, hr, b_hn, h_prev, out, n, clip: False

    def run(part, x, hr, b_hn, h_prev, out, n, clip):
        if part == 0:
            cell_whole(x, hr, b_hn, h_prev, out, n, clip)
        elif part == 1:
            cell_reset(x, hr, h_prev, out, n, clip)
        else:
            cell_update(x, hr, h_prev, out, n, clip)
        return True

    return run


@kernel
def _cell_rows(x_rows, hr, h_prev, h_new, rh, b_hn, b0, b1, u0, u1, part, f, g, clip):
    """``part`` (0: whole, 1: reset, 2: update; see :func:`_make_cell`) of the cell for rows b0..b1 of
    unit tiles u0..u1: with sigmoid and tanh in float32, gru_fast._cell's kernels (the same bits as the
    cell made for them, in half the time); otherwise the cell made for ``f`` and ``g`` (sigmoid and tanh,
    or any)."""
    fast = f[0] == SIGMOID and g[0] == TANH
    b_hn3 = _unit_tiles(b_hn, u0, u1, 1)
    for b in range(b0, b1):
        x3, hr3 = _unit_tiles(x_rows[b], u0, u1, 3), _unit_tiles(hr[b], u0, u1, 3)
        h_prev3, out3 = _unit_tiles(h_prev[b], u0, u1, 1), _unit_tiles((rh if part == 1 else h_new)[b], u0, u1, 1)
        if fast and _vector_cell(part, x3.ctypes.data, hr3.ctypes.data, b_hn3.ctypes.data, h_prev3.ctypes.data,
                                 out3.ctypes.data, u1 - u0, clip):
            continue
        for u in range(u1 - u0):
            if part == 0:
                if fast:
                    _whole_fast(x3, hr3, b_hn3, h_prev3, out3, u, f, g, clip)
                else:
                    _whole_any(x3, hr3, b_hn3, h_prev3, out3, u, f, g, clip)
            elif part == 1:
                if fast:
                    _reset_fast(x3, hr3, h_prev3, out3, u, f, clip)
                else:
                    _reset_any(x3, hr3, h_prev3, out3, u, f, clip)
            elif fast:
                _update_fast(x3, hr3, h_prev3, out3, u, g, clip)
            else:
                _update_any(x3, hr3, h_prev3, out3, u, g, clip)


# ---------------------------------------------------------------------------
# one layer and direction, for batch rows b0..b1 and unit tiles u0..u1
# ---------------------------------------------------------------------------


@kernel
def _begin(cfg, run, lv, b0, b1, u0, u1):
    """Before step 0: the state rows read by step 0 hold h0 (or zeros) for these units; y is 0 at every
    padded step of these rows (PackedSequence)."""
    lo, hi = UNITS * u0, min(UNITS * u1, cfg.hidden)
    zero = like(cfg.clip, 0.0)
    before = lv.states[1]  # step 0 reads states[(0 + 1) % 2]
    for b in range(b0, b1):
        if cfg.has_h0:
            _copy(before[b], run.h0[lv.index, b], lo, hi, lo)
        else:
            before[b, lo:hi] = zero
        for t in range(_length(cfg, run, b), cfg.steps):
            lv.seq_out[t * cfg.step_stride + b * cfg.row_stride, lv.column + lo : lv.column + hi] = zero


@kernel
def _advance(cfg, run, lv, s, b0, b1, u0, u1):
    """Step s of rows b0..b1, unit tiles u0..u1: project a new block of steps when s starts one, then the
    recurrent product and the gates; write y, the state rows of step s and, after the last step, h_n."""
    block_start = s - s % cfg.block_steps
    if s == block_start:
        _project(cfg, run, lv, block_start, min(cfg.steps, block_start + cfg.block_steps), b0, b1, u0, u1)
    prev, new = lv.states[(s + 1) % 2], lv.states[s % 2]
    # The product reads the H real units of h_{s-1}: the previous state rows, but at step 0 h0 itself
    # (another thread may still be copying its units of h0 into the state rows); zero without h0.
    lo, hi = UNITS * u0, min(UNITS * u1, cfg.hidden)
    hr = lv.hr
    if s == 0 and not cfg.has_h0:
        hr[b0:b1, GROUP_COLUMNS * u0 : GROUP_COLUMNS * u1] = like(cfg.clip, 0.0)
    else:
        _products(RECUR if cfg.lbr else RECUR_ZR, hr, run.h0[lv.index] if s == 0 else prev, b0, b1, lv.w_h,
                  cfg.hidden, u0, u1, cfg.weights)
    x_rows = lv.xp[(s - block_start) * cfg.batch :]  # row b: the projected input of row b at step s
    if cfg.lbr:
        _cell_rows(x_rows, hr, prev, new, lv.rh, lv.b_hn, b0, b1, u0, u1, 0, lv.f, lv.g, cfg.clip)
    else:  # whole rows only (u0 == 0): r * h must be complete before its product
        _cell_rows(x_rows, hr, prev, new, lv.rh, lv.b_hn, b0, b1, u0, u1, 1, lv.f, lv.g, cfg.clip)
        _products(RECUR_N, hr, lv.rh, b0, b1, lv.w_h, cfg.hidden, u0, u1, cfg.weights)
        _cell_rows(x_rows, hr, prev, new, lv.rh, lv.b_hn, b0, b1, u0, u1, 2, lv.f, lv.g, cfg.clip)
    for b in range(b0, b1):
        n_valid = _length(cfg, run, b)
        if s >= n_valid:
            _copy(new[b], prev[b], lo, hi, lo)  # a finished sequence carries its state
        else:
            _copy(lv.seq_out[_time_of(s, n_valid, lv.reverse) * cfg.step_stride + b * cfg.row_stride], new[b], lo,
                  hi, lv.column + lo)
    if s == cfg.steps - 1:
        for b in range(b0, b1):
            _copy(run.h_n[lv.index, b], new[b], lo, hi, lo)


# ---------------------------------------------------------------------------
# sharing a call between workers
# ---------------------------------------------------------------------------


@kernel(inline=True)
def _chunk_tiles(cfg, c):
    """Unit tiles [u0, u1) of chunk c: whole tiles, so chunks share no cache line."""
    tiles = cfg.hidden_padded // UNITS
    return c * tiles // cfg.chunks, (c + 1) * tiles // cfg.chunks


@kernel(inline=True)
def _back_off(spins):
    """One round of a spin-wait: ``pause`` at first, then give the core away (the awaited thread may be
    descheduled on a busy machine, and spinning would keep it off the core)."""
    if spins < SPIN_PAUSES:
        spin_pause()
    else:
        yield_cpu()


@kernel(inline=True)
def _sync_line(run, line):
    """Address of int64 counter ``line`` of the synchronisation area (one per cache line)."""
    return run.sync + 8 * LINE * line


@kernel
def _split_item(cfg, run, item, c):
    """Item (global step ``item``, chunk c) of MODE_SPLIT (one direction); items count the steps of every
    layer."""
    layer, s = item // cfg.steps, item % cfg.steps
    u0, u1 = _chunk_tiles(cfg, c)
    if u1 <= u0:
        return
    lv = _layer(cfg, run, layer, 0)
    if s == 0:
        _begin(cfg, run, lv, 0, cfg.batch, u0, u1)
    _advance(cfg, run, lv, s, 0, cfg.batch, u0, u1)


@kernel(inline=True)
def _run_split(cfg, run, w):
    """Worker w's part of a MODE_SPLIT call (see the module docstring)."""
    total = cfg.layers * cfg.steps
    done = _sync_line(run, SYNC_DONE)  # items finished, all layers
    stolen = _sync_line(run, SYNC_STOLEN)  # items a worker took from the other's chunk
    flags = _sync_line(run, 2 * cfg.layers + 1)  # flags[c * total + item]: item claimed
    own = w % cfg.chunks
    for item in range(total + 1):
        # Every item of the previous step (or layer) must be complete.  An item of that step nobody has
        # claimed by the time this worker finished its own belongs to a worker that is not keeping up
        # (still waking, descheduled, or not run at all): take it now.  Claimed items are being
        # computed: wait for them.  A late worker finds its items taken and rejoins at the next step, so
        # the two stay in step whenever both run, and one alone is never blocked.
        spins = 0
        while atomic_load(done) < item * cfg.chunks:
            for c in range(cfg.chunks):
                if item > 0 and atomic_cas(flags + 8 * (c * total + item - 1), 0, 1):
                    _split_item(cfg, run, item - 1, c)
                    atomic_add(done, 1)
                    atomic_add(stolen, 1)
            spins += 1
            _back_off(spins)  # a thread sharing this core must be able to run
        if item < total and atomic_cas(flags + 8 * (own * total + item), 0, 1):
            _split_item(cfg, run, item, own)
            atomic_add(done, 1)


@kernel
def _run_rows(cfg, run):
    """A worker's part of a MODE_ROWS call: claim units (direction, slice of rows) layer by layer."""
    units = cfg.directions * cfg.chunks
    tiles = cfg.hidden_padded // UNITS
    for layer in range(cfg.layers):
        if layer > 0:
            # every unit of the previous layer has been claimed by a running worker: wait until all are done
            spins = 0
            while atomic_load(_sync_line(run, 2 * layer - 1)) < units:
                spins += 1
                _back_off(spins)
        while True:
            unit = atomic_add(_sync_line(run, 2 * layer), 1)
            if unit >= units:
                break
            d, c = unit // cfg.chunks, unit % cfg.chunks
            b0, b1 = c * cfg.batch // cfg.chunks, (c + 1) * cfg.batch // cfg.chunks
            if b1 > b0:
                lv = _layer(cfg, run, layer, d)
                _begin(cfg, run, lv, b0, b1, 0, tiles)
                for s in range(cfg.steps):
                    _advance(cfg, run, lv, s, b0, b1, 0, tiles)
            atomic_add(_sync_line(run, 2 * layer + 1), 1)


@kernel
def _reset_sync(args):
    """Zero the counters and claim flags of the call whose argument block is at ``args``; returns its
    workers.  Not inlined into the parallel entry point: its parfor pass would see a store to an array
    nothing reads afterwards (the workers reach it by address) and drop it."""
    (_, _, meta_addr, _, steps, _, _, _, _, _, _, _, sync_addr, mode, chunks, _, workers) = _arguments(args)
    layers = array_at(meta_addr, np.int64(0), (META_OFFSETS,))[META_LAYERS]
    sync = array_at(sync_addr, np.int64(0), (sync_slots(steps, layers, mode, chunks),))
    sync[:] = 0
    return workers


@kernel
def _worker(w, marker, weights, args):
    """Worker w's whole share of a parallel call.  The records are built here, inside the parallel loop's
    body: Numba's parfor passes cannot take them into the loop, nor analyse this function inlined there."""
    cfg, run = _records((marker, weights), args)
    if cfg.mode == MODE_SPLIT:
        _run_split(cfg, run, w)
    else:
        _run_rows(cfg, run)


def _make_forward(parallel, weights):
    """Build a forward entry point.  One per (serial | parallel) and weights (float32, float64, or
    bfloat16 with float32 arithmetic), each compiled on its first call only: the types are fixed here,
    not passed, and the one argument is the address of the call's argument block (gru_fast._layout.ARGS).
    The serial one runs MODE_ROWS with one worker and never compiles MODE_SPLIT."""
    float_type = np.float64 if weights == "float64" else np.float32
    weight_type = np.uint16 if weights == "bfloat16" else float_type

    def forward_parallel(args):
        """Run every layer: the block's ``workers`` workers share the call (see the module docstring)."""
        workers = _reset_sync(args)
        for w in prange(workers):
            _worker(w, float_type(0), weight_type(0), args)

    def forward_serial(args):
        """Run every layer in this thread (the block's ``mode`` is MODE_ROWS, ``chunks`` and ``workers`` 1)."""
        _reset_sync(args)
        cfg, run = _records((float_type(0), weight_type(0)), args)
        _run_rows(cfg, run)

    forward = forward_parallel if parallel else forward_serial
    forward.__name__ = forward.__qualname__ = f"{forward.__name__}_{weights}"
    return njit(**(PARALLEL_JIT if parallel else JIT))(forward)


FORWARD = {(weights, parallel): _make_forward(parallel, weights)
           for weights in WEIGHTS for parallel in (False, True)}
"""The forward entry points by (weights, parallel)."""
