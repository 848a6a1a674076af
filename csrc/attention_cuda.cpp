// attention_cuda.cpp -- guppy.csrc on CUDA tensors: torch binding for the kernels that nvcc compiles from attention.cu
// and emu_tests.cu (built together by csrc/extension.py with torch.utils.cpp_extension.load, ninja).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#define GUPPY_STREAM() static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream())
#define GUPPY_DEVICE_CHECK(t) TORCH_CHECK((t).is_cuda(), "the CUDA build takes CUDA tensors")
#define GUPPY_GUARD(t) const c10::cuda::OptionalCUDAGuard guppy_guard_(device_of(t))
#include "binding.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    GUPPY_DEFINE_MODULE(m)
    m.attr("emulated") = false;
}
