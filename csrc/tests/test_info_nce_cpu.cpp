// Unit tests of the CPU kernels of the fused InfoNCE core. The ops are
// called through the dispatcher and checked against naive double-precision
// loops written straight from docs/fused_core.md, on small sizes that still
// cross the kernels' tile edges; the tile schedules and their ordered
// additions are checked on their own. The exit status is the number of
// failures.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "pyclloss/cpu_schedule.h"

#ifdef __linux__
#include <sched.h>
#endif

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
constexpr double kInf = std::numeric_limits<double>::infinity();

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += ok ? 0 : 1;
}

// Max of |got - want| / (1 + |want|); infinities must match exactly.
void expect_close(const std::string& what, const Tensor& got, const Tensor& want, double tol) {
  const Tensor g = got.to(at::kDouble).contiguous();
  const Tensor w = want.to(at::kDouble).contiguous();
  bool ok = g.sizes() == w.sizes();
  double worst = 0;
  for (int64_t e = 0; ok && e < g.numel(); ++e) {
    const double a = g.data_ptr<double>()[e];
    const double b = w.data_ptr<double>()[e];
    if (std::isinf(b)) {
      ok = a == b;
    } else {
      worst = std::max(worst, std::abs(a - b) / (1 + std::abs(b)));  // NaN fails below
      ok = std::abs(a - b) <= tol * (1 + std::abs(b));
    }
  }
  std::printf("%s %-44s max rel. error %.3g\n", ok ? "ok  " : "FAIL", what.c_str(), worst);
  failures += ok ? 0 : 1;
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// One problem and its naive evaluation, all in double.
struct Problem {
  int64_t n = 0, m = 0, d = 0;
  Tensor q, k;                  // input dtype
  std::vector<double> qv, kv;   // the same values, row-major
  double scale = 1;
  std::vector<int64_t> q_labels, k_labels;  // empty: no labels
  std::optional<int64_t> exclude_offset;
  bool neg_only = false;

  double dot(int64_t i, int64_t j) const {
    double sum = 0;
    for (int64_t e = 0; e < d; ++e) sum += qv[i * d + e] * kv[j * d + e];
    return sum;
  }
  bool excluded(int64_t i, int64_t j) const {
    return exclude_offset.has_value() && j == i + *exclude_offset;
  }
  bool positive(int64_t i, int64_t j) const {
    return !q_labels.empty() && q_labels[i] == k_labels[j] && !excluded(i, j);
  }
  bool den(int64_t i, int64_t j) const {
    return !excluded(i, j) && !(neg_only && positive(i, j));
  }
  OptionalTensor labels(const std::vector<int64_t>& v) const {
    if (v.empty()) {
      return std::nullopt;
    }
    return at::tensor(v, at::kLong);
  }
};

double lse(const std::vector<double>& values) {
  double top = -kInf;
  for (double v : values) top = std::max(top, v);
  if (top == -kInf) return -kInf;
  double sum = 0;
  for (double v : values) sum += std::exp(v - top);
  return top + std::log(sum);
}

double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }
double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

Tensor vec(const std::vector<double>& v) { return at::tensor(v, at::kDouble); }

std::vector<double> values(const Tensor& t) {
  const Tensor c = t.to(at::kDouble).contiguous();
  return {c.data_ptr<double>(), c.data_ptr<double>() + c.numel()};
}

Tensor unit_rows(int64_t rows, int64_t cols) {
  const Tensor x = at::randn({rows, cols}, at::kDouble);
  return x / x.norm(2, {1}, true);
}

Problem make_problem(int64_t n, int64_t m, int64_t d, at::ScalarType dtype, bool labels,
                     std::optional<int64_t> exclude_offset, bool neg_only) {
  Problem p;
  p.n = n;
  p.m = m;
  p.d = d;
  p.q = unit_rows(n, d).to(dtype);
  p.k = unit_rows(m, d).to(dtype);
  p.qv = values(p.q);
  p.kv = values(p.k);
  p.scale = 9.0;
  if (labels) {
    for (int64_t i = 0; i < n; ++i) p.q_labels.push_back(i % 3);
    for (int64_t j = 0; j < m; ++j) p.k_labels.push_back((j * 7) % 4);
  }
  p.exclude_offset = exclude_offset;
  p.neg_only = neg_only;
  return p;
}

// q and k the same tensor (the self-similarity losses); the key role's labels
// may differ from the query role's.
Problem make_self_problem(int64_t n, int64_t d, at::ScalarType dtype, bool labels,
                          std::optional<int64_t> exclude_offset, bool neg_only) {
  Problem p = make_problem(n, n, d, dtype, labels, exclude_offset, neg_only);
  p.k = p.q;
  p.kv = p.qv;
  return p;
}

void check(const Problem& p, const std::string& name) {
  const auto stats = p.q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double tol = stats == at::kDouble ? 1e-11 : 2e-5;
  // dq and dk come back rounded to the input dtype.
  const double grad_tol = p.q.scalar_type() == at::kBFloat16 ? 1e-2 : 10 * tol;
  const Tensor s = at::scalar_tensor(p.scale, stats);
  const OptionalTensor ql = p.labels(p.q_labels);
  const OptionalTensor kl = p.labels(p.k_labels);
  const bool col_stats = !p.neg_only;

  // Naive logits and forward statistics.
  std::vector<std::vector<double>> dot(p.n, std::vector<double>(p.m));
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.m; ++j) dot[i][j] = p.dot(i, j);
  std::vector<double> row_lse(p.n), pos_sum(p.n, 0), pos_count(p.n, 0), col_lse;
  for (int64_t i = 0; i < p.n; ++i) {
    std::vector<double> set;
    for (int64_t j = 0; j < p.m; ++j) {
      if (p.den(i, j)) set.push_back(p.scale * dot[i][j]);
      if (p.positive(i, j)) {
        pos_sum[i] += p.scale * dot[i][j];
        pos_count[i] += 1;
      }
    }
    row_lse[i] = lse(set);
  }
  for (int64_t j = 0; col_stats && j < p.m; ++j) {
    std::vector<double> set;
    for (int64_t i = 0; i < p.n; ++i)
      if (!p.excluded(i, j)) set.push_back(p.scale * dot[i][j]);
    col_lse.push_back(lse(set));
  }
  const auto fwd = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
      std::optional<int64_t>, bool, bool)>("pyclloss_C::infonce_fwd");
  const auto [got_row_lse, got_pos_sum, got_pos_count, got_col_lse] =
      fwd.call(p.q, p.k, s, ql, kl, p.exclude_offset, p.neg_only, col_stats);
  expect_close(name + " infonce_fwd row_lse", got_row_lse, vec(row_lse), tol);
  expect_close(name + " infonce_fwd pos_sum", got_pos_sum, vec(pos_sum), tol);
  expect_close(name + " infonce_fwd pos_count", got_pos_count, vec(pos_count), 0);
  expect_close(name + " infonce_fwd col_lse", got_col_lse, vec(col_lse), tol);
  if (p.q.is_same(p.k)) {  // without column statistics: the symmetric schedule
    const auto sym = fwd.call(p.q, p.q, s, ql, kl, p.exclude_offset, p.neg_only, false);
    expect_close(name + " symmetric infonce_fwd row_lse", std::get<0>(sym), vec(row_lse), tol);
    expect_close(name + " symmetric infonce_fwd pos_sum", std::get<1>(sym), vec(pos_sum), tol);
    expect_close(name + " symmetric infonce_fwd pos_count", std::get<2>(sym), vec(pos_count),
                 0);
  }

  // Pair forward against the negatives' LSE (finite rows only feed it).
  if (ql) {
    std::vector<double> neg_lse(p.n), loss(p.n, 0), weight(p.n, 0);
    for (int64_t i = 0; i < p.n; ++i) {
      neg_lse[i] = 0.5 * static_cast<double>(i % 5) + 1;
      for (int64_t j = 0; j < p.m; ++j) {
        if (!p.positive(i, j)) continue;
        loss[i] += softplus(neg_lse[i] - p.scale * dot[i][j]);
        weight[i] += sigmoid(neg_lse[i] - p.scale * dot[i][j]);
      }
    }
    const auto pair_fwd = op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        std::optional<int64_t>, const Tensor&)>("pyclloss_C::infonce_pair_fwd");
    const auto [got_loss, got_weight] =
        pair_fwd.call(p.q, p.k, s, *ql, *kl, p.exclude_offset, vec(neg_lse).to(stats));
    expect_close(name + " infonce_pair_fwd loss_sum", got_loss, vec(loss), tol);
    expect_close(name + " infonce_pair_fwd sigmoid_sum", got_weight, vec(weight), tol);
  }

  // Backward with every term present; coefficients 0 where an LSE is -inf.
  std::vector<double> row_coef(p.n), col_coef(p.m), pos_coef(p.n), pair_lse(p.n);
  for (int64_t i = 0; i < p.n; ++i) {
    row_coef[i] = std::isinf(row_lse[i]) ? 0 : 0.25 * static_cast<double>(i % 4);
    pos_coef[i] = -0.5 + 0.1 * static_cast<double>(i % 7);
    pair_lse[i] = std::isinf(row_lse[i]) ? 0 : row_lse[i] - 0.3;
  }
  for (int64_t j = 0; j < p.m; ++j)
    col_coef[j] = !col_stats || std::isinf(col_lse[j]) ? 0 : 0.1 * static_cast<double>(j % 3);
  std::vector<double> dq(p.n * p.d, 0), dk(p.m * p.d, 0);
  double dscale = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    for (int64_t j = 0; j < p.m; ++j) {
      const double l = p.scale * dot[i][j];
      double g = 0;
      if (p.den(i, j) && row_coef[i] != 0) g += row_coef[i] * std::exp(l - row_lse[i]);
      if (col_stats && !p.excluded(i, j) && col_coef[j] != 0)
        g += col_coef[j] * std::exp(l - col_lse[j]);
      if (p.positive(i, j)) g += pos_coef[i] * sigmoid(pair_lse[i] - l);
      dscale += g * dot[i][j];
      for (int64_t e = 0; e < p.d; ++e) {
        dq[i * p.d + e] += p.scale * g * p.kv[j * p.d + e];
        dk[j * p.d + e] += p.scale * g * p.qv[i * p.d + e];
      }
    }
  }
  const auto bwd = op<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
      std::optional<int64_t>, bool, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      bool)>("pyclloss_C::infonce_bwd");
  OptionalTensor col_lse_arg, col_coef_arg;
  if (col_stats) {
    col_lse_arg = vec(col_lse).to(stats);
    col_coef_arg = vec(col_coef).to(stats);
  }
  const auto [got_dq, got_dk, got_dscale] =
      bwd.call(p.q, p.k, s, ql, kl, p.exclude_offset, p.neg_only, vec(row_lse).to(stats),
               vec(row_coef).to(stats), col_lse_arg, col_coef_arg, vec(pos_coef).to(stats),
               vec(pair_lse).to(stats), true);
  expect_close(name + " infonce_bwd dq", got_dq, vec(dq).view({p.n, p.d}), grad_tol);
  expect_close(name + " infonce_bwd dk", got_dk, vec(dk).view({p.m, p.d}), grad_tol);
  expect_close(name + " infonce_bwd dscale", got_dscale, at::scalar_tensor(dscale, at::kDouble), grad_tol);
  if (p.q.is_same(p.k)) {
    const auto self_bwd = op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&,
        std::optional<int64_t>, bool, const OptionalTensor&, const OptionalTensor&,
        const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
        const OptionalTensor&)>("pyclloss_C::infonce_self_bwd");
    const auto [got_dz, got_self_dscale] =
        self_bwd.call(p.q, s, ql, kl, p.exclude_offset, p.neg_only, vec(row_lse).to(stats),
                      vec(row_coef).to(stats), col_lse_arg, col_coef_arg,
                      vec(pos_coef).to(stats), vec(pair_lse).to(stats));
    std::vector<double> dz(p.n * p.d);
    for (size_t e = 0; e < dz.size(); ++e) dz[e] = dq[e] + dk[e];
    expect_close(name + " infonce_self_bwd dz", got_dz, vec(dz).view({p.n, p.d}), grad_tol);
    expect_close(name + " infonce_self_bwd dscale", got_self_dscale,
                 at::scalar_tensor(dscale, at::kDouble), grad_tol);
  }

  // SigLIP: z = +1 on same labels, no exclusion.
  const double bias = -3.0;
  std::vector<double> row_loss(p.n, 0), sig_dq(p.n * p.d, 0), sig_dk(p.m * p.d, 0);
  double sig_dscale = 0, sig_dbias = 0;
  for (int64_t i = 0; i < p.n; ++i) {
    for (int64_t j = 0; j < p.m; ++j) {
      const double z = !p.q_labels.empty() && p.q_labels[i] == p.k_labels[j] ? 1.0 : -1.0;
      const double x = p.scale * dot[i][j] + bias;
      row_loss[i] += softplus(-z * x);
      const double g = row_coef[i] * -z * sigmoid(-z * x);
      sig_dscale += g * dot[i][j];
      sig_dbias += g;
      for (int64_t e = 0; e < p.d; ++e) {
        sig_dq[i * p.d + e] += p.scale * g * p.kv[j * p.d + e];
        sig_dk[j * p.d + e] += p.scale * g * p.qv[i * p.d + e];
      }
    }
  }
  const Tensor b = at::scalar_tensor(bias, stats);
  const auto siglip_fwd = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const OptionalTensor&, const OptionalTensor&)>(
      "pyclloss_C::siglip_fwd");
  expect_close(name + " siglip_fwd", siglip_fwd.call(p.q, p.k, s, b, ql, kl), vec(row_loss), tol);
  const auto siglip_bwd = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
      const OptionalTensor&, const Tensor&, bool)>("pyclloss_C::siglip_bwd");
  const auto [sdq, sdk, sds, sdb] =
      siglip_bwd.call(p.q, p.k, s, b, ql, kl, vec(row_coef).to(stats), true);
  expect_close(name + " siglip_bwd dq", sdq, vec(sig_dq).view({p.n, p.d}), grad_tol);
  expect_close(name + " siglip_bwd dk", sdk, vec(sig_dk).view({p.m, p.d}), grad_tol);
  expect_close(name + " siglip_bwd dscale", sds, at::scalar_tensor(sig_dscale, at::kDouble), grad_tol);
  expect_close(name + " siglip_bwd dbias", sdb, at::scalar_tensor(sig_dbias, at::kDouble), grad_tol);
}

// Every tile once (unordered pairs for the symmetric schedule), turns that
// count the earlier tasks of each accumulator, and, for the symmetric one,
// tasks of one block at least blocks / 2 - 1 apart.
void check_schedule(const pyclloss::cpu::TileSchedule& schedule, int64_t row_blocks,
                    int64_t col_blocks, bool symmetric, const std::string& name) {
  std::set<std::pair<int32_t, int32_t>> tiles;
  std::vector<int32_t> turns(schedule.accumulators, 0);
  std::vector<int64_t> last(schedule.accumulators, -1);
  bool ok = schedule.accumulators == (symmetric ? row_blocks : row_blocks + col_blocks);
  int64_t closest = std::numeric_limits<int64_t>::max();
  for (int64_t t = 0; t < static_cast<int64_t>(schedule.tasks.size()); ++t) {
    const auto& task = schedule.tasks[t];
    ok = ok && task.row < row_blocks && task.col - schedule.first_col < col_blocks;
    ok = ok && (symmetric ? task.row <= task.col : task.col >= schedule.first_col);
    ok = ok && tiles.insert({task.row, task.col}).second;
    ok = ok && task.row_turn == turns[task.row]++;
    if (!task.diagonal()) ok = ok && task.col_turn == turns[task.col]++;
    for (const int32_t block : {task.row, task.col}) {
      if (last[block] >= 0 && last[block] != t) closest = std::min(closest, t - last[block]);
      last[block] = t;
    }
  }
  const int64_t tiles_wanted =
      symmetric ? row_blocks * (row_blocks + 1) / 2 : row_blocks * col_blocks;
  ok = ok && static_cast<int64_t>(tiles.size()) == tiles_wanted;
  if (symmetric && row_blocks >= 4) ok = ok && closest >= row_blocks / 2 - 1;
  expect(ok, name);
}

// Additions made from several threads, some tasks slow: every accumulator
// receives its tasks in schedule order, each task and accumulator finishes
// once.
void check_ordered_additions(const pyclloss::cpu::TileSchedule& schedule,
                             const std::string& name) {
  const int64_t tasks = static_cast<int64_t>(schedule.tasks.size());
  pyclloss::cpu::OrderedAdditions additions(schedule);
  std::vector<std::vector<int32_t>> received(schedule.accumulators);
  std::vector<int32_t> tasks_done(tasks, 0);
  std::vector<int32_t> accumulators_done(schedule.accumulators, 0);
  std::atomic<int64_t> next{0};
  pyclloss::cpu::run_workers(tasks, [&] {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      if (t % 5 == 1) std::this_thread::sleep_for(std::chrono::microseconds(200));
      additions.computed(
          t, schedule.tasks[t],
          [&](int32_t task, int32_t accumulator) { received[accumulator].push_back(task); },
          [&](int32_t task) { ++tasks_done[task]; },
          [&](int32_t accumulator) { ++accumulators_done[accumulator]; });
    }
  });
  bool ok = true;
  std::vector<std::vector<int32_t>> wanted(schedule.accumulators);
  for (int32_t t = 0; t < tasks; ++t) {
    const auto& task = schedule.tasks[t];
    wanted[task.row].push_back(t);
    if (!task.diagonal()) wanted[task.col].push_back(t);
    ok = ok && tasks_done[t] == 1;
  }
  for (int64_t a = 0; a < schedule.accumulators; ++a) {
    ok = ok && received[a] == wanted[a] && accumulators_done[a] == 1;
  }
  expect(ok, name);
}

void check_schedules() {
  for (int64_t blocks = 0; blocks <= 12; ++blocks) {
    const auto schedule = pyclloss::cpu::symmetric_schedule(blocks);
    check_schedule(schedule, blocks, blocks, true, "symmetric_schedule(" +
                   std::to_string(blocks) + ")");
  }
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {1, 5}, {5, 1}, {3, 7}, {8, 3}, {6, 6}}) {
    check_schedule(pyclloss::cpu::rectangular_schedule(rows, cols), rows, cols, false,
                   "rectangular_schedule(" + std::to_string(rows) + ", " +
                       std::to_string(cols) + ")");
  }
  const int threads = at::get_num_threads();
  at::set_num_threads(4);
  check_ordered_additions(pyclloss::cpu::symmetric_schedule(9), "ordered additions, symmetric");
  check_ordered_additions(pyclloss::cpu::rectangular_schedule(5, 7),
                          "ordered additions, rectangular");
  at::set_num_threads(threads);
}

// Two workers that start on the same CPU end on different ones, each with
// the affinity it had.
void check_worker_cpus() {
#ifdef __linux__
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) < 2) {
    std::printf("skipped: worker CPUs (fewer than 2 CPUs allowed)\n");
    return;
  }
  int first = 0;
  while (!CPU_ISSET(first, &allowed)) ++first;
  pyclloss::cpu::WorkerCpus cpus(2);
  std::vector<int> ran_on(2, -1);
  bool restored = true;  // the threads run one after the other
  const auto start_on_first = [&](int64_t slot) {
    cpu_set_t only;
    CPU_ZERO(&only);
    CPU_SET(first, &only);
    sched_setaffinity(0, sizeof(only), &only);  // migrates there
    sched_setaffinity(0, sizeof(allowed), &allowed);
    cpus.claim(slot);
    ran_on[slot] = sched_getcpu();
    cpu_set_t now;
    CPU_ZERO(&now);
    sched_getaffinity(0, sizeof(now), &now);
    restored = restored && CPU_EQUAL(&now, &allowed);
  };
  std::thread(start_on_first, 0).join();
  std::thread(start_on_first, 1).join();
  expect(ran_on[0] >= 0 && ran_on[0] != ran_on[1] && restored,
         "workers on the same CPU move apart, affinity restored");
#endif
}

}  // namespace

int main() {
  at::manual_seed(0);
  // (N, M, D) below and across the 64 x 512 tiles, never multiples of them.
  check(make_problem(70, 530, 5, at::kFloat, true, 0, false), "f32 70x530 labels offset 0");
  check(make_problem(70, 530, 5, at::kDouble, true, -2, false), "f64 70x530 labels offset -2");
  check(make_problem(33, 20, 7, at::kFloat, true, 1, true), "f32 33x20 neg_only offset 1");
  check(make_problem(3, 2, 4, at::kBFloat16, false, std::nullopt, false), "bf16 3x2 no labels");
  check(make_problem(1, 1, 3, at::kFloat, true, 0, false), "f32 1x1 excluded");
  // q and k one tensor, across the 256-row blocks of the symmetric schedule
  // (3 blocks: one sits out each round).
  check(make_self_problem(530, 5, at::kFloat, true, 0, false), "f32 self 530 labels offset 0");
  check(make_self_problem(300, 4, at::kDouble, true, -1, true), "f64 self 300 neg_only offset -1");
  check(make_self_problem(2, 3, at::kBFloat16, false, 0, false), "bf16 self 2 no labels");
  check_schedules();
  check_worker_cpus();
  std::printf("%d failure(s)\n", failures);
  return failures;
}
