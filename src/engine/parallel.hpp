// Internal: a minimal dynamic parallel-for with exception propagation.
#pragma once

#include <atomic>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace taskvec::detail {

/// Number of workers for a requested count (0 = hardware concurrency, at least 1).
inline unsigned resolve_threads(unsigned requested) {
  if (requested != 0) return requested;
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : hw;
}

/// Calls body(i, worker) for every i in [0, count) on `threads` workers that pull indices from a shared
/// counter (so uneven items balance). `worker` is in [0, threads) and lets a body reuse per-worker
/// buffers. The first exception thrown stops the remaining items and is rethrown here. `idle`, if
/// given, is called about every 100 ms on the calling thread while the workers run (progress).
void parallel_for(std::size_t count, unsigned threads, const std::function<void(std::size_t, unsigned)>& body,
                  const std::function<void()>& idle = {});

}  // namespace taskvec::detail
