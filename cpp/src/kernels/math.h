// Vectorised exp2 and tanh, written once over the vector wrappers (scalar, AVX2, AVX-512; float and
// double). Why hand-written: libm has no SIMD entry points we can rely on across compilers, and the
// softmax needs exact behaviour at the edges (-inf -> 0, NaN -> NaN) more than it needs the last ulp.
//
// exp2(x), float: x = n + f with n = round(x), |f| <= 1/2; 2^f from a degree-6 minimax polynomial
//   (Cephes exp2f coefficients), 2^n by writing the exponent field. Max relative error ~2 ulp (2.4e-7)
//   over the normal range. x < -126 returns +0 (the result would be subnormal: a softmax term below
//   2^-126 of the row maximum, which cannot change a sum that contains 1). x > 127.99 is clamped (only
//   the tanh path calls it with x > 0, after clamping its own argument). -inf -> 0, NaN -> NaN.
// exp2(x), double: same reduction, 2^f from the Cephes (3,2) Pade form 1 + 2fP/(Q - fP); max relative
//   error ~2e-16. x < -1022 returns +0.
// tanh(x): |x| < 0.625 odd polynomial/rational (Cephes tanhf / tanh) to avoid the cancellation of
//   1 - 2/(e^2x + 1) near 0; otherwise that formula with the exp2 above. float max error ~2 ulp,
//   double ~2e-16 relative. NaN -> NaN, +-inf -> +-1.
#pragma once
#include <cstdint>

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class T>
struct MathConst;
template <>
struct MathConst<float> {
  static constexpr float kExp2Min = -126.0f;
  static constexpr float kExp2Max = 127.99f;
  static constexpr float kTanhClamp = 9.5f;  // tanh(9.5) rounds to 1 in float
};
template <>
struct MathConst<double> {
  static constexpr double kExp2Min = -1022.0;
  static constexpr double kExp2Max = 1023.99;
  static constexpr double kTanhClamp = 19.5;  // tanh(19.5) rounds to 1 in double
};

template <class V>
inline V exp2_poly_reduced(V f, float /*tag*/) {
  // 2^f ~= 1 + f * P(f) on [-1/2, 1/2].
  V p = V::set1(1.535336188319500e-4f);
  p = fmadd(p, f, V::set1(1.339887440266574e-3f));
  p = fmadd(p, f, V::set1(9.618437357674640e-3f));
  p = fmadd(p, f, V::set1(5.550332471162809e-2f));
  p = fmadd(p, f, V::set1(2.402264791363012e-1f));
  p = fmadd(p, f, V::set1(6.931472028550421e-1f));
  return fmadd(p, f, V::set1(1.0f));
}

template <class V>
inline V exp2_poly_reduced(V f, double /*tag*/) {
  // 2^f = 1 + 2 f P(f^2) / (Q(f^2) - f P(f^2)) on [-1/2, 1/2].
  const V z = f * f;
  V p = V::set1(2.30933477057345225087e-2);
  p = fmadd(p, z, V::set1(2.02020656693165307700e1));
  p = fmadd(p, z, V::set1(1.51390680115615096133e3));
  p = p * f;
  V q = z + V::set1(2.33184211722314911771e2);
  q = fmadd(q, z, V::set1(4.36821166879210612817e3));
  const V r = (p + p) / (q - p);
  return r + V::set1(1.0);
}

// 2^x, see the header comment for range and error.
template <class V>
inline V exp2_approx(V x) {
  using T = typename V::Scalar;
  // Data second in min/max so a NaN in x survives the clamps.
  V xc = min(V::set1(MathConst<T>::kExp2Max), x);
  xc = max(V::set1(MathConst<T>::kExp2Min), xc);
  const V n = round_nearest(xc);
  const V f = xc - n;  // exact: n is the nearest integer
  const V r = exp2_poly_reduced(f, T{}) * pow2_int(n);
  return select(cmp_lt(x, V::set1(MathConst<T>::kExp2Min)), V::zero(), r);
}

template <class V>
inline V tanh_small(V x, V z, float /*tag*/) {
  V p = V::set1(-5.70498872745e-3f);
  p = fmadd(p, z, V::set1(2.06390887954e-2f));
  p = fmadd(p, z, V::set1(-5.37397155531e-2f));
  p = fmadd(p, z, V::set1(1.33314422036e-1f));
  p = fmadd(p, z, V::set1(-3.33332819422e-1f));
  return fmadd(p * z, x, x);
}

template <class V>
inline V tanh_small(V x, V z, double /*tag*/) {
  V p = V::set1(-9.64399179425052238628e-1);
  p = fmadd(p, z, V::set1(-9.92877231001918586564e1));
  p = fmadd(p, z, V::set1(-1.61468768441708447952e3));
  V q = z + V::set1(1.12811678491632931402e2);
  q = fmadd(q, z, V::set1(2.23548839060100448583e3));
  q = fmadd(q, z, V::set1(4.84406305325125486048e3));
  return fmadd(z * (p / q), x, x);
}

template <class V>
inline V tanh_approx(V x) {
  using T = typename V::Scalar;
  const V ax = min(V::set1(MathConst<T>::kTanhClamp), abs(x));  // NaN survives (data second)
  const V small = tanh_small(x, x * x, T{});
  // 1 - 2 / (e^{2|x|} + 1), then the sign of x.
  const V e = exp2_approx(ax * V::set1(T(2.8853900817779268147198494)));  // 2 / ln 2
  const V big_abs = V::set1(T(1)) - V::set1(T(2)) / (e + V::set1(T(1)));
  const V big = select(cmp_lt(x, V::zero()), negate(big_abs), big_abs);
  return select(cmp_lt(abs(x), V::set1(T(0.625))), small, big);
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
