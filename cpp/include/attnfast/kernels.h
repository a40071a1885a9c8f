// attnfast C++ core API: the kernel table each SIMD target provides, and the dispatch that picks one.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "attnfast/params.h"

namespace attnfast {

// Kernels return 0 on success, 1 when scratch memory could not be allocated (nothing else can fail:
// every argument was validated before the call), and a backward kernel kNoBackwardKernel for a score
// rule it has no kernel for (additive scores over a 16-bit storage type: the Python layer always hands
// over compute-type projections, so only a direct call of the binding can reach it).
// One table per (storage S, compute T) pair. scores_additive exists for S = T only (its operands are
// projections the caller computes in T); a null entry is a pair the target does not provide.
constexpr int kNoBackwardKernel = 2;

template <class S, class T = S>
struct KernelTable {
  int (*scores_dot)(const ScoresDotParams<S, T>&) = nullptr;
  int (*scores_additive)(const ScoresAdditiveParams<T>&) = nullptr;
  int (*softmax)(const SoftmaxParams<S, T>&) = nullptr;
  int (*aggregate)(const AggregateParams<S, T>&) = nullptr;
  int (*attention)(const AttentionParams<S, T>&) = nullptr;
  int (*attention_backward)(const AttentionBackwardParams<S, T>&) = nullptr;
};

struct TargetKernels {
  const char* name;
  KernelTable<double> f64;
  KernelTable<float> f32;
  KernelTable<float16_bits, float> f16;
  KernelTable<bfloat16_bits, float> bf16;
  // int8 K and V with per-row scales (a quantised KV cache): the fused attention only, queries and
  // result in float32.
  KernelTable<int8_t, float> i8;
};

// The table of one (storage, compute) pair: the only place that maps types to tables.
template <class S, class T>
struct TableOf;
template <>
struct TableOf<double, double> {
  static const KernelTable<double>& get(const TargetKernels& k) { return k.f64; }
};
template <>
struct TableOf<float, float> {
  static const KernelTable<float>& get(const TargetKernels& k) { return k.f32; }
};
template <>
struct TableOf<float16_bits, float> {
  static const KernelTable<float16_bits, float>& get(const TargetKernels& k) { return k.f16; }
};
template <>
struct TableOf<bfloat16_bits, float> {
  static const KernelTable<bfloat16_bits, float>& get(const TargetKernels& k) { return k.bf16; }
};
template <>
struct TableOf<int8_t, float> {
  static const KernelTable<int8_t, float>& get(const TargetKernels& k) { return k.i8; }
};
template <class S, class T>
const KernelTable<S, T>& table_for(const TargetKernels& k) {
  return TableOf<S, T>::get(k);
}

// Hardware probes for the benchmark (float32, see kernels/probes.h); not kernels: the caller times them.
struct TargetProbes {
  double (*fma_chains)(int64_t iterations, int threads);
  float (*read_sum)(const float* data, int64_t n, int threads);
};

// Each target's table, defined in cpp/src/target_<name>.cpp (only those the build compiled exist).
namespace scalar { TargetKernels kernels(); TargetProbes probes(); }
namespace avx2 { TargetKernels kernels(); TargetProbes probes(); }
namespace avx512 { TargetKernels kernels(); TargetProbes probes(); }
namespace avx512bf16 { TargetKernels kernels(); TargetProbes probes(); }
namespace amx { TargetKernels kernels(); TargetProbes probes(); }

// Targets this build contains and this CPU + OS can run, best first.
std::vector<std::string> usable_targets();
// Every target compiled into this build.
std::vector<std::string> compiled_targets();
// The target in use: the best usable one, or the one forced by ATTNFAST_ISA (read once, at first use).
const TargetKernels& active_kernels();
// The probes of the target in use.
const TargetProbes& active_probes();
// Switches the target in use (tests pin every target this way); returns false if it is not usable.
bool set_active_target(const std::string& name);
// Value of ATTNFAST_ISA that could not be honoured ("" if none): reported as a warning by Python.
std::string target_request_problem();

// Threads used by the kernels (run on the pool of attnfast/parallel.h), the same for every thread of
// the process: the default (OMP_NUM_THREADS if valid, else the CPUs of the affinity mask), lowered by
// set_num_threads(n) and by set_thread_limit(n) (threadpoolctl's) when n > 0, at most kMaxThreads
// (cpp/src/threads.cpp). configured_num_threads is that count; get_num_threads also starts the workers it
// counts, and reports fewer if the OS refused one (attnfast/parallel.h). set_num_threads also lets the
// pool try again to start refused workers.
constexpr int kMaxThreads = 65536;
int default_num_threads();
const char* default_threads_source();  // "OMP_NUM_THREADS", "CPU affinity" or "hardware threads"
std::string default_threads_problem();  // why OMP_NUM_THREADS was ignored, "" if it was not
int configured_num_threads();
int get_num_threads();
void set_num_threads(int n);
int get_thread_limit();  // 0: no limit
void set_thread_limit(int n);

}  // namespace attnfast
