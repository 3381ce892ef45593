// Tile building blocks of the CPU kernels: the matrix product on raw
// row-major tile buffers, and the blocked transposed layout that lets it read
// key tiles without copying. Meant to run inside at::parallel_for, one task
// per block of rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <type_traits>

namespace pyclloss::cpu {

// Number of blocks of `block` items covering `count` items.
inline int64_t num_blocks(int64_t count, int64_t block) {
  return (count + block - 1) / block;
}

template <typename T>
at::Tensor strided_view(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  // from_blob wants a mutable pointer; views of operands are only read.
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// c (m x n) = a (m x k) * b (k x n), plus c itself when `accumulate`; all
// row-major with leading dimensions lda, ldb, ldc. Single-threaded when
// called from a parallel region.
template <typename T>
void matmul(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
            T* c, int64_t ldc, bool accumulate) {
  if (k == 0) {
    if (!accumulate) {
      for (int64_t row = 0; row < m; ++row) std::fill(c + row * ldc, c + row * ldc + n, T(0));
    }
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  // float: the oneDNN micro-kernel behind torch's CPU attention, generated for
  // the CPU at hand (AVX-512 where present; BLAS when oneDNN cannot run).
  // About 2.4x the throughput of ATen's mm on these tile shapes, on Zen 5.
  if constexpr (std::is_same_v<T, float>) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c);
    return;
  }
#endif
  at::Tensor out = strided_view(c, m, n, ldc);
  const at::Tensor lhs = strided_view(a, m, k, lda);
  const at::Tensor rhs = strided_view(b, k, n, ldb);
  if (accumulate) {
    at::addmm_out(out, out, lhs, rhs);
  } else {
    at::mm_out(out, lhs, rhs);
  }
}

// The transpose of a row-major (n x d) matrix, block by block: rows
// [row0, row0 + rows) of a block of `block` rows become a (d x rows) matrix
// stored contiguously from offset row0 * d. A tile product then reads the
// transposed block in place with leading dimension `rows`, which, unlike the
// full transpose's stride n, does not alias in the caches.
inline at::Tensor transposed_blocks(const at::Tensor& rows, int64_t block) {
  const int64_t n = rows.size(0);
  const int64_t d = rows.size(1);
  at::Tensor out = at::empty({n * d}, rows.options());
  for (int64_t row0 = 0; row0 < n; row0 += block) {
    const int64_t count = std::min(block, n - row0);
    out.narrow(0, row0 * d, count * d).view({d, count}).copy_(rows.narrow(0, row0, count).t());
  }
  return out;
}

}  // namespace pyclloss::cpu
