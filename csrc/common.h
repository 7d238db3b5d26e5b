// Shared declarations of the taste ops: input validation, the device-agnostic row mapping helpers and the
// CPU/CUDA entry points that composite ops call. Kept within C++17 so that it builds with torch 2.11 and 2.14.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__CUDACC__)
#define TASTE_HD __host__ __device__ __forceinline__
#else
#define TASTE_HD inline
#endif

namespace taste {

// Largest b in [0, n) with offsets[b] + step * b <= x, for non-decreasing offsets (n + 1 entries, offsets[0] <= x).
// Empty segments (equal neighbours) are skipped, so the returned segment always contains x. ``step`` shifts segment
// b by step * b rows: the offsets of a layout that adds ``step`` rows to every segment, without making them.
template <typename index_t>
TASTE_HD int64_t find_segment(const index_t* offsets, int64_t n, int64_t x, int64_t step = 0) {
  int64_t lo = 0, hi = n;  // invariant: offsets[lo] + step * lo <= x < offsets[hi] + step * hi
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(offsets[mid]) + step * mid <= x) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Row m of the prefix layout (see prefix_layout in taste/ops.py), for the CPU and the CUDA kernel alike: sequence b's
// rows start at cu[b] + P * b and hold its P prefix ids, then its tokens. Writes the row's position, its id (a
// prefix id, or the token it holds, which also records the row in token_rows) and, for m <= batch, cu_out[m].
// A row whose token falls outside the n tokens (offsets not validated: CUDA without strict checks) gets id -1.
template <typename id_t>
TASTE_HD void prefix_row(const id_t* tokens, const id_t* prefix, const int32_t* cu, int64_t batch, int64_t n,
                         int64_t P, int64_t m, int32_t* cu_out, id_t* ids, int64_t* positions, int64_t* token_rows) {
  if (m <= batch) cu_out[m] = static_cast<int32_t>(cu[m] + P * m);
  if (m >= n + batch * P) return;
  const int64_t b = find_segment(cu, batch, m, P);
  const int64_t p = m - cu[b] - P * b;  // >= 0 where cu[0] == 0
  const int64_t token = cu[b] + p - P;
  positions[m] = p;
  if (p < P) {
    ids[m] = p >= 0 ? prefix[p] : static_cast<id_t>(-1);
  } else if (token >= 0 && token < n) {
    ids[m] = tokens[token];
    token_rows[token] = m;
  } else {
    ids[m] = static_cast<id_t>(-1);
  }
}

// One row of the TASLM word-delay layout (see delay_layout in taste/ops.py for the definition).
// p: row inside the output sequence, 0 <= p < L + delay + 1. wid: the sequence's word ids (L of them),
// W: its number of words, base: global index of its first word, start: packed index of its first token.
struct DelayRow {
  int64_t input_token, input_word, label_token, label_word;
};

template <typename word_t>
TASTE_HD DelayRow delay_row(const word_t* wid, int64_t L, int64_t W, int64_t base, int64_t start, int64_t delay,
                            int64_t p) {
  DelayRow r{-1, -1, -1, -1};
  // Text position j = p - 1 is fed at row p; row p also predicts what is fed at row p + 1 (position p).
  // Tail positions j >= L are virtual one-row words W, W+1, ... that carry the last delayed codes.
  if (p >= 1) {
    const int64_t j = p - 1;
    r.input_token = j < L ? start + j : -2;
    const int64_t v = j < L ? static_cast<int64_t>(wid[j]) : W + (j - L);
    r.input_word = v - delay >= 0 ? base + v - delay : -1;
  }
  if (p < L) r.label_token = start + p;
  if (p < L + delay) {
    const int64_t j = p;
    const bool word_start = j >= L || j == 0 || wid[j] != wid[j - 1];
    const int64_t v = j < L ? static_cast<int64_t>(wid[j]) : W + (j - L);
    if (word_start && v - delay >= 0) r.label_word = base + v - delay;
  }
  return r;
}

// Copies bytes from src to dst with non-temporal (streaming) stores where dst is 16-byte aligned: the output of
// the CPU row-copy kernels is written once and not read back soon, so skipping the read-for-ownership of every
// destination line saves a third of the memory traffic. Call stream_fence() before the data is read elsewhere.
void stream_copy(void* dst, const void* src, size_t bytes);
void stream_fence();

// The GPU architectures the CUDA kernels were compiled for, as TORCH_CUDA_ARCH_LIST at build time with commas
// ("9.0+PTX"); "" when the library has no CUDA kernels.
const char* cuda_arch_list();

// ---- validation (csrc/common.cpp) ----
// Content checks (values of offsets and ids) always run on CPU tensors. On CUDA tensors they need a device
// sync, so they run only where the op syncs anyway, or when TASTE_STRICT_CHECKS=1 is set in the environment.
bool strict_checks();
bool content_checks(const at::Tensor& t);
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name);
std::string dtype_name(at::ScalarType dt);  // "torch.float32", as Python prints it
void check_index_dtype(const at::Tensor& t, const char* name, bool allow_int64);
void check_float_dtype(const at::Tensor& t, const char* name);
// cu_seqlens / word_offsets: 1-D int32, starts at 0, non-decreasing, ends at `total` (when total >= 0).
void check_offsets_tensor(const at::Tensor& offsets, const char* name);
void check_offsets_values(const at::Tensor& offsets, const char* name, int64_t total, int64_t max_len = -1);
// Word ids of every sequence start at 0 and step by 0 or 1.
void check_word_ids_values(const at::Tensor& word_ids, const at::Tensor& cu_seqlens);

// Argument checks of each op, shared by its CPU and CUDA kernels (shapes, dtypes, devices; values as above).
void check_pack_args(const at::Tensor& padded, const at::Tensor& lengths);
void check_pack_offsets_args(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total);
void check_unpack_args(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_len);
void check_segment_args(const at::Tensor& x, const char* x_name, const at::Tensor& offsets, int64_t num_rows);
void check_word_args(const at::Tensor& word_ids, const at::Tensor& cu_seqlens);
// Validates lengths (0 <= length <= max_len) and returns (cu_seqlens int32 (B + 1,), total rows). One host sync.
std::tuple<at::Tensor, int64_t> lengths_to_cu_seqlens(const at::Tensor& lengths, int64_t max_len);

void check_broadcast_args(const at::Tensor& y, const at::Tensor& offsets);
// {lead..., t.sizes()[from:]...}: the shape of an output whose leading dims change and trailing dims are t's.
std::vector<int64_t> output_shape(std::initializer_list<int64_t> lead, const at::Tensor& t, int64_t from);

// Everything the delay_layout kernels need besides the row function: checks, per-sequence word counts and
// first global words (int64 (B,)), the output offsets (int32 (B + 1,)) and the four int64 (M,) outputs.
struct DelayLayoutBuffers {
  at::Tensor word_ids, cu_seqlens, cu_out, words, base, input_token, input_word, label_token, label_word;
  int64_t batch, rows;
};
DelayLayoutBuffers prepare_delay_layout(const at::Tensor& word_ids, const at::Tensor& cu_seqlens, int64_t delay);

// Everything the prefix_layout kernels need: checked contiguous inputs and the outputs (see prefix_layout in
// taste/ops.py). The kernels write every entry: cu_out (B + 1,) int32, ids (M,) tokens' dtype, positions (M,)
// int64, token_rows (N,) int64, with M = N + B * P.
struct PrefixLayoutBuffers {
  at::Tensor tokens, cu_seqlens, prefix, cu_out, ids, positions, token_rows;
  int64_t batch, rows;
};
PrefixLayoutBuffers prepare_prefix_layout(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                                          const at::Tensor& prefix);

// ---- implementations shared by composite ops ----
// out[w] = sum (or mean) of x[perm[r]] for r in [offsets[w], offsets[w+1]) (perm optional, int64). With
// broadcast (mean only, no perm) the mean is written to every row of its segment instead: out has x's shape.
at::Tensor segment_reduce_cpu(const at::Tensor& x, const at::Tensor& offsets, const std::optional<at::Tensor>& perm,
                              bool mean, bool broadcast);
#ifdef WITH_CUDA
at::Tensor segment_reduce_cuda(const at::Tensor& x, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& perm, bool mean, bool broadcast);
#endif
using SegmentReduceFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool,
                                       bool);

// segment_sum / segment_mean / segment_mean_broadcast on one device: checks, then that device's reduction.
template <SegmentReduceFn Reduce, bool Mean, bool Broadcast>
at::Tensor segment_reduce_op(const at::Tensor& x, const at::Tensor& offsets) {
  check_float_dtype(x, "x");
  check_segment_args(x, "x", offsets, x.dim() >= 1 ? x.size(0) : -1);
  return Reduce(x, offsets, std::nullopt, Mean, Broadcast);
}

// Deterministic, sort-based per-key sums and counts (csrc/common.cpp; same code for every device).
std::tuple<at::Tensor, at::Tensor> segment_sum_by_key_impl(const at::Tensor& values, const at::Tensor& keys,
                                                           int64_t num_keys, SegmentReduceFn reduce);
// Per-sequence word counts and the global index of each sequence's first word (int64, (B,) each).
std::tuple<at::Tensor, at::Tensor> words_per_sequence(const at::Tensor& word_ids, const at::Tensor& cu_seqlens);

}  // namespace taste
