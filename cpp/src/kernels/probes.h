// Hardware probes used by the benchmark to express results as a fraction of what this machine can do.
// They only do a fixed amount of work; the caller (baseline-compiled binding code) times them, so no
// std::chrono template is instantiated under this target's flags.
//   fma_chains:  `iterations` x 12 independent FMA chains per thread, no memory traffic:
//                FLOPs = 2 * lanes * 12 * iterations * threads.
//   read_sum:    vectorised sum of a float buffer, each thread a contiguous slice.
// Not used by any kernel. dtypes: float. ISA: the including target's V.
#pragma once
#include "kernels/common.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

constexpr int kProbeChains = 12;  // enough independent chains to cover FMA latency x ports

// Returns FLOPs done (as a double) so the caller can divide by its own wall time.
inline double fma_chains(int64_t iterations, int threads) {
  using V = Vec<float>;
  float sums[256] = {};
  const int n = threads < 256 ? threads : 256;
  parallel_for(n, n, [&](int64_t task, int /*slot*/) {
    decltype(V::v) acc[kProbeChains];  // native vectors: kept in registers (see microkernel.h)
#pragma GCC unroll 16
    for (int c = 0; c < kProbeChains; ++c) acc[c] = V::set1(float(c) * 1e-3f).v;
    const V a = V::set1(0.999999f), b = V::set1(1e-7f);
    for (int64_t it = 0; it < iterations; ++it)
#pragma GCC unroll 16
      for (int c = 0; c < kProbeChains; ++c) acc[c] = fmadd(V{acc[c]}, a, b).v;
    V s = V::zero();
    for (int c = 0; c < kProbeChains; ++c) s = s + V{acc[c]};
    sums[task] = reduce_add(s);  // keeps the chains observable
  });
  volatile float keep = sums[0];
  (void)keep;
  return 2.0 * V::kLanes * kProbeChains * double(iterations) * n;
}

inline float read_sum(const float* data, int64_t n, int threads) {
  using V = Vec<float>;
  float sums[256] = {};
  const int parts = threads < 256 ? threads : 256;
  const int64_t per = round_up(ceil_div(n, parts), V::kLanes * 4);
  parallel_for(parts, parts, [&](int64_t task, int /*slot*/) {
    const int64_t begin = imin(n, per * task), end = imin(n, begin + per);
    V a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    int64_t i = begin;
    for (; i + 4 * V::kLanes <= end; i += 4 * V::kLanes) {
      a0 = a0 + V::load(data + i);
      a1 = a1 + V::load(data + i + V::kLanes);
      a2 = a2 + V::load(data + i + 2 * V::kLanes);
      a3 = a3 + V::load(data + i + 3 * V::kLanes);
    }
    float s = reduce_add((a0 + a1) + (a2 + a3));
    for (; i < end; ++i) s += data[i];
    sums[task] = s;
  });
  float total = 0;
  for (int t = 0; t < parts; ++t) total += sums[t];
  return total;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
