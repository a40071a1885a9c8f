// Vectorised exp2 and tanh, written once over the vector wrappers (scalar, AVX2, AVX-512; float and
// double). Why hand-written: libm has no SIMD entry points we can rely on across compilers, and the
// softmax needs exact behaviour at the edges (-inf -> 0, NaN -> NaN) more than it needs the last ulp.
//
// exp2(x), float: x = n + f with n = round(x), |f| <= 1/2, found by the 1.5*2^23 "magic number" add
//   (whose low mantissa bits then hold n, so 2^n is an integer add into the exponent field: no
//   round/convert instructions); 2^f = 1 + f P(f) with a degree-5 near-minimax P fitted to relative
//   error on [-1/2, 1/2]. Max relative error 1.9e-7 (1.6 ulp) measured over the reduced range, Horner
//   rounding included. x < -126 returns +0 (the result would be subnormal: a softmax term below 2^-126
//   of the row maximum cannot change a sum that contains 1). -inf -> 0, NaN -> NaN.
//   Five FMAs and no division: the exponential is the one non-GEMM cost of the fused attention.
// exp2(x), double: same reduction (magic 1.5*2^52), 2^f from the Cephes (3,2) Pade form
//   1 + 2fP/(Q - fP); max relative error ~2e-16. x < -1022 returns +0.
// exp2_approx clamps x above at 127 (1023) so the result stays finite; exp2_bounded_above skips that
// clamp for callers whose argument is bounded well below it (s - max in a softmax, s - a stale max in
// the fused attention); exp2_nonpositive is the same function, named for the common case.
// exp2_sum_term is exp2_bounded_above without the final select (two instructions fewer, for the fused
//   attention's hot loop): x is clamped at -127 instead of -126, where the reduced argument is 0 and
//   2^0 = 1.0 exactly, whose exponent field the add of -127 cancels: x <= -127 (and -inf) gives
//   exactly +0, and -127 < x < -126 gives some value in [0, 2^-126] instead of 0. A term that small
//   beside a row maximum of 1 cannot change a sum that holds the 1; masked keys still weigh 0.
// tanh(x), float: x clamped to +-7.9053 (where tanh rounds to +-1), then the odd (13, 6) rational
//   minimax form x P(x^2) / Q(x^2) (the published coefficients of Eigen's ptanh_float): 8 FMAs and one
//   division, no branch and no exp. Max relative error 3.9e-7 (3.3 ulp) measured over [-10, 10] and
//   near 0 in float32 arithmetic. This is the inner loop of additive attention, hence the cheaper form.
// tanh(x), double: |x| < 0.625 the Cephes rational x + x z P(z)/Q(z) (no cancellation near 0), else
//   1 - 2/(e^2|x| + 1) with the exp2 above; ~2e-16 relative. NaN -> NaN, +-inf -> +-1 for both.
#pragma once
#include <cstdint>

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class T>
struct MathConst;
template <>
struct MathConst<float> {
  static constexpr float kExp2Min = -126.0f;
  static constexpr float kExp2Max = 127.0f;
  static constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
};
template <>
struct MathConst<double> {
  static constexpr double kExp2Min = -1022.0;
  static constexpr double kExp2Max = 1023.0;
  static constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kTanhClamp = 19.5;                 // tanh(19.5) rounds to 1 in double
};

template <class V>
inline V exp2_poly_reduced(V f, float /*tag*/) {
  // 2^f ~= 1 + f * P(f) on [-1/2, 1/2] (coefficients: weighted least squares, Lawson iterations).
  V p = V::set1(1.32647e-3f);
  p = fmadd(p, f, V::set1(9.67151e-3f));
  p = fmadd(p, f, V::set1(5.550734e-2f));
  p = fmadd(p, f, V::set1(2.4022242e-1f));
  p = fmadd(p, f, V::set1(6.9314698e-1f));
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

// 2^x for x already clamped below at kExp2Min or kExp2Min - 1 (the callers' choice, see below).
template <class V>
inline V exp2_clamped(V xc) {
  using T = typename V::Scalar;
  const V magic = V::set1(MathConst<T>::kRoundMagic);
  const V t = xc + magic;  // low mantissa bits of t hold round(xc)
  const V n = t - magic;
  return add_exponent_bits(exp2_poly_reduced(xc - n, T{}), t);
}

// 2^x for x <= 127 (1023 for double), or NaN; see the header comment.
template <class V>
inline V exp2_bounded_above(V x) {
  using T = typename V::Scalar;
  const V r = exp2_clamped(max(V::set1(MathConst<T>::kExp2Min), x));  // data second: NaN survives
  return zero_where(cmp_lt(x, V::set1(MathConst<T>::kExp2Min)), r);
}

// 2^x for x <= 127 (1023), or NaN, flushing results below 2^-126 (2^-1022) loosely; see the header.
template <class V>
inline V exp2_sum_term(V x) {
  using T = typename V::Scalar;
  return exp2_clamped(max(V::set1(MathConst<T>::kExp2Min - T(1)), x));  // data second: NaN survives
}

// 2^x for x <= 0 (or NaN).
template <class V>
inline V exp2_nonpositive(V x) {
  return exp2_bounded_above(x);
}

// 2^x for any x; see the header comment.
template <class V>
inline V exp2_approx(V x) {
  using T = typename V::Scalar;
  return exp2_bounded_above(min(V::set1(MathConst<T>::kExp2Max), x));
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
inline V tanh_approx(V x, float /*tag*/) {
  const V xc = max(V::set1(-7.90531110763549805f), min(V::set1(7.90531110763549805f), x));  // NaN survives
  const V z = xc * xc;
  V p = V::set1(-2.76076847742355e-16f);
  p = fmadd(p, z, V::set1(2.00018790482477e-13f));
  p = fmadd(p, z, V::set1(-8.60467152213735e-11f));
  p = fmadd(p, z, V::set1(5.12229709037114e-08f));
  p = fmadd(p, z, V::set1(1.48572235717979e-05f));
  p = fmadd(p, z, V::set1(6.37261928875436e-04f));
  p = fmadd(p, z, V::set1(4.89352455891786e-03f));
  V q = V::set1(1.19825839466702e-06f);
  q = fmadd(q, z, V::set1(1.18534705686654e-04f));
  q = fmadd(q, z, V::set1(2.26843463243900e-03f));
  q = fmadd(q, z, V::set1(4.89352518554385e-03f));
  return (xc * p) / q;
}

template <class V>
inline V tanh_approx(V x, double /*tag*/) {
  using T = double;
  const V ax = min(V::set1(MathConst<T>::kTanhClamp), abs(x));  // NaN survives (data second)
  const V small = tanh_small(x, x * x, T{});
  // 1 - 2 / (e^{2|x|} + 1), then the sign of x.
  const V e = exp2_approx(ax * V::set1(T(2.8853900817779268147198494)));  // 2 / ln 2
  const V big_abs = V::set1(T(1)) - V::set1(T(2)) / (e + V::set1(T(1)));
  const V big = select(cmp_lt(x, V::zero()), negate(big_abs), big_abs);
  return select(cmp_lt(abs(x), V::set1(T(0.625))), small, big);
}

template <class V>
inline V tanh_approx(V x) {
  return tanh_approx(x, typename V::Scalar{});
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
