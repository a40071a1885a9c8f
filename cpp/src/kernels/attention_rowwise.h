// Fused attention, row-wise path for decode-shaped calls: few query rows per kv head (one decoder step,
// KV-cache decode, GQA groups). Memory-bound: each K and V row is streamed once and used by every query
// row that shares it (the `group` query heads of a kv head times Lq).
// dtypes: K and V stored in S (double, float, float16, bfloat16, int8), read in place and widened on
// load; queries in S or T (packed once per call into qs); computed in T = V::Scalar (double for double,
// else float); the result rounded once to its storage type. ISA: the including target's V.
// int8 K and V (a quantised cache, float32 queries and result) are widened in registers only (vpmovsxbd
// + vcvtdq2ps: exact) and never dequantised in memory: key j's score is k_scale_j * ((c q) . k_j), the
// float32 dot product of the scaled query with the integer row, then one multiplication by the row's
// scale (score_tile); P.V weighs V's integer row j by p_j * v_scale_j (value_weight), one rounding more
// per key than a float cache's p_j, while l sums the unscaled p_j. Each scale is read once per key tile
// (load_row_scales), through the scale operand's row(), for the tile's keys only. P.V over int8 V sums
// each key tile's terms from zero and then adds them to the rescaled accumulator (accumulate_quantised):
// a two-level sum whose rounding error grows with the tile's keys plus the tile count, not with Lk.
//
// Scores are dot products vectorised along the feature axis (four partial sums, then a fixed-order
// horizontal sum; more than kVectorSumBlock features as a tree of such blocks); the online softmax and the P.V update run along the key axis and the value features.
// When there are few kv items and many keys, the keys are split into chunks processed in parallel and
// merged by log-sum-exp (split_keys and merge_chunk_states, attention_schedule.h). The number of chunks
// depends only on the problem's shape, and the merge runs in chunk order, so results are bitwise
// identical for any thread count.
// Hidden keys (attention_common.h): a chunk whose finished rows hold a NaN or infinity (chunk_needs_care)
// is run once more with kCareful, where a row's P.V skips the keys it cannot see. A row whose max is
// +inf gives each +inf score p = 1 and every other key 0 (softmax_row_saturated), so its lse is +inf and
// its output the mean of those keys' V rows.
// Score modifiers (softcap, ALiBi) are applied to each row's scores before its bias (modify_row); a sink
// is folded into each finished row (write_row: fold_sink), after the key-split merge.
#pragma once
#include "attnfast/params.h"
#include "kernels/attention_common.h"
#include "kernels/attention_schedule.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/paged_rows.h"
#include "kernels/stage_scores.h"
#include "kernels/storage.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, class S>
struct RowwiseAttention {
  using T = typename V::Scalar;
  using Params = AttentionParams<S, T>;
  static constexpr int L = V::kLanes;
  static constexpr int64_t kMaxRows = 16;  // rows per kv item handled by this path
  static constexpr int64_t NK = 128;       // keys per tile
  static constexpr int kDvVectors = 16;    // value vectors per pass: Dv = 128 floats is one pass over V

  const Params& p;
  int64_t rows;        // query rows per kv item: group * lq
  int64_t chunks;      // key chunks per kv item
  int64_t chunk_len;   // keys per chunk (a multiple of NK)
  int64_t dv_pad;

  explicit RowwiseAttention(const Params& params) : p(params) {
    rows = p.group * p.lq;
    dv_pad = round_up(imax(p.dv, 1), L);
    const KeyChunks split = split_keys(kRowwiseKeySplit, p.batch / p.group, p.lk, NK,
                                       rows * partial_stride() * int64_t(sizeof(T)));  // attention_schedule.h
    chunks = split.count;
    chunk_len = split.length;
  }

  static bool applies(const Params& params) { return params.group * params.lq <= kMaxRows; }

  int64_t scratch_bytes() const {
    return Carver::bytes<T>(rows * p.depth) + Carver::bytes<T>(rows * NK) + Carver::bytes<T>(rows * dv_pad) +
           2 * Carver::bytes<T>(rows) + 2 * Carver::bytes<int64_t>(rows) + Carver::bytes<T>(p.v_a ? p.depth : 0) +
           2 * Carver::bytes<T>(kInt8Storage<S> ? NK : 0);
  }
  // Partial results of each chunk when the keys are split: acc (dv_pad), m2, l per row.
  int64_t partial_stride() const { return dv_pad + 2; }

  struct Work {
    int64_t kv_item, j_begin, j_end;
    int64_t read_end = 0;  // keys below it may be read: a paged K is fetched ahead up to it
    T *qs, *s, *acc, *m, *l;
    T* va_scaled;  // additive only: scale * v_a
    int64_t *lo, *hi;
    T *key_scales, *value_scales;  // int8 only: the current key tile's k_scale and v_scale (NK each)
  };

  int64_t batch_of(const Work& w, int64_t r) const { return w.kv_item * p.group + r / p.lq; }
  int64_t query_of(int64_t r) const { return r % p.lq; }
  // False for a row past its item's query rows (a packed variable-length batch): the row is padding of
  // the call's rows-per-kv-item layout, and none of its q, out or lse is touched.
  bool live(const Work& w, int64_t r) const { return query_of(r) < item_rows(p, batch_of(w, r)); }

  // One query row . one key, vectorised along the features with four partial sums (independent FMA
  // chains), added pairwise at the end. Reading one key row start to end keeps K a single sequential
  // stream, which the hardware prefetchers follow; four keys read side by side are four streams 1 KB apart,
  // which they follow worse (docs/kernel_decisions.md).
  // A depth beyond kVectorSumBlock is summed as a tree of such blocks (dot_score_tile_tree), which keeps the
  // rounding error of a long D near that of one block.
  T dot_row(const T* q, const S* k, int64_t depth) const {
    const int64_t full = depth / L * L;
    const int tail = static_cast<int>(depth - full);
    V a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    int64_t d = 0;
    for (; d + 4 * L <= full; d += 4 * L) {
      a0 = fmadd(V::load(q + d), load_as<V>(k + d), a0);
      a1 = fmadd(V::load(q + d + L), load_as<V>(k + d + L), a1);
      a2 = fmadd(V::load(q + d + 2 * L), load_as<V>(k + d + 2 * L), a2);
      a3 = fmadd(V::load(q + d + 3 * L), load_as<V>(k + d + 3 * L), a3);
    }
    for (; d < full; d += L) a0 = fmadd(V::load(q + d), load_as<V>(k + d), a0);
    if (tail) a1 = fmadd(V::load_partial(q + d, tail), load_partial_as<V>(k + d, tail), a1);
    return reduce_add((a0 + a1) + (a2 + a3));
  }
  // dot_score_tile for depth > kVectorSumBlock. Out of line, so that the common loop's code is not
  // shaped by it.
  __attribute__((noinline)) void dot_score_tile_tree(const Work& w, int64_t j0, int64_t nk) const {
    for (int64_t t = 0; t < nk; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        const T* qr = w.qs + r * p.depth;
        const S* kt = p.k.row(w.kv_item, j0 + t);  // page-aware; one lookup beside a long dot product
        w.s[r * NK + t] = tree_sum<T>(0, p.depth, kVectorSumBlock,
                                      [&](int64_t d, int64_t n) { return dot_row(qr + d, kt + d, n); });
      }
  }

  // Scores s[r][j] (masks applied as -inf) of keys j0 .. j0+nk for every row.
  void score_tile(const Work& w, int64_t j0, int64_t nk) const {
    if constexpr (kSameType<S, T>) {
      // Additive scores come with projected (compute-type) keys only.
      if (p.v_a) {
        for (int64_t t = 0; t < nk; ++t) {
          const T* k = p.k.row(w.kv_item, j0 + t);  // page-aware; one lookup beside depth tanh
          for (int64_t r = 0; r < rows; ++r)
            w.s[r * NK + t] = additive_score<V>(w.qs + r * p.depth, k, w.va_scaled, p.depth);
        }
        apply_masks(w, j0, nk);
        return;
      }
    }
    dot_score_tile(w, j0, nk);
    if constexpr (kInt8Storage<S>) scale_scores_by_key(w, j0, nk);
    apply_masks(w, j0, nk);
  }

  // int8 K: the tile's row scales, and each score times its key's k_scale (before the bias and masks, so
  // a hidden key's scale, even NaN, is overwritten with the key's score).
  void scale_scores_by_key(const Work& w, int64_t j0, int64_t nk) const {
    load_row_scales(w, j0, nk);
    for (int64_t r = 0; r < rows; ++r) {
      T* s = w.s + r * NK;
      for (int64_t t = 0; t < nk; ++t) s[t] *= w.key_scales[t];
    }
  }
  void load_row_scales(const Work& w, int64_t j0, int64_t nk) const {
    gather_row_scales(p.k_scale, w.kv_item, j0, nk, w.key_scales);
    gather_row_scales(p.v_scale, w.kv_item, j0, nk, w.value_scales);
  }
  // One row() lookup per run of evenly spaced rows (a page, or the whole tile unpaged) instead of one
  // per key: the lookup is a call that costs more than the load it addresses.
  static void gather_row_scales(const Operand<const float>& scale, int64_t item, int64_t j0, int64_t nk, T* out) {
    const int64_t stride = scale.row_stride_elements;
    for (int64_t t0 = 0, n = 0; t0 < nk; t0 += n) {
      n = imin(nk - t0, scale.run_rows(j0 + t0));
      const float* first = scale.row(item, j0 + t0);
      for (int64_t t = 0; t < n; ++t) out[t0 + t] = first[t * stride];
    }
  }

  // The weight of V's row j0 + t in P.V: p, times the row's v_scale for int8 V.
  T value_weight(const Work& w, const T* s, int64_t t) const {
    if constexpr (kInt8Storage<S>) return s[t] * w.value_scales[t];
    (void)w;
    return s[t];
  }

  // K and V stream in row order, which the hardware prefetchers follow; explicit prefetches of the next
  // rows (one instruction per cache line) only add instructions (docs/kernel_decisions.md).
  // Key outer: each K row is read from memory once and from L1 for the group's other query rows.
  void dot_score_tile(const Work& w, int64_t j0, int64_t nk) const {
    const int64_t ks = p.k.row_stride_elements;
    const S* k = p.k.row(w.kv_item, j0);
    if (p.depth > kVectorSumBlock) {
      dot_score_tile_tree(w, j0, nk);
      return;
    }
    if (p.k.paged()) {
      dot_score_tile_paged(w, j0, nk);
      return;
    }
    int64_t t = 0;
    if constexpr (kInt8Storage<S>) {
      for (; t + 4 <= nk; t += 4)
        for (int64_t r = 0; r < rows; ++r) dot_rows4(w.qs + r * p.depth, k + t * ks, ks, p.depth, w.s + r * NK + t);
    }
    for (; t < nk; ++t)
      for (int64_t r = 0; r < rows; ++r) w.s[r * NK + t] = dot_row(w.qs + r * p.depth, k + t * ks, p.depth);
  }

  // int8 K: dot_row of one query row with four consecutive keys at once, each key's sums in exactly
  // dot_row's order (so the scores are bitwise dot_row's). A widened int8 row is cheap to read but costs
  // a conversion per vector: the four keys' independent FMA chains and their four horizontal sums
  // overlap, where one key at a time leaves the short chains and the reduction on the critical path.
  // Four int8 rows of D = 128 are 512 contiguous bytes, still one stream for the prefetchers.
  void dot_rows4(const T* q, const S* k, int64_t ks, int64_t depth, T* out) const {
    const int64_t full = depth / L * L;
    const int tail = static_cast<int>(depth - full);
    V a[4][4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) a[j][u] = V::zero();
    int64_t d = 0;
    for (; d + 4 * L <= full; d += 4 * L) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const V qv = V::load(q + d + u * L);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) a[j][u] = fmadd(qv, load_as<V>(k + j * ks + d + u * L), a[j][u]);
      }
    }
    for (; d < full; d += L) {
      const V qv = V::load(q + d);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) a[j][0] = fmadd(qv, load_as<V>(k + j * ks + d), a[j][0]);
    }
    if (tail) {
      const V qv = V::load_partial(q + d, tail);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) a[j][1] = fmadd(qv, load_partial_as<V>(k + j * ks + d, tail), a[j][1]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) out[j] = reduce_add((a[j][0] + a[j][1]) + (a[j][2] + a[j][3]));
  }

  // dot_score_tile of a paged K (a paged KV cache: paged_rows.h), page run by page run: the same scores.
  // The hardware prefetchers lose the stream at every page (the next one is anywhere in the cache): while
  // key t of a run is scored, row t of the next run (below read_end) and this key's V row are fetched.
  // Out of line, so that the unpaged loop's code is not shaped by it.
  __attribute__((noinline)) void dot_score_tile_paged(const Work& w, int64_t j0, int64_t nk) const {
    const int64_t ks = p.k.row_stride_elements, vs = p.v.row_stride_elements;
    for (int64_t t0 = 0, n = 0; t0 < nk; t0 += n) {
      n = imin(nk - t0, p.k.run_rows(j0 + t0));
      const S* k = p.k.row(w.kv_item, j0 + t0);
      const S* v = p.v.row(w.kv_item, j0 + t0);
      const int64_t next = j0 + t0 + n;
      const int64_t ahead = next < w.read_end ? imin(w.read_end - next, p.k.run_rows(next)) : 0;
      const S* k_next = ahead > 0 ? p.k.row(w.kv_item, next) : k;
      for (int64_t t = 0; t < n; ++t) {
        if (t < ahead) prefetch_rows(k_next + t * ks, ks, 1, p.depth);
        prefetch_rows(v + t * vs, vs, 1, p.dv);
        for (int64_t r = 0; r < rows; ++r)
          w.s[r * NK + t0 + t] = dot_row(w.qs + r * p.depth, k + t * ks, p.depth);
      }
    }
  }

  // One row's scores of keys [j0, j0 + nk) with the score modifiers, keys in lanes: softcap
  // s <- c tanh(s / c), then ALiBi s <- s - slope |diag_i - j| (as the tiled path's modify_scores).
  template <bool kCap, bool kAlibi>
  void modify_row(T* s, int64_t b, int64_t i, int64_t j0, int64_t nk) const {
    const V cap = V::set1(p.softcap), inv_cap = V::set1(kCap ? T(1) / p.softcap : T(0));
    const V minus_slope = V::set1(kAlibi ? -p.alibi_slopes[b] : T(0));
    T lane_index[L];
    for (int u = 0; u < L; ++u) lane_index[u] = T(u);
    const V lanes = V::load(lane_index);
    const int64_t diag = diagonal(p, b, i);
    for (int64_t t = 0; t < nk; t += L) {
      const int n = static_cast<int>(imin(L, nk - t));
      V x = V::load_partial(s + t, n);
      if constexpr (kCap) x = cap * tanh_approx(x * inv_cap);
      if constexpr (kAlibi)
        x = fmadd(minus_slope, abs(V::set1(static_cast<T>(sub_saturated(diag, j0 + t))) - lanes), x);
      x.store_partial(s + t, n);
    }
  }
  void modify_row(T* s, int64_t b, int64_t i, int64_t j0, int64_t nk) const {
    if (p.softcap > T(0)) {
      if (p.alibi_slopes) {
        modify_row<true, true>(s, b, i, j0, nk);
      } else {
        modify_row<true, false>(s, b, i, j0, nk);
      }
    } else {
      modify_row<false, true>(s, b, i, j0, nk);
    }
  }

  // The score modifiers first (modify_row), then the bias; then the visible range and the bool mask
  // overwrite with -inf, so a masked key stays masked whatever its bias (-inf plus an infinite bias
  // would be NaN) or its modified score.
  void apply_masks(const Work& w, int64_t j0, int64_t nk) const {
    const bool modified = has_score_modifiers(p);
    for (int64_t r = 0; r < rows; ++r) {
      T* s = w.s + r * NK;
      const int64_t b = batch_of(w, r), i = query_of(r);
      if (modified) modify_row(s, b, i, j0, nk);
      if (p.bias.data && live(w, r)) {
        const int64_t cs = p.bias.col_stride_elements;
        const T* brow = p.bias.row(b, i) + j0 * cs;
        for (int64_t t = 0; t < nk; ++t) s[t] = add_bias_entry(s[t], brow[t * cs]);
      }
      const int64_t lo = imin(nk, imax(0, w.lo[r] - j0));
      const int64_t hi = imax(lo, imin(nk, w.hi[r] - j0));
      for (int64_t t = 0; t < lo; ++t) s[t] = neg_inf<T>();
      for (int64_t t = hi; t < nk; ++t) s[t] = neg_inf<T>();
      if (p.mask.data && live(w, r)) {
        const int64_t cs = p.mask.col_stride_elements;
        const uint8_t* mrow = p.mask.row(b, i) + j0 * cs;
        for (int64_t t = 0; t < nk; ++t) s[t] = keep_or_neg_inf(s[t], mrow[t * cs]);
      }
    }
  }

  // Online softmax of one row's tile: s <- exp(s - m_new), returns alpha = exp(m_old - m_new).
  T softmax_row(T* s, int64_t nk, T* m, T* l) const {
    T m_new = *m;
    for (int64_t t = 0; t < nk; ++t) m_new = s[t] > m_new || s[t] != s[t] ? s[t] : m_new;
    if (m_new == pos_inf<T>()) return softmax_row_saturated(s, nk, m, l);
    const T m_use = m_new == neg_inf<T>() ? T(0) : m_new;
    const int64_t full = nk / L * L;
    const int tail = static_cast<int>(nk - full);
    const V vm = V::set1(m_use);
    const V log2e = V::set1(T(kLog2e));
    V sum = V::zero();
    int64_t t = 0;
    for (; t < full; t += L) {
      const V e = exp2_nonpositive((V::load(s + t) - vm) * log2e);
      e.store(s + t);
      sum = sum + e;
    }
    T tail_sum = 0;
    if (tail) {
      exp2_nonpositive((V::load_partial(s + t, tail) - vm) * log2e).store_partial(s + t, tail);
      for (; t < nk; ++t) tail_sum += s[t];
    }
    T alpha[L];
    exp2_nonpositive(V::set1(*m - m_use) * log2e).store(alpha);
    *l = *l * alpha[0] + (reduce_add(sum) + tail_sum);
    *m = m_new;
    return alpha[0];
  }

  // The row's max is +inf (overflowed scores, a +inf bias): in the limit of the softmax as those scores
  // grow together each +inf key weighs the same and every other key 0, so p = 1 for them, 0 for finite
  // and -inf scores (NaN stays NaN), and what the row summed under a finite max weighs 0 (alpha).
  T softmax_row_saturated(T* s, int64_t nk, T* m, T* l) const {
    T count = 0;
    for (int64_t t = 0; t < nk; ++t) {
      const T x = s[t];
      s[t] = x == pos_inf<T>() ? T(1) : (x != x ? x : T(0));
      count += s[t];
    }
    const T alpha = *m == pos_inf<T>() ? T(1) : T(0);
    *l = *l * alpha + count;
    *m = pos_inf<T>();
    return alpha;
  }

  // acc[r] = acc[r] * alpha + sum_t s[r][t] * V[j0 + t], kDvVectors value vectors at a time.
  // kCareful: keys with hidden[t] set (hidden from this row) are skipped, so their V cannot reach the
  // row even as 0 * NaN; the other terms are added in the same order, giving bitwise the same sums.
  template <bool kCareful>
  void accumulate(const Work& w, int64_t r, T alpha, int64_t j0, int64_t nk, const bool* hidden) const {
    const S* v = p.v.row(w.kv_item, j0);
    const int64_t vs = p.v.row_stride_elements;
    const T* s = w.s + r * NK;
    T* acc = w.acc + r * dv_pad;
    const V a = V::set1(alpha);
    for (int64_t c0 = 0; c0 < p.dv; c0 += kDvVectors * L) {
      const int64_t ncols = imin(kDvVectors * L, p.dv - c0);
      const int nvec = static_cast<int>(ceil_div(ncols, L));
      const int last = static_cast<int>(ncols - (nvec - 1) * L);
      decltype(V::v) o[kDvVectors];  // native vectors: kept in registers (see microkernel.h)
#pragma GCC unroll 16
      for (int u = 0; u < kDvVectors; ++u) o[u] = u < nvec ? (V::load(acc + c0 + u * L) * a).v : V::zero().v;
      if (nvec == kDvVectors && last == L) {
        for (int64_t t = 0; t < nk; ++t) {
          if (kCareful && hidden[t]) continue;
          const V pt = V::set1(s[t]);
          const S* vr = v + t * vs + c0;
#pragma GCC unroll 16
          for (int u = 0; u < kDvVectors; ++u) o[u] = fmadd(pt, load_as<V>(vr + u * L), V{o[u]}).v;
        }
      } else {
        for (int64_t t = 0; t < nk; ++t) {
          if (kCareful && hidden[t]) continue;
          const V pt = V::set1(s[t]);
          const S* vr = v + t * vs + c0;
          for (int u = 0; u < nvec; ++u)
            o[u] = fmadd(pt, u == nvec - 1 ? load_partial_as<V>(vr + u * L, last) : load_as<V>(vr + u * L), V{o[u]}).v;
        }
      }
      for (int u = 0; u < nvec; ++u) V{o[u]}.store(acc + c0 + u * L);
    }
  }

  // accumulate of a paged V (paged_rows.h), page run by page run in key order: the same sums. Out of
  // line, as dot_score_tile_paged.
  // P.V reads V from cache (dot_score_tile_paged fetched it), so memory would idle through it: while the
  // first row's first column pass reads each run, the next tile's K and V rows of the same positions
  // (below read_end, within one run of the next tile) are fetched into L2 (prefetcht2: not into L1,
  // where they would evict this tile's rows), spread over the pass. Only for pages shorter than a tile:
  // longer runs the hardware prefetchers follow, and the extra instructions cost. Written inline: a call
  // here would spill the accumulators held in registers across the runs.
  template <bool kCareful>
  __attribute__((noinline)) void accumulate_paged(const Work& w, int64_t r, T alpha, int64_t j0, int64_t nk,
                                                  const bool* hidden) const {
    const int64_t vs = p.v.row_stride_elements;
    const T* s = w.s + r * NK;
    T* acc = w.acc + r * dv_pad;
    const V a = V::set1(alpha);
    for (int64_t c0 = 0; c0 < p.dv; c0 += kDvVectors * L) {
      const int64_t ncols = imin(kDvVectors * L, p.dv - c0);
      const int nvec = static_cast<int>(ceil_div(ncols, L));
      const int last = static_cast<int>(ncols - (nvec - 1) * L);
      decltype(V::v) o[kDvVectors];  // native vectors: kept in registers (see microkernel.h)
#pragma GCC unroll 16
      for (int u = 0; u < kDvVectors; ++u) o[u] = u < nvec ? (V::load(acc + c0 + u * L) * a).v : V::zero().v;
      const int64_t next_tile = j0 + NK;
      const bool short_runs = p.v.pages.rows_per_page < NK;
      const int64_t next_rows = short_runs && r == 0 && c0 == 0 ? imin(NK, imax(0, w.read_end - next_tile)) : 0;
      for (int64_t t0 = 0, n = 0; t0 < nk; t0 += n) {
        n = imin(nk - t0, p.v.run_rows(j0 + t0));
        const S* v = p.v.row(w.kv_item, j0 + t0);  // key t0 of the tile
        if (t0 < next_rows) {
          const int64_t ahead = imin(imin(n, next_rows - t0), p.k.run_rows(next_tile + t0));
          const char* k_next = reinterpret_cast<const char*>(p.k.row(w.kv_item, next_tile + t0));
          const char* v_next = reinterpret_cast<const char*>(p.v.row(w.kv_item, next_tile + t0));
          const int64_t k_step = p.k.row_stride_elements * int64_t(sizeof(S)), k_bytes = p.depth * int64_t(sizeof(S));
          const int64_t v_step = vs * int64_t(sizeof(S)), v_bytes = p.dv * int64_t(sizeof(S));
          for (int64_t t = 0; t < ahead; ++t) {
            for (int64_t offset = 0; offset < k_bytes; offset += 64) __builtin_prefetch(k_next + t * k_step + offset, 0, 1);
            for (int64_t offset = 0; offset < v_bytes; offset += 64) __builtin_prefetch(v_next + t * v_step + offset, 0, 1);
          }
        }
        if (nvec == kDvVectors && last == L) {
          for (int64_t t = t0; t < t0 + n; ++t) {
            if (kCareful && hidden[t]) continue;
            const V pt = V::set1(value_weight(w, s, t));
            const S* vr = v + (t - t0) * vs + c0;
#pragma GCC unroll 16
            for (int u = 0; u < kDvVectors; ++u) o[u] = fmadd(pt, load_as<V>(vr + u * L), V{o[u]}).v;
          }
        } else {
          for (int64_t t = t0; t < t0 + n; ++t) {
            if (kCareful && hidden[t]) continue;
            const V pt = V::set1(value_weight(w, s, t));
            const S* vr = v + (t - t0) * vs + c0;
            for (int u = 0; u < nvec; ++u)
              o[u] = fmadd(pt, u == nvec - 1 ? load_partial_as<V>(vr + u * L, last) : load_as<V>(vr + u * L), V{o[u]}).v;
          }
        }
      }
      for (int u = 0; u < nvec; ++u) V{o[u]}.store(acc + c0 + u * L);
    }
  }

  // int8 V: acc[r] = acc[r] * alpha + (sum_t s[r][t] v_scale_t V[j0 + t]), the tile's sum from zero (see
  // the header), value vectors in passes of kQuantisedDvVectors (8: each FMA needs its widened operand
  // in a register too, and 16 sums plus those spill on AVX2's 16 registers). The pass's vector count is
  // a template argument so that its sums stay in registers.
  static constexpr int kQuantisedDvVectors = L == 1 ? kDvVectors : 8;
  template <bool kCareful>
  void accumulate_quantised(const Work& w, int64_t r, T alpha, int64_t j0, int64_t nk, const bool* hidden) const {
    for (int64_t c0 = 0; c0 < p.dv; c0 += kQuantisedDvVectors * L) {
      const int64_t ncols = imin(kQuantisedDvVectors * L, p.dv - c0);
      accumulate_columns<kCareful, kQuantisedDvVectors>(static_cast<int>(ceil_div(ncols, L)), w, r, alpha, j0, nk,
                                                        c0, static_cast<int>(ncols), hidden);
    }
  }
  // Columns c0 .. c0 + ncols (N = ceil(ncols / L) vectors, found by counting down from kMax).
  template <bool kCareful, int N>
  void accumulate_columns(int nvec, const Work& w, int64_t r, T alpha, int64_t j0, int64_t nk, int64_t c0, int ncols,
                          const bool* hidden) const {
    if constexpr (N > 1) {
      if (nvec < N) {
        accumulate_columns<kCareful, N - 1>(nvec, w, r, alpha, j0, nk, c0, ncols, hidden);
        return;
      }
    }
    const int64_t vs = p.v.row_stride_elements;
    const T* s = w.s + r * NK;
    T* acc = w.acc + r * dv_pad + c0;
    const int last = ncols - (N - 1) * L;  // lanes of the last vector
    decltype(V::v) o[N];                   // native vectors: kept in registers (see microkernel.h)
#pragma GCC unroll 16
    for (int u = 0; u < N; ++u) o[u] = V::zero().v;
    // A paged V run by run, in key order (paged_rows.h): the same sums as the unpaged V's.
    for (int64_t t0 = 0, n = 0; t0 < nk; t0 += n) {
      n = imin(nk - t0, p.v.run_rows(j0 + t0));
      const S* v = p.v.row(w.kv_item, j0 + t0) + c0;  // key t0 of the tile
      for (int64_t t = t0; t < t0 + n; ++t) {
        if (kCareful && hidden[t]) continue;
        const V pt = V::set1(value_weight(w, s, t));
        const S* vr = v + (t - t0) * vs;
#pragma GCC unroll 16
        for (int u = 0; u < N - 1; ++u) o[u] = fmadd(pt, load_as<V>(vr + u * L), V{o[u]}).v;
        o[N - 1] = fmadd(pt, last == L ? load_as<V>(vr + (N - 1) * L) : load_partial_as<V>(vr + (N - 1) * L, last),
                         V{o[N - 1]}).v;
      }
    }
    const V a = V::set1(alpha);
#pragma GCC unroll 16
    for (int u = 0; u < N; ++u) fmadd(V::load(acc + u * L), a, V{o[u]}).store(acc + u * L);
  }

  void prepare(Work& w) const {
    const T c = p.v_a ? T(1) : p.scale;  // additive: folded into va_scaled instead
    if (p.v_a)
      for (int64_t a = 0; a < p.depth; ++a) w.va_scaled[a] = p.v_a[a] * p.scale;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = batch_of(w, r), i = query_of(r);
      T* qs = w.qs + r * p.depth;
      w.m[r] = neg_inf<T>();
      w.l[r] = T(0);
      for (int64_t e = 0; e < dv_pad; ++e) w.acc[r * dv_pad + e] = T(0);
      if (!live(w, r)) {  // no query to read, no key to see: the row's scores are all -inf
        for (int64_t d = 0; d < p.depth; ++d) qs[d] = T(0);
        w.lo[r] = w.hi[r] = w.j_begin;
        continue;
      }
      if (p.q_wide.data) {
        const T* q = p.q_wide.row(b, i);
        for (int64_t d = 0; d < p.depth; ++d) qs[d] = c * q[d];
      } else {
        const S* q = p.q.row(b, i);
        for (int64_t d = 0; d < p.depth; ++d) qs[d] = c * scalar_as<T>(q[d]);
      }
      int64_t lo, hi;
      visible_range(p, b, i, &lo, &hi);
      w.lo[r] = imax(lo, w.j_begin);
      w.hi[r] = imax(w.lo[r], imin(hi, w.j_end));
    }
  }

  // True when the bool mask hides keys j0 .. j0+nk from every row (padding in a KV cache): the tile
  // would leave m, l and the accumulators unchanged, so it is skipped. Stops at the first visible key.
  bool bool_mask_hides_tile(const Work& w, int64_t j0, int64_t nk) const {
    if (!p.mask.data) return false;
    const int64_t cs = p.mask.col_stride_elements;
    for (int64_t r = 0; r < rows; ++r)
      if (live(w, r) && !mask_row_hides_all(p.mask.row(batch_of(w, r), query_of(r)) + j0 * cs, cs, nk)) return false;
    return true;
  }

  // True when a row of the chunk has a NaN or infinity in its sum or accumulator (see the header).
  bool chunk_needs_care(const Work& w) const {
    for (int64_t r = 0; r < rows; ++r)
      if (w.l[r] - w.l[r] != T(0) || !all_finite<V>(w.acc + r * dv_pad, dv_pad)) return true;
    return false;
  }

  void run_chunk(Work& w) const {
    run_chunk_pass<false>(w);
    if (chunk_needs_care(w)) run_chunk_pass<true>(w);
  }

  // Out of line, as run_chunk was before the careful pass existed: inlined into run's tasks, the normal
  // pass's code is shaped by the careful one's and runs slower (docs/kernel_decisions.md).
  template <bool kCareful>
  __attribute__((noinline)) void run_chunk_pass(Work& w) const {
    prepare(w);
    int64_t first = w.j_end, last = w.j_begin;
    for (int64_t r = 0; r < rows; ++r)
      if (w.hi[r] > w.lo[r]) {
        first = imin(first, w.lo[r]);
        last = imax(last, w.hi[r]);
      }
    w.read_end = last;
    // P.V of an int8 or paged V has its own loops (accumulate_quantised, accumulate_paged), chosen here
    // so that the float loop (accumulate) keeps the code it had without them.
    const bool paged_v = p.v.paged();
    for (int64_t j0 = first; j0 < last; j0 += NK) {
      const int64_t nk = imin(NK, last - j0);
      if (bool_mask_hides_tile(w, j0, nk)) continue;  // neither K nor V of those keys is read
      score_tile(w, j0, nk);
      for (int64_t r = 0; r < rows; ++r) {
        bool hidden[kCareful ? NK : 1];
        if (kCareful)
          for (int64_t t = 0; t < nk; ++t) hidden[t] = w.s[r * NK + t] == neg_inf<T>();
        const T alpha = softmax_row(w.s + r * NK, nk, &w.m[r], &w.l[r]);
        if constexpr (kInt8Storage<S>) {
          accumulate_quantised<kCareful>(w, r, alpha, j0, nk, hidden);
        } else if (paged_v) {
          accumulate_paged<kCareful>(w, r, alpha, j0, nk, hidden);
        } else {
          accumulate<kCareful>(w, r, alpha, j0, nk, hidden);
        }
      }
    }
  }

  Work carve_work(unsigned char* scratch, int64_t kv_item, int64_t chunk) const {
    Carver carve(scratch);
    Work w;
    w.kv_item = kv_item;
    w.j_begin = chunk * chunk_len;
    w.j_end = imin(p.lk, w.j_begin + chunk_len);
    w.qs = carve.take<T>(rows * p.depth);
    w.s = carve.take<T>(rows * NK);
    w.acc = carve.take<T>(rows * dv_pad);
    w.m = carve.take<T>(rows);
    w.l = carve.take<T>(rows);
    w.lo = carve.take<int64_t>(rows);
    w.hi = carve.take<int64_t>(rows);
    w.va_scaled = carve.take<T>(p.v_a ? p.depth : 0);
    w.key_scales = carve.take<T>(kInt8Storage<S> ? NK : 0);
    w.value_scales = carve.take<T>(kInt8Storage<S> ? NK : 0);
    return w;
  }

  // Writes one finished row; keeps its final (m2, l) in row_stats[2 * (b * lq + i)] when given, for the
  // weights pass.
  // A sink is folded into (m2, l) first (fold_sink), so the weights pass sees the final state too.
  void write_row(int64_t kv_item, int64_t r, const T* acc, T m2, T l, T* row_stats) const {
    const int64_t b = kv_item * p.group + r / p.lq, i = r % p.lq;
    if (i >= item_rows(p, b)) return;
    const T keep = p.sinks ? fold_sink(p.sinks[b], &m2, &l) : T(1);
    const T lse = p.out_wide.data ? finish_row<V>(acc, m2, l, p.out_wide.row(b, i), p.dv, keep)
                                  : finish_row<V>(acc, m2, l, p.out.row(b, i), p.dv, keep);
    if (p.lse) p.lse[p.lse_batch_offset_elements[b] + i] = lse;
    if (row_stats) {
      row_stats[2 * (b * p.lq + i)] = m2;
      row_stats[2 * (b * p.lq + i) + 1] = l;
    }
  }

  // Merges the chunks of one kv item (merge_chunk_states, attention_schedule.h), a row at a time: the
  // row's accumulator in row_acc (dv_pad elements).
  void merge(int64_t kv_item, const T* partials, T* row_acc, T* row_stats) const {
    const int64_t ps = partial_stride();
    const ChunkStateLayout at{dv_pad, dv_pad + 1, dv_pad / L, L, 1};
    for (int64_t r = 0; r < rows; ++r) {
      T m2, l, factor[L];
      merge_chunk_states<V, ChunkRows::kOne>(at, partials + (kv_item * chunks * rows + r) * ps, rows * ps, chunks,
                                             &m2, &l, row_acc, factor);
      write_row(kv_item, r, row_acc, m2, l, row_stats);
    }
  }

  int run(T* row_stats) const {
    const int64_t kv_items = p.batch / p.group;
    const int64_t tasks = kv_items * chunks;
    ThreadScratch scratch(p.num_threads, scratch_bytes());
    if (!scratch.ok()) return kOutOfMemory;
    if (chunks == 1) {
      parallel_for(p.num_threads, tasks, [&](int64_t task, int slot) {
        Work w = carve_work(scratch.slice(slot), task, 0);
        run_chunk(w);
        for (int64_t r = 0; r < rows; ++r) write_row(task, r, w.acc + r * dv_pad, w.m[r], w.l[r], row_stats);
      });
      return kOk;
    }
    const int64_t ps = partial_stride();
    T* partials = static_cast<T*>(std::malloc(static_cast<size_t>(tasks * rows * ps) * sizeof(T)));
    if (!partials) return kOutOfMemory;
    parallel_for(p.num_threads, tasks, [&](int64_t task, int slot) {
      Work w = carve_work(scratch.slice(slot), task / chunks, task % chunks);
      run_chunk(w);
      for (int64_t r = 0; r < rows; ++r) {
        T* part = partials + (task * rows + r) * ps;
        for (int64_t e = 0; e < dv_pad; ++e) part[e] = w.acc[r * dv_pad + e];
        part[dv_pad] = w.m[r];
        part[dv_pad + 1] = w.l[r];
      }
    });
    parallel_for(p.num_threads, kv_items, [&](int64_t kv, int slot) {
      merge(kv, partials, reinterpret_cast<T*>(scratch.slice(slot)), row_stats);
    });
    std::free(partials);
    return kOk;
  }

  // Weights exp(s - m) / l = exp(s - lse) for every row, after (m2, l) are final (row_stats from run);
  // under a max of +inf, 1 / l (l counts them) for +inf scores and 0 for the others. In a row that a NaN
  // score made NaN, hidden keys still weigh 0.
  int write_weights(const T* row_stats) const {
    const int64_t kv_items = p.batch / p.group;
    ThreadScratch scratch(p.num_threads, scratch_bytes());
    if (!scratch.ok()) return kOutOfMemory;
    parallel_for(p.num_threads, kv_items, [&](int64_t kv, int slot) {
      Work w = carve_work(scratch.slice(slot), kv, 0);
      w.j_begin = 0;
      w.j_end = p.lk;
      prepare(w);
      // Keys from every row's hi on (past kv_lengths: perhaps no page of a paged cache) score -inf, as
      // apply_masks would make them, without being read.
      int64_t readable = 0;
      for (int64_t r = 0; r < rows; ++r) readable = imax(readable, w.hi[r]);
      w.read_end = readable;
      for (int64_t j0 = 0; j0 < p.lk; j0 += NK) {
        const int64_t nk = imin(NK, p.lk - j0), read = imax(0, imin(nk, readable - j0));
        if (read > 0) score_tile(w, j0, read);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t t = read; t < nk; ++t) w.s[r * NK + t] = neg_inf<T>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t b = batch_of(w, r), i = query_of(r);
          if (!live(w, r)) continue;
          const T m2 = row_stats[2 * (b * p.lq + i)], l = row_stats[2 * (b * p.lq + i) + 1];
          const T shift = m2 == neg_inf<T>() ? T(0) : m2;
          // l is NaN in a row a NaN score made NaN: 1 / l keeps its +inf keys' weights NaN as well.
          const V inv = V::set1(l == T(0) ? T(0) : T(1) / l);
          T* out = p.weights.row(b, i) + j0;
          const T* s = w.s + r * NK;
          for (int64_t t = 0; t < nk; t += L) {
            const int n = static_cast<int>(imin(L, nk - t));
            T e[L];
            const V x = V::load_partial(s + t, n);
            V y = exp2_nonpositive((x - V::set1(shift)) * V::set1(T(kLog2e))) * inv;
            if (m2 == pos_inf<T>() || l != l)  // rare rows: see the comment above
              y = select(cmp_eq(x, V::set1(neg_inf<T>())), V::zero(), select(cmp_eq(x, V::set1(pos_inf<T>())), inv, y));
            y.store(e);
            for (int u = 0; u < n; ++u) out[t + u] = e[u];
          }
        }
      }
    });
    return kOk;
  }
};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
