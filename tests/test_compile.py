"""First use on an empty kernel cache: a notice when a compile starts, `gru-fast warmup` ahead of time.

Each test runs child processes with their own empty ``NUMBA_CACHE_DIR`` (one compile of the float32
entry points, ~10-30 s here), so what a fresh install sees is what is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, assert_matches, run_torch, torch_gru

NOTICE = "gru_fast: compiling the float32 {} kernels for this machine"

CALL = """
import json, sys
import numpy as np
import gru_fast
from gru_fast._cache import kernel_cache_stats
model = gru_fast.load(sys.argv[1])
x = np.load(sys.argv[2])
y, h_n = model(x)
np.save(sys.argv[3], y)
print(json.dumps(kernel_cache_stats()))
"""


def _child(args, cache_dir, timeout=600):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRU_FAST_COMPILE_NOTICE", None)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from converters.from_torch import convert

    import gru_fast

    directory = tmp_path_factory.mktemp("compile")
    module = torch_gru(6, 20, 1, seed=3)
    gru_fast.save(convert(module), directory / "m.npz")
    x = np.random.default_rng(0).standard_normal((5, 2, 6)).astype(np.float32)
    np.save(directory / "x.npy", x)
    return directory, module, x


def test_first_call_on_an_empty_cache_says_so_when_the_compile_starts_and_a_warm_one_is_silent(small_model,
                                                                                                tmp_path):
    directory, module, x = small_model
    cache = tmp_path / "cache"
    cache.mkdir()
    run = [str(directory / "m.npz"), str(directory / "x.npy")]
    first = _child(["-c", CALL, *run, str(tmp_path / "y1.npy")], cache)
    assert first.returncode == 0, first.stderr
    lines = [line for line in first.stderr.splitlines() if line.startswith("gru_fast: compiling")]
    assert len(lines) == 1 and lines[0].startswith(NOTICE.format("serial")), first.stderr
    assert "about" in lines[0] and str(cache) in lines[0], lines[0]  # how long, and where it goes
    assert '"cache_misses": 0' not in first.stdout  # it did compile

    second = _child(["-c", CALL, *run, str(tmp_path / "y2.npy")], cache)
    assert second.returncode == 0, second.stderr
    assert "gru_fast: compiling" not in second.stderr, second.stderr
    assert '"cache_misses": 0' in second.stdout, second.stdout  # loaded, not compiled
    y_ref, _ = run_torch(module, x, None, None)
    for name in ("y1.npy", "y2.npy"):
        assert_matches(np.load(tmp_path / name), y_ref, authority="torch.nn.GRU", dtype=np.float32, what="y")


def test_warmup_compiles_what_a_model_needs_so_its_first_call_loads_from_the_cache(small_model, tmp_path):
    directory, module, x = small_model
    cache = tmp_path / "cache"
    cache.mkdir()
    warm = _child(["-m", "gru_fast", "warmup", str(directory / "m.npz")], cache)
    assert warm.returncode == 0, warm.stderr
    assert "float32 serial" in warm.stdout and "float32 parallel" in warm.stdout, warm.stdout
    assert "float64" not in warm.stdout  # only what this model needs
    assert warm.stdout.count("(compiled)") == 2, warm.stdout
    assert NOTICE.format("serial") in warm.stderr and NOTICE.format("parallel") in warm.stderr, warm.stderr

    again = _child(["-m", "gru_fast", "warmup", str(directory / "m.npz")], cache)
    assert again.returncode == 0 and again.stdout.count("(cache)") == 2, again.stdout + again.stderr

    call = _child(["-c", CALL, str(directory / "m.npz"), str(directory / "x.npy"), str(tmp_path / "y.npy")], cache)
    assert call.returncode == 0 and "gru_fast: compiling" not in call.stderr, call.stderr
    assert '"cache_misses": 0' in call.stdout, call.stdout
    y_ref, _ = run_torch(module, x, None, None)
    assert_matches(np.load(tmp_path / "y.npy"), y_ref, authority="torch.nn.GRU", dtype=np.float32, what="y")


def test_warmup_refuses_a_missing_model_file_in_one_line(tmp_path):
    proc = _child(["-m", "gru_fast", "warmup", str(tmp_path / "nope.npz")], tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.startswith("gru-fast") and "nope.npz" in proc.stderr, proc.stderr


def test_notice_counts_the_shared_parts_when_a_parallel_entry_point_compiles_first(capsys, monkeypatch):
    """A first call that runs in parallel compiles the parallel entry point and everything it shares with
    the serial one (measured: 29 s for the bench's B=1 H=256 model on an empty cache), so its notice must
    announce both; after the serial entry point compiled, only its own."""
    from types import SimpleNamespace

    from gru_fast import _compile, kernels

    monkeypatch.delenv("GRU_FAST_COMPILE_NOTICE", raising=False)
    notice = _compile._CompileNotice()
    seconds = _compile.ENTRY_SECONDS

    def start(key):
        notice.on_start(SimpleNamespace(data={"dispatcher": kernels.FORWARD[key]}))
        return capsys.readouterr().err

    both = seconds["float32", False] + seconds["float32", True]
    assert f"float32 parallel kernels for this machine (about {both} s" in start(("float32", True))
    assert f"(about {seconds['float32', False]} s" in start(("float32", False))
    assert f"(about {seconds['float32', True]} s" in start(("float32", True))
