// attnfast C++ core API: the task runner every kernel uses for its independent tasks.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>

namespace attnfast {

// The task a thread runs after its current one. The runner claims it from the shared counter when the
// current task returns, unless the task claimed it earlier with claim() to prefetch its inputs while
// it still computes. A claimed task can no longer go to an idle thread, so a task claims only near its
// end (a tail of the call where one thread holds two tasks would cost more than the prefetch saves).
class NextTask {
 public:
  NextTask(std::atomic<int64_t>* counter, int64_t tasks) : counter_(counter), tasks_(tasks) {}
  // The next task of this thread, or -1 when every task is taken; the same answer on every call.
  int64_t claim() {
    if (claimed_ == kUnclaimed) {
      const int64_t t = counter_->fetch_add(1, std::memory_order_relaxed);
      claimed_ = t < tasks_ ? t : -1;
    }
    return claimed_;
  }

 private:
  static constexpr int64_t kUnclaimed = -2;
  std::atomic<int64_t>* counter_;
  int64_t tasks_;
  int64_t claimed_ = kUnclaimed;
};

using TaskFn = void (*)(void* context, int64_t task, int slot, NextTask* next);

// Runs fn(context, t, slot, next) once for every t in [0, tasks), on at most `threads` threads: the
// caller is slot 0, pool workers take slots 1 .. threads-1 as they wake. Tasks are claimed one at a time
// from a shared counter, and the caller waits only for tasks that were claimed: a worker the OS has not
// scheduled yet simply finds nothing left, so a busy machine slows a call down instead of stalling it on
// a barrier. `slot` < threads indexes per-thread scratch; `next` lets a task learn (and claim) the task
// its thread runs next. Which slot runs a task never changes its result (tasks are independent), so
// results do not depend on the thread count.
// A thread the OS refused to start (a process, thread or memory limit) is not an error: the call runs
// on the threads that did start, the caller alone at worst. run_parallel never throws, so kernels may
// hold plain malloc'ed buffers across it.
void run_parallel(int threads, int64_t tasks, TaskFn fn, void* context);

// Starts pool workers until `threads` threads (the caller and threads - 1 workers) can run a call and
// returns how many can: `threads`, or fewer once the OS has refused to start a worker. After a refusal
// no start is attempted again (a call then costs what it costs with the workers there are) until
// retry_thread_start().
int reserve_threads(int threads);
void retry_thread_start();

// The latest refusal to start a worker, handed out once so that it is reported once.
struct ThreadStartFailure {
  int requested = 0;  // threads the call wanted
  int running = 0;    // threads it runs on
  std::string reason;
};
bool take_thread_start_failure(ThreadStartFailure* failure);

}  // namespace attnfast
