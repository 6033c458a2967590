# The two commands a person remembers: `make run` and `make test`.
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install run run-all test test-unit test-full bench clean
# vega for `dvc plots show --html-template plots/offline.html` (DVC's own page loads it from a CDN).
PLOTS_JS := .plots/node_modules/vega-embed/build/vega-embed.min.js

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[jax,test,clients]'
	$(BIN)/python -m pip check
	touch $@

$(VENV)/.installed-ray: $(VENV)/.installed  ## the `ray` extra: sweep members on Ray
	$(BIN)/python -m pip install -q -e '.[jax,test,clients,ray]'
	$(BIN)/python -m pip check
	touch $@

$(PLOTS_JS):
	@command -v npm >/dev/null || { echo "warning: npm not found: use 'dvc plots show --json' or DVC's online page" >&2; exit 0; }
	npm install --silent --no-audit --no-fund --prefix .plots vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0

install: $(VENV)/.installed $(PLOTS_JS)

# Every bundled example; `make run` builds conf/config.yaml's default selection (digits).
# Workers for `make run` (`run -j`, at most 64): one per core, independent builds at once (P7 on
# 2 cores: 52.4 s with -j 2, 61.6 s with -j 1, bench/first_run.md).
JOBS ?= $(shell $(PYTHON) -c 'import os; print(min(os.cpu_count() or 1, 64))')
ALL_MODELS := digits,digits_keras,digits_h5,digits_concrete,digits_jax,mobilenet_v2,text_classifier,digits_multitask,digits_lstm

run: install  ## build the digits example, compose conf/ and `dvc repro` (MLflow: ./mlflow.db)
	$(BIN)/litert-pipeline run -j $(JOBS)

run-all: install  ## the same for every bundled example (about 30 minutes on 2 cores)
	$(BIN)/litert-pipeline run -j $(JOBS) 'model=[$(ALL_MODELS)]'

test: install $(VENV)/.installed-ray  ## unit tests and the end-to-end `dvc repro` tests, Ray included (not the slow MobileNetV2 ones)
	$(BIN)/python -m pytest -m "not slow"

test-unit: install  ## fast unit tests only
	$(BIN)/python -m pytest

test-full: install $(VENV)/.installed-ray  ## everything, including slow tests (DVC queue and Ray sweeps)
	$(BIN)/python -m pytest -m ""

bench: install  ## our pipeline vs the bare converter script, reruns, sweeps: bench/results.{json,md} (~35 min)
	$(BIN)/python bench/run.py

clean:
	rm -rf artifacts models reports comparison multirun dvc_plots mlflow.db mlruns
