// CUDA implementations of the fused InfoNCE core ops (schemas beside the CPU
// kernels in csrc/cpu/info_nce.cpp; semantics in docs/fused_core.md): checks
// the tensors, allocates the results and runs the launchers of
// info_nce_cuda.h on the current stream of the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "pyclloss/cuda_binding.h"
#include "pyclloss/info_nce_cuda.h"

namespace pyclloss::cuda {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// A 0-dim float32 tensor on q's device (the logit scale, the SigLIP bias).
const float* scalar_pointer(const Tensor& t, const Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kFloat && t.device() == q.device(), name,
              " must be a 0-dim float32 tensor on ", device_text(q), ", got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", device_text(t));
  return t.data_ptr<float>();
}

// A contiguous vector of `length` elements of `dtype` on q's device.
void check_vector(const Tensor& t, const Tensor& q, const char* name, int64_t length,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length && t.scalar_type() == dtype &&
                  t.device() == q.device() && t.is_contiguous(),
              name, " must be a contiguous ", dtype, " vector of length ", length, " on ",
              device_text(q), ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", device_text(t));
}

const float* stats_pointer(const OptionalTensor& t, const Tensor& q, const char* name,
                           int64_t length) {
  if (!t.has_value()) return nullptr;
  check_vector(*t, q, name, length, at::kFloat);
  return t->data_ptr<float>();
}

// The set-up of every op, done in one place: the checks of q, k, scale and
// labels, and the launch's operands and masks (SigLIP passes no exclusion).
CoreProblem core_problem(const Tensor& q, const Tensor& k, const Tensor& scale,
                         const OptionalTensor& q_labels, const OptionalTensor& k_labels,
                         std::optional<int64_t> exclude_offset, bool neg_only) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda(), "q and k must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device(), "q and k must be on one device, got ", device_text(q),
              " and ", device_text(k));
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1),
              "q must be (N, D) and k (M, D), got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(1) > 0, "the embedding dimension D must be positive");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have one dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "q and k must be contiguous");
  TORCH_CHECK(q.size(0) < INT_MAX && k.size(0) < INT_MAX && q.size(1) < INT_MAX,
              "q and k have too many rows or columns for the CUDA kernels");
  const ElementType type = element_type(q, false);
  const float* scale_ptr = scalar_pointer(scale, q, "scale");
  TORCH_CHECK(q_labels.has_value() == k_labels.has_value(),
              "q_labels and k_labels must be given together");
  PairMasks masks;
  if (q_labels.has_value()) {
    check_vector(*q_labels, q, "q_labels", q.size(0), at::kLong);
    check_vector(*k_labels, q, "k_labels", k.size(0), at::kLong);
    masks.q_labels = q_labels->data_ptr<int64_t>();
    masks.k_labels = k_labels->data_ptr<int64_t>();
  }
  masks.has_exclude = exclude_offset.has_value();
  masks.exclude_offset = exclude_offset.value_or(0);
  masks.neg_only = neg_only;
  return {type, q.data_ptr(), k.data_ptr(), q.size(0), k.size(0), q.size(1), scale_ptr, masks};
}

Tensor stats_vector(const Tensor& q, int64_t length) {
  return at::empty({length}, q.options().dtype(at::kFloat));
}

// fp16 only: the power of two that brings the largest possible |G_ij| (the sum
// of the largest coefficients) to 1 before G is rounded to fp16 for the second
// product, so that small gradients do not underflow. Computed on the device.
OptionalTensor fp16_grad_scale(const Tensor& q, std::initializer_list<const Tensor*> coefficients) {
  if (q.scalar_type() != at::kHalf) return std::nullopt;
  Tensor bound = at::zeros({}, q.options().dtype(at::kFloat));
  for (const Tensor* coefficient : coefficients) {
    if (coefficient != nullptr && coefficient->numel() > 0) {
      bound = bound + coefficient->abs().max();
    }
  }
  const Tensor exponent = at::clamp(at::ceil(at::log2(bound)), -100, 100);
  return at::where(at::isfinite(bound) & (bound > 0), at::exp2(-exponent), at::ones_like(bound));
}

const Tensor* present(const OptionalTensor& t) { return t.has_value() ? &*t : nullptr; }

const float* optional_float_pointer(const OptionalTensor& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

Tensor grad_workspace(const Tensor& q) {
  return at::empty({static_cast<int64_t>(grad_workspace_doubles(q.size(0)))},
                   q.options().dtype(at::kDouble));
}

Tensor empty_grad(const Tensor& like, bool needed) {
  return needed ? at::empty_like(like) : at::empty({0}, like.options());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> infonce_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& scale, const OptionalTensor& q_labels,
    const OptionalTensor& k_labels, std::optional<int64_t> exclude_offset, bool neg_only,
    bool col_stats) {
  TORCH_CHECK(!(col_stats && neg_only),
              "infonce_fwd: col_stats together with neg_only is an error");
  const CoreProblem p = core_problem(q, k, scale, q_labels, k_labels, exclude_offset, neg_only);
  // The device guard comes after the argument checks: a failed check throws
  // before any device state changes.
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor row_lse = stats_vector(q, p.n), pos_sum = stats_vector(q, p.n);
  Tensor pos_count = stats_vector(q, p.n), col_lse = stats_vector(q, col_stats ? p.m : 0);
  check_launch(infonce_fwd(p, row_lse.data_ptr<float>(), pos_sum.data_ptr<float>(),
                           pos_count.data_ptr<float>(),
                           col_stats ? col_lse.data_ptr<float>() : nullptr,
                           c10::cuda::getCurrentCUDAStream()),
               "infonce_fwd");
  return {row_lse, pos_sum, pos_count, col_lse};
}

std::tuple<Tensor, Tensor> infonce_pair_fwd_cuda(const Tensor& q, const Tensor& k,
                                                 const Tensor& scale, const Tensor& q_labels,
                                                 const Tensor& k_labels,
                                                 std::optional<int64_t> exclude_offset,
                                                 const Tensor& neg_lse) {
  const CoreProblem p = core_problem(q, k, scale, q_labels, k_labels, exclude_offset, false);
  check_vector(neg_lse, q, "neg_lse", p.n, at::kFloat);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor loss_sum = stats_vector(q, p.n), sigmoid_sum = stats_vector(q, p.n);
  check_launch(infonce_pair_fwd(p, neg_lse.data_ptr<float>(), loss_sum.data_ptr<float>(),
                                sigmoid_sum.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "infonce_pair_fwd");
  return {loss_sum, sigmoid_sum};
}

std::tuple<Tensor, Tensor, Tensor> infonce_bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& scale, const OptionalTensor& q_labels,
    const OptionalTensor& k_labels, std::optional<int64_t> exclude_offset, bool neg_only,
    const OptionalTensor& row_lse, const OptionalTensor& row_coef, const OptionalTensor& col_lse,
    const OptionalTensor& col_coef, const OptionalTensor& pos_coef,
    const OptionalTensor& pair_lse, bool need_dk) {
  const CoreProblem p = core_problem(q, k, scale, q_labels, k_labels, exclude_offset, neg_only);
  InfoNceGradTerms terms;
  terms.row_lse = stats_pointer(row_lse, q, "row_lse", p.n);
  terms.row_coef = stats_pointer(row_coef, q, "row_coef", p.n);
  terms.col_lse = stats_pointer(col_lse, q, "col_lse", p.m);
  terms.col_coef = stats_pointer(col_coef, q, "col_coef", p.m);
  terms.pos_coef = stats_pointer(pos_coef, q, "pos_coef", p.n);
  terms.pair_lse = stats_pointer(pair_lse, q, "pair_lse", p.n);
  const c10::cuda::CUDAGuard guard(q.device());
  const OptionalTensor grad_scale =
      fp16_grad_scale(q, {present(row_coef), present(col_coef), present(pos_coef)});
  Tensor dq = at::empty_like(q), dk = empty_grad(k, need_dk);
  Tensor dscale = at::empty({}, q.options().dtype(at::kFloat));
  Tensor workspace = grad_workspace(q);
  check_launch(infonce_bwd(p, terms, optional_float_pointer(grad_scale), dq.data_ptr(),
                           need_dk ? dk.data_ptr() : nullptr, dscale.data_ptr<float>(),
                           workspace.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
               "infonce_bwd");
  return {dq, dk, dscale};
}

Tensor siglip_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& scale, const Tensor& bias,
                       const OptionalTensor& q_labels, const OptionalTensor& k_labels) {
  const CoreProblem p = core_problem(q, k, scale, q_labels, k_labels, std::nullopt, false);
  const float* bias_ptr = scalar_pointer(bias, q, "bias");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor row_loss = stats_vector(q, p.n);
  check_launch(siglip_fwd(p, bias_ptr, row_loss.data_ptr<float>(),
                          c10::cuda::getCurrentCUDAStream()),
               "siglip_fwd");
  return row_loss;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& scale, const Tensor& bias,
    const OptionalTensor& q_labels, const OptionalTensor& k_labels, const Tensor& row_coef,
    bool need_dk) {
  const CoreProblem p = core_problem(q, k, scale, q_labels, k_labels, std::nullopt, false);
  const float* bias_ptr = scalar_pointer(bias, q, "bias");
  check_vector(row_coef, q, "row_coef", p.n, at::kFloat);
  const c10::cuda::CUDAGuard guard(q.device());
  const OptionalTensor grad_scale = fp16_grad_scale(q, {&row_coef});
  Tensor dq = at::empty_like(q), dk = empty_grad(k, need_dk);
  Tensor dscale = at::empty({}, q.options().dtype(at::kFloat));
  Tensor dbias = at::empty({}, q.options().dtype(at::kFloat));
  Tensor workspace = grad_workspace(q);
  check_launch(siglip_bwd(p, bias_ptr, row_coef.data_ptr<float>(),
                          optional_float_pointer(grad_scale), dq.data_ptr(),
                          need_dk ? dk.data_ptr() : nullptr, dscale.data_ptr<float>(),
                          dbias.data_ptr<float>(), workspace.data_ptr<double>(),
                          c10::cuda::getCurrentCUDAStream()),
               "siglip_bwd");
  return {dq, dk, dscale, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyclloss_C, CUDA, m) {
  m.impl("infonce_fwd", &infonce_fwd_cuda);
  m.impl("infonce_pair_fwd", &infonce_pair_fwd_cuda);
  m.impl("infonce_bwd", &infonce_bwd_cuda);
  m.impl("siglip_fwd", &siglip_fwd_cuda);
  m.impl("siglip_bwd", &siglip_bwd_cuda);
}

}  // namespace pyclloss::cuda
