// Launchers of the CUDA kernels of the fused InfoNCE core (docs/fused_core.md).
//
// Pure CUDA runtime API: raw device pointers, sizes and a stream, so that the
// kernels compile with nvcc alone; the torch binding (csrc/cuda/
// info_nce_binding.cpp) checks the tensors and calls these.
//
// Conventions shared by every launcher:
//   the operands in one CoreProblem (q, k, sizes, scale, masks);
//   bias: a device pointer to one float (never read on the host);
//   statistics, coefficients and results: float32 device arrays;
//   dq, dk: the element type of q and k.
// Every launcher returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "pyclloss/cuda_element.h"

namespace pyclloss::cuda {

// Which pairs (i, j) are excluded and which are positives.
struct PairMasks {
  const int64_t* q_labels = nullptr;  // n, or null (then there are no positives)
  const int64_t* k_labels = nullptr;  // m, null exactly when q_labels is
  bool has_exclude = false;           // exclude the pair j == i + exclude_offset
  int64_t exclude_offset = 0;
  bool neg_only = false;              // positives leave the row LSE
};

// What every launcher takes: q (n x dim) and k (m x dim), contiguous rows of
// `type`; scale, a device pointer to one float (never read on the host); the
// masks (SigLIP reads only their labels: it excludes no pair).
struct CoreProblem {
  ElementType type;
  const void* q;
  const void* k;
  int64_t n;
  int64_t m;
  int64_t dim;
  const float* scale;
  PairMasks masks;
};

// The three terms of the logit gradient G; a term is present when its
// pointers are non-null (row: row_lse + row_coef, column: col_lse + col_coef,
// positive: pos_coef, with pair_lse optional).
struct InfoNceGradTerms {
  const float* row_lse = nullptr;
  const float* row_coef = nullptr;
  const float* col_lse = nullptr;
  const float* col_coef = nullptr;
  const float* pos_coef = nullptr;
  const float* pair_lse = nullptr;
};

// Scratch space of the backward launchers for n query rows, in doubles.
size_t grad_workspace_doubles(int64_t n);

// row_lse, pos_sum, pos_count (n each); col_lse (m) when non-null.
cudaError_t infonce_fwd(const CoreProblem& p, float* row_lse, float* pos_sum, float* pos_count,
                        float* col_lse, cudaStream_t stream);

// loss_sum, sigmoid_sum (n each) from neg_lse (n); masks.neg_only is ignored.
cudaError_t infonce_pair_fwd(const CoreProblem& p, const float* neg_lse, float* loss_sum,
                             float* sigmoid_sum, cudaStream_t stream);

// dq (n x dim), dk (m x dim, skipped when null) and dscale (one float).
// grad_scale: null, or one float by which G is multiplied before it is rounded
// to the element type for the second product (fp16 keeps small gradients
// representable that way); the results are divided by it again.
// workspace: grad_workspace_doubles(n) doubles.
cudaError_t infonce_bwd(const CoreProblem& p, const InfoNceGradTerms& terms,
                        const float* grad_scale, void* dq, void* dk, float* dscale,
                        double* workspace, cudaStream_t stream);

// row_loss (n). Positives where the labels match.
cudaError_t siglip_fwd(const CoreProblem& p, const float* bias, float* row_loss,
                       cudaStream_t stream);

// dq, dk (skipped when null), dscale and dbias (one float each); grad_scale and
// workspace as for infonce_bwd.
cudaError_t siglip_bwd(const CoreProblem& p, const float* bias, const float* row_coef,
                       const float* grad_scale, void* dq, void* dk, float* dscale, float* dbias,
                       double* workspace, cudaStream_t stream);

}  // namespace pyclloss::cuda
