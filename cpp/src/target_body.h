// The body of every SIMD target: instantiates all kernel templates with the target's vector type and
// tile shapes. Included by target_<name>.cpp after it defines ATTNFAST_TARGET_NS, the vector wrapper
// template `Vec<T>`, and `struct Tiles` (microkernel shapes sized to the target's register file).
#pragma once
#include "attnfast/kernels.h"
#include "kernels/attention.h"
#include "kernels/probes.h"
#include "kernels/stage_aggregate.h"
#include "kernels/stage_scores.h"
#include "kernels/stage_softmax.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class T>
KernelTable<T> make_table() {
  using V = Vec<T>;
  KernelTable<T> t;
  t.scores_dot = &scores_dot_impl<V, Tiles::kGemmMR, Tiles::kGemmNRV>;
  t.scores_additive = &scores_additive_impl<V>;
  t.softmax = &softmax_impl<V>;
  t.aggregate = &aggregate_impl<V, Tiles::kGemmMR, Tiles::kGemmNRV>;
  t.attention = &attention_impl<V, Tiles::kAttnMR, Tiles::kAttnNRV>;
  return t;
}

TargetKernels kernels() {
  return TargetKernels{ATTNFAST_TARGET_NAME, make_table<float>(), make_table<double>(), &fma_chains,
                       &read_sum};
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
