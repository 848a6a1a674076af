"""What a guppy.csrc build assumes, checked on the CPU (issue 18 finding 7): nvcc's CUDA release against torch's, the
C++ standard torch's headers need, the head dims a build compiles, and the timed cold CUDA build.

The CUDA build itself needs a CUDA torch; here its checks run on recorded `nvcc --version` texts and fakes, the
head-dim selection runs through the host (emulator) build, which takes the same defines, and the cold-build timing
compiles the CUDA build's sources with this machine's nvcc and g++.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

csrc = pytest.importorskip("guppy.csrc")
from guppy.csrc import attention_op, extension  # noqa: E402

# `nvcc --version` as this machine's CUDA 13.0 toolkit prints it (recorded), and the same text with the release
# lines of other toolkits
NVCC_13_0 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def nvcc_text(major, minor):
    return NVCC_13_0.replace("release 13.0, V13.0.88", f"release {major}.{minor}, V{major}.{minor}.0")


# ---- nvcc's CUDA release against torch's ----------------------------------------------------------------------
def test_the_nvcc_release_is_read_from_its_version_text():
    assert extension.parse_nvcc_version(NVCC_13_0) == (13, 0)
    assert extension.parse_nvcc_version(nvcc_text(12, 8)) == (12, 8)
    assert extension.parse_nvcc_version("nvcc: command not found") is None


@pytest.mark.parametrize("nvcc,torch_cuda", [((13, 0), "12.8"), ((12, 8), "13.0"), ((11, 8), "12.8")])
def test_another_major_version_is_refused_in_one_line(nvcc, torch_cuda):
    with pytest.raises(RuntimeError) as e:
        extension.check_cuda_versions(nvcc, torch_cuda)
    msg = str(e.value)
    assert "\n" not in msg and f"{nvcc[0]}.{nvcc[1]}" in msg and torch_cuda in msg and "major" in msg


@pytest.mark.parametrize("nvcc,torch_cuda", [((12, 8), "12.8"), ((12, 9), "12.8"), ((13, 1), "13.0")])
def test_the_same_or_a_newer_minor_version_builds_silently(nvcc, torch_cuda):
    assert extension.check_cuda_versions(nvcc, torch_cuda) == ""


def test_an_older_minor_version_builds_with_a_note():
    note = extension.check_cuda_versions((12, 4), "12.8")
    assert "12.4" in note and "12.8" in note and "\n" not in note


def test_an_unreadable_nvcc_or_a_cpu_torch_is_refused():
    with pytest.raises(RuntimeError, match="could not read a CUDA release"):
        extension.check_cuda_versions(None, "12.8")
    with pytest.raises(RuntimeError, match="not a CUDA build"):
        extension.check_cuda_versions((12, 8), None)


@pytest.fixture
def fake_cuda_torch(monkeypatch, tmp_path):
    """A CUDA torch 12.8 on a T4, as far as extension.load and available() look; torch's build is a recorder."""
    from torch.utils import cpp_extension
    builds = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(extension, "_MODULES", {})
    monkeypatch.setattr(attention_op, "_STATE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: builds.append(kw) or "/built/guppy.so")
    monkeypatch.delenv("GUPPY_CSRC_ARCH", raising=False)
    return builds


def fake_nvcc(tmp_path, text):
    path = tmp_path / "nvcc"
    path.write_text("#!/bin/sh\ncat <<'EOF'\n" + text + "EOF\n")
    path.chmod(0o755)
    return str(path)


def test_a_major_mismatch_reaches_auto_as_its_fallback_reason(fake_cuda_torch, monkeypatch, tmp_path):
    """nvcc 13.0 (recorded) for a torch built with CUDA 12.8: nothing is compiled, and available() -- what `auto`
    asks -- answers False with the one line, so auto falls back and prints it."""
    monkeypatch.setenv("PYTORCH_NVCC", fake_nvcc(tmp_path, NVCC_13_0))
    ok, reason = csrc.available(torch.device("cuda", 0), head_dims=(64,))
    assert not ok and reason.startswith("guppy.csrc build failed: nvcc is CUDA 13.0") and "12.8" in reason
    assert "\n" not in reason and fake_cuda_torch == []


def test_the_version_check_runs_the_nvcc_torch_builds_with(fake_cuda_torch, monkeypatch, tmp_path):
    """A matching release (12.8 text from a fake nvcc at $PYTORCH_NVCC, the path torch's ninja file uses) builds."""
    monkeypatch.setenv("PYTORCH_NVCC", fake_nvcc(tmp_path, nvcc_text(12, 8)))
    monkeypatch.setattr(extension, "Extension", FakeExtension)
    extension.load("cuda", head_dims=(64,))
    (kw,) = fake_cuda_torch
    assert "nvcc12_8" in kw["build_directory"]   # a build belongs to the toolkit that compiled it


class FakeExtension:
    """extension.Extension without a library behind it: holds the head dims its build name says ("..._d64")."""

    def __init__(self, name, path, emulated):
        self.name, self.path, self.emulated = name, path, emulated
        dims = re.search(r"_d([\d_]+)$", name)
        self.head_dims = tuple(map(int, dims.group(1).split("_"))) if dims else extension.HEAD_DIMS


def test_a_torch_older_than_2_10_is_a_reason_not_a_compiler_error(monkeypatch):
    """The bindings use torch's stable C++ ABI, whose factory ops, lists and strings arrived in torch 2.10."""
    monkeypatch.setattr(attention_op, "_STATE", {})
    monkeypatch.setattr(extension, "_MODULES", {})
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    ok, reason = csrc.available("cpu")
    assert not ok and reason.startswith("guppy.csrc build failed: ") and "2.10" in reason and "2.9.1" in reason


# ---- the C++ standard ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version,std", [("2.10.0", "c++17"), ("2.11.0+cu128", "c++17"), ("2.12.0", "c++20"),
                                         ("2.13.0+cpu", "c++20"), ("2.14.1+cu130", "c++20"), ("3.0.0", "c++20")])
def test_the_cxx_standard_is_the_one_torch_itself_uses(version, std):
    """torch's own cpp_extension passes -std=c++17 by default up to 2.11 and -std=c++20 from 2.12 (read in the
    2.11.0 and 2.12.0 wheels' torch/utils/cpp_extension.py)."""
    assert extension.cxx_standard(version) == std


def test_the_cuda_build_passes_that_standard_to_g_plus_plus_and_nvcc(fake_cuda_torch, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTORCH_NVCC", fake_nvcc(tmp_path, nvcc_text(12, 8)))
    monkeypatch.setattr(extension, "Extension", FakeExtension)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu128")
    extension.load("cuda")
    (kw,) = fake_cuda_torch
    assert "-std=c++20" in kw["extra_cflags"] and "-std=c++20" in kw["extra_cuda_cflags"]
    assert not any(f == "-std=c++17" for f in kw["extra_cflags"] + kw["extra_cuda_cflags"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_the_installed_torch_headers_compile_cleanly_in_the_chosen_standard(tmp_path):
    """g++ on ATen/core/Tensor.h (torch's tensor header) with C++20 extensions made errors: torch 2.13's
    c10/core/AutogradState.h uses default initializers on bit-fields, which C++17 does not have."""
    src = tmp_path / "t.cpp"
    src.write_text("#include <ATen/core/Tensor.h>\n")
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    r = subprocess.run(["g++", f"-std={extension.cxx_standard(torch.__version__)}", "-fsyntax-only",
                        "-Werror=c++20-extensions", "-I", include, str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]


# ---- the head dims a build holds ------------------------------------------------------------------------------------
def test_head_dims_outside_the_kernels_are_refused():
    with pytest.raises(ValueError, match="guppy.csrc builds head dims"):
        extension.head_dim_selection((48,))
    ok, reason = csrc.available("cpu", head_dims=(48,))
    assert not ok and "48" in reason


@pytest.mark.slow
def test_a_host_build_holds_only_the_head_dims_asked_for():
    """The emulator build takes the same GUPPY_HEAD_DIM_* defines as the nvcc build: a (32,) build has the D=32
    kernels (attn_fwd<32> asks 2 x 64 keys x 32 x 2 bytes = 8192 of shared memory) and no others; a D=64 call on it
    is refused with a message, never launched."""
    one = extension.load("cpu", head_dims=(32,), exact=True)
    assert one.head_dims == (32,) and one.smem("fwd", 32) == 8192
    assert one.smem("fwd", 64) == 0 and one.smem("fwd", 128) == 0
    q = torch.zeros(1, 1, 8, 64, dtype=torch.float16)
    flag, seed = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="head dim 64 is not compiled into this build"):
        one.fwd(q, q, q, None, flag, True, 0.125, 0.0, seed)
    full = extension.load("cpu")
    assert full.head_dims == (32, 64, 128) and os.path.dirname(full.path) != os.path.dirname(one.path)


def test_a_build_of_all_head_dims_already_there_serves_one_head_dim(fake_cuda_torch, monkeypatch, tmp_path):
    """`guppy build-ext` builds every head dim ahead of time; `auto`'s one-head-dim request then loads that build
    instead of compiling again. Without it, exactly the one head dim is built."""
    monkeypatch.setenv("PYTORCH_NVCC", fake_nvcc(tmp_path, nvcc_text(12, 8)))
    monkeypatch.setattr(extension, "Extension", FakeExtension)
    assert extension.load("cuda", head_dims=(64,)).head_dims == (64,)
    monkeypatch.setattr(extension, "_MODULES", {})
    assert extension.load("cuda").head_dims == extension.HEAD_DIMS                # what build-ext makes
    monkeypatch.setattr(extension, "_MODULES", {})
    assert extension.load("cuda", head_dims=(32,)).head_dims == extension.HEAD_DIMS
    one, every, asked_32 = (kw["build_directory"] for kw in fake_cuda_torch)   # torch's load also loads a cached build
    assert one.endswith("-d64") and asked_32 == every   # the (32,) request went to the folder of all head dims


@pytest.mark.slow
def test_auto_s_one_head_dim_build_serves_the_calls_of_that_head_dim(monkeypatch):
    """available(device, head_dims=(D,)) -- what `auto` asks -- loads a build holding D and self-checks it at D;
    attention() at that D then uses that build, and another D gets the build of all head dims."""
    monkeypatch.setattr(attention_op, "_STATE", {})
    real_load, loads = extension.load, []
    monkeypatch.setattr(extension, "load", lambda *a, **kw: loads.append(kw.get("head_dims")) or real_load(*a, **kw))
    assert csrc.available("cpu", head_dims=(32,)) == (True, "")   # its self-check ran at D=32
    g = torch.Generator().manual_seed(0)
    for D in (32, 64):
        q, k, v = (torch.randn(1, 2, 20, D, generator=g).half() for _ in range(3))
        out = csrc.attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        assert (out.float() - ref).abs().max().item() < 5e-3
    assert loads == [(32,), extension.HEAD_DIMS]


def test_auto_asks_csrc_for_the_model_s_head_dim_only(monkeypatch):
    """On a T4 (faked), `auto` asks available() for q's head dim, so a cold build compiles that instance alone."""
    from guppy import ops
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(csrc, "available", lambda device, head_dims=None: asked.append(head_dims) or (False, "x"))
    ops._auto_gpu_attention(torch.zeros(1, 2, 8, 64, dtype=torch.float16))
    assert asked == [(64,)]


# ---- the cold CUDA build, timed -------------------------------------------------------------------------------------
def test_measure_cold_build_says_why_it_skips_without_nvcc(monkeypatch, tmp_path):
    for var in ("PYTORCH_NVCC", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))   # an empty folder: no nvcc, no c++
    result = extension.measure_cold_build()
    assert result["csrc_build_s"] is None and "nvcc" in result["skipped"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++") is None, reason="needs nvcc and c++")
def test_measure_cold_build_compiles_and_times_each_part():
    """Takes ~10-20 s on 2 cores: the binding with torch's headers, attention.cu and emu_tests.cu for sm_75, link."""
    result = extension.measure_cold_build(arch=75, head_dims=(64,))
    parts = result["parts"]
    assert set(parts) == {"attention_cuda.cpp", "attention.cu", "emu_tests.cu", "link"}
    assert all(s > 0 for s in parts.values()) and all(s > 0 for s in result["cpu_s"].values())
    assert result["csrc_build_s"] >= max(parts.values())    # parts overlap; the whole takes at least its longest
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    assert result["nvcc"] == re.search(r"release (\d+\.\d+)", version).group(1)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
