// Small helpers shared by every kernel file of one SIMD target: integer min/max (kept in the target's
// namespace on purpose: std::min/std::max instantiated in a translation unit built with -mavx512f could
// be merged by the linker into code that runs on older CPUs), scratch memory and status codes.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attnfast/parallel.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

enum Status : int { kOk = 0, kOutOfMemory = 1 };

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <class T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}
template <class T>
inline T pos_inf() {
  return std::numeric_limits<T>::infinity();
}

// x where keep is nonzero, -inf elsewhere, without a branch: a mask's bytes are data, and a branch on
// them mispredicts as often as the mask changes.
template <class T>
inline T keep_or_neg_inf(T x, uint8_t keep) {
  using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  const T minus_inf = neg_inf<T>();
  U x_bits, inf_bits;
  std::memcpy(&x_bits, &x, sizeof x);
  std::memcpy(&inf_bits, &minus_inf, sizeof minus_inf);
  const U keep_all = U(0) - U(keep != 0);  // all ones when kept
  const U r = (x_bits & keep_all) | (inf_bits & ~keep_all);
  T out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

// Elements per block of a sum vectorised along its terms (one partial sum per lane, chains of
// kVectorSumBlock / lanes terms): the dot and additive score reductions over the features, and the
// stage softmax's row sums.
constexpr int64_t kVectorSumBlock = 1024;

// sum of block_sum(begin, length) over [begin, begin + n), cut as a tree: n <= block is one call;
// otherwise pieces of block^j elements (the largest such power below n, so at most `block` pieces),
// each a tree itself, added in order. Keeps the rounding error of a long sum near that of one block
// per level; the cut depends on n only.
template <class T, class F>
inline T tree_sum(int64_t begin, int64_t n, int64_t block, const F& block_sum) {
  if (n <= block) return block_sum(begin, n);
  int64_t piece = block;
  while (piece * block < n) piece *= block;
  T total = T(0);
  for (int64_t i = 0; i < n; i += piece) total += tree_sum<T>(begin + i, imin(piece, n - i), block, block_sum);
  return total;
}

// Runs f(task, slot) for every task in [0, tasks) on up to `threads` threads (attnfast/parallel.h):
// slot < threads indexes per-thread scratch. The lambda's type is local to this target's namespace,
// so the trampoline below is too.
template <class F>
inline void parallel_for(int threads, int64_t tasks, F&& f) {
  if (threads <= 1 || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) f(t, 0);
    return;
  }
  using Fn = typename std::remove_reference<F>::type;
  run_parallel(
      threads, tasks,
      [](void* context, int64_t task, int slot, NextTask*) { (*static_cast<Fn*>(context))(task, slot); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// parallel_for for tasks that prefetch the inputs of the task their thread runs next:
// f(task, slot, NextTask& next), where next.claim() names that task (-1: none).
template <class F>
inline void parallel_for_with_next(int threads, int64_t tasks, F&& f) {
  using Fn = typename std::remove_reference<F>::type;
  run_parallel(
      threads, tasks,
      [](void* context, int64_t task, int slot, NextTask* next) { (*static_cast<Fn*>(context))(task, slot, *next); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

// One cache-aligned block carved into equal per-thread slices, allocated before the parallel region so
// that running out of memory is reported (MemoryError in Python) instead of failing inside a worker.
class ThreadScratch {
 public:
  ThreadScratch(int threads, int64_t bytes_per_thread) {
    stride_ = round_up(imax(bytes_per_thread, 64), 64);
    const int64_t total = stride_ * (threads > 0 ? threads : 1);
    base_ = static_cast<unsigned char*>(std::aligned_alloc(64, static_cast<size_t>(total)));
  }
  ~ThreadScratch() { std::free(base_); }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  bool ok() const { return base_ != nullptr; }
  unsigned char* slice(int thread) const { return base_ + stride_ * thread; }

 private:
  unsigned char* base_ = nullptr;
  int64_t stride_ = 0;
};

// Software prefetch, for reading, of `rows` rows of `row_elements` elements each (every 64-byte line they
// touch). For the few places where the hardware prefetchers leave misses; each caller says which. A
// prefetch is a hint: it never changes a result.
template <class T>
inline void prefetch_rows(const T* first, int64_t row_stride, int64_t rows, int64_t row_elements) {
  const int64_t row_bytes = row_elements * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < rows; ++i) {
    const char* row = reinterpret_cast<const char*>(first + i * row_stride);
    for (int64_t offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(row + offset, 0, 2);
  }
}

// Bump allocator over one thread's slice: hands out 64-byte aligned arrays.
class Carver {
 public:
  explicit Carver(unsigned char* p) : p_(p) {}
  template <class T>
  T* take(int64_t count) {
    T* r = reinterpret_cast<T*>(p_);
    p_ += round_up(count * static_cast<int64_t>(sizeof(T)), 64);
    return r;
  }
  template <class T>
  static int64_t bytes(int64_t count) {
    return round_up(count * static_cast<int64_t>(sizeof(T)), 64);
  }

 private:
  unsigned char* p_;
};

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
