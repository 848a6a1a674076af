"""Small helpers shared by the Triton launchers in guppy.kernels: where a kernel may run, and input checks.

Kept deliberately small and stable: other kernel modules import these names.

- `interpreting()`: True when TRITON_INTERPRET is set (read at call time). Note that triton 3.x decides at *decoration*
  time (`@triton.jit`, i.e. when a kernel module is first imported) whether a kernel is compiled or interpreted, so the
  variable has to be set before `guppy.kernels` is imported for CPU tensors to work; tests/conftest.py does that.
- `check_triton_device(*tensors, op=...)`: one clear error for a CPU tensor outside the interpreter, and for tensors
  that sit on different devices.
- `check_float_dtype(t, op=..., name=...)`: fp32 / fp16 / bf16 only.
"""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1), read now, not at import."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def check_triton_device(*tensors, op: str) -> None:
    """Raise a one-line error unless every tensor given (None skipped) can be handed to a Triton kernel."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
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


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


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
