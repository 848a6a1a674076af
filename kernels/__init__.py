"""guppy.kernels: hand-written Triton kernels behind `guppy.ops` (the `"triton"` implementation).

- `layer_norm(x, weight, bias, eps=1e-5, residual=None)`                       kernels/layer_norm.py
- `cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, inplace_grad=False)`
  and `linear_cross_entropy(hidden, weight, target, ..., chunk_size=None)`     kernels/cross_entropy.py
- `attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, ...)`   kernels/attention.py
  (falls back to `guppy.ops.attention_reference` while that module is missing, so the rest still imports)

Each kernel module may define `target_configs()` for `guppy targets` (see guppy/targets.py). On CPU tensors the kernels
run only under TRITON_INTERPRET=1, which must be set before this package is imported (triton decides at decoration).
"""
from ._utils import check_triton_device, interpreting
from .cross_entropy import cross_entropy, linear_cross_entropy
from .layer_norm import layer_norm

try:
    from .attention import attention
    HAS_TRITON_ATTENTION = True
except ImportError:  # the Triton attention kernel is not there yet (or failed to import): use the specification
    from ..ops import attention_reference as attention
    HAS_TRITON_ATTENTION = False

__all__ = ["layer_norm", "cross_entropy", "linear_cross_entropy", "attention", "check_triton_device", "interpreting",
           "HAS_TRITON_ATTENTION"]

try:
    from . import masked_softmax as _masked_softmax
except ImportError:
    _masked_softmax = None
else:
    for _name in getattr(_masked_softmax, "__all__", ("masked_softmax",)):
        if hasattr(_masked_softmax, _name):
            globals()[_name] = getattr(_masked_softmax, _name)
            __all__.append(_name)
