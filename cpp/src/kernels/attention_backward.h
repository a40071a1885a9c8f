// Fused attention backward: the dispatcher and the schedule of the tiled backward pass.
// dtypes: K and V stored in S, Q, O and dO in S or T, gradients in T = V::Scalar (see attnfast/params.h
// and attention_backward_tiled.h, which holds the per-tile work and its numerics). ISA: the target's V.
//
// Schedule. First a prepare pass over the query blocks: each row's delta_i = dO_i . O_i (and the +inf
// weight of a row whose lse is +inf), dQ and dscores zeroed. Then one of two schemes, chosen from the
// shape only (never from the thread count), so that every gradient element is computed by one task in
// one order and the results are bitwise identical for any number of threads:
//   - Whole kv items (the common case: enough kv items to feed the cores): one task per kv item owns
//     its dK and dV and the dQ of all its `group` query items. Key blocks (kKeyBlock keys) outer, then
//     query blocks, then the block's key tiles; each (key tile, query block) pair runs five products
//     (S^T, dP^T, dV, dK, dQ: the 10 Lq Lk D FLOPs of the textbook count) and dQ accumulates in the
//     output in key order. No two tasks write one element.
//   - Two passes, when the kv items are few (one long sequence, few heads: kBackwardMinKvItems):
//     key-block tasks own dK and dV (S^T, dP^T, dV, dK), then query-block tasks own dQ and dscores
//     (S^T, dP^T, dQ): seven products instead of five, but tasks enough for every core.
// Scratch: one block's buffers per thread (TiledBackward::scratch_bytes, independent of the lengths),
// and one T per query row for delta.
#pragma once
#include <cstdlib>

#include "attnfast/kernels.h"
#include "attnfast/params.h"
#include "kernels/attention_backward_additive.h"
#include "kernels/attention_backward_tiled.h"
#include "kernels/common.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, class S, int MR, int NRV, int RMR, int RNV>
int attention_backward_tiled(const AttentionBackwardParams<S, typename V::Scalar>& bp) {
  using Kernel = TiledBackward<V, S, MR, NRV, RMR, RNV>;
  using T = typename V::Scalar;
  const AttentionParams<S, T>& p = bp.forward;
  T* terms = static_cast<T*>(std::malloc(static_cast<size_t>(imax(1, p.batch * p.lq)) * sizeof(T)));
  if (!terms) return kOutOfMemory;
  const Kernel kernel(bp, terms);
  ThreadScratch scratch(p.num_threads, kernel.scratch_bytes());
  if (!scratch.ok()) {
    std::free(terms);
    return kOutOfMemory;
  }
  const int64_t blocks = kernel.query_blocks(), tiles = kernel.key_blocks(), items = kernel.kv_items();
  parallel_for(p.num_threads, p.batch * blocks, [&](int64_t task, int slot) {
    kernel.prepare_block(scratch.slice(slot), task / blocks, (task % blocks) * Kernel::MB);
  });
  if (items >= kBackwardMinKvItems) {
    parallel_for(p.num_threads, items, [&](int64_t item, int slot) { kernel.run_kv_item(scratch.slice(slot), item); });
  } else {
    // Under a causal mask the first key blocks are seen by the most rows and the last query blocks see
    // the most keys: the longest tasks are handed out first, the short ones fill the end of each pass.
    parallel_for(p.num_threads, items * tiles, [&](int64_t task, int slot) {
      kernel.run_key_block(scratch.slice(slot), task / tiles, (task % tiles) * Kernel::kKeyBlock, false);
    });
    parallel_for(p.num_threads, p.batch * blocks, [&](int64_t task, int slot) {
      kernel.run_query_block(scratch.slice(slot), task / blocks, (blocks - 1 - task % blocks) * Kernel::MB);
    });
  }
  std::free(terms);
  return kOk;
}

// The backward kernel of the fused attention (the table's attention_backward). MR x NRV: the forward's
// tile shape (the products with queries in lanes); RMR x RNV: the shape of the products with features
// in lanes.
template <class V, class S, int MR, int NRV, int RMR, int RNV>
int attention_backward_impl(const AttentionBackwardParams<S, typename V::Scalar>& p) {
  // Additive scores: their own kernel (attention_backward_additive.h), for compute-type operands only.
  if constexpr (kSameType<S, typename V::Scalar>) {
    if (p.forward.v_a) return attention_backward_additive<V>(p);
  }
  if (p.forward.v_a) return kNoBackwardKernel;
  if (p.forward.batch == 0) return kOk;
  return attention_backward_tiled<V, S, MR, NRV, RMR, RNV>(p);
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
