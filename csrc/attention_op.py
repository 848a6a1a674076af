"""guppy.csrc.attention_op: the CUDA C++ attention (csrc/attention.cu) as a PyTorch op -- load, verify, wrap.

Spec: guppy.reference.attention_reference. CUDA tensors run the nvcc build; CPU tensors run the very same kernel source
compiled for the host by g++ on the CUDA emulator (cuda_emu.h) -- slow, exact in layout, meant for tests.

One module owns the extension's life on each device:
  load     extension.load builds (once, cached on disk) and loads the extension for the device, holding the head dims
           asked for: `available(device, head_dims=(D,))` (what `auto` asks) builds one instance of each kernel,
           `attention()` uses such a build when one holds its D and otherwise builds all of HEAD_DIMS;
  verify   a self-check runs forward and gradients on a small causal packed input through the same wrapper as every
           call (`_run`), against attention_reference in fp32; a build error or a failed check becomes a one-line
           reason, never a crash;
  wrap     `attention()` (a torch.autograd.Function) calls the verified module.
The outcome is kept in `_STATE`, the one availability cache, per (device, head dims built): `available()` reads it,
`attention()` reads it, the ops seam asks `available()`. Both run the same steps on every device type (the emulator
build on the CPU), so the CPU test suite exercises the path a GPU takes. After the first call on a device, a call
costs one or two dict lookups.

Inputs: q, k, v (B, H, T, D) float16 on one device, D in HEAD_DIMS, any T >= 1. Other dtypes are rejected (not
cast): a silent fp32 -> fp16 cast would change the numbers the caller asked for; cast with `.half()` on purpose.
q/k/v may be strided views (e.g. of a fused qkv projection) as long as the last dimension is contiguous; views whose
other strides are not multiples of 8 elements (or whose data is not 16-byte aligned) are copied first.
segment_ids (B, T) integer: i attends j only within one segment. Tile skipping assumes ids non-decreasing along T
(packed rows); other orders are still exact, just not skipped. Dropout: Philox4x32-10 keyed on
(dropout_seed, b, h, i, j); the mask is never stored and `dropout_mask()` regenerates it.
"""
from __future__ import annotations

import math
import os
import threading

import torch

from guppy import reference
from guppy.csrc import extension
from guppy.csrc.extension import HEAD_DIMS
from guppy.reference import check_attention_args
from guppy.seeds import dropout_seed_tensor

# ("cpu" | "cuda:N/<arch>", head dims built) -> (verified extension, "") or (None, the one-line reason it cannot run)
_STATE: dict[tuple[str, tuple[int, ...]], tuple[object, str]] = {}
_STATE_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------------------------------
# Load and verify, once per device
# --------------------------------------------------------------------------------------------------------------------
def _state_key(device: torch.device) -> str:
    """The device part of the cache key: the device, and on a GPU the build arch (GUPPY_CSRC_ARCH=75 selects another
    build, so one process can check the native and the T4 build side by side)."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available()
                                                           else 0)
    return f"cuda:{index}/{os.environ.get('GUPPY_CSRC_ARCH') or 'native'}"


def _self_check(mod, device: torch.device, D: int = 64) -> str | None:
    """None when `mod` computes attention_reference on `device`, else a one-line reason.

    Forward and the three gradients on B, H, T = 2, 2, 80 at head dim D (64, or the build's own when it holds no 64;
    two row tiles with a tail; rows packed with two segments in one batch row, one in the other), through `_run`
    exactly as a call would go. The tolerance, 5e-3 x max(1, max|ref|), is 3-10x what the kernel's fp16 rounding
    gives on this input (~1e-3 absolute) and far below what a wrong tile, mask or scale gives. Run with grad on,
    autocast off and outside inference mode, whatever the caller has set: the check differentiates, and its reference
    must be fp32."""
    g = torch.Generator().manual_seed(0)
    B, H, T = 2, 2, 80
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        q, k, v, do = (torch.randn(B, H, T, D, generator=g).half().to(device) for _ in range(4))
        seg = torch.tensor([[0] * 30 + [1] * 50, [0] * 80], dtype=torch.int32, device=device)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = _run(mod, q, k, v, True, 1 / math.sqrt(D), seg, 0.0, None)
        got = [out, *torch.autograd.grad(out, (q, k, v), do)]
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = reference.attention_reference(qf, kf, vf, causal=True, segment_ids=seg)
        want = [ref, *torch.autograd.grad(ref, (qf, kf, vf), do.float())]
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.float() - r).abs().max().item()
        tol = 5e-3 * max(1.0, r.abs().max().item())
        if not err <= tol:
            return f"self-check failed: {name} differs from the fp32 reference by {err:.3g} (tolerance {tol:.3g})"
    return None


def _load_and_verify(device: torch.device, head_dims: tuple[int, ...]) -> tuple[object, str]:
    if device.type == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA device available"
    try:
        mod = extension.load(device.type, cuda_device=device if device.type == "cuda" else None, head_dims=head_dims)
    except Exception as e:  # no nvcc, wrong toolkit, compiler errors: a reason, not a crash
        return None, f"guppy.csrc build failed: {_last_line(e)}"
    try:
        failure = _self_check(mod, device, 64 if 64 in head_dims else head_dims[0])
    except Exception as e:  # a kernel that raises (launch failure, bad shared memory size) fails its check
        return None, f"self-check raised {type(e).__name__}: {_last_line(e)}"
    return (None, failure) if failure else (mod, "")


def _last_line(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _verified(device: torch.device, head_dims: tuple[int, ...] = HEAD_DIMS) -> tuple[object, str]:
    key = (_state_key(device), head_dims)
    state = _STATE.get(key)
    if state is not None:
        return state
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # the self-check reads its errors on the host, which a capture forbids: say so, and cache nothing
        return None, "first use inside a CUDA graph capture; call it once eagerly first (CudaGraphStep's warm-up does)"
    with _STATE_LOCK:   # the check never calls back into here, so a plain lock cannot deadlock
        if key not in _STATE:
            _STATE[key] = _load_and_verify(device, head_dims)
        return _STATE[key]


def available(device="cuda", head_dims=None) -> tuple[bool, str]:
    """(True, "") when guppy.csrc.attention can run on `device` for `head_dims` (default: all of HEAD_DIMS), else
    (False, one line saying why). Never raises. The first call for a (device, head dims) builds (or loads) an
    extension holding just those head dims and runs the self-check; later calls read the cache."""
    try:
        dims = extension.head_dim_selection(head_dims)
    except ValueError as e:
        return False, str(e)
    mod, reason = _verified(torch.device(device), dims)
    return mod is not None, reason


def _module(device: torch.device, head_dim: int | None = None):
    """The verified extension for `device` that holds `head_dim`: the one-head-dim build `available(device, (D,))`
    made (what `auto` asks) when there is one, else the build of all HEAD_DIMS."""
    mod, reason = _STATE.get((_state_key(device), (head_dim,))) or _verified(device)
    if mod is None:
        raise RuntimeError(f"guppy.csrc.attention cannot run on {device}: {reason}")
    return mod


# --------------------------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------------------------
def _aligned(x: torch.Tensor) -> bool:
    return (x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0)


def _check(q, k, v, segment_ids, dropout_p):
    check_attention_args("guppy.csrc.attention", q, k, v, segment_ids, dropout_p)
    if q.dtype != torch.float16:
        raise TypeError(f"guppy.csrc.attention takes float16 q, k, v; got {q.dtype} (cast with .half())")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"guppy.csrc.attention: head dim D={q.shape[-1]} is not supported (D in {HEAD_DIMS})")


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mod, q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed):
        o, lse = mod.fwd(q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, seg, seg_sorted, seed)
        ctx.mod, ctx.args = mod, (causal, sm_scale, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg, seg_sorted, seed = ctx.saved_tensors
        causal, sm_scale, dropout_p = ctx.args
        do = do.to(torch.float16).contiguous()
        dq, dk, dv = ctx.mod.bwd(q, k, v, o, lse, do, seg, seg_sorted, causal, sm_scale, dropout_p, seed)
        return None, dq, dk, dv, None, None, None, None, None, None


def _run(mod, q, k, v, causal, sm_scale, segment_ids, dropout_p, dropout_seed):
    """`attention` on a given extension module, arguments already checked (the self-check calls this too)."""
    # seed and sortedness flag stay on the device: no host sync per call, and CUDA-graph replays draw fresh seeds
    seed = dropout_seed_tensor(dropout_p, dropout_seed, q.device) & (2**63 - 1)
    q, k, v = (x if _aligned(x) else x.contiguous() for x in (q, k, v))
    seg, seg_sorted = None, torch.zeros(1, dtype=torch.int32, device=q.device)
    if segment_ids is not None:
        seg = segment_ids.to(torch.int32).contiguous()
        seg_sorted = (seg[:, 1:] >= seg[:, :-1]).all().to(torch.int32).reshape(1)
    return _Attention.apply(mod, q, k, v, seg, seg_sorted, bool(causal), sm_scale, dropout_p, seed)


def attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, dropout_seed=None):
    """softmax(q kᵀ · sm_scale + mask) with dropout on the probabilities, times v; same semantics as
    guppy.reference.attention_reference. q, k, v (B, H, T, D) float16; returns (B, H, T, D) float16.
    RuntimeError (one line) when the extension cannot run on q's device: see `available`."""
    _check(q, k, v, segment_ids, dropout_p)
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return torch.empty_like(q).requires_grad_(q.requires_grad)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _run(_module(q.device, q.shape[-1]), q, k, v, causal, sm_scale, segment_ids, float(dropout_p),
                dropout_seed)


def dropout_mask(B: int, H: int, T: int, dropout_p: float, dropout_seed: int) -> torch.Tensor:
    """The keep mask (B, H, T, T) bool that attention(..., dropout_p, dropout_seed) applies, regenerated on the host
    with the same Philox function the kernels use (kept entries are scaled by 1/(1-p))."""
    return _module(torch.device("cpu")).dropout_mask(B, H, T, float(dropout_p), int(dropout_seed) & (2**63 - 1))
