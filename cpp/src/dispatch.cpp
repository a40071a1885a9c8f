// Runtime choice of the SIMD target. Built with baseline flags (it must run on every CPU).
// The best target that this build contains and the CPU *and OS* support is chosen once; ATTNFAST_ISA
// can force a lower one (tests use it to cover every path on one machine). __builtin_cpu_supports checks
// the OS-enabled register state (XCR0) as well as CPUID, so AVX-512 is not picked where the OS does not
// save zmm registers.
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "attnfast/kernels.h"

namespace attnfast {
namespace {

struct Target {
  const char* name;
  TargetKernels (*make)();
  TargetProbes (*make_probes)();
  bool (*supported)();
};

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(_M_X64)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(ATTNFAST_EMULATE_AVX512)
  return cpu_has_avx2();  // test build: the avx512 target runs SIMDe's AVX-512 on AVX2 (CMakeLists.txt)
#elif defined(__x86_64__) || defined(_M_X64)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool always() { return true; }

// Best first.
const std::vector<Target>& all_targets() {
  static const std::vector<Target> targets = {
#if defined(ATTNFAST_HAVE_AVX512)
      {"avx512", &avx512::kernels, &avx512::probes, &cpu_has_avx512},
#endif
#if defined(ATTNFAST_HAVE_AVX2)
      {"avx2", &avx2::kernels, &avx2::probes, &cpu_has_avx2},
#endif
      {"scalar", &scalar::kernels, &scalar::probes, &always},
  };
  return targets;
}

// ATTNFAST_ISA as a target name: surrounding whitespace dropped and lower-cased, so "AVX2" or " Avx512 "
// (as shell scripts and CI matrices tend to spell it) select the same target as "avx2" / "avx512".
std::string normalized_target_name(const char* text) {
  std::string name(text);
  const auto is_space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!name.empty() && is_space(name.back())) name.pop_back();
  size_t first = 0;
  while (first < name.size() && is_space(name[first])) ++first;
  name.erase(0, first);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

struct State {
  TargetKernels active{};
  TargetProbes probes{};
  std::string problem;
};

State& state() {
  static State s = [] {
    State init;
    const Target* chosen = nullptr;
    for (const Target& t : all_targets())
      if (t.supported()) {
        chosen = &t;
        break;
      }
    const char* forced = std::getenv("ATTNFAST_ISA");
    const std::string wanted = forced ? normalized_target_name(forced) : std::string();
    if (!wanted.empty()) {
      const Target* match = nullptr;
      for (const Target& t : all_targets())
        if (wanted == t.name) match = &t;
      if (!match) {
        std::string valid;
        for (const Target& t : all_targets()) valid += std::string(valid.empty() ? "" : ", ") + t.name;
        init.problem = std::string("ATTNFAST_ISA=") + forced + " is not a target of this build (valid: " + valid + ")";
      } else if (!match->supported()) {
        init.problem = std::string("ATTNFAST_ISA=") + forced + " is not supported by this CPU";
      } else {
        chosen = match;
      }
    }
    init.active = chosen->make();
    init.probes = chosen->make_probes();
    return init;
  }();
  return s;
}

std::mutex& switch_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

std::vector<std::string> usable_targets() {
  std::vector<std::string> names;
  for (const Target& t : all_targets())
    if (t.supported()) names.emplace_back(t.name);
  return names;
}

std::vector<std::string> compiled_targets() {
  std::vector<std::string> names;
  for (const Target& t : all_targets()) names.emplace_back(t.name);
  return names;
}

const TargetKernels& active_kernels() { return state().active; }
const TargetProbes& active_probes() { return state().probes; }

bool set_active_target(const std::string& name) {
  const std::string wanted = normalized_target_name(name.c_str());
  for (const Target& t : all_targets())
    if (wanted == t.name && t.supported()) {
      std::lock_guard<std::mutex> lock(switch_mutex());
      state().active = t.make();
      state().probes = t.make_probes();
      return true;
    }
  return false;
}

std::string target_request_problem() { return state().problem; }

}  // namespace attnfast
