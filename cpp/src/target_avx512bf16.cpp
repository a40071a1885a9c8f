// AVX-512 with AVX512_BF16 (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later): the
// avx512 target's kernels, except that the fused attention on bfloat16 K, V and Q runs both of its
// products on vdpbf16ps (kernels/attention_tiles_bf16.h: two bfloat16 products per lane and instruction,
// twice the float32 FMA's). Built with the avx512 flags plus -mavx512bf16 (CMakeLists.txt); the emulated
// test build takes the instruction from SIMDe.
#define ATTNFAST_TARGET_NS avx512bf16
#define ATTNFAST_TARGET_NAME "avx512bf16"
#define ATTNFAST_TARGET_AVX512BF16 1
#include "simd/vec_avx512.h"

namespace attnfast {
namespace avx512bf16 {
template <class T>
using Vec = Avx512Vec<T>;
struct Tiles {
  // The avx512 target's fused-attention shape: 8 keys or value features x 48 queries, 24 accumulators of
  // the 32 zmm registers, for the float32 and the bfloat16 pair microkernels alike.
  static constexpr int kAttnMR = 8, kAttnNRV = 3;
};
}  // namespace avx512bf16
}  // namespace attnfast

#include "attnfast/kernels.h"
#include "kernels/attention.h"

namespace attnfast {
namespace avx512bf16 {

TargetKernels kernels() {
  TargetKernels k = avx512::kernels();
  k.name = ATTNFAST_TARGET_NAME;
  k.bf16.attention = &attention_impl<Vec<float>, bfloat16_bits, Tiles::kAttnMR, Tiles::kAttnNRV>;
  return k;
}

TargetProbes probes() { return avx512::probes(); }

}  // namespace avx512bf16
}  // namespace attnfast
