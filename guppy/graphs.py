"""The whole training step as one CUDA graph.

GuppyLM's step is ~25 ms on a T4 for ~45 GFLOP of work: the GPU mostly waits for Python to launch the next of some
hundreds of small kernels. Packed batches have one static shape, (B, max_seq_len), so the step can be captured once
and replayed: one launch per step, no Python between kernels.

What is captured: zero the grads, forward, backward, and the optimizer's finish: with fp16 (T4) the GradScaler's
unscale, clipping, step and scale update; without a GradScaler, clipping and the step. Both of guppy's optimizers
declare `_step_supports_amp_scaling` (torch's fused AdamW, and guppy.muon.Muon), so GradScaler.step hands them the
found-inf flag as a device tensor and they skip an overflowed step on the device: nothing in the step reads a value
back, which is what lets it be captured, and the host never waits for it.
What stays outside: copying the next batch into the static input buffers (from page-locked memory, asynchronous),
setting the learning rate (a device tensor per optimizer group, which the captured optimizer reads), and the loss's
clone and running sum: 8 small ops a step for guppy-9m-fast (`python -m bench host` counts them).

Requirements: every op in the step must be capturable (no host syncs, no CPU tensors created per step); the Triton
kernels of guppy.kernels are. Dropout inside the graph gets fresh randomness on every replay from PyTorch's
graph-safe Philox offsets; guppy's attention kernel reads its dropout seed from a device tensor for the same reason.
"""
from __future__ import annotations

import torch

from .data import Batch


class CudaGraphStep:
    """Call it like `train_step` (guppy/train.py); the first `warmup` calls run eagerly on a side stream (they are
    real training steps), the next one captures the graph, and every call after that replays it."""

    def __init__(self, model, optimizer, scaler, grad_clip, amp_dtype, warmup: int = 3):
        self.model, self.optimizer, self.scaler, self.grad_clip = model, optimizer, scaler, grad_clip
        self.amp_dtype, self.warmup = amp_dtype, warmup
        self.calls, self.graph, self.static, self.static_loss = 0, None, None, None
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = self.params[0].device
        for g in optimizer.param_groups:  # the captured optimizer must read lr from memory, not bake in a float
            if not torch.is_tensor(g["lr"]):
                raise ValueError("CudaGraphStep needs an optimizer whose lr is a CUDA tensor (see make_optimizer)")
        if scaler.is_enabled() and not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError("CudaGraphStep with a GradScaler needs an optimizer that skips overflowed steps on the "
                             "device (_step_supports_amp_scaling: fused AdamW or guppy's Muon)")

    def _body(self, b: Batch):
        self.optimizer.zero_grad(set_to_none=False)
        with torch.autocast(b.idx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            _, loss = self.model(b.idx, b.targets, segment_ids=b.segment_ids, positions=b.positions)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # without a GradScaler (bf16, fp32): nothing, a plain step, nothing
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def __call__(self, b: Batch):
        """One training step on the host batch b (page-locked when it comes from guppy's Batcher on CUDA)."""
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(b.to(self.device, non_blocking=True))
        if self.graph is None:
            self._capture(b.to(self.device, non_blocking=True))
        else:
            for dst, src in zip((self.static.idx, self.static.targets, self.static.segment_ids,
                                 self.static.positions), (b.idx, b.targets, b.segment_ids, b.positions)):
                if dst is not None:
                    dst.copy_(src, non_blocking=True)
        self._replay()
        return self.static_loss.clone()

    def _eager(self, b: Batch):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self._body(b)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, b: Batch):
        """b's tensors become the graph's static inputs; the capture records the step without running it."""
        self.static = b
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._body(self.static)

    def _replay(self):
        self.graph.replay()
