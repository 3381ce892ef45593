// Differentiable sorting networks (diffsort semantics), fused per row.
//
// The network arrives as a flat list of comparators (lo, hi), layer after
// layer. Comparators of one layer touch disjoint wires, so running the list in
// order is the network and running it backwards is its reverse sweep; the
// layer boundaries are not passed (runs of comparators on disjoint wires are
// found from the list where the alphas of a layer are computed together).
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
#include <type_traits>
#include <vector>

namespace {

// Same order as DISTRIBUTIONS in pyclloss/reference/sorting.py.
enum class Relaxation : int64_t { Logistic, LogisticPhi, Gaussian, Cauchy, Reciprocal, Optimal };

constexpr double kPi = 3.14159265358979323846;
constexpr double kSqrtPi = 1.77245385090551602730;
constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kLogisticPhiEps = 1e-10;

// atan in float arithmetic, branch-free so that loops over it vectorise:
// atan(a) = π/4 + atan(s) with s = (a - 1)/(a + 1) = 1 - 2/(1 + a) in [-1, 1]
// for every a >= 0, and atan(s) = s·p(s²) (a least-squares fit on [0, 1]
// flattened towards minimax). Max error 1.9e-7 over all floats. libm's atan
// costs more than the rest of a comparator.
inline float atan_float(float x) {
  const float a = std::abs(x);
  const float s = 1.0f - 2.0f / (1.0f + a);
  const float s2 = s * s;
  float p = 0.00246770571444678f;
  p = p * s2 - 0.014456125167455092f;
  p = p * s2 + 0.03989445539694088f;
  p = p * s2 - 0.07247403535033592f;
  p = p * s2 + 0.10506977876550522f;
  p = p * s2 - 0.14164208119840302f;
  p = p * s2 + 0.1998651192737622f;
  p = p * s2 - 0.3333265531064618f;
  p = p * s2 + 0.9999999046773477f;
  return std::copysign(float(kPi / 4) + p * s, x);
}

template <typename T>
inline T atan_of(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return atan_float(x);
  } else {
    return std::atan(x);
  }
}

// alpha = f(d) for d = b - a, and d alpha / d d. The kind is a template
// parameter so that the comparator loops inline it.
template <typename T, Relaxation kKind>
struct Relax {
  T steepness;
  T art_lambda;

  T alpha(T d) const {
    const T v = steepness * d;
    if constexpr (kKind == Relaxation::Logistic) {
      return sigmoid(v);
    } else if constexpr (kKind == Relaxation::LogisticPhi) {
      return sigmoid(v * std::pow(std::abs(d) + T(kLogisticPhiEps), -art_lambda));
    } else if constexpr (kKind == Relaxation::Gaussian) {
      return T(0.5) * (T(1) + std::erf(v * T(1 / kSqrt2)));
    } else if constexpr (kKind == Relaxation::Cauchy) {
      return atan_of(v) * T(1 / kPi) + T(0.5);
    } else if constexpr (kKind == Relaxation::Reciprocal) {
      return T(0.5) * (v / (T(2) + std::abs(v)) + T(1));
    } else {
      if (v > T(0.25)) return T(1) - T(1) / (T(16) * v);
      if (v < T(-0.25)) return -T(1) / (T(16) * v);
      return v + T(0.5);
    }
  }

  T grad(T d) const {
    const T v = steepness * d;
    if constexpr (kKind == Relaxation::Logistic) {
      const T s = sigmoid(v);
      return steepness * s * (T(1) - s);
    } else if constexpr (kKind == Relaxation::LogisticPhi) {
      const T r = std::abs(d) + T(kLogisticPhiEps);
      const T scale = std::pow(r, -art_lambda);
      const T s = sigmoid(v * scale);
      return s * (T(1) - s) * steepness * scale * (T(1) - art_lambda * std::abs(d) / r);
    } else if constexpr (kKind == Relaxation::Gaussian) {
      return steepness * std::exp(T(-0.5) * v * v) * T(1 / (kSqrt2 * kSqrtPi));
    } else if constexpr (kKind == Relaxation::Cauchy) {
      return steepness / (T(kPi) * (T(1) + v * v));
    } else if constexpr (kKind == Relaxation::Reciprocal) {
      const T den = T(2) + std::abs(v);
      return steepness / (den * den);
    } else {
      return std::abs(v) > T(0.25) ? steepness / (T(16) * v * v) : steepness;
    }
  }

 private:
  static T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }
};

// Calls fn(relax) with the Relax of the distribution code.
template <typename T, typename Fn>
void with_relaxation(int64_t code, double steepness, double art_lambda, Fn&& fn) {
  const T beta = T(steepness);
  const T lambda = T(art_lambda);
  switch (static_cast<Relaxation>(code)) {
    case Relaxation::Logistic:
      return fn(Relax<T, Relaxation::Logistic>{beta, lambda});
    case Relaxation::LogisticPhi:
      return fn(Relax<T, Relaxation::LogisticPhi>{beta, lambda});
    case Relaxation::Gaussian:
      return fn(Relax<T, Relaxation::Gaussian>{beta, lambda});
    case Relaxation::Cauchy:
      return fn(Relax<T, Relaxation::Cauchy>{beta, lambda});
    case Relaxation::Reciprocal:
      return fn(Relax<T, Relaxation::Reciprocal>{beta, lambda});
    case Relaxation::Optimal:
      return fn(Relax<T, Relaxation::Optimal>{beta, lambda});
  }
  TORCH_CHECK(false, "unknown distribution code ", code);
}

struct Network {
  const int32_t* pairs;  // (comparators, 2): lo, hi
  int64_t comparators;
  // Starts of the runs of comparators on disjoint wires, then `comparators`:
  // the alphas of a run depend only on the run's input, so they are computed
  // together (independent, so the relaxation's latency overlaps) before the
  // run's mixes.
  std::vector<int64_t> run_starts;
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

// Σ_k w[k]·(lo[k] - hi[k]). The pragma allows reassociating the sum, so that
// it vectorises (the build has no -ffast-math).
template <typename T>
inline T dot_with_difference(const T* w, const T* lo, const T* hi, int64_t len) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < len; ++k) acc += w[k] * (lo[k] - hi[k]);
  return acc;
}

template <typename T>
inline void mix_pair(T& lo, T& hi, T alpha) {
  const T a = lo;
  const T b = hi;
  lo = alpha * a + (T(1) - alpha) * b;
  hi = (T(1) - alpha) * a + alpha * b;
}

// The value chain of one row: runs the network on y (n, in place) and records
// per comparator the input difference d = b - a, alpha and, when asked,
// d alpha / d d. Per run: gather the differences, then the relaxation over a
// contiguous array (vectorisable), then the mixes.
template <typename T, typename F>
void value_chain(T* y, const Network& net, const F& f, T* d, T* alpha, T* dalpha = nullptr) {
  for (size_t run = 0; run + 1 < net.run_starts.size(); ++run) {
    const int64_t begin = net.run_starts[run];
    const int64_t end = net.run_starts[run + 1];
    for (int64_t c = begin; c < end; ++c) d[c] = y[net.hi(c)] - y[net.lo(c)];
    for (int64_t c = begin; c < end; ++c) alpha[c] = f.alpha(d[c]);
    if (dalpha) {
      for (int64_t c = begin; c < end; ++c) dalpha[c] = f.grad(d[c]);
    }
    for (int64_t c = begin; c < end; ++c) mix_pair(y[net.lo(c)], y[net.hi(c)], alpha[c]);
  }
}

// Reverse sweep of the value chain: g (n) holds d sorted on entry and d x on
// exit; grad_alpha (comparators) holds the adjoint of every alpha from the
// other outputs and is consumed.
template <typename T>
void value_chain_backward(T* g, const Network& net, const T* d, const T* alpha,
                          const T* dalpha, const T* grad_alpha) {
  for (int64_t c = net.comparators - 1; c >= 0; --c) {
    T& ga = g[net.lo(c)];
    T& gb = g[net.hi(c)];
    // alpha mixes a and b: d y'_lo / d alpha = a - b = -d, d y'_hi / d alpha = d.
    const T adj_alpha = grad_alpha[c] - d[c] * (ga - gb);
    mix_pair(ga, gb, alpha[c]);
    const T adj_d = adj_alpha * dalpha[c];
    gb += adj_d;
    ga -= adj_d;
  }
}

int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

Network network_of(const at::Tensor& pairs, int64_t n) {
  TORCH_CHECK(pairs.scalar_type() == at::kInt && pairs.dim() == 2 && pairs.size(1) == 2 &&
                  pairs.is_contiguous() && pairs.device().is_cpu(),
              "comparators must be a contiguous CPU int32 tensor of shape (C, 2)");
  Network net{pairs.data_ptr<int32_t>(), pairs.size(0), {}};
  std::vector<int64_t> last_run(n, -1);  // the run that last touched each wire
  for (int64_t c = 0; c < net.comparators; ++c) {
    const int32_t lo = net.lo(c);
    const int32_t hi = net.hi(c);
    TORCH_CHECK(lo >= 0 && lo < n && hi >= 0 && hi < n && lo != hi,
                "comparator ", c, " = (", lo, ", ", hi, ") is not a pair of wires of ", n);
    const int64_t run = static_cast<int64_t>(net.run_starts.size()) - 1;
    if (run < 0 || last_run[lo] == run || last_run[hi] == run) net.run_starts.push_back(c);
    last_run[lo] = last_run[hi] = static_cast<int64_t>(net.run_starts.size()) - 1;
  }
  net.run_starts.push_back(net.comparators);
  return net;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous (B, n) tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating point");
}

// ------------------------------------------------------------------- forward

std::tuple<at::Tensor, at::Tensor> diff_sort_fwd(const at::Tensor& x, const at::Tensor& pairs,
                                                 double steepness, int64_t distribution,
                                                 double art_lambda) {
  check_rows(x, "x");
  const Network net = network_of(pairs, x.size(1));
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  auto sorted = at::empty_like(x);
  auto perm = at::empty({rows, n, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diff_sort_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    with_relaxation<T>(distribution, steepness, art_lambda, [&](const auto& f) {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* sp = sorted.data_ptr<scalar_t>();
      scalar_t* pp = perm.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_rows(net.comparators * n), [&](int64_t begin, int64_t end) {
        std::vector<T> y(n), pt(n * n), d(net.comparators), alpha(net.comparators);
        for (int64_t row = begin; row < end; ++row) {
          for (int64_t w = 0; w < n; ++w) y[w] = T(xp[row * n + w]);
          value_chain(y.data(), net, f, d.data(), alpha.data());
          std::fill(pt.begin(), pt.end(), T(0));
          for (int64_t w = 0; w < n; ++w) pt[w * n + w] = T(1);
          for (int64_t c = 0; c < net.comparators; ++c) {
            mix_rows(&pt[net.lo(c) * n], &pt[net.hi(c) * n], alpha[c], n);
          }
          for (int64_t w = 0; w < n; ++w) sp[row * n + w] = scalar_t(y[w]);
          scalar_t* prow = pp + row * n * n;
          for (int64_t r = 0; r < n; ++r) {
            for (int64_t w = 0; w < n; ++w) prow[r * n + w] = scalar_t(pt[w * n + r]);
          }
        }
      });
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
  const Network net = network_of(pairs, x.size(1));
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
    with_relaxation<T>(distribution, steepness, art_lambda, [&](const auto& f) {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gsp = has_gs ? grad_sorted->data_ptr<scalar_t>() : nullptr;
      const scalar_t* gpp = has_gp ? grad_perm->data_ptr<scalar_t>() : nullptr;
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      const int64_t work = net.comparators * (has_gp ? 4 * n : 1);
      at::parallel_for(0, rows, grain_rows(work), [&](int64_t begin, int64_t end) {
        const int64_t cmp = net.comparators;
        std::vector<T> y(n), d(cmp), alpha(cmp), dalpha(cmp), grad_alpha(cmp);
        // Chunk state: the chunk's rows of P (wire-major), their differences at
        // every comparator, and the adjoint of the chunk of P.
        std::vector<T> p_chunk(has_gp ? n * chunk : 0), p_diff(has_gp ? cmp * chunk : 0),
            g_chunk(has_gp ? n * chunk : 0);
        for (int64_t row = begin; row < end; ++row) {
          for (int64_t w = 0; w < n; ++w) y[w] = T(xp[row * n + w]);
          value_chain(y.data(), net, f, d.data(), alpha.data(), dalpha.data());
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
              grad_alpha[c] += dot_with_difference(dd, lo, hi, len);
              mix_rows(lo, hi, alpha[c], len);
            }
          }

          for (int64_t w = 0; w < n; ++w) y[w] = has_gs ? T(gsp[row * n + w]) : T(0);
          value_chain_backward(y.data(), net, d.data(), alpha.data(), dalpha.data(),
                               grad_alpha.data());
          for (int64_t w = 0; w < n; ++w) gxp[row * n + w] = scalar_t(y[w]);
        }
      });
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
  const Network net = network_of(pairs, x.size(1));
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  auto out = at::empty_like(x);
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diff_sort_apply_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    with_relaxation<T>(distribution, steepness, art_lambda, [&](const auto& f) {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_rows(net.comparators), [&](int64_t begin, int64_t end) {
        std::vector<T> y(n), d(net.comparators), alpha(net.comparators);
        for (int64_t row = begin; row < end; ++row) {
          for (int64_t w = 0; w < n; ++w) y[w] = T(xp[row * n + w]);
          value_chain(y.data(), net, f, d.data(), alpha.data());
          // P v = M_1 (M_2 (... (M_L v))): the layers backwards on v.
          for (int64_t w = 0; w < n; ++w) y[w] = T(vp[row * n + w]);
          for (int64_t c = net.comparators - 1; c >= 0; --c) {
            mix_pair(y[net.lo(c)], y[net.hi(c)], alpha[c]);
          }
          for (int64_t w = 0; w < n; ++w) op[row * n + w] = scalar_t(y[w]);
        }
      });
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
  const Network net = network_of(pairs, x.size(1));
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  auto grad_x = at::empty_like(x);
  auto grad_v = at::empty_like(v);
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diff_sort_apply_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    with_relaxation<T>(distribution, steepness, art_lambda, [&](const auto& f) {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* vp = v.data_ptr<scalar_t>();
      const scalar_t* gp = grad_out.data_ptr<scalar_t>();
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      scalar_t* gvp = grad_v.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain_rows(net.comparators), [&](int64_t begin, int64_t end) {
        const int64_t cmp = net.comparators;
        std::vector<T> y(n), u(n), w(n), d(cmp), alpha(cmp), dalpha(cmp), grad_alpha(cmp);
        for (int64_t row = begin; row < end; ++row) {
          for (int64_t i = 0; i < n; ++i) y[i] = T(xp[row * n + i]);
          value_chain(y.data(), net, f, d.data(), alpha.data(), dalpha.data());
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
          value_chain_backward(y.data(), net, d.data(), alpha.data(), dalpha.data(),
                               grad_alpha.data());
          for (int64_t i = 0; i < n; ++i) gxp[row * n + i] = scalar_t(y[i]);
        }
      });
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
