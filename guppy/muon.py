"""Muon for the hidden weight matrices, AdamW for everything else, in one optimizer.

Muon (Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/) keeps SGD's Nesterov momentum but replaces each matrix's update by the
nearest semi-orthogonal matrix, U V^T where U S V^T is its SVD: every direction the update moves in gets the same step
size, instead of the few dominant ones taking it all. U V^T is approximated by a few steps of a quintic Newton-Schulz
iteration, X <- a X + (b A + c A^2) X with A = X X^T, which pushes every singular value of X (scaled to norm <= 1)
towards ~1 using matmuls only. Its coefficients (3.4445, -4.7750, 2.0315) are the post's: they maximise the slope at 0,
so small singular values grow fast, at the price of landing anywhere in about [0.7, 1.2] rather than exactly on 1.
Embeddings, the tied LM head, norms and biases are not hidden matrices and keep AdamW (the post's advice too).

Why not torch.optim.Muon (torch >= 2.9): it reads its learning rate back as a Python float, so a CUDA graph would
bake in the first step's value, and it covers only the matrices, which would make two optimizers of one. Here the
learning rates are whatever `guppy.train.set_lr` puts in the groups (device tensors under CUDA graphs) and no step
syncs with the host, so the whole step can be captured.

fp16 (T4) and the GradScaler: the optimizer declares `_step_supports_amp_scaling`, as torch's fused AdamW does, so
`GradScaler.step` hands it `found_inf` (and `grad_scale` when unscale_ was not called) as device tensors instead of
reading found_inf with `.item()`, a host sync every step. The skip happens on the device: every update is multiplied
by keep = 1 - found_inf (a momentum lerp by (1-mu)·keep, AdamW's step count by +keep, ...), after the gradients'
non-finite entries are zeroed in place so that 0·inf cannot make a NaN. A skipped step leaves parameters and state
exactly as they were, and the whole scaled step can be captured in the training step's CUDA graph.

Each group says which rule it follows: {"muon": True} groups take `lr`, `momentum`, `weight_decay`; the others are
AdamW groups (`lr`, `betas`, `eps`, `weight_decay`). Muon's update is scaled by sqrt(max(1, rows/cols)), the post's
rule, so tall and wide matrices move by the same root-mean-square per entry.

The per-parameter arithmetic uses torch's multi-tensor (`torch._foreach_*`) ops, as torch's own optimizers do: one
kernel per operation for a whole group instead of one per parameter, and the Newton-Schulz steps as fused baddbmm
calls. At GuppyLM's 6 layers a step is 105 non-view aten ops (1,078 written per parameter; counted with a
TorchDispatchMode on the CPU), which matters where the step runs outside a CUDA graph: fp16 with a GradScaler (T4).
"""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype=torch.float32) -> torch.Tensor:
    """~U V^T of each matrix in g (..., rows, cols) by `steps` quintic Newton-Schulz iterations, computed in dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.float().reshape(-1, *g.shape[-2:])
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix, X X^T
    # Frobenius norm >= spectral norm: singular values <= 1. Normalised in fp32, then cast: an update of 1e-6-sized
    # entries cast to fp16 first would lose them to subnormals and zero (2 % error at 1e-6, issue 18).
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, poly, x, beta=a)                    # a X + (b A + c A^2) X
    return (x if wide else x.mT).reshape(g.shape).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on the {"muon": True} groups, AdamW on the others. `ns_dtype`: the Newton-Schulz matmuls' dtype (bf16 or
    fp16 on a GPU, where they are cheap; fp32 on a CPU)."""

    _step_supports_amp_scaling = True  # GradScaler.step passes found_inf / grad_scale as tensors (header)

    def __init__(self, params, lr=0.02, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, ns_steps=5,
                 ns_dtype=torch.float32):
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, muon=False)
        super().__init__(params, defaults)
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step for the length of this call (torch's contract for amp-aware optimizers): found_inf
        # is 1.0 where the scaled gradients overflowed; grad_scale is None once unscale_ has run.
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        keep = 1.0 if found_inf is None else 1.0 - found_inf  # 0 (a device tensor) skips the step
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if grad_scale is not None:
                torch._foreach_div_(grads, grad_scale)
            if found_inf is not None:
                for g in grads:  # in place: 0 · inf would be NaN where keep gates an update
                    torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            (self._muon_step if group["muon"] else self._adamw_step)(group, params, grads, keep)
        return loss

    def _muon_step(self, group, params, grads, keep):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if torch.is_tensor(keep):
            torch._foreach_lerp_(bufs, grads, [(1 - mu) * keep] * len(bufs))
        else:
            torch._foreach_lerp_(bufs, grads, 1 - mu)
        updates = torch._foreach_lerp(grads, bufs, mu)  # Nesterov: look one momentum step ahead
        step_lr = lr * keep  # lr and keep may be device tensors: no host sync anywhere
        if wd:
            torch._foreach_mul_(params, 1 - step_lr * wd)
        # Matrices of one shape, tall ones transposed, are orthogonalised together as one batch: GuppyLM's 24 hidden
        # matrices make 3 batches (qkv^T; out; FFN up^T with down).
        batches: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            batches.setdefault((min(p.shape), max(p.shape)), []).append(i)
        for idx in batches.values():
            tall = [params[i].size(0) > params[i].size(1) for i in idx]
            ortho = orthogonalize(torch.stack([updates[i].T if t else updates[i] for i, t in zip(idx, tall)]),
                                  self.ns_steps, self.ns_dtype)
            ortho *= step_lr
            for i, t, o in zip(idx, tall, ortho):
                rows, cols = params[i].shape
                params[i].sub_(o.T if t else o, alpha=max(1.0, rows / cols) ** 0.5)

    def _adamw_step(self, group, params, grads, keep):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                # the step count lives on the parameter's device, as in torch's capturable AdamW
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, [keep] * len(steps) if torch.is_tensor(keep) else keep)  # (a list: no .item())
        if torch.is_tensor(keep):  # each update weighted by keep: a skipped step changes no state
            torch._foreach_lerp_(m, grads, [(1 - beta1) * keep] * len(m))
            torch._foreach_mul_(v, beta2 ** keep)
            torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(grads, grads), (1 - beta2) * keep))
        else:
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        step_lr = lr * keep
        if wd:
            torch._foreach_mul_(params, 1 - step_lr * wd)
        # a group's parameters step together; at least 1, so that a first step skipped divides by no zero
        step = states[0]["step"].clamp(min=1)
        denom = torch._foreach_mul(v, 1 / (1 - beta2 ** step))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, step_lr / (1 - beta1 ** step))
        torch._foreach_sub_(params, update)
