// Scalar target: portable C++ with one-lane "vectors"; runs on any CPU. Built with the baseline flags.
#define ATTNFAST_TARGET_NS scalar
#define ATTNFAST_TARGET_NAME "scalar"
#include "simd/vec_scalar.h"

namespace attnfast {
namespace scalar {
template <class T>
using Vec = ScalarVec<T>;
struct Tiles {
  static constexpr int kGemmMR = 4, kGemmNRV = 2;  // scores and aggregate
  static constexpr int kAttnMR = 4, kAttnNRV = 2;    // fused attention: 4 keys or value features x 2 queries
  static constexpr int kGradMR = 4, kGradNRV = 2;  // backward dV, dK, dQ
};
}  // namespace scalar
}  // namespace attnfast

#include "target_body.h"
