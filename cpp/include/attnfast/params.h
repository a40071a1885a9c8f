// attnfast C++ core API: ISA-agnostic parameter structs. Plain data only (pointers, sizes, strides in
// elements); no Python, no allocation. The binding layer fills these, the kernels only read them.
//
// Batched operands: element (b, r, c) of an operand lives at
//     data[batch_offset_elements[b] + r * row_stride_elements + c * col_stride_elements]
// The per-batch offset table is how broadcasting (stride-0 batch axes), GQA (query head h reads kv head
// h / group) and arbitrary strides reach the kernels without copies.
#pragma once
#include <cstdint>

namespace attnfast {

template <class T>
struct Operand {
  T* data = nullptr;
  const int64_t* batch_offset_elements = nullptr;  // one entry per batch item
  int64_t row_stride_elements = 0;
  int64_t col_stride_elements = 1;

  T* row(int64_t b, int64_t r) const { return data + batch_offset_elements[b] + r * row_stride_elements; }
};

// S[b] = scale * Q[b] K[b]^T   (dot and scaled_dot; general after projecting q by W).
// Q: (batch, lq, depth), K: (batch, lk, depth), out: (batch, lq, lk). Unit column strides.
template <class T>
struct ScoresDotParams {
  int64_t batch = 0, lq = 0, lk = 0, depth = 0;
  Operand<const T> q, k;
  Operand<T> out;
  T scale = 1;
  int num_threads = 1;
};

// S[b, i, j] = scale * sum_a v_a[a] * tanh(qp[b, i, a] + kp[b, j, a])   (Bahdanau additive).
// qp already holds W_q q_i + bias, kp holds W_k k_j; the (lq, lk, hidden) tensor is never built.
template <class T>
struct ScoresAdditiveParams {
  int64_t batch = 0, lq = 0, lk = 0, hidden = 0;
  Operand<const T> qp, kp;
  const T* v_a = nullptr;  // (hidden,), contiguous
  Operand<T> out;
  T scale = 1;
  int num_threads = 1;
};

// Row softmax over the last axis of x: (batch, rows, n). Any column stride (gathered when not 1).
// mask (optional, bool as uint8, 1 = keep) uses the same indexing, broadcast by zero strides.
template <class T>
struct SoftmaxParams {
  int64_t batch = 0, rows = 0, n = 0;
  Operand<const T> x;
  Operand<const uint8_t> mask;  // data == nullptr: no mask
  Operand<T> out;
  int num_threads = 1;
};

// out[b] = weights[b] @ v[b]: weights (batch, lq, lk), v (batch, lk, dv), out (batch, lq, dv).
template <class T>
struct AggregateParams {
  int64_t batch = 0, lq = 0, lk = 0, dv = 0;
  Operand<const T> weights, v;
  Operand<T> out;
  int num_threads = 1;
};

// Fused attention. Batch item b = kv_item * group + t: the `group` query items that share one kv item
// are consecutive (GQA/MQA), so k and v are indexed by b / group.
// Visible keys of query row i: j in [lo_i, hi_i) from causal / window / kv_lengths, then the bool mask.
//   diag_i = i + diagonal_offset            (0 for top_left causal, lk - lq for bottom_right)
//   causal:        hi_i = min(hi_i, diag_i + 1)
//   window (l, r): lo_i = max(lo_i, diag_i - l), hi_i = min(hi_i, diag_i + r + 1)   (-1 = unbounded)
//   kv_lengths:    hi_i = min(hi_i, kv_lengths[b])
//
// Scores: q.k * scale (dot; general and concat arrive here as dot products of projected features), or,
// when v_a is set, Bahdanau's additive score scale * sum_a v_a[a] tanh(q[a] + k[a]) with q and k the
// projected queries (bias included) and keys, depth = hidden size A. Never materialised.
template <class T>
struct AttentionParams {
  int64_t batch = 0, group = 1, lq = 0, lk = 0, depth = 0, dv = 0;
  Operand<const T> q, k, v;  // unit column stride
  Operand<T> out;            // unit column stride
  T scale = 1;               // multiplies the score
  const T* v_a = nullptr;    // additive scores when set: (depth,), contiguous
  Operand<const uint8_t> mask;  // optional; any strides (0 = broadcast)
  Operand<const T> bias;        // optional; any strides
  const int64_t* kv_lengths = nullptr;  // optional, one per batch item
  bool causal = false;
  int64_t diagonal_offset = 0;
  int64_t window_left = -1, window_right = -1;
  T* lse = nullptr;  // optional (batch, lq): lse[lse_batch_offset[b] + i]
  const int64_t* lse_batch_offset_elements = nullptr;
  Operand<T> weights;  // optional (batch, lq, lk), unit column stride
  int num_threads = 1;
};

}  // namespace attnfast
