#!/usr/bin/env python3
"""How scripts/setup-env.sh builds, caches and checks mmcv (no wheel exists: it is built against the installed torch).

mmcv compiles its CUDA ops (RoIAlign, NMS: what mmdet's Faster R-CNN runs on a GPU) only with FORCE_CUDA=1 or a
visible GPU, so a build on a login node used to give a CPU-only wheel that the GPU nodes then reused. Here:

- CUDA ops are built wherever a CUDA toolkit whose major version is torch's CUDA major is found (CUDA_HOME,
  CUDA_PATH, nvcc on PATH, /usr/local/cuda), with TORCH_CUDA_ARCH_LIST from torch's own kernel list;
  otherwise, or with NODULESYNTH_MMCV_OPS=cpu, a build named CPU-only. A compiler-only toolkit (nvcc and the
  runtime, without the cuBLAS/cuSPARSE/cuSOLVER headers that torch's CUDA headers include) is completed from the
  headers torch's own NVIDIA packages ship (CPATH); where those lack them too, the build is CPU-only, saying which.
- Wheels are cached under a key of mmcv version, torch version, torch's CUDA variant ("cpu", "cu130") and whether
  CUDA ops were built: `wheels/<key>/mmcv-*.whl`. A wheel of the old unkeyed layout (`wheels/mmcv-*.whl`) is
  taken for a CPU-only one after checking that its extension links no CUDA library, and hard-linked in.
- A key's folder may hold wheels of several interpreters and platforms (x86_64 and aarch64 nodes sharing a home):
  pip picks the one this interpreter can install, by the tags in the wheels' names (`wheel`).
- An environment keeps the key of its mmcv (`<env>/.mmcv-key`): a CPU-only mmcv is replaced once CUDA ops can be
  built (the GPU node after the login node); a CUDA one is never replaced by a CPU-only one (it runs on CPUs too).
- After installing, `check` asserts that the installed mmcv is what was planned.

    mmcv_build.py plan --mmcv-version V [--installed KEY]               shell assignments for setup-env.sh
    mmcv_build.py adopt --wheels DIR --key KEY                          an unkeyed CPU-only wheel into its folder
    mmcv_build.py wheel --wheels DIR --mmcv-version V                   the folder's wheel for this interpreter
    mmcv_build.py check --cuda-ops 0|1                                   the installed mmcv has (no) CUDA ops
    mmcv_build.py tools                                                 the compiler and headers a build needs

Run with the environment's python (torch installed); the functions below it take plain values, for the tests.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

OPS_VARIABLE = "NODULESYNTH_MMCV_OPS"  # auto (default) | cpu | cuda
# Libraries only an extension built with CUDA ops links (the wheel built without them links libtorch_cpu only).
CUDA_LIBRARIES = (b"libtorch_cuda.so", b"libc10_cuda.so", b"libcudart.so")


@dataclass(frozen=True)
class Plan:
    key: str                 # the cache folder's name
    cuda_ops: bool
    reason: str              # why these ops, in words
    env: dict = field(default_factory=dict)  # build variables (FORCE_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST)


def cuda_variant(torch_cuda: str | None) -> str:
    """torch.version.cuda as its wheel's variant: None -> "cpu", "13.0" -> "cu130"."""
    return "cu" + torch_cuda.replace(".", "") if torch_cuda else "cpu"


def wheel_key(mmcv_version: str, torch_version: str, torch_cuda: str | None, cuda_ops: bool) -> str:
    base = torch_version.split("+", 1)[0]
    return f"mmcv-{mmcv_version}_torch-{base}_{cuda_variant(torch_cuda)}_{'cuda-ops' if cuda_ops else 'cpu-only'}"


# CUDA library headers that torch's CUDA headers include (ATen/cuda/CUDAContextLight.h), so that every CUDA op of
# mmcv needs them. A compiler-only toolkit lacks them (a conda `cuda-nvcc`, an HPC module, this development
# machine's: the build stopped at its first CUDA op, "cusparse.h: No such file or directory");
# torch's pip wheels bring them as NVIDIA packages: site-packages/nvidia/cu13/include (CUDA 13) or
# nvidia/<library>/include (CUDA 12).
LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")


def library_includes(toolkit, package_roots) -> tuple[list, list]:
    """(include folders to add, headers found nowhere) for LIBRARY_HEADERS: none where the toolkit has them
    (include/ or targets/<arch>/include/), else the include folders of the NVIDIA packages under `package_roots`
    (the site-packages folders beside torch) that hold them."""
    toolkit = Path(toolkit)
    own = [toolkit / "include", *sorted(toolkit.glob("targets/*/include"))]
    packages = [d for root in package_roots for d in sorted(Path(root).glob("nvidia/*/include"))]
    extra, missing = [], []
    for header in LIBRARY_HEADERS:
        if any((d / header).is_file() for d in own):
            continue
        found = next((d for d in packages if (d / header).is_file()), None)
        if found is None:
            missing.append(header)
        elif str(found) not in extra:
            extra.append(str(found))
    return extra, missing


def nvcc_release(version_text: str) -> str | None:
    """"release 13.0" of `nvcc --version`'s output; None where it is not there."""
    match = re.search(r"release (\d+\.\d+)", version_text or "")
    return match.group(1) if match else None


def arch_list(torch_archs) -> str:
    """torch.cuda.get_arch_list() (['sm_75', ..., 'sm_120']) as TORCH_CUDA_ARCH_LIST ("7.5;...;12.0+PTX"): the
    GPUs the pinned torch has kernels for, the newest also as PTX for later ones."""
    archs = []
    for name in torch_archs:
        match = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", name)
        if match:
            archs.append(f"{match.group(1)}.{match.group(2)}{match.group(3)}")
    if not archs:
        raise ValueError(f"torch names no GPU architecture ({list(torch_archs)}): cannot build CUDA ops for it")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def plan_build(mmcv_version, torch_version, torch_cuda, torch_archs, toolkit: str | None, toolkit_release: str | None,
               wanted: str = "auto", gpu_visible: bool = True, includes=(), missing_headers=()) -> Plan:
    """What to build: CUDA ops where `toolkit` (a CUDA_HOME) has torch's CUDA major version and a GPU is visible,
    unless `wanted` is "cpu"; `wanted` "cuda" builds them without a GPU (a login node building for its GPU nodes)
    and makes a missing or mismatched toolkit an error instead of a CPU-only build. Auto on a machine with a
    toolkit but no GPU builds CPU-only: the CUDA ops take an hour or more on a few cores and nothing there could
    run them (a GPU node's `make setup` adds them to the same environment later). `includes` and
    `missing_headers` are library_includes' answer for the toolkit: the first go on CPATH; any of the second
    makes the toolkit unusable (said before the build, not after an hour of it)."""
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{OPS_VARIABLE} must be auto, cpu or cuda, got {wanted!r}")

    def cpu(reason):
        if wanted == "cuda":
            raise RuntimeError(f"{OPS_VARIABLE}=cuda, but {reason}")
        return Plan(wheel_key(mmcv_version, torch_version, torch_cuda, False), False, reason)

    if wanted == "cpu":
        return cpu(f"{OPS_VARIABLE}=cpu")
    if not torch_cuda:
        return cpu(f"torch {torch_version} is a CPU-only build")
    if not toolkit:
        return cpu(f"no CUDA toolkit found (CUDA_HOME, nvcc on PATH, /usr/local/cuda) for torch's CUDA {torch_cuda}")
    if not toolkit_release or toolkit_release.split(".")[0] != torch_cuda.split(".")[0]:
        return cpu(f"the CUDA toolkit in {toolkit} is {toolkit_release or 'of unknown version'}, torch's CUDA is "
                   f"{torch_cuda}")
    if missing_headers:
        package = f"cuda-libraries-dev-{torch_cuda.replace('.', '-')}"
        return cpu(f"the CUDA toolkit in {toolkit} lacks {', '.join(missing_headers)}, which torch's CUDA headers "
                   f"include, and torch's NVIDIA packages do not have them either (install the toolkit's library "
                   f"headers, e.g. NVIDIA's {package})")
    if wanted == "auto" and not gpu_visible:
        return cpu(f"CUDA toolkit {toolkit_release} in {toolkit} matches torch's CUDA {torch_cuda}, but no GPU is "
                   f"visible here ({OPS_VARIABLE}=cuda builds the CUDA ops anyway)")
    env = {"FORCE_CUDA": "1", "MMCV_WITH_OPS": "1", "CUDA_HOME": str(toolkit),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST") or arch_list(torch_archs)}
    reason = f"CUDA toolkit {toolkit_release} in {toolkit} matches torch's CUDA {torch_cuda}"
    if includes:
        # after the toolkit's own include folder (CPATH comes after -I), so only what it lacks is taken from there
        env["CPATH"] = os.pathsep.join([*includes, *filter(None, [os.environ.get("CPATH")])])
        reason += f" (its library headers from {', '.join(includes)})"
    return Plan(wheel_key(mmcv_version, torch_version, torch_cuda, True), True, reason, env)


def keeps(installed_key: str | None, plan: Plan) -> bool:
    """Whether an environment's installed mmcv (its key) may stay: the planned one, or a CUDA-ops build of the
    same versions where only a CPU-only one could be built here (a login node after a GPU node)."""
    if not installed_key:
        return False
    return installed_key == plan.key or (not plan.cuda_ops and installed_key == plan.key.replace("_cpu-only",
                                                                                                 "_cuda-ops"))


def wheel_has_cuda_ops(wheel) -> bool:
    """Whether a wheel's compiled mmcv._ext links a CUDA library. The names of the libraries an ELF file needs are
    plain strings in it, so a byte search answers this without an ELF parser (readelf is not installed
    everywhere)."""
    with zipfile.ZipFile(wheel) as archive:
        extensions = [n for n in archive.namelist() if re.fullmatch(r"mmcv/_ext[^/]*\.so", n)]
        if not extensions:
            raise ValueError(f"{wheel}: holds no compiled mmcv/_ext*.so (an mmcv-lite wheel?)")
        return any(lib in archive.read(name) for name in extensions for lib in CUDA_LIBRARIES)


def adopt_unkeyed(wheels: Path, key: str, mmcv_version: str) -> Path | None:
    """A CPU-only wheel of the old layout (wheels/mmcv-V-*.whl, built before keys) hard-linked into the folder of
    `key` when that is a CPU-only key and has no wheel yet; the old file stays for older checkouts."""
    folder = Path(wheels) / key
    if not key.endswith("_cpu-only") or list(folder.glob(f"mmcv-{mmcv_version}-*.whl")):
        return None
    for old in sorted(Path(wheels).glob(f"mmcv-{mmcv_version}-*.whl")):
        if wheel_has_cuda_ops(old):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.link(old, folder / old.name)
        except OSError:  # another file system, or no hard links there
            shutil.copy2(old, folder / old.name)
        return folder / old.name
    return None


def compatible_wheel(wheels, mmcv_version: str, python=sys.executable) -> Path | None:
    """The wheel of mmcv `mmcv_version` in folder `wheels` that `python` can install, or None: pip's own choice
    (a dry run against the folder alone), so a wheel of another Python or platform in the folder is passed over.
    pip's configuration (PIP_* variables, pip.conf: find-links of other wheels, constraints) is left out."""
    import json
    from urllib.parse import unquote, urlparse

    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    environ["PIP_CONFIG_FILE"] = os.devnull  # pip reads no configuration file
    out = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--dry-run",
                          "--ignore-installed", "--no-index", "--no-deps", "--only-binary", ":all:", "--find-links",
                          str(wheels), "--report", "-", f"mmcv=={mmcv_version}"], capture_output=True, text=True,
                         env=environ)
    if out.returncode != 0:
        return None
    chosen = [Path(unquote(urlparse(item["download_info"]["url"]).path)) for item in json.loads(out.stdout)["install"]]
    inside = [path for path in chosen if path.parent.resolve() == Path(wheels).resolve()]
    return inside[0] if inside else None


def find_toolkit(torch_cuda: str | None, environ=None):
    """(CUDA_HOME, its nvcc release) of the first toolkit found: CUDA_HOME, CUDA_PATH, nvcc on PATH,
    /usr/local/cuda-<torch's>, /usr/local/cuda. A folder counts when it holds bin/nvcc and include/cuda_runtime.h
    (nvcc on PATH may be a wrapper script outside its toolkit)."""
    environ = os.environ if environ is None else environ
    candidates = [environ.get("CUDA_HOME"), environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    candidates += [f"/usr/local/cuda-{torch_cuda}" if torch_cuda else None, "/usr/local/cuda"]
    for home in filter(None, candidates):
        home = Path(home)
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            out = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
            return str(home), nvcc_release(out.stdout)
    return None, None


def gpu_visible(environ=None) -> bool:
    """Whether an NVIDIA GPU is visible here (`nvidia-smi -L` lists one; CUDA_VISIBLE_DEVICES is honoured), without
    initialising CUDA."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nodulesynth.models.device import local_gpu_count

    return local_gpu_count(environ) > 0


def installed_cuda_ops() -> bool:
    import mmcv.ops

    return mmcv.ops.get_compiling_cuda_version() != "not available"


def missing_build_tools(include_dir, path) -> list:
    """What building mmcv needs and this machine lacks, each with the Debian package that gives it: a C++
    compiler on `path`, and Python.h in `include_dir` (the interpreter's headers, a package of their own on Debian).
    Checked before the build, which otherwise fails minutes in on a compiler error."""
    missing = []
    if not any(shutil.which(name, path=path) for name in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler (Debian: apt-get install g++)")
    if not (Path(include_dir) / "Python.h").is_file():
        missing.append(f"Python's headers, {Path(include_dir) / 'Python.h'} (Debian: apt-get install python3-dev)")
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--mmcv-version", required=True)
    p.add_argument("--installed", default="", help="the key of the environment's mmcv, if any")
    p = sub.add_parser("adopt")
    p.add_argument("--wheels", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--mmcv-version", required=True)
    p = sub.add_parser("wheel")
    p.add_argument("--wheels", required=True)
    p.add_argument("--mmcv-version", required=True)
    p = sub.add_parser("check")
    p.add_argument("--cuda-ops", type=int, choices=(0, 1), required=True)
    sub.add_parser("tools")
    args = parser.parse_args(argv)

    if args.command == "tools":
        import sysconfig

        missing = missing_build_tools(sysconfig.get_paths()["include"], os.environ.get("PATH"))
        if missing:
            print(f"setup-env: building mmcv needs {' and '.join(missing)}", file=sys.stderr)
        return int(bool(missing))

    if args.command == "plan":
        import torch

        toolkit, release = find_toolkit(torch.version.cuda)
        includes, missing = library_includes(toolkit, [Path(torch.__file__).parents[1]]) if toolkit else ([], [])
        try:
            plan = plan_build(args.mmcv_version, torch.__version__, torch.version.cuda, torch.cuda.get_arch_list(),
                              toolkit, release, os.environ.get(OPS_VARIABLE, "auto") or "auto",
                              gpu_visible=gpu_visible(), includes=includes, missing_headers=missing)
        except (RuntimeError, ValueError) as error:
            print(f"setup-env: {error}", file=sys.stderr)
            return 1
        keep = keeps(args.installed, plan)
        lines = [f"mmcv_key={shlex.quote(plan.key)}", f"mmcv_cuda_ops={int(plan.cuda_ops)}",
                 f"mmcv_install={int(not keep)}", f"mmcv_reason={shlex.quote(plan.reason)}"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in plan.env.items()]
        print("\n".join(lines))
        return 0
    if args.command == "adopt":
        adopted = adopt_unkeyed(Path(args.wheels), args.key, args.mmcv_version)
        if adopted:
            print(f"setup-env: reusing the CPU-only mmcv wheel built before as {adopted}", file=sys.stderr)
        return 0
    if args.command == "wheel":
        wheel = compatible_wheel(args.wheels, args.mmcv_version)
        if wheel:
            print(wheel)
        return 0 if wheel else 1
    has = installed_cuda_ops()
    if has != bool(args.cuda_ops):
        print(f"setup-env: mmcv was to be built {'with' if args.cuda_ops else 'without'} CUDA ops, but the installed "
              f"one has {'them' if has else 'none'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
