// Stage 2 kernel: numerically stable softmax along the last axis of (batch, rows, n).
// dtypes: float, double. ISA: the including target's V.
// Numerics, per row: m = max of the visible entries (masked entries count as -inf); e_j = 2^((x_j - m)
// * log2 e) with exp2_nonpositive (math.h: 1.6 ulp float, ~2e-16 double); x_j - m is computed first so the
// error grows with |x_j - m| (as in the naive formula), not with |x_j|: logits of 1e30 or spreads of 1e4
// stay exact where it matters. The sum uses one partial sum per lane, then a fixed-order reduction.
// Output e_j * (1 / sum): one more rounding than a division, within 1.5 ulp of e_j / sum.
// A row with no visible entry (all masked, or all -inf) gives zeros, never NaN. NaN stays in its row.
#pragma once
#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/math.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Softmax of one contiguous row x[0..n) into y[0..n) (y may alias x).
template <class V>
inline void softmax_row_contiguous(const typename V::Scalar* x, typename V::Scalar* y, int64_t n) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  const int64_t n_full = n / L * L;
  const int tail = static_cast<int>(n - n_full);
  V vmax = V::set1(neg_inf<T>());
  for (int64_t j = 0; j < n_full; j += L) vmax = max(vmax, V::load(x + j));
  T m = reduce_max(vmax);
  for (int64_t j = n_full; j < n; ++j) m = x[j] > m || x[j] != x[j] ? x[j] : m;
  if (m == neg_inf<T>()) {
    for (int64_t j = 0; j < n; ++j) y[j] = T(0);
    return;
  }
  const V vm = V::set1(m);
  const V log2e = V::set1(T(1.4426950408889634073599246810019));
  V vsum = V::zero();
  for (int64_t j = 0; j < n_full; j += L) {
    const V e = exp2_nonpositive((V::load(x + j) - vm) * log2e);
    e.store(y + j);
    vsum = vsum + e;
  }
  T tail_sum = 0;
  if (tail) {
    // Masked-off lanes load 0; the partial store never writes them, and the tail is summed separately
    // so they never enter the sum.
    const V e = exp2_nonpositive((V::load_partial(x + n_full, tail) - vm) * log2e);
    e.store_partial(y + n_full, tail);
    for (int64_t j = n_full; j < n; ++j) tail_sum += y[j];
  }
  const V inv = V::set1(T(1) / (reduce_add(vsum) + tail_sum));
  for (int64_t j = 0; j < n_full; j += L) (V::load(y + j) * inv).store(y + j);
  if (tail) (V::load_partial(y + n_full, tail) * inv).store_partial(y + n_full, tail);
}

template <class V>
int softmax_impl(const SoftmaxParams<typename V::Scalar>& p) {
  using T = typename V::Scalar;
  if (p.batch == 0 || p.rows == 0 || p.n == 0) return kOk;
  const int64_t total_rows = p.batch * p.rows;
  const bool x_unit = p.x.col_stride_elements == 1;
  const bool out_unit = p.out.col_stride_elements == 1;
  const bool has_mask = p.mask.data != nullptr;
  const bool need_buffer = !x_unit || !out_unit || has_mask;
  ThreadScratch scratch(p.num_threads, need_buffer ? Carver::bytes<T>(p.n) : 64);
  if (!scratch.ok()) return kOutOfMemory;
  // Rows are independent; chunks of rows keep the scheduling cost negligible for short rows.
  const int64_t rows_per_task = imax(1, 4096 / imax(p.n, 1));

  parallel_for(p.num_threads, ceil_div(total_rows, rows_per_task), [&](int64_t task, int slot) {
    T* buffer = reinterpret_cast<T*>(scratch.slice(slot));
    const int64_t r0 = task * rows_per_task;
    const int64_t r1 = imin(total_rows, r0 + rows_per_task);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / p.rows, i = r % p.rows;
      const T* x = p.x.row(b, i);
      T* y = p.out.row(b, i);
      if (!need_buffer) {
        softmax_row_contiguous<V>(x, y, p.n);
        continue;
      }
      const int64_t xs = p.x.col_stride_elements;
      for (int64_t j = 0; j < p.n; ++j) buffer[j] = x[j * xs];
      if (has_mask) {
        const uint8_t* mk = p.mask.row(b, i);
        const int64_t ms = p.mask.col_stride_elements;
        for (int64_t j = 0; j < p.n; ++j)
          if (!mk[j * ms]) buffer[j] = neg_inf<T>();
      }
      softmax_row_contiguous<V>(buffer, buffer, p.n);
      const int64_t ys = p.out.col_stride_elements;
      for (int64_t j = 0; j < p.n; ++j) y[j * ys] = buffer[j];
    }
  });
  return kOk;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
