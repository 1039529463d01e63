# goose: every target builds the environment it needs on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NPROC  ?= 4
# `make test-stage 3` as well as `make test-stage N=3`: the word after the goal is the number.
ifeq (test-stage,$(firstword $(MAKECMDGOALS)))
  N ?= $(word 2,$(MAKECMDGOALS))
  ifneq ($(N),)
    $(eval $(N):;@:)
  endif
endif
# The most advanced stage that ships a train.py is the demo.
DEMO_STAGE := $(lastword $(sort $(dir $(wildcard stages/*/train.py))))

.PHONY: help demo test test-stage docs bench clean

help:
	@echo "make demo            train the most advanced stage under torchrun, beside the reference"
	@echo "make test            the whole suite (stages, unit tests, docs build)"
	@echo "make test-stage N    one stage's tests (N = 3 or 03; N=3 works too)"
	@echo "make docs            strict mkdocs build into site/"
	@echo "make bench           every benchmark; results in benchmarks/results.json"
	@echo "make clean           remove the environment and build outputs"

# torch is pinned: 2.13.0 is a local CPU wheel; an unpinned torch downloads a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) $(DEMO_STAGE)train.py

test: $(STAMP)
	$(PY) -m pytest -q

test-stage: $(STAMP)
	@$(PY) -m goose_core.testing.stages "$(N)" > /dev/null
	$(PY) -m pytest -q $$($(PY) -m goose_core.testing.stages "$(N)")

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) site .pytest_cache benchmarks/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
