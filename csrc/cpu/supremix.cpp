// SupReMix (contrastive regression with mixed pairs), per anchor from the
// Gram matrix G = z·zᵀ.
//
// Mixtures are linear in z, so every logit is a combination of entries of
// row i of G (docs/losses.md, SupReMix): a real sample c gives G_ic, a mix-neg k gives
// λ_ik·G_ii + (1−λ_ik)·G_ik, a mix-pos pair (j, k) gives α·G_ij + (1−α)·G_ik
// (all times 1/τ). Per anchor the mix-pos pairs are the lower × upper
// neighbours within the gap, gathered once into contiguous arrays: O(n²)
// scalar work per anchor, nothing n×n×n.
//
// Forward: per anchor the weighted log-sum-exp over A_i, the sum of positive
// logits, |P_i| and the softmax-weighted mean logit (for the gradient of the
// temperature: d lse / d(1/τ) = mean logit · τ). The shift is the largest
// real (c ≠ i) or mix-neg logit, which bounds every mix-pos logit (a convex
// combination of real ones), so the largest term of the sum is exactly its
// weight (>= 1).
// Backward: given the gradients of lse and pos_sum, the coefficient matrices
// of dz = (R + Rᵀ + A)·z: R_ic for the real pairs (both sides get a
// gradient), A for the mixtures (detached: only the anchor side). Each anchor
// writes only its own rows of R and A, so results do not depend on threads.
//
// Inputs are in the accumulation type already (float, or double for checks).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "pyclloss/cpu_args.h"
#include "pyclloss/cpu_math.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;

// The lower (t_j < t_i) and upper (t_k > t_i) neighbours of anchor i within
// the gap: the two sides of its mix-pos pairs, as (G_i·, t) arrays.
template <typename T>
struct MixPosSides {
  std::vector<int64_t> lower, upper;
  std::vector<T> lower_dot, lower_t, upper_dot, upper_t;

  void gather(const T* g_row, const T* t, int64_t n, T ti, T gap) {
    lower.clear(), upper.clear(), lower_dot.clear(), lower_t.clear();
    upper_dot.clear(), upper_t.clear();
    for (int64_t c = 0; c < n; ++c) {
      if (t[c] < ti && ti - t[c] < gap) {
        lower.push_back(c), lower_dot.push_back(g_row[c]), lower_t.push_back(t[c]);
      } else if (t[c] > ti && t[c] - ti < gap) {
        upper.push_back(c), upper_dot.push_back(g_row[c]), upper_t.push_back(t[c]);
      }
    }
  }
};

// One anchor's view of the inputs: the logits and weights of its real and
// mix-neg columns.
template <typename T>
struct Anchor {
  const T* g_row;
  const T* lam_row;
  const T* t;
  int64_t i;
  T ti, g_self, inv_tau;

  T real_logit(int64_t c) const { return g_row[c] * inv_tau; }
  T real_weight(int64_t c) const { return std::abs(ti - t[c]) + T(1); }
  bool has_mix_neg(int64_t k) const { return t[k] != ti; }
  T mix_neg_logit(int64_t k) const {
    return (lam_row[k] * g_self + (T(1) - lam_row[k]) * g_row[k]) * inv_tau;
  }
  // |t_i − (λ·t_i + (1−λ)·t_k)| + 1
  T mix_neg_weight(int64_t k) const { return (T(1) - lam_row[k]) * std::abs(ti - t[k]) + T(1); }
};

template <typename T>
Anchor<T> anchor(const T* gram, const T* lam, const T* t, int64_t n, int64_t i, T inv_tau) {
  const T* g_row = gram + i * n;
  return {g_row, lam + i * n, t, i, t[i], g_row[i], inv_tau};
}

// α and the logit of the mix-pos pair (j, k): the mixture α·z_j + (1−α)·z_k
// carries the anchor's label, α = (t_k − t_i)/(t_k − t_j).
template <typename T>
inline T mix_pos_alpha(T ti, T tj, T tk) {
  return (tk - ti) / (tk - tj);
}

int64_t grain(int64_t n) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)); }

template <typename T>
void forward_rows(const T* gram, const T* t, const T* lam, int64_t n, T inv_tau, T gap, T* lse,
                  T* pos_sum, T* pos_count, T* mean_logit) {
  at::parallel_for(0, n, grain(n), [&](int64_t begin, int64_t end) {
    MixPosSides<T> sides;
    for (int64_t i = begin; i < end; ++i) {
      const Anchor<T> a = anchor(gram, lam, t, n, i, inv_tau);
      T shift = kNegInf<T>;
      for (int64_t c = 0; c < n; ++c) {
        if (c == i) continue;
        shift = std::max(shift, a.real_logit(c));
        if (a.has_mix_neg(c)) shift = std::max(shift, a.mix_neg_logit(c));
      }
      // sum: Σ w·e^(l − shift); weighted: Σ w·e^(l − shift)·l (for the mean logit)
      double sum = 0, weighted = 0, positives = 0;
      int64_t count = 0;
      for (int64_t c = 0; c < n; ++c) {
        if (c == i) continue;
        const T l = a.real_logit(c);
        const T term = a.real_weight(c) * exp_approx(l - shift);
        sum += term, weighted += term * l;
        if (t[c] == a.ti) positives += l, ++count;
        if (a.has_mix_neg(c)) {
          const T neg_l = a.mix_neg_logit(c);
          const T neg_term = a.mix_neg_weight(c) * exp_approx(neg_l - shift);
          sum += neg_term, weighted += neg_term * neg_l;
        }
      }
      sides.gather(a.g_row, t, n, a.ti, gap);
      const int64_t n_upper = static_cast<int64_t>(sides.upper.size());
      const T* up_dot = sides.upper_dot.data();
      const T* up_t = sides.upper_t.data();
      for (size_t jj = 0; jj < sides.lower.size(); ++jj) {
        const T gj = sides.lower_dot[jj], tj = sides.lower_t[jj];
        T row_sum = 0, row_weighted = 0, row_logits = 0;
        for (int64_t kk = 0; kk < n_upper; ++kk) {
          const T alpha = mix_pos_alpha(a.ti, tj, up_t[kk]);
          const T l = (alpha * gj + (T(1) - alpha) * up_dot[kk]) * inv_tau;
          const T term = exp_approx(l - shift);
          row_sum += term, row_weighted += term * l, row_logits += l;
        }
        sum += row_sum, weighted += row_weighted, positives += row_logits;
      }
      count += static_cast<int64_t>(sides.lower.size()) * n_upper;
      lse[i] = shift + static_cast<T>(std::log(sum));
      pos_sum[i] = static_cast<T>(positives);
      pos_count[i] = static_cast<T>(count);
      mean_logit[i] = static_cast<T>(weighted / sum);
    }
  });
}

template <typename T>
void backward_rows(const T* gram, const T* t, const T* lam, int64_t n, T inv_tau, T gap,
                   const T* lse, const T* grad_lse, const T* grad_pos, T* real_coef,
                   T* mix_coef) {
  at::parallel_for(0, n, grain(n), [&](int64_t begin, int64_t end) {
    MixPosSides<T> sides;
    std::vector<T> upper_acc;
    for (int64_t i = begin; i < end; ++i) {
      const Anchor<T> a = anchor(gram, lam, t, n, i, inv_tau);
      const T g_lse = grad_lse[i], g_pos = grad_pos[i], row_lse = lse[i];
      T* real_row = real_coef + i * n;
      T* mix_row = mix_coef + i * n;
      real_row[i] = T(0);
      std::fill(mix_row, mix_row + n, T(0));
      // d/d logit of a term: g_lse·(its weighted softmax share) + g_pos·[positive]
      T self_coef = 0;
      for (int64_t c = 0; c < n; ++c) {
        if (c == i) continue;
        const T l = a.real_logit(c);
        const T coef = g_lse * a.real_weight(c) * exp_approx(l - row_lse) +
                       (t[c] == a.ti ? g_pos : T(0));
        real_row[c] = coef * inv_tau;
        if (a.has_mix_neg(c)) {
          const T neg = g_lse * a.mix_neg_weight(c) * exp_approx(a.mix_neg_logit(c) - row_lse);
          self_coef += neg * a.lam_row[c];
          mix_row[c] += neg * (T(1) - a.lam_row[c]) * inv_tau;
        }
      }
      mix_row[i] += self_coef * inv_tau;

      sides.gather(a.g_row, t, n, a.ti, gap);
      const int64_t n_upper = static_cast<int64_t>(sides.upper.size());
      upper_acc.assign(n_upper, T(0));
      const T* up_dot = sides.upper_dot.data();
      const T* up_t = sides.upper_t.data();
      T* up_acc = upper_acc.data();
      for (size_t jj = 0; jj < sides.lower.size(); ++jj) {
        const T gj = sides.lower_dot[jj], tj = sides.lower_t[jj];
        T lower_acc = 0;
        for (int64_t kk = 0; kk < n_upper; ++kk) {
          const T alpha = mix_pos_alpha(a.ti, tj, up_t[kk]);
          const T l = (alpha * gj + (T(1) - alpha) * up_dot[kk]) * inv_tau;
          const T coef = g_lse * exp_approx(l - row_lse) + g_pos;
          lower_acc += coef * alpha;
          up_acc[kk] += coef * (T(1) - alpha);
        }
        mix_row[sides.lower[jj]] += lower_acc * inv_tau;
      }
      for (int64_t kk = 0; kk < n_upper; ++kk) mix_row[sides.upper[kk]] += up_acc[kk] * inv_tau;
    }
  });
}

void check_inputs(const char* op, const Tensor& gram, const Tensor& labels, const Tensor& lam,
                  const Tensor& scale) {
  const auto dtype = gram.scalar_type();
  TORCH_CHECK(gram.device().is_cpu() && gram.dim() == 2 && gram.size(0) == gram.size(1) &&
                  (dtype == at::kFloat || dtype == at::kDouble),
              op, ": gram must be an (n, n) float32 or float64 CPU tensor, got shape ",
              gram.sizes(), " and dtype ", dtype);
  const int64_t n = gram.size(0);
  TORCH_CHECK(labels.device().is_cpu() && labels.dim() == 1 && labels.size(0) == n &&
                  labels.scalar_type() == dtype,
              op, ": labels must be a ", dtype, " CPU vector of length ", n, ", got shape ",
              labels.sizes(), " and dtype ", labels.scalar_type());
  TORCH_CHECK(lam.device().is_cpu() && lam.sizes() == gram.sizes() && lam.scalar_type() == dtype,
              op, ": lam must be an (", n, ", ", n, ") ", dtype, " CPU tensor, got shape ",
              lam.sizes(), " and dtype ", lam.scalar_type());
  TORCH_CHECK(scale.device().is_cpu() && scale.dim() == 0 && scale.scalar_type() == dtype, op,
              ": scale must be a 0-dim CPU tensor of dtype ", dtype, ", got shape ", scale.sizes(),
              " and dtype ", scale.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> supremix_fwd(const Tensor& gram, const Tensor& labels,
                                                        const Tensor& lam, const Tensor& scale,
                                                        double gap) {
  check_inputs("supremix_fwd", gram, labels, lam, scale);
  const Tensor g = gram.contiguous(), t = labels.contiguous(), l = lam.contiguous();
  const int64_t n = g.size(0);
  Tensor lse = at::empty({n}, g.options());
  Tensor pos_sum = at::empty({n}, g.options());
  Tensor pos_count = at::empty({n}, g.options());
  Tensor mean_logit = at::empty({n}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "supremix_fwd", [&] {
    forward_rows<scalar_t>(g.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                           n, scale.item<scalar_t>(), static_cast<scalar_t>(gap),
                           lse.data_ptr<scalar_t>(), pos_sum.data_ptr<scalar_t>(),
                           pos_count.data_ptr<scalar_t>(), mean_logit.data_ptr<scalar_t>());
  });
  return {lse, pos_sum, pos_count, mean_logit};
}

std::tuple<Tensor, Tensor> supremix_bwd(const Tensor& gram, const Tensor& labels, const Tensor& lam,
                                        const Tensor& scale, double gap, const Tensor& lse,
                                        const Tensor& grad_lse, const Tensor& grad_pos) {
  constexpr const char* op = "supremix_bwd";
  check_inputs(op, gram, labels, lam, scale);
  const int64_t n = gram.size(0);
  check_stats_vector(op, "lse", lse, n, gram.scalar_type());
  check_stats_vector(op, "grad_lse", grad_lse, n, gram.scalar_type());
  check_stats_vector(op, "grad_pos", grad_pos, n, gram.scalar_type());
  const Tensor g = gram.contiguous(), t = labels.contiguous(), l = lam.contiguous();
  // Every entry is written by its anchor's task (no separate zero fill).
  Tensor real_coef = at::empty({n, n}, g.options());
  Tensor mix_coef = at::empty({n, n}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "supremix_bwd", [&] {
    backward_rows<scalar_t>(g.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(),
                            n, scale.item<scalar_t>(), static_cast<scalar_t>(gap),
                            lse.data_ptr<scalar_t>(), grad_lse.data_ptr<scalar_t>(),
                            grad_pos.data_ptr<scalar_t>(), real_coef.data_ptr<scalar_t>(),
                            mix_coef.data_ptr<scalar_t>());
  });
  return {real_coef, mix_coef};
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def("supremix_fwd(Tensor gram, Tensor labels, Tensor lam, Tensor scale, float gap)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("supremix_bwd(Tensor gram, Tensor labels, Tensor lam, Tensor scale, float gap,"
        " Tensor lse, Tensor grad_lse, Tensor grad_pos) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("supremix_fwd", &pyclloss::cpu::supremix_fwd);
  m.impl("supremix_bwd", &pyclloss::cpu::supremix_bwd);
}
