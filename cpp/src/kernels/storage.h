// Loads and stores between a storage type S and the compute type T = V::Scalar, for kernels written
// once over both: S = T is a plain load or store, a 16-bit S goes through the target's conversions
// (simd/vec_*.h: exact widening on load, one round-to-nearest-even on store). Every kernel reads its
// S operands through these, so a new storage type is a new set of conversions, not new kernels.
// dtypes: S in {T, float16_bits, bfloat16_bits} (the 16-bit types with T = float only). ISA: the
// including target's V.
#pragma once
#include <cstdint>
#include <type_traits>

#include "attnfast/params.h"
#include "simd/half_bits.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class S, class T>
constexpr bool kSameType = std::is_same<typename std::remove_const<S>::type, T>::value;

template <class V, class S>
inline V load_as(const S* p) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    return V::load(p);
  } else {
    return load_converted(p);
  }
}

template <class V, class S>
inline V load_partial_as(const S* p, int n) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    return V::load_partial(p, n);
  } else {
    return load_partial_converted(p, n);
  }
}

template <class V, class S>
inline void store_as(V x, S* p) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    x.store(p);
  } else {
    store_converted(x, p);
  }
}

template <class V, class S>
inline void store_partial_as(V x, S* p, int n) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    x.store_partial(p, n);
  } else {
    store_partial_converted(x, p, n);
  }
}

// One element, for scalar loops (strided rows, edges).
template <class T, class S>
inline T scalar_as(S x) {
  if constexpr (kSameType<S, T>) {
    return x;
  } else {
    return to_float(x);
  }
}
template <class S, class T>
inline S storage_of(T x) {
  if constexpr (kSameType<S, T>) {
    return x;
  } else if constexpr (std::is_same<S, bfloat16_bits>::value) {
    return to_bfloat16(x);
  } else {
    return to_float16(x);
  }
}

// dst[0 .. n) = src[0 .. n) converted to T (a row of Q packed per block, a K or V tile).
template <class V, class S>
inline void widen_row(const S* src, int64_t n, typename V::Scalar* dst) {
  constexpr int L = V::kLanes;
  int64_t c = 0;
  for (; c + L <= n; c += L) load_as<V>(src + c).store(dst + c);
  if (c < n) load_partial_as<V>(src + c, static_cast<int>(n - c)).store_partial(dst + c, static_cast<int>(n - c));
}

// dst[0 .. n) = src[0 .. n) * factor, rounded once to S.
template <class V, class S>
inline void store_row_scaled(const typename V::Scalar* src, int64_t n, V factor, S* dst) {
  constexpr int L = V::kLanes;
  int64_t c = 0;
  for (; c + L <= n; c += L) store_as<V>(V::load(src + c) * factor, dst + c);
  if (c < n) {
    const int tail = static_cast<int>(n - c);
    store_partial_as<V>(V::load_partial(src + c, tail) * factor, dst + c, tail);
  }
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
