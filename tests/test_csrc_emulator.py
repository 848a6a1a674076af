"""The CUDA emulator (csrc/cuda_emu.h) and the warp wrappers (csrc/warp_ops.cuh), checked against the PTX ISA.

Each test runs one tiny kernel from csrc/emu_tests.cu and computes, by its own formula written out from the PTX ISA
fragment tables ("Matrix Fragments for mma.m16n8k8" with .f16 operands, and "ldmatrix"), where every element must
land. On the CPU that checks the emulator; with a GPU the same tests check the hardware path too.
"""
import numpy as np
import pytest
import torch

csrc = pytest.importorskip("guppy.csrc")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def mod(request):
    return request.param, csrc.load(request.param)


# ---- the ISA tables, written out independently of the C++ ------------------------------------------------------
def group_id(lane):            # "groupID = %laneid >> 2"
    return lane >> 2


def tid_in_group(lane):        # "threadID_in_group = %laneid % 4"
    return lane % 4


def a_row_col(lane, i):        # A 16x8 .f16: a_i for i in 0..3 (a0,a1 in reg 0; a2,a3 in reg 1)
    row = group_id(lane) if i < 2 else group_id(lane) + 8
    col = tid_in_group(lane) * 2 + (i & 1)
    return row, col


def b_row_col(lane, i):        # B 8x8 .f16: b_i for i in 0..1
    return tid_in_group(lane) * 2 + i, group_id(lane)


def c_row_col(lane, i):        # C/D 16x8 .f32: c_i for i in 0..3
    row = group_id(lane) if i < 2 else group_id(lane) + 8
    return row, tid_in_group(lane) * 2 + (i & 1)


def fp16_bits(x):
    return np.asarray(x, dtype=np.float16).view(np.uint16).astype(np.uint32)


def pack(lo_bits, hi_bits):    # .f16x2: lower-indexed element in the low 16 bits
    return (int(lo_bits) | (int(hi_bits) << 16))


def as_i32(u):
    return torch.tensor(np.asarray(u, dtype=np.uint32).view(np.int32))


def test_mma_m16n8k8_layout(mod):
    dev, m = mod
    rng = np.random.default_rng(0)
    A = rng.integers(-8, 8, (16, 8)).astype(np.float16) / 4     # exact in fp16, products and sums exact in fp32
    B = rng.integers(-8, 8, (8, 8)).astype(np.float16) / 4
    C = rng.integers(-64, 64, (16, 8)).astype(np.float32) / 8
    a = np.zeros((32, 2), np.uint32)
    b = np.zeros(32, np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        ab = [fp16_bits(A[a_row_col(lane, i)]) for i in range(4)]
        a[lane] = [pack(ab[0], ab[1]), pack(ab[2], ab[3])]
        bb = [fp16_bits(B[b_row_col(lane, i)]) for i in range(2)]
        b[lane] = pack(bb[0], bb[1])
        c[lane] = [C[c_row_col(lane, i)] for i in range(4)]
    d = m.test_mma(as_i32(a).to(dev), as_i32(b).to(dev), torch.tensor(c).to(dev)).cpu().numpy()
    D = A.astype(np.float64) @ B.astype(np.float64) + C
    expect = np.array([[D[c_row_col(lane, i)] for i in range(4)] for lane in range(32)])
    np.testing.assert_array_equal(d, expect.astype(np.float32))


def test_mma_fp32_accumulate(mod):
    """Random fp16 operands: the emulated MMA matches an fp32-accumulated product (not an fp16 one)."""
    dev, m = mod
    rng = np.random.default_rng(1)
    A = rng.standard_normal((16, 8)).astype(np.float16)
    B = rng.standard_normal((8, 8)).astype(np.float16)
    C = rng.standard_normal((16, 8)).astype(np.float32) * 100
    a = np.array([[pack(fp16_bits(A[a_row_col(l, 0)]), fp16_bits(A[a_row_col(l, 1)])),
                   pack(fp16_bits(A[a_row_col(l, 2)]), fp16_bits(A[a_row_col(l, 3)]))] for l in range(32)])
    b = np.array([pack(fp16_bits(B[b_row_col(l, 0)]), fp16_bits(B[b_row_col(l, 1)])) for l in range(32)])
    c = np.array([[C[c_row_col(l, i)] for i in range(4)] for l in range(32)], np.float32)
    d = m.test_mma(as_i32(a).to(dev), as_i32(b).to(dev), torch.tensor(c).to(dev)).cpu().numpy()
    D = A.astype(np.float64) @ B.astype(np.float64) + C
    expect = np.array([[D[c_row_col(l, i)] for i in range(4)] for l in range(32)])
    np.testing.assert_allclose(d, expect, rtol=1e-5, atol=1e-4)


def test_ldmatrix_layouts(mod):
    """x1 / x2 / x4, plain and .trans: lanes 8m..8m+7 address rows of matrix m; lane l's register m gets
    M_m[l>>2][2(l%4)+{0,1}] (plain) or M_m[2(l%4)+{0,1}][l>>2] (.trans)."""
    dev, m = mod
    rng = np.random.default_rng(2)
    mat = (np.arange(32 * 8, dtype=np.uint32).reshape(32, 8) * 7 + 1) & 0x7BFF   # distinct 16-bit patterns
    rowsel = rng.permutation(32).astype(np.int32)
    out = m.test_ldmatrix(torch.tensor(mat.astype(np.uint16).view(np.int16)).to(dev),
                          torch.tensor(rowsel).to(dev)).cpu().numpy().view(np.uint32)
    for v, (nmat, trans) in enumerate([(1, False), (2, False), (4, False), (1, True), (2, True), (4, True)]):
        for lane in range(32):
            g, t = lane >> 2, lane % 4
            for reg in range(4):
                if reg >= nmat:
                    assert out[v, lane, reg] == 0
                    continue
                M = mat[rowsel[8 * reg: 8 * reg + 8]]            # rows given by lanes 8*reg .. 8*reg+7
                e0, e1 = (M[2 * t, g], M[2 * t + 1, g]) if trans else (M[g, 2 * t], M[g, 2 * t + 1])
                assert out[v, lane, reg] == pack(e0, e1), (nmat, trans, lane, reg)


@pytest.mark.parametrize("nblocks,nthreads", [(1, 32), (3, 128), (2, 256)])
def test_block_reduce_and_shuffles(mod, nblocks, nthreads):
    dev, m = mod
    x = torch.randn(nblocks * nthreads, generator=torch.Generator().manual_seed(nthreads))
    shfl, warps, blocks = (t.cpu() for t in m.test_reduce(x.to(dev), nblocks, nthreads))
    idx = torch.arange(x.numel())
    for k in range(5):
        torch.testing.assert_close(shfl[k], x[idx ^ (1 << k)], rtol=0, atol=0)
    torch.testing.assert_close(warps, x.view(-1, 32).double().sum(1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocks, x.view(nblocks, -1).double().sum(1).float(), rtol=1e-5, atol=1e-5)


def test_dropout_mask_is_reproducible_and_keyed():
    a = csrc.dropout_mask(2, 3, 40, 0.25, 1234)
    b = csrc.dropout_mask(2, 3, 40, 0.25, 1234)
    c = csrc.dropout_mask(2, 3, 40, 0.25, 1235)
    assert a.shape == (2, 3, 40, 40) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a[0], a[1])   # keyed on b and h too
    assert abs(a.float().mean().item() - 0.75) < 0.02


def test_available_reports_without_raising():
    ok, reason = csrc.available("cpu")
    assert ok and reason == ""
    ok, reason = csrc.available("cuda")
    if torch.cuda.is_available():
        assert ok, reason            # the nvcc build and its self-check against the reference pass on this GPU
    else:
        assert not ok and reason     # one line saying why, no exception


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs the nvcc build on the device")
def test_cuda_build_matches_host_build_bitwise_layouts():
    """The same ldmatrix probe on the GPU and on the emulator gives identical registers."""
    mat = torch.arange(256, dtype=torch.int16).view(32, 8)
    rowsel = torch.randperm(32, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    host = csrc.load("cpu").test_ldmatrix(mat, rowsel)
    dev = csrc.load("cuda").test_ldmatrix(mat.cuda(), rowsel.cuda()).cpu()
    assert torch.equal(host, dev)


def test_emulator_reports_a_broken_barrier():
    with pytest.raises(RuntimeError, match="deadlock"):
        csrc.load("cpu").test_bad_barrier()


def test_philox4x32_10_known_answers():
    """Random123's published known-answer vectors for Philox4x32-10 (kat_vectors)."""
    f = csrc.load("cpu").philox4x32_10
    assert f([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert f([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert f([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_emulated_fp16_conversion_matches_torch():
    """emu::half: IEEE binary16 round-to-nearest-even, subnormals, overflow, signed zero, inf/NaN; and back exactly."""
    m = csrc.load("cpu")
    g = torch.Generator().manual_seed(3)
    all_halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    finite = all_halves[torch.isfinite(all_halves.view(torch.float16))]
    # every fp16 value, midpoints between neighbours (ties), random floats over the whole range, specials
    f = finite.view(torch.float16).float().sort().values
    mids = ((f[1:].double() + f[:-1].double()) / 2).float()
    rnd = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-30, 20, (200_000,), generator=g).float())
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, float("inf"), float("-inf"),
                            2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0001, 2.0 ** -26, 1e-30])
    x = torch.cat([f, mids, rnd, special])
    got = m.half_bits(x)
    want = x.half().view(torch.int16)
    assert torch.equal(got, want)
    nan = m.half_bits(torch.tensor([float("nan")])).view(torch.float16)
    assert torch.isnan(nan).all()
    back = m.half_to_float(finite)
    assert torch.equal(back, finite.view(torch.float16).float())
