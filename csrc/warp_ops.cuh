// warp_ops.cuh -- every tensor-core and warp-level operation the csrc kernels use, in one place.
// On the device (nvcc) each wrapper is one inline PTX instruction; on the host (g++, with cuda_emu.h included first)
// each is the emulator's warp collective that moves every element to the lane and register the PTX ISA gives.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k8", .f16 A/B, .f32 C/D), groupID = lane >> 2,
// threadID_in_group = lane % 4 (t below):
//   A 16x8 (row-major), 2 x .f16x2 regs: a0,a1 = A[groupID][2t + {0,1}];  a2,a3 = A[groupID + 8][2t + {0,1}]
//   B  8x8 (col-major), 1 x .f16x2 reg:  b0,b1 = B[2t + {0,1}][groupID]
//   C/D 16x8, 4 x .f32:                  c0,c1 = C[groupID][2t + {0,1}]; c2,c3 = C[groupID + 8][2t + {0,1}]
// In an .f16x2 register the element with the lower index is in the low 16 bits.
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lanes 8m..8m+7 give the addresses of rows 0..7 of
// matrix m (16 contiguous bytes each; .x1 reads lanes 0-7, .x2 lanes 0-15); result register m of lane l holds
//   M_m[l >> 2][2(l % 4) + {0,1}]   (no .trans)      M_m[2(l % 4) + {0,1}][l >> 2]   (.trans)
// so a non-transposed 8x8 load of row-major data is an A half or a B operand of its transpose, and .trans of a
// row-major [k][n] tile is the B operand directly.
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define DEVI __device__ __forceinline__
typedef __half half_t;
#define GUPPY_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define GUPPY_LAUNCH(kern, grid, block, smem, stream, ...) \
    kern<<<(grid), (block), (smem), (cudaStream_t)(stream)>>>(__VA_ARGS__)
// after a launch: return the launch error (bad configuration, too many resources) as the launcher's message
#define GUPPY_LAUNCH_CHECK()                                               \
    do {                                                                   \
        cudaError_t guppy_err_ = cudaPeekAtLastError();                    \
        if (guppy_err_ != cudaSuccess) return cudaGetErrorString(guppy_err_); \
    } while (0)
#else
#define GUPPY_LAUNCH_CHECK() do {} while (0)
#include "cuda_emu.h"
#define DEVI inline
typedef emu::half half_t;
#define GUPPY_DYNAMIC_SMEM(name) unsigned char* name = ::emu::block_smem()
#endif

// ---------------------------------------------------------------------------------------------------------------
// scalar helpers
// ---------------------------------------------------------------------------------------------------------------
#ifdef __CUDACC__
DEVI float h2f(half_t h) { return __half2float(h); }
DEVI half_t f2h(float f) { return __float2half_rn(f); }
DEVI uint32_t pack_half2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
DEVI float fast_exp2(float x) { return exp2f(x); }
DEVI uint4 ld_global_128(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
DEVI unsigned lane_id() { return threadIdx.x & 31; }
#else
inline float h2f(half_t h) { return emu::half_bits_to_float(h.x); }
inline half_t f2h(float f) { return half_t{emu::float_to_half_bits(f)}; }
inline uint32_t pack_half2(float lo, float hi) {
    return (uint32_t)emu::float_to_half_bits(lo) | ((uint32_t)emu::float_to_half_bits(hi) << 16);
}
inline float fast_exp2(float x) { return std::exp2(x); }
inline uint4 ld_global_128(const void* p) { uint4 v; std::memcpy(&v, p, 16); return v; }
inline unsigned lane_id() { return threadIdx.x & 31; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
#endif

// ---------------------------------------------------------------------------------------------------------------
// block barrier
// ---------------------------------------------------------------------------------------------------------------
DEVI void block_sync() {
#ifdef __CUDACC__
    asm volatile("bar.sync 0;\n" ::: "memory");
#else
    emu::block_sync();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// warp shuffle: butterfly exchange (shfl.sync.bfly), full warp
// ---------------------------------------------------------------------------------------------------------------
DEVI uint32_t shfl_xor_u32(uint32_t v, int lane_mask) {
#ifdef __CUDACC__
    uint32_t r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;\n" : "=r"(r) : "r"(v), "r"(lane_mask));
    return r;
#else
    emu::WarpX& w = emu::my_warp();
    unsigned l = lane_id();
    w.in[l][0] = v;
    emu::warp_collective(w, [](emu::WarpX& w) { for (int i = 0; i < 32; ++i) w.out[i][0] = w.in[i][0]; });
    return w.out[l ^ (unsigned)lane_mask][0];
#endif
}
DEVI float shfl_xor_f32(float v, int lane_mask) {
    uint32_t u;
#ifdef __CUDACC__
    u = __float_as_uint(v);
    return __uint_as_float(shfl_xor_u32(u, lane_mask));
#else
    std::memcpy(&u, &v, 4);
    u = shfl_xor_u32(u, lane_mask);
    float r; std::memcpy(&r, &u, 4); return r;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32: d = a (16x8) * b (8x8) + c, one warp
// ---------------------------------------------------------------------------------------------------------------
DEVI void mma_m16n8k8(float d[4], const uint32_t a[2], uint32_t b, const float c[4]) {
#ifdef __CUDACC__
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    emu::WarpX& w = emu::my_warp();
    unsigned l = lane_id();
    w.in[l][0] = a[0]; w.in[l][1] = a[1]; w.in[l][2] = b;
    std::memcpy(&w.in[l][3], c, 16);
    emu::warp_collective(w, [](emu::WarpX& w) {
        float A[16][8], B[8][8], C[16][8];
        auto lo = [](uint32_t r) { return emu::half_bits_to_float((uint16_t)(r & 0xffff)); };
        auto hi = [](uint32_t r) { return emu::half_bits_to_float((uint16_t)(r >> 16)); };
        for (int ln = 0; ln < 32; ++ln) {
            int g = ln >> 2, t = ln & 3;
            A[g][2 * t] = lo(w.in[ln][0]);     A[g][2 * t + 1] = hi(w.in[ln][0]);
            A[g + 8][2 * t] = lo(w.in[ln][1]); A[g + 8][2 * t + 1] = hi(w.in[ln][1]);
            B[2 * t][g] = lo(w.in[ln][2]);     B[2 * t + 1][g] = hi(w.in[ln][2]);
            float cc[4]; std::memcpy(cc, &w.in[ln][3], 16);
            C[g][2 * t] = cc[0]; C[g][2 * t + 1] = cc[1]; C[g + 8][2 * t] = cc[2]; C[g + 8][2 * t + 1] = cc[3];
        }
        for (int ln = 0; ln < 32; ++ln) {
            int g = ln >> 2, t = ln & 3;
            float dd[4];
            for (int e = 0; e < 4; ++e) {
                int row = g + ((e >> 1) << 3), col = 2 * t + (e & 1);
                float acc = C[row][col];   // fp16 x fp16 products are exact in fp32; fp32 accumulation
                for (int k = 0; k < 8; ++k) acc += A[row][k] * B[k][col];
                dd[e] = acc;
            }
            std::memcpy(w.out[ln], dd, 16);
        }
    });
    std::memcpy(d, w.out[l], 16);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16; `row` is this lane's row address in shared memory
// ---------------------------------------------------------------------------------------------------------------
#ifndef __CUDACC__
namespace emu {
template <int NMAT, bool TRANS>
inline void ldmatrix_emu(uint32_t* r, const void* row) {
    WarpX& w = my_warp();
    unsigned l = lane_id();
    w.ptr[l] = row;
    warp_collective(w, [](WarpX& w) {
        Scheduler* s = tls_sched;
        const unsigned char* lo = s->smem.data();
        const unsigned char* hi = lo + s->smem.size();
        for (int m = 0; m < NMAT; ++m) {
            uint16_t M[8][8];
            for (int rr = 0; rr < 8; ++rr) {
                const unsigned char* p = (const unsigned char*)w.ptr[8 * m + rr];
                if (p < lo || p + 16 > hi || ((uintptr_t)p & 15)) {
                    std::fprintf(stderr, "emulator: ldmatrix row address outside the block's shared memory or not "
                                         "16-byte aligned (lane %d)\n", 8 * m + rr);
                    std::abort();
                }
                std::memcpy(M[rr], p, 16);
            }
            for (int ln = 0; ln < 32; ++ln) {
                int g = ln >> 2, t = ln & 3;
                uint16_t e0 = TRANS ? M[2 * t][g] : M[g][2 * t], e1 = TRANS ? M[2 * t + 1][g] : M[g][2 * t + 1];
                w.out[ln][m] = (uint32_t)e0 | ((uint32_t)e1 << 16);
            }
        }
    });
    for (int m = 0; m < NMAT; ++m) r[m] = w.out[l][m];
}
}  // namespace emu
#define GUPPY_SMEM_ADDR(p) (p)
#endif

#ifdef __CUDACC__
#define GUPPY_SMEM_ADDR(p) static_cast<uint32_t>(__cvta_generic_to_shared(p))
#endif

DEVI void ldmatrix_x1(uint32_t r[1], const void* row) {
#ifdef __CUDACC__
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(GUPPY_SMEM_ADDR(row)));
#else
    emu::ldmatrix_emu<1, false>(r, row);
#endif
}
DEVI void ldmatrix_x2(uint32_t r[2], const void* row) {
#ifdef __CUDACC__
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(GUPPY_SMEM_ADDR(row)));
#else
    emu::ldmatrix_emu<2, false>(r, row);
#endif
}
DEVI void ldmatrix_x4(uint32_t r[4], const void* row) {
#ifdef __CUDACC__
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(GUPPY_SMEM_ADDR(row)));
#else
    emu::ldmatrix_emu<4, false>(r, row);
#endif
}
DEVI void ldmatrix_x1_trans(uint32_t r[1], const void* row) {
#ifdef __CUDACC__
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(GUPPY_SMEM_ADDR(row)));
#else
    emu::ldmatrix_emu<1, true>(r, row);
#endif
}
DEVI void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
#ifdef __CUDACC__
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(GUPPY_SMEM_ADDR(row)));
#else
    emu::ldmatrix_emu<2, true>(r, row);
#endif
}
DEVI void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
#ifdef __CUDACC__
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(GUPPY_SMEM_ADDR(row)));
#else
    emu::ldmatrix_emu<4, true>(r, row);
#endif
}
