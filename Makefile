# The two set-up commands of the README: `make demo` (main job on the embedded default) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

# torch is named first and alone so pip takes the CPU wheel on disk rather than a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m atlas_train.demo

# Lint first (seconds), then the suite; .pre-commit-config.yaml runs the same ruff on commit.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
