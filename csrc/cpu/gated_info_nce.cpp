// CPU kernels of the gated-subspace (Hydra / SimLAP) loss: the three ops of
// docs/gated_info_nce.md.
//
// The gated logit l_bn = s <q_b g_b, k_n g_b> / (|q_b g_b| |k_n g_b|) never
// builds the B x N x K tensor of gated keys: with a = q g^2 (per anchor) its
// numerator is a k^T and its squared key norm is (g^2)(k k)^T, two GEMMs over
// the same key tile. Every kernel streams (row block x column block) pairs of
// those tiles into thread-local buffers; a vectorized epilogue turns them into
// statistics (forward) or into the coefficients of the gradient, which two
// more GEMMs against k and k k (or a and g^2) accumulate (backward). Backward
// recomputes the tiles: dq and dgates in a pass over anchor blocks, dk in a
// pass over key blocks, so no thread adds into another's rows and the result
// does not depend on the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "pyclloss/cpu_args.h"
#include "pyclloss/cpu_math.h"
#include "pyclloss/cpu_tile.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;

// Gated norms are clamped below at kNormEps, as F.normalize does: a norm at or
// under it divides by kNormEps and passes no gradient through the norm.
constexpr double kNormEps = 1e-12;

// Which pairs of a tile are positives (partner class) or negatives (neither
// the anchor's own class nor its partner's), in tile-local indices
// (i: anchor, j: key). Conditions combine with `&` to keep loops branch-free.
struct GatedMask {
  const int32_t* own;      // at the tile's first anchor
  const int32_t* partner;  // at the tile's first anchor
  const int32_t* key;      // at the tile's first key

  bool positive(int32_t i, int32_t j) const { return partner[i] == key[j]; }
  bool negative(int32_t i, int32_t j) const {
    return (own[i] != key[j]) & (partner[i] != key[j]);
  }
  GatedMask at(int64_t anchor0, int64_t key0) const {
    return {own + anchor0, partner + anchor0, key + key0};
  }
};

// A tile is row-major (outer x inner): anchor-major (outer rows are anchors)
// or key-major (its transpose).
template <bool kKeyMajor>
inline int32_t anchor_index(int32_t outer, int32_t inner) {
  return kKeyMajor ? inner : outer;
}

template <bool kKeyMajor>
inline int32_t key_index(int32_t outer, int32_t inner) {
  return kKeyMajor ? outer : inner;
}

// ------------------------------------------------------------ tile epilogues

// Turns a tile of numerators a.k into logits, and the matching tile of
// squared gated key norms into their clamped inverses 1/max(|k g|, eps).
// anchor_scale = s / max(|q g|, eps), at the tile's first anchor.
template <typename acc_t, bool kKeyMajor>
PYCLLOSS_VECTOR_CLONES void gated_logits_tile(acc_t* dots, acc_t* sq_norms, int32_t outer,
                                              int32_t inner, const acc_t* anchor_scale) {
  for (int32_t o = 0; o < outer; ++o) {
    acc_t* dot = dots + o * inner;
    acc_t* sq = sq_norms + o * inner;
#pragma omp simd
    for (int32_t n = 0; n < inner; ++n) {
      const acc_t inv_norm = acc_t(1) / std::max(std::sqrt(sq[n]), acc_t(kNormEps));
      dot[n] *= anchor_scale[anchor_index<kKeyMajor>(o, n)] * inv_norm;
      sq[n] = inv_norm;
    }
  }
}

// Folds an anchor-major tile of logits into the running (max, sum) state of
// each anchor's LSE over its negatives, and counts its positives. `sum` is
// relative to `max`; an anchor without negatives yet stays at (-inf, 0).
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void negatives_tile(acc_t* logits, int32_t rows, int32_t cols,
                                           GatedMask mask, acc_t* run_max, acc_t* run_sum,
                                           acc_t* pos_count) {
  for (int32_t i = 0; i < rows; ++i) {
    acc_t* row = logits + i * cols;
    acc_t tile_max = kNegInf<acc_t>;
    acc_t count = 0;
#pragma omp simd reduction(max : tile_max) reduction(+ : count)
    for (int32_t j = 0; j < cols; ++j) {
      count += mask.positive(i, j) ? acc_t(1) : acc_t(0);
      row[j] = mask.negative(i, j) ? row[j] : kNegInf<acc_t>;
      tile_max = std::max(tile_max, row[j]);
    }
    pos_count[i] += count;
    const acc_t new_max = std::max(run_max[i], tile_max);
    if (new_max == kNegInf<acc_t>) {
      continue;
    }
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int32_t j = 0; j < cols; ++j) {
      sum += exp_nonpositive(row[j] - new_max);
    }
    run_sum[i] = run_sum[i] * rescale_factor(run_max[i], new_max) + sum;
    run_max[i] = new_max;
  }
}

// Adds softplus and sigmoid of (neg_lse_b - l_bn) over the positives of an
// anchor-major tile of logits (pointers at the tile's first anchor).
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void positives_tile(const acc_t* logits, int32_t rows, int32_t cols,
                                           GatedMask mask, const acc_t* neg_lse,
                                           acc_t* loss_sum, acc_t* sigmoid_sum) {
  for (int32_t i = 0; i < rows; ++i) {
    const acc_t* row = logits + i * cols;
    acc_t loss = 0;
    acc_t weight = 0;
#pragma omp simd reduction(+ : loss, weight)
    for (int32_t j = 0; j < cols; ++j) {
      const bool pos = mask.positive(i, j);
      const acc_t margin = neg_lse[i] - row[j];
      loss += pos ? softplus(margin) : acc_t(0);
      weight += pos ? sigmoid(margin) : acc_t(0);
    }
    loss_sum[i] += loss;
    sigmoid_sum[i] += weight;
  }
}

// Per-anchor inputs of the backward epilogue (pointers at the tile's first
// anchor): G_bn = neg_coef_b exp(l_bn - neg_lse_b) [negative]
//               + pos_coef_b sigmoid(neg_lse_b - l_bn) [positive].
template <typename acc_t>
struct AnchorTerms {
  const acc_t* scale;  // s / max(|q g|, eps)
  const acc_t* neg_lse;
  const acc_t* neg_coef;
  const acc_t* pos_coef;

  AnchorTerms at(int64_t anchor0) const {
    return {scale + anchor0, neg_lse + anchor0, neg_coef + anchor0, pos_coef + anchor0};
  }
};

// Replaces a tile of logits by the coefficient of the numerator a.k in the
// gradient, G s / (|q g| |k g|), and the tile of inverse key norms by the
// coefficient of the squared key norm, G l / (2 |k g|^2) (0 where the norm is
// clamped). Adds sum_n G_bn l_bn to anchor_dlogit (anchor-major tiles only;
// null for key-major ones), from which the anchor-norm terms and dscale follow.
// A term is active only where its coefficient is nonzero, so a zero
// coefficient never meets an infinite LSE.
template <typename acc_t, bool kKeyMajor>
PYCLLOSS_VECTOR_CLONES void gradient_tile(acc_t* logits, acc_t* inv_norms, int32_t outer,
                                          int32_t inner, GatedMask mask, AnchorTerms<acc_t> terms,
                                          acc_t* anchor_dlogit) {
  constexpr acc_t kInvEps = acc_t(1) / acc_t(kNormEps);
  for (int32_t o = 0; o < outer; ++o) {
    acc_t* logit = logits + o * inner;
    acc_t* inv_norm = inv_norms + o * inner;
    acc_t dlogit_sum = 0;
#pragma omp simd reduction(+ : dlogit_sum)
    for (int32_t n = 0; n < inner; ++n) {
      const int32_t i = anchor_index<kKeyMajor>(o, n);
      const int32_t j = key_index<kKeyMajor>(o, n);
      const acc_t l = logit[n];
      const bool neg = mask.negative(i, j) & (terms.neg_coef[i] != acc_t(0));
      const bool pos = mask.positive(i, j) & (terms.pos_coef[i] != acc_t(0));
      const acc_t softmax = exp_approx(l - terms.neg_lse[i]);
      const acc_t pair_weight = sigmoid(terms.neg_lse[i] - l);
      const acc_t grad = (neg ? terms.neg_coef[i] * softmax : acc_t(0)) +
                         (pos ? terms.pos_coef[i] * pair_weight : acc_t(0));
      const acc_t inv = inv_norm[n];
      dlogit_sum += grad * l;
      logit[n] = grad * terms.scale[i] * inv;
      inv_norm[n] = inv < kInvEps ? acc_t(0.5) * grad * l * inv * inv : acc_t(0);
    }
    if (!kKeyMajor) {
      anchor_dlogit[o] += dlogit_sum;
    }
  }
}

// ---------------------------------------------------------------- operands

// One side of the tiles, in the accumulation type: `first` and `second` are
// the two row matrices whose products give a tile's numerators and squared
// norms (anchors: a = q g^2 and g^2; keys: k and k k). A side that supplies
// the columns of tiles also has them transposed per block of kInnerBlock rows
// (transposed_blocks). All O(rows * K).
struct Side {
  Tensor first;
  Tensor second;
  Tensor first_t;
  Tensor second_t;
};

Side make_side(Tensor first, Tensor second, bool columns) {
  if (!columns) {
    return {std::move(first), std::move(second), Tensor(), Tensor()};
  }
  Tensor first_t = transposed_blocks(first, kInnerBlock);
  Tensor second_t = transposed_blocks(second, kInnerBlock);
  return {std::move(first), std::move(second), std::move(first_t), std::move(second_t)};
}

// The anchors' side plus what their epilogues need: q and g themselves, the
// clamped gated norm max(|q g|, eps) and scale = s / that norm, per anchor.
struct Anchors {
  Tensor q;
  Tensor gates;
  Tensor norm;
  Tensor scale;
  Side side;
};

Anchors make_anchors(const Tensor& q, const Tensor& gates, const Tensor& scale,
                     at::ScalarType acc, bool columns) {
  Tensor q_acc = q.to(acc);
  Tensor g_acc = gates.to(acc);
  Tensor gate_sq = g_acc * g_acc;
  Tensor norm = (q_acc * g_acc).norm(2, {1}).clamp_min(kNormEps);
  Tensor anchor_scale = scale.to(acc) / norm;
  Side side = make_side(q_acc * gate_sq, gate_sq, columns);
  return {std::move(q_acc), std::move(g_acc), std::move(norm), std::move(anchor_scale),
          std::move(side)};
}

Side make_keys(const Tensor& k, at::ScalarType acc, bool columns) {
  Tensor k_acc = k.to(acc);
  Tensor k_sq = k_acc * k_acc;
  return make_side(std::move(k_acc), std::move(k_sq), columns);
}

// Buffers of one thread in tile_pass.
template <typename acc_t>
struct TileBuffers {
  std::vector<acc_t> dots;
  std::vector<acc_t> sq_norms;
  std::vector<acc_t> first_sum;
  std::vector<acc_t> second_sum;
};

// For every (outer block x inner block) pair: the tiles of numerators and
// squared norms, epilogue(dots, sq_norms, outer0, rows, inner0, cols); then,
// when `accumulate`, first_sum += dots * inner.first and
// second_sum += sq_norms * inner.second. After the last inner block,
// finish(outer0, rows, first_sum, second_sum). One task per outer block
// (for_each_tile), inner blocks in order.

template <typename acc_t, typename Epilogue, typename Finish>
void tile_pass(const Side& outer, const Side& inner, bool accumulate, const Epilogue& epilogue,
               const Finish& finish) {
  const int64_t n_outer = outer.first.size(0);
  const int64_t d = outer.first.size(1);
  for_each_tile(
      n_outer, inner.first.size(0), num_blocks(n_outer, kOuterBlock),
      [&] {
        const int64_t sums = accumulate ? kOuterBlock * d : 0;
        return TileBuffers<acc_t>{std::vector<acc_t>(kOuterBlock * kInnerBlock),
                                  std::vector<acc_t>(kOuterBlock * kInnerBlock),
                                  std::vector<acc_t>(sums), std::vector<acc_t>(sums)};
      },
      [](TileBuffers<acc_t>& buffers, int64_t, int64_t) {
        std::fill(buffers.first_sum.begin(), buffers.first_sum.end(), acc_t(0));
        std::fill(buffers.second_sum.begin(), buffers.second_sum.end(), acc_t(0));
      },
      [&](TileBuffers<acc_t>& buffers, int64_t outer0, int64_t rows, int64_t inner0, int64_t cols,
          int64_t) {
        acc_t* dots = buffers.dots.data();
        acc_t* sq_norms = buffers.sq_norms.data();
        const int64_t t_offset = inner0 * d;
        matmul(rows, cols, d, outer.first.data_ptr<acc_t>() + outer0 * d, d,
               inner.first_t.data_ptr<acc_t>() + t_offset, cols, dots, cols, false);
        matmul(rows, cols, d, outer.second.data_ptr<acc_t>() + outer0 * d, d,
               inner.second_t.data_ptr<acc_t>() + t_offset, cols, sq_norms, cols, false);
        epilogue(dots, sq_norms, outer0, rows, inner0, cols);
        if (accumulate) {
          matmul(rows, d, cols, dots, cols, inner.first.data_ptr<acc_t>() + inner0 * d, d,
                 buffers.first_sum.data(), d, true);
          matmul(rows, d, cols, sq_norms, cols, inner.second.data_ptr<acc_t>() + inner0 * d, d,
                 buffers.second_sum.data(), d, true);
        }
      },
      [&](TileBuffers<acc_t>& buffers, int64_t outer0, int64_t rows) {
        finish(outer0, rows, buffers.first_sum.data(), buffers.second_sum.data());
      });
}

// ------------------------------------------------------------- arguments

void check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& gates,
                  const Tensor& scale, const Tensor& labels, const Tensor& partner_labels,
                  const Tensor& key_labels) {
  for (const Tensor* t : {&q, &k, &gates}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->is_contiguous(), op,
                ": q, k and gates must be contiguous 2-D CPU tensors, got shape ", t->sizes(),
                " on ", t->device());
  }
  TORCH_CHECK(q.size(1) == k.size(1) && gates.sizes() == q.sizes(), op,
              ": q (B x K), k (N x K) and gates (B x K) must agree, got ", q.sizes(), ", ",
              k.sizes(), " and ", gates.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && gates.scalar_type() == dtype, op,
              ": q, k and gates must have the same dtype, got ", dtype, ", ", k.scalar_type(),
              " and ", gates.scalar_type());
  check_kernel_dtype(op, "q", dtype);
  TORCH_CHECK(scale.device().is_cpu() && scale.dim() == 0 &&
                  scale.scalar_type() == stats_dtype(dtype),
              op, ": scale must be a 0-dim CPU tensor of dtype ", stats_dtype(dtype));
  const auto check_labels = [op](const char* name, const Tensor& y, int64_t length) {
    TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kLong && y.dim() == 1 &&
                    y.size(0) == length && y.is_contiguous(),
                op, ": ", name, " must be a contiguous int64 CPU vector of length ", length,
                ", got shape ", y.sizes(), " and dtype ", y.scalar_type());
  };
  check_labels("labels", labels, q.size(0));
  check_labels("partner_labels", partner_labels, q.size(0));
  check_labels("key_labels", key_labels, k.size(0));
}

// The three label vectors as int32 codes (narrow lanes for the epilogues),
// equal exactly where the labels are: their indices among the distinct values.
struct LabelCodes {
  Tensor codes;  // own (B), partner (B), key (N), one after the other
  GatedMask mask() const {
    const int32_t* data = codes.data_ptr<int32_t>();
    return {data, data + anchors, data + 2 * anchors};
  }
  int64_t anchors;
};

LabelCodes label_codes(const Tensor& labels, const Tensor& partner_labels,
                       const Tensor& key_labels) {
  const Tensor all = at::cat({labels, partner_labels, key_labels});
  return {std::get<1>(at::_unique(all, false, true)).to(at::kInt).contiguous(), labels.size(0)};
}

// The set-up of every op, done in one place (prepare): the checks of the
// inputs, the number of anchors, the statistics dtype, and everything a pass
// reads: anchors (with column blocks when they supply the columns of
// key-major tiles), keys and labels.
struct Problem {
  int64_t b;
  at::ScalarType stats;
  at::TensorOptions options;  // of statistics tensors
  Anchors anchors;
  Side keys;
  LabelCodes codes;
};

Problem prepare(const char* op, const Tensor& q, const Tensor& k, const Tensor& gates,
                const Tensor& scale, const Tensor& labels, const Tensor& partner_labels,
                const Tensor& key_labels, bool anchor_columns) {
  check_inputs(op, q, k, gates, scale, labels, partner_labels, key_labels);
  const auto acc = stats_dtype(q.scalar_type());
  return {q.size(0),
          acc,
          q.options().dtype(acc),
          make_anchors(q, gates, scale, acc, anchor_columns),
          make_keys(k, acc, true),
          label_codes(labels, partner_labels, key_labels)};
}

// The forward pass: for every anchor-major tile of logits, on_tile(logits,
// anchor0, rows, cols, mask); after the last key block of an anchor block,
// on_rows(anchor0, rows).
template <typename acc_t, typename OnTile, typename OnRows>
void logit_pass(const Problem& problem, const OnTile& on_tile, const OnRows& on_rows) {
  const acc_t* anchor_scale = problem.anchors.scale.data_ptr<acc_t>();
  const GatedMask mask = problem.codes.mask();
  tile_pass<acc_t>(
      problem.anchors.side, problem.keys, false,
      [&](acc_t* dots, acc_t* sq_norms, int64_t anchor0, int64_t rows, int64_t key0,
          int64_t cols) {
        gated_logits_tile<acc_t, false>(dots, sq_norms, rows, cols, anchor_scale + anchor0);
        on_tile(dots, anchor0, rows, cols, mask.at(anchor0, key0));
      },
      [&](int64_t anchor0, int64_t rows, const acc_t*, const acc_t*) { on_rows(anchor0, rows); });
}

// ------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor> gated_fwd(const Tensor& q, const Tensor& k, const Tensor& gates,
                                     const Tensor& scale, const Tensor& labels,
                                     const Tensor& partner_labels, const Tensor& key_labels) {
  constexpr const char* op = "gated_fwd";
  const Problem problem =
      prepare(op, q, k, gates, scale, labels, partner_labels, key_labels, false);
  Tensor run_max = at::full({problem.b}, -INFINITY, problem.options);
  Tensor neg_lse = at::zeros({problem.b}, problem.options);  // the running sum, then the LSE
  Tensor pos_count = at::zeros({problem.b}, problem.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* max_data = run_max.data_ptr<acc_t>();
    acc_t* lse_data = neg_lse.data_ptr<acc_t>();
    acc_t* count_data = pos_count.data_ptr<acc_t>();
    logit_pass<acc_t>(
        problem,
        [&](acc_t* logits, int64_t anchor0, int64_t rows, int64_t cols, GatedMask mask) {
          negatives_tile(logits, rows, cols, mask, max_data + anchor0, lse_data + anchor0,
                         count_data + anchor0);
        },
        [&](int64_t anchor0, int64_t rows) {
          for (int64_t i = anchor0; i < anchor0 + rows; ++i) {
            lse_data[i] = max_data[i] == kNegInf<acc_t> ? kNegInf<acc_t>
                                                         : max_data[i] + std::log(lse_data[i]);
          }
        });
  });
  return {neg_lse, pos_count};
}

std::tuple<Tensor, Tensor> gated_pair_fwd(const Tensor& q, const Tensor& k, const Tensor& gates,
                                          const Tensor& scale, const Tensor& labels,
                                          const Tensor& partner_labels, const Tensor& key_labels,
                                          const Tensor& neg_lse) {
  constexpr const char* op = "gated_pair_fwd";
  const Problem problem =
      prepare(op, q, k, gates, scale, labels, partner_labels, key_labels, false);
  check_stats_vector(op, "neg_lse", neg_lse, problem.b, problem.stats);
  Tensor loss_sum = at::zeros({problem.b}, problem.options);
  Tensor sigmoid_sum = at::zeros({problem.b}, problem.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* lse_data = neg_lse.data_ptr<acc_t>();
    acc_t* loss_data = loss_sum.data_ptr<acc_t>();
    acc_t* sigmoid_data = sigmoid_sum.data_ptr<acc_t>();
    logit_pass<acc_t>(
        problem,
        [&](const acc_t* logits, int64_t anchor0, int64_t rows, int64_t cols, GatedMask mask) {
          positives_tile(logits, rows, cols, mask, lse_data + anchor0, loss_data + anchor0,
                         sigmoid_data + anchor0);
        },
        [](int64_t, int64_t) {});
  });
  return {loss_sum, sigmoid_sum};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_bwd(
    const Tensor& q, const Tensor& k, const Tensor& gates, const Tensor& scale,
    const Tensor& labels, const Tensor& partner_labels, const Tensor& key_labels,
    const Tensor& neg_lse, const Tensor& neg_coef, const Tensor& pos_coef, bool need_dk) {
  constexpr const char* op = "gated_bwd";
  const Problem problem =
      prepare(op, q, k, gates, scale, labels, partner_labels, key_labels, need_dk);
  const int64_t d = q.size(1);
  check_stats_vector(op, "neg_lse", neg_lse, problem.b, problem.stats);
  check_stats_vector(op, "neg_coef", neg_coef, problem.b, problem.stats);
  check_stats_vector(op, "pos_coef", pos_coef, problem.b, problem.stats);
  Tensor dq = at::empty_like(q);
  Tensor dgates = at::empty_like(gates);
  Tensor dk = need_dk ? at::empty_like(k) : at::empty({0}, k.options());
  Tensor anchor_dlogit = at::zeros({problem.b}, problem.options);
  const Anchors& anchors = problem.anchors;
  const Side& keys = problem.keys;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AnchorTerms<acc_t> terms{anchors.scale.data_ptr<acc_t>(), neg_lse.data_ptr<acc_t>(),
                                   neg_coef.data_ptr<acc_t>(), pos_coef.data_ptr<acc_t>()};
    const GatedMask mask = problem.codes.mask();
    const acc_t* norm = anchors.norm.data_ptr<acc_t>();
    const acc_t* q_data = anchors.q.data_ptr<acc_t>();
    const acc_t* g_data = anchors.gates.data_ptr<acc_t>();
    acc_t* dlogit = anchor_dlogit.data_ptr<acc_t>();
    scalar_t* dq_data = dq.data_ptr<scalar_t>();
    scalar_t* dg_data = dgates.data_ptr<scalar_t>();
    // Anchor pass: with H the numerator coefficients and T the key-norm ones,
    // dq = g^2 (H k - c q) and dg = 2 g (q (H k) - c q^2 / 2 - T (k k)), where
    // c_b = (sum_n G_bn l_bn) / |q_b g_b|^2 is the anchor-norm term (0 when clamped).
    tile_pass<acc_t>(
        anchors.side, keys, true,
        [&](acc_t* dots, acc_t* sq_norms, int64_t anchor0, int64_t rows, int64_t key0,
            int64_t cols) {
          gated_logits_tile<acc_t, false>(dots, sq_norms, rows, cols, terms.scale + anchor0);
          gradient_tile<acc_t, false>(dots, sq_norms, rows, cols, mask.at(anchor0, key0),
                                      terms.at(anchor0), dlogit + anchor0);
        },
        [&](int64_t anchor0, int64_t rows, const acc_t* h_k, const acc_t* t_ksq) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = anchor0 + r;
            const acc_t c =
                norm[i] > acc_t(kNormEps) ? dlogit[i] / (norm[i] * norm[i]) : acc_t(0);
            for (int64_t e = r * d; e < (r + 1) * d; ++e) {
              const int64_t x = anchor0 * d + e;
              const acc_t qv = q_data[x];
              const acc_t gv = g_data[x];
              dq_data[x] = static_cast<scalar_t>(gv * gv * (h_k[e] - c * qv));
              dg_data[x] = static_cast<scalar_t>(
                  acc_t(2) * gv * (qv * h_k[e] - acc_t(0.5) * c * qv * qv - t_ksq[e]));
            }
          }
        });
    if (need_dk) {
      // Key pass: dk = H^T a - 2 k (T^T g^2).
      const acc_t* k_data = keys.first.data_ptr<acc_t>();
      scalar_t* dk_data = dk.data_ptr<scalar_t>();
      tile_pass<acc_t>(
          keys, anchors.side, true,
          [&](acc_t* dots, acc_t* sq_norms, int64_t key0, int64_t rows, int64_t anchor0,
              int64_t cols) {
            gated_logits_tile<acc_t, true>(dots, sq_norms, rows, cols, terms.scale + anchor0);
            gradient_tile<acc_t, true>(dots, sq_norms, rows, cols, mask.at(anchor0, key0),
                                       terms.at(anchor0), nullptr);
          },
          [&](int64_t key0, int64_t rows, const acc_t* h_a, const acc_t* t_gsq) {
            for (int64_t e = 0; e < rows * d; ++e) {
              const int64_t x = key0 * d + e;
              dk_data[x] = static_cast<scalar_t>(h_a[e] - acc_t(2) * k_data[x] * t_gsq[e]);
            }
          });
    }
  });
  // dscale = sum_bn G_bn l_bn / s, in a fixed order.
  Tensor dscale = anchor_dlogit.sum() / scale;
  return {dq, dk, dgates, dscale};
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def(
      "gated_fwd(Tensor q, Tensor k, Tensor gates, Tensor scale, Tensor labels, "
      "Tensor partner_labels, Tensor key_labels) -> (Tensor, Tensor)");
  m.def(
      "gated_pair_fwd(Tensor q, Tensor k, Tensor gates, Tensor scale, Tensor labels, "
      "Tensor partner_labels, Tensor key_labels, Tensor neg_lse) -> (Tensor, Tensor)");
  m.def(
      "gated_bwd(Tensor q, Tensor k, Tensor gates, Tensor scale, Tensor labels, "
      "Tensor partner_labels, Tensor key_labels, Tensor neg_lse, Tensor neg_coef, "
      "Tensor pos_coef, bool need_dk) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("gated_fwd", &pyclloss::cpu::gated_fwd);
  m.impl("gated_pair_fwd", &pyclloss::cpu::gated_pair_fwd);
  m.impl("gated_bwd", &pyclloss::cpu::gated_bwd);
}
