// Stage 3 kernel: context vectors C = A V for a batch of (lq, lk) weight matrices A and (lk, dv) values.
// dtypes: float, double. ISA: the including target's V.
// Numerics: each C[i][:] accumulates a_ij * v_j in j order with one FMA per term (no reassociation), so
// the result is independent of the thread count and of the blocking.
// V is read in place (unit column stride, any row stride); the last dv columns use masked loads.
#pragma once
#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/microkernel.h"
#include "kernels/stage_scores.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, int MR, int NRV>
int aggregate_impl(const AggregateParams<typename V::Scalar>& p) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  constexpr int NR = NRV * L;
  constexpr int64_t kRowsPerTask = 8 * MR;
  if (p.batch == 0 || p.lq == 0 || p.dv == 0) return kOk;
  const int64_t row_blocks = ceil_div(p.lq, kRowsPerTask);
  const int64_t tasks = p.batch * row_blocks;
  ThreadScratch scratch(p.num_threads, Carver::bytes<T>(MR * NR));
  if (!scratch.ok()) return kOutOfMemory;

  parallel_for(p.num_threads, tasks, [&](int64_t task, int slot) {
    T* tile = reinterpret_cast<T*>(scratch.slice(slot));
    const int64_t b = task / row_blocks;
    const int64_t i_begin = (task % row_blocks) * kRowsPerTask;
    const int64_t i_end = imin(p.lq, i_begin + kRowsPerTask);
    const T* w = p.weights.row(b, 0);
    const T* v = p.v.row(b, 0);
    T* out = p.out.row(b, 0);
    const int64_t ws = p.weights.row_stride_elements, vs = p.v.row_stride_elements;
    const int64_t os = p.out.row_stride_elements;
    for (int64_t n0 = 0; n0 < p.dv; n0 += NR) {
      const int64_t ncols = imin(NR, p.dv - n0);
      const bool partial = ncols < NR;
      // Lanes valid in the last vector of this column block.
      const int last_lanes = static_cast<int>(ncols - (ceil_div(ncols, L) - 1) * L);
      for (int64_t i0 = i_begin; i0 < i_end; i0 += MR) {
        const int64_t nrows = imin(MR, i_end - i0);
        const T* a_rows[MR];
        clamped_rows<T, MR>(w + i0 * ws, ws, nrows, a_rows);
        T* dst = out + i0 * os + n0;
        if (p.lk == 0) {
          for (int64_t r = 0; r < nrows; ++r)
            for (int64_t c = 0; c < ncols; ++c) dst[r * os + c] = T(0);
          continue;
        }
        if (!partial && nrows == MR) {
          gemm_microkernel<V, MR, NRV, false, false, true>(p.lk, a_rows, 1, v + n0, vs, L, dst, os, T(1));
          continue;
        }
        if (partial && ceil_div(ncols, L) == NRV) {
          gemm_microkernel<V, MR, NRV, false, true, true>(p.lk, a_rows, 1, v + n0, vs, last_lanes, tile, NR,
                                                         T(1));
        } else if (partial) {
          // Fewer vectors than NRV remain: run the one-vector kernel per remaining vector.
          for (int64_t c0 = 0; c0 < ncols; c0 += L) {
            const int lanes = static_cast<int>(imin(L, ncols - c0));
            gemm_microkernel<V, MR, 1, false, true, true>(p.lk, a_rows, 1, v + n0 + c0, vs, lanes, tile + c0, NR,
                                                         T(1));
          }
        } else {
          gemm_microkernel<V, MR, NRV, false, false, true>(p.lk, a_rows, 1, v + n0, vs, L, tile, NR, T(1));
        }
        copy_tile(tile, NR, nrows, ncols, dst, os);
      }
    }
  });
  return kOk;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
