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
    const at::Tensor& word_ids, const at::Tensor& cu_seqlens, int64_t delay) {
  DelayLayoutBuffers b = prepare_delay_layout(word_ids, cu_seqlens, delay);
  const int32_t* cu = b.cu_seqlens.data_ptr<int32_t>();
  const int32_t* co = b.cu_out.data_ptr<int32_t>();
  const int64_t* wc = b.words.data_ptr<int64_t>();
  const int64_t* wb = b.base.data_ptr<int64_t>();
  int64_t *it = b.input_token.data_ptr<int64_t>(), *iw = b.input_word.data_ptr<int64_t>();
  int64_t *lt = b.label_token.data_ptr<int64_t>(), *lw = b.label_word.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(b.word_ids.scalar_type(), "delay_layout_cpu", [&] {
    const index_t* wid = b.word_ids.const_data_ptr<index_t>();
    at::parallel_for(0, b.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t L = cu[s + 1] - cu[s];
        for (int64_t p = 0; p < L + delay + 1; ++p) {
          const DelayRow r = delay_row(wid + cu[s], L, wc[s], wb[s], cu[s], delay, p);
          const int64_t m = co[s] + p;
          it[m] = r.input_token;
          iw[m] = r.input_word;
          lt[m] = r.label_token;
          lw[m] = r.label_word;
        }
      }
    });
  });
  return {b.cu_out, b.input_token, b.input_word, b.label_token, b.label_word};
}

}  // namespace

TORCH_LIBRARY_IMPL(taste, CPU, m) {
  m.impl("word_offsets", &word_offsets_cpu);
  m.impl("delay_layout", &delay_layout_cpu);
}

}  // namespace taste
