// attnfast C++ core API: ISA-agnostic parameter structs. Plain data only (pointers, sizes, strides in
// elements); no Python, no allocation. The binding layer fills these, the kernels only read them.
//
// Batched operands: element (b, r, c) of an operand lives at
//     data[batch_offset_elements[b] + r * row_stride_elements + c * col_stride_elements]
// The per-batch offset table is how broadcasting (stride-0 batch axes), GQA (query head h reads kv head
// h / group) and arbitrary strides reach the kernels without copies.
//
// Storage type and compute type are separate (as PyTorch's opmath_type): every params struct is
// templated on S, the type the caller's data is stored in (double, float, or one of the 16-bit types
// below), and T, the type everything is computed and accumulated in (double for double data, float
// otherwise). Kernels convert S to T on load (exactly: every 16-bit value is a float) and round T to S
// once, to nearest even, on the final store. Scales, running maxima and sums, lse, additive biases and
// attention weights are in T. Results are stored in S (out) or, when the caller asked for the wider
// type, in T (out_wide: a float32 result of bfloat16 keys and values under float32 queries); exactly one
// has data, and for S = T only `out` is used.
#pragma once
#include <cstdint>

namespace attnfast {

// IEEE binary16 and bfloat16 (the upper half of a binary32) as their bit patterns: the C++ core only
// moves and converts them, it never does arithmetic in them, so no compiler extension type is needed.
struct float16_bits {
  uint16_t bits;
};
struct bfloat16_bits {
  uint16_t bits;
};

// The rows of a paged KV cache (vLLM's PagedAttention layout): the cache is an array of pages of
// `rows_per_page` rows each, and batch item b's row r is row r % rows_per_page of page
// table[item_offset[b] + r / rows_per_page]. The caller validates every page index a kernel can reach
// (those of rows below the item's kv_lengths); a kernel never reads a row, nor a table entry, past them.
struct PageTable {
  const int32_t* table = nullptr;        // nullptr: the operand is not paged
  const int64_t* item_offset = nullptr;  // per batch item: where its page indices start in `table`
  int64_t rows_per_page = 0;
  int64_t page_stride_elements = 0;      // elements between the starts of consecutive pages
};

template <class T>
struct Operand {
  T* data = nullptr;
  const int64_t* batch_offset_elements = nullptr;  // one entry per batch item
  int64_t row_stride_elements = 0;
  int64_t col_stride_elements = 1;
  // Paged rows: rows are row_stride_elements apart within a page only (run_rows), and a page of item b
  // starts page_stride_elements * page after data + batch_offset_elements[b] (the item's offset inside
  // a page: its kv head).
  PageTable pages;

  T* row(int64_t b, int64_t r) const {
    if (!pages.table) return data + batch_offset_elements[b] + r * row_stride_elements;
    const int64_t page = pages.table[pages.item_offset[b] + r / pages.rows_per_page];
    return data + batch_offset_elements[b] + page * pages.page_stride_elements +
           (r % pages.rows_per_page) * row_stride_elements;
  }
  bool paged() const { return pages.table != nullptr; }
  // How many rows from row r on are row_stride_elements apart (row(b, r) + t * row_stride_elements is
  // row r + t for t below it): to the end of r's page, or all of them when the operand is not paged.
  int64_t run_rows(int64_t r) const { return pages.table ? pages.rows_per_page - r % pages.rows_per_page : INT64_MAX; }
};

// S[b] = scale * Q[b] K[b]^T   (dot and scaled_dot; general after projecting q by W).
// Q: (batch, lq, depth), K: (batch, lk, depth), out: (batch, lq, lk). Unit column strides.
template <class S, class T = S>
struct ScoresDotParams {
  int64_t batch = 0, lq = 0, lk = 0, depth = 0;
  Operand<const S> q, k;
  Operand<S> out;
  Operand<T> out_wide;
  T scale = 1;
  int num_threads = 1;
};

// S[b, i, j] = scale * sum_a v_a[a] * tanh(qp[b, i, a] + kp[b, j, a])   (Bahdanau additive).
// qp already holds W_q q_i + bias, kp holds W_k k_j; the (lq, lk, hidden) tensor is never built.
// Compute type only: the projections are made in T by the caller.
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
template <class S, class T = S>
struct SoftmaxParams {
  int64_t batch = 0, rows = 0, n = 0;
  Operand<const S> x;
  Operand<const uint8_t> mask;  // data == nullptr: no mask
  Operand<S> out;
  Operand<T> out_wide;
  int num_threads = 1;
};

// out[b] = weights[b] @ v[b]: weights (batch, lq, lk), v (batch, lk, dv), out (batch, lq, dv).
template <class S, class T = S>
struct AggregateParams {
  int64_t batch = 0, lq = 0, lk = 0, dv = 0;
  Operand<const S> weights, v;
  Operand<S> out;
  Operand<T> out_wide;
  int num_threads = 1;
};

// Fused attention. Batch item b = kv_item * group + t: the `group` query items that share one kv item
// are consecutive (GQA/MQA), so k and v are indexed by b / group.
// Visible keys of query row i: j in [lo_i, hi_i) from causal / window / kv_lengths, then the bool mask.
//   diag_i = i + diagonal_offset            (0 for top_left causal, lk - lq for bottom_right;
//                                            diagonal_offsets[b] instead when given: kv_lengths[b] - lq)
//   causal:        hi_i = min(hi_i, diag_i + 1)
//   window (l, r): lo_i = max(lo_i, diag_i - l), hi_i = min(hi_i, diag_i + r + 1)   (-1 = unbounded)
//   kv_lengths:    hi_i = min(hi_i, kv_lengths[b])
//
// Scores: q.k * scale (dot; general and concat arrive here as dot products of projected features), or,
// when v_a is set, Bahdanau's additive score scale * sum_a v_a[a] tanh(q[a] + k[a]) with q and k the
// projected queries (bias included) and keys, depth = hidden size A. Never materialised.
//
// K and V are read in place in their storage type S. Q is converted once per query block, so it may be
// stored in S (q) or in T (q_wide: float32 queries over a 16-bit cache); exactly one has data.
// K and V may be paged (Operand::pages: a paged KV cache). int8 K and V (S = int8_t, a quantised cache)
// come with one scale per row: K row j of kv item b stands for k.row(b, j) * k_scale.row(b, j)[0], and
// likewise V; queries are then in q_wide and the result in out_wide.
//
// Score modifiers, in this order, after the score rule and before bias and masks (the reference's
// formulas, README "Numerics"):
//   softcap > 0:   s <- softcap * tanh(s / softcap)
//   alibi_slopes:  s <- s - alibi_slopes[b] * |diag_i - j|
//   sinks:         a logit sinks[b] that joins every row's softmax denominator and has no value:
//                  out_i = sum_j e^(s_ij - m) v_j / (e^(sinks[b] - m) + sum_j e^(s_ij - m)), lse includes it;
//                  a row with no visible key keeps weights 0 and out 0 (its lse is then sinks[b]).
// Packed variable-length batches: with q_lengths, item b has q_lengths[b] <= lq query rows; rows past it
// are neither read nor written (nor their lse).
template <class S, class T = S>
struct AttentionParams {
  int64_t batch = 0, group = 1, lq = 0, lk = 0, depth = 0, dv = 0;
  Operand<const S> q, k, v;  // unit column stride
  Operand<const T> q_wide;   // unit column stride; instead of q
  Operand<S> out;            // unit column stride
  Operand<T> out_wide;       // unit column stride; instead of out
  T scale = 1;               // multiplies the score
  const T* v_a = nullptr;    // additive scores when set: (depth,), contiguous
  Operand<const uint8_t> mask;  // optional; any strides (0 = broadcast)
  Operand<const T> bias;        // optional; any strides
  const int64_t* kv_lengths = nullptr;  // optional, one per batch item
  bool causal = false;
  int64_t diagonal_offset = 0;
  const int64_t* diagonal_offsets = nullptr;  // optional, one per batch item; replaces diagonal_offset
  int64_t window_left = -1, window_right = -1;
  const int64_t* q_lengths = nullptr;  // optional, one per batch item (packed variable-length batches)
  Operand<const float> k_scale, v_scale;  // int8 K / V only: one scale per row, at row(b, j)[0]
  T softcap = 0;                       // > 0: soft-capped scores
  const T* alibi_slopes = nullptr;     // optional, one per batch item
  const T* sinks = nullptr;            // optional, one per batch item
  T* lse = nullptr;  // optional (batch, lq): lse[lse_batch_offset[b] + i]
  const int64_t* lse_batch_offset_elements = nullptr;
  Operand<T> weights;  // optional (batch, lq, lk), unit column stride
  int num_threads = 1;
};

// Gradients of the fused attention (FlashAttention-2 style): P is recomputed tile by tile from the
// forward's lse, never stored. `forward` holds exactly the operands, masks and sizes the forward call
// got (q or q_wide, k, v, scale, v_a, mask, bias, kv_lengths, causal, diagonal_offset, window), its
// result O in out or out_wide (read here, for delta_i = dO_i . O_i) and its lse (read; required).
// forward.weights is unused. dO is stored in S (dout) or T (dout_wide); exactly one has data.
// Score modifiers as in the forward: softcap, alibi_slopes and sinks are honoured (a sink only through
// the lse, which includes it; its own gradient, -sum_i e^(sink - lse_i) dO_i . O_i, is the caller's),
// diagonal_offsets and q_lengths too; paged and int8 K / V are not (the caller passes dense ones).
//
// Outputs, all in T, written (never accumulated into), unit column strides:
//   dq (batch, lq, depth); dk (kv items, lk, depth), dv (kv items, lk, dv), where kv item = b / group:
//   a kv item's gradient sums the contributions of its `group` query items (GQA/MQA).
//   dscores (optional; batch, lq, lk): dS, the gradient of the final scores (bias included), i.e. the
//   gradient of an additive bias before any broadcast reduction; 0 where a key is hidden. Under a
//   softcap, dq and dk chain it through the cap's derivative 1 - tanh^2; dscores stays the bias's.
//   dv_a (additive scores only, forward.v_a set; (depth,)): the gradient of v_a. dq and dk are then the
//   gradients of the projected queries (bias included) and keys.
// A row with no visible key gets zero gradients; a hidden key contributes nothing to any gradient,
// whatever its K and V hold. Every output element is computed by one task in an order that depends on
// the shapes only: results are bitwise identical for any thread count.
template <class S, class T = S>
struct AttentionBackwardParams {
  AttentionParams<S, T> forward;
  Operand<const S> dout;       // unit column stride
  Operand<const T> dout_wide;  // unit column stride; instead of dout
  Operand<T> dq, dk, dv;
  Operand<T> dscores;  // optional
  T* dv_a = nullptr;   // additive only
};

}  // namespace attnfast
