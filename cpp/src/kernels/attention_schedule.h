// The fused attention's schedule, shared by the tiled and the row-wise path: how the tiled path hands
// out its query blocks (QueryRuns), when and how a task's keys are split into chunks (split_keys, one
// rule with each path's numbers), and the log-sum-exp merge of the chunks' partial states
// (merge_chunk_states), which both paths run.
// dtypes: float, double (the merge runs in that precision). ISA: the target's V (the merge only).
//
// Numerics: the schedule never changes a result, except through the key split: a split call adds its
// chunks' partial sums, a different rounding from one pass over the keys. The split therefore reads
// the shape only, never the thread count, and the merge runs in chunk order, so results are bitwise the
// same for any number of threads.
#pragma once
#include "kernels/attention_common.h"
#include "kernels/common.h"
#include "kernels/math.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// How attention_tiled hands out query blocks: a task is a run of consecutive blocks of one batch item, so
// one thread reads the item's K and V from memory once and then from its own L2 (and knows which query
// rows it needs next), instead of every thread fetching them for its own first block of the item. Only
// where the item's K and V fit in an L2 (kMaxKvBytes, smaller than the L2 of server cores since 2017)
// and the item has several blocks: K and V beyond an L2 are read from memory again anyway, and a single
// block has nothing to reuse. (Measurements: docs/kernel_decisions.md.)
// Runs leave at least 32 tasks per thread for the load balance, and an item's runs are claimed last run
// first: under a causal mask the last blocks see the most keys, and the cheap first ones then fill the
// tail of the call. The last `threads` items go one block per task (last block first), so the threads
// finish within a block of each other instead of a run apart.
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

// ---- Key split (split-KV) ----
// A call's keys are split into chunks only when its tasks alone (the tiled path's query blocks, the
// row-wise path's kv items) are too few to keep the cores busy: one long sequence with few heads (a
// prompt chunk, cross-attention over a long memory), a KV-cache decode of few kv heads. Each chunk of a
// task is then a task of its own, and the chunks' partial states are merged afterwards. The rule reads
// the shape only, never the thread count (see the header). Each path has its own numbers below.
struct KeySplitRule {
  int64_t min_tasks;          // split only when the call has fewer tasks than this
  int64_t min_keys;           // and at least this many keys
  int64_t chunk_keys;         // at most ceil(keys / chunk_keys) chunks, so chunks of about this many keys
  int64_t max_chunks;         // and at most this many chunks
  bool up_to_min_tasks;       // no more chunks than bring the tasks to min_tasks
  int64_t max_partial_bytes;  // all tasks' chunk partial states within this (0: no limit)
};

// Tiled (tasks: query blocks): a chunk's partial state is a whole block's O^T, so the chunks stop where
// they make enough tasks (max_chunks is then never the limit) and their states stay within 4 MiB.
constexpr KeySplitRule kTiledKeySplit{32, 0, 512, 32, true, int64_t(4) << 20};
// Row-wise (tasks: kv items): a chunk's partial state is a few rows; up to 16 chunks of ~1024 keys.
constexpr KeySplitRule kRowwiseKeySplit{8, 2048, 1024, 16, false, 0};

struct KeyChunks {
  int64_t count;   // chunks per task
  int64_t length;  // keys per chunk (the last may be shorter): a multiple of the path's key tile
};

// The chunks of `lk` keys for `tasks` tasks under `rule`, each chunk a whole number of `tile_keys` key
// tiles; `partial_bytes`: the size of one task's partial state of one chunk.
inline KeyChunks split_keys(const KeySplitRule& rule, int64_t tasks, int64_t lk, int64_t tile_keys,
                            int64_t partial_bytes) {
  int64_t wanted = 1;
  if (tasks < rule.min_tasks && lk >= rule.min_keys) {
    wanted = imin(rule.max_chunks, ceil_div(lk, rule.chunk_keys));
    if (rule.up_to_min_tasks) wanted = imin(wanted, ceil_div(rule.min_tasks, tasks));
    if (rule.max_partial_bytes) wanted = imin(wanted, rule.max_partial_bytes / (tasks * partial_bytes));
    wanted = imax(1, wanted);
  }
  const int64_t length = round_up(ceil_div(imax(lk, 1), wanted), tile_keys);
  return {ceil_div(imax(lk, 1), length), length};
}

// ---- Merge of the chunks' partial states ----
// Where the partial states of a task's chunks sit. Rows side by side in lanes (ChunkRows::kLanes, the
// tiled path: `groups` vectors of L consecutive query rows, m and l lane vectors at group * L, and the
// accumulator one vector per value feature, acc_stride apart, from group * L), or one row
// (ChunkRows::kOne, the row-wise path: m and l scalars, broadcast to every lane, and the accumulator the
// row's value features, acc_vectors vectors of L, acc_stride = L).
enum class ChunkRows { kLanes, kOne };

struct ChunkStateLayout {
  int64_t m_at, l_at;   // offsets of the rows' running max and sum in a chunk's state
  int64_t acc_vectors;  // accumulator vectors per group of rows, from offset 0 of the state
  int64_t acc_stride;   // elements between them
  int64_t groups;       // groups of rows (ChunkRows::kOne: 1)
};

// Combines `chunks` partial states (chunk c's at states + c * chunk_stride) in chunk order into m, l
// and acc (laid out as one chunk's state without its offsets: m and l of group g at m + g * L, l + g * L;
// factor: scratch for groups * L values): M = max m_c, l = sum l_c 2^((m_c - M) log2 e), acc alike (one
// FMA per chunk and element, from 0); the same as one pass over all keys up to rounding, and the same
// for any thread count. A chunk with m = +inf has counted its +inf scores in l (the paths' softmax): it
// enters with factor 1, so they share the row evenly, and the finite chunks with factor 0. A factor
// that underflows to 0 still multiplies its chunk's accumulator, so a NaN there (a visible NaN V)
// reaches the row as in one pass; a NaN max (the row-wise path keeps a NaN score's) makes M NaN.
template <class V, ChunkRows kRows>
inline void merge_chunk_states(const ChunkStateLayout& at, const typename V::Scalar* states, int64_t chunk_stride,
                        int64_t chunks, typename V::Scalar* m, typename V::Scalar* l, typename V::Scalar* acc,
                        typename V::Scalar* factor) {
  using T = typename V::Scalar;
  constexpr int L = V::kLanes;
  constexpr bool kOne = kRows == ChunkRows::kOne;
  const auto load_stat = [](const T* x) { return kOne ? V::broadcast(x) : V::load(x); };
  const auto store_stat = [](V x, T* to) {
    if (kOne) {
      x.store_partial(to, 1);
    } else {
      x.store(to);
    }
  };
  const V minus_inf = V::set1(neg_inf<T>()), plus_inf = V::set1(pos_inf<T>()), log2e = V::set1(T(kLog2e));
  for (int64_t g = 0; g < at.groups; ++g) {
    V big = minus_inf;
    for (int64_t c = 0; c < chunks; ++c) {
      const V m_part = load_stat(states + c * chunk_stride + at.m_at + g * L);
      big = select(cmp_eq(m_part, m_part), max(m_part, big), m_part);  // a NaN stays
    }
    store_stat(big, m + g * L);
    store_stat(V::zero(), l + g * L);
    for (int64_t k = 0; k < at.acc_vectors; ++k) V::zero().store(acc + g * L + k * at.acc_stride);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    const T* state = states + c * chunk_stride;
    for (int64_t g = 0; g < at.groups; ++g) {
      const V big = load_stat(m + g * L);
      const V shift = select(cmp_eq(big, minus_inf), V::zero(), big);  // never -inf - -inf
      const V m_part = load_stat(state + at.m_at + g * L);
      const V f = select(cmp_eq(m_part, plus_inf), V::set1(T(1)),
                         exp2_nonpositive((m_part - shift) * log2e));  // 0 for an empty chunk
      f.store(factor + g * L);
      store_stat(fmadd(load_stat(state + at.l_at + g * L), f, load_stat(l + g * L)), l + g * L);
    }
    for (int64_t k = 0; k < at.acc_vectors; ++k)
      for (int64_t g = 0; g < at.groups; ++g) {
        T* out = acc + g * L + k * at.acc_stride;
        fmadd(V::load(state + g * L + k * at.acc_stride), V::load(factor + g * L), V::load(out)).store(out);
      }
  }
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
