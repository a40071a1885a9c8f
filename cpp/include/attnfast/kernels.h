// attnfast C++ core API: the kernel table each SIMD target provides, and the dispatch that picks one.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "attnfast/params.h"

namespace attnfast {

// Kernels return 0 on success, 1 when scratch memory could not be allocated (nothing else can fail:
// every argument was validated before the call).
template <class T>
struct KernelTable {
  int (*scores_dot)(const ScoresDotParams<T>&);
  int (*scores_additive)(const ScoresAdditiveParams<T>&);
  int (*softmax)(const SoftmaxParams<T>&);
  int (*aggregate)(const AggregateParams<T>&);
  int (*attention)(const AttentionParams<T>&);
};

struct TargetKernels {
  const char* name;
  KernelTable<float> f32;
  KernelTable<double> f64;
  // Benchmark probes (float32, see kernels/probes.h); the caller times them.
  double (*fma_chains)(int64_t iterations, int threads);
  float (*read_sum)(const float* data, int64_t n, int threads);
};

template <class T>
const KernelTable<T>& table_for(const TargetKernels& k);
template <>
inline const KernelTable<float>& table_for<float>(const TargetKernels& k) { return k.f32; }
template <>
inline const KernelTable<double>& table_for<double>(const TargetKernels& k) { return k.f64; }

// Each target's table, defined in cpp/src/target_<name>.cpp (only those the build compiled exist).
namespace scalar { TargetKernels kernels(); }
namespace avx2 { TargetKernels kernels(); }
namespace avx512 { TargetKernels kernels(); }

// Targets this build contains and this CPU + OS can run, best first.
std::vector<std::string> usable_targets();
// Every target compiled into this build.
std::vector<std::string> compiled_targets();
// The target in use: the best usable one, or the one forced by ATTNFAST_ISA (read once, at first use).
const TargetKernels& active_kernels();
// Switches the target in use (tests pin every target this way); returns false if it is not usable.
bool set_active_target(const std::string& name);
// Value of ATTNFAST_ISA that could not be honoured ("" if none): reported as a warning by Python.
std::string target_request_problem();

// Threads used by the kernels (run on the pool of attnfast/parallel.h): the OpenMP default of the
// calling thread, which threadpoolctl and OMP_NUM_THREADS control, lowered by set_num_threads(n) when
// n > 0 (for every thread of the process), at most kMaxThreads, and at most what the pool could start:
// get_num_threads starts the workers it counts, and reports fewer if the OS refused one
// (attnfast/parallel.h). set_num_threads also lets the pool try again to start refused workers.
constexpr int kMaxThreads = 65536;
int get_num_threads();
void set_num_threads(int n);
bool openmp_enabled();

}  // namespace attnfast
