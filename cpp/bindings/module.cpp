// The only pybind11 code. Every function here: check dtypes and layouts (Python's _inputs module has
// already validated shapes and values and allocated the outputs), build the params struct, release the
// GIL, call the active target's kernel, turn a failed scratch allocation into MemoryError. The one
// exception is plain_attention, the fast path for the most common attention call, which recognises
// such calls itself (see its comment) and hands every other call back to the validating Python path.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "attnfast/kernels.h"
#include "batch_layout.h"
#include "gil.h"

namespace py = pybind11;
using attnfast::Operand;
using attnfast::bindings::ArrayLayout;
using attnfast::bindings::OperandLayout;
using Shape = std::vector<int64_t>;

namespace {

ArrayLayout describe(const py::array& a) {
  ArrayLayout d;
  d.itemsize = static_cast<int64_t>(a.itemsize());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    d.shape.push_back(static_cast<int64_t>(a.shape(i)));
    d.strides_bytes.push_back(static_cast<int64_t>(a.strides(i)));
  }
  return d;
}

// Keeps offset tables alive for the duration of one kernel call.
struct Layouts {
  std::vector<OperandLayout> items;
  std::vector<std::vector<int64_t>> tables;  // further per-item tables (page table offsets, shifted rows)

  std::vector<int64_t>& table(size_t n) {
    tables.emplace_back(n);
    return tables.back();
  }

  template <class T>
  Operand<T> make(const py::array& a, const Shape& batch, int core_dims, const char* name,
                  bool need_unit_columns) {
    items.push_back(attnfast::bindings::layout_operand(describe(a), batch, core_dims, name));
    const OperandLayout& l = items.back();
    // NumPy gives empty arrays zero strides; with no element to read, any stride is fine.
    if (need_unit_columns && l.col_stride != 1 && a.shape(a.ndim() - 1) > 1 && a.size() > 0)
      throw std::invalid_argument(std::string(name) + ": last axis must have unit stride");
    Operand<T> op;
    op.data = static_cast<T*>(const_cast<void*>(a.data()));
    op.batch_offset_elements = l.batch_offsets.data();
    op.row_stride_elements = l.row_stride;
    op.col_stride_elements = need_unit_columns ? 1 : l.col_stride;
    return op;
  }
};

// ---- Storage types ---------------------------------------------------------------------------
// The one place NumPy dtypes meet the kernel tables. Dtype tests are by equivalence (PyArray_EquivTypes:
// type and byte order), not descriptor identity: an array may carry an equal but distinct float32
// descriptor (e.g. one converted from '>f4'). bfloat16 is ml_dtypes' dtype (a dependency of the
// package), looked up on first use.
enum class Storage { f64, f32, f16, bf16, i8, unsupported };

const py::dtype& bfloat16_dtype() {
  static const py::dtype* const dt =
      new py::dtype(py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16")));  // kept for the process' life
  return *dt;
}

const py::dtype& float16_dtype() {
  static const py::dtype* const dt = new py::dtype("float16");  // kept for the process' life
  return *dt;
}

Storage storage_of(const py::dtype& dt) {
  if (dt.equal(py::dtype::of<float>())) return Storage::f32;
  if (dt.equal(py::dtype::of<double>())) return Storage::f64;
  if (dt.equal(float16_dtype())) return Storage::f16;
  if (dt.kind() == 'V' && dt.itemsize() == 2 && dt.equal(bfloat16_dtype())) return Storage::bf16;
  if (dt.equal(py::dtype::of<int8_t>())) return Storage::i8;
  return Storage::unsupported;
}
Storage storage_of(const py::array& a) { return storage_of(a.dtype()); }

template <class S>
constexpr Storage storage_tag() {
  if constexpr (std::is_same<S, double>::value) return Storage::f64;
  if constexpr (std::is_same<S, float>::value) return Storage::f32;
  if constexpr (std::is_same<S, attnfast::float16_bits>::value) return Storage::f16;
  if constexpr (std::is_same<S, int8_t>::value) return Storage::i8;
  return Storage::bf16;
}

template <class S, class T>
struct Types {
  using Stored = S;
  using Compute = T;
};

// Calls f(Types<S, T>{}) for the storage type of `a` and its compute type (double for double, float for
// the others). The Python layer only passes the dtypes the contract allows; anything else is an
// internal error, reported as such. int8 (a quantised KV cache) only where kInt8 is set: the fused
// attention.
template <bool kInt8 = false, class F>
void with_storage(const py::array& a, const char* name, F&& f) {
  switch (storage_of(a)) {
    case Storage::f64: return f(Types<double, double>{});
    case Storage::f32: return f(Types<float, float>{});
    case Storage::f16: return f(Types<attnfast::float16_bits, float>{});
    case Storage::bf16: return f(Types<attnfast::bfloat16_bits, float>{});
    case Storage::i8:
      if constexpr (kInt8) return f(Types<int8_t, float>{});
      break;
    case Storage::unsupported: break;
  }
  throw py::type_error(std::string(name) + ": internal dtype mismatch (unsupported storage type " +
                       std::string(py::str(a.dtype())) + ")");
}

template <class T>
void require_dtype(const py::array& a, const char* name) {
  if (storage_of(a) != storage_tag<T>()) throw py::type_error(std::string(name) + ": internal dtype mismatch");
}

void check_status(int status) {
  if (status != 0) throw std::bad_alloc();
}

const attnfast::TargetKernels& kernels() { return attnfast::active_kernels(); }

// Calls one kernel on a filled params struct without the GIL (gil.h); a failed scratch allocation
// becomes MemoryError. A table entry the target does not provide is an internal error.
template <class Kernel, class Params>
void run_kernel(Kernel kernel, const Params& p) {
  if (!kernel) throw py::type_error("internal dtype mismatch: no kernel for this storage type");
  check_status(attnfast::bindings::call_without_gil([&] { return kernel(p); }));
}

// A result operand in the storage type S or the compute type T: fills `stored` or `wide`.
template <class S, class T>
void set_result(Layouts& L, py::array& out, const Shape& batch, const char* name, bool need_unit_columns,
                Operand<S>* stored, Operand<T>* wide) {
  if (storage_of(out) == storage_tag<S>()) {
    *stored = L.make<S>(out, batch, 2, name, need_unit_columns);
  } else if (storage_of(out) == storage_tag<T>()) {
    *wide = L.make<T>(out, batch, 2, name, need_unit_columns);
  } else {
    throw py::type_error(std::string(name) + ": internal dtype mismatch");
  }
}

template <class S, class T>
void run_scores_dot(const py::array& q, const py::array& k, py::array& out, const Shape& batch, double scale) {
  if (out.size() == 0) return;  // nothing to compute: no per-item offset tables for a huge empty batch
  require_dtype<S>(k, "k");
  Layouts L;
  attnfast::ScoresDotParams<S, T> p;
  p.q = L.make<const S>(q, batch, 2, "q", true);
  p.k = L.make<const S>(k, batch, 2, "k", true);
  set_result(L, out, batch, "out", true, &p.out, &p.out_wide);
  p.batch = attnfast::bindings::checked_product(batch, "batch");
  p.lq = q.shape(q.ndim() - 2);
  p.lk = k.shape(k.ndim() - 2);
  p.depth = q.shape(q.ndim() - 1);
  p.scale = static_cast<T>(scale);
  p.num_threads = attnfast::get_num_threads();
  run_kernel(attnfast::table_for<S, T>(kernels()).scores_dot, p);
}

template <class T>
void run_scores_additive(const py::array& qp, const py::array& kp, const py::array& v_a, py::array& out,
                         const Shape& batch, double scale) {
  if (out.size() == 0) return;
  require_dtype<T>(kp, "kp");
  require_dtype<T>(v_a, "v_a");
  require_dtype<T>(out, "out");
  Layouts L;
  attnfast::ScoresAdditiveParams<T> p;
  p.qp = L.make<const T>(qp, batch, 2, "qp", true);
  p.kp = L.make<const T>(kp, batch, 2, "kp", true);
  p.out = L.make<T>(out, batch, 2, "out", true);
  if (v_a.ndim() != 1 || (v_a.shape(0) > 1 && v_a.strides(0) != static_cast<py::ssize_t>(sizeof(T))))
    throw std::invalid_argument("v_a must be a contiguous vector");
  p.v_a = static_cast<const T*>(v_a.data());
  p.batch = attnfast::bindings::checked_product(batch, "batch");
  p.lq = qp.shape(qp.ndim() - 2);
  p.lk = kp.shape(kp.ndim() - 2);
  p.hidden = qp.shape(qp.ndim() - 1);
  p.scale = static_cast<T>(scale);
  p.num_threads = attnfast::get_num_threads();
  run_kernel(attnfast::table_for<T, T>(kernels()).scores_additive, p);
}

template <class S, class T>
void run_softmax(const py::array& x, const py::object& mask, py::array& out) {
  if (out.size() == 0) return;
  Layouts L;
  Shape batch(x.shape(), x.shape() + x.ndim() - 2);
  attnfast::SoftmaxParams<S, T> p;
  p.x = L.make<const S>(x, batch, 2, "x", false);
  set_result(L, out, batch, "out", false, &p.out, &p.out_wide);
  if (!mask.is_none()) p.mask = L.make<const uint8_t>(py::cast<py::array>(mask), batch, 2, "mask", false);
  p.batch = attnfast::bindings::checked_product(batch, "batch");
  p.rows = x.shape(x.ndim() - 2);
  p.n = x.shape(x.ndim() - 1);
  p.num_threads = attnfast::get_num_threads();
  run_kernel(attnfast::table_for<S, T>(kernels()).softmax, p);
}

template <class S, class T>
void run_aggregate(const py::array& w, const py::array& v, py::array& out, const Shape& batch) {
  if (out.size() == 0) return;
  require_dtype<S>(v, "v");
  Layouts L;
  attnfast::AggregateParams<S, T> p;
  p.weights = L.make<const S>(w, batch, 2, "weights", true);
  p.v = L.make<const S>(v, batch, 2, "v", true);
  set_result(L, out, batch, "out", true, &p.out, &p.out_wide);
  p.batch = attnfast::bindings::checked_product(batch, "batch");
  p.lq = w.shape(w.ndim() - 2);
  p.lk = w.shape(w.ndim() - 1);
  p.dv = v.shape(v.ndim() - 1);
  p.num_threads = attnfast::get_num_threads();
  run_kernel(attnfast::table_for<S, T>(kernels()).aggregate, p);
}

struct AttentionCall {
  Shape batch, kv_batch;
  int64_t group;
  double scale;
  bool causal;
  int64_t diagonal_offset, window_left, window_right;
};

// What serving calls add to a call (attnfast/params.h): per-item diagonals, query lengths, the score
// modifiers; and, for the forward only, a paged or int8 KV cache and the row offsets of packed
// variable-length sequences. None (0 for softcap) leaves the call as it was. The arrays the kernel
// reads are kept alive in `keep` for the call.
struct ServingArgs {
  py::object diagonal_offsets = py::none(), q_lengths = py::none();  // int64, one per batch item
  py::object alibi_slopes = py::none(), sinks = py::none();          // compute type, one per batch item
  double softcap = 0;
  // Forward only. block_table: int32 (B, pages per item), C-contiguous, with k and v the caches
  // (pages, Hk, rows per page, D / Dv) and kv_batch (B, Hk). k_scale / v_scale: float32 of k's / v's
  // shape without the last axis (any strides, 0 to broadcast). q_starts (per batch item) / kv_starts
  // (per kv item): rows added to the item's q / out / lse and k / v offsets; lse_offsets replaces the
  // lse's b * lq offsets.
  py::object block_table = py::none(), k_scale = py::none(), v_scale = py::none();
  py::object q_starts = py::none(), kv_starts = py::none(), lse_offsets = py::none();
  // Packed sequences: the longest sequence's query rows and keys (-1: q's and k's row counts).
  int64_t lq = -1, lk = -1;
};

// The ServingArgs the forward and the backward share (the first group), as the bindings receive them.
ServingArgs score_rule_args(const py::object& diagonal_offsets, const py::object& q_lengths, double softcap,
                            const py::object& alibi_slopes, const py::object& sinks) {
  ServingArgs serving;
  serving.diagonal_offsets = diagonal_offsets;
  serving.q_lengths = q_lengths;
  serving.softcap = softcap;
  serving.alibi_slopes = alibi_slopes;
  serving.sinks = sinks;
  return serving;
}

// A C-contiguous vector of `n` elements of type E, kept alive in `keep`; null for None.
template <class E>
const E* per_item(const py::object& x, int64_t n, const char* name, std::vector<py::array>& keep) {
  if (x.is_none()) return nullptr;
  py::array a = py::cast<py::array>(x);
  if (!a.dtype().equal(py::dtype::of<E>()) || !(a.flags() & py::array::c_style) || a.size() != n)
    throw std::invalid_argument(std::string(name) + ": internal mismatch (a contiguous vector, one entry per item)");
  keep.push_back(a);
  return static_cast<const E*>(a.data());
}

// What the forward and the backward share of a call besides the operands: the scale, causal / window,
// the bool mask, the bias, kv_lengths (`lengths` keeps kv_lengths' int64 array alive for the call) and
// the serving additions (ServingArgs' first group).
template <class S, class T>
void set_score_rule(Layouts& L, const AttentionCall& c, const py::object& mask, const py::object& bias,
                    const py::object& kv_lengths, attnfast::AttentionParams<S, T>& p, py::array_t<int64_t>& lengths,
                    const ServingArgs& serving, std::vector<py::array>& keep) {
  p.scale = static_cast<T>(c.scale);
  p.causal = c.causal;
  p.diagonal_offset = c.diagonal_offset;
  p.window_left = c.window_left;
  p.window_right = c.window_right;
  p.diagonal_offsets = per_item<int64_t>(serving.diagonal_offsets, p.batch, "diagonal_offsets", keep);
  p.q_lengths = per_item<int64_t>(serving.q_lengths, p.batch, "q_lengths", keep);
  p.alibi_slopes = per_item<T>(serving.alibi_slopes, p.batch, "alibi_slopes", keep);
  p.sinks = per_item<T>(serving.sinks, p.batch, "sinks", keep);
  p.softcap = static_cast<T>(serving.softcap);
  if (!mask.is_none()) p.mask = L.make<const uint8_t>(py::cast<py::array>(mask), c.batch, 2, "mask", false);
  if (!bias.is_none()) {
    require_dtype<T>(py::cast<py::array>(bias), "bias");
    p.bias = L.make<const T>(py::cast<py::array>(bias), c.batch, 2, "bias", false);
  }
  if (!kv_lengths.is_none()) {
    lengths = py::cast<py::array_t<int64_t, py::array::c_style>>(kv_lengths);
    if (lengths.size() != p.batch) throw std::invalid_argument("kv_lengths: one entry per batch item expected");
    p.kv_lengths = lengths.data();
  }
}

// Elements between consecutive entries along `axis` (0 for an axis never stepped along).
int64_t axis_stride(const py::array& a, int axis, const char* name) {
  if (a.shape(axis) <= 1) return 0;
  const int64_t bytes = static_cast<int64_t>(a.strides(axis));
  if (bytes % static_cast<int64_t>(a.itemsize()) != 0)
    throw std::invalid_argument(std::string(name) + ": stride is not a multiple of the item size");
  return bytes / static_cast<int64_t>(a.itemsize());
}

// K, V or a scale of a paged cache: `cache` is (pages, Hk, rows per page) + (features,) when
// `feature_rows`, the kv items are (B, Hk) in C order, and item (b, h) reads pages table[b, :].
template <class E>
Operand<E> paged_operand(Layouts& L, const py::array& cache, const py::array& table, int64_t heads,
                         bool feature_rows, const char* name) {
  if (cache.ndim() != (feature_rows ? 4 : 3) || cache.shape(1) != heads)
    throw std::invalid_argument(std::string(name) + ": internal shape mismatch (a paged cache (pages, Hk, page rows" +
                                (feature_rows ? ", features)" : ")") + " expected)");
  if (feature_rows && cache.shape(3) > 1 && axis_stride(cache, 3, name) != 1)
    throw std::invalid_argument(std::string(name) + ": last axis must have unit stride");
  const int64_t items_b = table.shape(0), pages_per_item = table.shape(1), head_stride = axis_stride(cache, 1, name);
  OperandLayout layout;
  layout.row_stride = axis_stride(cache, 2, name);
  layout.col_stride = 1;
  std::vector<int64_t>& item_offset = L.table(static_cast<size_t>(items_b * heads));
  for (int64_t b = 0; b < items_b; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      layout.batch_offsets.push_back(h * head_stride);
      item_offset[static_cast<size_t>(b * heads + h)] = b * pages_per_item;
    }
  L.items.push_back(std::move(layout));
  Operand<E> op;
  op.data = static_cast<E*>(const_cast<void*>(cache.data()));
  op.batch_offset_elements = L.items.back().batch_offsets.data();
  op.row_stride_elements = L.items.back().row_stride;
  op.pages.table = static_cast<const int32_t*>(table.data());
  op.pages.item_offset = item_offset.data();
  op.pages.rows_per_page = cache.shape(2);
  op.pages.page_stride_elements = axis_stride(cache, 0, name);
  return op;
}

// A per-row scale of int8 K or V: kv_batch + (lk,) (any strides), or paged like its cache.
Operand<const float> scale_operand(Layouts& L, const py::object& scale, const Shape& kv_batch,
                                   const py::object& block_table, int64_t heads, const char* name) {
  const py::array a = py::cast<py::array>(scale);
  require_dtype<float>(a, name);
  if (!block_table.is_none()) return paged_operand<const float>(L, a, py::cast<py::array>(block_table), heads, false, name);
  Operand<const float> op = L.make<const float>(a, kv_batch, 1, name, false);
  op.row_stride_elements = op.col_stride_elements;  // one scale per row: rows step along the last axis
  op.col_stride_elements = 1;
  return op;
}

// Moves item b of `op` down by starts[b] rows (a packed variable-length sequence's first row).
template <class E>
void shift_rows(Layouts& L, Operand<E>& op, const int64_t* starts, int64_t items) {
  if (!starts || !op.data) return;
  std::vector<int64_t>& offsets = L.table(static_cast<size_t>(items));
  for (int64_t b = 0; b < items; ++b)
    offsets[static_cast<size_t>(b)] = op.batch_offset_elements[b] + starts[b] * op.row_stride_elements;
  op.batch_offset_elements = offsets.data();
}

template <class S, class T>
void run_attention(const py::array& q, const py::array& k, const py::array& v, py::array& out,
                   const AttentionCall& c, const py::object& mask, const py::object& bias,
                   const py::object& kv_lengths, const py::object& lse, const py::object& weights,
                   const py::object& v_a, const ServingArgs& serving = ServingArgs()) {
  // Only the outputs asked for cost anything: with no output element (Lq = 0, an empty batch, or Dv = 0
  // without lse and weights) there is nothing to compute, and no per-item offset table to build.
  const bool no_lse = lse.is_none() || py::cast<py::array>(lse).size() == 0;
  const bool no_weights = weights.is_none() || py::cast<py::array>(weights).size() == 0;
  if (out.size() == 0 && no_lse && no_weights) return;
  require_dtype<S>(k, "k");
  require_dtype<S>(v, "v");
  Layouts L;
  attnfast::AttentionParams<S, T> p;
  if (storage_of(q) == storage_tag<S>()) {
    p.q = L.make<const S>(q, c.batch, 2, "q", true);
  } else {
    require_dtype<T>(q, "q");
    p.q_wide = L.make<const T>(q, c.batch, 2, "q", true);
  }
  const int64_t kv_items = attnfast::bindings::checked_product(c.kv_batch, "kv_batch");
  const int64_t heads = c.kv_batch.empty() ? 1 : c.kv_batch.back();
  if (!serving.block_table.is_none()) {
    const py::array table = py::cast<py::array>(serving.block_table);
    if (!table.dtype().equal(py::dtype::of<int32_t>()) || table.ndim() != 2 || !(table.flags() & py::array::c_style) ||
        c.kv_batch.size() != 2 || c.kv_batch[0] != table.shape(0))
      throw std::invalid_argument("block_table: internal mismatch (C-contiguous int32 (B, pages), kv_batch (B, Hk))");
    p.k = paged_operand<const S>(L, k, table, heads, true, "k");
    p.v = paged_operand<const S>(L, v, table, heads, true, "v");
    p.lk = table.shape(1) * k.shape(2);
  } else {
    p.k = L.make<const S>(k, c.kv_batch, 2, "k", true);
    p.v = L.make<const S>(v, c.kv_batch, 2, "v", true);
    p.lk = k.shape(k.ndim() - 2);
  }
  if (std::is_same<S, int8_t>::value != !serving.k_scale.is_none() ||
      serving.k_scale.is_none() != serving.v_scale.is_none())
    throw std::invalid_argument("k_scale, v_scale: internal mismatch (given exactly for int8 K and V)");
  if (!serving.k_scale.is_none()) {
    p.k_scale = scale_operand(L, serving.k_scale, c.kv_batch, serving.block_table, heads, "k_scale");
    p.v_scale = scale_operand(L, serving.v_scale, c.kv_batch, serving.block_table, heads, "v_scale");
  }
  set_result(L, out, c.batch, "out", true, &p.out, &p.out_wide);
  p.batch = attnfast::bindings::checked_product(c.batch, "batch");
  p.group = c.group;
  p.lq = q.shape(q.ndim() - 2);
  if (serving.lq >= 0) p.lq = serving.lq;
  if (serving.lk >= 0) p.lk = serving.lk;
  p.depth = q.shape(q.ndim() - 1);
  p.dv = v.shape(v.ndim() - 1);
  std::vector<py::array> keep;
  const int64_t* q_starts = per_item<int64_t>(serving.q_starts, p.batch, "q_starts", keep);
  const int64_t* kv_starts = per_item<int64_t>(serving.kv_starts, kv_items, "kv_starts", keep);
  if ((q_starts || kv_starts) && !weights.is_none())
    throw std::invalid_argument("q_starts, kv_starts: internal mismatch (packed sequences return no weights)");
  shift_rows(L, p.q, q_starts, p.batch);
  shift_rows(L, p.q_wide, q_starts, p.batch);
  shift_rows(L, p.out, q_starts, p.batch);
  shift_rows(L, p.out_wide, q_starts, p.batch);
  shift_rows(L, p.k, kv_starts, kv_items);
  shift_rows(L, p.v, kv_starts, kv_items);
  py::array_t<int64_t> lengths;
  set_score_rule(L, c, mask, bias, kv_lengths, p, lengths, serving, keep);
  std::vector<int64_t> lse_offsets;
  if (!lse.is_none()) {
    py::array lse_arr = py::cast<py::array>(lse);
    require_dtype<T>(lse_arr, "lse");
    if (!(lse_arr.flags() & py::array::c_style)) throw std::invalid_argument("lse must be C-contiguous");
    p.lse = static_cast<T*>(lse_arr.mutable_data());
    p.lse_batch_offset_elements = per_item<int64_t>(serving.lse_offsets, p.batch, "lse_offsets", keep);
    if (!p.lse_batch_offset_elements) {
      lse_offsets.resize(static_cast<size_t>(p.batch));
      for (int64_t b = 0; b < p.batch; ++b) lse_offsets[static_cast<size_t>(b)] = b * p.lq;
      p.lse_batch_offset_elements = lse_offsets.data();
    }
  }
  if (!weights.is_none()) {
    require_dtype<T>(py::cast<py::array>(weights), "weights");
    p.weights = L.make<T>(py::cast<py::array>(weights), c.batch, 2, "weights", true);
  }
  py::array v_a_arr;
  if (!v_a.is_none()) {
    v_a_arr = py::cast<py::array>(v_a);
    require_dtype<T>(v_a_arr, "v_a");
    if (v_a_arr.ndim() != 1 || v_a_arr.shape(0) != p.depth || !(v_a_arr.flags() & py::array::c_style))
      throw std::invalid_argument("v_a must be a contiguous vector of the projected feature size");
    p.v_a = static_cast<const T*>(v_a_arr.data());
  }
  p.num_threads = attnfast::get_num_threads();
  run_kernel(attnfast::table_for<S, T>(kernels()).attention, p);
}

// ---- The backward pass ----------------------------------------------------------------------------
// A gradient the kernel writes: dtype T, C-contiguous, writeable, exactly `shape`. The Python layer
// allocates these itself; anything else is an internal error.
template <class T>
Operand<T> gradient_operand(Layouts& L, const py::array& a, const Shape& batch, const Shape& core, const char* name) {
  require_dtype<T>(a, name);
  Shape expected = batch;
  expected.insert(expected.end(), core.begin(), core.end());
  bool same = a.ndim() == static_cast<py::ssize_t>(expected.size());
  for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == expected[static_cast<size_t>(i)];
  if (!same) throw std::invalid_argument(std::string(name) + ": internal shape mismatch");
  if (!(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument(std::string(name) + ": must be a writeable C-contiguous array");
  return L.make<T>(a, batch, static_cast<int>(core.size()), name, true);
}

// An operand read in the storage type S or in T (q, out, dout): fills `stored` or `wide`.
template <class S, class T>
void set_input(Layouts& L, const py::array& a, const Shape& batch, const char* name, Operand<const S>* stored,
               Operand<const T>* wide) {
  if (storage_of(a) == storage_tag<S>()) {
    *stored = L.make<const S>(a, batch, 2, name, true);
  } else {
    require_dtype<T>(a, name);
    *wide = L.make<const T>(a, batch, 2, name, true);
  }
}

struct BackwardOutputs {
  py::array dq, dk, dv;
  py::object dscores, dv_a;
};

template <class S, class T>
void run_attention_backward(const py::array& q, const py::array& k, const py::array& v, const py::array& out,
                            const py::array& dout, const py::array& lse, const BackwardOutputs& g,
                            const AttentionCall& c, const py::object& mask, const py::object& bias,
                            const py::object& kv_lengths, const py::object& v_a, const ServingArgs& serving) {
  require_dtype<S>(k, "k");
  require_dtype<S>(v, "v");
  const py::ssize_t nd = q.ndim();
  if (nd < 2 || k.ndim() < 2 || v.ndim() < 2 || out.ndim() < 2 || dout.ndim() < 2)
    throw std::invalid_argument("attention_backward: internal shape mismatch (operands need 2 core axes)");
  const int64_t lq = q.shape(nd - 2), depth = q.shape(nd - 1);
  const int64_t lk = k.shape(k.ndim() - 2), dv = v.shape(v.ndim() - 1);
  if (k.shape(k.ndim() - 1) != depth || v.shape(v.ndim() - 2) != lk || out.shape(out.ndim() - 2) != lq ||
      out.shape(out.ndim() - 1) != dv || dout.shape(dout.ndim() - 2) != lq || dout.shape(dout.ndim() - 1) != dv)
    throw std::invalid_argument("attention_backward: internal shape mismatch (q, k, v, out, dout)");
  Layouts L;
  attnfast::AttentionBackwardParams<S, T> bp;
  attnfast::AttentionParams<S, T>& p = bp.forward;
  bp.dq = gradient_operand<T>(L, g.dq, c.batch, {lq, depth}, "dq");
  bp.dk = gradient_operand<T>(L, g.dk, c.kv_batch, {lk, depth}, "dk");
  bp.dv = gradient_operand<T>(L, g.dv, c.kv_batch, {lk, dv}, "dv");
  if (!g.dscores.is_none())
    bp.dscores = gradient_operand<T>(L, py::cast<py::array>(g.dscores), c.batch, {lq, lk}, "dscores");
  const bool no_scores = g.dscores.is_none() || py::cast<py::array>(g.dscores).size() == 0;
  // dv_a sums over every (query, key) pair: with none (an empty batch) it is still written, as zeros.
  const bool no_dv_a = g.dv_a.is_none() || py::cast<py::array>(g.dv_a).size() == 0;
  if (g.dq.size() == 0 && g.dk.size() == 0 && g.dv.size() == 0 && no_scores && no_dv_a) return;  // nothing to write
  p.batch = attnfast::bindings::checked_product(c.batch, "batch");
  const int64_t kv_items = attnfast::bindings::checked_product(c.kv_batch, "kv_batch");
  if (c.group < 1 || kv_items * c.group != p.batch)
    throw std::invalid_argument("attention_backward: internal shape mismatch (batch != kv_batch x group)");
  set_input<S, T>(L, q, c.batch, "q", &p.q, &p.q_wide);
  p.k = L.make<const S>(k, c.kv_batch, 2, "k", true);
  p.v = L.make<const S>(v, c.kv_batch, 2, "v", true);
  // The forward's result is read only: its Operand is a mutable one by type.
  Operand<const S> out_stored;
  Operand<const T> out_wide;
  set_input<S, T>(L, out, c.batch, "out", &out_stored, &out_wide);
  p.out = {const_cast<S*>(out_stored.data), out_stored.batch_offset_elements, out_stored.row_stride_elements, 1};
  p.out_wide = {const_cast<T*>(out_wide.data), out_wide.batch_offset_elements, out_wide.row_stride_elements, 1};
  set_input<S, T>(L, dout, c.batch, "dout", &bp.dout, &bp.dout_wide);
  p.group = c.group;
  p.lq = lq;
  p.lk = lk;
  p.depth = depth;
  p.dv = dv;
  py::array_t<int64_t> lengths;
  std::vector<py::array> keep;
  set_score_rule(L, c, mask, bias, kv_lengths, p, lengths, serving, keep);
  require_dtype<T>(lse, "lse");
  if (!(lse.flags() & py::array::c_style) || lse.size() != p.batch * lq)
    throw std::invalid_argument("lse: internal shape mismatch (a C-contiguous batch + (lq,) array expected)");
  p.lse = static_cast<T*>(const_cast<void*>(lse.data()));
  std::vector<int64_t> lse_offsets(static_cast<size_t>(p.batch));
  for (int64_t b = 0; b < p.batch; ++b) lse_offsets[static_cast<size_t>(b)] = b * lq;
  p.lse_batch_offset_elements = lse_offsets.data();
  py::array v_a_arr, dv_a_arr;
  if (v_a.is_none() != g.dv_a.is_none())
    throw std::invalid_argument("dv_a: internal mismatch (given exactly when v_a is: additive scores)");
  if (!v_a.is_none()) {
    v_a_arr = py::cast<py::array>(v_a);
    dv_a_arr = py::cast<py::array>(g.dv_a);
    require_dtype<T>(v_a_arr, "v_a");
    require_dtype<T>(dv_a_arr, "dv_a");
    if (v_a_arr.ndim() != 1 || v_a_arr.shape(0) != depth || !(v_a_arr.flags() & py::array::c_style))
      throw std::invalid_argument("v_a must be a contiguous vector of the projected feature size");
    if (dv_a_arr.ndim() != 1 || dv_a_arr.shape(0) != depth || !(dv_a_arr.flags() & py::array::c_style) ||
        !dv_a_arr.writeable())
      throw std::invalid_argument("dv_a must be a writeable contiguous vector of the projected feature size");
    p.v_a = static_cast<const T*>(v_a_arr.data());
    bp.dv_a = static_cast<T*>(dv_a_arr.mutable_data());
  }
  p.num_threads = attnfast::get_num_threads();
  const auto kernel = attnfast::table_for<S, T>(kernels()).attention_backward;
  if (!kernel) throw py::type_error("internal dtype mismatch: no backward kernel for this storage type");
  const int status = attnfast::bindings::call_without_gil([&] { return kernel(bp); });
  if (status == attnfast::kNoBackwardKernel)
    throw py::type_error("attention_backward: internal dtype mismatch (additive scores (v_a) take float32 or "
                         "float64 projections; attnfast.attention_backward converts them)");
  check_status(status);
}

// ---- The plain-call fast path -------------------------------------------------------------------
// A decoder step is a short call, and the Python validation layer costs several percent of it. The most
// common call -- three same-dtype float ndarrays (or float32 queries over a 16-bit cache) with one batch
// shape, aligned unit-stride rows, dot-product scores, no mask, lse or weights, and no out= or a
// C-contiguous one of the result's shape and dtype that overlaps no input -- is recognised here with a
// few type and shape tests, for which
// the general validation could not fail and would produce exactly these kernel arguments. Any other
// call returns None and python/attnfast/_api.py takes the general path, which also raises every error.

bool is_exact_ndarray(py::handle h) {
  static PyTypeObject* const ndarray = reinterpret_cast<PyTypeObject*>(
      py::object(py::module_::import("numpy").attr("ndarray")).release().ptr());  // kept for the process' life
  return Py_TYPE(h.ptr()) == ndarray;
}

// Byte range [lo, hi) an array's elements occupy; empty for an array with no element. The same bounds
// test as np.may_share_memory's default.
std::pair<intptr_t, intptr_t> byte_extent(const py::array& a) {
  intptr_t lo = reinterpret_cast<intptr_t>(a.data()), hi = lo;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    const intptr_t n = a.shape(i), s = a.strides(i);
    if (n == 0) return {0, 0};
    (s > 0 ? hi : lo) += s * (n - 1);
  }
  return {lo, hi + a.itemsize()};
}

bool overlaps(const py::array& a, const py::array& b) {
  const auto x = byte_extent(a), y = byte_extent(b);
  return x.first < x.second && y.first < y.second && x.first < y.second && y.first < x.second;
}

bool has_aligned_unit_rows(const py::array& a) {
  constexpr int kAligned = 0x0100;  // NPY_ARRAY_ALIGNED
  const py::ssize_t last = a.ndim() - 1;
  return (a.flags() & kAligned) && (a.shape(last) <= 1 || a.strides(last) == a.itemsize());
}

bool is_one_of(py::handle s, const char* a, const char* b) {
  return PyUnicode_CheckExact(s.ptr()) &&
         (PyUnicode_CompareWithASCIIString(s.ptr(), a) == 0 || PyUnicode_CompareWithASCIIString(s.ptr(), b) == 0);
}

// True when NumPy can make an array of this shape: (product of the nonzero extents) x itemsize fits
// its intp, as NumPy counts (an empty shape with huge other extents is refused too).
bool fits_one_array(const Shape& shape, int64_t itemsize) {
  int64_t bytes = itemsize;
  for (const int64_t n : shape) {
    if (n <= 1) continue;
    if (bytes > std::numeric_limits<int64_t>::max() / n) return false;
    bytes *= n;
  }
  return true;
}

template <class S, class T>
py::object run_plain_attention(const py::array& q, const py::array& k, const py::array& v, py::handle out,
                               double scale, bool causal, bool bottom_right) {
  const py::ssize_t nd = q.ndim();
  Shape result_shape(q.shape(), q.shape() + nd);
  result_shape.back() = v.shape(nd - 1);
  py::array result;
  if (out.is_none()) {
    // A result NumPy cannot make is the Python path's error to raise, with the shapes that caused it.
    if (!fits_one_array(result_shape, q.itemsize())) return py::none();
    result = py::array(q.dtype(), result_shape);
  } else {
    if (!is_exact_ndarray(out)) return py::none();
    result = py::reinterpret_borrow<py::array>(out);
    constexpr int kWriteableContiguousAligned = 0x0400 | 0x0001 | 0x0100;  // NPY_ARRAY_{WRITEABLE,C_CONTIGUOUS,ALIGNED}
    if (result.ndim() != nd || !result.dtype().is(q.dtype()) ||
        (result.flags() & kWriteableContiguousAligned) != kWriteableContiguousAligned)
      return py::none();
    for (py::ssize_t i = 0; i < nd; ++i)
      if (result.shape(i) != result_shape[static_cast<size_t>(i)]) return py::none();
    // The kernel writes out while it still reads q, k and v: an overlapping out= takes the Python
    // path, which computes into a temporary first (as NumPy's ufuncs do).
    if (overlaps(result, q) || overlaps(result, k) || overlaps(result, v)) return py::none();
  }
  if (result.size() == 0) return std::move(result);  // Lq = 0 or Dv = 0 or an empty batch: O(1)
  const Shape batch(q.shape(), q.shape() + nd - 2);
  const int64_t lq = q.shape(nd - 2), lk = k.shape(nd - 2);
  const AttentionCall c{batch, batch, 1, scale, causal, bottom_right ? lk - lq : 0, -1, -1};
  run_attention<S, T>(q, k, v, result, c, py::none(), py::none(), py::none(), py::none(), py::none(), py::none());
  return std::move(result);
}

py::object plain_attention(py::handle qh, py::handle kh, py::handle vh, py::handle out, py::handle method,
                           py::handle scale, py::handle causal, py::handle causal_align) {
  if (!is_exact_ndarray(qh) || !is_exact_ndarray(kh) || !is_exact_ndarray(vh)) return py::none();
  const auto q = py::reinterpret_borrow<py::array>(qh), k = py::reinterpret_borrow<py::array>(kh),
             v = py::reinterpret_borrow<py::array>(vh);
  // k and v of one storage type; q of that type, or float32 over a 16-bit cache (the result then has
  // q's dtype in both cases: NumPy's promotion).
  const Storage storage = storage_of(k);
  if (storage == Storage::unsupported || storage == Storage::i8 || !v.dtype().is(k.dtype())) return py::none();
  const bool sixteen_bit = storage == Storage::f16 || storage == Storage::bf16;
  if (!q.dtype().is(k.dtype()) && !(sixteen_bit && storage_of(q) == Storage::f32)) return py::none();
  const bool f32 = storage != Storage::f64;  // computed in float32
  const py::ssize_t nd = q.ndim();
  if (nd < 2 || k.ndim() != nd || v.ndim() != nd) return py::none();
  for (py::ssize_t i = 0; i < nd - 2; ++i)
    if (k.shape(i) != q.shape(i) || v.shape(i) != q.shape(i)) return py::none();
  if (k.shape(nd - 2) != v.shape(nd - 2) || k.shape(nd - 1) != q.shape(nd - 1)) return py::none();
  if (!has_aligned_unit_rows(q) || !has_aligned_unit_rows(k) || !has_aligned_unit_rows(v)) return py::none();
  if (!is_one_of(method, "scaled_dot", "dot") || !is_one_of(causal_align, "top_left", "bottom_right"))
    return py::none();
  if (causal.ptr() != Py_True && causal.ptr() != Py_False) return py::none();
  double c;
  if (scale.is_none()) {
    // As _inputs._check_scale: 1/sqrt(D) for scaled_dot (any finite value when D == 0), 1 for dot.
    const int64_t d = q.shape(nd - 1);
    c = PyUnicode_CompareWithASCIIString(method.ptr(), "scaled_dot") == 0 && d > 0 ? 1.0 / std::sqrt(double(d)) : 1.0;
  } else {
    if (!PyFloat_CheckExact(scale.ptr())) return py::none();
    c = PyFloat_AS_DOUBLE(scale.ptr());
    // A scale that is not finite, or not in float32 for float32 inputs, is the Python path's error to raise.
    if (!std::isfinite(c) || (f32 && std::fabs(c) > std::numeric_limits<float>::max())) return py::none();
  }
  const bool is_causal = causal.ptr() == Py_True;
  const bool bottom_right = PyUnicode_CompareWithASCIIString(causal_align.ptr(), "bottom_right") == 0;
  py::object result;
  with_storage(k, "k", [&](auto types) {
    using Ty = decltype(types);
    result = run_plain_attention<typename Ty::Stored, typename Ty::Compute>(q, k, v, out, c, is_causal, bottom_right);
  });
  return result;
}

template <class Seconds>
double time_seconds(Seconds&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

PYBIND11_MODULE(_attnfast, m) {
  m.doc() = "attnfast compiled core (private: use the attnfast package)";
  m.attr("__version__") = ATTNFAST_VERSION;
  m.attr("compiler") = ATTNFAST_COMPILER;
  py::module_::import("atexit").attr("register")(py::cpp_function(&attnfast::bindings::close_exit_gate));
  // First uses that run Python code or release the GIL happen here, on the importing thread: pybind11's
  // NumPy API table (set up with the GIL released and retaken in a destructor) and the dtype and type
  // lookups (Python calls). Left to a kernel call's first use, one could run in a daemon thread while
  // the interpreter exits, where retaking the GIL ends the thread with pthread_exit: its forced
  // unwinding out of that destructor aborts the process ("terminate called without an active
  // exception"), which the exit gate (gil.h) cannot prevent, being for the GIL around kernels only.
  (void)py::dtype::of<float>();
  (void)float16_dtype();
  (void)bfloat16_dtype();
  (void)is_exact_ndarray(py::none());
  (void)attnfast::default_num_threads();  // OMP_NUM_THREADS and the affinity mask, read at import

  m.def("scores_dot", [](const py::array& q, const py::array& k, py::array& out, const Shape& batch, double scale) {
    with_storage(q, "q", [&](auto types) {
      using Ty = decltype(types);
      run_scores_dot<typename Ty::Stored, typename Ty::Compute>(q, k, out, batch, scale);
    });
  });
  m.def("scores_additive", [](const py::array& qp, const py::array& kp, const py::array& v_a, py::array& out,
                              const Shape& batch, double scale) {
    switch (storage_of(qp)) {
      case Storage::f32: return run_scores_additive<float>(qp, kp, v_a, out, batch, scale);
      case Storage::f64: return run_scores_additive<double>(qp, kp, v_a, out, batch, scale);
      default: throw py::type_error("qp: internal dtype mismatch (additive scores take projections in float32 or float64)");
    }
  });
  m.def("softmax", [](const py::array& x, const py::object& mask, py::array& out) {
    with_storage(x, "x", [&](auto types) {
      using Ty = decltype(types);
      run_softmax<typename Ty::Stored, typename Ty::Compute>(x, mask, out);
    });
  });
  m.def("aggregate", [](const py::array& w, const py::array& v, py::array& out, const Shape& batch) {
    with_storage(w, "weights", [&](auto types) {
      using Ty = decltype(types);
      run_aggregate<typename Ty::Stored, typename Ty::Compute>(w, v, out, batch);
    });
  });
  m.def(
      "attention",
      [](const py::array& q, const py::array& k, const py::array& v, py::array& out, const Shape& batch,
         const Shape& kv_batch, int64_t group, double scale, const py::object& mask, const py::object& bias,
         const py::object& kv_lengths, bool causal, int64_t diagonal_offset, int64_t window_left,
         int64_t window_right, const py::object& lse, const py::object& weights, const py::object& v_a,
         const py::object& diagonal_offsets, const py::object& q_lengths, double softcap,
         const py::object& alibi_slopes, const py::object& sinks, const py::object& block_table,
         const py::object& k_scale, const py::object& v_scale, const py::object& q_starts,
         const py::object& kv_starts, const py::object& lse_offsets, int64_t lq, int64_t lk) {
        const AttentionCall c{batch, kv_batch, group, scale, causal, diagonal_offset, window_left, window_right};
        ServingArgs serving = score_rule_args(diagonal_offsets, q_lengths, softcap, alibi_slopes, sinks);
        serving.block_table = block_table;
        serving.k_scale = k_scale;
        serving.v_scale = v_scale;
        serving.q_starts = q_starts;
        serving.kv_starts = kv_starts;
        serving.lse_offsets = lse_offsets;
        serving.lq = lq;
        serving.lk = lk;
        // Keyed by the storage of K and V, which the kernels read in place.
        with_storage<true>(k, "k", [&](auto types) {
          using Ty = decltype(types);
          run_attention<typename Ty::Stored, typename Ty::Compute>(q, k, v, out, c, mask, bias, kv_lengths, lse,
                                                                   weights, v_a, serving);
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("batch"), py::arg("kv_batch"),
      py::arg("group"), py::arg("scale"), py::arg("mask"), py::arg("bias"), py::arg("kv_lengths"),
      py::arg("causal"), py::arg("diagonal_offset"), py::arg("window_left"), py::arg("window_right"),
      py::arg("lse"), py::arg("weights"), py::arg("v_a") = py::none(), py::arg("diagonal_offsets") = py::none(),
      py::arg("q_lengths") = py::none(), py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none(),
      py::arg("sinks") = py::none(), py::arg("block_table") = py::none(), py::arg("k_scale") = py::none(),
      py::arg("v_scale") = py::none(), py::arg("q_starts") = py::none(), py::arg("kv_starts") = py::none(),
      py::arg("lse_offsets") = py::none(), py::arg("lq") = -1, py::arg("lk") = -1);

  m.def(
      "attention_backward",
      [](const py::array& q, const py::array& k, const py::array& v, const py::array& out, const py::array& dout,
         const py::array& lse, const py::array& dq, const py::array& dk, const py::array& dv,
         const py::object& dscores, const py::object& dv_a, const Shape& batch, const Shape& kv_batch,
         int64_t group, double scale, const py::object& mask, const py::object& bias, const py::object& kv_lengths,
         bool causal, int64_t diagonal_offset, int64_t window_left, int64_t window_right, const py::object& v_a,
         const py::object& diagonal_offsets, const py::object& q_lengths, double softcap,
         const py::object& alibi_slopes, const py::object& sinks) {
        const AttentionCall c{batch, kv_batch, group, scale, causal, diagonal_offset, window_left, window_right};
        const BackwardOutputs g{dq, dk, dv, dscores, dv_a};
        const ServingArgs serving = score_rule_args(diagonal_offsets, q_lengths, softcap, alibi_slopes, sinks);
        with_storage(k, "k", [&](auto types) {
          using Ty = decltype(types);
          run_attention_backward<typename Ty::Stored, typename Ty::Compute>(q, k, v, out, dout, lse, g, c, mask,
                                                                            bias, kv_lengths, v_a, serving);
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("dq"),
      py::arg("dk"), py::arg("dv"), py::arg("dscores"), py::arg("dv_a"), py::arg("batch"), py::arg("kv_batch"),
      py::arg("group"), py::arg("scale"), py::arg("mask"), py::arg("bias"), py::arg("kv_lengths"),
      py::arg("causal"), py::arg("diagonal_offset"), py::arg("window_left"), py::arg("window_right"),
      py::arg("v_a") = py::none(), py::arg("diagonal_offsets") = py::none(), py::arg("q_lengths") = py::none(),
      py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none(), py::arg("sinks") = py::none());

  m.def("plain_attention", &plain_attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("method"), py::arg("scale"), py::arg("causal"), py::arg("causal_align"));

  m.def("storage_types", [] { return std::vector<std::string>{"float64", "float32", "float16", "bfloat16"}; });
  m.def("isa", [] { return std::string(attnfast::active_kernels().name); });
  m.def("usable_isas", &attnfast::usable_targets);
  m.def("compiled_isas", &attnfast::compiled_targets);
  m.def("set_isa", &attnfast::set_active_target);
  m.def("isa_problem", &attnfast::target_request_problem);
  m.def("get_num_threads", [] {
    const int threads = attnfast::get_num_threads();
    attnfast::bindings::warn_if_thread_start_failed();
    return threads;
  });
  // Range-checked by attnfast.set_num_threads, the public function.
  m.def("set_num_threads", &attnfast::set_num_threads);
  m.attr("max_threads") = attnfast::kMaxThreads;
  m.def("default_num_threads", &attnfast::default_num_threads);
  m.def("default_threads_source", [] { return std::string(attnfast::default_threads_source()); });
  m.def("default_threads_problem", &attnfast::default_threads_problem);
  m.def("thread_limit", &attnfast::get_thread_limit);

  m.def(
      "probe_fma_peak",
      [](double seconds) {
        // Best of repeated short runs of pure FMA chains on all kernel threads; GFLOP/s (float32).
        const auto fn = attnfast::active_probes().fma_chains;
        const int threads = attnfast::get_num_threads();
        return attnfast::bindings::call_without_gil([&] {
          double best = 0, spent = 0;
          int64_t iterations = 1 << 14;
          while (spent < seconds) {
            double flops = 0;
            const double dt = time_seconds([&] { flops = fn(iterations, threads); });
            spent += dt;
            if (dt < 2e-3) iterations *= 2;
            if (dt > 0 && flops / dt > best) best = flops / dt;
          }
          return best / 1e9;
        });
      },
      py::arg("seconds") = 0.2);
  m.def(
      "probe_read_bandwidth",
      [](int64_t nbytes, double seconds) {
        // Best of repeated vectorised reads of an nbytes buffer on all kernel threads; GB/s.
        const int64_t n = nbytes / 4 > 64 ? nbytes / 4 : 64;
        std::vector<float> buffer(static_cast<size_t>(n), 1.0f);
        const auto fn = attnfast::active_probes().read_sum;
        const int threads = attnfast::get_num_threads();
        return attnfast::bindings::call_without_gil([&] {
          double best = 0, spent = 0;
          volatile float sink = 0;
          while (spent < seconds) {
            const double dt = time_seconds([&] { sink = sink + fn(buffer.data(), n, threads); });
            spent += dt;
            if (dt > 0 && double(n) * 4 / dt > best) best = double(n) * 4 / dt;
          }
          return best / 1e9;
        });
      },
      py::arg("nbytes"), py::arg("seconds") = 0.2);
}
