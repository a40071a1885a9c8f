// A small persistent thread pool for run_parallel (see attnfast/parallel.h). Written by hand because the
// property that matters here, "the caller never waits for a thread that has not started", is what
// OpenMP's fork-join barrier cannot give: on a shared, loaded machine an OpenMP region waits for every
// team thread to be scheduled, which costs milliseconds on calls that need microseconds. No OpenMP
// runtime is linked at all: threads.cpp reads OMP_NUM_THREADS and the affinity mask for the default count,
// and threadpoolctl limits the pool through python/attnfast/_threadpool.py.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
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

// Runs every task on the calling thread, slot 0.
void run_on_caller(int64_t tasks, TaskFn fn, void* context) {
  Job job;
  job.fn = fn;
  job.context = context;
  job.tasks = tasks;
  run_tasks(job, 0);
}

class Pool {
 public:
  // See reserve_threads (attnfast/parallel.h). Once every worker a call needs exists, or once the OS
  // has refused one, this is two atomic loads: no call pays for another attempt.
  int reserve(int threads) {
    const int wanted = threads - 1;
    int workers = workers_.load(std::memory_order_acquire);
    if (workers < wanted && !start_refused_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> one_attempt_at_a_time(start_mutex_);
      workers = workers_.load(std::memory_order_relaxed);
      if (workers < wanted && !start_refused_.load(std::memory_order_relaxed)) workers = grow(wanted);
    }
    return 1 + (workers < wanted ? workers : wanted);
  }

  void retry_thread_start() { start_refused_.store(false, std::memory_order_release); }

  bool take_failure(ThreadStartFailure* failure) {
    if (!failure_unreported_.load(std::memory_order_acquire)) return false;
    std::lock_guard<std::mutex> lock(start_mutex_);
    if (!failure_unreported_.exchange(false, std::memory_order_acq_rel)) return false;
    failure->requested = failed_requested_;
    failure->running = failed_running_;
    failure->reason = failed_reason_;
    return true;
  }

  void run(int threads, int64_t tasks, TaskFn fn, void* context) {
    std::shared_ptr<Job> job;
    try {
      job = std::make_shared<Job>();
    } catch (const std::bad_alloc&) {
      return run_on_caller(tasks, fn, context);  // run_parallel does not throw (see there)
    }
    job->fn = fn;
    job->context = context;
    job->tasks = tasks;
    job->max_slots = threads;
    {
      std::lock_guard<std::mutex> lock(mutex_);
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
    new (&start_mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    workers_.store(0);
    start_refused_.store(false);
    failure_unreported_.store(false);
    current_.reset();
  }

 private:
  // Starts workers until there are `wanted`, with start_mutex_ held; returns how many there are. The OS
  // refusing a thread means the process has used up something it needs for the rest of its work too
  // (its thread or process limit, or the address space the stacks take): of the workers this attempt
  // started, half are kept and the others stopped and joined, so that the call's scratch memory and
  // the program's own threads and allocations still find room. The refusal is remembered, so later
  // calls do not try again, and reported once (take_failure).
  int grow(int wanted) {
    const int before = workers_.load(std::memory_order_relaxed);
    std::vector<std::thread> started;
    const char* refusal = nullptr;
    try {
      started.reserve(static_cast<size_t>(wanted - before));
      for (int index = before; index < wanted; ++index) started.emplace_back([this, index] { worker_loop(index); });
    } catch (const std::exception& refused) {  // std::system_error (EAGAIN) or std::bad_alloc
      // Copied without allocating: memory may be what ran out.
      std::snprintf(failed_reason_, sizeof failed_reason_, "%s", refused.what());
      refusal = failed_reason_;
    }
    const int kept = before + static_cast<int>(refusal ? started.size() / 2 : started.size());
    if (kept < before + static_cast<int>(started.size())) stop_workers_from(kept);
    for (size_t i = 0; i < started.size(); ++i) {
      if (before + static_cast<int>(i) < kept) {
        started[i].detach();
      } else {
        started[i].join();
      }
    }
    first_stopped_.store(kNoneStopped, std::memory_order_release);  // the stopped ones are gone
    workers_.store(kept, std::memory_order_release);
    if (refusal) {
      failed_requested_ = wanted + 1;
      failed_running_ = 1 + kept;
      failure_unreported_.store(true, std::memory_order_release);
      start_refused_.store(true, std::memory_order_release);
    }
    return kept;
  }

  // Workers numbered `first` or more leave their loop (to be joined) once they see this.
  void stop_workers_from(int first) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      first_stopped_.store(first, std::memory_order_release);
      ++generation_;  // wakes them
    }
    wake_.notify_all();
  }

  bool stopped(int index) const { return index >= first_stopped_.load(std::memory_order_acquire); }

  void worker_loop(int index) {
    uint64_t seen = 0;
    while (!stopped(index)) {
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
      if (!job || stopped(index)) continue;
      const int slot = job->slots.fetch_add(1, std::memory_order_relaxed);
      if (slot < job->max_slots) run_tasks(*job, slot);
    }
  }

  std::mutex mutex_;        // guards current_ and the wake-up
  std::mutex start_mutex_;  // one attempt to start workers at a time; guards the failed_ fields
  std::condition_variable wake_;
  std::shared_ptr<Job> current_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> workers_{0};  // workers numbered 0 .. workers_ - 1 take part in calls
  static constexpr int kNoneStopped = 1 << 30;
  std::atomic<int> first_stopped_{kNoneStopped};  // workers numbered this or more stop
  std::atomic<bool> start_refused_{false};
  std::atomic<bool> failure_unreported_{false};
  int failed_requested_ = 0;
  int failed_running_ = 0;
  char failed_reason_[128] = {};
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
  if (threads > 1) threads = pool().reserve(threads);
  if (threads <= 1) return run_on_caller(tasks, fn, context);
  pool().run(threads, tasks, fn, context);
}

int reserve_threads(int threads) { return threads > 1 ? pool().reserve(threads) : 1; }

void retry_thread_start() { pool().retry_thread_start(); }

bool take_thread_start_failure(ThreadStartFailure* failure) { return pool().take_failure(failure); }

}  // namespace attnfast
