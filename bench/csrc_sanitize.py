"""A small forward + backward through guppy.csrc.attention (packed segments, causal, dropout on), for compute-sanitizer.

    compute-sanitizer --tool racecheck --kernel-name kns=attn_ --error-exitcode 1 python bench/csrc_sanitize.py

`python -m bench gpu-check` runs it under memcheck, racecheck and synccheck. Each case runs twice: with dropout (the
Philox path; outputs must be finite) and without (checked against guppy.ops.attention_reference in fp32). The cases
cover every head dim the kernel takes, T=80 (a ragged last tile, two conversations in a row) and T=17 (one tile).
`--device cpu` runs the same calls on the host emulator build (the gpu-check CPU smoke).
"""
import argparse
import sys

import torch

CASES = [(80, 64), (80, 32), (80, 128), (17, 64)]   # (T, D); B=2 rows, H=2 heads


def run_case(T, D, device, dropout_p=0.1, seed=1234):
    from guppy import csrc
    from guppy.reference import attention_reference
    g = torch.Generator().manual_seed(T * 1000 + D)
    q, k, v, do = (torch.randn(2, 2, T, D, generator=g).half().to(device) for _ in range(4))
    cut = T * 3 // 8
    seg = torch.tensor([[0] * cut + [1] * (T - cut), [0] * T], dtype=torch.int32, device=device)
    for p in (dropout_p, 0.0):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = csrc.attention(*leaves, causal=True, segment_ids=seg, dropout_p=p, dropout_seed=seed)
        grads = torch.autograd.grad(out, leaves, do)
        for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
            if not torch.isfinite(t).all():
                raise SystemExit(f"csrc_sanitize: T={T} D={D} dropout={p}: {name} has non-finite values")
    ref = attention_reference(*(x.float() for x in (q, k, v)), causal=True, segment_ids=seg)
    err = (out.float() - ref).abs().max().item()
    if not err <= 2e-2 * max(1.0, ref.abs().max().item()):
        raise SystemExit(f"csrc_sanitize: T={T} D={D}: forward differs from the reference by {err:.3g}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    args = p.parse_args(argv)
    for T, D in CASES[:args.cases]:
        run_case(T, D, torch.device(args.device))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"csrc_sanitize: {min(args.cases, len(CASES))} cases ok on {args.device}")


if __name__ == "__main__":
    sys.exit(main())
