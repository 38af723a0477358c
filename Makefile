# The two commands: `make repro` (set up, then run the pipeline) and `make test`.
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: setup repro test test-slow lint
setup:
	@bash scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest -q

test-slow: setup
	python -m pytest -q -m slow

lint: setup
	ruff check loram stages tests && ruff format --check loram stages tests
