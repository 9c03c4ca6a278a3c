"""Train the small GRU that ships inside gru_fast (``gru_fast/data/``) and that ``gru-fast demo`` runs.

    .venv/bin/python scripts/train_default_model.py            # about a minute on 2 CPU cores

The task: classify noisy synthetic signals into eight waveform classes.  Each sequence is a signal of
8 * T samples (T in [24, 64] frames, variable per sequence) cut into T frames of 8 samples, so the GRU
sees x of shape (T, 8).  The classes differ in how frequency or loudness *evolve*, so a model that
ignored the order of frames could not separate them (a rising chirp holds the same frequencies as a
falling one; a fade-in the same energy as a fade-out):

    tone, chirp_up, chirp_down, up_down (rises then falls), tremolo (slow amplitude wobble),
    bursts (on/off gating), fade_in, fade_out

Every signal draws its amplitude, phase, frequencies, modulation rate and noise level at random; the
noise level (standard deviation 0.2 to 1.0 against an amplitude of 0.5 to 1.5) makes some sequences
genuinely ambiguous, so accuracy is meaningful rather than 100%.  Signals are rounded to float16 so that
the evaluation set shipped in float16 is exactly the data the model is scored on.

Model: ``nn.GRU(8, 64, num_layers=2, batch_first=True)`` over the packed sequence (lengths honoured),
then ``nn.Linear(64, 8)`` on the last layer's final state ``h_n[-1]``.

Written to ``gru_fast/data/`` (all deterministic: numpy and torch seeds, 2 threads):

- ``default_gru.npz``   the GRU in gru_fast's engine format (``gru_fast.save``), provenance included;
- ``default_gru.onnx``  the whole classifier, ``torch.onnx.export(dynamo=False)``: inputs ``x`` (B, T, 8)
  float32 and ``lengths`` (B,) int64; outputs ``logits`` (B, 8), ``y`` (B, T, 64), ``h_n`` (2, B, 64).
  The lengths reach the GRU nodes as ``sequence_lens``;
- ``default_head.npz``  the classifier head: ``weight`` (8, 64), ``bias`` (8,), ``classes`` (names);
- ``default_eval.npz``  512 held-out sequences: ``x`` (sum of lengths, 8) float16, the frames of all
  sequences concatenated, ``lengths`` (512,), ``labels`` (512,), and ``torch_logits`` (512, 8), PyTorch's
  own output for them, recorded as the authority the engine is checked against without torch;
- ``default_model.json`` the record: task, sizes, seeds, accuracy (validation, 4000-sequence test set,
  the shipped 512), training wall time, torch / numpy versions, SHA-256 of every file written.

torch is needed here only; gru_fast itself never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

CLASSES = ("tone", "chirp_up", "chirp_down", "up_down", "tremolo", "bursts", "fade_in", "fade_out")
FRAME = 8                    # samples per time step = input_size
MIN_FRAMES, MAX_FRAMES = 24, 64
HIDDEN, LAYERS = 64, 2
SEEDS = {"train": 1, "validation": 2, "test": 3, "torch": 0}   # train: epoch e draws seed (1, e)
SIZES = {"train": 8192, "validation": 1000, "test": 4000}      # train: fresh sequences per epoch
SHIPPED_EVAL = 512           # the first sequences of the test set, shipped for the demo and the tests
EPOCHS = 16
BATCH = 128
LEARNING_RATE = 3e-3
THREADS = 2
ONNX_OPSET = 17


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def _signal(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """One clean signal of ``n`` samples of class ``CLASSES[kind]`` (frequencies in cycles per sample)."""
    t = np.arange(n) / n                      # 0 .. 1 over the signal
    name = CLASSES[kind]
    low, high = rng.uniform(0.03, 0.12), rng.uniform(0.20, 0.35)
    if name == "chirp_up":
        freq = low + (high - low) * t
    elif name == "chirp_down":
        freq = high + (low - high) * t
    elif name == "up_down":
        peak = rng.uniform(0.35, 0.65)
        freq = np.where(t < peak, low + (high - low) * t / peak, high + (low - high) * (t - peak) / (1 - peak))
    else:
        freq = np.full(n, rng.uniform(0.03, 0.35))
    phase = 2 * np.pi * np.cumsum(freq) + rng.uniform(0, 2 * np.pi)
    wave = np.sin(phase)
    if name == "tremolo":
        rate = rng.uniform(1.5, 4.0)          # wobbles over the whole signal
        wave *= 1.0 + rng.uniform(0.6, 0.9) * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    elif name == "bursts":
        period = rng.uniform(0.15, 0.35)
        duty = rng.uniform(0.35, 0.6)
        wave *= ((t / period + rng.uniform(0, 1)) % 1.0) < duty
    elif name == "fade_in":
        wave *= t ** rng.uniform(0.7, 1.5)
    elif name == "fade_out":
        wave *= (1 - t) ** rng.uniform(0.7, 1.5)
    return wave


def make_dataset(size: int, seed: int):
    """-> (x (size, MAX_FRAMES, FRAME) float32 zero-padded, lengths (size,) int64, labels (size,) int64).

    Balanced classes in random order; values rounded to float16 (see the module docstring)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(size) % len(CLASSES))
    lengths = rng.integers(MIN_FRAMES, MAX_FRAMES + 1, size)
    x = np.zeros((size, MAX_FRAMES, FRAME), np.float32)
    for i in range(size):
        n = lengths[i] * FRAME
        clean = rng.uniform(0.5, 1.5) * _signal(labels[i], n, rng)
        noisy = clean + rng.uniform(0.2, 1.0) * rng.standard_normal(n)
        x[i, : lengths[i]] = noisy.astype(np.float16).astype(np.float32).reshape(-1, FRAME)
    return x, lengths.astype(np.int64), labels.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

def build_classifier(torch):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Classifier(torch.nn.Module):
        """GRU over the sequences, then a linear head on the last layer's state at each sequence's last
        valid step.

        Two equivalent forward passes: ``packed`` (the exported one: pack_padded_sequence, so the ONNX
        graph carries the lengths as the GRU nodes' sequence_lens, and h_n is the state after each
        sequence's last valid step) and the padded one used for training, which runs the GRU over the
        padding too and reads the last layer's output at step ``length - 1``.  For a forward GRU that
        output *is* the packed h_n[-1] (the padding comes later), and the padded run is several times
        faster to train on CPU.
        """

        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(FRAME, HIDDEN, num_layers=LAYERS, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, len(CLASSES))
            self.packed = False

        def forward(self, x, lengths):
            if not self.packed:
                y, _ = self.gru(x)
                return self.head(y[torch.arange(len(x)), lengths - 1]), None, None
            # enforce_sorted=True keeps the exported graph free of sort / unsort gathers; ONNX's
            # sequence_lens itself needs no sorting (the tests run the file on unsorted lengths).
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=True)
            y, h_n = self.gru(packed)
            y, _ = pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
            return self.head(h_n[-1]), y, h_n

    return Classifier()


def predict(torch, model, x, lengths, batch=1000):
    """Logits for every row, from the padded forward pass."""
    with torch.inference_mode():
        return torch.cat([model(x[s : s + batch], lengths[s : s + batch])[0] for s in range(0, len(x), batch)])


def train(torch, data, log):
    torch.manual_seed(SEEDS["torch"])
    model = build_classifier(torch)
    vx, vl, vy = (torch.from_numpy(a) for a in data["validation"])
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    batches = SIZES["train"] // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, total_steps=EPOCHS * batches)
    loss_fn = torch.nn.CrossEntropyLoss()
    history = []
    for epoch in range(EPOCHS):
        x, lengths, labels = (torch.from_numpy(a) for a in make_dataset(SIZES["train"], (SEEDS["train"], epoch)))
        model.train()
        total = 0.0
        for start in range(0, batches * BATCH, BATCH):
            sl = slice(start, start + BATCH)
            optimizer.zero_grad()
            loss = loss_fn(model(x[sl], lengths[sl])[0], labels[sl])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += loss.item()
        model.eval()
        accuracy = float((predict(torch, model, vx, vl).argmax(1) == vy).float().mean())
        history.append({"epoch": epoch + 1, "train_loss": round(total / batches, 4),
                        "validation_accuracy": round(accuracy, 4)})
        log(f"epoch {epoch + 1:2d}  loss {history[-1]['train_loss']:.4f}  validation accuracy {accuracy:.4f}")
    return model.eval(), history


# --------------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------------

def packed_logits(torch, model, x, lengths):
    """Logits from the packed forward pass (the exported one), rows in the original order."""
    order = torch.argsort(lengths, descending=True, stable=True)
    model.packed = True
    try:
        with torch.inference_mode():
            logits = model(x[order], lengths[order])[0]
    finally:
        model.packed = False
    out = torch.empty_like(logits)
    out[order] = logits
    return out


def export_onnx(torch, model, path: Path, example) -> None:
    x, lengths = example
    model.packed = True
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x, lengths), str(path), dynamo=False, opset_version=ONNX_OPSET, do_constant_folding=True,
            input_names=["x", "lengths"], output_names=["logits", "y", "h_n"],
            dynamic_axes={"x": {0: "batch", 1: "steps"}, "lengths": {0: "batch"}, "logits": {0: "batch"},
                          "y": {0: "batch", 1: "steps"}, "h_n": {1: "batch"}},
        )
    model.packed = False


def pack_eval(x, lengths, labels, logits):
    """Ragged storage: the valid frames of every sequence, concatenated (padding is not shipped)."""
    frames = np.concatenate([x[i, : lengths[i]] for i in range(len(x))]).astype(np.float16)
    assert np.array_equal(frames.astype(np.float32), np.concatenate([x[i, : lengths[i]] for i in range(len(x))]))
    return {"x": frames, "lengths": lengths.astype(np.int16), "labels": labels.astype(np.uint8),
            "torch_logits": logits.astype(np.float32)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "gru_fast" / "data")
    args = parser.parse_args(argv)

    import torch

    import gru_fast
    from converters import from_torch

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    log = lambda message: print(message, flush=True)  # noqa: E731

    started = time.perf_counter()
    data = {split: make_dataset(SIZES[split], SEEDS[split]) for split in ("validation", "test")}
    data_seconds = time.perf_counter() - started
    log(f"data: validation {SIZES['validation']}, test {SIZES['test']} sequences in {data_seconds:.1f} s; "
        f"training draws {SIZES['train']} fresh sequences per epoch")

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    model, history = train(torch, data, log)
    train_seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    tx, tl, ty = data["test"]
    test_logits = predict(torch, model, torch.from_numpy(tx), torch.from_numpy(tl)).numpy()
    test_accuracy = float((test_logits.argmax(1) == ty).mean())
    shipped = slice(0, SHIPPED_EVAL)
    shipped_accuracy = float((test_logits[shipped].argmax(1) == ty[shipped]).mean())
    confusion = np.zeros((len(CLASSES), len(CLASSES)), int)
    np.add.at(confusion, (ty, test_logits.argmax(1)), 1)
    log(f"test accuracy {test_accuracy:.4f} ({SIZES['test']} sequences), shipped eval set {shipped_accuracy:.4f}, "
        f"training {train_seconds:.1f} s")

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    provenance = {"framework": "torch", "source": "scripts/train_default_model.py", "prefix": "gru.",
                  "task": "8-class synthetic waveform classification", "torch": torch.__version__,
                  "test_accuracy": round(test_accuracy, 4)}
    engine = from_torch.convert(model.gru)
    engine.provenance = provenance
    gru_fast.save(engine, out / "default_gru.npz")
    export_onnx(torch, model, out / "default_gru.onnx",
                (torch.from_numpy(tx[:4]), torch.from_numpy(np.array([64, 50, 30, 24]))))
    head = model.head
    np.savez(out / "default_head.npz", weight=head.weight.detach().numpy(), bias=head.bias.detach().numpy(),
             classes=np.array(CLASSES))
    # the recorded authority: PyTorch's packed forward pass (the exported graph), checked against the
    # padded pass the accuracy figures come from
    recorded = packed_logits(torch, model, torch.from_numpy(tx[shipped]), torch.from_numpy(tl[shipped])).numpy()
    gap = float(np.abs(recorded - test_logits[shipped]).max())
    if gap > 1e-4:
        raise RuntimeError(f"packed and padded forward passes disagree by {gap:.2e}")
    np.savez_compressed(out / "default_eval.npz", **pack_eval(tx[shipped], tl[shipped], ty[shipped], recorded))

    files = ["default_gru.npz", "default_gru.onnx", "default_head.npz", "default_eval.npz"]
    record = {
        "task": "classify noisy synthetic signals (T in [24, 64] frames of 8 samples) into 8 waveform classes",
        "classes": list(CLASSES),
        "model": {"gru": f"nn.GRU({FRAME}, {HIDDEN}, num_layers={LAYERS}, batch_first=True)",
                  "head": f"nn.Linear({HIDDEN}, {len(CLASSES)}) on h_n[-1]",
                  "input_size": FRAME, "hidden_size": HIDDEN, "num_layers": LAYERS,
                  "parameters": int(sum(p.numel() for p in model.parameters()))},
        "data": {"sizes": SIZES, "seeds": SEEDS, "frames": [MIN_FRAMES, MAX_FRAMES], "frame_size": FRAME,
                 "shipped_eval": f"the first {SHIPPED_EVAL} test sequences"},
        "training": {"epochs": EPOCHS, "batch": BATCH, "optimizer": "Adam + OneCycle",
                     "max_learning_rate": LEARNING_RATE, "threads": THREADS,
                     "wall_seconds": round(train_seconds, 1), "data_seconds": round(data_seconds, 1),
                     # other processes competing for the cores stretch wall_seconds: the 1-minute load
                     # average before and after training says how busy the machine was
                     "load_average": [round(load_before, 2), round(load_after, 2)],
                     "history": history},
        "accuracy": {"validation": history[-1]["validation_accuracy"], "test": round(test_accuracy, 4),
                     "test_size": SIZES["test"], "shipped_eval": round(shipped_accuracy, 4),
                     "shipped_eval_size": SHIPPED_EVAL, "chance": round(1 / len(CLASSES), 4)},
        "confusion_test": {"rows": "true class", "columns": "predicted class", "matrix": confusion.tolist()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                     "onnx_opset": ONNX_OPSET},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "sha256": {name: sha256(out / name) for name in files},
    }
    (out / "default_model.json").write_text(json.dumps(record, indent=1) + "\n")
    total = sum((out / name).stat().st_size for name in files + ["default_model.json"])
    log(f"wrote {', '.join(files)}, default_model.json to {out} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
