#include "engine/parallel.hpp"

#include <chrono>
#include <condition_variable>

namespace taskvec::detail {

void parallel_for(std::size_t count, unsigned threads, const std::function<void(std::size_t, unsigned)>& body,
                  const std::function<void()>& idle) {
  threads = resolve_threads(threads);
  if (threads > count) threads = static_cast<unsigned>(count == 0 ? 1 : count);
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;
  std::mutex mutex;
  std::condition_variable done_cv;
  unsigned running = threads;

  auto work = [&](unsigned worker) {
    try {
      for (std::size_t i = next.fetch_add(1); i < count && !failed.load(std::memory_order_relaxed);
           i = next.fetch_add(1)) {
        body(i, worker);
      }
    } catch (...) {
      std::lock_guard lock(mutex);
      if (!first_error) first_error = std::current_exception();
      failed = true;
    }
    std::lock_guard lock(mutex);
    if (--running == 0) done_cv.notify_all();
  };

  if (threads == 1 && !idle) {
    work(0);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned w = 0; w < threads; ++w) pool.emplace_back(work, w);
    {
      std::unique_lock lock(mutex);
      while (running != 0) {
        done_cv.wait_for(lock, std::chrono::milliseconds(100));
        if (idle && running != 0) {
          lock.unlock();
          idle();
          lock.lock();
        }
      }
    }
    for (auto& t : pool) t.join();
  }
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace taskvec::detail
