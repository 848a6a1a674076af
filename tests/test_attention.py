"""guppy.kernels.attention (Triton FlashAttention-2) against the spec, guppy.reference.attention_reference, and SDPA.

Every parity test runs on the `device` fixture (tests/conftest.py): CPU tensors under TRITON_INTERPRET=1 in CI, on tiny
B, H; CUDA tensors on a GPU, where the kernels are compiled and a CPU tensor would be refused. The shape grid is
pairwise, not a cartesian product: every T in {1, 17, 64, 127, 129}, every D in {16, 32, 64, 128} (+ a non-power-of-two
48), both causal settings, both dtypes (fp32, fp16) and packed segments each appear several times, in different
pairings.
GPU only (when CUDA is present): fp16 and bf16 (bf16 only on sm_80+), larger shapes, the same checks.
The reference and the tolerance rule are in tests/attention_parity.py.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import guppy.kernels.attention as A
from attention_parity import GPU_DTYPES, case_id, model_parity, run_and_compare
from conftest import requires_gpu
from guppy.kernels._utils import arch_class
from guppy.reference import attention_mask
from guppy.seeds import dropout_seed_tensor

attention, dropout_mask = A.attention, A.dropout_mask


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


@pytest.mark.parametrize("T,D,causal,dtype,seg,bh", CASES, ids=[case_id(c) for c in CASES])
def test_forward_backward(T, D, causal, dtype, seg, bh, device):
    run_and_compare(bh[0], bh[1], T, D, causal, dtype, seg, device=device)


def test_noncontiguous_qkv_views(device):
    """The model's permuted views of one qkv projection are used through their strides, not copied."""
    B, H, T, D = 2, 2, 33, 16
    qkv = torch.randn(B, T, 3 * H * D, device=device)
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    assert q.stride() == (T * 3 * H * D, D, 3 * H * D, 1)
    assert A._unit_d(q) is q                           # no copy on the way in
    run_and_compare(B, H, T, D, True, torch.float32, seg=True, device=device, layout="qkv")


def test_lse_is_logsumexp(device):
    B, H, T, D = 1, 2, 40, 32
    q, k, v = (torch.randn(B, H, T, D, device=device) for _ in range(3))
    seg_ids = torch.tensor([[0] * 13 + [1] * 27], device=device)
    seg, sb, has = A._seg_arg(seg_ids, q)
    o, lse = A.attention_forward(q, k, v, True, 1 / math.sqrt(D), seg, sb, has, 0.0,
                                 dropout_seed_tensor(0.0, None, q.device))
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(~attention_mask(T, T, True, seg_ids, device), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,D,causal,dtype,seg", [(33, 16, True, torch.float32, True),
                                                  (70, 32, False, torch.float16, False)])
def test_dropout_matches_regenerated_mask(T, D, causal, dtype, seg, device):
    """Forward and gradients equal softmax(masked scores) * keep / (1-p) @ v with keep = dropout_mask(seed)."""
    run_and_compare(1, 2, T, D, causal, dtype, seg, p=0.1, seed=987, device=device)


def test_dropout_reproducible_from_seed(device):
    q, k, v = (torch.randn(1, 1, 24, 16, device=device) for _ in range(3))
    a = attention(q, k, v, dropout_p=0.3, dropout_seed=5)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.3, dropout_seed=5))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.3, dropout_seed=6))
    torch.manual_seed(11)
    b = attention(q, k, v, dropout_p=0.3)           # seed drawn from torch's default generator
    torch.manual_seed(11)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.3))


def test_dropout_keep_fraction_binomial(device):
    """keep ~ Bernoulli(1-p) i.i.d.: the kept fraction is within 5 binomial sigmas, per (b, h) masks differ."""
    B, H, T, p = 2, 2, 128, 0.1
    keep = dropout_mask(2024, B, H, T, p, device)
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), frac
    flat = keep.view(B * H, -1).float()
    assert all(not torch.equal(flat[i], flat[j]) for i in range(B * H) for j in range(i))
    # no structure along i or j: per-row and per-column fractions have the binomial spread (loose 6-sigma check)
    rows = keep.float().mean(-1)
    assert (rows - (1 - p)).abs().max().item() <= 6 * math.sqrt(p * (1 - p) / T)


def test_dropout_unbiased_over_seeds(device):
    """E_seed[attention with dropout] = attention without dropout (inverted-dropout scaling by 1/(1-p))."""
    T, D, p, N = 8, 16, 0.3, 200
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, D, generator=gen).to(device) for _ in range(3))
    outs = torch.stack([attention(q, k, v, dropout_p=p, dropout_seed=s) for s in range(N)])
    mean, std = outs.mean(0), outs.std(0)
    ref = attention(q, k, v)
    assert ((mean - ref).abs() <= 5 * std / math.sqrt(N) + 1e-4).all()


# ------------------------------------------------------------------------------------------------------------------
# Model level: mini GuppyLM, loss and every parameter gradient, reference vs this attention
# ------------------------------------------------------------------------------------------------------------------
def test_model_parity(device):
    model_parity(attention, device)


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
    index = {}
    for c in A.target_configs():
        cx = c["constexprs"]
        index[(c["fn"], c["archs"], cx["BLOCK_D"], c["types"]["Q"], cx["BLOCK_M"], cx.get("BLOCK_N"), c["num_warps"],
               c["num_stages"])] = c
    for arch in (75, 80, 86, 89, 90):
        for dtype in ((torch.float16, torch.float32) if arch < 80 else (torch.float16, torch.bfloat16, torch.float32)):
            for D in range(16, 129):
                cfg = A.attention_config(arch, D, dtype)
                bd, ptr, archs = max(16, 1 << (D - 1).bit_length()), f"*{A._DTYPES[dtype]}", (arch_class(arch),)
                for fn, key in ((A._attn_fwd, "fwd"), (A._attn_bwd_dkdv, "bwd_dkdv"), (A._attn_bwd_dq, "bwd_dq")):
                    c = index[(fn, archs, bd, ptr, *cfg[key])]
                    assert c["expect_tensor_cores"] == (archs[0] >= 80 and dtype != torch.float32)
                bm, w = cfg["bwd_pre"]
                assert (A._attn_bwd_preprocess, archs, bd, ptr, bm, None, w, 1) in index


def test_cross_compile_sm75_fma_and_sm80_mma():
    """The table's instruction expectations hold for the guppy shape (fp16, D=64, forward), compiled by the
    `guppy targets` harness: fp32 FMA on sm_75, mma.sync on sm_80, and shared memory within sm_75's 64 KB and (for
    the 8.x configs) sm_86's 99 KB. Runs in a subprocess: under the interpreter the kernels in this process are not
    compilable objects."""
    import subprocess
    import sys
    code = """
import guppy.kernels.attention as A
from guppy import targets
for c in A.target_configs():
    arch = c["archs"][0]
    if c["kernel"].startswith("attention_fwd fp16 D64") and arch in (75, 80):
        r = targets.compile_entry(c, arch)
        dot = targets.dot_kind(r["ptx"], r["ttir"])
        assert dot == {75: "FMA", 80: "mma"}[arch] and (dot == "mma") == c["expect_tensor_cores"], (arch, dot)
        assert r["shared"] <= targets.ARCH_LIMITS[{75: 75, 80: 86}[arch]].smem_per_block, (arch, r["shared"])
        print(arch, r["shared"])
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.split()) == 4, r.stdout


# ------------------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T,D,causal,seg,p", [(128, 64, True, False, 0.0), (128, 64, True, True, 0.1),
                                              (500, 80, False, True, 0.0), (1024, 128, True, False, 0.0),
                                              (257, 16, True, True, 0.1), (1, 32, False, False, 0.0)])
def test_gpu(dtype, T, D, causal, seg, p):
    run_and_compare(4, 6, T, D, causal, dtype, seg, p=p, device="cuda")


@requires_gpu
def test_gpu_model_layout_and_parity():
    run_and_compare(8, 6, 128, 64, True, torch.float16, seg=True, p=0.1, device="cuda", layout="qkv")
    dropout_mask(1, 2, 2, 64, 0.1, "cuda")  # compiles and runs on the GPU
