"""guppy.kernels (installed as `guppy.kernels`, from the repository's `kernels/`): hand-written Triton kernels.

One op per file; each defines the Triton kernels, plain launchers, the autograd.Function, and the public function:

    guppy.kernels.layer_norm.layer_norm(x, weight, bias, eps=1e-5, residual=None)
    guppy.kernels.cross_entropy.cross_entropy(logits, target, ignore_index=-100, reduction="mean", ...)
    guppy.kernels.cross_entropy.linear_cross_entropy(hidden, weight, target, ..., chunk_size=None)
    guppy.kernels.attention.attention(q, k, v, causal=True, sm_scale=None, segment_ids=None, dropout_p=0.0, ...)
    guppy.kernels.gemm_softmax.gemm_softmax_attention(q, k, v, ...)      cuBLAS GEMMs + a fused Triton softmax

The specification of each is in guppy/reference.py; guppy/ops.py decides which implementation the model calls.
The package itself imports nothing (and so needs no Triton until a kernel module is imported), and binds no name
that would hide a submodule. On CPU tensors the kernels run only under TRITON_INTERPRET=1, which must be set before
a kernel module is imported (triton decides at decoration).
"""
