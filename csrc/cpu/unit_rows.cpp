// Unit rows: the L2 normalisation that the cosine-similarity losses apply
// before the fused core, over the rows of several parts stacked in order (the
// concatenation and the normalisation in one pass):
//
//   forward   y_i = x_i / n_i,  n_i = max(‖x_i‖, ε),  ε = 1e-12
//   backward  dx_i = (g_i − x_i·(g_i·x_i)/n_i²) / n_i   when ‖x_i‖ > ε
//             dx_i = g_i / ε                            otherwise (y_i = x_i/ε)
//
// Norms and dot products accumulate in double, so that no finite row
// overflows them; the rest runs in the statistics dtype, as torch's
// normalize of the input cast to it does. Both passes run on the calling
// thread: each reads O(N·D) memory next to the O(N²·D) work of the kernels
// they feed, and an OpenMP region here would save about a millisecond on a
// quiet machine but, on a busy one, wait a scheduler slice for a descheduled
// partner thread, once per region.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "pyclloss/cpu_args.h"
#include "pyclloss/cpu_math.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;

constexpr double kEpsilon = 1e-12;  // torch.nn.functional.normalize's default
constexpr int64_t kLanes = 8;       // independent partial sums, so the loop vectorizes

template <typename T>
PYCLLOSS_VECTOR_CLONES double dot(const T* a, const T* b, int64_t d) {
  double lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += static_cast<double>(a[e + l]) * static_cast<double>(b[e + l]);
    }
  }
  double sum = 0;
  for (; e < d; ++e) {
    sum += static_cast<double>(a[e]) * static_cast<double>(b[e]);
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += lanes[l];
  }
  return sum;
}

// The parts, contiguous, with their common width; each must be a 2-D CPU
// floating tensor of one dtype.
std::vector<Tensor> checked_parts(const char* op, const std::vector<Tensor>& parts) {
  TORCH_CHECK(!parts.empty(), op, ": parts must hold at least one tensor");
  const auto& first = parts.front();
  const auto dtype = first.scalar_type();
  check_kernel_dtype(op, "parts", dtype);
  std::vector<Tensor> out;
  for (const auto& part : parts) {
    TORCH_CHECK(part.device().is_cpu() && part.dim() == 2 && part.scalar_type() == dtype &&
                    part.size(1) == first.size(1),
                op, ": parts must be 2-D CPU tensors of one dtype and width, got shape ",
                part.sizes(), " and dtype ", part.scalar_type(), " after shape ", first.sizes(),
                " and dtype ", dtype);
    out.push_back(part.contiguous());
  }
  return out;
}

int64_t total_rows(const std::vector<Tensor>& parts) {
  int64_t rows = 0;
  for (const auto& part : parts) {
    rows += part.size(0);
  }
  return rows;
}

std::tuple<Tensor, Tensor> unit_rows_fwd(const std::vector<Tensor>& parts_in) {
  const auto parts = checked_parts("unit_rows_fwd", parts_in);
  const auto& first = parts.front();
  const int64_t d = first.size(1);
  const int64_t rows = total_rows(parts);
  Tensor out = at::empty({rows, d}, first.options());
  Tensor norms = at::empty({rows}, first.options().dtype(stats_dtype(first.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "unit_rows_fwd",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* y = out.data_ptr<scalar_t>();
    acc_t* norm = norms.data_ptr<acc_t>();
    for (const auto& part : parts) {
      const scalar_t* x = part.data_ptr<scalar_t>();
      for (int64_t r = 0; r < part.size(0); ++r, x += d, y += d, ++norm) {
        const acc_t n = static_cast<acc_t>(std::max(std::sqrt(dot(x, x, d)), kEpsilon));
        for (int64_t e = 0; e < d; ++e) {
          y[e] = static_cast<scalar_t>(static_cast<acc_t>(x[e]) / n);
        }
        *norm = n;
      }
    }
  });
  return {out, norms};
}

std::vector<Tensor> unit_rows_bwd(const std::vector<Tensor>& parts_in, const Tensor& norms,
                                  const Tensor& grad) {
  const auto parts = checked_parts("unit_rows_bwd", parts_in);
  const auto& first = parts.front();
  const int64_t d = first.size(1);
  const int64_t rows = total_rows(parts);
  check_stats_vector("unit_rows_bwd", "norms", norms, rows, stats_dtype(first.scalar_type()));
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == first.scalar_type() &&
                  grad.dim() == 2 && grad.size(0) == rows && grad.size(1) == d,
              "unit_rows_bwd: grad must be a CPU ", first.scalar_type(), " tensor of shape (",
              rows, ", ", d, "), got shape ", grad.sizes(), " and dtype ", grad.scalar_type());
  const Tensor g_all = grad.contiguous();
  std::vector<Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "unit_rows_bwd",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = g_all.data_ptr<scalar_t>();
    const acc_t* norm = norms.data_ptr<acc_t>();
    for (const auto& part : parts) {
      Tensor dx_part = at::empty_like(part);
      const scalar_t* x = part.data_ptr<scalar_t>();
      scalar_t* dx = dx_part.data_ptr<scalar_t>();
      for (int64_t r = 0; r < part.size(0); ++r, x += d, g += d, dx += d, ++norm) {
        const acc_t n = *norm;
        // A norm clamped to ε is a constant: it contributes no gradient.
        const bool clamped = n <= static_cast<acc_t>(kEpsilon);
        const acc_t along = clamped ? acc_t(0) : static_cast<acc_t>(dot(g, x, d) / n / n);
        for (int64_t e = 0; e < d; ++e) {
          dx[e] = static_cast<scalar_t>(
              (static_cast<acc_t>(g[e]) - static_cast<acc_t>(x[e]) * along) / n);
        }
      }
      grads.push_back(dx_part);
    }
  });
  return grads;
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def("unit_rows_fwd(Tensor[] parts) -> (Tensor, Tensor)");
  m.def("unit_rows_bwd(Tensor[] parts, Tensor norms, Tensor grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("unit_rows_fwd", &pyclloss::cpu::unit_rows_fwd);
  m.impl("unit_rows_bwd", &pyclloss::cpu::unit_rows_bwd);
}
