// Scalar conversions between float and the two 16-bit storage types, on their bit patterns, for every
// target (the scalar target's only path; the SIMD targets' row tails). ISA: none (portable C++).
// Numerics: 16-bit -> float is exact (every binary16 and bfloat16 value is a float). float -> 16-bit
// rounds to nearest, ties to even, as NumPy's float16 cast and ml_dtypes' bfloat16 cast do: overflow
// gives +-inf, values below the smallest subnormal round to +-0 or to it, NaN stays a (quiet) NaN,
// and no MXCSR mode (flush-to-zero) is consulted.
#pragma once
#include <cstdint>
#include <cstring>

#include "attnfast/params.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline float bits_float(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

inline float to_float(bfloat16_bits h) { return bits_float(uint32_t(h.bits) << 16); }

inline float to_float(float16_bits h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  return bits_float(sign | float_bits(float(mantissa) * 0x1p-24f));
}

// Round to nearest even on the 16 dropped bits; a NaN keeps its sign and upper payload, made quiet
// (rounding could otherwise carry its payload into the exponent and give inf).
inline bfloat16_bits to_bfloat16(float x) {
  const uint32_t b = float_bits(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return {uint16_t((b >> 16) | 0x40u)};
  return {uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16)};
}

inline float16_bits to_float16(float x) {
  const uint32_t b = float_bits(x);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const uint32_t a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return {uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};  // NaN, quiet
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // 65520 and above (inf too) round to inf
  if (a < 0x38800000u) {
    // Below 2^-14: a subnormal (or zero) in half precision, a multiple of 2^-24. |x| * 2^24 < 2^10 is
    // exact, and adding 2^23 rounds it to an integer in the float's current mode (nearest even).
    const float scaled = bits_float(a) * 0x1p24f + 0x1p23f;
    return {uint16_t(sign | (float_bits(scaled) - float_bits(0x1p23f)))};
  }
  // Normal: re-bias the exponent (127 - 15 = 112) and round the 13 dropped mantissa bits to nearest
  // even; a carry out of the mantissa correctly bumps the exponent.
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return {uint16_t(sign | ((rounded >> 13) - (112u << 10)))};
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
