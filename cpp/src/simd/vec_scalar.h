// Scalar "vector" of one lane, for float and double. The portable fallback target: the same kernel
// templates as the SIMD targets, instantiated with one lane, so every code path (tails, masks,
// online softmax) is exercised by a target that runs on any CPU.
#pragma once
#include <cstdint>
#include <cstring>

#include "simd/half_bits.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class T>
struct ScalarVec;

template <class T>
struct ScalarVec {
  using Scalar = T;
  static constexpr int kLanes = 1;
  using Mask = bool;
  T v;

  static ScalarVec zero() { return {T(0)}; }
  static ScalarVec set1(T x) { return {x}; }
  static ScalarVec load(const T* p) { return {*p}; }
  static ScalarVec load_partial(const T* p, int n) { return {n > 0 ? *p : T(0)}; }
  void store(T* p) const { *p = v; }
  void store_partial(T* p, int n) const {
    if (n > 0) *p = v;
  }
  static ScalarVec broadcast(const T* p) { return {*p}; }
};

template <class T> inline ScalarVec<T> operator+(ScalarVec<T> a, ScalarVec<T> b) { return {a.v + b.v}; }
template <class T> inline ScalarVec<T> operator-(ScalarVec<T> a, ScalarVec<T> b) { return {a.v - b.v}; }
template <class T> inline ScalarVec<T> operator*(ScalarVec<T> a, ScalarVec<T> b) { return {a.v * b.v}; }
template <class T> inline ScalarVec<T> operator/(ScalarVec<T> a, ScalarVec<T> b) { return {a.v / b.v}; }
// a*b + c. Written as a plain multiply-add: the scalar target is compiled without -mfma, so this rounds
// twice, exactly like the naive reference implementation it stands in for.
template <class T> inline ScalarVec<T> fmadd(ScalarVec<T> a, ScalarVec<T> b, ScalarVec<T> c) { return {a.v * b.v + c.v}; }
// max/min propagate a NaN in `b` (the data) the way the x86 instructions do with the data second.
template <class T> inline ScalarVec<T> max(ScalarVec<T> a, ScalarVec<T> b) { return {a.v > b.v ? a.v : b.v}; }
template <class T> inline ScalarVec<T> min(ScalarVec<T> a, ScalarVec<T> b) { return {a.v < b.v ? a.v : b.v}; }
template <class T> inline ScalarVec<T> abs(ScalarVec<T> a) { return {a.v < T(0) ? -a.v : a.v}; }
template <class T> inline ScalarVec<T> negate(ScalarVec<T> a) { return {-a.v}; }
template <class T> inline bool cmp_lt(ScalarVec<T> a, ScalarVec<T> b) { return a.v < b.v; }
template <class T> inline bool cmp_eq(ScalarVec<T> a, ScalarVec<T> b) { return a.v == b.v; }
template <class T> inline ScalarVec<T> select(bool m, ScalarVec<T> if_true, ScalarVec<T> if_false) {
  return m ? if_true : if_false;
}
template <class T> inline T reduce_add(ScalarVec<T> a) { return a.v; }
template <class T> inline T reduce_max(ScalarVec<T> a) { return a.v; }

inline ScalarVec<float> add_exponent_bits(ScalarVec<float> p, ScalarVec<float> t) {
  uint32_t pb, tb;
  std::memcpy(&pb, &p.v, 4);
  std::memcpy(&tb, &t.v, 4);
  pb += tb << 23;
  float r;
  std::memcpy(&r, &pb, 4);
  return {r};
}
inline ScalarVec<double> add_exponent_bits(ScalarVec<double> p, ScalarVec<double> t) {
  uint64_t pb, tb;
  std::memcpy(&pb, &p.v, 8);
  std::memcpy(&tb, &t.v, 8);
  pb += tb << 52;
  double r;
  std::memcpy(&r, &pb, 8);
  return {r};
}
template <class T> inline ScalarVec<T> zero_where(bool m, ScalarVec<T> a) { return m ? ScalarVec<T>{T(0)} : a; }

// 16-bit storage (float lanes only): one value, converted by half_bits.h.
template <class H>
inline ScalarVec<float> load_converted(const H* p) { return {to_float(*p)}; }
inline void store_converted(ScalarVec<float> x, bfloat16_bits* p) { *p = to_bfloat16(x.v); }
inline void store_converted(ScalarVec<float> x, float16_bits* p) { *p = to_float16(x.v); }
// int8 storage (a quantised KV cache; load only): exact.
inline ScalarVec<float> load_converted(const int8_t* p) { return {static_cast<float>(*p)}; }

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
