// Fused attention, tiled path (FlashAttention-style) for blocks of many query rows.
// dtypes: K and V stored in S (double, float, float16, bfloat16), queries in S or T, computed in
// T = V::Scalar (double for double, else float): scores, exponentials and accumulators all in T.
// ISA: target's V. 16-bit K and V are read in place from memory (half the bytes) and widened, exactly,
// once per key tile and query block into a T tile that the microkernels then read as they read float
// data (the widening is 1 / MB of the tile's FMAs); the query block is widened when it is packed and
// the output rounded once to its storage type when the rows are written.
//
// The unit of work is a query block of MB rows of one batch item (tasks hand them out as runs of
// consecutive blocks of one item: QueryRuns); a block walks the key tiles of NK keys that any of its
// rows can see (tiles entirely above the causal diagonal, outside the window, past kv_lengths or
// hidden by the bool mask are never computed) and keeps, per row, the running max m, running sum l and
// an unnormalised output accumulator in scratch. Nothing of size Lq x Lk exists. When the query blocks
// are too few to keep the cores busy (one long sequence, few heads, few query rows), each block's keys
// are split into chunks, processed as separate tasks and merged by log-sum-exp in chunk order
// (key_chunks, merge_block); the split depends on the shape only.
//
// Layout trick: everything is kept transposed, queries in SIMD lanes. The score tile is
// S^T[key][query] = K_tile . Qpack^T, with the query block packed once (scaled) into microkernel panels;
// the output accumulator is O^T[feature][query] += V_tile^T . P^T. So the per-row max, exp and sum of the
// online softmax and the rescale by alpha are plain vertical vector operations (no horizontal
// reductions), K and V are read in place (never packed, only broadcast from), and both products run
// the same register-blocked microkernel shape (MR broadcasts + NRV loads per MR x NRV FMAs), which on
// AVX2 is the one that fits the 16 registers exactly (a 3 x 4 query-rows-by-features P.V needed 17,
// and GCC reloaded a B vector for every row: P.V ran ~30% slower than Q.K^T). The block is
// transposed back once, when its rows are normalised and written.
//
// Numerics: s2 = (c q).k accumulated with one FMA per term in d order (a D beyond kDepthBlock as a tree
// of blocks: microkernel.h; the additive sum over hidden in blocks too); the reference max m only
// grows, by whole steps of more than kLazyMargin (softmax_tile), and the accumulator is rescaled by
// alpha = exp(m_old - m_new) only for rows whose m moved; each row is normalised once at the end.
// Rows with no visible key get out 0 and lse -inf (m is replaced by 0 before subtracting, so
// -inf - -inf never happens). Results do not depend on the thread count.
// Hidden keys and +inf scores (attention_common.h): a block whose finished rows hold a NaN or infinity
// (block_needs_care) is accumulated once more with kCareful, where a V tile that is not all finite is
// multiplied by P only at visible (key, row) pairs (accumulate_visible) and +inf scores weigh 1 each
// under a row max of +inf. Blocks of finite rows, nearly all, pay one pass over O^T for the check.
#pragma once
#include "attnfast/params.h"
#include "kernels/attention_common.h"
#include "kernels/common.h"
#include "kernels/math.h"
#include "kernels/microkernel.h"
#include "kernels/storage.h"
#include "kernels/transpose.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, class S, int MR, int NRV>
struct TiledAttention {
  using T = typename V::Scalar;
  using Params = AttentionParams<S, T>;
  static constexpr bool kInPlace = kSameType<S, T>;  // K and V read by the microkernels where they are
  static constexpr int L = V::kLanes;
  static constexpr int MB = 48;  // query rows per block
  static constexpr int NK = 64;  // keys per tile
  static constexpr double kLazyMargin = 5.0;  // see softmax_tile: exponentials stay below e^5 ~ 148
  static constexpr int QNR = NRV * L;  // queries per microkernel panel
  static_assert(MB % QNR == 0, "query block must be whole microkernel panels");
  static_assert(NK % MR == 0, "key tiles must be whole microkernel blocks");

  const Params& p;
  int64_t dv_rows;  // rows of O^T: value features rounded up to whole microkernel blocks
  // Blocks fetch their output rows into cache while the Q.K^T of their last key tile runs, a share per
  // microkernel call, so that write_rows' stores do not each wait on memory: (8, 8, 512, 512, 64)
  // 1.0-1.3% faster. (Spread over all of a block's tiles, they were evicted again before write_rows at
  // (1, 8, 4096, 4096, 64), and that call ran 0.5% slower than without the prefetch.) Only where a
  // block's output is small beside L1: at D = 256 (the seq2seq batch: 40 rows of 1 KiB) it pushed the
  // block's working set out of L1 and that call ran 1-2% slower. (A write prefetch: on targets without
  // PRFCHW the compiler emits the read prefetch, which on x86 brings an unshared line in exclusive.)
  static constexpr int64_t kMaxOwnedOutputBytes = int64_t(16) << 10;
  bool own_output;

  explicit TiledAttention(const Params& params)
      : p(params), dv_rows(round_up(imax(params.dv, 1), MR)),
        own_output(MB * params.dv * int64_t(sizeof(T)) <= kMaxOwnedOutputBytes) {}

  int64_t scratch_bytes() const {
    return Carver::bytes<T>(MB * p.depth) + Carver::bytes<T>(NK * MB) + Carver::bytes<T>(dv_rows * MB) +
           Carver::bytes<T>(p.v_a ? p.depth : 0) + Carver::bytes<T>(p.bias.data || p.mask.data ? NK * MB : 0) +
           Carver::bytes<T>(p.mask.data ? MB * NK : 0) + Carver::bytes<T>(NK * MB) +
           3 * Carver::bytes<T>(MB) + 2 * Carver::bytes<int64_t>(MB) + widened_bytes();
  }
  // Tiles of K, V, the query block and the output rows in T, for storage types the microkernels cannot
  // read in place.
  int64_t widened_bytes() const {
    if (kInPlace) return 0;
    return Carver::bytes<T>(NK * p.depth) + Carver::bytes<T>(NK * p.dv) + Carver::bytes<T>(QNR * p.depth) +
           Carver::bytes<T>(MB * p.dv);
  }

  struct Block {
    int64_t b, i_begin, mb, panels;
    int64_t j_begin, j_end;  // the keys this block looks at: all, or one chunk when the keys are split
    T *qpack, *s, *acc_t, *m, *l, *alpha;  // acc_t: O^T, dv_rows x MB, unnormalised
    T* va_scaled;                                // additive only: scale * v_a
    T* bias_t;      // a tile of the bias or of the mask (as 0/1), key-major: S^T's layout
    T* mask_rows;   // a tile of the mask as 0/1, query-major
    T* s_raw;       // careful pass only: the tile's scores before softmax_tile turns them into P
    T *k_tile, *v_tile, *q_rows, *out_rows;  // widened K and V tiles, query rows, output rows (!kInPlace)
    int64_t *lo, *hi;
    int64_t min_lo, max_lo, min_hi, max_hi;  // over rows that see at least one key
    int64_t warm_b = -1;   // the item whose K and V this block fetches for the thread's next run (-1: none)
    bool fetch_output = false;  // fetch the output rows during the last key tile (run_block, own_output)
    bool kv_cold = false;  // this thread has not read the batch item's K and V yet: see prefetch_keys_ahead
  };

  // Dot scores fold `scale` into the packed queries; additive scores fold it into v_a instead
  // (tanh(q + k) must see the unscaled projections). Lanes past the block's last row are zero.
  void pack_queries(Block& blk) const {
    const T c = p.v_a ? T(1) : p.scale;
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      T* dst = blk.qpack + panel * p.depth * QNR;
      const int64_t rows = imin(QNR, blk.mb - panel * QNR);
      int64_t stride = 0;
      const T* src = query_rows(blk, blk.i_begin + panel * QNR, rows, &stride);
      transpose_scaled(src, stride, rows, p.depth, dst, QNR, &c, 0);
      if (rows < QNR)
        for (int64_t d = 0; d < p.depth; ++d)
          for (int64_t lane = rows; lane < QNR; ++lane) dst[d * QNR + lane] = T(0);
    }
  }

  // Query rows [i, i + rows) of the block's item in T: in place, or widened into q_rows.
  const T* query_rows(const Block& blk, int64_t i, int64_t rows, int64_t* stride) const {
    if (p.q_wide.data) {
      *stride = p.q_wide.row_stride_elements;
      return p.q_wide.row(blk.b, i);
    }
    if constexpr (kInPlace) {
      *stride = p.q.row_stride_elements;
      return p.q.row(blk.b, i);
    } else {
      for (int64_t r = 0; r < rows; ++r) widen_row<V>(p.q.row(blk.b, i + r), p.depth, blk.q_rows + r * p.depth);
      *stride = p.depth;
      return blk.q_rows;
    }
  }

  // Rows [j0, j0 + nk) of K or V (`cols` features) of kv item bkv in T: in place, or widened into `tile`.
  const T* kv_tile(const Operand<const S>& x, int64_t bkv, int64_t j0, int64_t nk, int64_t cols, T* tile,
                   int64_t* stride) const {
    if constexpr (kInPlace) {
      (void)nk;
      (void)cols;
      (void)tile;
      *stride = x.row_stride_elements;
      return x.row(bkv, j0);
    } else {
      if (x.row_stride_elements == cols) {
        widen_row<V>(x.row(bkv, j0), nk * cols, tile);  // contiguous rows: one run, no per-row tail
      } else {
        for (int64_t j = 0; j < nk; ++j) widen_row<V>(x.row(bkv, j0 + j), cols, tile + j * cols);
      }
      *stride = cols;
      return tile;
    }
  }

  // Per-row visible ranges; [min_lo, max_hi) bounds the tiles worth computing (rows that see a key),
  // max_lo / min_hi over all rows (an empty row included) decide whether a tile needs masking at all.
  void compute_bounds(Block& blk) const {
    blk.min_lo = p.lk;
    blk.max_hi = 0;
    blk.max_lo = 0;
    blk.min_hi = p.lk;
    for (int64_t i = 0; i < blk.mb; ++i) {
      visible_range(p, blk.b, blk.i_begin + i, &blk.lo[i], &blk.hi[i]);
      blk.lo[i] = imax(blk.lo[i], blk.j_begin);
      blk.hi[i] = imax(blk.lo[i], imin(blk.hi[i], blk.j_end));
      blk.max_lo = imax(blk.max_lo, blk.lo[i]);
      blk.min_hi = imin(blk.min_hi, blk.hi[i]);
      if (blk.hi[i] > blk.lo[i]) {
        blk.min_lo = imin(blk.min_lo, blk.lo[i]);
        blk.max_hi = imax(blk.max_hi, blk.hi[i]);
      }
    }
    if (blk.max_hi == 0) blk.min_lo = 0;  // no row sees any key: no tile is computed
  }

  // Additive scores: S^T[j][lanes] = sum_a (c v_a[a]) tanh(qp[lanes][a] + kp[j][a]), vectorised over the
  // block's queries; the (query, key, hidden) tensor exists only as one vector at a time.
  void additive_score_tile(const Block& blk, int64_t j0, int64_t nk) const {
    const int64_t bkv = blk.b / p.group;
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const T* qpanel = blk.qpack + panel * p.depth * QNR;
      for (int64_t j = 0; j < nk; ++j) {
        const T* kr = p.k.row(bkv, j0 + j);
        // native vectors: kept in registers (see microkernel.h). Blocks of kDepthBlock features restart
        // the chains, each block's sums added in order, so a long hidden keeps a block's error per level.
        decltype(V::v) sum[NRV];
#pragma GCC unroll 16
        for (int n = 0; n < NRV; ++n) sum[n] = V::zero().v;
        for (int64_t a0 = 0; a0 < p.depth; a0 += kDepthBlock) {
          const int64_t a1 = imin(p.depth, a0 + kDepthBlock);
          decltype(V::v) acc[NRV];
#pragma GCC unroll 16
          for (int n = 0; n < NRV; ++n) acc[n] = V::zero().v;
          for (int64_t a = a0; a < a1; ++a) {
            const V kb = V::set1(kr[a]);
            const V vb = V::set1(blk.va_scaled[a]);
#pragma GCC unroll 16
            for (int n = 0; n < NRV; ++n)
              acc[n] = fmadd(vb, tanh_approx(V::load(qpanel + a * QNR + n * L) + kb), V{acc[n]}).v;
          }
#pragma GCC unroll 16
          for (int n = 0; n < NRV; ++n) sum[n] = a0 == 0 ? acc[n] : (V{sum[n]} + V{acc[n]}).v;
        }
        for (int n = 0; n < NRV; ++n) V{sum[n]}.store(blk.s + j * MB + panel * QNR + n * L);
      }
    }
  }

  // S^T[j][i] for keys j0 .. j0+nk of the block, with every mask applied (-inf).
  void score_tile(const Block& blk, int64_t j0, int64_t nk) const {
    if constexpr (kInPlace) {
      // Additive scores come with projected (compute-type) keys only.
      if (p.v_a) {
        additive_score_tile(blk, j0, nk);
        apply_masks(blk, j0, nk);
        return;
      }
    }
    dot_score_tile(blk, j0, nk);
    apply_masks(blk, j0, nk);
  }

  // Vectors of query lanes a panel really needs: the block's last panel may be partly empty (40 query
  // rows fill 24 + 16 lanes), and computing its empty lanes cost 17% of a seq2seq call's FMAs.
  int panel_vectors(const Block& blk, int64_t panel) const {
    return static_cast<int>(imin(NRV, ceil_div(blk.mb - panel * QNR, int64_t(L))));
  }

  // C (MR x nrv vectors, row stride MB) = or += A . B with the microkernel of that width. Lanes past
  // nrv vectors are neither computed nor written; nothing reads them.
  template <bool kAccumulate, bool kUnitAStride>
  static void panel_gemm(int nrv, int64_t depth, const T* const* a_rows, int64_t a_k_stride, const T* b,
                         int64_t b_k_stride, T* c) {
    static_assert(NRV <= 3, "panel_gemm has 3-, 2- and 1-vector kernels; add widths for wider panels");
    constexpr int kTwo = NRV > 2 ? 2 : 1;
    if (nrv >= NRV) {
      gemm_microkernel<V, MR, NRV, kAccumulate, false, kUnitAStride>(depth, a_rows, a_k_stride, b, b_k_stride, L,
                                                                    c, MB, T(1));
    } else if (nrv == 2) {
      gemm_microkernel<V, MR, kTwo, kAccumulate, false, kUnitAStride>(depth, a_rows, a_k_stride, b, b_k_stride, L,
                                                                     c, MB, T(1));
    } else {
      gemm_microkernel<V, MR, 1, kAccumulate, false, kUnitAStride>(depth, a_rows, a_k_stride, b, b_k_stride, L, c,
                                                                  MB, T(1));
    }
  }

  void dot_score_tile(const Block& blk, int64_t j0, int64_t nk) const {
    const int64_t bkv = blk.b / p.group;
    int64_t ks = 0;
    const T* k = kv_tile(p.k, bkv, j0, nk, p.depth, blk.k_tile, &ks);
    // Panel outer: one packed query panel (depth x QNR) stays in L1 while the tile's keys stream by.
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const T* qpanel = blk.qpack + panel * p.depth * QNR;
      for (int64_t jj = 0; jj < nk; jj += MR) {
        const T* a_rows[MR];
        clamped_rows<T, MR>(k + jj * ks, ks, imin(MR, nk - jj), a_rows);
        if (blk.kv_cold && panel == 0) prefetch_keys_ahead(blk, j0 + jj, imin(MR, nk - jj));
        if (blk.fetch_output && panel == 0 && j0 + nk >= blk.max_hi) {
          // In the block's last key tile, this call's share of its output rows (see own_output); written
          // here and not through prefetch_rows: as an out-of-line call inside this loop it measured no gain.
          const int64_t calls = ceil_div(nk, int64_t(MR)), c = jj / MR;
          const int64_t r0 = c * blk.mb / calls, r1 = (c + 1) * blk.mb / calls;
          for (int64_t r = r0; r < r1; ++r) {
            const char* row = output_row(blk.b, blk.i_begin + r);
            for (int64_t o = 0; o < p.dv * output_element_bytes(); o += 64) __builtin_prefetch(row + o, 1, 2);
          }
        }
        if (blk.warm_b >= 0 && panel == 0) {
          // The last block of a run fetches the same K and V rows of the item this thread runs next, so
          // that its first block finds them in L2 instead of waiting on memory: (8, 8, 512, 512, 64)
          // 1.7% faster, causal 4%. Spread over the block's microkernel calls, the fetch stays in the
          // background (all at once per tile gained nothing); keys this block does not see (causal)
          // are left to that block's own prefetch_keys_ahead.
          const int64_t wb = blk.warm_b / p.group;
          prefetch_rows(p.k.row(wb, j0 + jj), p.k.row_stride_elements, imin(MR, nk - jj), p.depth);
          prefetch_rows(p.v.row(wb, j0 + jj), p.v.row_stride_elements, imin(MR, nk - jj), p.dv);
        }
        panel_gemm<false, true>(panel_vectors(blk, panel), p.depth, a_rows, 1, qpanel, QNR,
                                blk.s + jj * MB + panel * QNR);
      }
    }
  }

  // In a block whose K and V come from memory (kv_cold), while Q.K^T runs over keys j .. j+rows: fetch
  // the K rows of the next microkernel call and the V rows of these keys, which P.V reads after the
  // softmax. The hardware prefetchers do not follow 8 K rows read a column at a time.
  void prefetch_keys_ahead(const Block& blk, int64_t j, int64_t rows) const {
    const int64_t bkv = blk.b / p.group;
    const int64_t next = j + MR;
    if (next < blk.max_hi)
      prefetch_rows(p.k.row(bkv, next), p.k.row_stride_elements, imin(MR, blk.max_hi - next), p.depth);
    prefetch_rows(p.v.row(bkv, j), p.v.row_stride_elements, rows, p.dv);
  }

  // Bias first; then the visible ranges and the bool mask overwrite with -inf, so a masked key stays
  // masked whatever its bias (-inf plus an infinite bias would be NaN).
  void apply_masks(const Block& blk, int64_t j0, int64_t nk) const {
    if (p.bias.data) add_bias(blk, j0, nk);
    const bool fully_visible = j0 >= blk.max_lo && j0 + nk <= blk.min_hi;
    if (!fully_visible) {
      for (int64_t i = 0; i < blk.mb; ++i) {
        const int64_t lo = imin(nk, imax(0, blk.lo[i] - j0));
        const int64_t hi = imax(lo, imin(nk, blk.hi[i] - j0));
        for (int64_t j = 0; j < lo; ++j) blk.s[j * MB + i] = neg_inf<T>();
        for (int64_t j = hi; j < nk; ++j) blk.s[j * MB + i] = neg_inf<T>();
      }
    }
    if (p.mask.data) apply_bool_mask(blk, j0, nk);
  }

  // True when the bool mask hides every key of the tile from every row of the block (padding keys, the
  // masked half of a triangular mask): the tile would add exp(-inf) = 0 to every sum and leave every
  // max unchanged, so it is skipped like a tile past kv_lengths. Stops at the first visible key.
  bool bool_mask_hides_tile(const Block& blk, int64_t j0, int64_t nk) const {
    if (!p.mask.data) return false;
    const int64_t cs = p.mask.col_stride_elements;
    const int64_t rows = p.mask.row_stride_elements == 0 ? 1 : blk.mb;  // a key mask: one row decides
    for (int64_t i = 0; i < rows; ++i)
      if (!mask_row_hides_all(p.mask.row(blk.b, blk.i_begin + i) + j0 * cs, cs, nk)) return false;
    return true;
  }

  // S^T is key-major, the bias query-major. A bias broadcast over the queries (row stride 0: a per-key
  // bias) is one vector add per key; a full one with contiguous rows is transposed by 8 x 8 register
  // blocks first; other layouts are added element by element. A -inf bias entry gives -inf whatever the
  // score (add_bias_entry): the key is hidden even where its K row made the score NaN.
  void add_bias(const Block& blk, int64_t j0, int64_t nk) const {
    const int64_t cs = p.bias.col_stride_elements;
    const V minus_inf = V::set1(neg_inf<T>());
    if (p.bias.row_stride_elements == 0) {
      const T* brow = p.bias.row(blk.b, blk.i_begin) + j0 * cs;
      for (int64_t j = 0; j < nk; ++j) {
        const V b = V::set1(brow[j * cs]);
        const auto hides = cmp_eq(b, minus_inf);
        T* sj = blk.s + j * MB;
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) select(hides, b, V::load(sj + i0) + b).store(sj + i0);
      }
      return;
    }
    if (cs == 1) {
      // Transposed (times 1: exact), then added by vectors. Lanes past the block's last row are set to 0,
      // so the padding lanes of S^T stay finite (they are computed, never read).
      const T one = T(1);
      transpose_scaled(p.bias.row(blk.b, blk.i_begin) + j0, p.bias.row_stride_elements, blk.mb, nk, blk.bias_t, MB,
                       &one, 0);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t i = blk.mb; i < round_up(blk.mb, L); ++i) blk.bias_t[j * MB + i] = T(0);
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
          const V b = V::load(blk.bias_t + j * MB + i0);
          select(cmp_eq(b, minus_inf), b, V::load(blk.s + j * MB + i0) + b).store(blk.s + j * MB + i0);
        }
      return;
    }
    for (int64_t i = 0; i < blk.mb; ++i) {
      const T* brow = p.bias.row(blk.b, blk.i_begin + i) + j0 * cs;
      for (int64_t j = 0; j < nk; ++j) blk.s[j * MB + i] = add_bias_entry(blk.s[j * MB + i], brow[j * cs]);
    }
  }

  // A mask broadcast over the queries (a key-padding mask) masks whole keys: vector stores of -inf. A
  // full mask with contiguous rows is transposed like a bias; other layouts use a select per element,
  // never a branch: on a random mask every tenth branch mispredicted and the call took 40% longer.
  void apply_bool_mask(const Block& blk, int64_t j0, int64_t nk) const {
    const int64_t cs = p.mask.col_stride_elements;
    if (p.mask.row_stride_elements == 0) {
      const uint8_t* mrow = p.mask.row(blk.b, blk.i_begin) + j0 * cs;
      const V minus_inf = V::set1(neg_inf<T>());
      for (int64_t j = 0; j < nk; ++j)
        if (!mrow[j * cs])
          for (int64_t i0 = 0; i0 < blk.mb; i0 += L) minus_inf.store(blk.s + j * MB + i0);
      return;
    }
    if (cs == 1) {
      // Bytes to 0/1 values row by row (contiguous: vectorised), transposed like a bias, then one
      // compare-and-select per vector.
      for (int64_t i = 0; i < blk.mb; ++i) {
        const uint8_t* mrow = p.mask.row(blk.b, blk.i_begin + i) + j0;
        T* keep = blk.mask_rows + i * NK;
        for (int64_t j = 0; j < nk; ++j) keep[j] = mrow[j] ? T(1) : T(0);
      }
      const T one = T(1);
      transpose_scaled(blk.mask_rows, NK, blk.mb, nk, blk.bias_t, MB, &one, 0);
      const V zero = V::zero(), minus_inf = V::set1(neg_inf<T>());
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
          T* sv = blk.s + j * MB + i0;
          select(cmp_eq(V::load(blk.bias_t + j * MB + i0), zero), minus_inf, V::load(sv)).store(sv);
        }
      return;
    }
    for (int64_t i = 0; i < blk.mb; ++i) {
      const uint8_t* mrow = p.mask.row(blk.b, blk.i_begin + i) + j0 * cs;
      for (int64_t j = 0; j < nk; ++j) blk.s[j * MB + i] = keep_or_neg_inf(blk.s[j * MB + i], mrow[j * cs]);
    }
  }

  // Max over the nk keys of one vector of query lanes (s: S^T at that vector, row stride MB). Four
  // independent chains: one chain waits on each previous max, and that latency was a sixth of the
  // softmax's time.
  static V column_max(const T* s, int64_t nk) {
    const V minus_inf = V::set1(neg_inf<T>());
    V m0 = minus_inf, m1 = minus_inf, m2 = minus_inf, m3 = minus_inf;
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
      m0 = max(m0, V::load(s + j * MB));
      m1 = max(m1, V::load(s + (j + 1) * MB));
      m2 = max(m2, V::load(s + (j + 2) * MB));
      m3 = max(m3, V::load(s + (j + 3) * MB));
    }
    for (; j < nk; ++j) m0 = max(m0, V::load(s + j * MB));
    return max(max(m0, m1), max(m2, m3));
  }

  // Online softmax update for one tile: new reference max m, rescale factors alpha, P = 2^((S - m) log2 e)
  // in place, row sums. m moves only when the tile's max exceeds it by more than kLazyMargin: below
  // that, the tile's exponentials are at most e^kLazyMargin (finite, full precision) and O^T and l stay
  // consistent with the old m, so alpha is 1 and the rescale pass skips the row. Once the first tiles
  // have set m, a row rarely needs rescaling again (the pass cost 2-3% of a long-context call).
  // out = O / l and lse = m + ln l do not depend on which m was used.
  // kCareful (the rerun of a block with a non-finite row): keeps the raw scores in s_raw for
  // accumulate_visible, and gives +inf scores p = 1 under a row max of +inf (the normal pass makes
  // inf - inf = NaN there, which is how such a block gets here); a row that turns +inf drops what it
  // summed under a finite max (alpha = 0).
  template <bool kCareful>
  void softmax_tile(const Block& blk, int64_t nk) const {
    const V zero = V::zero(), one = V::set1(T(1));
    const V minus_inf = V::set1(neg_inf<T>()), plus_inf = V::set1(pos_inf<T>());
    const V log2e = V::set1(T(kLog2e));
    const V margin = V::set1(T(kLazyMargin));
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      const V m_old = V::load(blk.m + i0);
      const V tile_max = column_max(blk.s + i0, nk);
      // Rows that have seen no key yet take the tile's max (m_old + margin is -inf there).
      const V m_new = select(cmp_lt(m_old + margin, tile_max), tile_max, m_old);
      const V m_use = select(cmp_eq(m_new, minus_inf), zero, m_new);  // never -inf - -inf
      // Unchanged m: alpha is exactly 2^0 = 1. A row that has seen no key yet has a zero accumulator:
      // alpha = 1 spares rescaling it.
      V alpha = select(cmp_eq(m_old, minus_inf), one, exp2_nonpositive((m_old - m_use) * log2e));
      if (kCareful) alpha = select(cmp_eq(m_old, plus_inf), one, alpha);  // already +inf: inf - inf
      // p = exp of one key's scores, stored in place of them.
      const auto term = [&](int64_t j) {
        T* sj = blk.s + j * MB + i0;
        const V x = V::load(sj);
        V pj = exp2_sum_term((x - m_use) * log2e);
        if (kCareful) {
          x.store(blk.s_raw + j * MB + i0);
          pj = select(cmp_eq(x, plus_inf), one, pj);
        }
        pj.store(sj);
        return pj;
      };
      // Two sums, even and odd keys: the adds are latency-bound otherwise.
      V sum0 = zero, sum1 = zero;
      int64_t j = 0;
      for (; j + 2 <= nk; j += 2) {
        sum0 = sum0 + term(j);
        sum1 = sum1 + term(j + 1);
      }
      if (j < nk) sum0 = sum0 + term(j);
      fmadd(V::load(blk.l + i0), alpha, sum0 + sum1).store(blk.l + i0);
      m_new.store(blk.m + i0);
      alpha.store(blk.alpha + i0);
    }
  }

  // O^T = alpha * O^T + V_tile^T . P^T; the block's first tile writes O^T (kFirst: nothing to rescale,
  // and the accumulator needs no zeroing beforehand). kCareful: a V tile with a NaN or infinity goes
  // through accumulate_visible instead of the microkernel.
  template <bool kFirst, bool kCareful>
  void rescale_and_accumulate(const Block& blk, int64_t j0, int64_t nk) const {
    if (!kFirst) rescale(blk);
    const int64_t bkv = blk.b / p.group;
    int64_t vs = 0;
    const T* v = kv_tile(p.v, bkv, j0, nk, p.dv, blk.v_tile, &vs);
    if (kCareful && !v_tile_finite(v, vs, nk)) {
      accumulate_visible<kFirst>(blk, v, vs, nk);
      return;
    }
    // Panel outer: the panel's P^T (nk x QNR) stays in L1 while the V tile's columns are broadcast.
    for (int64_t panel = 0; panel < blk.panels; ++panel) {
      const T* pt = blk.s + panel * QNR;
      for (int64_t c0 = 0; c0 < p.dv; c0 += MR) {
        const T* a_rows[MR];  // MR value features: broadcast V[k][c0 + r], k = 0 .. nk
        clamped_rows<T, MR>(v + c0, 1, imin(MR, p.dv - c0), a_rows);
        panel_gemm<!kFirst, false>(panel_vectors(blk, panel), nk, a_rows, vs, pt, MB,
                                   blk.acc_t + c0 * MB + panel * QNR);
      }
    }
  }

  bool v_tile_finite(const T* v, int64_t vs, int64_t nk) const {
    for (int64_t j = 0; j < nk; ++j)
      if (!all_finite<V>(v + j * vs, p.dv)) return false;
    return true;
  }

  // O^T[c][i] += P^T[j][i] V[j][c] only where key j is visible to row i (its raw score, s_raw, is not
  // -inf): a hidden key's NaN or infinite V never meets the row, not even as 0 * NaN, while a visible one
  // propagates as usual. The FMAs run in key order from the same start as the microkernel's, so the
  // visible terms give bitwise what it gives. Careful pass only: the work is that of the microkernel
  // without its register blocking.
  template <bool kFirst>
  void accumulate_visible(const Block& blk, const T* v, int64_t vs, int64_t nk) const {
    const V minus_inf = V::set1(neg_inf<T>());
    for (int64_t c = 0; c < p.dv; ++c)
      for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
        T* out = blk.acc_t + c * MB + i0;
        V acc = kFirst ? V::zero() : V::load(out);
        for (int64_t j = 0; j < nk; ++j) {
          const auto hidden = cmp_eq(V::load(blk.s_raw + j * MB + i0), minus_inf);
          acc = select(hidden, acc, fmadd(V::load(blk.s + j * MB + i0), V::set1(v[j * vs + c]), acc));
        }
        acc.store(out);
      }
  }

  // True when a row of the block has a NaN or infinity in its sum l or its accumulator: a NaN or infinite
  // V (visible, or hidden and multiplied by 0), a NaN score or a +inf score (inf - inf). Padding lanes
  // past the block's rows do not count. Two sums per lane vector: the check is latency-bound otherwise.
  bool block_needs_care(const Block& blk) const {
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      V s0 = V::load(blk.l + i0), s1 = V::zero();
      int64_t c = 0;
      for (; c + 2 <= p.dv; c += 2) {
        s0 = s0 + V::load(blk.acc_t + c * MB + i0);
        s1 = s1 + V::load(blk.acc_t + (c + 1) * MB + i0);
      }
      if (c < p.dv) s0 = s0 + V::load(blk.acc_t + c * MB + i0);
      T lanes[L];
      (s0 + s1).store(lanes);
      for (int64_t u = 0; u < imin(L, blk.mb - i0); ++u)
        if (lanes[u] - lanes[u] != T(0)) return true;
    }
    return false;
  }

  // O^T *= alpha, query lanes at a time; vectors of rows whose max did not change are skipped.
  void rescale(const Block& blk) const {
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      bool unchanged = true;
      for (int64_t i = i0; i < imin(i0 + L, blk.mb); ++i) unchanged = unchanged && blk.alpha[i] == T(1);
      if (unchanged) continue;
      const V a = V::load(blk.alpha + i0);
      for (int64_t c = 0; c < p.dv; ++c) (V::load(blk.acc_t + c * MB + i0) * a).store(blk.acc_t + c * MB + i0);
    }
  }

  // out[i][c] = O^T[c][i] / l[i] for the block's rows (transposing back), and each row's lse.
  void write_rows(const Block& blk) const {
    T* inv = blk.alpha;  // free once the last tile is accumulated
    for (int64_t i = 0; i < blk.mb; ++i) inv[i] = blk.l[i] > T(0) ? T(1) / blk.l[i] : T(0);
    if (p.out_wide.data) {
      transpose_scaled<true>(blk.acc_t, MB, p.dv, blk.mb, p.out_wide.row(blk.b, blk.i_begin),
                             p.out_wide.row_stride_elements, inv, 1);
    } else if constexpr (kInPlace) {
      transpose_scaled<true>(blk.acc_t, MB, p.dv, blk.mb, p.out.row(blk.b, blk.i_begin), p.out.row_stride_elements,
                             inv, 1);
    } else {
      // Normalised rows in T first, then each rounded once to S.
      transpose_scaled<true>(blk.acc_t, MB, p.dv, blk.mb, blk.out_rows, p.dv, inv, 1);
      const V one = V::set1(T(1));
      for (int64_t i = 0; i < blk.mb; ++i)
        store_row_scaled<V>(blk.out_rows + i * p.dv, p.dv, one, p.out.row(blk.b, blk.i_begin + i));
    }
    if (p.lse)
      for (int64_t i = 0; i < blk.mb; ++i)
        p.lse[p.lse_batch_offset_elements[blk.b] + blk.i_begin + i] = row_lse(blk.m[i], blk.l[i]);
  }

  // The output row (b, i) as bytes, wherever the result is stored, and the size of one of its elements.
  const char* output_row(int64_t b, int64_t i) const {
    return p.out_wide.data ? reinterpret_cast<const char*>(p.out_wide.row(b, i))
                           : reinterpret_cast<const char*>(p.out.row(b, i));
  }
  int64_t output_element_bytes() const { return p.out_wide.data ? int64_t(sizeof(T)) : int64_t(sizeof(S)); }

  // Attention weights exp(s - m) / l = exp(s - lse) of the block's rows, only when the caller asked.
  // Uses m and l separately, not lse: for huge scores (1e30) m + log(l) rounds back to m.
  // Rare rows, found once per block (special): a row whose max is +inf gives each +inf score 1 / l (l
  // counts them) and every other key 0; in a row that a NaN score made NaN, hidden keys still weigh 0.
  void write_weights(const Block& blk) const {
    const V log2e = V::set1(T(kLog2e)), plus_inf = V::set1(pos_inf<T>()), minus_inf = V::set1(neg_inf<T>());
    bool special = false;
    for (int64_t i = 0; i < blk.mb; ++i) special = special || blk.m[i] == pos_inf<T>() || blk.l[i] != blk.l[i];
    for (int64_t j0 = 0; j0 < p.lk; j0 += NK) {
      const int64_t nk = imin(NK, p.lk - j0);
      const bool any_visible = j0 < blk.max_hi && j0 + nk > blk.min_lo;
      if (any_visible) {
        score_tile(blk, j0, nk);
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
          // Rows without a visible key have m = -inf and l = 0; their scores are -inf: give 0, not NaN.
          const V m = V::load(blk.m + i0);
          const V shift = select(cmp_eq(m, V::set1(neg_inf<T>())), V::zero(), m);
          const V l = V::load(blk.l + i0);
          const V inv = select(cmp_eq(l, V::zero()), V::zero(), V::set1(T(1)) / l);
          for (int64_t j = 0; j < nk; ++j) {
            const V x = V::load(blk.s + j * MB + i0);
            V w = exp2_nonpositive((x - shift) * log2e) * inv;
            if (special) w = select(cmp_eq(x, minus_inf), V::zero(), select(cmp_eq(x, plus_inf), inv, w));
            w.store(blk.s + j * MB + i0);
          }
        }
      }
      for (int64_t i = 0; i < blk.mb; ++i) {
        T* w = p.weights.row(blk.b, blk.i_begin + i) + j0;
        for (int64_t j = 0; j < nk; ++j) w[j] = any_visible ? blk.s[j * MB + i] : T(0);
      }
    }
  }

  // Carves the block's buffers from one thread's scratch, resets its running max and sum and finds its
  // rows' visible keys within [j_begin, j_end); packs its queries when `pack`. With `part` (a key chunk's
  // result, part_elements() long), O^T, m and l live there instead of in the scratch.
  Block start_block(unsigned char* scratch, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end, bool pack,
                    T* part = nullptr) const {
    Carver carve(scratch);
    Block blk;
    blk.b = b;
    blk.i_begin = i_begin;
    blk.mb = imin(MB, p.lq - i_begin);
    blk.panels = ceil_div(blk.mb, QNR);
    blk.j_begin = j_begin;
    blk.j_end = j_end;
    blk.qpack = carve.take<T>(MB * p.depth);
    blk.s = carve.take<T>(NK * MB);
    blk.acc_t = carve.take<T>(dv_rows * MB);
    blk.m = carve.take<T>(MB);
    blk.l = carve.take<T>(MB);
    blk.alpha = carve.take<T>(MB);
    blk.lo = carve.take<int64_t>(MB);
    blk.hi = carve.take<int64_t>(MB);
    blk.va_scaled = carve.take<T>(p.v_a ? p.depth : 0);
    blk.bias_t = carve.take<T>(p.bias.data || p.mask.data ? NK * MB : 0);
    blk.mask_rows = carve.take<T>(p.mask.data ? MB * NK : 0);
    blk.s_raw = carve.take<T>(NK * MB);
    blk.k_tile = carve.take<T>(kInPlace ? 0 : NK * p.depth);
    blk.v_tile = carve.take<T>(kInPlace ? 0 : NK * p.dv);
    blk.q_rows = carve.take<T>(kInPlace ? 0 : QNR * p.depth);
    blk.out_rows = carve.take<T>(kInPlace ? 0 : MB * p.dv);
    if (part) {
      blk.acc_t = part;
      blk.m = part + dv_rows * MB;
      blk.l = blk.m + MB;
    }
    if (p.v_a)
      for (int64_t a = 0; a < p.depth; ++a) blk.va_scaled[a] = p.v_a[a] * p.scale;
    for (int64_t i = 0; i < MB; ++i) {
      blk.m[i] = neg_inf<T>();
      blk.l[i] = T(0);
    }
    compute_bounds(blk);
    if (pack) pack_queries(blk);
    return blk;
  }

  // The online softmax over the block's key tiles: leaves O^T, m and l, unnormalised. A block with a
  // non-finite row is done again carefully (see the header comment).
  void accumulate_tiles(const Block& blk) const {
    accumulate_tiles_pass<false>(blk);
    if (!block_needs_care(blk)) return;
    for (int64_t i = 0; i < MB; ++i) {
      blk.m[i] = neg_inf<T>();
      blk.l[i] = T(0);
    }
    accumulate_tiles_pass<true>(blk);
  }

  template <bool kCareful>
  void accumulate_tiles_pass(const Block& blk) const {
    bool accumulated = false;
    for (int64_t j0 = blk.min_lo; j0 < blk.max_hi; j0 += NK) {
      const int64_t nk = imin(NK, blk.max_hi - j0);
      if (bool_mask_hides_tile(blk, j0, nk)) continue;
      score_tile(blk, j0, nk);
      softmax_tile<kCareful>(blk, nk);
      if (!accumulated) {
        rescale_and_accumulate<true, kCareful>(blk, j0, nk);
        accumulated = true;
      } else {
        rescale_and_accumulate<false, kCareful>(blk, j0, nk);
      }
    }
    // No tile computed (no row sees a key): nothing wrote the accumulator, which stays 0.
    if (!accumulated)
      for (int64_t e = 0; e < dv_rows * MB; ++e) blk.acc_t[e] = T(0);
  }

  // Fetches the query rows of the block at i_begin (see run_block), wherever they are stored.
  void prefetch_query_rows(int64_t b, int64_t i_begin) const {
    const int64_t rows = imin(MB, p.lq - i_begin);
    if (p.q_wide.data) {
      prefetch_rows(p.q_wide.row(b, i_begin), p.q_wide.row_stride_elements, rows, p.depth);
    } else {
      prefetch_rows(p.q.row(b, i_begin), p.q.row_stride_elements, rows, p.depth);
    }
  }

  // One query block. `kv_cold`: the first block of a run of several (QueryRuns), whose K and V this
  // thread has not read yet; `next_i_begin`: the block this thread runs next in the run (-1: none),
  // whose query rows are fetched while this one computes (pack_queries reads them by transposed 8 x 8
  // blocks, a pattern the hardware prefetchers miss); `warm_b`: the item of the thread's next run, whose
  // K and V the last block of a run fetches (dot_score_tile). The block's own output rows are fetched
  // while it computes when they are few (own_output).
  void run_block(unsigned char* scratch, int64_t b, int64_t i_begin, bool kv_cold, int64_t next_i_begin,
                 int64_t warm_b) const {
    Block blk = start_block(scratch, b, i_begin, 0, p.lk, true);
    blk.kv_cold = kv_cold;
    blk.warm_b = warm_b;
    blk.fetch_output = own_output;
    if (next_i_begin >= 0)
      prefetch_query_rows(b, next_i_begin);
    accumulate_tiles(blk);
    write_rows(blk);
    if (p.weights.data) {
      // The weights pass recomputes the scores: what was fetched for this block's end is in use already.
      blk.warm_b = -1;
      blk.fetch_output = false;
      write_weights(blk);
    }
  }

  // ---- Key split: the block's keys in chunks, merged by log-sum-exp (attention_tiled) ----
  // One chunk's result: O^T (dv_rows x MB), then m and l (MB each).
  int64_t part_elements() const { return dv_rows * MB + 2 * MB; }

  void run_block_part(unsigned char* scratch, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end,
                      T* part) const {
    accumulate_tiles(start_block(scratch, b, i_begin, j_begin, j_end, true, part));
  }

  // Combines the block's chunks in chunk order: M = max m_c, l = sum l_c 2^((m_c - M) log2 e), O^T alike
  // (one FMA per chunk and element); the same as one pass over all keys up to rounding, and the same
  // for any thread count. Then writes the rows (and weights) as run_block does. A chunk with m = +inf
  // has counted its +inf scores in l (softmax_tile): it enters with factor 1, so they share the row
  // evenly, and the finite chunks with factor 0. A factor that underflows to 0 still multiplies its
  // chunk's O^T, so a NaN there (a visible NaN V) reaches the row as in one pass.
  void merge_block(unsigned char* scratch, int64_t b, int64_t i_begin, const T* parts, int64_t chunks) const {
    Block blk = start_block(scratch, b, i_begin, 0, p.lk, p.weights.data != nullptr);
    const int64_t pe = part_elements(), m_at = dv_rows * MB, l_at = m_at + MB;
    const V minus_inf = V::set1(neg_inf<T>()), plus_inf = V::set1(pos_inf<T>()), log2e = V::set1(T(kLog2e));
    for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
      V big = minus_inf;
      for (int64_t c = 0; c < chunks; ++c) big = max(big, V::load(parts + c * pe + m_at + i0));
      big.store(blk.m + i0);
      V::zero().store(blk.l + i0);
    }
    for (int64_t e = 0; e < dv_rows * MB; ++e) blk.acc_t[e] = T(0);
    T* factor = blk.alpha;
    for (int64_t c = 0; c < chunks; ++c) {
      const T* part = parts + c * pe;
      for (int64_t i0 = 0; i0 < blk.mb; i0 += L) {
        const V big = V::load(blk.m + i0);
        const V shift = select(cmp_eq(big, minus_inf), V::zero(), big);  // never -inf - -inf
        const V m_part = V::load(part + m_at + i0);
        const V f = select(cmp_eq(m_part, plus_inf), V::set1(T(1)),
                           exp2_nonpositive((m_part - shift) * log2e));  // 0 for an empty chunk
        f.store(factor + i0);
        fmadd(V::load(part + l_at + i0), f, V::load(blk.l + i0)).store(blk.l + i0);
      }
      for (int64_t r = 0; r < p.dv; ++r)
        for (int64_t i0 = 0; i0 < blk.mb; i0 += L)
          fmadd(V::load(part + r * MB + i0), V::load(factor + i0), V::load(blk.acc_t + r * MB + i0))
              .store(blk.acc_t + r * MB + i0);
    }
    write_rows(blk);
    if (p.weights.data) write_weights(blk);
  }

  // Chunks of keys per query block: 1 unless the query blocks alone are too few to keep the cores busy
  // (one long sequence with few heads: a prompt chunk, cross-attention over a long memory). Reads the
  // shape only, never the thread count, so results are the same for any number of threads. Chunks of at
  // least kMinChunkKeys keys, and the partial results stay within kMaxPartialBytes.
  static constexpr int64_t kMinTasks = 32, kMinChunkKeys = 512, kMaxPartialBytes = int64_t(4) << 20;
  int64_t key_chunks(int64_t row_tasks) const {
    if (row_tasks >= kMinTasks) return 1;
    int64_t chunks = imin(ceil_div(kMinTasks, row_tasks), ceil_div(p.lk, kMinChunkKeys));
    chunks = imin(chunks, kMaxPartialBytes / (row_tasks * part_elements() * int64_t(sizeof(T))));
    return imax(1, chunks);
  }
};

// How attention_tiled hands out query blocks: a task is a run of consecutive blocks of one batch item, so
// one thread reads the item's K and V from memory once and then from its own L2 (and knows which query
// rows it needs next), instead of every thread fetching them for its own first block of the item.
// Measured at (8, 8, 512, 512, 64) float32, 2 threads, against one block per task: 1.03x (causal 1.05x)
// while the host's memory was busy, 1.00-1.01x while it was quiet. Only where the item's K and V fit in
// an L2 (kMaxKvBytes, smaller than the L2 of server cores since 2017) and the item has several blocks:
// with K and V of 2 MiB, (1, 8, 4096, 4096, 64) measured 0.993x, and a single block has nothing to reuse.
// Runs leave at least 32 tasks per thread for the load balance, and an item's runs are claimed last run
// first: under a causal mask the last blocks see the most keys, and the cheap first ones then fill the
// tail of the call. The last `threads` items go one block per task (last block first), so the threads
// finish within a block of each other instead of a run: (8, 8, 512, 512, 64) had ended 0.1-0.5 ms apart.
// A run's last block claims the thread's next task (NextTask) and fetches that item's K and V while it
// computes. Scheduling only: no block's result depends on it.
struct QueryRuns {
  static constexpr int64_t kMaxKvBytes = int64_t(512) << 10;
  int64_t blocks, length = 1, per_item, run_items = 0;  // items [0, run_items) go in runs of `length`

  QueryRuns(int64_t batch, int64_t blocks_per_item, int threads, int64_t kv_bytes_per_item)
      : blocks(blocks_per_item), per_item(blocks_per_item) {
    if (kv_bytes_per_item > kMaxKvBytes) return;
    length = imax(1, imin(blocks, batch * blocks / (32 * int64_t(imax(threads, 1)))));
    if (length == 1) return;
    per_item = ceil_div(blocks, length);
    run_items = imax(0, batch - threads);
  }
  int64_t tasks(int64_t batch) const { return run_items * per_item + (batch - run_items) * blocks; }

  struct Task {
    int64_t b, first, last;  // blocks [first, last) of item b
  };
  Task task(int64_t t) const {
    if (t < run_items * per_item) {
      const int64_t first = (per_item - 1 - t % per_item) * length;
      return {t / per_item, first, imin(blocks, first + length)};
    }
    const int64_t u = t - run_items * per_item, first = blocks - 1 - u % blocks;
    return {run_items + u / blocks, first, first + 1};
  }
};

template <class V, class S, int MR, int NRV>
int attention_tiled(const AttentionParams<S, typename V::Scalar>& p) {
  using Kernel = TiledAttention<V, S, MR, NRV>;
  using T = typename V::Scalar;
  const Kernel kernel(p);
  const int64_t blocks = ceil_div(p.lq, int64_t(Kernel::MB));
  const int64_t tasks = p.batch * blocks;
  ThreadScratch scratch(p.num_threads, kernel.scratch_bytes());
  if (!scratch.ok()) return kOutOfMemory;
  const int64_t wanted = kernel.key_chunks(tasks);
  const int64_t chunk_len = round_up(ceil_div(imax(p.lk, 1), wanted), int64_t(Kernel::NK));
  const int64_t chunks = ceil_div(imax(p.lk, 1), chunk_len);
  if (chunks == 1) {
    const QueryRuns runs(p.batch, blocks, p.num_threads, p.lk * (p.depth + p.dv) * int64_t(sizeof(S)));
    parallel_for_with_next(p.num_threads, runs.tasks(p.batch), [&](int64_t task, int slot, NextTask& next) {
      const QueryRuns::Task mine = runs.task(task);
      const int64_t b = mine.b, first = mine.first, last = mine.last;
      // The next task is claimed when this one's last block starts (the call's tail then waits for at
      // most one block more than otherwise), and its item's K and V are fetched unless it is this item.
      // Not where every task is one block (runs.length 1, the seq2seq batch): there claiming a task
      // ahead of each one cost 3%.
      for (int64_t i = first; i < last; ++i)
        kernel.run_block(scratch.slice(slot), b, i * Kernel::MB, last - first > 1 && i == first,
                         i + 1 < last ? (i + 1) * Kernel::MB : -1,
                         (runs.length > 1 && i + 1 == last && next.claim() >= 0 && runs.task(next.claim()).b != b)
                             ? runs.task(next.claim()).b
                             : -1);
    });
    return kOk;
  }
  const int64_t pe = kernel.part_elements();
  T* parts = static_cast<T*>(std::malloc(static_cast<size_t>(tasks * chunks * pe) * sizeof(T)));
  if (!parts) return kOutOfMemory;
  // Chunk-major: the blocks that share a chunk's K and V run at about the same time, and the later ones
  // find them in the shared cache ((1,2,64,16384,128): ~15% faster than block-major, 2 threads).
  parallel_for(p.num_threads, tasks * chunks, [&](int64_t task, int slot) {
    const int64_t row_task = task % tasks, c = task / tasks;
    kernel.run_block_part(scratch.slice(slot), row_task / blocks, (row_task % blocks) * Kernel::MB, c * chunk_len,
                          imin(p.lk, (c + 1) * chunk_len), parts + (row_task * chunks + c) * pe);
  });
  parallel_for(p.num_threads, tasks, [&](int64_t task, int slot) {
    kernel.merge_block(scratch.slice(slot), task / blocks, (task % blocks) * Kernel::MB, parts + task * chunks * pe,
                       chunks);
  });
  std::free(parts);
  return kOk;
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
