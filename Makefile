# tuneforge: `make run` installs into .venv and runs the default pipeline; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch==2.13.0 resolves to the CPU build on the supported CPU machines; on a CUDA box set
# TORCH="torch==2.13.0 --index-url <your CUDA index>" or preinstall torch in the venv.
TORCH  ?= torch==2.13.0
EXTRAS ?= unsloth,embeddings,export,dev
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# dvc.yaml commands call `python`: make it the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH) -e ".[$(EXTRAS)]"
	# unsloth pulls torchvision, whose registry build breaks `from transformers import Trainer`
	# beside the CPU torch; nothing here uses it.
	$(PIP) uninstall -y torchvision || true
	touch $@

run: install
	$(VENV)/bin/dvc repro
	@echo; echo "Eval table: reports/eval.md"; cat reports/eval.md

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check stages flows tests bench

clean:
	rm -rf models reports data/raw data/clean data/formatted checkpoints
