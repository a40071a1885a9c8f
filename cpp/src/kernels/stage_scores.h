// Stage 1 kernels: score matrices.
//   scores_dot:      S = scale * Q K^T  (methods dot, scaled_dot, and general after Q <- Q W).
//   scores_additive: S[i][j] = scale * sum_a v_a[a] tanh(qp[i][a] + kp[j][a])  (Bahdanau).
// dtypes: float, double (computed and accumulated in that precision). ISA: the including target's V.
// Numerics: dot products accumulate in k order with one FMA per term (a depth beyond kDepthBlock as a
// tree of blocks: microkernel.h); the additive reduction uses tanh_approx (math.h) and accumulates
// per-lane partial sums then a fixed-order horizontal sum, over blocks of kVectorSumBlock features
// added as a tree (tree_sum, common.h) when hidden is longer. Results do not depend on the thread count.
#pragma once
#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/microkernel.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Packs keys [j0, j0 + nr_valid) of K (row-major, unit column stride) into one B panel [depth][NR],
// zero padding missing keys, so the microkernel reads NR consecutive keys' d-th features per step.
template <class T, int NR>
inline void pack_keys_panel(const T* k, int64_t k_row_stride, int64_t nr_valid, int64_t depth, T* panel) {
  for (int64_t n = 0; n < NR; ++n) {
    if (n < nr_valid) {
      const T* src = k + n * k_row_stride;
      for (int64_t d = 0; d < depth; ++d) panel[d * NR + n] = src[d];
    } else {
      for (int64_t d = 0; d < depth; ++d) panel[d * NR + n] = T(0);
    }
  }
}

// Copies the valid top-left corner of a full microkernel tile to strided output.
template <class T>
inline void copy_tile(const T* tile, int64_t tile_row_stride, int64_t rows, int64_t cols, T* out,
                      int64_t out_row_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * out_row_stride + c] = tile[r * tile_row_stride + c];
}

template <class V, int MR, int NRV>
int scores_dot_impl(const ScoresDotParams<typename V::Scalar>& p) {
  using T = typename V::Scalar;
  constexpr int NR = NRV * V::kLanes;
  constexpr int kPanelsPerTask = 4;  // keys per task = 4 * NR: enough tasks, panel reuse across Lq
  if (p.batch == 0 || p.lq == 0 || p.lk == 0) return kOk;
  const int64_t col_blocks = ceil_div(p.lk, int64_t(NR) * kPanelsPerTask);
  const int64_t tasks = p.batch * col_blocks;
  const int64_t panel_elems = p.depth * NR;
  ThreadScratch scratch(p.num_threads, Carver::bytes<T>(panel_elems) + Carver::bytes<T>(MR * NR));
  if (!scratch.ok()) return kOutOfMemory;

  parallel_for(p.num_threads, tasks, [&](int64_t task, int slot) {
    Carver carve(scratch.slice(slot));
    T* panel = carve.take<T>(panel_elems);
    T* tile = carve.take<T>(MR * NR);
    const int64_t b = task / col_blocks;
    const int64_t j_begin = (task % col_blocks) * NR * kPanelsPerTask;
    const int64_t j_end = imin(p.lk, j_begin + int64_t(NR) * kPanelsPerTask);
    const T* q = p.q.row(b, 0);
    T* out = p.out.row(b, 0);
    for (int64_t j0 = j_begin; j0 < j_end; j0 += NR) {
      const int64_t ncols = imin(NR, j_end - j0);
      pack_keys_panel<T, NR>(p.k.row(b, j0), p.k.row_stride_elements, ncols, p.depth, panel);
      for (int64_t i0 = 0; i0 < p.lq; i0 += MR) {
        const int64_t nrows = imin(MR, p.lq - i0);
        const T* a_rows[MR];
        clamped_rows<T, MR>(q + i0 * p.q.row_stride_elements, p.q.row_stride_elements, nrows, a_rows);
        T* dst = out + i0 * p.out.row_stride_elements + j0;
        if (nrows == MR && ncols == NR) {
          gemm_microkernel<V, MR, NRV, false, false, true>(p.depth, a_rows, 1, panel, NR, V::kLanes, dst,
                                                          p.out.row_stride_elements, p.scale);
        } else {
          gemm_microkernel<V, MR, NRV, false, false, true>(p.depth, a_rows, 1, panel, NR, V::kLanes, tile, NR,
                                                          p.scale);
          copy_tile(tile, NR, nrows, ncols, dst, p.out.row_stride_elements);
        }
      }
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
