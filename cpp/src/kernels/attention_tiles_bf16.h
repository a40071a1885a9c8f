// bfloat16 tiles for the fused attention's tiled path: both products (Q.K^T and P.V) on vdpbf16ps.
// dtypes: bfloat16 operands (Q, K, V as stored; P rounded to bfloat16), float32 scores, softmax state and
// accumulators. ISA: AVX-512F/BW + AVX512_BF16, the avx512bf16 target only (target_avx512bf16.cpp); the
// emulated test build (ATTNFAST_EMULATE_AVX512) takes _mm512_dpbf16_ps from SIMDe.
//
// vdpbf16ps multiplies, in each 32-bit lane, a pair of bfloat16 values by another pair and adds both
// products to the lane's float32: two products per lane per instruction, twice the float32 FMA's. So
// every operand is packed as PAIRS ALONG THE REDUCTION AXIS, the pair in one 32-bit word, while the
// tiled path's transposed layout stays as it is (S^T[key][query] = K_tile . Qpack^T and
// O^T[feature][query] += V_tile^T . P^T, queries in the SIMD lanes: attention_tiled.h):
// - Q.K^T, reduced over features: the query block is packed once per block as pair panels, lane i of
//   pair t holding (q[i][2t], q[i][2t+1]) (pack_query_pairs). K is read in place: the microkernel
//   broadcasts one key's feature pair, a 32-bit broadcast load from the row (handled by the load ports),
//   so K is never packed. An odd depth ends with (q[i][D-1], 0) against the key's last feature alone
//   (zero-extended): the word past a K row, perhaps past the array, is never read.
// - P.V, reduced over keys: P is rounded to bfloat16 and packed as key pairs, lane i of pair t holding
//   (P[2t][i], P[2t+1][i]), by the online softmax as it makes P (probability_pair_words); V is packed
//   as key pairs of each feature, V[2t][f] beside V[2t+1][f] (pack_value_pairs), once per kv item for
//   the blocks a thread runs in a row (PairProducts::value_pairs), else per tile. An odd key count
//   pairs its last key with P = 0 and broadcasts that key's V alone (zero-extended): neither the row
//   past the tile nor past the array is read, so a hidden key's NaN never meets a row as 0 * NaN.
// Both run one register-blocked microkernel (bf16_pair_microkernel): per pair step NRV loads and MR
// broadcasts feed MR x NRV vdpbf16ps. MR x NRV = 8 x 3 as for float32 (24 accumulators, 3 loads and a
// broadcast of the 32 zmm registers), with the query block of 48 rows and key tiles of 64 unchanged.
//
// Numerics (what differs from the float32 path, which computes bfloat16 data converted exactly):
// - A product of two bfloat16 values is exact in float32 (8 + 8 significant bits). vdpbf16ps adds a
//   lane's two products to its accumulator one after the other (the odd element's first, as Intel's
//   pseudo-code has it and as measured on Zen 5), each add rounded to nearest even: the same as a chain
//   of float32 FMAs over the terms in that order. It ignores MXCSR: it always rounds to nearest even,
//   reads denormal inputs (operands and accumulator) as zero and flushes denormal results to zero
//   (DAZ/FTZ) whatever the caller's mode. Terms and sums below 2^-126 (1.2e-38) in magnitude are lost:
//   invisible in a score, and at most that absolute error in an output.
// - The scale multiplies the float32 score after the product, s = (q . k) * scale: folding it into q, as
//   the float32 path does, would round every scaled q to bfloat16 (2^-9 relative).
// - Chains of at most kDepthBlock products (microkernel.h); a longer depth adds the chains' sums in order.
// - P = exp(s - m) is rounded to bfloat16 (to nearest even, relative error <= 2^-9) before P.V, as
//   FlashAttention and PyTorch's bfloat16 SDPA do. The row sum l must then add the same rounded values
//   (round_probability_to_bfloat16, in the online softmax): out = sum_j P_j V_j / sum_j P_j stays a
//   convex combination of the visible V rows (a constant V column comes out as that constant to float32
//   rounding, every output within its column's range up to float32 rounding), where a sum of the
//   unrounded P would scale the whole row by sum P / sum round(P), off by up to 2^-9 in the same
//   direction for all features. lse, though, takes a second sum of the unrounded P
//   (l_exp in attention_tiled.h): m + log(l) of the rounded sum would be off by up to 2^-9 too, where a
//   float32 lse must be good to a few float32 ulps for merge_states.
// - The emulated build (SIMDe) adds the even element's product first and keeps denormals: it agrees with
//   the hardware up to rounding, not bitwise.
#pragma once
#if !defined(ATTNFAST_TARGET_AVX512BF16)
#error "attention_tiles_bf16.h belongs to the avx512bf16 target (target_avx512bf16.cpp) only"
#endif
#include <cstdint>
#include <cstring>

#include "kernels/common.h"
#include "kernels/microkernel.h"
#include "kernels/paged_rows.h"
#include "simd/vec_avx512.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// The 32-bit word at p: the bfloat16 at p in the low half, the next one in the high half. Any 2-byte
// alignment (x86 loads need none); memcpy, not a cast, so no aliasing rule is broken.
inline uint32_t load_pair(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

inline __m512bh as_bf16_pairs(__m512i x) {
#if defined(ATTNFAST_EMULATE_AVX512)
  __m512bh r;
  std::memcpy(&r, &x, sizeof r);
  return r;
#else
  return (__m512bh)x;
#endif
}

// p rounded to the nearest bfloat16, ties to even, for the online softmax's P: 0 <= p < 2^111 (P is at
// most e^5 in the forward pass and 1 in the weights pass), or NaN. The float add does the rounding: with
// M = 2^(e + 16) for p's exponent e, p + M lies on the grid of 2^(e - 7) that keeps p's 8 leading bits,
// rounded to nearest even by the FPU, and subtracting M again is exact. Four operations and no mask,
// where an integer add-and-shift needs seven with its NaN guard, whose mask sits on the softmax's
// critical path; SIMDe runs it as it is. A NaN stays NaN (quieted, so the bfloat16 half keeps a set
// mantissa bit), +inf stays +inf. Below 2^-126 the grid is 2^-134, finer than bfloat16's: such a P keeps
// a few low bits that probability_pair_words drops and vdpbf16ps reads as 0 anyway (DAZ), while l adds
// them to a sum of at least 1, where they vanish.
inline __m512 round_probability_to_bfloat16(__m512 p) {
  const __m512i exponent = _mm512_and_si512(_mm512_castps_si512(p), _mm512_set1_epi32(0x7f800000));
  const __m512 magic = _mm512_castsi512_ps(_mm512_add_epi32(exponent, _mm512_set1_epi32(16 << 23)));
  return _mm512_sub_ps(_mm512_add_ps(p, magic), magic);
}

inline Avx512Vec<float> round_probability_to_bfloat16(Avx512Vec<float> p) {
  return {round_probability_to_bfloat16(p.v)};
}

// One vector of key-pair words from two vectors of rounded P: lane i holds (even[i], odd[i]), the high
// halves of both (the low halves are 0 except below 2^-126: see round_probability_to_bfloat16).
inline __m512i probability_pair_words(__m512 even_rounded, __m512 odd_rounded) {
  return _mm512_ternarylogic_epi32(_mm512_srli_epi32(_mm512_castps_si512(even_rounded), 16),
                                   _mm512_castps_si512(odd_rounded),
                                   _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u)), 0xf8);  // a | (b & c)
}

// dst[c * dst_stride + r] = the word of pair t0 + c of row r, for an 8 x 8 block of 32-bit words
// (interleave pairs of rows, then pairs of pairs, then swap 128-bit halves: transpose.h's float block,
// here on integers, so that no bit pattern is touched by floating-point arithmetic).
inline void transpose_pair_words_8x8(const uint16_t* const* rows, int64_t t0, uint32_t* dst, int64_t dst_stride) {
  __m256i r[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + 2 * t0));
  for (int i = 0; i < 8; i += 2) {
    u[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    u[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_unpacklo_epi64(u[i], u[i + 2]);
    r[i + 1] = _mm256_unpackhi_epi64(u[i], u[i + 2]);
    r[i + 2] = _mm256_unpacklo_epi64(u[i + 1], u[i + 3]);
    r[i + 3] = _mm256_unpackhi_epi64(u[i + 1], u[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * dst_stride),
                        _mm256_permute2x128_si256(r[i], r[i + 4], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (i + 4) * dst_stride),
                        _mm256_permute2x128_si256(r[i], r[i + 4], 0x31));
  }
}

// Pair panels of a query block (`rows` rows of `depth` bfloat16 features at stride q_row_stride):
// dst[t * lanes + i] = (q[i][2t], q[i][2t+1]) for t < ceil(depth / 2), i < lanes (one panel of `lanes`
// queries); lanes past `rows` are 0, and so is the high half of the last pair of an odd depth. Once per
// query block, by 8 x 8 word transposes (one strided store per word is too slow beside the products at
// a large depth and few keys, the seq2seq shape), the edges word by word.
inline void pack_query_pairs(const uint16_t* q, int64_t q_row_stride, int64_t rows, int64_t depth, int64_t lanes,
                             uint32_t* dst) {
  const int64_t full = depth / 2, pairs = ceil_div(depth, 2);
  const int64_t block_rows = rows / 8 * 8, block_pairs = full / 8 * 8;
  for (int64_t i0 = 0; i0 < block_rows; i0 += 8) {
    const uint16_t* r[8];
    for (int i = 0; i < 8; ++i) r[i] = q + (i0 + i) * q_row_stride;
    for (int64_t t0 = 0; t0 < block_pairs; t0 += 8) transpose_pair_words_8x8(r, t0, dst + t0 * lanes + i0, lanes);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const uint16_t* row = q + i * q_row_stride;
    for (int64_t t = i < block_rows ? block_pairs : 0; t < full; ++t) dst[t * lanes + i] = load_pair(row + 2 * t);
    if (pairs > full) dst[full * lanes + i] = row[depth - 1];
  }
  for (int64_t t = 0; t < pairs; ++t)
    for (int64_t i = rows; i < lanes; ++i) dst[t * lanes + i] = 0;
}

// 16-bit lanes [0, n) of p, the rest 0. The emulated build goes through a buffer (SIMDe's masked loads
// touch every lane's memory: vec_avx512.h).
inline __m512i load_bf16_partial(const uint16_t* p, int n) {
#if defined(ATTNFAST_EMULATE_AVX512)
  uint16_t lanes[32] = {};
  std::memcpy(lanes, p, sizeof(uint16_t) * n);
  return _mm512_loadu_si512(lanes);
#else
  const __mmask32 m = n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u);
  return _mm512_maskz_loadu_epi16(m, p);
#endif
}

inline void store_words_partial(uint32_t* p, __m512i x, int n) {
#if defined(ATTNFAST_EMULATE_AVX512)
  uint32_t lanes[16];
  _mm512_storeu_si512(lanes, x);
  std::memcpy(p, lanes, sizeof(uint32_t) * n);
#else
  _mm512_mask_storeu_epi32(p, static_cast<__mmask16>((1u << n) - 1u), x);
#endif
}

// The V tile as key pairs: dst[t * dv + f] = (V[2t][f], V[2t+1][f]) for t < ceil(nk / 2), f < dv; an odd
// nk pairs its last key with 0 (never the row after the tile). 32 features of two rows at a time are
// interleaved by one two-source word permute per 16 output pairs.
inline void pack_value_pairs(const uint16_t* v, int64_t v_row_stride, int64_t nk, int64_t dv, uint32_t* dst) {
  alignas(64) static constexpr uint16_t kLowHalf[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,
                                                        37, 6, 38, 7, 39, 8,  40, 9,  41, 10, 42,
                                                        11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHighHalf[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                         53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                         27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low_index = _mm512_load_si512(kLowHalf), high_index = _mm512_load_si512(kHighHalf);
  for (int64_t t = 0; 2 * t < nk; ++t) {
    const uint16_t* even = v + 2 * t * v_row_stride;
    const bool has_odd = 2 * t + 1 < nk;
    uint32_t* out = dst + t * dv;
    int64_t f = 0;
    for (; f + 32 <= dv; f += 32) {
      const __m512i a = _mm512_loadu_si512(even + f);
      const __m512i b = has_odd ? _mm512_loadu_si512(even + v_row_stride + f) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + f, _mm512_permutex2var_epi16(a, low_index, b));
      _mm512_storeu_si512(out + f + 16, _mm512_permutex2var_epi16(a, high_index, b));
    }
    if (f < dv) {
      const int n = static_cast<int>(dv - f);
      const __m512i a = load_bf16_partial(even + f, n);
      const __m512i b = has_odd ? load_bf16_partial(even + v_row_stride + f, n) : _mm512_setzero_si512();
      store_words_partial(out + f, _mm512_permutex2var_epi16(a, low_index, b), n < 16 ? n : 16);
      if (n > 16) store_words_partial(out + f + 16, _mm512_permutex2var_epi16(a, high_index, b), n - 16);
    }
  }
}

// C[r][n] (=, or += with kAccumulate) sum over pair steps t < pairs of A_r(t) . B(t)[n lanes]:
//   A_r(t) = the bfloat16 pair at a_rows[r] + t * a_pair_stride (16-bit elements), broadcast;
//   B(t)   = NRV vectors of 16 pairs at b + t * b_pair_stride (32-bit words);
//   C[r]   = c + r * c_row_stride (floats), NRV vectors; without kAccumulate C = scale * sum.
// With a_last_single the last step broadcasts A's low element alone (zero-extended): an odd depth,
// whose pair would run past the K row. At most kDepthBlock / 2 steps (one chain: bf16_pair_gemm splits
// longer ones). The accumulators are native __m512 held in registers, as in microkernel.h.
template <int MR, int NRV, bool kAccumulate>
inline void bf16_pair_microkernel(int64_t pairs, bool a_last_single, const uint16_t* const* a_rows,
                                  int64_t a_pair_stride, const uint32_t* b, int64_t b_pair_stride, float* c,
                                  int64_t c_row_stride, float scale) {
  __m512 acc[MR][NRV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int n = 0; n < NRV; ++n)
      acc[r][n] = kAccumulate ? _mm512_loadu_ps(c + r * c_row_stride + n * 16) : _mm512_setzero_ps();
  const uint16_t* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r] = a_rows[r];
  const int64_t full = a_last_single ? pairs - 1 : pairs;
  const auto step = [&](int64_t t, bool single) {
    __m512bh bv[NRV];
#pragma GCC unroll 16
    for (int n = 0; n < NRV; ++n) bv[n] = as_bf16_pairs(_mm512_loadu_si512(b + t * b_pair_stride + n * 16));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const uint16_t* at = a[r] + t * a_pair_stride;
      const __m512bh av = as_bf16_pairs(_mm512_set1_epi32(static_cast<int32_t>(single ? *at : load_pair(at))));
#pragma GCC unroll 16
      for (int n = 0; n < NRV; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], av, bv[n]);
    }
  };
  for (int64_t t = 0; t < full; ++t) step(t, false);
  if (full < pairs) step(full, true);
  const __m512 s = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int n = 0; n < NRV; ++n)
      _mm512_storeu_ps(c + r * c_row_stride + n * 16, kAccumulate ? acc[r][n] : _mm512_mul_ps(acc[r][n], s));
}

// bf16_pair_microkernel for more than kDepthBlock / 2 pair steps: chains of kDepthBlock products whose
// sums are added in order on a stack tile, the last one straight into C. Out of line: head sizes past
// kDepthBlock are rare.
template <int MR, int NRV, bool kAccumulate>
__attribute__((noinline)) void bf16_pair_gemm_blocked(int64_t pairs, bool a_last_single, const uint16_t* const* a_rows,
                                                      int64_t a_pair_stride, const uint32_t* b, int64_t b_pair_stride,
                                                      float* c, int64_t c_row_stride, float scale) {
  constexpr int64_t kChain = kDepthBlock / 2;
  constexpr int NR = NRV * 16;
  alignas(64) float total[MR * NR];
  alignas(64) float part[MR * NR];
  for (int64_t t0 = 0; t0 < pairs; t0 += kChain) {
    const int64_t steps = imin(kChain, pairs - t0);
    const bool last = t0 + steps == pairs;
    const uint16_t* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = a_rows[r] + t0 * a_pair_stride;
    bf16_pair_microkernel<MR, NRV, false>(steps, last && a_last_single, a, a_pair_stride, b + t0 * b_pair_stride,
                                          b_pair_stride, t0 == 0 ? total : part, NR, 1.0f);
    if (t0 > 0)
      for (int e = 0; e < MR * NR; e += 16)
        _mm512_store_ps(total + e, _mm512_add_ps(_mm512_load_ps(total + e), _mm512_load_ps(part + e)));
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NRV; ++n) {
      float* out = c + r * c_row_stride + n * 16;
      const __m512 t = _mm512_load_ps(total + r * NR + n * 16);
      _mm512_storeu_ps(out, kAccumulate ? _mm512_add_ps(_mm512_loadu_ps(out), t) : _mm512_mul_ps(t, s));
    }
}

template <int MR, int NRV, bool kAccumulate>
inline void bf16_pair_gemm(int64_t pairs, bool a_last_single, const uint16_t* const* a_rows, int64_t a_pair_stride,
                           const uint32_t* b, int64_t b_pair_stride, float* c, int64_t c_row_stride, float scale) {
  if (pairs > kDepthBlock / 2) {
    bf16_pair_gemm_blocked<MR, NRV, kAccumulate>(pairs, a_last_single, a_rows, a_pair_stride, b, b_pair_stride, c,
                                                 c_row_stride, scale);
    return;
  }
  bf16_pair_microkernel<MR, NRV, kAccumulate>(pairs, a_last_single, a_rows, a_pair_stride, b, b_pair_stride, c,
                                              c_row_stride, scale);
}


// The tiled path's bfloat16 products (attention_tiled.h declares the primary template, empty: other
// targets and storage types widen the tiles to float instead). Used when K, V and Q are all bfloat16;
// float32 queries over a bfloat16 cache keep the widening path. The query block is packed as pairs once
// (pack_queries), each score call reads K rows in place, and each P.V packs the tile's V and P first.
template <int MR, int NRV>
struct PairProducts<true, MR, NRV> {
  static constexpr int QNR = NRV * 16;
  static_assert(NRV <= 3, "pair_panel_gemm has 3-, 2- and 1-vector kernels");

  // Scratch words per block: query pairs (MB rows), P pairs and V pairs of one tile.
  static int64_t query_words(int64_t mb, int64_t depth) { return mb * ceil_div(depth, 2); }
  static int64_t probability_words(int64_t nk, int64_t mb) { return ceil_div(nk, 2) * mb; }
  static int64_t value_words(int64_t nk, int64_t dv) { return ceil_div(nk, 2) * dv; }
  // A kv item's whole V as key pairs, which the blocks a thread runs in a row share instead of each
  // packing every tile again: those are blocks of one item, in runs (QueryRuns) or as consecutive tasks
  // (a long sequence's blocks go out one by one, in order). Up to an L2's worth of pairs.
  static constexpr int64_t kMaxCachedValueBytes = int64_t(1) << 20;
  static int64_t value_cache_words(int64_t lk, int64_t dv) {
    return value_words(lk, dv) * 4 <= kMaxCachedValueBytes ? value_words(lk, dv) : 0;
  }

  static Avx512Vec<float> round(Avx512Vec<float> x) { return round_probability_to_bfloat16(x); }
  // The online softmax's rounded P of keys 2t and 2t + 1 (odd: 0 past the tile) as the words of pair t.
  static void store_pair(Avx512Vec<float> even, Avx512Vec<float> odd, uint32_t* dst) {
    _mm512_storeu_si512(dst, probability_pair_words(even.v, odd.v));
  }

  // bf16_pair_gemm with only the nrv vectors of query lanes the panel needs (the last panel of a block
  // may be partly empty, as in the float path's panel_gemm).
  template <bool kAccumulate>
  static void pair_panel_gemm(int nrv, int64_t pairs, bool a_last_single, const uint16_t* const* a_rows,
                              int64_t a_pair_stride, const uint32_t* b, int64_t b_pair_stride, float* c,
                              int64_t c_row_stride, float scale) {
    constexpr int kTwo = NRV > 2 ? 2 : 1;
    if (nrv >= NRV) {
      bf16_pair_gemm<MR, NRV, kAccumulate>(pairs, a_last_single, a_rows, a_pair_stride, b, b_pair_stride, c,
                                           c_row_stride, scale);
    } else if (nrv == 2) {
      bf16_pair_gemm<MR, kTwo, kAccumulate>(pairs, a_last_single, a_rows, a_pair_stride, b, b_pair_stride, c,
                                            c_row_stride, scale);
    } else {
      bf16_pair_gemm<MR, 1, kAccumulate>(pairs, a_last_single, a_rows, a_pair_stride, b, b_pair_stride, c,
                                         c_row_stride, scale);
    }
  }

  template <class Kernel, class Block>
  static void pack_queries(const Kernel& k, const Block& blk) {
    const int64_t pairs = ceil_div(k.p.depth, 2);
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      pack_query_pairs(reinterpret_cast<const uint16_t*>(k.p.q.row(blk.b, blk.i_begin + panel * QNR)),
                       k.p.q.row_stride_elements, imin(QNR, blk.mb - panel * QNR), k.p.depth, QNR,
                       blk.q_pairs + panel * pairs * QNR);
    }
  }

  // S^T rows j .. j + rows (at most MR keys) of one query panel: (q . k) * scale, K read in place (a
  // paged K: each row where its page has it).
  template <class Kernel, class Block>
  static void score_call(const Kernel& k, const Block& blk, int64_t panel, int64_t j, int64_t rows, float* out) {
    const int64_t pairs = ceil_div(k.p.depth, 2);
    const bfloat16_bits* key_rows[MR];
    operand_rows<bfloat16_bits, MR>(k.p.k, blk.b / k.p.group, j, rows, key_rows);
    const uint16_t* a_rows[MR];
    for (int r = 0; r < MR; ++r) a_rows[r] = reinterpret_cast<const uint16_t*>(key_rows[r]);
    pair_panel_gemm<false>(k.panel_vectors(blk, panel), pairs, k.p.depth % 2 != 0, a_rows, 2,
                           blk.q_pairs + panel * pairs * QNR, QNR, out, Kernel::MB, k.p.scale);
  }

  // The V pairs of keys j0 .. j0 + nk: from the item's cache where the block has one and the tile starts
  // at an even key (a window can start tiles at odd keys), packing the whole item on its first use by
  // this thread; else packed for this tile. The cache pairs the tile's last key of an odd count with the
  // key after it, which accumulate then never reads (a_last_single).
  template <class Kernel, class Block>
  static const uint32_t* value_pairs(const Kernel& k, const Block& blk, int64_t j0, int64_t nk) {
    const int64_t bkv = blk.b / k.p.group, dv = k.p.dv;
    if (blk.v_cache && j0 % 2 == 0) {
      if (*blk.v_cache_item != bkv) {
        pack_value_pairs(reinterpret_cast<const uint16_t*>(k.p.v.row(bkv, 0)), k.p.v.row_stride_elements, k.p.lk,
                         dv, blk.v_cache);
        *blk.v_cache_item = bkv;
      }
      return blk.v_cache + (j0 / 2) * dv;
    }
    // A paged tile that crosses a page is gathered (as stored) into v_tile first.
    int64_t stride = 0;
    const bfloat16_bits* v =
        rows_in_place_or_gathered(k.p.v, bkv, j0, nk, dv, reinterpret_cast<bfloat16_bits*>(blk.v_tile), &stride);
    pack_value_pairs(reinterpret_cast<const uint16_t*>(v), stride, nk, dv, blk.v_pairs);
    return blk.v_pairs;
  }

  // O^T (+)= V_tile^T . P^T for keys j0 .. j0 + nk from the tile's V pairs and its P, which the online
  // softmax left rounded and packed as key pairs in blk.p_pairs (0 past an odd count). The last pair of
  // an odd count broadcasts V's even key alone.
  template <bool kFirst, class Kernel, class Block>
  static void accumulate(const Kernel& k, const Block& blk, int64_t j0, int64_t nk) {
    constexpr int64_t MB = Kernel::MB;
    const int64_t dv = k.p.dv, pairs = ceil_div(nk, 2);
    const uint32_t* v_pairs = value_pairs(k, blk, j0, nk);
    for (int64_t panel = 0; panel < blk.panels; ++panel)
      for (int64_t c0 = 0; c0 < dv; c0 += MR) {
        const uint16_t* a_rows[MR];  // MR value features: broadcast their key pairs
        clamped_rows<uint16_t, MR>(reinterpret_cast<const uint16_t*>(v_pairs + c0), 2, imin(MR, dv - c0), a_rows);
        pair_panel_gemm<!kFirst>(k.panel_vectors(blk, panel), pairs, nk % 2 != 0, a_rows, 2 * dv,
                                 blk.p_pairs + panel * QNR, MB, blk.acc_t + c0 * MB + panel * QNR, MB, 1.0f);
      }
  }
};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
