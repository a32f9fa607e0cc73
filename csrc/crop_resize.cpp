// Training-time augmentation of prepared images: crop a box, resize it to size x size with
// the antialiased triangle filter (PIL's and torch's antialias=True bilinear; plain bilinear
// when upscaling), mirror, and normalise to float32 - one pass per axis, no temporary image
// of the input's size. The CPU loader calls it for whole batches in native threads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "cxrdicom.h"
#include "thread_pool.h"

#define CXR_CROP_WORKER crop_worker_baseline
#include "crop_resize_kernel.h"

namespace cxr {

#if CXR_CROP_AVX2
void crop_worker_avx2(const std::vector<CropJob>& jobs, std::atomic<size_t>& next, int bytes_per_sample, int size,
                      float gain, float offset);
#endif

void crop_resize_many(const std::vector<CropJob>& jobs, int bytes_per_sample, int size, float gain, float offset,
                      int num_threads) {
  auto* worker = &crop_worker_baseline;
#if CXR_CROP_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) worker = &crop_worker_avx2;
#endif
  std::atomic<size_t> next{0};
  std::mutex failure_mutex;
  std::exception_ptr failure;
  auto work = [&] {  // nothing may escape a thread (std::terminate): the first failure is kept
    try {
      worker(jobs, next, bytes_per_sample, size, gain, offset);
    } catch (...) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next = jobs.size();  // the other threads stop after their current image
    }
  };
  const int n = std::max(1, std::min<int>(num_threads, int(jobs.size())));
  std::vector<std::thread> pool;
  // A thread that cannot start (no memory or threads left): the threads started and this one
  // share the jobs through `next`, so the result is the same, only slower.
  (void)start_threads(pool, n - 1, work);
  work();
  for (auto& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace cxr
