"""converters.from_torch.accelerate against the unaccelerated torch model (authority: a deep copy of the
same model run by PyTorch).

Whole models (convolution + GRU + linear head), bidirectional and multi-layer GRUs, h0, PackedSequence in
and out (sorted and unsorted), unbatched input, nn.GRUCell, two GRUs in one model, float64; outputs within
1e-5 (float32).  Also: weights refreshed after load_state_dict, state_dict keys kept, the inference-only
rules (grad, training mode, dropout) and the CPU/dtype refusals.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters import from_torch  # noqa: E402

ATOL32, ATOL64 = 1e-5, 1e-12
PackedSequence = torch.nn.utils.rnn.PackedSequence


class ConvGRU(torch.nn.Module):
    """Conv1d front end -> GRU -> linear head on every step: the model of the issue."""

    def __init__(self, channels=6, features=16, hidden=24, num_layers=2, bidirectional=True, classes=5):
        super().__init__()
        self.conv = torch.nn.Conv1d(channels, features, kernel_size=3, padding=1)
        self.gru = torch.nn.GRU(features, hidden, num_layers=num_layers, bidirectional=bidirectional,
                                batch_first=True)
        self.head = torch.nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, x):  # x: (B, C, T)
        features = torch.relu(self.conv(x)).transpose(1, 2)  # (B, T, F), not contiguous
        y, h_n = self.gru(features)
        return self.head(y), h_n


class EncoderDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.GRU(5, 12, num_layers=2, bidirectional=True)
        self.decoder = torch.nn.GRU(24, 7)
        self.cell = torch.nn.GRUCell(7, 7)

    def forward(self, x):
        y, _ = self.encoder(x)
        z, h = self.decoder(y)
        return self.cell(z[-1], h[0])


def _pair(model):
    """(original, accelerated copy) of an eval-mode model."""
    model = model.eval()
    fast = from_torch.accelerate(copy.deepcopy(model))
    return model, fast


def _close(a, b, atol=ATOL32):
    if isinstance(a, (tuple, list)) and not isinstance(a, PackedSequence):  # PackedSequence is a tuple too
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _close(u, v, atol)
        return
    if isinstance(a, PackedSequence):
        assert isinstance(b, PackedSequence)
        assert torch.equal(a.batch_sizes, b.batch_sizes)
        for name in ("sorted_indices", "unsorted_indices"):
            u, v = getattr(a, name), getattr(b, name)
            assert (u is None and v is None) or torch.equal(u, v), name
        a, b = a.data, b.data
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=0, atol=atol)


def test_conv_gru_linear_model_matches_torch():
    torch.manual_seed(0)
    model, fast = _pair(ConvGRU())
    assert type(fast.gru).__name__ == "AcceleratedGRU" and isinstance(fast.gru, torch.nn.GRU)
    assert type(fast.conv) is torch.nn.Conv1d and type(fast.head) is torch.nn.Linear
    x = torch.randn(3, 6, 40)
    with torch.no_grad():
        _close(fast(x), model(x))
    # without no_grad, in eval mode: the same numbers (the result carries no autograd graph)
    _close(fast(x), tuple(t.detach() for t in model(x)))


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_gru_with_h0_matches_torch(num_layers, bidirectional, batch_first):
    torch.manual_seed(1)
    gru, fast = _pair(torch.nn.GRU(5, 9, num_layers=num_layers, bidirectional=bidirectional,
                                   batch_first=batch_first))
    D = 2 if bidirectional else 1
    x = torch.randn((4, 7, 5) if batch_first else (7, 4, 5))
    h0 = torch.randn(num_layers * D, 4, 9)
    with torch.no_grad():
        _close(fast(x, h0), gru(x, h0))
        _close(fast(x), gru(x))
        # unbatched (T, I) with (L*D, H)
        _close(fast(x[0] if batch_first else x[:, 0], h0[:, 0]), gru(x[0] if batch_first else x[:, 0], h0[:, 0]))


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_sequence_in_and_out(enforce_sorted, batch_first):
    torch.manual_seed(2)
    gru, fast = _pair(torch.nn.GRU(5, 6, num_layers=2, bidirectional=True, batch_first=batch_first))
    lengths = torch.tensor([9, 7, 7, 2, 1]) if enforce_sorted else torch.tensor([2, 9, 1, 7, 7])
    padded = torch.randn((5, 9, 5) if batch_first else (9, 5, 5))
    packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=batch_first,
                                                     enforce_sorted=enforce_sorted)
    h0 = torch.randn(4, 5, 6)
    with torch.no_grad():
        got, want = fast(packed, h0), gru(packed, h0)
        _close(got, want)
        _close(fast(packed), gru(packed))
    y_got, len_got = torch.nn.utils.rnn.pad_packed_sequence(got[0], batch_first=batch_first)
    y_want, len_want = torch.nn.utils.rnn.pad_packed_sequence(want[0], batch_first=batch_first)
    assert torch.equal(len_got, len_want)
    _close(y_got, y_want)


@pytest.mark.parametrize("bias", [True, False])
def test_grucell_batched_and_unbatched(bias):
    torch.manual_seed(3)
    cell, fast = _pair(torch.nn.GRUCell(5, 8, bias=bias))
    assert type(fast).__name__ == "AcceleratedGRUCell"
    x, h = torch.randn(4, 5), torch.randn(4, 8)
    with torch.no_grad():
        _close(fast(x, h), cell(x, h))
        _close(fast(x), cell(x))
        _close(fast(x[1], h[1]), cell(x[1], h[1]))
        # a loop of steps, state fed back
        h_ref = h_fast = h
        for _ in range(5):
            h_ref, h_fast = cell(x, h_ref), fast(x, h_fast)
        _close(h_fast, h_ref)


def test_model_with_two_grus_and_a_cell():
    torch.manual_seed(4)
    model, fast = _pair(EncoderDecoder())
    assert [type(m).__name__ for m in (fast.encoder, fast.decoder, fast.cell)] == [
        "AcceleratedGRU", "AcceleratedGRU", "AcceleratedGRUCell"]
    x = torch.randn(11, 3, 5)
    with torch.no_grad():
        _close(fast(x), model(x))


def test_float64_module():
    torch.manual_seed(5)
    model, fast = _pair(ConvGRU().double())
    x = torch.randn(2, 6, 30, dtype=torch.float64)
    with torch.no_grad():
        _close(fast(x), model(x), atol=ATOL64)
        with pytest.raises(TypeError, match="dtype torch.float32.*float64"):
            fast.gru(torch.randn(3, 30, 16))


def test_in_place_and_weights_follow_the_module():
    torch.manual_seed(6)
    model = ConvGRU().eval()
    keys = list(model.state_dict())
    assert from_torch.accelerate(model) is model
    assert list(model.state_dict()) == keys
    other = ConvGRU().eval()
    model.load_state_dict(other.state_dict())  # new weights: the converted model follows
    x = torch.randn(2, 6, 20)
    with torch.no_grad():
        _close(model(x), other(x))
        model.gru.weight_hh_l1_reverse.mul_(0.5)  # an in-place update too
        other.gru.weight_hh_l1_reverse.mul_(0.5)
        _close(model(x), other(x))
    # .double() after accelerate: the model follows the new dtype
    model.double(), other.double()
    with torch.no_grad():
        _close(model(x.double()), other(x.double()), atol=ATOL64)
    # accelerating twice changes nothing; a pickled accelerated model comes back accelerated
    assert from_torch.accelerate(model) is model
    again = pickle.loads(pickle.dumps(model))
    assert type(again.gru).__name__ == "AcceleratedGRU"
    with torch.no_grad():
        _close(again(x.double()), other(x.double()), atol=ATOL64)


def test_inference_only_rules():
    torch.manual_seed(7)
    model = from_torch.accelerate(ConvGRU())  # a new module is in training mode
    x = torch.randn(2, 6, 10)
    with pytest.raises(RuntimeError, match=r"training mode with autograd on \(input requires grad\): "
                                           r"call model\.eval\(\)"):
        model(x)
    with pytest.raises(RuntimeError, match=r"training mode with autograd on \(its parameters require grad\)"):
        model.gru(torch.randn(2, 10, 16))
    with torch.no_grad():  # training mode, no dropout, no autograd: runs, as eval would
        reference = copy.deepcopy(model)
        reference.gru.__class__ = torch.nn.GRU
        _close(model(x), reference(x))
    with pytest.raises(RuntimeError, match=r"training mode with autograd on \(input requires grad\)"):
        model.gru(torch.randn(2, 10, 16, requires_grad=True))
    with torch.inference_mode():
        model.gru(torch.randn(2, 10, 16, requires_grad=True))
    model.eval()  # eval: runs with autograd on, inputs that require grad included; no graph comes out
    features = torch.randn(2, 10, 16, requires_grad=True)
    y, h_n = model.gru(features)
    assert not y.requires_grad and y.grad_fn is None
    _close(y, reference.eval().gru(features)[0].detach())

    dropout = from_torch.accelerate(torch.nn.GRU(4, 4, num_layers=2, dropout=0.3))
    with torch.no_grad(), pytest.raises(RuntimeError, match="dropout=0.3.*model.eval"):
        dropout(torch.randn(3, 2, 4))
    with torch.no_grad():
        dropout.eval()(torch.randn(3, 2, 4))


def test_cpu_only_and_convertible_modules_only():
    meta = torch.nn.Sequential(torch.nn.GRU(4, 4, device="meta"))
    with pytest.raises(ValueError, match="CPU only.*meta"):
        from_torch.accelerate(meta)
    assert type(meta[0]) is torch.nn.GRU  # nothing was changed

    model = torch.nn.Sequential(torch.nn.GRU(4, 4), torch.nn.GRU(4, 4).to(torch.bfloat16))
    with pytest.raises(ValueError, match="1: gru_fast runs float32 and float64 modules"):
        from_torch.accelerate(model)
    assert type(model[0]) is torch.nn.GRU  # checked every GRU before changing any

    fast = from_torch.accelerate(torch.nn.GRU(4, 4).eval())
    with torch.no_grad(), pytest.raises(ValueError, match="CPU only.*meta"):
        fast(torch.randn(3, 2, 4, device="meta"))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        from_torch.accelerate(np.zeros(3))


def test_bench_entry_runs_and_matches_torch():
    """bench.accelerate (the report's end-to-end entry) on its real model: the accelerated output agrees
    with torch's and the record holds both timings (their values are the report's, not asserted)."""
    from bench import accelerate

    result = accelerate.run(rounds=1, batch_seconds=0.001)
    assert result["max_abs_err"] <= ATOL32
    assert result["rounds"] == 1 and set(result["timings"]) == {"pytorch", "accelerated"}
    text = accelerate.markdown(result)
    assert "Speed-up" in text and "ratio of medians" in text


def test_tensors_are_shared_not_copied_where_they_can_be():
    """A contiguous CPU tensor reaches gru_fast as a view of its own memory, not a copy; a strided one is
    made contiguous first."""
    x = torch.randn(7, 3, 4)
    view = from_torch._as_numpy(x)
    assert view.ctypes.data == x.data_ptr() and view.dtype == np.float32
    strided = x.transpose(0, 1)
    copied = from_torch._as_numpy(strided)
    assert copied.ctypes.data != strided.data_ptr() and np.array_equal(copied, strided.numpy())
