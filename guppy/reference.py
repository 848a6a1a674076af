"""The specification: what GuppyLM computes for each op the kernels replace, in a few lines of plain PyTorch each.

Every hand-written kernel in `guppy.kernels` (Triton) and `guppy.csrc` (CUDA C++) computes one of these functions and
is tested against it; `guppy.ops` picks which implementation the model calls. Read these first: each kernel file
sits one jump away and says in its header how it computes the same thing.

`check_attention_args` is the input contract every fused attention shares, so the kernels import it from here
(the spec), never from the seam that dispatches to them.
"""
from __future__ import annotations

import math

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
