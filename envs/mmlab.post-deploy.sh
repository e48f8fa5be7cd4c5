#!/usr/bin/env bash
# Snakemake's post-deploy hook of envs/mmlab.yaml: runs in the new environment once its pip list is installed.
# mmcv 2.1.0 has no wheel and its build imports the installed torch, so it cannot join that one pip call; its
# version comes from requirements.lock (as constraints). With nvcc on PATH (CUDA_HOME set) and FORCE_CUDA=1 it
# builds its CUDA ops too (set TORCH_CUDA_ARCH_LIST to your GPUs); without, CPU ops only.
set -euo pipefail
: "${NODULESYNTH_ROOT:?names the clone; the workflow sets it}"
MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install --no-build-isolation -c "$NODULESYNTH_ROOT/requirements.lock" mmcv
