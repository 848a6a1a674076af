"""guppy.csrc.attention vs the fp32 reference: forward and every gradient.

CPU tensors run the kernel source of csrc/attention.cu compiled for the host and executed by the CUDA emulator
(csrc/cuda_emu.h); with a GPU the same cases also run the nvcc build.

Reference: F.scaled_dot_product_attention in fp32 on the same fp16 inputs (explicit bool mask from
guppy.reference.attention_mask for segments), or, with dropout, the same math written out with the regenerated
keep mask.
Tolerance: TOL_MULT x the error that the plain PyTorch path makes in fp16 (attention_reference on the fp16 inputs,
computed in fp16 with fp16 autograd) against that fp32 reference, measured per case and per output, with an absolute
floor of ABS_FLOOR x (1 + the largest |ref| of any output of the case) for tiny cases only: at T = 1 the fp16 path is
exact or nearly (out = v, dV = dO, dQ = dK = 0 up to ~1e-7), while the kernel's fp32 softmax arithmetic leaves
~1e-6 in dQ and dK. From T = 17 up the fp16 error is >= 5e-4 and the floor (~5e-5) never binds: the test asserts
that, so the tolerance is what it says (3x the fp16 reference's own error), which catches a kernel off by 2e-3
relative (test_tolerance_catches_a_kernel_off_by_a_few_ulps; the old floor, 2e-3, bound everywhere and did not).

Then load and verify (csrc/attention_op.py): one availability cache, a self-check that runs on every device type,
in both call orders and whatever grad/autocast mode the caller has, and fails when the kernel is wrong.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import guppy
from guppy.reference import attention_mask, attention_reference

csrc = pytest.importorskip("guppy.csrc")
from guppy.csrc import attention_op, extension  # noqa: E402

TOL_MULT = 3.0
ABS_FLOOR = 1e-5
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
    assert all(torch.isfinite(a).all() for a in got)
    assert out_of_tolerance(got, ref32, ref16) == []
    if T > 1:   # the floor is for tiny cases only (see the module docstring)
        floor = ABS_FLOOR * (1 + max(r.abs().max().item() for r in ref32))
        assert all(floor < TOL_MULT * (b - r).abs().max().item() for r, b in zip(ref32, ref16))


def out_of_tolerance(got, ref32, ref16, abs_floor=ABS_FLOOR):
    """The outputs whose max error against the fp32 reference exceeds max(TOL_MULT x the fp16 path's error, the
    floor), each as one line."""
    floor = abs_floor * (1 + max(r.abs().max().item() for r in ref32))
    bad = []
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), got, ref32, ref16):
        base_err = (b - r).abs().max().item()
        tol = max(TOL_MULT * base_err, floor)
        err = (a - r).abs().max().item()
        if not err <= tol:
            bad.append(f"{name}: max error {err:.3g} > tolerance {tol:.3g} (fp16-reference error {base_err:.3g})")
    return bad


@pytest.mark.parametrize("case,rel", [(CASES[0], 1e-3), (CASES[13], 2e-3)], ids=["T1-off-1e-3", "T128-off-2e-3"])
def test_tolerance_catches_a_kernel_off_by_a_few_ulps(case, rel):
    """A planted bug: every kernel output scaled by (1 + rel), one or two fp16 ulps. The tolerance catches it; the old
    floor, 2e-3 x (1 + max|ref|), which bound in every case, let it pass."""
    got, ref32, ref16 = run_case(*case, "cpu")
    assert out_of_tolerance(got, ref32, ref16) == []
    planted = [a * (1 + rel) for a in got]
    assert out_of_tolerance(planted, ref32, ref16) != []
    assert out_of_tolerance(planted, ref32, ref16, abs_floor=2e-3) == []


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


# --------------------------------------------------------------------------------------------------------------------
# Load and verify: one availability cache, a self-check that runs on every device type and can fail
# --------------------------------------------------------------------------------------------------------------------
class Spy:
    """The real host extension, counting its calls; `fwd_out` / `bwd_out` may change what it returns, which is what
    a wrong kernel looks like to the self-check."""

    def __init__(self, real, fwd_out=None, bwd_out=None):
        self.real, self.fwd_out, self.bwd_out, self.calls = real, fwd_out, bwd_out, {"fwd": 0, "bwd": 0}

    def fwd(self, *args):
        self.calls["fwd"] += 1
        o, lse = self.real.fwd(*args)
        return (self.fwd_out(o) if self.fwd_out else o), lse

    def bwd(self, *args):
        self.calls["bwd"] += 1
        dq, dk, dv = self.real.bwd(*args)
        return self.bwd_out(dq, dk, dv) if self.bwd_out else (dq, dk, dv)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def fresh(monkeypatch):
    """An empty availability cache, and extension.load returning a Spy around the host build (counted)."""
    real = extension.load("cpu")
    spy = Spy(real)
    loads = []
    monkeypatch.setattr(attention_op, "_STATE", {})
    monkeypatch.setattr(extension, "load", lambda *a, **kw: loads.append(a) or spy)
    return spy, loads


def small_qkv(T=24, D=32):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(1, 2, T, D, generator=g).half() for _ in range(3)]


PLANTED = {
    "out off by 2 %": dict(fwd_out=lambda o: o * 1.02),
    "dv off by 2 %": dict(bwd_out=lambda dq, dk, dv: (dq, dk, dv * 1.02)),
    "dq rows shifted": dict(bwd_out=lambda dq, dk, dv: (dq.roll(1, dims=2), dk, dv)),
}


@pytest.mark.parametrize("planted", PLANTED)
def test_self_check_fails_when_the_kernel_is_wrong(fresh, monkeypatch, planted):
    spy, _ = fresh
    for k, fn in PLANTED[planted].items():
        setattr(spy, k, fn)
    ok, reason = csrc.available("cpu")
    assert not ok and reason.startswith(f"self-check failed: {planted.split()[0]} differs from the fp32 reference")
    with pytest.raises(RuntimeError, match="guppy.csrc.attention cannot run on cpu: self-check failed"):
        csrc.attention(*small_qkv())


def test_a_build_error_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(attention_op, "_STATE", {})
    monkeypatch.setattr(extension, "load", lambda *a, **kw: (_ for _ in ()).throw(
        RuntimeError("Error building extension\nnvcc fatal: Unsupported gpu architecture 'compute_75'")))
    assert csrc.available("cpu") == (False, "guppy.csrc build failed: nvcc fatal: Unsupported gpu architecture "
                                            "'compute_75'")


CALLER_MODES = {
    "no_grad + autocast": lambda: _stack(torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16)),
    "inference_mode": lambda: torch.inference_mode(),
    "plain": lambda: _stack(),
}


def _stack(*cms):
    import contextlib
    stack = contextlib.ExitStack()
    for cm in cms:
        stack.enter_context(cm)
    return stack


@pytest.mark.parametrize("first", ["attention", "available"])
@pytest.mark.parametrize("mode", CALLER_MODES)
def test_first_use_verifies_once_whatever_the_caller_set(fresh, monkeypatch, first, mode):
    """Issue 10 finding 1: the self-check differentiates and compares with an fp32 reference, so it runs with grad
    on, autocast off and outside inference mode, in both call orders (`--ops csrc` calls attention() first, `auto`
    calls available() first); it runs once (one load, one backward), and never re-enters the cache."""
    spy, loads = fresh
    seen = []
    real_reference = attention_op.reference.attention_reference

    def spy_reference(q, *args, **kwargs):
        out = real_reference(q, *args, **kwargs)
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.is_inference_mode_enabled(),
                     out.dtype))
        return out

    monkeypatch.setattr(attention_op.reference, "attention_reference", spy_reference)
    q, k, v = small_qkv()
    with CALLER_MODES[mode]():
        if first == "available":
            assert csrc.available("cpu") == (True, "")
        out = csrc.attention(q, k, v)
        assert csrc.available("cpu") == (True, "")
    assert seen == [(True, False, False, torch.float32)]
    assert len(loads) == 1 and spy.calls == {"fwd": 2, "bwd": 1}
    assert (out.float() - real_reference(q.float(), k.float(), v.float())).abs().max().item() < 5e-3


def test_after_the_first_call_a_call_costs_a_lookup(fresh, monkeypatch):
    """Issue 10 finding 3: once verified, a call neither loads nor hashes the extension's sources."""
    spy, loads = fresh
    q, k, v = (x.requires_grad_() for x in small_qkv(T=8))
    csrc.attention(q, k, v).sum().backward()
    hashes = []
    monkeypatch.setattr(extension, "source_hash", lambda: hashes.append(1) or "x")
    for _ in range(20):
        csrc.attention(q, k, v).sum().backward()
    csrc.dropout_mask(1, 1, 4, 0.5, 3)
    assert len(loads) == 1 and hashes == [] and spy.calls["fwd"] == 2 + 20


def test_the_cache_is_per_device_and_build_arch(monkeypatch):
    monkeypatch.delenv("GUPPY_CSRC_ARCH", raising=False)
    assert attention_op._state_key(torch.device("cpu")) == "cpu"
    assert attention_op._state_key(torch.device("cuda", 1)) == "cuda:1/native"
    monkeypatch.setenv("GUPPY_CSRC_ARCH", "75")
    assert attention_op._state_key(torch.device("cuda", 1)) == "cuda:1/75"


def test_first_use_inside_a_cuda_graph_capture_is_refused_not_cached(monkeypatch):
    """GPU-only branch, run with fakes: a capture forbids the self-check's host reads, and a failure there must not
    disable the kernel for the rest of the process."""
    monkeypatch.setattr(attention_op, "_STATE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ok, reason = csrc.available(torch.device("cuda", 0))
    assert not ok and "inside a CUDA graph capture" in reason and attention_op._STATE == {}


def test_no_cuda_device_is_a_reason(monkeypatch):
    monkeypatch.setattr(attention_op, "_STATE", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert csrc.available("cuda") == (False, "no CUDA device available")


class FakeExtension:
    """extension.Extension without a library behind it: holds what the build was asked for."""

    def __init__(self, name, path, emulated):
        self.name, self.path, self.emulated, self.head_dims = name, path, emulated, extension.HEAD_DIMS


@pytest.mark.parametrize("capability,arch_env,gencode,suffix", [
    ((7, 5), None, "-gencode=arch=compute_75,code=sm_75", "-sm75"),
    ((9, 0), None, "-gencode=arch=compute_90,code=sm_90", "-sm90"),
    ((9, 0), "75", "-gencode=arch=compute_75,code=compute_75", "-sm75-ptx"),   # the T4 code as PTX on an H100
])
def test_cuda_build_arguments(monkeypatch, tmp_path, capability, arch_env, gencode, suffix):
    """GPU-only branch, run with fakes: what extension.load("cuda") hands to torch's ninja build (sources, arch flags,
    cache folder). The build itself needs nvcc with a CUDA torch; it runs in the GPU check."""
    from torch.utils import cpp_extension
    calls = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(extension, "_MODULES", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(extension, "nvcc_release", lambda nvcc: (12, 8))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "/built/guppy.so")
    monkeypatch.setattr(extension, "Extension", FakeExtension)
    if arch_env:
        monkeypatch.setenv("GUPPY_CSRC_ARCH", arch_env)
    else:
        monkeypatch.delenv("GUPPY_CSRC_ARCH", raising=False)
    assert extension.load("cuda") is extension.load("cuda")   # the second from memory
    (kw,) = calls
    assert [os.path.basename(s) for s in kw["sources"]] == ["attention_cuda.cpp", "attention.cu", "emu_tests.cu"]
    assert gencode in kw["extra_cuda_cflags"]
    assert kw["build_directory"].startswith(str(tmp_path)) and kw["build_directory"].endswith(suffix)
    assert os.path.exists(os.path.join(kw["build_directory"], "built.ok"))
