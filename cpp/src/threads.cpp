// Thread count of the kernels (which run on the pool in parallel.cpp). An explicit set_num_threads(n)
// wins, capped by the OpenMP default of the calling thread, which is what OMP_NUM_THREADS and
// threadpoolctl.threadpool_limits() control. Built without OpenMP: the hardware thread count.
//
// set_num_threads is process-wide: one atomic every thread reads. The OpenMP default is not: it is
// OpenMP's nthreads-var, which omp_set_num_threads (and so threadpoolctl) changes for the calling
// thread only, and attnfast follows OpenMP (and every other OpenMP library in the process) there.
#include <atomic>
#include <thread>

#include "attnfast/kernels.h"
#include "attnfast/parallel.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace attnfast {
namespace {
std::atomic<int> g_requested_threads{0};

int clamp_to_max(int n) { return n < kMaxThreads ? n : kMaxThreads; }

// What the configuration asks for, before the pool says how many threads it has.
int configured_threads() {
  const int requested = g_requested_threads.load(std::memory_order_relaxed);
#if defined(_OPENMP)
  const int omp_default = omp_get_max_threads();
  // threadpoolctl lowers the OpenMP default; respect that limit even after set_num_threads.
  if (requested > 0) return clamp_to_max(requested < omp_default ? requested : omp_default);
  return clamp_to_max(omp_default);
#else
  const int hardware = static_cast<int>(std::thread::hardware_concurrency());
  const int available = hardware > 0 ? hardware : 1;
  return clamp_to_max(requested > 0 && requested < available ? requested : available);
#endif
}
}  // namespace

int get_num_threads() { return reserve_threads(configured_threads()); }

void set_num_threads(int n) {
  g_requested_threads.store(n > 0 ? clamp_to_max(n) : 0, std::memory_order_relaxed);
  // An explicit choice is the moment to find out again whether the OS now lets the pool grow.
  retry_thread_start();
}

bool openmp_enabled() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace attnfast
