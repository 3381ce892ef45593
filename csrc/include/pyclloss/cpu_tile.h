// Tile building blocks of the CPU kernels: matrix products on raw row-major
// tile buffers and per-block conversion of fp16/bf16 rows to the accumulation
// type. Meant to run inside at::parallel_for, one task per block of rows.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>

namespace pyclloss::cpu {

template <typename T>
at::Tensor matrix_view(const T* data, int64_t rows, int64_t cols) {
  // from_blob wants a mutable pointer; views of inputs are only read.
  return at::from_blob(const_cast<T*>(data), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// The products go through ATen's mm (BLAS underneath; single-threaded when
// called from a parallel region): at::native::cpublas::gemm, which torch's own
// kernels call, is not exported from libtorch. Per-call overhead is a few
// microseconds against tens of microseconds of work per tile.

// out (m x n) = a (m x k) * b^T, with b stored as (n x k).
template <typename T>
void matmul_transposed_b(const T* a, const T* b, T* out, int64_t m, int64_t n, int64_t k) {
  at::Tensor result = matrix_view(out, m, n);
  at::mm_out(result, matrix_view(a, m, k), matrix_view(b, n, k).t());
}

// out (m x n) += a (m x k) * b (k x n).
template <typename T>
void matmul_accumulate(const T* a, const T* b, T* out, int64_t m, int64_t n, int64_t k) {
  at::Tensor result = matrix_view(out, m, n);
  at::addmm_out(result, result, matrix_view(a, m, k), matrix_view(b, k, n));
}

// Rows [0, rows) of a row-major (rows x cols) block as acc_t: the block itself
// when it already is acc_t, else converted into `buffer` (rows * cols).
template <typename acc_t, typename scalar_t>
const acc_t* rows_as(const scalar_t* block, int64_t rows, int64_t cols, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return block;
  } else {
    std::transform(block, block + rows * cols, buffer,
                   [](scalar_t value) { return static_cast<acc_t>(value); });
    return buffer;
  }
}

// Number of blocks of `block` items covering `count` items.
inline int64_t num_blocks(int64_t count, int64_t block) {
  return (count + block - 1) / block;
}

}  // namespace pyclloss::cpu
