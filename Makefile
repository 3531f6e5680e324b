# cologen: every target sets itself up (virtual environment, data) on a fresh machine.
#
#   make stage1 / stage2 / stage3   the three curriculum stages on the tiny preset (PRESET=flux_dev for FLUX.1-dev)
#   make test                       the test suite
#   make bench / bench-gpu          benchmarks (ratios against baselines run in the same process)
#
# GPU users: make install TORCH="torch==2.5.1" TORCH_INDEX=https://download.pytorch.org/whl/cu124

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install test lint bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: install
	$(VENV)/bin/ruff check cologen data_recipes tests benchmarks

bench: install
	$(PY) benchmarks/bench_model.py
