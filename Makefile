# moe_compile: one virtual environment at .venv, set up by `make setup` (idempotent: it reinstalls only when
# pyproject.toml or scripts/setup_transformers4.sh change). `make demo` and `make test` set up first.
#
# Where no GPU is present (no nvidia-smi), the CPU build torch==2.13.0 goes in before the project: an unpinned
# torch would resolve to a CUDA build of several GB.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.moe_compile-installed
CPU_TORCH := torch==2.13.0

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard scripts/setup_transformers4.sh)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "nvidia-smi found: torch comes with the project's dependencies"; \
	else \
		echo "no GPU (nvidia-smi not found): installing the CPU build $(CPU_TORCH) first"; \
		$(PIP) install --progress-bar off $(CPU_TORCH); \
	fi
	$(PIP) install --progress-bar off -e '.[dev]'
	@if [ -f scripts/setup_transformers4.sh ]; then bash scripts/setup_transformers4.sh; fi
	@touch $@

demo: setup
	$(VENV)/bin/moe-compile optimize tiny-qwen3-moe

test: setup
	$(PY) -m pytest -q --timeout=600

lint: setup
	$(VENV)/bin/ruff check .
