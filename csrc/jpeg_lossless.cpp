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
#include <cstdint>
#include <cstring>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cxrdicom.h"
#include "scratch.h"
#include "thread_pool.h"

namespace cxr {
namespace {

constexpr int kLookup = 12;
// Below this many samples a second thread costs more than it saves.
constexpr size_t kParallelMinSamples = size_t(1) << 20;

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
        } else if (s == 16) {  // 32768, no extra bits
          t.fast[idx] = 32768u << 16 | uint32_t(l);
        } else if (l + s <= kLookup) {
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

// MSB-first bit reader over unstuffed data. The row loops copy it into a local (so that
// buf, cnt and p live in registers, not memory) and copy it back at the end of the row.
struct BitReader {
  const uint8_t* start;
  const uint8_t* p;
  uint64_t buf = 0;
  int cnt = 0;  // valid bits at the top of buf; the byte at p is next, at bit cnt
  explicit BitReader(const uint8_t* s) : start(s), p(s) {}
  inline void refill() {
    buf |= load_be64(p) >> cnt;
    p += (63 - cnt) >> 3;
    cnt |= 56;
  }
  size_t consumed_bits() const { return size_t(p - start) * 8 - size_t(cnt); }
};

// A sample the table does not finish: (difference mod 2^16) | (bits used << 16), from
// the top of buf (which holds at least 31 valid bits). Takes buf by value so that the
// caller's bit state stays in registers.
__attribute__((noinline)) uint32_t decode_slow(uint64_t buf, const HuffTable& t, uint32_t e) {
  int s, l;
  if (e & 0x8000u) {
    l = int(e & 0xFF);
    s = int(e >> 8) & 0x1F;
  } else {
    l = kLookup + 1;
    int32_t code = int32_t(buf >> (64 - l));
    while (l <= 16 && code > t.maxcode[l]) {
      ++l;
      code = int32_t(buf >> (64 - l));
    }
    if (l > 16) throw Error(ErrorKind::Corrupt, "invalid Huffman code in JPEG lossless scan");
    s = t.vals[t.valoffset[l] + code];
  }
  if (s == 0) return uint32_t(l) << 16;
  if (s == 16) return uint32_t(l) << 16 | 32768u;
  uint32_t v = uint32_t((buf << l) >> (64 - s));
  return uint32_t(l + s) << 16 | (uint32_t(extend(v, s)) & 0xFFFF);
}

// The hot path: decodes one difference per next() call. The table entry for the next
// sample is looked up from buf right after the shift, before the refill (the refill only
// adds bits below the at least 25 still valid), so the chain from one sample to the next
// is table load -> shift -> table load.
struct Decoder {
  BitReader br;
  const uint32_t* fast;
  const HuffTable* t;
  uint32_t e;
  Decoder(const BitReader& b, const HuffTable& table) : br(b), fast(table.fast), t(&table) {
    br.refill();
    e = fast[br.buf >> (64 - kLookup)];
  }
  inline uint32_t next() {
    uint32_t d, n;
    if (__builtin_expect((e & 0xFF00u) == 0, 1)) {
      d = e >> 16;
      n = e & 0xFF;
    } else {
      uint32_t r = decode_slow(br.buf, *t, e);
      d = r & 0xFFFF;
      n = r >> 16;
    }
    br.buf <<= n;
    br.cnt -= int(n);
    e = fast[br.buf >> (64 - kLookup)];
    br.refill();
    return d;
  }
};

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

// A whole row after the first of its restart interval: column 0 predicts from above,
// the rest with predictor P (no branch on P in the loop).
template <int P>
void normal_row(BitReader& br, const HuffTable& t, uint16_t* cur, const uint16_t* prev, int n) {
  Decoder dec(br, t);
  int ra = (prev[0] + int(dec.next())) & 0xFFFF;
  cur[0] = uint16_t(ra);
  for (int c = 1; c < n; ++c) {
    ra = (predict<P>(ra, prev[c], prev[c - 1]) + int(dec.next())) & 0xFFFF;
    cur[c] = uint16_t(ra);
  }
  br = dec.br;
}

// The first row of a restart interval (from column c0): the first sample predicts the
// constant 2^(P-Pt-1), the rest predict from the left.
void first_row(BitReader& br, const HuffTable& t, uint16_t* cur, int c0, int c1, int initial) {
  Decoder dec(br, t);
  int ra = initial;
  for (int c = c0; c < c1; ++c) {
    ra = (ra + int(dec.next())) & 0xFFFF;
    cur[c] = uint16_t(ra);
  }
  br = dec.br;
}

using RowFn = void (*)(BitReader&, const HuffTable&, uint16_t*, const uint16_t*, int);
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

// The entropy-coded bytes without byte stuffing and fill bytes, copied to out; at each marker,
// on_marker(output length so far, marker byte) says whether to go on past it (RSTn) or stop.
template <class OnMarker>
size_t unstuff_scan(const uint8_t* src, size_t n, uint8_t* out, OnMarker on_marker) {
  size_t o = 0, i = 0;
  while (i < n) {
    const void* hit = std::memchr(src + i, 0xFF, n - i);
    size_t j = hit ? size_t(static_cast<const uint8_t*>(hit) - src) : n;
    std::memcpy(out + o, src + i, j - i);
    o += j - i;
    if (j + 1 >= n) break;  // the end, or a lone 0xFF at the very end
    uint8_t m = src[j + 1];
    if (m == 0x00) {
      out[o++] = 0xFF;
      i = j + 2;
    } else if (m == 0xFF) {
      i = j + 1;  // fill byte
    } else if (on_marker(o, m)) {
      i = j + 2;
    } else {
      break;
    }
  }
  return o;
}

bool is_rst(uint8_t m) { return m >= 0xD0 && m <= 0xD7; }

// Copies the entropy-coded data without byte stuffing, split at RST markers; EOI or another
// marker ends the scan.
size_t unstuff(const uint8_t* src, size_t n, uint8_t* out, std::vector<Segment>& segs) {
  segs.push_back(Segment{0, 0, -1});
  const size_t o = unstuff_scan(src, n, out, [&](size_t at, uint8_t m) {
    if (!is_rst(m)) return false;
    segs.back().length = at - segs.back().start;
    segs.push_back(Segment{at, 0, m - 0xD0});
    return true;
  });
  segs.back().length = o - segs.back().start;
  return o;
}

// unstuff for one part of a scan split between two threads: the same bytes, but instead of
// segments, *first_marker is the output length at the first marker of any kind (SIZE_MAX
// when there is none). Allocates nothing.
size_t unstuff_part(const uint8_t* src, size_t n, uint8_t* out, size_t* first_marker) {
  *first_marker = SIZE_MAX;
  return unstuff_scan(src, n, out, [&](size_t at, uint8_t m) {
    if (*first_marker == SIZE_MAX) *first_marker = at;
    return is_rst(m);
  });
}

}  // namespace

JpegLosslessInfo jpeg_lossless_info(const uint8_t* src, size_t size) {
  Stream st;
  parse_markers(src, size, st, true);
  return st.info;
}

namespace {

// Everything one decode needs after the markers are parsed and the data unstuffed.
struct Job {
  const JpegLosslessInfo* info;
  const HuffTable* table;
  const uint8_t* data;  // unstuffed, padded by 4*W + 64 zero bytes
  const std::vector<Segment>* segs;
  uint16_t* out;
  int W, initial;
  size_t total, ri;
  RowFn row_fn;
};

// Decodes restart interval s (or the whole scan when there is none) into job.out.
void decode_interval(const Job& job, size_t s) {
  const Segment& seg = (*job.segs)[s];
  if (s > 0 && seg.rst != int((s - 1) & 7)) throw Error(ErrorKind::Corrupt, "JPEG restart markers out of order");
  const int W = job.W;
  BitReader br(job.data + seg.start);
  const size_t seg_bits = seg.length * 8;
  auto check = [&]() {
    if (br.consumed_bits() > seg_bits) throw Error(ErrorKind::Truncated, "JPEG lossless scan ends early");
  };
  size_t i = s * job.ri;
  const size_t end = std::min(job.total, i + job.ri);
  // The rest of the row where the interval starts predicts from the left.
  size_t row = i / size_t(W);
  int c0 = int(i % size_t(W));
  int c1 = int(std::min<size_t>(size_t(W), c0 + (end - i)));
  first_row(br, *job.table, job.out + row * W, c0, c1, job.initial);
  i += size_t(c1 - c0);
  while (i < end) {
    check();
    row = i / size_t(W);
    int n = int(std::min<size_t>(size_t(W), end - i));
    job.row_fn(br, *job.table, job.out + row * W, job.out + (row - 1) * W, n);
    i += size_t(n);
  }
  check();
}

// Runs f(0) on a new thread and f(1) here; returns false (nothing run) when no thread
// could be started. Exceptions of either are rethrown here after the join.
template <class F>
bool run_two(F&& f) {
  std::exception_ptr err[2];
  auto other = [&] {
    try {
      f(0);
    } catch (...) {
      err[0] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  if (start_threads(pool, 1, other) || pool.empty()) return false;
  try {
    f(1);
  } catch (...) {
    err[1] = std::current_exception();
  }
  pool[0].join();
  if (err[1]) std::rethrow_exception(err[1]);  // f(1) takes the earlier part: its error first,
  if (err[0]) std::rethrow_exception(err[0]);  // as in a serial decode
  return true;
}

// Restart intervals of whole rows are independent: two threads take one half each.
bool decode_intervals_two_threads(const Job& job, size_t nseg) {
  const size_t half = nseg / 2;
  return run_two([&](int t) {
    for (size_t s = t ? 0 : half; s < (t ? half : nseg); ++s) decode_interval(job, s);
  });
}

// ---- Speculative split of one entropy-coded segment (no restart markers) -----------------
//
// The scan's stored bytes are cut in two at a split point. Thread A unstuffs the first part,
// thread B the second (each into its own place in one buffer), so the unstuffing pass runs
// on both threads too. B then decodes differences from a bit of its part as if a symbol
// started there, and records where its first kPositions symbols start. Thread A decodes (and
// reconstructs) from the start; near its part's end it moves its last bytes up against B's
// part (one contiguous stream from there on) and decodes one sample at a time, comparing its
// symbol start positions with B's. A symbol's decoding depends only on its start position,
// so from the first position both share (the meet), B's differences are the true ones: A
// stops there and the rest is reconstructed from B's differences, by both threads for
// predictor 1. No meet, a failure of B, B short of symbols, or a marker in A's part: A
// decodes the rest itself, so the output and the errors are always those of the serial
// decode.
//
// Where the time goes (RG1, 3.6 MP): page faults cost as much as a third of the decode on a
// VM, so B's differences go to a cached Scratch buffer and B pre-faults the part of the output
// it will rebuild (MADV_POPULATE_WRITE, contents untouched) while A decodes; B stays alive for
// its share of the rebuild instead of a second thread being started.

constexpr size_t kPositions = 4096;
// Where B starts, as a fraction of the scan's bytes: A decodes and reconstructs, B only
// decodes but also pre-faults the output, and B rebuilds half of its part afterwards.
constexpr double kSplitFraction = 0.5;

// A's verdict for thread B once both have decoded: rebuild rows of the output or stop.
enum class Verdict { Pending, RebuildRows, Stop };

struct Speculation {
  // B's part: the stored scan bytes from `src_from` on, unstuffed to `data` (+ padding), and
  // the bit of its first byte where B starts decoding. Positions are bits from `data`.
  const uint8_t* src = nullptr;
  size_t src_from = 0, src_size = 0;
  uint8_t* data = nullptr;
  size_t pad = 0;
  unsigned first_bit = 0;
  size_t bytes = 0;  // B's unstuffed bytes up to the first marker (its part of the segment)
  bool unstuffed = false;  // B's part lies unstuffed at data
  uint16_t* diff = nullptr;             // B's differences, from its start (not zero-filled)
  size_t cap = 0;                       // room in diff
  std::vector<uint64_t> pos;            // start bit of B's first symbols
  size_t valid = 0;                     // B's symbols that end within its part
  std::atomic<int> positions_ready{0};  // B's part is unstuffed and pos complete (or B gave up)
  // B's pre-fault of the output from this sample on (an estimate of where its part begins).
  size_t prefault_from = 0;
  // Hand-over between the threads, under m: B done decoding; A's verdict and, for
  // RebuildRows, B's rows [rows_from, rows) of the predictor-1 region starting at sample k
  // whose differences start at d.
  std::mutex m;
  std::condition_variable cv;
  bool b_done = false;
  Verdict verdict = Verdict::Pending;
  size_t k = 0, rows_from = 0, rows = 0;
  const uint16_t* d = nullptr;

  void post(Verdict v) {
    {
      std::lock_guard<std::mutex> lock(m);
      verdict = v;
    }
    cv.notify_all();
  }
  void wait_b_done() {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return b_done; });
  }
};

// Pre-faults out[from, total) for writing without changing it (Linux 5.14+; elsewhere, or
// when the kernel refuses, the rebuild simply faults the pages itself).
void prefault_output(uint16_t* out, size_t from, size_t total) {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  const uintptr_t page = 4096;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(out + from) + page - 1) & ~(page - 1);
  const uintptr_t hi = reinterpret_cast<uintptr_t>(out + total) & ~(page - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
  (void)out, (void)from, (void)total;
#endif
}

// Thread B: unstuffs its part, then differences from its first bit until the part ends or
// `cap` symbols.
void speculate(const Job& job, Speculation& spec) {
  // As unstuff does, the data goes on past RST markers (a decoder that overruns the segment
  // reads what the serial decode reads there); the segment ends at the first marker.
  size_t first_marker = SIZE_MAX;
  const size_t used = unstuff_part(spec.src + spec.src_from, spec.src_size - spec.src_from, spec.data, &first_marker);
  std::memset(spec.data + used, 0, spec.pad);
  spec.bytes = std::min(used, first_marker);
  spec.unstuffed = true;
  const uint64_t seg_bits = uint64_t(spec.bytes) * 8;
  BitReader br(spec.data);
  br.refill();
  br.buf <<= spec.first_bit;
  br.cnt -= int(spec.first_bit);
  uint16_t* d = spec.diff;
  const size_t cap = spec.cap;
  size_t n = 0;
  bool ended = false;
  // Errors end B's count and nothing else: before the meet B may decode garbage, and at the
  // end of the scan it decodes the padding bits after the last sample.
  try {  // the first symbols one at a time, recording where each starts
    Decoder dec(br, *job.table);
    while (n < kPositions && n < cap) {
      spec.pos.push_back(dec.br.consumed_bits());
      d[n] = uint16_t(dec.next());
      br = dec.br;
      if (br.consumed_bits() > seg_bits) {
        ended = true;  // this symbol does not end within the part: not counted
        break;
      }
      ++n;
    }
  } catch (const Error&) {
    ended = true;
  }
  spec.positions_ready.store(1, std::memory_order_release);
  if (!ended) prefault_output(job.out, spec.prefault_from, job.total);
  // Then in chunks of W symbols (the padding covers one chunk past the end).
  const size_t chunk = size_t(job.W);
  while (!ended && n < cap && br.consumed_bits() <= seg_bits) {
    const BitReader saved = br;
    const size_t m = std::min(chunk, cap - n);
    try {
      Decoder dec(br, *job.table);
      for (size_t k = 0; k < m; ++k) d[n + k] = uint16_t(dec.next());
      if (dec.br.consumed_bits() <= seg_bits) {
        br = dec.br;
        n += m;
        continue;
      }
    } catch (const Error&) {
    }
    try {  // the chunk that crossed the end or failed: count its good symbols exactly
      Decoder one(saved, *job.table);
      while (one.br.consumed_bits() <= seg_bits) {
        one.next();
        if (one.br.consumed_bits() <= seg_bits) ++n;
      }
    } catch (const Error&) {
    }
    break;
  }
  spec.valid = n;  // symbols from B's start that end within its part
}

int predict_any(int p, int ra, int rb, int rc) {
  switch (p) {
    case 1: return predict<1>(ra, rb, rc);
    case 2: return predict<2>(ra, rb, rc);
    case 3: return predict<3>(ra, rb, rc);
    case 4: return predict<4>(ra, rb, rc);
    case 5: return predict<5>(ra, rb, rc);
    case 6: return predict<6>(ra, rb, rc);
    default: return predict<7>(ra, rb, rc);
  }
}

// The prediction for sample k of a scan without restart intervals.
inline int prediction_at(const Job& job, size_t k) {
  const size_t W = size_t(job.W);
  if (k == 0) return job.initial;
  const uint16_t* o = job.out;
  if (k < W) return o[k - 1];
  if (k % W == 0) return o[k - W];
  return predict_any(job.info->predictor, o[k - 1], o[k - W], o[k - W - 1]);
}

// Reconstructs samples [k, total) from their differences d[0..].
template <int P>
void reconstruct(const Job& job, size_t k, const uint16_t* d) {
  const size_t W = size_t(job.W);
  uint16_t* o = job.out;
  for (; k < job.total && (k % W != 0 || k < W); ++k, ++d) o[k] = uint16_t(prediction_at(job, k) + *d);
  for (; k < job.total; k += W, d += W) {
    uint16_t* cur = o + k;
    const uint16_t* prev = cur - W;
    int ra = (prev[0] + d[0]) & 0xFFFF;
    cur[0] = uint16_t(ra);
    for (size_t c = 1; c < W; ++c) {
      ra = (predict<P>(ra, prev[c], prev[c - 1]) + d[c]) & 0xFFFF;
      cur[c] = uint16_t(ra);
    }
  }
}

using ReconFn = void (*)(const Job&, size_t, const uint16_t*);
const ReconFn kRecon[8] = {nullptr, reconstruct<1>, reconstruct<2>, reconstruct<3>, reconstruct<4>,
                           reconstruct<5>, reconstruct<6>, reconstruct<7>};

// Rows [r0, r1) of a predictor-1 region: row r starts at out[k + r*W], its differences at
// d[r*W]. A row's first sample adds to the first sample of the row above, so a thread that
// starts at row r0 first sums the column-0 differences of the rows before it (one strided
// read a row); the rest of each row is a running sum (16-bit: wraps modulo 2^16 as T.81 asks).
void rebuild_left_rows(uint16_t* out, size_t W, size_t k, const uint16_t* d, size_t r0, size_t r1) {
  if (r1 <= r0) return;
  uint16_t first = out[k - W];
  for (size_t r = 0; r < r0; ++r) first = uint16_t(first + d[r * W]);
  for (size_t r = r0; r < r1; ++r) {
    uint16_t* cur = out + k + r * W;
    const uint16_t* dr = d + r * W;
    uint16_t ra = uint16_t(first + dr[0]);
    first = ra;
    cur[0] = ra;
    for (size_t c = 1; c < W; ++c) {
      ra = uint16_t(ra + dr[c]);
      cur[c] = ra;
    }
  }
}

// Thread A's serial decode from sample k (row-aligned or not) to the end.
void finish_serial(const Job& job, BitReader& br, size_t k) {
  const Segment& seg = (*job.segs)[0];
  const size_t W = size_t(job.W), seg_bits = seg.length * 8;
  {
    Decoder dec(br, *job.table);
    for (; k < job.total && (k % W != 0 || k < W); ++k) job.out[k] = uint16_t(prediction_at(job, k) + dec.next());
    br = dec.br;
  }
  for (; k < job.total; k += W) {
    if (br.consumed_bits() > seg_bits) throw Error(ErrorKind::Truncated, "JPEG lossless scan ends early");
    job.row_fn(br, *job.table, job.out + k, job.out + k - W, int(W));
  }
  if (br.consumed_bits() > seg_bits) throw Error(ErrorKind::Truncated, "JPEG lossless scan ends early");
}

// Thread A: unstuffs its part to job.data, decodes whole rows while they stay inside it,
// joins its tail to B's part, then goes sample by sample until it meets B's positions; the
// rest comes from B's differences, or from A's own decode when they do not meet. Returns
// whether they met; posts its verdict to B on every path (B waits for it).
bool decode_leading(const Job& job, Speculation& spec) {
  struct PostStop {  // an exception (or early return) still releases B
    Speculation& s;
    ~PostStop() {
      if (s.verdict == Verdict::Pending) s.post(Verdict::Stop);
    }
  } guard{spec};
  uint8_t* const data = const_cast<uint8_t*>(job.data);
  size_t first_marker = SIZE_MAX;
  const size_t own = unstuff_part(spec.src, spec.src_from, data, &first_marker);
  const size_t W = size_t(job.W);
  auto serial = [&] {  // the whole scan unstuffed and decoded as one thread does, once B is off the buffer
    spec.post(Verdict::Stop);
    spec.wait_b_done();
    std::vector<Segment> segs;
    const size_t used = unstuff(spec.src, spec.src_size, data, segs);
    std::memset(data + used, 0, spec.src_size + spec.pad - used);
    Job one = job;
    one.segs = &segs;
    decode_interval(one, 0);
    return false;
  };
  if (first_marker != SIZE_MAX) return serial();  // the segment ends (or breaks) in A's part
  BitReader br(data);
  size_t k = 0;
  // Whole rows while a row (at most 31*W bits) and its refills cannot leave A's bytes.
  const size_t row_bytes = (31 * W + 7) / 8 + 16;
  while (k + W < job.total && size_t(br.p - data) + row_bytes <= own) {
    if (k == 0) {
      first_row(br, *job.table, job.out, 0, int(W), job.initial);
    } else {
      job.row_fn(br, *job.table, job.out + k, job.out + k - W, int(W));
    }
    k += W;
  }
  while (!spec.positions_ready.load(std::memory_order_acquire)) std::this_thread::yield();
  if (!spec.unstuffed) return serial();
  // B's part now lies unstuffed at spec.data: move A's bytes not yet read up against it (A's
  // bit positions stay as they were) and drop the bits the reader loaded beyond A's bytes.
  const size_t gap = size_t(spec.data - data) - own, at_byte = size_t(br.p - data);
  std::memmove(data + at_byte + gap, data + at_byte, own - at_byte);
  br.p += gap;
  br.start += gap;
  br.buf = br.cnt ? br.buf & ~(~uint64_t(0) >> br.cnt) : 0;
  // A's view of the whole segment, and where B's positions lie in it.
  std::vector<Segment> segs{Segment{0, own + spec.bytes, -1}};
  Job whole = job;
  whole.segs = &segs;
  const uint64_t seg_bits = uint64_t(own + spec.bytes) * 8, b_base = uint64_t(own) * 8;
  const std::vector<uint64_t>& pos = spec.pos;
  size_t j = 0;
  bool met = false;
  {
    Decoder dec(br, *job.table);
    while (k < job.total && !pos.empty()) {
      const uint64_t at = dec.br.consumed_bits();
      if (at > b_base + pos.back() || at > seg_bits) break;
      while (j < pos.size() && b_base + pos[j] < at) ++j;
      if (j < pos.size() && b_base + pos[j] == at) {
        met = true;
        break;
      }
      job.out[k] = uint16_t(prediction_at(job, k) + dec.next());
      ++k;
    }
    br = dec.br;
  }
  spec.wait_b_done();  // B's differences and count are final
  if (!(met && spec.valid >= j && spec.valid - j >= job.total - k)) {
    spec.post(Verdict::Stop);
    finish_serial(whole, br, k);
    return false;
  }
  const uint16_t* d = spec.diff + j;
  if (job.info->predictor != 1) {
    spec.post(Verdict::Stop);
    kRecon[job.info->predictor](job, k, d);
    return true;
  }
  // The rest of the meeting row (or the first row) here, then the whole rows: B takes the
  // second half.
  for (; k < job.total && (k % W != 0 || k < W); ++k, ++d) job.out[k] = uint16_t(prediction_at(job, k) + *d);
  const size_t rows = k < job.total ? (job.total - k) / W : 0;
  const size_t half = rows / 2;
  {
    std::lock_guard<std::mutex> lock(spec.m);
    spec.k = k;
    spec.d = d;
    spec.rows_from = half;
    spec.rows = rows;
    spec.verdict = Verdict::RebuildRows;
  }
  spec.cv.notify_all();
  rebuild_left_rows(job.out, W, k, d, 0, half);
  return true;
}

// Thread B's life: unstuff and decode from the split, hand over, then its rows of the
// rebuild if asked.
void run_trailing(const Job& job, Speculation& spec) {
  try {
    speculate(job, spec);
  } catch (...) {  // cannot happen (pos has its room), but B must never leave A waiting
    spec.valid = 0;
  }
  spec.positions_ready.store(1, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(spec.m);
    spec.b_done = true;
  }
  spec.cv.notify_all();
  std::unique_lock<std::mutex> lock(spec.m);
  spec.cv.wait(lock, [&] { return spec.verdict != Verdict::Pending; });
  if (spec.verdict != Verdict::RebuildRows) return;
  const size_t k = spec.k, r0 = spec.rows_from, r1 = spec.rows;
  const uint16_t* d = spec.d;
  lock.unlock();
  rebuild_left_rows(job.out, size_t(job.W), k, d, r0, r1);
}

// Two threads on a scan of one segment, B starting at bit `split_bit` of the stored scan
// bytes (st.scan); job.data has room for the scan and `pad`. Returns JpegLosslessInfo::split
// (0: the second thread could not be started, nothing done).
int decode_speculative(const Job& job, const Stream& st, size_t pad, uint64_t split_bit) {
  Speculation spec;
  // B's part starts at a byte boundary outside any 0xFF pair or run: a byte after 0xFF is
  // stuffing or a marker, and belongs with the 0xFF to A's part.
  size_t from = size_t(split_bit / 8);
  while (from > 0 && from < st.scan_size && st.scan[from - 1] == 0xFF) ++from;
  spec.src = st.scan;
  spec.src_from = from;
  spec.src_size = st.scan_size;
  spec.data = const_cast<uint8_t*>(job.data) + from;  // A's unstuffed part is at most `from` bytes
  spec.pad = pad;
  spec.first_bit = unsigned(split_bit % 8);
  spec.pos.reserve(kPositions);
  Scratch diff(job.total * sizeof(uint16_t));
  spec.diff = reinterpret_cast<uint16_t*>(diff.data());
  spec.cap = job.total;
  // B's part of the output begins near the same fraction of the samples; a little later, so
  // that A's pages are A's to fault.
  const double fraction = double(from) / double(st.scan_size);
  spec.prefault_from = std::min(job.total, size_t(double(job.total) * (fraction + 0.01)));
  auto b = [&] { run_trailing(job, spec); };
  std::vector<std::thread> pool;
  if (start_threads(pool, 1, b) || pool.empty()) return 0;
  bool met = false;
  try {
    met = decode_leading(job, spec);
  } catch (...) {
    pool[0].join();
    throw;
  }
  pool[0].join();
  return met ? 2 : 3;
}

}  // namespace

JpegLosslessInfo jpeg_lossless_decode(const uint8_t* src, size_t size, uint16_t* out, size_t out_capacity,
                                      int threads, int64_t split_bit) {
  auto st = std::make_unique<Stream>();
  parse_markers(src, size, *st, false);
  JpegLosslessInfo& info = st->info;
  const HuffTable& table = st->tables[st->table_id];
  if (!table.defined) throw Error(ErrorKind::Corrupt, "JPEG scan uses an undefined Huffman table");
  const int W = info.width, H = info.height;
  const size_t total = size_t(W) * size_t(H);
  if (total > out_capacity) throw Error(ErrorKind::Invalid, "JPEG frame larger than the output buffer");

  const size_t pad = size_t(W) * 4 + 64;
  // Not zero-initialised (a pass over megabytes): unstuff writes the data, then the tail is cleared.
  const size_t data_size = st->scan_size + pad;
  Scratch data(data_size);
  const size_t ri = info.restart_interval > 0 ? size_t(info.restart_interval) : total;
  const size_t nseg = (total + ri - 1) / ri;
  std::vector<Segment> segs;
  Job job{&info, &table, data.data(), &segs, out, W, 1 << (info.precision - info.point_transform - 1), total, ri,
          kRows[info.predictor]};
  const bool large = split_bit >= 0 || total >= kParallelMinSamples;

  if (threads >= 2 && nseg == 1 && large) {  // unstuffed by the two threads themselves
    const uint64_t bits = uint64_t(st->scan_size) * 8;
    const uint64_t at = split_bit >= 0 ? uint64_t(split_bit) : uint64_t(double(bits) * kSplitFraction) / 8 * 8;
    if (at < bits) info.split = decode_speculative(job, *st, pad, at);
  }
  if (info.split == 0) {
    const size_t used = unstuff(st->scan, st->scan_size, data.data(), segs);
    std::memset(data.data() + used, 0, data_size - used);
    if (segs.size() < nseg) throw Error(ErrorKind::Truncated, "JPEG scan ends after " + std::to_string(segs.size()) + " of " + std::to_string(nseg) + " restart intervals");
    if (threads >= 2 && nseg >= 2 && ri % size_t(W) == 0 && large)
      info.split = decode_intervals_two_threads(job, nseg) ? 1 : 0;
    if (info.split == 0)
      for (size_t s = 0; s < nseg; ++s) decode_interval(job, s);
  }
  if (info.point_transform > 0) {
    for (size_t k = 0; k < total; ++k) out[k] = uint16_t(out[k] << info.point_transform);
  }
  return info;
}

}  // namespace cxr
