"""guppy.kernels.layer_norm against F.layer_norm in float64 (the spec: guppy.reference.layer_norm_reference).

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); with a GPU the same tests run on CUDA tensors.
Every gradient is checked: dx, dW, dB and, with the fused residual, d-residual and the gradient that flows back
through the h = x + residual output.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_BF16, HAS_CUDA, requires_gpu
from guppy.kernels.layer_norm import layer_norm
from guppy.kernels.layer_norm import MAX_N, _config_for, reachable_configs

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-2, 1e-2)]
if HAS_BF16:
    DTYPES.append((torch.bfloat16, 5e-2, 5e-2))
SHAPES = [(1, 7), (3, 1), (17, 384), (3, 1000), (2, 4097)]


def _ref(x, w, b, eps, r, dy, dh):
    """float64 F.layer_norm on the same inputs (h rounded to its dtype first, as the reference does) + its grads."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    x64, w64, b64, r64 = leaves
    if r is not None:
        h_dtype = torch.promote_types(x.dtype, r.dtype)
        # the reference adds in the storage dtype; replay that rounding without breaking the float64 graph
        h64 = x64 + r64
        h64 = h64 + ((x.detach().to(h_dtype) + r.detach().to(h_dtype)).double() - h64).detach()
    else:
        h64 = x64
    y64 = F.layer_norm(h64, (x.shape[-1],), w64, b64, eps)
    loss = (y64 * dy.double()).sum()
    if r is not None and dh is not None:
        loss = loss + (h64 * dh.double()).sum()
    loss.backward()
    return y64, h64, [t.grad if t is not None else None for t in leaves]


def _close(a, b, atol, rtol, what):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _run(M, N, dtype, atol, rtol, residual, weight=True, bias=True, eps=1e-5, mean=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*shape):
        return (torch.randn(*shape, generator=g) * scale + mean).to(DEVICE, dtype).requires_grad_()
    x = mk(M, N)
    r = mk(M, N) if residual else None
    w = (torch.randn(N, generator=g) * 0.5 + 1).to(DEVICE, dtype).requires_grad_() if weight else None
    b = (torch.randn(N, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_() if bias else None
    out = layer_norm(x, w, b, eps, residual=r)
    y, h = out if residual else (out, None)
    dy = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    dh = torch.randn(M, N, generator=g).to(DEVICE, dtype) if residual else None
    loss = (y.float() * dy.float()).sum() + ((h.float() * dh.float()).sum() if residual else 0)
    loss.backward()
    y64, h64, grads = _ref(x, w, b, eps, r, dy, dh)
    _close(y, y64, atol, rtol, "y")
    if residual:
        _close(h, h64, atol, rtol, "h")
    # gradients: dx and dr are per row, held to the forward's tolerance at any M; dW and dB each sum M rows, so
    # their tolerance grows with sqrt(M)
    sum_tol = atol * max(1, M) ** 0.5
    for name, t, ref in (("dx", x, grads[0]), ("dw", w, grads[1]), ("db", b, grads[2]), ("dr", r, grads[3])):
        if t is not None:
            assert t.grad is not None and t.grad.dtype == t.dtype, name
            _close(t.grad, ref, sum_tol if name in ("dw", "db") else atol, rtol, name)
    return x, w, b, r


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("M,N", SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_forward_backward(M, N, dtype, atol, rtol, residual):
    _run(M, N, dtype, atol, rtol, residual)


def test_max_n():
    _run(1, MAX_N, torch.float32, 1e-5, 1e-5, residual=True)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_optional_affine(weight, bias):
    _run(5, 96, torch.float32, 1e-5, 1e-5, residual=True, weight=weight, bias=bias)


def test_large_mean_is_stable():
    """mean 1e4, spread 1: a one-pass E[x²]-E[x]² would lose every digit of the variance in fp32."""
    _run(4, 384, torch.float32, 2e-3, 1e-3, residual=False, mean=1e4)
    _run(4, 384, torch.float32, 2e-3, 1e-3, residual=True, mean=5e3)


def test_large_eps_and_tiny_spread():
    _run(3, 64, torch.float32, 1e-5, 1e-5, residual=False, eps=1e-1, scale=1e-3)


def test_noncontiguous_inputs():
    """Row-strided slices are read in place; a view with a strided last dim (transposed) is copied. Both correct."""
    g = torch.Generator().manual_seed(1)
    big = torch.randn(6, 200, generator=g).to(DEVICE)
    x = big[:, 10:110]                                                   # (6, 100), row stride 200
    rt = torch.randn(100, 6, generator=g).to(DEVICE).t()                 # (6, 100), column stride 6
    w = torch.randn(100, generator=g).to(DEVICE)
    b = torch.randn(100, generator=g).to(DEVICE)
    assert not x.is_contiguous() and rt.stride(-1) != 1
    y, h = layer_norm(x, w, b, 1e-5, residual=rt)
    ref_h = x + rt
    _close(h, ref_h, 1e-6, 1e-6, "h")
    _close(y, F.layer_norm(ref_h, (100,), w, b, 1e-5), 1e-5, 1e-5, "y")
    # 3-D input with a permuted (non-contiguous) layout, gradients included
    x3 = torch.randn(4, 3, 50, generator=g).to(DEVICE).transpose(0, 1).requires_grad_()  # (3, 4, 50)
    w3 = torch.randn(50, generator=g).to(DEVICE).requires_grad_()
    y3 = layer_norm(x3, w3, None)
    assert y3.shape == x3.shape
    dy = torch.randn_like(y3)
    (y3 * dy).sum().backward()
    gx, gw = x3.grad.clone(), w3.grad.clone()
    x3.grad = w3.grad = None
    (F.layer_norm(x3, (50,), w3, None) * dy).sum().backward()
    _close(gx, x3.grad, 1e-5, 1e-5, "dx (3-D view)")
    _close(gw, w3.grad, 1e-4, 1e-5, "dw (3-D view)")


def test_residual_is_the_same_tensor():
    """layer_norm(a, residual=x) with x also used elsewhere: both gradient paths accumulate into x."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 32, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(32, generator=g).to(DEVICE)
    y, h = layer_norm(x, w, None, 1e-5, residual=x)
    ((y * 2).sum() + (h ** 2).sum() + x.sum()).backward()
    got = x.grad.clone()
    x.grad = None
    h_ref = x + x
    ((F.layer_norm(h_ref, (32,), w, None) * 2).sum() + (h_ref ** 2).sum() + x.sum()).backward()
    _close(got, x.grad, 1e-5, 1e-5, "dx")


def test_only_one_output_used():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, generator=g).to(DEVICE).requires_grad_()
    r = torch.randn(3, 20, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(20, generator=g).to(DEVICE).requires_grad_()
    _, h = layer_norm(x, w, None, 1e-5, residual=r)
    (h * 3).sum().backward()                               # only h: the LayerNorm path contributes nothing
    _close(x.grad, torch.full_like(x, 3.0), 0, 0, "dx")
    _close(r.grad, torch.full_like(r, 3.0), 0, 0, "dr")
    assert w.grad is None or float(w.grad.abs().max()) == 0.0
    x.grad = r.grad = None
    y, _ = layer_norm(x, w, None, 1e-5, residual=r)
    y.sum().backward()                                     # only y
    h = (x + r).detach().requires_grad_()
    F.layer_norm(h, (20,), w, None).sum().backward()
    _close(x.grad, h.grad, 1e-5, 1e-5, "dx")


def test_mixed_dtypes_residual():
    """fp16 branch output + fp32 residual stream (what the model sees under autocast): h and y are fp32."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 64, generator=g).to(DEVICE, torch.float16).requires_grad_()
    x = torch.randn(5, 64, generator=g).to(DEVICE).requires_grad_()
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    y, h = layer_norm(a, w, None, 1e-5, residual=x)
    assert y.dtype == h.dtype == torch.float32
    (y.sum() + h.sum()).backward()
    assert a.grad.dtype == torch.float16 and x.grad.dtype == torch.float32
    _close(h, a.float() + x, 1e-6, 1e-6, "h")


def test_deterministic_weight_grads():
    g = torch.Generator().manual_seed(5)
    M = 2048 if HAS_CUDA else 300
    x = torch.randn(M, 48, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(48, generator=g).to(DEVICE).requires_grad_()
    b = torch.randn(48, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(M, 48, generator=g).to(DEVICE)
    grads = []
    for _ in range(2):
        w.grad = b.grad = None
        (layer_norm(x, w, b) * dy).sum().backward()
        grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_empty_rows():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    y = layer_norm(x, w, None)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------
def test_errors():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight has shape \(4,\), expected \(8,\)"):
        layer_norm(x, torch.ones(4, device=DEVICE), None)
    with pytest.raises(ValueError, match="outside 1..8192"):
        layer_norm(torch.randn(1, MAX_N + 1, device=DEVICE), None, None)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        layer_norm(torch.ones(2, 8, dtype=torch.int64, device=DEVICE), None, None)
    with pytest.raises(TypeError, match="float64"):
        layer_norm(torch.ones(2, 8, dtype=torch.float64, device=DEVICE), None, None)
    with pytest.raises(ValueError, match="residual has shape"):
        layer_norm(x, None, None, residual=torch.randn(2, 4, device=DEVICE))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-tensor error, which needs TRITON_INTERPRET unset")
def test_cpu_tensor_outside_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    msg = "guppy.kernels.layer_norm: got a CPU tensor; Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1"
    with pytest.raises(RuntimeError, match=msg):
        layer_norm(torch.randn(2, 8), None, None)


def test_config_range_is_what_the_dispatcher_uses():
    reachable = [tuple(sorted(c.items())) for c in reachable_configs()]
    for n in range(1, MAX_N + 1):
        assert tuple(sorted(_config_for(n).items())) in reachable
    assert max(c["BLOCK_N"] for c in reachable_configs()) == MAX_N


# ----------------------------------------------------------------------------------------------------------------------
# GPU only: the model's shape in the training dtypes
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype,atol,rtol", [d for d in DTYPES if d[0] != torch.float32],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_model_shape(dtype, atol, rtol):
    assert DEVICE == "cuda"
    _run(4096, 384, dtype, atol, rtol, residual=True)
    _run(64, 8192, dtype, atol, rtol, residual=False)
