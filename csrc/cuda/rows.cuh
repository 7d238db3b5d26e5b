// The CUDA row-copy kernel behind pack, pack_offsets, unpack and segment_broadcast: out[r] = src[map(r)], or a
// pad row where map(r) < 0. Rows are copied as the widest word (16, 8, 4, 2 or 1 bytes) that divides the row
// and the pointers' alignment, whatever the dtype.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstring>

#include "../common.h"

namespace taste {

template <typename word_t, typename Map>
__global__ void _copy_rows_kernel(const word_t* __restrict__ src, word_t* __restrict__ dst, int64_t rows,
                                  int64_t words_per_row, word_t pad, Map map) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t from = map(row);
  word_t* d = dst + row * words_per_row;
  if (from < 0) {
    for (int64_t w = threadIdx.x; w < words_per_row; w += blockDim.x) d[w] = pad;
  } else {
    const word_t* s = src + from * words_per_row;
    for (int64_t w = threadIdx.x; w < words_per_row; w += blockDim.x) d[w] = s[w];
  }
}

template <typename word_t, typename Map>
void _launch_copy_rows(const void* src, void* dst, int64_t rows, int64_t row_bytes, const void* pad_row, Map map) {
  const int64_t words_per_row = row_bytes / static_cast<int64_t>(sizeof(word_t));
  word_t pad;
  std::memcpy(&pad, pad_row, sizeof(word_t));
  int threads_x = 1;
  while (threads_x < words_per_row && threads_x < 256) threads_x *= 2;
  const dim3 block(threads_x, 256 / threads_x);
  const int64_t blocks = (rows + block.y - 1) / block.y;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "taste: too many rows for one launch: ", rows);
  _copy_rows_kernel<word_t><<<static_cast<unsigned>(blocks), block, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const word_t*>(src), static_cast<word_t*>(dst), rows, words_per_row, pad, map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// pad_row: 16 bytes holding the pad element repeated (only read where map returns < 0).
template <typename Map>
void copy_rows(const void* src, void* dst, int64_t rows, int64_t row_bytes, const unsigned char* pad_row, Map map) {
  if (rows == 0 || row_bytes == 0) return;
  const auto bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                    static_cast<uintptr_t>(row_bytes);
  if (bits % 16 == 0) {
    _launch_copy_rows<uint4>(src, dst, rows, row_bytes, pad_row, map);
  } else if (bits % 8 == 0) {
    _launch_copy_rows<uint2>(src, dst, rows, row_bytes, pad_row, map);
  } else if (bits % 4 == 0) {
    _launch_copy_rows<uint32_t>(src, dst, rows, row_bytes, pad_row, map);
  } else if (bits % 2 == 0) {
    _launch_copy_rows<uint16_t>(src, dst, rows, row_bytes, pad_row, map);
  } else {
    _launch_copy_rows<uint8_t>(src, dst, rows, row_bytes, pad_row, map);
  }
}

// 16 bytes of a tensor's element value, repeated (the pad word for any word width).
inline void fill_pad_row(const at::Tensor& like, double value, unsigned char* pad_row) {
  const at::Tensor one = at::full({1}, value, like.options().device(at::kCPU));
  const auto size = static_cast<size_t>(one.element_size());
  for (size_t i = 0; i < 16; i += size) std::memcpy(pad_row + i, one.const_data_ptr(), size);
}

}  // namespace taste
