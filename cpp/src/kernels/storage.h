// Loads and stores between a storage type S and the compute type T = V::Scalar, for kernels written
// once over both: S = T is a plain load or store, a 16-bit S goes through the target's conversions
// (simd/vec_*.h: exact widening on load, one round-to-nearest-even on store). Every kernel reads its
// S operands through these, so a new storage type is a new set of conversions, not new kernels.
// dtypes: S in {T, float16_bits, bfloat16_bits, int8_t} (the 16-bit types and int8 with T = float
// only). ISA: the including target's V.
// int8 (a quantised KV cache) is read only: its values are widened exactly (an int8 is a float), and
// the scale each row stands with (AttentionParams::k_scale / v_scale) is the kernel's to apply, after
// the products (row-wise path) or once per element into a tile (widen_row_scaled). An int8 cache's
// queries and result are float32 (q_wide, out_wide): the int8 stores below exist only so that the
// kernels' result paths compile for S = int8_t, and round to nearest even with saturation.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attnfast/params.h"
#include "simd/half_bits.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class S, class T>
constexpr bool kSameType = std::is_same<typename std::remove_const<S>::type, T>::value;
template <class S>
constexpr bool kInt8Storage = kSameType<S, int8_t>;

template <class V, class S>
inline V load_as(const S* p) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    return V::load(p);
  } else {
    return load_converted(p);
  }
}

// A partial vector of 16-bit values (a row's tail) goes through a buffer of one vector, for every target:
// no x86 target has a 16-bit masked load that SIMDe emulates without touching the masked lanes' memory,
// and a tail is converted once per row.
template <class V, class S>
inline V load_partial_as(const S* p, int n) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    return V::load_partial(p, n);
  } else {
    S lanes[V::kLanes] = {};
    std::memcpy(lanes, p, sizeof(S) * n);
    return load_converted(lanes);
  }
}

template <class T>
inline int8_t saturated_int8(T x) {
  const T r = std::nearbyint(x);  // the default rounding mode: to nearest even
  return r >= T(127) ? int8_t(127) : r <= T(-128) ? int8_t(-128) : r == r ? static_cast<int8_t>(r) : int8_t(0);
}

template <class V, class S>
inline void store_as(V x, S* p) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    x.store(p);
  } else if constexpr (kInt8Storage<S>) {
    typename V::Scalar lanes[V::kLanes];
    x.store(lanes);
    for (int i = 0; i < V::kLanes; ++i) p[i] = saturated_int8(lanes[i]);
  } else {
    store_converted(x, p);
  }
}

template <class V, class S>
inline void store_partial_as(V x, S* p, int n) {
  if constexpr (kSameType<S, typename V::Scalar>) {
    x.store_partial(p, n);
  } else {
    S lanes[V::kLanes];
    store_as<V>(x, lanes);
    std::memcpy(p, lanes, sizeof(S) * n);
  }
}

// One element, for scalar loops (strided rows, edges).
template <class T, class S>
inline T scalar_as(S x) {
  if constexpr (kSameType<S, T>) {
    return x;
  } else if constexpr (kInt8Storage<S>) {
    return static_cast<T>(x);
  } else {
    return to_float(x);
  }
}
template <class S, class T>
inline S storage_of(T x) {
  if constexpr (kSameType<S, T>) {
    return x;
  } else if constexpr (kInt8Storage<S>) {
    return saturated_int8(x);
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

// dst[0 .. n) = src[0 .. n) * scale: a row of an int8 cache dequantised into a float tile. The int8 is
// widened exactly; the product with the float scale is rounded once (relative error <= 2^-24, none
// where the scale times the int8 fits in 24 bits, e.g. a power-of-two scale).
template <class V>
inline void widen_row_scaled(const int8_t* src, int64_t n, typename V::Scalar scale, typename V::Scalar* dst) {
  constexpr int L = V::kLanes;
  const V factor = V::set1(scale);
  int64_t c = 0;
  for (; c + L <= n; c += L) (load_as<V>(src + c) * factor).store(dst + c);
  if (c < n) {
    const int tail = static_cast<int>(n - c);
    (load_partial_as<V>(src + c, tail) * factor).store_partial(dst + c, tail);
  }
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
