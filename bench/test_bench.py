"""pytest-benchmark suite: one benchmark per engine per case, grouped by case.

    python -m pytest bench/test_bench.py --benchmark-json=bench/results/bench.json

Not collected by the unit-test suite (``testpaths = ["tests"]``).  Peers that are not installed are
skipped with the reason.  Each benchmark first checks the engine's output against PyTorch (max abs
error, recorded in ``extra_info``): a gru_fast mismatch fails the test, a peer's mismatch is a warning.
No timing is asserted; the ratios to the targets are printed in the terminal summary (see conftest.py).
For interleaved, noise-resistant numbers use ``python -m bench``.
"""

from __future__ import annotations

import warnings

import pytest

from bench.cases import CASES, PARITY_TOLERANCE
from bench.engines import ENGINE_LABELS, ENGINES, build_runner, check_parity, missing_reason, parity_ok


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_engine(benchmark, case, engine, artifacts_for, thread_config, medians):
    reason = missing_reason(engine)
    if reason is not None:
        pytest.skip(f"{ENGINE_LABELS[engine]} {reason}")
    benchmark.group = f"{case.name}: {case.title} ({case.shape})"
    artifacts = artifacts_for(case)
    runner = build_runner(engine, artifacts)
    err = check_parity(runner, artifacts)
    benchmark.extra_info.update({
        "engine": engine, "case": case.name, "shape": case.shape, "flops": case.flops,
        "target_ratio": case.target, "parity_max_abs_err": err, "reference": artifacts.reference[2],
        "threads": thread_config["threads"], "setup": runner.config.get("call", ""),
    })
    if not parity_ok(err):
        message = (f"{ENGINE_LABELS[engine]} differs from {artifacts.reference[2]} by {err:.2e} "
                   f"(> {PARITY_TOLERANCE:g}) on {case.name}")
        if engine == "gru_fast":
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)
    with runner.context():
        benchmark(runner.call)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        medians[(case.name, engine)] = (stats.median, err)
