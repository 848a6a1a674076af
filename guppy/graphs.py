"""The whole training step as one CUDA graph.

GuppyLM's step is ~25 ms on a T4 for ~45 GFLOP of work: the GPU mostly waits for Python to launch the next of some
hundreds of small kernels. Packed batches have one static shape, (B, max_seq_len), so the step can be captured once
and replayed: one launch per step, no Python between kernels.

What is captured: zero the grads, forward, backward (and, without a GradScaler, clipping and the AdamW step).
What stays outside: copying the next batch into the static input buffers, setting the learning rate (a device tensor
the captured AdamW reads), and with fp16 (T4) the GradScaler's unscale/clip/step/update, which decide on the host
whether to skip a step. torch's fused AdamW takes the scale and the found-inf flag as tensors, so even that path
does not sync with the host.

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
        for g in optimizer.param_groups:  # the captured AdamW must read lr from memory, not bake in a float
            if not torch.is_tensor(g["lr"]):
                raise ValueError("CudaGraphStep needs an optimizer whose lr is a CUDA tensor (see make_optimizer)")

    def _body(self, b: Batch):
        self.optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            _, loss = self.model(b.idx, b.targets, segment_ids=b.segment_ids, positions=b.positions)
        self.scaler.scale(loss).backward()
        if not self.scaler.is_enabled():
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
            self.optimizer.step()
        return loss.detach()

    def _finish_scaled(self):
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def __call__(self, b: Batch):
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._body(b)
                self._finish_scaled()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.static = Batch(*(None if t is None else t.clone() for t in
                                  (b.idx, b.targets, b.segment_ids, b.positions)))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self._body(self.static)
        else:
            for dst, src in zip((self.static.idx, self.static.targets, self.static.segment_ids,
                                 self.static.positions), (b.idx, b.targets, b.segment_ids, b.positions)):
                if dst is not None:
                    dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self._finish_scaled()
        return self.static_loss.clone()
