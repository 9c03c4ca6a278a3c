"""bfloat16 weights on the numpy side: rounding float32 to bfloat16 bit patterns, widening them back, and
packing them in k pairs, the layout of the bf16-weight kernels of :mod:`gru_fast._tiles`.

bfloat16 is the top 16 bits of a float32 (sign, 8 exponent bits, 7 mantissa bits), stored here as
uint16.  Rounding is to nearest, ties to even, on the bit pattern: add 0x7FFF plus the lowest kept bit
and drop the low 16 bits.  That carries into the exponent where it should (subnormals round like any
other value, the largest finite values round to infinity) and is the rounding of PyTorch's
``tensor.to(torch.bfloat16)`` (tests/test_tiles_bf16.py checks them bit for bit).  A NaN stays a NaN
of the same sign: its top 16 bits with the quiet bit set (plain truncation could make a NaN whose
payload sits in the low half into an infinity).
"""

from __future__ import annotations

import numpy as np

__all__ = ["to_bf16", "from_bf16", "pair_words", "pack_bf16"]

_QUIET = np.uint16(0x0040)  # the top mantissa bit of a bfloat16


def to_bf16(x) -> np.ndarray:
    """``x`` (float32 array) rounded to bfloat16, as uint16 bit patterns of the same shape."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"x must be a float32 array, got dtype {x.dtype}")
    bits = x.view(np.uint32)  # same item size: a view whatever the strides or shape
    nan = np.isnan(x)
    # no NaN is fed to the sum: only NaN patterns (>= 0xFFFF8000 among them) could overflow uint32
    u = np.where(nan, np.uint32(0), bits)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)).astype(np.uint16) | _QUIET, rounded)
    return rounded


def from_bf16(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16 array) widened to float32, exactly."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"bits must be a uint16 array of bfloat16 bit patterns, got dtype {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def pair_words(bits) -> np.ndarray:
    """``bits`` (N, K) uint16 bfloat16 patterns as (N, ceil(K/2)) uint32 words, two columns to a word:
    word p holds column 2p in its low half and column 2p + 1 in its high half (zero past an odd K)."""
    bits = np.asarray(bits)
    k = bits.shape[1]
    words = bits[:, 0::2].astype(np.uint32)
    words[:, : k // 2] |= bits[:, 1::2].astype(np.uint32) << np.uint32(16)
    return words


def pack_bf16(m, hidden: int) -> np.ndarray:
    """``m`` (3H, K) float32 -- ONNX's gate-blocked rows z | r | n, as :func:`gru_fast._layout.pack_into`
    takes them -- rounded to bfloat16 and packed in k pairs for the ``*_bf16`` kernels of
    :mod:`gru_fast._tiles`: Hp/16 groups (z, r, n of 16 hidden units, zero for padded units) of
    ceil(K/2) rows of 48 uint32 words, word j of row p holding W[2p, j] | W[2p + 1, j] << 16
    (:func:`pair_words`; W = m transposed to (K, 3H)), as a flat uint32 array of Hp/16 * ceil(K/2) * 48
    words: :func:`gru_fast._layout.pack_into`'s group layout with a word for an element."""
    from ._layout import GROUP_COLUMNS, UNITS, pack_into, padded_hidden

    m = np.asarray(m)
    if m.dtype != np.float32:
        raise TypeError(f"m must be a float32 array, got dtype {m.dtype}")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 1:
        raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
    if m.ndim != 2 or m.shape[0] != 3 * hidden:
        raise ValueError(f"m must have shape (3 * hidden, K) = ({3 * hidden}, K), got {m.shape}")
    hp = padded_hidden(int(hidden))
    pairs = -(-m.shape[1] // 2)
    packed = np.zeros(hp // UNITS * pairs * GROUP_COLUMNS, np.uint32)
    if packed.size:  # K == 0 leaves nothing to write (and no (K, 48) shape to reshape to)
        pack_into(packed, pair_words(to_bf16(m)), int(hidden))
    return packed
