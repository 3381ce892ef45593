// CPU kernels of the fused InfoNCE core: the ops of docs/fused_core.md.
//
// Every kernel streams (row block x key block) tiles of dot products from a
// GEMM into a thread-local buffer; a vectorized epilogue turns each tile into
// statistics (forward) or into the logit gradient G, which a second GEMM
// multiplies into dq or dk (backward). The GEMMs read q and k converted to
// the accumulation type and laid out once per call (TileOperand, O((N+M)*D)).
// Nothing N x M is allocated: backward recomputes the tiles.
//
// Two kinds of pass. A task that owns its output rows: a block of query rows
// against all keys (for_each_logit_tile, gradient_pass). Or a task that adds
// one tile into two accumulators, in a schedule (for_each_scheduled_tile):
// q and k the same rows, where a tile z_I z_J^T serves both blocks
// (symmetric_row_stats, symmetric_pair_terms, symmetric_gradient), and dq
// with dk from one tile (gradient_both_sides). Every reduction runs in an
// order fixed by the sizes alone: results do not depend on the number of
// threads (docs/fused_core.md, "CPU schedules").

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "pyclloss/cpu_args.h"
#include "pyclloss/cpu_math.h"
#include "pyclloss/cpu_schedule.h"
#include "pyclloss/cpu_tile.h"

namespace pyclloss::cpu {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// Rows and columns of a tile of a TileSchedule.
constexpr int64_t kPairBlock = 256;
// Contributions of scheduled tasks that may wait for their turn, per thread:
// tiles (backward) and row statistics (forward).
constexpr int64_t kPendingTiles = 4;
constexpr int64_t kPendingStats = 16;
static_assert(kPairBlock <= kInnerBlock, "epilogue buffers hold kInnerBlock columns");
// infonce_fwd's column statistics come from per-group partials over row
// blocks, merged in group order: at most this many groups, and at most this
// many partial entries per statistic in all.
constexpr int64_t kMaxColumnGroups = 64;
constexpr int64_t kColumnPartialBudget = int64_t(1) << 20;

// ------------------------------------------------------------------ masks

// Which pairs of a tile are excluded or positive, in tile-local indices
// (i: query, j: key). Label pointers are never null: without labels the
// kernels pass two constant vectors that never match.
//
// The epilogue loops stay vectorizable only without control flow: conditions
// combine with `&` rather than `&&`, and every value is loaded and computed
// before a select picks it (a load under a condition is a branch to GCC,
// which then emits scalar code).
struct PairMask {
  const int32_t* q_labels;  // at the tile's first query
  const int32_t* k_labels;  // at the tile's first key
  int32_t diagonal;         // (i, j) is excluded iff j == i + diagonal

  bool excluded(int32_t i, int32_t j) const { return j == i + diagonal; }
  bool positive(int32_t i, int32_t j) const {
    return (q_labels[i] == k_labels[j]) & !excluded(i, j);
  }
  bool same_label(int32_t i, int32_t j) const { return q_labels[i] == k_labels[j]; }
};

// A tile is row-major (outer x inner). Query-major: outer rows are queries,
// inner columns keys (forward, dq); key-major: the transpose (dk).
template <bool kKeyMajor>
inline int32_t query_index(int32_t outer, int32_t inner) {
  return kKeyMajor ? inner : outer;
}

template <bool kKeyMajor>
inline int32_t key_index(int32_t outer, int32_t inner) {
  return kKeyMajor ? outer : inner;
}

template <typename T>
inline T max_of(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
inline T* shifted(T* pointer, int64_t offset) {
  return pointer == nullptr ? nullptr : pointer + offset;
}

// -------------------------------------------------------- tile epilogues

// Running per-query statistics of infonce_fwd (pointers at the tile's first
// query). `sum` is relative to `max`.
template <typename acc_t>
struct RowStats {
  acc_t* max;
  acc_t* sum;
  acc_t* pos_sum;
  acc_t* pos_count;

  RowStats at(int64_t query) const {
    return {max + query, sum + query, pos_sum + query, pos_count + query};
  }
};

// Folds one query-major tile of dot products into the row statistics, and
// leaves the tile holding the logits of den(i, j), -inf elsewhere.
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void infonce_row_stats_tile(acc_t* tile, int32_t rows, int32_t cols,
                                                   acc_t scale, PairMask mask, bool neg_only,
                                                   RowStats<acc_t> stats) {
  for (int32_t i = 0; i < rows; ++i) {
    acc_t* logits = tile + i * cols;
    acc_t tile_max = kNegInf<acc_t>;
    acc_t pos_sum = 0;
    acc_t pos_count = 0;
#pragma omp simd reduction(max : tile_max) reduction(+ : pos_sum, pos_count)
    for (int32_t j = 0; j < cols; ++j) {
      const acc_t logit = scale * logits[j];
      const bool pos = mask.positive(i, j);
      const bool den = !mask.excluded(i, j) & !(neg_only & pos);
      pos_sum += pos ? logit : acc_t(0);
      pos_count += pos ? acc_t(1) : acc_t(0);
      logits[j] = den ? logit : kNegInf<acc_t>;
      tile_max = max_of(tile_max, logits[j]);
    }
    stats.pos_sum[i] += pos_sum;
    stats.pos_count[i] += pos_count;
    const acc_t new_max = max_of(stats.max[i], tile_max);
    if (new_max == kNegInf<acc_t>) {
      continue;  // nothing in the set yet: the state stays (-inf, 0)
    }
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int32_t j = 0; j < cols; ++j) {
      sum += exp_nonpositive(logits[j] - new_max);
    }
    stats.sum[i] = stats.sum[i] * rescale_factor(stats.max[i], new_max) + sum;
    stats.max[i] = new_max;
  }
}

// The statistics infonce_row_stats_tile computes for the queries of a
// key-major tile (outer: keys, inner: queries) of dot products, into a fresh
// state (max -inf, sums 0) that merge_row_stats folds into the running one.
// The tile is only read: the symmetric schedule reads it again transposed.
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void infonce_key_major_stats_tile(const acc_t* tile, int32_t keys,
                                                         int32_t queries, acc_t scale,
                                                         PairMask mask, bool neg_only,
                                                         RowStats<acc_t> fresh) {
  for (int32_t o = 0; o < keys; ++o) {
    const acc_t* dots = tile + o * queries;
#pragma omp simd
    for (int32_t n = 0; n < queries; ++n) {
      const acc_t logit = scale * dots[n];
      const bool pos = mask.positive(n, o);
      const bool den = !mask.excluded(n, o) & !(neg_only & pos);
      fresh.pos_sum[n] += pos ? logit : acc_t(0);
      fresh.pos_count[n] += pos ? acc_t(1) : acc_t(0);
      fresh.max[n] = max_of(fresh.max[n], den ? logit : kNegInf<acc_t>);
    }
  }
  for (int32_t o = 0; o < keys; ++o) {
    const acc_t* dots = tile + o * queries;
#pragma omp simd
    for (int32_t n = 0; n < queries; ++n) {
      const bool den = !mask.excluded(n, o) & !(neg_only & mask.positive(n, o));
      // Where den is false the max may still be -inf: the select drops the inf.
      const acc_t term = exp_nonpositive(scale * dots[n] - fresh.max[n]);
      fresh.sum[n] += den ? term : acc_t(0);
    }
  }
}

// e^(logit - max) of a masked logit: 0 where excluded (-inf), also against a
// column whose max is still -inf.
template <typename acc_t>
inline acc_t masked_exp(acc_t logit, acc_t max) {
  return logit == kNegInf<acc_t> ? acc_t(0) : exp_nonpositive(logit - max);
}

// Folds a query-major tile of masked logits (-inf where excluded) into running
// per-key (max, sum) states (pointers at the tile's first key). Rows go four
// at a time: the per-key states then make one load and store for four rows.
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void column_lse_tile(const acc_t* logits, int32_t rows, int32_t cols,
                                            acc_t* col_max, acc_t* col_sum) {
  acc_t tile_max[kInnerBlock];
  std::fill(tile_max, tile_max + cols, kNegInf<acc_t>);
  int32_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const acc_t* row = logits + i * cols;  // per-row pointers keep the loads contiguous
    const acc_t* row1 = row + cols;
    const acc_t* row2 = row1 + cols;
    const acc_t* row3 = row2 + cols;
#pragma omp simd
    for (int32_t j = 0; j < cols; ++j) {
      tile_max[j] = max_of(max_of(tile_max[j], max_of(row[j], row1[j])), max_of(row2[j], row3[j]));
    }
  }
  for (; i < rows; ++i) {
    const acc_t* row = logits + i * cols;
#pragma omp simd
    for (int32_t j = 0; j < cols; ++j) {
      tile_max[j] = max_of(tile_max[j], row[j]);
    }
  }
#pragma omp simd
  for (int32_t j = 0; j < cols; ++j) {
    const acc_t new_max = max_of(col_max[j], tile_max[j]);
    col_sum[j] *= rescale_factor(col_max[j], new_max);
    col_max[j] = new_max;
  }
  for (i = 0; i + 4 <= rows; i += 4) {
    const acc_t* row = logits + i * cols;
    const acc_t* row1 = row + cols;
    const acc_t* row2 = row1 + cols;
    const acc_t* row3 = row2 + cols;
#pragma omp simd
    for (int32_t j = 0; j < cols; ++j) {
      const acc_t max = col_max[j];
      col_sum[j] += (masked_exp(row[j], max) + masked_exp(row1[j], max)) +
                    (masked_exp(row2[j], max) + masked_exp(row3[j], max));
    }
  }
  for (; i < rows; ++i) {
    const acc_t* row = logits + i * cols;
#pragma omp simd
    for (int32_t j = 0; j < cols; ++j) {
      col_sum[j] += masked_exp(row[j], col_max[j]);
    }
  }
}

// Adds softplus and sigmoid of (neg_lse_i - l_ij) over the positives of a
// query-major tile (pointers at the tile's first query).
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void infonce_pair_tile(const acc_t* dots, int32_t rows, int32_t cols,
                                              acc_t scale, PairMask mask, const acc_t* neg_lse,
                                              acc_t* loss_sum, acc_t* sigmoid_sum) {
  for (int32_t i = 0; i < rows; ++i) {
    const acc_t* row = dots + i * cols;
    acc_t loss = 0;
    acc_t weight = 0;
#pragma omp simd reduction(+ : loss, weight)
    for (int32_t j = 0; j < cols; ++j) {
      const bool pos = mask.positive(i, j);
      const acc_t margin = neg_lse[i] - scale * row[j];
      loss += pos ? softplus(margin) : acc_t(0);
      weight += pos ? sigmoid(margin) : acc_t(0);
    }
    loss_sum[i] += loss;
    sigmoid_sum[i] += weight;
  }
}

// infonce_pair_tile on a key-major tile (outer: keys, inner: queries).
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void infonce_key_major_pair_tile(const acc_t* tile, int32_t keys,
                                                        int32_t queries, acc_t scale,
                                                        PairMask mask, const acc_t* neg_lse,
                                                        acc_t* loss_sum, acc_t* sigmoid_sum) {
  for (int32_t o = 0; o < keys; ++o) {
    const acc_t* dots = tile + o * queries;
#pragma omp simd
    for (int32_t n = 0; n < queries; ++n) {
      const bool pos = mask.positive(n, o);
      const acc_t margin = neg_lse[n] - scale * dots[n];
      loss_sum[n] += pos ? softplus(margin) : acc_t(0);
      sigmoid_sum[n] += pos ? sigmoid(margin) : acc_t(0);
    }
  }
}

// Adds -logsigmoid(z_ij (l_ij + b)) = softplus(-z_ij (l_ij + b)) over a
// query-major tile, z = +1 on same labels, -1 elsewhere.
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void siglip_loss_tile(const acc_t* dots, int32_t rows, int32_t cols,
                                             acc_t scale, acc_t bias, PairMask mask,
                                             acc_t* row_loss) {
  for (int32_t i = 0; i < rows; ++i) {
    const acc_t* row = dots + i * cols;
    acc_t loss = 0;
#pragma omp simd reduction(+ : loss)
    for (int32_t j = 0; j < cols; ++j) {
      const acc_t shifted_logit = scale * row[j] + bias;
      loss += softplus(mask.same_label(i, j) ? -shifted_logit : shifted_logit);
    }
    row_loss[i] += loss;
  }
}

// The optional terms of infonce_bwd's logit gradient; a null coefficient
// leaves its term out. Pointers at the tile's first query (row_*, pos_coef,
// pair_lse) or first key (col_*).
template <typename acc_t>
struct LogitGradTerms {
  const acc_t* row_lse;
  const acc_t* row_coef;
  const acc_t* col_lse;
  const acc_t* col_coef;
  const acc_t* pos_coef;
  const acc_t* pair_lse;
  bool neg_only;

  LogitGradTerms at(int64_t query, int64_t key) const {
    return {shifted(row_lse, query), shifted(row_coef, query), shifted(col_lse, key),
            shifted(col_coef, key),  shifted(pos_coef, query), shifted(pair_lse, query),
            neg_only};
  }
};

// Probabilities below e^kNegligibleLogProb (2^-60; 2^-110 in double) are left
// out of G (infonce_grad_tile says why).
template <typename T>
constexpr T kNegligibleLogProb = T(-41.588830833596715);  // ln 2^-60
template <>
constexpr double kNegligibleLogProb<double> = -76.246189861593985;  // ln 2^-110

// e^log_prob, or 0 below e^kNegligibleLogProb. A log-probability is at most
// 0 (up to rounding): the exponential needs no clamps.
template <typename T>
inline T kept_prob(T log_prob) {
  return log_prob < kNegligibleLogProb<T> ? T(0) : exp_in_range(log_prob);
}

// The last pass of infonce_grad_tile over one row of a tile: adds the
// constant positive term (kPositive: pos_coef without pair_lse) to the row's
// G, writes or adds it into out_row, and returns the row's sum G * dot.
template <typename acc_t, bool kKeyMajor, bool kAccumulate, bool kPositive>
inline acc_t write_grad_row(const acc_t* grad, const acc_t* dots, acc_t* out_row, int32_t o,
                            int32_t inner, PairMask mask, const acc_t* pos_coef) {
  acc_t dscale = 0;
#pragma omp simd reduction(+ : dscale)
  for (int32_t n = 0; n < inner; ++n) {
    acc_t g = grad[n];
    if constexpr (kPositive) {
      const int32_t i = query_index<kKeyMajor>(o, n);
      const int32_t j = key_index<kKeyMajor>(o, n);
      const acc_t term = pos_coef[i];
      g += mask.positive(i, j) ? term : acc_t(0);
    }
    dscale += g * dots[n];
    if constexpr (kAccumulate) {
      out_row[n] += g;
    } else {
      out_row[n] = g;
    }
  }
  return dscale;
}

// Writes G (docs/fused_core.md) of a tile of dot products into `out`, or
// adds it there when `accumulate`, and returns sum G * dot, the tile's share
// of dscale; `out` may be the tile itself. A few passes per row, each for a
// set of terms known to be present, keep every loop branch-free; a term is
// active only where its coefficient is nonzero, so a zero coefficient never
// meets an infinite LSE.
//
// Probabilities below e^kNegligibleLogProb (2^-60; 2^-110 in double) are left
// out of G: a softmax's dropped mass in a gradient row stays below 2^-60 times
// the row's terms for any practical M, far under rounding, and what remains of
// coef * probability is a normal float for any coefficient above 2^-66. Kept,
// such products are subnormal (CLIP's logits spread over hundreds, say), and
// the tile GEMMs that read G slow down severalfold on them on CPUs that
// handle subnormals in microcode. NaN arguments are not dropped.
template <typename acc_t, bool kKeyMajor>
PYCLLOSS_VECTOR_CLONES acc_t infonce_grad_tile(const acc_t* tile, acc_t* out, bool accumulate,
                                               int32_t outer, int32_t inner, acc_t scale,
                                               PairMask mask, LogitGradTerms<acc_t> terms) {
  // The softmax terms of row and column (the row's only if den(i, j)).
  const auto row_term = [&](int32_t i, int32_t j, acc_t logit) {
    const bool den = !mask.excluded(i, j) & !(terms.neg_only & mask.positive(i, j));
    const acc_t coef = terms.row_coef[i];
    const acc_t prob = kept_prob(logit - terms.row_lse[i]);
    return den & (coef != acc_t(0)) ? coef * prob : acc_t(0);
  };
  const auto column_term = [&](int32_t i, int32_t j, acc_t logit) {
    const acc_t coef = terms.col_coef[j];
    const acc_t prob = kept_prob(logit - terms.col_lse[j]);
    return !mask.excluded(i, j) & (coef != acc_t(0)) ? coef * prob : acc_t(0);
  };
  const bool constant_positive = terms.pos_coef != nullptr && terms.pair_lse == nullptr;
  acc_t grad[kInnerBlock];
  acc_t dscale = 0;
  for (int32_t o = 0; o < outer; ++o) {
    const acc_t* dots = tile + o * inner;
    acc_t* out_row = out + o * inner;
    if (terms.row_coef != nullptr && terms.col_coef != nullptr) {  // CLIP: one pass for both
#pragma omp simd
      for (int32_t n = 0; n < inner; ++n) {
        const int32_t i = query_index<kKeyMajor>(o, n);
        const int32_t j = key_index<kKeyMajor>(o, n);
        const acc_t logit = scale * dots[n];
        grad[n] = row_term(i, j, logit) + column_term(i, j, logit);
      }
    } else if (terms.row_coef != nullptr) {
#pragma omp simd
      for (int32_t n = 0; n < inner; ++n) {
        grad[n] = row_term(query_index<kKeyMajor>(o, n), key_index<kKeyMajor>(o, n),
                           scale * dots[n]);
      }
    } else if (terms.col_coef != nullptr) {
#pragma omp simd
      for (int32_t n = 0; n < inner; ++n) {
        grad[n] = column_term(query_index<kKeyMajor>(o, n), key_index<kKeyMajor>(o, n),
                              scale * dots[n]);
      }
    } else {
      std::fill(grad, grad + inner, acc_t(0));
    }
    if (terms.pos_coef != nullptr && terms.pair_lse != nullptr) {
#pragma omp simd
      for (int32_t n = 0; n < inner; ++n) {
        const int32_t i = query_index<kKeyMajor>(o, n);
        const int32_t j = key_index<kKeyMajor>(o, n);
        const acc_t term = terms.pos_coef[i] * sigmoid(terms.pair_lse[i] - scale * dots[n]);
        grad[n] += mask.positive(i, j) ? term : acc_t(0);
      }
    }
    // One loop a case: GCC leaves a loop scalar whose store selects on `accumulate`.
    const acc_t* pos = terms.pos_coef;
    if (accumulate) {
      dscale += constant_positive
                    ? write_grad_row<acc_t, kKeyMajor, true, true>(grad, dots, out_row, o, inner,
                                                                  mask, pos)
                    : write_grad_row<acc_t, kKeyMajor, true, false>(grad, dots, out_row, o, inner,
                                                                   mask, pos);
    } else {
      dscale += constant_positive
                    ? write_grad_row<acc_t, kKeyMajor, false, true>(grad, dots, out_row, o,
                                                                   inner, mask, pos)
                    : write_grad_row<acc_t, kKeyMajor, false, false>(grad, dots, out_row, o,
                                                                    inner, mask, pos);
    }
  }
  return dscale;
}

template <typename acc_t>
struct SiglipGradSums {
  acc_t dscale = 0;
  acc_t dbias = 0;

  SiglipGradSums& operator+=(const SiglipGradSums& other) {
    dscale += other.dscale;
    dbias += other.dbias;
    return *this;
  }
};

// Writes SigLIP's G_ij = row_coef_i * (-z_ij) * sigmoid(-z_ij (l_ij + b)) of
// a query-major tile of dot products into `out` (which may be the tile) and
// returns the tile's shares of dscale and dbias.
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES SiglipGradSums<acc_t> siglip_grad_tile(const acc_t* tile, acc_t* out,
                                                              int32_t rows, int32_t cols,
                                                              acc_t scale, acc_t bias,
                                                              PairMask mask,
                                                              const acc_t* row_coef) {
  acc_t dscale = 0;
  acc_t dbias = 0;
  for (int32_t i = 0; i < rows; ++i) {
    const acc_t* dots = tile + i * cols;
    acc_t* out_row = out + i * cols;
#pragma omp simd reduction(+ : dscale, dbias)
    for (int32_t j = 0; j < cols; ++j) {
      const bool same = mask.same_label(i, j);
      const acc_t shifted_logit = scale * dots[j] + bias;
      const acc_t magnitude = row_coef[i] * sigmoid(same ? -shifted_logit : shifted_logit);
      const acc_t grad = same ? -magnitude : magnitude;
      dscale += grad * dots[j];
      dbias += grad;
      out_row[j] = grad;
    }
  }
  return {dscale, dbias};
}

// ---------------------------------------------------------------- passes

// q or k in the two layouts the tile products read, in the accumulation
// type: `rows` (n x d) and, for an operand that supplies the columns of logit
// tiles, `blocked_t`: its transpose per block of `block` rows
// (transposed_blocks). Both are O(n * d), built once per call.
struct TileOperand {
  Tensor rows;
  Tensor blocked_t;
};

TileOperand tile_operand(const Tensor& x, at::ScalarType acc, bool transposed,
                         int64_t block = kInnerBlock) {
  Tensor rows = x.to(acc);  // x itself when it already is acc
  return {rows, transposed ? transposed_blocks(rows, block) : Tensor()};
}

struct TileOperands {
  TileOperand q;
  TileOperand k;
};

// q and k are the same memory, hence the same rows (self-similarity losses).
bool same_rows(const Tensor& q, const Tensor& k) {
  return q.data_ptr() == k.data_ptr() && q.sizes() == k.sizes();
}

// One shared copy when q and k are the same rows.
TileOperands tile_operands(const Tensor& q, const Tensor& k, at::ScalarType acc,
                           bool q_transposed, bool k_transposed, int64_t block = kInnerBlock) {
  if (same_rows(q, k)) {
    const TileOperand shared = tile_operand(q, acc, q_transposed || k_transposed, block);
    return {shared, shared};
  }
  return {tile_operand(q, acc, q_transposed, block), tile_operand(k, acc, k_transposed, block)};
}

// For every tile of q * k^T: epilogue(tile, query0, queries, key0, keys,
// group). Row blocks are split into `groups` consecutive runs, one task
// each; a task visits its row blocks in order, each over all key blocks in
// order. Needs q.rows and k.blocked_t.
template <typename acc_t, typename Epilogue>
void for_each_logit_tile(const TileOperand& q, const TileOperand& k, int64_t groups,
                         const Epilogue& epilogue) {
  const int64_t m = k.rows.size(0);
  const int64_t d = q.rows.size(1);
  const acc_t* q_rows = q.rows.data_ptr<acc_t>();
  const acc_t* k_blocked_t = m > 0 ? k.blocked_t.data_ptr<acc_t>() : nullptr;
  const auto nothing = [](std::vector<acc_t>&, int64_t, int64_t) {};
  for_each_tile(
      q.rows.size(0), m, groups, [] { return std::vector<acc_t>(kOuterBlock * kInnerBlock); },
      nothing,
      [&](std::vector<acc_t>& tile, int64_t query0, int64_t queries, int64_t key0, int64_t keys,
          int64_t group) {
        matmul(queries, keys, d, q_rows + query0 * d, d, k_blocked_t + key0 * d, keys,
               tile.data(), keys, false);
        epilogue(tile.data(), query0, queries, key0, keys, group);
      },
      nothing);
}

// Buffers of one thread in gradient_pass.
template <typename acc_t>
struct GradientBuffers {
  std::vector<acc_t> tile;
  std::vector<acc_t> grad_sum;
};

// d_outer = scale * G * inner.rows, one task per block of `outer` rows. For
// each block of `inner` rows, the tile of outer * inner^T dot products is
// turned into G by grad_tile(tile, outer0, outer_rows, inner0, inner_rows,
// outer_block). Needs outer.rows, inner.rows, inner.blocked_t.
template <typename scalar_t, typename acc_t, typename GradTile>
void gradient_pass(const TileOperand& outer, const TileOperand& inner, acc_t scale,
                   scalar_t* d_outer, const GradTile& grad_tile) {
  const int64_t n_outer = outer.rows.size(0);
  const int64_t n_inner = inner.rows.size(0);
  const int64_t d = outer.rows.size(1);
  const acc_t* outer_rows = outer.rows.data_ptr<acc_t>();
  const acc_t* inner_rows = inner.rows.data_ptr<acc_t>();
  const acc_t* inner_blocked_t = n_inner > 0 ? inner.blocked_t.data_ptr<acc_t>() : nullptr;
  // One row block a task: its index is the task's.
  for_each_tile(
      n_outer, n_inner, num_blocks(n_outer, kOuterBlock),
      [d] {
        return GradientBuffers<acc_t>{std::vector<acc_t>(kOuterBlock * kInnerBlock),
                                      std::vector<acc_t>(kOuterBlock * d)};
      },
      [d](GradientBuffers<acc_t>& buffers, int64_t, int64_t rows) {
        std::fill(buffers.grad_sum.begin(), buffers.grad_sum.begin() + rows * d, acc_t(0));
      },
      [&](GradientBuffers<acc_t>& buffers, int64_t outer0, int64_t rows, int64_t inner0,
          int64_t cols, int64_t block) {
        acc_t* tile = buffers.tile.data();
        matmul(rows, cols, d, outer_rows + outer0 * d, d, inner_blocked_t + inner0 * d, cols,
               tile, cols, false);
        grad_tile(tile, outer0, rows, inner0, cols, block);
        matmul(rows, d, cols, tile, cols, inner_rows + inner0 * d, d, buffers.grad_sum.data(), d,
               true);
      },
      [&](GradientBuffers<acc_t>& buffers, int64_t outer0, int64_t rows) {
        scalar_t* out = d_outer + outer0 * d;
        for (int64_t e = 0; e < rows * d; ++e) {
          out[e] = static_cast<scalar_t>(scale * buffers.grad_sum[e]);
        }
      });
}

// Rows [row0, row0 + rows) against columns [col0, col0 + cols): the tile of
// one task of a TileSchedule.
struct PairTile {
  int64_t row0;
  int64_t rows;
  int64_t col0;
  int64_t cols;
};

// Runs a TileSchedule over the tiles of q k^T in blocks of kPairBlock rows
// (q) and columns (k). A task computes its tile into a thread buffer and from
// it a contribution: compute(contribution, tile, pair, span, task). Then
// add(contribution, span, row_side) adds it into the accumulator of its row
// block (row_side) and, unless that is the same, of its column block, in
// schedule order on every accumulator (OrderedAdditions); finish(accumulator)
// follows an accumulator's last addition. Contributions wait for their turn
// in a pool of `pending` slots per thread, made by make_contribution(). Needs
// q.rows and k.blocked_t blocked by kPairBlock.
template <typename acc_t, typename MakeContribution, typename Compute, typename Add,
          typename Finish>
void for_each_scheduled_tile(const TileOperand& q, const TileOperand& k,
                             const TileSchedule& schedule, int64_t pending,
                             const MakeContribution& make_contribution, const Compute& compute,
                             const Add& add, const Finish& finish) {
  const int64_t n = q.rows.size(0);
  const int64_t m = k.rows.size(0);
  const int64_t d = q.rows.size(1);
  const acc_t* q_rows = q.rows.data_ptr<acc_t>();
  const acc_t* k_blocked_t = m > 0 ? k.blocked_t.data_ptr<acc_t>() : nullptr;
  const int64_t tasks = static_cast<int64_t>(schedule.tasks.size());
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  const auto span_of = [&](const BlockPair& pair) {
    const int64_t row0 = pair.row * kPairBlock;
    const int64_t col0 = (pair.col - schedule.first_col) * kPairBlock;
    return PairTile{row0, std::min(kPairBlock, n - row0), col0, std::min(kPairBlock, m - col0)};
  };
  std::vector<decltype(make_contribution())> contributions;
  for (int64_t slot = 0; slot < pending * workers; ++slot) {
    contributions.push_back(make_contribution());
  }
  SlotPool pool(static_cast<int32_t>(contributions.size()));
  OrderedAdditions additions(schedule);
  std::vector<int32_t> slot_of(tasks);
  std::atomic<int64_t> next{0};
  run_workers(workers, [&] {
    std::vector<acc_t> tile(kPairBlock * kPairBlock);
    for (;;) {
      // The slot first: a thread waiting for one holds no task that the
      // contributions in the pool may be waiting for.
      const int32_t slot = pool.acquire();
      if (slot == SlotPool::kClosed) {
        return;
      }
      const int64_t task = next.fetch_add(1);
      if (task >= tasks) {
        pool.release(slot);
        return;
      }
      try {
        const BlockPair pair = schedule.tasks[task];
        const PairTile span = span_of(pair);
        matmul(span.rows, span.cols, d, q_rows + span.row0 * d, d, k_blocked_t + span.col0 * d,
               span.cols, tile.data(), span.cols, false);
        compute(contributions[slot], tile.data(), pair, span, task);
        slot_of[task] = slot;
        additions.computed(
            task, pair,
            [&](int32_t done_task, int32_t accumulator) {
              const BlockPair& done_pair = schedule.tasks[done_task];
              add(contributions[slot_of[done_task]], span_of(done_pair),
                  accumulator == done_pair.row);
            },
            [&](int32_t done_task) { pool.release(slot_of[done_task]); }, finish);
      } catch (...) {
        pool.close();  // the others stop rather than wait for this task's slot
        throw;
      }
    }
  });
}

// for_each_scheduled_tile of z against itself, in the symmetric schedule:
// the tile z_I z_J^T (I <= J) serves block I's rows and, read transposed,
// block J's. Accumulator b is block b.
template <typename acc_t, typename MakeContribution, typename Compute, typename Add,
          typename Finish>
void for_each_block_pair(const TileOperand& z, int64_t pending,
                         const MakeContribution& make_contribution, const Compute& compute,
                         const Add& add, const Finish& finish) {
  for_each_scheduled_tile<acc_t>(z, z, symmetric_schedule(num_blocks(z.rows.size(0), kPairBlock)),
                                 pending, make_contribution, compute, add, finish);
}

// Per-block sums that the tasks of a schedule add gradient tiles into: a
// buffer of blocks of kPairBlock rows (or their transposes), not zero-filled:
// a block's first addition overwrites it, so the page faults of fresh memory
// fall on the worker threads, and a block never added into reads as zero.
// All additions into a block are made under its turn (OrderedAdditions),
// which orders the accesses to its flag.
template <typename acc_t>
struct BlockSums {
  BlockSums(int64_t rows, int64_t d, at::ScalarType dtype)
      : data(at::empty({rows * d}, at::TensorOptions().dtype(dtype))),
        written(num_blocks(rows, kPairBlock), 0) {}

  // The block starting at row0, if anything was added into it.
  const acc_t* block(int64_t row0, int64_t d) const {
    return written[row0 / kPairBlock] ? data.data_ptr<acc_t>() + row0 * d : nullptr;
  }

  Tensor data;
  std::vector<uint8_t> written;  // per block
};

// Rows [row0, row0 + count) of `out` = scale * (the same rows of `by_rows`
// plus the transpose of the block of `by_columns` stored from row0 * d, d x
// count); a null or unwritten source counts as zero.
template <typename scalar_t, typename acc_t>
void write_block(scalar_t* out, const BlockSums<acc_t>* by_rows,
                 const BlockSums<acc_t>* by_columns, int64_t row0, int64_t count, int64_t d,
                 acc_t scale) {
  const acc_t* rows = by_rows == nullptr ? nullptr : by_rows->block(row0, d);
  const acc_t* transposed = by_columns == nullptr ? nullptr : by_columns->block(row0, d);
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t c = 0; c < d; ++c) {
      const acc_t row_part = rows == nullptr ? acc_t(0) : rows[r * d + c];
      const acc_t column_part = transposed == nullptr ? acc_t(0) : transposed[c * count + r];
      out[(row0 + r) * d + c] = static_cast<scalar_t>(scale * (row_part + column_part));
    }
  }
}

// Adds the gradient tile g of a task (span.rows x span.cols) into the
// accumulator of its row block (row_side): g times the column block's rows,
// into by_rows; else into its column block's: the row block's transpose
// (blocked_t layout) times g, into the transposed by_columns.
template <typename acc_t>
void add_gradient_tile(const acc_t* g, PairTile span, bool row_side, int64_t d,
                       const acc_t* col_rows, const acc_t* row_blocked_t,
                       BlockSums<acc_t>& by_rows, BlockSums<acc_t>& by_columns) {
  BlockSums<acc_t>& sums = row_side ? by_rows : by_columns;
  const int64_t row0 = row_side ? span.row0 : span.col0;
  uint8_t& written = sums.written[row0 / kPairBlock];
  acc_t* block = sums.data.template data_ptr<acc_t>() + row0 * d;
  if (row_side) {
    matmul(span.rows, d, span.cols, g, span.cols, col_rows + span.col0 * d, d, block, d,
           written != 0);
  } else {
    matmul(d, span.cols, span.rows, row_blocked_t + span.row0 * d, span.rows, g, span.cols,
           block, span.cols, written != 0);
  }
  written = 1;
}

// dq = scale * G k and dk = scale * G^T q from one pass over the tiles of
// q k^T (rectangular_schedule): grad_tile(tile, g, query0, queries, key0,
// keys, task) writes a tile's G into g, then G k_J is added into query block
// I and q_I^T G into key block J's transposed accumulator (the layout of
// q.blocked_t). Needs the rows and blocked_t of q and k, blocked by
// kPairBlock.
template <typename scalar_t, typename acc_t, typename GradTile>
void gradient_both_sides(const TileOperand& q, const TileOperand& k, acc_t scale, scalar_t* dq,
                         scalar_t* dk, const GradTile& grad_tile) {
  const int64_t n = q.rows.size(0);
  const int64_t m = k.rows.size(0);
  const int64_t d = q.rows.size(1);
  if (n == 0 || m == 0) {
    std::fill(dq, dq + n * d, scalar_t(0));
    std::fill(dk, dk + m * d, scalar_t(0));
    return;
  }
  const acc_t* q_blocked_t = q.blocked_t.data_ptr<acc_t>();
  const acc_t* k_rows = k.rows.data_ptr<acc_t>();
  const TileSchedule schedule =
      rectangular_schedule(num_blocks(n, kPairBlock), num_blocks(m, kPairBlock));
  BlockSums<acc_t> by_rows(n, d, q.rows.scalar_type());     // sum over J of G_IJ k_J
  BlockSums<acc_t> by_columns(m, d, q.rows.scalar_type());  // sum over I of q_I^T G_IJ
  for_each_scheduled_tile<acc_t>(
      q, k, schedule, kPendingTiles, [] { return std::vector<acc_t>(kPairBlock * kPairBlock); },
      [&](std::vector<acc_t>& g, acc_t* tile, BlockPair, PairTile span, int64_t task) {
        grad_tile(tile, g.data(), span.row0, span.rows, span.col0, span.cols, task);
      },
      [&](std::vector<acc_t>& g, PairTile span, bool row_side) {
        add_gradient_tile(g.data(), span, row_side, d, k_rows, q_blocked_t, by_rows, by_columns);
      },
      [&](int32_t accumulator) {  // complete: dq or dk of its rows
        if (accumulator < schedule.first_col) {
          const int64_t row0 = accumulator * kPairBlock;
          write_block(dq, &by_rows, static_cast<const BlockSums<acc_t>*>(nullptr), row0,
                      std::min(kPairBlock, n - row0), d, scale);
        } else {
          const int64_t row0 = (accumulator - schedule.first_col) * kPairBlock;
          write_block(dk, static_cast<const BlockSums<acc_t>*>(nullptr), &by_columns, row0,
                      std::min(kPairBlock, m - row0), d, scale);
        }
      });
}

// ------------------------------------------------------------ arguments

void check_core_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& scale,
                       const OptionalTensor& q_labels, const OptionalTensor& k_labels) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), op,
              ": q and k must be CPU tensors, got ", q.device(), " and ", k.device());
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, op, ": q and k must be 2-D (N x D and M x D), got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.size(1) == k.size(1), op, ": q and k must have the same feature size, got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k must have the same dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  const auto dtype = q.scalar_type();
  check_kernel_dtype(op, "q and k", dtype);
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), op, ": q and k must be contiguous");
  TORCH_CHECK(scale.device().is_cpu() && scale.dim() == 0 &&
                  scale.scalar_type() == stats_dtype(dtype),
              op, ": scale must be a 0-dim CPU tensor of dtype ", stats_dtype(dtype),
              ", got shape ", scale.sizes(), " and dtype ", scale.scalar_type());
  TORCH_CHECK(q_labels.has_value() == k_labels.has_value(), op,
              ": q_labels and k_labels must be given together");
  if (!q_labels) {
    return;
  }
  const auto check_labels = [op](const char* name, const Tensor& labels, int64_t length) {
    TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong &&
                    labels.dim() == 1 && labels.size(0) == length && labels.is_contiguous(),
                op, ": ", name, " must be a contiguous int64 CPU vector of length ", length,
                ", got shape ", labels.sizes(), " and dtype ", labels.scalar_type());
  };
  check_labels("q_labels", *q_labels, q.size(0));
  check_labels("k_labels", *k_labels, k.size(0));
}

void check_optional_stats(const char* op, const char* name, const OptionalTensor& t,
                          int64_t length, at::ScalarType dtype) {
  if (t) {
    check_stats_vector(op, name, *t, length, dtype);
  }
}

// Label vectors for PairMask, as int32 codes equal exactly where the labels
// are (narrower lanes for the epilogues): the labels themselves when they fit,
// else their indices among the distinct values. Without labels, two constants
// that never match.
struct MaskLabels {
  Tensor q;
  Tensor k;
};

MaskLabels mask_labels(const OptionalTensor& q_labels, const OptionalTensor& k_labels, int64_t n,
                       int64_t m) {
  if (!q_labels) {
    return {at::zeros({n}, at::kInt), at::ones({m}, at::kInt)};
  }
  const Tensor all = at::cat({*q_labels, *k_labels});
  const bool fits = all.numel() == 0 ||
                    (all.min().item<int64_t>() >= std::numeric_limits<int32_t>::min() &&
                     all.max().item<int64_t>() <= std::numeric_limits<int32_t>::max());
  const Tensor codes =
      fits ? all.to(at::kInt) : std::get<1>(at::_unique(all, false, true)).to(at::kInt);
  return {codes.narrow(0, 0, n), codes.narrow(0, n, m)};
}

// The exclusion as a diagonal j == i + offset. An offset that no (i, j) in
// range reaches becomes m, which none reaches either and keeps the tile-local
// diagonal free of overflow.
int64_t exclusion_diagonal(std::optional<int64_t> exclude_offset, int64_t n, int64_t m) {
  if (!exclude_offset || *exclude_offset <= -n || *exclude_offset >= m) {
    return m;
  }
  return *exclude_offset;
}

// The label codes (mask_labels) and the exclusion diagonal of a call.
struct TileMasks {
  const int32_t* q_labels;
  const int32_t* k_labels;
  int64_t diagonal;

  // The mask of the tile starting at (query0, key0). The tile-local diagonal
  // is clamped to a value that, like the one it replaces, no pair of a tile
  // reaches whenever it lies beyond the tile's extent.
  PairMask at(int64_t query0, int64_t key0) const {
    constexpr int64_t kBeyondTile = kOuterBlock + kInnerBlock;
    const int64_t local = std::clamp(query0 + diagonal - key0, -kBeyondTile, kBeyondTile);
    return {q_labels + query0, k_labels + key0, static_cast<int32_t>(local)};
  }
};

template <typename T>
const T* data_or_null(const OptionalTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

int64_t column_groups(int64_t row_blocks, int64_t m) {
  const int64_t by_memory = kColumnPartialBudget / std::max<int64_t>(m, 1);
  return std::max<int64_t>(1, std::min({row_blocks, kMaxColumnGroups, by_memory}));
}

// lse = max + log(sum) for (max, sum) states; -inf for an empty set.
template <typename acc_t>
void finish_lse(const acc_t* max, const acc_t* sum, acc_t* lse, int64_t count) {
  for (int64_t e = 0; e < count; ++e) {
    lse[e] = max[e] == kNegInf<acc_t> ? kNegInf<acc_t> : max[e] + std::log(sum[e]);
  }
}

// Folds the (max, sum) states `part_*` into `max`, `sum`, element by element.
template <typename acc_t>
PYCLLOSS_VECTOR_CLONES void merge_lse(acc_t* max, acc_t* sum, const acc_t* part_max,
                                      const acc_t* part_sum, int64_t count) {
#pragma omp simd
  for (int64_t e = 0; e < count; ++e) {
    const acc_t new_max = max_of(max[e], part_max[e]);
    sum[e] = sum[e] * rescale_factor(max[e], new_max) +
             part_sum[e] * rescale_factor(part_max[e], new_max);
    max[e] = new_max;
  }
}

// Merges per-group (max, sum) column states (groups x m), in group order.
template <typename acc_t>
void merge_column_groups(acc_t* col_max, acc_t* col_sum, int64_t groups, int64_t m) {
  for (int64_t g = 1; g < groups; ++g) {
    merge_lse(col_max, col_sum, col_max + g * m, col_sum + g * m, m);
  }
}

// Folds the statistics of one tile (a fresh state) into the running ones.
template <typename acc_t>
void merge_row_stats(RowStats<acc_t> into, RowStats<acc_t> part, int64_t count) {
  merge_lse(into.max, into.sum, part.max, part.sum, count);
  for (int64_t e = 0; e < count; ++e) {
    into.pos_sum[e] += part.pos_sum[e];
    into.pos_count[e] += part.pos_count[e];
  }
}

// The optional terms of G as infonce_bwd and infonce_self_bwd take them.
struct GradTermInputs {
  const OptionalTensor& row_lse;
  const OptionalTensor& row_coef;
  const OptionalTensor& col_lse;
  const OptionalTensor& col_coef;
  const OptionalTensor& pos_coef;
  const OptionalTensor& pair_lse;

  void check(const char* op, int64_t n, int64_t m, at::ScalarType stats) const {
    TORCH_CHECK(row_lse.has_value() == row_coef.has_value(), op,
                ": row_lse and row_coef must be given together");
    TORCH_CHECK(col_lse.has_value() == col_coef.has_value(), op,
                ": col_lse and col_coef must be given together");
    check_optional_stats(op, "row_lse", row_lse, n, stats);
    check_optional_stats(op, "row_coef", row_coef, n, stats);
    check_optional_stats(op, "col_lse", col_lse, m, stats);
    check_optional_stats(op, "col_coef", col_coef, m, stats);
    check_optional_stats(op, "pos_coef", pos_coef, n, stats);
    check_optional_stats(op, "pair_lse", pair_lse, n, stats);
  }

  template <typename acc_t>
  LogitGradTerms<acc_t> terms(bool neg_only) const {
    return {data_or_null<acc_t>(row_lse),  data_or_null<acc_t>(row_coef),
            data_or_null<acc_t>(col_lse),  data_or_null<acc_t>(col_coef),
            data_or_null<acc_t>(pos_coef), data_or_null<acc_t>(pair_lse),
            neg_only};
  }
};

// Which layouts of q and k (TileOperand) an op's passes read.
enum class Layout {
  kQueryBlocks,  // for_each_logit_tile, gradient_pass
  kAllTiles,     // gradient_both_sides
  kSymmetric,    // for_each_block_pair: q and k are the same rows (operands.q = operands.k)
};

// The set-up of every op of the core, done in one place (core_args): the
// checks of q, k, scale and labels, the sizes, the statistics dtype, the
// masks and the operands of the tile products in the op's layout.
struct CoreArgs {
  int64_t n;
  int64_t m;
  at::ScalarType stats;
  at::TensorOptions options;  // of statistics tensors
  MaskLabels labels;          // the codes that `masks` points into
  TileMasks masks;
  TileOperands operands;
};

CoreArgs core_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& scale,
                   const OptionalTensor& q_labels, const OptionalTensor& k_labels,
                   std::optional<int64_t> exclude_offset, Layout layout) {
  check_core_inputs(op, q, k, scale, q_labels, k_labels);
  const int64_t n = q.size(0);
  const int64_t m = k.size(0);
  const auto stats = stats_dtype(q.scalar_type());
  MaskLabels labels = mask_labels(q_labels, k_labels, n, m);
  const TileMasks masks{labels.q.data_ptr<int32_t>(), labels.k.data_ptr<int32_t>(),
                        exclusion_diagonal(exclude_offset, n, m)};
  TileOperands operands;
  switch (layout) {
    case Layout::kQueryBlocks:
      operands = tile_operands(q, k, stats, false, true);
      break;
    case Layout::kAllTiles:
      operands = tile_operands(q, k, stats, true, true, kPairBlock);
      break;
    case Layout::kSymmetric:
      operands.q = operands.k = tile_operand(q, stats, true, kPairBlock);
      break;
  }
  return {n, m, stats, q.options().dtype(stats), std::move(labels), masks, std::move(operands)};
}

// dq, and dk when need_dk, of a backward op: a pass over query blocks
// (gradient_pass) or one pass over all tiles (gradient_both_sides).
// grad_tile(tile, g, query0, queries, key0, keys) writes a tile's G into g
// (which may be the tile) and returns its sums (dscale, ...); they add up per
// query block or per tile, then in that order, whatever the threads.
template <typename Sums, typename scalar_t, typename acc_t, typename GradTile>
Sums gradient_passes(const CoreArgs& args, acc_t scale, bool need_dk, scalar_t* dq, scalar_t* dk,
                     const GradTile& grad_tile) {
  std::vector<Sums> parts;
  if (need_dk) {
    parts.resize(num_blocks(args.n, kPairBlock) * num_blocks(args.m, kPairBlock));
    gradient_both_sides(args.operands.q, args.operands.k, scale, dq, dk,
                        [&](const acc_t* tile, acc_t* g, int64_t query0, int64_t queries,
                            int64_t key0, int64_t keys, int64_t task) {
                          parts[task] += grad_tile(tile, g, query0, queries, key0, keys);
                        });
  } else {
    parts.resize(num_blocks(args.n, kOuterBlock));
    gradient_pass(args.operands.q, args.operands.k, scale, dq,
                  [&](acc_t* tile, int64_t query0, int64_t queries, int64_t key0, int64_t keys,
                      int64_t block) {
                    parts[block] += grad_tile(tile, tile, query0, queries, key0, keys);
                  });
  }
  Sums total{};
  for (const Sums& part : parts) {
    total += part;
  }
  return total;
}

// ------------------------------------------------------ symmetric schedule
//
// When q and k are the same rows z, l_ij and l_ji share a dot product: each
// tile z_I z_J^T (I <= J) is computed once, read by rows for block I's
// queries and by columns (key-major) for block J's (for_each_block_pair).

// Statistics of up to kPairBlock queries in a buffer of 4 * kPairBlock
// values; fresh_stats_in empties them first (max -inf, sums 0).
template <typename acc_t>
RowStats<acc_t> stats_in(acc_t* buffer) {
  return {buffer, buffer + kPairBlock, buffer + 2 * kPairBlock, buffer + 3 * kPairBlock};
}

template <typename acc_t>
RowStats<acc_t> fresh_stats_in(acc_t* buffer) {
  std::fill(buffer, buffer + kPairBlock, kNegInf<acc_t>);
  std::fill(buffer + kPairBlock, buffer + 4 * kPairBlock, acc_t(0));
  return stats_in(buffer);
}

// infonce_fwd's row statistics (before finish_lse) of z against itself.
template <typename acc_t>
void symmetric_row_stats(const TileOperand& z, acc_t scale, const TileMasks& masks,
                         bool neg_only, RowStats<acc_t> stats) {
  // A contribution: the statistics of the tile's rows, then of its columns.
  for_each_block_pair<acc_t>(
      z, kPendingStats, [] { return std::vector<acc_t>(8 * kPairBlock); },
      [&](std::vector<acc_t>& parts, acc_t* tile, BlockPair pair, PairTile span, int64_t) {
        const RowStats<acc_t> by_row = fresh_stats_in(parts.data());
        const RowStats<acc_t> by_column = fresh_stats_in(parts.data() + 4 * kPairBlock);
        if (!pair.diagonal()) {  // first: the row pass overwrites the tile
          infonce_key_major_stats_tile(
              tile, span.rows, span.cols, scale,
              masks.at(span.col0, span.row0), neg_only, by_column);
        }
        infonce_row_stats_tile(tile, span.rows, span.cols, scale,
                               masks.at(span.row0, span.col0),
                               neg_only, by_row);
      },
      [&](std::vector<acc_t>& parts, PairTile span, bool row_side) {
        if (row_side) {
          merge_row_stats(stats.at(span.row0), stats_in(parts.data()), span.rows);
        } else {
          merge_row_stats(stats.at(span.col0), stats_in(parts.data() + 4 * kPairBlock),
                          span.cols);
        }
      },
      [](int32_t) {});
}

// infonce_pair_fwd's sums of z against itself.
template <typename acc_t>
void symmetric_pair_terms(const TileOperand& z, acc_t scale, const TileMasks& masks,
                          const acc_t* neg_lse, acc_t* loss_sum, acc_t* sigmoid_sum) {
  // A contribution: loss and sigmoid sums of the tile's rows, then of its
  // columns, kPairBlock values each.
  for_each_block_pair<acc_t>(
      z, kPendingStats, [] { return std::vector<acc_t>(4 * kPairBlock); },
      [&](std::vector<acc_t>& sums, acc_t* tile, BlockPair pair, PairTile span, int64_t) {
        std::fill(sums.begin(), sums.end(), acc_t(0));
        acc_t* row_sums = sums.data();
        acc_t* col_sums = sums.data() + 2 * kPairBlock;
        infonce_pair_tile(tile, span.rows, span.cols, scale,
                          masks.at(span.row0, span.col0),
                          neg_lse + span.row0, row_sums, row_sums + kPairBlock);
        if (!pair.diagonal()) {
          infonce_key_major_pair_tile(tile, span.rows, span.cols, scale,
                                      masks.at(span.col0, span.row0),
                                      neg_lse + span.col0, col_sums, col_sums + kPairBlock);
        }
      },
      [&](std::vector<acc_t>& sums, PairTile span, bool row_side) {
        const int64_t query0 = row_side ? span.row0 : span.col0;
        const int64_t count = row_side ? span.rows : span.cols;
        const acc_t* part = sums.data() + (row_side ? 0 : 2 * kPairBlock);
        for (int64_t e = 0; e < count; ++e) {
          loss_sum[query0 + e] += part[e];
          sigmoid_sum[query0 + e] += part[kPairBlock + e];
        }
      },
      [](int32_t) {});
}

// dz = scale * (G + G^T) z for q = k = z (dq + dk of infonce_bwd), written
// to `dz`; returns dscale. With H_IJ = G_IJ + (G_JI)^T, built from one tile,
// a task adds H_IJ z_J into block I and (for I < J) H_IJ^T z_I into block J:
// the latter as z_I^T H_IJ into a transposed accumulator (the layout of
// z.blocked_t), which the tile products read and write without copies.
template <typename scalar_t, typename acc_t>
acc_t symmetric_gradient(const TileOperand& z, acc_t scale, const TileMasks& masks,
                         LogitGradTerms<acc_t> terms, scalar_t* dz) {
  const int64_t n = z.rows.size(0);
  const int64_t d = z.rows.size(1);
  const acc_t* rows = z.rows.data_ptr<acc_t>();
  const acc_t* blocked_t = n > 0 ? z.blocked_t.data_ptr<acc_t>() : nullptr;
  const int64_t blocks = num_blocks(n, kPairBlock);
  BlockSums<acc_t> by_rows(n, d, z.rows.scalar_type());     // sum over J >= I of H_IJ z_J
  BlockSums<acc_t> by_columns(n, d, z.rows.scalar_type());  // sum over I < J of z_I^T H_IJ
  std::vector<acc_t> dscale_parts(blocks * (blocks + 1) / 2);
  // A contribution: H_IJ.
  for_each_block_pair<acc_t>(
      z, kPendingTiles, [] { return std::vector<acc_t>(kPairBlock * kPairBlock); },
      [&](std::vector<acc_t>& h, acc_t* tile, BlockPair pair, PairTile span, int64_t task) {
        const acc_t by_row = infonce_grad_tile<acc_t, false>(
            tile, h.data(), false, span.rows, span.cols, scale,
            masks.at(span.row0, span.col0),
            terms.at(span.row0, span.col0));
        const acc_t by_column = infonce_grad_tile<acc_t, true>(
            tile, h.data(), true, span.rows, span.cols, scale,
            masks.at(span.col0, span.row0),
            terms.at(span.col0, span.row0));
        // A diagonal tile holds every pair of its block both ways: count it once.
        dscale_parts[task] = pair.diagonal() ? by_row : by_row + by_column;
      },
      [&](std::vector<acc_t>& h, PairTile span, bool row_side) {
        add_gradient_tile(h.data(), span, row_side, d, rows, blocked_t, by_rows, by_columns);
      },
      [&](int32_t block) {  // complete: dz of its rows
        const int64_t row0 = block * kPairBlock;
        write_block(dz, &by_rows, &by_columns, row0, std::min(kPairBlock, n - row0), d, scale);
      });
  acc_t dscale = 0;
  for (const acc_t part : dscale_parts) {
    dscale += part;
  }
  return dscale;
}

// ------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor, Tensor, Tensor> infonce_fwd(
    const Tensor& q, const Tensor& k, const Tensor& scale, const OptionalTensor& q_labels,
    const OptionalTensor& k_labels, std::optional<int64_t> exclude_offset, bool neg_only,
    bool col_stats) {
  constexpr const char* op = "infonce_fwd";
  const bool symmetric = !col_stats && same_rows(q, k);
  const CoreArgs args = core_args(op, q, k, scale, q_labels, k_labels, exclude_offset,
                                  symmetric ? Layout::kSymmetric : Layout::kQueryBlocks);
  TORCH_CHECK(!(col_stats && neg_only), op, ": col_stats cannot be combined with neg_only");
  const int64_t n = args.n;
  const int64_t m = args.m;
  Tensor row_max = at::full({n}, -INFINITY, args.options);
  Tensor row_sum = at::zeros({n}, args.options);
  Tensor pos_sum = at::zeros({n}, args.options);
  Tensor pos_count = at::zeros({n}, args.options);
  const int64_t row_blocks = num_blocks(n, kOuterBlock);
  const int64_t groups = col_stats ? column_groups(row_blocks, m) : row_blocks;
  Tensor col_max = at::full({col_stats ? groups : 0, m}, -INFINITY, args.options);
  Tensor col_sum = at::zeros({col_stats ? groups : 0, m}, args.options);
  Tensor col_lse = at::empty({col_stats ? m : 0}, args.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale.item<acc_t>();
    const RowStats<acc_t> rows{row_max.data_ptr<acc_t>(), row_sum.data_ptr<acc_t>(),
                               pos_sum.data_ptr<acc_t>(), pos_count.data_ptr<acc_t>()};
    acc_t* col_max_data = col_max.data_ptr<acc_t>();
    acc_t* col_sum_data = col_sum.data_ptr<acc_t>();
    if (symmetric) {
      symmetric_row_stats(args.operands.q, s, args.masks, neg_only, rows);
    } else {
      for_each_logit_tile<acc_t>(
          args.operands.q, args.operands.k, groups,
          [&](acc_t* tile, int64_t query0, int64_t queries, int64_t key0, int64_t keys,
              int64_t group) {
            infonce_row_stats_tile(tile, queries, keys, s, args.masks.at(query0, key0), neg_only,
                                   rows.at(query0));
            if (col_stats) {
              const int64_t state = group * m + key0;
              column_lse_tile(tile, queries, keys, col_max_data + state, col_sum_data + state);
            }
          });
    }
    finish_lse(rows.max, rows.sum, rows.sum, n);
    if (col_stats) {
      merge_column_groups(col_max_data, col_sum_data, groups, m);
      finish_lse(col_max_data, col_sum_data, col_lse.data_ptr<acc_t>(), m);
    }
  });
  return {row_sum, pos_sum, pos_count, col_lse};
}

std::tuple<Tensor, Tensor> infonce_pair_fwd(const Tensor& q, const Tensor& k,
                                            const Tensor& scale, const Tensor& q_labels,
                                            const Tensor& k_labels,
                                            std::optional<int64_t> exclude_offset,
                                            const Tensor& neg_lse) {
  constexpr const char* op = "infonce_pair_fwd";
  const bool symmetric = same_rows(q, k);
  const CoreArgs args = core_args(op, q, k, scale, q_labels, k_labels, exclude_offset,
                                  symmetric ? Layout::kSymmetric : Layout::kQueryBlocks);
  check_stats_vector(op, "neg_lse", neg_lse, args.n, args.stats);
  Tensor loss_sum = at::zeros({args.n}, args.options);
  Tensor sigmoid_sum = at::zeros({args.n}, args.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale.item<acc_t>();
    const acc_t* neg_lse_data = neg_lse.data_ptr<acc_t>();
    acc_t* loss_data = loss_sum.data_ptr<acc_t>();
    acc_t* sigmoid_data = sigmoid_sum.data_ptr<acc_t>();
    if (symmetric) {
      symmetric_pair_terms(args.operands.q, s, args.masks, neg_lse_data, loss_data, sigmoid_data);
      return;
    }
    for_each_logit_tile<acc_t>(
        args.operands.q, args.operands.k, num_blocks(args.n, kOuterBlock),
        [&](acc_t* tile, int64_t query0, int64_t queries, int64_t key0, int64_t keys, int64_t) {
          infonce_pair_tile(tile, queries, keys, s, args.masks.at(query0, key0),
                            neg_lse_data + query0, loss_data + query0, sigmoid_data + query0);
        });
  });
  return {loss_sum, sigmoid_sum};
}

std::tuple<Tensor, Tensor, Tensor> infonce_bwd(
    const Tensor& q, const Tensor& k, const Tensor& scale, const OptionalTensor& q_labels,
    const OptionalTensor& k_labels, std::optional<int64_t> exclude_offset, bool neg_only,
    const OptionalTensor& row_lse, const OptionalTensor& row_coef, const OptionalTensor& col_lse,
    const OptionalTensor& col_coef, const OptionalTensor& pos_coef,
    const OptionalTensor& pair_lse, bool need_dk) {
  constexpr const char* op = "infonce_bwd";
  // dq alone: a pass over query blocks; dq and dk: one pass over all tiles.
  const CoreArgs args = core_args(op, q, k, scale, q_labels, k_labels, exclude_offset,
                                  need_dk ? Layout::kAllTiles : Layout::kQueryBlocks);
  const GradTermInputs grad_inputs{row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse};
  grad_inputs.check(op, args.n, args.m, args.stats);
  Tensor dq = at::empty_like(q);
  Tensor dk = need_dk ? at::empty_like(k) : at::empty({0}, k.options());
  Tensor dscale = at::empty({}, args.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale.item<acc_t>();
    const LogitGradTerms<acc_t> terms = grad_inputs.terms<acc_t>(neg_only);
    dscale.fill_(gradient_passes<acc_t>(
        args, s, need_dk, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
        [&](const acc_t* tile, acc_t* g, int64_t query0, int64_t queries, int64_t key0,
            int64_t keys) {
          return infonce_grad_tile<acc_t, false>(tile, g, false, queries, keys, s,
                                                 args.masks.at(query0, key0),
                                                 terms.at(query0, key0));
        }));
  });
  return {dq, dk, dscale};
}

std::tuple<Tensor, Tensor> infonce_self_bwd(
    const Tensor& z, const Tensor& scale, const OptionalTensor& q_labels,
    const OptionalTensor& k_labels, std::optional<int64_t> exclude_offset, bool neg_only,
    const OptionalTensor& row_lse, const OptionalTensor& row_coef, const OptionalTensor& col_lse,
    const OptionalTensor& col_coef, const OptionalTensor& pos_coef,
    const OptionalTensor& pair_lse) {
  constexpr const char* op = "infonce_self_bwd";
  const CoreArgs args =
      core_args(op, z, z, scale, q_labels, k_labels, exclude_offset, Layout::kSymmetric);
  const GradTermInputs grad_inputs{row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse};
  grad_inputs.check(op, args.n, args.n, args.stats);
  Tensor dz = at::empty_like(z);
  Tensor dscale = at::empty({}, args.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dscale.fill_(symmetric_gradient(args.operands.q, scale.item<acc_t>(), args.masks,
                                    grad_inputs.terms<acc_t>(neg_only), dz.data_ptr<scalar_t>()));
  });
  return {dz, dscale};
}

void check_bias(const char* op, const Tensor& bias, const Tensor& scale) {
  TORCH_CHECK(bias.device().is_cpu() && bias.dim() == 0 &&
                  bias.scalar_type() == scale.scalar_type(),
              op, ": bias must be a 0-dim CPU tensor of dtype ", scale.scalar_type());
}

Tensor siglip_fwd(const Tensor& q, const Tensor& k, const Tensor& scale, const Tensor& bias,
                  const OptionalTensor& q_labels, const OptionalTensor& k_labels) {
  constexpr const char* op = "siglip_fwd";
  const CoreArgs args =
      core_args(op, q, k, scale, q_labels, k_labels, std::nullopt, Layout::kQueryBlocks);
  check_bias(op, bias, scale);
  Tensor row_loss = at::zeros({args.n}, args.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale.item<acc_t>();
    const acc_t b = bias.item<acc_t>();
    acc_t* loss = row_loss.data_ptr<acc_t>();
    for_each_logit_tile<acc_t>(
        args.operands.q, args.operands.k, num_blocks(args.n, kOuterBlock),
        [&](acc_t* tile, int64_t query0, int64_t queries, int64_t key0, int64_t keys, int64_t) {
          siglip_loss_tile(tile, queries, keys, s, b, args.masks.at(query0, key0), loss + query0);
        });
  });
  return row_loss;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_bwd(const Tensor& q, const Tensor& k,
                                                      const Tensor& scale, const Tensor& bias,
                                                      const OptionalTensor& q_labels,
                                                      const OptionalTensor& k_labels,
                                                      const Tensor& row_coef, bool need_dk) {
  constexpr const char* op = "siglip_bwd";
  const CoreArgs args = core_args(op, q, k, scale, q_labels, k_labels, std::nullopt,
                                  need_dk ? Layout::kAllTiles : Layout::kQueryBlocks);
  check_bias(op, bias, scale);
  check_stats_vector(op, "row_coef", row_coef, args.n, args.stats);
  Tensor dq = at::empty_like(q);
  Tensor dk = need_dk ? at::empty_like(k) : at::empty({0}, k.options());
  Tensor dscale = at::empty({}, args.options);
  Tensor dbias = at::empty({}, args.options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scale.item<acc_t>();
    const acc_t b = bias.item<acc_t>();
    const acc_t* coef = row_coef.data_ptr<acc_t>();
    const SiglipGradSums<acc_t> total = gradient_passes<SiglipGradSums<acc_t>>(
        args, s, need_dk, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
        [&](const acc_t* tile, acc_t* g, int64_t query0, int64_t queries, int64_t key0,
            int64_t keys) {
          return siglip_grad_tile(tile, g, queries, keys, s, b, args.masks.at(query0, key0),
                                  coef + query0);
        });
    dscale.fill_(total.dscale);
    dbias.fill_(total.dbias);
  });
  return {dq, dk, dscale, dbias};
}

}  // namespace
}  // namespace pyclloss::cpu

TORCH_LIBRARY_FRAGMENT(pyclloss_C, m) {
  m.def(
      "infonce_fwd(Tensor q, Tensor k, Tensor scale, Tensor? q_labels, Tensor? k_labels, "
      "int? exclude_offset, bool neg_only, bool col_stats) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "infonce_pair_fwd(Tensor q, Tensor k, Tensor scale, Tensor q_labels, Tensor k_labels, "
      "int? exclude_offset, Tensor neg_lse) -> (Tensor, Tensor)");
  m.def(
      "infonce_bwd(Tensor q, Tensor k, Tensor scale, Tensor? q_labels, Tensor? k_labels, "
      "int? exclude_offset, bool neg_only, Tensor? row_lse, Tensor? row_coef, Tensor? col_lse, "
      "Tensor? col_coef, Tensor? pos_coef, Tensor? pair_lse, bool need_dk) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "infonce_self_bwd(Tensor z, Tensor scale, Tensor? q_labels, Tensor? k_labels, "
      "int? exclude_offset, bool neg_only, Tensor? row_lse, Tensor? row_coef, Tensor? col_lse, "
      "Tensor? col_coef, Tensor? pos_coef, Tensor? pair_lse) -> (Tensor, Tensor)");
  m.def(
      "siglip_fwd(Tensor q, Tensor k, Tensor scale, Tensor bias, Tensor? q_labels, "
      "Tensor? k_labels) -> Tensor");
  m.def(
      "siglip_bwd(Tensor q, Tensor k, Tensor scale, Tensor bias, Tensor? q_labels, "
      "Tensor? k_labels, Tensor row_coef, bool need_dk) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyclloss_C, CPU, m) {
  m.impl("infonce_fwd", &pyclloss::cpu::infonce_fwd);
  m.impl("infonce_pair_fwd", &pyclloss::cpu::infonce_pair_fwd);
  m.impl("infonce_bwd", &pyclloss::cpu::infonce_bwd);
  m.impl("infonce_self_bwd", &pyclloss::cpu::infonce_self_bwd);
  m.impl("siglip_fwd", &pyclloss::cpu::siglip_fwd);
  m.impl("siglip_bwd", &pyclloss::cpu::siglip_bwd);
}
