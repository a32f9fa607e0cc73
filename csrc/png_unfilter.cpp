// PNG filter method 0 undone row by row (PNG spec section 9.2). a: the byte bpp to the left,
// b: the byte above, c: the byte above and to the left; bytes left of the row and rows above
// the image are 0.
#include "png_unfilter.h"

#include <cstdlib>
#include <cstdint>
#include <string>

#include "cxrdicom.h"

namespace cxr {
namespace {

inline uint8_t paeth(int a, int b, int c) {
  const int pa = std::abs(b - c), pb = std::abs(a - c), pc = std::abs(a + b - 2 * c);
  if (pa <= pb && pa <= pc) return uint8_t(a);
  return uint8_t(pb <= pc ? b : c);
}

// One row of BPP-byte pixels: src its filtered bytes, prev the row above unfiltered (nullptr
// for the first row), n a multiple of BPP. The left neighbours stay in registers (a[]): each
// output byte depends on the one BPP before it, and a reload through memory would double the
// latency of that chain.
template <int BPP>
void unfilter_row(int type, const uint8_t* __restrict__ src, const uint8_t* __restrict__ prev,
                  uint8_t* __restrict__ dst, size_t n) {
  uint8_t a[BPP] = {}, c[BPP] = {};
  switch (type) {
    case 0:
      for (size_t i = 0; i < n; ++i) dst[i] = src[i];
      break;
    case 1:
      for (size_t i = 0; i < n; i += BPP)
        for (int k = 0; k < BPP; ++k) dst[i + k] = a[k] = uint8_t(src[i + k] + a[k]);
      break;
    case 2:
      if (!prev) return unfilter_row<BPP>(0, src, prev, dst, n);
      for (size_t i = 0; i < n; ++i) dst[i] = uint8_t(src[i] + prev[i]);
      break;
    case 3:
      if (!prev) {
        for (size_t i = 0; i < n; i += BPP)
          for (int k = 0; k < BPP; ++k) dst[i + k] = a[k] = uint8_t(src[i + k] + (a[k] >> 1));
      } else {
        for (size_t i = 0; i < n; i += BPP)
          for (int k = 0; k < BPP; ++k) dst[i + k] = a[k] = uint8_t(src[i + k] + ((a[k] + prev[i + k]) >> 1));
      }
      break;
    case 4:
      if (!prev) return unfilter_row<BPP>(1, src, prev, dst, n);  // Paeth with b = c = 0 picks a
      for (size_t i = 0; i < n; i += BPP)
        for (int k = 0; k < BPP; ++k) {
          const uint8_t b = prev[i + k];
          dst[i + k] = a[k] = uint8_t(src[i + k] + paeth(a[k], b, c[k]));
          c[k] = b;
        }
      break;
  }
}

}  // namespace

void png_unfilter(const uint8_t* raw, size_t raw_size, uint8_t* out, uint32_t rows, size_t row_bytes, int bpp) {
  if (bpp != 1 && bpp != 2) throw Error(ErrorKind::Invalid, "PNG bytes per pixel must be 1 or 2");
  const size_t stride = row_bytes + 1;
  if (rows && raw_size / rows < stride)
    throw Error(ErrorKind::Truncated, "PNG image data is " + std::to_string(raw_size) + " bytes, " +
                                          std::to_string(rows) + " rows of " + std::to_string(stride) +
                                          " need " + std::to_string(size_t(rows) * stride) + ": truncated or corrupt");
  const uint8_t* prev = nullptr;
  for (uint32_t y = 0; y < rows; ++y) {
    const uint8_t* src = raw + size_t(y) * stride;
    uint8_t* dst = out + size_t(y) * row_bytes;
    if (src[0] > 4)
      throw Error(ErrorKind::Corrupt, "PNG row " + std::to_string(y) + " has filter type " + std::to_string(src[0]) +
                                          " (0-4 are defined): corrupt image data");
    if (bpp == 1)
      unfilter_row<1>(src[0], src + 1, prev, dst, row_bytes);
    else
      unfilter_row<2>(src[0], src + 1, prev, dst, row_bytes);
    prev = dst;
  }
}

void swap_bytes16(uint8_t* data, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    const uint8_t t = data[2 * i];
    data[2 * i] = data[2 * i + 1];
    data[2 * i + 1] = t;
  }
}

}  // namespace cxr
