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

Data flow of a forward call, per layer:

1. input projection of all time steps at once: ``xp[d] = X @ W_t[d] + b``
   (BLAS for large problems, the same row loop as streaming otherwise);
2. the recurrence, split into independent *units* (a direction and a slice of
   batch rows) that each run every time step of their rows, so a parallel call
   has one parallel region per layer, not one per step.

Kernels take raw addresses (see :mod:`gru_fast._memory`) and a scalar
``marker`` whose type selects float32 or float64.  Weights live in one flat
``params`` array described by an int64 ``meta`` table built by
:mod:`gru_fast.model`; the layout constants below are shared with it.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from ._config import JIT, PARALLEL_JIT
from ._memory import pointer

# ---- layout of the int64 ``meta`` table ------------------------------------
META_LAYERS = 0
META_DIRECTIONS = 1
META_HIDDEN = 2
META_INPUT = 3
META_LBR = 4
META_REVERSE = 5  # 1 when the single direction runs backwards (ONNX "reverse")
META_CODES = 6  # 4 entries: f, g activation codes of direction 0, then direction 1
META_OFFSETS = 10  # then per (layer, direction): offsets in params of W^T, R_zr^T, R_n^T, b_x, b_hn
OFFSET_W, OFFSET_RZR, OFFSET_RN, OFFSET_BX, OFFSET_BHN = 0, 1, 2, 3, 4
OFFSETS_PER_BLOCK = 5

# ---- layout of the header of the flat ``params`` array ---------------------
PARAM_CLIP = 0  # 0 means no clip
PARAM_ACT = 1  # 4 entries per direction: f alpha, f beta, g alpha, g beta
PARAM_HEADER = 16  # weights start here (64-byte aligned in float32)

# activation codes (see gru_fast.activations)
SIGMOID, TANH, RELU, HARD_SIGMOID, LEAKY_RELU, THRESHOLDED_RELU = 0, 1, 2, 3, 4, 5
SCALED_TANH, AFFINE, ELU, SOFTSIGN, SOFTPLUS = 6, 7, 8, 9, 10


def meta_size(num_layers: int, num_directions: int) -> int:
    return META_OFFSETS + OFFSETS_PER_BLOCK * num_layers * num_directions


# ---------------------------------------------------------------------------
# element-wise pieces
# ---------------------------------------------------------------------------


@njit(**JIT)
def _activate(v, lo, hi, code, alpha, beta):
    """Apply activation ``code`` in place to v[lo:hi] (branch outside the loop so it vectorises)."""
    if code == SIGMOID:
        for i in range(lo, hi):
            v[i] = 1.0 / (1.0 + np.exp(-v[i]))
    elif code == TANH:
        for i in range(lo, hi):
            v[i] = np.tanh(v[i])
    elif code == RELU:
        for i in range(lo, hi):
            v[i] = max(v[i], 0.0)
    elif code == HARD_SIGMOID:
        for i in range(lo, hi):
            v[i] = min(max(alpha * v[i] + beta, 0.0), 1.0)
    elif code == LEAKY_RELU:
        for i in range(lo, hi):
            if v[i] < 0:
                v[i] = alpha * v[i]
    elif code == THRESHOLDED_RELU:
        for i in range(lo, hi):
            if v[i] < alpha:
                v[i] = 0.0
    elif code == SCALED_TANH:
        for i in range(lo, hi):
            v[i] = alpha * np.tanh(beta * v[i])
    elif code == AFFINE:
        for i in range(lo, hi):
            v[i] = alpha * v[i] + beta
    elif code == ELU:
        for i in range(lo, hi):
            if v[i] < 0:
                v[i] = alpha * (np.exp(v[i]) - 1.0)
    elif code == SOFTSIGN:
        for i in range(lo, hi):
            v[i] = v[i] / (1.0 + abs(v[i]))
    elif code == SOFTPLUS:
        for i in range(lo, hi):
            # log(1 + e^x) without overflow for large x
            x = v[i]
            if x > 0:
                v[i] = x + np.log1p(np.exp(-x))
            else:
                v[i] = np.log1p(np.exp(x))


@njit(**JIT)
def _clip(v, lo, hi, clip):
    if clip > 0:
        for i in range(lo, hi):
            v[i] = min(max(v[i], -clip), clip)


@njit(**JIT)
def _vecmat(v, m, out):
    """out = v @ m for C-contiguous m (n, cols), streaming the rows of m."""
    cols = m.shape[1]
    for j in range(cols):
        out[j] = 0.0
    for k in range(m.shape[0]):
        vk = v[k]
        row = m[k]
        for j in range(cols):
            out[j] += vk * row[j]


@njit(**JIT)
def _project_row(x, w_t, b_x, out):
    """Input projection of one row: out = x @ W_t + b_x (all three gates)."""
    _vecmat(x, w_t, out)
    for j in range(out.shape[0]):
        out[j] += b_x[j]


@njit(**JIT)
def _update_and_reset_gates(xp, pre_zr, hidden, f, f_alpha, f_beta, clip):
    """pre_zr (2H) holds h R_zr^T; turn it into [z, r]."""
    for j in range(2 * hidden):
        pre_zr[j] += xp[j]
    _clip(pre_zr, 0, 2 * hidden, clip)
    _activate(pre_zr, 0, 2 * hidden, f, f_alpha, f_beta)


@njit(**JIT)
def _candidate_and_state(xp, h, zr, pre_n, b_hn, hidden, lbr, g, g_alpha, g_beta, clip):
    """pre_n (H) holds h R_n^T (lbr=1) or (r*h) R_n^T (lbr=0); finish n and write h'."""
    h2 = 2 * hidden
    if lbr:
        for j in range(hidden):
            pre_n[j] = xp[h2 + j] + zr[hidden + j] * (pre_n[j] + b_hn[j])
    else:
        for j in range(hidden):
            pre_n[j] += xp[h2 + j]
    _clip(pre_n, 0, hidden, clip)
    _activate(pre_n, 0, hidden, g, g_alpha, g_beta)
    for j in range(hidden):
        z = zr[j]
        h[j] = (1.0 - z) * pre_n[j] + z * h[j]


@njit(**JIT)
def _reset_state(zr, h, hidden, rh):
    for j in range(hidden):
        rh[j] = zr[hidden + j] * h[j]


@njit(**JIT)
def recurrent_step(xp, h, r_zr, r_n, b_hn, pre_zr, pre_n, rh, hidden, lbr, f, f_alpha, f_beta,
                   g, g_alpha, g_beta, clip):
    """Advance one row one step: h <- GRU(xp, h), with xp the projected input (3H).

    ``r_zr`` (H, 2H) and ``r_n`` (H, H) are R transposed; ``pre_zr`` (2H),
    ``pre_n`` (H) and ``rh`` (H) are scratch.  Both candidate forms, see the
    module docstring.
    """
    _vecmat(h, r_zr, pre_zr)
    _update_and_reset_gates(xp, pre_zr, hidden, f, f_alpha, f_beta, clip)
    if lbr:
        _vecmat(h, r_n, pre_n)
    else:
        _reset_state(pre_zr, h, hidden, rh)
        _vecmat(rh, r_n, pre_n)
    _candidate_and_state(xp, h, pre_zr, pre_n, b_hn, hidden, lbr, g, g_alpha, g_beta, clip)


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
    """Views of one (layer, direction): W^T (I, 3H), R_zr^T (H, 2H), R_n^T (H, H), b_x (3H), b_hn (H)."""
    hidden = meta[META_HIDDEN]
    base = META_OFFSETS + OFFSETS_PER_BLOCK * (layer * meta[META_DIRECTIONS] + d)
    o_w = meta[base + OFFSET_W]
    o_rzr = meta[base + OFFSET_RZR]
    o_rn = meta[base + OFFSET_RN]
    o_bx = meta[base + OFFSET_BX]
    o_bhn = meta[base + OFFSET_BHN]
    w_t = params[o_w : o_w + n_in * 3 * hidden].reshape((n_in, 3 * hidden))
    r_zr = params[o_rzr : o_rzr + hidden * 2 * hidden].reshape((hidden, 2 * hidden))
    r_n = params[o_rn : o_rn + hidden * hidden].reshape((hidden, hidden))
    return w_t, r_zr, r_n, params[o_bx : o_bx + 3 * hidden], params[o_bhn : o_bhn + hidden]


@njit(**JIT)
def workspace_layout(steps, batch, hidden, directions, layers):
    """Offsets in the forward workspace: projections, two inter-layer buffers, pre-activations, r*h, end."""
    rows = steps * batch
    o_xp = 0
    o_mid0 = o_xp + directions * rows * 3 * hidden
    n_mid = rows * directions * hidden
    o_mid1 = o_mid0 + (n_mid if layers > 1 else 0)
    o_pre = o_mid1 + (n_mid if layers > 2 else 0)
    o_rh = o_pre + directions * batch * 3 * hidden
    end = o_rh + directions * batch * hidden
    return o_xp, o_mid0, o_mid1, o_pre, o_rh, end


@njit(**JIT)
def stream_workspace_size(batch, hidden):
    return batch * 7 * hidden  # per row: projection (3H), pre-activations (3H), r*h (H)


# ---------------------------------------------------------------------------
# forward over whole sequences
# ---------------------------------------------------------------------------


@njit(**JIT)
def _zero_padding(seq_out, b0, b1, steps, st, sb, lengths, has_lengths, col, hidden):
    """y is 0 at the padded steps of each sequence (PackedSequence semantics)."""
    for b in range(b0, b1):
        n_valid = lengths[b] if has_lengths else steps
        for t in range(n_valid, steps):
            out_row = seq_out[t * st + b * sb]
            for j in range(hidden):
                out_row[col + j] = 0.0


@njit(**JIT)
def _run_rows(d, b0, b1, steps, st, sb, lengths, has_lengths, reverse, h_state, xp, seq_in, w_t, b_x,
              project, r_zr, r_n, b_hn, pre_zr, pre_n, rh, hidden, lbr, codes, acts, clip, seq_out, col):
    """Direction ``d``, batch rows [b0, b1), every time step, one row at a time (small batches).

    Sequence rows are indexed t*st + b*sb.  With ``project`` the rows' input
    projections are computed here too; otherwise ``xp`` already holds them.
    """
    f, g = codes[2 * d], codes[2 * d + 1]
    f_alpha, f_beta, g_alpha, g_beta = acts[4 * d], acts[4 * d + 1], acts[4 * d + 2], acts[4 * d + 3]
    _zero_padding(seq_out, b0, b1, steps, st, sb, lengths, has_lengths, col, hidden)
    for s in range(steps):
        for b in range(b0, b1):
            n_valid = lengths[b] if has_lengths else steps
            if s >= n_valid:
                continue
            t = n_valid - 1 - s if reverse else s
            row = t * st + b * sb
            if project:
                _project_row(seq_in[row], w_t, b_x, xp[row])
            h = h_state[b]
            recurrent_step(xp[row], h, r_zr, r_n, b_hn, pre_zr[b], pre_n[b], rh[b], hidden, lbr,
                           f, f_alpha, f_beta, g, g_alpha, g_beta, clip)
            out_row = seq_out[row]
            for j in range(hidden):
                out_row[col + j] = h[j]


@njit(**JIT)
def _run_batched(d, batch, steps, st, sb, lengths, has_lengths, reverse, h_state, xp, r_zr, r_n, b_hn,
                 pre_zr, pre_n, rh, hidden, lbr, codes, acts, clip, seq_out, col):
    """Direction ``d`` over all rows, one BLAS product per step for the whole batch (large batches).

    Finished rows (step >= length) take part in the products but are never updated.
    """
    f, g = codes[2 * d], codes[2 * d + 1]
    f_alpha, f_beta, g_alpha, g_beta = acts[4 * d], acts[4 * d + 1], acts[4 * d + 2], acts[4 * d + 3]
    _zero_padding(seq_out, 0, batch, steps, st, sb, lengths, has_lengths, col, hidden)
    for s in range(steps):
        np.dot(h_state, r_zr, pre_zr)
        if lbr:
            np.dot(h_state, r_n, pre_n)
        for b in range(batch):
            n_valid = lengths[b] if has_lengths else steps
            if s < n_valid:
                t = n_valid - 1 - s if reverse else s
                _update_and_reset_gates(xp[t * st + b * sb], pre_zr[b], hidden, f, f_alpha, f_beta, clip)
                if not lbr:
                    _reset_state(pre_zr[b], h_state[b], hidden, rh[b])
        if not lbr:
            np.dot(rh, r_n, pre_n)
        for b in range(batch):
            n_valid = lengths[b] if has_lengths else steps
            if s < n_valid:
                t = n_valid - 1 - s if reverse else s
                row = t * st + b * sb
                h = h_state[b]
                _candidate_and_state(xp[row], h, pre_zr[b], pre_n[b], b_hn, hidden, lbr, g, g_alpha, g_beta, clip)
                out_row = seq_out[row]
                for j in range(hidden):
                    out_row[col + j] = h[j]


@njit(**JIT)
def _prepare_layer(params, meta, layer, rows, seq_in, n_in, xp_all, h0, has_h0, h_n, blas):
    """Initial state and, for large problems, the input projection of every step as one BLAS product."""
    hidden = meta[META_HIDDEN]
    directions = meta[META_DIRECTIONS]
    for d in range(directions):
        state = h_n[layer * directions + d]
        if has_h0:
            state[:, :] = h0[layer * directions + d]
        else:
            state[:, :] = 0.0
        if blas:
            w_t, r_zr, r_n, b_x, b_hn = _layer_weights(params, meta, layer, d, n_in)
            xp = xp_all[d * rows * 3 * hidden : (d + 1) * rows * 3 * hidden].reshape((rows, 3 * hidden))
            np.dot(seq_in, w_t, xp)
            for i in range(rows):
                for j in range(3 * hidden):
                    xp[i, j] += b_x[j]


def _make_forward(parallel):
    """Build the forward kernel; the serial and parallel entry points differ only in ``prange``."""
    loop = prange if parallel else range

    def forward(marker, params_addr, n_params, meta_addr, x_addr, steps, batch, batch_major,
                h0_addr, lengths_addr, y_addr, h_n_addr, ws_addr, chunks, blas, batched):
        """Run every layer.  ``blas``: input projections as BLAS products; ``batched``: one
        BLAS product per step over the whole batch; otherwise units of (direction, row slice)."""
        meta = _meta(meta_addr)
        params = carray(pointer(params_addr, marker), (n_params,))
        layers = meta[META_LAYERS]
        directions = meta[META_DIRECTIONS]
        hidden = meta[META_HIDDEN]
        lbr = meta[META_LBR] != 0
        reverse = meta[META_REVERSE] != 0
        codes = meta[META_CODES : META_CODES + 4]
        acts = params[PARAM_ACT : PARAM_ACT + 8]
        clip = params[PARAM_CLIP]
        rows = steps * batch
        st = 1 if batch_major else batch
        sb = steps if batch_major else 1
        o_xp, o_mid0, o_mid1, o_pre, o_rh, end = workspace_layout(steps, batch, hidden, directions, layers)
        ws = carray(pointer(ws_addr, marker), (end,))
        xp_all = ws[o_xp:o_mid0]
        pre_zr_all = ws[o_pre : o_pre + directions * batch * 2 * hidden].reshape((directions, batch, 2 * hidden))
        pre_n_all = ws[o_pre + directions * batch * 2 * hidden : o_rh].reshape((directions, batch, hidden))
        rh_all = ws[o_rh:end].reshape((directions, batch, hidden))
        has_h0 = h0_addr != 0
        has_lengths = lengths_addr != 0
        lengths = carray(pointer(lengths_addr if has_lengths else meta_addr, np.int64(0)), (batch if has_lengths else 1,))
        h_n = carray(pointer(h_n_addr, marker), (layers * directions, batch, hidden))
        h0 = carray(pointer(h0_addr if has_h0 else h_n_addr, marker), (layers * directions, batch, hidden))
        width = directions * hidden
        n_in = meta[META_INPUT]
        seq_in = carray(pointer(x_addr, marker), (rows, n_in))
        units = directions * chunks
        for layer in range(layers):
            if layer == layers - 1:
                seq_out = carray(pointer(y_addr, marker), (rows, width))
            elif layer % 2 == 0:
                seq_out = ws[o_mid0 : o_mid0 + rows * width].reshape((rows, width))
            else:
                seq_out = ws[o_mid1 : o_mid1 + rows * width].reshape((rows, width))
            _prepare_layer(params, meta, layer, rows, seq_in, n_in, xp_all, h0, has_h0, h_n, blas)
            if batched:
                for d in range(directions):
                    w_t, r_zr, r_n, b_x, b_hn = _layer_weights(params, meta, layer, d, n_in)
                    xp = xp_all[d * rows * 3 * hidden : (d + 1) * rows * 3 * hidden].reshape((rows, 3 * hidden))
                    _run_batched(d, batch, steps, st, sb, lengths, has_lengths, reverse or d == 1,
                                 h_n[layer * directions + d], xp, r_zr, r_n, b_hn, pre_zr_all[d], pre_n_all[d],
                                 rh_all[d], hidden, lbr, codes, acts, clip, seq_out, d * hidden)
            else:
                for u in loop(units):
                    d = u // chunks
                    c = u % chunks
                    w_t, r_zr, r_n, b_x, b_hn = _layer_weights(params, meta, layer, d, n_in)
                    xp = xp_all[d * rows * 3 * hidden : (d + 1) * rows * 3 * hidden].reshape((rows, 3 * hidden))
                    _run_rows(d, c * batch // chunks, (c + 1) * batch // chunks, steps, st, sb, lengths,
                              has_lengths, reverse or d == 1, h_n[layer * directions + d], xp, seq_in, w_t, b_x,
                              not blas, r_zr, r_n, b_hn, pre_zr_all[d], pre_n_all[d], rh_all[d], hidden, lbr,
                              codes, acts, clip, seq_out, d * hidden)
            seq_in = seq_out
            n_in = width

    forward.__name__ = forward.__qualname__ = "forward_parallel" if parallel else "forward_serial"
    return forward


forward_serial = njit(**JIT)(_make_forward(parallel=False))
forward_parallel = njit(**PARALLEL_JIT)(_make_forward(parallel=True))


# ---------------------------------------------------------------------------
# streaming: one time step of every layer
# ---------------------------------------------------------------------------


@njit(**JIT)
def step(marker, params_addr, n_params, meta_addr, x_addr, batch, state_addr, y_addr, ws_addr):
    """Advance every layer of a unidirectional model one step for ``batch`` rows."""
    meta = _meta(meta_addr)
    params = carray(pointer(params_addr, marker), (n_params,))
    layers = meta[META_LAYERS]
    hidden = meta[META_HIDDEN]
    lbr = meta[META_LBR] != 0
    f, g = meta[META_CODES], meta[META_CODES + 1]
    f_alpha, f_beta = params[PARAM_ACT], params[PARAM_ACT + 1]
    g_alpha, g_beta = params[PARAM_ACT + 2], params[PARAM_ACT + 3]
    clip = params[PARAM_CLIP]
    ws = carray(pointer(ws_addr, marker), (stream_workspace_size(batch, hidden),))
    xp = ws[: batch * 3 * hidden].reshape((batch, 3 * hidden))
    pre_zr = ws[batch * 3 * hidden : batch * 5 * hidden].reshape((batch, 2 * hidden))
    pre_n = ws[batch * 5 * hidden : batch * 6 * hidden].reshape((batch, hidden))
    rh = ws[batch * 6 * hidden :].reshape((batch, hidden))
    state = carray(pointer(state_addr, marker), (layers, batch, hidden))
    n_in = meta[META_INPUT]
    x = carray(pointer(x_addr, marker), (batch, n_in))
    for layer in range(layers):
        w_t, r_zr, r_n, b_x, b_hn = _layer_weights(params, meta, layer, 0, n_in)
        for b in range(batch):
            row_in = x[b] if layer == 0 else state[layer - 1, b]
            _project_row(row_in, w_t, b_x, xp[b])
            recurrent_step(xp[b], state[layer, b], r_zr, r_n, b_hn, pre_zr[b], pre_n[b], rh[b], hidden, lbr,
                           f, f_alpha, f_beta, g, g_alpha, g_beta, clip)
        n_in = hidden
    y = carray(pointer(y_addr, marker), (batch, hidden))
    y[:, :] = state[layers - 1]
