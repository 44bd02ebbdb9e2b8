// A dynamic parallel-for on std::threads, for host work that OpenMP's static loops fit badly
// (uneven items: texts of any length). Items are handed out one at a time from an atomic
// counter; the first exception stops the other workers at their next item and is rethrown on
// the calling thread, so a C++ error still reaches Python as an exception.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyllm {

// The OpenMP team for a loop over `rows` rows, `elements` in all: every thread OpenMP offers, at
// most one per row, from min_elements up (below, the calling thread alone); 1 without OpenMP. The
// row kernels (cross_entropy, distill, rms_norm) size their teams by it.
inline int row_team(int64_t rows, int64_t elements, int64_t min_elements) {
#ifdef _OPENMP
  if (elements >= min_elements) return int(std::min<int64_t>(omp_get_max_threads(), rows));
#endif
  return 1;
}

// Workers for n_items: num_threads if > 0, else every hardware thread; at least 1, at most n_items.
inline size_t worker_count(size_t n_items, int num_threads) {
  const size_t wanted = num_threads > 0 ? size_t(num_threads) : std::max(1u, std::thread::hardware_concurrency());
  return std::max<size_t>(1, std::min(wanted, n_items));
}

// Calls body(worker, item) for every item in [0, n_items) on `workers` threads (the calling
// thread alone when workers == 1). `worker` indexes per-thread state the caller set up.
template <typename F>
void parallel_items(size_t n_items, size_t workers, F&& body) {
  std::atomic<size_t> next{0};
  std::vector<std::exception_ptr> errors(workers);
  auto work = [&](size_t w) {
    try {
      for (size_t i = next++; i < n_items; i = next++) body(w, i);
    } catch (...) {
      errors[w] = std::current_exception();
      next = n_items;
    }
  };
  if (workers <= 1) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    for (size_t w = 0; w < workers; ++w) pool.emplace_back(work, w);
    for (auto& t : pool) t.join();
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace pyllm
