// AVX2 + FMA target (Haswell and later, Zen). This file alone is built with -mavx2 -mfma.
// 16 ymm registers: 12 accumulators + B loads + a broadcast per microkernel step.
#define ATTNFAST_TARGET_NS avx2
#define ATTNFAST_TARGET_NAME "avx2"
#include "simd/vec_avx2.h"

namespace attnfast {
namespace avx2 {
template <class T>
using Vec = Avx2Vec<T>;
struct Tiles {
  static constexpr int kGemmMR = 6, kGemmNRV = 2;  // 6 x 16 floats
  static constexpr int kAttnMR = 4, kAttnNRV = 3;    // fused attention: 4 keys (Q.K^T) or 4 value features
                                                     // (P.V) x 24 queries; 12 accumulators + 3 loads + 1 broadcast = 16 registers
  static constexpr int kGradMR = 6, kGradNRV = 2;  // backward dV, dK, dQ: 6 rows x 16 floats
};
}  // namespace avx2
}  // namespace attnfast

#include "target_body.h"
