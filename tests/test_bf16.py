"""Opt-in bfloat16 weights: ``model.with_weights("bfloat16")``.

Authority: PyTorch's nn.GRU.  A bfloat16 model stores W and R rounded to bfloat16 (nearest, ties to even:
the rounding of ``tensor.to(torch.bfloat16)``) and computes in float32 with float32 biases, so it must
match, to float32 accuracy, an nn.GRU whose weight matrices were rounded by torch itself; and it stays
within the issue's 2e-2 of the float32 module it came from.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import gru_fast
from conftest import convert_torch, run_torch, torch_gru

torch = pytest.importorskip("torch")


def _rounded_module(module):
    """A copy of ``module`` whose weight matrices (not biases) are rounded to bfloat16 by torch."""
    import copy

    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.startswith("weight"):
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return rounded


CASES = [  # (I, H, layers, bidirectional, T, B)
    (16, 24, 1, False, 7, 1),
    (64, 256, 1, False, 100, 1),  # large enough for the split-step parallel mode
    (40, 128, 2, False, 50, 3),
    (128, 96, 1, True, 30, 8),
    (7, 33, 2, True, 9, 5),  # odd K (layer 1 W: 7, R: 33), 4 + 1 rows
    (63, 255, 1, False, 60, 1),  # odd K in the split-step parallel mode: threads start at later groups
]


@pytest.mark.parametrize("I,H,L,bidir,T,B", CASES)
def test_bfloat16_model_matches_torch_with_bfloat16_rounded_weights(I, H, L, bidir, T, B, rng):
    module = torch_gru(I, H, L, bidirectional=bidir, bias_scale=0.5)
    model = convert_torch(module).with_weights("bfloat16")
    assert model.weights == "bfloat16" and model.dtype == np.float32
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.standard_normal((L * (2 if bidir else 1), B, H)).astype(np.float32)
    y, h_n = model(x, h0)
    want_y, want_h = run_torch(_rounded_module(module), x, h0)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=2e-6)
    np.testing.assert_allclose(h_n, want_h, rtol=0, atol=2e-6)
    # and the rounding is what the issue allows against the float32 module
    full_y, _ = run_torch(module, x, h0)
    assert np.abs(y - full_y).max() <= 2e-2


def test_serial_and_parallel_bfloat16_runs_agree_bit_for_bit(rng):
    module = torch_gru(64, 256)
    model = convert_torch(module).with_weights("bfloat16")
    for B in (1, 8):  # split step, rows
        x = rng.standard_normal((100, B, 64)).astype(np.float32)
        with gru_fast.threads(1):
            serial = model(x)
        parallel = model(x)
        assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])


def test_stream_steps_equal_the_whole_sequence(rng):
    model = convert_torch(torch_gru(32, 48)).with_weights("bfloat16")
    x = rng.standard_normal((12, 2, 32)).astype(np.float32)
    y, _ = model(x)
    stream = model.stream(2)
    steps = np.stack([stream.step(x[t]) for t in range(12)])
    assert np.array_equal(steps, y)


def test_weights_round_trip_through_save_load_and_pickle(tmp_path, rng):
    model = convert_torch(torch_gru(16, 40, 2)).with_weights("bfloat16")
    x = rng.standard_normal((9, 3, 16)).astype(np.float32)
    want = model(x)
    path = tmp_path / "m.npz"
    gru_fast.save(model, path)
    for again in (gru_fast.load(path), pickle.loads(pickle.dumps(model))):
        assert again.weights == "bfloat16"
        got = again(x)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_back_to_float32_keeps_the_rounded_weights(rng):
    module = torch_gru(16, 40)
    bf = convert_torch(module).with_weights("bfloat16")
    back = bf.with_weights("float32")
    assert back.weights == "float32"
    x = rng.standard_normal((5, 2, 16)).astype(np.float32)
    assert np.array_equal(back(x)[0], bf(x)[0])  # same values, the float32 kernels


def test_float64_model_becomes_float32_arithmetic(rng):
    model = convert_torch(torch_gru(8, 16, dtype=np.float64)).with_weights("bfloat16")
    assert model.dtype == np.float32 and model.weights == "bfloat16"


@pytest.mark.parametrize("bad", ["int8", "bf16x", 3, None])
def test_bad_weights_name_is_refused(bad):
    model = convert_torch(torch_gru(8, 16))
    with pytest.raises((ValueError, TypeError), match="weights"):
        model.with_weights(bad)


def test_demo_accuracy_with_bfloat16_weights_within_0_2_points_of_float32():
    """The issue's accuracy target, on the shipped model and its held-out sequences: labels are the
    authority, the float32 model's accuracy the reference."""
    from gru_fast import _demo

    model = gru_fast.load(_demo.MODEL_FILE)
    head = _demo.load_head()
    data = _demo.load_eval_set()

    def accuracy(m):
        return float((_demo.classify(m, head, data.x, data.lengths).argmax(1) == data.labels).mean())

    full, rounded = accuracy(model), accuracy(model.with_weights("bfloat16"))
    assert abs(full - rounded) <= 0.002, (full, rounded)
