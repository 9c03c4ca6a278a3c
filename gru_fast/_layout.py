"""The engine's memory layout: one owner for what the model writes and the kernels read.

A model is packed once into two arrays (:func:`pack`):

``params`` (the model's float dtype)
    A header (:data:`PARAM_CLIP`, the activations' alpha/beta at :data:`PARAM_ACT`), then per (layer,
    direction) four blocks, each starting on a 64-byte boundary: packed W, packed R, the input bias
    ``b_x`` (3Hp) and the recurrent n bias ``b_hn`` (Hp).

``meta`` (int64)
    Sizes and flags (:data:`META_LAYERS` ...), the activation codes, then per (layer, direction) the
    offsets of its four blocks in ``params`` (:data:`OFFSET_W` ...).

Unit tiles.  The hidden units are padded to ``Hp``, a multiple of :data:`UNITS` (16), and taken 16 at a
time: unit tile u holds units 16u..16u+15 and owns the :data:`GROUP_COLUMNS` (48) columns 48u..48u+47
of every gate-sized row: 16 of z, 16 of r, 16 of n.  Packed W and R hold, per unit tile, a contiguous
(K, 48) group (:func:`pack_into`; bfloat16 W and R: ceil(K/2) rows of 48 words holding two k rows each,
:func:`gru_fast._bf16.pack_bf16`), so any range of unit tiles is one contiguous block of weights,
projections and products, and every element-wise loop runs over whole 16-lane vectors whatever H is.
Padded units have zero weights: they are computed and never read.

The workspace of a call (one float array, zeroed once when allocated, :func:`workspace_layout`) holds
the sequences between layers and, per direction, the projected inputs of a block of steps, the
recurrent products, r * h, and two alternating state rows; a separate int64 array holds the threads'
counters and claim flags (:func:`sync_slots`).

Every function here is plain Python for the model and, through ``register_jitable``, callable from the
kernels too: one definition serves both.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from ._bf16 import pair_words, to_bf16
from ._tiles import GROUP, TILE

__all__ = ["WEIGHTS", "UNITS", "GROUP_COLUMNS", "ALIGN", "padded", "padded_hidden", "meta_size", "params_size", "pack",
           "pack_into", "build_nbytes", "aligned_zeros", "workspace_layout", "direction_offsets", "sync_slots", "ARGS"]

WEIGHTS = ("float32", "float64", "bfloat16")
"""How a model's W and R can be stored: float32 or float64 (the model's dtype), or bfloat16 (float32
arithmetic; :func:`pack` with ``bf16``)."""

UNITS = TILE  # hidden units per unit tile
GROUP_COLUMNS = GROUP * TILE  # columns per unit tile: z, r and n of its 16 units
ALIGN = 16  # elements between blocks: 64 bytes in float32

# ---- the int64 ``meta`` table ---------------------------------------------------
META_LAYERS = 0
META_DIRECTIONS = 1
META_HIDDEN = 2
META_INPUT = 3
META_LBR = 4  # linear_before_reset
META_REVERSE = 5  # 1 when the single direction runs backwards (ONNX "reverse")
META_CODES = 6  # 4 entries: f, g activation codes of direction 0, then direction 1
META_OFFSETS = 10  # then per (layer, direction): offsets in params of packed W, packed R, b_x, b_hn
OFFSET_W, OFFSET_R, OFFSET_BX, OFFSET_BHN = 0, 1, 2, 3
OFFSETS_PER_BLOCK = 4

# ---- the header of ``params`` ----------------------------------------------------
PARAM_CLIP = 0  # 0 means no clip
PARAM_ACT = 1  # 4 entries per direction: f alpha, f beta, g alpha, g beta
PARAM_HEADER = 16  # weights start here (64-byte aligned in float32)

# ---- how a call is shared between threads (gru_fast.kernels) ---------------------
MODE_ROWS = 0
MODE_SPLIT = 1
LINE = 8  # int64 counters sit one per 64-byte cache line
SYNC_DONE, SYNC_STOLEN = 0, 1  # MODE_SPLIT's counter lines: items done; items taken over from the other worker

# ---- a call's arguments (gru_fast.kernels.FORWARD) -------------------------------
# An entry point takes one address: of an int64 block of these fields, in this order (a bound call's
# block is written once; Numba's dispatcher checks one integer in 0.17 us against 0.44 us for seventeen).
ARGS = ("params", "n_params", "meta",  # the model: addresses of params and meta, params' size
        "x", "steps", "batch", "batch_major", "h0", "lengths", "y", "h_n",  # the call's arrays (0: absent)
        "workspace", "sync", "mode", "chunks", "block_steps", "workers")  # its plan
ARG_X = ARGS.index("x")  # where a call's operands start


@register_jitable
def padded(n):
    """n rounded up to a 64-byte boundary (in float32 elements)."""
    return -(-n // ALIGN) * ALIGN


@register_jitable
def padded_hidden(hidden):
    """H rounded up to whole unit tiles."""
    return -(-hidden // UNITS) * UNITS


def meta_size(num_layers: int, num_directions: int) -> int:
    return META_OFFSETS + OFFSETS_PER_BLOCK * num_layers * num_directions


def _matrix_elements(rows, columns, bf16):
    """Elements of ``params`` a packed W or R of rows x columns values takes: bfloat16 values go two to a
    float32 element, rows 2p and 2p + 1 of a column sharing one (an odd last row with a zero), see
    :func:`gru_fast._bf16.pack_bf16`."""
    return -(-rows // 2) * columns if bf16 else rows * columns


def params_size(input_size: int, hidden: int, num_layers: int, num_directions: int, bf16: bool = False) -> int:
    """Elements of the flat ``params`` array of a model of this shape, W and R stored as bfloat16 with
    ``bf16`` (Python ints: sizes read from a file may exceed int64)."""
    hp = padded_hidden(hidden)
    total = 0
    for layer in range(num_layers):
        n_in = input_size if layer == 0 else num_directions * hidden
        total += (padded(_matrix_elements(n_in, 3 * hp, bf16)) + padded(_matrix_elements(hidden, 3 * hp, bf16))
                  + padded(3 * hp) + padded(hp))
    return PARAM_HEADER + num_directions * total


def aligned_zeros(n: int, dtype: np.dtype) -> np.ndarray:
    """A 1-D array of n zeros whose data starts on a 64-byte boundary (a large one is fresh pages from the
    system, zero without a pass over them)."""
    raw = np.zeros(n * dtype.itemsize + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start : start + n * dtype.itemsize].view(dtype)


def pack_into(dst, m, hidden):
    """Write ``m`` (3H, K) -- ONNX's gate-blocked rows z | r | n: ``W[d]``, ``R[d]`` or a bias as one
    column -- into ``dst`` (zeroed, Hp/16 * K * 48 elements): one contiguous (K, 48) group per unit
    tile, whose 48 columns are z, r and n of hidden units 16u..16u+15 (zero for padded units).  A group
    is one weight stream (see gru_fast._tiles), a unit tile one share of a step (see gru_fast.kernels).
    Written straight from ``m``: no temporary of the packed size."""
    K = m.shape[1]
    groups = dst.reshape(-1, K, GROUP, UNITS)
    full, rest = divmod(hidden, UNITS)
    for q in range(GROUP):
        gate = m[q * hidden : (q + 1) * hidden]  # (H, K)
        if full:
            groups[:full, :, q, :] = gate[: full * UNITS].reshape(full, UNITS, K).transpose(0, 2, 1)
        if rest:
            groups[full, :, q, :rest] = gate[full * UNITS :].T


def pack(weights, input_size, hidden, linear_before_reset, reverse, clip, activations, dtype, bf16=False):
    """``(params, meta)``, read-only, for ONNX-layout ``weights`` [(W, R, B or None) per layer].

    With ``bf16`` (float32 only), packed W and R hold bfloat16 values (rounded to nearest even:
    :func:`gru_fast._bf16.to_bf16`) in k pairs, two to a float32 element of ``params`` (the layout of
    :func:`gru_fast._bf16.pack_bf16`); the header and biases stay float32.

    The biases are summed where the equations allow: b_x = Wb + Rb for z and r (and for n when
    linear_before_reset=0, where r multiplies h before the product); with linear_before_reset=1 the
    recurrent n bias stays apart, inside r * (h R_n^T + Rb_n)."""
    D = len(weights[0][0])
    L = len(weights)
    H = hidden
    hp = padded_hidden(H)
    params = aligned_zeros(params_size(input_size, H, L, D, bf16), dtype)
    meta = np.zeros(meta_size(L, D), dtype=np.int64)
    meta[META_LAYERS], meta[META_DIRECTIONS], meta[META_HIDDEN], meta[META_INPUT] = L, D, H, input_size
    meta[META_LBR] = int(linear_before_reset)
    meta[META_REVERSE] = int(reverse)
    params[PARAM_CLIP] = clip or 0.0
    for d in range(D):
        f, g = activations[2 * d], activations[2 * d + 1]
        meta[META_CODES + 2 * d : META_CODES + 2 * d + 2] = (f.code, g.code)
        params[PARAM_ACT + 4 * d : PARAM_ACT + 4 * d + 4] = (f.alpha, f.beta, g.alpha, g.beta)
    cursor = PARAM_HEADER
    for layer, (W, R, B) in enumerate(weights):
        for d in range(D):
            bias = np.zeros(6 * H, dtype) if B is None else B[d]
            w_bias, r_bias = bias[: 3 * H], bias[3 * H :]
            b_x = w_bias.copy()
            b_x[: 2 * H] += r_bias[: 2 * H]
            if linear_before_reset:
                b_hn = r_bias[2 * H :]
            else:
                b_x[2 * H :] += r_bias[2 * H :]
                b_hn = np.zeros(H, dtype)
            base = META_OFFSETS + OFFSETS_PER_BLOCK * (layer * D + d)
            for slot, m in ((OFFSET_W, W[d]), (OFFSET_R, R[d])):
                size = _matrix_elements(m.shape[1], 3 * hp, bf16)  # K (bf16: ceil(K/2)) rows of 3Hp columns
                meta[base + slot] = cursor
                if bf16:
                    pack_into(params[cursor : cursor + size].view(np.uint32), pair_words(to_bf16(m)), H)
                else:
                    pack_into(params[cursor : cursor + size], m, H)
                cursor += padded(size)
            meta[base + OFFSET_BX] = cursor
            pack_into(params[cursor : cursor + 3 * hp], b_x[:, None], H)
            cursor += padded(3 * hp)
            meta[base + OFFSET_BHN] = cursor
            params[cursor : cursor + H] = b_hn
            cursor += padded(hp)
    params.flags.writeable = False
    meta.flags.writeable = False
    return params, meta


def build_nbytes(input_size: int, hidden_size: int, num_layers: int, num_directions: int, itemsize: int,
                 bf16: bool = False) -> int:
    """Bytes that building a model of this shape allocates at its peak, beyond the caller's arrays, for
    floats of ``itemsize`` bytes (see :func:`gru_fast.model.build_nbytes`).

    That is: the weights copied (kept: ``GRU.onnx_weights``, pickling), the finiteness mask of the
    largest array (one byte an element, while it is checked), the flat ``params`` array -- hidden units
    padded to a multiple of 16, so an H=1 model packs 16 units -- and its alignment slack.  :func:`pack`
    writes into ``params`` directly, without temporaries of that size.
    """
    I, H, L, D = (int(v) for v in (input_size, hidden_size, num_layers, num_directions))
    if min(I, H, L, D) < 1:
        raise ValueError(f"sizes must be positive, got input_size={I} hidden_size={H} num_layers={L} "
                         f"num_directions={D}")
    largest = 0
    weights = 0
    for layer in range(L):
        n_in = I if layer == 0 else D * H
        layer_arrays = (D * 3 * H * n_in, D * 3 * H * H, D * 6 * H)
        weights += sum(layer_arrays)
        largest = max(largest, *layer_arrays)
    params = params_size(I, H, L, D, bf16)
    meta = meta_size(L, D) * 8
    if bf16:  # to_bf16's rounded copy of the largest matrix and its temporaries, while it is packed
        largest += 3 * largest * itemsize
    small = 16 * H * itemsize + (64 << 10)  # pack's bias rows; the model's Python objects
    return (weights + params) * itemsize + largest + 64 + meta + small


# ---- the workspace of a call -------------------------------------------------------


@register_jitable
def workspace_layout(steps, batch, hidden, directions, layers, block_steps):
    """Offsets (in elements) in the float workspace: (mid0, mid1, first direction's base, a direction's
    size, end).  ``mid0``/``mid1`` hold the sequences of the layers below the last (alternately); each
    direction's buffers follow (:func:`direction_offsets`)."""
    hp = padded_hidden(hidden)
    n_mid = steps * batch * directions * hidden
    o_mid0 = 0
    o_mid1 = o_mid0 + (padded(n_mid) if layers > 1 else 0)
    o_dirs = o_mid1 + (padded(n_mid) if layers > 2 else 0)
    per_direction = (padded(block_steps * batch * 3 * hp) + padded(batch * 3 * hp) + padded(batch * hp)
                     + 2 * padded(batch * hp))
    return o_mid0, o_mid1, o_dirs, per_direction, o_dirs + directions * per_direction


@register_jitable
def direction_offsets(base, block_steps, batch, hidden):
    """Offsets of one direction's buffers from its ``base``: projected inputs (block_steps*B, 3Hp),
    recurrent products (B, 3Hp), r * h (B, Hp), state rows 0 and 1 (B, Hp each)."""
    hp = padded_hidden(hidden)
    o_products = base + padded(block_steps * batch * 3 * hp)
    o_rh = o_products + padded(batch * 3 * hp)
    o_state0 = o_rh + padded(batch * hp)
    return base, o_products, o_rh, o_state0, o_state0 + padded(batch * hp)


@register_jitable
def sync_slots(steps, layers, mode, chunks):
    """int64 slots of the synchronisation area: 2 counters per layer, then the MODE_SPLIT claim flags."""
    flags = chunks * steps * layers if mode == MODE_SPLIT else 0
    return LINE * (2 * layers + 1) + flags
