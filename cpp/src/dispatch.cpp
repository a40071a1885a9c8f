// Runtime choice of the SIMD target. Built with baseline flags (it must run on every CPU).
// The best target that this build contains and the CPU *and OS* support is chosen once; ATTNFAST_ISA
// can force a lower one (tests use it to cover every path on one machine). The CPU's features are read
// with CPUID and the OS-enabled register state with XGETBV (XCR0), so AVX-512 is not picked where the OS
// does not save zmm registers. Not __builtin_cpu_supports: it reads a table that the compiler's runtime
// library fills (libgcc, compiler-rt), and the release wheel's toolchain (zig, tools/build_wheel.sh)
// links a runtime that leaves the table empty, which would make every CPU look scalar-only.
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "attnfast/kernels.h"

namespace attnfast {
namespace {

struct Target {
  const char* name;
  TargetKernels (*make)();
  TargetProbes (*make_probes)();
  bool (*supported)();
};

#if defined(__x86_64__)
// What the CPU reports and the OS enables, read once. Bit positions: Intel SDM vol. 2A, CPUID leaves 1
// and 7; XCR0 vol. 1 sec. 13.3.
struct X86Features {
  bool avx2 = false;        // with FMA, F16C and the OS saving ymm state: what the avx2 target needs
  bool avx512 = false;      // F, VL, BW, DQ with the OS saving opmask and zmm state
  bool avx512bf16 = false;  // AVX512_BF16 (leaf 7 subleaf 1) on top of avx512
  bool amx_bf16 = false;    // AMX-TILE and AMX-BF16 with the tile state in XCR0 (on top of avx512bf16)
};

const X86Features& x86_features() {
  static const X86Features features = [] {
    X86Features f;
    unsigned a, b, c, d;
    const unsigned max_leaf = __get_cpuid_max(0, nullptr);
    if (max_leaf < 7) return f;
    __cpuid_count(1, 0, a, b, c, d);
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
    if (!osxsave || !avx) return f;  // without OSXSAVE, XGETBV is an invalid opcode
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const uint64_t xcr0 = (static_cast<uint64_t>(xcr0_hi) << 32) | xcr0_lo;
    const bool ymm_state = (xcr0 & 0x6) == 0x6;             // SSE and AVX state
    const bool zmm_state = ymm_state && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
    const bool tile_state = (xcr0 & 0x60000) == 0x60000;      // XTILECFG, XTILEDATA
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned max_subleaf = a;
    f.avx2 = ymm_state && fma && f16c && (b & (1u << 5));
    const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
               avx512vl = b & (1u << 31);
    f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
    const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
    bool avx512bf16 = false;
    if (max_subleaf >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      avx512bf16 = a & (1u << 5);
    }
    f.avx512bf16 = f.avx512 && avx512bf16;
    f.amx_bf16 = f.avx512bf16 && tile_state && amx_tile && amx_bf16;
    return f;
  }();
  return features;
}
#endif

bool cpu_has_avx2() {
#if defined(__x86_64__)
  return x86_features().avx2;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(ATTNFAST_EMULATE_AVX512)
  return cpu_has_avx2();  // test build: the avx512 target runs SIMDe's AVX-512 on AVX2 (CMakeLists.txt)
#elif defined(__x86_64__)
  return x86_features().avx512;
#else
  return false;
#endif
}

// vdpbf16ps (the avx512bf16 target's fused bfloat16 attention). The emulated build has SIMDe's.
bool cpu_has_avx512bf16() {
#if defined(ATTNFAST_EMULATE_AVX512)
  return cpu_has_avx512();
#elif defined(__x86_64__)
  return x86_features().avx512bf16;
#else
  return false;
#endif
}

// AMX-BF16 tiles (the amx target): CPUID's AMX-TILE and AMX-BF16 with the tile state enabled in XCR0
// (x86_features checks both), AVX512_BF16 (every AMX-BF16 CPU has it; the target is built
// with it), and Linux's permission for the process to use the tile data: the kernel leaves XTILEDATA
// disabled until the process asks (arch_prctl ARCH_REQ_XCOMP_PERM), and a tile instruction before that
// is SIGILL. Asked once; a refusal (an old kernel, a seccomp policy, a signal stack too small for the 8 KiB
// of tile data) leaves the target unusable and the next one is chosen. The model build (test only) runs
// the tile operations in software and needs what the avx512bf16 target needs.
bool cpu_has_amx() {
#if defined(ATTNFAST_AMX_MODEL)
  return cpu_has_avx512bf16();
#elif defined(__linux__) && defined(__x86_64__)
  static const bool granted = [] {
    if (!x86_features().amx_bf16) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;  // other systems grant the tile state differently: not requested here
#endif
}

bool always() { return true; }

// Best first.
const std::vector<Target>& all_targets() {
  static const std::vector<Target> targets = {
#if defined(ATTNFAST_HAVE_AMX)
      {"amx", &amx::kernels, &amx::probes, &cpu_has_amx},
#endif
#if defined(ATTNFAST_HAVE_AVX512BF16)
      {"avx512bf16", &avx512bf16::kernels, &avx512bf16::probes, &cpu_has_avx512bf16},
#endif
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
