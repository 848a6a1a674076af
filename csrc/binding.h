// binding.h -- the torch-facing functions shared by attention_host.cpp (emulator build) and attention_cuda.cpp
// (nvcc build). The includer defines GUPPY_STREAM() (the stream handed to the launchers), GUPPY_DEVICE_CHECK(t) and GUPPY_GUARD(t).
// Validation of user input lives in guppy/csrc/attention.py (one clear error per bad input); the checks here guard
// the kernels' own preconditions (dtype, layout, alignment).
#pragma once
#include <torch/extension.h>
#include <string>
#include <vector>
#include "attention_api.h"

namespace guppy_bind {

inline void check_qkv(const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.dim() == 4, name, " must be (B, H, T, D)");
    TORCH_CHECK(x.scalar_type() == at::kHalf, name, " must be float16");
    TORCH_CHECK(x.stride(3) == 1, name, " must have a contiguous last dimension");
    TORCH_CHECK(x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                name, ": strides must be multiples of 8 elements and the data 16-byte aligned");
    GUPPY_DEVICE_CHECK(x);
}

inline void throw_if(const char* err) { TORCH_CHECK(err == nullptr, "guppy.csrc: ", err ? err : ""); }

inline GuppyAttnParams params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const c10::optional<at::Tensor>& seg, const at::Tensor& seg_sorted, bool causal,
                              double sm_scale, double dropout_p, const at::Tensor& seed) {
    check_qkv(q, "q"); check_qkv(k, "k"); check_qkv(v, "v");
    TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must have the same shape");
    GuppyAttnParams p{};
    p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
    p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_st = q.stride(2);
    p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
    p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
    p.B = (int)q.size(0); p.H = (int)q.size(1); p.T = (int)q.size(2); p.D = (int)q.size(3);
    if (seg.has_value() && seg->defined()) {
        TORCH_CHECK(seg->scalar_type() == at::kInt && seg->is_contiguous() && seg->dim() == 2 &&
                        seg->size(0) == p.B && seg->size(1) == p.T, "segment_ids must be contiguous int32 (B, T)");
        GUPPY_DEVICE_CHECK((*seg));
        p.seg = seg->data_ptr<int32_t>();
    }
    TORCH_CHECK(seg_sorted.scalar_type() == at::kInt && seg_sorted.numel() == 1, "seg_sorted must be (1,) int32");
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, "seed must be (1,) int64");
    GUPPY_DEVICE_CHECK(seg_sorted);
    GUPPY_DEVICE_CHECK(seed);
    p.seg_sorted = seg_sorted.data_ptr<int32_t>();
    p.seed = reinterpret_cast<const long long*>(seed.data_ptr<int64_t>());
    p.causal = causal ? 1 : 0;
    p.sm_scale = (float)sm_scale;
    p.dropout_p = (float)dropout_p;
    return p;
}

inline std::vector<at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& seg, const at::Tensor& seg_sorted, bool causal,
                                   double sm_scale, double dropout_p, const at::Tensor& seed) {
    GUPPY_GUARD(q);
    GuppyAttnParams p = params(q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed);
    auto o = at::empty({p.B, p.H, p.T, p.D}, q.options());
    auto lse = at::empty({p.B, p.H, p.T}, q.options().dtype(at::kFloat));
    p.o = o.data_ptr(); p.lse = lse.data_ptr<float>();
    if (p.B * p.H * p.T) throw_if(guppy_attn_fwd(p, GUPPY_STREAM()));
    return {o, lse};
}

inline std::vector<at::Tensor> bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dout,
                                   const c10::optional<at::Tensor>& seg, const at::Tensor& seg_sorted, bool causal,
                                   double sm_scale, double dropout_p, const at::Tensor& seed) {
    GUPPY_GUARD(q);
    GuppyAttnParams p = params(q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed);
    TORCH_CHECK(o.is_contiguous() && dout.is_contiguous() && lse.is_contiguous(), "o, dout, lse must be contiguous");
    TORCH_CHECK(o.sizes() == q.sizes() && dout.sizes() == q.sizes(), "o and dout must have q's shape");
    TORCH_CHECK(o.scalar_type() == at::kHalf && dout.scalar_type() == at::kHalf && lse.scalar_type() == at::kFloat,
                "o, dout must be float16 and lse float32");
    auto dq = at::empty({p.B, p.H, p.T, p.D}, q.options());
    auto dk = at::empty_like(dq), dv = at::empty_like(dq);
    auto delta = at::empty({p.B, p.H, p.T}, q.options().dtype(at::kFloat));
    p.o_in = o.data_ptr(); p.dout = dout.data_ptr(); p.lse_in = lse.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
    if (p.B * p.H * p.T) throw_if(guppy_attn_bwd(p, GUPPY_STREAM()));
    return {dq, dk, dv};
}

inline at::Tensor dropout_mask(int64_t B, int64_t H, int64_t T, double p, int64_t seed) {
    auto keep = at::empty({B, H, T, T}, at::TensorOptions().dtype(at::kByte));
    guppy_attn_dropout_mask(keep.data_ptr<uint8_t>(), (int)B, (int)H, (int)T, (float)p, (unsigned long long)seed);
    return keep.to(at::kBool);
}

inline int64_t smem(const std::string& kernel, int64_t D) { return (int64_t)guppy_attn_smem(kernel.c_str(), (int)D); }

inline at::Tensor test_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    // a (32, 2) int32 (f16x2 bits), b (32,) int32, c (32, 4) float32 -> d (32, 4) float32
    GUPPY_GUARD(c);
    auto d = at::empty({32, 4}, c.options());
    throw_if(guppy_test_mma(reinterpret_cast<const uint32_t*>(a.data_ptr<int32_t>()),
                            reinterpret_cast<const uint32_t*>(b.data_ptr<int32_t>()), c.data_ptr<float>(),
                            d.data_ptr<float>(), GUPPY_STREAM()));
    return d;
}

inline at::Tensor test_ldmatrix(const at::Tensor& mat, const at::Tensor& rowsel) {
    // mat (32, 8) int16 (fp16 bits), rowsel (32,) int32 -> (6, 32, 4) int32
    GUPPY_GUARD(rowsel);
    auto out = at::zeros({6, 32, 4}, rowsel.options());
    throw_if(guppy_test_ldmatrix(reinterpret_cast<const uint16_t*>(mat.data_ptr<int16_t>()),
                                 rowsel.data_ptr<int32_t>(), reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()),
                                 GUPPY_STREAM()));
    return out;
}

inline std::vector<at::Tensor> test_reduce(const at::Tensor& x, int64_t nblocks, int64_t nthreads) {
    TORCH_CHECK(x.numel() == nblocks * nthreads && x.scalar_type() == at::kFloat && x.is_contiguous(), "bad x");
    GUPPY_GUARD(x);
    auto shfl = at::empty({5, nblocks * nthreads}, x.options());
    auto warps = at::empty({nblocks * nthreads / 32}, x.options());
    auto blocks = at::empty({nblocks}, x.options());
    throw_if(guppy_test_reduce(x.data_ptr<float>(), (int)nblocks, (int)nthreads, shfl.data_ptr<float>(),
                               warps.data_ptr<float>(), blocks.data_ptr<float>(), GUPPY_STREAM()));
    return {shfl, warps, blocks};
}

}  // namespace guppy_bind

#define GUPPY_DEFINE_MODULE(m)                                                                        \
    m.def("fwd", &guppy_bind::fwd);                                                                   \
    m.def("bwd", &guppy_bind::bwd);                                                                   \
    m.def("dropout_mask", &guppy_bind::dropout_mask);                                                 \
    m.def("test_mma", &guppy_bind::test_mma);                                                         \
    m.def("test_ldmatrix", &guppy_bind::test_ldmatrix);                                               \
    m.def("test_reduce", &guppy_bind::test_reduce);                                                   \
    m.def("smem", &guppy_bind::smem);
