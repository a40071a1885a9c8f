#include "batch_layout.h"

namespace attnfast {
namespace bindings {

int64_t checked_product(const std::vector<int64_t>& dims, const char* what) {
  int64_t total = 1;
  for (int64_t d : dims) {
    if (d < 0) throw std::invalid_argument(std::string(what) + ": negative dimension");
    if (d != 0 && total > INT64_MAX / d) throw std::overflow_error(std::string(what) + ": size overflows 64 bits");
    total *= d;
  }
  return total;
}

OperandLayout layout_operand(const ArrayLayout& a, const std::vector<int64_t>& batch_shape, int core_dims,
                             const char* name) {
  const int ndim = static_cast<int>(a.shape.size());
  if (ndim < core_dims) throw std::invalid_argument(std::string(name) + ": too few dimensions");
  // An axis of extent 0 or 1 is never stepped along, so NumPy lets it carry any stride (a structured
  // field view of one row has the record's stride, e.g. 17 bytes for float32): it counts as stride 0.
  auto elements = [&](int axis) -> int64_t {
    if (a.shape[axis] <= 1) return 0;
    const int64_t stride_bytes = a.strides_bytes[axis];
    if (stride_bytes % a.itemsize != 0)
      throw std::invalid_argument(std::string(name) + ": stride is not a multiple of the item size");
    return stride_bytes / a.itemsize;
  };
  OperandLayout out;
  if (core_dims >= 2) out.row_stride = elements(ndim - 2);
  if (core_dims >= 1) out.col_stride = elements(ndim - 1);
  const int batch_ndim_a = ndim - core_dims;
  const int nb = static_cast<int>(batch_shape.size());
  if (batch_ndim_a > nb) throw std::invalid_argument(std::string(name) + ": more batch axes than the result");
  std::vector<int64_t> stride(nb, 0);
  for (int k = 0; k < nb; ++k) {
    const int axis = k - (nb - batch_ndim_a);
    if (axis < 0) continue;
    const int64_t extent = a.shape[axis];
    if (extent == batch_shape[k]) {
      stride[k] = elements(axis);
    } else if (extent != 1) {
      throw std::invalid_argument(std::string(name) + ": batch axis does not broadcast");
    }
  }
  const int64_t items = checked_product(batch_shape, name);
  out.batch_offsets.resize(static_cast<size_t>(items));
  // Odometer over the batch shape in C order, adding strides incrementally.
  std::vector<int64_t> index(nb, 0);
  int64_t offset = 0;
  for (int64_t item = 0; item < items; ++item) {
    out.batch_offsets[static_cast<size_t>(item)] = offset;
    for (int k = nb - 1; k >= 0; --k) {
      if (++index[k] < batch_shape[k]) {
        offset += stride[k];
        break;
      }
      offset -= stride[k] * (batch_shape[k] - 1);
      index[k] = 0;
    }
  }
  return out;
}

}  // namespace bindings
}  // namespace attnfast
