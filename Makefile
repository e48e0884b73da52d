# distgraft: every target bootstraps .venv from pyproject.toml on a machine with python3 only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NPROC  ?= 2
# pytest workers: test files are dealt to them whole (a module's fixtures are built once)
TEST_WORKERS ?= 2

# Fashion-MNIST: Debian's package puts the four IDX .gz files here (data.root's default).
FASHION_PKG   := dataset-fashion-mnist
FASHION_DIR   := /usr/share/datasets/fashion-mnist
FASHION_FILES := $(foreach f,train-images-idx3 train-labels-idx1 t10k-images-idx3 t10k-labels-idx1,$(FASHION_DIR)/$(f)-ubyte.gz)

.PHONY: help test test-cluster lint demo bench data clean

help:
	@echo "make demo   train 2 networks on the bundled digits data with torchrun (offline)"
	@echo "make data   Fashion-MNIST into $(FASHION_DIR) (installs $(FASHION_PKG) as root)"
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
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

# A real 2-node compose cluster: build, demo, kill -9 of agents mid-run (docker/cluster_test.py).
test-cluster: $(VENV)/.stamp
	$(PY) docker/cluster_test.py

demo: $(VENV)/.stamp
	$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) \
		-m distgraft train --config configs/digits.toml --run.name=demo --run.resume=false

# Present: say so (exit 0). Missing: as root install the Debian package, otherwise print the
# command and fail, so that a CI step stops here rather than at the first Fashion-MNIST run.
data:
	@missing=""; for f in $(FASHION_FILES); do test -f $$f || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then echo "Fashion-MNIST: present in $(FASHION_DIR)"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "Fashion-MNIST missing:$$missing"; \
		echo "install it as root: apt-get install $(FASHION_PKG)  (or: sudo make data)"; exit 1; \
	fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "Fashion-MNIST missing:$$missing"; \
		echo "no apt-get here: put the four *-ubyte.gz files in a folder and set data.root"; \
		exit 1; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y --no-install-recommends $(FASHION_PKG) \
		|| { apt-get update && apt-get install -y --no-install-recommends $(FASHION_PKG); } \
		|| exit 1; \
	for f in $(FASHION_FILES); do test -f $$f || { echo "$(FASHION_PKG) did not install $$f"; exit 1; }; done; \
	echo "Fashion-MNIST: installed in $(FASHION_DIR)"

bench: $(VENV)/.stamp
	$(PY) bench/entropy.py
	$(PY) bench/exchange.py
	$(PY) bench/train_throughput.py
	$(PY) bench/scaling.py
	$(PY) bench/regularize.py
	$(PY) bench/compress.py
	$(PY) bench/restart.py
	$(PY) bench/export.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
