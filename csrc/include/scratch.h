// Reusable scratch memory for decoders. A fresh multi-megabyte allocation is a fresh mmap:
// every 4 KiB page faults on first touch (about 1 us each on a VM, a third of the JPEG lossless
// decode of a chest image), and glibc's trimming makes whether a freed block comes back warm a
// matter of chance. Buffers of at least kScratchMinBytes are kept in a small process-wide cache
// (at most kScratchCacheBytes in all) and handed to the next decode already faulted in.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cxr {

constexpr size_t kScratchMinBytes = size_t(1) << 20;
constexpr size_t kScratchCacheBytes = size_t(64) << 20;

// At least `bytes` of uninitialised memory, returned to the cache (or freed) on destruction.
class Scratch {
 public:
  explicit Scratch(size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace cxr
