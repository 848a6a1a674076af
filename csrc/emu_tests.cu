// emu_tests.cu -- tiny kernels that exercise each wrapper in warp_ops.cuh on its own, so tests can check the
// emulator (and, on a GPU, the hardware) against the PTX ISA fragment tables written out independently in
// tests/test_csrc_emulator.py.   nvcc -cubin -arch=sm_75 -Icsrc csrc/emu_tests.cu
#include "warp_ops.cuh"
#include "attention_api.h"

// a: [32 lanes][2] f16x2, b: [32], c: [32][4] -> d: [32][4]; one warp, d = mma(a, b, c) per lane's registers
__global__ void guppy_k_test_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
    unsigned l = threadIdx.x;
    uint32_t ar[2] = {a[2 * l], a[2 * l + 1]};
    float cr[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]}, dr[4];
    mma_m16n8k8(dr, ar, b[l], cr);
    for (int i = 0; i < 4; ++i) d[4 * l + i] = dr[i];
}

// mat: 32 rows x 8 fp16 (row r at 16*r bytes) copied to shared memory; lane l points ldmatrix at row rowsel[l].
// out: [6 variants: x1, x2, x4, x1.trans, x2.trans, x4.trans][32 lanes][4 regs] (unused regs left 0)
__global__ void guppy_k_test_ldmatrix(const uint16_t* mat, const int32_t* rowsel, uint32_t* out) {
    GUPPY_DYNAMIC_SMEM(smem);
    unsigned l = threadIdx.x;
    uint4* s4 = reinterpret_cast<uint4*>(smem);
    s4[l] = ld_global_128(mat + 8 * l);
    block_sync();
    const unsigned char* row = smem + 16 * rowsel[l];
    uint32_t r[6][4] = {};
    ldmatrix_x1(r[0], row);
    ldmatrix_x2(r[1], row);
    ldmatrix_x4(r[2], row);
    ldmatrix_x1_trans(r[3], row);
    ldmatrix_x2_trans(r[4], row);
    ldmatrix_x4_trans(r[5], row);
    for (int v = 0; v < 6; ++v)
        for (int i = 0; i < 4; ++i) out[(v * 32 + l) * 4 + i] = r[v][i];
}

// x: [nblocks * nthreads]. shfl_out[k][i] = value of thread i after one shfl_xor with mask 1<<k (k = 0..4);
// warp_sums[w] = xor-butterfly sum of warp w (read from its lane 0); block_sums[b] = sum of the warp sums in order
// (through shared memory and two __syncthreads).
__global__ void guppy_k_test_reduce(const float* x, float* shfl_out, float* warp_sums, float* block_sums) {
    GUPPY_DYNAMIC_SMEM(smem);
    float* sw = reinterpret_cast<float*>(smem);
    unsigned tid = threadIdx.x, n = blockDim.x, gid = blockIdx.x * n + tid, total = gridDim.x * n;
    float v = x[gid];
    for (int k = 0; k < 5; ++k) shfl_out[k * total + gid] = shfl_xor_f32(v, 1 << k);
    for (int m = 16; m >= 1; m >>= 1) v += shfl_xor_f32(v, m);
    if (lane_id() == 0) { sw[tid >> 5] = v; warp_sums[gid >> 5] = v; }
    block_sync();
    if (tid == 0) {
        float s = 0.f;
        for (unsigned w = 0; w < n / 32; ++w) s += sw[w];
        sw[n / 32] = s;
    }
    block_sync();
    if (tid == n - 1) block_sums[blockIdx.x] = sw[n / 32];  // read by another warp than the writer
}

const char* guppy_test_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d, void* stream) {
    GUPPY_LAUNCH(guppy_k_test_mma, dim3(1), dim3(32), 0, stream, a, b, c, d);
    GUPPY_LAUNCH_CHECK();
    return nullptr;
}
const char* guppy_test_ldmatrix(const uint16_t* mat, const int32_t* rowsel, uint32_t* out, void* stream) {
    GUPPY_LAUNCH(guppy_k_test_ldmatrix, dim3(1), dim3(32), 512, stream, mat, rowsel, out);
    GUPPY_LAUNCH_CHECK();
    return nullptr;
}
const char* guppy_test_reduce(const float* x, int nblocks, int nthreads, float* shfl_out, float* warp_sums,
                              float* block_sums, void* stream) {
    if (nthreads % 32 || nthreads > 1024) return "nthreads must be a multiple of 32, at most 1024";
    GUPPY_LAUNCH(guppy_k_test_reduce, dim3(nblocks), dim3(nthreads), 4 * (nthreads / 32 + 1), stream,
                 x, shfl_out, warp_sums, block_sums);
    GUPPY_LAUNCH_CHECK();
    return nullptr;
}

#ifndef __CUDACC__
// Host only: a kernel that breaks the barrier rule (thread 5 skips the __syncthreads the others wait in). The emulator
// must report it as an error, not hang or run on.
__global__ void guppy_k_test_bad_barrier(float* out) {
    if (threadIdx.x == 5) return;
    block_sync();
    out[threadIdx.x] = 1.f;
}
const char* guppy_test_bad_barrier(float* out) {
    GUPPY_LAUNCH(guppy_k_test_bad_barrier, dim3(1), dim3(64), 0, nullptr, out);
    return nullptr;
}
#endif
