// binding.h -- the torch-facing functions shared by attention_host.cpp (emulator build) and attention_cuda.cpp
// (nvcc build), registered as torch ops by GUPPY_DEFINE_OPS: Python calls torch.ops.<extension name>.fwd(...), which
// csrc/extension.py wraps as `module.fwd(...)`. The includer defines GUPPY_STREAM(t) (the stream handed to the
// launchers, for tensor t's device), GUPPY_DEVICE_CHECK(t) and GUPPY_GUARD(t).
// Written against torch's stable C++ ABI (torch/csrc/stable, torch >= 2.10): its headers are a thin layer over a C
// shim, where torch/extension.h pulls in all of ATen, the C++ frontend and pybind11; compiling that was most of a
// cold CUDA build (notes/csrc.md, "Cold build").
// Validation of user input lives in guppy/csrc/attention_op.py (one clear error per bad input); the checks here guard
// the kernels' own preconditions (dtype, layout, alignment).
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>
#include "attention_api.h"

namespace guppy_bind {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// a failed precondition: std::runtime_error carrying the message alone (torch raises it in Python as RuntimeError)
template <typename... Parts>
[[noreturn]] inline void fail(const Parts&... parts) {
    std::ostringstream msg;
    (msg << ... << parts);
    throw std::runtime_error(msg.str());
}
#define GUPPY_CHECK(cond, ...)                        \
    do {                                              \
        if (!(cond)) ::guppy_bind::fail(__VA_ARGS__); \
    } while (0)

inline void check_qkv(const Tensor& x, const char* name) {
    GUPPY_CHECK(x.dim() == 4, name, " must be (B, H, T, D)");
    GUPPY_CHECK(x.scalar_type() == ScalarType::Half, name, " must be float16");
    GUPPY_CHECK(x.stride(3) == 1, name, " must have a contiguous last dimension");
    GUPPY_CHECK(x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
                name, ": strides must be multiples of 8 elements and the data 16-byte aligned");
    GUPPY_DEVICE_CHECK(x);
}

inline void throw_if(const char* err) { GUPPY_CHECK(err == nullptr, "guppy.csrc: ", err ? err : ""); }

inline bool same_shape(const Tensor& a, const Tensor& b) {
    if (a.dim() != b.dim()) return false;
    for (int64_t i = 0; i < a.dim(); ++i)
        if (a.size(i) != b.size(i)) return false;
    return true;
}

inline GuppyAttnParams params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& seg,
                              const Tensor& seg_sorted, bool causal, double sm_scale, double dropout_p,
                              const Tensor& seed) {
    check_qkv(q, "q"); check_qkv(k, "k"); check_qkv(v, "v");
    GUPPY_CHECK(same_shape(q, k) && same_shape(q, v), "q, k, v must have the same shape");
    GuppyAttnParams p{};
    p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
    p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_st = q.stride(2);
    p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
    p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
    p.B = (int)q.size(0); p.H = (int)q.size(1); p.T = (int)q.size(2); p.D = (int)q.size(3);
    if (seg.has_value() && seg->defined()) {
        GUPPY_CHECK(seg->scalar_type() == ScalarType::Int && seg->is_contiguous() && seg->dim() == 2 &&
                        seg->size(0) == p.B && seg->size(1) == p.T, "segment_ids must be contiguous int32 (B, T)");
        GUPPY_DEVICE_CHECK((*seg));
        p.seg = seg->const_data_ptr<int32_t>();
    }
    GUPPY_CHECK(seg_sorted.scalar_type() == ScalarType::Int && seg_sorted.numel() == 1,
                "seg_sorted must be (1,) int32");
    GUPPY_CHECK(seed.scalar_type() == ScalarType::Long && seed.numel() == 1, "seed must be (1,) int64");
    GUPPY_DEVICE_CHECK(seg_sorted);
    GUPPY_DEVICE_CHECK(seed);
    p.seg_sorted = seg_sorted.const_data_ptr<int32_t>();
    p.seed = reinterpret_cast<const long long*>(seed.const_data_ptr<int64_t>());
    p.causal = causal ? 1 : 0;
    p.sm_scale = (float)sm_scale;
    p.dropout_p = (float)dropout_p;
    return p;
}

inline std::vector<Tensor> fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> seg, Tensor seg_sorted,
                               bool causal, double sm_scale, double dropout_p, Tensor seed) {
    GUPPY_GUARD(q);
    GuppyAttnParams p = params(q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed);
    Tensor o = torch::stable::new_empty(q, {p.B, p.H, p.T, p.D});
    Tensor lse = torch::stable::new_empty(q, {p.B, p.H, p.T}, ScalarType::Float);
    p.o = o.mutable_data_ptr(); p.lse = lse.mutable_data_ptr<float>();
    if (p.B * p.H * p.T) throw_if(guppy_attn_fwd(p, GUPPY_STREAM(q)));
    return {o, lse};
}

inline std::vector<Tensor> bwd(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dout,
                               std::optional<Tensor> seg, Tensor seg_sorted, bool causal, double sm_scale,
                               double dropout_p, Tensor seed) {
    GUPPY_GUARD(q);
    GuppyAttnParams p = params(q, k, v, seg, seg_sorted, causal, sm_scale, dropout_p, seed);
    GUPPY_CHECK(o.is_contiguous() && dout.is_contiguous() && lse.is_contiguous(), "o, dout, lse must be contiguous");
    GUPPY_CHECK(same_shape(o, q) && same_shape(dout, q), "o and dout must have q's shape");
    GUPPY_CHECK(o.scalar_type() == ScalarType::Half && dout.scalar_type() == ScalarType::Half &&
                    lse.scalar_type() == ScalarType::Float, "o, dout must be float16 and lse float32");
    Tensor dq = torch::stable::new_empty(q, {p.B, p.H, p.T, p.D});
    Tensor dk = torch::stable::new_empty(q, {p.B, p.H, p.T, p.D});
    Tensor dv = torch::stable::new_empty(q, {p.B, p.H, p.T, p.D});
    Tensor delta = torch::stable::new_empty(q, {p.B, p.H, p.T}, ScalarType::Float);
    p.o_in = o.const_data_ptr(); p.dout = dout.const_data_ptr(); p.lse_in = lse.const_data_ptr<float>();
    p.delta = delta.mutable_data_ptr<float>();
    p.dq = dq.mutable_data_ptr(); p.dk = dk.mutable_data_ptr(); p.dv = dv.mutable_data_ptr();
    if (p.B * p.H * p.T) throw_if(guppy_attn_bwd(p, GUPPY_STREAM(q)));
    return {dq, dk, dv};
}

inline Tensor dropout_mask(int64_t B, int64_t H, int64_t T, double p, int64_t seed) {
    Tensor keep = torch::stable::empty({B, H, T, T}, ScalarType::Byte);   // on the CPU
    guppy_attn_dropout_mask(keep.mutable_data_ptr<uint8_t>(), (int)B, (int)H, (int)T, (float)p,
                            (unsigned long long)seed);
    return torch::stable::to(keep, ScalarType::Bool);
}

inline int64_t smem(std::string kernel, int64_t D) { return (int64_t)guppy_attn_smem(kernel.c_str(), (int)D); }

inline bool has_head_dim(int64_t D) { return guppy_attn_has_head_dim((int)D) != 0; }

inline Tensor test_mma(Tensor a, Tensor b, Tensor c) {
    // a (32, 2) int32 (f16x2 bits), b (32,) int32, c (32, 4) float32 -> d (32, 4) float32
    GUPPY_GUARD(c);
    Tensor d = torch::stable::new_empty(c, {32, 4});
    throw_if(guppy_test_mma(reinterpret_cast<const uint32_t*>(a.const_data_ptr<int32_t>()),
                            reinterpret_cast<const uint32_t*>(b.const_data_ptr<int32_t>()),
                            c.const_data_ptr<float>(), d.mutable_data_ptr<float>(), GUPPY_STREAM(c)));
    return d;
}

inline Tensor test_ldmatrix(Tensor mat, Tensor rowsel) {
    // mat (32, 8) int16 (fp16 bits), rowsel (32,) int32 -> (6, 32, 4) int32
    GUPPY_GUARD(rowsel);
    Tensor out = torch::stable::new_zeros(rowsel, {6, 32, 4});
    throw_if(guppy_test_ldmatrix(reinterpret_cast<const uint16_t*>(mat.const_data_ptr<int16_t>()),
                                 rowsel.const_data_ptr<int32_t>(),
                                 reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>()), GUPPY_STREAM(rowsel)));
    return out;
}

inline std::vector<Tensor> test_reduce(Tensor x, int64_t nblocks, int64_t nthreads) {
    GUPPY_CHECK(x.numel() == nblocks * nthreads && x.scalar_type() == ScalarType::Float && x.is_contiguous(),
                "bad x");
    GUPPY_GUARD(x);
    Tensor shfl = torch::stable::new_empty(x, {5, nblocks * nthreads});
    Tensor warps = torch::stable::new_empty(x, {nblocks * nthreads / 32});
    Tensor blocks = torch::stable::new_empty(x, {nblocks});
    throw_if(guppy_test_reduce(x.const_data_ptr<float>(), (int)nblocks, (int)nthreads,
                               shfl.mutable_data_ptr<float>(), warps.mutable_data_ptr<float>(),
                               blocks.mutable_data_ptr<float>(), GUPPY_STREAM(x)));
    return {shfl, warps, blocks};
}

}  // namespace guppy_bind

// The registration macros stringify their namespace argument: one more macro level expands TORCH_EXTENSION_NAME
// (set by torch's build to the extension's name, unique per build) first. Kernels are registered for
// CompositeExplicitAutograd: every device; the autograd.Function in attention_op.py owns the gradients.
#define GUPPY_TORCH_LIBRARY_(ns, m) STABLE_TORCH_LIBRARY(ns, m)
#define GUPPY_TORCH_LIBRARY(m) GUPPY_TORCH_LIBRARY_(TORCH_EXTENSION_NAME, m)
#define GUPPY_TORCH_LIBRARY_IMPL_(ns, m) STABLE_TORCH_LIBRARY_IMPL(ns, CompositeExplicitAutograd, m)
#define GUPPY_TORCH_LIBRARY_IMPL(m) GUPPY_TORCH_LIBRARY_IMPL_(TORCH_EXTENSION_NAME, m)

#define GUPPY_DEFINE_OPS(m)                                                                                     \
    m.def("fwd(Tensor q, Tensor k, Tensor v, Tensor? seg, Tensor seg_sorted, bool causal, float sm_scale, "     \
          "float dropout_p, Tensor seed) -> Tensor[]");                                                        \
    m.def("bwd(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dout, Tensor? seg, Tensor seg_sorted, " \
          "bool causal, float sm_scale, float dropout_p, Tensor seed) -> Tensor[]");                          \
    m.def("dropout_mask(int B, int H, int T, float p, int seed) -> Tensor");                                  \
    m.def("test_mma(Tensor a, Tensor b, Tensor c) -> Tensor");                                                \
    m.def("test_ldmatrix(Tensor mat, Tensor rowsel) -> Tensor");                                              \
    m.def("test_reduce(Tensor x, int nblocks, int nthreads) -> Tensor[]");                                    \
    m.def("smem(str kernel, int D) -> int");                                                                  \
    m.def("has_head_dim(int D) -> bool");

#define GUPPY_IMPL_OPS(m)                                                                                       \
    m.impl("fwd", TORCH_BOX(&guppy_bind::fwd));                                                                 \
    m.impl("bwd", TORCH_BOX(&guppy_bind::bwd));                                                                 \
    m.impl("dropout_mask", TORCH_BOX(&guppy_bind::dropout_mask));                                               \
    m.impl("test_mma", TORCH_BOX(&guppy_bind::test_mma));                                                       \
    m.impl("test_ldmatrix", TORCH_BOX(&guppy_bind::test_ldmatrix));                                             \
    m.impl("test_reduce", TORCH_BOX(&guppy_bind::test_reduce));                                                 \
    m.impl("smem", TORCH_BOX(&guppy_bind::smem));                                                               \
    m.impl("has_head_dim", TORCH_BOX(&guppy_bind::has_head_dim));
