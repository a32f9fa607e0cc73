// Large buffers the kernel may back with transparent huge pages. A fresh multi-megabyte
// allocation is a fresh mapping whose 4 KiB pages fault one by one on first touch: on the
// 2-core VM about 4,600 faults and 20 ms of system time in a 37 ms read of one CR image (the
// file, the decoded samples and the output, 4-7 MB each). With THP in "madvise" mode (the
// default of Debian and Ubuntu) a buffer aligned to 2 MiB and marked MADV_HUGEPAGE faults once
// per 2 MiB instead; with THP "never", or off Linux, it is a plain allocation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace cxr {

constexpr size_t kHugePageBytes = size_t(2) << 20;

struct BufferFree {
  void operator()(uint8_t* p) const noexcept;
};
using Buffer = std::unique_ptr<uint8_t[], BufferFree>;

// At least max(n, 1) bytes, not initialised; from kHugePageBytes on, 2 MiB aligned and offered
// to the kernel for huge pages. Throws std::bad_alloc.
Buffer allocate_buffer(size_t n);

}  // namespace cxr
