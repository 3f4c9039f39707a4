// Task scheduling on torch's intra-op thread pool.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace longtrain {

// Number of workers parallel_tasks will use for n tasks (size per-worker buffers with it).
inline int64_t task_workers(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads())); }

// Runs fn(task, worker) for every task in [0, n), with worker < task_workers(n). Workers take
// tasks in order from a shared counter rather than a fixed range each (at::parallel_for's static
// split): a worker slowed by a heavier task, or by the OS on a busy machine, then delays the
// others by at most one task. Give the heaviest tasks the lowest numbers.
template <typename F>
void parallel_tasks(int64_t n, const F& fn) {
  const int64_t workers = task_workers(n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    // Usually one worker per range; a range holding several (a smaller pool) drains the tasks itself.
    for (int64_t worker = begin; worker < end; ++worker)
      for (int64_t task = next.fetch_add(1); task < n; task = next.fetch_add(1)) fn(task, worker);
  });
}

}  // namespace longtrain
