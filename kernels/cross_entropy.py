"""Cross-entropy over a vocabulary, and the LM head fused with it. Specs: `guppy.reference.cross_entropy_reference` and
`guppy.reference.linear_cross_entropy_reference`.

What it computes (per row i with target t ≠ ignore_index; z = logits_i, V classes, smoothing ε)
    lse  = log Σ_j exp(z_j)
    loss = (1-ε)·(lse - z_t) + ε·(lse - Σ_j z_j / V)          (ε = 0: lse - z_t)
    d loss / d z_j = softmax(z)_j - (1-ε)·[j = t] - ε/V          (target distribution (1-ε)·onehot + ε/V)
    "mean" divides by the number of counted rows n (NaN when n = 0), "sum" adds, "none" keeps (N,) with 0 on
    ignored rows. Ignored rows have zero loss and zero gradient. Math in fp32 whatever the logits dtype.
    A target outside [0, V) that is not ignore_index gives a NaN loss for that row (torch raises; a kernel cannot
    without a host sync), and no out-of-bounds read.

The gradient is written during the forward pass
    One program per row. Pass 1 streams the row in BLOCK_V chunks with the online softmax: running max m and running
    sum d of exp(z - m), rescaled by exp(m_old - m_new) when the max grows, so one read of the row gives lse = m + log d
    (plus Σz for smoothing and z_t by a direct load). Pass 2 re-reads the row and writes (softmax - target)·s_fwd into
    the gradient buffer, rounded to the logits dtype. The backward multiplies it by grad_output·s_bwd in fp32 (one
    factor, or one per row for "none") and rounds once more. s_fwd·s_bwd = 1/n for "mean" (n counted rows, a device
    tensor: no host sync), else 1, split by `_grad_scales`: s_fwd = (significand of 1/n, in [1, 2))·2^14 and s_bwd a
    power of two. For a power-of-two grad_output (1, every GradScaler scale) the backward's multiply is then exact and
    the gradient is (softmax - target)·grad_output/n rounded once, as in the reference path; any other grad_output
    adds a second rounding. The 2^14 keeps |stored| < 2^15 (fp16's max is 65504) and entries down to 6e-5 / 2^14 =
    4e-9 out of fp16's subnormals, where no loss scale arriving later could restore their bits. The buffer is a fresh
    tensor by default; with `inplace_grad=True` it is the logits buffer itself (the caller promises the logits are
    dead after this call) and the backward scales it in place. `linear_cross_entropy` runs the same kernel on its own
    per-chunk logits with s_fwd = 1.
    Row offsets are int64: row·stride is 2.6e8 elements at 8192 × 32000 (inside int32, but only 8x away) and passes
    2^31 elements at e.g. 16384 × 131072; int64 pointer math costs nothing measurable next to the row's exp()s.

linear_cross_entropy(hidden (N, C), weight (V, C), target (N,)) = cross_entropy(hidden @ weightᵀ, target)
    Chunks of tokens: for each chunk, logits_c = hidden_c @ weightᵀ (torch.matmul, i.e. cuBLAS and its tensor cores),
    the kernel above writes dlogits_c into logits_c, then grad_hidden_c = dlogits_c @ weight and
    grad_weight += dlogits_cᵀ @ hidden_c (fp32 accumulator), all inside the forward. The (N × V) logits never exist:
    only one (chunk × V) buffer, reused. dlogits are stored unscaled (the gradient of the sum), so fp16 ones stay out
    of subnormals; backward scales grad_hidden and grad_weight by grad_output (times 1/n for "mean") in fp32. For
    reduction="none" (one grad_output per row) the backward recomputes the chunks with the rows scaled instead.
    Autocast: under torch.autocast the matmuls run in the autocast dtype (weight cast once per call); grad_weight is
    accumulated in fp32 and returned in weight's dtype, grad_hidden in hidden's dtype. Default chunk: the power of two
    near N / ceil(V / C), so a chunk of logits holds about as many elements as hidden.

Memory of the LM head + loss: `lm_head_memory_bytes` computes it; worked figures in notes/cross_entropy.md.

Grid and limits
    cross-entropy: grid (N,), one row per program, looping over V in BLOCK_V chunks; `_config_for(V)` picks BLOCK_V
    (next power of two, clamped to 128..4096) and num_warps (BLOCK_V/512, at least 1), and `target_configs()`
    enumerates that same range. Any V ≥ 1 (4097, 32003, ... are fine: the last chunk is masked). logits fp32 / fp16 /
    bf16, rows may be strided (unit column stride; otherwise copied). target int32 or int64.

Versions and what was tried: notes/cross_entropy.md.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from guppy.kernels._utils import check_float_dtype, check_triton_device, distinct_configs

_OP = "guppy.kernels.cross_entropy"
_OP_LINEAR = "guppy.kernels.linear_cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _cross_entropy_fwd_kernel(
    Logits,   # (n_rows, V) row stride stride_l, unit column stride; read
    Grad,     # (n_rows, V) row stride stride_g: out d loss/d logits · Scale (may alias Logits; only if COMPUTE_GRAD)
    Target,   # (n_rows,) int32 / int64 class ids, ignore_index on rows without a loss
    Loss,     # (n_rows,) fp32 out: per-row loss, 0 on ignored rows
    Scale,    # (1,) fp32: factor folded into the gradient before its rounding (s_fwd of `_grad_scales`, or 1)
    stride_l, stride_g, V, ignore_index, label_smoothing,
    COMPUTE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    l_row = Logits + row * stride_l
    g_row = Grad + row * stride_g
    t = tl.load(Target + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    if t != ignore_index:
        # pass 1: online softmax. m: running max, d: Σ exp(z - m); when the max grows, d is rescaled by exp(m_old - m)
        m = tl.full((), float("-inf"), tl.float32)
        d = tl.zeros((), dtype=tl.float32)
        zsum = tl.zeros((), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            ok = cols < V
            z = tl.load(l_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                zsum += tl.sum(tl.where(ok, z, 0.0), axis=0)
        lse = m + tl.log(d)
        in_range = (t >= 0) & (t < V)
        z_t = tl.load(l_row + tl.where(in_range, t, 0)).to(tl.float32)
        loss = lse - z_t
        if HAS_SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - zsum / V)
        loss = tl.where(in_range, loss, float("nan"))
        tl.store(Loss + row, loss)
        if COMPUTE_GRAD:
            # pass 2: (softmax - (1-ε)·onehot - ε/V) · scale, written over the same columns just read
            scale = tl.load(Scale)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                ok = cols < V
                z = tl.load(l_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
                g = tl.exp(z - lse)                         # masked lanes: exp(-inf) = 0, never exp(+large)
                if HAS_SMOOTHING:
                    g = g - label_smoothing / V
                g = tl.where(cols == t, g - (1.0 - label_smoothing), g)
                tl.store(g_row + cols, (g * scale).to(Grad.dtype.element_ty), mask=ok)
    else:
        tl.store(Loss + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=Grad.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------------------------------------------------
# Launch configuration: the one function the launcher and `guppy targets` share
# ----------------------------------------------------------------------------------------------------------------------
MIN_BLOCK_V, MAX_BLOCK_V = 128, 4096


def _config_for(V: int) -> dict:
    if V < 1:
        raise ValueError(f"{_OP}: vocabulary size V={V} must be ≥ 1")
    block_v = min(MAX_BLOCK_V, max(MIN_BLOCK_V, triton.next_power_of_2(V)))
    return dict(BLOCK_V=block_v, num_warps=max(1, block_v // 512), num_stages=1)


def reachable_configs() -> list[dict]:
    return distinct_configs(_config_for, (2 ** i for i in range((2 * MAX_BLOCK_V).bit_length())))


_TYPES = {"Logits": "*fp32", "Grad": "*fp32", "Target": "*i64", "Loss": "*fp32", "Scale": "*fp32", "stride_l": "i64",
          "stride_g": "i64", "label_smoothing": "fp32"}


def target_configs() -> list[dict]:
    """For `guppy targets`: the kernel at every reachable BLOCK_V, widest variant (gradient and smoothing on)."""
    return [dict(kernel="cross_entropy_fwd", config=f"BLOCK_V={cfg['BLOCK_V']}", fn=_cross_entropy_fwd_kernel,
                 types=_TYPES, constexprs=dict(COMPUTE_GRAD=True, HAS_SMOOTHING=True, BLOCK_V=cfg["BLOCK_V"]),
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]) for cfg in reachable_configs()]


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------
def _check_ce_args(op, target, n_rows, reduction, label_smoothing):
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"{op}: target must be an int64 or int32 tensor, got {got}")
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(f"{op}: target has shape {tuple(target.shape)}, expected ({n_rows},)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r}; choose one of {', '.join(_REDUCTIONS)}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: label_smoothing={label_smoothing} must be in [0, 1]")


# Folded into the stored gradient: |softmax - target| ≤ 1 times a significand < 2 stays under 2^15 (fp16's max: 65504)
GRAD_HEADROOM = 2.0 ** 14


def _grad_scales(target, ignore_index, reduction):
    """(s_fwd, s_bwd): (1,) fp32 device tensors, s_fwd·s_bwd = 1/n for "mean" (n counted rows), else 1. No host sync.

    s_fwd = significand of 1/n in [1, 2) times GRAD_HEADROOM, applied before the gradient's rounding; s_bwd is a power
    of two (exact: 1/n over s_fwd), applied with grad_output. n = 0 (every row ignored) counts as 1: zero gradients.
    """
    ones = torch.ones(1, dtype=torch.float32, device=target.device)
    if reduction != "mean":
        return ones * GRAD_HEADROOM, ones / GRAD_HEADROOM
    inv_n = (target != ignore_index).sum().clamp(min=1).to(torch.float32).reciprocal().reshape(1)
    significand, _ = torch.frexp(inv_n)                     # inv_n = significand · 2^e, significand in [0.5, 1)
    s_fwd = significand * (2 * GRAD_HEADROOM)
    return s_fwd, inv_n / s_fwd


def cross_entropy_rows(logits, grad, target, loss, scale, ignore_index=-100, label_smoothing=0.0):
    """Launch the kernel: per-row loss into `loss` (n,) fp32; gradient·scale into `grad` (n, V) unless grad is None.

    `grad` may be `logits` itself. Both need unit column stride.
    """
    n, V = logits.shape
    if n == 0:
        return
    cfg = _config_for(V)
    _cross_entropy_fwd_kernel[(n,)](
        logits, grad if grad is not None else logits, target, loss, scale,
        logits.stride(0), grad.stride(0) if grad is not None else 0, V, int(ignore_index), float(label_smoothing),
        COMPUTE_GRAD=grad is not None, HAS_SMOOTHING=float(label_smoothing) > 0.0, BLOCK_V=cfg["BLOCK_V"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _reduce(loss_rows, target, ignore_index, reduction):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum().to(torch.float32)


def cross_entropy_forward(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          compute_grad=True, inplace_grad=False):
    """Returns (loss, grad or None, s_bwd): d(loss)/d(logits) = grad · s_bwd for grad_output = 1 (`_grad_scales`)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{_OP}: logits must be a tensor")
    check_triton_device(logits, target, op=_OP)
    check_float_dtype(logits, op=_OP, name="logits")
    if logits.dim() != 2:
        raise ValueError(f"{_OP}: logits must be (N, V), got shape {tuple(logits.shape)}")
    n, V = logits.shape
    if V < 1:
        raise ValueError(f"{_OP}: logits has V=0 classes")
    _check_ce_args(_OP, target, n, reduction, label_smoothing)
    x = logits if logits.stride(-1) == 1 or n == 0 else logits.contiguous()
    target = target.contiguous()
    grad = None
    if compute_grad:
        # our own contiguous copy can always take the gradient; the caller's tensor only when they opted in
        own = inplace_grad or x is not logits
        grad = x if own else torch.empty((n, V), dtype=logits.dtype, device=logits.device)
    loss_rows = torch.empty(n, dtype=torch.float32, device=logits.device)
    s_fwd, s_bwd = _grad_scales(target, ignore_index, reduction)
    cross_entropy_rows(x, grad, target, loss_rows, s_fwd, ignore_index, label_smoothing)
    return _reduce(loss_rows, target, ignore_index, reduction), grad, s_bwd


def cross_entropy_backward(grad, grad_output, s_bwd, inplace=False):
    """grad · grad_output · s_bwd, grad_output a scalar or (N,) for reduction="none". One multiply in fp32, rounded once
    into grad's dtype: the factor is a (1,) or (N, 1) fp32 tensor, which type promotion keeps fp32 (a 0-dim one could
    be rounded to fp16 first: s_bwd ≤ 2^-14/n, zero in fp16 from n = 1025 on)."""
    go = grad_output.to(torch.float32)
    factor = (go[:, None] if go.dim() == 1 else go.reshape(1)) * s_bwd
    return torch.mul(grad, factor, out=grad if inplace else torch.empty_like(grad))


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, inplace_grad):
        loss, grad, s_bwd = cross_entropy_forward(logits, target, ignore_index, reduction, label_smoothing,
                                                  compute_grad=ctx.needs_input_grad[0], inplace_grad=inplace_grad)
        if grad is not None:
            ctx.save_for_backward(grad, s_bwd)
        ctx.inplace_grad = inplace_grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, s_bwd = ctx.saved_tensors
        return cross_entropy_backward(grad, grad_output, s_bwd, inplace=ctx.inplace_grad), None, None, None, None, None


def cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, inplace_grad=False):
    """F.cross_entropy(logits.float(), target, ...) for logits (N, V) and target (N,); the loss is fp32.

    inplace_grad=True: the gradient overwrites `logits` during this call (memory for one (N, V) buffer saved); use it
    only when nothing reads those logits afterwards. The default leaves the caller's tensor untouched.
    """
    return CrossEntropyFunction.apply(logits, target, ignore_index, reduction, label_smoothing, inplace_grad)


# ----------------------------------------------------------------------------------------------------------------------
# LM head fused with the loss
# ----------------------------------------------------------------------------------------------------------------------
def default_chunk_size(n_tokens: int, vocab: int, d_model: int) -> int:
    """A power of two near n_tokens / ceil(V / C): a chunk of logits about the size of hidden. At least 1."""
    per = max(1, math.ceil(vocab / max(1, d_model)))
    return max(1, min(triton.next_power_of_2(math.ceil(n_tokens / per)), triton.next_power_of_2(max(1, n_tokens))))


def _mm_fp32_accumulate(acc, a, b):
    """acc (fp32) += a @ b, with a product rounded once at most (fp32 output from cuBLAS where torch supports it)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError):
            pass
    acc.add_(torch.mm(a, b).to(torch.float32))


def linear_cross_entropy_chunks(hidden, weight, target, loss_rows, scale, ignore_index, label_smoothing, chunk_size,
                                need_grad_hidden, need_grad_weight, row_scale=None):
    """The chunk loop. hidden (N, C) and weight (V, C) already in the compute dtype. Fills loss_rows (N,) fp32.

    Returns (grad_hidden (N, C) in hidden's dtype or None, grad_weight (V, C) fp32 or None), for grad_output = 1
    (times row_scale[i] on row i when given).
    """
    N, C = hidden.shape
    V = weight.shape[0]
    grad_hidden = torch.empty((N, C), dtype=hidden.dtype, device=hidden.device) if need_grad_hidden else None
    grad_weight = torch.zeros((V, C), dtype=torch.float32, device=hidden.device) if need_grad_weight else None
    compute_grad = need_grad_hidden or need_grad_weight
    for start in range(0, N, chunk_size):
        end = min(N, start + chunk_size)
        h_c = hidden[start:end]
        logits = torch.mm(h_c, weight.t())                       # (n_c, V): cuBLAS
        cross_entropy_rows(logits, logits if compute_grad else None, target[start:end], loss_rows[start:end], scale,
                           ignore_index, label_smoothing)         # dlogits written over logits
        if not compute_grad:
            continue
        if row_scale is not None:
            logits.mul_(row_scale[start:end, None].to(logits.dtype))
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_grad_weight:
            _mm_fp32_accumulate(grad_weight, logits.t(), h_c)
    return grad_hidden, grad_weight


def _compute_dtype(hidden, weight):
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{_OP_LINEAR}: hidden is {hidden.dtype} but weight is {weight.dtype} (outside autocast they "
                        f"must match, as for hidden @ weight.T)")
    return hidden.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, reduction, label_smoothing, chunk_size, compute_dtype):
        N, C = hidden.shape
        device_type = hidden.device.type
        with torch.autocast(device_type, enabled=False):
            h = hidden.to(compute_dtype).contiguous()
            w = weight.to(compute_dtype).contiguous()
            target = target.contiguous()
            loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
            # The chunks store d(sum of row losses)/d logits, unscaled: |softmax - target| <= 1 keeps fp16 normal
            # down to 6e-5. Folding 1/n in before the fp16 cast (as the kernel does for `cross_entropy`) put typical
            # values near 1/(n·V) = 6e-8 at guppy-9m's shape, in fp16's subnormals, before GradScaler's scale arrives.
            # 1/n and grad_output are applied in fp32 in the backward.
            ones = torch.ones(1, dtype=torch.float32, device=hidden.device)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            deferred = reduction == "none"   # one grad_output per row: gradients are computed in the backward
            gh, gw = linear_cross_entropy_chunks(h, w, target, loss_rows, ones, ignore_index, label_smoothing,
                                                 chunk_size, need_h and not deferred, need_w and not deferred)
            loss = _reduce(loss_rows, target, ignore_index, reduction)
        ctx.deferred = deferred
        ctx.args = (ignore_index, label_smoothing, chunk_size, hidden.dtype, weight.dtype, device_type)
        if deferred:
            ctx.save_for_backward(h, w, target)
        else:
            # "mean": 1/n (n = counted rows; clamped so that no row counted gives zero gradients, not 0·inf)
            n = (target != ignore_index).sum().clamp(min=1).to(torch.float32)
            ctx.save_for_backward(gh, gw, n.reciprocal() if reduction == "mean" else ones[0])
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        ignore_index, label_smoothing, chunk_size, h_dtype, w_dtype, device_type = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            if ctx.deferred:
                h, w, target = ctx.saved_tensors
                loss_rows = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
                scale = torch.ones(1, dtype=torch.float32, device=h.device)
                gh, gw = linear_cross_entropy_chunks(h, w, target, loss_rows, scale, ignore_index, label_smoothing,
                                                     chunk_size, need_h, need_w, row_scale=grad_output.float())
            else:
                gh, gw, mean_scale = ctx.saved_tensors
                go = grad_output.to(torch.float32) * mean_scale
                gh = (gh.float() * go) if gh is not None else None
                gw = (gw * go) if gw is not None else None
        gh = gh.to(h_dtype) if (gh is not None and need_h) else None
        gw = gw.to(w_dtype) if (gw is not None and need_w) else None
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         chunk_size=None):
    """cross_entropy(hidden @ weight.T, target) without materialising the (N, V) logits. hidden (N, C), weight (V, C).

    chunk_size: tokens per chunk (default `default_chunk_size`). Under autocast the matmuls run in the autocast dtype.
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP_LINEAR}: {name} must be a tensor")
    check_triton_device(hidden, weight, target, op=_OP_LINEAR)
    check_float_dtype(hidden, op=_OP_LINEAR, name="hidden")
    check_float_dtype(weight, op=_OP_LINEAR, name="weight")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{_OP_LINEAR}: expected hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    N, C = hidden.shape
    V = weight.shape[0]
    if V < 1:
        raise ValueError(f"{_OP_LINEAR}: weight has V=0 rows")
    _check_ce_args(_OP_LINEAR, target, N, reduction, label_smoothing)
    if chunk_size is None:
        chunk_size = default_chunk_size(N, V, C)
    if int(chunk_size) < 1:
        raise ValueError(f"{_OP_LINEAR}: chunk_size={chunk_size} must be ≥ 1")
    compute_dtype = _compute_dtype(hidden, weight)
    return LinearCrossEntropyFunction.apply(hidden, weight, target, ignore_index, reduction, label_smoothing,
                                            int(chunk_size), compute_dtype)


def lm_head_memory_bytes(n_tokens: int, vocab: int, d_model: int, logits_bytes: int = 4, chunk_size=None) -> dict:
    """Computed (not measured) bytes of the logits-sized tensors alive at the peak of LM head + loss.

    naive: logits (N·V·s), fp32 log-probs saved by log_softmax (N·V·4), fp32 dlogits in the backward (N·V·4).
    chunked: one (chunk × V) logits buffer, overwritten by its own gradient (chunk·V·s).
    """
    chunk = chunk_size or default_chunk_size(n_tokens, vocab, d_model)
    naive = n_tokens * vocab * (logits_bytes + 4 + 4)
    chunked = min(chunk, n_tokens) * vocab * logits_bytes
    return dict(n_tokens=n_tokens, vocab=vocab, d_model=d_model, logits_bytes=logits_bytes, chunk_size=chunk,
                naive_bytes=naive, chunked_bytes=chunked, saved_bytes=naive - chunked)
