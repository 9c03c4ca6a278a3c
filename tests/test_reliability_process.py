"""Reliability across processes: fork and spawn after the engine ran, and a read-only installation.

Fork.  A pre-fork server imports gru_fast, runs the engine (parallel kernels included), then forks workers.
Numba's default threading layer here is GNU OpenMP, which is not fork safe: Numba terminates (SIGTERM) any
direct child of a process that started the layer as soon as the child launches a parallel kernel.  gru_fast
makes the forking thread of such a child run its serial kernels (``gru_fast._config``, an at-fork hook), so
workers work out of the box.  For parallel kernels in worker processes the README advises 'spawn' or
'forkserver' (children start clean) or the tbb layer; ``NUMBA_THREADING_LAYER=workqueue`` (or ``forksafe``
without TBB) is fork safe too, and gru_fast serialises its own launches under it.

Authority: the parent's own results for the same models and inputs (the parent's results are pinned to
PyTorch and ONNX Runtime by the parity tests), within the float32 tolerance 1e-5; the children also
report how many parallel launches they made, so each test knows which kernels ran.

Everything runs in a child interpreter (which itself forks or spawns), with timeouts on every join, so
that a SIGTERM, an abort or a hang fails one test.

Read-only installation.  The package is copied into a directory its user cannot write (the tests run as
root, for whom chmod stops nothing, so the child drops to the unprivileged ``nobody`` user with
``setpriv``; a non-root runner gets the same effect from chmod alone).  With NUMBA_CACHE_DIR unset the
engine must warn (RuntimeWarning), cache compiled kernels in the user cache directory, and compute the
same result as PyTorch.  Squatted and unwritable cache directories: tests/test_reliability_cache.py.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, convert_torch, last_json_line, run_torch, torch_gru

WORKER_SCRIPT = textwrap.dedent(
    """
    import json
    import multiprocessing as mp
    import os
    import queue
    import sys
    import threading

    import numpy as np

    import gru_fast
    from gru_fast import _schedule, kernels

    _schedule._cores_taken = lambda workers, spinning: False  # launch even on a busy machine (see test_plan_memory)
    START = sys.argv[1]
    JOIN_TIMEOUT = 90.0
    launches = []

    def counting(forward):
        def counting_forward_parallel(*args):
            launches.append(os.getpid())
            return forward(*args)
        return counting_forward_parallel

    for key in [key for key in kernels.FORWARD if key[1]]:  # (weights, parallel) entry points
        kernels.FORWARD[key] = counting(kernels.FORWARD[key])

    def weights(seed, L, D, I, H):
        r = np.random.default_rng(seed)
        return [(r.uniform(-0.3, 0.3, (D, 3 * H, I if l == 0 else D * H)).astype(np.float32),
                 r.uniform(-0.3, 0.3, (D, 3 * H, H)).astype(np.float32),
                 r.uniform(-0.3, 0.3, (D, 6 * H)).astype(np.float32)) for l in range(L)]

    def build():
        big = gru_fast.GRU(weights(1, 1, 2, 16, 64), direction="bidirectional")
        small = gru_fast.GRU(weights(2, 2, 1, 3, 5), linear_before_reset=False)
        r = np.random.default_rng(3)
        return {"big_parallel": (big, r.standard_normal((20, 4, 16)).astype(np.float32)),
                "big_batched": (big, r.standard_normal((24, 8, 16)).astype(np.float32)),
                "small": (small, r.standard_normal((6, 2, 3)).astype(np.float32))}

    def run_all(inputs):
        out = {}
        for key, (model, x) in inputs.items():
            out[key] = model(x)
        small, x = inputs["small"]
        s = small.stream(batch_size=2)
        out["stream"] = np.stack([s.step(x[t]) for t in range(x.shape[0])])
        return out

    def child(answers, where):
        try:
            inputs = INPUTS if INPUTS is not None else build()
            if where == "thread":
                box = []
                t = threading.Thread(target=lambda: box.append(run_all(inputs)))
                t.start()
                t.join(JOIN_TIMEOUT)
                results = box[0]
            else:
                results = run_all(inputs)
            answers.put({"where": where, "results": results, "launches": launches.count(os.getpid())})
        except BaseException as exc:
            answers.put({"where": where, "error": f"{type(exc).__name__}: {exc}"})

    def max_error(a, b):
        if isinstance(a, tuple):
            return max(max_error(p, q) for p, q in zip(a, b))
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    INPUTS = None
    if __name__ == "__main__":
        INPUTS = build()
        parent = run_all(INPUTS)  # the engine runs, parallel kernel included, before any fork
        parent_launches = len(launches)
        if START != "fork":
            INPUTS = None  # spawned children rebuild the same models and inputs from the same seeds
        ctx = mp.get_context(START)
        report = {"parent_launches": parent_launches, "children": {}, "layer": gru_fast.threading_layer()}
        for where in sys.argv[2].split(","):
            answers = ctx.Queue()
            proc = ctx.Process(target=child, args=(answers, where))
            proc.start()
            answer = None
            for _ in range(int(JOIN_TIMEOUT)):  # poll: a child killed by a signal never answers
                try:
                    answer = answers.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not proc.is_alive():
                        break
            if answer is None:
                try:
                    answer = answers.get(timeout=1.0)
                except queue.Empty:
                    answer = {"where": where, "error": "no answer (the child died or hung)"}
            proc.join(JOIN_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                answer["hung"] = True
            answer["exitcode"] = proc.exitcode
            if "results" in answer:
                results = answer.pop("results")
                answer["max_error"] = {k: max_error(results[k], parent[k]) for k in parent}
            report["children"][where] = answer
        print(json.dumps(report), flush=True)
    """
)


def _run_workers(tmp_path, start, where, **env):
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    child_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), NUMBA_NUM_THREADS="2", **env)
    proc = subprocess.run([sys.executable, str(script), start, ",".join(where)], cwd=str(tmp_path),
                          env=child_env, capture_output=True, text=True, timeout=400)
    return last_json_line(proc)


def _assert_child_correct(report, where, *, parallel):
    child = report["children"][where]
    assert "error" not in child, f"{where} child failed: {child}"
    assert child["exitcode"] == 0 and not child.get("hung"), child
    assert all(err <= 1e-5 for err in child["max_error"].values()), child["max_error"]
    if parallel:
        assert child["launches"] > 0, "the child never reached the parallel kernel"
    else:
        assert child["launches"] == 0, "a parallel launch in this child would have been terminated"


def test_fork_after_parallel_kernels_default_layer(tmp_path):
    """Default threading layer (GNU OpenMP here): the parent ran parallel kernels; forked children compute
    every model correctly in their main thread, on the serial kernels."""
    report = _run_workers(tmp_path, "fork", ["main"])
    assert report["parent_launches"] > 0
    if report["layer"] != "omp":
        _assert_child_correct(report, "main", parallel=True)
    else:
        _assert_child_correct(report, "main", parallel=False)


def test_fork_then_thread_in_child_default_layer(tmp_path):
    """A thread the forked child starts (Numba gives new threads its default thread count) also runs the
    serial kernels: the engine asks gru_fast._config.parallel_threads(), which knows the process was forked
    from one that started GNU OpenMP."""
    report = _run_workers(tmp_path, "fork", ["thread"])
    _assert_child_correct(report, "thread", parallel=report["layer"] != "omp")


@pytest.mark.parametrize("layer", ["workqueue", "forksafe"])
def test_fork_with_documented_fork_safe_layer(tmp_path, layer):
    """NUMBA_THREADING_LAYER=workqueue / forksafe (the documented setting for pre-fork servers): forked
    children run the parallel kernels correctly, in their main thread and in a thread they start."""
    report = _run_workers(tmp_path, "fork", ["main", "thread"], NUMBA_THREADING_LAYER=layer)
    assert report["parent_launches"] > 0
    for where in ("main", "thread"):
        _assert_child_correct(report, where, parallel=True)


@pytest.mark.parametrize("start", ["spawn", "forkserver"])
def test_spawned_children(tmp_path, start):
    """'spawn' and 'forkserver' children start a fresh interpreter: parallel kernels and all, correct."""
    report = _run_workers(tmp_path, start, ["main", "thread"])
    for where in ("main", "thread"):
        _assert_child_correct(report, where, parallel=True)


def test_pool_of_forked_workers(tmp_path):
    """A multiprocessing.Pool (fork) of 2 workers serving 12 requests after the parent used the engine,
    as a pre-fork server does: every answer equals the parent's."""
    code = textwrap.dedent(
        """
        import json, multiprocessing as mp
        import numpy as np
        import gru_fast

        r = np.random.default_rng(0)
        big = gru_fast.GRU([(r.uniform(-.3, .3, (2, 192, 16)).astype(np.float32),
                             r.uniform(-.3, .3, (2, 192, 64)).astype(np.float32), None)],
                           direction="bidirectional")
        xs = [r.standard_normal((12 + i, 1 + i % 5, 16)).astype(np.float32) for i in range(12)]

        def serve(i):
            return big(xs[i])

        if __name__ == "__main__":
            parent = [big(x) for x in xs]
            with mp.get_context("fork").Pool(2) as pool:
                answers = pool.map_async(serve, range(12)).get(timeout=120)
            err = max(float(np.max(np.abs(a[k] - p[k]))) for a, p in zip(answers, parent) for k in (0, 1))
            print(json.dumps({"n": len(answers), "max_error": err}))
        """
    )
    script = tmp_path / "pool.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), NUMBA_NUM_THREADS="2"), timeout=300)
    out = last_json_line(proc)
    assert out["n"] == 12 and out["max_error"] <= 1e-5


# --------------------------------------------------------------------------------------------------
# read-only installation
# --------------------------------------------------------------------------------------------------

NOBODY = 65534

READ_ONLY_CHILD = textwrap.dedent(
    """
    import json, os, sys, warnings
    import numpy as np

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import gru_fast
    from gru_fast._cache import kernel_cache_dir
    report = {"file": gru_fast.__file__, "cache_dir": kernel_cache_dir(), "uid": os.getuid(),
              "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}
    if sys.argv[3] == "run":
        data = np.load(sys.argv[1])
        layers = [(data["W"], data["R"], data["B"])]
        y, h_n = gru_fast.GRU(layers)(data["x"])
        np.savez(sys.argv[2], y=y, h_n=h_n)
    print(json.dumps(report))
    """
)


def _unprivileged_prefix():
    """How to run a child that cannot write the package copy: as is (non-root), or as nobody via setpriv."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a directory unwritable to the child")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def read_only_install():
    """The package copied into a world-readable, unwritable directory, and a home the child owns.

    Made under the system temp dir (pytest's tmp_path is private to root, so nobody could not enter it)
    and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="gru_fast-ro-"))
    try:
        os.chmod(root, 0o755)
        site = root / "site-packages"
        shutil.copytree(REPO_ROOT / "gru_fast", site / "gru_fast", ignore=shutil.ignore_patterns("__pycache__"))
        for directory, _, files in os.walk(site):
            for name in files:
                os.chmod(os.path.join(directory, name), 0o444)
            os.chmod(directory, 0o555)
        home = root / "home"
        home.mkdir()
        if os.geteuid() == 0:
            os.chown(home, NOBODY, NOBODY)
        yield site, home
    finally:
        for directory, _, _ in os.walk(root):
            os.chmod(directory, 0o755)
        shutil.rmtree(root, ignore_errors=True)


def _run_read_only(site, home, args, **env):
    child_env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    child_env.update(PYTHONPATH=str(site), HOME=str(home), **env)
    cmd = _unprivileged_prefix() + [sys.executable, "-c", READ_ONLY_CHILD] + [str(a) for a in args]
    return last_json_line(subprocess.run(cmd, cwd=str(home), env=child_env, capture_output=True, text=True,
                                         timeout=300))


def test_read_only_package_uses_user_cache_and_computes_correctly(read_only_install):
    """Package directory not writable, NUMBA_CACHE_DIR unset: a RuntimeWarning names the user cache
    directory, compiled kernels land there (and nowhere in the package), and the result equals PyTorch's."""
    site, home = read_only_install
    module = torch_gru(3, 5, seed=4)
    (W, R, B), = convert_torch(module).onnx_weights()
    x = np.random.default_rng(1).standard_normal((7, 2, 3)).astype(np.float32)
    np.savez(home / "in.npz", W=W, R=R, B=B, x=x)
    report = _run_read_only(site, home, [home / "in.npz", home / "out.npz", "run"])

    expected_cache = home / ".cache" / "gru_fast" / "numba"
    assert report["file"] == str(site / "gru_fast" / "__init__.py")
    assert Path(report["cache_dir"]).parent == expected_cache  # the package's own subdirectory
    assert any(w.startswith("RuntimeWarning") and "not writable" in w and str(expected_cache) in w
               for w in report["warnings"]), report["warnings"]
    cached = [p.name for p in expected_cache.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert any(name.startswith("kernels.forward_serial") for name in cached), cached
    assert not any(p.suffix in (".nbi", ".nbc") for p in site.rglob("*")), "cache files inside the package"
    got = np.load(home / "out.npz")
    want_y, want_h = run_torch(module, x)
    assert np.max(np.abs(got["y"] - want_y)) <= 1e-5 and np.max(np.abs(got["h_n"] - want_h)) <= 1e-5


def test_read_only_package_and_unwritable_user_cache_fall_back_to_temp(read_only_install):
    """With the user cache directory unwritable too (XDG_CACHE_HOME read-only), the cache moves to a
    per-user directory under the temp dir, with the warning naming it."""
    site, home = read_only_install
    locked = home.parent / "locked-cache"
    locked.mkdir(mode=0o555)
    tmp = home / "tmp"
    tmp.mkdir()
    if os.geteuid() == 0:
        os.chown(tmp, NOBODY, NOBODY)
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    report = _run_read_only(site, home, [home / "unused.npz", home / "unused-out.npz", "import-only"],
                            XDG_CACHE_HOME=str(locked), TMPDIR=str(tmp))
    fallback = tmp / f"gru_fast-numba-{uid}"
    assert Path(report["cache_dir"]).parent == fallback
    assert fallback.is_dir() and stat.S_IMODE(fallback.stat().st_mode) == 0o700
    assert any(str(fallback) in w for w in report["warnings"]), report["warnings"]
