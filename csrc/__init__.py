"""guppy.csrc (installed as `guppy.csrc`, from the repository's `csrc/`): CUDA C++ tensor-core attention for the T4
(mma.sync m16n8k8 + ldmatrix), and its CPU twin.

    attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, dropout_seed=None)
    available(device, head_dims=None) -> (bool, reason)   can `attention` run here: build + self-check, once per
                                                          (device, head dims); `auto` asks for the model's head dim
    build(device="cuda" | "cpu", verbose=False, head_dims=None)   build ahead of time (cached, see extension.py)
    dropout_mask(B, H, T, p, seed)                        the dropout keep mask, regenerated on the host

Kernel source: attention.cu (header: math, grid, dtypes, limits; versions in notes/csrc.md). attention_op.py loads,
verifies and wraps it; CPU tensors run the same source compiled by g++ on the emulator in cuda_emu.h, through the
same steps.
"""
from guppy.csrc.attention_op import HEAD_DIMS, attention, available, dropout_mask
from guppy.csrc.extension import build, load, source_hash

__all__ = ["HEAD_DIMS", "attention", "available", "build", "dropout_mask", "load", "source_hash"]
