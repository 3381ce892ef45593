// The element types of the CUDA launchers, and the dispatch from one to its
// C++ type. Pure CUDA runtime headers: included by the kernels (nvcc) and by
// the torch bindings (host compiler) alike.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace pyclloss::cuda {

enum class ElementType { kFloat64, kFloat32, kFloat16, kBFloat16 };

// Returns fn(T{}) for the C++ type T of `type`. Kernels without a float64
// version pass kWithFloat64 = false: float64 then gives cudaErrorInvalidValue
// (their bindings reject it before any launch).
template <bool kWithFloat64 = true, typename Fn>
cudaError_t with_element_type(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kFloat64:
      if constexpr (kWithFloat64) {
        return fn(double{});
      } else {
        return cudaErrorInvalidValue;
      }
    case ElementType::kFloat32:
      return fn(float{});
    case ElementType::kFloat16:
      return fn(__half{});
    case ElementType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyclloss::cuda
