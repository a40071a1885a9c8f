// Stage 2 kernel: numerically stable softmax along the last axis of (batch, rows, n).
// dtypes: x stored in S (double, float, float16, bfloat16), computed in T = V::Scalar (double for
// double, else float), the result rounded once to its storage type. ISA: the including target's V.
// Numerics, per row: m = max of the visible entries (masked entries count as -inf); e_j = 2^((x_j - m)
// * log2 e) with exp2_nonpositive (math.h: 1.6 ulp float, ~2e-16 double); x_j - m is computed first so the
// error grows with |x_j - m| (as in the naive formula), not with |x_j|: logits of 1e30 or spreads of 1e4
// stay exact where it matters. The sum keeps one partial sum per lane over blocks of kVectorSumBlock
// entries (common.h); the blocks' sums are added pairwise (PairwiseSum), then the lanes in a fixed
// order. A sum of n terms (all positive) so has a relative rounding error of at most about
// (kVectorSumBlock / lanes + log2(n / kVectorSumBlock) + log2 lanes) eps, and far less in practice: a
// float32 row of 16M entries sums to 1 within 1e-7, where one running sum drifted by 3% (scalar target)
// and one per lane by 1e-4 (8 lanes).
// Output e_j * (1 / sum): one more rounding than a division, within 1.5 ulp of e_j / sum.
// Special rows (a rare branch, taken only when the maximum is infinite): a row whose maximum is +inf
// splits its weight evenly over its +inf entries (the limit of softmax) and gives its finite entries
// exactly 0; a row with no visible entry (all masked, or all -inf) gives zeros. A NaN visible entry makes
// its row NaN, in every case.
#pragma once
#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/storage.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Pairwise (cascade) sum of block sums: level i holds the sum of 2^i blocks, and adding a block merges
// equal levels as a binary counter carries. Memory and work are tiny (one vector per level, one add per
// block on average); the rounding error grows like log2 of the number of blocks.
template <class V>
class PairwiseSum {
 public:
  void add(V block_sum) {
    int level = 0;
    for (int64_t carry = blocks_; carry & 1; carry >>= 1, ++level) block_sum = levels_[level] + block_sum;
    levels_[level] = block_sum;
    ++blocks_;
  }
  // Occupied levels from the lowest up: one block gives that block's sum exactly.
  V total() const {
    V sum = V::zero();
    bool first = true;
    for (int level = 0; (blocks_ >> level) != 0; ++level) {
      if (!((blocks_ >> level) & 1)) continue;
      sum = first ? levels_[level] : levels_[level] + sum;
      first = false;
    }
    return sum;
  }

 private:
  V levels_[64];
  int64_t blocks_ = 0;
};

// The rows whose maximum m is infinite or NaN. NaN anywhere makes the row NaN (a vector max can drop a
// NaN that a later entry of its lane follows, so the row is scanned again); otherwise m = -inf means no
// visible entry (zeros) and m = +inf splits the weight over the +inf entries.
template <class T>
inline void softmax_row_special(const T* x, T* y, int64_t n, T m) {
  int64_t plus_inf = 0;
  bool nan = m != m;
  for (int64_t j = 0; j < n; ++j) {
    nan |= x[j] != x[j];
    plus_inf += x[j] == pos_inf<T>();
  }
  const T share = nan ? std::numeric_limits<T>::quiet_NaN() : T(plus_inf > 0 ? T(1) / T(plus_inf) : T(0));
  for (int64_t j = 0; j < n; ++j) y[j] = nan || x[j] == pos_inf<T>() ? share : T(0);
}

// Softmax of one contiguous row x[0..n) into y[0..n) (y may alias x).
template <class V>
inline void softmax_row_contiguous(const typename V::Scalar* x, typename V::Scalar* y, int64_t n) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  static_assert(kVectorSumBlock % L == 0, "a sum block must be whole vectors");
  const int64_t n_full = n / L * L;
  const int tail = static_cast<int>(n - n_full);
  V vmax = V::set1(neg_inf<T>());
  for (int64_t j = 0; j < n_full; j += L) vmax = max(vmax, V::load(x + j));
  T m = reduce_max(vmax);
  for (int64_t j = n_full; j < n; ++j) m = x[j] > m || x[j] != x[j] ? x[j] : m;
  if (m == neg_inf<T>() || m == pos_inf<T>() || m != m) {
    softmax_row_special(x, y, n, m);
    return;
  }
  const V vm = V::set1(m);
  const V log2e = V::set1(T(1.4426950408889634073599246810019));
  PairwiseSum<V> sum;
  for (int64_t j0 = 0; j0 < n_full; j0 += kVectorSumBlock) {
    const int64_t j1 = imin(n_full, j0 + kVectorSumBlock);
    V vsum = V::zero();
    for (int64_t j = j0; j < j1; j += L) {
      const V e = exp2_nonpositive((V::load(x + j) - vm) * log2e);
      e.store(y + j);
      vsum = vsum + e;
    }
    sum.add(vsum);
  }
  T tail_sum = 0;
  if (tail) {
    // Masked-off lanes load 0; the partial store never writes them, and the tail is summed separately
    // so they never enter the sum.
    const V e = exp2_nonpositive((V::load_partial(x + n_full, tail) - vm) * log2e);
    e.store_partial(y + n_full, tail);
    for (int64_t j = n_full; j < n; ++j) tail_sum += y[j];
  }
  const V inv = V::set1(T(1) / (reduce_add(sum.total()) + tail_sum));
  for (int64_t j = 0; j < n_full; j += L) (V::load(y + j) * inv).store(y + j);
  if (tail) (V::load_partial(y + n_full, tail) * inv).store_partial(y + n_full, tail);
}

// Rows of x (stored in S) to rows of out (stored in SO). A contiguous row of the compute type is done in
// place; any other row (strided, masked, or 16-bit on either side) is gathered into `buffer` in T,
// computed there and written back, rounded once to SO.
template <class V, class S, class SO>
void softmax_rows(const SoftmaxParams<S, typename V::Scalar>& p, const Operand<SO>& out, typename V::Scalar* buffer,
                  int64_t r0, int64_t r1) {
  using T = typename V::Scalar;
  const int64_t xs = p.x.col_stride_elements, ys = out.col_stride_elements;
  const bool has_mask = p.mask.data != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / p.rows, i = r % p.rows;
    const S* x = p.x.row(b, i);
    SO* y = out.row(b, i);
    if constexpr (kSameType<S, T> && kSameType<SO, T>) {
      if (xs == 1 && ys == 1 && !has_mask) {
        softmax_row_contiguous<V>(x, y, p.n);
        continue;
      }
    }
    if (xs == 1) {
      widen_row<V>(x, p.n, buffer);
    } else {
      for (int64_t j = 0; j < p.n; ++j) buffer[j] = scalar_as<T>(x[j * xs]);
    }
    if (has_mask) {
      const uint8_t* mk = p.mask.row(b, i);
      const int64_t ms = p.mask.col_stride_elements;
      for (int64_t j = 0; j < p.n; ++j)
        if (!mk[j * ms]) buffer[j] = neg_inf<T>();
    }
    softmax_row_contiguous<V>(buffer, buffer, p.n);
    if (ys == 1) {
      store_row_scaled<V>(buffer, p.n, V::set1(T(1)), y);
    } else {
      for (int64_t j = 0; j < p.n; ++j) y[j * ys] = storage_of<SO>(buffer[j]);
    }
  }
}

template <class V, class S>
int softmax_impl(const SoftmaxParams<S, typename V::Scalar>& p) {
  using T = typename V::Scalar;
  if (p.batch == 0 || p.rows == 0 || p.n == 0) return kOk;
  const int64_t total_rows = p.batch * p.rows;
  ThreadScratch scratch(p.num_threads, Carver::bytes<T>(p.n));
  if (!scratch.ok()) return kOutOfMemory;
  // Rows are independent; chunks of rows keep the scheduling cost negligible for short rows.
  const int64_t rows_per_task = imax(1, 4096 / imax(p.n, 1));
  parallel_for(p.num_threads, ceil_div(total_rows, rows_per_task), [&](int64_t task, int slot) {
    T* buffer = reinterpret_cast<T*>(scratch.slice(slot));
    const int64_t r0 = task * rows_per_task, r1 = imin(total_rows, r0 + rows_per_task);
    if (p.out_wide.data) {
      softmax_rows<V>(p, p.out_wide, buffer, r0, r1);
    } else {
      softmax_rows<V>(p, p.out, buffer, r0, r1);
    }
  });
  return kOk;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
