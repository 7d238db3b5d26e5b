// CUDA kernels of the word-level layout ops: word segment offsets (flag, scan, scatter) and the TASLM word-delay
// layout (one thread per output row, the same row function as the CPU kernel).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "guard.cuh"
#include "rows.cuh"

namespace taste {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// flags[n] = 1 where row n starts a word. bad[0] = the first row whose word id breaks the contract (else N).
template <typename word_t>
__global__ void word_starts_kernel(const word_t* __restrict__ wid, const int32_t* __restrict__ cu, int64_t batch,
                                   int64_t n_rows, int32_t* __restrict__ flags, int32_t* __restrict__ bad) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_rows) return;
  const int64_t b = batch > 0 ? find_segment(cu, batch, n) : 0;
  const bool first = n == 0 || batch == 0 || n == cu[b];
  const int64_t step = first ? 0 : static_cast<int64_t>(wid[n]) - wid[n - 1];
  flags[n] = first || step != 0;
  const bool ok = first ? wid[n] == 0 : (step == 0 || step == 1);
  if (!ok) atomicMin(bad, static_cast<int32_t>(n));
}

__global__ void scatter_starts_kernel(const int32_t* __restrict__ flags, const int32_t* __restrict__ pos,
                                      int64_t n_rows, int32_t* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < n_rows && flags[n]) out[pos[n] - 1] = static_cast<int32_t>(n);
}

at::Tensor word_offsets_cuda(const at::Tensor& word_ids_in, const at::Tensor& cu_seqlens_in) {
  check_word_args(word_ids_in, cu_seqlens_in);
  const DeviceGuard guard(word_ids_in.device());
  const at::Tensor word_ids = word_ids_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t n_rows = word_ids.size(0), batch = cu_seqlens.size(0) - 1;
  if (n_rows == 0) return at::zeros({1}, cu_seqlens.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor flags = at::empty({n_rows}, cu_seqlens.options());
  at::Tensor bad = at::full({1}, n_rows, cu_seqlens.options());
  AT_DISPATCH_INDEX_TYPES(word_ids.scalar_type(), "word_offsets_cuda", [&] {
    word_starts_kernel<index_t><<<blocks_for(n_rows), kThreads, 0, stream>>>(
        word_ids.const_data_ptr<index_t>(), cu_seqlens.const_data_ptr<int32_t>(), batch, n_rows,
        flags.data_ptr<int32_t>(), bad.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor pos = at::cumsum(flags, 0, at::kInt);
  // The word count sizes the output: read it back with the validity flag and the offsets in one sync.
  const at::Tensor stats = at::cat({pos.slice(0, n_rows - 1), bad, cu_seqlens}).cpu();
  const int32_t* host = stats.data_ptr<int32_t>();
  check_offsets_values(stats.slice(0, 2), "cu_seqlens", n_rows);
  const int64_t words = host[0];
  if (host[1] < n_rows) {
    check_word_ids_values(word_ids.cpu(), stats.slice(0, 2));  // throws with the offending index
    TORCH_CHECK(false, "taste: invalid word_ids at row ", host[1]);
  }
  at::Tensor out = at::empty({words + 1}, cu_seqlens.options());
  scatter_starts_kernel<<<blocks_for(n_rows), kThreads, 0, stream>>>(flags.const_data_ptr<int32_t>(),
                                                                       pos.const_data_ptr<int32_t>(), n_rows,
                                                                       out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  out.slice(0, words).fill_(n_rows);
  return out;
}

template <typename word_t>
__global__ void delay_layout_kernel(const word_t* __restrict__ wid, const int32_t* __restrict__ cu,
                                    const int32_t* __restrict__ cu_out, const int64_t* __restrict__ words,
                                    const int64_t* __restrict__ base, int64_t batch, int64_t n_rows, int64_t rows,
                                    int64_t delay, int64_t* __restrict__ input_token,
                                    int64_t* __restrict__ input_word, int64_t* __restrict__ label_token,
                                    int64_t* __restrict__ label_word) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= rows) return;
  DelayRow r{-1, -1, -1, -1};
  const int64_t b = batch > 0 ? find_segment(cu_out, batch, m) : 0;
  const int64_t start = batch > 0 ? cu[b] : 0, L = batch > 0 ? static_cast<int64_t>(cu[b + 1]) - cu[b] : -1;
  const int64_t p = batch > 0 ? m - cu_out[b] : -1;
  // Unvalidated offsets (CUDA without strict checks) never make this read outside word_ids.
  if (L >= 0 && start >= 0 && start + L <= n_rows && p >= 0 && p <= L + delay) {
    r = delay_row(wid + start, L, words[b], base[b], start, delay, p);
  }
  input_token[m] = r.input_token;
  input_word[m] = r.input_word;
  label_token[m] = r.label_token;
  label_word[m] = r.label_word;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> delay_layout_cuda(
    const at::Tensor& word_ids, const at::Tensor& cu_seqlens, int64_t delay) {
  const DeviceGuard guard(word_ids.device());
  DelayLayoutBuffers b = prepare_delay_layout(word_ids, cu_seqlens, delay);
  if (b.rows > 0) {
    AT_DISPATCH_INDEX_TYPES(b.word_ids.scalar_type(), "delay_layout_cuda", [&] {
      delay_layout_kernel<index_t><<<blocks_for(b.rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          b.word_ids.const_data_ptr<index_t>(), b.cu_seqlens.const_data_ptr<int32_t>(),
          b.cu_out.const_data_ptr<int32_t>(), b.words.const_data_ptr<int64_t>(), b.base.const_data_ptr<int64_t>(),
          b.batch, b.word_ids.size(0), b.rows, delay, b.input_token.data_ptr<int64_t>(),
          b.input_word.data_ptr<int64_t>(), b.label_token.data_ptr<int64_t>(), b.label_word.data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {b.cu_out, b.input_token, b.input_word, b.label_token, b.label_word};
}

}  // namespace

TORCH_LIBRARY_IMPL(taste, CUDA, m) {
  m.impl("word_offsets", &word_offsets_cuda);
  m.impl("delay_layout", &delay_layout_cuda);
}

}  // namespace taste
