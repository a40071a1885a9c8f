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
  static constexpr int kQkMR = 4, kQkNRV = 2;      // fused S^T = K Q^T
  static constexpr int kPvMR = 4, kPvNRV = 2;      // fused O += P V
};
}  // namespace scalar
}  // namespace attnfast

#include "target_body.h"
