"""`guppy info`: what this machine has, so a bug report or a benchmark result carries its conditions."""
from __future__ import annotations

import platform
import sys

import torch


def info() -> str:
    from guppy import __version__, ops

    lines = [f"guppy {__version__}", f"python {sys.version.split()[0]} ({platform.machine()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed (the Triton kernels are unavailable)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
        cc = torch.cuda.get_device_capability()
        lines.append(f"training precision: {'bf16' if cc >= (8, 0) else 'fp16 + GradScaler'} autocast")
    else:
        lines.append("device: CPU only (training precision fp32)")
    lines.append("op implementations (--ops / ModelConfig.ops):")
    for name, reason in ops.availability().items():
        impl = ops.IMPLEMENTATIONS[name]
        state = "available" if reason is None else f"unavailable ({reason})"
        lines.append(f"  {name:12s} {state} - {impl.what}; needs {impl.needs}")
    return "\n".join(lines)
