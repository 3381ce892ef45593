// How the CPU kernels hand out work: tasks taken one at a time from a shared
// counter (a thread slowed down by another process simply takes fewer), and,
// for kernels whose tasks add into shared per-block accumulators, an order of
// those additions fixed by the sizes alone, so that results never depend on
// the number of threads or on which thread ran what.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pyclloss::cpu {

// Runs worker() once on each of up to `workers` intra-op threads (on the
// calling thread alone inside a parallel region).
template <typename Worker>
void run_workers(int64_t workers, const Worker& worker) {
  if (workers <= 0) {
    return;
  }
  at::parallel_for(0, std::min<int64_t>(workers, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) {
                     c10::InferenceMode no_autograd;
                     worker();
                   });
}

// Runs body(worker_state, task) for every task in [0, count) on the intra-op
// threads. Tasks go out one at a time in increasing order; each thread makes
// its state once with make_state(). A task's result must not depend on the
// thread that runs it.
template <typename MakeState, typename Body>
void run_tasks(int64_t count, const MakeState& make_state, const Body& body) {
  std::atomic<int64_t> next{0};
  run_workers(count, [&] {
    auto state = make_state();
    for (int64_t task = next.fetch_add(1); task < count; task = next.fetch_add(1)) {
      body(state, task);
    }
  });
}

// One task of a symmetric schedule: the tile of block `row` against block
// `col` (row <= col). `row_turn` (`col_turn`) is how many earlier tasks of
// the schedule touch block `row` (`col`).
struct BlockPair {
  int32_t row;
  int32_t col;
  int32_t row_turn;
  int32_t col_turn;

  bool diagonal() const { return row == col; }
};

// Every unordered pair of `blocks` blocks, the diagonal ones included, once:
// first the diagonal tiles, then rounds of the circle method, in which every
// block meets one other block (or, for an odd count, sits one round out).
// Two tasks touching the same block are about blocks / 2 tasks apart, so a
// task's additions (OrderedAdditions) rarely wait for another task.
inline std::vector<BlockPair> symmetric_schedule(int64_t blocks) {
  std::vector<BlockPair> tasks;
  tasks.reserve(blocks * (blocks + 1) / 2);
  std::vector<int32_t> turns(blocks, 0);
  const auto add = [&](int64_t a, int64_t b) {
    const int32_t row = static_cast<int32_t>(std::min(a, b));
    const int32_t col = static_cast<int32_t>(std::max(a, b));
    const int32_t row_turn = turns[row]++;
    tasks.push_back({row, col, row_turn, row == col ? row_turn : turns[col]++});
  };
  for (int64_t b = 0; b < blocks; ++b) {
    add(b, b);
  }
  // Positions 0 .. even - 2 rotate around the fixed position even - 1; an odd
  // count gets a stand-in block `blocks` that pairs with nobody.
  const int64_t even = blocks + (blocks & 1);
  const int64_t rotating = even - 1;
  for (int64_t round = 0; round < rotating; ++round) {
    if (even - 1 < blocks) {
      add(round, even - 1);
    }
    for (int64_t step = 1; step < even / 2; ++step) {
      add((round + step) % rotating, (round - step + rotating) % rotating);
    }
  }
  return tasks;
}

// Buffers for results that wait to be added, shared by all threads.
class SlotPool {
 public:
  explicit SlotPool(int32_t slots) {
    for (int32_t slot = slots - 1; slot >= 0; --slot) {
      free_.push_back(slot);
    }
  }

  // A free slot; yields the core while there is none.
  int32_t acquire() {
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!free_.empty()) {
          const int32_t slot = free_.back();
          free_.pop_back();
          return slot;
        }
      }
      std::this_thread::yield();
    }
  }

  void release(int32_t slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(slot);
  }

 private:
  std::mutex mutex_;
  std::vector<int32_t> free_;
};

// The additions of a symmetric schedule's tasks into their blocks, made in
// schedule order on every block (so results do not depend on the number of
// threads), by whichever thread makes one possible: the thread that computed
// a task adds it into each block whose turn it is; the thread that makes an
// addition also makes the block's next one when that task is computed
// already. No thread waits for a turn: a thread slowed down by another
// process delays only the additions that need its own task.
class OrderedAdditions {
 public:
  OrderedAdditions(const std::vector<BlockPair>& schedule, int64_t blocks)
      : start_(blocks + 1, 0),
        next_turn_(new std::atomic<int32_t>[blocks]),
        computed_(new std::atomic<bool>[schedule.size()]),
        additions_left_(new std::atomic<int32_t>[schedule.size()]) {
    for (const BlockPair& pair : schedule) {
      ++start_[pair.row + 1];
      start_[pair.col + 1] += pair.diagonal() ? 0 : 1;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      start_[b + 1] += start_[b];
      next_turn_[b].store(0, std::memory_order_relaxed);
    }
    in_turn_order_.resize(start_[blocks]);
    for (size_t task = 0; task < schedule.size(); ++task) {
      const BlockPair& pair = schedule[task];
      in_turn_order_[start_[pair.row] + pair.row_turn] = static_cast<int32_t>(task);
      if (!pair.diagonal()) {
        in_turn_order_[start_[pair.col] + pair.col_turn] = static_cast<int32_t>(task);
      }
      computed_[task].store(false, std::memory_order_relaxed);
      additions_left_[task].store(pair.diagonal() ? 1 : 2, std::memory_order_relaxed);
    }
  }

  // Task `task` (schedule[task]) is computed: makes every addition that is
  // now possible. add(task, block) adds a task's result into a block;
  // task_done(task) follows a task's last addition, block_done(block) a
  // block's.
  template <typename Add, typename TaskDone, typename BlockDone>
  void computed(int64_t task, const BlockPair& pair, const Add& add, const TaskDone& task_done,
                const BlockDone& block_done) {
    computed_[task].store(true);
    add_in_turn(pair.row, pair.row_turn, add, task_done, block_done);
    if (!pair.diagonal()) {
      add_in_turn(pair.col, pair.col_turn, add, task_done, block_done);
    }
  }

 private:
  static constexpr int32_t kBusy = -1;

  // Makes addition `turn` into `block` if it is due and nobody else makes
  // it, then the following ones as long as their tasks are computed. The
  // sequentially consistent store/load pairs (computed_ then next_turn_ by
  // the computing thread, next_turn_ then computed_ by the adding one)
  // guarantee that one of the two threads sees the other's store.
  template <typename Add, typename TaskDone, typename BlockDone>
  void add_in_turn(int32_t block, int32_t turn, const Add& add, const TaskDone& task_done,
                   const BlockDone& block_done) {
    const int32_t* tasks = in_turn_order_.data() + start_[block];
    const int32_t turns = start_[block + 1] - start_[block];
    int32_t expected = turn;
    while (next_turn_[block].compare_exchange_strong(expected, kBusy)) {
      const int32_t task = tasks[turn];
      add(task, block);
      if (additions_left_[task].fetch_sub(1) == 1) {
        task_done(task);
      }
      ++turn;
      next_turn_[block].store(turn);
      if (turn == turns) {
        block_done(block);
        return;
      }
      if (!computed_[tasks[turn]].load()) {
        return;  // that task's own thread makes the addition
      }
      expected = turn;
    }
  }

  std::vector<int32_t> start_;          // block -> first entry of in_turn_order_
  std::vector<int32_t> in_turn_order_;  // per block, its tasks in turn order
  std::unique_ptr<std::atomic<int32_t>[]> next_turn_;  // per block, or kBusy
  std::unique_ptr<std::atomic<bool>[]> computed_;
  std::unique_ptr<std::atomic<int32_t>[]> additions_left_;
};

}  // namespace pyclloss::cpu
