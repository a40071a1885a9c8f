// A small persistent thread pool for run_parallel (see attnfast/parallel.h). Written by hand because the
// property that matters here, "the caller never waits for a thread that has not started", is what
// OpenMP's fork-join barrier cannot give: on a shared, loaded machine an OpenMP region waits for every
// team thread to be scheduled, which costs milliseconds on calls that need microseconds. OpenMP still
// provides the default thread count (threads.cpp), so OMP_NUM_THREADS and threadpoolctl apply.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

#include "attnfast/parallel.h"

namespace attnfast {
namespace {

constexpr int kSpinMicroseconds = 1000;  // how long an idle worker polls before it sleeps

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Job {
  TaskFn fn = nullptr;
  void* context = nullptr;
  int64_t tasks = 0;
  int max_slots = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> slots{1};  // slot 0 is the caller's
};

// Claims and runs tasks until none is left; each task's successor is claimed by it (NextTask::claim)
// or after it returns.
void run_tasks(Job& job, int slot) {
  int64_t t = NextTask(&job.next, job.tasks).claim();
  while (t >= 0) {
    NextTask next(&job.next, job.tasks);
    job.fn(job.context, t, slot, &next);
    job.done.fetch_add(1, std::memory_order_release);
    t = next.claim();
  }
}

class Pool {
 public:
  void run(int threads, int64_t tasks, TaskFn fn, void* context) {
    auto job = std::make_shared<Job>();
    job->fn = fn;
    job->context = context;
    job->tasks = tasks;
    job->max_slots = threads;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_started_) < threads - 1) start_worker();
      current_ = job;
      ++generation_;
    }
    wake_.notify_all();
    run_tasks(*job, 0);
    // Every task is claimed now; wait for the ones other slots are still running.
    for (int spin = 0; job->done.load(std::memory_order_acquire) < tasks; ++spin) {
      if (spin < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

  // After fork() only the calling thread exists in the child: forget the workers (they are gone) and
  // rebuild the synchronisation objects, which may have been held by one of them.
  void reset_after_fork() {
    new (&mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    workers_started_ = 0;
    current_.reset();
  }

 private:
  void start_worker() {
    ++workers_started_;
    std::thread([this] { worker_loop(); }).detach();
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        // Poll for a few milliseconds before sleeping, as OpenMP runtimes do: calls that follow each other
        // (a decoding loop, a model's layers) then find the worker awake, instead of paying a futex
        // wake-up and a reschedule, which can cost more than a whole decode-step call. While polling the
        // worker only reads one cache line and pauses.
        const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
        while (generation_.load(std::memory_order_acquire) == seen) {
          for (int i = 0; i < 64; ++i) cpu_relax();
          if (std::chrono::steady_clock::now() > spin_until) break;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = current_;
      }
      if (!job) continue;
      const int slot = job->slots.fetch_add(1, std::memory_order_relaxed);
      if (slot < job->max_slots) run_tasks(*job, slot);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> current_;
  std::atomic<uint64_t> generation_{0};
  unsigned workers_started_ = 0;
};

// Never destroyed: detached workers may still be waiting on it while the process exits.
Pool& pool() {
  static Pool* instance = [] {
    Pool* p = new Pool();
    pthread_atfork(nullptr, nullptr, [] { pool().reset_after_fork(); });
    return p;
  }();
  return *instance;
}

}  // namespace

void run_parallel(int threads, int64_t tasks, TaskFn fn, void* context) {
  if (tasks <= 0) return;
  if (threads > tasks) threads = static_cast<int>(tasks);
  if (threads <= 1) {
    Job job;
    job.fn = fn;
    job.context = context;
    job.tasks = tasks;
    run_tasks(job, 0);
    return;
  }
  pool().run(threads, tasks, fn, context);
}

}  // namespace attnfast
