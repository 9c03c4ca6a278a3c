"""Quick start: a PyTorch GRU into gru_fast, checked against PyTorch, timed, streamed, saved.

Run with `python examples/quickstart.py` (needs torch; `make setup` creates .venv with it, then
`.venv/bin/python examples/quickstart.py`).  `make demo` runs `gru-fast demo`, not this script.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gru_fast
from converters import from_torch


def median_us(fn, repeats=200):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    T, B, I, H, L = 100, 4, 64, 128, 2
    module = torch.nn.GRU(I, H, num_layers=L, bidirectional=True).eval()
    model = from_torch.convert(module)
    print(model)

    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((2 * L, B, H), np.float32)
    y, h_n = model(x, h0)
    with torch.inference_mode():
        y_ref, h_ref = module(torch.from_numpy(x), torch.from_numpy(h0))
    print(f"max |y - y_torch|   = {np.abs(y - y_ref.numpy()).max():.2e}")
    print(f"max |h_n - h_torch| = {np.abs(h_n - h_ref.numpy()).max():.2e}")

    lengths = np.array([100, 37, 1, 64])
    y_packed, h_packed = model(x, h0, lengths=lengths)
    print(f"variable lengths {lengths.tolist()}: y is 0 past each length -> {float(np.abs(y_packed[37:, 1]).max())}")

    out = (np.empty_like(y), np.empty_like(h_n))
    with torch.inference_mode():
        t_torch = median_us(lambda: module(torch.from_numpy(x), torch.from_numpy(h0)), 50)
    t_ours = median_us(lambda: model(x, h0, out=out), 50)
    print(f"T={T} B={B} I={I} H={H} L={L} bidirectional: gru_fast {t_ours:.0f} us, PyTorch {t_torch:.0f} us "
          f"(x{t_torch / t_ours:.1f})")

    streaming = from_torch.convert(torch.nn.GRU(I, H, num_layers=L).eval())
    stream = streaming.stream(batch_size=1)
    frame, y_t = np.zeros((1, I), np.float32), np.empty((1, H), np.float32)
    print(f"one streaming step ({L} layers, H={H}): {median_us(lambda: stream.step(frame, out=y_t), 2000):.1f} us")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.npz"
        gru_fast.save(model, path)
        again = gru_fast.load(path)
        assert np.array_equal(again(x, h0)[0], y)
        print(f"saved and reloaded {path.name} ({path.stat().st_size // 1024} KiB): identical outputs")


if __name__ == "__main__":
    main()
