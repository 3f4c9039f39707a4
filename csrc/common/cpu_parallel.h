// Task scheduling on torch's intra-op thread pool, and what it promises about determinism.
//
// Determinism (DESIGN.md, issue 17). Every CPU kernel of csrc gives bitwise-equal outputs and
// gradients for equal inputs on the same machine, whatever the load and whichever worker runs which
// task: no result depends on timing. The rules that give it:
//   - a task writes only its own outputs, or its own slot of partial results;
//   - partial results are per task or per fixed block of work, never per worker, and are summed in
//     index order after the parallel loop (scan: dB, dC per block of channels; RMSNorm: dweight per
//     block of rows);
//   - block sizes depend on the problem's shape only, never on the thread count; per-worker buffers
//     hold scratch that each task overwrites before reading, 64-byte aligned (aligned_floats) so that a
//     BLAS whose blocking follows the alignment treats every worker's buffer alike.
// So the csrc kernels' results are also equal across thread counts (tests/test_determinism.py runs
// 1 to 3 threads). A whole training run is bitwise reproducible for the same machine and thread count,
// loaded or not; across thread counts it is not promised, as torch's own ops (matmul, reductions) split
// their work by the thread count. The promise is per machine: another CPU may pick other vector code.
//
// A test hook (set_task_order, torch.ops.longtrain._set_task_order) changes the order in which tasks
// are handed out, or slows one worker, so that a test can show results do not depend on it.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

namespace longtrain {

// The order parallel_tasks hands tasks out in. kInOrder is what runs outside tests.
enum class TaskOrder : int64_t {
  kInOrder = 0,     // ascending, to whichever worker asks next
  kReversed = 1,    // descending
  kShuffled = 2,    // a permutation drawn from the seed
  kSlowWorker = 3,  // ascending, worker 0 sleeping before each of its tasks so the others take most
};

struct TaskOrderSetting {
  std::atomic<int64_t> mode{0}, seed{0};
};

inline TaskOrderSetting& task_order_setting() {
  static TaskOrderSetting setting;
  return setting;
}

// Sets the process-wide order (a TaskOrder value) and seed; returns the previous order. For tests.
inline int64_t set_task_order(int64_t mode, int64_t seed) {
  TORCH_CHECK(mode >= 0 && mode <= static_cast<int64_t>(TaskOrder::kSlowWorker),
              "_set_task_order: mode must be 0 (in order), 1 (reversed), 2 (shuffled) or 3 (slow worker), got ", mode);
  task_order_setting().seed.store(seed);
  return task_order_setting().mode.exchange(mode);
}

// Number of workers parallel_tasks will use for n tasks (size per-worker scratch with it).
inline int64_t task_workers(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads())); }

// Runs fn(task, worker) for every task in [0, n), with worker < task_workers(n). Workers take
// tasks in order from a shared counter rather than a fixed range each (at::parallel_for's static
// split): a worker slowed by a heavier task, or by the OS on a busy machine, then delays the
// others by at most one task. Give the heaviest tasks the lowest numbers. Which worker runs a task
// depends on timing: fn must write nothing whose value depends on the worker (see the top).
template <typename F>
void parallel_tasks(int64_t n, const F& fn) {
  const int64_t workers = task_workers(n);
  const auto order = static_cast<TaskOrder>(task_order_setting().mode.load(std::memory_order_relaxed));
  std::vector<int64_t> permutation;  // empty: task = slot
  if (order == TaskOrder::kReversed || order == TaskOrder::kShuffled) {
    permutation.resize(n);
    std::iota(permutation.begin(), permutation.end(), int64_t{0});
    if (order == TaskOrder::kReversed) std::reverse(permutation.begin(), permutation.end());
    else std::shuffle(permutation.begin(), permutation.end(), std::mt19937_64(task_order_setting().seed.load()));
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    // Usually one worker per range; a range holding several (a smaller pool) drains the tasks itself.
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t slot = next.fetch_add(1); slot < n; slot = next.fetch_add(1)) {
        if (order == TaskOrder::kSlowWorker && worker == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
        fn(permutation.empty() ? slot : permutation[slot], worker);
      }
  });
}

// out[i] = parts[0][i] + parts[1][i] + ... + parts[count - 1][i], added in that order, for i < n: the
// ordered sum of per-block partial results (block k at parts + k * stride). Zeros when count is 0.
inline void sum_in_order(const float* __restrict parts, int64_t count, int64_t stride, int64_t n,
                         float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = count > 0 ? parts[i] : 0.0f;
  for (int64_t k = 1; k < count; ++k)
    for (int64_t i = 0; i < n; ++i) out[i] += parts[k * stride + i];
}

// n floats of scratch, 64-byte aligned (std::vector<float> gives 16 bytes, and a worker's buffer
// would then sit at another offset from a cache line than its neighbour's).
struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], AlignedFree>;

inline AlignedFloats aligned_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "out of memory allocating ", bytes, " bytes of kernel scratch");
  return AlignedFloats(p);
}

}  // namespace longtrain
