// DICOM Part 10 parsing (PS3.10 7.1, PS3.5 7): preamble, file meta, the three data set
// encodings plus deflate, sequences of defined and undefined length, encapsulated pixel data.
#ifndef CXRFAST_NO_ZLIB
#include <zlib.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "cxrdicom.h"

namespace cxr {
namespace {

constexpr uint32_t kItem = 0xFFFEE000u, kItemEnd = 0xFFFEE00Du, kSeqEnd = 0xFFFEE0DDu;
constexpr uint32_t kUndefined = 0xFFFFFFFFu;
constexpr uint32_t kPixelData = 0x7FE00010u;
constexpr uint32_t kFloatPixelData = 0x7FE00008u, kDoubleFloatPixelData = 0x7FE00009u;
constexpr int kMaxDepth = 64;

std::string trim(const uint8_t* p, size_t n) {
  size_t b = 0, e = n;
  while (b < e && (p[b] == ' ' || p[b] == 0)) ++b;
  while (e > b && (p[e - 1] == ' ' || p[e - 1] == 0)) --e;
  return std::string(reinterpret_cast<const char*>(p + b), e - b);
}

std::vector<double> parse_numbers(const std::string& s) {
  std::vector<double> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find('\\', start);
    if (end == std::string::npos) end = s.size();
    std::string part = s.substr(start, end - start);
    char* stop = nullptr;
    const char* c = part.c_str();
    double v = std::strtod(c, &stop);
    if (stop != c) out.push_back(v);
    start = end + 1;
  }
  return out;
}

bool is_long_vr(const uint8_t* vr) {
  static const char* kLong[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV",
                                "UC", "UN", "UR", "UT", "UV"};
  for (const char* l : kLong)
    if (vr[0] == l[0] && vr[1] == l[1]) return true;
  return false;
}

bool looks_like_vr(const uint8_t* p) { return p[0] >= 'A' && p[0] <= 'Z' && p[1] >= 'A' && p[1] <= 'Z'; }

struct Encoding {
  bool explicit_vr = true;
  bool big_endian = false;
};

}  // namespace

const char* codec_name(Codec codec) {
  switch (codec) {
    case Codec::Native: return "native";
    case Codec::Rle: return "rle";
    case Codec::JpegLossless: return "jpeg_lossless";
    case Codec::JpegBaseline: return "jpeg_baseline";
    case Codec::JpegExtended: return "jpeg_extended";
    case Codec::JpegLs: return "jpegls";
    case Codec::Jpeg2000: return "jpeg2000";
    case Codec::Htj2k: return "htj2k";
  }
  return "unknown";
}

class Parser {
 public:
  Parser(const uint8_t* data, size_t size, Header& h) : p_(data), n_(size), h_(h) {}

  uint16_t u16(size_t at, bool be) const {
    return be ? uint16_t(p_[at] << 8 | p_[at + 1]) : uint16_t(p_[at] | p_[at + 1] << 8);
  }
  uint32_t u32(size_t at, bool be) const {
    return be ? (uint32_t(u16(at, true)) << 16 | u16(at + 2, true))
              : (uint32_t(u16(at, false)) | uint32_t(u16(at + 2, false)) << 16);
  }

  struct Element {
    uint32_t tag = 0;
    char vr[2] = {0, 0};
    uint32_t length = 0;
    size_t value = 0;  // offset of the value
  };

  // Reads one element header at pos; returns false at the end of the buffer.
  bool next(size_t& pos, size_t end, Encoding enc, Element& el) const {
    if (pos >= end) return false;
    if (end - pos < 8) throw Error(ErrorKind::Truncated, "data set ends inside an element header");
    el.tag = uint32_t(u16(pos, enc.big_endian)) << 16 | u16(pos + 2, enc.big_endian);
    // Item and delimiter tags carry no VR in any encoding (PS3.5 7.5).
    if ((el.tag >> 16) == 0xFFFE || !enc.explicit_vr) {
      el.vr[0] = el.vr[1] = 0;
      el.length = u32(pos + 4, enc.big_endian);
      el.value = pos + 8;
    } else if (is_long_vr(p_ + pos + 4)) {
      if (end - pos < 12) throw Error(ErrorKind::Truncated, "data set ends inside an element header");
      el.vr[0] = char(p_[pos + 4]);
      el.vr[1] = char(p_[pos + 5]);
      el.length = u32(pos + 8, enc.big_endian);
      el.value = pos + 12;
    } else if (looks_like_vr(p_ + pos + 4)) {
      el.vr[0] = char(p_[pos + 4]);
      el.vr[1] = char(p_[pos + 5]);
      el.length = u16(pos + 6, enc.big_endian);
      el.value = pos + 8;
    } else {
      // Not a VR: the writer used implicit VR despite its transfer syntax (seen in the
      // wild; pydicom switches too). Read this element as implicit VR.
      el.vr[0] = el.vr[1] = 0;
      el.length = u32(pos + 4, enc.big_endian);
      el.value = pos + 8;
    }
    return true;
  }

  size_t value_end(const Element& el, size_t end) const {
    if (el.length > end - el.value)
      throw Error(ErrorKind::Truncated, "element (" + tag_str(el.tag) + ") runs past the end of the data");
    return el.value + el.length;
  }

  static std::string tag_str(uint32_t tag) {
    char b[16];
    std::snprintf(b, sizeof b, "%04X,%04X", tag >> 16, tag & 0xFFFF);
    return b;
  }

  // Skips a value of undefined length (a sequence or an item list); returns the position after it.
  size_t skip_undefined(size_t pos, size_t end, Encoding enc, int depth) const {
    if (depth > kMaxDepth) throw Error(ErrorKind::Invalid, "sequences nested too deeply");
    Element el;
    while (next(pos, end, enc, el)) {
      if (el.tag == kSeqEnd || el.tag == kItemEnd) return el.value;
      if (el.length == kUndefined) {
        Encoding inner = enc;
        if (el.vr[0] == 'U' && el.vr[1] == 'N') inner = Encoding{false, false};
        pos = skip_undefined(el.value, end, inner, depth + 1);
      } else {
        pos = value_end(el, end);
      }
    }
    throw Error(ErrorKind::Truncated, "undefined-length sequence has no delimiter");
  }

  // Parses the items of a LUT sequence and keeps the first item's LUT.
  size_t parse_lut_sequence(const Element& seq, size_t end, Encoding enc, Lut& lut, bool& found) {
    size_t seq_end = seq.length == kUndefined ? end : value_end(seq, end);
    size_t pos = seq.value;
    Element el;
    bool first = true;
    while (next(pos, seq_end, enc, el)) {
      if (el.tag == kSeqEnd) return el.value;
      if (el.tag != kItem) throw Error(ErrorKind::Invalid, "sequence (" + tag_str(seq.tag) + ") holds a non-item");
      size_t item_end = el.length == kUndefined ? seq_end : value_end(el, seq_end);
      size_t ipos = el.value;
      std::vector<uint16_t> descriptor_raw;
      const uint8_t* data = nullptr;
      size_t data_len = 0;
      Element it;
      bool closed = el.length != kUndefined;
      while (next(ipos, item_end, enc, it)) {
        if (it.tag == kItemEnd) { ipos = it.value; closed = true; break; }
        if (it.length == kUndefined) { ipos = skip_undefined(it.value, item_end, enc, 1); continue; }
        size_t vend = value_end(it, item_end);
        if (it.tag == 0x00283002u) {
          for (size_t q = it.value; q + 2 <= vend; q += 2) descriptor_raw.push_back(u16(q, enc.big_endian));
        } else if (it.tag == 0x00283006u) {
          data = p_ + it.value;
          data_len = it.length;
        }
        ipos = vend;
      }
      if (!closed) throw Error(ErrorKind::Truncated, "LUT sequence item has no delimiter");
      pos = el.length == kUndefined ? ipos : item_end;
      if (first && descriptor_raw.size() >= 3 && data) {
        size_t entries = descriptor_raw[0] == 0 ? 65536 : descriptor_raw[0];
        lut.first_mapped = h_.pixel_representation == 1 ? int64_t(int16_t(descriptor_raw[1])) : descriptor_raw[1];
        lut.bits = descriptor_raw[2];
        lut.data.clear();
        if (data_len >= entries * 2) {
          for (size_t i = 0; i < entries; ++i) lut.data.push_back(u16(size_t(data - p_) + 2 * i, enc.big_endian));
        } else if (data_len >= entries) {
          // 8-bit LUT Data packed one entry per byte (seen in the wild).
          for (size_t i = 0; i < entries; ++i) lut.data.push_back(data[i]);
        } else {
          throw Error(ErrorKind::Invalid, "LUT Data is shorter than its LUT Descriptor");
        }
        if (lut.bits < 1 || lut.bits > 16) lut.bits = 16;
        found = true;
      }
      first = false;
    }
    if (seq.length == kUndefined) throw Error(ErrorKind::Truncated, "undefined-length sequence has no delimiter");
    return seq_end;
  }

  void parse_pixel_data(const Element& el, size_t end, Encoding enc) {
    h_.has_pixel_data = true;
    h_.pixel_vr_ow = el.vr[0] == 'O' && el.vr[1] == 'W';
    if (el.length != kUndefined) {
      h_.encapsulated = false;
      h_.pixel_data.offset = el.value;
      h_.pixel_data.length = std::min<size_t>(el.length, end - el.value);  // checked when decoding
      return;
    }
    h_.encapsulated = true;
    size_t pos = el.value;
    Element it;
    bool first = true;
    size_t first_fragment = 0;
    Encoding item_enc{false, enc.big_endian};
    while (true) {
      if (!next(pos, end, item_enc, it)) throw Error(ErrorKind::Truncated, "encapsulated pixel data has no sequence delimiter");
      if (it.tag == kSeqEnd) return;
      if (it.tag != kItem) throw Error(ErrorKind::Invalid, "encapsulated pixel data holds a non-item tag (" + tag_str(it.tag) + ")");
      if (it.length == kUndefined) throw Error(ErrorKind::Invalid, "encapsulated fragment of undefined length");
      size_t vend = value_end(it, end);
      if (first) {
        for (size_t q = it.value; q + 4 <= vend; q += 4) h_.basic_offsets.push_back(u32(q, false));
        first = false;
        first_fragment = vend;
      } else {
        h_.fragments.push_back(Span{it.value, it.length});
        h_.fragment_positions.push_back(pos - first_fragment);
      }
      pos = vend;
    }
  }

  void set_top(const Element& el, size_t vend, Encoding enc) {
    const uint8_t* v = p_ + el.value;
    size_t len = vend - el.value;
    auto us = [&]() -> int { return len >= 2 ? u16(el.value, enc.big_endian) : 0; };
    auto str = [&]() { return trim(v, len); };
    switch (el.tag) {
      case 0x00280010u: h_.rows = us(); break;
      case 0x00280011u: h_.columns = us(); break;
      case 0x00280002u: h_.samples_per_pixel = us(); break;
      case 0x00280100u: h_.bits_allocated = us(); break;
      case 0x00280101u: h_.bits_stored = us(); break;
      case 0x00280102u: h_.high_bit = us(); break;
      case 0x00280103u: h_.pixel_representation = us(); break;
      case 0x00280006u: h_.planar_configuration = us(); break;
      case 0x00280008u: {
        // Checked before the cast: a double outside int64's range (or NaN) cast to an integer
        // is undefined behaviour, and no file holds 2^31 frames.
        auto nums = parse_numbers(str());
        if (nums.empty()) { h_.number_of_frames = 1; break; }
        if (!std::isfinite(nums[0]) || nums[0] >= 2147483648.0)
          throw Error(ErrorKind::Invalid, "Number of Frames '" + str() + "' is not a plausible frame count");
        h_.number_of_frames = nums[0] < 1 ? 1 : int64_t(nums[0]);
        break;
      }
      case 0x00280004u: h_.photometric = str(); break;
      case 0x00080060u: h_.modality = str(); break;
      case 0x00185101u: h_.view_position = str(); break;
      case 0x00100020u: h_.patient_id = str(); break;
      case 0x0020000Du: h_.study_uid = str(); break;
      case 0x0020000Eu: h_.series_uid = str(); break;
      case 0x00080018u: h_.sop_uid = str(); break;
      case 0x00281056u: h_.voi_function = str(); break;
      case 0x20500020u: h_.presentation_lut_shape = str(); break;
      case 0x00281054u: h_.rescale_type = str(); break;
      case 0x00281052u: {
        auto nums = parse_numbers(str());
        if (!nums.empty()) { h_.rescale_intercept = nums[0]; h_.has_rescale = true; }
        break;
      }
      case 0x00281053u: {
        auto nums = parse_numbers(str());
        if (!nums.empty()) { h_.rescale_slope = nums[0]; h_.has_rescale = true; }
        break;
      }
      case 0x00281050u: h_.window_centers = parse_numbers(str()); break;
      case 0x00281051u: h_.window_widths = parse_numbers(str()); break;
      case 0x00280030u: h_.pixel_spacing = parse_numbers(str()); break;
      case 0x00181164u:
        if (h_.pixel_spacing.empty()) h_.pixel_spacing = parse_numbers(str());
        break;
      case 0x7FE00001u:
        for (size_t q = el.value; q + 8 <= vend; q += 8)
          h_.extended_offsets.push_back(uint64_t(u32(q, enc.big_endian)) | uint64_t(u32(q + 4, enc.big_endian)) << 32);
        break;
      case 0x7FE00002u:
        for (size_t q = el.value; q + 8 <= vend; q += 8)
          h_.extended_lengths.push_back(uint64_t(u32(q, enc.big_endian)) | uint64_t(u32(q + 4, enc.big_endian)) << 32);
        break;
      default: break;
    }
  }

  // Parses the top-level data set in [pos, end).
  void parse_dataset(size_t pos, size_t end, Encoding enc, bool header_only) {
    Element el;
    while (next(pos, end, enc, el)) {
      if (el.tag == kPixelData || el.tag == kFloatPixelData || el.tag == kDoubleFloatPixelData) {
        h_.has_pixel_data = true;
        h_.float_bits = el.tag == kPixelData ? 0 : el.tag == kFloatPixelData ? 32 : 64;
        pixel_element_ = el.value;
        pixel_length_ = el.length;
        h_.pixel_declared = Span{el.value, el.length};
        if (header_only) return;
        if (h_.float_bits && el.length == kUndefined)
          throw Error(ErrorKind::Invalid, "Float Pixel Data of undefined length");
        parse_pixel_data(el, end, enc);
        if (el.length == kUndefined) return;
        pos = value_end(el, end);
        continue;
      }
      if (el.tag == kItemEnd || el.tag == kSeqEnd) {  // stray delimiters (seen in the wild)
        pos = el.value;
        continue;
      }
      if (el.tag == 0x00283000u || el.tag == 0x00283010u) {
        bool modality = el.tag == 0x00283000u;
        pos = parse_lut_sequence(el, end, enc, modality ? h_.modality_lut : h_.voi_lut,
                                 modality ? h_.has_modality_lut : h_.has_voi_lut);
        continue;
      }
      if (el.length == kUndefined) {
        Encoding inner = enc;
        if (el.vr[0] == 'U' && el.vr[1] == 'N') inner = Encoding{false, false};
        pos = skip_undefined(el.value, end, inner, 1);
        continue;
      }
      if (el.tag > kPixelData && (el.tag >> 16) >= 0xFFFA) {  // trailing padding / digital signatures
        pos = value_end(el, end);
        continue;
      }
      size_t vend = value_end(el, end);
      if ((el.tag >> 16) == 0x0028 || (el.tag >> 16) <= 0x0020 || el.tag == 0x20500020u || (el.tag >> 16) == 0x7FE0)
        set_top(el, vend, enc);
      pos = vend;
    }
  }

  // Parses group 0002 at pos (always explicit VR little endian); returns the position after it.
  size_t parse_file_meta(size_t pos) {
    Element el;
    Encoding enc{true, false};
    while (pos + 8 <= n_ && u16(pos, false) == 0x0002) {
      next(pos, n_, enc, el);
      if (el.length == kUndefined) throw Error(ErrorKind::Invalid, "undefined length in file meta information");
      size_t vend = value_end(el, n_);
      if (el.tag == 0x00020010u) h_.transfer_syntax = trim(p_ + el.value, el.length);
      pos = vend;
    }
    h_.has_file_meta = true;
    return pos;
  }

  const uint8_t* p_;
  size_t n_;
  Header& h_;
  size_t pixel_element_ = 0;     // where the value of the pixel data element starts
  uint32_t pixel_length_ = 0;    // its declared length (kUndefined when encapsulated)
};

namespace {

struct SyntaxInfo {
  const char* uid;
  bool explicit_vr, big_endian, deflated;
  Codec codec;
};

const SyntaxInfo kSyntaxes[] = {
    {"1.2.840.10008.1.2", false, false, false, Codec::Native},
    {"1.2.840.10008.1.2.1", true, false, false, Codec::Native},
    {"1.2.840.10008.1.2.1.99", true, false, true, Codec::Native},
    {"1.2.840.10008.1.2.2", true, true, false, Codec::Native},
    {"1.2.840.10008.1.2.5", true, false, false, Codec::Rle},
    {"1.2.840.10008.1.2.4.50", true, false, false, Codec::JpegBaseline},
    {"1.2.840.10008.1.2.4.51", true, false, false, Codec::JpegExtended},
    {"1.2.840.10008.1.2.4.57", true, false, false, Codec::JpegLossless},
    {"1.2.840.10008.1.2.4.70", true, false, false, Codec::JpegLossless},
    {"1.2.840.10008.1.2.4.80", true, false, false, Codec::JpegLs},
    {"1.2.840.10008.1.2.4.81", true, false, false, Codec::JpegLs},
    {"1.2.840.10008.1.2.4.90", true, false, false, Codec::Jpeg2000},
    {"1.2.840.10008.1.2.4.91", true, false, false, Codec::Jpeg2000},
    {"1.2.840.10008.1.2.4.201", true, false, false, Codec::Htj2k},
    {"1.2.840.10008.1.2.4.202", true, false, false, Codec::Htj2k},
    {"1.2.840.10008.1.2.4.203", true, false, false, Codec::Htj2k},
};

#ifndef CXRFAST_NO_ZLIB
// A raw deflate stream (PS3.5 A.5) inflated step by step, so the caller decides how far.
class Inflater {
 public:
  Inflater(const uint8_t* data, size_t size) {
    std::memset(&zs_, 0, sizeof zs_);
    if (inflateInit2(&zs_, -MAX_WBITS) != Z_OK) throw Error(ErrorKind::Invalid, "zlib init failed");
    zs_.next_in = const_cast<Bytef*>(data);
    zs_.avail_in = uInt(std::min<size_t>(size, 0x7FFFFFFF));
  }
  ~Inflater() { inflateEnd(&zs_); }
  Inflater(const Inflater&) = delete;
  Inflater& operator=(const Inflater&) = delete;

  // Inflates until size() >= n (or a little more) or the stream stops.
  void fill(size_t n) {
    while (!stopped_ && out_.size() < n) {
      size_t have = out_.size();
      size_t step = std::min<size_t>(std::max<size_t>(n - have, size_t(1) << 16), 0x40000000);
      out_.resize(have + step);
      zs_.next_out = out_.data() + have;
      zs_.avail_out = uInt(step);
      int rc = inflate(&zs_, Z_NO_FLUSH);
      out_.resize(have + (step - zs_.avail_out));
      if (rc == Z_STREAM_END) {
        stopped_ = complete_ = true;
      } else if (rc == Z_BUF_ERROR || (rc == Z_OK && zs_.avail_in == 0 && zs_.avail_out > 0)) {
        stopped_ = true;  // the input ended before the stream did: truncated
      } else if (rc != Z_OK) {
        throw Error(ErrorKind::Corrupt, "deflated data set is corrupt");
      }
    }
  }
  bool stopped() const { return stopped_; }
  bool complete() const { return complete_; }
  std::vector<uint8_t>& out() { return out_; }

 private:
  z_stream zs_;
  std::vector<uint8_t> out_;
  bool stopped_ = false, complete_ = false;
};
#endif

std::string mib(size_t n) { return std::to_string((n + (1u << 20) - 1) >> 20) + " MiB"; }

// Inflates a deflated data set no further than its parse needs, and parses it into h.
//
// The deflate-bomb rule: a deflated data set may inflate to at most
//   budget = 1 MiB + 16 x its compressed size      (all elements but the pixels: headers
//            compress far less than 16:1 unless padded on purpose)
//   + the pixel bytes its header declares         (Rows x Columns x Samples x Bits Allocated
//            x Frames / 8, and no more than the Pixel Data element's own length).
// Anything beyond is refused with an error before it is inflated. A header-only parse
// inflates only up to the Pixel Data element (in doubling steps, re-parsing the prefix).
std::vector<uint8_t> inflate_bounded(const uint8_t* data, size_t size, Encoding enc, bool header_only, Header& h) {
#ifdef CXRFAST_NO_ZLIB
  (void)data, (void)size, (void)enc, (void)header_only, (void)h;
  throw Error(ErrorKind::Unsupported, "deflated transfer syntax: this build of cxrfast has no zlib");
#else
  const size_t budget = (size_t(1) << 20) + 16 * std::min<size_t>(size, SIZE_MAX / 64);
  Inflater inf(data, size);
  const Header base = h;
  size_t pixel_at = 0;
  uint32_t pixel_length = 0;
  for (size_t want = size_t(1) << 16;; want *= 2) {
    inf.fill(std::min(want, budget + 1));
    Header trial = base;
    Parser p(inf.out().data(), inf.out().size(), trial);
    bool found = false;
    try {
      p.parse_dataset(0, inf.out().size(), enc, true);
      found = trial.has_pixel_data || inf.stopped();
    } catch (const Error& e) {
      if (e.kind != ErrorKind::Truncated || inf.stopped()) throw;
    }
    if (found) {
      h = trial;
      pixel_at = p.pixel_element_;
      pixel_length = p.pixel_length_;
      break;
    }
    if (inf.out().size() > budget)
      throw Error(ErrorKind::Invalid, "deflated data set inflates past " + mib(budget) +
                                          " before Pixel Data, more than a header needs (a deflate bomb?)");
  }
  if (header_only) return std::move(inf.out());
  if (!inf.complete() && h.has_pixel_data) {
    double declared = double(h.rows) * h.columns * std::max(h.samples_per_pixel, 1) *
                      std::max(h.bits_allocated, h.float_bits) * double(frame_count(h)) / 8.0;
    if (pixel_length != 0xFFFFFFFFu) declared = std::min(declared, double(pixel_length));
    size_t limit = pixel_at + size_t(std::min(declared, 0x1p62)) + budget;
    inf.fill(limit + 1);
    if (inf.out().size() > limit)
      throw Error(ErrorKind::Invalid, "deflated data set inflates past " + mib(limit) +
                                          ", more than its header declares (a deflate bomb?)");
  }
  if (!inf.complete()) throw Error(ErrorKind::Truncated, "deflated data set ends early");
  h = base;
  Parser inner(inf.out().data(), inf.out().size(), h);
  inner.parse_dataset(0, inf.out().size(), enc, false);
  return std::move(inf.out());
#endif
}

// Whether the first elements of d parse as a top-level data set in one encoding: a first
// group a data set begins with (even, 0002..0028: file meta, directory, identification such
// as 0008, patient, acquisition, image), strictly ascending tags in no illegal group, known
// VRs (explicit), lengths that stay inside the buffer (undefined only where the standard
// allows it). Four elements, or all of a shorter buffer, are enough.
bool plausible_walk(const uint8_t* d, size_t n, bool be, bool explicit_vr) {
  static const char* kVrs[] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT",
                               "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST",
                               "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"};
  auto u16 = [&](size_t at) { return be ? uint32_t(d[at]) << 8 | d[at + 1] : uint32_t(d[at + 1]) << 8 | d[at]; };
  auto u32 = [&](size_t at) { return be ? u16(at) << 16 | u16(at + 2) : u16(at + 2) << 16 | u16(at); };
  size_t pos = 0;
  uint32_t prev = 0;
  for (int seen = 0; seen < 4; ++seen) {
    if (pos == n && seen > 0) return true;
    if (n - pos < 8) return false;
    const uint32_t group = u16(pos), tag = group << 16 | u16(pos + 2);
    if (seen == 0 && (group % 2 || group < 0x0002 || group > 0x0028)) return false;
    if (seen > 0 && tag <= prev) return false;
    if (group == 0x0001 || group == 0x0003 || group == 0x0005 || group == 0x0007 || group >= 0xFFFE)
      return false;
    prev = tag;
    size_t head = 8;
    uint64_t length = u32(pos + 4);
    bool undefined_ok = true;  // implicit VR: a sequence may have undefined length
    if (explicit_vr) {
      const uint8_t* vr = d + pos + 4;
      bool known = false;
      for (const char* v : kVrs) known = known || (vr[0] == v[0] && vr[1] == v[1]);
      if (!known) return false;
      if (is_long_vr(vr)) {
        if (n - pos < 12) return false;
        head = 12;
        length = u32(pos + 8);
        undefined_ok = (vr[0] == 'S' && vr[1] == 'Q') || (vr[0] == 'U' && vr[1] == 'N') ||
                       (vr[0] == 'O' && (vr[1] == 'B' || vr[1] == 'W'));
      } else {
        length = u16(pos + 6);
        undefined_ok = false;
      }
    }
    if (length == kUndefined) return undefined_ok;  // cannot step over it without parsing items
    if (length > n - pos - head) return false;
    pos += head + size_t(length);
  }
  return true;
}

// A data set without preamble or file meta (readable per PS3.10 7.1 as a fallback) must
// begin like one in explicit VR little or big endian or implicit VR little endian; ZIP
// ("PK" is group 4B50), gzip, TIFF, NIfTI, PNG and text do not.
bool plausible_data_set(const uint8_t* d, size_t n) {
  return plausible_walk(d, n, false, true) || plausible_walk(d, n, true, true) || plausible_walk(d, n, false, false);
}

}  // namespace

Dataset Dataset::parse(const uint8_t* data, size_t size, bool header_only) {
  Dataset ds;
  ds.data_ = data;
  ds.size_ = size;
  Header& h = ds.header;
  Parser parser(data, size, h);
  size_t pos = 0;
  if (size >= 132 && std::memcmp(data + 128, "DICM", 4) == 0) {
    pos = parser.parse_file_meta(132);
  } else if (size >= 4 && std::memcmp(data, "DICM", 4) == 0) {
    pos = parser.parse_file_meta(4);
  } else if (size >= 8 && data[0] == 0x02 && data[1] == 0x00 && looks_like_vr(data + 4)) {
    pos = parser.parse_file_meta(0);
  }
  if (size < 8) throw Error(ErrorKind::Invalid, "not a DICOM file (only " + std::to_string(size) + " bytes)");
  if (!h.has_file_meta && !plausible_data_set(data, size))
    throw Error(ErrorKind::Invalid, "not a DICOM file (no DICM prefix, and the bytes do not begin a data set)");

  Encoding enc{false, false};
  if (!h.transfer_syntax.empty()) {
    const SyntaxInfo* info = nullptr;
    for (const auto& s : kSyntaxes)
      if (h.transfer_syntax == s.uid) info = &s;
    if (!info) {
      // Unknown syntaxes are encapsulated explicit VR LE (PS3.5 A.4) but we cannot decode them.
      h.codec = Codec::Native;
      enc = Encoding{true, false};
      h.explicit_vr = true;
      h.unknown_syntax = true;
    } else {
      enc = Encoding{info->explicit_vr, info->big_endian};
      h.deflated = info->deflated;
      h.codec = info->codec;
    }
  } else {
    // No file meta: implicit VR little endian unless the bytes show a VR (PS3.10 7.1).
    h.transfer_syntax = "1.2.840.10008.1.2";
    if (size >= pos + 8 && data[pos] == 0 && data[pos + 1] != 0 && looks_like_vr(data + pos + 4)) {
      enc = Encoding{true, true};  // a big-endian group number, then a VR
      h.transfer_syntax = "1.2.840.10008.1.2.2";
    } else if (size >= pos + 8 && looks_like_vr(data + pos + 4) && is_long_vr(data + pos + 4) == false &&
        parser.u16(pos + 6, false) < 0x1000 && data[pos + 4] != 0) {
      // A 2-byte length after a plausible VR: explicit VR little endian.
      const uint8_t* vr = data + pos + 4;
      static const char* kShort[] = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS",
                                     "LO", "LT", "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"};
      for (const char* s : kShort)
        if (vr[0] == s[0] && vr[1] == s[1]) {
          enc = Encoding{true, false};
          h.transfer_syntax = "1.2.840.10008.1.2.1";
        }
    }
  }
  h.explicit_vr = enc.explicit_vr;
  h.big_endian = enc.big_endian;

  if (h.deflated) {
    ds.inflated_ = inflate_bounded(data + pos, size - pos, enc, header_only, h);
  } else {
    parser.parse_dataset(pos, size, enc, header_only);
  }
  if (h.high_bit < 0 && h.bits_stored > 0) h.high_bit = h.bits_stored - 1;
  if (h.bits_stored == 0) h.bits_stored = h.bits_allocated;
  return ds;
}

int64_t frame_count(const Header& h) { return h.number_of_frames < 1 ? 1 : h.number_of_frames; }

FileBytes read_file(const std::string& path, size_t max_bytes) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error(ErrorKind::Io, std::string("cannot open file: ") + std::strerror(errno));
  FileBytes out;
  if (std::fseek(f, 0, SEEK_END) != 0 || std::ftell(f) < 0) {
    std::fclose(f);
    throw Error(ErrorKind::Io, "cannot read file (not seekable)");
  }
  out.length = size_t(std::ftell(f));
  out.whole = out.length <= max_bytes;
  out.length = std::min(out.length, max_bytes);
  std::rewind(f);
  out.bytes = allocate_buffer(out.length);
  size_t got = out.length ? std::fread(out.bytes.get(), 1, out.length, f) : 0;
  std::fclose(f);
  if (got != out.length) throw Error(ErrorKind::Io, "cannot read file");
  return out;
}

}  // namespace cxr
