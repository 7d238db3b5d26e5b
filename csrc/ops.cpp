// Every schema of the taste ops, and the stub that makes this library importable as the Python module taste._C.
// Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Fakes and autograd: taste/ops.py.
#include <torch/library.h>

#include "common.h"

#ifndef TASTE_NO_PYTHON
#include <Python.h>

extern "C" {
// Importing taste._C runs the static TORCH_LIBRARY registrations below. The module holds one attribute,
// cuda_arch_list: the GPU architectures of its CUDA kernels ("" without them).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "cuda_arch_list", taste::cuda_arch_list()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
#endif

TORCH_LIBRARY(taste, m) {
  // Padded (B, T, *) rows with per-sequence lengths -> packed (N, *) rows + cu_seqlens (B + 1,) int32.
  m.def("pack(Tensor padded, Tensor lengths) -> (Tensor, Tensor)");
  // The same gather with the offsets already known (no host sync): the backward of unpack.
  m.def("pack_offsets(Tensor padded, Tensor cu_seqlens, SymInt total) -> Tensor");
  m.def("unpack(Tensor packed, Tensor cu_seqlens, SymInt max_len, float pad_value=0.0) -> Tensor");
  // Word ids (N,) of a packed batch -> word segment offsets (W_total + 1,) int32.
  m.def("word_offsets(Tensor word_ids, Tensor cu_seqlens) -> Tensor");
  m.def("segment_sum(Tensor x, Tensor offsets) -> Tensor");
  m.def("segment_mean(Tensor x, Tensor offsets) -> Tensor");
  m.def("segment_broadcast(Tensor y, Tensor offsets, SymInt? num_rows=None) -> Tensor");
  // segment_broadcast(segment_mean(x)) in one pass: every row replaced by its segment's mean.
  m.def("segment_mean_broadcast(Tensor x, Tensor offsets) -> Tensor");
  // Deterministic per-key sums (num_keys, *) and counts (num_keys,) int64; key -1 is ignored.
  m.def("segment_sum_by_key(Tensor values, Tensor keys, int num_keys) -> (Tensor, Tensor)");
  // The same P prefix ids before every packed sequence: (cu_seqlens, ids, positions, token_rows).
  m.def("prefix_layout(Tensor tokens, Tensor cu_seqlens, Tensor prefix) -> (Tensor, Tensor, Tensor, Tensor)");
  // TASLM word-delay layout: (cu_seqlens, input_token, input_word, label_token, label_word).
  m.def("delay_layout(Tensor word_ids, Tensor cu_seqlens, int delay=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
