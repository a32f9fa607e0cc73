// allocate_buffer: see include/buffer.h.
#include "buffer.h"

#include <cstdlib>
#include <new>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cxr {

void BufferFree::operator()(uint8_t* p) const noexcept { std::free(p); }

Buffer allocate_buffer(size_t n) {
  void* p = nullptr;
  if (n >= kHugePageBytes && n <= SIZE_MAX - kHugePageBytes) {
    const size_t rounded = (n + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    p = std::aligned_alloc(kHugePageBytes, rounded);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p) (void)madvise(p, rounded, MADV_HUGEPAGE);  // a refusal leaves ordinary pages
#endif
  } else {
    p = std::malloc(n ? n : 1);
  }
  if (!p) throw std::bad_alloc();
  return Buffer(static_cast<uint8_t*>(p));
}

}  // namespace cxr
