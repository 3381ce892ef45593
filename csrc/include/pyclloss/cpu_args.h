// Argument helpers shared by the CPU op families: the dtypes the kernels take,
// the statistics dtype of an input dtype, and the check of an O(N) statistics
// vector.
#pragma once

#include <ATen/ATen.h>

namespace pyclloss::cpu {

// The input dtypes every CPU kernel takes; `what` names the arguments.
inline void check_kernel_dtype(const char* op, const char* what, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": ", what, " must be float64, float32, float16 or bfloat16, got ", dtype);
}

// Accumulation / statistics dtype of the kernels for an input dtype.
inline at::ScalarType stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_stats_vector(const char* op, const char* name, const at::Tensor& t,
                               int64_t length, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 &&
                  t.size(0) == length && t.is_contiguous(),
              op, ": ", name, " must be a contiguous ", dtype, " CPU vector of length ", length,
              ", got shape ", t.sizes(), " and dtype ", t.scalar_type());
}

}  // namespace pyclloss::cpu
