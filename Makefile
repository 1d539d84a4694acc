# Two commands do everything on a fresh machine:
#   make demo   set up, then train and evaluate a LoRA on Gemma 3 270M offline (CPU, minutes)
#   make test   set up, then run the test suite
# Torch comes first and pinned: on these machines torch==2.13.0 is a local CPU wheel, while an
# unpinned torch would pull a multi-GB CUDA build. Override with `make TORCH=torch ...` elsewhere.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	touch $@

demo: setup
	$(BIN)/peftlab demo

test: setup
	$(BIN)/python -m pytest tests -q

lint: setup
	$(BIN)/ruff check peftlab tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
