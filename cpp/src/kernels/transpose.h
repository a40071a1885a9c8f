// Scaled transposes for the fused attention's layout changes: packing a query block into lanes, and
// writing the transposed output accumulator back as rows.
// dtypes: float, double. ISA: 8 x 8 (float) / 4 x 4 (double) register transposes with AVX, which the
// avx2 and avx512 targets both have (one code path, tested on AVX2 machines); plain loops otherwise
// and for the edges. Numerics: one multiplication per element, so the result is exact up to that one
// rounding, identical for every path.
//
// Why by hand: a compiler turns the strided scalar loop into one extract-and-store per element, and in
// a seq2seq-sized call (40 queries x 50 keys x 256 features) the two transposes are then a fifth of the
// time (docs/kernel_decisions.md).
#pragma once
#include <cstdint>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

#if defined(__AVX__)
// dst[c][r] = src[r][c] * scale[c] for one 8 x 8 block (strides in elements).
inline void transpose_block(const float* src, int64_t ss, float* dst, int64_t ds, __m256 scale) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(_mm256_loadu_ps(src + i * ss), scale);
  // Interleave pairs of rows, then pairs of pairs (within 128-bit halves), then swap the halves.
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// dst[c][r] = src[r][c] * scale[c] for one 4 x 4 block of doubles.
inline void transpose_block(const double* src, int64_t ss, double* dst, int64_t ds, __m256d scale) {
  __m256d r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm256_mul_pd(_mm256_loadu_pd(src + i * ss), scale);
  const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
  const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
  _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + ds, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 2 * ds, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 3 * ds, _mm256_permute2f128_pd(t1, t3, 0x31));
}

inline __m256 scale_vector(const float* s, int64_t step) {
  return step ? _mm256_loadu_ps(s) : _mm256_set1_ps(*s);
}
inline __m256d scale_vector(const double* s, int64_t step) {
  return step ? _mm256_loadu_pd(s) : _mm256_set1_pd(*s);
}
#endif

// dst[c * ds + r] = src[r * ss + c] * scale[c * scale_step] for r < rows, c < cols. scale_step is 0
// (one factor for all) or 1 (one per source column).
// Block order: by groups of source rows, or with kDestinationRowsOuter by groups of destination rows,
// each written from start to end before the next. Use the latter when the destination rows are many
// and far apart (the attention output): walking the source rows wrote 32 bytes to each of 40 output
// rows per step, and at a 1 KiB row stride those lines share a few L1 sets and are evicted before
// their other half comes.
template <bool kDestinationRowsOuter = false, class T>
inline void transpose_scaled(const T* src, int64_t ss, int64_t rows, int64_t cols, T* dst, int64_t ds,
                             const T* scale, int64_t scale_step) {
#if defined(__AVX__)
  constexpr int B = sizeof(T) == 4 ? 8 : 4;  // one 256-bit register per block row
  const int64_t rows_b = rows - rows % B, cols_b = cols - cols % B;
  const auto block = [&](int64_t r0, int64_t c0) {
    transpose_block(src + r0 * ss + c0, ss, dst + c0 * ds + r0, ds, scale_vector(scale + c0 * scale_step, scale_step));
  };
  if (kDestinationRowsOuter) {
    for (int64_t c0 = 0; c0 < cols_b; c0 += B)
      for (int64_t r0 = 0; r0 < rows_b; r0 += B) block(r0, c0);
  } else {
    for (int64_t r0 = 0; r0 < rows_b; r0 += B)
      for (int64_t c0 = 0; c0 < cols_b; c0 += B) block(r0, c0);
  }
#else
  const int64_t rows_b = 0, cols_b = 0;
#endif
  // Edges: the columns past the last whole block for the blocked rows, then the remaining rows.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = (r < rows_b ? cols_b : 0); c < cols; ++c)
      dst[c * ds + r] = src[r * ss + c] * scale[c * scale_step];
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
