// Starting native worker threads without std::terminate. A std::thread that cannot be
// created throws std::system_error (no threads or stack left) or std::bad_alloc (its state, or
// the vector holding the threads); if that exception leaves a scope while started threads are
// still joinable, their destructors call std::terminate. So nothing escapes start_threads.
#pragma once

#include <exception>
#include <string>
#include <thread>
#include <vector>

namespace cxr {

// Appends up to `count` threads running `work` to `pool` (room reserved first, so no
// reallocation between starts) and returns what stopped it early, or nullptr when all
// started. The caller joins every thread in `pool` either way.
template <class Fn>
std::exception_ptr start_threads(std::vector<std::thread>& pool, int count, Fn& work) noexcept {
  try {
    if (count > 0) pool.reserve(pool.size() + size_t(count));
    for (int t = 0; t < count; ++t) pool.emplace_back(work);
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

// what() of the exception in e, for a message (after the threads are joined).
inline std::string exception_text(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown exception";
  }
}

}  // namespace cxr
