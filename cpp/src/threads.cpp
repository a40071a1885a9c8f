// Thread count of the kernels. An explicit set_num_threads(n) wins; otherwise the OpenMP default of the
// calling thread is used, which is what OMP_NUM_THREADS and threadpoolctl.threadpool_limits() control.
#include <atomic>

#include "attnfast/kernels.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace attnfast {
namespace {
std::atomic<int> g_requested_threads{0};
}

int get_num_threads() {
  const int requested = g_requested_threads.load(std::memory_order_relaxed);
#if defined(_OPENMP)
  const int omp_default = omp_get_max_threads();
  // threadpoolctl lowers the OpenMP default; respect that limit even after set_num_threads.
  if (requested > 0) return requested < omp_default ? requested : omp_default;
  return omp_default;
#else
  (void)requested;
  return 1;
#endif
}

void set_num_threads(int n) { g_requested_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

bool openmp_enabled() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace attnfast
