// Standalone test of the AMX tile microkernels (cpp/src/kernels/amx_tiles.h), built by tools/amx_model.sh
// twice where it can: against the scalar model of the tile operations (-DATTNFAST_AMX_MODEL=1, any x86-64
// or other CPU) and, on a CPU with AMX-BF16, against the hardware (-mamx-tile -mamx-bf16). Checks:
// 1. the model's own numerics and checks, on hand-made tiles: the SDM's even/odd chains, round to
//    nearest even, denormal inputs as zero and denormal results flushed, zeroing past colsb and rows,
//    strided loads and stores, and a shape mismatch faulting (model only);
// 2. both products of the fused attention against a float64 reference of the same bfloat16 values, over
//    awkward sizes (depth and value widths 1, 2, 3, 17, 31, 32, 33, 63, 64, 65, 97, 128; 1 to 64 keys;
//    1 to 48 queries), with the operands packed here from their documented layouts (not by the
//    attention's packers), K and V rows padded with NaN past their features and allocated to end exactly
//    at their last element: a read past a row gives NaN, a read past the array is an AddressSanitizer
//    error (the script builds with -fsanitize=address,undefined);
// 3. infinities and NaN in K reaching exactly the scores they belong to.
// Exit status 0 when every check passes; each failure is printed.
#define ATTNFAST_TARGET_NS amx_test
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/amx_tiles.h"

namespace at = attnfast::amx_test;

namespace {

int failures = 0;

void check(bool ok, const char* what, double got = 0, double want = 0) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s (got %.9g, want %.9g)\n", what, got, want);
  }
}

uint16_t bf16_bits(float x) {
  uint32_t w;
  std::memcpy(&w, &x, 4);
  return static_cast<uint16_t>(w >> 16);  // only used on values exact in bfloat16
}
float bf16_value(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &w, 4);
  return x;
}
uint16_t random_bf16(std::mt19937& rng, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  return bf16_bits(bf16_value(bf16_bits(u(rng))));  // truncated: some bfloat16 value
}
uint32_t pair_word(uint16_t low, uint16_t high) { return uint32_t(low) | (uint32_t(high) << 16); }

// ---- 1. the model on hand-made tiles ----
#if defined(ATTNFAST_AMX_MODEL)
// A palette-1 configuration with the given shapes of tmm0 (C), tmm1 (A), tmm2 (B).
at::AmxTileConfig shapes(int m, int a_colsb, int b_rows, int c_colsb) {
  at::AmxTileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  c.rows[0] = static_cast<uint8_t>(m);
  c.colsb[0] = static_cast<uint16_t>(c_colsb);
  c.rows[1] = static_cast<uint8_t>(m);
  c.colsb[1] = static_cast<uint16_t>(a_colsb);
  c.rows[2] = static_cast<uint8_t>(b_rows);
  c.colsb[2] = static_cast<uint16_t>(c_colsb);
  return c;
}

// One C element from 2 pairs of A (row 0) and B (column 0): c0 + a . b.
float one_element(const float a[4], const float b[4], float c0) {
  namespace model = attnfast::amx_model;
  const at::AmxTileConfig cfg = shapes(1, 8, 2, 4);
  model::tile_loadconfig(&cfg);
  const uint32_t arow[2] = {pair_word(bf16_bits(a[0]), bf16_bits(a[1])), pair_word(bf16_bits(a[2]), bf16_bits(a[3]))};
  const uint32_t brows[2] = {pair_word(bf16_bits(b[0]), bf16_bits(b[1])), pair_word(bf16_bits(b[2]), bf16_bits(b[3]))};
  model::tile_loadd(0, &c0, 4);
  model::tile_loadd(1, arow, 8);
  model::tile_loadd(2, brows, 4);
  model::tile_dpbf16ps(0, 1, 2);
  float out = -1;
  model::tile_stored(0, &out, 4);
  model::tile_release();
  return out;
}

void test_model_numerics() {
  // Even products 2^24 and 1, odd products -2^24 and 1: the even chain rounds 2^24 + 1 to 2^24 (a tie,
  // to even), the odd chain is exact (-2^24 + 1), their sum is 1. One chain in element order would give 2.
  {
    const float a[4] = {4096.0f, 4096.0f, 1.0f, 1.0f}, b[4] = {4096.0f, -4096.0f, 1.0f, 1.0f};
    const float got = one_element(a, b, 0.0f);
    check(got == 1.0f, "model: even and odd chains summed apart (SDM order), ties to even", got, 1.0f);
  }
  // A denormal bfloat16 input reads as zero: 2^-133 * 2^100 would be 2^-33.
  {
    const uint16_t tiny = 0x0001;  // 2^-133
    const float a[4] = {bf16_value(tiny), 0, 0, 0}, b[4] = {0x1p100f, 0, 0, 0};
    const float got = one_element(a, b, 0.0f);
    check(got == 0.0f, "model: denormal input treated as zero", got, 0.0f);
  }
  // A denormal result is flushed: 2^-70 * 2^-70 = 2^-140.
  {
    const float a[4] = {0x1p-70f, 0, 0, 0}, b[4] = {0x1p-70f, 0, 0, 0};
    const float got = one_element(a, b, 0.0f);
    check(got == 0.0f && !std::signbit(got), "model: denormal result flushed to zero", got, 0.0f);
  }
  // A denormal accumulator reads as zero.
  {
    const float a[4] = {1, 0, 0, 0}, b[4] = {0x1p-100f, 0, 0, 0};
    const float got = one_element(a, b, 0x1p-130f);
    check(got == 0x1p-100f, "model: denormal C input treated as zero", got, 0x1p-100);
  }
  // Infinity times zero is NaN; NaN propagates.
  {
    const float a[4] = {INFINITY, 0, 0, 0}, b[4] = {0, 0, 0, 0};
    check(std::isnan(one_element(a, b, 0.0f)), "model: inf * 0 = NaN");
  }
  // Loads zero the bytes past colsb and the rows past `rows`; stores write exactly rows x colsb at the
  // stride, and nothing else.
  {
    namespace model = attnfast::amx_model;
    at::AmxTileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    cfg.rows[5] = 3;
    cfg.colsb[5] = 12;
    model::tile_loadconfig(&cfg);
    std::vector<unsigned char> src(200), dst(200, 0xee);
    for (int i = 0; i < 200; ++i) src[i] = static_cast<unsigned char>(i + 1);
    model::tile_loadd(5, src.data(), 50);
    model::tile_stored(5, dst.data(), 70);
    bool ok = true;
    for (int i = 0; i < 200; ++i) {
      const int r = i / 70, col = i % 70;
      const unsigned char want = (r < 3 && col < 12) ? static_cast<unsigned char>(r * 50 + col + 1) : 0xee;
      ok = ok && dst[i] == want;
    }
    check(ok, "model: strided load and store of 3 rows x 12 bytes");
    const auto& tile = model::state().data[5];
    bool zero_rest = true;
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 64; ++c)
        if (r >= 3 || c >= 12) zero_rest = zero_rest && tile[r][c] == 0;
    check(zero_rest, "model: a load zeroes the bytes past colsb and the rows past rows");
    model::tile_release();
    check(!model::state().configured, "model: tilerelease returns to the unconfigured state");
  }
}

// A shape the hardware refuses (#UD) aborts the model: here A's 3 pairs per row against B's 2 rows.
void test_model_faults() {
  std::fflush(stdout);
  const pid_t child = fork();
  if (child == 0) {
    std::freopen("/dev/null", "w", stderr);
    const at::AmxTileConfig cfg = shapes(2, 12, 2, 8);
    attnfast::amx_model::tile_loadconfig(&cfg);
    attnfast::amx_model::tile_dpbf16ps(0, 1, 2);
    _exit(0);
  }
  int status = 0;
  waitpid(child, &status, 0);
  check(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "model: TDPBF16PS with mismatched K aborts");
}
#endif

// ---- 2. the two products against float64 ----
constexpr uint16_t kNaNBits = 0x7fc0;

struct ScoreCase {
  int64_t nk, depth, mb;
};

// S^T = K Q^T for one tile of nk keys and mb queries.
void test_score(const ScoreCase& c, std::mt19937& rng) {
  const int64_t k_stride = c.depth + 3;  // padded with NaN
  // K ends exactly at its last row's last feature.
  std::vector<uint16_t> k((c.nk - 1) * k_stride + c.depth, kNaNBits);
  for (int64_t j = 0; j < c.nk; ++j)
    for (int64_t d = 0; d < c.depth; ++d) k[j * k_stride + d] = random_bf16(rng, 2.0f);
  std::vector<uint16_t> q(c.mb * c.depth);
  for (auto& x : q) x = random_bf16(rng, 2.0f);
  // Query pairs, 48 lanes per pair row, zero past the queries and past the depth.
  const int64_t lanes = 48, rows = at::amx_pair_rows(c.depth);
  std::vector<uint32_t> qp(rows * lanes, 0);
  for (int64_t t = 0; 2 * t < c.depth; ++t)
    for (int64_t i = 0; i < c.mb; ++i)
      qp[t * lanes + i] = pair_word(q[i * c.depth + 2 * t], 2 * t + 1 < c.depth ? q[i * c.depth + 2 * t + 1] : 0);
  const int groups = static_cast<int>((c.mb + 15) / 16);
  const int64_t s_rows = (c.nk + 15) / 16 * 16, s_stride = 48 + 5;
  std::vector<float> s(s_rows * s_stride, -7.0f);
  std::vector<uint16_t> staging(at::amx_score_staging_elements(c.depth));
  {
    const at::AmxTileSession session;
    at::amx_score_tile(groups, k.data(), k_stride, c.nk, c.depth, qp.data(), lanes, s.data(), s_stride,
                       staging.data());
  }
  bool ok = true;
  double worst = 0;
  for (int64_t j = 0; j < s_rows; ++j)
    for (int64_t i = 0; i < 16 * groups; ++i) {
      const float got = s[j * s_stride + i];
      if (j >= c.nk || i >= c.mb) {
        ok = ok && got == 0.0f;  // padding rows and lanes: zeros times zeros
        continue;
      }
      double ref = 0, magnitude = 0;
      for (int64_t d = 0; d < c.depth; ++d) {
        const double term = double(bf16_value(k[j * k_stride + d])) * bf16_value(q[i * c.depth + d]);
        ref += term;
        magnitude += std::fabs(term);
      }
      // Two chains of at most 16 terms, their sum and one add per 32 features, each rounding <= 2^-24.
      const double bound = (18.0 + double(c.depth) / 32.0) * 0x1p-24 * magnitude + 1e-30;
      const double err = std::fabs(got - ref);
      worst = std::fmax(worst, err / (bound > 0 ? bound : 1));
      ok = ok && err <= bound;
    }
    // Columns past the stored groups are untouched.
  for (int64_t j = 0; j < s_rows; ++j)
    for (int64_t i = 16 * groups; i < s_stride; ++i) ok = ok && s[j * s_stride + i] == -7.0f;
  char what[160];
  std::snprintf(what, sizeof what, "score tile nk=%lld depth=%lld mb=%lld (worst error / bound)", (long long)c.nk,
                (long long)c.depth, (long long)c.mb);
  check(ok, what, worst, 1.0);
}

struct ValueCase {
  int64_t nk, dv, mb;
  bool first;
};

// O^T (+)= V^T P^T for one tile.
void test_value(const ValueCase& c, std::mt19937& rng) {
  const int64_t v_stride = c.dv + 2;
  std::vector<uint16_t> v((c.nk - 1) * v_stride + c.dv, kNaNBits);
  for (int64_t j = 0; j < c.nk; ++j)
    for (int64_t f = 0; f < c.dv; ++f) v[j * v_stride + f] = random_bf16(rng, 3.0f);
  // P in [0, 1] as bfloat16, S^T's layout (keys x queries).
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<uint16_t> p(c.nk * c.mb);
  for (auto& x : p) x = bf16_bits(bf16_value(bf16_bits(unit(rng))));
  const int64_t p_stride = 48, p_rows = at::amx_pair_rows(c.nk);
  std::vector<uint32_t> pp(p_rows * p_stride, 0);
  for (int64_t t = 0; 2 * t < c.nk; ++t)
    for (int64_t i = 0; i < c.mb; ++i)
      pp[t * p_stride + i] = pair_word(p[2 * t * c.mb + i], 2 * t + 1 < c.nk ? p[(2 * t + 1) * c.mb + i] : 0);
  const int64_t vt_stride = 64;
  std::vector<uint16_t> vt(at::amx_value_rows(c.dv) * vt_stride, kNaNBits);
  at::pack_value_transposed(v.data(), v_stride, c.nk, c.dv, vt.data(), vt_stride);
  const int groups = static_cast<int>((c.mb + 15) / 16);
  const int64_t acc_stride = 48 + 3, acc_rows = at::amx_value_rows(c.dv);
  std::vector<float> acc(acc_rows * acc_stride);
  std::vector<float> start(acc.size());
  for (size_t e = 0; e < acc.size(); ++e) start[e] = acc[e] = c.first ? 12345.0f : float(unit(rng));
  {
    const at::AmxTileSession session;
    if (c.first) {
      at::amx_value_tile<true>(groups, vt.data(), vt_stride, c.dv, c.nk, pp.data(), p_stride, acc.data(), acc_stride);
    } else {
      at::amx_value_tile<false>(groups, vt.data(), vt_stride, c.dv, c.nk, pp.data(), p_stride, acc.data(),
                                acc_stride);
    }
  }
  bool ok = true;
  double worst = 0;
  for (int64_t f = 0; f < acc_rows; ++f)
    for (int64_t i = 0; i < acc_stride; ++i) {
      const float got = acc[f * acc_stride + i];
      if (i >= 16 * groups) {
        ok = ok && got == start[f * acc_stride + i];  // not this call's columns: untouched
        continue;
      }
      if (f >= c.dv || i >= c.mb) continue;  // padding: computed from zeros, never read
      double ref = c.first ? 0.0 : double(start[f * acc_stride + i]), magnitude = std::fabs(ref);
      for (int64_t j = 0; j < c.nk; ++j) {
        const double term = double(bf16_value(v[j * v_stride + f])) * bf16_value(p[j * c.mb + i]);
        ref += term;
        magnitude += std::fabs(term);
      }
      const double bound = (18.0 + double(c.nk) / 32.0) * 0x1p-24 * magnitude + 1e-30;
      const double err = std::fabs(got - ref);
      worst = std::fmax(worst, err / bound);
      ok = ok && err <= bound;
    }
  char what[160];
  std::snprintf(what, sizeof what, "value tile nk=%lld dv=%lld mb=%lld first=%d (worst error / bound)",
                (long long)c.nk, (long long)c.dv, (long long)c.mb, int(c.first));
  check(ok, what, worst, 1.0);
}

// The V^T packing (vectorised where the build has AVX-512) against the element-by-element version,
// padding included, from V rows padded with NaN.
void test_value_transpose(std::mt19937& rng) {
  bool ok = true;
  for (int64_t nk : {1, 2, 15, 31, 32, 33, 63, 64})
    for (int64_t dv : {1, 2, 15, 16, 17, 33, 64, 97}) {
      const int64_t v_stride = dv + 5, vt_stride = 64;
      std::vector<uint16_t> v((nk - 1) * v_stride + dv, kNaNBits);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t f = 0; f < dv; ++f) v[j * v_stride + f] = random_bf16(rng, 1.0f);
      std::vector<uint16_t> fast(at::amx_value_rows(dv) * vt_stride, 0x1234), slow(fast);
      at::pack_value_transposed(v.data(), v_stride, nk, dv, fast.data(), vt_stride);
      at::pack_value_transposed_scalar(v.data(), v_stride, nk, dv, slow.data(), vt_stride);
      ok = ok && fast == slow;
    }
  check(ok, "V^T packing: the same as element by element, zero padding included");
}

// ---- 3. non-finite K ----
// K[1][d] = +inf for one d: row 1's scores are +-inf (or NaN where that query's q[d] is 0), the others
// stay finite; a NaN in K[2] makes row 2 all NaN.
void test_nonfinite_keys(std::mt19937& rng) {
  const int64_t nk = 5, depth = 40, mb = 20, stride = depth;
  std::vector<uint16_t> k(nk * stride);
  for (auto& x : k) x = random_bf16(rng, 1.0f);
  k[1 * stride + 35] = 0x7f80;  // +inf, in the staged tail features (32..39)
  k[2 * stride + 3] = kNaNBits;
  std::vector<uint16_t> q(mb * depth);
  for (auto& x : q) x = random_bf16(rng, 1.0f);
  q[7 * depth + 35] = 0;  // inf * 0 = NaN for query 7
  const int64_t lanes = 48;
  std::vector<uint32_t> qp(at::amx_pair_rows(depth) * lanes, 0);
  for (int64_t t = 0; 2 * t < depth; ++t)
    for (int64_t i = 0; i < mb; ++i) qp[t * lanes + i] = pair_word(q[i * depth + 2 * t], q[i * depth + 2 * t + 1]);
  std::vector<float> s(16 * 48);
  std::vector<uint16_t> staging(at::amx_score_staging_elements(depth));
  {
    const at::AmxTileSession session;
    at::amx_score_tile(2, k.data(), stride, nk, depth, qp.data(), lanes, s.data(), 48, staging.data());
  }
  bool ok = true;
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t i = 0; i < mb; ++i) {
      const float x = s[j * 48 + i];
      if (j == 1) {
        const float qd = bf16_value(q[i * depth + 35]);
        ok = ok && (qd == 0 ? std::isnan(x) : (std::isinf(x) && std::signbit(x) == std::signbit(qd)));
      } else if (j == 2) {
        ok = ok && std::isnan(x);
      } else {
        ok = ok && std::isfinite(x);
      }
    }
  check(ok, "score tile: an infinite or NaN key feature reaches exactly its own key's scores");
}

bool amx_usable() {
#if defined(ATTNFAST_AMX_MODEL)
  return true;
#else
  // Linux grants the tile data state per process (ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18).
  return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
         syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#endif
}

}  // namespace

int main() {
#if defined(ATTNFAST_AMX_MODEL)
  std::printf("AMX tile kernels on the scalar model of the tile operations\n");
  test_model_numerics();
  test_model_faults();
#else
  std::printf("AMX tile kernels on the hardware\n");
#endif
  if (!amx_usable()) {
    std::printf("no AMX-BF16 here, or the OS refused the tile state: hardware test skipped\n");
    return 0;
  }
  std::mt19937 rng(20261201);
  const int64_t depths[] = {1, 2, 3, 17, 31, 32, 33, 63, 64, 65, 97, 128};
  const int64_t keys[] = {1, 2, 13, 16, 17, 33, 64};
  const int64_t queries[] = {1, 16, 17, 40, 48};
  int cases = 0;
  for (int64_t depth : depths)
    for (int64_t nk : keys)
      for (int64_t mb : queries) {
        test_score({nk, depth, mb}, rng);
        test_value({nk, depth, mb, (nk + mb) % 2 == 0}, rng);
        cases += 2;
      }
  test_value_transpose(rng);
  test_nonfinite_keys(rng);
  std::printf("%d tile products checked against float64, and the V^T packing; %d failures\n", cases + 1,
              failures);
  return failures == 0 ? 0 : 1;
}
