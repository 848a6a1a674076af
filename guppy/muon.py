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

Each group says which rule it follows: {"muon": True} groups take `lr`, `momentum`, `weight_decay`; the others are
AdamW groups (`lr`, `betas`, `eps`, `weight_decay`). Muon's update is scaled by sqrt(max(1, rows/cols)), the post's
rule, so tall and wide matrices move by the same root-mean-square per entry.
"""
from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype=torch.float32) -> torch.Tensor:
    """~U V^T of each matrix in g (..., rows, cols) by `steps` quintic Newton-Schulz iterations, computed in dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix, X X^T
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on the {"muon": True} groups, AdamW on the others. `ns_dtype`: the Newton-Schulz matmuls' dtype (bf16 or
    fp16 on a GPU, where they are cheap; fp32 on a CPU)."""

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
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group, params):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            updates.append(p.grad.lerp(buf, mu))  # Nesterov: look one momentum step ahead
        # matrices of one shape are orthogonalised together, as a batch (3 shapes in GuppyLM instead of 24 matrices)
        by_shape: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        for shape, idx in by_shape.items():
            ortho = orthogonalize(torch.stack([updates[i] for i in idx]), self.ns_steps, self.ns_dtype)
            scale = max(1.0, shape[0] / shape[1]) ** 0.5
            for i, o in zip(idx, ortho):
                p = params[i]
                if wd:
                    p.mul_(1 - lr * wd)
                p.sub_(o * (lr * scale))  # lr may be a device tensor: tensor arithmetic, no host sync

    def _adamw_step(self, group, params):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                # the step count lives on the parameter's device, as in torch's capturable AdamW
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            step += 1
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (v / (1 - beta2 ** step)).sqrt_().add_(eps)
            p.sub_(m / denom * (lr / (1 - beta1 ** step)))
