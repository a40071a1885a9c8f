// Stage 3 kernel: context vectors C = A V for a batch of (lq, lk) weight matrices A and (lk, dv) values.
// dtypes: weights and V stored in S (double, float, float16, bfloat16), computed in T = V::Scalar
// (double for double, else float); 16-bit operands are widened (exactly) into per-task buffers, the
// result rounded once to its storage type. ISA: the including target's V.
// Numerics: each C[i][:] accumulates a_ij * v_j in j order with one FMA per term (no reassociation), so
// the result is independent of the thread count and of the blocking.
// V of the compute type is read in place (unit column stride, any row stride); the last dv columns
// use masked loads.
#pragma once
#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/microkernel.h"
#include "kernels/stage_scores.h"
#include "kernels/storage.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// The B operand for output columns [n0, n0 + ncols): V itself (read in place, row stride vs) when it
// holds the compute type; 16-bit V is widened into `panel` (lk x NR, zero padded) once per task and
// column block, which its 8 MR-row groups then share.
template <class V, int NRV, class S>
inline const typename V::Scalar* b_operand_columns(const S* v, int64_t vs, int64_t lk, int64_t n0, int64_t ncols,
                                                   typename V::Scalar* panel, int64_t* b_k_stride) {
  using T = typename V::Scalar;
  if constexpr (kSameType<S, T>) {
    (void)lk;
    (void)ncols;
    (void)panel;
    *b_k_stride = vs;
    return v + n0;
  } else {
    constexpr int NR = NRV * V::kLanes;
    for (int64_t k = 0; k < lk; ++k) {
      widen_row<V>(v + k * vs + n0, ncols, panel + k * NR);
      for (int64_t c = ncols; c < NR; ++c) panel[k * NR + c] = T(0);
    }
    *b_k_stride = NR;
    return panel;
  }
}

template <class V, class S, int MR, int NRV, class SO>
void aggregate_rows(const AggregateParams<S, typename V::Scalar>& p, const Operand<SO>& out,
                    const ThreadScratch& scratch, int64_t task, int slot, int64_t row_blocks, int64_t rows_per_task) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  constexpr int NR = NRV * L;
  Carver carve(scratch.slice(slot));
  T* tile = carve.take<T>(MR * NR);
  T* w_rows = carve.take<T>(kSameType<S, T> ? 0 : MR * p.lk);
  T* v_panel = carve.take<T>(kSameType<S, T> ? 0 : p.lk * NR);
  const int64_t b = task / row_blocks;
  const int64_t i_begin = (task % row_blocks) * rows_per_task;
  const int64_t i_end = imin(p.lq, i_begin + rows_per_task);
  const S* w = p.weights.row(b, 0);
  const S* v = p.v.row(b, 0);
  SO* o = out.row(b, 0);
  const int64_t ws = p.weights.row_stride_elements, vs = p.v.row_stride_elements;
  const int64_t os = out.row_stride_elements;
  for (int64_t n0 = 0; n0 < p.dv; n0 += NR) {
    const int64_t ncols = imin(NR, p.dv - n0);
    const bool partial = ncols < NR;
    // Lanes valid in the last vector of this column block.
    const int last_lanes = static_cast<int>(ncols - (ceil_div(ncols, L) - 1) * L);
    int64_t bks = 0;
    const T* bcols = p.lk == 0 ? nullptr : b_operand_columns<V, NRV>(v, vs, p.lk, n0, ncols, v_panel, &bks);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += MR) {
      const int64_t nrows = imin(MR, i_end - i0);
      SO* dst = o + i0 * os + n0;
      if (p.lk == 0) {
        for (int64_t r = 0; r < nrows; ++r)
          for (int64_t c = 0; c < ncols; ++c) dst[r * os + c] = storage_of<SO>(T(0));
        continue;
      }
      const T* a_rows[MR];
      a_operand_rows<V, MR>(w + i0 * ws, ws, nrows, p.lk, w_rows, a_rows);
      if (!partial) {
        stage_gemm_tile<V, MR, NRV, false>(p.lk, a_rows, bcols, bks, L, T(1), nrows, ncols, dst, os, tile);
      } else if (ceil_div(ncols, L) == NRV) {
        stage_gemm_tile<V, MR, NRV, true>(p.lk, a_rows, bcols, bks, last_lanes, T(1), nrows, ncols, dst, os, tile);
      } else {
        // Fewer vectors than NRV remain: run the one-vector kernel per remaining vector.
        for (int64_t c0 = 0; c0 < ncols; c0 += L) {
          const int lanes = static_cast<int>(imin(L, ncols - c0));
          gemm_microkernel<V, MR, 1, false, true, true>(p.lk, a_rows, 1, bcols + c0, bks, lanes, tile + c0, NR,
                                                       T(1));
        }
        copy_tile(tile, NR, nrows, ncols, dst, os);
      }
    }
  }
}

template <class V, class S, int MR, int NRV>
int aggregate_impl(const AggregateParams<S, typename V::Scalar>& p) {
  using T = typename V::Scalar;
  constexpr int NR = NRV * V::kLanes;
  constexpr int64_t kRowsPerTask = 8 * MR;
  if (p.batch == 0 || p.lq == 0 || p.dv == 0) return kOk;
  const int64_t row_blocks = ceil_div(p.lq, kRowsPerTask);
  const int64_t tasks = p.batch * row_blocks;
  const bool in_place = kSameType<S, T>;  // operands read where they are
  ThreadScratch scratch(p.num_threads, Carver::bytes<T>(MR * NR) + Carver::bytes<T>(in_place ? 0 : MR * p.lk) +
                                           Carver::bytes<T>(in_place ? 0 : p.lk * NR));
  if (!scratch.ok()) return kOutOfMemory;
  parallel_for(p.num_threads, tasks, [&](int64_t task, int slot) {
    if (p.out_wide.data) {
      aggregate_rows<V, S, MR, NRV>(p, p.out_wide, scratch, task, slot, row_blocks, kRowsPerTask);
    } else {
      aggregate_rows<V, S, MR, NRV>(p, p.out, scratch, task, slot, row_blocks, kRowsPerTask);
    }
  });
  return kOk;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
