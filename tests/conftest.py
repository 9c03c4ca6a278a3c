"""Shared helpers for the engine tests: the authorities every parity test compares against.

Authorities (never our own engine's past output):

* PyTorch: ``torch.nn.GRU`` run on numpy inputs, with ``pack_padded_sequence`` for lengths
  (:func:`torch_gru`, :func:`run_torch`).
* ONNX Runtime: a one-node ONNX model holding a single ``GRU`` operator built with ``onnx.helper``
  (:func:`onnx_gru_model`, :func:`run_onnxruntime`).  ORT's CPU GRU is float32 only and rejects layout=1.
* The ONNX reference evaluator (``onnx.reference.ReferenceEvaluator``) for what ORT refuses (float64,
  layout=1); it implements default activations only and ignores clip and sequence_lens
  (:func:`run_onnx_reference`).
* The documented ONNX GRU equations (README "Semantics", the ONNX operator specification), written out
  in float64 numpy in :func:`gru_equations`; it is used only where neither runtime can run the case
  (float64 with non-default activations, clip or sequence_lens), and tests that use it pin it to ONNX
  Runtime in float32 in the same test.

Also: tolerances, a process-wide record of the worst parity error seen per (authority, dtype), printed in
the terminal summary, and :func:`run_python` for the tests that must run in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Maximum absolute error accepted against an authority running in the same precision.
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

# the documented equations in float64 numpy, and the ONNX activation tables they use
from gru_fast.reference import (ACTIVATION_DEFAULTS, ACTIVATION_NAMES, ACTIVATION_PARAMS,  # noqa: F401
                                gru_equations, onnx_activation, resolve_activations)

# --------------------------------------------------------------------------------------------------
# error bookkeeping
# --------------------------------------------------------------------------------------------------

_MAX_ERRORS: dict[tuple[str, str], float] = {}


def max_abs_error(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != expected {want.shape}"
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want)))


def assert_matches(got, want, *, authority: str, dtype, what: str = "", tol: float | None = None,
                   rtol: float = 0.0):
    """Assert ``|got - want| <= tol + rtol * |want|`` elementwise and record the worst absolute error.

    NaN in either array fails (an authority never returns NaN for our finite test inputs).
    """
    dtype = np.dtype(dtype)
    tol = TOLERANCE[dtype] if tol is None else tol
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {authority}'s {want.shape}"
    assert np.all(np.isfinite(want)), f"{what}: {authority} produced non-finite values (bad test input)"
    err = max_abs_error(got, want)
    bound = tol + rtol * np.abs(want.astype(np.float64))
    bad = ~(np.abs(got.astype(np.float64) - want.astype(np.float64)) <= bound)
    assert not bad.any(), (
        f"{what}: max abs error vs {authority} = {err:.3e} (tol {tol:g}, rtol {rtol:g}) "
        f"at {np.argwhere(bad)[:5].tolist()} ({int(bad.sum())} of {bad.size} elements)"
    )
    key = (authority, dtype.name)  # recorded for passing comparisons only: the summary is the margin
    _MAX_ERRORS[key] = max(_MAX_ERRORS.get(key, 0.0), err)


def pytest_terminal_summary(terminalreporter):
    if not _MAX_ERRORS:
        return
    terminalreporter.section("gru_fast parity: worst absolute error per authority (passing checks)")
    for (authority, dtype), err in sorted(_MAX_ERRORS.items()):
        terminalreporter.write_line(f"{authority:>24s} {dtype:>8s}: {err:.3e}")


# --------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------

def torch_gru(input_size, hidden_size, num_layers=1, *, bidirectional=False, batch_first=False, bias=True,
              dtype=np.float32, seed=0, bias_scale=None):
    """An ``nn.GRU`` in eval mode with seeded random weights (PyTorch's own init), in float32 or float64.

    ``bias_scale`` (optional) overwrites the biases with uniform(-bias_scale, bias_scale) values so that
    a test can make bias terms matter as much as the weights.
    """
    import torch

    torch.manual_seed(seed)
    module = torch.nn.GRU(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                          batch_first=batch_first, bias=bias)
    if np.dtype(dtype) == np.float64:
        module = module.double()
    if bias and bias_scale:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.startswith("bias"):
                    p.uniform_(-bias_scale, bias_scale)
    return module.eval()


def run_torch(module, x, h0=None, lengths=None):
    """Run ``module`` (nn.GRU) on numpy inputs the way our API describes them; return numpy (y, h_n).

    Lengths go through ``pack_padded_sequence(enforce_sorted=False)`` and
    ``pad_packed_sequence(total_length=T)``.  An unbatched (T, I) input with lengths runs as a batch of one.
    """
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    dtype = next(module.parameters()).dtype
    xt = torch.as_tensor(np.asarray(x)).to(dtype)
    ht = None if h0 is None else torch.as_tensor(np.asarray(h0)).to(dtype)
    with torch.no_grad():
        if lengths is None:
            y, h_n = module(xt, ht)
            return y.numpy(), h_n.numpy()
        unbatched = xt.dim() == 2
        if unbatched:
            xt = xt.unsqueeze(1 if not module.batch_first else 0)
            ht = None if ht is None else ht.unsqueeze(1)
        lens = torch.as_tensor(np.atleast_1d(np.asarray(lengths)).astype(np.int64))
        total = xt.shape[1 if module.batch_first else 0]
        packed = pack_padded_sequence(xt, lens, batch_first=module.batch_first, enforce_sorted=False)
        out, h_n = module(packed, ht)
        y, _ = pad_packed_sequence(out, batch_first=module.batch_first, total_length=total)
        if unbatched:
            y = y.squeeze(0 if module.batch_first else 1)
            h_n = h_n.squeeze(1)
        return y.numpy(), h_n.numpy()


def convert_torch(module):
    """``converters.from_torch.convert`` (the tested conversion path for torch parity)."""
    from converters.from_torch import convert

    return convert(module)


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------

def random_onnx_weights(rng, num_directions, input_size, hidden_size, *, bias=True, dtype=np.float32,
                        scale=None):
    """(W, R, B) in ONNX layout, uniform(-scale, scale) with scale = 1/sqrt(H) by default."""
    scale = 1.0 / np.sqrt(hidden_size) if scale is None else scale
    d, h, i = num_directions, hidden_size, input_size
    W = rng.uniform(-scale, scale, (d, 3 * h, i)).astype(dtype)
    R = rng.uniform(-scale, scale, (d, 3 * h, h)).astype(dtype)
    B = rng.uniform(-scale, scale, (d, 6 * h)).astype(dtype) if bias else None
    return W, R, B


def onnx_gru_model(W, R, B=None, *, direction="forward", linear_before_reset=0, activations=None,
                   activation_alpha=None, activation_beta=None, clip=None, with_sequence_lens=False,
                   with_initial_h=False, layout=0, opset=14):
    """A ModelProto with one GRU node. W, R, B are initializers; inputs are X, [sequence_lens], [initial_h]."""
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.DOUBLE if W.dtype == np.float64 else TensorProto.FLOAT
    graph_inputs = [helper.make_tensor_value_info("X", elem, None)]
    initializers = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
    node_inputs = ["X", "W", "R", ""]
    if B is not None:
        initializers.append(numpy_helper.from_array(B, "B"))
        node_inputs[3] = "B"
    node_inputs.append("")
    if with_sequence_lens:
        node_inputs[4] = "sequence_lens"
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, None))
    if with_initial_h:
        node_inputs.append("initial_h")
        graph_inputs.append(helper.make_tensor_value_info("initial_h", elem, None))
    while node_inputs[-1] == "":
        node_inputs.pop()
    attrs = dict(hidden_size=int(R.shape[-1]), direction=direction, linear_before_reset=int(linear_before_reset))
    if activations is not None:
        attrs["activations"] = list(activations)
    if activation_alpha is not None:
        attrs["activation_alpha"] = [float(a) for a in activation_alpha]
    if activation_beta is not None:
        attrs["activation_beta"] = [float(b) for b in activation_beta]
    if clip is not None:
        attrs["clip"] = float(clip)
    if layout:
        attrs["layout"] = int(layout)
    node = helper.make_node("GRU", node_inputs, ["Y", "Y_h"], **attrs)
    graph = helper.make_graph(
        [node], "one_gru", graph_inputs,
        [helper.make_tensor_value_info("Y", elem, None), helper.make_tensor_value_info("Y_h", elem, None)],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by every onnxruntime we support
    return model


def _onnx_feeds(x, sequence_lens, initial_h, dtype):
    feeds = {"X": np.ascontiguousarray(x, dtype=dtype)}
    if sequence_lens is not None:
        feeds["sequence_lens"] = np.asarray(sequence_lens, dtype=np.int32)
    if initial_h is not None:
        feeds["initial_h"] = np.ascontiguousarray(initial_h, dtype=dtype)
    return feeds


def onnx_to_ours(Y, Y_h):
    """ONNX (Y (T, D, B, H), Y_h (D, B, H)) -> our (y (T, B, D*H), h_n (D, B, H))."""
    T, D, Bsz, H = Y.shape
    return np.ascontiguousarray(Y.transpose(0, 2, 1, 3).reshape(T, Bsz, D * H)), Y_h


def run_onnxruntime(x, W, R, B=None, *, sequence_lens=None, initial_h=None, **attrs):
    """Run one ONNX GRU node in ONNX Runtime (CPU) on x (T, B, I); return our layout (y, h_n)."""
    import onnxruntime as ort

    model = onnx_gru_model(W, R, B, with_sequence_lens=sequence_lens is not None,
                           with_initial_h=initial_h is not None, **attrs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    Y, Y_h = session.run(None, _onnx_feeds(x, sequence_lens, initial_h, W.dtype))
    return onnx_to_ours(Y, Y_h)


def run_onnx_reference(x, W, R, B=None, *, initial_h=None, layout=0, **attrs):
    """Run one ONNX GRU node in ``onnx.reference.ReferenceEvaluator``; returns the raw (Y, Y_h).

    The reference op supports default activations only and ignores clip and sequence_lens: callers must
    not pass them (they are rejected here rather than silently ignored).
    """
    from onnx.reference import ReferenceEvaluator

    for key in ("activations", "activation_alpha", "activation_beta", "clip"):
        if attrs.get(key) is not None:
            raise AssertionError(f"the ONNX reference GRU ignores {key}; use ONNX Runtime or gru_equations")
    model = onnx_gru_model(W, R, B, with_initial_h=initial_h is not None, layout=layout, **attrs)
    Y, Y_h = ReferenceEvaluator(model).run(None, _onnx_feeds(x, None, initial_h, W.dtype))
    return Y, Y_h


# --------------------------------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------------------------------

def run_python(code: str, *, env: dict | None = None, timeout: float = 300.0):
    """Run ``code`` in a fresh interpreter (this venv) with the repository on sys.path."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=child_env,
                          capture_output=True, text=True, timeout=timeout)


def last_json_line(proc) -> dict:
    """The JSON object a child printed as its last stdout line; fails with the child's output otherwise."""
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"child printed nothing\n--- stderr ---\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's node id, so every test is reproducible on its own."""
    seed = int.from_bytes(request.node.nodeid.encode(), "little") % (2**32)
    return np.random.default_rng(seed)
