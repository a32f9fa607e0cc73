// Stored values -> output, in one pass: mask / sign-extend (PS3.5 8.1.1) -> Modality LUT
// (PS3.3 C.11.1) -> VOI (C.11.2: LINEAR, LINEAR_EXACT, SIGMOID, VOI LUT Sequence, or the
// data's min/max) -> MONOCHROME1 / Presentation LUT INVERSE (C.11.6), inverted after VOI
// against the output range -> optional antialiased resize -> uint8 / uint16 / float32.
//
// Header values are checked before use: a non-finite (NaN, inf) Rescale Slope, Rescale
// Intercept, Window Center or Window Width is ignored like an absent one (slope 1, intercept
// 0, no window -> the LUT or the min/max window), and a rescale that maps the stored range
// beyond float32 is an error. Every float -> integer conversion below is range-checked first.
//
// For Bits Stored <= 16 the whole chain up to the output type is one lookup table indexed by
// the stored bits, so the per-pixel work is a load, a mask and a table read.
#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cxrdicom.h"

namespace cxr {
namespace {

struct Shape {
  int frames, rows, cols, samples;
  size_t pixels() const { return size_t(rows) * cols * samples; }
};

struct StoredBits {
  int shift = 0;
  int bits = 16;
  bool is_signed = false;
  uint32_t mask = 0xFFFF;
  int64_t value(uint32_t raw) const {
    uint32_t v = (raw >> shift) & mask;
    if (is_signed && bits < 64 && (v >> (bits - 1)) & 1u) return int64_t(v) - (int64_t(1) << bits);
    return int64_t(v);
  }
};

StoredBits stored_bits(const Header& h) {
  StoredBits sb;
  sb.bits = std::clamp(h.bits_stored, 1, 32);
  sb.is_signed = h.pixel_representation == 1;
  sb.mask = sb.bits >= 32 ? 0xFFFFFFFFu : (1u << sb.bits) - 1;
  // High Bit above Bits Stored - 1 places the stored bits higher in the word (PS3.5 8.1.1).
  int hb = h.high_bit;
  if (hb >= sb.bits && hb < h.bits_allocated) sb.shift = hb - sb.bits + 1;
  return sb;
}

// The mapping from a stored (sign-extended) value to the output value before rounding.
class Mapper {
 public:
  Mapper(const Header& h, const RenderOptions& opt, DType dtype, const StoredBits& sb) : h_(h), mode_(opt.mode) {
    scale_ = dtype == DType::U8 ? 255.0 : dtype == DType::U16 ? 65535.0 : 1.0;
    invert_ = h.photometric == "MONOCHROME1" || h.presentation_lut_shape == "INVERSE";
    color_ = h.samples_per_pixel != 1;
    std::string f = h.voi_function.empty() ? "LINEAR" : h.voi_function;
    for (auto& ch : f) ch = char(std::toupper(ch));
    function_ = f == "SIGMOID" ? 2 : f == "LINEAR_EXACT" ? 1 : 0;
    // A non-finite value is ignored like an absent one (NaN passes std::clamp and would
    // reach the integer conversion; an infinite centre or width gives a constant image).
    if (h.has_rescale) {
      has_rescale_ = true;
      slope_ = std::isfinite(h.rescale_slope) ? h.rescale_slope : 1.0;
      intercept_ = std::isfinite(h.rescale_intercept) ? h.rescale_intercept : 0.0;
    }
    if (!color_ && !h.window_centers.empty() && !h.window_widths.empty() && std::isfinite(h.window_centers[0]) &&
        std::isfinite(h.window_widths[0])) {
      center_ = h.window_centers[0];
      width_ = h.window_widths[0];
      has_window_ = function_ == 0 ? width_ >= 1.0 : width_ > 0.0;
    }
    if (mode_ != OutputMode::Stored && !color_ && has_rescale_ && !(h.has_modality_lut && !h.modality_lut.data.empty()))
      check_rescale_range(sb);
    if (h.has_voi_lut && !h.voi_lut.data.empty() && !color_) {
      // VOI LUT data can be narrower than its descriptor says (Agfa CR): use the bits the
      // data actually needs when that is fewer.
      uint16_t top = *std::max_element(h.voi_lut.data.begin(), h.voi_lut.data.end());
      int need = 1;
      while (need < 16 && (1u << need) - 1 < top) ++need;
      int bits = std::min(h.voi_lut.bits, need);
      if (top > (1u << h.voi_lut.bits) - 1) bits = need;
      voi_lut_max_ = double((1u << bits) - 1);
    }
  }

  double modality(int64_t v) const {
    if (color_) return double(v);
    if (h_.has_modality_lut && !h_.modality_lut.data.empty()) {
      int64_t i = v - h_.modality_lut.first_mapped;
      i = std::clamp<int64_t>(i, 0, int64_t(h_.modality_lut.data.size()) - 1);
      return h_.modality_lut.data[size_t(i)];
    }
    if (has_rescale_) return double(v) * slope_ + intercept_;
    return double(v);
  }

  // Modality values are float32 (output="modality"): a rescale that maps the stored range
  // beyond it is refused, so every value downstream is finite and no difference overflows.
  void check_rescale_range(const StoredBits& sb) const {
    double lo = sb.is_signed ? -std::ldexp(1.0, sb.bits - 1) : 0.0;
    double hi = sb.is_signed ? std::ldexp(1.0, sb.bits - 1) - 1 : std::ldexp(1.0, sb.bits) - 1;
    const double limit = double(std::numeric_limits<float>::max());
    double a = lo * slope_ + intercept_, b = hi * slope_ + intercept_;
    if (!(std::fabs(a) <= limit && std::fabs(b) <= limit)) {
      char msg[160];
      std::snprintf(msg, sizeof msg, "Rescale Slope %g and Rescale Intercept %g map the stored values beyond float32",
                    slope_, intercept_);
      throw Error(ErrorKind::Invalid, msg);
    }
  }

  void set_range(double lo, double hi) {
    lo_ = lo;
    hi_ = hi;
  }
  bool needs_range() const { return mode_ == OutputMode::Display && !color_ && !has_window_ && voi_lut_max_ == 0; }

  // Display value in [0, 1] for a modality value.
  double voi(double m) const {
    double t;
    if (voi_lut_max_ > 0) {
      // Clamped in floating point before the conversion (m may be far outside int64).
      const auto& lut = h_.voi_lut;
      const double off = std::floor(m) - double(lut.first_mapped), last = double(lut.data.size() - 1);
      const size_t i = off > 0 ? (off < last ? size_t(off) : lut.data.size() - 1) : 0;  // NaN -> 0
      t = lut.data[i] / voi_lut_max_;
    } else if (has_window_) {
      if (function_ == 2) {
        t = 1.0 / (1.0 + std::exp(-4.0 * (m - center_) / width_));
      } else {
        double c = function_ == 0 ? center_ - 0.5 : center_;
        double w = function_ == 0 ? width_ - 1.0 : width_;
        if (m <= c - w / 2) t = 0.0;
        else if (m > c + w / 2) t = 1.0;
        else t = w > 0 ? (m - c) / w + 0.5 : 1.0;
      }
    } else {
      t = hi_ > lo_ ? (m - lo_) / (hi_ - lo_) : 0.0;
    }
    t = std::clamp(t, 0.0, 1.0);
    return invert_ ? 1.0 - t : t;
  }

  double operator()(int64_t v) const {
    switch (mode_) {
      case OutputMode::Stored: return double(v);
      case OutputMode::Modality: return modality(v);
      case OutputMode::Display:
        if (color_) return std::clamp(double(v) / color_max_, 0.0, 1.0) * scale_;
        return voi(modality(v)) * scale_;
    }
    return 0;
  }
  void set_color_max(double m) { color_max_ = m > 0 ? m : 1.0; }

 private:
  const Header& h_;
  OutputMode mode_;
  double scale_ = 1.0;
  bool invert_ = false, color_ = false, has_window_ = false, has_rescale_ = false;
  int function_ = 0;
  double slope_ = 1.0, intercept_ = 0.0;
  double center_ = 0, width_ = 0, voi_lut_max_ = 0, lo_ = 0, hi_ = 0, color_max_ = 1;
};

// Samples may sit at any byte offset in the file buffer: load them with memcpy (one mov).
template <class Raw>
inline uint32_t rd(const uint8_t* p, size_t i) {
  Raw r;
  std::memcpy(&r, p + i * sizeof(Raw), sizeof(Raw));
  return uint32_t(r);
}

// Calls f(Raw{}) with the sample word type of px.
template <class F>
void with_raw(const StoredPixels& px, F&& f) {
  switch (px.bytes_per_sample) {
    case 1: f(uint8_t()); break;
    case 2: f(uint16_t()); break;
    default: f(uint32_t()); break;
  }
}

template <class Out>
Out quantize(double v) {
  if constexpr (std::is_floating_point_v<Out>) {
    return Out(v);
  } else {
    // Saturating and NaN-safe: the conversion only ever sees a value inside Out's range.
    constexpr double lo = double(std::numeric_limits<Out>::lowest()), hi = double(std::numeric_limits<Out>::max());
    if (!(v > lo)) return std::numeric_limits<Out>::lowest();
    if (!(v < hi)) return std::numeric_limits<Out>::max();
    return Out(std::nearbyint(v));
  }
}

// Separable triangle-filter weights; the filter widens with the downscale factor (antialias).
struct Weights {
  std::vector<int> start, count;
  std::vector<float> w;
  int taps = 0;
};

Weights make_weights(int in, int out) {
  Weights wt;
  double scale = double(in) / out;
  double support = std::max(scale, 1.0);
  wt.taps = int(std::ceil(support)) * 2 + 2;
  wt.start.resize(out);
  wt.count.resize(out);
  wt.w.assign(size_t(out) * wt.taps, 0.f);
  for (int o = 0; o < out; ++o) {
    double center = (o + 0.5) * scale;
    int lo = std::max(0, int(std::floor(center - support)));
    int hi = std::min(in, int(std::ceil(center + support)));
    double sum = 0;
    int n = 0;
    std::vector<double> tmp;
    for (int x = lo; x < hi && n < wt.taps; ++x, ++n) {
      double d = std::fabs((x + 0.5 - center) / support);
      double w = d < 1.0 ? 1.0 - d : 0.0;
      tmp.push_back(w);
      sum += w;
    }
    if (sum <= 0) {  // degenerate: nearest sample
      tmp.assign(size_t(n), 0.0);
      tmp[size_t(std::clamp(int(center) - lo, 0, n - 1))] = 1.0;
      sum = 1.0;
    }
    wt.start[o] = lo;
    wt.count[o] = n;
    for (int k = 0; k < n; ++k) wt.w[size_t(o) * wt.taps + k] = float(tmp[size_t(k)] / sum);
  }
  return wt;
}

// values(row, buffer) fills one input row of floats (cols * samples).
template <class Out, class RowFn>
void resize_frame(const Shape& in, int out_h, int out_w, RowFn values, Out* out) {
  const int S = in.samples;
  Weights wx = make_weights(in.cols, out_w), wy = make_weights(in.rows, out_h);
  std::vector<float> row(size_t(in.cols) * S);
  std::vector<float> tmp(size_t(in.rows) * out_w * S);
  for (int y = 0; y < in.rows; ++y) {
    values(y, row.data());
    float* t = tmp.data() + size_t(y) * out_w * S;
    for (int o = 0; o < out_w; ++o) {
      const float* w = wx.w.data() + size_t(o) * wx.taps;
      const float* src = row.data() + size_t(wx.start[o]) * S;
      for (int s = 0; s < S; ++s) {
        float acc = 0.f;
        for (int k = 0; k < wx.count[o]; ++k) acc += w[k] * src[size_t(k) * S + s];
        t[size_t(o) * S + s] = acc;
      }
    }
  }
  std::vector<float> acc(size_t(out_w) * S);
  for (int o = 0; o < out_h; ++o) {
    std::fill(acc.begin(), acc.end(), 0.f);
    const float* w = wy.w.data() + size_t(o) * wy.taps;
    for (int k = 0; k < wy.count[o]; ++k) {
      const float* src = tmp.data() + size_t(wy.start[o] + k) * out_w * S;
      float wk = w[k];
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += wk * src[i];
    }
    Out* dst = out + size_t(o) * out_w * S;
    for (size_t i = 0; i < acc.size(); ++i) dst[i] = quantize<Out>(acc[i]);
  }
}

template <class Raw, class Out>
void render_typed(const StoredPixels& px, const Mapper& map, const StoredBits& sb, int out_h, int out_w, Out* out) {
  Shape in{px.frames, px.rows, px.columns, px.samples};
  const size_t frame_in = in.pixels();
  const bool use_lut = sb.bits <= 16;
  std::vector<float> flut;
  std::vector<Out> qlut;
  if (use_lut) {
    StoredBits unshifted = sb;
    unshifted.shift = 0;
    flut.resize(size_t(1) << sb.bits);
    qlut.resize(flut.size());
    for (uint32_t i = 0; i < flut.size(); ++i) {
      double v = map(unshifted.value(i));
      if (!std::isfinite(v)) throw Error(ErrorKind::Invalid, "the display pipeline gave a non-finite value");
      flut[i] = float(v);
      qlut[i] = quantize<Out>(v);
    }
  }
  const uint8_t* src = px.bytes();
  const int shift = sb.shift;
  const uint32_t mask = sb.mask;
  const bool resize = out_h != px.rows || out_w != px.columns;
  const size_t frame_out = size_t(out_h) * out_w * in.samples;
  for (int f = 0; f < in.frames; ++f) {
    const size_t base = size_t(f) * frame_in;
    Out* dst = out + size_t(f) * frame_out;
    if (!resize) {
      if (use_lut) {
        const Out* q = qlut.data();
        for (size_t i = 0; i < frame_in; ++i) dst[i] = q[(rd<Raw>(src, base + i) >> shift) & mask];
      } else {
        for (size_t i = 0; i < frame_in; ++i) dst[i] = quantize<Out>(map(sb.value(rd<Raw>(src, base + i))));
      }
      continue;
    }
    const size_t row_len = size_t(in.cols) * in.samples;
    auto values = [&](int y, float* row) {
      const size_t r0 = base + size_t(y) * row_len;
      if (use_lut) {
        const float* q = flut.data();
        for (size_t i = 0; i < row_len; ++i) row[i] = q[(rd<Raw>(src, r0 + i) >> shift) & mask];
      } else {
        for (size_t i = 0; i < row_len; ++i) row[i] = float(map(sb.value(rd<Raw>(src, r0 + i))));
      }
    };
    resize_frame<Out>(in, out_h, out_w, values, dst);
  }
}

// Stored output without resize: exact integers of any width, sign-extended branch-free.
template <class Raw, class Out>
void stored_exact(const StoredPixels& px, const StoredBits& sb, Out* out) {
  const size_t n = px.count();
  const uint8_t* src = px.bytes();
  if (!sb.is_signed && sb.shift == 0 && sb.bits == int(8 * sizeof(Raw)) && sizeof(Out) == sizeof(Raw)) {
    std::memcpy(out, src, n * sizeof(Out));
    return;
  }
  const int shift = sb.shift;
  const uint32_t mask = sb.mask;
  if (sb.is_signed) {
    const int up = 32 - sb.bits;
    for (size_t i = 0; i < n; ++i)
      out[i] = Out(int32_t(((rd<Raw>(src, i) >> shift) & mask) << up) >> up);
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = Out((rd<Raw>(src, i) >> shift) & mask);
  }
}

template <class Raw>
void value_range(const StoredPixels& px, const StoredBits& sb, int64_t& lo, int64_t& hi) {
  const size_t n = px.count();
  const uint8_t* src = px.bytes();
  if (sb.bits <= 16) {  // a presence table over the stored bits: one pass, no branches
    std::vector<uint8_t> seen(size_t(1) << sb.bits, 0);
    for (size_t i = 0; i < n; ++i) seen[(rd<Raw>(src, i) >> sb.shift) & sb.mask] = 1;
    lo = INT64_MAX;
    hi = INT64_MIN;
    for (uint32_t v = 0; v < seen.size(); ++v)
      if (seen[v]) {
        int64_t s = sb.value(v << sb.shift);
        lo = std::min(lo, s);
        hi = std::max(hi, s);
      }
    return;
  }
  lo = INT64_MAX;
  hi = INT64_MIN;
  for (size_t i = 0; i < n; ++i) {
    int64_t v = sb.value(rd<Raw>(src, i));
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
}

// The min/max window: the modality values the stored range [lo, hi] maps to (a Modality LUT
// need not be monotonic, so every stored value in the range is looked at).
void set_stored_range(Mapper& map, const Header& h, int64_t lo, int64_t hi) {
  double mlo = map.modality(lo), mhi = map.modality(hi);
  if (h.has_modality_lut && hi - lo <= 65536) {
    for (int64_t v = lo; v <= hi; ++v) {
      double m = map.modality(v);
      mlo = std::min(mlo, m);
      mhi = std::max(mhi, m);
    }
  }
  map.set_range(std::min(mlo, mhi), std::max(mlo, mhi));
}

}  // namespace

Rendered render(const Header& h, const StoredPixels& px, const RenderOptions& opt) {
  Rendered r;
  r.frames = px.frames;
  r.samples = px.samples;
  r.rows = px.rows;
  r.columns = px.columns;
  if (opt.size_h > 0 && opt.size_w > 0) {
    r.rows = opt.size_h;
    r.columns = opt.size_w;
  } else if (opt.size_longest > 0) {
    if (opt.size_longest > 65536) throw Error(ErrorKind::Invalid, "output size too large");
    double s = double(opt.size_longest) / std::max({px.rows, px.columns, 1});
    r.rows = std::max(1, int(std::lround(px.rows * s)));
    r.columns = std::max(1, int(std::lround(px.columns * s)));
  }
  if (r.rows > 65536 || r.columns > 65536) throw Error(ErrorKind::Invalid, "output size too large");

  StoredBits sb = stored_bits(h);
  DType dtype = opt.dtype;
  if (opt.mode == OutputMode::Modality) dtype = DType::F32;
  if (opt.mode == OutputMode::Display && dtype == DType::Auto) dtype = DType::U8;

  Mapper map(h, opt, dtype, sb);
  if (px.samples != 1) map.set_color_max(double(sb.mask));
  if (map.needs_range() && px.count() > 0) {
    int64_t lo = 0, hi = 0;
    with_raw(px, [&](auto raw) { value_range<decltype(raw)>(px, sb, lo, hi); });
    set_stored_range(map, h, lo, hi);
  }

  size_t count = size_t(r.frames) * r.rows * r.columns * r.samples;
  bool resize = r.rows != px.rows || r.columns != px.columns;
  auto go = [&](auto tag, const char* code) {
    using Out = decltype(tag);
    r.dtype = code;
    r.data.resize(count * sizeof(Out));
    Out* out = reinterpret_cast<Out*>(r.data.data());
    with_raw(px, [&](auto raw) {
      using Raw = decltype(raw);
      if (opt.mode == OutputMode::Stored && !resize)
        stored_exact<Raw, Out>(px, sb, out);
      else
        render_typed<Raw, Out>(px, map, sb, r.rows, r.columns, out);
    });
  };
  if (opt.mode == OutputMode::Stored) {
    bool s = h.pixel_representation == 1;
    if (h.bits_allocated <= 8) s ? go(int8_t(), "i1") : go(uint8_t(), "u1");
    else if (h.bits_allocated <= 16) s ? go(int16_t(), "i2") : go(uint16_t(), "u2");
    else s ? go(int32_t(), "i4") : go(uint32_t(), "u4");
  } else if (dtype == DType::U8) {
    go(uint8_t(), "u1");
  } else if (dtype == DType::U16) {
    go(uint16_t(), "u2");
  } else {
    go(float(), "f4");
  }
  return r;
}

}  // namespace cxr

namespace cxr {

DisplayLut display_lut(const Header& h, bool has_range, int64_t lo, int64_t hi) {
  if (h.samples_per_pixel != 1) throw Error(ErrorKind::Unsupported, "display LUT for colour images");
  StoredBits sb = stored_bits(h);
  if (sb.bits > 16) throw Error(ErrorKind::Unsupported, "display LUT for Bits Stored above 16");
  RenderOptions opt;
  opt.mode = OutputMode::Display;
  opt.dtype = DType::F32;
  Mapper map(h, opt, DType::F32, sb);
  if (map.needs_range()) {
    if (!has_range) throw Error(ErrorKind::Invalid, "this image has no window: its display LUT needs the stored value range");
    set_stored_range(map, h, lo, hi);
  }
  DisplayLut out;
  out.shift = sb.shift;
  out.mask = sb.mask;
  out.needs_range = map.needs_range();
  out.values.resize(size_t(1) << sb.bits);
  StoredBits unshifted = sb;
  unshifted.shift = 0;
  for (uint32_t i = 0; i < out.values.size(); ++i) {
    double v = map(unshifted.value(i));
    if (!std::isfinite(v)) throw Error(ErrorKind::Invalid, "the display pipeline gave a non-finite value");
    out.values[i] = float(v);
  }
  return out;
}

}  // namespace cxr
