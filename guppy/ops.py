"""The seam between the model and its kernels.

The model never calls LayerNorm, attention or cross-entropy directly: it calls `ops.layer_norm`, `ops.attention`,
`ops.cross_entropy` and `ops.linear_cross_entropy` on an `Ops` table that `get_ops(name)` returns. Each name selects an
implementation; the model does not know which one runs.

The `reference` bodies below are the specification. They are a few lines of plain PyTorch each, they are what GuppyLM
computes, and every hand-written kernel in `guppy.kernels` (Triton) and `guppy.csrc` (CUDA C++) is tested against
them. Read them first; each kernel file sits one jump away and says in its header how it computes the same thing.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------------------------------
def layer_norm_reference(x, weight, bias, eps=1e-5, residual=None):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dimension (biased variance).

    With `residual`, the normalised input is h = x + residual and the result is the pair (y, h): a pre-norm block
    needs both the normalised activations and the updated residual stream, and a kernel can produce them in one pass.
    """
    if residual is not None:
        x = x + residual
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return (y, x) if residual is not None else y


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------
def attention_mask(t_q: int, t_k: int, causal: bool, segment_ids=None, device=None):
    """Boolean mask, True where query i may attend to key j. Shape (t_q, t_k), or (B, 1, t_q, t_k) with segments.

    causal: j <= i, with the queries aligned to the *last* t_q keys (so a decoder step with a KV cache, t_q=1, sees
    every cached key). segment_ids (B, T): i and j must belong to the same packed conversation.
    """
    allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed, diagonal=t_k - t_q)
    if segment_ids is not None:
        same = segment_ids[:, -t_q:, None] == segment_ids[:, None, :]          # (B, t_q, t_k)
        allowed = (allowed & same)[:, None]                                   # (B, 1, t_q, t_k)
    return allowed


def check_attention_args(op: str, q, k, v, segment_ids=None, dropout_p=0.0):
    """The contract every fused attention implementation shares, with one clear error naming `op`: q, k, v tensors
    of one (B, H, T, D) shape, dtype and device (Tq == Tk: decoding with a KV cache stays on the reference);
    segment_ids an integer (B, T) tensor on that device; 0 <= dropout_p < 1."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be (B, H, T, D), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v must have one shape (B, H, T, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (Tq != Tk / KV-cache decoding is not supported)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if segment_ids is not None:
        B, _, T, _ = q.shape
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.shape != (B, T):
            got = tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
            raise ValueError(f"{op}: segment_ids must be (B, T) = ({B}, {T}), got {got}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
            raise TypeError(f"{op}: segment_ids must be an integer tensor, got {segment_ids.dtype}")
        if segment_ids.device != q.device:
            raise ValueError(f"{op}: segment_ids on {segment_ids.device}, q on {q.device}")


def attention_reference(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0):
    """softmax(q kᵀ · sm_scale + mask) with dropout on the probabilities, times v. GuppyLM's masked-softmax attention.

    q: (B, H, Tq, D), k and v: (B, H, Tk, D); sm_scale defaults to 1/sqrt(D). Semantics of
    F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(...), dropout_p=dropout_p).
    """
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-2, -1)) * sm_scale
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, segment_ids, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
    return probs @ v


def attention_sdpa(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0):
    """The same function through PyTorch's fused SDPA (flash / memory-efficient / cuDNN backends where eligible)."""
    if segment_ids is None and (not causal or q.shape[-2] == k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=sm_scale)
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, segment_ids, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=sm_scale)


# --------------------------------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------------------------------
def cross_entropy_reference(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """loss_i = logsumexp(logits_i) - logits_i[target_i] on rows whose target is not ignore_index.

    logits (N, V), target (N,). "mean" divides by the number of counted rows (NaN when there are none), "sum" adds,
    "none" returns (N,) with 0 on ignored rows. With label smoothing ε the target is (1-ε)·onehot + ε/V.
    """
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def linear_cross_entropy_reference(hidden, weight, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """cross_entropy(hidden @ weightᵀ, target): the LM head and the loss. hidden (N, C), weight (V, C)."""
    return cross_entropy_reference(hidden @ weight.t(), target, ignore_index, reduction, label_smoothing)


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------
class Ops(NamedTuple):
    name: str
    layer_norm: Callable
    attention: Callable
    cross_entropy: Callable
    linear_cross_entropy: Callable
    fused_lm_head: bool  # True: the model hands the LM head to linear_cross_entropy and never builds training logits


REFERENCE = Ops("reference", layer_norm_reference, attention_reference, cross_entropy_reference,
                linear_cross_entropy_reference, fused_lm_head=False)
SDPA = REFERENCE._replace(name="sdpa", attention=attention_sdpa)

def _triton_ops() -> Ops:
    """guppy.kernels: Triton LayerNorm (with fused residual), FlashAttention-2, and the LM head fused with the loss."""
    from . import kernels  # ImportError when triton is missing: `availability()` reports it
    return Ops("triton", kernels.layer_norm, kernels.attention, kernels.cross_entropy, kernels.linear_cross_entropy,
               fused_lm_head=True)


def _triton_gemm_ops() -> Ops:
    """The Triton kernels, with attention as cuBLAS GEMMs around a fused Triton masked softmax (a T4 candidate)."""
    from .kernels.masked_softmax import gemm_attention
    return _triton_ops()._replace(name="triton-gemm", attention=gemm_attention)


def _csrc_ops() -> Ops:
    """guppy.csrc: the CUDA C++ tensor-core attention (mma.sync m16n8k8, for the T4); Triton for everything else."""
    from . import csrc
    return _triton_ops()._replace(name="csrc", attention=csrc.attention)


_AUTO_ATTENTION: dict = {}


def auto_attention_for(device: torch.device) -> tuple[str, Callable]:
    """The attention `auto` uses on a CUDA device, decided once per device and said in one line.

    sm_75 (T4): the CUDA C++ mma.sync kernel when it builds and passes its self-check; otherwise the Triton file's
    projected choice for this capability and Triton version (`kernels.attention.choose_attention`; on sm_75 with
    Triton >= 3.4 tl.dot has no tensor cores, so it names SDPA). sm_80+: Triton FlashAttention-2.
    """
    key = str(device)
    if key not in _AUTO_ATTENTION:
        import triton
        from .kernels.attention import choose_attention
        cc = torch.cuda.get_device_capability(device)
        choice, why = choose_attention(cc, triton.__version__), ""
        if cc < (8, 0):
            from . import csrc
            ok, reason = csrc.available(device)
            if ok:
                choice = "csrc"
            else:
                why = f" (guppy.csrc attention unavailable: {reason})"
        fn = {"csrc": lambda: _fp16_or(_csrc_ops().attention, attention_sdpa),
              "triton-flash": lambda: _triton_ops().attention,
              "gemm-softmax": lambda: _triton_gemm_ops().attention, "sdpa": lambda: attention_sdpa}[choice]()
        print(f"guppy: attention on {torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]}): {choice}{why}")
        _AUTO_ATTENTION[key] = (choice, fn)
    return _AUTO_ATTENTION[key]


def _fp16_or(fp16_fn, other_fn):
    """The CUDA C++ kernel takes fp16 only (the T4 has no bf16): fp16 inputs (autocast on a T4) go to it, anything
    else (an fp32 model run without autocast) to `other_fn`."""
    def attention(q, *args, **kwargs):
        return (fp16_fn if q.dtype == torch.float16 else other_fn)(q, *args, **kwargs)
    return attention


def _auto_ops() -> Ops:
    """Per call: the kernels on CUDA tensors (attention by `auto_attention_for`), the reference on CPU tensors, where
    Triton would need its interpreter."""
    try:
        fast = _triton_ops()
    except ImportError:
        return REFERENCE._replace(name="auto")

    def pick(fast_fn, ref_fn):
        def op(x, *args, **kwargs):
            return (fast_fn if x.is_cuda else ref_fn)(x, *args, **kwargs)
        op.__name__ = f"auto_{ref_fn.__name__}"
        return op

    def attention(q, *args, **kwargs):
        fn = auto_attention_for(q.device)[1] if q.is_cuda else attention_reference
        return fn(q, *args, **kwargs)

    return Ops("auto", pick(fast.layer_norm, REFERENCE.layer_norm), attention,
               pick(fast.cross_entropy, REFERENCE.cross_entropy),
               pick(fast.linear_cross_entropy, REFERENCE.linear_cross_entropy), fused_lm_head=True)


_BUILDERS: dict[str, Callable[[], Ops]] = {
    "reference": lambda: REFERENCE,
    "sdpa": lambda: SDPA,
    "triton": _triton_ops,
    "triton-gemm": _triton_gemm_ops,
    "csrc": _csrc_ops,
    "auto": _auto_ops,
}


def names() -> list[str]:
    return list(_BUILDERS)


def get_ops(name: str) -> Ops:
    if name not in _BUILDERS:
        raise ValueError(f"unknown ops implementation {name!r}; choose one of: {', '.join(_BUILDERS)}")
    return _BUILDERS[name]()


def availability() -> dict[str, Optional[str]]:
    """name -> None when usable here, else the reason it is not (for `guppy info`)."""
    out = {}
    for name in _BUILDERS:
        try:
            get_ops(name)
            out[name] = None
        except Exception as e:  # an optional backend that cannot load says why, it does not crash `info`
            out[name] = str(e).splitlines()[0]
    return out
