"""Which extra of pyproject.toml installs each optional module: the one table the CLI's "not installed"
messages and the benchmark harness (``bench.missing_modules``) both read.

torch is in no extra on purpose (pip would pull a multi-GB CUDA build): :func:`install_hint` names the CPU
build instead.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "install_hint", "missing_modules"]

#: module -> the extra of pyproject.toml that installs it
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "h5py": "keras", "dask": "dask", "distributed": "dask",
          "threadpoolctl": "bench", "matplotlib": "bench", "openvino": "bench", "pytest_benchmark": "bench"}


def install_hint(module: str) -> str:
    """How to install ``module``: ``pip install 'gru_fast[extra]'``, the CPU torch, or ``pip install module``."""
    if module == "torch":
        return "install the CPU build: pip install torch"
    extra = EXTRAS.get(module)
    return f"pip install 'gru_fast[{extra}]'" if extra else f"pip install {module}"


def missing_modules(modules) -> str | None:
    """None when every module of ``modules`` can be imported, else one line naming every missing one
    and the extra that brings it, e.g. "dask, distributed (extra [dask]); threadpoolctl (extra [bench]):
    pip install 'gru_fast[dask,bench]'"."""
    by_extra: dict = {}
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            by_extra.setdefault(EXTRAS.get(module), []).append(module)
    if not by_extra:
        return None
    parts = [f"{', '.join(names)} (extra [{extra}])" if extra else ", ".join(names)
             for extra, names in by_extra.items()]
    extras = ",".join(extra for extra in by_extra if extra)
    return f"not installed: {'; '.join(parts)}" + (f": pip install 'gru_fast[{extras}]'" if extras else "")
