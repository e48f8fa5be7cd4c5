#!/usr/bin/env bash
# Creates the project's environment from requirements.lock, once per lock.
#
# The environment lives outside the clone, in $NODULESYNTH_CACHE (default ~/.cache/nodulesynth),
# keyed by the hash of the lock, this script and the interpreter's platform and version (x86_64 and aarch64
# nodes may share one home); `.venv` is a link to it, and `--print-env` prints its path and does nothing else.
# A second call with the same lock reinstalls nothing. mmcv 2.1.0 has no wheel on PyPI: it is built against the pinned torch,
# with its CUDA ops wherever a CUDA toolkit of torch's CUDA version is found (NODULESYNTH_MMCV_OPS=cpu: without),
# and the wheel is kept in the cache under a key of mmcv, torch, CUDA variant and ops (scripts/mmcv_build.py).
# An environment whose mmcv lacks CUDA ops gets them once a later call can build them (on a GPU node).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cache=${NODULESYNTH_CACHE:-$HOME/.cache/nodulesynth}
python=${PYTHON:-python3}
platform=$("$python" -c 'import sys, sysconfig; print(sysconfig.get_platform(), sys.implementation.cache_tag)')
key=$({ cat requirements.lock scripts/setup-env.sh; echo "$platform"; } | sha256sum | cut -c1-16)
env="$cache/env-$key"
if [ "${1:-}" = "--print-env" ]; then
  echo "$env"
  exit 0
fi
mkdir -p "$cache/wheels"

pip="$env/bin/python -m pip --disable-pip-version-check"
mmcv_version=$(grep -E '^mmcv==' requirements.lock | cut -d= -f3)

# mmcv built (or taken from the cache) as scripts/mmcv_build.py plans it and installed: in a subshell, so that the
# build variables (FORCE_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST) reach nothing else. Its key waits in
# .mmcv-key.new until check_mmcv has imported it (which needs the rest of the lock: OpenCV, mmengine).
install_mmcv() (
  plan=$("$env/bin/python" scripts/mmcv_build.py plan --mmcv-version "$mmcv_version" \
    --installed "$(cat "$env/.mmcv-key" 2>/dev/null || true)")
  eval "$plan"
  [ "$mmcv_install" = 1 ] || exit 0
  ops="CPU-only (no CUDA ops: localize cannot train on a GPU)"
  [ "$mmcv_cuda_ops" = 1 ] && ops="with CUDA ops"
  echo "setup-env: mmcv $mmcv_version $ops: $mmcv_reason"
  wheels="$cache/wheels/$mmcv_key"
  (
    flock 9
    "$env/bin/python" scripts/mmcv_build.py adopt --wheels "$cache/wheels" --key "$mmcv_key" \
      --mmcv-version "$mmcv_version"
    if ! "$env/bin/python" scripts/mmcv_build.py wheel --wheels "$wheels" --mmcv-version "$mmcv_version" >/dev/null; then
      "$env/bin/python" scripts/mmcv_build.py tools
      echo "setup-env: building $mmcv_key (CPU-only: about 10 minutes on 2 cores; CUDA ops: an hour or more)"
      mkdir -p "$wheels"
      MAX_JOBS=${MAX_JOBS:-$(nproc)} $pip wheel -q --no-build-isolation --no-deps -w "$wheels" "mmcv==$mmcv_version"
    fi
  ) 9>"$cache/wheels/.lock"
  wheel=$("$env/bin/python" scripts/mmcv_build.py wheel --wheels "$wheels" --mmcv-version "$mmcv_version") || {
    echo "setup-env: $wheels holds no mmcv $mmcv_version wheel this Python can install" >&2
    exit 1
  }
  $pip install -q --no-deps --force-reinstall "$wheel"
  echo "$mmcv_key" > "$env/.mmcv-key.new"
)

# The installed mmcv has the CUDA ops its key says (or none), asserted before the key is recorded.
check_mmcv() {
  [ -f "$env/.mmcv-key.new" ] || return 0
  local ops=0
  case "$(cat "$env/.mmcv-key.new")" in *_cuda-ops) ops=1 ;; esac
  "$env/bin/python" scripts/mmcv_build.py check --cuda-ops "$ops"
  mv "$env/.mmcv-key.new" "$env/.mmcv-key"
}

if [ ! -f "$env/.complete" ]; then
  echo "setup-env: building $env (once per lock)"
  rm -rf "$env"
  "$python" -m venv "$env"
  # find-links here holds a CPU-only torch wheel whose torchvision fails to import: '===' pins
  # the registry's standard build exactly (it runs on CPU where no GPU is present).
  $pip install -q "$(grep -E '^torch===' requirements.lock)" "$(grep -E '^torchvision==' requirements.lock)"
  # mmcv's build and pylidc import pkg_resources, gone from setuptools 82.
  $pip install -q "$(grep -E '^setuptools==' requirements.lock)" "$(grep -E '^ninja==' requirements.lock)" wheel
  install_mmcv
  grep -vE '^(mmcv|torch|torchvision)[=]' requirements.lock | $pip install -q --no-build-isolation -r /dev/stdin
  check_mmcv
  touch "$env/.complete"
else
  install_mmcv  # nothing to do unless CUDA ops can be built here and the environment's mmcv has none
  check_mmcv
fi

ln -sfn "$env" .venv
# The package itself is installed editable from this clone; skipped when already pointing here. Every clone of
# one lock shares the environment: its `nodulesynth` script names the environment's own python (not this clone's
# .venv link), and the workflow's jobs import their own clone's src/ first (rules/common.smk).
if [ "$(.venv/bin/python -c 'import nodulesynth, os; print(os.path.dirname(nodulesynth.__file__))' 2>/dev/null)" != "$root/src/nodulesynth" ]; then
  $pip install -q --no-deps --no-build-isolation -e .
fi
