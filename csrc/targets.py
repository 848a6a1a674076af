"""guppy.csrc.target_rows: what nvcc makes of each attention kernel, per target arch, without a GPU.

One `nvcc -cubin -arch=sm_XX -Xptxas -v` call per arch compiles csrc/attention.cu; the ptxas lines give registers,
static shared memory and spills per kernel, and `cuobjdump -sass` of the cubin gives the count of HMMA.1688
(mma.sync m16n8k8) and LDSM (ldmatrix) instructions in each kernel's code (static counts: one unrolled loop body).

Row keys: kernel, arch, regs, shared (bytes: static + the dynamic amount the launcher requests), spill_bytes
(stores + loads), hmma, ldsm, fits, ok, note.
  fits: shared within the arch's per-block limit (64 KB on sm_75, 163 KB on sm_80) and regs x 128 threads within the
        64K-register file, so at least one block can be resident.
  ok:   fits, no spills, and HMMA.1688 > 0 on sm_75 (the point of these kernels is the T4's tensor cores).
Results are cached by source hash and arch list in the guppy cache folder (see extension.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

from guppy.csrc.extension import HERE, cache_root, file_lock, source_hash
from guppy.targets import find_cuda_tool

THREADS = 128
_SMEM_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_SMEM_PER_SM = {75: 64 * 1024, 80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
_MAX_THREADS_PER_SM = {75: 1024, 80: 2048, 86: 1536, 89: 1536, 90: 2048}


def _tiles(D: int) -> dict:
    """Mirror of attention.cu's Cfg<D> and *_smem(): the dynamic shared memory each launcher requests."""
    fbn = 32 if D == 128 else 64
    bn = 32 if D >= 64 else 64
    bq = 16 if D == 128 else 32 if D == 64 else 64
    half = 2
    dq = (2 * bn + 64) * D * half
    dkv = (2 * 64 + 2 * bq) * D * half
    return {"fwd": 2 * fbn * D * half, "bwd_dq": dq, "bwd_dkv": dkv, "bwd_small": max(dq, dkv),
            "tiles": {"fwd": f"64 queries x {fbn} keys", "bwd_dq": f"64 queries x {bn} keys",
                      "bwd_dkv": f"64 keys x {bq} queries", "bwd_small": f"dkv 64x{bq}, dq 64x{bn}"}}


_NAME = re.compile(r"attn_(fwd|bwd_dq|bwd_dkv|bwd_small)ILi(\d+)E")


def _readable(mangled: str):
    m = _NAME.search(mangled)
    return (f"attn_{m.group(1)}<D={m.group(2)}>", m.group(1), int(m.group(2))) if m else (mangled, None, None)


def _parse_ptxas(text: str) -> dict:
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


def _parse_sass(text: str) -> dict:
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = {"hmma": 0, "ldsm": 0}
        elif cur is not None:
            if "HMMA.1688" in line:
                out[cur]["hmma"] += 1
            if re.search(r"\bLDSM\b", line):
                out[cur]["ldsm"] += 1
    return out


def _compile(arch: int, nvcc: str, cuobjdump: str, tmp: str):
    cubin = os.path.join(tmp, f"attention_sm{arch}.cubin")
    r = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-Xptxas", "-v", "-I", HERE, "-o", cubin,
                        os.path.join(HERE, "attention.cu")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed for sm_{arch}:\n{r.stderr[-2000:]}")
    ptxas = _parse_ptxas(r.stderr + r.stdout)
    s = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
    if s.returncode != 0:
        raise RuntimeError(f"cuobjdump failed for sm_{arch}: {s.stderr[-500:]}")
    return ptxas, _parse_sass(s.stdout)


def _rows_for_arch(arch, ptxas, sass) -> list[dict]:
    rows = []
    for mangled, info in sorted(ptxas.items(), key=lambda kv: _readable(kv[0])[0]):
        name, kind, D = _readable(mangled)
        if kind is None:
            continue
        t = _tiles(D)
        shared = info["static_smem"] + t[kind]
        counts = sass.get(mangled, {"hmma": 0, "ldsm": 0})
        regs_alloc = -(-max(info["regs"], 1) // 8) * 8           # allocation granularity: 8 regs/thread (256/warp)
        per_block_limit = _SMEM_PER_BLOCK.get(arch, 48 * 1024)
        fits = shared <= per_block_limit and regs_alloc * THREADS <= 65536
        blocks = 0
        if fits:
            blocks = min(_SMEM_PER_SM.get(arch, per_block_limit) // max(shared, 1), 65536 // (regs_alloc * THREADS),
                         _MAX_THREADS_PER_SM.get(arch, 1024) // THREADS, 16)
        ok = fits and info["spill"] == 0 and (arch != 75 or counts["hmma"] > 0)
        note = (f"{t['tiles'][kind]} tiles, 4 warps; causal/non-causal, segments, dropout are runtime flags of this "
                f"one instance; {blocks} block(s)/SM by regs+smem"
                + (f"; {info['stack']} B stack frame" if info["stack"] else "")
                + ("" if kind != "bwd_small" else "; T <= 128 path")
                + ("" if not (kind in ("bwd_dq", "bwd_dkv") and D <= 64) else "; T > 128 path"))
        rows.append({"kernel": name, "arch": arch, "regs": info["regs"], "shared": shared,
                     "spill_bytes": info["spill"], "hmma": counts["hmma"], "ldsm": counts["ldsm"], "fits": fits,
                     "ok": ok, "note": note})
    return rows


def target_rows(archs=(75, 80), use_cache: bool = True) -> list[dict]:
    """One row per (kernel instance, arch). Raises RuntimeError when nvcc or cuobjdump is missing or fails."""
    archs = tuple(int(a) for a in archs)
    nvcc, cuobjdump = find_cuda_tool("nvcc"), find_cuda_tool("cuobjdump")
    if nvcc is None:
        raise RuntimeError("target_rows needs nvcc (CUDA toolkit) on PATH or in $CUDA_HOME/bin")
    if cuobjdump is None:
        raise RuntimeError("target_rows needs cuobjdump (CUDA toolkit, the triton wheel, or nvidia-cuda-cuobjdump)")
    path = os.path.join(cache_root(), f"targets-{source_hash()}-{'_'.join(map(str, archs))}.json")
    with file_lock(os.path.join(cache_root(), "targets.lock")):
        if use_cache and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for arch in archs:
                rows += _rows_for_arch(arch, *_compile(arch, nvcc, cuobjdump, tmp))
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(path + ".tmp", path)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'kernel':24s} {'arch':>4s} {'regs':>4s} {'shared':>7s} {'spill':>5s} {'hmma':>5s} {'ldsm':>5s} fits ok"
    lines = [head]
    for r in rows:
        lines.append(f"{r['kernel']:24s} {r['arch']:>4d} {r['regs']:>4d} {r['shared']:>7d} {r['spill_bytes']:>5d} "
                     f"{r['hmma']:>5d} {r['ldsm']:>5d} {str(r['fits'])[0]:>4s} {str(r['ok'])[0]}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_rows(target_rows()))
