// attention_host.cpp -- guppy.csrc on CPU tensors: the kernels of attention.cu and emu_tests.cu compiled for the host
// by the system C++ compiler, running on the CUDA-execution emulator in cuda_emu.h. One translation unit.
//   built by csrc/extension.py with torch.utils.cpp_extension.load(..., extra_cflags=["-O2", "-std=c++20"])
#include <torch/extension.h>   // torch first: the emulator defines __global__/__device__ and friends after it
#include "cuda_emu.h"
#include "attention.cu"
#include "emu_tests.cu"

#define GUPPY_STREAM() nullptr
#define GUPPY_DEVICE_CHECK(t) TORCH_CHECK(!(t).is_cuda(), "the host build takes CPU tensors")
#define GUPPY_GUARD(t) (void)0
#include "binding.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    GUPPY_DEFINE_MODULE(m)
    m.def("philox4x32_10", [](std::vector<int64_t> ctr, std::vector<int64_t> key) {   // for the known-answer test
        TORCH_CHECK(ctr.size() == 4 && key.size() == 2, "ctr: 4 words, key: 2 words");
        GuppyU32x4 r = guppy_philox4x32_10((uint32_t)ctr[0], (uint32_t)ctr[1], (uint32_t)ctr[2], (uint32_t)ctr[3],
                                           (uint32_t)key[0], (uint32_t)key[1]);
        return std::vector<int64_t>{r.x, r.y, r.z, r.w};
    });
    m.def("half_bits", [](const at::Tensor& x) {   // emu::half conversion of float32 values, as int16 bit patterns
        auto xc = x.contiguous();
        auto out = at::empty(xc.sizes(), at::TensorOptions().dtype(at::kShort));
        const float* src = xc.data_ptr<float>();
        int16_t* dst = out.data_ptr<int16_t>();
        for (int64_t i = 0; i < xc.numel(); ++i) dst[i] = (int16_t)emu::float_to_half_bits(src[i]);
        return out;
    });
    m.def("half_to_float", [](const at::Tensor& bits) {
        auto bc = bits.contiguous();
        auto out = at::empty(bc.sizes(), at::TensorOptions().dtype(at::kFloat));
        for (int64_t i = 0; i < bc.numel(); ++i)
            out.data_ptr<float>()[i] = emu::half_bits_to_float((uint16_t)bc.data_ptr<int16_t>()[i]);
        return out;
    });
    m.def("test_bad_barrier", []() {   // raises RuntimeError("emulator: deadlock ...")
        auto out = at::zeros({64});
        guppy_test_bad_barrier(out.data_ptr<float>());
    });
    m.attr("emulated") = true;
}
