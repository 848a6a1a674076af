"""The seam between the model and its kernels.

The model never calls LayerNorm, attention or cross-entropy directly: it calls `ops.layer_norm`, `ops.attention`,
`ops.cross_entropy` and `ops.linear_cross_entropy` on an `Ops` table that `get_ops(name)` returns. Each name selects an
implementation; the model does not know which one runs.

The `reference` implementation is the specification, `guppy/reference.py`: a few lines of plain PyTorch per op, what
GuppyLM computes. Every hand-written kernel in `guppy.kernels` (Triton) and `guppy.csrc` (CUDA C++) is tested
against it. Read it first; each kernel file sits one jump away and says in its header how it computes the same thing.

`IMPLEMENTATIONS` is the one table of names: `--ops` takes its keys, `guppy info` lists them, and the README's kernel
table copies its lines (tests/test_ops.py checks). `choose_attention` is the one rule for what `auto` runs.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from guppy.reference import (attention_reference, attention_sdpa, cross_entropy_reference,
                             layer_norm_reference, linear_cross_entropy_reference)


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


# --------------------------------------------------------------------------------------------------------------------
# The implementations (built on first use: an import error says what is missing)
# --------------------------------------------------------------------------------------------------------------------
@functools.cache
def _triton_ops() -> Ops:
    from guppy.kernels.attention import attention
    from guppy.kernels.cross_entropy import cross_entropy, linear_cross_entropy
    from guppy.kernels.layer_norm import layer_norm
    return Ops("triton", layer_norm, attention, cross_entropy, linear_cross_entropy, fused_lm_head=True)


@functools.cache
def _gemm_softmax_ops() -> Ops:
    from guppy.kernels.gemm_softmax import gemm_softmax_attention
    return _triton_ops()._replace(name="gemm-softmax", attention=gemm_softmax_attention)


@functools.cache
def _csrc_ops() -> Ops:
    from guppy.csrc import attention
    return _triton_ops()._replace(name="csrc", attention=attention)


class Implementation(NamedTuple):
    build: Callable[[], Ops]
    what: str       # one line: what runs (the README's kernel table has the same line)
    needs: str      # what it needs to run
    triton: bool = False   # runs Triton kernels on whatever tensors it gets (on a CPU, only under TRITON_INTERPRET=1)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(
        lambda: REFERENCE, "plain PyTorch, GuppyLM's math: the specification (guppy/reference.py)", "torch"),
    "sdpa": Implementation(
        lambda: SDPA, "reference, with attention by torch's scaled_dot_product_attention", "torch"),
    "triton": Implementation(
        _triton_ops, "Triton LayerNorm (+ residual), FlashAttention-2, and the LM head fused with cross-entropy",
        "triton and a CUDA GPU (on a CPU only under TRITON_INTERPRET=1, slowly)", triton=True),
    "gemm-softmax": Implementation(
        _gemm_softmax_ops, "as triton, with attention as cuBLAS GEMMs around a Triton masked softmax",
        "triton and a CUDA GPU (on a CPU only under TRITON_INTERPRET=1, slowly)", triton=True),
    "csrc": Implementation(
        _csrc_ops, "as triton, with attention by the CUDA C++ mma.sync kernel (csrc/attention.cu, fp16)",
        "as triton, and nvcc to build the kernel at first use (guppy build-ext); CPU tensors run its host emulation",
        triton=True),
    "auto": Implementation(
        lambda: _auto_ops(), "the kernels on CUDA tensors, attention chosen by guppy.ops.choose_attention; "
        "the reference on CPU tensors", "torch (kernels where they can run)"),
}


def names() -> list[str]:
    return list(IMPLEMENTATIONS)


def get_ops(name: str) -> Ops:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown ops implementation {name!r}; choose one of: {', '.join(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name].build()


def availability() -> dict[str, Optional[str]]:
    """name -> None when it loads here, else the reason it does not (for `guppy info`). csrc's build and self-check
    run at its first call, not here: `guppy build-ext` runs the build ahead of time."""
    out = {}
    for name in IMPLEMENTATIONS:
        try:
            get_ops(name)
            out[name] = None
        except Exception as e:  # an optional backend that cannot load says why, it does not crash `info`
            out[name] = str(e).splitlines()[0]
    return out


# --------------------------------------------------------------------------------------------------------------------
# auto: which attention runs on a GPU
# --------------------------------------------------------------------------------------------------------------------
TRITON_HEAD_DIMS = range(16, 129)   # kernels/attention.py's limits (16 <= D <= 128); tests/test_ops.py checks them


def _version(v: Optional[str]) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit()) if v else ()


def choose_attention(capability: tuple, triton_version: Optional[str], dtype: torch.dtype, head_dim: int,
                     csrc_available: Callable[[], tuple[bool, str]]) -> tuple[str, str]:
    """(name, why): the attention `auto` runs for a GPU of this compute capability, under this Triton version (None:
    no Triton), for q of this dtype and head dim. `csrc_available() -> (ok, reason)` is asked only when the CUDA C++
    kernel would be chosen (its first answer may build it). Projected, unmeasured on a T4: see notes/attention.md.

    sm_80+: "triton" (FlashAttention-2 on mma.sync / wgmma tensor cores, O(T) memory, segment blocks skipped).
    sm_75 (T4), fp16, D in csrc's HEAD_DIMS: "csrc" (mma.sync m16n8k8) when it builds and passes its self-check.
    Else on sm_75: "triton" with Triton 3.1/3.2 (tl.dot -> mma.sync m16n8k8); with 3.3 tl.dot f16 does not compile
    and from 3.4 it is fp32 FMA (~8x less peak), so "sdpa" (memory-efficient backend: tensor cores, O(T) memory).
    Older GPUs, and any head dim or dtype the chosen kernel does not take: "sdpa".
    """
    from guppy.csrc.attention_op import HEAD_DIMS as CSRC_HEAD_DIMS   # no build: a constant
    cap, ver = tuple(capability), _version(triton_version)
    triton_ok = bool(ver) and head_dim in TRITON_HEAD_DIMS
    if cap >= (8, 0):
        return ("triton", "") if triton_ok else ("sdpa", f" (Triton {triton_version or 'missing'}, head dim "
                                                         f"{head_dim})")
    if cap < (7, 5):
        return "sdpa", ""
    why = ""
    if dtype != torch.float16 or head_dim not in CSRC_HEAD_DIMS:
        why = f" (guppy.csrc takes float16 and head dims {CSRC_HEAD_DIMS}; got {dtype}, {head_dim})"
    else:
        ok, reason = csrc_available()
        if ok:
            return "csrc", ""
        why = f" (guppy.csrc attention unavailable: {reason})"
    return ("triton" if triton_ok and (3, 1) <= ver < (3, 3) else "sdpa"), why


_SAID: set = set()


@functools.cache
def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _auto_gpu_attention(q: torch.Tensor) -> Callable:
    """The attention `auto` runs for q on a GPU, by choose_attention; said once per (device, dtype, head dim) in one
    line. No cache of its own: csrc's availability is read from guppy.csrc's cache on every call (a dict lookup)."""
    from guppy import csrc
    triton_version = _triton_version()
    cap = torch.cuda.get_device_capability(q.device)
    # csrc builds only this head dim: a cold build on a T4 compiles one instance of each kernel, not three
    name, why = choose_attention(cap, triton_version, q.dtype, q.shape[-1],
                                 lambda: csrc.available(q.device, head_dims=(q.shape[-1],)))
    said = (str(q.device), q.dtype, q.shape[-1])
    if said not in _SAID:
        _SAID.add(said)
        print(f"guppy: attention on {torch.cuda.get_device_name(q.device)} (sm_{cap[0]}{cap[1]}, triton "
              f"{triton_version or 'missing'}) for {str(q.dtype).replace('torch.', '')} q, head dim {q.shape[-1]}: "
              f"{name}{why}")
    return get_ops(name).attention


def _auto_ops() -> Ops:
    """Per call: the kernels on CUDA tensors (attention by `choose_attention`), the reference on CPU tensors, where
    Triton would need its interpreter. Without Triton: the reference ops, attention still by the rule."""
    try:
        fast = _triton_ops()
    except ImportError:
        fast = REFERENCE

    def pick(fast_fn, ref_fn):
        def op(x, *args, **kwargs):
            return (fast_fn if x.is_cuda else ref_fn)(x, *args, **kwargs)
        op.__name__ = f"auto_{ref_fn.__name__}"
        return op

    def attention(q, *args, **kwargs):
        return (_auto_gpu_attention(q) if q.is_cuda else attention_reference)(q, *args, **kwargs)

    return Ops("auto", pick(fast.layer_norm, REFERENCE.layer_norm), attention,
               pick(fast.cross_entropy, REFERENCE.cross_entropy),
               pick(fast.linear_cross_entropy, REFERENCE.linear_cross_entropy), fused_lm_head=fast.fused_lm_head)
