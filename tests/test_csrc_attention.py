"""guppy.csrc.attention vs the fp32 reference: forward and every gradient.

CPU tensors run the kernel source of csrc/attention.cu compiled for the host and executed by the CUDA emulator
(csrc/cuda_emu.h); with a GPU the same cases also run the nvcc build.

Reference: F.scaled_dot_product_attention in fp32 on the same fp16 inputs (explicit bool mask from
guppy.reference.attention_mask for segments), or, with dropout, the same math written out with the regenerated keep mask.
Tolerance: TOL_MULT x the error that the plain PyTorch path makes in fp16 (attention_reference on the fp16 inputs,
computed in fp16 with fp16 autograd) against that fp32 reference, measured per case and per output, with an absolute
floor of ABS_FLOOR x (1 + the largest |ref| of any output of the case) for tiny cases: at T <= 2 the fp16 path can be
exact while the kernel is not (e.g. dK is exactly 0 when every row sees only itself, and the kernel's Delta comes
from the fp16-rounded O, so it returns ~1e-3 there).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import guppy
from guppy.reference import attention_mask, attention_reference

csrc = pytest.importorskip("guppy.csrc")

TOL_MULT = 3.0
ABS_FLOOR = 2e-3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

#       T    D    causal segments   strided dropout
CASES = [
    (1,   32,  True,  None,      False, 0.0),
    (1,   64,  True,  "packed",  False, 0.0),
    (1,   128, False, None,      True,  0.0),
    (17,  64,  False, "packed",  True,  0.0),
    (17,  128, True,  None,      False, 0.2),
    (17,  32,  False, None,      False, 0.2),
    (64,  128, True,  "packed",  False, 0.2),
    (64,  32,  False, None,      True,  0.0),
    (64,  64,  True,  None,      False, 0.1),
    (65,  32,  False, None,      True,  0.2),
    (65,  64,  True,  "packed",  False, 0.0),
    (65,  128, True,  "packed",  True,  0.0),
    (65,  32,  True,  "unsorted", False, 0.0),
    (128, 64,  True,  None,      True,  0.0),
    (128, 32,  False, "packed",  False, 0.2),
    (128, 128, True,  "packed",  False, 0.0),
    (129, 128, False, "packed",  False, 0.0),
    (129, 64,  True,  "packed",  False, 0.1),
    (129, 32,  True,  None,      True,  0.0),
    (200, 32,  True,  "packed",  True,  0.0),
    (200, 128, True,  None,      True,  0.2),
    (200, 64,  False, None,      False, 0.0),
]


def make_segments(B, T, kind, gen):
    """Packed rows: uneven conversation lengths, different per batch row (non-decreasing ids), or an unsorted
    pattern (exact, but no tile skipping)."""
    rows = []
    for b in range(B):
        if kind == "unsorted":
            rows.append(torch.tensor([(t // 7 + b) % 3 for t in range(T)]))
            continue
        ids, s = [], 0
        while len(ids) < T:
            n = int(torch.randint(1, max(2, T // 2), (1,), generator=gen))
            ids += [s] * n
            s += 1
        rows.append(torch.tensor(ids[:T]))
    return torch.stack(rows).to(torch.int32)


def math_attention(q, k, v, causal, sm_scale, seg, keep, p):
    """The reference math written out (dtype of the inputs), with an explicit dropout keep mask."""
    s = (q @ k.transpose(-2, -1)) * sm_scale
    mask = attention_mask(q.shape[-2], k.shape[-2], causal, seg, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(s, dim=-1)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1 - p)
    return probs @ v


def run_case(T, D, causal, seg_kind, strided, p, device, B=2, H=2):
    gen = torch.Generator().manual_seed(1000 * T + D)
    sm_scale = 1 / math.sqrt(D)
    if strided:   # q, k, v are views of one fused projection: strides (T*3*H*D, D, 3*H*D, 1)
        base = torch.randn(B, T, 3, H, D, generator=gen).half()
    else:
        base = torch.randn(3, B, H, T, D, generator=gen).half()
    do = torch.randn(B, H, T, D, generator=gen).half()
    seg = make_segments(B, T, seg_kind, gen) if seg_kind else None
    seed = 4242 + T
    keep = csrc.dropout_mask(B, H, T, p, seed) if p > 0 else None

    def views(leaf):
        return leaf.permute(2, 0, 3, 1, 4) if strided else leaf.unbind(0)

    leaf = base.detach().clone().to(device).requires_grad_()
    q, k, v = views(leaf)
    if strided:
        assert q.stride() == (T * 3 * H * D, D, 3 * H * D, 1)
    out = csrc.attention(q, k, v, causal=causal, sm_scale=sm_scale,
                         segment_ids=None if seg is None else seg.to(device), dropout_p=p, dropout_seed=seed)
    out.backward(do.to(device))
    got = [out.detach().float().cpu()] + [g.float().cpu() for g in views(leaf.grad)]

    def reference(dtype):
        lf = base.detach().clone().to(dtype).requires_grad_()
        q, k, v = views(lf)
        if p == 0 and dtype == torch.float32:
            mask = attention_mask(T, T, causal, seg) if seg is not None else None
            o = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale) if mask is not None
                 else F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale))
        elif p == 0:
            o = attention_reference(q, k, v, causal=causal, sm_scale=sm_scale, segment_ids=seg)
        else:
            o = math_attention(q, k, v, causal, sm_scale, seg, keep, p)
        o.backward(do.to(dtype))
        return [o.detach().float()] + [g.float() for g in views(lf.grad)]

    return got, reference(torch.float32), reference(torch.float16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,D,causal,seg_kind,strided,p", CASES,
                         ids=[f"T{c[0]}-D{c[1]}-{'causal' if c[2] else 'full'}-{c[3] or 'noseg'}"
                              f"{'-strided' if c[4] else ''}{f'-drop{c[5]}' if c[5] else ''}" for c in CASES])
def test_attention_matches_fp32_reference(T, D, causal, seg_kind, strided, p, device):
    got, ref32, ref16 = run_case(T, D, causal, seg_kind, strided, p, device)
    scale = max(r.abs().max().item() for r in ref32)
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), got, ref32, ref16):
        base_err = (b - r).abs().max().item()
        tol = max(TOL_MULT * base_err, ABS_FLOOR * (1 + scale))
        err = (a - r).abs().max().item()
        assert torch.isfinite(a).all(), name
        assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (fp16-reference error {base_err:.3g})"


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keep_rate_and_mask_agree(device):
    """q = 0 gives uniform attention, v = 1 makes out_i = kept_i / (T (1 - p)): the kernel's per-row keep counts
    equal the host-regenerated mask's, and the keep rate is 1 - p within 5 standard errors."""
    B, H, T, D, p, seed = 1, 2, 128, 32, 0.3, 77
    q = torch.zeros(B, H, T, D, dtype=torch.float16, device=device)
    v = torch.ones_like(q)
    out = csrc.attention(q, q, v, causal=False, dropout_p=p, dropout_seed=seed).float().cpu()
    kept = (out[..., 0] * T * (1 - p)).round()
    mask = csrc.dropout_mask(B, H, T, p, seed)
    assert torch.equal(kept, mask.sum(-1).float())
    rate = mask.float().mean().item()
    se = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(rate - (1 - p)) < 5 * se
    # same seed, same result; a different seed, a different mask
    again = csrc.attention(q, q, v, causal=False, dropout_p=p, dropout_seed=seed).float().cpu()
    assert torch.equal(out, again)
    other = csrc.attention(q, q, v, causal=False, dropout_p=p, dropout_seed=seed + 1).float().cpu()
    assert not torch.equal(out, other)


def test_bad_inputs_raise_one_clear_error():
    q = torch.randn(1, 2, 8, 32).half()
    with pytest.raises(TypeError, match="float16"):
        csrc.attention(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head dim"):
        x = torch.randn(1, 2, 8, 48).half()
        csrc.attention(x, x, x)
    with pytest.raises(ValueError, match="one shape"):
        csrc.attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="segment_ids"):
        csrc.attention(q, q, q, segment_ids=torch.zeros(1, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="dropout_p"):
        csrc.attention(q, q, q, dropout_p=1.0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="devices"):
            csrc.attention(q, q.cuda(), q)


def test_unaligned_views_are_copied_not_misread():
    x = torch.randn(1, 2, 9, 33).half()[..., 1:]     # last dim contiguous, strides not multiples of 8
    ref = attention_reference(x.float(), x.float(), x.float())
    out = csrc.attention(x, x, x).float()
    assert (out - ref).abs().max().item() < 5e-3


def test_mini_guppylm_trains_like_reference():
    """A 2-layer GuppyLM (head dim 32) trains 5 AdamW steps on one batch with the csrc attention (fp16 inside, CPU
    emulator) and tracks the fp32 reference-attention run. Tolerance: each step's loss within
    max(3 x the largest drift of a third run whose attention is attention_reference computed in fp16, 5e-3), i.e.
    about 0.1 % of the loss. Why a floor: fp16 rounding moves activations by ~1e-5, which flips a few ReLU masks
    (units with |pre-activation| < 1e-4), and each flip changes one gradient entry by O(1) relative; Adam then carries
    that into the next steps, so the drift of any fp16 attention is a few 1e-3 after 5 steps, and which run flips
    more units is luck. The per-call gradients are checked tightly in test_attention_matches_fp32_reference."""
    def fp16_wrapper(fn):
        def attn(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0):
            out = fn(q.half(), k.half(), v.half(), causal=causal, sm_scale=sm_scale, segment_ids=segment_ids,
                     dropout_p=dropout_p)
            return out.to(q.dtype)
        return attn

    cfg = dict(vocab_size=64, max_seq_len=32, d_model=64, n_layers=2, n_heads=2, ffn_hidden=64, dropout=0.0)
    attns = {"reference": None, "fp16-reference": fp16_wrapper(attention_reference),
             "csrc": fp16_wrapper(csrc.attention)}
    losses = {}
    for name, attn in attns.items():
        torch.manual_seed(0)
        model = guppy.GuppyLM(guppy.ModelConfig(**cfg))
        if attn is not None:
            model.ops = guppy.ops.REFERENCE._replace(name=name, attention=attn)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(1)
        seg = torch.tensor([[0] * 12 + [1] * 20] * 2 + [[0] * 32] * 2, dtype=torch.int32)
        idx = torch.randint(0, 64, (4, 33), generator=gen)   # one fixed batch: the loss must fall
        losses[name] = []
        for _ in range(5):
            _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous(), segment_ids=seg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    ref, base, got = losses["reference"], losses["fp16-reference"], losses["csrc"]
    assert got[-1] < got[0] - 0.05
    tol = max(3 * max(abs(a - b) for a, b in zip(base, ref)), 5e-3)
    for a, b in zip(got, ref):
        assert abs(a - b) <= tol, (losses, tol)
