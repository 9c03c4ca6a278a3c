"""The peer harness (gru_fast.peers) that `gru-fast demo` and bench/ time the engines with: every runner's
outputs, and the peers' models it builds from a gru_fast model's weights, against PyTorch's own nn.GRU.

Authority: the ``nn.GRU`` the gru_fast model was converted from, run by PyTorch (a stream against the
whole sequence, stepped frame by frame).  No speed is asserted.
"""

from __future__ import annotations

import numpy as np
import pytest

import gru_fast
from gru_fast import peers

from conftest import assert_matches, convert_torch, torch_gru

torch = pytest.importorskip("torch")

T, B, I, H = 5, 3, 4, 6


def _authority(module, x, h0):
    with torch.inference_mode():
        y, h_n = module(torch.from_numpy(x), torch.from_numpy(h0))
    return y.numpy(), h_n.numpy()


def _inputs(rng, layers, directions):
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((layers * directions, B, H))).astype(np.float32)
    return x, h0


@pytest.mark.parametrize("layers, bidirectional", [(2, False), (2, True)])
def test_torch_gru_rebuilds_the_module_the_model_came_from(rng, layers, bidirectional):
    module = torch_gru(I, H, layers, bidirectional=bidirectional)
    rebuilt = peers.torch_gru(convert_torch(module))
    assert not rebuilt.batch_first and rebuilt.bidirectional == bidirectional
    want = module.state_dict()
    assert set(rebuilt.state_dict()) == set(want)
    for name, value in rebuilt.state_dict().items():
        assert torch.equal(value, want[name]), name


@pytest.mark.parametrize("layers, bidirectional", [(1, True), (2, False), (2, True)])
def test_onnx_gru_graph_computes_what_pytorch_does(rng, layers, bidirectional):
    ort = pytest.importorskip("onnxruntime")
    module = torch_gru(I, H, layers, bidirectional=bidirectional)
    x, h0 = _inputs(rng, layers, 2 if bidirectional else 1)
    proto = peers.onnx_gru(convert_torch(module), T, B)
    y, h_n = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y", "h_n"], {"x": x, "h0": h0})
    want_y, want_h = _authority(module, x, h0)
    assert_matches(y, want_y, authority="PyTorch", dtype=np.float32, what="onnx_gru y (ONNX Runtime)")
    assert_matches(h_n, want_h, authority="PyTorch", dtype=np.float32, what="onnx_gru h_n (ONNX Runtime)")


def _runnable():
    return [engine for engine in peers.ENGINES if peers.missing_reason(engine) is None
            and (engine in ("gru_fast", "pytorch") or peers.missing_reason("onnxruntime") is None
                 and __import__("importlib.util").util.find_spec("onnx") is not None)]


@pytest.mark.parametrize("engine", peers.ENGINES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_sequence_runner_outputs_match_pytorch(rng, engine, bidirectional):
    if engine not in _runnable():
        pytest.skip(f"{engine} cannot run here: {peers.missing_reason(engine) or 'onnx missing'}")
    module = torch_gru(I, H, 2, bidirectional=bidirectional)
    x, h0 = _inputs(rng, 2, 2 if bidirectional else 1)
    runner = peers.build_runner(engine, x, h0, model=convert_torch(module), threads=1)
    with runner.context():
        runner.call()
    y, h_n = runner.outputs()
    want_y, want_h = _authority(module, x, h0)
    assert_matches(y, want_y, authority="PyTorch", dtype=np.float32, what=f"{engine} runner y")
    assert_matches(h_n, want_h, authority="PyTorch", dtype=np.float32, what=f"{engine} runner h_n")


@pytest.mark.parametrize("engine", peers.ENGINES)
def test_stream_runner_steps_match_pytorchs_sequence(rng, engine):
    """Stepped frame by frame (the peers alternate crossed state buffers), then reset and stepped again."""
    if engine not in _runnable():
        pytest.skip(f"{engine} cannot run here: {peers.missing_reason(engine) or 'onnx missing'}")
    module = torch_gru(I, H, 2)
    x, h0 = _inputs(rng, 2, 1)
    runner = peers.build_runner(engine, x, h0, stream=True, model=convert_torch(module), threads=1)
    assert runner.stream
    want_y, want_h = _authority(module, x, h0)
    for _ in range(2):
        runner.reset(h0)
        ys = []
        with runner.context():
            for frame in x:
                runner.set_frame(frame)
                runner.call()
                y_t, state = runner.outputs()
                ys.append(y_t)
        assert_matches(np.stack(ys), want_y, authority="PyTorch", dtype=np.float32, what=f"{engine} stream y")
        assert_matches(state, want_h, authority="PyTorch", dtype=np.float32, what=f"{engine} stream state")


def test_gru_fast_runner_of_a_batch_first_model_takes_and_gives_time_major_arrays(rng):
    module = torch_gru(I, H, 1)
    model = gru_fast.GRU([tuple(w) for w in convert_torch(module).onnx_weights()], batch_first=True)
    x, h0 = _inputs(rng, 1, 1)
    runner = peers.build_runner("gru_fast", x, h0, model=model)
    runner.call()
    y, h_n = runner.outputs()
    want_y, want_h = _authority(module, x, h0)
    assert_matches(y, want_y, authority="PyTorch", dtype=np.float32, what="batch-first model y")
    assert_matches(h_n, want_h, authority="PyTorch", dtype=np.float32, what="batch-first model h_n")


def test_thread_pinned_runner_runs_gru_fast_on_its_threads_and_puts_the_count_back(rng):
    before = gru_fast.get_num_threads()
    module = torch_gru(I, H, 1)
    x, h0 = _inputs(rng, 1, 1)
    seen = []
    with peers.thread_limit(1):
        runner = peers.ThreadPinned(peers.build_runner("gru_fast", x, h0, model=convert_torch(module)), 1)
    inner_call = runner.call
    runner.call = lambda: (seen.append(gru_fast.get_num_threads()), inner_call())
    peers.seconds_per_call(runner, 3)
    assert seen == [1] * 4 and gru_fast.get_num_threads() == before
    assert runner.config["threads"] == 1


def test_build_runner_rejects_an_unknown_engine_and_a_missing_model(rng):
    x, h0 = _inputs(rng, 1, 1)
    with pytest.raises(ValueError, match="engine must be one of"):
        peers.build_runner("tensorflow", x, h0)
    with pytest.raises(TypeError, match="needs model="):
        peers.build_runner("gru_fast", x, h0)
