// Releasing the GIL around a kernel so that interpreter exit cannot abort the process, and reporting a
// thread the pool could not start. Used by every binding that computes (module.cpp).
//
// Exit: a daemon thread may still be inside a kernel when the main thread finalises the interpreter.
// Before Python 3.14 a thread that takes the GIL back after finalisation started is ended with
// pthread_exit, whose forced unwinding reaches a C++ frame that must not throw (pybind11's
// gil_scoped_release destructor) and calls std::terminate: the process aborts. Unwinding further would
// not be safe either, since the frames above release Python references without the GIL. So the GIL is
// taken back through an exit gate that an atexit hook closes, before finalisation: a kernel that ends
// after that never takes the GIL again and waits, parked, for the process to end (as Python 3.14 does
// itself), and the hook waits for the threads already on their way back to get the GIL first.
#pragma once
#include <pybind11/pybind11.h>

#include <pthread.h>
#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "attnfast/parallel.h"

namespace attnfast {
namespace bindings {

namespace detail {

struct ExitGate {
  std::mutex mutex;
  std::condition_variable nobody_reacquiring;
  bool closed = false;
  std::thread::id closed_by;  // the finalising thread, which must keep working after the gate closes
  int reacquiring = 0;        // threads between passing the gate and holding the GIL
};

// Never destroyed: parked threads hold on to it while the process' static destructors run. A fork()ed
// child has only the forking thread, so it starts with a fresh gate.
inline ExitGate& exit_gate() {
  static ExitGate* gate = [] {
    pthread_atfork(nullptr, nullptr, [] { new (&exit_gate()) ExitGate(); });
    return new ExitGate();
  }();
  return *gate;
}

[[noreturn]] inline void park_until_process_exit() {
  for (;;) pause();
}

// True: go on and take the GIL. False: the interpreter is exiting and this thread must not take it.
inline bool pass_exit_gate() {
  ExitGate& gate = exit_gate();
  std::lock_guard<std::mutex> lock(gate.mutex);
  if (gate.closed && gate.closed_by != std::this_thread::get_id()) return false;
  ++gate.reacquiring;
  return true;
}

inline void reacquire_gil(PyThreadState* state) {
  if (!pass_exit_gate()) park_until_process_exit();
  PyEval_RestoreThread(state);
  ExitGate& gate = exit_gate();
  std::lock_guard<std::mutex> lock(gate.mutex);
  if (--gate.reacquiring == 0) gate.nobody_reacquiring.notify_all();
}

}  // namespace detail

// Registered with atexit when the module is imported (atexit runs before finalisation begins). Called
// with the GIL, which it releases while it waits for the threads already on their way back to it.
inline void close_exit_gate() {
  detail::ExitGate& gate = detail::exit_gate();
  PyThreadState* state = PyEval_SaveThread();
  {
    std::unique_lock<std::mutex> lock(gate.mutex);
    gate.closed = true;
    gate.closed_by = std::this_thread::get_id();
    gate.nobody_reacquiring.wait(lock, [&] { return gate.reacquiring == 0; });
  }
  PyEval_RestoreThread(state);
}

// A thread the pool could not start is reported once, as a RuntimeWarning, before the call computes
// (it runs on the threads there are). Called with the GIL; raises if warnings are errors.
inline void warn_if_thread_start_failed() {
  ThreadStartFailure failure;
  if (!take_thread_start_failure(&failure)) return;
  const std::string message = "attnfast could not start a thread (" + failure.reason + "): running on " +
                              std::to_string(failure.running) + " of the " + std::to_string(failure.requested) +
                              " threads requested. Lower OMP_NUM_THREADS or call attnfast.set_num_threads(n) "
                              "with a smaller n; attnfast.set_num_threads() also lets it try again.";
  if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) throw pybind11::error_already_set();
}

// Runs fn() (a kernel call, which reports errors by its return value) without the GIL and returns
// its result.
template <class Fn>
auto call_without_gil(Fn&& fn) -> decltype(fn()) {
  warn_if_thread_start_failed();
  PyThreadState* state = PyEval_SaveThread();
  try {
    auto result = fn();
    detail::reacquire_gil(state);
    return result;
  } catch (...) {
    detail::reacquire_gil(state);
    throw;
  }
}

}  // namespace bindings
}  // namespace attnfast
