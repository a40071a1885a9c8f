// Fused attention driver: picks the row-wise path for decode-shaped calls (few query rows per kv head)
// and the tiled path otherwise. See attention_tiled.h and attention_rowwise.h for layout and numerics.
// dtypes: K/V storage S with compute type T = V::Scalar (see attnfast/params.h).
#pragma once
#include <cstdlib>

#include "attnfast/params.h"
#include "kernels/attention_rowwise.h"
#include "kernels/attention_tiled.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, class S, int MR, int NRV>
int attention_impl(const AttentionParams<S, typename V::Scalar>& p) {
  using T = typename V::Scalar;
  using Rowwise = RowwiseAttention<V, S>;
  if (p.batch == 0 || p.lq == 0) return kOk;
  if (!Rowwise::applies(p)) return attention_tiled<V, S, MR, NRV>(p);
  const Rowwise kernel(p);
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
