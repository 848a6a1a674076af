"""guppy.kernels.attention (Triton FlashAttention-2) against the specification, guppy.reference.attention_reference / SDPA.

CPU (CI): the kernels run under TRITON_INTERPRET=1 on tiny B, H. The shape grid is pairwise, not a cartesian product:
every T in {1, 17, 64, 127, 129}, every D in {16, 32, 64, 128} (+ a non-power-of-two 48), both causal settings, both
dtypes (fp32, fp16) and packed segments each appear several times, in different pairings.
GPU (when CUDA is present): fp16 and bf16 (bf16 only on sm_80+), larger shapes, the same checks.

Tolerances: fp32 kernels use IEEE dots and must match the fp32 reference to 1e-5 (observed ~1e-6). For fp16/bf16 the
bound is derived from the reference itself: |kernel − ref32| <= 4·|ref_lowp − ref32| + floor, where ref_lowp is
the same reference run in the low-precision dtype (what a plain PyTorch model would get) and floor = 2 ulp of the
dtype at the output's scale (covers the case where the CPU reference happens to be nearly exact).
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must precede the first import of guppy.kernels (triton decides at decoration)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import guppy.ops as gops  # noqa: E402
from guppy.reference import attention_mask  # noqa: E402

A = importlib.import_module("guppy.kernels.attention")  # the module (guppy.kernels.attention is the function)
attention, dropout_mask = A.attention, A.dropout_mask

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


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


def run_and_compare(B, H, T, D, causal, dtype, seg=False, p=0.0, seed=1234, device="cpu", layout="bhtd", fn=None):
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


# T, D, causal, dtype, segments, (B, H): pairwise coverage (see the module docstring)
CASES = [
    (1, 16, True, torch.float32, False, (1, 1)),
    (1, 128, False, torch.float16, True, (1, 2)),
    (17, 32, False, torch.float16, True, (2, 1)),
    (17, 64, True, torch.float32, False, (1, 2)),
    (64, 64, True, torch.float16, True, (1, 1)),
    (64, 16, False, torch.float32, True, (1, 1)),
    (127, 128, False, torch.float32, True, (1, 1)),
    (127, 32, True, torch.float16, False, (1, 1)),
    (129, 16, False, torch.float16, False, (1, 1)),
    (129, 48, True, torch.float32, True, (2, 1)),
    (64, 128, True, torch.float16, False, (1, 1)),
]


@pytest.mark.parametrize("T,D,causal,dtype,seg,bh", CASES,
                         ids=[f"T{c[0]}-D{c[1]}-{'causal' if c[2] else 'full'}-{str(c[3])[6:]}"
                              f"{'-seg' if c[4] else ''}" for c in CASES])
def test_forward_backward(T, D, causal, dtype, seg, bh):
    run_and_compare(bh[0], bh[1], T, D, causal, dtype, seg)


def test_noncontiguous_qkv_views():
    """The model's permuted views of one qkv projection are used through their strides, not copied."""
    B, H, T, D = 2, 2, 33, 16
    qkv = torch.randn(B, T, 3 * H * D)
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    assert q.stride() == (T * 3 * H * D, D, 3 * H * D, 1)
    assert A._unit_d(q) is q                           # no copy on the way in
    run_and_compare(B, H, T, D, True, torch.float32, seg=True, layout="qkv")


def test_lse_is_logsumexp():
    B, H, T, D = 1, 2, 40, 32
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    seg_ids = torch.tensor([[0] * 13 + [1] * 27])
    seg, sb, has = A._seg_arg(seg_ids, q)
    o, lse = A.attention_forward(q, k, v, True, 1 / math.sqrt(D), seg, sb, has, 0.0, A.dropout_seed_tensor(0.0, None, q.device))
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(~attention_mask(T, T, True, seg_ids), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,D,causal,dtype,seg", [(33, 16, True, torch.float32, True),
                                                  (70, 32, False, torch.float16, False)])
def test_dropout_matches_regenerated_mask(T, D, causal, dtype, seg):
    """Forward and gradients equal softmax(masked scores) * keep / (1-p) @ v with keep = dropout_mask(seed)."""
    run_and_compare(1, 2, T, D, causal, dtype, seg, p=0.1, seed=987)


def test_dropout_reproducible_from_seed():
    q, k, v = (torch.randn(1, 1, 24, 16) for _ in range(3))
    a = attention(q, k, v, dropout_p=0.3, dropout_seed=5)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.3, dropout_seed=5))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.3, dropout_seed=6))
    torch.manual_seed(11)
    b = attention(q, k, v, dropout_p=0.3)           # seed drawn from torch's default generator
    torch.manual_seed(11)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.3))


def test_dropout_keep_fraction_binomial():
    """keep ~ Bernoulli(1-p) i.i.d.: the kept fraction is within 5 binomial sigmas, per (b, h) masks differ."""
    B, H, T, p = 2, 2, 128, 0.1
    keep = dropout_mask(2024, B, H, T, p, "cpu")
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), frac
    flat = keep.view(B * H, -1).float()
    assert all(not torch.equal(flat[i], flat[j]) for i in range(B * H) for j in range(i))
    # no structure along i or j: per-row and per-column fractions have the binomial spread (loose 6-sigma check)
    rows = keep.float().mean(-1)
    assert (rows - (1 - p)).abs().max().item() <= 6 * math.sqrt(p * (1 - p) / T)


def test_dropout_unbiased_over_seeds():
    """E_seed[attention with dropout] = attention without dropout (inverted-dropout scaling by 1/(1-p))."""
    T, D, p, N = 8, 16, 0.3, 200
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, D, generator=gen) for _ in range(3))
    outs = torch.stack([attention(q, k, v, dropout_p=p, dropout_seed=s) for s in range(N)])
    mean, std = outs.mean(0), outs.std(0)
    ref = attention(q, k, v)
    assert ((mean - ref).abs() <= 5 * std / math.sqrt(N) + 1e-4).all()


# ------------------------------------------------------------------------------------------------------------------
# Model level: mini GuppyLM, loss and every parameter gradient, reference vs this attention
# ------------------------------------------------------------------------------------------------------------------
def model_parity(attn_fn):
    from guppy.config import ModelConfig
    from guppy.model import GuppyLM
    cfg = ModelConfig(vocab_size=64, max_seq_len=32, d_model=64, n_layers=2, n_heads=2, ffn_hidden=64, dropout=0.0)
    torch.manual_seed(0)
    model = GuppyLM(cfg)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 29), generator=gen)
    targets = torch.randint(0, 64, (2, 29), generator=gen)
    seg = torch.tensor([[0] * 10 + [1] * 19, [0] * 29])
    pos = torch.cat([torch.arange(10), torch.arange(19)]).view(1, -1).expand(2, -1).clone()
    pos[1] = torch.arange(29)
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


def test_model_parity():
    model_parity(attention)


# ------------------------------------------------------------------------------------------------------------------
# Errors, configuration table, dispatch rule
# ------------------------------------------------------------------------------------------------------------------
def test_errors(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="one shape"):
        attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="16..128"):
        x = torch.randn(1, 1, 8, 8)
        attention(x, x, x)
    with pytest.raises(ValueError, match="16..128"):
        x = torch.randn(1, 1, 8, 160)
        attention(x, x, x)
    with pytest.raises(TypeError, match="dtype"):
        x = torch.ones(1, 1, 8, 16, dtype=torch.int32)
        attention(x, x, x)
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, q, q, segment_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="segment_ids"):
        attention(q, q, q, segment_ids=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensor|cpu tensor|CUDA"):
        attention(q, q, q)


def test_config_table_covers_dispatcher():
    """Every configuration the launcher can pick on sm_75/80/90 appears in target_configs() (the `guppy targets`
    table), and the table's tensor-core expectations follow the documented rule."""
    table = A.target_configs()
    index = {}
    for c in table:
        cx = c["constexprs"]
        for arch in c["archs"]:
            index[(c["fn"], arch, cx["BLOCK_D"], c["signature"]["DO" if "DO" in c["signature"] else "Q"],
                   cx["BLOCK_M"], cx.get("BLOCK_N"), c["num_warps"], c["num_stages"])] = c
    for arch in (75, 80, 86, 89, 90):
        for dtype in ((torch.float16, torch.float32) if arch < 80 else (torch.float16, torch.bfloat16, torch.float32)):
            for D in range(16, 129):
                cfg = A.attention_config(arch, D, dtype)
                bd, ptr, cls = max(16, 1 << (D - 1).bit_length()), A._TRITON_PTR[A._DTYPES[dtype]], A._arch_class(arch)
                for fn, key in ((A._attn_fwd, "fwd"), (A._attn_bwd_dkdv, "bwd_dkdv"), (A._attn_bwd_dq, "bwd_dq")):
                    bm, bn, w, s = cfg[key]
                    c = index[(fn, cls, bd, ptr, bm, bn, w, s)]
                    tc = c["expect_tensor_cores"][cls]
                    assert tc == (cls >= 80 and dtype != torch.float32)
                bm, w = cfg["bwd_pre"]
                assert (A._attn_bwd_preprocess, cls, bd, ptr, bm, None, w, 1) in index


def test_cross_compile_sm75_fma_and_sm80_mma():
    """The table's instruction expectations hold for the guppy shape (fp16, D=64, forward): fp32 FMA and no mma on
    sm_75, mma.sync on sm_80, shared memory within the per-block limits. Runs in a subprocess: under the interpreter
    the kernels in this process are not compilable objects."""
    import subprocess
    import sys
    code = """
import re, importlib, triton
from triton.backends.compiler import GPUTarget
A = importlib.import_module("guppy.kernels.attention")
for c in A.target_configs():
    if not c["kernel"].startswith("attention_fwd fp16 D64"):
        continue
    for arch in c["archs"]:
        if arch == 90:
            continue
        k = triton.compile(triton.compiler.ASTSource(fn=c["fn"], signature=c["signature"], constexprs=c["constexprs"],
                                                     attrs=c["attrs"]), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
        ptx = k.asm["ptx"]
        assert bool(re.search(r"mma\\.sync", ptx)) == c["expect_tensor_cores"][arch], (arch, c["kernel"])
        assert (arch != 75) or "fma.rn.f32" in ptx
        assert k.metadata.shared <= {75: 64 * 1024, 80: 99 * 1024}[arch], (arch, k.metadata.shared)
        print(arch, k.metadata.shared)
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.split()) == 4, r.stdout


# ------------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------------
GPU_DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA and torch.cuda.get_device_capability() >= (8, 0) else [])


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T,D,causal,seg,p", [(128, 64, True, False, 0.0), (128, 64, True, True, 0.1),
                                              (500, 80, False, True, 0.0), (1024, 128, True, False, 0.0),
                                              (257, 16, True, True, 0.1), (1, 32, False, False, 0.0)])
def test_gpu(dtype, T, D, causal, seg, p):
    run_and_compare(4, 6, T, D, causal, dtype, seg, p=p, device="cuda")


@needs_gpu
def test_gpu_model_layout_and_parity():
    run_and_compare(8, 6, 128, 64, True, torch.float16, seg=True, p=0.1, device="cuda", layout="qkv")
    dropout_mask(1, 2, 2, 64, 0.1, "cuda")  # compiles and runs on the GPU
