// Launchers of the CUDA kernels of the gated-subspace loss
// (docs/gated_info_nce.md).
//
// Pure CUDA runtime API: raw device pointers, sizes and a stream, so that the
// kernels compile with nvcc alone; the torch binding (csrc/cuda/
// gated_info_nce_binding.cpp) prepares the float32 operands, calls these and
// assembles dq, dgates and dk from the products they return.
// Every launcher returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace pyclloss::cuda {

// The rows the tiles are built from, float32, contiguous:
//   a = q g^2 (b x dim), gate_sq = g^2 (b x dim), k (n x dim), k_sq = k k (n x dim),
//   anchor_scale = s / max(|q g|, eps) (b); labels, partner_labels (b), key_labels (n).
struct GatedOperands {
  const float* a;
  const float* gate_sq;
  const float* k;
  const float* k_sq;
  const float* anchor_scale;
  const int64_t* labels;
  const int64_t* partner_labels;
  const int64_t* key_labels;
  int64_t b;
  int64_t n;
  int64_t dim;
};

// Per-anchor coefficients of the logit gradient G (b each).
struct GatedGradTerms {
  const float* neg_lse;
  const float* neg_coef;
  const float* pos_coef;
};

// neg_lse and pos_count (b each).
cudaError_t gated_fwd(const GatedOperands& ops, float* neg_lse, float* pos_count,
                      cudaStream_t stream);

// loss_sum and sigmoid_sum (b each) given neg_lse (b).
cudaError_t gated_pair_fwd(const GatedOperands& ops, const float* neg_lse, float* loss_sum,
                           float* sigmoid_sum, cudaStream_t stream);

// With H the coefficients of the numerators a.k and T those of the squared
// key norms (docs/gated_info_nce.md): h_k = H k and t_ksq = T (k k) (b x dim),
// dlogit_b = sum_n G_bn l_bn (b).
cudaError_t gated_anchor_grad(const GatedOperands& ops, const GatedGradTerms& terms, float* h_k,
                              float* t_ksq, float* dlogit, cudaStream_t stream);

// h_a = H^T a and t_gsq = T^T g^2 (n x dim).
cudaError_t gated_key_grad(const GatedOperands& ops, const GatedGradTerms& terms, float* h_a,
                           float* t_gsq, cudaStream_t stream);

}  // namespace pyclloss::cuda
