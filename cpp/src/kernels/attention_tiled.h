// Fused attention, tiled path (FlashAttention-style) for blocks of many query rows: the driver.
// dtypes: K and V stored in S (double, float, float16, bfloat16; int8 with per-row scales, float32
// queries and result: tiled_score_tile.h), queries and the result in S or T,
// computed in T = V::Scalar (double for double, else float). ISA: target's V.
//
// The unit of work is a query block of MB rows of one batch item (tasks hand them out as runs of
// consecutive blocks of one item: QueryRuns, attention_schedule.h). A block's score tiles and masks are
// tiled_score_tile.h, its online softmax over the key tiles and the writing of its rows
// tiled_online_softmax.h (layout and numerics are described there); TiledAttention composes the two
// and adds a block's scratch, its prefetches and the key split. When the query blocks are too few to
// keep the cores busy (one long sequence, few heads, few query rows), each block's keys are split into
// chunks, processed as separate tasks and merged by log-sum-exp in chunk order (split_keys,
// merge_chunk_states: attention_schedule.h); the split depends on the shape only.
// Packed variable-length batches (q_lengths): an item has item_rows(p, b) rows, and the blocks past them
// are tasks that return at once, so an item costs its own blocks; the caller orders the items longest
// first, which the task order then follows.
#pragma once
#include <cstdlib>

#include "attnfast/params.h"
#include "kernels/attention_schedule.h"
#include "kernels/common.h"
#include "kernels/tiled_online_softmax.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, class S, int MR, int NRV>
struct TiledAttention : TiledOnlineSoftmax<V, S, MR, NRV> {
  using Softmax = TiledOnlineSoftmax<V, S, MR, NRV>;
  using T = typename V::Scalar;
  using Block = typename Softmax::Block;
  using Softmax::dv_rows;
  using Softmax::L;
  using Softmax::MB;
  using Softmax::NK;
  using Softmax::p;
  using Softmax::kInPlace;
  using Softmax::QNR;
  using Softmax::kPairs;
  using Pairs = typename Softmax::Pairs;

  // Blocks fetch their output rows into cache while the Q.K^T of their last key tile runs, a share per
  // microkernel call, so that write_rows' stores do not each wait on memory. (Spread over all of a
  // block's tiles, the lines are evicted again before write_rows on long rows.) Only where a block's
  // output is small beside L1: a large one (D = 256: 40 rows of 1 KiB) pushes the block's working set
  // out of L1. (A write prefetch: on targets without PRFCHW the compiler emits the read prefetch, which
  // on x86 brings an unshared line in exclusive.) Measurements: docs/kernel_decisions.md.
  static constexpr int64_t kMaxOwnedOutputBytes = int64_t(16) << 10;
  bool own_output;

  explicit TiledAttention(const typename Softmax::Params& params)
      : Softmax(params), own_output(MB * params.dv * int64_t(sizeof(T)) <= kMaxOwnedOutputBytes) {}

  int64_t scratch_bytes() const { return this->tile_scratch_bytes() + this->softmax_scratch_bytes() + pair_bytes(); }
  // The bfloat16 pair path's buffers (attention_tiles_bf16.h): the value cache's tag and pairs, the
  // query, P and V pairs, and l_exp.
  int64_t pair_bytes() const {
    if constexpr (kPairs) {
      return Carver::bytes<int64_t>(1) + Carver::bytes<uint32_t>(Pairs::value_cache_words(p.lk, p.dv)) +
             Carver::bytes<uint32_t>(Pairs::query_words(MB, p.depth)) +
             Carver::bytes<uint32_t>(Pairs::probability_words(NK, MB)) +
             Carver::bytes<uint32_t>(Pairs::value_words(NK, p.dv)) + Carver::bytes<T>(MB);
    }
    return 0;
  }

  // Marks a thread's scratch as holding no packed V (the pair path's value cache): once per call, since
  // the scratch is new memory. No-op elsewhere.
  void reset_scratch(unsigned char* scratch) const {
    if constexpr (kPairs) *reinterpret_cast<int64_t*>(scratch) = -1;
  }

  // Carves the block's buffers from one thread's scratch, resets its running max and sum and finds its
  // rows' visible keys within [j_begin, j_end); packs its queries when `pack`. With `part` (a key chunk's
  // result, part_elements() long), O^T, m and l live there instead of in the scratch.
  Block start_block(unsigned char* scratch, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end, bool pack,
                    T* part = nullptr) const {
    Carver carve(scratch);
    Block blk;
    if constexpr (kPairs) blk.v_cache_item = carve.take<int64_t>(1);  // first: reset_scratch finds it there
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
    blk.k_tile = carve.take<T>(this->kv_tiles ? NK * p.depth : 0);
    blk.q_rows = carve.take<T>(kInPlace ? 0 : QNR * p.depth);
    blk.v_tile = carve.take<T>(this->kv_tiles ? NK * p.dv : 0);
    blk.out_rows = carve.take<T>(kInPlace ? 0 : MB * p.dv);
    blk.l_exp = blk.l;
    if constexpr (kPairs) {
      blk.pairs = p.q.data != nullptr;  // float32 queries (q_wide) keep the widening path
      blk.q_pairs = carve.take<uint32_t>(Pairs::query_words(MB, p.depth));
      blk.p_pairs = carve.take<uint32_t>(Pairs::probability_words(NK, MB));
      blk.v_pairs = carve.take<uint32_t>(Pairs::value_words(NK, p.dv));
      uint32_t* cache = carve.take<uint32_t>(Pairs::value_cache_words(p.lk, p.dv));
      T* l_exp = carve.take<T>(MB);
      if (blk.pairs) {
        blk.l_exp = l_exp;
        // Not for a paged V: packing a whole item would read the pages of keys past kv_lengths.
        if (Pairs::value_cache_words(p.lk, p.dv) > 0 && !p.v.paged()) blk.v_cache = cache;
      }
    }
    if (part) {
      blk.acc_t = part;
      blk.m = part + dv_rows * MB;
      blk.l = blk.m + MB;
      blk.l_exp = blk.pairs ? blk.l + MB : blk.l;
    }
    this->reset_rows(blk);
    this->begin_block(blk, b, i_begin, j_begin, j_end, pack);
    return blk;
  }

  // Fetches the query rows of the block at i_begin (see run_block), wherever they are stored.
  void prefetch_query_rows(int64_t b, int64_t i_begin) const {
    const int64_t rows = imin(MB, item_rows(p, b) - i_begin);
    if (rows <= 0) return;
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
    if (i_begin >= item_rows(p, b)) return;  // past a packed sequence's rows: nothing to do
    Block blk = start_block(scratch, b, i_begin, 0, p.lk, true);
    blk.kv_cold = kv_cold;
    blk.warm_b = warm_b;
    blk.fetch_output = own_output;
    if (next_i_begin >= 0) prefetch_query_rows(b, next_i_begin);
    this->accumulate_tiles(blk);
    this->write_rows(blk);
    if (p.weights.data) {
      // The weights pass recomputes the scores: what was fetched for this block's end is in use already.
      blk.warm_b = -1;
      blk.fetch_output = false;
      this->write_weights(blk);
    }
  }

  // ---- Key split: the block's keys in chunks, merged by log-sum-exp (attention_tiled) ----
  // One chunk's result: O^T (dv_rows x MB), then m and l (MB each), and l_exp where it is not l (kPairs).
  int64_t part_elements() const { return dv_rows * MB + (kPairs ? 3 : 2) * MB; }

  KeyChunks key_chunks(int64_t row_tasks) const {
    return split_keys(kTiledKeySplit, row_tasks, p.lk, NK, part_elements() * int64_t(sizeof(T)));
  }

  void run_block_part(unsigned char* scratch, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end,
                      T* part) const {
    if (i_begin >= item_rows(p, b)) return;
    Block blk = start_block(scratch, b, i_begin, j_begin, j_end, true, part);
    // The pair path's value cache serves consecutive blocks of one item; a thread's chunk tasks change
    // item, and a chunk needs only its share of the keys: pack per tile.
    blk.v_cache = nullptr;
    this->accumulate_tiles(blk);
  }

  // Combines the block's chunks (merge_chunk_states, rows in lanes as in O^T), then writes the rows (and
  // weights) as run_block does.
  void merge_block(unsigned char* scratch, int64_t b, int64_t i_begin, const T* parts, int64_t chunks) const {
    if (i_begin >= item_rows(p, b)) return;
    Block blk = start_block(scratch, b, i_begin, 0, p.lk, p.weights.data != nullptr);
    const ChunkStateLayout at{dv_rows * MB, dv_rows * MB + MB, p.dv, MB, ceil_div(blk.mb, int64_t(L))};
    merge_chunk_states<V, ChunkRows::kLanes>(at, parts, part_elements(), chunks, blk.m, blk.l, blk.acc_t, blk.alpha);
    if (kPairs && blk.pairs) {
      // l_exp (the pair path's sum for lse) merges as l does; the same maxima go to a scratch copy.
      const ChunkStateLayout exp_at{at.m_at, at.l_at + MB, 0, MB, at.groups};
      merge_chunk_states<V, ChunkRows::kLanes>(exp_at, parts, part_elements(), chunks, blk.s, blk.l_exp, nullptr,
                                               blk.s + MB);
    }
    this->write_rows(blk);
    if (p.weights.data) this->write_weights(blk);
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
  for (int t = 0; t < imax(p.num_threads, 1); ++t) kernel.reset_scratch(scratch.slice(t));
  const KeyChunks split = kernel.key_chunks(tasks);
  const int64_t chunk_len = split.length, chunks = split.count;
  if (chunks == 1) {
    const QueryRuns runs(p.batch, blocks, p.num_threads, p.lk * (p.depth + p.dv) * int64_t(sizeof(S)));
    parallel_for_with_next(p.num_threads, runs.tasks(p.batch), [&](int64_t task, int slot, NextTask& next) {
      const QueryRuns::Task mine = runs.task(task);
      const int64_t b = mine.b, first = mine.first, last = mine.last;
      // The next task is claimed when this one's last block starts (the call's tail then waits for at
      // most one block more than otherwise), and its item's K and V are fetched unless it is this item.
      // Not where every task is one block (runs.length 1, the seq2seq batch): there the claim costs more
      // than the fetch saves.
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
  // find them in the shared cache (docs/kernel_decisions.md).
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
