// Undoing PNG row filters (PNG spec, 3rd ed., section 7.3 and 9: filter method 0) for the fast
// greyscale PNG path of cxrfast/data/files.py; inflating the IDAT stream is left to a zlib
// library. No Python in here.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cxr {

// raw: the inflated image data, rows * (1 + row_bytes) bytes (each row a filter-type byte,
// 0-4, then its filtered bytes); out: rows * row_bytes bytes, the samples in file (big-endian)
// byte order. bpp: bytes per pixel, 1 (8-bit grey) or 2 (16-bit
// grey); row_bytes a multiple of it. Throws Error(Corrupt) naming the first
// row with a filter type above 4, Error(Truncated) when raw is shorter than announced.
void png_unfilter(const uint8_t* raw, size_t raw_size, uint8_t* out, uint32_t rows, size_t row_bytes, int bpp);

// Swaps each byte pair in place: big-endian 16-bit samples to little-endian.
void swap_bytes16(uint8_t* data, size_t count);

}  // namespace cxr
