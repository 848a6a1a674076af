"""FlashAttention-2 in Triton: forward and backward, causal, packed segments, in-kernel Philox dropout.

Computes `guppy.reference.attention_reference` (the specification) without ever building a (T, T) matrix:

    O = dropout(softmax(Q Kᵀ · sm_scale + mask)) V,      Q, K, V, O: (B, H, T, D)
    mask(i, j) = [j <= i if causal] and [seg[b, i] == seg[b, j] if segment_ids]

Forward: online softmax in base 2 (log2(e) folded into the scale, so every exponential is one `exp2`). With
s_ij = q_i·k_j · sm_scale · log2(e), K visited in blocks of BLOCK_N, and Z_ij = keep_ij / (1 − p_drop):

    m_i' = max(m_i, max_j s_ij),   α = 2^(m_i − m_i'),   p_ij = 2^(s_ij − m_i')
    l_i' = α · l_i + Σ_j p_ij      (dropout does NOT enter the softmax denominator)
    acc' = α · acc + (p ∘ Z) V,    O_i = acc_i / l_i,    LSE_i = ln(l_i) + m_i · ln 2  (saved, fp32)

Backward, with P = exp(S·sm_scale − LSE) recomputed from the saved LSE and Pd = P ∘ Z:

    delta_i = Σ_d O_id · dO_id  (= Σ_j Pd_ij · dPd_ij),   dV = Pdᵀ dO,   dP = (dO Vᵀ) ∘ Z,
    dS = P ∘ (dP − delta),   dQ = dS K · sm_scale,   dK = dSᵀ Q · sm_scale

Grid (one program owns its output rows: no atomics, deterministic):
    _attn_fwd               (T / BLOCK_M, B·H)   a Q block, looping over K blocks (causal: unmasked, then diagonal)
    _attn_bwd_preprocess    (T / BLOCK_M, B·H)   delta
    _attn_bwd_dkdv          (T / BLOCK_N, B·H)   a K block, looping over Q blocks
    _attn_bwd_dq            (T / BLOCK_M, B·H)   a Q block, looping over K blocks
`attention_config(arch, head_dim, dtype)` is the one place that picks tiles, warps and stages; the launchers call it
and `target_configs()` enumerates everything it can return for `guppy targets`. arch 0 = the CPU interpreter (small
blocks, so that the tests cross block boundaries, both causal stages and the segment skip).
Segments: a K block whose [min, max] id range misses the Q block's is skipped (exact for any ids; it skips much only
for the non-decreasing ids that packing produces). Dropout: `_utils.dropout_keep`, Philox on (seed, b·H + h, i, j),
regenerated where used (`dropout_mask` materialises it for tests); the seed is read from a (1,) device tensor, so a
captured CUDA graph draws a fresh mask per replay. Nothing of size T² is stored.

Dtypes and limits: q, k, v of one shape (B, H, T, D), Tq == Tk (the model decodes with the reference); fp16 / bf16 /
fp32 (fp32 dots use input_precision="ieee", not tf32: fp32 is the exact test dtype, not the fast one); 16 <= D <= 128
(BLOCK_D = next_pow2(D), lanes masked); strided inputs with unit stride in D (other views are copied once); segment
ids (B, T) of any integer dtype; dropout_p in [0, 1); B·H < 65536 (grid axis 1); T < 2³² (32-bit Philox counters).
Masked scores are −inf and the running max starts at −1e30, so a row that has seen only masked keys so far keeps
p = 0, α = 1 and no NaN; out-of-range rows, keys and head-dim lanes load as 0 and are never stored.

On sm_75 with triton >= 3.4 tl.dot lowers to fp32 FMA (notes/gpu-facts.md): no tensor cores on a T4. The candidates
for a T4, their projection, versions and the cross-compile table: notes/attention.md.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from guppy.kernels._utils import (LOG2E, arch_class, check_attention_inputs, check_triton_device, device_arch,
                                  dropout_keep)
from guppy.seeds import dropout_seed_tensor

LN2 = tl.constexpr(0.6931471805599453)
NEG_INIT = tl.constexpr(-1.0e30)   # initial running max: finite, so rows fully masked so far give α = 1, p = 0, no NaN


# ====================================================================================================================
# Dropout: the keep mask materialised, for tests (the kernels evaluate `dropout_keep` where they use it)
# ====================================================================================================================
@triton.jit
def _dropout_mask_kernel(OUT,                    # (B·H, T, T) int8 keep mask, contiguous
                         T, SEED, dropout_p,      # SEED: (1,) int64
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seed = tl.load(SEED)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out = OUT + bh.to(tl.int64) * T * T
    for start_n in range(0, T, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
        msk = (offs_m[:, None] < T) & (offs_n[None, :] < T)
        tl.store(out + offs_m[:, None] * T + offs_n[None, :], keep.to(tl.int8), mask=msk)


def dropout_mask(seed, B: int, H: int, T: int, p: float, device) -> torch.Tensor:
    """The bool keep-mask (B, H, T, T) that `attention(..., dropout_p=p, dropout_seed=seed)` applies (for tests)."""
    out = torch.empty((B, H, T, T), dtype=torch.int8, device=device)
    check_triton_device(out, op="dropout_mask")
    BM, BN = 32, 64
    _dropout_mask_kernel[(triton.cdiv(T, BM), B * H)](out, T, dropout_seed_tensor(p, seed, device), float(p),
                                                      BLOCK_M=BM, BLOCK_N=BN)
    return out.bool()


# ====================================================================================================================
# Forward
# ====================================================================================================================
# Segments: the ranges are computed on the fly from the loaded ids. No overlap of the Q block's and the K block's
# [min, max] ranges implies no equal pair, so the skip is exact for any ids; ids are neither required to be sorted nor
# validated (unsorted ids are correct, just not faster).
@triton.jit
def _seg_range(seg_ptr, offs, T):
    """(min, max) of the segment ids at the valid positions of `offs` (positions >= T excluded)."""
    valid = offs < T
    s = tl.load(seg_ptr + offs, mask=valid, other=0)
    lo = tl.min(tl.where(valid, s, 2147483647), axis=0)
    hi = tl.max(tl.where(valid, s, -2147483647), axis=0)
    return s, lo, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, q_seg, q_lo, q_hi,
               k_base, v_base, stride_kt, stride_vt, seg_base,
               offs_m, offs_d, lo, hi, T, qk_scale, dropout_p, seed, bh,
               HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Visit K blocks [lo, hi): MASKED adds j < T and (causal) j <= i; HAS_SEG adds the segment test + block skip."""
    d_ok = offs_d < HEAD_D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if HAS_SEG:
            k_seg, k_lo, k_hi = _seg_range(seg_base, offs_n, T)
            run = (k_hi >= q_lo) & (k_lo <= q_hi)
        else:
            run = True
        if run:
            n_ok = offs_n < T
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],            # (BLOCK_D, BLOCK_N)
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale                             # base-2 scores
            if MASKED:
                ok = n_ok[None, :]
                if CAUSAL:
                    ok = ok & (offs_m[:, None] >= offs_n[None, :])
                if HAS_SEG:
                    ok = ok & (q_seg[:, None] == k_seg[None, :])
                s = tl.where(ok, s, float("-inf"))
            elif HAS_SEG:
                s = tl.where(q_seg[:, None] == k_seg[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                p = tl.where(dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p), p, 0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],                # (BLOCK_N, BLOCK_D)
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
    return acc, l_i, m_i


# One program per (Q block, b·h). Causal programs run two stages: the K blocks left of the diagonal block,
# [0, start_m), with no mask arithmetic at all, then the diagonal K blocks [start_m, start_m + BLOCK_M) with j <= i
# (BLOCK_M % BLOCK_N == 0). Non-causal programs run the full K blocks unmasked and only the tail block masked (j < T).
# Every valid row (i < T) attends at least to itself, so l_i > 0 where it is stored.
@triton.jit
def _attn_fwd(Q, K, V,                # (B, H, T, D) strided views, unit stride in D
              O,                      # (B, H, T, D) contiguous, output
              LSE,                    # (B·H, T) fp32, output: natural-log log-sum-exp of the scaled scores
              SEG,                    # (B, T) int32 segment ids (dummy when HAS_SEG is False)
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_sb,
              H, T, qk_scale, dropout_p, SEED,    # SEED: (1,) int64, the dropout seed in device memory
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    seed = tl.load(SEED)   # read from memory, not baked into the launch: a CUDA graph replays with fresh seeds
    b, h = bh // H, bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    m_ok = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)                    # (BLOCK_M, BLOCK_D)
    seg_base = SEG + b.to(tl.int64) * stride_sb
    if HAS_SEG:
        q_seg, q_lo, q_hi = _seg_range(seg_base, offs_m, T)
    else:
        q_seg, q_lo, q_hi = offs_m, 0, 0                                                      # unused
    m_i = tl.full([BLOCK_M], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        # stage 1: K blocks strictly left of the diagonal block, every (i, j) has j < i: no mask arithmetic
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_seg, q_lo, q_hi, k_base, v_base, stride_kt, stride_vt,
                                   seg_base, offs_m, offs_d, 0, start_m, T, qk_scale, dropout_p, seed, bh,
                                   HEAD_D, BLOCK_N, False, CAUSAL, HAS_SEG, DROPOUT, DOT_PREC)
        # stage 2: the diagonal block(s), j <= i and j < T
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_seg, q_lo, q_hi, k_base, v_base, stride_kt, stride_vt,
                                   seg_base, offs_m, offs_d, start_m, tl.minimum(start_m + BLOCK_M, T), T,
                                   qk_scale, dropout_p, seed, bh,
                                   HEAD_D, BLOCK_N, True, CAUSAL, HAS_SEG, DROPOUT, DOT_PREC)
    else:
        t_full = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_seg, q_lo, q_hi, k_base, v_base, stride_kt, stride_vt,
                                   seg_base, offs_m, offs_d, 0, t_full, T, qk_scale, dropout_p, seed, bh,
                                   HEAD_D, BLOCK_N, False, CAUSAL, HAS_SEG, DROPOUT, DOT_PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_seg, q_lo, q_hi, k_base, v_base, stride_kt, stride_vt,
                                   seg_base, offs_m, offs_d, t_full, T, T, qk_scale, dropout_p, seed, bh,
                                   HEAD_D, BLOCK_N, True, CAUSAL, HAS_SEG, DROPOUT, DOT_PREC)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)        # only tail rows (i >= T, never stored) can have l = 0
    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D))


# ====================================================================================================================
# Backward
# ====================================================================================================================
@triton.jit
def _attn_bwd_preprocess(O,           # (B, H, T, D) contiguous forward output
                         DO,          # (B, H, T, D) strided upstream gradient, unit stride in D
                         DELTA,       # (B·H, T) fp32, output: rowsum(O ∘ dO)
                         stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                         H, T, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_ot
                + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, k_seg, offs_n, offs_d,
                q_base, do_base, lse_base, delta_base, seg_base, stride_qt, stride_dot,
                lo, hi, T, k_lo, k_hi, qk_scale, dropout_p, seed, bh,
                HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one K block over the Q blocks [lo, hi). Transposed tiles: rows = keys, cols = queries."""
    d_ok = offs_d < HEAD_D
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if HAS_SEG:
            q_seg, q_lo, q_hi = _seg_range(seg_base, offs_m, T)
            run = (k_hi >= q_lo) & (k_lo <= q_hi)
        else:
            run = True
        if run:
            m_ok = offs_m < T
            qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None],              # (BLOCK_D, BLOCK_M)
                         mask=m_ok[None, :] & d_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * LOG2E                    # base 2
            sT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale                           # (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(sT - lse[None, :])
            if MASKED:                                                                        # causal diagonal
                pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
            if HAS_SEG:
                pT = tl.where(k_seg[:, None] == q_seg[None, :], pT, 0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :],             # (BLOCK_M, BLOCK_D)
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if DROPOUT:
                zT = tl.where(dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], dropout_p),
                              1.0 / (1.0 - dropout_p), 0.0)
                pdT = pT * zT
            else:
                pdT = pT
            dv += tl.dot(pdT.to(do.dtype), do, input_precision=DOT_PREC)                       # dV += Pdᵀ dO
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                           # (dO Vᵀ)ᵀ
            if DROPOUT:
                dpT = dpT * zT
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)             # dK += dSᵀ Q
    return dk, dv


# One program per (K block of BLOCK_N, b·h), looping over Q blocks of BLOCK_M (causal: from the diagonal down, the
# first BLOCK_N / BLOCK_M of them masked). The unmasked stages rely on the zero-filled tails: a zero q or dO row (lse
# and delta loaded as 0) adds exactly 0 to every dK / dV product.
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO,        # (B, H, T, D) strided, unit stride in D
                   DK, DV,            # (B, H, T, D) contiguous, outputs
                   LSE, DELTA,        # (B·H, T) fp32
                   SEG,               # (B, T) int32 (dummy when HAS_SEG is False)
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_gb, stride_gh, stride_gt, stride_sb,
                   H, T, sm_scale, qk_scale, dropout_p, SEED,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    seed = tl.load(SEED)   # read from memory, not baked into the launch: a CUDA graph replays with fresh seeds
    b, h = bh // H, bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_msk = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_D)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kt
                + offs_d[None, :], mask=kv_msk, other=0.0)                                   # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :], mask=kv_msk, other=0.0)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T
    seg_base = SEG + b.to(tl.int64) * stride_sb
    if HAS_SEG:
        k_seg, k_lo, k_hi = _seg_range(seg_base, offs_n, T)
    else:
        k_seg, k_lo, k_hi = offs_n, 0, 0                                                      # unused
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        # the Q blocks that cross the diagonal: masked; every later Q block sees the whole K block: unmasked
        dk, dv = _dkdv_inner(dk, dv, k, v, k_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, seg_base,
                             stride_qt, stride_dot, start_n, tl.minimum(start_n + BLOCK_N, T), T, k_lo, k_hi,
                             qk_scale, dropout_p, seed, bh, HEAD_D, BLOCK_M, True, HAS_SEG, DROPOUT, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, k_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, seg_base,
                             stride_qt, stride_dot, start_n + BLOCK_N, T, T, k_lo, k_hi,
                             qk_scale, dropout_p, seed, bh, HEAD_D, BLOCK_M, False, HAS_SEG, DROPOUT, DOT_PREC)
    else:  # tail Q rows load as zeros and contribute exactly 0 (see the header), so no stage needs a mask
        dk, dv = _dkdv_inner(dk, dv, k, v, k_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, seg_base,
                             stride_qt, stride_dot, 0, T, T, k_lo, k_hi,
                             qk_scale, dropout_p, seed, bh, HEAD_D, BLOCK_M, False, HAS_SEG, DROPOUT, DOT_PREC)
    g_off = b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_msk)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=kv_msk)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, q_seg, q_lo, q_hi, offs_m, offs_d,
              k_base, v_base, seg_base, stride_kt, stride_vt,
              lo, hi, T, qk_scale, dropout_p, seed, bh,
              HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of one Q block over the K blocks [lo, hi)."""
    d_ok = offs_d < HEAD_D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if HAS_SEG:
            k_seg, k_lo, k_hi = _seg_range(seg_base, offs_n, T)
            run = (k_hi >= q_lo) & (k_lo <= q_hi)
        else:
            run = True
        if run:
            n_ok = offs_n < T
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],              # (BLOCK_D, BLOCK_N)
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if MASKED:
                p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            if HAS_SEG:
                p = tl.where(q_seg[:, None] == k_seg[None, :], p, 0.0)
            dp = tl.dot(do, vT, input_precision=DOT_PREC)                                     # dO Vᵀ
            if DROPOUT:
                dp = tl.where(dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p),
                              dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)              # dQ += dS K
    return dq


# One program per (Q block of BLOCK_M, b·h), looping over K blocks of BLOCK_N (causal: the off-diagonal ones
# unmasked, then the diagonal ones masked); zero k / v tail rows add exactly 0 to dQ.
@triton.jit
def _attn_bwd_dq(Q, K, V, DO,          # (B, H, T, D) strided, unit stride in D
                 DQ,                  # (B, H, T, D) contiguous, output
                 LSE, DELTA,          # (B·H, T) fp32
                 SEG,                 # (B, T) int32 (dummy when HAS_SEG is False)
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_gb, stride_gh, stride_gt, stride_sb,
                 H, T, sm_scale, qk_scale, dropout_p, SEED,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    seed = tl.load(SEED)   # read from memory, not baked into the launch: a CUDA graph replays with fresh seeds
    b, h = bh // H, bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    msk = m_ok[:, None] & (offs_d[None, :] < HEAD_D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=msk, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    seg_base = SEG + b.to(tl.int64) * stride_sb
    if HAS_SEG:
        q_seg, q_lo, q_hi = _seg_range(seg_base, offs_m, T)
    else:
        q_seg, q_lo, q_hi = offs_m, 0, 0                                                      # unused
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse, delta, q_seg, q_lo, q_hi, offs_m, offs_d, k_base, v_base, seg_base,
                       stride_kt, stride_vt, 0, start_m, T, qk_scale, dropout_p, seed, bh,
                       HEAD_D, BLOCK_N, False, HAS_SEG, DROPOUT, DOT_PREC)
        dq = _dq_inner(dq, q, do, lse, delta, q_seg, q_lo, q_hi, offs_m, offs_d, k_base, v_base, seg_base,
                       stride_kt, stride_vt, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, dropout_p,
                       seed, bh, HEAD_D, BLOCK_N, True, HAS_SEG, DROPOUT, DOT_PREC)
    else:  # tail keys load as zeros: their p may be nonzero but dS·K adds 0 (k = 0), so no mask is needed
        dq = _dq_inner(dq, q, do, lse, delta, q_seg, q_lo, q_hi, offs_m, offs_d, k_base, v_base, seg_base,
                       stride_kt, stride_vt, 0, T, T, qk_scale, dropout_p, seed, bh,
                       HEAD_D, BLOCK_N, False, HAS_SEG, DROPOUT, DOT_PREC)
    tl.store(DQ + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + offs_m[:, None] * stride_gt
             + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=msk)


# ====================================================================================================================
# Configuration: the one function that picks tiles, and the table built from it
# ====================================================================================================================
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def attention_config(arch: int, head_dim: int, dtype) -> dict:
    """Tiles, warps and stages for every kernel of this file, per (arch = 10·major + minor, head_dim, dtype).

    Returns {"fwd": (BLOCK_M, BLOCK_N, num_warps, num_stages), "bwd_dkdv": (...), "bwd_dq": (...),
    "bwd_pre": (BLOCK_M, num_warps)}. The only source of launch parameters (launchers and `target_configs` use it).
    Shared memory (cross-compiled, notes/attention.md): sm_75 configs fit 64 KB, 8.x configs fit 99 KB (sm_86/89
    limit, below sm_80's 163 KB), sm_90 fits 227 KB.
    """
    name = _DTYPES[dtype] if not isinstance(dtype, str) else dtype
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = name == "fp32"                     # fp32 tiles: twice the bytes per operand in shared memory
    cls = arch_class(arch)
    if cls == 0:   # interpreter: small tiles so the tests cross block boundaries; warps/stages are ignored there
        return {"fwd": (32, 16, 1, 1), "bwd_dkdv": (16, 32, 1, 1), "bwd_dq": (32, 16, 1, 1), "bwd_pre": (32, 1)}
    if cls == 75:  # FMA dots (triton >= 3.4): no pipelining on sm_75, so stages = 1; 4 warps, 64-row Q tiles
        bn = 32 if (block_d >= 128 or wide) else 64
        if block_d >= 128:  # FMA dots stage both operands in shared memory: 32x64 tiles need 82 KB (fp16) at D=128
            return {"fwd": (64, bn, 4, 1), "bwd_dkdv": (16, 32, 4, 1), "bwd_dq": (32, 16, 4, 1), "bwd_pre": (64, 4)}
        return {"fwd": (64, bn, 4, 1), "bwd_dkdv": (32, 64, 4, 1), "bwd_dq": (64, 32, 4, 1), "bwd_pre": (64, 4)}
    if cls == 80:
        if wide:  # fp32 D=128 backward at 32x64 needs 106 KB (> sm_86/89's 99 KB): 16x32 / 32x16 there
            small = block_d >= 128
            return {"fwd": (64, 32, 4, 2), "bwd_dkdv": (16, 32, 4, 2) if small else (32, 64, 4, 2),
                    "bwd_dq": (32, 16, 4, 2) if small else (64, 32, 4, 2), "bwd_pre": (64, 4)}
        warps = 8 if block_d >= 128 else 4
        return {"fwd": (128, 64 if block_d <= 64 else 32, warps, 3), "bwd_dkdv": (32, 128 if block_d <= 64 else 64,
                                                                                  warps, 2),
                "bwd_dq": (128 if block_d <= 64 else 64, 32, warps, 2), "bwd_pre": (128, 4)}
    # cls == 90
    if wide:
        return {"fwd": (64, 64, 4, 2), "bwd_dkdv": (32, 64, 4, 2), "bwd_dq": (64, 32, 4, 2), "bwd_pre": (64, 4)}
    warps = 8 if block_d >= 128 else 4
    return {"fwd": (128, 64, warps, 3), "bwd_dkdv": (32, 128, warps, 3), "bwd_dq": (128, 32, warps, 3),
            "bwd_pre": (128, 4)}


def _dot_precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 or dtype == "fp32" else "tf32"   # (tf32 is ignored for fp16/bf16 dots)


_TARGET_DTYPES = {75: ("fp16", "fp32"), 80: ("fp16", "bf16", "fp32"), 90: ("fp16", "bf16", "fp32")}


def _types(dtype: str) -> dict:
    """Triton types of the pointer and float arguments of this file's kernels, for tensors of `dtype`."""
    types = dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"), f"*{dtype}")
    return dict(types, LSE="*fp32", DELTA="*fp32", SEG="*i32", SEED="*i64", qk_scale="fp32", sm_scale="fp32",
                dropout_p="fp32")


def target_configs() -> list[dict]:
    """Every (kernel, tiles, warps, stages, dtype, BLOCK_D) that `attention_config` can hand a launcher on each of
    sm_75/80/90, one entry per arch. Specialisation shown: causal, dropout on, no segments, the variant with the most
    shared memory (with segments the block-skip branch stops the sm_80+ pipeliner, so shared memory drops).

    expect_tensor_cores: fp16/bf16 dots use mma.sync (sm_80) / wgmma (sm_90); sm_75 with triton >= 3.4 lowers
    tl.dot to FMA (False); fp32 dots use input_precision="ieee" on every arch (False, deliberately: exact parity).
    """
    entries = []
    for arch, dtypes in _TARGET_DTYPES.items():
        for dt in dtypes:
            for block_d in (16, 32, 64, 128):
                cfg = attention_config(arch, block_d, dt)
                tc = dt != "fp32" and arch >= 80
                flags = dict(HEAD_D=block_d, BLOCK_D=block_d, CAUSAL=True, HAS_SEG=False, DROPOUT=True,
                             DOT_PREC=_dot_precision(dt))
                for kname, fn, key in (("attention_fwd", _attn_fwd, "fwd"), ("attention_bwd_dkdv", _attn_bwd_dkdv,
                                       "bwd_dkdv"), ("attention_bwd_dq", _attn_bwd_dq, "bwd_dq")):
                    bm, bn, w, st = cfg[key]
                    entries.append(dict(kernel=f"{kname} {dt} D{block_d} {bm}x{bn}", fn=fn, types=_types(dt),
                                        constexprs=dict(flags, BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st,
                                        archs=(arch,), expect_tensor_cores=tc))
                pm, pw = cfg["bwd_pre"]
                entries.append(dict(kernel=f"attention_bwd_pre {dt} D{block_d} {pm}", fn=_attn_bwd_preprocess,
                                    types=_types(dt), constexprs=dict(HEAD_D=block_d, BLOCK_D=block_d, BLOCK_M=pm),
                                    num_warps=pw, num_stages=1, archs=(arch,)))
    return entries


# ====================================================================================================================
# Launchers and autograd
# ====================================================================================================================
def _unit_d(t: torch.Tensor) -> torch.Tensor:
    """Keep any strided view whose last dimension is dense (the model's permuted qkv views); copy anything else."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _seg_arg(segment_ids, q):
    if segment_ids is None:
        return torch.zeros(1, dtype=torch.int32, device=q.device), 0, False
    seg = segment_ids.to(torch.int32).contiguous()
    return seg, seg.stride(0), True


def attention_forward(q, k, v, causal, sm_scale, seg, stride_sb, has_seg, dropout_p, seed):
    """Launch the forward. Returns o (B, H, T, D) contiguous and lse (B, H, T) fp32 (natural log)."""
    B, H, T, D = q.shape
    cfg = attention_config(device_arch(q), D, q.dtype)
    BM, BN, warps, stages = cfg["fwd"]
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _attn_fwd[(triton.cdiv(T, BM), B * H)](
        q, k, v, o, lse, seg, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], stride_sb,
        H, T, sm_scale * LOG2E.value, dropout_p, seed,
        HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal,
        HAS_SEG=has_seg, DROPOUT=dropout_p > 0.0, DOT_PREC=_dot_precision(q.dtype), num_warps=warps,
        num_stages=stages)
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal, sm_scale, seg, stride_sb, has_seg, dropout_p, seed):
    """Launch preprocess, dK/dV and dQ. Returns dq, dk, dv (B, H, T, D) contiguous, in q's dtype."""
    B, H, T, D = q.shape
    cfg = attention_config(device_arch(q), D, q.dtype)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    do = _unit_d(do)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    pm, pw = cfg["bwd_pre"]
    _attn_bwd_preprocess[(triton.cdiv(T, pm), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
                                                      HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_M=pm, num_warps=pw)
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], stride_sb)
    flags = dict(HEAD_D=D, BLOCK_D=BLOCK_D, CAUSAL=causal, HAS_SEG=has_seg, DROPOUT=dropout_p > 0.0,
                 DOT_PREC=_dot_precision(q.dtype))
    BM1, BN1, w1, s1 = cfg["bwd_dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(T, BN1), B * H)](q, k, v, do, dk, dv, lse, delta, seg, *strides, H, T, sm_scale,
                                                 sm_scale * LOG2E.value, dropout_p, seed, BLOCK_M=BM1, BLOCK_N=BN1,
                                                 num_warps=w1, num_stages=s1, **flags)
    BM2, BN2, w2, s2 = cfg["bwd_dq"]
    _attn_bwd_dq[(triton.cdiv(T, BM2), B * H)](q, k, v, do, dq, lse, delta, seg, *strides, H, T, sm_scale,
                                               sm_scale * LOG2E.value, dropout_p, seed, BLOCK_M=BM2, BLOCK_N=BN2,
                                               num_warps=w2, num_stages=s2, **flags)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, segment_ids, dropout_p, seed):
        seg, stride_sb, has_seg = _seg_arg(segment_ids, q)
        o, lse = attention_forward(q, k, v, causal, sm_scale, seg, stride_sb, has_seg, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, seg, seed)
        ctx.args = (causal, sm_scale, stride_sb, has_seg, dropout_p)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg, seed = ctx.saved_tensors
        causal, sm_scale, stride_sb, has_seg, dropout_p = ctx.args
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, causal, sm_scale, seg, stride_sb, has_seg,
                                        dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, dropout_seed=None):
    """FlashAttention-2: softmax(q kᵀ·sm_scale + mask) with dropout on the probabilities, times v.

    q, k, v: (B, H, T, D), fp16/bf16/fp32, 16 <= D <= 128, any strides with a dense last dim (others are copied).
    segment_ids: optional (B, T) integer ids; i attends to j only within one id. dropout_p: probability of dropping
    an attention weight; the mask is Philox(dropout_seed, b, h, i, j) (`dropout_mask` regenerates it). dropout_seed
    None: drawn on q's device by torch's generator (see `dropout_seed_tensor`); an int or a (1,) tensor otherwise.
    Returns (B, H, T, D) contiguous, in q's dtype.
    """
    check_attention_inputs("attention", q, k, v, segment_ids, dropout_p)
    D = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    dropout_p = float(dropout_p)
    seed = dropout_seed_tensor(dropout_p, dropout_seed, q.device)
    return FlashAttention.apply(_unit_d(q), _unit_d(k), _unit_d(v), bool(causal), sm_scale, segment_ids,
                                dropout_p, seed)


# Which attention runs on which GPU is decided in one place: guppy.ops.choose_attention.
