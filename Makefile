# make demo  - set up .venv from nothing and run the offline demo (the main job)
# make test  - set up .venv from nothing and run the whole test suite (benchmarks as smoke tests): what CI runs
# make test-fast - every test not marked slow (conftest.py marks them), no benchmarks: the everyday loop
# make bench - run the benchmarks for real and print the comparison tables
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Tests, CI and the demo never reach the hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR := cpu

.PHONY: build demo test test-fast bench clean

# torch goes in first and pinned: any bare `torch` requirement with no torch installed
# pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	# The build requirements go into the venv itself (no isolated build env), so the in-place rebuilds
	# below use the same Cython and find the kernels up to date instead of compiling them twice.
	$(PY) -m pip install -q "setuptools>=64" "Cython>=3" "numpy>=2"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# Editing a .pyx only needs the in-place extension rebuild, not a reinstall.
$(VENV)/.kernels: $(VENV)/.installed $(wildcard csrc/*.pyx csrc/*.pxd)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(VENV)/.kernels

demo: build
	$(PY) -m fastlm.run

# Two worker processes (pytest-xdist): one test at a time leaves a core idle while it waits on imports and
# subprocesses.
test: build
	$(PY) -m pytest -q -p no:cacheprovider --benchmark-disable -n 2

test-fast: build
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not slow"

bench: build
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-only --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

clean:
	rm -rf build $(VENV)/.kernels csrc/*.c fastlm/_kernels/*.so
