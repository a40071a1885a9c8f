// Fused attention backward (FlashAttention-2 style) for dot-product scores, tiled: the work of one
// (query block, key tile) pair and the task bodies built from it. The schedule that runs them is in
// attention_backward.h.
// dtypes: K and V stored in S (double, float, float16, bfloat16), Q, O and dO in S or T, lse, bias and
// every gradient in T = V::Scalar (double for double, else float); 16-bit operands are widened exactly
// to T per tile or block (kv_tile, as in the forward) and everything is computed in T.
// ISA: the target's V. The two products whose result has queries in lanes (S^T = K Q^T, dP^T = V dO^T)
// run the forward's microkernel through panel_gemm; the three whose result has features in lanes
// (dV += P^T dO, dK += dS^T Q, dQ += dS K) run accumulate_product below.
//
// Layout: as in the forward, a query block's score tile is S^T[key][query] (NK x MB, queries in SIMD
// lanes), recomputed by the forward's own TiledScoreTile::score_tile, so bias, bool mask, causal,
// window and kv_lengths hide exactly the keys the forward hid, and a tile hidden from every row of the
// block is skipped. Then, lane-wise:
//   P^T  = exp(S^T - lse)                        (lse of each query lane)
//   dP^T = V_tile . dO^T                         (dO^T packed per query block like the queries)
//   dS^T = P^T * (dP^T - delta)                  (delta_i = dO_i . O_i, computed once per row)
// and dV += P^T dO, dK += dS^T Q, dQ += dS K_tile. `scale` is applied once to each finished dK tile and
// dQ row (s = (scale q).k, so both gradients carry one factor scale).
// Score modifiers: score_tile applies softcap and ALiBi as the forward does; a sink needs nothing more,
// since the saved lse includes it. Under a softcap, dS (dscores, the bias's gradient) is kept in
// ds_bias and dK, dQ chain dS (1 - tanh^2) (cap_slope, which score_tile fills).
//
// Numerics and edge rules (the contract of AttentionBackwardParams):
//   - A hidden key has S = -inf exactly (apply_masks), so P = 0, and dS is *selected* to 0 there (never
//     P * (dP - delta): a NaN or infinite V row of a hidden key makes dP NaN). dV and dK of such a key
//     are then sums of exact zeros. dQ multiplies dS by the K tile, where 0 * NaN would be NaN: a K tile
//     that is not all finite goes through accumulate_dq_visible, which adds a (key, row) term only where
//     the key is visible.
//   - A row with no visible key has lse = -inf: its scores are all -inf, the shift is replaced by 0
//     (never -inf - -inf), P = 0 and dS = 0: zero gradients.
//   - Likewise dK and dV multiply dS and P by the block's Q and dO rows: a block with a NaN or infinite
//     Q or dO row (garbage in a row that sees no key, say) adds its (key, row) terms only where the key
//     is visible to the row (accumulate_keys_visible), so such a row reaches only the keys it sees.
//   - A row whose lse is +inf (an overflowed or +inf score) has, as in the forward, weight 1 / count on
//     its +inf scores and 0 elsewhere; its dS is 0 (the softmax is flat there). The count is found once
//     per row before the tiles run (the schedule's prepare pass) and kept where delta would be.
//   - Sums: dV, dK over the query blocks and dQ over the key tiles, each a chain of microkernel sums in
//     a fixed order that depends on the shape only, never on the thread count.
#pragma once
#include <type_traits>

#include "attnfast/params.h"
#include "kernels/attention_common.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/microkernel.h"
#include "kernels/storage.h"
#include "kernels/tiled_score_tile.h"
#include "kernels/transpose.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// C[r][0 .. width) += sum_k A(r, k) B(k, 0 .. width) for r < rows <= MR and width <= NV lanes-vectors,
// A(r, k) = a_rows[r][k * a_k_stride] broadcast, B(k, :) = b + k * b_k_stride. With kTail the last
// vector holds tail_lanes lanes only (B, C loaded and C stored masked), so C may be an output row's
// unpadded end. Rows past `rows` are computed from a repeated A row (clamped_rows) and never stored.
template <class V, int MR, int NV, bool kTail>
inline void accumulate_rows_kernel(int64_t depth, const typename V::Scalar* const* a_rows, int64_t a_k_stride,
                                   const typename V::Scalar* b, int64_t b_k_stride, int tail_lanes, int64_t rows,
                                   typename V::Scalar* c, int64_t c_row_stride) {
  using T = typename V::Scalar;
  using Native = decltype(V::v);
  constexpr int L = V::kLanes;
  const auto load_c = [&](int r, int n) {
    const T* at = c + r * c_row_stride + n * L;
    return (kTail && n == NV - 1) ? V::load_partial(at, tail_lanes) : V::load(at);
  };
  Native acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) acc[r][n] = r < rows ? load_c(r, n).v : V::zero().v;
  const T* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r] = a_rows[r];
  for (int64_t k = 0; k < depth; ++k) {
    V bv[NV];
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n)
      bv[n] = (kTail && n == NV - 1) ? V::load_partial(b + n * L, tail_lanes) : V::load(b + n * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V av = V::broadcast(a[r] + k * a_k_stride);
#pragma GCC unroll 16
      for (int n = 0; n < NV; ++n) acc[r][n] = fmadd(av, bv[n], V{acc[r][n]}).v;
    }
    b += b_k_stride;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) {
      T* at = c + r * c_row_stride + n * L;
      if (kTail && n == NV - 1) {
        V{acc[r][n]}.store_partial(at, tail_lanes);
      } else {
        V{acc[r][n]}.store(at);
      }
    }
  }
}

// The last, narrower panel of accumulate_product: nv <= N vectors, the last one tail_lanes wide.
template <class V, int MR, int N>
inline void accumulate_rows_tail(int nv, int64_t depth, const typename V::Scalar* const* a_rows, int64_t a_k_stride,
                                 const typename V::Scalar* b, int64_t b_k_stride, int tail_lanes, int64_t rows,
                                 typename V::Scalar* c, int64_t c_row_stride) {
  if (nv == N) {
    accumulate_rows_kernel<V, MR, N, true>(depth, a_rows, a_k_stride, b, b_k_stride, tail_lanes, rows, c, c_row_stride);
  } else if constexpr (N > 1) {
    accumulate_rows_tail<V, MR, N - 1>(nv, depth, a_rows, a_k_stride, b, b_k_stride, tail_lanes, rows, c, c_row_stride);
  }
}

// C (rows x width) += A (rows x depth) . B (depth x width), features in lanes:
//   A(r, k) = a[r * a_row_stride + k * a_k_stride], B(k, c) = b[k * b_row_stride + c],
//   C(r, c) = c[r * c_row_stride + c], unit column strides for B and C.
// Panels of NV vectors of features outer (a panel of B stays in L1 while the rows of A stream by), MR
// rows inner; each element is one FMA chain over k, continued from C.
template <class V, int MR, int NV>
inline void accumulate_product(int64_t rows, int64_t depth, int64_t width, const typename V::Scalar* a,
                               int64_t a_row_stride, int64_t a_k_stride, const typename V::Scalar* b,
                               int64_t b_row_stride, typename V::Scalar* c, int64_t c_row_stride) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  constexpr int NR = NV * L;
  for (int64_t c0 = 0; c0 < width; c0 += NR) {
    const int64_t w = imin(NR, width - c0);
    const int nv = static_cast<int>(ceil_div(w, L));
    const int tail = static_cast<int>(w - (nv - 1) * L);
    for (int64_t r0 = 0; r0 < rows; r0 += MR) {
      const T* a_rows[MR];
      const int64_t valid = imin(MR, rows - r0);
      clamped_rows<T, MR>(a + r0 * a_row_stride, a_row_stride, valid, a_rows);
      T* out = c + r0 * c_row_stride + c0;
      if (w == NR) {
        accumulate_rows_kernel<V, MR, NV, false>(depth, a_rows, a_k_stride, b + c0, b_row_stride, L, valid, out,
                                                 c_row_stride);
      } else {
        accumulate_rows_tail<V, MR, NV>(nv, depth, a_rows, a_k_stride, b + c0, b_row_stride, tail, valid, out,
                                        c_row_stride);
      }
    }
  }
}

// rows x cols elements (row_stride apart) set to 0, or multiplied by `factor`.
template <class V>
inline void zero_rows(typename V::Scalar* first, int64_t row_stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    typename V::Scalar* row = first + r * row_stride;
    for (int64_t c = 0; c < cols; ++c) row[c] = 0;
  }
}
template <class V>
inline void scale_rows(typename V::Scalar* first, int64_t row_stride, int64_t rows, int64_t cols,
                       typename V::Scalar factor) {
  for (int64_t r = 0; r < rows; ++r) {
    typename V::Scalar* row = first + r * row_stride;
    store_row_scaled<V>(row, cols, V::set1(factor), row);
  }
}

// A query block of the backward pass: its score tile's part (TileBlock) and the gradient tiles.
template <class T>
struct BackwardBlock : TileBlock<T> {
  T* pt;                      // P^T, NK x MB
  T* dst;                     // dP^T, turned into dS^T in place, NK x MB
  T* dout_pack;               // dO^T in panels of QNR query lanes, like qpack (unscaled)
  T *q_buffer, *dout_buffer;  // the block's Q and dO rows widened to T, where memory does not hold T
  T* v_tile;                  // a widened V tile, for a storage type read through T
  T *lse_lanes, *term_lanes;  // the rows' lse and delta (or +inf weight), 0 past the block's rows
  const T* q_t = nullptr;     // the block's Q rows in T (in place or q_buffer), q_stride apart
  const T* dout_t = nullptr;  // the block's dO rows in T, dout_stride apart
  int64_t q_stride = 0, dout_stride = 0;
  bool special = false;  // a row of the block has lse = +inf
  bool rows_finite = true;  // the block's Q and dO rows hold only finite values
  T* ds_bias = nullptr;     // under a softcap with dscores: dS^T before the cap's chain rule (NK x MB)
};

template <class V, class S, int MR, int NRV, int RMR, int RNV>
struct TiledBackward : TiledScoreTile<V, S, MR, NRV> {
  using Tile = TiledScoreTile<V, S, MR, NRV>;
  using T = typename V::Scalar;
  using Block = BackwardBlock<T>;
  using Params = AttentionBackwardParams<S, T>;
  using Tile::kInPlace;
  using Tile::L;
  using Tile::MB;
  using Tile::NK;
  using Tile::p;
  using Tile::QNR;
  // Keys per key block: the unit of the dK / dV tasks, whole key tiles. A query block's rows are packed
  // once per key block and reused by its tiles.
  static constexpr int64_t kKeyBlock = 8 * NK;

  const Params& bp;
  // Per query row (b * lq + i): delta_i = dO_i . O_i, or, for a row whose lse is +inf, the weight
  // 1 / count of its +inf scores (such a row's dS is 0, so its delta is never needed). Filled by
  // prepare_block before any tile runs.
  T* row_terms;

  TiledBackward(const Params& params, T* terms) : Tile(params.forward), bp(params), row_terms(terms) {}

  int64_t kv_items() const { return p.batch / p.group; }
  int64_t query_blocks() const { return ceil_div(p.lq, int64_t(MB)); }
  int64_t key_blocks() const { return ceil_div(p.lk, kKeyBlock); }

  int64_t scratch_bytes() const {
    const int64_t widened_rows = kInPlace ? 0 : MB * (p.depth + p.dv);
    return this->tile_scratch_bytes() + 2 * Carver::bytes<T>(NK * MB) + Carver::bytes<T>(MB * p.dv) +
           Carver::bytes<T>(widened_rows) + Carver::bytes<T>(kInPlace ? 0 : NK * p.dv) + 2 * Carver::bytes<T>(MB) +
           Carver::bytes<T>(capped() ? NK * MB : 0) + Carver::bytes<T>(capped() && bp.dscores.data ? NK * MB : 0);
  }
  bool capped() const { return p.softcap > T(0); }

  // The block's buffers in one thread's scratch.
  Block carve(unsigned char* scratch) const {
    Carver carve(scratch);
    Block blk;
    blk.qpack = carve.take<T>(MB * p.depth);
    blk.s = carve.take<T>(NK * MB);
    blk.va_scaled = carve.take<T>(0);
    blk.bias_t = carve.take<T>(p.bias.data || p.mask.data ? NK * MB : 0);
    blk.mask_rows = carve.take<T>(p.mask.data ? MB * NK : 0);
    blk.lo = carve.take<int64_t>(MB);
    blk.hi = carve.take<int64_t>(MB);
    blk.k_tile = carve.take<T>(kInPlace ? 0 : NK * p.depth);
    blk.q_rows = carve.take<T>(kInPlace ? 0 : QNR * p.depth);
    blk.pt = carve.take<T>(NK * MB);
    blk.dst = carve.take<T>(NK * MB);
    blk.dout_pack = carve.take<T>(MB * p.dv);
    blk.q_buffer = carve.take<T>(kInPlace ? 0 : MB * (p.depth + p.dv));
    blk.dout_buffer = blk.q_buffer + (kInPlace ? 0 : MB * p.depth);
    blk.v_tile = carve.take<T>(kInPlace ? 0 : NK * p.dv);
    blk.lse_lanes = carve.take<T>(MB);
    blk.term_lanes = carve.take<T>(MB);
    if (capped()) {
      blk.cap_slope = carve.take<T>(NK * MB);
      if (bp.dscores.data) blk.ds_bias = carve.take<T>(NK * MB);
    }
    return blk;
  }

  // Sets the block to rows [i_begin, i_begin + MB) of item b and keys [j_begin, j_end); false when no
  // row of it sees any of those keys (nothing to do).
  bool start(Block& blk, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end) const {
    this->begin_block(blk, b, i_begin, j_begin, j_end, false);
    return blk.max_hi > blk.min_lo;
  }

  // True when no row of the block sees a key of tile [j0, j0 + nk).
  bool tile_hidden(const Block& blk, int64_t j0, int64_t nk) const {
    return j0 >= blk.max_hi || j0 + nk <= blk.min_lo || this->bool_mask_hides_tile(blk, j0, nk);
  }

  const T* lse_row(int64_t b) const { return p.lse + p.lse_batch_offset_elements[b]; }
  T* terms_row(int64_t b) const { return row_terms + b * p.lq; }

  // Rows [i, i + rows) (`cols` features) of an operand stored in S (`stored`) or in T (`wide`), in T:
  // in place, or widened into `buffer`.
  template <class Wide>
  const T* rows_in_t(const Operand<const S>& stored, const Wide& wide, int64_t b, int64_t i, int64_t rows,
                     int64_t cols, T* buffer, int64_t* stride) const {
    if (wide.data) {
      *stride = wide.row_stride_elements;
      return wide.row(b, i);
    }
    if constexpr (kInPlace) {
      (void)rows;
      (void)cols;
      (void)buffer;
      *stride = stored.row_stride_elements;
      return stored.row(b, i);
    } else {
      for (int64_t r = 0; r < rows; ++r) widen_row<V>(stored.row(b, i + r), cols, buffer + r * cols);
      *stride = cols;
      return buffer;
    }
  }

  // What every tile of a started block reads: the packed queries, the Q and dO rows in T, dO^T packed,
  // and the rows' lse and delta as lanes.
  void load_rows(Block& blk) const {
    this->pack_queries(blk);
    blk.q_t = rows_in_t(p.q, p.q_wide, blk.b, blk.i_begin, blk.mb, p.depth, blk.q_buffer, &blk.q_stride);
    blk.dout_t =
        rows_in_t(bp.dout, bp.dout_wide, blk.b, blk.i_begin, blk.mb, p.dv, blk.dout_buffer, &blk.dout_stride);
    const T one = T(1);
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      T* dst = blk.dout_pack + panel * p.dv * QNR;
      const int64_t rows = imin(QNR, blk.mb - panel * QNR);
      transpose_scaled(blk.dout_t + panel * QNR * blk.dout_stride, blk.dout_stride, rows, p.dv, dst, QNR, &one, 0);
      if (rows < QNR)
        for (int64_t c = 0; c < p.dv; ++c)
          for (int64_t lane = rows; lane < QNR; ++lane) dst[c * QNR + lane] = T(0);
    }
    const T* lse = lse_row(blk.b) + blk.i_begin;
    const T* terms = terms_row(blk.b) + blk.i_begin;
    blk.rows_finite = true;
    for (int64_t i = 0; i < blk.mb; ++i)
      blk.rows_finite = blk.rows_finite && all_finite<V>(blk.q_t + i * blk.q_stride, p.depth) &&
                        all_finite<V>(blk.dout_t + i * blk.dout_stride, p.dv);
    blk.special = false;
    for (int64_t i = 0; i < MB; ++i) {
      blk.lse_lanes[i] = i < blk.mb ? lse[i] : T(0);
      blk.term_lanes[i] = i < blk.mb ? terms[i] : T(0);
      blk.special = blk.special || blk.lse_lanes[i] == pos_inf<T>();
    }
  }

  // ---- One (query block, key tile) pair ----

  // S^T (with every mask), P^T and dS^T of keys [j0, j0 + nk) for the block's rows.
  void gradient_tile(const Block& blk, int64_t j0, int64_t nk) const {
    this->score_tile(blk, j0, nk);
    value_products(blk, j0, nk);
    probabilities_and_dscores(blk, nk);
  }

  // dP^T = V_tile . dO^T, laid out as S^T: the forward's score product with V for K and dO for Q.
  void value_products(const Block& blk, int64_t j0, int64_t nk) const {
    int64_t vs = 0;
    const T* v = this->kv_tile(p.v, blk.b / p.group, j0, nk, p.dv, blk.v_tile, &vs);
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const T* dpanel = blk.dout_pack + panel * p.dv * QNR;
      for (int64_t jj = 0; jj < nk; jj += MR) {
        const T* a_rows[MR];
        clamped_rows<T, MR>(v + jj * vs, vs, imin(MR, nk - jj), a_rows);
        Tile::template panel_gemm<false, true>(this->panel_vectors(blk, panel), p.dv, a_rows, 1, dpanel, QNR,
                                               blk.dst + jj * MB + panel * QNR);
      }
    }
  }

  // P^T = exp(S^T - lse) and dS^T = P^T (dP^T - delta), selected to 0 where the key is hidden (S = -inf)
  // whatever dP holds. Rows with lse = +inf (special): P = their weight on +inf scores, 0 elsewhere,
  // dS = 0. Lanes past the block's rows compute something finite or not; nothing reads them.
  // Under a softcap, dS (the bias's gradient) goes to ds_bias for dscores, and dst gets the gradient of
  // the raw score, dS (1 - tanh^2), which dK and dQ chain on.
  void probabilities_and_dscores(const Block& blk, int64_t nk) const {
    if (blk.cap_slope) {
      probabilities_and_dscores<true>(blk, nk);
    } else {
      probabilities_and_dscores<false>(blk, nk);
    }
  }
  template <bool kCapped>
  void probabilities_and_dscores(const Block& blk, int64_t nk) const {
    const V zero = V::zero(), minus_inf = V::set1(neg_inf<T>()), plus_inf = V::set1(pos_inf<T>());
    const V log2e = V::set1(T(kLog2e));
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      const V lse = V::load(blk.lse_lanes + i0);
      const V shift = select(cmp_eq(lse, minus_inf), zero, lse);  // never -inf - -inf
      const V delta = V::load(blk.term_lanes + i0);
      for (int64_t j = 0; j < nk; ++j) {
        const V s = V::load(blk.s + j * MB + i0);
        V pj = exp2_bounded_above((s - shift) * log2e);
        V ds = select(cmp_eq(s, minus_inf), zero, pj * (V::load(blk.dst + j * MB + i0) - delta));
        if (blk.special) {
          const auto inf_row = cmp_eq(lse, plus_inf);
          pj = select(inf_row, select(cmp_eq(s, plus_inf), delta, zero), pj);
          ds = select(inf_row, zero, ds);
        }
        pj.store(blk.pt + j * MB + i0);
        if constexpr (kCapped) {
          if (blk.ds_bias) ds.store(blk.ds_bias + j * MB + i0);
          ds = select(cmp_eq(s, minus_inf), zero, ds * V::load(blk.cap_slope + j * MB + i0));  // 0 * NaN
        }
        ds.store(blk.dst + j * MB + i0);
      }
    }
  }

  // dV[j] += sum_i P^T[j][i] dO[i] for the tile's keys (rows of kv item bkv's dv).
  void accumulate_dv(const Block& blk, int64_t j0, int64_t nk) const {
    const Operand<T>& dv = bp.dv;
    if (!blk.rows_finite) {
      accumulate_keys_visible(blk, nk, blk.pt, blk.dout_t, blk.dout_stride, p.dv, dv.row(blk.b / p.group, j0),
                              dv.row_stride_elements);
      return;
    }
    accumulate_product<V, RMR, RNV>(nk, blk.mb, p.dv, blk.pt, MB, 1, blk.dout_t, blk.dout_stride,
                                    dv.row(blk.b / p.group, j0), dv.row_stride_elements);
  }

  // dK[j] += sum_i dS^T[j][i] Q[i] (unscaled: the key tile is scaled once, when finished).
  void accumulate_dk(const Block& blk, int64_t j0, int64_t nk) const {
    const Operand<T>& dk = bp.dk;
    if (!blk.rows_finite) {
      accumulate_keys_visible(blk, nk, blk.dst, blk.q_t, blk.q_stride, p.depth, dk.row(blk.b / p.group, j0),
                              dk.row_stride_elements);
      return;
    }
    accumulate_product<V, RMR, RNV>(nk, blk.mb, p.depth, blk.dst, MB, 1, blk.q_t, blk.q_stride,
                                    dk.row(blk.b / p.group, j0), dk.row_stride_elements);
  }

  // out[j] += sum_i W^T[j][i] rows[i] (`cols` features) only for rows i that see key j: the careful dK
  // (W = dS) and dV (W = P) of a block with a non-finite Q or dO row. Rare; features in lanes.
  void accumulate_keys_visible(const Block& blk, int64_t nk, const T* wt, const T* rows, int64_t row_stride,
                               int64_t cols, T* out, int64_t out_stride) const {
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t i = 0; i < blk.mb; ++i)
        if (blk.s[j * MB + i] != neg_inf<T>())
          add_scaled_row(wt[j * MB + i], rows + i * row_stride, cols, out + j * out_stride);
  }

  // dst[0 .. cols) += w src[0 .. cols), one FMA per element.
  static void add_scaled_row(T w, const T* src, int64_t cols, T* dst) {
    const V wv = V::set1(w);
    int64_t c = 0;
    for (; c + L <= cols; c += L) fmadd(wv, V::load(src + c), V::load(dst + c)).store(dst + c);
    if (c < cols) {
      const int tail = static_cast<int>(cols - c);
      fmadd(wv, V::load_partial(src + c, tail), V::load_partial(dst + c, tail)).store_partial(dst + c, tail);
    }
  }

  // True when keys [j0, j0 + nk) of kv item bkv have only finite K values (widened into the block's
  // k_tile for a 16-bit K).
  bool k_tile_finite(const Block& blk, int64_t bkv, int64_t j0, int64_t nk) const {
    int64_t ks = 0;
    const T* k = this->kv_tile(p.k, bkv, j0, nk, p.depth, blk.k_tile, &ks);
    for (int64_t j = 0; j < nk; ++j)
      if (!all_finite<V>(k + j * ks, p.depth)) return false;
    return true;
  }

  // dQ[i] += sum_j dS[i][j] K[j] (unscaled), the K tile in T as score_tile left it (in place, or widened
  // into k_tile). A tile with a NaN or infinite K row (k_finite false) goes through
  // accumulate_dq_visible.
  void accumulate_dq(const Block& blk, int64_t j0, int64_t nk, bool k_finite) const {
    int64_t ks = p.depth;
    const T* k = blk.k_tile;
    if constexpr (kInPlace) {
      ks = p.k.row_stride_elements;
      k = p.k.row(blk.b / p.group, j0);
    }
    T* dq = bp.dq.row(blk.b, blk.i_begin);
    const int64_t dqs = bp.dq.row_stride_elements;
    if (!k_finite) {
      accumulate_dq_visible(blk, k, ks, nk, dq, dqs);
      return;
    }
    accumulate_product<V, RMR, RNV>(blk.mb, nk, p.depth, blk.dst, 1, MB, k, ks, dq, dqs);
  }

  // dQ[i] += dS[i][j] K[j] only for keys j visible to row i: a hidden key's NaN or infinite K never meets
  // the row, not even as 0 * NaN, while a visible one propagates as usual. Rare; features in lanes.
  void accumulate_dq_visible(const Block& blk, const T* k, int64_t ks, int64_t nk, T* dq, int64_t dqs) const {
    for (int64_t i = 0; i < blk.mb; ++i) {
      T* row = dq + i * dqs;
      for (int64_t j = 0; j < nk; ++j)
        if (blk.s[j * MB + i] != neg_inf<T>()) add_scaled_row(blk.dst[j * MB + i], k + j * ks, p.depth, row);
    }
  }

  // dscores rows of the block, keys [j0, j0 + nk): dS^T transposed (0 where hidden).
  void write_dscores(const Block& blk, int64_t j0, int64_t nk) const {
    const T one = T(1);
    transpose_scaled(blk.ds_bias ? blk.ds_bias : blk.dst, MB, nk, blk.mb, bp.dscores.row(blk.b, blk.i_begin) + j0,
                     bp.dscores.row_stride_elements, &one, 0);
  }

  // ---- Task bodies (attention_backward.h runs them) ----

  // Before any tile: each row's delta (or +inf weight), and zeroed dQ and dscores rows of the block.
  void prepare_block(unsigned char* scratch, int64_t b, int64_t i_begin) const {
    const int64_t rows = imin(MB, p.lq - i_begin);
    const T* lse = lse_row(b) + i_begin;
    T* terms = terms_row(b) + i_begin;
    bool special = false;
    for (int64_t i = 0; i < rows; ++i) {
      terms[i] = output_dot_dout(b, i_begin + i);
      special = special || lse[i] == pos_inf<T>();
    }
    zero_rows<V>(bp.dq.row(b, i_begin), bp.dq.row_stride_elements, rows, p.depth);
    if (bp.dscores.data) zero_rows<V>(bp.dscores.row(b, i_begin), bp.dscores.row_stride_elements, rows, p.lk);
    if (special) count_infinite_scores(scratch, b, i_begin);
  }

  // delta_i = dO_i . O_i in T, one vector chain per lane, then the lanes added (a fixed order).
  T output_dot_dout(int64_t b, int64_t i) const {
    const auto dot = [&](const auto* o, const auto* d) {
      V acc = V::zero();
      int64_t c = 0;
      for (; c + L <= p.dv; c += L) acc = fmadd(load_as<V>(o + c), load_as<V>(d + c), acc);
      if (c < p.dv) {
        const int tail = static_cast<int>(p.dv - c);
        acc = fmadd(load_partial_as<V>(o + c, tail), load_partial_as<V>(d + c, tail), acc);
      }
      return reduce_add(acc);
    };
    const auto with_dout = [&](const auto* o) {
      return bp.dout_wide.data ? dot(o, bp.dout_wide.row(b, i)) : dot(o, bp.dout.row(b, i));
    };
    return p.out_wide.data ? with_dout(p.out_wide.row(b, i)) : with_dout(static_cast<const S*>(p.out.row(b, i)));
  }

  // Rows of the block whose lse is +inf: terms = 1 / (their number of +inf scores), the forward's weight.
  void count_infinite_scores(unsigned char* scratch, int64_t b, int64_t i_begin) const {
    Block blk = carve(scratch);
    if (!start(blk, b, i_begin, 0, p.lk)) return;
    this->pack_queries(blk);
    const T* lse = lse_row(b) + i_begin;
    T* counts = blk.term_lanes;
    for (int64_t i = 0; i < blk.mb; ++i) counts[i] = T(0);
    for (int64_t j0 = blk.min_lo; j0 < blk.max_hi; j0 += NK) {
      const int64_t nk = imin(NK, blk.max_hi - j0);
      if (this->bool_mask_hides_tile(blk, j0, nk)) continue;
      this->score_tile(blk, j0, nk);
      for (int64_t i = 0; i < blk.mb; ++i)
        if (lse[i] == pos_inf<T>())
          for (int64_t j = 0; j < nk; ++j) counts[i] += blk.s[j * MB + i] == pos_inf<T>() ? T(1) : T(0);
    }
    T* terms = terms_row(b) + i_begin;
    for (int64_t i = 0; i < blk.mb; ++i)
      if (lse[i] == pos_inf<T>()) terms[i] = counts[i] > T(0) ? T(1) / counts[i] : T(0);
  }

  // dK and dV of the key block at j0 (kKeyBlock keys, whole key tiles) of kv item bkv, from every query
  // row of its `group` items (query blocks in order, each over the block's tiles in order); with
  // `with_dq` also those rows' dQ contributions and dscores. A query block's rows are packed once per
  // key block, not per tile.
  void run_key_block(unsigned char* scratch, int64_t bkv, int64_t j0, bool with_dq) const {
    const int64_t j1 = imin(p.lk, j0 + kKeyBlock);
    zero_rows<V>(bp.dk.row(bkv, j0), bp.dk.row_stride_elements, j1 - j0, p.depth);
    zero_rows<V>(bp.dv.row(bkv, j0), bp.dv.row_stride_elements, j1 - j0, p.dv);
    Block blk = carve(scratch);
    bool k_finite[kKeyBlock / NK];
    if (with_dq)
      for (int64_t jt = j0; jt < j1; jt += NK)
        k_finite[(jt - j0) / NK] = k_tile_finite(blk, bkv, jt, imin(NK, j1 - jt));
    for (int64_t t = 0; t < p.group; ++t) {
      const int64_t b = bkv * p.group + t;
      for (int64_t ib = 0; ib < query_blocks(); ++ib) {
        if (!start(blk, b, ib * MB, j0, j1)) continue;
        bool loaded = false;
        for (int64_t jt = j0; jt < j1; jt += NK) {
          const int64_t nk = imin(NK, j1 - jt);
          if (tile_hidden(blk, jt, nk)) continue;
          if (!loaded) load_rows(blk);
          loaded = true;
          gradient_tile(blk, jt, nk);
          accumulate_dv(blk, jt, nk);
          accumulate_dk(blk, jt, nk);
          if (with_dq) {
            accumulate_dq(blk, jt, nk, k_finite[(jt - j0) / NK]);
            if (bp.dscores.data) write_dscores(blk, jt, nk);
          }
        }
      }
    }
    scale_rows<V>(bp.dk.row(bkv, j0), bp.dk.row_stride_elements, j1 - j0, p.depth, p.scale);
  }

  // Everything of kv item bkv: its key tiles in order, each with dQ (so dQ sums the tiles in key order),
  // then its rows' dQ scaled.
  void run_kv_item(unsigned char* scratch, int64_t bkv) const {
    for (int64_t j0 = 0; j0 < p.lk; j0 += kKeyBlock) run_key_block(scratch, bkv, j0, true);
    for (int64_t t = 0; t < p.group; ++t)
      scale_rows<V>(bp.dq.row(bkv * p.group + t, 0), bp.dq.row_stride_elements, p.lq, p.depth, p.scale);
  }

  // dQ (and dscores) of one query block from every key tile it sees, in key order; then scaled.
  void run_query_block(unsigned char* scratch, int64_t b, int64_t i_begin) const {
    Block blk = carve(scratch);
    if (start(blk, b, i_begin, 0, p.lk)) {
      load_rows(blk);
      for (int64_t j0 = blk.min_lo; j0 < blk.max_hi; j0 += NK) {
        const int64_t nk = imin(NK, blk.max_hi - j0);
        if (this->bool_mask_hides_tile(blk, j0, nk)) continue;
        gradient_tile(blk, j0, nk);
        accumulate_dq(blk, j0, nk, k_tile_finite(blk, blk.b / p.group, j0, nk));
        if (bp.dscores.data) write_dscores(blk, j0, nk);
      }
    }
    scale_rows<V>(bp.dq.row(b, i_begin), bp.dq.row_stride_elements, imin(MB, p.lq - i_begin), p.depth, p.scale);
  }
};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
