// Input validation shared by the CPU and CUDA implementations, and the device-generic composite parts.
#include "common.h"

#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace taste {

void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0 && bytes >= 256) {
    auto* d = static_cast<__m128i*>(dst);
    const char* s = static_cast<const char*>(src);
    const size_t vectors = bytes / 16;
    for (size_t i = 0; i < vectors; ++i) {
      _mm_stream_si128(d + i, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16 * i)));
    }
    std::memcpy(static_cast<char*>(dst) + 16 * vectors, s + 16 * vectors, bytes - 16 * vectors);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

bool strict_checks() {
  static const bool enabled = [] {
    const char* v = std::getenv("TASTE_STRICT_CHECKS");
    return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

bool content_checks(const at::Tensor& t) { return t.is_cpu() || strict_checks(); }

// TASTE_CUDA_ARCHS is set by the build (setup.py, CMakeLists.txt): TORCH_CUDA_ARCH_LIST with commas for separators.
#define TASTE_STRINGIFY(...) #__VA_ARGS__
#define TASTE_EXPAND_STRINGIFY(...) TASTE_STRINGIFY(__VA_ARGS__)
const char* cuda_arch_list() {
#if defined(WITH_CUDA) && defined(TASTE_CUDA_ARCHS)
  return TASTE_EXPAND_STRINGIFY(TASTE_CUDA_ARCHS);
#elif defined(WITH_CUDA)
  return "unknown";
#else
  return "";
#endif
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "taste: ", b_name, " must be on the same device as ", a_name, " (",
              a.device(), "), got ", b.device());
}

std::string dtype_name(at::ScalarType dt) {
  // Python's spelling (what users write and what the references' errors print), not c10's ("Float", "Long").
  switch (dt) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(dt);
  }
}

void check_index_dtype(const at::Tensor& t, const char* name, bool allow_int64) {
  const auto dt = t.scalar_type();
  if (allow_int64) {
    TORCH_CHECK(dt == at::kInt || dt == at::kLong, "taste: ", name, " must be an int32 or int64 tensor, got ",
                dtype_name(dt));
  } else {
    TORCH_CHECK(dt == at::kInt, "taste: ", name, " must be an int32 tensor, got ", dtype_name(dt));
  }
}

void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "taste: ", name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              dtype_name(t.scalar_type()));
}

void check_offsets_tensor(const at::Tensor& offsets, const char* name) {
  check_index_dtype(offsets, name, /*allow_int64=*/false);
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "taste: ", name,
              " must be a 1-D tensor with at least one entry (segment count + 1), got shape ", offsets.sizes());
}

void check_offsets_values(const at::Tensor& offsets, const char* name, int64_t total, int64_t max_len) {
  if (!content_checks(offsets)) return;
  const at::Tensor host = offsets.to(at::kCPU).contiguous();
  const int32_t* o = host.data_ptr<int32_t>();
  const int64_t n = host.numel();
  TORCH_CHECK(o[0] == 0, "taste: ", name, " must start at 0, got ", name, "[0]=", o[0]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK(o[i + 1] >= o[i], "taste: ", name, " must be non-decreasing, got ", name, "[", i, "]=", o[i], " > ",
                name, "[", i + 1, "]=", o[i + 1]);
    TORCH_CHECK(max_len < 0 || o[i + 1] - o[i] <= max_len, "taste: sequence ", i, " has length ", o[i + 1] - o[i],
                " (from ", name, ") which exceeds max_len=", max_len);
  }
  TORCH_CHECK(total < 0 || o[n - 1] == total, "taste: ", name, " must end at the number of rows (", total, "), got ",
              name, "[", n - 1, "]=", o[n - 1]);
}

namespace {
template <typename word_t>
void check_word_ids_host(const word_t* wid, const int32_t* cu, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t n = cu[b]; n < cu[b + 1]; ++n) {
      if (n == cu[b]) {
        TORCH_CHECK(wid[n] == 0, "taste: word_ids of sequence ", b, " must start at 0, got word_ids[", n,
                    "]=", static_cast<int64_t>(wid[n]));
      } else {
        const int64_t step = static_cast<int64_t>(wid[n]) - static_cast<int64_t>(wid[n - 1]);
        TORCH_CHECK(step == 0 || step == 1, "taste: word_ids must be contiguous and non-decreasing within a sequence",
                    " (steps of 0 or 1), got word_ids[", n - 1, "]=", static_cast<int64_t>(wid[n - 1]), " then word_ids[",
                    n, "]=", static_cast<int64_t>(wid[n]), " in sequence ", b);
      }
    }
  }
}
}  // namespace

void check_word_ids_values(const at::Tensor& word_ids, const at::Tensor& cu_seqlens) {
  if (!content_checks(word_ids)) return;
  const at::Tensor wid = word_ids.to(at::kCPU).contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kCPU).contiguous();
  const int64_t batch = cu.numel() - 1;
  if (wid.scalar_type() == at::kInt) {
    check_word_ids_host(wid.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), batch);
  } else {
    check_word_ids_host(wid.data_ptr<int64_t>(), cu.data_ptr<int32_t>(), batch);
  }
}

std::tuple<at::Tensor, at::Tensor> segment_sum_by_key_impl(const at::Tensor& values, const at::Tensor& keys,
                                                           int64_t num_keys, SegmentReduceFn reduce) {
  TORCH_CHECK(values.dim() >= 1, "taste: values must have at least one dimension (N, ...), got a scalar");
  check_float_dtype(values, "values");
  check_index_dtype(keys, "keys", /*allow_int64=*/true);
  check_same_device(values, "values", keys, "keys");
  TORCH_CHECK(keys.dim() == 1 && keys.size(0) == values.size(0), "taste: keys must have shape (N,) = (",
              values.size(0), ",) matching values, got ", keys.sizes());
  TORCH_CHECK(num_keys >= 0, "taste: num_keys must be >= 0, got ", num_keys);
  if (content_checks(keys) && keys.numel() > 0) {
    const auto mn = keys.min().item<int64_t>();
    const auto mx = keys.max().item<int64_t>();
    TORCH_CHECK(mn >= -1 && mx < num_keys, "taste: keys must lie in [-1, num_keys) = [-1, ", num_keys,
                ") (-1 = ignore), got values in [", mn, ", ", mx, "]");
  }
  const at::Tensor k64 = keys.to(at::kLong);
  // A stable sort keeps equal keys in row order, so each key's sum runs over its rows in a fixed order.
  auto sorted = at::sort(k64, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_keys = std::get<0>(sorted);
  const at::Tensor& perm = std::get<1>(sorted);
  const at::Tensor bounds = at::searchsorted(sorted_keys, at::arange(num_keys + 1, k64.options()));
  const at::Tensor counts = at::diff(bounds);
  at::Tensor sums = reduce(values, bounds.to(at::kInt), perm, /*mean=*/false, /*broadcast=*/false);
  return {sums, counts};
}

std::tuple<at::Tensor, at::Tensor> words_per_sequence(const at::Tensor& word_ids, const at::Tensor& cu_seqlens) {
  const at::Tensor cu = cu_seqlens.to(at::kLong);
  const at::Tensor lengths = at::diff(cu);
  at::Tensor words = at::zeros_like(lengths);
  if (word_ids.numel() > 0) {
    // Clamped so that offsets that were not validated (CUDA without strict checks) never index out of range.
    const at::Tensor last = (cu.slice(0, 1) - 1).clamp(0, word_ids.numel() - 1);
    words = at::where(lengths > 0, word_ids.to(at::kLong).index_select(0, last) + 1, words);
  }
  const at::Tensor base = at::cumsum(words, 0) - words;
  return {words, base};
}

}  // namespace taste

namespace taste {

void check_pack_args(const at::Tensor& padded, const at::Tensor& lengths) {
  TORCH_CHECK(padded.dim() >= 2, "taste: padded must have shape (B, T, ...), got ", padded.sizes());
  check_index_dtype(lengths, "lengths", /*allow_int64=*/true);
  check_same_device(padded, "padded", lengths, "lengths");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == padded.size(0), "taste: lengths must have shape (B,) = (",
              padded.size(0), ",) matching padded, got ", lengths.sizes());
}

void check_pack_offsets_args(const at::Tensor& padded, const at::Tensor& cu_seqlens, int64_t total) {
  TORCH_CHECK(padded.dim() >= 2, "taste: padded must have shape (B, T, ...), got ", padded.sizes());
  check_offsets_tensor(cu_seqlens, "cu_seqlens");
  check_same_device(padded, "padded", cu_seqlens, "cu_seqlens");
  TORCH_CHECK(cu_seqlens.size(0) == padded.size(0) + 1, "taste: cu_seqlens must have shape (B + 1,) = (",
              padded.size(0) + 1, ",), got ", cu_seqlens.sizes());
  TORCH_CHECK(total >= 0, "taste: total must be >= 0, got ", total);
  check_offsets_values(cu_seqlens, "cu_seqlens", total, padded.size(1));
}

void check_unpack_args(const at::Tensor& packed, const at::Tensor& cu_seqlens, int64_t max_len) {
  TORCH_CHECK(packed.dim() >= 1, "taste: packed must have shape (N, ...), got a scalar");
  check_offsets_tensor(cu_seqlens, "cu_seqlens");
  check_same_device(packed, "packed", cu_seqlens, "cu_seqlens");
  TORCH_CHECK(max_len >= 0, "taste: max_len must be >= 0, got ", max_len);
  check_offsets_values(cu_seqlens, "cu_seqlens", packed.size(0), max_len);
}

void check_segment_args(const at::Tensor& x, const char* x_name, const at::Tensor& offsets, int64_t num_rows) {
  TORCH_CHECK(x.dim() >= 1, "taste: ", x_name, " must have shape (rows, ...), got a scalar");
  check_offsets_tensor(offsets, "offsets");
  check_same_device(x, x_name, offsets, "offsets");
  check_offsets_values(offsets, "offsets", num_rows);
}

void check_word_args(const at::Tensor& word_ids, const at::Tensor& cu_seqlens) {
  check_index_dtype(word_ids, "word_ids", /*allow_int64=*/true);
  TORCH_CHECK(word_ids.dim() == 1, "taste: word_ids must be a 1-D (N,) tensor, got shape ", word_ids.sizes());
  check_offsets_tensor(cu_seqlens, "cu_seqlens");
  check_same_device(word_ids, "word_ids", cu_seqlens, "cu_seqlens");
  check_offsets_values(cu_seqlens, "cu_seqlens", word_ids.size(0));
}

std::tuple<at::Tensor, int64_t> lengths_to_cu_seqlens(const at::Tensor& lengths, int64_t max_len) {
  const int64_t batch = lengths.size(0);
  at::Tensor cu = at::zeros({batch + 1}, lengths.options().dtype(at::kInt));
  if (batch == 0) return {cu, 0};
  const at::Tensor len64 = lengths.to(at::kLong);
  const at::Tensor csum = at::cumsum(len64, 0);
  // total, min and max travel to the host together: one sync for the output size and the checks.
  const at::Tensor stats = at::stack({csum[batch - 1], len64.min(), len64.max()}).to(at::kCPU);
  const int64_t* s = stats.data_ptr<int64_t>();
  if (s[1] < 0 || s[2] > max_len) {
    const at::Tensor host = len64.to(at::kCPU);
    const int64_t* l = host.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(l[b] >= 0, "taste: lengths must be >= 0, got lengths[", b, "]=", l[b]);
      TORCH_CHECK(l[b] <= max_len, "taste: lengths[", b, "]=", l[b], " exceeds the padded length T=", max_len);
    }
  }
  TORCH_CHECK(s[0] <= std::numeric_limits<int32_t>::max(), "taste: the packed batch has ", s[0],
              " rows, more than int32 cu_seqlens can index");
  cu.slice(0, 1).copy_(csum);
  return {cu, s[0]};
}

}  // namespace taste

namespace taste {

void check_broadcast_args(const at::Tensor& y, const at::Tensor& offsets) {
  TORCH_CHECK(y.dim() >= 1, "taste: y must have shape (segments, ...), got a scalar");
  check_offsets_tensor(offsets, "offsets");
  check_same_device(y, "y", offsets, "offsets");
  TORCH_CHECK(y.size(0) == offsets.size(0) - 1, "taste: y must have one row per segment (", offsets.size(0) - 1,
              " = len(offsets) - 1), got ", y.size(0));
}

std::vector<int64_t> output_shape(std::initializer_list<int64_t> lead, const at::Tensor& t, int64_t from) {
  std::vector<int64_t> shape(lead);
  for (int64_t d = from; d < t.dim(); ++d) shape.push_back(t.size(d));
  return shape;
}

PrefixLayoutBuffers prepare_prefix_layout(const at::Tensor& tokens, const at::Tensor& cu_seqlens,
                                          const at::Tensor& prefix) {
  check_index_dtype(tokens, "tokens", /*allow_int64=*/true);
  TORCH_CHECK(tokens.dim() == 1, "taste: tokens must be a 1-D (N,) tensor, got shape ", tokens.sizes());
  TORCH_CHECK(prefix.dim() == 1 && prefix.scalar_type() == tokens.scalar_type(),
              "taste: prefix must be a 1-D (P,) tensor of tokens' dtype (", dtype_name(tokens.scalar_type()),
              "), got ", dtype_name(prefix.scalar_type()), " of shape ", prefix.sizes());
  check_same_device(tokens, "tokens", prefix, "prefix");
  check_offsets_tensor(cu_seqlens, "cu_seqlens");
  check_same_device(tokens, "tokens", cu_seqlens, "cu_seqlens");
  check_offsets_values(cu_seqlens, "cu_seqlens", tokens.size(0));
  PrefixLayoutBuffers b;
  b.batch = cu_seqlens.size(0) - 1;
  TORCH_CHECK(b.batch > 0 || tokens.size(0) == 0, "taste: cu_seqlens has no sequence (shape (1,)) but tokens has ",
              tokens.size(0), " rows");
  b.rows = tokens.size(0) + b.batch * prefix.size(0);
  TORCH_CHECK(b.rows <= std::numeric_limits<int32_t>::max(), "taste: the prefixed batch has ", b.rows,
              " rows, more than int32 cu_seqlens can index");
  b.tokens = tokens.contiguous();
  b.cu_seqlens = cu_seqlens.contiguous();
  b.prefix = prefix.contiguous();
  b.cu_out = at::empty_like(b.cu_seqlens);
  b.ids = at::empty({b.rows}, tokens.options());
  b.positions = at::empty({b.rows}, tokens.options().dtype(at::kLong));
  b.token_rows = at::empty({tokens.size(0)}, tokens.options().dtype(at::kLong));
  return b;
}

DelayLayoutBuffers prepare_delay_layout(const at::Tensor& word_ids, const at::Tensor& cu_seqlens, int64_t delay) {
  check_word_args(word_ids, cu_seqlens);
  TORCH_CHECK(delay >= 0, "taste: delay must be >= 0, got ", delay);
  check_word_ids_values(word_ids, cu_seqlens);
  DelayLayoutBuffers b;
  b.word_ids = word_ids.contiguous();
  b.cu_seqlens = cu_seqlens.contiguous();
  b.batch = b.cu_seqlens.size(0) - 1;
  b.rows = b.word_ids.size(0) + b.batch * (delay + 1);
  std::tie(b.words, b.base) = words_per_sequence(b.word_ids, b.cu_seqlens);
  const auto opts = b.cu_seqlens.options().dtype(at::kLong);
  b.cu_out = (b.cu_seqlens.to(at::kLong) + at::arange(b.batch + 1, opts) * (delay + 1)).to(at::kInt);
  for (at::Tensor* t : {&b.input_token, &b.input_word, &b.label_token, &b.label_word}) *t = at::empty({b.rows}, opts);
  return b;
}

}  // namespace taste
