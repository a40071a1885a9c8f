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
  static constexpr int kQkMR = 8, kQkNRV = 3;       // 8 keys x 48 queries
  static constexpr int kPvMR = 6, kPvNRV = 4;       // 6 queries x 64 value features
};
}  // namespace avx512
}  // namespace attnfast

#include "target_body.h"
