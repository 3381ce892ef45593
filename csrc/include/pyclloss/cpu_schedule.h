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
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

namespace pyclloss::cpu {

// The CPUs that the workers of one run_workers call run on. When a machine
// has other work, Linux often wakes an intra-op thread on the CPU of the
// thread that wakes it (wake-affine placement, which is not corrected later:
// moving one of three runnable threads between two CPUs changes no CPU's
// count), so that both workers of a 2-thread kernel share one core while the
// other process keeps the other core. A worker that finds its CPU taken by
// another worker of the call moves itself, once, to a CPU of its allowed
// set that no worker has: its affinity narrowed to those CPUs, which
// migrates it, and restored at once, which leaves it there.
class WorkerCpus {
 public:
  explicit WorkerCpus(int64_t workers) : cpus_(workers, -1) {}

  // Called by worker `slot` as it starts.
  void claim(int64_t slot) {
#ifdef __linux__
    std::lock_guard<std::mutex> lock(mutex_);
    int cpu = sched_getcpu();
    if (cpu >= 0 && std::find(cpus_.begin(), cpus_.end(), cpu) != cpus_.end()) {
      cpu_set_t allowed;
      CPU_ZERO(&allowed);
      if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
        cpu_set_t unclaimed = allowed;
        for (const int other : cpus_) {
          if (other >= 0 && other < CPU_SETSIZE) {
            CPU_CLR(other, &unclaimed);
          }
        }
        if (CPU_COUNT(&unclaimed) > 0 &&
            sched_setaffinity(0, sizeof(unclaimed), &unclaimed) == 0) {
          sched_setaffinity(0, sizeof(allowed), &allowed);
          cpu = sched_getcpu();
        }
      }
    }
    cpus_[slot] = cpu;
#else
    (void)slot;
#endif
  }

 private:
  std::mutex mutex_;
  std::vector<int> cpus_;  // per worker, -1 before it starts
};

// Runs worker() once on each of up to `workers` intra-op threads (on the
// calling thread alone inside a parallel region). A thread done with its
// worker waits for the others asleep rather than spinning at the end of the
// parallel region: on a busy machine a spinning thread can hold the core that
// the last worker needs to finish.
template <typename Worker>
void run_workers(int64_t workers, const Worker& worker) {
  if (workers <= 0) {
    return;
  }
  const int64_t threads = std::min<int64_t>(workers, at::get_num_threads());
  std::mutex mutex;
  std::condition_variable all_done;
  int64_t done = 0;  // of [0, threads), under mutex
  WorkerCpus cpus(threads);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    struct Arrival {  // counted even when worker() throws
      std::mutex& mutex;
      std::condition_variable& all_done;
      int64_t& done;
      int64_t count;
      ~Arrival() {
        std::lock_guard<std::mutex> lock(mutex);
        done += count;
        all_done.notify_all();
      }
    };
    {
      Arrival arrival{mutex, all_done, done, end - begin};
      if (threads > 1) {
        cpus.claim(begin);
      }
      c10::InferenceMode no_autograd;
      worker();
    }
    std::unique_lock<std::mutex> lock(mutex);
    all_done.wait(lock, [&] { return done == threads; });
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

// One task of a tile schedule: the tile of row block `row` against column
// block `col`, whose results go to accumulator `row` and, unless the two
// are the same, accumulator `col` (ids of the schedule's accumulators).
// `row_turn` (`col_turn`) is how many earlier tasks add into `row` (`col`).
struct BlockPair {
  int32_t row;
  int32_t col;
  int32_t row_turn;
  int32_t col_turn;

  bool diagonal() const { return row == col; }
};

// Tasks in the order they are handed out, over `accumulators` accumulators;
// column block j is accumulator first_col + j.
struct TileSchedule {
  std::vector<BlockPair> tasks;
  int64_t accumulators = 0;
  int64_t first_col = 0;

  void add(int64_t row, int64_t col, std::vector<int32_t>& turns) {
    const int32_t row_turn = turns[row]++;
    tasks.push_back({static_cast<int32_t>(row), static_cast<int32_t>(col), row_turn,
                     row == col ? row_turn : turns[col]++});
  }
};

// The tiles of a matrix against itself, `blocks` blocks of rows: every
// unordered pair of blocks (I <= J) once, block I accumulator I, block J
// accumulator J. Rounds of the circle method, in which every block meets one
// other block (or, for an odd count, sits one round out), preceded by the
// diagonal tiles in the order the blocks first appear: two tasks touching
// the same block are at least blocks / 2 - 1 tasks apart, so a task's
// additions (OrderedAdditions) rarely wait for another.
inline TileSchedule symmetric_schedule(int64_t blocks) {
  // Positions 0 .. even - 2 rotate around the fixed position even - 1; an odd
  // count gets a stand-in block `blocks` that pairs with nobody.
  const int64_t even = blocks + (blocks & 1);
  const int64_t rotating = even - 1;
  std::vector<std::pair<int64_t, int64_t>> rounds;  // even / 2 pairs a round
  for (int64_t round = 0; round < rotating; ++round) {
    rounds.emplace_back(round, even - 1);
    for (int64_t step = 1; step < even / 2; ++step) {
      rounds.emplace_back((round + step) % rotating, (round - step + rotating) % rotating);
    }
  }
  TileSchedule schedule{{}, blocks, 0};
  schedule.tasks.reserve(blocks * (blocks + 1) / 2);
  std::vector<int32_t> turns(blocks, 0);
  for (int64_t p = 0; p < std::min<int64_t>(even / 2, rounds.size()); ++p) {
    for (const int64_t block : {rounds[p].first, rounds[p].second}) {
      if (block < blocks) {
        schedule.add(block, block, turns);
      }
    }
  }
  for (const auto& [a, b] : rounds) {
    if (a < blocks && b < blocks) {
      schedule.add(std::min(a, b), std::max(a, b), turns);
    }
  }
  return schedule;
}

// Every tile of `row_blocks` x `col_blocks` blocks once, with accumulators
// for the row blocks and, after them, the column blocks. Round r pairs row
// block i with column block (i + r) mod max(row_blocks, col_blocks): within
// a round no two tasks share a block.
inline TileSchedule rectangular_schedule(int64_t row_blocks, int64_t col_blocks) {
  TileSchedule schedule{{}, row_blocks + col_blocks, row_blocks};
  schedule.tasks.reserve(row_blocks * col_blocks);
  std::vector<int32_t> turns(row_blocks + col_blocks, 0);
  const int64_t period = std::max(row_blocks, col_blocks);
  for (int64_t round = 0; round < period; ++round) {
    for (int64_t row = 0; row < row_blocks; ++row) {
      const int64_t col = (row + round) % period;
      if (col < col_blocks) {
        schedule.add(row, row_blocks + col, turns);
      }
    }
  }
  return schedule;
}

// Buffers for results that wait to be added, shared by all threads.
class SlotPool {
 public:
  explicit SlotPool(int32_t slots) {
    for (int32_t slot = slots - 1; slot >= 0; --slot) {
      free_.push_back(slot);
    }
  }

  static constexpr int32_t kClosed = -1;

  // A free slot, or kClosed once close() was called; yields the core while
  // there is none.
  int32_t acquire() {
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (closed_) {
          return kClosed;
        }
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

  // After a task failed: slots it held may never come back; nobody waits.
  void close() {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }

 private:
  std::mutex mutex_;
  std::vector<int32_t> free_;
  bool closed_ = false;
};

// The additions of a schedule's tasks into their accumulators ("blocks"
// below), made in schedule order on every block (so results do not depend
// on the number of threads), by whichever thread makes one possible: the
// thread that computed a task adds it into each block whose turn it is; the
// thread that makes an addition also makes the block's next one when that
// task is computed already. No thread waits for a turn: a thread slowed down
// by another process delays only the additions that need its own task.
class OrderedAdditions {
 public:
  explicit OrderedAdditions(const TileSchedule& schedule)
      : start_(schedule.accumulators + 1, 0),
        next_turn_(new std::atomic<int32_t>[schedule.accumulators]),
        computed_(new std::atomic<bool>[schedule.tasks.size()]),
        additions_left_(new std::atomic<int32_t>[schedule.tasks.size()]) {
    for (const BlockPair& pair : schedule.tasks) {
      ++start_[pair.row + 1];
      start_[pair.col + 1] += pair.diagonal() ? 0 : 1;
    }
    for (int64_t b = 0; b < schedule.accumulators; ++b) {
      start_[b + 1] += start_[b];
      next_turn_[b].store(0, std::memory_order_relaxed);
    }
    in_turn_order_.resize(start_[schedule.accumulators]);
    for (size_t task = 0; task < schedule.tasks.size(); ++task) {
      const BlockPair& pair = schedule.tasks[task];
      in_turn_order_[start_[pair.row] + pair.row_turn] = static_cast<int32_t>(task);
      if (!pair.diagonal()) {
        in_turn_order_[start_[pair.col] + pair.col_turn] = static_cast<int32_t>(task);
      }
      computed_[task].store(false, std::memory_order_relaxed);
      additions_left_[task].store(pair.diagonal() ? 1 : 2, std::memory_order_relaxed);
    }
  }

  // Task `task` (schedule.tasks[task]) is computed: makes every addition that is
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
