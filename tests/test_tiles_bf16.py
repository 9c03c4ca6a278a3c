"""The bfloat16-weight product kernels of gru_fast._tiles (and its eight-row ones) and the
bfloat16 rounding of gru_fast._bf16.

* Rounding: :func:`gru_fast._bf16.to_bf16` against PyTorch's ``tensor.to(torch.bfloat16)``, bit for bit,
  over random bit patterns of every exponent, ties (even and odd kept bit), subnormals, the largest
  finite values (which round to infinity), infinities and zeros; NaN stays NaN.
* Packing: :func:`gru_fast._bf16.pack_bf16` against the k-pair layout written out element by element
  (word j of pair row p of group g: bfloat16 of W[2p, 48g + j] in the low half, of W[2p + 1, 48g + j]
  in the high half, zero past an odd K), and the model's ``params`` hold the same words.
* Kernels: every ``*_bf16`` kernel, with 1, 2 and 4 rows, bias or zero start, even and odd K (0 and 1
  included), odd and even group counts, starting at a later group, against the float64 numpy product
  of the rounded weights (``from_bf16`` widens exactly), within the error bound of a chain of K float32
  fused multiply-adds: ``(K + 1) * 2**-24 * (|s| + sum_k |a_k w_k|)`` per element.  Each input row is
  followed by a NaN at a[K], which the kernels must not read.  The columns a kernel does not compute
  (n for the ``_zr`` kernels, z and r for the ``_n`` kernels) are left as they were.
* Bit for bit: 4-row results equal 1-row and 2-row results row by row, and the bf16 kernels equal the
  float32 kernels (1, 2 and 4 rows) run on the widened weights (the widening is exact and the fma chain
  the same, in k order).
* The eight-row kernels, float32 and bfloat16: against the float64 numpy product within the same bound,
  columns they do not compute untouched, bit for bit the four-, six- and three-row kernels' results row
  by row, and the bfloat16 ones (eight, six and three rows) the float32 ones' on the widened weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from gru_fast import _tiles as t
from gru_fast._bf16 import from_bf16, pack_bf16, to_bf16
from gru_fast._layout import pack_into as _pack_into

PROJECT, RECUR, RECUR_ZR, RECUR_N = 0, 1, 2, 3
TILES = {PROJECT: (0, 1, 2), RECUR: (0, 1, 2), RECUR_ZR: (0, 1), RECUR_N: (2,)}  # computed tiles of a group
GROUP_COLS = 48


def _make_runner(suffix):
    """A jitted runner of one family of kernels (by ``kind``: project, recur all, z and r, n) on ``rows``
    (1, 2 or 4) rows of c and a; w_at: the element of w (float32, or uint32 words of bf16 k pairs) where
    the first group starts.  ``suffix``: "" (float) or "_bf16"."""
    p1, all1, zr1, n1, p2, all2, zr2, n2, p4, all4, zr4, n4 = (
        getattr(t, f"{name}{rows}{kind}{suffix}") for rows in (1, 2, 4)
        for name, kind in (("project", ""), ("recur", "_all"), ("recur", "_zr"), ("recur", "_n")))

    @njit(cache=False)
    def run(kind, rows, c, a, w, w_at, bias, k, n_groups):
        m = np.float32(0)
        wp = w.ctypes.data + w_at * w.itemsize
        bp = bias.ctypes.data
        if rows == 1:
            c0, a0 = c[0].ctypes.data, a[0].ctypes.data
            if kind == 0:
                p1(c0, a0, wp, bp, k, n_groups, m)
            elif kind == 1:
                all1(c0, a0, wp, bp, k, n_groups, m)
            elif kind == 2:
                zr1(c0, a0, wp, bp, k, n_groups, m)
            else:
                n1(c0, a0, wp, bp, k, n_groups, m)
        elif rows == 2:
            c0, c1, a0, a1 = c[0].ctypes.data, c[1].ctypes.data, a[0].ctypes.data, a[1].ctypes.data
            if kind == 0:
                p2(c0, c1, a0, a1, wp, bp, k, n_groups, m)
            elif kind == 1:
                all2(c0, c1, a0, a1, wp, bp, k, n_groups, m)
            elif kind == 2:
                zr2(c0, c1, a0, a1, wp, bp, k, n_groups, m)
            else:
                n2(c0, c1, a0, a1, wp, bp, k, n_groups, m)
        else:
            c0, c1, c2, c3 = c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[3].ctypes.data
            a0, a1, a2, a3 = a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[3].ctypes.data
            if kind == 0:
                p4(c0, c1, c2, c3, a0, a1, a2, a3, wp, bp, k, n_groups, m)
            elif kind == 1:
                all4(c0, c1, c2, c3, a0, a1, a2, a3, wp, bp, k, n_groups, m)
            elif kind == 2:
                zr4(c0, c1, c2, c3, a0, a1, a2, a3, wp, bp, k, n_groups, m)
            else:
                n4(c0, c1, c2, c3, a0, a1, a2, a3, wp, bp, k, n_groups, m)

    return run


_run_bf16 = _make_runner("_bf16")
_run_float32 = _make_runner("")


def _make_many(suffix):
    """A jitted runner of the three-, six- and eight-row kernels (``suffix``: "" or "_bf16"), called as
    :func:`_make_runner`'s with ``rows`` 3, 6 or 8."""
    kernels = tuple(getattr(t, f"{name}{rows}{kind}{suffix}") for rows in (3, 6, 8)
                    for name, kind in (("project", ""), ("recur", "_all"), ("recur", "_zr"), ("recur", "_n")))
    p3, all3, zr3, n3, p6, all6, zr6, n6, p8, all8, zr8, n8 = kernels

    @njit(cache=False)
    def run(kind, rows, c, a, w, w_at, bias, k, n_groups):
        m = np.float32(0)
        wp, bp = w.ctypes.data + w_at * w.itemsize, bias.ctypes.data
        last = rows - 1  # c and a hold ``rows`` rows; the eight addresses repeat the last one past them
        c0, c1, c2, c3 = c[0].ctypes.data, c[1].ctypes.data, c[2].ctypes.data, c[min(3, last)].ctypes.data
        c4, c5, c6, c7 = (c[min(4, last)].ctypes.data, c[min(5, last)].ctypes.data, c[min(6, last)].ctypes.data,
                          c[last].ctypes.data)
        a0, a1, a2, a3 = a[0].ctypes.data, a[1].ctypes.data, a[2].ctypes.data, a[min(3, last)].ctypes.data
        a4, a5, a6, a7 = (a[min(4, last)].ctypes.data, a[min(5, last)].ctypes.data, a[min(6, last)].ctypes.data,
                          a[last].ctypes.data)
        if rows == 3:
            if kind == 0:
                p3(c0, c1, c2, a0, a1, a2, wp, bp, k, n_groups, m)
            elif kind == 1:
                all3(c0, c1, c2, a0, a1, a2, wp, bp, k, n_groups, m)
            elif kind == 2:
                zr3(c0, c1, c2, a0, a1, a2, wp, bp, k, n_groups, m)
            else:
                n3(c0, c1, c2, a0, a1, a2, wp, bp, k, n_groups, m)
        elif rows == 6:
            if kind == 0:
                p6(c0, c1, c2, c3, c4, c5, a0, a1, a2, a3, a4, a5, wp, bp, k, n_groups, m)
            elif kind == 1:
                all6(c0, c1, c2, c3, c4, c5, a0, a1, a2, a3, a4, a5, wp, bp, k, n_groups, m)
            elif kind == 2:
                zr6(c0, c1, c2, c3, c4, c5, a0, a1, a2, a3, a4, a5, wp, bp, k, n_groups, m)
            else:
                n6(c0, c1, c2, c3, c4, c5, a0, a1, a2, a3, a4, a5, wp, bp, k, n_groups, m)
        elif kind == 0:
            p8(c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3, a4, a5, a6, a7, wp, bp, k, n_groups, m)
        elif kind == 1:
            all8(c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3, a4, a5, a6, a7, wp, bp, k, n_groups, m)
        elif kind == 2:
            zr8(c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3, a4, a5, a6, a7, wp, bp, k, n_groups, m)
        else:
            n8(c0, c1, c2, c3, c4, c5, c6, c7, a0, a1, a2, a3, a4, a5, a6, a7, wp, bp, k, n_groups, m)

    return run


_run_many_float32 = _make_many("")
_run_many_bf16 = _make_many("_bf16")


KS = [0, 1, 2, 3, 7, 16, 33, 100, 257]  # odd K: the last pair has no row K


def _case(kind, k):
    """Random weights (3H, K) in ONNX gate order, 4 input rows, a bias row, a starting group and a group
    count: 1 to 2 * SPAN_BF16 - 1 groups (the one-row kernels take SPAN_BF16 groups at a time, then
    half as many, ..., one: every mix of those passes)."""
    rng = np.random.default_rng(100 * k + kind)
    n_groups = 1 + (KS.index(k) + 3 * kind) % (2 * t.SPAN_BF16 - 1)
    u0 = int(rng.integers(0, 3))
    n_total = u0 + n_groups + int(rng.integers(0, 2))
    hidden = 16 * n_total - int(rng.integers(0, 16))  # padded to whole groups of 16 units
    m = rng.standard_normal((3 * hidden, k)).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 30.0]))
    a = rng.standard_normal((4, k)).astype(np.float32)
    bias = rng.standard_normal(48 * n_total).astype(np.float32)
    return m, a, bias, hidden, u0, n_groups


def _dense(m, hidden):
    """The (K, 48 * groups) matrix the packed columns stand for: column 48g + 16q + j is gate q of unit
    16g + j (zero for padded units), as gru_fast._layout.pack_into documents the layout."""
    n_total = -(-hidden // 16)
    dense = np.zeros((m.shape[1], 48 * n_total), np.float64)
    for q in range(3):
        for unit in range(hidden):
            g, j = divmod(unit, 16)
            dense[:, 48 * g + 16 * q + j] = m[q * hidden + unit]
    return dense


SENTINEL = np.float32(-12345.5)


def _call(run, kind, rows, a, w, bias, k, u0, n_groups):
    """``run`` into fresh rows of SENTINEL, outputs, bias and weights positioned at group u0: a group is
    K rows of 48 floats, or ceil(K/2) rows of 48 words (bfloat16 k pairs).  Each row of ``a`` is passed
    with a NaN after its K values."""
    c = np.full((rows, bias.size), SENTINEL, np.float32)
    padded = np.full((rows, k + 1), np.nan, np.float32)
    padded[:, :k] = a[:rows]
    group = 48 * (k if w.dtype == np.float32 else -(-k // 2))
    run(kind, rows, c[:, 48 * u0 :], padded, w, group * u0, bias[48 * u0 :], k, n_groups)
    return c


@pytest.mark.parametrize("kind", [PROJECT, RECUR, RECUR_ZR, RECUR_N], ids=["project", "all", "zr", "n"])
@pytest.mark.parametrize("k", KS)
def test_bf16_kernels_match_float64_product_of_rounded_weights(kind, k):
    m, a, bias, hidden, u0, n_groups = _case(kind, k)
    w = pack_bf16(m, hidden)
    wide = _dense(from_bf16(to_bf16(m)).astype(np.float64), hidden)
    s = bias.astype(np.float64) if kind == PROJECT else np.zeros(bias.size)
    a64 = a.astype(np.float64)
    exact = s + a64 @ wide
    bound = (k + 1) * 2.0**-24 * (np.abs(s) + np.abs(a64) @ np.abs(wide))

    cols = np.zeros(bias.size, bool)  # the columns this call computes
    for g in range(u0, u0 + n_groups):
        for q in TILES[kind]:
            cols[48 * g + 16 * q : 48 * g + 16 * q + 16] = True

    four = _call(_run_bf16, kind, 4, a, w, bias, k, u0, n_groups)
    assert np.all(four[:, ~cols] == SENTINEL)  # other tiles and groups untouched
    assert np.all(np.abs(four[:, cols] - exact[:, cols]) <= bound[:, cols])
    for row in range(4):  # one row at a time: the same bits
        one = _call(_run_bf16, kind, 1, a[row : row + 1], w, bias, k, u0, n_groups)
        np.testing.assert_array_equal(one[0], four[row])
    for row in (0, 2):  # two rows at a time: the same bits
        two = _call(_run_bf16, kind, 2, a[row : row + 2], w, bias, k, u0, n_groups)
        np.testing.assert_array_equal(two, four[row : row + 2])

    # the float32 kernels on the widened weights: the same bits, with 4, 2 and 1 rows
    w32 = np.zeros(bias.size // 48 * k * 48, np.float32)
    if k:
        _pack_into(w32, from_bf16(to_bf16(m)), hidden)
    np.testing.assert_array_equal(_call(_run_float32, kind, 4, a, w32, bias, k, u0, n_groups), four)
    np.testing.assert_array_equal(_call(_run_float32, kind, 2, a[1:3], w32, bias, k, u0, n_groups), four[1:3])
    np.testing.assert_array_equal(_call(_run_float32, kind, 1, a[3:], w32, bias, k, u0, n_groups), four[3:])


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_pack_bf16_writes_k_pairs(k):
    hidden = 20  # two groups, the second with 12 padded units
    rng = np.random.default_rng(k)
    m = rng.standard_normal((3 * hidden, k)).astype(np.float32)
    bits = to_bf16(m).astype(np.uint32)
    dense = np.zeros((k, 96), np.uint32)  # (K, 48 * groups) bit patterns, column 48g + 16q + j
    for q in range(3):
        for unit in range(hidden):
            g, j = divmod(unit, 16)
            dense[:, 48 * g + 16 * q + j] = bits[q * hidden + unit]
    pairs = -(-k // 2)
    want = np.zeros((2, pairs, 48), np.uint32)
    for g in range(2):
        for p in range(pairs):
            for j in range(48):
                high = dense[2 * p + 1, 48 * g + j] if 2 * p + 1 < k else 0
                want[g, p, j] = dense[2 * p, 48 * g + j] | high << 16
    packed = pack_bf16(m, hidden)
    assert packed.dtype == np.uint32
    np.testing.assert_array_equal(packed, want.ravel())


def test_model_params_hold_the_k_pairs():
    import gru_fast
    from gru_fast._layout import META_OFFSETS, OFFSET_R, OFFSET_W

    rng = np.random.default_rng(3)
    I, H = 5, 20  # odd K for W, even for R
    W = rng.standard_normal((1, 3 * H, I)).astype(np.float32)
    R = rng.standard_normal((1, 3 * H, H)).astype(np.float32)
    bf = gru_fast.GRU([(W, R, None)]).with_weights("bfloat16")
    params, meta = bf._params, bf._meta
    # header 16, W: 2 groups * 3 pair rows * 48 words, R: 2 * 10 * 48, b_x: 96, b_hn: 32 (all 64-byte multiples)
    assert params.size == 16 + 288 + 960 + 96 + 32
    for slot, K, m in ((OFFSET_W, I, W[0]), (OFFSET_R, H, R[0])):
        start = meta[META_OFFSETS + slot]
        want = pack_bf16(m, H)
        assert want.size == 2 * 48 * -(-K // 2)  # two groups of ceil(K/2) rows of 48 words
        np.testing.assert_array_equal(params[start : start + want.size].view(np.uint32), want)


def test_bf16_kernels_refuse_float64_state():
    from numba.core.errors import TypingError

    @njit(cache=False)
    def call(c, a, w, b):
        t.recur1_all_bf16(c.ctypes.data, a.ctypes.data, w.ctypes.data, b.ctypes.data, 1, 1, np.float64(0))

    with pytest.raises(TypingError):
        call(np.zeros(48), np.zeros(1), np.zeros(48, np.uint16), np.zeros(48))


def _torch_bf16_bits(x):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_rounding_matches_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    patterns = [rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)]
    kept = rng.integers(0, 2**16, 4096, dtype=np.uint64).astype(np.uint32) << np.uint32(16)
    for low in (0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF, 0x0001):  # ties, just below / above, exact
        patterns.append(kept | np.uint32(low))
    special = [0x00000000, 0x80000000,  # zeros
               0x00000001, 0x00008000, 0x00018000, 0x007F8000, 0x007FFFFF, 0x807FFFFF, 0x80008000,  # subnormals
               0x00800000, 0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # ties to even: down, up
               0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F7E8000,  # largest finite: to inf, or not
               0x7F800000, 0xFF800000]  # infinities
    patterns.append(np.array(special, np.uint32))
    x = np.concatenate(patterns).view(np.float32)
    x = x[~np.isnan(x)]
    ours, theirs = to_bf16(x), _torch_bf16_bits(x)
    assert np.isinf(from_bf16(ours[np.isin(x.view(np.uint32), [0x7F7FFFFF, 0xFF7FFFFF])])).all()
    mismatch = np.flatnonzero(ours != theirs)
    assert mismatch.size == 0, [(hex(x.view(np.uint32)[i]), hex(ours[i]), hex(theirs[i])) for i in mismatch[:5]]


def test_nan_stays_nan_with_its_sign():
    bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000], np.uint32)
    x = bits.view(np.float32)
    ours = from_bf16(to_bf16(x))
    assert np.isnan(ours).all() and np.isnan(from_bf16(_torch_bf16_bits(x))).all()
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(x))


def test_widening_is_exact_and_rounding_a_fixed_point():
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    wide = from_bf16(bits)
    finite = ~np.isnan(wide)
    np.testing.assert_array_equal(wide.view(np.uint32)[finite] >> 16, bits[finite])
    np.testing.assert_array_equal(to_bf16(wide)[finite], bits[finite])


def test_rounding_keeps_shape_and_ignores_strides():
    x = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    np.testing.assert_array_equal(to_bf16(x[:, ::3]), to_bf16(np.ascontiguousarray(x[:, ::3])))
    scalar = to_bf16(np.array(1.00390625, np.float32))  # 1 + 2^-8: a tie, down to the even 1.0
    assert scalar.shape == () and scalar == 0x3F80


def test_bad_arguments():
    with pytest.raises(TypeError, match="x must be a float32"):
        to_bf16(np.zeros(3))
    with pytest.raises(TypeError, match="bits must be a uint16"):
        from_bf16(np.zeros(3, np.int16))
    with pytest.raises(TypeError, match="m must be a float32"):
        pack_bf16(np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match=r"m must have shape"):
        pack_bf16(np.zeros((4, 2), np.float32), 1)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        pack_bf16(np.zeros((0, 2), np.float32), 0)


@pytest.mark.parametrize("weights", ["float32", "bf16"])
@pytest.mark.parametrize("kind", [PROJECT, RECUR, RECUR_ZR, RECUR_N], ids=["project", "all", "zr", "n"])
@pytest.mark.parametrize("k", KS)
def test_three_six_and_eight_row_kernels_match_float64_product_and_four_rows(kind, k, weights):
    m, _, bias, hidden, u0, n_groups = _case(kind, k)
    a = np.random.default_rng(k + 7).standard_normal((8, k)).astype(np.float32)
    w32 = np.zeros(bias.size // 48 * k * 48, np.float32)  # float32 weights, packed: those given, or the widened bf16
    if weights == "bf16":
        m = from_bf16(to_bf16(m))  # what the bfloat16 words stand for, exactly
        w, run_many, run_four = pack_bf16(m, hidden), _run_many_bf16, _run_bf16
    else:
        w, run_many, run_four = w32, _run_many_float32, _run_float32
    if k:
        _pack_into(w32, m, hidden)
    dense = _dense(m.astype(np.float64), hidden)
    s = bias.astype(np.float64) if kind == PROJECT else np.zeros(bias.size)
    a64 = a.astype(np.float64)
    exact = s + a64 @ dense
    bound = (k + 1) * 2.0**-24 * (np.abs(s) + np.abs(a64) @ np.abs(dense))
    cols = np.zeros(bias.size, bool)
    for g in range(u0, u0 + n_groups):
        for q in TILES[kind]:
            cols[48 * g + 16 * q : 48 * g + 16 * q + 16] = True

    eight = _call(run_many, kind, 8, a, w, bias, k, u0, n_groups)
    assert np.all(eight[:, ~cols] == SENTINEL)
    assert np.all(np.abs(eight[:, cols] - exact[:, cols]) <= bound[:, cols])
    for row in (0, 4):  # four rows at a time: the same bits
        np.testing.assert_array_equal(_call(run_four, kind, 4, a[row : row + 4], w, bias, k, u0, n_groups),
                                      eight[row : row + 4])
    for rows, first in ((6, 0), (6, 2), (3, 0), (3, 5)):  # six and three rows at a time: the same bits
        np.testing.assert_array_equal(_call(run_many, kind, rows, a[first : first + rows], w, bias, k, u0, n_groups),
                                      eight[first : first + rows])
    if weights == "bf16":  # the float32 kernels on the widened weights: the same bits
        for rows in (8, 6, 3):
            np.testing.assert_array_equal(_call(_run_many_float32, kind, rows, a[:rows], w32, bias, k, u0, n_groups),
                                          eight[:rows])
