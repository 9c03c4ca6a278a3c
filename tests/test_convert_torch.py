"""converters.from_torch against PyTorch itself (authority: torch.nn.GRU / torch.nn.GRUCell forward).

Parity: nn.GRU over 1-3 layers x bidirectional x batch_first x bias; nn.GRUCell stepping; state dicts
(with module prefixes, numpy values, GRUCell keys); checkpoints written by torch.save.  float32 at
<= 1e-5 absolute.  Hostile inputs: pickles that would run code, truncated files, inconsistent shapes,
non-regular paths, .npz holding object arrays.
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters import from_torch  # noqa: E402

ATOL32 = 1e-5
ATOL64 = 1e-12
I, H, T, B = 5, 7, 6, 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _np(t):
    return t.detach().cpu().numpy()


def _torch_run(module, x, h0):
    with torch.no_grad():
        return module(torch.from_numpy(x), torch.from_numpy(h0))


def _rand(*shape, dtype=np.float32, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------------
# nn.GRU parity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_grid_matches_torch(num_layers, bidirectional, batch_first, bias):
    gru = torch.nn.GRU(I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
                       bias=bias).eval()
    model = from_torch.convert(gru)
    D = 2 if bidirectional else 1
    assert (model.input_size, model.hidden_size, model.num_layers, model.num_directions) == (I, H, num_layers, D)
    assert model.linear_before_reset is True
    assert model.batch_first is batch_first
    assert model.has_bias is bias
    assert model.dtype == np.float32
    assert model.direction == ("bidirectional" if bidirectional else "forward")

    x = _rand(B, T, I) if batch_first else _rand(T, B, I)
    h0 = _rand(num_layers * D, B, H, seed=2)
    y_ref, h_ref = _torch_run(gru, x, h0)
    y, h_n = model(x, h0=h0)
    assert y.shape == tuple(y_ref.shape) and h_n.shape == tuple(h_ref.shape)
    np.testing.assert_allclose(y, _np(y_ref), rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n, _np(h_ref), rtol=0, atol=ATOL32)

    # zero initial state (h0=None on both sides)
    with torch.no_grad():
        y_ref0, h_ref0 = gru(torch.from_numpy(x))
    y0, h0_n = model(x)
    np.testing.assert_allclose(y0, _np(y_ref0), rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h0_n, _np(h_ref0), rtol=0, atol=ATOL32)


def test_float64_module_gives_float64_model():
    gru = torch.nn.GRU(I, H, num_layers=2, bidirectional=True).double().eval()
    model = from_torch.convert(gru)
    assert model.dtype == np.float64
    x, h0 = _rand(T, B, I, dtype=np.float64), _rand(4, B, H, dtype=np.float64, seed=2)
    y_ref, h_ref = _torch_run(gru, x, h0)
    y, h_n = model(x, h0=h0)
    np.testing.assert_allclose(y, _np(y_ref), rtol=0, atol=ATOL64)
    np.testing.assert_allclose(h_n, _np(h_ref), rtol=0, atol=ATOL64)


def test_unbatched_input_matches_torch():
    gru = torch.nn.GRU(I, H, num_layers=2, bidirectional=True).eval()
    model = from_torch.convert(gru)
    x, h0 = _rand(T, I), _rand(4, H, seed=2)
    y_ref, h_ref = _torch_run(gru, x, h0)
    y, h_n = model(x, h0=h0)
    np.testing.assert_allclose(y, _np(y_ref), rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n, _np(h_ref), rtol=0, atol=ATOL32)


def test_dropout_is_ignored_at_inference():
    gru = torch.nn.GRU(I, H, num_layers=3, dropout=0.5).eval()
    model = from_torch.convert(gru)
    x, h0 = _rand(T, B, I), _rand(3, B, H, seed=2)
    y_ref, h_ref = _torch_run(gru, x, h0)
    y, h_n = model(x, h0=h0)
    np.testing.assert_allclose(y, _np(y_ref), rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n, _np(h_ref), rtol=0, atol=ATOL32)


def test_convert_copies_weights_and_leaves_module_untouched():
    gru = torch.nn.GRU(I, H, num_layers=2).eval()
    before = {k: v.clone() for k, v in gru.state_dict().items()}
    x = _rand(T, B, I)
    with torch.no_grad():
        y_ref, _ = gru(torch.from_numpy(x))
    model = from_torch.convert(gru)
    for k, v in gru.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        for p in gru.parameters():
            p.add_(1.0)  # later changes to the module must not leak into the converted model
    np.testing.assert_allclose(model(x)[0], _np(y_ref), rtol=0, atol=ATOL32)


def test_gate_reorder_rzn_to_zrh():
    """PyTorch rows (r, z, n) -> ONNX rows (z, r, h), for W, R and both halves of B."""
    gru = torch.nn.GRU(2, 3)
    sd = {k: _np(v) for k, v in gru.state_dict().items()}
    W, R, Bias = from_torch.convert(gru).onnx_weights()[0]
    r, z, n = np.split(sd["weight_ih_l0"], 3)
    np.testing.assert_array_equal(W[0], np.concatenate([z, r, n]))
    r, z, n = np.split(sd["weight_hh_l0"], 3)
    np.testing.assert_array_equal(R[0], np.concatenate([z, r, n]))
    bi, bh = np.split(sd["bias_ih_l0"], 3), np.split(sd["bias_hh_l0"], 3)
    np.testing.assert_array_equal(Bias[0], np.concatenate([bi[1], bi[0], bi[2], bh[1], bh[0], bh[2]]))


def test_weight_norm_parametrization_uses_effective_weights():
    gru = torch.nn.GRU(I, H, num_layers=2).eval()
    torch.nn.utils.parametrizations.weight_norm(gru, name="weight_hh_l0")
    _check_same(from_torch.convert(gru), gru)


def test_half_precision_module_gives_float32_model():
    gru = torch.nn.GRU(I, H).to(torch.bfloat16)
    model = from_torch.convert(gru)
    assert model.dtype == np.float32
    _check_same(model, gru.float().eval())  # bfloat16 weights are exact in float32


def test_provenance_module():
    model = from_torch.convert(torch.nn.GRU(I, H))
    assert model.provenance == {"framework": "torch", "source": "module", "prefix": None,
                                "layout": "time-major (T, B, I), from the module (batch_first=False)",
                                "layout_assumed": False}


# ------------------------------------------------------------------------------------------------
# nn.GRUCell
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_grucell_stream_steps_like_cell(bias):
    cell = torch.nn.GRUCell(I, H, bias=bias)
    model = from_torch.convert(cell)
    assert (model.num_layers, model.num_directions, model.direction) == (1, 1, "forward")
    assert model.has_bias is bias
    h = torch.from_numpy(_rand(B, H, seed=3))
    stream = model.stream(batch_size=B, h0=_np(h)[None])
    xs = _rand(T, B, I)
    for t in range(T):
        with torch.no_grad():
            h = cell(torch.from_numpy(xs[t]), h)
        y_t = stream.step(xs[t])
        np.testing.assert_allclose(y_t, _np(h), rtol=0, atol=ATOL32)
        np.testing.assert_allclose(stream.state[0], _np(h), rtol=0, atol=ATOL32)


def test_grucell_sequence_matches_cell_loop():
    cell = torch.nn.GRUCell(I, H)
    model = from_torch.convert(cell)
    xs, h = _rand(T, B, I), torch.zeros(B, H)
    ys = []
    with torch.no_grad():
        for t in range(T):
            h = cell(torch.from_numpy(xs[t]), h)
            ys.append(_np(h))
    y, h_n = model(xs)
    np.testing.assert_allclose(y, np.stack(ys), rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n[0], ys[-1], rtol=0, atol=ATOL32)


# ------------------------------------------------------------------------------------------------
# refused modules
# ------------------------------------------------------------------------------------------------

def test_refuses_lstm_and_rnn():
    with pytest.raises(ValueError, match="nn.GRU and nn.GRUCell only"):
        from_torch.convert(torch.nn.LSTM(I, H))
    with pytest.raises(ValueError, match="nn.GRU and nn.GRUCell only"):
        from_torch.convert(torch.nn.RNN(I, H))
    with pytest.raises(TypeError, match="nn.GRU"):
        from_torch.convert(torch.nn.Linear(I, H))
    with pytest.raises(TypeError, match="nn.GRU"):
        from_torch.convert({"weight_ih_l0": np.zeros((3 * H, I))})


def test_refuses_proj_size():
    gru = torch.nn.GRU(I, H)
    gru.proj_size = 2  # nn.GRU's constructor rejects proj_size; a tampered module must be refused too
    with pytest.raises(ValueError, match="proj_size"):
        from_torch.convert(gru)


# ------------------------------------------------------------------------------------------------
# state dicts
# ------------------------------------------------------------------------------------------------

class _TwoGRUs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.gru = torch.nn.GRU(I, H, num_layers=2, batch_first=True)
        self.encoder.proj = torch.nn.Linear(H, H)
        self.decoder = torch.nn.Module()
        self.decoder.gru = torch.nn.GRU(H, 4, bidirectional=True, bias=False)


def _check_same(model, gru, batch_first=False):
    D = 2 if gru.bidirectional else 1
    x = _rand(B, T, gru.input_size) if batch_first else _rand(T, B, gru.input_size)
    h0 = _rand(gru.num_layers * D, B, gru.hidden_size, seed=2)
    y_ref, h_ref = _torch_run(gru, x, h0)
    y, h_n = model(x, h0=h0)
    np.testing.assert_allclose(y, _np(y_ref), rtol=0, atol=ATOL32)
    np.testing.assert_allclose(h_n, _np(h_ref), rtol=0, atol=ATOL32)


def test_state_dict_with_prefix_picks_one_gru():
    net = _TwoGRUs().eval()
    sd = net.state_dict()
    enc = from_torch.from_state_dict(sd, prefix="encoder.gru.", batch_first=True)
    _check_same(enc, net.encoder.gru, batch_first=True)
    assert enc.provenance == {"framework": "torch", "source": "state_dict", "prefix": "encoder.gru.",
                              "layout": "batch-major (B, T, I), as given (batch_first=True)", "layout_assumed": False}
    dec = from_torch.from_state_dict(sd, prefix="decoder.gru")  # trailing dot optional
    assert (dec.num_directions, dec.has_bias, dec.hidden_size) == (2, False, 4)
    _check_same(dec, net.decoder.gru)


def test_state_dict_with_several_grus_and_no_prefix_lists_candidates():
    sd = _TwoGRUs().state_dict()
    with pytest.raises(ValueError, match=r"'decoder\.gru\.'.*'encoder\.gru\.'"):
        from_torch.from_state_dict(sd)
    with pytest.raises(ValueError, match=r"candidates: 'decoder\.gru\.', 'encoder\.gru\.'"):
        from_torch.from_state_dict(sd, prefix="encoder.")


def test_numpy_state_dict():
    gru = torch.nn.GRU(I, H, num_layers=3, bidirectional=True).eval()
    sd = {k: _np(v) for k, v in gru.state_dict().items()}
    model = from_torch.from_state_dict(sd)
    assert {k: model.provenance[k] for k in ("framework", "source", "prefix", "layout_assumed")} == {
        "framework": "torch", "source": "state_dict", "prefix": None, "layout_assumed": True}
    assert model.provenance["layout"].startswith("time-major (T, B, I), assumed")
    _check_same(model, gru)
    # float64 numpy state dict -> float64 model
    model64 = from_torch.from_state_dict({k: v.astype(np.float64) for k, v in sd.items()})
    assert model64.dtype == np.float64


def test_grucell_state_dict_with_prefix():
    net = torch.nn.Module()
    net.cell = torch.nn.GRUCell(I, H)
    model = from_torch.from_state_dict(net.state_dict())
    assert model.provenance["prefix"] == "cell."
    h = torch.from_numpy(_rand(B, H, seed=3))
    x = _rand(B, I)
    with torch.no_grad():
        h1 = net.cell(torch.from_numpy(x), h)
    stream = model.stream(batch_size=B, h0=_np(h)[None])
    np.testing.assert_allclose(stream.step(x), _np(h1), rtol=0, atol=ATOL32)


def _good_sd(**kw):
    return {k: _np(v) for k, v in torch.nn.GRU(I, H, **kw).state_dict().items()}


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.__setitem__("weight_hh_l0", np.zeros((3 * H, H + 1), np.float32)), "weight_hh_l0"),
    (lambda sd: sd.__setitem__("weight_hh_l0", np.zeros((3 * H + 1, H), np.float32)), "weight_hh_l0"),
    (lambda sd: sd.__setitem__("weight_ih_l1", np.zeros((3 * H, H + 2), np.float32)), "weight_ih_l1"),
    (lambda sd: sd.__setitem__("weight_ih_l0", np.zeros((2 * H, I), np.float32)), "weight_ih_l0"),
    (lambda sd: sd.__setitem__("weight_ih_l0", np.zeros((3 * H,), np.float32)), "weight_ih_l0"),
    (lambda sd: sd.__setitem__("bias_ih_l1", np.zeros((3 * H + 3,), np.float32)), "bias_ih_l1"),
    (lambda sd: sd.pop("bias_hh_l1"), "bias_hh_l1"),
    (lambda sd: sd.pop("weight_hh_l0_reverse"), "weight_hh_l0_reverse"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("_l1") or k.endswith("_l1_reverse")],
     "contiguous"),
])
def test_inconsistent_state_dict_is_refused(mutate, message):
    sd = _good_sd(num_layers=3, bidirectional=True)
    mutate(sd)
    with pytest.raises(ValueError, match=message):
        from_torch.from_state_dict(sd)


def test_state_dict_without_gru_keys_or_wrong_types():
    with pytest.raises(ValueError, match="no GRU parameters"):
        from_torch.from_state_dict({"linear.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="no GRU parameters"):
        from_torch.from_state_dict({})
    with pytest.raises(TypeError, match="mapping"):
        from_torch.from_state_dict([("weight_ih_l0", np.zeros((3 * H, I)))])
    sd = _good_sd()
    sd["weight_ih_l0"] = sd["weight_ih_l0"].astype(np.int64)
    with pytest.raises(TypeError, match="weight_ih_l0.*floating"):
        from_torch.from_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [None, "state_dict", "model_state_dict"])
def test_load_checkpoint(tmp_path, wrap):
    net = _TwoGRUs().eval()
    sd = net.state_dict()
    obj = sd if wrap is None else {wrap: sd, "epoch": 7, "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    model = from_torch.load(path, prefix="encoder.gru.", batch_first=True)
    expected_prefix = "encoder.gru." if wrap is None else f"{wrap}.encoder.gru."
    assert model.provenance == {"framework": "torch", "source": "ckpt.pt", "prefix": expected_prefix,
                                "layout": "batch-major (B, T, I), as given (batch_first=True)",
                                "layout_assumed": False}
    _check_same(model, net.encoder.gru, batch_first=True)
    with pytest.raises(ValueError, match="candidate|pick one"):
        from_torch.load(str(path))


def test_load_bare_gru_checkpoint_pth(tmp_path):
    gru = torch.nn.GRU(I, H, num_layers=2, bidirectional=True).eval()
    path = tmp_path / "gru.pth"
    torch.save(gru.state_dict(), path)
    _check_same(from_torch.load(path), gru)


def test_load_npz_state_dict(tmp_path):
    gru = torch.nn.GRU(I, H, num_layers=2).eval()
    path = tmp_path / "gru.npz"
    np.savez(path, **{k: _np(v) for k, v in gru.state_dict().items()})
    _check_same(from_torch.load(path), gru)


class _Payload:
    """Unpickling this object creates ``marker`` (builtins.open(marker, "w"))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_never_executed(tmp_path):
    gru = torch.nn.GRU(I, H)
    control_marker, marker = tmp_path / "control_ran", tmp_path / "payload_ran"
    # control: the same payload is live -- unpickling it without restrictions does create its marker
    pickle.loads(pickle.dumps(_Payload(control_marker))).close()
    assert control_marker.exists()

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": gru.state_dict(), "extra": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused.*pickled Python objects"):
        from_torch.load(path)
    assert not marker.exists()

    # a bare pickle (torch's legacy, pre-zip format) never reaches a reader at all
    raw = tmp_path / "evil_raw.pth"
    raw.write_bytes(pickle.dumps({"weight_ih_l0": _Payload(marker)}, protocol=2))
    with pytest.raises(ValueError, match="refused.*not a zip-format PyTorch checkpoint"):
        from_torch.load(raw)
    assert not marker.exists()


def test_refusal_messages_are_one_plain_line(tmp_path):
    """torch's weights_only error spans lines and carries terminal colour codes; ours is one plain line."""
    path = tmp_path / "module.pt"
    torch.save(torch.nn.GRU(I, H), path)
    with pytest.raises(ValueError) as info:
        from_torch.load(path)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and "weights_only" in message


def test_legacy_format_checkpoint_is_refused_before_torch_reads_it(tmp_path):
    """The legacy format sizes storages from its pickle: refused by format, whatever it holds."""
    path = tmp_path / "legacy.pt"
    torch.save(torch.nn.GRU(I, H).state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a zip-format PyTorch checkpoint"):
        from_torch.load(path)


def test_whole_module_checkpoint_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.GRU(I, H), path)
    with pytest.raises(ValueError, match="refused"):
        from_torch.load(path)


def test_malicious_npz_object_array_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.npz"
    sd = _good_sd()
    sd["weight_ih_l0"] = np.array([_Payload(marker)], dtype=object)
    np.savez(path, **sd)  # np.savez pickles object arrays
    with pytest.raises(ValueError, match="refused.*allow_pickle"):
        from_torch.load(path)
    assert not marker.exists()


def test_truncated_and_garbage_files_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torch.nn.GRU(I, H).state_dict(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        from_torch.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="garbage.pt"):
        from_torch.load(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt"):
        from_torch.load(empty)
    truncated_npz = tmp_path / "truncated.npz"
    np.savez(tmp_path / "ok.npz", **_good_sd())
    truncated_npz.write_bytes((tmp_path / "ok.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.npz"):
        from_torch.load(truncated_npz)


def test_non_state_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="expected a state dict"):
        from_torch.load(path)


def test_non_regular_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        from_torch.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        from_torch.load(tmp_path / "missing.pt")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.pt"
        os.mkfifo(fifo)
        with pytest.raises(ValueError, match="not a regular file"):
            from_torch.load(fifo)  # would block forever if opened


def test_importing_converters_does_not_import_torch():
    code = ("import sys, converters, converters.from_torch, converters.from_keras; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
