// attention_api.h -- the plain C++ interface between the torch bindings (attention_cuda.cpp, attention_host.cpp) and
// the kernels in attention.cu / emu_tests.cu. No torch and no CUDA types here: pointers, strides, sizes.
#pragma once
#include <stddef.h>
#include <stdint.h>

struct GuppyAttnParams {
    // inputs, (B, H, T, D) fp16, read in place: element (b, h, t, d) at base + b*sb + h*sh + t*st + d (elements)
    const void *q, *k, *v;
    long long q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;
    const int32_t* seg;      // (B, T) segment ids, or null
    const int32_t* seg_sorted; // (1,) flag in device memory: 1 when seg is non-decreasing along T in every row
                               // (tile skipping is allowed); computed on the device, so the host never syncs
    int B, H, T, D;
    int causal;
    float sm_scale;          // scores = q.k * sm_scale
    float dropout_p;         // 0 disables dropout
    const long long* seed;   // (1,) Philox key (philox.cuh) in device memory: read by the kernels, not baked into the
                             // launch, so a captured CUDA graph draws a fresh mask on every replay
    // forward outputs: o (B, H, T, D) fp16 contiguous, lse (B, H, T) fp32 natural-log log-sum-exp of the scaled scores
    void* o;
    float* lse;
    // backward: o, dout (B, H, T, D) fp16 contiguous; lse as above; delta (B, H, T) fp32 scratch written here;
    // dq, dk, dv (B, H, T, D) fp16 contiguous outputs
    const void* o_in;
    const void* dout;
    const float* lse_in;
    float* delta;
    void *dq, *dk, *dv;
};

// Launch on `stream` (a cudaStream_t on the device, ignored by the emulator). Return 0, or an error message.
const char* guppy_attn_fwd(const GuppyAttnParams& p, void* stream);
const char* guppy_attn_bwd(const GuppyAttnParams& p, void* stream);
// Dynamic shared memory (bytes) the launcher requests for `kernel` ("fwd", "bwd_dq", "bwd_dkv", "bwd_small") at head
// dim D; 0 for an instance that is not built. `guppy targets` reads it (one source: attention.cu's tile sizes).
size_t guppy_attn_smem(const char* kernel, int D);
// 1 when the kernels for head dim D are compiled into this build (GUPPY_HEAD_DIM_* in attention.cu), else 0.
int guppy_attn_has_head_dim(int D);
// The dropout keep mask the kernels use, regenerated on the host: keep (B, H, T, T) as 0/1 bytes.
void guppy_attn_dropout_mask(uint8_t* keep, int B, int H, int T, float p, unsigned long long seed);

// Tiny kernels for the emulator/hardware self-tests (emu_tests.cu). Pointers are device pointers on the GPU.
const char* guppy_test_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d, void* stream);
const char* guppy_test_ldmatrix(const uint16_t* mat, const int32_t* rowsel, uint32_t* out, void* stream);
const char* guppy_test_reduce(const float* x, int nblocks, int nthreads, float* shfl_out, float* warp_sums,
                              float* block_sums, void* stream);
