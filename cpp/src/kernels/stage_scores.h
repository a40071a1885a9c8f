// Stage 1 kernels: score matrices.
//   scores_dot:      S = scale * Q K^T  (methods dot, scaled_dot, and general after Q <- Q W).
//   scores_additive: S[i][j] = scale * sum_a v_a[a] tanh(qp[i][a] + kp[j][a])  (Bahdanau).
// dtypes: scores_dot reads Q and K stored in S (double, float, float16, bfloat16) and computes in
// T = V::Scalar (double for double, else float), widening 16-bit values on load (exact) and rounding
// the result once to its storage type; scores_additive is T only (its operands are projections made
// in T). ISA: the including target's V.
// Numerics: dot products accumulate in k order with one FMA per term (a depth beyond kDepthBlock as a
// tree of blocks: microkernel.h); the additive reduction uses tanh_approx (math.h) and accumulates
// per-lane partial sums then a fixed-order horizontal sum, over blocks of kVectorSumBlock features
// added as a tree (tree_sum, common.h) when hidden is longer. Results do not depend on the thread count.
#pragma once
#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/microkernel.h"
#include "kernels/storage.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Packs keys [j0, j0 + nr_valid) of K (row-major, unit column stride) into one B panel [depth][NR] of
// the compute type, zero padding missing keys, so the microkernel reads NR consecutive keys' d-th
// features per step.
template <class T, int NR, class S>
inline void pack_keys_panel(const S* k, int64_t k_row_stride, int64_t nr_valid, int64_t depth, T* panel) {
  for (int64_t n = 0; n < NR; ++n) {
    if (n < nr_valid) {
      const S* src = k + n * k_row_stride;
      for (int64_t d = 0; d < depth; ++d) panel[d * NR + n] = scalar_as<T>(src[d]);
    } else {
      for (int64_t d = 0; d < depth; ++d) panel[d * NR + n] = T(0);
    }
  }
}

// Copies the valid top-left corner of a full microkernel tile to strided output, rounding to its
// storage type SO.
template <class T, class SO>
inline void copy_tile(const T* tile, int64_t tile_row_stride, int64_t rows, int64_t cols, SO* out,
                      int64_t out_row_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * out_row_stride + c] = storage_of<SO>(tile[r * tile_row_stride + c]);
}

// The A operand of a stage GEMM: MR rows of a matrix stored in S, as row pointers the microkernel
// broadcasts from. Rows of the compute type are read in place; 16-bit rows are widened into `buffer`
// (MR x cols) first, once per microkernel call (1 / NR of the call's FMAs).
template <class V, int MR, class S, class T = typename V::Scalar>
inline void a_operand_rows(const S* first, int64_t row_stride, int64_t valid_rows, int64_t cols, T* buffer,
                           const T** a_rows) {
  if constexpr (kSameType<S, T>) {
    (void)cols;
    (void)buffer;
    clamped_rows<T, MR>(first, row_stride, valid_rows, a_rows);
  } else {
    for (int64_t r = 0; r < valid_rows; ++r) widen_row<V>(first + r * row_stride, cols, buffer + r * cols);
    clamped_rows<T, MR>(buffer, cols, valid_rows, a_rows);
  }
}

// One stage GEMM result tile (MR x NR at dst): straight from the microkernel when the tile is whole
// and the output holds the compute type; otherwise through `tile`, copied (and rounded) to the output.
template <class V, int MR, int NRV, bool kPartialB, class SO>
inline void stage_gemm_tile(int64_t depth, const typename V::Scalar* const* a_rows, const typename V::Scalar* b,
                            int64_t b_k_stride, int b_last_lanes, typename V::Scalar scale, int64_t rows,
                            int64_t cols, SO* dst, int64_t dst_row_stride, typename V::Scalar* tile) {
  using T = typename V::Scalar;
  constexpr int NR = NRV * V::kLanes;
  if constexpr (kSameType<SO, T>) {
    if (rows == MR && cols == NR) {
      gemm_microkernel<V, MR, NRV, false, kPartialB, true>(depth, a_rows, 1, b, b_k_stride, b_last_lanes, dst,
                                                          dst_row_stride, scale);
      return;
    }
  }
  gemm_microkernel<V, MR, NRV, false, kPartialB, true>(depth, a_rows, 1, b, b_k_stride, b_last_lanes, tile, NR,
                                                      scale);
  copy_tile(tile, NR, rows, cols, dst, dst_row_stride);
}

template <class V, class S, int MR, int NRV, class SO>
void scores_dot_rows(const ScoresDotParams<S, typename V::Scalar>& p, const Operand<SO>& out,
                     const ThreadScratch& scratch, int64_t task, int slot, int64_t col_blocks, int64_t keys_per_task) {
  using T = typename V::Scalar;
  constexpr int NR = NRV * V::kLanes;
  Carver carve(scratch.slice(slot));
  T* panel = carve.take<T>(p.depth * NR);
  T* tile = carve.take<T>(MR * NR);
  T* q_rows = carve.take<T>(kSameType<S, T> ? 0 : MR * p.depth);
  const int64_t b = task / col_blocks;
  const int64_t j_begin = (task % col_blocks) * keys_per_task;
  const int64_t j_end = imin(p.lk, j_begin + keys_per_task);
  const S* q = p.q.row(b, 0);
  SO* o = out.row(b, 0);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += NR) {
    const int64_t ncols = imin(NR, j_end - j0);
    pack_keys_panel<T, NR>(p.k.row(b, j0), p.k.row_stride_elements, ncols, p.depth, panel);
    for (int64_t i0 = 0; i0 < p.lq; i0 += MR) {
      const int64_t nrows = imin(MR, p.lq - i0);
      const T* a_rows[MR];
      a_operand_rows<V, MR>(q + i0 * p.q.row_stride_elements, p.q.row_stride_elements, nrows, p.depth, q_rows,
                            a_rows);
      stage_gemm_tile<V, MR, NRV, false>(p.depth, a_rows, panel, NR, V::kLanes, p.scale, nrows, ncols,
                                         o + i0 * out.row_stride_elements + j0, out.row_stride_elements, tile);
    }
  }
}

template <class V, class S, int MR, int NRV>
int scores_dot_impl(const ScoresDotParams<S, typename V::Scalar>& p) {
  using T = typename V::Scalar;
  constexpr int NR = NRV * V::kLanes;
  constexpr int64_t kKeysPerTask = 4 * NR;  // enough tasks, panel reuse across Lq
  if (p.batch == 0 || p.lq == 0 || p.lk == 0) return kOk;
  const int64_t col_blocks = ceil_div(p.lk, kKeysPerTask);
  const int64_t tasks = p.batch * col_blocks;
  ThreadScratch scratch(p.num_threads, Carver::bytes<T>(p.depth * NR) + Carver::bytes<T>(MR * NR) +
                                           Carver::bytes<T>(kSameType<S, T> ? 0 : MR * p.depth));
  if (!scratch.ok()) return kOutOfMemory;
  parallel_for(p.num_threads, tasks, [&](int64_t task, int slot) {
    if (p.out_wide.data) {
      scores_dot_rows<V, S, MR, NRV>(p, p.out_wide, scratch, task, slot, col_blocks, kKeysPerTask);
    } else {
      scores_dot_rows<V, S, MR, NRV>(p, p.out, scratch, task, slot, col_blocks, kKeysPerTask);
    }
  });
  return kOk;
}

// sum_a va[a] * tanh(q[a] + k[a]) over `hidden` features, vectorised along them: one FMA per lane
// and a fixed-order horizontal sum. Zero lanes of va cancel the masked tail. Shared by the additive
// scores kernel and the row-wise fused attention, so both give bitwise the same score.
template <class V>
inline typename V::Scalar additive_score_block(const typename V::Scalar* q, const typename V::Scalar* k,
                                               const typename V::Scalar* va, int64_t hidden) {
  constexpr int L = V::kLanes;
  const int64_t full = hidden / L * L;
  const int tail = static_cast<int>(hidden - full);
  V acc = V::zero();
  int64_t a = 0;
  for (; a < full; a += L) acc = fmadd(V::load(va + a), tanh_approx(V::load(q + a) + V::load(k + a)), acc);
  if (tail)
    acc = fmadd(V::load_partial(va + a, tail), tanh_approx(V::load_partial(q + a, tail) + V::load_partial(k + a, tail)),
                acc);
  return reduce_add(acc);
}

// More than kVectorSumBlock features are summed as a tree of such blocks (tree_sum, common.h), out of
// line so that the common, short code is not shaped by it.
template <class V>
__attribute__((noinline)) typename V::Scalar additive_score_tree(const typename V::Scalar* q,
                                                                 const typename V::Scalar* k,
                                                                 const typename V::Scalar* va, int64_t hidden) {
  using T = typename V::Scalar;
  return tree_sum<T>(0, hidden, kVectorSumBlock,
                     [&](int64_t a, int64_t n) { return additive_score_block<V>(q + a, k + a, va + a, n); });
}

template <class V>
inline typename V::Scalar additive_score(const typename V::Scalar* q, const typename V::Scalar* k,
                                         const typename V::Scalar* va, int64_t hidden) {
  if (hidden > kVectorSumBlock) return additive_score_tree<V>(q, k, va, hidden);
  return additive_score_block<V>(q, k, va, hidden);
}

template <class V>
int scores_additive_impl(const ScoresAdditiveParams<typename V::Scalar>& p) {
  constexpr int kKeysPerTask = 64;
  if (p.batch == 0 || p.lq == 0 || p.lk == 0) return kOk;
  const int64_t col_blocks = ceil_div(p.lk, int64_t(kKeysPerTask));
  parallel_for(p.num_threads, p.batch * col_blocks, [&](int64_t task, int /*slot*/) {
    const int64_t b = task / col_blocks;
    const int64_t j_begin = (task % col_blocks) * kKeysPerTask;
    const int64_t j_end = imin(p.lk, j_begin + kKeysPerTask);
    for (int64_t i = 0; i < p.lq; ++i) {
      const auto* qp = p.qp.row(b, i);
      auto* out = p.out.row(b, i);
      for (int64_t j = j_begin; j < j_end; ++j)
        out[j] = additive_score<V>(qp, p.kp.row(b, j), p.v_a, p.hidden) * p.scale;
    }
  });
  return kOk;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
