"""Benchmark harness: gru_fast against PyTorch, ONNX Runtime and OpenVINO on the cases of the issue.

    python -m bench [--cases NAME ...] [--rounds N] [--out-dir bench/results] [--quick]
    python -m pytest bench/test_bench.py --benchmark-json=bench/results/bench.json

Modules: :mod:`bench.cases` (the case table, weights, inputs, FLOP formula), :mod:`bench.engines` (how each
engine is built and timed, parity, cold start), :mod:`bench.report` (machine info, sgemm, markdown / JSON
/ PNG output), and the stages of issue 13: :mod:`bench.sweep` (best peer / gru_fast over B x H, a heat
map), :mod:`bench.tails` (per-call p50 / p90 / p99, idle and beside a pinned busy loop), :mod:`bench.bf16`
(bfloat16 weights against OpenVINO's bf16 hint).  Every engine runs on ``THREADS`` threads.  Importing
this package caps the OpenMP / BLAS pools through the environment (values already set are kept) before
numpy or torch load their runtimes; :func:`bench.engines.configure_threads` then enforces the limit at
run time.
"""

import os as _os

THREADS = 2
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

for _var in THREAD_ENV_VARS:
    _os.environ.setdefault(_var, str(THREADS))


# the table of which extra installs which optional module is the package's (the CLI's messages use it too)
from gru_fast.extras import EXTRAS, missing_modules  # noqa: E402  (after the environment above is set)

__all__ = ["EXTRAS", "THREADS", "THREAD_ENV_VARS", "missing_modules"]
