// AVX-512 target (Skylake-SP and later, Zen 4). This file alone is built with -mavx512f/vl/bw/dq.
// 32 zmm registers: 24 accumulators + B loads + a broadcast per microkernel step.
#define ATTNFAST_TARGET_NS avx512
#define ATTNFAST_TARGET_NAME "avx512"
#include "simd/vec_avx512.h"

namespace attnfast {
namespace avx512 {
template <class T>
using Vec = Avx512Vec<T>;
struct Tiles {
  static constexpr int kGemmMR = 12, kGemmNRV = 2;  // 12 x 32 floats
  static constexpr int kAttnMR = 8, kAttnNRV = 3;    // fused attention: 8 keys or value features x 48 queries
  static constexpr int kGradMR = 4, kGradNRV = 4;   // backward dV, dK, dQ: 4 rows x 64 floats (D = 64 in one panel)
};
}  // namespace avx512
}  // namespace attnfast

#include "target_body.h"
