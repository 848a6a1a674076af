// attention_cuda.cpp -- guppy.csrc on CUDA tensors: the torch ops (binding.h) for the kernels that nvcc compiles from
// attention.cu and emu_tests.cu (built together by csrc/extension.py with torch.utils.cpp_extension.load, ninja).
#ifndef USE_CUDA
#define USE_CUDA   // declares the CUDA entries of torch's C shim (current stream); torch's own build defines it
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>

// the stream torch's current CUDA stream for t's device is, as the launchers take it (a cudaStream_t)
static void* guppy_cuda_stream(const torch::stable::Tensor& t) {
    void* stream = nullptr;
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
    return stream;
}

#define GUPPY_STREAM(t) guppy_cuda_stream(t)
#define GUPPY_DEVICE_CHECK(t) GUPPY_CHECK((t).is_cuda(), "the CUDA build takes CUDA tensors")
#define GUPPY_GUARD(t) const torch::stable::accelerator::DeviceGuard guppy_guard_((t).get_device_index())
#include "binding.h"

GUPPY_TORCH_LIBRARY(m) {
    GUPPY_DEFINE_OPS(m)
}

GUPPY_TORCH_LIBRARY_IMPL(m) {
    GUPPY_IMPL_OPS(m)
}
