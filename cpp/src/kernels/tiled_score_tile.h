// Fused attention, tiled path: a query block's bookkeeping and its score tiles with every mask applied.
// The forward's online softmax (tiled_online_softmax.h) consumes the tiles; a backward pass can call
// the same score_tile to recompute P from the saved lse, since a tile depends only on the block's
// queries, K and the masks, never on any softmax state.
// dtypes: K stored in S (double, float, float16, bfloat16, int8), queries in S or T, scores in
// T = V::Scalar (double for double, else float). ISA: the target's V; both products of the fused attention run the
// register-blocked microkernel (microkernel.h) through panel_gemm. 16-bit K (and V, for the online
// softmax) are read in place from memory, half the bytes, and widened exactly, once per key tile and
// query block, into a T tile the microkernels read as they read float data (kv_tile: 1 / MB of the
// tile's FMAs); the query block is widened as it is packed.
// int8 K and V (a quantised cache, float32 queries and result) are dequantised the same way, a row at a
// time into the tile: int8 * the row's scale (k_scale / v_scale, read through the scale's row()),
// widened exactly and rounded once (relative error <= 2^-24 per element: storage.h widen_row_scaled);
// the products then run on that float32 tile as on a float32 cache.
//
// A query block is MB rows of one batch item (TileBlock): per row the visible key range within the
// block's keys (compute_bounds), and the queries packed once (scaled) into microkernel panels.
// Layout trick: everything is kept transposed, queries in SIMD lanes. The score tile is
// S^T[key][query] = K_tile . Qpack^T for NK keys; the forward's output accumulator is
// O^T[feature][query] += V_tile^T . P^T. So the per-row max, exp and sum of the online softmax and the
// rescale by alpha are plain vertical vector operations (no horizontal reductions), K and V are read in
// place (never packed, only broadcast from), and both products run the same register-blocked
// microkernel shape (MR broadcasts + NRV loads per MR x NRV FMAs), which on AVX2 is the one that fits
// the 16 registers exactly (a 3 x 4 query-rows-by-features P.V needs 17, and GCC then reloads a B
// vector for every row).
//
// Numerics: s2 = (c q).k accumulated with one FMA per term in d order (a D beyond kDepthBlock as a tree
// of blocks: microkernel.h; the additive sum over hidden in blocks too). Masks: the score modifiers
// (softcap c tanh(s / c), ALiBi s - slope |diag_i - j|: modify_scores) come first, on the scaled
// score of every tile product (the pair and AMX paths scale after the product, before apply_masks),
// then the bias is added, then the visible ranges and the bool mask overwrite with -inf (apply_masks);
// a tile the bool mask hides from every row is never computed (bool_mask_hides_tile). The float32
// softcap is tanh_approx's: within 4.4 ulp of the capped score on the SIMD targets (5.7 on scalar,
// whose fmadd rounds twice), at most 3.6e-7 c absolute, against 1.4 - 2.3 ulp for NumPy's float32 tanh.
// On a target with vdpbf16ps (avx512bf16), bfloat16 K, V and Q skip the widening: both products run on
// bfloat16 pairs (PairProducts, attention_tiles_bf16.h, whose header gives the layout and numerics: the
// scale is applied after Q.K^T, and P is rounded to bfloat16 for P.V, l summing the rounded P and l_exp
// the unrounded ones for lse), with the same blocks, tiles, masks, online softmax, careful pass and key
// split. The amx target runs the same two products on AMX tiles instead (AmxTileProducts,
// attention_tiles_amx.h: same layout of P and of the packed queries, same numerics up to the order of
// the float32 additions; a score tile is computed whole).
#pragma once
#include <type_traits>

#include "attnfast/params.h"
#include "kernels/attention_common.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/microkernel.h"
#include "kernels/paged_rows.h"
#include "kernels/storage.h"
#include "kernels/transpose.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Both products of a tile on bfloat16 pairs, where the target has them (kOn: see the header comment).
// Empty here; attention_tiles_bf16.h specialises kOn = true for the avx512bf16 target.
template <bool kOn, int MR, int NRV>
struct PairProducts {};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast

#if defined(ATTNFAST_TARGET_AVX512BF16)
#include "kernels/attention_tiles_bf16.h"
#endif
#if defined(ATTNFAST_TARGET_AMX)
#include "kernels/attention_tiles_amx.h"
#endif

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// What a query block's score tiles need: its rows, its keys, and its buffers in a thread's scratch.
template <class T>
struct TileBlock {
  int64_t b, i_begin, mb, panels;
  int64_t j_begin, j_end;  // the keys this block looks at: all, or one chunk when the keys are split
  T *qpack, *s;            // s: the score tile S^T, NK x MB (the forward turns it into P^T in place)
  T* va_scaled;            // additive only: scale * v_a
  T* bias_t;               // a tile of the bias or of the mask (as 0/1), key-major: S^T's layout
  T* mask_rows;            // a tile of the mask as 0/1, query-major
  T *k_tile, *q_rows;      // widened K tile and query rows, for a storage type read through T
  int64_t *lo, *hi;
  int64_t min_lo, max_lo, min_hi, max_hi;  // over rows that see at least one key
  int64_t warm_b = -1;   // the item whose K and V this block fetches for the thread's next run (-1: none)
  bool fetch_output = false;  // fetch the output rows during the last key tile (the forward's own_output)
  bool kv_cold = false;  // this thread has not read the batch item's K and V yet: see prefetch_keys_ahead
  bool pairs = false;    // both products on bfloat16 pairs (kPairs, and Q is bfloat16 too)
  uint32_t* q_pairs = nullptr;  // the query block packed as feature pairs (pairs)
  T* cap_slope = nullptr;  // backward under a softcap: 1 - tanh^2 of each score, S^T's layout (NK x MB)
};

template <class V, class S, int MR, int NRV>
struct TiledScoreTile {
  using T = typename V::Scalar;
  using Params = AttentionParams<S, T>;
  static constexpr bool kInPlace = kSameType<S, T>;  // K and V read by the microkernels where they are
#if defined(ATTNFAST_TARGET_AVX512BF16)
  static constexpr bool kPairs = std::is_same<S, bfloat16_bits>::value;  // bfloat16 pair products possible
#else
  static constexpr bool kPairs = false;
#endif
#if defined(ATTNFAST_TARGET_AMX)
  using Pairs = AmxTileProducts<MR, NRV>;  // used only where kPairs
#else
  using Pairs = PairProducts<kPairs, MR, NRV>;
#endif
  static constexpr int L = V::kLanes;
  static constexpr int MB = 48;  // query rows per block
  static constexpr int NK = 64;  // keys per tile
  static constexpr int QNR = NRV * L;  // queries per microkernel panel
  static_assert(MB % QNR == 0, "query block must be whole microkernel panels");
  static_assert(NK % MR == 0, "key tiles must be whole microkernel blocks");

  const Params& p;
  // A paged K or V (a paged KV cache: paged_rows.h) is read in place by a tile that lies within one of
  // its pages and gathered into k_tile / v_tile by one that does not, so those exist for S = T too.
  bool kv_tiles;

  explicit TiledScoreTile(const Params& params)
      : p(params), kv_tiles(!kInPlace || params.k.paged() || params.v.paged()) {}

  // The score tile's buffers in a thread's scratch (TileBlock: qpack, s, lo, hi, va_scaled, bias_t,
  // mask_rows, k_tile, q_rows).
  int64_t tile_scratch_bytes() const {
    return Carver::bytes<T>(MB * p.depth) + Carver::bytes<T>(NK * MB) + Carver::bytes<T>(p.v_a ? p.depth : 0) +
           Carver::bytes<T>(p.bias.data || p.mask.data ? NK * MB : 0) + Carver::bytes<T>(p.mask.data ? MB * NK : 0) +
           2 * Carver::bytes<int64_t>(MB) + Carver::bytes<T>(kv_tiles ? NK * p.depth : 0) +
           Carver::bytes<T>(kInPlace ? 0 : QNR * p.depth);
  }

  // Query rows [i, i + rows) of the block's item in T: in place, or widened into q_rows.
  const T* query_rows(const TileBlock<T>& blk, int64_t i, int64_t rows, int64_t* stride) const {
    if (p.q_wide.data) {
      *stride = p.q_wide.row_stride_elements;
      return p.q_wide.row(blk.b, i);
    }
    if constexpr (kInPlace) {
      *stride = p.q.row_stride_elements;
      return p.q.row(blk.b, i);
    } else {
      for (int64_t r = 0; r < rows; ++r) widen_row<V>(p.q.row(blk.b, i + r), p.depth, blk.q_rows + r * p.depth);
      *stride = p.depth;
      return blk.q_rows;
    }
  }

  // Rows [j0, j0 + nk) of K or V (`cols` features) of kv item bkv in T: in place, or widened into `tile`.
  // A paged operand's tile is gathered into `tile` where it crosses a page (paged_rows.h).
  const T* kv_tile(const Operand<const S>& x, int64_t bkv, int64_t j0, int64_t nk, int64_t cols, T* tile,
                   int64_t* stride) const {
    if constexpr (kInPlace) {
      if (x.paged()) return rows_in_place_or_gathered(x, bkv, j0, nk, cols, tile, stride);
      *stride = x.row_stride_elements;
      return x.row(bkv, j0);
    } else if constexpr (kInt8Storage<S>) {
      const Operand<const float>& scale = &x == &p.k ? p.k_scale : p.v_scale;  // callers pass p.k or p.v
      for (int64_t j = 0; j < nk; ++j)
        widen_row_scaled<V>(x.row(bkv, j0 + j), cols, scale.row(bkv, j0 + j)[0], tile + j * cols);
      *stride = cols;
      return tile;
    } else {
      if (x.paged()) {
        for_each_row_run(x, bkv, j0, nk, [&](const S* row, int64_t t0, int64_t count) {
          for (int64_t j = 0; j < count; ++j)
            widen_row<V>(row + j * x.row_stride_elements, cols, tile + (t0 + j) * cols);
        });
      } else if (x.row_stride_elements == cols) {
        widen_row<V>(x.row(bkv, j0), nk * cols, tile);  // contiguous rows: one run, no per-row tail
      } else {
        for (int64_t j = 0; j < nk; ++j) widen_row<V>(x.row(bkv, j0 + j), cols, tile + j * cols);
      }
      *stride = cols;
      return tile;
    }
  }

  // The output row (b, i) as bytes, wherever the result is stored, and the size of one of its elements
  // (for the prefetch of a block's output: see dot_score_tile).
  const char* output_row(int64_t b, int64_t i) const {
    return p.out_wide.data ? reinterpret_cast<const char*>(p.out_wide.row(b, i))
                           : reinterpret_cast<const char*>(p.out.row(b, i));
  }
  int64_t output_element_bytes() const { return p.out_wide.data ? int64_t(sizeof(T)) : int64_t(sizeof(S)); }

  // Sets the block's rows and keys [j_begin, j_end), finds its rows' visible keys and, for additive
  // scores, scales v_a; packs its queries when `pack`. The buffers must be carved already.
  void begin_block(TileBlock<T>& blk, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end, bool pack) const {
    blk.b = b;
    blk.i_begin = i_begin;
    blk.mb = imin(MB, item_rows(p, b) - i_begin);  // callers skip blocks past the item's rows
    blk.panels = ceil_div(blk.mb, QNR);
    blk.j_begin = j_begin;
    blk.j_end = j_end;
    if (p.v_a)
      for (int64_t a = 0; a < p.depth; ++a) blk.va_scaled[a] = p.v_a[a] * p.scale;
    compute_bounds(blk);
    if (pack) pack_queries(blk);
  }

  // Dot scores fold `scale` into the packed queries; additive scores fold it into v_a instead
  // (tanh(q + k) must see the unscaled projections). Lanes past the block's last row are zero.
  void pack_queries(TileBlock<T>& blk) const {
    if constexpr (kPairs) {
      if (blk.pairs) {
        Pairs::pack_queries(*this, blk);
        return;
      }
    }
    const T c = p.v_a ? T(1) : p.scale;
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      T* dst = blk.qpack + panel * p.depth * QNR;
      const int64_t rows = imin(QNR, blk.mb - panel * QNR);
      int64_t stride = 0;
      const T* src = query_rows(blk, blk.i_begin + panel * QNR, rows, &stride);
      transpose_scaled(src, stride, rows, p.depth, dst, QNR, &c, 0);
      if (rows < QNR)
        for (int64_t d = 0; d < p.depth; ++d)
          for (int64_t lane = rows; lane < QNR; ++lane) dst[d * QNR + lane] = T(0);
    }
  }

  // Per-row visible ranges; [min_lo, max_hi) bounds the tiles worth computing (rows that see a key),
  // max_lo / min_hi over all rows (an empty row included) decide whether a tile needs masking at all.
  void compute_bounds(TileBlock<T>& blk) const {
    blk.min_lo = p.lk;
    blk.max_hi = 0;
    blk.max_lo = 0;
    blk.min_hi = p.lk;
    for (int64_t i = 0; i < blk.mb; ++i) {
      visible_range(p, blk.b, blk.i_begin + i, &blk.lo[i], &blk.hi[i]);
      blk.lo[i] = imax(blk.lo[i], blk.j_begin);
      blk.hi[i] = imax(blk.lo[i], imin(blk.hi[i], blk.j_end));
      blk.max_lo = imax(blk.max_lo, blk.lo[i]);
      blk.min_hi = imin(blk.min_hi, blk.hi[i]);
      if (blk.hi[i] > blk.lo[i]) {
        blk.min_lo = imin(blk.min_lo, blk.lo[i]);
        blk.max_hi = imax(blk.max_hi, blk.hi[i]);
      }
    }
    if (blk.max_hi == 0) blk.min_lo = 0;  // no row sees any key: no tile is computed
  }

  // S^T[j][i] for keys j0 .. j0+nk of the block, with every mask applied (-inf).
  void score_tile(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    if constexpr (kInPlace) {
      // Additive scores come with projected (compute-type) keys only.
      if (p.v_a) {
        additive_score_tile(blk, j0, nk);
        apply_masks(blk, j0, nk);
        return;
      }
    }
    dot_score_tile(blk, j0, nk);
    apply_masks(blk, j0, nk);
  }

  // Additive scores: S^T[j][lanes] = sum_a (c v_a[a]) tanh(qp[lanes][a] + kp[j][a]), vectorised over the
  // block's queries; the (query, key, hidden) tensor exists only as one vector at a time.
  void additive_score_tile(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    const int64_t bkv = blk.b / p.group;
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const T* qpanel = blk.qpack + panel * p.depth * QNR;
      for (int64_t j = 0; j < nk; ++j) {
        const T* kr = p.k.row(bkv, j0 + j);
        // native vectors: kept in registers (see microkernel.h). Blocks of kDepthBlock features restart
        // the chains, each block's sums added in order, so a long hidden keeps a block's error per level.
        decltype(V::v) sum[NRV];
#pragma GCC unroll 16
        for (int n = 0; n < NRV; ++n) sum[n] = V::zero().v;
        for (int64_t a0 = 0; a0 < p.depth; a0 += kDepthBlock) {
          const int64_t a1 = imin(p.depth, a0 + kDepthBlock);
          decltype(V::v) acc[NRV];
#pragma GCC unroll 16
          for (int n = 0; n < NRV; ++n) acc[n] = V::zero().v;
          for (int64_t a = a0; a < a1; ++a) {
            const V kb = V::set1(kr[a]);
            const V vb = V::set1(blk.va_scaled[a]);
#pragma GCC unroll 16
            for (int n = 0; n < NRV; ++n)
              acc[n] = fmadd(vb, tanh_approx(V::load(qpanel + a * QNR + n * L) + kb), V{acc[n]}).v;
          }
#pragma GCC unroll 16
          for (int n = 0; n < NRV; ++n) sum[n] = a0 == 0 ? acc[n] : (V{sum[n]} + V{acc[n]}).v;
        }
        for (int n = 0; n < NRV; ++n) V{sum[n]}.store(blk.s + j * MB + panel * QNR + n * L);
      }
    }
  }

  // Vectors of query lanes a panel really needs: the block's last panel may be partly empty (40 query
  // rows fill 24 + 16 lanes): its empty lanes are not computed (a third of that panel's FMAs at 40 rows).
  int panel_vectors(const TileBlock<T>& blk, int64_t panel) const {
    return static_cast<int>(imin(NRV, ceil_div(blk.mb - panel * QNR, int64_t(L))));
  }

  // C (MR x nrv vectors, row stride MB) = or += A . B with the microkernel of that width. Lanes past
  // nrv vectors are neither computed nor written; nothing reads them.
  template <bool kAccumulate, bool kUnitAStride>
  static void panel_gemm(int nrv, int64_t depth, const T* const* a_rows, int64_t a_k_stride, const T* b,
                         int64_t b_k_stride, T* c) {
    static_assert(NRV <= 3, "panel_gemm has 3-, 2- and 1-vector kernels; add widths for wider panels");
    constexpr int kTwo = NRV > 2 ? 2 : 1;
    if (nrv >= NRV) {
      gemm_microkernel<V, MR, NRV, kAccumulate, false, kUnitAStride>(depth, a_rows, a_k_stride, b, b_k_stride, L,
                                                                    c, MB, T(1));
    } else if (nrv == 2) {
      gemm_microkernel<V, MR, kTwo, kAccumulate, false, kUnitAStride>(depth, a_rows, a_k_stride, b, b_k_stride, L,
                                                                     c, MB, T(1));
    } else {
      gemm_microkernel<V, MR, 1, kAccumulate, false, kUnitAStride>(depth, a_rows, a_k_stride, b, b_k_stride, L, c,
                                                                  MB, T(1));
    }
  }

  void dot_score_tile(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
#if defined(ATTNFAST_TARGET_AMX)
    if constexpr (kPairs) {
      if (blk.pairs) {
        Pairs::score_tile(*this, blk, j0, nk);  // a whole tile at a time: 16 keys per A tile
        return;
      }
    }
#endif
    const int64_t bkv = blk.b / p.group;
    int64_t ks = 0;
    const T* k = kPairs && blk.pairs ? nullptr : kv_tile(p.k, bkv, j0, nk, p.depth, blk.k_tile, &ks);
    // Panel outer: one packed query panel (depth x QNR) stays in L1 while the tile's keys stream by.
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const T* qpanel = blk.qpack + panel * p.depth * QNR;
      for (int64_t jj = 0; jj < nk; jj += MR) {
        if (blk.kv_cold && panel == 0) prefetch_keys_ahead(blk, j0 + jj, imin(MR, nk - jj));
        if (blk.fetch_output && panel == 0 && j0 + nk >= blk.max_hi) {
          // In the block's last key tile, this call's share of its output rows (see the forward's
          // own_output); written here and not through prefetch_rows, whose out-of-line call inside this
          // loop costs what the prefetch gains.
          const int64_t calls = ceil_div(nk, int64_t(MR)), c = jj / MR;
          const int64_t r0 = c * blk.mb / calls, r1 = (c + 1) * blk.mb / calls;
          for (int64_t r = r0; r < r1; ++r) {
            const char* row = output_row(blk.b, blk.i_begin + r);
            for (int64_t o = 0; o < p.dv * output_element_bytes(); o += 64) __builtin_prefetch(row + o, 1, 2);
          }
        }
        if (blk.warm_b >= 0 && panel == 0) {
          // The last block of a run fetches the same K and V rows of the item this thread runs next, so
          // that its first block finds them in L2 instead of waiting on memory. Spread over the block's
          // microkernel calls, the fetch stays in the background (all at once per tile, it competes with
          // the block's own loads); keys this block does not see (causal) are left to that block's own
          // prefetch_keys_ahead. Measurements: docs/kernel_decisions.md.
          // A paged cache's keys past that item's kv_lengths have no page to fetch from.
          const int64_t wb = blk.warm_b / p.group;
          const int64_t n = p.k.paged() && p.kv_lengths ? imin(imin(MR, nk - jj), p.kv_lengths[blk.warm_b] - j0 - jj)
                                                        : imin(MR, nk - jj);
          prefetch_operand_rows(p.k, wb, j0 + jj, n, p.depth);
          prefetch_operand_rows(p.v, wb, j0 + jj, n, p.dv);
        }
        if constexpr (kPairs) {
          if (blk.pairs) {
            Pairs::score_call(*this, blk, panel, j0 + jj, imin(MR, nk - jj), blk.s + jj * MB + panel * QNR);
            continue;
          }
        }
        const T* a_rows[MR];
        clamped_rows<T, MR>(k + jj * ks, ks, imin(MR, nk - jj), a_rows);
        panel_gemm<false, true>(panel_vectors(blk, panel), p.depth, a_rows, 1, qpanel, QNR,
                                blk.s + jj * MB + panel * QNR);
      }
    }
  }

  // In a block whose K and V come from memory (kv_cold), while Q.K^T runs over keys j .. j+rows: fetch
  // the K rows of the next microkernel call and the V rows of these keys, which P.V reads after the
  // softmax. The hardware prefetchers do not follow 8 K rows read a column at a time.
  void prefetch_keys_ahead(const TileBlock<T>& blk, int64_t j, int64_t rows) const {
    const int64_t bkv = blk.b / p.group;
    const int64_t next = j + MR;
    if (next < blk.max_hi) prefetch_operand_rows(p.k, bkv, next, imin(MR, blk.max_hi - next), p.depth);
    prefetch_operand_rows(p.v, bkv, j, rows, p.dv);
  }

  // The score modifiers first (softcap, ALiBi: apply_score_modifiers), then the bias; then the visible
  // ranges and the bool mask overwrite with -inf, so a masked key stays masked whatever its bias (-inf
  // plus an infinite bias would be NaN) or its modified score.
  void apply_masks(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    if (has_score_modifiers(p)) apply_score_modifiers(blk, j0, nk);
    if (p.bias.data) add_bias(blk, j0, nk);
    const bool fully_visible = j0 >= blk.max_lo && j0 + nk <= blk.min_hi;
    if (!fully_visible) {
      for (int64_t i = 0; i < blk.mb; ++i) {
        const int64_t lo = imin(nk, imax(0, blk.lo[i] - j0));
        const int64_t hi = imax(lo, imin(nk, blk.hi[i] - j0));
        for (int64_t j = 0; j < lo; ++j) blk.s[j * MB + i] = neg_inf<T>();
        for (int64_t j = hi; j < nk; ++j) blk.s[j * MB + i] = neg_inf<T>();
      }
    }
    if (p.mask.data) apply_bool_mask(blk, j0, nk);
  }

  // One of the four modifier combinations per tile (never a branch per score).
  void apply_score_modifiers(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    if (p.softcap > T(0)) {
      if (p.alibi_slopes) {
        modify_scores<true, true>(blk, j0, nk);
      } else {
        modify_scores<true, false>(blk, j0, nk);
      }
    } else {
      modify_scores<false, true>(blk, j0, nk);
    }
  }

  // S^T of keys [j0, j0 + nk) in place, query lanes a vector at a time:
  //   kCap:   s <- c tanh(s / c) (tanh_approx, math.h: 3.3 ulp in float32, so the capped score is
  //           within a few ulp of c, the largest it can be); s / c as s * (1 / c), one rounding more.
  //           With cap_slope (the backward), also 1 - tanh^2, the cap's derivative.
  //   kAlibi: s <- s - slope |diag_i - j|, the distance diag_i - j0 of each lane once per tile, then
  //           minus j (exact in T while |diag_i - j| < 2^24 in float).
  // Lanes past the block's rows are modified too (finite in, finite out; never read).
  template <bool kCap, bool kAlibi>
  void modify_scores(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    const V cap = V::set1(p.softcap), inv_cap = V::set1(kCap ? T(1) / p.softcap : T(0)), one = V::set1(T(1));
    const V minus_slope = V::set1(kAlibi ? -p.alibi_slopes[blk.b] : T(0));
    T distance[MB];  // diag_i - j0 of each row of the block
    if constexpr (kAlibi)
      for (int64_t i = 0; i < MB; ++i)
        distance[i] = static_cast<T>(sub_saturated(diagonal(p, blk.b, blk.i_begin + i), j0));
    for (int64_t j = 0; j < nk; ++j) {
      T* sj = blk.s + j * MB;
      const V key = V::set1(static_cast<T>(j));
      for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
        V s = V::load(sj + i0);
        if constexpr (kCap) {
          const V t = tanh_approx(s * inv_cap);
          s = cap * t;
          if (blk.cap_slope) fmadd(negate(t), t, one).store(blk.cap_slope + j * MB + i0);
        }
        if constexpr (kAlibi) s = fmadd(minus_slope, abs(V::load(distance + i0) - key), s);
        s.store(sj + i0);
      }
    }
  }

  // True when the bool mask hides every key of the tile from every row of the block (padding keys, the
  // masked half of a triangular mask): the tile would add exp(-inf) = 0 to every sum and leave every
  // max unchanged, so it is skipped like a tile past kv_lengths. Stops at the first visible key.
  bool bool_mask_hides_tile(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    if (!p.mask.data) return false;
    const int64_t cs = p.mask.col_stride_elements;
    const int64_t rows = p.mask.row_stride_elements == 0 ? 1 : blk.mb;  // a key mask: one row decides
    for (int64_t i = 0; i < rows; ++i)
      if (!mask_row_hides_all(p.mask.row(blk.b, blk.i_begin + i) + j0 * cs, cs, nk)) return false;
    return true;
  }

  // S^T is key-major, the bias query-major. A bias broadcast over the queries (row stride 0: a per-key
  // bias) is one vector add per key; a full one with contiguous rows is transposed by 8 x 8 register
  // blocks first; other layouts are added element by element. A -inf bias entry gives -inf whatever the
  // score (add_bias_entry): the key is hidden even where its K row made the score NaN.
  void add_bias(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    const int64_t cs = p.bias.col_stride_elements;
    const V minus_inf = V::set1(neg_inf<T>());
    if (p.bias.row_stride_elements == 0) {
      const T* brow = p.bias.row(blk.b, blk.i_begin) + j0 * cs;
      for (int64_t j = 0; j < nk; ++j) {
        const V b = V::set1(brow[j * cs]);
        const auto hides = cmp_eq(b, minus_inf);
        T* sj = blk.s + j * MB;
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) select(hides, b, V::load(sj + i0) + b).store(sj + i0);
      }
      return;
    }
    if (cs == 1) {
      // Transposed (times 1: exact), then added by vectors. Lanes past the block's last row are set to 0,
      // so the padding lanes of S^T stay finite (they are computed, never read).
      const T one = T(1);
      transpose_scaled(p.bias.row(blk.b, blk.i_begin) + j0, p.bias.row_stride_elements, blk.mb, nk, blk.bias_t, MB,
                       &one, 0);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t i = blk.mb; i < round_up(blk.mb, L); ++i) blk.bias_t[j * MB + i] = T(0);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
          const V b = V::load(blk.bias_t + j * MB + i0);
          select(cmp_eq(b, minus_inf), b, V::load(blk.s + j * MB + i0) + b).store(blk.s + j * MB + i0);
        }
      return;
    }
    for (int64_t i = 0; i < blk.mb; ++i) {
      const T* brow = p.bias.row(blk.b, blk.i_begin + i) + j0 * cs;
      for (int64_t j = 0; j < nk; ++j) blk.s[j * MB + i] = add_bias_entry(blk.s[j * MB + i], brow[j * cs]);
    }
  }

  // A mask broadcast over the queries (a key-padding mask) masks whole keys: vector stores of -inf. A
  // full mask with contiguous rows is transposed like a bias; other layouts use a select per element,
  // never a branch: a branch on mask bytes mispredicts as often as the mask changes.
  void apply_bool_mask(const TileBlock<T>& blk, int64_t j0, int64_t nk) const {
    const int64_t cs = p.mask.col_stride_elements;
    if (p.mask.row_stride_elements == 0) {
      const uint8_t* mrow = p.mask.row(blk.b, blk.i_begin) + j0 * cs;
      const V minus_inf = V::set1(neg_inf<T>());
      for (int64_t j = 0; j < nk; ++j)
        if (!mrow[j * cs])
          for (int64_t i0 = 0; i0 < blk.mb; i0 += L) minus_inf.store(blk.s + j * MB + i0);
      return;
    }
    if (cs == 1) {
      // Bytes to 0/1 values row by row (contiguous: vectorised), transposed like a bias, then one
      // compare-and-select per vector.
      for (int64_t i = 0; i < blk.mb; ++i) {
        const uint8_t* mrow = p.mask.row(blk.b, blk.i_begin + i) + j0;
        T* keep = blk.mask_rows + i * NK;
        for (int64_t j = 0; j < nk; ++j) keep[j] = mrow[j] ? T(1) : T(0);
      }
      const T one = T(1);
      transpose_scaled(blk.mask_rows, NK, blk.mb, nk, blk.bias_t, MB, &one, 0);
      const V zero = V::zero(), minus_inf = V::set1(neg_inf<T>());
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
          T* sv = blk.s + j * MB + i0;
          select(cmp_eq(V::load(blk.bias_t + j * MB + i0), zero), minus_inf, V::load(sv)).store(sv);
        }
      return;
    }
    for (int64_t i = 0; i < blk.mb; ++i) {
      const uint8_t* mrow = p.mask.row(blk.b, blk.i_begin + i) + j0 * cs;
      for (int64_t j = 0; j < nk; ++j) blk.s[j * MB + i] = keep_or_neg_inf(blk.s[j * MB + i], mrow[j * cs]);
    }
  }
};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
