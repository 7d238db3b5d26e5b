// CPU kernels of the segment ops: sums and means over word segments, their broadcast back to rows, and the
// sort-based per-key sums. Each output row is produced by one task in a fixed order: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common.h"

namespace taste {

at::Tensor segment_reduce_cpu(const at::Tensor& x_in, const at::Tensor& offsets_in,
                              const std::optional<at::Tensor>& perm_in, bool mean, bool broadcast) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t segments = offsets.size(0) - 1;
  at::Tensor out = at::empty(output_shape({broadcast ? x.size(0) : segments}, x, 1), x.options());
  const int64_t rows = x.size(0);
  const int64_t F = rows == 0 ? out.numel() / std::max<int64_t>(segments, 1) : x.numel() / rows;
  if (out.numel() == 0 || segments == 0) return out;
  const int32_t* o = offsets.data_ptr<int32_t>();
  at::Tensor perm;
  if (perm_in.has_value()) perm = perm_in->contiguous();
  const int64_t* p = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(F, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(F);
      std::vector<scalar_t> row_buffer(broadcast ? F : 0);
      for (int64_t w = begin; w < end; ++w) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const int64_t lo = std::max<int64_t>(o[w], 0), hi = std::min<int64_t>(o[w + 1], rows);
        for (int64_t r = lo; r < hi; ++r) {
          const scalar_t* row = xp + (p ? p[r] : r) * F;
          for (int64_t f = 0; f < F; ++f) acc[f] += static_cast<acc_t>(row[f]);
        }
        if (broadcast && hi <= lo) continue;  // an empty segment owns no row
        const acc_t count = static_cast<acc_t>(std::max<int64_t>(hi - lo, 1));
        scalar_t* dst = broadcast ? row_buffer.data() : op + w * F;
        for (int64_t f = 0; f < F; ++f) dst[f] = static_cast<scalar_t>(mean ? acc[f] / count : acc[f]);
        for (int64_t r = lo; broadcast && r < hi; ++r) stream_copy(op + r * F, dst, F * sizeof(scalar_t));
      }
      stream_fence();
    });
  });
  return out;
}

namespace {

at::Tensor segment_broadcast_cpu(const at::Tensor& y_in, const at::Tensor& offsets_in,
                                 std::optional<int64_t> num_rows) {
  check_broadcast_args(y_in, offsets_in);
  const at::Tensor offsets = offsets_in.contiguous();
  const int32_t* o = offsets.data_ptr<int32_t>();
  const int64_t segments = offsets.size(0) - 1;
  const int64_t rows = num_rows.has_value() ? *num_rows : o[segments];
  TORCH_CHECK(rows >= 0, "taste: num_rows must be >= 0, got ", rows);
  check_segment_args(y_in, "y", offsets, rows);
  const at::Tensor y = y_in.contiguous();
  at::Tensor out = at::empty(output_shape({rows}, y, 1), y.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = out.nbytes() / rows;
  const char* src = static_cast<const char*>(y.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t r = o[w]; r < o[w + 1]; ++r) stream_copy(dst + r * row_bytes, src + w * row_bytes, row_bytes);
    }
    stream_fence();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> segment_sum_by_key_cpu(const at::Tensor& values, const at::Tensor& keys,
                                                          int64_t num_keys) {
  return segment_sum_by_key_impl(values, keys, num_keys, &segment_reduce_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(taste, CPU, m) {
  m.impl("segment_sum", &segment_reduce_op<&segment_reduce_cpu, false, false>);
  m.impl("segment_mean", &segment_reduce_op<&segment_reduce_cpu, true, false>);
  m.impl("segment_mean_broadcast", &segment_reduce_op<&segment_reduce_cpu, true, true>);
  m.impl("segment_broadcast", &segment_broadcast_cpu);
  m.impl("segment_sum_by_key", &segment_sum_by_key_cpu);
}

}  // namespace taste
