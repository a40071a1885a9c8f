// The one register-blocked GEMM microkernel every matrix product in attnfast goes through
// (scores Q K^T, aggregate P V, and both products of the fused attention).
//
//   C[r][n] (=, or +=) sum_k A(r, k) * B(k, n),   r < MR, n < NR = NRV * lanes
//   A(r, k) = a_rows[r][k * a_k_stride]   broadcast from memory (any layout of A works)
//   B(k, :) = b + k * b_k_stride          NRV vector loads; with kPartialB the last vector loads only
//                                         b_last_lanes lanes (masked), so B may be an unpadded row tail.
// MR * NRV accumulators stay in registers for the whole depth: per step NRV loads + MR broadcasts feed
// MR * NRV FMAs. Accumulation is in the operand precision, in k order, one FMA per term.
#pragma once
#include <cstdint>

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// The accumulators are held as the ISA's native vector type (V::v), not as V wrappers: GCC scalarises a
// 2-D array of native vectors into registers reliably, while an array of wrapper structs was kept in
// memory too, costing MR * NRV stores per step and half the FMA throughput.
template <class V, int MR, int NRV, bool kAccumulate, bool kPartialB, bool kUnitAStride>
inline void gemm_microkernel(int64_t depth, const typename V::Scalar* const* a_rows, int64_t a_k_stride,
                             const typename V::Scalar* b, int64_t b_k_stride, int b_last_lanes,
                             typename V::Scalar* c, int64_t c_row_stride, typename V::Scalar c_scale) {
  using T = typename V::Scalar;
  using Native = decltype(V::v);
  constexpr int L = V::kLanes;
  Native acc[MR][NRV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int n = 0; n < NRV; ++n) acc[r][n] = kAccumulate ? V::load(c + r * c_row_stride + n * L).v : V::zero().v;
  const T* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r] = a_rows[r];
  const int64_t ak = kUnitAStride ? 1 : a_k_stride;
  for (int64_t k = 0; k < depth; ++k) {
    V bv[NRV];
#pragma GCC unroll 16
    for (int n = 0; n < NRV; ++n)
      bv[n] = (kPartialB && n == NRV - 1) ? V::load_partial(b + n * L, b_last_lanes) : V::load(b + n * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V av = V::broadcast(a[r] + k * ak);
#pragma GCC unroll 16
      for (int n = 0; n < NRV; ++n) acc[r][n] = fmadd(av, bv[n], V{acc[r][n]}).v;
    }
    b += b_k_stride;
  }
  const V s = V::set1(c_scale);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int n = 0; n < NRV; ++n) {
      const V out = kAccumulate ? V{acc[r][n]} : V{acc[r][n]} * s;
      out.store(c + r * c_row_stride + n * L);
    }
}

// Fills a_rows with MR row pointers base + r * row_stride for r < valid_rows, repeating the last valid
// row beyond it: the microkernel then reads only valid memory and the caller discards those rows.
template <class T, int MR>
inline void clamped_rows(const T* base, int64_t row_stride, int64_t valid_rows, const T** a_rows) {
  for (int r = 0; r < MR; ++r) a_rows[r] = base + (r < valid_rows ? r : valid_rows - 1) * row_stride;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
