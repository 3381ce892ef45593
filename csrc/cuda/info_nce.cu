// CUDA kernels of the fused InfoNCE core (docs/fused_core.md).
//
// Every kernel is one pass of a block of BLOCK_M rows of one operand ("a")
// against all rows of the other ("b"), BLOCK_N rows per tile, in the manner of
// FlashAttention-2: the logit tile a·bᵀ is accumulated over D in chunks of 128
// bytes per row that stream through a cp.async ring in shared memory, and an
// operation consumes the finished tile in registers (online LSE, pair sums,
// SigLIP terms, or the logit gradient G). Backward passes then accumulate G·b
// over the block's D range in registers; G goes through shared memory so that
// this second product can split D across warps.
//
// Row passes take a = q, b = k (row statistics, dq); column passes a = k,
// b = q (column LSE, dk). Every output element has one writer: no atomics, and
// dscale/dbias are per-block partials summed in a fixed order, so the results
// are deterministic. Those sums run over N·M signed terms that largely cancel:
// each thread folds its per-tile fp32 sums into fp64, and fp64 carries them to
// the end.
//
// fp16/bf16 multiply on the tensor cores (mma.sync m16n8k16, fp32
// accumulation); fp32 uses plain fp32 FMAs (exact, no TF32) laid out like the
// mma accumulator fragments, so the operations are written once for both.

#include "pyclloss/info_nce_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace pyclloss::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kStages = 3;  // depth of the cp.async ring

// ------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, asynchronously; zeros when !valid (nothing is read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* pointer) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(pointer)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* pointer) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(pointer)));
}

// ----------------------------------------------------------------- element types

template <typename T>
struct Element;

template <>
struct Element<float> {
  static constexpr bool kTensorCore = false;
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Element<__half> {
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  }
  // c += a·b for one m16n8k16 tile (a row-major 16x16, b column-major 16x8).
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr bool kTensorCore = true;
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&pair);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ------------------------------------------------------------------- tile shapes

// A block of kBlockM a-rows on a grid of kWarpsM x kWarpsN warps; each warp
// holds a (kBlockM / kWarpsM) x (kBlockN / kWarpsN) piece of the logit tile in
// the m16n8 accumulator layout (lane = 4 g + t holds rows g and g + 8, columns
// 2 t and 2 t + 1 of every 16x8 piece).
template <typename T, int kBlockM_, int kBlockN_, int kWarpsM_, int kWarpsN_>
struct TileShape {
  using Elem = T;
  static constexpr bool kTensorCore = Element<T>::kTensorCore;
  // The gradient tile G in shared memory: the input type on the tensor cores
  // (the second product's a operand), fp32 otherwise.
  using GradElem = std::conditional_t<kTensorCore, T, float>;

  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;

  static constexpr int kChunk = 128 / static_cast<int>(sizeof(T));  // columns per pipelined chunk
  // Rows padded by 16 bytes: ldmatrix and 16-byte loads of 8 consecutive rows
  // then hit distinct banks.
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunkStride = kChunk + kPad;
  static constexpr int kGradStride = kBlockN + 16 / static_cast<int>(sizeof(GradElem));

  static constexpr int kWarpRows = kBlockM / kWarpsM;
  static constexpr int kMmaM = kWarpRows / 16;  // m16 slabs per warp
  static constexpr int kRowsPerThread = 2 * kMmaM;
  static constexpr int kWarpCols = kBlockN / kWarpsN;
  static constexpr int kFragN = kWarpCols / 8;               // n8 pieces per warp, logit tile
  static constexpr int kOutWarpCols = kChunk / kWarpsN;      // columns per warp, one chunk of G·b
  static constexpr int kOutFragN = kOutWarpCols / 8;

  static_assert(kWarpRows % 16 == 0, "a warp holds whole m16 slabs");
  static_assert(kWarpCols % 16 == 0 && kOutWarpCols % 16 == 0,
                "ldmatrix.x4 loads n8 pieces in pairs");
  static_assert(kBlockN % 16 == 0, "the second product runs over k16 steps of the tile");

  // Shared memory: the a rows (the whole padded D when resident, else a ring
  // of chunks), the ring of b chunks, the gradient tile, a reduction scratch.
  __host__ __device__ static constexpr size_t a_bytes(int chunks, bool resident) {
    return resident ? size_t(kBlockM) * (size_t(chunks) * kChunk + kPad) * sizeof(T)
                    : size_t(kStages) * kBlockM * kChunkStride * sizeof(T);
  }
  static constexpr size_t kRingBytes = size_t(kStages) * kBlockN * kChunkStride * sizeof(T);
  static constexpr size_t kGradBytes = size_t(kBlockM) * kGradStride * sizeof(GradElem);
  static constexpr size_t kReduceBytes = size_t(kThreads / 32) * 2 * sizeof(double);
};

// Forward passes: whole rows per warp, so row reductions stay in the warp.
template <typename T>
using StatsShape = TileShape<T, 128, 64, 8, 1>;
// Backward passes: 64 rows keep the register accumulator of G·b (up to 512
// columns) at 128 floats per thread.
template <typename T>
using GradShape = TileShape<T, 64, 64, 4, 2>;

constexpr int kGradBlockM = 64;
static_assert(GradShape<float>::kBlockM == kGradBlockM && GradShape<__half>::kBlockM == kGradBlockM,
              "grad_workspace_doubles assumes the backward block height");

// Accumulator fragment of one warp's piece of a logit tile.
template <class Shape>
using LogitFrag = float[Shape::kMmaM][Shape::kFragN][4];

// Fragment row r (0 .. kRowsPerThread) is slab r / 2, half r % 2.
template <class Frag>
__device__ __forceinline__ float& frag_at(Frag& frag, int r, int n8, int col) {
  return frag[r >> 1][n8][((r & 1) << 1) | col];
}

// Where this thread's fragment elements sit in the block's tile.
template <class Shape>
struct FragCoords {
  int lane, warp_m, warp_n;

  __device__ FragCoords()
      : lane(threadIdx.x % 32),
        warp_m(threadIdx.x / 32 / Shape::kWarpsN),
        warp_n(threadIdx.x / 32 % Shape::kWarpsN) {}

  __device__ int warp_row0() const { return warp_m * Shape::kWarpRows; }
  __device__ int warp_col0() const { return warp_n * Shape::kWarpCols; }
  __device__ int out_col0() const { return warp_n * Shape::kOutWarpCols; }
  // Block row of fragment row r.
  __device__ int row(int r) const { return warp_row0() + (r >> 1) * 16 + (r & 1) * 8 + lane / 4; }
  // Tile column of element `col` (0, 1) of n8 piece n8.
  __device__ int col(int n8, int col) const { return warp_col0() + n8 * 8 + 2 * (lane % 4) + col; }
};

// f(r) for every fragment row r (0 .. kRowsPerThread) of this thread, in order.
template <class Shape, typename F>
__device__ __forceinline__ void for_each_frag_row(F&& f) {
#pragma unroll
  for (int r = 0; r < Shape::kRowsPerThread; ++r) f(r);
}

// f(n8, c) for every fragment column of this thread, in order: element c (0,
// 1) of n8 piece n8 (0 .. kN: kFragN in a logit tile, kOutFragN in a chunk of
// the output).
template <int kN, typename F>
__device__ __forceinline__ void for_each_frag_col(F&& f) {
#pragma unroll
  for (int n8 = 0; n8 < kN; ++n8) {
#pragma unroll
    for (int c = 0; c < 2; ++c) f(n8, c);
  }
}

// ------------------------------------------------------------- warp reductions

// Lanes 4 g .. 4 g + 3 share the rows of a fragment.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Component k of v; k is a compile-time constant after unrolling.
__device__ __forceinline__ float component(const float4& v, int k) {
  return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

__device__ __forceinline__ float softplus(float x) {
  return fmaxf(x, 0.f) + log1pf(exp2f(-fabsf(x) * kLog2e));
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + exp2f(-x * kLog2e)); }

// ------------------------------------------------------------------ tile loads

// The block's view of its two operands.
template <typename T>
struct Operands {
  const T* a;  // a_rows x dim, the block's own rows
  const T* b;  // b_rows x dim, streamed in tiles
  int a_rows, b_rows, dim;
  int chunks;       // ceil(dim / kChunk), at least 1
  bool vectorized;  // every row starts 16-byte aligned: cp.async
  bool a_resident;  // the block's a rows stay in shared memory for the whole pass
};

// Copies rows [row0, row0 + kRows) x columns [col0, col0 + kChunk) of a
// row-major (rows x dim) matrix into a shared tile with row stride `stride`,
// zeros outside the matrix. Unaligned rows (odd D) are copied element-wise,
// synchronously; the ring's barriers make that safe too.
template <class Shape, int kRows>
__device__ __forceinline__ void load_chunk(typename Shape::Elem* tile, int stride,
                                           const typename Shape::Elem* src, int rows, int dim,
                                           int64_t row0, int col0, bool vectorized) {
  using T = typename Shape::Elem;
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kVecsPerRow = Shape::kChunk / kVec;
  constexpr int kVecs = kRows * kVecsPerRow;
  static_assert(kVecs % Shape::kThreads == 0, "every thread copies the same number of vectors");
#pragma unroll
  for (int it = 0; it < kVecs / Shape::kThreads; ++it) {
    const int v = it * Shape::kThreads + threadIdx.x;
    const int r = v / kVecsPerRow;
    const int c = (v % kVecsPerRow) * kVec;
    const int64_t row = row0 + r;
    const int col = col0 + c;
    T* dst = tile + r * stride + c;
    if (vectorized) {
      const bool valid = row < rows && col < dim;
      cp_async_16(dst, valid ? src + row * dim + col : src, valid);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dst[e] = row < rows && col + e < dim ? src[row * dim + col + e]
                                             : Element<T>::from_float(0.f);
      }
    }
  }
}

// --------------------------------------------------------------- the products

// acc += a_tile · b_tileᵀ over one chunk. a_tile: the block's rows (stride
// a_stride), b_tile: the tile's rows (stride kChunkStride).
template <class Shape>
__device__ __forceinline__ void logits_chunk(LogitFrag<Shape>& acc,
                                             const typename Shape::Elem* a_tile, int a_stride,
                                             const typename Shape::Elem* b_tile,
                                             const FragCoords<Shape>& fc) {
  using T = typename Shape::Elem;
  const int lane = fc.lane;
  if constexpr (Shape::kTensorCore) {
#pragma unroll
    for (int kk = 0; kk < Shape::kChunk; kk += 16) {
      // A fragments: 8x8 matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15), lanes 0-15
      // address the rows of the first k half, lanes 16-31 of the second.
      uint32_t a[Shape::kMmaM][4];
#pragma unroll
      for (int s = 0; s < Shape::kMmaM; ++s) {
        ldmatrix_x4(a[s], a_tile + (fc.warp_row0() + s * 16 + (lane & 15)) * a_stride + kk +
                              (lane >> 4) * 8);
      }
      // B fragments of two n8 pieces: b rows are the n index, contiguous in k.
#pragma unroll
      for (int np = 0; np < Shape::kFragN / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, b_tile +
                           (fc.warp_col0() + np * 16 + (lane & 7) + ((lane >> 4) << 3)) *
                               Shape::kChunkStride +
                           kk + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int s = 0; s < Shape::kMmaM; ++s) {
          Element<T>::mma(acc[s][2 * np], a[s], b[0], b[1]);
          Element<T>::mma(acc[s][2 * np + 1], a[s], b[2], b[3]);
        }
      }
    }
  } else {
    const int g = lane / 4, t = lane % 4;
#pragma unroll 2
    for (int kk = 0; kk < Shape::kChunk; kk += 4) {
      float4 a[Shape::kMmaM][2];
#pragma unroll
      for (int s = 0; s < Shape::kMmaM; ++s) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[s][h] = *reinterpret_cast<const float4*>(
              a_tile + (fc.warp_row0() + s * 16 + h * 8 + g) * a_stride + kk);
        }
      }
      for_each_frag_col<Shape::kFragN>([&](int n8, int c) {
        const float4 b = *reinterpret_cast<const float4*>(
            b_tile + (fc.warp_col0() + n8 * 8 + 2 * t + c) * Shape::kChunkStride + kk);
#pragma unroll
        for (int s = 0; s < Shape::kMmaM; ++s) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& d = acc[s][n8][2 * h + c];
            d = fmaf(a[s][h].x, b.x, d);
            d = fmaf(a[s][h].y, b.y, d);
            d = fmaf(a[s][h].z, b.z, d);
            d = fmaf(a[s][h].w, b.w, d);
          }
        }
      });
    }
  }
}

template <class Shape>
using OutFrag = float[Shape::kMmaM][Shape::kOutFragN][4];

// acc += G · v_tile for one chunk of columns: G (kBlockM x kBlockN, stride
// kGradStride) in shared memory, v_tile the tile's rows (kBlockN x kChunk).
template <class Shape>
__device__ __forceinline__ void grad_chunk(OutFrag<Shape>& acc,
                                           const typename Shape::GradElem* grad_tile,
                                           const typename Shape::Elem* v_tile,
                                           const FragCoords<Shape>& fc) {
  using T = typename Shape::Elem;
  const int lane = fc.lane;
  if constexpr (Shape::kTensorCore) {
#pragma unroll
    for (int kk = 0; kk < Shape::kBlockN; kk += 16) {
      uint32_t a[Shape::kMmaM][4];
#pragma unroll
      for (int s = 0; s < Shape::kMmaM; ++s) {
        ldmatrix_x4(a[s], grad_tile + (fc.warp_row0() + s * 16 + (lane & 15)) * Shape::kGradStride +
                              kk + (lane >> 4) * 8);
      }
      // v rows are the k index: transposed loads give the column-major B
      // fragments; matrices (k 0-7 | 8-15) x (n 0-7 | 8-15).
#pragma unroll
      for (int np = 0; np < Shape::kOutFragN / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + (kk + (lane & 15)) * Shape::kChunkStride + fc.out_col0() +
                                 np * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int s = 0; s < Shape::kMmaM; ++s) {
          Element<T>::mma(acc[s][2 * np], a[s], b[0], b[1]);
          Element<T>::mma(acc[s][2 * np + 1], a[s], b[2], b[3]);
        }
      }
    }
  } else {
    const int g = lane / 4, t = lane % 4;
#pragma unroll 2
    for (int kk = 0; kk < Shape::kBlockN; kk += 4) {
      float4 p[Shape::kMmaM][2];
#pragma unroll
      for (int s = 0; s < Shape::kMmaM; ++s) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          p[s][h] = *reinterpret_cast<const float4*>(
              grad_tile + (fc.warp_row0() + s * 16 + h * 8 + g) * Shape::kGradStride + kk);
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int n8 = 0; n8 < Shape::kOutFragN; ++n8) {
          const float2 v = *reinterpret_cast<const float2*>(
              v_tile + (kk + k) * Shape::kChunkStride + fc.out_col0() + n8 * 8 + 2 * t);
#pragma unroll
          for (int s = 0; s < Shape::kMmaM; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float pk = component(p[s][h], k);
              acc[s][n8][2 * h] = fmaf(pk, v.x, acc[s][n8][2 * h]);
              acc[s][n8][2 * h + 1] = fmaf(pk, v.y, acc[s][n8][2 * h + 1]);
            }
          }
        }
      }
    }
  }
}

// Writes this warp's part of G into the shared gradient tile.
template <class Shape>
__device__ __forceinline__ void store_grad_tile(const LogitFrag<Shape>& grad,
                                                typename Shape::GradElem* grad_tile,
                                                const FragCoords<Shape>& fc) {
  for_each_frag_row<Shape>([&](int r) {
#pragma unroll
    for (int n8 = 0; n8 < Shape::kFragN; ++n8) {
      const float lo = grad[r >> 1][n8][(r & 1) * 2];
      const float hi = grad[r >> 1][n8][(r & 1) * 2 + 1];
      auto* dst = grad_tile + fc.row(r) * Shape::kGradStride + fc.col(n8, 0);
      if constexpr (Shape::kTensorCore) {
        *reinterpret_cast<uint32_t*>(dst) = Element<typename Shape::Elem>::pack(lo, hi);
      } else {
        *reinterpret_cast<float2*>(dst) = make_float2(lo, hi);
      }
    }
  });
}

// ------------------------------------------------------------------ the kernel

// Where a backward pass writes: the gradient of the a rows (a_rows x dim) and,
// when non-null, one (dscale, dbias) partial per block row.
template <typename T>
struct GradTarget {
  T* grad;
  double* partials;
};

// One pass of a block of a rows over all b tiles. kOutChunks == 0: a forward
// pass (Op consumes logit tiles and writes statistics in finish()); else a
// backward pass (Op turns logit tiles into G) accumulating G·b over the
// columns [blockIdx.y * kOutChunks * kChunk, ...) of D.
template <class Op, int kOutChunks>
__global__ void __launch_bounds__(Op::Shape::kThreads, 1)
    tile_pass_kernel(const __grid_constant__ Operands<typename Op::Shape::Elem> x,
                     const __grid_constant__ typename Op::Params params,
                     GradTarget<typename Op::Shape::Elem> target) {
  using Shape = typename Op::Shape;
  using T = typename Shape::Elem;
  constexpr bool kBackward = kOutChunks > 0;

  extern __shared__ __align__(16) unsigned char smem[];
  T* a_smem = reinterpret_cast<T*>(smem);
  const size_t a_bytes = Shape::a_bytes(x.chunks, x.a_resident);
  T* b_ring = reinterpret_cast<T*>(smem + a_bytes);
  auto* grad_tile = reinterpret_cast<typename Shape::GradElem*>(smem + a_bytes + Shape::kRingBytes);
  double* reduce_scratch = reinterpret_cast<double*>(smem + a_bytes + Shape::kRingBytes +
                                                   (kBackward ? Shape::kGradBytes : 0));

  const FragCoords<Shape> fc;
  const int a_row0 = blockIdx.x * Shape::kBlockM;
  const int resident_stride = x.chunks * Shape::kChunk + Shape::kPad;
  const int out_col_begin = blockIdx.y * kOutChunks * Shape::kChunk;

  // The pass is a flat sequence of steps, each one chunk of a b tile: first the
  // chunks of the logit product, then (backward) those of the block's D range.
  const int logit_steps = x.chunks;
  const int out_steps =
      kBackward ? min(kOutChunks, (x.dim - out_col_begin + Shape::kChunk - 1) / Shape::kChunk) : 0;
  const int steps_per_tile = logit_steps + out_steps;
  const int tiles = (x.b_rows + Shape::kBlockN - 1) / Shape::kBlockN;
  const int total_steps = tiles * steps_per_tile;

  auto issue = [&](int step) {
    if (step < total_steps) {
      const int tile = step / steps_per_tile;
      const int j = step - tile * steps_per_tile;
      const int stage = step % kStages;
      const int col0 = j < logit_steps ? j * Shape::kChunk
                                       : out_col_begin + (j - logit_steps) * Shape::kChunk;
      load_chunk<Shape, Shape::kBlockN>(b_ring + stage * Shape::kBlockN * Shape::kChunkStride,
                                        Shape::kChunkStride, x.b, x.b_rows, x.dim,
                                        int64_t(tile) * Shape::kBlockN, col0, x.vectorized);
      if (!x.a_resident && j < logit_steps) {
        load_chunk<Shape, Shape::kBlockM>(a_smem + stage * Shape::kBlockM * Shape::kChunkStride,
                                          Shape::kChunkStride, x.a, x.a_rows, x.dim, a_row0, col0,
                                          x.vectorized);
      }
    }
    cp_async_commit();  // one group per step, empty or not: wait_group counts steps
  };

  if (x.a_resident) {
    for (int c = 0; c < x.chunks; ++c) {
      load_chunk<Shape, Shape::kBlockM>(a_smem + c * Shape::kChunk, resident_stride, x.a,
                                        x.a_rows, x.dim, a_row0, c * Shape::kChunk, x.vectorized);
    }
    cp_async_commit();
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  // Waits for step `step`'s data; the barrier also retires step - 1, whose
  // stage the prefetch then refills.
  int step = 0;
  auto begin_step = [&]() {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    issue(step + kStages - 1);
  };

  Op op(params, a_row0, fc);
  OutFrag<Shape> acc[kBackward ? kOutChunks : 1] = {};

  for (int tile = 0; tile < tiles; ++tile) {
    LogitFrag<Shape> logits = {};

    for (int c = 0; c < logit_steps; ++c, ++step) {
      begin_step();
      const int stage = step % kStages;
      const T* a_tile = x.a_resident ? a_smem + c * Shape::kChunk
                                     : a_smem + stage * Shape::kBlockM * Shape::kChunkStride;
      logits_chunk<Shape>(logits, a_tile, x.a_resident ? resident_stride : Shape::kChunkStride,
                          b_ring + stage * Shape::kBlockN * Shape::kChunkStride, fc);
    }
    op.tile(logits, tile * Shape::kBlockN);

    if constexpr (kBackward) {
      // Every warp finished the previous tile's G·b before this tile's first
      // barrier, so the gradient tile is free; the next barrier publishes it.
      store_grad_tile<Shape>(logits, grad_tile, fc);
#pragma unroll
      for (int c = 0; c < kOutChunks; ++c) {
        if (c < out_steps) {
          begin_step();
          grad_chunk<Shape>(acc[c], grad_tile,
                            b_ring + (step % kStages) * Shape::kBlockN * Shape::kChunkStride, fc);
          ++step;
        }
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (!kBackward) {
    op.finish();
  } else {
    const float out_scale = op.out_scale();
    const int t = fc.lane % 4;
#pragma unroll
    for (int c = 0; c < kOutChunks; ++c) {
      for_each_frag_row<Shape>([&](int r) {
        const int row = a_row0 + fc.row(r);
        for_each_frag_col<Shape::kOutFragN>([&](int n8, int e) {
          const int col = out_col_begin + c * Shape::kChunk + fc.out_col0() + n8 * 8 + 2 * t + e;
          if (c < out_steps && row < x.a_rows && col < x.dim) {
            target.grad[int64_t(row) * x.dim + col] =
                Element<T>::from_float(frag_at(acc[c], r, n8, e) * out_scale);
          }
        });
      });
    }
    if (target.partials != nullptr && blockIdx.y == 0) {
      const double dscale = warp_sum(op.dscale_part());
      const double dbias = warp_sum(op.dbias_part());
      const int warp = threadIdx.x / 32;
      if (fc.lane == 0) {
        reduce_scratch[2 * warp] = dscale;
        reduce_scratch[2 * warp + 1] = dbias;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        double total_scale = 0.0, total_bias = 0.0;
        for (int w = 0; w < Shape::kThreads / 32; ++w) {
          total_scale += reduce_scratch[2 * w];
          total_bias += reduce_scratch[2 * w + 1];
        }
        target.partials[2 * blockIdx.x] = total_scale;
        target.partials[2 * blockIdx.x + 1] = total_bias;
      }
    }
  }
}

// Sums the per-block (dscale, dbias) partials in a fixed order; one block.
constexpr int kSumThreads = 256;

__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const double* partials, int blocks, float* dscale, float* dbias) {
  __shared__ double sums[2][kSumThreads];
  double scale_sum = 0.0, bias_sum = 0.0;
  for (int b = threadIdx.x; b < blocks; b += kSumThreads) {
    scale_sum += partials[2 * b];
    bias_sum += partials[2 * b + 1];
  }
  sums[0][threadIdx.x] = scale_sum;
  sums[1][threadIdx.x] = bias_sum;
  __syncthreads();
  for (int stride = kSumThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      sums[0][threadIdx.x] += sums[0][threadIdx.x + stride];
      sums[1][threadIdx.x] += sums[1][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *dscale = static_cast<float>(sums[0][0]);
    if (dbias != nullptr) *dbias = static_cast<float>(sums[1][0]);
  }
}

// ------------------------------------------------------------- the operations
//
// An operation sees the block's a rows through FragCoords; `tile` receives the
// dot products <a_row, b_row> of one tile (b rows from b_row0) in the logit
// fragment. Indices i (rows of q) and j (rows of k) are a and b rows in a row
// pass, b and a rows in a column pass.

__device__ __forceinline__ bool pair_excluded(const PairMasks& masks, int i, int j) {
  return masks.has_exclude && int64_t(j) - int64_t(i) == masks.exclude_offset;
}

__device__ __forceinline__ int64_t label_or_zero(const int64_t* labels, int index, int count) {
  return labels != nullptr && index < count ? labels[index] : 0;
}

struct LseStatsParams {
  const float* scale;
  PairMasks masks;
  int n, m;
  float* row_lse;    // row pass
  float* pos_sum;    // row pass
  float* pos_count;  // row pass
  float* col_lse;    // column pass
};

// Online LSE of the logits over the row's set (row pass: den(i, j), with the
// sum and count of positives; column pass: not excluded). Running max and
// per-lane partial sums in base 2; a tile with nothing in the set leaves the
// state untouched, so an empty set ends at exactly -inf.
template <class Shape_, bool kColumns>
class LseStats {
 public:
  using Shape = Shape_;
  using Params = LseStatsParams;
  static constexpr int kRows = Shape::kRowsPerThread;

  __device__ LseStats(const Params& p, int a_row0, const FragCoords<Shape>& fc)
      : p_(p), fc_(fc), scale_(*p.scale) {
    for_each_frag_row<Shape>([&](int r) {
      a_index_[r] = a_row0 + fc.row(r);
      label_[r] = kColumns ? 0 : label_or_zero(p.masks.q_labels, a_index_[r], p.n);
      max2_[r] = kNegInf;
      sum_[r] = 0.f;
      pos_dot_[r] = 0.f;
      pos_count_[r] = 0.f;
    });
  }

  __device__ void tile(LogitFrag<Shape>& dots, int b_row0) {
    const float scale2 = scale_ * kLog2e;
    const int b_rows = kColumns ? p_.n : p_.m;
    const bool has_labels = !kColumns && p_.masks.q_labels != nullptr;
    for_each_frag_col<Shape::kFragN>([&](int n8, int c) {
      const int b = b_row0 + fc_.col(n8, c);
      const bool b_valid = b < b_rows;
      const int64_t b_label = has_labels ? label_or_zero(p_.masks.k_labels, b, b_rows) : 0;
      for_each_frag_row<Shape>([&](int r) {
        const int i = kColumns ? b : a_index_[r];
        const int j = kColumns ? a_index_[r] : b;
        const bool kept = b_valid && !pair_excluded(p_.masks, i, j);
        float& dot = frag_at(dots, r, n8, c);
        bool in_set = kept;
        if (!kColumns) {
          const bool positive = has_labels && kept && label_[r] == b_label;
          if (positive) {
            pos_dot_[r] += dot;
            pos_count_[r] += 1.f;
          }
          in_set = kept && !(p_.masks.neg_only && positive);
        }
        dot = in_set ? dot * scale2 : kNegInf;
      });
    });
    for_each_frag_row<Shape>([&](int r) {
      float tile_max = kNegInf;
      for_each_frag_col<Shape::kFragN>(
          [&](int n8, int c) { tile_max = fmaxf(tile_max, frag_at(dots, r, n8, c)); });
      tile_max = quad_max(tile_max);
      if (tile_max != kNegInf) {
        const float new_max = fmaxf(max2_[r], tile_max);
        float sum = sum_[r] * exp2f(max2_[r] - new_max);
        for_each_frag_col<Shape::kFragN>(
            [&](int n8, int c) { sum += exp2f(frag_at(dots, r, n8, c) - new_max); });
        sum_[r] = sum;
        max2_[r] = new_max;
      }
    });
  }

  __device__ void finish() {
    const int a_rows = kColumns ? p_.m : p_.n;
    for_each_frag_row<Shape>([&](int r) {
      const float sum = quad_sum(sum_[r]);
      const float pos_dot = quad_sum(pos_dot_[r]);
      const float pos_count = quad_sum(pos_count_[r]);
      const int a = a_index_[r];
      if (fc_.lane % 4 == 0 && a < a_rows) {
        const float lse = sum > 0.f ? (max2_[r] + log2f(sum)) * kLn2 : kNegInf;
        if (kColumns) {
          p_.col_lse[a] = lse;
        } else {
          p_.row_lse[a] = lse;
          p_.pos_sum[a] = pos_dot * scale_;
          p_.pos_count[a] = pos_count;
        }
      }
    });
  }

 private:
  const Params& p_;
  const FragCoords<Shape>& fc_;
  float scale_;
  int a_index_[kRows];
  int64_t label_[kRows];
  float max2_[kRows], sum_[kRows], pos_dot_[kRows], pos_count_[kRows];
};

struct PairStatsParams {
  const float* scale;
  PairMasks masks;
  int n, m;
  const float* neg_lse;
  float* loss_sum;
  float* sigmoid_sum;
};

// Row pass: sums over positives of softplus(neg_lse_i - l_ij) and of its sigmoid.
template <class Shape_>
class PairStats {
 public:
  using Shape = Shape_;
  using Params = PairStatsParams;
  static constexpr int kRows = Shape::kRowsPerThread;

  __device__ PairStats(const Params& p, int a_row0, const FragCoords<Shape>& fc)
      : p_(p), fc_(fc), scale_(*p.scale) {
    for_each_frag_row<Shape>([&](int r) {
      a_index_[r] = a_row0 + fc.row(r);
      label_[r] = label_or_zero(p.masks.q_labels, a_index_[r], p.n);
      neg_lse_[r] = a_index_[r] < p.n ? p.neg_lse[a_index_[r]] : 0.f;
      loss_[r] = 0.f;
      sigmoid_[r] = 0.f;
    });
  }

  __device__ void tile(LogitFrag<Shape>& dots, int b_row0) {
    for_each_frag_col<Shape::kFragN>([&](int n8, int c) {
      const int j = b_row0 + fc_.col(n8, c);
      const bool j_valid = j < p_.m;
      const int64_t j_label = label_or_zero(p_.masks.k_labels, j, p_.m);
      for_each_frag_row<Shape>([&](int r) {
        const bool positive =
            j_valid && !pair_excluded(p_.masks, a_index_[r], j) && label_[r] == j_label;
        if (positive) {
          const float arg = neg_lse_[r] - scale_ * frag_at(dots, r, n8, c);
          loss_[r] += softplus(arg);
          sigmoid_[r] += sigmoid(arg);
        }
      });
    });
  }

  __device__ void finish() {
    for_each_frag_row<Shape>([&](int r) {
      const float loss = quad_sum(loss_[r]);
      const float sig = quad_sum(sigmoid_[r]);
      if (fc_.lane % 4 == 0 && a_index_[r] < p_.n) {
        p_.loss_sum[a_index_[r]] = loss;
        p_.sigmoid_sum[a_index_[r]] = sig;
      }
    });
  }

 private:
  const Params& p_;
  const FragCoords<Shape>& fc_;
  float scale_;
  int a_index_[kRows];
  int64_t label_[kRows];
  float neg_lse_[kRows], loss_[kRows], sigmoid_[kRows];
};

struct SiglipParams {
  const float* scale;
  const float* bias;
  const int64_t* q_labels;
  const int64_t* k_labels;
  int n, m;
  float* row_loss;            // forward
  const float* row_coef;      // backward
  const float* grad_scale;    // backward, may be null
};

// z_ij = +1 where the labels match, else -1 (no exclusion in SigLIP).
__device__ __forceinline__ float siglip_sign(const SiglipParams& p, int64_t q_label,
                                             int64_t k_label) {
  return p.q_labels != nullptr && q_label == k_label ? 1.f : -1.f;
}

// Row pass: sum_j softplus(-z_ij (l_ij + b)).
template <class Shape_>
class SiglipStats {
 public:
  using Shape = Shape_;
  using Params = SiglipParams;
  static constexpr int kRows = Shape::kRowsPerThread;

  __device__ SiglipStats(const Params& p, int a_row0, const FragCoords<Shape>& fc)
      : p_(p), fc_(fc), scale_(*p.scale), bias_(*p.bias) {
    for_each_frag_row<Shape>([&](int r) {
      a_index_[r] = a_row0 + fc.row(r);
      label_[r] = label_or_zero(p.q_labels, a_index_[r], p.n);
      loss_[r] = 0.f;
    });
  }

  __device__ void tile(LogitFrag<Shape>& dots, int b_row0) {
    for_each_frag_col<Shape::kFragN>([&](int n8, int c) {
      const int j = b_row0 + fc_.col(n8, c);
      const int64_t j_label = label_or_zero(p_.k_labels, j, p_.m);
      for_each_frag_row<Shape>([&](int r) {
        const float z = siglip_sign(p_, label_[r], j_label);
        const float term = softplus(-z * fmaf(scale_, frag_at(dots, r, n8, c), bias_));
        if (j < p_.m) loss_[r] += term;
      });
    });
  }

  __device__ void finish() {
    for_each_frag_row<Shape>([&](int r) {
      const float loss = quad_sum(loss_[r]);
      if (fc_.lane % 4 == 0 && a_index_[r] < p_.n) p_.row_loss[a_index_[r]] = loss;
    });
  }

 private:
  const Params& p_;
  const FragCoords<Shape>& fc_;
  float scale_, bias_;
  int a_index_[kRows];
  int64_t label_[kRows];
  float loss_[kRows];
};

// ----------------------------------------------------------- gradient operations
//
// A gradient operation replaces each dot product by G_ij * grad_scale (what
// the second product multiplies) and keeps this thread's share of
// dscale = sum G_ij dot_ij and dbias = sum G_ij.

__device__ __forceinline__ float load_or_zero(const float* values, int index, int count) {
  return values != nullptr && index < count ? values[index] : 0.f;
}

struct InfoNceGradParams {
  const float* scale;
  PairMasks masks;
  int n, m;
  InfoNceGradTerms terms;
  const float* grad_scale;  // may be null
};

// What G needs of a row of q, and of a row of k.
struct QueryTerms {
  float row_lse2;  // row_lse in base 2
  float row_coef, pos_coef, pair_lse;
  int64_t label;
};

struct KeyTerms {
  float col_lse2;
  float col_coef;
  int64_t label;
};

template <class Shape_, bool kColumns>
class InfoNceGrad {
 public:
  using Shape = Shape_;
  using Params = InfoNceGradParams;
  static constexpr int kRows = Shape::kRowsPerThread;
  using ASide = std::conditional_t<kColumns, KeyTerms, QueryTerms>;
  using BSide = std::conditional_t<kColumns, QueryTerms, KeyTerms>;

  __device__ InfoNceGrad(const Params& p, int a_row0, const FragCoords<Shape>& fc)
      : p_(p),
        fc_(fc),
        scale_(*p.scale),
        grad_scale_(p.grad_scale != nullptr ? *p.grad_scale : 1.f) {
    for_each_frag_row<Shape>([&](int r) {
      a_index_[r] = a_row0 + fc.row(r);
      if constexpr (kColumns) {
        a_terms_[r] = key_terms(a_index_[r]);
      } else {
        a_terms_[r] = query_terms(a_index_[r]);
      }
    });
  }

  __device__ void tile(LogitFrag<Shape>& dots, int b_row0) {
    const int a_rows = kColumns ? p_.m : p_.n;
    const int b_rows = kColumns ? p_.n : p_.m;
    float tile_dscale = 0.f;
    for_each_frag_col<Shape::kFragN>([&](int n8, int c) {
      const int b = b_row0 + fc_.col(n8, c);
      BSide b_terms;
      if constexpr (kColumns) {
        b_terms = query_terms(b);
      } else {
        b_terms = key_terms(b);
      }
      for_each_frag_row<Shape>([&](int r) {
        float& dot = frag_at(dots, r, n8, c);
        float g = 0.f;
        if (a_index_[r] < a_rows && b < b_rows) {
          if constexpr (kColumns) {
            g = grad_logit(b_terms, a_terms_[r], b, a_index_[r], dot);
          } else {
            g = grad_logit(a_terms_[r], b_terms, a_index_[r], b, dot);
          }
        }
        tile_dscale = fmaf(g, dot, tile_dscale);
        dot = g * grad_scale_;
      });
    });
    dscale_ += tile_dscale;
  }

  __device__ double dscale_part() const { return dscale_; }
  __device__ double dbias_part() const { return 0.0; }
  __device__ float out_scale() const { return scale_ / grad_scale_; }

 private:
  __device__ QueryTerms query_terms(int i) const {
    const InfoNceGradTerms& t = p_.terms;
    const bool row_term = t.row_lse != nullptr && t.row_coef != nullptr;
    return {row_term ? load_or_zero(t.row_lse, i, p_.n) * kLog2e : 0.f,
            row_term ? load_or_zero(t.row_coef, i, p_.n) : 0.f,
            load_or_zero(t.pos_coef, i, p_.n), load_or_zero(t.pair_lse, i, p_.n),
            label_or_zero(p_.masks.q_labels, i, p_.n)};
  }

  __device__ KeyTerms key_terms(int j) const {
    const InfoNceGradTerms& t = p_.terms;
    const bool col_term = t.col_lse != nullptr && t.col_coef != nullptr;
    return {col_term ? load_or_zero(t.col_lse, j, p_.m) * kLog2e : 0.f,
            col_term ? load_or_zero(t.col_coef, j, p_.m) : 0.f,
            label_or_zero(p_.masks.k_labels, j, p_.m)};
  }

  // G_ij of docs/fused_core.md; a term whose coefficient is 0 contributes
  // nothing, whatever its LSE.
  __device__ float grad_logit(const QueryTerms& qt, const KeyTerms& kt, int i, int j,
                              float dot) const {
    const bool excluded = pair_excluded(p_.masks, i, j);
    const bool positive = p_.masks.q_labels != nullptr && !excluded && qt.label == kt.label;
    const bool in_den = !excluded && !(p_.masks.neg_only && positive);
    const float logit2 = dot * scale_ * kLog2e;
    float g = 0.f;
    if (in_den && qt.row_coef != 0.f) g += qt.row_coef * exp2f(logit2 - qt.row_lse2);
    if (!excluded && kt.col_coef != 0.f) g += kt.col_coef * exp2f(logit2 - kt.col_lse2);
    if (positive && qt.pos_coef != 0.f) {
      const float weight =
          p_.terms.pair_lse != nullptr ? sigmoid(qt.pair_lse - dot * scale_) : 1.f;
      g += qt.pos_coef * weight;
    }
    return g;
  }

  const Params& p_;
  const FragCoords<Shape>& fc_;
  float scale_, grad_scale_;
  double dscale_ = 0.0;
  int a_index_[kRows];
  ASide a_terms_[kRows];
};

// G_ij = row_coef_i (-z_ij) sigmoid(-z_ij (l_ij + b)).
template <class Shape_, bool kColumns>
class SiglipGrad {
 public:
  using Shape = Shape_;
  using Params = SiglipParams;
  static constexpr int kRows = Shape::kRowsPerThread;

  __device__ SiglipGrad(const Params& p, int a_row0, const FragCoords<Shape>& fc)
      : p_(p),
        fc_(fc),
        scale_(*p.scale),
        bias_(*p.bias),
        grad_scale_(p.grad_scale != nullptr ? *p.grad_scale : 1.f) {
    for_each_frag_row<Shape>([&](int r) {
      a_index_[r] = a_row0 + fc.row(r);
      a_label_[r] = label_or_zero(kColumns ? p.k_labels : p.q_labels, a_index_[r],
                                  kColumns ? p.m : p.n);
      a_coef_[r] = kColumns ? 0.f : load_or_zero(p.row_coef, a_index_[r], p.n);
    });
  }

  __device__ void tile(LogitFrag<Shape>& dots, int b_row0) {
    const int a_rows = kColumns ? p_.m : p_.n;
    const int b_rows = kColumns ? p_.n : p_.m;
    float tile_dscale = 0.f, tile_dbias = 0.f;
    for_each_frag_col<Shape::kFragN>([&](int n8, int c) {
      const int b = b_row0 + fc_.col(n8, c);
      const int64_t b_label = label_or_zero(kColumns ? p_.q_labels : p_.k_labels, b, b_rows);
      const float b_coef = kColumns ? load_or_zero(p_.row_coef, b, p_.n) : 0.f;
      for_each_frag_row<Shape>([&](int r) {
        float& dot = frag_at(dots, r, n8, c);
        const float coef = kColumns ? b_coef : a_coef_[r];
        const float z = kColumns ? siglip_sign(p_, b_label, a_label_[r])
                                 : siglip_sign(p_, a_label_[r], b_label);
        float g = -z * coef * sigmoid(-z * fmaf(scale_, dot, bias_));
        if (!(a_index_[r] < a_rows && b < b_rows) || coef == 0.f) g = 0.f;
        tile_dscale = fmaf(g, dot, tile_dscale);
        tile_dbias += g;
        dot = g * grad_scale_;
      });
    });
    dscale_ += tile_dscale;
    dbias_ += tile_dbias;
  }

  __device__ double dscale_part() const { return dscale_; }
  __device__ double dbias_part() const { return dbias_; }
  __device__ float out_scale() const { return scale_ / grad_scale_; }

 private:
  const Params& p_;
  const FragCoords<Shape>& fc_;
  float scale_, bias_, grad_scale_;
  double dscale_ = 0.0, dbias_ = 0.0;
  int a_index_[kRows];
  int64_t a_label_[kRows];
  float a_coef_[kRows];
};

// --------------------------------------------------------------------- launching

template <typename T>
Operands<T> make_operands(const void* a, const void* b, int64_t a_rows, int64_t b_rows,
                          int64_t dim) {
  constexpr int kChunk = 128 / sizeof(T);
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(b) % 16 == 0 && dim % kVec == 0;
  const int chunks = dim > 0 ? static_cast<int>((dim + kChunk - 1) / kChunk) : 1;
  return {static_cast<const T*>(a), static_cast<const T*>(b), static_cast<int>(a_rows),
          static_cast<int>(b_rows), static_cast<int>(dim), chunks, aligned, false};
}

// Row passes: a = q, b = k. Column passes: a = k, b = q.
template <typename T>
Operands<T> row_operands(const CoreProblem& p) {
  return make_operands<T>(p.q, p.k, p.n, p.m, p.dim);
}

template <typename T>
Operands<T> column_operands(const CoreProblem& p) {
  return make_operands<T>(p.k, p.q, p.m, p.n, p.dim);
}

// Launches one pass; the block's a rows stay resident in shared memory when
// they fit beside the ring.
template <class Op, int kOutChunks>
cudaError_t launch_pass(Operands<typename Op::Shape::Elem> x, const typename Op::Params& params,
                        GradTarget<typename Op::Shape::Elem> target, int d_ranges,
                        cudaStream_t stream) {
  using Shape = typename Op::Shape;
  if (x.a_rows == 0) return cudaSuccess;
  int device = 0, smem_limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t rest =
      Shape::kRingBytes + (kOutChunks > 0 ? Shape::kGradBytes : 0) + Shape::kReduceBytes;
  x.a_resident = Shape::a_bytes(x.chunks, true) + rest <= size_t(smem_limit);
  const size_t smem = Shape::a_bytes(x.chunks, x.a_resident) + rest;
  if (smem > size_t(smem_limit)) return cudaErrorInvalidConfiguration;

  auto kernel = tile_pass_kernel<Op, kOutChunks>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((x.a_rows + Shape::kBlockM - 1) / Shape::kBlockM, d_ranges);
  kernel<<<grid, Shape::kThreads, smem, stream>>>(x, params, target);
  return cudaGetLastError();
}

template <class Op>
cudaError_t launch_stats(const Operands<typename Op::Shape::Elem>& x,
                         const typename Op::Params& params, cudaStream_t stream) {
  return launch_pass<Op, 0>(x, params, {nullptr, nullptr}, 1, stream);
}

// Backward pass: the register accumulator covers 128 columns of D for small
// D, else 512 (grid.y splits larger D, recomputing the logits per range).
template <class Op>
cudaError_t launch_grad(const Operands<typename Op::Shape::Elem>& x,
                        const typename Op::Params& params,
                        GradTarget<typename Op::Shape::Elem> target, cudaStream_t stream) {
  constexpr int kChunk = Op::Shape::kChunk;
  constexpr int kNarrow = 128, kWide = 512;
  if (x.dim <= kNarrow) return launch_pass<Op, kNarrow / kChunk>(x, params, target, 1, stream);
  const int ranges = (x.dim + kWide - 1) / kWide;
  return launch_pass<Op, kWide / kChunk>(x, params, target, ranges, stream);
}

cudaError_t sum_partials(const double* partials, int blocks, float* dscale, float* dbias,
                         cudaStream_t stream) {
  sum_partials_kernel<<<1, kSumThreads, 0, stream>>>(partials, blocks, dscale, dbias);
  return cudaGetLastError();
}

int grad_blocks(int64_t n) { return static_cast<int>((n + kGradBlockM - 1) / kGradBlockM); }

}  // namespace

size_t grad_workspace_doubles(int64_t n) { return 2 * static_cast<size_t>(grad_blocks(n)); }

cudaError_t infonce_fwd(const CoreProblem& p, float* row_lse, float* pos_sum, float* pos_count,
                        float* col_lse, cudaStream_t stream) {
  return with_element_type<false>(p.type, [&](auto tag) {
    using T = decltype(tag);
    const LseStatsParams params{p.scale, p.masks, static_cast<int>(p.n), static_cast<int>(p.m),
                                row_lse, pos_sum, pos_count, col_lse};
    cudaError_t err =
        launch_stats<LseStats<StatsShape<T>, false>>(row_operands<T>(p), params, stream);
    if (err != cudaSuccess || col_lse == nullptr) return err;
    return launch_stats<LseStats<StatsShape<T>, true>>(column_operands<T>(p), params, stream);
  });
}

cudaError_t infonce_pair_fwd(const CoreProblem& p, const float* neg_lse, float* loss_sum,
                             float* sigmoid_sum, cudaStream_t stream) {
  return with_element_type<false>(p.type, [&](auto tag) {
    using T = decltype(tag);
    const PairStatsParams params{p.scale, p.masks, static_cast<int>(p.n), static_cast<int>(p.m),
                                 neg_lse, loss_sum, sigmoid_sum};
    return launch_stats<PairStats<StatsShape<T>>>(row_operands<T>(p), params, stream);
  });
}

cudaError_t infonce_bwd(const CoreProblem& p, const InfoNceGradTerms& terms,
                        const float* grad_scale, void* dq, void* dk, float* dscale,
                        double* workspace, cudaStream_t stream) {
  return with_element_type<false>(p.type, [&](auto tag) {
    using T = decltype(tag);
    const InfoNceGradParams params{p.scale, p.masks, static_cast<int>(p.n),
                                   static_cast<int>(p.m), terms, grad_scale};
    cudaError_t err = launch_grad<InfoNceGrad<GradShape<T>, false>>(
        row_operands<T>(p), params, {static_cast<T*>(dq), workspace}, stream);
    if (err == cudaSuccess && dk != nullptr) {
      err = launch_grad<InfoNceGrad<GradShape<T>, true>>(column_operands<T>(p), params,
                                                         {static_cast<T*>(dk), nullptr}, stream);
    }
    if (err != cudaSuccess) return err;
    return sum_partials(workspace, grad_blocks(p.n), dscale, nullptr, stream);
  });
}

cudaError_t siglip_fwd(const CoreProblem& p, const float* bias, float* row_loss,
                       cudaStream_t stream) {
  return with_element_type<false>(p.type, [&](auto tag) {
    using T = decltype(tag);
    const SiglipParams params{p.scale, bias, p.masks.q_labels, p.masks.k_labels,
                              static_cast<int>(p.n), static_cast<int>(p.m), row_loss, nullptr,
                              nullptr};
    return launch_stats<SiglipStats<StatsShape<T>>>(row_operands<T>(p), params, stream);
  });
}

cudaError_t siglip_bwd(const CoreProblem& p, const float* bias, const float* row_coef,
                       const float* grad_scale, void* dq, void* dk, float* dscale, float* dbias,
                       double* workspace, cudaStream_t stream) {
  return with_element_type<false>(p.type, [&](auto tag) {
    using T = decltype(tag);
    const SiglipParams params{p.scale, bias, p.masks.q_labels, p.masks.k_labels,
                              static_cast<int>(p.n), static_cast<int>(p.m), nullptr, row_coef,
                              grad_scale};
    cudaError_t err = launch_grad<SiglipGrad<GradShape<T>, false>>(
        row_operands<T>(p), params, {static_cast<T*>(dq), workspace}, stream);
    if (err == cudaSuccess && dk != nullptr) {
      err = launch_grad<SiglipGrad<GradShape<T>, true>>(column_operands<T>(p), params,
                                                        {static_cast<T*>(dk), nullptr}, stream);
    }
    if (err != cudaSuccess) return err;
    return sum_partials(workspace, grad_blocks(p.n), dscale, dbias, stream);
  });
}

}  // namespace pyclloss::cuda
