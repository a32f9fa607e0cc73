// JPEG lossless, process 14 (ITU T.81 Annex H, SOF3), single component.
//
// Design (see shared/docs/fast-lossless-jpeg.md):
// - an unstuffing pre-pass copies the entropy-coded data without 0xFF00 stuffing, splitting
//   it at RSTn markers, so the bit reader never sees a marker;
// - a 64-bit MSB-first bit buffer with a branch-free refill (one refill per sample: a
//   sample needs at most 16 + 15 bits and a refill leaves at least 56);
// - a 12-bit combined table: one lookup yields code + extra bits + difference for 97-99%
//   of samples; longer codes go to a canonical slow path;
// - one fused loop per predictor (template), writing reconstructed samples modulo 2^16;
// - bounds: the buffer is padded by 4*width + 64 zero bytes and the consumed bit count is
//   checked before every row, so corrupt data cannot read past the allocation; a stream
//   that runs out of bits raises Truncated.
// Limits: one component (others go to a codec library), precision 2-16, any restart interval.
#include <cstring>

#include "cxrdicom.h"

namespace cxr {
namespace {

constexpr int kLookup = 12;

struct HuffTable {
  bool defined = false;
  // Entry: bits 0-7 length consumed, bits 8-15 kind (0 complete, 0x80|ssss code only,
  // 0x40 longer than kLookup bits or invalid), bits 16-31 difference modulo 2^16.
  uint32_t fast[1 << kLookup];
  int32_t maxcode[18];
  int32_t valoffset[18];
  uint8_t vals[256];
};

inline int extend(uint32_t v, int s) {  // T.81 F.2.2.1 EXTEND
  return v < (1u << (s - 1)) ? int(v) - (1 << s) + 1 : int(v);
}

void build_table(HuffTable& t, const uint8_t* counts, const uint8_t* symbols, int nsym) {
  int code = 0, k = 0;
  for (int l = 1; l <= 16; ++l) {
    t.valoffset[l] = k - code;
    for (int i = 0; i < counts[l - 1]; ++i) {
      int s = symbols[k];
      if (s > 16) throw Error(ErrorKind::Corrupt, "Huffman table has a difference category above 16");
      t.vals[k] = uint8_t(s);
      ++k;
      ++code;
    }
    if (code > (1 << l)) throw Error(ErrorKind::Corrupt, "Huffman table is over-subscribed");
    t.maxcode[l] = counts[l - 1] ? code - 1 : -1;
    code <<= 1;
  }
  t.maxcode[17] = 0x7FFFFFFF;
  if (k != nsym) throw Error(ErrorKind::Corrupt, "Huffman table symbol count mismatch");
  for (auto& e : t.fast) e = 0x4000u;
  code = 0;
  k = 0;
  for (int l = 1; l <= 16; ++l) {
    for (int i = 0; i < counts[l - 1]; ++i, ++k, ++code) {
      if (l > kLookup) continue;
      int s = t.vals[k];
      int fill = kLookup - l;
      for (int f = 0; f < (1 << fill); ++f) {
        uint32_t idx = uint32_t(code << fill) | uint32_t(f);
        if (s == 0) {
          t.fast[idx] = uint32_t(l);
        } else if (s < 16 && l + s <= kLookup) {
          uint32_t v = (uint32_t(f) >> (fill - s)) & ((1u << s) - 1);
          t.fast[idx] = uint32_t(uint16_t(extend(v, s))) << 16 | uint32_t(l + s);
        } else {
          t.fast[idx] = uint32_t(0x80 | s) << 8 | uint32_t(l);
        }
      }
    }
    code <<= 1;
  }
  t.defined = true;
}

inline uint64_t load_be64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}

struct BitReader {
  const uint8_t* start;
  const uint8_t* p;
  uint64_t buf = 0;
  int cnt = 0;
  explicit BitReader(const uint8_t* s) : start(s), p(s) {}
  inline void refill() {
    buf |= load_be64(p) >> cnt;
    p += (63 - cnt) >> 3;
    cnt |= 56;
  }
  inline void consume(int n) {
    buf <<= n;
    cnt -= n;
  }
  size_t consumed_bits() const { return size_t(p - start) * 8 - size_t(cnt); }
};

// Decodes one difference (mod 2^16). The caller has refilled.
__attribute__((noinline)) uint32_t decode_slow(BitReader& br, const HuffTable& t, uint32_t e) {
  int s;
  if (e & 0x8000u) {
    br.consume(int(e & 0xFF));
    s = int(e >> 8) & 0x1F;
  } else {
    int l = kLookup + 1;
    int32_t code = int32_t(br.buf >> (64 - l));
    while (l <= 16 && code > t.maxcode[l]) {
      ++l;
      code = int32_t(br.buf >> (64 - l));
    }
    if (l > 16) throw Error(ErrorKind::Corrupt, "invalid Huffman code in JPEG lossless scan");
    br.consume(l);
    s = t.vals[t.valoffset[l] + code];
  }
  if (s == 0) return 0;
  if (s == 16) return 32768;
  uint32_t v = uint32_t(br.buf >> (64 - s));
  br.consume(s);
  return uint32_t(extend(v, s)) & 0xFFFF;
}

inline uint32_t decode_diff(BitReader& br, const HuffTable& t) {
  br.refill();
  uint32_t e = t.fast[br.buf >> (64 - kLookup)];
  if (__builtin_expect((e & 0xFF00u) == 0, 1)) {
    br.consume(int(e & 0xFF));
    return e >> 16;
  }
  return decode_slow(br, t, e);
}

template <int P>
inline int predict(int ra, int rb, int rc) {
  if constexpr (P == 1) return ra;
  if constexpr (P == 2) return rb;
  if constexpr (P == 3) return rc;
  if constexpr (P == 4) return ra + rb - rc;
  if constexpr (P == 5) return ra + ((rb - rc) >> 1);
  if constexpr (P == 6) return rb + ((ra - rc) >> 1);
  if constexpr (P == 7) return (ra + rb) >> 1;
  return 0;
}

// A row after the first of its restart interval: column 0 predicts from above.
template <int P>
void normal_row(BitReader& br, const HuffTable& t, uint16_t* cur, const uint16_t* prev, int c0, int c1) {
  int c = c0;
  if (c == 0 && c1 > 0) {
    cur[0] = uint16_t(prev[0] + decode_diff(br, t));
    c = 1;
  }
  int ra = c > 0 ? cur[c - 1] : 0;
  for (; c < c1; ++c) {
    int v = (predict<P>(ra, prev[c], prev[c - 1]) + int(decode_diff(br, t))) & 0xFFFF;
    cur[c] = uint16_t(v);
    ra = v;
  }
}

// The first row of a restart interval (from column c0): the first sample predicts the
// constant 2^(P-Pt-1), the rest predict from the left.
void first_row(BitReader& br, const HuffTable& t, uint16_t* cur, int c0, int c1, int initial) {
  int ra = initial;
  for (int c = c0; c < c1; ++c) {
    ra = (ra + int(decode_diff(br, t))) & 0xFFFF;
    cur[c] = uint16_t(ra);
  }
}

using RowFn = void (*)(BitReader&, const HuffTable&, uint16_t*, const uint16_t*, int, int);
const RowFn kRows[8] = {nullptr, normal_row<1>, normal_row<2>, normal_row<3>, normal_row<4>,
                        normal_row<5>, normal_row<6>, normal_row<7>};

struct Segment {
  size_t start = 0, length = 0;
  int rst = -1;  // the RST marker number that ended the previous segment
};

struct Stream {
  JpegLosslessInfo info;
  HuffTable tables[4];
  int table_id = 0;
  const uint8_t* scan = nullptr;  // entropy-coded data after the SOS header
  size_t scan_size = 0;
};

uint16_t be16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }

// Parses markers up to the first scan (or only to SOF when only_frame).
void parse_markers(const uint8_t* src, size_t n, Stream& st, bool only_frame) {
  if (n < 4 || src[0] != 0xFF || src[1] != 0xD8) throw Error(ErrorKind::Corrupt, "JPEG stream does not start with SOI");
  size_t pos = 2;
  bool have_sof = false;
  while (true) {
    if (pos >= n) throw Error(ErrorKind::Truncated, "JPEG stream ends before its scan");
    if (src[pos] != 0xFF) throw Error(ErrorKind::Corrupt, "JPEG marker expected");
    while (pos < n && src[pos] == 0xFF) ++pos;
    if (pos >= n) throw Error(ErrorKind::Truncated, "JPEG stream ends before its scan");
    uint8_t m = src[pos++];
    if (m == 0xD9) throw Error(ErrorKind::Corrupt, "JPEG stream has no scan");
    if (m == 0x01 || (m >= 0xD0 && m <= 0xD7)) continue;
    if (pos + 2 > n) throw Error(ErrorKind::Truncated, "JPEG marker segment ends early");
    size_t len = be16(src + pos);
    if (len < 2 || pos + len > n) throw Error(ErrorKind::Truncated, "JPEG marker segment ends early");
    const uint8_t* seg = src + pos + 2;
    size_t slen = len - 2;
    if (m == 0xC3) {
      if (slen < 6) throw Error(ErrorKind::Corrupt, "short SOF3 segment");
      st.info.precision = seg[0];
      st.info.height = be16(seg + 1);
      st.info.width = be16(seg + 3);
      st.info.components = seg[5];
      if (slen < size_t(6 + 3 * st.info.components)) throw Error(ErrorKind::Corrupt, "short SOF3 segment");
      if (st.info.precision < 2 || st.info.precision > 16) throw Error(ErrorKind::Corrupt, "JPEG lossless precision " + std::to_string(st.info.precision));
      if (st.info.height == 0) throw Error(ErrorKind::Unsupported, "JPEG with height defined by DNL");
      if (st.info.width == 0) throw Error(ErrorKind::Corrupt, "JPEG width 0");
      have_sof = true;
      if (only_frame) return;
    } else if ((m >= 0xC0 && m <= 0xCF) && m != 0xC4 && m != 0xC8 && m != 0xCC) {
      throw Error(ErrorKind::NeedsCodec, "jpeg_not_lossless");
    } else if (m == 0xC4) {
      size_t q = 0;
      while (q < slen) {
        if (q + 17 > slen) throw Error(ErrorKind::Corrupt, "short DHT segment");
        int tc_th = seg[q];
        int th = tc_th & 0x0F;
        if (th > 3) throw Error(ErrorKind::Corrupt, "DHT table id above 3");
        int total = 0;
        for (int i = 0; i < 16; ++i) total += seg[q + 1 + i];
        if (total > 256 || q + 17 + size_t(total) > slen) throw Error(ErrorKind::Corrupt, "bad DHT segment");
        if ((tc_th >> 4) == 0) build_table(st.tables[th], seg + q + 1, seg + q + 17, total);
        q += 17 + size_t(total);
      }
    } else if (m == 0xDD) {
      if (slen < 2) throw Error(ErrorKind::Corrupt, "short DRI segment");
      st.info.restart_interval = be16(seg);
    } else if (m == 0xDA) {
      if (!have_sof) throw Error(ErrorKind::Corrupt, "JPEG scan before its frame header");
      if (slen < 1) throw Error(ErrorKind::Corrupt, "short SOS segment");
      int ns = seg[0];
      if (slen < size_t(4 + 2 * ns)) throw Error(ErrorKind::Corrupt, "short SOS segment");
      if (ns != 1 || st.info.components != 1) throw Error(ErrorKind::NeedsCodec, "jpeg_lossless_multicomponent");
      st.table_id = seg[2] >> 4;
      if (st.table_id > 3) throw Error(ErrorKind::Corrupt, "SOS table id above 3");
      st.info.predictor = seg[1 + 2 * ns];
      st.info.point_transform = seg[3 + 2 * ns] & 0x0F;
      if (st.info.predictor < 1 || st.info.predictor > 7) throw Error(ErrorKind::Corrupt, "JPEG lossless predictor " + std::to_string(st.info.predictor));
      if (st.info.point_transform >= st.info.precision) throw Error(ErrorKind::Corrupt, "point transform not below precision");
      st.scan = src + pos + len;
      st.scan_size = n - (pos + len);
      return;
    }
    pos += len;
  }
}

// Copies the entropy-coded data without byte stuffing, split at RST markers.
size_t unstuff(const uint8_t* src, size_t n, uint8_t* out, std::vector<Segment>& segs) {
  size_t o = 0, i = 0;
  segs.push_back(Segment{0, 0, -1});
  while (i < n) {
    const void* hit = std::memchr(src + i, 0xFF, n - i);
    size_t j = hit ? size_t(static_cast<const uint8_t*>(hit) - src) : n;
    std::memcpy(out + o, src + i, j - i);
    o += j - i;
    if (j >= n) break;
    if (j + 1 >= n) break;  // a lone 0xFF at the very end
    uint8_t m = src[j + 1];
    if (m == 0x00) {
      out[o++] = 0xFF;
      i = j + 2;
    } else if (m == 0xFF) {
      i = j + 1;  // fill byte
    } else if (m >= 0xD0 && m <= 0xD7) {
      segs.back().length = o - segs.back().start;
      segs.push_back(Segment{o, 0, m - 0xD0});
      i = j + 2;
    } else {
      break;  // EOI or another marker ends the scan
    }
  }
  segs.back().length = o - segs.back().start;
  return o;
}

}  // namespace

JpegLosslessInfo jpeg_lossless_info(const uint8_t* src, size_t size) {
  Stream st;
  parse_markers(src, size, st, true);
  return st.info;
}

JpegLosslessInfo jpeg_lossless_decode(const uint8_t* src, size_t size, uint16_t* out, size_t out_capacity) {
  auto st = std::make_unique<Stream>();
  parse_markers(src, size, *st, false);
  const JpegLosslessInfo& info = st->info;
  const HuffTable& table = st->tables[st->table_id];
  if (!table.defined) throw Error(ErrorKind::Corrupt, "JPEG scan uses an undefined Huffman table");
  const int W = info.width, H = info.height;
  const size_t total = size_t(W) * size_t(H);
  if (total > out_capacity) throw Error(ErrorKind::Invalid, "JPEG frame larger than the output buffer");

  const size_t pad = size_t(W) * 4 + 64;
  std::vector<uint8_t> data(st->scan_size + pad);
  std::vector<Segment> segs;
  unstuff(st->scan, st->scan_size, data.data(), segs);
  std::memset(data.data() + segs.back().start + segs.back().length, 0, data.size() - (segs.back().start + segs.back().length));

  const size_t ri = info.restart_interval > 0 ? size_t(info.restart_interval) : total;
  const size_t nseg = (total + ri - 1) / ri;
  if (segs.size() < nseg) throw Error(ErrorKind::Truncated, "JPEG scan ends after " + std::to_string(segs.size()) + " of " + std::to_string(nseg) + " restart intervals");
  const int initial = 1 << (info.precision - info.point_transform - 1);
  RowFn row_fn = kRows[info.predictor];

  for (size_t s = 0; s < nseg; ++s) {
    const Segment& seg = segs[s];
    if (s > 0 && seg.rst != int((s - 1) & 7)) throw Error(ErrorKind::Corrupt, "JPEG restart markers out of order");
    BitReader br(data.data() + seg.start);
    const size_t seg_bits = seg.length * 8;
    auto check = [&]() {
      if (br.consumed_bits() > seg_bits) throw Error(ErrorKind::Truncated, "JPEG lossless scan ends early");
    };
    size_t i = s * ri;
    const size_t end = std::min(total, i + ri);
    // The rest of the row where the interval starts predicts from the left.
    size_t row = i / size_t(W);
    int c0 = int(i % size_t(W));
    int c1 = int(std::min<size_t>(size_t(W), c0 + (end - i)));
    first_row(br, table, out + row * W, c0, c1, initial);
    i += size_t(c1 - c0);
    while (i < end) {
      check();
      row = i / size_t(W);
      int n = int(std::min<size_t>(size_t(W), end - i));
      row_fn(br, table, out + row * W, out + (row - 1) * W, 0, n);
      i += size_t(n);
    }
    check();
  }
  if (info.point_transform > 0) {
    for (size_t k = 0; k < total; ++k) out[k] = uint16_t(out[k] << info.point_transform);
  }
  return info;
}

}  // namespace cxr
