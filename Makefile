# The two front-door commands: `make run` (the whole pipeline on the defaults) and `make test`.
# Both create .venv on first use and work offline (pip resolves torch from local disk here).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Nothing may call out: DVC analytics/update checks off, hub downloads off in tests.
export DVC_NO_ANALYTICS := 1
export DVC_STUDIO_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: run test install bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## run: dvc repro on params.yaml (initialises the DVC/git repo if this is an unpacked copy)
run: $(STAMP)
	@test -d .git || (git init -q && echo "initialised a git repository (DVC needs one)")
	dvc repro
	@echo "report: metrics/report.md"
	@echo "explorer: metrics/explorer/index.html (open it in a browser)"

## test: the whole test suite (fast by default; `slow` cases included)
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python bench/bench_finetune.py
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_sae.py
	$(BIN)/python bench/bench_steer.py
	$(BIN)/python bench/bench_flops.py
	$(BIN)/python bench/bench_head_paths.py
	$(BIN)/python bench/bench_interpret.py
	$(BIN)/python bench/bench_ceiling.py
	$(BIN)/python bench/bench_multiblock.py

clean-venv:
	rm -rf $(VENV)
