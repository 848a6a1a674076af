// philox.cuh -- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the same
// function on the host and the device, for attention dropout that is never stored: the kernels regenerate each keep
// bit from (seed, b, h, i, j), and the host binding regenerates the whole mask for tests.
//
// Keying (one Philox call gives 4 words = a 2x2 block of the (query i, key j) plane):
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (i >> 1, j >> 1, h, b)
//   word    = ((i & 1) << 1) | (j & 1)
//   keep    = word >= threshold, threshold = round(p * 2^32) (so P(keep) = 1 - p up to 2^-32); kept values * 1/(1-p).
// Why 2x2 blocks: the forward and dQ passes hold (row i, columns j, j+1) pairs and the dK/dV pass holds
// (key j, queries i, i+1) pairs; with 2x2 blocks both use two of the four words of each call.
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#define GUPPY_HD __host__ __device__ __forceinline__
#else
#define GUPPY_HD inline
#endif

struct GuppyU32x4 { uint32_t x, y, z, w; };

GUPPY_HD GuppyU32x4 guppy_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#ifdef __CUDACC__
#pragma unroll
#endif
    for (int r = 0; r < 10; ++r) {
        uint64_t p0 = (uint64_t)M0 * c0, p1 = (uint64_t)M1 * c2;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0, hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
        k0 += W0; k1 += W1;
    }
    GuppyU32x4 out = {c0, c1, c2, c3};
    return out;
}

GUPPY_HD uint32_t guppy_dropout_threshold(float p) {
    double t = (double)p * 4294967296.0;
    return t >= 4294967295.0 ? 0xFFFFFFFFu : (uint32_t)(t + 0.5);
}

// The two keep bits of a pair: (i, j) and (i, j+1) for even j (row pair), as bit0 / bit1.
GUPPY_HD unsigned guppy_keep_row_pair(uint64_t seed, uint32_t thr, int b, int h, int i, int j) {
    GuppyU32x4 r = guppy_philox4x32_10((uint32_t)i >> 1, (uint32_t)j >> 1, (uint32_t)h, (uint32_t)b,
                                       (uint32_t)seed, (uint32_t)(seed >> 32));
    uint32_t w0 = (i & 1) ? r.z : r.x, w1 = (i & 1) ? r.w : r.y;
    return (unsigned)(w0 >= thr) | ((unsigned)(w1 >= thr) << 1);
}
// The two keep bits of (i, j) and (i+1, j) for even i (column pair), as bit0 / bit1.
GUPPY_HD unsigned guppy_keep_col_pair(uint64_t seed, uint32_t thr, int b, int h, int i, int j) {
    GuppyU32x4 r = guppy_philox4x32_10((uint32_t)i >> 1, (uint32_t)j >> 1, (uint32_t)h, (uint32_t)b,
                                       (uint32_t)seed, (uint32_t)(seed >> 32));
    uint32_t w0 = (j & 1) ? r.y : r.x, w1 = (j & 1) ? r.w : r.z;
    return (unsigned)(w0 >= thr) | ((unsigned)(w1 >= thr) << 1);
}
