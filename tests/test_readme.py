"""The README works as written: its Python quick start runs as is, in a fresh directory.

Authority for what the snippet computes: torch.nn.GRU, checked here on the objects the snippet leaves
behind (the snippet itself only shows the calls).
"""

from __future__ import annotations

import re

import numpy as np

from conftest import REPO_ROOT, assert_matches, run_torch


def _python_blocks():
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_quick_start_runs_and_matches_torch(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks, "the README has no python block"
    monkeypatch.chdir(tmp_path)  # the snippet writes gru.onnx and model.npz where it runs
    for block in blocks:
        if "dask" in block or "Client(" in block:
            continue  # needs a cluster: tests/test_dask.py runs the same calls on a LocalCluster
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
        if "module" in scope and "model" in scope:
            x = scope["x"]
            y_ref, h_ref = run_torch(scope["module"], x, None, None)
            y, h_n = scope["model"](x)  # the model reloaded from model.npz
            assert_matches(y, y_ref, authority="torch.nn.GRU", dtype=np.float32, what="README model: y")
            assert_matches(h_n, h_ref, authority="torch.nn.GRU", dtype=np.float32, what="README model: h_n")
            assert np.array_equal(scope["y_buf"], scope["model"](x)[0])  # the bound call saw the last batch
            assert scope["onnx_model"].hidden_size == 128 and scope["y_t"].shape == (128,)
