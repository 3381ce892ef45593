// CUDA kernels of the differentiable sorting networks (diffsort semantics,
// as csrc/cpu/sorting.cpp).
//
// One warp per row, persistent: a launch runs at most kResidentWarpsPerSm
// warps per multiprocessor, and warp w takes rows w, w + warps, w + 2·warps...
//
// The network is the flat comparator list; a first one-thread kernel splits it
// into runs of comparators on disjoint wires (the layers) and checks it. In a
// run every lane takes its own comparators, so the run's alphas are computed
// in parallel and the values mixed without conflicts; __syncwarp separates
// runs. Per row the values live in shared memory, and
//
// * the forward of diff_sort keeps Pᵀ (wire-major) in shared memory: for every
//   comparator of a run, broadcast by shuffles, each lane mixes its own
//   columns of the two wires' rows, so Pᵀ needs no synchronisation at all;
// * the backward records d = b - a, alpha and d alpha / d d per comparator in
//   the warp's slice of the workspace; P's gradient pushes 32 rows of P at a
//   time forwards (lane k: row k of P, storing its lo - hi difference at every
//   comparator) and the same rows of dP backwards, and the alphas' adjoints
//   (sums over the 32 lanes) are reduced 32 comparators at a time by a
//   transposing butterfly, one shuffle per comparator;
// * the P-free ops run the values forwards and a second vector through the
//   reversed runs, O(n · layers).
//
// Element types: float64 (arithmetic in float64), float32, float16 and
// bfloat16 (arithmetic, alphas and P in float32).

#include "pyclloss/sorting_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <type_traits>

namespace pyclloss::cuda {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 4;
constexpr int kResidentWarpsPerSm = 16;
// Rows of a chunk of P (one per lane) in the backward, padded to 33 columns so
// that a lane walking a wire's row and a lane walking a chunk row hit distinct
// banks.
constexpr int kChunkPitch = kWarp + 1;
// Cap on the workspace of the per-warp records, in values.
constexpr int64_t kWorkspaceValues = int64_t{1} << 26;
// Dynamic shared memory a launch may use without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

constexpr double kPi = 3.14159265358979323846;
constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kSqrt2Pi = 2.50662827463100050242;
constexpr double kLogisticPhiEps = 1e-10;  // LOGISTIC_PHI_EPS of the reference

// ----------------------------------------------------------------- element types

template <typename T>
struct Element {
  using Acc = float;
  static __device__ __forceinline__ float load(T x) { return static_cast<float>(x); }
  static __device__ __forceinline__ T store(float x) { return static_cast<T>(x); }
};

template <>
struct Element<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};

template <>
struct Element<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Element<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) {
    return __float2bfloat16_rn(x);
  }
};

template <typename T>
using AccOf = typename Element<T>::Acc;

size_t acc_bytes(ElementType type) {
  return type == ElementType::kFloat64 ? sizeof(double) : sizeof(float);
}

// ------------------------------------------------------------------- relaxations

__device__ __forceinline__ float math_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double math_abs(double x) { return fabs(x); }
__device__ __forceinline__ float math_exp(float x) { return expf(x); }
__device__ __forceinline__ double math_exp(double x) { return exp(x); }
__device__ __forceinline__ float math_erf(float x) { return erff(x); }
__device__ __forceinline__ double math_erf(double x) { return erf(x); }
__device__ __forceinline__ float math_atan(float x) { return atanf(x); }
__device__ __forceinline__ double math_atan(double x) { return atan(x); }
__device__ __forceinline__ float math_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double math_pow(double x, double y) { return pow(x, y); }

// Same order as DISTRIBUTIONS in pyclloss/reference/sorting.py.
enum Distribution : int { kLogistic, kLogisticPhi, kGaussian, kCauchy, kReciprocal, kOptimal };

template <typename A>
struct Relax {
  int distribution;
  A steepness;
  A art_lambda;

  // alpha = f(d) for d = b - a and d alpha / d d. The distribution is the same
  // for every thread, so the switch does not diverge; callers that drop dalpha
  // get its computation removed.
  __device__ __forceinline__ void operator()(A d, A& alpha, A& dalpha) const {
    const A v = steepness * d;
    switch (distribution) {
      case kLogistic: {
        alpha = sigmoid(v);
        dalpha = steepness * alpha * (A(1) - alpha);
        break;
      }
      case kLogisticPhi: {
        const A r = math_abs(d) + A(kLogisticPhiEps);
        const A scale = math_pow(r, -art_lambda);
        alpha = sigmoid(v * scale);
        dalpha = alpha * (A(1) - alpha) * steepness * scale * (A(1) - art_lambda * math_abs(d) / r);
        break;
      }
      case kGaussian: {
        alpha = A(0.5) * (A(1) + math_erf(v * A(1 / kSqrt2)));
        dalpha = steepness * math_exp(A(-0.5) * v * v) * A(1 / kSqrt2Pi);
        break;
      }
      case kCauchy: {
        alpha = math_atan(v) * A(1 / kPi) + A(0.5);
        dalpha = steepness / (A(kPi) * (A(1) + v * v));
        break;
      }
      case kReciprocal: {
        const A den = A(2) + math_abs(v);
        alpha = A(0.5) * (v / den + A(1));
        dalpha = steepness / (den * den);
        break;
      }
      default: {  // kOptimal
        const bool tail = math_abs(v) > A(0.25);
        alpha = v > A(0.25) ? A(1) - A(1) / (A(16) * v)
                            : (v < A(-0.25) ? -A(1) / (A(16) * v) : v + A(0.5));
        dalpha = tail ? steepness / (A(16) * v * v) : steepness;
        break;
      }
    }
  }

 private:
  static __device__ __forceinline__ A sigmoid(A v) { return A(1) / (A(1) + math_exp(-v)); }
};

// The comparator's 2×2 block [[alpha, 1-alpha], [1-alpha, alpha]]; symmetric,
// so it also carries adjoints backwards.
template <typename A>
__device__ __forceinline__ void mix(A& lo, A& hi, A alpha) {
  const A a = lo;
  const A b = hi;
  lo = alpha * a + (A(1) - alpha) * b;
  hi = (A(1) - alpha) * a + alpha * b;
}

// ------------------------------------------------------------------------ network

// runs[0] = number of runs R, runs[1 + r] = first comparator of run r,
// runs[1 + R] = count: count + 2 ints.
__global__ void find_runs_kernel(const int32_t* __restrict__ comparators, int count, int wires,
                                 int* __restrict__ runs) {
  __shared__ int last_run[kMaxApplyWires];  // the run that last touched each wire
  for (int w = 0; w < wires; ++w) last_run[w] = -1;
  int run = -1;
  for (int c = 0; c < count; ++c) {
    const int lo = comparators[2 * c];
    const int hi = comparators[2 * c + 1];
    if (lo < 0 || lo >= wires || hi < 0 || hi >= wires || lo == hi) {
      // The op's Python layer builds the list; a bad one is a bug, reported
      // like a device-side assert.
      printf("pyclloss diff_sort: comparator %d = (%d, %d) is not a pair of wires of %d\n", c,
             lo, hi, wires);
      __trap();
    }
    if (run < 0 || last_run[lo] == run || last_run[hi] == run) runs[1 + ++run] = c;
    last_run[lo] = last_run[hi] = run;
  }
  runs[0] = run + 1;
  runs[run + 2] = count;
}

struct Network {
  const int32_t* __restrict__ comparators;
  const int* __restrict__ runs;
  int count;
  int wires;

  __device__ __forceinline__ int num_runs() const { return runs[0]; }
  __device__ __forceinline__ int run_begin(int r) const { return runs[1 + r]; }
  __device__ __forceinline__ int run_end(int r) const { return runs[2 + r]; }
  __device__ __forceinline__ int lo(int c) const { return comparators[2 * c]; }
  __device__ __forceinline__ int hi(int c) const { return comparators[2 * c + 1]; }
};

// step(c) for every comparator, run after run, each lane taking its own
// comparators of a run; the runs' writes to shared memory are visible to the
// next run.
template <typename Step>
__device__ __forceinline__ void for_each_comparator(const Network& net, int lane, Step&& step) {
  const int runs = net.num_runs();
  for (int r = 0; r < runs; ++r) {
    for (int c = net.run_begin(r) + lane; c < net.run_end(r); c += kWarp) step(c);
    __syncwarp();
  }
}

// The same with the runs in reverse order.
template <typename Step>
__device__ __forceinline__ void for_each_comparator_reversed(const Network& net, int lane,
                                                             Step&& step) {
  for (int r = net.num_runs() - 1; r >= 0; --r) {
    for (int c = net.run_begin(r) + lane; c < net.run_end(r); c += kWarp) step(c);
    __syncwarp();
  }
}

// ------------------------------------------------------------------- warp layout

// The warp's place in the persistent grid: its first row, the row stride, its
// lane, and its slices of dynamic shared memory and of the workspace.
template <typename A>
struct WarpSlot {
  int64_t first_row;
  int64_t stride;
  int lane;
  A* shared;
  A* records;
};

template <typename A>
__device__ __forceinline__ WarpSlot<A> warp_slot(int shared_per_warp, int64_t records_per_warp,
                                                 A* workspace) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int warp_in_block = threadIdx.x / kWarp;
  const int64_t warp = int64_t{blockIdx.x} * (blockDim.x / kWarp) + warp_in_block;
  WarpSlot<A> slot;
  slot.first_row = warp;
  slot.stride = int64_t{gridDim.x} * (blockDim.x / kWarp);
  slot.lane = threadIdx.x % kWarp;
  slot.shared = reinterpret_cast<A*>(shared_bytes) + warp_in_block * shared_per_warp;
  slot.records = workspace + warp * records_per_warp;
  return slot;
}

template <typename T, typename A>
__device__ __forceinline__ void load_row(A* dst, const T* src, int n, int lane) {
  for (int w = lane; w < n; w += kWarp) dst[w] = src ? Element<T>::load(src[w]) : A(0);
}

template <typename T, typename A>
__device__ __forceinline__ void store_row(T* dst, const A* src, int n, int lane) {
  for (int w = lane; w < n; w += kWarp) dst[w] = Element<T>::store(src[w]);
}

// Lane l holds parts[i] of the sums of 32 values (i < 32) over the warp; on
// return it holds the whole sum of value l. Each halving step exchanges half
// of the values left: 31 shuffles for 32 sums.
template <typename A>
__device__ __forceinline__ A transpose_sum(A (&parts)[kWarp], int lane) {
#pragma unroll
  for (int width = kWarp / 2; width >= 1; width /= 2) {
    const bool upper = lane & width;
#pragma unroll
    for (int i = 0; i < width; ++i) {
      // Lanes with bit `width` keep value i + width, the others value i.
      const A send = upper ? parts[i] : parts[i + width];
      const A keep = upper ? parts[i + width] : parts[i];
      parts[i] = keep + __shfl_xor_sync(kFullMask, send, width);
    }
  }
  return parts[0];
}

// ------------------------------------------------------------------------ kernels

// sorted and P of every row. Shared per warp: y (n), then Pᵀ (n rows of
// pitch = n | 1: odd, so that the transposing store is free of bank conflicts).
template <typename T>
__global__ void sort_forward_kernel(const T* __restrict__ x, T* __restrict__ sorted,
                                    T* __restrict__ perm, int64_t rows, Network net,
                                    Relax<AccOf<T>> relax) {
  using A = AccOf<T>;
  const int n = net.wires;
  const int pitch = n | 1;
  const WarpSlot<A> slot = warp_slot<A>(n + n * pitch, 0, static_cast<A*>(nullptr));
  const int lane = slot.lane;
  A* y = slot.shared;
  A* pt = y + n;
  for (int64_t row = slot.first_row; row < rows; row += slot.stride) {
    __syncwarp();  // the previous row's transposing store has read every column
    load_row(y, x + row * n, n, lane);
    for (int w = 0; w < n; ++w) {
      for (int j = lane; j < n; j += kWarp) pt[w * pitch + j] = A(w == j);
    }
    __syncwarp();
    const int runs = net.num_runs();
    for (int r = 0; r < runs; ++r) {
      const int end = net.run_end(r);
      for (int base = net.run_begin(r); base < end; base += kWarp) {
        const int c = base + lane;
        int lo = 0, hi = 0;
        A alpha = A(1), dalpha;
        if (c < end) {
          lo = net.lo(c);
          hi = net.hi(c);
          relax(y[hi] - y[lo], alpha, dalpha);
          mix(y[lo], y[hi], alpha);
        }
        // Pᵀ: every comparator of the chunk on the lane's own columns.
        const int chunk = min(kWarp, end - base);
        for (int k = 0; k < chunk; ++k) {
          const int lo_k = __shfl_sync(kFullMask, lo, k);
          const int hi_k = __shfl_sync(kFullMask, hi, k);
          const A alpha_k = __shfl_sync(kFullMask, alpha, k);
          for (int j = lane; j < n; j += kWarp) {
            mix(pt[lo_k * pitch + j], pt[hi_k * pitch + j], alpha_k);
          }
        }
      }
      __syncwarp();
    }
    store_row(sorted + row * n, y, n, lane);
    T* p = perm + row * n * n;
    for (int i = 0; i < n; ++i) {
      for (int w = lane; w < n; w += kWarp) p[i * n + w] = Element<T>::store(pt[w * pitch + i]);
    }
  }
}

// Per-comparator records of the value chain in a warp's workspace slice.
template <typename A>
struct ChainRecords {
  A* d;
  A* alpha;
  A* dalpha;
  A* adjoint;  // the alphas' adjoints (sort), or u_lo - u_hi (apply)

  __device__ __forceinline__ ChainRecords(A* base, int count)
      : d(base), alpha(base + count), dalpha(base + 2 * count), adjoint(base + 3 * count) {}
  static constexpr int kPerComparator = 4;
};

// The value chain forwards on y (shared), recording d, alpha and dalpha;
// extra(c, lo, hi, alpha) runs per comparator before y is mixed.
template <typename A, typename Extra>
__device__ __forceinline__ void record_value_chain(A* y, const Network& net,
                                                   const Relax<A>& relax,
                                                   const ChainRecords<A>& rec, int lane,
                                                   Extra&& extra) {
  for_each_comparator(net, lane, [&](int c) {
    const int lo = net.lo(c);
    const int hi = net.hi(c);
    const A d = y[hi] - y[lo];
    A alpha, dalpha;
    relax(d, alpha, dalpha);
    rec.d[c] = d;
    rec.alpha[c] = alpha;
    rec.dalpha[c] = dalpha;
    extra(c, lo, hi, alpha);
    mix(y[lo], y[hi], alpha);
  });
}

// One comparator of the value chain's reverse sweep on the adjoint g (shared).
template <typename A>
__device__ __forceinline__ void value_chain_step_back(A* g, int lo, int hi, A d, A alpha,
                                                      A dalpha, A adjoint_alpha) {
  A ga = g[lo];
  A gb = g[hi];
  // alpha mixes a and b: d y'_lo / d alpha = a - b = -d, d y'_hi / d alpha = d.
  const A adj_d = (adjoint_alpha - d * (ga - gb)) * dalpha;
  mix(ga, gb, alpha);
  g[lo] = ga - adj_d;
  g[hi] = gb + adj_d;
}

// The alphas' adjoints from P's gradient, added to rec.adjoint. Shared per
// warp: a chunk of 32 rows of P and one of dP, wire-major (n × kChunkPitch);
// workspace: the chunk's lo - hi differences at every comparator (count × 32).
template <typename T, typename A>
__device__ void perm_adjoints(const T* __restrict__ grad_perm, const Network& net,
                              const ChainRecords<A>& rec, A* p, A* g, A* diffs, int lane) {
  const int n = net.wires;
  const int count = net.count;
  for (int k0 = 0; k0 < n; k0 += kWarp) {
    // Lane k pushes row k0 + k of P forwards: P starts as the identity.
    for (int w = 0; w < n; ++w) p[w * kChunkPitch + lane] = A(w == k0 + lane);
    for (int c = 0; c < count; ++c) {
      A& a = p[net.lo(c) * kChunkPitch + lane];
      A& b = p[net.hi(c) * kChunkPitch + lane];
      diffs[c * kWarp + lane] = a - b;
      mix(a, b, rec.alpha[c]);
    }
    __syncwarp();  // the previous chunk's lanes are done with g
    for (int k = 0; k < kWarp; ++k) {
      const T* src = k0 + k < n ? grad_perm + (k0 + k) * n : nullptr;
      for (int w = lane; w < n; w += kWarp) {
        g[w * kChunkPitch + k] = src ? Element<T>::load(src[w]) : A(0);
      }
    }
    __syncwarp();
    // dP backwards, 32 comparators at a time, from the last.
    for (int top = (count - 1) / kWarp * kWarp; top >= 0; top -= kWarp) {
      A parts[kWarp];
#pragma unroll
      for (int i = kWarp - 1; i >= 0; --i) {
        const int c = top + i;
        parts[i] = A(0);
        if (c < count) {
          A& a = g[net.lo(c) * kChunkPitch + lane];
          A& b = g[net.hi(c) * kChunkPitch + lane];
          parts[i] = diffs[c * kWarp + lane] * (a - b);
          mix(a, b, rec.alpha[c]);
        }
      }
      const A sum = transpose_sum(parts, lane);
      if (top + lane < count) rec.adjoint[top + lane] += sum;
    }
    __syncwarp();  // the adjoints are read by other lanes next
  }
}

// grad_x. Shared per warp: the values, then the adjoint (n), and with P's
// gradient the two chunks; workspace: ChainRecords, then the differences.
template <typename T, bool kWithPerm>
__global__ void sort_backward_kernel(const T* __restrict__ x, const T* __restrict__ grad_sorted,
                                     const T* __restrict__ grad_perm, T* __restrict__ grad_x,
                                     int64_t rows, Network net, Relax<AccOf<T>> relax,
                                     AccOf<T>* __restrict__ workspace) {
  using A = AccOf<T>;
  const int n = net.wires;
  const int count = net.count;
  const int shared_per_warp = n + (kWithPerm ? 2 * n * kChunkPitch : 0);
  const int64_t records_per_warp =
      int64_t{count} * (ChainRecords<A>::kPerComparator + (kWithPerm ? kWarp : 0));
  const WarpSlot<A> slot = warp_slot<A>(shared_per_warp, records_per_warp, workspace);
  const int lane = slot.lane;
  A* y = slot.shared;
  const ChainRecords<A> rec(slot.records, count);
  for (int64_t row = slot.first_row; row < rows; row += slot.stride) {
    __syncwarp();
    load_row(y, x + row * n, n, lane);
    __syncwarp();
    record_value_chain(y, net, relax, rec, lane,
                       [&](int c, int, int, A) { rec.adjoint[c] = A(0); });
    if constexpr (kWithPerm) {
      A* p = y + n;
      perm_adjoints(grad_perm + row * n * n, net, rec, p, p + n * kChunkPitch,
                    rec.adjoint + count, lane);
    }
    load_row(y, grad_sorted ? grad_sorted + row * n : nullptr, n, lane);
    __syncwarp();
    for_each_comparator_reversed(net, lane, [&](int c) {
      value_chain_step_back(y, net.lo(c), net.hi(c), rec.d[c], rec.alpha[c], rec.dalpha[c],
                            rec.adjoint[c]);
    });
    store_row(grad_x + row * n, y, n, lane);
  }
}

// P v per row: the value chain records the alphas, then v runs through the
// reversed runs (P v = M_1 (M_2 (... (M_L v)))). Shared per warp: n values.
template <typename T>
__global__ void apply_forward_kernel(const T* __restrict__ x, const T* __restrict__ v,
                                     T* __restrict__ out, int64_t rows, Network net,
                                     Relax<AccOf<T>> relax, AccOf<T>* __restrict__ workspace) {
  using A = AccOf<T>;
  const int n = net.wires;
  const WarpSlot<A> slot = warp_slot<A>(n, net.count, workspace);
  const int lane = slot.lane;
  A* y = slot.shared;
  A* alphas = slot.records;
  for (int64_t row = slot.first_row; row < rows; row += slot.stride) {
    __syncwarp();
    load_row(y, x + row * n, n, lane);
    __syncwarp();
    for_each_comparator(net, lane, [&](int c) {
      const int lo = net.lo(c);
      const int hi = net.hi(c);
      A dalpha;
      relax(y[hi] - y[lo], alphas[c], dalpha);
      mix(y[lo], y[hi], alphas[c]);
    });
    load_row(y, v + row * n, n, lane);
    __syncwarp();
    for_each_comparator_reversed(
        net, lane, [&](int c) { mix(y[net.lo(c)], y[net.hi(c)], alphas[c]); });
    store_row(out + row * n, y, n, lane);
  }
}

// grad_x and grad_v of P v. With dP = g vᵀ the adjoint of alpha_c is
// (u_lo - u_hi)(w_lo - w_hi): u = gᵀ·(layers before c) runs forwards with the
// values (u at the end is Pᵀ g = grad_v), w = (layers after c)·v backwards with
// the values' adjoint. Shared per warp: 2n values (y then the adjoint, u then w).
template <typename T>
__global__ void apply_backward_kernel(const T* __restrict__ x, const T* __restrict__ v,
                                      const T* __restrict__ grad_out, T* __restrict__ grad_x,
                                      T* __restrict__ grad_v, int64_t rows, Network net,
                                      Relax<AccOf<T>> relax, AccOf<T>* __restrict__ workspace) {
  using A = AccOf<T>;
  const int n = net.wires;
  const WarpSlot<A> slot =
      warp_slot<A>(2 * n, int64_t{net.count} * ChainRecords<A>::kPerComparator, workspace);
  const int lane = slot.lane;
  A* y = slot.shared;
  A* u = y + n;
  const ChainRecords<A> rec(slot.records, net.count);
  for (int64_t row = slot.first_row; row < rows; row += slot.stride) {
    __syncwarp();
    load_row(y, x + row * n, n, lane);
    load_row(u, grad_out + row * n, n, lane);
    __syncwarp();
    record_value_chain(y, net, relax, rec, lane, [&](int c, int lo, int hi, A alpha) {
      rec.adjoint[c] = u[lo] - u[hi];
      mix(u[lo], u[hi], alpha);
    });
    store_row(grad_v + row * n, u, n, lane);
    __syncwarp();
    A* g = y;
    A* w = u;
    load_row(g, static_cast<const T*>(nullptr), n, lane);
    load_row(w, v + row * n, n, lane);
    __syncwarp();
    for_each_comparator_reversed(net, lane, [&](int c) {
      const int lo = net.lo(c);
      const int hi = net.hi(c);
      const A alpha = rec.alpha[c];
      const A adjoint_alpha = rec.adjoint[c] * (w[lo] - w[hi]);
      mix(w[lo], w[hi], alpha);
      value_chain_step_back(g, lo, hi, rec.d[c], alpha, rec.dalpha[c], adjoint_alpha);
    });
    store_row(grad_x + row * n, g, n, lane);
  }
}

// --------------------------------------------------------------------- launchers

// Values per warp in the workspace (records) and in shared memory.
struct WarpFootprint {
  int64_t records;
  int64_t shared;
};

WarpFootprint footprint(SortOp op, const SortNetwork& network) {
  const int64_t n = network.wires;
  const int64_t count = network.count;
  const int64_t chain = count * ChainRecords<float>::kPerComparator;
  switch (op) {
    case SortOp::kSortForward:
      return {0, n + n * (n | 1)};
    case SortOp::kSortBackward:
      return {chain, n};
    case SortOp::kSortBackwardWithPerm:
      return {chain + count * kWarp, n + 2 * n * kChunkPitch};
    case SortOp::kApplyForward:
      return {count, n};
    case SortOp::kApplyBackward:
      return {chain, 2 * n};
  }
  return {0, 0};
}

// The persistent grid of a launch: at most kResidentWarpsPerSm warps per
// multiprocessor, within the workspace cap, never many more than rows; as
// many warps per block as fit in the default shared memory (at least one).
struct LaunchShape {
  int warps_per_block;
  int blocks;
  size_t shared_bytes;
  int64_t records_per_warp;

  int64_t warps() const { return int64_t{blocks} * warps_per_block; }
  size_t records_bytes(ElementType type) const {
    return static_cast<size_t>(warps() * records_per_warp) * acc_bytes(type);
  }
};

LaunchShape launch_shape(SortOp op, ElementType type, int64_t rows,
                         const SortNetwork& network) {
  const WarpFootprint per_warp = footprint(op, network);
  const size_t warp_bytes = per_warp.shared * acc_bytes(type);
  const int warps_per_block = static_cast<int>(std::clamp<size_t>(
      kDefaultSharedBytes / std::max<size_t>(warp_bytes, 1), 1, kWarpsPerBlock));
  int device = 0;
  int sms = 1;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 1;  // the launch reports the error
  }
  int64_t warps = std::min<int64_t>(rows, int64_t{sms} * kResidentWarpsPerSm);
  if (per_warp.records > 0) {
    warps = std::min(warps, kWorkspaceValues / per_warp.records);
  }
  warps = std::max<int64_t>(warps, 1);
  const int blocks = static_cast<int>((warps + warps_per_block - 1) / warps_per_block);
  return {warps_per_block, blocks, warps_per_block * warp_bytes, per_warp.records};
}

// Finds the runs, then launches kernel<<<...>>>(args..., rows, net, relax
// [, records]) on the op's launch shape. Workspace: the warps' records, then
// the runs (count + 2 ints).
template <typename A, typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, SortOp op, ElementType type, int64_t rows,
                   const SortNetwork& network, const SortRelaxation& relaxation,
                   void* workspace, cudaStream_t stream, Args... args) {
  if (rows == 0) return cudaSuccess;
  const LaunchShape shape = launch_shape(op, type, rows, network);
  A* records = static_cast<A*>(workspace);
  int* runs = reinterpret_cast<int*>(static_cast<unsigned char*>(workspace) +
                                     shape.records_bytes(type));
  const int count = static_cast<int>(network.count);
  find_runs_kernel<<<1, 1, 0, stream>>>(network.comparators, count, network.wires, runs);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (shape.shared_bytes > kDefaultSharedBytes) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shape.shared_bytes));
    if (err != cudaSuccess) return err;
  }
  const Network net{network.comparators, runs, count, network.wires};
  const Relax<A> relax{static_cast<int>(relaxation.distribution), A(relaxation.steepness),
                       A(relaxation.art_lambda)};
  const dim3 grid(shape.blocks);
  const dim3 block(shape.warps_per_block * kWarp);
  if constexpr (std::is_invocable_v<Kernel, Args..., int64_t, Network, Relax<A>, A*>) {
    kernel<<<grid, block, shape.shared_bytes, stream>>>(args..., rows, net, relax, records);
  } else {
    kernel<<<grid, block, shape.shared_bytes, stream>>>(args..., rows, net, relax);
  }
  return cudaGetLastError();
}

}  // namespace

size_t sort_workspace_bytes(SortOp op, ElementType type, int64_t rows,
                            const SortNetwork& network) {
  const size_t records = rows == 0 ? 0 : launch_shape(op, type, rows, network).records_bytes(type);
  return records + (network.count + 2) * sizeof(int);
}

cudaError_t diff_sort_forward(ElementType type, const void* x, int64_t rows,
                              const SortNetwork& network, const SortRelaxation& relaxation,
                              void* sorted, void* perm, void* workspace, cudaStream_t stream) {
  return with_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    return launch<AccOf<T>>(sort_forward_kernel<T>, SortOp::kSortForward, type, rows, network,
                            relaxation, workspace, stream, static_cast<const T*>(x),
                            static_cast<T*>(sorted), static_cast<T*>(perm));
  });
}

cudaError_t diff_sort_backward(ElementType type, const void* x, const void* grad_sorted,
                               const void* grad_perm, int64_t rows, const SortNetwork& network,
                               const SortRelaxation& relaxation, void* grad_x, void* workspace,
                               cudaStream_t stream) {
  return with_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    const auto* gs = static_cast<const T*>(grad_sorted);
    const auto* gp = static_cast<const T*>(grad_perm);
    if (gp != nullptr) {
      return launch<AccOf<T>>(sort_backward_kernel<T, true>, SortOp::kSortBackwardWithPerm, type,
                              rows, network, relaxation, workspace, stream,
                              static_cast<const T*>(x), gs, gp, static_cast<T*>(grad_x));
    }
    return launch<AccOf<T>>(sort_backward_kernel<T, false>, SortOp::kSortBackward, type, rows,
                            network, relaxation, workspace, stream, static_cast<const T*>(x), gs,
                            gp, static_cast<T*>(grad_x));
  });
}

cudaError_t diff_sort_apply_forward(ElementType type, const void* x, const void* v,
                                    int64_t rows, const SortNetwork& network,
                                    const SortRelaxation& relaxation, void* out, void* workspace,
                                    cudaStream_t stream) {
  return with_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    return launch<AccOf<T>>(apply_forward_kernel<T>, SortOp::kApplyForward, type, rows, network,
                            relaxation, workspace, stream, static_cast<const T*>(x),
                            static_cast<const T*>(v), static_cast<T*>(out));
  });
}

cudaError_t diff_sort_apply_backward(ElementType type, const void* x, const void* v,
                                     const void* grad_out, int64_t rows,
                                     const SortNetwork& network, const SortRelaxation& relaxation,
                                     void* grad_x, void* grad_v, void* workspace,
                                     cudaStream_t stream) {
  return with_element_type(type, [&](auto tag) {
    using T = decltype(tag);
    return launch<AccOf<T>>(apply_backward_kernel<T>, SortOp::kApplyBackward, type, rows,
                            network, relaxation, workspace, stream, static_cast<const T*>(x),
                            static_cast<const T*>(v), static_cast<const T*>(grad_out),
                            static_cast<T*>(grad_x), static_cast<T*>(grad_v));
  });
}

}  // namespace pyclloss::cuda
