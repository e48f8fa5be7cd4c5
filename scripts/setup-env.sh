#!/usr/bin/env bash
# Creates the project's environment from requirements.lock, once per lock.
#
# The environment lives outside the clone, in $NODULESYNTH_CACHE (default ~/.cache/nodulesynth),
# keyed by the hash of the lock and this script; `.venv` is a link to it. A second call with the
# same lock reinstalls nothing. mmcv 2.1.0 has no wheel on PyPI: it is built once per machine
# against the pinned torch and the wheel is kept in the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cache=${NODULESYNTH_CACHE:-$HOME/.cache/nodulesynth}
python=${PYTHON:-python3}
key=$(cat requirements.lock scripts/setup-env.sh | sha256sum | cut -c1-16)
env="$cache/env-$key"
mkdir -p "$cache/wheels"

if [ ! -f "$env/.complete" ]; then
  echo "setup-env: building $env (once per lock)"
  rm -rf "$env"
  "$python" -m venv "$env"
  pip="$env/bin/python -m pip --disable-pip-version-check"
  # find-links here holds a CPU-only torch wheel whose torchvision fails to import: '===' pins
  # the registry's standard build exactly (it runs on CPU where no GPU is present).
  $pip install -q "$(grep -E '^torch===' requirements.lock)" "$(grep -E '^torchvision==' requirements.lock)"
  # mmcv's build and pylidc import pkg_resources, gone from setuptools 82.
  $pip install -q "$(grep -E '^setuptools==' requirements.lock)" "$(grep -E '^ninja==' requirements.lock)" wheel
  (
    flock 9
    if ! ls "$cache"/wheels/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
      echo "setup-env: building mmcv 2.1.0 (about 10 minutes on 2 cores, once per machine)"
      MAX_JOBS=${MAX_JOBS:-$(nproc)} $pip wheel -q --no-build-isolation --no-deps -w "$cache/wheels" mmcv==2.1.0
    fi
  ) 9>"$cache/wheels/.lock"
  $pip install -q --no-deps "$cache"/wheels/mmcv-2.1.0-*.whl
  grep -vE '^(mmcv|torch|torchvision)[=]' requirements.lock | $pip install -q --no-build-isolation -r /dev/stdin
  touch "$env/.complete"
fi

ln -sfn "$env" .venv
# The package itself is installed editable from this clone; skipped when already pointing here.
if [ "$(.venv/bin/python -c 'import nodulesynth, os; print(os.path.dirname(nodulesynth.__file__))' 2>/dev/null)" != "$root/src/nodulesynth" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
