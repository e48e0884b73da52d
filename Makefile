# distgraft: every target bootstraps .venv from pyproject.toml on a machine with python3 only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NPROC  ?= 2

.PHONY: help test test-cluster lint demo bench clean

help:
	@echo "make demo   train 2 networks on the bundled digits data with torchrun (offline)"
	@echo "make test   ruff + the test suite (CPU, real processes)"
	@echo "make test-cluster  the docker-compose cluster end to end (Docker; root installs it)"
	@echo "make bench  the benchmarks in bench/ (JSON lines)"

# Re-install when pyproject.toml is newer than the venv's stamp.
$(VENV)/.stamp: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q

# A real 2-node compose cluster: build, demo, kill -9 of agents mid-run (docker/cluster_test.py).
test-cluster: $(VENV)/.stamp
	$(PY) docker/cluster_test.py

demo: $(VENV)/.stamp
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) \
		-m distgraft train --config configs/digits.toml --run.name=demo --run.resume=false

bench: $(VENV)/.stamp
	$(PY) bench/entropy.py
	$(PY) bench/exchange.py
	$(PY) bench/train_throughput.py
	$(PY) bench/scaling.py
	$(PY) bench/regularize.py
	$(PY) bench/compress.py
	$(PY) bench/restart.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
