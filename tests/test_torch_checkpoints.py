"""converters.from_torch.load and ``gru-fast`` on checkpoints as people save them (authority: the torch
module whose weights were saved, run by PyTorch).

Layouts, each written by torch.save: a bare state dict, {"model": sd, "epoch": 3, "optimizer": ...},
{"state_dict": sd}, {"model_state_dict": sd}, {"net": sd}, nn.DataParallel's "module." keys, a
Lightning-style {"state_dict": {"model.gru.weight_ih_l0": ...}, "hyper_parameters": {...}}, deeper
nesting and a list of models; two GRUs (every candidate listed by its full path), none (the top-level
keys listed).  Also: the memory cap charged on tensors' logical size (stride-0 views), the message for a
pickled module, and the input layout (recorded, given or assumed and said so).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gru_fast  # noqa: E402
from converters import from_torch  # noqa: E402

from conftest import REPO_ROOT  # noqa: E402

ATOL = 1e-5
I, H = 6, 8


class Net(torch.nn.Module):
    """A model as people write them: a GRU inside, a linear head beside it."""

    def __init__(self, batch_first=False, bidirectional=True, num_layers=2):
        super().__init__()
        self.gru = torch.nn.GRU(I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
        self.head = torch.nn.Linear(H * (2 if bidirectional else 1), 3)


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw).eval()


def _optimizer_state(net):
    """A real Adam state after one step (integer-keyed tensors, param groups: what a trainer saves)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = net.gru(torch.randn(4, 2, I))[0].sum()
    loss.backward()
    opt.step()
    return opt.state_dict()


def _assert_same(model, gru, batch_first=None):
    """gru_fast's model against the torch nn.GRU, on x in the module's own layout."""
    batch_first = gru.batch_first if batch_first is None else batch_first
    x = np.random.default_rng(1).standard_normal((3, 5, gru.input_size) if batch_first else (5, 3, gru.input_size))
    x = x.astype(np.float32)
    with torch.no_grad():
        y_ref, h_ref = gru(torch.from_numpy(x))
    y, h_n = model(x)
    np.testing.assert_allclose(y, y_ref.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(h_n, h_ref.numpy(), rtol=0, atol=ATOL)


def _layouts():
    """name -> (checkpoint builder taking the Net, the GRU's full dotted path in it)."""
    def lightning(net):
        return {"epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "optimizer_states": [_optimizer_state(net)], "lr_schedulers": [],
                "hyper_parameters": {"hidden": H, "lr": 1e-3}}

    return {
        "bare": (lambda net: net.state_dict(), "gru."),
        "model+epoch": (lambda net: {"model": net.state_dict(), "epoch": 3}, "model.gru."),
        "state_dict": (lambda net: {"state_dict": net.state_dict(), "epoch": 3}, "state_dict.gru."),
        "model_state_dict": (lambda net: {"model_state_dict": net.state_dict(), "epoch": 3, "loss": 0.25,
                                          "optimizer_state_dict": _optimizer_state(net)},
                             "model_state_dict.gru."),
        "net": (lambda net: {"net": net.state_dict(), "opt": _optimizer_state(net)}, "net.gru."),
        "dataparallel": (lambda net: {"model": torch.nn.DataParallel(net).state_dict(), "epoch": 1},
                         "model.module.gru."),
        "lightning": (lightning, "state_dict.model.gru."),
        "deep": (lambda net: {"checkpoint": {"trainer": {"modules": {"net": net.state_dict()}}}, "step": 7},
                 "checkpoint.trainer.modules.net.gru."),
        "list": (lambda net: {"models": [net.state_dict()], "epoch": 1}, "models.0.gru."),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_load_finds_the_one_gru_in_common_checkpoint_layouts(tmp_path, layout):
    build, full_path = _layouts()[layout]
    net = _net()
    path = tmp_path / "ckpt.pt"
    torch.save(build(net), path)
    model = from_torch.load(path)
    assert model.provenance["prefix"] == full_path
    _assert_same(model, net.gru)
    # the full path and its unique ending both pick it too
    _assert_same(from_torch.load(path, prefix=full_path), net.gru)
    _assert_same(from_torch.load(path, prefix="gru"), net.gru)


def test_two_grus_are_listed_by_full_path_and_either_can_be_picked(tmp_path):
    net, ema = _net(seed=1), _net(seed=2, bidirectional=False, num_layers=1)
    path = tmp_path / "two.pt"
    torch.save({"model": net.state_dict(), "ema": {"model": ema.state_dict()}, "epoch": 5}, path)
    with pytest.raises(ValueError, match=r"holds 2 GRUs; pick one with prefix= \(--prefix\): "
                                         r"'ema\.model\.gru\.', 'model\.gru\.'"):
        from_torch.load(path)
    with pytest.raises(ValueError, match=r"prefix 'gru\.' matches 2 GRUs.*'ema\.model\.gru\.', 'model\.gru\.'"):
        from_torch.load(path, prefix="gru.")
    _assert_same(from_torch.load(path, prefix="model.gru."), net.gru)
    _assert_same(from_torch.load(path, prefix="ema.model.gru"), ema.gru)
    with pytest.raises(ValueError, match=r"prefix 'decoder\.' names no GRU.*candidates: 'ema\.model\.gru\.', "
                                         r"'model\.gru\.'"):
        from_torch.load(path, prefix="decoder.")


def test_no_gru_lists_the_top_level_keys(tmp_path):
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2)
    path = tmp_path / "linear.pt"
    torch.save({"model": linear.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match=r"no GRU parameters found in .*linear\.pt.*top-level keys are: "
                                         r"'model', 'epoch', 'optimizer'"):
        from_torch.load(path)


def test_self_referencing_and_deeply_nested_checkpoints_are_refused_or_walked(tmp_path):
    """weights_only pickles can build cycles and arbitrarily deep dicts: the walk neither loops nor
    overflows the stack."""
    net = _net()
    cyclic = {"model": net.state_dict()}
    cyclic["self"] = cyclic
    path = tmp_path / "cyclic.pt"
    torch.save(cyclic, path)
    _assert_same(from_torch.load(path), net.gru)

    deep = inner = {}
    for _ in range(200):
        inner["x"] = {}
        inner = inner["x"]
    path = tmp_path / "deep.pt"
    torch.save(deep, path)
    with pytest.raises(ValueError, match="nested more than"):
        from_torch.load(path)


# --------------------------------------------------------------------------------------------------
# input layout
# --------------------------------------------------------------------------------------------------

def test_layout_is_read_from_the_checkpoint_given_or_assumed(tmp_path):
    net = _net(batch_first=True)
    recorded = tmp_path / "recorded.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"batch_first": True, "hidden": H}}, recorded)
    model = from_torch.load(recorded)
    assert model.batch_first is True and model.provenance["layout_assumed"] is False
    assert "'hyper_parameters.batch_first'" in model.provenance["layout"]
    _assert_same(model, net.gru)

    bare = tmp_path / "bare.pt"
    torch.save(net.state_dict(), bare)
    assumed = from_torch.load(bare)
    assert assumed.batch_first is False and assumed.provenance["layout_assumed"] is True
    assert assumed.provenance["layout"].startswith("time-major (T, B, I), assumed")
    given = from_torch.load(bare, batch_first=True)
    assert given.provenance["layout_assumed"] is False
    _assert_same(given, net.gru)
    # the caller's word wins over the file's
    overridden = from_torch.load(recorded, batch_first=False)
    assert overridden.batch_first is False
    with pytest.raises(TypeError, match="batch_first"):
        from_torch.load(bare, batch_first="yes")

    conflicting = tmp_path / "conflicting.pt"
    torch.save({"model": net.state_dict(), "a": {"batch_first": True}, "b": {"batch_first": False}}, conflicting)
    assert from_torch.load(conflicting).provenance["layout_assumed"] is True


# --------------------------------------------------------------------------------------------------
# memory cap on tensors' logical size
# --------------------------------------------------------------------------------------------------

_STRIDE0_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from converters import from_torch
    path, cap = sys.argv[1], int(sys.argv[2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        from_torch.load(path, max_bytes=cap)
        outcome = "loaded"
    except ValueError as exc:
        outcome = "ValueError: " + str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"outcome": outcome, "peak_growth_kib": after - before}))
""")


def test_stride0_tensors_are_charged_at_their_logical_size(tmp_path):
    """A 2 KB file of expand()-ed views of one element declares 6144 x 2048 float32 weights: refused with
    the cap named, and the refused load's peak memory stays near the interpreter's."""
    big_h, cap = 2048, 10 ** 6
    one = torch.zeros(1)
    sd = {"weight_ih_l0": one.expand(3 * big_h, big_h), "weight_hh_l0": one.expand(3 * big_h, big_h),
          "bias_ih_l0": one.expand(3 * big_h), "bias_hh_l0": one.expand(3 * big_h)}
    path = tmp_path / "stride0.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 4096
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _STRIDE0_CHILD, str(path), str(cap)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("ValueError"), result
    assert "max_bytes=1000000" in result["outcome"] and "weight_" in result["outcome"]
    assert re.search(r"\d{8,} bytes", result["outcome"]), result["outcome"]
    assert result["peak_growth_kib"] * 1024 < 4 * cap + 32 * 2 ** 20, result


# --------------------------------------------------------------------------------------------------
# a pickled module
# --------------------------------------------------------------------------------------------------

def _check_module_message(message):
    assert "two options" not in message
    assert "torch.save(model.state_dict(), path)" in message
    assert "from_torch.convert(module)" in message and "only for a file you trust" in message
    assert "torch.nn.modules.rnn.GRU" in message
    assert "\n" not in message and "\x1b" not in message


def test_pickled_module_message_says_what_to_do(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(torch.nn.GRU(I, H), path)
    with pytest.raises(ValueError) as info:
        from_torch.load(path)
    _check_module_message(str(info.value))


# --------------------------------------------------------------------------------------------------
# the CLI, as a user runs it
# --------------------------------------------------------------------------------------------------

def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gru_fast", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _error_line(proc):
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gru-fast: error: "), proc.stderr
    return lines[0]


def test_cli_on_nested_checkpoints(tmp_path):
    net = _net(batch_first=True)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "epoch": 3}, ckpt)

    # info: found, and says the layout it assumed
    proc = cli("info", ckpt)
    assert proc.returncode == 0, proc.stderr
    assert "model.gru." in proc.stdout
    assert re.search(r"\n  layout\s+time-major \(T, B, I\), assumed: .*--batch-first", proc.stdout)

    # convert with --batch-first: matches the batch_first torch module, no note
    out = tmp_path / "out.npz"
    proc = cli("convert", ckpt, "--batch-first", "-o", out)
    assert proc.returncode == 0 and "note:" not in proc.stderr, proc.stderr
    _assert_same(gru_fast.load(out), net.gru)

    # convert without: time-major, says so
    out_tm = tmp_path / "out_tm.npz"
    proc = cli("convert", ckpt, "-o", out_tm)
    assert proc.returncode == 0
    assert "note: ckpt: layout time-major (T, B, I), assumed" in proc.stderr and "--batch-first" in proc.stderr
    assert gru_fast.load(out_tm).batch_first is False

    # run: the sequence-major file through the nested checkpoint, against torch
    x = np.random.default_rng(3).standard_normal((4, 5, I)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = cli("run", ckpt, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npz", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        y_ref, _ = net.gru(torch.from_numpy(x))
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], y_ref.numpy(), rtol=0, atol=ATOL)


def test_cli_convert_takes_the_layout_recorded_in_the_checkpoint(tmp_path):
    """Lightning-style hyper_parameters {"batch_first": True}: converted batch-major without a flag; a
    (B, T, I) input then gives torch's batch_first output."""
    net = _net(batch_first=True)
    ckpt = tmp_path / "lightning.ckpt.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"batch_first": True}, "epoch": 9}, ckpt)
    out = tmp_path / "m.npz"
    proc = cli("convert", ckpt, "-o", out)
    assert proc.returncode == 0 and "note:" not in proc.stderr, proc.stderr
    model = gru_fast.load(out)
    assert model.batch_first is True
    assert model.provenance["layout"] == ("batch-major (B, T, I), from the checkpoint's "
                                          "'hyper_parameters.batch_first'")
    _assert_same(model, net.gru)
    proc = cli("info", ckpt, "--json")
    facts = next(iter(json.loads(proc.stdout)["models"].values()))
    assert facts["batch_first"] is True and facts["provenance"]["prefix"] == "state_dict.model.gru."


def test_cli_two_grus_none_and_a_pickled_module(tmp_path):
    two = tmp_path / "two.pt"
    torch.save({"model": _net(seed=1).state_dict(), "ema": _net(seed=2).state_dict()}, two)
    line = _error_line(cli("info", two))
    assert "holds 2 GRUs" in line and "'ema.gru.'" in line and "'model.gru.'" in line
    proc = cli("info", two, "--prefix", "ema.gru.", "--json")
    assert proc.returncode == 0, proc.stderr

    none = tmp_path / "none.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 3}, none)
    line = _error_line(cli("convert", none, "-o", tmp_path / "x.npz"))
    assert "no GRU parameters found" in line and "top-level keys are: 'model', 'epoch'" in line

    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.GRU(I, H), whole)
    line = _error_line(cli("info", whole))
    _check_module_message(line.split("gru-fast: error: ", 1)[1])
