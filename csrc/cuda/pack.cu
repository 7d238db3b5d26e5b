// CUDA kernels of pack / pack_offsets / unpack (one row-copy launch each, csrc/cuda/rows.cuh) and prefix_layout.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>

#include "guard.cuh"
#include "rows.cuh"

namespace taste {
namespace {

struct PackMap {  // packed row n <- padded row (b, n - cu[b])
  const int32_t* cu;
  int64_t batch, T;
  __device__ int64_t operator()(int64_t n) const {
    const int64_t b = find_segment(cu, batch, n);
    const int64_t t = n - cu[b];
    return t >= 0 && t < T ? b * T + t : -1;
  }
};

struct UnpackMap {  // padded row (b, t) <- packed row cu[b] + t, or the pad value past the sequence's end
  const int32_t* cu;
  int64_t max_len, total;
  __device__ int64_t operator()(int64_t r) const {
    const int64_t b = r / max_len, t = r - b * max_len;
    const int64_t src = static_cast<int64_t>(cu[b]) + t;
    return t < static_cast<int64_t>(cu[b + 1]) - cu[b] && src < total ? src : -1;
  }
};

at::Tensor gather_sequences_cuda(const at::Tensor& padded_in, const at::Tensor& cu_seqlens, int64_t total) {
  const at::Tensor padded = padded_in.contiguous();
  at::Tensor packed = at::empty(output_shape({total}, padded, 2), padded.options());
  const int64_t batch = padded.size(0), T = padded.size(1);
  if (packed.numel() == 0 || batch == 0 || T == 0) return packed;
  unsigned char pad[16];
  fill_pad_row(packed, 0.0, pad);
  copy_rows(padded.const_data_ptr(), packed.data_ptr(), total, packed.nbytes() / total, pad,
            PackMap{cu_seqlens.data_ptr<int32_t>(), batch, T});
  return packed;
}

std::tuple<at::Tensor, at::Tensor> pack_cuda(const at::Tensor& padded, const at::Tensor& lengths) {
  check_pack_args(padded, lengths);
  const DeviceGuard guard(padded.device());
  auto [cu, total] = lengths_to_cu_seqlens(lengths, padded.size(1));
  return {gather_sequences_cuda(padded, cu, total), cu};
}

at::Tensor pack_offsets_cuda(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total) {
  check_pack_offsets_args(padded, cu_seqlens, total);
  const DeviceGuard guard(padded.device());
  return gather_sequences_cuda(padded, cu_seqlens.contiguous(), total);
}

at::Tensor unpack_cuda(const at::Tensor& packed_in, const at::Tensor& cu_seqlens_in, int64_t max_len,
                       double pad_value) {
  check_unpack_args(packed_in, cu_seqlens_in, max_len);
  const DeviceGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t batch = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty(output_shape({batch, max_len}, packed, 1), packed.options());
  if (out.numel() == 0) return out;
  unsigned char pad[16];
  fill_pad_row(out, pad_value, pad);
  copy_rows(packed.const_data_ptr(), out.data_ptr(), batch * max_len, out.nbytes() / (batch * max_len), pad,
            UnpackMap{cu_seqlens.data_ptr<int32_t>(), max_len, packed.size(0)});
  return out;
}

// One thread per row of the prefix layout and per entry of its offsets (csrc/common.h: prefix_row).
template <typename id_t>
__global__ void prefix_layout_kernel(const id_t* __restrict__ tokens, const id_t* __restrict__ prefix,
                                     const int32_t* __restrict__ cu, int64_t batch, int64_t n, int64_t P,
                                     int64_t threads, int32_t* __restrict__ cu_out, id_t* __restrict__ ids,
                                     int64_t* __restrict__ positions, int64_t* __restrict__ token_rows) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m < threads) prefix_row(tokens, prefix, cu, batch, n, P, m, cu_out, ids, positions, token_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_layout_cuda(const at::Tensor& tokens,
                                                                              const at::Tensor& cu_seqlens,
                                                                              const at::Tensor& prefix) {
  const DeviceGuard guard(tokens.device());
  PrefixLayoutBuffers b = prepare_prefix_layout(tokens, cu_seqlens, prefix);
  const int64_t threads = std::max(b.rows, b.batch + 1);
  constexpr int kThreads = 256;
  AT_DISPATCH_INDEX_TYPES(b.tokens.scalar_type(), "prefix_layout_cuda", [&] {
    prefix_layout_kernel<index_t><<<static_cast<unsigned>((threads + kThreads - 1) / kThreads), kThreads, 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
        b.tokens.const_data_ptr<index_t>(), b.prefix.const_data_ptr<index_t>(), b.cu_seqlens.const_data_ptr<int32_t>(),
        b.batch, b.tokens.size(0), b.prefix.size(0), threads, b.cu_out.data_ptr<int32_t>(), b.ids.data_ptr<index_t>(),
        b.positions.data_ptr<int64_t>(), b.token_rows.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {b.cu_out, b.ids, b.positions, b.token_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(taste, CUDA, m) {
  m.impl("pack", &pack_cuda);
  m.impl("pack_offsets", &pack_offsets_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("prefix_layout", &prefix_layout_cuda);
}

}  // namespace taste
