"""guppy.csrc.available(device): can guppy.csrc.attention run here? Never raises.

"cpu": the host (emulator) build compiles and loads. "cuda": a CUDA device exists, the nvcc build compiles for its
arch, and a self-check (forward and gradients on a small causal packed input vs guppy.reference.attention_reference in
fp32) passes. The answer is cached per device for the process, so the ops seam's "auto" can ask on every call.
"""
from __future__ import annotations

_CACHE: dict[str, tuple[bool, str]] = {}


def _self_check(device) -> str | None:
    import torch
    from guppy.csrc.attention import attention
    from guppy.reference import attention_reference
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 80, 64
    q, k, v = (torch.randn(B, H, T, D, generator=g).half().to(device) for _ in range(3))
    seg = torch.tensor([[0] * 30 + [1] * 50, [0] * 80], dtype=torch.int32, device=device)
    do = torch.randn(B, H, T, D, generator=g).half().to(device)
    q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
    o = attention(q, k, v, causal=True, segment_ids=seg)
    grads = torch.autograd.grad(o, (q, k, v), do)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    of = attention_reference(qf, kf, vf, causal=True, segment_ids=seg)
    ref_grads = torch.autograd.grad(of, (qf, kf, vf), do.float())
    for name, a, r in [("out", o, of)] + list(zip(("dq", "dk", "dv"), grads, ref_grads)):
        err = (a.float() - r).abs().max().item()
        tol = 2e-2 * max(1.0, r.abs().max().item())
        if not err <= tol:
            return f"self-check failed: {name} differs from the reference by {err:.3g} (tolerance {tol:.3g})"
    return None


def available(device="cuda") -> tuple[bool, str]:
    """(True, "") when guppy.csrc.attention can run on `device`, else (False, one line saying why)."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    key = str(dev)
    if key in _CACHE:
        return _CACHE[key]
    try:
        from guppy.csrc import extension as _build
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                res = (False, "no CUDA device available")
            else:
                _build.load("cuda", cuda_device=dev)
                err = _self_check(dev)
                res = (False, err) if err else (True, "")
        else:
            _build.load("cpu")
            res = (True, "")
    except Exception as e:  # build failures (no nvcc, wrong toolkit, compiler errors) become a reason, not a crash
        msg = str(e).strip().splitlines()
        res = (False, f"guppy.csrc build failed: {msg[-1] if msg else type(e).__name__}")
    _CACHE[key] = res
    return res
