// Rank-N-Contrast, per anchor in O(n log n) from the similarity row s_i· and
// the label-distance row d_i· (both n×n inputs, built by GEMM/elementwise
// ops beforehand).
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

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

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

void check_inputs(const Tensor& s, const Tensor& d) {
  TORCH_CHECK(s.dim() == 2 && s.size(0) == s.size(1), "rnc: s must be (n, n)");
  TORCH_CHECK(d.sizes() == s.sizes(), "rnc: d must have the shape of s");
  TORCH_CHECK(d.scalar_type() == s.scalar_type(), "rnc: s and d must share one dtype");
}

Tensor rnc_fwd(const Tensor& sim, const Tensor& dist) {
  check_inputs(sim, dist);
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
  check_inputs(sim, dist);
  const Tensor s = sim.contiguous(), d = dist.contiguous(), g = grad_rows.contiguous();
  const int64_t n = s.size(0);
  Tensor grad_s = at::empty({n, n}, s.options());  // every entry written below
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rnc_bwd", [&] {
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* d_ptr = d.data_ptr<scalar_t>();
    const scalar_t* g_ptr = g.data_ptr<scalar_t>();
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

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def("rnc_fwd(Tensor sim, Tensor dist) -> Tensor");
  m.def("rnc_bwd(Tensor sim, Tensor dist, Tensor grad_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("rnc_fwd", &pyclloss::cpu::rnc_fwd);
  m.impl("rnc_bwd", &pyclloss::cpu::rnc_bwd);
}
