// CUDA kernels of the segment ops. One thread owns one (segment, column group) and walks the segment's rows in
// order, so sums are deterministic (no atomics) and each row is read with vector loads of up to 16 bytes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "guard.cuh"
#include "rows.cuh"

namespace taste {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename scalar_t, int VEC>
__global__ void segment_reduce_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ offsets,
                                      const int64_t* __restrict__ perm, scalar_t* __restrict__ out,
                                      int64_t segments, int64_t groups, int64_t rows, bool mean, bool broadcast) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (s >= segments) return;
  // Clamped: offsets that were not validated (no strict checks on CUDA) can never read outside x.
  const int64_t lo = max(static_cast<int64_t>(offsets[s]), int64_t(0));
  const int64_t hi = min(static_cast<int64_t>(offsets[s + 1]), rows);
  const acc_t count = static_cast<acc_t>(hi > lo ? hi - lo : 1);
  const auto* xv = reinterpret_cast<const Vec<scalar_t, VEC>*>(x);
  auto* ov = reinterpret_cast<Vec<scalar_t, VEC>*>(out);
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t row = perm != nullptr ? perm[r] : r;
      if (row < 0 || row >= rows) continue;
      const Vec<scalar_t, VEC> v = xv[row * groups + g];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += static_cast<acc_t>(v.v[i]);
    }
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = static_cast<scalar_t>(mean ? acc[i] / count : acc[i]);
    if (broadcast) {
      for (int64_t r = lo; r < hi; ++r) ov[r * groups + g] = o;
    } else {
      ov[s * groups + g] = o;
    }
  }
}

template <typename scalar_t, int VEC>
void launch_segment_reduce(const at::Tensor& x, const at::Tensor& offsets, const int64_t* perm, at::Tensor& out,
                           int64_t F, bool mean, bool broadcast) {
  const int64_t segments = offsets.size(0) - 1, groups = F / VEC;
  int threads_x = 1;
  while (threads_x < groups && threads_x < 256) threads_x *= 2;
  const dim3 block(threads_x, 256 / threads_x);
  const int64_t blocks = (segments + block.y - 1) / block.y;
  segment_reduce_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), block, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), offsets.const_data_ptr<int32_t>(), perm, out.data_ptr<scalar_t>(), segments,
      groups, x.size(0), mean, broadcast);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct BroadcastMap {  // row r <- the segment that contains it
  const int32_t* offsets;
  int64_t segments;
  __device__ int64_t operator()(int64_t r) const {
    if (segments == 0) return -1;
    const int64_t w = find_segment(offsets, segments, r);
    return r >= offsets[w] && r < offsets[w + 1] ? w : -1;
  }
};

}  // namespace

at::Tensor segment_reduce_cuda(const at::Tensor& x_in, const at::Tensor& offsets_in,
                               const std::optional<at::Tensor>& perm_in, bool mean, bool broadcast) {
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t segments = offsets.size(0) - 1;
  at::Tensor out = at::empty(output_shape({broadcast ? x.size(0) : segments}, x, 1), x.options());
  if (out.numel() == 0 || segments == 0) return out;
  const int64_t F = out.numel() / out.size(0);
  at::Tensor perm;
  if (perm_in.has_value()) perm = perm_in->contiguous();
  const int64_t* p = perm.defined() ? perm.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto bits = reinterpret_cast<uintptr_t>(x.const_data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr());
    if (F % kVec == 0 && bits % 16 == 0) {
      launch_segment_reduce<scalar_t, kVec>(x, offsets, p, out, F, mean, broadcast);
    } else {
      launch_segment_reduce<scalar_t, 1>(x, offsets, p, out, F, mean, broadcast);
    }
  });
  return out;
}

namespace {

at::Tensor segment_broadcast_cuda(const at::Tensor& y_in, const at::Tensor& offsets_in,
                                  std::optional<int64_t> num_rows) {
  check_broadcast_args(y_in, offsets_in);
  const DeviceGuard guard(y_in.device());
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t segments = offsets.size(0) - 1;
  int64_t rows = num_rows.has_value() ? *num_rows : -1;
  if (!num_rows.has_value()) {
    // The output size is offsets[-1]: read the offsets back once and check them on the same sync.
    const at::Tensor host = offsets.cpu();
    rows = host.data_ptr<int32_t>()[segments];
    check_offsets_values(host, "offsets", rows);
  }
  TORCH_CHECK(rows >= 0, "taste: num_rows must be >= 0, got ", rows);
  check_segment_args(y_in, "y", offsets, rows);
  const at::Tensor y = y_in.contiguous();
  at::Tensor out = at::empty(output_shape({rows}, y, 1), y.options());
  if (out.numel() == 0) return out;
  unsigned char pad[16];
  fill_pad_row(out, 0.0, pad);
  copy_rows(y.const_data_ptr(), out.data_ptr(), rows, out.nbytes() / rows, pad,
            BroadcastMap{offsets.data_ptr<int32_t>(), segments});
  return out;
}

std::tuple<at::Tensor, at::Tensor> segment_sum_by_key_cuda(const at::Tensor& values, const at::Tensor& keys,
                                                           int64_t num_keys) {
  const DeviceGuard guard(values.device());
  return segment_sum_by_key_impl(values, keys, num_keys, &segment_reduce_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(taste, CUDA, m) {
  m.impl("segment_sum", &segment_reduce_op<&segment_reduce_cuda, false, false>);
  m.impl("segment_mean", &segment_reduce_op<&segment_reduce_cuda, true, false>);
  m.impl("segment_mean_broadcast", &segment_reduce_op<&segment_reduce_cuda, true, true>);
  m.impl("segment_broadcast", &segment_broadcast_cuda);
  m.impl("segment_sum_by_key", &segment_sum_by_key_cuda);
}

}  // namespace taste
