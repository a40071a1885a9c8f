// Thread count of the kernels (which run on the pool in parallel.cpp). An explicit set_num_threads(n)
// wins, capped by the OpenMP default of the calling thread, which is what OMP_NUM_THREADS and
// threadpoolctl.threadpool_limits() control. Built without OpenMP: the hardware thread count.
#include <atomic>
#include <thread>

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
  const int hardware = static_cast<int>(std::thread::hardware_concurrency());
  const int available = hardware > 0 ? hardware : 1;
  return requested > 0 && requested < available ? requested : available;
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
