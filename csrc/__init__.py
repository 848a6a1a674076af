"""guppy.csrc (installed as `guppy.csrc`, from the repository's `csrc/`): CUDA C++ tensor-core attention for the T4
(mma.sync m16n8k8 + ldmatrix), and its CPU twin.

    attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, dropout_seed=None)
    build(device="cuda" | "cpu", verbose=False)      build the extension ahead of time (cached, see extension.py)
    available(device) -> (bool, reason)              can `attention` run here (build + a self-check on GPUs)
    dropout_mask(B, H, T, p, seed)                   the dropout keep mask, regenerated on the host

Kernel source: attention.cu (header: math, grid, dtypes, limits; versions in notes/csrc.md). CPU tensors run the same
source compiled by g++ on the emulator in cuda_emu.h.
"""
from guppy.csrc.attention import attention, dropout_mask
from guppy.csrc.check import available
from guppy.csrc.extension import build, load, source_hash

__all__ = ["attention", "available", "build", "dropout_mask", "load", "source_hash"]
