// attention.cu -- tensor-core attention for the T4 (sm_75): mma.sync.aligned.m16n8k8 (fp16 in, fp32 accumulate) fed
// by ldmatrix from shared memory. Forward and backward, causal or not, packed rows (segment ids), Philox dropout,
// strided Q/K/V (views of the fused qkv projection). Plain CUDA: no torch headers.
//   device check:  nvcc -cubin -arch=sm_75 -Xptxas -v -Icsrc csrc/attention.cu
//   host build:    attention_host.cpp includes cuda_emu.h and this file (g++ -O2 -std=c++20); see cuda_emu.h
//
// Spec: guppy.reference.attention_reference. With S = Q K^T * sm_scale, masked where i may not see j
// (j > i if causal; seg[i] != seg[j]; j >= T), P = softmax(S), Z the dropout keep mask, Pd = Z o P / (1 - p):
//   O = Pd V,   lse_i = log sum_j exp(S_ij)                                   (forward)
//   dV = Pd^T dO,   dP = Z o (dO V^T) / (1 - p),   Delta_i = rowsum(dO o O)_i = sum_j P_ij dP_ij,
//   dS = P o (dP - Delta),   dQ = dS K * sm_scale,   dK = dS^T Q * sm_scale    (backward)
// The forward is an online softmax in the exp2 domain (FlashAttention-2; see attn_fwd); its normaliser sums the
// probabilities before dropout. The backward recomputes P from the saved lse.
//
// Grid: 128 threads (4 warps) per block everywhere; tile sizes in Cfg<D>; each kernel's comment says how it walks.
//   attn_fwd<D>         (ceil(T/64), B*H)   64 query rows per block, looping over key tiles
//   attn_bwd_dq<D>      (ceil(T/64), B*H)   Delta and dQ of 64 query rows; a block owns its dQ rows (no atomics)
//   attn_bwd_dkv<D>     (ceil(T/64), B*H)   after attn_bwd_dq: dK and dV of 64 keys
//   attn_bwd_small<D>   (B*H)               T <= 128 and D <= 64: both backward passes in one launch
// Shared memory is dynamic only; guppy_attn_smem() gives each kernel's bytes (`guppy targets` lists them).
//
// Dtypes and limits: fp16 in and out, fp32 accumulation and lse; D in {32, 64, 128} (which of them a build holds:
// GUPPY_HEAD_DIM_* below); any T >= 1 (tails zero-filled and masked); Tq == Tk; every row sees at least one key (true
// for causal and segment masks: i sees itself); Q/K/V need a contiguous last dimension and 16-byte aligned rows
// (strides multiples of 8 elements); O, dO, dQ, dK, dV contiguous. Tiles are skipped by segment only when the ids are
// non-decreasing along T (a device-side check sets the seg_sorted flag; otherwise every tile is computed with the
// per-element mask: still exact). Dropout: philox.cuh (Philox4x32-10 on (seed, b, h, i, j), never stored). The seed
// and the flag live in device memory, so no launch waits on the host and a captured CUDA graph draws a fresh mask per
// replay.
//
// Versions, ptxas figures and the open work: notes/csrc.md. The T4 projection: notes/t4-projection.md.
#include <string.h>
#include "warp_ops.cuh"
#include "philox.cuh"
#include "attention_api.h"

// Which head dims are compiled in: GUPPY_HEAD_DIM_32 / _64 / _128 = 1 or 0, set by csrc/extension.py from the caller's
// head_dims (a cold build for one model compiles one D: about a third of this file's nvcc time); none set = all three.
// A D left out is refused by the launchers below with an error message; it is never launched.
#if !defined(GUPPY_HEAD_DIM_32) && !defined(GUPPY_HEAD_DIM_64) && !defined(GUPPY_HEAD_DIM_128)
#define GUPPY_HEAD_DIM_32 1
#define GUPPY_HEAD_DIM_64 1
#define GUPPY_HEAD_DIM_128 1
#endif
#ifndef GUPPY_HEAD_DIM_32
#define GUPPY_HEAD_DIM_32 0
#endif
#ifndef GUPPY_HEAD_DIM_64
#define GUPPY_HEAD_DIM_64 0
#endif
#ifndef GUPPY_HEAD_DIM_128
#define GUPPY_HEAD_DIM_128 0
#endif

namespace guppy_attn {

constexpr int kThreads = 128;   // 4 warps
constexpr int kBM = 64;         // query rows per forward / dQ block
constexpr int kBKV = 64;        // keys per dK/dV block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
#define GUPPY_NEG_INF (-__int_as_float(0x7f800000))

// Keys per step (forward FBN, dQ pass BN) and queries per step (dK/dV pass BQ). Chosen by register pressure: a
// 16 x N score tile is N/2 fp32 registers per thread and the forward also holds Q (D/4 regs) and O (D/2 regs);
// wider steps at D=128 (and in the backward at D=64) spilled (ptxas, sm_75).
template <int D> struct Cfg {
    static constexpr int FBN = D == 128 ? 32 : 64;
    static constexpr int BN = D >= 64 ? 32 : 64;
    static constexpr int BQ = D == 128 ? 16 : D == 64 ? 32 : 64;
};

// ---- shared-memory tiles: rows of D fp16, XOR-swizzled 16-byte chunks ----
// Chunk c of row r is stored at chunk c ^ swz(r), swz(r) = r % 8 (D >= 64) or (r / 2) % 4 (D = 32): the 8 row
// addresses of one ldmatrix phase, and the 8 16-byte stores of one row group, fall in 8 different 16-byte bank groups
// (conflict-free) with no padding (padding would cost D=128 its second block per SM). Bytes per kernel: *_smem() below.
template <int D> DEVI int swz(int r) { return D >= 64 ? (r & 7) : ((r >> 1) & 3); }
template <int D> DEVI int toff(int r, int chunk) { return r * D + ((chunk ^ swz<D>(r)) << 3); }

// rows [row0, row0+NR) of a (T, D) matrix with row stride `st` (elements) -> tile rows 0..NR-1; rows >= T read as 0
template <int D, int NR>
DEVI void load_tile(half_t* sm, const half_t* g, long long st, int row0, int T) {
    constexpr int CH = D / 8;
    for (int idx = threadIdx.x; idx < NR * CH; idx += kThreads) {
        int r = idx / CH, c = idx % CH;
        uint4 v = {0u, 0u, 0u, 0u};
        if (row0 + r < T) v = ld_global_128(g + (long long)(row0 + r) * st + c * 8);
        *reinterpret_cast<uint4*>(sm + toff<D>(r, c)) = v;
    }
}

// ---- warp-level MMA on tiles ----
// Fragment layouts: warp_ops.cuh (the PTX ISA tables for m16n8k8 .f16 and ldmatrix). With groupID g = lane>>2 and
// t = lane%4, a thread holds S[g][8j+2t+{0,1}] (c0,c1) and S[g+8][8j+2t+{0,1}] (c2,c3) of each n-tile j: a row's
// columns live in the 4 lanes of a quad, so a row max or sum is two shfl_xor (1, 2).

// A fragments (16 rows from row0, K = W columns) of a row-major tile: ldmatrix.x4 = two k-steps
template <int W>
DEVI void load_a(uint32_t a[W / 8][2], const half_t* sm, int row0) {
    int l = lane_id(), mat = l >> 3, row = row0 + (l & 7) + 8 * (mat & 1);
#pragma unroll
    for (int kk = 0; kk < W / 8; kk += 2) {
        uint32_t x[4];
        ldmatrix_x4(x, sm + toff<W>(row, kk + (mat >> 1)));
        a[kk][0] = x[0]; a[kk][1] = x[1]; a[kk + 1][0] = x[2]; a[kk + 1][1] = x[3];
    }
}

// acc (16 x N) += A (16 x W) * tile[n0 .. n0+N)^T     (B[k][n] = tile[n0+n][k]: non-transposed ldmatrix of tile rows)
template <int W, int N>
DEVI void mma_nt(float acc[N / 8][4], const uint32_t a[W / 8][2], const half_t* sm, int n0) {
    int l = lane_id(), mat = l >> 3;
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        int row = n0 + 8 * j + (l & 7);
#pragma unroll
        for (int kk = 0; kk < W / 8; kk += 4) {
            uint32_t b[4];
            ldmatrix_x4(b, sm + toff<W>(row, kk + mat));
#pragma unroll
            for (int m = 0; m < 4; ++m) mma_m16n8k8(acc[j], a[kk + m], b[m], acc[j]);
        }
    }
}

// as mma_nt, with A read from a shared tile (rows arow0..arow0+15) four k-steps at a time instead of held in
// registers: 8 live A registers instead of W/4 (used for dO in the dQ pass)
template <int W, int N>
DEVI void mma_nt_sa(float acc[N / 8][4], const half_t* sa, int arow0, const half_t* sm, int n0) {
    int l = lane_id(), mat = l >> 3, arow = arow0 + (l & 7) + 8 * (mat & 1);
#pragma unroll
    for (int kk = 0; kk < W / 8; kk += 4) {
        uint32_t a[4][2], x[4];
        ldmatrix_x4(x, sa + toff<W>(arow, kk + (mat >> 1)));
        a[0][0] = x[0]; a[0][1] = x[1]; a[1][0] = x[2]; a[1][1] = x[3];
        ldmatrix_x4(x, sa + toff<W>(arow, kk + 2 + (mat >> 1)));
        a[2][0] = x[0]; a[2][1] = x[1]; a[3][0] = x[2]; a[3][1] = x[3];
#pragma unroll
        for (int j = 0; j < N / 8; ++j) {
            uint32_t b[4];
            ldmatrix_x4(b, sm + toff<W>(n0 + 8 * j + (l & 7), kk + mat));
#pragma unroll
            for (int m = 0; m < 4; ++m) mma_m16n8k8(acc[j], a[m], b[m], acc[j]);
        }
    }
}

// acc (16 x W) += A (16 x K) * tile[k0 .. k0+K)      (B[k][n] = tile[k0+k][n]: ldmatrix.trans of tile rows)
template <int W, int K>
DEVI void mma_nn(float acc[W / 8][4], const uint32_t a[K / 8][2], const half_t* sm, int k0) {
    int l = lane_id(), mat = l >> 3;
#pragma unroll
    for (int kk = 0; kk < K / 8; ++kk) {
        int row = k0 + 8 * kk + (l & 7);
#pragma unroll
        for (int j = 0; j < W / 8; j += 4) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, sm + toff<W>(row, j + mat));
#pragma unroll
            for (int m = 0; m < 4; ++m) mma_m16n8k8(acc[j + m], a[kk], b[m], acc[j + m]);
        }
    }
}

// C fragments of a 16 x N fp32 tile -> A fragments of the same tile as fp16 (k-steps of 8 columns)
template <int N>
DEVI void c_to_a(uint32_t a[N / 8][2], const float c[N / 8][4]) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
        a[j][0] = pack_half2(c[j][0], c[j][1]);
        a[j][1] = pack_half2(c[j][2], c[j][3]);
    }
}

template <int N> DEVI void zero(float x[N / 8][4]) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.f;
}

DEVI float quad_max(float v) { v = fmaxf(v, shfl_xor_f32(v, 1)); return fmaxf(v, shfl_xor_f32(v, 2)); }
DEVI float quad_sum(float v) { v += shfl_xor_f32(v, 1); return v + shfl_xor_f32(v, 2); }

// segment range [lo, hi] of rows [r0, r0+n) clipped to T (valid when seg is non-decreasing)
DEVI void seg_range(const int32_t* seg, int r0, int n, int T, int& lo, int& hi) {
    int last = r0 + n < T ? r0 + n - 1 : T - 1;
    lo = seg[r0]; hi = seg[last];
}

// Store a 16 x D fp32 C-fragment tile (rows row0.., scaled) as fp16 rows of a contiguous (T, D) matrix
template <int D>
DEVI void store_rows(half_t* out, const float acc[D / 8][4], int row0, int T, float scale) {
    int l = lane_id(), g = l >> 2, t = l & 3;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        int col = 8 * j + 2 * t;
        if (row0 + g < T)
            *reinterpret_cast<uint32_t*>(out + (long long)(row0 + g) * D + col) =
                pack_half2(acc[j][0] * scale, acc[j][1] * scale);
        if (row0 + g + 8 < T)
            *reinterpret_cast<uint32_t*>(out + (long long)(row0 + g + 8) * D + col) =
                pack_half2(acc[j][2] * scale, acc[j][3] * scale);
    }
}

// =================================================================================================================
// forward
// =================================================================================================================
// A block owns 64 query rows, warp w rows 16w..16w+15. Q is staged through shared memory into A fragments held in
// registers for the whole loop; K and V tiles (FBN keys) are loaded per step (128-bit global loads by all threads)
// and read with ldmatrix: S (16 x FBN per warp) = Q K^T via non-transposed ldmatrix.x4 of K rows (the B operand K^T);
// the S accumulators are re-packed in registers as the A fragments of P (the C layout of n-tile j is the A layout of
// k-step j); O += P V via ldmatrix.x4.trans of V rows. Online softmax with s2 = S * log2(e): per key tile,
// m2' = max(m2, rowmax s2), alpha = exp2(m2 - m2'), l = alpha l + rowsum exp2(s2 - m2'),
// O = alpha O + Z exp2(s2 - m2') V / (1-p); at the end O /= l and lse = (m2 + log2 l) * ln 2.
// Query tiles are issued last-first so that the long causal rows start first.
template <int D>
__global__ void __launch_bounds__(kThreads) attn_fwd(const GuppyAttnParams p) {
    constexpr int BN = Cfg<D>::FBN;
    GUPPY_DYNAMIC_SMEM(smem);
    half_t* sK = reinterpret_cast<half_t*>(smem);   // [BN][D]
    half_t* sV = sK + BN * D;                        // [BN][D]
    const int T = p.T, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * kBM;
    const int warp = threadIdx.x >> 5, l = lane_id(), g = l >> 2, t = l & 3;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const half_t* Q = static_cast<const half_t*>(p.q) + b * p.q_sb + h * p.q_sh;
    const half_t* K = static_cast<const half_t*>(p.k) + b * p.k_sb + h * p.k_sh;
    const half_t* V = static_cast<const half_t*>(p.v) + b * p.v_sb + h * p.v_sh;
    const int32_t* seg = p.seg ? p.seg + (long long)b * T : nullptr;
    const float scale2 = p.sm_scale * kLog2e;
    const bool drop = p.dropout_p > 0.f;
    const uint32_t thr = guppy_dropout_threshold(p.dropout_p);
    const float dscale = drop ? 1.f / (1.f - p.dropout_p) : 1.f;
    const unsigned long long seed = drop ? (unsigned long long)*p.seed : 0ull;
    const bool skip_tiles = seg && *p.seg_sorted;

    // Q: global -> shared (through the K buffer) -> A fragments in registers
    load_tile<D, kBM>(sK, Q, p.q_st, q0, T);   // 64 x D fits in sK + sV (2 x BN x D, BN >= 32)
    block_sync();
    uint32_t qa[D / 8][2];
    load_a<D>(qa, sK, warp * 16);
    block_sync();

    int sq0 = 0, sq1 = 0, qlo = 0, qhi = 0;
    if (seg) {
        sq0 = seg[r0 < T ? r0 : T - 1]; sq1 = seg[r1 < T ? r1 : T - 1];
        seg_range(seg, q0, kBM, T, qlo, qhi);
    }
    const int n_end = p.causal ? (q0 + kBM < T ? q0 + kBM : T) : T;

    float m2[2] = {GUPPY_NEG_INF, GUPPY_NEG_INF}, lsum[2] = {0.f, 0.f};
    float o[D / 8][4];
    zero<D>(o);

    for (int n0 = 0; n0 < n_end; n0 += BN) {
        if (skip_tiles) {   // whole tile in other conversations: skip (uniform across the block)
            int klo, khi;
            seg_range(seg, n0, BN, T, klo, khi);
            if (khi < qlo || klo > qhi) continue;
        }
        load_tile<D, BN>(sK, K, p.k_st, n0, T);
        load_tile<D, BN>(sV, V, p.v_st, n0, T);
        block_sync();

        float s[BN / 8][4];
        zero<BN>(s);
        mma_nt<D, BN>(s, qa, sK, 0);

        // scale into the log2 domain, mask, row max
        const bool edge = (n0 + BN > T) || (p.causal && n0 + BN - 1 > q0 + warp * 16) || seg;
        float mx[2] = {GUPPY_NEG_INF, GUPPY_NEG_INF};
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float v = s[j][e] * scale2;
                if (edge) {
                    int col = n0 + 8 * j + 2 * t + (e & 1), row = e < 2 ? r0 : r1;
                    bool ok = col < T && (!p.causal || col <= row);
                    if (ok && seg) ok = seg[col] == (e < 2 ? sq0 : sq1);
                    if (!ok) v = GUPPY_NEG_INF;
                }
                s[j][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        }
        float alpha[2], mu[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mnew = fmaxf(m2[r], quad_max(mx[r]));
            mu[r] = mnew == GUPPY_NEG_INF ? 0.f : mnew;   // row with nothing visible yet: exp2(-inf - 0) = 0
            alpha[r] = fast_exp2(m2[r] - mu[r]);
            m2[r] = mnew;
            lsum[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float pe = fast_exp2(s[j][e] - mu[e >> 1]);
                lsum[e >> 1] += pe;
                s[j][e] = pe;
            }
            if (drop) {
                int col = n0 + 8 * j + 2 * t;
                unsigned k0 = guppy_keep_row_pair(seed, thr, b, h, r0, col);
                unsigned k1 = guppy_keep_row_pair(seed, thr, b, h, r1, col);
                s[j][0] = (k0 & 1) ? s[j][0] * dscale : 0.f;
                s[j][1] = (k0 & 2) ? s[j][1] * dscale : 0.f;
                s[j][2] = (k1 & 1) ? s[j][2] * dscale : 0.f;
                s[j][3] = (k1 & 2) ? s[j][3] * dscale : 0.f;
            }
        }
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
        }
        uint32_t pa[BN / 8][2];
        c_to_a<BN>(pa, s);
        mma_nn<D, BN>(o, pa, sV, 0);
        block_sync();   // everyone is done with sK/sV before the next tile overwrites them
    }

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        lsum[r] = quad_sum(lsum[r]);
        inv[r] = lsum[r] > 0.f ? 1.f / lsum[r] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        o[j][0] *= inv[0]; o[j][1] *= inv[0]; o[j][2] *= inv[1]; o[j][3] *= inv[1];
    }
    half_t* O = static_cast<half_t*>(p.o) + (long long)bh * T * D;
    store_rows<D>(O, o, q0 + warp * 16, T, 1.f);
    if (t == 0) {
        float* lse = p.lse + (long long)bh * T;
        if (r0 < T) lse[r0] = lsum[0] > 0.f ? (m2[0] + log2f(lsum[0])) * kLn2 : GUPPY_NEG_INF;
        if (r1 < T) lse[r1] = lsum[1] > 0.f ? (m2[1] + log2f(lsum[1])) * kLn2 : GUPPY_NEG_INF;
    }
}

// =================================================================================================================
// backward
// =================================================================================================================
struct BwdCtx {
    int T, b, h, bh;
    const half_t *Q, *K, *V, *O, *dO;
    const int32_t* seg;
    const float *lse, *delta_in;
    float* delta;
    float scale2, dscale;
    uint32_t thr;
    bool drop;
};

DEVI BwdCtx make_ctx(const GuppyAttnParams& p, int bh, int D) {
    BwdCtx c;
    c.T = p.T; c.bh = bh; c.b = bh / p.H; c.h = bh % p.H;
    c.Q = static_cast<const half_t*>(p.q) + c.b * p.q_sb + c.h * p.q_sh;
    c.K = static_cast<const half_t*>(p.k) + c.b * p.k_sb + c.h * p.k_sh;
    c.V = static_cast<const half_t*>(p.v) + c.b * p.v_sb + c.h * p.v_sh;
    c.O = static_cast<const half_t*>(p.o_in) + (long long)bh * p.T * D;
    c.dO = static_cast<const half_t*>(p.dout) + (long long)bh * p.T * D;
    c.seg = p.seg ? p.seg + (long long)c.b * p.T : nullptr;
    c.lse = p.lse_in + (long long)bh * p.T;
    c.delta = p.delta + (long long)bh * p.T;
    c.delta_in = c.delta;
    c.scale2 = p.sm_scale * kLog2e;
    c.drop = p.dropout_p > 0.f;
    c.thr = guppy_dropout_threshold(p.dropout_p);
    c.dscale = c.drop ? 1.f / (1.f - p.dropout_p) : 1.f;
    return c;
}

// Delta[i] = sum_d dO[i][d] O[i][d] for rows [m0, m0+64): two threads per row, fp32, written to global
template <int D>
DEVI void delta_rows(const BwdCtx& c, int m0) {
    int row = m0 + (threadIdx.x >> 1), half_ = threadIdx.x & 1;
    float acc = 0.f;
    if (row < c.T) {
        const half_t* o = c.O + (long long)row * D + half_ * (D / 2);
        const half_t* d = c.dO + (long long)row * D + half_ * (D / 2);
        for (int k = 0; k < D / 2; ++k) acc += h2f(o[k]) * h2f(d[k]);
    }
    acc += shfl_xor_f32(acc, 1);
    if (row < c.T && half_ == 0) c.delta[row] = acc;
}

// dQ for query rows [m0, m0+64): needs Delta of those rows in global memory (written by this block before a sync)
template <int D>
DEVI void dq_tile(const GuppyAttnParams& p, const BwdCtx& c, int m0, half_t* smem, half_t* dQout) {
    constexpr int BN = Cfg<D>::BN;
    half_t* sK = smem;            // [BN][D]
    half_t* sV = smem + BN * D;   // [BN][D]; sK..sV also stage Q (64 x D <= 2 x BN x D)
    half_t* sdO = sV + BN * D;    // [64][D], for the whole loop (A operand of dP = dO V^T, read per use)
    const int T = c.T, warp = threadIdx.x >> 5, l = lane_id(), g = l >> 2, t = l & 3;
    const int r0 = m0 + warp * 16 + g, r1 = r0 + 8;

    uint32_t qa[D / 8][2];
    load_tile<D, kBM>(smem, c.Q, p.q_st, m0, T);
    load_tile<D, kBM>(sdO, c.dO, D, m0, T);
    block_sync();
    load_a<D>(qa, smem, warp * 16);
    block_sync();

    const float lse2[2] = {r0 < T ? c.lse[r0] * kLog2e : 0.f, r1 < T ? c.lse[r1] * kLog2e : 0.f};
    const float dlt[2] = {r0 < T ? c.delta_in[r0] : 0.f, r1 < T ? c.delta_in[r1] : 0.f};
    int sq0 = 0, sq1 = 0, qlo = 0, qhi = 0;
    if (c.seg) {
        sq0 = c.seg[r0 < T ? r0 : T - 1]; sq1 = c.seg[r1 < T ? r1 : T - 1];
        seg_range(c.seg, m0, kBM, T, qlo, qhi);
    }
    const int n_end = p.causal ? (m0 + kBM < T ? m0 + kBM : T) : T;
    float dq[D / 8][4];
    zero<D>(dq);

    for (int n0 = 0; n0 < n_end; n0 += BN) {
        if (c.seg && *p.seg_sorted) {   // flag read where used: a live register less
            int klo, khi;
            seg_range(c.seg, n0, BN, T, klo, khi);
            if (khi < qlo || klo > qhi) continue;
        }
        load_tile<D, BN>(sK, c.K, p.k_st, n0, T);
        load_tile<D, BN>(sV, c.V, p.v_st, n0, T);
        block_sync();
        float s[BN / 8][4], dp[BN / 8][4];
        zero<BN>(s);
        zero<BN>(dp);
        mma_nt<D, BN>(s, qa, sK, 0);
        mma_nt_sa<D, BN>(dp, sdO, warp * 16, sV, 0);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            int col0 = n0 + 8 * j + 2 * t;
            unsigned keep[2] = {3u, 3u};
            if (c.drop) {
                keep[0] = guppy_keep_row_pair((unsigned long long)*p.seed, c.thr, c.b, c.h, r0, col0);
                keep[1] = guppy_keep_row_pair((unsigned long long)*p.seed, c.thr, c.b, c.h, r1, col0);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int col = col0 + (e & 1), row = e < 2 ? r0 : r1;
                bool ok = col < T && row < T && (!p.causal || col <= row);
                if (ok && c.seg) ok = c.seg[col] == (e < 2 ? sq0 : sq1);
                float pe = ok ? fast_exp2(s[j][e] * c.scale2 - lse2[e >> 1]) : 0.f;
                float dpe = (keep[e >> 1] >> (e & 1)) & 1 ? dp[j][e] * c.dscale : 0.f;
                s[j][e] = pe * (dpe - dlt[e >> 1]);   // dS
            }
        }
        uint32_t sa[BN / 8][2];
        c_to_a<BN>(sa, s);
        mma_nn<D, BN>(dq, sa, sK, 0);
        block_sync();
    }
    store_rows<D>(dQout, dq, m0 + warp * 16, T, p.sm_scale);
}

// dK, dV for keys [n0, n0+64)
template <int D>
DEVI void dkv_tile(const GuppyAttnParams& p, const BwdCtx& c, int n0, half_t* smem, half_t* dKout, half_t* dVout) {
    constexpr int BQ = Cfg<D>::BQ;
    half_t* sK = smem;                  // [64][D]
    half_t* sV = sK + kBKV * D;         // [64][D]
    half_t* sQ = sV + kBKV * D;         // [BQ][D]
    half_t* sdO = sQ + BQ * D;          // [BQ][D]
    const int T = c.T, warp = threadIdx.x >> 5, l = lane_id(), g = l >> 2, t = l & 3;
    const int k0r = n0 + warp * 16 + g, k1r = k0r + 8;   // this thread's key rows

    load_tile<D, kBKV>(sK, c.K, p.k_st, n0, T);
    load_tile<D, kBKV>(sV, c.V, p.v_st, n0, T);
    int sk0 = 0, sk1 = 0, klo = 0, khi = 0;
    if (c.seg) {
        sk0 = c.seg[k0r < T ? k0r : T - 1]; sk1 = c.seg[k1r < T ? k1r : T - 1];
        seg_range(c.seg, n0, kBKV, T, klo, khi);
    }
    float dk[D / 8][4], dv[D / 8][4];
    zero<D>(dk);
    zero<D>(dv);
    const int m_begin = p.causal ? (n0 / BQ) * BQ : 0;

    for (int m0 = m_begin; m0 < T; m0 += BQ) {
        if (c.seg && *p.seg_sorted) {   // flag read where used: a live register less
            int qlo, qhi;
            seg_range(c.seg, m0, BQ, T, qlo, qhi);
            if (qhi < klo || qlo > khi) continue;
        }
        block_sync();   // previous step's readers of sQ/sdO are done
        load_tile<D, BQ>(sQ, c.Q, p.q_st, m0, T);
        load_tile<D, BQ>(sdO, c.dO, D, m0, T);
        block_sync();

        float st[BQ / 8][4];
        zero<BQ>(st);
        mma_nt_sa<D, BQ>(st, sK, warp * 16, sQ, 0);      // S^T = K Q^T (16 keys x BQ queries)
        // P^T (and its dropped version into pd)
        float pd[BQ / 8][4];
        unsigned keepw[BQ / 8];
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) {
            int q0c = m0 + 8 * j + 2 * t;   // this thread's query columns q0c, q0c+1
            unsigned k0 = 3u, k1 = 3u;
            if (c.drop) {
                k0 = guppy_keep_col_pair((unsigned long long)*p.seed, c.thr, c.b, c.h, q0c, k0r);   // (q0c, k0r), (q0c+1, k0r)
                k1 = guppy_keep_col_pair((unsigned long long)*p.seed, c.thr, c.b, c.h, q0c, k1r);
            }
            keepw[j] = k0 | (k1 << 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int q = q0c + (e & 1), key = e < 2 ? k0r : k1r;
                bool ok = q < T && key < T && (!p.causal || key <= q);
                if (ok && c.seg) ok = c.seg[q] == (e < 2 ? sk0 : sk1);
                float pe = ok ? fast_exp2(st[j][e] * c.scale2 - c.lse[q < T ? q : T - 1] * kLog2e) : 0.f;
                st[j][e] = pe;
                pd[j][e] = (keepw[j] >> e) & 1 ? pe * c.dscale : 0.f;
            }
        }
        {
            uint32_t pa[BQ / 8][2];
            c_to_a<BQ>(pa, pd);
            mma_nn<D, BQ>(dv, pa, sdO, 0);     // dV += Pd^T dO
        }
        float dpt[BQ / 8][4];
        zero<BQ>(dpt);
        mma_nt_sa<D, BQ>(dpt, sV, warp * 16, sdO, 0);    // dPd^T = V dO^T
#pragma unroll
        for (int j = 0; j < BQ / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int q = m0 + 8 * j + 2 * t + (e & 1);
                float dlt = c.delta_in[q < T ? q : T - 1];
                float dpe = (keepw[j] >> e) & 1 ? dpt[j][e] * c.dscale : 0.f;
                st[j][e] = st[j][e] * (dpe - dlt);   // dS^T
            }
        }
        {
            uint32_t sa[BQ / 8][2];
            c_to_a<BQ>(sa, st);
            mma_nn<D, BQ>(dk, sa, sQ, 0);      // dK += dS^T Q
        }
    }
    store_rows<D>(dKout, dk, n0 + warp * 16, T, p.sm_scale);
    store_rows<D>(dVout, dv, n0 + warp * 16, T, 1.f);
    block_sync();   // the caller may reuse shared memory
}

// Delta for the block's 64 rows (also written for attn_bwd_dkv), then dQ: Q fragments in registers and dO in shared
// memory, looping over key steps of BN: S = Q K^T, dP = dO V^T, dS = P o (dP - Delta), dQ += dS K (ldmatrix.trans
// of K). Recomputing S in both backward passes costs 7 tile MMAs per tile pair instead of 5; it buys a dQ that is
// deterministic without atomics or a (T/64) x T x D fp32 partial buffer.
template <int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq(const GuppyAttnParams p) {
    GUPPY_DYNAMIC_SMEM(smem);
    const int bh = blockIdx.y, m0 = blockIdx.x * kBM;
    BwdCtx c = make_ctx(p, bh, D);
    delta_rows<D>(c, m0);
    block_sync();   // Delta of this block's rows is in global memory, visible to the block
    dq_tile<D>(p, c, m0, reinterpret_cast<half_t*>(smem), static_cast<half_t*>(p.dq) + (long long)bh * p.T * D);
}

// A block owns 64 keys (warp w keys 16w..), looping over query steps of BQ: S^T = K Q^T, dV += Pd^T dO,
// dP^T = V dO^T, dS^T = P^T o (dP^T - Delta), dK += dS^T Q. K and V (A operands) are streamed from shared memory
// four k-steps at a time (mma_nt_sa).
template <int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkv(const GuppyAttnParams p) {
    GUPPY_DYNAMIC_SMEM(smem);
    const int bh = blockIdx.y, n0 = blockIdx.x * kBKV;
    BwdCtx c = make_ctx(p, bh, D);
    long long off = (long long)bh * p.T * D;
    dkv_tile<D>(p, c, n0, reinterpret_cast<half_t*>(smem), static_cast<half_t*>(p.dk) + off,
                static_cast<half_t*>(p.dv) + off);
}

// T <= 128, D <= 64: one block per (batch, head) and no atomics: Delta for all rows, then the dK/dV body for each key
// tile, then the dQ body for each query tile, one after the other in the same block.
template <int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_small(const GuppyAttnParams p) {
    GUPPY_DYNAMIC_SMEM(smem);
    const int bh = blockIdx.x;
    BwdCtx c = make_ctx(p, bh, D);
    long long off = (long long)bh * p.T * D;
    half_t* sm = reinterpret_cast<half_t*>(smem);
    for (int m0 = 0; m0 < p.T; m0 += kBM) delta_rows<D>(c, m0);
    block_sync();
    for (int n0 = 0; n0 < p.T; n0 += kBKV)
        dkv_tile<D>(p, c, n0, sm, static_cast<half_t*>(p.dk) + off, static_cast<half_t*>(p.dv) + off);
    for (int m0 = 0; m0 < p.T; m0 += kBM) {
        dq_tile<D>(p, c, m0, sm, static_cast<half_t*>(p.dq) + off);
        block_sync();
    }
}

template <int D> constexpr size_t fwd_smem() { return 2 * Cfg<D>::FBN * D * sizeof(uint16_t); }
template <int D> constexpr size_t dq_smem() { return (2 * Cfg<D>::BN + kBM) * D * sizeof(uint16_t); }
template <int D> constexpr size_t dkv_smem() { return (2 * kBKV + 2 * Cfg<D>::BQ) * D * sizeof(uint16_t); }
template <int D> constexpr size_t small_smem() { return dkv_smem<D>() > dq_smem<D>() ? dkv_smem<D>() : dq_smem<D>(); }

// the bytes each launcher below requests, by kernel name (for guppy_attn_smem); 0 for an instance that is never built
template <int D> size_t smem_bytes(const char* kernel) {
    if (!strcmp(kernel, "fwd")) return fwd_smem<D>();
    if (!strcmp(kernel, "bwd_dq")) return dq_smem<D>();
    if (!strcmp(kernel, "bwd_dkv")) return dkv_smem<D>();
    if (!strcmp(kernel, "bwd_small")) return D <= 64 ? small_smem<D>() : 0;
    return 0;
}

template <int D>
const char* fwd_launch(const GuppyAttnParams& p, void* stream) {
    dim3 grid((p.T + kBM - 1) / kBM, p.B * p.H);
    GUPPY_LAUNCH(attn_fwd<D>, grid, dim3(kThreads), fwd_smem<D>(), stream, p);
    GUPPY_LAUNCH_CHECK();
    return nullptr;
}

// T <= 128: the single-launch kernel, for D <= 64. D = 128 always takes the two-kernel path: with both loops in one
// kernel ptxas spilled at D = 128 (16 bytes at 255 registers; out-of-line bodies cost 320 bytes of stack instead).
template <int D>
const char* bwd_launch(const GuppyAttnParams& p, void* stream) {
    if constexpr (D <= 64) {
        if (p.T <= 128) {
            GUPPY_LAUNCH(attn_bwd_small<D>, dim3(p.B * p.H), dim3(kThreads), small_smem<D>(), stream, p);
            GUPPY_LAUNCH_CHECK();
            return nullptr;
        }
    }
    {
        dim3 gq((p.T + kBM - 1) / kBM, p.B * p.H), gkv((p.T + kBKV - 1) / kBKV, p.B * p.H);
        GUPPY_LAUNCH(attn_bwd_dq<D>, gq, dim3(kThreads), dq_smem<D>(), stream, p);
        GUPPY_LAUNCH_CHECK();
        GUPPY_LAUNCH(attn_bwd_dkv<D>, gkv, dim3(kThreads), dkv_smem<D>(), stream, p);
        GUPPY_LAUNCH_CHECK();
    }
    return nullptr;
}

}  // namespace guppy_attn

// a D the kernels take but this build left out, or one they do not take: the launchers' message
static const char* guppy_attn_no_instance(int D) {
    switch (D) {
        case 32: return "head dim 32 is not compiled into this build (extension.load(head_dims=...) selects them)";
        case 64: return "head dim 64 is not compiled into this build (extension.load(head_dims=...) selects them)";
        case 128: return "head dim 128 is not compiled into this build (extension.load(head_dims=...) selects them)";
        default: return "head dim D must be 32, 64 or 128";
    }
}

const char* guppy_attn_fwd(const GuppyAttnParams& p, void* stream) {
    switch (p.D) {
#if GUPPY_HEAD_DIM_32
        case 32: return guppy_attn::fwd_launch<32>(p, stream);
#endif
#if GUPPY_HEAD_DIM_64
        case 64: return guppy_attn::fwd_launch<64>(p, stream);
#endif
#if GUPPY_HEAD_DIM_128
        case 128: return guppy_attn::fwd_launch<128>(p, stream);
#endif
        default: return guppy_attn_no_instance(p.D);
    }
}

const char* guppy_attn_bwd(const GuppyAttnParams& p, void* stream) {
    switch (p.D) {
#if GUPPY_HEAD_DIM_32
        case 32: return guppy_attn::bwd_launch<32>(p, stream);
#endif
#if GUPPY_HEAD_DIM_64
        case 64: return guppy_attn::bwd_launch<64>(p, stream);
#endif
#if GUPPY_HEAD_DIM_128
        case 128: return guppy_attn::bwd_launch<128>(p, stream);
#endif
        default: return guppy_attn_no_instance(p.D);
    }
}

size_t guppy_attn_smem(const char* kernel, int D) {
    switch (D) {
#if GUPPY_HEAD_DIM_32
        case 32: return guppy_attn::smem_bytes<32>(kernel);
#endif
#if GUPPY_HEAD_DIM_64
        case 64: return guppy_attn::smem_bytes<64>(kernel);
#endif
#if GUPPY_HEAD_DIM_128
        case 128: return guppy_attn::smem_bytes<128>(kernel);
#endif
        default: return 0;
    }
}

int guppy_attn_has_head_dim(int D) {
    return (D == 32 && GUPPY_HEAD_DIM_32) || (D == 64 && GUPPY_HEAD_DIM_64) || (D == 128 && GUPPY_HEAD_DIM_128);
}

void guppy_attn_dropout_mask(uint8_t* keep, int B, int H, int T, float p, unsigned long long seed) {
    uint32_t thr = guppy_dropout_threshold(p);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < T; ++i)
                for (int j = 0; j < T; j += 2) {
                    unsigned k = guppy_keep_row_pair(seed, thr, b, h, i, j);
                    uint8_t* row = keep + (((long long)b * H + h) * T + i) * T;
                    row[j] = k & 1;
                    if (j + 1 < T) row[j + 1] = (k >> 1) & 1;
                }
}
