"""Reliability and security of the on-disk kernel cache (gru_fast._cache).

Numba unpickles the ``.nbi`` / ``.nbc`` files it finds in a cache directory, so a directory another user can
write is code execution, one another user owns but this user cannot write was a failed import, and a cache
whose files are checked against one source file only could serve a stale kernel after an upgrade.

Each scenario runs in a child interpreter that cannot write gru_fast's package directory (a read-only copy of
the package), with ``HOME`` and ``TMPDIR`` pointing into the test's directory.  The victim is uid 0 with every
capability dropped from its bounding set: it still owns what root owns, but permission bits bind it as they
bind any user (no CAP_DAC_OVERRIDE), so a directory with mode 0o555 is unwritable to it.  The attacker is
uid 65534 (``nobody``), which owns the squatted directories.  Creating those needs root, so the tests skip
with that reason elsewhere.

Authorities: the kernel's documented result (``clip_range`` clamps in place to [-clip, clip]), Numba's own
per-dispatcher cache counters (a miss is a compile, a hit a load), file ownership and modes from ``os.stat``,
and a planted pickle that creates a marker file if anything unpickles it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pickle
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO_ROOT, last_json_line, run_python

ATTACKER = 65534
PR_CAPBSET_DROP = 24
CHILD_TIMEOUT = 120

CHILD = textwrap.dedent(
    """
    import json
    import warnings

    import numpy as np

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import gru_fast
    from gru_fast import _cache, _math

    v = np.array([5.0, -5.0, 0.5], np.float32)
    _math.clip_range(v, np.float32(1.0))
    print(json.dumps({"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                      "cache_dir": _cache.kernel_cache_dir(), "clipped": v.tolist(),
                      **_cache.kernel_cache_stats()}))
    """
)


def _drop_capabilities():  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            os._exit(99)


class Victim:
    """A read-only copy of gru_fast and the environment of a user who cannot write it."""

    def __init__(self, base: Path):
        self.base = base
        self.package_root = base / "site"
        shutil.copytree(REPO_ROOT / "gru_fast", self.package_root / "gru_fast",
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.home = base / "home"
        self.tmp = base / "tmp"
        for directory in (self.home, self.tmp):
            directory.mkdir()
        os.chmod(self.tmp, 0o1777)  # as /tmp: root's, sticky, world-writable
        self.marker = base / "pickle-ran"
        self.read_only(True)

    def read_only(self, on: bool):
        for path in [self.package_root, *self.package_root.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o555 if on else 0o755)

    def run(self, **env):
        child_env = {key: value for key, value in os.environ.items()
                     if not key.startswith(("NUMBA_", "XDG_", "PYTHON"))}
        child_env.update(PYTHONPATH=str(self.package_root), HOME=str(self.home), TMPDIR=str(self.tmp),
                         PYTHONDONTWRITEBYTECODE="1")
        child_env.update(env)
        proc = subprocess.run([sys.executable, "-c", CHILD], cwd=str(self.base), env=child_env,
                              preexec_fn=_drop_capabilities, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT)
        if proc.returncode == 99:
            pytest.skip("cannot drop the child's capabilities (PR_CAPBSET_DROP refused)")
        return proc

    @property
    def squat(self) -> Path:
        return self.tmp / f"gru_fast-numba-{os.getuid()}"


@pytest.fixture
def victim(tmp_path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root: the squatted directory must belong to another uid (chown)")
    base = tmp_path / "victim"
    base.mkdir()
    made = Victim(base)
    yield made
    made.read_only(False)


class _Plant:
    """Unpickling this creates the marker file: the proof that a cache file was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "a"))


def _plant_index_files(directory: Path, victim: Victim, mode: int):
    """A malicious .nbi for clip_range where Numba's NUMBA_CACHE_DIR layout and the flat layout put it,
    in directories of the attacker's with ``mode``."""
    from gru_fast import _math

    func = _math.clip_range.py_func
    name = (f"_math.{func.__qualname__}-{func.__code__.co_firstlineno}"
            f".py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}.nbi")
    package = str(victim.package_root / "gru_fast")
    sub = directory / f"gru_fast_{hashlib.sha1(package.encode()).hexdigest()}"
    for where in (directory, sub):
        where.mkdir(exist_ok=True)
        (where / name).write_bytes(pickle.dumps(_Plant(victim.marker)))
        os.chown(where, ATTACKER, ATTACKER)
        os.chown(where / name, ATTACKER, ATTACKER)
        os.chmod(where, mode)


def _refused(out, squat):
    return any(str(squat) in w and "uid 65534" in w and "not cached" in w for w in out["warnings"])


def test_a_squatted_writable_tmp_cache_is_refused_and_no_planted_pickle_runs(victim):
    """Issue 11.1: another user pre-creates <tmp>/gru_fast-numba-<uid>, world-writable, with a malicious
    index file in it.  The package directory and ~/.cache are not writable, so the old fallback adopted the
    directory and unpickled the plant on the first kernel call.  Now the directory is refused (owner), with
    a warning naming it, the kernel compiles uncached and gives the documented result."""
    os.chmod(victim.home, 0o555)
    victim.squat.mkdir()
    _plant_index_files(victim.squat, victim, 0o777)
    proc = victim.run()
    assert not victim.marker.exists(), "a planted pickle was unpickled: code ran from the squatted cache"
    out = last_json_line(proc)
    assert out["cache_dir"] is None and _refused(out, victim.squat), out
    assert out["clipped"] == [1.0, -1.0, 0.5]
    assert out["cache_misses"] >= 1 and out["cache_hits"] == 0, out


def test_a_squatted_unwritable_tmp_cache_does_not_stop_import(victim):
    """Issue 11.2: the same squat, but not writable by the victim: the old import died with
    "RuntimeError: cannot cache function 'sigmoid': no locator available".  Now import succeeds, warns that
    kernels are not cached, and the kernel runs."""
    os.chmod(victim.home, 0o555)
    victim.squat.mkdir()
    os.chown(victim.squat, ATTACKER, ATTACKER)
    os.chmod(victim.squat, 0o755)
    out = last_json_line(victim.run())
    assert out["cache_dir"] is None and _refused(out, victim.squat), out
    assert out["clipped"] == [1.0, -1.0, 0.5]


def test_the_tmp_fallback_is_created_private_and_reused(victim):
    """With nothing squatted, the fallback is created owned by the victim with mode 0o700 (nobody else may
    write a pickle into it), and a second process loads the kernel the first one compiled."""
    os.chmod(victim.home, 0o555)
    first = last_json_line(victim.run())
    info = os.stat(victim.squat)
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
    assert first["cache_dir"] and first["cache_dir"].startswith(str(victim.squat)), first
    assert any(str(victim.squat) in w for w in first["warnings"]), first
    assert first["cache_misses"] >= 1
    second = last_json_line(victim.run())
    assert second["cache_hits"] >= 1 and second["cache_misses"] == 0, second


def test_an_unwritable_numba_cache_dir_never_reaches_an_unstamped_cache(victim):
    """Issue 11.3: NUMBA_CACHE_DIR set but not writable, package directory not writable, HOME writable.
    Numba's own fallback is its user-wide cache (~/.cache/numba), which checks a kernel against its own
    source file only: after a change to another kernel source (here _config.py, whose flags every kernel is
    compiled with) the old kernel loaded.  gru_fast's kernels are cached only where they carry the stamp of
    all kernel sources, so the changed source must make the second process compile again."""
    unwritable = victim.base / "numba-cache"
    unwritable.mkdir()
    os.chmod(unwritable, 0o555)
    first = last_json_line(victim.run(NUMBA_CACHE_DIR=str(unwritable)))
    again = last_json_line(victim.run(NUMBA_CACHE_DIR=str(unwritable)))
    victim.read_only(False)
    config = victim.package_root / "gru_fast" / "_config.py"
    config.write_text(config.read_text() + "\n# another release\n")
    victim.read_only(True)
    upgraded = last_json_line(victim.run(NUMBA_CACHE_DIR=str(unwritable)))
    assert first["cache_misses"] >= 1 and again["cache_hits"] >= 1 and again["cache_misses"] == 0, again
    assert upgraded["cache_hits"] == 0 and upgraded["cache_misses"] >= 1, f"stale kernel loaded: {upgraded}"
    assert upgraded["clipped"] == [1.0, -1.0, 0.5]
    assert any(f"NUMBA_CACHE_DIR={unwritable} is not writable" in w for w in first["warnings"]), first
    assert first["cache_dir"] and first["cache_dir"].startswith(str(victim.home)), first
    assert not (victim.home / ".cache" / "numba").exists(), "a gru_fast kernel went to Numba's user-wide cache"


def test_numba_cache_dir_unwritable_and_no_private_place_turns_caching_off(victim):
    """NUMBA_CACHE_DIR, the package directory and HOME unwritable, the temp directory squatted: no place
    carries gru_fast's stamp safely, so kernels are not cached (the old import failed: no locator)."""
    unwritable = victim.base / "numba-cache"
    unwritable.mkdir()
    os.chmod(unwritable, 0o555)
    os.chmod(victim.home, 0o555)
    victim.squat.mkdir()
    os.chown(victim.squat, ATTACKER, ATTACKER)
    out = last_json_line(victim.run(NUMBA_CACHE_DIR=str(unwritable)))
    assert out["cache_dir"] is None and out["cache_hits"] == 0, out
    assert any("NUMBA_CACHE_DIR" in w and "not cached" in w for w in out["warnings"]), out


def test_a_replaced_locator_list_turns_caching_off():
    """NUMBA_CACHE_LOCATOR_CLASSES replaces Numba's locator list, gru_fast's stamped locator included:
    gru_fast's kernels would be cached with per-file stamps, so they are not cached, with a warning."""
    out = last_json_line(run_python(CHILD, env={"NUMBA_CACHE_LOCATOR_CLASSES": "UserWideCacheLocator"},
                                    timeout=CHILD_TIMEOUT))
    assert out["cache_dir"] is None and out["cache_hits"] == 0, out
    assert any("NUMBA_CACHE_LOCATOR_CLASSES" in w for w in out["warnings"]), out
    assert out["clipped"] == [1.0, -1.0, 0.5]
