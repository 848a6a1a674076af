"""`guppy targets`: cross-compile every Triton kernel at every launch configuration its launcher can pick, for each
target GPU, and say whether it fits and whether its dots became tensor-core instructions. No GPU needed.

Protocol (a kernel module plugs in without editing this file). Each module in `MODULES` may define
`target_configs() -> list[dict]`, one dict per (kernel, configuration):
    kernel               display name
    config               optional display string of the tile sizes (may also be folded into `kernel`)
    fn                   the @triton.jit function
    signature            {arg: type} for triton.compiler.ASTSource ("*fp32", "i32", ...), constexprs excluded
    constexprs           {name: value}
    num_warps, num_stages
    archs                capabilities on which the launcher can pick this configuration, e.g. (75, 80, 90)
    expect_tensor_cores  {arch: bool}, or None when the kernel has no tl.dot. A given expectation that is not met fails.
    attrs                optional ASTSource attrs: {(arg index,): [["tt.divisibility", 16]]} as a real launch specialises
The module's launcher must derive its choice from the same function that `target_configs()` enumerates, so the table
cannot drift from the dispatcher. Modules that do not import are listed as skipped.

For each row: shared memory (`metadata.shared`, bytes) against the target's per-block maximum (sm_75 64 KB, sm_80
163 KB, sm_86/89 99 KB, sm_90 227 KB); registers per thread and local-memory (spill) bytes read from the cubin with the
`cuobjdump --dump-resource-usage` that ships with triton (triton's own metadata has no register count before the
kernel is loaded on a device; without cuobjdump those columns say "-"), checked against 64 K registers per block;
and what the dots became: "mma" (`mma.sync`), "wgmma", "FMA" (`fma.rn.f32`, no tensor-core instruction) or "no dot"
(the kernel's TTIR has no tt.dot). Exit status 1 when a configuration does not fit a target it can be picked on, or a
tensor-core expectation is not met (or a csrc row says ok = False); 0 otherwise.

`guppy.csrc.target_rows(archs)` (CUDA C++ kernels), if present, adds a second table (kernel, arch, regs, shared,
spill_bytes, hmma, ldsm, fits, ok, note).

Compiling is a compile, not a launch, but triton decides at *import* whether a kernel is interpreted: when the kernel
modules were imported with TRITON_INTERPRET=1 (as in the test suite), this command re-runs itself in a subprocess with
the variable removed. Compiles are cached by triton (~/.triton/cache): a repeated run takes seconds.
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

MODULES = ["guppy.kernels.layer_norm", "guppy.kernels.cross_entropy", "guppy.kernels.attention",
           "guppy.kernels.gemm_softmax"]
DEFAULT_ARCHS = (75, 80, 90)
# per-block shared memory maximum (opt-in), bytes
SHARED_LIMIT = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                90: 227 * 1024}
REGS_PER_BLOCK = 64 * 1024
MAX_REGS_PER_THREAD = 255
_CHILD_ENV = "GUPPY_TARGETS_CHILD"


# ----------------------------------------------------------------------------------------------------------------------
# Collecting and compiling
# ----------------------------------------------------------------------------------------------------------------------
def collect(modules=MODULES, kernel_filter: str | None = None):
    """-> (entries, skipped): entries from every importable module's target_configs(), skipped = [(module, reason)]."""
    entries, skipped = [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # a module another engineer has not written yet, or one that fails to import
            skipped.append((name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        fn = getattr(mod, "target_configs", None)
        if fn is None:
            skipped.append((name, "no target_configs()"))
            continue
        for e in fn():
            label = f"{e['kernel']} {e.get('config', '')}".strip()
            if kernel_filter and kernel_filter.lower() not in label.lower():
                continue
            entries.append(dict(e, module=name))
    return entries, skipped


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
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return None


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


def compile_entry(entry: dict, arch: int) -> dict:
    """Cross-compile one entry for sm_<arch>. -> {shared, ptx, ttir, regs, local, seconds}."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = dict(entry["signature"])
    for k in entry["constexprs"]:
        sig[k] = "constexpr"
    # attrs: the specialisations a real launch gets (16-byte aligned pointers, strides divisible by 16); without them
    # the compile would show unvectorised loads and, on sm_80+, no cp.async pipelining
    src = triton.compiler.ASTSource(fn=entry["fn"], signature=sig, constexprs=dict(entry["constexprs"]),
                                    attrs=entry.get("attrs"))
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": entry["num_warps"], "num_stages": entry["num_stages"]})
    seconds = time.perf_counter() - t0
    regs = getattr(k.metadata, "n_regs", None)
    local = None
    if regs is None:
        regs, local = resource_usage(k.asm.get("cubin", b""))
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


def check_row(entry: dict, arch: int, shared: int, dot: str, regs: int | None = None,
              local: int | None = None) -> dict:
    """The verdict for one (entry, arch) from its compile results. Pure: tests feed it fabricated numbers."""
    limit = SHARED_LIMIT.get(arch)
    notes = []
    fits = True
    if limit is None:
        notes.append(f"no shared-memory limit known for sm_{arch}")
    elif shared > limit:
        fits = False
        notes.append(f"shared {shared} B > {limit} B")
    if regs is not None:
        threads = 32 * int(entry["num_warps"])
        if regs > MAX_REGS_PER_THREAD or regs * threads > REGS_PER_BLOCK:
            fits = False
            notes.append(f"{regs} regs x {threads} threads > {REGS_PER_BLOCK}")
    if local:
        notes.append(f"{local} B local memory per thread (spills)")
    expect = entry.get("expect_tensor_cores")
    want = expect.get(arch) if isinstance(expect, dict) else None
    tc = dot in ("mma", "wgmma")
    expect_ok = True
    if want is not None:
        expect_ok = (tc == bool(want))
        if not expect_ok:
            notes.append(f"expected {'tensor cores' if want else 'no tensor cores'}, got {dot}")
    return dict(module=entry.get("module", ""), kernel=entry["kernel"], config=entry.get("config", ""), arch=arch,
                num_warps=entry["num_warps"], num_stages=entry["num_stages"], shared=shared, shared_limit=limit,
                regs=regs, local=local, dot=dot, expect_tensor_cores=want, fits=fits, ok=fits and expect_ok,
                note="; ".join(notes))


def evaluate(entries, archs) -> list[dict]:
    rows = []
    for e in entries:
        for arch in archs:
            if arch not in tuple(e.get("archs", DEFAULT_ARCHS)):
                continue
            try:
                c = compile_entry(e, arch)
            except Exception as exc:  # a configuration that does not compile is a failure, reported as a row
                rows.append(dict(module=e.get("module", ""), kernel=e["kernel"], config=e.get("config", ""),
                                 arch=arch, num_warps=e["num_warps"], num_stages=e["num_stages"], shared=None,
                                 shared_limit=SHARED_LIMIT.get(arch), regs=None, local=None, dot="-",
                                 expect_tensor_cores=None, fits=False, ok=False,
                                 note=f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
                continue
            rows.append(check_row(e, arch, c["shared"], dot_kind(c["ptx"], c["ttir"]), c["regs"], c["local"]))
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
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


TRITON_COLUMNS = [("kernel", "kernel"), ("config", "config"), ("arch", "sm"), ("num_warps", "warps"),
                  ("num_stages", "stages"), ("shared", "shared B"), ("shared_limit", "limit B"), ("regs", "regs"),
                  ("local", "spill B"), ("dot", "dot"), ("expect_tensor_cores", "expect TC"), ("fits", "fits"),
                  ("ok", "ok"), ("note", "note")]
CSRC_COLUMNS = [("kernel", "kernel"), ("arch", "sm"), ("regs", "regs"), ("shared", "shared B"),
                ("spill_bytes", "spill B"), ("hmma", "hmma"), ("ldsm", "ldsm"), ("fits", "fits"), ("ok", "ok"),
                ("note", "note")]


def csrc_rows(archs) -> tuple[list[dict], str | None]:
    """-> (rows, reason they were skipped or None)."""
    try:
        csrc = importlib.import_module("guppy.csrc")
    except Exception as e:
        return [], f"guppy.csrc does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    fn = getattr(csrc, "target_rows", None)
    if fn is None:
        return [], "guppy.csrc has no target_rows()"
    try:
        return list(fn([a for a in archs if a in CSRC_ARCHS])), None
    except Exception as e:
        return [], f"guppy.csrc.target_rows failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


# The CUDA C++ kernels are the T4's (sm_75) tensor-core path; sm_80 is listed as the next generation that would run
# them. On sm_90 `auto` never picks them, so their register/spill budget is not held to that arch.
CSRC_ARCHS = (75, 80)


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
    p.add_argument("--no-csrc", action="store_true", help="skip guppy.csrc.target_rows")
    return p.parse_args(argv)


def _rerun_without_interpreter(argv) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[_CHILD_ENV] = "1"
    code = "import sys; from guppy.targets import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.replace(" ", "").split(",") if a)
    except ValueError:
        print(f"guppy targets: --arch {args.arch!r}: expected comma-separated integers like 75,80,90", file=sys.stderr)
        return 2
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        print(f"guppy targets: unknown arch {unknown}; known: {', '.join(map(str, SHARED_LIMIT))}", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("guppy targets: triton is not installed (pip install triton)", file=sys.stderr)
        return 2

    # Interpreted kernels cannot be cross-compiled: re-run in a clean process where @triton.jit compiles.
    if os.environ.get("TRITON_INTERPRET") and not os.environ.get(_CHILD_ENV):
        sys.stdout.flush()
        return _rerun_without_interpreter(argv)
    entries, skipped = collect(MODULES, args.kernel)
    if any(not _is_compilable(e["fn"]) for e in entries):
        if os.environ.get(_CHILD_ENV):
            print("guppy targets: kernels were imported under TRITON_INTERPRET and cannot be compiled", file=sys.stderr)
            return 2
        sys.stdout.flush()
        return _rerun_without_interpreter(argv)

    t0 = time.perf_counter()
    rows = evaluate(entries, archs)
    elapsed = time.perf_counter() - t0
    import triton as _t
    print(f"guppy targets: triton {_t.__version__}, {len(entries)} configurations, archs {', '.join(map(str, archs))}, "
          f"{len(rows)} compiles in {elapsed:.1f} s")
    for name, reason in skipped:
        print(f"  skipped {name}: {reason}")
    if find_cuda_tool("cuobjdump") is None:
        print("  registers and spills: not available (no cuobjdump; triton's metadata has no n_regs before loading)")
    for arch in archs:
        arch_rows = [r for r in rows if r["arch"] == arch]
        if not arch_rows:
            continue
        print(f"\nsm_{arch} (shared-memory limit {SHARED_LIMIT[arch]} B per block)")
        print(format_table(arch_rows, TRITON_COLUMNS))

    extra = []
    if args.no_csrc:
        print("\ncsrc rows skipped: --no-csrc")
    else:
        extra, reason = csrc_rows(archs)
        if reason:
            print(f"\ncsrc rows skipped: {reason}")
        elif args.kernel:
            extra = [r for r in extra if args.kernel.lower() in str(r.get("kernel", "")).lower()]
        if extra:
            print("\nguppy.csrc (CUDA C++)")
            print(format_table(extra, CSRC_COLUMNS))

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"triton": rows, "csrc": extra}, f, indent=1, default=str)
    rc = exit_code(rows + extra)
    bad = [r for r in rows + extra if r.get("ok") is False]
    print(f"\n{len(bad)} configuration(s) failing" if bad else "\nall configurations fit and meet expectations")
    return rc


if __name__ == "__main__":
    sys.exit(main())
