#!/usr/bin/env bash
# The GPU paths that CI (no GPU) cannot run, in one script for a machine with one or more NVIDIA GPUs (a few minutes):
#   1. device choice: `auto` is CUDA; an indexed device is kept and made current; two jobs get two GPU slots
#   2. mmcv: its CUDA ops run on the GPU (else localize refuses, in one line: printed here)
#   3. SDM: the speed-feature, micro-batch and checkpointing tests on CUDA; the memory model's estimate beside the
#      measured peak for the demo config and the paper's defaults (256 px, 652 M parameters, batch 32)
# Run from the repository root with the project's environment:  scripts/gpu-check.sh  (or .venv/bin/... on PATH)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
status=0
step() { echo; echo "== $*"; }

step "1. devices"
"$py" - <<'EOF' || status=1
import os, subprocess, sys, tempfile
import torch
from nodulesynth.models.device import claim_gpu, job_device, pick_device
from nodulesynth.downstream import mmlab
print("torch", torch.__version__, "CUDA", torch.version.cuda, "driver GPUs:", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
assert pick_device("auto").type == "cuda", "auto did not choose the GPU"
last = torch.cuda.device_count() - 1
assert mmlab.resolve_device(f"cuda:{last}") == f"cuda:{last}" and torch.cuda.current_device() == last
with tempfile.TemporaryDirectory() as locks:
    os.environ["NODULESYNTH_GPU_LOCK_DIR"] = locks
    os.environ["NODULESYNTH_GPU_SLOTS"] = str(torch.cuda.device_count())
    child = ("from nodulesynth.models.device import job_device; import torch, time; d = job_device('auto');"
             "x = torch.ones(1, device=d); print(d, x.device, torch.cuda.current_device(), flush=True); time.sleep(3)")
    jobs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
            for _ in range(min(2, torch.cuda.device_count()))]
    lines = [j.communicate()[0].strip() for j in jobs]
    print("jobs:", lines)
    assert len({line.split()[0] for line in lines}) == len(lines), "two jobs got the same GPU"
print("devices: ok")
EOF

step "2. mmcv CUDA ops"
"$py" - <<'EOF' || status=1
import mmcv, mmcv.ops
from nodulesynth.downstream.localization import check_mmcv_ops
from nodulesynth.models.device import DeviceError
print("mmcv", mmcv.__version__, "compiled with CUDA", mmcv.ops.get_compiling_cuda_version())
try:
    check_mmcv_ops("cuda:0")
    print("mmcv ops on cuda:0: ok")
except DeviceError as error:
    print("REFUSED (as localize would):", error)
    raise SystemExit(1)
EOF

step "3. SDM on CUDA: tests"
"$py" -m pytest -q -x tests/test_sdm.py -k "speed_features or micro_batches or checkpointing or memory_model" \
  tests/test_device.py || status=1

step "3. SDM memory: estimate vs measured peak (demo config, paper defaults)"
timeout 480 "$py" benchmarks/sdm.py --memory --paper --device cuda || status=1

echo
[ $status = 0 ] && echo "gpu-check: all passed" || echo "gpu-check: FAILED (see above)"
exit $status
