// CUDA implementations of the sorting-network ops (schemas beside the CPU
// kernels in csrc/cpu/sorting.cpp): checks the tensors, allocates the results
// and the workspace, and runs the launchers of sorting_cuda.h on the current
// stream of the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "pyclloss/cuda_binding.h"
#include "pyclloss/sorting_cuda.h"

namespace pyclloss::cuda {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// x: a contiguous (B, n) CUDA tensor with 1 <= n <= max_wires.
void check_rows(const Tensor& x, int64_t max_wires) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (B, n) tensor, got ",
              x.sizes());
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= max_wires,
              "the CUDA kernels take rows of 1 to ", max_wires, " values here, got n = ",
              x.size(1));
}

// t: contiguous, of `shape`, x's dtype and device.
void check_like(const Tensor& t, at::IntArrayRef shape, const Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == shape && t.is_contiguous() && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              name, " must be a contiguous ", x.scalar_type(), " tensor of shape ", shape,
              " on ", x.device(), ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ",
              t.device());
}

SortNetwork network_of(const Tensor& comparators, const Tensor& x) {
  TORCH_CHECK(comparators.scalar_type() == at::kInt && comparators.dim() == 2 &&
                  comparators.size(1) == 2 && comparators.is_contiguous() &&
                  comparators.device() == x.device(),
              "comparators must be a contiguous int32 tensor of shape (C, 2) on ", x.device(),
              ", got ", comparators.scalar_type(), " of shape ", comparators.sizes(), " on ",
              comparators.device());
  TORCH_CHECK(comparators.size(0) < INT_MAX, "too many comparators: ", comparators.size(0));
  return {comparators.data_ptr<int32_t>(), comparators.size(0), static_cast<int>(x.size(1))};
}

SortRelaxation relaxation_of(int64_t distribution, double steepness, double art_lambda) {
  TORCH_CHECK(distribution >= 0 && distribution <= 5, "unknown distribution code ",
              distribution);
  return {distribution, steepness, art_lambda};
}

// The set-up of every op, done in one place (sort_args): the checks of x and
// the network, and the launch's element type, network and relaxation.
struct SortArgs {
  ElementType type;
  SortNetwork network;
  SortRelaxation relaxation;
};

SortArgs sort_args(const Tensor& x, int64_t max_wires, const Tensor& comparators,
                   double steepness, int64_t distribution, double art_lambda) {
  check_rows(x, max_wires);
  return {element_type(x, true), network_of(comparators, x),
          relaxation_of(distribution, steepness, art_lambda)};
}

Tensor workspace(SortOp op, const Tensor& x, const SortArgs& args) {
  const size_t bytes = sort_workspace_bytes(op, args.type, x.size(0), args.network);
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

const void* optional_pointer(const OptionalTensor& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

std::tuple<Tensor, Tensor> diff_sort_fwd_cuda(const Tensor& x, const Tensor& comparators,
                                              double steepness, int64_t distribution,
                                              double art_lambda) {
  const SortArgs args =
      sort_args(x, kMaxSortWires, comparators, steepness, distribution, art_lambda);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1);
  Tensor sorted = at::empty_like(x);
  Tensor perm = at::empty({rows, n, n}, x.options());
  Tensor scratch = workspace(SortOp::kSortForward, x, args);
  check_launch(diff_sort_forward(args.type, x.data_ptr(), rows, args.network, args.relaxation,
                                 sorted.data_ptr(), perm.data_ptr(), scratch.data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()),
               "diff_sort_fwd");
  return {sorted, perm};
}

Tensor diff_sort_bwd_cuda(const Tensor& x, const OptionalTensor& grad_sorted,
                          const OptionalTensor& grad_perm, const Tensor& comparators,
                          double steepness, int64_t distribution, double art_lambda) {
  const SortArgs args =
      sort_args(x, kMaxSortWires, comparators, steepness, distribution, art_lambda);
  const int64_t rows = x.size(0), n = x.size(1);
  if (grad_sorted.has_value()) check_like(*grad_sorted, x.sizes(), x, "grad_sorted");
  if (grad_perm.has_value()) check_like(*grad_perm, {rows, n, n}, x, "grad_perm");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x = at::empty_like(x);
  const SortOp op = grad_perm.has_value() ? SortOp::kSortBackwardWithPerm : SortOp::kSortBackward;
  Tensor scratch = workspace(op, x, args);
  check_launch(diff_sort_backward(args.type, x.data_ptr(),
                                  optional_pointer(grad_sorted), optional_pointer(grad_perm),
                                  rows, args.network, args.relaxation, grad_x.data_ptr(),
                                  scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "diff_sort_bwd");
  return grad_x;
}

Tensor diff_sort_apply_fwd_cuda(const Tensor& x, const Tensor& v, const Tensor& comparators,
                                double steepness, int64_t distribution, double art_lambda) {
  const SortArgs args =
      sort_args(x, kMaxApplyWires, comparators, steepness, distribution, art_lambda);
  check_like(v, x.sizes(), x, "v");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty_like(x);
  Tensor scratch = workspace(SortOp::kApplyForward, x, args);
  check_launch(diff_sort_apply_forward(args.type, x.data_ptr(), v.data_ptr(),
                                       x.size(0), args.network, args.relaxation, out.data_ptr(),
                                       scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "diff_sort_apply_fwd");
  return out;
}

std::tuple<Tensor, Tensor> diff_sort_apply_bwd_cuda(const Tensor& x, const Tensor& v,
                                                    const Tensor& grad_out,
                                                    const Tensor& comparators, double steepness,
                                                    int64_t distribution, double art_lambda) {
  const SortArgs args =
      sort_args(x, kMaxApplyWires, comparators, steepness, distribution, art_lambda);
  check_like(v, x.sizes(), x, "v");
  check_like(grad_out, x.sizes(), x, "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x = at::empty_like(x), grad_v = at::empty_like(v);
  Tensor scratch = workspace(SortOp::kApplyBackward, x, args);
  check_launch(diff_sort_apply_backward(args.type, x.data_ptr(), v.data_ptr(),
                                        grad_out.data_ptr(), x.size(0), args.network,
                                        args.relaxation, grad_x.data_ptr(), grad_v.data_ptr(),
                                        scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "diff_sort_apply_bwd");
  return {grad_x, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyclloss_C, CUDA, m) {
  m.impl("diff_sort_fwd", &diff_sort_fwd_cuda);
  m.impl("diff_sort_bwd", &diff_sort_bwd_cuda);
  m.impl("diff_sort_apply_fwd", &diff_sort_apply_fwd_cuda);
  m.impl("diff_sort_apply_bwd", &diff_sort_apply_bwd_cuda);
}

}  // namespace pyclloss::cuda
