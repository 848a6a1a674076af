"""Kernel suites: guppy's kernels against eager torch, torch.compile, Liger-Kernel and SDPA, on the current GPU.

    python -m bench kernels [--suite layer_norm,cross_entropy,attention] [--quick]

Every case is timed with `triton.testing.do_bench` (CUDA events, warm-up, median and 20/80 percentiles) for the
forward, the backward and both. Memory-bound ops report GB/s over the fewest bytes the op must move (written out in
`bytes_*` below) against a measured device-to-device copy bandwidth; attention reports TFLOPS with the causal FLOP
count (half of 4·B·H·T²·D forward, 2.5x that backward). Peak memory is torch.cuda.max_memory_allocated over one
fwd+bwd. The references are the same functions the tests use (guppy/reference.py).

Results: bench/results/kernels-<device>-<date>.json (+ a PNG). The same cases run under pytest-benchmark with
`pytest bench/test_kernels.py` (GPU only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from guppy import reference
from guppy.ops import get_ops

from .common import default_result_path, environment, pyplot, write_result


@dataclass
class Case:
    suite: str          # layer_norm | cross_entropy | attention
    shape: str          # e.g. "4096x384"
    impl: str           # ours / eager / compile / liger / sdpa-flash ...
    make: Callable      # () -> (forward fn returning the output to differentiate, list of input tensors w/ grad,
                        #        reference fn: the spec's output for the same inputs, in fp32)
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0
    flops_fwd: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------------
def _liger(name):
    try:
        from liger_kernel.transformers import functional as lf
        return getattr(lf, name)
    except Exception:
        return None


def layer_norm_cases(dtype, quick, device="cuda"):
    shapes = [(4096, 384)] if quick else [(4096, 384), (65536, 384), (8192, 4096)]
    impls = {"eager": reference.layer_norm_reference,
             "compile": torch.compile(reference.layer_norm_reference, dynamic=False),
             "ours": lambda *a, **k: get_ops("triton").layer_norm(*a, **k)}
    liger = _liger("liger_layer_norm")
    if liger is not None:
        impls["liger"] = lambda x, w, b, eps: liger(x, w, b, eps)
    for M, N in shapes:
        s = torch.finfo(dtype).bits // 8
        for name, fn in impls.items():
            def make(fn=fn, M=M, N=N):
                x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
                w = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
                b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
                return ((lambda: fn(x, w, b, 1e-5)), [x, w, b],
                        lambda: reference.layer_norm_reference(x.float(), w.float(), b.float(), 1e-5))
            # fwd reads x, writes y; bwd reads x and dy, writes dx (weights and statistics are small)
            yield Case("layer_norm", f"{M}x{N}", name, make, bytes_fwd=2 * M * N * s, bytes_bwd=3 * M * N * s)


def cross_entropy_cases(dtype, quick, device="cuda"):
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (8192, 4096), (8192, 32000)]
    impls = {"eager": reference.cross_entropy_reference,
             "compile": torch.compile(reference.cross_entropy_reference, dynamic=False),
             "ours": get_ops("triton").cross_entropy}
    liger = _liger("liger_cross_entropy")
    if liger is not None:
        impls["liger"] = lambda z, t: liger(z, t)
    for N, V in shapes:
        s = torch.finfo(dtype).bits // 8
        for name, fn in impls.items():
            def make(fn=fn, N=N, V=V):
                z = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
                t = torch.randint(0, V, (N,), device=device)
                t[::7] = -100
                return (lambda: fn(z, t)), [z], (lambda: reference.cross_entropy_reference(z.float(), t))
            # fused: read the logits once, write their gradient once
            yield Case("cross_entropy", f"{N}x{V}", name, make, bytes_fwd=2 * N * V * s, bytes_bwd=0)


def attention_cases(dtype, quick, device="cuda"):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    shapes = [(32, 6, 128, 64)] if quick else [(32, 6, 128, 64), (8, 6, 512, 64), (2, 6, 2048, 64)]

    def sdpa_with(backend):
        def fn(q, k, v, **kw):
            with sdpa_kernel([backend]):
                return reference.attention_sdpa(q, k, v, **kw)
        return fn

    impls = {"naive": reference.attention_reference, "ours-triton": get_ops("triton").attention,
             "sdpa-flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
             "sdpa-efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
             "sdpa-cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION)}
    impls["ours-gemm-softmax"] = get_ops("gemm-softmax").attention
    try:
        from guppy import csrc
        impls["ours-csrc"] = csrc.attention
    except Exception:
        pass
    for B, H, T, D in shapes:
        for packed in (False, True):
            variants = dict(impls)
            if packed:  # several conversations per row: flash/efficient/cudnn cannot take the mask -> explicit mask
                variants = {k: v for k, v in impls.items() if not k.startswith("sdpa-")}
                variants["sdpa-explicit-mask"] = reference.attention_sdpa
                if _flex_available():
                    variants["flex-document-mask"] = "flex"
            for name, fn in variants.items():
                def make(fn=fn, B=B, H=H, T=T, D=D, packed=packed, name=name):
                    # the CUDA C++ kernel is the T4's, fp16 only: on an sm_80+ GPU it is timed in fp16 (a sanity
                    # check of T4 code on another chip, not the T4 result)
                    dt = torch.float16 if name == "ours-csrc" else dtype
                    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dt, requires_grad=True)
                    q, k, v = qkv.permute(2, 0, 3, 1, 4)
                    seg = None
                    if packed:  # ~4.7 conversations per 128 tokens, as in guppy's packed rows
                        lengths = torch.randint(T // 8, T // 3, (B, T), device=device)
                        seg = (torch.arange(T, device=device)[None, :] // lengths[:, :1]).to(torch.int32)
                    if fn == "flex":  # the block mask is built once, outside the timed region, as a model would
                        fn = _flex_document_attention(seg, B, T)
                    kw = {"causal": True}
                    if seg is not None and name != "flex-document-mask":
                        kw["segment_ids"] = seg
                    return ((lambda: fn(q, k, v, **kw)), [qkv],
                            lambda: reference.attention_reference(q.float(), k.float(), v.float(), segment_ids=seg))
                yield Case("attention", f"B{B} H{H} T{T} D{D}" + (" packed" if packed else ""), name, make,
                           flops_fwd=4 * B * H * T * T * D / 2)


def _flex_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _flex_document_attention(seg, B, T):
    """FlexAttention (compiled) with a causal document mask for these segment ids."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def doc_causal(b, h, qi, ki):
        return (seg[b, qi] == seg[b, ki]) & (ki <= qi)
    mask = create_block_mask(doc_causal, B, None, T, T, device=seg.device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v, causal=True):
        return compiled(q, k, v, block_mask=mask)
    return fn


SUITES = {"layer_norm": layer_norm_cases, "cross_entropy": cross_entropy_cases, "attention": attention_cases}


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------
def copy_bandwidth_gbs() -> float:
    """A device-to-device copy of 1 GiB: bytes read + bytes written over the median time."""
    from triton.testing import do_bench
    src = torch.empty(2 ** 28, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


# fp32 compares at 1e-4 (reductions in another order), fp16 / bf16 at a few units of their rounding at |ref| ~ 1-10
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def check_output(case: Case) -> float:
    """Run the case's forward once and compare it with the spec's output for the same inputs (in fp32), at the output
    dtype's tolerance. Raises AssertionError naming the case when it differs; returns the largest absolute error."""
    fwd, _, expected = case.make()
    with torch.no_grad():
        out, ref = fwd(), expected().float()
    atol, rtol = TOLERANCE[out.dtype]
    out = out.float()
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol,
                               msg=lambda m: f"{case.suite} {case.shape} {case.impl} differs from the reference: {m}")
    return (out - ref).abs().max().item()


def measure(case: Case, copy_gbs: float) -> dict:
    """Check the case's output against the reference once, then time it. A case that does not run (e.g. cuDNN on
    sm_75) or whose output is wrong is a row with an "error" instead of timings."""
    from triton.testing import do_bench
    row = {"suite": case.suite, "shape": case.shape, "impl": case.impl}
    try:
        row["max_abs_err"] = check_output(case)
        fwd, inputs, _ = case.make()
        out = fwd()
        grad = torch.randn_like(out) if out.dim() else torch.ones_like(out)

        def fwd_bwd():
            for t in inputs:
                t.grad = None
            fwd().backward(grad)

        def bwd_only():
            o = fwd()
            return lambda: o.backward(grad, retain_graph=True)

        q = [0.5, 0.2, 0.8]
        row["fwd_ms"] = do_bench(fwd, quantiles=q)
        row["fwd_bwd_ms"] = do_bench(fwd_bwd, quantiles=q, grad_to_none=inputs)
        bwd = bwd_only()
        row["bwd_ms"] = do_bench(bwd, quantiles=q, grad_to_none=inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 2)
    except Exception as e:  # a backend that does not support this case (e.g. cuDNN on sm_75) is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        return row
    med = row["fwd_bwd_ms"][0]
    if case.bytes_fwd:
        gbs = (case.bytes_fwd + case.bytes_bwd) / (med * 1e-3) / 1e9
        row["fwd_bwd_gbs"] = round(gbs, 1)
        row["fraction_of_copy_bw"] = round(gbs / copy_gbs, 3)
    if case.flops_fwd:
        row["fwd_tflops"] = round(case.flops_fwd / (row["fwd_ms"][0] * 1e-3) / 1e12, 2)
        row["fwd_bwd_tflops"] = round(3.5 * case.flops_fwd / (med * 1e-3) / 1e12, 2)
    return row


def plot(result, path):
    plt = pyplot()
    if plt is None:
        return None
    groups = {}
    for r in result["rows"]:
        if "fwd_bwd_ms" in r:
            groups.setdefault((r["suite"], r["shape"]), []).append(r)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.6 + 0.35 * sum(len(g) for g in groups.values())),
                             squeeze=False)
    for ax, ((suite, shape), rows) in zip(axes[:, 0], groups.items()):
        ax.barh([r["impl"] for r in rows], [r["fwd_bwd_ms"][0] for r in rows])
        ax.set_title(f"{suite} {shape}: fwd+bwd ms (lower is better)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{result['device']} | torch {result['torch']} | triton {result['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args):
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench kernels needs a CUDA GPU (the kernels' correctness is checked on the CPU by "
                         "`make test`; their speed only means something on a GPU)")
    cc = torch.cuda.get_device_capability()
    dtype = torch.float16 if cc < (8, 0) or args.dtype == "fp16" else torch.bfloat16
    env = environment("cuda")
    copy_gbs = copy_bandwidth_gbs()
    result = {**env, "benchmark": "kernels", "dtype": str(dtype).replace("torch.", ""),
              "copy_bandwidth_gbs": round(copy_gbs, 1), "rows": []}
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}, {result['dtype']}, "
          f"copy bandwidth {copy_gbs:.0f} GB/s")
    for suite in args.suite.split(","):
        for case in SUITES[suite](dtype, args.quick):
            row = measure(case, copy_gbs)
            result["rows"].append(row)
            if "error" in row:
                print(f"{suite:14s} {case.shape:22s} {case.impl:20s} {row['error']}")
                continue
            perf = (f"{row['fwd_bwd_gbs']:8.0f} GB/s ({row['fraction_of_copy_bw']:.0%} of copy)"
                    if "fwd_bwd_gbs" in row else f"{row['fwd_bwd_tflops']:8.1f} TFLOPS")
            print(f"{suite:14s} {case.shape:22s} {case.impl:20s} fwd {row['fwd_ms'][0]:8.3f} ms  "
                  f"bwd {row['bwd_ms'][0]:8.3f} ms  fwd+bwd {row['fwd_bwd_ms'][0]:8.3f} ms  {perf}  "
                  f"peak {row['peak_mem_mb']} MB")
    write_result(result, args.out or default_result_path(result, "kernels-"), plot)
    return result
