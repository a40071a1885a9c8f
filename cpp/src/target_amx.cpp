// AMX-BF16 (Intel Sapphire Rapids and later): the avx512bf16 target's kernels, except that the fused
// attention on bfloat16 K, V and Q runs both of its products on AMX tiles (kernels/attention_tiles_amx.h
// and kernels/amx_tiles.h: TDPBF16PS, a 16 x 16 x 32 bfloat16 product per instruction). Built with the
// avx512bf16 flags plus -mamx-tile -mamx-bf16 (CMakeLists.txt). Usable only where the CPU has AMX-TILE and
// AMX-BF16 and the OS grants the process the tile data state (dispatch.cpp). In the test-only build
// ATTNFAST_AMX_MODEL the tile operations run on the scalar model of kernels/amx_model.h instead, without
// the AMX flags, so this target's code runs on any CPU that runs the avx512bf16 target.
#define ATTNFAST_TARGET_NS amx
#define ATTNFAST_TARGET_NAME "amx"
#define ATTNFAST_TARGET_AVX512BF16 1  // every AMX-BF16 CPU has AVX512_BF16; the pair helpers are shared
#define ATTNFAST_TARGET_AMX 1
#include "simd/vec_avx512.h"

namespace attnfast {
namespace amx {
template <class T>
using Vec = Avx512Vec<T>;
struct Tiles {
  // The avx512 target's fused-attention shape (the float path of the tiled attention and the row-wise
  // path still use it); the AMX products have their own tile shapes (amx_tiles.h).
  static constexpr int kAttnMR = 8, kAttnNRV = 3;
};
}  // namespace amx
}  // namespace attnfast

#include "attnfast/kernels.h"
#include "kernels/attention.h"

namespace attnfast {
namespace amx {

TargetKernels kernels() {
  TargetKernels k = avx512bf16::kernels();
  k.name = ATTNFAST_TARGET_NAME;
  k.bf16.attention = &attention_impl<Vec<float>, bfloat16_bits, Tiles::kAttnMR, Tiles::kAttnNRV>;
  return k;
}

TargetProbes probes() { return avx512bf16::probes(); }

}  // namespace amx
}  // namespace attnfast
