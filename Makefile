# Two set-up commands: `make demo` and `make test`. Both create or refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build by default; on a machine with CUDA, any torch already in .venv is kept.
TORCH_SPEC ?= torch==2.13.0
DEMO_CONFIG ?= configs/synthetic-UNet3D.yaml

.PHONY: venv demo test test-fast lint bench clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q "$(TORCH_SPEC)"; fi; \
	fi
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m melecole.demo --config $(DEMO_CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check melecole tests bench *.py

bench: $(STAMP)
	for script in bench/bench_*.py; do $(PY) $$script || exit 1; done
