"""Dropout seeds in device memory, shared by the Triton and CUDA C++ attention kernels.

The kernels read their Philox key from a (1,) int64 tensor instead of taking it as a launch argument. Drawn with
torch's generator on the tensors' device, that seed costs no host sync, `torch.manual_seed` fixes it, and a captured
CUDA graph draws a fresh one on every replay (a launch argument would be frozen into the graph).
"""
from __future__ import annotations

import torch


def dropout_seed_tensor(dropout_p: float, dropout_seed, device) -> torch.Tensor:
    """(1,) int64 on `device`: zero without dropout; drawn by torch when dropout_seed is None; else the given int or
    tensor (tests regenerate a mask from a known seed)."""
    if dropout_p == 0.0:
        return torch.zeros(1, dtype=torch.int64, device=device)
    if dropout_seed is None:
        return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    if isinstance(dropout_seed, torch.Tensor):
        return dropout_seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([int(dropout_seed)], dtype=torch.int64, device=device)
