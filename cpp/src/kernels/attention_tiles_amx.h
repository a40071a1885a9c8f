// The tiled attention's bfloat16 products on AMX tiles (the amx target only: target_amx.cpp). dtypes:
// bfloat16 Q, K, V (P rounded to bfloat16), float32 scores, softmax state and accumulators. ISA: AMX-TILE
// + AMX-BF16 with AVX-512 and AVX512_BF16 around them; on the scalar model of the tile operations in the
// ATTNFAST_AMX_MODEL test build.
//
// AmxTileProducts has the interface of the AVX512_BF16 path's PairProducts (attention_tiles_bf16.h),
// whose helpers it inherits: the online softmax rounds P to bfloat16 and stores it as key pairs
// (store_pair), and the query block is packed as feature pairs (pack_query_pairs). What changes:
// - both products run on the tile microkernels of amx_tiles.h, whose header explains the operand
//   choice (K rows as A tiles read in place, V^T as A, the pair-packed queries and P as B, C in S^T's
//   and O^T's layouts) and the numerics;
// - a score tile is computed whole (score_tile: 16 keys per A tile, 48 queries in three C tiles) and
//   multiplied by the scale after the product, as in the AVX512_BF16 path; the software prefetches of
//   the float path's Q.K^T loop (the next keys, the next item's K and V, the output rows) are not issued
//   here, as no AMX machine was at hand to measure whether the tile loads want them;
// - the packed operands are padded with zeros to whole tiles: the query pairs to 16 pair rows
//   (query_words, which also holds the staging tile of amx_score_tile after the pairs), P's key pairs
//   past an odd or short tile (zeroed before each P.V), V^T to 16 feature rows and 32 keys; V^T is packed
//   once per kv item and thread where it fits the pair path's value cache (value_transposed);
// - O^T has whole 16-row tiles: the tiled path rounds its rows to kAmxRows (attention_tiled.h);
// - a pass over a block's key tiles holds the tile configuration (AmxTileSession), released after it.
// The schedule, masks, online softmax, careful pass, key split and weights pass are the tiled path's.
#pragma once
#if !defined(ATTNFAST_TARGET_AMX)
#error "attention_tiles_amx.h belongs to the amx target (target_amx.cpp) only"
#endif
#include <cstdint>
#include <cstring>

#include "kernels/amx_tiles.h"
#include "kernels/attention_tiles_bf16.h"
#include "simd/vec_avx512.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <int MR, int NRV>
struct AmxTileProducts : PairProducts<true, MR, NRV> {
  static constexpr int QNR = NRV * 16;
  static_assert(QNR % kAmxLanes == 0 && QNR <= kAmxLanes * kAmxMaxGroups,
                "a query panel is at most three C tiles of 16 queries");
  static_assert(Avx512Vec<float>::kLanes == kAmxLanes, "panel_vectors counts C tiles: 16 lanes per vector");

  // Words of the query pairs of a block of mb rows (whole panels, each amx_pair_rows(depth) rows of QNR
  // words), followed by amx_score_tile's staging (bfloat16).
  static int64_t query_pair_words(int64_t mb, int64_t depth) { return ceil_div(mb, QNR) * amx_pair_rows(depth) * QNR; }
  static int64_t query_words(int64_t mb, int64_t depth) {
    return query_pair_words(mb, depth) + ceil_div(amx_score_staging_elements(depth), 2);
  }
  static int64_t probability_words(int64_t nk, int64_t mb) { return amx_pair_rows(nk) * mb; }
  // V^T of one tile: amx_value_rows(dv) rows of amx_value_keys(nk) bfloat16.
  static int64_t value_words(int64_t nk, int64_t dv) { return ceil_div(amx_value_rows(dv) * amx_value_keys(nk), 2); }
  // A kv item's whole V^T (amx_value_rows(dv) rows of amx_value_keys(lk) keys), shared by the blocks a
  // thread runs in a row as PairProducts shares its key pairs (same cache slot, same invalidation), up to
  // the same size: the transposition then runs once per item and thread instead of once per block and
  // tile. Only tiles of whole 32-key steps read it: a shorter step would multiply the zero P past the
  // tile's keys by the next keys' V, and a NaN or infinity there (a hidden key) would leak in.
  static int64_t value_cache_stride(int64_t lk) { return amx_value_keys(lk); }
  static int64_t value_cache_words(int64_t lk, int64_t dv) {
    const int64_t words = ceil_div(amx_value_rows(dv) * value_cache_stride(lk), 2);
    return words * 4 <= PairProducts<true, MR, NRV>::kMaxCachedValueBytes ? words : 0;
  }

  template <class Kernel, class Block>
  static void pack_queries(const Kernel& k, const Block& blk) {
    const int64_t pairs = ceil_div(k.p.depth, 2), rows = amx_pair_rows(k.p.depth);
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      uint32_t* dst = blk.q_pairs + panel * rows * QNR;
      pack_query_pairs(reinterpret_cast<const uint16_t*>(k.p.q.row(blk.b, blk.i_begin + panel * QNR)),
                       k.p.q.row_stride_elements, imin(QNR, blk.mb - panel * QNR), k.p.depth, QNR, dst);
      std::memset(dst + pairs * QNR, 0, sizeof(uint32_t) * (rows - pairs) * QNR);
    }
  }

  // S^T rows 0 .. nk of the tile at key j0: (q . k) * scale for every query panel, K read in place.
  template <class Kernel, class Block>
  static void score_tile(const Kernel& k, const Block& blk, int64_t j0, int64_t nk) {
    constexpr int64_t MB = Kernel::MB;
    const int64_t rows = amx_pair_rows(k.p.depth);
    uint16_t* staging = reinterpret_cast<uint16_t*>(blk.q_pairs + query_pair_words(MB, k.p.depth));
    // A paged tile that crosses a page is gathered (as stored) into k_tile first: A tiles are strided rows.
    int64_t key_stride = 0;
    const uint16_t* keys = reinterpret_cast<const uint16_t*>(rows_in_place_or_gathered(
        k.p.k, blk.b / k.p.group, j0, nk, k.p.depth, reinterpret_cast<bfloat16_bits*>(blk.k_tile), &key_stride));
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const int groups = k.panel_vectors(blk, panel);
      float* s = blk.s + panel * QNR;
      amx_score_tile(groups, keys, key_stride, nk, k.p.depth, blk.q_pairs + panel * rows * QNR, QNR, s, MB, staging);
      const Avx512Vec<float> scale = Avx512Vec<float>::set1(k.p.scale);
      for (int64_t j = 0; j < nk; ++j)
        for (int g = 0; g < groups; ++g) {
          float* x = s + j * MB + g * kAmxLanes;
          (Avx512Vec<float>::load(x) * scale).store(x);
        }
    }
  }

  // O^T (+)= V_tile^T . P^T for keys j0 .. j0 + nk: the tile's V transposed from its bfloat16 rows, and
  // the P that the online softmax left rounded and packed as key pairs in blk.p_pairs, zero past them.
  // V^T for the keys j0 .. j0 + nk, zero past them to whole 32-key steps: from the item's cached V^T
  // where it applies (value_cache_words), else packed for this tile into blk.v_pairs.
  template <class Kernel, class Block>
  static const uint16_t* value_transposed(const Kernel& k, const Block& blk, int64_t j0, int64_t nk,
                                          int64_t* stride) {
    const int64_t bkv = blk.b / k.p.group;
    if (blk.v_cache && nk % kAmxReduce == 0) {
      uint16_t* cache = reinterpret_cast<uint16_t*>(blk.v_cache);
      *stride = value_cache_stride(k.p.lk);
      if (*blk.v_cache_item != bkv) {
        pack_value_transposed(reinterpret_cast<const uint16_t*>(k.p.v.row(bkv, 0)), k.p.v.row_stride_elements,
                              k.p.lk, k.p.dv, cache, *stride);
        *blk.v_cache_item = bkv;
      }
      return cache + j0;
    }
    uint16_t* vt = reinterpret_cast<uint16_t*>(blk.v_pairs);
    *stride = amx_value_keys(Kernel::NK);
    int64_t v_stride = 0;  // a paged tile that crosses a page: gathered (as stored) into v_tile first
    const bfloat16_bits* v = rows_in_place_or_gathered(k.p.v, bkv, j0, nk, k.p.dv,
                                                       reinterpret_cast<bfloat16_bits*>(blk.v_tile), &v_stride);
    pack_value_transposed(reinterpret_cast<const uint16_t*>(v), v_stride, nk, k.p.dv, vt, *stride);
    return vt;
  }

  template <bool kFirst, class Kernel, class Block>
  static void accumulate(const Kernel& k, const Block& blk, int64_t j0, int64_t nk) {
    constexpr int64_t MB = Kernel::MB;
    const int64_t dv = k.p.dv;
    int64_t vt_stride = 0;
    const uint16_t* vt = value_transposed(k, blk, j0, nk, &vt_stride);
    const int64_t pairs = ceil_div(nk, 2), lanes = round_up(blk.mb, int64_t(kAmxLanes));
    for (int64_t t = pairs; t < amx_pair_rows(nk); ++t) std::memset(blk.p_pairs + t * MB, 0, sizeof(uint32_t) * lanes);
    for (int64_t panel = 0; panel < blk.panels; ++panel)
      amx_value_tile<kFirst>(k.panel_vectors(blk, panel), vt, vt_stride, dv, nk, blk.p_pairs + panel * QNR, MB,
                             blk.acc_t + panel * QNR, MB);
  }
};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
