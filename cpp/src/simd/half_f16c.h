// 8-lane conversions between float and the 16-bit storage types with AVX2 and F16C, shared by the avx2
// and avx512 targets (both are built with -mavx2 -mf16c; the avx512 one converts a zmm as two halves
// on store, which SIMDe's emulated AVX-512 also supports). Numerics as simd/half_bits.h: loads exact,
// stores round to nearest even (vcvtps2ph with an explicit rounding immediate, so MXCSR is not read),
// NaN stays NaN.
#pragma once
#include <immintrin.h>

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

inline __m256 bfloat16x8_to_float(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 float16x8_to_float(__m128i h) { return _mm256_cvtph_ps(h); }

// As to_bfloat16 (half_bits.h), per lane: add 0x7fff plus the kept lsb, keep the upper half; NaN lanes
// take their upper half with the quiet bit set.
inline __m128i float_to_bfloat16x8(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i h = _mm256_blendv_epi8(rounded, quiet, nan);
  // Every lane is below 2^16, so the saturating pack is exact.
  return _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
inline __m128i float_to_float16x8(__m256 x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
