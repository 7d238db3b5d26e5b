// ctest suite of the CPU kernels, called through the dispatcher as libtorch users would (no Python).
// Each case compares an op with a plain loop over the same data; `taste_cpu_tests CASE` runs one case.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "../../csrc/common.h"

namespace {

using at::Tensor;

template <typename Fn>
auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

#define EXPECT(cond)                                                          \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "%s:%d: expectation failed: %s\n", __FILE__, __LINE__, #cond); \
      return false;                                                           \
    }                                                                         \
  } while (0)

Tensor i32(std::vector<int32_t> v) { return at::tensor(v, at::kInt); }
Tensor i64(std::vector<int64_t> v) { return at::tensor(v, at::kLong); }

bool pack_unpack() {
  auto pack = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)>("taste::pack");
  auto unpack = op<Tensor(const Tensor&, const Tensor&, c10::SymInt, double)>("taste::unpack");
  const Tensor padded = at::randn({4, 6, 3});
  const std::vector<int64_t> lengths{6, 0, 1, 4};
  auto [packed, cu] = pack.call(padded, i64(lengths));
  EXPECT(packed.size(0) == 11 && packed.size(1) == 3);
  EXPECT(cu.scalar_type() == at::kInt && at::equal(cu, i32({0, 6, 6, 7, 11})));
  int64_t row = 0;
  for (int64_t b = 0; b < 4; ++b) {
    for (int64_t t = 0; t < lengths[b]; ++t) EXPECT(at::equal(packed[row++], padded[b][t]));
  }
  const Tensor out = unpack.call(packed, cu, 7, -2.0);
  for (int64_t b = 0; b < 4; ++b) {
    for (int64_t t = 0; t < 7; ++t) {
      EXPECT(t < lengths[b] ? at::equal(out[b][t], padded[b][t]) : out[b][t].eq(-2.0).all().item<bool>());
    }
  }
  return true;
}

bool word_offsets() {
  auto word_offsets = op<Tensor(const Tensor&, const Tensor&)>("taste::word_offsets");
  EXPECT(at::equal(word_offsets.call(i64({0, 0, 1, 0, 1, 1, 2}), i32({0, 3, 3, 7})), i32({0, 2, 3, 4, 6, 7})));
  EXPECT(at::equal(word_offsets.call(i32({}), i32({0, 0})), i32({0})));
  return true;
}

bool segment_mean_broadcast() {
  auto mean = op<Tensor(const Tensor&, const Tensor&)>("taste::segment_mean");
  auto sum = op<Tensor(const Tensor&, const Tensor&)>("taste::segment_sum");
  auto broadcast = op<Tensor(const Tensor&, const Tensor&, std::optional<c10::SymInt>)>("taste::segment_broadcast");
  const Tensor x = at::randn({9, 1280}, at::kDouble);
  const Tensor offsets = i32({0, 3, 3, 4, 9});
  const Tensor m = mean.call(x, offsets), s = sum.call(x, offsets);
  const std::vector<int64_t> o{0, 3, 3, 4, 9};
  for (int64_t w = 0; w < 4; ++w) {
    const Tensor expected = o[w + 1] > o[w] ? x.slice(0, o[w], o[w + 1]).sum(0) : at::zeros({1280}, at::kDouble);
    EXPECT(at::allclose(s[w], expected, 1e-12, 1e-12));
    EXPECT(at::allclose(m[w], expected / std::max<int64_t>(o[w + 1] - o[w], 1), 1e-12, 1e-12));
  }
  const Tensor b = broadcast.call(m, offsets, std::nullopt);
  EXPECT(b.size(0) == 9);
  for (int64_t w = 0; w < 4; ++w) {
    for (int64_t r = o[w]; r < o[w + 1]; ++r) EXPECT(at::equal(b[r], m[w]));
  }
  return true;
}

bool segment_sum_by_key() {
  auto by_key = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>("taste::segment_sum_by_key");
  const Tensor keys = at::randint(-1, 16, {1000}, at::kLong);
  const Tensor values = at::randn({1000, 8}, at::kDouble);
  auto [sums, counts] = by_key.call(values, keys, 16);
  Tensor expected = at::zeros({16, 8}, at::kDouble);
  Tensor expected_counts = at::zeros({16}, at::kLong);
  for (int64_t r = 0; r < 1000; ++r) {
    const int64_t k = keys[r].item<int64_t>();
    if (k < 0) continue;
    expected[k] += values[r];
    expected_counts[k] += 1;
  }
  EXPECT(at::equal(counts, expected_counts));
  EXPECT(at::allclose(sums, expected, 1e-12, 1e-12));
  return true;
}

bool delay_layout() {
  using Out = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
  auto layout = op<Out(const Tensor&, const Tensor&, int64_t)>("taste::delay_layout");
  // The worked example of spec section 2.4.
  auto [cu, input_token, input_word, label_token, label_word] = layout.call(i64({0, 0, 1, 2, 2}), i32({0, 5}), 1);
  EXPECT(at::equal(cu, i32({0, 7})));
  EXPECT(at::equal(input_token, i64({-1, 0, 1, 2, 3, 4, -2})));
  EXPECT(at::equal(input_word, i64({-1, -1, -1, 0, 1, 1, 2})));
  EXPECT(at::equal(label_token, i64({0, 1, 2, 3, 4, -1, -1})));
  EXPECT(at::equal(label_word, i64({-1, -1, 0, 1, -1, 2, -1})));
  return true;
}

bool prefix_layout() {
  using Out = std::tuple<Tensor, Tensor, Tensor, Tensor>;
  auto layout = op<Out(const Tensor&, const Tensor&, const Tensor&)>("taste::prefix_layout");
  // Sequences of 2, 0 and 1 tokens, each after the prefix (90, 91).
  auto [cu, ids, positions, token_rows] = layout.call(i64({5, 6, 7}), i32({0, 2, 2, 3}), i64({90, 91}));
  EXPECT(at::equal(cu, i32({0, 4, 6, 9})));
  EXPECT(at::equal(ids, i64({90, 91, 5, 6, 90, 91, 90, 91, 7})));
  EXPECT(at::equal(positions, i64({0, 1, 2, 3, 0, 1, 0, 1, 2})));
  EXPECT(at::equal(token_rows, i64({2, 3, 8})));
  // The row function the CUDA kernel runs on offsets it does not validate: it never reads outside the tokens.
  const int64_t tok[2] = {5, 6}, pre[1] = {90};
  auto rows_of = [&](std::vector<int32_t> cu_in) {
    const int64_t batch = static_cast<int64_t>(cu_in.size()) - 1, rows = 2 + batch;
    std::vector<int32_t> cu_o(cu_in.size());
    std::vector<int64_t> ids_o(rows), pos_o(rows), tr(2, -7);
    for (int64_t m = 0; m < std::max<int64_t>(rows, batch + 1); ++m) {
      taste::prefix_row(tok, pre, cu_in.data(), batch, 2, 1, m, cu_o.data(), ids_o.data(), pos_o.data(), tr.data());
    }
    return ids_o;
  };
  EXPECT((rows_of({0, 5, 5}) == std::vector<int64_t>{90, 5, 6, -1}));  // sequence 0 claims tokens 2..4
  EXPECT((rows_of({0, -5, 2}) == std::vector<int64_t>{-1, -1, 5, 6}));  // a negative offset
  return true;
}

bool bad_input() {
  auto word_offsets = op<Tensor(const Tensor&, const Tensor&)>("taste::word_offsets");
  auto unpack = op<Tensor(const Tensor&, const Tensor&, c10::SymInt, double)>("taste::unpack");
  auto throws = [](const std::function<void()>& fn, const std::string& needle) {
    try {
      fn();
    } catch (const c10::Error& e) {
      return std::string(e.what()).find(needle) != std::string::npos;
    }
    return false;
  };
  EXPECT(throws([&] { word_offsets.call(i64({0, 2}), i32({0, 2})); }, "contiguous and non-decreasing"));
  EXPECT(throws([&] { unpack.call(at::zeros({3}), i32({0, 2}), 4, 0.0); }, "must end at the number of rows"));
  EXPECT(throws([&] { unpack.call(at::zeros({3}), i64({0, 3}), 4, 0.0); }, "cu_seqlens must be an int32"));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<bool()>> cases{
      {"pack_unpack", pack_unpack},       {"word_offsets", word_offsets},
      {"segment_mean_broadcast", segment_mean_broadcast}, {"segment_sum_by_key", segment_sum_by_key},
      {"delay_layout", delay_layout},     {"prefix_layout", prefix_layout},
      {"bad_input", bad_input}};
  at::manual_seed(0);
  int failed = 0;
  for (const auto& [name, fn] : cases) {
    if (argc > 1 && name != argv[1]) continue;
    const bool ok = fn();
    std::printf("%s: %s\n", name.c_str(), ok ? "ok" : "FAILED");
    failed += ok ? 0 : 1;
  }
  return failed == 0 ? 0 : 1;
}
