// The one register-blocked GEMM microkernel every matrix product in attnfast goes through
// (scores Q K^T, aggregate P V, and both products of the fused attention).
//
//   C[r][n] (=, or +=) sum_k A(r, k) * B(k, n),   r < MR, n < NR = NRV * lanes
//   A(r, k) = a_rows[r][k * a_k_stride]   broadcast from memory (any layout of A works)
//   B(k, :) = b + k * b_k_stride          NRV vector loads; with kPartialB the last vector loads only
//                                         b_last_lanes lanes (masked), so B may be an unpadded row tail.
// MR * NRV accumulators stay in registers for a depth of up to kDepthBlock: per step NRV loads + MR
// broadcasts feed MR * NRV FMAs. Accumulation is in the operand precision, in k order, one FMA per term.
// A longer depth is summed as a tree (gemm_block_sums, gemm_microkernel_blocked): chains of at most
// kDepthBlock terms, whose results are added in k order in chains of at most kDepthBlock again, and so
// on. The rounding error of a sum of n terms is then at most about kDepthBlock * ceil(log_kDepthBlock n)
// eps relative to sum |terms| (1536 eps for n = 2^20, against n eps for one chain) and in practice far
// less, while one long chain of same-sign terms drifts by ~1e-4 in float32 at n = 2^20 (every add rounds
// against the whole partial sum). The blocks depend on the depth only, never on the thread count.
#pragma once
#include <cstdint>

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Terms of one accumulation chain. Depths up to it (every common head size, and key counts up to 512 in
// the aggregate) run the single chain below; beyond it the tree costs one tile add per block, ~1-2% of
// the block's FMAs at two to eight blocks.
constexpr int64_t kDepthBlock = 512;

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

// gemm_microkernel for kDepthBlock < depth <= kDepthBlock^2: the accumulators restart from zero every
// kDepthBlock steps; each block's sums are added, in k order, into a tile on the stack, and the last
// block's straight into the result C (= scale * sums, or C += sums). Out of line, as the tree below:
// neither is part of the common, short-depth code.
template <class V, int MR, int NRV, bool kAccumulate, bool kPartialB, bool kUnitAStride>
__attribute__((noinline)) void gemm_block_sums(int64_t depth, const typename V::Scalar* const* a_rows,
                                               int64_t a_k_stride, const typename V::Scalar* b, int64_t b_k_stride,
                                               int b_last_lanes, typename V::Scalar* c, int64_t c_row_stride,
                                               typename V::Scalar c_scale) {
  using T = typename V::Scalar;
  using Native = decltype(V::v);
  constexpr int L = V::kLanes;
  constexpr int NR = NRV * L;
  alignas(64) T total[MR * NR];
  const T* a[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r] = a_rows[r];
  const int64_t ak = kUnitAStride ? 1 : a_k_stride;
  for (int64_t k0 = 0; k0 < depth; k0 += kDepthBlock) {
    const bool last = depth - k0 <= kDepthBlock;
    const int64_t k1 = last ? depth : k0 + kDepthBlock;
    Native acc[MR][NRV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int n = 0; n < NRV; ++n) acc[r][n] = V::zero().v;
    for (int64_t k = k0; k < k1; ++k) {
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
        T* t = total + r * NR + n * L;
        const V sum = k0 == 0 ? V{acc[r][n]} : V::load(t) + V{acc[r][n]};
        if (!last) {
          sum.store(t);
        } else {
          T* out = c + r * c_row_stride + n * L;
          (kAccumulate ? V::load(out) + sum : sum * s).store(out);
        }
      }
  }
}

// gemm_microkernel for depth > kDepthBlock^2: pieces of kDepthBlock^j terms (the largest such power below
// depth, so at most kDepthBlock pieces), each summed as a tree into a tile, the tiles added in k order.
template <class V, int MR, int NRV, bool kAccumulate, bool kPartialB, bool kUnitAStride>
__attribute__((noinline)) void gemm_microkernel_blocked(int64_t depth, const typename V::Scalar* const* a_rows,
                                                        int64_t a_k_stride, const typename V::Scalar* b,
                                                        int64_t b_k_stride, int b_last_lanes,
                                                        typename V::Scalar* c, int64_t c_row_stride,
                                                        typename V::Scalar c_scale) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  constexpr int NR = NRV * L;
  if (depth <= kDepthBlock * kDepthBlock) {
    gemm_block_sums<V, MR, NRV, kAccumulate, kPartialB, kUnitAStride>(depth, a_rows, a_k_stride, b, b_k_stride,
                                                                      b_last_lanes, c, c_row_stride, c_scale);
    return;
  }
  int64_t piece = kDepthBlock * kDepthBlock;
  while (piece * kDepthBlock < depth) piece *= kDepthBlock;
  const int64_t ak = kUnitAStride ? 1 : a_k_stride;
  alignas(64) T total[MR * NR];
  alignas(64) T part[MR * NR];
  for (int64_t k0 = 0; k0 < depth; k0 += piece) {
    const T* a_piece[MR];
    for (int r = 0; r < MR; ++r) a_piece[r] = a_rows[r] + k0 * ak;
    gemm_microkernel_blocked<V, MR, NRV, false, kPartialB, kUnitAStride>(
        depth - k0 < piece ? depth - k0 : piece, a_piece, a_k_stride, b + k0 * b_k_stride, b_k_stride, b_last_lanes,
        k0 == 0 ? total : part, NR, T(1));
    if (k0 > 0)
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
