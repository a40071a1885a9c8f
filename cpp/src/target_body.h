// The body of every SIMD target: instantiates all kernel templates with the target's vector type and
// tile shapes, one table per (storage, compute) pair. Included by target_<name>.cpp after it defines
// ATTNFAST_TARGET_NS, the vector wrapper template `Vec<T>`, and `struct Tiles` (microkernel shapes sized
// to the target's register file).
#pragma once
#include "attnfast/kernels.h"
#include "kernels/attention.h"
#include "kernels/attention_backward.h"
#include "kernels/probes.h"
#include "kernels/stage_aggregate.h"
#include "kernels/stage_scores.h"
#include "kernels/stage_softmax.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class S, class T>
KernelTable<S, T> make_table() {
  using V = Vec<T>;
  KernelTable<S, T> t;
  t.scores_dot = &scores_dot_impl<V, S, Tiles::kGemmMR, Tiles::kGemmNRV>;
  if constexpr (kSameType<S, T>) t.scores_additive = &scores_additive_impl<V>;
  t.softmax = &softmax_impl<V, S>;
  t.aggregate = &aggregate_impl<V, S, Tiles::kGemmMR, Tiles::kGemmNRV>;
  t.attention = &attention_impl<V, S, Tiles::kAttnMR, Tiles::kAttnNRV>;
  t.attention_backward =
      &attention_backward_impl<V, S, Tiles::kAttnMR, Tiles::kAttnNRV, Tiles::kGradMR, Tiles::kGradNRV>;
  return t;
}

// int8 K and V with per-row scales (a quantised KV cache): the fused attention only (kernels.h).
KernelTable<int8_t, float> make_int8_table() {
  KernelTable<int8_t, float> t;
  t.attention = &attention_impl<Vec<float>, int8_t, Tiles::kAttnMR, Tiles::kAttnNRV>;
  return t;
}

TargetKernels kernels() {
  return TargetKernels{ATTNFAST_TARGET_NAME, make_table<double, double>(), make_table<float, float>(),
                       make_table<float16_bits, float>(), make_table<bfloat16_bits, float>(),
                       make_int8_table()};
}

TargetProbes probes() { return TargetProbes{&fma_chains, &read_sum}; }

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
