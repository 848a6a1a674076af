"""Build and cache the guppy.csrc extensions (torch.utils.cpp_extension.load, ninja).

Two builds of the same kernel source:
  "cuda": attention_cuda.cpp (torch binding, g++) + attention.cu + emu_tests.cu (nvcc) for the GPU's own arch.
  "cpu":  attention_host.cpp, one g++ translation unit that includes cuda_emu.h and the same .cu files: the kernels
          run on the CPU through the CUDA-execution emulator (what CI tests). Works with a CPU-only torch.

Cache: $XDG_CACHE_HOME/guppy/csrc (or ~/.cache/guppy/csrc), one folder per (build kind, hash of every source file in
this folder, torch version, arch). Two processes building at once take turns on an fcntl lock in that folder; the
second finds the first one's build and only loads it. The first build prints one line saying what it does.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
_EXTS = (".cu", ".cuh", ".h", ".cpp")
_MODULES: dict[str, object] = {}
_LOCK = threading.Lock()


def source_files() -> list[str]:
    return sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(_EXTS))


def source_hash() -> str:
    h = hashlib.sha256()
    for path in source_files():
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "guppy", "csrc")
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: str):
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _torch_tag() -> str:
    import torch
    return "torch" + torch.__version__.replace("+", "_").replace(".", "_")


def cuda_arch(device=None) -> int:
    import torch
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def load(device: str = "cpu", verbose: bool = False, cuda_device=None):
    """The compiled extension module for `device` ("cpu" or "cuda"), building it on first use."""
    import torch
    from torch.utils import cpp_extension

    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit found (CUDA_HOME unset and no nvcc), or torch is a CPU build")
        # GUPPY_CSRC_ARCH=75 on a newer GPU builds the T4 code as compute_75 PTX, which the driver JIT-compiles:
        # how an H100 runs (and sanity-checks) exactly the sm_75 kernels
        arch = int(os.environ.get("GUPPY_CSRC_ARCH") or cuda_arch(cuda_device))
        ptx_only = arch < cuda_arch(cuda_device)
        key = f"cuda-{source_hash()}-{_torch_tag()}-sm{arch}" + ("-ptx" if ptx_only else "")
    else:
        key = f"host-{source_hash()}-{_torch_tag()}"
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        build_dir = os.path.join(cache_root(), key)
        os.makedirs(build_dir, exist_ok=True)
        name = "guppy_csrc_" + key.replace("-", "_")
        with file_lock(os.path.join(build_dir, "guppy.lock")):
            stamp = os.path.join(build_dir, "built.ok")
            if not os.path.exists(stamp):
                what = (f"nvcc for sm_{arch}, about 1-3 minutes" if kind == "cuda"
                        else "g++ with the CUDA emulator, about 20-60 seconds")
                print(f"guppy.csrc: building the {kind} attention extension once ({what}) in {build_dir}",
                      file=sys.stderr, flush=True)
            common = dict(name=name, build_directory=build_dir, extra_include_paths=[HERE], verbose=verbose)
            if kind == "cuda":
                mod = cpp_extension.load(
                    sources=[os.path.join(HERE, "attention_cuda.cpp"), os.path.join(HERE, "attention.cu"),
                             os.path.join(HERE, "emu_tests.cu")],
                    extra_cflags=["-O2", "-std=c++17"],
                    extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code="
                                       + (f"compute_{arch}" if ptx_only else f"sm_{arch}")],
                    **common)
            else:
                mod = cpp_extension.load(sources=[os.path.join(HERE, "attention_host.cpp")],
                                         extra_cflags=["-O2", "-std=c++20", "-pthread"],
                                         extra_ldflags=["-pthread"], **common)
            open(stamp, "w").close()
        _MODULES[key] = mod
        return mod


def build(device: str = "cuda", verbose: bool = False):
    """Build ahead of time (`guppy build-ext`). Returns the module."""
    mod = load(device, verbose=verbose)
    print(f"guppy.csrc: the {device} attention extension is ready ({os.path.dirname(mod.__file__)})")
    return mod
