"""Parity with the ONNX GRU operator for what PyTorch cannot express.

Authorities:

* ONNX Runtime (CPU) running a single ``GRU`` node built with ``onnx.helper`` (opset 14): float32 only;
  linear_before_reset=0, every activation, activation_alpha/beta, clip, reverse and bidirectional,
  sequence_lens, initial_h, no bias.  Tolerance: 1e-5 absolute plus 1e-5 relative (ORT evaluates
  Sigmoid/Tanh with a rational approximation, about 1e-7 relative, and unbounded activations can make
  states larger than 1).
* ``onnx.reference.ReferenceEvaluator`` where ORT refuses: float64 (ORT: "GRU operator does not support
  double") and layout=1 (ORT: "Batchwise recurrent operations (layout == 1) are not supported").  The
  reference op implements default activations only and ignores clip and sequence_lens, so it is used only
  without them.  Tolerance 1e-10.
* The documented equations (conftest.gru_equations) for float64 with non-default activations, clip and
  lengths, which neither runtime runs; each such test first pins the equations to ONNX Runtime in float32.

The gru_fast model is built from the same W/R/B arrays via ``gru_fast.GRU([(W, R, B)], ...)``.  Lengths of
0 are kept out of ORT comparisons (ORT returns Y_h = 0 there, our documented rule is h_n = h0; see
test_lengths.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gru_fast
from conftest import (ACTIVATION_NAMES, ACTIVATION_PARAMS, assert_matches, gru_equations, max_abs_error,
                      random_onnx_weights, run_onnx_reference, run_onnxruntime)

ORT = "onnxruntime GRU"
ORT_TOL = dict(tol=1e-5, rtol=1e-5)
DIRECTIONS = ["forward", "reverse", "bidirectional"]


def _num_directions(direction):
    return 2 if direction == "bidirectional" else 1


def _exact_f32(values):
    """Parameters exactly representable in float32, so ORT (float32 attributes) and we use the same ones."""
    return [float(np.float32(v)) for v in values]


def _params_for(rng, names):
    """Random alpha/beta lists, one value per activation that takes the parameter (in order)."""
    n_alpha = sum(ACTIVATION_PARAMS[n][0] for n in names)
    n_beta = sum(ACTIVATION_PARAMS[n][1] for n in names)
    alpha = _exact_f32(rng.integers(8, 72, n_alpha) / 64.0)  # 0.125 .. 1.11
    beta = _exact_f32(rng.integers(8, 72, n_beta) / 64.0)
    return alpha or None, beta or None


def _case(rng, direction, *, T=5, B=3, I=4, H=3, bias=True, scale=None, dtype=np.float32,
          with_h0=True, with_lengths=True, data_scale=1.0):
    D = _num_directions(direction)
    W, R, Bias = random_onnx_weights(rng, D, I, H, bias=bias, dtype=dtype, scale=scale)
    x = (data_scale * rng.standard_normal((T, B, I))).astype(dtype)
    h0 = (data_scale * rng.standard_normal((D, B, H))).astype(dtype) if with_h0 else None
    lengths = None
    if with_lengths:
        lengths = rng.integers(1, T + 1, B)  # never 0 with ORT (see module docstring)
        lengths[0] = T
    return W, R, Bias, x, h0, lengths


def _ours(W, R, Bias, x, h0, lengths, **attrs):
    lbr = attrs.pop("linear_before_reset", 0)
    model = gru_fast.GRU([(W, R, Bias)], linear_before_reset=bool(lbr), **attrs)
    return model(x, h0, lengths)


def _compare_with_ort(W, R, Bias, x, h0, lengths, what, **attrs):
    y_ref, h_ref = run_onnxruntime(x, W, R, Bias, sequence_lens=lengths, initial_h=h0, **attrs)
    y, h_n = _ours(W, R, Bias, x, h0, lengths, **dict(attrs))
    assert_matches(y, y_ref, authority=ORT, dtype=np.float32, what=f"{what}: y", **ORT_TOL)
    assert_matches(h_n, h_ref, authority=ORT, dtype=np.float32, what=f"{what}: h_n", **ORT_TOL)
    return y, h_n


# --------------------------------------------------------------------------------------------------
# variants, directions, optional inputs (ONNX Runtime)
# --------------------------------------------------------------------------------------------------

# Small batches run row by row, large ones (B >= 8 today) one matrix product per step: cover both.
BATCHES = pytest.mark.parametrize("batch", [4, 11], ids=["B4", "B11"])


@BATCHES
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "sequence_lens"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h", "initial_h"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lbr", [0, 1], ids=["lbr0", "lbr1"])
def test_variant_direction_and_optional_inputs(lbr, direction, bias, with_h0, with_lengths, batch, rng):
    """Authority: ONNX Runtime's GRU with linear_before_reset=lbr, the given direction, with/without B,
    initial_h and sequence_lens (reverse starts at each sequence's own last step)."""
    W, R, Bias, x, h0, lengths = _case(rng, direction, T=6, B=batch, I=3, H=5, bias=bias, with_h0=with_h0,
                                       with_lengths=with_lengths)
    _compare_with_ort(W, R, Bias, x, h0, lengths, "variant", direction=direction, linear_before_reset=lbr)


def test_linear_before_reset_changes_the_result(rng):
    """Authority: ONNX Runtime.  The two candidate forms differ (by much more than the tolerance) on the
    same weights, and each of ours matches its own ORT form: the variant flag is honoured, not ignored."""
    W, R, Bias, x, h0, lengths = _case(rng, "forward", T=6, B=3, I=3, H=4, scale=1.0)
    y0, _ = _compare_with_ort(W, R, Bias, x, h0, lengths, "lbr=0", linear_before_reset=0)
    y1, _ = _compare_with_ort(W, R, Bias, x, h0, lengths, "lbr=1", linear_before_reset=1)
    assert max_abs_error(y0, y1) > 1e-2


# --------------------------------------------------------------------------------------------------
# activations (ONNX Runtime)
# --------------------------------------------------------------------------------------------------

_PAIRS = list(itertools.product(ACTIVATION_NAMES, ACTIVATION_NAMES))
# With an unbounded f (Relu, Affine, Softplus, ...) z leaves [0, 1] and the state can grow
# super-exponentially; small weights and inputs keep every case's states below ~100 over T=5 steps.
_SMALL = dict(scale=0.25, data_scale=0.5)


@pytest.mark.parametrize("lbr", [0, 1], ids=["lbr0", "lbr1"])
@pytest.mark.parametrize("f,g", _PAIRS, ids=[f"{f}-{g}" for f, g in _PAIRS])
def test_activation_pair_with_explicit_parameters(f, g, lbr, rng):
    """Authority: ONNX Runtime's GRU with activations=[f, g] and explicit activation_alpha/beta (consumed
    in order by the activations that take them).  lbr=1 cases use a large batch (B=9), lbr=0 a small one,
    so both the row-by-row and the whole-batch kernels see every activation."""
    W, R, Bias, x, h0, lengths = _case(rng, "forward", B=9 if lbr else 3, **_SMALL)
    alpha, beta = _params_for(rng, [f, g])
    _compare_with_ort(W, R, Bias, x, h0, lengths, f"[{f}, {g}]", linear_before_reset=lbr, activations=[f, g],
                      activation_alpha=alpha, activation_beta=beta)


@pytest.mark.parametrize("position", ["f", "g"])
@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_activation_with_default_parameters(name, position, rng):
    """Authority: ONNX Runtime's GRU with one non-default activation and no activation_alpha/beta, i.e.
    ONNX Runtime's defaults (LeakyRelu 0.01, HardSigmoid 0.2/0.5, Elu 1.0, every other parameter 0.0:
    onnxruntime/core/providers/cpu/rnn/rnn_helpers.cc), which the API contract adopts."""
    acts = [name, "Tanh"] if position == "f" else ["Sigmoid", name]
    for lbr in (0, 1):
        W, R, Bias, x, h0, lengths = _case(rng, "forward", **_SMALL)
        _compare_with_ort(W, R, Bias, x, h0, lengths, f"{acts} defaults", linear_before_reset=lbr,
                          activations=acts)


def test_activation_names_are_case_insensitive(rng):
    """Authority: ONNX Runtime (which lower-cases the names).  'hardsigmoid'/'SCALEDTANH' equal the
    canonical spellings."""
    W, R, Bias, x, h0, lengths = _case(rng, "forward")
    attrs = dict(activation_alpha=[0.25, 0.75], activation_beta=[0.5, 1.25])
    y_ref, h_ref = run_onnxruntime(x, W, R, Bias, sequence_lens=lengths, initial_h=h0,
                                   activations=["HardSigmoid", "ScaledTanh"], **attrs)
    y, h_n = _ours(W, R, Bias, x, h0, lengths, activations=["hardsigmoid", "SCALEDTANH"], **attrs)
    assert_matches(y, y_ref, authority=ORT, dtype=np.float32, what="y", **ORT_TOL)
    assert_matches(h_n, h_ref, authority=ORT, dtype=np.float32, what="h_n", **ORT_TOL)


@pytest.mark.parametrize("lbr", [0, 1], ids=["lbr0", "lbr1"])
def test_bidirectional_with_different_activations_per_direction(lbr, rng):
    """Authority: ONNX Runtime.  Four activations [f_fwd, g_fwd, f_rev, g_rev], each taking parameters,
    so the in-order consumption of activation_alpha (4 values) and activation_beta (3 values) across
    directions matters; with sequence_lens and initial_h."""
    W, R, Bias, x, h0, lengths = _case(rng, "bidirectional", T=6, B=4, I=3, H=4, **_SMALL)
    acts = ["HardSigmoid", "ScaledTanh", "LeakyRelu", "Affine"]
    _compare_with_ort(W, R, Bias, x, h0, lengths, "per-direction", direction="bidirectional",
                      linear_before_reset=lbr, activations=acts,
                      activation_alpha=[0.25, 0.75, 0.0625, 0.875], activation_beta=[0.5, 1.25, 0.125])


def test_bidirectional_two_names_are_shared_by_both_directions(rng):
    """Authority: ONNX Runtime given all four names [f, g, f, g] with the pair's parameters repeated,
    versus ours given only the shared pair [f, g] and its parameters once (the contract: 2 names are used
    for every direction).  ORT itself refuses 2 names for a bidirectional GRU, so this short form is ours
    and its parameters go with the pair."""
    W, R, Bias, x, h0, lengths = _case(rng, "bidirectional", **_SMALL)
    y_ref, h_ref = run_onnxruntime(x, W, R, Bias, sequence_lens=lengths, initial_h=h0,
                                   direction="bidirectional", activations=["HardSigmoid", "Elu"] * 2,
                                   activation_alpha=[0.25, 0.5] * 2, activation_beta=[0.375] * 2)
    y, h_n = _ours(W, R, Bias, x, h0, lengths, direction="bidirectional", activations=["HardSigmoid", "Elu"],
                   activation_alpha=[0.25, 0.5], activation_beta=[0.375])
    assert_matches(y, y_ref, authority=ORT, dtype=np.float32, what="y", **ORT_TOL)
    assert_matches(h_n, h_ref, authority=ORT, dtype=np.float32, what="h_n", **ORT_TOL)


def test_fewer_parameters_than_activations_fall_back_to_defaults(rng):
    """Authority: ONNX Runtime.  activation_alpha shorter than the activations that take alpha: the first
    ones consume the list in order, the rest take ONNX Runtime's defaults."""
    W, R, Bias, x, h0, lengths = _case(rng, "bidirectional", **_SMALL)
    _compare_with_ort(W, R, Bias, x, h0, lengths, "short alpha list", direction="bidirectional",
                      activations=["LeakyRelu", "Elu", "HardSigmoid", "Tanh"], activation_alpha=[0.25])


# --------------------------------------------------------------------------------------------------
# clip (ONNX Runtime)
# --------------------------------------------------------------------------------------------------

@BATCHES
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lbr", [0, 1], ids=["lbr0", "lbr1"])
@pytest.mark.parametrize("clip", [0.25, 1.0, 3.0])
def test_clip(clip, lbr, direction, batch, rng):
    """Authority: ONNX Runtime with clip: every gate pre-activation (after the biases) clamped to
    [-clip, clip].  Weights are large, and the test checks that clipping changes the result by more than
    the tolerance (so it cannot pass by ignoring clip)."""
    W, R, Bias, x, h0, lengths = _case(rng, direction, T=6, B=batch, I=4, H=4, scale=2.0)
    y, _ = _compare_with_ort(W, R, Bias, x, h0, lengths, f"clip={clip}", direction=direction,
                             linear_before_reset=lbr, clip=clip)
    y_unclipped, _ = run_onnxruntime(x, W, R, Bias, sequence_lens=lengths, initial_h=h0, direction=direction,
                                     linear_before_reset=lbr)
    assert max_abs_error(y, y_unclipped) > 1e-3


def test_clip_with_activations_and_lengths(rng):
    """Authority: ONNX Runtime: clip combined with non-default activations, reverse and sequence_lens."""
    W, R, Bias, x, h0, lengths = _case(rng, "reverse", T=7, B=4, I=3, H=5, scale=1.5)
    _compare_with_ort(W, R, Bias, x, h0, lengths, "clip+acts", direction="reverse", clip=0.8,
                      activations=["HardSigmoid", "Relu"], activation_alpha=[0.25], activation_beta=[0.5])


# --------------------------------------------------------------------------------------------------
# stacked layers (ONNX Runtime, one GRU node per layer)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", DIRECTIONS)
def test_three_stacked_layers_against_chained_onnxruntime_nodes(direction, rng):
    """Authority: ONNX Runtime, one GRU node per layer, chained the way the contract stacks layers: layer
    l's input is layer l-1's y (T, B, D*H), its initial_h is h0[l*D:(l+1)*D], h_n concatenates the
    layers' Y_h.  lbr=0, non-default activations, sequence_lens, no bias."""
    D = _num_directions(direction)
    T, Bsz, I, H, L = 6, 3, 4, 5, 3
    x = rng.standard_normal((T, Bsz, I)).astype(np.float32)
    h0 = rng.standard_normal((L * D, Bsz, H)).astype(np.float32)
    lengths = np.array([6, 2, 4])
    attrs = dict(direction=direction, activations=["HardSigmoid", "Softsign"] * D,
                 activation_alpha=[0.25] * D, activation_beta=[0.5] * D)
    layers = [random_onnx_weights(rng, D, I if l == 0 else D * H, H, bias=False) for l in range(L)]
    layer_in, h_parts = x, []
    for l, (W, R, _) in enumerate(layers):
        layer_in, h_l = run_onnxruntime(layer_in, W, R, None, sequence_lens=lengths,
                                        initial_h=h0[l * D:(l + 1) * D], **attrs)
        h_parts.append(h_l)
    model = gru_fast.GRU(layers, linear_before_reset=False, **attrs)
    y, h_n = model(x, h0, lengths)
    assert_matches(y, layer_in, authority=ORT, dtype=np.float32, what="y", **ORT_TOL)
    assert_matches(h_n, np.concatenate(h_parts), authority=ORT, dtype=np.float32, what="h_n", **ORT_TOL)


# --------------------------------------------------------------------------------------------------
# float64 and layout=1 (ONNX reference evaluator)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_h", "initial_h"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lbr", [0, 1], ids=["lbr0", "lbr1"])
def test_float64_against_onnx_reference(lbr, direction, bias, with_h0, rng):
    """Authority: onnx.reference.ReferenceEvaluator (ONNX Runtime has no float64 GRU), default
    activations, tolerance 1e-10."""
    W, R, Bias, x, h0, _ = _case(rng, direction, T=6, B=3, I=4, H=5, bias=bias, dtype=np.float64,
                                 with_h0=with_h0, with_lengths=False)
    Y, Y_h = run_onnx_reference(x, W, R, Bias, initial_h=h0, direction=direction, linear_before_reset=lbr)
    T, D, Bsz, H = Y.shape
    model = gru_fast.GRU([(W, R, Bias)], direction=direction, linear_before_reset=bool(lbr))
    assert model.dtype == np.float64
    y, h_n = model(x, h0)
    assert_matches(y, Y.transpose(0, 2, 1, 3).reshape(T, Bsz, D * H), authority="onnx.reference GRU",
                   dtype=np.float64, what="y")
    assert_matches(h_n, Y_h, authority="onnx.reference GRU", dtype=np.float64, what="h_n")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_batch_first_against_onnx_layout_1(direction, dtype, rng):
    """Authority: onnx.reference.ReferenceEvaluator with layout=1 (X (B, T, I), Y (B, T, D, H), which ORT
    rejects): our batch_first=True gives y = Y reshaped to (B, T, D*H); initial_h / Y_h are (B, D, H) in
    ONNX and (D, B, H) for us (batch_first does not apply to states)."""
    D = _num_directions(direction)
    W, R, Bias = random_onnx_weights(rng, D, 3, 4, dtype=dtype)
    x = rng.standard_normal((5, 6, 3)).astype(dtype)  # (B, T, I)
    h0 = rng.standard_normal((D, 5, 4)).astype(dtype)
    Y, Y_h = run_onnx_reference(x, W, R, Bias, initial_h=np.ascontiguousarray(h0.transpose(1, 0, 2)),
                                direction=direction, linear_before_reset=0, layout=1)
    assert Y.shape == (5, 6, D, 4)
    model = gru_fast.GRU([(W, R, Bias)], direction=direction, linear_before_reset=False, batch_first=True)
    y, h_n = model(x, h0)
    assert_matches(y, Y.reshape(5, 6, D * 4), authority="onnx.reference GRU (layout=1)", dtype=dtype, what="y")
    assert_matches(h_n, Y_h.transpose(1, 0, 2), authority="onnx.reference GRU (layout=1)", dtype=dtype,
                   what="h_n")


# --------------------------------------------------------------------------------------------------
# float64 with activations / clip / lengths (documented equations, pinned to ONNX Runtime)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["f", "g"])
@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_float64_activation_against_documented_equations(name, position, rng):
    """Authority: the ONNX GRU equations (conftest.gru_equations, float64) — first checked against ONNX
    Runtime in float32 on the same case (so the equations are ORT's semantics), then our float64 model is
    held to them at 1e-10.  Bidirectional, lbr=0, clip, sequence_lens, initial_h."""
    acts = [name, "Tanh"] if position == "f" else ["Sigmoid", name]
    acts = acts + ["Sigmoid", "Tanh"]
    alpha, beta = _params_for(rng, acts)
    attrs = dict(direction="bidirectional", linear_before_reset=0, activations=acts, activation_alpha=alpha,
                 activation_beta=beta, clip=2.5)
    W, R, Bias, x, h0, lengths = _case(rng, "bidirectional", T=6, B=3, I=4, H=3, dtype=np.float64, **_SMALL)

    # 1. the equations agree with ONNX Runtime (float32 copy of the case)
    f32 = [None if a is None else a.astype(np.float32) for a in (W, R, Bias, x, h0)]
    y_ort, h_ort = run_onnxruntime(f32[3], *f32[:3], sequence_lens=lengths, initial_h=f32[4], **attrs)
    y_eq32, h_eq32 = gru_equations(f32[3], [tuple(f32[:3])], h0=f32[4], lengths=lengths, **attrs)
    assert_matches(y_eq32, y_ort, authority="(equations vs) " + ORT, dtype=np.float32, what="y", **ORT_TOL)
    assert_matches(h_eq32, h_ort, authority="(equations vs) " + ORT, dtype=np.float32, what="h_n", **ORT_TOL)

    # 2. our float64 model agrees with the equations in float64
    y_eq, h_eq = gru_equations(x, [(W, R, Bias)], h0=h0, lengths=lengths, **attrs)
    lbr = attrs.pop("linear_before_reset")
    model = gru_fast.GRU([(W, R, Bias)], linear_before_reset=bool(lbr), dtype="float64", **attrs)
    y, h_n = model(x, h0, lengths)
    assert_matches(y, y_eq, authority="ONNX GRU equations", dtype=np.float64, what="y")
    assert_matches(h_n, h_eq, authority="ONNX GRU equations", dtype=np.float64, what="h_n")
