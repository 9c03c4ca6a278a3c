# The two commands a fresh machine needs:
#   make demo   -- set up .venv and run `gru-fast demo`: the shipped model, checked against PyTorch and
#                  ONNX, timed against PyTorch / ONNX Runtime (examples/quickstart.py is the Python tour)
#   make test   -- set up .venv and run the test suite
# PyTorch is installed explicitly as torch==2.13.0: the CPU build on this project's
# machines. Any other spec (or letting a dependency pull torch) downloads a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# the bench extra adds OpenVINO, the one peer the test extra lacks, to the demo's timing table
demo: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(VENV)/bin/gru-fast warmup
	$(VENV)/bin/gru-fast demo

# `gru-fast warmup` compiles every kernel once per machine (about a minute on an empty kernel cache,
# a second after that), so the tests and the demo start from a warm cache
test: setup
	$(VENV)/bin/gru-fast warmup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
