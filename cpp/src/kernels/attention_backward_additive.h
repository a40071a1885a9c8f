// Fused attention backward for additive (Bahdanau) scores
//     s_ij = scale * sum_a v_a[a] tanh(qp_ia + kp_ja)  (+ bias_ij),   P_ij = exp(s_ij - lse_i)
// without the (batch, lq, lk, hidden) tensor: for one query row and one or two keys at a time the hidden
// axis is one vector loop that recomputes the scores' tanh values (kept in a hidden-sized buffer per
// key), and a second one that turns them into the gradients
//     dS_ij = P_ij (dO_i . V_j - dO_i . O_i)            (0 where the key is hidden)
//     g_a = dS_ij * scale * v_a[a] * (1 - t_a^2),       t_a = tanh(qp_ia + kp_ja)
//     dqp_i += g, dkp_j += g, dv_a += scale * dS_ij * t, dV_j += P_ij dO_i.
// Score modifiers (modified_score): softcap and ALiBi on s before its bias, as the forward; under a
// softcap g and dv_a's terms chain dS (1 - tanh^2) of the cap, dscores stays dS; sinks act only
// through the saved lse.
// dtypes: S = T = V::Scalar, float or double: additive operands are projections the caller computes in
// the compute type. ISA: the including target's V, vectorised along the hidden axis (and along the value
// features for dO . V_j and dV_j).
//
// Numerics: t is tanh_approx (math.h), the forward's function, and s_ij is summed exactly as the
// row-wise forward sums it (additive_score, stage_scores.h: one FMA chain per lane of scale * v_a[a] * t,
// a fixed-order horizontal sum, a tree of kVectorSumBlock blocks beyond), so P_ij is the forward's weight
// to within the rounding of exp(s - lse) (bitwise the same s where the forward ran row-wise; the tiled
// forward sums the same terms per query lane, a few ulp of sum |terms| away). 1 - t^2 is one FMA.
// Sums: dqp_i over the row's keys in key order; dkp_j and dV_j over the kv item's query rows in (query
// item, row) order; dv_a per query row over its keys, then over the rows of a task, then over tasks in
// order, and multiplied by scale once.
//
// Edges (the backward contract, attnfast/params.h): a key hidden by the visible range, the bool mask or
// a -inf bias is skipped before any of its qp/kp/V values is read, so garbage there (NaN, inf) reaches no
// gradient. A row with no visible key (lse = -inf) gets zero gradients. A row whose lse is +inf (an
// overflowed score or a +inf bias) has P = 1 / count on its +inf scores, 0 elsewhere, and dS = 0: only
// dV receives P^T dO.
//
// Parallel, from the shape only (never the thread count), so that results are bitwise identical for
// any number of threads:
//   - at least kBackwardMinKvItems kv items: one task per kv item owns that item's dkp and dV rows and the dqp
//     and dscores rows of its `group` query items (each score computed once);
//   - fewer (one long sequence, few heads): key-block tasks own the dkp and dV rows of kKeysPerTask
//     keys, then query-block tasks own the dqp and dscores rows of kRowsPerTask rows (each score
//     computed twice, but tasks for every core).
// Every dqp, dkp, dV and dS element is computed in the same order by either scheme (so they agree
// bitwise); dv_a has one partial per kv item or key block, added in task order. Scratch: five
// hidden-sized vectors per thread and one hidden-sized partial per task.
#pragma once
#include <cstdlib>

#include "attnfast/params.h"
#include "kernels/attention_common.h"
#include "kernels/common.h"
#include "kernels/math.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V>
struct AdditiveBackward {
  using T = typename V::Scalar;
  using Params = AttentionBackwardParams<T, T>;
  static constexpr int L = V::kLanes;

  const Params& p;
  const AttentionParams<T, T>& f;  // the forward call's operands, masks and lse
  int64_t kv_items;
  int64_t hidden_pad;  // the hidden size rounded up to whole vectors: scratch rows are read by vectors

  explicit AdditiveBackward(const Params& params)
      : p(params), f(params.forward), kv_items(params.forward.batch / params.forward.group),
        hidden_pad(round_up(imax(params.forward.depth, 1), L)) {}

  // A thread's buffers: scale * v_a, the tanh values of the current one or two pairs, and the dv_a
  // sums of the current query row and of the current task.
  struct Work {
    T *va_scaled, *tanh, *dva_row, *dva_item;
  };

  int64_t scratch_bytes() const { return 3 * Carver::bytes<T>(hidden_pad) + Carver::bytes<T>(2 * hidden_pad); }

  Work carve_work(unsigned char* scratch) const {
    Carver carve(scratch);
    Work w;
    w.va_scaled = carve.take<T>(hidden_pad);
    w.tanh = carve.take<T>(2 * hidden_pad);
    w.dva_row = carve.take<T>(hidden_pad);
    w.dva_item = carve.take<T>(hidden_pad);
    for (int64_t a = 0; a < hidden_pad; ++a) w.va_scaled[a] = a < f.depth ? f.v_a[a] * f.scale : T(0);
    return w;
  }

  // sum_a va[a] tanh(q[a] + k[a]) over n <= kVectorSumBlock features, term for term the forward's
  // additive_score_block, with every tanh stored in t (whole vectors: lanes past n get tanh(0) = 0).
  static T score_block(const T* q, const T* k, const T* va, int64_t n, T* t) {
    const int64_t full = n / L * L;
    const int tail = static_cast<int>(n - full);
    V acc = V::zero();
    int64_t a = 0;
    for (; a < full; a += L) {
      const V th = tanh_approx(V::load(q + a) + V::load(k + a));
      th.store(t + a);
      acc = fmadd(V::load(va + a), th, acc);
    }
    if (tail) {
      const V th = tanh_approx(V::load_partial(q + a, tail) + V::load_partial(k + a, tail));
      th.store(t + a);
      acc = fmadd(V::load_partial(va + a, tail), th, acc);
    }
    return reduce_add(acc);
  }

  // score_block for two keys of one query: the same two sums, each term for term as score_block's,
  // side by side (two FMA chains, one load of q and v_a for both).
  static void score_block_two(const T* q, const T* k0, const T* k1, const T* va, int64_t n, T* t0, T* t1,
                              T* s0, T* s1) {
    const int64_t full = n / L * L;
    const int tail = static_cast<int>(n - full);
    V acc0 = V::zero(), acc1 = V::zero();
    int64_t a = 0;
    for (; a < full; a += L) {
      const V qa = V::load(q + a), vaa = V::load(va + a);
      const V th0 = tanh_approx(qa + V::load(k0 + a)), th1 = tanh_approx(qa + V::load(k1 + a));
      th0.store(t0 + a);
      th1.store(t1 + a);
      acc0 = fmadd(vaa, th0, acc0);
      acc1 = fmadd(vaa, th1, acc1);
    }
    if (tail) {
      const V qa = V::load_partial(q + a, tail), vaa = V::load_partial(va + a, tail);
      const V th0 = tanh_approx(qa + V::load_partial(k0 + a, tail)), th1 = tanh_approx(qa + V::load_partial(k1 + a, tail));
      th0.store(t0 + a);
      th1.store(t1 + a);
      acc0 = fmadd(vaa, th0, acc0);
      acc1 = fmadd(vaa, th1, acc1);
    }
    *s0 = reduce_add(acc0);
    *s1 = reduce_add(acc1);
  }

  // The score of one pair before its bias, as the forward's additive_score sums it (a tree of blocks
  // beyond kVectorSumBlock features: out of line, so that the common loop is not shaped by it).
  __attribute__((noinline)) T score_tree(const T* q, const T* k, const T* va, T* t) const {
    return tree_sum<T>(0, f.depth, kVectorSumBlock,
                       [&](int64_t a, int64_t n) { return score_block(q + a, k + a, va + a, n, t + a); });
  }
  T score(const T* q, const T* k, const T* va, T* t) const {
    if (f.depth > kVectorSumBlock) return score_tree(q, k, va, t);
    return score_block(q, k, va, f.depth, t);
  }

  // x . y over n elements: two FMA chains, added at the end.
  static T dot(const T* x, const T* y, int64_t n) {
    const int64_t full = n / L * L;
    const int tail = static_cast<int>(n - full);
    V a0 = V::zero(), a1 = V::zero();
    int64_t e = 0;
    for (; e + 2 * L <= full; e += 2 * L) {
      a0 = fmadd(V::load(x + e), V::load(y + e), a0);
      a1 = fmadd(V::load(x + e + L), V::load(y + e + L), a1);
    }
    for (; e < full; e += L) a0 = fmadd(V::load(x + e), V::load(y + e), a0);
    if (tail) a1 = fmadd(V::load_partial(x + e, tail), V::load_partial(y + e, tail), a1);
    return reduce_add(a0 + a1);
  }

  // y += c x over n elements.
  static void add_scaled(const T* x, T c, T* y, int64_t n) {
    const V cv = V::set1(c);
    const int64_t full = n / L * L;
    const int tail = static_cast<int>(n - full);
    int64_t e = 0;
    for (; e < full; e += L) fmadd(cv, V::load(x + e), V::load(y + e)).store(y + e);
    if (tail) fmadd(cv, V::load_partial(x + e, tail), V::load_partial(y + e, tail)).store_partial(y + e, tail);
  }

  static void zero_row(T* x, int64_t n) {
    for (int64_t e = 0; e < n; ++e) x[e] = T(0);
  }

  // exp(x) for x <= 0 (x slightly above 0 where the forward summed s in another order is fine too),
  // through the forward's vector exp2.
  static T exp_of(T x) {
    T r[L];
    exp2_nonpositive(V::set1(x) * V::set1(T(kLog2e))).store(r);
    return r[0];
  }

  // The gradient pass of one visible pair, g = ds * va_scaled * (1 - t^2): with kQueries dq += g, with
  // kKeys dk += g and dva_row += ds * t (the caller multiplies dv_a by scale once).
  template <bool kKeys, bool kQueries>
  void accumulate_pair(const T* t, const T* va, T ds, T* dq, T* dk, T* dva_row) const {
    const V d = V::set1(ds), one = V::set1(T(1));
    const int64_t full = f.depth / L * L;
    const int tail = static_cast<int>(f.depth - full);
    int64_t a = 0;
    for (; a < full; a += L) {
      const V tv = V::load(t + a);
      const V g = (d * V::load(va + a)) * fmadd(negate(tv), tv, one);
      if (kQueries) (V::load(dq + a) + g).store(dq + a);
      if (kKeys) {
        (V::load(dk + a) + g).store(dk + a);
        fmadd(d, tv, V::load(dva_row + a)).store(dva_row + a);
      }
    }
    if (tail) {
      const V tv = V::load(t + a);  // scratch: whole vectors, zero past the hidden size
      const V g = (d * V::load(va + a)) * fmadd(negate(tv), tv, one);
      if (kQueries) (V::load_partial(dq + a, tail) + g).store_partial(dq + a, tail);
      if (kKeys) {
        (V::load_partial(dk + a, tail) + g).store_partial(dk + a, tail);
        fmadd(d, tv, V::load(dva_row + a)).store(dva_row + a);
      }
    }
  }

  // accumulate_pair for two keys of one row, in the same order (key j0's terms first): bitwise the
  // same sums, with one load and store of dq and dva_row for both.
  template <bool kKeys, bool kQueries>
  void accumulate_two(const T* t0, const T* t1, const T* va, T ds0, T ds1, T* dq, T* dk0, T* dk1,
                      T* dva_row) const {
    const V d0 = V::set1(ds0), d1 = V::set1(ds1), one = V::set1(T(1));
    const int64_t full = f.depth / L * L;
    const int tail = static_cast<int>(f.depth - full);
    int64_t a = 0;
    for (; a < full; a += L) {
      const V u0 = V::load(t0 + a), u1 = V::load(t1 + a), vaa = V::load(va + a);
      const V g0 = (d0 * vaa) * fmadd(negate(u0), u0, one), g1 = (d1 * vaa) * fmadd(negate(u1), u1, one);
      if (kQueries) ((V::load(dq + a) + g0) + g1).store(dq + a);
      if (kKeys) {
        (V::load(dk0 + a) + g0).store(dk0 + a);
        (V::load(dk1 + a) + g1).store(dk1 + a);
        fmadd(d1, u1, fmadd(d0, u0, V::load(dva_row + a))).store(dva_row + a);
      }
    }
    if (tail) {
      const V u0 = V::load(t0 + a), u1 = V::load(t1 + a), vaa = V::load(va + a);
      const V g0 = (d0 * vaa) * fmadd(negate(u0), u0, one), g1 = (d1 * vaa) * fmadd(negate(u1), u1, one);
      if (kQueries) ((V::load_partial(dq + a, tail) + g0) + g1).store_partial(dq + a, tail);
      if (kKeys) {
        (V::load_partial(dk0 + a, tail) + g0).store_partial(dk0 + a, tail);
        (V::load_partial(dk1 + a, tail) + g1).store_partial(dk1 + a, tail);
        fmadd(d1, u1, fmadd(d0, u0, V::load(dva_row + a))).store(dva_row + a);
      }
    }
  }

  // Score s of key j in row (b, i) (before its bias) with the forward's score modifiers, computed as the
  // forward's modify_scores does (the same tanh_approx, the same FMA): softcap c tanh(s / c), then ALiBi
  // s - slope |diag_i - j|. *cap_slope receives the softcap's derivative 1 - tanh^2 (1 without one), by
  // which the score's gradient reaches qp, kp and v_a; dscores (the bias's gradient) stays unchained.
  T modified_score(T s, int64_t b, int64_t i, int64_t j, T* cap_slope) const {
    *cap_slope = T(1);
    if (f.softcap > T(0)) {
      T t[L];
      tanh_approx(V::set1(s) * V::set1(T(1) / f.softcap)).store(t);
      s = f.softcap * t[0];
      *cap_slope = std::fma(-t[0], t[0], T(1));
    }
    if (f.alibi_slopes)
      s = std::fma(-f.alibi_slopes[b], std::fabs(static_cast<T>(sub_saturated(diagonal(f, b, i), j))), s);
    return s;
  }

  // The bias of key j in row (b, i), or 0 without one; -inf hides the key (add_bias_entry).
  T bias_of(int64_t b, int64_t i, int64_t j) const {
    return f.bias.data ? f.bias.row(b, i)[j * f.bias.col_stride_elements] : T(0);
  }
  // Key j of row (b, i) is inside the row's visible range: is it also kept by the mask and the bias?
  bool kept(int64_t b, int64_t i, int64_t j) const {
    if (f.mask.data && !f.mask.row(b, i)[j * f.mask.col_stride_elements]) return false;
    return bias_of(b, i, j) != neg_inf<T>();
  }

  const T* dout_row(int64_t b, int64_t i) const { return p.dout_wide.data ? p.dout_wide.row(b, i) : p.dout.row(b, i); }
  const T* out_row(int64_t b, int64_t i) const { return f.out_wide.data ? f.out_wide.row(b, i) : f.out.row(b, i); }
  const T* query_row(int64_t b, int64_t i) const { return f.q_wide.data ? f.q_wide.row(b, i) : f.q.row(b, i); }

  // A row whose lse is +inf: the forward weighed its +inf scores 1 / count each and the rest 0 (a NaN
  // score makes the count, and so the weights, NaN); dS = 0, so only dV changes, here for the keys in
  // [j_begin, j_end) (the count is over all of the row's keys).
  T saturated_share(int64_t b, int64_t i, int64_t j, Work& w) const {
    if (!kept(b, i, j)) return T(0);
    T cap_slope;
    const T s = modified_score(score(query_row(b, i), f.k.row(b / f.group, j), w.va_scaled, w.tanh), b, i, j,
                               &cap_slope) +
                bias_of(b, i, j);
    return s == pos_inf<T>() ? T(1) : (s != s ? s : T(0));
  }
  void saturated_row(int64_t b, int64_t i, int64_t lo, int64_t hi, int64_t j_begin, int64_t j_end, Work& w) const {
    T count = 0;
    for (int64_t j = lo; j < hi; ++j) count += saturated_share(b, i, j, w);
    const T weight = T(1) / count;
    for (int64_t j = imax(lo, j_begin); j < imin(hi, j_end); ++j) {
      const T share = saturated_share(b, i, j, w);
      if (share != T(0)) add_scaled(dout_row(b, i), share * weight, p.dv.row(b / f.group, j), f.dv);
    }
  }

  // What one pass adds, for a row, to the keys' gradients (kKeys: dkp, dV, dv_a) and to the row's own
  // (kQueries: dqp, dscores).
  struct RowTarget {
    T lse, delta;
    T *dq, *dscores;
  };

  // One visible (row, key) pair: P and dS from the recomputed score, then the pass's gradient updates.
  template <bool kKeys, bool kQueries>
  void pair_backward(int64_t b, int64_t i, int64_t j, const RowTarget& r, Work& w) const {
    const int64_t bkv = b / f.group;
    const T* dout = dout_row(b, i);
    T cap_slope;
    const T s =
        modified_score(score(query_row(b, i), f.k.row(bkv, j), w.va_scaled, w.tanh), b, i, j, &cap_slope) +
        bias_of(b, i, j);
    const T pij = exp_of(s - r.lse);
    const T ds = pij * (dot(dout, f.v.row(bkv, j), f.dv) - r.delta);
    if (kKeys) add_scaled(dout, pij, p.dv.row(bkv, j), f.dv);
    accumulate_pair<kKeys, kQueries>(w.tanh, w.va_scaled, ds * cap_slope, r.dq, kKeys ? p.dk.row(bkv, j) : nullptr,
                                     w.dva_row);
    if (kQueries && r.dscores) r.dscores[j] = ds;
  }

  // pair_backward for two keys j0 < j1 of one row: bitwise the same results, fewer loads and stores.
  template <bool kKeys, bool kQueries>
  void two_pairs_backward(int64_t b, int64_t i, int64_t j0, int64_t j1, const RowTarget& r, Work& w) const {
    const int64_t bkv = b / f.group;
    const T* dout = dout_row(b, i);
    T* t1 = w.tanh + hidden_pad;
    T s0, s1;
    score_block_two(query_row(b, i), f.k.row(bkv, j0), f.k.row(bkv, j1), w.va_scaled, f.depth, w.tanh, t1, &s0, &s1);
    T cap0, cap1;
    s0 = modified_score(s0, b, i, j0, &cap0);
    s1 = modified_score(s1, b, i, j1, &cap1);
    const T p0 = exp_of(s0 + bias_of(b, i, j0) - r.lse), p1 = exp_of(s1 + bias_of(b, i, j1) - r.lse);
    const T ds0 = p0 * (dot(dout, f.v.row(bkv, j0), f.dv) - r.delta);
    const T ds1 = p1 * (dot(dout, f.v.row(bkv, j1), f.dv) - r.delta);
    if (kKeys) {
      add_scaled(dout, p0, p.dv.row(bkv, j0), f.dv);
      add_scaled(dout, p1, p.dv.row(bkv, j1), f.dv);
    }
    accumulate_two<kKeys, kQueries>(w.tanh, t1, w.va_scaled, ds0 * cap0, ds1 * cap1, r.dq, kKeys ? p.dk.row(bkv, j0) : nullptr,
                                    kKeys ? p.dk.row(bkv, j1) : nullptr, w.dva_row);
    if (kQueries && r.dscores) {
      r.dscores[j0] = ds0;
      r.dscores[j1] = ds1;
    }
  }

  // Row i of batch item b against its kept keys in [j_begin, j_end), in key order, two at a time
  // while two remain (score_block_two, accumulate_two: the same sums). With kQueries the row's dqp and
  // dscores must be zero already (and [j_begin, j_end) all keys); with kKeys the row's dv_a terms are
  // added to the kv item's sum.
  template <bool kKeys, bool kQueries>
  void row_backward(int64_t b, int64_t i, int64_t j_begin, int64_t j_end, Work& w) const {
    int64_t lo, hi;
    visible_range(f, b, i, &lo, &hi);
    const T lse = f.lse[f.lse_batch_offset_elements[b] + i];
    if (hi <= lo || lse == neg_inf<T>()) return;  // no visible key: zero gradients
    if (lse == pos_inf<T>()) {
      if (kKeys) saturated_row(b, i, lo, hi, j_begin, j_end, w);
      return;
    }
    lo = imax(lo, j_begin);
    hi = imin(hi, j_end);
    if (hi <= lo) return;
    const RowTarget r{lse, dot(dout_row(b, i), out_row(b, i), f.dv), kQueries ? p.dq.row(b, i) : nullptr,
                      kQueries && p.dscores.data ? p.dscores.row(b, i) : nullptr};
    if (kKeys) zero_row(w.dva_row, hidden_pad);
    int64_t j = lo;
    while (true) {
      while (j < hi && !kept(b, i, j)) ++j;
      if (j >= hi) break;
      int64_t j1 = j + 1;
      while (j1 < hi && !kept(b, i, j1)) ++j1;
      if (j1 >= hi || f.depth > kVectorSumBlock) {
        pair_backward<kKeys, kQueries>(b, i, j, r, w);
        ++j;
        continue;
      }
      two_pairs_backward<kKeys, kQueries>(b, i, j, j1, r, w);
      j = j1 + 1;
    }
    if (kKeys)
      for (int64_t a = 0; a < hidden_pad; a += L)
        (V::load(w.dva_item + a) + V::load(w.dva_row + a)).store(w.dva_item + a);
  }

  // Query rows [i_begin, i_end) of batch item b: dqp and dscores zeroed (a row that sees no key keeps
  // zeros), then, with kKeys too, the rows' terms of their kv item's gradients.
  template <bool kKeys>
  void query_rows(int64_t b, int64_t i_begin, int64_t i_end, Work& w) const {
    for (int64_t i = i_begin; i < i_end; ++i) {
      zero_row(p.dq.row(b, i), f.depth);
      if (p.dscores.data) zero_row(p.dscores.row(b, i), f.lk);
      row_backward<kKeys, true>(b, i, 0, f.lk, w);
    }
  }

  // Keys [j_begin, j_end) of kv item bkv: their dkp and dV rows from every query row of the item's
  // group, in (query item, row) order; the dv_a terms go to `partial`. With kQueries the whole item
  // (all keys) and its query rows' own gradients in the same pass.
  template <bool kQueries>
  void key_rows(int64_t bkv, int64_t j_begin, int64_t j_end, Work& w, T* partial) const {
    for (int64_t j = j_begin; j < j_end; ++j) {
      zero_row(p.dk.row(bkv, j), f.depth);
      zero_row(p.dv.row(bkv, j), f.dv);
    }
    zero_row(w.dva_item, hidden_pad);
    for (int64_t b = bkv * f.group; b < (bkv + 1) * f.group; ++b) {
      if (kQueries) {
        query_rows<true>(b, 0, f.lq, w);
      } else {
        for (int64_t i = 0; i < f.lq; ++i) row_backward<true, false>(b, i, j_begin, j_end, w);
      }
    }
    for (int64_t a = 0; a < hidden_pad; ++a) partial[a] = w.dva_item[a];
  }

  // dv_a = scale * (the partials of `tasks` tasks, added in task order).
  void reduce_dva(const T* partials, int64_t tasks) const {
    if (!p.dv_a) return;
    for (int64_t a = 0; a < f.depth; ++a) {
      T sum = 0;
      for (int64_t task = 0; task < tasks; ++task) sum += partials[task * hidden_pad + a];
      p.dv_a[a] = sum * f.scale;
    }
  }

  // Whole kv items per task when there are enough of them to feed the cores (kBackwardMinKvItems); else
  // key-block tasks for dkp, dV and dv_a, then query-block tasks for dqp and dscores (every score
  // recomputed twice, but tasks for every core). A shape rule, never the thread count.
  static constexpr int64_t kKeysPerTask = 64;
  static constexpr int64_t kRowsPerTask = 16;

  int run() const {
    const bool whole_items = kv_items >= kBackwardMinKvItems;
    const int64_t key_blocks = whole_items ? 1 : ceil_div(f.lk, kKeysPerTask);
    const int64_t key_tasks = kv_items * key_blocks;
    T* partials = static_cast<T*>(std::malloc(static_cast<size_t>(imax(key_tasks, 1) * hidden_pad) * sizeof(T)));
    if (!partials) return kOutOfMemory;
    ThreadScratch scratch(f.num_threads, scratch_bytes());
    if (!scratch.ok()) {
      std::free(partials);
      return kOutOfMemory;
    }
    if (whole_items) {
      parallel_for(f.num_threads, kv_items, [&](int64_t item, int slot) {
        Work w = carve_work(scratch.slice(slot));
        key_rows<true>(item, 0, f.lk, w, partials + item * hidden_pad);
      });
    } else {
      parallel_for(f.num_threads, key_tasks, [&](int64_t task, int slot) {
        Work w = carve_work(scratch.slice(slot));
        const int64_t j0 = (task % key_blocks) * kKeysPerTask;
        key_rows<false>(task / key_blocks, j0, imin(f.lk, j0 + kKeysPerTask), w, partials + task * hidden_pad);
      });
      const int64_t row_blocks = ceil_div(f.lq, kRowsPerTask);
      parallel_for(f.num_threads, f.batch * row_blocks, [&](int64_t task, int slot) {
        Work w = carve_work(scratch.slice(slot));
        const int64_t i0 = (task % row_blocks) * kRowsPerTask;
        query_rows<false>(task / row_blocks, i0, imin(f.lq, i0 + kRowsPerTask), w);
      });
    }
    reduce_dva(partials, key_tasks);
    std::free(partials);
    return kOk;
  }
};

// Gradients of additive-score attention (see the header comment); the dispatcher's entry for v_a set.
template <class V>
int attention_backward_additive(const AttentionBackwardParams<typename V::Scalar, typename V::Scalar>& p) {
  return AdditiveBackward<V>(p).run();
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
