"""Variable-length sequences: ``lengths`` follows PackedSequence semantics.

Documented rule (API contract, README "Semantics"): y is 0 at steps t >= length; h_n is the state after
each sequence's last valid step; a reverse direction starts at step length-1 of its own sequence, not at
T-1; a length of 0 gives y all 0 and h_n = h0 (zeros when h0 is None).

Authorities: torch.nn.GRU (packed sequences, and each sequence run on its own, truncated to its length),
ONNX Runtime's GRU (direction=reverse, each row truncated), and the rule above for length 0, which neither
runtime implements the same way (PyTorch refuses 0, ONNX Runtime returns Y_h = 0).
"""

from __future__ import annotations

import numpy as np
import pytest

import gru_fast
from conftest import (assert_matches, convert_torch, random_onnx_weights, run_onnxruntime, run_torch,
                      torch_gru)

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
# Small batches run row by row, large ones (B >= 8 today) one matrix product per step: cover both.
BATCHES = pytest.mark.parametrize("batch", [5, 10], ids=["B5", "B10"])


def _model_and_inputs(rng, *, num_layers, bidirectional, dtype, T=7, B=5, I=3, H=4, batch_first=False,
                      seed=0):
    module = torch_gru(I, H, num_layers, bidirectional=bidirectional, batch_first=batch_first, dtype=dtype,
                       seed=seed)
    D = 2 if bidirectional else 1
    shape = (B, T, I) if batch_first else (T, B, I)
    x = rng.standard_normal(shape).astype(dtype)
    h0 = rng.standard_normal((num_layers * D, B, H)).astype(dtype)
    return module, convert_torch(module), x, h0


@DTYPES
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padded_steps_are_exactly_zero(bidirectional, dtype, rng):
    """Documented rule (and torch's pad_packed_sequence): every y entry at t >= length is exactly 0, in
    every direction's half, for every layer count."""
    for num_layers in (1, 2):
        module, model, x, h0 = _model_and_inputs(rng, num_layers=num_layers, bidirectional=bidirectional,
                                                 dtype=dtype)
        lengths = np.array([7, 1, 4, 6, 2])
        y, _ = model(x, h0, lengths)
        for b, n in enumerate(lengths):
            assert np.all(y[n:, b] == 0.0), f"row {b}: y is not 0 after its length {n}"
            assert np.all(y[:n, b] != 0.0), f"row {b}: a valid step is exactly 0 (suspicious)"


@pytest.mark.parametrize("batch", [4, 9], ids=["B4", "B9"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_padding_is_written_into_dirty_out_buffers(direction, batch, rng):
    """Documented rule with out=: padded steps of y are set to 0 and length-0 rows of h_n to h0 even when
    the caller's buffers start out holding NaN (the engine must write them, not rely on fresh memory)."""
    D = 2 if direction == "bidirectional" else 1
    layers = [random_onnx_weights(rng, D, 3 if l == 0 else D * 4, 4) for l in range(2)]
    model = gru_fast.GRU(layers, direction=direction)
    x = rng.standard_normal((6, batch, 3)).astype(np.float32)
    h0 = rng.standard_normal((2 * D, batch, 4)).astype(np.float32)
    lengths = np.array([6, 0, 2, 5, 1, 6, 3, 0, 4])[:batch]
    y = np.full((6, batch, D * 4), np.nan, np.float32)
    h_n = np.full((2 * D, batch, 4), np.nan, np.float32)
    model(x, h0, lengths, out=(y, h_n))
    assert not np.isnan(y).any() and not np.isnan(h_n).any()
    for b, n in enumerate(lengths):
        assert np.all(y[n:, b] == 0.0)
    assert np.array_equal(h_n[:, 1], h0[:, 1])
    y_fresh, h_fresh = model(x, h0, lengths)
    assert np.array_equal(y, y_fresh) and np.array_equal(h_n, h_fresh)


@DTYPES
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_each_row_equals_its_own_truncated_sequence(bidirectional, dtype, rng):
    """Authority: torch.nn.GRU run separately on each sequence truncated to its length (no packing at
    all).  So h_n is the state after the last valid step, and the reverse direction of a bidirectional
    GRU starts at each sequence's own last step."""
    module, model, x, h0 = _model_and_inputs(rng, num_layers=2, bidirectional=bidirectional, dtype=dtype)
    lengths = np.array([3, 7, 1, 5, 6])
    y, h_n = model(x, h0, lengths)
    for b, n in enumerate(lengths):
        y_ref, h_ref = run_torch(module, x[:n, b], h0[:, b])  # unbatched (n, I)
        assert_matches(y[:n, b], y_ref, authority="torch.nn.GRU (truncated row)", dtype=dtype,
                       what=f"row {b} y")
        assert_matches(h_n[:, b], h_ref, authority="torch.nn.GRU (truncated row)", dtype=dtype,
                       what=f"row {b} h_n")


@BATCHES
@DTYPES
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_against_packed_sequences(bidirectional, batch_first, dtype, batch, rng):
    """Authority: torch.nn.GRU on pack_padded_sequence(enforce_sorted=False) output, padded back with
    pad_packed_sequence(total_length=T); lengths unsorted and all below T (so the last steps are padding
    for every row)."""
    module, model, x, h0 = _model_and_inputs(rng, num_layers=3, bidirectional=bidirectional, dtype=dtype,
                                             batch_first=batch_first, B=batch)
    lengths = np.array([2, 6, 1, 6, 4, 3, 5, 1, 2, 6])[:batch]
    y, h_n = model(x, h0, lengths)
    y_ref, h_ref = run_torch(module, x, h0, lengths)
    assert_matches(y, y_ref, authority="torch.nn.GRU (packed)", dtype=dtype, what="y")
    assert_matches(h_n, h_ref, authority="torch.nn.GRU (packed)", dtype=dtype, what="h_n")


@DTYPES
def test_full_lengths_equal_no_lengths(dtype, rng):
    """Authority: torch.nn.GRU without packing; lengths all equal to T are the same as no lengths."""
    module, model, x, h0 = _model_and_inputs(rng, num_layers=2, bidirectional=True, dtype=dtype)
    y, h_n = model(x, h0, np.full(5, 7))
    y_ref, h_ref = run_torch(module, x, h0)
    assert_matches(y, y_ref, authority="torch.nn.GRU", dtype=dtype, what="y")
    assert_matches(h_n, h_ref, authority="torch.nn.GRU", dtype=dtype, what="h_n")


def test_reverse_direction_starts_at_each_rows_last_step(rng):
    """Authority: ONNX Runtime's GRU with direction=reverse, run on each row truncated to its length with
    no sequence_lens (so ORT's own reverse starts at that row's last step), and on the whole batch with
    sequence_lens."""
    W, R, B = random_onnx_weights(rng, 1, 3, 4)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    h0 = rng.standard_normal((1, 4, 4)).astype(np.float32)
    lengths = np.array([2, 6, 3, 1])
    model = gru_fast.GRU([(W, R, B)], direction="reverse", linear_before_reset=False)
    y, h_n = model(x, h0, lengths)
    for b, n in enumerate(lengths):
        y_ref, h_ref = run_onnxruntime(x[:n, b:b + 1], W, R, B, initial_h=h0[:, b:b + 1], direction="reverse")
        assert_matches(y[:n, b], y_ref[:, 0], authority="onnxruntime GRU (truncated row)", dtype=np.float32,
                       what=f"row {b} y")
        assert_matches(h_n[:, b], h_ref[:, 0], authority="onnxruntime GRU (truncated row)", dtype=np.float32,
                       what=f"row {b} h_n")
        assert np.all(y[n:, b] == 0.0)
    y_ref, h_ref = run_onnxruntime(x, W, R, B, sequence_lens=lengths, initial_h=h0, direction="reverse")
    assert_matches(y, y_ref, authority="onnxruntime GRU", dtype=np.float32, what="y")
    assert_matches(h_n, h_ref, authority="onnxruntime GRU", dtype=np.float32, what="h_n")


@pytest.mark.parametrize("lengths_type", ["int32", "int64", "uint16", "list"])
def test_integer_types_of_lengths(lengths_type, rng):
    """Authority: torch.nn.GRU (packed).  lengths may be any integer array or a list of Python ints."""
    module, model, x, h0 = _model_and_inputs(rng, num_layers=1, bidirectional=True, dtype=np.float32)
    raw = [5, 7, 2, 1, 3]
    lengths = raw if lengths_type == "list" else np.array(raw, dtype=lengths_type)
    y, h_n = model(x, h0, lengths)
    y_ref, h_ref = run_torch(module, x, h0, np.array(raw))
    assert_matches(y, y_ref, authority="torch.nn.GRU (packed)", dtype=np.float32, what="y")
    assert_matches(h_n, h_ref, authority="torch.nn.GRU (packed)", dtype=np.float32, what="h_n")


@DTYPES
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_unbatched_lengths(bidirectional, dtype, rng):
    """Authority: torch.nn.GRU on the unbatched sequence truncated to the length.  Unbatched lengths is a
    scalar or shape (1,); the steps after it are 0 in y."""
    module = torch_gru(3, 4, 2, bidirectional=bidirectional, dtype=dtype, seed=2)
    model = convert_torch(module)
    D = 2 if bidirectional else 1
    x = rng.standard_normal((6, 3)).astype(dtype)
    h0 = rng.standard_normal((2 * D, 4)).astype(dtype)
    y_ref, h_ref = run_torch(module, x[:4], h0)
    for lengths in (4, np.int64(4), np.array([4])):
        y, h_n = model(x, h0, lengths)
        assert y.shape == (6, D * 4) and h_n.shape == (2 * D, 4)
        assert_matches(y[:4], y_ref, authority="torch.nn.GRU (truncated)", dtype=dtype, what="y")
        assert np.all(y[4:] == 0.0)
        assert_matches(h_n, h_ref, authority="torch.nn.GRU (truncated)", dtype=dtype, what="h_n")


# --------------------------------------------------------------------------------------------------
# length 0: documented rule y = 0, h_n = h0
# --------------------------------------------------------------------------------------------------

@BATCHES
@DTYPES
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
def test_length_zero_keeps_h0_and_leaves_other_rows_alone(with_h0, direction, dtype, batch, rng):
    """Documented rule for a length-0 row: y all 0, h_n equal to h0 (zeros when h0 is None), in every
    layer.  Authority for the other rows: torch.nn.GRU (packed) on the batch without the length-0 rows
    (for "reverse", which torch cannot express, ONNX Runtime on that batch)."""
    T, B, I, H, L = 6, batch, 3, 4, 2
    D = 2 if direction == "bidirectional" else 1
    lengths = np.array([6, 0, 3, 1, 0, 2, 6, 5, 0, 4])[:B]
    zero_rows = [b for b in range(B) if lengths[b] == 0]
    keep = [b for b in range(B) if b not in zero_rows]
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((L * D, B, H)).astype(dtype) if with_h0 else None
    if direction == "reverse":
        layers = [random_onnx_weights(rng, 1, I if l == 0 else H, H, dtype=np.float32) for l in range(L)]
        model = gru_fast.GRU(layers, direction="reverse", linear_before_reset=True, dtype=dtype)
        layer_in, parts = x[:, keep].astype(np.float32), []
        for l, (W, R, Bias) in enumerate(layers):
            init = None if h0 is None else h0[l:l + 1, keep].astype(np.float32)
            layer_in, h_l = run_onnxruntime(layer_in, W, R, Bias, sequence_lens=lengths[keep], initial_h=init,
                                            direction="reverse", linear_before_reset=1)
            parts.append(h_l)
        # ORT computes in float32 (on x rounded to float32 for a float64 model): ORT's tolerance
        y_ref, h_ref = layer_in, np.concatenate(parts)
        authority = "onnxruntime GRU" + (" (float32 run)" if dtype == np.float64 else "")
        tol = dict(tol=1e-5, rtol=1e-5)
    else:
        module = torch_gru(I, H, L, bidirectional=direction == "bidirectional", dtype=dtype, seed=11)
        model = convert_torch(module)
        y_ref, h_ref = run_torch(module, x[:, keep], None if h0 is None else h0[:, keep], lengths[keep])
        authority, tol = "torch.nn.GRU (packed, other rows)", {}

    y, h_n = model(x, h0, lengths)
    expected_h = np.zeros((L * D, B, H), dtype) if h0 is None else h0
    for b in zero_rows:
        assert np.all(y[:, b] == 0.0), f"row {b} (length 0): y is not all 0"
        assert np.array_equal(h_n[:, b], expected_h[:, b]), f"row {b} (length 0): h_n != h0"
    assert_matches(y[:, keep], y_ref, authority=authority, dtype=dtype, what="other rows y", **tol)
    assert_matches(h_n[:, keep], h_ref, authority=authority, dtype=dtype, what="other rows h_n", **tol)


@DTYPES
def test_all_lengths_zero(dtype, rng):
    """Documented rule: with every length 0, y is all 0 and h_n is exactly h0 (or zeros)."""
    module, model, x, h0 = _model_and_inputs(rng, num_layers=2, bidirectional=True, dtype=dtype)
    y, h_n = model(x, h0, np.zeros(5, dtype=np.int64))
    assert np.all(y == 0.0)
    assert np.array_equal(h_n, h0)
    y, h_n = model(x, None, np.zeros(5, dtype=np.int64))
    assert np.all(y == 0.0) and np.all(h_n == 0.0)


def test_unbatched_length_zero(rng):
    """Documented rule on an unbatched input: length 0 gives y = 0 and h_n = h0."""
    module = torch_gru(3, 4, 2, bidirectional=True, seed=12)
    model = convert_torch(module)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    h0 = rng.standard_normal((4, 4)).astype(np.float32)
    y, h_n = model(x, h0, 0)
    assert y.shape == (5, 8) and np.all(y == 0.0)
    assert np.array_equal(h_n, h0)
