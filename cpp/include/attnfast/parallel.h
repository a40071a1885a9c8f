// attnfast C++ core API: the task runner every kernel uses for its independent tasks.
#pragma once
#include <cstdint>

namespace attnfast {

using TaskFn = void (*)(void* context, int64_t task, int slot);

// Runs fn(context, t, slot) once for every t in [0, tasks), on at most `threads` threads: the caller is
// slot 0, pool workers take slots 1 .. threads-1 as they wake. Tasks are claimed one at a time from a
// shared counter, and the caller waits only for tasks that were claimed: a worker the OS has not
// scheduled yet simply finds nothing left, so a busy machine slows a call down instead of stalling
// it on a barrier. `slot` < threads indexes per-thread scratch. Which slot runs a task never changes
// its result (tasks are independent), so results do not depend on the thread count.
void run_parallel(int threads, int64_t tasks, TaskFn fn, void* context);

}  // namespace attnfast
