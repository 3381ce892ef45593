// CPU kernel of the feature-transformation MoCo loss (pyclloss.ops.ft_moco):
// the interpolated queue Q̂_j = a_j * Q_j + b_j * Q_perm(j) in the
// accumulation type, in one parallel gather-and-blend pass (a_j = lam_j and
// b_j = 1 - lam_j, divided by the rows' norms when the queue is normalised).
//
// The CPU backend materialises Q̂ once per step and runs the InfoNCE core's
// kernels on it (csrc/cpu/info_nce.cpp), keeping Q̂ for the backward. The
// core lays its key operand out once per call anyway (O(K*D)), so building
// Q̂ tiles inside the tile loop could not save that pass; keeping Q̂ was
// faster than rebuilding it in the backward at every queue size measured
// (bench/results/cpu-ft_moco.md).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pyclloss/cpu_args.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowsPerTask = 256;

void check_queue_inputs(const char* op, const Tensor& queue, const Tensor& own_weight,
                        const Tensor& partner_weight, const Tensor& perm) {
  TORCH_CHECK(queue.device().is_cpu() && queue.dim() == 2 && queue.is_contiguous(), op,
              ": queue must be a contiguous K x D CPU tensor, got shape ", queue.sizes());
  const int64_t k = queue.size(0);
  check_stats_vector(op, "own_weight", own_weight, k, stats_dtype(queue.scalar_type()));
  check_stats_vector(op, "partner_weight", partner_weight, k, stats_dtype(queue.scalar_type()));
  check_stats_vector(op, "perm", perm, k, at::kLong);
  TORCH_CHECK(k == 0 || (perm.min().item<int64_t>() >= 0 && perm.max().item<int64_t>() < k), op,
              ": perm must index the ", k, " queue rows");
}

// out = own_weight * own + partner_weight * partner, one row of D.
template <typename scalar_t, typename acc_t>
void blend_row(const scalar_t* own, const scalar_t* partner, acc_t own_weight,
               acc_t partner_weight, acc_t* out, int64_t d) {
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) {
    out[e] = own_weight * static_cast<acc_t>(own[e]) +
             partner_weight * static_cast<acc_t>(partner[e]);
  }
}

// Q̂ in the accumulation type, one gather-and-blend pass over the queue.
Tensor interpolate_queue(const Tensor& queue, const Tensor& own_weight,
                         const Tensor& partner_weight, const Tensor& perm) {
  check_queue_inputs("ft_moco_interpolate_queue", queue, own_weight, partner_weight, perm);
  const int64_t k = queue.size(0);
  const int64_t d = queue.size(1);
  Tensor mixed = at::empty({k, d}, queue.options().dtype(stats_dtype(queue.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(),
                                  "ft_moco_interpolate_queue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rows = queue.data_ptr<scalar_t>();
    const acc_t* own_w = own_weight.data_ptr<acc_t>();
    const acc_t* partner_w = partner_weight.data_ptr<acc_t>();
    const int64_t* partner = perm.data_ptr<int64_t>();
    acc_t* out = mixed.data_ptr<acc_t>();
    at::parallel_for(0, k, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        blend_row(rows + j * d, rows + partner[j] * d, own_w[j], partner_w[j], out + j * d, d);
      }
    });
  });
  return mixed;
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def(
      "ft_moco_interpolate_queue(Tensor queue, Tensor own_weight, Tensor partner_weight, "
      "Tensor perm) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("ft_moco_interpolate_queue", &pyclloss::cpu::interpolate_queue);
}
