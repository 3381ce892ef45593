// CPU kernels of the feature-transformation MoCo loss (pyclloss.ops.ft_moco):
// the log-sum-exp of each mixed query against the interpolated queue
// Q̂_j = lam_j * Q_j + (1 - lam_j) * Q_perm(j), and its backward.
//
// The fused InfoNCE core already lays its key operand out once per call, in
// the accumulation type (O(K*D), csrc/cpu/info_nce.cpp). Building Q̂ in that
// type is that same single pass with a gather and a blend folded in, so these
// kernels interpolate the queue in one parallel pass and hand Q̂ to the core's
// kernels: the logit tiles, the online LSE and the recomputing backward are
// the core's own. Nothing N x K is allocated.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "pyclloss/cpu_args.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr int64_t kRowsPerTask = 256;

void check_inputs(const char* op, const Tensor& q_hat, const Tensor& queue, const Tensor& lam_neg,
                  const Tensor& perm) {
  TORCH_CHECK(q_hat.device().is_cpu() && queue.device().is_cpu(), op,
              ": q_hat and queue must be CPU tensors");
  TORCH_CHECK(q_hat.dim() == 2 && queue.dim() == 2 && q_hat.size(1) == queue.size(1), op,
              ": q_hat (N x D) and queue (K x D) expected, got ", q_hat.sizes(), " and ",
              queue.sizes());
  TORCH_CHECK(q_hat.scalar_type() == queue.scalar_type(), op,
              ": q_hat and queue must have the same dtype, got ", q_hat.scalar_type(), " and ",
              queue.scalar_type());
  TORCH_CHECK(queue.is_contiguous(), op, ": queue must be contiguous");
  const int64_t k = queue.size(0);
  check_stats_vector(op, "lam_neg", lam_neg, k, stats_dtype(queue.scalar_type()));
  check_stats_vector(op, "perm", perm, k, at::kLong);
  TORCH_CHECK(k == 0 || (perm.min().item<int64_t>() >= 0 && perm.max().item<int64_t>() < k), op,
              ": perm must index the ", k, " queue rows");
}

// out = weight * own + (1 - weight) * partner, one row of D.
template <typename scalar_t, typename acc_t>
void blend_row(const scalar_t* own, const scalar_t* partner, acc_t weight, acc_t* out,
               int64_t d) {
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) {
    out[e] = weight * static_cast<acc_t>(own[e]) +
             (acc_t(1) - weight) * static_cast<acc_t>(partner[e]);
  }
}

// Q̂ in the accumulation type, one gather-and-blend pass over the queue.
Tensor interpolate_queue(const Tensor& queue, const Tensor& lam_neg, const Tensor& perm) {
  const int64_t k = queue.size(0);
  const int64_t d = queue.size(1);
  Tensor mixed = at::empty({k, d}, queue.options().dtype(stats_dtype(queue.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(),
                                  "ft_moco_interpolate_queue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rows = queue.data_ptr<scalar_t>();
    const acc_t* lam = lam_neg.data_ptr<acc_t>();
    const int64_t* partner = perm.data_ptr<int64_t>();
    acc_t* out = mixed.data_ptr<acc_t>();
    at::parallel_for(0, k, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        blend_row(rows + j * d, rows + partner[j] * d, lam[j], out + j * d, d);
      }
    });
  });
  return mixed;
}

// The core's kernels, through the dispatcher (their schemas are in info_nce.cpp).
auto core_fwd() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("pyclloss_C::infonce_fwd", "")
      .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
          const OptionalTensor&, std::optional<int64_t>, bool, bool)>();
}

auto core_bwd() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("pyclloss_C::infonce_bwd", "")
      .typed<std::tuple<Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
          const OptionalTensor&, std::optional<int64_t>, bool, const OptionalTensor&,
          const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
          const OptionalTensor&, const OptionalTensor&, bool)>();
}

Tensor ft_moco_neg_lse(const Tensor& q_hat, const Tensor& queue, const Tensor& lam_neg,
                       const Tensor& perm, const Tensor& scale) {
  check_inputs("ft_moco_neg_lse", q_hat, queue, lam_neg, perm);
  const Tensor mixed = interpolate_queue(queue, lam_neg, perm);
  const Tensor q_acc = q_hat.to(mixed.scalar_type()).contiguous();
  return std::get<0>(core_fwd().call(q_acc, mixed, scale, std::nullopt, std::nullopt,
                                     std::nullopt, false, false));
}

std::tuple<Tensor, Tensor> ft_moco_neg_lse_bwd(const Tensor& q_hat, const Tensor& queue,
                                               const Tensor& lam_neg, const Tensor& perm,
                                               const Tensor& scale, const Tensor& neg_lse,
                                               const Tensor& grad) {
  constexpr const char* op = "ft_moco_neg_lse_bwd";
  check_inputs(op, q_hat, queue, lam_neg, perm);
  const auto stats = stats_dtype(q_hat.scalar_type());
  check_stats_vector(op, "neg_lse", neg_lse, q_hat.size(0), stats);
  check_stats_vector(op, "grad", grad, q_hat.size(0), stats);
  const Tensor mixed = interpolate_queue(queue, lam_neg, perm);
  const Tensor q_acc = q_hat.to(stats).contiguous();
  auto [dq, dk, dscale] =
      core_bwd().call(q_acc, mixed, scale, std::nullopt, std::nullopt, std::nullopt, false,
                      neg_lse, grad, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                      false);
  return {dq.to(q_hat.scalar_type()), dscale};
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def(
      "ft_moco_neg_lse(Tensor q_hat, Tensor queue, Tensor lam_neg, Tensor perm, Tensor scale) "
      "-> Tensor");
  m.def(
      "ft_moco_neg_lse_bwd(Tensor q_hat, Tensor queue, Tensor lam_neg, Tensor perm, "
      "Tensor scale, Tensor neg_lse, Tensor grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("ft_moco_neg_lse", &pyclloss::cpu::ft_moco_neg_lse);
  m.impl("ft_moco_neg_lse_bwd", &pyclloss::cpu::ft_moco_neg_lse_bwd);
}
