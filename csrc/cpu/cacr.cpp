// CACR's repulsion (contrastive attraction and repulsion, Zheng et al.): per
// anchor row a_i against the other view's rows b_j, j ≠ i + offset,
//
//   d_ij = ‖a_i − b_j‖²,  w_ij = softmax_j(−τ·d_ij),  mean_i = Σ_j w_ij·d_ij
//
// forward   one pass over tiles of b with an online softmax: running max of
//           −τ·d, Σ e^(−τd − max) and Σ e^(−τd − max)·d; out: mean_i and the
//           log-sum-exp lse_i of −τ·d_i·.
// backward  recomputes each tile from (mean, lse): with g_i = ∂L/∂mean_i,
//           G_ij = g_i·∂mean_i/∂d_ij = g_i·w_ij·(1 − τ·(d_ij − mean_i))
//           (the weights' Jacobian included), and ∂d_ij/∂a_i = 2(a_i − b_j):
//             grad a_i = 2·(Σ_j G_ij·a_i − Σ_j G_ij·b_j)
//             grad b_j = 2·(Σ_i G_ij·b_j − Σ_i G_ij·a_i)
//           (near pairs from their differences, below), one pass over
//           blocks of a for grad a and one over blocks of b for
//           grad b, each block written by one task: results do not depend on
//           the number of threads, and no n×m buffer exists.
//
// Distances come from the GEMM form |a|² + |b|² − 2a·b, whose absolute error
// is a few ε·(|a|² + |b|²): fine for far pairs, but a near pair (d small next
// to the norms: near-duplicates, rows far from the origin) would lose its
// distance to cancellation. Such entries are recomputed from the differences
// themselves, where the difference of two close floats is exact.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "pyclloss/cpu_args.h"
#include "pyclloss/cpu_math.h"
#include "pyclloss/cpu_schedule.h"
#include "pyclloss/cpu_tile.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 64;   // rows of a tile, one task per block in each pass
constexpr int64_t kColBlock = 256;  // columns of a tile, streamed

// A GEMM-form distance below this fraction of |x|² + |y|² is recomputed from
// the differences: above it, the form's relative error is a few dozen ε.
constexpr double kNearFraction = 0.125;

// One operand: its rows (n x d), their squared norms, and the transpose in
// blocks of kColBlock rows that a tile product reads as its right operand.
template <typename T>
struct Rows {
  const T* data;
  const T* blocked_t;
  const T* sq_norms;
  int64_t n;
  int64_t d;
};

struct RowsStorage {
  Tensor rows, blocked_t, sq_norms;

  explicit RowsStorage(const Tensor& x)
      : rows(x.contiguous()),
        blocked_t(transposed_blocks(rows, kColBlock)),
        sq_norms(rows.square().sum(1)) {}

  template <typename T>
  Rows<T> view() const {
    return {rows.data_ptr<T>(), blocked_t.data_ptr<T>(), sq_norms.data_ptr<T>(), rows.size(0),
            rows.size(1)};
  }
};

template <typename T>
PYCLLOSS_VECTOR_CLONES T direct_distance(const T* x, const T* y, int64_t d) {
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t e = 0; e < d; ++e) {
    const T diff = x[e] - y[e];
    sq += diff * diff;
  }
  return sq;
}

// A tile row of dot products x·y_c becomes |x|² + |y_c|² − 2·x·y_c in place;
// returns whether any entry is near (below kNearFraction of the norms).
template <typename T>
PYCLLOSS_VECTOR_CLONES bool gemm_distances(T* row, T x_sq, const T* y_sq, int64_t cols) {
  int64_t near = 0;
#pragma omp simd reduction(+ : near)
  for (int64_t c = 0; c < cols; ++c) {
    const T norms = x_sq + y_sq[c];
    const T dist = norms - T(2) * row[c];
    near += dist < T(kNearFraction) * norms;
    row[c] = dist;
  }
  return near > 0;
}

// tile (rows x cols) = ‖x_{x0+r} − y_{y0+c}‖², accurate for near pairs; the
// entries recomputed from the differences are appended to `near` if given.
template <typename T>
void distance_tile(const Rows<T>& x, const Rows<T>& y, int64_t x0, int64_t rows, int64_t y0,
                   int64_t cols, T* tile, std::vector<int64_t>* near = nullptr) {
  const int64_t d = x.d;
  matmul(rows, cols, d, x.data + x0 * d, d, y.blocked_t + y0 * d, cols, tile, cols, false);
  const T* y_sq = y.sq_norms + y0;
  for (int64_t r = 0; r < rows; ++r) {
    const T x_sq = x.sq_norms[x0 + r];
    T* out = tile + r * cols;
    if (!gemm_distances(out, x_sq, y_sq, cols)) continue;
    for (int64_t c = 0; c < cols; ++c) {
      if (out[c] < T(kNearFraction) * (x_sq + y_sq[c])) {
        out[c] = direct_distance(x.data + (x0 + r) * d, y.data + (y0 + c) * d, d);
        if (near != nullptr) near->push_back(r * cols + c);
      }
    }
  }
}

// out += coef·(x − y): a near pair's gradient from its difference, which the
// GEMM form Σ G·x − G·y would lose to cancellation like the distance itself.
template <typename T>
PYCLLOSS_VECTOR_CLONES void add_difference(T coef, const T* x, const T* y, int64_t d, T* out) {
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) out[e] += coef * (x[e] - y[e]);
}

// The smallest distance of a tile row, column `self` left out (inf if none).
template <typename T>
PYCLLOSS_VECTOR_CLONES T row_min(const T* dist, int64_t cols, int64_t self) {
  T least = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : least)
  for (int64_t c = 0; c < cols; ++c) least = std::min(least, c == self ? least : dist[c]);
  return least;
}

// Σ_c e^(−τ·d_c − shift) and Σ_c e^(−τ·d_c − shift)·d_c over a tile row,
// column `self` (the anchor's own row, if in this tile) left out.
template <typename T>
PYCLLOSS_VECTOR_CLONES std::pair<T, T> row_sums(const T* dist, int64_t cols, int64_t self, T tau,
                                                T shift) {
  T sum = 0, weighted = 0;
#pragma omp simd reduction(+ : sum, weighted)
  for (int64_t c = 0; c < cols; ++c) {
    const T e = c == self ? T(0) : exp_approx(-tau * dist[c] - shift);
    sum += e;
    weighted += e * dist[c];
  }
  return {sum, weighted};
}

void check_operands(const char* op, const Tensor& anchors, const Tensor& others, int64_t offset) {
  TORCH_CHECK(anchors.device().is_cpu() && anchors.dim() == 2 &&
                  (anchors.scalar_type() == at::kFloat || anchors.scalar_type() == at::kDouble),
              op, ": anchors must be a 2-D float32 or float64 CPU tensor, got shape ",
              anchors.sizes(), " and dtype ", anchors.scalar_type());
  TORCH_CHECK(others.device().is_cpu() && others.dim() == 2 &&
                  others.size(1) == anchors.size(1) &&
                  others.scalar_type() == anchors.scalar_type(),
              op, ": others must be a 2-D CPU tensor of the anchors' dtype ",
              anchors.scalar_type(), " and feature size ", anchors.size(1), ", got shape ",
              others.sizes(), " and dtype ", others.scalar_type());
  TORCH_CHECK(others.size(0) >= 2 && offset >= 0 && offset + anchors.size(0) <= others.size(0),
              op, ": anchor i pairs with others' row i + offset, so offset (", offset,
              ") + anchors (", anchors.size(0), ") must be <= others (", others.size(0),
              ") and others needs at least 2 rows");
}

std::tuple<Tensor, Tensor> cacr_repulsion_fwd(const Tensor& anchors, const Tensor& others,
                                               double temperature, int64_t offset) {
  check_operands("cacr_repulsion_fwd", anchors, others, offset);
  const int64_t n = anchors.size(0);
  Tensor mean = at::empty({n}, anchors.options());
  Tensor lse = at::empty({n}, anchors.options());
  if (n == 0) return {mean, lse};
  const RowsStorage a_storage(anchors), b_storage(others);
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), "cacr_repulsion_fwd", [&] {
    using T = scalar_t;
    const Rows<T> a = a_storage.view<T>(), b = b_storage.view<T>();
    const T tau = static_cast<T>(temperature);
    T* mean_out = mean.data_ptr<T>();
    T* lse_out = lse.data_ptr<T>();
    run_tasks(
        num_blocks(n, kRowBlock), [] { return std::vector<T>(kRowBlock * kColBlock); },
        [&](std::vector<T>& tile, int64_t block) {
          const int64_t i0 = block * kRowBlock, rows = std::min(kRowBlock, n - i0);
          T run_max[kRowBlock], run_sum[kRowBlock], run_dist[kRowBlock];
          std::fill(run_max, run_max + rows, kNegInf<T>);
          std::fill(run_sum, run_sum + rows, T(0));
          std::fill(run_dist, run_dist + rows, T(0));
          for (int64_t j0 = 0; j0 < b.n; j0 += kColBlock) {
            const int64_t cols = std::min(kColBlock, b.n - j0);
            distance_tile(a, b, i0, rows, j0, cols, tile.data());
            for (int64_t r = 0; r < rows; ++r) {
              T* dist = tile.data() + r * cols;
              const int64_t self = i0 + r + offset - j0;  // column of the excluded row
              const T least = row_min(dist, cols, self);
              const T tile_max = least == std::numeric_limits<T>::infinity() ? kNegInf<T>
                                                                              : -tau * least;
              const T new_max = std::max(run_max[r], tile_max);
              if (new_max == kNegInf<T>) continue;  // only the excluded column so far
              const T rescale = rescale_factor(run_max[r], new_max);
              const auto [sum, weighted] = row_sums(dist, cols, self, tau, new_max);
              run_sum[r] = run_sum[r] * rescale + sum;
              run_dist[r] = run_dist[r] * rescale + weighted;
              run_max[r] = new_max;
            }
          }
          for (int64_t r = 0; r < rows; ++r) {
            mean_out[i0 + r] = run_dist[r] / run_sum[r];
            lse_out[i0 + r] = run_max[r] + std::log(run_sum[r]);
          }
        });
  });
  return {mean, lse};
}

// G = g·w·(1 − τ·(d − mean)), w = e^(−τ·d − lse), over a tile row of
// distances d (in place, column `self` set to 0); the anchor's statistics
// are scalars (stride 0) or one per column (stride 1).
template <typename T>
PYCLLOSS_VECTOR_CLONES void coefficients(T* dist, int64_t cols, int64_t self, T tau,
                                         const T* mean, const T* lse, const T* grad,
                                         int64_t stride) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t s = c * stride;
    const T d = dist[c];
    const T g = grad[s] * exp_approx(-tau * d - lse[s]) * (T(1) - tau * (d - mean[s]));
    dist[c] = c == self ? T(0) : g;
  }
}

template <typename T>
PYCLLOSS_VECTOR_CLONES T row_total(const T* row, int64_t cols) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < cols; ++c) total += row[c];
  return total;
}

// Per-anchor statistics of the forward and the incoming gradient.
template <typename T>
struct AnchorStats {
  const T* mean;
  const T* lse;
  const T* grad;
  T tau;

  // A tile row of anchor i against rows of the others.
  void row(T* dist, int64_t cols, int64_t self, int64_t i) const {
    coefficients(dist, cols, self, tau, mean + i, lse + i, grad + i, 0);
  }

  // A tile row of one of the others against the anchors [i0, i0 + cols).
  void column(T* dist, int64_t cols, int64_t self, int64_t i0) const {
    coefficients(dist, cols, self, tau, mean + i0, lse + i0, grad + i0, 1);
  }
};

template <typename T>
struct GradientBuffers {
  std::vector<T> tile, grad_sum, coef_sum, near_sum;
  std::vector<int64_t> near;
};

// grad outer_p = 2·Σ_q G_pq·(outer_p − inner_q), one task per block of outer
// rows: as 2·(Σ_q G_pq·outer_p − G·inner) for far pairs (a GEMM), from the
// differences for near ones. The anchors are the outer rows (grad a) or the
// inner rows (grad b); anchor i pairs with row i + offset of the others.
template <typename T, bool kAnchorsOuter>
void gradient_pass(const Rows<T>& outer, const Rows<T>& inner, const AnchorStats<T>& stats,
                   int64_t offset, T* grad_out) {
  const int64_t d = outer.d;
  run_tasks(
      num_blocks(outer.n, kRowBlock),
      [d] {
        return GradientBuffers<T>{std::vector<T>(kRowBlock * kColBlock),
                                  std::vector<T>(kRowBlock * d), std::vector<T>(kRowBlock),
                                  std::vector<T>(kRowBlock * d), {}};
      },
      [&](GradientBuffers<T>& buffers, int64_t block) {
        const int64_t p0 = block * kRowBlock, rows = std::min(kRowBlock, outer.n - p0);
        T* tile = buffers.tile.data();
        T* grad_sum = buffers.grad_sum.data();
        T* coef_sum = buffers.coef_sum.data();
        T* near_sum = buffers.near_sum.data();
        std::fill(grad_sum, grad_sum + rows * d, T(0));
        std::fill(near_sum, near_sum + rows * d, T(0));
        std::fill(coef_sum, coef_sum + rows, T(0));
        for (int64_t q0 = 0; q0 < inner.n; q0 += kColBlock) {
          const int64_t cols = std::min(kColBlock, inner.n - q0);
          buffers.near.clear();
          distance_tile(outer, inner, p0, rows, q0, cols, tile, &buffers.near);
          for (int64_t r = 0; r < rows; ++r) {
            // the excluded column: anchor i = p pairs with q = p + offset;
            // anchor i = q with p = q + offset
            const int64_t self = kAnchorsOuter ? p0 + r + offset - q0 : p0 + r - offset - q0;
            if constexpr (kAnchorsOuter) {
              stats.row(tile + r * cols, cols, self, p0 + r);
            } else {
              stats.column(tile + r * cols, cols, self, q0);
            }
          }
          for (const int64_t entry : buffers.near) {
            const int64_t r = entry / cols, c = entry % cols;
            add_difference(tile[entry], outer.data + (p0 + r) * d, inner.data + (q0 + c) * d, d,
                           near_sum + r * d);
            tile[entry] = T(0);  // out of the GEMM part, and of coef_sum: exactly
          }
          for (int64_t r = 0; r < rows; ++r) coef_sum[r] += row_total(tile + r * cols, cols);
          matmul(rows, d, cols, tile, cols, inner.data + q0 * d, d, grad_sum, d, true);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const T* x = outer.data + (p0 + r) * d;
          T* out = grad_out + (p0 + r) * d;
          for (int64_t e = 0; e < d; ++e)
            out[e] = T(2) * (coef_sum[r] * x[e] - grad_sum[r * d + e] + near_sum[r * d + e]);
        }
      });
}

std::tuple<Tensor, Tensor> cacr_repulsion_bwd(const Tensor& anchors, const Tensor& others,
                                               const Tensor& mean, const Tensor& lse,
                                               const Tensor& grad, double temperature,
                                               int64_t offset) {
  constexpr const char* op = "cacr_repulsion_bwd";
  check_operands(op, anchors, others, offset);
  const int64_t n = anchors.size(0);
  check_stats_vector(op, "mean", mean, n, anchors.scalar_type());
  check_stats_vector(op, "lse", lse, n, anchors.scalar_type());
  check_stats_vector(op, "grad", grad, n, anchors.scalar_type());
  Tensor grad_a = at::empty_like(anchors, at::MemoryFormat::Contiguous);
  Tensor grad_b = at::zeros_like(others, at::MemoryFormat::Contiguous);  // all of it when n = 0
  if (n == 0) return {grad_a, grad_b};
  const RowsStorage a_storage(anchors), b_storage(others);
  AT_DISPATCH_FLOATING_TYPES(anchors.scalar_type(), op, [&] {
    using T = scalar_t;
    const Rows<T> a = a_storage.view<T>(), b = b_storage.view<T>();
    const AnchorStats<T> stats{mean.data_ptr<T>(), lse.data_ptr<T>(), grad.data_ptr<T>(),
                               static_cast<T>(temperature)};
    gradient_pass<T, true>(a, b, stats, offset, grad_a.data_ptr<T>());
    gradient_pass<T, false>(b, a, stats, offset, grad_b.data_ptr<T>());
  });
  return {grad_a, grad_b};
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def("cacr_repulsion_fwd(Tensor anchors, Tensor others, float temperature, int offset) -> "
        "(Tensor, Tensor)");
  m.def("cacr_repulsion_bwd(Tensor anchors, Tensor others, Tensor mean, Tensor lse, Tensor grad, "
        "float temperature, int offset) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("cacr_repulsion_fwd", &pyclloss::cpu::cacr_repulsion_fwd);
  m.impl("cacr_repulsion_bwd", &pyclloss::cpu::cacr_repulsion_bwd);
}
