"""`guppy targets`: cross-compile every kernel for each target GPU and say whether it fits there and whether it uses
the tensor cores. No GPU needed: the one harness every kernel goes through (llm.c's dev/cuda/common.h is the model).

Triton kernels. Each module in `MODULES` defines `target_configs() -> list[dict]`, one dict per configuration its
launcher can pick (the launcher derives its choice from the same function, so the table cannot drift from it):
    kernel               display name
    config               optional display string of the tile sizes
    fn                   the @triton.jit function
    constexprs           {name: value}
    types                {argument: Triton type} for the pointer and float arguments ("*fp16", "fp32", ...): one map
                         per module may serve all its kernels; every other runtime argument is "i32"
    num_warps, num_stages
    archs                optional: the capabilities on which the launcher can pick it (default 75, 80, 90)
    expect_tensor_cores  optional: True / False where the kernel has a tl.dot. An unmet expectation fails.
`signature()` builds the ASTSource signature from the kernel's argument names and `types`, with the specialisation a
real launch gets. Each row reports shared memory (`metadata.shared`), registers and spills (from the cubin, with the
`cuobjdump` that ships with triton; "-" without it) and what the dots became: "mma" (`mma.sync`), "wgmma", "FMA"
(`fma.rn.f32`, no tensor-core instruction) or "no dot".

CUDA C++ kernels (`csrc/attention.cu`, archs in `CSRC_ARCHS`): one `nvcc -cubin -Xptxas -v` per arch gives registers
and spills per kernel, `cuobjdump -sass` the count of HMMA.1688 (mma.sync m16n8k8) and LDSM (ldmatrix) instructions
(static counts), and the extension's `smem(kernel, D)` the dynamic shared memory each launcher requests. A row is ok
when it fits, does not spill, and on sm_75 uses HMMA.1688. Skipped, with a reason, without nvcc.

Both kinds are held to one table of per-arch limits, `ARCH_LIMITS`. Exit status 1 when a row does not fit an arch its
launcher can pick, or misses its expectation; 2 for a usage error; 0 otherwise.

Triton decides at *import* whether a kernel is interpreted: when the kernel modules were imported with
TRITON_INTERPRET=1 (as in the test suite), this command re-runs itself in a subprocess without it. Compiles are cached
(triton's ~/.triton/cache, and the csrc rows by source hash in guppy's cache folder): a repeated run takes seconds.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MODULES = ["guppy.kernels.layer_norm", "guppy.kernels.cross_entropy", "guppy.kernels.attention",
           "guppy.kernels.gemm_softmax"]
DEFAULT_ARCHS = (75, 80, 90)
# The CUDA C++ kernels are the T4's (sm_75) tensor-core path; sm_80 is the next generation that would run them. On
# sm_90 the seam never picks them, so their register and spill budget is not held to that arch.
CSRC_ARCHS = (75, 80)
_CHILD_ENV = "GUPPY_TARGETS_CHILD"


# ----------------------------------------------------------------------------------------------------------------------
# The target GPUs: the one table of per-arch limits (CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability")
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchLimits:
    smem_per_block: int       # bytes, the opt-in maximum for one block
    smem_per_sm: int          # bytes
    threads_per_sm: int       # resident threads


ARCH_LIMITS = {70: ArchLimits(96 * 1024, 96 * 1024, 2048), 75: ArchLimits(64 * 1024, 64 * 1024, 1024),
               80: ArchLimits(163 * 1024, 164 * 1024, 2048), 86: ArchLimits(99 * 1024, 100 * 1024, 1536),
               87: ArchLimits(163 * 1024, 164 * 1024, 1536), 89: ArchLimits(99 * 1024, 100 * 1024, 1536),
               90: ArchLimits(227 * 1024, 228 * 1024, 2048)}
REGS_PER_SM = 64 * 1024           # 32-bit registers, also the most one block may use, on every arch above
MAX_REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 8                # registers per thread are allocated in steps of 8 (256 per warp)
MAX_BLOCKS_PER_SM = 16


def fit(arch: int, shared: int, threads: int, regs: int | None = None) -> tuple[bool, int, list[str]]:
    """Can one block of `threads` threads with `shared` bytes and `regs` registers per thread run on sm_<arch>?
    -> (fits, resident blocks per SM, notes). Pure: the tests feed it fabricated numbers."""
    lim = ARCH_LIMITS[arch]
    notes = []
    if shared > lim.smem_per_block:
        notes.append(f"shared {shared} B > {lim.smem_per_block} B")
    regs_alloc = None
    if regs is not None:
        regs_alloc = -(-max(regs, 1) // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        if regs > MAX_REGS_PER_THREAD or regs_alloc * threads > REGS_PER_SM:
            notes.append(f"{regs} regs x {threads} threads > {REGS_PER_SM}")
    if notes:
        return False, 0, notes
    blocks = min(lim.smem_per_sm // max(shared, 1), lim.threads_per_sm // threads, MAX_BLOCKS_PER_SM)
    if regs_alloc is not None:
        blocks = min(blocks, REGS_PER_SM // (regs_alloc * threads))
    return True, blocks, notes


# ----------------------------------------------------------------------------------------------------------------------
# Triton: collect, build the signature, compile, judge
# ----------------------------------------------------------------------------------------------------------------------
def collect(modules=MODULES, kernel_filter: str | None = None):
    """-> (entries, skipped): entries from every importable module's target_configs(), skipped = [(module, reason)]."""
    entries, skipped = [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # e.g. triton missing or broken: the other modules still report
            skipped.append((name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        for e in mod.target_configs():
            label = f"{e['kernel']} {e.get('config', '')}".strip()
            if kernel_filter and kernel_filter.lower() not in label.lower():
                continue
            entries.append(dict(e, module=name))
    return entries, skipped


def signature(fn, constexprs: dict, types: dict) -> tuple[dict, dict]:
    """The triton.compiler.ASTSource signature and attrs of `fn`, from its argument names: "constexpr" for the names
    in `constexprs`, `types[name]` for pointers and floats, "i32" for every other argument.

    attrs: the specialisation a real launch at the model's shapes gets: pointers 16-byte aligned (torch allocations
    are) and `stride*` arguments divisible by 16 (the model's rows are multiples of 16 elements). Without them the
    compile shows unvectorised loads and, on sm_80+, no cp.async pipelining."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
        if sig[name].startswith("*") or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _is_compilable(fn) -> bool:
    from triton.runtime.jit import JITFunction
    return isinstance(fn, JITFunction)


def find_cuda_tool(name: str) -> str | None:
    """nvcc / cuobjdump / ptxas: on PATH, under CUDA_HOME or /usr/local/cuda, or (cuobjdump, ptxas) the copies that
    triton's wheel ships in triton/backends/nvidia/bin/."""
    path = shutil.which(name)
    if path:
        return path
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local"):
        if base and os.path.exists(os.path.join(base, "bin", name)):
            return os.path.join(base, "bin", name)
    try:
        import triton
    except ImportError:
        return None
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return p if os.path.exists(p) else None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local bytes per thread) of the cubin's kernel, or (None, None) without cuobjdump."""
    tool = find_cuda_tool("cuobjdump")
    if tool is None or not cubin:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def compile_entry(entry: dict, arch: int, resources: bool = True) -> dict:
    """Cross-compile one entry for sm_<arch>. -> {shared, ptx, ttir, regs, local, seconds}.

    An entry that carries "signature" and "attrs" (a launch recorded by guppy.launches: its exact specialisation) and
    "options" (the launch's own, e.g. num_warps) compiles those instead of `signature()`'s from `types`.
    resources=False leaves regs and local None (no cuobjdump run)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if "signature" in entry:
        sig, attrs = entry["signature"], entry.get("attrs", {})
    else:
        sig, attrs = signature(entry["fn"], entry["constexprs"], entry["types"])
    options = entry["options"] if "options" in entry else {"num_warps": entry["num_warps"],
                                                           "num_stages": entry["num_stages"]}
    src = triton.compiler.ASTSource(fn=entry["fn"], signature=sig, constexprs=dict(entry["constexprs"]), attrs=attrs)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
    seconds = time.perf_counter() - t0
    regs, local = resource_usage(k.asm.get("cubin", b"")) if resources else (None, None)
    return dict(shared=int(k.metadata.shared), ptx=k.asm.get("ptx", ""), ttir=k.asm.get("ttir", ""), regs=regs,
                local=local, seconds=seconds)


def dot_kind(ptx: str, ttir: str) -> str:
    if "tt.dot" not in ttir and "mma" not in ptx:
        return "no dot"
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    if "fma.rn.f32" in ptx:
        return "FMA"
    return "other"


def _row(entry: dict, arch: int, **fields) -> dict:
    return dict(module=entry.get("module", ""), kernel=entry["kernel"], config=entry.get("config", ""), arch=arch,
                num_warps=entry["num_warps"], num_stages=entry["num_stages"],
                shared_limit=ARCH_LIMITS[arch].smem_per_block, **fields)


def check_row(entry: dict, arch: int, shared: int, dot: str, regs: int | None = None,
              local: int | None = None) -> dict:
    """The verdict for one (entry, arch) from its compile results. Pure: tests feed it fabricated numbers."""
    fits, _, notes = fit(arch, shared, 32 * int(entry["num_warps"]), regs)
    if local:
        notes.append(f"{local} B local memory per thread (spills)")
    want = entry.get("expect_tensor_cores")
    expect_ok = want is None or (dot in ("mma", "wgmma")) == bool(want)
    if not expect_ok:
        notes.append(f"expected {'tensor cores' if want else 'no tensor cores'}, got {dot}")
    return _row(entry, arch, shared=shared, regs=regs, local=local, dot=dot, expect_tensor_cores=want, fits=fits,
                ok=fits and expect_ok, note="; ".join(notes))


def evaluate(entries, archs) -> list[dict]:
    rows = []
    for e in entries:
        for arch in archs:
            if arch not in tuple(e.get("archs", DEFAULT_ARCHS)):
                continue
            try:
                c = compile_entry(e, arch)
            except Exception as exc:  # a configuration that does not compile is a failure, reported as a row
                rows.append(_row(e, arch, shared=None, regs=None, local=None, dot="-", expect_tensor_cores=None,
                                 fits=False, ok=False,
                                 note=f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
                continue
            rows.append(check_row(e, arch, c["shared"], dot_kind(c["ptx"], c["ttir"]), c["regs"], c["local"]))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# CUDA C++: nvcc + ptxas + SASS counts for csrc/attention.cu
# ----------------------------------------------------------------------------------------------------------------------
CSRC_THREADS = 128                # every attention.cu kernel launches 4 warps
_CSRC_NAME = re.compile(r"attn_(fwd|bwd_dq|bwd_dkv|bwd_small)ILi(\d+)E")


def parse_ptxas(text: str) -> dict:
    """`nvcc -Xptxas -v` output -> {mangled kernel: {regs, static_smem, spill, stack}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            cur = m.group(1)
            out[cur] = {"regs": 0, "static_smem": 0, "spill": 0, "stack": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[cur]["stack"] = int(m.group(1))
            out[cur]["spill"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[cur]["static_smem"] = int(s.group(1)) if s else 0
    return out


def parse_sass(text: str) -> dict:
    """`cuobjdump -sass` output -> {mangled kernel: {hmma, ldsm}} (HMMA.1688 and LDSM instruction counts)."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = {"hmma": 0, "ldsm": 0}
        elif cur is not None:
            out[cur]["hmma"] += "HMMA.1688" in line
            out[cur]["ldsm"] += bool(re.search(r"\bLDSM\b", line))
    return out


def _nvcc_cubin(arch: int, nvcc: str, cuobjdump: str, src_dir: str, tmp: str) -> tuple[dict, dict]:
    cubin = os.path.join(tmp, f"attention_sm{arch}.cubin")
    r = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-Xptxas", "-v", "-I", src_dir, "-o", cubin,
                        os.path.join(src_dir, "attention.cu")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed for sm_{arch}: {r.stderr[-2000:]}")
    s = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
    if s.returncode != 0:
        raise RuntimeError(f"cuobjdump failed for sm_{arch}: {s.stderr[-500:]}")
    return parse_ptxas(r.stderr + r.stdout), parse_sass(s.stdout)


def csrc_arch_rows(arch: int, ptxas: dict, sass: dict, smem) -> list[dict]:
    """The rows of one arch from its ptxas and SASS counts; smem(kind, D) = dynamic bytes the launcher requests."""
    rows = []
    for mangled, info in ptxas.items():
        m = _CSRC_NAME.search(mangled)
        if m is None:
            raise RuntimeError(f"attention.cu has a kernel this table does not know: {mangled} (see _CSRC_NAME)")
        kind, D = m.group(1), int(m.group(2))
        shared = info["static_smem"] + smem(kind, D)
        counts = sass.get(mangled, {"hmma": 0, "ldsm": 0})
        fits, blocks, notes = fit(arch, shared, CSRC_THREADS, info["regs"])
        ok = fits and info["spill"] == 0 and (arch != 75 or counts["hmma"] > 0)
        notes.append(f"{blocks} block(s)/SM by regs+smem")
        if info["stack"]:
            notes.append(f"{info['stack']} B stack frame")
        if kind == "bwd_small":
            notes.append("T <= 128 path")
        elif kind in ("bwd_dq", "bwd_dkv") and D <= 64:
            notes.append("T > 128 path")
        row = {"kernel": f"attn_{kind}<D={D}>", "arch": arch, "regs": info["regs"], "shared": shared,
               "spill_bytes": info["spill"], "hmma": counts["hmma"], "ldsm": counts["ldsm"], "fits": fits, "ok": ok,
               "note": "; ".join(notes)}
        rows.append(((kind, D), row))
    return [row for _, row in sorted(rows, key=lambda kr: kr[0])]


def csrc_rows(archs=CSRC_ARCHS, use_cache: bool = True) -> list[dict]:
    """One row per (attention.cu kernel instance, arch). Raises RuntimeError when nvcc or cuobjdump is missing or
    fails. Builds (once, cached) the host extension for its `smem()`: the shared-memory sizes have one source."""
    from guppy.csrc.extension import HERE, cache_root, file_lock, load, source_hash

    archs = tuple(int(a) for a in archs)
    nvcc, cuobjdump = find_cuda_tool("nvcc"), find_cuda_tool("cuobjdump")
    if nvcc is None:
        raise RuntimeError("needs nvcc (CUDA toolkit) on PATH or in $CUDA_HOME/bin")
    if cuobjdump is None:
        raise RuntimeError("needs cuobjdump (CUDA toolkit, the triton wheel, or nvidia-cuda-cuobjdump)")
    path = os.path.join(cache_root(), f"targets-{source_hash()}-{'_'.join(map(str, archs))}.json")
    with file_lock(os.path.join(cache_root(), "targets.lock")):
        if use_cache and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        smem = load("cpu").smem
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for arch in archs:
                rows += csrc_arch_rows(arch, *_nvcc_cubin(arch, nvcc, cuobjdump, HERE, tmp), smem)
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(path + ".tmp", path)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------
def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = [h for _, h in columns]
    body = [[("yes" if r.get(k) else "no") if k == "expect_tensor_cores" and r.get(k) is not None else _fmt(r.get(k))
             for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


TRITON_COLUMNS = [("kernel", "kernel"), ("config", "config"), ("arch", "sm"), ("num_warps", "warps"),
                  ("num_stages", "stages"), ("shared", "shared B"), ("shared_limit", "limit B"), ("regs", "regs"),
                  ("local", "spill B"), ("dot", "dot"), ("expect_tensor_cores", "expect TC"), ("fits", "fits"),
                  ("ok", "ok"), ("note", "note")]
CSRC_COLUMNS = [("kernel", "kernel"), ("arch", "sm"), ("regs", "regs"), ("shared", "shared B"),
                ("spill_bytes", "spill B"), ("hmma", "hmma"), ("ldsm", "ldsm"), ("fits", "fits"), ("ok", "ok"),
                ("note", "note")]


def exit_code(rows: list[dict]) -> int:
    return 0 if all(r.get("ok", True) is not False for r in rows) else 1


# ----------------------------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="guppy targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                   help="comma-separated compute capabilities, e.g. 75,80,90 (default)")
    p.add_argument("--kernel", default=None, help="only kernels whose name or config contains this substring")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every row to PATH as JSON")
    p.add_argument("--no-csrc", action="store_true", help="skip the CUDA C++ kernels (nvcc)")
    return p.parse_args(argv)


def _rerun_without_interpreter(argv) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[_CHILD_ENV] = "1"
    code = "import sys; from guppy.targets import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], env=env).returncode


def _csrc_section(args, archs) -> list[dict]:
    csrc_archs = [a for a in archs if a in CSRC_ARCHS]
    if args.no_csrc or not csrc_archs:
        print("\ncsrc rows skipped: " + ("--no-csrc" if args.no_csrc else f"they are checked on sm_{CSRC_ARCHS}"))
        return []
    try:
        rows = csrc_rows(csrc_archs)
    except Exception as e:  # no nvcc, or a build that fails: the Triton table still stands, with the reason
        print(f"\ncsrc rows skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return []
    if args.kernel:
        rows = [r for r in rows if args.kernel.lower() in r["kernel"].lower()]
    if rows:
        print("\nguppy.csrc (CUDA C++)")
        print(format_table(rows, CSRC_COLUMNS))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.replace(" ", "").split(",") if a)
    except ValueError:
        print(f"guppy targets: --arch {args.arch!r}: expected comma-separated integers like 75,80,90", file=sys.stderr)
        return 2
    unknown = [a for a in archs if a not in ARCH_LIMITS]
    if unknown:
        print(f"guppy targets: unknown arch {unknown}; known: {', '.join(map(str, ARCH_LIMITS))}", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("guppy targets: triton is not installed (pip install triton)", file=sys.stderr)
        return 2

    # Interpreted kernels cannot be cross-compiled: re-run in a clean process where @triton.jit compiles.
    if os.environ.get("TRITON_INTERPRET") and not os.environ.get(_CHILD_ENV):
        sys.stdout.flush()
        return _rerun_without_interpreter(argv)
    entries, skipped = collect(MODULES, args.kernel)
    if any(not _is_compilable(e["fn"]) for e in entries):  # imported under the interpreter earlier in this process
        if os.environ.get(_CHILD_ENV):
            print("guppy targets: kernels were imported under TRITON_INTERPRET and cannot be compiled", file=sys.stderr)
            return 2
        sys.stdout.flush()
        return _rerun_without_interpreter(argv)

    t0 = time.perf_counter()
    rows = evaluate(entries, archs)
    print(f"guppy targets: triton {triton.__version__}, {len(entries)} configurations, archs "
          f"{', '.join(map(str, archs))}, {len(rows)} compiles in {time.perf_counter() - t0:.1f} s")
    for name, reason in skipped:
        print(f"  skipped {name}: {reason}")
    if find_cuda_tool("cuobjdump") is None:
        print("  registers and spills: not available (no cuobjdump; triton's metadata has no n_regs before loading)")
    for arch in archs:
        arch_rows = [r for r in rows if r["arch"] == arch]
        if arch_rows:
            print(f"\nsm_{arch} (shared-memory limit {ARCH_LIMITS[arch].smem_per_block} B per block)")
            print(format_table(arch_rows, TRITON_COLUMNS))
    extra = _csrc_section(args, archs)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"triton": rows, "csrc": extra}, f, indent=1, default=str)
    bad = [r for r in rows + extra if r.get("ok") is False]
    print(f"\n{len(bad)} configuration(s) failing" if bad else "\nall configurations fit and meet expectations")
    return exit_code(rows + extra)


if __name__ == "__main__":
    sys.exit(main())
