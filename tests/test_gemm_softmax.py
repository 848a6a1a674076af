"""guppy.kernels.gemm_softmax.gemm_softmax_attention (cuBLAS GEMMs + a Triton fused masked softmax) against the spec.

Same contract and same checks as tests/test_attention.py (the reference and tolerance rule of
tests/attention_parity.py, a pairwise shape grid), plus: identical output to the flash kernel for one dropout seed
(both draw the same Philox mask), and the config table covering the dispatcher. The parity tests run on the `device`
fixture (tests/conftest.py): CPU tensors under TRITON_INTERPRET=1, CUDA tensors on a GPU; larger GPU-only variants
when CUDA is present.
"""
from __future__ import annotations

import math

import pytest
import torch

import guppy.kernels.gemm_softmax as GS
from attention_parity import GPU_DTYPES, case_id, model_parity, run_and_compare
from conftest import requires_gpu
from guppy.kernels.attention import attention
from guppy.kernels.gemm_softmax import gemm_softmax_attention

CASES = [
    (1, 16, True, torch.float32, False, (1, 1)),
    (17, 128, False, torch.float16, True, (1, 2)),
    (64, 32, True, torch.float16, True, (2, 1)),
    (127, 64, False, torch.float32, True, (1, 1)),
    (129, 16, True, torch.float16, False, (1, 1)),
    (129, 48, False, torch.float32, True, (1, 1)),
    (64, 128, True, torch.float32, False, (1, 1)),
]


@pytest.mark.parametrize("T,D,causal,dtype,seg,bh", CASES, ids=[case_id(c) for c in CASES])
def test_forward_backward(T, D, causal, dtype, seg, bh, device):
    run_and_compare(bh[0], bh[1], T, D, causal, dtype, seg, device=device, fn=gemm_softmax_attention)


def test_noncontiguous_qkv_views(device):
    run_and_compare(2, 2, 33, 16, True, torch.float32, seg=True, device=device, layout="qkv",
                    fn=gemm_softmax_attention)


@pytest.mark.parametrize("T,D,causal,dtype,seg", [(33, 16, True, torch.float32, True),
                                                  (70, 32, False, torch.float16, False)])
def test_dropout_matches_regenerated_mask(T, D, causal, dtype, seg, device):
    run_and_compare(1, 2, T, D, causal, dtype, seg, p=0.1, seed=987, device=device, fn=gemm_softmax_attention)


def test_same_dropout_mask_as_flash(device):
    """Both candidates draw keep_ij from Philox(seed, b·H+h, i, j): one seed, the same output."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen).to(device) for _ in range(3))
    seg = torch.tensor([[0] * 15 + [1] * 25, [0] * 40], device=device)
    a = gemm_softmax_attention(q, k, v, segment_ids=seg, dropout_p=0.2, dropout_seed=42)
    b = attention(q, k, v, segment_ids=seg, dropout_p=0.2, dropout_seed=42)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    c = gemm_softmax_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(5)
    assert torch.equal(c, gemm_softmax_attention(q, k, v, dropout_p=0.2))


def test_dropout_unbiased_over_seeds(device):
    T, D, p, N = 8, 16, 0.3, 100
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, D, generator=gen).to(device) for _ in range(3))
    outs = torch.stack([gemm_softmax_attention(q, k, v, dropout_p=p, dropout_seed=s) for s in range(N)])
    mean, std = outs.mean(0), outs.std(0)
    assert ((mean - gemm_softmax_attention(q, k, v)).abs() <= 5 * std / math.sqrt(N) + 1e-4).all()


def test_model_parity(device):
    model_parity(gemm_softmax_attention, device)


def test_errors(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="one shape"):
        gemm_softmax_attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="16..128"):
        x = torch.randn(1, 1, 8, 8)
        gemm_softmax_attention(x, x, x)
    with pytest.raises(TypeError, match="dtype"):
        x = torch.ones(1, 1, 8, 16, dtype=torch.int64)
        gemm_softmax_attention(x, x, x)
    with pytest.raises(ValueError, match="segment_ids"):
        gemm_softmax_attention(q, q, q, segment_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="MAX_T"):
        GS.softmax_config(80, GS.MAX_T + 1, torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensor|CUDA"):
        gemm_softmax_attention(q, q, q)


def test_config_table_covers_dispatcher():
    table = {(c["fn"], c["archs"], c["types"]["P"], c["constexprs"]["BLOCK_T"], c["constexprs"]["ROWS"],
              c["num_warps"]) for c in GS.target_configs()}
    for arch, cls in ((75, 75), (80, 80), (86, 80), (90, 90)):
        for dtype, name in ((torch.float16, "fp16"), (torch.float32, "fp32")) + (((torch.bfloat16, "bf16"),)
                                                                                 if arch >= 80 else ()):
            for T in (1, 17, 128, 129, 1000, 2048, 8192):
                cfg = GS.softmax_config(arch, T, dtype)
                for fn, key in ((GS._softmax_fwd, "fwd"), (GS._softmax_bwd, "bwd")):
                    assert (fn, (cls,), f"*{name}", *cfg[key]) in table


@requires_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T,D,causal,seg,p", [(128, 64, True, False, 0.0), (128, 64, True, True, 0.1),
                                              (500, 80, False, True, 0.0), (1024, 128, True, False, 0.1)])
def test_gpu(dtype, T, D, causal, seg, p):
    run_and_compare(4, 6, T, D, causal, dtype, seg, p=p, device="cuda", fn=gemm_softmax_attention)
