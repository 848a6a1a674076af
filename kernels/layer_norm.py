"""LayerNorm over the last dimension, with an optional fused residual add. Spec: `guppy.reference.layer_norm_reference`.

What it computes
    Without residual:  y = (x - mean) * rstd * w + b
    With residual r:   h = x + r (stored, rounded to its dtype), y = (h - mean) * rstd * w + b; returns (y, h).
    mean = Σx/N, var = Σ(x - mean)²/N (biased), rstd = 1/sqrt(var + eps), all in fp32. The statistics are two-pass over
    the row held in registers (mean first, then the centred sum of squares), never E[x²] - E[x]², so a row with mean
    1e4 and spread 1 keeps its precision. mean and rstd (fp32, one per row) are saved for the backward.

Backward (per row; x̂ = (x - mean)·rstd, g = dy·w)
    y = x̂·w + b  and  x̂_j = (x_j - mean)·rstd, so
    dx = rstd · (g - mean(g) - x̂ · mean(g·x̂))        (c2 = mean(g), c1 = mean(g·x̂) in the code)
    dw = Σ_rows dy·x̂,  db = Σ_rows dy.
    With the residual the normalised input is h, and h is also an output: its own incoming gradient dh (the residual
    stream used later by the model) adds to the LayerNorm path, dh_total = dx + dh, and since h = x + r both x and r
    receive dh_total.
    dw/db: each backward program walks a grid-stride set of row blocks and keeps fp32 partial sums in registers, writes
    one (N,) row of partials per program, and torch sums the (G, N) partials afterwards: deterministic, no atomics,
    no locks.

Grid
    Forward: one program per BLOCK_M rows; a program holds a (BLOCK_M, BLOCK_N) tile in registers (BLOCK_N = next
    power of two ≥ N; BLOCK_M > 1 only for N < 2048 so that small rows still give each program ~2048 elements).
    Backward: G = min(#row blocks, 2·#SMs) persistent programs (4 in the interpreter), each looping over row blocks
    pid, pid+G, ... . `_config_for(N)` is the single place that picks BLOCK_M, BLOCK_N and the warps; `target_configs()`
    enumerates its whole range for `guppy targets`.

Dtypes and limits
    x, residual, weight, bias: fp32 / fp16 / bf16 (x and residual may differ: h takes the promoted dtype, y takes h's
    dtype, as on CUDA without autocast — under autocast F.layer_norm would return fp32, this kernel keeps h's dtype).
    weight / bias may be None. 1 ≤ N ≤ 8192. Any leading shape; rows need not be contiguous (row strides are passed),
    but the last dimension must have stride 1: a view whose last dim is strided (e.g. a transposed matrix) is copied
    with `.contiguous()` first. Outputs are contiguous. Pointer arithmetic on rows is int64.

Versions and what was tried: notes/layer_norm.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from guppy.kernels._utils import check_float_dtype, check_triton_device, distinct_configs, num_programs_cap

MAX_N = 8192
_OP = "guppy.kernels.layer_norm"


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(
    X,        # (M, N) input, row stride stride_x, unit column stride
    R,        # (M, N) residual, row stride stride_r (read only when HAS_RESIDUAL)
    H,        # (M, N) out, contiguous: h = x + r (written only when HAS_RESIDUAL)
    Y,        # (M, N) out, contiguous: normalised, scaled and shifted
    W,        # (N,) weight (read only when HAS_WEIGHT)
    B,        # (N,) bias (read only when HAS_BIAS)
    Mean,     # (M,) fp32 out
    Rstd,     # (M,) fp32 out
    stride_x, stride_r, M, N, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)          # the stored h is what the reference normalises
        tl.store(H + rows64[:, None] * N + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    # two passes over the registers: mean, then the centred second moment (no E[x²] - E[x]² cancellation)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,       # (M, N) grad of y, row stride stride_dy (read only when HAS_DY)
    DH,       # (M, N) grad of the h output, row stride stride_dh (read only when HAS_DH)
    X,        # (M, N) the normalised input (x, or h with a residual), row stride stride_x
    W,        # (N,) weight (read only when HAS_WEIGHT)
    Mean,     # (M,) fp32
    Rstd,     # (M,) fp32
    DX,       # (M, N) out, contiguous: grad of the normalised input (of x and of r with a residual)
    DW,       # (G, N) fp32 out: per-program partial Σ dy·x̂ (written only when HAS_WEIGHT)
    DB,       # (G, N) fp32 out: per-program partial Σ dy (written only when HAS_BIAS)
    stride_dy, stride_dh, stride_x, M, N,
    HAS_DY: tl.constexpr, HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_blocks = tl.cdiv(M, BLOCK_M)
    for blk in range(pid, n_blocks, n_progs):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        dx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_DY:
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(xhat * g, axis=1) / N        # mean(g·x̂)
            c2 = tl.sum(g, axis=1) / N               # mean(g)
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_WEIGHT:
                dw_acc += dy * xhat
            if HAS_BIAS:
                db_acc += dy
        if HAS_DH:
            dx += tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration: the one function the launchers and `guppy targets` share
# ----------------------------------------------------------------------------------------------------------------------
def _config_for(N: int) -> dict:
    """BLOCK_N = next_pow2(N) (≥ 16); BLOCK_M rows per program so a tile holds ≥ 2048 elements.

    Forward: 16 tile elements per thread. Backward keeps ~8 live fp32 tiles (x, dy, dh, x̂, g, dx and the dw/db
    accumulators), so it gets twice the warps up to 16 (8 elements per thread; on sm_75 the cross-compiled backward went
    from 124..247 registers per thread with the forward's warps to 64..128 with these).
    """
    if not 1 <= N <= MAX_N:
        raise ValueError(f"{_OP}: normalized dimension N={N} is outside 1..{MAX_N}")
    block_n = max(16, triton.next_power_of_2(N))
    block_m = max(1, 2048 // block_n)
    num_warps = max(4, block_m * block_n // 512)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, bwd_num_warps=min(16, 2 * num_warps),
                num_stages=1)


def reachable_configs() -> list[dict]:
    """Every configuration `_config_for` can return for N in 1..MAX_N (one per power of two)."""
    return distinct_configs(_config_for, (2 ** i for i in range(MAX_N.bit_length())))


_TYPES = dict.fromkeys(("X", "R", "H", "Y", "W", "B", "Mean", "Rstd", "DY", "DH", "DX", "DW", "DB"), "*fp32")
_TYPES["eps"] = "fp32"


def target_configs() -> list[dict]:
    """For `guppy targets`: both kernels at every reachable config, the widest variant (residual, weight, bias, dh).

    Pointers are typed fp32 (the reductions run in fp32 whatever the storage dtype; fp16/bf16 use the same tiles).
    """
    rows = []
    for cfg in reachable_configs():
        tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        common = dict(config=f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']}", types=_TYPES,
                      num_stages=cfg["num_stages"])
        rows.append(dict(kernel="layer_norm_fwd", fn=_layer_norm_fwd_kernel, num_warps=cfg["num_warps"],
                         constexprs=dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, **tiles), **common))
        rows.append(dict(kernel="layer_norm_bwd", fn=_layer_norm_bwd_kernel, num_warps=cfg["bwd_num_warps"],
                         constexprs=dict(HAS_DY=True, HAS_DH=True, HAS_WEIGHT=True, HAS_BIAS=True, **tiles), **common))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------
def _rows_view(t: torch.Tensor, N: int) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, N)
    if t2.stride(-1) != 1 and t2.shape[0] * N > 0:
        t2 = t2.contiguous()
    return t2


def _check_inputs(x, weight, bias, residual):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_OP}: x must be a tensor")
    check_triton_device(x, weight, bias, residual, op=_OP)
    check_float_dtype(x, op=_OP, name="x")
    if x.dim() == 0:
        raise ValueError(f"{_OP}: x must have at least one dimension")
    N = x.shape[-1]
    if not 1 <= N <= MAX_N:
        raise ValueError(f"{_OP}: normalized dimension N={N} is outside 1..{MAX_N} (x.shape={tuple(x.shape)})")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_float_dtype(p, op=_OP, name=name)
            if tuple(p.shape) != (N,):
                raise ValueError(f"{_OP}: {name} has shape {tuple(p.shape)}, expected ({N},)")
    if residual is not None:
        check_float_dtype(residual, op=_OP, name="residual")
        if residual.shape != x.shape:
            raise ValueError(f"{_OP}: residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
    return N


def layer_norm_forward(x, weight, bias, eps=1e-5, residual=None):
    """Returns (y, h or None, x2d_or_h2d for the backward, mean, rstd). y and h have x's shape."""
    N = _check_inputs(x, weight, bias, residual)
    x2 = _rows_view(x, N)
    M = x2.shape[0]
    has_res = residual is not None
    h_dtype = torch.promote_types(x.dtype, residual.dtype) if has_res else x.dtype
    y = torch.empty((M, N), dtype=h_dtype, device=x.device)
    h = torch.empty((M, N), dtype=h_dtype, device=x.device) if has_res else None
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    r2 = _rows_view(residual, N) if has_res else None
    if M > 0:
        cfg = _config_for(N)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
        _layer_norm_fwd_kernel[grid](
            x2, r2 if has_res else x2, h if has_res else y, y,
            weight if weight is not None else x2, bias if bias is not None else x2, mean, rstd,
            x2.stride(0), r2.stride(0) if has_res else 0, M, N, float(eps),
            HAS_RESIDUAL=has_res, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    y = y.view(x.shape)
    if has_res:
        h = h.view(x.shape)
    return y, h, (h.view(M, N) if has_res else x2), mean, rstd


def layer_norm_backward(dy, dh, xin, weight, bias, mean, rstd):
    """dy, dh: grads of y and h (either may be None), shaped like x. xin: (M, N) normalised input.

    Returns (d_input (M, N) in xin's dtype, dweight, dbias) — d_input is the gradient of x (and of the residual).
    """
    M, N = xin.shape
    device = xin.device
    dx = torch.empty((M, N), dtype=xin.dtype, device=device)
    has_dy, has_dh = dy is not None, dh is not None
    dy2 = _rows_view(dy, N) if has_dy else None
    dh2 = _rows_view(dh, N) if has_dh else None
    has_w = weight is not None and has_dy
    has_b = bias is not None and has_dy
    dw = db = None
    if M == 0 or not (has_dy or has_dh):
        dx.zero_()
        if weight is not None:
            dw = torch.zeros_like(weight)
        if bias is not None:
            db = torch.zeros_like(bias)
        return dx, dw, db
    cfg = _config_for(N)
    n_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    G = max(1, min(n_blocks, num_programs_cap(device)))
    dw_part = torch.empty((G, N), dtype=torch.float32, device=device) if has_w else None
    db_part = torch.empty((G, N), dtype=torch.float32, device=device) if has_b else None
    _layer_norm_bwd_kernel[(G,)](
        dy2 if has_dy else xin, dh2 if has_dh else xin, xin,
        weight if has_w else xin, mean, rstd, dx,
        dw_part if has_w else mean, db_part if has_b else mean,
        dy2.stride(0) if has_dy else 0, dh2.stride(0) if has_dh else 0, xin.stride(0), M, N,
        HAS_DY=has_dy, HAS_DH=has_dh, HAS_WEIGHT=has_w, HAS_BIAS=has_b,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["bwd_num_warps"], num_stages=cfg["num_stages"])
    if weight is not None:
        dw = dw_part.sum(0).to(weight.dtype) if has_w else torch.zeros_like(weight)
    if bias is not None:
        db = db_part.sum(0).to(bias.dtype) if has_b else torch.zeros_like(bias)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------------
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):
        y, h, xin, mean, rstd = layer_norm_forward(x, weight, bias, eps, residual)
        ctx.save_for_backward(xin, weight, bias, mean, rstd)
        ctx.shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.r_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        if residual is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        xin, weight, bias, mean, rstd = ctx.saved_tensors
        d, dw, db = layer_norm_backward(dy, dh, xin, weight, bias, mean, rstd)
        d = d.view(ctx.shape)
        dx = d.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dr = d.to(ctx.r_dtype) if ctx.r_dtype is not None and ctx.needs_input_grad[4] else None
        return (dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None, None, dr)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """F.layer_norm over the last dim; with `residual`, returns (layer_norm(x + residual), x + residual).

    Same signature and semantics as `guppy.reference.layer_norm_reference`; see the file header for dtypes and limits.
    """
    return LayerNormFunction.apply(x, weight, bias, eps, residual)
