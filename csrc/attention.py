"""guppy.csrc.attention: the CUDA C++ tensor-core attention (csrc/attention.cu) as a torch.autograd.Function.

Spec: guppy.reference.attention_reference. CUDA tensors run the nvcc build; CPU tensors run the very same kernel source
compiled for the host by g++ on the CUDA emulator (cuda_emu.h) -- slow, exact in layout, meant for tests.

Inputs: q, k, v (B, H, T, D) float16 on one device, D in {32, 64, 128}, any T >= 1. Other dtypes are rejected
(not cast): a silent fp32 -> fp16 cast would change the numbers the caller asked for; cast with `.half()` on purpose.
q/k/v may be strided views (e.g. of a fused qkv projection) as long as the last dimension is contiguous; views whose
other strides are not multiples of 8 elements (or whose data is not 16-byte aligned) are copied first.
segment_ids (B, T) integer: i attends j only within one segment. Tile skipping assumes ids non-decreasing along T
(packed rows); other orders are still exact, just not skipped. Dropout: Philox4x32-10 keyed on
(dropout_seed, b, h, i, j); the mask is never stored and `dropout_mask()` regenerates it.
"""
from __future__ import annotations

import math

import torch

from guppy.csrc import extension as _build
from guppy.reference import check_attention_args
from guppy.seeds import dropout_seed_tensor

_SUPPORTED_D = (32, 64, 128)


_VERIFIED: dict[str, str] = {}   # "cuda:N" -> "ok" | "checking" | the reason it failed


def _module(device: torch.device):
    """The extension for `device`. On a GPU, the first call builds it and runs the self-check of check.available();
    if either fails, every call raises RuntimeError with the one-line reason (the seam's "auto" asks available()
    first and falls back instead)."""
    if device.type != "cuda":
        return _build.load("cpu")
    key = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    state = _VERIFIED.get(key)
    if state is None:
        from guppy.csrc.check import available
        _VERIFIED[key] = "checking"          # the self-check itself calls attention() on this device
        ok, reason = available(key)
        _VERIFIED[key] = state = "ok" if ok else reason
    if state not in ("ok", "checking"):
        raise RuntimeError(f"guppy.csrc cannot run on {key}: {state}")
    return _build.load("cuda", cuda_device=device)


def _aligned(x: torch.Tensor) -> bool:
    return (x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0)


def _check(q, k, v, segment_ids, dropout_p):
    check_attention_args("guppy.csrc.attention", q, k, v, segment_ids, dropout_p)
    if q.dtype != torch.float16:
        raise TypeError(f"guppy.csrc.attention takes float16 q, k, v; got {q.dtype} (cast with .half())")
    if q.shape[-1] not in _SUPPORTED_D:
        raise ValueError(f"guppy.csrc.attention: head dim D={q.shape[-1]} is not supported (D in {_SUPPORTED_D})")


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed):
        mod = _module(q.device)
        o, lse = mod.fwd(q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, seg, seg_sorted, seed)
        ctx.args = (causal, sm_scale, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg, seg_sorted, seed = ctx.saved_tensors
        causal, sm_scale, dropout_p = ctx.args
        mod = _module(q.device)
        do = do.to(torch.float16).contiguous()
        dq, dk, dv = mod.bwd(q, k, v, o, lse, do, seg, seg_sorted, causal, sm_scale, dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, dropout_seed=None):
    """softmax(q kᵀ · sm_scale + mask) with dropout on the probabilities, times v; same semantics as
    guppy.reference.attention_reference. q, k, v (B, H, T, D) float16; returns (B, H, T, D) float16."""
    _check(q, k, v, segment_ids, dropout_p)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    # seed and sortedness flag stay on the device: no host sync per call, and CUDA-graph replays draw fresh seeds
    seed = dropout_seed_tensor(float(dropout_p), dropout_seed, q.device) & (2**63 - 1)
    q, k, v = (x if _aligned(x) else x.contiguous() for x in (q, k, v))
    seg, seg_sorted = None, torch.zeros(1, dtype=torch.int32, device=q.device)
    if segment_ids is not None:
        seg = segment_ids.to(torch.int32).contiguous()
        seg_sorted = (seg[:, 1:] >= seg[:, :-1]).all().to(torch.int32).reshape(1)
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return torch.empty_like(q).requires_grad_(q.requires_grad)
    return _Attention.apply(q, k, v, seg, seg_sorted, bool(causal), sm_scale, float(dropout_p), seed)


def dropout_mask(B: int, H: int, T: int, dropout_p: float, dropout_seed: int) -> torch.Tensor:
    """The keep mask (B, H, T, T) bool that attention(..., dropout_p, dropout_seed) applies, regenerated on the host
    with the same Philox function the kernels use (kept entries are scaled by 1/(1-p))."""
    return _build.load("cpu").dropout_mask(B, H, T, float(dropout_p), int(dropout_seed) & (2**63 - 1))
