# One environment in .venv at the repo root; the console script is .venv/bin/mixer-label.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
MAIN_STAMP := $(VENV)/.installed-main
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo demo-s3 test lint bench bench-pipeline install dev clean

## demo: build the digits shards, train (or reuse) the model, run the nightly flow end to end
demo: $(MAIN_STAMP)
	$(BIN)/mixer-label demo

## demo-s3: the same through an S3 API server on loopback (the production path)
demo-s3: $(MAIN_STAMP)
	$(BIN)/mixer-label demo --s3

## test: the whole test suite (real Ray, real Prefect server, real S3 API on loopback)
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

## lint: ruff, and the layer contracts (import-linter, pyproject [tool.importlinter])
lint: $(DEV_STAMP)
	$(BIN)/ruff check console flows pipeline models tests bench infra
	$(BIN)/ruff format --check console flows pipeline models tests bench infra
	$(BIN)/lint-imports

bench: $(MAIN_STAMP)
	$(BIN)/mixer-label bench

install: $(MAIN_STAMP)
dev: $(DEV_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The main job: torch's CPU build first (a bare `torch` requirement would pull CUDA, GBs),
# unless some torch is already there, e.g. the dev one.
$(MAIN_STAMP): pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -c requirements/constraints.txt -e '.[demo]'
	touch $@

# Tests also compare against timm, which needs torchvision, which needs torch 2.14.1.
$(DEV_STAMP): pyproject.toml requirements/constraints.txt requirements/dev.txt | $(BIN)/python
	$(PIP) install -c requirements/constraints.txt -r requirements/dev.txt -e '.[dev]'
	touch $@ $(MAIN_STAMP)

clean:
	rm -rf $(VENV) .demo .pytest_cache

## bench-pipeline: end to end (local S3 API → Parquet) vs model-only vs a plain Ray Data script
bench-pipeline: $(DEV_STAMP)
	$(BIN)/python -m bench.pipeline_bench --model B/16 --images 1024 --images-per-shard 128 \
		--batch-size 32 --model-seconds 10 --repeat 2 --decode cpu,device --json bench-pipeline.json
	$(BIN)/python -m bench.pipeline_bench --model B/16 --skip-throughput --listing-shards 10000
