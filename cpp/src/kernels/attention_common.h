// Pieces shared by both fused-attention paths (tiled and row-wise): which keys a query row may see,
// and the online-softmax bookkeeping. Scores stay in natural units (s = scale * q.k + bias, with scale
// folded into q once); every exponential is exp2((s - m) * log2 e), the row max subtracted *before*
// the change of base, so the rounding error grows with |s - m| as in the textbook formula, not with |s|.
#pragma once
#include <cmath>

#include "attnfast/params.h"
#include "kernels/common.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

constexpr double kLog2e = 1.4426950408889634073599246810019;

// a + b and a - b clamped to the int64 range. Window sides and offsets come from the caller and may be
// anything up to INT64_MAX (the Python layer clamps window sides to Lq + Lk, which leaves the visible
// range unchanged; this is the kernels' own defence): a wrapped sum would hide or show every key.
inline int64_t add_saturated(int64_t a, int64_t b) {
  if (b > 0 && a > INT64_MAX - b) return INT64_MAX;
  if (b < 0 && a < INT64_MIN - b) return INT64_MIN;
  return a + b;
}
inline int64_t sub_saturated(int64_t a, int64_t b) {
  if (b < 0 && a > INT64_MAX + b) return INT64_MAX;
  if (b > 0 && a < INT64_MIN + b) return INT64_MIN;
  return a - b;
}

// Visible key range [lo, hi) of query row i of batch item b from kv_lengths, causal and window.
// Empty ranges come back as lo == hi. Saturating arithmetic: no offset or window overflows.
template <class T>
inline void visible_range(const AttentionParams<T>& p, int64_t b, int64_t i, int64_t* lo, int64_t* hi) {
  int64_t l = 0, h = p.lk;
  if (p.kv_lengths) h = imin(h, p.kv_lengths[b]);
  const int64_t diag = add_saturated(i, p.diagonal_offset);
  if (p.causal) h = imin(h, add_saturated(diag, 1));
  if (p.window_left >= 0) l = imax(l, sub_saturated(diag, p.window_left));
  if (p.window_right >= 0) h = imin(h, add_saturated(add_saturated(diag, p.window_right), 1));
  l = imax(0, imin(l, p.lk));
  h = imax(l, imin(h, p.lk));
  *lo = l;
  *hi = h;
}

// True when a bool-mask row hides all of its n keys (col_stride apart); stops at the first visible one.
// Both paths skip key tiles that the mask hides from every row.
inline bool mask_row_hides_all(const uint8_t* mrow, int64_t col_stride, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (mrow[j * col_stride]) return false;
  return true;
}

// Log-sum-exp of a row from its running max and sum: -inf when no key was visible (l = 0), NaN if the
// row had a NaN. Evaluated in double, so a float lse is m + ln(l) rounded once.
template <class T>
inline T row_lse(T m, T l) {
  if (l == T(0)) return neg_inf<T>();
  return static_cast<T>(static_cast<double>(m) + std::log(static_cast<double>(l)));
}

// Final normalisation of one row: out = acc / l (0 when no key was visible). Returns the row's
// log-sum-exp m + ln(l): -inf when no key was visible, NaN if the row had a NaN.
template <class V, class T = typename V::Scalar>
inline T finish_row(const T* acc, T m, T l, T* out, int64_t dv) {
  const T inv = l > T(0) ? T(1) / l : T(0);
  const V vinv = V::set1(inv);
  int64_t c = 0;
  for (; c + V::kLanes <= dv; c += V::kLanes) (V::load(acc + c) * vinv).store(out + c);
  if (c < dv) (V::load(acc + c) * vinv).store_partial(out + c, static_cast<int>(dv - c));  // acc is padded
  return row_lse(m, l);
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
