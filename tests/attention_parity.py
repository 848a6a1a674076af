"""Shared by the attention kernel tests (test_attention.py, test_gemm_softmax.py): the fp32 / low-precision reference,
the tolerance rule, packed segment ids, and the mini-model parity check. Both run on the device the kernels run on
(tests/conftest.py's DEVICE and `device` fixture: CUDA on a GPU, the CPU through the interpreter without one).

Tolerances: fp32 kernels use IEEE dots and must match the fp32 reference to 1e-5 (observed ~1e-6). For fp16/bf16 the
bound is derived from the reference itself: |kernel − ref32| <= 4·|ref_lowp − ref32| + floor, where ref_lowp is
the same reference run in the low-precision dtype (what a plain PyTorch model would get) and floor = 2 ulp of the
dtype at the output's scale (covers the case where the CPU reference happens to be nearly exact).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import guppy.ops as gops
from conftest import DEVICE, HAS_CUDA
from guppy.kernels.attention import attention, dropout_mask
from guppy.reference import attention_mask

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def case_id(case) -> str:
    """pytest id of a (T, D, causal, dtype, segments, (B, H)) case: T17-D128-full-float16-seg."""
    T, D, causal, dtype, seg, _ = case
    return f"T{T}-D{D}-{'causal' if causal else 'full'}-{str(dtype)[6:]}{'-seg' if seg else ''}"


def packed_segments(B, T, gen, n_max=4):
    """(B, T) non-decreasing ids of uneven packed conversations (1..n_max per row)."""
    rows = []
    for _ in range(B):
        n = int(torch.randint(1, n_max + 1, (1,), generator=gen))
        cuts = sorted(torch.randperm(max(T - 1, 1), generator=gen)[: n - 1].add(1).tolist()) if T > 1 else []
        ids = torch.zeros(T, dtype=torch.long)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows)


def reference(q, k, v, causal, seg, keep=None, p=0.0, dtype=torch.float32):
    """The specification in `dtype`: softmax(masked scores) [* keep / (1-p)] @ v, via SDPA's math when no dropout."""
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    T = q.shape[-2]
    mask = attention_mask(T, T, causal, seg, q.device)
    if keep is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        probs = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        o = (probs * keep / (1 - p)) @ v
    return o, (q, k, v)


def run_and_compare(B, H, T, D, causal, dtype, seg=False, p=0.0, seed=1234, device=DEVICE, layout="bhtd", fn=None):
    """Run `fn` (default: attention) forward + backward and check o, dq, dk, dv against the fp32 reference."""
    fn = attention if fn is None else fn
    gen = torch.Generator().manual_seed(T * 131 + D)
    if layout == "qkv":  # the model's layout: permuted views of one fused projection, strides (T*3HD, D, 3HD, 1)
        qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        leaves = (qkv,)
    else:
        q, k, v = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
                   for _ in range(3))
        leaves = (q, k, v)
    segment_ids = packed_segments(B, T, gen).to(device) if seg else None
    do = torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype)

    out = fn(q, k, v, causal=causal, segment_ids=segment_ids, dropout_p=p, dropout_seed=seed)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), do)

    keep = dropout_mask(seed, B, H, T, p, device) if p > 0 else None
    ref32, ins32 = reference(q, k, v, causal, segment_ids, keep, p, torch.float32)
    g32 = torch.autograd.grad(ref32, ins32, do.float())
    if dtype == torch.float32:
        for name, got, want in zip(("o", "dq", "dk", "dv"), (out, *grads), (ref32, *g32)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        reflp, inslp = reference(q, k, v, causal, segment_ids, keep, p, dtype)
        glp = torch.autograd.grad(reflp, inslp, do)
        for name, got, want, lowp in zip(("o", "dq", "dk", "dv"), (out, *grads), (ref32, *g32), (reflp, *glp)):
            err = (got.float() - want).abs().max().item()
            ref_err = (lowp.float() - want).abs().max().item()
            floor = 2 * EPS[dtype] * max(1.0, want.abs().max().item())
            assert err <= 4 * ref_err + floor, f"{name}: kernel err {err:.3e}, {dtype} reference err {ref_err:.3e}"
    return leaves


GPU_DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA and torch.cuda.get_device_capability() >= (8, 0) else [])


def model_parity(attn_fn, device=DEVICE):
    """Mini GuppyLM with packed rows, on `device`: the loss and every parameter gradient with `attn_fn` equal the
    reference's."""
    from guppy.config import ModelConfig
    from guppy.model import GuppyLM
    cfg = ModelConfig(vocab_size=64, max_seq_len=32, d_model=64, n_layers=2, n_heads=2, ffn_hidden=64, dropout=0.0)
    torch.manual_seed(0)
    model = GuppyLM(cfg).to(device)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 29), generator=gen)
    targets = torch.randint(0, 64, (2, 29), generator=gen)
    seg = torch.tensor([[0] * 10 + [1] * 19, [0] * 29])
    pos = torch.cat([torch.arange(10), torch.arange(19)]).view(1, -1).expand(2, -1).clone()
    pos[1] = torch.arange(29)
    idx, targets, seg, pos = (t.to(device) for t in (idx, targets, seg, pos))
    results = []
    for ops in (gops.REFERENCE, gops.REFERENCE._replace(name="t", attention=attn_fn)):
        model.ops = ops
        model.zero_grad()
        _, loss = model(idx, targets, segment_ids=seg, positions=pos)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
