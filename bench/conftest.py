"""pytest fixtures for the benchmark suite (bench/test_bench.py); not part of the unit tests.

Importing the ``bench`` package (this file's parent) caps the OpenMP / BLAS thread pools through the
environment before the engines load; ``configure_threads`` enforces 2 threads at run time.  At the end
of a run, the terminal summary lists best-peer / gru_fast ratios per case next to the targets: for
information only, the suite never fails on timings.
"""

from __future__ import annotations

import pytest

from bench.cases import CASE_BY_NAME, make_problem
from bench.engines import ENGINE_LABELS, ENGINES, Artifacts, configure_threads, parity_ok

_MEDIANS: dict = {}  # (case name, engine) -> (median seconds, parity error)


@pytest.fixture(scope="session")
def thread_config():
    return configure_threads()


@pytest.fixture(scope="session")
def artifacts_for(tmp_path_factory):
    """case -> Artifacts (the weights, torch module, gru_fast model, ONNX file), built once per session."""
    cache = {}

    def get(case):
        if case.name not in cache:
            cache[case.name] = Artifacts(make_problem(case), tmp_path_factory.mktemp(case.name))
        return cache[case.name]

    return get


@pytest.fixture(scope="session")
def medians():
    return _MEDIANS


def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("gru_fast vs best peer (informational, not asserted)")
    for name in dict.fromkeys(case for case, _ in _MEDIANS):
        case = CASE_BY_NAME[name]
        got = {engine: _MEDIANS[(name, engine)] for engine in ENGINES if (name, engine) in _MEDIANS}
        peers = {e: t for e, (t, err) in got.items() if e != "gru_fast" and parity_ok(err)}
        parts = [f"{ENGINE_LABELS[e]} {1e6 * t:.1f} us" for e, (t, _) in got.items()]
        line = f"{name:15s} {case.shape:28s} " + ", ".join(parts)
        if "gru_fast" in got and peers:
            best = min(peers, key=peers.get)
            ratio = peers[best] / got["gru_fast"][0]
            line += (f" | best peer {ENGINE_LABELS[best]}: ratio {ratio:.2f}x "
                     f"(target {case.target:g}x: {'met' if ratio >= case.target else 'not met'})")
        write(line)
