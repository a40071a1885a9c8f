// AVX-512F vectors: 16 floats (__m512) or 8 doubles (__m512d). Only compiled into target_avx512.cpp,
// built with -mavx512f -mavx512vl -mavx512bw -mavx512dq. Tails use k-mask loads/stores, which never
// touch memory in disabled lanes.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class T>
struct Avx512Vec;

template <>
struct Avx512Vec<float> {
  using Scalar = float;
  static constexpr int kLanes = 16;
  using Mask = __mmask16;
  __m512 v;

  static Avx512Vec zero() { return {_mm512_setzero_ps()}; }
  static Avx512Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Avx512Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Avx512Vec broadcast(const float* p) { return {_mm512_set1_ps(*p)}; }
  static __mmask16 tail(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Avx512Vec load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(tail(n), p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, tail(n), v); }
};

template <>
struct Avx512Vec<double> {
  using Scalar = double;
  static constexpr int kLanes = 8;
  using Mask = __mmask8;
  __m512d v;

  static Avx512Vec zero() { return {_mm512_setzero_pd()}; }
  static Avx512Vec set1(double x) { return {_mm512_set1_pd(x)}; }
  static Avx512Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static Avx512Vec broadcast(const double* p) { return {_mm512_set1_pd(*p)}; }
  static __mmask8 tail(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static Avx512Vec load_partial(const double* p, int n) { return {_mm512_maskz_loadu_pd(tail(n), p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void store_partial(double* p, int n) const { _mm512_mask_storeu_pd(p, tail(n), v); }
};

using VF = Avx512Vec<float>;
using VD = Avx512Vec<double>;

inline VF operator+(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VF fmadd(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF max(VF a, VF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VF min(VF a, VF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VF abs(VF a) { return {_mm512_abs_ps(a.v)}; }
inline VF negate(VF a) { return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)))}; }
inline __mmask16 cmp_lt(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline __mmask16 cmp_eq(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline VF select(__mmask16 m, VF t, VF f) { return {_mm512_mask_blend_ps(m, f.v, t.v)}; }
inline VF add_exponent_bits(VF p, VF t) {
  return {_mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_castps_si512(p.v), _mm512_slli_epi32(_mm512_castps_si512(t.v), 23)))};
}
inline VF zero_where(__mmask16 m, VF a) { return {_mm512_maskz_mov_ps(static_cast<__mmask16>(~m), a.v)}; }
inline float reduce_add(VF a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(VF a) { return _mm512_reduce_max_ps(a.v); }

inline VD operator+(VD a, VD b) { return {_mm512_add_pd(a.v, b.v)}; }
inline VD operator-(VD a, VD b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline VD operator*(VD a, VD b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline VD operator/(VD a, VD b) { return {_mm512_div_pd(a.v, b.v)}; }
inline VD fmadd(VD a, VD b, VD c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
inline VD max(VD a, VD b) { return {_mm512_max_pd(a.v, b.v)}; }
inline VD min(VD a, VD b) { return {_mm512_min_pd(a.v, b.v)}; }
inline VD abs(VD a) { return {_mm512_abs_pd(a.v)}; }
inline VD negate(VD a) { return {_mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(a.v), _mm512_set1_epi64(INT64_MIN)))}; }
inline __mmask8 cmp_lt(VD a, VD b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ); }
inline __mmask8 cmp_eq(VD a, VD b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_EQ_OQ); }
inline VD select(__mmask8 m, VD t, VD f) { return {_mm512_mask_blend_pd(m, f.v, t.v)}; }
inline VD add_exponent_bits(VD p, VD t) {
  return {_mm512_castsi512_pd(
      _mm512_add_epi64(_mm512_castpd_si512(p.v), _mm512_slli_epi64(_mm512_castpd_si512(t.v), 52)))};
}
inline VD zero_where(__mmask8 m, VD a) { return {_mm512_maskz_mov_pd(static_cast<__mmask8>(~m), a.v)}; }
inline double reduce_add(VD a) { return _mm512_reduce_add_pd(a.v); }
inline double reduce_max(VD a) { return _mm512_reduce_max_pd(a.v); }

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
