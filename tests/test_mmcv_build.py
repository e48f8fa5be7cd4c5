"""scripts/mmcv_build.py: how setup-env.sh builds and caches mmcv (CUDA ops where a matching toolkit exists, wheels
keyed by mmcv, torch, CUDA variant and ops), and localize's refusal to train on a GPU without mmcv's CUDA ops."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, load_script


build = load_script("mmcv_build")
ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.13.0+cu130's


def test_cache_key_names_mmcv_torch_variant_and_ops():
    assert build.cuda_variant("13.0") == "cu130" and build.cuda_variant("12.8") == "cu128"
    assert build.cuda_variant(None) == "cpu"
    assert build.wheel_key("2.1.0", "2.13.0+cu130", "13.0", True) == "mmcv-2.1.0_torch-2.13.0_cu130_cuda-ops"
    assert build.wheel_key("2.1.0", "2.13.0+cu130", "13.0", False) == "mmcv-2.1.0_torch-2.13.0_cu130_cpu-only"
    assert build.wheel_key("2.1.0", "2.13.0+cpu", None, False) == "mmcv-2.1.0_torch-2.13.0_cpu_cpu-only"
    keys = {build.wheel_key("2.1.0", t, c, o) for t, c in (("2.13.0", "13.0"), ("2.13.0", "12.8"), ("2.12.0", "13.0"))
            for o in (True, False)}
    assert len(keys) == 6  # no two builds share a folder


def test_cuda_ops_where_the_toolkit_matches_torchs_cuda(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    plan = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, "/usr/local/cuda-13.0", "13.0")
    assert plan.cuda_ops and plan.key.endswith("_cu130_cuda-ops")
    assert plan.env == {"FORCE_CUDA": "1", "MMCV_WITH_OPS": "1", "CUDA_HOME": "/usr/local/cuda-13.0",
                        "TORCH_CUDA_ARCH_LIST": "7.5;8.0;8.6;9.0;10.0;12.0+PTX"}
    assert build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, "/opt/cuda", "13.1").cuda_ops  # same major
    for toolkit, release, why in ((None, None, "no CUDA toolkit found"), ("/opt/cuda-12", "12.8", "is 12.8")):
        plan = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, toolkit, release)
        assert not plan.cuda_ops and plan.key.endswith("_cpu-only") and why in plan.reason and not plan.env
        with pytest.raises(RuntimeError, match="NODULESYNTH_MMCV_OPS=cuda"):
            build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, toolkit, release, wanted="cuda")
    assert "CPU-only build" in build.plan_build("2.1.0", "2.13.0+cpu", None, [], "/usr/local/cuda", "13.0").reason
    forced = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, "/usr/local/cuda-13.0", "13.0", wanted="cpu")
    assert not forced.cuda_ops and forced.reason == "NODULESYNTH_MMCV_OPS=cpu"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # the user's own list wins
    assert build.plan_build("2.1.0", "2.13.0", "13.0", ARCHS, "/c", "13.0").env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    # A toolkit but no GPU (this machine, CI, a workstation without a card): CPU-only unless asked for, saying how.
    headless = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, "/usr/local/cuda-13.0", "13.0",
                                gpu_visible=False)
    assert not headless.cuda_ops and "no GPU is visible" in headless.reason and "=cuda" in headless.reason
    assert build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, "/usr/local/cuda-13.0", "13.0", wanted="cuda",
                            gpu_visible=False).cuda_ops
    assert not build.gpu_visible({"PATH": "", "CUDA_VISIBLE_DEVICES": ""})
    assert build.nvcc_release("Cuda compilation tools, release 13.0, V13.0.88") == "13.0"
    assert build.nvcc_release("command not found") is None
    with pytest.raises(ValueError, match="no GPU architecture"):
        build.arch_list([])


def _headers(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("/* header */\n")
    return folder


def test_a_compiler_only_toolkit_takes_the_library_headers_of_torchs_nvidia_packages(tmp_path, monkeypatch):
    """torch's CUDA headers include cuSPARSE, cuBLAS and cuSOLVER: a toolkit without them gets them from torch's
    NVIDIA packages on CPATH (one folder for CUDA 13, one per library for CUDA 12); none anywhere is said before a
    build, naming the headers, instead of failing at the first CUDA op."""
    monkeypatch.delenv("CPATH", raising=False)
    bare = _headers(tmp_path / "cuda-13.0" / "include", ["cuda_runtime.h"]).parent
    full = _headers(tmp_path / "cuda-full" / "targets" / "x86_64-linux" / "include", build.LIBRARY_HEADERS).parents[2]
    cu13 = _headers(tmp_path / "site13" / "nvidia" / "cu13" / "include", build.LIBRARY_HEADERS)
    site12 = tmp_path / "site12"
    cu12 = [_headers(site12 / "nvidia" / "cusparse" / "include", ["cusparse.h"]),
            _headers(site12 / "nvidia" / "cublas" / "include", ["cublas_v2.h", "cublasLt.h"]),
            _headers(site12 / "nvidia" / "cusolver" / "include", ["cusolverDn.h"])]
    assert build.library_includes(full, [tmp_path / "site13"]) == ([], [])  # the toolkit's own (targets/...)
    assert build.library_includes(bare, [tmp_path / "site13"]) == ([str(cu13)], [])
    assert build.library_includes(bare, [site12]) == ([str(d) for d in cu12], [])
    assert build.library_includes(bare, [tmp_path / "nowhere"]) == ([], list(build.LIBRARY_HEADERS))

    includes, missing = build.library_includes(bare, [tmp_path / "site13"])
    monkeypatch.setenv("CPATH", "/opt/mine/include")  # a user's own CPATH is kept, after these
    plan = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, str(bare), "13.0", includes=includes,
                            missing_headers=missing)
    assert plan.cuda_ops and plan.env["CPATH"] == f"{cu13}{os.pathsep}/opt/mine/include"
    assert str(cu13) in plan.reason
    assert "CPATH" not in build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, str(full), "13.0").env

    _, missing = build.library_includes(bare, [tmp_path / "nowhere"])
    plan = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, str(bare), "13.0", missing_headers=missing)
    assert not plan.cuda_ops and "lacks cusparse.h, cublas_v2.h, cublasLt.h, cusolverDn.h" in plan.reason
    assert "cuda-libraries-dev-13-0" in plan.reason
    with pytest.raises(RuntimeError, match="NODULESYNTH_MMCV_OPS=cuda, but the CUDA toolkit .* lacks cusparse.h"):
        build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, str(bare), "13.0", wanted="cuda",
                         missing_headers=missing)


def test_this_machines_toolkit_is_planned_with_the_headers_it_lacks():
    """The real plan (setup-env.sh's call) on this machine: where its CUDA toolkit lacks the library headers (nvcc
    only) and torch brought them, NODULESYNTH_MMCV_OPS=cuda plans the build with them on CPATH."""
    torch = pytest.importorskip("torch")
    toolkit, release = build.find_toolkit(torch.version.cuda)
    if not toolkit or not torch.version.cuda:
        pytest.skip("no CUDA toolkit here, or a CPU-only torch")
    includes, missing = build.library_includes(toolkit, [Path(torch.__file__).parents[1]])
    if not includes or missing:
        pytest.skip(f"this toolkit ({toolkit}) has the library headers, or torch brought none")
    env = dict(os.environ, NODULESYNTH_MMCV_OPS="cuda")
    env.pop("CPATH", None)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "mmcv_build.py"), "plan", "--mmcv-version", "2.1.0"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert f"export CPATH={includes[0]}" in out.stdout and "mmcv_cuda_ops=1" in out.stdout


def test_an_environment_keeps_its_mmcv_unless_cuda_ops_can_now_be_built():
    cuda = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, "/usr/local/cuda-13.0", "13.0")
    cpu = build.plan_build("2.1.0", "2.13.0+cu130", "13.0", ARCHS, None, None)
    assert build.keeps(cuda.key, cuda) and build.keeps(cpu.key, cpu)
    assert not build.keeps(cpu.key, cuda)   # the GPU node after the login node: CUDA ops replace CPU-only
    assert build.keeps(cuda.key, cpu)       # the login node after the GPU node: CUDA ops stay (they run on CPUs)
    assert not build.keeps(None, cpu) and not build.keeps("", cpu)
    other_torch = build.plan_build("2.1.0", "2.14.0+cu130", "13.0", ARCHS, None, None)
    assert not build.keeps(cuda.key, other_torch)


def _wheel(path, needed: bytes):
    """A wheel whose extension names the libraries it needs as an ELF file does (NUL-separated strings)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mmcv/_ext.cpython-311-x86_64-linux-gnu.so", b"\x7fELF\0" + needed + b"\0nms_impl\0")
        archive.writestr("mmcv/__init__.py", "")
    return path


def test_the_old_unkeyed_wheel_is_taken_as_cpu_only_after_checking_its_links(tmp_path):
    cpu_key, cuda_key = "mmcv-2.1.0_torch-2.13.0_cu130_cpu-only", "mmcv-2.1.0_torch-2.13.0_cu130_cuda-ops"
    old = _wheel(tmp_path / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl", b"libc10.so\0libtorch_cpu.so")
    assert not build.wheel_has_cuda_ops(old)
    assert build.adopt_unkeyed(tmp_path, cuda_key, "2.1.0") is None  # never passed off as a CUDA build
    adopted = build.adopt_unkeyed(tmp_path, cpu_key, "2.1.0")
    assert adopted == tmp_path / cpu_key / old.name and adopted.read_bytes() == old.read_bytes() and old.exists()
    assert os.stat(adopted).st_ino == os.stat(old).st_ino  # a hard link: no second copy of 30 MB
    assert build.adopt_unkeyed(tmp_path, cpu_key, "2.1.0") is None  # once

    gpu = tmp_path / "gpu"
    gpu.mkdir()
    built_with_cuda = _wheel(gpu / old.name, b"libc10.so\0libtorch_cpu.so\0libc10_cuda.so\0libtorch_cuda.so")
    assert build.wheel_has_cuda_ops(built_with_cuda)
    assert build.adopt_unkeyed(gpu, cpu_key, "2.1.0") is None  # an unkeyed CUDA wheel is not a CPU-only one
    with zipfile.ZipFile(tmp_path / "lite.whl", "w") as archive:
        archive.writestr("mmcv/__init__.py", "")
    with pytest.raises(ValueError, match="no compiled"):
        build.wheel_has_cuda_ops(tmp_path / "lite.whl")


def test_the_installed_mmcv_is_checked_against_the_plan():
    """This environment's mmcv: `check` passes for what it is and fails, in a line, for what it is not."""
    mmcv_ops = pytest.importorskip("mmcv.ops")
    has = mmcv_ops.get_compiling_cuda_version() != "not available"
    script = [sys.executable, str(REPO / "scripts" / "mmcv_build.py"), "check", "--cuda-ops"]
    assert subprocess.run(script + [str(int(has))], capture_output=True).returncode == 0
    wrong = subprocess.run(script + [str(int(not has))], capture_output=True, text=True)
    assert wrong.returncode == 1 and "but the installed one has" in wrong.stderr


def test_setup_scripts_use_the_plan():
    setup = (REPO / "scripts" / "setup-env.sh").read_text()
    assert "mmcv_build.py plan" in setup and "mmcv_build.py adopt" in setup and "check --cuda-ops" in setup
    assert '"$cache/wheels/$mmcv_key"' in setup and ".mmcv-key" in setup
    assert "NODULESYNTH_MMCV_OPS=cpu" in (REPO / ".ci" / "run").read_text()  # CI has no GPU to run CUDA ops


def test_a_bare_machine_hears_what_the_build_needs_before_it_starts(tmp_path):
    """No compiler and no Python headers (a bare Debian's python3): named with their packages, before the build
    that would fail minutes in; this machine (CI's set-up builds mmcv) has both."""
    import sysconfig

    missing = build.missing_build_tools(tmp_path, str(tmp_path))
    assert len(missing) == 2 and "apt-get install g++" in missing[0] and "apt-get install python3-dev" in missing[1]
    assert str(tmp_path / "Python.h") in missing[1]
    assert build.missing_build_tools(sysconfig.get_paths()["include"], os.environ["PATH"]) == []
    bare = subprocess.run([sys.executable, str(REPO / "scripts" / "mmcv_build.py"), "tools"], capture_output=True,
                          text=True, env={**os.environ, "PATH": str(tmp_path)})
    assert bare.returncode == 1 and bare.stderr.startswith("setup-env: building mmcv needs a C++ compiler")
    assert "mmcv_build.py tools" in (REPO / "scripts" / "setup-env.sh").read_text()


def test_localize_on_cuda_refuses_mmcv_without_cuda_ops_in_one_line():
    """mmcv's own error for a device it has no kernels for (here the meta device: the same registry lookup that
    fails for cuda:0 in a CPU-only build) becomes one line that says how to get the ops; on the CPU nothing runs."""
    pytest.importorskip("mmdet")
    from nodulesynth.downstream.localization import check_mmcv_ops, probe_mmcv_ops
    from nodulesynth.models.device import DeviceError

    probe_mmcv_ops("cpu")  # the probe itself runs where mmcv has kernels
    with pytest.raises(DeviceError) as refused:
        check_mmcv_ops("cuda:1", probe=lambda device: probe_mmcv_ops("meta"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("localize on cuda:1 needs mmcv's CUDA ops")
    assert "implementation for device meta not found" in message
    assert "mmlab image" in message and "make setup" in message

    called = []
    check_mmcv_ops("cpu", probe=called.append)
    assert not called

    def other_failure(device):
        raise RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):  # not mmcv's missing ops: left as it is
        check_mmcv_ops("cuda", probe=other_failure)


def _tagged_wheel(folder, tag, version="2.1.0"):
    """An installable-looking mmcv wheel (its name's tags and dist-info, nothing else) for pip to choose among."""
    import zipfile

    path = Path(folder) / f"mmcv-{version}-{tag}.whl"
    info = f"mmcv-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: mmcv\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def test_the_cached_wheel_is_the_one_this_interpreter_can_install(tmp_path, monkeypatch):
    """A home shared by x86_64 and aarch64 nodes, or by two Pythons, holds several builds of one key: each takes its
    own, and one finds none where only another's is there (so it builds its own instead of failing to install)."""
    import sysconfig

    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    machine = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    other = machine.replace("x86_64", "aarch64") if "x86_64" in machine else "linux_x86_64"
    foreign = _tagged_wheel(tmp_path, f"{python}-{python}-{other}")
    older = _tagged_wheel(tmp_path, f"cp39-cp39-{machine}")
    assert build.compatible_wheel(tmp_path, "2.1.0") is None
    ours = _tagged_wheel(tmp_path, f"{python}-{python}-{machine}")
    assert build.compatible_wheel(tmp_path, "2.1.0") == ours
    assert build.compatible_wheel(tmp_path, "2.2.0") is None
    # pip's own configuration (PIP_FIND_LINKS, pip.conf's find-links: this machine has both) adds folders of
    # wheels of other keys: the folder alone is searched.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _tagged_wheel(elsewhere, f"{python}-{python}-{machine}")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(elsewhere))
    assert build.compatible_wheel(empty, "2.1.0") is None
    assert build.compatible_wheel(tmp_path, "2.1.0") == ours
    monkeypatch.delenv("PIP_FIND_LINKS")
    assert foreign.exists() and older.exists()
    script = [sys.executable, str(REPO / "scripts" / "mmcv_build.py"), "wheel", "--wheels"]
    out = subprocess.run(script + [str(tmp_path), "--mmcv-version", "2.1.0"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(ours)
    none = subprocess.run(script + [str(tmp_path / "absent"), "--mmcv-version", "2.1.0"], capture_output=True)
    assert none.returncode == 1
    setup = (REPO / "scripts" / "setup-env.sh").read_text()
    assert setup.count("mmcv_build.py wheel --wheels") == 2 and '"$wheels"/mmcv-' not in setup


def test_the_environment_is_one_interpreters_on_one_platform(tmp_path):
    """setup-env.sh keys the shared environment by the interpreter's platform and version as well as the lock: an
    aarch64 node sharing a home with x86_64 ones gets an environment of its own (sysconfig reports the platform
    named by _PYTHON_HOST_PLATFORM, as when cross-building)."""

    def env_path(**extra):
        out = subprocess.run(["bash", str(REPO / "scripts" / "setup-env.sh"), "--print-env"], capture_output=True,
                             text=True, env={**os.environ, "PYTHON": sys.executable, "NODULESYNTH_CACHE": str(tmp_path),
                                             **extra})
        assert out.returncode == 0, out.stderr
        return Path(out.stdout.strip())

    here = env_path()
    assert here.parent == tmp_path and here.name.startswith("env-") and env_path() == here
    assert env_path(_PYTHON_HOST_PLATFORM="linux-aarch64") != here
    assert not any(tmp_path.iterdir())  # printing the path makes nothing
