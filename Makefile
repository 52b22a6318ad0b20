# make help lists the targets. `make demo` and `make test` install what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
UI_PORT ?= 5000

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow test-guarantees lint format ui report serve bench gpu-check clean clean-cache

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-11s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project (editable) with its dev tools

demo: $(STAMP) ## the main job: feature extraction vs full fine-tuning on ELPV with bundled EfficientNet-Lite0
	$(BIN)/python -m transferlab.demo

test: $(STAMP) ## the default test suite (a few minutes on 2 CPU cores)
	$(BIN)/python -m pytest

test-slow: $(STAMP) ## real-data tests (ELPV, real backbones) and the slow guarantee tests
	$(BIN)/python -m pytest -m slow

test-guarantees: $(STAMP) ## the slow tests the README's guarantee table rests on (real signals, a real tracking server)
	$(BIN)/python -m pytest -m "slow and guarantee"

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP) ## ruff format and autofix
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

ui: $(STAMP) ## serve the MLflow UI for the local store on 127.0.0.1:$(UI_PORT)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

report: $(STAMP) ## aggregate a sweep from MLflow: make report EXPERIMENT=elpv_fe_vs_ft (or PARENT=<parent run id>)
	$(BIN)/python -m transferlab.report $(if $(PARENT),--parent-run $(PARENT),--experiment $(or $(EXPERIMENT),elpv_fe_vs_ft))

serve: $(STAMP) ## serve a run's model on 127.0.0.1:$(PORT): make serve MODEL=models:/NAME@champion (or runs:/RUN_ID/model)
	@test -n "$(MODEL)" || { echo "error: MODEL: not set. Fix: make serve MODEL=models:/NAME@champion (or runs:/RUN_ID/model)" >&2; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	  $(BIN)/mlflow models serve -m "$(MODEL)" --env-manager local --host 127.0.0.1 --port $(or $(PORT),5001)

bench: $(STAMP) ## the benchmarks: vs the seed article's loop (BENCH_ARGS=--full), the recipe's cost, the data path, DDP vs one process (~27 min)
	$(BIN)/python -m transferlab.bench $(BENCH_ARGS)
	$(BIN)/python experiments/benchmarks/recipe.py
	$(BIN)/python experiments/benchmarks/data_path.py
	$(BIN)/python experiments/benchmarks/ddp.py

gpu-check: $(STAMP) ## on a GPU machine: fast-path throughput, appended to experiments/benchmarks/README.md
	$(BIN)/python experiments/benchmarks/gpu_check.py $(GPU_ARGS)

clean-cache: ## empty the caches under .cache/ (decoded inputs, frozen features; paths.cache_dir)
	rm -rf .cache

clean: ## remove logs, the MLflow store and caches (keeps .venv)
	rm -rf logs outputs multirun mlflow.db mlartifacts .cache .pytest_cache
