// Rank-N-Contrast, per anchor in O(n log n) from the similarity row s_i· and
// the label-distance row d_i· (both n×n inputs), and the feature distances
// ‖v_i − v_j‖₂ that s is made of.
//
// The denominator of the pair (i, j) runs over {k ≠ i : d_ik ≥ d_ij}. With
// the other samples sorted by d_ik descending, that set is a prefix that
// ends with the whole tie group of j, so one running log-sum-exp over the
// sorted row, read at the end of each tie group, gives every denominator:
//
//   forward   row_i = Σ_{j≠i} [logD_g(j) − s_ij]
//   backward  d row_i / d s_ik = exp(s_ik) · Σ_{groups g: d_g ≤ d_ik} n_g / D_g − 1
//
// The backward's sum runs over the groups in ascending d, kept in log space
// (each term exp(s_ik − logD_g) <= 1, so nothing overflows). Each anchor
// writes only its own row: results do not depend on the number of threads.
//
// The feature distances are sums of squared differences, never the GEMM form
// |v_i|² + |v_j|² − 2·v_i·v_j: that form loses a distance small next to the
// rows' norms to cancellation (rows far from the origin, near-duplicates),
// while the difference of two close floats is exact. Their backward,
// grad_i = Σ_j w_ij (v_i − v_j), takes the differences directly too.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "pyclloss/cpu_args.h"
#include "pyclloss/cpu_math.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;

template <typename T>
inline T log_add_exp(T a, T b) {
  const T hi = std::max(a, b);
  if (hi == kNegInf<T>) return hi;
  return hi + std::log1p(std::exp(std::min(a, b) - hi));
}

// One anchor's other samples sorted by label distance, descending, split into
// tie groups, with the log-denominator of every group.
template <typename T>
struct SortedAnchor {
  std::vector<std::pair<T, int64_t>> order;  // (d_ik, k), k ≠ i
  std::vector<int64_t> group_end;             // exclusive end of each group in order
  std::vector<T> group_log_den;

  void build(const T* s_row, const T* d_row, int64_t n, int64_t i) {
    order.clear(), group_end.clear(), group_log_den.clear();
    for (int64_t k = 0; k < n; ++k)
      if (k != i) order.emplace_back(d_row[k], k);
    std::sort(order.begin(), order.end(),
              [](const auto& a, const auto& b) { return a.first > b.first; });
    T run_max = kNegInf<T>, run_sum = 0;
    const int64_t m = static_cast<int64_t>(order.size());
    for (int64_t start = 0; start < m;) {
      int64_t end = start;
      T group_max = kNegInf<T>;
      while (end < m && order[end].first == order[start].first)
        group_max = std::max(group_max, s_row[order[end++].second]);
      if (group_max > run_max) {
        run_sum *= std::exp(run_max - group_max);
        run_max = group_max;
      }
      for (int64_t p = start; p < end; ++p) run_sum += std::exp(s_row[order[p].second] - run_max);
      group_end.push_back(end);
      group_log_den.push_back(run_max + std::log(run_sum));
      start = end;
    }
  }

  int64_t group_begin(size_t g) const { return g == 0 ? 0 : group_end[g - 1]; }
};

int64_t grain(int64_t n) { return std::max<int64_t>(1, 2048 / std::max<int64_t>(n, 1)); }

void check_inputs(const char* op, const Tensor& s, const Tensor& d) {
  TORCH_CHECK(s.device().is_cpu() && s.dim() == 2 && s.size(0) == s.size(1) &&
                  (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              op, ": sim must be an (n, n) float32 or float64 CPU tensor, got shape ", s.sizes(),
              " and dtype ", s.scalar_type());
  TORCH_CHECK(d.device().is_cpu() && d.sizes() == s.sizes() && d.scalar_type() == s.scalar_type(),
              op, ": dist must be a CPU tensor of sim's shape ", s.sizes(), " and dtype ",
              s.scalar_type(), ", got shape ", d.sizes(), " and dtype ", d.scalar_type());
}

Tensor rnc_fwd(const Tensor& sim, const Tensor& dist) {
  check_inputs("rnc_fwd", sim, dist);
  const Tensor s = sim.contiguous(), d = dist.contiguous();
  const int64_t n = s.size(0);
  Tensor rows = at::empty({n}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rnc_fwd", [&] {
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* d_ptr = d.data_ptr<scalar_t>();
    scalar_t* out = rows.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain(n), [&](int64_t begin, int64_t end) {
      SortedAnchor<scalar_t> anchor;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* s_row = s_ptr + i * n;
        anchor.build(s_row, d_ptr + i * n, n, i);
        double total = 0;
        for (size_t g = 0; g < anchor.group_end.size(); ++g)
          for (int64_t p = anchor.group_begin(g); p < anchor.group_end[g]; ++p)
            total += anchor.group_log_den[g] - s_row[anchor.order[p].second];
        out[i] = static_cast<scalar_t>(total);
      }
    });
  });
  return rows;
}

Tensor rnc_bwd(const Tensor& sim, const Tensor& dist, const Tensor& grad_rows) {
  check_inputs("rnc_bwd", sim, dist);
  const int64_t n = sim.size(0);
  check_stats_vector("rnc_bwd", "grad_rows", grad_rows, n, sim.scalar_type());
  const Tensor s = sim.contiguous(), d = dist.contiguous();
  Tensor grad_s = at::empty({n, n}, s.options());  // every entry written below
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rnc_bwd", [&] {
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* d_ptr = d.data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad_rows.data_ptr<scalar_t>();
    scalar_t* out = grad_s.data_ptr<scalar_t>();
    at::parallel_for(0, n, grain(n), [&](int64_t begin, int64_t end) {
      SortedAnchor<scalar_t> anchor;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* s_row = s_ptr + i * n;
        anchor.build(s_row, d_ptr + i * n, n, i);
        out[i * n + i] = scalar_t(0);
        // log Σ n_g / D_g over the groups with d_g <= the current group's d
        scalar_t log_inv_den = kNegInf<scalar_t>;
        for (size_t g = anchor.group_end.size(); g-- > 0;) {
          const int64_t begin_g = anchor.group_begin(g), end_g = anchor.group_end[g];
          log_inv_den = log_add_exp(
              log_inv_den, static_cast<scalar_t>(std::log(static_cast<double>(end_g - begin_g))) -
                               anchor.group_log_den[g]);
          for (int64_t p = begin_g; p < end_g; ++p) {
            const int64_t k = anchor.order[p].second;
            out[i * n + k] = g_ptr[i] * (std::exp(s_row[k] + log_inv_den) - scalar_t(1));
          }
        }
      }
    });
  });
  return grad_s;
}

// ------------------------------------------------------- feature distances

// Anchors that share one pass over the rows (their rows stay in L1).
constexpr int64_t kAnchorBlock = 8;

int64_t anchor_blocks(int64_t n) { return (n + kAnchorBlock - 1) / kAnchorBlock; }

// dist_ij = ‖v_i − v_j‖ for the anchors [i0, i1) and every row j.
template <typename T>
PYCLLOSS_VECTOR_CLONES void distance_rows(const T* v, int64_t n, int64_t d, int64_t i0,
                                          int64_t i1, T* dist) {
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * d;
    for (int64_t i = i0; i < i1; ++i) {
      const T* vi = v + i * d;
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t e = 0; e < d; ++e) {
        const T diff = vi[e] - vj[e];
        sq += diff * diff;
      }
      dist[i * n + j] = std::sqrt(sq);
    }
  }
}

// grad_i = Σ_j w_ij (v_i − v_j) for the anchors [i0, i1).
template <typename T>
PYCLLOSS_VECTOR_CLONES void pull_rows(const T* v, const T* w, int64_t n, int64_t d, int64_t i0,
                                      int64_t i1, T* grad) {
  std::fill(grad + i0 * d, grad + i1 * d, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * d;
    for (int64_t i = i0; i < i1; ++i) {
      const T w_ij = w[i * n + j];
      if (w_ij == T(0)) continue;
      const T* vi = v + i * d;
      T* g = grad + i * d;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) g[e] += w_ij * (vi[e] - vj[e]);
    }
  }
}

void check_features(const char* op, const Tensor& v) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 2 &&
                  (v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble),
              op, ": features must be a 2-D float32 or float64 CPU tensor, got shape ", v.sizes(),
              " and dtype ", v.scalar_type());
}

Tensor distances_fwd(const Tensor& features) {
  check_features("rnc_distances_fwd", features);
  const Tensor v = features.contiguous();
  const int64_t n = v.size(0), d = v.size(1);
  Tensor dist = at::empty({n, n}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "rnc_distances_fwd", [&] {
    const scalar_t* rows = v.data_ptr<scalar_t>();
    scalar_t* out = dist.data_ptr<scalar_t>();
    at::parallel_for(0, anchor_blocks(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        distance_rows(rows, n, d, b * kAnchorBlock, std::min(n, (b + 1) * kAnchorBlock), out);
    });
  });
  return dist;
}

Tensor distances_bwd(const Tensor& features, const Tensor& weights) {
  constexpr const char* op = "rnc_distances_bwd";
  check_features(op, features);
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(weights.device().is_cpu() && weights.dim() == 2 && weights.size(0) == n &&
                  weights.size(1) == n && weights.scalar_type() == features.scalar_type(),
              op, ": weights must be an (", n, ", ", n, ") CPU tensor of dtype ",
              features.scalar_type(), ", got shape ", weights.sizes(), " and dtype ",
              weights.scalar_type());
  const Tensor v = features.contiguous(), w = weights.contiguous();
  Tensor grad = at::empty({n, d}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), op, [&] {
    const scalar_t* rows = v.data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, anchor_blocks(n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        pull_rows(rows, w_ptr, n, d, b * kAnchorBlock, std::min(n, (b + 1) * kAnchorBlock), out);
    });
  });
  return grad;
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def("rnc_fwd(Tensor sim, Tensor dist) -> Tensor");
  m.def("rnc_bwd(Tensor sim, Tensor dist, Tensor grad_rows) -> Tensor");
  m.def("rnc_distances_fwd(Tensor features) -> Tensor");
  m.def("rnc_distances_bwd(Tensor features, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("rnc_fwd", &pyclloss::cpu::rnc_fwd);
  m.impl("rnc_bwd", &pyclloss::cpu::rnc_bwd);
  m.impl("rnc_distances_fwd", &pyclloss::cpu::distances_fwd);
  m.impl("rnc_distances_bwd", &pyclloss::cpu::distances_bwd);
}
