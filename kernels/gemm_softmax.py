"""gemm-softmax attention: cuBLAS batched GEMMs around a Triton fused scale-mask-softmax-dropout (a T4 candidate).

Computes `guppy.reference.attention_reference` (the specification) the way GuppyLM's plain attention does, but with the
elementwise middle fused into one Triton pass each way and the dropout mask never stored:

    forward    S  = Q Kᵀ                                   torch.matmul (cuBLAS; tensor cores on sm_75 for fp16)
               P  = softmax(S · sm_scale + mask)           `_softmax_fwd` (Triton), P stored in the input dtype
               Pd = P ∘ Z,  Z = keep / (1 − p_drop)        same pass (written only when dropout is on)
               O  = Pd V                                   torch.matmul
    backward   dPd = dO Vᵀ                                 torch.matmul
               dP  = dPd ∘ Z;  delta_i = Σ_j P_ij dP_ij;  dS = P ∘ (dP − delta) · sm_scale
                                                           `_softmax_bwd` (Triton; dS overwrites dPd, Pd recomputed)
               dQ = dS K,  dK = dSᵀ Q,  dV = Pdᵀ dO         torch.matmul

keep_ij is `_utils.dropout_keep`: Philox keyed on (seed, b·H + h, i, j), the very same mask `guppy.kernels.attention`
draws, so both candidates give identical outputs for one seed and `attention.dropout_mask` regenerates it.
mask(i, j) = [j <= i if causal] and [seg[b, i] == seg[b, j]]; every valid row keeps at least its diagonal.

Grid: one program per (ROWS rows of one (b, h), b·h); each row is loaded whole (BLOCK_T = next_pow2(T) columns) into
registers, so the T limit is 8192. Memory: S/P (and Pd with dropout) are (B, H, T, T) tensors — O(T²) bytes,
the price of the cuBLAS GEMMs (at guppy's T = 128: 6.3 MB each for B = 32, H = 6, fp16). Saved for backward:
q, k, v, P (+ segment ids, seed). S is computed in the input dtype before scaling, like `attention_reference`.

Configuration: `softmax_config(arch, T, dtype)` is the only place tiles/warps are chosen; `target_configs()`
enumerates all it can return. The kernels have no tl.dot, so nothing here depends on sm_75's missing Triton MMA.

Versions, and the T4 projection against the other candidates: notes/attention.md.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from guppy.kernels._utils import LOG2E, arch_class, check_attention_inputs, device_arch, dropout_keep
from guppy.seeds import dropout_seed_tensor

MAX_T = 8192


@triton.jit
def _softmax_fwd(S,                     # (B·H, T, T) raw scores q·kᵀ, contiguous
                 P,                     # (B·H, T, T) out: softmax probabilities (input dtype)
                 PD,                    # (B·H, T, T) out: P ∘ Z (only written when DROPOUT)
                 SEG,                   # (B, T) int32 (dummy when HAS_SEG is False)
                 stride_sb, H, T, qk_scale, dropout_p,
                 SEED,                  # (1,) int64 dropout seed, read from memory (CUDA-graph safe)
                 BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    seed = tl.load(SEED)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_T)
    r_ok = rows < T
    ok = r_ok[:, None] & (cols[None, :] < T)
    offs = bh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :]
    s = tl.load(S + offs, mask=ok, other=0.0).to(tl.float32) * qk_scale          # base-2 scaled scores
    allowed = ok
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= rows[:, None])
    if HAS_SEG:
        seg_base = SEG + (bh // H).to(tl.int64) * stride_sb
        seg_r = tl.load(seg_base + rows, mask=r_ok, other=-1)
        seg_c = tl.load(seg_base + cols, mask=cols < T, other=-2)
        allowed = allowed & (seg_r[:, None] == seg_c[None, :])
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, axis=1)
    m = tl.where(r_ok, m, 0.0)                                                     # tail rows: all -inf, avoid NaN
    e = tl.math.exp2(s - m[:, None])
    l = tl.sum(e, axis=1)
    p = e / tl.where(l > 0.0, l, 1.0)[:, None]
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=ok)
    if DROPOUT:
        keep = dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p)
        tl.store(PD + offs, tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0).to(PD.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_bwd(P,                     # (B·H, T, T) saved probabilities
                 DPD,                   # (B·H, T, T) in: dO Vᵀ; out (in place): dS = P ∘ (dP − delta) · sm_scale
                 PD,                    # (B·H, T, T) out: P ∘ Z (only when DROPOUT)
                 T, sm_scale, dropout_p,
                 SEED,                  # (1,) int64 dropout seed
                 BLOCK_T: tl.constexpr, ROWS: tl.constexpr, DROPOUT: tl.constexpr):
    pid, bh = tl.program_id(0), tl.program_id(1)
    seed = tl.load(SEED)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_T)
    ok = (rows[:, None] < T) & (cols[None, :] < T)
    offs = bh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :]
    p = tl.load(P + offs, mask=ok, other=0.0).to(tl.float32)
    dp = tl.load(DPD + offs, mask=ok, other=0.0).to(tl.float32)
    if DROPOUT:
        z = tl.where(dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
        dp = dp * z
        tl.store(PD + offs, (p * z).to(PD.dtype.element_ty), mask=ok)
    delta = tl.sum(p * dp, axis=1)
    ds = p * (dp - delta[:, None]) * sm_scale
    tl.store(DPD + offs, ds.to(DPD.dtype.element_ty), mask=ok)


# ====================================================================================================================
# Configuration
# ====================================================================================================================
def softmax_config(arch: int, T: int, dtype) -> dict:
    """{"fwd": (BLOCK_T, ROWS, num_warps), "bwd": (...)} per (arch, T, dtype): the one source of launch parameters.

    Memory-bound row kernels: aim at ~4K elements per program (ROWS · BLOCK_T), warps growing with the row length.
    The choice is the same on every GPU arch (no tensor-core path involved); arch 0 = interpreter, few programs.
    """
    if T > MAX_T:
        raise ValueError(f"gemm_softmax_attention: T={T} exceeds MAX_T={MAX_T} (a row must fit in registers)")
    block_t = max(16, triton.next_power_of_2(T))
    if arch_class(arch) == 0:
        rows = max(1, min(32, 4096 // block_t))
        return {"fwd": (block_t, rows, 1), "bwd": (block_t, rows, 1)}
    rows = max(1, 4096 // block_t)
    warps = 4 if block_t <= 1024 else (8 if block_t <= 4096 else 16)
    return {"fwd": (block_t, rows, warps), "bwd": (block_t, rows, warps)}


def target_configs() -> list[dict]:
    """Every configuration `softmax_config` can return on sm_75/80/90 (T from 16 to MAX_T, fp16/fp32, + bf16 on
    sm_80/90), specialised for causal + segments + dropout. No tl.dot, so no tensor-core expectation."""
    entries = []
    for arch, dtypes in ((75, ("fp16", "fp32")), (80, ("fp16", "bf16", "fp32")), (90, ("fp16", "bf16", "fp32"))):
        for dt in dtypes:
            types = dict(dict.fromkeys(("S", "P", "PD", "DPD"), f"*{dt}"), SEG="*i32", SEED="*i64", qk_scale="fp32",
                         sm_scale="fp32", dropout_p="fp32")
            configs = {softmax_config(arch, 2 ** i, dt)[key] + (key,) for i in range(4, MAX_T.bit_length())
                       for key in ("fwd", "bwd")}
            for bt, rows, w, key in sorted(configs):
                fn, flags = (_softmax_fwd, dict(CAUSAL=True, HAS_SEG=True)) if key == "fwd" else (_softmax_bwd, {})
                entries.append(dict(kernel=f"softmax_{key} {dt} T<={bt} {rows}x{bt}", fn=fn, types=types,
                                    constexprs=dict(flags, BLOCK_T=bt, ROWS=rows, DROPOUT=True), num_warps=w,
                                    num_stages=1, archs=(arch,)))
    return entries


# ====================================================================================================================
# Launchers and autograd
# ====================================================================================================================
class GemmSoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, segment_ids, dropout_p, seed):
        B, H, T, D = q.shape
        cfg = softmax_config(device_arch(q), T, q.dtype)
        bt, rows, w = cfg["fwd"]
        s = torch.matmul(q, k.transpose(-2, -1))                                # (B, H, T, T), cuBLAS
        p = torch.empty((B, H, T, T), dtype=q.dtype, device=q.device)
        drop = dropout_p > 0.0
        pd = torch.empty_like(p) if drop else p
        if segment_ids is not None:
            seg = segment_ids.to(torch.int32).contiguous()
        else:
            seg = torch.zeros(1, dtype=torch.int32, device=q.device)
        _softmax_fwd[(triton.cdiv(T, rows), B * H)](s, p, pd, seg, seg.stride(0), H, T, sm_scale * LOG2E.value,
                                                    dropout_p, seed, BLOCK_T=bt, ROWS=rows, CAUSAL=causal,
                                                    HAS_SEG=segment_ids is not None, DROPOUT=drop, num_warps=w)
        del s
        o = torch.matmul(pd, v)
        ctx.save_for_backward(q, k, v, p, seed)
        ctx.args = (sm_scale, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, p, seed = ctx.saved_tensors
        sm_scale, dropout_p = ctx.args
        B, H, T, D = q.shape
        bt, rows, w = softmax_config(device_arch(q), T, q.dtype)["bwd"]
        dpd = torch.matmul(do.to(q.dtype), v.transpose(-2, -1)).contiguous()  # (B, H, T, T); becomes dS in place
        drop = dropout_p > 0.0
        pd = torch.empty_like(p) if drop else p
        _softmax_bwd[(triton.cdiv(T, rows), B * H)](p, dpd, pd, T, sm_scale, dropout_p, seed,
                                                    BLOCK_T=bt, ROWS=rows, DROPOUT=drop, num_warps=w)
        ds = dpd
        dq = torch.matmul(ds, k)
        dk = torch.matmul(ds.transpose(-2, -1), q)
        dv = torch.matmul(pd.transpose(-2, -1), do.to(q.dtype))
        return dq, dk, dv, None, None, None, None, None


def gemm_softmax_attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, dropout_seed=None):
    """softmax(q kᵀ·sm_scale + mask) with dropout, times v: cuBLAS GEMMs + Triton fused masked softmax.

    Same contract as `guppy.kernels.attention.attention` (shapes, dtypes, segment ids, dropout mask for a seed);
    T <= 8192. Returns (B, H, T, D) in q's dtype.
    """
    check_attention_inputs("gemm_softmax_attention", q, k, v, segment_ids, dropout_p)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    dropout_p = float(dropout_p)
    seed = dropout_seed_tensor(dropout_p, dropout_seed, q.device)
    return GemmSoftmaxAttention.apply(q, k, v, bool(causal), sm_scale, segment_ids, dropout_p, seed)
