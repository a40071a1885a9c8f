// AMX-BF16 tile microkernels for the fused attention's two products on one query block, bfloat16 Q, K
// and V (the amx target: target_amx.cpp; Sapphire Rapids and later). dtypes: bfloat16 operands (P
// rounded to bfloat16), float32 results. ISA: AMX-TILE + AMX-BF16 (TDPBF16PS), AVX-512 around them; in
// the test-only build ATTNFAST_AMX_MODEL every tile operation runs on the scalar model of amx_model.h
// instead of the hardware, from this same source.
//
// TDPBF16PS computes C (M x N float32, M <= 16, N <= 16) += A . B with A = M rows of K bfloat16
// (row-major, K <= 32) and B = K / 2 rows of N bfloat16 PAIRS (the "VNNI" layout: B's element (k, n)
// sits in row k / 2, word n, half k % 2). So B is stored K-major with pairs along K, exactly the pair
// layout of the AVX512_BF16 path (attention_tiles_bf16.h), while A is stored M-major with K contiguous.
// The tiled attention keeps S^T[key][query] and O^T[feature][query] (queries in the SIMD lanes, see
// attention_tiled.h), and the choice of A and B gives C in that layout directly:
// - S^T = K_tile . Q^T: M = keys, N = queries, K = depth. A = the K rows as they are in memory
//   (row-major bfloat16, depth contiguous: READ IN PLACE, 32 features per tile load at the row stride),
//   B = the query block packed once per block as feature pairs (word (t, i) = (q[i][2t], q[i][2t+1]),
//   the AVX512_BF16 path's pack_query_pairs), C tiles stored straight into S^T at its row stride.
//   (The other way round, S = Q . K^T, would need K^T in pairs: K repacked for every block and tile.)
// - O^T += V_tile^T . P^T: M = value features, N = queries, K = keys. B = P as key pairs (word (t, i) =
//   (P[2t][i], P[2t+1][i]), the AVX512_BF16 path's layout, which its online softmax stores as it makes
//   P), C = O^T's tiles, loaded from and stored back to the accumulator in place. A must be V^T
//   (features x keys, keys contiguous), and V is key-major in memory: V is transposed
//   (pack_value_transposed), per tile or once per kv item and thread (attention_tiles_amx.h). Both operands of this product have the reduction axis (keys) as their
//   major axis, so one of them has to be transposed whichever is A; V^T it is, because P^T -> P would
//   also leave C as O (queries x features), not the O^T the online softmax rescales by vectors.
// One tile configuration serves both products (palette 1, all eight registers 16 rows x 64 bytes:
// C tiles tmm0..2 for 48 queries, A in tmm3, B tiles tmm4..6), loaded once per query block pass
// (AmxTileSession) and released after it, so the thread holds no tile state between calls. Shapes are
// never reconfigured: tails are handled by padding instead. A key group of fewer than 16 keys, and the
// last features of a depth that is not a multiple of 32 (an odd depth included), are copied into a
// zero-padded staging tile, so a tile load never reads past a K row or past the array; the packed
// operands (query pairs, P pairs, V^T) are zero past their end up to whole tiles, and zero times zero
// adds nothing. A C row or column past the tile's keys or queries is computed (from zeros) and never
// read.
//
// Numerics (TDPBF16PS, Intel SDM; amx_model.h models exactly this): bfloat16 products are exact in
// float32; per C element and tile step of 32 reduction elements, the even and the odd elements'
// products are summed in two float32 chains of 16 fused multiply-adds, those two sums added, and the
// result added to C, every step rounded to nearest even. Denormal inputs read as zero and denormal
// results are flushed to zero (DAZ/FTZ), MXCSR ignored: terms and sums below 2^-126 are lost, as with
// vdpbf16ps. Per score, the error is that of chains of 16 terms plus one add per 32 features: no
// kDepthBlock splitting is needed. The scale multiplies the float32 score after the product (folding it
// into q would round c q to bfloat16), and P is rounded to bfloat16 by the online softmax, the row sum l
// adding the same rounded P and l_exp the float32 ones, for lse (attention_tiles_bf16.h explains both).
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels/common.h"

#if defined(ATTNFAST_AMX_MODEL)
#include "kernels/amx_model.h"
#endif
#if !defined(ATTNFAST_AMX_MODEL) || (defined(__AVX512BW__) && !defined(ATTNFAST_EMULATE_AVX512))
#include <immintrin.h>
#endif

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// ---- Tile operations: the hardware instruction, or its model (ATTNFAST_AMX_MODEL) ----
// The tile register is a template argument: GCC's _tile_* macros paste the register number into the
// instruction text, so each register needs its own literal. GCC 12's tileloadd and ldtilecfg asm
// statements do not tell the compiler which memory they read (tileloadd names none, ldtilecfg 8 of the
// 64 bytes), so compiler barriers around them order them with every other memory access: the stores
// that fill a packed or staged operand happen before its load (without the barrier they could be sunk
// past it or dropped as dead), and the next refill of a staging buffer after it.
namespace amx_ops {

inline void memory_barrier() { __asm__ __volatile__("" ::: "memory"); }

#if defined(ATTNFAST_AMX_MODEL)
inline void load_config(const void* cfg) { amx_model::tile_loadconfig(cfg); }
inline void release() { amx_model::tile_release(); }
template <int kTile>
inline void load(const void* base, int64_t stride) {
  amx_model::tile_loadd(kTile, base, stride);
}
template <int kTile>
inline void store(void* base, int64_t stride) {
  amx_model::tile_stored(kTile, base, stride);
}
template <int kTile>
inline void zero() {
  amx_model::tile_zero(kTile);
}
template <int kC, int kA, int kB>
inline void dpbf16ps() {
  amx_model::tile_dpbf16ps(kC, kA, kB);
}
#else
inline void load_config(const void* cfg) {
  memory_barrier();
  _tile_loadconfig(cfg);
  memory_barrier();
}
inline void release() { _tile_release(); }
#define ATTNFAST_AMX_FOR_TILE(n, statement) \
  if constexpr (kTile == n) {               \
    statement;                              \
  }
template <int kTile>
inline void load(const void* base, int64_t stride) {
  static_assert(kTile >= 0 && kTile < 8, "tmm0..tmm7");
  memory_barrier();
  ATTNFAST_AMX_FOR_TILE(0, _tile_loadd(0, base, stride))
  ATTNFAST_AMX_FOR_TILE(1, _tile_loadd(1, base, stride))
  ATTNFAST_AMX_FOR_TILE(2, _tile_loadd(2, base, stride))
  ATTNFAST_AMX_FOR_TILE(3, _tile_loadd(3, base, stride))
  ATTNFAST_AMX_FOR_TILE(4, _tile_loadd(4, base, stride))
  ATTNFAST_AMX_FOR_TILE(5, _tile_loadd(5, base, stride))
  ATTNFAST_AMX_FOR_TILE(6, _tile_loadd(6, base, stride))
  ATTNFAST_AMX_FOR_TILE(7, _tile_loadd(7, base, stride))
  memory_barrier();
}
template <int kTile>
inline void store(void* base, int64_t stride) {
  static_assert(kTile >= 0 && kTile < 8, "tmm0..tmm7");
  ATTNFAST_AMX_FOR_TILE(0, _tile_stored(0, base, stride))
  ATTNFAST_AMX_FOR_TILE(1, _tile_stored(1, base, stride))
  ATTNFAST_AMX_FOR_TILE(2, _tile_stored(2, base, stride))
  ATTNFAST_AMX_FOR_TILE(3, _tile_stored(3, base, stride))
  ATTNFAST_AMX_FOR_TILE(4, _tile_stored(4, base, stride))
  ATTNFAST_AMX_FOR_TILE(5, _tile_stored(5, base, stride))
  ATTNFAST_AMX_FOR_TILE(6, _tile_stored(6, base, stride))
  ATTNFAST_AMX_FOR_TILE(7, _tile_stored(7, base, stride))
}
template <int kTile>
inline void zero() {
  static_assert(kTile >= 0 && kTile < 8, "tmm0..tmm7");
  ATTNFAST_AMX_FOR_TILE(0, _tile_zero(0))
  ATTNFAST_AMX_FOR_TILE(1, _tile_zero(1))
  ATTNFAST_AMX_FOR_TILE(2, _tile_zero(2))
  ATTNFAST_AMX_FOR_TILE(3, _tile_zero(3))
  ATTNFAST_AMX_FOR_TILE(4, _tile_zero(4))
  ATTNFAST_AMX_FOR_TILE(5, _tile_zero(5))
  ATTNFAST_AMX_FOR_TILE(6, _tile_zero(6))
  ATTNFAST_AMX_FOR_TILE(7, _tile_zero(7))
}
#undef ATTNFAST_AMX_FOR_TILE
// The products this file issues: C tile n (tmm0..2) += A (tmm3) . B tile n (tmm4..6).
template <int kC, int kA, int kB>
inline void dpbf16ps() {
  static_assert(kA == 3 && kB == kC + 4 && kC >= 0 && kC < 3, "C n += A . B n: tmm(n) += tmm3 . tmm(n+4)");
  if constexpr (kC == 0) _tile_dpbf16ps(0, 3, 4);
  if constexpr (kC == 1) _tile_dpbf16ps(1, 3, 5);
  if constexpr (kC == 2) _tile_dpbf16ps(2, 3, 6);
}
#endif

}  // namespace amx_ops

// ---- Configuration ----
constexpr int kAmxRows = 16;         // rows of every tile
constexpr int kAmxRowBytes = 64;     // bytes per tile row
constexpr int kAmxPairs = 16;        // reduction pairs per tile step: 32 bfloat16 elements
constexpr int kAmxReduce = 2 * kAmxPairs;
constexpr int kAmxLanes = 16;        // float32 columns of a C tile: queries per group
constexpr int kAmxMaxGroups = 3;     // C tiles per A tile: 48 queries
constexpr int kAmxA = 3;             // tmm3; C tiles are tmm0..2 and B tiles tmm4..6

// The 64-byte LDTILECFG operand, palette 1.
struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(AmxTileConfig) == 64, "LDTILECFG reads 64 bytes");

inline const AmxTileConfig& attention_tile_config() {
  static const AmxTileConfig config = [] {
    AmxTileConfig c;
    std::memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = kAmxRowBytes;
      c.rows[t] = kAmxRows;
    }
    return c;
  }();
  return config;
}

// Holds the tile configuration for one pass over a query block's key tiles and releases it after, so
// that no tile state outlives the pass (other code in the thread, another library's AMX kernels
// included, may configure tiles differently between calls). `on` false: a block that does not use the
// tiles (no configuration, nothing to release).
class AmxTileSession {
 public:
  explicit AmxTileSession(bool on = true) : on_(on) {
    if (on_) amx_ops::load_config(&attention_tile_config());
  }
  ~AmxTileSession() {
    if (on_) amx_ops::release();
  }
  AmxTileSession(const AmxTileSession&) = delete;
  AmxTileSession& operator=(const AmxTileSession&) = delete;

 private:
  bool on_;
};

// ---- Operand layouts and sizes ----
// Query pairs (B of S^T): rows t < amx_pair_rows(depth), row stride >= 16 * groups words; word (t, i) =
// (q[i][2t], q[i][2t+1]), zero for t >= ceil(depth / 2), an odd depth's last high half zero.
inline int64_t amx_pair_rows(int64_t reduce) { return round_up(ceil_div(reduce, 2), kAmxPairs); }
// Staging for the K rows a tile load may not read in place (score_staging_elements bfloat16).
inline int64_t amx_score_staging_elements(int64_t depth) {
  return kAmxRows * round_up(depth, kAmxReduce) + kAmxRows * kAmxReduce;
}
// V^T (A of O^T): rows f < round_up(dv, 16), keys j < round_up(nk, 32) at the row stride, zero past dv
// and nk. P pairs (B of O^T): rows t < amx_pair_rows(nk), zero past ceil(nk / 2).
inline int64_t amx_value_rows(int64_t dv) { return round_up(dv, kAmxRows); }
inline int64_t amx_value_keys(int64_t nk) { return round_up(nk, kAmxReduce); }

// ---- S^T = K . Q^T ----
// K rows [0, rows) (rows <= 16) of `depth` features at k (row stride k_stride elements) into `stage`,
// 16 rows of round_up(depth, 32), zero past them: a tile's worth of keys at the end of the tile.
inline void stage_key_rows(const uint16_t* k, int64_t k_stride, int64_t rows, int64_t depth, uint16_t* stage) {
  const int64_t width = round_up(depth, kAmxReduce);
  std::memset(stage, 0, sizeof(uint16_t) * kAmxRows * width);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(stage + r * width, k + r * k_stride, sizeof(uint16_t) * depth);
}

// Features [d0, depth) (fewer than 32) of 16 K rows into `tail`, 16 rows of 32, zero past depth.
inline void stage_key_tail(const uint16_t* k, int64_t k_stride, int64_t d0, int64_t depth, uint16_t* tail) {
  std::memset(tail, 0, sizeof(uint16_t) * kAmxRows * kAmxReduce);
  for (int64_t r = 0; r < kAmxRows; ++r)
    std::memcpy(tail + r * kAmxReduce, k + r * k_stride + d0, sizeof(uint16_t) * (depth - d0));
}

template <int kGroups>
inline void load_b_tiles(const uint32_t* b, int64_t b_stride_words) {
  const int64_t stride = b_stride_words * int64_t(sizeof(uint32_t));
  amx_ops::load<4>(b, stride);
  if constexpr (kGroups > 1) amx_ops::load<5>(b + kAmxLanes, stride);
  if constexpr (kGroups > 2) amx_ops::load<6>(b + 2 * kAmxLanes, stride);
}

template <int kGroups>
inline void multiply_groups() {
  amx_ops::dpbf16ps<0, kAmxA, 4>();
  if constexpr (kGroups > 1) amx_ops::dpbf16ps<1, kAmxA, 5>();
  if constexpr (kGroups > 2) amx_ops::dpbf16ps<2, kAmxA, 6>();
}

template <int kGroups>
inline void zero_c_tiles() {
  amx_ops::zero<0>();
  if constexpr (kGroups > 1) amx_ops::zero<1>();
  if constexpr (kGroups > 2) amx_ops::zero<2>();
}

template <int kGroups>
inline void load_c_tiles(const float* c, int64_t c_stride) {
  const int64_t stride = c_stride * int64_t(sizeof(float));
  amx_ops::load<0>(c, stride);
  if constexpr (kGroups > 1) amx_ops::load<1>(c + kAmxLanes, stride);
  if constexpr (kGroups > 2) amx_ops::load<2>(c + 2 * kAmxLanes, stride);
}

template <int kGroups>
inline void store_c_tiles(float* c, int64_t c_stride) {
  const int64_t stride = c_stride * int64_t(sizeof(float));
  amx_ops::store<0>(c, stride);
  if constexpr (kGroups > 1) amx_ops::store<1>(c + kAmxLanes, stride);
  if constexpr (kGroups > 2) amx_ops::store<2>(c + 2 * kAmxLanes, stride);
}

// s[j * s_stride + i] = sum_d k[j][d] q[i][d] for keys j < round_up(nk, 16) (rows past nk: 0) and
// queries i < 16 * kGroups; K rows at k (k_stride elements apart) read in place except where a tile
// load would pass the tile's last key or row's last feature (staged: see the header comment).
// q_pairs: the query pairs, q_stride words per pair row. Needs an AmxTileSession.
template <int kGroups>
inline void amx_score_tile_groups(const uint16_t* k, int64_t k_stride, int64_t nk, int64_t depth,
                                  const uint32_t* q_pairs, int64_t q_stride, float* s, int64_t s_stride,
                                  uint16_t* staging) {
  const int64_t full_depth = depth / kAmxReduce * kAmxReduce;
  uint16_t* tail = staging + kAmxRows * round_up(depth, kAmxReduce);
  for (int64_t j0 = 0; j0 < nk; j0 += kAmxRows) {
    const int64_t rows = imin(kAmxRows, nk - j0);
    const uint16_t* a = k + j0 * k_stride;
    int64_t a_stride = k_stride;
    if (rows < kAmxRows) {
      stage_key_rows(a, k_stride, rows, depth, staging);
      a = staging;
      a_stride = round_up(depth, kAmxReduce);
    }
    zero_c_tiles<kGroups>();
    for (int64_t d0 = 0; d0 < depth; d0 += kAmxReduce) {
      if (d0 < full_depth || a == staging) {
        amx_ops::load<kAmxA>(a + d0, a_stride * int64_t(sizeof(uint16_t)));
      } else {
        stage_key_tail(a, a_stride, d0, depth, tail);
        amx_ops::load<kAmxA>(tail, kAmxReduce * int64_t(sizeof(uint16_t)));
      }
      load_b_tiles<kGroups>(q_pairs + (d0 / 2) * q_stride, q_stride);
      multiply_groups<kGroups>();
    }
    store_c_tiles<kGroups>(s + j0 * s_stride, s_stride);
  }
}

// amx_score_tile_groups for the groups of 16 queries a block has (1 to 3).
inline void amx_score_tile(int groups, const uint16_t* k, int64_t k_stride, int64_t nk, int64_t depth,
                           const uint32_t* q_pairs, int64_t q_stride, float* s, int64_t s_stride, uint16_t* staging) {
  if (groups >= 3) {
    amx_score_tile_groups<3>(k, k_stride, nk, depth, q_pairs, q_stride, s, s_stride, staging);
  } else if (groups == 2) {
    amx_score_tile_groups<2>(k, k_stride, nk, depth, q_pairs, q_stride, s, s_stride, staging);
  } else {
    amx_score_tile_groups<1>(k, k_stride, nk, depth, q_pairs, q_stride, s, s_stride, staging);
  }
}

// ---- O^T += V^T . P^T ----
// vt[f * vt_stride + j] = v[j][f] for f < dv, j < nk; zero for j in [nk, round_up(nk, 32)) and for the
// rows f in [dv, round_up(dv, 16)) (see amx_value_rows / amx_value_keys). Element by element: the
// portable version, and the one the model test build without AVX-512 uses.
inline void pack_value_transposed_scalar(const uint16_t* v, int64_t v_stride, int64_t nk, int64_t dv, uint16_t* vt,
                                         int64_t vt_stride) {
  const int64_t keys = amx_value_keys(nk);
  for (int64_t f = 0; f < dv; ++f) {
    uint16_t* row = vt + f * vt_stride;
    for (int64_t j = 0; j < nk; ++j) row[j] = v[j * v_stride + f];
    for (int64_t j = nk; j < keys; ++j) row[j] = 0;
  }
  for (int64_t f = dv; f < amx_value_rows(dv); ++f) std::memset(vt + f * vt_stride, 0, sizeof(uint16_t) * keys);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(ATTNFAST_EMULATE_AVX512)
// 16 features x 32 keys at a time, as 32-bit key pairs: row r of the block is the word vector
// (V[2r][f], V[2r+1][f]) for the block's 16 features f (two 16-element row loads, masked past dv, and
// one two-source word permute; keys past nk and the partner of an odd last key are zero), and a 16 x 16
// transpose of 32-bit words (4 stages of unpack / shuffle) turns the 16 pair rows into 16 feature
// rows of 16 pairs = 32 keys of V^T. Features past dv come out zero, so the padding rows are written
// by the same stores. About 5 shuffles per 32 output bytes, against 16 scalar moves.
inline void pack_value_transposed(const uint16_t* v, int64_t v_stride, int64_t nk, int64_t dv, uint16_t* vt,
                                  int64_t vt_stride) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,
                                                           37, 6, 38, 7, 39, 8,  40, 9,  41, 10, 42,
                                                           11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const int64_t keys = amx_value_keys(nk);
  for (int64_t f0 = 0; f0 < amx_value_rows(dv); f0 += kAmxRows) {
    const int64_t width = imax(0, imin(kAmxRows, dv - f0));
    const __mmask16 cols = static_cast<__mmask16>((1u << width) - 1u);
    for (int64_t j0 = 0; j0 < keys; j0 += kAmxReduce) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) {
        const int64_t even = j0 + 2 * t, odd = even + 1;
        const __m256i a = even < nk ? _mm256_maskz_loadu_epi16(cols, v + even * v_stride + f0) : _mm256_setzero_si256();
        const __m256i b = odd < nk ? _mm256_maskz_loadu_epi16(cols, v + odd * v_stride + f0) : _mm256_setzero_si256();
        r[t] = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), interleave, _mm512_castsi256_si512(b));
      }
      // Transpose r (16 rows t of 16 words f) into 16 rows f of 16 words t.
      __m512i u[16];
#pragma GCC unroll 8
      for (int t = 0; t < 16; t += 2) {
        u[t] = _mm512_unpacklo_epi32(r[t], r[t + 1]);
        u[t + 1] = _mm512_unpackhi_epi32(r[t], r[t + 1]);
      }
#pragma GCC unroll 4
      for (int t = 0; t < 16; t += 4) {
        r[t] = _mm512_unpacklo_epi64(u[t], u[t + 2]);
        r[t + 1] = _mm512_unpackhi_epi64(u[t], u[t + 2]);
        r[t + 2] = _mm512_unpacklo_epi64(u[t + 1], u[t + 3]);
        r[t + 3] = _mm512_unpackhi_epi64(u[t + 1], u[t + 3]);
      }
      // r[4q + c] now holds, in 128-bit lane g, the words (t = 4q .. 4q+3) of feature 4g + c.
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i lo01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);   // q0 g0 g1, q1 g0 g1
        const __m512i hi01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);   // q0 g2 g3, q1 g2 g3
        const __m512i lo23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        const __m512i hi23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
        u[c] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);       // g0: q0 q1 q2 q3
        u[4 + c] = _mm512_shuffle_i32x4(lo01, lo23, 0xdd);   // g1
        u[8 + c] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);   // g2
        u[12 + c] = _mm512_shuffle_i32x4(hi01, hi23, 0xdd);  // g3
      }
      // u[4g + c] = feature 4g + c.
#pragma GCC unroll 16
      for (int f = 0; f < 16; ++f) _mm512_storeu_si512(vt + (f0 + f) * vt_stride + j0, u[f]);
    }
  }
}
#else
inline void pack_value_transposed(const uint16_t* v, int64_t v_stride, int64_t nk, int64_t dv, uint16_t* vt,
                                  int64_t vt_stride) {
  pack_value_transposed_scalar(v, v_stride, nk, dv, vt, vt_stride);
}
#endif

// acc[f * acc_stride + i] (= if kFirst, else +=) sum_j vt[f][j] P[j][i] for features f < round_up(dv, 16)
// and queries i < 16 * kGroups, over keys j < nk in steps of 32: V^T packed by pack_value_transposed,
// P as key pairs (p_stride words per pair row, zero past the tile's keys). Needs an AmxTileSession.
template <int kGroups, bool kFirst>
inline void amx_value_tile_groups(const uint16_t* vt, int64_t vt_stride, int64_t dv, int64_t nk,
                                  const uint32_t* p_pairs, int64_t p_stride, float* acc, int64_t acc_stride) {
  for (int64_t f0 = 0; f0 < dv; f0 += kAmxRows) {
    float* c = acc + f0 * acc_stride;
    if (kFirst) {
      zero_c_tiles<kGroups>();
    } else {
      load_c_tiles<kGroups>(c, acc_stride);
    }
    for (int64_t j0 = 0; j0 < nk; j0 += kAmxReduce) {
      amx_ops::load<kAmxA>(vt + f0 * vt_stride + j0, vt_stride * int64_t(sizeof(uint16_t)));
      load_b_tiles<kGroups>(p_pairs + (j0 / 2) * p_stride, p_stride);
      multiply_groups<kGroups>();
    }
    store_c_tiles<kGroups>(c, acc_stride);
  }
}

template <bool kFirst>
inline void amx_value_tile(int groups, const uint16_t* vt, int64_t vt_stride, int64_t dv, int64_t nk,
                           const uint32_t* p_pairs, int64_t p_stride, float* acc, int64_t acc_stride) {
  if (groups >= 3) {
    amx_value_tile_groups<3, kFirst>(vt, vt_stride, dv, nk, p_pairs, p_stride, acc, acc_stride);
  } else if (groups == 2) {
    amx_value_tile_groups<2, kFirst>(vt, vt_stride, dv, nk, p_pairs, p_stride, acc, acc_stride);
  } else {
    amx_value_tile_groups<1, kFirst>(vt, vt_stride, dv, nk, p_pairs, p_stride, acc, acc_stride);
  }
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
