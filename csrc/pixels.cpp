// From a parsed data set to stored sample words: frame splitting of encapsulated pixel
// data (PS3.5 A.4), native unpacking (PS3.5 8.1, 8.2), RLE Lossless (PS3.5 G).
#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "cxrdicom.h"

namespace cxr {
namespace {

int bytes_per_sample(const Header& h) {
  if (h.bits_allocated <= 8) return 1;
  if (h.bits_allocated <= 16) return 2;
  return 4;
}

void check_geometry(const Header& h) {
  if (h.rows <= 0 || h.columns <= 0) throw Error(ErrorKind::Invalid, "Rows or Columns missing or zero");
  if (h.samples_per_pixel != 1 && h.samples_per_pixel != 3)
    throw Error(ErrorKind::Unsupported, "Samples per Pixel " + std::to_string(h.samples_per_pixel));
  int ba = h.bits_allocated;
  if (!(ba == 1 || ba == 8 || ba == 16 || ba == 32))
    throw Error(ErrorKind::Unsupported, "Bits Allocated " + std::to_string(ba));
  if (h.bits_stored < 1 || h.bits_stored > ba) throw Error(ErrorKind::Invalid, "Bits Stored " + std::to_string(h.bits_stored) + " does not fit Bits Allocated");
  if (int64_t(h.rows) * h.columns * h.samples_per_pixel > (int64_t(1) << 31))
    throw Error(ErrorKind::Unsupported, "image too large");
}

// Float / Double Float Pixel Data (PS3.3 C.7.6.24): grey IEEE floats, never compressed.
void check_float_geometry(const Header& h) {
  if (h.rows <= 0 || h.columns <= 0) throw Error(ErrorKind::Invalid, "Rows or Columns missing or zero");
  if (h.samples_per_pixel != 1)
    throw Error(ErrorKind::Unsupported, "Float Pixel Data with Samples per Pixel " + std::to_string(h.samples_per_pixel));
  if (h.bits_allocated != 0 && h.bits_allocated != h.float_bits)
    throw Error(ErrorKind::Invalid, "Bits Allocated " + std::to_string(h.bits_allocated) + " with " +
                                        (h.float_bits == 32 ? "Float" : "Double Float") + " Pixel Data");
  if (int64_t(h.rows) * h.columns > (int64_t(1) << 31)) throw Error(ErrorKind::Unsupported, "image too large");
  if (h.codec != Codec::Native || h.encapsulated)
    throw Error(ErrorKind::Invalid, "Float Pixel Data in a compressed transfer syntax");
}

// The frames [first, first + count) of float pixel data: read in place when little endian.
StoredPixels float_frames(const Dataset& ds, int64_t first, int64_t count, StoredPixels& px) {
  const Header& h = ds.header;
  const size_t bps = size_t(px.bytes_per_sample);
  const size_t frame_bytes = size_t(h.rows) * h.columns * bps;
  if (double(frame_bytes) * double(first + count) > double(h.pixel_data.length))
    throw Error(ErrorKind::Truncated, "float pixel data holds " + std::to_string(h.pixel_data.length) +
                                          " bytes, fewer than Rows x Columns x frames need");
  const uint8_t* src = ds.bytes() + h.pixel_data.offset + size_t(first) * frame_bytes;
  if (!h.big_endian) {
    px.view = src;
    return std::move(px);
  }
  px.data.resize(frame_bytes * size_t(count));
  for (size_t i = 0; i < px.data.size(); i += bps)
    for (size_t k = 0; k < bps; ++k) px.data[i + k] = src[i + bps - 1 - k];
  return std::move(px);
}

// A JPEG stream ends in EOI, possibly followed by zero padding.
bool ends_with_eoi(const uint8_t* p, size_t n) {
  while (n > 0 && p[n - 1] == 0) --n;
  return n >= 2 && p[n - 2] == 0xFF && p[n - 1] == 0xD9;
}

bool is_jpeg_family(Codec c) {
  return c == Codec::JpegLossless || c == Codec::JpegBaseline || c == Codec::JpegExtended || c == Codec::JpegLs;
}

FrameBytes join(const Dataset& ds, size_t first, size_t last) {
  const auto& frags = ds.header.fragments;
  FrameBytes f;
  if (last - first == 1) {
    f.data = ds.bytes() + frags[first].offset;
    f.size = frags[first].length;
    return f;
  }
  f.owned = std::make_shared<std::vector<uint8_t>>();
  for (size_t i = first; i < last; ++i)
    f.owned->insert(f.owned->end(), ds.bytes() + frags[i].offset, ds.bytes() + frags[i].offset + frags[i].length);
  f.data = f.owned->data();
  f.size = f.owned->size();
  return f;
}

}  // namespace

std::vector<FrameBytes> encapsulated_frames(const Dataset& ds) {
  const Header& h = ds.header;
  if (!h.has_pixel_data) throw Error(ErrorKind::NoPixelData, "no Pixel Data (7FE0,0010)");
  if (!h.encapsulated) throw Error(ErrorKind::Invalid, "pixel data is not encapsulated");
  const auto& frags = h.fragments;
  const auto& pos = h.fragment_positions;
  int64_t nframes = frame_count(h);
  std::vector<FrameBytes> out;
  if (frags.empty()) throw Error(ErrorKind::Truncated, "encapsulated pixel data has no fragments");

  // Fragment positions increase strictly (the parser records them in file order), so an
  // offset is found by binary search: O(frames log fragments) for any offset table.
  auto fragment_at = [&](uint64_t offset) -> size_t {
    auto it = std::lower_bound(pos.begin(), pos.end(), offset);
    if (it == pos.end() || *it != offset) throw Error(ErrorKind::Invalid, "offset table points between fragments");
    return size_t(it - pos.begin());
  };

  if (!h.extended_offsets.empty()) {
    // Extended Offset Table (PS3.3 C.7.6.3.1.8): one fragment per frame.
    for (size_t i = 0; i < h.extended_offsets.size(); ++i) {
      size_t k = fragment_at(h.extended_offsets[i]);
      out.push_back(join(ds, k, k + 1));
    }
  } else if (!h.basic_offsets.empty()) {
    std::vector<size_t> starts;
    for (uint32_t off : h.basic_offsets) starts.push_back(fragment_at(off));
    for (size_t i = 0; i < starts.size(); ++i) {
      size_t end = i + 1 < starts.size() ? starts[i + 1] : frags.size();
      if (end <= starts[i]) throw Error(ErrorKind::Invalid, "Basic Offset Table is not increasing");
      out.push_back(join(ds, starts[i], end));
    }
  } else if (nframes == 1) {
    out.push_back(join(ds, 0, frags.size()));
  } else if (int64_t(frags.size()) == nframes) {
    for (size_t i = 0; i < frags.size(); ++i) out.push_back(join(ds, i, i + 1));
  } else if (is_jpeg_family(h.codec)) {
    // Empty BOT, several fragments per frame: a frame ends at the fragment that ends in EOI.
    size_t start = 0;
    for (size_t i = 0; i < frags.size(); ++i) {
      if (ends_with_eoi(ds.bytes() + frags[i].offset, frags[i].length)) {
        out.push_back(join(ds, start, i + 1));
        start = i + 1;
      }
    }
    if (start < frags.size()) out.push_back(join(ds, start, frags.size()));
  } else {
    throw Error(ErrorKind::Invalid, "cannot split " + std::to_string(frags.size()) + " fragments into " +
                                        std::to_string(nframes) + " frames without an offset table");
  }
  if (int64_t(out.size()) < nframes)
    throw Error(ErrorKind::Truncated, "pixel data holds " + std::to_string(out.size()) + " of " + std::to_string(nframes) + " frames");
  out.resize(size_t(nframes));
  return out;
}

// One PackBits-style segment (PS3.5 G.3.1) into a contiguous plane, bounded on input and
// output; runs become memcpy / memset.
static void rle_segment(const uint8_t* src, size_t n, uint8_t* out, size_t count) {
  size_t i = 0, o = 0;
  while (o < count) {
    if (i >= n) throw Error(ErrorKind::Truncated, "RLE segment ends early");
    int8_t c = int8_t(src[i++]);
    if (c >= 0) {
      size_t len = size_t(c) + 1;
      if (i + len > n) throw Error(ErrorKind::Truncated, "RLE literal run ends early");
      std::memcpy(out + o, src + i, std::min(len, count - o));  // samples past the frame are ignored
      i += len;
      o += std::min(len, count - o);
    } else if (c != -128) {
      if (i >= n) throw Error(ErrorKind::Truncated, "RLE replicate run ends early");
      size_t len = std::min(size_t(1 - int(c)), count - o);
      std::memset(out + o, src[i++], len);
      o += len;
    }
  }
}

void rle_decode_frame(const uint8_t* src, size_t size, const Header& h, uint8_t* out) {
  if (size < 64) throw Error(ErrorKind::Truncated, "RLE frame shorter than its header");
  auto u32 = [&](size_t at) { return uint32_t(src[at]) | uint32_t(src[at + 1]) << 8 | uint32_t(src[at + 2]) << 16 | uint32_t(src[at + 3]) << 24; };
  int bps = bytes_per_sample(h);
  uint32_t nseg = u32(0);
  uint32_t want = uint32_t(bps * h.samples_per_pixel);
  if (h.bits_allocated == 1) throw Error(ErrorKind::Unsupported, "RLE with Bits Allocated 1");
  if (nseg != want) throw Error(ErrorKind::Corrupt, "RLE header lists " + std::to_string(nseg) + " segments, expected " + std::to_string(want));
  size_t pixels = size_t(h.rows) * h.columns;
  size_t stride = size_t(bps) * h.samples_per_pixel;
  std::vector<uint8_t> planes(pixels * nseg);
  for (uint32_t s = 0; s < nseg; ++s) {
    uint32_t start = u32(4 + 4 * s);
    uint32_t end = s + 1 < nseg ? u32(8 + 4 * s) : uint32_t(std::min<size_t>(size, 0xFFFFFFFFu));
    if (start < 64 || start > size || end > size || end < start) throw Error(ErrorKind::Corrupt, "RLE segment offsets out of range");
    rle_segment(src + start, end - start, planes.data() + s * pixels, pixels);
  }
  // Segments hold the most significant byte first; words are little-endian in `out`.
  if (nseg == 2 && bps == 2) {
    const uint8_t* hi = planes.data();
    const uint8_t* lo = planes.data() + pixels;
    for (size_t i = 0; i < pixels; ++i) {
      uint16_t v = uint16_t(hi[i] << 8 | lo[i]);
      std::memcpy(out + 2 * i, &v, 2);
    }
    return;
  }
  for (uint32_t s = 0; s < nseg; ++s) {
    size_t at = size_t(s / bps) * bps + size_t(bps - 1 - int(s) % bps);
    const uint8_t* plane = planes.data() + s * pixels;
    for (size_t i = 0; i < pixels; ++i) out[i * stride + at] = plane[i];
  }
}

static void unpack_native(const Dataset& ds, int64_t first, int64_t count, StoredPixels& px) {
  const Header& h = ds.header;
  size_t samples = size_t(h.rows) * h.columns * h.samples_per_pixel;
  size_t frame_bits = samples * size_t(h.bits_allocated);
  size_t frame_bytes = (frame_bits + 7) / 8;
  const uint8_t* base = ds.bytes() + h.pixel_data.offset;
  size_t avail = h.pixel_data.length;
  int bps = px.bytes_per_sample;
  for (int64_t f = 0; f < count; ++f) {
    uint8_t* out = px.data.data() + size_t(f) * samples * bps;
    int64_t idx = first + f;
    if (h.bits_allocated == 1) {
      // Bit-packed frames are contiguous in bits, not bytes (PS3.5 8.1.1).
      size_t bit0 = size_t(idx) * samples;
      if ((bit0 + samples + 7) / 8 > avail) throw Error(ErrorKind::Truncated, "pixel data shorter than Rows x Columns x frames");
      for (size_t i = 0; i < samples; ++i) {
        size_t b = bit0 + i;
        out[i] = (base[b >> 3] >> (b & 7)) & 1;
      }
      continue;
    }
    if (h.photometric == "YBR_FULL_422" && h.samples_per_pixel == 3 && bps == 1) {
      // Native 4:2:2 (PS3.3 C.7.6.3.1.2): Y1 Y2 Cb Cr per pixel pair; chroma is duplicated.
      size_t pixels = size_t(h.rows) * h.columns;
      size_t fb = pixels * 2;
      size_t off = size_t(idx) * fb;
      if (off + fb > avail) throw Error(ErrorKind::Truncated, "pixel data shorter than Rows x Columns x frames");
      const uint8_t* src = base + off;
      for (size_t i = 0; i < pixels; ++i) {
        const uint8_t* q = src + (i / 2) * 4;
        out[i * 3] = q[i & 1];
        out[i * 3 + 1] = q[2];
        out[i * 3 + 2] = q[3];
      }
      continue;
    }
    size_t off = size_t(idx) * frame_bytes;
    if (off + frame_bytes > avail) throw Error(ErrorKind::Truncated, "pixel data shorter than Rows x Columns x frames");
    const uint8_t* src = base + off;
    if (h.big_endian && bps == 1 && h.pixel_vr_ow) {
      // 8-bit samples in OW are byte-swapped 16-bit words in big endian (PS3.5 7.3).
      for (size_t i = 0; i < samples; ++i) {
        size_t j = (off + i) ^ 1u;
        out[i] = j < avail ? base[j] : 0;
      }
      if (h.samples_per_pixel == 3 && h.planar_configuration == 1) {
        std::vector<uint8_t> tmp(out, out + samples);
        size_t pixels = size_t(h.rows) * h.columns;
        for (size_t i = 0; i < samples; ++i) out[(i % pixels) * 3 + i / pixels] = tmp[i];
      }
      continue;
    }
    bool planar = h.samples_per_pixel == 3 && h.planar_configuration == 1;
    size_t pixels = size_t(h.rows) * h.columns;
    if (!planar && (!h.big_endian || bps == 1)) {
      std::memcpy(out, src, frame_bytes);
    } else {
      for (size_t i = 0; i < samples; ++i) {
        size_t dst = planar ? (i % pixels) * 3 + i / pixels : i;
        const uint8_t* s = src + i * bps;
        uint8_t* d = out + dst * bps;
        if (h.big_endian)
          for (int k = 0; k < bps; ++k) d[k] = s[bps - 1 - k];
        else
          std::memcpy(d, s, bps);
      }
    }
  }
}

StoredPixels decode_stored(const Dataset& ds, int64_t frame, int threads) {
  const Header& h = ds.header;
  if (!h.has_pixel_data) throw Error(ErrorKind::NoPixelData, "no Pixel Data (7FE0,0010)");
  if (h.unknown_syntax) throw Error(ErrorKind::UnsupportedTransferSyntax, "unsupported transfer syntax " + h.transfer_syntax);
  if (h.float_bits) check_float_geometry(h);
  else check_geometry(h);
  int64_t nframes = frame_count(h);
  if (frame >= nframes) throw Error(ErrorKind::Invalid, "frame " + std::to_string(frame) + " out of range (" + std::to_string(nframes) + " frames)");
  int64_t first = frame < 0 ? 0 : frame;
  int64_t count = frame < 0 ? nframes : 1;

  StoredPixels px;
  px.frames = int(count);
  px.rows = h.rows;
  px.columns = h.columns;
  px.samples = h.samples_per_pixel;
  px.bytes_per_sample = h.float_bits ? h.float_bits / 8 : bytes_per_sample(h);
  size_t frame_words = size_t(h.rows) * h.columns * h.samples_per_pixel;
  if (h.float_bits) return float_frames(ds, first, count, px);
  if (h.codec == Codec::Native) {
    if (h.encapsulated) throw Error(ErrorKind::Invalid, "native transfer syntax with encapsulated pixel data");
    // Check before allocating, so a corrupt header cannot ask for gigabytes.
    size_t frame_bytes = (frame_words * size_t(h.bits_allocated) + 7) / 8;
    if (h.photometric == "YBR_FULL_422" && h.samples_per_pixel == 3 && h.bits_allocated == 8) frame_bytes = frame_words * 2 / 3;
    // 1-bit frames are packed back to back in bits, not bytes (PS3.5 8.1.1): a frame of
    // Rows x Columns not divisible by 8 starts inside a byte.
    double need = h.bits_allocated == 1 ? std::ceil(double(frame_words) * double(first + count) / 8.0)
                                        : double(frame_bytes) * double(first + count);
    if (need > double(h.pixel_data.length))
      throw Error(ErrorKind::Truncated, "pixel data holds " + std::to_string(h.pixel_data.length) +
                                            " bytes, fewer than Rows x Columns x frames need");
    bool in_place = !h.big_endian && h.bits_allocated >= 8 && px.bytes_per_sample * 8 == h.bits_allocated &&
                    !(h.samples_per_pixel == 3 && h.planar_configuration == 1) && h.photometric != "YBR_FULL_422";
    if (in_place) {  // little-endian interleaved samples: read them where they lie
      px.view = ds.bytes() + h.pixel_data.offset + size_t(first) * frame_bytes;
      return px;
    }
    px.data.resize(frame_words * px.bytes_per_sample * count);
    unpack_native(ds, first, count, px);
    return px;
  }
  if (h.codec != Codec::Rle && h.codec != Codec::JpegLossless)
    throw Error(ErrorKind::NeedsCodec, codec_name(h.codec));
  if (!h.encapsulated) throw Error(ErrorKind::Invalid, "compressed transfer syntax with native pixel data");
  auto frames = encapsulated_frames(ds);
  // Each sample costs a JPEG lossless stream at least one bit, and an RLE segment at least
  // 2 bytes per 128 samples: a smaller frame is cut short (checked before allocating).
  for (int64_t f = 0; f < count; ++f) {
    size_t need = h.codec == Codec::JpegLossless ? frame_words / 8 : frame_words * px.bytes_per_sample / 64;
    if (frames[size_t(first + f)].size < need)
      throw Error(ErrorKind::Truncated, "compressed frame " + std::to_string(first + f) + " is too short for its size");
  }
  px.data.resize(frame_words * px.bytes_per_sample * count);
  for (int64_t f = 0; f < count; ++f) {
    const FrameBytes& fb = frames[size_t(first + f)];
    uint8_t* out = px.data.data() + size_t(f) * frame_words * px.bytes_per_sample;
    if (h.codec == Codec::Rle) {
      rle_decode_frame(fb.data, fb.size, h, out);
      continue;
    }
    JpegLosslessInfo info = jpeg_lossless_info(fb.data, fb.size);
    if (info.components != 1 || h.samples_per_pixel != 1)
      throw Error(ErrorKind::NeedsCodec, "jpeg_lossless_multicomponent");
    if (info.width != h.columns || info.height != h.rows)
      throw Error(ErrorKind::Corrupt, "JPEG frame is " + std::to_string(info.width) + "x" + std::to_string(info.height) +
                                          " but the header says " + std::to_string(h.columns) + "x" + std::to_string(h.rows));
    if (px.bytes_per_sample == 2) {
      jpeg_lossless_decode(fb.data, fb.size, reinterpret_cast<uint16_t*>(out), frame_words, threads);
    } else {
      std::vector<uint16_t> tmp(frame_words);
      jpeg_lossless_decode(fb.data, fb.size, tmp.data(), frame_words, threads);
      if (px.bytes_per_sample == 1)
        for (size_t i = 0; i < frame_words; ++i) out[i] = uint8_t(tmp[i]);
      else
        for (size_t i = 0; i < frame_words; ++i) reinterpret_cast<uint32_t*>(out)[i] = tmp[i];
    }
  }
  return px;
}

namespace {

// Stored bits of a word (PS3.5 8.1.1), masked and sign-extended in place. The arithmetic
// stays in the word's own width (16-bit words are 8 lanes of an SSE register, not 4 widened
// ones) and uses one pointer, so the loop vectorises without alias checks.
template <class Word>
void mask_words(Word* w, size_t n, int bits, int shift, bool is_signed) {
  using Signed = std::make_signed_t<Word>;
  constexpr int width = int(8 * sizeof(Word));
  if (shift == 0 && bits == width) return;  // the words are the values (signed or not)
  const Word mask = Word(bits >= width ? ~Word(0) : Word((Word(1) << bits) - 1));
  const int up = width - bits;
  if (is_signed) {
    for (size_t i = 0; i < n; ++i) w[i] = Word(Signed(Word(Word(w[i] >> shift) << up)) >> up);
  } else {
    for (size_t i = 0; i < n; ++i) w[i] = Word(w[i] >> shift) & mask;
  }
}

// The pixel words read_and_parse masks for a header: [offset, offset + length) of `bytes`-byte
// words (bytes 0: none) with `bits` stored bits from bit 0. `file_size` bounds the declared length.
struct WordMask {
  size_t offset = 0, length = 0;
  int bytes = 0, bits = 0;
  bool is_signed = false;
  bool operator==(const WordMask& o) const {
    return offset == o.offset && length == o.length && bytes == o.bytes && bits == o.bits && is_signed == o.is_signed;
  }
};

WordMask word_mask(const Header& h, size_t file_size) {
  WordMask m;
  const Span& px = h.pixel_declared;
  const int ba = h.bits_allocated;
  const bool words = ba == 8 || ba == 16 || ba == 32;
  if (!h.has_pixel_data || h.float_bits || h.deflated || h.big_endian || h.unknown_syntax || h.codec != Codec::Native ||
      !words || px.length == 0xFFFFFFFFu || px.offset > file_size || h.bits_stored < 1 || h.bits_stored >= ba)
    return m;  // nothing to mask (bits_stored == ba: the words are the values), or not plain words
  const int hb = h.high_bit < 0 ? h.bits_stored - 1 : h.high_bit;
  if (hb >= h.bits_stored && hb < ba) return m;  // the stored bits start above bit 0: leave to render
  m.bytes = ba / 8;
  if (px.offset % size_t(m.bytes) != 0) return WordMask();  // misaligned words stay as they are
  m.offset = px.offset;
  m.length = std::min<size_t>(px.length, file_size - px.offset) / size_t(m.bytes) * size_t(m.bytes);
  m.bits = h.bits_stored;
  m.is_signed = h.pixel_representation == 1;
  return m;
}

// Masks the whole words of [done, upto) that lie in m's range; returns the new `done`.
size_t mask_range(uint8_t* base, const WordMask& m, size_t done, size_t upto) {
  const size_t lo = std::max(done, m.offset), end = std::min(upto, m.offset + m.length);
  if (lo >= end) return std::max(done, upto);
  const size_t n = (end - lo) / size_t(m.bytes);  // lo is word-aligned: chunks advance by whole words
  uint8_t* w = base + lo;
  if (m.bytes == 1) mask_words(w, n, m.bits, 0, m.is_signed);
  else if (m.bytes == 2) mask_words(reinterpret_cast<uint16_t*>(w), n, m.bits, 0, m.is_signed);
  else mask_words(reinterpret_cast<uint32_t*>(w), n, m.bits, 0, m.is_signed);
  return lo + n * size_t(m.bytes);
}

const char* stored_dtype(const Header& h) {
  bool s = h.pixel_representation == 1;
  if (h.bits_allocated <= 8) return s ? "i1" : "u1";
  if (h.bits_allocated <= 16) return s ? "i2" : "u2";
  return s ? "i4" : "u4";
}

}  // namespace

int64_t stored_in_place(const Dataset& ds, uint8_t* file, int64_t frame, const RenderOptions& opt, Rendered& r,
                        bool masked) {
  const Header& h = ds.header;
  const bool resize = opt.size_longest > 0 || opt.size_h > 0 || opt.size_w > 0;
  const bool whole = frame < 0 || frame_count(h) == 1;  // one frame of many: copy it out instead
  if (opt.mode != OutputMode::Stored || resize || !whole || h.float_bits || h.deflated || h.encapsulated ||
      h.codec != Codec::Native || ds.bytes() != file)
    return -1;
  StoredPixels px = decode_stored(ds, frame);  // all checks (geometry, truncation, frame range)
  const int bps = px.bytes_per_sample;
  if (!px.view || reinterpret_cast<uintptr_t>(px.view) % uintptr_t(bps) != 0) return -1;
  const int64_t at = px.view - file;
  uint8_t* words = file + at;
  const int bits = std::clamp(h.bits_stored, 1, 32);
  // High Bit above Bits Stored - 1 places the stored bits higher in the word (as in render()).
  const int shift = h.high_bit >= bits && h.high_bit < h.bits_allocated ? h.high_bit - bits + 1 : 0;
  const bool is_signed = h.pixel_representation == 1;
  if (masked && shift == 0) {  // read_and_parse masked every pixel word already
  } else if (bps == 1) mask_words(words, px.count(), bits, shift, is_signed);
  else if (bps == 2) mask_words(reinterpret_cast<uint16_t*>(words), px.count(), bits, shift, is_signed);
  else mask_words(reinterpret_cast<uint32_t*>(words), px.count(), bits, shift, is_signed);
  r.frames = px.frames;
  r.rows = px.rows;
  r.columns = px.columns;
  r.samples = px.samples;
  r.dtype = stored_dtype(h);
  return at;
}

FileBytes read_and_parse(const std::string& path, Dataset& ds, bool& masked) {
  masked = false;
  FileBytes out = read_file(path, size_t(1) << 16);  // the head, then the rest into the same buffer
  if (out.whole) {  // a small file: nothing to gain from chunks
    ds = Dataset::parse(out.data(), out.size(), false);
    return out;
  }
  WordMask m;
  try {
    m = word_mask(Dataset::parse(out.data(), out.size(), true).header, SIZE_MAX);
  } catch (const Error&) {  // the full parse below reports what is wrong
  }
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error(ErrorKind::Io, std::string("cannot open file: ") + std::strerror(errno));
  std::unique_ptr<FILE, int (*)(FILE*)> closer(f, std::fclose);
  if (std::fseek(f, 0, SEEK_END) != 0 || std::ftell(f) < 0) throw Error(ErrorKind::Io, "cannot read file (not seekable)");
  const size_t size = size_t(std::ftell(f));
  if (size < out.length) throw Error(ErrorKind::Io, "file shrank while read");
  Buffer bytes = allocate_buffer(size);
  std::memcpy(bytes.get(), out.data(), out.length);  // 64 KiB, already in cache
  if (std::fseek(f, long(out.length), SEEK_SET) != 0) throw Error(ErrorKind::Io, "cannot read file");
  if (m.bytes) m.length = std::min(m.length, m.offset < size ? (size - m.offset) / size_t(m.bytes) * size_t(m.bytes) : 0);
  constexpr size_t kChunk = size_t(256) << 10;  // a multiple of every word size; fits in L2
  size_t pos = out.length, done = m.bytes ? mask_range(bytes.get(), m, 0, pos) : pos;
  while (pos < size) {
    size_t n = std::min(kChunk, size - pos);
    if (std::fread(bytes.get() + pos, 1, n, f) != n) throw Error(ErrorKind::Io, "cannot read file");
    pos += n;
    if (m.bytes) done = mask_range(bytes.get(), m, done, pos);
  }
  closer.reset();
  out.bytes = std::move(bytes);
  out.length = size;
  out.whole = true;
  ds = Dataset::parse(out.data(), out.size(), false);
  if (!m.bytes) return out;
  if (word_mask(ds.header, size) == m) {
    masked = true;
    return out;
  }
  out = read_file(path);  // the full header differs from its first 64 KiB: the bytes as on disk
  ds = Dataset::parse(out.data(), out.size(), false);
  return out;
}

}  // namespace cxr
