"""Counting host syncs: the calls that make the CPU wait until the GPU has finished everything queued before them.

A CUDA kernel launch returns at once, so while the training loop never reads a device value back, the host runs
ahead of the GPU: it builds the next batch and queues the next step while the current one computes. One read-back
(a sync) drains that queue and leaves the GPU idle while the host catches up. guppy's loop reads the loss once per
log window and nowhere else; `SyncCounter` checks that claim on any device, the CPU included, by watching the aten
ops that need a device value on the host:

    _local_scalar_dense      .item(), float(t), int(t), bool(t), printing a 0-d tensor, `if t:`
    nonzero, masked_select,  output shapes that depend on the data: the host must read the data to size them
    unique*, ...
    a copy to the CPU        .cpu(), .tolist(), .numpy() on a device tensor (counted when its source is not on
                             the CPU)

count_cpu=True also counts the first two kinds on CPU tensors: a run whose stand-in device is the CPU.

plus `torch.cuda.synchronize()` where CUDA exists. torch's GradScaler reads found_inf with `.item()` for an optimizer
that does not declare `_step_supports_amp_scaling`: that read is one of these.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default}
DATA_DEPENDENT_SHAPES = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
                         aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor}


def _on_device(x) -> bool:
    if isinstance(x, (list, tuple)):  # the foreach ops take lists of tensors
        return any(_on_device(t) for t in x)
    return torch.is_tensor(x) and x.device.type != "cpu"


def _reads_back(func, args, kwargs, count_cpu: bool) -> bool:
    if func in SCALAR_READS or func in DATA_DEPENDENT_SHAPES:
        return count_cpu or args[0].device.type != "cpu"
    if func is aten.copy_.default:  # copy_(dst, src): a device tensor copied into a host one
        dst, src = args[0], args[1]
        return torch.is_tensor(src) and src.device.type != "cpu" and dst.device.type == "cpu"
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    return False


class SyncCounter(TorchDispatchMode):
    """`with SyncCounter() as syncs: ...` then `syncs.total` (and `syncs.by_op`, op name -> count).

    count_cpu: count reads of CPU tensors too, for a test whose stand-in device is the CPU itself. Off (the default),
    only reads of device tensors count: reading a host batch's own numbers costs no wait."""

    def __init__(self, count_cpu: bool = False):
        super().__init__()
        self.count_cpu = count_cpu
        self.by_op: Counter = Counter()
        self.ops = 0         # every aten op seen but views
        self.device_ops = 0  # those on a device tensor: each a kernel launch on a GPU
        self._cuda_sync = None

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:  # a view (detach, reshape, ...) launches no kernel
            self.ops += 1
            self.device_ops += any(_on_device(a) for a in (*args, *kwargs.values()))
        if _reads_back(func, args, kwargs, self.count_cpu):
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        if torch.cuda.is_available():  # not an aten op: count it by wrapping the function for this block
            self._cuda_sync = torch.cuda.synchronize

            def counted(*a, **k):
                self.by_op["cuda.synchronize"] += 1
                return self._cuda_sync(*a, **k)

            torch.cuda.synchronize = counted
        return super().__enter__()

    def __exit__(self, *exc):
        if self._cuda_sync is not None:
            torch.cuda.synchronize, self._cuda_sync = self._cuda_sync, None
        return super().__exit__(*exc)
