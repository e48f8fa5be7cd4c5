# Two commands on a fresh machine: `make demo` and `make test`. Both set up the pinned environment
# first (once per lock: scripts/setup-env.sh keeps it in ~/.cache/nodulesynth, keyed by the lock's hash and the
# interpreter's platform).
CORES ?= 2
PYTEST_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD := 1

.PHONY: setup system-packages demo test test-fast lint report containers clean

# The Python environment; then a word on the optional system packages (PDF, browser and SLURM tests) if any
# is missing, with the one command that installs them.
setup:
	@scripts/setup-env.sh
	@scripts/system-packages.sh

system-packages:
	@scripts/system-packages.sh --install

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

# One Apptainer image per step group, rebuilt when its definition, the lock or the package changes. Run from
# the repository root (the .def files copy the lock, scripts/lock_requirements.py and src/ from it).
CONTAINER_GROUPS := data generators mmlab report
IMAGES := $(CONTAINER_GROUPS:%=containers/%.sif)
containers: $(IMAGES)

# Every file a definition copies (its %files), the package's data files and scripts/mmcv_build.py too.
containers/%.sif: containers/%.def requirements.lock scripts/lock_requirements.py scripts/mmcv_build.py \
		pyproject.toml README.md $(shell find src -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*')
	@command -v apptainer >/dev/null || { echo "make containers: apptainer is not on PATH" \
		"(https://apptainer.org/docs/admin/main/installation.html)" >&2; exit 1; }
	apptainer build --force $@ $<

clean:
	rm -rf results .snakemake
