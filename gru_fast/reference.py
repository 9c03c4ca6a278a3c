"""A reference GRU: the equations of the README's "Semantics" (the ONNX GRU specification) written out in
float64 numpy, step by step, for checking an engine where no other runtime can run a case.

The test suite (tests/conftest.py: float64 with ONNX activations, clip or sequence lengths) and the
benchmark (its parity reference when torch is not installed) both use it.  It is independent of the
engine: it imports nothing from gru_fast, and its activations are written out here from the ONNX
operator specification.  Slow by design (a Python loop over sequences and steps).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ACTIVATION_PARAMS", "ACTIVATION_NAMES", "ACTIVATION_DEFAULTS", "onnx_activation",
           "resolve_activations", "gru_equations"]

# ONNX activation names and whether they take alpha / beta (ONNX operator specification).
ACTIVATION_PARAMS = {
    "Sigmoid": (False, False),
    "Tanh": (False, False),
    "Relu": (False, False),
    "HardSigmoid": (True, True),
    "LeakyRelu": (True, False),
    "ThresholdedRelu": (True, False),
    "ScaledTanh": (True, True),
    "Affine": (True, True),
    "Elu": (True, False),
    "Softsign": (False, False),
    "Softplus": (False, False),
}
ACTIVATION_NAMES = tuple(ACTIVATION_PARAMS)
# ONNX Runtime's defaults for an activation's alpha / beta when activation_alpha/beta run out
# (onnxruntime/core/providers/cpu/rnn/rnn_helpers.cc, NameToArgDefaultsMap): LeakyRelu 0.01,
# HardSigmoid (0.2, 0.5), Elu 1.0; every other parameter defaults to 0.0 (so ScaledTanh and Affine with no
# parameters are identically 0 and ThresholdedRelu is Relu-like with threshold 0).
ACTIVATION_DEFAULTS = {
    "HardSigmoid": (0.2, 0.5),
    "LeakyRelu": (0.01, 0.0),
    "Elu": (1.0, 0.0),
}


def onnx_activation(name, alpha, beta):
    """The ONNX RNN activation ``name`` as a numpy function (ONNX operator specification, RNN/GRU)."""
    name = name.lower()
    if name == "sigmoid":
        return lambda v: 1.0 / (1.0 + np.exp(-v))
    if name == "tanh":
        return np.tanh
    if name == "relu":
        return lambda v: np.maximum(v, 0.0)
    if name == "hardsigmoid":
        return lambda v: np.clip(alpha * v + beta, 0.0, 1.0)
    if name == "leakyrelu":
        return lambda v: np.where(v >= 0, v, alpha * v)
    if name == "thresholdedrelu":
        return lambda v: np.where(v > alpha, v, 0.0)
    if name == "scaledtanh":
        return lambda v: alpha * np.tanh(beta * v)
    if name == "affine":
        return lambda v: alpha * v + beta
    if name == "elu":
        return lambda v: np.where(v >= 0, v, alpha * (np.exp(np.minimum(v, 0.0)) - 1.0))
    if name == "softsign":
        return lambda v: v / (1.0 + np.abs(v))
    if name == "softplus":
        return lambda v: np.logaddexp(0.0, v)
    raise ValueError(name)


def resolve_activations(names, alphas, betas, num_directions):
    """ONNX's rule: 2 names per direction (2 names shared when only 2 are given), alpha/beta lists
    consumed in order by the activations that take them, ORT defaults otherwise.
    Returns [(name, alpha, beta)] * 2D."""
    if names is None:
        return [("Sigmoid", 0.0, 0.0), ("Tanh", 0.0, 0.0)] * num_directions
    names = list(names)
    if len(names) == 2 and num_directions == 2:
        names = names * 2
    alphas, betas = list(alphas or []), list(betas or [])
    out = []
    for name in names:
        takes_alpha, takes_beta = ACTIVATION_PARAMS[name]
        alpha, beta = ACTIVATION_DEFAULTS.get(name, (0.0, 0.0))
        if takes_alpha and alphas:
            alpha = alphas.pop(0)
        if takes_beta and betas:
            beta = betas.pop(0)
        out.append((name, float(alpha), float(beta)))
    return out


def gru_equations(x, layers, *, direction="forward", linear_before_reset=True, activations=None,
                  activation_alpha=None, activation_beta=None, clip=None, h0=None, lengths=None):
    """The GRU recurrence of the README's "Semantics" / the ONNX GRU specification, in float64.

    x (T, B, I); layers [(W, R, B)] in ONNX layout; h0 (L*D, B, H); lengths (B,) with PackedSequence
    semantics (y = 0 at t >= length, h_n = state after the last valid step, reverse starts at length-1,
    length 0 leaves h_n = h0).  Returns (y (T, B, D*H), h_n (L*D, B, H)) in float64.
    """
    x = np.asarray(x, dtype=np.float64)
    T, Bsz, _ = x.shape
    D = 2 if direction == "bidirectional" else 1
    H = layers[0][1].shape[-1]
    L = len(layers)
    acts = resolve_activations(activations, activation_alpha, activation_beta, D)
    lengths = np.full(Bsz, T) if lengths is None else np.asarray(lengths).astype(np.int64)
    h0 = np.zeros((L * D, Bsz, H)) if h0 is None else np.asarray(h0, dtype=np.float64)
    h_n = np.zeros((L * D, Bsz, H))
    clamp = (lambda v: np.clip(v, -clip, clip)) if clip is not None else (lambda v: v)
    layer_in = x
    for layer, (W, R, Bias) in enumerate(layers):
        W = np.asarray(W, np.float64)
        R = np.asarray(R, np.float64)
        Bias = np.zeros((D, 6 * H)) if Bias is None else np.asarray(Bias, np.float64)
        y = np.zeros((T, Bsz, D * H))
        for d in range(D):
            f = onnx_activation(*acts[2 * d])
            g = onnx_activation(*acts[2 * d + 1])
            Wz, Wr, Wh = np.split(W[d], 3)
            Rz, Rr, Rh = np.split(R[d], 3)
            bWz, bWr, bWh, bRz, bRr, bRh = np.split(Bias[d], 6)
            reverse = direction == "reverse" or d == 1
            for b in range(Bsz):
                h = h0[layer * D + d, b].copy()
                n = int(lengths[b])
                steps = range(n - 1, -1, -1) if reverse else range(n)
                for t in steps:
                    xt = layer_in[t, b]
                    z = f(clamp(xt @ Wz.T + bWz + h @ Rz.T + bRz))
                    r = f(clamp(xt @ Wr.T + bWr + h @ Rr.T + bRr))
                    if linear_before_reset:
                        c = g(clamp(xt @ Wh.T + bWh + r * (h @ Rh.T + bRh)))
                    else:
                        c = g(clamp(xt @ Wh.T + bWh + (r * h) @ Rh.T + bRh))
                    h = (1.0 - z) * c + z * h
                    y[t, b, d * H:(d + 1) * H] = h
                h_n[layer * D + d, b] = h
        layer_in = y
    return layer_in, h_n
