// Turns a NumPy array's shape and strides into the core's Operand: per-batch-item offsets (with
// broadcasting: missing or size-1 batch axes get stride 0), row and column strides, all in elements.
// Pure C++ on plain vectors, so it is unit-testable and free of Python.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace attnfast {
namespace bindings {

struct ArrayLayout {
  std::vector<int64_t> shape;          // full shape
  std::vector<int64_t> strides_bytes;  // full strides
  int64_t itemsize = 0;
};

struct OperandLayout {
  std::vector<int64_t> batch_offsets;  // elements, one per item of the (C-order) batch shape
  int64_t row_stride = 0;              // elements
  int64_t col_stride = 0;              // elements
};

// `core_dims` trailing axes are the matrix (2) or vector (1) part; the rest are batch axes, right-aligned
// against `batch_shape` and broadcast. Throws std::invalid_argument on a layout the caller must not pass
// (non-broadcastable axis, stride not a multiple of the item size).
OperandLayout layout_operand(const ArrayLayout& a, const std::vector<int64_t>& batch_shape, int core_dims,
                             const char* name);

int64_t checked_product(const std::vector<int64_t>& dims, const char* what);

}  // namespace bindings
}  // namespace attnfast
