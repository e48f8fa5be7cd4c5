# Two commands on a fresh machine: `make demo` and `make test`. Both set up the pinned environment
# first (once per lock: scripts/setup-env.sh keeps it in ~/.cache/nodulesynth, keyed by the lock's hash).
CORES ?= 2
PYTEST_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD := 1

.PHONY: setup demo test test-fast lint report containers clean

setup:
	@scripts/setup-env.sh

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES)

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -v -rs $(PYTEST_ARGS)

test-fast: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -v -rs -m "not slow" $(PYTEST_ARGS)

lint: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --lint

report: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --report results/snakemake-report.html

containers:
	for group in data generators mmlab report; do apptainer build --force containers/$$group.sif containers/$$group.def; done

clean:
	rm -rf results .snakemake
