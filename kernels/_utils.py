"""What the Triton kernels of guppy.kernels share: where a kernel may run, input checks, the target arch, and the
dropout mask that both attention kernels draw. A kernel file imports from here, never another kernel's privates.

Triton 3.x decides at *decoration* time (`@triton.jit`, i.e. when a kernel module is first imported) whether a kernel
is compiled or interpreted, so TRITON_INTERPRET=1 has to be set before a kernel module is imported for CPU tensors to
work; tests/conftest.py does that. `interpreting()` reads the variable at call time, for the error messages.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from guppy.reference import check_attention_args

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------------------------------
# Where a kernel runs
# ----------------------------------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1), read now, not at import."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def device_arch(t: torch.Tensor) -> int:
    """10·major + minor of the GPU holding `t`; 0 for a CPU tensor (the interpreter)."""
    if not t.is_cuda:
        return 0
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def arch_class(arch: int) -> int:
    """The arch a launch configuration is chosen for: 0 = interpreter, 75 = Turing (and older), 80 = Ampere/Ada (8.x),
    90 = Hopper and newer."""
    if arch == 0:
        return 0
    return 75 if arch < 80 else (80 if arch < 90 else 90)


def num_programs_cap(device: torch.device) -> int:
    """How many persistent programs a grid-stride kernel should launch: 2 per SM on a GPU, a few in the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: each program instance costs ~1.5 ms of Python; keep the grid tiny


def distinct_configs(config_for, sizes) -> list[dict]:
    """The distinct launch configurations `config_for(size)` returns over `sizes`, in order: what a launcher can
    pick, for `guppy targets`."""
    out, seen = [], set()
    for n in sizes:
        cfg = config_for(n)
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Input checks: one line naming the op and the problem
# ----------------------------------------------------------------------------------------------------------------------
def check_triton_device(*tensors, op: str) -> None:
    """Raise a one-line error unless every tensor given (None skipped) can be handed to a Triton kernel."""
    tensors = [t for t in tensors if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices ({', '.join(sorted(map(str, devices)))})")
    device = tensors[0].device
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if interpreting():
            return
        raise RuntimeError(f"{op}: got a CPU tensor; Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 to run "
                           f"them on the CPU through the interpreter (slow)")
    raise RuntimeError(f"{op}: got a tensor on {device}; Triton kernels here support CUDA tensors (or CPU tensors "
                       f"under TRITON_INTERPRET=1)")


def check_float_dtype(t: torch.Tensor, *, op: str, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")


def check_attention_inputs(op: str, q, k, v, segment_ids, dropout_p) -> None:
    """The spec's attention contract (`check_attention_args`) plus what both Triton attentions need: fp16 / bf16 /
    fp32, 16 <= D <= 128, a non-empty input, B·H within grid axis 1, tensors a Triton kernel can take."""
    check_attention_args(op, q, k, v, segment_ids, dropout_p)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype {q.dtype} not supported; use float16, bfloat16 or float32")
    B, H, T, D = q.shape
    if not 16 <= D <= 128:
        raise ValueError(f"{op}: head dim D={D} outside the supported range 16..128")
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"{op}: empty input of shape {tuple(q.shape)}")
    if B * H >= 65536:
        raise ValueError(f"{op}: B·H = {B * H} exceeds the grid limit 65535")
    check_triton_device(q, k, v, segment_ids, op=op)


# ----------------------------------------------------------------------------------------------------------------------
# Dropout: the keep mask as a pure function of (seed, b·H + h, i, j)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def dropout_keep(seed, bh, rows, cols, dropout_p):
    """keep[i, j] for query indices `rows` and key indices `cols` (2-D, broadcastable): Philox-4x32 with counter
    (j, i, bh, 0) under key `seed`, first output word -> uniform [0, 1) -> keep iff u >= p. 32-bit counters: no int64
    offset arithmetic and no overflow at any B·H·T² (T < 2³²). Evaluated where it is used, never stored."""
    z = (rows * 0 + cols * 0).to(tl.uint32)                       # broadcast shape, uint32 zeros
    c0 = z + cols.to(tl.uint32)
    c1 = z + rows.to(tl.uint32)
    c2 = z + bh.to(tl.uint32)
    r, _, _, _ = tl.random.philox(seed, c0, c1, c2, z)
    return tl.random.uint_to_uniform_float(r) >= dropout_p
