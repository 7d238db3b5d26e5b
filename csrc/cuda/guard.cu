// check_kernel_image: whether the CUDA kernels of this library can run on a GPU, asked of CUDA once per GPU.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <atomic>

#include "../common.h"
#include "guard.cuh"

namespace taste {
namespace {

__global__ void probe_kernel() {}

// 1 once a GPU is known to run this library's code.
std::atomic<int> kernel_image_ok[C10_COMPILE_TIME_MAX_GPUS];

}  // namespace

void check_kernel_image(c10::DeviceIndex index) {
  const bool cached = index >= 0 && index < C10_COMPILE_TIME_MAX_GPUS;
  if (cached && kernel_image_ok[index].load(std::memory_order_relaxed) == 1) return;
  // Loads the library's code for the current GPU (CUDA loads modules lazily) and reports when none fits it.
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err == cudaSuccess) {
    if (cached) kernel_image_ok[index].store(1, std::memory_order_relaxed);
    return;
  }
  (void)cudaGetLastError();  // not a sticky error: clear it so that the next CUDA call does not report it
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(index);
  TORCH_CHECK(false, "taste._C cannot run its CUDA kernels on GPU ", static_cast<int>(index), " (", prop->name,
              ", compute capability ", prop->major, ".", prop->minor, "): ", cudaGetErrorString(err),
              ". It was compiled for TORCH_CUDA_ARCH_LIST=", cuda_arch_list(),
              " (taste.ops.CUDA_ARCH_LIST). Rebuild it for this GPU: TORCH_CUDA_ARCH_LIST=\"", prop->major, ".",
              prop->minor, "\" pip install --no-build-isolation --force-reinstall --no-deps .");
}

}  // namespace taste
