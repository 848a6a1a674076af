"""The seam between the model and its kernels.

The model never calls LayerNorm, attention or cross-entropy directly: it calls `ops.layer_norm`, `ops.attention`,
`ops.cross_entropy` and `ops.linear_cross_entropy` on an `Ops` table that `get_ops(name)` returns. Each name selects an
implementation; the model does not know which one runs.

The `reference` implementation is the specification, `guppy/reference.py`: a few lines of plain PyTorch per op, what
GuppyLM computes. Every hand-written kernel in `guppy.kernels` (Triton) and `guppy.csrc` (CUDA C++) is tested
against it. Read it first; each kernel file sits one jump away and says in its header how it computes the same thing.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from guppy.reference import (attention_reference, attention_sdpa, cross_entropy_reference,
                             layer_norm_reference, linear_cross_entropy_reference)


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
    # ImportError when triton is missing: `availability()` reports it
    from guppy.kernels.attention import attention
    from guppy.kernels.cross_entropy import cross_entropy, linear_cross_entropy
    from guppy.kernels.layer_norm import layer_norm
    return Ops("triton", layer_norm, attention, cross_entropy, linear_cross_entropy, fused_lm_head=True)


def _gemm_softmax_ops() -> Ops:
    """The Triton kernels, with attention as cuBLAS GEMMs around a fused Triton masked softmax (a T4 candidate)."""
    from guppy.kernels.gemm_softmax import gemm_softmax_attention
    return _triton_ops()._replace(name="gemm-softmax", attention=gemm_softmax_attention)


def _csrc_ops() -> Ops:
    """guppy.csrc: the CUDA C++ tensor-core attention (mma.sync m16n8k8, for the T4); Triton for everything else."""
    from guppy.csrc import attention
    return _triton_ops()._replace(name="csrc", attention=attention)


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
        from guppy.kernels.attention import choose_attention
        cc = torch.cuda.get_device_capability(device)
        choice, why = choose_attention(cc, triton.__version__), ""
        if cc < (8, 0):
            from guppy import csrc
            ok, reason = csrc.available(device)
            if ok:
                choice = "csrc"
            else:
                why = f" (guppy.csrc attention unavailable: {reason})"
        fn = {"csrc": lambda: _fp16_or(_csrc_ops().attention, attention_sdpa),
              "triton": lambda: _triton_ops().attention,
              "gemm-softmax": lambda: _gemm_softmax_ops().attention, "sdpa": lambda: attention_sdpa}[choice]()
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
    "gemm-softmax": _gemm_softmax_ops,
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
