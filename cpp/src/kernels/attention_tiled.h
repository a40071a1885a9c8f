// Fused attention, tiled path (FlashAttention-style) for blocks of many query rows: the driver.
// dtypes: float, double (scores, exponentials and accumulators all in that precision). ISA: target's V.
//
// The unit of work is a query block of MB rows of one batch item (tasks hand them out as runs of
// consecutive blocks of one item: QueryRuns). A block's score tiles and masks are
// tiled_score_tile.h, its online softmax over the key tiles and the writing of its rows
// tiled_online_softmax.h (layout and numerics are described there); TiledAttention composes the two
// and adds a block's scratch, its prefetches and the key split. When the query blocks are too few to
// keep the cores busy (one long sequence, few heads, few query rows), each block's keys are split into
// chunks, processed as separate tasks and merged by log-sum-exp in chunk order (key_chunks,
// merge_block); the split depends on the shape only.
#pragma once
#include <cstdlib>

#include "attnfast/params.h"
#include "kernels/common.h"
#include "kernels/tiled_online_softmax.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

template <class V, int MR, int NRV>
struct TiledAttention : TiledOnlineSoftmax<V, MR, NRV> {
  using Softmax = TiledOnlineSoftmax<V, MR, NRV>;
  using T = typename V::Scalar;
  using Block = typename Softmax::Block;
  using Softmax::dv_rows;
  using Softmax::L;
  using Softmax::MB;
  using Softmax::NK;
  using Softmax::p;

  // Blocks fetch their output rows into cache while the Q.K^T of their last key tile runs, a share per
  // microkernel call, so that write_rows' stores do not each wait on memory: (8, 8, 512, 512, 64)
  // 1.0-1.3% faster. (Spread over all of a block's tiles, they were evicted again before write_rows at
  // (1, 8, 4096, 4096, 64), and that call ran 0.5% slower than without the prefetch.) Only where a
  // block's output is small beside L1: at D = 256 (the seq2seq batch: 40 rows of 1 KiB) it pushed the
  // block's working set out of L1 and that call ran 1-2% slower. (A write prefetch: on targets without
  // PRFCHW the compiler emits the read prefetch, which on x86 brings an unshared line in exclusive.)
  static constexpr int64_t kMaxOwnedOutputBytes = int64_t(16) << 10;
  bool own_output;

  explicit TiledAttention(const AttentionParams<T>& params)
      : Softmax(params), own_output(MB * params.dv * int64_t(sizeof(T)) <= kMaxOwnedOutputBytes) {}

  int64_t scratch_bytes() const { return this->tile_scratch_bytes() + this->softmax_scratch_bytes(); }

  // Carves the block's buffers from one thread's scratch, resets its running max and sum and finds its
  // rows' visible keys within [j_begin, j_end); packs its queries when `pack`. With `part` (a key chunk's
  // result, part_elements() long), O^T, m and l live there instead of in the scratch.
  Block start_block(unsigned char* scratch, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end, bool pack,
                    T* part = nullptr) const {
    Carver carve(scratch);
    Block blk;
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
    if (part) {
      blk.acc_t = part;
      blk.m = part + dv_rows * MB;
      blk.l = blk.m + MB;
    }
    this->reset_rows(blk);
    this->begin_block(blk, b, i_begin, j_begin, j_end, pack);
    return blk;
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
      prefetch_rows(p.q.row(b, next_i_begin), p.q.row_stride_elements, imin(MB, p.lq - next_i_begin), p.depth);
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
  // One chunk's result: O^T (dv_rows x MB), then m and l (MB each).
  int64_t part_elements() const { return dv_rows * MB + 2 * MB; }

  void run_block_part(unsigned char* scratch, int64_t b, int64_t i_begin, int64_t j_begin, int64_t j_end,
                      T* part) const {
    this->accumulate_tiles(start_block(scratch, b, i_begin, j_begin, j_end, true, part));
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
    this->write_rows(blk);
    if (p.weights.data) this->write_weights(blk);
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

template <class V, int MR, int NRV>
int attention_tiled(const AttentionParams<typename V::Scalar>& p) {
  using Kernel = TiledAttention<V, MR, NRV>;
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
    const QueryRuns runs(p.batch, blocks, p.num_threads, p.lk * (p.depth + p.dv) * int64_t(sizeof(T)));
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
