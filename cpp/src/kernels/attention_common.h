// Pieces shared by both fused-attention paths (tiled and row-wise): which keys a query row may see,
// and the online-softmax bookkeeping. Scores stay in natural units (s = scale * q.k + bias, with scale
// folded into q once); every exponential is exp2((s - m) * log2 e), the row max subtracted *before*
// the change of base, so the rounding error grows with |s - m| as in the textbook formula, not with |s|.
//
// Hidden keys (mask, causal, window, kv_lengths, a -inf bias or score) must not reach a row whatever K
// and V hold. Their scores are -inf and weigh exactly 0, but the P.V products still form 0 * V, which is
// NaN for a NaN or infinite V. Both paths therefore check each finished row (a NaN or infinity in its
// accumulator or sum; free beside the row's work) and only then redo that work carefully, adding a
// (key, row) product only where the key is visible. The same rerun handles rows whose max is +inf
// (overflowed scores, +inf bias): each +inf score weighs 1 / (their count), every other key 0, lse +inf,
// the limit of the softmax as those scores grow together; a sink then weighs 0 (fold_sink).
#pragma once
#include <cmath>

#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/storage.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

constexpr double kLog2e = 1.4426950408889634073599246810019;

// Both backward kernels (attention_backward.h, attention_backward_additive.h) give each task a whole kv
// item from this many kv items on, and split the work into key-block then query-block tasks below it. A
// shape rule, never the thread count (the gradients are bitwise identical for any number of threads):
// from 8 kv items on, whole-item tasks keep up to 8 cores busy without recomputing any score; below
// that the two passes recompute every score twice but give every core tasks.
constexpr int64_t kBackwardMinKvItems = 8;

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

// The key on query row i's diagonal (b's own offset when the call has one per item: a cache filled to
// kv_lengths[b]), which causal, the window and ALiBi align to. Saturating: never wraps.
template <class Params>
inline int64_t diagonal(const Params& p, int64_t b, int64_t i) {
  return add_saturated(i, p.diagonal_offsets ? p.diagonal_offsets[b] : p.diagonal_offset);
}

// Query rows of batch item b: lq, or its own count in a packed variable-length batch (q_lengths). Rows
// from it on belong to no sequence of the item: never read, never written.
template <class Params>
inline int64_t item_rows(const Params& p, int64_t b) {
  return p.q_lengths ? imin(p.lq, p.q_lengths[b]) : p.lq;
}

// Visible key range [lo, hi) of query row i of batch item b from kv_lengths, causal and window.
// Empty ranges come back as lo == hi. Saturating arithmetic: no offset or window overflows.
template <class Params>
inline void visible_range(const Params& p, int64_t b, int64_t i, int64_t* lo, int64_t* hi) {
  int64_t l = 0, h = p.lk;
  if (p.kv_lengths) h = imin(h, p.kv_lengths[b]);
  const int64_t diag = diagonal(p, b, i);
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

// A bias entry added to a score; a -inf bias hides the key whatever its score (NaN from a NaN or
// infinite K row included), as the mask does.
template <class T>
inline T add_bias_entry(T s, T b) {
  return b == neg_inf<T>() ? b : s + b;
}

// True when all n elements of x are finite: one sum, which is NaN or infinite otherwise (or when a sum
// of large finite values overflows: a false alarm only costs the caller its careful path).
template <class V, class T = typename V::Scalar>
inline bool all_finite(const T* x, int64_t n) {
  V s0 = V::zero(), s1 = V::zero();
  int64_t e = 0;
  for (; e + 2 * V::kLanes <= n; e += 2 * V::kLanes) {
    s0 = s0 + V::load(x + e);
    s1 = s1 + V::load(x + e + V::kLanes);
  }
  for (; e < n; e += V::kLanes) s0 = s0 + V::load_partial(x + e, static_cast<int>(imin(V::kLanes, n - e)));
  const T s = reduce_add(s0 + s1);
  return s - s == T(0);
}

// Log-sum-exp of a row from its running max and sum: -inf when no key was visible (l = 0), +inf when its
// max is +inf, NaN if the row had a NaN. Evaluated in double, so a float lse is m + ln(l) rounded once.
template <class T>
inline T row_lse(T m, T l) {
  if (l == T(0)) return neg_inf<T>();
  return static_cast<T>(static_cast<double>(m) + std::log(static_cast<double>(l)));
}

// The score modifiers (softcap, ALiBi) of params.h: applied to each score tile before the bias and the
// masks, only when the call has one (a branch per tile, never per score).
template <class Params>
inline bool has_score_modifiers(const Params& p) {
  return p.softcap > 0 || p.alibi_slopes != nullptr;
}

// Folds a sink logit into a finished row's running max m and sum l (exponentials taken relative to m):
// M = max(m, sink), l <- l e^(m - M) + e^(sink - M), m <- M. Returns e^(m - M), the factor the row's
// accumulator must be scaled by (0 for a row that saw no key: its out stays 0, its lse becomes sink).
// Evaluated in double, like row_lse. Left unchanged (factor 1): a row whose max is +inf (its +inf keys
// take all the weight, in the limit as in the softmax without a sink, so the sink gets none), a NaN row,
// and a -inf sink (weighs nothing).
template <class T>
inline T fold_sink(T sink, T* m, T* l) {
  const T m_old = *m;
  if (m_old == pos_inf<T>() || m_old != m_old || *l != *l || sink == neg_inf<T>()) return T(1);
  const double big = m_old > sink ? double(m_old) : double(sink);
  const double keep = m_old == neg_inf<T>() ? 0.0 : std::exp(double(m_old) - big);
  *l = static_cast<T>(double(*l) * keep + std::exp(double(sink) - big));
  *m = static_cast<T>(big);
  return static_cast<T>(keep);
}

// Final normalisation of one row: out = acc / l (0 when no key was visible), rounded once to the
// output's storage type SO. Returns the row's log-sum-exp m + ln(l): -inf when no key was visible, NaN
// if the row had a NaN.
// `keep` (a folded sink's factor, fold_sink) multiplies acc as well.
template <class V, class SO, class T = typename V::Scalar>
inline T finish_row(const T* acc, T m, T l, SO* out, int64_t dv, T keep = T(1)) {
  const T inv = l > T(0) ? keep / l : T(0);
  store_row_scaled<V>(acc, dv, V::set1(inv), out);
  return row_lse(m, l);
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
