// Reading K, V and their per-row scales through Operand::pages (a paged KV cache: attnfast/params.h)
// without copying the cache. A paged operand's rows are row_stride_elements apart only within a page
// (Operand::run_rows), so a kernel that steps from one row pointer to the next must restart at every
// page boundary; these helpers cut a range of rows into such runs. An unpaged operand is one run, so
// each helper costs the unpaged path one test per call, never one per row.
// dtypes: any element type E (the storage type of K and V, or float scales). ISA: none (plain C++).
//
// Rule (params.h): a kernel never reads a table entry or a row past the rows it may read (an item's
// kv_lengths); every helper here reads exactly the rows [j, j + n) it is given, and their table entries.
#pragma once
#include <cstdint>
#include <cstring>

#include "attnfast/params.h"
#include "kernels/common.h"

namespace attnfast {
namespace ATTNFAST_TARGET_NS {

// Rows [j, j + n) of kv item b as (first row, rows in the run) pieces, in row order: f(row, t0, count)
// for t0 = 0, then t0 += count, with row the pointer of row j + t0 and rows count apart by the row stride.
template <class E, class F>
inline void for_each_row_run(const Operand<E>& x, int64_t b, int64_t j, int64_t n, const F& f) {
  for (int64_t t0 = 0, count = 0; t0 < n; t0 += count) {
    count = imin(n - t0, x.run_rows(j + t0));
    f(x.row(b, j + t0), t0, count);
  }
}

// True when rows [j, j + n) are one strided run (always, for an unpaged operand).
template <class E>
inline bool rows_in_one_run(const Operand<E>& x, int64_t j, int64_t n) {
  return !x.paged() || x.run_rows(j) >= n;
}

// Rows [j, j + n) of kv item b (`cols` elements each) copied, as stored, into dst at stride cols.
template <class E>
inline void gather_rows(const Operand<const E>& x, int64_t b, int64_t j, int64_t n, int64_t cols, E* dst) {
  for_each_row_run(x, b, j, n, [&](const E* row, int64_t t0, int64_t count) {
    if (x.row_stride_elements == cols) {
      std::memcpy(dst + t0 * cols, row, sizeof(E) * static_cast<size_t>(count * cols));
      return;
    }
    for (int64_t t = 0; t < count; ++t)
      std::memcpy(dst + (t0 + t) * cols, row + t * x.row_stride_elements, sizeof(E) * static_cast<size_t>(cols));
  });
}

// Rows [j, j + n) of kv item b as one strided block: in place when they lie in one run, else gathered
// into `scratch` (n * cols elements; stride cols).
template <class E>
inline const E* rows_in_place_or_gathered(const Operand<const E>& x, int64_t b, int64_t j, int64_t n, int64_t cols,
                                          E* scratch, int64_t* stride) {
  if (rows_in_one_run(x, j, n)) {
    *stride = x.row_stride_elements;
    return x.row(b, j);
  }
  gather_rows(x, b, j, n, cols, scratch);
  *stride = cols;
  return scratch;
}

// MR row pointers for a microkernel's A operand: rows j .. j + rows of kv item b, the last one repeated
// past `rows` (as clamped_rows, microkernel.h, does for a strided block).
template <class E, int MR>
inline void operand_rows(const Operand<const E>& x, int64_t b, int64_t j, int64_t rows, const E** a_rows) {
  if (rows_in_one_run(x, j, rows)) {
    const E* first = x.row(b, j);
    for (int r = 0; r < MR; ++r) a_rows[r] = first + (r < rows ? r : rows - 1) * x.row_stride_elements;
    return;
  }
  for (int r = 0; r < MR; ++r) a_rows[r] = x.row(b, j + (r < rows ? r : rows - 1));
}

// prefetch_rows (common.h) of rows [j, j + n) of kv item b, run by run.
template <class E>
inline void prefetch_operand_rows(const Operand<const E>& x, int64_t b, int64_t j, int64_t n, int64_t cols) {
  if (n <= 0) return;
  if (!x.paged()) {
    prefetch_rows(x.row(b, j), x.row_stride_elements, n, cols);
    return;
  }
  for_each_row_run(x, b, j, n,
                   [&](const E* row, int64_t, int64_t count) { prefetch_rows(row, x.row_stride_elements, count, cols); });
}

}  // namespace ATTNFAST_TARGET_NS
}  // namespace attnfast
