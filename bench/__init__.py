"""Benchmark harness: gru_fast against PyTorch, ONNX Runtime and OpenVINO on the cases of the issue.

    python -m bench [--cases NAME ...] [--rounds N] [--out-dir bench/results] [--quick]
    python -m pytest bench/test_bench.py --benchmark-json=bench/results/bench.json

Modules: :mod:`bench.cases` (the case table, weights, inputs, FLOP formula), :mod:`bench.engines` (how each
engine is built and timed, parity, cold start), :mod:`bench.report` (machine info, sgemm, markdown / JSON
/ PNG output).  Every engine runs on ``THREADS`` threads.  Importing this package caps the OpenMP / BLAS
pools through the environment (values already set are kept) before numpy or torch load their runtimes;
:func:`bench.engines.configure_threads` then enforces the limit at run time.
"""

import importlib.util as _importlib_util
import os as _os

THREADS = 2
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

for _var in THREAD_ENV_VARS:
    _os.environ.setdefault(_var, str(THREADS))


#: the extra of pyproject.toml that installs each optional module the harness uses
EXTRAS = {"dask": "dask", "distributed": "dask", "threadpoolctl": "bench", "matplotlib": "bench",
          "onnx": "onnx", "onnxruntime": "onnx", "openvino": "bench", "pytest_benchmark": "bench"}


def missing_modules(modules) -> str | None:
    """None when every module of ``modules`` can be imported, else one line naming every missing one
    and the extra that brings it, e.g. "dask, distributed (extra [dask]); threadpoolctl (extra [bench]):
    pip install 'gru_fast[dask,bench]'"."""
    by_extra: dict = {}
    for module in modules:
        try:
            found = _importlib_util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            by_extra.setdefault(EXTRAS.get(module), []).append(module)
    if not by_extra:
        return None
    parts = [f"{', '.join(names)} (extra [{extra}])" if extra else ", ".join(names)
             for extra, names in by_extra.items()]
    extras = ",".join(extra for extra in by_extra if extra)
    return (f"not installed: {'; '.join(parts)}" + (f": pip install 'gru_fast[{extras}]'" if extras else ""))
