#!/usr/bin/env bash
# The GPU acceptance table (benchmarks/gpu_acceptance.py says what each row measures): one command on a machine
# with one GPU, under 8 minutes on an H100, no network. Run from anywhere with the project's environment:
#   benchmarks/gpu_acceptance.sh [--markdown table.md]     # --smoke: toy sizes on the CPU (the test's check)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
exec timeout "${GPU_ACCEPTANCE_TIMEOUT:-600}" "$py" benchmarks/gpu_acceptance.py "$@"
