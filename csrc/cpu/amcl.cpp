// AMCL (adaptive multi-head contrastive learning), one head: n = 2B unit rows
// z (view-major, row a's positive is p = (a + B) mod n) and the temperature
// network's outputs φ (n, h). Pair temperatures
//
//   τ_aj = τ_min + (τ_max − τ_min)·σ(−g_aj),   g_aj = φ_a·φ_j,   s_aj = z_a·z_j
//
// are only ever needed on the pairs the loss reads: the positive and the k
// negatives of largest s per row. So the n×n matrices are never stored:
//
// * amcl_topk: the k negatives (neither a nor p) of largest s per row, (n, k)
//   column indices, ties to the lower index, in no particular order. s comes
//   from GEMMs of row blocks against all rows (1 MiB of scores per block,
//   one block per task); each row then streams through the candidates above
//   its k-th best so far.
// * amcl_fwd: per row, from the k + 1 dot products of z and of φ,
//     row_a = −s_ap/τ_ap + mean_K s/τ + β·((D/2)·log τ_ap + 1/τ_ap) − β·Σ_K (log τ + 1/τ).
// * amcl_bwd: per pair (a, j) of that list, c_s = ∂row_a/∂s_aj and
//   c_g = ∂row_a/∂τ_aj · ∂τ_aj/∂g_aj (times the row's gradient); then
//   dz_a += c_s·z_j, dz_j += c_s·z_a and dφ_a += c_g·φ_j, dφ_j += c_g·φ_a.
//   The second halves go through the transposed pair list (a counting sort
//   by j), so each row's gradient is written by one thread in a fixed order:
//   the result does not depend on the number of threads. O(n·k·(D + h)).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

#include "pyclloss/cpu_args.h"
#include "pyclloss/cpu_math.h"
#include "pyclloss/cpu_schedule.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;

// Bytes of similarity rows one GEMM block of amcl_topk may use.
constexpr int64_t kScoreBudget = int64_t(1) << 20;

template <typename T>
PYCLLOSS_VECTOR_CLONES T dot(const T* x, const T* y, int64_t d) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t e = 0; e < d; ++e) acc += x[e] * y[e];
  return acc;
}

template <typename T>
PYCLLOSS_VECTOR_CLONES void axpy(T alpha, const T* x, T* y, int64_t d) {
#pragma omp simd
  for (int64_t e = 0; e < d; ++e) y[e] += alpha * x[e];
}

int64_t partner(int64_t a, int64_t n) { return (a + n / 2) % n; }

// body(begin, end) over blocks of 64 rows, handed out one at a time.
template <typename Body>
void for_row_blocks(int64_t n, const Body& body) {
  constexpr int64_t rows = 64;
  run_tasks((n + rows - 1) / rows, [] { return 0; }, [&](int /*no state*/, int64_t block) {
    body(block * rows, std::min(n, (block + 1) * rows));
  });
}

// The loss's hyper-parameters and the pair temperature with its derivative.
struct Params {
  double tau_min, tau_max, beta;

  template <typename T>
  T tau(T g, T* dtau_dg) const {
    const T sig = sigmoid(-g);
    const T span = static_cast<T>(tau_max - tau_min);
    *dtau_dg = -span * sig * (T(1) - sig);
    return static_cast<T>(tau_min) + span * sig;
  }
};

void check_rows(const char* op, const Tensor& z) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.size(0) >= 4 && z.size(0) % 2 == 0 &&
                  (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble),
              op, ": z must be a (2B, D) float32 or float64 CPU tensor with B >= 2, got shape ",
              z.sizes(), " and dtype ", z.scalar_type());
}

void check_pairs(const char* op, const Tensor& z, const Tensor& phi, const Tensor& idx) {
  check_rows(op, z);
  const int64_t n = z.size(0);
  TORCH_CHECK(phi.device().is_cpu() && phi.dim() == 2 && phi.size(0) == n &&
                  phi.scalar_type() == z.scalar_type(),
              op, ": phi must be an (", n, ", h) CPU tensor of dtype ", z.scalar_type(),
              ", got shape ", phi.sizes(), " and dtype ", phi.scalar_type());
  TORCH_CHECK(idx.device().is_cpu() && idx.dim() == 2 && idx.size(0) == n && idx.size(1) >= 1 &&
                  idx.size(1) <= n - 2 && idx.scalar_type() == at::kLong,
              op, ": idx must be an (", n, ", k) int64 CPU tensor with 1 <= k <= ", n - 2,
              ", got shape ", idx.sizes(), " and dtype ", idx.scalar_type());
  const auto [lo, hi] = at::aminmax(idx);  // the kernels read rows idx[a, c]
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, op,
              ": idx must hold row indices in [0, ", n, "), got [", lo.item<int64_t>(), ", ",
              hi.item<int64_t>(), "]");
}

// One row's k best columns j ∉ {a, p} by s, ties to the lower column (in no
// particular order: the loss does not depend on it).
template <typename T>
class RowTopK {
 public:
  explicit RowTopK(int64_t k) : k_(k) { best_.reserve(2 * k); }

  void select(const T* s_a, int64_t n, int64_t a, int64_t p, int64_t* out) {
    const int64_t stride = n / (4 * k_);
    if (stride < 2 || !scan(s_a, n, a, p, lower_bar(s_a, n, a, p, stride)))
      scan(s_a, n, a, p, kNegInf<T>);
    for (int64_t c = 0; c < k_; ++c) out[c] = best_[c].second;
  }

 private:
  static bool before(const std::pair<T, int64_t>& x, const std::pair<T, int64_t>& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  }

  // Just below the value of rank about 2k in the row, estimated from every
  // stride-th column: almost always below the k-th best, so that the scan
  // starts with a bar that lets few columns through.
  T lower_bar(const T* s_a, int64_t n, int64_t a, int64_t p, int64_t stride) {
    sample_.clear();
    for (int64_t j = 0; j < n; j += stride)
      if (j != a && j != p) sample_.push_back(s_a[j]);
    const int64_t rank = std::min<int64_t>(static_cast<int64_t>(sample_.size()),
                                           2 * k_ / stride + 1);
    std::nth_element(sample_.begin(), sample_.begin() + (rank - 1), sample_.end(),
                     std::greater<T>());
    return std::nextafter(sample_[rank - 1], kNegInf<T>);
  }

  // Keeps the candidates above the bar; when 2k have gathered, a partial
  // selection keeps the best k and raises the bar to the k-th. Columns come
  // in ascending order, so a later one equal to the bar ranks below it. False
  // when fewer than k columns passed the starting bar (then it was too high).
  bool scan(const T* s_a, int64_t n, int64_t a, int64_t p, T bar) {
    best_.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (!(s_a[j] > bar) || j == a || j == p) continue;
      best_.emplace_back(s_a[j], j);
      if (static_cast<int64_t>(best_.size()) == 2 * k_) {
        keep_best();
        bar = best_[k_ - 1].first;
      }
    }
    if (static_cast<int64_t>(best_.size()) > k_) keep_best();
    return static_cast<int64_t>(best_.size()) == k_;
  }

  void keep_best() {
    std::nth_element(best_.begin(), best_.begin() + (k_ - 1), best_.end(), before);
    best_.resize(k_);
  }

  int64_t k_;
  std::vector<std::pair<T, int64_t>> best_;
  std::vector<T> sample_;
};

Tensor amcl_topk(const Tensor& z_in, int64_t k) {
  check_rows("amcl_topk", z_in);
  const Tensor z = z_in.contiguous();
  const int64_t n = z.size(0);
  TORCH_CHECK(k >= 1 && k <= n - 2, "amcl_topk: k must be in [1, ", n - 2, "], got ", k);
  Tensor idx = at::empty({n, k}, z.options().dtype(at::kLong));
  int64_t* out = idx.data_ptr<int64_t>();
  // Each task: the GEMM of a block of rows against all rows (single-threaded
  // inside the parallel region), then the selection on its rows. Tasks are
  // handed out one at a time, so a thread slowed by another process takes fewer.
  const int64_t block = std::clamp<int64_t>(kScoreBudget / (n * z.element_size()), 1, n);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "amcl_topk", [&] {
    run_tasks((n + block - 1) / block, [&] { return RowTopK<scalar_t>(k); },
              [&](RowTopK<scalar_t>& row, int64_t b) {
                const int64_t r0 = b * block, r1 = std::min(n, r0 + block);
                const Tensor scores = at::mm(z.slice(0, r0, r1), z.t()).contiguous();
                const scalar_t* s = scores.data_ptr<scalar_t>();
                for (int64_t a = r0; a < r1; ++a)
                  row.select(s + (a - r0) * n, n, a, partner(a, n), out + a * k);
              });
  });
  return idx;
}

Tensor amcl_fwd(const Tensor& z_in, const Tensor& phi_in, const Tensor& idx_in, double tau_min,
                double tau_max, double beta) {
  check_pairs("amcl_fwd", z_in, phi_in, idx_in);
  const Tensor z = z_in.contiguous(), phi = phi_in.contiguous(), idx = idx_in.contiguous();
  const int64_t n = z.size(0), d = z.size(1), h = phi.size(1), k = idx.size(1);
  const Params prm{tau_min, tau_max, beta};
  Tensor rows = at::empty({n}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "amcl_fwd", [&] {
    using T = scalar_t;
    const T* zp = z.data_ptr<T>();
    const T* fp = phi.data_ptr<T>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    T* out = rows.data_ptr<T>();
    const T b = static_cast<T>(beta);
    for_row_blocks(n, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        const T *za = zp + a * d, *fa = fp + a * h;
        const int64_t p = partner(a, n);
        T unused;
        const T tau_p = prm.tau(dot(fa, fp + p * h, h), &unused);
        T neg = 0, reg = 0;
        for (int64_t c = 0; c < k; ++c) {
          const int64_t j = ip[a * k + c];
          const T tau = prm.tau(dot(fa, fp + j * h, h), &unused);
          neg += dot(za, zp + j * d, d) / tau;
          reg += std::log(tau) + T(1) / tau;
        }
        out[a] = -dot(za, zp + p * d, d) / tau_p + neg / static_cast<T>(k) +
                 b * (static_cast<T>(d) / 2 * std::log(tau_p) + T(1) / tau_p) - b * reg;
      }
    });
  });
  return rows;
}

std::tuple<Tensor, Tensor> amcl_bwd(const Tensor& z_in, const Tensor& phi_in,
                                    const Tensor& idx_in, const Tensor& grad_rows,
                                    double tau_min, double tau_max, double beta) {
  check_pairs("amcl_bwd", z_in, phi_in, idx_in);
  const Tensor z = z_in.contiguous(), phi = phi_in.contiguous(), idx = idx_in.contiguous();
  const int64_t n = z.size(0), d = z.size(1), h = phi.size(1), k = idx.size(1);
  check_stats_vector("amcl_bwd", "grad_rows", grad_rows, n, z.scalar_type());
  const Params prm{tau_min, tau_max, beta};
  const int64_t width = k + 1;  // column 0: the positive
  Tensor dz = at::empty_like(z), dphi = at::empty_like(phi);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "amcl_bwd", [&] {
    using T = scalar_t;
    const T* zp = z.data_ptr<T>();
    const T* fp = phi.data_ptr<T>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const T* gp = grad_rows.data_ptr<T>();
    T* dzp = dz.data_ptr<T>();
    T* dfp = dphi.data_ptr<T>();
    const T b = static_cast<T>(beta), inv_k = T(1) / static_cast<T>(k);
    std::vector<T> cs(n * width), cg(n * width);
    const auto column = [&](int64_t a, int64_t c) {
      return c == 0 ? partner(a, n) : ip[a * k + c - 1];
    };
    // Row a's own half: the coefficients, and dz_a, dφ_a from the rows it reads.
    for_row_blocks(n, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        const T *za = zp + a * d, *fa = fp + a * h;
        T *dza = dzp + a * d, *dfa = dfp + a * h;
        std::fill(dza, dza + d, T(0));
        std::fill(dfa, dfa + h, T(0));
        for (int64_t c = 0; c < width; ++c) {
          const int64_t j = column(a, c);
          T dtau_dg;
          const T tau = prm.tau(dot(fa, fp + j * h, h), &dtau_dg);
          const T s = dot(za, zp + j * d, d), inv = T(1) / tau;
          T ds, dtau;
          if (c == 0) {
            ds = -inv;
            dtau = s * inv * inv + b * (static_cast<T>(d) / 2 * inv - inv * inv);
          } else {
            ds = inv_k * inv;
            dtau = -inv_k * s * inv * inv - b * (inv - inv * inv);
          }
          cs[a * width + c] = gp[a] * ds;
          cg[a * width + c] = gp[a] * dtau * dtau_dg;
          axpy(cs[a * width + c], zp + j * d, dza, d);
          axpy(cg[a * width + c], fp + j * h, dfa, h);
        }
      }
    });
    // The other half, row j's pairs (a, j) gathered by a counting sort by j.
    std::vector<int64_t> start(n + 1, 0), entry(n * width);
    for (int64_t e = 0; e < n * width; ++e) ++start[column(e / width, e % width) + 1];
    for (int64_t j = 0; j < n; ++j) start[j + 1] += start[j];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < n * width; ++e) entry[fill[column(e / width, e % width)]++] = e;
    for_row_blocks(n, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j)
        for (int64_t q = start[j]; q < start[j + 1]; ++q) {
          const int64_t e = entry[q], a = e / width;
          axpy(cs[e], zp + a * d, dzp + j * d, d);
          axpy(cg[e], fp + a * h, dfp + j * h, h);
        }
    });
  });
  return {dz, dphi};
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def("amcl_topk(Tensor z, int k) -> Tensor");
  m.def("amcl_fwd(Tensor z, Tensor phi, Tensor idx, float tau_min, float tau_max, float beta) "
        "-> Tensor");
  m.def("amcl_bwd(Tensor z, Tensor phi, Tensor idx, Tensor grad_rows, float tau_min, "
        "float tau_max, float beta) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("amcl_topk", &pyclloss::cpu::amcl_topk);
  m.impl("amcl_fwd", &pyclloss::cpu::amcl_fwd);
  m.impl("amcl_bwd", &pyclloss::cpu::amcl_bwd);
}
