// Differentiable sorting networks (diffsort semantics), fused per row.
//
// The network arrives as a flat list of comparators (lo, hi), layer after
// layer. Comparators of one layer touch disjoint wires, so running the list in
// order is the network and running it backwards is its reverse sweep; the
// layer boundaries are not needed here.
//
// Per row the forward keeps the values (n) and Pᵀ (n×n, wire-major so that a
// comparator mixes two contiguous rows of length n): O(n) per comparator,
// O(n²) per layer. Nothing is saved for the backward except x: the backward
// recomputes the value chain (O(n) per layer) and, for the gradient of P,
// pushes chunks of the identity forward (the rows of P layer by layer) and
// the chunk of dP backward, meeting at each comparator. Reversing P in place
// would need the inverse of the pair block [[α, 1-α], [1-α, α]], which is
// singular at α = ½.
//
// Arithmetic in double for double inputs, float otherwise (half and bfloat16
// inputs included).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Same order as DISTRIBUTIONS in pyclloss/reference/sorting.py.
enum class Relaxation : int64_t { Logistic, LogisticPhi, Gaussian, Cauchy, Reciprocal, Optimal };

constexpr double kPi = 3.14159265358979323846;
constexpr double kLogisticPhiEps = 1e-10;

// alpha = f(d) for d = b - a, and d alpha / d d.
template <typename T>
struct Relax {
  Relaxation kind;
  T steepness;
  T art_lambda;

  T alpha(T d) const {
    const T v = steepness * d;
    switch (kind) {
      case Relaxation::Logistic:
        return sigmoid(v);
      case Relaxation::LogisticPhi:
        return sigmoid(v * std::pow(std::abs(d) + T(kLogisticPhiEps), -art_lambda));
      case Relaxation::Gaussian:
        return T(0.5) * (T(1) + std::erf(v / std::sqrt(T(2))));
      case Relaxation::Cauchy:
        return std::atan(v) / T(kPi) + T(0.5);
      case Relaxation::Reciprocal:
        return T(0.5) * (v / (T(2) + std::abs(v)) + T(1));
      case Relaxation::Optimal:
        if (v > T(0.25)) return T(1) - T(1) / (T(16) * v);
        if (v < T(-0.25)) return -T(1) / (T(16) * v);
        return v + T(0.5);
    }
    return T(0.5);
  }

  T grad(T d) const {
    const T v = steepness * d;
    switch (kind) {
      case Relaxation::Logistic: {
        const T s = sigmoid(v);
        return steepness * s * (T(1) - s);
      }
      case Relaxation::LogisticPhi: {
        const T r = std::abs(d) + T(kLogisticPhiEps);
        const T scale = std::pow(r, -art_lambda);
        const T s = sigmoid(v * scale);
        return s * (T(1) - s) * steepness * scale * (T(1) - art_lambda * std::abs(d) / r);
      }
      case Relaxation::Gaussian:
        return steepness * std::exp(T(-0.5) * v * v) / std::sqrt(T(2 * kPi));
      case Relaxation::Cauchy:
        return steepness / (T(kPi) * (T(1) + v * v));
      case Relaxation::Reciprocal: {
        const T den = T(2) + std::abs(v);
        return steepness / (den * den);
      }
      case Relaxation::Optimal:
        return std::abs(v) > T(0.25) ? steepness / (T(16) * v * v) : steepness;
    }
    return T(0);
  }

 private:
  static T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }
};

struct Network {
  const int32_t* pairs;  // (comparators, 2): lo, hi
  int64_t comparators;
  int32_t lo(int64_t c) const { return pairs[2 * c]; }
  int32_t hi(int64_t c) const { return pairs[2 * c + 1]; }
};

// The comparator's 2×2 block on two rows of length len. The block is
// symmetric, so this also applies its transpose to adjoints.
template <typename T>
inline void mix_rows(T* __restrict__ lo, T* __restrict__ hi, T alpha, int64_t len) {
  const T beta = T(1) - alpha;
  for (int64_t i = 0; i < len; ++i) {
    const T a = lo[i];
    const T b = hi[i];
    lo[i] = alpha * a + beta * b;
    hi[i] = beta * a + alpha * b;
  }
}

template <typename T>
inline void mix_pair(T& lo, T& hi, T alpha) {
  const T a = lo;
  const T b = hi;
  lo = alpha * a + (T(1) - alpha) * b;
  hi = (T(1) - alpha) * a + alpha * b;
}

// The value chain of one row: runs the network on y (n, in place) and records
// per comparator alpha, d alpha / d(b - a) and the input difference a - b.
template <typename T>
void value_chain(T* y, const Network& net, const Relax<T>& f, T* alpha, T* dalpha, T* diff) {
  for (int64_t c = 0; c < net.comparators; ++c) {
    T& a = y[net.lo(c)];
    T& b = y[net.hi(c)];
    const T d = b - a;
    alpha[c] = f.alpha(d);
    if (dalpha) dalpha[c] = f.grad(d);
    if (diff) diff[c] = -d;
    mix_pair(a, b, alpha[c]);
  }
}

// Reverse sweep of the value chain: g (n) holds d sorted on entry and d x on
// exit; grad_alpha (comparators) holds the adjoint of every alpha from the
// other outputs and is consumed.
template <typename T>
void value_chain_backward(T* g, const Network& net, const T* alpha, const T* dalpha,
                          const T* diff, T* grad_alpha) {
  for (int64_t c = net.comparators - 1; c >= 0; --c) {
    T& ga = g[net.lo(c)];
    T& gb = g[net.hi(c)];
    const T adj_alpha = grad_alpha[c] + diff[c] * (ga - gb);
    mix_pair(ga, gb, alpha[c]);
    const T adj_d = adj_alpha * dalpha[c];
    gb += adj_d;
    ga -= adj_d;
  }
}

int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

Network network_of(const at::Tensor& pairs) {
  TORCH_CHECK(pairs.scalar_type() == at::kInt && pairs.dim() == 2 && pairs.size(1) == 2 &&
                  pairs.is_contiguous(),
              "comparators must be a contiguous int32 tensor of shape (C, 2)");
  return Network{pairs.data_ptr<int32_t>(), pairs.size(0)};
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous (B, n) tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point");
}

template <typename T>
Relax<T> relax_of(double steepness, int64_t distribution, double art_lambda) {
  TORCH_CHECK(distribution >= 0 && distribution <= static_cast<int64_t>(Relaxation::Optimal),
              "unknown distribution code ", distribution);
  return Relax<T>{static_cast<Relaxation>(distribution), T(steepness), T(art_lambda)};
}

// ------------------------------------------------------------------- forward

std::tuple<at::Tensor, at::Tensor> diff_sort_fwd(const at::Tensor& x, const at::Tensor& pairs,
                                                 double steepness, int64_t distribution,
                                                 double art_lambda) {
  check_rows(x, "x");
  const Network net = network_of(pairs);
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  auto sorted = at::empty_like(x);
  auto perm = at::empty({rows, n, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diff_sort_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    const Relax<T> f = relax_of<T>(steepness, distribution, art_lambda);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* sp = sorted.data_ptr<scalar_t>();
    scalar_t* pp = perm.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(net.comparators * n), [&](int64_t begin, int64_t end) {
      std::vector<T> y(n), pt(n * n);
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t w = 0; w < n; ++w) y[w] = T(xp[row * n + w]);
        std::fill(pt.begin(), pt.end(), T(0));
        for (int64_t w = 0; w < n; ++w) pt[w * n + w] = T(1);
        for (int64_t c = 0; c < net.comparators; ++c) {
          const int32_t lo = net.lo(c);
          const int32_t hi = net.hi(c);
          const T alpha = f.alpha(y[hi] - y[lo]);
          mix_pair(y[lo], y[hi], alpha);
          mix_rows(&pt[lo * n], &pt[hi * n], alpha, n);
        }
        scalar_t* prow = pp + row * n * n;
        for (int64_t w = 0; w < n; ++w) {
          sp[row * n + w] = scalar_t(y[w]);
          for (int64_t r = 0; r < n; ++r) prow[r * n + w] = scalar_t(pt[w * n + r]);
        }
      }
    });
  });
  return {sorted, perm};
}

// ------------------------------------------------------------------ backward

// Rows of P handled together in the backward of P's gradient: the chunk's
// state per comparator (chunk × comparators values) stays within ~256 KiB.
int64_t perm_chunk(int64_t n, int64_t comparators) {
  return std::max<int64_t>(1, std::min<int64_t>(n, 65536 / std::max<int64_t>(1, comparators)));
}

at::Tensor diff_sort_bwd(const at::Tensor& x, const c10::optional<at::Tensor>& grad_sorted,
                         const c10::optional<at::Tensor>& grad_perm, const at::Tensor& pairs,
                         double steepness, int64_t distribution, double art_lambda) {
  check_rows(x, "x");
  const Network net = network_of(pairs);
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  const bool has_gs = grad_sorted.has_value();
  const bool has_gp = grad_perm.has_value();
  if (has_gs) {
    TORCH_CHECK(grad_sorted->sizes() == x.sizes() && grad_sorted->is_contiguous() &&
                    grad_sorted->scalar_type() == x.scalar_type(),
                "grad_sorted must be contiguous, of x's shape and dtype");
  }
  if (has_gp) {
    TORCH_CHECK(grad_perm->dim() == 3 && grad_perm->size(0) == rows && grad_perm->size(1) == n &&
                    grad_perm->size(2) == n && grad_perm->is_contiguous() &&
                    grad_perm->scalar_type() == x.scalar_type(),
                "grad_perm must be contiguous (B, n, n) of x's dtype");
  }
  auto grad_x = at::empty_like(x);
  const int64_t chunk = perm_chunk(n, net.comparators);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diff_sort_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    const Relax<T> f = relax_of<T>(steepness, distribution, art_lambda);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gsp = has_gs ? grad_sorted->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gpp = has_gp ? grad_perm->data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    const int64_t work = net.comparators * (has_gp ? 4 * n : 1);
    at::parallel_for(0, rows, grain_rows(work), [&](int64_t begin, int64_t end) {
      const int64_t cmp = net.comparators;
      std::vector<T> y(n), alpha(cmp), dalpha(cmp), diff(cmp), grad_alpha(cmp);
      // Chunk state: the chunk's rows of P (wire-major), their differences at
      // every comparator, and the adjoint of the chunk of P.
      std::vector<T> p_chunk(has_gp ? n * chunk : 0), p_diff(has_gp ? cmp * chunk : 0),
          g_chunk(has_gp ? n * chunk : 0);
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t w = 0; w < n; ++w) y[w] = T(xp[row * n + w]);
        value_chain(y.data(), net, f, alpha.data(), dalpha.data(), diff.data());
        std::fill(grad_alpha.begin(), grad_alpha.end(), T(0));

        for (int64_t r0 = 0; has_gp && r0 < n; r0 += chunk) {
          const int64_t len = std::min(chunk, n - r0);
          std::fill(p_chunk.begin(), p_chunk.end(), T(0));
          for (int64_t k = 0; k < len; ++k) p_chunk[(r0 + k) * chunk + k] = T(1);
          for (int64_t c = 0; c < cmp; ++c) {
            T* lo = &p_chunk[net.lo(c) * chunk];
            T* hi = &p_chunk[net.hi(c) * chunk];
            T* dd = &p_diff[c * chunk];
            for (int64_t k = 0; k < len; ++k) dd[k] = lo[k] - hi[k];
            mix_rows(lo, hi, alpha[c], len);
          }
          const scalar_t* gprow = gpp + row * n * n;
          for (int64_t k = 0; k < len; ++k) {
            for (int64_t w = 0; w < n; ++w) g_chunk[w * chunk + k] = T(gprow[(r0 + k) * n + w]);
          }
          for (int64_t c = cmp - 1; c >= 0; --c) {
            T* lo = &g_chunk[net.lo(c) * chunk];
            T* hi = &g_chunk[net.hi(c) * chunk];
            const T* dd = &p_diff[c * chunk];
            T acc = T(0);
            for (int64_t k = 0; k < len; ++k) acc += dd[k] * (lo[k] - hi[k]);
            grad_alpha[c] += acc;
            mix_rows(lo, hi, alpha[c], len);
          }
        }

        for (int64_t w = 0; w < n; ++w) y[w] = has_gs ? T(gsp[row * n + w]) : T(0);
        value_chain_backward(y.data(), net, alpha.data(), dalpha.data(), diff.data(),
                             grad_alpha.data());
        for (int64_t w = 0; w < n; ++w) gxp[row * n + w] = scalar_t(y[w]);
      }
    });
  });
  return grad_x;
}

// -------------------------------------------------- P @ v without forming P

void check_same_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              name, " must be contiguous, of x's shape and dtype");
}

at::Tensor diff_sort_apply_fwd(const at::Tensor& x, const at::Tensor& v, const at::Tensor& pairs,
                               double steepness, int64_t distribution, double art_lambda) {
  check_rows(x, "x");
  check_same_rows(v, x, "v");
  const Network net = network_of(pairs);
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diff_sort_apply_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    const Relax<T> f = relax_of<T>(steepness, distribution, art_lambda);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(net.comparators), [&](int64_t begin, int64_t end) {
      std::vector<T> y(n), alpha(net.comparators);
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t w = 0; w < n; ++w) y[w] = T(xp[row * n + w]);
        value_chain<T>(y.data(), net, f, alpha.data(), nullptr, nullptr);
        // P v = M_1 (M_2 (... (M_L v))): the layers backwards on v.
        for (int64_t w = 0; w < n; ++w) y[w] = T(vp[row * n + w]);
        for (int64_t c = net.comparators - 1; c >= 0; --c) mix_pair(y[net.lo(c)], y[net.hi(c)], alpha[c]);
        for (int64_t w = 0; w < n; ++w) op[row * n + w] = scalar_t(y[w]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> diff_sort_apply_bwd(const at::Tensor& x, const at::Tensor& v,
                                                       const at::Tensor& grad_out,
                                                       const at::Tensor& pairs, double steepness,
                                                       int64_t distribution, double art_lambda) {
  check_rows(x, "x");
  check_same_rows(v, x, "v");
  check_same_rows(grad_out, x, "grad_out");
  const Network net = network_of(pairs);
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  auto grad_x = at::empty_like(x);
  auto grad_v = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diff_sort_apply_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    const Relax<T> f = relax_of<T>(steepness, distribution, art_lambda);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gvp = grad_v.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(net.comparators), [&](int64_t begin, int64_t end) {
      const int64_t cmp = net.comparators;
      std::vector<T> y(n), u(n), w(n), alpha(cmp), dalpha(cmp), diff(cmp), grad_alpha(cmp);
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t i = 0; i < n; ++i) y[i] = T(xp[row * n + i]);
        value_chain(y.data(), net, f, alpha.data(), dalpha.data(), diff.data());
        // With dP = g vᵀ, the adjoint of alpha_c is (u_lo - u_hi)(w_lo - w_hi):
        // u = gᵀ (layers before c) runs forwards, w = (layers after c) v runs
        // backwards. u at the end is Pᵀ g = d v.
        for (int64_t i = 0; i < n; ++i) u[i] = T(gp[row * n + i]);
        for (int64_t c = 0; c < cmp; ++c) {
          T& a = u[net.lo(c)];
          T& b = u[net.hi(c)];
          grad_alpha[c] = a - b;
          mix_pair(a, b, alpha[c]);
        }
        for (int64_t i = 0; i < n; ++i) {
          gvp[row * n + i] = scalar_t(u[i]);
          w[i] = T(vp[row * n + i]);
        }
        for (int64_t c = cmp - 1; c >= 0; --c) {
          T& a = w[net.lo(c)];
          T& b = w[net.hi(c)];
          grad_alpha[c] *= a - b;
          mix_pair(a, b, alpha[c]);
        }
        std::fill(y.begin(), y.end(), T(0));
        value_chain_backward(y.data(), net, alpha.data(), dalpha.data(), diff.data(),
                             grad_alpha.data());
        for (int64_t i = 0; i < n; ++i) gxp[row * n + i] = scalar_t(y[i]);
      }
    });
  });
  return {grad_x, grad_v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def(
      "diff_sort_fwd(Tensor x, Tensor comparators, float steepness, int distribution, "
      "float art_lambda) -> (Tensor, Tensor)");
  m.def(
      "diff_sort_bwd(Tensor x, Tensor? grad_sorted, Tensor? grad_perm, Tensor comparators, "
      "float steepness, int distribution, float art_lambda) -> Tensor");
  m.def(
      "diff_sort_apply_fwd(Tensor x, Tensor v, Tensor comparators, float steepness, "
      "int distribution, float art_lambda) -> Tensor");
  m.def(
      "diff_sort_apply_bwd(Tensor x, Tensor v, Tensor grad_out, Tensor comparators, "
      "float steepness, int distribution, float art_lambda) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("diff_sort_fwd", &diff_sort_fwd);
  m.impl("diff_sort_bwd", &diff_sort_bwd);
  m.impl("diff_sort_apply_fwd", &diff_sort_apply_fwd);
  m.impl("diff_sort_apply_bwd", &diff_sort_apply_bwd);
}
