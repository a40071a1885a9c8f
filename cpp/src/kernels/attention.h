// Fused attention driver: picks the row-wise path for decode-shaped calls (few query rows per kv head)
// and the tiled path otherwise. See attention_tiled.h (and the pieces it is made of) and
// attention_rowwise.h for layout and numerics, attention_schedule.h for what both share.
#pragma once
#include <cstdlib>

#include "attnfast/params.h"
#include "kernels/attention_rowwise.h"
#include "kernels/attention_tiled.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, int MR, int NRV>
int attention_impl(const AttentionParams<typename V::Scalar>& p) {
  using T = typename V::Scalar;
  if (p.batch == 0 || p.lq == 0) return kOk;
  if (!RowwiseAttention<V>::applies(p)) return attention_tiled<V, MR, NRV>(p);
  const RowwiseAttention<V> kernel(p);
  if (!p.weights.data) return kernel.run(nullptr);
  // Weights need every row's final max and sum first: keep them for the second pass.
  T* row_stats = static_cast<T*>(std::malloc(static_cast<size_t>(2 * p.batch * p.lq) * sizeof(T)));
  if (!row_stats) return kOutOfMemory;
  int status = kernel.run(row_stats);
  if (status == kOk) status = kernel.write_weights(row_stats);
  std::free(row_stats);
  return status;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
