// CUDA implementations of the gated-subspace ops (schemas beside the CPU
// kernels in csrc/cpu/gated_info_nce.cpp; semantics in docs/gated_info_nce.md):
// checks the tensors, prepares the float32 rows of the tiles, runs the
// launchers of gated_info_nce_cuda.h on the current stream of the inputs'
// device and assembles dq, dgates and dk from the products they return.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "pyclloss/cuda_binding.h"
#include "pyclloss/gated_info_nce_cuda.h"

namespace pyclloss::cuda {
namespace {

using at::Tensor;

constexpr double kNormEps = 1e-12;  // as the kernels' clamp of gated norms

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& gates, const Tensor& scale,
                  const Tensor& labels, const Tensor& partner_labels, const Tensor& key_labels) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && gates.device() == q.device(),
              "gated ops: q, k and gates must be on one CUDA device, got ", q.device(), ", ",
              k.device(), " and ", gates.device());
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1) && gates.sizes() == q.sizes(),
              "gated ops: q (B, K), k (N, K) and gates (B, K) expected, got ", q.sizes(), ", ",
              k.sizes(), " and ", gates.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
                  k.scalar_type() == dtype && gates.scalar_type() == dtype,
              "gated ops: q, k and gates must share a dtype among float32, float16 and bfloat16");
  TORCH_CHECK(scale.dim() == 0 && scale.scalar_type() == at::kFloat && scale.device() == q.device(),
              "gated ops: scale must be a 0-dim float32 tensor on ", q.device());
  const auto check_labels = [&q](const char* name, const Tensor& y, int64_t length) {
    TORCH_CHECK(y.device() == q.device() && y.scalar_type() == at::kLong && y.dim() == 1 &&
                    y.size(0) == length && y.is_contiguous(),
                "gated ops: ", name, " must be a contiguous int64 vector of length ", length,
                " on ", q.device());
  };
  check_labels("labels", labels, q.size(0));
  check_labels("partner_labels", partner_labels, q.size(0));
  check_labels("key_labels", key_labels, k.size(0));
}

const float* stats_pointer(const Tensor& t, const Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device() && t.scalar_type() == at::kFloat && t.dim() == 1 &&
                  t.size(0) == q.size(0) && t.is_contiguous(),
              "gated ops: ", name, " must be a contiguous float32 vector of length ", q.size(0),
              " on ", q.device());
  return t.data_ptr<float>();
}

// The float32 rows of the tiles, and the operand pointers into them.
struct Prepared {
  Tensor q;
  Tensor gates;
  Tensor gate_sq;
  Tensor a;
  Tensor k;
  Tensor k_sq;
  Tensor norm;  // max(|q g|, eps) per anchor
  Tensor anchor_scale;
  GatedOperands ops;
};

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& gates, const Tensor& scale,
                 const Tensor& labels, const Tensor& partner_labels, const Tensor& key_labels) {
  check_inputs(q, k, gates, scale, labels, partner_labels, key_labels);
  Prepared p;
  p.q = q.to(at::kFloat).contiguous();
  p.gates = gates.to(at::kFloat).contiguous();
  p.gate_sq = p.gates * p.gates;
  p.a = p.q * p.gate_sq;
  p.k = k.to(at::kFloat).contiguous();
  p.k_sq = p.k * p.k;
  p.norm = (p.q * p.gates).norm(2, {1}).clamp_min(kNormEps);
  p.anchor_scale = scale / p.norm;
  p.ops = {p.a.data_ptr<float>(),
           p.gate_sq.data_ptr<float>(),
           p.k.data_ptr<float>(),
           p.k_sq.data_ptr<float>(),
           p.anchor_scale.data_ptr<float>(),
           labels.data_ptr<int64_t>(),
           partner_labels.data_ptr<int64_t>(),
           key_labels.data_ptr<int64_t>(),
           q.size(0),
           k.size(0),
           q.size(1)};
  return p;
}

Tensor stats_vector(const Tensor& q) { return at::empty({q.size(0)}, q.options().dtype(at::kFloat)); }

std::tuple<Tensor, Tensor> gated_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& gates,
                                          const Tensor& scale, const Tensor& labels,
                                          const Tensor& partner_labels,
                                          const Tensor& key_labels) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(q, k, gates, scale, labels, partner_labels, key_labels);
  Tensor neg_lse = stats_vector(q), pos_count = stats_vector(q);
  check_launch(gated_fwd(p.ops, neg_lse.data_ptr<float>(), pos_count.data_ptr<float>(),
                         c10::cuda::getCurrentCUDAStream()),
               "gated_fwd");
  return {neg_lse, pos_count};
}

std::tuple<Tensor, Tensor> gated_pair_fwd_cuda(const Tensor& q, const Tensor& k,
                                               const Tensor& gates, const Tensor& scale,
                                               const Tensor& labels, const Tensor& partner_labels,
                                               const Tensor& key_labels, const Tensor& neg_lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(q, k, gates, scale, labels, partner_labels, key_labels);
  Tensor loss_sum = stats_vector(q), sigmoid_sum = stats_vector(q);
  check_launch(gated_pair_fwd(p.ops, stats_pointer(neg_lse, q, "neg_lse"),
                              loss_sum.data_ptr<float>(), sigmoid_sum.data_ptr<float>(),
                              c10::cuda::getCurrentCUDAStream()),
               "gated_pair_fwd");
  return {loss_sum, sigmoid_sum};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& gates, const Tensor& scale,
    const Tensor& labels, const Tensor& partner_labels, const Tensor& key_labels,
    const Tensor& neg_lse, const Tensor& neg_coef, const Tensor& pos_coef, bool need_dk) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(q, k, gates, scale, labels, partner_labels, key_labels);
  const GatedGradTerms terms{stats_pointer(neg_lse, q, "neg_lse"),
                             stats_pointer(neg_coef, q, "neg_coef"),
                             stats_pointer(pos_coef, q, "pos_coef")};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor h_k = at::empty_like(p.a), t_ksq = at::empty_like(p.a), dlogit = stats_vector(q);
  check_launch(gated_anchor_grad(p.ops, terms, h_k.data_ptr<float>(), t_ksq.data_ptr<float>(),
                                 dlogit.data_ptr<float>(), stream),
               "gated_anchor_grad");
  // dq = g^2 (H k - c q), dg = 2 g (q (H k) - c q^2 / 2 - T (k k)), with the
  // anchor-norm term c_b = sum_n G_bn l_bn / |q_b g_b|^2 (0 where clamped).
  const Tensor c =
      at::where(p.norm > kNormEps, dlogit / (p.norm * p.norm), at::zeros_like(dlogit)).unsqueeze(1);
  Tensor dq = (p.gate_sq * (h_k - c * p.q)).to(q.scalar_type());
  Tensor dgates = (2 * p.gates * (p.q * h_k - 0.5 * c * p.q * p.q - t_ksq)).to(gates.scalar_type());
  Tensor dk = at::empty({0}, k.options());
  if (need_dk) {
    Tensor h_a = at::empty_like(p.k), t_gsq = at::empty_like(p.k);
    check_launch(gated_key_grad(p.ops, terms, h_a.data_ptr<float>(), t_gsq.data_ptr<float>(),
                                stream),
                 "gated_key_grad");
    dk = (h_a - 2 * p.k * t_gsq).to(k.scalar_type());  // dk = H^T a - 2 k (T^T g^2)
  }
  return {dq, dk, dgates, dlogit.sum() / scale};  // dscale = sum_bn G_bn l_bn / s
}

}  // namespace
}  // namespace pyclloss::cuda

TORCH_LIBRARY_IMPL(pyclloss_C, CUDA, m) {
  m.impl("gated_fwd", &pyclloss::cuda::gated_fwd_cuda);
  m.impl("gated_pair_fwd", &pyclloss::cuda::gated_pair_fwd_cuda);
  m.impl("gated_bwd", &pyclloss::cuda::gated_bwd_cuda);
}
