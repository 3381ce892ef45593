// Tile building blocks of the CPU kernels: the loop over the tiles of a pass
// (for_each_tile), the matrix product on raw row-major tile buffers, and the
// blocked transposed layout that lets it read column tiles without copying.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <type_traits>

#include "pyclloss/cpu_schedule.h"

namespace pyclloss::cpu {

constexpr int64_t kOuterBlock = 64;   // rows of a tile: a task's output rows
constexpr int64_t kInnerBlock = 512;  // columns of a tile, streamed

// Number of blocks of `block` items covering `count` items.
inline int64_t num_blocks(int64_t count, int64_t block) {
  return (count + block - 1) / block;
}

// The tiles of a pass of `rows` output rows against `cols` columns: blocks of
// kOuterBlock rows, split into `groups` consecutive runs, one task each on
// the intra-op threads (run_tasks); a task visits its row blocks in order,
// each against the blocks of kInnerBlock columns in order. Each thread makes
// its buffers once with make_buffers(). Per row block: start(buffers, row0,
// count), then tile(buffers, row0, count, col0, col_count, group) for every
// column block, then finish(buffers, row0, count).
template <typename MakeBuffers, typename Start, typename Tile, typename Finish>
void for_each_tile(int64_t rows, int64_t cols, int64_t groups, const MakeBuffers& make_buffers,
                   const Start& start, const Tile& tile, const Finish& finish) {
  const int64_t row_blocks = num_blocks(rows, kOuterBlock);
  run_tasks(groups, make_buffers, [&](auto& buffers, int64_t group) {
    const int64_t block_end = (group + 1) * row_blocks / groups;
    for (int64_t block = group * row_blocks / groups; block < block_end; ++block) {
      const int64_t row0 = block * kOuterBlock;
      const int64_t count = std::min(kOuterBlock, rows - row0);
      start(buffers, row0, count);
      for (int64_t col0 = 0; col0 < cols; col0 += kInnerBlock) {
        tile(buffers, row0, count, col0, std::min(kInnerBlock, cols - col0), group);
      }
      finish(buffers, row0, count);
    }
  });
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
// The copy stays on the calling thread: a parallel region of its own would
// cost, on a machine where another process keeps a core busy, a scheduler
// slice whenever a thread of it is descheduled (docs/fused_core.md).
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
