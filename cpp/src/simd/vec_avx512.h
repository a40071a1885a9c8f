// AVX-512F vectors: 16 floats (__m512) or 8 doubles (__m512d). Only compiled into target_avx512.cpp,
// built with -mavx512f -mavx512vl -mavx512bw -mavx512dq. Tails use k-mask loads/stores, which never
// touch memory in disabled lanes.
// Test builds with ATTNFAST_EMULATE_AVX512 (CMakeLists.txt) take the same intrinsics from SIMDe, which
// implements them on AVX2: the kernels then run, slowly but with the same lane semantics, on CPUs
// without AVX-512.
#pragma once
#if defined(ATTNFAST_EMULATE_AVX512)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>

#include "attnfast/params.h"
#include "simd/half_f16c.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class T>
struct Avx512Vec;

#if defined(ATTNFAST_EMULATE_AVX512)
// SIMDe's masked loads and stores access every lane's memory (and its store writes zeros to the
// disabled lanes), so the emulated build moves partial vectors through a buffer instead.
template <class Vec, class T>
inline Vec load_tail_via_buffer(const T* p, int n) {
  T lanes[Vec::kLanes] = {};
  std::memcpy(lanes, p, sizeof(T) * n);
  return Vec::load(lanes);
}
template <class Vec, class T>
inline void store_tail_via_buffer(const Vec& v, T* p, int n) {
  T lanes[Vec::kLanes];
  v.store(lanes);
  std::memcpy(p, lanes, sizeof(T) * n);
}
#endif

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
#if defined(ATTNFAST_EMULATE_AVX512)
  static Avx512Vec load_partial(const float* p, int n) { return load_tail_via_buffer<Avx512Vec>(p, n); }
  void store_partial(float* p, int n) const { store_tail_via_buffer(*this, p, n); }
#else
  static Avx512Vec load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(tail(n), p)}; }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, tail(n), v); }
#endif
  void store(float* p) const { _mm512_storeu_ps(p, v); }
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
#if defined(ATTNFAST_EMULATE_AVX512)
  static Avx512Vec load_partial(const double* p, int n) { return load_tail_via_buffer<Avx512Vec>(p, n); }
  void store_partial(double* p, int n) const { store_tail_via_buffer(*this, p, n); }
#else
  static Avx512Vec load_partial(const double* p, int n) { return {_mm512_maskz_loadu_pd(tail(n), p)}; }
  void store_partial(double* p, int n) const { _mm512_mask_storeu_pd(p, tail(n), v); }
#endif
  void store(double* p) const { _mm512_storeu_pd(p, v); }
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
inline VF negate(VF a) {
  return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)))};
}
inline __mmask16 cmp_lt(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline __mmask16 cmp_eq(VF a, VF b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline VF select(__mmask16 m, VF t, VF f) { return {_mm512_mask_blend_ps(m, f.v, t.v)}; }
inline VF add_exponent_bits(VF p, VF t) {
  return {_mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_castps_si512(p.v), _mm512_slli_epi32(_mm512_castps_si512(t.v), 23)))};
}
inline VF zero_where(__mmask16 m, VF a) { return {_mm512_maskz_mov_ps(static_cast<__mmask16>(~m), a.v)}; }
// Horizontal reductions: fold to 256 then 128 bits, the same order as the AVX2 target's. Written out
// because _mm512_reduce_add_* are compiler sequences (not instructions) that SIMDe lacks; max is
// written the same way so both reductions read alike.
inline __m256 upper_half(VF a) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)); }
inline __m256 fold_halves_add(VF a) { return _mm256_add_ps(_mm512_castps512_ps256(a.v), upper_half(a)); }
inline __m256 fold_halves_max(VF a) { return _mm256_max_ps(_mm512_castps512_ps256(a.v), upper_half(a)); }
inline float reduce_add(VF a) {
  const __m256 h = fold_halves_add(a);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(VF a) {
  const __m256 h = fold_halves_max(a);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline VD operator+(VD a, VD b) { return {_mm512_add_pd(a.v, b.v)}; }
inline VD operator-(VD a, VD b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline VD operator*(VD a, VD b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline VD operator/(VD a, VD b) { return {_mm512_div_pd(a.v, b.v)}; }
inline VD fmadd(VD a, VD b, VD c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
inline VD max(VD a, VD b) { return {_mm512_max_pd(a.v, b.v)}; }
inline VD min(VD a, VD b) { return {_mm512_min_pd(a.v, b.v)}; }
inline VD abs(VD a) { return {_mm512_abs_pd(a.v)}; }
inline VD negate(VD a) {
  return {_mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(a.v), _mm512_set1_epi64(INT64_MIN)))};
}
inline __mmask8 cmp_lt(VD a, VD b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ); }
inline __mmask8 cmp_eq(VD a, VD b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_EQ_OQ); }
inline VD select(__mmask8 m, VD t, VD f) { return {_mm512_mask_blend_pd(m, f.v, t.v)}; }
inline VD add_exponent_bits(VD p, VD t) {
  return {_mm512_castsi512_pd(
      _mm512_add_epi64(_mm512_castpd_si512(p.v), _mm512_slli_epi64(_mm512_castpd_si512(t.v), 52)))};
}
inline VD zero_where(__mmask8 m, VD a) { return {_mm512_maskz_mov_pd(static_cast<__mmask8>(~m), a.v)}; }
inline double reduce_add(VD a) {
  const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(a.v), _mm512_extractf64x4_pd(a.v, 1));
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
inline double reduce_max(VD a) {
  const __m256d h = _mm256_max_pd(_mm512_castpd512_pd256(a.v), _mm512_extractf64x4_pd(a.v, 1));
  __m128d s = _mm_max_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  s = _mm_max_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

// 16-bit storage (float lanes only): 16 values per vector, widened on load with AVX-512 and narrowed
// on store as two 8-lane halves (half_f16c.h). Partial vectors go through a buffer (kernels/storage.h),
// as the emulated build's do.
inline VF load_converted(const bfloat16_bits* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16))};
}
inline VF load_converted(const float16_bits* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void store_converted(VF x, bfloat16_bits* p) {
  __m128i* out = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(out, float_to_bfloat16x8(_mm512_castps512_ps256(x.v)));
  _mm_storeu_si128(out + 1, float_to_bfloat16x8(upper_half(x)));
}
inline void store_converted(VF x, float16_bits* p) {
  __m128i* out = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(out, float_to_float16x8(_mm512_castps512_ps256(x.v)));
  _mm_storeu_si128(out + 1, float_to_float16x8(upper_half(x)));
}

// int8 storage (a quantised KV cache; float lanes only, load only): 16 bytes sign-extended to int32
// (vpmovsxbd) and converted to float (vcvtdq2ps), both exact.
inline VF load_converted(const int8_t* p) {
#if defined(ATTNFAST_EMULATE_AVX512)
  // SIMDe has no vpmovsxbd: the emulated build converts element by element (the same exact values).
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  return {_mm512_loadu_ps(f)};
#else
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
#endif
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
