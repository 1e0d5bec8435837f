"""The CUDA build's decisions, in pure Python (fused_ls/_native_build.py): run on the CPU.

On a machine with nvcc and no visible GPU (a build container, CI) torch.utils.cpp_extension
fails twice: it cannot choose the architectures (IndexError) and, where nvcc on PATH is a link
or a wrapper script in /usr/local/bin, it takes /usr/local for CUDA_HOME. fused_ls chooses
sm_80/sm_90/sm_100 and finds the toolkit itself; a build that cannot work stops with a message
that names the fix. The build itself is checked by .ci/run against PyPI's CUDA torch.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from fused_ls import _native_build as build
from fused_ls._native_build import CudaBuildError


def _fake_toolkit(root: Path, release: str = "13.0", headers: bool = True) -> Path:
    """A folder shaped like a CUDA toolkit: bin/nvcc (a script that answers --version and
    --dryrun as nvcc does) and, with `headers`, include/cuda_runtime.h."""
    home = root / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *--version*) echo "Cuda compilation tools, release {release}, V{release}.88" ;;\n'
        f'  *--dryrun*) echo "#\\$ TOP={home}/bin/.." >&2 ;;\n'
        "esac\n"
    )
    nvcc.chmod(0o755)
    if headers:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
    return home


def _unset(monkeypatch, *names: str) -> None:
    """Unset environment variables, restored (or unset again) after the test even when the code
    under test sets them: monkeypatch.delenv alone forgets a variable that was not set."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _bin_with(root: Path, nvcc_target: Path, *, wrapper: bool = False) -> Path:
    """A folder like /usr/local/bin with an nvcc that is a link to (or a script that runs) nvcc_target."""
    local_bin = root / "local" / "bin"
    local_bin.mkdir(parents=True)
    nvcc = local_bin / "nvcc"
    if wrapper:
        nvcc.write_text(f'#!/bin/sh\nexec {nvcc_target} "$@"\n')
        nvcc.chmod(0o755)
    else:
        nvcc.symlink_to(nvcc_target)
    return local_bin


@pytest.fixture(autouse=True)
def _environment_unchanged():
    def environment():
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}

    before = environment()
    yield
    assert environment() == before, "a test of the CUDA build left the environment changed"


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(("nvcc", "archs"), [
    ((13, 0), ["8.0", "9.0", "10.0+PTX"]),
    ((12, 8), ["8.0", "9.0", "10.0+PTX"]),
    ((12, 6), ["8.0", "9.0+PTX"]),
    ((11, 8), ["8.0", "9.0+PTX"]),
    ((11, 7), ["8.0+PTX"]),
])
def test_no_gpu_builds_for_ampere_hopper_blackwell_where_nvcc_has_them(nvcc, archs):
    assert build.cuda_arch_list(nvcc, gpu_count=0, user_list=None) == archs
    assert build.cuda_arch_list(nvcc, gpu_count=0, user_list="") == archs


def test_nvcc_too_old_for_any_default_architecture_names_the_fix():
    with pytest.raises(CudaBuildError, match=r"nvcc 10\.2 .*CUDA 11\.8 or newer.*CUDA_HOME.*FUSED_LS_NO_CUDA=1"):
        build.cuda_arch_list((10, 2), gpu_count=0, user_list=None)
    with pytest.raises(CudaBuildError, match="TORCH_CUDA_ARCH_LIST"):
        build.cuda_arch_list(None, gpu_count=0, user_list=None)


@pytest.mark.parametrize("user_list", ["8.6", "9.0;10.0+PTX", "Hopper"])
def test_a_users_arch_list_is_left_to_torch(user_list):
    assert build.cuda_arch_list((13, 0), gpu_count=0, user_list=user_list) is None
    assert build.cuda_arch_list((13, 0), gpu_count=2, user_list=user_list) is None


def test_visible_gpus_are_left_to_torch():
    assert build.cuda_arch_list((13, 0), gpu_count=1, user_list=None) is None
    assert build.cuda_arch_list((13, 0), gpu_count=1, user_list="native") is None


def test_native_arch_list_without_a_gpu_names_the_fix():
    with pytest.raises(CudaBuildError, match="TORCH_CUDA_ARCH_LIST=native needs a visible GPU.*FUSED_LS_NO_CUDA=1"):
        build.cuda_arch_list((13, 0), gpu_count=0, user_list="native")


def test_gencode_flags_are_torchs_for_the_same_list(monkeypatch):
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    torch_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if torch_flags is None:
        pytest.skip("this torch has no _get_cuda_arch_flags")
    archs = build.cuda_arch_list((13, 0), gpu_count=0, user_list=None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", ";".join(archs))
    assert sorted(build.gencode_flags(archs)) == sorted(torch_flags())
    # torch adds no flags of its own once the nvcc flags name an architecture
    assert torch_flags(build.gencode_flags(archs)) == []


# ----------------------------------------------------------------------------- CUDA_HOME


def test_cuda_home_is_found_through_a_linked_nvcc(tmp_path):
    home = _fake_toolkit(tmp_path)
    local_bin = _bin_with(tmp_path, home / "bin" / "nvcc")
    # torch's guess, dirname(dirname(which nvcc)), has no headers
    assert not (local_bin.parent / "include" / "cuda_runtime.h").exists()
    assert build.resolve_cuda_home({"PATH": str(local_bin)}) == os.path.realpath(home)


def test_cuda_home_is_found_through_a_wrapper_script(tmp_path):
    home = _fake_toolkit(tmp_path)
    local_bin = _bin_with(tmp_path, home / "bin" / "nvcc", wrapper=True)
    assert build.resolve_cuda_home({"PATH": str(local_bin)}) == os.path.realpath(home)


def test_cuda_home_is_left_alone_where_torch_finds_it(tmp_path):
    home = _fake_toolkit(tmp_path)
    local_bin = _bin_with(tmp_path, home / "bin" / "nvcc")
    assert build.resolve_cuda_home({"PATH": str(home / "bin")}) is None  # torch's guess is right
    assert build.resolve_cuda_home({"PATH": str(local_bin), "CUDA_HOME": "/opt/cuda"}) is None  # the user's
    assert build.resolve_cuda_home({"PATH": str(local_bin), "CUDA_PATH": "/opt/cuda"}) is None
    assert build.resolve_cuda_home({"PATH": str(tmp_path)}) is None  # no nvcc
    headerless = _fake_toolkit(tmp_path / "other", headers=False)
    assert build.resolve_cuda_home({"PATH": str(_bin_with(tmp_path / "other", headerless / "bin" / "nvcc"))}) is None


def test_prepare_cuda_home_sets_the_environment_and_an_imported_cpp_extension(tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path)
    local_bin = _bin_with(tmp_path, home / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(local_bin))
    _unset(monkeypatch, "CUDA_HOME", "CUDA_PATH")
    imported = types.SimpleNamespace(CUDA_HOME=str(local_bin.parent))  # what torch guessed on import
    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", imported)
    assert build.prepare_cuda_home() == os.path.realpath(home)
    assert os.environ["CUDA_HOME"] == imported.CUDA_HOME == os.path.realpath(home)


def test_nvcc_version_is_read_from_nvcc(tmp_path):
    assert build.nvcc_version(_fake_toolkit(tmp_path, "12.8") / "bin" / "nvcc") == (12, 8)
    assert build.nvcc_version(tmp_path / "missing" / "nvcc") is None


# ----------------------------------------------------------------------------- builds that cannot work


def test_nvcc_of_another_major_version_than_torchs_names_the_fix(tmp_path):
    home = _fake_toolkit(tmp_path, "12.4")
    with pytest.raises(CudaBuildError, match=r"nvcc 12\.4 .*CUDA 13\.0.*install a CUDA 13\.x toolkit and set CUDA_HOME"
                                             r".*torch built for CUDA 12\.x.*FUSED_LS_NO_CUDA=1"):
        build.check_cuda_toolkit(home, (12, 4), "13.0")
    build.check_cuda_toolkit(home, (12, 4), "12.8")  # a minor version apart: torch only warns


def test_a_toolkit_without_headers_names_the_fix(tmp_path):
    home = _fake_toolkit(tmp_path, headers=False)
    with pytest.raises(CudaBuildError, match=r"cuda_runtime\.h does not exist.*CUDA_HOME.*FUSED_LS_NO_CUDA=1"):
        build.check_cuda_toolkit(home, (13, 0), "13.0")


@pytest.fixture
def cuda_torch(monkeypatch):
    """This torch, as cuda_build_plan sees a CUDA 13.0 build of it with no GPU visible."""
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    _unset(monkeypatch, "FUSED_LS_NO_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH")
    monkeypatch.setenv("PATH", os.defpath)  # whatever nvcc this machine has stays out of it
    return cpp_extension


def test_plan_for_a_cuda_torch_without_a_gpu(tmp_path, monkeypatch, cuda_torch):
    home = _fake_toolkit(tmp_path)
    monkeypatch.setattr(cuda_torch, "CUDA_HOME", str(home))
    plan = build.cuda_build_plan()
    assert plan.why_not is None
    assert plan.nvcc_flags == [*build.NVCC_FLAGS, *build.gencode_flags(["8.0", "9.0", "10.0+PTX"])]
    assert plan.archs.startswith("sm_80, sm_90 and sm_100 with PTX")

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    plan = build.cuda_build_plan()
    assert (plan.why_not, plan.nvcc_flags) == (None, build.NVCC_FLAGS) and "TORCH_CUDA_ARCH_LIST=9.0" in plan.archs

    monkeypatch.setenv("FUSED_LS_NO_CUDA", "1")
    assert build.cuda_build_plan().why_not == "FUSED_LS_NO_CUDA=1"


def test_plan_for_a_cuda_torch_without_nvcc_builds_the_cpu_kernels(monkeypatch, cuda_torch):
    monkeypatch.setattr(cuda_torch, "CUDA_HOME", None)
    plan = build.cuda_build_plan()
    assert plan.why_not.startswith("no nvcc") and "CUDA_HOME" in plan.why_not


def test_plan_stops_where_the_toolkit_cannot_work(tmp_path, monkeypatch, cuda_torch):
    old = _fake_toolkit(tmp_path, "12.4")
    monkeypatch.setattr(cuda_torch, "CUDA_HOME", str(old))
    with pytest.raises(CudaBuildError, match="install a CUDA 13.x toolkit"):
        build.cuda_build_plan()

    missing = tmp_path / "no-such-cuda"
    monkeypatch.setenv("CUDA_HOME", str(missing))
    monkeypatch.setattr(cuda_torch, "CUDA_HOME", str(missing))
    with pytest.raises(CudaBuildError, match=r"bin/nvcc does not exist: set CUDA_HOME"):
        build.cuda_build_plan()
