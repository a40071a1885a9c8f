// The one register-blocked GEMM microkernel every matrix product in attnfast goes through
// (scores Q K^T, aggregate P V, and both products of the fused attention).
//
//   C[r][n] (=, or +=) sum_k A(r, k) * B(k, n),   r < MR, n < NR = NRV * lanes
//   A(r, k) = a_rows[r][k * a_k_stride]   broadcast from memory (any layout of A works)
//   B(k, :) = b + k * b_k_stride          NRV vector loads; with kPartialB the last vector loads only
//                                         b_last_lanes lanes (masked), so B may be an unpadded row tail.
// MR * NRV accumulators stay in registers for a depth of up to kDepthBlock: per step NRV loads + MR
// broadcasts feed MR * NRV FMAs. Accumulation is in the operand precision, in k order, one FMA per term.
// A longer depth is summed as a tree (gemm_microkernel_blocked): chains of at most kDepthBlock terms,
// whose results are added in k order in chains of at most kDepthBlock again, and so on. A float32 sum
// over Lk = 1M keys or D = 64K features then keeps an error of ~sqrt(kDepthBlock) eps per level in
// practice (kDepthBlock eps per level at worst) instead of one chain's ~sqrt(depth) (depth eps).
// The blocks depend on the depth only, so results stay independent of the thread count.
#pragma once
#include <cstdint>

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Terms of one accumulation chain. Depths up to it (every common head size, D = 64..256) run the one
// chain exactly as before; beyond it the tree costs one tile add per block, < 1% of the block's FMAs.
constexpr int64_t kDepthBlock = 256;

template <class V, int MR, int NRV, bool kAccumulate, bool kPartialB, bool kUnitAStride>
__attribute__((noinline)) void gemm_microkernel_blocked(int64_t depth, const typename V::Scalar* const* a_rows,
                                                        int64_t a_k_stride, const typename V::Scalar* b,
                                                        int64_t b_k_stride, int b_last_lanes,
                                                        typename V::Scalar* c, int64_t c_row_stride,
                                                        typename V::Scalar c_scale);

// The accumulators are held as the ISA's native vector type (V::v), not as V wrappers: GCC scalarises a
// 2-D array of native vectors into registers reliably, while an array of wrapper structs was kept in
// memory too, costing MR * NRV stores per step and half the FMA throughput.
template <class V, int MR, int NRV, bool kAccumulate, bool kPartialB, bool kUnitAStride>
inline void gemm_microkernel(int64_t depth, const typename V::Scalar* const* a_rows, int64_t a_k_stride,
                             const typename V::Scalar* b, int64_t b_k_stride, int b_last_lanes,
                             typename V::Scalar* c, int64_t c_row_stride, typename V::Scalar c_scale) {
  if (depth > kDepthBlock) {
    gemm_microkernel_blocked<V, MR, NRV, kAccumulate, kPartialB, kUnitAStride>(
        depth, a_rows, a_k_stride, b, b_k_stride, b_last_lanes, c, c_row_stride, c_scale);
    return;
  }
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

// The tree for depth > kDepthBlock: the depth is cut into pieces of kDepthBlock^j terms (the largest
// such power below depth), each summed by gemm_microkernel (itself a tree when the piece is longer than
// one block) into a tile, and the pieces' tiles are added in k order. Out of line: it holds two tiles on
// the stack and is not part of the common (short depth) code.
template <class V, int MR, int NRV, bool kAccumulate, bool kPartialB, bool kUnitAStride>
__attribute__((noinline)) void gemm_microkernel_blocked(int64_t depth, const typename V::Scalar* const* a_rows,
                                                        int64_t a_k_stride, const typename V::Scalar* b,
                                                        int64_t b_k_stride, int b_last_lanes,
                                                        typename V::Scalar* c, int64_t c_row_stride,
                                                        typename V::Scalar c_scale) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  constexpr int NR = NRV * L;
  int64_t piece = kDepthBlock;
  while (piece * kDepthBlock < depth) piece *= kDepthBlock;  // at most kDepthBlock pieces
  const int64_t ak = kUnitAStride ? 1 : a_k_stride;
  alignas(64) T total[MR * NR];
  alignas(64) T part[MR * NR];
  for (int64_t k0 = 0; k0 < depth; k0 += piece) {
    const int64_t len = depth - k0 < piece ? depth - k0 : piece;
    const T* a_piece[MR];
    for (int r = 0; r < MR; ++r) a_piece[r] = a_rows[r] + k0 * ak;
    T* dst = k0 == 0 ? total : part;
    gemm_microkernel<V, MR, NRV, false, kPartialB, kUnitAStride>(len, a_piece, a_k_stride, b + k0 * b_k_stride,
                                                                 b_k_stride, b_last_lanes, dst, NR, T(1));
    if (k0 == 0) continue;
    for (int i = 0; i < MR * NR; i += L) (V::load(total + i) + V::load(part + i)).store(total + i);
  }
  const V s = V::set1(c_scale);
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NRV; ++n) {
      T* out = c + r * c_row_stride + n * L;
      const V t = V::load(total + r * NR + n * L);
      (kAccumulate ? V::load(out) + t : t * s).store(out);
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
