// The device guard of every CUDA entry point: it makes the tensor's GPU current (as c10::cuda::CUDAGuard) and
// checks, once per GPU, that this library carries code that runs there (csrc/cuda/guard.cu).
#pragma once

#include <c10/cuda/CUDAGuard.h>

namespace taste {

// Raises a clear error when the library has no kernel image for the current GPU (it was compiled for other
// architectures: TORCH_CUDA_ARCH_LIST at build time), instead of CUDA's "no kernel image is available".
void check_kernel_image(c10::DeviceIndex index);

struct DeviceGuard {
  c10::cuda::CUDAGuard guard;
  explicit DeviceGuard(const at::Device& device) : guard(device) { check_kernel_image(guard.current_device().index()); }
};

}  // namespace taste
