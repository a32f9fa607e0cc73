// Float / Double Float Pixel Data (PS3.3 C.7.6.24, e.g. parametric maps) to output: stored and
// modality values as floats, display through the min/max window of the finite values. No
// Modality LUT or rescale applies to float pixel data (they are real values already).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "cxrdicom.h"

namespace cxr {
namespace {

template <class F>
F sample(const uint8_t* p, size_t i) {
  F v;
  std::memcpy(&v, p + i * sizeof(F), sizeof(F));
  return v;
}

// Calls f(float()) or f(double()) for the sample type of px.
template <class Fn>
void with_float(const StoredPixels& px, Fn&& f) {
  if (px.bytes_per_sample == 8) f(double());
  else f(float());
}

// float(v) without undefined behaviour: a double beyond float's range becomes +-inf.
float narrow(double v) {
  if (v > double(FLT_MAX)) return INFINITY;
  if (v < -double(FLT_MAX)) return -INFINITY;
  return float(v);
}

// t in [0, 1] to 0..65535 with every non-finite t mapped explicitly before lround (lround of
// NaN or of a value beyond long is undefined): NaN -> 0, +inf -> 65535, -inf -> 0.
uint16_t quantise16(double t) {
  if (std::isnan(t)) return 0;
  t = std::clamp(t, 0.0, 1.0);
  return uint16_t(std::lround(t * 65535.0));
}

bool resizes(const StoredPixels& px, const RenderOptions& opt) {
  if (opt.size_h > 0 && opt.size_w > 0) return opt.size_h != px.rows || opt.size_w != px.columns;
  if (opt.size_longest > 0) return opt.size_longest != std::max(px.rows, px.columns);
  return false;
}

}  // namespace

Rendered render_float(const Header& h, const StoredPixels& px, const RenderOptions& opt) {
  const size_t n = px.count();
  const uint8_t* src = px.bytes();
  if (opt.mode != OutputMode::Display) {
    if (resizes(px, opt))
      throw Error(ErrorKind::Unsupported, "resizing Float Pixel Data: only output='display' resizes it");
    Rendered r;
    r.frames = px.frames, r.rows = px.rows, r.columns = px.columns, r.samples = 1;
    if (opt.mode == OutputMode::Stored) {
      r.dtype = px.bytes_per_sample == 8 ? "f8" : "f4";
      r.data.resize(n * size_t(px.bytes_per_sample));
      std::memcpy(r.data.data(), src, r.data.size());
      return r;
    }
    r.dtype = "f4";
    r.data.resize(n * sizeof(float));
    float* out = reinterpret_cast<float*>(r.data.data());
    with_float(px, [&](auto tag) {
      using F = decltype(tag);
      for (size_t i = 0; i < n; ++i) out[i] = narrow(double(sample<F>(src, i)));
    });
    return r;
  }
  // Display: (v - min) / (max - min) over the finite values, quantised to 16 bits, then the
  // ordinary pipeline with an identity window (LINEAR_EXACT, centre 32767.5, width 65535:
  // t = q / 65535) does MONOCHROME1 / Presentation LUT inversion, resize and output dtype.
  double lo = INFINITY, hi = -INFINITY;
  with_float(px, [&](auto tag) {
    using F = decltype(tag);
    for (size_t i = 0; i < n; ++i) {
      double v = double(sample<F>(src, i));
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
    }
  });
  StoredPixels q;
  q.frames = px.frames, q.rows = px.rows, q.columns = px.columns, q.samples = 1;
  q.bytes_per_sample = 2;
  q.data.resize(n * 2);
  // In halves: hi - lo overflows to inf when the finite values span more than DBL_MAX
  // (e.g. -1e308 .. 1e308), and inf / inf would be NaN; half of each stays finite.
  const double half_span = hi > lo ? hi * 0.5 - lo * 0.5 : 0.0;
  with_float(px, [&](auto tag) {
    using F = decltype(tag);
    for (size_t i = 0; i < n; ++i) {
      double v = double(sample<F>(src, i));
      double t = half_span > 0.0 ? (v * 0.5 - lo * 0.5) / half_span : 0.0;
      uint16_t w = quantise16(t);
      std::memcpy(q.data.data() + 2 * i, &w, 2);
    }
  });
  Header g = h;
  g.float_bits = 0;
  g.samples_per_pixel = 1;
  g.bits_allocated = g.bits_stored = 16;
  g.high_bit = 15;
  g.pixel_representation = 0;
  g.has_rescale = g.has_modality_lut = g.has_voi_lut = false;
  g.voi_function = "LINEAR_EXACT";
  g.window_centers = {32767.5};
  g.window_widths = {65535.0};
  return render(g, q, opt);
}

Rendered decode_render(const Dataset& ds, int64_t frame, const RenderOptions& opt) {
  StoredPixels px = decode_stored(ds, frame, opt.threads);
  return ds.header.float_bits ? render_float(ds.header, px, opt) : render(ds.header, px, opt);
}

}  // namespace cxr
