// AVX2 + FMA vectors: 8 floats (__m256) or 4 doubles (__m256d). Only compiled into target_avx2.cpp,
// whose translation unit is built with -mavx2 -mfma. Tails use vmaskmov so a row's last partial vector
// never reads or writes past the end of the caller's array.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

#include "attnfast/params.h"
#include "simd/half_f16c.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class T>
struct Avx2Vec;

// Lane masks for partial loads: row n of the table enables the first n lanes (read at offset 8 - n).
alignas(64) static const int32_t kAvx2TailMask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
alignas(64) static const int64_t kAvx2TailMask64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};

template <>
struct Avx2Vec<float> {
  using Scalar = float;
  static constexpr int kLanes = 8;
  using Mask = __m256;
  __m256 v;

  static Avx2Vec zero() { return {_mm256_setzero_ps()}; }
  static Avx2Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Avx2Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Avx2Vec broadcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
  static __m256i tail(int n) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kAvx2TailMask32 + 8 - n));
  }
  static Avx2Vec load_partial(const float* p, int n) { return {_mm256_maskload_ps(p, tail(n))}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm256_maskstore_ps(p, tail(n), v); }
};

template <>
struct Avx2Vec<double> {
  using Scalar = double;
  static constexpr int kLanes = 4;
  using Mask = __m256d;
  __m256d v;

  static Avx2Vec zero() { return {_mm256_setzero_pd()}; }
  static Avx2Vec set1(double x) { return {_mm256_set1_pd(x)}; }
  static Avx2Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Avx2Vec broadcast(const double* p) { return {_mm256_broadcast_sd(p)}; }
  static __m256i tail(int n) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kAvx2TailMask64 + 4 - n));
  }
  static Avx2Vec load_partial(const double* p, int n) { return {_mm256_maskload_pd(p, tail(n))}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void store_partial(double* p, int n) const { _mm256_maskstore_pd(p, tail(n), v); }
};

using VF = Avx2Vec<float>;
using VD = Avx2Vec<double>;

inline VF operator+(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VF fmadd(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
// vmaxps returns its second operand when either is NaN: callers pass the data second so NaN propagates.
inline VF max(VF a, VF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VF min(VF a, VF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VF abs(VF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline VF negate(VF a) { return {_mm256_xor_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline __m256 cmp_lt(VF a, VF b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ); }
inline __m256 cmp_eq(VF a, VF b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
inline VF select(__m256 m, VF t, VF f) { return {_mm256_blendv_ps(f.v, t.v, m)}; }
// Integer-adds t's bits shifted into the exponent field to p's bits: p * 2^n when t = n + 1.5 * 2^23.
inline VF add_exponent_bits(VF p, VF t) {
  return {_mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_castps_si256(p.v), _mm256_slli_epi32(_mm256_castps_si256(t.v), 23)))};
}
inline VF zero_where(__m256 m, VF a) { return {_mm256_andnot_ps(m, a.v)}; }
inline float reduce_add(VF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(VF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline VD operator+(VD a, VD b) { return {_mm256_add_pd(a.v, b.v)}; }
inline VD operator-(VD a, VD b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline VD operator*(VD a, VD b) { return {_mm256_mul_pd(a.v, b.v)}; }
inline VD operator/(VD a, VD b) { return {_mm256_div_pd(a.v, b.v)}; }
inline VD fmadd(VD a, VD b, VD c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
inline VD max(VD a, VD b) { return {_mm256_max_pd(a.v, b.v)}; }
inline VD min(VD a, VD b) { return {_mm256_min_pd(a.v, b.v)}; }
inline VD abs(VD a) { return {_mm256_andnot_pd(_mm256_set1_pd(-0.0), a.v)}; }
inline VD negate(VD a) { return {_mm256_xor_pd(_mm256_set1_pd(-0.0), a.v)}; }
inline __m256d cmp_lt(VD a, VD b) { return _mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ); }
inline __m256d cmp_eq(VD a, VD b) { return _mm256_cmp_pd(a.v, b.v, _CMP_EQ_OQ); }
inline VD select(__m256d m, VD t, VD f) { return {_mm256_blendv_pd(f.v, t.v, m)}; }
inline VD add_exponent_bits(VD p, VD t) {
  return {_mm256_castsi256_pd(
      _mm256_add_epi64(_mm256_castpd_si256(p.v), _mm256_slli_epi64(_mm256_castpd_si256(t.v), 52)))};
}
inline VD zero_where(__m256d m, VD a) { return {_mm256_andnot_pd(m, a.v)}; }
inline double reduce_add(VD a) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
inline double reduce_max(VD a) {
  __m128d s = _mm_max_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
  s = _mm_max_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

// 16-bit storage (float lanes only): 8 values per vector. Partial vectors go through a buffer
// (kernels/storage.h): AVX2 has no 16-bit masked load or store.
inline VF load_converted(const bfloat16_bits* p) { return {bfloat16x8_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline VF load_converted(const float16_bits* p) { return {float16x8_to_float(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline void store_converted(VF x, bfloat16_bits* p) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), float_to_bfloat16x8(x.v)); }
inline void store_converted(VF x, float16_bits* p) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), float_to_float16x8(x.v)); }

// int8 storage (a quantised KV cache; float lanes only, load only): 8 bytes sign-extended to int32
// (vpmovsxbd) and converted to float (vcvtdq2ps), both exact.
inline VF load_converted(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
