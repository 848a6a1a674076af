"""Build and cache the guppy.csrc extensions (torch.utils.cpp_extension.load, ninja), and time a cold CUDA build.

Two builds of the same kernel source, each a library of torch ops (binding.h, on torch's stable C++ ABI: torch >= 2.10)
that `load` returns as an `Extension`:
  "cuda": attention_cuda.cpp (torch binding, g++) + attention.cu + emu_tests.cu (nvcc) for the GPU's own arch.
  "cpu":  attention_host.cpp, one g++ translation unit that includes cuda_emu.h and the same .cu files: the kernels
          run on the CPU through the CUDA-execution emulator (what CI tests). Works with a CPU-only torch.
Both take `head_dims`, the head dims to compile (default: all of HEAD_DIMS): `auto` asks for the model's one, so a
cold build on a T4 compiles one instance of each kernel. Each selection is its own build and cache folder.

Checked before a CUDA build (pure functions, tested with recorded outputs):
  nvcc's CUDA release (`nvcc --version` of the nvcc torch's build runs) against torch.version.cuda: another major
  version is refused (RuntimeError, one line: `auto` falls back and says it); an older minor builds with a note (code
  from an older toolkit runs on a newer runtime of the same major), a newer one silently;
  the C++ standard is the one torch's own cpp_extension uses for that torch: C++17 up to 2.11, C++20 from 2.12
  (2.13's headers use C++20 features; 2.14's are reported to #error below C++20). The host build is C++20 always.

Cache: $XDG_CACHE_HOME/guppy/csrc (or ~/.cache/guppy/csrc), one folder per (build kind, hash of every source file in
this folder, torch version, nvcc release, arch, head dims). Two processes building at once take turns on an fcntl
lock in that folder; the second finds the first one's build and only loads it. The first build prints one line saying
what it does.

measure_cold_build(arch, head_dims) compiles what the CUDA build for that arch compiles, from nothing, in a temporary
folder, and times it (`python -m bench host` reports it as csrc_build_s). Figures: notes/csrc.md, "Cold build".
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
HEAD_DIMS = (32, 64, 128)   # the head dims attention.cu has kernels for (GUPPY_HEAD_DIM_* selects among them)
_EXTS = (".cu", ".cuh", ".h", ".cpp")
_MODULES: dict[str, Extension] = {}
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


# --------------------------------------------------------------------------------------------------------------------
# What a build is allowed to assume: toolkit, C++ standard, head dims (pure functions)
# --------------------------------------------------------------------------------------------------------------------
def _major_minor(version: str) -> tuple[int, int]:
    """"2.11.0+cu128" -> (2, 11); "12.8" -> (12, 8)."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """The CUDA release in `nvcc --version` output ("Cuda compilation tools, release 12.8, V12.8.93") as (12, 8), or
    None when the text names none."""
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_cuda_versions(nvcc: tuple[int, int] | None, torch_cuda: str | None) -> str:
    """Whether nvcc of CUDA release `nvcc` may build kernels for a torch built with CUDA `torch_cuda`
    (torch.version.cuda). Raises RuntimeError (one line) when it may not: an unknown release, or another major
    version (the extension would link another major's libcudart than the one torch loaded). Returns "" when they
    match or nvcc is newer within the major, else a one-line note: an older minor builds (code from an older toolkit
    runs on a newer runtime of the same major: CUDA's minor-version compatibility; these kernels use nothing newer
    than mma.sync m16n8k8 and ldmatrix)."""
    if torch_cuda is None:
        raise RuntimeError("torch is not a CUDA build (torch.version.cuda is None)")
    if nvcc is None:
        raise RuntimeError("could not read a CUDA release from `nvcc --version`")
    want = _major_minor(torch_cuda)
    if nvcc[0] != want[0]:
        raise RuntimeError(f"nvcc is CUDA {nvcc[0]}.{nvcc[1]} but torch was built with CUDA {torch_cuda}: the major "
                           f"versions must match (point CUDA_HOME at a CUDA {want[0]}.x toolkit)")
    if nvcc < want:
        return (f"nvcc is CUDA {nvcc[0]}.{nvcc[1]}, older than torch's {torch_cuda}: building anyway (same major "
                f"version; an older toolkit's code runs on a newer runtime)")
    return ""


def check_torch_version(torch_version: str) -> None:
    """RuntimeError (one line) for a torch older than 2.10: the bindings (binding.h) use torch's stable C++ ABI, whose
    factory ops, lists and strings arrived in 2.10."""
    if _major_minor(torch_version) < (2, 10):
        raise RuntimeError(f"guppy.csrc needs torch >= 2.10 (its bindings use torch's stable C++ ABI); this is torch "
                           f"{torch_version}")


def cxx_standard(torch_version: str) -> str:
    """The -std= value for code that includes this torch's headers: what torch's own cpp_extension passes by default
    for that version (c++17 up to torch 2.11; c++20 from 2.12, whose successors' headers need it)."""
    return "c++20" if _major_minor(torch_version) >= (2, 12) else "c++17"


def head_dim_selection(head_dims=None) -> tuple[int, ...]:
    """The sorted head dims a build holds: all of HEAD_DIMS for None. ValueError (one line) for any other D."""
    dims = HEAD_DIMS if head_dims is None else tuple(sorted({int(d) for d in head_dims}))
    if not dims or any(d not in HEAD_DIMS for d in dims):
        raise ValueError(f"guppy.csrc builds head dims {HEAD_DIMS}; got {tuple(head_dims)}")
    return dims


def head_dim_defines(dims: tuple[int, ...]) -> list[str]:
    """The preprocessor flags that make attention.cu instantiate exactly `dims` (GUPPY_HEAD_DIM_32/_64/_128)."""
    return [f"-DGUPPY_HEAD_DIM_{d}={int(d in dims)}" for d in HEAD_DIMS]


def _dims_tag(dims: tuple[int, ...]) -> str:
    return "" if dims == HEAD_DIMS else "-d" + "_".join(map(str, dims))


def cuda_build_flags(arch: int, ptx_only: bool, dims: tuple[int, ...], std: str) -> tuple[list[str], list[str]]:
    """(g++ flags, nvcc flags) that guppy adds to torch's own for the CUDA build: one gencode (cubin for `arch`, or
    compute_<arch> PTX that the driver JIT-compiles on a newer GPU), the head dims, the C++ standard."""
    gencode = f"-gencode=arch=compute_{arch},code=" + (f"compute_{arch}" if ptx_only else f"sm_{arch}")
    return ["-O2", f"-std={std}"], ["-O3", f"-std={std}", gencode, *head_dim_defines(dims)]


def host_build_flags(dims: tuple[int, ...]) -> list[str]:
    """g++ flags of the host (emulator) build: C++20 on any torch (the standard the emulator is tested in)."""
    return ["-O2", "-std=c++20", "-pthread", *head_dim_defines(dims)]


# --------------------------------------------------------------------------------------------------------------------
# The toolkit
# --------------------------------------------------------------------------------------------------------------------
def torch_nvcc() -> list[str]:
    """The nvcc command torch's ninja build runs: $PYTORCH_NVCC, else cpp_extension.CUDA_HOME/bin/nvcc."""
    from torch.utils import cpp_extension
    if os.environ.get("PYTORCH_NVCC"):
        return shlex.split(os.environ["PYTORCH_NVCC"])
    return [os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")]


def nvcc_release(nvcc: list[str]) -> tuple[int, int] | None:
    """`nvcc --version` -> (major, minor) or None; RuntimeError (one line) when it does not run."""
    try:
        r = subprocess.run([*nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{shlex.join(nvcc)} --version did not run ({type(e).__name__}: {e})") from None
    return parse_nvcc_version(r.stdout + r.stderr)


# --------------------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------------------
class Extension:
    """A loaded build: its torch ops as attributes (`ext.fwd(...)` is torch.ops.<name>.fwd(...)), the head dims it
    holds (asked of the library itself), `emulated` (the host build), `path` (the shared library)."""

    def __init__(self, name: str, path: str, emulated: bool):
        import torch
        self.name, self.path, self.emulated = name, path, emulated
        self._ops = getattr(torch.ops, name)
        self.head_dims = tuple(d for d in HEAD_DIMS if self._ops.has_head_dim(d))

    def __getattr__(self, op: str):
        if op.startswith("_"):   # not an op (copy, pickle and friends probe these)
            raise AttributeError(op)
        fn = getattr(self._ops, op)   # an op's first use looks it up; then it is a plain attribute
        setattr(self, op, fn)
        return fn


def _cuda_target(cuda_device) -> dict:
    """What a CUDA build here is for: {"prefix": cache-key prefix, "arch", "ptx_only", "nvcc": (major, minor),
    "note": "" or the toolkit note}. RuntimeError (one line) when no CUDA build can be made here."""
    import torch
    from torch.utils import cpp_extension
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False)")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (CUDA_HOME unset and no nvcc), or torch is a CPU build")
    nvcc = nvcc_release(torch_nvcc())
    note = check_cuda_versions(nvcc, torch.version.cuda)
    # GUPPY_CSRC_ARCH=75 on a newer GPU builds the T4 code as compute_75 PTX, which the driver JIT-compiles:
    # how an H100 runs (and sanity-checks) exactly the sm_75 kernels
    arch = int(os.environ.get("GUPPY_CSRC_ARCH") or cuda_arch(cuda_device))
    ptx_only = arch < cuda_arch(cuda_device)
    prefix = f"cuda-{source_hash()}-{_torch_tag()}-nvcc{nvcc[0]}_{nvcc[1]}-sm{arch}" + ("-ptx" if ptx_only else "")
    return dict(prefix=prefix, arch=arch, ptx_only=ptx_only, nvcc=nvcc, note=note)


def _compile(target: dict | None, dims: tuple[int, ...], name: str, build_dir: str, verbose: bool) -> str:
    """torch's ninja build of the CUDA extension (`target` from _cuda_target) or of the host one (None) holding
    `dims`, in build_dir; returns the shared library's path (torch has loaded it)."""
    import torch
    from torch.utils import cpp_extension
    common = dict(name=name, build_directory=build_dir, extra_include_paths=[HERE], verbose=verbose,
                  is_python_module=False)
    if target is None:
        return cpp_extension.load(sources=[os.path.join(HERE, "attention_host.cpp")],
                                  extra_cflags=host_build_flags(dims), extra_ldflags=["-pthread"], **common)
    cflags, cuda_cflags = cuda_build_flags(target["arch"], target["ptx_only"], dims, cxx_standard(torch.__version__))
    return cpp_extension.load(sources=[os.path.join(HERE, f) for f in ("attention_cuda.cpp", "attention.cu",
                                                                       "emu_tests.cu")],
                              extra_cflags=cflags, extra_cuda_cflags=cuda_cflags, **common)


def load(device: str = "cpu", verbose: bool = False, cuda_device=None, head_dims=None, exact: bool = False
         ) -> Extension:
    """The compiled extension for `device` ("cpu" or "cuda") that holds `head_dims` (default: all of HEAD_DIMS),
    building exactly those on first use. A build of all HEAD_DIMS that is already there (`guppy build-ext` makes one)
    serves a smaller selection too, unless `exact`. RuntimeError (last line: the reason) when it cannot be built."""
    import torch
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    dims = head_dim_selection(head_dims)
    check_torch_version(torch.__version__)
    target = _cuda_target(cuda_device) if kind == "cuda" else None
    prefix = target["prefix"] if target else f"host-{source_hash()}-{_torch_tag()}"
    if not (exact or _built(prefix + _dims_tag(dims))) and _built(prefix + _dims_tag(HEAD_DIMS)):
        dims = HEAD_DIMS
    key = prefix + _dims_tag(dims)
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        build_dir = os.path.join(cache_root(), key)
        os.makedirs(build_dir, exist_ok=True)
        name = "guppy_csrc_" + key.replace("-", "_")
        with file_lock(os.path.join(build_dir, "guppy.lock")):
            stamp = os.path.join(build_dir, "built.ok")
            if not os.path.exists(stamp):
                _say_building(target, dims, build_dir)
            path = _compile(target, dims, name, build_dir, verbose)
            open(stamp, "w").close()
        mod = Extension(name, path, emulated=kind == "cpu")
        if mod.head_dims != dims:   # the defines did not reach attention.cu: say so rather than misroute a call
            raise RuntimeError(f"the {kind} build in {build_dir} holds head dims {mod.head_dims}, not {dims}")
        _MODULES[key] = mod
        return mod


def _say_building(target: dict | None, dims: tuple[int, ...], build_dir: str) -> None:
    if target is None:
        what = f"the cpu attention extension once (g++ with the CUDA emulator, head dims {dims}, about 10-20 seconds)"
    else:
        nvcc = target["nvcc"]
        what = (f"the cuda attention extension once (nvcc {nvcc[0]}.{nvcc[1]} for sm_{target['arch']}, head dims "
                f"{dims}, about 10-20 seconds on 2 CPUs)")
    note = f"; {target['note']}" if target and target["note"] else ""
    print(f"guppy.csrc: building {what} in {build_dir}{note}", file=sys.stderr, flush=True)


def _built(key: str) -> bool:
    return key in _MODULES or os.path.exists(os.path.join(cache_root(), key, "built.ok"))


def build(device: str = "cuda", verbose: bool = False, head_dims=None) -> Extension:
    """Build ahead of time (`guppy build-ext`). Returns the extension."""
    mod = load(device, verbose=verbose, head_dims=head_dims)
    print(f"guppy.csrc: the {device} attention extension is ready ({os.path.dirname(mod.path)})")
    return mod


# --------------------------------------------------------------------------------------------------------------------
# A cold CUDA build, timed
# --------------------------------------------------------------------------------------------------------------------
def _ninja_jobs() -> int:
    """ninja's default parallelism, which torch's build uses when MAX_JOBS is unset: 2 for one CPU, 3 for two,
    CPUs + 2 above."""
    if os.environ.get("MAX_JOBS", "").isdigit():
        return int(os.environ["MAX_JOBS"])
    n = os.cpu_count() or 1
    return 2 if n <= 1 else 3 if n == 2 else n + 2


def _find_nvcc() -> list[str] | None:
    """The nvcc command measure_cold_build runs: $PYTORCH_NVCC, $CUDA_HOME/bin/nvcc, $CUDA_PATH/bin/nvcc, else the
    nvcc on PATH (torch would also try /usr/local/cuda; a skip here must not hang on what that folder holds)."""
    if os.environ.get("PYTORCH_NVCC"):
        return shlex.split(os.environ["PYTORCH_NVCC"])
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return [os.path.join(home, "bin", "nvcc")]
    on_path = shutil.which("nvcc")
    return [on_path] if on_path else None


def _nvcc_dirs(nvcc: list[str]) -> tuple[str, str]:
    """(include, lib) folders of nvcc's own toolkit, from `nvcc --dryrun` (nvcc may be a wrapper script)."""
    text = subprocess.run([*nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    inc = re.search(r'INCLUDES="-I([^"]+)"', text)
    libs = re.findall(r'"-L([^"]+)"', text)
    home = os.path.dirname(os.path.dirname(nvcc[-1]))
    return (inc.group(1).strip() if inc else os.path.join(home, "include"),
            next((p for p in libs if not p.rstrip("/").endswith("stubs")), os.path.join(home, "lib64")))


def _timed(cmd: list[str], log: str) -> tuple[float, float, int]:
    """Run cmd -> (wall s, CPU s of it and its children, exit code)."""
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime, proc.returncode


def measure_cold_build(arch: int = 75, head_dims=(64,), jobs: int | None = None) -> dict:
    """Compile, from nothing in a temporary folder, what `load("cuda", head_dims=head_dims)` compiles for sm_<arch>,
    and time it on this machine. Returns
        {"csrc_build_s": wall seconds of the whole build, "parts": {part: wall s}, "cpu_s": {part: CPU s},
         "nvcc": "12.8", "cxx": compiler, "std": "c++17" | "c++20", "arch": 75, "head_dims": [64], "jobs": n,
         "torch": torch.__version__, "cpus": os.cpu_count()}
    or {"csrc_build_s": None, "skipped": reason} without nvcc ($PYTORCH_NVCC, $CUDA_HOME/bin, or on PATH) or a C++
    compiler ($CXX or c++). RuntimeError when a part fails to compile.

    Parts, as torch's ninja build runs them: the binding attention_cuda.cpp (g++ with torch's include paths and flags),
    attention.cu and emu_tests.cu (nvcc, torch's nvcc flags and guppy's), started together on `jobs` workers (default:
    ninja's own choice, 3 on a 2-CPU machine), then the link. A CPU build of torch lacks the CUDA libraries
    (libtorch_cuda, which exports the current-stream call): the link here leaves that symbol undefined, as a shared
    library may, where a CUDA torch resolves it."""
    import torch
    from torch.utils import cpp_extension

    nvcc, cxx = _find_nvcc(), shutil.which(os.environ.get("CXX", "c++"))
    if nvcc is None:
        return {"csrc_build_s": None, "skipped": "no nvcc ($PYTORCH_NVCC, $CUDA_HOME/bin or PATH)"}
    if cxx is None:
        return {"csrc_build_s": None, "skipped": f"no C++ compiler ({os.environ.get('CXX', 'c++')} not on PATH)"}
    release = nvcc_release(nvcc)
    dims, std = head_dim_selection(head_dims), cxx_standard(torch.__version__)
    cflags, cuda_cflags = cuda_build_flags(arch, False, dims, std)
    jobs = jobs or _ninja_jobs()
    cuda_inc, cuda_lib = _nvcc_dirs(nvcc)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    with tempfile.TemporaryDirectory(prefix="guppy-cold-build-") as tmp:
        includes = [f"-I{HERE}"] + [f for p in [*cpp_extension.include_paths(), cuda_inc,
                                                sysconfig.get_path("include")] for f in ("-isystem", p)]
        defines = ["-DTORCH_EXTENSION_NAME=guppy_cold_build", "-DTORCH_API_INCLUDE_EXTENSION_H",
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]

        def obj(src):
            return os.path.join(tmp, os.path.basename(src) + ".o")

        nvcc_cmd = [*nvcc, *defines, *includes, *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []),
                    "--compiler-options", "-fPIC", *cuda_cflags, "-c"]
        compiles = {"attention_cuda.cpp": [cxx, *defines, *includes, "-fPIC", *cflags, "-c"],
                    "attention.cu": nvcc_cmd, "emu_tests.cu": nvcc_cmd}
        libs = [f"-l{lib}" for lib in ("c10", "c10_cuda", "torch_cpu", "torch_cuda", "torch", "torch_python")
                if os.path.exists(os.path.join(torch_lib, f"lib{lib}.so"))]
        link = [cxx, *map(obj, compiles), "-shared", f"-L{torch_lib}", *libs, f"-L{cuda_lib}", "-lcudart",
                "-o", os.path.join(tmp, "guppy_cold_build.so")]
        t = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            futures = {part: pool.submit(_timed, [*cmd, os.path.join(HERE, part), "-o", obj(part)],
                                         os.path.join(tmp, part + ".log")) for part, cmd in compiles.items()}
            runs = {part: f.result() for part, f in futures.items()}
        if all(rc == 0 for _, _, rc in runs.values()):
            runs["link"] = _timed(link, os.path.join(tmp, "link.log"))
        total = time.perf_counter() - t
        for part, (_, _, rc) in runs.items():
            if rc != 0:
                with open(os.path.join(tmp, part + ".log")) as f:
                    lines = [ln for ln in f.read().splitlines() if ln.strip()]
                raise RuntimeError(f"cold build: {part} failed: {lines[-1] if lines else f'exit code {rc}'}")
    return {"csrc_build_s": round(total, 2), "parts": {p: round(w, 2) for p, (w, _, _) in runs.items()},
            "cpu_s": {p: round(c, 2) for p, (_, c, _) in runs.items()},
            "nvcc": f"{release[0]}.{release[1]}" if release else None, "cxx": cxx, "std": std, "arch": arch,
            "head_dims": list(dims), "jobs": jobs, "torch": torch.__version__, "cpus": os.cpu_count()}
