// Launchers of the CUDA kernels of the differentiable sorting networks
// (semantics of pyclloss/reference/sorting.py and csrc/cpu/sorting.cpp).
//
// Pure CUDA runtime API: raw device pointers, sizes and a stream, so that the
// kernels compile with nvcc alone; the torch binding (csrc/cuda/
// sorting_binding.cpp) checks the tensors and calls these.
//
// Conventions shared by every launcher:
//   x, v, outputs and their gradients: contiguous (rows, wires) of one element
//   type; perm and grad_perm: contiguous (rows, wires, wires);
//   the network: `count` comparators (lo, hi) as int32 pairs on the device,
//   layer after layer (comparators of a layer on disjoint wires);
//   workspace: sort_workspace_bytes(...) bytes on the device.
// Arithmetic in float64 for float64 inputs, float32 otherwise.
// Every launcher returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pyclloss/cuda_element.h"

namespace pyclloss::cuda {

// Largest row for which diff_sort forms P: a warp keeps the row's Pᵀ in shared
// memory (wires × (wires + 1) values: 66 KiB at 128 float32 wires, 133 KiB in
// float64, which needs a GPU with that much shared memory per block, e.g.
// sm_80 or sm_90).
constexpr int kMaxSortWires = 128;
// Largest row of the P-free ops (a warp keeps two values per wire in shared
// memory, and a few per comparator in the workspace).
constexpr int kMaxApplyWires = 1024;

struct SortNetwork {
  const int32_t* comparators;  // (count, 2): lo, hi
  int64_t count;
  int wires;
};

// The comparator relaxation: code = index in DISTRIBUTIONS of
// pyclloss/reference/sorting.py.
struct SortRelaxation {
  int64_t distribution;
  double steepness;
  double art_lambda;
};

enum class SortOp { kSortForward, kSortBackward, kSortBackwardWithPerm, kApplyForward,
                    kApplyBackward };

// Workspace of one launch of `op` on the current device.
size_t sort_workspace_bytes(SortOp op, ElementType type, int64_t rows,
                            const SortNetwork& network);

// sorted (rows, wires) and perm (rows, wires, wires); wires <= kMaxSortWires.
cudaError_t diff_sort_forward(ElementType type, const void* x, int64_t rows,
                              const SortNetwork& network, const SortRelaxation& relaxation,
                              void* sorted, void* perm, void* workspace, cudaStream_t stream);

// grad_x from grad_sorted and grad_perm, either may be null (taken as zero);
// workspace for kSortBackwardWithPerm when grad_perm is given, else kSortBackward.
cudaError_t diff_sort_backward(ElementType type, const void* x, const void* grad_sorted,
                               const void* grad_perm, int64_t rows, const SortNetwork& network,
                               const SortRelaxation& relaxation, void* grad_x, void* workspace,
                               cudaStream_t stream);

// out = P v per row, without forming P.
cudaError_t diff_sort_apply_forward(ElementType type, const void* x, const void* v,
                                    int64_t rows, const SortNetwork& network,
                                    const SortRelaxation& relaxation, void* out, void* workspace,
                                    cudaStream_t stream);

// grad_x and grad_v of diff_sort_apply_forward given grad_out.
cudaError_t diff_sort_apply_backward(ElementType type, const void* x, const void* v,
                                     const void* grad_out, int64_t rows,
                                     const SortNetwork& network, const SortRelaxation& relaxation,
                                     void* grad_x, void* grad_v, void* workspace,
                                     cudaStream_t stream);

}  // namespace pyclloss::cuda
