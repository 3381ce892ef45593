// CUDA kernels of the gated-subspace (Hydra / SimLAP) loss
// (docs/gated_info_nce.md); launchers declared in gated_info_nce_cuda.h.
//
// One thread per row: a block of kRows anchors (keys, in the key pass) walks
// the other side in tiles of kTile rows, staged through shared memory kChunk
// features at a time. Each thread keeps its row's kTile numerators a.k and
// squared gated key norms (g^2).(k k) in registers, so per-row statistics need
// no reduction across threads and the B x N x K tensor of gated keys never
// exists. The gradient passes multiply the coefficient tiles into a kChunk-wide
// slice of features per block (grid.y), recomputing the tiles for each slice.
// float32 throughout, no atomics: deterministic.

#include <cmath>

#include "pyclloss/gated_info_nce_cuda.h"

namespace pyclloss::cuda {
namespace {

constexpr int kRows = 128;      // threads per block, one row each
constexpr int kTile = 32;       // rows of the other side per tile
constexpr int kChunk = 32;      // features per staged chunk, and per gradient slice
constexpr float kEps = 1e-12f;  // gated norms are clamped below at kEps (F.normalize)

// f(j) for the kTile rows of a tile, unrolled: a thread's values of the tile
// (one per row) stay in registers.
template <typename F>
__device__ __forceinline__ void for_each_tile_row(F&& f) {
#pragma unroll
  for (int j = 0; j < kTile; ++j) f(j);
}

struct TileBuffer {
  float first[kTile][kChunk + 1];  // +1: consecutive rows in different banks
  float second[kTile][kChunk + 1];
};

// Rows [row0, row0 + kTile) x features [d0, d0 + kChunk) of two row-major
// matrices into shared memory, zeros out of range. Called by the whole block.
__device__ void stage(TileBuffer& buf, const float* first, const float* second, int64_t row0,
                      int64_t rows, int64_t d0, int64_t dim) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += blockDim.x) {
    const int r = e / kChunk;
    const int c = e % kChunk;
    const bool in = row0 + r < rows && d0 + c < dim;
    const int64_t at = (row0 + r) * dim + d0 + c;
    buf.first[r][c] = in ? first[at] : 0.0f;
    buf.second[r][c] = in ? second[at] : 0.0f;
  }
}

// dot[j] = <first[row], other_first[j0 + j]> and sq[j] = <second[row],
// other_second[j0 + j]> for the kTile rows from j0. Called by the whole block.
__device__ void row_tile(TileBuffer& buf, const float* first, const float* second, int64_t row,
                         bool active, const float* other_first, const float* other_second,
                         int64_t j0, int64_t others, int64_t dim, float (&dot)[kTile],
                         float (&sq)[kTile]) {
  for_each_tile_row([&](int j) {
    dot[j] = 0.0f;
    sq[j] = 0.0f;
  });
  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();  // everyone is done with the previous contents
    stage(buf, other_first, other_second, j0, others, d0, dim);
    __syncthreads();
    const int width = static_cast<int>(dim - d0 < kChunk ? dim - d0 : kChunk);
    for (int c = 0; c < width; ++c) {
      const float x = active ? first[row * dim + d0 + c] : 0.0f;
      const float y = active ? second[row * dim + d0 + c] : 0.0f;
      for_each_tile_row([&](int j) {
        dot[j] = fmaf(x, buf.first[j][c], dot[j]);
        sq[j] = fmaf(y, buf.second[j][c], sq[j]);
      });
    }
  }
}

// sum_first[c] += sum_j coef_first[j] first[j0 + j][o0 + c] (and the same for
// second) over the feature slice [o0, o0 + kChunk). Called by the whole block.
__device__ void accumulate_slice(TileBuffer& buf, const float* first, const float* second,
                                 int64_t j0, int64_t rows, int64_t o0, int64_t dim,
                                 const float (&coef_first)[kTile],
                                 const float (&coef_second)[kTile], float (&sum_first)[kChunk],
                                 float (&sum_second)[kChunk]) {
  __syncthreads();  // everyone is done with the tile's dot products
  stage(buf, first, second, j0, rows, o0, dim);
  __syncthreads();
#pragma unroll
  for (int c = 0; c < kChunk; ++c) {
    for_each_tile_row([&](int j) {
      sum_first[c] = fmaf(coef_first[j], buf.first[j][c], sum_first[c]);
      sum_second[c] = fmaf(coef_second[j], buf.second[j][c], sum_second[c]);
    });
  }
}

// Row `row` of two (rows x dim) outputs over the feature slice from o0.
__device__ void store_slice(float* first, float* second, int64_t row, int64_t o0, int64_t dim,
                            const float (&first_slice)[kChunk],
                            const float (&second_slice)[kChunk]) {
#pragma unroll
  for (int c = 0; c < kChunk; ++c) {
    if (o0 + c < dim) {
      first[row * dim + o0 + c] = first_slice[c];
      second[row * dim + o0 + c] = second_slice[c];
    }
  }
}

__device__ __forceinline__ float inverse_norm(float sq_norm) {
  return 1.0f / fmaxf(sqrtf(sq_norm), kEps);
}

// softplus(-inf) = 0, sigmoid(-inf) = 0.
__device__ __forceinline__ float softplus(float x) {
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// For one pair: the coefficient of its numerator a.k (G s / (|q g| |k g|)),
// of its squared key norm (G l / (2 |k g|^2), 0 where clamped) and G l. A
// term of G is active only where its coefficient is nonzero.
struct PairGrad {
  float numerator;
  float key_norm;
  float dlogit;
};

__device__ __forceinline__ PairGrad pair_grad(float logit, float inv_norm, float anchor_scale,
                                              float neg_lse, float neg_coef, float pos_coef,
                                              bool pos, bool neg) {
  float grad = 0.0f;
  if (neg && neg_coef != 0.0f) grad += neg_coef * expf(logit - neg_lse);
  if (pos && pos_coef != 0.0f) grad += pos_coef * sigmoid(neg_lse - logit);
  const float key_norm = inv_norm < 1.0f / kEps ? 0.5f * grad * logit * inv_norm * inv_norm : 0.0f;
  return {grad * anchor_scale * inv_norm, key_norm, grad * logit};
}

// What the gradient of a pair needs of its anchor, and the pair's key label.
struct AnchorTerms {
  float scale;
  int64_t own;
  int64_t partner;
  float neg_lse;
  float neg_coef;
  float pos_coef;
};

struct TilePair {
  AnchorTerms anchor;
  int64_t key;
};

// Replaces a tile's numerators and squared key norms by their coefficients in
// the gradient products (pair_grad) and adds its G l into dlogit; pair(j)
// gives row j's anchor terms and key label, rows from `count` on are padding.
template <typename Pair>
__device__ __forceinline__ void gradient_tile(float (&dot)[kTile], float (&sq)[kTile],
                                              int64_t count, Pair&& pair, float& dlogit) {
  for_each_tile_row([&](int j) {
    const TilePair p = pair(j);
    const float inv = inverse_norm(sq[j]);
    const bool pos = j < count && p.anchor.partner == p.key;
    const bool neg = j < count && p.anchor.own != p.key && p.anchor.partner != p.key;
    const PairGrad g = pair_grad(dot[j] * p.anchor.scale * inv, inv, p.anchor.scale,
                                 p.anchor.neg_lse, p.anchor.neg_coef, p.anchor.pos_coef, pos, neg);
    dot[j] = g.numerator;
    sq[j] = g.key_norm;
    dlogit += g.dlogit;
  });
}

// The tile of anchor `row` against keys [j0, j0 + kTile), and those keys'
// labels in `keys`. Called by the whole block.
__device__ void anchor_tile(TileBuffer& buf, int64_t (&keys)[kTile], const GatedOperands& ops,
                            int64_t row, bool active, int64_t j0, float (&dot)[kTile],
                            float (&sq)[kTile]) {
  row_tile(buf, ops.a, ops.gate_sq, row, active, ops.k, ops.k_sq, j0, ops.n, ops.dim, dot, sq);
  if (threadIdx.x < kTile) {
    const int64_t j = j0 + threadIdx.x;
    keys[threadIdx.x] = j < ops.n ? ops.key_labels[j] : 0;
  }
  __syncthreads();
}

// kPairs = false: out0 = LSE over the negatives, out1 = number of positives.
// kPairs = true: out0 = sum over positives of softplus(neg_lse - l), out1 of sigmoid.
template <bool kPairs>
__global__ void __launch_bounds__(kRows)
    forward_kernel(GatedOperands ops, const float* neg_lse_in, float* out0, float* out1) {
  __shared__ TileBuffer buf;
  __shared__ int64_t keys[kTile];
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRows) + threadIdx.x;
  const bool active = row < ops.b;
  const float scale = active ? ops.anchor_scale[row] : 0.0f;
  const int64_t own = active ? ops.labels[row] : 0;
  const int64_t partner = active ? ops.partner_labels[row] : 0;
  const float neg_lse = kPairs && active ? neg_lse_in[row] : 0.0f;
  float run_max = -INFINITY;
  float acc0 = 0.0f;
  float acc1 = 0.0f;
  float dot[kTile];
  float sq[kTile];
  for (int64_t j0 = 0; j0 < ops.n; j0 += kTile) {
    anchor_tile(buf, keys, ops, row, active, j0, dot, sq);
    const int64_t count = ops.n - j0;
    for_each_tile_row([&](int j) {
      if (j < count) {
        const float logit = dot[j] * scale * inverse_norm(sq[j]);
        const bool pos = partner == keys[j];
        const bool neg = own != keys[j] && !pos;
        if (kPairs) {
          if (pos) {
            acc0 += softplus(neg_lse - logit);
            acc1 += sigmoid(neg_lse - logit);
          }
        } else {
          acc1 += pos ? 1.0f : 0.0f;
          if (neg && logit > run_max) {
            acc0 = acc0 * expf(run_max - logit) + 1.0f;  // expf(-inf) = 0 on the first
            run_max = logit;
          } else if (neg) {
            acc0 += expf(logit - run_max);
          }
        }
      }
    });
    __syncthreads();  // keys are read before the next tile overwrites them
  }
  if (!active) return;
  out0[row] = kPairs ? acc0 : (run_max == -INFINITY ? -INFINITY : run_max + logf(acc0));
  out1[row] = acc1;
}

// h_k = H k and t_ksq = T (k k) over the feature slice blockIdx.y; dlogit.
__global__ void __launch_bounds__(kRows)
    anchor_grad_kernel(GatedOperands ops, GatedGradTerms terms, float* h_k, float* t_ksq,
                       float* dlogit_out) {
  __shared__ TileBuffer buf;
  __shared__ int64_t keys[kTile];
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRows) + threadIdx.x;
  const bool active = row < ops.b;
  const int64_t o0 = blockIdx.y * static_cast<int64_t>(kChunk);
  const AnchorTerms anchor{active ? ops.anchor_scale[row] : 0.0f,
                           active ? ops.labels[row] : 0,
                           active ? ops.partner_labels[row] : 0,
                           active ? terms.neg_lse[row] : 0.0f,
                           active ? terms.neg_coef[row] : 0.0f,
                           active ? terms.pos_coef[row] : 0.0f};
  float hk[kChunk] = {};
  float tk[kChunk] = {};
  float dlogit = 0.0f;
  float dot[kTile];
  float sq[kTile];
  for (int64_t j0 = 0; j0 < ops.n; j0 += kTile) {
    anchor_tile(buf, keys, ops, row, active, j0, dot, sq);
    gradient_tile(dot, sq, ops.n - j0, [&](int j) { return TilePair{anchor, keys[j]}; }, dlogit);
    accumulate_slice(buf, ops.k, ops.k_sq, j0, ops.n, o0, ops.dim, dot, sq, hk, tk);
  }
  if (!active) return;
  store_slice(h_k, t_ksq, row, o0, ops.dim, hk, tk);
  if (blockIdx.y == 0) dlogit_out[row] = dlogit;
}

// h_a = H^T a and t_gsq = T^T g^2 over the feature slice blockIdx.y: rows are
// keys, tiles walk the anchors.
__global__ void __launch_bounds__(kRows)
    key_grad_kernel(GatedOperands ops, GatedGradTerms terms, float* h_a, float* t_gsq) {
  __shared__ TileBuffer buf;
  __shared__ float anchor_scale[kTile];
  __shared__ float neg_lse[kTile];
  __shared__ float neg_coef[kTile];
  __shared__ float pos_coef[kTile];
  __shared__ int64_t own[kTile];
  __shared__ int64_t partner[kTile];
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRows) + threadIdx.x;
  const bool active = row < ops.n;
  const int64_t o0 = blockIdx.y * static_cast<int64_t>(kChunk);
  const int64_t key = active ? ops.key_labels[row] : 0;
  float ha[kChunk] = {};
  float tg[kChunk] = {};
  float dot[kTile];
  float sq[kTile];
  for (int64_t i0 = 0; i0 < ops.b; i0 += kTile) {
    row_tile(buf, ops.k, ops.k_sq, row, active, ops.a, ops.gate_sq, i0, ops.b, ops.dim, dot, sq);
    if (threadIdx.x < kTile) {
      const int64_t i = i0 + threadIdx.x;
      const bool in = i < ops.b;
      anchor_scale[threadIdx.x] = in ? ops.anchor_scale[i] : 0.0f;
      neg_lse[threadIdx.x] = in ? terms.neg_lse[i] : 0.0f;
      neg_coef[threadIdx.x] = in ? terms.neg_coef[i] : 0.0f;
      pos_coef[threadIdx.x] = in ? terms.pos_coef[i] : 0.0f;
      own[threadIdx.x] = in ? ops.labels[i] : 0;
      partner[threadIdx.x] = in ? ops.partner_labels[i] : 0;
    }
    __syncthreads();
    float unused_dlogit = 0.0f;  // the anchor pass keeps G l
    gradient_tile(
        dot, sq, ops.b - i0,
        [&](int j) {
          return TilePair{
              {anchor_scale[j], own[j], partner[j], neg_lse[j], neg_coef[j], pos_coef[j]}, key};
        },
        unused_dlogit);
    accumulate_slice(buf, ops.a, ops.gate_sq, i0, ops.b, o0, ops.dim, dot, sq, ha, tg);
  }
  if (!active) return;
  store_slice(h_a, t_gsq, row, o0, ops.dim, ha, tg);
}

dim3 row_blocks(int64_t rows, int64_t dim = 0) {
  const int64_t slices = dim > 0 ? (dim + kChunk - 1) / kChunk : 1;
  return dim3(static_cast<unsigned>((rows + kRows - 1) / kRows), static_cast<unsigned>(slices));
}

}  // namespace

cudaError_t gated_fwd(const GatedOperands& ops, float* neg_lse, float* pos_count,
                      cudaStream_t stream) {
  if (ops.b == 0) return cudaSuccess;
  forward_kernel<false><<<row_blocks(ops.b), kRows, 0, stream>>>(ops, nullptr, neg_lse,
                                                                 pos_count);
  return cudaGetLastError();
}

cudaError_t gated_pair_fwd(const GatedOperands& ops, const float* neg_lse, float* loss_sum,
                           float* sigmoid_sum, cudaStream_t stream) {
  if (ops.b == 0) return cudaSuccess;
  forward_kernel<true><<<row_blocks(ops.b), kRows, 0, stream>>>(ops, neg_lse, loss_sum,
                                                                sigmoid_sum);
  return cudaGetLastError();
}

cudaError_t gated_anchor_grad(const GatedOperands& ops, const GatedGradTerms& terms, float* h_k,
                              float* t_ksq, float* dlogit, cudaStream_t stream) {
  if (ops.b == 0) return cudaSuccess;
  anchor_grad_kernel<<<row_blocks(ops.b, ops.dim), kRows, 0, stream>>>(ops, terms, h_k, t_ksq,
                                                                       dlogit);
  return cudaGetLastError();
}

cudaError_t gated_key_grad(const GatedOperands& ops, const GatedGradTerms& terms, float* h_a,
                           float* t_gsq, cudaStream_t stream) {
  if (ops.n == 0) return cudaSuccess;
  key_grad_kernel<<<row_blocks(ops.n, ops.dim), kRows, 0, stream>>>(ops, terms, h_a, t_gsq);
  return cudaGetLastError();
}

}  // namespace pyclloss::cuda
