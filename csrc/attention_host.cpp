// attention_host.cpp -- guppy.csrc on CPU tensors: the kernels of attention.cu and emu_tests.cu compiled for the host
// by the system C++ compiler, running on the CUDA-execution emulator in cuda_emu.h. One translation unit; the same
// torch ops as the CUDA build (binding.h) plus the emulator's own probes.
//   built by csrc/extension.py with torch.utils.cpp_extension.load(..., extra_cflags=["-O2", "-std=c++20", ...])
#define GUPPY_STREAM(t) nullptr
#define GUPPY_DEVICE_CHECK(t) GUPPY_CHECK(!(t).is_cuda(), "the host build takes CPU tensors")
#define GUPPY_GUARD(t) (void)0
#include "binding.h"   // torch first: the emulator defines __global__/__device__ and friends after it
#include "cuda_emu.h"
#include "attention.cu"
#include "emu_tests.cu"

namespace guppy_host {   // the emulator's own probes, for its tests

using guppy_bind::Tensor;
using torch::headeronly::ScalarType;

inline std::vector<int64_t> philox4x32_10(std::vector<int64_t> ctr, std::vector<int64_t> key) {
    GUPPY_CHECK(ctr.size() == 4 && key.size() == 2, "ctr: 4 words, key: 2 words");
    GuppyU32x4 r = guppy_philox4x32_10((uint32_t)ctr[0], (uint32_t)ctr[1], (uint32_t)ctr[2], (uint32_t)ctr[3],
                                       (uint32_t)key[0], (uint32_t)key[1]);
    return {r.x, r.y, r.z, r.w};
}

inline Tensor half_bits(Tensor x) {   // emu::half conversion of float32 values, as int16 bit patterns
    Tensor xc = torch::stable::contiguous(x);
    Tensor out = torch::stable::new_empty(xc, {xc.numel()}, ScalarType::Short);
    const float* src = xc.const_data_ptr<float>();
    int16_t* dst = out.mutable_data_ptr<int16_t>();
    for (int64_t i = 0; i < xc.numel(); ++i) dst[i] = (int16_t)emu::float_to_half_bits(src[i]);
    return torch::stable::view(out, xc.sizes());
}

inline Tensor half_to_float(Tensor bits) {
    Tensor bc = torch::stable::contiguous(bits);
    Tensor out = torch::stable::new_empty(bc, {bc.numel()}, ScalarType::Float);
    const int16_t* src = bc.const_data_ptr<int16_t>();
    float* dst = out.mutable_data_ptr<float>();
    for (int64_t i = 0; i < bc.numel(); ++i) dst[i] = emu::half_bits_to_float((uint16_t)src[i]);
    return torch::stable::view(out, bc.sizes());
}

inline void test_bad_barrier() {   // raises RuntimeError("emulator: deadlock ...")
    std::vector<float> out(64, 0.f);
    guppy_test_bad_barrier(out.data());
}

}  // namespace guppy_host

GUPPY_TORCH_LIBRARY(m) {
    GUPPY_DEFINE_OPS(m)
    m.def("philox4x32_10(int[] ctr, int[] key) -> int[]");   // for the known-answer test
    m.def("half_bits(Tensor x) -> Tensor");
    m.def("half_to_float(Tensor bits) -> Tensor");
    m.def("test_bad_barrier() -> ()");
}

GUPPY_TORCH_LIBRARY_IMPL(m) {
    GUPPY_IMPL_OPS(m)
    m.impl("philox4x32_10", TORCH_BOX(&guppy_host::philox4x32_10));
    m.impl("half_bits", TORCH_BOX(&guppy_host::half_bits));
    m.impl("half_to_float", TORCH_BOX(&guppy_host::half_to_float));
    m.impl("test_bad_barrier", TORCH_BOX(&guppy_host::test_bad_barrier));
}
