// A scalar model of the AMX operations that amx_tiles.h uses, for the test-only build
// (ATTNFAST_AMX_MODEL: CMakeLists.txt, tools/amx_model.sh): the same kernel source then runs on CPUs
// without AMX, and every tile operation is checked as the hardware would check it. Never in a release
// build. dtypes: bfloat16 tile elements (A and B), float32 (C). ISA: none (portable C++).
//
// What is modelled, after the Intel SDM (LDTILECFG, TILELOADD, TILESTORED, TILEZERO, TDPBF16PS,
// TILERELEASE):
// - State per thread: a palette-1 configuration (8 tiles of at most 16 rows x 64 bytes), the tile data,
//   and whether tiles are configured at all. LDTILECFG checks the 64-byte configuration (palette 0 or 1,
//   reserved bytes 0, rows <= 16, colsb <= 64, rows and colsb both 0 or both not, tiles 8..15 unused,
//   start_row 0: this code never restarts an interrupted load) and zeroes every tile; palette 0, like
//   TILERELEASE, returns to the unconfigured state.
// - TILELOADD / TILESTORED move `rows` rows of `colsb` bytes at base + r * stride (any stride, any
//   alignment); a load zeroes the bytes past colsb and the rows past `rows`. The model reads and writes
//   exactly those bytes through memcpy, so AddressSanitizer sees every access the hardware would make.
// - TDPBF16PS C += A . B (C: M x N float32, A: M x K bfloat16 row-major, B: K/2 rows of N bfloat16
//   pairs), with its shape checks (#UD: C, A, B distinct, colsb multiples of 4, C.rows = A.rows,
//   A.colsb / 4 = B.rows, C.colsb = B.colsb) and its documented numerics: for each C element, the even
//   elements' products and the odd elements' products are summed in two float32 chains from 0 over the
//   pairs in order, by fused multiply-adds (exact products: 8 x 8 significant bits), each rounded to
//   nearest even; then C + (even + odd). Denormal inputs (A, B, and C) read as zero and denormal results
//   are flushed to zero, whatever MXCSR says (MXCSR is neither read nor written by the instruction; the
//   model's float operations assume the default round-to-nearest mode, which Python never changes).
//   Hardware may order the additions differently within that description; the kernels never depend on
//   the order (the tests compare with tolerances, not bitwise against the model).
// - An operation the hardware would fault on (#UD, #GP) prints what was wrong and aborts: on the real
//   CPU it would be SIGILL or SIGSEGV.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace attnfast {
namespace amx_model {

constexpr int kTiles = 8, kMaxRows = 16, kMaxRowBytes = 64;

struct State {
  bool configured = false;
  uint8_t rows[kTiles] = {};
  uint16_t colsb[kTiles] = {};
  alignas(64) unsigned char data[kTiles][kMaxRows][kMaxRowBytes] = {};
};

inline State& state() {
  static thread_local State s;
  return s;
}

[[noreturn]] inline void fault(const char* what, int tile = -1) {
  if (tile >= 0) {
    std::fprintf(stderr, "attnfast AMX model: %s (tmm%d)\n", what, tile);
  } else {
    std::fprintf(stderr, "attnfast AMX model: %s\n", what);
  }
  std::abort();
}

inline void check_configured(int tile) {
  const State& s = state();
  if (tile < 0 || tile >= kTiles) fault("no such tile register", tile);
  if (!s.configured) fault("tile instruction without a tile configuration (#UD)", tile);
  if (s.rows[tile] == 0) fault("tile not configured by the palette (#UD)", tile);
}

inline void zero_all(State& s) { std::memset(s.data, 0, sizeof s.data); }

// LDTILECFG: the 64-byte configuration at cfg (palette_id, start_row, 14 reserved bytes, colsb[16] as
// 16-bit words from byte 16, rows[16] from byte 48).
inline void tile_loadconfig(const void* cfg) {
  unsigned char bytes[64];
  std::memcpy(bytes, cfg, 64);
  State& s = state();
  const unsigned palette = bytes[0];
  if (palette == 0) {
    s = State{};
    return;
  }
  if (palette != 1) fault("LDTILECFG: palette other than 0 and 1 (#GP)");
  if (bytes[1] != 0) fault("LDTILECFG: start_row not 0 (this code never restarts a tile load)");
  for (int i = 2; i < 16; ++i)
    if (bytes[i] != 0) fault("LDTILECFG: reserved byte not 0 (#GP)");
  for (int t = 0; t < 16; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, bytes + 16 + 2 * t, 2);
    const unsigned rows = bytes[48 + t];
    if (t >= kTiles) {
      if (colsb != 0 || rows != 0) fault("LDTILECFG: palette 1 has 8 tiles; tiles 8..15 must be 0 (#GP)", t);
      continue;
    }
    if (rows > kMaxRows || colsb > kMaxRowBytes) fault("LDTILECFG: tile larger than 16 x 64 bytes (#GP)", t);
    if ((rows == 0) != (colsb == 0)) fault("LDTILECFG: tile with rows or colsb 0 but not both (#GP)", t);
    s.rows[t] = static_cast<uint8_t>(rows);
    s.colsb[t] = colsb;
  }
  s.configured = true;
  zero_all(s);
}

// TILERELEASE: back to the initial, unconfigured state.
inline void tile_release() { state() = State{}; }

inline void tile_loadd(int tile, const void* base, int64_t stride) {
  check_configured(tile);
  State& s = state();
  std::memset(s.data[tile], 0, sizeof s.data[tile]);
  const unsigned char* p = static_cast<const unsigned char*>(base);
  for (int r = 0; r < s.rows[tile]; ++r) std::memcpy(s.data[tile][r], p + r * stride, s.colsb[tile]);
}

inline void tile_stored(int tile, void* base, int64_t stride) {
  check_configured(tile);
  const State& s = state();
  unsigned char* p = static_cast<unsigned char*>(base);
  for (int r = 0; r < s.rows[tile]; ++r) std::memcpy(p + r * stride, s.data[tile][r], s.colsb[tile]);
}

inline void tile_zero(int tile) {
  check_configured(tile);
  std::memset(state().data[tile], 0, sizeof state().data[tile]);
}

// Denormals read as signed zero (DAZ) and denormal results become signed zero (FTZ).
inline float flush_denormal(float x) { return std::fabs(x) < 0x1p-126f ? std::copysign(0.0f, x) : x; }

inline float bf16_at(const unsigned char* row, int element) {
  uint16_t h;
  std::memcpy(&h, row + 2 * element, 2);
  const uint32_t w = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &w, 4);
  return flush_denormal(x);
}

inline float f32_at(const unsigned char* row, int element) {
  float x;
  std::memcpy(&x, row + 4 * element, 4);
  return x;
}

// TDPBF16PS tmm_c, tmm_a, tmm_b.
inline void tile_dpbf16ps(int c, int a, int b) {
  check_configured(c);
  check_configured(a);
  check_configured(b);
  if (c == a || c == b || a == b) fault("TDPBF16PS: the three tiles must be distinct (#UD)", c);
  State& s = state();
  if (s.colsb[c] % 4 != 0 || s.colsb[a] % 4 != 0 || s.colsb[b] % 4 != 0)
    fault("TDPBF16PS: colsb not a multiple of 4 (#UD)", c);
  if (s.rows[c] != s.rows[a]) fault("TDPBF16PS: C and A differ in rows (#UD)", c);
  if (s.colsb[a] / 4 != s.rows[b]) fault("TDPBF16PS: A's pairs per row differ from B's rows (#UD)", a);
  if (s.colsb[c] != s.colsb[b]) fault("TDPBF16PS: C and B differ in colsb (#UD)", b);
  const int pairs = s.colsb[a] / 4, columns = s.colsb[c] / 4;
  for (int m = 0; m < s.rows[c]; ++m) {
    unsigned char* crow = s.data[c][m];
    const unsigned char* arow = s.data[a][m];
    for (int n = 0; n < columns; ++n) {
      float even = 0.0f, odd = 0.0f;
      for (int k = 0; k < pairs; ++k) {
        const unsigned char* brow = s.data[b][k];
        even = flush_denormal(std::fma(bf16_at(arow, 2 * k), bf16_at(brow, 2 * n), even));
        odd = flush_denormal(std::fma(bf16_at(arow, 2 * k + 1), bf16_at(brow, 2 * n + 1), odd));
      }
      const float sum = flush_denormal(even + odd);
      const float out = flush_denormal(flush_denormal(f32_at(crow, n)) + sum);
      std::memcpy(crow + 4 * n, &out, 4);
    }
    std::memset(crow + s.colsb[c], 0, kMaxRowBytes - s.colsb[c]);
  }
  for (int m = s.rows[c]; m < kMaxRows; ++m) std::memset(s.data[c][m], 0, kMaxRowBytes);
}

}  // namespace amx_model
}  // namespace attnfast
