#!/usr/bin/env bash
# Snakemake's post-deploy hook of envs/mmlab.yaml: runs in the new environment once its pip list is installed.
# mmcv 2.1.0 has no wheel and its build imports the installed torch, so it cannot join that one pip call; its
# version comes from requirements.lock (as constraints). scripts/mmcv_build.py decides the build as for
# scripts/setup-env.sh: CUDA ops (FORCE_CUDA=1, CUDA_HOME, TORCH_CUDA_ARCH_LIST from torch) wherever a CUDA toolkit of
# torch's CUDA version is found, else CPU-only, said so (NODULESYNTH_MMCV_OPS=cpu|cuda decides instead); then it
# checks what was built. No pip cache: pip would reuse a wheel built for another variant.
set -euo pipefail
: "${NODULESYNTH_ROOT:?names the clone; the workflow sets it}"
version=$(grep -E '^mmcv==' "$NODULESYNTH_ROOT/requirements.lock" | cut -d= -f3)
plan=$(python "$NODULESYNTH_ROOT/scripts/mmcv_build.py" plan --mmcv-version "$version")
eval "$plan"
echo "mmlab env: mmcv $([ "$mmcv_cuda_ops" = 1 ] && echo "with CUDA ops" || echo "CPU-only"): $mmcv_reason"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
pip install --no-cache-dir --no-build-isolation -c "$NODULESYNTH_ROOT/requirements.lock" mmcv
python "$NODULESYNTH_ROOT/scripts/mmcv_build.py" check --cuda-ops "$mmcv_cuda_ops"
