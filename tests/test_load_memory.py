"""``gru_fast.load(max_bytes=...)`` bounds what the load holds, including the model it builds.

A model's kernel layout pads the hidden units to a multiple of 16 and packs the weights, so a small file
can build a large model: an H=1 model with W of shape (1, 3, 8e6) is a 96 MB array (91 KB deflated) that
packs into 1.5 GB.  The load charges the file's arrays plus :func:`gru_fast.model.build_nbytes` against
``max_bytes`` before reading any array.

Authorities: the operating system's peak resident set size of a child process (``getrusage``
``ru_maxrss``) for what a load really held, and ``tracemalloc`` (numpy reports its allocations to it) for
what building a model allocates, against the charge.
"""

from __future__ import annotations

import json
import re
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest

import gru_fast
from conftest import last_json_line, random_onnx_weights, run_python
from gru_fast.model import build_nbytes

MiB = 1 << 20


def _config(**overrides) -> bytes:
    config = dict(format="gru_fast", version=1, num_layers=1, direction="forward", linear_before_reset=True,
                  activations=["Sigmoid", "Tanh"], activation_alpha=[], activation_beta=[], clip=None,
                  batch_first=False, dtype="float32", has_bias=False, provenance={})
    config.update(overrides)
    return json.dumps(config).encode()


def _write_npy_member(archive, name, shape, dtype, chunk_values=1 << 20):
    """A deflated .npy member of zeros, streamed: the writer never holds the array."""
    dtype = np.dtype(dtype)
    with archive.open(name + ".npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": shape})
        left = int(np.prod(shape))
        zeros = np.zeros(min(left, chunk_values), dtype).tobytes()
        while left:
            n = min(left, chunk_values)
            member.write(zeros[: n * dtype.itemsize])
            left -= n


def _h1_file(path, input_size):
    """The hostile file of issue 11: H=1, W (1, 3, input_size) of zeros, deflated."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("config.npy", "w") as member:
            np.lib.format.write_array(member, np.frombuffer(_config(), np.uint8))
        _write_npy_member(archive, "layer0.W", (1, 3, input_size), np.float32)
        _write_npy_member(archive, "layer0.R", (1, 3, 1), np.float32)
    return path


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import gru_fast

    path, max_bytes = sys.argv[-2], int(sys.argv[-1])
    gru_fast.GRU([(np.ones((1, 3, 2)), np.ones((1, 3, 1)), None)])  # the interpreter and helpers warmed up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        model = gru_fast.load(path, max_bytes=max_bytes)
        result = "loaded"
    except ValueError as exc:
        result = "ValueError: " + str(exc)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"result": result, "peak_growth": peak - before}))
    """
)


def _load_in_child(path, max_bytes):
    proc = run_python(CHILD.replace("sys.argv[-2], int(sys.argv[-1])", f"{str(path)!r}, {int(max_bytes)}"),
                      timeout=300)
    return last_json_line(proc)


def test_small_file_of_a_huge_padded_model_is_refused_before_it_is_built(tmp_path):
    """Issue 11, probe 5: a 91 KB file, max_bytes=200 MiB.  Without the build charge the load held
    3.7 GiB; now it raises the documented ValueError naming the bytes needed and the cap, and the
    child's peak RSS grows by less than max_bytes."""
    path = _h1_file(tmp_path / "h1.npz", 8_000_000)
    assert path.stat().st_size < 200_000
    cap = 200 * MiB
    report = _load_in_child(path, cap)
    assert report["result"].startswith("ValueError"), report
    needed = len(_config()) + 3 * 8_000_000 * 4 + 3 * 4 + build_nbytes(8_000_000, 1, 1, 1, "float32")
    assert f"max_bytes={cap}" in report["result"] and "needs" in report["result"], report
    assert str(needed) in report["result"], (needed, report)
    assert report["peak_growth"] < cap, report


def test_charge_bounds_what_a_genuine_load_holds(tmp_path):
    """The charge is an upper bound on the load: with max_bytes equal to it an H=1 model loads and the
    child's peak RSS grows by at most the charge (plus 8 MiB of interpreter noise); one byte less is
    refused."""
    input_size = 250_000
    path = _h1_file(tmp_path / "h1.npz", input_size)
    config_bytes = len(_config())
    charge = config_bytes + 3 * input_size * 4 + 3 * 4 + build_nbytes(input_size, 1, 1, 1, "float32")
    report = _load_in_child(path, charge)
    assert report["result"] == "loaded", report
    assert report["peak_growth"] <= charge + 8 * MiB, (report, charge)
    with pytest.raises(ValueError, match=f"needs {charge} bytes .* max_bytes={charge - 1}"):
        gru_fast.load(path, max_bytes=charge - 1)


@pytest.mark.parametrize("shape", [
    dict(I=3, H=1, L=1, direction="forward", dtype=np.float32),
    dict(I=7, H=17, L=2, direction="bidirectional", dtype=np.float64),
    dict(I=40, H=33, L=3, direction="reverse", dtype=np.float32),
    dict(I=1, H=100, L=1, direction="forward", dtype=np.float64),
    dict(I=300, H=200, L=2, direction="bidirectional", dtype=np.float32, weights="bfloat16"),
], ids=["H1", "bidir-f64", "3-layers", "I1-f64", "bidir-bf16"])
def test_build_nbytes_bounds_what_building_a_model_allocates(shape, rng):
    """tracemalloc's peak while GRU(...) builds a model (source arrays excluded: they exist before) is
    at most build_nbytes, and not far below it: within 30%, or the charge's fixed 64 KiB for Python
    objects on a small model."""
    I, H, L, direction, dtype = shape["I"], shape["H"], shape["L"], shape["direction"], shape["dtype"]
    weights = shape.get("weights")
    D = 2 if direction == "bidirectional" else 1
    layers = [random_onnx_weights(rng, D, I if l == 0 else D * H, H, dtype=np.float32) for l in range(L)]
    gru_fast.GRU(layers, direction=direction, dtype=dtype, weights=weights)  # Numba's helpers loaded first
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        model = gru_fast.GRU(layers, direction=direction, dtype=dtype, weights=weights)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    charge = build_nbytes(I, H, L, D, dtype, weights=weights)
    assert peak <= charge, (peak, charge)
    assert charge - peak <= max(0.3 * charge, 70 << 10), (peak, charge)
    assert model.hidden_size == H


def test_a_bfloat16_engine_file_is_charged_its_own_build(tmp_path, rng):
    """A file saved from a bfloat16-weight model builds that model (rounding W and R, packing them as
    bfloat16 pairs): the load charges build_nbytes(..., weights="bfloat16"), not the float32 build."""
    I, H, L, D = 300, 200, 2, 2
    layers = [random_onnx_weights(rng, D, I if l == 0 else D * H, H, dtype=np.float32) for l in range(L)]
    path = tmp_path / "bf16.npz"
    gru_fast.save(gru_fast.GRU(layers, direction="bidirectional", weights="bfloat16"), path)
    charge = build_nbytes(I, H, L, D, "float32", weights="bfloat16")
    assert charge != build_nbytes(I, H, L, D, "float32")
    with pytest.raises(ValueError, match=f"{charge} for the engine's copy of the weights"):
        gru_fast.load(path, max_bytes=1 << 20)


def test_every_loader_charges_the_build_of_the_model_it_reads(tmp_path):
    """The engine-file, PyTorch and ONNX loaders each read the model's sizes from their own layout (the
    engine file's config and layer-0 headers; torch's ``weight_ih_l{k}[_reverse]`` keys and (3H, I)
    shapes; ONNX's W (D, 3H, I)), in float64.  With a cap that holds the weights but not the build, each
    refuses naming the charge :func:`gru_fast.model.build_nbytes` gives for the true sizes."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from conftest import onnx_gru_model
    from converters import from_onnx, from_torch

    I, H = 3000, 2
    built = "for the engine's copy of the weights and their packed layout (hidden size 2 padded to 16-unit tiles)"
    module = torch.nn.GRU(I, H, num_layers=2, bidirectional=True).double()
    checkpoint, engine = tmp_path / "gru.pt", tmp_path / "gru.npz"
    torch.save(module.state_dict(), checkpoint)
    gru_fast.save(from_torch.load(checkpoint), engine)
    weights = sum(p.numel() * 8 for p in module.parameters())
    build = build_nbytes(I, H, 2, 2, "float64")
    cap = weights + build // 2
    for load, path in ((from_torch.load, checkpoint), (gru_fast.load, engine)):
        with pytest.raises(ValueError, match=f"{build} {re.escape(built)}.* max_bytes={cap}"):
            load(path, max_bytes=cap)

    W, R, B = random_onnx_weights(np.random.default_rng(0), 2, I, H, dtype=np.float64)
    build = build_nbytes(I, H, 1, 2, "float64")
    cap = W.nbytes + R.nbytes + B.nbytes + build // 2
    with pytest.raises(ValueError, match=f"{re.escape(built[4:])} needs {build / MiB:.1f} MiB, over the "
                                         f"memory cap max_bytes={cap}"):
        from_onnx.load(onnx_gru_model(W, R, B, direction="bidirectional"), max_bytes=cap)
