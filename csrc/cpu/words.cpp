// CPU kernels of the word-level layout ops: word segment offsets and the TASLM word-delay layout.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"

namespace taste {
namespace {

at::Tensor word_offsets_cpu(const at::Tensor& word_ids_in, const at::Tensor& cu_seqlens_in) {
  check_word_args(word_ids_in, cu_seqlens_in);
  check_word_ids_values(word_ids_in, cu_seqlens_in);
  const at::Tensor word_ids = word_ids_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t batch = cu_seqlens.size(0) - 1;
  // Word ids are validated: a sequence's words are 0..last, so its word count is its last id + 1.
  std::vector<int64_t> first_word(batch + 1, 0);
  AT_DISPATCH_INDEX_TYPES(word_ids.scalar_type(), "word_offsets_cpu", [&] {
    const index_t* wid = word_ids.const_data_ptr<index_t>();
    for (int64_t b = 0; b < batch; ++b) {
      first_word[b + 1] = first_word[b] + (cu[b + 1] > cu[b] ? static_cast<int64_t>(wid[cu[b + 1] - 1]) + 1 : 0);
    }
  });
  const int64_t words = first_word[batch];
  at::Tensor out = at::empty({words + 1}, cu_seqlens.options());
  int32_t* o = out.data_ptr<int32_t>();
  AT_DISPATCH_INDEX_TYPES(word_ids.scalar_type(), "word_offsets_cpu", [&] {
    const index_t* wid = word_ids.const_data_ptr<index_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        int64_t w = first_word[b];
        for (int64_t n = cu[b]; n < cu[b + 1]; ++n) {
          if (n == cu[b] || wid[n] != wid[n - 1]) o[w++] = static_cast<int32_t>(n);
        }
      }
    });
  });
  o[words] = cu[batch];
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> delay_layout_cpu(
    const at::Tensor& word_ids_in, const at::Tensor& cu_seqlens_in, int64_t delay) {
  check_word_args(word_ids_in, cu_seqlens_in);
  TORCH_CHECK(delay >= 0, "taste: delay must be >= 0, got ", delay);
  check_word_ids_values(word_ids_in, cu_seqlens_in);
  const at::Tensor word_ids = word_ids_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t batch = cu_seqlens.size(0) - 1;
  const int64_t rows = word_ids.size(0) + batch * (delay + 1);
  auto [words, base] = words_per_sequence(word_ids, cu_seqlens);
  const at::Tensor cu_out =
      (cu_seqlens.to(at::kLong) + at::arange(batch + 1, cu_seqlens.options().dtype(at::kLong)) * (delay + 1))
          .to(at::kInt);
  const auto opts = cu_seqlens.options().dtype(at::kLong);
  at::Tensor input_token = at::empty({rows}, opts), input_word = at::empty({rows}, opts);
  at::Tensor label_token = at::empty({rows}, opts), label_word = at::empty({rows}, opts);
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int32_t* co = cu_out.data_ptr<int32_t>();
  const int64_t* wc = words.data_ptr<int64_t>();
  const int64_t* wb = base.data_ptr<int64_t>();
  int64_t *it = input_token.data_ptr<int64_t>(), *iw = input_word.data_ptr<int64_t>();
  int64_t *lt = label_token.data_ptr<int64_t>(), *lw = label_word.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(word_ids.scalar_type(), "delay_layout_cpu", [&] {
    const index_t* wid = word_ids.const_data_ptr<index_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t L = cu[b + 1] - cu[b];
        for (int64_t p = 0; p < L + delay + 1; ++p) {
          const DelayRow r = delay_row(wid + cu[b], L, wc[b], wb[b], cu[b], delay, p);
          const int64_t m = co[b] + p;
          it[m] = r.input_token;
          iw[m] = r.input_word;
          lt[m] = r.label_token;
          lw[m] = r.label_word;
        }
      }
    });
  });
  return {cu_out, input_token, input_word, label_token, label_word};
}

}  // namespace

TORCH_LIBRARY_IMPL(taste, CPU, m) {
  m.impl("word_offsets", &word_offsets_cpu);
  m.impl("delay_layout", &delay_layout_cpu);
}

}  // namespace taste
