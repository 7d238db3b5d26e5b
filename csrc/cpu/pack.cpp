// CPU kernels of pack / pack_offsets / unpack: each sequence is one contiguous block of rows on both sides,
// so a sequence is a single memcpy and sequences run in parallel. prefix_layout: the row function of csrc/common.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../common.h"

namespace taste {
namespace {

at::Tensor gather_sequences(const at::Tensor& padded_in, const at::Tensor& cu_seqlens, int64_t total) {
  const at::Tensor padded = padded_in.contiguous();
  at::Tensor packed = at::empty(output_shape({total}, padded, 2), padded.options());
  const int64_t batch = padded.size(0), T = padded.size(1);
  if (packed.numel() == 0) return packed;  // (rows of 0 elements: null data, and memcpy must not see it)
  const int64_t row_bytes = packed.nbytes() / total;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const char* src = static_cast<const char*>(padded.const_data_ptr());
  char* dst = static_cast<char*>(packed.data_ptr());
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      std::memcpy(dst + cu[b] * row_bytes, src + b * T * row_bytes, (cu[b + 1] - cu[b]) * row_bytes);
    }
  });
  return packed;
}

std::tuple<at::Tensor, at::Tensor> pack_cpu(const at::Tensor& padded, const at::Tensor& lengths) {
  check_pack_args(padded, lengths);
  auto [cu, total] = lengths_to_cu_seqlens(lengths, padded.size(1));
  return {gather_sequences(padded, cu, total), cu};
}

at::Tensor pack_offsets_cpu(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total) {
  check_pack_offsets_args(padded, cu_seqlens, total);
  return gather_sequences(padded, cu_seqlens.contiguous(), total);
}

at::Tensor unpack_cpu(const at::Tensor& packed_in, const at::Tensor& cu_seqlens_in, int64_t max_len,
                      double pad_value) {
  check_unpack_args(packed_in, cu_seqlens_in, max_len);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t batch = cu_seqlens.size(0) - 1;
  at::Tensor out = at::empty(output_shape({batch, max_len}, packed, 1), packed.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = out.nbytes() / (batch * max_len);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const char* src = static_cast<const char*>(packed.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = cu[b + 1] - cu[b];
      if (len > 0) {  // (an empty batch's packed data is null, and memcpy must not see it)
        std::memcpy(dst + b * max_len * row_bytes, src + cu[b] * row_bytes, len * row_bytes);
      }
      if (len < max_len) out[b].narrow(0, len, max_len - len).fill_(pad_value);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_layout_cpu(const at::Tensor& tokens,
                                                                             const at::Tensor& cu_seqlens,
                                                                             const at::Tensor& prefix) {
  PrefixLayoutBuffers b = prepare_prefix_layout(tokens, cu_seqlens, prefix);
  const int32_t* cu = b.cu_seqlens.const_data_ptr<int32_t>();
  int32_t* cu_out = b.cu_out.data_ptr<int32_t>();
  int64_t* positions = b.positions.data_ptr<int64_t>();
  int64_t* token_rows = b.token_rows.data_ptr<int64_t>();
  const int64_t n = b.tokens.size(0), P = b.prefix.size(0);
  AT_DISPATCH_INDEX_TYPES(b.tokens.scalar_type(), "prefix_layout_cpu", [&] {
    const index_t* tokens_p = b.tokens.const_data_ptr<index_t>();
    const index_t* prefix_p = b.prefix.const_data_ptr<index_t>();
    index_t* ids = b.ids.data_ptr<index_t>();
    at::parallel_for(0, std::max(b.rows, b.batch + 1), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        prefix_row(tokens_p, prefix_p, cu, b.batch, n, P, m, cu_out, ids, positions, token_rows);
      }
    });
  });
  return {b.cu_out, b.ids, b.positions, b.token_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(taste, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("pack_offsets", &pack_offsets_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("prefix_layout", &prefix_layout_cpu);
}

}  // namespace taste
