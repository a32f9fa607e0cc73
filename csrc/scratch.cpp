// The process-wide cache behind cxr::Scratch (see scratch.h): a short list of free buffers
// under one mutex; a request takes the smallest cached buffer that fits.
#include "scratch.h"

#include <mutex>
#include <new>
#include <vector>

namespace cxr {
namespace {

struct Block {
  uint8_t* data;
  size_t size;
};

std::mutex cache_mutex;
std::vector<Block> cache;  // free blocks, each >= kScratchMinBytes
size_t cached_bytes = 0;

}  // namespace

Scratch::Scratch(size_t bytes) {
  if (bytes >= kScratchMinBytes) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    size_t best = cache.size();
    for (size_t i = 0; i < cache.size(); ++i)
      if (cache[i].size >= bytes && (best == cache.size() || cache[i].size < cache[best].size)) best = i;
    if (best < cache.size()) {
      data_ = cache[best].data;
      size_ = cache[best].size;
      cached_bytes -= size_;
      cache.erase(cache.begin() + long(best));
      return;
    }
  }
  data_ = new uint8_t[bytes ? bytes : 1];
  size_ = bytes;
}

Scratch::~Scratch() {
  if (size_ >= kScratchMinBytes && size_ <= kScratchCacheBytes) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    // Make room by dropping the smallest blocks: the large ones are the costly ones to fault.
    while (cached_bytes + size_ > kScratchCacheBytes && !cache.empty()) {
      size_t small = 0;
      for (size_t i = 1; i < cache.size(); ++i)
        if (cache[i].size < cache[small].size) small = i;
      if (cache[small].size > size_) break;  // this one is the smallest: drop it instead
      delete[] cache[small].data;
      cached_bytes -= cache[small].size;
      cache.erase(cache.begin() + long(small));
    }
    if (cached_bytes + size_ <= kScratchCacheBytes) {
      try {
        cache.push_back(Block{data_, size_});
        cached_bytes += size_;
        return;
      } catch (const std::bad_alloc&) {
      }
    }
  }
  delete[] data_;
}

}  // namespace cxr
