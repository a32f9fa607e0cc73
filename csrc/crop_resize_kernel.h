// The crop-resize kernel (see crop_resize.cpp), compiled twice: by crop_resize.cpp for any
// CPU and by crop_resize_avx2.cpp for AVX2 + FMA, picked at run time. The including file
// includes the standard headers first and defines CXR_CROP_WORKER, the name of the worker
// loop it exports; everything else here has internal linkage, so the two copies never mix.
#ifndef CXR_CROP_WORKER
#error "define CXR_CROP_WORKER before including crop_resize_kernel.h"
#endif

namespace cxr {
namespace {

// One axis: output o reads `taps` inputs from `start[o]` with weights `w[o * taps ...]`;
// every output has the same tap count (zero-padded), so the inner loops have a fixed length.
struct Taps {
  std::vector<int> start;
  std::vector<float> w;
  int taps = 0;
  std::vector<int> first, count;  // triangle_taps' scratch, kept to reuse its memory
  std::vector<double> exact;
};

// Weights of the triangle filter mapping `in` samples (a crop of the axis) onto `out`, each
// multiplied by `gain`; zero weights at the ends are dropped, so an upscale reads two inputs.
void triangle_taps(int in, int out, float gain, Taps& t) {
  const double scale = double(in) / out;
  const double support = std::max(scale, 1.0);
  const int most = int(std::ceil(support)) * 2 + 1;
  std::vector<int>& first = t.first;
  std::vector<int>& count = t.count;
  std::vector<double>& w = t.exact;
  first.resize(size_t(out));
  count.resize(size_t(out));
  w.resize(size_t(out) * most);  // only the first count[o] weights of each output are read
  const double inv_support = 1.0 / support;
  int taps = 1;
  for (int o = 0; o < out; ++o) {
    const double center = (o + 0.5) * scale;
    const int lo = std::max(0, int(std::floor(center - support)));
    const int hi = std::min(in, int(std::ceil(center + support)));
    double* wo = w.data() + size_t(o) * most;
    int f = -1, n = 0;
    double sum = 0;
    for (int x = lo; x < hi && n < most; ++x) {
      const double d = std::fabs((x + 0.5 - center) * inv_support);
      const double v = d < 1.0 ? 1.0 - d : 0.0;
      if (v <= 0.0 && f < 0) continue;  // leading zero weights
      if (f < 0) f = x;
      wo[n++] = v;
      sum += v;
    }
    while (n > 0 && wo[n - 1] <= 0.0) --n;  // trailing zero weights
    if (n == 0 || sum <= 0.0) {             // cannot happen for in >= 1; stay safe anyway
      f = std::clamp(int(center), 0, in - 1);
      wo[0] = 1.0;
      n = 1;
      sum = 1.0;
    }
    const double inv_sum = 1.0 / sum;
    for (int k = 0; k < n; ++k) wo[k] *= inv_sum;
    first[size_t(o)] = f;
    count[size_t(o)] = n;
    taps = std::max(taps, n);
  }
  t.taps = taps;  // <= in, since every count is
  t.start.assign(size_t(out), 0);
  t.w.assign(size_t(out) * taps, 0.f);
  for (int o = 0; o < out; ++o) {
    const int s = std::min(first[size_t(o)], in - taps);  // pad at the end, or shift near the edge
    const int shift = first[size_t(o)] - s;
    t.start[size_t(o)] = s;
    for (int k = 0; k < count[size_t(o)]; ++k)
      t.w[size_t(o) * taps + shift + k] = float(w[size_t(o) * most + k] * gain);
  }
}

struct Scratch {
  Taps tx, ty;
  std::vector<float> tmp, row;
};

// Horizontal pass over one row: dst[o] (dst[size-1-o] when mirrored) = offset + sum of taps.
template <int T, class S>
void filter_row(const S* src, const Taps& t, int size, bool mirror, float offset, float* dst) {
  const int taps = T > 0 ? T : t.taps;
  const float* w = t.w.data();
  for (int o = 0; o < size; ++o, w += taps) {
    const S* s = src + t.start[size_t(o)];
    float acc = offset;
    for (int k = 0; k < taps; ++k) acc += w[k] * float(s[k]);
    dst[mirror ? size - 1 - o : o] = acc;
  }
}

// Vertical pass for output row o: dst[i] = offset + sum_k w[k] * rows(start + k)[i].
template <int T, class RowPtr>
void filter_cols(RowPtr rows, const Taps& t, int o, int width, float offset, float* __restrict dst) {
  const int taps = T > 0 ? T : t.taps;
  const float* w = t.w.data() + size_t(o) * taps;
  const int start = t.start[size_t(o)];
  if constexpr (T > 0) {
    // weights and row pointers in locals, which dst cannot alias: the loop vectorises
    decltype(rows(0)) r[T];
    float wk[T];
    for (int k = 0; k < T; ++k) r[k] = rows(start + k), wk[k] = w[k];
    for (int i = 0; i < width; ++i) {
      float acc = offset;
      for (int k = 0; k < T; ++k) acc += wk[k] * float(r[k][i]);
      dst[i] = acc;
    }
  } else {
    std::fill(dst, dst + width, offset);
    for (int k = 0; k < taps; ++k) {
      const auto* src = rows(start + k);
      const float wk = w[k];
      for (int i = 0; i < width; ++i) dst[i] += wk * float(src[i]);
    }
  }
}

// Calls f with the tap count as a compile-time constant where it is a common one (0: any).
template <class F>
void with_taps(int taps, F&& f) {
  switch (taps) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    default: f(std::integral_constant<int, 0>()); break;
  }
}

template <class T>
void crop_resize_one(const CropJob& job, int size, float gain, float offset, Scratch& s) {
  const T* base = static_cast<const T*>(job.src) + ptrdiff_t(job.top) * job.stride + job.left;
  const int out_h = job.out_h > 0 ? job.out_h : size, out_w = job.out_w > 0 ? job.out_w : size;
  // The gain rides on the weights of the last pass and the offset is its starting value.
  const bool rows_first = job.height <= out_h;  // the gathering pass runs on fewer rows
  triangle_taps(job.width, out_w, rows_first ? 1.f : gain, s.tx);
  triangle_taps(job.height, out_h, rows_first ? gain : 1.f, s.ty);
  if (rows_first) {
    s.tmp.resize(size_t(job.height) * out_w);
    with_taps(s.tx.taps, [&](auto TX) {
      for (int y = 0; y < job.height; ++y)
        filter_row<TX.value>(base + ptrdiff_t(y) * job.stride, s.tx, out_w, job.mirror, 0.f,
                             s.tmp.data() + size_t(y) * out_w);
    });
    with_taps(s.ty.taps, [&](auto TY) {
      auto rows = [&](int y) -> const float* { return s.tmp.data() + size_t(y) * out_w; };
      for (int o = 0; o < out_h; ++o)
        filter_cols<TY.value>(rows, s.ty, o, out_w, offset, job.out + size_t(o) * out_w);
    });
  } else {
    // Vertical first (contiguous, vectorised) down to `out_h` rows, then the gathering pass.
    s.row.resize(size_t(job.width));
    with_taps(s.ty.taps, [&](auto TY) {
      with_taps(s.tx.taps, [&](auto TX) {
        auto rows = [&](int y) -> const T* { return base + ptrdiff_t(y) * job.stride; };
        for (int o = 0; o < out_h; ++o) {
          filter_cols<TY.value>(rows, s.ty, o, job.width, 0.f, s.row.data());
          filter_row<TX.value>(s.row.data(), s.tx, out_w, job.mirror, offset, job.out + size_t(o) * out_w);
        }
      });
    });
  }
}

}  // namespace

// Takes jobs from `next` until none is left.
void CXR_CROP_WORKER(const std::vector<CropJob>& jobs, std::atomic<size_t>& next, int bytes_per_sample, int size,
                     float gain, float offset) {
  Scratch s;
  for (size_t i = next++; i < jobs.size(); i = next++) {
    if (bytes_per_sample == 1)
      crop_resize_one<uint8_t>(jobs[i], size, gain, offset, s);
    else if (bytes_per_sample == 2)
      crop_resize_one<uint16_t>(jobs[i], size, gain, offset, s);
    else
      crop_resize_one<float>(jobs[i], size, gain, offset, s);
  }
}

}  // namespace cxr
