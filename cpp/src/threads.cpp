// Thread count of the kernels (which run on the pool in parallel.cpp), without an OpenMP runtime.
//
// Three process-wide settings, each one atomic that every thread reads, combine by taking the smallest:
// - the default: OMP_NUM_THREADS when it holds a valid value, else the CPUs of the process' affinity
//   mask. Read once, at the first call that needs it (the module does so when it is imported), as
//   OpenMP runtimes read them at start-up;
// - set_num_threads(n), the user's choice (0: none);
// - set_thread_limit(n), the limit threadpoolctl sets and restores (python/attnfast/_threadpool.py;
//   0: none). It is separate from the user's choice so that leaving `with threadpool_limits(1):`
//   restores exactly what was there, whatever set_num_threads said inside or outside the block.
// Neither setting raises the count above the default.
//
// OMP_NUM_THREADS is parsed as OpenMP specifies it: a comma-separated list of positive integers, one per
// nesting level, of which attnfast (which does not nest) uses the first. Surrounding white space and a
// '+' sign are allowed; a value above kMaxThreads means kMaxThreads. An empty value counts as unset.
// Anything else (0, a '-' sign, a fraction, an empty list entry, trailing text) makes the whole
// variable invalid: it is ignored, as OpenMP runtimes ignore it, and default_threads_problem() says so
// for the module to warn about.
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <string>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

#include "attnfast/kernels.h"
#include "attnfast/parallel.h"

namespace attnfast {
namespace {
std::atomic<int> g_requested_threads{0};
std::atomic<int> g_thread_limit{0};

int clamp_to_max(int n) { return n < kMaxThreads ? n : kMaxThreads; }

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// One list entry, [begin, end) with its white space: true and *value (saturated at kMaxThreads) when it
// is a positive decimal integer.
bool parse_entry(const char* begin, const char* end, int* value) {
  while (begin < end && is_space(*begin)) ++begin;
  while (end > begin && is_space(end[-1])) --end;
  if (begin < end && *begin == '+') ++begin;  // as strtoul, which libgomp uses, accepts
  if (begin == end) return false;
  int n = 0;
  for (const char* c = begin; c < end; ++c) {
    if (*c < '0' || *c > '9') return false;
    n = n * 10 + (*c - '0');
    if (n > kMaxThreads) n = kMaxThreads + 1;  // saturates: any longer digit string is also too large
  }
  if (n == 0) return false;
  *value = clamp_to_max(n);
  return true;
}

// 1: *threads is the first entry of a valid list; 0: empty (unset); -1: invalid.
int parse_omp_num_threads(const char* text, int* threads) {
  const char* c = text;
  while (is_space(*c)) ++c;
  if (*c == '\0') return 0;  // OMP_NUM_THREADS= (as shell scripts write to unset it)
  bool first = true;
  for (const char* begin = text;; ) {
    const char* end = begin;
    while (*end != '\0' && *end != ',') ++end;
    int value = 0;
    if (!parse_entry(begin, end, &value)) return -1;
    if (first) *threads = value;
    first = false;
    if (*end == '\0') return 1;
    begin = end + 1;
  }
}

// CPUs this process may run on (its affinity mask, which taskset, cgroup cpusets and
// os.sched_setaffinity set), 0 if unknown. The mask may be larger than a cpu_set_t: the kernel says
// EINVAL until the buffer holds all of it.
int affinity_cpus() {
#if defined(__linux__) && defined(CPU_ALLOC)
  for (int cpus = 1024; cpus <= (1 << 20); cpus *= 2) {
    cpu_set_t* set = CPU_ALLOC(cpus);
    if (set == nullptr) return 0;
    const size_t bytes = CPU_ALLOC_SIZE(cpus);
    CPU_ZERO_S(bytes, set);
    const int status = sched_getaffinity(0, bytes, set);
    const int error = errno;
    const int count = status == 0 ? CPU_COUNT_S(bytes, set) : 0;
    CPU_FREE(set);
    if (status == 0) return count;
    if (error != EINVAL) return 0;
  }
#endif
  return 0;
}

struct DefaultThreads {
  int threads = 1;
  const char* source = "";
  std::string problem;
};

DefaultThreads find_default_threads() {
  DefaultThreads d;
  const char* omp = std::getenv("OMP_NUM_THREADS");
  int threads = 0;
  const int parsed = omp ? parse_omp_num_threads(omp, &threads) : 0;
  if (parsed == 1) {
    d.threads = threads;
    d.source = "OMP_NUM_THREADS";
    return d;
  }
  const int cpus = affinity_cpus();
  const int hardware = static_cast<int>(std::thread::hardware_concurrency());
  if (cpus > 0) {
    d.threads = clamp_to_max(cpus);
    d.source = "CPU affinity";
  } else {
    d.threads = clamp_to_max(hardware > 0 ? hardware : 1);
    d.source = "hardware threads";
  }
  if (parsed == -1) {
    d.problem = std::string("OMP_NUM_THREADS='") + omp +
                "' is not a positive integer (or a comma-separated list of them), so attnfast ignores it and uses " +
                std::to_string(d.threads) + " threads (" + d.source + "); set it to a count such as " +
                "OMP_NUM_THREADS=1, or unset it";
  }
  return d;
}

// Never destroyed: a daemon thread may still read it while the process' static destructors run.
const DefaultThreads& defaults() {
  static const DefaultThreads* const d = new DefaultThreads(find_default_threads());
  return *d;
}
}  // namespace

int default_num_threads() { return defaults().threads; }
const char* default_threads_source() { return defaults().source; }
std::string default_threads_problem() { return defaults().problem; }

int configured_num_threads() {
  int threads = defaults().threads;
  const int requested = g_requested_threads.load(std::memory_order_relaxed);
  const int limit = g_thread_limit.load(std::memory_order_relaxed);
  if (requested > 0 && requested < threads) threads = requested;
  if (limit > 0 && limit < threads) threads = limit;
  return threads;
}

int get_num_threads() { return reserve_threads(configured_num_threads()); }

void set_num_threads(int n) {
  g_requested_threads.store(n > 0 ? clamp_to_max(n) : 0, std::memory_order_relaxed);
  // An explicit choice is the moment to find out again whether the OS now lets the pool grow.
  retry_thread_start();
}

int get_thread_limit() { return g_thread_limit.load(std::memory_order_relaxed); }

// No retry_thread_start() here: threadpoolctl sets and restores the limit around every block, and a
// refused start would otherwise be attempted (and reported) again after each one.
void set_thread_limit(int n) { g_thread_limit.store(n > 0 ? clamp_to_max(n) : 0, std::memory_order_relaxed); }

}  // namespace attnfast

// The C entry points threadpoolctl's controller for attnfast calls through ctypes, on the loaded
// module file it found (python/attnfast/_threadpool.py); their names also tell it that the file is
// attnfast's. The only symbols the module exports besides PyInit__attnfast.
#if defined(_WIN32)
#define ATTNFAST_EXPORT extern "C" __declspec(dllexport)
#else
#define ATTNFAST_EXPORT extern "C" __attribute__((visibility("default")))
#endif

ATTNFAST_EXPORT int attnfast_threadpool_num_threads() { return attnfast::configured_num_threads(); }
ATTNFAST_EXPORT int attnfast_threadpool_get_limit() { return attnfast::get_thread_limit(); }
ATTNFAST_EXPORT void attnfast_threadpool_set_limit(int n) { attnfast::set_thread_limit(n); }
ATTNFAST_EXPORT const char* attnfast_threadpool_version() { return ATTNFAST_VERSION; }
