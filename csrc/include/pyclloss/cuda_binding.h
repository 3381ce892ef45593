// Helpers of the torch bindings of the CUDA kernels (csrc/cuda/*_binding.cpp):
// tensor dtypes as launcher element types, devices in messages, and the check
// of a launcher's result.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "pyclloss/cuda_element.h"

namespace pyclloss::cuda {

// x's dtype as a launcher element type; float64 only for kernels that have it.
inline ElementType element_type(const at::Tensor& x, bool with_float64) {
  switch (x.scalar_type()) {
    case at::kDouble:
      if (with_float64) return ElementType::kFloat64;
      break;
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kHalf:
      return ElementType::kFloat16;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "pyclloss CUDA kernels take ", with_float64 ? "float64, " : "",
              "float32, float16 or bfloat16 inputs here, got ", x.scalar_type());
}

// "cuda:0" or "cpu": spelled here rather than by streaming a c10::Device. A
// failed scale check that streamed devices into its message crashed the process
// on an H200 (cause not established); the other checks, which stream none, raise.
inline std::string device_text(const at::Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device());
  return t.is_cpu() ? "cpu" : "another device";
}

// Raises with the launcher's CUDA error, if any.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "pyclloss CUDA kernel ", op, " failed: ",
              cudaGetErrorString(err));
}

}  // namespace pyclloss::cuda
