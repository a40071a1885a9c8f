// Fused attention, tiled path: the forward online softmax over a query block's key tiles, and the
// block's rows (and weights) written from its final state; a sink (AttentionParams::sinks) is folded
// into that final state (fold_sinks), after the careful pass and the key-split merge.
// dtypes: V stored in S (double, float, float16, bfloat16, int8 with per-row scales; widened, int8
// dequantised, per tile: tiled_score_tile.h), the result in S or T; exponentials, running max and sum
// and the accumulator in T = V::Scalar (double for double, else float), the output rounded once to its
// storage type in write_rows.
// ISA: the target's V; P.V runs the microkernel through panel_gemm (tiled_score_tile.h).
//
// A block walks the key tiles that any of its rows can see (tiles entirely above the causal diagonal,
// outside the window, past kv_lengths or hidden by the bool mask are never computed) and keeps, per row,
// the running max m, running sum l and an unnormalised output accumulator O^T[feature][query] (queries
// in lanes, like the score tile's S^T) in scratch. Nothing of size Lq x Lk exists. The block is
// transposed back once, when its rows are normalised and written (write_rows).
//
// Numerics: the reference max m only grows, by whole steps of more than kLazyMargin (softmax_tile), and
// the accumulator is rescaled by alpha = exp(m_old - m_new) only for rows whose m moved; each row is
// normalised once at the end. Rows with no visible key get out 0 and lse -inf (m is replaced by 0
// before subtracting, so -inf - -inf never happens). Results do not depend on the thread count.
// Hidden keys and +inf scores (attention_common.h): a block whose finished rows hold a NaN or infinity
// (block_needs_care) is accumulated once more with kCareful, where a V tile that is not all finite is
// multiplied by P only at visible (key, row) pairs (accumulate_visible) and +inf scores weigh 1 each
// under a row max of +inf. Blocks of finite rows, nearly all, pay one pass over O^T for the check.
#pragma once
#include "attnfast/params.h"
#include "kernels/attention_common.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/tiled_score_tile.h"
#include "kernels/transpose.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// A query block of the forward pass: its score tile's part, and the online softmax's state.
template <class T>
struct ForwardBlock : TileBlock<T> {
  T *acc_t, *m, *l, *alpha;  // acc_t: O^T, dv_rows x MB, unnormalised
  T* s_raw;                  // careful pass only: the tile's scores before softmax_tile turns them into P
  T *v_tile, *out_rows;      // widened V tile and the normalised rows in T, for a storage type read through T
  // The row sums for lse: l itself, except on the pair path, where l adds the rounded P that P.V
  // multiplied (the output's normaliser) and l_exp the unrounded ones, which lse needs to float32 accuracy.
  T* l_exp;
  uint32_t *p_pairs = nullptr, *v_pairs = nullptr;  // the pair path's P tile and V tile as key pairs
  // The item's whole V packed as key pairs, kept in the thread's scratch across the blocks it runs in a
  // row (nullptr: each tile packs its own), and the kv item it holds (-1: none yet; reset_scratch).
  uint32_t* v_cache = nullptr;
  int64_t* v_cache_item = nullptr;
};

template <class V, class S, int MR, int NRV>
struct TiledOnlineSoftmax : TiledScoreTile<V, S, MR, NRV> {
  using Tile = TiledScoreTile<V, S, MR, NRV>;
  using T = typename V::Scalar;
  using Block = ForwardBlock<T>;
  using Tile::L;
  using Tile::MB;
  using Tile::NK;
  using Tile::QNR;
  using Tile::p;
  using Tile::kInPlace;
  using Tile::kPairs;
  using Pairs = typename Tile::Pairs;
  static constexpr double kLazyMargin = 5.0;  // see softmax_tile: exponentials stay below e^5 ~ 148

#if defined(ATTNFAST_TARGET_AMX)
  // O^T is computed in whole AMX tiles of 16 value features (a multiple of MR).
  static constexpr int kOutRowMultiple = kAmxRows;
  static_assert(kAmxRows % MR == 0, "O^T rows: whole tiles and whole microkernel blocks");
#else
  static constexpr int kOutRowMultiple = MR;
#endif
  int64_t dv_rows;  // rows of O^T: value features rounded up to whole microkernel blocks (or AMX tiles)

  explicit TiledOnlineSoftmax(const typename Tile::Params& params)
      : Tile(params), dv_rows(round_up(imax(params.dv, 1), kOutRowMultiple)) {}

  // The online softmax's buffers in a thread's scratch (ForwardBlock: acc_t, m, l, alpha, s_raw, v_tile,
  // out_rows).
  int64_t softmax_scratch_bytes() const {
    return Carver::bytes<T>(dv_rows * MB) + Carver::bytes<T>(NK * MB) + 3 * Carver::bytes<T>(MB) +
           Carver::bytes<T>(this->kv_tiles ? NK * p.dv : 0) + Carver::bytes<T>(kInPlace ? 0 : MB * p.dv);
  }

  // Running max -inf and sum 0 for every row: nothing seen yet.
  void reset_rows(const Block& blk) const {
    for (int64_t i = 0; i < MB; ++i) {
      blk.m[i] = neg_inf<T>();
      blk.l[i] = T(0);
      if constexpr (kPairs) blk.l_exp[i] = T(0);
    }
  }

  // The online softmax over the block's key tiles: leaves O^T, m and l, unnormalised. A block with a
  // non-finite row is done again carefully (see the header comment).
  void accumulate_tiles(const Block& blk) const {
    accumulate_tiles_pass<false>(blk);
    if (!block_needs_care(blk)) return;
    reset_rows(blk);
    accumulate_tiles_pass<true>(blk);
  }

  template <bool kCareful>
  void accumulate_tiles_pass(const Block& blk) const {
#if defined(ATTNFAST_TARGET_AMX)
    const AmxTileSession tiles(blk.pairs);
#endif
    bool accumulated = false;
    for (int64_t j0 = blk.min_lo; j0 < blk.max_hi; j0 += NK) {
      const int64_t nk = imin(NK, blk.max_hi - j0);
      if (this->bool_mask_hides_tile(blk, j0, nk)) continue;
      this->score_tile(blk, j0, nk);
      if (kPairs && blk.pairs) {
        if constexpr (kPairs) softmax_tile<kCareful, true>(blk, nk);
      } else {
        softmax_tile<kCareful>(blk, nk);
      }
      if (!accumulated) {
        rescale_and_accumulate<true, kCareful>(blk, j0, nk);
        accumulated = true;
      } else {
        rescale_and_accumulate<false, kCareful>(blk, j0, nk);
      }
    }
    // No tile computed (no row sees a key): nothing wrote the accumulator, which stays 0.
    if (!accumulated)
      for (int64_t e = 0; e < dv_rows * MB; ++e) blk.acc_t[e] = T(0);
  }

  // Max over the nk keys of one vector of query lanes (s: S^T at that vector, row stride MB). Four
  // independent chains: one chain waits on each previous max, and that latency was a sixth of the
  // softmax's time.
  static V column_max(const T* s, int64_t nk) {
    const V minus_inf = V::set1(neg_inf<T>());
    V m0 = minus_inf, m1 = minus_inf, m2 = minus_inf, m3 = minus_inf;
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
      m0 = max(m0, V::load(s + j * MB));
      m1 = max(m1, V::load(s + (j + 1) * MB));
      m2 = max(m2, V::load(s + (j + 2) * MB));
      m3 = max(m3, V::load(s + (j + 3) * MB));
    }
    for (; j < nk; ++j) m0 = max(m0, V::load(s + j * MB));
    return max(max(m0, m1), max(m2, m3));
  }

  // Online softmax update for one tile: new reference max m, rescale factors alpha, P = 2^((S - m) log2 e)
  // in place, row sums. m moves only when the tile's max exceeds it by more than kLazyMargin: below
  // that, the tile's exponentials are at most e^kLazyMargin (finite, full precision) and O^T and l stay
  // consistent with the old m, so alpha is 1 and the rescale pass skips the row. Once the first tiles
  // have set m, a row rarely needs rescaling again, and the rescale pass over O^T is skipped.
  // out = O / l and lse = m + ln l do not depend on which m was used.
  // kCareful (the rerun of a block with a non-finite row): keeps the raw scores in s_raw for
  // accumulate_visible, and gives +inf scores p = 1 under a row max of +inf (the normal pass makes
  // inf - inf = NaN there, which is how such a block gets here); a row that turns +inf drops what it
  // summed under a finite max (alpha = 0).
  // kRoundP (bfloat16 pair products): P is rounded to bfloat16 before it is summed into l, so that l is
  // the sum of the very P that P.V multiplies, and stored straight as the key pairs P.V reads (p_pairs);
  // as floats too in the careful pass, for accumulate_visible. l_exp sums the unrounded P, for lse.
  template <bool kCareful, bool kRoundP = false>
  void softmax_tile(const Block& blk, int64_t nk) const {
    const V zero = V::zero(), one = V::set1(T(1));
    const V minus_inf = V::set1(neg_inf<T>()), plus_inf = V::set1(pos_inf<T>());
    const V log2e = V::set1(T(kLog2e));
    const V margin = V::set1(T(kLazyMargin));
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      const V m_old = V::load(blk.m + i0);
      const V tile_max = column_max(blk.s + i0, nk);
      // Rows that have seen no key yet take the tile's max (m_old + margin is -inf there).
      const V m_new = select(cmp_lt(m_old + margin, tile_max), tile_max, m_old);
      const V m_use = select(cmp_eq(m_new, minus_inf), zero, m_new);  // never -inf - -inf
      // Unchanged m: alpha is exactly 2^0 = 1. A row that has seen no key yet has a zero accumulator:
      // alpha = 1 spares rescaling it.
      V alpha = select(cmp_eq(m_old, minus_inf), one, exp2_nonpositive((m_old - m_use) * log2e));
      if (kCareful) alpha = select(cmp_eq(m_old, plus_inf), one, alpha);  // already +inf: inf - inf
      // p = exp of one key's scores, stored in place of them.
      const auto term = [&](int64_t j) {
        T* sj = blk.s + j * MB + i0;
        const V x = V::load(sj);
        V pj = exp2_sum_term((x - m_use) * log2e);
        if (kCareful) {
          x.store(blk.s_raw + j * MB + i0);
          pj = select(cmp_eq(x, plus_inf), one, pj);
        }
        if (!kRoundP) pj.store(sj);
        return pj;
      };
      // Two sums, even and odd keys: the adds are latency-bound otherwise.
      V sum0 = zero, sum1 = zero;
      int64_t j = 0;
      if constexpr (kRoundP) {
        V exact0 = zero, exact1 = zero;
        const auto rounded = [&](int64_t key, V& exact) {
          const V pj = term(key);
          exact = exact + pj;
          return Pairs::round(pj);
        };
        for (; j + 2 <= nk; j += 2) {
          const V even = rounded(j, exact0), odd = rounded(j + 1, exact1);
          Pairs::store_pair(even, odd, blk.p_pairs + (j / 2) * MB + i0);
          if (kCareful) {
            even.store(blk.s + j * MB + i0);
            odd.store(blk.s + (j + 1) * MB + i0);
          }
          sum0 = sum0 + even;
          sum1 = sum1 + odd;
        }
        if (j < nk) {
          const V last = rounded(j, exact0);
          Pairs::store_pair(last, zero, blk.p_pairs + (j / 2) * MB + i0);
          if (kCareful) last.store(blk.s + j * MB + i0);
          sum0 = sum0 + last;
        }
        fmadd(V::load(blk.l_exp + i0), alpha, exact0 + exact1).store(blk.l_exp + i0);
      } else {
        for (; j + 2 <= nk; j += 2) {
          sum0 = sum0 + term(j);
          sum1 = sum1 + term(j + 1);
        }
        if (j < nk) sum0 = sum0 + term(j);
      }
      fmadd(V::load(blk.l + i0), alpha, sum0 + sum1).store(blk.l + i0);
      m_new.store(blk.m + i0);
      alpha.store(blk.alpha + i0);
    }
  }

  // O^T = alpha * O^T + V_tile^T . P^T; the block's first tile writes O^T (kFirst: nothing to rescale,
  // and the accumulator needs no zeroing beforehand). kCareful: a V tile with a NaN or infinity goes
  // through accumulate_visible instead of the microkernel.
  template <bool kFirst, bool kCareful>
  void rescale_and_accumulate(const Block& blk, int64_t j0, int64_t nk) const {
    if (!kFirst) rescale(blk);
    const int64_t bkv = blk.b / p.group;
    int64_t vs = 0;
    if constexpr (kPairs) {
      if (blk.pairs) {
        if (kCareful) {
          const T* v = this->kv_tile(p.v, bkv, j0, nk, p.dv, blk.v_tile, &vs);
          if (!v_tile_finite(v, vs, nk)) {
            accumulate_visible<kFirst>(blk, v, vs, nk);
            return;
          }
        }
        Pairs::template accumulate<kFirst>(*this, blk, j0, nk);
        return;
      }
    }
    const T* v = this->kv_tile(p.v, bkv, j0, nk, p.dv, blk.v_tile, &vs);
    if (kCareful && !v_tile_finite(v, vs, nk)) {
      accumulate_visible<kFirst>(blk, v, vs, nk);
      return;
    }
    // Panel outer: the panel's P^T (nk x QNR) stays in L1 while the V tile's columns are broadcast.
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const T* pt = blk.s + panel * QNR;
      for (int64_t c0 = 0; c0 < p.dv; c0 += MR) {
        const T* a_rows[MR];  // MR value features: broadcast V[k][c0 + r], k = 0 .. nk
        clamped_rows<T, MR>(v + c0, 1, imin(MR, p.dv - c0), a_rows);
        Tile::template panel_gemm<!kFirst, false>(this->panel_vectors(blk, panel), nk, a_rows, vs, pt, MB,
                                                  blk.acc_t + c0 * MB + panel * QNR);
      }
    }
  }

  bool v_tile_finite(const T* v, int64_t vs, int64_t nk) const {
    for (int64_t j = 0; j < nk; ++j)
      if (!all_finite<V>(v + j * vs, p.dv)) return false;
    return true;
  }

  // O^T[c][i] += P^T[j][i] V[j][c] only where key j is visible to row i (its raw score, s_raw, is not
  // -inf): a hidden key's NaN or infinite V never meets the row, not even as 0 * NaN, while a visible one
  // propagates as usual. The FMAs run in key order from the same start as the microkernel's, so the
  // visible terms give bitwise what it gives. Careful pass only: the work is that of the microkernel
  // without its register blocking.
  template <bool kFirst>
  void accumulate_visible(const Block& blk, const T* v, int64_t vs, int64_t nk) const {
    const V minus_inf = V::set1(neg_inf<T>());
    for (int64_t c = 0; c < p.dv; ++c)
      for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
        T* out = blk.acc_t + c * MB + i0;
        V acc = kFirst ? V::zero() : V::load(out);
        for (int64_t j = 0; j < nk; ++j) {
          const auto hidden = cmp_eq(V::load(blk.s_raw + j * MB + i0), minus_inf);
          acc = select(hidden, acc, fmadd(V::load(blk.s + j * MB + i0), V::set1(v[j * vs + c]), acc));
        }
        acc.store(out);
      }
  }

  // True when a row of the block has a NaN or infinity in its sum l or its accumulator: a NaN or infinite
  // V (visible, or hidden and multiplied by 0), a NaN score or a +inf score (inf - inf). Padding lanes
  // past the block's rows do not count. Two sums per lane vector: the check is latency-bound otherwise.
  bool block_needs_care(const Block& blk) const {
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      V s0 = V::load(blk.l + i0), s1 = V::zero();
      int64_t c = 0;
      for (; c + 2 <= p.dv; c += 2) {
        s0 = s0 + V::load(blk.acc_t + c * MB + i0);
        s1 = s1 + V::load(blk.acc_t + (c + 1) * MB + i0);
      }
      if (c < p.dv) s0 = s0 + V::load(blk.acc_t + c * MB + i0);
      T lanes[L];
      (s0 + s1).store(lanes);
      for (int64_t u = 0; u < imin(L, blk.mb - i0); ++u)
        if (lanes[u] - lanes[u] != T(0)) return true;
    }
    return false;
  }

  // O^T *= alpha, query lanes at a time; vectors of rows whose max did not change are skipped.
  void rescale(const Block& blk) const {
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      bool unchanged = true;
      for (int64_t i = i0; i < imin(i0 + L, blk.mb); ++i) unchanged = unchanged && blk.alpha[i] == T(1);
      if (unchanged) continue;
      const V a = V::load(blk.alpha + i0);
      for (int64_t c = 0; c < p.dv; ++c) (V::load(blk.acc_t + c * MB + i0) * a).store(blk.acc_t + c * MB + i0);
    }
  }

  // Folds the call's sink into every finished row, L rows at a time: fold_sink's rule (attention_common.h)
  // with the softmax's exponential, one per row (M is m or the sink, so one of e^(m - M), e^(sink - M)
  // is 1). m, l (and l_exp) become the row's final state, which write_weights reads too; keep[i]
  // receives the factor of the row's accumulator. Rows whose max is +inf or NaN keep their state.
  void fold_sinks(const Block& blk, T* keep) const {
    const T sink = p.sinks[blk.b];
    if (sink == neg_inf<T>()) {  // weighs nothing
      for (int64_t i = 0; i < MB; ++i) keep[i] = T(1);
      return;
    }
    const V sink_v = V::set1(sink), one = V::set1(T(1)), plus_inf = V::set1(pos_inf<T>());
    const V log2e = V::set1(T(kLog2e));
    for (int64_t i0 = 0; i0 < MB; i0 += L) {
      const V m = V::load(blk.m + i0), l = V::load(blk.l + i0);
      const auto sink_above = cmp_lt(m, sink_v);  // false for a NaN m
      const V smaller = select(sink_above, m, sink_v);  // min(m, sink), -inf for a row without keys
      const V e = exp2_nonpositive((smaller - select(sink_above, sink_v, m)) * log2e);
      const V factor = select(sink_above, e, one), added = select(sink_above, one, e);
      // The lanes that change: m finite or -inf, m and l not NaN.
      const auto unchanged = [&](V folded, V old) {
        return select(cmp_eq(l, l), select(cmp_eq(m, m), select(cmp_eq(m, plus_inf), old, folded), old), old);
      };
      unchanged(factor, one).store(keep + i0);
      unchanged(fmadd(l, factor, added), l).store(blk.l + i0);
      if (blk.l_exp != blk.l) {
        const V l_exp = V::load(blk.l_exp + i0);
        unchanged(fmadd(l_exp, factor, added), l_exp).store(blk.l_exp + i0);
      }
      unchanged(select(sink_above, sink_v, m), m).store(blk.m + i0);
    }
  }

  // out[i][c] = O^T[c][i] / l[i] for the block's rows (transposing back), and each row's lse; with a
  // sink, folded into the rows first.
  void write_rows(const Block& blk) const {
    T* inv = blk.alpha;  // free once the last tile is accumulated
    if (p.sinks) {
      fold_sinks(blk, inv);
      for (int64_t i = 0; i < blk.mb; ++i) inv[i] = blk.l[i] > T(0) ? inv[i] / blk.l[i] : T(0);
    } else {
      for (int64_t i = 0; i < blk.mb; ++i) inv[i] = blk.l[i] > T(0) ? T(1) / blk.l[i] : T(0);
    }
    if (p.out_wide.data) {
      transpose_scaled<true>(blk.acc_t, MB, p.dv, blk.mb, p.out_wide.row(blk.b, blk.i_begin),
                             p.out_wide.row_stride_elements, inv, 1);
    } else if constexpr (kInPlace) {
      transpose_scaled<true>(blk.acc_t, MB, p.dv, blk.mb, p.out.row(blk.b, blk.i_begin), p.out.row_stride_elements,
                             inv, 1);
    } else {
      // Normalised rows in T first, then each rounded once to S.
      transpose_scaled<true>(blk.acc_t, MB, p.dv, blk.mb, blk.out_rows, p.dv, inv, 1);
      const V one = V::set1(T(1));
      for (int64_t i = 0; i < blk.mb; ++i)
        store_row_scaled<V>(blk.out_rows + i * p.dv, p.dv, one, p.out.row(blk.b, blk.i_begin + i));
    }
    if (p.lse)
      for (int64_t i = 0; i < blk.mb; ++i)
        p.lse[p.lse_batch_offset_elements[blk.b] + blk.i_begin + i] = row_lse(blk.m[i], blk.l_exp[i]);
  }

  // Attention weights exp(s - m) / l = exp(s - lse) of the block's rows, only when the caller asked.
  // Uses m and l separately, not lse: for huge scores (1e30) m + log(l) rounds back to m.
  // Rare rows, found once per block (special): a row whose max is +inf gives each +inf score 1 / l (l
  // counts them) and every other key 0; in a row that a NaN score made NaN, hidden keys still weigh 0.
  void write_weights(const Block& blk) const {
    const V log2e = V::set1(T(kLog2e)), plus_inf = V::set1(pos_inf<T>()), minus_inf = V::set1(neg_inf<T>());
    bool special = false;
    for (int64_t i = 0; i < blk.mb; ++i) special = special || blk.m[i] == pos_inf<T>() || blk.l[i] != blk.l[i];
#if defined(ATTNFAST_TARGET_AMX)
    const AmxTileSession tiles(blk.pairs);
#endif
    for (int64_t j0 = 0; j0 < p.lk; j0 += NK) {
      const int64_t nk = imin(NK, p.lk - j0);
      const bool any_visible = j0 < blk.max_hi && j0 + nk > blk.min_lo;
      // Keys from max_hi on (past kv_lengths: perhaps no page of a paged cache) weigh 0 unread.
      const int64_t read = any_visible ? imin(nk, blk.max_hi - j0) : 0;
      if (any_visible) {
        this->score_tile(blk, j0, read);
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
          // Rows without a visible key have m = -inf and l = 0; their scores are -inf: give 0, not NaN.
          const V m = V::load(blk.m + i0);
          const V shift = select(cmp_eq(m, V::set1(neg_inf<T>())), V::zero(), m);
          const V l = V::load(blk.l + i0);
          const V inv = select(cmp_eq(l, V::zero()), V::zero(), V::set1(T(1)) / l);
          for (int64_t j = 0; j < read; ++j) {
            const V x = V::load(blk.s + j * MB + i0);
            V e = exp2_nonpositive((x - shift) * log2e);
            if constexpr (kPairs) e = blk.pairs ? Pairs::round(e) : e;  // the P that P.V multiplied
            V w = e * inv;
            if (special) w = select(cmp_eq(x, minus_inf), V::zero(), select(cmp_eq(x, plus_inf), inv, w));
            w.store(blk.s + j * MB + i0);
          }
        }
      }
      for (int64_t i = 0; i < blk.mb; ++i) {
        T* w = p.weights.row(blk.b, blk.i_begin + i) + j0;
        for (int64_t j = 0; j < nk; ++j) w[j] = j < read ? blk.s[j * MB + i] : T(0);
      }
    }
  }
};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
